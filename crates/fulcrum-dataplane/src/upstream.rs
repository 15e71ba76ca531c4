//! Pools and their servers as the data plane keeps them: each server's health (from its
//! monitors), load, idle keep-alive connections and counters, kept across configuration
//! changes so that a PATCH touching one server leaves the others' connections alone.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use fulcrum_se_protocol::{Monitor, Pool, ServerRuntime, ServerState};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::balance::Plan;
use crate::health::{Tracker, probe};
use crate::lock;
use crate::stats::Counters;

/// What goes to a server: the client's body, or nothing (a request without one, which can
/// then be sent again on another connection).
pub type UpBody = Either<Incoming, Empty<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections kept per server.
const MAX_IDLE: usize = 256;

pub struct ServerEntry {
    pub key: String,
    pub ip: String,
    pub port: u16,
    pub addr: SocketAddr,
    enabled: AtomicBool,
    healthy: AtomicBool,
    /// Monitor name → why it says the server is down.
    down: Mutex<BTreeMap<String, String>>,
    /// Open requests (HTTP) or connections (TCP): what least-connections compares.
    pub load: AtomicU64,
    idle: Mutex<Vec<SendRequest<UpBody>>>,
    pub counters: Counters,
    /// Set when the server has been removed or disabled for longer than the drain timeout:
    /// its connections close then.
    cut: watch::Sender<bool>,
    /// Moves on every enable, disable or removal, so a drain timer from before does nothing.
    epoch: AtomicU64,
    monitors: Mutex<Vec<JoinHandle<()>>>,
}

impl ServerEntry {
    fn new(ip: &str, port: u16, addr: SocketAddr) -> ServerEntry {
        ServerEntry {
            key: fulcrum_se_protocol::server_key(ip, port),
            ip: ip.to_string(),
            port,
            addr,
            enabled: AtomicBool::new(true),
            healthy: AtomicBool::new(true),
            down: Mutex::default(),
            load: AtomicU64::new(0),
            idle: Mutex::default(),
            counters: Counters::default(),
            cut: watch::Sender::new(false),
            epoch: AtomicU64::new(0),
            monitors: Mutex::default(),
        }
    }

    /// Turns true when the server's connections are to close.
    pub fn cut_signal(&self) -> watch::Receiver<bool> {
        self.cut.subscribe()
    }

    pub fn usable(&self) -> bool {
        self.enabled.load(Relaxed) && self.healthy.load(Relaxed) && !*self.cut.borrow()
    }

    /// Whether a connection that finished a request may go back to the idle list.
    fn keeps_connections(&self) -> bool {
        self.enabled.load(Relaxed) && !*self.cut.borrow()
    }

    /// An idle keep-alive connection, if one is still open.
    pub async fn checkout(&self) -> Option<SendRequest<UpBody>> {
        loop {
            let mut sender = lock(&self.idle).pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    pub fn checkin(&self, sender: SendRequest<UpBody>) {
        if !self.keeps_connections() || sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
    }

    /// A new connection to the server; it closes when the server is cut off.
    pub async fn connect(self: &Arc<Self>) -> Result<SendRequest<UpBody>, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("{}: connect timed out", self.key))?
            .map_err(|e| format!("{}: {e}", self.key))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{}: {e}", self.key))?;
        let mut cut = self.cut.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = crate::reached(&mut cut, |c| *c) => {}
            }
        });
        Ok(sender)
    }

    /// Stops new requests at once and closes what is still open after `timeout`.
    fn drain(self: &Arc<Self>, timeout: Duration) {
        let epoch = self.epoch.fetch_add(1, Relaxed) + 1;
        lock(&self.idle).clear();
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if me.epoch.load(Relaxed) == epoch {
                me.cut.send_replace(true);
            }
        });
    }

    fn set_enabled(self: &Arc<Self>, enabled: bool, drain: Duration) {
        if self.enabled.swap(enabled, Relaxed) == enabled {
            return;
        }
        if enabled {
            self.epoch.fetch_add(1, Relaxed);
            self.cut.send_replace(false);
        } else {
            self.drain(drain);
        }
    }

    fn stop_monitors(&self) {
        for task in lock(&self.monitors).drain(..) {
            task.abort();
        }
    }

    pub fn runtime(&self) -> ServerRuntime {
        let down = lock(&self.down);
        let state = if !self.enabled.load(Relaxed) {
            ServerState::Disabled
        } else if self.healthy.load(Relaxed) {
            ServerState::Up
        } else {
            ServerState::Down
        };
        let reason = down.iter().map(|(m, why)| format!("{m}: {why}")).collect::<Vec<_>>().join("; ");
        ServerRuntime { ip: self.ip.clone(), port: self.port, state, reason, traffic: self.counters.snapshot() }
    }
}

/// A pool's servers in configuration order and how to choose among them.
pub struct Balance {
    plan: Plan,
    pub servers: Vec<Arc<ServerEntry>>,
}

pub struct PoolEntry {
    pub uuid: String,
    pub name: Mutex<String>,
    current: RwLock<Arc<Balance>>,
    servers: Mutex<HashMap<String, Arc<ServerEntry>>>,
    monitors: Mutex<Vec<Monitor>>,
    pub drain_timeout: Mutex<Duration>,
    tick: AtomicUsize,
    /// Told when a server's health changes (the agent reports it).
    changed: Arc<Notify>,
}

