//! The SEs' data plane end to end: real agent processes proxy a virtual service's VIP (on
//! 127.0.0.0/8) to pool servers started by the test, while a load generator sends requests
//! the whole time. Configuration changes, server deaths and upgrades are judged by what the
//! load saw: how many requests failed, and how.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::agents::{Agent, se_by_name, state, token, wait_for};
use common::traffic::{Backend, Load, Tally};
use common::{Api, Controller, Launch, temp_dir, try_start};
use serde_json::{Value, json};

const ENGINE_ARGS: &[&str] = &["--se-heartbeat-interval", "0.3", "--se-down-after", "2", "--se-health-timeout", "20"];
/// Configuration reaches traffic within this (the bound).
const WITHIN: Duration = Duration::from_secs(1);

fn controller(dir: &std::path::Path) -> Controller {
    try_start(Launch { args: ENGINE_ARGS, ..Launch::plain(dir) }).expect("fulcrum starts")
}

/// A controller with one real SE (`se1`, started with `agent_args`) in Default-Group, up.
fn one_se(work: &std::path::Path, agent_args: &[&str]) -> (Controller, Api, Agent) {
    let c = controller(&work.join("controller"));
    let api = c.admin();
    let (_, t) = token(&api, "Default-Group");
    let se = Agent::start(&c, Some(&t), &work.join("se1"), "se1", agent_args);
    wait_for("the SE up", Duration::from_secs(30), || se_by_name(&api, "se1").filter(|s| state(s) == "OPER_UP"));
    (c, api, se)
}

fn server(b: &Backend) -> Value {
    json!({"ip": {"addr": b.addr.ip().to_string(), "type": "V4"}, "port": b.addr.port()})
}

fn patch(api: &Api, path: &str, body: Value) -> Value {
    let r = api.send("PATCH", path, Some(body.to_string().as_bytes()));
    assert!(r.status == 200 || r.status == 202, "PATCH {path}: {} {}", r.status, r.body);
    r.json()
}

/// A free port on `ip`.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// A vsvip on `ip`, a virtual service on it at a free port to `pool`; the VIP's address.
fn virtual_service(api: &Api, name: &str, ip: &str, pool: &str, group: &str) -> (String, SocketAddr) {
    virtual_service_with(api, name, ip, pool, group, json!({}))
}

/// As [`virtual_service`], with more fields of the virtual service.
fn virtual_service_with(api: &Api, name: &str, ip: &str, pool: &str, group: &str, more: Value) -> (String, SocketAddr) {
    let vip = api.post(
        "/api/vsvip",
        &json!({"name": format!("{name}-vip"), "vip": [{"vip_id": "0", "ip_address": {"addr": ip, "type": "V4"}}]}),
    );
    assert_eq!(vip.status, 201, "{}", vip.body);
    let port = free_port(ip);
    let mut body = json!({"name": name, "services": [{"port": port}],
                "vsvip_ref": format!("/api/vsvip/{}", vip.json()["uuid"].as_str().unwrap()),
                "pool_ref": format!("/api/pool/{pool}"),
                "se_group_ref": format!("/api/serviceenginegroup?name={group}")});
    body.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
    let vs = api.post("/api/virtualservice", &body);
    assert_eq!(vs.status, 201, "{}", vs.body);
    (vs.json()["uuid"].as_str().unwrap().to_string(), format!("{ip}:{port}").parse().unwrap())
}

/// Waits until the VIP answers a request.
fn answers(vip: SocketAddr) {
    wait_for("the VIP to answer", Duration::from_secs(20), || {
        let r = ureq::get(&format!("http://{vip}/")).timeout(Duration::from_secs(2)).call().ok()?;
        (r.status() == 200).then_some(())
    });
}

fn summary(what: &str, tally: &Tally) {
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &tally.failures {
        *kinds.entry(f.kind.as_str()).or_default() += 1;
    }
    let servers: std::collections::BTreeMap<&String, u64> = tally.seen.iter().map(|(k, v)| (k, v.count)).collect();
    println!(
        "{what}: {} requests answered, {} failed {kinds:?}, {} connection resets, {} connections; by server {servers:?}",
        tally.ok,
        tally.failures.len(),
        tally.resets(),
        tally.connections
    );
}

