//! Durable storage: one narrow trait, and the embedded redb implementation.
//!
//! A clustered backend (etcd) implements the same trait; nothing above the writer knows which
//! one is in use.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;

use crate::StoreError;
use crate::catalogue::Change;

/// Where committed objects live.
pub trait Backend: Send + 'static {
    /// Every stored object: (type, uuid, body).
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError>;
    /// Applies all changes atomically; returns only once they are durable.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError>;
}

/// `<type>/<uuid>` → JSON body.
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");

/// Objects in one redb file. redb is pure Rust, ACID, and by default (`Durability::Immediate`)
/// fsyncs before `commit` returns, so one transaction is one durable group commit.
pub struct RedbBackend {
    db: Database,
}

impl RedbBackend {
    pub fn open(path: &Path) -> Result<RedbBackend, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(io)?;
        txn.open_table(OBJECTS).map_err(io)?;
        txn.commit().map_err(io)?;
        Ok(RedbBackend { db })
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl Backend for RedbBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let table = txn.open_table(OBJECTS).map_err(io)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(io)? {
            let (key, value) = entry.map_err(io)?;
            let key = key.value();
            let (kind, uuid) = key.split_once('/').ok_or_else(|| StoreError::Corrupt(format!("bad key {key}")))?;
            let body: Value =
                serde_json::from_slice(value.value()).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
            out.push((kind.to_string(), uuid.to_string(), body));
        }
        Ok(out)
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io)?;
        {
            let mut table = txn.open_table(OBJECTS).map_err(io)?;
            for change in changes {
                match change {
                    Change::Put(stored) => {
                        let key = format!("{}/{}", stored.kind, stored.uuid);
                        let body = serde_json::to_vec(&stored.value).map_err(io)?;
                        table.insert(key.as_str(), body.as_slice()).map_err(io)?;
                    }
                    Change::Delete { kind, uuid } => {
                        table.remove(format!("{kind}/{uuid}").as_str()).map_err(io)?;
                    }
                }
            }
        }
        txn.commit().map_err(io)
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
                Change::Put(s) => {
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
