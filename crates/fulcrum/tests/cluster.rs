//! Controllers on a real etcd: the store lives there, one node leads (fenced), every node
//! serves the API (reads from its own catalogue, consistent; writes passed to the leader), and
//! another node takes over when the leader dies, with everything acknowledged.

mod common;

use std::time::{Duration, Instant};

use common::cluster::node_with;
use common::etcd::Etcd;
use common::{Api, Controller, temp_dir};
use serde_json::{Value, json};

/// A controller of the cluster on `etcd` (lease TTL 2 s).
fn node(data: &std::path::Path, etcd: &Etcd, name: &str) -> Controller {
    node_at(data, etcd, name, "127.0.0.1")
}

/// A controller with an address of its own, as each node of a real cluster has.
fn node_at(data: &std::path::Path, etcd: &Etcd, name: &str, ip: &str) -> Controller {
    node_with(data, etcd, name, ip, &[], false)
}

/// Controllers a, b and c at 127.0.0.1, .2 and .3, one per data dir (kept as options, so a
/// test can take one out to kill it).
fn three_nodes(etcd: &Etcd, dirs: &[&std::path::Path], extra: &[&str], https: bool) -> Vec<Option<Controller>> {
    ["a", "b", "c"]
        .iter()
        .zip(dirs)
        .enumerate()
        .map(|(i, (name, dir))| Some(node_with(dir, etcd, name, &format!("127.0.0.{}", i + 1), extra, https)))
        .collect()
}

fn paths(dirs: &[tempfile::TempDir]) -> Vec<&std::path::Path> {
    dirs.iter().map(tempfile::TempDir::path).collect()
}

