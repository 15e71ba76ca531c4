//! The image service: packages uploaded to the controller, kept as files under DATA/images,
//! each described by an `image` record.
//!
//! Invariants:
//! - A package file is written under `tmp/` (or `sessions/`), fsynced, verified, renamed to
//!   `<uuid>.pkg` (and the directory fsynced), and only then does its record say
//!   IMAGE_FSM_COMPLETED. A record in any other state belongs to an upload in flight.
//! - At start, `tmp/`, records not COMPLETED and `.pkg` files without a record are removed: what
//!   a crash interrupted never becomes visible. Resumable sessions survive (their acknowledged
//!   chunks are durable) until they expire.
//! - Only the leader writes (see [`crate::cluster::require_leader`]).

mod direct;
pub mod record;
pub mod replica;
mod serve;
mod session;
mod upload;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_metrics::{Counter, Gauge};
use fulcrum_package::{PublicKey, TrustedKeys};
use fulcrum_schema::{Registry, TypeDef, object_path};
use fulcrum_store::Store;
use serde_json::Value;

pub use serve::serve_slice;
pub use session::{abort_session, complete_session, create_session, put_chunk, session_status};
pub use upload::upload;

use crate::access::{ADMIN_TENANT, Level};
use crate::app::{App, RequestContext};
use crate::cluster::require_leader;
use crate::error::ApiError;

pub const KIND: &str = "image";
const TMP_DIR: &str = "tmp";
const SESSIONS_DIR: &str = "sessions";
/// A resumable session nobody has written to for this long is removed.
const SESSION_EXPIRY: Duration = Duration::from_secs(24 * 3600);

pub static UPLOAD_BYTES: Counter =
    Counter::new("fulcrum_image_upload_bytes_total", "Bytes of package uploads received.", &["how"]);
pub static UPLOADS: Counter = Counter::new("fulcrum_image_uploads_total", "Package uploads by outcome.", &["outcome"]);
pub static UPLOADS_IN_FLIGHT: Gauge = Gauge::new("fulcrum_image_uploads_in_flight", "Package uploads running now.");

pub fn type_def() -> &'static TypeDef {
    Registry::get().type_def(KIND).expect("the image type is defined")
}

/// Where images live and whom their signatures must come from.
pub struct Images {
    dir: PathBuf,
    trusted: TrustedKeys,
    /// Bytes promised to uploads in flight, so two uploads cannot both count the same free space.
    reserved: Arc<AtomicU64>,
    /// One writer at a time per resumable session.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This node's copies of the package files and what it reports of them.
    pub copies: replica::Copies,
}

