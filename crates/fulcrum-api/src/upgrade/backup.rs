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

/// Writes a backup file; returns its name.
pub fn write(data_dir: &Path, cat_export: &Value) -> Result<String, String> {
    let dir = dir(data_dir);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let [y, mo, d, h, mi, s] = fulcrum_package::civil_utc(now.as_secs() as i64);
    let name = format!("{PREFIX}{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{:06}.json", now.subsec_micros());
    let bytes = serde_json::to_vec(cat_export).map_err(|e| e.to_string())?;
    crate::bootstrap::write_private(&dir.join(&name), &bytes).map_err(|e| format!("cannot write the backup: {e}"))?;
    crate::images::sync_dir(&dir).map_err(|e| e.to_string())?;
    Ok(name)
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

/// How old the newest backup is.
pub fn newest_age(data_dir: &Path) -> Option<Duration> {
    list(data_dir).first().map(|(_, _, t)| t.elapsed().unwrap_or_default())
}

fn require_admin(ctx: &RequestContext) -> Result<(), ApiError> {
    if ctx.principal.is_superuser() {
        Ok(())
    } else {
        Err(ApiError::forbidden("configuration backups are for administrators"))
    }
}

/// `POST /api/configuration/backup`.
pub async fn create(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    let exported = export(&app.store.read(), &app.upgrade.slots.running().tag);
    let data_dir = app.data_dir.clone();
    let name = tokio::task::spawn_blocking(move || write(&data_dir, &exported))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::internal)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"name": name, "url": format!("{}/api/configuration/backup/{name}", ctx.base_url)}),
    ))
}

/// `GET /api/configuration/backup`.
pub fn index(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    let results: Vec<Value> = list(&app.data_dir)
        .into_iter()
        .map(|(name, size, modified)| {
            json!({"name": name, "size": size, "created": rfc3339(modified), "url": format!("{}/api/configuration/backup/{name}", ctx.base_url)})
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"count": results.len(), "results": results})))
}

/// `GET /api/configuration/backup/<name>`: the file.
pub fn download(app: &App, ctx: &RequestContext, name: &str) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    if !name.starts_with(PREFIX) || name.contains('/') || name.contains("..") {
        return Err(ApiError::not_found(format!("no backup '{name}'")));
    }
    let bytes =
        fs::read(dir(&app.data_dir).join(name)).map_err(|_| ApiError::not_found(format!("no backup '{name}'")))?;
    let mut response = (StatusCode::OK, bytes).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// `GET /api/configuration/export`: the configuration, without keeping a file.
pub fn export_now(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_admin(ctx)?;
    Ok(json_response(StatusCode::OK, &export(&app.store.read(), &app.upgrade.slots.running().tag)))
}
