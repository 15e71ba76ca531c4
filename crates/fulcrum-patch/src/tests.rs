use super::*;
use fulcrum_schema::normalize;
use proptest::prelude::*;
use serde_json::json;

fn reg() -> &'static Registry {
    Registry::get()
}

/// Resolves every uuid reference to itself and names to `<kind>-<name>`.
fn resolver() -> impl FnMut(&'static str, &str) -> Result<String, String> {
    |kind, r| match r.split_once("?name=") {
        Some((_, name)) => Ok(format!("/api/{kind}/{kind}-{name}")),
        None if r.contains("missing") => Err(format!("{kind} '{r}' not found")),
        None => Ok(r.to_string()),
    }
}

fn pool(servers: &[(&str, u16)]) -> Map<String, Value> {
    let servers: Vec<Value> =
        servers.iter().map(|(a, p)| json!({"ip": {"addr": a, "type": "V4"}, "port": p})).collect();
    normalize(reg(), reg().schema("Pool"), &json!({"name": "p", "servers": servers})).unwrap()
}

fn patch(object: &Map<String, Value>, body: Value) -> Result<Map<String, Value>, PatchError> {
    let schema = reg().schema("Pool");
    let p = parse(&body, false)?;
    let applied = apply(schema, object, &p, &mut resolver())?;
    Ok(normalize(reg(), schema, &Value::Object(applied.object))?)
}

fn addrs(p: &Map<String, Value>) -> Vec<String> {
    p["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}:{}", s["ip"]["addr"].as_str().unwrap(), s["port"]))
        .collect()
}

#[test]
fn the_documents_pool_examples() {
    let p = pool(&[]);
    let p = patch(&p, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}}, {"ip": {"addr": "1.1.1.2", "type": "V4"}}]}})).unwrap();
    assert_eq!(addrs(&p), ["1.1.1.1:80", "1.1.1.2:80"]);
    // Adding an existing server updates it instead of adding a duplicate.
    let p = patch(&p, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 10}]}})).unwrap();
    assert_eq!(addrs(&p), ["1.1.1.1:80", "1.1.1.2:80"]);
    assert_eq!(p["servers"][0]["ratio"], 10);
    assert_eq!(p["servers"][1]["ratio"], 1);
    let p = patch(&p, json!({"replace": {"servers": [{"ip": {"addr": "3.3.3.3", "type": "V4"}}, {"ip": {"addr": "3.3.3.4", "type": "V4"}}]}})).unwrap();
    assert_eq!(addrs(&p), ["3.3.3.3:80", "3.3.3.4:80"]);
    let p = patch(&p, json!({"delete": {"servers": [{"ip": {"addr": "3.3.3.3", "type": "V4"}}]}})).unwrap();
    assert_eq!(addrs(&p), ["3.3.3.4:80"]);
    let p = patch(&p, json!({"replace": {"request_queue_enabled": true, "default_server_port": 8080}})).unwrap();
    assert_eq!(p["request_queue_enabled"], true);
    assert_eq!(p["default_server_port"], 8080);
    let p = patch(&p, json!({"delete": {"default_server_port": 8080}})).unwrap();
    assert_eq!(p["default_server_port"], 80);
}

#[test]
fn server_keys_take_the_pools_default_port() {
    let mut p = pool(&[]);
    p.insert("default_server_port".into(), json!(8080));
    let p = patch(&p, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}}]}})).unwrap();
    assert_eq!(addrs(&p), ["1.1.1.1:8080"]);
    let same =
        patch(&p, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 8080, "ratio": 3}]}}))
            .unwrap();
    assert_eq!(addrs(&same), ["1.1.1.1:8080"]);
    assert_eq!(same["servers"][0]["ratio"], 3);
    let other_port =
        patch(&p, json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 81}]}})).unwrap();
    assert_eq!(addrs(&other_port), ["1.1.1.1:8080", "1.1.1.1:81"]);
    let gone = patch(&p, json!({"delete": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}}]}})).unwrap();
    assert!(gone["servers"].as_array().unwrap().is_empty());
    assert_eq!(
        patch(&gone, json!({"delete": {"servers": [{"ip": {"addr": "9.9.9.9", "type": "V4"}}]}})).unwrap(),
        gone,
        "deleting what is not there changes nothing"
    );
}

