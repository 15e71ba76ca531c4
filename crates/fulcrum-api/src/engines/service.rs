//! What an SE's data plane needs to serve a virtual service, read off its configuration: the
//! VIP addresses of its vsvip × its service ports, the application profile's type, and its
//! pool's servers, algorithm and health monitors. Pure: objects are looked up through the
//! function given, so this is tested without a store.
//!
//! Where the data plane does less than the configuration asks (documented in
//! docs/compatibility.md): algorithms other than round robin and consistent hash balance by
//! least connections; consistent hash is on the client address whatever `lb_algorithm_hash`
//! says; servers given by DNS name and monitors other than TCP and HTTP are left out.

use fulcrum_se_protocol::{Algorithm, Application, Certificate, Check, Listener, Monitor, Pool, Server, Service};
use serde_json::Value;

/// One virtual service listens on at most this many ports (a `port_range_end` beyond is cut).
pub const MAX_LISTENERS: usize = 1024;
/// `graceful_disable_timeout: -1` (wait for ever) is bounded by this.
const LONGEST_DRAIN_MS: u64 = 24 * 3600 * 1000;

fn text<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field).and_then(Value::as_str)
}

fn int(v: &Value, field: &str) -> Option<i64> {
    v.get(field).and_then(Value::as_i64)
}

fn flag(v: &Value, field: &str, default: bool) -> bool {
    v.get(field).and_then(Value::as_bool).unwrap_or(default)
}

/// The data plane of `vs`; `None` when it has nothing to listen on (no enabled VIP address,
/// no service port, or traffic disabled). `lookup` resolves a stored reference
/// (`/api/<kind>/<uuid>`) to the object's value.
pub fn service_of<'a>(vs: &Value, lookup: &dyn Fn(&str) -> Option<&'a Value>) -> Option<Service> {
    if !flag(vs, "enabled", true) || !flag(vs, "traffic_enabled", true) {
        return None;
    }
    let vsvip = lookup(text(vs, "vsvip_ref")?)?;
    let addresses: Vec<&str> = vsvip
        .get("vip")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|vip| flag(vip, "enabled", true))
        .filter_map(|vip| vip.get("ip_address").and_then(|a| text(a, "addr")))
        .collect();
    let mut listeners = Vec::new();
    for service in vs.get("services").and_then(Value::as_array).into_iter().flatten() {
        let Some(first) = int(service, "port").filter(|p| (1..=65535).contains(p)) else { continue };
        let last = int(service, "port_range_end").filter(|e| *e >= first && *e <= 65535).unwrap_or(first);
        let tls = flag(service, "enable_ssl", false);
        for port in first..=last {
            for ip in &addresses {
                listeners.push(Listener { ip: (*ip).to_string(), port: port as u16, tls });
            }
        }
    }
    // One listener per address: the first service naming a port decides whether it is TLS.
    listeners.sort_by(|a, b| (&a.ip, a.port).cmp(&(&b.ip, b.port)));
    listeners.dedup_by(|later, first| later.ip == first.ip && later.port == first.port);
    listeners.truncate(MAX_LISTENERS);
    if listeners.is_empty() {
        return None;
    }
    let application = match text(vs, "application_profile_ref").and_then(lookup).and_then(|p| text(p, "type")) {
        Some("APPLICATION_PROFILE_TYPE_HTTP") | None => Application::Http,
        Some(_) => Application::Tcp,
    };
    let pool = text(vs, "pool_ref").and_then(|r| Some(pool_of(r, lookup(r)?, lookup)));
    let certificate = listeners
        .iter()
        .any(|l| l.tls)
        .then(|| vs.get("ssl_key_and_certificate_refs")?.as_array()?.first()?.as_str())
        .flatten()
        .and_then(lookup)
        .and_then(certificate_of);
    Some(Service { application, listeners, pool, certificate })
}

