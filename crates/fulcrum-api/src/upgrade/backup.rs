//! Configuration backups: every object of every type, as JSON, kept in DATA/backups (mode
//! 0600, fsynced) and downloadable. The upgrade checks want a recent one; the controller takes
//! one itself before it migrates its configuration.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_schema::Registry;
use fulcrum_store::Catalogue;
use serde_json::{Map, Value, json};

use crate::app::{App, RequestContext, json_response};
use crate::error::ApiError;
use crate::version::rfc3339;

const PREFIX: &str = "config-";
/// The backups' index in the store: every node lists every backup, and the backup check sees
/// the ones a former leader took. The files stay on the disk of the node that wrote them.
pub const INDEX_KIND: &str = "configbackup";

fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("backups")
}

/// The whole configuration: `{"version": ..., "created": ..., "objects": {"pool": [...], ...}}`.
pub fn export(cat: &Catalogue, version: &str) -> Value {
    let mut objects = Map::new();
    for t in Registry::get().types() {
        let all: Vec<Value> = cat.iter(t.path).map(|s| s.value.clone()).collect();
        if !all.is_empty() {
            objects.insert(t.path.to_string(), Value::Array(all));
        }
    }
    json!({"version": version, "created": rfc3339(SystemTime::now()), "objects": objects})
}

/// A backup being written: never listed, removed at start if a crash left it.
const PARTIAL_SUFFIX: &str = ".partial";

/// Writes a backup file whole or not at all: to a temporary name, fsynced, renamed, and the
/// directory fsynced; a failure (a full disk) leaves nothing behind. Returns its name.
pub fn write(data_dir: &Path, cat_export: &Value) -> Result<String, String> {
    let dir = dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let [y, mo, d, h, mi, s] = fulcrum_package::civil_utc(now.as_secs() as i64);
    let name = format!("{PREFIX}{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{:06}.json", now.subsec_micros());
    let bytes = serde_json::to_vec(cat_export).map_err(|e| e.to_string())?;
    let partial = dir.join(format!("{name}{PARTIAL_SUFFIX}"));
    let written = crate::bootstrap::write_private(&partial, &bytes)
        .and_then(|()| fs::rename(&partial, dir.join(&name)))
        .and_then(|()| crate::images::sync_dir(&dir));
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        return Err(format!("cannot write the backup: {e}"));
    }
    Ok(name)
}

/// Removes what a backup interrupted by a crash left (called at start).
pub fn remove_partial(data_dir: &Path) {
    for entry in fs::read_dir(dir(data_dir)).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && name.ends_with(PARTIAL_SUFFIX) {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::warn!(%name, "removed a backup a crash left unfinished"),
                Err(e) => tracing::warn!(%name, error = %e, "cannot remove an unfinished backup"),
            }
        }
    }
}

/// Whether a backup file holds a whole export (not truncated, not empty, not foreign).
pub fn is_whole(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .is_ok_and(|v| v.get("version").is_some_and(Value::is_string) && v.get("objects").is_some_and(Value::is_object))
}

/// (name, size, modified) of every backup, newest first.
pub fn list(data_dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let mut out: Vec<_> = fs::read_dir(dir(data_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().ok()?;
            let modified = meta.modified().ok()?;
            (name.starts_with(PREFIX) && name.ends_with(".json")).then_some((name, meta.len(), modified))
        })
        .collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

/// How old the newest backup that holds a whole export is (a damaged one does not count).
pub fn newest_age(data_dir: &Path) -> Option<Duration> {
    list(data_dir)
        .into_iter()
        .find(|(name, _, _)| fs::read(dir(data_dir).join(name)).is_ok_and(|bytes| is_whole(&bytes)))
        .map(|(_, _, t)| t.elapsed().unwrap_or_default())
}

fn require_admin(ctx: &RequestContext) -> Result<(), ApiError> {
    if ctx.principal.is_superuser() {
        Ok(())
    } else {
        Err(ApiError::forbidden("configuration backups are for administrators"))
    }
}

/// This controller's name in the index: its cluster node name, or its address alone.
fn node_name(app: &App) -> String {
    app.cluster.as_ref().map_or_else(|| app.listen.ip().to_string(), |m| m.me().node)
}

/// How old the newest backup is, on this node's disk or in the index (taken on any node).
pub fn newest_age_anywhere(app: &App, on_disk: Option<Duration>) -> Option<Duration> {
    let now = SystemTime::now();
    let indexed = app
        .store
        .read()
        .iter(INDEX_KIND)
        .filter_map(|r| r.value.get("created_unix").and_then(Value::as_u64))
        .map(|secs| now.duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).unwrap_or_default())
        .min();
    match (on_disk, indexed) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `POST /api/configuration/backup`.
pub async fn create(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    let exported = export(&app.store.read(), &app.upgrade.slots.running().tag);
    let data_dir = app.data_dir.clone();
    let (name, size) = tokio::task::spawn_blocking(move || {
        let name = write(&data_dir, &exported)?;
        let size = fs::metadata(dir(&data_dir).join(&name)).map_or(0, |m| m.len());
        Ok::<_, String>((name, size))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(ApiError::internal)?;
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let record = json!({"name": name, "node": node_name(app), "size": size, "created_unix": created});
    let uuid = name.clone();
    app.store
        .write(move |txn| {
            txn.put(INDEX_KIND, &uuid, record);
            Ok::<_, ApiError>(())
        })
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"name": name, "url": format!("{}/api/configuration/backup/{name}", ctx.base_url)}),
    ))
}