#[test]
fn lists_of_refs_add_without_duplicates_and_delete() {
    let p = pool(&[]);
    let p = patch(&p, json!({"add": {"health_monitor_refs": ["hm-1", "/api/healthmonitor?name=web"]}})).unwrap();
    assert_eq!(p["health_monitor_refs"], json!(["/api/healthmonitor/hm-1", "/api/healthmonitor/healthmonitor-web"]));
    let p = patch(&p, json!({"add": {"health_monitor_refs": ["https://h/api/healthmonitor/hm-1#x"]}})).unwrap();
    assert_eq!(p["health_monitor_refs"].as_array().unwrap().len(), 2);
    let p = patch(&p, json!({"delete": {"health_monitor_refs": ["hm-1"]}})).unwrap();
    assert_eq!(p["health_monitor_refs"], json!(["/api/healthmonitor/healthmonitor-web"]));
    let e = patch(&p, json!({"add": {"health_monitor_refs": ["hm-missing"]}})).unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
}

#[test]
fn nested_objects_one_level_deep() {
    let schema = reg().schema("SystemConfiguration");
    let sys =
        normalize(reg(), schema, &json!({"global_tenant_config": {}, "snmp_configuration": {"community": "old"}}))
            .unwrap();
    let run = |body: Value| -> Result<Map<String, Value>, PatchError> {
        let applied = apply(schema, &sys, &parse(&body, false)?, &mut resolver())?;
        Ok(normalize(reg(), schema, &Value::Object(applied.object))?)
    };
    let s = run(json!({"replace": {"global_tenant_config": {"tenant_vrf": true}}})).unwrap();
    assert_eq!(
        s["global_tenant_config"],
        json!({"tenant_vrf": true, "se_in_provider_context": true, "tenant_access_to_provider_se": true})
    );
    let s = run(json!({"replace": {"snmp_configuration": {"community": "new"}}})).unwrap();
    assert_eq!(s["snmp_configuration"]["community"], "new");
    assert_eq!(s["snmp_configuration"]["version"], "SNMP_VER2");
    let s = run(json!({"add": {"dns_virtualservice_refs": ["virtualservice-1"]}})).unwrap();
    assert_eq!(s["dns_virtualservice_refs"], json!(["/api/virtualservice/virtualservice-1"]));
    let e = run(json!({"replace": {"portal_configuration": {"sslkeyandcertificate_refs": {"x": 1}}}})).unwrap_err();
    assert!(e.to_string().contains("expected a list"), "{e}");
    let cloud_schema = reg().schema("Cloud");
    let cloud = normalize(
        reg(),
        cloud_schema,
        &json!({"name": "c", "vtype": "CLOUD_LINUXSERVER", "linuxserver_configuration": {}}),
    )
    .unwrap();
    let host = |a: &str| json!({"host_ip": {"addr": a, "type": "V4"}});
    let add =
        parse(&json!({"add": {"linuxserver_configuration": {"hosts": [host("10.0.0.1"), host("10.0.0.2")]}}}), false)
            .unwrap();
    let c = apply(cloud_schema, &cloud, &add, &mut resolver()).unwrap().object;
    assert_eq!(c["linuxserver_configuration"]["hosts"].as_array().unwrap().len(), 2);
    let del = parse(&json!({"delete": {"linuxserver_configuration": {"hosts": [host("10.0.0.1")]}}}), false).unwrap();
    let c = apply(cloud_schema, &c, &del, &mut resolver()).unwrap().object;
    assert_eq!(c["linuxserver_configuration"]["hosts"][0]["host_ip"]["addr"], "10.0.0.2");
    let deep = parse(&json!({"replace": {"linuxserver_configuration": {"hosts": [], "x": {"y": 1}}}}), false).unwrap();
    assert!(apply(cloud_schema, &cloud, &deep, &mut resolver()).unwrap_err().to_string().contains("unknown field"));
}

