//! The controller cluster: three fulcrum nodes on a three-member etcd, all on this machine.
//! Durable creates and PATCH/s through all three nodes against the embedded store and against
//! etcd read-modify-write of the same pool; then leader kills under load, with the time until a
//! write is acknowledged again and the requests that failed meanwhile.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::patch::{etcd_case, own_server, run_clients, seed_servers};
use crate::{ClusterArgs, Common, PatchArgs, basic, run_load, start_fulcrum};

#[path = "../../crates/fulcrum/tests/common/etcd.rs"]
#[allow(dead_code)]
mod etcd_support;
use etcd_support::Etcd;

/// One controller of the cluster; its data dir outlives a kill, so it can be started again.
struct Node {
    name: String,
    ip: String,
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
}

impl Node {
    fn start(binary: &Path, etcd: &Etcd, name: &str, ip: &str, lease_ttl: u64) -> Node {
        let dir = tempfile::Builder::new().prefix("fulcrum-cluster-bench-").tempdir_in(".").unwrap();
        let mut node = Node { name: name.into(), ip: ip.into(), child: None, url: String::new(), dir };
        node.run(binary, etcd, lease_ttl);
        node
    }

    fn run(&mut self, binary: &Path, etcd: &Etcd, lease_ttl: u64) {
        let listen = format!("{}:0", self.ip);
        let ttl = lease_ttl.to_string();
        let mut command = Command::new(binary);
        command.args(["serve", "--plain-http", "--listen", &listen, "--data-dir"]).arg(self.dir.path()).args([
            "--etcd",
            &etcd.endpoints(),
            "--node-name",
            &self.name,
            "--lease-ttl",
            &ttl,
        ]);
        let (child, url) = crate::spawn_listening(&mut command);
        self.url = url;
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn get(agent: &ureq::Agent, url: &str) -> Option<Value> {
    agent.get(url).set("Authorization", &basic()).call().ok()?.into_json().ok()
}

/// The leader's name, once every node is up and one leads (as `node`'s runtime says).
fn steady_leader(agent: &ureq::Agent, url: &str, nodes: usize, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(runtime) = get(agent, &format!("{url}/api/cluster/runtime")) {
            let states = runtime["node_states"].as_array().cloned().unwrap_or_default();
            let up = states.iter().filter(|n| n["state"] == "CLUSTER_ACTIVE").count();
            let leader = states.iter().find(|n| n["role"] == "CLUSTER_LEADER" && n["state"] == "CLUSTER_ACTIVE");
            if let (true, Some(leader)) = (up == nodes, leader) {
                return leader["name"].as_str().unwrap_or_default().to_string();
            }
        }
        assert!(Instant::now() < deadline, "the cluster did not settle with {nodes} nodes up and a leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A write acknowledged through `url`, retried until one is: how long that took.
fn acknowledged_write(agent: &ureq::Agent, url: &str, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let r = agent
            .post(&format!("{url}/api/pool"))
            .set("Authorization", &basic())
            .timeout(Duration::from_secs(2))
            .send_json(json!({"name": name}));
        if matches!(&r, Ok(r) if r.status() == 201) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "no write acknowledged within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ratio_row(name: &str, cluster: f64, peer_name: &str, peer: f64) {
    println!("{name:<44} cluster {cluster:>10.0}/s   {peer_name:<30} {peer:>10.0}/s   ratio {:>6.2}x", cluster / peer);
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// Creates through every node in turn (a follower passes them to the leader).
fn cluster_create(urls: Vec<String>, prefix: &'static str) -> impl Fn(&ureq::Agent, usize) + Send + Sync {
    let auth = basic();
    move |agent, i| {
        let url = &urls[i % urls.len()];
        let body = json!({"name": format!("{prefix}-{i}"), "servers": [{"ip": {"addr": format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256), "type": "V4"}}]});
        let r = agent.post(&format!("{url}/api/pool")).set("Authorization", &auth).send_json(body).expect("create");
        assert_eq!(r.status(), 201);
    }
}

/// PATCH/s of 32 clients alternately adding and deleting their own server of one pool, each
/// client through its own node (client i through node i % 3).
fn cluster_patch_rate(urls: &[String], size: usize, patches: usize, clients: usize) -> f64 {
    let auth = basic();
    let created: Value = ureq::post(&format!("{}/api/pool", urls[0]))
        .set("Authorization", &auth)
        .send_json(json!({"name": format!("patched-{size}"), "servers": seed_servers(size)}))
        .expect("create pool")
        .into_json()
        .unwrap();
    let uuid = created["uuid"].as_str().unwrap().to_string();
    let paths: Vec<String> = urls.iter().map(|u| format!("{u}/api/pool/{uuid}")).collect();
    let (done, secs, _) = run_clients(clients, patches, Duration::from_secs(600), move |agent, client, step| {
        let op = if step % 2 == 0 { "add" } else { "delete" };
        let body = json!({op: {"servers": [own_server(client)]}});
        let path = &paths[client % paths.len()];
        let response = agent.request("PATCH", path).set("Authorization", &auth).send_json(body).expect("patch");
        assert_eq!(response.status(), 200);
        std::io::copy(&mut response.into_reader(), &mut std::io::sink()).unwrap();
    });
    done as f64 / secs
}

pub fn run(common: &Common, args: &ClusterArgs) {
    println!("\n== controller cluster: 3 nodes on a 3-member etcd (lease TTL {} s)", args.lease_ttl);
    let etcd = Etcd::start_in(3, Path::new("."));
    let mut nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| Node::start(&common.fulcrum, &etcd, name, &format!("127.0.0.{}", i + 1), args.lease_ttl))
        .collect();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    steady_leader(&agent, &nodes[0].url, 3, Duration::from_secs(60));
    acknowledged_write(&agent, &nodes[0].url, "warm-up", Duration::from_secs(30));
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();

    // Durable creates: the cluster, the embedded store, and etcd puts on the same etcd cluster.
    let single = start_fulcrum(&common.fulcrum);
    for clients in [1, args.clients] {
        let total = if clients == 1 { args.serial_creates } else { args.concurrent_creates };
        let prefix: &'static str = if clients == 1 { "serial" } else { "conc" };
        let cluster = run_load(clients, total, cluster_create(urls.clone(), prefix));
        let embedded = run_load(clients, total, crate::fulcrum_create(single.url.clone(), prefix));
        let first = etcd.urls[0].clone();
        let put = run_load(clients, total, crate::etcd_put(first, prefix));
        let label = format!("durable creates, {clients} client(s)");
        ratio_row(&label, cluster, "embedded store (one node)", embedded);
        ratio_row(&label, cluster, "etcd put (same 3-member etcd)", put);
    }
    drop(single);

    // PATCH/s through all three nodes, against the best etcd read-modify-write of the same pool
    // (one member, the faster of 1 and 32 clients).
    for size in [10usize, 5000 - args.clients] {
        let rate = cluster_patch_rate(&urls, size, args.patches, args.clients);
        let shape = json!({"name": format!("pool-{size}"), "default_server_port": 80, "lb_algorithm": "LB_ALGORITHM_LEAST_CONNECTIONS"});
        let best = [1, args.clients]
            .iter()
            .map(|&clients| {
                let peer_args = PatchArgs { patches: args.patches, clients, etcd_seconds: args.etcd_seconds };
                let (measured, _) = etcd_case(&peer_args, size, &shape);
                (measured.rate, clients)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        ratio_row(
            &format!("PATCH/s, pool of {size} servers, {} clients", args.clients),
            rate,
            &format!("etcd read-modify-write, {} client(s)", best.1),
            best.0,
        );
        if size > 10 {
            let ratio = rate / best.0;
            println!(
                "target >= 20x etcd at {size} servers: {ratio:.1}x {}",
                if ratio >= 20.0 { "met" } else { "NOT met" }
            );
        }
    }

    // Leader kills under load: 8 clients create through every live node all along.
    println!("-- {} leader kills (kill -9) under load", args.kills);
    let live: Arc<RwLock<Vec<String>>> = Arc::new(RwLock::new(urls.clone()));
    let failures: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|t| {
            let (live, failures, stop) = (live.clone(), failures.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
                let auth = basic();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let url = {
                        let live = live.read().unwrap();
                        live[(t + i) % live.len()].clone()
                    };
                    let body = json!({"name": format!("load-{t}-{i}")});
                    let ok = agent
                        .post(&format!("{url}/api/pool"))
                        .set("Authorization", &auth)
                        .send_json(body)
                        .is_ok_and(|r| r.status() == 201);
                    if !ok {
                        failures.lock().unwrap().push(Instant::now());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failed_total = 0;
    for kill in 0..args.kills {
        let leader_name = steady_leader(&agent, &nodes[0].url, 3, Duration::from_secs(60));
        let index = nodes.iter().position(|n| n.name == leader_name).expect("the leader is one of ours");
        let survivor = nodes[(index + 1) % nodes.len()].url.clone();
        let before = failures.lock().unwrap().len();
        *live.write().unwrap() = nodes.iter().filter(|n| n.name != leader_name).map(|n| n.url.clone()).collect();
        let killed = Instant::now();
        nodes[index].kill9();
        let took = acknowledged_write(&agent, &survivor, &format!("failover-{kill}"), Duration::from_secs(30));
        // Requests that failed from the kill until a second after the first acknowledged write.
        std::thread::sleep(Duration::from_secs(1));
        let failed = failures.lock().unwrap()[before..].iter().filter(|t| **t >= killed).count();
        failed_total += failed;
        println!(
            "failover {:>2}: {:>5.2} s until a write was acknowledged, {failed:>3} requests failed",
            kill + 1,
            took.as_secs_f64()
        );
        times.push(took.as_secs_f64());
        nodes[index].run(&common.fulcrum, &etcd, args.lease_ttl);
        steady_leader(&agent, &nodes[index].url, 3, Duration::from_secs(60));
        *live.write().unwrap() = nodes.iter().map(|n| n.url.clone()).collect();
    }
    stop.store(true, Ordering::Relaxed);
    load.into_iter().for_each(|t| t.join().expect("load thread"));
    if times.is_empty() {
        return;
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    let median = median(&mut times);
    println!(
        "failover over {} kills: median {median:.2} s, max {max:.2} s, {failed_total} requests failed in all (targets: median <= 3 s, max <= 10 s: {})",
        args.kills,
        if median <= 3.0 && max <= 10.0 { "met" } else { "NOT met" }
    );
}
