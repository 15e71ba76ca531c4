//! Every controller node keeps its own copy of every image's package file: uploads land on the
//! leader, and each other node fetches the file from a node that holds a verified copy (the
//! leader first), resuming with `Range`, verifies it as an upload is verified (signature, every
//! file, the sha256 the record names), and publishes it atomically. Each node reports the state
//! of its copies in its cluster member entry; the leader folds the reports into the image
//! records (`node_states`), which is what `/api/image`, `show image` and the image-state
//! precheck read.
//!
//! Invariants:
//! - A node answers a copy request, serves an agent's download and reports COMPLETED only for a
//!   file it verified, unchanged since (size and modification time): a copy changed on disk is
//!   verified again before anything more is served from it, and replaced when it fails.
//! - A fetch writes under `replica/` and renames into place only after verification, so a
//!   crash leaves a partial file (resumed at the next start), never a bad published one.
//! - A file whose record is gone (the image was deleted) is removed.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{KIND, record, sync_dir};
use crate::app::App;
use crate::error::ApiError;

/// Where other nodes fetch a copy from (with the cluster's secret).
pub const COPY_PATH: &str = "/cluster-internal/image/{uuid}";
pub const REPLICA_DIR: &str = "replica";
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// A copy that failed (no source, a bad download) is tried again after this long, doubled
/// with each failure in a row up to 16 times as long (a node that cannot verify a package
/// should not fetch it again every few seconds).
const RETRY_AFTER: Duration = Duration::from_secs(3);
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Reconnections to one source within one fetch before the next source is tried.
const RESUMES_PER_SOURCE: usize = 3;

/// What a node says of its copy of one image's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    /// `IMAGE_FSM_IN_PROGRESS` (fetching or verifying), `IMAGE_FSM_COMPLETED`, `IMAGE_FSM_FAILED`.
    pub state: String,
    pub progress: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last failure, kept after a retry succeeded (a bad copy that was replaced says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Seconds since the epoch when `state` last changed.
    pub changed: u64,
}

pub const FAILED: &str = "IMAGE_FSM_FAILED";
const NOT_STARTED: &str = "IMAGE_FSM_STARTED";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// This node's copies: what it reports and what it verified.
#[derive(Default)]
pub struct Copies {
    inner: std::sync::Mutex<BTreeMap<String, Copy>>,
    /// Woken when a report changes (the member entry is published again).
    pub changed: tokio::sync::Notify,
    /// Where the verified files' stamps are kept across restarts (a restart, such as an
    /// upgrade's, then does not hash every package again). Losing it costs a verification.
    stamps: Option<PathBuf>,
}

/// A verified file as it was: length, and modification time (seconds, nanoseconds).
type SavedStamp = (u64, u64, u32);

fn to_saved((len, mtime): (u64, SystemTime)) -> SavedStamp {
    let d = mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
    (len, d.as_secs(), d.subsec_nanos())
}

fn from_saved((len, secs, nanos): SavedStamp) -> (u64, SystemTime) {
    (len, UNIX_EPOCH + Duration::new(secs, nanos))
}

#[derive(Debug, Clone)]
struct Copy {
    report: CopyReport,
    /// Size and modification time of the file when it was verified.
    verified: Option<(u64, SystemTime)>,
    retry_at: Option<Instant>,
    failures: u32,
    /// Whether a scan saw the image's record: only then does the record's absence mean the
    /// image was deleted (an upload marks its file verified just before its record lands).
    listed: bool,
}

impl Copy {
    fn new() -> Copy {
        Copy {
            report: CopyReport {
                state: NOT_STARTED.into(),
                progress: 0,
                reason: Some("not copied to this node yet".into()),
                last_failure: None,
                changed: unix_now(),
            },
            verified: None,
            retry_at: None,
            failures: 0,
            listed: false,
        }
    }
}

fn stamp(path: &Path) -> io::Result<(u64, SystemTime)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified()?))
}

