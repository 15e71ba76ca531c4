//! What one client may hold of the controller: a bounded number of connections (overall and
//! per client address), headers within a time, bodies that keep arriving, and no idle
//! connection kept past its timeout. The accept loop asks [`Connections::admit`]; each
//! admitted connection is served by [`serve_connection`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The limits of `fulcrum serve` (`--header-timeout`, `--idle-timeout`, `--body-timeout`,
/// `--max-connections`, `--max-connections-per-client`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection may sit without a request in flight and without traffic.
    pub idle_timeout: Duration,
    /// Time a request body may go without a byte arriving; after that long, it must also
    /// average at least [`MIN_BODY_RATE`].
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_client: 1024,
        }
    }
}

/// Bytes per second a body must average once it has taken longer than the body timeout.
pub const MIN_BODY_RATE: u64 = 1024;

/// Open connections, overall and per client address.
#[derive(Debug, Default)]
pub struct Connections {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// When the last refusal was logged (millis since `epoch`), so a flood logs once a second.
    last_refusal_log: AtomicU64,
    refused_since_log: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

/// Held by a served connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    connections: Arc<Connections>,
    client: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.total.fetch_sub(1, Ordering::SeqCst);
        let mut per_client = self.connections.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

impl Connections {
    /// A place for a connection from `client`, or why there is none.
    pub fn admit(self: &Arc<Self>, client: IpAddr, limits: &Limits) -> Result<Admitted, &'static str> {
        let mut per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::SeqCst) >= limits.max_connections {
            return Err("the controller has as many connections as it allows");
        }
        let mine = per_client.entry(client).or_insert(0);
        if *mine >= limits.max_connections_per_client {
            return Err("this client has as many connections as one client may");
        }
        *mine += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        Ok(Admitted { connections: self.clone(), client })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Logs a refusal, at most once a second (with how many were refused meanwhile).
    pub fn log_refusal(&self, peer: SocketAddr, why: &str) {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = epoch.elapsed().as_millis() as u64;
        let refused = self.refused_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_refusal_log.load(Ordering::Relaxed);
        if (now.saturating_sub(last) >= 1000 || last == 0)
            && self.last_refusal_log.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.refused_since_log.store(0, Ordering::Relaxed);
            tracing::warn!(%peer, refused, open = self.open(), "refusing connections: {why}");
        }
    }
}

/// The answer to a connection beyond the limits: 503 with a JSON error, then close.
pub async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, why: &str) {
    let body = serde_json::json!({"error": format!("{why}; try again later")}).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Traffic and requests in flight on one connection, for the idle timeout.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    /// Millis since `started` of the last byte read or written.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity { started: Instant::now(), last: AtomicU64::new(0), in_flight: AtomicUsize::new(0) })
    }

    fn touch(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long the connection has been idle: no request in flight, no bytes either way.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
    }

    pub fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.touch();
    }
}

