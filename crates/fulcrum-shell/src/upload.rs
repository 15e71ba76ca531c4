//! `upload image filename <path>`: a resumable upload in chunks, with a progress bar. After a
//! failure the upload continues from the offset the controller acknowledged.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::{Client, ClientError, Reply};
use crate::error_text;

const CHUNK_BYTES: usize = 8 << 20;

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", units[unit]) }
}

/// `[##########----------]  50%  1.0 GiB / 2.0 GiB  312.4 MiB/s`
pub fn progress_bar(done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 30;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    format!(
        "[{}{}] {percent:>3}%  {} / {}  {}/s",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        human(done),
        human(total),
        human(rate as u64)
    )
}

/// Transport failures and busy answers are retried for about a minute: long enough for a
/// controller restart, short enough that a person is not left waiting on a dead address.
const RETRY_DELAYS_MS: [u64; 8] = [250, 500, 1000, 2000, 4000, 8000, 15000, 30000];

/// Sessions this shell started, so that the same upload run again continues where it stopped.
#[derive(Default, Serialize, Deserialize)]
struct Tracker {
    sessions: Vec<Tracked>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Tracked {
    controller: String,
    path: PathBuf,
    size: u64,
    modified_secs: u64,
    session: String,
}

impl Tracker {
    fn file() -> Option<PathBuf> {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".fulcrum_shell_uploads.json"))
    }
    fn load() -> Tracker {
        Tracker::file()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    fn save(&self) {
        if let Some(file) = Tracker::file() {
            let _ = std::fs::write(file, serde_json::to_vec_pretty(self).expect("tracker serializes"));
        }
    }
    /// The session kept for this file, unless the file changed since.
    fn find(&self, key: &Tracked) -> Option<String> {
        self.sessions
            .iter()
            .find(|t| {
                (&t.controller, &t.path, t.size, t.modified_secs)
                    == (&key.controller, &key.path, key.size, key.modified_secs)
            })
            .map(|t| t.session.clone())
    }
    fn set(key: &Tracked, session: Option<&str>) {
        let mut tracker = Tracker::load();
        tracker.sessions.retain(|t| !(t.controller == key.controller && t.path == key.path));
        if let Some(id) = session {
            tracker.sessions.push(Tracked { session: id.to_string(), ..key.clone() });
        }
        tracker.save();
    }
}

/// The sha256 of the file's first `upto` bytes, advanced as bytes are acknowledged.
struct Prefix {
    hasher: Sha256,
    upto: u64,
}

impl Prefix {
    /// Hashes up to `offset`, reading from the file what was not hashed yet (a chunk whose
    /// answer was lost, or a session resumed from an earlier run).
    fn advance_to(&mut self, file: &mut File, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        if offset < self.upto {
            *self = Prefix { hasher: Sha256::new(), upto: 0 };
        }
        file.seek(SeekFrom::Start(self.upto)).map_err(|e| e.to_string())?;
        while self.upto < offset {
            let len = (offset - self.upto).min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..len]).map_err(|e| e.to_string())?;
            self.hasher.update(&buf[..len]);
            self.upto += len as u64;
        }
        Ok(())
    }
}

/// What to do after a request of the upload failed.
enum Next {
    /// Continue from this acknowledged offset.
    ResumeAt(u64),
    /// Stop with this message.
    Stop(String),
}

/// Uploads a package through a resumable session; `progress` receives each redrawn progress
/// line. A chunk whose answer is lost is not sent again once the controller has it; a
/// controller that is briefly away is waited for; Ctrl-C stops the upload and keeps the
/// session, so the same command run again continues it.
pub fn upload_image(client: &mut Client, path: &Path, progress: &mut dyn Write) -> Result<Value, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let total = meta.len();
    let modified_secs =
        meta.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let key = Tracked {
        controller: client.base_url.clone(),
        path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        size: total,
        modified_secs,
        session: String::new(),
    };
    let filename = path.file_name().and_then(|n| n.to_str()).unwrap_or("package");
    let (id, mut offset) = match Tracker::load().find(&key).and_then(|id| existing_session(client, &id, total)) {
        Some(found) => {
            let _ = writeln!(progress, "resuming the upload at {} of {}", human(found.1), human(total));
            found
        }
        None => {
            let reply = with_retries(|| {
                client.request("POST", "image-upload", Some(&json!({"size": total, "filename": filename})))
            })?;
            if reply.status != 201 {
                return Err(error_text(&reply));
            }
            let id = reply.body["uuid"].as_str().ok_or("the controller did not name the upload session")?.to_string();
            (id, 0)
        }
    };
    Tracker::set(&key, Some(&id));
    let session = format!("image-upload/{id}");
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut prefix = Prefix { hasher: Sha256::new(), upto: 0 };
    prefix.advance_to(&mut file, offset, &mut buf)?;
    let started = Instant::now();
    let mut failures = 0usize;
    while offset < total {
        if crate::terminal::requested() {
            let _ = writeln!(progress);
            return Err(interrupted(client, &session, offset, total));
        }
        let len = (total - offset).min(CHUNK_BYTES as u64) as usize;
        file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut buf[..len])).map_err(|e| e.to_string())?;
        let range = format!("bytes {offset}-{}/{total}", offset + len as u64 - 1);
        let headers = [("Content-Type", "application/octet-stream"), ("Content-Range", range.as_str())];
        let outcome = client.send_bytes("PUT", &session, &headers, &buf[..len]);
        let next = match outcome {
            Ok(reply) if reply.status == 200 => {
                prefix.hasher.update(&buf[..len]);
                prefix.upto += len as u64;
                offset += len as u64;
                failures = 0;
                let _ = write!(progress, "\r{}", progress_bar(offset, total, started.elapsed()));
                let _ = progress.flush();
                continue;
            }
            // Busy, or out of step with the controller: ask it where the upload stands. When the
            // session is gone the controller ended it, and its answer to the chunk says why.
            Ok(reply) if reply.status >= 500 || reply.status == 409 || reply.status == 429 => {
                match session_offset(client, &session)? {
                    Some(acked) => Next::ResumeAt(acked),
                    None => Next::Stop(error_text(&reply)),
                }
            }
            Ok(reply) => Next::Stop(error_text(&reply)),
            Err(e) => {
                let _ = writeln!(progress);
                let _ = writeln!(progress, "the controller is not answering ({e}); retrying");
                match wait_for_session(client, &session, &mut failures)? {
                    Some(acked) => Next::ResumeAt(acked),
                    None => Next::Stop("the controller no longer knows this upload session; start again".into()),
                }
            }
        };
        match next {
            Next::ResumeAt(acked) => {
                failures += 1;
                if failures > RETRY_DELAYS_MS.len() {
                    return Err(format!(
                        "upload stopped: no progress after {} tries; run the same command again to resume it",
                        failures - 1
                    ));
                }
                // Nothing gained since the last try: give the controller a moment.
                if acked <= offset && !crate::terminal::sleep(Duration::from_millis(RETRY_DELAYS_MS[failures - 1])) {
                    return Err(interrupted(client, &session, acked, total));
                }
                prefix.advance_to(&mut file, acked, &mut buf)?;
                offset = acked;
            }
            Next::Stop(message) => {
                let _ = writeln!(progress);
                Tracker::set(&key, None);
                return Err(message);
            }
        }
    }
    let _ = writeln!(progress);
    let digest = fulcrum_package::hex(&prefix.hasher.finalize());
    let reply =
        with_retries(|| client.request("POST", &format!("{session}/complete"), Some(&json!({"sha256": digest}))))?;
    // Whatever the verdict, the session is over (a refused package leaves nothing to resume).
    if reply.status != 409 {
        Tracker::set(&key, None);
    }
    if reply.status == 201 { Ok(reply.body) } else { Err(error_text(&reply)) }
}

