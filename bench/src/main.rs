//! Benchmarks of the real `fulcrum` binary, each printed next to a peer measured in the same run
//! on the same disk: a local etcd (Debian's etcd-server), a plain write+fdatasync loop and, for a
//! lone client, a minimal HTTP server that makes each request durable.
//!
//! Run with `bench/run` (builds release binaries, installs etcd-server when missing).

mod asyncpatch;
mod cluster;
mod heartbeat;
mod patch;
mod proxy;
mod upgrade;
mod upload;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Fulcrum benchmarks")]
struct Cli {
    /// Which benchmark (all when omitted).
    #[command(subcommand)]
    which: Option<Which>,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Subcommand, Clone)]
enum Which {
    /// Durable creates and GETs (issue 2).
    Config(ConfigArgs),
    /// PATCH add/delete-one-server on pools of 10 and 5,000 servers (issue 3).
    Patch(PatchArgs),
    /// Async PATCH: accept rate, one merge cycle, and the same adds synchronously (issue 4).
    Async(AsyncArgs),
    /// Image upload against cp and docker-registry (issue 5).
    Upload(UploadArgs),
    /// SE heartbeats: controller CPU per 1,000 heartbeats/s, against etcd lease keepalives (issue 6).
    Heartbeat(HeartbeatArgs),
    /// Upgrade orchestration: preview time and the overhead of a system upgrade of many SEs (issue 7).
    Upgrade(UpgradeArgs),
    /// The controller cluster on etcd: creates, PATCH/s, and failover under load (issue 15).
    Cluster(ClusterArgs),
    /// The SE data plane: small HTTP responses through one SE on one core, against haproxy (issue 19).
    Proxy(ProxyArgs),
}

