//! The controller's steps on every node of the cluster. The leader's executor walks the nodes
//! for each step — followers first, itself last — doing its own share here and asking each
//! other node for its share through `POST /cluster-internal/controller-task`. Every share is
//! stored before it starts and after it ends, so a new leader carries the step on; each share
//! is idempotent (a slot that already holds the version is neither copied nor installed
//! again, a node already on the version is not restarted), so doing one twice is harmless.
//!
//! The restart: a node switches its active slot and re-executes with its listening socket
//! kept; the leader waits for it to be back, registered, on the new version. The leader's own
//! restart comes last: it stores that it began, switches, gives up its leadership (a follower,
//! already on the new version, takes over at once rather than after the lease runs out) and
//! re-executes; the new leader finds the step begun and waits for the old one to be back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_upgrade::Version;
use fulcrum_upgrade::operation::{CONTROLLER_STEPS, ControllerRun, NodeRun, Operation, RESTART_STEP};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::save;
use crate::app::{App, json_response};
use crate::error::ApiError;

pub const TASK_PATH: &str = "/cluster-internal/controller-task";
const POLL: Duration = Duration::from_millis(250);

/// A node's share of a step, as the leader asks for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskRequest {
    task: String,
    rollback: bool,
    to: Version,
    #[serde(default)]
    image_uuid: Option<String>,
}

/// This node's name in the cluster (a single node: its address, as the cluster views say).
pub fn this_node(app: &App) -> String {
    app.cluster.as_ref().map_or_else(|| app.listen.ip().to_string(), |m| m.me().node)
}

/// Every controller node of the cluster, for a new operation.
pub async fn this_cluster(app: &App) -> Vec<NodeRun> {
    crate::system::cluster_view(app)
        .await
        .nodes
        .into_iter()
        .map(|n| NodeRun { node: n.name, address: n.advertise, done: vec![], events: vec![] })
        .collect()
}

/// What version a node registered with.
fn registered_version(node: &fulcrum_store::election::NodeState) -> Option<Version> {
    serde_json::from_value(node.host.get("controller_version")?.clone()).ok()
}

/// Does `task` on every node that has not done it, storing each share. The outer `Err` is a
/// store that did not take the progress; the inner one a node's failure, naming it.
pub async fn every_node(
    app: &Arc<App>,
    op: &mut Operation,
    c: &mut ControllerRun,
    task: &str,
) -> Result<Result<String, String>, ApiError> {
    let me = this_node(app);
    let mut said = Vec::new();
    while let Some(i) = c.next_node(task, &me) {
        let node = c.nodes[i].clone();
        if !node.events.iter().any(|e| e.task == task && e.status.is_none()) {
            c.nodes[i].events.push(super::executor::event(task, String::new(), None));
            op.controller = Some(c.clone());
            save(app, op).await?;
        }
        tracing::info!(op = %op.id, task, node = %node.node, "controller step on a node");
        let outcome =
            if node.node == me { here(app, op, c, task).await } else { elsewhere(app, op, c, &node, task).await };
        super::executor::end_event(&mut c.nodes[i].events, task, &outcome);
        match outcome {
            Ok(message) => {
                c.nodes[i].done.push(task.to_string());
                said.push(format!("{}: {message}", node.node));
            }
            Err(message) => {
                op.controller = Some(c.clone());
                return Ok(Err(format!("controller node {}: {message}", node.node)));
            }
        }
        op.controller = Some(c.clone());
        save(app, op).await?;
    }
    Ok(Ok(said.join("; ")))
}

