//! What an image record says, built from a verified manifest. Pure: no store, no files.

use std::time::{SystemTime, UNIX_EPOCH};

use fulcrum_package::{Manifest, PackageKind, Verified};
use fulcrum_schema::refs;
use serde_json::{Map, Value, json};

use super::KIND;
use crate::version::rfc3339;

pub const IN_PROGRESS: &str = "IMAGE_FSM_IN_PROGRESS";
pub const COMPLETED: &str = "IMAGE_FSM_COMPLETED";

const GIB: u64 = 1 << 30;

/// A version something runs: the controller, an SE group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningVersion {
    pub version: String,
    pub build: u64,
    pub patch: Option<String>,
}

pub fn is_completed(value: &Value) -> bool {
    value.pointer("/img_state/state").and_then(Value::as_str) == Some(COMPLETED)
}

/// The package file of a record, relative to the image directory.
pub fn file_name(value: &Value) -> Option<&str> {
    value.get("_file").and_then(Value::as_str)
}

/// The sha256 of the whole package file, for the record that owns the file.
pub fn file_sha256(value: &Value) -> Option<&str> {
    value.pointer("/controller_info/hash").or_else(|| value.pointer("/se_info/hash")).and_then(Value::as_str)
}

/// Where the bytes a side installs lie in the record's file: (offset, length). A patch image
/// with both sides keeps the SE part's place in `_se_slice`.
pub fn slice(value: &Value, se_side: bool) -> (u64, u64) {
    let at = |v: &Value, offset: &str, length: &str| {
        (v.get(offset).and_then(Value::as_u64).unwrap_or(0), v.get(length).and_then(Value::as_u64).unwrap_or(0))
    };
    match value.get("_se_slice").filter(|_| se_side) {
        Some(se) => at(se, "offset", "length"),
        None => at(value, "_offset", "_length"),
    }
}

/// The uuids of a bundle's parts (once each: both sides may share one patch image).
pub fn part_uuids(value: &Value) -> Vec<String> {
    ["controller_patch_ref", "se_patch_ref"]
        .iter()
        .filter_map(|f| value.get(*f).and_then(Value::as_str))
        .filter_map(|r| refs::split_canonical(r).map(|(_, uuid)| uuid.to_string()))
        .fold(Vec::new(), |mut parts, uuid| {
            if !parts.contains(&uuid) {
                parts.push(uuid);
            }
            parts
        })
}

/// When `existing` is the other side of a patch of kind `kind` (a controller patch where an SE
/// patch comes, or the reverse), what it is, to explain why the two share a name.
pub fn other_side_of_patch(existing: &Value, kind: PackageKind) -> Option<&'static str> {
    let existing_kind = existing.pointer("/_package/kind").and_then(Value::as_str)?;
    match (existing_kind, kind) {
        ("controller_patch", PackageKind::SePatch) => Some("the controller patch of this patch level"),
        ("se_patch", PackageKind::ControllerPatch) => Some("the SE patch of this patch level"),
        _ => None,
    }
}

/// Who uses the image of this record, if anyone: matched on version, build and patch.
pub fn in_use_by(value: &Value, in_use: &[(String, RunningVersion)]) -> Option<String> {
    let package = value.get("_package")?;
    let version = package.get("version")?.as_str()?;
    let build = package.get("build")?.as_u64()?;
    let patch = package.get("patch_version").and_then(Value::as_str);
    in_use
        .iter()
        // A base image (or a bundle) is in use by whoever runs its version, patched or not; a
        // patch only by whoever runs that patch.
        .find(|(_, r)| r.version == version && r.build == build && (patch.is_none() || r.patch.as_deref() == patch))
        .map(|(who, r)| match &r.patch {
            Some(p) => format!("{who} (running {}-{} patch {p})", r.version, r.build),
            None => format!("{who} (running {}-{})", r.version, r.build),
        })
}

