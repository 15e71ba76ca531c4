//! The embedded store on fjall, an LSM tree with a journal: a commit is one append of the
//! batch to the journal and one `fdatasync`, whatever the size of what is stored. (A B-tree
//! that copies on write, as redb does, rewrites a leaf and every page above it and its
//! allocator state at each commit: tens of KiB and several page writes for one small object.)
//!
//! The layout is the redb backend's: `objects` holds each object as of its last whole write,
//! `edits` its JSON Patch logs since (key: the object's key, a 0 byte, the sequence number
//! big-endian, so one object's logs are adjacent and in order), and the same compaction rule
//! writes an object whole again once its logs outgrow it.
//!
//! After a failed commit (a full disk) fjall refuses every later write (it is "poisoned")
//! until the database is opened again; the next commit does that first, as with redb. A
//! refused batch may still reach the journal: fjall flushes what it buffered when the
//! database is closed, and by then there may be room. So a refusal remembers each key's value
//! from before (the trees never saw the batch) and the next commit writes those back in the
//! same atomic batch: what was answered "not stored" is not there once anything else is.

use std::collections::HashMap;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde_json::Value;

use crate::StoreError;
use crate::backend::{Backend, EditState, Loader, Reopening};
use crate::catalogue::Change;

/// Journal bytes kept before the memtables are flushed to tables: bounds what a start replays.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

struct Open {
    db: Database,
    objects: Keyspace,
    edits: Keyspace,
}

