//! A push parser for `multipart/form-data` (RFC 7578): bytes go in as they arrive from the
//! socket, part boundaries and data come out, and nothing is held but the bytes that might
//! still turn out to be a boundary. An upload of any size passes through in constant memory.

use axum::body::Bytes;
use bytes::{Buf, BytesMut};
use memchr::memmem::Finder;

/// Headers of a part longer than this are not headers.
const MAX_HEADER_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartHeaders {
    pub name: Option<String>,
    pub filename: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Part(PartHeaders),
    Data(Bytes),
    PartEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    Done,
}

pub struct Multipart {
    /// `\r\n--boundary`: the body is read as if it started with `\r\n`, so the first
    /// delimiter looks like every other.
    delimiter: Finder<'static>,
    delimiter_len: usize,
    buf: BytesMut,
    state: State,
}

/// The boundary of a `multipart/form-data` Content-Type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    if !params.next()?.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
        })
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

/// The boundary of a body that starts with one (`--boundary\r\n`), for clients that send a
/// multipart body under another Content-Type (the Python SDK labels every body JSON).
pub fn sniff_boundary(start: &[u8]) -> Option<String> {
    let rest = start.strip_prefix(b"--")?;
    let end = memchr::memmem::find(&rest[..rest.len().min(74)], b"\r\n")?;
    let boundary = std::str::from_utf8(&rest[..end]).ok()?;
    (!boundary.is_empty() && boundary.bytes().all(|b| b.is_ascii_graphic() || b == b' ')).then(|| boundary.to_string())
}

/// `form-data; name="file"; filename="controller.pkg"` → its name and filename.
fn disposition(value: &str) -> PartHeaders {
    let mut headers = PartHeaders { name: None, filename: None };
    for param in value.split(';').skip(1) {
        let Some((k, v)) = param.split_once('=') else { continue };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "name" => headers.name = Some(v),
            "filename" => headers.filename = Some(v),
            _ => {}
        }
    }
    headers
}

