//! Filling an A/B slot from a verified package: what the controller and the SE agent both do
//! when they install a new version next to the running one.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::PackageError;
use crate::manifest::{CONTROLLER_ROOT, ComponentRole, Manifest, PackageKind, Payload, SE_ROOT};
use crate::unpack::unpack;
use crate::verify::Verified;

/// Which payload of a package a node installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Controller,
    Se,
}

impl Side {
    fn payload(self, m: &Manifest) -> Option<&Payload> {
        match self {
            Side::Controller => m.controller.as_ref(),
            Side::Se => m.se_image.as_ref(),
        }
    }

    fn root(self) -> &'static str {
        match self {
            Side::Controller => CONTROLLER_ROOT,
            Side::Se => SE_ROOT,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Controller => "controller",
            Side::Se => "SE image",
        }
    }
}

/// What a filled slot holds. Hooks are paths relative to the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: String,
    pub build: u64,
    pub patch_version: Option<String>,
    pub pre_install: Option<String>,
    pub post_install: Option<String>,
    pub health_check: Option<String>,
}

/// The packages whose payloads make up the slot, in the order they are laid down: a bundle's
/// base, then its patch for this side; any other package alone. (offset, length, manifest).
fn layers(verified: &Verified, side: Side) -> Vec<(u64, u64, &Manifest)> {
    if verified.manifest.kind != PackageKind::Bundle {
        return vec![(0, verified.size, &verified.manifest)];
    }
    let patch_role = match side {
        Side::Controller => ComponentRole::ControllerPatch,
        Side::Se => ComponentRole::SePatch,
    };
    [ComponentRole::Base, patch_role]
        .into_iter()
        .filter_map(|role| verified.component(role))
        .map(|c| (c.offset, c.size, &c.package.manifest))
        .collect()
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

/// Writes `side`'s payload of a verified package (read again from `file`) into `spare`, which
/// is emptied first. A patch applies over a copy of `active`, and only to the release it is
/// for; `running` is (version, build, patch) of `active`.
pub fn fill_slot<F: Read + Seek>(
    file: &mut F,
    verified: &Verified,
    side: Side,
    running: (&str, u64, Option<&str>),
    active: &Path,
    spare: &Path,
) -> Result<Installed, PackageError> {
    let layers = layers(verified, side);
    let first =
        layers.first().map(|l| l.2).ok_or_else(|| PackageError::NotApplicable("the bundle has no base".into()))?;
    if side.payload(first).is_none() {
        return Err(PackageError::NotApplicable(format!("{} carries no {}", first.tag, side.name())));
    }
    let patch_only = first.is_patch();
    if patch_only && first.version != running.0 {
        return Err(PackageError::NotApplicable(format!(
            "the patch is for version {}, this node runs {}",
            first.version, running.0
        )));
    }
    if spare.exists() {
        fs::remove_dir_all(spare)?;
    }
    if patch_only && active.exists() {
        copy_tree(active, spare)?;
    }
    fs::create_dir_all(spare)?;
    let mut installed = Installed {
        version: running.0.into(),
        build: running.1,
        patch_version: running.2.map(String::from),
        pre_install: None,
        post_install: None,
        health_check: None,
    };
    for (offset, length, manifest) in layers {
        let Some(payload) = side.payload(manifest) else { continue };
        file.seek(SeekFrom::Start(offset))?;
        unpack(&mut (&mut *file).take(length), manifest, side.root(), spare)?;
        let relative =
            |hook: &Option<String>| hook.as_ref().and_then(|h| h.strip_prefix(&payload.root)).map(String::from);
        if manifest.is_patch() {
            installed.patch_version = manifest.patch_version.clone();
        } else {
            installed.version = manifest.version.clone();
            installed.build = manifest.build;
            installed.patch_version = None;
        }
        // The last layer's hooks are the slot's; a patch without them keeps the base's.
        installed.pre_install = relative(&payload.pre_install).or(installed.pre_install.take());
        installed.post_install = relative(&payload.post_install).or(installed.post_install.take());
        installed.health_check = relative(&payload.health_check).or(installed.health_check.take());
    }
    Ok(installed)
}
