//! Measuring what the prechecks judge: the store, the SEs, the disk, the host.

use std::collections::HashMap;
use std::sync::Arc;

use fulcrum_schema::{Registry, normalize};
use fulcrum_store::{Catalogue, Stored};
use fulcrum_upgrade::checks::{Facts, GroupFacts, Request, SeFacts, VsFacts};
use fulcrum_upgrade::operation::{GroupState, OpState};
use fulcrum_upgrade::{ImageFacts, Version};
use serde_json::Value;

use super::{GROUP_KIND, backup, operations};
use crate::app::App;
use crate::engines::SE_KIND;
use crate::error::ApiError;

/// Which side of a package a node installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Controller,
    Se,
}

/// What an SE record says it runs.
pub fn version_of_record(value: &Value) -> Option<Version> {
    Some(Version {
        version: value.get("version")?.as_str()?.to_string(),
        build: value.get("build")?.as_u64()?,
        patch: value.get("patch_version").and_then(Value::as_str).map(String::from),
    })
}

/// What the checks need to know about an image, for the side that installs it: a bundle takes
/// a node to its base plus the patch it carries for that side.
pub fn image_facts(app: &App, cat: &Catalogue, image: &Arc<Stored>, side: Side) -> ImageFacts {
    let v = &image.value;
    let package = v.get("_package").cloned().unwrap_or_default();
    let str_of = |p: &Value, f: &str| p.get(f).and_then(Value::as_str).map(String::from);
    let kind = str_of(&package, "kind").unwrap_or_default();
    let mut target = Version {
        version: str_of(&package, "version").unwrap_or_default(),
        build: package.get("build").and_then(Value::as_u64).unwrap_or(0),
        patch: str_of(&package, "patch_version"),
    };
    let mut bundle_patches = Vec::new();
    let part = |field: &str| {
        v.get(field)
            .and_then(Value::as_str)
            .and_then(fulcrum_schema::refs::split_canonical)
            .and_then(|(_, u)| cat.get(crate::images::KIND, u))
    };
    if kind == "bundle" {
        for (field, for_side) in [("controller_patch_ref", Side::Controller), ("se_patch_ref", Side::Se)] {
            if let Some(p) = part(field) {
                bundle_patches.push(p.meta.name.clone().unwrap_or_default());
                if for_side == side {
                    target.patch = p.value.pointer("/_package/patch_version").and_then(Value::as_str).map(String::from);
                }
            }
        }
    }
    let requirements = package.get("requirements").cloned().unwrap_or_default();
    let file_ok = crate::images::record::file_name(v).is_some_and(|f| {
        let (offset, length) = crate::images::record::slice(v, side == Side::Se);
        let need = offset + length;
        std::fs::metadata(app.images.file_path(f)).is_ok_and(|m| m.len() >= need)
    });
    let bool_of = |f: &str| package.get(f).and_then(Value::as_bool).unwrap_or(false);
    ImageFacts {
        uuid: image.uuid.clone(),
        name: image.meta.name.clone().unwrap_or_default(),
        kind: kind.clone(),
        target,
        min_version: str_of(&package, "min_version").unwrap_or_default(),
        se_free_disk_bytes: requirements.get("se_free_disk_bytes").and_then(Value::as_u64).unwrap_or(0),
        controller_free_disk_bytes: requirements.get("controller_free_disk_bytes").and_then(Value::as_u64).unwrap_or(0),
        cloud_types: requirements
            .get("cloud_types")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        docker_version: str_of(&requirements, "docker_version"),
        carries_controller: bool_of("carries_controller") || kind == "bundle",
        carries_se: bool_of("carries_se") || kind == "bundle",
        bundle_patches,
        size: v.get("_length").and_then(Value::as_u64).unwrap_or(0),
        missing_on: match v.get("node_states").and_then(Value::as_array) {
            Some(states) => states.iter().filter_map(missing_copy).collect(),
            // Before the leader first recorded the nodes' copies: this node's file.
            None if file_ok => vec![],
            None => vec![format!("controller node {}", app.listen.ip())],
        },
    }
}