impl Multipart {
    pub fn new(boundary: &str) -> Multipart {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        let mut buf = BytesMut::with_capacity(64 << 10);
        buf.extend_from_slice(b"\r\n");
        Multipart {
            delimiter_len: delimiter.len(),
            delimiter: Finder::new(&delimiter).into_owned(),
            buf,
            state: State::Preamble,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Like `feed`, but inside a part's data the chunk is not copied: its `Data` events are
    /// slices of it. (Only the few bytes that might begin a delimiter are kept back.)
    pub fn feed_bytes(&mut self, chunk: Bytes, out: &mut Vec<Event>) -> Result<(), String> {
        let kept = self.buf.len();
        let overlap = self.delimiter_len - 1;
        if self.state != State::Body || chunk.len() < self.delimiter_len {
            return self.feed(&chunk, out);
        }
        // A delimiter that starts in the kept bytes ends within the chunk's first `overlap`.
        let mut seam = Vec::with_capacity(kept + overlap);
        seam.extend_from_slice(&self.buf);
        seam.extend_from_slice(&chunk[..overlap]);
        if self.delimiter.find(&seam).is_some_and(|at| at < kept) {
            return self.feed(&chunk, out);
        }
        if kept > 0 {
            out.push(Event::Data(self.buf.split().freeze()));
        }
        match self.delimiter.find(&chunk) {
            Some(at) => {
                if at > 0 {
                    out.push(Event::Data(chunk.slice(..at)));
                }
                out.push(Event::PartEnd);
                self.state = State::AfterDelimiter;
                self.feed(&chunk[at + self.delimiter_len..], out)
            }
            None => {
                let safe = chunk.len() - overlap;
                out.push(Event::Data(chunk.slice(..safe)));
                self.buf.extend_from_slice(&chunk[safe..]);
                Ok(())
            }
        }
    }

    /// Feeds the next bytes of the body; appends what they complete to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), String> {
        if self.state == State::Done {
            return Ok(()); // the epilogue carries no meaning
        }
        self.buf.extend_from_slice(chunk);
        loop {
            match self.state {
                State::Preamble => match self.delimiter.find(&self.buf) {
                    Some(at) => {
                        self.buf.advance(at + self.delimiter_len);
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        let keep = self.delimiter_len - 1;
                        if self.buf.len() > keep {
                            self.buf.advance(self.buf.len() - keep);
                        }
                        return Ok(());
                    }
                },
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if self.buf.starts_with(b"--") {
                        self.state = State::Done;
                        self.buf.clear();
                        return Ok(());
                    }
                    // Transport padding (spaces, tabs) may precede the line break.
                    match memchr::memmem::find(&self.buf, b"\r\n") {
                        Some(at) if self.buf[..at].iter().all(|b| *b == b' ' || b'\t' == *b) => {
                            self.buf.advance(at + 2);
                            self.state = State::Headers;
                        }
                        Some(_) => return Err("malformed multipart body: junk after a boundary".into()),
                        None if self.buf.len() > 256 => {
                            return Err("malformed multipart body: junk after a boundary".into());
                        }
                        None => return Ok(()),
                    }
                }
                State::Headers => {
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some(0)
                    } else {
                        memchr::memmem::find(&self.buf, b"\r\n\r\n").map(|at| at + 2)
                    };
                    let Some(end) = end else {
                        if self.buf.len() > MAX_HEADER_BYTES {
                            return Err(format!(
                                "malformed multipart body: part headers exceed {MAX_HEADER_BYTES} bytes"
                            ));
                        }
                        return Ok(());
                    };
                    let block = self.buf.split_to(end + 2);
                    let text = std::str::from_utf8(&block[..end])
                        .map_err(|_| "malformed multipart body: part headers are not UTF-8".to_string())?;
                    let headers = text
                        .split("\r\n")
                        .filter_map(|line| line.split_once(':'))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
                        .map(|(_, v)| disposition(v))
                        .unwrap_or(PartHeaders { name: None, filename: None });
                    out.push(Event::Part(headers));
                    self.state = State::Body;
                }
                State::Body => match self.delimiter.find(&self.buf) {
                    Some(at) => {
                        if at > 0 {
                            out.push(Event::Data(self.buf.split_to(at).freeze()));
                        }
                        self.buf.advance(self.delimiter_len);
                        out.push(Event::PartEnd);
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        // The tail may be the start of a delimiter: keep it for the next chunk.
                        let safe = self.buf.len().saturating_sub(self.delimiter_len - 1);
                        if safe > 0 {
                            out.push(Event::Data(self.buf.split_to(safe).freeze()));
                        }
                        return Ok(());
                    }
                },
                State::Done => return Ok(()),
            }
        }
    }

    /// Called at the end of the body: a body that stops before its closing boundary was cut off.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            State::Done => Ok(()),
            State::Preamble => Err("malformed multipart body: no boundary found".into()),
            _ => Err("the multipart body ends before its closing boundary (the upload was cut off)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (name, filename, data) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let file = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
            out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n").as_bytes());
            out.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\nepilogue").as_bytes());
        out
    }

    /// Parses `input` fed in pieces of `step` bytes, through `feed` and through `feed_bytes`
    /// (which must agree); returns each part's headers and data.
    fn parse(boundary: &str, input: &[u8], step: usize) -> Vec<(PartHeaders, Vec<u8>)> {
        let by_slice = parse_with(boundary, input, step, false);
        assert_eq!(by_slice, parse_with(boundary, input, step, true), "feed_bytes disagrees, step {step}");
        by_slice
    }

    fn parse_with(boundary: &str, input: &[u8], step: usize, zero_copy: bool) -> Vec<(PartHeaders, Vec<u8>)> {
        let mut parser = Multipart::new(boundary);
        let mut events = Vec::new();
        for piece in input.chunks(step) {
            if zero_copy {
                parser.feed_bytes(Bytes::copy_from_slice(piece), &mut events).unwrap();
            } else {
                parser.feed(piece, &mut events).unwrap();
            }
        }
        parser.finish().unwrap();
        let mut parts: Vec<(PartHeaders, Vec<u8>)> = Vec::new();
        for event in events {
            match event {
                Event::Part(h) => parts.push((h, Vec::new())),
                Event::Data(d) => parts.last_mut().unwrap().1.extend_from_slice(&d),
                Event::PartEnd => {}
            }
        }
        parts
    }

    #[test]
    fn parts_come_out_whole_however_the_body_is_split() {
        let boundary = "------------------------abc123";
        // Data that contains near-boundaries and CRLFs.
        let tricky = b"x\r\n--------------------------abc12\r\n-- \r\n\r\n--y".repeat(50);
        let input = body(boundary, &[("name", None, b"value"), ("file", Some("controller.pkg"), &tricky)]);
        for step in [1, 2, 3, 7, 31, 32, 33, 34, 35, 64, 65, 1000, input.len()] {
            let parts = parse(boundary, &input, step);
            assert_eq!(parts.len(), 2, "step {step}");
            assert_eq!(parts[0].0.name.as_deref(), Some("name"));
            assert_eq!(parts[0].1, b"value");
            assert_eq!(parts[1].0, PartHeaders { name: Some("file".into()), filename: Some("controller.pkg".into()) });
            assert_eq!(parts[1].1, tricky, "step {step}");
        }
    }

    /// Uneven pieces, so that delimiters fall across every kind of seam.
    #[test]
    fn uneven_pieces_agree() {
        let boundary = "xyz";
        let data = b"--xy\r\n--xy-\r\n--x\r\r\n--xyy\r\n-xyz\r\n".repeat(40);
        let input = body(boundary, &[("file", Some("f"), &data), ("other", None, b"\r\n--xy")]);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let (mut parsers, mut events) = ([Multipart::new(boundary), Multipart::new(boundary)], [vec![], vec![]]);
            let mut rest = &input[..];
            while !rest.is_empty() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let n = (state % 23 + 1).min(rest.len() as u64) as usize;
                parsers[0].feed(&rest[..n], &mut events[0]).unwrap();
                parsers[1].feed_bytes(Bytes::copy_from_slice(&rest[..n]), &mut events[1]).unwrap();
                rest = &rest[n..];
            }
            let joined = |events: &[Event]| {
                let mut out: Vec<Vec<u8>> = Vec::new();
                for e in events {
                    match e {
                        Event::Part(_) => out.push(Vec::new()),
                        Event::Data(d) => out.last_mut().unwrap().extend_from_slice(d),
                        Event::PartEnd => {}
                    }
                }
                out
            };
            assert_eq!(joined(&events[1]), vec![data.clone(), b"\r\n--xy".to_vec()]);
            assert_eq!(joined(&events[0]), joined(&events[1]));
            assert!(parsers[0].is_done() && parsers[1].is_done());
        }
    }

    #[test]
    fn empty_parts_and_data_are_fine() {
        let parts = parse("b", &body("b", &[("file", Some("empty"), b"")]), 5);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].1.is_empty());
    }

    #[test]
    fn a_cut_off_body_is_an_error() {
        let input = body("b", &[("file", Some("x"), b"0123456789")]);
        let mut parser = Multipart::new("b");
        let mut events = Vec::new();
        parser.feed(&input[..input.len() - 20], &mut events).unwrap();
        assert!(parser.finish().unwrap_err().contains("cut off"));
        let mut parser = Multipart::new("b");
        parser.feed(b"no boundary at all", &mut events).unwrap();
        assert!(parser.finish().unwrap_err().contains("no boundary"));
    }

    #[test]
    fn content_types_give_their_boundary() {
        assert_eq!(boundary("multipart/form-data; boundary=abc").as_deref(), Some("abc"));
        assert_eq!(boundary("Multipart/Form-Data; charset=x; boundary=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(sniff_boundary(b"--abc123\r\nContent-Disposition").as_deref(), Some("abc123"));
        assert_eq!(sniff_boundary(b"{\"name\": 1}"), None);
        assert_eq!(sniff_boundary(b"--\r\n"), None);
    }
}
