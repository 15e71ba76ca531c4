//! The endpoints SE agents call: join with a token, the long poll that carries heartbeats
//! and brings commands, step reports, and image download. A join token only opens `join`;
//! an SE credential only opens these endpoints, never the configuration API.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use fulcrum_schema::{Registry, normalize, refs};
use fulcrum_se_protocol::{
    BEARER, Command, Event, Facts, HostedVs, JoinRequest, JoinResponse, Op, Placement, PollRequest, PollResponse,
    RuntimeReport, Step,
};
use fulcrum_store::Stored;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::{
    GROUP_KIND, MAX_EVENTS, SE_KIND, TOKEN_KIND, VS_KIND, cores_of, holds_license, install_step, license_fields,
    licensed_cores, oper_status, se_type, secret_matches, sha256_hex, state_of, update_se,
};
use crate::app::{App, json_response};
use crate::error::ApiError;
use crate::objects::store_object;
use crate::version::rfc3339;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid agent request: {e}")))
}

fn cut_off() -> ApiError {
    ApiError::unauthorized(
        "SE credential not accepted: this service engine was deleted or its join token revoked; join again with a new token",
    )
}

/// The SE whose credential the request carries.
fn authenticate_se(app: &App, headers: &HeaderMap) -> Result<Arc<Stored>, ApiError> {
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(BEARER))
        .ok_or_else(|| ApiError::unauthorized("an SE credential is required (Authorization: Bearer ...)"))?;
    let (uuid, secret) = credential.trim().split_once('.').ok_or_else(cut_off)?;
    let cat = app.store.read();
    let se = cat.get(SE_KIND, uuid).ok_or_else(cut_off)?;
    if !secret_matches(secret, se.value.get("_credential_sha256").and_then(Value::as_str)) {
        return Err(cut_off());
    }
    Ok(se.clone())
}

fn check_facts(facts: &Facts) -> Result<(), ApiError> {
    if facts.version.is_empty() || fulcrum_package::parse_version(&facts.version).is_none() {
        return Err(ApiError::bad_request(format!(
            "facts.version '{}' is not a version such as 30.2.1",
            facts.version
        )));
    }
    if facts.cores == 0 {
        return Err(ApiError::bad_request("facts.cores must be at least 1"));
    }
    Ok(())
}

/// The record fields that follow from what an agent reports (only those that changed).
fn reported_fields(se: &Value, facts: &Facts) -> Map<String, Value> {
    let mut wanted = Map::new();
    wanted.insert("version".into(), json!(facts.version));
    wanted.insert("build".into(), json!(facts.build));
    wanted.insert("patch_version".into(), facts.patch_version.as_ref().map_or(Value::Null, |p| json!(p)));
    wanted.insert("previous_version".into(), facts.previous_version.as_ref().map_or(Value::Null, |p| json!(p)));
    wanted.insert(
        "resources".into(),
        json!({"num_vcpus": facts.cores, "memory": facts.memory_mb, "disk": facts.disk_bytes >> 30}),
    );
    wanted.retain(|k, v| se.get(k).unwrap_or(&Value::Null) != v);
    if state_of(se) != "OPER_UP" {
        wanted.insert("oper_status".into(), oper_status("OPER_UP", ""));
    }
    wanted
}