/// This node's share.
async fn here(app: &Arc<App>, op: &Operation, c: &ControllerRun, task: &str) -> Result<String, String> {
    let slots = &app.upgrade.slots;
    if task == CONTROLLER_STEPS[RESTART_STEP] {
        if slots.running().version() == c.to {
            return Ok(format!("runs {}", c.to.label()));
        }
        let slot = slots.slot_of(&c.to).ok_or_else(|| format!("no controller slot holds {}", c.to.label()))?;
        slots.activate(&slot)?;
        tracing::info!(op = %op.id, slot, to = %c.to.label(), "controller switching slots; restarting");
        if let Some(membership) = &app.cluster {
            // Stored already (the step's start): the next leader carries on from there.
            membership.cluster.election.resign().await;
        }
        return Err(slots.restart_process());
    }
    let (app, task, rollback, to, image) =
        (app.clone(), task.to_string(), op.ops.is_rollback(), c.to.clone(), c.image_uuid.clone());
    tokio::task::spawn_blocking(move || super::executor::node_task(&app, &task, rollback, &to, image.as_deref()))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

/// Why asking a node did not give its answer.
enum Asked {
    /// Not reached, or it could not take it now: ask again.
    Unreachable(String),
    /// It tried and failed.
    Failed(String),
}

/// Another node's share: asked of it once it is up; a restart is done when the node is back
/// on the new version. Bounded by `upgrade_controller_node_timeout`.
async fn elsewhere(
    app: &Arc<App>,
    op: &Operation,
    c: &ControllerRun,
    node: &NodeRun,
    task: &str,
) -> Result<String, String> {
    let Some(membership) = app.cluster.clone() else { return Err("this controller is not in a cluster".into()) };
    let limit = Duration::from_secs(super::executor::setting(app, "upgrade_controller_node_timeout", 300));
    let deadline = Instant::now() + limit;
    let restart = task == CONTROLLER_STEPS[RESTART_STEP];
    // The registration that was up when the restart was asked for: only another one is back.
    let mut asked_to_restart: Option<Option<i64>> = None;
    let mut last_problem = "it is down".to_string();
    while Instant::now() < deadline {
        let state = membership.nodes().await.ok().and_then(|nodes| nodes.into_iter().find(|n| n.name == node.node));
        if let Some(state) = state.filter(|n| n.up) {
            let version = registered_version(&state);
            let registered_again = asked_to_restart.is_some_and(|before| before != state.incarnation);
            if restart && version.as_ref() == Some(&c.to) && (asked_to_restart.is_none() || registered_again) {
                return Ok(format!("back on {}", c.to.label()));
            }
            if asked_to_restart.is_none() {
                let request = TaskRequest {
                    task: task.into(),
                    rollback: op.ops.is_rollback(),
                    to: c.to.clone(),
                    image_uuid: c.image_uuid.clone(),
                };
                match ask(app, &state, &request, deadline).await {
                    Ok((message, restarting)) if !restart || !restarting => return Ok(message),
                    Ok((message, _)) => {
                        tracing::info!(node = %node.node, %message, "controller node restarting");
                        asked_to_restart = Some(state.incarnation);
                        last_problem = format!("it did not come back on {}", c.to.label());
                    }
                    Err(Asked::Failed(message)) => return Err(message),
                    Err(Asked::Unreachable(message)) => last_problem = message,
                }
            } else if let Some(v) = version.filter(|v| *v != c.to && registered_again) {
                last_problem = format!("it is up again, on {} rather than {}", v.label(), c.to.label());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    Err(format!("{last_problem} (within {}s)", limit.as_secs()))
}

/// `POST /cluster-internal/controller-task` on `node`; its message, and whether it is
/// restarting (rather than already on the version).
async fn ask(
    app: &App,
    node: &fulcrum_store::election::NodeState,
    request: &TaskRequest,
    deadline: Instant,
) -> Result<(String, bool), Asked> {
    let secret = crate::cluster::secret(app).ok_or_else(|| Asked::Unreachable("no cluster secret yet".into()))?;
    let body = serde_json::to_vec(request).map_err(|e| Asked::Failed(e.to_string()))?;
    let exchange = async {
        let (mut sender, authority) =
            crate::forward::connect(&node.advertise, node.pin.as_deref()).await.map_err(Asked::Unreachable)?;
        let http = Request::post(TASK_PATH)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(crate::cluster::SECRET_HEADER, secret)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Asked::Failed(e.to_string()))?;
        let answer = sender.send_request(http).await.map_err(|e| Asked::Unreachable(e.to_string()))?;
        let status = answer.status();
        let bytes = answer.into_body().collect().await.map_err(|e| Asked::Unreachable(e.to_string()))?.to_bytes();
        let said: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let text = |field: &str| said.get(field).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        match status {
            StatusCode::OK => Ok((text("message"), said["restarting"] == json!(true))),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::NOT_FOUND => {
                Err(Asked::Unreachable(format!("{status} {}", text("error"))))
            }
            _ => Err(Asked::Failed(text("error"))),
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, exchange).await.unwrap_or_else(|_| Err(Asked::Unreachable("no answer in time".into())))
}

/// `POST /cluster-internal/controller-task` (with the cluster's secret): this node's share of a
/// controller step, asked by the leader. A restart answers first and re-executes just after.
pub async fn controller_task(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let result: Result<Response, ApiError> = async {
        if app.cluster.is_none() || !crate::cluster::from_peer(&app, &headers) {
            return Err(ApiError::not_found("no such path"));
        }
        let request: TaskRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid controller task: {e}")))?;
        let slots = &app.upgrade.slots;
        let mut restarting = false;
        let message = if request.task == CONTROLLER_STEPS[RESTART_STEP] {
            if slots.running().version() == request.to {
                format!("runs {}", request.to.label())
            } else {
                restarting = true;
                let slot = slots
                    .slot_of(&request.to)
                    .ok_or_else(|| ApiError::conflict(format!("no controller slot holds {}", request.to.label())))?;
                slots.activate(&slot).map_err(ApiError::internal)?;
                let app = app.clone();
                tokio::spawn(async move {
                    // The answer leaves first.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let error = app.upgrade.slots.restart_process();
                    tracing::error!(%error, "cannot restart into the new slot");
                });
                format!("restarting into slot {slot}")
            }
        } else {
            let app2 = app.clone();
            tokio::task::spawn_blocking(move || {
                super::executor::node_task(
                    &app2,
                    &request.task,
                    request.rollback,
                    &request.to,
                    request.image_uuid.as_deref(),
                )
            })
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::conflict)?
        };
        Ok(json_response(StatusCode::OK, &json!({ "message": message, "restarting": restarting })))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
