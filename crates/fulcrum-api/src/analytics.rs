//! `GET /api/analytics/metrics/controller`: the product's metrics API, for the metrics Fulcrum
//! has — license cores and service engines, for the controller and per SE group, and the API's
//! request and error rates. Core and SE counts are measured now: one sample, whatever `step` and
//! `limit` ask for (license-metering scripts read `results[0].series[0].header.statistics.mean`).
//! Rates come from the `/metrics` request counters, sampled every [`SAMPLE_EVERY`] for a day:
//! `limit` points of `step` seconds each, the newest ending now.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use crate::app::{App, HTTP_REQUESTS, RequestContext, json_response};
use crate::engines::{CoreUsage, core_usage};
use crate::error::ApiError;
use crate::version::rfc3339;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// A day of samples.
const SAMPLES_KEPT: usize = 24 * 3600 / 5;
/// The product's default step and the most points one series may ask for.
const DEFAULT_STEP: u64 = 300;
const MAX_LIMIT: u64 = 10_000;

/// The request counters at one moment (seconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Totals {
    pub at: f64,
    pub requests: u64,
    pub errors: u64,
}

impl Totals {
    /// The counters as `/metrics` shows them now; an error is a 4xx or 5xx answer.
    pub fn now() -> Totals {
        Totals {
            at: SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            requests: HTTP_REQUESTS.sum_where(|_| true),
            errors: HTTP_REQUESTS
                .sum_where(|labels| labels.get(1).and_then(|s| s.parse::<u16>().ok()).is_some_and(|s| s >= 400)),
        }
    }
}

/// What the sampler has seen, oldest first, bounded to a day.
#[derive(Debug, Default)]
pub struct RequestHistory {
    samples: Mutex<VecDeque<Totals>>,
}

impl RequestHistory {
    pub fn record(&self, totals: Totals) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(totals);
    }

    fn rates(&self, now: Totals, step: f64, limit: usize, count: fn(&Totals) -> u64) -> Vec<(f64, f64)> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        rates(samples.make_contiguous(), now, step, limit, count)
    }
}

/// Samples the counters until the controller stops.
pub async fn run_sampler(app: std::sync::Arc<App>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        app.request_history.record(Totals::now());
    }
}

/// Per-second rates over `limit` windows of `step` seconds ending at `now`, oldest first, as
/// (end of window, rate). A window starts at the last sample at or before its start (or the first
/// sample, when the history is younger than the window); windows before the first sample are left
/// out.
pub fn rates(samples: &[Totals], now: Totals, step: f64, limit: usize, count: fn(&Totals) -> u64) -> Vec<(f64, f64)> {
    let at_or_before = |t: f64| samples.iter().rev().find(|s| s.at <= t).copied();
    let mut points = Vec::new();
    for i in 0..limit {
        let end_at = now.at - i as f64 * step;
        let end = if i == 0 { Some(now) } else { at_or_before(end_at) };
        let Some(end) = end else { break };
        let Some(start) = at_or_before(end_at - step).or_else(|| samples.first().copied()) else { break };
        let elapsed = end.at - start.at;
        if elapsed <= 0.0 {
            break;
        }
        points.push((end_at, count(&end).saturating_sub(count(&start)) as f64 / elapsed));
    }
    points.reverse();
    points
}

enum Source {
    /// Measured now from the catalogue.
    Usage(fn(&CoreUsage) -> u64),
    /// A rate of the request counters.
    Rate(fn(&Totals) -> u64),
}

/// (metric id, what it counts, per SE group, where its value comes from).
type Metric = (&'static str, &'static str, bool, Source);

const METRICS: &[Metric] = &[
    (
        "controller_stats.avg_num_service_cores",
        "Service cores consumed by service engines.",
        false,
        Source::Usage(|u| u.consumed_cores),
    ),
    (
        "controller_stats.avg_num_licensed_service_cores",
        "Service cores the licenses allow.",
        false,
        Source::Usage(|u| u.licensed_cores),
    ),
    ("controller_stats.avg_num_service_engines", "Service engines.", false, Source::Usage(|u| u.num_ses)),
    ("controller_stats.avg_num_service_engines_up", "Service engines up.", false, Source::Usage(|u| u.num_ses_up)),
    ("controller_stats.avg_api_request_rate", "API requests answered per second.", false, Source::Rate(|t| t.requests)),
    (
        "controller_stats.avg_api_error_rate",
        "API requests answered with a 4xx or 5xx status per second.",
        false,
        Source::Rate(|t| t.errors),
    ),
    (
        "segroup_stats.avg_license_usage",
        "Service cores consumed by the group's service engines.",
        true,
        Source::Usage(|u| u.consumed_cores),
    ),
    ("segroup_stats.avg_num_se", "Service engines in the group.", true, Source::Usage(|u| u.num_ses)),
    ("segroup_stats.avg_num_se_up", "Service engines of the group that are up.", true, Source::Usage(|u| u.num_ses_up)),
];

fn positive_param(ctx: &RequestContext, name: &str, default: u64, max: u64) -> Result<u64, ApiError> {
    match ctx.param(name) {
        None => Ok(default),
        Some(text) => text.parse::<u64>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            ApiError::bad_request(format!("{name} must be a whole number from 1 to {max}, not '{text}'"))
        }),
    }
}

