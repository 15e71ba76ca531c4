//! A real etcd on 127.0.0.1 (Debian's `etcd-server`; `./scripts/test` installs it), one member
//! or more, with the settings a Fulcrum cluster needs. Shared by the cluster's tests, the store's
//! tests and the cluster benchmark (both include it by path).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// etcd transactions must allow this many operations (see `fulcrum_store::etcd`).
const MAX_TXN_OPS: &str = "4096";

pub struct Etcd {
    members: Vec<Child>,
    /// The client URLs, one per member.
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// Whether the etcd member on `port` says it is healthy. Asking for etcd's own answer, not just
/// a connection: a socket on a free local port can connect to itself, or to another listener.
fn answers_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.") && answer.contains("\"health\":\"true\"")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts `size` members and waits until each answers that it is healthy.
    pub fn start(size: usize) -> Etcd {
        Etcd::start_in(size, &std::env::temp_dir())
    }

    /// [`Etcd::start`] with the members' data under `parent` (the benchmarks keep it on the
    /// project's disk, as the other peers').
    pub fn start_in(size: usize, parent: &std::path::Path) -> Etcd {
        // A port picked free can be taken by another test before etcd binds it; etcd then
        // exits, and the cluster is started again on other ports.
        for _ in 0..3 {
            if let Some(etcd) = Etcd::try_start(size, parent) {
                return etcd;
            }
        }
        panic!("etcd did not start in 3 attempts (its ports were taken, or it fails at start)");
    }

    fn try_start(size: usize, parent: &std::path::Path) -> Option<Etcd> {
        let dir = tempfile::Builder::new().prefix("fulcrum-etcd-").tempdir_in(parent).unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{client}");
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                .args(["--max-txn-ops", MAX_TXN_OPS])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd is installed (apt-get install etcd-server; ./scripts/test does it)");
            members.push(child);
            urls.push(url);
        }
        let mut etcd = Etcd { members, urls, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (client, _) in &ports {
            while !answers_healthy(*client) {
                if etcd.members.iter_mut().any(|m| m.try_wait().ok().flatten().is_some()) {
                    return None;
                }
                assert!(Instant::now() < deadline, "etcd did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(etcd)
    }

    /// Freezes every member (SIGSTOP): to its clients, etcd has lost its quorum.
    pub fn pause(&self) {
        for member in &self.members {
            unsafe { libc::kill(member.id() as i32, libc::SIGSTOP) };
        }
    }

    pub fn resume(&self) {
        for member in &self.members {
            unsafe { libc::kill(member.id() as i32, libc::SIGCONT) };
        }
    }

    /// `--etcd` for a controller: every member.
    pub fn endpoints(&self) -> String {
        self.urls.join(",")
    }
}