#[test]
fn deeper_than_one_level_is_refused() {
    let schema = reg().schema("Pool");
    let p = pool(&[]);
    // fail_action is a nested object; Pool has no object nested two deep, so use the engine's
    // own rule on a cloud's nested configuration holding an object list (hosts → host_ip).
    let body = parse(&json!({"replace": {"fail_action": {"type": "FAIL_ACTION_CLOSE_CONN"}}}), false).unwrap();
    assert!(apply(schema, &p, &body, &mut resolver()).is_ok());
    let sys_schema = reg().schema("SystemConfiguration");
    let sys = normalize(reg(), sys_schema, &json!({})).unwrap();
    let body =
        parse(&json!({"replace": {"dns_configuration": {"server_list": [{"addr": "1.1.1.1", "type": "V4"}]}}}), false)
            .unwrap();
    assert!(apply(sys_schema, &sys, &body, &mut resolver()).is_ok(), "a list inside a nested object is one level deep");
    let ntp = parse(
        &json!({"replace": {"ntp_configuration": {"ntp_servers": [{"server": {"addr": "1.1.1.1", "type": "V4"}}]}}}),
        false,
    )
    .unwrap();
    assert!(apply(sys_schema, &sys, &ntp, &mut resolver()).is_ok());
    let hm_schema = reg().schema("HealthMonitor");
    let hm = normalize(reg(), hm_schema, &json!({"name": "h", "type": "HEALTH_MONITOR_HTTP"})).unwrap();
    let ok = parse(&json!({"replace": {"http_monitor": {"http_request": "HEAD / HTTP/1.0"}}}), false).unwrap();
    assert!(apply(hm_schema, &hm, &ok, &mut resolver()).is_ok());
    let user_schema = reg().schema("Tenant");
    let t = normalize(reg(), user_schema, &json!({"name": "t"})).unwrap();
    let nested_twice =
        parse(&json!({"replace": {"config_settings": {"tenant_vrf": {"deeper": true}}}}), false).unwrap();
    assert!(
        apply(user_schema, &t, &nested_twice, &mut resolver()).unwrap_err().to_string().contains("expected a boolean")
    );
    let vs_schema = reg().schema("PortalConfiguration");
    let _ = vs_schema;
    let sslkc = reg().schema("SSLKeyAndCertificate");
    let kc = normalize(reg(), sslkc, &json!({"name": "k", "certificate": {"subject": {"common_name": "a"}}})).unwrap();
    let deep = parse(&json!({"replace": {"certificate": {"subject": {"common_name": "b"}}}}), false).unwrap();
    let e = apply(sslkc, &kc, &deep, &mut resolver()).unwrap_err();
    assert_eq!(e, PatchError::Invalid("field 'certificate.subject': PATCH edits nested fields to depth 1 only".into()));
}

#[test]
fn keyless_lists_are_replace_only() {
    let schema = reg().schema("GslbService");
    let g = normalize(
        reg(),
        schema,
        &json!({"name": "g", "groups": [{"name": "a", "algorithm": "GSLB_ALGORITHM_ROUND_ROBIN", "members": []}]}),
    )
    .unwrap();
    let body = parse(&json!({"add": {"groups": [{"name": "a", "members": [{"fqdn": "x"}]}]}}), false).unwrap();
    let ok = apply(schema, &g, &body, &mut resolver()).unwrap().object;
    assert_eq!(ok["groups"][0]["members"][0]["fqdn"], "x", "groups are keyed by name");
    let vsvip = reg().schema("VsVip");
    let v = normalize(reg(), vsvip, &json!({"name": "v", "dns_info": [{"fqdn": "a"}]})).unwrap();
    let e = apply(vsvip, &v, &parse(&json!({"add": {"dns_info": [{"fqdn": "b"}]}}), false).unwrap(), &mut resolver())
        .unwrap_err();
    assert!(e.to_string().contains("field 'dns_info'") && e.to_string().contains("only replace"), "{e}");
}

#[test]
fn malformed_bodies_are_refused() {
    for (body, message) in [
        (json!({}), "holds no operation"),
        (json!({"add": {}, "delete": {}}), "exactly one operation"),
        (json!({"merge": {}}), "unknown PATCH operation 'merge'"),
        (json!({"add": [1]}), "must be an object of fields"),
        (json!({"json_patch": {}}), "must be a list of operations"),
        (json!({"json_patch": [{"op": "move", "path": "/a"}]}), "unsupported op 'move'"),
        (json!({"json_patch": [{"op": "add", "path": "/a"}]}), "needs a 'value'"),
        (json!({"json_patch": [{"op": "add", "path": "a", "value": 1}]}), "must start with '/'"),
        (json!(5), "must be a JSON object"),
    ] {
        let e = parse(&body, false).unwrap_err();
        assert!(e.to_string().contains(message), "{body}: {e}");
    }
    let too_many: Vec<Value> =
        (0..=MAX_JSON_PATCH_OPS).map(|_| json!({"op": "test", "path": "/name", "value": "p"})).collect();
    assert!(parse(&Value::Array(too_many), true).unwrap_err().to_string().contains("at most 10000"));
    let p = pool(&[]);
    for (body, message) in [
        (json!({"add": {"bogus": 1}}), "field 'bogus': unknown field"),
        (json!({"replace": {"default_server_port": "x"}}), "expected an integer"),
        (
            json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "bogus": 1}]}}),
            "servers[0].bogus': unknown field",
        ),
        (json!({"add": {"servers": {"ip": 1}}}), "expected a list"),
    ] {
        let e = patch(&p, body.clone()).unwrap_err();
        assert!(e.to_string().contains(message), "{body}: {e}");
    }
}

