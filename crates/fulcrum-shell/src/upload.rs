//! `upload image filename <path>`: a resumable upload in chunks, with a progress bar. A chunk
//! that fails is retried from the offset the controller acknowledged.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::error_text;

const CHUNK_BYTES: usize = 8 << 20;
const RETRIES: usize = 5;

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

/// Uploads a package; `progress` receives each redrawn progress line.
pub fn upload_image(client: &mut Client, path: &Path, progress: &mut dyn Write) -> Result<Value, String> {
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total = file.metadata().map_err(|e| e.to_string())?.len();
    let filename = path.file_name().and_then(|n| n.to_str()).unwrap_or("package");
    let reply = client
        .request("POST", "image-upload", Some(&json!({"size": total, "filename": filename})))
        .map_err(|e| e.to_string())?;
    if reply.status != 201 {
        return Err(error_text(&reply));
    }
    let id = reply.body["uuid"].as_str().ok_or("the controller did not name the upload session")?.to_string();
    let session = format!("image-upload/{id}");
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let started = Instant::now();
    let mut failures = 0;
    while offset < total {
        let len = (total - offset).min(CHUNK_BYTES as u64) as usize;
        file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut buf[..len])).map_err(|e| e.to_string())?;
        let range = format!("bytes {offset}-{}/{total}", offset + len as u64 - 1);
        let headers = [("Content-Type", "application/octet-stream"), ("Content-Range", range.as_str())];
        match client.send_bytes("PUT", &session, &headers, &buf[..len]) {
            Ok(reply) if reply.status == 200 => {
                hasher.update(&buf[..len]);
                offset += len as u64;
                failures = 0;
                let _ = write!(progress, "\r{}", progress_bar(offset, total, started.elapsed()));
                let _ = progress.flush();
            }
            Ok(reply) if reply.status >= 500 || reply.status == 409 => {
                failures += 1;
                if failures > RETRIES {
                    return Err(error_text(&reply));
                }
                offset = resume_offset(client, &session, offset)?;
            }
            Ok(reply) => return Err(error_text(&reply)),
            Err(e) => {
                failures += 1;
                if failures > RETRIES {
                    return Err(format!("upload failed after {RETRIES} retries: {e}"));
                }
                std::thread::sleep(Duration::from_millis(500 * failures as u64));
                offset = resume_offset(client, &session, offset)?;
            }
        }
    }
    let _ = writeln!(progress);
    let digest = fulcrum_package::hex(&hasher.finalize());
    let reply = client
        .request("POST", &format!("{session}/complete"), Some(&json!({"sha256": digest})))
        .map_err(|e| e.to_string())?;
    if reply.status == 201 { Ok(reply.body) } else { Err(error_text(&reply)) }
}

/// Where to continue: the controller's acknowledged offset. Bytes before it were hashed when
/// they were acknowledged, so it can only equal what this side counted.
fn resume_offset(client: &mut Client, session: &str, sent: u64) -> Result<u64, String> {
    let reply = client.get(session).map_err(|e| e.to_string())?;
    let acked = reply.body["offset"].as_u64().ok_or_else(|| error_text(&reply))?;
    if acked != sent {
        return Err(format!("the controller has {acked} bytes of the upload, this side sent {sent}; start again"));
    }
    Ok(acked)
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
