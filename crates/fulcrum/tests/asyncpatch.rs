//! Asynchronous PATCH: queued, merged on demand (the tests drive the merge clock through
//! `POST /api/pool-async/merge` instead of waiting real periods), durable across `kill -9`.

mod common;

use common::{Api, Controller, start, temp_dir};
use serde_json::{Value, json};

fn setup() -> (tempfile::TempDir, Controller) {
    let dir = temp_dir();
    let c = start(dir.path());
    (dir, c)
}

fn server(addr: &str) -> Value {
    json!({"ip": {"addr": addr, "type": "V4"}})
}

fn set_period(api: &Api, seconds: u64) {
    let r = api.send(
        "PATCH",
        "/api/controllerproperties",
        Some(json!({"replace": {"async_patch_merge_period": seconds}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

fn new_pool(api: &Api, name: &str, servers: Vec<Value>) -> String {
    let r = api.post("/api/pool", &json!({"name": name, "servers": servers}));
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["uuid"].as_str().unwrap().to_string()
}

fn queue(api: &Api, pool: &str, body: Value) -> String {
    let r = api.send("PATCH", &format!("/api/pool/{pool}?async_mode"), Some(body.to_string().as_bytes()));
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "QUEUED");
    assert_eq!(v["uuid"], pool);
    v["patch_id"].as_str().unwrap().to_string()
}

fn status(api: &Api, id: &str) -> Value {
    api.object(&format!("/api/pool-async/status/{id}"))
}

fn merge(api: &Api) -> Value {
    let r = api.post("/api/pool-async/merge", &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn addrs(api: &Api, pool: &str) -> Vec<String> {
    api.object(&format!("/api/pool/{pool}"))["servers"]
        .as_array()
        .map_or(vec![], |s| s.iter().map(|s| s["ip"]["addr"].as_str().unwrap().to_string()).collect())
}

#[test]
fn merge_period_and_cleanup_are_range_checked() {
    let (_d, c) = setup();
    let api = c.admin();
    assert_eq!(api.object("/api/controllerproperties")["async_patch_merge_period"], 0);
    assert_eq!(api.object("/api/controllerproperties")["async_patch_request_cleanup_duration"], 60);
    for (body, message) in [
        (json!({"replace": {"async_patch_merge_period": 10}}), "30..120"),
        (json!({"replace": {"async_patch_merge_period": 121}}), "out of range"),
        (json!({"replace": {"async_patch_request_cleanup_duration": 4}}), "out of range 5..120"),
    ] {
        let r = api.send("PATCH", "/api/controllerproperties", Some(body.to_string().as_bytes()));
        assert_eq!(r.status, 400, "{body}");
        assert!(r.error().contains("async_patch") && r.error().contains(message), "{}", r.error());
    }
    assert_eq!(api.object("/api/controllerproperties")["async_patch_merge_period"], 0);
    set_period(&api, 30);
    set_period(&api, 120);
    set_period(&api, 0);
}

#[test]
fn period_zero_is_synchronous() {
    let (_d, c) = setup();
    let api = c.admin();
    let pool = new_pool(&api, "sync", vec![]);
    let r = api.send(
        "PATCH",
        &format!("/api/pool/{pool}?async_mode=true"),
        Some(json!({"add": {"servers": [server("1.1.1.1")]}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["servers"][0]["ip"]["addr"], "1.1.1.1");
}

#[test]
fn queued_until_the_merge_then_applied_with_cancelling_pairs() {
    let (_d, c) = setup();
    let api = c.admin();
    set_period(&api, 30);
    let pool = new_pool(&api, "queued", vec![server("10.0.0.1")]);
    let a = queue(&api, &pool, json!({"add": {"servers": [server("10.0.0.2"), server("10.0.0.3")]}}));
    let b = queue(&api, &pool, json!({"add": {"servers": [server("10.0.0.4")]}}));
    let c_ = queue(&api, &pool, json!({"delete": {"servers": [server("10.0.0.4")]}}));
    let d = queue(&api, &pool, json!({"delete": {"servers": [server("10.0.0.1")]}}));
    assert!(a < b && b < c_ && c_ < d, "patch ids follow arrival order");
    let s = status(&api, &a);
    assert_eq!(s["status"], "QUEUED");
    assert_eq!(s["uuid"], pool);
    assert!(s["created"].as_str().unwrap().starts_with("20"));
    assert_eq!(addrs(&api, &pool), ["10.0.0.1"], "nothing applied before the merge");
    let metrics = c.anonymous().get("/metrics").body;
    assert!(metrics.contains("fulcrum_async_patch_queue_depth 4"), "{metrics}");
    let report = merge(&api);
    assert_eq!(
        (report["merged"].clone(), report["succeeded"].clone(), report["pools"].clone()),
        (json!(4), json!(4), json!(1))
    );
    assert_eq!(addrs(&api, &pool), ["10.0.0.2", "10.0.0.3"], "the add and delete of 10.0.0.4 cancel out");
    for id in [&a, &b, &c_, &d] {
        let s = status(&api, id);
        assert_eq!(s["status"], "SUCCESS", "{id}");
        assert_eq!(s["status_code"], 200);
    }
    let pool_obj = api.object(&format!("/api/pool/{pool}"));
    assert_eq!(pool_obj["servers"][0]["port"], 80);
    assert_eq!(merge(&api)["merged"], 0, "nothing left");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args([
            "shell",
            "--controller",
            &c.url,
            "--password",
            common::PASSWORD,
            "-c",
            &format!("show pool-async status {a}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| status") && text.contains("SUCCESS"), "{text}");
    let metrics = c.anonymous().get("/metrics").body;
    assert!(metrics.contains("fulcrum_async_patch_queue_depth 0"));
    assert!(metrics.contains("fulcrum_async_patch_merge_seconds_count"));
    assert!(metrics.contains("fulcrum_async_patch_merged_per_cycle_bucket"));
    assert_eq!(api.get("/api/pool-async/status/00000000000000000001").status, 404);
}

#[test]
fn a_failing_request_fails_alone() {
    let (_d, c) = setup();
    let api = c.admin();
    set_period(&api, 30);
    let full: Vec<Value> = (0..4999).map(|i| server(&format!("10.1.{}.{}", i / 256, i % 256))).collect();
    let pool = new_pool(&api, "nearly-full", full);
    let gone = new_pool(&api, "to-be-deleted", vec![]);
    let too_many = queue(&api, &pool, json!({"add": {"servers": [server("9.9.9.1"), server("9.9.9.2")]}}));
    let fits = queue(&api, &pool, json!({"add": {"servers": [server("9.9.9.3")]}}));
    let orphan = queue(&api, &gone, json!({"add": {"servers": [server("9.9.9.4")]}}));
    assert_eq!(api.delete(&format!("/api/pool/{gone}")).status, 204);
    let report = merge(&api);
    assert_eq!((report["succeeded"].clone(), report["failed"].clone()), (json!(1), json!(2)));
    let s = status(&api, &too_many);
    assert_eq!(s["status"], "FAIL");
    assert_eq!(s["status_code"], 400);
    assert!(s["error_message"].as_str().unwrap().contains("at most 5000"), "{s}");
    assert_eq!(status(&api, &fits)["status"], "SUCCESS");
    let s = status(&api, &orphan);
    assert_eq!((s["status"].clone(), s["status_code"].clone()), (json!("FAIL"), json!(404)));
    assert_eq!(addrs(&api, &pool).len(), 5000);
}

#[test]
fn refused_in_async_mode_and_mixed_versions() {
    let (_d, c) = setup();
    let api = c.admin();
    set_period(&api, 30);
    let pool = new_pool(&api, "strict", vec![]);
    let vs = api.post("/api/virtualservice", &json!({"name": "vs"})).json()["uuid"].as_str().unwrap().to_string();
    let path = format!("/api/pool/{pool}?async_mode");
    for (path, body, message) in [
        (path.clone(), json!({"replace": {"servers": [server("1.1.1.1")]}}), "accepts only"),
        (path.clone(), json!({"add": {"description": "x"}}), "accepts only"),
        (path.clone(), json!({"add": {"servers": [{"ip": {"addr": "::1", "type": "V6"}}]}}), "IPv4 servers only"),
        (
            path.clone(),
            json!({"json_patch": [{"op": "add", "path": "/servers", "value": [server("1.1.1.1")]}]}),
            "accepts only",
        ),
        (
            path.clone(),
            json!({"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 99}]}}),
            "out of range",
        ),
        (format!("/api/virtualservice/{vs}?async_mode"), json!({"add": {"services": [{"port": 80}]}}), "accepts only"),
        // Singletons too: a settings PATCH asking for async mode must not be applied behind the client's back.
        (
            "/api/systemconfiguration?async_mode".into(),
            json!({"replace": {"welcome_workflow_complete": true}}),
            "accepts only",
        ),
        (
            "/api/controllerproperties?async_mode=true".into(),
            json!({"replace": {"api_idle_timeout": 20}}),
            "accepts only",
        ),
    ] {
        let before = api.get("/api/systemconfiguration").json();
        let r = api.send("PATCH", &path, Some(body.to_string().as_bytes()));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.error().contains(message), "{body}: {}", r.error());
        assert_eq!(api.get("/api/systemconfiguration").json(), before, "a refused PATCH changed nothing");
    }
    assert_eq!(api.object("/api/controllerproperties")["api_idle_timeout"], 15);
    assert_eq!(
        api.send(
            "PATCH",
            "/api/pool/pool-nope?async_mode",
            Some(json!({"add": {"servers": [server("1.1.1.1")]}}).to_string().as_bytes())
        )
        .status,
        404
    );
    let v20 = api.clone().header("X-Avi-Version", "20.1.1");
    let v30 = api.clone().header("X-Avi-Version", "30.2.1");
    let first = v20.send("PATCH", &path, Some(json!({"add": {"servers": [server("1.1.1.1")]}}).to_string().as_bytes()));
    assert_eq!(first.status, 202);
    let r = v30.send("PATCH", &path, Some(json!({"add": {"servers": [server("1.1.1.2")]}}).to_string().as_bytes()));
    assert_eq!(r.status, 409);
    assert!(r.error().contains("same API version") && r.error().contains("20.1.1"), "{}", r.error());
    assert_eq!(merge(&api)["merged"], 1, "the refused request was not queued");
    // A new window may use another version.
    assert_eq!(
        v30.send("PATCH", &path, Some(json!({"add": {"servers": [server("1.1.1.2")]}}).to_string().as_bytes())).status,
        202
    );
    merge(&api);
    assert_eq!(addrs(&api, &pool), ["1.1.1.1", "1.1.1.2"]);
}

#[test]
fn acknowledged_requests_survive_kill_9_and_statuses_expire() {
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    set_period(&api, 30);
    let pool = new_pool(&api, "durable-queue", vec![]);
    let ids: Vec<String> =
        (0..20).map(|i| queue(&api, &pool, json!({"add": {"servers": [server(&format!("10.2.0.{i}"))]}}))).collect();
    c.kill9();
    let c = start(dir.path());
    let api = c.admin();
    assert_eq!(status(&api, &ids[7])["status"], "QUEUED", "still queued after the crash");
    assert!(c.anonymous().get("/metrics").body.contains("fulcrum_async_patch_queue_depth 20"));
    assert_eq!(merge(&api)["succeeded"], 20);
    assert_eq!(addrs(&api, &pool).len(), 20);
    assert_eq!(status(&api, &ids[0])["status"], "SUCCESS");
    // Statuses are kept for the cleanup duration (60 minutes by default), then dropped.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let r = api.post("/api/pool-async/merge", &json!({"now": now + 59 * 60}));
    assert_eq!(r.json()["expired"], 0);
    assert_eq!(status(&api, &ids[0])["status"], "SUCCESS");
    let r = api.post("/api/pool-async/merge", &json!({"now": now + 61 * 60}));
    assert_eq!(r.json()["expired"], 20);
    assert_eq!(api.get(&format!("/api/pool-async/status/{}", ids[0])).status, 404);
}
