//! The configuration API through HTTP: conventions, filters, and every bad input (each checked
//! for its status, its message, and that it changed nothing).

mod common;

use common::{Api, Controller, start, temp_dir};
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

fn pool_count(api: &Api) -> u64 {
    api.object("/api/pool?page_size=1")["count"].as_u64().unwrap()
}

fn create(api: &Api, kind: &str, body: Value) -> Value {
    let r = api.post(&format!("/api/{kind}"), &body);
    assert_eq!(r.status, 201, "POST {kind}: {}", r.body);
    r.json()
}

fn uuid(v: &Value) -> String {
    v["uuid"].as_str().unwrap().to_string()
}

fn setup() -> (tempfile::TempDir, Controller) {
    let dir = temp_dir();
    let c = start(dir.path());
    (dir, c)
}

#[test]
fn create_fills_defaults_and_identity() {
    let (_d, c) = setup();
    let api = c.admin();
    let r = api.post("/api/pool", &json!({"name": "p", "servers": [{"ip": {"addr": "10.0.0.1", "type": "V4"}}]}));
    assert_eq!(r.status, 201);
    let p = r.json();
    let id = uuid(&p);
    assert!(id.starts_with("pool-") && id.len() == "pool-".len() + 36, "{id}");
    assert_eq!(p["url"], format!("{}/api/pool/{id}#p", c.url));
    assert_eq!(r.header("Location").unwrap(), format!("{}/api/pool/{id}#p", c.url));
    assert_eq!(p["tenant_ref"], format!("{}/api/tenant/admin#admin", c.url));
    assert!(p["cloud_ref"].as_str().unwrap().ends_with("#Default-Cloud"));
    assert_eq!(p["default_server_port"], 80);
    assert_eq!(p["lb_algorithm"], "LB_ALGORITHM_LEAST_CONNECTIONS");
    assert_eq!(p["servers"][0]["port"], 80);
    assert_eq!(p["servers"][0]["ratio"], 1);
    assert_eq!(p["servers"][0]["enabled"], true);
    assert!(p["_last_modified"].as_str().unwrap().parse::<u64>().unwrap() > 1_600_000_000_000_000);
    // GET shows references without names unless asked.
    let got = api.object(&format!("/api/pool/{id}"));
    assert_eq!(got["url"], format!("{}/api/pool/{id}", c.url));
    assert!(!got["cloud_ref"].as_str().unwrap().contains('#'));
    assert!(api.object(&format!("/api/pool/{id}?include_name"))["cloud_ref"].as_str().unwrap().contains('#'));
    // The url follows the Host header the client used.
    let other = c.admin().header("Host", "avi-controller").get(&format!("/api/pool/{id}"));
    assert_eq!(other.json()["url"], format!("http://avi-controller/api/pool/{id}"));
    // Double and trailing slashes, as the SDK and Ansible send them.
    assert_eq!(api.get(&format!("/api//pool/{id}")).status, 200);
    assert_eq!(api.get("/api/pool/").status, 200);
    assert_eq!(api.get("/api//systemconfiguration/").status, 200);
}

#[test]
fn references_accept_every_client_form() {
    let (_d, c) = setup();
    let api = c.admin();
    let hm = api.object("/api/healthmonitor?name=System-HTTP")["results"][0].clone();
    let hm_uuid = uuid(&hm);
    for (i, reference) in [
        hm["url"].as_str().unwrap().to_string(),
        format!("{}#System-HTTP", hm["url"].as_str().unwrap()),
        format!("/api/healthmonitor/{hm_uuid}"),
        hm_uuid.clone(),
        "/api/healthmonitor?name=System-HTTP".to_string(),
        "/api/healthmonitor/?name=System-HTTP".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let p = create(&api, "pool", json!({"name": format!("ref-{i}"), "health_monitor_refs": [reference]}));
        assert_eq!(
            p["health_monitor_refs"][0],
            format!("{}/api/healthmonitor/{hm_uuid}#System-HTTP", c.url),
            "{reference}"
        );
    }
}

