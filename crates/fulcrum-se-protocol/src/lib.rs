//! The SE agent's protocol: JSON over HTTPS, always opened by the agent (so it works behind
//! NAT). The channel is a long poll: each `POST /api/se-agent/poll` carries a heartbeat and is
//! held by the controller until it has something for the agent (a command, a new placement) or
//! the heartbeat interval has passed. See ARCHITECTURE.md.
//!
//! Pure data: both sides depend on this crate, neither on the other.

use serde::{Deserialize, Serialize};

pub const JOIN_PATH: &str = "/api/se-agent/join";
pub const POLL_PATH: &str = "/api/se-agent/poll";
pub const EVENT_PATH: &str = "/api/se-agent/event";
/// `GET {IMAGE_PATH}/<image uuid>`: the package bytes, with `Range` support.
pub const IMAGE_PATH: &str = "/api/se-agent/image";
/// `POST`: what the SE's data plane sees (server health, traffic counters), sent when it changes.
pub const RUNTIME_PATH: &str = "/api/se-agent/runtime";
/// How an agent presents its credential: `Authorization: Bearer <credential>`.
pub const BEARER: &str = "Bearer ";

/// What an agent knows about itself; sent when joining and with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Version, build and patch of the active slot.
    pub version: String,
    pub build: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_version: Option<String>,
    /// What the other slot holds (`30.2.1-9001`), the rollback target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    pub free_disk_bytes: u64,
    pub disk_bytes: u64,
    pub cores: u32,
    pub memory_mb: u64,
    /// The virtual services the agent serves now (the controller re-sends the placement while
    /// this differs from it, and after a controller restart adopts it).
    #[serde(default)]
    pub hosted_vs: Vec<String>,
    /// [`Placement::digest`] of the placement the agent holds (the controller re-sends the
    /// placement when a virtual service's configuration changed under the same list).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub placement_digest: String,
    /// The virtual services whose data plane listens on every address asked for (absent from
    /// an agent without a data plane: then `hosted_vs` is what it serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_vs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    pub facts: Facts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub se_uuid: String,
    /// The agent's own secret (`<se uuid>.<hex>`): it is shown once, the controller keeps a hash.
    pub credential: String,
    pub se_group_uuid: String,
    pub heartbeat_interval_ms: u64,
    /// The package signing keys the controller trusts (`ed25519 <hex>` lines); the agent pins
    /// them at join and verifies every image against them.
    pub trusted_keys: Vec<String>,
    /// Every controller of the cluster (empty from a single controller).
    #[serde(default)]
    pub controllers: Vec<ControllerAddress>,
}

/// A controller an agent may talk to: any of them answers (followers pass the agent's
/// requests on to the leader), so an agent rides through a change of leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerAddress {
    pub url: String,
    /// The pin of its HTTPS certificate (none under plain HTTP). Learned over a channel the
    /// agent already trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollRequest {
    pub facts: Facts,
    /// The last command id the agent has taken on (so a command is delivered once).
    #[serde(default)]
    pub last_command: u64,
    /// Answer at once instead of holding the poll (an agent confirming a new version).
    #[serde(default)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PollResponse {
    pub heartbeat_interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// Every controller of the cluster, as in [`JoinResponse::controllers`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<ControllerAddress>,
}

/// The virtual services an SE is to serve, each with what its data plane needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub virtualservices: Vec<HostedVs>,
}

impl Placement {
    /// A short fingerprint of the whole placement, the same on both sides (the serialisation is
    /// deterministic: fields in declaration order, lists in the controller's order).
    pub fn digest(&self) -> String {
        Placement::digest_of(&self.virtualservices)
    }

