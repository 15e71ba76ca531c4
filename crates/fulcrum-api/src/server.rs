//! Starting and stopping the controller: data dir, store, listener, TLS, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::Request;
use fulcrum_store::{FjallBackend, Store, StoreError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::connections::{Activity, Admitted, Connections, Limits, TimedBody, Tracked};

use crate::app::{App, ClientAddr, router};
use crate::asyncpatch::AsyncPatches;
use crate::auth::{BasicAuthCache, Sessions, Throttle};
use crate::{bootstrap, objects, tls};

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub plain_http: bool,
    /// Public keys whose package signatures are accepted (with DATA/trusted-keys/*.pub).
    pub trusted_keys: Vec<PathBuf>,
    pub engines: crate::engines::EngineSettings,
    pub limits: Limits,
    /// Keep the store in etcd, as one node of a cluster (none: the embedded store).
    pub cluster: Option<ClusterConfig>,
}

/// How often a cluster node publishes its free disk and systemd settings.
const HOST_FACTS_EVERY: Duration = Duration::from_secs(15);

/// `serve --etcd URL[,URL...] --node-name NAME --advertise URL --lease-ttl SECONDS`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub etcd: Vec<String>,
    pub node_name: String,
    /// Where others reach this node (default: the address it listens on).
    pub advertise: Option<String>,
    pub lease_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("tls: {0}")]
    Tls(String),
    #[error("first start: {0}")]
    Bootstrap(String),
    #[error("images: {0}")]
    Images(String),
}

fn check_data_dir(config: &ServeConfig) -> Result<(), ServeError> {
    let err = |message: String| ServeError::DataDir { path: config.data_dir.display().to_string(), message };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| err(format!("cannot create it: {e}")))?;
    let probe = config.data_dir.join(".write-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| err(format!("is not writable: {e}")))
}

/// The listening socket handed over by the process this one replaced (an upgrade's restart).
fn inherited_listener() -> Option<TcpListener> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(crate::upgrade::slots::LISTEN_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: only this process's parent set the variable, for a descriptor it left open
    // across exec; nothing else in this process owns it.
    unsafe { std::env::remove_var(crate::upgrade::slots::LISTEN_FD_ENV) };
    if fd < 0 {
        return None;
    }
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    std_listener.set_nonblocking(true).ok()?;
    TcpListener::from_std(std_listener).ok()
}

/// The data directory's store; refused while a controller runs on it.
/// Where the embedded store lives in the data dir (a store of an earlier version, in
/// `config.redb`, is moved there at the first start).
const STORE_DIR: &str = "store";
const OLD_STORE_FILE: &str = "config.redb";

fn open_store(data_dir: &std::path::Path) -> Result<Store, ServeError> {
    let target = data_dir.join(STORE_DIR);
    fulcrum_store::migrate_from_redb(&data_dir.join(OLD_STORE_FILE), &target)?;
    let backend = FjallBackend::open(&target).map_err(|e| match e {
        StoreError::Open(m) if m.contains("already open") || m.contains("lock") => ServeError::DataDir {
            path: data_dir.display().to_string(),
            message: "is in use by another fulcrum process".into(),
        },
        other => other.into(),
    })?;
    Ok(Store::open(backend, objects::indexer())?)
}

/// Joins the cluster: the store from etcd (fed by its watch, so this node serves reads at once,
/// leader or not); the campaign runs beside the server (`cluster::run_leadership`).
async fn join_cluster(config: &ClusterConfig) -> Result<(Store, crate::cluster::Membership), ServeError> {
    use fulcrum_store::election::{Cluster, Leader};
    let me = Leader { node: config.node_name.clone(), advertise: String::new(), pin: None };
    let cluster = Cluster::connect(&config.etcd, me, config.lease_ttl).await?;
    let store = Store::open(cluster.backend().await?, objects::indexer())?;
    Ok((store, crate::cluster::Membership::new(cluster)))
}