/// Free space promised to one upload; given back when it ends.
pub struct Reservation {
    bytes: u64,
    reserved: Arc<AtomicU64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Bytes free for unprivileged writes on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: c_path is a valid NUL-terminated string and stat points to writable memory of
    // the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Images {
    /// Opens DATA/images with the trusted keys from `key_files` and DATA/trusted-keys/*.pub.
    pub fn open(data_dir: &Path, key_files: &[PathBuf]) -> Result<Images, String> {
        let dir = std::path::absolute(data_dir.join("images")).map_err(|e| e.to_string())?;
        for sub in [TMP_DIR, SESSIONS_DIR, replica::REPLICA_DIR] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.join(sub).display()))?;
        }
        let mut files: Vec<PathBuf> = key_files.to_vec();
        let key_dir = data_dir.join("trusted-keys");
        if let Ok(entries) = std::fs::read_dir(&key_dir) {
            let mut found: Vec<PathBuf> =
                entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "pub")).collect();
            found.sort();
            files.extend(found);
        }
        let keys = files
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).map_err(|e| format!("trusted key {}: {e}", p.display()))?;
                PublicKey::parse(&text).map_err(|e| format!("trusted key {}: {e}", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            tracing::warn!(
                dir = %key_dir.display(),
                "no trusted package signing keys: image uploads will be refused until one is configured"
            );
        }
        let copies = replica::Copies::load(&dir);
        Ok(Images {
            dir,
            trusted: TrustedKeys::new(keys),
            reserved: Arc::new(AtomicU64::new(0)),
            session_locks: Mutex::default(),
            copies,
        })
    }

    /// Whether this node holds a verified copy of the file image `uuid` lies in.
    pub fn has_verified_copy(&self, cat: &fulcrum_store::Catalogue, uuid: &str) -> bool {
        let Some(image) = cat.get(KIND, uuid) else { return false };
        let (Some(owner), Some(file)) = (replica::owner_of(&image.value), record::file_name(&image.value)) else {
            return false;
        };
        self.copies.is_verified(owner, &self.file_path(file))
    }

    pub fn trusted(&self) -> &TrustedKeys {
        &self.trusted
    }

    fn tmp_path(&self, id: &str) -> PathBuf {
        self.dir.join(TMP_DIR).join(format!("{id}.part"))
    }

    /// The published file of an image.
    pub fn file_path(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// Promises `bytes` of free space to an upload, or refuses with 507.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, ApiError> {
        let available = available_bytes(&self.dir)
            .map_err(|e| ApiError::internal(format!("cannot stat the image directory: {e}")))?;
        let before = self.reserved.fetch_add(bytes, Ordering::SeqCst);
        let reservation = Reservation { bytes, reserved: self.reserved.clone() };
        if before.saturating_add(bytes) > available {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "not enough free disk for the package: it needs {bytes} bytes, {} are free{}",
                    available.saturating_sub(before),
                    if before > 0 { " after the uploads in progress" } else { "" }
                ),
            ));
        }
        Ok(reservation)
    }

    /// Removes what a crash interrupted (see the module invariants). Run before serving.
    pub async fn recover(&self, store: &Store) -> Result<(), String> {
        let tmp = self.dir.join(TMP_DIR);
        let mut reclaimed = 0u64;
        for entry in std::fs::read_dir(&tmp).map_err(|e| e.to_string())?.flatten() {
            reclaimed += entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
        }
        session::expire(&self.dir.join(SESSIONS_DIR), SESSION_EXPIRY, SystemTime::now());
        let unfinished: Vec<String> =
            store.read().iter(KIND).filter(|s| !record::is_completed(&s.value)).map(|s| s.uuid.clone()).collect();
        if !unfinished.is_empty() {
            let gone = unfinished.clone();
            store
                .write(move |txn| {
                    for uuid in &gone {
                        txn.delete(KIND, uuid);
                    }
                    Ok::<_, ApiError>(())
                })
                .await
                .map_err(|e| ApiError::from(e).message)?;
        }
        let kept: Vec<String> =
            store.read().iter(KIND).filter_map(|s| record::file_name(&s.value).map(String::from)).collect();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| e.to_string())?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pkg") && !kept.contains(&name) {
                reclaimed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
            }
        }
        if reclaimed > 0 || !unfinished.is_empty() {
            tracing::info!(
                reclaimed_bytes = reclaimed,
                unfinished = unfinished.len(),
                "removed interrupted image uploads"
            );
        }
        Ok(())
    }
}

/// Images belong to the admin tenant; writing them takes write access to `image` there.
fn require_image_write(app: &App, ctx: &RequestContext, what: &str) -> Result<(), ApiError> {
    if ctx.principal.level(ADMIN_TENANT, KIND) < Level::Write {
        return Err(ApiError::forbidden(format!(
            "User '{}' may not write image objects (write access to image in the admin tenant is needed)",
            ctx.principal.username
        )));
    }
    require_leader(&app.role(), what)
}

/// Versions that are running or kept, each with who runs or keeps it: the controller's
/// built-in version, and what every SE runs and keeps in its other slot.
fn versions_in_use(app: &App, cat: &fulcrum_store::Catalogue) -> Vec<(String, record::RunningVersion)> {
    let as_running = |s: crate::upgrade::slots::SlotInfo| record::RunningVersion {
        version: s.version,
        build: s.build,
        patch: s.patch,
    };
    let mut out = vec![("the controller".into(), as_running(app.upgrade.slots.running()))];
    if let Some(previous) = app.upgrade.slots.previous() {
        out.push(("the controller, kept for rollback".into(), as_running(previous)));
    }
    // The other controllers of a cluster, as they last registered (mid-upgrade they may differ).
    let me = crate::upgrade::nodes::this_node(app);
    for node in app.cluster.iter().flat_map(|m| m.known_nodes()).filter(|n| n.name != me) {
        if let Some(v) = node
            .host
            .get("controller_version")
            .and_then(|v| serde_json::from_value::<fulcrum_upgrade::Version>(v.clone()).ok())
        {
            let running = record::RunningVersion { version: v.version, build: v.build, patch: v.patch };
            out.push((format!("controller node {}", node.name), running));
        }
    }
    out.extend(crate::engines::versions_in_use(cat));
    out.extend(app.upgrade.images_in_use(cat));
    out
}