/// A session from an earlier run that is still open for this file: (id, acknowledged offset).
fn existing_session(client: &mut Client, id: &str, total: u64) -> Option<(String, u64)> {
    let reply = client.get(&format!("image-upload/{id}")).ok()?;
    (reply.status == 200 && reply.body["size"].as_u64() == Some(total))
        .then(|| reply.body["offset"].as_u64().map(|o| (id.to_string(), o)))
        .flatten()
}

/// The controller's acknowledged offset, or None when the session is gone.
fn session_offset(client: &mut Client, session: &str) -> Result<Option<u64>, String> {
    let reply = with_retries(|| client.get(session))?;
    match reply.status {
        200 => reply.body["offset"].as_u64().map(Some).ok_or_else(|| error_text(&reply)),
        404 => Ok(None),
        _ => Err(error_text(&reply)),
    }
}

/// After a transport failure: waits (bounded backoff) until the controller answers again.
fn wait_for_session(client: &mut Client, session: &str, failures: &mut usize) -> Result<Option<u64>, String> {
    loop {
        let Some(delay) = RETRY_DELAYS_MS.get(*failures) else {
            return Err("the controller did not come back; run the same command again to resume the upload".into());
        };
        *failures += 1;
        if !crate::terminal::sleep(Duration::from_millis(*delay)) {
            return Err("upload interrupted; run the same command again to resume it".into());
        }
        match client.get(session) {
            Ok(reply) if reply.status == 200 => return Ok(reply.body["offset"].as_u64()),
            Ok(reply) if reply.status == 404 => return Ok(None),
            Ok(_) | Err(_) => continue,
        }
    }
}

/// Sends a request, retrying transport failures with the same bounded backoff.
fn with_retries(mut send: impl FnMut() -> Result<Reply, ClientError>) -> Result<Reply, String> {
    let mut last = String::new();
    for delay in std::iter::once(0).chain(RETRY_DELAYS_MS) {
        if !crate::terminal::sleep(Duration::from_millis(delay)) {
            return Err("interrupted".into());
        }
        match send() {
            Ok(reply) if reply.status == 502 || reply.status == 503 || reply.status == 504 => last = error_text(&reply),
            Ok(reply) => return Ok(reply),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// What Ctrl-C during an upload says: where it stopped and the two ways on.
fn interrupted(client: &mut Client, session: &str, offset: u64, total: u64) -> String {
    let image = client
        .get(session)
        .ok()
        .and_then(|r| r.body["image_uuid"].as_str().map(String::from))
        .and_then(|uuid| client.get(&format!("image/{uuid}?fields=name")).ok())
        .and_then(|r| r.body["name"].as_str().map(String::from));
    let percent = (offset * 100).checked_div(total).unwrap_or(100);
    let abandon = match image {
        Some(name) => format!(", or 'delete image {name}' to abandon it"),
        None => String::new(),
    };
    format!(
        "upload interrupted at {} of {} ({percent}%); run the same command again to resume it{abandon}",
        human(offset),
        human(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_bar_fills_in_proportion() {
        let bar = progress_bar(1 << 30, 2 << 30, Duration::from_secs(4));
        assert!(bar.starts_with("[###############---------------]  50%"), "{bar}");
        assert!(bar.contains("1.0 GiB / 2.0 GiB") && bar.contains("256.0 MiB/s"), "{bar}");
        assert!(progress_bar(5, 5, Duration::ZERO).contains("100%"));
    }
}
