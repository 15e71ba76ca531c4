//! Sessions in the store: begun, used and ended on any node. The leader commits every change of
//! them; a follower asks the leader to (with the cluster's secret), as it passes on writes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::auth::{SESSION_KIND, SessionRecord, SessionUse, now_ms, session_key};
use crate::cluster::NodeRole;
use crate::error::ApiError;
use fulcrum_store::Txn;

/// Where a follower sends its session changes on the leader.
pub const INTERNAL_PATH: &str = "/cluster-internal/sessions";

/// Session changes committed together.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SessionChanges {
    #[serde(default)]
    begin: Vec<(String, SessionRecord)>,
    /// (key, when it was used)
    #[serde(default)]
    used: Vec<(String, u64)>,
    #[serde(default)]
    end: Vec<String>,
}

impl SessionChanges {
    fn apply(self, txn: &mut Txn<'_>) {
        for (key, record) in self.begin {
            txn.put(SESSION_KIND, &key, record.to_value());
        }
        for (key, at) in self.used {
            if let Some(mut record) = txn.get(SESSION_KIND, &key).and_then(|s| SessionRecord::from_value(&s.value))
                && record.touched_ms < at
            {
                record.touched_ms = at;
                txn.put(SESSION_KIND, &key, record.to_value());
            }
        }
        for key in self.end {
            if txn.get(SESSION_KIND, &key).is_some() {
                txn.delete(SESSION_KIND, &key);
            }
        }
    }
}

/// Commits the changes here on the leader (or a single node), else on the leader through its
/// internal endpoint; durable when this returns `Ok`.
async fn commit(app: &App, changes: SessionChanges) -> Result<(), ApiError> {
    let membership = match (app.role(), &app.cluster) {
        (NodeRole::Follower { .. }, Some(membership)) => membership,
        _ => return commit_here(app, changes).await,
    };
    let hop = crate::cluster::Hop::new(app, membership, "internal".into());
    let body = serde_json::to_vec(&changes).map_err(|e| ApiError::internal(e.to_string()))?;
    let answer = crate::cluster::call_leader(membership, &hop, INTERNAL_PATH, body.into()).await?;
    if answer.status().is_success() {
        return Ok(());
    }
    let status = answer.status();
    let text = axum::body::to_bytes(answer.into_body(), 64 << 10).await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or_else(|| format!("the leader answered {status}"));
    Err(ApiError::new(status, message))
}

async fn commit_here(app: &App, changes: SessionChanges) -> Result<(), ApiError> {
    app.store
        .write(move |txn| {
            changes.apply(txn);
            Ok::<_, ApiError>(())
        })
        .await?;
    Ok(())
}

/// Begins a session of the user, stored before the login is answered: (session id, record).
pub async fn begin(app: &App, user_uuid: &str, password_hash: &str) -> Result<(String, SessionRecord), ApiError> {
    let (id, record) = SessionRecord::begin(user_uuid, password_hash, now_ms());
    let changes = SessionChanges { begin: vec![(session_key(&id), record.clone())], ..Default::default() };
    commit(app, changes).await?;
    Ok((id, record))
}

pub async fn end(app: &App, id: &str) -> Result<(), ApiError> {
    let key = session_key(id);
    app.sessions.forget(&key);
    if app.store.read().get(SESSION_KIND, &key).is_none() {
        return Ok(());
    }
    commit(app, SessionChanges { end: vec![key], ..Default::default() }).await
}

/// The live session with this id. A use is recorded in the store now and then (not on every
/// request), in the background: the request does not wait for it.
pub fn check(app: &Arc<App>, id: &str, idle_timeout: Option<std::time::Duration>) -> Option<SessionRecord> {
    let key = session_key(id);
    let record = SessionRecord::from_value(&app.store.read().get(SESSION_KIND, &key)?.value)?;
    let now = now_ms();
    match app.sessions.use_session(&key, &record, idle_timeout, now) {
        SessionUse::Idle => None,
        SessionUse::Live { record: false } => Some(record),
        SessionUse::Live { record: true } => {
            let app = app.clone();
            tokio::spawn(async move {
                let changes = SessionChanges { used: vec![(key.clone(), now)], ..Default::default() };
                if let Err(e) = commit(&app, changes).await {
                    tracing::debug!(error = %e, "cannot record a session's use; the next use tries again");
                }
                app.sessions.recorded(&key);
            });
            Some(record)
        }
    }
}

/// Keeps the session `id` valid across its own user's new password, in the transaction that
/// stores the password (the user's other sessions no longer match it and end).
pub fn rebind_in(txn: &mut Txn<'_>, id: &str, password_hash: &str) {
    let key = session_key(id);
    if let Some(mut record) = txn.get(SESSION_KIND, &key).and_then(|s| SessionRecord::from_value(&s.value)) {
        record.credential = crate::auth::credential_stamp(password_hash);
        txn.put(SESSION_KIND, &key, record.to_value());
    }
}

/// Ends, in the store, the sessions idle past the timeout or whose user is gone or has a new
/// password. Leader-only work: run by the leader services.
pub async fn sweep(app: &App, idle_timeout: Option<std::time::Duration>) -> Result<usize, ApiError> {
    let now = now_ms();
    let over: Vec<String> = {
        let cat = app.store.read();
        cat.iter(SESSION_KIND)
            .filter(|s| {
                let Some(record) = SessionRecord::from_value(&s.value) else { return true };
                let last = app.sessions.last_use(&s.uuid).unwrap_or(0).max(record.touched_ms);
                let idle = idle_timeout.is_some_and(|limit| now.saturating_sub(last) > limit.as_millis() as u64);
                let user = cat.get("user", &record.user_uuid);
                let hash = user.and_then(|u| u.value.get("_password_hash").and_then(|h| h.as_str()));
                idle || !hash.is_some_and(|h| record.matches_password(h))
            })
            .map(|s| s.uuid.clone())
            .collect()
    };
    if over.is_empty() {
        return Ok(0);
    }
    let count = over.len();
    commit(app, SessionChanges { end: over, ..Default::default() }).await?;
    Ok(count)
}

/// The leader's sweep of stored sessions, once a minute.
pub async fn run_sweeper(app: Arc<App>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        match sweep(&app, app.idle_timeout()).await {
            Ok(0) => {}
            Ok(ended) => tracing::debug!(ended, "ended idle sessions"),
            Err(e) => tracing::warn!(error = %e, "cannot end idle sessions"),
        }
    }
}

/// `POST /cluster-internal/sessions` on the leader: a follower's session changes.
pub async fn internal(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let result: Result<Response, ApiError> = async {
        if app.cluster.is_none() || !crate::cluster::from_peer(&app, &headers) {
            return Err(ApiError::not_found("no such path"));
        }
        if let NodeRole::Follower { leader } = app.role() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("this node is not the leader any more (the leader is {leader}); retry"),
            ));
        }
        let changes: SessionChanges = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid session changes: {e}")))?;
        commit_here(&app, changes).await?;
        Ok(crate::app::empty_ok())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
