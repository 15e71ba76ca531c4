//! The SE data plane (issue 19): requests/s and latency of small HTTP responses through one SE
//! pinned to one core, against Debian's haproxy 2.6 pinned to the same core, with the same
//! backends, the same keep-alive client and the same number of connections, in the same run.
//! haproxy runs in its best configuration for this: one thread, `http-reuse always`,
//! keep-alive on both sides, `option forwardfor` as the SE adds `X-Forwarded-For`.
//!
//! The client and the backends run on the other core; the proxy's CPU use is printed so a run
//! where the client could not keep a proxy busy shows as such.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Common, ProxyArgs, basic, start_fulcrum_with};

/// The proxies' core; the client and backends get the rest.
const PROXY_CORE: &str = "1";
const CLIENT_CORES: &str = "0";
const BODY: &[u8] = b"hello from the backend\n";

fn pin_self_to(cores: &str) {
    let pid = std::process::id().to_string();
    // Every thread of this process, present and future, runs on the client cores.
    let _ = Command::new("taskset").args(["-a", "-p", "-c", cores, &pid]).stdout(Stdio::null()).status();
}

/// A keep-alive HTTP/1.1 backend: a thread per connection, the same small answer to everything.
fn backend(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).expect("backend");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", BODY.len());
                let mut answer = answer.into_bytes();
                answer.extend_from_slice(BODY);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if writer.write_all(&answer).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr
}

struct Run {
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    failed: u64,
    proxy_cores: f64,
}

