//! Endpoints that are not plain objects: login/logout, the cluster views, initial-data, the
//! user's own account, OpenAPI and metrics.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_schema::{Registry, RenderOptions, refs, render};
use serde_json::{Value, json};

use crate::access::Principal;
use crate::app::{
    App, HTTP_REQUESTS, HTTP_SECONDS, RequestContext, SESSION_COOKIE, base_url, check_password, client_ip,
    json_response,
};
use crate::auth::{hash_password, verify_password};
use crate::error::ApiError;
use crate::version;

fn now_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn cluster_uuid(app: &App) -> String {
    app.store.read().iter("cluster").next().map(|c| c.uuid.clone()).unwrap_or_default()
}

pub async fn cluster_status(app: &App) -> Response {
    let view = cluster_view(app).await;
    json_response(
        StatusCode::OK,
        &json!({
            "cluster_state": {"state": view.state(), "progress": 100, "up_since": version::rfc3339(app.started_at)},
            "store": store_health(app),
        }),
    )
}

/// Whether the store commits: a full disk shows here (and in /metrics) until space is back.
fn store_health(app: &App) -> Value {
    let health = app.store.health();
    json!({
        "healthy": health.is_healthy(),
        "failing_since": health.failing_since.map(version::rfc3339),
        "last_error": health.last_error,
        "failed_commits": health.failed_commits,
    })
}

pub fn initial_data(app: &App) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "current_time": version::rfc3339(SystemTime::now()),
            "setup_failed": false,
            "email_configuration_is_set": false,
            "error_message": "",
            "user_initial_setup": false,
            "sso": false,
            "sso_logged_in": false,
            "banner": "",
            "version": version::info(&app.upgrade.slots.running()),
            "up_since": now_secs(app.started_at),
        }),
    )
}

/// The controllers of the cluster as this node sees them, and who leads.
pub struct ClusterView {
    pub nodes: Vec<fulcrum_store::election::NodeState>,
    pub leader: Option<String>,
    /// This node's name.
    pub me: String,
}

impl ClusterView {
    /// The product's cluster state (`CLUSTER_UP_HA_ACTIVE`, …).
    pub fn state(&self) -> &'static str {
        let up = self.nodes.iter().filter(|n| n.up).count();
        fulcrum_store::election::cluster_state(self.nodes.len(), up, self.leader.is_some())
    }
}

/// A single node is its own cluster; a cluster node asks etcd (and, without etcd, knows only
/// itself).
pub async fn cluster_view(app: &App) -> ClusterView {
    let started = app.started_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let only_me = |name: String, advertise: String| {
        vec![fulcrum_store::election::NodeState {
            name,
            advertise,
            pin: None,
            host: Value::Null,
            up: true,
            up_since: Some(started),
            incarnation: None,
        }]
    };
    let Some(membership) = &app.cluster else {
        let ip = app.listen.ip().to_string();
        return ClusterView { nodes: only_me(ip.clone(), ip.clone()), leader: Some(ip.clone()), me: ip };
    };
    let me = membership.me();
    let nodes = match membership.nodes().await {
        Ok(nodes) if !nodes.is_empty() => nodes,
        _ => only_me(me.node.clone(), me.advertise.clone()),
    };
    ClusterView { nodes, leader: membership.current_leader().await.map(|l| l.node), me: me.node }
}

/// What the stored `cluster` object's `nodes` should say: every controller that ever joined.
pub fn member_nodes(nodes: &[fulcrum_store::election::NodeState]) -> Value {
    let mut listed: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let ip = host_of(&n.advertise);
            let family = if ip.contains(':') { "V6" } else { "V4" };
            json!({"name": n.name, "ip": {"addr": ip, "type": family}})
        })
        .collect();
    listed.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Value::Array(listed)
}

