//! `GET /api/upgradestatusinfo` and `/api/upgradestatussummary`: one object for the controller
//! cluster and one per SE group, built from the stored operations and what the nodes run.

use axum::http::StatusCode;
use axum::response::Response;
use fulcrum_store::Catalogue;
use fulcrum_upgrade::Version;
use fulcrum_upgrade::operation::{GroupRun, GroupState, OpState, Operation, SeState};
use serde_json::{Value, json};

use super::{GROUP_KIND, label, now, operations};
use crate::app::{App, RequestContext, json_response};
use crate::engines::SE_KIND;
use crate::error::ApiError;

const CONTROLLER_NODE: &str = "upgradestatusinfo-controller";

fn node_uuid(group: &str) -> String {
    format!("upgradestatusinfo-{group}")
}

fn state_value(state: &str, reason: &str) -> Value {
    json!({"state": state, "reason": reason, "last_changed_time": now()})
}

fn history(ops: &[&Operation], version_of: impl Fn(&Operation) -> Option<Version>) -> Vec<Value> {
    ops.iter()
        .rev()
        .map(|o| {
            json!({
                "ops": o.ops.as_str(),
                "uuid": o.id,
                "state": {"state": o.state.as_str(), "reason": o.reason},
                "version": label(&version_of(o)),
                "image": o.image_name,
                "start_time": o.start_time,
                "end_time": o.end_time,
            })
        })
        .collect()
}

fn readiness(op: &Operation) -> Value {
    json!({
        "upgrade_ops": op.ops.as_str(),
        "state": {"state": match op.state {
            OpState::PreCheckError => "UPGRADE_PRE_CHECK_ERROR",
            OpState::PreCheckWarning => "UPGRADE_PRE_CHECK_WARNING",
            _ => "UPGRADE_PRE_CHECK_SUCCESS",
        }},
        "checks": op.checks,
        "total_checks": op.checks.len(),
        "checks_completed": op.checks.len(),
    })
}

fn controller_node(app: &App, ctx: &RequestContext, cat: &Catalogue, ops: &[Operation]) -> Value {
    let mine: Vec<&Operation> = ops.iter().filter(|o| o.controller.is_some()).collect();
    let running = app.upgrade.slots.running();
    let previous = app.upgrade.slots.previous();
    let name = cat.iter("cluster").next().and_then(|c| c.meta.name.clone()).unwrap_or_else(|| "cluster-0-1".into());
    let mut node = json!({
        "uuid": CONTROLLER_NODE,
        "url": format!("{}/api/upgradestatusinfo/{CONTROLLER_NODE}", ctx.base_url),
        "name": name,
        "node_type": "NODE_CONTROLLER_CLUSTER",
        "version": running.version().base().label(),
        "patch_version": running.patch,
        "previous_version": previous.as_ref().map(|p| p.version().base().label()),
        "previous_patch_version": previous.as_ref().and_then(|p| p.patch.clone()),
        "enable_rollback": previous.is_some(),
        "state": state_value("UPGRADE_FSM_INIT", ""),
        "progress": 100,
        "history": history(&mine, |o| o.controller.as_ref().map(|c| c.to.clone())),
    });
    if let Some(op) = mine.last() {
        let c = op.controller.as_ref().expect("filtered");
        let (done, total) = c.tasks();
        let state = match (op.state, c.state) {
            (OpState::PreCheckError | OpState::PreCheckWarning, _) => op.state.as_str(),
            (_, s) => s.as_str(),
        };
        node["upgrade_ops"] = json!(op.ops.as_str());
        node["system"] = json!(op.system);
        node["state"] = state_value(state, &op.reason);
        node["progress"] = json!(if c.state == OpState::Completed { 100 } else { done * 100 / total });
        node["tasks_completed"] = json!(done);
        node["total_tasks"] = json!(total);
        node["start_time"] = json!(op.start_time);
        node["end_time"] = json!(op.end_time);
        node["image_ref"] = json!(c.image_uuid.as_ref().map(|u| format!("{}/api/image/{u}", ctx.base_url)));
        let ip = |address: &str| {
            let addr = crate::system::host_of(address);
            let family = if addr.contains(':') { "V6" } else { "V4" };
            json!({"addr": addr, "type": family})
        };
        let event = |e: &fulcrum_upgrade::operation::Event, ip: Value| json!({"start_time": e.start_time, "end_time": e.end_time, "status": e.status, "message": e.message, "ip": ip});
        let leader_ip = json!({"addr": app.listen.ip().to_string(), "type": "V4"});
        // Each step with every node's share of it (the product's nodes_events), and the step as
        // a whole (its sub_events).
        node["upgrade_events"] = json!(c
            .events
            .iter()
            .map(|e| {
                let nodes_events: Vec<Value> = c
                    .nodes
                    .iter()
                    .flat_map(|n| n.events.iter().filter(|ne| ne.task == e.task).map(|ne| event(ne, ip(&n.address))))
                    .collect();
                json!({"task_name": e.task, "nodes_events": nodes_events, "sub_events": [event(e, leader_ip.clone())]})
            })
            .collect::<Vec<_>>());
        // Fulcrum's view of each node's progress through its steps.
        let per_node = fulcrum_upgrade::operation::CONTROLLER_STEPS
            .iter()
            .filter(|s| **s != fulcrum_upgrade::operation::CLUSTER_WIDE_STEP)
            .count();
        node["controller_nodes"] = json!(c
            .nodes
            .iter()
            .map(|n| {
                let state = if n.events.iter().any(|e| e.status == Some(false)) {
                    "UPGRADE_FSM_ERROR"
                } else if n.done.len() >= per_node {
                    "UPGRADE_FSM_COMPLETED"
                } else if n.events.is_empty() {
                    "UPGRADE_FSM_INIT"
                } else {
                    "UPGRADE_FSM_IN_PROGRESS"
                };
                json!({
                    "name": n.node,
                    "ip": ip(&n.address),
                    "state": state,
                    "tasks_completed": n.done.len(),
                    "total_tasks": per_node,
                    "progress": n.done.len() * 100 / per_node,
                    "events": n.events.iter().map(|e| json!({"task_name": e.task, "start_time": e.start_time, "end_time": e.end_time, "status": e.status, "message": e.message})).collect::<Vec<_>>(),
                })
            })
            .collect::<Vec<_>>());
        node["upgrade_readiness"] = readiness(op);
        node["params"] = json!({"image_ref": op.image_name, "se_group_options": {"action_on_error": op.action_on_error.as_str(), "disruptive": op.disruptive}});
    }
    node
}

