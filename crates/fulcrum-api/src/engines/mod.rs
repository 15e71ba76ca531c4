//! Service engines on the controller side: join tokens, liveness, licensing, placement of
//! virtual services, and install commands. The agents' own endpoints are in [`agent`].
//!
//! What an SE is and does lives in its ServiceEngine record (durable: version, oper_status,
//! license, install status). What changes with every heartbeat (the time of the last one, free
//! disk) and the placement of virtual services live in memory and are shown over the record:
//! after a restart the placement is rebuilt from what the agents report they serve.

pub mod agent;
pub mod license;
pub mod placement;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::Response;
use fulcrum_metrics::Gauge;
use fulcrum_schema::{Registry, TypeDef, normalize, refs};
use fulcrum_se_protocol::{Facts, RuntimeReport, ServerState, Step, Traffic};
use fulcrum_store::{Catalogue, Stored, Txn};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::access::Level;
use crate::app::{App, RequestContext, json_response};
use crate::error::ApiError;
use crate::objects::{self, find_visible, require, store_object};
use crate::version::rfc3339;

pub const SE_KIND: &str = "serviceengine";
pub const TOKEN_KIND: &str = "sejointoken";
pub const LICENSE_KIND: &str = "controllerlicense";
pub const VS_KIND: &str = "virtualservice";
const GROUP_KIND: &str = "serviceenginegroup";
/// Install events kept per SE (the oldest go first).
const MAX_EVENTS: usize = 50;
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// How often the configuration is looked at for changes the data planes must hear of: a PATCH
/// reaches the SEs' traffic within this plus a poll's round trip.
const CONFIG_WATCH_EVERY: Duration = Duration::from_millis(100);

pub static SES_UP: Gauge = Gauge::new("fulcrum_service_engines_up", "Service engines whose heartbeats arrive.");
pub static SES_DOWN: Gauge = Gauge::new("fulcrum_service_engines_down", "Service engines marked down.");
pub static VS_UNPLACED: Gauge =
    Gauge::new("fulcrum_virtualservices_unplaced", "Enabled virtual services with fewer SEs than they ask for.");

/// Renders this module's metrics.
pub fn render_metrics(out: &mut String) {
    for gauge in [&SES_UP, &SES_DOWN, &VS_UNPLACED] {
        gauge.render(out);
    }
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How often agents send a heartbeat (the long poll is held this long).
    pub heartbeat_interval: Duration,
    /// An SE not heard from for this long is down.
    pub down_after: Duration,
    /// How long a new slot has to come up healthy before the agent switches back.
    pub health_timeout: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            heartbeat_interval: Duration::from_secs(10),
            down_after: Duration::from_secs(30),
            health_timeout: Duration::from_secs(120),
        }
    }
}

struct Live {
    seen: Instant,
    seen_at: SystemTime,
    facts: Facts,
}

#[derive(Default)]
struct Placed {
    by_vs: placement::Placement,
    by_se: HashMap<String, Vec<String>>,
}

pub struct Engines {
    pub settings: EngineSettings,
    /// When this node began to watch over the SEs: its start, or in a cluster the start of its
    /// leadership. SEs it has not heard from get `down_after` from then.
    started: Mutex<Instant>,
    live: Mutex<HashMap<String, Live>>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    placed: Mutex<Placed>,
    /// SEs an upgrade is emptying: they keep and take no virtual service.
    draining: Mutex<std::collections::HashSet<String>>,
    /// The last runtime report of each SE's data plane.
    runtime: Mutex<HashMap<String, (Instant, RuntimeReport)>>,
    /// Set once a placement was computed since the start; until then agents keep what they serve.
    placement_known: std::sync::atomic::AtomicBool,
    reconcile: Notify,
}

impl Engines {
    pub fn new(settings: EngineSettings) -> Engines {
        Engines {
            settings,
            started: Mutex::new(Instant::now()),
            live: Mutex::default(),
            wakers: Mutex::default(),
            placed: Mutex::default(),
            draining: Mutex::default(),
            runtime: Mutex::default(),
            placement_known: std::sync::atomic::AtomicBool::new(false),
            reconcile: Notify::new(),
        }
    }