pub fn controller_metrics(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    let ids = ctx.param("metric_id").filter(|m| !m.trim().is_empty()).ok_or_else(|| {
        ApiError::bad_request(format!("metric_id is required; known metrics: {}", known().join(", ")))
    })?;
    let step = positive_param(ctx, "step", DEFAULT_STEP, 24 * 3600)?;
    let limit = positive_param(ctx, "limit", 1, MAX_LIMIT)?;
    let cat = app.store.read();
    let obj_id = ctx.param("obj_id").filter(|o| !o.is_empty());
    let group = match obj_id {
        Some(uuid) => Some(
            crate::objects::find_visible(&cat, ctx, group_type(), uuid)
                .map_err(|_| ApiError::not_found(format!("obj_id '{uuid}': no such service engine group")))?,
        ),
        None => None,
    };
    let now = Totals::now();
    let mut series = Vec::new();
    for id in ids.split(',').map(str::trim) {
        let (_, description, per_group, source) = METRICS.iter().find(|(name, ..)| *name == id).ok_or_else(|| {
            ApiError::bad_request(format!("unknown metric_id '{id}'; known metrics: {}", known().join(", ")))
        })?;
        let (entity, entity_uuid, group_uuid) = match (per_group, &group) {
            (true, Some(g)) => ("SE_GROUP_METRICS_ENTITY", g.uuid.clone(), Some(g.uuid.as_str())),
            (true, None) => {
                return Err(ApiError::bad_request(format!(
                    "metric '{id}' is per SE group: give obj_id=<SE group uuid>"
                )));
            }
            (false, _) => ("CONTROLLER_METRICS_ENTITY", "cluster".to_string(), None),
        };
        let (units, points) = match source {
            Source::Usage(value_of) => ("METRIC_COUNT", vec![(now.at, value_of(&core_usage(&cat, group_uuid)) as f64)]),
            Source::Rate(count) => ("PER_SECOND", app.request_history.rates(now, step as f64, limit as usize, *count)),
        };
        series.push(json!({
            "header": {
                "name": id, "metric_description": description, "metric_entity": entity,
                "entity_uuid": entity_uuid, "units": units, "statistics": statistics(&points),
            },
            "data": points.iter().map(|(at, value)| json!({"timestamp": timestamp(*at), "value": value})).collect::<Vec<_>>(),
        }));
    }
    let entity_uuid = group.as_ref().map_or_else(|| "cluster".to_string(), |g| g.uuid.clone());
    Ok(json_response(StatusCode::OK, &json!({"results": [{"entity_uuid": entity_uuid, "series": series}]})))
}

fn statistics(points: &[(f64, f64)]) -> serde_json::Value {
    let values = points.iter().map(|(_, v)| *v);
    let n = points.len();
    let mean = if n == 0 { 0.0 } else { values.clone().sum::<f64>() / n as f64 };
    let min = values.clone().fold(f64::INFINITY, f64::min);
    let max = values.fold(f64::NEG_INFINITY, f64::max);
    // The trend is the change from the first point to the last.
    let trend = match (points.first(), points.last()) {
        (Some(first), Some(last)) if n > 1 => last.1 - first.1,
        _ => 0.0,
    };
    json!({
        "mean": mean, "min": if n == 0 { 0.0 } else { min }, "max": if n == 0 { 0.0 } else { max },
        "num_samples": n, "trend": trend,
    })
}

fn timestamp(at: f64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_secs_f64(at.max(0.0)))
}

fn known() -> Vec<&'static str> {
    METRICS.iter().map(|(name, ..)| *name).collect()
}

fn group_type() -> &'static fulcrum_schema::TypeDef {
    fulcrum_schema::Registry::get().type_def("serviceenginegroup").expect("serviceenginegroup is defined")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at: f64, requests: u64) -> Totals {
        Totals { at, requests, errors: requests / 10 }
    }

    #[test]
    fn rates_are_per_second_over_each_window_oldest_first() {
        // 10 requests a second from t=0 to t=20, sampled every 5 s.
        let samples: Vec<_> = (0..=4).map(|i| at(i as f64 * 5.0, i * 50)).collect();
        let now = at(22.0, 220);
        let points = rates(&samples, now, 10.0, 3, |t| t.requests);
        // Windows end at 22 and 12; the one ending at 2 has only the sample at 0: no time, no point.
        assert_eq!(points, vec![(12.0, 10.0), (22.0, 10.0)]);
        let errors = rates(&samples, now, 10.0, 1, |t| t.errors);
        assert_eq!(errors, vec![(22.0, 1.0)]);
    }

    #[test]
    fn a_young_history_gives_the_rate_since_the_first_sample() {
        let samples = [at(100.0, 0)];
        assert_eq!(rates(&samples, at(104.0, 8), 300.0, 5, |t| t.requests), vec![(104.0, 2.0)]);
        // No samples, or no time since the first: no points rather than a division by zero.
        assert!(rates(&[], at(1.0, 1), 300.0, 1, |t| t.requests).is_empty());
        assert!(rates(&samples, at(100.0, 0), 300.0, 1, |t| t.requests).is_empty());
    }

    #[test]
    fn the_history_keeps_a_day() {
        let history = RequestHistory::default();
        for i in 0..SAMPLES_KEPT + 10 {
            history.record(at(i as f64 * 5.0, i as u64));
        }
        let samples = history.samples.lock().unwrap();
        assert_eq!(samples.len(), SAMPLES_KEPT);
        assert_eq!(samples.front().unwrap().requests, 10);
    }

    #[test]
    fn statistics_summarise_the_points() {
        let stats = statistics(&[(1.0, 2.0), (2.0, 6.0)]);
        assert_eq!(stats["mean"], 4.0);
        assert_eq!(stats["min"], 2.0);
        assert_eq!(stats["max"], 6.0);
        assert_eq!(stats["trend"], 4.0);
        assert_eq!(statistics(&[])["num_samples"], 0);
    }
}
