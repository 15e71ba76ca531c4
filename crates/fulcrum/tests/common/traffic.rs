//! Real traffic for data plane tests: small keep-alive HTTP servers standing for a pool's
//! servers, and a bounded load generator that sends requests to a VIP the whole time and
//! counts what failed and how.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Reads one HTTP/1.1 message head; `None` at a clean end of the connection.
fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed inside a message head"));
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(line);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A pool server: answers every request with its name (`/slow` after 1.5 s); `/health` answers
/// 200, or 503 while told to fail. It keeps the last `X-Forwarded-For` it was sent.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub requests: Arc<AtomicU64>,
    pub forwarded_for: Arc<Mutex<Option<String>>>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Backend {
    /// Listens on `ip` (any of 127.0.0.0/8) at a free port, or at `port` when given.
    pub fn start(name: &str, ip: &str, port: u16) -> Backend {
        let listener = TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("backend {name} on {ip}:{port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let forwarded_for = Arc::new(Mutex::new(None));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (name, healthy, stop, requests, forwarded_for, connections) = (
                name.to_string(),
                healthy.clone(),
                stop.clone(),
                requests.clone(),
                forwarded_for.clone(),
                connections.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            connections.lock().unwrap().push(stream.try_clone().unwrap());
                            let (name, healthy, requests, forwarded_for) =
                                (name.clone(), healthy.clone(), requests.clone(), forwarded_for.clone());
                            std::thread::spawn(move || {
                                serve_backend(stream, &name, &healthy, &requests, &forwarded_for);
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Backend {
            name: name.to_string(),
            addr,
            healthy,
            stop,
            requests,
            forwarded_for,
            connections,
            accept: Some(accept),
        }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Dies: stops listening (new connections are refused) and cuts every open connection.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for c in self.connections.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve_backend(
    stream: TcpStream,
    name: &str,
    healthy: &AtomicBool,
    requests: &AtomicU64,
    forwarded_for: &Mutex<Option<String>>,
) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while let Ok(Some(head)) = read_head(&mut reader) {
        let path = head[0].split_whitespace().nth(1).unwrap_or("/").to_string();
        let length: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if path == "/slow" {
            // A long request: it is in flight while the test changes the configuration.
            std::thread::sleep(Duration::from_millis(1500));
        }
        let (status, text) = if path == "/health" {
            if healthy.load(Ordering::SeqCst) {
                ("200 OK", "ok".to_string())
            } else {
                ("503 Unavailable", "sick".into())
            }
        } else {
            requests.fetch_add(1, Ordering::Relaxed);
            if let Some(xff) = header(&head, "x-forwarded-for") {
                *forwarded_for.lock().unwrap() = Some(xff.to_string());
            }
            ("200 OK", name.to_string())
        };
        let close = header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(answer.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// What the load saw of one server (by the name in its answers).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub first: Instant,
    pub last: Instant,
    pub count: u64,
}

/// A failed request: when, and how (`refused`, `reset`, `closed`, `timeout`, `status 502`...).
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Instant,
    pub kind: String,
}

#[derive(Default)]
struct Shared {
    seen: HashMap<String, Seen>,
    failures: Vec<Failure>,
    ok: u64,
    connections: u64,
}

/// Clients sending `GET /` to a VIP over keep-alive connections, each request right after
/// the previous answer (with a short pause), until stopped or `longest` has passed.
pub struct Load {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    workers: Vec<JoinHandle<()>>,
    pub started: Instant,
}

/// The tally of a load run.
#[derive(Debug)]
pub struct Tally {
    pub ok: u64,
    pub connections: u64,
    pub failures: Vec<Failure>,
    pub seen: HashMap<String, Seen>,
}

impl Tally {
    pub fn resets(&self) -> usize {
        self.failures.iter().filter(|f| f.kind == "reset").count()
    }
}

impl Load {
    pub fn start(vip: SocketAddr, clients: usize, longest: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let started = Instant::now();
        let workers = (0..clients)
            .map(|_| {
                let (stop, shared) = (stop.clone(), shared.clone());
                std::thread::spawn(move || client(vip, &stop, &shared, started + longest))
            })
            .collect();
        Load { stop, shared, workers, started }
    }

    /// When the load first and last got an answer from this server.
    pub fn seen(&self, server: &str) -> Option<Seen> {
        self.shared.lock().unwrap().seen.get(server).copied()
    }

    pub fn ok(&self) -> u64 {
        self.shared.lock().unwrap().ok
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.shared.lock().unwrap().failures.clone()
    }

    /// Waits until `server` answers a request sent after `since`; how long after `since` that
    /// was noticed (looked at every 5 ms, so at most that much late).
    pub fn reached_after(&self, server: &str, since: Instant, within: Duration) -> Option<Duration> {
        let deadline = Instant::now() + within;
        loop {
            if self.seen(server).is_some_and(|s| s.last > since) {
                return Some(since.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let shared = std::mem::take(&mut *self.shared.lock().unwrap());
        Tally { ok: shared.ok, connections: shared.connections, failures: shared.failures, seen: shared.seen }
    }
}

fn kind_of(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "reset".into(),
        ErrorKind::UnexpectedEof => "closed".into(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".into(),
        _ => format!("{e}"),
    }
}

fn client(vip: SocketAddr, stop: &AtomicBool, shared: &Mutex<Shared>, deadline: Instant) {
    let mut connection: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if connection.is_none() {
            match TcpStream::connect_timeout(&vip, Duration::from_secs(2)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.set_nodelay(true).unwrap();
                    let reader = BufReader::new(s.try_clone().unwrap());
                    connection = Some((s, reader));
                    shared.lock().unwrap().connections += 1;
                }
                Err(e) => {
                    shared.lock().unwrap().failures.push(Failure { at: Instant::now(), kind: kind_of(&e) });
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let (stream, reader) = connection.as_mut().unwrap();
        let outcome = stream
            .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
            .and_then(|()| read_head(reader))
            .and_then(|head| {
                let head =
                    head.ok_or_else(|| std::io::Error::new(ErrorKind::UnexpectedEof, "closed before an answer"))?;
                let length: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body)?;
                let close = header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                Ok((head[0].clone(), String::from_utf8_lossy(&body).into_owned(), close))
            });
        let now = Instant::now();
        match outcome {
            Ok((status_line, body, close)) => {
                let mut shared = shared.lock().unwrap();
                if status_line.split_whitespace().nth(1) == Some("200") {
                    shared.ok += 1;
                    let seen = shared.seen.entry(body).or_insert(Seen { first: now, last: now, count: 0 });
                    seen.last = now;
                    seen.count += 1;
                } else {
                    let code = status_line.split_whitespace().nth(1).unwrap_or("?").to_string();
                    shared.failures.push(Failure { at: now, kind: format!("status {code}") });
                }
                if close {
                    connection = None;
                }
            }
            Err(e) => {
                shared.lock().unwrap().failures.push(Failure { at: now, kind: kind_of(&e) });
                connection = None;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
