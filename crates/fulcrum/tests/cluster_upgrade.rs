//! Upgrading a three-node controller cluster on a real etcd, with real SE agents: every node
//! installs into its own slot and restarts into it (followers first, the leader last, handing
//! its leadership over), the API is served throughout, and a leader killed during the
//! controller step or the SE step does not stop the operation.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::agents::{Agent, se_by_name, state, token, wait_for};
use common::cluster::node_with;
use common::etcd::Etcd;
use common::packages::{Packages, upload};
use common::upgrades::{get, post, settled, versions};
use common::{Api, Controller, temp_dir};
use serde_json::{Value, json};

const ENGINE_ARGS: &[&str] = &["--se-heartbeat-interval", "0.3", "--se-down-after", "3", "--se-health-timeout", "20"];
const NAMES: [&str; 3] = ["a", "b", "c"];

struct Cluster {
    pkgs: Packages,
    etcd: Etcd,
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<Controller>>,
    agents: Vec<Agent>,
    _work: tempfile::TempDir,
}

impl Cluster {
    fn ip(i: usize) -> String {
        format!("127.0.0.{}", i + 1)
    }

    fn start_node(&mut self, i: usize) {
        self.nodes[i] = Some(node_with(self.dirs[i].path(), &self.etcd, NAMES[i], &Self::ip(i), ENGINE_ARGS, false));
    }

    fn apis(&self) -> Vec<Api> {
        self.nodes.iter().flatten().map(Controller::admin).collect()
    }

    fn api(&self, i: usize) -> Api {
        self.nodes[i].as_ref().unwrap().admin()
    }

    /// Which node leads, as the cluster runtime of any node says.
    fn leader(&self) -> usize {
        wait_for("a leader", Duration::from_secs(20), || {
            self.apis().iter().find_map(|api| {
                let runtime = api.try_send("GET", "/api/cluster/runtime", &Value::Null).ok()?.json();
                let leader = runtime["node_states"].as_array()?.iter().find(|n| n["role"] == "CLUSTER_LEADER")?.clone();
                NAMES.iter().position(|n| leader["name"] == *n)
            })
        })
    }
}

