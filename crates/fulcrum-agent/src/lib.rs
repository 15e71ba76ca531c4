//! The SE agent: `fulcrum se-agent`. It joins a controller with a token, then keeps a long
//! poll open to it (heartbeats out, commands and placements in), serves the virtual services
//! placed on it, and installs images into A/B slots (see [`slots`]).
//!
//! Layout of its data dir:
//!
//! ```text
//! identity.json      controller, SE uuid, credential, pinned package keys (mode 0600)
//! state.json         active/previous slot, trial, running command, unsent reports, hosted VSs
//! slots/a, slots/b   the installed SE images; slot.json says what each holds
//! downloads/         images being downloaded (resumed after a restart)
//! ```

mod channel;
pub mod install;
pub mod slots;

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fulcrum_dataplane::DataPlane;
use fulcrum_package::{PublicKey, TrustedKeys};
use fulcrum_se_protocol::{Command, Event, Facts, JoinRequest, Op, Placement, PollRequest, Step};
use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::install::{SlotInfo, slot_dir};
use crate::slots::{Boot, State};

/// Set when the agent starts itself from a slot's own executable, so it does not do so again.
const SLOT_STARTED_ENV: &str = "FULCRUM_SE_SLOT_STARTED";
/// The executable that was started first (the one outside the slots).
const LAUNCHER_ENV: &str = "FULCRUM_SE_LAUNCHER";
/// A slot may carry the agent itself; the agent then runs that one.
const SLOT_EXECUTABLE: &str = "bin/fulcrum";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the controller refused this SE: {0}")]
    Refused(String),
    #[error("the controller answered {0}: {1}")]
    Controller(u16, String),
    #[error("cannot reach the controller: {0}")]
    Unreachable(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("install failed: {0}")]
    Install(String),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The controller's address, or several (`URL,URL,...`): the nodes of a cluster.
    pub controller: String,
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    pub name: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Accept any controller certificate (labs only: an impostor could take the join token).
    pub insecure: bool,
    /// Cores to report (default: the machine's).
    pub cores: Option<u32>,
    /// Where the data plane serves its Prometheus metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The version of a fresh SE (the version this binary was built as).
    pub base_version: String,
    pub base_build: u64,
}

impl Options {
    /// The controller addresses given.
    pub fn controllers(&self) -> Vec<String> {
        self.controller.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    controller: String,
    se_uuid: String,
    credential: String,
    trusted_keys: Vec<String>,
    /// The controllers' certificate pins from the join token: later runs verify them too.
    #[serde(default)]
    controller_pins: Vec<String>,
    /// Every controller of the cluster, as the controllers last told.
    #[serde(default)]
    controllers: Vec<fulcrum_se_protocol::ControllerAddress>,
}

/// Writes JSON durably: a temporary file, fsync, rename.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| AgentError::Protocol(e.to_string()))?;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, AgentError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AgentError::Setup(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn free_disk(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return (0, 0) };
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0);
    }
    let unit = s.f_frsize as u64;
    (s.f_bavail as u64 * unit, s.f_blocks as u64 * unit)
}

fn memory_mb() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// How the agent trusts the controller: a CA file; else the pin its join token (or, once
/// joined, its identity) carries; plain HTTP and `--insecure` trust whoever answers. Anything
/// else is refused before a secret is sent.
fn trust(options: &Options) -> Result<fulcrum_shell::client::Trust, AgentError> {
    use fulcrum_shell::client::Trust;
    if let Some(ca) = &options.ca_file {
        return Ok(Trust::Ca(ca.clone()));
    }
    if options.insecure {
        tracing::warn!("--insecure: the controller's certificate is not verified");
        return Ok(Trust::Any);
    }
    let from_token = match &options.join_token {
        Some(token) => {
            let parsed = fulcrum_se_protocol::JoinToken::parse(token)
                .ok_or_else(|| AgentError::Setup("the join token is malformed".into()))?;
            parsed.pins.iter().map(|p| p.to_string()).collect()
        }
        None => Vec::new(),
    };
    let joined = read_json::<Identity>(&options.data_dir.join("identity.json"))?.map(|i| i.controller_pins);
    let pins = if from_token.is_empty() { joined.unwrap_or_default() } else { from_token };
    if !pins.is_empty() {
        return Ok(Trust::Pins(pins));
    }
    if options.controllers().iter().all(|c| c.starts_with("http://")) {
        tracing::warn!(controller = %options.controller, "plain HTTP: the controller is not authenticated");
        return Ok(Trust::Any);
    }
    Err(AgentError::Setup(format!(
        "cannot verify the controller at {}: the join token names no certificate (tokens made by a \
         controller serving HTTPS do) and no --ca-cert was given; --insecure skips the check (labs only)",
        options.controller
    )))
}

