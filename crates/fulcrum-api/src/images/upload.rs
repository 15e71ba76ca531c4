//! `POST /api/image` (multipart, field `file`): the body streams through two threads at once,
//! one writing the file, one verifying the package (which also yields its sha256), and the
//! record follows the upload from the moment its manifest is known. (The hashing takes a core's
//! full attention; on the writer's thread it would stall the disk.)

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Buf;
use fulcrum_package::{Manifest, PackageError, Verified};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::direct::DirectWriter;
use super::{IfGone, Staged, UPLOAD_BYTES, UPLOADS, UPLOADS_IN_FLIGHT, require_image_write};
use crate::app::{App, DRAIN_LIMIT_BYTES, RequestContext, discard_body};
use crate::error::ApiError;
use crate::multipart::{self, Event, Multipart};

/// Batches queued for each of the two threads: bounds the memory an upload holds.
const QUEUE_BATCHES: usize = 8;
/// Bytes gathered before the threads are woken: one wake per socket read would cost more
/// in context switches than the copies saved by passing slices.
const BATCH_BYTES: usize = 1 << 20;
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Slices of the file's bytes, shared by the two threads.
type Batch = Arc<Vec<Bytes>>;

/// The file's bytes on their way to the writer and the verifier, in batches.
struct Fanout {
    senders: Option<[mpsc::Sender<Batch>; 2]>,
    batch: Vec<Bytes>,
    bytes: usize,
}

impl Fanout {
    /// Queues a slice; false when a thread has given up (its error is the answer).
    async fn push(&mut self, chunk: Bytes) -> bool {
        if self.senders.is_none() {
            return true;
        }
        self.bytes += chunk.len();
        self.batch.push(chunk);
        self.bytes < BATCH_BYTES || self.flush().await
    }

