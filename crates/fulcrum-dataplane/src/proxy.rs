//! Serving one client connection: HTTP/1.1 reverse proxy (keep-alive both sides,
//! `X-Forwarded-For`, hop-by-hop headers dropped) or TCP byte copying, each to a server the
//! pool's plan picks; a server that cannot be reached is passed over for the next one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum_se_protocol::Application;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::stats::Counters;
use crate::upstream::{PoolEntry, ServerEntry, UpBody};
use crate::{lock, reached};

/// Tries per request or connection: a server that refuses is passed over for another.
const ATTEMPTS: usize = 4;
/// How long a keep-alive client connection may sit idle.
const CLIENT_IDLE: Duration = Duration::from_secs(60);

/// How far a virtual service's removal has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drain {
    Serving,
    /// Responses carry `Connection: close`, so clients reconnect elsewhere after their current
    /// request.
    Closing,
    /// Idle keep-alive connections are closed too.
    Idle,
    /// Whatever is left is cut.
    Cut,
}

/// One virtual service on this SE.
pub struct VsEntry {
    pub uuid: String,
    pub name: String,
    pub application: Application,
    pub pool: Mutex<Option<Arc<PoolEntry>>>,
    /// What its TLS listeners present (replaced when the certificate changes).
    pub tls: Mutex<Option<tokio_rustls::TlsAcceptor>>,
    pub counters: Counters,
    pub drain: watch::Sender<Drain>,
}

impl VsEntry {
    pub fn new(uuid: &str, name: &str, application: Application) -> VsEntry {
        VsEntry {
            uuid: uuid.to_string(),
            name: name.to_string(),
            application,
            pool: Mutex::new(None),
            tls: Mutex::new(None),
            counters: Counters::default(),
            drain: watch::Sender::new(Drain::Serving),
        }
    }

    fn pool(&self) -> Option<Arc<PoolEntry>> {
        lock(&self.pool).clone()
    }
}

/// Counts a connection open for its lifetime (the SE's total is what a restart waits on).
pub struct Open {
    vs: Arc<VsEntry>,
    total: Arc<crate::OpenCount>,
}

impl Open {
    pub fn new(vs: Arc<VsEntry>, total: Arc<crate::OpenCount>) -> Open {
        vs.counters.opened();
        total.add();
        Open { vs, total }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.vs.counters.closed();
        self.total.done();
    }
}

/// A client connection, plain or inside TLS.
pub trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> ClientStream for S {}

/// How long a client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves an accepted connection; on a TLS listener, after the handshake with the virtual
/// service's certificate.
pub async fn accepted(stream: TcpStream, client: SocketAddr, vs: Arc<VsEntry>, open: Open, tls: bool) {
    let _ = stream.set_nodelay(true);
    if !tls {
        return serve(stream, client, vs, open).await;
    }
    let Some(acceptor) = lock(&vs.tls).clone() else {
        Counters::add(&vs.counters.errors, 1);
        return;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve(stream, client, vs, open).await,
        Ok(Err(e)) => {
            tracing::debug!(vs = %vs.name, %client, error = %e, "TLS handshake failed");
            Counters::add(&vs.counters.errors, 1);
        }
        Err(_) => Counters::add(&vs.counters.errors, 1),
    }
}

async fn serve(stream: impl ClientStream, client: SocketAddr, vs: Arc<VsEntry>, open: Open) {
    match vs.application {
        Application::Http => serve_http(stream, client, vs).await,
        Application::Tcp => serve_tcp(stream, client, vs).await,
    }
    drop(open);
}

async fn serve_http(stream: impl ClientStream, client: SocketAddr, vs: Arc<VsEntry>) {
    let mut drain = vs.drain.subscribe();
    let service_vs = vs.clone();
    let service = hyper::service::service_fn(move |request| {
        let vs = service_vs.clone();
        async move { Ok::<_, Infallible>(proxy(request, client, &vs).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_IDLE)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = reached(&mut drain, |d| *d >= Drain::Idle) => {}
    }
    // Idle connections close now; a busy one after its response.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = reached(&mut drain, |d| *d == Drain::Cut) => {}
    }
}

type DownBody = Either<Relay, Full<Bytes>>;

fn local(status: StatusCode, message: &str, vs: &VsEntry) -> Response<DownBody> {
    Counters::add(&vs.counters.errors, 1);
    let body = format!("{{\"error\": \"{message}\"}}\n");
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if *vs.drain.borrow() != Drain::Serving {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), with those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().parse::<u64>().map_or(true, |n| n > 0))
}