/// What ends one run of an SE.
enum Exit {
    /// Start again (into the slot that is now active); `hand_off`: the listening sockets go to
    /// the new process, so that no connection is refused (a disruptive upgrade closes them).
    Restart { hand_off: bool },
}

/// How long a restart waits for open client connections to finish before it goes on.
const RESTART_DRAIN: Duration = Duration::from_secs(10);
/// A runtime report goes out at least this often (and whenever health or configuration change).
const RUNTIME_REPORT_EVERY: Duration = Duration::from_secs(5);

/// One SE: its data dir and its connection.
pub struct Se {
    options: Options,
    name: String,
    channel: Arc<Channel>,
    simulated: bool,
    /// The virtual services' traffic (none for a simulated SE).
    dataplane: Option<Arc<DataPlane>>,
    /// What the data plane serves, as its last `apply` said.
    serving: std::sync::Mutex<Option<Vec<String>>>,
    reporting: std::sync::Once,
}

impl Se {
    pub fn new(mut options: Options, simulated: bool) -> Result<Se, AgentError> {
        let trust = trust(&options)?;
        let tls = fulcrum_shell::client::tls_config_trusting(&trust).map_err(|e| AgentError::Setup(e.to_string()))?;
        let urls = options.controllers();
        if urls.is_empty() {
            return Err(AgentError::Setup("no controller address given (--controller URL[,URL...])".into()));
        }
        let channel = Arc::new(Channel::new(&urls, tls, options.ca_file.is_none()));
        let name = options.name.clone().unwrap_or_else(|| {
            fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "se".into())
        });
        fs::create_dir_all(&options.data_dir)?;
        // Hooks run with their slot as working directory: a relative data dir would not name
        // them from there.
        options.data_dir = std::path::absolute(&options.data_dir)?;
        Ok(Se {
            options,
            name,
            channel,
            simulated,
            dataplane: None,
            serving: std::sync::Mutex::new(None),
            reporting: std::sync::Once::new(),
        })
    }

    /// Starts the data plane (taking over the listening sockets a previous process handed on).
    fn start_dataplane(&mut self) -> Result<(), AgentError> {
        fulcrum_dataplane::prepare_host();
        let dataplane = Arc::new(DataPlane::start().map_err(|e| AgentError::Setup(e.to_string()))?);
        if let Some(addr) = self.options.metrics_listen {
            let bound =
                dataplane.serve_metrics(addr).map_err(|e| AgentError::Setup(format!("--metrics-listen {e}")))?;
            tracing::info!(%bound, "data plane metrics");
        }
        self.dataplane = Some(dataplane);
        Ok(())
    }

    /// Makes the data plane serve what the state holds.
    fn apply(&self, state: &State) {
        if let Some(dataplane) = &self.dataplane {
            let serving = dataplane.apply(&state.hosted);
            *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(serving);
        }
    }

    /// Sends the data plane's runtime (server health, counters) whenever health or the
    /// configuration changed, and every few seconds, on a thread of its own.
    fn start_reporting(&self, credential: &str) {
        let Some(dataplane) = self.dataplane.clone() else { return };
        self.reporting.call_once(|| {
            let (channel, credential, name) = (self.channel.clone(), credential.to_string(), self.name.clone());
            let spawned = std::thread::Builder::new().name("runtime-report".into()).spawn(move || {
                let mut last_sent: Option<(fulcrum_se_protocol::RuntimeReport, std::time::Instant)> = None;
                loop {
                    let report = dataplane.report();
                    let due = last_sent.as_ref().is_none_or(|(sent, at)| {
                        at.elapsed() >= RUNTIME_REPORT_EVERY || health_of(sent) != health_of(&report)
                    });
                    if due {
                        match channel.runtime(&credential, &report) {
                            Ok(()) => last_sent = Some((report, std::time::Instant::now())),
                            Err(e) => tracing::debug!(se = %name, error = %e, "runtime report not delivered"),
                        }
                    }
                    dataplane.wait_changed(Duration::from_secs(1));
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the runtime reporter");
            }
        });
    }

    fn dir(&self) -> &Path {
        &self.options.data_dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir().join("state.json")
    }

    fn load_state(&self) -> Result<State, AgentError> {
        let state: State = read_json(&self.state_path())?.unwrap_or_default();
        let active = slot_dir(self.dir(), &state.active);
        if SlotInfo::read(&active).is_none() {
            // A fresh SE runs the version it was built as.
            fs::create_dir_all(&active)?;
            let base = SlotInfo {
                version: self.options.base_version.clone(),
                build: self.options.base_build,
                patch_version: None,
                image: None,
                post_install: None,
                health_check: None,
            };
            write_json(&active.join(install::SLOT_FILE), &base)?;
            write_json(&self.state_path(), &state)?;
        }
        Ok(state)
    }

    fn save(&self, state: &State) -> Result<(), AgentError> {
        write_json(&self.state_path(), state)
    }

    fn identity(&self) -> Result<Identity, AgentError> {
        let path = self.dir().join("identity.json");
        if let Some(identity) = read_json::<Identity>(&path)? {
            return Ok(identity);
        }
        let token = self.options.join_token.clone().ok_or_else(|| {
            AgentError::Setup(format!("{} has not joined a controller yet: give --join-token", self.dir().display()))
        })?;
        let state = self.load_state()?;
        let facts = self.facts(&state);
        let parsed = fulcrum_se_protocol::JoinToken::parse(&token)
            .ok_or_else(|| AgentError::Setup("the join token is malformed".into()))?;
        let controller_pins = parsed.pins.iter().map(|p| p.to_string()).collect();
        // Only what the controller checks is sent; the pin was for this side.
        let request = JoinRequest { token: parsed.credential(), name: self.name.clone(), facts };
        let answer = self.channel.join(&request)?;
        let identity = Identity {
            controller: self.options.controller.clone(),
            se_uuid: answer.se_uuid,
            credential: answer.credential,
            trusted_keys: answer.trusted_keys,
            controller_pins,
            controllers: answer.controllers,
        };
        write_json(&path, &identity)?;
        tracing::info!(se = %identity.se_uuid, name = %self.name, "joined");
        Ok(identity)
    }

    fn facts(&self, state: &State) -> Facts {
        let active = SlotInfo::read(&slot_dir(self.dir(), &state.active));
        let previous = state.previous.as_ref().and_then(|p| SlotInfo::read(&slot_dir(self.dir(), p)));
        let (free, total) = free_disk(self.dir());
        let cores = self
            .options
            .cores
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        Facts {
            version: active.as_ref().map_or_else(|| self.options.base_version.clone(), |a| a.version.clone()),
            build: active.as_ref().map_or(self.options.base_build, |a| a.build),
            patch_version: active.and_then(|a| a.patch_version),
            previous_version: previous.map(|p| p.label()),
            free_disk_bytes: free,
            disk_bytes: total,
            cores,
            memory_mb: memory_mb(),
            hosted_vs: state.hosted.iter().map(|h| h.uuid.clone()).collect(),
            placement_digest: Placement::digest_of(&state.hosted),
            serving_vs: self.serving.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Queues a report of a command's step and tries to deliver what is queued.
    fn report(
        &self,
        state: &mut State,
        identity: &Identity,
        command_id: u64,
        step: Step,
        progress: u8,
        message: String,
    ) {
        tracing::info!(se = %self.name, step = step.as_str(), %message, "install step");
        state.unsent.push(Event { command_id, step, progress, message });
        let _ = self.save(state);
        self.flush(state, identity);
    }

    fn flush(&self, state: &mut State, identity: &Identity) {
        let before = state.unsent.len();
        while let Some(event) = state.unsent.first() {
            match self.channel.report(&identity.credential, event) {
                // A report the controller does not want (an old command) is dropped too.
                Ok(()) | Err(AgentError::Controller(..)) => {
                    state.unsent.remove(0);
                }
                Err(_) => break,
            }
        }
        if state.unsent.len() != before {
            let _ = self.save(state);
        }
    }

    /// One run, from start to a restart (or an error that ends the agent).
    fn run_once(&self) -> Result<Exit, AgentError> {
        let mut identity = self.identity()?;
        self.channel.learn(&identity.controllers);
        let keys = TrustedKeys::new(
            identity
                .trusted_keys
                .iter()
                .map(|k| PublicKey::parse(k))
                .collect::<Result<_, _>>()
                .map_err(|e| AgentError::Setup(e.to_string()))?,
        );
        let mut state = self.load_state()?;
        match state.boot(unix_now()) {
            Boot::Abandon(reason) => return self.switch_back(&mut state, &identity, reason),
            Boot::Trial | Boot::Normal => self.save(&state)?,
        }
        // Traffic first: what was served before the restart is served again before the
        // controller is even reached.
        self.apply(&state);
        self.start_reporting(&identity.credential);
        let mut interval = Duration::from_secs(10);
        let mut backoff = Duration::from_millis(200);
        // A command cut short by a restart is taken up again (the download resumes).
        if state.trial.is_none()
            && let Some(command) = state.running.clone()
            && let Some(exit) = self.execute(&mut state, &identity, &keys, command)?
        {
            return Ok(exit);
        }
        loop {
            self.flush(&mut state, &identity);
            if state.trial_expired(unix_now()) {
                return self.switch_back(
                    &mut state,
                    &identity,
                    "the new version did not reach the controller within its health timeout".into(),
                );
            }
            // On trial, the new version wants to know at once that it reaches the controller.
            let no_wait = state.trial.is_some();
            let request = PollRequest { facts: self.facts(&state), last_command: state.last_command, no_wait };
            let answer = match self.channel.poll(&identity.credential, &request, interval) {
                Ok(a) => a,
                Err(AgentError::Refused(message)) => return Err(AgentError::Refused(message)),
                Err(e) => {
                    tracing::warn!(se = %self.name, error = %e, "heartbeat failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
            if !answer.controllers.is_empty() && answer.controllers != identity.controllers {
                // Kept, so that a restart while the first controller is down still finds one.
                self.channel.learn(&answer.controllers);
                identity.controllers = answer.controllers.clone();
                write_json(&self.dir().join("identity.json"), &identity)?;
                tracing::info!(se = %self.name, controllers = ?self.channel.urls(), "controllers of the cluster");
            }
            if let Some(trial) = state.trial.clone() {
                // Reaching the controller is half of being healthy; the slot's check is the rest.
                let active = slot_dir(self.dir(), &state.active);
                let info = SlotInfo::read(&active);
                let check = match (trial.health_check, info.as_ref().and_then(|i| i.health_check.clone())) {
                    (true, Some(hook)) => {
                        self.report(&mut state, &identity, trial.command_id, Step::HealthCheck, 0, hook.clone());
                        // The health timeout bounds the check itself: a hook that hangs is a failed check.
                        let left = Duration::from_secs(trial.deadline_unix.saturating_sub(unix_now()).max(1));
                        let version = info.as_ref().map(|i| i.version.clone()).unwrap_or_default();
                        install::run_hook(&active, &hook, &version, left)
                    }
                    _ => Ok(()),
                };
                if let Err(e) = check {
                    return self.switch_back(&mut state, &identity, format!("health check failed: {e}"));
                }
                state.commit();
                state.running = None;
                let label = info.map(|i| i.label()).unwrap_or_default();
                self.report(&mut state, &identity, trial.command_id, Step::Done, 100, format!("running {label}"));
            }
            if let Some(placement) = answer.placement {
                tracing::info!(se = %self.name, virtual_services = placement.virtualservices.len(), "placement");
                state.hosted = placement.virtualservices;
                self.save(&state)?;
                self.apply(&state);
            }
            if let Some(command) = answer.command
                && command.id > state.last_command
            {
                state.last_command = command.id;
                state.running = Some(command.clone());
                self.save(&state)?;
                if let Some(exit) = self.execute(&mut state, &identity, &keys, command)? {
                    return Ok(exit);
                }
            }
        }
    }

    /// Runs a command; `Some(Restart)` when the agent must restart into another slot.
    fn execute(
        &self,
        state: &mut State,
        identity: &Identity,
        keys: &TrustedKeys,
        command: Command,
    ) -> Result<Option<Exit>, AgentError> {
        let id = command.id;
        let deadline = |secs: u64| unix_now() + secs.max(1);
        match command.op {
            Op::Rollback => {
                let Some(previous) =
                    state.previous.clone().filter(|p| SlotInfo::read(&slot_dir(self.dir(), p)).is_some())
                else {
                    state.running = None;
                    self.report(
                        state,
                        identity,
                        id,
                        Step::Failed,
                        0,
                        "there is no previous version to roll back to".into(),
                    );
                    return Ok(None);
                };
                self.report(state, identity, id, Step::Switching, 0, format!("back to slot {previous}"));
                state.begin_trial(id, &previous, deadline(120), false);
                self.save(state)?;
                self.report(state, identity, id, Step::Restarting, 0, String::new());
                Ok(Some(Exit::Restart { hand_off: true }))
            }
            Op::Install { image_uuid, image_name, sha256, size, health_timeout_secs, disruptive } => {
                let downloads = self.dir().join("downloads");
                fs::create_dir_all(&downloads)?;
                let part = downloads.join(format!("{image_uuid}.pkg"));
                self.report(state, identity, id, Step::Downloading, 0, format!("{image_name} ({size} bytes)"));
                let mut last_pct = 0u8;
                let mut progress = |have: u64| {
                    let pct = (have.saturating_mul(100) / size.max(1)).min(100) as u8;
                    if pct >= last_pct + 10 {
                        last_pct = pct;
                        let event =
                            Event { command_id: id, step: Step::Downloading, progress: pct, message: String::new() };
                        let _ = self.channel.report(&identity.credential, &event);
                    }
                };
                let outcome = self
                    .channel
                    .download(&identity.credential, &image_uuid, size, &part, &mut progress)
                    .and_then(|()| {
                        let spare = slot_dir(self.dir(), state.spare());
                        let active = slot_dir(self.dir(), &state.active);
                        let request = install::Request {
                            package: &part,
                            sha256: &sha256,
                            image_name: &image_name,
                            keys,
                            active: &active,
                            spare: &spare,
                            free_disk_bytes: free_disk(self.dir()).0,
                        };
                        let mut steps = Vec::new();
                        let info =
                            install::prepare(&request, &mut |step, pct, message| steps.push((step, pct, message)));
                        for (step, pct, message) in steps {
                            self.report(state, identity, id, step, pct, message);
                        }
                        info.map(|info| (info, spare))
                    });
                let _ = fs::remove_file(&part);
                let (info, spare) = match outcome {
                    Ok(done) => done,
                    Err(e @ AgentError::Refused(_)) => return Err(e),
                    Err(e) => {
                        state.running = None;
                        let message = match e {
                            AgentError::Install(m) => m,
                            other => other.to_string(),
                        };
                        self.report(state, identity, id, Step::Failed, 0, message);
                        return Ok(None);
                    }
                };
                let to = state.spare().to_string();
                self.report(
                    state,
                    identity,
                    id,
                    Step::Switching,
                    0,
                    format!("slot {} -> {to} ({})", state.active, info.label()),
                );
                state.begin_trial(id, &to, deadline(health_timeout_secs), true);
                self.save(state)?;
                if let Some(post) = &info.post_install {
                    self.report(state, identity, id, Step::PostInstall, 0, post.clone());
                    if let Err(e) = install::run_hook(&spare, post, &info.version, install::HOOK_TIMEOUT) {
                        state.abandon();
                        state.running = None;
                        self.save(state)?;
                        self.report(state, identity, id, Step::Failed, 0, e.to_string());
                        return Ok(None);
                    }
                }
                self.report(state, identity, id, Step::Restarting, 0, format!("into slot {to}"));
                Ok(Some(Exit::Restart { hand_off: !disruptive }))
            }
        }
    }

    fn switch_back(&self, state: &mut State, identity: &Identity, reason: String) -> Result<Exit, AgentError> {
        tracing::warn!(se = %self.name, %reason, "switching back to the previous slot");
        let command = state.abandon().unwrap_or(0);
        state.running = None;
        self.save(state)?;
        let back = SlotInfo::read(&slot_dir(self.dir(), &state.active)).map(|i| i.label()).unwrap_or_default();
        self.report(state, identity, command, Step::RolledBack, 0, format!("{reason}; back on {back}"));
        Ok(Exit::Restart { hand_off: true })
    }

    /// Runs until the controller cuts the SE off. A restart re-executes the process (a
    /// simulated SE starts over in place).
    pub fn run(&self) -> Result<(), AgentError> {
        loop {
            match self.run_once()? {
                Exit::Restart { .. } if self.simulated => continue,
                Exit::Restart { hand_off } => return Err(self.reexec(hand_off)),
            }
        }
    }

    /// Replaces the process with the agent again, which then starts the active slot's
    /// executable when the slot carries one. With `hand_off`, the listening sockets stay open
    /// across `exec` and the new process serves on them; otherwise they close (connections
    /// waiting on them are refused until the new process listens).
    fn reexec(&self, hand_off: bool) -> AgentError {
        use std::os::unix::process::CommandExt;
        let launcher = launcher();
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        tracing::info!(launcher = %launcher.display(), hand_off, "restarting");
        let mut command = std::process::Command::new(&launcher);
        if let Some(dataplane) = self.dataplane.as_ref().filter(|_| hand_off) {
            command.env(fulcrum_dataplane::LISTENERS_ENV, dataplane.hand_off(RESTART_DRAIN));
        }
        let error = command.args(args).env(LAUNCHER_ENV, &launcher).env_remove(SLOT_STARTED_ENV).exec();
        AgentError::Setup(format!("cannot restart {}: {error}", launcher.display()))
    }

    /// At start: when the active slot carries its own agent, become that one.
    pub fn start_active_slot(&self) -> Result<(), AgentError> {
        let state = self.load_state()?;
        let executable = slot_dir(self.dir(), &state.active).join(SLOT_EXECUTABLE);
        if !executable.is_file() || std::env::var(SLOT_STARTED_ENV).ok().as_deref() == Some(state.active.as_str()) {
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        tracing::info!(slot = %state.active, "starting the slot's own agent");
        let error = std::process::Command::new(&executable)
            .args(args)
            .env(LAUNCHER_ENV, launcher())
            .env(SLOT_STARTED_ENV, &state.active)
            .exec();
        Err(AgentError::Setup(format!("cannot start {}: {error}", executable.display())))
    }
}

fn launcher() -> PathBuf {
    std::env::var_os(LAUNCHER_ENV)
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("fulcrum"))
}

/// What of a runtime report is news at once: server states and where each virtual service
/// listens (counters wait for the next periodic report).
fn health_of(report: &fulcrum_se_protocol::RuntimeReport) -> Vec<String> {
    let servers = report.pools.iter().flat_map(|p| p.servers.iter().map(move |s| (p, s)));
    let mut out: Vec<String> = servers.map(|(p, s)| format!("{} {}:{} {:?}", p.uuid, s.ip, s.port, s.state)).collect();
    out.extend(report.virtualservices.iter().map(|v| format!("{} {:?} {:?}", v.uuid, v.listening, v.errors)));
    out
}

/// `fulcrum se-agent`: one SE in this process, carrying its virtual services' traffic.
pub fn run(options: Options) -> Result<(), AgentError> {
    let mut se = Se::new(options, false)?;
    se.start_active_slot()?;
    se.start_dataplane()?;
    se.run()
}

/// `fulcrum se-agent --simulate N`: N SEs in this process, each with its own data dir
/// (`DATA/se-0001`, ...) and name (`NAME-0001`, ...), each on its own thread and connection.
pub fn simulate(options: Options, count: usize) -> Result<(), AgentError> {
    let base_name = options.name.clone().unwrap_or_else(|| "sim".into());
    let mut threads = Vec::with_capacity(count);
    for i in 1..=count {
        let mut one = options.clone();
        one.data_dir = options.data_dir.join(format!("se-{i:04}"));
        one.name = Some(format!("{base_name}-{i:04}"));
        one.cores = Some(options.cores.unwrap_or(1));
        let se = Arc::new(Se::new(one, true)?);
        let handle = std::thread::Builder::new()
            .name(format!("se-{i:04}"))
            .stack_size(256 << 10)
            .spawn(move || {
                // Joins are spread out a little so a few hundred SEs do not arrive at once.
                std::thread::sleep(Duration::from_millis((i as u64 % 50) * 10));
                if let Err(e) = se.run() {
                    tracing::error!(se = %se.name, error = %e, "simulated SE stopped");
                }
            })
            .map_err(AgentError::Io)?;
        threads.push(handle);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