    async fn flush(&mut self) -> bool {
        let Some(senders) = &self.senders else { return true };
        if self.batch.is_empty() {
            return true;
        }
        let batch: Batch = Arc::new(std::mem::take(&mut self.batch));
        self.bytes = 0;
        for sender in senders {
            if sender.send(batch.clone()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Sends what is gathered and lets the threads finish.
    async fn close(&mut self) -> bool {
        let sent = self.flush().await;
        self.senders = None;
        sent
    }
}

/// The bytes of a channel as a `Read` (for the verifier thread).
struct ChannelReader {
    rx: mpsc::Receiver<Batch>,
    batch: Batch,
    next: usize,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if let Some(chunk) = self.batch.get(self.next) {
                self.current = chunk.clone();
                self.next += 1;
                continue;
            }
            match self.rx.blocking_recv() {
                Some(batch) => (self.batch, self.next) = (batch, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Writes what arrives; fsyncs at the end.
fn write_file(file: std::fs::File, mut rx: mpsc::Receiver<Batch>, written: Arc<AtomicU64>) -> io::Result<()> {
    let mut out = DirectWriter::new(file);
    let mut total = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for chunk in batch.iter() {
            out.write(chunk)?;
            total += chunk.len() as u64;
        }
        written.store(total, Ordering::Relaxed);
    }
    out.finish()
}

/// The answer for a failed write of a package file.
pub(super) fn write_error(e: &io::Error) -> ApiError {
    if e.kind() == io::ErrorKind::StorageFull {
        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "the disk filled up while the package was written")
    } else {
        ApiError::internal(format!("cannot write the package: {e}"))
    }
}

/// The answer for a package that failed verification.
pub(super) fn package_error(e: PackageError) -> ApiError {
    if e.is_bad_package() {
        ApiError::bad_request(e.to_string())
    } else {
        ApiError::internal(format!("cannot read the package: {e}"))
    }
}

pub async fn upload(app: &Arc<App>, ctx: &RequestContext, mut body: Body) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    let length = ctx.header("content-length").and_then(|v| v.parse::<u64>().ok());
    let _reservation = app.images.reserve(length.unwrap_or(0))?;
    let mut first = Bytes::new();
    let boundary = match ctx.header("content-type").and_then(multipart::boundary) {
        Some(b) => Some(b),
        None => {
            first = first_data(&mut body).await?;
            multipart::sniff_boundary(&first)
        }
    };
    let Some(boundary) = boundary else {
        discard_body(&mut body, DRAIN_LIMIT_BYTES).await;
        return Err(ApiError::bad_request(
            "POST /api/image takes multipart/form-data with the package in the field 'file' \
             (curl -F file=@controller.pkg)",
        ));
    };
    UPLOADS_IN_FLIGHT.add(1);
    let result = receive(app, ctx, &mut body, first, &boundary, length).await;
    UPLOADS_IN_FLIGHT.add(-1);
    match &result {
        Ok(_) => UPLOADS.add(&["success"], 1),
        Err(e) => {
            UPLOADS.add(&["refused"], 1);
            tracing::info!(status = e.status.as_u16(), error = %e.message, "image upload refused");
            discard_body(&mut body, DRAIN_LIMIT_BYTES).await;
        }
    }
    result
}

/// The first bytes of the body (enough to see a boundary line).
async fn first_data(body: &mut Body) -> Result<Bytes, ApiError> {
    let mut start = bytes::BytesMut::new();
    while start.len() < 80 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    start.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(ApiError::bad_request(format!("the upload was cut off: {e}"))),
            None => break,
        }
    }
    Ok(start.freeze())
}

async fn receive(
    app: &Arc<App>,
    ctx: &RequestContext,
    body: &mut Body,
    first: Bytes,
    boundary: &str,
    length: Option<u64>,
) -> Result<Response, ApiError> {
    let started = SystemTime::now();
    let uuid = format!("{}-{}", super::KIND, uuid::Uuid::new_v4());
    let tmp: PathBuf = app.images.tmp_path(&uuid);
    let mut staged = Staged::new(app.clone());
    let file =
        std::fs::File::create(&tmp).map_err(|e| ApiError::internal(format!("cannot create {}: {e}", tmp.display())))?;
    staged.file = Some(tmp.clone());

    let written = Arc::new(AtomicU64::new(0));
    let (to_writer, writer_rx) = mpsc::channel::<Batch>(QUEUE_BATCHES);
    let (to_verifier, verifier_rx) = mpsc::channel::<Batch>(QUEUE_BATCHES);
    let (manifest_tx, mut manifest_rx) = mpsc::unbounded_channel::<Manifest>();
    let writer = tokio::task::spawn_blocking({
        let written = written.clone();
        move || write_file(file, writer_rx, written)
    });
    let keys = app.images.trusted().clone();
    let verifier = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader { rx: verifier_rx, batch: Batch::default(), next: 0, current: Bytes::new() };
        fulcrum_package::verify(&mut reader, &keys, &mut |m| {
            let _ = manifest_tx.send(m.clone());
        })
    });

    let mut fanout = Fanout { senders: Some([to_writer, to_verifier]), batch: Vec::new(), bytes: 0 };
    let mut parser = Multipart::new(boundary);
    let mut events = Vec::new();
    let (mut in_file, mut file_seen, mut stage_failed) = (false, false, false);
    let mut manifest: Option<Manifest> = None;
    let mut last_progress = Instant::now();
    let mut pending = (!first.is_empty()).then_some(first);
    loop {
        let data = match pending.take() {
            Some(data) => data,
            None => match body.frame().await {
                None => break,
                Some(frame) => {
                    let frame = frame.map_err(|e| ApiError::bad_request(format!("the upload was cut off: {e}")))?;
                    let Ok(data) = frame.into_data() else { continue };
                    data
                }
            },
        };
        UPLOAD_BYTES.add(&["multipart"], data.len() as u64);
        parser.feed_bytes(data, &mut events).map_err(ApiError::bad_request)?;
        for event in events.drain(..) {
            match event {
                Event::Part(h) => {
                    in_file = !file_seen && h.name.as_deref() == Some("file");
                    file_seen |= in_file;
                }
                Event::Data(chunk) if in_file => stage_failed |= !fanout.push(chunk).await,
                Event::PartEnd if in_file => {
                    in_file = false;
                    stage_failed |= !fanout.close().await; // the file is complete
                }
                _ => {}
            }
        }
        if stage_failed {
            break; // the verifier or the writer gave up; its error is the answer
        }
        while let Ok(m) = manifest_rx.try_recv() {
            staged.show_progress(&uuid, &m, length.unwrap_or(0), 0, started, IfGone::Create).await?;
            manifest = Some(m);
        }
        if let (Some(m), Some(total)) = (&manifest, length)
            && last_progress.elapsed() >= PROGRESS_EVERY
        {
            last_progress = Instant::now();
            let progress = written.load(Ordering::Relaxed).saturating_mul(100) / total.max(1);
            staged.show_progress(&uuid, m, total, progress.min(99), started, IfGone::Skip).await?;
        }
    }
    if !stage_failed {
        fanout.close().await; // a body cut off inside the file: the verifier says how
    }
    drop(fanout);
    let verified = verifier.await.map_err(|e| ApiError::internal(format!("the verifier failed: {e}")))?;
    let stored = writer.await.map_err(|e| ApiError::internal(format!("the writer failed: {e}")))?;
    // A failed write is the cause even when the verifier then saw a short stream.
    stored.map_err(|e| write_error(&e))?;
    if !stage_failed {
        parser.finish().map_err(ApiError::bad_request)?;
        if !file_seen {
            return Err(ApiError::bad_request("the multipart body has no field 'file' (curl -F file=@controller.pkg)"));
        }
    }
    let verified: Verified = verified.map_err(package_error)?;
    if let Ok(m) = manifest_rx.try_recv()
        && manifest.is_none()
    {
        staged.show_progress(&uuid, &m, length.unwrap_or(0), 0, started, IfGone::Create).await?;
    }
    let published = staged.publish(&uuid, &verified, &tmp, started).await?;
    Ok(super::created_response(app, ctx, &published))
}
