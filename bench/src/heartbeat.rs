//! SE heartbeats (issue 6): `fulcrum se-agent --simulate N` against one controller, each SE
//! heartbeating every `interval`; the controller's CPU time per 1,000 heartbeats/s. The peer is
//! etcd receiving the same rate of lease keepalives over its HTTP gateway (the way a
//! kubelet-style heartbeat would be stored), from as many leases as there are SEs.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Common, HeartbeatArgs, Process, basic, start_etcd, start_fulcrum_with};

/// CPU seconds a process has used (user + system).
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Heartbeats the controller has answered, from its request counter.
fn heartbeats_answered(url: &str) -> u64 {
    let text = ureq::get(&format!("{url}/metrics")).call().expect("metrics").into_string().unwrap();
    text.lines()
        .filter(|l| l.starts_with("fulcrum_http_requests_total") && l.contains("route=\"/api/se-agent/poll\""))
        .filter(|l| l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Measured {
    rate: f64,
    cpu_cores: f64,
}

impl Measured {
    /// CPU (in cores) spent per 1,000 heartbeats/s.
    fn per_thousand(&self) -> f64 {
        self.cpu_cores / (self.rate / 1000.0)
    }
}

fn measure(pid: u32, seconds: u64, count: &dyn Fn() -> u64) -> Measured {
    let (cpu0, n0, t0) = (cpu_seconds(pid), count(), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, n1, elapsed) = (cpu_seconds(pid), count(), t0.elapsed().as_secs_f64());
    Measured { rate: (n1 - n0) as f64 / elapsed, cpu_cores: (cpu1 - cpu0) / elapsed }
}

fn fulcrum_case(common: &Common, args: &HeartbeatArgs) -> (Measured, u64) {
    let interval = args.interval.to_string();
    let fulcrum =
        start_fulcrum_with(&common.fulcrum, None, &["--se-heartbeat-interval", &interval, "--se-down-after", "60"]);
    let agent = ureq::agent();
    let auth = basic();
    agent
        .put(&format!("{}/api/controllerlicense", fulcrum.url))
        .set("Authorization", &auth)
        .send_json(json!({"licenses": [{"license_id": "bench", "cores": args.ses}]}))
        .expect("license");
    let token: Value = agent
        .post(&format!("{}/api/sejointoken", fulcrum.url))
        .set("Authorization", &auth)
        .send_json(json!({"se_group_ref": "/api/serviceenginegroup?name=Default-Group"}))
        .expect("token")
        .into_json()
        .unwrap();
    let dir = tempfile::Builder::new().prefix("se-bench-").tempdir_in(".").unwrap();
    let child = Command::new(&common.fulcrum)
        .args(["se-agent", "--controller", &fulcrum.url, "--data-dir"])
        .arg(dir.path())
        .args(["--simulate", &args.ses.to_string(), "--cores", "1", "--name", "bench"])
        .args(["--join-token", token["token"].as_str().unwrap()])
        .env("FULCRUM_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the simulated SEs");
    let _agents = Process { child, url: String::new(), _dir: dir };
    let started = Instant::now();
    loop {
        let usage: Value = agent
            .get(&format!("{}/api/licenseusage", fulcrum.url))
            .set("Authorization", &auth)
            .call()
            .expect("license usage")
            .into_json()
            .unwrap();
        if usage["num_licensed_ses"].as_u64() == Some(args.ses as u64) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "SEs did not join: {usage}");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("  {} simulated SEs joined in {:.1} s", args.ses, started.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    let pid = fulcrum.child.id();
    let url = fulcrum.url.clone();
    let measured = measure(pid, args.seconds, &|| heartbeats_answered(&url));
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    (measured, rss / 1024)
}

fn etcd_case(args: &HeartbeatArgs) -> Measured {
    let etcd = start_etcd();
    let agent = ureq::agent();
    let leases: Vec<String> = (0..args.ses)
        .map(|_| {
            let granted: Value = agent
                .post(&format!("{}/v3/lease/grant", etcd.url))
                .send_json(json!({"TTL": 60}))
                .expect("lease grant")
                .into_json()
                .unwrap();
            granted["ID"].as_str().unwrap().to_string()
        })
        .collect();
    // As many clients as SEs would be too many threads for the load generator on 2 cores;
    // each client keeps its share of the leases alive at the same per-lease interval.
    let clients = 50.min(args.ses);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_secs_f64(args.interval);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mine: Vec<String> = leases.iter().skip(c).step_by(clients).cloned().collect();
            let (url, count, stop) = (etcd.url.clone(), count.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::agent();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    for id in &mine {
                        agent
                            .post(&format!("{url}/v3/lease/keepalive"))
                            .send_json(json!({"ID": id}))
                            .expect("keepalive");
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let measured = measure(etcd.child.id(), args.seconds, &|| count.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    measured
}

pub fn run(common: &Common, args: &HeartbeatArgs) {
    println!("\n== SE heartbeats: {} simulated SEs every {} s, {} s measured", args.ses, args.interval, args.seconds);
    let (fulcrum, rss_mib) = fulcrum_case(common, args);
    println!(
        "  fulcrum: {:.0} heartbeats/s, controller CPU {:.3} cores -> {:.3} cores per 1,000 heartbeats/s ({:.0} us each); RSS {rss_mib} MiB",
        fulcrum.rate,
        fulcrum.cpu_cores,
        fulcrum.per_thousand(),
        fulcrum.cpu_cores / fulcrum.rate * 1e6
    );
    if common.no_etcd {
        return;
    }
    let etcd = etcd_case(args);
    println!(
        "  etcd lease keepalives: {:.0}/s, etcd CPU {:.3} cores -> {:.3} cores per 1,000 keepalives/s ({:.0} us each)",
        etcd.rate,
        etcd.cpu_cores,
        etcd.per_thousand(),
        etcd.cpu_cores / etcd.rate * 1e6
    );
    println!(
        "  CPU per 1,000 heartbeats/s: fulcrum {:.3} cores, etcd {:.3} cores   ratio (etcd/fulcrum, higher is better) {:.2}x",
        fulcrum.per_thousand(),
        etcd.per_thousand(),
        etcd.per_thousand() / fulcrum.per_thousand()
    );
}