impl PoolEntry {
    pub fn new(uuid: &str, changed: Arc<Notify>) -> PoolEntry {
        PoolEntry {
            uuid: uuid.to_string(),
            name: Mutex::default(),
            current: RwLock::new(Arc::new(Balance {
                plan: Plan::new(fulcrum_se_protocol::Algorithm::RoundRobin, &[], &[]),
                servers: Vec::new(),
            })),
            servers: Mutex::default(),
            monitors: Mutex::default(),
            drain_timeout: Mutex::new(Duration::from_secs(60)),
            tick: AtomicUsize::new(0),
            changed,
        }
    }

    pub fn balance(&self) -> Arc<Balance> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes a new configuration: servers that stay keep their connections and health; new
    /// ones start as up and are checked at once; removed and disabled ones drain.
    pub fn configure(&self, pool: &Pool) {
        *lock(&self.name) = pool.name.clone();
        let drain = Duration::from_millis(pool.drain_timeout_ms);
        *lock(&self.drain_timeout) = drain;
        let monitors_changed = *lock(&self.monitors) != pool.monitors;
        if monitors_changed {
            *lock(&self.monitors) = pool.monitors.clone();
        }
        let mut known = lock(&self.servers);
        let mut next: HashMap<String, Arc<ServerEntry>> = HashMap::with_capacity(pool.servers.len());
        let mut ordered = Vec::with_capacity(pool.servers.len());
        let mut ratios = Vec::with_capacity(pool.servers.len());
        for s in &pool.servers {
            let key = s.key();
            if next.contains_key(&key) {
                continue;
            }
            let Ok(ip) = s.ip.parse::<IpAddr>() else {
                tracing::warn!(pool = %pool.name, server = %key, "not an IP address; skipped");
                continue;
            };
            let entry = match known.remove(&key) {
                Some(e) => {
                    if monitors_changed {
                        e.stop_monitors();
                        self.start_monitors(&e, &pool.monitors);
                    }
                    e
                }
                None => {
                    let e = Arc::new(ServerEntry::new(&s.ip, s.port, SocketAddr::new(ip, s.port)));
                    self.start_monitors(&e, &pool.monitors);
                    e
                }
            };
            entry.set_enabled(s.enabled, drain);
            ratios.push(s.ratio);
            ordered.push(entry.clone());
            next.insert(key, entry);
        }
        for (_, gone) in known.drain() {
            gone.stop_monitors();
            gone.drain(drain);
        }
        *known = next;
        let keys: Vec<String> = ordered.iter().map(|s| s.key.clone()).collect();
        let plan = Plan::new(pool.algorithm, &keys, &ratios);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Balance { plan, servers: ordered });
        self.changed.notify_one();
    }

    fn start_monitors(&self, server: &Arc<ServerEntry>, monitors: &[Monitor]) {
        server.healthy.store(true, Relaxed);
        lock(&server.down).clear();
        let mut tasks = lock(&server.monitors);
        for monitor in monitors {
            let (server, monitor, changed) = (server.clone(), monitor.clone(), self.changed.clone());
            tasks.push(tokio::spawn(async move { watch_server(server, monitor, changed).await }));
        }
    }

    /// The server for the next request, not one of `tried` (indices into the balance).
    pub fn pick(&self, balance: &Balance, client: IpAddr, tried: &[usize]) -> Option<usize> {
        let tick = self.tick.fetch_add(1, Relaxed);
        balance.plan.pick(
            tick,
            Some(client),
            |i| !tried.contains(&i) && balance.servers[i].usable(),
            |i| balance.servers[i].load.load(Relaxed),
        )
    }

    /// Every server drains (the pool is no longer used on this SE).
    pub fn retire(&self) {
        let drain = *lock(&self.drain_timeout);
        for (_, s) in lock(&self.servers).drain() {
            s.stop_monitors();
            s.drain(drain);
        }
    }

    pub fn runtime(&self) -> Vec<ServerRuntime> {
        self.balance().servers.iter().map(|s| s.runtime()).collect()
    }
}

/// One monitor on one server, until aborted.
async fn watch_server(server: Arc<ServerEntry>, monitor: Monitor, changed: Arc<Notify>) {
    let mut tracker = Tracker::default();
    let addr = SocketAddr::new(server.addr.ip(), monitor.port.unwrap_or(server.port));
    let interval = Duration::from_millis(monitor.interval_ms.max(100));
    loop {
        let outcome = probe(&monitor, addr).await;
        let transition = tracker.record(outcome.is_ok(), &monitor);
        if let Some(up) = transition {
            {
                let mut down = lock(&server.down);
                if up {
                    down.remove(&monitor.name);
                } else {
                    down.insert(monitor.name.clone(), outcome.clone().err().unwrap_or_default());
                }
                server.healthy.store(down.is_empty(), Relaxed);
            }
            if up {
                tracing::info!(server = %server.key, monitor = %monitor.name, "server up");
            } else {
                tracing::warn!(server = %server.key, monitor = %monitor.name, reason = ?outcome.err(), "server down");
                lock(&server.idle).clear();
            }
            changed.notify_one();
        }
        tokio::time::sleep(interval).await;
    }
}
