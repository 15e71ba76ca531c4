//! Upgrade orchestration on the controller: the operation endpoints (`/api/upgrade`,
//! `/api/patch`, `/api/rollback`, `/api/rollbackpatch`, `/api/segroup/resume`, each with a
//! `/preview` twin), the stored operations, and the executor that drives them. The rules —
//! prechecks and the operation's state — are in the pure `fulcrum-upgrade` crate.

pub mod backup;
mod executor;
pub(crate) mod facts;
pub mod nodes;
pub mod slots;
mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::http::StatusCode;
use axum::response::Response;
use fulcrum_schema::refs;
use fulcrum_store::{Catalogue, Stored};
use fulcrum_upgrade::checks::{self, Level};
use fulcrum_upgrade::operation::{ControllerRun, Event, GroupRun, GroupState, OpState, Operation, SeRun, SeState};
use fulcrum_upgrade::{ActionOnError, ImageFacts, Ops, Version};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;

pub use executor::run;
pub use status::{status_info, status_summary};

use crate::app::{App, RequestContext, json_response};
use crate::error::ApiError;
use crate::images::record::RunningVersion;
use crate::version::rfc3339;

/// Stored operations (an internal kind: read through the status endpoints).
pub const OP_KIND: &str = "upgradeop";
const GROUP_KIND: &str = "serviceenginegroup";

pub struct Upgrades {
    pub slots: slots::ControllerSlots,
    wake: Notify,
    /// While the controller's part of an operation runs, configuration writes are refused.
    controller_busy: AtomicBool,
    /// One operation request at a time, so two cannot both pass "nothing in progress".
    starting: tokio::sync::Mutex<()>,
}

impl Upgrades {
    pub fn open(data_dir: &std::path::Path, cat: &Catalogue) -> Result<Upgrades, String> {
        backup::remove_partial(data_dir);
        let upgrades = Upgrades {
            slots: slots::ControllerSlots::open(data_dir)?,
            wake: Notify::new(),
            controller_busy: AtomicBool::new(false),
            starting: tokio::sync::Mutex::new(()),
        };
        // Before the first request: a restart in the middle of the controller's part keeps
        // configuration closed.
        upgrades.set_controller_busy(current(cat).is_some_and(|op| controller_running(&op)));
        Ok(upgrades)
    }

    /// Configuration closes as soon as a node leads an operation whose controller part runs
    /// (before the executor's first pass, which keeps it so).
    pub fn take_over(&self, cat: &Catalogue) {
        self.set_controller_busy(current(cat).is_some_and(|op| controller_running(&op)));
    }

    fn set_controller_busy(&self, busy: bool) {
        self.controller_busy.store(busy, Ordering::Release);
    }

