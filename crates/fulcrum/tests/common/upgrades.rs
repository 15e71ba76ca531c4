//! Upgrade operations as a client sees them: their status nodes, and waiting for them to settle.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::Api;
use super::agents::{se_by_name, state, wait_for};

/// A GET that waits out a controller restarting (or a change of leader) for up to 20 s.
pub fn get(api: &Api, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match api.try_send("GET", path, &Value::Null) {
            Ok(r) if r.status == 200 => return r.json(),
            Ok(r) => panic!("GET {path}: {} {}", r.status, r.body),
            Err(e) => {
                assert!(Instant::now() < deadline, "GET {path}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

pub fn post(api: &Api, path: &str, body: Value) -> (u16, Value) {
    let r = api.try_send("POST", path, &body).unwrap_or_else(|e| panic!("POST {path}: {e}"));
    (r.status, r.json())
}

pub fn nodes(api: &Api) -> Vec<Value> {
    get(api, "/api/upgradestatusinfo")["results"].as_array().unwrap().clone()
}

pub fn node(api: &Api, name: &str) -> Value {
    nodes(api).into_iter().find(|n| n["name"] == name).unwrap_or_else(|| panic!("no status for {name}"))
}

/// Waits until no node is in progress or waiting, and the fleet is back in service (after a
/// controller restart every SE reports again and every virtual service is served); returns the
/// nodes.
pub fn settled(api: &Api) -> Vec<Value> {
    let all = wait_for("the operation to settle", Duration::from_secs(120), || {
        let all = nodes(api);
        let busy = all
            .iter()
            .any(|n| matches!(n["state"]["state"].as_str(), Some("UPGRADE_FSM_IN_PROGRESS" | "UPGRADE_FSM_WAITING")));
        (!busy).then_some(all)
    });
    wait_for("the fleet back in service", Duration::from_secs(30), || {
        let ses = get(api, "/api/serviceengine?page_size=200");
        let heard = ses["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s.get("last_heartbeat").is_some() && state(s) == "OPER_UP");
        let vss = get(api, "/api/virtualservice?page_size=200");
        let served = vss["results"].as_array().unwrap().iter().all(|v| {
            get(api, &format!("/api/virtualservice/{}/runtime", v["uuid"].as_str().unwrap()))["oper_status"]["state"]
                == "OPER_UP"
        });
        (heard && served).then_some(())
    });
    all
}

pub fn versions(api: &Api, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| se_by_name(api, n).map(|s| format!("{}-{}", s["version"].as_str().unwrap(), s["build"])).unwrap())
        .collect()
}
