//! Asynchronous PATCH of pool servers: requests are validated and stored durably at once, then
//! merged every `async_patch_merge_period` seconds — all requests for one pool as one change.
//!
//! Unlike the product it is compatible with (whose queue lives in memory), an acknowledged
//! request survives a crash: each request is a stored record, applied after a restart.
//! A merge cycle does not rewrite its requests: it stores one outcome record (which requests it
//! applied, which failed and why) in the same transaction as the pools it changed. A request's
//! status is its record read through its cycle's outcome; both go when the outcome expires.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::Response;
use fulcrum_metrics::{Gauge, Histogram, LATENCY_BUCKETS, SIZE_BUCKETS};
use fulcrum_patch::merge::{Queued, merge_requests};
use fulcrum_patch::{Op, Patch};
use fulcrum_schema::{Registry, TypeDef, normalize_value};
use fulcrum_store::Stored;
use serde_json::{Value, json};

use crate::access::{ADMIN_TENANT, Level};
use crate::app::{App, RequestContext, json_response};
use crate::error::ApiError;
use crate::objects::{find_visible, require, resolve_fields};
use crate::version;

/// Store kind of queued requests (not an API type: reached through `/api/pool-async/...`).
pub const KIND: &str = "asyncpatch";
/// Store kind of merge cycle outcomes.
pub const CYCLE_KIND: &str = "asyncpatch-cycle";

pub static QUEUE_DEPTH: Gauge =
    Gauge::new("fulcrum_async_patch_queue_depth", "Async PATCH requests waiting for a merge.");
pub static MERGE_SECONDS: Histogram = Histogram::new(
    "fulcrum_async_patch_merge_seconds",
    "Time of one merge cycle, commit included.",
    "",
    LATENCY_BUCKETS,
);
pub static MERGED_PER_CYCLE: Histogram = Histogram::new(
    "fulcrum_async_patch_merged_per_cycle",
    "Async PATCH requests applied by one merge cycle.",
    "",
    SIZE_BUCKETS,
);

const STATUS_QUEUED: &str = "QUEUED";

/// How a merge cycle ended for the requests it took.
#[derive(Debug)]
struct CycleOutcome {
    cycle_id: String,
    finished: u64,
    /// patch id → (status code, message) of the requests that failed; the others succeeded.
    failed: HashMap<String, (u16, String)>,
    patch_ids: Vec<String>,
}