    /// 403 while the controller itself is upgrading.
    pub fn refuse_config_write(&self) -> Result<(), ApiError> {
        if self.controller_busy.load(Ordering::Acquire) {
            Err(ApiError::forbidden("Configuration is disallowed during upgrade"))
        } else {
            Ok(())
        }
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Versions an operation that is not over is taking nodes to (their images are in use).
    pub fn images_in_use(&self, cat: &Catalogue) -> Vec<(String, RunningVersion)> {
        let mut out = Vec::new();
        for op in operations(cat).into_iter().filter(|o| matches!(o.state, OpState::InProgress | OpState::Suspended)) {
            let who = format!("the {} operation {} in progress", op.ops.as_str(), op.id);
            let targets = op
                .controller
                .iter()
                .map(|c| c.to.clone())
                .chain(op.groups.iter().flat_map(|g| g.ses.iter().filter_map(|s| s.to.clone())));
            for v in targets {
                out.push((who.clone(), RunningVersion { version: v.version, build: v.build, patch: v.patch }));
            }
        }
        out
    }
}

fn controller_running(op: &Operation) -> bool {
    op.is_running() && op.controller.as_ref().is_some_and(|c| c.state == OpState::InProgress)
}

/// Every stored operation, oldest first.
pub fn operations(cat: &Catalogue) -> Vec<Operation> {
    let mut ops: Vec<Operation> =
        cat.iter(OP_KIND).filter_map(|s| serde_json::from_value(s.value.get("op")?.clone()).ok()).collect();
    ops.sort_by(|a, b| a.id.cmp(&b.id));
    ops
}

/// The operation that is running, if any.
pub fn current(cat: &Catalogue) -> Option<Operation> {
    operations(cat).into_iter().find(Operation::is_running)
}

async fn save(app: &App, op: &Operation) -> Result<(), ApiError> {
    let (id, value) = (op.id.clone(), json!({"op": op}));
    app.store
        .write(move |txn| {
            txn.put(OP_KIND, &id, value);
            Ok::<_, ApiError>(())
        })
        .await?;
    Ok(())
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

/// `se_group_options`.
#[derive(Debug, Default, Deserialize)]
struct GroupOptions {
    #[serde(default)]
    action_on_error: Option<ActionOnError>,
    #[serde(default)]
    disruptive: Option<bool>,
}

/// The union of the product's parameter objects (ref style and legacy uuid style).
#[derive(Debug, Default, Deserialize)]
struct Params {
    #[serde(default, alias = "image_uuid")]
    image_ref: Option<String>,
    #[serde(default, alias = "controller_patch_uuid")]
    controller_patch_ref: Option<String>,
    #[serde(default, alias = "se_patch_uuid")]
    se_patch_ref: Option<String>,
    #[serde(default, alias = "se_group_uuids")]
    se_group_refs: Vec<String>,
    #[serde(default)]
    system: bool,
    #[serde(default)]
    skip_warnings: bool,
    #[serde(default)]
    prechecks_only: bool,
    #[serde(default)]
    se_group_options: Option<GroupOptions>,
    #[serde(default)]
    disruptive: Option<bool>,
}

/// Which operation a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Upgrade,
    Patch,
    Rollback,
    RollbackPatch,
    Resume,
}

impl Which {
    pub fn parse(segments: &[&str]) -> Option<(Which, bool)> {
        let (which, rest) = match segments {
            ["upgrade", rest @ ..] => (Which::Upgrade, rest),
            ["patch", rest @ ..] => (Which::Patch, rest),
            ["rollback", rest @ ..] => (Which::Rollback, rest),
            ["rollbackpatch", rest @ ..] => (Which::RollbackPatch, rest),
            ["segroup", "resume", rest @ ..] => (Which::Resume, rest),
            _ => return None,
        };
        match rest {
            [] => Some((which, false)),
            ["preview"] => Some((which, true)),
            _ => None,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Which::Upgrade => "upgrade",
            Which::Patch => "patch",
            Which::Rollback => "rollback",
            Which::RollbackPatch => "rollbackpatch",
            Which::Resume => "segroup/resume",
        }
    }

    fn ops(self) -> Ops {
        match self {
            Which::Upgrade => Ops::Upgrade,
            Which::Patch => Ops::Patch,
            Which::Rollback => Ops::Rollback,
            Which::RollbackPatch => Ops::Rollbackpatch,
            Which::Resume => Ops::SegroupResume,
        }
    }
}

/// An image record by reference, uuid or name.
fn image_record<'a>(cat: &'a Catalogue, field: &str, reference: &str) -> Result<&'a std::sync::Arc<Stored>, ApiError> {
    let kind = crate::images::KIND;
    let found = match refs::parse(kind, reference) {
        Ok(refs::RefTarget::Uuid { uuid, .. }) => {
            cat.get(kind, &uuid).or_else(|| cat.iter(kind).find(|i| i.meta.name.as_deref() == Some(uuid.as_str())))
        }
        Ok(refs::RefTarget::Name { name, .. }) => {
            cat.iter(kind).find(|i| i.meta.name.as_deref() == Some(name.as_str()))
        }
        Err(e) => return Err(ApiError::bad_request(format!("field '{field}': {e}"))),
    };
    let image = found.ok_or_else(|| ApiError::bad_request(format!("field '{field}': no image '{reference}'")))?;
    if !crate::images::record::is_completed(&image.value) {
        return Err(ApiError::conflict(format!("image '{reference}' is still being uploaded")));
    }
    Ok(image)
}

