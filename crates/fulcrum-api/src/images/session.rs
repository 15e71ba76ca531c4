//! Resumable uploads, for multi-GB packages over links that drop:
//!
//! - `POST /api/image-upload {"size": N, "filename": "controller.pkg"}` starts a session (201);
//! - `PUT /api/image-upload/<id>` with `Content-Range: bytes S-E/N` appends a chunk at S, which
//!   must be the session's offset (else 409); the chunk is fsynced before the answer;
//! - `GET /api/image-upload/<id>` says the offset to continue from;
//! - `POST /api/image-upload/<id>/complete {"sha256": "..."}` verifies and publishes (201);
//! - `DELETE /api/image-upload/<id>` abandons it.
//!
//! A session is two files: `<id>.part` (the bytes) and `<id>.json` (size, acknowledged offset).
//! Bytes past the acknowledged offset are cut off before the next chunk is written, so a chunk
//! interrupted halfway never counts.

use std::io::{BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fulcrum_package::{PackageError, is_sha256_hex};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::upload::{package_error, write_error};
use super::{IfGone, Images, KIND, SESSIONS_DIR, Staged, UPLOAD_BYTES, require_image_write, sync_dir};
use crate::app::{App, DRAIN_LIMIT_BYTES, RequestContext, discard_body, json_response};
use crate::error::ApiError;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionMeta {
    id: String,
    size: u64,
    filename: String,
    /// Bytes received, fsynced and acknowledged.
    offset: u64,
    started_micros: u64,
    /// The record that shows this upload once its manifest has arrived.
    image_uuid: String,
}

impl SessionMeta {
    fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.started_micros)
    }

    fn view(&self, base_url: &str) -> Value {
        json!({
            "uuid": self.id,
            "url": format!("{base_url}/api/image-upload/{}", self.id),
            "filename": self.filename,
            "size": self.size,
            "offset": self.offset,
            "image_uuid": self.image_uuid,
        })
    }
}

impl Images {
    fn session_dir(&self) -> PathBuf {
        self.dir.join(SESSIONS_DIR)
    }

    fn session_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        let dir = self.session_dir();
        (dir.join(format!("{id}.json")), dir.join(format!("{id}.part")))
    }

    fn load_session(&self, id: &str) -> Result<SessionMeta, ApiError> {
        let not_found = || ApiError::not_found(format!("upload session '{id}' not found"));
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(not_found());
        }
        let text = std::fs::read(self.session_paths(id).0).map_err(|_| not_found())?;
        serde_json::from_slice(&text).map_err(|e| ApiError::internal(format!("upload session '{id}' is damaged: {e}")))
    }

    /// Writes the session's metadata durably (temporary file, fsync, rename, fsync dir).
    fn save_session(&self, meta: &SessionMeta) -> std::io::Result<()> {
        let (path, _) = self.session_paths(&meta.id);
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(meta).expect("session metadata serializes"))?;
        file.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.session_dir())
    }

    fn remove_session(&self, id: &str) {
        let (meta, part) = self.session_paths(id);
        let _ = std::fs::remove_file(part);
        let _ = std::fs::remove_file(meta);
    }

    fn session_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.session_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(id.to_string()).or_default().clone()
    }
}

/// A client that retries right after a dropped connection finds the old request still
/// finishing; it waits for it a little rather than being refused.
async fn lock_session<'a>(
    lock: &'a tokio::sync::Mutex<()>,
    id: &str,
) -> Result<tokio::sync::MutexGuard<'a, ()>, ApiError> {
    tokio::time::timeout(Duration::from_secs(10), lock.lock())
        .await
        .map_err(|_| ApiError::conflict(format!("another request is writing to upload session '{id}'")))
}

/// Removes sessions untouched for longer than `max_age`.
pub fn expire(dir: &Path, max_age: Duration, now: SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "json") {
            if path.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let part = path.with_extension("part");
        let touched = [&path, &part]
            .iter()
            .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .max()
            .unwrap_or(UNIX_EPOCH);
        if now.duration_since(touched).unwrap_or_default() > max_age {
            tracing::info!(session = %path.display(), "removing an expired upload session");
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&path);
        }
    }
}

