//! Streaming verification: one pass over the archive, nothing held in memory but the manifest.
//!
//! The order of the archive makes this possible: `manifest.json`, then `manifest.sig`, then the
//! files. The signature is checked before any file is read, and each file is hashed as it
//! streams past and compared with the manifest's hash.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, Read};
use std::rc::Rc;

use tar::EntryType;

use crate::PackageError;
use crate::manifest::{
    ComponentRole, MANIFEST_PATH, MAX_MANIFEST_BYTES, Manifest, PackageKind, SIGNATURE_PATH, check_entry_path,
};
use crate::sha256::{Sha256, update_pair};
use crate::signing::TrustedKeys;

const BLOCK: u64 = 512;

/// A package whose signature, manifest and every file have been checked.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    /// The id of the key that signed the manifest.
    pub key_id: String,
    /// For a bundle: its packages, each verified in turn.
    pub components: Vec<VerifiedComponent>,
    /// Bytes of the archive, end-of-archive marker included.
    pub size: u64,
    /// The sha256 of the archive (hex).
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct VerifiedComponent {
    pub role: ComponentRole,
    pub package: Verified,
    /// Where the component's bytes start inside the bundle, and how many there are.
    pub offset: u64,
    pub size: u64,
}

impl Verified {
    pub fn component(&self, role: ComponentRole) -> Option<&VerifiedComponent> {
        self.components.iter().find(|c| c.role == role)
    }
}

/// What the tar reader has pulled from the stream: a count and the archive's sha256. While a
/// file's data passes (`in_file`), the verify loop hashes it into the archive's digest and the
/// file's at once, so the reader leaves it alone. The tar reader reads an entry's data straight
/// into the caller's buffer, so the loop sees exactly those bytes.
#[derive(Default)]
struct Seen {
    count: u64,
    archive: Sha256,
    in_file: bool,
}

struct SeenReader<'a> {
    inner: &'a mut dyn Read,
    seen: Rc<RefCell<Seen>>,
}

impl Read for SeenReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let seen = &mut *self.seen.borrow_mut();
        seen.count += n as u64;
        if !seen.in_file {
            seen.archive.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Reads a file's data to its end, hashing it into the archive's digest and its own.
/// Returns how many bytes there were and the file's sha256.
fn hash_entry(entry: &mut dyn Read, seen: &RefCell<Seen>, buf: &mut [u8]) -> io::Result<(u64, String)> {
    let mut file = Sha256::new();
    let mut count = 0u64;
    seen.borrow_mut().in_file = true;
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        update_pair(&mut seen.borrow_mut().archive, &mut file, &buf[..n]);
        count += n as u64;
    }
    seen.borrow_mut().in_file = false;
    Ok((count, file.finalize_hex()))
}

/// Reads to the end; returns how many bytes there were and whether all were zero.
fn drain(reader: &mut dyn Read) -> io::Result<(u64, bool)> {
    let mut buf = vec![0u8; 256 << 10];
    let (mut total, mut zeros) = (0u64, true);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok((total, zeros)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        zeros &= buf[..n].iter().all(|b| *b == 0);
        total += n as u64;
    }
}

/// The tar reader reports a malformed archive as an `Other` error wrapping its own; the reader
/// underneath (a socket, a file) reports anything else.
fn read_error(e: io::Error, what: &str) -> PackageError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => PackageError::Truncated(format!("the archive ends inside {what}")),
        // The tar reader's word for a header cut short by the end of the stream.
        io::ErrorKind::Other if e.to_string().contains("failed to read entire block") => {
            PackageError::Truncated(format!("the archive ends inside an entry header ({what})"))
        }
        io::ErrorKind::Other if e.get_ref().is_some() => PackageError::NotAPackage(format!("{what}: {e}")),
        _ => PackageError::Io(e),
    }
}