#[test]
fn bad_inputs_are_refused_and_change_nothing() {
    let (_d, c) = setup();
    let api = c.admin();
    let existing = create(&api, "pool", json!({"name": "existing"}));
    let before = pool_count(&api);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", b"{\"name\": \"x\",}".to_vec(), 400, "invalid JSON: trailing comma at line 1 column"),
        ("not an object", b"[1, 2]".to_vec(), 400, "must be a JSON object"),
        ("wrong type", br#"{"name": "x", "enabled": 7}"#.to_vec(), 400, "field 'enabled': expected a boolean"),
        (
            "unknown enum",
            br#"{"name": "x", "lb_algorithm": "LB_FASTEST"}"#.to_vec(),
            400,
            "field 'lb_algorithm': unknown value 'LB_FASTEST'",
        ),
        (
            "out of range",
            br#"{"name": "x", "default_server_port": 70000}"#.to_vec(),
            400,
            "field 'default_server_port': value 70000 is out of range 1..65535",
        ),
        (
            "nested out of range",
            br#"{"name": "x", "servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 25}]}"#.to_vec(),
            400,
            "field 'servers[0].ratio'",
        ),
        ("missing required", br#"{"description": "no name"}"#.to_vec(), 400, "field 'name': is required"),
        (
            "missing nested required",
            br#"{"name": "x", "servers": [{"port": 80}]}"#.to_vec(),
            400,
            "field 'servers[0].ip': is required",
        ),
        ("duplicate name", br#"{"name": "existing"}"#.to_vec(), 409, "pool with name 'existing' already exists"),
        (
            "missing ref",
            br#"{"name": "x", "health_monitor_refs": ["healthmonitor-nope"]}"#.to_vec(),
            400,
            "healthmonitor 'healthmonitor-nope' not found",
        ),
        (
            "missing ref by name",
            br#"{"name": "x", "cloud_ref": "/api/cloud?name=Nowhere"}"#.to_vec(),
            400,
            "field 'cloud_ref': cloud 'Nowhere' not found",
        ),
        (
            "ref of the wrong type",
            br#"{"name": "x", "cloud_ref": "/api/pool/pool-1"}"#.to_vec(),
            400,
            "expected a cloud",
        ),
    ];
    for (what, body, status, message) in cases {
        let r = api.send("POST", "/api/pool", Some(&body));
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(r.error().contains(message), "{what}: {:?} lacks {message:?}", r.error());
        assert_eq!(pool_count(&api), before, "{what} changed something");
    }
    assert_eq!(api.object(&format!("/api/pool/{}", uuid(&existing)))["_last_modified"], existing["_last_modified"]);
    // Unknown fields are ignored, as the real controller does.
    let p = create(&api, "pool", json!({"name": "extra", "application_profile_name": "System-HTTP"}));
    assert!(p.get("application_profile_name").is_none());
}

#[test]
fn body_over_the_limit_is_413() {
    let (_d, c) = setup();
    let api = c.admin();
    let before = pool_count(&api);
    let huge = format!(r#"{{"name": "big", "description": "{}"}}"#, "x".repeat(9 << 20));
    let r = api.send("POST", "/api/pool", Some(huge.as_bytes()));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("larger than the limit"));
    assert_eq!(pool_count(&api), before);
}

#[test]
fn unknown_types_and_objects_are_404_and_wrong_methods_405() {
    let (_d, c) = setup();
    let api = c.admin();
    let r = api.get("/api/nosuchtype");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("no such API path"));
    let r = api.post("/api/nosuchtype", &json!({"name": "x"}));
    assert_eq!(r.status, 404);
    let r = api.get("/api/pool/pool-missing");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("pool 'pool-missing' not found"));
    assert_eq!(api.delete("/api/pool/pool-missing").status, 404);
    assert_eq!(api.put("/api/pool/pool-missing", &json!({"name": "x"})).status, 404);
    assert_eq!(api.post("/api/systemconfiguration", &json!({})).status, 405);
    let r = api.delete("/api/systemconfiguration");
    assert_eq!(r.status, 405);
    assert!(r.error().contains("Method 'DELETE' not allowed"));
    assert_eq!(api.post("/api/serviceengine", &json!({"name": "se"})).status, 405, "SEs are created by agents");
}