/// `DELETE /api/image/<uuid>`: removes the record(s) and then the file, unless the image is in
/// use; a bundle takes its parts with it.
pub async fn delete(app: &Arc<App>, ctx: &RequestContext, uuid: &str) -> Result<Response, ApiError> {
    require_image_write(app, ctx, "Deleting an image")?;
    let t = type_def();
    crate::objects::find_visible(&app.store.read(), ctx, t, uuid)?;
    let uuid = uuid.to_string();
    let (in_use, installing) = {
        let cat = app.store.read();
        (versions_in_use(app, &cat), crate::engines::installing(&cat, &object_path(type_def(), &uuid)))
    };
    if let Some(se) = installing {
        return Err(ApiError::conflict(format!(
            "Cannot delete image '{uuid}': service engine '{se}' is installing it"
        )));
    }
    let in_progress = app.store.read().get(KIND, &uuid).is_some_and(|i| !record::is_completed(&i.value));
    if in_progress && session::abort_session_of_image(app, &uuid).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let files = app
        .store
        .write(move |txn| {
            let image = txn.get(KIND, &uuid).ok_or_else(|| ApiError::not_found(format!("image '{uuid}' not found")))?;
            let name = image.meta.name.clone().unwrap_or_default();
            if !record::is_completed(&image.value) {
                return Err(ApiError::conflict(format!("Cannot delete image '{name}': its upload is in progress")));
            }
            let path = object_path(t, &uuid);
            // An SE's install status refers to images too; only a bundle holds one.
            if let Some(bundle) = txn
                .referrers(&path)
                .into_iter()
                .filter(|r| *r != path)
                .filter_map(|r| txn.get_path(&r))
                .find(|referrer| referrer.kind == KIND)
            {
                return Err(ApiError::conflict(format!(
                    "Cannot delete image '{name}': it is part of the composite image '{}' ({}); delete that instead",
                    bundle.meta.name.as_deref().unwrap_or_default(),
                    bundle.uuid
                )));
            }
            let parts = record::part_uuids(&image.value);
            let mut doomed = vec![image.clone()];
            doomed.extend(parts.iter().filter_map(|p| txn.get(KIND, p)));
            for victim in &doomed {
                if let Some(reason) = record::in_use_by(&victim.value, &in_use) {
                    let of = if victim.uuid == uuid {
                        String::new()
                    } else {
                        format!(" (its part '{}')", victim.meta.name.as_deref().unwrap_or_default())
                    };
                    return Err(ApiError::conflict(format!(
                        "Cannot delete image '{name}'{of}: it is in use by {reason}"
                    )));
                }
            }
            let files: Vec<String> =
                doomed.iter().filter_map(|s| record::file_name(&s.value).map(String::from)).collect();
            for victim in &doomed {
                txn.delete(KIND, &victim.uuid);
            }
            Ok(files)
        })
        .await?;
    for file in files {
        let path = app.images.file_path(&file);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            // The record is gone; the orphan file is removed at the next start.
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a deleted image's file");
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// PUT and PATCH of an image: its fields describe a verified package and are not edited by hand.
pub fn refuse_edit(method: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "Method '{method}' not allowed: image records describe uploaded packages; upload a new package instead"
        ),
    )
}

/// What [`Staged::show_progress`] does when the record is not there (any more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfGone {
    Create,
    Skip,
}

/// An upload's file and record until they are published; whatever is left when it is dropped
/// (an error, a refused package, a client that went away) is removed.
pub(crate) struct Staged {
    app: Arc<App>,
    file: Option<PathBuf>,
    record: Option<String>,
}

fn normalized(config: serde_json::Map<String, Value>) -> Result<serde_json::Map<String, Value>, ApiError> {
    let reg = Registry::get();
    fulcrum_schema::normalize(reg, reg.schema_of(type_def()), &Value::Object(config))
        .map_err(|e| ApiError::internal(format!("image record: {e}")))
}

impl Staged {
    pub fn new(app: Arc<App>) -> Staged {
        Staged { app, file: None, record: None }
    }

