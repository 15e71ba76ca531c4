//! Controllers on a real etcd: the store lives there, one node leads (fenced), and a standby
//! takes over when the leader dies, with everything acknowledged.

mod common;

use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{Launch, spawn, temp_dir};
use serde_json::json;

/// A controller of the cluster on `etcd` (lease TTL 2 s), not yet listening.
fn node(data: &std::path::Path, etcd: &Etcd, name: &str) -> common::Starting {
    let endpoints = etcd.endpoints();
    let args = ["--etcd", endpoints.as_str(), "--node-name", name, "--lease-ttl", "2"];
    spawn(Launch { args: &args, ..Launch::plain(data) })
}

#[test]
fn a_standby_takes_over_from_a_killed_leader_with_everything_acknowledged() {
    let etcd = Etcd::start(1);
    let (data_a, data_b) = (temp_dir(), temp_dir());
    let a = node(data_a.path(), &etcd, "a").listening(Duration::from_secs(30)).unwrap();
    let api = a.admin();
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let r = api.post(
            "/api/pool",
            &json!({"name": format!("p{i}"), "servers": [{"ip": {"addr": format!("10.0.0.{i}"), "type": "V4"}}]}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        acknowledged.push(r.json()["uuid"].as_str().unwrap().to_string());
    }
    let uuid = &acknowledged[3];
    let r = api.send(
        "PATCH",
        &format!("/api/pool/{uuid}"),
        Some(json!({"add": {"servers": [{"ip": {"addr": "10.9.9.9", "type": "V4"}}]}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // The second node waits: a leads.
    let mut b = node(data_b.path(), &etcd, "b");
    assert!(b.wait_for_line("waiting to lead the cluster (leader: a at", Duration::from_secs(20)), "{:?}", b.banner);

    a.kill9();
    let killed = Instant::now();
    let b = b.listening(Duration::from_secs(30)).unwrap();
    let took = killed.elapsed();
    println!("failover: the standby served {took:?} after the leader's kill -9 (lease TTL 2 s)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let api = b.admin();
    for uuid in &acknowledged {
        assert_eq!(api.get(&format!("/api/pool/{uuid}")).status, 200, "pool {uuid} survived the failover");
    }
    let patched = api.object(&format!("/api/pool/{uuid}"));
    assert_eq!(patched["servers"].as_array().unwrap().len(), 2, "{patched}");
    assert_eq!(api.post("/api/pool", &json!({"name": "after"})).status, 201, "the new leader writes");
}

#[test]
fn a_paused_leader_commits_nothing_after_its_lease_ran_out() {
    let etcd = Etcd::start(1);
    let (data_a, data_b) = (temp_dir(), temp_dir());
    let a = node(data_a.path(), &etcd, "a").listening(Duration::from_secs(30)).unwrap();
    let old_leader = a.admin();
    assert_eq!(old_leader.post("/api/pool", &json!({"name": "before"})).status, 201);
    let mut b = node(data_b.path(), &etcd, "b");
    assert!(b.wait_for_line("waiting to lead the cluster", Duration::from_secs(20)), "{:?}", b.banner);

    // Paused past its lease: b takes over while a still believes it leads.
    unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
    let b = b.listening(Duration::from_secs(30)).unwrap();
    let new_leader = b.admin();
    assert_eq!(new_leader.post("/api/pool", &json!({"name": "on-b"})).status, 201);
    unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
    // A write sent to the old leader now is refused (etcd fails its fenced commit) or finds it
    // gone (it noticed and exited): never stored.
    if let Ok(r) = old_leader.try_post("/api/pool", &json!({"name": "on-old-leader"})) {
        assert!(r.status >= 500, "the deposed leader acknowledged a write: {} {}", r.status, r.body);
    }
    let names: Vec<String> = new_leader.object("/api/pool?page_size=200")["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"on-b".to_string()), "{names:?}");
    assert!(!names.contains(&"on-old-leader".to_string()), "{names:?}");
    // The deposed leader notices and exits, to campaign again when restarted.
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::path::Path::new(&format!("/proc/{}/stat", a.pid())).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", a.pid())).unwrap_or_default().contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the deposed leader keeps running");
        std::thread::sleep(Duration::from_millis(100));
    }
}