#[test]
fn delete_of_a_referenced_object_is_409_naming_referrers() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = create(&api, "pool", json!({"name": "backend"}));
    let vs =
        create(&api, "virtualservice", json!({"name": "front", "pool_ref": pool["url"], "services": [{"port": 80}]}));
    let r = api.delete(&format!("/api/pool/{}", uuid(&pool)));
    assert_eq!(r.status, 409);
    assert!(r.error().contains("virtualservice 'front'") && r.error().contains(&uuid(&vs)), "{}", r.error());
    assert_eq!(api.get(&format!("/api/pool/{}", uuid(&pool))).status, 200);
    assert_eq!(api.delete(&format!("/api/virtualservice/{}", uuid(&vs))).status, 204);
    let r = api.delete(&format!("/api/pool/{}", uuid(&pool)));
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    // System defaults stay.
    let cloud = api.object("/api/cloud?name=Default-Cloud")["results"][0].clone();
    let r = api.delete(&format!("/api/cloud/{}", uuid(&cloud)));
    assert!(r.status == 403 || r.status == 409, "{}", r.body);
    assert_eq!(api.get(&format!("/api/cloud/{}", uuid(&cloud))).status, 200);
}

#[test]
fn put_replaces_and_a_stale_put_is_412() {
    let (_d, c) = setup();
    let api = c.admin();
    let created =
        create(&api, "pool", json!({"name": "p", "lb_algorithm": "LB_ALGORITHM_ROUND_ROBIN", "description": "d"}));
    let path = format!("/api/pool/{}", uuid(&created));
    let mut body = api.object(&path);
    body["description"] = json!("changed");
    body.as_object_mut().unwrap().remove("lb_algorithm");
    let r = api.put(&path, &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let updated = r.json();
    assert_eq!(updated["description"], "changed");
    assert_eq!(updated["lb_algorithm"], "LB_ALGORITHM_LEAST_CONNECTIONS", "PUT replaces: absent fields get defaults");
    assert!(updated["url"].as_str().unwrap().ends_with("#p"));
    // The old copy is stale now.
    let r = api
        .put(&path, &json!({"name": "p", "description": "lost update", "_last_modified": created["_last_modified"]}));
    assert_eq!(r.status, 412);
    assert!(r.error().contains("changed since it was read"));
    assert_eq!(api.object(&path)["description"], "changed");
    // Renaming onto another object's name is a conflict.
    create(&api, "pool", json!({"name": "other"}));
    let r = api.put(&path, &json!({"name": "other"}));
    assert_eq!(r.status, 409);
    assert_eq!(api.object(&path)["name"], "p");
}

#[test]
fn collections_page_filter_sort_and_select_fields() {
    let (_d, c) = setup();
    let api = c.admin();
    let mut made = vec![];
    for i in 0..7 {
        made.push(create(
            &api,
            "pool",
            json!({"name": format!("pool-{i}"), "default_server_port": 8000 + (i * 7) % 5}),
        ));
    }
    let page = api.object("/api/pool?page_size=3&page=2&name.contains=pool-");
    assert_eq!(page["count"], 7);
    let names: Vec<&str> = page["results"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pool-3", "pool-4", "pool-5"]);
    assert_eq!(page["next"], format!("{}/api/pool?page_size=3&name.contains=pool-&page=3", c.url));
    let last = api.object("/api/pool?page_size=3&page=3");
    assert!(last.get("next").is_none());
    assert_eq!(api.object("/api/pool?page_size=3&page=9")["results"].as_array().unwrap().len(), 0);
    assert_eq!(api.object("/api/pool")["results"].as_array().unwrap().len(), 7, "default page size is 25");
    for bad in ["page_size=0", "page_size=201", "page=0", "page_size=x"] {
        let r = api.get(&format!("/api/pool?{bad}"));
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.error().contains("must be an integer"), "{bad}");
    }
    assert_eq!(api.object("/api/pool?name=pool-3")["results"][0]["name"], "pool-3");
    let by_uuid = api.object(&format!("/api/pool?uuid.in={},{}", uuid(&made[1]), uuid(&made[5])));
    assert_eq!(by_uuid["count"], 2);
    let sorted = api.object("/api/pool?sort=-name&page_size=2");
    assert_eq!(sorted["results"][0]["name"], "pool-6");
    let by_port = api.object("/api/pool?sort=default_server_port&page_size=1");
    assert_eq!(by_port["results"][0]["default_server_port"], 8000);
    let fields = api.object("/api/pool?fields=default_server_port&page_size=1")["results"][0].clone();
    let keys: Vec<&String> = fields.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["url", "uuid", "name", "default_server_port"]);
    let lean = api.object(&format!("/api/pool/{}?skip_default=true", uuid(&made[0])));
    assert!(lean.get("lb_algorithm").is_none() && lean.get("default_server_port").is_some());
    // refers_to / referred_by follow references both ways.
    let vs = create(&api, "virtualservice", json!({"name": "vs", "pool_ref": made[2]["url"]}));
    let referrers = api.object(&format!("/api/virtualservice?refers_to=pool:{}", uuid(&made[2])));
    assert_eq!(referrers["count"], 1);
    let referred = api.object(&format!("/api/pool?referred_by=virtualservice:{}", uuid(&vs)));
    assert_eq!(referred["count"], 1);
    assert_eq!(referred["results"][0]["name"], "pool-2");
    assert_eq!(api.get("/api/pool?refers_to=nonsense").status, 400);
}