impl CycleOutcome {
    fn from_record(record: &Stored) -> CycleOutcome {
        let v = &record.value;
        let failed = v["failed"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, f)| {
                        let code = f["status_code"].as_u64().unwrap_or(400) as u16;
                        (id.clone(), (code, f["error_message"].as_str().unwrap_or_default().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let patch_ids =
            v["patch_ids"].as_array().into_iter().flatten().filter_map(|i| i.as_str().map(String::from)).collect();
        CycleOutcome { cycle_id: record.uuid.clone(), finished: v["finished"].as_u64().unwrap_or(0), failed, patch_ids }
    }
}

/// The merger's shared state. The window and the pending set are changed only inside writer
/// closures, so they stay in step with what is stored.
#[derive(Debug, Default)]
pub struct AsyncPatches {
    /// The `X-Avi-Version` of the requests queued in the current window (`Some(None)`: they sent
    /// none); `None` while the window is empty.
    window: Mutex<Option<Option<String>>>,
    /// Ids of stored requests no cycle has applied yet, in arrival order.
    pending: Mutex<BTreeSet<String>>,
    /// patch id → the outcome of the cycle that applied it.
    done: Mutex<HashMap<String, Arc<CycleOutcome>>>,
    /// Requests the running merge cycle has taken.
    in_progress: Mutex<HashSet<String>>,
    /// Serialises merge cycles (the timer's and explicit ones).
    cycle: tokio::sync::Mutex<()>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AsyncPatches {
    /// Rebuilds the state from stored requests and cycle outcomes (after a restart, and each
    /// time this node becomes the leader: what it remembers from an earlier leadership may have
    /// been merged since by another leader, and must not be merged again).
    pub fn recover(&self, requests: &[Arc<Stored>], cycles: &[Arc<Stored>]) {
        locked(&self.in_progress).clear();
        let mut done = locked(&self.done);
        done.clear();
        locked(&self.pending).clear();
        for cycle in cycles {
            let outcome = Arc::new(CycleOutcome::from_record(cycle));
            for id in &outcome.patch_ids {
                done.insert(id.clone(), outcome.clone());
            }
        }
        let mut pending = locked(&self.pending);
        pending.extend(requests.iter().filter(|r| !done.contains_key(&r.uuid)).map(|r| r.uuid.clone()));
        QUEUE_DEPTH.set(pending.len() as i64);
        let first = pending.iter().next().and_then(|id| requests.iter().find(|r| r.uuid == *id));
        *locked(&self.window) = first.map(|r| r.value["version"].as_str().map(String::from));
    }
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn refuse() -> ApiError {
    ApiError::bad_request(
        "async mode accepts only {\"add\": {\"servers\": [...]}} or {\"delete\": {\"servers\": [...]}} on a pool, \
         with IPv4 server addresses",
    )
}

/// `PATCH /api/pool/<uuid>?async_mode` while a merge period is set: validate, store, answer 202.
pub async fn accept(
    app: &App,
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    uuid: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    require(ctx, type_def, Level::Write)?;
    if type_def.path != "pool" {
        return Err(refuse());
    }
    let input: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    let (op, entries) = match fulcrum_patch::parse(&input, false).map_err(|e| ApiError::bad_request(e.to_string()))? {
        Patch::Classic { op: op @ (Op::Add | Op::Delete), fields } if fields.len() == 1 => {
            match fields.get("servers") {
                Some(Value::Array(entries)) if !entries.is_empty() => (op, entries.clone()),
                _ => return Err(refuse()),
            }
        }
        _ => return Err(refuse()),
    };
    let reg = Registry::get();
    let server = match &reg.schema("Pool").field("servers").expect("pools have servers").kind {
        fulcrum_schema::Kind::List(spec) => spec.item.clone(),
        _ => unreachable!("servers is a list"),
    };
    for (i, entry) in entries.iter().enumerate() {
        if entry.pointer("/ip/type").and_then(Value::as_str) != Some("V4") {
            return Err(ApiError::bad_request(format!(
                "field 'servers[{i}].ip': async mode accepts IPv4 servers only (type V4)"
            )));
        }
        normalize_value(reg, &server, entry, &format!("servers[{i}]"))?;
    }
    let pool = find_visible(&app.store.read(), ctx, type_def, uuid).map(|p| (p.uuid.clone(), p.meta.tenant.clone()))?;
    let version = ctx.header("x-avi-version").map(|v| v.trim().to_string());
    let created = version::rfc3339(SystemTime::now());
    let state = app.async_patches.clone();
    let (pool_uuid, tenant) = pool;
    let op_name = if op == Op::Add { "add" } else { "delete" };
    let patch_id = app
        .store
        .write(move |txn| {
            if txn.get("pool", &pool_uuid).is_none() {
                return Err(ApiError::not_found(format!("pool '{pool_uuid}' not found")));
            }
            let mut window = locked(&state.window);
            match &*window {
                Some(queued) if *queued != version => {
                    let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
                    return Err(ApiError::conflict(format!(
                        "all async PATCH requests queued within one merge period must carry the same API version \
                         (X-Avi-Version): the queue holds {}, this request has {}",
                        shown(queued),
                        shown(&version)
                    )));
                }
                _ => *window = Some(version.clone()),
            }
            // Strictly increasing and fixed-width: ids sort in arrival order.
            let patch_id = format!("{:020}", txn.timestamp_micros());
            txn.put(
                KIND,
                &patch_id,
                json!({
                    "uuid": patch_id, "pool_uuid": pool_uuid, "tenant": tenant, "op": op_name,
                    "servers": entries, "version": version, "created": created,
                }),
            );
            locked(&state.pending).insert(patch_id.clone());
            Ok(patch_id)
        })
        .await?;
    QUEUE_DEPTH.set(locked(&app.async_patches.pending).len() as i64);
    Ok(json_response(StatusCode::ACCEPTED, &json!({"patch_id": patch_id, "uuid": uuid, "status": STATUS_QUEUED})))
}

/// `GET /api/pool-async/status/<patch_id>`.
pub fn status(app: &App, ctx: &RequestContext, patch_id: &str) -> Result<Response, ApiError> {
    let cat = app.store.read();
    let not_found = || ApiError::not_found(format!("async PATCH '{patch_id}' not found (unknown or expired)"));
    let record = cat.get(KIND, patch_id).ok_or_else(not_found)?;
    let tenant = record.value["tenant"].as_str().unwrap_or(ADMIN_TENANT);
    if ctx.principal.level(tenant, "pool") < Level::Read {
        return Err(not_found());
    }
    let v = &record.value;
    let mut body = json!({"patch_id": patch_id, "uuid": v["pool_uuid"], "created": v["created"]});
    // The leader's merger knows every outcome; another node finds it among the stored cycles.
    let outcome = locked(&app.async_patches.done).get(patch_id).cloned().or_else(|| {
        cat.iter(CYCLE_KIND)
            .map(|c| CycleOutcome::from_record(c))
            .find(|outcome| outcome.patch_ids.iter().any(|id| id == patch_id))
            .map(Arc::new)
    });
    match outcome {
        Some(outcome) => {
            body["finished"] = json!(version::rfc3339(UNIX_EPOCH + Duration::from_micros(outcome.finished)));
            match outcome.failed.get(patch_id) {
                None => {
                    body["status"] = json!("SUCCESS");
                    body["status_code"] = json!(200);
                }
                Some((code, message)) => {
                    body["status"] = json!("FAIL");
                    body["status_code"] = json!(code);
                    body["error_message"] = json!(message);
                }
            }
        }
        None if locked(&app.async_patches.in_progress).contains(patch_id) => body["status"] = json!("IN_PROGRESS"),
        None => body["status"] = json!(STATUS_QUEUED),
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// What one merge cycle did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct MergeReport {
    pub merged: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub pools: usize,
    pub expired: usize,
}

/// Runs one merge cycle: applies every queued request (per pool, in arrival order, as one
/// change), records each outcome, and drops finished statuses older than the cleanup duration.
/// `now` decides expiry (the timer passes the real time; an operator or a test may pass another).
pub async fn merge_cycle(app: &App, now: SystemTime) -> Result<MergeReport, ApiError> {
    let state = app.async_patches.clone();
    let _one_at_a_time = state.cycle.lock().await;
    let started = Instant::now();
    let cleanup_minutes = app
        .setting("controllerproperties", "/async_patch_request_cleanup_duration")
        .and_then(|v| v.as_u64())
        .unwrap_or(60);
    let expire_before = micros(now).saturating_sub(cleanup_minutes * 60 * 1_000_000);
    let finished_at = micros(now);
    let shared = state.clone();
    let outcome = app
        .store
        .write(move |txn| {
            let mut report = MergeReport::default();
            // Outcomes past the cleanup duration go, with their requests.
            let expired: Vec<Arc<CycleOutcome>> = {
                let done = locked(&shared.done);
                let mut seen = HashSet::new();
                done.values()
                    .filter(|o| o.finished < expire_before && seen.insert(o.cycle_id.clone()))
                    .cloned()
                    .collect()
            };
            for outcome in &expired {
                txn.delete(CYCLE_KIND, &outcome.cycle_id);
                for id in &outcome.patch_ids {
                    txn.delete(KIND, id);
                }
                report.expired += outcome.patch_ids.len();
            }
            // Taken out of the pending set only once the cycle is stored (below, after the commit).
            let taken: Vec<String> = locked(&shared.pending).iter().cloned().collect();
            *locked(&shared.window) = None;
            locked(&shared.in_progress).extend(taken.iter().cloned());
            let mut by_pool: BTreeMap<String, Vec<Arc<Stored>>> = BTreeMap::new();
            for id in &taken {
                if let Some(record) = txn.get(KIND, id) {
                    by_pool
                        .entry(record.value["pool_uuid"].as_str().unwrap_or_default().to_string())
                        .or_default()
                        .push(record);
                }
            }
            tracing::debug!(micros = started.elapsed().as_micros() as u64, "merge cycle: requests grouped");
            let schema = Registry::get().schema("Pool");
            let pool_type = Registry::get().type_def("pool").expect("pools are an API type");
            let mut failed = serde_json::Map::new();
            let mut patch_ids = Vec::with_capacity(taken.len());
            for (pool_uuid, requests) in &by_pool {
                report.pools += 1;
                let queued: Vec<Queued<'_>> = requests
                    .iter()
                    .map(|r| Queued {
                        op: if r.value["op"] == "add" { Op::Add } else { Op::Delete },
                        entries: r.value["servers"].as_array().map_or(&[], Vec::as_slice),
                    })
                    .collect();
                let tenant = requests[0].value["tenant"].as_str().unwrap_or(ADMIN_TENANT).to_string();
                let stamp = txn.timestamp_micros();
                let outcomes: Vec<Result<(), ApiError>> = match txn.edit_with("pool", pool_uuid, |txn, value| {
                    let object = value.as_object_mut().ok_or_else(|| ApiError::internal("stored pool is not a map"))?;
                    let before = object.get("servers").cloned();
                    let merged = merge_requests(schema, object, "servers", &queued)
                        .map_err(|e| ApiError::bad_request(e.to_string()));
                    let resolved = merged.and_then(|o| {
                        resolve_fields(txn, pool_type, object, &["servers".to_string()], &tenant).map(|()| o)
                    });
                    match resolved {
                        Ok(outcomes) => {
                            object.insert("_last_modified".into(), json!(stamp.to_string()));
                            let outcomes = outcomes
                                .into_iter()
                                .map(|o| o.map_err(|e| ApiError::bad_request(e.to_string())))
                                .collect();
                            // The merged list is rewritten as a whole: one whole write per pool.
                            Ok((None, outcomes))
                        }
                        Err(e) => {
                            match before {
                                Some(b) => object.insert("servers".into(), b),
                                None => object.remove("servers"),
                            };
                            Err(e)
                        }
                    }
                }) {
                    Some(Ok(outcomes)) => outcomes,
                    Some(Err(e)) => requests.iter().map(|_| Err(e.clone())).collect(),
                    None => requests
                        .iter()
                        .map(|_| Err(ApiError::not_found(format!("pool '{pool_uuid}' not found"))))
                        .collect(),
                };
                for (record, outcome) in requests.iter().zip(outcomes) {
                    patch_ids.push(json!(record.uuid));
                    report.merged += 1;
                    match outcome {
                        Ok(()) => report.succeeded += 1,
                        Err(e) => {
                            failed.insert(
                                record.uuid.clone(),
                                json!({"status_code": e.status.as_u16(), "error_message": e.message}),
                            );
                            report.failed += 1;
                        }
                    }
                }
            }
            tracing::debug!(micros = started.elapsed().as_micros() as u64, "merge cycle: pools merged");
            let cycle = (report.merged > 0).then(|| {
                let cycle_id = format!("{:020}", txn.timestamp_micros());
                let stored = txn.put(
                    CYCLE_KIND,
                    &cycle_id,
                    json!({"uuid": cycle_id, "finished": finished_at, "patch_ids": patch_ids, "failed": failed}),
                );
                Arc::new(CycleOutcome::from_record(&stored))
            });
            tracing::debug!(micros = started.elapsed().as_micros() as u64, "merge cycle computed; committing");
            Ok::<_, ApiError>((report, cycle, expired, taken))
        })
        .await;
    // Memory follows what was committed.
    locked(&state.in_progress).clear();
    let (report, cycle, expired, taken) = match outcome {
        Ok(done) => done,
        Err(e) => {
            let e = ApiError::from(e);
            tracing::error!(error = %e, "merge cycle not stored; its requests stay queued");
            return Err(e);
        }
    };
    {
        let mut pending = locked(&state.pending);
        for id in &taken {
            pending.remove(id);
        }
    }
    {
        let mut done = locked(&state.done);
        for outcome in &expired {
            for id in &outcome.patch_ids {
                done.remove(id);
            }
        }
        if let Some(cycle) = cycle {
            for id in &cycle.patch_ids {
                done.insert(id.clone(), cycle.clone());
            }
        }
    }
    QUEUE_DEPTH.set(locked(&state.pending).len() as i64);
    MERGE_SECONDS.observe("", started.elapsed().as_secs_f64());
    MERGED_PER_CYCLE.observe("", report.merged as f64);
    if report.merged > 0 {
        tracing::info!(merged = report.merged, failed = report.failed, pools = report.pools, "async PATCH merge");
    }
    Ok(report)
}

/// `POST /api/pool-async/merge [{"now": <epoch seconds>}]`: runs a merge cycle now (admin only).
pub async fn merge_now(app: &App, ctx: &RequestContext, body: &[u8]) -> Result<Response, ApiError> {
    if ctx.principal.level(ADMIN_TENANT, "controllerproperties") < Level::Write {
        return Err(ApiError::forbidden("only administrators may run a merge cycle"));
    }
    let now = if body.iter().all(u8::is_ascii_whitespace) {
        SystemTime::now()
    } else {
        let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
        match v.get("now") {
            None => SystemTime::now(),
            Some(n) => {
                UNIX_EPOCH
                    + Duration::from_secs_f64(
                        n.as_f64()
                            .filter(|s| *s >= 0.0)
                            .ok_or_else(|| ApiError::bad_request("field 'now': expected seconds since the epoch"))?,
                    )
            }
        }
    };
    let report = merge_cycle(app, now).await?;
    Ok(json_response(StatusCode::OK, &serde_json::to_value(report).unwrap_or_default()))
}

/// The timer: merges every `async_patch_merge_period` seconds; when the period is 0 (async mode
/// off) it still drains requests queued before it was turned off.
pub async fn run_timer(app: Arc<App>) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let period =
            app.setting("controllerproperties", "/async_patch_merge_period").and_then(|v| v.as_u64()).unwrap_or(0);
        let due = if period == 0 { QUEUE_DEPTH.get() > 0 } else { last.elapsed() >= Duration::from_secs(period) };
        if due {
            last = Instant::now();
            if let Err(e) = merge_cycle(&app, SystemTime::now()).await {
                tracing::error!(error = %e, "async PATCH merge failed; it will be retried");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(kind: &str, uuid: &str, value: Value) -> Arc<Stored> {
        let meta = fulcrum_store::Meta { tenant: String::new(), name: None, refs: vec![] };
        Arc::new(Stored { kind: kind.into(), uuid: uuid.into(), value, meta })
    }

    #[test]
    fn a_new_leadership_forgets_what_another_leader_merged_since() {
        let state = AsyncPatches::default();
        let requests = [stored(KIND, "p1", json!({"version": null})), stored(KIND, "p2", json!({"version": null}))];
        // Leading once: both queued.
        state.recover(&requests, &[]);
        assert_eq!(locked(&state.pending).len(), 2);
        // Another leader merged p1 meanwhile; leading again, only p2 is left to merge.
        let cycle = stored(CYCLE_KIND, "c1", json!({"patch_ids": ["p1"], "finished": 5, "failed": {}}));
        state.recover(&requests, &[cycle]);
        assert_eq!(locked(&state.pending).iter().cloned().collect::<Vec<_>>(), ["p2"]);
        assert!(locked(&state.done).contains_key("p1"));
        // And what it once knew as done but has since expired is forgotten.
        state.recover(&requests[1..], &[]);
        assert!(locked(&state.done).is_empty());
        assert_eq!(locked(&state.pending).len(), 1);
    }
}