/// Verifies a package read from `reader`. `on_manifest` is called once the manifest and its
/// signature are known good, before the files stream past (an upload names its image then).
pub fn verify(
    reader: &mut dyn Read,
    keys: &TrustedKeys,
    on_manifest: &mut dyn FnMut(&Manifest),
) -> Result<Verified, PackageError> {
    verify_at_depth(reader, keys, on_manifest, 0)
}

/// The first two entries of a package, unchecked.
#[derive(Debug, Clone)]
pub struct Head {
    pub manifest: Manifest,
    /// The exact bytes the signature covers.
    pub manifest_bytes: Vec<u8>,
    /// `manifest.sig`, or `None` when something else follows the manifest.
    pub signature: Option<Vec<u8>>,
}

/// Reads `manifest.json` and its signature file from the start of an archive, without checking
/// the signature or the files (for `pkg inspect`, and to name a resumable upload early). An
/// archive that ends before a second entry is `Truncated`.
pub fn read_head(reader: &mut dyn Read) -> Result<Head, PackageError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(|e| read_error(e, "the archive"))?;
    let manifest_bytes = read_manifest_entry(&mut entries)?;
    let manifest = parse_manifest(&manifest_bytes)?;
    let signature = match entries.next() {
        Some(Ok(mut entry)) if entry_path(&entry)? == SIGNATURE_PATH => Some(read_small(&mut entry, SIGNATURE_PATH)?),
        Some(Ok(_)) => None,
        Some(Err(e)) => return Err(read_error(e, "the archive")),
        None => return Err(PackageError::Truncated("the archive ends after the manifest".into())),
    };
    Ok(Head { manifest, manifest_bytes, signature })
}

fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, PackageError> {
    String::from_utf8(entry.path_bytes().into_owned())
        .map_err(|_| PackageError::UnsafePath("an entry's path is not UTF-8".into()))
}

fn read_small<R: Read>(entry: &mut tar::Entry<'_, R>, what: &str) -> Result<Vec<u8>, PackageError> {
    if entry.size() > MAX_MANIFEST_BYTES {
        return Err(PackageError::NotAPackage(format!("{what} is larger than {MAX_MANIFEST_BYTES} bytes")));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes).map_err(|e| read_error(e, what))?;
    if (bytes.len() as u64) < entry.size() {
        return Err(PackageError::Truncated(format!("the archive ends inside {what}")));
    }
    Ok(bytes)
}

fn read_manifest_entry<R: Read>(entries: &mut tar::Entries<'_, R>) -> Result<Vec<u8>, PackageError> {
    let not_package = |why: String| PackageError::NotAPackage(format!("not a Fulcrum package: {why}"));
    let mut entry = match entries.next() {
        None => return Err(not_package("the archive is empty".into())),
        // The tar reader's message quotes the bytes it choked on; they mean nothing to the user.
        Some(Err(_)) => return Err(not_package("it is not a tar archive starting with manifest.json".into())),
        Some(Ok(entry)) => entry,
    };
    let path = entry_path(&entry)?;
    if path != MANIFEST_PATH || entry.header().entry_type() != EntryType::Regular {
        return Err(not_package(format!("the first entry must be {MANIFEST_PATH}, found '{path}'")));
    }
    read_small(&mut entry, MANIFEST_PATH)
}

fn parse_manifest(bytes: &[u8]) -> Result<Manifest, PackageError> {
    serde_json::from_slice(bytes).map_err(|e| PackageError::Manifest(format!("{MANIFEST_PATH}: {e}")))
}

