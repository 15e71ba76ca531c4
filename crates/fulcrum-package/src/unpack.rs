//! Writing a payload's files out of a package that was verified before: each file is hashed
//! again as it is written, so a file changed between the check and the unpacking is caught.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::manifest::{MANIFEST_PATH, Manifest, SIGNATURE_PATH, check_entry_path};
use crate::{PackageError, hex};

/// Writes the files of `manifest` under `root` (`se/`) into `dest`, without the root prefix.
/// Returns how many files were written. Existing files are replaced (a patch over a copy of
/// the running slot).
pub fn unpack(reader: &mut dyn Read, manifest: &Manifest, root: &str, dest: &Path) -> Result<usize, PackageError> {
    let mut archive = tar::Archive::new(reader);
    let mut written = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| PackageError::UnsafePath("an entry's path is not UTF-8".into()))?;
        if path == MANIFEST_PATH || path == SIGNATURE_PATH || entry.header().entry_type().is_dir() {
            continue;
        }
        check_entry_path(&path)?;
        let Some(relative) = path.strip_prefix(root) else { continue };
        let listed = manifest
            .file(&path)
            .ok_or_else(|| PackageError::Manifest(format!("'{path}' is in the archive but not in the manifest")))?;
        if !entry.header().entry_type().is_file() {
            return Err(PackageError::UnsafePath(format!("'{path}' is not a regular file")));
        }
        let target = dest.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&target);
        let mut out = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&target)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        let got = hex(&hasher.finalize());
        if got != listed.sha256 {
            return Err(PackageError::HashMismatch(format!("'{path}' changed since it was verified")));
        }
        out.sync_all()?;
        fs::set_permissions(&target, fs::Permissions::from_mode(listed.mode & 0o7777))?;
        written += 1;
    }
    Ok(written)
}
