//! Making packages: from directories of files (controller, SE image), or from packages (a
//! bundle); and signing a package that was built unsigned.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::PackageError;
use crate::manifest::{
    CONTROLLER_ROOT, Component, ComponentRole, FORMAT_VERSION, FileEntry, MANIFEST_PATH, Manifest, PackageKind,
    Payload, Requirements, SE_ROOT, SIGNATURE_PATH, tag_of,
};
use crate::sha256::sha256_of_file;
use crate::signing::SecretKey;
use crate::verify::read_head;

/// Hooks are found by name inside a payload directory.
pub const PRE_INSTALL_HOOK: &str = "hooks/pre-install";
pub const POST_INSTALL_HOOK: &str = "hooks/post-install";
pub const HEALTH_CHECK_HOOK: &str = "hooks/health-check";

/// What to put in a package.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub product: String,
    pub kind: PackageKind,
    pub version: String,
    pub build: u64,
    pub build_date: String,
    pub patch_version: Option<String>,
    pub min_version: String,
    pub requirements: Requirements,
    /// The files the controller installs (`controller/` in the archive).
    pub controller_dir: Option<PathBuf>,
    /// The SE image: what the SE agent installs (`se/`).
    pub se_dir: Option<PathBuf>,
    /// For a bundle: the packages it carries. Version, build and date come from the base.
    pub components: Vec<(ComponentRole, PathBuf)>,
}

/// A file to archive: where it comes from and what the manifest says about it.
struct Source {
    from: PathBuf,
    entry: FileEntry,
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> PackageError + '_ {
    move |e| PackageError::Io(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 }
}

#[cfg(not(unix))]
fn mode_of(_: &std::fs::Metadata) -> u32 {
    0o644
}

/// Every regular file under `dir`, sorted by path, as `root` + relative path. Links are refused:
/// a package carries files, never pointers out of itself.
fn collect(dir: &Path, root: &str, out: &mut Vec<Source>) -> Result<(), PackageError> {
    let mut stack = vec![dir.to_path_buf()];
    let mut found = Vec::new();
    while let Some(current) = stack.pop() {
        for item in std::fs::read_dir(&current).map_err(io_at(&current))? {
            let item = item.map_err(io_at(&current))?;
            let path = item.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_at(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                found.push((path, mode_of(&meta)));
            } else {
                return Err(PackageError::UnsafePath(format!("{} is not a regular file", path.display())));
            }
        }
    }
    found.sort();
    for (path, mode) in found {
        let relative = path.strip_prefix(dir).expect("walked from dir");
        let relative = relative
            .to_str()
            .ok_or_else(|| PackageError::UnsafePath(format!("{} is not a UTF-8 path", path.display())))?;
        let (sha256, size) = sha256_of_file(&path).map_err(io_at(&path))?;
        // Hooks are run as programs: a hook file is executable whatever its mode on disk.
        let is_hook = [PRE_INSTALL_HOOK, POST_INSTALL_HOOK, HEALTH_CHECK_HOOK].contains(&relative);
        let mode = if is_hook { mode | 0o555 } else { mode };
        out.push(Source {
            from: path.clone(),
            entry: FileEntry { path: format!("{root}{relative}"), sha256, size, mode },
        });
    }
    Ok(())
}