/// A node whose copy of an image is not ready, and why, from the record's `node_states`.
fn missing_copy(entry: &Value) -> Option<String> {
    let state = entry.get("state").and_then(Value::as_str).unwrap_or_default();
    if state == crate::images::record::COMPLETED {
        return None;
    }
    let node = entry.get("node").and_then(Value::as_str).unwrap_or("?");
    let reason = entry.get("reason").and_then(Value::as_str).unwrap_or_default();
    let why = match state {
        crate::images::replica::FAILED => format!("its copy failed: {reason}"),
        crate::images::record::IN_PROGRESS => {
            format!("{reason}, {}%", entry.get("progress").and_then(Value::as_u64).unwrap_or(0))
        }
        _ => "not copied yet".into(),
    };
    let down = if entry.get("up").and_then(Value::as_bool) == Some(false) { "; the node is down" } else { "" };
    Some(format!("controller node {node} ({why}{down})"))
}

fn selinux() -> Option<String> {
    let enforce = std::fs::read_to_string("/sys/fs/selinux/enforce").ok()?;
    Some(if enforce.trim() == "1" { "enforcing".into() } else { "permissive".into() })
}

/// Whether the controller's address was handed out by DHCP, from `ip -j addr` (`dynamic`).
fn address_dynamic(ip: std::net::IpAddr) -> Option<bool> {
    if ip.is_loopback() {
        return Some(false);
    }
    let out = std::process::Command::new("ip").args(["-j", "addr", "show"]).output().ok()?;
    let interfaces: Value = serde_json::from_slice(&out.stdout).ok()?;
    let target = ip.to_string();
    interfaces
        .as_array()?
        .iter()
        .flat_map(|i| i.get("addr_info").and_then(Value::as_array).into_iter().flatten())
        .find_map(|a| {
            (a.get("local").and_then(Value::as_str) == Some(target.as_str()))
                .then(|| a.get("dynamic").and_then(Value::as_bool).unwrap_or(false))
        })
}

/// Objects that no longer validate against the schema (what a migration would trip on).
pub(super) fn config_problems(cat: &Catalogue) -> Vec<String> {
    let reg = Registry::get();
    let mut out = Vec::new();
    for t in reg.types() {
        for s in cat.iter(t.path) {
            let visible: serde_json::Map<String, Value> = s
                .value
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !k.starts_with('_') && k.as_str() != "uuid" && k.as_str() != "tenant_ref")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Err(e) = normalize(reg, reg.schema_of(t), &Value::Object(visible)) {
                out.push(format!("{} '{}': {e}", t.path, s.meta.name.as_deref().unwrap_or(&s.uuid)));
            }
        }
    }
    out
}

/// What is wrong now, as an operator would see alerts: SEs down or unlicensed, virtual
/// services without SEs, SE installs that failed.
fn open_alerts(app: &App, cat: &Catalogue) -> Vec<String> {
    let mut out = Vec::new();
    for se in cat.iter(SE_KIND) {
        let name = se.meta.name.as_deref().unwrap_or_default();
        if se.value.pointer("/oper_status/state").and_then(Value::as_str) != Some("OPER_UP") {
            out.push(format!("SE '{name}' is down"));
        }
        if se.value.get("license_state").and_then(Value::as_str) == Some("LICENSE_STATE_UNLICENSED") {
            out.push(format!("SE '{name}' is unlicensed"));
        }
        if let Some(step @ ("FAILED" | "ROLLED_BACK")) =
            se.value.pointer("/install_status/state").and_then(Value::as_str)
        {
            out.push(format!("SE '{name}': its last install ended {step}"));
        }
    }
    for vs in cat.iter("virtualservice") {
        if vs.value.get("enabled").and_then(Value::as_bool) != Some(false) && app.engines.placed_on(&vs.uuid).is_empty()
        {
            out.push(format!("virtual service '{}' runs on no SE", vs.meta.name.as_deref().unwrap_or_default()));
        }
    }
    out
}

/// Measures everything the checks judge.
/// Where this node's systemd manager configuration is read from (tests name their own file).
const SYSTEMD_CONF_ENV: &str = "FULCRUM_SYSTEMD_CONF";

/// This node's systemd start timeout, read now (absent file: unset).
pub fn local_systemd(node: &str) -> fulcrum_upgrade::checks::NodeSystemd {
    let file = std::env::var(SYSTEMD_CONF_ENV).unwrap_or_else(|_| "/etc/systemd/system.conf".into());
    let conf = std::fs::read_to_string(&file).unwrap_or_default();
    fulcrum_upgrade::checks::NodeSystemd {
        node: node.into(),
        default_timeout_start_secs: fulcrum_upgrade::checks::default_timeout_start_secs(&conf),
        file,
    }
}