#[derive(clap::Args, Clone)]
struct ProxyArgs {
    /// Keep-alive client connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Pool servers.
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Seconds measured per round and proxy (after a second of warm-up).
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Rounds, alternating between the proxies; each one's best round counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args, Clone)]
struct ClusterArgs {
    /// The controllers' `--lease-ttl` (seconds; the same default as `serve`).
    #[arg(long, default_value_t = 2)]
    lease_ttl: u64,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Creates with one client.
    #[arg(long, default_value_t = 500)]
    serial_creates: usize,
    /// Creates with many clients.
    #[arg(long, default_value_t = 5000)]
    concurrent_creates: usize,
    /// PATCHes per pool size.
    #[arg(long, default_value_t = 4000)]
    patches: usize,
    /// Seconds the etcd peer may take per pool size and client count.
    #[arg(long, default_value_t = 30)]
    etcd_seconds: u64,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    kills: usize,
}

#[derive(clap::Args, Clone)]
struct UpgradeArgs {
    /// Simulated SEs in all.
    #[arg(long, default_value_t = 1000)]
    ses: usize,
    /// SE groups they are spread over.
    #[arg(long, default_value_t = 50)]
    groups: usize,
    /// SE groups upgraded at once.
    #[arg(long, default_value_t = 10)]
    concurrent: usize,
}

#[derive(clap::Args, Clone)]
struct HeartbeatArgs {
    /// Simulated SEs.
    #[arg(long, default_value_t = 500)]
    ses: usize,
    /// Seconds between one SE's heartbeats (500 SEs at 0.5 s: 1,000 heartbeats/s).
    #[arg(long, default_value_t = 0.5)]
    interval: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

#[derive(clap::Args, Clone)]
struct UploadArgs {
    /// Size of the package's payload in MiB.
    #[arg(long, default_value_t = 2048)]
    mib: usize,
    /// Rounds of the three peers, interleaved; the medians are compared (this machine's disk
    /// and memory vary by 2x from one run to the next).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(clap::Args, Clone)]
struct AsyncArgs {
    #[arg(long, default_value_t = 100_000)]
    adds: usize,
    #[arg(long, default_value_t = 100)]
    pools: usize,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How many of the same adds to send synchronously for comparison (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    sync_adds: usize,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// The fulcrum binary to measure.
    #[arg(long, default_value = "target/release/fulcrum", global = true)]
    fulcrum: PathBuf,
    /// Skip the etcd peer (when etcd is not installed).
    #[arg(long, global = true)]
    no_etcd: bool,
}

#[derive(clap::Args, Clone)]
struct PatchArgs {
    /// PATCHes per pool size.
    #[arg(long, default_value_t = 4000)]
    patches: usize,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds the etcd peer may take per pool size (it is stopped earlier when done).
    #[arg(long, default_value_t = 30)]
    etcd_seconds: u64,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// Creates with one client.
    #[arg(long, default_value_t = 2000)]
    serial_creates: usize,
    /// Creates with many clients.
    #[arg(long, default_value_t = 20000)]
    concurrent_creates: usize,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of GET-by-uuid load.
    #[arg(long, default_value_t = 5)]
    get_seconds: u64,
}

const PASSWORD: &str = "bench-password-1";

pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_fulcrum(binary: &Path) -> Process {
    start_fulcrum_with(binary, None, &[])
}

/// Starts fulcrum, trusting packages signed by `key` (a public key file), with more `serve`
/// arguments.
fn start_fulcrum_with(binary: &Path, key: Option<&Path>, args: &[&str]) -> Process {
    let dir =
        tempfile::Builder::new().prefix("fulcrum-bench-").tempdir_in(".").expect("temp dir on the project's disk");
    let mut command = Command::new(binary);
    command.args(["serve", "--plain-http", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path());
    if let Some(key) = key {
        command.arg("--trusted-key").arg(key);
    }
    command.args(args);
    let (child, url) = spawn_listening(&mut command);
    Process { child, url, _dir: dir }
}

/// Starts `fulcrum serve` (as `command` says) and waits for the line saying where it listens;
/// its output is drained from then on.
pub(crate) fn spawn_listening(command: &mut Command) -> (Child, String) {
    let mut child = command
        .env("FULCRUM_ADMIN_PASSWORD", PASSWORD)
        .env("FULCRUM_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start fulcrum");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("fulcrum exited").unwrap();
        if let Some(url) = line.strip_prefix("fulcrum listening on ") {
            break url.to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_etcd() -> Process {
    let dir = tempfile::Builder::new().prefix("etcd-bench-").tempdir_in(".").unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd (apt-get install etcd-server)");
    let process = Process { child, url, _dir: dir };
    let agent = ureq::agent();
    for _ in 0..200 {
        if agent.get(&format!("{}/health", process.url)).call().is_ok() {
            return process;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("etcd did not become healthy");
}

fn basic() -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}")))
}

/// Runs `total` operations over `clients` threads; returns operations per second.
fn run_load(clients: usize, total: usize, op: impl Fn(&ureq::Agent, usize) + Send + Sync + 'static) -> f64 {
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().max_idle_connections_per_host(4).build();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    op(&agent, i);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("load thread"));
    total as f64 / started.elapsed().as_secs_f64()
}

/// Runs operations for `seconds` over `clients` threads; returns operations per second.
fn run_for(clients: usize, seconds: u64, op: impl Fn(&ureq::Agent, usize) + Send + Sync + 'static) -> f64 {
    let op = Arc::new(op);
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let (op, done) = (op.clone(), done.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().max_idle_connections_per_host(4).build();
                let mut i = t;
                while Instant::now() < deadline {
                    op(&agent, i);
                    i += clients;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("load thread"));
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn fulcrum_create(url: String, prefix: &'static str) -> impl Fn(&ureq::Agent, usize) + Send + Sync {
    let auth = basic();
    move |agent, i| {
        let body = json!({"name": format!("{prefix}-{i}"), "servers": [{"ip": {"addr": format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256), "type": "V4"}}]});
        let r = agent.post(&format!("{url}/api/pool")).set("Authorization", &auth).send_json(body).expect("create");
        assert_eq!(r.status(), 201);
    }
}

/// The same request as [`fulcrum_create`], to the minimal durable server.
fn minimal_create(url: String) -> impl Fn(&ureq::Agent, usize) + Send + Sync {
    move |agent, i| {
        let body = json!({"name": format!("serial-{i}"), "servers": [{"ip": {"addr": "10.0.0.1", "type": "V4"}}]});
        let r = agent.post(&format!("{url}/api/pool")).send_json(body).expect("minimal create");
        assert_eq!(r.status(), 201);
    }
}

fn etcd_put(url: String, prefix: &'static str) -> impl Fn(&ureq::Agent, usize) + Send + Sync {
    move |agent, i| {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let value = json!({"name": format!("{prefix}-{i}"), "servers": [{"ip": {"addr": "10.0.0.1", "type": "V4"}, "port": 80}]});
        let body = json!({"key": b64(&format!("/pools/{prefix}-{i}")), "value": b64(&value.to_string())});
        agent.post(&format!("{url}/v3/kv/put")).send_json(body).expect("etcd put");
    }
}

/// The disk's own ceiling: appending a 1 KiB record and fdatasync-ing it, one at a time.
fn fsync_rate(count: usize) -> f64 {
    let dir = tempfile::Builder::new().prefix("fsync-bench-").tempdir_in(".").unwrap();
    let mut f = std::fs::File::create(dir.path().join("log")).unwrap();
    let record = [7u8; 1024];
    let started = Instant::now();
    for _ in 0..count {
        f.write_all(&record).unwrap();
        f.sync_data().unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The disk's pace as an HTTP client sees it: a minimal keep-alive server (no routing, no JSON,
/// no auth) that writes each request's body in place into a zero-filled, preallocated file and
/// fdatasyncs it before answering 201 — one round trip plus the cheapest durable write. No
/// HTTP API that stores its writes can beat it; it shows how much of a lone client's time is
/// the round trip itself. Returns where it listens.
fn start_minimal_durable_server() -> (String, tempfile::TempDir) {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    // Enough for the serial creates many times over; writes wrap around within it.
    const CAPACITY: u64 = 16 << 20;
    let dir = tempfile::Builder::new().prefix("minimal-http-").tempdir_in(".").unwrap();
    let file = std::fs::File::create(dir.path().join("log")).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for offset in (0..CAPACITY).step_by(zeros.len()) {
        file.write_all_at(&zeros, offset).unwrap();
    }
    file.sync_all().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let file = Arc::new(file);
        let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for stream in listener.incoming() {
            let (Ok(mut stream), file, offset) = (stream, file.clone(), offset.clone()) else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    // One whole request: its head, then Content-Length bytes of body.
                    let (body_at, end) = loop {
                        if let Some((body_at, end)) = message_extent(&buf).filter(|(_, end)| buf.len() >= *end) {
                            break (body_at, end);
                        }
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let body = &buf[body_at..end];
                    let at = offset.fetch_add(body.len() as u64, Ordering::Relaxed) % (CAPACITY - 65536);
                    file.write_all_at(body, at).unwrap();
                    file.sync_data().unwrap();
                    let answer =
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if stream.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    buf.drain(..end);
                }
            });
        }
    });
    (url, dir)
}

/// Where the HTTP/1.1 message `data` starts with has its body and where it ends (head plus
/// `Content-Length` bytes), once its head is in.
pub(crate) fn message_extent(data: &[u8]) -> Option<(usize, usize)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    Some((end + 4, end + 4 + length))
}

fn row(name: &str, fulcrum: f64, peer_name: &str, peer: f64) {
    println!("{name:<44} fulcrum {fulcrum:>10.0}/s   {peer_name:<22} {peer:>10.0}/s   ratio {:>6.2}x", fulcrum / peer);
}

fn main() {
    let cli = Cli::parse();
    println!("machine: {} cores, {}", std::thread::available_parallelism().map_or(0, |n| n.get()), machine());
    match cli.which {
        Some(Which::Config(args)) => config(&cli.common, &args),
        Some(Which::Patch(args)) => patch::run(&cli.common, &args),
        Some(Which::Async(args)) => asyncpatch::run(&cli.common, &args),
        Some(Which::Upload(args)) => upload::run_upload(&cli.common, &args),
        Some(Which::Heartbeat(args)) => heartbeat::run(&cli.common, &args),
        Some(Which::Upgrade(args)) => upgrade::run(&cli.common, &args),
        Some(Which::Cluster(args)) => cluster::run(&cli.common, &args),
        Some(Which::Proxy(args)) => proxy::run(&cli.common, &args),
        None => {
            config(&cli.common, &defaults::<ConfigArgs>());
            patch::run(&cli.common, &defaults::<PatchArgs>());
            asyncpatch::run(&cli.common, &defaults::<AsyncArgs>());
            upload::run_upload(&cli.common, &defaults::<UploadArgs>());
            heartbeat::run(&cli.common, &defaults::<HeartbeatArgs>());
            upgrade::run(&cli.common, &defaults::<UpgradeArgs>());
            cluster::run(&cli.common, &defaults::<ClusterArgs>());
            proxy::run(&cli.common, &defaults::<ProxyArgs>());
        }
    }
}

/// A subcommand's arguments with every option at its default, taken from the clap definitions
/// (so defaults are written once).
fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let matches = T::augment_args(clap::Command::new("defaults")).get_matches_from(["defaults"]);
    T::from_arg_matches(&matches).expect("defaults parse")
}

fn config(common: &Common, args: &ConfigArgs) {
    println!("\n== configuration API: durable creates and GET by uuid");
    let fulcrum = start_fulcrum(&common.fulcrum);
    let etcd = (!common.no_etcd).then(start_etcd);

    let disk = fsync_rate(2000);
    let serial = run_load(1, args.serial_creates, fulcrum_create(fulcrum.url.clone(), "serial"));
    row("durable creates, 1 client", serial, "write+fdatasync loop", disk);
    let (minimal, _minimal_dir) = start_minimal_durable_server();
    let floor = run_load(1, args.serial_creates, minimal_create(minimal));
    row("durable creates, 1 client", serial, "minimal HTTP+fdatasync", floor);
    if let Some(etcd) = &etcd {
        let e = run_load(1, args.serial_creates, etcd_put(etcd.url.clone(), "serial"));
        row("durable creates, 1 client", serial, "etcd put, 1 client", e);
    }
    let concurrent = run_load(args.clients, args.concurrent_creates, fulcrum_create(fulcrum.url.clone(), "conc"));
    row(&format!("durable creates, {} clients", args.clients), concurrent, "write+fdatasync loop", disk);
    if let Some(etcd) = &etcd {
        let e = run_load(args.clients, args.concurrent_creates, etcd_put(etcd.url.clone(), "conc"));
        row(
            &format!("durable creates, {} clients", args.clients),
            concurrent,
            &format!("etcd put, {} clients", args.clients),
            e,
        );
    }

    // GET by uuid over the pools just made.
    let auth = basic();
    let listing: Value = ureq::get(&format!("{}/api/pool?page_size=200&fields=uuid", fulcrum.url))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let uuids: Arc<Vec<String>> = Arc::new(
        listing["results"].as_array().unwrap().iter().map(|p| p["uuid"].as_str().unwrap().to_string()).collect(),
    );
    let url = fulcrum.url.clone();
    let ids = uuids.clone();
    let gets = run_for(args.clients, args.get_seconds, move |agent, i| {
        let r = agent
            .get(&format!("{url}/api/pool/{}", ids[i % ids.len()]))
            .set("Authorization", &auth)
            .call()
            .expect("get");
        assert_eq!(r.status(), 200);
    });
    if let Some(etcd) = &etcd {
        let url = etcd.url.clone();
        let e = run_for(args.clients, args.get_seconds, move |agent, i| {
            let key = base64::engine::general_purpose::STANDARD.encode(format!("/pools/conc-{}", i % 200));
            agent.post(&format!("{url}/v3/kv/range")).send_json(json!({"key": key})).expect("etcd get");
        });
        row(&format!("GET by uuid, {} clients", args.clients), gets, "etcd range, 32 clients", e);
    } else {
        println!("GET by uuid, {} clients: {gets:.0}/s", args.clients);
    }
    let target = 5000.0;
    println!(
        "target: >= {target} durable creates/s with 32 clients: {}",
        if concurrent >= target { "met" } else { "NOT met" }
    );
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    format!("{cpu}, {mem} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_clap_definitions() {
        let a: AsyncArgs = defaults();
        assert_eq!((a.adds, a.pools, a.clients, a.sync_adds), (100_000, 100, 64, 100_000));
        let c: ConfigArgs = defaults();
        assert_eq!((c.concurrent_creates, c.clients), (20_000, 32));
        let p: PatchArgs = defaults();
        assert_eq!(p.patches, 4000);
    }
}
