//! Drives the running operation: the controller's steps, then the SE groups (a configurable
//! number at once, SEs in rolling batches). Every step is stored before it starts and after
//! it ends; after a restart the loop takes the stored operation up where it stood.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fulcrum_package::{Side, fill_slot, verify};
use fulcrum_upgrade::operation::{
    CLUSTER_WIDE_STEP, CONTROLLER_STEPS, ControllerRun, Event, GroupAction, GroupRun, GroupState, OpState, Operation,
    SeState,
};
use fulcrum_upgrade::{Ops, Version};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::slots::SlotInfo;
use super::{backup, current, now, save};
use crate::app::App;
use crate::engines::SE_KIND;
use crate::error::ApiError;

const TICK: Duration = Duration::from_millis(200);

pub(super) fn setting(app: &App, field: &str, default: u64) -> u64 {
    app.setting("controllerproperties", &format!("/{field}")).and_then(|v| v.as_u64()).unwrap_or(default)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The loop: one pass per tick or wake-up.
pub async fn run(app: Arc<App>) {
    loop {
        let op = current(&app.store.read());
        let busy = match op {
            Some(op) => match drive(&app, op).await {
                Ok(busy) => busy,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade step failed to be stored; retrying");
                    false
                }
            },
            None => {
                app.upgrade.set_controller_busy(false);
                app.engines.set_draining(HashSet::new());
                false
            }
        };
        if !busy {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = app.upgrade.wake.notified() => {}
            }
        }
    }
}

/// One pass over the operation; `true` when another pass should follow at once.
async fn drive(app: &Arc<App>, mut op: Operation) -> Result<bool, ApiError> {
    if let Some(controller) = op.controller.clone().filter(|c| c.state == OpState::InProgress) {
        app.upgrade.set_controller_busy(true);
        controller_step(app, &mut op, controller).await?;
        return Ok(true);
    }
    app.upgrade.set_controller_busy(false);
    let before = op.clone();
    if op.groups_may_run() {
        groups_pass(app, &mut op).await?;
    }
    let state = op.settle();
    if state != OpState::InProgress && op.end_time.is_none() && state != OpState::Suspended {
        op.end_time = Some(now());
    }
    if op != before {
        save(app, &op).await?;
        if state != OpState::InProgress {
            tracing::info!(op = %op.id, state = state.as_str(), "upgrade operation ended");
        }
    }
    // SEs being emptied, or whose install runs while the operation is non-disruptive.
    let draining: HashSet<String> = op
        .groups
        .iter()
        .flat_map(|g| g.ses.iter())
        .filter(|s| !op.disruptive && matches!(s.state, SeState::Draining | SeState::InProgress))
        .map(|s| s.uuid.clone())
        .collect();
    app.engines.set_draining(if op.is_running() { draining } else { HashSet::new() });
    Ok(false)
}

pub(super) fn event(task: &str, message: String, status: Option<bool>) -> Event {
    let t = now();
    Event { task: task.into(), start_time: t.clone(), end_time: status.map(|_| t), status, message }
}

/// Ends the open event of `task` (the last one begun) with how the task ended.
pub(super) fn end_event(events: &mut [Event], task: &str, outcome: &Result<String, String>) {
    if let Some(e) = events.iter_mut().rev().find(|e| e.task == task && e.status.is_none()) {
        e.end_time = Some(now());
        e.status = Some(outcome.is_ok());
        e.message = outcome.clone().unwrap_or_else(|e| e);
    }
}

/// Runs the controller's next step, storing that it started and how it ended: the migration
/// once on the leader, every other step on each controller node in turn (see
/// [`super::nodes`]).
async fn controller_step(app: &Arc<App>, op: &mut Operation, mut c: ControllerRun) -> Result<(), ApiError> {
    let task = CONTROLLER_STEPS[c.step];
    if c.nodes.is_empty() {
        // An operation stored before clusters: this node is the controller.
        c.nodes = super::nodes::this_cluster(app).await;
    }
    if !c.step_started {
        c.step_started = true;
        c.events.push(event(task, String::new(), None));
        op.controller = Some(c.clone());
        save(app, op).await?;
        tracing::info!(op = %op.id, task, "controller step started");
    }
    let outcome = if task == CLUSTER_WIDE_STEP {
        let (app2, c2) = (app.clone(), c.clone());
        tokio::task::spawn_blocking(move || migrate(&app2, &c2)).await.unwrap_or_else(|e| Err(e.to_string()))
    } else {
        super::nodes::every_node(app, op, &mut c, task).await?
    };
    end_event(&mut c.events, task, &outcome);
    match outcome {
        Ok(_) => {
            c.step += 1;
            c.step_started = false;
            if c.step == CONTROLLER_STEPS.len() {
                c.state = OpState::Completed;
            }
        }
        Err(message) => {
            tracing::warn!(op = %op.id, task, %message, "controller step failed");
            c.state = OpState::Error;
            op.reason = format!("{task}: {message}");
        }
    }
    op.controller = Some(c);
    op.settle();
    if !op.is_running() && op.end_time.is_none() {
        op.end_time = Some(now());
    }
    save(app, op).await
}

