//! The SE's data plane. Each virtual service placed on the SE is served on its VIPs: HTTP as a
//! reverse proxy, TCP as byte copying, to its pool's servers chosen by the pool's algorithm
//! and ratios ([`balance`]), with health monitors taking servers out and back ([`health`]),
//! and counters per virtual service and server ([`stats`]).
//!
//! Listening sockets are bound with `SO_REUSEPORT`, so a second SE can take a VIP before the
//! first lets go of it (a virtual service moving during an upgrade), and can be handed to the
//! next version of the agent across `exec` ([`DataPlane::hand_off`]) so that a restart
//! refuses no connection.
//!
//! The agent is synchronous; the data plane runs on its own tokio runtime and is driven
//! through [`DataPlane`]'s blocking methods.

pub mod balance;
pub mod health;
mod proxy;
pub mod stats;
mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fulcrum_se_protocol::{HostedVs, PoolRuntime, RuntimeReport, VsRuntime};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::proxy::{Drain, Open, VsEntry};
use crate::stats::{Metrics, label};
use crate::upstream::PoolEntry;

/// The environment variable that carries listening sockets to the next agent process:
/// `127.0.0.5:80=7,127.0.0.5:443=8`.
pub const LISTENERS_ENV: &str = "FULCRUM_SE_LISTENERS";
/// A removed virtual service's idle keep-alive connections are closed after this long (busy
/// ones get `Connection: close` on their next response first).
const IDLE_GRACE: Duration = Duration::from_secs(1);
/// A removed virtual service's connections still open after this long are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const BACKLOG: u32 = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Client connections open on the SE, for a restart to wait on.
#[derive(Default)]
pub(crate) struct OpenCount {
    n: AtomicU64,
    zero: Notify,
}

impl OpenCount {
    fn add(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
    }

    fn done(&self) {
        if self.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.zero.notify_waiters();
        }
    }

    async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct Bound {
    vs: String,
    tls: bool,
    stop: watch::Sender<bool>,
    /// The accept loop; it gives the socket back when stopped.
    task: JoinHandle<TcpListener>,
}

struct Inner {
    services: Mutex<HashMap<String, Arc<VsEntry>>>,
    listeners: Mutex<BTreeMap<SocketAddr, Bound>>,
    /// Sockets from the previous process, until a virtual service claims them.
    inherited: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    pools: Mutex<HashMap<String, Arc<PoolEntry>>>,
    /// Per virtual service: why a listener could not be bound.
    errors: Mutex<HashMap<String, Vec<String>>>,
    open: Arc<OpenCount>,
    changed: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("cannot start the data plane: {0}")]
    Start(String),
}