fn verify_at_depth(
    reader: &mut dyn Read,
    keys: &TrustedKeys,
    on_manifest: &mut dyn FnMut(&Manifest),
    depth: u8,
) -> Result<Verified, PackageError> {
    let stream = Rc::new(RefCell::new(Seen::default()));
    let mut archive = tar::Archive::new(SeenReader { inner: reader, seen: stream.clone() });
    let mut entries = archive.entries().map_err(|e| read_error(e, "the archive"))?;
    let manifest_bytes = read_manifest_entry(&mut entries)?;
    let signature = match entries.next() {
        Some(Ok(mut entry)) if entry_path(&entry)? == SIGNATURE_PATH => read_small(&mut entry, SIGNATURE_PATH)?,
        Some(Err(e)) => return Err(read_error(e, "the archive")),
        _ => {
            return Err(PackageError::Signature(format!(
                "the package is not signed ({SIGNATURE_PATH} must follow {MANIFEST_PATH})"
            )));
        }
    };
    // Nothing in an unsigned manifest is trusted, not even its kind.
    let key_id = keys.verify(&manifest_bytes, &signature)?;
    let manifest = parse_manifest(&manifest_bytes)?;
    manifest.check()?;
    if depth > 0 && manifest.kind == PackageKind::Bundle {
        return Err(PackageError::Manifest("a bundle cannot contain a bundle".into()));
    }
    on_manifest(&manifest);

    let mut seen = HashSet::new();
    let mut components = Vec::new();
    let mut data_end = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(e, "the archive"))?;
        let path = entry_path(&entry)?;
        check_entry_path(&path)?;
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous => {}
            EntryType::Directory => continue,
            EntryType::Symlink | EntryType::Link => {
                return Err(PackageError::UnsafePath(format!("'{path}' is a link; packages carry regular files only")));
            }
            other => {
                return Err(PackageError::UnsafePath(format!(
                    "'{path}' is a {other:?} entry; packages carry regular files only"
                )));
            }
        }
        let listed = manifest
            .file(&path)
            .ok_or_else(|| PackageError::Manifest(format!("'{path}' is in the archive but not in the manifest")))?;
        if !seen.insert(path.clone()) {
            return Err(PackageError::Manifest(format!("'{path}' appears twice in the archive")));
        }
        if entry.size() != listed.size {
            return Err(PackageError::HashMismatch(format!(
                "'{path}' is {} bytes, the manifest says {}",
                entry.size(),
                listed.size
            )));
        }
        let offset = entry.raw_file_position();
        data_end = offset + entry.size().div_ceil(BLOCK) * BLOCK;
        let (count, sha256, nested) = match manifest.components.iter().find(|c| c.path == path) {
            // A component is a package: verifying it reads it to its end and hashes it.
            Some(component) => {
                let package = verify_at_depth(&mut entry, keys, &mut |_| {}, depth + 1)?;
                (package.size, package.sha256.clone(), Some((component.role, package)))
            }
            None => hash_entry(&mut entry, &stream, &mut buf)
                .map(|(n, h)| (n, h, None))
                .map_err(|e| read_error(e, &format!("'{path}'")))?,
        };
        if count < listed.size {
            return Err(PackageError::Truncated(format!(
                "the archive ends inside '{path}' ({count} of {} bytes)",
                listed.size
            )));
        }
        if sha256 != listed.sha256 {
            return Err(PackageError::HashMismatch(format!(
                "the sha256 of '{path}' is {sha256}, the manifest says {}",
                listed.sha256
            )));
        }
        if let Some((role, package)) = nested {
            manifest.check_component(role, &package.manifest)?;
            components.push(VerifiedComponent { role, package, offset, size: listed.size });
        }
    }
    if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(PackageError::Truncated(format!(
            "'{}' is in the manifest but not in the archive (the package may be truncated)",
            missing.path
        )));
    }
    let mut counted = archive.into_inner();
    let (rest, zeros) = drain(&mut counted).map_err(PackageError::Io)?;
    drop(counted);
    let Seen { count: size, archive: digest, .. } = Rc::into_inner(stream).expect("the reader is gone").into_inner();
    if !zeros {
        return Err(PackageError::NotAPackage(format!("{rest} bytes of data follow the end of the archive")));
    }
    if size < data_end + 2 * BLOCK || !size.is_multiple_of(BLOCK) {
        return Err(PackageError::Truncated("the archive ends without its end-of-archive marker".into()));
    }
    Ok(Verified { manifest, key_id, components, size, sha256: digest.finalize_hex() })
}