fn build_info(m: &Manifest) -> Value {
    let mut build = json!({
        "version": m.version,
        "build_no": m.build,
        "date": m.build_date,
        "tag": m.tag,
        "min_version": m.min_version,
        "product": m.product,
        "product_name": "Fulcrum",
    });
    if let Some(p) = &m.patch_version {
        build["patch_version"] = json!(p);
    }
    build
}

fn package_details(m: &Manifest, hash: Option<&str>, path: &str) -> Value {
    let mut details = json!({ "build": build_info(m), "path": path });
    if let Some(h) = hash {
        details["hash"] = json!(h);
    }
    if m.is_patch() {
        details["patch"] = json!({ "patch_type": m.kind.as_str(), "reboot": false });
    }
    details
}

fn ceil_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB)
}

/// The configuration part of a record. `content` is the package whose files the image
/// installs: the base for a bundle, else the manifest itself.
pub fn image_config(
    manifest: &Manifest,
    content: &Manifest,
    hash: Option<&str>,
    path: &str,
    size: u64,
) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("name".into(), json!(manifest.tag));
    let image_type = if manifest.is_patch() { "IMAGE_TYPE_PATCH" } else { "IMAGE_TYPE_SYSTEM" };
    out.insert("type".into(), json!(image_type));
    if content.controller.is_some() {
        out.insert("controller_info".into(), package_details(content, hash, path));
    }
    if content.se_image.is_some() {
        out.insert("se_info".into(), package_details(content, hash, path));
    }
    out.insert("uber_bundle".into(), json!(manifest.kind == PackageKind::Bundle));
    let req = &content.requirements;
    let mut migrations = json!({
        "controller_host_min_free_disk_size": ceil_gib(req.controller_free_disk_bytes),
        "se_host_min_free_disk_size": ceil_gib(req.se_free_disk_bytes),
        "max_active_versions": 2,
    });
    if let Some(d) = &req.docker_version {
        migrations["controller_min_docker_version"] = json!(d);
    }
    out.insert("migrations".into(), migrations);
    if !req.cloud_types.is_empty() {
        let clouds: Vec<Value> =
            req.cloud_types.iter().map(|c| json!({"cloud_name": c, "cloud_data_values": []})).collect();
        out.insert("cloud_info_values".into(), Value::Array(clouds));
    }
    out.insert("size".into(), json!(size));
    out
}

/// Fields only the system sees: where the bytes are and the facts later checks need.
pub fn hidden_fields(
    manifest: &Manifest,
    content: &Manifest,
    file: &str,
    offset: u64,
    length: u64,
    key_id: &str,
) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("_file".into(), json!(file));
    out.insert("_offset".into(), json!(offset));
    out.insert("_length".into(), json!(length));
    out.insert(
        "_package".into(),
        json!({
            "kind": manifest.kind.as_str(),
            "version": manifest.version,
            "build": manifest.build,
            "patch_version": manifest.patch_version,
            "min_version": content.min_version,
            "requirements": content.requirements,
            "carries_controller": content.controller.is_some(),
            "carries_se": content.se_image.is_some(),
            "key_id": key_id,
        }),
    );
    out
}

fn unix(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_micros())
}

/// `img_state`, `progress` and the times of an upload.
pub fn status_fields(state: &str, progress: u64, started: SystemTime, ended: Option<SystemTime>) -> Map<String, Value> {
    let changed = ended.unwrap_or_else(SystemTime::now);
    let (secs, usecs) = unix(changed);
    let mut out = Map::new();
    out.insert("img_state".into(), json!({"state": state, "last_changed_time": {"secs": secs, "usecs": usecs}}));
    out.insert("progress".into(), json!(progress.min(100)));
    out.insert("start_time".into(), json!(rfc3339(started)));
    if let Some(end) = ended {
        out.insert("end_time".into(), json!(rfc3339(end)));
        out.insert("duration".into(), json!(end.duration_since(started).unwrap_or_default().as_secs()));
    }
    out
}

/// One record to store: uuid, configuration and hidden fields.
pub struct NewRecord {
    pub uuid: String,
    pub config: Map<String, Value>,
    pub hidden: Map<String, Value>,
}