    /// The digest of a placement holding these virtual services, without building one.
    pub fn digest_of(virtualservices: &[HostedVs]) -> String {
        use sha2::{Digest, Sha256};
        // Serialises exactly as `Placement` does.
        #[derive(Serialize)]
        struct Borrowed<'a> {
            virtualservices: &'a [HostedVs],
        }
        let bytes = serde_json::to_vec(&Borrowed { virtualservices }).unwrap_or_default();
        Sha256::digest(&bytes)[..12].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedVs {
    pub uuid: String,
    pub name: String,
    /// How its traffic is served; absent when the virtual service has nothing to listen on
    /// (no VIP or no service port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
}

/// One virtual service's data plane: where it listens, how it proxies, to which pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub application: Application,
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    /// What the TLS listeners present (the virtual service's first `ssl_key_and_certificate_refs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<Certificate>,
}

/// A certificate chain and its private key, PEM. The key travels only on the agent channel
/// and is kept in the agent's state file (mode 0600); `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub name: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate").field("name", &self.name).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Application {
    /// HTTP/1.1 reverse proxy: keep-alive on both sides, `X-Forwarded-For` added.
    Http,
    /// Layer 4: bytes copied both ways.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Listener {
    pub ip: String,
    pub port: u16,
    /// TLS is terminated here (the service port's `enable_ssl`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub uuid: String,
    pub name: String,
    pub algorithm: Algorithm,
    pub servers: Vec<Server>,
    #[serde(default)]
    pub monitors: Vec<Monitor>,
    /// How long a removed or disabled server's open requests and connections may run on.
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConnections,
    /// On the client's address.
    ConsistentHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub ip: String,
    pub port: u16,
    pub ratio: u32,
    pub enabled: bool,
}

impl Server {
    /// `ip:port`, how a server is named in runtime reports and metrics.
    pub fn key(&self) -> String {
        server_key(&self.ip, self.port)
    }
}

pub fn server_key(ip: &str, port: u16) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Monitor {
    pub name: String,
    pub check: Check,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive good checks that bring a down server up.
    pub successful_checks: u32,
    /// Consecutive failed checks that take an up server down.
    pub failed_checks: u32,
    /// Checks go to this port instead of the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Check {
    /// A connection is opened and closed.
    Tcp,
    /// `request` (`GET /health HTTP/1.0`) is sent; the status must fall in `codes`
    /// (`HTTP_2XX`, ... or `HTTP_ANY`).
    Http { request: String, codes: Vec<String> },
}

/// What an SE's data plane reports: the health of each server it balances to and its
/// traffic counters (totals since the data plane started).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeReport {
    pub pools: Vec<PoolRuntime>,
    pub virtualservices: Vec<VsRuntime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRuntime {
    pub uuid: String,
    pub servers: Vec<ServerRuntime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerState {
    Up,
    Down,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRuntime {
    pub ip: String,
    pub port: u16,
    pub state: ServerState,
    /// Why it is down: the last failed check.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub traffic: Traffic,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsRuntime {
    pub uuid: String,
    /// The VIP addresses bound (`127.0.0.5:8080`); a listener that could not be bound is in
    /// `errors` instead.
    pub listening: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    pub traffic: Traffic,
}

/// Traffic counters. `latency_buckets` counts requests (HTTP) or connections (TCP) by how long
/// they took, against [`LATENCY_BOUNDS_MS`] (the last bucket is everything slower).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub requests: u64,
    pub connections: u64,
    pub open_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub latency_buckets: Vec<u64>,
}

/// Upper bounds of the latency buckets, in milliseconds.
pub const LATENCY_BOUNDS_MS: &[f64] =
    &[0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];

impl Traffic {
    /// The latency under which `q` (0..1) of the counted requests fell, in ms (the bucket's
    /// upper bound; `None` with nothing counted).
    pub fn latency_quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let target = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }

    /// Adds another SE's counters for the same object.
    pub fn add(&mut self, other: &Traffic) {
        self.requests += other.requests;
        self.connections += other.connections;
        self.open_connections += other.open_connections;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.errors += other.errors;
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *a += b;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Download the image, verify it, install its SE payload into the other slot, switch to it.
    Install {
        image_uuid: String,
        image_name: String,
        sha256: String,
        size: u64,
        health_timeout_secs: u64,
        /// The upgrade accepts disruption: the SE closes its listeners for the restart instead
        /// of handing them to the new process.
        #[serde(default)]
        disruptive: bool,
    },
    /// Switch back to the other slot.
    Rollback,
}

/// The steps of an install or a rollback, reported as they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Step {
    Downloading,
    Verifying,
    Unpacking,
    PreInstall,
    PostInstall,
    Switching,
    Restarting,
    HealthCheck,
    /// The new slot is active and healthy.
    Done,
    /// Nothing changed on the SE (download, verification, a hook failed).
    Failed,
    /// The new slot did not come up healthy; the agent is back on the old slot.
    RolledBack,
}

