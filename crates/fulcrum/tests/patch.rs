//! PATCH through HTTP: every row of the product document's support table with its examples,
//! json_patch, bad bodies, preconditions, concurrency, and a crash in the middle.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Api, Controller, start, temp_dir};
use serde_json::{Value, json};

fn setup() -> (tempfile::TempDir, Controller) {
    let dir = temp_dir();
    let c = start(dir.path());
    (dir, c)
}

fn create(api: &Api, kind: &str, body: Value) -> Value {
    let r = api.post(&format!("/api/{kind}"), &body);
    assert_eq!(r.status, 201, "POST {kind}: {}", r.body);
    r.json()
}

fn path_of(kind: &str, obj: &Value) -> String {
    format!("/api/{kind}/{}", obj["uuid"].as_str().unwrap())
}

fn patch(api: &Api, path: &str, body: Value) -> Value {
    let r = api.send("PATCH", path, Some(body.to_string().as_bytes()));
    assert_eq!(r.status, 200, "PATCH {path} {body}: {}", r.body);
    r.json()
}

fn server(addr: &str) -> Value {
    json!({"ip": {"addr": addr, "type": "V4"}})
}

fn server_addrs(pool: &Value) -> Vec<String> {
    pool["servers"]
        .as_array()
        .map_or(vec![], |s| s.iter().map(|s| format!("{}:{}", s["ip"]["addr"].as_str().unwrap(), s["port"])).collect())
}

#[test]
fn pool_servers_and_scalars_as_in_the_document() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "doc-pool"}));
    let path = path_of("pool", &pool);
    let p = patch(&api, &path, json!({"add": {"servers": [server("1.1.1.1"), server("1.1.1.2")]}}));
    assert_eq!(server_addrs(&p), ["1.1.1.1:80", "1.1.1.2:80"]);
    assert!(p["url"].as_str().unwrap().ends_with("#doc-pool"), "the whole object comes back");
    let p = patch(&api, &path, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 10}]}}));
    assert_eq!(server_addrs(&p), ["1.1.1.1:80", "1.1.1.2:80"]);
    assert_eq!(p["servers"][0]["ratio"], 10);
    let p = patch(&api, &path, json!({"replace": {"servers": [server("3.3.3.3"), server("3.3.3.4")]}}));
    assert_eq!(server_addrs(&p), ["3.3.3.3:80", "3.3.3.4:80"]);
    let p = patch(&api, &path, json!({"delete": {"servers": [server("3.3.3.3")]}}));
    assert_eq!(server_addrs(&p), ["3.3.3.4:80"]);
    let p = patch(&api, &path, json!({"replace": {"request_queue_enabled": true, "default_server_port": 8080}}));
    assert_eq!((p["request_queue_enabled"].clone(), p["default_server_port"].clone()), (json!(true), json!(8080)));
    let p = patch(&api, &path, json!({"delete": {"default_server_port": 8080}}));
    assert_eq!(p["default_server_port"], 80);
    assert_eq!(api.object(&path), api.object(&path), "GET agrees");
    assert_eq!(server_addrs(&api.object(&path)), ["3.3.3.4:80"]);
    // The document's examples verbatim carry trailing commas and Python's True: refused with a position.
    let verbatim = "{\n    \"replace\": {\n        \"request_queue_enabled\": True,\n        \"default_server_port\": 8080\n    }\n}";
    let r = api.send("PATCH", &path, Some(verbatim.as_bytes()));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("line 3 column"), "{}", r.error());
    let trailing = "{\"delete\": {\"servers\": [{\"ip\": {\"addr\": \"3.3.3.4\", \"type\": \"V4\"},}]}}";
    let r = api.send("PATCH", &path, Some(trailing.as_bytes()));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("trailing comma at line 1 column"), "{}", r.error());
    assert_eq!(server_addrs(&api.object(&path)), ["3.3.3.4:80"]);
}