pub struct DataPlane {
    /// Entered to spawn tasks, or waited on with `block_on` by the agent's threads (the
    /// runtime's own threads drive it).
    runtime: tokio::runtime::Handle,
    /// Kept for the process's life: dropping it would stop the data plane.
    _owner: Arc<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

impl DataPlane {
    /// Starts the runtime (one worker per core the process may use) and takes the listening
    /// sockets a previous process left in [`LISTENERS_ENV`]. On one core the runtime is a
    /// single-threaded one driven by a thread of its own: no work stealing, no cross-thread
    /// wake-ups, measurably more requests per core (BENCHMARKS.md).
    pub fn start() -> Result<DataPlane, DataPlaneError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let built = if cores == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().thread_name("dataplane").enable_all().build()
        };
        let owner = Arc::new(built.map_err(|e| DataPlaneError::Start(e.to_string()))?);
        if cores == 1 {
            let driver = owner.clone();
            std::thread::Builder::new()
                .name("dataplane".into())
                .spawn(move || driver.block_on(std::future::pending::<()>()))
                .map_err(|e| DataPlaneError::Start(e.to_string()))?;
        }
        let runtime = owner.handle().clone();
        tracing::info!(cores, single_threaded = cores == 1, "data plane started");
        let inherited = inherited_listeners();
        if !inherited.is_empty() {
            tracing::info!(listeners = inherited.len(), "took over listening sockets from the previous process");
        }
        let inner = Arc::new(Inner {
            services: Mutex::default(),
            listeners: Mutex::default(),
            inherited: Mutex::new(inherited),
            pools: Mutex::default(),
            errors: Mutex::default(),
            open: Arc::default(),
            changed: Arc::new(Notify::new()),
        });
        Ok(DataPlane { runtime, _owner: owner, inner })
    }

    /// Serves exactly these virtual services: new ones start listening, changed ones take
    /// their new pool and listeners, removed ones drain. Returns the uuids of those serving
    /// on every listener they asked for.
    pub fn apply(&self, services: &[HostedVs]) -> Vec<String> {
        let _runtime = self.runtime.enter();
        let inner = &self.inner;
        // Pools first, so a virtual service never points at a pool that is not configured.
        let mut wanted_pools = HashSet::new();
        {
            let mut pools = lock(&inner.pools);
            for pool in services.iter().filter_map(|v| v.service.as_ref()?.pool.as_ref()) {
                if !wanted_pools.insert(pool.uuid.clone()) {
                    continue;
                }
                pools
                    .entry(pool.uuid.clone())
                    .or_insert_with(|| Arc::new(PoolEntry::new(&pool.uuid, inner.changed.clone())))
                    .configure(pool);
            }
        }
        let wanted: HashMap<&str, &HostedVs> = services.iter().map(|v| (v.uuid.as_str(), v)).collect();
        // Virtual services that go (or change application) drain and give up their listeners.
        let gone: Vec<Arc<VsEntry>> = {
            let mut current = lock(&inner.services);
            let gone_ids: Vec<String> = current
                .iter()
                .filter(|(id, e)| {
                    wanted
                        .get(id.as_str())
                        .and_then(|v| v.service.as_ref())
                        .is_none_or(|s| s.application != e.application)
                })
                .map(|(id, _)| id.clone())
                .collect();
            gone_ids.iter().filter_map(|id| current.remove(id)).collect()
        };
        for vs in &gone {
            self.stop_listeners(|owner| owner == vs.uuid);
            start_drain(vs.clone(), DRAIN_TIMEOUT);
        }
        let mut serving = Vec::new();
        let mut errors = HashMap::new();
        for hosted in services {
            let Some(service) = &hosted.service else {
                serving.push(hosted.uuid.clone());
                continue;
            };
            let entry = lock(&inner.services)
                .entry(hosted.uuid.clone())
                .or_insert_with(|| Arc::new(VsEntry::new(&hosted.uuid, &hosted.name, service.application)))
                .clone();
            *lock(&entry.pool) = service.pool.as_ref().and_then(|p| lock(&inner.pools).get(&p.uuid).cloned());
            let mut failed = Vec::new();
            let acceptor = match &service.certificate {
                Some(c) => tls_acceptor(c, service.application)
                    .map_err(|e| failed.push(format!("certificate '{}': {e}", c.name)))
                    .ok(),
                None => None,
            };
            *lock(&entry.tls) = acceptor.clone();
            let mut addrs = Vec::new();
            for l in &service.listeners {
                match l.ip.parse() {
                    // Not served; an unusable certificate was reported above, a missing one here.
                    Ok(_) if l.tls && acceptor.is_none() => {
                        if service.certificate.is_none() {
                            failed.push(format!(
                                "{}:{}: TLS without a usable certificate (ssl_key_and_certificate_refs)",
                                l.ip, l.port
                            ));
                        }
                    }
                    Ok(ip) => addrs.push((SocketAddr::new(ip, l.port), l.tls)),
                    Err(_) => failed.push(format!("{}: not an IP address", l.ip)),
                }
            }
            let want: HashSet<(SocketAddr, bool)> = addrs.iter().copied().collect();
            self.stop_listeners_where(|addr, b| b.vs == hosted.uuid && !want.contains(&(*addr, b.tls)));
            for (addr, tls) in addrs {
                if let Err(e) = self.listen(addr, &entry, tls) {
                    failed.push(e);
                }
            }
            if failed.is_empty() {
                serving.push(hosted.uuid.clone());
            } else {
                tracing::warn!(vs = %hosted.name, errors = ?failed, "cannot serve every listener");
                errors.insert(hosted.uuid.clone(), failed);
            }
        }
        *lock(&inner.errors) = errors;
        // Pools no longer used drain; sockets inherited and not claimed close.
        let unused: Vec<Arc<PoolEntry>> = {
            let mut pools = lock(&inner.pools);
            let ids: Vec<String> = pools.keys().filter(|id| !wanted_pools.contains(*id)).cloned().collect();
            ids.iter().filter_map(|id| pools.remove(id)).collect()
        };
        for pool in unused {
            pool.retire();
        }
        lock(&inner.inherited).clear();
        inner.changed.notify_one();
        serving
    }

    /// Binds (or adopts, or keeps) the listener for `addr` for this virtual service.
    fn listen(&self, addr: SocketAddr, vs: &Arc<VsEntry>, tls: bool) -> Result<(), String> {
        let mut listeners = lock(&self.inner.listeners);
        if let Some(bound) = listeners.get(&addr) {
            if bound.vs == vs.uuid {
                return Ok(());
            }
            let owner = lock(&self.inner.services).get(&bound.vs).map(|v| v.name.clone()).unwrap_or_default();
            return Err(format!("{addr}: already served by virtual service '{owner}'"));
        }
        let listener = match lock(&self.inner.inherited).remove(&addr) {
            Some(std) => TcpListener::from_std(std).map_err(|e| format!("{addr}: {e}"))?,
            None => bind(addr).map_err(|e| format!("{addr}: {e}"))?,
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, vs.clone(), self.inner.open.clone(), stopped, tls));
        tracing::info!(vs = %vs.name, %addr, tls, "listening");
        listeners.insert(addr, Bound { vs: vs.uuid.clone(), tls, stop, task });
        Ok(())
    }

    fn stop_listeners(&self, owned_by: impl Fn(&str) -> bool) {
        self.stop_listeners_where(|_, bound| owned_by(&bound.vs));
    }

    /// Stops the matching accept loops and closes their sockets. Connections still waiting in
    /// a closed socket's queue move to another listener of the same address
    /// (`net.ipv4.tcp_migrate_req`, see [`prepare_host`]).
    fn stop_listeners_where(&self, matches: impl Fn(&SocketAddr, &Bound) -> bool) {
        let stopped: Vec<(SocketAddr, Bound)> = {
            let mut listeners = lock(&self.inner.listeners);
            let addrs: Vec<SocketAddr> = listeners.iter().filter(|(a, b)| matches(a, b)).map(|(a, _)| *a).collect();
            addrs.into_iter().filter_map(|a| listeners.remove(&a).map(|b| (a, b))).collect()
        };
        for (addr, bound) in stopped {
            bound.stop.send_replace(true);
            tracing::info!(%addr, "stopped listening");
            // The socket closes when the loop returns it and it is dropped.
            drop(bound.task);
        }
    }

    /// Before a restart into another version: stops accepting (connections wait in the
    /// sockets' queues), lets open requests finish (`Connection: close` on each connection's
    /// next response, idle ones closed after a grace), waits up to `timeout` for that, and
    /// returns the listening sockets, kept open across `exec`, for [`LISTENERS_ENV`].
    pub fn hand_off(&self, timeout: Duration) -> String {
        let inner = self.inner.clone();
        self.runtime.block_on(async move {
            let bound: Vec<(SocketAddr, Bound)> = std::mem::take(&mut *lock(&inner.listeners)).into_iter().collect();
            let mut handed = Vec::new();
            for (addr, b) in bound {
                b.stop.send_replace(true);
                match b.task.await {
                    Ok(listener) => match listener.into_std() {
                        Ok(std) => {
                            let fd = std.into_raw_fd();
                            close_on_exec(fd, false);
                            handed.push(format!("{addr}={fd}"));
                        }
                        Err(e) => tracing::warn!(%addr, error = %e, "cannot hand the socket over"),
                    },
                    Err(e) => tracing::warn!(%addr, error = %e, "accept loop failed"),
                }
            }
            let services: Vec<Arc<VsEntry>> = lock(&inner.services).values().cloned().collect();
            for vs in services {
                start_drain(vs, timeout);
            }
            let started = Instant::now();
            if tokio::time::timeout(timeout, inner.open.wait_zero()).await.is_err() {
                tracing::warn!(open = inner.open.n.load(Ordering::SeqCst), "connections still open at the restart");
            }
            tracing::info!(sockets = handed.len(), waited_ms = started.elapsed().as_millis() as u64, "handing over");
            handed.join(",")
        })
    }

    /// Waits until something worth reporting changed (a server's health, the configuration)
    /// or `timeout` passed.
    pub fn wait_changed(&self, timeout: Duration) {
        let changed = self.inner.changed.clone();
        self.runtime.block_on(async move {
            let _ = tokio::time::timeout(timeout, changed.notified()).await;
        });
    }

    pub fn report(&self) -> RuntimeReport {
        let inner = &self.inner;
        let mut pools: Vec<PoolRuntime> =
            lock(&inner.pools).values().map(|p| PoolRuntime { uuid: p.uuid.clone(), servers: p.runtime() }).collect();
        pools.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        let listening: HashMap<String, Vec<String>> =
            lock(&inner.listeners).iter().fold(HashMap::new(), |mut m, (addr, b)| {
                m.entry(b.vs.clone()).or_default().push(addr.to_string());
                m
            });
        let errors = lock(&inner.errors).clone();
        let mut virtualservices: Vec<VsRuntime> = lock(&inner.services)
            .values()
            .map(|v| VsRuntime {
                uuid: v.uuid.clone(),
                listening: listening.get(&v.uuid).cloned().unwrap_or_default(),
                errors: errors.get(&v.uuid).cloned().unwrap_or_default(),
                traffic: v.counters.snapshot(),
            })
            .collect();
        virtualservices.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        RuntimeReport { pools, virtualservices }
    }

    /// The data plane's series in Prometheus text.
    pub fn metrics(&self) -> String {
        let mut m = Metrics::default();
        let mut services: Vec<Arc<VsEntry>> = lock(&self.inner.services).values().cloned().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for vs in &services {
            vs.counters.render("fulcrum_se_vs", &format!("vs=\"{}\"", label(&vs.name)), &mut m);
        }
        let pools: Vec<Arc<PoolEntry>> = lock(&self.inner.pools).values().cloned().collect();
        for pool in pools {
            let name = label(&lock(&pool.name));
            for s in &pool.balance().servers {
                let labels = format!("pool=\"{name}\",server=\"{}\"", label(&s.key));
                s.counters.render("fulcrum_se_server", &labels, &mut m);
                let up = u64::from(s.usable());
                m.gauge("fulcrum_se_server_up", "1 when the server takes new requests.", &labels, up);
            }
        }
        m.text()
    }

    /// Serves `GET /metrics` on `addr` (Prometheus scrapes the SE there).
    pub fn serve_metrics(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr, String> {
        let _runtime = self.runtime.enter();
        let listener = bind(addr).map_err(|e| format!("{addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let text = match (request.uri().path(), me.upgrade()) {
                            ("/metrics", Some(plane)) => Some(plane.metrics()),
                            _ => None,
                        };
                        async move {
                            let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                                text.clone().unwrap_or_else(|| "not found\n".into()),
                            )));
                            if text.is_none() {
                                *response.status_mut() = hyper::StatusCode::NOT_FOUND;
                            }
                            response.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                            );
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Ok(local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    vs: Arc<VsEntry>,
    open: Arc<OpenCount>,
    mut stop: watch::Receiver<bool>,
    tls: bool,
) -> TcpListener {
    loop {
        tokio::select! {
            biased;
            () = reached(&mut stop, |s| *s) => return listener,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let guard = Open::new(vs.clone(), open.clone());
                    tokio::spawn(proxy::accepted(stream, client, vs.clone(), guard, tls));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(vs = %vs.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Waits until the watched value satisfies `done` (or its sender is gone).
pub(crate) async fn reached<T>(rx: &mut watch::Receiver<T>, done: impl FnMut(&T) -> bool) {
    let _ = rx.wait_for(done).await;
}

/// A removed virtual service: `Connection: close` from now, idle connections closed after
/// the grace, the rest cut after `timeout`.
fn start_drain(vs: Arc<VsEntry>, timeout: Duration) {
    vs.drain.send_replace(Drain::Closing);
    tokio::spawn(async move {
        tokio::time::sleep(IDLE_GRACE.min(timeout)).await;
        vs.drain.send_replace(Drain::Idle);
        tokio::time::sleep(timeout.saturating_sub(IDLE_GRACE)).await;
        vs.drain.send_replace(Drain::Cut);
    });
}

/// A TLS acceptor presenting `certificate` (for HTTP, offering HTTP/1.1 by ALPN).
fn tls_acceptor(
    certificate: &fulcrum_se_protocol::Certificate,
    application: fulcrum_se_protocol::Application,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(certificate.certificate_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read the certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in its PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(certificate.key_pem.as_bytes())
        .map_err(|e| format!("cannot read the private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and key do not match: {e}"))?;
    if application == fulcrum_se_protocol::Application::Http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    // Two SEs (or two versions of one) may listen on a VIP at once while it changes hands.
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Sets or clears close-on-exec: a socket handed to the next process must survive `exec`;
/// one taken over must not be passed on by accident.
fn close_on_exec(fd: RawFd, close: bool) {
    // SAFETY: fcntl on a descriptor this process owns; only the close-on-exec flag changes.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let flags = if close { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
            libc::fcntl(fd, libc::F_SETFD, flags);
        }
    }
}

fn inherited_listeners() -> HashMap<SocketAddr, std::net::TcpListener> {
    let Ok(text) = std::env::var(LISTENERS_ENV) else { return HashMap::new() };
    // Not passed on again: the next process gets what this one hands off.
    // SAFETY: called at start, before the data plane's threads exist.
    unsafe { std::env::remove_var(LISTENERS_ENV) };
    let mut out = HashMap::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let Some((addr, fd)) = item.rsplit_once('=') else { continue };
        let (Ok(addr), Ok(fd)) = (addr.parse::<SocketAddr>(), fd.parse::<RawFd>()) else { continue };
        // Only a listening TCP socket bound to the address it is said to be is adopted.
        // SAFETY: the previous process left this descriptor open for us and nothing else in
        // this process has taken it.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        if listener.local_addr().ok() != Some(addr) || listener.set_nonblocking(true).is_err() {
            tracing::warn!(%addr, fd, "not the socket it was said to be; closed");
            continue;
        }
        close_on_exec(fd, true);
        out.insert(addr, listener);
    }
    out
}

/// Lets a VIP change hands without resets: when a listening socket that shares its address
/// with another closes, the connections in its queue move to the other
/// (`net.ipv4.tcp_migrate_req`, Linux 5.14). Without it they would be reset. An SE owns its
/// machine's network settings, so the agent turns it on when it may.
pub fn prepare_host() {
    const MIGRATE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(MIGRATE) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(MIGRATE, "1") {
                tracing::warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req=1: a VIP that moves may reset queued connections");
            }
        }
        Err(_) => {
            tracing::warn!("this kernel has no net.ipv4.tcp_migrate_req: a VIP that moves may reset queued connections")
        }
    }
}