    /// Wakes the SE's long poll, if one is waiting (or makes the next one return at once).
    fn waker(&self, se: &str) -> Arc<Notify> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner()).entry(se.to_string()).or_default().clone()
    }

    fn wake(&self, se: &str) {
        self.waker(se).notify_one();
    }

    /// Wakes every SE that has virtual services placed on it.
    fn wake_placed(&self) {
        let ses: Vec<String> = self.placed.lock().unwrap_or_else(|e| e.into_inner()).by_se.keys().cloned().collect();
        for se in ses {
            self.wake(&se);
        }
    }

    /// The SEs an upgrade is emptying now (replaces the previous set).
    pub fn set_draining(&self, ses: std::collections::HashSet<String>) {
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        if *draining != ses {
            *draining = ses;
            self.changed();
        }
    }

    /// Asks the background loop to look at liveness, licenses and placement now.
    pub fn changed(&self) {
        self.reconcile.notify_one();
    }

    /// Records a heartbeat; when what the SE serves changed, placement is looked at again
    /// (a virtual service moving waits for its new SE to serve it).
    fn record_heartbeat(&self, se: &str, facts: Facts) {
        let same_service = |a: &Facts| a.hosted_vs == facts.hosted_vs && a.serving_vs == facts.serving_vs;
        let live = Live { seen: Instant::now(), seen_at: SystemTime::now(), facts: facts.clone() };
        let before = self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(se.to_string(), live);
        if !before.is_some_and(|l| same_service(&l.facts)) {
            self.changed();
        }
    }

    fn record_runtime(&self, se: &str, report: RuntimeReport) {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner()).insert(se.to_string(), (Instant::now(), report));
    }

    /// Runs `read` over the runtime reports of SEs heard from recently enough to count as up
    /// (by SE uuid, in uuid order), borrowed: a report may list thousands of servers.
    fn with_fresh_runtime<R>(&self, read: impl FnOnce(&[(&str, &RuntimeReport)]) -> R) -> R {
        let runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh: Vec<(&str, &RuntimeReport)> = runtime
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < self.settings.down_after)
            .map(|(se, (_, r))| (se.as_str(), r))
            .collect();
        fresh.sort_by_key(|(se, _)| *se);
        read(&fresh)
    }

    fn forget(&self, se: &str) {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner()).remove(se);
        self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(se);
        self.wake(se);
        self.changed();
    }

    /// The virtual services placed on an SE, once a placement is known since the start.
    pub fn assignment(&self, se: &str) -> Option<Vec<String>> {
        self.placement_known.load(std::sync::atomic::Ordering::Acquire).then(|| self.assigned(se))
    }

    /// The virtual services placed on an SE.
    pub fn assigned(&self, se: &str) -> Vec<String> {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).by_se.get(se).cloned().unwrap_or_default()
    }

    /// The SEs a virtual service is placed on.
    pub fn placed_on(&self, vs: &str) -> Vec<String> {
        self.placed.lock().unwrap_or_else(|e| e.into_inner()).by_vs.get(vs).cloned().unwrap_or_default()
    }

    /// Whether the SE's agent says it serves the virtual service.
    fn serves(&self, se: &str, vs: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(se)
            .is_some_and(|l| l.facts.serving_vs.as_ref().unwrap_or(&l.facts.hosted_vs).iter().any(|h| h == vs))
    }

    /// The fields shown over a ServiceEngine record: the last heartbeat and what came with it,
    /// and the virtual services placed on it.
    pub fn live_fields(&self, se: &str) -> Map<String, Value> {
        let mut out = Map::new();
        if let Some(live) = self.live.lock().unwrap_or_else(|e| e.into_inner()).get(se) {
            out.insert("last_heartbeat".into(), json!(rfc3339(live.seen_at)));
            out.insert("free_disk_bytes".into(), json!(live.facts.free_disk_bytes));
        }
        let vs: Vec<Value> = self.assigned(se).iter().map(|v| json!(refs::canonical(VS_KIND, v))).collect();
        out.insert("vs_refs".into(), Value::Array(vs));
        out
    }

    fn started(&self) -> Instant {
        *self.started.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts the clock SEs are judged by (a node that just became the leader has heard from
    /// none of them yet), and forgets what a previous term placed.
    pub fn begin_watch(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.placement_known.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether every SE that may serve has reported since the controller started, or the
    /// time for it to do so has passed.
    fn heard_from_all(&self, candidates: &[placement::Candidate]) -> bool {
        if self.started().elapsed() > self.settings.down_after {
            return true;
        }
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        candidates.iter().filter(|c| c.keeps).all(|c| live.contains_key(&c.uuid))
    }

    fn last_seen(&self, se: &str) -> Instant {
        let started = self.started();
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(se).map_or(started, |l| l.seen)
    }
}

fn timestamp(t: SystemTime) -> Value {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({"secs": d.as_secs(), "usecs": d.subsec_micros()})
}

pub fn sha256_hex(data: &[u8]) -> String {
    fulcrum_package::hex(&Sha256::digest(data))
}

/// Compares a presented secret with a stored sha256, in time independent of where they differ.
fn secret_matches(secret: &str, stored_sha256: Option<&str>) -> bool {
    let Some(stored) = stored_sha256 else { return false };
    let presented = sha256_hex(secret.as_bytes());
    presented.len() == stored.len() && presented.bytes().zip(stored.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn oper_status(state: &str, reason: &str) -> Value {
    let reasons: Vec<&str> = if reason.is_empty() { vec![] } else { vec![reason] };
    json!({"state": state, "reason": reasons, "last_changed_time": timestamp(SystemTime::now())})
}

fn state_of(se: &Value) -> &str {
    se.pointer("/oper_status/state").and_then(Value::as_str).unwrap_or("OPER_DOWN")
}

fn install_step(se: &Value) -> Option<&str> {
    se.pointer("/install_status/state").and_then(Value::as_str)
}

fn uuid_of_ref(reference: Option<&Value>) -> Option<String> {
    reference.and_then(Value::as_str).and_then(refs::split_canonical).map(|(_, uuid)| uuid.to_string())
}

/// Sets some fields of an SE record (the controller's own fields; `null` removes one), stamping
/// `_last_modified`.
fn update_se(txn: &mut Txn<'_>, uuid: &str, fields: Map<String, Value>) -> Option<Arc<Stored>> {
    let existing = txn.get(SE_KIND, uuid)?;
    let mut value = existing.value.clone();
    let map = value.as_object_mut()?;
    for (k, v) in fields {
        if v.is_null() {
            map.remove(&k);
        } else {
            map.insert(k, v);
        }
    }
    let stamp = txn.timestamp_micros();
    map.insert("_last_modified".into(), json!(stamp.to_string()));
    Some(txn.put(SE_KIND, uuid, value))
}

fn se_type() -> &'static TypeDef {
    Registry::get().type_def(SE_KIND).expect("serviceengine is defined")
}

fn token_type() -> &'static TypeDef {
    Registry::get().type_def(TOKEN_KIND).expect("sejointoken is defined")
}

/// Cores the controller's license (the `controllerlicense` singleton) allows in total.
fn licensed_cores<'a>(licenses: impl Iterator<Item = &'a Value>) -> u64 {
    licenses
        .flat_map(|l| l.get("licenses").and_then(Value::as_array).into_iter().flatten())
        .filter_map(|l| l.get("cores").and_then(Value::as_u64))
        .sum()
}

fn cores_of(se: &Value) -> u64 {
    se.pointer("/resources/num_vcpus").and_then(Value::as_u64).unwrap_or(1)
}

fn holds_license(se: &Value) -> bool {
    se.get("license_state").and_then(Value::as_str) == Some("LICENSE_STATE_LICENSED")
}

fn license_fields(licensed: bool, cores: u64) -> Map<String, Value> {
    let mut out = Map::new();
    let state = if licensed { "LICENSE_STATE_LICENSED" } else { "LICENSE_STATE_UNLICENSED" };
    out.insert("license_state".into(), json!(state));
    out.insert("licensed_cores".into(), json!(if licensed { cores } else { 0 }));
    out
}

/// What each SE runs and keeps for rollback, for the image service's in-use check.
pub fn versions_in_use(cat: &Catalogue) -> Vec<(String, crate::images::record::RunningVersion)> {
    use crate::images::record::RunningVersion;
    let mut out = Vec::new();
    for se in cat.iter(SE_KIND) {
        let group = cat
            .get_path(se.value.get("se_group_ref").and_then(Value::as_str).unwrap_or_default())
            .and_then(|g| g.meta.name.clone())
            .unwrap_or_default();
        let who = format!("SE group '{group}' (service engine '{}')", se.meta.name.as_deref().unwrap_or_default());
        if let (Some(version), Some(build)) =
            (se.value.get("version").and_then(Value::as_str), se.value.get("build").and_then(Value::as_u64))
        {
            let patch = se.value.get("patch_version").and_then(Value::as_str).map(String::from);
            out.push((who.clone(), RunningVersion { version: version.into(), build, patch }));
        }
        // `30.2.1-9001` or `30.2.1-9001-2p1`: the slot kept for rollback.
        if let Some(previous) = se.value.get("previous_version").and_then(Value::as_str) {
            let mut parts = previous.splitn(3, '-');
            if let (Some(version), Some(Ok(build))) = (parts.next(), parts.next().map(str::parse)) {
                let patch = parts.next().map(String::from);
                out.push((
                    format!("{who}, kept for rollback"),
                    RunningVersion { version: version.into(), build, patch },
                ));
            }
        }
    }
    out
}

/// The SE that is installing an image (`/api/image/<uuid>`) now, if any.
pub fn installing(cat: &Catalogue, image_path: &str) -> Option<String> {
    cat.iter(SE_KIND)
        .find(|se| {
            se.value.pointer("/install_status/image_ref").and_then(Value::as_str) == Some(image_path)
                && install_step(&se.value).is_some_and(|s| Step::parse(s).is_none_or(|s| !s.is_final()))
        })
        .map(|se| se.meta.name.clone().unwrap_or_default())
}

/// `GET /api/licenseusage`.
/// What the SEs of one group (or all of them) hold now, for license metering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreUsage {
    pub licensed_cores: u64,
    pub consumed_cores: u64,
    pub num_ses: u64,
    pub num_ses_up: u64,
}

