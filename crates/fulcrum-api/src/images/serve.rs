//! Package bytes read back out of a file, a slice of it, resumable with `Range`: for agents
//! (the SE side of an image) and for other controllers fetching their copy.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use tokio::sync::mpsc;

use crate::error::ApiError;

const DOWNLOAD_CHUNK: usize = 256 << 10;

/// A response body fed by a thread that reads the file.
struct ChannelBody(mpsc::Receiver<io::Result<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|next| next.map(|chunk| chunk.map(Frame::data)))
    }
}

/// `bytes=N-` or `bytes=N-M`: where to start and the last byte wanted.
fn parse_range(value: &str, length: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end =
        if end.trim().is_empty() { length.checked_sub(1)? } else { end.trim().parse::<u64>().ok()?.min(length - 1) };
    (start <= end && end < length).then_some((start, end))
}

/// The `length` bytes at `offset` of `path`, or the part of them `headers` ask for with `Range`.
pub fn serve_slice(path: &Path, offset: u64, length: u64, headers: &HeaderMap) -> Result<Response, ApiError> {
    let file = path.to_path_buf();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end) = match range {
        None => (0, length.saturating_sub(1)),
        Some(r) => parse_range(r, length).ok_or_else(|| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range '{r}' is outside the image's {length} bytes"),
            )
        })?,
    };
    let count = if length == 0 { 0 } else { end - start + 1 };
    let mut reader =
        std::fs::File::open(&file).map_err(|e| ApiError::internal(format!("cannot open the image: {e}")))?;
    reader.seek(SeekFrom::Start(offset + start)).map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut left = count;
        let mut limited = reader.take(count);
        while left > 0 {
            let mut buf = vec![0u8; DOWNLOAD_CHUNK.min(left as usize)];
            let chunk = limited.read(&mut buf).and_then(|n| {
                if n == 0 {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the image file is shorter than its record"))
                } else {
                    Ok(n)
                }
            });
            let stop = chunk.is_err();
            let item = chunk.map(|n| {
                left -= n as u64;
                buf.truncate(n);
                Bytes::from(buf)
            });
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    let mut response = Body::new(ChannelBody(rx)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{length}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 9)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=4-5", 10), Some((4, 5)));
        assert_eq!(parse_range("bytes=4-50", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=5-4", 10), None);
        assert_eq!(parse_range("items=0-", 10), None);
    }
}