/// First start of a store (whoever leads first does it): the default objects and the admin
/// account, with the generated password printed once.
pub async fn bootstrap_once(store: &Store, data_dir: &std::path::Path, node_ip: &str) -> Result<(), ServeError> {
    if let Some(password) =
        bootstrap::ensure_defaults(store, data_dir, node_ip).await.map_err(|e| ServeError::Bootstrap(e.message))?
    {
        println!(
            "Generated the initial admin password: {password}\n(kept in {}; set {} to choose it)",
            data_dir.join(bootstrap::PASSWORD_FILE).display(),
            bootstrap::PASSWORD_ENV
        );
    }
    Ok(())
}

/// `fulcrum admin reset-password`: run on the host with the controller stopped, gives `user`
/// the password and full administrative rights again (the way back in when nobody can log in).
pub async fn reset_password(data_dir: &std::path::Path, user: &str, password: &str) -> Result<(), ServeError> {
    if !data_dir.join(STORE_DIR).exists() && !data_dir.join(OLD_STORE_FILE).exists() {
        return Err(ServeError::DataDir {
            path: data_dir.display().to_string(),
            message: format!("holds no controller store ({STORE_DIR}/)"),
        });
    }
    let store = open_store(data_dir)?;
    bootstrap::restore_administrator(&store, user, password).await.map_err(|e| ServeError::Bootstrap(e.message))
}

