//! Health monitors. The rules are pure ([`Tracker`], [`status_matches`], [`check_request`]);
//! [`probe`] is the one check on the network.

use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_se_protocol::{Check, Monitor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One monitor's view of one server: a server is taken as up until its checks say otherwise
/// (a new server takes traffic at once; a dead one is found by its first checks), goes down
/// after `failed_checks` failures in a row and comes back after `successful_checks` successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker { up: true, streak: 0 }
    }
}

impl Tracker {
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records a check; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, monitor: &Monitor) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { monitor.failed_checks } else { monitor.successful_checks };
        if self.streak >= needed.max(1) {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Whether a status code is one the monitor expects: `HTTP_2XX`-style classes, `HTTP_ANY`;
/// none given means 2xx or 3xx.
pub fn status_matches(code: u16, codes: &[String]) -> bool {
    if codes.is_empty() {
        return (200..400).contains(&code);
    }
    codes.iter().any(|c| match c.as_str() {
        "HTTP_ANY" => true,
        class => class
            .strip_prefix("HTTP_")
            .and_then(|s| s.strip_suffix("XX"))
            .and_then(|d| d.parse::<u16>().ok())
            .is_some_and(|d| code / 100 == d),
    })
}

/// The bytes of an HTTP check: the monitor's request line (with any headers it carries), a
/// Host header for HTTP/1.1, and `Connection: close`.
pub fn check_request(request: &str, host: &str) -> Vec<u8> {
    let request = if request.trim().is_empty() { "GET / HTTP/1.0" } else { request.trim_end() };
    let mut out = request.replace("\\r\\n", "\r\n");
    let lower = out.to_ascii_lowercase();
    out.push_str("\r\n");
    if lower.lines().next().is_some_and(|l| l.ends_with("http/1.1")) && !lower.contains("\nhost:") {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    if !lower.contains("\nconnection:") {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// The status code of a response's first line (`HTTP/1.1 200 OK`).
pub fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// Runs one check against `addr`: `Ok` when it passes, else why not.
pub async fn probe(monitor: &Monitor, addr: SocketAddr) -> Result<(), String> {
    let timeout = Duration::from_millis(monitor.timeout_ms.max(1));
    let check = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        match &monitor.check {
            Check::Tcp => Ok(()),
            Check::Http { request, codes } => {
                stream.write_all(&check_request(request, &addr.ip().to_string())).await.map_err(|e| e.to_string())?;
                let mut head = Vec::with_capacity(256);
                let mut buf = [0u8; 512];
                while !head.contains(&b'\n') && head.len() < 8192 {
                    let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                match parse_status(&head) {
                    Some(code) if status_matches(code, codes) => Ok(()),
                    Some(code) => Err(format!("answered {code}")),
                    None => Err("no HTTP response".into()),
                }
            }
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(failed: u32, successful: u32) -> Monitor {
        Monitor {
            name: "m".into(),
            check: Check::Tcp,
            interval_ms: 100,
            timeout_ms: 50,
            successful_checks: successful,
            failed_checks: failed,
            port: None,
        }
    }

    #[test]
    fn a_server_goes_down_after_its_failed_checks_and_up_after_its_successful_ones() {
        let m = monitor(3, 2);
        let mut t = Tracker::default();
        assert!(t.is_up());
        assert_eq!(t.record(false, &m), None);
        assert_eq!(t.record(false, &m), None);
        assert_eq!(t.record(true, &m), None, "a success resets the count");
        assert_eq!(t.record(false, &m), None);
        assert_eq!(t.record(false, &m), None);
        assert_eq!(t.record(false, &m), Some(false));
        assert!(!t.is_up());
        assert_eq!(t.record(true, &m), None);
        assert_eq!(t.record(false, &m), None);
        assert_eq!(t.record(true, &m), None);
        assert_eq!(t.record(true, &m), Some(true));
    }

    #[test]
    fn expected_codes() {
        assert!(status_matches(204, &[]) && status_matches(302, &[]) && !status_matches(404, &[]));
        let codes = vec!["HTTP_2XX".to_string(), "HTTP_4XX".to_string()];
        assert!(status_matches(200, &codes) && status_matches(404, &codes) && !status_matches(500, &codes));
        assert!(status_matches(503, &["HTTP_ANY".to_string()]));
    }

    #[test]
    fn check_requests_are_complete() {
        assert_eq!(check_request("GET / HTTP/1.0", "10.0.0.1"), b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n");
        assert_eq!(
            check_request("GET /health HTTP/1.1", "10.0.0.1"),
            b"GET /health HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            check_request("HEAD / HTTP/1.1\\r\\nHost: app", "10.0.0.1"),
            b"HEAD / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(parse_status(b"HTTP/1.1 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0\r\n"), None);
    }
}
