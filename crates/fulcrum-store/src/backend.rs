//! Durable storage: one narrow trait, and the embedded redb implementation.
//!
//! A clustered backend (etcd) implements the same trait; nothing above the writer knows which
//! one is in use.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::StoreError;
use crate::catalogue::Change;

/// Where committed objects live.
pub trait Backend: Send + 'static {
    /// Every stored object, as it was last committed: (type, uuid, body).
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError>;
    /// Applies all changes atomically; returns only once they are durable.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
    /// Whether `commit` may run on any thread, an async runtime's included: then a write that
    /// finds nothing to group with commits on its caller's thread instead of the writer's.
    /// A backend that drives its own runtime in `commit` (etcd) says no.
    fn commits_on_any_thread(&self) -> bool {
        true
    }
    /// The most changes one commit may carry (the writer's batches stay within it).
    fn max_changes_per_commit(&self) -> usize {
        usize::MAX
    }
    /// For a backend that others write too (etcd, in a cluster): starts feeding every commit,
    /// this node's and the leader's, into `catalogue` (loaded by `load`). The writer then leaves
    /// the catalogue to the feed and answers once the feed applied its commit.
    fn start_feed(
        &mut self,
        _catalogue: std::sync::Arc<std::sync::RwLock<crate::Catalogue>>,
        _indexer: crate::Indexer,
    ) -> Option<std::sync::Arc<crate::catalogue::Applied>> {
        None
    }
    /// The revision of the last successful commit (for a fed catalogue).
    fn last_commit_revision(&self) -> i64 {
        0
    }
}

/// `<type>/<uuid>` → JSON body, as of the object's last whole write.
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// (`<type>/<uuid>`, sequence) → JSON array of edit operations made since that whole write.
const EDITS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("edits");

/// An object whose edit logs outgrow this many bytes, or this many times its own size, is
/// written whole again (and its logs dropped). So a small change to a big object costs a small
/// write, and the logs replayed at start stay in proportion to the objects.
pub(crate) const COMPACT_MIN_BYTES: u64 = 256 << 10;
const COMPACT_FACTOR: u64 = 4;

