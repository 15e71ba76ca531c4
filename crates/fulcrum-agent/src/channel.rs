//! The agent's side of the protocol: HTTPS requests it opens to the controller.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_se_protocol::{
    BEARER, EVENT_PATH, Event, IMAGE_PATH, JOIN_PATH, JoinRequest, JoinResponse, POLL_PATH, PollRequest, PollResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AgentError;

/// How long a request may take beyond what the controller holds it for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Channel {
    agent: ureq::Agent,
    base_url: String,
}

impl Channel {
    pub fn new(base_url: &str, tls: Arc<rustls::ClientConfig>) -> Channel {
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(30))
            .build();
        Channel { agent, base_url: base_url.trim_end_matches('/').to_string() }
    }

    fn post<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        credential: Option<&str>,
        body: &T,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        let mut request = self.agent.post(&format!("{}{path}", self.base_url)).timeout(timeout);
        if let Some(c) = credential {
            request = request.set("Authorization", &format!("{BEARER}{c}"));
        }
        let body = serde_json::to_value(body).map_err(|e| AgentError::Protocol(e.to_string()))?;
        match request.send_json(body) {
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
            match self.fetch_from(credential, image_uuid, have, part, progress) {
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
        &self,
        credential: &str,
        image_uuid: &str,
        from: u64,
        part: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), AgentError> {
        let url = format!("{}{IMAGE_PATH}/{image_uuid}", self.base_url);
        let response = match self
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