/// `connections` keep-alive clients, each sending the next request when the answer is in,
/// for `seconds`; latencies of every request.
fn load(vip: SocketAddr, connections: usize, seconds: u64, proxy_pid: u32) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    // Only what happens between the warm-up and the end counts.
    let measuring = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, measuring) = (stop.clone(), measuring.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut failed = 0u64;
                let request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
                let mut buffer = vec![0u8; 4096];
                'connect: while !stop.load(Ordering::Relaxed) {
                    let Ok(mut stream) = TcpStream::connect(vip) else {
                        failed += 1;
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        if stream.write_all(request).is_err() {
                            failed += 1;
                            continue 'connect;
                        }
                        // The answer is small: read until its head and body are in.
                        let mut have = 0;
                        loop {
                            match stream.read(&mut buffer[have..]) {
                                Ok(0) | Err(_) => {
                                    failed += 1;
                                    continue 'connect;
                                }
                                Ok(n) => have += n,
                            }
                            if complete(&buffer[..have]) {
                                break;
                            }
                            if have == buffer.len() {
                                failed += 1;
                                continue 'connect;
                            }
                        }
                        if measuring.load(Ordering::Relaxed) {
                            latencies.push(started.elapsed().as_micros() as u32);
                        }
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    // A second of warm-up is left out of the measurement.
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = crate::heartbeat::cpu_seconds(proxy_pid);
    measuring.store(true, Ordering::Relaxed);
    let counted_from = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    measuring.store(false, Ordering::Relaxed);
    let cpu1 = crate::heartbeat::cpu_seconds(proxy_pid);
    let elapsed = counted_from.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut failed = 0;
    for t in threads {
        let (l, f) = t.join().expect("client thread");
        all.extend(l);
        failed += f;
    }
    all.sort_unstable();
    let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied();
    Run {
        rate: all.len() as f64 / elapsed,
        p50_us: at(0.5).unwrap_or(0) as u64,
        p99_us: at(0.99).unwrap_or(0) as u64,
        failed,
        proxy_cores: (cpu1 - cpu0) / elapsed,
    }
}

/// Whether `data` holds a whole response (head plus `Content-Length` body).
fn complete(data: &[u8]) -> bool {
    crate::message_extent(data).is_some_and(|(_, end)| data.len() >= end)
}

fn wait_answers(vip: SocketAddr) {
    for _ in 0..400 {
        if ureq::get(&format!("http://{vip}/")).timeout(Duration::from_secs(1)).call().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing answers on {vip}");
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(backends: &[SocketAddr], vip: SocketAddr, dir: &std::path::Path) -> Killed {
    let servers: String = backends.iter().enumerate().map(|(i, b)| format!("  server s{i} {b}\n")).collect();
    let config = format!(
        "global\n  nbthread 1\n  maxconn 4096\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n  option http-keep-alive\n  option forwardfor\n\nfrontend f\n  bind {vip}\n  \
         default_backend b\n\nbackend b\n  balance roundrobin\n  http-reuse always\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("taskset")
        .args(["-c", PROXY_CORE, "haproxy", "-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy (apt-get install haproxy)");
    Killed(child)
}

fn api(url: &str, method: &str, path: &str, body: Value) -> Value {
    let r = ureq::request(method, &format!("{url}{path}")).set("Authorization", &basic()).send_json(body);
    match r {
        Ok(r) => r.into_json().unwrap_or(Value::Null),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// One SE on the proxy core, serving a virtual service on `vip` to `backends`.
fn fulcrum_se(
    common: &Common,
    backends: &[SocketAddr],
    vip: SocketAddr,
    dir: &std::path::Path,
) -> (crate::Process, Killed) {
    let controller = start_fulcrum_with(&common.fulcrum, None, &["--se-heartbeat-interval", "1"]);
    let url = controller.url.clone();
    let token =
        api(&url, "POST", "/api/sejointoken", json!({"se_group_ref": "/api/serviceenginegroup?name=Default-Group"}));
    let agent = Command::new("taskset")
        .args(["-c", PROXY_CORE])
        .arg(&common.fulcrum)
        .args(["se-agent", "--controller", &url, "--name", "bench-se", "--data-dir"])
        .arg(dir.join("se"))
        .args(["--join-token", token["token"].as_str().unwrap()])
        .env("FULCRUM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the SE agent");
    let servers: Vec<Value> =
        backends.iter().map(|b| json!({"ip": {"addr": b.ip().to_string(), "type": "V4"}, "port": b.port()})).collect();
    let pool = api(
        &url,
        "POST",
        "/api/pool",
        json!({"name": "bench", "lb_algorithm": "LB_ALGORITHM_ROUND_ROBIN", "servers": servers}),
    );
    let vsvip = api(
        &url,
        "POST",
        "/api/vsvip",
        json!({"name": "bench-vip", "vip": [{"vip_id": "0", "ip_address": {"addr": vip.ip().to_string(), "type": "V4"}}]}),
    );
    api(
        &url,
        "POST",
        "/api/virtualservice",
        json!({"name": "bench-vs", "services": [{"port": vip.port()}],
               "vsvip_ref": format!("/api/vsvip/{}", vsvip["uuid"].as_str().unwrap()),
               "pool_ref": format!("/api/pool/{}", pool["uuid"].as_str().unwrap())}),
    );
    (controller, Killed(agent))
}

fn print(name: &str, r: &Run) {
    println!(
        "{name:<30} {:>9.0} req/s   p50 {:>6} us   p99 {:>6} us   failed {:>3}   proxy CPU {:.2} cores",
        r.rate, r.p50_us, r.p99_us, r.failed, r.proxy_cores
    );
}

pub fn run(common: &Common, args: &ProxyArgs) {
    println!(
        "== SE data plane: {} keep-alive connections, {} backends, {} rounds of {} s per proxy, proxy on core {PROXY_CORE}, client on {CLIENT_CORES}",
        args.connections, args.backends, args.rounds, args.seconds
    );
    pin_self_to(CLIENT_CORES);
    let dir = tempfile::Builder::new().prefix("proxy-bench-").tempdir_in(".").unwrap();
    let backends: Vec<SocketAddr> = (0..args.backends).map(|i| backend(&format!("127.0.0.{}", 101 + i))).collect();

    let se_vip: SocketAddr = format!("127.0.0.90:{}", free_port("127.0.0.90")).parse().unwrap();
    let (controller, agent) = fulcrum_se(common, &backends, se_vip, dir.path());
    wait_answers(se_vip);
    let haproxy_vip: SocketAddr = format!("127.0.0.91:{}", free_port("127.0.0.91")).parse().unwrap();
    let proxy = haproxy(&backends, haproxy_vip, dir.path());
    wait_answers(haproxy_vip);
    // Rounds alternate between the two, so a slow spell of the machine hits both; each side's
    // best round is compared.
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 1..=args.rounds {
        let se = load(se_vip, args.connections, args.seconds, agent.0.id());
        print(&format!("round {round}: fulcrum SE"), &se);
        ours.push(se);
        // taskset execs haproxy in place: the pid is haproxy's.
        let peer = load(haproxy_vip, args.connections, args.seconds, proxy.0.id());
        print(&format!("round {round}: haproxy"), &peer);
        theirs.push(peer);
    }
    drop((proxy, agent, controller));
    let best = |runs: Vec<Run>| runs.into_iter().max_by(|a, b| a.rate.total_cmp(&b.rate)).expect("a round");
    let (fulcrum, peer) = (best(ours), best(theirs));
    print("best: fulcrum SE", &fulcrum);
    print("best: haproxy 2.6 (nbthread 1)", &peer);
    let ratio = fulcrum.rate / peer.rate;
    println!("ratio (requests/s) {ratio:.2}x; p99 {} us vs {} us", fulcrum.p99_us, peer.p99_us);
    println!("target: >= 0.8x haproxy's requests/s: {}", if ratio >= 0.8 { "met" } else { "NOT met" });
    if fulcrum.proxy_cores < 0.9 && peer.proxy_cores < 0.9 {
        println!("note: neither proxy used its whole core: the client side may have been the limit");
    }
}