fn payload(dir: &Option<PathBuf>, root: &str, sources: &mut Vec<Source>) -> Result<Option<Payload>, PackageError> {
    let Some(dir) = dir else { return Ok(None) };
    collect(dir, root, sources)?;
    let hook = |name: &str| {
        let path = format!("{root}{name}");
        sources.iter().any(|s| s.entry.path == path).then_some(path)
    };
    Ok(Some(Payload {
        root: root.into(),
        pre_install: hook(PRE_INSTALL_HOOK),
        post_install: hook(POST_INSTALL_HOOK),
        health_check: hook(HEALTH_CHECK_HOOK),
    }))
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    // Reproducible: the same inputs make the same bytes.
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append(
    builder: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    data: impl Read,
    size: u64,
    mode: u32,
) -> io::Result<()> {
    builder.append_data(&mut file_header(size, mode), path, data)
}

/// Builds a package; signs it when a key is given (else `pkg sign` can do it later).
pub fn build(spec: &BuildSpec, key: Option<&SecretKey>, out: &mut dyn Write) -> Result<Manifest, PackageError> {
    let mut sources = Vec::new();
    let controller = payload(&spec.controller_dir, CONTROLLER_ROOT, &mut sources)?;
    let se_image = payload(&spec.se_dir, SE_ROOT, &mut sources)?;
    let mut components = Vec::new();
    let (mut version, mut build, mut build_date) = (spec.version.clone(), spec.build, spec.build_date.clone());
    let mut min_version = spec.min_version.clone();
    for (role, path) in &spec.components {
        let name = format!("{}.pkg", role.as_str());
        let (sha256, size) = sha256_of_file(path).map_err(io_at(path))?;
        if *role == ComponentRole::Base {
            let base = read_head(&mut File::open(path).map_err(io_at(path))?)?.manifest;
            if min_version.is_empty() {
                min_version = base.min_version;
            }
            (version, build, build_date) = (base.version, base.build, base.build_date);
        }
        sources.push(Source { from: path.clone(), entry: FileEntry { path: name.clone(), sha256, size, mode: 0o644 } });
        components.push(Component { role: *role, path: name });
    }
    let manifest = Manifest {
        format: FORMAT_VERSION,
        product: spec.product.clone(),
        kind: spec.kind,
        tag: tag_of(&version, build, spec.patch_version.as_deref(), &build_date),
        version,
        build,
        build_date,
        patch_version: spec.patch_version.clone(),
        min_version,
        requirements: spec.requirements.clone(),
        controller,
        se_image,
        files: sources.iter().map(|s| s.entry.clone()).collect(),
        components,
    };
    manifest.check()?;
    let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    let mut builder = tar::Builder::new(out);
    append(&mut builder, MANIFEST_PATH, &manifest_bytes[..], manifest_bytes.len() as u64, 0o644)?;
    if let Some(key) = key {
        let sig = serde_json::to_vec_pretty(&key.sign(&manifest_bytes)).expect("a signature serializes");
        append(&mut builder, SIGNATURE_PATH, &sig[..], sig.len() as u64, 0o644)?;
    }
    for source in &sources {
        let file = File::open(&source.from).map_err(io_at(&source.from))?;
        append(
            &mut builder,
            &source.entry.path,
            BufReader::with_capacity(1 << 20, file),
            source.entry.size,
            source.entry.mode,
        )?;
    }
    builder.finish()?;
    Ok(manifest)
}

/// Copies a package, replacing its signature with one by `key`. Entries are copied verbatim
/// (whatever they are: checking is `verify`'s job).
pub fn sign(input: &mut dyn Read, key: &SecretKey, out: &mut dyn Write) -> Result<(), PackageError> {
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(out);
    for (index, entry) in archive.entries()?.enumerate() {
        let mut entry = entry?;
        let path = entry.path_bytes().into_owned();
        if index == 0 {
            if path != MANIFEST_PATH.as_bytes() {
                return Err(PackageError::NotAPackage(format!(
                    "the first entry must be {MANIFEST_PATH}, found '{}'",
                    String::from_utf8_lossy(&path)
                )));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| PackageError::Manifest(format!("{MANIFEST_PATH}: {e}")))?;
            append(&mut builder, MANIFEST_PATH, &bytes[..], bytes.len() as u64, 0o644)?;
            let sig = serde_json::to_vec_pretty(&key.sign(&bytes)).expect("a signature serializes");
            append(&mut builder, SIGNATURE_PATH, &sig[..], sig.len() as u64, 0o644)?;
        } else if index == 1 && path == SIGNATURE_PATH.as_bytes() {
            continue;
        } else if entry.header().path_bytes().as_ref() == path.as_slice() {
            let header = entry.header().clone();
            builder.append(&header, &mut entry)?;
        } else {
            // A long name lives in an extra entry the builder writes again.
            let mut header = entry.header().clone();
            let name =
                String::from_utf8(path).map_err(|_| PackageError::UnsafePath("an entry's path is not UTF-8".into()))?;
            builder.append_data(&mut header, name, &mut entry)?;
        }
    }
    builder.finish()?;
    Ok(())
}