/// Core usage of the SEs whose group is `group_uuid` (every SE when None).
pub fn core_usage(cat: &Catalogue, group_uuid: Option<&str>) -> CoreUsage {
    let in_group = |se: &Value| group_uuid.is_none_or(|g| uuid_of_ref(se.get("se_group_ref")).as_deref() == Some(g));
    let ses: Vec<&Arc<Stored>> = cat.iter(SE_KIND).filter(|s| in_group(&s.value)).collect();
    CoreUsage {
        licensed_cores: licensed_cores(cat.iter(LICENSE_KIND).map(|l| &l.value)),
        consumed_cores: ses.iter().filter(|s| holds_license(&s.value)).map(|s| cores_of(&s.value)).sum(),
        num_ses: ses.len() as u64,
        num_ses_up: ses
            .iter()
            .filter(|s| s.value.pointer("/oper_status/state").and_then(Value::as_str) == Some("OPER_UP"))
            .count() as u64,
    }
}

pub fn license_usage(app: &App) -> Response {
    let cat = app.store.read();
    let total = licensed_cores(cat.iter(LICENSE_KIND).map(|l| &l.value));
    let ses: Vec<&Arc<Stored>> = cat.iter(SE_KIND).collect();
    let consumed: u64 = ses.iter().filter(|s| holds_license(&s.value)).map(|s| cores_of(&s.value)).sum();
    let licensed = ses.iter().filter(|s| holds_license(&s.value)).count();
    json_response(
        StatusCode::OK,
        &json!({
            "licensed_cores": total,
            "consumed_cores": consumed,
            "available_cores": total.saturating_sub(consumed),
            "num_ses": ses.len(),
            "num_licensed_ses": licensed,
            "num_unlicensed_ses": ses.len() - licensed,
        }),
    )
}

