//! Upgrade orchestration end to end: one controller (which restarts itself into new versions),
//! two SE groups of three real agent processes each, real packages.

mod common;

use std::fs;
use std::time::Duration;

use common::agents::{Agent, se_by_name, state, token, wait_for};
use common::packages::{Packages, upload};
use common::upgrades::{get, node, post, settled, versions};
use common::{Api, Controller, Launch, shell, temp_dir, try_start};
use serde_json::{Value, json};

const ENGINE_ARGS: &[&str] = &["--se-heartbeat-interval", "0.3", "--se-down-after", "2", "--se-health-timeout", "20"];

/// The 22 checks, in the document's words and order.
const DOCUMENTED_CHECKS: [&str; 22] = [
    "Check Controller Cluster readiness for upgrade operations.",
    "Check and inform user to take a backup prior to upgrade operations.",
    "Check if se linux is enabled on controller nodes.",
    "Check if upgrade operation is already in progress.",
    "Check ServiceEngineGroup has an ongoing upgrade operation.",
    "Check image version compatibility for upgrade operations.",
    "Check ServiceEngine reachability for upgrade operations.",
    "Check ServiceEngine disk space for upgrade operations.",
    "Check Controller Cluster disk space for upgrade operations.",
    "Check and inform Virtual Service(s) disruption for upgrade operations.",
    "Check idempotent operations for upgrade operations.",
    "Check active versions compatibility for upgrade operations.",
    "Check ServiceEngineGroup error recovery options prior to upgrade operations.",
    "Check Image state across Cluster members for upgrade operations.",
    "Checks for the patch in image bundle.",
    "Checks if Gslb Feature is enabled and provides feature specific messages.",
    "Checks the system configuration.",
    "Check total number of alerts for upgrade operations.",
    "Checks if the cloud api versions are compatible after upgrade.",
    "Checks if Docker version is compatible.",
    "Checks if configured IP type is DHCP or STATIC.",
    "Checks if se has a valid license state.",
];

/// An SE image whose health check fails while the agent's data dir holds `fail-health`.
fn se_files() -> Vec<(&'static str, &'static str)> {
    vec![
        ("etc/release", "fulcrum se\n"),
        (
            "hooks/health-check",
            "#!/bin/sh\nif [ -f \"$FULCRUM_SE_SLOT/../../fail-health\" ]; then echo 'told to fail' >&2; exit 1; fi\n",
        ),
    ]
}

fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// GET that waits out the moment the controller restarts itself.
fn failing(body: &Value) -> Vec<String> {
    body["checks"].as_array().unwrap().iter().map(|c| c["check_code"].as_str().unwrap().to_string()).collect()
}

struct Fleet {
    agents: Vec<Agent>,
    work: tempfile::TempDir,
}

impl Fleet {
    fn dir(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }
}