/// What a cluster node publishes of its host for the leader's prechecks, of the version it
/// runs, and of its copies of the images.
pub fn host_facts(
    node: &str,
    data_dir: &std::path::Path,
    images: &crate::images::Images,
    slots: &super::slots::ControllerSlots,
) -> Value {
    serde_json::json!({
        "controller_version": slots.running().version(),
        "systemd": local_systemd(node),
        "free_disk_bytes": crate::images::available_bytes(data_dir).unwrap_or(0),
        "images": images.copies.reports(),
    })
}

pub async fn gather(app: &App, request: &Request) -> Facts {
    // The host's facts (files, `ip`, statvfs) are measured on a blocking thread while the store
    // proves it takes a durable write (the controller cluster is ready when it does).
    let (data_dir, ip) = (app.data_dir.clone(), app.listen.ip());
    let host = tokio::task::spawn_blocking(move || {
        (
            backup::newest_age(&data_dir).map(|d| d.as_secs()),
            selinux(),
            crate::images::available_bytes(&data_dir).unwrap_or(0),
            address_dynamic(ip),
        )
    });
    let probe = app.store.write(|_| Ok::<_, ApiError>(())).await;
    let (backup_on_disk, selinux, controller_free_disk_bytes, address_dynamic) =
        host.await.unwrap_or((None, None, 0, None));
    // A backup any node took counts (a former leader's included).
    let backup_age_secs =
        backup::newest_age_anywhere(app, backup_on_disk.map(std::time::Duration::from_secs)).map(|d| d.as_secs());
    let mut cluster_problem =
        probe.err().map(|e| format!("the controller's store does not take writes: {}", ApiError::from(e).message));
    // A cluster's store answers only with a quorum of etcd members (a quorum read proves it).
    if cluster_problem.is_none()
        && let (Some(membership), Some(applied)) = (&app.cluster, app.store.applied())
        && let Err(e) = membership.cluster.consistent(applied, std::time::Duration::from_secs(3)).await
    {
        cluster_problem = Some(format!("etcd has no quorum (the cluster's store does not answer): {e}"));
    }
    let view = crate::system::cluster_view(app).await;
    // This node's systemd as it is now; the others' as they registered it.
    let systemd = view
        .nodes
        .iter()
        .map(|n| match n.host.get("systemd") {
            _ if n.name == view.me => local_systemd(&n.name),
            Some(s) => serde_json::from_value(s.clone()).unwrap_or_else(|_| local_systemd(&n.name)),
            None => fulcrum_upgrade::checks::NodeSystemd { node: n.name.clone(), ..Default::default() },
        })
        .collect();
    let other_nodes_free_disk = view
        .nodes
        .iter()
        .filter(|n| n.name != view.me)
        // A node that never reported is for the readiness check (it is down, or just starting).
        .filter_map(|n| Some((n.name.clone(), n.host.get("free_disk_bytes").and_then(Value::as_u64)?)))
        .collect();
    let up = view.nodes.iter().filter(|n| n.up).count();
    let cluster_nodes = (up, view.nodes.len());
    let down: Vec<&str> = view.nodes.iter().filter(|n| !n.up).map(|n| n.name.as_str()).collect();
    if cluster_problem.is_none() && !down.is_empty() {
        cluster_problem =
            Some(format!("controller node(s) {} down ({up} of {} up)", down.join(", "), view.nodes.len()));
    }
    if cluster_problem.is_none() && view.leader.is_none() {
        cluster_problem = Some("no controller leads the cluster".into());
    }
    let running = app.upgrade.slots.running();
    let previous = app.upgrade.slots.previous();
    let cat = app.store.read();
    let ops = operations(&cat);
    let operation_in_progress = ops.iter().find(|o| o.is_running()).map(|o| format!("{} {}", o.ops.as_str(), o.id));
    let mut groups: Vec<GroupFacts> = cat
        .iter(GROUP_KIND)
        .map(|g| {
            let held = ops.iter().rev().find_map(|o| {
                let run = o.groups.iter().find(|r| r.uuid == g.uuid)?;
                match (o.state, run.state) {
                    (OpState::InProgress, GroupState::InProgress | GroupState::NotStarted) => {
                        Some((format!("{} {} (in progress)", o.ops.as_str(), o.id), false))
                    }
                    (OpState::InProgress | OpState::Suspended, GroupState::Suspended) => {
                        Some((format!("{} {} (suspended)", o.ops.as_str(), o.id), true))
                    }
                    _ => None,
                }
            });
            GroupFacts {
                uuid: g.uuid.clone(),
                name: g.meta.name.clone().unwrap_or_default(),
                ses: vec![],
                virtualservices: vec![],
                suspended: held.as_ref().is_some_and(|(_, s)| *s),
                held_by: held.map(|(h, _)| h),
            }
        })
        .collect();
    let index: HashMap<String, usize> = groups.iter().enumerate().map(|(i, g)| (g.uuid.clone(), i)).collect();
    let group_of = |v: &Value| {
        v.get("se_group_ref")
            .and_then(Value::as_str)
            .and_then(fulcrum_schema::refs::split_canonical)
            .and_then(|(_, u)| index.get(u).copied())
    };
    for se in cat.iter(SE_KIND) {
        let Some(i) = group_of(&se.value) else { continue };
        let v = &se.value;
        // Up means heard from since this controller started (a restart forgets the rest).
        let live = app.engines.live_fields(&se.uuid);
        groups[i].ses.push(SeFacts {
            uuid: se.uuid.clone(),
            name: se.meta.name.clone().unwrap_or_default(),
            up: v.pointer("/oper_status/state").and_then(Value::as_str) == Some("OPER_UP")
                && live.contains_key("last_heartbeat"),
            licensed: v.get("license_state").and_then(Value::as_str) == Some("LICENSE_STATE_LICENSED"),
            running: version_of_record(v),
            previous: v.get("previous_version").and_then(Value::as_str).and_then(Version::parse),
            free_disk_bytes: app
                .engines
                .live_fields(&se.uuid)
                .get("free_disk_bytes")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        });
    }
    for vs in cat.iter("virtualservice") {
        let Some(i) = group_of(&vs.value) else { continue };
        groups[i]
            .virtualservices
            .push(VsFacts { name: vs.meta.name.clone().unwrap_or_default(), on: app.engines.placed_on(&vs.uuid) });
    }
    let _ = request;
    Facts {
        controller: running.version(),
        controller_previous: previous.map(|p| p.version()),
        cluster_problem,
        cluster_nodes,
        backup_age_secs,
        selinux,
        operation_in_progress,
        groups,
        controller_free_disk_bytes,
        gslb_services: cat.iter("gslbservice").map(|g| g.meta.name.clone().unwrap_or_default()).collect(),
        config_problems: config_problems(&cat),
        open_alerts: open_alerts(app, &cat),
        max_alerts: crate::app::setting_in(&cat, "controllerproperties", "/upgrade_max_alerts")
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize,
        clouds: cat
            .iter("cloud")
            .map(|c| {
                (
                    c.meta.name.clone().unwrap_or_default(),
                    c.value.get("vtype").and_then(Value::as_str).unwrap_or_default().to_string(),
                )
            })
            .collect(),
        controller_docker_version: std::path::Path::new("/.dockerenv")
            .exists()
            .then(|| std::env::var("FULCRUM_DOCKER_VERSION").unwrap_or_default()),
        controller_address: app.listen.ip().to_string(),
        address_dynamic,
        systemd,
        other_nodes_free_disk,
    }
}