/// The records a verified package publishes: one, or for a bundle the bundle and its patches
/// (which point into the bundle's file). `uuid` is the upload's record.
pub fn records_for(
    verified: &Verified,
    uuid: &str,
    file: &str,
    path: &str,
    started: SystemTime,
    ended: SystemTime,
) -> Vec<NewRecord> {
    use fulcrum_package::ComponentRole;
    let m = &verified.manifest;
    let done = status_fields(COMPLETED, 100, started, Some(ended));
    let base = verified.component(ComponentRole::Base).map_or(m, |c| &c.package.manifest);
    let mut top = image_config(m, base, Some(&verified.sha256), path, verified.size);
    top.extend(done.clone());
    let mut records: Vec<NewRecord> = Vec::new();
    for (part, ref_field, name_field) in [
        (verified.component(ComponentRole::ControllerPatch), "controller_patch_ref", "controller_patch_name"),
        (verified.component(ComponentRole::SePatch), "se_patch_ref", "se_patch_name"),
    ] {
        let Some(part) = part else { continue };
        let pm = &part.package.manifest;
        // A controller patch and an SE patch of the same patch level (one tag, as the
        // product names patches) are one patch image with a side for each: its se_info and
        // `_se_slice` describe the SE part.
        if let Some(shared) = records.first_mut().filter(|r| r.config.get("name") == Some(&json!(pm.tag))) {
            shared.config.insert("se_info".into(), package_details(pm, Some(&part.package.sha256), path));
            shared.hidden.insert("_se_slice".into(), json!({"offset": part.offset, "length": part.size}));
            shared.hidden["_package"]["carries_se"] = json!(pm.se_image.is_some());
            let shared_ref = refs::canonical(KIND, &shared.uuid);
            top.insert(ref_field.into(), json!(shared_ref));
            top.insert(name_field.into(), json!(pm.tag));
            continue;
        }
        let part_uuid = format!("{KIND}-{}", uuid::Uuid::new_v4());
        top.insert(ref_field.into(), json!(refs::canonical(KIND, &part_uuid)));
        top.insert(name_field.into(), json!(pm.tag));
        let mut config = image_config(pm, pm, Some(&part.package.sha256), path, part.size);
        config.extend(done.clone());
        let hidden = hidden_fields(pm, pm, file, part.offset, part.size, &part.package.key_id);
        records.push(NewRecord { uuid: part_uuid, config, hidden });
    }
    let hidden = hidden_fields(m, base, file, 0, verified.size, &verified.key_id);
    records.insert(0, NewRecord { uuid: uuid.to_string(), config: top, hidden });
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package_value(kind: &str, version: &str, build: u64, patch: Option<&str>) -> Value {
        json!({"_package": {"kind": kind, "version": version, "build": build, "patch_version": patch}})
    }

    #[test]
    fn an_image_is_in_use_by_whoever_runs_its_version() {
        let running = vec![
            ("the controller".to_string(), RunningVersion { version: "30.2.1".into(), build: 9001, patch: None }),
            (
                "SE group 'g1'".to_string(),
                RunningVersion { version: "30.2.2".into(), build: 9100, patch: Some("2p1".into()) },
            ),
        ];
        let base = package_value("controller", "30.2.1", 9001, None);
        assert!(in_use_by(&base, &running).unwrap().contains("the controller"));
        let other = package_value("controller", "30.2.3", 9200, None);
        assert_eq!(in_use_by(&other, &running), None);
        let patch = package_value("se_patch", "30.2.2", 9100, Some("2p1"));
        assert!(in_use_by(&patch, &running).unwrap().contains("g1"));
        let other_patch = package_value("se_patch", "30.2.2", 9100, Some("2p2"));
        assert_eq!(in_use_by(&other_patch, &running), None);
        let base_of_patched = package_value("controller", "30.2.2", 9100, None);
        assert!(in_use_by(&base_of_patched, &running).unwrap().contains("g1"));
    }
}
