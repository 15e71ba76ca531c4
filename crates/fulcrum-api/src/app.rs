//! The request path: routing, authentication, tenant scope, the Avi response headers, and
//! metrics. Handlers for objects and system endpoints live in their own modules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use fulcrum_metrics::{Counter, Histogram, LATENCY_BUCKETS};
use fulcrum_schema::{Registry, TypeDef};
use fulcrum_store::{Catalogue, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::access::{Principal, TenantScope, resolve_tenant};
use crate::auth::{BasicAuthCache, Sessions, Throttle, cookie, verify_password};
use crate::error::ApiError;
use crate::{objects, system, version};

/// Larger bodies are refused with 413 (a pool of 5,000 servers is about 1.5 MB).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// A login is a user name and a password: anything longer is not one.
pub const MAX_LOGIN_BODY_BYTES: usize = 16 << 10;
/// What an SE agent sends before it is known (a join, a poll, an event) is small.
pub const MAX_AGENT_BODY_BYTES: usize = 1 << 20;
/// A runtime report of an SE balancing to pools of 5,000 servers.
const MAX_RUNTIME_BODY_BYTES: usize = 16 << 20;
pub const SESSION_COOKIE: &str = "avi-sessionid";

pub static HTTP_REQUESTS: Counter =
    Counter::new("fulcrum_http_requests_total", "HTTP requests by route and status.", &["route", "status"]);
pub static HTTP_SECONDS: Histogram =
    Histogram::new("fulcrum_http_request_duration_seconds", "HTTP request latency by route.", "route", LATENCY_BUCKETS);

/// The client's address, attached to each request by the server loop (for throttling and logs).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// State shared by all requests.
pub struct App {
    pub store: Store,
    /// Renderings shared by the answers of one commit (see `objects::SharedRenders`).
    pub renders: crate::objects::SharedRenders,
    pub sessions: Sessions,
    pub throttle: Throttle,
    pub basic_cache: BasicAuthCache,
    pub tls: bool,
    pub started_at: SystemTime,
    pub listen: SocketAddr,
    pub async_patches: Arc<crate::asyncpatch::AsyncPatches>,
    pub images: crate::images::Images,
    /// Set when this node is one of a cluster on etcd.
    pub cluster: Option<Arc<crate::cluster::Membership>>,
    pub engines: crate::engines::Engines,
    pub upgrade: crate::upgrade::Upgrades,
    pub data_dir: std::path::PathBuf,
    pub request_history: crate::analytics::RequestHistory,
    /// The pin of the controller's HTTPS certificate (none under plain HTTP), put in join tokens.
    pub certificate_pin: Option<String>,
}

/// A field of a singleton's stored body, read from a view already held.
pub fn setting_in(cat: &Catalogue, kind: &str, pointer: &str) -> Option<Value> {
    cat.iter(kind).next().and_then(|s| s.value.pointer(pointer).cloned())
}

impl App {
    /// Leader, or follower of whom (a single node always leads).
    pub fn role(&self) -> crate::cluster::NodeRole {
        self.cluster.as_ref().map_or(crate::cluster::NodeRole::Leader, |m| m.role())
    }

    /// A field of a singleton's stored body (`systemconfiguration`, `/portal_configuration/...`);
    /// [`setting_in`] where a view of the catalogue is already held.
    pub fn setting(&self, kind: &str, pointer: &str) -> Option<Value> {
        setting_in(&self.store.read(), kind, pointer)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        let minutes = self.setting("controllerproperties", "/api_idle_timeout").and_then(|v| v.as_u64()).unwrap_or(15);
        (minutes > 0).then(|| Duration::from_secs(minutes * 60))
    }
}

/// Everything a handler needs to know about the request beyond its body.
pub struct RequestContext {
    pub principal: Principal,
    pub scope: TenantScope,
    /// `https://host:port` as the client addressed us.
    pub base_url: String,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
}

impl RequestContext {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.query.iter().any(|(k, _)| k == name)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// This request's URL with some query parameters replaced (for `next`).
    pub fn url_with_params(&self, path: &str, overrides: &[(&str, String)]) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.query {
            if !overrides.iter().any(|(o, _)| o == k) {
                query.append_pair(k, v);
            }
        }
        for (k, v) in overrides {
            query.append_pair(k, v);
        }
        format!("{}{path}?{}", self.base_url, query.finish())
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/login", post(system::login))
        .route("/logout", post(system::logout))
        .route(crate::sessions::INTERNAL_PATH, post(crate::sessions::internal))
        .route(crate::images::replica::COPY_PATH, get(crate::images::replica::serve_copy))
        .route(crate::upgrade::nodes::TASK_PATH, post(crate::upgrade::nodes::controller_task))
        .route("/metrics", get(system::metrics))
        .route("/", get(crate::ui::index))
        .route("/ui/{*path}", get(crate::ui::asset))
        .fallback(dispatch)
        .layer(axum::middleware::from_fn(within_request_limits))
        .layer(axum::middleware::map_response_with_state(app.clone(), common_headers))
        .with_state(app)
}

/// Headers beyond this many bytes in all are refused with 431 (hyper's own, larger buffer
/// limit is only the last resort).
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// URIs beyond this many bytes are refused with 414.
pub const MAX_URI_BYTES: usize = 16 << 10;

async fn within_request_limits(req: Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let headers: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    let refusal = if uri > MAX_URI_BYTES {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request's URI is too long ({uri} bytes; the limit is {MAX_URI_BYTES})"),
        )
    } else if headers > MAX_HEADER_BYTES {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request's headers are too large ({headers} bytes; the limit is {MAX_HEADER_BYTES})"),
        )
    } else {
        return next.run(req).await;
    };
    // Such a client is not worth keeping a connection for.
    let mut response = refusal.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Headers every answer carries, login and metrics included; an error without a body (a
/// method a fixed route does not answer) gets the JSON error body every other error has.
async fn common_headers(State(app): State<Arc<App>>, mut response: Response) -> Response {
    use http_body::Body as _;
    let status = response.status();
    if (status.is_client_error() || status.is_server_error()) && response.body().size_hint().exact() == Some(0) {
        let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
        let allow = response.headers().get(header::ALLOW).cloned();
        response = ApiError::new(status, reason).into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(header::ALLOW, allow);
        }
    }
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache, must-revalidate"));
    headers.insert(header::VARY, HeaderValue::from_static("Accept, Cookie"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("SAMEORIGIN"));
    if app.tls {
        headers
            .insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"));
    }
    response
}

/// What an `/api/...` path names.
enum Route<'a> {
    ClusterStatus,
    InitialData,
    ClusterRuntime,
    ClusterVersion,
    UserAccount,
    OpenApi,
    AsyncStatus(&'a str),
    AsyncMerge,
    UploadSessions,
    UploadSession(&'a str),
    UploadSessionComplete(&'a str),
    LicenseUsage,
    AnalyticsMetrics,
    UpgradeOp(crate::upgrade::Which, bool),
    UpgradeStatusInfo(Option<&'a str>),
    UpgradeStatusSummary,
    Backups,
    Backup(&'a str),
    ConfigExport,
    SeAgentJoin,
    SeAgentPoll,
    SeAgentEvent,
    SeAgentRuntime,
    SeAgentImage(&'a str),
    /// `/api/<type>/<uuid>/<action>`: `runtime` of a virtual service, `install` and `rollback` of an SE.
    ObjectAction(&'static TypeDef, &'a str, &'a str),
    VsInventory,
    Collection(&'static TypeDef),
    Object(&'static TypeDef, &'a str),
    Singleton(&'static TypeDef),
}

impl<'a> Route<'a> {
    fn parse(segments: &[&'a str]) -> Option<Route<'a>> {
        let reg = Registry::get();
        Some(match segments {
            ["cluster", "status"] => Route::ClusterStatus,
            ["initial-data"] => Route::InitialData,
            ["cluster", "runtime"] => Route::ClusterRuntime,
            ["cluster", "version"] => Route::ClusterVersion,
            ["useraccount"] => Route::UserAccount,
            ["openapi.json"] => Route::OpenApi,
            ["pool-async", "status", id] => Route::AsyncStatus(id),
            ["pool-async", "merge"] => Route::AsyncMerge,
            ["image-upload"] => Route::UploadSessions,
            ["image-upload", id] => Route::UploadSession(id),
            ["image-upload", id, "complete"] => Route::UploadSessionComplete(id),
            ["licenseusage"] => Route::LicenseUsage,
            ["analytics", "metrics", "controller"] => Route::AnalyticsMetrics,
            ["upgradestatusinfo"] => Route::UpgradeStatusInfo(None),
            ["upgradestatusinfo", uuid] => Route::UpgradeStatusInfo(Some(uuid)),
            ["upgradestatussummary"] => Route::UpgradeStatusSummary,
            ["configuration", "backup"] => Route::Backups,
            ["configuration", "backup", name] => Route::Backup(name),
            ["configuration", "export"] => Route::ConfigExport,
            [first @ ("upgrade" | "patch" | "rollback" | "rollbackpatch" | "segroup"), ..] => {
                let (which, preview) = crate::upgrade::Which::parse(segments)?;
                let _ = first;
                Route::UpgradeOp(which, preview)
            }
            ["virtualservice-inventory"] => Route::VsInventory,
            ["se-agent", "join"] => Route::SeAgentJoin,
            ["se-agent", "poll"] => Route::SeAgentPoll,
            ["se-agent", "event"] => Route::SeAgentEvent,
            ["se-agent", "runtime"] => Route::SeAgentRuntime,
            ["se-agent", "image", id] => Route::SeAgentImage(id),
            [kind @ ("virtualservice" | "serviceengine"), uuid, action @ ("runtime" | "install" | "rollback")] => {
                Route::ObjectAction(reg.type_def(kind)?, uuid, action)
            }
            ["pool", uuid, "runtime"] => Route::ObjectAction(reg.type_def("pool")?, uuid, "runtime"),
            ["pool", uuid, "runtime", "server"] => Route::ObjectAction(reg.type_def("pool")?, uuid, "runtime/server"),
            [kind] => {
                let t = reg.type_def(kind)?;
                if t.singleton { Route::Singleton(t) } else { Route::Collection(t) }
            }
            [kind, uuid] => {
                let t = reg.type_def(kind)?;
                if t.singleton {
                    return None;
                }
                Route::Object(t, uuid)
            }
            _ => return None,
        })
    }

    /// The metrics label: a template, so the number of series stays bounded.
    fn label(&self) -> String {
        match self {
            Route::ClusterStatus => "/api/cluster/status".into(),
            Route::InitialData => "/api/initial-data".into(),
            Route::ClusterRuntime => "/api/cluster/runtime".into(),
            Route::ClusterVersion => "/api/cluster/version".into(),
            Route::UserAccount => "/api/useraccount".into(),
            Route::OpenApi => "/api/openapi.json".into(),
            Route::AsyncStatus(_) => "/api/pool-async/status/{patch_id}".into(),
            Route::AsyncMerge => "/api/pool-async/merge".into(),
            Route::UploadSessions => "/api/image-upload".into(),
            Route::UploadSession(_) => "/api/image-upload/{id}".into(),
            Route::UploadSessionComplete(_) => "/api/image-upload/{id}/complete".into(),
            Route::LicenseUsage => "/api/licenseusage".into(),
            Route::AnalyticsMetrics => "/api/analytics/metrics/controller".into(),
            Route::UpgradeOp(which, preview) => {
                format!("/api/{}{}", which.path(), if *preview { "/preview" } else { "" })
            }
            Route::UpgradeStatusInfo(None) => "/api/upgradestatusinfo".into(),
            Route::UpgradeStatusInfo(Some(_)) => "/api/upgradestatusinfo/{uuid}".into(),
            Route::UpgradeStatusSummary => "/api/upgradestatussummary".into(),
            Route::Backups => "/api/configuration/backup".into(),
            Route::Backup(_) => "/api/configuration/backup/{name}".into(),
            Route::ConfigExport => "/api/configuration/export".into(),
            Route::SeAgentJoin => "/api/se-agent/join".into(),
            Route::SeAgentPoll => "/api/se-agent/poll".into(),
            Route::SeAgentEvent => "/api/se-agent/event".into(),
            Route::SeAgentRuntime => "/api/se-agent/runtime".into(),
            Route::SeAgentImage(_) => "/api/se-agent/image/{uuid}".into(),
            Route::ObjectAction(t, _, action) => format!("/api/{}/{{uuid}}/{action}", t.path),
            Route::VsInventory => "/api/virtualservice-inventory".into(),
            Route::Collection(t) | Route::Singleton(t) => format!("/api/{}", t.path),
            Route::Object(t, _) => format!("/api/{}/{{uuid}}", t.path),
        }
    }

    fn needs_auth(&self) -> bool {
        !matches!(self, Route::ClusterStatus | Route::InitialData) && !self.is_agent()
    }

    /// Called by SE agents, with a join token or an SE credential instead of a user's.
    fn is_agent(&self) -> bool {
        matches!(
            self,
            Route::SeAgentJoin
                | Route::SeAgentPoll
                | Route::SeAgentEvent
                | Route::SeAgentRuntime
                | Route::SeAgentImage(_)
        )
    }
}

/// `X-Avi-Version` must look like `30.2.1` (or `16_4_2`).
fn api_version(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("x-avi-version") else {
        return Ok(None);
    };
    let v = raw.to_str().unwrap_or_default().trim();
    let parts: Vec<&str> = v.split(['.', '_']).collect();
    if (2..=4).contains(&parts.len())
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 6 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        Ok(Some(v.to_string()))
    } else {
        Err(ApiError::bad_request(format!("Invalid version: '{v}' (expected a version such as {})", version::VERSION)))
    }
}

/// The client's address and port, as passed on to the leader.
pub fn client_addr(parts: &Parts) -> String {
    parts.extensions.get::<ClientAddr>().map_or_else(|| "unknown".into(), |c| c.0.to_string())
}

pub fn client_ip(parts: &Parts) -> String {
    parts.extensions.get::<ClientAddr>().map_or_else(|| "unknown".into(), |c| c.0.ip().to_string())
}

pub fn base_url(app: &App, headers: &HeaderMap) -> String {
    let scheme = if app.tls { "https" } else { "http" };
    let host =
        headers.get(header::HOST).and_then(|h| h.to_str().ok()).map_or_else(|| app.listen.to_string(), String::from);
    format!("{scheme}://{host}")
}

/// Bodies beyond the limit are still read (and dropped) up to this size, so the client gets
/// its 413 instead of a connection reset while it is still sending.
pub const DRAIN_LIMIT_BYTES: usize = 64 << 20;

/// Reads and drops up to `limit` more bytes of a body whose request was refused early (a
/// streamed upload), so the client reads the answer instead of a reset connection.
pub async fn discard_body(body: &mut Body, limit: usize) {
    let mut budget = limit;
    while budget > 0 {
        match body.frame().await {
            Some(Ok(frame)) => budget = budget.saturating_sub(frame.data_ref().map_or(0, |d| d.len())),
            _ => return,
        }
    }
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    read_body_within(body, MAX_BODY_BYTES).await
}

/// Reads a body of at most `limit` bytes into memory; a larger one is refused with 413 (and
/// read on, without keeping it, up to [`DRAIN_LIMIT_BYTES`], so the client gets the answer).
pub async fn read_body_within(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut buffer = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(body_error)?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= limit {
            buffer.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT_BYTES {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(Bytes::from(buffer))
}

/// A body that could not be read: 408 when it stopped arriving, else 400.
pub fn body_error(e: axum::Error) -> ApiError {
    let cause = e.into_inner();
    if crate::connections::is_body_timeout(&*cause) {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, cause.to_string())
    } else {
        ApiError::bad_request(format!("cannot read the request body: {cause}"))
    }
}

/// Checks the caller's credentials: HTTP Basic, or a session cookie with its CSRF token on
/// unsafe methods.
pub async fn authenticate(app: &Arc<App>, parts: &Parts) -> Result<Principal, ApiError> {
    let headers = &parts.headers;
    if let Some(basic) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic "))
    {
        return authenticate_basic(app, parts, basic.trim()).await;
    }
    let cookies = || headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    let session_id = cookie(cookies(), SESSION_COOKIE)
        .or_else(|| cookie(cookies(), "sessionid"))
        .ok_or_else(|| ApiError::unauthorized("Authentication credentials were not provided."))?;
    let session = crate::sessions::check(app, &session_id, app.idle_timeout())
        .ok_or_else(|| ApiError::unauthorized("Session expired or invalid; log in again."))?;
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && headers.get("x-csrftoken").and_then(|v| v.to_str().ok()) != Some(session.csrf_token.as_str()) {
        return Err(ApiError::unauthorized("CSRF token missing or incorrect."));
    }
    let cat = app.store.read();
    let user = cat
        .get("user", &session.user_uuid)
        .filter(|u| u.value.get("is_active").and_then(Value::as_bool) != Some(false))
        .ok_or_else(|| ApiError::unauthorized("The session's user no longer exists."))?;
    let hash = user.value.get("_password_hash").and_then(Value::as_str).unwrap_or_default();
    // Not removed here: the user's own change rebinds its session just after committing.
    if !session.matches_password(hash) {
        return Err(ApiError::unauthorized("The password changed since this session began; log in again."));
    }
    let mut principal = Principal::from_user(&cat, user);
    principal.session = Some(session_id);
    Ok(principal)
}

async fn authenticate_basic(app: &App, parts: &Parts, encoded: &str) -> Result<Principal, ApiError> {
    let allowed = app
        .setting("systemconfiguration", "/portal_configuration/allow_basic_authentication")
        .and_then(|v| v.as_bool());
    if allowed == Some(false) {
        return Err(ApiError::unauthorized(
            "Basic authentication is disabled (systemconfiguration.portal_configuration.allow_basic_authentication)",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| ApiError::unauthorized("malformed Basic authorization header"))?;
    let (username, password) =
        decoded.split_once(':').ok_or_else(|| ApiError::unauthorized("malformed Basic authorization header"))?;
    check_password(app, &client_ip(parts), username, password).await
}

/// Verifies a user's password, with throttling; returns the principal.
pub async fn check_password(app: &App, client: &str, username: &str, password: &str) -> Result<Principal, ApiError> {
    let now = Instant::now();
    let found = {
        let cat = app.store.read();
        cat.find_by_name("user", "", username)
            .filter(|u| u.value.get("is_active").and_then(Value::as_bool) != Some(false))
            .and_then(|u| Some((u.uuid.clone(), u.value.get("_password_hash")?.as_str()?.to_string())))
    };
    // Credentials already verified (HTTP Basic sends them on every request) go through even
    // while this address is throttled: someone else guessing from it must not lock them out.
    let known_good = found.as_ref().is_some_and(|(_, hash)| app.basic_cache.is_verified(username, password, hash));
    if !known_good && app.throttle.is_blocked(client, username, now) {
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Too many failed login attempts; try again later."));
    }
    let ok = match &found {
        _ if known_good => true,
        Some((_, hash)) => {
            let (p, h) = (password.to_string(), hash.clone());
            let ok = tokio::task::spawn_blocking(move || verify_password(&p, &h)).await.unwrap_or(false);
            if ok {
                app.basic_cache.remember(username, password, hash);
            }
            ok
        }
        None => {
            // The same work as a real check, so the answer's timing does not say the name is unknown.
            let p = password.to_string();
            let _ = tokio::task::spawn_blocking(move || verify_password(&p, crate::auth::decoy_hash())).await;
            false
        }
    };
    if !ok {
        app.throttle.record_failure(client, username, now);
        return Err(ApiError::unauthorized("Invalid credentials"));
    }
    app.throttle.record_success(client, username);
    let cat = app.store.read();
    let (uuid, _) = found.expect("verified user exists");
    let user = cat.get("user", &uuid).ok_or_else(|| ApiError::unauthorized("Invalid credentials"))?;
    Ok(Principal::from_user(&cat, user))
}

fn path_segments(path: &str) -> Vec<&str> {
    // The SDK sends `/api//pool/...` and Ansible `/api/cluster/`: empty segments carry no meaning.
    path.split('/').filter(|s| !s.is_empty()).collect()
}

async fn dispatch(State(app): State<Arc<App>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let method = parts.method.clone();
    let segments = path_segments(&path);
    let route = match segments.split_first() {
        Some((&"api", rest)) => Route::parse(rest),
        _ => None,
    };
    let label = route.as_ref().map_or_else(|| "unknown".to_string(), Route::label);
    let version = api_version(&parts.headers);
    let mut response = match (route, &version) {
        (_, Err(e)) => e.clone().into_response(),
        (None, _) => ApiError::not_found(format!("no such API path: {path}")).into_response(),
        (Some(route), Ok(_)) => handle(&app, parts, body, route).await.unwrap_or_else(IntoResponse::into_response),
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && !response.headers().contains_key(header::ALLOW)
        && let Some(allow) = system::allowed_methods(&label).and_then(|m| HeaderValue::from_str(&m).ok())
    {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    let headers = response.headers_mut();
    let shown_version = version.ok().flatten().unwrap_or_else(|| version::VERSION.to_string());
    if let Ok(v) = HeaderValue::from_str(&shown_version) {
        headers.insert("AVI_API_VERSION", v);
    }
    HTTP_REQUESTS.add(&[&label, response.status().as_str()], 1);
    HTTP_SECONDS.observe(&label, started.elapsed().as_secs_f64());
    tracing::debug!(%method, route = %label, status = response.status().as_u16(), micros = started.elapsed().as_micros() as u64, "request");
    response
}

async fn handle(app: &Arc<App>, mut parts: Parts, body: Body, route: Route<'_>) -> Result<Response, ApiError> {
    let method = parts.method.clone();
    // Besides the schema's types, only what the endpoint table lists is answered, and only with
    // the methods it lists: the OpenAPI document is made from the same table.
    if !matches!(route, Route::Collection(_) | Route::Object(..) | Route::Singleton(_)) {
        let label = route.label();
        let endpoint = crate::endpoints::find(&label)
            .ok_or_else(|| ApiError::not_found(format!("no such API path: {}", parts.uri.path())))?;
        if !endpoint.methods.iter().any(|m| *m == method.as_str()) {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
    }
    if let Some(membership) = &app.cluster {
        // Passed on by a follower: the client is who the follower says it is.
        if parts.headers.contains_key(crate::forward::FORWARDED)
            && crate::cluster::from_peer(app, &parts.headers)
            && let Some(client) = parts
                .headers
                .get(crate::cluster::CLIENT_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<SocketAddr>().ok())
        {
            parts.extensions.insert(ClientAddr(client));
        }
        let safe = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
        // Uploads stream to the node that keeps the file: the leader only (refused below).
        let upload = matches!((&route, &method), (Route::Collection(t), &Method::POST) if t.path == crate::images::KIND)
            || matches!(route, Route::UploadSessions | Route::UploadSession(_) | Route::UploadSessionComplete(_));
        // Agents' heartbeats and reports are passed on too: an agent may talk to any node. So
        // are reads of what only the leader knows: SEs' last heartbeats and where virtual
        // services run (its placement and what the SEs report to it are in its memory). With
        // no leader those reads are answered here, from the catalogue alone.
        // An upgrade's preview changes nothing but judges what the leader knows (the SEs'
        // heartbeats): the leader answers it, or, with no leader, this node (whose checks then
        // say the cluster is not ready).
        let preview = matches!((&route, &method), (Route::UpgradeOp(_, true), &Method::POST));
        let leader_knows = preview
            || (safe
                && match &route {
                    Route::ObjectAction(t, _, "runtime" | "runtime/server") => {
                        matches!(t.path, "virtualservice" | "pool")
                    }
                    Route::VsInventory => true,
                    Route::Collection(t) | Route::Object(t, _) => t.path == crate::engines::SE_KIND,
                    _ => false,
                });
        let follower = matches!(membership.role(), crate::cluster::NodeRole::Follower { .. });
        let pass_on = (!safe && !preview) || (leader_knows && membership.leader().is_some());
        if pass_on && !upload && follower {
            if parts.headers.contains_key(crate::forward::FORWARDED) {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this node is not the leader any more; retry the request",
                ));
            }
            let body = read_body(body).await?;
            let hop = crate::cluster::Hop::new(app, membership, client_addr(&parts));
            return crate::cluster::pass_on(membership, &hop, &parts, body).await;
        }
        // A read sees every write acknowledged before it arrived, whichever node answered it.
        // Without a quorum (etcd unreachable) the catalogue is served as it is.
        if safe
            && route.needs_auth()
            && let Some(applied) = app.store.applied()
            && let Err(e) = membership.cluster.consistent(applied, Duration::from_secs(2)).await
        {
            tracing::warn!(error = %e, "serving a read without confirming it is current");
        }
    }
    match (&route, &method) {
        (Route::ClusterStatus, &Method::GET) => return Ok(system::cluster_status(app).await),
        (Route::InitialData, &Method::GET) => return Ok(system::initial_data(app)),
        (Route::SeAgentImage(id), &Method::GET) => {
            // A node serves its verified copy; one still without it sends the agent on (it
            // tries its other controllers).
            if !app.images.has_verified_copy(&app.store.read(), id) {
                crate::cluster::require_leader(&app.role(), "An image download")?;
            }
            return crate::engines::agent::image(app, &parts.headers, id).await;
        }
        (
            r @ (Route::SeAgentJoin | Route::SeAgentPoll | Route::SeAgentEvent | Route::SeAgentRuntime),
            &Method::POST,
        ) => {
            // A runtime report lists every server of every pool the SE balances to.
            let limit = if matches!(r, Route::SeAgentRuntime) { MAX_RUNTIME_BODY_BYTES } else { MAX_AGENT_BODY_BYTES };
            let body = read_body_within(body, limit).await?;
            return match r {
                Route::SeAgentJoin => crate::engines::agent::join(app, &body).await,
                Route::SeAgentPoll => crate::engines::agent::poll(app, &parts.headers, &body).await,
                Route::SeAgentRuntime => crate::engines::agent::runtime(app, &parts.headers, &body),
                _ => crate::engines::agent::event(app, &parts.headers, &body).await,
            };
        }
        (r, _) if !r.needs_auth() => return Err(ApiError::method_not_allowed(method.as_str())),
        _ => {}
    }
    // Package uploads stream their body to disk; it is never read into memory.
    let streams_body = matches!(
        (&route, &method),
        (Route::Collection(t), &Method::POST) if t.path == crate::images::KIND
    ) || matches!((&route, &method), (Route::UploadSession(_), &Method::PUT));
    // Credentials first: nothing of an unauthenticated body is kept in memory. A refused body
    // is still read (and dropped, up to the body limit) so the connection stays usable for the
    // client's next request.
    let mut body = body;
    let principal = match authenticate(app, &parts).await {
        Ok(principal) => principal,
        Err(e) => {
            discard_body(&mut body, MAX_BODY_BYTES).await;
            return Err(e);
        }
    };
    let (body, streamed) = if streams_body {
        (Bytes::new(), Some(body))
    } else {
        // Read the body before anything else can refuse the request, for the same reason.
        (read_body(body).await?, None)
    };
    let scope = {
        let cat = app.store.read();
        resolve_tenant(&cat, &principal, &parts.headers)?
    };
    let query =
        parts.uri.query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
    let ctx = RequestContext {
        principal,
        scope,
        base_url: base_url(app, &parts.headers),
        query,
        headers: std::mem::take(&mut parts.headers),
    };
    if method.as_str() != "PATCH" && method.as_str().eq_ignore_ascii_case("PATCH") {
        return Err(ApiError::bad_request(format!(
            "HTTP methods are case-sensitive: the method must be spelled 'PATCH', not '{method}'"
        )));
    }
    if let Some(stream) = streamed {
        return match route {
            Route::UploadSession(id) => crate::images::put_chunk(app, &ctx, id, stream).await,
            _ => crate::images::upload(app, &ctx, stream).await,
        };
    }
    let is_image = |t: &TypeDef| t.path == crate::images::KIND;
    let is = |t: &TypeDef, kind: &str| t.path == kind;
    let config_write =
        matches!(route, Route::Collection(_) | Route::Object(..) | Route::Singleton(_) | Route::ObjectAction(..))
            && !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if config_write {
        app.upgrade.refuse_config_write()?;
    }
    match (route, method) {
        (Route::UpgradeOp(which, preview), Method::POST) => {
            crate::upgrade::operate(app, &ctx, which, preview, &body).await
        }
        (Route::UpgradeStatusInfo(uuid), Method::GET) => crate::upgrade::status_info(app, &ctx, uuid),
        (Route::UpgradeStatusSummary, Method::GET) => crate::upgrade::status_summary(app, &ctx),
        (Route::Backups, Method::POST) => crate::upgrade::backup::create(app, &ctx).await,
        (Route::Backups, Method::GET) => crate::upgrade::backup::index(app, &ctx),
        (Route::Backup(name), Method::GET) => crate::upgrade::backup::download(app, &ctx, name),
        (Route::ConfigExport, Method::GET) => crate::upgrade::backup::export_now(app, &ctx),
        (Route::LicenseUsage, Method::GET) => Ok(crate::engines::license_usage(app)),
        (Route::AnalyticsMetrics, Method::GET) => crate::analytics::controller_metrics(app, &ctx),
        (Route::Collection(t), Method::POST) if is(t, crate::engines::TOKEN_KIND) => {
            crate::engines::create_token(app, &ctx, &body).await
        }
        (Route::Object(t, uuid), Method::DELETE) if is(t, crate::engines::TOKEN_KIND) => {
            crate::engines::revoke_token(app, &ctx, uuid).await
        }
        (Route::Object(t, uuid), Method::DELETE) if is(t, crate::engines::SE_KIND) => {
            crate::engines::delete_se(app, &ctx, uuid).await
        }
        (Route::VsInventory, Method::GET) => crate::objects::vs_inventory(app, &ctx),
        (Route::ObjectAction(t, uuid, "runtime"), Method::GET) if is(t, "virtualservice") => {
            crate::engines::vs_runtime(app, &ctx, uuid)
        }
        (Route::ObjectAction(t, uuid, which @ ("runtime" | "runtime/server")), Method::GET) if is(t, "pool") => {
            crate::engines::pool_runtime(app, &ctx, uuid, which == "runtime/server")
        }
        (Route::ObjectAction(t, uuid, "install"), Method::POST) if is(t, crate::engines::SE_KIND) => {
            crate::engines::command(app, &ctx, uuid, "SE_INSTALL", &body).await
        }
        (Route::ObjectAction(t, uuid, "rollback"), Method::POST) if is(t, crate::engines::SE_KIND) => {
            crate::engines::command(app, &ctx, uuid, "SE_ROLLBACK", &body).await
        }
        (Route::UploadSessions, Method::POST) => crate::images::create_session(app, &ctx, &body).await,
        (Route::UploadSession(id), Method::GET) => crate::images::session_status(app, &ctx, id).await,
        (Route::UploadSession(id), Method::DELETE) => crate::images::abort_session(app, &ctx, id).await,
        (Route::UploadSessionComplete(id), Method::POST) => crate::images::complete_session(app, &ctx, id, &body).await,
        (Route::Object(t, uuid), Method::DELETE) if is_image(t) => crate::images::delete(app, &ctx, uuid).await,
        (Route::Object(t, _), method @ (Method::PUT | Method::PATCH)) if is_image(t) => {
            Err(crate::images::refuse_edit(method.as_str()))
        }
        (Route::ClusterRuntime, Method::GET) => Ok(system::cluster_runtime(app).await),
        (Route::ClusterVersion, Method::GET) => Ok(system::cluster_version(app)),
        (Route::OpenApi, Method::GET) => Ok(system::openapi()),
        (Route::UserAccount, Method::GET) => system::get_user_account(app, &ctx),
        (Route::UserAccount, Method::PUT) => system::put_user_account(app, &ctx, &body).await,
        (Route::Collection(t), Method::GET) => objects::list(app, &ctx, t),
        (Route::Collection(t), Method::POST) => objects::create(app, &ctx, t, &body).await,
        (Route::Object(t, uuid), Method::GET) => objects::get(app, &ctx, t, uuid),
        (Route::Object(t, uuid), Method::PUT) => objects::replace(app, &ctx, t, uuid, &body).await,
        (Route::Object(t, uuid), Method::DELETE) => objects::delete(app, &ctx, t, uuid).await,
        (Route::Object(t, uuid), Method::PATCH) if async_requested(app, &ctx) => {
            crate::asyncpatch::accept(app, &ctx, t, uuid, &body).await
        }
        (Route::Object(t, uuid), Method::PATCH) => objects::patch(app, &ctx, t, uuid, &body).await,
        (Route::AsyncStatus(id), Method::GET) => crate::asyncpatch::status(app, &ctx, id),
        (Route::AsyncMerge, Method::POST) => crate::asyncpatch::merge_now(app, &ctx, &body).await,
        (Route::Singleton(t), Method::PATCH) if async_requested(app, &ctx) => {
            crate::asyncpatch::accept(app, &ctx, t, &objects::singleton_uuid(app, t)?, &body).await
        }
        (Route::Singleton(t), Method::PATCH) => {
            objects::patch(app, &ctx, t, &objects::singleton_uuid(app, t)?, &body).await
        }
        (Route::Singleton(t), Method::GET) => objects::get(app, &ctx, t, &objects::singleton_uuid(app, t)?),
        (Route::Singleton(t), Method::PUT) => {
            objects::replace(app, &ctx, t, &objects::singleton_uuid(app, t)?, &body).await
        }
        (_, method) => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

/// `?async_mode` (or `=true`) while a merge period is set; with the period at 0 the request is
/// handled synchronously, as the product does.
fn async_requested(app: &App, ctx: &RequestContext) -> bool {
    let asked = ctx.param("async_mode").is_some_and(|v| !v.eq_ignore_ascii_case("false"));
    asked && app.setting("controllerproperties", "/async_patch_merge_period").and_then(|v| v.as_u64()).unwrap_or(0) > 0
}

/// A JSON response with a status.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `{}` with status 200.
pub fn empty_ok() -> Response {
    json_response(StatusCode::OK, &json!({}))
}
