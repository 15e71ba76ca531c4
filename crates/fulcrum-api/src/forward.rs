//! A follower passes writes to the leader and hands back its answer: clients may send any
//! request to any node. The leader's address and certificate pin come from the election key.

use std::time::Duration;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::cluster::{CLIENT_HEADER, Hop, SECRET_HEADER};
use crate::error::ApiError;
use fulcrum_store::election::Leader;

/// Set on a forwarded request: the leader it reaches must not pass it on again.
pub const FORWARDED: &str = "x-fulcrum-forwarded-by";
const TIMEOUT: Duration = Duration::from_secs(60);
/// Headers that describe one hop, not the request.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "host", "content-length"];

fn unavailable(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
}

/// Why a request did not get the leader's answer.
#[derive(Debug)]
pub enum Undelivered {
    /// Nothing reached the leader (no connection, no TLS session): the request may be sent
    /// again, to this leader or the next.
    NotSent(ApiError),
    /// It may have reached the leader, and may have been committed.
    Unknown(ApiError),
}

impl From<Undelivered> for ApiError {
    fn from(e: Undelivered) -> ApiError {
        match e {
            Undelivered::NotSent(e) | Undelivered::Unknown(e) => e,
        }
    }
}

pub async fn to_leader(leader: &Leader, hop: &Hop, parts: &Parts, body: Bytes) -> Result<Response, Undelivered> {
    tokio::time::timeout(TIMEOUT, send(leader, hop, parts, body)).await.map_err(|_| {
        Undelivered::Unknown(unavailable(format!(
            "the leader at {} did not answer within {TIMEOUT:?}",
            leader.advertise
        )))
    })?
}

/// A connection to another controller of the cluster at `advertise`; under HTTPS only the
/// certificate it published (`pin`) is accepted. Answers the connection and the authority.
pub(crate) async fn connect(advertise: &str, pin: Option<&str>) -> Result<(Sender, String), String> {
    let (tls, rest) = match advertise.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        _ => return Err(format!("the address '{advertise}' is not a URL")),
    };
    let authority = rest.trim_end_matches('/').to_string();
    let tcp = tokio::net::TcpStream::connect(&authority).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let sender = if tls {
        let trust = pin.map_or(fulcrum_tls::Trust::Any, |pin| fulcrum_tls::Trust::Pins(vec![pin.to_string()]));
        let config = fulcrum_tls::tls_config_trusting(&trust).map_err(|e| e.to_string())?;
        let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h).to_string();
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
        handshake(TokioIo::new(stream)).await?
    } else {
        handshake(TokioIo::new(tcp)).await?
    };
    Ok((sender, authority))
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn handshake<IO>(io: IO) -> Result<Sender, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn send(leader: &Leader, hop: &Hop, parts: &Parts, body: Bytes) -> Result<Response, Undelivered> {
    let down = |e: &dyn std::fmt::Display| unavailable(format!("cannot reach the leader at {}: {e}", leader.advertise));
    let not_sent = |e: &dyn std::fmt::Display| Undelivered::NotSent(down(e));
    let unknown = |e: &dyn std::fmt::Display| Undelivered::Unknown(down(e));
    // Nothing is sent before the connection (and its TLS session) is up.
    let (mut sender, authority) = connect(&leader.advertise, leader.pin.as_deref()).await.map_err(|e| not_sent(&e))?;
    let mut request =
        Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            // The client's Host: the answer's URLs name the node the client talks to.
            .header(
                header::HOST,
                parts.headers.get(header::HOST).cloned().unwrap_or_else(|| {
                    HeaderValue::from_str(&authority).unwrap_or(HeaderValue::from_static("localhost"))
                }),
            )
            .header(FORWARDED, &hop.me)
            .header(CLIENT_HEADER, &hop.client);
    if let Some(secret) = &hop.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    for (name, value) in &parts.headers {
        let ours = [FORWARDED, CLIENT_HEADER, SECRET_HEADER].contains(&name.as_str());
        if !HOP_BY_HOP.contains(&name.as_str()) && !ours {
            request = request.header(name, value);
        }
    }
    let request = request.body(Full::new(body)).map_err(|e| not_sent(&e))?;
    exchange(&mut sender, request).await.map_err(|e| unknown(&e))
}

async fn exchange(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<Response, String> {
    let answer = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let (parts, body) = answer.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    // Which node answered, for operators and tests.
    response.headers_mut().insert(HeaderName::from_static("x-fulcrum-answered-by"), HeaderValue::from_static("leader"));
    Ok(response)
}
