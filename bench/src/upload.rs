//! Image upload (issue 5): a 2 GiB package uploaded to fulcrum (multipart, as curl -F sends
//! it), against `cp` + fsync of the same file on the same disk, and against Debian's
//! docker-registry (the CNCF distribution registry) receiving the same bytes as a monolithic
//! blob upload. All three read the source from the page cache (it was just written).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{Common, PASSWORD, Process, UploadArgs, free_port, start_fulcrum_with};

fn run(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().expect("run a command");
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// VmRSS or VmHWM of a process, in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn build_package(dir: &Path, fulcrum: &Path, mib: usize) -> std::path::PathBuf {
    let se = dir.join("se/lib");
    std::fs::create_dir_all(&se).unwrap();
    let mut file = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(se.join("payload")).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    let key = dir.join("bench");
    run(Command::new(fulcrum).args(["pkg", "keygen", "--out"]).arg(&key));
    let out = dir.join("se_patch.pkg");
    run(Command::new(fulcrum)
        .args(["pkg", "build", "--kind", "se_patch", "--version", "30.2.9", "--build", "1", "--patch", "1p1"])
        .arg("--se-dir")
        .arg(dir.join("se"))
        .arg("--key")
        .arg(dir.join("bench.secret"))
        .arg("-o")
        .arg(&out));
    std::fs::remove_dir_all(dir.join("se")).unwrap();
    out
}

fn start_registry(dir: &Path) -> Process {
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ureq::get(&format!("{url}/v2/")).call().is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Process { child, url, _dir: tempfile::tempdir().unwrap() }
}

fn throughput(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Reads a file to the end, so that every peer starts from the same warm page cache.
fn warm(path: &Path) {
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut std::io::sink()).unwrap();
}

/// cp, then fsync of the copy: what any durable write of these bytes costs on this disk.
fn time_cp(package: &Path, dir: &Path) -> Duration {
    let copy = dir.join("copy.pkg");
    let started = Instant::now();
    run(Command::new("cp").arg(package).arg(&copy));
    std::fs::File::open(&copy).unwrap().sync_all().unwrap();
    let elapsed = started.elapsed();
    std::fs::remove_file(&copy).unwrap();
    elapsed
}

/// One upload to a fresh controller; returns the time and the controller's RSS before the
/// upload and at its peak.
fn time_fulcrum(common: &Common, package: &Path, key: &Path) -> (Duration, (u64, u64)) {
    let fulcrum = start_fulcrum_with(&common.fulcrum, Some(key), &[]);
    let pid = fulcrum.child.id();
    let rss_before = memory(pid, "VmRSS");
    let started = Instant::now();
    let out = run(Command::new("curl")
        .args(["-sS", "-X", "POST", "-u", &format!("admin:{PASSWORD}"), "-o", "/dev/null", "-w", "%{http_code}"])
        .arg("-F")
        .arg(format!("file=@{}", package.display()))
        .arg(format!("{}/api/image", fulcrum.url)));
    let elapsed = started.elapsed();
    assert_eq!(out.trim(), "201", "the upload must succeed");
    (elapsed, (rss_before, memory(pid, "VmHWM")))
}

/// One monolithic blob upload (POST, then PUT with the digest) to a fresh registry.
fn time_registry(package: &Path, digest: &str, dir: &Path) -> Duration {
    let root = tempfile::tempdir_in(dir).unwrap();
    let registry = start_registry(root.path());
    let started = Instant::now();
    let start = ureq::post(&format!("{}/v2/bench/blobs/uploads/", registry.url)).call().expect("start a blob upload");
    let location = start.header("Location").expect("an upload location").to_string();
    let location = if location.starts_with("http") { location } else { format!("{}{location}", registry.url) };
    let separator = if location.contains('?') { '&' } else { '?' };
    let out = run(Command::new("curl")
        .args(["-sS", "-X", "PUT", "-H", "Content-Type: application/octet-stream", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "-T"])
        .arg(package)
        .arg(format!("{location}{separator}digest=sha256:{digest}")));
    let elapsed = started.elapsed();
    assert_eq!(out.trim(), "201", "the registry must accept the blob");
    elapsed
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn show(label: &str, size: u64, times: &[Duration]) -> f64 {
    let m = median(times.to_vec());
    let all: Vec<String> = times.iter().map(|t| format!("{:.2}", t.as_secs_f64())).collect();
    println!(
        "{label:<44} {:>8.0} MiB/s  (median {:.2} s of {} s)",
        throughput(size, m),
        m.as_secs_f64(),
        all.join(", ")
    );
    throughput(size, m)
}

pub fn run_upload(common: &Common, args: &UploadArgs) {
    println!("\n== image upload: a {} MiB package, {} interleaved rounds", args.mib, args.rounds);
    let dir = tempfile::Builder::new().prefix("upload-bench-").tempdir_in(".").expect("temp dir on the project's disk");
    let package = build_package(dir.path(), &common.fulcrum, args.mib);
    let key = dir.path().join("bench.pub");
    let size = std::fs::metadata(&package).unwrap().len();
    let digest: String = {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&package).unwrap(), &mut hasher).unwrap();
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
    };

    let (mut cp, mut fulcrum, mut registry, mut rss) = (vec![], vec![], vec![], (0u64, 0u64));
    for _ in 0..args.rounds.max(1) {
        warm(&package);
        cp.push(time_cp(&package, dir.path()));
        warm(&package);
        let (time, (before, peak)) = time_fulcrum(common, &package, &key);
        fulcrum.push(time);
        if peak.saturating_sub(before) >= rss.1.saturating_sub(rss.0) {
            rss = (before, peak);
        }
        warm(&package);
        registry.push(time_registry(&package, &digest, dir.path()));
    }
    let f = show("fulcrum upload (multipart, verified, fsync)", size, &fulcrum);
    let c = show("cp + fsync", size, &cp);
    let r = show("docker-registry monolithic blob upload", size, &registry);
    println!("ratio vs cp {:.2}x (target >= 0.8), vs docker-registry {:.2}x (target >= 1.0)", f / c, f / r);
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "controller RSS (the round that grew most): {:.1} MiB before, peak {:.1} MiB, growth {:.1} MiB (target <= 64)",
        mib(rss.0),
        mib(rss.1),
        mib(rss.1.saturating_sub(rss.0))
    );
}