/// This node's share of a controller step other than the restart (which
/// [`super::nodes`] does itself). Blocking.
pub(super) fn node_task(
    app: &App,
    task: &str,
    rollback: bool,
    to: &Version,
    image: Option<&str>,
) -> Result<String, String> {
    let slots = &app.upgrade.slots;
    match task {
        // A slot holding the version already (a rollback's way back, a step done before a
        // restart or a change of leader) needs no copy and no install.
        "COPY_AND_VERIFY_IMAGE" | "INSTALL_IMAGE" if rollback || slots.slot_of(to).is_some() => slots
            .slot_of(to)
            .map(|s| format!("slot {s} holds {}", to.label()))
            .ok_or_else(|| format!("no slot holds {}", to.label())),
        "COPY_AND_VERIFY_IMAGE" => copy_and_verify(app, image).map(|size| format!("{size} bytes copied and verified")),
        "INSTALL_IMAGE" => install(app, to, image),
        "SET_CONTROLLER_UPGRADE_COMPLETED" => {
            let _ = std::fs::remove_dir_all(slots.staging_dir());
            Ok(format!("runs {}", slots.running().version().label()))
        }
        other => Err(format!("unknown step {other}")),
    }
}

fn staged_path(app: &App, image: Option<&str>) -> std::path::PathBuf {
    app.upgrade.slots.staging_dir().join(format!("{}.pkg", image.unwrap_or("image")))
}

/// Copies the image's bytes out of this node's image store and checks them: its recorded
/// sha256, then the signature and every file.
fn copy_and_verify(app: &App, image: Option<&str>) -> Result<u64, String> {
    let uuid = image.ok_or("the operation names no image")?;
    let (file, offset, length, hash) = {
        let cat = app.store.read();
        let image = cat.get(crate::images::KIND, uuid).ok_or_else(|| format!("image {uuid} is gone"))?;
        let v = &image.value;
        let (offset, length) = crate::images::record::slice(v, false);
        (
            app.images.file_path(crate::images::record::file_name(v).ok_or("the image has no file")?),
            offset,
            length,
            crate::images::record::file_sha256(v).unwrap_or_default().to_string(),
        )
    };
    let staging = app.upgrade.slots.staging_dir();
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let target = staged_path(app, image);
    let mut source = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    source.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut out = std::fs::File::create(&target).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut limited = source.take(length);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = limited.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    out.sync_all().map_err(|e| e.to_string())?;
    let got = fulcrum_package::hex(&hasher.finalize());
    if !hash.is_empty() && got != hash {
        return Err(format!("sha256 mismatch: the image record says {hash}, the copy is {got}"));
    }
    let mut staged = std::fs::File::open(&target).map_err(|e| e.to_string())?;
    verify(&mut staged, app.images.trusted(), &mut |_| {}).map_err(|e| format!("the image does not verify: {e}"))?;
    Ok(length)
}

fn install(app: &App, to: &Version, image: Option<&str>) -> Result<String, String> {
    let slots = &app.upgrade.slots;
    let spare = slots.spare();
    let running = slots.running();
    let staged = staged_path(app, image);
    let mut file = std::fs::File::open(&staged).map_err(|e| format!("{}: {e}", staged.display()))?;
    let verified = verify(&mut file, app.images.trusted(), &mut |_| {}).map_err(|e| e.to_string())?;
    let installed = fill_slot(
        &mut file,
        &verified,
        Side::Controller,
        (&running.version, running.build, running.patch.as_deref()),
        &slots.active_dir(),
        &slots.slot_dir(&spare),
    )
    .map_err(|e| e.to_string())?;
    let got =
        Version { version: installed.version.clone(), build: installed.build, patch: installed.patch_version.clone() };
    if got != *to {
        return Err(format!("the image installs {}, the operation expected {}", got.label(), to.label()));
    }
    let tag = match &installed.patch_version {
        Some(p) => fulcrum_package::tag_of(&installed.version, installed.build, Some(p), &verified.manifest.build_date),
        None => fulcrum_package::tag_of(&installed.version, installed.build, None, &verified.manifest.build_date),
    };
    let info = SlotInfo {
        version: installed.version,
        build: installed.build,
        patch: installed.patch_version,
        tag,
        image: image.map(String::from),
    };
    slots.filled(&spare, info)?;
    Ok(format!("{} installed into slot {spare}", to.label()))
}