/// Three controllers (a leads: it starts first), and SE groups of real agents told of all
/// three: `groups` is (group, SE names).
fn cluster(groups: &[(&str, &[&str])]) -> Cluster {
    let pkgs = Packages::new();
    let etcd = Etcd::start(3);
    let dirs: Vec<_> = (0..3).map(|_| pkgs.data_dir()).collect();
    let mut c = Cluster { pkgs, etcd, dirs, nodes: vec![None, None, None], agents: vec![], _work: temp_dir() };
    c.start_node(0);
    let api = c.api(0);
    wait_for("a to lead", Duration::from_secs(30), || {
        api.try_post("/api/pool", &json!({"name": "first"})).ok().filter(|r| r.status == 201)
    });
    c.start_node(1);
    c.start_node(2);
    let controllers: Vec<String> = c.apis().iter().map(|a| a.base.clone()).collect();
    let controllers = controllers.join(",");
    for (group, ses) in groups {
        if *group != "Default-Group" {
            assert_eq!(api.post("/api/serviceenginegroup", &json!({"name": group})).status, 201);
        }
        let (_, t) = token(&api, group);
        for se in *ses {
            let dir = c._work.path().join(se);
            c.agents.push(Agent::start_at(&controllers, Some(&t), None, &dir, se, &[]));
        }
        for se in *ses {
            wait_for("SEs up", Duration::from_secs(30), || se_by_name(&api, se).filter(|s| state(s) == "OPER_UP"));
        }
        let r = api.post(
            "/api/virtualservice",
            &json!({"name": format!("vs-{group}"), "services": [{"port": 80}], "se_group_ref": format!("/api/serviceenginegroup?name={group}")}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    c
}

/// Uploads a controller image to the leader and waits until every node holds a verified copy.
fn image_everywhere(c: &Cluster, file: &str, version: &str, build: &str) -> String {
    let se = [("etc/release", "fulcrum se\n")];
    let leader = c.api(c.leader());
    let image = upload(&leader, &c.pkgs.with_se(file, version, build, &se)).json();
    let uuid = image["uuid"].as_str().unwrap().to_string();
    wait_for("the image on every node", Duration::from_secs(60), || {
        let states = get(&leader, &format!("/api/image/{uuid}"))["node_states"].clone();
        let states = states.as_array()?.clone();
        (states.len() == 3 && states.iter().all(|s| s["state"] == "IMAGE_FSM_COMPLETED")).then_some(())
    });
    image["name"].as_str().unwrap().to_string()
}

fn controller_status(api: &Api) -> Value {
    get(api, "/api/upgradestatusinfo/upgradestatusinfo-controller")
}

fn controller_state(api: &Api) -> String {
    controller_status(api)["state"]["state"].as_str().unwrap_or_default().to_string()
}

/// Every node's own version, as it says.
fn node_versions(c: &Cluster) -> Vec<String> {
    c.apis().iter().map(|api| get(api, "/api/cluster/version")["Version"].as_str().unwrap().to_string()).collect()
}

/// What a client reading through every node in turn saw while the controller step ran.
struct Reads {
    reads: usize,
    failed: usize,
    longest_gap: Duration,
    writes_refused: usize,
    /// Writes accepted while the controller step ran.
    writes_accepted: usize,
}

/// Reads `/api/cluster/runtime` and an object through each node in turn until `stop`; tries
/// a configuration write every so often.
fn read_through_every_node(apis: Vec<Api>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Reads> {
    std::thread::spawn(move || {
        let apis: Vec<Api> = apis.into_iter().map(|a| a.timeout(Duration::from_secs(2))).collect();
        let mut seen =
            Reads { reads: 0, failed: 0, longest_gap: Duration::ZERO, writes_refused: 0, writes_accepted: 0 };
        let mut failing_since: Option<Instant> = None;
        let started = Instant::now();
        for i in 0.. {
            if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(300) {
                break;
            }
            let api = &apis[i % apis.len()];
            let path = if i % 2 == 0 { "/api/cluster/runtime" } else { "/api/pool?name=first" };
            let ok = api.try_send("GET", path, &Value::Null).is_ok_and(|r| r.status == 200);
            seen.reads += 1;
            match (ok, failing_since) {
                (true, Some(since)) => {
                    seen.longest_gap = seen.longest_gap.max(since.elapsed());
                    failing_since = None;
                }
                (false, None) => {
                    seen.failed += 1;
                    failing_since = Some(Instant::now());
                }
                (false, Some(_)) => seen.failed += 1,
                (true, None) => {}
            }
            if i % 25 == 0 {
                match api.try_post("/api/pool", &json!({"name": format!("during-{i}")})) {
                    Ok(r) if r.status == 403 && r.body.contains("Configuration is disallowed during upgrade") => {
                        seen.writes_refused += 1
                    }
                    // Accepted while the controller step still ran (it says so after the write).
                    Ok(r) if r.status < 300 => {
                        let path = "/api/upgradestatusinfo/upgradestatusinfo-controller";
                        let after = api.try_send("GET", path, &Value::Null).map(|r| r.json());
                        if after.is_ok_and(|s| s["state"]["state"] == "UPGRADE_FSM_IN_PROGRESS") {
                            seen.writes_accepted += 1;
                        }
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(since) = failing_since {
            seen.longest_gap = seen.longest_gap.max(since.elapsed());
        }
        seen
    })
}

#[test]
fn upgrade_system_through_the_shell_takes_every_node_and_se_to_the_new_version_serving_throughout() {
    let mut c = cluster(&[("Default-Group", &["d1", "d2"]), ("G2", &["g1", "g2"])]);
    let name = image_everywhere(&c, "v222.pkg", "30.2.2", "9100");
    let leader = c.leader();
    let follower = (leader + 1) % 3;

    // The reader watches the controller step from the moment the operation has started.
    let (out, _) =
        common::shell(c.nodes[follower].as_ref().unwrap(), &format!("upgrade system image_ref {name} skip_warnings"));
    assert!(out.contains("SYSERR_UPGRADE_SYSTEM_STARTED"), "{out}");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = read_through_every_node(c.apis(), stop.clone());
    let api = c.api(follower);
    let ended = wait_for("the controller step to end", Duration::from_secs(180), || {
        let state = controller_state(&api);
        (state != "UPGRADE_FSM_IN_PROGRESS").then_some(state)
    });
    assert_eq!(ended, "UPGRADE_FSM_COMPLETED", "{}", controller_status(&api));
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    println!(
        "controller step: {} reads through the three nodes, {} failed, longest run of failed reads {:?}; \
         {} configuration writes refused with 403, {} accepted",
        reads.reads, reads.failed, reads.longest_gap, reads.writes_refused, reads.writes_accepted
    );
    assert!(reads.longest_gap <= Duration::from_secs(2), "reads failed for {:?} in a row", reads.longest_gap);
    assert!(reads.writes_refused > 0 && reads.writes_accepted == 0, "writes are refused during the controller step");

    let after = settled(&api);
    let status = controller_status(&api);
    assert_eq!(status["state"]["state"], "UPGRADE_FSM_COMPLETED", "{status}");
    for n in after.iter().filter(|n| n["node_type"] == "NODE_SE_GROUP") {
        assert_eq!(n["state"]["state"], "UPGRADE_FSM_COMPLETED", "{n}");
    }
    assert_eq!(node_versions(&c), ["30.2.2"; 3], "every controller node runs the new version");
    assert_eq!(versions(&api, &["d1", "d2", "g1", "g2"]), vec!["30.2.2-9100"; 4], "every SE too");
    // Each node's progress and its share of each step.
    let nodes = status["controller_nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status}");
    assert!(nodes.iter().all(|n| n["state"] == "UPGRADE_FSM_COMPLETED" && n["progress"] == 100), "{status}");
    let restarts: Vec<&Value> = status["upgrade_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["task_name"] == "START_PRIMARY_CONTROLLER")
        .collect();
    let restarted: Vec<&str> =
        restarts[0]["nodes_events"].as_array().unwrap().iter().map(|e| e["ip"]["addr"].as_str().unwrap()).collect();
    assert_eq!(restarted.len(), 3, "{status}");
    let old_leader_ip = Cluster::ip(leader);
    let old_leader_event = restarts[0]["nodes_events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"]["addr"] == old_leader_ip.as_str())
        .unwrap();
    for e in
        restarts[0]["nodes_events"].as_array().unwrap().iter().filter(|e| e["ip"]["addr"] != old_leader_ip.as_str())
    {
        assert!(
            e["end_time"].as_str().unwrap() <= old_leader_event["start_time"].as_str().unwrap(),
            "followers first: {status}"
        );
    }
    assert_ne!(c.leader(), leader, "the leader handed its leadership over before its restart");
    c.agents.clear();
}

/// Waits until the operation's controller part is at `task` on some node; answers the node.
fn wait_for_step(api: &Api, task: &str) -> String {
    wait_for(&format!("the controller at {task}"), Duration::from_secs(120), || {
        let status = controller_status(api);
        status["controller_nodes"].as_array()?.iter().find_map(|n| {
            n["events"]
                .as_array()?
                .iter()
                .any(|e| e["task_name"] == task)
                .then(|| n["name"].as_str().unwrap().to_string())
        })
    })
}

#[test]
fn a_leader_killed_in_the_controller_step_and_in_the_se_step_does_not_stop_the_upgrade() {
    let mut c = cluster(&[("Default-Group", &["d1", "d2"])]);
    let v222 = image_everywhere(&c, "v222.pkg", "30.2.2", "9100");
    let first = c.leader();
    let api = c.api((first + 1) % 3);
    let (status, started) =
        post(&api, "/api/upgrade", json!({"image_ref": v222, "system": true, "skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    // Once a follower restarts, the leader dies; a supervisor starts it again a moment later.
    wait_for_step(&api, "START_PRIMARY_CONTROLLER");
    c.nodes[first].take().unwrap().kill9();
    assert_eq!(controller_state(&api), "UPGRADE_FSM_IN_PROGRESS", "killed during the controller step");
    std::thread::sleep(Duration::from_secs(1));
    c.start_node(first);
    let after = settled(&api);
    let controller = after.iter().find(|n| n["node_type"] == "NODE_CONTROLLER_CLUSTER").unwrap();
    assert_eq!(controller["state"]["state"], "UPGRADE_FSM_COMPLETED", "{controller}");
    assert_eq!(node_versions(&c), ["30.2.2"; 3]);
    assert_eq!(versions(&api, &["d1", "d2"]), vec!["30.2.2-9100"; 2]);

    // Again, the leader dies while the SEs upgrade.
    let v223 = image_everywhere(&c, "v223.pkg", "30.2.3", "9200");
    let (status, started) =
        post(&api, "/api/upgrade", json!({"image_ref": v223, "system": true, "skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    wait_for("the SE step", Duration::from_secs(180), || {
        let group = get(&api, "/api/upgradestatusinfo?name=Default-Group")["results"][0].clone();
        (group["state"]["state"] == "UPGRADE_FSM_IN_PROGRESS").then_some(())
    });
    let second = c.leader();
    let api = c.api((second + 1) % 3);
    c.nodes[second].take().unwrap().kill9();
    let group = get(&api, "/api/upgradestatusinfo?name=Default-Group")["results"][0].clone();
    assert_eq!(group["state"]["state"], "UPGRADE_FSM_IN_PROGRESS", "killed during the SE step: {group}");
    std::thread::sleep(Duration::from_secs(1));
    c.start_node(second);
    let after = settled(&api);
    for n in &after {
        assert_eq!(n["state"]["state"], "UPGRADE_FSM_COMPLETED", "{n}");
    }
    assert_eq!(node_versions(&c), ["30.2.3"; 3]);
    assert_eq!(versions(&api, &["d1", "d2"]), vec!["30.2.3-9200"; 2]);

    // A controller patch through the shell reaches every node, and so does its rollback.
    let leader = c.api(c.leader());
    let patch = upload(&leader, &c.pkgs.build("p.pkg", "controller_patch", "30.2.3", "9200", &[])).json();
    let patch_uuid = patch["uuid"].as_str().unwrap().to_string();
    wait_for("the patch on every node", Duration::from_secs(60), || {
        let states = get(&leader, &format!("/api/image/{patch_uuid}"))["node_states"].clone();
        (states.as_array()?.iter().filter(|s| s["state"] == "IMAGE_FSM_COMPLETED").count() == 3).then_some(())
    });
    let follower = (c.leader() + 1) % 3;
    let (out, _) = common::shell(
        c.nodes[follower].as_ref().unwrap(),
        &format!("patch controller controller_patch_ref {} skip_warnings", patch["name"].as_str().unwrap()),
    );
    assert!(out.contains("SYSERR_PATCH_CONTROLLER_STARTED"), "{out}");
    settled(&api);
    let patches = |c: &Cluster| -> Vec<Value> {
        c.apis()
            .iter()
            .map(|api| get(api, "/api/cluster/version").get("patch").cloned().unwrap_or(Value::Null))
            .collect()
    };
    assert_eq!(patches(&c), vec![json!("2p1"); 3], "every node runs the patch");
    let (status, started) = post(&api, "/api/rollbackpatch", json!({"skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    settled(&api);
    assert_eq!(patches(&c), vec![Value::Null; 3], "every node is back without it");
    assert_eq!(node_versions(&c), ["30.2.3"; 3]);
    c.agents.clear();
}

#[test]
fn a_node_that_does_not_come_back_stops_the_operation_and_says_which() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = cluster(&[]);
    let api = c.api(0);
    let mut properties = get(&api, "/api/controllerproperties");
    properties["upgrade_controller_node_timeout"] = json!(10);
    assert_eq!(api.put("/api/controllerproperties", &properties).status, 200);
    // A controller payload whose program exits at once: a node restarting into it is gone.
    let payload = c.pkgs.path("broken-controller");
    std::fs::create_dir_all(payload.join("bin")).unwrap();
    std::fs::write(payload.join("bin/fulcrum"), "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(payload.join("bin/fulcrum"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let package = c.pkgs.controller_package("broken.pkg", "30.2.2", "9100", &payload, &c.pkgs.path("se"));
    let image = upload(&api, &package).json();
    let uuid = image["uuid"].as_str().unwrap().to_string();
    wait_for("the image on every node", Duration::from_secs(60), || {
        let states = get(&api, &format!("/api/image/{uuid}"))["node_states"].clone();
        (states.as_array()?.iter().filter(|s| s["state"] == "IMAGE_FSM_COMPLETED").count() == 3).then_some(())
    });
    let (status, started) = post(&api, "/api/upgrade", json!({"image_ref": image["name"], "skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    let ended = wait_for("the controller step to end", Duration::from_secs(60), || {
        let status = controller_status(&api);
        (status["state"]["state"] != "UPGRADE_FSM_IN_PROGRESS").then_some(status)
    });
    // b, the first follower, never came back: the operation stops there and names it.
    assert_eq!(ended["state"]["state"], "UPGRADE_FSM_ERROR", "{ended}");
    let reason = ended["state"]["reason"].as_str().unwrap();
    assert!(reason.contains("controller node b") && reason.contains("did not come back on 30.2.2"), "{reason}");
    let b = ended["controller_nodes"].as_array().unwrap().iter().find(|n| n["name"] == "b").unwrap().clone();
    assert_eq!(b["state"], "UPGRADE_FSM_ERROR", "{ended}");
    c.nodes[1] = None;
    // The others were not touched, and configuration is open again.
    assert_eq!(node_versions(&c), ["30.2.1"; 2]);
    assert_eq!(api.post("/api/pool", &json!({"name": "after"})).status, 201);
}
