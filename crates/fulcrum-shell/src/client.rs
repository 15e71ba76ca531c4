//! A blocking REST client for the controller: logs in like the SDK (session cookie + CSRF
//! token), logs in again when the session expires.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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

/// Accepts any server certificate: the controller's own is self-signed, as with `curl -k` or
/// the SDK's default `verify=False`. Pass a CA file to verify instead.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts exactly the certificate whose pin (SHA-256 of its DER, hex) was given: how an SE
/// agent recognises its controller from the join token alone.
#[derive(Debug)]
struct PinnedCertificate {
    pin: String,
    any: AcceptAnyCertificate,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fulcrum_se_protocol::certificate_pin(end_entity.as_ref()) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the controller's one named by the join token".into(),
            ))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.any.supported_verify_schemes()
    }
}

/// How a client trusts the controller's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Verify against the CA certificates of a PEM file.
    Ca(std::path::PathBuf),
    /// Accept only the certificate of this pin.
    Pin(String),
    /// Accept any certificate (`curl -k`).
    Any,
}

/// TLS settings: verify against `ca_file` when given, otherwise accept the controller's
/// self-signed certificate.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    tls_config_trusting(&ca_file.map_or(Trust::Any, |p| Trust::Ca(p.to_path_buf())))
}

pub fn tls_config_trusting(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let config = match trust {
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(path).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?
            {
                roots
                    .add(cert.map_err(|e| ClientError::Tls(e.to_string()))?)
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                pin: pin.clone(),
                any: AcceptAnyCertificate(provider),
            }))
            .with_no_client_auth(),
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
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