/// `POST /api/sejointoken`: a token that lets an agent join one SE group, shown once.
pub async fn create_token(app: &App, ctx: &RequestContext, body: &[u8]) -> Result<Response, ApiError> {
    let t = token_type();
    require(ctx, t, Level::Write)?;
    let mut input = objects::parse_body(body)?;
    let map = input.as_object_mut().ok_or_else(|| ApiError::bad_request("expected a JSON object"))?;
    let uuid = format!("{TOKEN_KIND}-{}", uuid::Uuid::new_v4());
    map.entry("name").or_insert_with(|| json!(format!("token-{}", &uuid[TOKEN_KIND.len() + 1..][..8])));
    let reg = Registry::get();
    let mut config = normalize(reg, reg.schema_of(t), &input)?;
    config.insert("created".into(), json!(rfc3339(SystemTime::now())));
    config.insert("joined".into(), json!(0));
    let secret = crate::auth::random_token(32);
    let mut hidden = Map::new();
    hidden.insert("_secret_sha256".into(), json!(sha256_hex(secret.as_bytes())));
    let tenant = ctx.scope.for_write()?.to_string();
    let id = uuid.clone();
    let stored = app.store.write(move |txn| store_object(txn, t, &id, config, &tenant, hidden)).await?;
    let response = objects::render_created(ctx, &app.store.read(), t, &stored);
    // The secret is in this answer only; the controller keeps its hash.
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let mut shown: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(e.to_string()))?;
    // Under HTTPS the token also names the controllers' certificates (this one's, and every
    // other node's), so that an agent given only the token verifies it is talking to one of
    // them before it sends the secret.
    let mut token = format!("{uuid}.{secret}");
    let others = app.cluster.as_ref().map(|m| m.controllers()).unwrap_or_default();
    let mut pins: Vec<String> = app.certificate_pin.iter().cloned().collect();
    for pin in others.into_iter().filter_map(|c| c.pin) {
        if !pins.contains(&pin) {
            pins.push(pin);
        }
    }
    for pin in &pins {
        token.push('.');
        token.push_str(pin);
    }
    shown["token"] = json!(token);
    Ok(json_response(parts.status, &shown))
}

/// `DELETE /api/sejointoken/<uuid>`: revokes the token and cuts off every SE that joined with it.
pub async fn revoke_token(app: &App, ctx: &RequestContext, uuid: &str) -> Result<Response, ApiError> {
    let t = token_type();
    require(ctx, t, Level::Write)?;
    find_visible(&app.store.read(), ctx, t, uuid)?;
    let token = uuid.to_string();
    let cut_off = app
        .store
        .write(move |txn| {
            if txn.get(TOKEN_KIND, &token).is_none() {
                return Err(ApiError::not_found(format!("sejointoken '{token}' not found")));
            }
            let joined: Vec<String> = txn
                .list(SE_KIND)
                .into_iter()
                .filter(|s| s.value.get("_join_token").and_then(Value::as_str) == Some(token.as_str()))
                .map(|s| s.uuid.clone())
                .collect();
            for se in &joined {
                txn.delete(SE_KIND, se);
            }
            txn.delete(TOKEN_KIND, &token);
            Ok(joined)
        })
        .await?;
    for se in &cut_off {
        app.engines.forget(se);
    }
    tracing::info!(token = uuid, ses = cut_off.len(), "join token revoked");
    Ok(no_content())
}

fn no_content() -> Response {
    let mut response = json_response(StatusCode::NO_CONTENT, &Value::Null);
    *response.body_mut() = axum::body::Body::empty();
    response
}

/// `DELETE /api/serviceengine/<uuid>`: the SE's credential stops working with the record.
pub async fn delete_se(app: &App, ctx: &RequestContext, uuid: &str) -> Result<Response, ApiError> {
    let response = objects::delete(app, ctx, se_type(), uuid).await?;
    app.engines.forget(uuid);
    Ok(response)
}

/// `POST /api/serviceengine/<uuid>/install` `{"image_ref": ...}` and `.../rollback`: queues a
/// command for the agent; its steps show in the SE's `install_status`.
pub async fn command(
    app: &App,
    ctx: &RequestContext,
    uuid: &str,
    operation: &'static str,
    body: &[u8],
) -> Result<Response, ApiError> {
    let t = se_type();
    require(ctx, t, Level::Write)?;
    let mut disruptive = false;
    let image = if operation == "SE_INSTALL" {
        let input = objects::parse_body(body)?;
        disruptive = match input.get("disruptive") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::bad_request("field 'disruptive': must be true or false")),
        };
        let reference = input
            .get("image_ref")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("field 'image_ref': is required (the image to install)"))?;
        let cat = app.store.read();
        let image = resolve_image(&cat, ctx, reference)?;
        Some((image.uuid.clone(), image.meta.name.clone().unwrap_or_default()))
    } else {
        None
    };
    find_visible(&app.store.read(), ctx, t, uuid)?;
    let stored = queue_command(app, uuid, operation, image, disruptive).await?;
    let cat = app.store.read();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"uuid": uuid, "install_status": stored.value.get("install_status").cloned().unwrap_or_default(), "url": format!("{}/api/{SE_KIND}/{uuid}", ctx.base_url), "name": cat.get(SE_KIND, uuid).and_then(|s| s.meta.name.clone())}),
    ))
}