fn pool_servers(api: &Api, pool: &str) -> Vec<Value> {
    api.object(&format!("/api/pool/{pool}/runtime/server")).as_array().unwrap().clone()
}

fn server_state(api: &Api, pool: &str, b: &Backend) -> String {
    pool_servers(api, pool)
        .iter()
        .find(|s| s["ip_addr"]["addr"] == b.addr.ip().to_string() && s["port"] == b.addr.port())
        .map(|s| s["oper_status"]["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// One SE; a pool of two servers; PATCHes (sync, then async after their merge) add, disable
/// and remove servers under load. Every change reaches traffic within a second and no request
/// fails.
#[test]
fn pool_changes_reach_traffic_within_a_second_and_fail_no_request() {
    let work = temp_dir();
    let metrics = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let (_controller, api, _se) = one_se(work.path(), &["--metrics-listen", &metrics]);
    let b1 = Backend::start("b1", "127.0.0.21", 0);
    let b2 = Backend::start("b2", "127.0.0.22", 0);
    let b3 = Backend::start("b3", "127.0.0.23", 0);
    let b4 = Backend::start("b4", "127.0.0.24", 0);
    let r = api.post(
        "/api/pool",
        &json!({"name": "web", "lb_algorithm": "LB_ALGORITHM_ROUND_ROBIN", "servers": [server(&b1), server(&b2)]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let pool = r.json()["uuid"].as_str().unwrap().to_string();
    let (vs, vip) = virtual_service(&api, "web-vs", "127.0.0.40", &pool, "Default-Group");
    answers(vip);
    let forwarded = b1.forwarded_for.lock().unwrap().clone().or_else(|| b2.forwarded_for.lock().unwrap().clone());
    assert_eq!(forwarded.as_deref(), Some("127.0.0.1"), "X-Forwarded-For names the client");

    let load = Load::start(vip, 4, Duration::from_secs(90));
    wait_for("both servers in use", Duration::from_secs(5), || {
        (load.seen("b1").is_some() && load.seen("b2").is_some()).then_some(())
    });

    // Synchronous: add a server.
    patch(&api, &format!("/api/pool/{pool}"), json!({"add": {"servers": [server(&b3)]}}));
    let added = Instant::now();
    let took = load.reached_after("b3", added, Duration::from_secs(5)).expect("the added server takes traffic");
    println!("sync add: the new server answered {} ms after the PATCH", took.as_millis());
    assert!(took <= WITHIN, "the added server took {took:?} to get traffic");

    // Synchronous: disable one (an add that matches an entry updates it).
    let mut disabled = server(&b1);
    disabled["enabled"] = json!(false);
    patch(&api, &format!("/api/pool/{pool}"), json!({"add": {"servers": [disabled]}}));
    let disabled_at = Instant::now();
    std::thread::sleep(WITHIN + Duration::from_millis(500));
    let last = load.seen("b1").unwrap().last;
    assert!(last < disabled_at + WITHIN, "the disabled server still got requests {:?} after", last - disabled_at);
    assert_eq!(server_state(&api, &pool, &b1), "OPER_DISABLED");

    // Asynchronous: remove one and add another, in one merge.
    let r = api.send(
        "PATCH",
        "/api/controllerproperties",
        Some(json!({"replace": {"async_patch_merge_period": 30}}).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let path = format!("/api/pool/{pool}?async_mode");
    assert_eq!(patch(&api, &path, json!({"delete": {"servers": [server(&b2)]}}))["status"], "QUEUED");
    assert_eq!(patch(&api, &path, json!({"add": {"servers": [server(&b4)]}}))["status"], "QUEUED");
    let r = api.post("/api/pool-async/merge", &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let merged = Instant::now();
    let took = load.reached_after("b4", merged, Duration::from_secs(5)).expect("the server added async takes traffic");
    println!("async add: the new server answered {} ms after the merge", took.as_millis());
    assert!(took <= WITHIN, "the server added by async PATCH took {took:?} to get traffic");
    std::thread::sleep(WITHIN + Duration::from_millis(500));
    let last = load.seen("b2").unwrap().last;
    assert!(last < merged + WITHIN, "the removed server still got requests {:?} after", last - merged);
    std::thread::sleep(Duration::from_millis(500));

    let tally = load.stop();
    summary("pool changes under load", &tally);
    assert!(tally.ok > 1000, "the load ran: {tally:?}");
    assert!(tally.failures.is_empty(), "failed requests: {:?}", tally.failures);
    assert_eq!(tally.connections, 4, "no client connection was closed by the changes");

    // The controller shows servers' health and the traffic the SE counted.
    wait_for("runtime reports", Duration::from_secs(10), || {
        (server_state(&api, &pool, &b3) == "OPER_UP" && server_state(&api, &pool, &b4) == "OPER_UP").then_some(())
    });
    let runtime = api.object(&format!("/api/pool/{pool}/runtime"));
    assert_eq!(runtime["oper_status"]["state"], "OPER_UP", "{runtime}");
    assert_eq!(runtime["num_servers"], 3, "{runtime}");
    let stats = wait_for("VS counters", Duration::from_secs(10), || {
        let stats = api.object(&format!("/api/virtualservice/{vs}/runtime"))["stats"].clone();
        (stats["requests"].as_u64().unwrap_or(0) >= tally.ok).then_some(stats)
    });
    assert!(stats["latency_p99_ms"].as_f64().is_some(), "{stats}");

    // A removed server's request in flight finishes (the pool's graceful_disable_timeout is a
    // minute); new requests go to the server that replaced it.
    let slow = Backend::start("slow", "127.0.0.25", 0);
    let r = api.post("/api/pool", &json!({"name": "draining", "servers": [server(&slow)]}));
    assert_eq!(r.status, 201, "{}", r.body);
    let draining = r.json()["uuid"].as_str().unwrap().to_string();
    let (_, drain_vip) = virtual_service(&api, "draining-vs", "127.0.0.43", &draining, "Default-Group");
    answers(drain_vip);
    let in_flight = std::thread::spawn(move || {
        let r = ureq::get(&format!("http://{drain_vip}/slow")).timeout(Duration::from_secs(10)).call().unwrap();
        (r.status(), r.into_string().unwrap())
    });
    std::thread::sleep(Duration::from_millis(300));
    patch(&api, &format!("/api/pool/{draining}"), json!({"add": {"servers": [server(&b3)]}}));
    patch(&api, &format!("/api/pool/{draining}"), json!({"delete": {"servers": [server(&slow)]}}));
    wait_for("the replacing server answers", WITHIN, || {
        let r = ureq::get(&format!("http://{drain_vip}/")).timeout(Duration::from_secs(1)).call().ok()?;
        (r.into_string().ok()? == "b3").then_some(())
    });
    assert_eq!(in_flight.join().unwrap(), (200, "slow".to_string()), "the in-flight request finished");

    // Layer 4: the same pool through a TCP virtual service (bytes copied both ways).
    let (_, l4_vip) = virtual_service_with(
        &api,
        "web-l4",
        "127.0.0.44",
        &pool,
        "Default-Group",
        json!({"application_profile_ref": "/api/applicationprofile?name=System-L4-Application"}),
    );
    answers(l4_vip);
    let through_l4 = ureq::get(&format!("http://{l4_vip}/")).call().unwrap().into_string().unwrap();
    assert!(["b3", "b4"].contains(&through_l4.as_str()), "{through_l4}");

    // The agent's own /metrics: per virtual service and per server.
    let text = ureq::get(&format!("http://{metrics}/metrics")).call().unwrap().into_string().unwrap();
    let count = |series: &str| -> u64 {
        text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
    };
    assert!(count("fulcrum_se_vs_requests_total{vs=\"web-vs\"}") >= tally.ok, "{text}");
    let b3_series = format!("fulcrum_se_server_requests_total{{pool=\"web\",server=\"{}\"}}", b3.addr);
    assert!(count(&b3_series) > 0, "{b3_series} in\n{text}");
    assert!(text.contains("fulcrum_se_vs_latency_seconds_bucket{vs=\"web-vs\",le=\"+Inf\"}"), "{text}");
}

/// A server that dies fails requests only within its monitor's detection window (and, as the
/// proxy passes over a server that refuses, usually none); it is reported down, and comes back
/// when it is healthy again.
#[test]
fn a_dead_server_is_taken_out_by_its_monitor_and_comes_back() {
    let work = temp_dir();
    let (c, api, _se) = one_se(work.path(), &[]);
    let hm = api.post(
        "/api/healthmonitor",
        &json!({"name": "http-1s", "type": "HEALTH_MONITOR_HTTP", "send_interval": 1, "receive_timeout": 1,
                "failed_checks": 2, "successful_checks": 2,
                "http_monitor": {"http_request": "GET /health HTTP/1.1", "http_response_code": ["HTTP_2XX"]}}),
    );
    assert_eq!(hm.status, 201, "{}", hm.body);
    let b1 = Backend::start("b1", "127.0.0.31", 0);
    let mut b2 = Backend::start("b2", "127.0.0.32", 0);
    let b2_port = b2.addr.port();
    let r = api.post(
        "/api/pool",
        &json!({"name": "monitored", "lb_algorithm": "LB_ALGORITHM_LEAST_CONNECTIONS",
                "health_monitor_refs": ["/api/healthmonitor?name=http-1s"], "servers": [server(&b1), server(&b2)]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let pool = r.json()["uuid"].as_str().unwrap().to_string();
    let (_, vip) = virtual_service(&api, "monitored-vs", "127.0.0.41", &pool, "Default-Group");
    answers(vip);
    wait_for("both up", Duration::from_secs(10), || {
        (server_state(&api, &pool, &b1) == "OPER_UP" && server_state(&api, &pool, &b2) == "OPER_UP").then_some(())
    });

    let load = Load::start(vip, 4, Duration::from_secs(60));
    wait_for("both servers in use", Duration::from_secs(5), || {
        (load.seen("b1").is_some() && load.seen("b2").is_some()).then_some(())
    });
    // Unhealthy first: the monitor takes it out, and no request fails meanwhile.
    b2.set_healthy(false);
    let sick = Instant::now();
    // failed_checks × send_interval, plus a receive_timeout.
    let (interval, failed_checks, successful_checks) = (Duration::from_secs(1), 2, 2);
    let window = interval * failed_checks + Duration::from_secs(1);
    wait_for("b2 reported down", window + Duration::from_secs(5), || {
        (server_state(&api, &pool, &b2) == "OPER_DOWN").then_some(())
    });
    let down_after = sick.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let last = load.seen("b2").unwrap().last;
    assert!(last < sick + window, "an unhealthy server got requests {:?} after it failed its checks", last - sick);
    println!("unhealthy: reported down after {} ms", down_after.as_millis());
    b2.set_healthy(true);
    let well = Instant::now();
    let back = load.reached_after("b2", well, Duration::from_secs(10)).expect("b2 back in service");
    println!("healthy again: traffic after {} ms", back.as_millis());
    assert!(back <= interval * successful_checks + Duration::from_secs(1), "back after {back:?}");

    // Killed: listening stops and its connections are cut.
    b2.kill();
    let killed = Instant::now();
    wait_for("b2 reported down", window + Duration::from_secs(5), || {
        (server_state(&api, &pool, &b2) == "OPER_DOWN").then_some(())
    });
    let reason = pool_servers(&api, &pool)
        .into_iter()
        .find(|s| s["port"] == b2_port)
        .map(|s| s["oper_status"]["reason"].clone())
        .unwrap();
    let reason = reason[0].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("http-1s"), "a down server says which monitor failed and why: {reason}");
    println!("killed: {reason}");
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    summary("a server killed under load", &tally);
    let late: Vec<_> = tally.failures.iter().filter(|f| f.at < killed || f.at > killed + window).collect();
    assert!(late.is_empty(), "failures outside the detection window: {late:?}");
    assert!(tally.ok > 1000, "the load ran: {tally:?}");
    let runtime = api.object(&format!("/api/pool/{pool}/runtime"));
    assert_eq!(runtime["num_servers_up"], 1, "{runtime}");
    let (shown, _) = common::shell(&c, "show pool monitored server");
    assert!(shown.contains(&b2.addr.to_string()) && shown.contains("OPER_DOWN"), "{shown}");
    assert!(shown.contains(&b1.addr.to_string()) && shown.contains("OPER_UP"), "{shown}");
    drop(b1);
}

/// Three SEs in Default-Group serving one virtual service (and, for the disruptive case, a
/// virtual service in a group of its own that the upgrade leaves alone).
struct Group {
    c: Controller,
    api: Api,
    image: String,
    _agents: Vec<Agent>,
    _backends: Vec<Backend>,
    _work: tempfile::TempDir,
    _data: tempfile::TempDir,
    _pkgs: common::packages::Packages,
}

fn group_of_three(with_bystander: bool) -> (Group, SocketAddr, Option<SocketAddr>) {
    let pkgs = common::packages::Packages::new();
    let data = pkgs.data_dir();
    // A fixed address: the controller restarts itself into the new version first (SEs may not
    // run a newer version than the controller).
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let c =
        try_start(Launch { args: ENGINE_ARGS, listen: &listen, ..Launch::plain(data.path()) }).expect("fulcrum starts");
    let api = c.admin();
    let work = temp_dir();
    let image = common::packages::upload(&api, &pkgs.with_se("se.pkg", "30.2.2", "9100", &[("etc/release", "se\n")]));
    assert_eq!(image.status, 201, "{}", image.body);
    let image = image.json()["name"].as_str().unwrap().to_string();
    let (_, t) = token(&api, "Default-Group");
    let mut agents: Vec<Agent> =
        ["d1", "d2", "d3"].iter().map(|n| Agent::start(&c, Some(&t), &work.path().join(n), n, &[])).collect();
    let mut names = vec!["d1", "d2", "d3"];
    if with_bystander {
        assert_eq!(api.post("/api/serviceenginegroup", &json!({"name": "G2"})).status, 201);
        let (_, t2) = token(&api, "G2");
        agents.push(Agent::start(&c, Some(&t2), &work.path().join("g1"), "g1", &[]));
        names.push("g1");
    }
    for n in names {
        wait_for("SEs up", Duration::from_secs(30), || se_by_name(&api, n).filter(|s| state(s) == "OPER_UP"));
    }
    let (status, started) =
        common::upgrades::post(&api, "/api/upgrade", json!({"image_ref": image, "skip_warnings": true}));
    assert_eq!(started["status_code"], "SYSERR_UPGRADE_CONTROLLER_STARTED", "{status} {started}");
    common::upgrades::settled(&api);
    let backends = vec![Backend::start("b1", "127.0.0.51", 0), Backend::start("b2", "127.0.0.52", 0)];
    let r = api.post("/api/pool", &json!({"name": "p", "servers": [server(&backends[0]), server(&backends[1])]}));
    assert_eq!(r.status, 201, "{}", r.body);
    let pool = r.json()["uuid"].as_str().unwrap().to_string();
    let (_, vip) = virtual_service(&api, "upgraded-vs", "127.0.0.60", &pool, "Default-Group");
    answers(vip);
    let bystander = with_bystander.then(|| {
        let (_, vip) = virtual_service(&api, "bystander-vs", "127.0.0.61", &pool, "G2");
        answers(vip);
        vip
    });
    let group = Group { c, api, image, _agents: agents, _backends: backends, _work: work, _data: data, _pkgs: pkgs };
    (group, vip, bystander)
}

fn se_group_node(api: &Api, name: &str) -> Value {
    common::upgrades::settled(api).into_iter().find(|n| n["name"] == name).expect("the group's status")
}

/// `upgrade segroup ... skip_warnings` of a group of three SEs while the load runs: every SE
/// restarts into the new version, the virtual service moves ahead of each restart (its new SE
/// listens on the VIP before the old one lets go), and no request fails, no connection resets.
#[test]
fn a_rolling_se_group_upgrade_under_load_fails_no_request() {
    let (g, vip, _) = group_of_three(false);
    let load = Load::start(vip, 4, Duration::from_secs(150));
    std::thread::sleep(Duration::from_millis(500));
    let (out, _) = common::shell(
        &g.c,
        &format!("upgrade segroup image_ref {} se_group_refs Default-Group skip_warnings", g.image),
    );
    assert!(out.contains("SYSERR_UPGRADE_SEGROUP_STARTED"), "{out}");
    let node = se_group_node(&g.api, "Default-Group");
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    summary("rolling upgrade of 3 SEs under load", &tally);
    assert!(node.to_string().contains("\"VS_MIGRATE\""), "the virtual service moved ahead of its SE's restart: {node}");
    assert_eq!(node["state"]["state"], "UPGRADE_FSM_COMPLETED", "{node}");
    assert_eq!(common::upgrades::versions(&g.api, &["d1", "d2", "d3"]), vec!["30.2.2-9100"; 3]);
    assert_eq!(node["seg_status"]["num_vs_disrupted"], 0, "{node}");
    assert!(tally.ok > 1000, "the load ran: {tally:?}");
    assert_eq!(tally.resets(), 0, "connection resets: {:?}", tally.failures);
    assert!(tally.failures.is_empty(), "failed requests: {:?}", tally.failures);
}

/// `disruptive`: no virtual service is moved ahead of its SE's restart and the SE closes its
/// listeners instead of handing them on, so requests fail; the precheck named exactly the
/// virtual services that saw failures.
#[test]
fn a_disruptive_upgrade_fails_requests_of_the_virtual_services_the_precheck_named() {
    let (g, vip, bystander) = group_of_three(true);
    let bystander = bystander.unwrap();
    let (status, preview) = common::upgrades::post(
        &g.api,
        "/api/upgrade/preview",
        json!({"image_ref": g.image, "se_group_refs": ["/api/serviceenginegroup?name=Default-Group"], "disruptive": true}),
    );
    assert_eq!(status, 200, "{preview}");
    let check = preview["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check_code"] == "SYSERR_CHECK_VS_DISRUPUTION")
        .cloned()
        .unwrap();
    let announced = check["details"].to_string();
    assert!(announced.contains("'upgraded-vs'") && !announced.contains("bystander-vs"), "{check}");

    let load = Load::start(vip, 4, Duration::from_secs(150));
    let untouched = Load::start(bystander, 2, Duration::from_secs(150));
    std::thread::sleep(Duration::from_millis(500));
    let (out, _) = common::shell(
        &g.c,
        &format!("upgrade segroup image_ref {} se_group_refs Default-Group disruptive skip_warnings", g.image),
    );
    assert!(out.contains("SYSERR_UPGRADE_SEGROUP_STARTED"), "{out}");
    let node = se_group_node(&g.api, "Default-Group");
    std::thread::sleep(Duration::from_millis(500));
    let (tally, bystander_tally) = (load.stop(), untouched.stop());
    summary("disruptive upgrade, the announced virtual service", &tally);
    summary("disruptive upgrade, a virtual service of another group", &bystander_tally);
    assert_eq!(node["state"]["state"], "UPGRADE_FSM_COMPLETED", "{node}");
    assert!(!tally.failures.is_empty(), "a disruptive upgrade of the SEs serving it fails requests");
    assert!(bystander_tally.failures.is_empty(), "not announced, not disrupted: {:?}", bystander_tally.failures);
    assert!(node["seg_status"]["num_vs_disrupted"].as_u64().unwrap_or(0) >= 1, "the disruption is reported: {node}");
}

/// An SE alone in its group, on one core, restarts into a new slot (an install it is told to
/// do) while it serves: the new process takes the listening sockets over, so no connection is
/// refused and every request is answered.
#[test]
fn an_se_restarting_into_its_new_slot_hands_its_sockets_over_and_fails_no_request() {
    let pkgs = common::packages::Packages::new();
    let data = pkgs.data_dir();
    let c = try_start(Launch { args: ENGINE_ARGS, ..Launch::plain(data.path()) }).expect("fulcrum starts");
    let api = c.admin();
    let work = temp_dir();
    // The SE image's version may be the controller's own, as a reinstall.
    let image = common::packages::upload(&api, &pkgs.with_se("se.pkg", "30.2.1", "9001", &[("etc/release", "se\n")]));
    assert_eq!(image.status, 201, "{}", image.body);
    let image = image.json()["name"].as_str().unwrap().to_string();
    let (_, t) = token(&api, "Default-Group");
    // On one core: the data plane's single-threaded runtime, as a one-core SE runs it.
    let se = Agent::start_on_one_core(&c, Some(&t), &work.path().join("se1"), "se1");
    let uuid = wait_for("the SE up", Duration::from_secs(30), || {
        se_by_name(&api, "se1").filter(|s| state(s) == "OPER_UP")
    })["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let backend = Backend::start("b1", "127.0.0.71", 0);
    let r = api.post("/api/pool", &json!({"name": "p", "servers": [server(&backend)]}));
    let pool = r.json()["uuid"].as_str().unwrap().to_string();
    let (_, vip) = virtual_service(&api, "lone-vs", "127.0.0.72", &pool, "Default-Group");
    answers(vip);
    let pid = se.child.id();

    let load = Load::start(vip, 4, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    let r = api.post(&format!("/api/serviceengine/{uuid}/install"), &json!({"image_ref": image}));
    assert_eq!(r.status, 202, "{}", r.body);
    wait_for("the install done", Duration::from_secs(30), || {
        let se = se_by_name(&api, "se1")?;
        (se["install_status"]["state"] == "DONE").then_some(())
    });
    let restarted = se.log_text().matches("took over listening sockets").count();
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    summary("an SE restarting into its new slot under load", &tally);
    assert_eq!(se.child.id(), pid, "the agent re-executes itself in place");
    assert!(restarted >= 1, "the new process took the sockets over:\n{}", se.log_text());
    assert!(se.log_text().contains("single_threaded=true"), "one core, one thread:\n{}", se.log_text());
    assert!(tally.ok > 500, "the load ran: {tally:?}");
    assert_eq!(tally.resets(), 0, "connection resets: {:?}", tally.failures);
    assert!(tally.failures.is_empty(), "failed requests: {:?}", tally.failures);
}

/// One GET over TLS to `vip`, verifying the certificate against `ca_pem` for `name`.
fn get_over_tls(vip: SocketAddr, ca_pem: &str, name: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).map_err(|e| e.to_string())?;
    let socket = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, socket);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    match tls.read_to_string(&mut answer) {
        Ok(_) => {}
        // A peer that closes without close_notify still gave the whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    Ok(answer)
}

/// A service port with `enable_ssl` terminates TLS with the virtual service's certificate (here
/// the controller's System-Default-Cert, issued for localhost by System-Default-Root-CA); the
/// plain port of the same virtual service stays plain.
#[test]
fn tls_is_terminated_with_the_virtual_services_certificate() {
    let work = temp_dir();
    let (_controller, api, _se) = one_se(work.path(), &[]);
    let b1 = Backend::start("b1", "127.0.0.81", 0);
    let r = api.post("/api/pool", &json!({"name": "tls-pool", "servers": [server(&b1)]}));
    let pool = r.json()["uuid"].as_str().unwrap().to_string();
    let ip = "127.0.0.82";
    let (tls_port, plain_port) = (free_port(ip), free_port(ip));
    let (_, _) = virtual_service_with(
        &api,
        "tls-vs",
        ip,
        &pool,
        "Default-Group",
        json!({"services": [{"port": tls_port, "enable_ssl": true}, {"port": plain_port}],
               "ssl_key_and_certificate_refs": ["/api/sslkeyandcertificate?name=System-Default-Cert"]}),
    );
    let plain: SocketAddr = format!("{ip}:{plain_port}").parse().unwrap();
    answers(plain);
    let ca =
        api.object("/api/sslkeyandcertificate?name=System-Default-Root-CA")["results"][0]["certificate"]["certificate"]
            .as_str()
            .unwrap()
            .to_string();
    let vip: SocketAddr = format!("{ip}:{tls_port}").parse().unwrap();
    let answer =
        wait_for("the TLS port to answer", Duration::from_secs(10), || get_over_tls(vip, &ca, "localhost").ok());
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("b1"), "{answer}");
    let wrong = get_over_tls(vip, &ca, "not-this-host.example");
    assert!(wrong.is_err(), "the certificate is for localhost only: {wrong:?}");
    // Plain HTTP to the TLS port is no HTTP answer.
    assert!(ureq::get(&format!("http://{vip}/")).timeout(Duration::from_secs(2)).call().is_err());

    // A TLS port without a certificate is not served, and the runtime says why.
    let (bare, _) = virtual_service_with(
        &api,
        "tls-without-cert",
        "127.0.0.83",
        &pool,
        "Default-Group",
        json!({"services": [{"port": free_port("127.0.0.83"), "enable_ssl": true}]}),
    );
    let runtime = wait_for("the SE to say why", Duration::from_secs(10), || {
        let runtime = api.object(&format!("/api/virtualservice/{bare}/runtime"));
        (runtime["vip_summary"][0]["service_engine"][0].get("errors").is_some()).then_some(runtime)
    });
    assert_eq!(runtime["oper_status"]["state"], "OPER_DOWN", "{runtime}");
    let reason = runtime["oper_status"]["reason"][0].as_str().unwrap();
    assert!(reason.contains("TLS without a usable certificate"), "{reason}");
}
