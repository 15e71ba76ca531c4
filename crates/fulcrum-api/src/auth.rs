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

/// The kind sessions are stored as: a session begun on one node is valid on every node and
/// survives a restart or a change of leader.
pub const SESSION_KIND: &str = "session";

/// A session as stored. It is keyed by a digest of its id ([`session_key`]), so the store (and
/// its backups) never holds an id a client could present.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub user_uuid: String,
    pub csrf_token: String,
    /// The hex digest of the password hash the user had when the session began: a session is
    /// valid only while it matches, so a new password (set by anyone, anywhere) ends the others.
    pub credential: String,
    /// When some node last recorded a use (Unix milliseconds); between records each node keeps
    /// its own clock ([`Sessions`]).
    pub touched_ms: u64,
}

impl SessionRecord {
    /// A new session of the user: (session id, record).
    pub fn begin(user_uuid: &str, password_hash: &str, now_ms: u64) -> (String, SessionRecord) {
        let record = SessionRecord {
            user_uuid: user_uuid.into(),
            csrf_token: random_token(32),
            credential: credential_stamp(password_hash),
            touched_ms: now_ms,
        };
        (random_token(32), record)
    }

    pub fn from_value(value: &serde_json::Value) -> Option<SessionRecord> {
        serde_json::from_value(value.clone()).ok()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn matches_password(&self, password_hash: &str) -> bool {
        self.credential == credential_stamp(password_hash)
    }
}

/// Where a session id is stored: its SHA-256, in hex.
pub fn session_key(id: &str) -> String {
    hex(&Sha256::digest(id.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a session remembers of a user's password: a digest of its stored hash.
pub fn credential_stamp(password_hash: &str) -> String {
    hex(&Sha256::digest(password_hash.as_bytes()))
}

/// Milliseconds since the Unix epoch: session clocks are compared across nodes.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The most a stored use may lag the real one: a session used only on one node is recorded
/// this often, so the others (and the leader's sweep) do not take it for idle.
pub fn refresh_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).min(Duration::from_secs(60))
}

/// How a use of a stored session goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionUse {
    /// Idle past the timeout: the session is over.
    Idle,
    /// Valid; `record` says the stored use is old enough to be brought up to date.
    Live { record: bool },
}

/// Each node's own clock of when its sessions were last used, between the coarse uses in the
/// store: a use costs no write, and a session is recorded at most once per refresh interval.
#[derive(Debug, Default)]
pub struct Sessions {
    /// session key -> (last use here in Unix ms, a record of it is under way)
    uses: Mutex<HashMap<String, (u64, bool)>>,
}

impl Sessions {
    /// A use of the stored session `key` at `now_ms`.
    pub fn use_session(
        &self,
        key: &str,
        stored: &SessionRecord,
        idle_timeout: Option<Duration>,
        now_ms: u64,
    ) -> SessionUse {
        let mut uses = self.lock();
        let (last_here, recording) = uses.get(key).copied().unwrap_or((0, false));
        let last = last_here.max(stored.touched_ms);
        let Some(limit) = idle_timeout else {
            uses.insert(key.to_string(), (now_ms, recording));
            return SessionUse::Live { record: false };
        };
        if now_ms.saturating_sub(last) > limit.as_millis() as u64 {
            uses.remove(key);
            return SessionUse::Idle;
        }
        let stale = now_ms.saturating_sub(stored.touched_ms) >= refresh_interval(limit).as_millis() as u64;
        let record = stale && !recording;
        uses.insert(key.to_string(), (now_ms, recording || record));
        SessionUse::Live { record }
    }

    /// The record of a use finished (or failed: the next use tries again).
    pub fn recorded(&self, key: &str) {
        if let Some(entry) = self.lock().get_mut(key) {
            entry.1 = false;
        }
    }

