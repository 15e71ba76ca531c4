//! The Fulcrum software package: a tar archive whose first entry is a manifest, whose second is
//! an ed25519 signature over the manifest's bytes, and whose other entries are the files the
//! manifest lists with their sha256. See docs/package-format.md.
//!
//! This crate reads and writes through `Read`/`Write` only (building also reads the input
//! directories), so the controller can verify an upload while it streams and tests need no
//! server.

mod build;
mod manifest;
mod signing;
mod verify;

#[cfg(test)]
mod tests;

pub use build::{BuildSpec, POST_INSTALL_HOOK, PRE_INSTALL_HOOK, build, sign};
pub use manifest::{
    CONTROLLER_ROOT, Component, ComponentRole, FileEntry, MANIFEST_PATH, Manifest, PackageKind, Payload, Requirements,
    SE_ROOT, SIGNATURE_PATH, check_entry_path, compare_versions, is_sha256_hex, parse_patch_version, parse_version,
    tag_of,
};
pub use signing::{PublicKey, SecretKey, SignatureFile, TrustedKeys};
pub use verify::{HashingReader, Verified, VerifiedComponent, read_head, verify};

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
