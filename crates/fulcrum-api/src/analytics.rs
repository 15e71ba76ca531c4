//! `GET /api/analytics/metrics/controller`: the product's metrics API, for the metrics Fulcrum
//! has — license cores and service engines, for the controller and per SE group. Fulcrum keeps
//! no metric history: every series is the value measured now, one sample, whatever `step` and
//! `limit` ask for (license-metering scripts read `results[0].series[0].header.statistics.mean`).

use std::time::SystemTime;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::app::{App, RequestContext, json_response};
use crate::engines::{CoreUsage, core_usage};
use crate::error::ApiError;
use crate::version::rfc3339;

/// (metric id, what it counts, per SE group, the value from a usage).
type Metric = (&'static str, &'static str, bool, fn(&CoreUsage) -> u64);

const METRICS: &[Metric] = &[
    ("controller_stats.avg_num_service_cores", "Service cores consumed by service engines.", false, |u| {
        u.consumed_cores
    }),
    ("controller_stats.avg_num_licensed_service_cores", "Service cores the licenses allow.", false, |u| {
        u.licensed_cores
    }),
    ("controller_stats.avg_num_service_engines", "Service engines.", false, |u| u.num_ses),
    ("controller_stats.avg_num_service_engines_up", "Service engines up.", false, |u| u.num_ses_up),
    ("segroup_stats.avg_license_usage", "Service cores consumed by the group's service engines.", true, |u| {
        u.consumed_cores
    }),
    ("segroup_stats.avg_num_se", "Service engines in the group.", true, |u| u.num_ses),
    ("segroup_stats.avg_num_se_up", "Service engines of the group that are up.", true, |u| u.num_ses_up),
];

pub fn controller_metrics(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    let ids = ctx.param("metric_id").filter(|m| !m.trim().is_empty()).ok_or_else(|| {
        ApiError::bad_request(format!("metric_id is required; known metrics: {}", known().join(", ")))
    })?;
    let cat = app.store.read();
    let obj_id = ctx.param("obj_id").filter(|o| !o.is_empty());
    let group = match obj_id {
        Some(uuid) => Some(
            crate::objects::find_visible(&cat, ctx, group_type(), uuid)
                .map_err(|_| ApiError::not_found(format!("obj_id '{uuid}': no such service engine group")))?,
        ),
        None => None,
    };
    let now = rfc3339(SystemTime::now());
    let mut series = Vec::new();
    for id in ids.split(',').map(str::trim) {
        let (_, description, per_group, value_of) = METRICS.iter().find(|(name, ..)| *name == id).ok_or_else(|| {
            ApiError::bad_request(format!("unknown metric_id '{id}'; known metrics: {}", known().join(", ")))
        })?;
        let (entity, entity_uuid, usage) = match (per_group, &group) {
            (true, Some(g)) => ("SE_GROUP_METRICS_ENTITY", g.uuid.clone(), core_usage(&cat, Some(&g.uuid))),
            (true, None) => {
                return Err(ApiError::bad_request(format!(
                    "metric '{id}' is per SE group: give obj_id=<SE group uuid>"
                )));
            }
            (false, _) => ("CONTROLLER_METRICS_ENTITY", "cluster".to_string(), core_usage(&cat, None)),
        };
        let value = value_of(&usage) as f64;
        series.push(json!({
            "header": {
                "name": id, "metric_description": description, "metric_entity": entity,
                "entity_uuid": entity_uuid, "units": "METRIC_COUNT",
                "statistics": {"mean": value, "min": value, "max": value, "num_samples": 1, "trend": 0.0},
            },
            "data": [{"timestamp": now, "value": value}],
        }));
    }
    let entity_uuid = group.as_ref().map_or_else(|| "cluster".to_string(), |g| g.uuid.clone());
    Ok(json_response(StatusCode::OK, &json!({"results": [{"entity_uuid": entity_uuid, "series": series}]})))
}

fn known() -> Vec<&'static str> {
    METRICS.iter().map(|(name, ..)| *name).collect()
}

fn group_type() -> &'static fulcrum_schema::TypeDef {
    fulcrum_schema::Registry::get().type_def("serviceenginegroup").expect("serviceenginegroup is defined")
}