pub async fn create_session(app: &Arc<App>, ctx: &RequestContext, body: &[u8]) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    let input = crate::objects::parse_body(body)?;
    let size = input
        .get("size")
        .and_then(Value::as_u64)
        .filter(|s| *s > 0)
        .ok_or_else(|| ApiError::bad_request("field 'size': the package's size in bytes is required"))?;
    let filename = input.get("filename").and_then(Value::as_str).unwrap_or("package").to_string();
    // Checked now; uploads that start later may still take the space (the chunk then gets 507).
    drop(app.images.reserve(size)?);
    let meta = SessionMeta {
        id: format!("upload-{}", uuid::Uuid::new_v4()),
        size,
        filename,
        offset: 0,
        started_micros: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64,
        image_uuid: format!("{KIND}-{}", uuid::Uuid::new_v4()),
    };
    let images = &app.images;
    std::fs::File::create(images.session_paths(&meta.id).1)
        .and_then(|_| images.save_session(&meta))
        .map_err(|e| ApiError::internal(format!("cannot start the upload session: {e}")))?;
    Ok(json_response(StatusCode::CREATED, &meta.view(&ctx.base_url)))
}

pub async fn session_status(app: &Arc<App>, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    Ok(json_response(StatusCode::OK, &app.images.load_session(id)?.view(&ctx.base_url)))
}

/// `bytes S-E/T` → (S, E inclusive, T).
fn content_range(value: Option<&str>) -> Result<(u64, u64, u64), ApiError> {
    let bad = || ApiError::bad_request("a chunk needs a header 'Content-Range: bytes <first>-<last>/<size>'");
    let v = value.ok_or_else(bad)?.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = v.split_once('/').ok_or_else(bad)?;
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let (first, last, total) = (num(first)?, num(last)?, num(total)?);
    if last < first || last >= total {
        return Err(ApiError::bad_request(format!(
            "Content-Range bytes {first}-{last}/{total} is not a range of the package"
        )));
    }
    Ok((first, last, total))
}

pub async fn put_chunk(app: &Arc<App>, ctx: &RequestContext, id: &str, mut body: Body) -> Result<Response, ApiError> {
    let result = write_chunk(app, ctx, id, &mut body).await;
    if result.is_err() {
        // Read what the client is still sending, so it gets the answer (and the offset to use).
        discard_body(&mut body, DRAIN_LIMIT_BYTES).await;
    }
    result
}

async fn write_chunk(app: &Arc<App>, ctx: &RequestContext, id: &str, body: &mut Body) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    let lock = app.images.session_lock(id);
    let _guard = lock_session(&lock, id).await?;
    let mut meta = app.images.load_session(id)?;
    let (first, last, total) = content_range(ctx.header("content-range"))?;
    if total != meta.size {
        return Err(ApiError::bad_request(format!(
            "Content-Range says the package is {total} bytes; the session was started for {}",
            meta.size
        )));
    }
    if first != meta.offset {
        return Err(ApiError::conflict(format!(
            "upload session '{id}' continues at offset {} (Content-Range starts at {first}); GET the session for its offset",
            meta.offset
        )));
    }
    let expected = last - first + 1;
    let (_, part) = app.images.session_paths(id);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&part)
        .map_err(|e| ApiError::internal(format!("cannot open the session's file: {e}")))?;
    // Whatever an interrupted chunk left past the acknowledged offset goes.
    file.set_len(meta.offset)
        .and_then(|()| file.seek(SeekFrom::Start(meta.offset)).map(drop))
        .map_err(|e| write_error(&e))?;
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("the chunk was cut off: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        received += data.len() as u64;
        if received > expected {
            return Err(ApiError::bad_request(format!(
                "the chunk is longer than Content-Range says ({expected} bytes)"
            )));
        }
        UPLOAD_BYTES.add(&["resumable"], data.len() as u64);
        file = tokio::task::spawn_blocking(move || file.write_all(&data).map(|()| file))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| write_error(&e))?;
    }
    if received != expected {
        return Err(ApiError::bad_request(format!("the chunk has {received} bytes; Content-Range says {expected}")));
    }
    meta.offset += received;
    let saved = meta.clone();
    let images = app.clone();
    tokio::task::spawn_blocking(move || file.sync_data().and_then(|()| images.images.save_session(&saved)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| write_error(&e))?;
    show_progress(app, &meta).await?;
    Ok(json_response(StatusCode::OK, &meta.view(&ctx.base_url)))
}