    /// Shows the upload as IMAGE_FSM_IN_PROGRESS under its tag, with its progress; 409 if
    /// another image has the tag. When the record is gone or finished meanwhile, `if_gone`
    /// says whether to (re)create it or leave it be.
    pub async fn show_progress(
        &mut self,
        uuid: &str,
        manifest: &fulcrum_package::Manifest,
        expected: u64,
        progress: u64,
        started: SystemTime,
        if_gone: IfGone,
    ) -> Result<(), ApiError> {
        let path = self.app.images.file_path(&format!("{uuid}.pkg"));
        let mut config = record::image_config(manifest, manifest, None, &path.to_string_lossy(), expected);
        config.extend(record::status_fields(record::IN_PROGRESS, progress, started, None));
        let config = normalized(config)?;
        let (t, id, kind) = (type_def(), uuid.to_string(), manifest.kind);
        self.app
            .store
            .write(move |txn| {
                let gone = txn.get(KIND, &id).is_none_or(|s| record::is_completed(&s.value));
                if gone && if_gone == IfGone::Skip {
                    return Ok(());
                }
                let name = config.get("name").and_then(Value::as_str).unwrap_or_default();
                if let Some(other) = txn.find_by_name(KIND, ADMIN_TENANT, name).filter(|o| o.uuid != id)
                    && let Some(why) = record::other_side_of_patch(&other.value, kind)
                {
                    return Err(ApiError::conflict(format!(
                        "image '{name}' already exists ({}): it is {why}. A controller patch and an SE patch \
                         of one patch level are one image: upload them together as a bundle \
                         (fulcrum pkg build --kind bundle), or delete '{name}' first",
                        other.uuid
                    )));
                }
                crate::objects::store_object(txn, t, &id, config, ADMIN_TENANT, serde_json::Map::new()).map(drop)
            })
            .await?;
        self.record = Some(uuid.to_string());
        Ok(())
    }

    /// Moves the verified, fsynced file to its place and stores the records that describe it.
    pub async fn publish(
        &mut self,
        uuid: &str,
        verified: &fulcrum_package::Verified,
        staged_file: &Path,
        started: SystemTime,
    ) -> Result<Arc<fulcrum_store::Stored>, ApiError> {
        let file_name = format!("{uuid}.pkg");
        let target = self.app.images.file_path(&file_name);
        let (from, to, dir) = (staged_file.to_path_buf(), target.clone(), self.app.images.dir.clone());
        tokio::task::spawn_blocking(move || std::fs::rename(&from, &to).and_then(|()| sync_dir(&dir)))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("cannot publish the package file: {e}")))?;
        self.file = Some(target.clone());
        // Verified as it arrived: this node's copy needs no second look.
        self.app.images.copies.verified(uuid, &target);
        let records =
            record::records_for(verified, uuid, &file_name, &target.to_string_lossy(), started, SystemTime::now());
        let mut prepared = Vec::with_capacity(records.len());
        for r in records {
            prepared.push((r.uuid, normalized(r.config)?, r.hidden));
        }
        let t = type_def();
        let stored = self
            .app
            .store
            .write(move |txn| {
                // Parts first: the bundle's record refers to them.
                let mut last = None;
                for (uuid, config, hidden) in prepared.into_iter().rev() {
                    last = Some(crate::objects::store_object(txn, t, &uuid, config, ADMIN_TENANT, hidden)?);
                }
                Ok(last.expect("a package publishes at least one record"))
            })
            .await?;
        self.file = None;
        self.record = None;
        Ok(stored)
    }

    /// Leaves the record in place when this request ends (a resumable upload continues later).
    pub fn keep_record(&mut self) {
        self.record = None;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let (file, record) = (self.file.take(), self.record.take());
        if file.is_none() && record.is_none() {
            return;
        }
        let app = self.app.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            if let Some(path) = file
                && let Err(e) = std::fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an abandoned upload");
            }
            if let Some(uuid) = record
                && let Err(e) = remove_unfinished_record(&app, uuid).await
            {
                tracing::warn!(error = %e, "cannot remove an abandoned upload's record");
            }
        });
    }
}

/// Removes the record of an upload that will not finish (a published image is left alone).
async fn remove_unfinished_record(app: &App, uuid: String) -> Result<(), ApiError> {
    app.store
        .write(move |txn| {
            if txn.get(KIND, &uuid).is_some_and(|s| !record::is_completed(&s.value)) {
                txn.delete(KIND, &uuid);
            }
            Ok::<_, ApiError>(())
        })
        .await?;
    Ok(())
}

/// 201 with the image record and its Location.
fn created_response(app: &App, ctx: &RequestContext, stored: &fulcrum_store::Stored) -> Response {
    let cat = app.store.read();
    crate::objects::render_created(ctx, &cat, type_def(), stored)
}
