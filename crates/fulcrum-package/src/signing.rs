//! ed25519 keys and signatures over the manifest's exact bytes.
//!
//! Key files are text so they can be pasted and diffed: a public key is
//! `ed25519 <64 hex digits> [comment]`, a secret key is `ed25519-secret <hex of a PKCS#8 document>`.

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{PackageError, hex, unhex};

const PUBLIC_PREFIX: &str = "ed25519";
const SECRET_PREFIX: &str = "ed25519-secret";

/// What `manifest.sig` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub algorithm: String,
    /// Names the key that signed (see [`PublicKey::id`]), so a controller with several trusted
    /// keys knows which one to try and can say which one was missing.
    pub key_id: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, PackageError> {
        let bad =
            || PackageError::Key(format!("not an ed25519 public key (expected '{PUBLIC_PREFIX} <64 hex digits>')"));
        let mut words = text.split_whitespace();
        if words.next() != Some(PUBLIC_PREFIX) {
            return Err(bad());
        }
        let bytes = words.next().and_then(unhex).ok_or_else(bad)?;
        Ok(PublicKey(bytes.try_into().map_err(|_| bad())?))
    }

    /// The first 16 hex digits of the key's sha256.
    pub fn id(&self) -> String {
        hex(&Sha256::digest(self.0))[..16].to_string()
    }

    pub fn to_text(&self, comment: &str) -> String {
        format!("{PUBLIC_PREFIX} {} {comment}\n", hex(&self.0)).replace(" \n", "\n")
    }

    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(message, signature).is_ok()
    }
}

pub struct SecretKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SecretKey {
    pub fn generate() -> SecretKey {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("the system random source works");
        SecretKey::from_pkcs8(doc.as_ref()).expect("a freshly generated key parses")
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<SecretKey, PackageError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| PackageError::Key(format!("not an ed25519 secret key: {e}")))?;
        Ok(SecretKey { pair, pkcs8: pkcs8.to_vec() })
    }

    pub fn parse(text: &str) -> Result<SecretKey, PackageError> {
        let mut words = text.split_whitespace();
        let bad = || PackageError::Key(format!("not an ed25519 secret key (expected '{SECRET_PREFIX} <hex>')"));
        if words.next() != Some(SECRET_PREFIX) {
            return Err(bad());
        }
        SecretKey::from_pkcs8(&words.next().and_then(unhex).ok_or_else(bad)?)
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX} {}\n", hex(&self.pkcs8))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.pair.public_key().as_ref().try_into().expect("ed25519 public keys are 32 bytes"))
    }

    pub fn sign(&self, manifest: &[u8]) -> SignatureFile {
        SignatureFile {
            algorithm: PUBLIC_PREFIX.into(),
            key_id: self.public().id(),
            signature: hex(self.pair.sign(manifest).as_ref()),
        }
    }
}

/// The keys a controller accepts packages from.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys(keys)
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Checks `manifest.sig` against the manifest; returns the signing key's id.
    pub fn verify(&self, manifest: &[u8], signature_file: &[u8]) -> Result<String, PackageError> {
        let bad = |msg: String| PackageError::Signature(msg);
        let sig: SignatureFile = serde_json::from_slice(signature_file)
            .map_err(|e| bad(format!("manifest.sig is not a signature file: {e}")))?;
        if sig.algorithm != PUBLIC_PREFIX {
            return Err(bad(format!("algorithm '{}' is not supported (expected ed25519)", sig.algorithm)));
        }
        let bytes = unhex(&sig.signature).ok_or_else(|| bad("the signature is not hex".into()))?;
        if self.0.is_empty() {
            return Err(bad("no trusted signing keys are configured on this controller".into()));
        }
        let key =
            self.0.iter().find(|k| k.id() == sig.key_id).ok_or_else(|| {
                bad(format!("the package is signed by key {}, which is not trusted here", sig.key_id))
            })?;
        if key.verify(manifest, &bytes) {
            Ok(sig.key_id)
        } else {
            Err(bad(format!("the signature by key {} does not match the manifest", sig.key_id)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_text_and_signatures_verify() {
        let secret = SecretKey::generate();
        let again = SecretKey::parse(&secret.to_text()).unwrap();
        let public = PublicKey::parse(&again.public().to_text("release key")).unwrap();
        assert_eq!(public, secret.public());
        let sig = serde_json::to_vec(&secret.sign(b"manifest")).unwrap();
        let trusted = TrustedKeys::new(vec![public]);
        assert_eq!(trusted.verify(b"manifest", &sig).unwrap(), secret.public().id());
        let err = trusted.verify(b"manifest!", &sig).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        let other = TrustedKeys::new(vec![SecretKey::generate().public()]);
        assert!(other.verify(b"manifest", &sig).unwrap_err().to_string().contains("not trusted"));
        assert!(TrustedKeys::default().verify(b"manifest", &sig).unwrap_err().to_string().contains("no trusted"));
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(PublicKey::parse("ssh-rsa AAAA").is_err());
        assert!(PublicKey::parse("ed25519 abcd").is_err());
        assert!(SecretKey::parse("ed25519-secret 00").is_err());
    }
}