    /// When this node last saw the session used, if it did.
    pub fn last_use(&self, key: &str) -> Option<u64> {
        self.lock().get(key).map(|(at, _)| *at)
    }

    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Forgets uses older than the idle timeout (so memory does not grow with abandoned ones).
    pub fn sweep(&self, idle_timeout: Duration, now_ms: u64) {
        let limit = idle_timeout.as_millis() as u64;
        self.lock().retain(|_, (at, _)| now_ms.saturating_sub(*at) <= limit);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, bool)>> {
        self.uses.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Failed attempts one client address may make, over all user names, within the window (so a
/// client cannot guess across many names, nor fill the table with them).
pub const MAX_FAILED_LOGINS_PER_CLIENT: u32 = 30;
/// The most (client, user) pairs remembered; beyond it the oldest windows are forgotten first.
pub const THROTTLE_ENTRIES: usize = 20_000;

/// Counts failed logins per (client address, user name) and per client address, to answer 429
/// to guessing. Keys are SHA-256 digests, so an entry costs the same whatever the name's length,
/// and the table is bounded by [`THROTTLE_ENTRIES`]; an entry lives one window.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<[u8; 32], (u32, Instant)>>,
}

fn throttle_key(client: &str, user: Option<&str>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(client.as_bytes());
    h.update([0]);
    match user {
        Some(user) => h.update(user.as_bytes()),
        // The client's own budget: no user name hashes to this (names are at least one byte
        // after a marker byte that cannot start a UTF-8 string).
        None => h.update([0xff]),
    }
    h.finalize().into()
}

impl Throttle {
    pub fn is_blocked(&self, client: &str, user: &str, now: Instant) -> bool {
        let failures = self.lock();
        if failures.is_empty() {
            return false;
        }
        let over = |key: [u8; 32], limit: u32| {
            failures.get(&key).is_some_and(|(count, since)| {
                *count >= limit && now.saturating_duration_since(*since) < THROTTLE_WINDOW
            })
        };
        over(throttle_key(client, Some(user)), MAX_FAILED_LOGINS)
            || over(throttle_key(client, None), MAX_FAILED_LOGINS_PER_CLIENT)
    }

    pub fn record_failure(&self, client: &str, user: &str, now: Instant) {
        let mut failures = self.lock();
        if failures.len() + 2 > THROTTLE_ENTRIES {
            failures.retain(|_, (_, since)| now.saturating_duration_since(*since) < THROTTLE_WINDOW);
            if failures.len() + 2 > THROTTLE_ENTRIES {
                // Still full of live windows: forget the oldest half.
                let mut starts: Vec<Instant> = failures.values().map(|(_, since)| *since).collect();
                starts.sort();
                let cut = starts[starts.len() / 2];
                failures.retain(|_, (_, since)| *since > cut);
            }
        }
        for key in [throttle_key(client, Some(user)), throttle_key(client, None)] {
            let entry = failures.entry(key).or_insert((0, now));
            if now.saturating_duration_since(entry.1) >= THROTTLE_WINDOW {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }

    pub fn record_success(&self, client: &str, user: &str) {
        let mut failures = self.lock();
        // The common case (nobody failing) costs no hashing.
        if !failures.is_empty() {
            failures.remove(&throttle_key(client, Some(user)));
        }
    }

    /// How many entries the table holds (for tests and /metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A hash to verify against when the user does not exist, so that a failed login costs the
/// same argon2 work whether the name exists or not (timing reveals no user names).
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&random_token(24)))
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
    fn sessions_expire_when_idle_on_every_node() {
        let limit = Some(Duration::from_secs(60));
        let (id, record) = SessionRecord::begin("user-1", "hash", 1_000_000);
        let key = session_key(&id);
        assert_ne!(key, id, "the store holds a digest, not the id");
        assert!(record.matches_password("hash") && !record.matches_password("other"));
        let here = Sessions::default();
        // Used here within the timeout: live, and recorded once it is a refresh interval old.
        assert_eq!(here.use_session(&key, &record, limit, 1_000_000 + 10_000), SessionUse::Live { record: false });
        assert_eq!(here.use_session(&key, &record, limit, 1_000_000 + 15_000), SessionUse::Live { record: true });
        assert_eq!(
            here.use_session(&key, &record, limit, 1_000_000 + 16_000),
            SessionUse::Live { record: false },
            "one record at a time"
        );
        here.recorded(&key);
        // This node's own uses keep it alive past the stored stamp.
        assert_eq!(here.use_session(&key, &record, limit, 1_000_000 + 70_000), SessionUse::Live { record: true });
        // Another node that never saw it used judges by the stored stamp alone.
        let elsewhere = Sessions::default();
        assert_eq!(elsewhere.use_session(&key, &record, limit, 1_000_000 + 70_000), SessionUse::Idle);
        let recorded = SessionRecord { touched_ms: 1_000_000 + 70_000, ..record.clone() };
        assert!(matches!(elsewhere.use_session(&key, &recorded, limit, 1_000_000 + 100_000), SessionUse::Live { .. }));
        assert_eq!(here.use_session(&key, &record, limit, 1_000_000 + 200_000), SessionUse::Idle);
        assert_eq!(here.last_use(&key), None, "an idle session is forgotten");
        assert_eq!(Sessions::default().use_session(&key, &record, None, u64::MAX), SessionUse::Live { record: false });
    }

    #[test]
    fn session_records_round_trip() {
        let (_, record) = SessionRecord::begin("u", "h", 5);
        assert_eq!(SessionRecord::from_value(&record.to_value()), Some(record));
        assert_eq!(refresh_interval(Duration::from_secs(15 * 60)), Duration::from_secs(60));
        assert_eq!(refresh_interval(Duration::from_secs(60)), Duration::from_secs(15));
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
    fn throttle_limits_a_client_across_names_and_stays_bounded() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 0..MAX_FAILED_LOGINS_PER_CLIENT {
            assert!(!t.is_blocked("1.2.3.4", &format!("user{i}"), t0));
            t.record_failure("1.2.3.4", &format!("user{i}"), t0);
        }
        assert!(t.is_blocked("1.2.3.4", "someone-new", t0), "the client's budget is spent");
        assert!(!t.is_blocked("5.6.7.8", "someone-new", t0));
        // Many clients and long names: the table never exceeds its bound, and entries cost a
        // digest, not the name.
        let long = "x".repeat(1 << 16);
        for i in 0..(THROTTLE_ENTRIES * 2) {
            t.record_failure(&format!("10.0.{}.{}", i / 250, i % 250), &long, t0 + Duration::from_millis(i as u64));
        }
        assert!(t.len() <= THROTTLE_ENTRIES, "{}", t.len());
        // The newest failures are the ones kept.
        let last = THROTTLE_ENTRIES * 2 - 1;
        let newest = format!("10.0.{}.{}", last / 250, last % 250);
        for _ in 1..MAX_FAILED_LOGINS {
            t.record_failure(&newest, &long, t0 + Duration::from_secs(1));
        }
        assert!(t.is_blocked(&newest, &long, t0 + Duration::from_secs(1)));
        // Expired windows are dropped when the table fills.
        let later = t0 + THROTTLE_WINDOW * 2;
        for i in 0..THROTTLE_ENTRIES {
            t.record_failure(&format!("10.1.{}.{}", i / 250, i % 250), "u", later);
        }
        assert!(!t.is_blocked(&newest, &long, later));
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