/// Two SE groups (Default-Group: d1..d3, G2: g1..g3), a virtual service in each.
fn fleet(c: &Controller, api: &Api) -> Fleet {
    assert_eq!(api.post("/api/serviceenginegroup", &json!({"name": "G2"})).status, 201);
    let (_, default_token) = token(api, "Default-Group");
    let (_, g2_token) = token(api, "G2");
    let work = temp_dir();
    let mut agents = Vec::new();
    for (prefix, t) in [("d", &default_token), ("g", &g2_token)] {
        for i in 1..=3 {
            let name = format!("{prefix}{i}");
            agents.push(Agent::start(c, Some(t), &work.path().join(&name), &name, &[]));
        }
    }
    for name in ["d1", "d2", "d3", "g1", "g2", "g3"] {
        wait_for("SEs up", Duration::from_secs(30), || se_by_name(api, name).filter(|s| state(s) == "OPER_UP"));
    }
    for (vs, group) in [("vs-d", "Default-Group"), ("vs-g", "G2")] {
        let r = api.post(
            "/api/virtualservice",
            &json!({"name": vs, "services": [{"port": 80}], "se_group_ref": format!("/api/serviceenginegroup?name={group}")}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let uuid = r.json()["uuid"].as_str().unwrap().to_string();
        wait_for("the VS served", Duration::from_secs(10), || {
            (get(api, &format!("/api/virtualservice/{uuid}/runtime"))["oper_status"]["state"] == "OPER_UP")
                .then_some(())
        });
    }
    Fleet { agents, work }
}

const ALL: [&str; 6] = ["d1", "d2", "d3", "g1", "g2", "g3"];

#[test]
fn prechecks_system_upgrade_suspend_resume_one_group_alone_patch_and_rollbacks() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let listen = free_listen();
    let c = try_start(Launch { args: ENGINE_ARGS, listen: &listen, ..Launch::plain(data.path()) }).expect("starts");
    let api = c.admin();
    let mut fleet = fleet(&c, &api);
    let v222 = upload(&api, &pkgs.with_se("v222.pkg", "30.2.2", "9100", &se_files())).json();
    let v223 = upload(&api, &pkgs.with_se("v223.pkg", "30.2.3", "9200", &se_files())).json();
    let old = upload(&api, &pkgs.with_se("v220.pkg", "30.2.0", "8000", &se_files())).json();
    let patch = upload(&api, &pkgs.build("p.pkg", "controller_patch", "30.2.3", "9200", &[])).json();
    let name = |image: &Value| image["name"].as_str().unwrap().to_string();

    // Preview: all 22 checks, in the document's order; nothing starts.
    let (status, preview) = post(&api, "/api/upgrade/preview", json!({"image_ref": name(&v222), "system": true}));
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["status_code"], "SYSERR_UPGRADE_OPS_PREVIEW_RESPONSE");
    let descriptions: Vec<&str> =
        preview["checks"].as_array().unwrap().iter().map(|c| c["description"].as_str().unwrap()).collect();
    assert_eq!(descriptions, DOCUMENTED_CHECKS);
    assert_eq!(node(&api, "cluster-0-1")["state"]["state"], "UPGRADE_FSM_INIT");

    // No backup yet: a warning; without skip_warnings nothing starts.
    let (status, refused) = post(&api, "/api/upgrade", json!({"image_ref": name(&v222), "system": true}));
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["status_code"], "UPGRADE_PRE_CHECK_WARNING");
    assert_eq!(failing(&refused), ["SYSERR_CHECK_BACKUP"]);
    assert_eq!(node(&api, "cluster-0-1")["state"]["state"], "UPGRADE_PRE_CHECK_WARNING");
    assert_eq!(get(&api, "/api/cluster/version")["Version"], "30.2.1");

    // Errors block even with skip_warnings: an older image; an unreachable SE.
    let (status, older) =
        post(&api, "/api/upgrade", json!({"image_ref": name(&old), "system": true, "skip_warnings": true}));
    assert_eq!((status, older["status_code"].as_str()), (400, Some("UPGRADE_PRE_CHECK_ERROR")), "{older}");
    assert!(failing(&older).contains(&"SYSERR_CHECK_VERSION_COMPATIBILITY".to_string()), "{older}");
    fleet.agents[5].kill9();
    wait_for("g3 down", Duration::from_secs(10), || se_by_name(&api, "g3").filter(|s| state(s) == "OPER_DOWN"));
    let (status, unreachable) =
        post(&api, "/api/upgrade", json!({"image_ref": name(&v222), "system": true, "skip_warnings": true}));
    assert_eq!(status, 400);
    assert!(failing(&unreachable).contains(&"SYSERR_CHECK_SE_REACHABILITY".to_string()), "{unreachable}");
    fleet.agents[5] = Agent::start(&c, None, &fleet.dir("g3"), "g3", &[]);
    wait_for("g3 up", Duration::from_secs(10), || se_by_name(&api, "g3").filter(|s| state(s) == "OPER_UP"));
    assert_eq!(versions(&api, &ALL), vec!["30.2.1-9001"; 6], "nothing changed");

    // The system upgrade through the shell, with skip_warnings; d2 fails its new version's health
    // check, so Default-Group suspends (the default action), G2 completes.
    fs::write(fleet.dir("d2").join("fail-health"), b"").unwrap();
    let (out, _) = shell(&c, &format!("upgrade system image_ref {} skip_warnings", name(&v222)));
    for expected in [
        "SYSERR_UPGRADE_OPS_PREVIEW_RESPONSE",
        "Check Controller Cluster readiness",
        "Starting upgrade",
        "SYSERR_UPGRADE_SYSTEM_STARTED",
    ] {
        assert!(out.contains(expected), "{expected} missing:\n{out}");
    }
    let after = settled(&api);
    let by_name = |n: &str| after.iter().find(|x| x["name"] == n).unwrap().clone();
    assert_eq!(by_name("cluster-0-1")["state"]["state"], "UPGRADE_FSM_COMPLETED");
    assert_eq!(get(&api, "/api/cluster/version")["Version"], "30.2.2", "the controller restarted into the new version");
    let default = by_name("Default-Group");
    assert_eq!(default["state"]["state"], "UPGRADE_FSM_SUSPENDED", "{default}");
    assert_eq!(default["seg_status"]["se_upgrade_failed"], json!(["d2"]));
    assert!(default["seg_status"]["se_upgrade_errors"][0]["reason"][0].as_str().unwrap().contains("told to fail"));
    assert_eq!(by_name("G2")["state"]["state"], "UPGRADE_FSM_COMPLETED");
    let (table, _) = shell(&c, "show upgrade status");
    assert!(table.contains("UPGRADE_FSM_SUSPENDED") && table.contains("| Default-Group "), "{table}");

    // Resume: d2 is tried again (no longer told to fail) and the rest of the group follows.
    fs::remove_file(fleet.dir("d2").join("fail-health")).unwrap();
    let (status, resumed) = post(
        &api,
        "/api/segroup/resume",
        json!({"se_group_refs": ["/api/serviceenginegroup?name=Default-Group"], "skip_warnings": true}),
    );
    assert_eq!(status, 200, "{resumed}");
    let after = settled(&api);
    let default = after.iter().find(|x| x["name"] == "Default-Group").unwrap();
    assert_eq!(default["state"]["state"], "UPGRADE_FSM_COMPLETED", "{default}");
    assert_eq!(default["progress"], 100);
    assert_eq!(versions(&api, &ALL), vec!["30.2.2-9100"; 6], "every version changed");
    for n in after.iter().filter(|n| n["node_type"] == "NODE_SE_GROUP") {
        assert_eq!(n["seg_status"]["num_vs_disrupted"], 0, "non-disruptive: virtual services moved first: {n}");
    }

    // The controller alone, then G2 alone: groups end on different versions.
    let (status, started) = post(&api, "/api/upgrade", json!({"image_ref": name(&v223), "skip_warnings": true}));
    assert_eq!(
        (status, started["status_code"].as_str()),
        (200, Some("SYSERR_UPGRADE_CONTROLLER_STARTED")),
        "{started}"
    );
    settled(&api);
    assert_eq!(get(&api, "/api/cluster/version")["Version"], "30.2.3");
    assert_eq!(versions(&api, &ALL), vec!["30.2.2-9100"; 6]);
    let (status, started) = post(
        &api,
        "/api/upgrade",
        json!({"image_ref": name(&v223), "se_group_refs": ["/api/serviceenginegroup?name=G2"], "skip_warnings": true}),
    );
    assert_eq!((status, started["status_code"].as_str()), (200, Some("SYSERR_UPGRADE_SEGROUP_STARTED")), "{started}");
    let after = settled(&api);
    assert_eq!(versions(&api, &["d1", "d2", "d3"]), vec!["30.2.2-9100"; 3]);
    assert_eq!(versions(&api, &["g1", "g2", "g3"]), vec!["30.2.3-9200"; 3]);
    let g2 = after.iter().find(|x| x["name"] == "G2").unwrap();
    assert_eq!((g2["version"].as_str(), g2["previous_version"].as_str()), (Some("30.2.3-9200"), Some("30.2.2-9100")));

    // A patch of the controller, through the shell; then its rollback.
    let (out, _) = shell(&c, &format!("patch controller controller_patch_ref {} skip_warnings", name(&patch)));
    assert!(out.contains("SYSERR_PATCH_CONTROLLER_STARTED"), "{out}");
    settled(&api);
    let version = get(&api, "/api/cluster/version");
    assert_eq!((version["Version"].as_str(), version["patch"].as_str()), (Some("30.2.3"), Some("2p1")));
    let (status, started) = post(&api, "/api/rollbackpatch", json!({"skip_warnings": true}));
    assert_eq!(
        (status, started["status_code"].as_str()),
        (200, Some("SYSERR_ROLLBACKPATCH_CONTROLLER_STARTED")),
        "{started}"
    );
    settled(&api);
    let version = get(&api, "/api/cluster/version");
    assert_eq!((version["Version"].as_str(), version.get("patch")), (Some("30.2.3"), None));

    // Rollback of G2 to the version it ran before.
    let (status, started) = post(
        &api,
        "/api/rollback",
        json!({"se_group_refs": ["/api/serviceenginegroup?name=G2"], "skip_warnings": true}),
    );
    assert_eq!((status, started["status_code"].as_str()), (200, Some("SYSERR_ROLLBACK_SEGROUP_STARTED")), "{started}");
    let after = settled(&api);
    assert_eq!(versions(&api, &["g1", "g2", "g3"]), vec!["30.2.2-9100"; 3]);
    let g2 = after.iter().find(|x| x["name"] == "G2").unwrap();
    let history: Vec<&str> = g2["history"].as_array().unwrap().iter().map(|h| h["ops"].as_str().unwrap()).collect();
    assert_eq!(&history[..3], ["ROLLBACK", "UPGRADE", "UPGRADE"], "{history:?}");

    // An SE patch for the release G2 runs again, through the shell; then its rollback.
    let se_patch = upload(&api, &pkgs.build("sp.pkg", "se_patch", "30.2.2", "9100", &[])).json();
    let (out, _) = shell(&c, &format!("patch segroup se_patch_ref {} se_group_refs G2 skip_warnings", name(&se_patch)));
    assert!(out.contains("SYSERR_PATCH_SEGROUP_STARTED"), "{out}");
    settled(&api);
    let patched: Vec<Value> = ["g1", "g2", "g3"].iter().map(|n| se_by_name(&api, n).unwrap()).collect();
    assert!(patched.iter().all(|s| s["patch_version"] == "2p1" && s["version"] == "30.2.2"), "{patched:?}");
    assert!(versions(&api, &["d1", "d2", "d3"]).iter().all(|v| v == "30.2.2-9100"), "Default-Group untouched");
    let (status, started) = post(
        &api,
        "/api/rollbackpatch",
        json!({"se_group_refs": ["/api/serviceenginegroup?name=G2"], "skip_warnings": true}),
    );
    assert_eq!(
        (status, started["status_code"].as_str()),
        (200, Some("SYSERR_ROLLBACKPATCH_SEGROUP_STARTED")),
        "{started}"
    );
    settled(&api);
    assert!(["g1", "g2", "g3"].iter().all(|n| se_by_name(&api, n).unwrap().get("patch_version").is_none()));
    let summary = get(&api, "/api/upgradestatussummary");
    assert_eq!(summary["count"], 3);
    let (detail, _) = shell(&c, "show upgrade status detail");
    assert!(detail.contains("NODE_SE_GROUP") && detail.contains("seg_status"), "{detail}");

    // Default-Group to the controller's version with CONTINUE_UPGRADE_OPS_ON_ERROR: d1 fails its
    // health check, the group goes on with d2 and d3 and ends in error with d1 on its old version.
    fs::write(fleet.dir("d1").join("fail-health"), b"").unwrap();
    let (status, started) = post(
        &api,
        "/api/upgrade",
        json!({"image_ref": name(&v223), "se_group_refs": ["/api/serviceenginegroup?name=Default-Group"],
               "skip_warnings": true, "se_group_options": {"action_on_error": "CONTINUE_UPGRADE_OPS_ON_ERROR"}}),
    );
    assert_eq!((status, started["status_code"].as_str()), (200, Some("SYSERR_UPGRADE_SEGROUP_STARTED")), "{started}");
    let after = settled(&api);
    let default = after.iter().find(|x| x["name"] == "Default-Group").unwrap();
    assert_eq!(default["state"]["state"], "UPGRADE_FSM_ERROR", "{default}");
    assert_eq!(default["seg_status"]["se_upgrade_failed"], json!(["d1"]), "{default}");
    let mut completed: Vec<&str> =
        default["seg_status"]["se_upgrade_completed"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    completed.sort();
    assert_eq!(completed, ["d2", "d3"], "{default}");
    // d1 switches back by itself after its failed check and reports its old version when it is
    // up again, which may be after the operation has recorded the failure and finished.
    wait_for("d1 back on its old version", Duration::from_secs(60), || {
        (versions(&api, &["d1", "d2", "d3"]) == ["30.2.2-9100", "30.2.3-9200", "30.2.3-9200"]).then_some(())
    });
}