#[test]
fn pool_health_monitor_refs() {
    let (_d, c) = setup();
    let api = c.admin();
    let hm = api.object("/api/healthmonitor?name=System-HTTP")["results"][0].clone();
    let hm_uuid = hm["uuid"].as_str().unwrap();
    let path = path_of("pool", &create(&api, "pool", json!({"name": "hm-pool"})));
    let p = patch(&api, &path, json!({"add": {"health_monitor_refs": [hm_uuid]}}));
    assert_eq!(p["health_monitor_refs"], json!([format!("{}/api/healthmonitor/{hm_uuid}#System-HTTP", c.url)]));
    let p =
        patch(&api, &path, json!({"add": {"health_monitor_refs": [hm["url"], "/api/healthmonitor?name=System-TCP"]}}));
    assert_eq!(p["health_monitor_refs"].as_array().unwrap().len(), 2, "no duplicates");
    let p = patch(&api, &path, json!({"delete": {"health_monitor_refs": [hm_uuid]}}));
    assert!(p["health_monitor_refs"][0].as_str().unwrap().ends_with("#System-TCP"));
    // The monitor is referred to now, so it cannot be deleted.
    let tcp = api.object("/api/healthmonitor?name=System-TCP")["results"][0]["uuid"].as_str().unwrap().to_string();
    assert!(api.delete(&format!("/api/healthmonitor/{tcp}")).status >= 400);
    // One request that appends a monitor by name, then removes the entry before it: the new
    // entry is resolved where it ends up.
    let rfc = api.clone().header("Content-Type", "application/json-patch+json");
    let ops = json!([
        {"op": "add", "path": "/health_monitor_refs/-", "value": "/api/healthmonitor?name=System-HTTP"},
        {"op": "remove", "path": "/health_monitor_refs/0"},
    ]);
    let r = rfc.send("PATCH", &path, Some(ops.to_string().as_bytes()));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health_monitor_refs"], json!([format!("{}/api/healthmonitor/{hm_uuid}#System-HTTP", c.url)]));
}