fn names(g: &GroupRun, states: &[SeState]) -> Vec<String> {
    g.ses.iter().filter(|s| states.contains(&s.state)).map(|s| s.name.clone()).collect()
}

fn group_node(ctx: &RequestContext, cat: &Catalogue, group: &fulcrum_store::Stored, ops: &[Operation]) -> Value {
    let uuid = node_uuid(&group.uuid);
    let mine: Vec<&Operation> = ops.iter().filter(|o| o.groups.iter().any(|g| g.uuid == group.uuid)).collect();
    // What the group's SEs run now.
    let group_ref = fulcrum_schema::refs::canonical(GROUP_KIND, &group.uuid);
    let ses: Vec<&std::sync::Arc<fulcrum_store::Stored>> = cat
        .iter(SE_KIND)
        .filter(|s| s.value.get("se_group_ref").and_then(Value::as_str) == Some(group_ref.as_str()))
        .collect();
    let mut versions: Vec<String> =
        ses.iter().filter_map(|s| super::facts::version_of_record(&s.value).map(|v| v.label())).collect();
    versions.sort();
    versions.dedup();
    let previous: Vec<String> = {
        let mut p: Vec<String> = ses
            .iter()
            .filter_map(|s| s.value.get("previous_version").and_then(Value::as_str).map(String::from))
            .collect();
        p.sort();
        p.dedup();
        p
    };
    let mut node = json!({
        "uuid": uuid,
        "url": format!("{}/api/upgradestatusinfo/{uuid}", ctx.base_url),
        "name": group.meta.name,
        "node_type": "NODE_SE_GROUP",
        "obj_cloud_ref": group.value.get("cloud_ref"),
        "version": versions.join(", "),
        "previous_version": previous.join(", "),
        "enable_rollback": !previous.is_empty(),
        "state": state_value("UPGRADE_FSM_INIT", ""),
        "progress": 100,
        "history": history(&mine, |o| o.groups.iter().find(|g| g.uuid == group.uuid).and_then(|g| g.ses.iter().find_map(|s| s.to.clone()))),
    });
    if let Some(op) = mine.last() {
        let g = op.groups.iter().find(|g| g.uuid == group.uuid).expect("filtered");
        let finished = g.ses.iter().filter(|s| s.state.is_final()).count();
        let progress =
            if g.ses.is_empty() || g.state == GroupState::Completed { 100 } else { finished * 100 / g.ses.len() };
        let group_state = serde_json::to_value(g.state).unwrap_or_default();
        let state = match op.state {
            OpState::PreCheckError | OpState::PreCheckWarning => op.state.as_str().to_string(),
            _ => match g.state {
                GroupState::NotStarted => "UPGRADE_FSM_WAITING",
                GroupState::InProgress => "UPGRADE_FSM_IN_PROGRESS",
                GroupState::Completed => "UPGRADE_FSM_COMPLETED",
                GroupState::Suspended => "UPGRADE_FSM_SUSPENDED",
                GroupState::Error => "UPGRADE_FSM_ERROR",
            }
            .to_string(),
        };
        node["upgrade_ops"] = json!(op.ops.as_str());
        node["system"] = json!(op.system);
        node["state"] = state_value(&state, &g.reason);
        node["progress"] = json!(progress);
        node["tasks_completed"] = json!(finished);
        node["total_tasks"] = json!(g.ses.len());
        node["start_time"] = json!(op.start_time);
        node["end_time"] = json!(op.end_time);
        node["image_ref"] = json!(g.image_uuid.as_ref().map(|u| format!("{}/api/image/{u}", ctx.base_url)));
        node["upgrade_readiness"] = readiness(op);
        node["se_upgrade_events"] = json!(g
            .events
            .iter()
            .map(|e| json!({"task": e.task, "start_time": e.start_time, "end_time": e.end_time, "status": e.status, "reason": [e.message]}))
            .collect::<Vec<_>>());
        node["seg_status"] = json!({
            "se_group_uuid": group.uuid,
            "se_group_name": group.meta.name,
            "state": group_state,
            "progress": progress,
            "num_se": g.ses.len(),
            "num_vs": cat.iter("virtualservice").filter(|v| v.value.get("se_group_ref").and_then(Value::as_str) == Some(group_ref.as_str())).count(),
            "num_vs_disrupted": g.disrupted_vs.len(),
            "disrupted_vs_ref": g.disrupted_vs,
            "traffic_status": if g.disrupted_vs.is_empty() { "TRAFFIC_NOT_DISRUPTED" } else { "TRAFFIC_DISRUPTED" },
            "se_upgrade_completed": names(g, &[SeState::Completed, SeState::RolledBack]),
            "se_upgrade_in_progress": names(g, &[SeState::InProgress, SeState::Draining]),
            "se_upgrade_failed": names(g, &[SeState::Failed]),
            "se_upgrade_not_started": names(g, &[SeState::NotStarted]),
            "se_already_upgraded_at_start": names(g, &[SeState::AlreadyUpgraded]),
            "se_upgrade_errors": g.ses.iter().filter(|s| s.state == SeState::Failed).map(|s| json!({"se_ref": s.uuid, "reason": [s.message]})).collect::<Vec<_>>(),
            "reason": [g.reason],
        });
    }
    node
}