/// A package whose controller payload is large enough that its copy-and-verify step can be
/// caught in the middle.
fn big_controller_package(pkgs: &Packages) -> std::path::PathBuf {
    let dir = pkgs.path("big-controller");
    fs::create_dir_all(dir.join("lib")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out = fs::File::create(dir.join("lib/blob")).unwrap();
    for _ in 0..400 {
        for b in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        std::io::Write::write_all(&mut out, &block).unwrap();
    }
    let se = pkgs.path("slow-se");
    fs::create_dir_all(se.join("hooks")).unwrap();
    fs::write(se.join("hooks/health-check"), "#!/bin/sh\nsleep 3\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(se.join("hooks/health-check"), fs::Permissions::from_mode(0o755)).unwrap();
    pkgs.controller_package("big.pkg", "30.2.2", "9100", &dir, &se)
}

fn events_of(node: &Value) -> Vec<(String, Option<bool>)> {
    node["upgrade_events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["task_name"].as_str().unwrap().to_string(), e["sub_events"][0]["status"].as_bool()))
        .collect()
}

#[test]
fn kill_9_of_the_controller_in_its_own_step_and_in_the_se_step_and_the_upgrade_completes() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let listen = free_listen();
    let launch = || Launch { args: ENGINE_ARGS, listen: &listen, ..Launch::plain(data.path()) };
    let c = try_start(launch()).expect("starts");
    let api = c.admin();
    let (_, t) = token(&api, "Default-Group");
    let work = temp_dir();
    let _agents: Vec<Agent> = (1..=2)
        .map(|i| Agent::start(&c, Some(&t), &work.path().join(format!("s{i}")), &format!("s{i}"), &[]))
        .collect();
    for n in ["s1", "s2"] {
        wait_for("SEs up", Duration::from_secs(30), || se_by_name(&api, n).filter(|s| state(s) == "OPER_UP"));
    }
    let image = upload(&api, &big_controller_package(&pkgs)).json();
    assert_eq!(post(&api, "/api/configuration/backup", json!({})).0, 201);
    let (status, started) = post(&api, "/api/upgrade", json!({"image_ref": image["uuid"], "system": true}));
    assert_eq!(status, 200, "{started}");

    // In the middle of the controller's copy-and-verify step: configuration is closed; kill -9.
    wait_for("the controller step under way", Duration::from_secs(20), || {
        let events = events_of(&node(&api, "cluster-0-1"));
        events.iter().any(|(task, status)| task == "COPY_AND_VERIFY_IMAGE" && status.is_none()).then_some(())
    });
    let refused = api.try_send("POST", "/api/pool", &json!({"name": "during-upgrade"})).unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.error(), "Configuration is disallowed during upgrade");
    c.kill9();
    let c = try_start(launch()).expect("restarts");
    let api = c.admin();
    // The step runs again and the controller moves on: its restart into the new slot, then the SEs.
    wait_for("the controller part done", Duration::from_secs(60), || {
        (node(&api, "cluster-0-1")["state"]["state"] == "UPGRADE_FSM_COMPLETED").then_some(())
    });
    let events = events_of(&node(&api, "cluster-0-1"));
    assert_eq!(events.iter().filter(|(t, _)| t == "COPY_AND_VERIFY_IMAGE").count(), 1, "{events:?}");
    assert!(events.iter().all(|(_, s)| *s == Some(true)), "{events:?}");
    assert_eq!(get(&api, "/api/cluster/version")["Version"], "30.2.2");

    // In the middle of an SE's install (its health check takes 3 s): kill -9 again.
    wait_for("an SE installing", Duration::from_secs(30), || {
        let g = node(&api, "Default-Group");
        g["seg_status"]["se_upgrade_in_progress"].as_array().is_some_and(|a| !a.is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    c.kill9();
    let c = try_start(launch()).expect("restarts again");
    let api = c.admin();
    let after = settled(&api);
    let group = after.iter().find(|n| n["name"] == "Default-Group").unwrap();
    assert_eq!(group["state"]["state"], "UPGRADE_FSM_COMPLETED", "{group}");
    assert_eq!(versions(&api, &["s1", "s2"]), vec!["30.2.2-9100"; 2]);
    // Nothing is left in progress, and configuration is open again.
    assert_eq!(api.post("/api/pool", &json!({"name": "after-upgrade"})).status, 201);
}

#[test]
fn an_se_that_never_comes_back_fails_after_the_timeout_and_the_group_rolls_back() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let listen = free_listen();
    let c = try_start(Launch { args: ENGINE_ARGS, listen: &listen, ..Launch::plain(data.path()) }).expect("starts");
    let api = c.admin();
    let r = api.send("PATCH", "/api/controllerproperties", Some(br#"{"replace": {"upgrade_se_timeout": 10}}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, t) = token(&api, "Default-Group");
    let work = temp_dir();
    let mut agents: Vec<(String, Agent)> = ["s1", "s2"]
        .iter()
        .map(|n| (n.to_string(), Agent::start(&c, Some(&t), &work.path().join(n), n, &[])))
        .collect();
    for n in ["s1", "s2"] {
        wait_for("SEs up", Duration::from_secs(30), || se_by_name(&api, n).filter(|s| state(s) == "OPER_UP"));
    }
    let slow = [("etc/release", "slow\n"), ("hooks/health-check", "#!/bin/sh\nsleep 2\n")];
    let image = upload(&api, &pkgs.with_se("slow.pkg", "30.2.2", "9100", &slow)).json();
    let (status, started) = post(
        &api,
        "/api/upgrade",
        json!({"image_ref": image["uuid"], "se_group_refs": ["/api/serviceenginegroup?name=Default-Group"],
               "skip_warnings": true, "se_group_options": {"action_on_error": "ROLLBACK_UPGRADE_OPS_ON_ERROR"}}),
    );
    // SEs may not run past the controller: the controller goes first.
    assert_eq!(status, 400, "{started}");
    let (status, started) = post(&api, "/api/upgrade", json!({"image_ref": image["uuid"], "skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    settled(&api);
    let (status, started) = post(
        &api,
        "/api/upgrade",
        json!({"image_ref": image["uuid"], "se_group_refs": ["/api/serviceenginegroup?name=Default-Group"],
               "skip_warnings": true, "se_group_options": {"action_on_error": "ROLLBACK_UPGRADE_OPS_ON_ERROR"}}),
    );
    assert_eq!(status, 200, "{started}");
    // The second SE dies in the middle of its install and never comes back.
    let victim = wait_for("one SE done, the other installing", Duration::from_secs(30), || {
        let g = node(&api, "Default-Group");
        let done = g["seg_status"]["se_upgrade_completed"].as_array().map_or(0, Vec::len);
        let running = g["seg_status"]["se_upgrade_in_progress"][0].as_str().map(String::from);
        running.filter(|_| done == 1)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (_, agent) = agents.iter_mut().find(|(n, _)| *n == victim).unwrap();
    agent.kill9();
    let group = wait_for("the group to give up and roll back", Duration::from_secs(60), || {
        let g = node(&api, "Default-Group");
        (g["state"]["state"] == "UPGRADE_FSM_ERROR").then_some(g)
    });
    assert_eq!(group["seg_status"]["se_upgrade_failed"], json!([victim]));
    assert!(
        group["seg_status"]["se_upgrade_errors"][0]["reason"][0].as_str().unwrap().contains("did not come back"),
        "{group}"
    );
    let survivor = if victim == "s1" { "s2" } else { "s1" };
    assert_eq!(group["seg_status"]["se_upgrade_completed"], json!([survivor]), "rolled back, counted as done");
    assert_eq!(versions(&api, &[survivor]), ["30.2.1-9001"], "the upgraded SE was rolled back");
}

/// A controller whose active slot runs `version`, as if installed from an image of it (the
/// slot record is what the controller reports and the checks read).
fn data_dir_running(pkgs: &Packages, version: &str) -> tempfile::TempDir {
    let data = pkgs.data_dir();
    fs::create_dir_all(data.path().join("controller/slots/a")).unwrap();
    let tag = format!("{version}-9000-20200101.000000");
    let state = json!({"active": "a", "slots": {"a": {"version": version, "build": 9000, "tag": tag}}});
    fs::write(data.path().join("controller/state.json"), state.to_string()).unwrap();
    data
}

fn configuration_check(api: &Api, image: &Value) -> Value {
    let (status, preview) = post(api, "/api/upgrade/preview", json!({"image_ref": image["uuid"], "system": true}));
    assert_eq!(status, 200, "{preview}");
    preview["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check_code"] == "SYSERR_CONFIGURATION_CHECK")
        .unwrap()
        .clone()
}

#[test]
fn the_systemd_note_warns_from_18_to_22_1_naming_node_and_file_and_not_from_21_1() {
    let pkgs = Packages::new();
    for (running, warns) in [("18.2.3", true), ("21.1.1", false)] {
        let data = data_dir_running(&pkgs, running);
        let conf = data.path().join("system.conf");
        fs::write(&conf, "[Manager]\nDefaultTimeoutStartSec=90s\n").unwrap();
        let conf_path = conf.to_str().unwrap().to_string();
        let env = [("FULCRUM_SYSTEMD_CONF", conf_path.as_str())];
        let c = try_start(Launch { env: &env, ..Launch::plain(data.path()) }).expect("starts");
        let api = c.admin();
        assert_eq!(get(&api, "/api/cluster/version")["Version"], running);
        let image = upload(
            &api,
            &pkgs.build(
                &format!("to-22-from-{running}.pkg"),
                "controller",
                "22.1.3",
                "9300",
                &["--min-version", "18.1.1"],
            ),
        )
        .json();
        let check = configuration_check(&api, &image);
        if !warns {
            assert_eq!(check["state"], "UPGRADE_PRE_CHECK_SUCCESS", "{check}");
            continue;
        }
        assert_eq!(check["state"], "UPGRADE_PRE_CHECK_WARNING", "{check}");
        let detail = check["details"][0].as_str().unwrap();
        assert!(detail.contains("'127.0.0.1'") && detail.contains(&conf_path) && detail.contains("90 s"), "{detail}");
        // Raised as the document says: read again at the next preview, no restart.
        fs::write(&conf, "[Manager]\nDefaultTimeoutStartSec=120s\n").unwrap();
        assert_eq!(configuration_check(&api, &image)["state"], "UPGRADE_PRE_CHECK_SUCCESS");
    }
}