#[test]
fn every_other_row_of_the_support_table() {
    let (_d, c) = setup();
    let api = c.admin();
    // Cloud: linuxserver_configuration.hosts, keyed by host_ip.addr.
    let cloud =
        create(&api, "cloud", json!({"name": "lsc", "vtype": "CLOUD_LINUXSERVER", "linuxserver_configuration": {}}));
    let path = path_of("cloud", &cloud);
    let host =
        |a: &str| json!({"host_ip": {"addr": a, "type": "V4"}, "host_attr": [{"attr_key": "CPU", "attr_val": "All"}]});
    let cl = patch(
        &api,
        &path,
        json!({"add": {"linuxserver_configuration": {"hosts": [host("10.10.0.1"), host("10.10.0.2")]}}}),
    );
    assert_eq!(cl["linuxserver_configuration"]["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(cl["linuxserver_configuration"]["se_log_disk_size_GB"], 5, "the rest of the sub-object stays");
    let cl = patch(
        &api,
        &path,
        json!({"delete": {"linuxserver_configuration": {"hosts": [{"host_ip": {"addr": "10.10.0.1", "type": "V4"}}]}}}),
    );
    assert_eq!(cl["linuxserver_configuration"]["hosts"][0]["host_ip"]["addr"], "10.10.0.2");

    // GslbService: enabled.
    let g = create(&api, "gslbservice", json!({"name": "gs", "domain_names": ["a.example"]}));
    let gs = patch(&api, &path_of("gslbservice", &g), json!({"replace": {"enabled": false}}));
    assert_eq!(gs["enabled"], false);
    let gs = patch(&api, &path_of("gslbservice", &g), json!({"add": {"enabled": true}}));
    assert_eq!(gs["enabled"], true);

    // IpAddrGroup: addrs, prefixes, ranges.
    let ig = create(&api, "ipaddrgroup", json!({"name": "ig"}));
    let path = path_of("ipaddrgroup", &ig);
    let v4 = |a: &str| json!({"addr": a, "type": "V4"});
    let g = patch(
        &api,
        &path,
        json!({"add": {"addrs": [v4("10.0.0.1"), v4("10.0.0.2")],
        "prefixes": [{"ip_addr": v4("10.1.0.0"), "mask": 16}], "ranges": [{"begin": v4("10.2.0.1"), "end": v4("10.2.0.9")}]}}),
    );
    assert_eq!(
        (
            g["addrs"].as_array().unwrap().len(),
            g["prefixes"].as_array().unwrap().len(),
            g["ranges"].as_array().unwrap().len()
        ),
        (2, 1, 1)
    );
    let g = patch(
        &api,
        &path,
        json!({"add": {"addrs": [v4("10.0.0.2")], "prefixes": [{"ip_addr": v4("10.1.0.0"), "mask": 24}]}}),
    );
    assert_eq!(g["addrs"].as_array().unwrap().len(), 2, "same addr, no duplicate");
    assert_eq!(g["prefixes"].as_array().unwrap().len(), 2, "another mask is another prefix");
    let g = patch(
        &api,
        &path,
        json!({"delete": {"addrs": [v4("10.0.0.1")], "prefixes": [{"ip_addr": v4("10.1.0.0"), "mask": 16}],
        "ranges": [{"begin": v4("10.2.0.1"), "end": v4("10.2.0.9")}]}}),
    );
    assert_eq!(g["addrs"], json!([v4("10.0.0.2")]));
    assert_eq!(g["prefixes"][0]["mask"], 24);
    assert_eq!(g["ranges"], json!([]));

    // MicroServiceGroup: service_refs.
    let m1 = create(&api, "microservice", json!({"name": "ms1"}));
    let m2 = create(&api, "microservice", json!({"name": "ms2"}));
    let msg = create(&api, "microservicegroup", json!({"name": "msg", "service_refs": [m1["url"]]}));
    let path = path_of("microservicegroup", &msg);
    let g = patch(&api, &path, json!({"add": {"service_refs": [m2["uuid"], m1["uuid"]]}}));
    assert_eq!(g["service_refs"].as_array().unwrap().len(), 2);
    let g = patch(&api, &path, json!({"delete": {"service_refs": [m1["url"]]}}));
    assert!(g["service_refs"][0].as_str().unwrap().ends_with("#ms2"));

    // StringGroup: kv (keyed by key) and type.
    let sg = create(
        &api,
        "stringgroup",
        json!({"name": "sg", "type": "SG_TYPE_KEYVAL", "kv": [{"key": "a", "value": "1"}]}),
    );
    let path = path_of("stringgroup", &sg);
    let g = patch(&api, &path, json!({"add": {"kv": [{"key": "a", "value": "2"}, {"key": "b", "value": "3"}]}}));
    assert_eq!(g["kv"], json!([{"key": "a", "value": "2"}, {"key": "b", "value": "3"}]));
    let g = patch(&api, &path, json!({"delete": {"kv": [{"key": "a"}]}, }));
    assert_eq!(g["kv"], json!([{"key": "b", "value": "3"}]));
    let g = patch(&api, &path, json!({"replace": {"type": "SG_TYPE_STRING"}}));
    assert_eq!(g["type"], "SG_TYPE_STRING");

    // SystemConfiguration: dns_virtualservice_refs, global_tenant_config, snmp_configuration.community.
    let vs = create(&api, "virtualservice", json!({"name": "dns-vs"}));
    let s = patch(&api, "/api/systemconfiguration", json!({"add": {"dns_virtualservice_refs": [vs["url"]]}}));
    assert!(s["dns_virtualservice_refs"][0].as_str().unwrap().ends_with("#dns-vs"));
    let s = patch(
        &api,
        "/api/systemconfiguration",
        json!({"replace": {"global_tenant_config": {"tenant_vrf": true, "se_in_provider_context": false}}}),
    );
    assert_eq!(
        s["global_tenant_config"],
        json!({"tenant_vrf": true, "se_in_provider_context": false, "tenant_access_to_provider_se": true})
    );
    let s =
        patch(&api, "/api/systemconfiguration", json!({"replace": {"snmp_configuration": {"community": "public-ro"}}}));
    assert_eq!(s["snmp_configuration"]["community"], "public-ro");
    let s = patch(&api, "/api/systemconfiguration", json!({"delete": {"dns_virtualservice_refs": [vs["uuid"]]}}));
    assert_eq!(s["dns_virtualservice_refs"], json!([]));
    let r = api.send(
        "PATCH",
        "/api/systemconfiguration",
        Some(json!({"replace": {"global_tenant_config": {"tenant_vrf": {"x": 1}}}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 400);

    // VirtualService: http_policies keyed by index.
    let ps1 = create(&api, "httppolicyset", json!({"name": "ps1"}));
    let ps2 = create(&api, "httppolicyset", json!({"name": "ps2"}));
    let path = path_of("virtualservice", &vs);
    let v = patch(&api, &path, json!({"add": {"http_policies": [{"index": 11, "http_policy_set_ref": ps1["url"]}]}}));
    assert!(v["http_policies"][0]["http_policy_set_ref"].as_str().unwrap().ends_with("#ps1"));
    let v = patch(
        &api,
        &path,
        json!({"add": {"http_policies": [{"index": 11, "http_policy_set_ref": ps2["uuid"]}, {"index": 12, "http_policy_set_ref": ps1["uuid"]}]}}),
    );
    assert_eq!(v["http_policies"].as_array().unwrap().len(), 2);
    assert!(v["http_policies"][0]["http_policy_set_ref"].as_str().unwrap().ends_with("#ps2"));
    let v = patch(&api, &path, json!({"delete": {"http_policies": [{"index": 11}]}}));
    assert_eq!(v["http_policies"][0]["index"], 12);

    // Anything else goes through the same engine: a nested httppolicyset rule list keyed by index.
    let ps = patch(
        &api,
        &path_of("httppolicyset", &ps1),
        json!({"add": {"http_request_policy": {"rules": [{"index": 1, "name": "r1"}]}}}),
    );
    assert_eq!(ps["http_request_policy"]["rules"][0]["name"], "r1");
}

#[test]
fn method_token_is_case_sensitive() {
    let (_d, c) = setup();
    let api = c.admin();
    let path = path_of("pool", &create(&api, "pool", json!({"name": "case"})));
    for method in ["patch", "Patch", "pAtCh"] {
        let r = api.send(method, &path, Some(json!({"replace": {"description": "x"}}).to_string().as_bytes()));
        assert_eq!(r.status, 400, "{method}");
        assert!(r.error().contains("must be spelled 'PATCH'"), "{method}: {}", r.error());
    }
    assert!(api.object(&path).get("description").is_none());
}

#[test]
fn bad_patches_change_nothing() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "bad", "servers": [server("1.1.1.1")]}));
    let path = path_of("pool", &pool);
    let before = api.object(&path);
    let five_thousand_one: Vec<Value> =
        (0..5001).map(|i| server(&format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))).collect();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({}), 400, "holds no operation"),
        (json!({"add": {"description": "a"}, "replace": {"description": "b"}}), 400, "exactly one operation"),
        (json!({"upsert": {"description": "a"}}), 400, "unknown PATCH operation 'upsert'"),
        (json!({"add": "servers"}), 400, "must be an object of fields"),
        (json!({"add": {"no_such_field": 1}}), 400, "field 'no_such_field': unknown field"),
        (
            json!({"replace": {"default_server_port": "eighty"}}),
            400,
            "field 'default_server_port': expected an integer",
        ),
        (json!({"add": {"servers": five_thousand_one}}), 400, "at most 5000"),
        (
            json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 25}]}}),
            400,
            "out of range 1..20",
        ),
        (
            json!({"add": {"health_monitor_refs": ["healthmonitor-dangling"]}}),
            400,
            "healthmonitor 'healthmonitor-dangling' not found",
        ),
        (json!({"replace": {"fail_action": {"type": {"deep": 1}}}}), 400, "expected a string"),
        (
            json!({"json_patch": [{"op": "replace", "path": "/servers/9.9.9.9:80/ratio", "value": 2}]}),
            400,
            "no entry '9.9.9.9:80'",
        ),
        (
            json!({"json_patch": [{"op": "replace", "path": "/description", "value": "x"}, {"op": "test", "path": "/name", "value": "nope"}]}),
            409,
            "test failed",
        ),
    ];
    for (body, status, message) in cases {
        let r = api.send("PATCH", &path, Some(body.to_string().as_bytes()));
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(r.error().contains(message), "{body}: {:?} lacks {message:?}", r.error());
        assert_eq!(api.object(&path), before, "{body} changed the pool");
    }
    let r = api.send("PATCH", &path, Some(b"{\"add\": {\"servers\": [}"));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("line 1 column"));
    let r =
        api.send("PATCH", "/api/pool/pool-missing", Some(json!({"add": {"description": "x"}}).to_string().as_bytes()));
    assert_eq!(r.status, 404);
    // A name taken by another pool is a conflict.
    create(&api, "pool", json!({"name": "taken"}));
    let r = api.send("PATCH", &path, Some(json!({"replace": {"name": "taken"}}).to_string().as_bytes()));
    assert_eq!(r.status, 409);
    assert_eq!(api.object(&path), before);
}

