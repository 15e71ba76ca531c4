//! Who is calling: passwords, sessions with CSRF tokens, HTTP Basic auth, and throttling of
//! failed logins. The pieces here take the time as an argument so tests can drive it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// Failed attempts allowed per (client address, user) within [`THROTTLE_WINDOW`].
pub const MAX_FAILED_LOGINS: u32 = 5;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

pub fn hash_password(password: &str) -> String {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).expect("16 bytes fit a salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing cannot fail on valid params")
        .to_string()
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// A random alphanumeric string (session ids, CSRF tokens, generated passwords).
pub fn random_token(len: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

#[derive(Debug, Clone)]
pub struct Session {
    pub user_uuid: String,
    pub csrf_token: String,
    last_used: Instant,
}

/// Logged-in sessions, in memory: a restart logs everybody out and clients log in again (the SDK
/// does so on the 401 it then gets).
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session; returns (session id, CSRF token).
    pub fn create(&self, user_uuid: &str, now: Instant) -> (String, String) {
        let id = random_token(32);
        let csrf_token = random_token(32);
        let session = Session { user_uuid: user_uuid.into(), csrf_token: csrf_token.clone(), last_used: now };
        self.lock().insert(id.clone(), session);
        (id, csrf_token)
    }

    /// The live session with this id, its idle clock restarted; an idle one is ended.
    pub fn touch(&self, id: &str, idle_timeout: Option<Duration>, now: Instant) -> Option<Session> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(id)?;
        if idle_timeout.is_some_and(|limit| now.saturating_duration_since(session.last_used) > limit) {
            sessions.remove(id);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Drops idle sessions (called periodically so memory does not grow with abandoned ones).
    pub fn sweep(&self, idle_timeout: Duration, now: Instant) {
        self.lock().retain(|_, s| now.saturating_duration_since(s.last_used) <= idle_timeout);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts failed logins per (client address, user name) to answer 429 to guessing.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<(String, String), (u32, Instant)>>,
}

impl Throttle {
    pub fn is_blocked(&self, client: &str, user: &str, now: Instant) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.is_empty() {
            return false;
        }
        failures.get(&(client.to_string(), user.to_string())).is_some_and(|(count, since)| {
            *count >= MAX_FAILED_LOGINS && now.saturating_duration_since(*since) < THROTTLE_WINDOW
        })
    }

    pub fn record_failure(&self, client: &str, user: &str, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = failures.entry((client.to_string(), user.to_string())).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= THROTTLE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn record_success(&self, client: &str, user: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // The common case (nobody failing) costs no allocation.
        if !failures.is_empty() {
            failures.remove(&(client.to_string(), user.to_string()));
        }
    }
}

/// Basic auth sends the password on every request; checking argon2 each time would cost tens of
/// milliseconds. A verified (user, password) pair is remembered by its SHA-256 together with the
/// stored hash it matched, so a password change invalidates it.
#[derive(Debug, Default)]
pub struct BasicAuthCache {
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl BasicAuthCache {
    fn key(user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    pub fn is_verified(&self, user: &str, password: &str, stored_hash: &str) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&Self::key(user, password))
            .is_some_and(|h| h == stored_hash)
    }

    pub fn remember(&self, user: &str, password: &str, stored_hash: &str) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() > 10_000 {
            verified.clear();
        }
        verified.insert(Self::key(user, password), stored_hash.to_string());
    }
}

/// The value of the last cookie named `name` (clients may send duplicates; the last one is the
/// one the SDK also put in its CSRF header).
pub fn cookie<'a>(cookie_headers: impl Iterator<Item = &'a str>, name: &str) -> Option<String> {
    let mut found = None;
    for header in cookie_headers {
        for pair in header.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k.trim() == name
            {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("s3cret!");
        assert!(h.starts_with("$argon2"));
        assert!(verify_password("s3cret!", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("s3cret!", "not a hash"));
    }

    #[test]
    fn sessions_expire_when_idle() {
        let sessions = Sessions::default();
        let t0 = Instant::now();
        let (id, csrf) = sessions.create("user-1", t0);
        let limit = Some(Duration::from_secs(60));
        let s = sessions.touch(&id, limit, t0 + Duration::from_secs(59)).unwrap();
        assert_eq!(s.csrf_token, csrf);
        // Touching restarted the idle clock.
        assert!(sessions.touch(&id, limit, t0 + Duration::from_secs(118)).is_some());
        assert!(sessions.touch(&id, limit, t0 + Duration::from_secs(200)).is_none());
        assert!(sessions.touch(&id, None, t0).is_none(), "an expired session is gone");
    }

    #[test]
    fn throttle_blocks_after_repeated_failures_then_forgives() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for _ in 0..MAX_FAILED_LOGINS {
            assert!(!t.is_blocked("1.2.3.4", "admin", t0));
            t.record_failure("1.2.3.4", "admin", t0);
        }
        assert!(t.is_blocked("1.2.3.4", "admin", t0));
        assert!(!t.is_blocked("5.6.7.8", "admin", t0), "other clients are not blocked");
        assert!(!t.is_blocked("1.2.3.4", "admin", t0 + THROTTLE_WINDOW));
    }

    #[test]
    fn last_cookie_wins() {
        let headers = ["avi-sessionid=A; csrftoken=OLD; sessionid=A", "csrftoken=NEW; sessionid=B"];
        assert_eq!(cookie(headers.into_iter(), "csrftoken").as_deref(), Some("NEW"));
        assert_eq!(cookie(headers.into_iter(), "sessionid").as_deref(), Some("B"));
        assert_eq!(cookie(headers.into_iter(), "missing"), None);
    }

    #[test]
    fn basic_cache_is_invalidated_by_a_new_hash() {
        let c = BasicAuthCache::default();
        c.remember("admin", "pw", "hash1");
        assert!(c.is_verified("admin", "pw", "hash1"));
        assert!(!c.is_verified("admin", "pw", "hash2"));
        assert!(!c.is_verified("admin", "other", "hash1"));
    }
}