fn group_uuid(cat: &Catalogue, reference: &str) -> Result<String, ApiError> {
    let found = match refs::parse(GROUP_KIND, reference) {
        Ok(refs::RefTarget::Uuid { uuid, .. }) => cat
            .get(GROUP_KIND, &uuid)
            .or_else(|| cat.iter(GROUP_KIND).find(|g| g.meta.name.as_deref() == Some(uuid.as_str()))),
        Ok(refs::RefTarget::Name { name, .. }) => {
            cat.iter(GROUP_KIND).find(|g| g.meta.name.as_deref() == Some(name.as_str()))
        }
        Err(e) => return Err(ApiError::bad_request(format!("field 'se_group_refs': {e}"))),
    };
    found
        .map(|g| g.uuid.clone())
        .ok_or_else(|| ApiError::bad_request(format!("field 'se_group_refs': no SE group '{reference}'")))
}

/// (operation's scope, its product status code, its sentence).
fn started(ops: Ops, controller: bool, groups: bool, system: bool) -> (String, String) {
    let (verb, code) = match ops {
        Ops::Upgrade => ("Upgrade", "UPGRADE"),
        Ops::Patch => ("Patch", "PATCH"),
        Ops::Rollback => ("Rollback", "ROLLBACK"),
        Ops::Rollbackpatch => ("Rollback of the patch", "ROLLBACKPATCH"),
        Ops::SegroupResume => {
            return (
                "SYSERR_PATCHSEGROUP_RESUME_STARTED".into(),
                "Resume of SEGroup(s) started. Use 'show upgrade status' to check the status.".into(),
            );
        }
    };
    let (scope, what) = match (system || (controller && groups), controller) {
        (true, _) => ("SYSTEM", "System (Controller + All SEGroup(s))"),
        (false, true) => ("CONTROLLER", "Controller"),
        (false, false) => ("SEGROUP", "SEGroup(s)"),
    };
    (
        format!("SYSERR_{code}_{scope}_STARTED"),
        format!("{verb} of {what} started. Use 'show upgrade status' to check the status."),
    )
}

/// `POST /api/{upgrade|patch|rollback|rollbackpatch|segroup/resume}[/preview]`.
pub async fn operate(
    app: &App,
    ctx: &RequestContext,
    which: Which,
    preview: bool,
    body: &[u8],
) -> Result<Response, ApiError> {
    if !ctx.principal.is_superuser() {
        return Err(ApiError::forbidden("upgrade operations need PERMISSION_UPGRADE_OPS (an administrator)"));
    }
    if !preview {
        crate::cluster::require_leader(&app.role(), "An upgrade operation")?;
    }
    let params: Params = if body.iter().all(u8::is_ascii_whitespace) {
        Params::default()
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid parameters: {e}")))?
    };
    let _one_at_a_time = app.upgrade.starting.lock().await;
    let ops = which.ops();
    let (request, images) = build_request(app, which, &params)?;
    let facts = facts::gather(app, &request).await;
    let checks = checks::run(&request, &facts);
    let preview = preview || params.prechecks_only;
    if preview {
        return Ok(json_response(
            StatusCode::OK,
            &json!({
                "status_code": "SYSERR_UPGRADE_OPS_PREVIEW_RESPONSE",
                "status": "Checks preview for upgrade operations.",
                "checks": checks,
            }),
        ));
    }
    let verdict = checks::verdict(&checks, params.skip_warnings);
    let (code, sentence) = started(ops, request.controller, !request.groups.is_empty(), params.system);
    let cat_groups: Vec<(String, String)> = {
        let cat = app.store.read();
        request
            .groups
            .iter()
            .map(|g| (g.clone(), cat.get(GROUP_KIND, g).and_then(|s| s.meta.name.clone()).unwrap_or_default()))
            .collect()
    };
    let op_id = format!(
        "upgradeop-{:020}",
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_micros()
    );
    if verdict != Level::Success {
        let (state, status_code, why) = match verdict {
            Level::Error => (
                OpState::PreCheckError,
                "UPGRADE_PRE_CHECK_ERROR",
                "prechecks failed with errors, which cannot be skipped",
            ),
            _ => (
                OpState::PreCheckWarning,
                "UPGRADE_PRE_CHECK_WARNING",
                "prechecks raised warnings: review them and repeat with skip_warnings",
            ),
        };
        // The refusal is kept: status shows PRE_CHECK_WARNING / PRE_CHECK_ERROR.
        let refused = Operation {
            id: op_id,
            ops,
            system: params.system,
            state,
            action_on_error: request.action_on_error,
            disruptive: request.disruptive,
            image_name: images.clone(),
            controller: None,
            groups: Vec::new(),
            checks: checks.clone(),
            start_time: now(),
            end_time: Some(now()),
            reason: why.into(),
        };
        let mut refused = refused;
        refused.groups = cat_groups
            .iter()
            .map(|(uuid, name)| GroupRun {
                uuid: uuid.clone(),
                name: name.clone(),
                state: GroupState::NotStarted,
                image_uuid: None,
                ses: vec![],
                disrupted_vs: vec![],
                events: vec![],
                reason: why.into(),
            })
            .collect();
        if request.controller {
            refused.controller = Some(ControllerRun {
                state: OpState::NotStarted,
                from: facts.controller.clone(),
                to: facts.controller.clone(),
                image_uuid: None,
                step: 0,
                step_started: false,
                events: vec![],
                nodes: vec![],
            });
        }
        save(app, &refused).await?;
        let failing: Vec<&checks::CheckResult> = checks.iter().filter(|c| c.state != Level::Success).collect();
        let mut body = json!({
            "error": format!("{} not started: {why}", ops.as_str()),
            "status_code": status_code,
            "checks": failing,
        });
        body["all_checks"] = json!(checks);
        return Ok(json_response(StatusCode::BAD_REQUEST, &body));
    }
    let op = if which == Which::Resume {
        resume(app, &request.groups).await?
    } else {
        let op = new_operation(app, op_id, &request, &params, &facts, checks.clone(), images);
        save(app, &op).await?;
        op
    };
    app.upgrade.wake();
    tracing::info!(op = %op.id, ops = op.ops.as_str(), "upgrade operation started");
    Ok(json_response(
        StatusCode::OK,
        &json!({"status_code": code, "status": sentence, "uuid": op.id, "checks": checks}),
    ))
}

