//! The agent's side of the protocol: HTTPS requests it opens to the controller.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_se_protocol::{
    BEARER, ControllerAddress, EVENT_PATH, Event, IMAGE_PATH, JOIN_PATH, JoinRequest, JoinResponse, POLL_PATH,
    PollRequest, PollResponse, RUNTIME_PATH, RuntimeReport,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AgentError;

/// How long a request may take beyond what the controller holds it for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The controllers the agent may talk to, the one that answered last first: any node of a
/// cluster answers (a follower passes the request on), so a dead or electing node is skipped.
pub struct Channel {
    endpoints: Mutex<Vec<Endpoint>>,
    /// The index of the endpoint that answered last.
    current: AtomicUsize,
    /// The trust the agent was configured with (CA, token pin, or any).
    configured: Arc<rustls::ClientConfig>,
    /// Whether a learned pin may replace the configured trust of an address: yes, unless the
    /// operator gave a CA (a CA is the stronger statement).
    learned_pins_win: bool,
}

#[derive(Clone)]
struct Endpoint {
    url: String,
    agent: ureq::Agent,
}

fn agent_trusting(tls: Arc<rustls::ClientConfig>) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(tls)
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(60))
        .timeout_write(Duration::from_secs(30))
        .build()
}

fn normal_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// Whether another controller may answer what this one could not.
fn try_another(error: &AgentError) -> bool {
    matches!(error, AgentError::Unreachable(_) | AgentError::Controller(421 | 502 | 503 | 504, _))
}

impl Channel {
    pub fn new(urls: &[String], tls: Arc<rustls::ClientConfig>, learned_pins_win: bool) -> Channel {
        let endpoints =
            urls.iter().map(|u| Endpoint { url: normal_url(u), agent: agent_trusting(tls.clone()) }).collect();
        Channel { endpoints: Mutex::new(endpoints), current: AtomicUsize::new(0), configured: tls, learned_pins_win }
    }

    /// Takes in the controllers the cluster told of: new addresses are added, each trusted by
    /// its own pin when it has one.
    pub fn learn(&self, controllers: &[ControllerAddress]) {
        let mut endpoints = self.lock();
        for controller in controllers {
            let url = normal_url(&controller.url);
            let pinned = controller.pin.as_ref().and_then(|pin| {
                let trust = fulcrum_shell::client::Trust::Pins(vec![pin.clone()]);
                fulcrum_shell::client::tls_config_trusting(&trust).ok()
            });
            match endpoints.iter_mut().find(|e| e.url == url) {
                Some(known) => {
                    if let Some(tls) = pinned.filter(|_| self.learned_pins_win) {
                        known.agent = agent_trusting(tls);
                    }
                }
                None => {
                    let tls = pinned.unwrap_or_else(|| self.configured.clone());
                    endpoints.push(Endpoint { url, agent: agent_trusting(tls) });
                }
            }
        }
    }

