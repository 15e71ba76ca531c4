//! A blocking REST client for the controller: logs in like the SDK (session cookie + CSRF
//! token), logs in again when the session expires.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller: {0}")]
    Transport(String),
    #[error("login failed ({status}): {message}")]
    Login { status: u16, message: String },
    #[error("tls: {0}")]
    Tls(String),
}

pub use fulcrum_tls::Trust;

/// TLS settings: verify against `ca_file` when given, otherwise accept the controller's
/// self-signed certificate.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    fulcrum_tls::tls_config(ca_file).map_err(ClientError::Tls)
}

pub fn tls_config_trusting(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    fulcrum_tls::tls_config_trusting(trust).map_err(ClientError::Tls)
}

/// A logged-in connection to a controller.
pub struct Client {
    agent: ureq::Agent,
    pub base_url: String,
    user: String,
    password: String,
    pub tenant: String,
    session: Option<(String, String)>,
}

/// A response: status and JSON body (`Null` when empty or not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Client {
    pub fn connect(
        base_url: &str,
        user: &str,
        password: &str,
        tenant: &str,
        ca_file: Option<&Path>,
    ) -> Result<Client, ClientError> {
        let agent =
            ureq::AgentBuilder::new().tls_config(tls_config(ca_file)?).timeout(Duration::from_secs(120)).build();
        let mut client = Client {
            agent,
            base_url: base_url.trim_end_matches('/').to_string(),
            user: user.into(),
            password: password.into(),
            tenant: tenant.into(),
            session: None,
        };
        client.login()?;
        Ok(client)
    }

    fn login(&mut self) -> Result<(), ClientError> {
        let result = self
            .agent
            .post(&format!("{}/login", self.base_url))
            .send_form(&[("username", self.user.as_str()), ("password", self.password.as_str())]);
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                let message = r.into_string().unwrap_or_default();
                return Err(ClientError::Login { status, message });
            }
            Err(e) => return Err(ClientError::Transport(e.to_string())),
        };
        let cookie = |name: &str| {
            response
                .all("set-cookie")
                .iter()
                .find_map(|c| c.split(';').next()?.strip_prefix(&format!("{name}=")).map(String::from))
        };
        match (cookie("avi-sessionid"), cookie("csrftoken")) {
            (Some(session), Some(csrf)) => {
                self.session = Some((session, csrf));
                Ok(())
            }
            _ => Err(ClientError::Login {
                status: response.status(),
                message: "no session cookie in the login response".into(),
            }),
        }
    }

    /// Sends a request to `/api/<path>`; logs in again once if the session has expired.
    pub fn request(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, ClientError> {
        let reply = self.send(method, path, body)?;
        if reply.status == 401 {
            self.login()?;
            return self.send(method, path, body);
        }
        Ok(reply)
    }

    pub fn get(&mut self, path: &str) -> Result<Reply, ClientError> {
        self.request("GET", path, None)
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply, ClientError> {
        match body {
            Some(b) => self.send_raw(method, path, &[], Payload::Json(b)),
            None => self.send_raw(method, path, &[], Payload::None),
        }
    }

    /// Sends raw bytes with extra headers (a chunk of an upload); logs in again once if needed.
    pub fn send_bytes(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        bytes: &[u8],
    ) -> Result<Reply, ClientError> {
        let reply = self.send_raw(method, path, headers, Payload::Bytes(bytes))?;
        if reply.status == 401 {
            self.login()?;
            return self.send_raw(method, path, headers, Payload::Bytes(bytes));
        }
        Ok(reply)
    }

    fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Payload<'_>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}/api/{}", self.base_url, path.trim_start_matches('/'));
        let mut request =
            self.agent.request(method, &url).set("X-Avi-Tenant", &self.tenant).set("Referer", &self.base_url);
        if let Some((session, csrf)) = &self.session {
            request =
                request.set("Cookie", &format!("avi-sessionid={session}; csrftoken={csrf}")).set("X-CSRFToken", csrf);
        }
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Payload::Json(b) => request.send_json(b.clone()),
            Payload::Bytes(b) => request.send_bytes(b),
            Payload::None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(ClientError::Transport(e.to_string())),
        };
        let status = response.status();
        let mut text = String::new();
        response
            .into_reader()
            .take(64 << 20)
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Reply { status, body: serde_json::from_str(&text).unwrap_or(Value::Null) })
    }
}

enum Payload<'a> {
    None,
    Json(&'a Value),
    Bytes(&'a [u8]),
}