async fn proxy(request: Request<Incoming>, client: SocketAddr, vs: &Arc<VsEntry>) -> Response<DownBody> {
    let started = Instant::now();
    Counters::add(&vs.counters.requests, 1);
    let Some(pool) = vs.pool() else {
        return local(StatusCode::SERVICE_UNAVAILABLE, "the virtual service has no pool", vs);
    };
    let (mut parts, body) = request.into_parts();
    let bodied = has_body(&parts.headers);
    if let Some(n) = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        Counters::add(&vs.counters.bytes_in, n);
    }
    strip_hop_by_hop(&mut parts.headers);
    let forwarded = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        parts.headers.insert("x-forwarded-for", v);
    }
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = hyper::Uri::from(pq);
    }
    let mut body = bodied.then_some(body);
    let balance = pool.balance();
    let mut tried = Vec::new();
    let mut last_error = String::from("no server is up");
    for _ in 0..ATTEMPTS {
        let Some(index) = pool.pick(&balance, client.ip(), &tried) else { break };
        let server = &balance.servers[index];
        let (mut sender, reused) = match server.checkout().await {
            Some(s) => (s, true),
            None => match server.connect().await {
                Ok(s) => (s, false),
                Err(e) => {
                    Counters::add(&server.counters.errors, 1);
                    last_error = e;
                    tried.push(index);
                    continue;
                }
            },
        };
        let upstream_body: UpBody = match body.take() {
            Some(b) => Either::Left(b),
            None => Either::Right(Empty::new()),
        };
        let upstream = Request::from_parts(parts.clone(), upstream_body);
        server.load.fetch_add(1, Relaxed);
        Counters::add(&server.counters.requests, 1);
        match sender.try_send_request(upstream).await {
            Ok(response) => {
                let lease = Lease { server: server.clone(), sender: Some(sender), vs: vs.clone(), started, bytes: 0 };
                let (mut head, inner) = response.into_parts();
                if head.status.is_server_error() {
                    Counters::add(&vs.counters.errors, 1);
                    Counters::add(&server.counters.errors, 1);
                }
                strip_hop_by_hop(&mut head.headers);
                if *vs.drain.borrow() != Drain::Serving {
                    head.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return Response::from_parts(head, Either::Left(Relay { inner, lease: Some(lease) }));
            }
            Err(mut e) => {
                server.load.fetch_sub(1, Relaxed);
                last_error = format!("{}: {}", server.key, e.error());
                // Not sent at all: the body is still ours. Sent on a connection the server
                // had closed: only a request without a body can go again.
                if let Some(Either::Left(b)) = e.take_message().map(Request::into_body) {
                    body = Some(b);
                } else if bodied {
                    break;
                }
                if !reused {
                    Counters::add(&server.counters.errors, 1);
                    tried.push(index);
                }
            }
        }
    }
    tracing::debug!(vs = %vs.name, error = %last_error, "request failed");
    local(StatusCode::BAD_GATEWAY, &last_error.replace('"', "'"), vs)
}

/// A request in flight to a server: when its response has been relayed, the connection
/// goes back to the server's idle list and the request is counted.
struct Lease {
    server: Arc<ServerEntry>,
    sender: Option<SendRequest<UpBody>>,
    vs: Arc<VsEntry>,
    started: Instant,
    bytes: u64,
}

impl Lease {
    fn finish(mut self, complete: bool) {
        self.server.load.fetch_sub(1, Relaxed);
        let took = self.started.elapsed();
        for c in [&self.vs.counters, &self.server.counters] {
            c.latency(took);
            Counters::add(&c.bytes_out, self.bytes);
            if !complete {
                Counters::add(&c.errors, 1);
            }
        }
        if complete && let Some(sender) = self.sender.take() {
            self.server.checkin(sender);
        }
    }
}

pub struct Relay {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(lease)) = (frame.data_ref(), this.lease.as_mut()) {
                    lease.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream()
                    && let Some(lease) = this.lease.take()
                {
                    lease.finish(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(lease) = this.lease.take() {
                    lease.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(lease) = this.lease.take() {
                    lease.finish(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.finish(self.inner.is_end_stream());
        }
    }
}

async fn serve_tcp(mut stream: impl ClientStream, client: SocketAddr, vs: Arc<VsEntry>) {
    let started = Instant::now();
    let Some(pool) = vs.pool() else {
        Counters::add(&vs.counters.errors, 1);
        return;
    };
    let balance = pool.balance();
    let mut tried = Vec::new();
    let mut upstream = None;
    for _ in 0..ATTEMPTS {
        let Some(index) = pool.pick(&balance, client.ip(), &tried) else { break };
        tried.push(index);
        let server = &balance.servers[index];
        match tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(server.addr)).await {
            Ok(Ok(s)) => {
                upstream = Some((server.clone(), s));
                break;
            }
            _ => Counters::add(&server.counters.errors, 1),
        }
    }
    let Some((server, mut up)) = upstream else {
        Counters::add(&vs.counters.errors, 1);
        return;
    };
    let _ = up.set_nodelay(true);
    server.load.fetch_add(1, Relaxed);
    server.counters.opened();
    Counters::add(&server.counters.requests, 1);
    let mut drain = vs.drain.subscribe();
    let mut cut = server.cut_signal();
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut stream, &mut up) => r.ok(),
        () = reached(&mut drain, |d| *d == Drain::Cut) => None,
        () = reached(&mut cut, |c| *c) => None,
    };
    server.load.fetch_sub(1, Relaxed);
    server.counters.closed();
    for c in [&vs.counters, &server.counters] {
        c.latency(started.elapsed());
        match copied {
            Some((from_client, to_client)) => {
                Counters::add(&c.bytes_in, from_client);
                Counters::add(&c.bytes_out, to_client);
            }
            None => Counters::add(&c.errors, 1),
        }
    }
}