/// `POST /api/se-agent/join`.
pub async fn join(app: &App, body: &[u8]) -> Result<Response, ApiError> {
    let request: JoinRequest = parse(body)?;
    check_facts(&request.facts)?;
    let name = request.name.trim().to_string();
    if name.is_empty() || name.len() > 128 || name.contains('/') {
        return Err(ApiError::bad_request("name must be 1 to 128 characters without '/'"));
    }
    let invalid = || ApiError::unauthorized("join token not accepted: it is unknown, revoked or mistyped");
    let parsed = fulcrum_se_protocol::JoinToken::parse(&request.token).ok_or_else(invalid)?;
    let (token_uuid, secret) = (parsed.uuid, parsed.secret);
    let token = app.store.read().get(TOKEN_KIND, token_uuid).cloned().ok_or_else(invalid)?;
    if !secret_matches(secret, token.value.get("_secret_sha256").and_then(Value::as_str)) {
        return Err(invalid());
    }
    let group_ref = token.value.get("se_group_ref").cloned().unwrap_or_default();
    let group_uuid = super::uuid_of_ref(Some(&group_ref)).ok_or_else(invalid)?;
    let se_uuid = format!("se-{}", uuid::Uuid::new_v4());
    let secret = crate::auth::random_token(32);
    let facts = request.facts.clone();
    let (tenant, token_id, se) = (token.meta.tenant.clone(), token.uuid.clone(), se_uuid.clone());
    let credential_hash = sha256_hex(secret.as_bytes());
    let listen_ip = app.listen.ip().to_string();
    app.store
        .write(move |txn| {
            let token = txn.get(TOKEN_KIND, &token_id).ok_or_else(invalid)?;
            if txn.find_by_name(SE_KIND, &tenant, &name).is_some() {
                return Err(ApiError::conflict(format!(
                    "a service engine named '{name}' exists already; delete it first or join with another --name"
                )));
            }
            let group =
                txn.get(GROUP_KIND, &group_uuid).ok_or_else(|| ApiError::conflict("the token's SE group is gone"))?;
            let reg = Registry::get();
            let input = json!({
                "name": name,
                "se_group_ref": refs::canonical(GROUP_KIND, &group_uuid),
                "cloud_ref": group.value.get("cloud_ref"),
                "controller_ip": listen_ip,
            });
            let mut config = normalize(reg, reg.schema_of(se_type()), &input)?;
            config.extend(reported_fields(&json!({}), &facts).into_iter().filter(|(_, v)| !v.is_null()));
            // The SE takes its cores now if the license has them left.
            let consumed: u64 =
                txn.list(SE_KIND).iter().filter(|s| holds_license(&s.value)).map(|s| cores_of(&s.value)).sum();
            let total = licensed_cores(txn.list(super::LICENSE_KIND).iter().map(|l| &l.value));
            let cores = u64::from(facts.cores);
            config.extend(license_fields(consumed + cores <= total, cores));
            let mut hidden = Map::new();
            hidden.insert("_credential_sha256".into(), json!(credential_hash));
            hidden.insert("_join_token".into(), json!(token_id));
            hidden.insert("_joined_at".into(), json!(txn.timestamp_micros()));
            store_object(txn, se_type(), &se, config, &tenant, hidden)?;
            let mut counted = token.value.clone();
            counted["joined"] = json!(counted.get("joined").and_then(Value::as_u64).unwrap_or(0) + 1);
            txn.put(TOKEN_KIND, &token_id, counted);
            Ok(())
        })
        .await?;
    app.engines.record_heartbeat(&se_uuid, request.facts);
    app.engines.changed();
    tracing::info!(se = %se_uuid, name = %request.name, "service engine joined");
    let answer = JoinResponse {
        se_uuid: se_uuid.clone(),
        credential: format!("{se_uuid}.{secret}"),
        se_group_uuid: super::uuid_of_ref(Some(&group_ref)).unwrap_or_default(),
        heartbeat_interval_ms: app.engines.settings.heartbeat_interval.as_millis() as u64,
        trusted_keys: app.images.trusted().keys().iter().map(|k| k.to_text("trusted by the controller")).collect(),
        controllers: controllers(app),
    };
    Ok(json_response(StatusCode::CREATED, &serde_json::to_value(answer).unwrap_or_default()))
}

/// Every controller of the cluster, for agents to fall back on (none for a single node).
fn controllers(app: &App) -> Vec<fulcrum_se_protocol::ControllerAddress> {
    app.cluster.as_ref().map(|m| m.controllers()).unwrap_or_default()
}