/// A certificate with its key: the key a user gave (`key`), or a system default's own. An
/// encrypted key (`key_passphrase`) is not used: the SE reports its TLS listeners as not served.
fn certificate_of(object: &Value) -> Option<Certificate> {
    if object.get("key_passphrase").and_then(Value::as_str).is_some_and(|p| !p.is_empty()) {
        return None;
    }
    Some(Certificate {
        name: text(object, "name").unwrap_or_default().to_string(),
        certificate_pem: object.pointer("/certificate/certificate")?.as_str()?.to_string(),
        key_pem: text(object, "key").or_else(|| text(object, "_private_key"))?.to_string(),
    })
}

fn pool_of<'a>(reference: &str, pool: &Value, lookup: &dyn Fn(&str) -> Option<&'a Value>) -> Pool {
    let uuid = reference.rsplit('/').next().unwrap_or_default().to_string();
    let pool_enabled = flag(pool, "enabled", true);
    let default_port = int(pool, "default_server_port").unwrap_or(80);
    let servers = pool
        .get("servers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let ip = s.get("ip")?;
            if text(ip, "type") == Some("DNS") {
                return None;
            }
            let port = int(s, "port").unwrap_or(default_port);
            Some(Server {
                ip: text(ip, "addr")?.to_string(),
                port: u16::try_from(port).ok().filter(|p| *p != 0)?,
                ratio: int(s, "ratio").unwrap_or(1).clamp(1, 20) as u32,
                enabled: pool_enabled && flag(s, "enabled", true),
            })
        })
        .collect();
    let algorithm = match text(pool, "lb_algorithm") {
        Some("LB_ALGORITHM_ROUND_ROBIN" | "LB_ALGORITHM_RANDOM") => Algorithm::RoundRobin,
        Some("LB_ALGORITHM_CONSISTENT_HASH") => Algorithm::ConsistentHash,
        _ => Algorithm::LeastConnections,
    };
    let monitors = pool
        .get("health_monitor_refs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(lookup)
        .filter_map(monitor_of)
        .collect();
    let drain_timeout_ms = match int(pool, "graceful_disable_timeout").unwrap_or(1) {
        m if m < 0 => LONGEST_DRAIN_MS,
        m => (m as u64) * 60_000,
    };
    Pool {
        uuid,
        name: text(pool, "name").unwrap_or_default().to_string(),
        algorithm,
        servers,
        monitors,
        drain_timeout_ms,
    }
}