/// Stores a command for an SE (`SE_INSTALL` with an image (uuid, name), or `SE_ROLLBACK`) in
/// its `install_status` and wakes its agent. Refused while the SE runs another command.
/// `disruptive`: the SE's restart may drop its traffic (it does not hand its listening
/// sockets to the new process).
pub async fn queue_command(
    app: &App,
    uuid: &str,
    operation: &'static str,
    image: Option<(String, String)>,
    disruptive: bool,
) -> Result<Arc<Stored>, ApiError> {
    let se = uuid.to_string();
    let stored = app
        .store
        .write(move |txn| {
            let existing =
                txn.get(SE_KIND, &se).ok_or_else(|| ApiError::not_found(format!("serviceengine '{se}' not found")))?;
            let se_name = existing.meta.name.clone().unwrap_or_default();
            if let Some(step) = install_step(&existing.value)
                && Step::parse(step).is_none_or(|s| !s.is_final())
            {
                return Err(ApiError::conflict(format!(
                    "Service engine '{se_name}' has an operation in progress ({step}); wait for it to finish"
                )));
            }
            if image.is_none() && existing.value.get("previous_version").and_then(Value::as_str).is_none() {
                return Err(ApiError::conflict(format!(
                    "Service engine '{se_name}' has no previous version to roll back to"
                )));
            }
            let now = SystemTime::now();
            let command_id = txn.timestamp_micros();
            let mut status = json!({
                "command_id": command_id,
                "operation": operation,
                "state": "PENDING",
                "progress": 0,
                "start_time": rfc3339(now),
                "disruptive": disruptive,
                "events": [{"step": "PENDING", "time": rfc3339(now), "message": "queued for the agent"}],
            });
            if let Some((image_uuid, image_name)) = &image {
                status["image_ref"] = json!(refs::canonical(crate::images::KIND, image_uuid));
                status["image_name"] = json!(image_name);
            }
            let mut fields = Map::new();
            fields.insert("install_status".into(), status);
            update_se(txn, &se, fields).ok_or_else(|| ApiError::not_found(format!("serviceengine '{se}' not found")))
        })
        .await?;
    app.engines.wake(uuid);
    Ok(stored)
}

/// An image an SE can install: uploaded completely, carrying an SE image.
fn resolve_image<'a>(cat: &'a Catalogue, ctx: &RequestContext, reference: &str) -> Result<&'a Arc<Stored>, ApiError> {
    let t = crate::images::type_def();
    let target = refs::parse(crate::images::KIND, reference)
        .map_err(|e| ApiError::bad_request(format!("field 'image_ref': {e}")))?;
    let by_name = |name: &str| {
        cat.iter(crate::images::KIND)
            .find(|i| i.meta.name.as_deref() == Some(name))
            .filter(|i| find_visible(cat, ctx, t, &i.uuid).is_ok())
    };
    // A bare word is a uuid or, failing that, an image's name (its tag).
    let image = match &target {
        refs::RefTarget::Uuid { uuid, .. } => find_visible(cat, ctx, t, uuid).ok().or_else(|| by_name(uuid)),
        refs::RefTarget::Name { name, .. } => by_name(name),
    }
    .ok_or_else(|| ApiError::bad_request(format!("field 'image_ref': no image '{reference}'")))?;
    let name = image.meta.name.as_deref().unwrap_or_default();
    if !crate::images::record::is_completed(&image.value) {
        return Err(ApiError::conflict(format!("image '{name}' is still being uploaded")));
    }
    let carries_se = image.value.pointer("/_package/carries_se").and_then(Value::as_bool) == Some(true);
    let bundle = image.value.pointer("/_package/kind").and_then(Value::as_str) == Some("bundle");
    if !carries_se && !bundle {
        return Err(ApiError::bad_request(format!(
            "image '{name}' carries no SE image (it is for the controller only)"
        )));
    }
    Ok(image)
}

/// `GET /api/virtualservice/<uuid>/runtime`: where the virtual service runs.
pub fn vs_runtime(app: &App, ctx: &RequestContext, uuid: &str) -> Result<Response, ApiError> {
    let t = Registry::get().type_def(VS_KIND).expect("virtualservice is defined");
    require(ctx, t, Level::Read)?;
    let cat = app.store.read();
    let vs = find_visible(&cat, ctx, t, uuid)?;
    Ok(json_response(StatusCode::OK, &runtime_of(app, ctx, &cat, vs)))
}

/// A virtual service's runtime: its state and the service engines it is placed on.
pub fn runtime_of(app: &App, ctx: &RequestContext, cat: &Catalogue, vs: &Stored) -> Value {
    let uuid = vs.uuid.as_str();
    let group = cat.get_path(vs.value.get("se_group_ref").and_then(Value::as_str).unwrap_or_default());
    let requested = group.and_then(|g| g.value.get("min_scaleout_per_vs")).and_then(Value::as_u64).unwrap_or(1);
    let placed = app.engines.placed_on(uuid);
    app.engines.with_fresh_runtime(|reports| runtime_answer(app, ctx, cat, vs, requested, &placed, reports))
}