/// Images, groups and scope of a request.
fn build_request(app: &App, which: Which, params: &Params) -> Result<(checks::Request, Option<String>), ApiError> {
    let cat = app.store.read();
    let mut groups: Vec<String> = params.se_group_refs.iter().map(|r| group_uuid(&cat, r)).collect::<Result<_, _>>()?;
    if params.system {
        groups = cat.iter(GROUP_KIND).map(|g| g.uuid.clone()).collect();
    }
    groups.dedup();
    let options = params.se_group_options.as_ref();
    let action_on_error = options.and_then(|o| o.action_on_error).unwrap_or_default();
    let disruptive = options.and_then(|o| o.disruptive).or(params.disruptive).unwrap_or(false);
    let facts_of =
        |field: &str, reference: &Option<String>, side: facts::Side| -> Result<Option<ImageFacts>, ApiError> {
            match reference {
                None => Ok(None),
                Some(r) => Ok(Some(facts::image_facts(app, &cat, image_record(&cat, field, r)?, side))),
            }
        };
    let (controller, controller_image, se_image, name) = match which {
        Which::Upgrade => {
            let reference = params
                .image_ref
                .clone()
                .ok_or_else(|| ApiError::bad_request("field 'image_ref': is required (the image to upgrade to)"))?;
            if params.controller_patch_ref.is_some() || params.se_patch_ref.is_some() {
                return Err(ApiError::bad_request(
                    "an upgrade takes one image: use a bundle that carries the patches, or patch after upgrading",
                ));
            }
            let controller = params.system || groups.is_empty();
            let c = facts_of("image_ref", &Some(reference.clone()), facts::Side::Controller)?;
            let s = facts_of("image_ref", &Some(reference), facts::Side::Se)?;
            let name = c.as_ref().map(|i| i.name.clone());
            (controller, c.filter(|_| controller), s.filter(|_| !groups.is_empty()), name)
        }
        Which::Patch => {
            if params.controller_patch_ref.is_none() && params.se_patch_ref.is_none() {
                return Err(ApiError::bad_request("a patch needs controller_patch_ref, se_patch_ref or both"));
            }
            let controller = params.controller_patch_ref.is_some() && (params.system || groups.is_empty());
            if params.se_patch_ref.is_some() && groups.is_empty() && !params.system {
                return Err(ApiError::bad_request("field 'se_group_refs': which SE groups should take the SE patch?"));
            }
            let c = facts_of("controller_patch_ref", &params.controller_patch_ref, facts::Side::Controller)?;
            let s = facts_of("se_patch_ref", &params.se_patch_ref, facts::Side::Se)?;
            if s.is_none() {
                groups.clear();
            }
            let name = c.as_ref().or(s.as_ref()).map(|i| i.name.clone());
            (controller, c, s, name)
        }
        Which::Rollback | Which::RollbackPatch => (params.system || groups.is_empty(), None, None, None),
        Which::Resume => {
            if groups.is_empty() {
                return Err(ApiError::bad_request("field 'se_group_refs': name the SE groups to resume"));
            }
            let image = operations(&cat)
                .into_iter()
                .rev()
                .find(|o| o.state == OpState::Suspended && o.groups.iter().any(|g| groups.contains(&g.uuid)))
                .and_then(|o| o.groups.iter().find_map(|g| g.image_uuid.clone()));
            let s = match image {
                Some(uuid) => {
                    cat.get(crate::images::KIND, &uuid).map(|i| facts::image_facts(app, &cat, i, facts::Side::Se))
                }
                None => None,
            };
            (false, None, s, None)
        }
    };
    let request = checks::Request {
        ops: which.ops(),
        controller,
        groups,
        controller_image,
        se_image,
        action_on_error,
        disruptive,
    };
    Ok((request, name))
}