#[test]
fn json_patch_by_key_and_index() {
    let p = pool(&[("1.1.1.1", 80), ("1.1.1.2", 80)]);
    let schema = reg().schema("Pool");
    let run = |p: &Map<String, Value>, ops: Value| -> Result<Map<String, Value>, PatchError> {
        let applied = apply(schema, p, &parse(&json!({"json_patch": ops}), false)?, &mut resolver())?;
        Ok(normalize(reg(), schema, &Value::Object(applied.object))?)
    };
    let q = run(&p, json!([{"op": "add", "path": "/servers", "value": [{"ip": {"addr": "1.1.1.3", "type": "V4"}}]}]))
        .unwrap();
    assert_eq!(addrs(&q), ["1.1.1.1:80", "1.1.1.2:80", "1.1.1.3:80"]);
    let q = run(&q, json!([{"op": "remove", "path": "/servers/1.1.1.2:80"}])).unwrap();
    assert_eq!(addrs(&q), ["1.1.1.1:80", "1.1.1.3:80"]);
    let q = run(&q, json!([{"op": "replace", "path": "/servers/1.1.1.1:80/ratio", "value": 7}, {"op": "remove", "path": "/servers/1"}])).unwrap();
    assert_eq!(addrs(&q), ["1.1.1.1:80"]);
    assert_eq!(q["servers"][0]["ratio"], 7);
    let q = run(&q, json!([{"op": "replace", "path": "/servers/0", "value": {"ip": {"addr": "2.2.2.2", "type": "V4"}}, "server_key": "ignored"}])).unwrap();
    assert_eq!(addrs(&q), ["2.2.2.2:80"]);
    let q = run(&q, json!([{"op": "replace", "path": "/lb_algorithm", "value": "LB_ALGORITHM_ROUND_ROBIN"}, {"op": "test", "path": "/name", "value": "p"}])).unwrap();
    assert_eq!(q["lb_algorithm"], "LB_ALGORITHM_ROUND_ROBIN");
    let e = run(&q, json!([{"op": "replace", "path": "/lb_algorithm", "value": "LB_ALGORITHM_RANDOM"}, {"op": "test", "path": "/name", "value": "other"}])).unwrap_err();
    assert!(matches!(e, PatchError::TestFailed(_)), "{e:?}");
    assert!(
        run(&q, json!([{"op": "remove", "path": "/servers/9.9.9.9:80"}])).unwrap_err().to_string().contains("no entry")
    );
    assert!(
        run(&q, json!([{"op": "add", "path": "/bogus", "value": 1}]))
            .unwrap_err()
            .to_string()
            .contains("unknown field")
    );
    assert!(
        run(&q, json!([{"op": "replace", "path": "/servers/0/ratio", "value": 25}]))
            .unwrap_err()
            .to_string()
            .contains("out of range")
    );
}