fn monitor_of(hm: &Value) -> Option<Monitor> {
    let check = match text(hm, "type")? {
        "HEALTH_MONITOR_TCP" => Check::Tcp,
        "HEALTH_MONITOR_HTTP" => {
            let http = hm.get("http_monitor");
            let request = http.and_then(|h| text(h, "http_request")).unwrap_or("GET / HTTP/1.0").to_string();
            let mut codes: Vec<String> = http
                .and_then(|h| h.get("http_response_code"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect();
            if codes.is_empty() {
                codes = vec!["HTTP_2XX".into(), "HTTP_3XX".into()];
            }
            Check::Http { request, codes }
        }
        _ => return None,
    };
    let seconds = |field: &str, default: i64| (int(hm, field).unwrap_or(default).max(1) as u64) * 1000;
    let count = |field: &str| int(hm, field).unwrap_or(2).clamp(1, 50) as u32;
    Some(Monitor {
        name: text(hm, "name").unwrap_or_default().to_string(),
        check,
        interval_ms: seconds("send_interval", 10),
        timeout_ms: seconds("receive_timeout", 4),
        successful_checks: count("successful_checks"),
        failed_checks: count("failed_checks"),
        port: int(hm, "monitor_port").and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn objects() -> HashMap<String, Value> {
        HashMap::from([
            (
                "/api/vsvip/vsvip-1".into(),
                json!({"vip": [
                    {"vip_id": "0", "ip_address": {"addr": "127.0.0.5", "type": "V4"}},
                    {"vip_id": "1", "enabled": false, "ip_address": {"addr": "127.0.0.6", "type": "V4"}}]}),
            ),
            ("/api/applicationprofile/ap-l4".into(), json!({"type": "APPLICATION_PROFILE_TYPE_L4"})),
            ("/api/applicationprofile/ap-http".into(), json!({"type": "APPLICATION_PROFILE_TYPE_HTTP"})),
            (
                "/api/pool/pool-1".into(),
                json!({"name": "web", "default_server_port": 8080, "lb_algorithm": "LB_ALGORITHM_ROUND_ROBIN",
                       "graceful_disable_timeout": 2,
                       "health_monitor_refs": ["/api/healthmonitor/hm-http", "/api/healthmonitor/hm-ping"],
                       "servers": [
                           {"ip": {"addr": "127.0.0.10", "type": "V4"}, "port": 9000, "ratio": 3},
                           {"ip": {"addr": "127.0.0.11", "type": "V4"}, "enabled": false},
                           {"ip": {"addr": "web.example", "type": "DNS"}, "port": 80}]}),
            ),
            (
                "/api/healthmonitor/hm-http".into(),
                json!({"name": "h", "type": "HEALTH_MONITOR_HTTP", "send_interval": 1, "receive_timeout": 1,
                       "failed_checks": 3, "monitor_port": 9100,
                       "http_monitor": {"http_request": "GET /health HTTP/1.1", "http_response_code": ["HTTP_2XX"]}}),
            ),
            ("/api/healthmonitor/hm-ping".into(), json!({"name": "p", "type": "HEALTH_MONITOR_PING"})),
        ])
    }

    fn build(vs: Value) -> Option<Service> {
        let objects = objects();
        service_of(&vs, &|path: &str| objects.get(path))
    }

    #[test]
    fn listeners_are_every_enabled_vip_address_on_every_service_port() {
        let service = build(json!({"vsvip_ref": "/api/vsvip/vsvip-1",
            "application_profile_ref": "/api/applicationprofile/ap-http",
            "services": [{"port": 80}, {"port": 8000, "port_range_end": 8002}, {"port": 80}]}))
        .unwrap();
        let ports: Vec<u16> = service.listeners.iter().map(|l| l.port).collect();
        assert_eq!(ports, [80, 8000, 8001, 8002]);
        assert!(service.listeners.iter().all(|l| l.ip == "127.0.0.5"), "the disabled VIP is left out");
        assert_eq!(service.application, Application::Http);
        assert!(service.pool.is_none());
    }

    #[test]
    fn the_pool_with_its_servers_algorithm_monitors_and_drain() {
        let service = build(json!({"vsvip_ref": "/api/vsvip/vsvip-1", "pool_ref": "/api/pool/pool-1",
            "application_profile_ref": "/api/applicationprofile/ap-l4", "services": [{"port": 443}]}))
        .unwrap();
        assert_eq!(service.application, Application::Tcp);
        let pool = service.pool.unwrap();
        assert_eq!((pool.uuid.as_str(), pool.name.as_str()), ("pool-1", "web"));
        assert_eq!(pool.algorithm, Algorithm::RoundRobin);
        assert_eq!(
            pool.servers,
            [
                Server { ip: "127.0.0.10".into(), port: 9000, ratio: 3, enabled: true },
                Server { ip: "127.0.0.11".into(), port: 8080, ratio: 1, enabled: false },
            ],
            "the port defaults to the pool's, DNS servers are left out"
        );
        assert_eq!(pool.drain_timeout_ms, 120_000);
        assert_eq!(
            pool.monitors,
            [Monitor {
                name: "h".into(),
                check: Check::Http { request: "GET /health HTTP/1.1".into(), codes: vec!["HTTP_2XX".into()] },
                interval_ms: 1000,
                timeout_ms: 1000,
                successful_checks: 2,
                failed_checks: 3,
                port: Some(9100),
            }],
            "a ping monitor is not run"
        );
    }

    #[test]
    fn tls_listeners_carry_the_first_certificate_with_its_key() {
        let mut objects = objects();
        objects.insert(
            "/api/sslkeyandcertificate/c1".into(),
            json!({"name": "web-cert", "certificate": {"certificate": "CERT"}, "key": "KEY"}),
        );
        objects.insert(
            "/api/sslkeyandcertificate/sys".into(),
            json!({"name": "System-Default-Cert", "certificate": {"certificate": "SYS"}, "_private_key": "SYSKEY"}),
        );
        let vs = |refs: Value| {
            json!({"vsvip_ref": "/api/vsvip/vsvip-1", "ssl_key_and_certificate_refs": refs,
                   "services": [{"port": 443, "enable_ssl": true}, {"port": 80}, {"port": 443}]})
        };
        let service = service_of(&vs(json!(["/api/sslkeyandcertificate/c1"])), &|p: &str| objects.get(p)).unwrap();
        let tls: Vec<(u16, bool)> = service.listeners.iter().map(|l| (l.port, l.tls)).collect();
        assert_eq!(tls, [(80, false), (443, true)], "one listener per port, the first service decides");
        let cert = service.certificate.unwrap();
        assert_eq!(
            (cert.name.as_str(), cert.certificate_pem.as_str(), cert.key_pem.as_str()),
            ("web-cert", "CERT", "KEY")
        );
        assert!(!format!("{cert:?}").contains("KEY"), "Debug leaves the key out");
        let system = service_of(&vs(json!(["/api/sslkeyandcertificate/sys"])), &|p: &str| objects.get(p)).unwrap();
        assert_eq!(system.certificate.unwrap().key_pem, "SYSKEY", "a system default's own key");
        objects.get_mut("/api/sslkeyandcertificate/c1").unwrap()["key_passphrase"] = json!("secret");
        let locked = service_of(&vs(json!(["/api/sslkeyandcertificate/c1"])), &|p: &str| objects.get(p)).unwrap();
        assert!(locked.certificate.is_none(), "an encrypted key is not used");
        let plain = service_of(&vs(json!(null)), &|p: &str| objects.get(p)).unwrap();
        assert!(plain.certificate.is_none());
    }

    #[test]
    fn nothing_to_listen_on_is_no_service() {
        assert!(build(json!({"vsvip_ref": "/api/vsvip/vsvip-1"})).is_none(), "no service port");
        assert!(build(json!({"services": [{"port": 80}]})).is_none(), "no vsvip");
        assert!(build(json!({"vsvip_ref": "/api/vsvip/gone", "services": [{"port": 80}]})).is_none());
        let off = json!({"vsvip_ref": "/api/vsvip/vsvip-1", "services": [{"port": 80}], "traffic_enabled": false});
        assert!(build(off).is_none());
    }

    #[test]
    fn a_disabled_pool_disables_every_server_and_algorithms_map() {
        let mut objects = objects();
        let pool = objects.get_mut("/api/pool/pool-1").unwrap();
        pool["enabled"] = json!(false);
        pool["lb_algorithm"] = json!("LB_ALGORITHM_CONSISTENT_HASH");
        pool["graceful_disable_timeout"] = json!(-1);
        let vs = json!({"vsvip_ref": "/api/vsvip/vsvip-1", "pool_ref": "/api/pool/pool-1", "services": [{"port": 80}]});
        let pool = service_of(&vs, &|p: &str| objects.get(p)).unwrap().pool.unwrap();
        assert!(pool.servers.iter().all(|s| !s.enabled));
        assert_eq!(pool.algorithm, Algorithm::ConsistentHash);
        assert_eq!(pool.drain_timeout_ms, LONGEST_DRAIN_MS);
        objects.get_mut("/api/pool/pool-1").unwrap()["lb_algorithm"] = json!("LB_ALGORITHM_FASTEST_RESPONSE");
        let pool = service_of(&vs, &|p: &str| objects.get(p)).unwrap().pool.unwrap();
        assert_eq!(pool.algorithm, Algorithm::LeastConnections);
    }
}