#[test]
fn json_patch_forms_of_the_sdk_and_rfc_6902() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "jp", "servers": [server("1.1.1.1")]}));
    let uuid = pool["uuid"].as_str().unwrap();
    // The SDK sample's path, with a double slash.
    let p = patch(
        &api,
        &format!("/api//pool/{uuid}"),
        json!({"json_patch": [{"op": "add", "path": "/servers", "value": [server("1.1.1.2"), server("1.1.1.3")]}]}),
    );
    assert_eq!(server_addrs(&p), ["1.1.1.1:80", "1.1.1.2:80", "1.1.1.3:80"]);
    let p = patch(
        &api,
        &format!("/api//pool/{uuid}"),
        json!({"json_patch": [{"op": "remove", "path": "/servers/1.1.1.2:80"}]}),
    );
    assert_eq!(server_addrs(&p), ["1.1.1.1:80", "1.1.1.3:80"]);
    let p = patch(
        &api,
        &format!("/api//pool/{uuid}"),
        json!({"json_patch": [{"op": "replace", "path": "/servers/1.1.1.3:80", "value": {"ip": {"addr": "1.1.1.3", "type": "V4"}, "ratio": 5}, "server_key": "server-1"}]}),
    );
    assert_eq!(p["servers"][1]["ratio"], 5);
    let rfc = api.clone().header("Content-Type", "application/json-patch+json");
    let ops = json!([
        {"op": "test", "path": "/servers/0/ip/addr", "value": "1.1.1.1"},
        {"op": "replace", "path": "/servers/0/ratio", "value": 3},
        {"op": "add", "path": "/servers/-", "value": server("1.1.1.4")},
        {"op": "replace", "path": "/lb_algorithm", "value": "LB_ALGORITHM_ROUND_ROBIN"},
    ]);
    let r = rfc.send("PATCH", &format!("/api/pool/{uuid}"), Some(ops.to_string().as_bytes()));
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json();
    assert_eq!(p["servers"][0]["ratio"], 3);
    assert_eq!(server_addrs(&p), ["1.1.1.1:80", "1.1.1.3:80", "1.1.1.4:80"]);
    assert_eq!(p["lb_algorithm"], "LB_ALGORITHM_ROUND_ROBIN");
    // A duplicate appended in the same request as a removal before it is still a duplicate.
    let ops = json!([
        {"op": "add", "path": "/servers/-", "value": server("1.1.1.4")},
        {"op": "remove", "path": "/servers/0"},
    ]);
    let r = rfc.send("PATCH", &format!("/api/pool/{uuid}"), Some(ops.to_string().as_bytes()));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("duplicate"), "{}", r.body);
    assert_eq!(server_addrs(&api.object(&format!("/api/pool/{uuid}"))), ["1.1.1.1:80", "1.1.1.3:80", "1.1.1.4:80"]);
    let too_many: Vec<Value> = (0..10_001).map(|_| json!({"op": "test", "path": "/name", "value": "jp"})).collect();
    let r = rfc.send("PATCH", &format!("/api/pool/{uuid}"), Some(Value::Array(too_many).to_string().as_bytes()));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("at most 10000"));
}