/// What the SE should be told now, if anything.
fn pending(app: &App, se_uuid: &str, request: &PollRequest) -> Result<Option<PollResponse>, ApiError> {
    let cat = app.store.read();
    let se = cat.get(SE_KIND, se_uuid).ok_or_else(cut_off)?;
    let mut answer = PollResponse {
        heartbeat_interval_ms: app.engines.settings.heartbeat_interval.as_millis() as u64,
        controllers: controllers(app),
        ..PollResponse::default()
    };
    if install_step(&se.value) == Some("PENDING") {
        let status = &se.value["install_status"];
        let id = status.get("command_id").and_then(Value::as_u64).unwrap_or(0);
        if id > request.last_command {
            let op = match status.get("operation").and_then(Value::as_str) {
                Some("SE_ROLLBACK") => Op::Rollback,
                _ => {
                    let image_uuid = super::uuid_of_ref(status.get("image_ref")).unwrap_or_default();
                    let image = cat.get(crate::images::KIND, &image_uuid);
                    Op::Install {
                        image_name: status.get("image_name").and_then(Value::as_str).unwrap_or_default().into(),
                        sha256: image
                            .and_then(|i| i.value.pointer("/se_info/hash").or(i.value.pointer("/controller_info/hash")))
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .into(),
                        size: image.map_or(0, |i| crate::images::record::slice(&i.value, true).1),
                        image_uuid,
                        health_timeout_secs: app.engines.settings.health_timeout.as_secs(),
                        disruptive: status.get("disruptive").and_then(Value::as_bool).unwrap_or(false),
                    }
                }
            };
            answer.command = Some(Command { id, op });
        }
    }
    // Until the controller has placed anything since its start, agents keep what they serve.
    if let Some(mut assigned) = app.engines.assignment(se_uuid) {
        assigned.sort();
        let placement = Placement {
            virtualservices: assigned
                .iter()
                .map(|vs| {
                    let stored = cat.get(VS_KIND, vs);
                    HostedVs {
                        uuid: vs.clone(),
                        name: stored.and_then(|v| v.meta.name.clone()).unwrap_or_default(),
                        service: stored.and_then(|v| {
                            super::service::service_of(&v.value, &|path: &str| cat.get_path(path).map(|o| &o.value))
                        }),
                    }
                })
                .collect(),
        };
        // The digest covers the list and every virtual service's data plane; an agent that
        // predates digests sends none and is judged by its list (else it would be sent the
        // placement on every poll).
        let differs = if request.facts.placement_digest.is_empty() {
            let mut hosted = request.facts.hosted_vs.clone();
            hosted.sort();
            assigned != hosted
        } else {
            placement.digest() != request.facts.placement_digest
        };
        if differs {
            answer.placement = Some(placement);
        }
    }
    Ok((answer.command.is_some() || answer.placement.is_some()).then_some(answer))
}

/// `POST /api/se-agent/poll`: a heartbeat, held until there is something for the SE or the
/// heartbeat interval has passed.
pub async fn poll(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let se = authenticate_se(app, headers)?;
    let request: PollRequest = parse(body)?;
    check_facts(&request.facts)?;
    app.engines.record_heartbeat(&se.uuid, request.facts.clone());
    let changes = reported_fields(&se.value, &request.facts);
    if !changes.is_empty() {
        let came_up = changes.contains_key("oper_status");
        let uuid = se.uuid.clone();
        app.store
            .write(move |txn| {
                update_se(txn, &uuid, changes);
                Ok::<_, ApiError>(())
            })
            .await?;
        if came_up {
            tracing::info!(se = %se.uuid, "service engine up");
        }
        app.engines.changed();
    }
    let hold = if request.no_wait { std::time::Duration::ZERO } else { app.engines.settings.heartbeat_interval };
    let deadline = Instant::now() + hold;
    let waker = app.engines.waker(&se.uuid);
    loop {
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(answer) = pending(app, &se.uuid, &request)? {
            return Ok(json_response(StatusCode::OK, &serde_json::to_value(answer).unwrap_or_default()));
        }
        if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
            let answer = PollResponse {
                heartbeat_interval_ms: app.engines.settings.heartbeat_interval.as_millis() as u64,
                controllers: controllers(app),
                ..PollResponse::default()
            };
            return Ok(json_response(StatusCode::OK, &serde_json::to_value(answer).unwrap_or_default()));
        }
    }
}