impl Copies {
    /// The copies in `dir` verified before this start and unchanged since, as their stamps
    /// say (kept in the replica directory from now on): they are COMPLETED at once.
    pub fn load(dir: &Path) -> Copies {
        let stamps = dir.join(REPLICA_DIR).join("verified.json");
        let saved: BTreeMap<String, SavedStamp> =
            std::fs::read(&stamps).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let copies = saved
            .into_iter()
            .filter(|(uuid, saved)| stamp(&dir.join(format!("{uuid}.pkg"))).ok() == Some(from_saved(*saved)))
            .map(|(uuid, saved)| {
                let mut copy = Copy::new();
                copy.verified = Some(from_saved(saved));
                copy.report.state = record::COMPLETED.into();
                (copy.report.progress, copy.report.reason) = (100, None);
                (uuid, copy)
            })
            .collect();
        Copies { inner: std::sync::Mutex::new(copies), changed: Default::default(), stamps: Some(stamps) }
    }

    fn save_stamps(&self) {
        let Some(path) = &self.stamps else { return };
        let saved: BTreeMap<String, SavedStamp> =
            self.lock().iter().filter_map(|(k, c)| Some((k.clone(), to_saved(c.verified?)))).collect();
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot keep the verified copies' stamps");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Copy>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this node reports, by image uuid (the uuid of the record that owns the file).
    pub fn reports(&self) -> BTreeMap<String, CopyReport> {
        self.lock().iter().map(|(k, c)| (k.clone(), c.report.clone())).collect()
    }

    fn set(&self, uuid: &str, state: &str, progress: u64, reason: Option<String>) {
        let mut copies = self.lock();
        let copy = copies.entry(uuid.to_string()).or_insert_with(Copy::new);
        let report = &mut copy.report;
        if report.state != state {
            report.changed = unix_now();
        }
        if state == FAILED {
            report.last_failure.clone_from(&reason);
            copy.retry_at = Some(Instant::now() + RETRY_AFTER * (1 << copy.failures.min(4)));
            copy.failures += 1;
        }
        let changed = report.state != state || report.progress != progress || report.reason != reason;
        (report.state, report.progress, report.reason) = (state.to_string(), progress, reason);
        drop(copies);
        if changed {
            self.changed.notify_one();
        }
    }

    /// Records that the file at `path` is a verified copy of image `uuid` (as it is now).
    pub fn verified(&self, uuid: &str, path: &Path) {
        let stamp = stamp(path).ok();
        self.set(uuid, record::COMPLETED, 100, None);
        if let Some(copy) = self.lock().get_mut(uuid) {
            copy.verified = stamp;
            copy.retry_at = None;
            copy.failures = 0;
        }
        self.save_stamps();
    }

    /// Reports COMPLETED for a copy verified before this start and unchanged since.
    fn confirm(&self, uuid: &str) {
        let state = self.lock().get(uuid).map(|c| c.report.state.clone());
        if state.as_deref() != Some(record::COMPLETED) {
            self.set(uuid, record::COMPLETED, 100, None);
        }
    }

    /// Whether the file at `path` is the verified copy of `uuid`, unchanged since.
    pub fn is_verified(&self, uuid: &str, path: &Path) -> bool {
        let known = self.lock().get(uuid).and_then(|c| c.verified);
        known.is_some() && stamp(path).ok() == known
    }

    fn forget(&self, uuid: &str) {
        if self.lock().remove(uuid).is_some() {
            self.changed.notify_one();
            self.save_stamps();
        }
    }

    fn set_listed(&self, uuid: &str) {
        self.lock().entry(uuid.to_string()).or_insert_with(Copy::new).listed = true;
    }

    /// Images this node knows whose record a scan saw.
    fn listed(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, c)| c.listed).map(|(k, _)| k.clone()).collect()
    }

    fn waiting(&self, uuid: &str) -> bool {
        self.lock().get(uuid).and_then(|c| c.retry_at).is_some_and(|at| Instant::now() < at)
    }
}

/// An image whose file every node should hold.
#[derive(Debug, Clone)]
struct Wanted {
    uuid: String,
    file: String,
    sha256: String,
    size: u64,
}