fn runtime_answer(
    app: &App,
    ctx: &RequestContext,
    cat: &Catalogue,
    vs: &Stored,
    requested: u64,
    placed: &[String],
    reports: &[(&str, &RuntimeReport)],
) -> Value {
    let uuid = vs.uuid.as_str();
    // What each SE's data plane says of this virtual service: where it listens, what it could not bind.
    let on_se = |se: &str| {
        reports.iter().find(|(s, _)| *s == se).and_then(|(_, r)| r.virtualservices.iter().find(|v| v.uuid == uuid))
    };
    let engines: Vec<Value> = placed
        .iter()
        .enumerate()
        .filter_map(|(i, se)| {
            let stored = cat.get(SE_KIND, se)?;
            let mut entry = json!({
                "uuid": se,
                "url": format!("{}/api/{SE_KIND}/{se}", ctx.base_url),
                "name": stored.meta.name,
                "primary": i == 0,
                "standby": false,
                "active_on_se": app.engines.serves(se, uuid),
                "oper_status": stored.value.get("oper_status"),
            });
            if let Some(v) = on_se(se) {
                entry["listening"] = json!(v.listening);
                if !v.errors.is_empty() {
                    entry["errors"] = json!(v.errors);
                }
            }
            Some(entry)
        })
        .collect();
    let mut traffic = Traffic::default();
    for (_, report) in reports {
        for v in report.virtualservices.iter().filter(|v| v.uuid == uuid) {
            traffic.add(&v.traffic);
        }
    }
    let serving = engines.iter().filter(|e| e["active_on_se"] == json!(true)).count();
    let enabled = vs.value.get("enabled").and_then(Value::as_bool) != Some(false);
    // Why its SEs do not serve it, when their data planes said.
    let refused: Option<String> =
        placed.iter().filter_map(|se| on_se(se)).flat_map(|v| v.errors.iter()).next().cloned();
    let waiting = match &refused {
        Some(error) => format!("its service engines cannot serve it: {error}"),
        None => "placed, waiting for its service engines to take it".to_string(),
    };
    let (state, reason) = match (enabled, placed.len(), serving) {
        (false, _, _) => ("OPER_DISABLED", "the virtual service is disabled"),
        (true, 0, _) => ("OPER_RESOURCES", "no service engine of its group is available"),
        (true, _, 0) => ("OPER_DOWN", waiting.as_str()),
        _ => ("OPER_UP", ""),
    };
    let status = oper_status(state, reason);
    json!({
        "uuid": uuid,
        "name": vs.meta.name,
        "oper_status": status,
        "num_se_requested": requested,
        "num_se_assigned": placed.len(),
        "percent_ses_up": if placed.is_empty() { 0 } else { 100 * serving / placed.len() },
        "stats": traffic_json(&traffic),
        "vip_summary": [{
            "vip_id": "0",
            "oper_status": status,
            "num_se_requested": requested,
            "num_se_assigned": placed.len(),
            "service_engine": engines,
        }],
    })
}

/// Traffic counters as shown in runtime answers (totals over the SEs, since each data plane started).
fn traffic_json(t: &Traffic) -> Value {
    json!({
        "requests": t.requests,
        "connections": t.connections,
        "open_connections": t.open_connections,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
        "errors": t.errors,
        "latency_p50_ms": t.latency_quantile_ms(0.5),
        "latency_p99_ms": t.latency_quantile_ms(0.99),
        "latency_buckets_ms": fulcrum_se_protocol::LATENCY_BOUNDS_MS,
        "latency_counts": t.latency_buckets,
    })
}

/// `GET /api/pool/<uuid>/runtime` (the pool's health) and `.../runtime/server` (each server's,
/// as the SEs balancing to it see it).
pub fn pool_runtime(app: &App, ctx: &RequestContext, uuid: &str, servers_only: bool) -> Result<Response, ApiError> {
    let t = Registry::get().type_def("pool").expect("pool is defined");
    require(ctx, t, Level::Read)?;
    let cat = app.store.read();
    let pool = find_visible(&cat, ctx, t, uuid)?;
    let mut traffic = Traffic::default();
    let mut states = Vec::new();
    let servers: Vec<Value> = app.engines.with_fresh_runtime(|reports| {
        // Each server as the SEs see it, indexed once (a pool may hold thousands).
        let mut seen_by_key: HashMap<(&str, u16), Vec<(&str, &fulcrum_se_protocol::ServerRuntime)>> = HashMap::new();
        for (se, report) in reports {
            for p in report.pools.iter().filter(|p| p.uuid == uuid) {
                for r in &p.servers {
                    seen_by_key.entry((r.ip.as_str(), r.port)).or_default().push((se, r));
                }
            }
        }
        let servers = pool.value.get("servers").and_then(Value::as_array).into_iter().flatten();
        servers
            .map(|s| {
                let addr = s.pointer("/ip/addr").and_then(Value::as_str).unwrap_or_default();
                let port = s.get("port").and_then(Value::as_u64).unwrap_or(0) as u16;
                let seen = seen_by_key.get(&(addr, port)).map_or(&[][..], Vec::as_slice);
                let (answer, counted, state) = server_runtime(&cat, s, seen);
                traffic.add(&counted);
                states.push(state);
                answer
            })
            .collect()
    });
    if servers_only {
        return Ok(json_response(StatusCode::OK, &Value::Array(servers)));
    }
    let enabled = states.iter().filter(|s| **s != "OPER_DISABLED").count();
    let up = states.iter().filter(|s| **s == "OPER_UP").count();
    let reported = states.iter().any(|s| !matches!(*s, "OPER_UNAVAILABLE" | "OPER_DISABLED"));
    let (state, reason) = match (reported, enabled, up) {
        (_, 0, _) => ("OPER_DOWN", "no server is enabled"),
        (false, _, _) => ("OPER_UNAVAILABLE", "no service engine balances to this pool"),
        (true, _, 0) => ("OPER_DOWN", "no server is up"),
        (true, e, u) if u < e => ("OPER_UP", "some servers are down"),
        _ => ("OPER_UP", ""),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "uuid": uuid,
            "name": pool.meta.name,
            "oper_status": oper_status(state, reason),
            "num_servers": servers.len(),
            "num_servers_enabled": enabled,
            "num_servers_up": up,
            "percent_servers_up_enabled": (100 * up).checked_div(enabled).unwrap_or(0),
            "stats": traffic_json(&traffic),
        }),
    ))
}