/// A stream that records its traffic in an [`Activity`].
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Tracked<S> {
        Tracked { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    // Forwarded so that hyper writes a big answer's body from where it lies (writev) instead
    // of copying it into its own buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper answers requests it cannot parse (431, 414, 400) itself, with an empty body. This
/// stream gives those answers the JSON error body every other error has: a head of status 400
/// or more with `content-length: 0` can only be hyper's, since the application fills every
/// empty error body (see `app::common_headers`).
pub struct ErrorBodies<S> {
    inner: S,
    /// A rewritten answer not yet written to `inner`.
    pending: Vec<u8>,
}

impl<S> ErrorBodies<S> {
    pub fn new(inner: S) -> ErrorBodies<S> {
        ErrorBodies { inner, pending: Vec::new() }
    }
}

/// The head `data` starts with, given a JSON error body, when it is a bodiless error answer.
pub fn with_error_body(data: &[u8]) -> Option<Vec<u8>> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code, reason) = (parts.next()?, parts.next()?, parts.next().unwrap_or(""));
    let code: u16 = code.parse().ok()?;
    if version != "HTTP/1.1" || code < 400 || end + 4 != data.len() {
        return None;
    }
    if !head.lines().any(|l| l.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let error = match code {
        431 => "the request's headers are too large".to_string(),
        414 => "the request's URI is too long".to_string(),
        400 => "the request is not valid HTTP/1.1".to_string(),
        _ => reason.to_lowercase(),
    };
    let body = serde_json::json!({ "error": error }).to_string();
    let mut out = String::with_capacity(head.len() + body.len() + 64);
    for line in head.lines() {
        if line.eq_ignore_ascii_case("content-length: 0") {
            out.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", body.len()));
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<S: AsyncWrite + Unpin> ErrorBodies<S> {
    /// Takes `data` whole when it is a bodiless error answer, writing the rewritten one instead.
    fn take_error_answer(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Option<Poll<io::Result<usize>>> {
        if !(data.starts_with(b"HTTP/1.1 4") || data.starts_with(b"HTTP/1.1 5")) {
            return None;
        }
        self.pending = with_error_body(data)?;
        Some(match self.poll_pending(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(data.len())),
        })
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ErrorBodies<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(taken) = this.take_error_answer(cx, data) {
            return taken;
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        // A bodiless answer comes as its head alone.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(taken) = this.take_error_answer(cx, only)
        {
            return taken;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_pending(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Why a request body stopped: it did not keep arriving.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving (no byte for {0:?}, or slower than {MIN_BODY_RATE} bytes/s)")]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] when it stalls for the body timeout, or
/// once older than that averages less than [`MIN_BODY_RATE`].
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    started: Instant,
    received: u64,
    stall: Pin<Box<tokio::time::Sleep>>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> TimedBody<B> {
        TimedBody { inner, timeout, started: Instant::now(), received: 0, stall: Box::pin(tokio::time::sleep(timeout)) }
    }
}

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                let elapsed = this.started.elapsed();
                if elapsed > this.timeout && this.received < MIN_BODY_RATE * elapsed.as_secs() {
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))));
                }
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.stall.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.stall.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an error from reading a body is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimeout>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Raises this process's open-files soft limit to its hard limit (connections, files and the
/// store all need descriptors); returns the soft limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_bounded_overall_and_per_client() {
        let connections = Arc::new(Connections::default());
        let limits = Limits { max_connections: 3, max_connections_per_client: 2, ..Limits::default() };
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let first = connections.admit(a, &limits).unwrap();
        let _second = connections.admit(a, &limits).unwrap();
        assert!(connections.admit(a, &limits).unwrap_err().contains("one client"));
        let _third = connections.admit(b, &limits).unwrap();
        assert!(connections.admit(b, &limits).unwrap_err().contains("as many connections as it allows"));
        drop(first);
        assert_eq!(connections.open(), 2);
        assert!(connections.admit(a, &limits).is_ok(), "a closed connection gives its place back");
    }

    /// A body fed by a channel, as a slow client would send one.
    struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = io::Error;
        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            self.0.poll_recv(cx).map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_a_flowing_one_does_not() {
        use http_body_util::BodyExt;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let timed = TimedBody::new(Fed(receiver), Duration::from_millis(100));
        let reader = tokio::spawn(async move { timed.collect().await.map(|c| c.to_bytes()) });
        for _ in 0..3 {
            sender.send(Bytes::from_static(b"hello world")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // Then nothing: the body stalls.
        let outcome = tokio::time::timeout(Duration::from_secs(5), reader).await.unwrap().unwrap();
        let error = outcome.unwrap_err();
        assert!(is_body_timeout(&*error), "{error}");
        drop(sender);

        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let timed = TimedBody::new(Fed(receiver), Duration::from_millis(200));
        let reader = tokio::spawn(async move { timed.collect().await.map(|c| c.to_bytes()) });
        sender.send(Bytes::from_static(b"all of it")).await.unwrap();
        drop(sender);
        assert_eq!(&reader.await.unwrap().unwrap()[..], b"all of it");
    }

    #[test]
    fn bodiless_error_answers_get_a_json_body() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 23:35:02 GMT\r\n\r\n";
        let out = String::from_utf8(with_error_body(hyper_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].as_str().unwrap().contains("headers are too large"));
        // Answers with a body, successes, and a head followed by body bytes are left alone.
        assert!(with_error_body(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").is_none());
        assert!(with_error_body(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(with_error_body(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nmore").is_none());
    }

    #[tokio::test]
    async fn vectored_writes_pass_through_and_a_bodiless_error_head_alone_gets_its_body() {
        let tracked = Tracked::new(Vec::new(), Activity::new());
        assert!(tracked.is_write_vectored(), "hyper writes bodies in place only through a vectored stream");
        let mut stream = ErrorBodies::new(tracked);
        assert!(stream.is_write_vectored());
        let ok = [io::IoSlice::new(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"), io::IoSlice::new(b"{}")];
        assert_eq!(stream.write_vectored(&ok).await.unwrap(), 40);
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let written = stream.write_vectored(&[io::IoSlice::new(b""), io::IoSlice::new(hyper_431)]).await.unwrap();
        assert_eq!(written, hyper_431.len(), "the head is taken whole");
        stream.flush().await.unwrap();
        let out = String::from_utf8(stream.inner.inner).unwrap();
        let (ok_answer, error_answer) = out.split_at(40);
        assert_eq!(ok_answer, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(error_answer.as_bytes(), with_error_body(hyper_431).unwrap());
    }

    #[test]
    fn activity_counts_idle_time_only_without_requests() {
        let activity = Activity::new();
        activity.request_started();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(activity.idle_for(), Duration::ZERO);
        activity.request_ended();
        std::thread::sleep(Duration::from_millis(20));
        assert!(activity.idle_for() >= Duration::from_millis(20));
    }
}