/// Whether another SE of the group can take virtual services now.
pub fn other_serviceable_ses(app: &App, group: &str, except: &str) -> bool {
    let cat = app.store.read();
    let group_ref = fulcrum_schema::refs::canonical(GROUP_KIND, group);
    cat.iter(SE_KIND).any(|s| {
        let v = &s.value;
        s.uuid != except
            && v.get("se_group_ref").and_then(Value::as_str) == Some(group_ref.as_str())
            && v.pointer("/oper_status/state").and_then(Value::as_str) == Some("OPER_UP")
            && v.get("license_state").and_then(Value::as_str) == Some("LICENSE_STATE_LICENSED")
            && v.get("enable_state").and_then(Value::as_str).unwrap_or("SE_STATE_ENABLED") == "SE_STATE_ENABLED"
            && v.pointer("/install_status/state")
                .and_then(Value::as_str)
                .and_then(fulcrum_se_protocol::Step::parse)
                .is_none_or(|step| step.is_final())
    })
}

/// Names of virtual services.
pub fn vs_names(app: &App, uuids: &[String]) -> Vec<String> {
    let cat = app.store.read();
    uuids
        .iter()
        .map(|u| cat.get("virtualservice", u).and_then(|v| v.meta.name.clone()).unwrap_or_else(|| u.clone()))
        .collect()
}
