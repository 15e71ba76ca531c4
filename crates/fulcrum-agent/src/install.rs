//! Installing an image into the spare slot: download (resumable), check the sha256 the
//! controller announced, verify the signature and every file against the keys pinned at join,
//! unpack the SE payload, run the hooks, and switch. Nothing touches the active slot; any
//! failure before the switch leaves the SE as it was.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fulcrum_package::{Side, TrustedKeys, fill_slot, verify};
use fulcrum_se_protocol::Step;
use serde::{Deserialize, Serialize};

use crate::AgentError;

pub const SLOT_FILE: &str = "slot.json";
/// How long an install hook (pre-install, post-install) may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// What a slot holds, written last when it is filled (a slot without it is not installable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub version: String,
    pub build: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Hooks, relative to the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_install: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

impl SlotInfo {
    pub fn read(slot: &Path) -> Option<SlotInfo> {
        serde_json::from_slice(&fs::read(slot.join(SLOT_FILE)).ok()?).ok()
    }

    pub fn label(&self) -> String {
        fulcrum_se_protocol::version_label(&self.version, self.build, self.patch_version.as_deref())
    }
}

/// What the caller reports as the install goes.
pub type Report<'a> = &'a mut dyn FnMut(Step, u8, String);

pub struct Request<'a> {
    pub package: &'a Path,
    pub sha256: &'a str,
    pub image_name: &'a str,
    pub keys: &'a TrustedKeys,
    pub active: &'a Path,
    pub spare: &'a Path,
    pub free_disk_bytes: u64,
}

fn failed(message: impl Into<String>) -> AgentError {
    AgentError::Install(message.into())
}

/// Runs a hook of a slot with the slot as its working directory; it is killed, and fails, once
/// it has run for `timeout`.
pub fn run_hook(slot: &Path, hook: &str, version: &str, timeout: Duration) -> Result<(), AgentError> {
    let path = slot.join(hook);
    let mut child = Command::new(&path)
        .current_dir(slot)
        .env("FULCRUM_SE_SLOT", slot)
        .env("FULCRUM_SE_VERSION", version)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run {hook}: {e}")))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(AgentError::Io)? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("{hook} did not finish within {:.0} s", timeout.as_secs_f64())));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let tail: String = stderr.trim().chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
    Err(failed(format!(
        "{hook} failed ({status}){}",
        if tail.is_empty() { String::new() } else { format!(": {tail}") }
    )))
}

/// Checks the downloaded package and fills the spare slot. Returns what the slot now holds.
/// The caller switches slots afterwards.
pub fn prepare(request: &Request<'_>, report: Report<'_>) -> Result<SlotInfo, AgentError> {
    report(Step::Verifying, 0, format!("checking {}", request.image_name));
    let (got, _) = fulcrum_package::sha256_of_file(request.package).map_err(AgentError::Io)?;
    if !request.sha256.is_empty() && got != request.sha256 {
        return Err(failed(format!(
            "sha256 mismatch: the controller announced {}, the download is {got} (the image is damaged or was tampered with)",
            request.sha256
        )));
    }
    let mut file = fs::File::open(request.package).map_err(AgentError::Io)?;
    let verified = verify(&mut file, request.keys, &mut |_| {}).map_err(|e| failed(format!("package refused: {e}")))?;
    let active = SlotInfo::read(request.active).ok_or_else(|| failed("the active slot has no slot.json"))?;
    let needed = verified.manifest.requirements.se_free_disk_bytes;
    if request.free_disk_bytes < needed {
        return Err(failed(format!(
            "the image needs {needed} bytes free on the SE, {} are free",
            request.free_disk_bytes
        )));
    }
    report(Step::Unpacking, 0, format!("into {}", request.spare.display()));
    let running = (active.version.as_str(), active.build, active.patch_version.as_deref());
    let installed = fill_slot(&mut file, &verified, Side::Se, running, request.active, request.spare)
        .map_err(|e| failed(e.to_string()))?;
    let _ = fs::remove_file(request.spare.join(SLOT_FILE));
    if let Some(pre) = &installed.pre_install {
        report(Step::PreInstall, 0, pre.clone());
        run_hook(request.spare, pre, &installed.version, HOOK_TIMEOUT)?;
    }
    // A patch without hooks of its own keeps those of the release it patches.
    let patched = installed.version == active.version && installed.build == active.build;
    let info = SlotInfo {
        version: installed.version,
        build: installed.build,
        patch_version: installed.patch_version,
        image: Some(request.image_name.to_string()),
        post_install: installed.post_install.or(active.post_install.clone().filter(|_| patched)),
        health_check: installed.health_check.or(active.health_check.clone().filter(|_| patched)),
    };
    crate::write_json(&request.spare.join(SLOT_FILE), &info)?;
    Ok(info)
}

/// The slot directory of a data dir.
pub fn slot_dir(data_dir: &Path, slot: &str) -> PathBuf {
    data_dir.join("slots").join(slot)
}