impl Step {
    /// No further step follows.
    pub fn is_final(self) -> bool {
        matches!(self, Step::Done | Step::Failed | Step::RolledBack)
    }

    /// The SE is switching slots, restarting or checking its new slot: it serves nothing
    /// meanwhile, so its virtual services go elsewhere.
    pub fn is_disruptive(self) -> bool {
        matches!(self, Step::Switching | Step::PostInstall | Step::Restarting | Step::HealthCheck)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Downloading => "DOWNLOADING",
            Step::Verifying => "VERIFYING",
            Step::Unpacking => "UNPACKING",
            Step::PreInstall => "PRE_INSTALL",
            Step::PostInstall => "POST_INSTALL",
            Step::Switching => "SWITCHING",
            Step::Restarting => "RESTARTING",
            Step::HealthCheck => "HEALTH_CHECK",
            Step::Done => "DONE",
            Step::Failed => "FAILED",
            Step::RolledBack => "ROLLED_BACK",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub command_id: u64,
    pub step: Step,
    /// Percent of the current step, where it has one (the download).
    #[serde(default)]
    pub progress: u8,
    #[serde(default)]
    pub message: String,
}

/// A join token: `<token uuid>.<secret>[.<pin>...]`. The pins, present when the controllers
/// serve HTTPS, are the SHA-256 of their certificates (hex), one per node of the cluster: an
/// agent given only the token can tell the controllers from an impostor before it sends the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken<'a> {
    pub uuid: &'a str,
    pub secret: &'a str,
    /// The pins of the controllers' certificates (one per node of a cluster), if any.
    pub pins: Vec<&'a str>,
}

impl<'a> JoinToken<'a> {
    pub fn parse(token: &'a str) -> Option<JoinToken<'a>> {
        let mut parts = token.trim().split('.');
        let (uuid, secret) = (parts.next()?, parts.next()?);
        let pins: Vec<&str> = parts.collect();
        if uuid.is_empty() || secret.is_empty() || !pins.iter().all(|p| is_pin(p)) {
            return None;
        }
        Some(JoinToken { uuid, secret, pins })
    }

    /// What the controller checks: the token without its pin.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.uuid, self.secret)
    }
}