#[test]
fn slug_forces_the_uuid() {
    let (_d, c) = setup();
    let api = c.admin();
    let r = api.clone().header("Slug", "pool-force-42").post("/api/pool", &json!({"name": "forced"}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["uuid"], "pool-force-42");
    let again = api.clone().header("Slug", "pool-force-42").post("/api/pool", &json!({"name": "forced-2"}));
    assert_eq!(again.status, 409);
    assert_eq!(api.clone().header("Slug", "a/b").post("/api/pool", &json!({"name": "x"})).status, 400);
}

#[test]
fn api_version_is_checked_and_echoed() {
    let (_d, c) = setup();
    let r = c.admin().header("X-Avi-Version", "20.1.1").get("/api/pool");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("AVI_API_VERSION"), Some("20.1.1"));
    assert_eq!(c.admin().get("/api/pool").header("AVI_API_VERSION"), Some("30.2.1"));
    for bad in ["banana", "20", "20.1.x", "1.2.3.4.5"] {
        let r = c.admin().header("X-Avi-Version", bad).get("/api/pool");
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.error().contains("Invalid version"), "{bad}");
    }
}

#[test]
fn every_api_route_needs_credentials() {
    let (_d, c) = setup();
    let doc = c.admin().object("/api/openapi.json");
    let anonymous = c.anonymous();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let path = path.replace("{uuid}", "some-uuid");
        for method in ["get", "post", "put", "patch", "delete"] {
            // Operations the document marks as needing no credentials (`security: []`) are not.
            if item.get(method).is_some_and(|op| op.get("security") != Some(&json!([]))) {
                let r = anonymous.send(&method.to_uppercase(), &path, Some(b"{}"));
                assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
                checked += 1;
            }
        }
    }
    for path in ["/api/cluster/runtime", "/api/cluster/version", "/api/useraccount", "/api/openapi.json"] {
        assert_eq!(anonymous.get(path).status, 401, "{path}");
    }
    assert!(checked > 100, "only {checked} routes checked");
    for path in ["/api/cluster/status", "/api/initial-data"] {
        let r = anonymous.get(path);
        assert_eq!(r.status, 200, "{path}");
    }
    assert_eq!(anonymous.get("/api/initial-data").json()["version"]["Version"], "30.2.1");
    // Wrong credentials are 401 too.
    assert_eq!(Api::new(&c.url).basic("admin", "wrong-password").get("/api/pool").status, 401);
}