/// Takes a backup, then checks that every object validates under the new version's schema
/// (the configuration format has not changed between the versions Fulcrum ships, so nothing
/// is rewritten; a change would be applied here, inside the same step).
fn migrate(app: &App, c: &ControllerRun) -> Result<String, String> {
    let exported = backup::export(&app.store.read(), &c.from.label());
    let name = backup::write(&app.data_dir, &exported)?;
    let objects: usize =
        exported["objects"].as_object().map_or(0, |o| o.values().filter_map(Value::as_array).map(Vec::len).sum());
    let problems = {
        let cat = app.store.read();
        super::facts::config_problems(&cat)
    };
    if !problems.is_empty() {
        return Err(format!("{} object(s) do not validate: {}", problems.len(), problems.join("; ")));
    }
    Ok(format!("backup {name} taken; {objects} objects valid for {}", c.to.label()))
}

/// One pass over the SE groups.
async fn groups_pass(app: &Arc<App>, op: &mut Operation) -> Result<(), ApiError> {
    let concurrency = setting(app, "upgrade_concurrent_segroups", 1).max(1) as usize;
    let batch = setting(app, "upgrade_se_batch_size", 1).max(1) as usize;
    let running = op.groups.iter().filter(|g| g.state == GroupState::InProgress).count();
    let mut room = concurrency.saturating_sub(running);
    for g in op.groups.iter_mut().filter(|g| g.state == GroupState::NotStarted) {
        if room == 0 {
            break;
        }
        room -= 1;
        g.state = GroupState::InProgress;
        g.events.push(event("SEGROUP_UPGRADE_START", format!("{} SE(s)", g.ses.len()), Some(true)));
    }
    let (ops, disruptive, action) = (op.ops, op.disruptive, op.action_on_error);
    for g in op.groups.iter_mut().filter(|g| g.state == GroupState::InProgress) {
        for i in 0..g.ses.len() {
            if matches!(g.ses[i].state, SeState::Draining | SeState::InProgress) {
                follow_se(app, g, i, ops, disruptive).await?;
            }
        }
        match g.next(batch, action) {
            GroupAction::Start(indices) => {
                for i in indices {
                    start_se(app, g, i, ops, disruptive).await?;
                }
            }
            GroupAction::RollBack(indices) => {
                for i in indices {
                    let se = &mut g.ses[i];
                    se.rolling_back = true;
                    match crate::engines::queue_command(app, &se.uuid, "SE_ROLLBACK", None, disruptive).await {
                        Ok(stored) => {
                            se.state = SeState::InProgress;
                            se.command_id = stored.value.pointer("/install_status/command_id").and_then(Value::as_u64);
                            se.deadline_unix = Some(unix_now() + setting(app, "upgrade_se_timeout", 600));
                        }
                        Err(e) => {
                            se.state = SeState::Failed;
                            se.message = format!("rollback could not start: {}", e.message);
                        }
                    }
                }
                g.events.push(event(
                    "SEGROUP_FAILED_SE_ERROR_RECOVERY",
                    "rolling back the upgraded SEs".into(),
                    Some(true),
                ));
            }
            GroupAction::Finish(state) => {
                g.state = state;
                let failed: Vec<&str> =
                    g.ses.iter().filter(|s| s.state == SeState::Failed).map(|s| s.name.as_str()).collect();
                if !failed.is_empty() {
                    g.reason = format!("SE(s) failed: {}", failed.join(", "));
                }
                let task = match state {
                    GroupState::Suspended => "SEGROUP_UPGRADE_SUSPENDED",
                    GroupState::Error => "SEGROUP_UPGRADE_ERROR",
                    _ => "SEGROUP_UPGRADE_COMPLETE",
                };
                g.events.push(event(task, g.reason.clone(), Some(state == GroupState::Completed)));
            }
            GroupAction::Wait => {}
        }
    }
    Ok(())
}

/// Starts one SE: drain it (non-disruptive), or note what it disrupts, then send its command.
async fn start_se(app: &Arc<App>, g: &mut GroupRun, i: usize, ops: Ops, disruptive: bool) -> Result<(), ApiError> {
    let (uuid, to) = (g.ses[i].uuid.clone(), g.ses[i].to.clone());
    let record = app.store.read().get(SE_KIND, &uuid).cloned();
    let Some(record) = record else {
        g.ses[i].state = SeState::Failed;
        g.ses[i].message = "the SE no longer exists".into();
        return Ok(());
    };
    let running = super::facts::version_of_record(&record.value);
    if !ops.is_rollback() && running.is_some() && running == to {
        g.ses[i].state = SeState::AlreadyUpgraded;
        g.ses[i].message = format!("already runs {}", to.map(|t| t.label()).unwrap_or_default());
        return Ok(());
    }
    let hosted = app.engines.assigned(&uuid);
    let others_up = super::facts::other_serviceable_ses(app, &g.uuid, &uuid);
    if !disruptive && !hosted.is_empty() && others_up {
        g.ses[i].state = SeState::Draining;
        g.ses[i].deadline_unix = Some(unix_now() + setting(app, "upgrade_vs_move_timeout", 30));
        g.events.push(event(
            "VS_MIGRATE",
            format!("moving {} virtual service(s) off SE '{}'", hosted.len(), g.ses[i].name),
            Some(true),
        ));
        return Ok(());
    }
    if !hosted.is_empty() {
        let names = super::facts::vs_names(app, &hosted);
        g.events.push(event(
            "VS_DISRUPTED",
            format!("SE '{}' serves {} with nowhere to move", g.ses[i].name, names.join(", ")),
            Some(false),
        ));
        for n in names {
            if !g.disrupted_vs.contains(&n) {
                g.disrupted_vs.push(n);
            }
        }
    }
    send_command(app, g, i, ops, disruptive).await
}