#[test]
fn edit_log_replays_to_the_same_object() {
    let before = pool(&[("1.1.1.1", 80), ("1.1.1.2", 80), ("1.1.1.3", 80)]);
    let schema = reg().schema("Pool");
    for body in [
        json!({"add": {"servers": [{"ip": {"addr": "1.1.1.9", "type": "V4"}}, {"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 4}]}}),
        json!({"delete": {"servers": [{"ip": {"addr": "1.1.1.3", "type": "V4"}}, {"ip": {"addr": "1.1.1.1", "type": "V4"}}]}}),
        json!({"replace": {"servers": [], "description": "x"}}),
        json!({"delete": {"description": "x"}}),
        json!({"json_patch": [{"op": "add", "path": "/servers/-", "value": {"ip": {"addr": "5.5.5.5", "type": "V4"}}}, {"op": "remove", "path": "/servers/0"}]}),
    ] {
        let applied = apply(schema, &before, &parse(&body, false).unwrap(), &mut resolver()).unwrap();
        let after = normalize(reg(), schema, &Value::Object(applied.object)).unwrap();
        let log = edit_log(&applied.touched, &|f| !before.contains_key(f), &after);
        let mut replayed = Value::Object(before.clone());
        fulcrum_jsonpatch::apply_all(&mut replayed, &log).unwrap();
        assert_eq!(replayed, Value::Object(after.clone()), "{body}");
        if body.get("add").is_some() {
            assert_eq!(log.len(), 2, "one op per changed server, not the whole list: {log:?}");
        }
    }
}

fn server_strategy() -> impl Strategy<Value = Value> + Clone {
    (0u8..6, prop_oneof![Just(None), (80u16..83).prop_map(Some)], 1u8..21).prop_map(|(host, port, ratio)| {
        let mut s = json!({"ip": {"addr": format!("10.0.0.{host}"), "type": "V4"}, "ratio": ratio});
        if let Some(port) = port {
            s["port"] = json!(port);
        }
        s
    })
}

fn op_strategy() -> impl Strategy<Value = Value> {
    let servers = || proptest::collection::vec(server_strategy(), 0..4);
    prop_oneof![
        servers().prop_map(|s| json!({"add": {"servers": s}})),
        servers().prop_map(|s| json!({"delete": {"servers": s}})),
        servers().prop_map(|s| json!({"replace": {"servers": s}})),
        (1u16..100).prop_map(|p| json!({"replace": {"default_server_port": p}})),
        Just(json!({"delete": {"default_server_port": 1}})),
        Just(json!({"add": {"health_monitor_refs": ["hm-1"]}})),
        Just(json!({"delete": {"health_monitor_refs": ["hm-1"]}})),
        Just(json!({"replace": {"lb_algorithm": "LB_ALGORITHM_ROUND_ROBIN"}})),
        Just(json!({"delete": {"lb_algorithm": "x"}})),
    ]
}

fn unique_servers() -> impl Strategy<Value = Vec<Value>> {
    proptest::collection::vec(server_strategy(), 0..5).prop_map(|list| {
        let mut seen = std::collections::HashSet::new();
        list.into_iter()
            .filter(|s| {
                seen.insert(format!("{}:{}", s["ip"]["addr"], s.get("port").and_then(Value::as_u64).unwrap_or(80)))
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn add_then_delete_restores_the_original(existing in unique_servers(), new_hosts in proptest::collection::btree_set(100u8..120, 0..4)) {
        let p = normalize(reg(), reg().schema("Pool"), &json!({"name": "p", "servers": existing})).unwrap();
        let new: Vec<Value> = new_hosts.iter().map(|h| json!({"ip": {"addr": format!("10.0.0.{h}"), "type": "V4"}})).collect();
        let added = patch(&p, json!({"add": {"servers": new.clone()}})).unwrap();
        prop_assert_eq!(added["servers"].as_array().unwrap().len(), p["servers"].as_array().unwrap().len() + new.len());
        let back = patch(&added, json!({"delete": {"servers": new}})).unwrap();
        prop_assert_eq!(back, p);
    }

    #[test]
    fn add_is_idempotent(existing in unique_servers(), given in proptest::collection::vec(server_strategy(), 0..4)) {
        let p = normalize(reg(), reg().schema("Pool"), &json!({"name": "p", "servers": existing})).unwrap();
        let body = json!({"add": {"servers": given}});
        let once = patch(&p, body.clone()).unwrap();
        prop_assert_eq!(patch(&once, body).unwrap(), once);
    }

    #[test]
    fn replace_gives_exactly_the_replacement(existing in unique_servers(), replacement in unique_servers()) {
        let p = normalize(reg(), reg().schema("Pool"), &json!({"name": "p", "servers": existing})).unwrap();
        let replaced = patch(&p, json!({"replace": {"servers": replacement.clone()}})).unwrap();
        let expected = normalize(reg(), reg().schema("Pool"), &json!({"name": "p", "servers": replacement})).unwrap();
        prop_assert_eq!(&replaced["servers"], &expected["servers"]);
    }

    #[test]
    fn delete_of_a_scalar_yields_its_default(port in 1u16..65535, algo in 0usize..3) {
        let algos = ["LB_ALGORITHM_ROUND_ROBIN", "LB_ALGORITHM_RANDOM", "LB_ALGORITHM_FEWEST_SERVERS"];
        let p = patch(&pool(&[]), json!({"replace": {"default_server_port": port, "lb_algorithm": algos[algo]}})).unwrap();
        let reset = patch(&p, json!({"delete": {"default_server_port": null, "lb_algorithm": null}})).unwrap();
        prop_assert_eq!(&reset["default_server_port"], &json!(80));
        prop_assert_eq!(&reset["lb_algorithm"], &json!("LB_ALGORITHM_LEAST_CONNECTIONS"));
    }

    #[test]
    fn a_refused_patch_in_place_leaves_the_object_exactly_as_it_was(ops in proptest::collection::vec(op_strategy(), 1..12)) {
        let schema = reg().schema("Pool");
        let mut object = pool(&[("10.0.0.1", 80), ("10.0.0.2", 81)]);
        for op in ops {
            let before = object.clone();
            let Ok(p) = parse(&op, false) else { continue };
            match apply_in_place(schema, &mut object, &p, &mut resolver()) {
                Err(_) => prop_assert_eq!(&object, &before),
                Ok(done) => {
                    if validate(schema, &mut object, &done.touched).is_err() {
                        rollback(&mut object, done.undo);
                        prop_assert_eq!(&object, &before);
                    } else {
                        // Taking back a valid patch restores it too.
                        let mut copy = object.clone();
                        rollback(&mut copy, done.undo);
                        prop_assert_eq!(copy, before);
                    }
                }
            }
        }
    }

    #[test]
    fn incremental_validation_agrees_with_whole_validation(ops in proptest::collection::vec(op_strategy(), 1..12)) {
        let schema = reg().schema("Pool");
        let mut current = pool(&[("10.0.0.1", 80), ("10.0.0.2", 81)]);
        for op in ops {
            let Ok(p) = parse(&op, false) else { continue };
            let Ok(applied) = apply(schema, &current, &p, &mut resolver()) else { continue };
            let whole = normalize(reg(), schema, &Value::Object(applied.object.clone()));
            let mut incremental = applied.object.clone();
            let checked = validate(schema, &mut incremental, &applied.touched);
            match (whole, checked) {
                (Ok(whole), Ok(())) => {
                    prop_assert_eq!(&whole, &incremental);
                    current = whole;
                }
                (Err(_), Err(_)) => {}
                (w, c) => prop_assert!(false, "whole {:?} but incremental {:?} for {}", w.map(|_| ()), c, op),
            }
        }
    }

    #[test]
    fn random_sequences_never_yield_an_invalid_object(ops in proptest::collection::vec(op_strategy(), 1..12)) {
        let schema = reg().schema("Pool");
        let mut current = pool(&[("10.0.0.1", 80)]);
        for op in ops {
            let before = current.clone();
            match patch(&current, op) {
                Ok(next) => {
                    // What is accepted is valid as a whole, and its edit log replays to it.
                    prop_assert_eq!(normalize(reg(), schema, &Value::Object(next.clone())).unwrap(), next.clone());
                    current = next;
                }
                Err(_) => prop_assert_eq!(&current, &before),
            }
        }
    }
}

/// One step of a random PATCH sequence on a pool.
#[derive(Debug, Clone)]
enum Step {
    /// Classic add or delete of servers (host, optional port).
    Servers(bool, Vec<(u8, Option<u16>)>),
    /// A new default_server_port (keys of servers without a port fall back on it).
    DefaultPort(u16),
    /// A json_patch removal by position, or an append.
    JsonRemove(usize),
    JsonAppend(u8),
    /// A scalar that has nothing to do with the list.
    Description(u8),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let server = (0u8..12, proptest::option::of(prop_oneof![Just(80u16), Just(8080u16)]));
    prop_oneof![
        4 => (any::<bool>(), proptest::collection::vec(server, 1..4)).prop_map(|(add, s)| Step::Servers(add, s)),
        1 => prop_oneof![Just(80u16), Just(8080u16)].prop_map(Step::DefaultPort),
        1 => (0usize..8).prop_map(Step::JsonRemove),
        1 => (0u8..12).prop_map(Step::JsonAppend),
        1 => any::<u8>().prop_map(Step::Description),
    ]
}

fn step_body(step: &Step) -> (Value, bool) {
    let server = |h: u8, port: Option<u16>| {
        let mut s = json!({"ip": {"addr": format!("10.1.0.{h}"), "type": "V4"}});
        if let Some(p) = port {
            s["port"] = json!(p);
        }
        s
    };
    match step {
        Step::Servers(add, servers) => {
            let list: Vec<Value> = servers.iter().map(|(h, p)| server(*h, *p)).collect();
            (json!({if *add { "add" } else { "delete" }: {"servers": list}}), false)
        }
        Step::DefaultPort(p) => (json!({"replace": {"default_server_port": p}}), false),
        Step::JsonRemove(i) => (json!([{"op": "remove", "path": format!("/servers/{i}")}]), true),
        Step::JsonAppend(h) => (json!([{"op": "add", "path": "/servers/-", "value": server(*h, Some(80))}]), true),
        Step::Description(d) => (json!({"replace": {"description": format!("d{d}")}}), false),
    }
}

/// A PATCH as the controller applies it (in place, validated, rolled back when refused), with
/// or without kept indexes.
fn apply_step(
    object: &mut Map<String, Value>,
    step: &Step,
    indexes: Option<&mut ListIndexes>,
) -> Result<(), PatchError> {
    let schema = reg().schema("Pool");
    let (body, json_patch) = step_body(step);
    let p = parse(&body, json_patch)?;
    let mut fresh = ListIndexes::default();
    let indexes = indexes.unwrap_or(&mut fresh);
    let done = apply_in_place_indexed(schema, object, &p, &mut resolver(), indexes)?;
    if let Err(e) = validate_indexed(schema, object, &done.touched, indexes) {
        rollback(object, done.undo);
        *indexes = ListIndexes::default();
        return Err(e);
    }
    Ok(())
}

proptest! {
    #[test]
    fn kept_list_indexes_agree_with_a_scan_after_any_sequence_of_patches(
        seed in proptest::collection::btree_set(0u8..12, 0..6),
        steps in proptest::collection::vec(step_strategy(), 1..40),
    ) {
        let servers: Vec<(String, u16)> = seed.iter().map(|h| (format!("10.1.0.{h}"), 80)).collect();
        let start = pool(&servers.iter().map(|(a, p)| (a.as_str(), *p)).collect::<Vec<_>>());
        let (mut indexed, mut scanned) = (start.clone(), start);
        let mut indexes = ListIndexes::default();
        for step in &steps {
            let a = apply_step(&mut indexed, step, Some(&mut indexes));
            let b = apply_step(&mut scanned, step, None);
            prop_assert_eq!(&a, &b, "{:?}", step);
            prop_assert_eq!(&indexed, &scanned, "{:?}", step);
            // What the index holds is what a scan finds: every entry at its position.
            let schema = reg().schema("Pool");
            let Some(fulcrum_schema::Field { kind: Kind::List(spec), .. }) = schema.field("servers") else { unreachable!() };
            let fallbacks = key_fallbacks(spec, schema, &indexed);
            let items = indexed["servers"].as_array().cloned().unwrap_or_default();
            if indexes.lists().any(|l| l == "servers") {
                for (i, entry) in items.iter().enumerate() {
                    let key = entry_key_with(&spec.key, entry, &|p| key_part(entry, p, &fallbacks).cloned()).unwrap();
                    prop_assert_eq!(indexes.position("servers", &key), Some(Some(i)), "{:?}", step);
                }
                let fresh = ListIndexes::build(&items, &|e| {
                    entry_key_with(&spec.key, e, &|p| key_part(e, p, &fallbacks).cloned()).unwrap()
                });
                prop_assert_eq!(fresh.as_ref(), indexes.lists.get("servers"), "{:?}", step);
            }
            // And the object stays valid as a whole.
            prop_assert!(normalize(reg(), schema, &Value::Object(indexed.clone())).is_ok());
        }
    }
}

/// A list change for `entries_now`'s property: append, update entry `i % len`, remove entry
/// `i % len`.
#[derive(Debug, Clone)]
enum ListStep {
    Append,
    Update(usize),
    Remove(usize),
}

fn list_step() -> impl Strategy<Value = ListStep> {
    prop_oneof![
        Just(ListStep::Append),
        any::<usize>().prop_map(ListStep::Update),
        any::<usize>().prop_map(ListStep::Remove)
    ]
}

proptest! {
    /// Replaying touches as a patch records them finds exactly the entries still present that
    /// were appended or updated, at their final positions.
    #[test]
    fn entries_now_follows_removals(initial in 0usize..6, steps in proptest::collection::vec(list_step(), 0..24)) {
        // Each entry is (id, touched).
        let mut list: Vec<(usize, bool)> = (0..initial).map(|id| (id, false)).collect();
        let mut touched = Vec::new();
        let mut next_id = initial;
        for step in steps {
            match step {
                ListStep::Append => {
                    list.push((next_id, true));
                    next_id += 1;
                    touched.push(Touch::Append("servers".into(), list.len() - 1));
                }
                ListStep::Update(i) if !list.is_empty() => {
                    let i = i % list.len();
                    list[i].1 = true;
                    touched.push(Touch::Entry("servers".into(), i));
                }
                ListStep::Remove(i) if !list.is_empty() => {
                    let i = i % list.len();
                    list.remove(i);
                    touched.push(Touch::Remove("servers".into(), i));
                }
                _ => {}
            }
            // Touches of another list never count.
            touched.push(Touch::Entry("other".into(), 0));
        }
        let expected: Vec<usize> = list.iter().enumerate().filter(|(_, (_, t))| *t).map(|(i, _)| i).collect();
        prop_assert_eq!(entries_now(&touched, "servers"), expected);
    }
}

/// A PATCH step as the controller applies it, with its edit log (what the store keeps).
fn apply_step_logged(object: &mut Map<String, Value>, step: &Step, indexes: &mut ListIndexes) -> Option<Vec<Value>> {
    let schema = reg().schema("Pool");
    let (body, json_patch) = step_body(step);
    let p = parse(&body, json_patch).ok()?;
    let done = apply_in_place_indexed(schema, object, &p, &mut resolver(), indexes).ok()?;
    if validate_indexed(schema, object, &done.touched, indexes).is_err() {
        rollback(object, done.undo);
        *indexes = ListIndexes::default();
        return None;
    }
    Some(edit_log(&done.touched, &|f| done.was_absent(f), object))
}

proptest! {
    /// Rendering a pool from the rendering of the version before, copying the entries an edit
    /// log left alone, gives exactly the text of a fresh rendering, after any sequence of
    /// batches of PATCHes.
    #[test]
    fn a_rendering_made_from_the_last_equals_a_fresh_one(
        seed in proptest::collection::btree_set(0u8..12, 0..6),
        batches in proptest::collection::vec(proptest::collection::vec(step_strategy(), 1..4), 1..12),
        include_name in any::<bool>(),
    ) {
        use fulcrum_schema::{Previous, RenderOptions, render_json, render_json_from};
        // Enough servers that the list's entries are recorded (short lists are rendered whole).
        let servers: Vec<(String, u16)> = seed
            .iter()
            .map(|h| (format!("10.1.0.{h}"), 80))
            .chain((0..20).map(|h| (format!("10.2.0.{h}"), 80)))
            .collect();
        let mut object = pool(&servers.iter().map(|(a, p)| (a.as_str(), *p)).collect::<Vec<_>>());
        object.insert("uuid".into(), json!("pool-1"));
        let mut any_copied = false;
        object.insert("health_monitor_refs".into(), json!(["/api/healthmonitor/hm-1", "/api/healthmonitor/hm-2"]));
        let t = reg().type_def("pool").unwrap();
        let opts = RenderOptions { base_url: "https://h:1", include_name, ..Default::default() };
        let names = |r: &str| Some(format!("name of {r}"));
        let (mut json, mut extents) = render_json_from(reg(), t, &object, &opts, &names, None);
        let mut indexes = ListIndexes::default();
        for (n, batch) in batches.iter().enumerate() {
            let mut log = Vec::new();
            for step in batch {
                log.extend(apply_step_logged(&mut object, step, &mut indexes).unwrap_or_default());
            }
            log.push(json!({"op": "add", "path": "/_last_modified", "value": n.to_string()}));
            object.insert("_last_modified".into(), json!(n.to_string()));
            let origins: Vec<(String, Vec<Option<usize>>)> = extents
                .lists()
                .filter_map(|(list, len)| Some((list.to_string(), fulcrum_jsonpatch::list_origins(&log, list, len)?)))
                .collect();
            let previous = Previous { json: &json, extents: &extents, origins: &origins };
            let (next, next_extents) = render_json_from(reg(), t, &object, &opts, &names, Some(previous));
            let fresh = render_json(reg(), t, &object, &opts, &names);
            prop_assert_eq!(String::from_utf8_lossy(&next), String::from_utf8_lossy(&fresh), "batch {:?}", batch);
            // The untouched entries really are copied: from a tampered rendering they show.
            let copied = origins.iter().any(|(_, o)| o.iter().any(Option::is_some));
            let tampered = json.to_ascii_uppercase();
            let previous = Previous { json: &tampered, extents: &extents, origins: &origins };
            let (from_tampered, _) = render_json_from(reg(), t, &object, &opts, &names, Some(previous));
            prop_assert_eq!(from_tampered != fresh, copied);
            any_copied |= copied;
            (json, extents) = (next, next_extents);
        }
        prop_assert!(any_copied, "no batch left an entry to copy");
    }
}