#[test]
fn login_sessions_csrf_and_logout() {
    let (_d, c) = setup();
    let anon = c.anonymous();
    let form = format!("username=admin&password={}", common::PASSWORD);
    let r = anon.clone().header("Content-Type", "application/x-www-form-urlencoded").send(
        "POST",
        "/login",
        Some(form.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["version"]["Version"], "30.2.1");
    assert_eq!(body["user"]["username"], "admin");
    assert_eq!(body["user"]["is_superuser"], true);
    assert_eq!(body["tenants"][0]["name"], "admin");
    assert_eq!(body["session_cookie_name"], "avi-sessionid");
    let cookies: Vec<&str> =
        r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie")).map(|(_, v)| v.as_str()).collect();
    let cookie = |name: &str| {
        cookies.iter().find_map(|c| c.split(';').next()?.strip_prefix(&format!("{name}="))).unwrap().to_string()
    };
    let (session, csrf) = (cookie("avi-sessionid"), cookie("csrftoken"));
    assert_eq!(cookie("sessionid"), session);
    // The JSON body of the Go SDK works too.
    let r = anon.send(
        "POST",
        "/login",
        Some(json!({"username": "admin", "password": common::PASSWORD}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200);
    let with_session = anon.clone().header("Cookie", &format!("avi-sessionid={session}; csrftoken={csrf}"));
    assert_eq!(with_session.get("/api/pool").status, 200);
    let r = with_session.post("/api/pool", &json!({"name": "no-csrf"}));
    assert_eq!(r.status, 401);
    assert!(r.error().contains("CSRF"));
    let r = with_session.clone().header("X-CSRFToken", "invalid").post("/api/pool", &json!({"name": "bad-csrf"}));
    assert_eq!(r.status, 401);
    assert_eq!(c.admin().object("/api/pool")["count"], 0);
    let with_csrf = with_session.clone().header("X-CSRFToken", &csrf);
    assert_eq!(with_csrf.post("/api/pool", &json!({"name": "ok"})).status, 201);
    assert_eq!(with_csrf.send("POST", "/logout", None).status, 200);
    assert_eq!(with_session.get("/api/pool").status, 401);
    let form = anon.clone().header("Content-Type", "application/x-www-form-urlencoded");
    let r = form.send("POST", "/login", Some(b"username=admin&password=nope"));
    assert_eq!(r.status, 401);
}

#[test]
fn failed_logins_are_throttled() {
    let (_d, c) = setup();
    let anon = c.anonymous().header("Content-Type", "application/x-www-form-urlencoded");
    for _ in 0..5 {
        assert_eq!(anon.send("POST", "/login", Some(b"username=admin&password=guess")).status, 401);
    }
    let form = format!("username=admin&password={}", common::PASSWORD);
    let r = anon.send("POST", "/login", Some(form.as_bytes()));
    assert_eq!(r.status, 429, "even the right password waits out the window");
    assert!(r.error().contains("Too many failed login attempts"));
    assert_eq!(r.header("Retry-After"), Some("60"));
    assert_eq!(Api::new(&c.url).basic("admin", common::PASSWORD).get("/api/pool").status, 429);
}

#[test]
fn basic_auth_can_be_switched_off() {
    let (_d, c) = setup();
    let api = c.admin();
    let mut sys = api.object("/api/systemconfiguration");
    sys["portal_configuration"]["allow_basic_authentication"] = json!(false);
    assert_eq!(api.put("/api/systemconfiguration", &sys).status, 200);
    let r = api.get("/api/pool");
    assert_eq!(r.status, 401);
    assert!(r.error().contains("Basic authentication is disabled"));
}

#[test]
fn tenants_scope_objects_and_users_see_only_their_tenants() {
    let (_d, c) = setup();
    let admin = c.admin();
    let tenant = create(&admin, "tenant", json!({"name": "blue"}));
    let blue_pool = create(&admin.clone().tenant("blue"), "pool", json!({"name": "shared-name"}));
    assert_eq!(blue_pool["tenant_ref"], format!("{}/api/tenant/{}#blue", c.url, uuid(&tenant)));
    create(&admin, "pool", json!({"name": "shared-name"}));
    assert_eq!(admin.object("/api/pool")["count"], 1);
    assert_eq!(admin.clone().tenant("blue").object("/api/pool")["count"], 1);
    assert_eq!(admin.clone().header("X-Avi-Tenant-UUID", &uuid(&tenant)).object("/api/pool")["count"], 1);
    assert_eq!(admin.clone().tenant("*").object("/api/pool")["count"], 2);
    assert_eq!(admin.get(&format!("/api/pool/{}", uuid(&blue_pool))).status, 404, "not visible from admin");
    let r = admin.clone().tenant("nosuch").get("/api/pool");
    assert_eq!(r.status, 403);
    assert!(r.error().contains("Tenant 'nosuch' does not exist"));
    // A blue-only administrator and a read-only user.
    let blue_user = json!({"name": "bob", "password": "bob-password-1", "default_tenant_ref": tenant["url"],
        "access": [{"role_ref": "/api/role?name=Tenant-Admin", "tenant_ref": tenant["url"]}]});
    let user = create(&admin, "user", blue_user);
    assert!(user.get("password").is_none() && user.get("_password_hash").is_none());
    create(
        &admin,
        "user",
        json!({"name": "rita", "password": "rita-password-1",
        "access": [{"role_ref": "/api/role?name=System-ReadOnly", "all_tenants": true}]}),
    );
    let bob = Api::new(&c.url).basic("bob", "bob-password-1");
    let bob_pools = bob.object("/api/pool");
    assert_eq!(bob_pools["count"], 1, "bob's default tenant is blue");
    assert_eq!(bob_pools["results"][0]["uuid"], blue_pool["uuid"]);
    assert_eq!(bob.post("/api/pool", &json!({"name": "bobs"})).status, 201);
    let r = bob.clone().tenant("admin").get("/api/pool");
    assert_eq!(r.status, 403);
    assert_eq!(bob.object("/api/tenant")["count"], 1, "bob sees only blue");
    assert_eq!(bob.get("/api/user").status, 403);
    let rita = Api::new(&c.url).basic("rita", "rita-password-1");
    assert_eq!(rita.object("/api/pool")["count"], 1);
    let r = rita.post("/api/pool", &json!({"name": "nope"}));
    assert_eq!(r.status, 403);
    assert!(r.error().contains("may not write"));
    assert_eq!(rita.delete(&format!("/api/pool/{}", uuid(&blue_pool))).status, 403);
    assert_eq!(admin.clone().tenant("blue").object("/api/pool")["count"], 2);
}

#[test]
fn password_change_through_useraccount() {
    let (_d, c) = setup();
    let api = c.admin();
    let r = api.put("/api/useraccount", &json!({"old_password": "wrong", "password": "another-pass-1"}));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("old_password"));
    let r = api.put("/api/useraccount", &json!({"old_password": common::PASSWORD, "password": "short"}));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("at least 8"));
    let r = api.put("/api/useraccount", &json!({"old_password": common::PASSWORD, "password": "another-pass-1"}));
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(api.get("/api/pool").status, 401, "the old password no longer works");
    assert_eq!(Api::new(&c.url).basic("admin", "another-pass-1").get("/api/pool").status, 200);
}

#[test]
fn default_objects_and_cluster_views() {
    let (_d, c) = setup();
    let api = c.admin();
    for (kind, name) in [
        ("tenant", "admin"),
        ("cloud", "Default-Cloud"),
        ("serviceenginegroup", "Default-Group"),
        ("healthmonitor", "System-HTTP"),
        ("healthmonitor", "System-TCP"),
        ("healthmonitor", "System-Ping"),
        ("vrfcontext", "global"),
    ] {
        assert_eq!(api.object(&format!("/api/{kind}?name={name}"))["count"], 1, "{kind} {name}");
    }
    let seg = api.object("/api/serviceenginegroup?name=Default-Group")["results"][0].clone();
    assert_eq!(seg["max_se"], 10);
    assert_eq!(seg["ha_mode"], "HA_MODE_SHARED");
    assert_eq!(api.object("/api/systemconfiguration")["uuid"], "default");
    assert_eq!(api.object("/api/controllerproperties")["api_idle_timeout"], 15);
    let runtime = api.object("/api/cluster/runtime");
    assert!(runtime["node_info"]["cluster_uuid"].as_str().unwrap().starts_with("cluster-"));
    assert_eq!(runtime["node_states"][0]["role"], "CLUSTER_LEADER");
    assert_eq!(api.object("/api/cluster")["uuid"], runtime["node_info"]["cluster_uuid"]);
    assert_eq!(api.object("/api/cluster/version")["Version"], "30.2.1");
}

#[test]
fn metrics_and_openapi_describe_the_service() {
    let (_d, c) = setup();
    let api = c.admin();
    create(&api, "pool", json!({"name": "m"}));
    api.get("/api/pool");
    let text = c.anonymous().get("/metrics").body;
    assert!(text.contains("fulcrum_http_requests_total{route=\"/api/pool\",status=\"201\"} 1"), "{text}");
    assert!(text.contains("fulcrum_http_request_duration_seconds_count{route=\"/api/pool\"}"));
    assert!(text.contains("fulcrum_store_commit_seconds_count"));
    assert!(text.contains("fulcrum_store_commit_batch_size_bucket"));
    let doc = api.object("/api/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    assert_eq!(
        doc["components"]["schemas"]["Pool"]["properties"]["lb_algorithm"]["default"],
        "LB_ALGORITHM_LEAST_CONNECTIONS"
    );
    assert!(doc["paths"]["/api/virtualservice/{uuid}"]["put"].is_object());
    // Image records are made by uploads: POST is documented as the multipart upload it is.
    let upload = &doc["paths"]["/api/image"]["post"];
    assert!(upload["requestBody"]["content"]["multipart/form-data"].is_object(), "{upload}");
    assert!(upload["responses"]["201"].is_object(), "{upload}");
    for runtime in ["/api/pool/{uuid}/runtime", "/api/pool/{uuid}/runtime/server"] {
        assert!(doc["paths"][runtime]["get"].is_object(), "{runtime} documented");
    }
}

#[test]
fn shell_prints_tables() {
    let (_d, c) = setup();
    create(&c.admin(), "pool", json!({"name": "shell-pool", "servers": [{"ip": {"addr": "10.1.1.1", "type": "V4"}}]}));
    let run = |cmd: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(["shell", "--controller", &c.url, "--user", "admin", "--password", common::PASSWORD, "-c", cmd])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, _) = run("show pool");
    assert!(ok);
    assert!(out.contains("| Name       | UUID"), "{out}");
    assert!(out.contains("| shell-pool | pool-"), "{out}");
    let (ok, out, _) = run("show pool shell-pool");
    assert!(ok);
    assert!(out.contains("| Field"), "{out}");
    assert!(out.contains("| cloud_ref") && out.contains("Default-Cloud"), "{out}");
    assert!(out.contains("|   ip ") && out.contains("10.1.1.1"), "{out}");
    let (ok, _, err) = run("show pool nosuch");
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, out, _) = run("show systemconfiguration");
    assert!(ok && out.contains("default_license_tier"), "{out}");
}