fn new_operation(
    app: &App,
    id: String,
    request: &checks::Request,
    params: &Params,
    facts: &checks::Facts,
    checks: Vec<checks::CheckResult>,
    image_name: Option<String>,
) -> Operation {
    let controller = request.controller.then(|| {
        let to = match (&request.controller_image, request.ops) {
            (Some(i), _) => i.target.clone(),
            (None, _) => facts.controller_previous.clone().unwrap_or_else(|| facts.controller.clone()),
        };
        ControllerRun {
            state: OpState::InProgress,
            from: facts.controller.clone(),
            to,
            image_uuid: request.controller_image.as_ref().map(|i| i.uuid.clone()),
            step: 0,
            step_started: false,
            events: vec![],
            // Filled with the cluster's nodes when the executor starts the controller's part.
            nodes: vec![],
        }
    });
    let groups = facts
        .groups
        .iter()
        .filter(|g| request.groups.contains(&g.uuid))
        .map(|g| GroupRun {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            state: GroupState::NotStarted,
            image_uuid: request.se_image.as_ref().map(|i| i.uuid.clone()),
            ses: g
                .ses
                .iter()
                .map(|s| {
                    let to = match request.ops {
                        Ops::Rollback | Ops::Rollbackpatch => s.previous.clone(),
                        _ => request.se_image.as_ref().map(|i| i.target.clone()),
                    };
                    SeRun {
                        uuid: s.uuid.clone(),
                        name: s.name.clone(),
                        state: SeState::NotStarted,
                        from: s.running.clone(),
                        to,
                        command_id: None,
                        deadline_unix: None,
                        rolling_back: false,
                        message: String::new(),
                    }
                })
                .collect(),
            disrupted_vs: vec![],
            events: vec![],
            reason: String::new(),
        })
        .collect();
    let _ = app;
    Operation {
        id,
        ops: request.ops,
        system: params.system,
        state: OpState::InProgress,
        action_on_error: request.action_on_error,
        disruptive: request.disruptive,
        image_name,
        controller,
        groups,
        checks,
        start_time: now(),
        end_time: None,
        reason: String::new(),
    }
}

/// Takes the suspended operation holding `groups` up again.
async fn resume(app: &App, groups: &[String]) -> Result<Operation, ApiError> {
    let mut op = operations(&app.store.read())
        .into_iter()
        .rev()
        .find(|o| o.state == OpState::Suspended && o.groups.iter().any(|g| groups.contains(&g.uuid)))
        .ok_or_else(|| ApiError::conflict("no suspended operation holds these SE groups"))?;
    for g in op.groups.iter_mut().filter(|g| groups.contains(&g.uuid) && g.state == GroupState::Suspended) {
        g.resume();
        g.events.push(Event {
            task: "SEGROUP_RESUME".into(),
            start_time: now(),
            end_time: Some(now()),
            status: Some(true),
            message: "resumed".into(),
        });
    }
    op.state = OpState::InProgress;
    op.reason.clear();
    save(app, &op).await?;
    Ok(op)
}

/// The versions a stored value names, for the status objects.
fn label(v: &Option<Version>) -> Value {
    v.as_ref().map_or(Value::Null, |v| json!(v.label()))
}