/// Leader-only: keeps `/api/cluster`'s `nodes` equal to the controllers that joined the etcd
/// cluster (membership is made by `serve --etcd`, not by editing the object).
pub async fn run_cluster_object(app: std::sync::Arc<App>) {
    let Some(membership) = app.cluster.clone() else { return };
    loop {
        if let Ok(nodes) = membership.nodes().await
            && !nodes.is_empty()
        {
            let wanted = member_nodes(&nodes);
            let stored = app.store.read().iter("cluster").next().cloned();
            if let Some(stored) = stored.filter(|s| s.value.get("nodes") != Some(&wanted)) {
                let uuid = stored.uuid.clone();
                let result = app
                    .store
                    .write(move |txn| {
                        if let Some(current) = txn.get("cluster", &uuid) {
                            let mut value = current.value.clone();
                            value["nodes"] = wanted;
                            value["_last_modified"] = json!(txn.timestamp_micros().to_string());
                            txn.put("cluster", &uuid, value);
                        }
                        Ok::<_, ApiError>(())
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %ApiError::from(e), "cannot list the cluster's nodes in /api/cluster");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// The host of a node's address, as `mgmt_ip` shows it.
pub(crate) fn host_of(advertise: &str) -> String {
    let rest = advertise.split_once("://").map_or(advertise, |(_, r)| r);
    rest.rsplit_once(':').map_or(rest, |(h, _)| h).trim_matches(['[', ']']).to_string()
}

pub async fn cluster_runtime(app: &App) -> Response {
    let view = cluster_view(app).await;
    let state = view.state();
    let since = |secs: Option<u64>| secs.map(|s| version::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s)));
    let node_states: Vec<Value> = view
        .nodes
        .iter()
        .map(|n| {
            let leads = view.leader.as_deref() == Some(n.name.as_str());
            json!({
                "name": n.name, "mgmt_ip": host_of(&n.advertise),
                "role": if leads { "CLUSTER_LEADER" } else { "CLUSTER_FOLLOWER" },
                "state": if n.up { "CLUSTER_ACTIVE" } else { "CLUSTER_INACTIVE" },
                "up_since": since(n.up_since),
            })
        })
        .collect();
    let ip = app.listen.ip().to_string();
    json_response(
        StatusCode::OK,
        &json!({
            "node_info": {"cluster_uuid": cluster_uuid(app), "mgmt_ip": ip, "uuid": format!("node-{}", view.me), "name": view.me, "version": app.upgrade.slots.running().tag},
            "cluster_state": {"state": state, "up_since": version::rfc3339(app.started_at), "progress": 100},
            "node_states": node_states,
            "service_states": [],
        }),
    )
}

pub fn cluster_version(app: &App) -> Response {
    json_response(StatusCode::OK, &version::info(&app.upgrade.slots.running()))
}

/// The schema's object types, and every other endpoint from the one table the router obeys.
pub fn openapi() -> Response {
    json_response(StatusCode::OK, cached_openapi_document())
}

/// The document is the same for the life of the process: made once.
fn cached_openapi_document() -> &'static Value {
    static DOCUMENT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(openapi_document)
}

/// What `Allow` says for a path template (as routes label themselves): the methods the
/// OpenAPI document lists for it, which are the methods the router answers.
pub fn allowed_methods(template: &str) -> Option<String> {
    let item = cached_openapi_document()["paths"].get(template)?.as_object()?;
    let methods: Vec<String> = ["get", "post", "put", "patch", "delete"]
        .iter()
        .filter(|m| item.contains_key(**m))
        .map(|m| m.to_ascii_uppercase())
        .collect();
    Some(methods.join(", "))
}

pub fn openapi_document() -> Value {
    let mut doc = fulcrum_schema::openapi::document(version::VERSION);
    let ok = json!({"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}});
    let paths = doc["paths"].as_object_mut().expect("the document has paths");
    for endpoint in crate::endpoints::ENDPOINTS {
        let tag = endpoint.path.trim_start_matches("/api/").split('/').next().unwrap_or_default().to_string();
        let mut item = serde_json::Map::new();
        let params: Vec<Value> = endpoint
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            item.insert("parameters".into(), Value::Array(params));
        }
        for method in endpoint.methods {
            // Fixed endpoints answer 200, 201 (made something) or 204 (nothing to say).
            let success = if endpoint.path == "/metrics" {
                json!({"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}})
            } else {
                ok.clone()
            };
            let responses = fulcrum_schema::openapi::responses(method, json!({"2XX": success}));
            let mut operation = json!({"tags": [tag], "summary": endpoint.summary, "responses": responses});
            if endpoint.public {
                operation["security"] = json!([]);
            }
            item.insert(method.to_ascii_lowercase(), operation);
        }
        paths.insert(endpoint.path.to_string(), Value::Object(item));
    }
    // Image records describe uploaded packages: made by a multipart upload, never edited.
    let image = crate::images::KIND;
    if let Some(item) = paths.get_mut(&format!("/api/{image}/{{uuid}}")).and_then(Value::as_object_mut) {
        item.remove("put");
        item.remove("patch");
    }
    // The type is made by the system (no JSON create), but its records are made by uploads.
    if let Some(item) = paths.get_mut(&format!("/api/{image}")).and_then(Value::as_object_mut) {
        let made =
            json!({"description": "The image record", "content": {"application/json": {"schema": {"type": "object"}}}});
        item.insert(
            "post".into(),
            json!({
                "tags": [image],
                "summary": "Upload a signed package: multipart/form-data with the package in the field 'file'.",
                "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}},
                "responses": fulcrum_schema::openapi::responses("post", json!({"201": made})),
            }),
        );
    }
    doc
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    let health = app.store.health();
    let _ = writeln!(
        out,
        "# HELP fulcrum_store_healthy Whether the last commit to the store succeeded.\n# TYPE fulcrum_store_healthy gauge\n\
         fulcrum_store_healthy {}\n# HELP fulcrum_store_failed_commits_total Commits that failed (a full disk, an I/O error).\n\
         # TYPE fulcrum_store_failed_commits_total counter\nfulcrum_store_failed_commits_total {}",
        u8::from(health.is_healthy()),
        health.failed_commits
    );
    HTTP_REQUESTS.render(&mut out);
    HTTP_SECONDS.render(&mut out);
    fulcrum_store::writer::COMMIT_SECONDS.render(&mut out);
    fulcrum_store::writer::COMMIT_BATCH_SIZE.render(&mut out);
    crate::objects::SHARED_RENDERS.render(&mut out);
    crate::asyncpatch::QUEUE_DEPTH.render(&mut out);
    crate::asyncpatch::MERGE_SECONDS.render(&mut out);
    crate::asyncpatch::MERGED_PER_CYCLE.render(&mut out);
    crate::images::UPLOAD_BYTES.render(&mut out);
    crate::images::UPLOADS.render(&mut out);
    crate::images::UPLOADS_IN_FLIGHT.render(&mut out);
    crate::engines::render_metrics(&mut out);
    let mut response = out.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// Username and password from a form-encoded (Python SDK) or JSON (Go SDK) body.
fn login_fields(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), ApiError> {
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.contains("json"));
    let (user, password, token) = if is_json {
        let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        (field("username"), field("password"), field("token"))
    } else {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        let field = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        (field("username"), field("password"), field("token"))
    };
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| ApiError::unauthorized("username is required"))?;
    match (password, token) {
        (Some(p), _) => Ok((user, p)),
        (None, Some(_)) => Err(ApiError::unauthorized("token login is not supported; log in with a password")),
        (None, None) => Err(ApiError::unauthorized("password is required")),
    }
}

fn cookie_header(name: &str, value: &str, max_age: u64, http_only: bool, secure: bool) -> HeaderValue {
    let mut c = format!("{name}={value}; Max-Age={max_age}; Path=/; SameSite=Lax");
    if http_only {
        c.push_str("; HttpOnly");
    }
    if secure {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).expect("cookie values are alphanumeric")
}

fn user_json(app: &App, base: &str, principal: &Principal) -> Value {
    let cat = app.store.read();
    let user = cat.get("user", &principal.user_uuid).map(|u| u.value.clone()).unwrap_or_default();
    json!({
        "is_superuser": principal.is_superuser(),
        "default_tenant_ref": refs::render(base, &refs::canonical("tenant", &principal.default_tenant), None),
        "name": user.get("name"),
        "username": principal.username,
        "full_name": user.get("full_name").cloned().unwrap_or(json!("")),
        "email": user.get("email").cloned().unwrap_or(json!("")),
        "local": true,
        "uuid": principal.user_uuid,
        "ui_property": "",
        // Fulcrum's: what the user may do in their default tenant, so a client offers only
        // the actions the API would accept.
        "privileges": principal
            .privileges(&principal.default_tenant)
            .into_iter()
            .map(|(resource, level)| json!({"resource": resource, "type": level.as_str()}))
            .collect::<Vec<_>>(),
    })
}

pub async fn login(State(app): State<Arc<App>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let result: Result<Response, ApiError> = async {
        let body = crate::app::read_body_within(body, crate::app::MAX_LOGIN_BODY_BYTES).await?;
        let (username, password) = login_fields(&parts.headers, &body)?;
        let principal = check_password(&app, &client_ip(&parts), &username, &password).await?;
        let hash = app.store.read().get("user", &principal.user_uuid).and_then(|u| {
            u.value.get("_password_hash").and_then(Value::as_str).map(String::from)
        });
        let (session_id, session) =
            crate::sessions::begin(&app, &principal.user_uuid, &hash.unwrap_or_default()).await?;
        let csrf = session.csrf_token;
        let base = base_url(&app, &parts.headers);
        let cat = app.store.read();
        let tenants: Vec<Value> = principal
            .tenants(&cat)
            .iter()
            .map(|t| json!({"url": refs::render(&base, &t.path(), None), "uuid": t.uuid, "name": t.meta.name, "local": true}))
            .collect();
        let reg = Registry::get();
        let system_config = cat.iter("systemconfiguration").next().map(|s| {
            let map = s.value.as_object().cloned().unwrap_or_default();
            let t = reg.type_def("systemconfiguration").expect("defined");
            render(reg, t, &map, &RenderOptions { base_url: "", ..Default::default() }, &|_| None)
        });
        let idle = crate::app::setting_in(&cat, "controllerproperties", "/api_idle_timeout").unwrap_or(json!(15));
        drop(cat);
        let body = json!({
            "user_initialized": true,
            "version": version::info(&app.upgrade.slots.running()),
            "user": user_json(&app, &base, &principal),
            "tenants": tenants,
            "system_config": system_config,
            "controller": {"api_idle_timeout": idle},
            "session_cookie_name": SESSION_COOKIE,
        });
        let mut response = json_response(StatusCode::OK, &body);
        let headers = response.headers_mut();
        headers.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        let secure = app.tls;
        headers.append(header::SET_COOKIE, cookie_header("csrftoken", &csrf, 31_449_600, false, secure));
        headers.append(header::SET_COOKIE, cookie_header(SESSION_COOKIE, &session_id, 86_400, true, secure));
        headers.append(header::SET_COOKIE, cookie_header("sessionid", &session_id, 86_400, true, secure));
        tracing::info!(user = %username, client = %client_ip(&parts), "login");
        Ok(response)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let cookies = || headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    for name in [SESSION_COOKIE, "sessionid"] {
        if let Some(id) = crate::auth::cookie(cookies(), name)
            && let Err(e) = crate::sessions::end(&app, &id).await
        {
            return e.into_response();
        }
    }
    crate::app::empty_ok()
}

pub fn get_user_account(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, &user_json(app, &ctx.base_url, &ctx.principal)))
}

/// `PUT /api/useraccount {"old_password", "password"[, "full_name", "email"]}`: a user changes
/// their own password. Answers 200 with an empty body, like the controller.
pub async fn put_user_account(app: &App, ctx: &RequestContext, body: &Bytes) -> Result<Response, ApiError> {
    let input: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    let field = |k: &str| input.get(k).and_then(Value::as_str).map(String::from);
    let min_len = app
        .setting("systemconfiguration", "/portal_configuration/minimum_password_length")
        .and_then(|v| v.as_u64())
        .unwrap_or(8) as usize;
    let uuid = ctx.principal.user_uuid.clone();
    let stored_hash = app
        .store
        .read()
        .get("user", &uuid)
        .and_then(|u| u.value.get("_password_hash").and_then(Value::as_str).map(String::from))
        .unwrap_or_default();
    let new_hash = match (field("old_password"), field("password")) {
        (_, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::bad_request("field 'old_password': is required to change the password"));
        }
        (Some(old), Some(new)) => {
            if new.chars().count() < min_len {
                return Err(ApiError::bad_request(format!("field 'password': must be at least {min_len} characters")));
            }
            let ok =
                tokio::task::spawn_blocking(move || verify_password(&old, &stored_hash).then(|| hash_password(&new)))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
            Some(ok.ok_or_else(|| ApiError::bad_request("field 'old_password': is incorrect"))?)
        }
    };
    let (full_name, email) = (field("full_name"), field("email"));
    let kept_session = new_hash.clone().zip(ctx.principal.session.clone());
    app.store
        .write(move |txn| {
            let user = txn.get("user", &uuid).ok_or_else(|| ApiError::unauthorized("user no longer exists"))?;
            let mut value = user.value.clone();
            if let Some(hash) = new_hash {
                value["_password_hash"] = json!(hash);
            }
            if let Some(n) = full_name {
                value["full_name"] = json!(n);
            }
            if let Some(e) = email {
                value["email"] = json!(e);
            }
            value["_last_modified"] = json!(txn.timestamp_micros().to_string());
            txn.put("user", &uuid, value);
            // The new password ends the user's other sessions (they no longer match it); this
            // one goes on.
            if let Some((hash, session)) = kept_session {
                crate::sessions::rebind_in(txn, &session, &hash);
            }
            Ok(())
        })
        .await?;
    let mut response = StatusCode::OK.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