#[test]
fn a_fresh_controller_has_the_products_default_certificates_for_https_virtual_services() {
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    // The Ansible avi_virtualservice module's documented HTTPS example, as its users send it.
    let vs = api.post(
        "/api/virtualservice",
        &json!({
            "name": "secure-vs",
            "services": [{"port": 443, "enable_ssl": true}],
            "ssl_key_and_certificate_refs": ["/api/sslkeyandcertificate?name=System-Default-Cert"],
            "ssl_profile_ref": "/api/sslprofile?name=System-Standard",
            "application_profile_ref": "/api/applicationprofile?name=System-Secure-HTTP",
        }),
    );
    assert_eq!(vs.status, 201, "{}", vs.body);
    let get = |name: &str| api.object(&format!("/api/sslkeyandcertificate?name={name}"))["results"][0].clone();
    let root = get("System-Default-Root-CA");
    assert_eq!(root["type"], "SSL_CERTIFICATE_TYPE_CA");
    let mut roots = rustls::RootCertStore::empty();
    let root_pem = root["certificate"]["certificate"].as_str().unwrap();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let mut certs = std::collections::HashSet::new();
    for name in [
        "System-Default-Cert",
        "System-Default-Cert-EC",
        "System-Default-Portal-Cert",
        "System-Default-Portal-Cert-EC256",
        "System-Default-Secure-Channel-Cert",
    ] {
        let object = get(name);
        assert_eq!(object["name"], name);
        assert!(object.get("key").is_none() && !object.to_string().contains("PRIVATE KEY"), "keys are never shown");
        let pem = object["certificate"]["certificate"].as_str().unwrap().to_string();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        // A real certificate, issued by the root CA, for the controller's own names.
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &der,
                &[],
                &rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(certs.insert(pem), "each default certificate is its own");
    }
    // The other system defaults such clients name.
    for (kind, name) in [
        ("sslprofile", "System-Standard-Portal"),
        ("applicationprofile", "System-DNS"),
        ("applicationprofile", "System-Syslog"),
        ("applicationprofile", "System-L4-Application"),
        ("networkprofile", "System-TCP-Proxy"),
        ("healthmonitor", "System-HTTP"),
    ] {
        assert_eq!(api.object(&format!("/api/{kind}?name={name}"))["count"], 1, "{kind} {name}");
    }
    assert_eq!(
        api.delete(&format!("/api/sslkeyandcertificate/{}", get("System-Default-Cert-EC")["uuid"].as_str().unwrap()))
            .status,
        403
    );
}