    /// The addresses known, the one in use first.
    pub fn urls(&self) -> Vec<String> {
        let endpoints = self.lock();
        let start = self.current.load(Ordering::Relaxed);
        (0..endpoints.len()).map(|i| endpoints[(start + i) % endpoints.len()].url.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Endpoint>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `call` against the controller that answered last, then each other one in turn
    /// while they cannot answer; the last error when none could.
    fn attempt<R>(&self, mut call: impl FnMut(&Endpoint) -> Result<R, AgentError>) -> Result<R, AgentError> {
        let endpoints = self.lock().clone();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = AgentError::Unreachable("no controller address".into());
        for i in 0..endpoints.len() {
            let index = (start + i) % endpoints.len();
            match call(&endpoints[index]) {
                Err(e) if try_another(&e) => {
                    if endpoints.len() > 1 {
                        tracing::debug!(controller = %endpoints[index].url, error = %e, "trying another controller");
                    }
                    last = e;
                }
                answer => {
                    self.current.store(index, Ordering::Relaxed);
                    return answer;
                }
            }
        }
        Err(last)
    }

    fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        credential: Option<&str>,
        body: &T,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let body = serde_json::to_value(body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.attempt(|endpoint| Self::post_to(endpoint, path, credential, &body, timeout))
    }

    fn post_to<R: DeserializeOwned>(
        endpoint: &Endpoint,
        path: &str,
        credential: Option<&str>,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let mut request = endpoint.agent.post(&format!("{}{path}", endpoint.url)).timeout(timeout);
        if let Some(c) = credential {
            request = request.set("Authorization", &format!("{BEARER}{c}"));
        }
        match request.send_json(body.clone()) {
            Ok(response) => response.into_json().map_err(|e| AgentError::Protocol(format!("{path}: {e}"))),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or(text);
                Err(if status == 401 { AgentError::Refused(message) } else { AgentError::Controller(status, message) })
            }
            Err(e) => Err(AgentError::Unreachable(e.to_string())),
        }
    }

    pub fn join(&self, request: &JoinRequest) -> Result<JoinResponse, AgentError> {
        self.post(JOIN_PATH, None, request, REQUEST_TIMEOUT)
    }

    /// The long poll: the controller holds it for up to `interval`.
    pub fn poll(
        &self,
        credential: &str,
        request: &PollRequest,
        interval: Duration,
    ) -> Result<PollResponse, AgentError> {
        self.post(POLL_PATH, Some(credential), request, interval + REQUEST_TIMEOUT)
    }

    pub fn report(&self, credential: &str, event: &Event) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(EVENT_PATH, Some(credential), event, REQUEST_TIMEOUT).map(drop)
    }

    /// Sends what the data plane sees (server health, counters).
    pub fn runtime(&self, credential: &str, report: &RuntimeReport) -> Result<(), AgentError> {
        self.post::<_, serde_json::Value>(RUNTIME_PATH, Some(credential), report, REQUEST_TIMEOUT).map(drop)
    }

    /// Downloads an image into `part`, continuing from what `part` already holds; calls
    /// `progress` with the bytes held so far.
    pub fn download(
        &self,
        credential: &str,
        image_uuid: &str,
        size: u64,
        part: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), AgentError> {
        let mut attempts = 0;
        loop {
            let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            if have == size {
                return Ok(());
            }
            if have > size {
                fs::remove_file(part).map_err(AgentError::Io)?;
                continue;
            }
            attempts += 1;
            match self.attempt(|endpoint| Self::fetch_from(endpoint, credential, image_uuid, have, part, progress)) {
                Ok(()) => attempts = 0,
                Err(e @ (AgentError::Refused(_) | AgentError::Controller(..))) => return Err(e),
                Err(e) if attempts >= 5 => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, have, "download interrupted; resuming");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn fetch_from(
        endpoint: &Endpoint,
        credential: &str,
        image_uuid: &str,
        from: u64,
        part: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), AgentError> {
        let url = format!("{}{IMAGE_PATH}/{image_uuid}", endpoint.url);
        let response = match endpoint
            .agent
            .get(&url)
            .set("Authorization", &format!("{BEARER}{credential}"))
            .set("Range", &format!("bytes={from}-"))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(401, r)) => return Err(AgentError::Refused(r.into_string().unwrap_or_default())),
            Err(ureq::Error::Status(status, r)) => {
                return Err(AgentError::Controller(status, r.into_string().unwrap_or_default()));
            }
            Err(e) => return Err(AgentError::Unreachable(e.to_string())),
        };
        let mut out = fs::OpenOptions::new().create(true).append(true).open(part).map_err(AgentError::Io)?;
        let mut reader = response.into_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut have = from;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AgentError::Unreachable(format!("download: {e}"))),
            };
            out.write_all(&buf[..n]).map_err(AgentError::Io)?;
            have += n as u64;
            progress(have);
        }
        out.sync_all().map_err(AgentError::Io)
    }
}