/// The pin of a certificate (its DER bytes): SHA-256, lowercase hex.
pub fn certificate_pin(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

fn is_pin(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `30.2.1-9001` or `30.2.1-9001-2p1`: how versions are shown side by side.
pub fn version_label(version: &str, build: u64, patch_version: Option<&str>) -> String {
    match patch_version {
        Some(p) => format!("{version}-{build}-{p}"),
        None => format!("{version}-{build}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_carry_optional_pins() {
        let (pin, other) = (certificate_pin(b"certificate"), certificate_pin(b"another"));
        let with = format!("sejointoken-1.s3cret.{pin}");
        let token = JoinToken::parse(&with).unwrap();
        assert_eq!((token.uuid, token.secret, token.pins.clone()), ("sejointoken-1", "s3cret", vec![pin.as_str()]));
        assert_eq!(token.credential(), "sejointoken-1.s3cret");
        assert!(JoinToken::parse("sejointoken-1.s3cret").unwrap().pins.is_empty());
        let cluster = format!("t.s.{pin}.{other}");
        assert_eq!(JoinToken::parse(&cluster).unwrap().pins, [pin.as_str(), other.as_str()]);
        for bad in ["", "only-uuid", "a.", ".b", "a.b.not-a-pin", &format!("a.b.{pin}.extra")] {
            assert_eq!(JoinToken::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn commands_and_steps_have_stable_wire_forms() {
        let c = Command {
            id: 7,
            op: Op::Install {
                image_uuid: "image-1".into(),
                image_name: "30.2.2-9100-20261122.101500".into(),
                sha256: "ab".into(),
                size: 10,
                health_timeout_secs: 60,
                disruptive: false,
            },
        };
        let mut v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["op"], "install");
        assert_eq!(v["id"], 7);
        assert_eq!(serde_json::from_value::<Command>(v.clone()).unwrap(), c);
        // A controller that predates `disruptive` sends none: the restart hands its sockets on.
        v.as_object_mut().unwrap().remove("disruptive");
        assert_eq!(serde_json::from_value::<Command>(v).unwrap(), c);
        let r: Command = serde_json::from_str(r#"{"id":8,"op":"rollback"}"#).unwrap();
        assert_eq!(r.op, Op::Rollback);
        for step in [Step::Downloading, Step::PreInstall, Step::HealthCheck, Step::RolledBack] {
            assert_eq!(Step::parse(step.as_str()), Some(step));
            assert_eq!(serde_json::to_value(step).unwrap(), step.as_str());
        }
        assert!(Step::Done.is_final() && !Step::Restarting.is_final());
        assert_eq!(version_label("30.2.1", 9001, Some("2p1")), "30.2.1-9001-2p1");
    }

    #[test]
    fn placement_digests_follow_every_field() {
        let vs = |port: u16| HostedVs {
            uuid: "vs-1".into(),
            name: "web".into(),
            service: Some(Service {
                application: Application::Http,
                listeners: vec![Listener { ip: "127.0.0.5".into(), port, tls: false }],
                pool: None,
                certificate: None,
            }),
        };
        let a = Placement { virtualservices: vec![vs(80)] };
        assert_eq!(Placement::digest_of(&a.virtualservices), a.digest());
        // A plain listener's wire form is the one before TLS existed (digests stay put).
        let wire = serde_json::to_value(&a).unwrap();
        assert_eq!(
            wire["virtualservices"][0]["service"]["listeners"][0],
            serde_json::json!({"ip": "127.0.0.5", "port": 80})
        );
        assert_eq!(a.digest(), a.clone().digest());
        assert_eq!(a.digest().len(), 24);
        assert_ne!(a.digest(), Placement { virtualservices: vec![vs(81)] }.digest());
        assert_ne!(a.digest(), Placement::default().digest());
        // An old controller's placement (no service) still parses.
        let old: HostedVs = serde_json::from_str(r#"{"uuid":"vs-1","name":"web"}"#).unwrap();
        assert_eq!(old.service, None);
    }

    #[test]
    fn latency_quantiles_come_from_the_buckets() {
        let mut t = Traffic { latency_buckets: vec![0; LATENCY_BOUNDS_MS.len() + 1], ..Traffic::default() };
        assert_eq!(t.latency_quantile_ms(0.5), None);
        t.latency_buckets[1] = 98; // <= 1 ms
        t.latency_buckets[6] = 2; // <= 50 ms
        assert_eq!(t.latency_quantile_ms(0.5), Some(1.0));
        assert_eq!(t.latency_quantile_ms(0.99), Some(50.0));
        let mut sum = Traffic::default();
        sum.add(&t);
        sum.add(&t);
        assert_eq!(sum.latency_buckets[1], 196);
        assert_eq!(server_key("::1", 80), "[::1]:80");
    }
}