#[test]
fn the_openapi_document_lists_every_endpoint_the_server_answers() {
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    let doc = api.object("/api/openapi.json");
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/upgrade",
        "/api/upgrade/preview",
        "/api/patch",
        "/api/rollback",
        "/api/rollbackpatch",
        "/api/segroup/resume",
        "/api/image-upload",
        "/api/image-upload/{id}",
        "/api/image-upload/{id}/complete",
        "/api/configuration/backup",
        "/login",
        "/logout",
        "/api/virtualservice/{uuid}/runtime",
        "/api/analytics/metrics/controller",
        "/api/pool/{uuid}",
    ] {
        assert!(paths.contains_key(path), "{path} is described");
    }
    // Every method of every path the document describes is one the server answers (not 404 for
    // the path, not 405 for the method); a method it does not describe is refused.
    let mut wrong = Vec::new();
    for (path, item) in paths {
        let concrete: String =
            path.split('/').map(|s| if s.starts_with('{') { "doc-probe" } else { s }).collect::<Vec<_>>().join("/");
        let methods: Vec<String> =
            item.as_object().unwrap().keys().filter(|k| *k != "parameters").map(|k| k.to_uppercase()).collect();
        for method in &methods {
            if path == "/logout" || (method == "DELETE" && path.starts_with("/api/role")) {
                continue; // would end the session or touch built-in objects; answered all the same
            }
            let r = api.send(method, &concrete, Some(b"{}"));
            if r.status == 405 || (r.status == 404 && r.body.contains("no such API path")) {
                wrong.push(format!("{method} {path} is described but answers {}: {}", r.status, r.body));
            }
        }
        if path.starts_with("/api/") && !methods.iter().any(|m| m == "DELETE") {
            let r = api.send("DELETE", &concrete, None);
            if r.status != 405 {
                wrong.push(format!("DELETE {path} is not described but answers {}: {}", r.status, r.body));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_web_ui_is_served_at_the_root_with_a_policy_against_inline_scripts() {
    let (_d, c) = setup();
    let anonymous = c.anonymous();
    let page = anonymous.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.body.contains("/ui/js/main.js"), "{}", page.body);
    let csp = page.header("content-security-policy").unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
    let module = anonymous.get("/ui/js/main.js");
    assert_eq!(module.status, 200);
    assert!(module.header("content-type").unwrap().starts_with("text/javascript"));
    assert_eq!(module.header("content-security-policy").unwrap(), csp);
    // Only the built-in files: no path walks out of them.
    for missing in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/js/../../src/ui.rs", "/ui/"] {
        let r = anonymous.get(missing);
        assert_eq!(r.status, 404, "{missing}");
        assert!(r.json()["error"].is_string(), "{missing}: {}", r.body);
    }
}

#[test]
fn the_user_account_lists_what_the_user_may_do() {
    let (_d, c) = setup();
    let admin = c.admin();
    let mine = admin.object("/api/useraccount");
    assert_eq!(mine["privileges"], json!([{"resource": "*", "type": "WRITE_ACCESS"}]));
    create(
        &admin,
        "user",
        json!({"name": "rita", "password": "rita-password-1",
        "access": [{"role_ref": "/api/role?name=System-ReadOnly", "all_tenants": true}]}),
    );
    let rita = Api::new(&c.url).basic("rita", "rita-password-1").object("/api/useraccount");
    assert_eq!(rita["privileges"], json!([{"resource": "*", "type": "READ_ACCESS"}]));
    assert_eq!(rita["is_superuser"], false);
}

#[test]
fn the_virtual_service_inventory_pages_configuration_with_runtime() {
    let (_d, c) = setup();
    let api = c.admin();
    for name in ["vs-a", "vs-b", "vs-c"] {
        create(&api, "virtualservice", json!({"name": name, "services": [{"port": 80}]}));
    }
    let page = api.object("/api/virtualservice-inventory?page_size=2&sort=name&include_name");
    assert_eq!(page["count"], 3);
    let results = page["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["config"]["name"], "vs-a");
    assert_eq!(results[0]["uuid"], results[0]["config"]["uuid"]);
    assert!(results[0]["config"]["tenant_ref"].as_str().unwrap().ends_with("#admin"));
    // No SE has joined: the runtime says why it is not up, as /runtime does.
    let uuid = results[0]["uuid"].as_str().unwrap();
    // (Its state's time is when it was asked: a runtime state is worked out, not stored.)
    assert_eq!(
        without_times(results[0]["runtime"].clone()),
        without_times(api.object(&format!("/api/virtualservice/{uuid}/runtime")))
    );
    assert_eq!(results[0]["runtime"]["oper_status"]["state"], "OPER_RESOURCES");
    assert!(page["next"].as_str().unwrap().contains("/api/virtualservice-inventory?"), "{page}");
    let filtered = api.object("/api/virtualservice-inventory?name=vs-c");
    assert_eq!(filtered["count"], 1);
    assert_eq!(filtered["results"][0]["config"]["name"], "vs-c");
    assert_eq!(api.post("/api/virtualservice-inventory", &json!({})).status, 405);
}

fn without_times(mut v: Value) -> Value {
    match &mut v {
        Value::Object(map) => {
            map.remove("last_changed_time");
            for value in map.values_mut() {
                *value = without_times(value.take());
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| *i = without_times(i.take())),
        _ => {}
    }
    v
}
