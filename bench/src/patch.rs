//! PATCH add/delete-one-server throughput on pools of 10 and ~5,000 servers, and bytes written
//! per PATCH, against etcd storing the same pool the Kubernetes way (get the whole JSON, change
//! it, put it back if its revision is unchanged, retry otherwise).

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::{Common, PatchArgs, basic, start_etcd, start_fulcrum};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes the process caused to be written to storage so far (`write_bytes` of /proc/PID/io).
fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| io.lines().find_map(|l| l.strip_prefix("write_bytes:").map(|v| v.trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// Each client alternates adding its own server and deleting it again, so the pool stays at its
/// size give or take one server per client. Returns (operations done, seconds), and the
/// latencies of all operations.
pub(crate) fn run_clients(
    clients: usize,
    total: usize,
    max: Duration,
    op: impl Fn(&ureq::Agent, usize, usize) + Send + Sync + 'static,
) -> (usize, f64, Latencies) {
    let op = Arc::new(op);
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let per_client = total.div_ceil(clients);
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let (op, done) = (op.clone(), done.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
                let mut took = Vec::with_capacity(per_client);
                for step in 0..per_client {
                    if started.elapsed() > max {
                        break;
                    }
                    let one = Instant::now();
                    op(&agent, client, step);
                    took.push(one.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                took
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().expect("client thread")).collect();
    all.sort_unstable();
    (done.load(Ordering::Relaxed), started.elapsed().as_secs_f64(), Latencies(all))
}

/// Operation latencies, sorted.
pub(crate) struct Latencies(Vec<Duration>);

impl Latencies {
    /// The latency `q` (0..=1) of the operations were at or under, in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i].as_secs_f64() * 1000.0
    }
}

pub(crate) fn own_server(client: usize) -> Value {
    json!({"ip": {"addr": format!("10.250.{client}.1"), "type": "V4"}})
}

pub(crate) fn seed_servers(count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| json!({"ip": {"addr": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256), "type": "V4"}}))
        .collect()
}

pub(crate) struct Measured {
    pub(crate) rate: f64,
    bytes_per_op: f64,
    latencies: Latencies,
}

impl Measured {
    /// Rate, bytes written and latencies, as the report prints them.
    fn summary(&self) -> String {
        format!(
            "{:>8.0} PATCH/s, {:>8.0} bytes written per PATCH, p50 {:.1} ms, p99 {:.1} ms",
            self.rate,
            self.bytes_per_op,
            self.latencies.ms(0.5),
            self.latencies.ms(0.99)
        )
    }
}

fn fulcrum_case(common: &Common, args: &PatchArgs, size: usize) -> Measured {
    let fulcrum = start_fulcrum(&common.fulcrum);
    let auth = basic();
    let created: Value = ureq::post(&format!("{}/api/pool", fulcrum.url))
        .set("Authorization", &auth)
        .send_json(json!({"name": format!("pool-{size}"), "servers": seed_servers(size)}))
        .expect("create pool")
        .into_json()
        .unwrap();
    let path = format!("{}/api/pool/{}", fulcrum.url, created["uuid"].as_str().unwrap());
    let pid = fulcrum.child.id();
    let before = write_bytes(pid);
    let (done, secs, latencies) =
        run_clients(args.clients, args.patches, Duration::from_secs(600), move |agent, client, step| {
            let op = if step % 2 == 0 { "add" } else { "delete" };
            let body = json!({op: {"servers": [own_server(client)]}});
            let response = agent.request("PATCH", &path).set("Authorization", &auth).send_json(body).expect("patch");
            assert_eq!(response.status(), 200);
            // Read the whole answer (the full pool), as a client would.
            std::io::copy(&mut response.into_reader(), &mut std::io::sink()).unwrap();
        });
    let written = write_bytes(pid) - before;
    Measured { rate: done as f64 / secs, bytes_per_op: written as f64 / done as f64, latencies }
}

pub(crate) fn etcd_case(args: &PatchArgs, size: usize, stored_pool: &Value) -> (Measured, usize) {
    let etcd = start_etcd();
    let key = b64(format!("/registry/pools/pool-{size}").as_bytes());
    let mut pool = stored_pool.clone();
    pool["servers"] = Value::Array(
        seed_servers(size)
            .into_iter()
            .map(|mut s| {
                let addr = s["ip"]["addr"].clone();
                s["port"] = json!(80);
                s["ratio"] = json!(1);
                s["enabled"] = json!(true);
                s["hostname"] = addr;
                s
            })
            .collect(),
    );
    ureq::post(&format!("{}/v3/kv/put", etcd.url))
        .send_json(json!({"key": key, "value": b64(pool.to_string().as_bytes())}))
        .expect("seed etcd");
    let pid = etcd.child.id();
    let before = write_bytes(pid);
    let conflicts = Arc::new(AtomicUsize::new(0));
    let (url, counter) = (etcd.url.clone(), conflicts.clone());
    let (done, secs, latencies) =
        run_clients(args.clients, args.patches, Duration::from_secs(args.etcd_seconds), move |agent, client, step| {
            loop {
                let range: Value = agent
                    .post(&format!("{url}/v3/kv/range"))
                    .send_json(json!({"key": key}))
                    .expect("range")
                    .into_json()
                    .unwrap();
                let kv = &range["kvs"][0];
                let revision = kv["mod_revision"].as_str().unwrap().to_string();
                let raw = base64::engine::general_purpose::STANDARD.decode(kv["value"].as_str().unwrap()).unwrap();
                let mut pool: Value = serde_json::from_slice(&raw).unwrap();
                let servers = pool["servers"].as_array_mut().unwrap();
                let mine = own_server(client);
                if step % 2 == 0 {
                    let mut server = mine;
                    server["port"] = json!(80);
                    servers.push(server);
                } else {
                    servers.retain(|s| s["ip"]["addr"] != mine["ip"]["addr"]);
                }
                let txn = json!({
                    "compare": [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision}],
                    "success": [{"request_put": {"key": key, "value": b64(pool.to_string().as_bytes())}}],
                });
                let mut answer = String::new();
                agent
                    .post(&format!("{url}/v3/kv/txn"))
                    .send_json(txn)
                    .expect("txn")
                    .into_reader()
                    .read_to_string(&mut answer)
                    .unwrap();
                let answer: Value = serde_json::from_str(&answer).unwrap();
                if answer["succeeded"] == json!(true) {
                    return;
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    let written = write_bytes(pid) - before;
    (
        Measured { rate: done as f64 / secs, bytes_per_op: written as f64 / done.max(1) as f64, latencies },
        conflicts.load(Ordering::Relaxed),
    )
}

pub fn run(common: &Common, args: &PatchArgs) {
    println!("\n== PATCH add/delete one server, {} clients, {} PATCHes per pool size", args.clients, args.patches);
    let mut results = vec![];
    // fulcrum's cases first: each etcd case ends by deleting a data directory of up to a few
    // hundred MB, whose writeback and discards (this disk is mounted with `discard`) would
    // otherwise fall into the next fulcrum case.
    let sizes = [10usize, 5000 - args.clients];
    let measured: Vec<Measured> = sizes.iter().map(|&size| fulcrum_case(common, args, size)).collect();
    for (size, f) in sizes.into_iter().zip(measured) {
        println!("pool of {size:>5} servers: fulcrum {}", f.summary());
        if !common.no_etcd {
            // The stored form of a pool without its servers, so both sides hold the same bytes.
            let shape = json!({"name": format!("pool-{size}"), "default_server_port": 80, "lb_algorithm": "LB_ALGORITHM_LEAST_CONNECTIONS"});
            // The peer at its best: one client (no conflicts) or as many as fulcrum has.
            let mut best: Option<Measured> = None;
            for clients in [1, args.clients] {
                let peer_args = PatchArgs { patches: args.patches, clients, etcd_seconds: args.etcd_seconds };
                let (e, conflicts) = etcd_case(&peer_args, size, &shape);
                println!(
                    "pool of {size:>5} servers: etcd, {clients:>2} client(s) {} ({conflicts} revision conflicts retried)",
                    e.summary()
                );
                if best.as_ref().is_none_or(|b| e.rate > b.rate) {
                    best = Some(e);
                }
            }
            let e = best.expect("measured");
            println!("pool of {size:>5} servers: fulcrum / best etcd throughput ratio {:.1}x", f.rate / e.rate);
            results.push((size, f, Some(e)));
        } else {
            results.push((size, f, None));
        }
    }
    let (small, big) = (&results[0].1, &results[1].1);
    println!(
        "bytes per PATCH at ~5000 servers / at 10 servers: {:.2} (target <= 2)",
        big.bytes_per_op / small.bytes_per_op
    );
    for (size, f, e) in &results {
        if let Some(e) = e {
            let target = if *size == 10 { 15.0 } else { 40.0 };
            let ratio = f.rate / e.rate;
            println!(
                "target >= {target}x the best etcd at {size} servers: {:.1}x {}",
                ratio,
                if ratio >= target { "met" } else { "NOT met" }
            );
        }
    }
    let p99 = results[1].1.latencies.ms(0.99);
    println!(
        "target p99 <= 50 ms at {} servers: {p99:.1} ms {}",
        results[1].0,
        if p99 <= 50.0 { "met" } else { "NOT met" }
    );
}