/// `POST /api/se-agent/runtime`: what the SE's data plane sees (kept in memory, as heartbeats are).
pub fn runtime(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let se = authenticate_se(app, headers)?;
    let report: RuntimeReport = parse(body)?;
    app.engines.record_runtime(&se.uuid, report);
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// `POST /api/se-agent/event`: a step of the SE's current command.
pub async fn event(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let se = authenticate_se(app, headers)?;
    let event: Event = parse(body)?;
    let uuid = se.uuid.clone();
    let (step, message) = (event.step, event.message.clone());
    app.store
        .write(move |txn| {
            let se = txn.get(SE_KIND, &uuid).ok_or_else(cut_off)?;
            let mut status = se.value.get("install_status").cloned().unwrap_or_default();
            if status.get("command_id").and_then(Value::as_u64) != Some(event.command_id) {
                return Err(ApiError::conflict(format!(
                    "command {} is not this SE's current command",
                    event.command_id
                )));
            }
            let now = rfc3339(SystemTime::now());
            status["state"] = json!(step.as_str());
            status["progress"] = json!(if step == Step::Done { 100 } else { event.progress.min(100) });
            status["reason"] = json!(event.message);
            if step.is_final() {
                status["end_time"] = json!(now);
            }
            let mut events = status.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
            let repeat = events.last().is_some_and(|e| e["step"] == json!(step.as_str()));
            if !repeat {
                events.push(json!({"step": step.as_str(), "time": now, "message": event.message}));
            }
            let excess = events.len().saturating_sub(MAX_EVENTS);
            events.drain(..excess);
            status["events"] = Value::Array(events);
            let mut fields = Map::new();
            fields.insert("install_status".into(), status);
            update_se(txn, &uuid, fields);
            Ok(())
        })
        .await?;
    if step.is_disruptive() || step.is_final() {
        app.engines.changed();
    }
    if step.is_final() {
        // An upgrade waiting on this SE goes on now rather than at its next tick.
        app.upgrade.wake();
    }
    tracing::info!(se = %se.uuid, step = step.as_str(), %message, "install step");
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// `GET /api/se-agent/image/<uuid>`: the SE side of the image's package bytes, resumable with `Range`.
pub async fn image(app: &App, headers: &HeaderMap, image_uuid: &str) -> Result<Response, ApiError> {
    authenticate_se(app, headers)?;
    let (file, offset, length) = {
        let cat = app.store.read();
        let image = cat
            .get(crate::images::KIND, image_uuid)
            .filter(|i| crate::images::record::is_completed(&i.value))
            .ok_or_else(|| ApiError::not_found(format!("image '{image_uuid}' not found")))?;
        let v = &image.value;
        let file = crate::images::record::file_name(v).ok_or_else(|| ApiError::internal("image record has no file"))?;
        let (offset, length) = crate::images::record::slice(v, true);
        (app.images.file_path(file), offset, length)
    };
    crate::images::serve_slice(&file, offset, length, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_fields_are_only_the_changes() {
        let facts = Facts {
            version: "30.2.1".into(),
            build: 9001,
            cores: 2,
            memory_mb: 1024,
            disk_bytes: 8 << 30,
            ..Facts::default()
        };
        let fresh = reported_fields(&json!({}), &facts);
        assert_eq!(fresh["version"], "30.2.1");
        assert_eq!(fresh["resources"], json!({"num_vcpus": 2, "memory": 1024, "disk": 8}));
        assert_eq!(fresh["oper_status"]["state"], "OPER_UP");
        let stored = Value::Object(fresh.into_iter().filter(|(_, v)| !v.is_null()).collect());
        assert!(reported_fields(&stored, &facts).is_empty(), "nothing changed, nothing to write");
        let patched = Facts { patch_version: Some("2p1".into()), ..facts };
        assert_eq!(reported_fields(&stored, &patched).keys().collect::<Vec<_>>(), ["patch_version"]);
    }
}