/// One server's runtime (with its traffic and state): UP when every SE reporting it can use it,
/// DOWN when none can, PARTITIONED in between; DISABLED by configuration; UNAVAILABLE while no
/// SE reports it.
fn server_runtime(
    cat: &Catalogue,
    server: &Value,
    seen: &[(&str, &fulcrum_se_protocol::ServerRuntime)],
) -> (Value, Traffic, &'static str) {
    let configured = server.get("enabled").and_then(Value::as_bool) != Some(false);
    let up = seen.iter().filter(|(_, r)| r.state == ServerState::Up).count();
    let down: Vec<&str> =
        seen.iter().filter(|(_, r)| r.state == ServerState::Down).map(|(_, r)| r.reason.as_str()).collect();
    let (state, reason) = match (configured, seen.len(), up) {
        (false, _, _) => ("OPER_DISABLED", String::new()),
        (true, 0, _) => ("OPER_UNAVAILABLE", "no service engine reports this server".to_string()),
        (true, n, u) if u == n => ("OPER_UP", String::new()),
        (true, _, 0) => ("OPER_DOWN", down.first().map(|r| r.to_string()).unwrap_or_default()),
        _ => ("OPER_PARTITIONED", format!("down on {} of {} service engines", down.len(), seen.len())),
    };
    let mut traffic = Traffic::default();
    for (_, r) in seen {
        traffic.add(&r.traffic);
    }
    let per_se: Vec<Value> = seen
        .iter()
        .map(|(se, r)| {
            json!({
                "se_uuid": se,
                "se_name": cat.get(SE_KIND, se).and_then(|s| s.meta.name.clone()),
                "state": r.state,
                "reason": r.reason,
            })
        })
        .collect();
    let answer = json!({
        "ip_addr": server.get("ip"),
        "port": server.get("port"),
        "hostname": server.get("hostname"),
        "enabled": configured,
        "oper_status": oper_status(state, &reason),
        "service_engines": per_se,
        "stats": traffic_json(&traffic),
    });
    (answer, traffic, state)
}

/// The background loop: liveness, licenses and placement, every half second and whenever
/// something changed; and, more often, whether the configuration moved, in which case every
/// placed SE's poll looks again at what its data plane should do.
pub async fn run(app: Arc<App>) {
    let mut generation = app.store.read().generation();
    let mut reconciled = Instant::now();
    loop {
        let asked = tokio::select! {
            () = tokio::time::sleep(CONFIG_WATCH_EVERY) => false,
            () = app.engines.reconcile.notified() => true,
        };
        let now = app.store.read().generation();
        if now != generation {
            generation = now;
            app.engines.wake_placed();
        }
        if !asked && reconciled.elapsed() < RECONCILE_EVERY {
            continue;
        }
        reconciled = Instant::now();
        if let Err(e) = reconcile(&app).await {
            tracing::warn!(error = %e, "service engine bookkeeping failed; retrying");
        }
    }
}