/// Runs the controller until `shutdown` completes, then drains open connections.
pub async fn serve(config: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    check_data_dir(&config)?;
    let (store, membership) = match &config.cluster {
        None => (open_store(&config.data_dir)?, None),
        Some(cluster) => {
            let (store, membership) = join_cluster(cluster).await?;
            (store, Some(Arc::new(membership)))
        }
    };
    let images = crate::images::Images::open(&config.data_dir, &config.trusted_keys).map_err(ServeError::Images)?;
    if membership.is_none() {
        // A single node leads from the start; a cluster's leader does this when it wins.
        bootstrap_once(&store, &config.data_dir, &config.listen.ip().to_string()).await?;
        images.recover(&store).await.map_err(ServeError::Images)?;
    }
    let upgrade = crate::upgrade::Upgrades::open(&config.data_dir, &store.read()).map_err(ServeError::Images)?;
    let listener = match inherited_listener() {
        Some(listener) => listener,
        None => TcpListener::bind(config.listen).await.map_err(|e| ServeError::Bind {
            addr: config.listen,
            message: if e.kind() == std::io::ErrorKind::AddrInUse {
                "the address is already in use".into()
            } else {
                e.to_string()
            },
        })?,
    };
    {
        use std::os::fd::AsRawFd;
        crate::upgrade::slots::remember_listener(listener.as_raw_fd());
    }
    let local = listener.local_addr().map_err(|e| ServeError::Bind { addr: config.listen, message: e.to_string() })?;
    let (acceptor, certificate_pin) = if config.plain_http {
        (None, None)
    } else {
        let names = vec!["localhost".to_string(), local.ip().to_string()];
        let (tls_config, pin) = tls::server_config(&config.data_dir, &names)?;
        (Some(tokio_rustls::TlsAcceptor::from(tls_config)), Some(pin))
    };
    if let (Some(membership), Some(cluster)) = (&membership, &config.cluster) {
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let advertise = cluster.advertise.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
        membership.cluster.election.describe_me(advertise, certificate_pin.clone());
        let started = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        // What interrupted deletions left: before serving, so no upload is publishing.
        crate::images::replica::remove_orphans(&images, &store.read());
        let host = crate::upgrade::facts::host_facts(&membership.me().node, &config.data_dir, &images, &upgrade.slots);
        if let Err(e) = membership.cluster.register(started, host).await {
            tracing::warn!(error = %e, "cannot register this node in the cluster views yet");
        }
    }
    let app = Arc::new(App {
        store,
        renders: Default::default(),
        sessions: Sessions::default(),
        throttle: Throttle::default(),
        basic_cache: BasicAuthCache::default(),
        tls: acceptor.is_some(),
        started_at: SystemTime::now(),
        listen: local,
        async_patches: Arc::new(AsyncPatches::default()),
        images,
        cluster: membership,
        engines: crate::engines::Engines::new(config.engines.clone()),
        upgrade,
        data_dir: config.data_dir.clone(),
        request_history: Default::default(),
        certificate_pin,
    });
    // The leader-only work has one home: started now on a single node, on election in a cluster.
    let leader_work = match app.cluster {
        None => LeaderWork::Single(crate::cluster::LeaderServices::start(&app)),
        Some(_) => LeaderWork::Cluster(tokio::spawn(crate::cluster::run_leadership(app.clone()))),
    };
    let sampler = tokio::spawn(crate::analytics::run_sampler(app.clone()));
    let replicas = tokio::spawn(crate::images::replica::run(app.clone()));
    let publisher = app.cluster.is_some().then(|| tokio::spawn(publish_node_facts(app.clone())));
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    // Tests and scripts read this line to learn the port when listening on port 0.
    println!("fulcrum listening on {scheme}://{local}");
    tracing::info!(%local, scheme, data_dir = %config.data_dir.display(), "controller started");

    let sweeper = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Some(limit) = app.idle_timeout() {
                    app.sessions.sweep(limit, crate::auth::now_ms());
                }
            }
        })
    };
    let routes = router(app.clone());
    let mut limits = config.limits.clone();
    // Every connection needs a descriptor, as do files and the store: keep a reserve.
    let open_files = crate::connections::raise_open_files_limit();
    let fits = (open_files.saturating_sub(256) as usize).max(16);
    if limits.max_connections > fits {
        tracing::info!(
            open_files,
            max_connections = fits,
            "fewer connections than asked: the open-files limit is lower"
        );
        limits.max_connections = fits;
    }
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(4 * crate::app::MAX_HEADER_BYTES);
    let connections = Arc::new(Connections::default());
    let (stop_connections, stopping) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let admitted = match connections.admit(peer.ip(), &limits) {
            Ok(admitted) => admitted,
            Err(why) => {
                connections.log_refusal(peer, why);
                tokio::spawn(crate::connections::refuse(stream, why));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let stream = Tracked::new(stream, activity.clone());
        let body_timeout = limits.body_timeout;
        let (started, ended) = (activity.clone(), activity.clone());
        let service = routes
            .clone()
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                started.request_started();
                req.extensions_mut().insert(ClientAddr(peer));
                req.map(|body| axum::body::Body::new(TimedBody::new(body, body_timeout)))
            })
            .map_response(move |response| {
                ended.request_ended();
                response
            });
        let service = hyper_util::service::TowerToHyperService::new(tower::service_fn(move |req| {
            handled_in_own_task(service.clone().oneshot(req))
        }));
        let served = Served {
            builder: builder.clone(),
            activity,
            idle_timeout: limits.idle_timeout,
            stopping: stopping.clone(),
            peer,
            _admitted: admitted,
        };
        match &acceptor {
            None => {
                tokio::spawn(served.serve(stream, service));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = limits.header_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => served.serve(tls_stream, service).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
            }
        }
    }
    match leader_work {
        LeaderWork::Single(services) => services.stop(),
        LeaderWork::Cluster(campaign) => campaign.abort(),
    }
    sweeper.abort();
    sampler.abort();
    replicas.abort();
    if let Some(publisher) = publisher {
        publisher.abort();
    }
    tracing::info!("shutting down: draining connections");
    let _ = stop_connections.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if drained.await.is_err() {
        tracing::warn!(open = connections.open(), "connections still open after 10 s; closing");
    }
    Ok(())
}

/// What the router's service answers a request with.
type Answer = Result<axum::response::Response, std::convert::Infallible>;