/// The records that own a file (a bundle's parts point into their bundle's file).
fn wanted(cat: &fulcrum_store::Catalogue) -> Vec<Wanted> {
    cat.iter(KIND)
        .filter(|s| record::is_completed(&s.value))
        .filter_map(|s| {
            let file = record::file_name(&s.value)?;
            (file == format!("{}.pkg", s.uuid)).then(|| Wanted {
                uuid: s.uuid.clone(),
                file: file.to_string(),
                sha256: record::file_sha256(&s.value).unwrap_or_default().to_string(),
                size: s.value.get("_length").and_then(Value::as_u64).unwrap_or(0),
            })
        })
        .collect()
}

/// The uuid of the record owning the file an image record points into.
pub fn owner_of(value: &Value) -> Option<&str> {
    record::file_name(value)?.strip_suffix(".pkg")
}

/// Removes published files no record owns (what a deletion while this node was down left).
/// Run before serving, so no upload can be publishing meanwhile.
pub fn remove_orphans(images: &super::Images, cat: &fulcrum_store::Catalogue) {
    let kept: HashSet<String> = wanted(cat).into_iter().map(|w| w.file).collect();
    let Ok(entries) = std::fs::read_dir(&images.dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pkg") && !kept.contains(&name) {
            tracing::info!(file = %name, "removing the copy of a deleted image");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The node-local loop (on every node, leader or not): verify, fetch, remove.
pub async fn run(app: Arc<App>) {
    loop {
        pass(&app).await;
        tokio::time::sleep(SCAN_EVERY).await;
    }
}

async fn pass(app: &Arc<App>) {
    let wanted = wanted(&app.store.read());
    let copies = &app.images.copies;
    let wanted_uuids: HashSet<&str> = wanted.iter().map(|w| w.uuid.as_str()).collect();
    for gone in copies.listed().into_iter().filter(|u| !wanted_uuids.contains(u.as_str())) {
        let _ = std::fs::remove_file(app.images.file_path(&format!("{gone}.pkg")));
        let _ = std::fs::remove_file(partial_path(app, &gone));
        copies.forget(&gone);
    }
    if let Ok(entries) = std::fs::read_dir(app.images.dir.join(REPLICA_DIR)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".part") && !name.strip_suffix(".part").is_some_and(|u| wanted_uuids.contains(u)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    for w in wanted {
        let path = app.images.file_path(&w.file);
        copies.set_listed(&w.uuid);
        if copies.is_verified(&w.uuid, &path) {
            copies.confirm(&w.uuid);
            continue;
        }
        if copies.waiting(&w.uuid) {
            continue;
        }
        if path.exists() {
            copies.set(&w.uuid, record::IN_PROGRESS, 0, Some("verifying this node's copy".into()));
            match verify_file(app, &path, &w).await {
                Ok(()) => copies.verified(&w.uuid, &path),
                Err(why) => {
                    tracing::warn!(image = %w.uuid, reason = %why, "this node's copy of an image fails verification");
                    let _ = std::fs::remove_file(&path);
                    copies.set(&w.uuid, FAILED, 0, Some(format!("this node's copy fails verification: {why}")));
                }
            }
            continue;
        }
        let started = Instant::now();
        match fetch(app, &w).await {
            Ok(source) => {
                copies.verified(&w.uuid, &path);
                tracing::info!(image = %w.uuid, bytes = w.size, from = %source, seconds = started.elapsed().as_secs_f64(), "image copied to this node");
            }
            Err(why) => {
                tracing::warn!(image = %w.uuid, reason = %why, "cannot copy an image to this node yet");
                copies.set(&w.uuid, FAILED, 0, Some(why));
            }
        }
    }
}

fn partial_path(app: &App, uuid: &str) -> PathBuf {
    app.images.dir.join(REPLICA_DIR).join(format!("{uuid}.part"))
}

/// The package check an upload passes (signature, every file) and the record's sha256 and size.
async fn verify_file(app: &App, path: &Path, w: &Wanted) -> Result<(), String> {
    let (path, keys, w) = (path.to_path_buf(), app.images.trusted().clone(), w.clone());
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut reader = io::BufReader::with_capacity(1 << 20, file);
        let verified = fulcrum_package::verify(&mut reader, &keys, &mut |_| {}).map_err(|e| e.to_string())?;
        if verified.size != w.size {
            return Err(format!("it has {} bytes, the image has {}", verified.size, w.size));
        }
        if !w.sha256.is_empty() && verified.sha256 != w.sha256 {
            return Err(format!("sha256 {} where the image's is {}", verified.sha256, w.sha256));
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A node to fetch from: its name, address and certificate pin.
struct Source {
    name: String,
    advertise: String,
    pin: Option<String>,
}

/// The nodes that report a verified copy of `uuid`, the leader first (it took the upload, so
/// it is tried even before its report arrives).
async fn sources(app: &App, uuid: &str) -> Vec<Source> {
    let Some(membership) = &app.cluster else { return Vec::new() };
    let me = membership.me().node;
    let leader = membership.leader().map(|l| l.node);
    let nodes = membership.nodes().await.unwrap_or_default();
    let mut out: Vec<(bool, Source)> = nodes
        .into_iter()
        .filter(|n| n.name != me && n.up)
        .filter(|n| {
            Some(&n.name) == leader.as_ref()
                || n.host.pointer(&format!("/images/{uuid}/state")).and_then(Value::as_str) == Some(record::COMPLETED)
        })
        .map(|n| (Some(&n.name) != leader.as_ref(), Source { name: n.name, advertise: n.advertise, pin: n.pin }))
        .collect();
    out.sort_by_key(|(not_leader, _)| *not_leader);
    out.into_iter().map(|(_, s)| s).collect()
}

/// Fetches, verifies and publishes this node's copy; answers the node it came from.
async fn fetch(app: &Arc<App>, w: &Wanted) -> Result<String, String> {
    let partial = partial_path(app, &w.uuid);
    let sources = sources(app, &w.uuid).await;
    if sources.is_empty() {
        return Err("no other controller holds a verified copy to fetch".into());
    }
    let secret = crate::cluster::secret(app).ok_or("the cluster's secret is not known yet")?;
    let mut last_error = String::new();
    for source in &sources {
        for _ in 0..RESUMES_PER_SOURCE {
            match download(app, w, source, &secret, &partial).await {
                Ok(()) => {
                    app.images.copies.set(&w.uuid, record::IN_PROGRESS, 100, Some("verifying the fetched copy".into()));
                    if let Err(why) = verify_file(app, &partial, w).await {
                        let _ = std::fs::remove_file(&partial);
                        return Err(format!("the copy fetched from {} fails verification: {why}", source.name));
                    }
                    let target = app.images.file_path(&w.file);
                    let dir = app.images.dir.clone();
                    std::fs::rename(&partial, &target)
                        .and_then(|()| sync_dir(&dir))
                        .map_err(|e| format!("cannot publish the copy: {e}"))?;
                    return Ok(source.name.clone());
                }
                Err(Failure::Resumable(e)) => last_error = format!("{}: {e}", source.name),
                Err(Failure::NextSource(e)) => {
                    last_error = format!("{}: {e}", source.name);
                    break;
                }
                Err(Failure::Fatal(e)) => return Err(e),
            }
        }
    }
    Err(format!("cannot fetch the package: {last_error}"))
}

enum Failure {
    /// The connection broke: the next request resumes where the file ends.
    Resumable(String),
    /// This source cannot serve it.
    NextSource(String),
    /// Nothing another source would change (the disk).
    Fatal(String),
}

/// Downloads the rest of the file into `partial` (appending from where it ends), fsynced.
async fn download(app: &App, w: &Wanted, source: &Source, secret: &str, partial: &Path) -> Result<(), Failure> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let have = if have > w.size {
        let _ = std::fs::remove_file(partial);
        0
    } else {
        have
    };
    let _reservation = app.images.reserve(w.size - have).map_err(|e| Failure::Fatal(e.message))?;
    if have == w.size {
        return Ok(()); // fetched before a restart, not yet verified
    }
    let (mut sender, authority) =
        crate::forward::connect(&source.advertise, source.pin.as_deref()).await.map_err(Failure::Resumable)?;
    let path = COPY_PATH.replace("{uuid}", &w.uuid);
    let request = Request::get(path)
        .header(header::HOST, authority)
        .header(crate::cluster::SECRET_HEADER, secret)
        .header(header::RANGE, format!("bytes={have}-"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| Failure::Fatal(e.to_string()))?;
    let answer = sender.send_request(request).await.map_err(|e| Failure::Resumable(e.to_string()))?;
    let status = answer.status();
    if status != StatusCode::PARTIAL_CONTENT {
        return Err(Failure::NextSource(format!("it answered {status}")));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .map_err(|e| Failure::Fatal(format!("{}: {e}", partial.display())))?;
    let mut body = answer.into_body();
    let mut written = have;
    let mut last_progress = Instant::now();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Resumable(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        file.write_all(&data).map_err(|e| Failure::Fatal(super::upload::write_error(&e).message))?;
        written += data.len() as u64;
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            let progress = (written.saturating_mul(100) / w.size.max(1)).min(99);
            app.images.copies.set(
                &w.uuid,
                record::IN_PROGRESS,
                progress,
                Some(format!("fetching from {}", source.name)),
            );
        }
    }
    file.sync_data().map_err(|e| Failure::Fatal(e.to_string()))?;
    if written < w.size {
        return Err(Failure::Resumable(format!("the download ended after {written} of {} bytes", w.size)));
    }
    Ok(())
}

/// `GET /cluster-internal/image/<uuid>` (with the cluster's secret): this node's verified copy.
pub async fn serve_copy(State(app): State<Arc<App>>, UrlPath(uuid): UrlPath<String>, headers: HeaderMap) -> Response {
    let result = (|| {
        if app.cluster.is_none() || !crate::cluster::from_peer(&app, &headers) {
            return Err(ApiError::not_found("no such path"));
        }
        let (file, length) = {
            let cat = app.store.read();
            let w = wanted(&cat).into_iter().find(|w| w.uuid == uuid);
            let w = w.ok_or_else(|| ApiError::not_found(format!("image '{uuid}' not found")))?;
            (app.images.file_path(&w.file), w.size)
        };
        if !app.images.copies.is_verified(&uuid, &file) {
            return Err(ApiError::not_found(format!("this node holds no verified copy of image '{uuid}'")));
        }
        super::serve_slice(&file, 0, length, &headers)
    })();
    result.unwrap_or_else(IntoResponse::into_response)
}

/// What the image records should say of every node's copy: one entry per cluster node, from
/// its report (this node's own, fresh), for the file `owner`.
pub fn node_states(view: &crate::system::ClusterView, mine: &BTreeMap<String, CopyReport>, owner: &str) -> Value {
    let entries: Vec<Value> = view
        .nodes
        .iter()
        .map(|n| {
            let report = if n.name == view.me {
                mine.get(owner).cloned()
            } else {
                n.host.get("images").and_then(|i| i.get(owner)).and_then(|r| serde_json::from_value(r.clone()).ok())
            };
            // No time for a node that never reported: the entry stays the same until it does.
            let report = report.unwrap_or_else(|| CopyReport { changed: 0, ..Copy::new().report });
            let mut entry = json!({
                "node": n.name,
                "up": n.up,
                "state": report.state,
                "progress": report.progress,
                "last_changed_time": {"secs": report.changed, "usecs": 0},
            });
            if let Some(reason) = report.reason {
                entry["reason"] = json!(reason);
            }
            if let Some(failure) = report.last_failure {
                entry["last_failure"] = json!(failure);
            }
            entry
        })
        .collect();
    Value::Array(entries)
}

/// Leader-only: keeps every image record's `node_states` equal to what the nodes report.
pub async fn run_node_states(app: Arc<App>) {
    loop {
        let view = crate::system::cluster_view(&app).await;
        let mine = app.images.copies.reports();
        let changes: Vec<(String, Value)> = {
            let cat = app.store.read();
            cat.iter(KIND)
                .filter(|s| record::is_completed(&s.value))
                .filter_map(|s| {
                    let wanted = node_states(&view, &mine, owner_of(&s.value)?);
                    (s.value.get("node_states") != Some(&wanted)).then(|| (s.uuid.clone(), wanted))
                })
                .collect()
        };
        if !changes.is_empty() {
            let result = app
                .store
                .write(move |txn| {
                    for (uuid, states) in changes {
                        // Written as the system: the field is reported state, not configuration.
                        if let Some(stored) = txn.get(KIND, &uuid) {
                            let mut value = stored.value.clone();
                            value["node_states"] = states;
                            value["_last_modified"] = json!(txn.timestamp_micros().to_string());
                            txn.put(KIND, &uuid, value);
                        }
                    }
                    Ok::<_, ApiError>(())
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %ApiError::from(e).message, "cannot record the nodes' image copies yet");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_changed_on_disk_is_verified_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image-1.pkg");
        std::fs::write(&path, b"package bytes").unwrap();
        let copies = Copies::default();
        assert!(!copies.is_verified("image-1", &path));
        copies.verified("image-1", &path);
        assert!(copies.is_verified("image-1", &path));
        assert_eq!(copies.reports()["image-1"].state, record::COMPLETED);
        // Same length, another byte, a later modification time.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, b"package bytez").unwrap();
        assert!(!copies.is_verified("image-1", &path));
        std::fs::remove_file(&path).unwrap();
        assert!(!copies.is_verified("image-1", &path));
    }

    #[test]
    fn verified_copies_stay_verified_across_a_restart_unless_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(REPLICA_DIR)).unwrap();
        let (one, two) = (dir.path().join("image-1.pkg"), dir.path().join("image-2.pkg"));
        std::fs::write(&one, b"one").unwrap();
        std::fs::write(&two, b"two").unwrap();
        let copies = Copies::load(dir.path());
        copies.verified("image-1", &one);
        copies.verified("image-2", &two);
        drop(copies);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&two, b"tw0").unwrap();
        let again = Copies::load(dir.path());
        assert!(again.is_verified("image-1", &one));
        assert_eq!(again.reports()["image-1"].state, record::COMPLETED);
        assert!(!again.is_verified("image-2", &two), "changed while the node was down");
        assert!(!again.reports().contains_key("image-2"));
    }

    #[test]
    fn failures_back_off_and_a_later_success_keeps_the_last_one() {
        let copies = Copies::default();
        copies.set("image-1", FAILED, 0, Some("sha256 mismatch".into()));
        assert!(copies.waiting("image-1"));
        let first = copies.lock()["image-1"].retry_at.unwrap();
        copies.set("image-1", FAILED, 0, Some("sha256 mismatch".into()));
        let second = copies.lock()["image-1"].retry_at.unwrap();
        assert!(second > first + RETRY_AFTER / 2, "the second wait is longer");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image-1.pkg");
        std::fs::write(&path, b"good").unwrap();
        copies.verified("image-1", &path);
        let report = &copies.reports()["image-1"];
        assert_eq!((report.state.as_str(), report.reason.as_deref()), (record::COMPLETED, None));
        assert_eq!(report.last_failure.as_deref(), Some("sha256 mismatch"));
        assert!(!copies.waiting("image-1"));
        assert_eq!(copies.lock()["image-1"].failures, 0);
    }

    #[test]
    fn every_node_is_listed_with_its_report_or_as_not_started() {
        let node = |name: &str, up: bool, images: Value| fulcrum_store::election::NodeState {
            name: name.into(),
            advertise: format!("http://{name}"),
            pin: None,
            host: json!({ "images": images }),
            up,
            up_since: None,
            incarnation: None,
        };
        let view = crate::system::ClusterView {
            nodes: vec![
                node("a", true, json!({})),
                node("b", true, json!({"image-1": {"state": FAILED, "progress": 0, "reason": "bad", "changed": 7}})),
                node("c", false, json!({})),
            ],
            leader: Some("a".into()),
            me: "a".into(),
        };
        let mut mine = BTreeMap::new();
        mine.insert(
            "image-1".to_string(),
            CopyReport { state: record::COMPLETED.into(), progress: 100, reason: None, last_failure: None, changed: 5 },
        );
        let states = node_states(&view, &mine, "image-1");
        let states = states.as_array().unwrap();
        assert_eq!(states.len(), 3);
        assert_eq!((states[0]["node"].as_str(), states[0]["state"].as_str()), (Some("a"), Some(record::COMPLETED)));
        assert_eq!(states[1]["reason"], "bad");
        assert_eq!(states[1]["last_changed_time"]["secs"], 7);
        assert_eq!((states[2]["state"].as_str(), states[2]["up"].as_bool()), (Some(NOT_STARTED), Some(false)));
    }
}