async fn send_command(app: &Arc<App>, g: &mut GroupRun, i: usize, ops: Ops, disruptive: bool) -> Result<(), ApiError> {
    let se = &mut g.ses[i];
    // A command already queued for this SE by this operation (before a restart) is adopted.
    let queued = app.store.read().get(SE_KIND, &se.uuid).and_then(|r| {
        let status = r.value.get("install_status")?;
        let pending = !matches!(status.get("state").and_then(Value::as_str), Some("DONE" | "FAILED" | "ROLLED_BACK"));
        pending.then(|| status.get("command_id").and_then(Value::as_u64)).flatten()
    });
    let outcome = match queued {
        Some(id) => Ok(id),
        None => {
            let command = if ops.is_rollback() {
                crate::engines::queue_command(app, &se.uuid, "SE_ROLLBACK", None, disruptive).await
            } else {
                let image = g.image_uuid.clone().unwrap_or_default();
                let name = app
                    .store
                    .read()
                    .get(crate::images::KIND, &image)
                    .and_then(|i| i.meta.name.clone())
                    .unwrap_or_default();
                crate::engines::queue_command(app, &se.uuid, "SE_INSTALL", Some((image, name)), disruptive).await
            };
            command
                .map(|stored| stored.value.pointer("/install_status/command_id").and_then(Value::as_u64).unwrap_or(0))
        }
    };
    match outcome {
        Ok(id) => {
            se.state = SeState::InProgress;
            se.command_id = Some(id);
            se.deadline_unix = Some(unix_now() + setting(app, "upgrade_se_timeout", 600));
        }
        Err(e) => {
            se.state = SeState::Failed;
            se.message = e.message;
        }
    }
    Ok(())
}

/// Follows an SE that is draining or installing.
async fn follow_se(app: &Arc<App>, g: &mut GroupRun, i: usize, ops: Ops, disruptive: bool) -> Result<(), ApiError> {
    let now = unix_now();
    if g.ses[i].state == SeState::Draining {
        let moved = app.engines.assigned(&g.ses[i].uuid).is_empty();
        if moved || g.ses[i].deadline_unix.is_some_and(|d| now > d) {
            if !moved {
                let names = super::facts::vs_names(app, &app.engines.assigned(&g.ses[i].uuid));
                g.disrupted_vs.extend(names);
            }
            return send_command(app, g, i, ops, disruptive).await;
        }
        return Ok(());
    }
    let se = &mut g.ses[i];
    let status =
        app.store.read().get(SE_KIND, &se.uuid).map(|r| r.value.get("install_status").cloned().unwrap_or_default());
    let Some(status) = status else {
        se.state = SeState::Failed;
        se.message = "the SE was deleted during the operation".into();
        return Ok(());
    };
    let same = status.get("command_id").and_then(Value::as_u64) == se.command_id;
    let step = status.get("state").and_then(Value::as_str).unwrap_or_default();
    let reason = status.get("reason").and_then(Value::as_str).unwrap_or_default().to_string();
    match (same, step) {
        (true, "DONE") => {
            se.state = if se.rolling_back { SeState::RolledBack } else { SeState::Completed };
            se.message = reason;
        }
        (true, "FAILED" | "ROLLED_BACK") => {
            se.state = SeState::Failed;
            se.message = format!("{step}: {reason}");
        }
        _ if se.deadline_unix.is_some_and(|d| now > d) => {
            se.state = SeState::Failed;
            se.message =
                format!("no result within {} s (the SE did not come back)", setting(app, "upgrade_se_timeout", 600));
        }
        _ => return Ok(()),
    }
    let task = if se.state == SeState::Failed { "SE_UPGRADE_ERROR" } else { "SE_UPGRADE_COMPLETE" };
    let message = format!("SE '{}': {}", se.name, se.message);
    g.events.push(event(task, message, Some(g.ses[i].state != SeState::Failed)));
    Ok(())
}