/// `GET /api/configuration/backup`: every backup of the cluster (from the index), and any
/// file of this node's the index lacks (taken before an upgrade); newest first.
pub fn index(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    let url = |name: &str| format!("{}/api/configuration/backup/{name}", ctx.base_url);
    let mut results: Vec<Value> = app
        .store
        .read()
        .iter(INDEX_KIND)
        .map(|r| {
            let v = &r.value;
            let created = v["created_unix"].as_u64().unwrap_or(0);
            json!({"name": v["name"], "size": v["size"], "node": v["node"],
                   "created": rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(created)), "url": url(&r.uuid)})
        })
        .collect();
    let me = node_name(app);
    for (name, size, modified) in list(&app.data_dir) {
        if !results.iter().any(|r| r["name"] == name.as_str()) {
            results
                .push(json!({"name": name, "size": size, "node": me, "created": rfc3339(modified), "url": url(&name)}));
        }
    }
    results.sort_by(|a, b| b["name"].as_str().cmp(&a["name"].as_str()));
    Ok(json_response(StatusCode::OK, &json!({"count": results.len(), "results": results})))
}

/// `GET /api/configuration/backup/<name>`: the file.
pub fn download(app: &App, ctx: &RequestContext, name: &str) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    if !name.starts_with(PREFIX) || name.contains('/') || name.contains("..") {
        return Err(ApiError::not_found(format!("no backup '{name}'")));
    }
    let bytes = fs::read(dir(&app.data_dir).join(name)).map_err(|_| {
        // Taken on another node: its file is there.
        let elsewhere = app.store.read().get(INDEX_KIND, name).and_then(|r| r.value["node"].as_str().map(String::from));
        match elsewhere {
            Some(node) => ApiError::not_found(format!(
                "backup '{name}' is kept on controller node '{node}'; download it from that node"
            )),
            None => ApiError::not_found(format!("no backup '{name}'")),
        }
    })?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// `GET /api/configuration/export`: the configuration, without keeping a file.
pub fn export_now(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    Ok(json_response(StatusCode::OK, &export(&app.store.read(), &app.upgrade.slots.running().tag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_export_counts() {
        let whole = serde_json::to_vec(&json!({"version": "30.2.1", "created": "x", "objects": {}})).unwrap();
        assert!(is_whole(&whole));
        assert!(!is_whole(&whole[..whole.len() - 1]), "truncated");
        assert!(!is_whole(b""), "empty");
        assert!(!is_whole(b"{\"objects\": {}}"), "no version");
    }

    #[test]
    fn a_damaged_newest_backup_does_not_count_and_partials_are_removed() {
        let data = tempfile::tempdir().unwrap();
        assert_eq!(newest_age(data.path()), None);
        let name = write(data.path(), &json!({"version": "30.2.1", "objects": {}})).unwrap();
        assert!(newest_age(data.path()).is_some());
        let backups = dir(data.path());
        fs::write(backups.join(format!("{PREFIX}99991231-000000-000000.json")), b"{\"version\": \"30.2.1\", \"obj")
            .unwrap();
        assert!(newest_age(data.path()).is_some(), "the older whole one counts");
        fs::remove_file(backups.join(&name)).unwrap();
        assert_eq!(newest_age(data.path()), None, "only a damaged one is left");
        let partial = backups.join(format!("{name}{PARTIAL_SUFFIX}"));
        fs::write(&partial, b"{").unwrap();
        assert!(list(data.path()).iter().all(|(n, ..)| !n.ends_with(PARTIAL_SUFFIX)), "partials are not listed");
        remove_partial(data.path());
        assert!(!partial.exists());
    }
}
