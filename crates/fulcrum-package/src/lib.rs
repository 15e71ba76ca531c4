//! The Fulcrum software package: a tar archive whose first entry is a manifest, whose second is
//! an ed25519 signature over the manifest's bytes, and whose other entries are the files the
//! manifest lists with their sha256. See docs/package-format.md.
//!
//! This crate reads and writes through `Read`/`Write` only (building also reads the input
//! directories), so the controller can verify an upload while it streams and tests need no
//! server.

mod build;
mod install;
mod manifest;
mod sha256;
mod signing;
mod unpack;
mod verify;

#[cfg(test)]
mod tests;

pub use build::{BuildSpec, HEALTH_CHECK_HOOK, POST_INSTALL_HOOK, PRE_INSTALL_HOOK, build, sign};
pub use install::{Installed, Side, fill_slot};
pub use manifest::{
    CONTROLLER_ROOT, Component, ComponentRole, FileEntry, MANIFEST_PATH, Manifest, PackageKind, Payload, Requirements,
    SE_ROOT, SIGNATURE_PATH, check_entry_path, compare_versions, is_sha256_hex, parse_patch_version, parse_version,
    tag_of,
};
pub use sha256::sha256_of_file;
pub use signing::{PublicKey, SecretKey, SignatureFile, TrustedKeys};
pub use unpack::unpack;
pub use verify::{Head, Verified, VerifiedComponent, read_head, verify};

/// Everything that can be wrong with a package. Each variant's message says what, for the
/// person who uploaded it.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{0}")]
    NotAPackage(String),
    #[error("truncated package: {0}")]
    Truncated(String),
    #[error("hash mismatch: {0}")]
    HashMismatch(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("unsafe archive entry: {0}")]
    UnsafePath(String),
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("key: {0}")]
    Key(String),
    /// A good package that does not fit where it is being installed.
    #[error("{0}")]
    NotApplicable(String),
    /// Reading or writing failed for a reason that is not the package's fault.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PackageError {
    /// Whether the package is at fault (as opposed to the disk or the connection).
    pub fn is_bad_package(&self) -> bool {
        !matches!(self, PackageError::Io(_))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes().chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// Year, month, day, hour, minute, second (UTC) of a Unix time.
pub fn civil_utc(unix_secs: i64) -> [i64; 6] {
    let (days, rem) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    [year, month, day, rem / 3600, rem % 3600 / 60, rem % 60]
}

/// A build date in the tag's form, `20261122.101500`.
pub fn build_date(unix_secs: i64) -> String {
    let [y, mo, d, h, mi, s] = civil_utc(unix_secs);
    format!("{y:04}{mo:02}{d:02}.{h:02}{mi:02}{s:02}")
}