/// Whether an object whose edit logs hold `log_bytes` (and would grow by `more`) over a whole
/// write of `base_bytes` should be written whole again: the one compaction rule of every backend.
pub(crate) fn logs_outgrow(log_bytes: u64, more: u64, base_bytes: u64) -> bool {
    log_bytes + more > COMPACT_MIN_BYTES.max(COMPACT_FACTOR * base_bytes)
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct EditState {
    pub(crate) next_seq: u64,
    pub(crate) log_bytes: u64,
    pub(crate) base_bytes: u64,
}

impl EditState {
    pub(crate) fn should_compact(&self, more: u64) -> bool {
        logs_outgrow(self.log_bytes, more, self.base_bytes)
    }
}

/// A storage engine's handle that is closed and opened again at its next use after an I/O
/// error: engines refuse every write after one (a full disk) until reopened, so the store
/// recovers by itself once space is back.
pub(crate) struct Reopening<T> {
    path: std::path::PathBuf,
    opener: fn(&Path) -> Result<T, StoreError>,
    /// `None` while closed for a reopen that has not succeeded yet.
    handle: Option<T>,
    needs_reopen: bool,
}

impl<T> Reopening<T> {
    pub(crate) fn open(path: &Path, opener: fn(&Path) -> Result<T, StoreError>) -> Result<Reopening<T>, StoreError> {
        let handle = opener(path)?;
        Ok(Reopening { path: path.to_path_buf(), opener, handle: Some(handle), needs_reopen: false })
    }

    /// The handle, opened again first if the last commit failed.
    pub(crate) fn get(&mut self) -> Result<&T, StoreError> {
        if self.needs_reopen || self.handle.is_none() {
            // The old handle (and its lock) must be gone before the store is opened again.
            self.handle = None;
            let handle =
                (self.opener)(&self.path).map_err(|e| StoreError::Io(format!("reopening after an I/O error: {e}")))?;
            tracing::info!(path = %self.path.display(), "reopened the store after an I/O error");
            self.handle = Some(handle);
            self.needs_reopen = false;
        }
        Ok(self.handle.as_ref().expect("opened above"))
    }

    /// Notes how a commit ended: after an I/O error the next use reopens.
    pub(crate) fn ended(&mut self, outcome: &Result<(), StoreError>) {
        if matches!(outcome, Err(StoreError::Io(_))) {
            self.needs_reopen = true;
        }
    }
}

/// Objects as a load answers them: (type, uuid, body).
pub(crate) type LoadedObjects = Vec<(String, String, Value)>;

/// What a load reads, engine by engine: every object as last written whole, then each one's
/// edit logs in sequence order, replayed onto it.
#[derive(Default)]
pub(crate) struct Loader {
    bodies: HashMap<String, (Value, u64)>,
    states: HashMap<String, EditState>,
}

impl Loader {
    pub(crate) fn object(&mut self, key: String, bytes: &[u8]) -> Result<(), StoreError> {
        let body: Value = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
        self.bodies.insert(key, (body, bytes.len() as u64));
        Ok(())
    }

    pub(crate) fn edit(&mut self, object: &str, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let (body, base_bytes) = self
            .bodies
            .get_mut(object)
            .ok_or_else(|| StoreError::Corrupt(format!("edit log for missing object {object}")))?;
        let ops: Vec<Value> =
            serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{object}#{seq}: {e}")))?;
        fulcrum_jsonpatch::apply_all(body, &ops).map_err(|e| StoreError::Corrupt(format!("{object}#{seq}: {e}")))?;
        let state = self.states.entry(object.to_string()).or_default();
        state.next_seq = seq + 1;
        state.log_bytes += bytes.len() as u64;
        state.base_bytes = *base_bytes;
        Ok(())
    }

    /// The objects as (type, uuid, body), and each one's edit state.
    pub(crate) fn finish(mut self) -> Result<(LoadedObjects, HashMap<String, EditState>), StoreError> {
        let mut out = Vec::with_capacity(self.bodies.len());
        for (key, (body, base_bytes)) in self.bodies {
            self.states.entry(key.clone()).or_default().base_bytes = base_bytes;
            let (kind, uuid) = key.split_once('/').ok_or_else(|| StoreError::Corrupt(format!("bad key {key}")))?;
            out.push((kind.to_string(), uuid.to_string(), body));
        }
        Ok((out, self.states))
    }
}

/// Objects in one redb file. redb is pure Rust, ACID, and by default (`Durability::Immediate`)
/// fsyncs before `commit` returns, so one transaction is one durable group commit.
///
/// After a failed commit (a full disk) redb refuses every later transaction until the database
/// is closed and opened again; the next commit does that first, so the store recovers by
/// itself once space is back. What is on disk is then the last successful commit, which is
/// also what the catalogue and `edit_state` describe.
pub struct RedbBackend {
    db: Reopening<Database>,
    edit_state: HashMap<String, EditState>,
}

impl RedbBackend {
    pub fn open(path: &Path) -> Result<RedbBackend, StoreError> {
        Ok(RedbBackend { db: Reopening::open(path, open_database)?, edit_state: HashMap::new() })
    }
}

fn open_database(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
    let txn = db.begin_write().map_err(io)?;
    txn.open_table(OBJECTS).map_err(io)?;
    txn.open_table(EDITS).map_err(io)?;
    txn.commit().map_err(io)?;
    Ok(db)
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn remove_edits(table: &mut redb::Table<(&str, u64), &[u8]>, key: &str, upto: u64) -> Result<(), StoreError> {
    for seq in 0..upto {
        table.remove((key, seq)).map_err(io)?;
    }
    Ok(())
}

impl Backend for RedbBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        let txn = self.db.get()?.begin_read().map_err(io)?;
        let mut loader = Loader::default();
        for entry in txn.open_table(OBJECTS).map_err(io)?.iter().map_err(io)? {
            let (key, value) = entry.map_err(io)?;
            loader.object(key.value().to_string(), value.value())?;
        }
        for entry in txn.open_table(EDITS).map_err(io)?.iter().map_err(io)? {
            let (key, value) = entry.map_err(io)?;
            let (object, seq) = key.value();
            loader.edit(object, seq, value.value())?;
        }
        let (objects, states) = loader.finish()?;
        self.edit_state = states;
        Ok(objects)
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let outcome = self.try_commit(changes);
        self.db.ended(&outcome);
        outcome
    }
}