fn nodes(app: &App, ctx: &RequestContext) -> Vec<Value> {
    let cat = app.store.read();
    let ops = operations(&cat);
    let mut out = vec![controller_node(app, ctx, &cat, &ops)];
    let mut groups: Vec<_> = cat.iter(GROUP_KIND).collect();
    groups.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
    out.extend(groups.into_iter().map(|g| group_node(ctx, &cat, g, &ops)));
    out
}

fn require_reader(ctx: &RequestContext) -> Result<(), ApiError> {
    // Every user may watch an upgrade; the nodes are the system's, not a tenant's.
    let _ = ctx;
    Ok(())
}

/// `GET /api/upgradestatusinfo[/<uuid>][?name=]`.
pub fn status_info(app: &App, ctx: &RequestContext, uuid: Option<&str>) -> Result<Response, ApiError> {
    require_reader(ctx)?;
    let mut all = nodes(app, ctx);
    if let Some(uuid) = uuid {
        let node = all
            .into_iter()
            .find(|n| n["uuid"] == uuid)
            .ok_or_else(|| ApiError::not_found(format!("upgradestatusinfo '{uuid}' not found")))?;
        return Ok(json_response(StatusCode::OK, &node));
    }
    if let Some(name) = ctx.param("name") {
        all.retain(|n| n["name"] == name);
    }
    Ok(json_response(StatusCode::OK, &json!({"count": all.len(), "results": all})))
}

/// `GET /api/upgradestatussummary`.
pub fn status_summary(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    require_reader(ctx)?;
    let fields = [
        "uuid",
        "url",
        "name",
        "node_type",
        "obj_cloud_ref",
        "upgrade_ops",
        "state",
        "version",
        "image_ref",
        "enable_rollback",
        "start_time",
        "end_time",
        "tasks_completed",
        "total_tasks",
        "progress",
    ];
    let results: Vec<Value> = nodes(app, ctx)
        .into_iter()
        .map(|n| Value::Object(fields.iter().filter_map(|f| Some((f.to_string(), n.get(*f)?.clone()))).collect()))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"count": results.len(), "results": results})))
}