async fn reconcile(app: &App) -> Result<(), ApiError> {
    let engines = &app.engines;
    let now = Instant::now();
    let (changes, candidates, demands, groups) = {
        let cat = app.store.read();
        let mut ses: Vec<&Arc<Stored>> = cat.iter(SE_KIND).collect();
        ses.sort_by_key(|s| (s.value.get("_joined_at").and_then(Value::as_u64).unwrap_or(0), s.uuid.clone()));
        let mut changes: HashMap<String, Map<String, Value>> = HashMap::new();
        // Liveness: only the down transition happens here; a heartbeat brings an SE up.
        let mut up: HashMap<&str, bool> = HashMap::new();
        for se in &ses {
            let is_up = state_of(&se.value) == "OPER_UP";
            let silent = now.duration_since(engines.last_seen(&se.uuid));
            if is_up && silent > engines.settings.down_after {
                let reason = format!("no heartbeat for {} s", silent.as_secs());
                tracing::info!(se = %se.uuid, %reason, "service engine down");
                changes
                    .entry(se.uuid.clone())
                    .or_default()
                    .insert("oper_status".into(), oper_status("OPER_DOWN", &reason));
                up.insert(&se.uuid, false);
            } else {
                up.insert(&se.uuid, is_up);
            }
        }
        // Licenses.
        let claims: Vec<license::Claim<'_>> = ses
            .iter()
            .map(|s| license::Claim { se: &s.uuid, cores: cores_of(&s.value), holds: holds_license(&s.value) })
            .collect();
        let licensed = license::allocate(licensed_cores(cat.iter(LICENSE_KIND).map(|l| &l.value)), &claims);
        for (claim, now_licensed) in claims.iter().zip(&licensed) {
            if claim.holds != *now_licensed {
                changes.entry(claim.se.to_string()).or_default().extend(license_fields(*now_licensed, claim.cores));
            }
        }
        // Placement input.
        let candidates: Vec<placement::Candidate> = ses
            .iter()
            .zip(&licensed)
            .map(|(s, licensed)| {
                let enable = s.value.get("enable_state").and_then(Value::as_str).unwrap_or("SE_STATE_ENABLED");
                let restarting = install_step(&s.value).and_then(Step::parse).is_some_and(Step::is_disruptive);
                // A restart that is not disruptive hands the listening sockets to the new
                // process: the SE goes on serving what it serves (and takes nothing new meanwhile).
                let disruptive = s.value.pointer("/install_status/disruptive").and_then(Value::as_bool) == Some(true);
                let serving_through = !(restarting && disruptive);
                let draining = engines.draining.lock().unwrap_or_else(|e| e.into_inner()).contains(&s.uuid);
                let able = up[s.uuid.as_str()] && *licensed && !draining;
                placement::Candidate {
                    alive: up[s.uuid.as_str()] && serving_through,
                    uuid: s.uuid.clone(),
                    name: s.meta.name.clone().unwrap_or_default(),
                    group: uuid_of_ref(s.value.get("se_group_ref")).unwrap_or_default(),
                    takes_new: able && !restarting && enable == "SE_STATE_ENABLED",
                    keeps: able
                        && serving_through
                        && matches!(enable, "SE_STATE_ENABLED" | "SE_STATE_DISABLED_FOR_PLACEMENT"),
                }
            })
            .collect();
        let demands: Vec<placement::Demand> = cat
            .iter(VS_KIND)
            .filter(|v| v.value.get("enabled").and_then(Value::as_bool) != Some(false))
            .filter_map(|v| {
                Some(placement::Demand { uuid: v.uuid.clone(), group: uuid_of_ref(v.value.get("se_group_ref"))? })
            })
            .collect();
        let groups: HashMap<String, placement::GroupLimits> = cat
            .iter(GROUP_KIND)
            .map(|g| {
                let int = |f: &str, d: u64| g.value.get(f).and_then(Value::as_u64).unwrap_or(d) as usize;
                let packed = g.value.get("algo").and_then(Value::as_str) != Some("PLACEMENT_ALGO_DISTRIBUTED");
                let limits = placement::GroupLimits {
                    max_vs_per_se: int("max_vs_per_se", 10),
                    min_scaleout_per_vs: int("min_scaleout_per_vs", 1),
                    packed,
                };
                (g.uuid.clone(), limits)
            })
            .collect();
        let up_now = up.values().filter(|u| **u).count() as i64;
        SES_UP.set(up_now);
        SES_DOWN.set(up.len() as i64 - up_now);
        (changes, candidates, demands, groups)
    };
    if !changes.is_empty() {
        app.store
            .write(move |txn| {
                for (se, fields) in changes {
                    update_se(txn, &se, fields);
                }
                Ok::<_, ApiError>(())
            })
            .await?;
    }
    // What agents report they serve counts as placed, so a restarted controller keeps the
    // placement the data plane already has: until every SE it believes up has reported (or
    // could have), it places nothing rather than move what runs.
    if !engines.heard_from_all(&candidates) {
        return Ok(());
    }
    let current = {
        let placed = engines.placed.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = placed.by_vs.clone();
        let live = engines.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut reported: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (se, l) in live.iter() {
            for vs in &l.facts.hosted_vs {
                reported.entry(vs.clone()).or_default().push(se.clone());
            }
        }
        for (vs, mut ses) in reported {
            ses.sort();
            current.entry(vs).or_insert(ses);
        }
        current
    };
    let alive: HashMap<&str, bool> = candidates.iter().map(|c| (c.uuid.as_str(), c.alive)).collect();
    let next = placement::hand_over(
        &current,
        placement::place(&groups, &candidates, &demands, &current),
        &|se| alive.get(se).copied().unwrap_or(false),
        &|se, vs| engines.serves(se, vs),
    );
    let wanted = |d: &placement::Demand| groups.get(&d.group).map_or(1, |g| g.min_scaleout_per_vs);
    let short = demands.iter().filter(|d| next.get(&d.uuid).map_or(0, Vec::len) < wanted(d)).count();
    VS_UNPLACED.set(short as i64);
    let next_by_se = placement::by_se(&next);
    let moved: Vec<String> = {
        let mut placed = engines.placed.lock().unwrap_or_else(|e| e.into_inner());
        let mut moved: Vec<String> = next_by_se.keys().chain(placed.by_se.keys()).cloned().collect();
        moved.sort();
        moved.dedup();
        moved.retain(|se| next_by_se.get(se) != placed.by_se.get(se));
        if placed.by_vs != next {
            tracing::debug!(virtual_services = next.len(), "placement changed");
        }
        *placed = Placed { by_vs: next, by_se: next_by_se };
        engines.placement_known.store(true, std::sync::atomic::Ordering::Release);
        moved
    };
    for se in moved {
        engines.wake(&se);
    }
    Ok(())
}
