//! The controller's own A/B slots: which version it runs, which it keeps for rollback, and the
//! restart into another slot (re-exec of the process, keeping its listening socket).
//!
//! DATA/controller/state.json says which slot is active and what each holds (written with
//! fsync, then renamed: switching is one atomic write); DATA/controller/slots/<a|b> hold the
//! controller payloads. A fresh data dir runs the built-in base version from slot `a`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use fulcrum_upgrade::Version;
use serde::{Deserialize, Serialize};

use crate::version;

/// The listening socket a restarted controller takes over (instead of binding again).
pub const LISTEN_FD_ENV: &str = "FULCRUM_LISTEN_FD";
/// The executable first started, outside the slots.
const LAUNCHER_ENV: &str = "FULCRUM_CONTROLLER_LAUNCHER";
const SLOT_EXECUTABLE: &str = "bin/fulcrum";

static LISTEN_FD: AtomicI32 = AtomicI32::new(-1);

/// Remembers the listening socket so a restart can hand it over.
pub fn remember_listener(fd: i32) {
    LISTEN_FD.store(fd, Ordering::Relaxed);
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub version: String,
    pub build: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl SlotInfo {
    pub fn base() -> SlotInfo {
        SlotInfo {
            version: version::VERSION.into(),
            build: version::BUILD,
            patch: None,
            tag: version::tag_of(version::VERSION, version::BUILD, None, version::BUILD_DATE),
            image: None,
        }
    }

    pub fn version(&self) -> Version {
        Version { version: self.version.clone(), build: self.build, patch: self.patch.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    active: String,
    #[serde(default)]
    previous: Option<String>,
    slots: BTreeMap<String, SlotInfo>,
}

pub struct ControllerSlots {
    dir: PathBuf,
    state: Mutex<State>,
    /// What this process runs: the active slot when it started (a switch takes effect with
    /// the restart that follows it).
    started: SlotInfo,
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    crate::images::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

impl ControllerSlots {
    pub fn open(data_dir: &Path) -> Result<ControllerSlots, String> {
        let dir = data_dir.join("controller");
        fs::create_dir_all(dir.join("slots")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("state.json");
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{} is damaged: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                State { active: "a".into(), previous: None, slots: BTreeMap::from([("a".into(), SlotInfo::base())]) }
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let started = state.slots.get(&state.active).cloned().unwrap_or_else(SlotInfo::base);
        Ok(ControllerSlots { dir, state: Mutex::new(state), started })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version this process runs.
    pub fn running(&self) -> SlotInfo {
        self.started.clone()
    }

    pub fn previous(&self) -> Option<SlotInfo> {
        let state = self.lock();
        state.previous.as_ref().and_then(|p| state.slots.get(p)).cloned()
    }

    pub fn slot_dir(&self, slot: &str) -> PathBuf {
        self.dir.join("slots").join(slot)
    }

    pub fn active_dir(&self) -> PathBuf {
        self.slot_dir(&self.lock().active)
    }

    /// The slot an install writes into.
    pub fn spare(&self) -> String {
        if self.lock().active == "a" { "b".into() } else { "a".into() }
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }

    fn save(&self, state: &State) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        write_durably(&self.dir.join("state.json"), &bytes)
            .map_err(|e| format!("cannot save the controller's slots: {e}"))
    }

    /// Records what the spare slot now holds (it is not active yet).
    pub fn filled(&self, slot: &str, info: SlotInfo) -> Result<(), String> {
        let mut state = self.lock();
        let mut next = state.clone();
        if next.previous.as_deref() == Some(slot) {
            next.previous = None;
        }
        next.slots.insert(slot.to_string(), info);
        self.save(&next)?;
        *state = next;
        Ok(())
    }

    /// Makes `slot` active and the current one the way back.
    pub fn activate(&self, slot: &str) -> Result<(), String> {
        let mut state = self.lock();
        if !state.slots.contains_key(slot) {
            return Err(format!("controller slot {slot} holds nothing"));
        }
        if state.active == slot {
            return Ok(());
        }
        let mut next = state.clone();
        next.previous = Some(std::mem::replace(&mut next.active, slot.to_string()));
        self.save(&next)?;
        *state = next;
        Ok(())
    }

    /// The slot holding a version, if any.
    pub fn slot_of(&self, v: &Version) -> Option<String> {
        self.lock().slots.iter().find(|(_, s)| s.version() == *v).map(|(k, _)| k.clone())
    }

    /// Replaces this process with the controller again, from the active slot's own executable
    /// when it carries one, handing over the listening socket. Returns only on failure.
    pub fn restart_process(&self) -> String {
        use std::os::unix::process::CommandExt;
        let fd = LISTEN_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: fcntl on a descriptor this process owns; clearing FD_CLOEXEC lets it
            // survive exec.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            }
        }
        let launcher = std::env::var_os(LAUNCHER_ENV)
            .map(PathBuf::from)
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("fulcrum"));
        let slot_exe = self.active_dir().join(SLOT_EXECUTABLE);
        let exe = if slot_exe.is_file() { slot_exe } else { launcher.clone() };
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        tracing::info!(exe = %exe.display(), "restarting the controller into its active slot");
        let error = std::process::Command::new(&exe)
            .args(args)
            .env(LAUNCHER_ENV, &launcher)
            .env(LISTEN_FD_ENV, fd.to_string())
            .exec();
        format!("cannot restart into {}: {error}", exe.display())
    }
}
