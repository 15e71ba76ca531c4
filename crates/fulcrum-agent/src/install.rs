//! Installing an image into the spare slot: download (resumable), check the sha256 the
//! controller announced, verify the signature and every file against the keys pinned at join,
//! unpack the SE payload, run the hooks, and switch. Nothing touches the active slot; any
//! failure before the switch leaves the SE as it was.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fulcrum_package::{ComponentRole, Manifest, PackageKind, SE_ROOT, TrustedKeys, Verified, unpack, verify};
use fulcrum_se_protocol::Step;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AgentError;

pub const SLOT_FILE: &str = "slot.json";
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

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

fn hash_file(path: &Path) -> Result<String, AgentError> {
    let mut file = fs::File::open(path).map_err(AgentError::Io)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(AgentError::Io)?;
    Ok(fulcrum_package::hex(&hasher.finalize()))
}

fn failed(message: impl Into<String>) -> AgentError {
    AgentError::Install(message.into())
}

/// The packages whose SE payloads make up the new slot, in the order they are laid down:
/// (offset in the file, length, manifest).
fn layers(verified: &Verified) -> Result<Vec<(u64, u64, Manifest)>, AgentError> {
    let whole = |v: &Verified| (0, v.size, v.manifest.clone());
    if verified.manifest.kind == PackageKind::Bundle {
        let base = verified.component(ComponentRole::Base).ok_or_else(|| failed("the bundle has no base image"))?;
        let mut out = vec![(base.offset, base.size, base.package.manifest.clone())];
        if let Some(patch) = verified.component(ComponentRole::SePatch) {
            out.push((patch.offset, patch.size, patch.package.manifest.clone()));
        }
        return Ok(out);
    }
    Ok(vec![whole(verified)])
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if entry.file_type()?.is_file() {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Runs a hook of a slot with the slot as its working directory.
pub fn run_hook(slot: &Path, hook: &str, version: &str) -> Result<(), AgentError> {
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
        if started.elapsed() > HOOK_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!("{hook} did not finish within {} s", HOOK_TIMEOUT.as_secs())));
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
    let got = hash_file(request.package)?;
    if !request.sha256.is_empty() && got != request.sha256 {
        return Err(failed(format!(
            "sha256 mismatch: the controller announced {}, the download is {got} (the image is damaged or was tampered with)",
            request.sha256
        )));
    }
    let mut file = fs::File::open(request.package).map_err(AgentError::Io)?;
    let verified = verify(&mut file, request.keys, &mut |_| {}).map_err(|e| failed(format!("package refused: {e}")))?;
    let layers = layers(&verified)?;
    let active = SlotInfo::read(request.active).ok_or_else(|| failed("the active slot has no slot.json"))?;
    let first = &layers[0].2;
    if first.se_image.is_none() {
        return Err(failed(format!("{} carries no SE image", request.image_name)));
    }
    let patch_only = first.is_patch();
    if patch_only && first.version != active.version {
        return Err(failed(format!("the patch is for version {}, this SE runs {}", first.version, active.version)));
    }
    let needed = layers.iter().map(|l| l.2.requirements.se_free_disk_bytes).max().unwrap_or(0);
    if request.free_disk_bytes < needed {
        return Err(failed(format!(
            "the image needs {needed} bytes free on the SE, {} are free",
            request.free_disk_bytes
        )));
    }

    report(Step::Unpacking, 0, format!("into {}", request.spare.display()));
    let spare = request.spare;
    if spare.exists() {
        fs::remove_dir_all(spare).map_err(AgentError::Io)?;
    }
    if patch_only {
        // A patch changes some files of the running version: start from a copy of it.
        copy_tree(request.active, spare).map_err(AgentError::Io)?;
        let _ = fs::remove_file(spare.join(SLOT_FILE));
    }
    fs::create_dir_all(spare).map_err(AgentError::Io)?;
    let mut info = if patch_only { active.clone() } else { SlotInfo { patch_version: None, ..active.clone() } };
    for (offset, length, manifest) in &layers {
        let Some(payload) = &manifest.se_image else { continue };
        file.seek(SeekFrom::Start(*offset)).map_err(AgentError::Io)?;
        unpack(&mut (&mut file).take(*length), manifest, SE_ROOT, spare).map_err(|e| failed(format!("unpack: {e}")))?;
        let relative =
            |hook: &Option<String>| hook.as_ref().and_then(|h| h.strip_prefix(&payload.root)).map(String::from);
        if !manifest.is_patch() {
            info.version = manifest.version.clone();
            info.build = manifest.build;
        }
        if manifest.is_patch() {
            info.patch_version = manifest.patch_version.clone();
        }
        if let Some(pre) = relative(&payload.pre_install) {
            report(Step::PreInstall, 0, pre.clone());
            run_hook(spare, &pre, &manifest.version)?;
        }
        info.post_install = relative(&payload.post_install).or(info.post_install.take().filter(|_| patch_only));
        info.health_check = relative(&payload.health_check).or(info.health_check.take().filter(|_| patch_only));
    }
    info.image = Some(request.image_name.to_string());
    crate::write_json(&spare.join(SLOT_FILE), &info)?;
    Ok(info)
}

/// The slot directory of a data dir.
pub fn slot_dir(data_dir: &Path, slot: &str) -> PathBuf {
    data_dir.join("slots").join(slot)
}