#[test]
fn preconditions_and_concurrent_patches() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "busy"}));
    let path = path_of("pool", &pool);
    let stamp = pool["_last_modified"].as_str().unwrap().to_string();
    let r = api.clone().header("If-Match", &format!("\"{stamp}\"")).send(
        "PATCH",
        &path,
        Some(json!({"replace": {"description": "1"}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200);
    let r = api.clone().header("If-Match", &stamp).send(
        "PATCH",
        &path,
        Some(json!({"replace": {"description": "2"}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 412, "the stamp moved on");
    let r = api.send(
        "PATCH",
        &path,
        Some(json!({"replace": {"description": "3", "_last_modified": stamp}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 412);
    assert_eq!(api.object(&path)["description"], "1");
    // 16 clients each add 25 servers to the same pool: no update is lost.
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (api, path) = (api.clone(), path.clone());
            std::thread::spawn(move || {
                for i in 0..25 {
                    let r = api.send(
                        "PATCH",
                        &path,
                        Some(json!({"add": {"servers": [server(&format!("10.9.{t}.{i}"))]}}).to_string().as_bytes()),
                    );
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(api.object(&path)["servers"].as_array().unwrap().len(), 400);
}

#[test]
fn patched_objects_are_the_same_after_a_restart() {
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "replay"}));
    let path = path_of("pool", &pool);
    for i in 0..60 {
        patch(&api, &path, json!({"add": {"servers": [server(&format!("10.7.0.{i}"))]}}));
    }
    patch(&api, &path, json!({"delete": {"servers": [server("10.7.0.3"), server("10.7.0.30")]}}));
    patch(&api, &path, json!({"add": {"servers": [{"ip": {"addr": "10.7.0.4", "type": "V4"}, "ratio": 9}]}}));
    patch(&api, "/api/systemconfiguration", json!({"replace": {"snmp_configuration": {"community": "kept"}}}));
    // URLs carry the port, which changes with the restart.
    let portable =
        |c: &Controller, v: Value| serde_json::from_str::<Value>(&v.to_string().replace(&c.url, "")).unwrap();
    let before = portable(&c, api.object(&path));
    let sys = portable(&c, api.object("/api/systemconfiguration"));
    drop(c);
    let c = start(dir.path());
    let api = c.admin();
    assert!(portable(&c, api.object(&path)) == before, "the pool differs after the restart");
    assert!(portable(&c, api.object("/api/systemconfiguration")) == sys, "the system configuration differs");
}

/// 2,000 PATCHes from 16 clients, `kill -9` in the middle: every acknowledged PATCH is visible
/// after the restart, and none is half-applied (each adds two servers at once). Twice: the
/// second load writes into the journal the first start recovered.
#[test]
fn acknowledged_patches_survive_kill_9_whole() {
    const CLIENTS: usize = 16;
    const TOTAL: usize = 2000;
    let dir = temp_dir();
    let mut c = start(dir.path());
    let api = c.admin();
    let pools: Vec<String> =
        (0..4).map(|i| path_of("pool", &create(&api, "pool", json!({"name": format!("crash-{i}")})))).collect();
    let acked = Arc::new(Mutex::new(Vec::new()));
    for round in 0..2 {
        let api = c.admin();
        let next = Arc::new(AtomicUsize::new(round * TOTAL));
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (api, next, acked, pools) = (api.clone(), next.clone(), acked.clone(), pools.clone());
                std::thread::spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= (round + 1) * TOTAL {
                            return;
                        }
                        let body = json!({"add": {"servers": [server(&first_of(i)), server(&second_of(i))]}});
                        match api.try_send("PATCH", &pools[i % pools.len()], &body) {
                            Ok(r) if r.status == 200 => acked.lock().unwrap().push(i),
                            Ok(r) => panic!("unexpected {}: {}", r.status, r.body),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while acked.lock().unwrap().len() < round * TOTAL / 2 + TOTAL / 2 {
            assert!(std::time::Instant::now() < deadline, "round {round}: half the PATCHes not acknowledged in 120 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        c.kill9();
        workers.into_iter().for_each(|w| w.join().unwrap());
        c = start(dir.path());
        let api = c.admin();
        let acked = acked.lock().unwrap().clone();
        let mut present = HashSet::new();
        for path in &pools {
            for s in server_addrs(&api.object(path)) {
                present.insert(s);
            }
        }
        for i in 0..(round + 1) * TOTAL {
            let a = present.contains(&format!("{}:80", first_of(i)));
            let b = present.contains(&format!("{}:80", second_of(i)));
            assert_eq!(a, b, "PATCH {i} is half-applied");
            if acked.contains(&i) {
                assert!(a, "acknowledged PATCH {i} is lost (round {round})");
            }
        }
        println!(
            "round {round}: {} PATCHes acknowledged before kill -9, {} applied after restart",
            acked.len(),
            present.len() / 2
        );
    }
}

/// The two servers PATCH `i` of [`acknowledged_patches_survive_kill_9_whole`] adds.
fn first_of(i: usize) -> String {
    format!("10.{}.{}.1", i / 256, i % 256)
}

fn second_of(i: usize) -> String {
    format!("10.{}.{}.2", i / 256, i % 256)
}

/// `fulcrum_shared_renders_total{outcome=...}` as the controller counts it.
fn renders_counted(api: &Api, outcome: &str) -> u64 {
    let text = api.get("/metrics").body;
    let line = format!("fulcrum_shared_renders_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&line)).map_or(0, |n| n.trim().parse().unwrap())
}

#[test]
fn a_big_pool_rendered_from_its_last_rendering_reads_as_a_fresh_rendering_does() {
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    let servers: Vec<Value> = (0..300).map(|i| server(&format!("10.7.{}.{}", i / 256, i % 256))).collect();
    let pool = create(
        &api,
        "pool",
        json!({"name": "big", "servers": servers, "health_monitor_refs": ["/api/healthmonitor?name=System-HTTP"]}),
    );
    let path = path_of("pool", &pool);
    let mut expected = server_addrs(&pool);
    let rfc = api.clone().header("Content-Type", "application/json-patch+json");
    let (mut answer, mut read) = (String::new(), String::new());
    for i in 0..40usize {
        let r = match i % 4 {
            0 => api.send(
                "PATCH",
                &path,
                Some(json!({"add": {"servers": [server(&format!("10.8.0.{i}"))]}}).to_string().as_bytes()),
            ),
            1 => {
                let gone = expected.remove((i * 7) % expected.len());
                let addr = gone.split(':').next().unwrap();
                api.send("PATCH", &path, Some(json!({"delete": {"servers": [server(addr)]}}).to_string().as_bytes()))
            }
            2 => {
                let ops = json!([{"op": "replace", "path": format!("/servers/{}/ratio", i % 50), "value": 1 + i % 9}]);
                rfc.send("PATCH", &path, Some(ops.to_string().as_bytes()))
            }
            _ => api.send(
                "PATCH",
                &path,
                Some(json!({"replace": {"description": format!("step {i}")}}).to_string().as_bytes()),
            ),
        };
        assert_eq!(r.status, 200, "{}", r.body);
        if i % 4 == 0 {
            expected.push(format!("10.8.0.{i}:80"));
        }
        assert_eq!(server_addrs(&r.json()), expected, "step {i}");
        answer = r.body;
        read = api.get(&path).body;
        assert_eq!(api.get(&path).body, read, "a GET shares the rendering");
        assert_eq!(api.get(&format!("{path}?include_name")).body, answer, "the answer's view, shared");
        assert_eq!(server_addrs(&serde_json::from_str(&read).unwrap()), expected);
    }
    assert!(renders_counted(&api, "from_previous") >= 40, "answers and GETs were rendered from the ones before");
    // A restarted controller has kept no rendering: what it renders afresh is the same text
    // (but for its address).
    let old_url = c.url.clone();
    c.terminate();
    let c = start(dir.path());
    let api = c.admin();
    assert_eq!(api.get(&path).body, read.replace(&old_url, &c.url));
    assert_eq!(api.get(&format!("{path}?include_name")).body, answer.replace(&old_url, &c.url));
    assert_eq!(renders_counted(&api, "from_previous"), 0);
}