impl RedbBackend {
    fn try_commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let txn = self.db.get()?.begin_write().map_err(io)?;
        // Bookkeeping is applied only once the commit succeeded.
        let mut updates: Vec<(String, Option<EditState>)> = Vec::new();
        {
            let mut objects = txn.open_table(OBJECTS).map_err(io)?;
            let mut edits = txn.open_table(EDITS).map_err(io)?;
            for change in changes {
                match change {
                    Change::Edit { stored, edits: ops } => {
                        let key = format!("{}/{}", stored.kind, stored.uuid);
                        let log = serde_json::to_vec(ops.as_slice()).map_err(io)?;
                        let state = self.edit_state.get(&key).copied().unwrap_or_default();
                        if state.base_bytes > 0 && !state.should_compact(log.len() as u64) {
                            edits.insert((key.as_str(), state.next_seq), log.as_slice()).map_err(io)?;
                            let next = EditState {
                                next_seq: state.next_seq + 1,
                                log_bytes: state.log_bytes + log.len() as u64,
                                ..state
                            };
                            updates.push((key, Some(next)));
                            continue;
                        }
                        // Compaction (or an object this process has not sized yet): write it whole.
                        let body = serde_json::to_vec(&stored.value).map_err(io)?;
                        objects.insert(key.as_str(), body.as_slice()).map_err(io)?;
                        remove_edits(&mut edits, &key, state.next_seq)?;
                        updates.push((key, Some(EditState { base_bytes: body.len() as u64, ..EditState::default() })));
                    }
                    Change::Put(stored) => {
                        let key = format!("{}/{}", stored.kind, stored.uuid);
                        let body = serde_json::to_vec(&stored.value).map_err(io)?;
                        objects.insert(key.as_str(), body.as_slice()).map_err(io)?;
                        let state = self.edit_state.get(&key).copied().unwrap_or_default();
                        remove_edits(&mut edits, &key, state.next_seq)?;
                        updates.push((key, Some(EditState { base_bytes: body.len() as u64, ..EditState::default() })));
                    }
                    Change::Delete { kind, uuid } => {
                        let key = format!("{kind}/{uuid}");
                        objects.remove(key.as_str()).map_err(io)?;
                        let state = self.edit_state.get(&key).copied().unwrap_or_default();
                        remove_edits(&mut edits, &key, state.next_seq)?;
                        updates.push((key, None));
                    }
                }
            }
        }
        txn.commit().map_err(io)?;
        for (key, state) in updates {
            match state {
                Some(s) => self.edit_state.insert(key, s),
                None => self.edit_state.remove(&key),
            };
        }
        Ok(())
    }
}

/// Keeps everything in memory; for tests of the layers above.
#[derive(Default)]
pub struct MemoryBackend {
    objects: std::collections::BTreeMap<(String, String), Value>,
}

impl Backend for MemoryBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        Ok(self.objects.iter().map(|((k, u), v)| (k.clone(), u.clone(), v.clone())).collect())
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        for change in changes {
            match change {
                Change::Put(s) | Change::Edit { stored: s, .. } => {
                    self.objects.insert((s.kind.clone(), s.uuid.clone()), s.value.clone());
                }
                Change::Delete { kind, uuid } => {
                    self.objects.remove(&(kind.clone(), uuid.clone()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{Meta, Stored};
    use serde_json::json;
    use std::sync::Arc;

    fn stored(value: Value) -> Arc<Stored> {
        Arc::new(Stored { kind: "pool".into(), uuid: "p1".into(), value, meta: Meta::default() })
    }

    #[test]
    fn edits_replay_on_load_and_compact_when_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let mut servers = vec![];
        {
            let mut b = RedbBackend::open(&path).unwrap();
            b.commit(&[Change::Put(stored(json!({"servers": []})))]).unwrap();
            for i in 0..50 {
                let server = json!({"addr": format!("10.0.0.{i}"), "pad": "x".repeat(100)});
                servers.push(server.clone());
                let op = json!({"op": "add", "path": "/servers/-", "value": server});
                b.commit(&[Change::Edit { stored: stored(json!({"servers": servers})), edits: vec![op].into() }])
                    .unwrap();
            }
            assert_eq!(b.edit_state["pool/p1"].next_seq, 50, "small edits are logged, not rewritten");
        }
        let mut b = RedbBackend::open(&path).unwrap();
        let loaded = b.load().unwrap();
        assert_eq!(loaded[0].2, json!({"servers": servers}));
        // Push the log past its limit: the object is written whole and the log emptied.
        let big = "y".repeat(COMPACT_MIN_BYTES as usize);
        let op = json!({"op": "add", "path": "/big", "value": big});
        b.commit(&[Change::Edit { stored: stored(json!({"servers": servers, "big": big})), edits: vec![op].into() }])
            .unwrap();
        assert_eq!(b.edit_state["pool/p1"].next_seq, 0);
        drop(b);
        let mut b = RedbBackend::open(&path).unwrap();
        assert_eq!(b.load().unwrap()[0].2["big"].as_str().unwrap().len(), big.len());
        let txn = b.db.get().unwrap().begin_read().unwrap();
        assert_eq!(txn.open_table(EDITS).unwrap().iter().unwrap().count(), 0);
    }
}