pub struct FjallBackend {
    db: Reopening<Open>,
    edit_state: HashMap<String, EditState>,
    /// How to undo commits that were refused but may still reach the disk (see
    /// [`FjallBackend::try_commit`]): written with the next commit, in the same batch.
    undo: Vec<Write>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn open_database(path: &Path) -> Result<Open, StoreError> {
    let db = Database::builder(path).max_journaling_size(MAX_JOURNAL_BYTES).open().map_err(|e| match e {
        fjall::Error::Locked => {
            StoreError::Open(format!("{}: already open (locked by another process)", path.display()))
        }
        other => StoreError::Open(format!("{}: {other}", path.display())),
    })?;
    let objects = db.keyspace("objects", KeyspaceCreateOptions::default).map_err(io)?;
    let edits = db.keyspace("edits", KeyspaceCreateOptions::default).map_err(io)?;
    Ok(Open { db, objects, edits })
}

fn edit_key(object: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(object.len() + 9);
    key.extend_from_slice(object.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn parse_edit_key(key: &[u8]) -> Option<(&str, u64)> {
    let (object, seq) = key.split_at_checked(key.len().checked_sub(9)?)?;
    let seq = seq.strip_prefix(&[0])?;
    Some((std::str::from_utf8(object).ok()?, u64::from_be_bytes(seq.try_into().ok()?)))
}

impl FjallBackend {
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: &Path) -> Result<FjallBackend, StoreError> {
        Ok(FjallBackend { db: Reopening::open(path, open_database)?, edit_state: HashMap::new(), undo: Vec::new() })
    }

    /// What `changes` write, key by key, and the bookkeeping to apply once they are durable.
    fn writes(&self, changes: &[Change]) -> Result<(Vec<Write>, Bookkeeping), StoreError> {
        let mut writes = Vec::new();
        let mut updates = Vec::new();
        let remove_edits = |writes: &mut Vec<Write>, key: &str, upto: u64| {
            writes.extend((0..upto).map(|seq| Write { space: Space::Edits, key: edit_key(key, seq), value: None }));
        };
        for change in changes {
            match change {
                Change::Edit { stored, edits: ops } => {
                    let key = format!("{}/{}", stored.kind, stored.uuid);
                    let log = serde_json::to_vec(ops.as_slice()).map_err(io)?;
                    let state = self.edit_state.get(&key).copied().unwrap_or_default();
                    let log_bytes = log.len() as u64;
                    if state.base_bytes > 0 && !state.should_compact(log_bytes) {
                        writes.push(Write {
                            space: Space::Edits,
                            key: edit_key(&key, state.next_seq),
                            value: Some(log),
                        });
                        let next =
                            EditState { next_seq: state.next_seq + 1, log_bytes: state.log_bytes + log_bytes, ..state };
                        updates.push((key, Some(next)));
                        continue;
                    }
                    // Compaction (or an object this process has not sized yet): write it whole.
                    let body = serde_json::to_vec(&stored.value).map_err(io)?;
                    let base_bytes = body.len() as u64;
                    writes.push(Write { space: Space::Objects, key: key.clone().into_bytes(), value: Some(body) });
                    remove_edits(&mut writes, &key, state.next_seq);
                    updates.push((key, Some(EditState { base_bytes, ..EditState::default() })));
                }
                Change::Put(stored) => {
                    let key = format!("{}/{}", stored.kind, stored.uuid);
                    let body = serde_json::to_vec(&stored.value).map_err(io)?;
                    let base_bytes = body.len() as u64;
                    writes.push(Write { space: Space::Objects, key: key.clone().into_bytes(), value: Some(body) });
                    let state = self.edit_state.get(&key).copied().unwrap_or_default();
                    remove_edits(&mut writes, &key, state.next_seq);
                    updates.push((key, Some(EditState { base_bytes, ..EditState::default() })));
                }
                Change::Delete { kind, uuid } => {
                    let key = format!("{kind}/{uuid}");
                    writes.push(Write { space: Space::Objects, key: key.clone().into_bytes(), value: None });
                    let state = self.edit_state.get(&key).copied().unwrap_or_default();
                    remove_edits(&mut writes, &key, state.next_seq);
                    updates.push((key, None));
                }
            }
        }
        Ok((writes, updates))
    }

    fn try_commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let (writes, updates) = self.writes(changes)?;
        let open = self.db.get()?;
        let keyspace = |space: Space| match space {
            Space::Objects => &open.objects,
            Space::Edits => &open.edits,
        };
        let mut batch = open.db.batch().durability(Some(PersistMode::SyncData));
        let mut put = |w: &Write| match &w.value {
            Some(value) => batch.insert(keyspace(w.space), w.key.as_slice(), value.as_slice()),
            None => batch.remove(keyspace(w.space), w.key.as_slice()),
        };
        if !self.undo.is_empty() {
            // Undo what a refused commit may have left in the journal, unless this batch writes
            // the key anew (one batch must not hold a key twice).
            let written: std::collections::HashSet<(Space, &[u8])> =
                writes.iter().map(|w| (w.space, w.key.as_slice())).collect();
            self.undo.iter().filter(|w| !written.contains(&(w.space, w.key.as_slice()))).for_each(&mut put);
        }
        writes.iter().for_each(&mut put);
        // One journal append and one fdatasync for the whole batch: all of it or none.
        if let Err(e) = batch.commit() {
            // The journal may yet hold this batch (a later flush, such as the one when the
            // database is closed for the reopen, can complete it): remember how to undo it,
            // from the state before it, which the trees still show.
            let undone: std::collections::HashSet<(Space, Vec<u8>)> =
                self.undo.iter().map(|w| (w.space, w.key.clone())).collect();
            let mut more = Vec::new();
            for w in writes.iter().filter(|w| !undone.contains(&(w.space, w.key.clone()))) {
                match keyspace(w.space).get(&w.key) {
                    Ok(before) => {
                        more.push(Write { space: w.space, key: w.key.clone(), value: before.map(|v| v.to_vec()) })
                    }
                    Err(read) => tracing::error!(error = %read, "cannot read what a refused commit would undo"),
                }
            }
            self.undo.extend(more);
            return Err(io(e));
        }
        self.undo.clear();
        for (key, state) in updates {
            match state {
                Some(s) => self.edit_state.insert(key, s),
                None => self.edit_state.remove(&key),
            };
        }
        Ok(())
    }
}

/// Each object's edit state after a commit (`None`: the object is gone).
type Bookkeeping = Vec<(String, Option<EditState>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Space {
    Objects,
    Edits,
}

/// One key's new value (`None`: removed).
#[derive(Debug, Clone)]
struct Write {
    space: Space,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

impl Backend for FjallBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        let open = self.db.get()?;
        let mut loader = Loader::default();
        for entry in open.objects.iter() {
            let (key, value) = entry.into_inner().map_err(io)?;
            let key = String::from_utf8(key.to_vec()).map_err(|e| StoreError::Corrupt(format!("a key: {e}")))?;
            loader.object(key, &value)?;
        }
        for entry in open.edits.iter() {
            let (key, value) = entry.into_inner().map_err(io)?;
            let (object, seq) =
                parse_edit_key(&key).ok_or_else(|| StoreError::Corrupt("an edit log's key".to_string()))?;
            loader.edit(object, seq, &value)?;
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

/// Moves a store kept by an earlier version in redb (`config.redb`) into fjall at `target`:
/// copied into a directory beside it, made durable, renamed into place, and only then is the
/// redb file set aside (`config.redb.migrated`). A crash at any point leaves either the redb
/// file as it was (the copy is made again) or the complete new store.
pub fn migrate_from_redb(redb_file: &Path, target: &Path) -> Result<(), StoreError> {
    if target.exists() {
        if redb_file.exists() {
            set_aside(redb_file)?;
        }
        return Ok(());
    }
    if !redb_file.exists() {
        return Ok(());
    }
    let staging = target.with_extension("migrating");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io)?;
    }
    let objects = crate::backend::RedbBackend::open(redb_file)?.load()?;
    let count = objects.len();
    {
        let mut fresh = FjallBackend::open(&staging)?;
        let changes: Vec<Change> = objects
            .into_iter()
            .map(|(kind, uuid, value)| {
                Change::Put(std::sync::Arc::new(crate::catalogue::Stored {
                    kind,
                    uuid,
                    value,
                    meta: crate::catalogue::Meta::default(),
                }))
            })
            .collect();
        for chunk in changes.chunks(1000) {
            fresh.commit(chunk)?;
        }
    }
    std::fs::rename(&staging, target).map_err(io)?;
    sync_parent(target)?;
    set_aside(redb_file)?;
    tracing::info!(objects = count, from = %redb_file.display(), to = %target.display(), "moved the store to fjall");
    Ok(())
}

fn set_aside(redb_file: &Path) -> Result<(), StoreError> {
    let aside = redb_file.with_extension("redb.migrated");
    std::fs::rename(redb_file, &aside).map_err(io)?;
    sync_parent(redb_file)
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{Meta, Stored};
    use serde_json::json;
    use std::sync::Arc;

    fn stored(uuid: &str, value: Value) -> Arc<Stored> {
        Arc::new(Stored { kind: "pool".into(), uuid: uuid.into(), value, meta: Meta::default() })
    }

    #[test]
    fn edit_keys_keep_one_objects_logs_together_and_in_order() {
        let key = edit_key("pool/p1", 258);
        assert_eq!(parse_edit_key(&key), Some(("pool/p1", 258)));
        assert!(edit_key("pool/p1", 9) < edit_key("pool/p1", 10));
        assert!(edit_key("pool/p1", u64::MAX) < edit_key("pool/p1a", 0), "the 0 byte ends the object's key");
        assert_eq!(parse_edit_key(b"short"), None);
    }

    #[test]
    fn edits_replay_on_load_and_compact_when_large() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let mut servers = vec![];
        {
            let mut b = FjallBackend::open(&path).unwrap();
            b.commit(&[Change::Put(stored("p1", json!({"servers": []})))]).unwrap();
            for i in 0..50 {
                let server = json!({"addr": format!("10.0.0.{i}"), "pad": "x".repeat(100)});
                servers.push(server.clone());
                let op = json!({"op": "add", "path": "/servers/-", "value": server});
                b.commit(&[Change::Edit { stored: stored("p1", json!({"servers": servers})), edits: vec![op].into() }])
                    .unwrap();
            }
            assert_eq!(b.edit_state["pool/p1"].next_seq, 50, "small edits are logged, not rewritten");
            b.commit(&[
                Change::Put(stored("p2", json!({"n": 2}))),
                Change::Delete { kind: "pool".into(), uuid: "p2".into() },
            ])
            .unwrap();
        }
        let mut b = FjallBackend::open(&path).unwrap();
        let loaded = b.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].2, json!({"servers": servers}));
        assert_eq!(b.edit_state["pool/p1"].next_seq, 50);
        // Push the log past its limit: the object is written whole and the log emptied.
        let big = "y".repeat(crate::backend::COMPACT_MIN_BYTES as usize);
        let op = json!({"op": "add", "path": "/big", "value": big});
        b.commit(&[Change::Edit {
            stored: stored("p1", json!({"servers": servers, "big": big})),
            edits: vec![op].into(),
        }])
        .unwrap();
        assert_eq!(b.edit_state["pool/p1"].next_seq, 0);
        drop(b);
        let mut b = FjallBackend::open(&path).unwrap();
        assert_eq!(b.load().unwrap()[0].2["big"].as_str().unwrap().len(), big.len());
        assert_eq!(b.db.get().unwrap().edits.iter().count(), 0);
    }

    /// The active journal's allocated bytes and where its data ends (its last byte that is not
    /// zero, plus one).
    fn active_journal(store: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let journal = std::fs::read_dir(store)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
            .max_by_key(|p| p.file_stem().unwrap().to_str().unwrap().parse::<u64>().unwrap())
            .unwrap();
        let bytes = std::fs::read(&journal).unwrap();
        let data_end = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1);
        (std::fs::metadata(&journal).unwrap().blocks() * 512, data_end)
    }

    /// A commit overwrites zeros already written: no block to allocate, no size to change, so its
    /// `fdatasync` writes the data alone. This holds for a journal reopened after recovery too
    /// (which fjall itself would append to), and what every session wrote is there after each.
    #[test]
    fn commits_overwrite_zeros_written_ahead_also_in_a_reopened_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let pad = "x".repeat(2000);
        for session in 0..3 {
            let mut b = FjallBackend::open(&path).unwrap();
            assert_eq!(b.load().unwrap().len(), session * 300, "what the sessions before wrote is there");
            for i in 0..300 {
                let uuid = format!("s{session}-{i}");
                b.commit(&[Change::Put(stored(&uuid, json!({"name": uuid, "pad": pad})))]).unwrap();
            }
            let (allocated, data_end) = active_journal(&path);
            assert!(data_end > 300 * 2000, "session {session}: the journal holds this session's commits");
            assert!(
                allocated >= data_end + (256 << 10),
                "session {session}: {allocated} bytes allocated, data up to {data_end}: no zeros written ahead"
            );
        }
        let mut b = FjallBackend::open(&path).unwrap();
        let loaded = b.load().unwrap();
        assert_eq!(loaded.len(), 900);
        assert!(loaded.iter().all(|(_, uuid, v)| v["name"] == uuid.as_str() && v["pad"] == pad.as_str()));
    }

    #[test]
    fn a_redb_store_is_moved_once_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (redb_file, target) = (dir.path().join("config.redb"), dir.path().join("store"));
        {
            let mut old = crate::backend::RedbBackend::open(&redb_file).unwrap();
            let changes: Vec<Change> =
                (0..2500).map(|i| Change::Put(stored(&format!("p{i}"), json!({"name": format!("p{i}")})))).collect();
            old.commit(&changes).unwrap();
            let op = json!({"op": "replace", "path": "/name", "value": "renamed"});
            old.commit(&[Change::Edit { stored: stored("p7", json!({"name": "renamed"})), edits: vec![op].into() }])
                .unwrap();
        }
        // An interrupted earlier attempt is started over.
        std::fs::create_dir_all(target.with_extension("migrating")).unwrap();
        migrate_from_redb(&redb_file, &target).unwrap();
        assert!(!redb_file.exists() && dir.path().join("config.redb.migrated").exists());
        let loaded = FjallBackend::open(&target).unwrap().load().unwrap();
        assert_eq!(loaded.len(), 2500);
        assert!(loaded.iter().any(|(_, uuid, v)| uuid == "p7" && v["name"] == "renamed"));
        // Nothing to do the second time.
        migrate_from_redb(&redb_file, &target).unwrap();
        assert_eq!(FjallBackend::open(&target).unwrap().load().unwrap().len(), 2500);
    }
}