/// Retries a create until some leader acknowledges it (an election, or the first bootstrap,
/// may be under way); how long that took.
fn create_when_led(api: &Api, body: &Value, within: Duration) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        match api.try_post("/api/pool", body) {
            Ok(r) if r.status == 201 => return (serde_json::from_str(&r.body).unwrap(), started.elapsed()),
            Ok(r) if [401, 503].contains(&r.status) => {}
            Ok(r) => panic!("{}: {}", r.status, r.body),
            Err(_) => {}
        }
        assert!(started.elapsed() < within, "no leader acknowledged a write within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pool_names(api: &Api) -> Vec<String> {
    api.object("/api/pool?page_size=200")["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_node_serves_writes_and_consistent_reads_and_uploads_go_to_the_leader() {
    let etcd = Etcd::start(3);
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    let nodes: Vec<Controller> = three_nodes(&etcd, &paths(&dirs), &[], false).into_iter().flatten().collect();
    let apis: Vec<Api> = nodes.iter().map(Controller::admin).collect();
    create_when_led(&apis[0], &json!({"name": "first"}), Duration::from_secs(30));
    // Writes through each node, each read at once through the next one.
    let mut followers = Vec::new();
    for i in 0..30 {
        let (write, read) = (&apis[i % 3], &apis[(i + 1) % 3]);
        let r = write.post("/api/pool", &json!({"name": format!("p{i}")}));
        assert_eq!(r.status, 201, "{}", r.body);
        if r.header("x-fulcrum-answered-by") == Some("leader") && !followers.contains(&(i % 3)) {
            followers.push(i % 3);
        }
        let url = r.json()["url"].as_str().unwrap().to_string();
        assert!(url.starts_with(&write.base), "the answer names the node asked, {}: {url}", write.base);
        let uuid = r.json()["uuid"].as_str().unwrap().to_string();
        let got = read.get(&format!("/api/pool/{uuid}"));
        assert_eq!(got.status, 200, "a write through node {} read through node {}: {}", i % 3, (i + 1) % 3, got.body);
        let patch = json!({"add": {"servers": [{"ip": {"addr": format!("10.0.0.{i}"), "type": "V4"}}]}});
        let r = read.send("PATCH", &format!("/api/pool/{uuid}"), Some(patch.to_string().as_bytes()));
        assert_eq!(r.status, 200, "{}", r.body);
        let seen = apis[(i + 2) % 3].object(&format!("/api/pool/{uuid}"));
        assert_eq!(seen["servers"][0]["ip"]["addr"], format!("10.0.0.{i}"), "{seen}");
    }
    assert_eq!(followers.len(), 2, "two of the three nodes passed writes on: {followers:?}");
    for api in &apis {
        assert_eq!(pool_names(api).len(), 31);
        // Every node serves the web UI, whose requests then go to that node's API.
        let page = api.get("/");
        assert_eq!(page.status, 200);
        assert!(page.body.contains("/ui/js/main.js"));
        // So does the account (and what it may do) the UI asks about first.
        assert_eq!(api.get("/api/useraccount").json()["privileges"][0]["resource"], "*");
    }
    // An image upload on a follower is refused, naming the leader.
    let follower = &apis[followers[0]];
    let r = common::packages::upload_bytes(follower, b"not even a package");
    assert_eq!(r.status, 421, "{}", r.body);
    assert!(r.error().contains("leader, at http://127.0.0."), "{}", r.error());
    // A delete through a follower is gone everywhere.
    let victim = apis[0].object("/api/pool?name=p7")["results"][0]["uuid"].as_str().unwrap().to_string();
    assert_eq!(follower.delete(&format!("/api/pool/{victim}")).status, 204);
    for api in &apis {
        assert_eq!(api.get(&format!("/api/pool/{victim}")).status, 404);
    }

    // Every node tells the same cluster: three up, one leader.
    for api in &apis {
        let runtime = api.object("/api/cluster/runtime");
        assert_eq!(runtime["cluster_state"]["state"], "CLUSTER_UP_HA_ACTIVE", "{runtime}");
        let states = runtime["node_states"].as_array().unwrap();
        assert_eq!(states.len(), 3, "{runtime}");
        assert_eq!(states.iter().filter(|n| n["role"] == "CLUSTER_LEADER").count(), 1, "{runtime}");
        assert!(states.iter().all(|n| n["state"] == "CLUSTER_ACTIVE"), "{runtime}");
        let ips: Vec<&str> = states.iter().map(|n| n["mgmt_ip"].as_str().unwrap()).collect();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], "{runtime}");
    }
    // The cluster object lists the three controllers (the leader keeps it so), on every node,
    // and its nodes are not edited by hand.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cluster = loop {
        let cluster = apis[2].object("/api/cluster");
        if cluster["nodes"].as_array().map(Vec::len) == Some(3) {
            break cluster;
        }
        assert!(Instant::now() < deadline, "the cluster object does not list three nodes: {cluster}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let listed: Vec<&str> = cluster["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(listed, ["a", "b", "c"], "{cluster}");
    assert_eq!(cluster["nodes"][1]["ip"]["addr"], "127.0.0.2", "{cluster}");
    let mut edited = cluster.clone();
    edited["nodes"].as_array_mut().unwrap().pop();
    let r = apis[1].put("/api/cluster", &edited);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().contains("joined"), "{}", r.error());
    let mut renamed = cluster.clone();
    renamed["name"] = json!("prod-cluster");
    assert_eq!(apis[1].put("/api/cluster", &renamed).status, 200);
    for api in &apis {
        assert_eq!(api.object("/api/cluster")["name"], "prod-cluster");
        let status = Api::new(&api.base).get("/api/cluster/status");
        assert_eq!(status.json()["cluster_state"]["state"], "CLUSTER_UP_HA_ACTIVE", "{}", status.body);
    }
    let (shown, _) = common::shell(&nodes[followers[0]], "show cluster");
    assert!(shown.contains("CLUSTER_UP_HA_ACTIVE"), "{shown}");
    assert!(["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().all(|ip| shown.contains(ip)), "{shown}");
    assert_eq!(shown.matches("leader").count(), 1, "{shown}");

    // A follower dies: the others show it down and the cluster compromised.
    let mut nodes = nodes;
    let gone = nodes.remove(followers[0]);
    let gone_name = ["a", "b", "c"][followers[0]];
    gone.kill9();
    let survivor = nodes[0].admin();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let runtime = survivor.object("/api/cluster/runtime");
        if runtime["cluster_state"]["state"] == "CLUSTER_UP_HA_COMPROMISED" {
            let down: Vec<&Value> = runtime["node_states"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["state"] == "CLUSTER_INACTIVE")
                .collect();
            assert_eq!(down.len(), 1, "{runtime}");
            assert_eq!(down[0]["name"], gone_name, "{runtime}");
            break;
        }
        assert!(Instant::now() < deadline, "the dead node is still shown up: {runtime}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each node's copy of an image as its record says: node name → (state, the whole entry).
fn copies(api: &Api, uuid: &str) -> Vec<(String, String, Value)> {
    let image = common::upgrades::get(api, &format!("/api/image/{uuid}"));
    image["node_states"]
        .as_array()
        .map(|states| {
            states
                .iter()
                .map(|s| (s["node"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string(), s.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn copy_state(api: &Api, uuid: &str, node: &str) -> Option<(String, Value)> {
    copies(api, uuid).into_iter().find(|(n, _, _)| n == node).map(|(_, state, entry)| (state, entry))
}

/// One check of an upgrade's preview.
fn preview_check(api: &Api, image: &str, code: &str) -> Value {
    let (status, preview) =
        common::upgrades::post(api, "/api/upgrade/preview", json!({"image_ref": image, "system": true}));
    assert_eq!(status, 200, "{preview}");
    preview["checks"].as_array().unwrap().iter().find(|c| c["check_code"] == code).cloned().unwrap()
}

fn preview_copy_check(api: &Api, image: &str) -> Value {
    preview_check(api, image, "SYSERR_CHECK_IMAGE_AVAILABILITY")
}

#[test]
fn images_are_copied_to_every_node_repaired_checked_and_deleted_everywhere() {
    use common::agents::wait_for;
    use common::packages::{Packages, sha256_file, upload};
    let pkgs = Packages::new();
    let etcd = Etcd::start(3);
    // c does not trust the signing key at first: its copies fail verification.
    let dirs = [pkgs.data_dir(), pkgs.data_dir(), temp_dir()];
    let dir = |i: usize| dirs[i].path();
    // a starts alone, so it leads and takes the uploads.
    let mut nodes = vec![Some(node_at(dir(0), &etcd, "a", "127.0.0.1"))];
    let leader = nodes[0].as_ref().unwrap().admin();
    create_when_led(&leader, &json!({"name": "first"}), Duration::from_secs(30));
    nodes.push(Some(node_at(dir(1), &etcd, "b", "127.0.0.2")));
    nodes.push(Some(node_at(dir(2), &etcd, "c", "127.0.0.3")));
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    let first = pkgs.big_controller("v222.pkg", "30.2.2", "9100", 96);
    let size = std::fs::metadata(&first).unwrap().len();

    // The upload lands on a; b starts fetching it and is killed half-way.
    let image = upload(&leader, &first).json();
    let uuid = image["uuid"].as_str().unwrap().to_string();
    let name = image["name"].as_str().unwrap().to_string();
    let partial = dir(1).join(format!("images/replica/{uuid}.part"));
    let published = |i: usize| dir(i).join(format!("images/{uuid}.pkg"));
    let fetched = wait_for("b to start fetching", Duration::from_secs(20), || {
        std::fs::metadata(&partial).ok().map(|m| m.len()).filter(|n| *n > 0)
    });
    nodes[1].take().unwrap().kill9();
    let left = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(left > 0 && left < size, "b was killed mid-fetch: {fetched} then {left} of {size} bytes");
    assert!(!published(1).exists());
    // c fetches it and fails to verify it (an unknown key), and says so; a holds it.
    let (_, failed) = wait_for("c's copy to fail", Duration::from_secs(20), || {
        copy_state(&apis[0], &uuid, "c").filter(|(state, _)| state == "IMAGE_FSM_FAILED")
    });
    assert!(failed["reason"].as_str().unwrap().contains("verification"), "{failed}");
    assert_eq!(copy_state(&apis[0], &uuid, "a").unwrap().0, "IMAGE_FSM_COMPLETED");
    let (_, b) = wait_for("b shown down", Duration::from_secs(10), || {
        copy_state(&apis[0], &uuid, "b").filter(|(_, entry)| entry["up"] == false)
    });
    assert_ne!(b["state"], "IMAGE_FSM_COMPLETED", "{b}");
    // The shell on a follower shows each node's copy.
    let (shown, _) = common::shell(nodes[2].as_ref().unwrap(), "show image");
    assert!(shown.contains("Controller Nodes") && shown.contains("a ok") && shown.contains("c failed"), "{shown}");

    // The member-state precheck names the two nodes without a good copy, and blocks.
    let check = preview_copy_check(&apis[2], &name);
    assert_eq!(check["state"], "UPGRADE_PRE_CHECK_ERROR", "{check}");
    let details = check["details"].to_string();
    assert!(details.contains("node b") && details.contains("node c") && !details.contains("node a"), "{check}");
    // And the cluster is not ready while b is down.
    let ready = preview_check(&apis[2], &name, "SYSERR_CHECK_CLUSTER_STATE");
    assert_eq!(ready["state"], "UPGRADE_PRE_CHECK_ERROR", "{ready}");
    assert!(ready["details"].to_string().contains("b down"), "{ready}");

    // b comes back and resumes where it stopped; c is given the key and fetches it again.
    let restarted = Instant::now();
    nodes[1] = Some(node_at(dir(1), &etcd, "b", "127.0.0.2"));
    nodes[2].take().unwrap().terminate();
    std::fs::create_dir_all(dir(2).join("trusted-keys")).unwrap();
    std::fs::copy(pkgs.path("release.pub"), dir(2).join("trusted-keys/release.pub")).unwrap();
    nodes[2] = Some(node_at(dir(2), &etcd, "c", "127.0.0.3"));
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    wait_for("every node to hold the image", Duration::from_secs(60), || {
        let all = copies(&apis[1], &uuid);
        (all.len() == 3 && all.iter().all(|(_, state, _)| state == "IMAGE_FSM_COMPLETED")).then_some(())
    });
    println!("b and c caught up {:?} after their restart", restarted.elapsed());
    for i in 0..3 {
        assert_eq!(sha256_file(&published(i)), sha256_file(&first), "node {i}'s copy");
    }
    let check = preview_copy_check(&apis[1], &name);
    assert_eq!(check["state"], "UPGRADE_PRE_CHECK_SUCCESS", "{check}");
    let ready = preview_check(&apis[1], &name, "SYSERR_CHECK_CLUSTER_STATE");
    assert_eq!(ready["state"], "UPGRADE_PRE_CHECK_SUCCESS", "{ready}");

    // A second upload with every node up: how long until all three hold it.
    let second = pkgs.big_controller("v223.pkg", "30.2.3", "9200", 96);
    let sent = Instant::now();
    let image2 = upload(&apis[0], &second).json();
    let uploaded = sent.elapsed();
    let uuid2 = image2["uuid"].as_str().unwrap().to_string();
    wait_for("the second image on every node", Duration::from_secs(60), || {
        let all = copies(&apis[2], &uuid2);
        (all.len() == 3 && all.iter().all(|(_, state, _)| state == "IMAGE_FSM_COMPLETED")).then_some(())
    });
    let size2 = std::fs::metadata(&second).unwrap().len();
    println!(
        "replication: {size2} bytes uploaded in {uploaded:?}, COMPLETED on all three nodes {:?} after the upload began",
        sent.elapsed()
    );

    // A byte flipped in c's copy: detected, shown, replaced.
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(published(2)).unwrap();
        f.seek(SeekFrom::Start(size / 2)).unwrap();
        let mut byte = [0u8];
        f.read_exact(&mut byte).unwrap();
        f.seek(SeekFrom::Start(size / 2)).unwrap();
        f.write_all(&[byte[0] ^ 0x5a]).unwrap();
    }
    let repaired = wait_for("c's bad copy to be replaced", Duration::from_secs(60), || {
        copy_state(&apis[0], &uuid, "c").filter(|(state, entry)| {
            state == "IMAGE_FSM_COMPLETED"
                && entry["last_failure"].as_str().is_some_and(|f| f.contains("this node's copy"))
        })
    });
    assert!(repaired.1["last_failure"].as_str().unwrap().contains("verification"), "{}", repaired.1);
    assert_eq!(sha256_file(&published(2)), sha256_file(&first), "c's copy was replaced");

    // Deleted through a follower: gone from every node's disk.
    assert_eq!(apis[2].delete(&format!("/api/image/{uuid}")).status, 204);
    wait_for("the files to go", Duration::from_secs(20), || (0..3).all(|i| !published(i).exists()).then_some(()));
    for i in 0..3 {
        assert!(dir(i).join(format!("images/{uuid2}.pkg")).exists(), "the other image stays on node {i}");
    }
}

/// Which of the nodes leads, as the cluster runtime says.
fn leader_index(apis: &[Api], names: &[&str]) -> usize {
    let runtime = apis[0].object("/api/cluster/runtime");
    let leader = runtime["node_states"].as_array().unwrap().iter().find(|n| n["role"] == "CLUSTER_LEADER").cloned();
    let name = leader.and_then(|n| n["name"].as_str().map(String::from)).expect("a leader");
    names.iter().position(|n| *n == name).unwrap()
}

#[test]
fn a_session_begun_on_a_follower_works_on_every_node_and_survives_the_leaders_death() {
    let etcd = Etcd::start(1);
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    let mut nodes: Vec<Option<Controller>> =
        names.iter().zip(&dirs).map(|(name, dir)| Some(node(dir.path(), &etcd, name))).collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.as_ref().unwrap().url.clone()).collect();
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    create_when_led(&apis[0], &json!({"name": "first"}), Duration::from_secs(30));
    let leader = leader_index(&apis, &names);
    let follower = (leader + 1) % 3;
    let session = nodes[follower].as_ref().unwrap().login("admin", common::PASSWORD).expect("login on a follower");
    // Read and written with through every node, at once.
    for (i, url) in urls.iter().enumerate() {
        let here = session.at(url);
        assert_eq!(here.get("/api/pool?name=first").status, 200, "node {i}");
        let r = here.post("/api/pool", &json!({"name": format!("by-session-{i}")}));
        assert_eq!(r.status, 201, "node {i}: {}", r.body);
    }
    // The leader dies; the session goes on through both survivors and the new leader.
    nodes[leader].take().unwrap().kill9();
    let survivor = &apis[follower];
    create_when_led(survivor, &json!({"name": "after"}), Duration::from_secs(15));
    for i in (0..3).filter(|i| *i != leader) {
        let here = session.at(&urls[i]);
        assert_eq!(here.get("/api/pool?name=after").status, 200, "node {i}");
        let r = here.post("/api/pool", &json!({"name": format!("after-{i}")}));
        assert_eq!(r.status, 201, "node {i} after the failover: {}", r.body);
    }
    // Logged out on one node, it is over on every node.
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    let r = session.at(&urls[other]).send("POST", "/logout", None);
    assert_eq!(r.status, 200, "{}", r.body);
    for i in (0..3).filter(|i| *i != leader) {
        assert_eq!(session.at(&urls[i]).get("/api/pool").status, 401, "node {i} after the logout");
    }
    // Nobody without the cluster's secret may store sessions on the leader.
    let changes = json!({"begin": [["k", {"user_uuid": "x", "csrf_token": "t", "credential": "c", "touched_ms": 1}]]});
    for i in (0..3).filter(|i| *i != leader) {
        let stranger = Api::new(&urls[i]).header("x-fulcrum-cluster-secret", "guess");
        let r = stranger.send("POST", "/cluster-internal/sessions", Some(changes.to_string().as_bytes()));
        assert_eq!(r.status, 404, "{}", r.body);
    }
}

#[test]
fn service_engines_ride_through_a_change_of_leader_without_being_marked_down() {
    use common::agents::{Agent, se_by_name, state, token, wait_for};
    let etcd = Etcd::start(1);
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    // HTTPS, so that agents must know each node's certificate; SEs are down after 6 s silent.
    let engine = ["--se-heartbeat-interval", "0.5", "--se-down-after", "6"];
    let mut nodes = three_nodes(&etcd, &paths(&dirs), &engine, true);
    let urls: Vec<String> = nodes.iter().map(|n| n.as_ref().unwrap().url.clone()).collect();
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    create_when_led(&apis[0], &json!({"name": "first"}), Duration::from_secs(30));
    wait_for("three nodes in /api/cluster", Duration::from_secs(15), || {
        (apis[0].object("/api/cluster")["nodes"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    let leader = leader_index(&apis, &names);
    let survivor = &apis[(leader + 1) % 3];
    // The token names every node's certificate.
    let (_, join) = token(survivor, "Default-Group");
    assert_eq!(join.split('.').count(), 5, "uuid, secret and three pins: {join}");
    // se1 is told of the leader only and learns the others; se2 is told of all three.
    let se_dir = temp_dir();
    let mut se1 = Agent::start_at(&urls[leader], Some(&join), None, &se_dir.path().join("se1"), "se1", &[]);
    let mut se2 = Agent::start_at(&urls.join(","), Some(&join), None, &se_dir.path().join("se2"), "se2", &[]);
    for name in ["se1", "se2"] {
        wait_for(&format!("{name} up"), Duration::from_secs(30), || {
            se_by_name(survivor, name).filter(|se| state(se) == "OPER_UP")
        });
    }
    wait_for("se1 to learn the three controllers", Duration::from_secs(10), || {
        let identity = std::fs::read_to_string(se_dir.path().join("se1/identity.json")).ok()?;
        let identity: Value = serde_json::from_str(&identity).ok()?;
        (identity["controllers"].as_array()?.len() == 3).then_some(())
    });
    // The leader dies: both SEs reach the next one and are never shown down.
    nodes[leader].take().unwrap().kill9();
    let killed = Instant::now();
    create_when_led(survivor, &json!({"name": "after"}), Duration::from_secs(15));
    let last_heartbeat =
        |name: &str| se_by_name(survivor, name).and_then(|se| se["last_heartbeat"].as_str().map(String::from));
    let before: Vec<Option<String>> = ["se1", "se2"].iter().map(|n| last_heartbeat(n)).collect();
    while killed.elapsed() < Duration::from_secs(12) {
        for name in ["se1", "se2"] {
            let se = se_by_name(survivor, name).expect("the SE is still known");
            assert_eq!(state(&se), "OPER_UP", "{name} at {:?} after the kill: {se}", killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (name, before) in ["se1", "se2"].iter().zip(before) {
        let now = last_heartbeat(name);
        assert!(now > before, "{name}'s heartbeats reach the new leader: {before:?} then {now:?}");
    }
    se1.kill9();
    se2.kill9();
    // Agents that were cut short (no heartbeat) are marked down by the new leader as usual.
    wait_for("se1 down", Duration::from_secs(15), || se_by_name(survivor, "se1").filter(|se| state(se) == "OPER_DOWN"));
}

#[test]
fn async_patches_acknowledged_before_the_leader_dies_are_merged_once_by_the_next() {
    let etcd = Etcd::start(1);
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    let mut nodes = three_nodes(&etcd, &paths(&dirs), &[], false);
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    let (pool, _) = create_when_led(&apis[0], &json!({"name": "async-pool"}), Duration::from_secs(30));
    let pool = pool["uuid"].as_str().unwrap().to_string();
    let r = apis[1].send(
        "PATCH",
        "/api/controllerproperties",
        Some(json!({"replace": {"async_patch_merge_period": 120}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Queued through every node: each server added, and every other one deleted again later,
    // so a request merged twice (an add replayed after its delete) would show.
    let server = |i: usize| json!({"ip": {"addr": format!("10.9.0.{i}"), "type": "V4"}});
    let mut ids = Vec::new();
    for i in 0..30 {
        let via = &apis[i % 3];
        let mut queue = |body: Value| {
            let r = via.send("PATCH", &format!("/api/pool/{pool}?async_mode"), Some(body.to_string().as_bytes()));
            assert_eq!(r.status, 202, "{}", r.body);
            ids.push(r.json()["patch_id"].as_str().unwrap().to_string());
        };
        queue(json!({"add": {"servers": [server(i)]}}));
        if i % 2 == 0 {
            queue(json!({"delete": {"servers": [server(i)]}}));
        }
    }
    let leader = leader_index(&apis, &names);
    let survivor = &apis[(leader + 1) % 3];
    for id in &ids {
        let status = survivor.object(&format!("/api/pool-async/status/{id}"));
        assert_eq!(status["status"], "QUEUED", "{status}");
    }
    nodes[leader].take().unwrap().kill9();
    create_when_led(survivor, &json!({"name": "after"}), Duration::from_secs(15));
    // The next leader merges what was queued (the tests drive its merge clock), once.
    let r = survivor.post("/api/pool-async/merge", &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["succeeded"], ids.len(), "{}", r.body);
    let again = survivor.post("/api/pool-async/merge", &json!({}));
    assert_eq!(again.json()["succeeded"], 0, "nothing is merged twice: {}", again.body);
    for i in (0..3).filter(|i| *i != leader) {
        let pool = apis[i].object(&format!("/api/pool/{pool}"));
        let mut addrs: Vec<String> =
            pool["servers"].as_array().unwrap().iter().map(|s| s["ip"]["addr"].as_str().unwrap().to_string()).collect();
        addrs.sort();
        let mut odd: Vec<String> = (0..30).filter(|i| i % 2 == 1).map(|i| format!("10.9.0.{i}")).collect();
        odd.sort();
        assert_eq!(addrs, odd, "node {i}");
        for id in &ids {
            assert_eq!(
                apis[i].object(&format!("/api/pool-async/status/{id}"))["status"],
                "SUCCESS",
                "{id} on node {i}"
            );
        }
    }
}

#[test]
fn an_se_group_operation_under_way_when_the_leader_dies_is_finished_by_the_next() {
    use common::agents::{Agent, se_by_name, state, token, wait_for};
    use common::upgrades::{node as status_of, post, settled};
    let pkgs = common::packages::Packages::new();
    let etcd = Etcd::start(1);
    let names = ["a", "b", "c"];
    let dirs: Vec<_> = (0..3).map(|_| pkgs.data_dir()).collect();
    let engine = ["--se-heartbeat-interval", "0.3", "--se-down-after", "4", "--se-health-timeout", "20"];
    let mut nodes = three_nodes(&etcd, &paths(&dirs), &engine, false);
    let urls: Vec<String> = nodes.iter().map(|n| n.as_ref().unwrap().url.clone()).collect();
    let apis: Vec<Api> = nodes.iter().map(|n| n.as_ref().unwrap().admin()).collect();
    create_when_led(&apis[0], &json!({"name": "first"}), Duration::from_secs(30));
    let leader = leader_index(&apis, &names);
    let (lead, survivor) = (&apis[leader], &apis[(leader + 1) % 3]);
    let (_, join) = token(lead, "Default-Group");
    let work = temp_dir();
    let _ses =
        Agent::start_at(&urls.join(","), Some(&join), None, &work.path().join("sim"), "sim", &["--simulate", "6"]);
    let ses: Vec<String> = (1..=6).map(|i| format!("sim-{i:04}")).collect();
    for se in &ses {
        wait_for("SEs up", Duration::from_secs(30), || se_by_name(survivor, se).filter(|s| state(s) == "OPER_UP"));
    }
    // The disk check of a controller upgrade looks at every node (each publishes its free space).
    let controller_image =
        common::packages::upload(lead, &pkgs.build("c.pkg", "controller", "30.2.2", "9100", &[])).json();
    let (status, preview) =
        post(survivor, "/api/upgrade/preview", json!({"image_ref": controller_image["uuid"], "system": true}));
    assert_eq!(status, 200, "{preview}");
    let disk =
        preview["checks"].as_array().unwrap().iter().find(|c| c["check_code"] == "SYSERR_CHECK_CLUSTER_DISK_SPACE");
    let disk = disk.cloned().unwrap();
    assert_eq!(disk["state"], "UPGRADE_PRE_CHECK_SUCCESS", "{disk}");
    assert!(disk["details"][0].as_str().unwrap().contains("every other node"), "{disk}");
    // Patched on the leader (it holds the package), through a follower's API.
    let image = common::packages::upload(lead, &pkgs.build("sp.pkg", "se_patch", "30.2.1", "9001", &[])).json();
    let group = ["/api/serviceenginegroup?name=Default-Group"];
    let (status, started) = post(
        survivor,
        "/api/patch",
        json!({"se_patch_ref": image["uuid"], "se_group_refs": group, "skip_warnings": true}),
    );
    assert_eq!(status, 200, "{started}");
    settled(survivor);
    let patched =
        |api: &Api| ses.iter().filter(|se| se_by_name(api, se).unwrap().get("patch_version").is_some()).count();
    assert_eq!(patched(survivor), 6);
    // Its rollback, one SE at a time: the leader dies half-way.
    let (status, started) =
        post(survivor, "/api/rollbackpatch", json!({"se_group_refs": group, "skip_warnings": true}));
    assert_eq!(status, 200, "{started}");
    wait_for("the rollback under way", Duration::from_secs(30), || {
        let left = patched(survivor);
        (left > 0 && left < 6).then_some(())
    });
    let left_at_kill = patched(survivor);
    nodes[leader].take().unwrap().kill9();
    assert!(left_at_kill > 0, "the rollback was still running when its leader died");
    // The next leader takes the stored operation up and finishes it.
    create_when_led(survivor, &json!({"name": "after"}), Duration::from_secs(15));
    let after = settled(survivor);
    let group = after.iter().find(|n| n["name"] == "Default-Group").unwrap();
    assert_eq!(group["state"]["state"], "UPGRADE_FSM_COMPLETED", "{group}");
    assert_eq!(patched(survivor), 0, "every SE rolled back");
    let history: Vec<&str> = group["history"].as_array().unwrap().iter().map(|h| h["ops"].as_str().unwrap()).collect();
    assert_eq!(history.first(), Some(&"ROLLBACKPATCH"), "{history:?}");
    assert_eq!(status_of(survivor, "Default-Group")["state"]["state"], "UPGRADE_FSM_COMPLETED");
}

#[test]
fn another_node_takes_over_from_a_killed_leader_with_everything_acknowledged() {
    let etcd = Etcd::start(1);
    let (data_a, data_b) = (temp_dir(), temp_dir());
    let a = node(data_a.path(), &etcd, "a");
    let (_, _) = create_when_led(&a.admin(), &json!({"name": "first"}), Duration::from_secs(30));
    let b = node(data_b.path(), &etcd, "b");
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let via = if i % 2 == 0 { a.admin() } else { b.admin() };
        let r = via.post("/api/pool", &json!({"name": format!("p{i}")}));
        assert_eq!(r.status, 201, "{}", r.body);
        acknowledged.push(r.json()["uuid"].as_str().unwrap().to_string());
    }
    // A backup asked of the follower is taken by the leader; every node lists it, with where
    // its file is.
    let r = b.admin().post("/api/configuration/backup", &json!({}));
    assert_eq!(r.status, 201, "{}", r.body);
    let name = r.json()["name"].as_str().unwrap().to_string();
    let listed = b.admin().object("/api/configuration/backup");
    let entry = listed["results"].as_array().unwrap().iter().find(|e| e["name"] == name.as_str()).cloned();
    assert_eq!(entry.as_ref().map(|e| e["node"].clone()), Some(json!("a")), "{listed}");
    let r = b.admin().get(&format!("/api/configuration/backup/{name}"));
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.error().contains("node 'a'"), "{}", r.error());
    assert_eq!(a.admin().get(&format!("/api/configuration/backup/{name}")).status, 200);
    a.kill9();
    let (_, took) = create_when_led(&b.admin(), &json!({"name": "after"}), Duration::from_secs(15));
    let listed = b.admin().object("/api/configuration/backup");
    assert!(listed["results"].as_array().unwrap().iter().any(|e| e["name"] == name.as_str()), "{listed}");
    println!("failover: a write was acknowledged {took:?} after the leader's kill -9 (lease TTL 2 s)");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let api = b.admin();
    for uuid in &acknowledged {
        assert_eq!(api.get(&format!("/api/pool/{uuid}")).status, 200, "pool {uuid} survived the failover");
    }
}

#[test]
fn a_paused_leader_commits_nothing_after_its_lease_ran_out() {
    let etcd = Etcd::start(1);
    let (data_a, data_b) = (temp_dir(), temp_dir());
    let a = node(data_a.path(), &etcd, "a");
    let old_leader = a.admin();
    create_when_led(&old_leader, &json!({"name": "before"}), Duration::from_secs(30));
    let b = node(data_b.path(), &etcd, "b");
    let new_leader = b.admin();

    // Paused past its lease: b takes over while a still believes it leads.
    unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
    create_when_led(&new_leader, &json!({"name": "on-b"}), Duration::from_secs(15));
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    // A write sent to the old leader now is refused (etcd fails its fenced commit) or passed to
    // the new leader once it noticed: never stored by the old one.
    let late = old_leader.try_post("/api/pool", &json!({"name": "sent-to-the-old-leader"}));
    let acknowledged = matches!(&late, Ok(r) if r.status == 201);
    let names = pool_names(&new_leader);
    assert!(names.contains(&"before".to_string()) && names.contains(&"on-b".to_string()), "{names:?}");
    assert_eq!(
        names.contains(&"sent-to-the-old-leader".to_string()),
        acknowledged,
        "acknowledged exactly when stored: {late:?} {names:?}"
    );
    // The old leader follows now and its catalogue catches up.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !pool_names(&old_leader).contains(&"on-b".to_string()) {
        assert!(Instant::now() < deadline, "the old leader never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_a_quorum_writes_are_refused_reads_served_and_everything_recovers() {
    let etcd = Etcd::start(1);
    let pkgs = common::packages::Packages::new();
    let data = pkgs.data_dir();
    let c = node(data.path(), &etcd, "a");
    let api = c.admin();
    let (created, _) = create_when_led(&api, &json!({"name": "kept"}), Duration::from_secs(30));
    let uuid = created["uuid"].as_str().unwrap().to_string();
    let image = common::packages::upload(&api, &pkgs.build("c.pkg", "controller", "30.2.2", "9100", &[])).json();

    etcd.pause();
    let started = Instant::now();
    let r = api.try_post("/api/pool", &json!({"name": "while-down"})).expect("an answer");
    assert_eq!(r.status, 503, "{}", r.body);
    // Timed out: etcd may still apply the transaction it was sent, so the answer says so.
    assert!(r.body.contains("may or may not have been stored"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(6), "refused after {:?}", started.elapsed());
    let started = Instant::now();
    let read = api.get(&format!("/api/pool/{uuid}"));
    assert_eq!(read.status, 200, "reads are served from the catalogue: {}", read.body);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // The upgrade prechecks say the controller cluster is not ready.
    let ready = preview_check(&api, image["name"].as_str().unwrap(), "SYSERR_CHECK_CLUSTER_STATE");
    assert_eq!(ready["state"], "UPGRADE_PRE_CHECK_ERROR", "{ready}");
    assert!(ready["details"].to_string().contains("no quorum"), "{ready}");

    etcd.resume();
    let (_, took) = create_when_led(&api, &json!({"name": "after"}), Duration::from_secs(30));
    println!("writes acknowledged again {took:?} after etcd came back");
    let names = pool_names(&api);
    assert!(names.contains(&"kept".to_string()) && names.contains(&"after".to_string()), "{names:?}");
    if names.contains(&"while-down".to_string()) {
        // It was committed after all: then whole.
        assert_eq!(api.object("/api/pool?name=while-down")["count"], 1);
    }
}

#[test]
fn failover_under_load_loses_nothing_acknowledged() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 32;
    let etcd = Etcd::start(3);
    let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
    let mut nodes: Vec<Option<Controller>> =
        ["a", "b", "c"].iter().zip(&dirs).map(|(name, dir)| Some(node(dir.path(), &etcd, name))).collect();
    let urls: Vec<String> = nodes.iter().map(|n| n.as_ref().unwrap().url.clone()).collect();
    let admin = |i: usize| Api::new(&urls[i]).basic("admin", common::PASSWORD);
    create_when_led(&admin(0), &json!({"name": "warm-up"}), Duration::from_secs(30));
    // A few pools every client PATCHes (adding its own servers), and creates of its own.
    let shared: Vec<String> = (0..4)
        .map(|i| {
            admin(0).post("/api/pool", &json!({"name": format!("shared-{i}")})).json()["uuid"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    // What was acknowledged: created pools (name → uuid) and servers added to shared pools.
    let created = Arc::new(Mutex::new(HashMap::new()));
    let added = Arc::new(Mutex::new(Vec::new()));
    // Requests that failed, per node they were sent to (those sent to the killed node fail
    // for good; the others only while the cluster elects a new leader).
    let failures: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let workers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (stop, next, created, added, failures, shared, urls) = (
                stop.clone(),
                next.clone(),
                created.clone(),
                added.clone(),
                failures.clone(),
                shared.clone(),
                urls.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let api = Api::new(&urls[i % 3]).basic("admin", common::PASSWORD);
                    if i % 2 == 0 {
                        let name = format!("load-{i}");
                        match api.try_post("/api/pool", &json!({"name": name})) {
                            Ok(r) if r.status == 201 => {
                                let v: Value = serde_json::from_str(&r.body).unwrap();
                                created.lock().unwrap().insert(name, v["uuid"].as_str().unwrap().to_string());
                            }
                            _ => {
                                failures[i % 3].fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    } else {
                        let pool = &shared[client % shared.len()];
                        let addr = format!("10.{}.{}.{}", client, (i / 256) % 256, i % 256);
                        let patch = json!({"add": {"servers": [{"ip": {"addr": addr, "type": "V4"}}]}});
                        match api.try_send("PATCH", &format!("/api/pool/{pool}"), &patch) {
                            Ok(r) if r.status == 200 => added.lock().unwrap().push((pool.clone(), addr)),
                            _ => {
                                failures[i % 3].fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    // Kill the leader.
    let leader = (0..3)
        .find(|i| {
            admin(*i).object("/api/cluster/runtime")["node_states"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["role"] == "CLUSTER_LEADER" && n["name"] == ["a", "b", "c"][*i])
        })
        .expect("a leader");
    let before = created.lock().unwrap().len() + added.lock().unwrap().len();
    nodes[leader].take().unwrap().kill9();
    let killed = Instant::now();
    let survivor = (leader + 1) % 3;
    let (_, took) = create_when_led(&admin(survivor), &json!({"name": "after-the-kill"}), Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let (created, added) = (created.lock().unwrap().clone(), added.lock().unwrap().clone());
    let failed_on_survivors: usize = (0..3).filter(|i| *i != leader).map(|i| failures[i].load(Ordering::SeqCst)).sum();
    println!(
        "failover under load: a new leader acknowledged a write {took:?} after the kill; {} writes acknowledged ({before} before the kill); {failed_on_survivors} requests to the surviving nodes failed during the failover",
        created.len() + added.len(),
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(killed.elapsed() < Duration::from_secs(30));
    for i in (0..3).filter(|i| *i != leader) {
        let api = admin(i);
        for (name, uuid) in &created {
            let got = api.get(&format!("/api/pool/{uuid}"));
            assert_eq!(got.status, 200, "node {i}: the acknowledged pool {name} is missing");
        }
        for pool in &shared {
            let servers: Vec<String> = api.object(&format!("/api/pool/{pool}"))["servers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["ip"]["addr"].as_str().unwrap().to_string())
                .collect();
            for (p, addr) in added.iter().filter(|(p, _)| p == pool) {
                assert!(servers.contains(addr), "node {i}: server {addr} acknowledged in {p} is missing");
            }
        }
        // Nothing half-applied: every stored load pool is whole (a name and a uuid).
        let listed = api.object("/api/pool?page_size=200&name.contains=load-");
        assert!(listed["count"].as_u64().unwrap() as usize >= created.len());
    }
}

mod history {
    //! The linearizability test: concurrent PATCHes and GETs of the same pools through all
    //! three nodes, recorded, across a leader's kill -9 and a paused leader, then checked.
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::common::Api;
    use super::common::linearizability::{Bits, Elements, Operation, Register, RegisterOp, Set, SetOp, check};
    use super::{Etcd, create_when_led, leader_index, paths, temp_dir, three_nodes};
    use serde_json::{Value, json};

    fn at(ms: u64, base: Instant) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn op<O>(op: O, base: Instant, called: u64, returned: Option<u64>) -> Operation<O> {
        Operation { op, called: at(called, base), returned: returned.map(|r| at(r, base)) }
    }

    #[test]
    fn the_checker_accepts_linearizable_histories_and_finds_violations() {
        let t = Instant::now();
        let w = |v: &str| RegisterOp::Write(v.into());
        let r = |v: Option<&str>| RegisterOp::Read(v.map(String::from));
        // Overlapping write and read: either order is fine.
        let good = [op(w("1"), t, 0, Some(10)), op(r(Some("1")), t, 5, Some(15)), op(r(None), t, 1, Some(4))];
        assert_eq!(check(&Register, &good, 10_000), Ok(true));
        // A read that began after a write was acknowledged must see it (a stale read).
        let stale = [op(w("1"), t, 0, Some(10)), op(w("2"), t, 11, Some(20)), op(r(Some("1")), t, 21, Some(30))];
        assert_eq!(check(&Register, &stale, 10_000), Ok(false));
        // A write of unknown outcome may show up late, or never.
        let late = [op(w("1"), t, 0, None), op(r(None), t, 50, Some(60)), op(r(Some("1")), t, 70, Some(80))];
        assert_eq!(check(&Register, &late, 10_000), Ok(true));
        let flip = [op(w("1"), t, 0, None), op(r(Some("1")), t, 50, Some(60)), op(r(None), t, 70, Some(80))];
        assert_eq!(check(&Register, &flip, 10_000), Ok(false), "once seen, it cannot vanish");
        // Many writes of unknown outcome that nobody saw cost the search nothing.
        let mut many: Vec<_> = (0..60).map(|i| op(w(&format!("lost-{i}")), t, i, None)).collect();
        many.extend((0..60).map(|i| op(r(None), t, 100 + 2 * i, Some(101 + 2 * i))));
        assert_eq!(check(&Register, &many, 100_000), Ok(true));
        // Sets: a removal acknowledged before a read began is not seen by it.
        let set = |items: &[usize]| SetOp::Read(Bits::of(items.iter().copied()));
        let ok = [
            op(SetOp::Add(1), t, 0, Some(5)),
            op(SetOp::Add(70), t, 1, Some(8)),
            op(set(&[1]), t, 6, Some(7)),
            op(set(&[1, 70]), t, 9, Some(10)),
        ];
        assert_eq!(check(&Set, &ok, 10_000), Ok(true));
        let lost =
            [op(SetOp::Add(1), t, 0, Some(5)), op(SetOp::Remove(1), t, 6, Some(8)), op(set(&[1]), t, 9, Some(10))];
        assert_eq!(check(&Set, &lost, 10_000), Ok(false));
        let gone =
            [op(SetOp::Add(70), t, 0, Some(5)), op(SetOp::Remove(70), t, 6, Some(8)), op(set(&[]), t, 9, Some(10))];
        assert_eq!(check(&Set, &gone, 10_000), Ok(true), "an emptied set equals the empty set");
    }

    /// What the clients did and saw.
    #[derive(Default)]
    struct Recorded {
        elements: Elements,
        servers: Vec<(usize, Operation<SetOp>)>,
        description: Vec<(usize, Operation<RegisterOp>)>,
    }

    /// When the answer to a write says whether it happened.
    fn returned(outcome: &Result<super::common::Resp, String>) -> Option<Option<Instant>> {
        match outcome {
            Ok(r) if r.status == 200 => Some(Some(Instant::now())),
            // Refused by the leader (or before any leader saw it): it did not happen.
            Ok(r) if (400..500).contains(&r.status) => None,
            Err(e) if e.contains("Connection refused") => None,
            // A timeout, or a 503 while passed on: it may have happened.
            _ => Some(None),
        }
    }

    fn client(id: usize, apis: Vec<Api>, pools: Vec<String>, until: Instant, record: Arc<Mutex<Recorded>>) {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut mine: Vec<Vec<String>> = vec![Vec::new(); pools.len()];
        let mut count = 0;
        while Instant::now() < until && count < 200 {
            count += 1;
            let p = random(pools.len() as u64) as usize;
            let path = format!("/api/pool/{}", pools[p]);
            let api = &apis[(id + count) % apis.len()];
            let called = Instant::now();
            let choice = random(10);
            let patch = |body: Value| api.try_send("PATCH", &path, &body);
            match choice {
                0..=2 => {
                    let addr = format!("10.{}.{}.{}", id + 1, count / 200, count % 200);
                    let outcome = patch(json!({"add": {"servers": [{"ip": {"addr": addr, "type": "V4"}}]}}));
                    if let Some(returned) = returned(&outcome) {
                        if returned.is_some() {
                            mine[p].push(addr.clone());
                        }
                        let mut record = record.lock().unwrap();
                        let o = Operation { op: SetOp::Add(record.elements.id(&addr)), called, returned };
                        record.servers.push((p, o));
                    }
                }
                3 | 4 if !mine[p].is_empty() => {
                    let pick = random(mine[p].len() as u64) as usize;
                    let addr = mine[p].remove(pick);
                    let outcome = patch(json!({"delete": {"servers": [{"ip": {"addr": addr, "type": "V4"}}]}}));
                    if let Some(returned) = returned(&outcome) {
                        let mut record = record.lock().unwrap();
                        let o = Operation { op: SetOp::Remove(record.elements.id(&addr)), called, returned };
                        record.servers.push((p, o));
                    }
                }
                5 | 6 => {
                    let value = format!("c{id}-{count}");
                    let outcome = patch(json!({"replace": {"description": value}}));
                    if let Some(returned) = returned(&outcome) {
                        let o = Operation { op: RegisterOp::Write(value), called, returned };
                        record.lock().unwrap().description.push((p, o));
                    }
                }
                _ => {
                    if let Ok(r) = api.try_send("GET", &path, &Value::Null)
                        && r.status == 200
                    {
                        let returned = Some(Instant::now());
                        let pool = r.json();
                        let description = pool["description"].as_str().map(String::from);
                        let mut record = record.lock().unwrap();
                        let addrs = pool["servers"].as_array().into_iter().flatten();
                        let servers = record.elements.set(addrs.map(|s| s["ip"]["addr"].as_str().unwrap()));
                        record.servers.push((p, Operation { op: SetOp::Read(servers), called, returned }));
                        record.description.push((p, Operation { op: RegisterOp::Read(description), called, returned }));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(60));
        }
    }

    #[test]
    fn concurrent_patches_and_reads_through_every_node_are_linearizable_across_a_kill_and_a_pause() {
        let etcd = Etcd::start(3);
        let names = ["a", "b", "c"];
        let dirs: Vec<_> = (0..3).map(|_| temp_dir()).collect();
        let mut nodes = three_nodes(&etcd, &paths(&dirs), &[], false);
        let apis: Vec<Api> =
            nodes.iter().map(|n| n.as_ref().unwrap().admin().timeout(Duration::from_secs(4))).collect();
        create_when_led(&apis[0], &json!({"name": "warm-up"}), Duration::from_secs(30));
        let pools: Vec<String> = (0..2)
            .map(|i| {
                let r = apis[i].post("/api/pool", &json!({"name": format!("history-{i}")}));
                assert_eq!(r.status, 201, "{}", r.body);
                r.json()["uuid"].as_str().unwrap().to_string()
            })
            .collect();
        let record = Arc::new(Mutex::new(Recorded::default()));
        let started = Instant::now();
        let until = started + Duration::from_secs(22);
        let clients: Vec<_> = (0..6)
            .map(|id| {
                let (apis, pools, record) = (apis.clone(), pools.clone(), record.clone());
                std::thread::spawn(move || client(id, apis, pools, until, record))
            })
            .collect();
        // At 4 s the leader dies; once another leads, it is paused past its lease, then resumed.
        std::thread::sleep(Duration::from_secs(4));
        let first = leader_index(&apis, &names);
        nodes[first].take().unwrap().kill9();
        let survivor = &apis[(first + 1) % 3];
        let deadline = Instant::now() + Duration::from_secs(15);
        let second = loop {
            std::thread::sleep(Duration::from_millis(200));
            let runtime = survivor.try_send("GET", "/api/cluster/runtime", &Value::Null);
            let leader = runtime.ok().filter(|r| r.status == 200).and_then(|r| {
                let states = r.json()["node_states"].as_array().cloned().unwrap_or_default();
                let name =
                    states.iter().find(|n| n["role"] == "CLUSTER_LEADER" && n["state"] == "CLUSTER_ACTIVE")?["name"]
                        .as_str()?
                        .to_string();
                names.iter().position(|n| *n == name).filter(|i| *i != first)
            });
            if let Some(leader) = leader {
                break leader;
            }
            assert!(Instant::now() < deadline, "no new leader");
        };
        std::thread::sleep(Duration::from_secs(2));
        let paused = nodes[second].as_ref().unwrap().pid() as i32;
        unsafe { libc::kill(paused, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs(5));
        unsafe { libc::kill(paused, libc::SIGCONT) };
        for c in clients {
            c.join().unwrap();
        }
        let record = Arc::try_unwrap(record).ok().unwrap().into_inner().unwrap();
        for p in 0..pools.len() {
            let servers: Vec<_> = record.servers.iter().filter(|(q, _)| *q == p).map(|(_, o)| o.clone()).collect();
            let description: Vec<_> =
                record.description.iter().filter(|(q, _)| *q == p).map(|(_, o)| o.clone()).collect();
            let unknown = servers.iter().filter(|o| o.returned.is_none()).count()
                + description.iter().filter(|o| o.returned.is_none()).count();
            println!(
                "pool {p}: {} set operations, {} register operations, {unknown} of unknown outcome",
                servers.len(),
                description.len()
            );
            assert!(servers.len() > 100 && description.len() > 50, "a history worth checking");
            let checking = Instant::now();
            assert_eq!(check(&Set, &servers, 5_000_000), Ok(true), "pool {p}'s servers");
            assert_eq!(check(&Register, &description, 5_000_000), Ok(true), "pool {p}'s description");
            println!("pool {p}: linearizable (checked in {:?})", checking.elapsed());
        }
        println!("history of {:?}, checked", started.elapsed());
    }
}