/// Runs a request's handling as a task of its own, which the connection's task awaits.
///
/// Handled inside the connection's task, a request that reads a body wakes that very task
/// (hyper's body channel wakes its sender, the connection), and tokio takes a task woken
/// while it runs for one that yielded: it queues it and wakes the other worker to take it,
/// so every such request crossed to the other core and woke it. Between two tasks the wake
/// is an ordinary one, which the worker keeps for itself. Dropped (the client went away), it
/// aborts the handling, as dropping the handling itself did; a panic in it answers 500.
async fn handled_in_own_task<F>(handling: F) -> Answer
where
    F: std::future::Future<Output = Answer> + Send + 'static,
{
    struct AbortOnDrop(tokio::task::JoinHandle<Answer>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(tokio::spawn(handling));
    match (&mut task.0).await {
        Ok(answer) => answer,
        Err(e) => {
            use axum::response::IntoResponse;
            tracing::error!(error = %e, "a request's handling failed");
            Ok(crate::error::ApiError::internal("the request's handling failed").into_response())
        }
    }
}

/// Keeps what this cluster node says of itself current for the others: its host (for the
/// leader's prechecks) every so often, its image copies as soon as they change.
async fn publish_node_facts(app: Arc<App>) {
    let Some(membership) = app.cluster.clone() else { return };
    loop {
        let _ = tokio::time::timeout(HOST_FACTS_EVERY, app.images.copies.changed.notified()).await;
        // Progress reports come in bursts; one write covers a burst.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let host =
            crate::upgrade::facts::host_facts(&membership.me().node, &app.data_dir, &app.images, &app.upgrade.slots);
        if let Err(e) = membership.cluster.publish_host(host).await {
            tracing::debug!(error = %e, "cannot publish this node's facts; trying again later");
            tokio::time::sleep(Duration::from_secs(1)).await;
            app.images.copies.changed.notify_one();
        }
    }
}

enum LeaderWork {
    Single(crate::cluster::LeaderServices),
    Cluster(tokio::task::JoinHandle<()>),
}

/// One admitted connection: served until the client closes it, it idles past the idle
/// timeout, or the controller stops (then its request in flight finishes first).
struct Served {
    builder: Builder<TokioExecutor>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    stopping: tokio::sync::watch::Receiver<bool>,
    peer: SocketAddr,
    _admitted: Admitted,
}

impl Served {
    async fn serve<S, H>(mut self, stream: S, service: H)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: hyper::service::Service<Request<hyper::body::Incoming>, Response = axum::response::Response>
            + Clone
            + Send
            + 'static,
        H::Future: Send + 'static,
        H::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = crate::connections::ErrorBodies::new(stream);
        let conn = self.builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::pin!(conn);
        let mut check = tokio::time::interval((self.idle_timeout / 4).max(Duration::from_millis(100)));
        let mut closing = false;
        loop {
            tokio::select! {
                outcome = conn.as_mut() => {
                    if let Err(e) = outcome {
                        tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
                    }
                    return;
                }
                _ = check.tick(), if !closing => {
                    if self.activity.idle_for() >= self.idle_timeout {
                        tracing::debug!(peer = %self.peer, "closing an idle connection");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                _ = self.stopping.changed(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::{IntoResponse, Response};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_handling_runs_to_its_answer_and_a_panic_in_it_answers_500() {
        let answer = handled_in_own_task(async {
            Ok::<_, Infallible>((axum::http::StatusCode::CREATED, "made").into_response())
        });
        assert_eq!(answer.await.unwrap().status(), axum::http::StatusCode::CREATED);
        let boom = handled_in_own_task(async {
            if true {
                panic!("a bug in a handler");
            }
            Ok::<Response, Infallible>(().into_response())
        });
        assert_eq!(boom.await.unwrap().status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn a_handling_whose_connection_went_away_is_stopped() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (dropped, started) = (Arc::new(AtomicBool::new(false)), Arc::new(tokio::sync::Notify::new()));
        let handling = {
            let (guard, started) = (Dropped(dropped.clone()), started.clone());
            async move {
                let _guard = guard;
                started.notify_one();
                std::future::pending::<()>().await;
                Ok::<Response, Infallible>(().into_response())
            }
        };
        let outer = tokio::spawn(handled_in_own_task(handling));
        started.notified().await;
        outer.abort();
        let _ = outer.await;
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the handling went on after its connection's task was dropped");
    }
}