/// Once the manifest has arrived, the upload shows as an image in progress under its tag. A
/// package whose head is already bad (unsigned, not a package) ends the session now.
async fn show_progress(app: &Arc<App>, meta: &SessionMeta) -> Result<(), ApiError> {
    let (_, part) = app.images.session_paths(&meta.id);
    let keys = app.images.trusted().clone();
    let head = tokio::task::spawn_blocking(move || -> Result<fulcrum_package::Manifest, PackageError> {
        let mut file = BufReader::new(std::fs::File::open(&part)?);
        let head = fulcrum_package::read_head(&mut file)?;
        let signature = head.signature.ok_or_else(|| {
            PackageError::Signature(format!(
                "the package is not signed ({} must follow {})",
                fulcrum_package::SIGNATURE_PATH,
                fulcrum_package::MANIFEST_PATH
            ))
        })?;
        keys.verify(&head.manifest_bytes, &signature)?;
        head.manifest.check()?;
        Ok(head.manifest)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let manifest = match head {
        Ok(m) => m,
        // The head has not arrived completely yet (a chunk may end inside a tar header).
        Err(PackageError::Truncated(_) | PackageError::NotAPackage(_)) if meta.offset < meta.size => return Ok(()),
        Err(e) => {
            app.images.remove_session(&meta.id);
            return Err(package_error(e));
        }
    };
    let mut staged = Staged::new(app.clone());
    let progress = meta.offset.saturating_mul(100) / meta.size.max(1);
    let result = staged
        .show_progress(&meta.image_uuid, &manifest, meta.size, progress.min(99), meta.started(), IfGone::Create)
        .await;
    staged.keep_record();
    if let Err(e) = result {
        app.images.remove_session(&meta.id);
        return Err(e);
    }
    Ok(())
}

pub async fn complete_session(
    app: &Arc<App>,
    ctx: &RequestContext,
    id: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    let lock = app.images.session_lock(id);
    let _guard = lock_session(&lock, id).await?;
    let meta = app.images.load_session(id)?;
    let input = crate::objects::parse_body(body)?;
    let digest = input
        .get("sha256")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .filter(|d| is_sha256_hex(d))
        .ok_or_else(|| ApiError::bad_request("field 'sha256': the package's sha256 (64 hex digits) is required"))?;
    if meta.offset != meta.size {
        return Err(ApiError::conflict(format!(
            "upload session '{id}' has {} of {} bytes; send the rest first",
            meta.offset, meta.size
        )));
    }
    let (_, part) = app.images.session_paths(id);
    let keys = app.images.trusted().clone();
    let source = part.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let verified = fulcrum_package::verify(
            &mut BufReader::with_capacity(1 << 20, std::fs::File::open(&source)?),
            &keys,
            &mut |_| {},
        );
        // Bytes that are not the package the client sent: say so, rather than what is wrong
        // with them (hashing a refused package once more costs nothing that matters).
        let hash = match &verified {
            Ok(v) => v.sha256.clone(),
            Err(_) => fulcrum_package::sha256_of_file(&source)?.0,
        };
        Ok::<_, PackageError>((verified, hash))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut staged = Staged::new(app.clone());
    staged.record = Some(meta.image_uuid.clone());
    let outcome = match checked {
        Err(e) => Err(package_error(e)),
        Ok((_, hash)) if hash != digest => Err(ApiError::bad_request(format!(
            "hash mismatch: the uploaded bytes have sha256 {hash}, the client says {digest}"
        ))),
        Ok((Err(e), _)) => Err(package_error(e)),
        Ok((Ok(verified), _)) => staged.publish(&meta.image_uuid, &verified, &part, meta.started()).await,
    };
    // Published or refused, the session is over; a refused one leaves nothing behind.
    app.images.remove_session(id);
    let stored = outcome?;
    let cat = app.store.read();
    Ok(crate::objects::render_created(ctx, &cat, super::type_def(), &stored))
}

pub async fn abort_session(app: &Arc<App>, ctx: &RequestContext, id: &str) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "An image upload")?;
    end_session(app, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Ends a session: its bytes go, and the record that showed it is gone before the answer.
async fn end_session(app: &Arc<App>, id: &str) -> Result<(), ApiError> {
    let lock = app.images.session_lock(id);
    let _guard = lock.lock().await;
    let meta = app.images.load_session(id)?;
    app.images.remove_session(id);
    super::remove_unfinished_record(app, meta.image_uuid).await
}

/// `DELETE /api/image/<uuid>` of an image still IN_PROGRESS through a resumable session (a
/// client that was interrupted and will not come back): ends that session. False when no
/// session shows this image (a streamed upload in flight, which ends with its connection).
pub async fn abort_session_of_image(app: &Arc<App>, image_uuid: &str) -> Result<bool, ApiError> {
    let Ok(entries) = std::fs::read_dir(app.images.session_dir()) else { return Ok(false) };
    let owner = entries.flatten().find_map(|entry| {
        let path = entry.path();
        let meta: SessionMeta = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        (path.extension().is_some_and(|x| x == "json") && meta.image_uuid == image_uuid).then_some(meta.id)
    });
    match owner {
        Some(id) => end_session(app, &id).await.map(|()| true),
        None => Ok(false),
    }
}
