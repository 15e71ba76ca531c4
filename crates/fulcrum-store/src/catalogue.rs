//! The in-memory copy of every committed object, with the indexes reads need: by uuid, by
//! (tenant, name), and who refers to whom. Reads are served from here; only the writer changes it,
//! and only with changes that are already durable.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Weak};

use serde_json::Value;

/// What the catalogue indexes an object by; computed by the caller's [`Indexer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Tenant uuid, empty for global objects.
    pub tenant: String,
    pub name: Option<String>,
    /// Canonical `/api/<type>/<uuid>` of every object this one refers to.
    pub refs: Vec<String>,
}

/// Computes an object's [`Meta`] from its type and stored body.
pub type Indexer = Arc<dyn Fn(&str, &Value) -> Meta + Send + Sync>;

/// One stored object.
#[derive(Debug)]
pub struct Stored {
    pub kind: String,
    pub uuid: String,
    pub value: Value,
    pub meta: Meta,
}

impl Stored {
    /// `/api/<kind>/<uuid>`.
    pub fn path(&self) -> String {
        format!("/api/{}/{}", self.kind, self.uuid)
    }
}

/// A change to one object, as the writer commits it.
#[derive(Debug, Clone)]
pub enum Change {
    /// The object as a whole (create, replace).
    Put(Arc<Stored>),
    /// The object after an edit, and the edit log (JSON Patch operations) that turns the
    /// stored object into it: the backend may write the log instead of the object.
    Edit {
        stored: Arc<Stored>,
        /// Shared with the catalogue's record of recent edits (see [`Catalogue::lineage`]).
        edits: Arc<Vec<serde_json::Value>>,
    },
    Delete {
        kind: String,
        uuid: String,
    },
}

#[derive(Debug, Default)]
struct Table {
    objects: BTreeMap<String, Arc<Stored>>,
    names: HashMap<(String, String), String>,
}

#[derive(Debug, Default)]
pub struct Catalogue {
    tables: HashMap<String, Table>,
    /// target path → paths of the objects that refer to it.
    referrers: HashMap<String, BTreeSet<String>>,
    /// How many changes were applied: what was rendered from one generation holds until the next.
    generation: u64,
    /// Moves when an object's name may have gone or changed (a rename, a removal): what was
    /// rendered with the names of the objects it refers to holds while this stays.
    names_generation: u64,
    /// The last few edits applied, oldest first.
    recent_edits: VecDeque<Lineage>,
}

/// How a version of an object came about: by an edit log applied to the version before. A
/// renderer that kept the rendering of that version renders this one from it.
#[derive(Debug, Clone)]
pub struct Lineage {
    made: Weak<Stored>,
    /// The version the edit was applied to (weak: the record keeps no object alive, and keeps
    /// its address from being reused while it stands).
    pub from: Weak<Stored>,
    pub edits: Arc<Vec<Value>>,
}

/// How many edits [`Catalogue::lineage`] remembers: it is asked right after a commit, by the
/// answers of the writes that made it.
const RECENT_EDITS: usize = 16;

impl Catalogue {
    /// Changes so far; any change (of any object, a rename of a referenced one included) moves it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Moves when an object's name may have gone or changed (a rename, a removal).
    pub fn names_generation(&self) -> u64 {
        self.names_generation
    }

    /// How the version at `version` (an `Arc`'s or a `Weak`'s address) came about, if a recent
    /// edit made it.
    pub fn lineage(&self, version: *const Stored) -> Option<&Lineage> {
        self.recent_edits.iter().rev().find(|l| std::ptr::eq(l.made.as_ptr(), version))
    }

    pub fn get(&self, kind: &str, uuid: &str) -> Option<&Arc<Stored>> {
        self.tables.get(kind)?.objects.get(uuid)
    }

    /// Every object of a type, in uuid order.
    pub fn iter(&self, kind: &str) -> impl Iterator<Item = &Arc<Stored>> {
        self.tables.get(kind).into_iter().flat_map(|t| t.objects.values())
    }

    pub fn count(&self, kind: &str) -> usize {
        self.tables.get(kind).map_or(0, |t| t.objects.len())
    }

    pub fn find_by_name(&self, kind: &str, tenant: &str, name: &str) -> Option<&Arc<Stored>> {
        let table = self.tables.get(kind)?;
        let uuid = table.names.get(&(tenant.to_string(), name.to_string()))?;
        table.objects.get(uuid)
    }

    /// Paths of the objects that refer to `target` (`/api/<kind>/<uuid>`).
    pub fn referrers(&self, target: &str) -> impl Iterator<Item = &String> {
        self.referrers.get(target).into_iter().flatten()
    }

    /// Looks an object up by its canonical path.
    pub fn get_path(&self, path: &str) -> Option<&Arc<Stored>> {
        let (kind, uuid) = path.strip_prefix("/api/")?.split_once('/')?;
        self.get(kind, uuid)
    }

    /// Applies a committed change; returns the object version it replaced or removed.
    pub fn apply(&mut self, change: &Change) -> Option<Arc<Stored>> {
        self.generation += 1;
        match change {
            Change::Put(stored) | Change::Edit { stored, .. } => {
                let old = self.remove(&stored.kind, &stored.uuid);
                if old.as_ref().is_some_and(|old| old.meta.name != stored.meta.name) {
                    self.names_generation += 1;
                }
                if let (Change::Edit { edits, .. }, Some(old)) = (change, &old) {
                    if self.recent_edits.len() == RECENT_EDITS {
                        self.recent_edits.pop_front();
                    }
                    self.recent_edits.push_back(Lineage {
                        made: Arc::downgrade(stored),
                        from: Arc::downgrade(old),
                        edits: edits.clone(),
                    });
                }
                let path = stored.path();
                for target in &stored.meta.refs {
                    self.referrers.entry(target.clone()).or_default().insert(path.clone());
                }
                let table = self.tables.entry(stored.kind.clone()).or_default();
                if let Some(name) = &stored.meta.name {
                    table.names.insert((stored.meta.tenant.clone(), name.clone()), stored.uuid.clone());
                }
                table.objects.insert(stored.uuid.clone(), stored.clone());
                old
            }
            Change::Delete { kind, uuid } => {
                self.names_generation += 1;
                self.remove(kind, uuid)
            }
        }
    }

    /// Edits a committed object where it lies, when no reader holds it (a reader holds a clone
    /// of its `Arc` while it uses it, and can never see it change): `None` when it is shared or
    /// absent, and the caller copies it instead. Re-indexes it if its index entry changed.
    pub fn edit_unshared<E>(
        &mut self,
        kind: &str,
        uuid: &str,
        indexer: &Indexer,
        edit: impl FnOnce(&mut Value) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        // Not while a weak reference is held either (a recorded edit's, a kept rendering's): those
        // name this version by its address.
        let stored = Arc::get_mut(self.tables.get_mut(kind)?.objects.get_mut(uuid)?)?;
        self.generation += 1;
        if let Err(e) = edit(&mut stored.value) {
            return Some(Err(e));
        }
        let meta = indexer(kind, &stored.value);
        if meta != stored.meta {
            // Taken out under its old entry, put back under the new one.
            let mut arc = self.remove(kind, uuid).expect("found above");
            if let Some(stored) = Arc::get_mut(&mut arc) {
                stored.meta = meta;
            }
            self.apply(&Change::Put(arc));
        }
        Some(Ok(()))
    }

    fn remove(&mut self, kind: &str, uuid: &str) -> Option<Arc<Stored>> {
        let table = self.tables.get_mut(kind)?;
        let old = table.objects.remove(uuid)?;
        if let Some(name) = &old.meta.name {
            let key = (old.meta.tenant.clone(), name.clone());
            if table.names.get(&key) == Some(&old.uuid) {
                table.names.remove(&key);
            }
        }
        let path = old.path();
        for target in &old.meta.refs {
            if let Some(set) = self.referrers.get_mut(target) {
                set.remove(&path);
                if set.is_empty() {
                    self.referrers.remove(target);
                }
            }
        }
        Some(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(kind: &str, uuid: &str, name: &str, refs: &[&str]) -> Change {
        Change::Put(Arc::new(Stored {
            kind: kind.into(),
            uuid: uuid.into(),
            value: Value::Null,
            meta: Meta {
                tenant: "t".into(),
                name: Some(name.into()),
                refs: refs.iter().map(|r| r.to_string()).collect(),
            },
        }))
    }

    #[test]
    fn an_object_nobody_holds_is_edited_in_place_and_reindexed() {
        let indexer: Indexer = Arc::new(|_, v: &Value| Meta {
            tenant: "t".into(),
            name: v.get("name").and_then(Value::as_str).map(String::from),
            refs: vec![],
        });
        let mut c = Catalogue::default();
        let body = serde_json::json!({"name": "a", "n": 1});
        let meta = indexer("pool", &body);
        c.apply(&Change::Put(Arc::new(Stored { kind: "pool".into(), uuid: "p1".into(), value: body, meta })));
        let before = c.generation();
        // A reader holds it: nothing is edited under it.
        let held = c.get("pool", "p1").cloned().unwrap();
        let bump = |v: &mut Value| -> Result<(), ()> {
            v["n"] = 2.into();
            Ok(())
        };
        assert!(c.edit_unshared("pool", "p1", &indexer, bump).is_none());
        assert_eq!(held.value["n"], 1);
        drop(held);
        // Nobody does: edited where it lies, and found under its new name.
        let edit = |v: &mut Value| -> Result<(), ()> {
            v["n"] = 3.into();
            v["name"] = "b".into();
            Ok(())
        };
        assert_eq!(c.edit_unshared("pool", "p1", &indexer, edit), Some(Ok(())));
        assert!(c.generation() > before, "a change moves the generation");
        assert_eq!(c.get("pool", "p1").unwrap().value["n"], 3);
        assert!(c.find_by_name("pool", "t", "a").is_none());
        assert_eq!(c.find_by_name("pool", "t", "b").unwrap().uuid, "p1");
        assert!(c.edit_unshared("pool", "nope", &indexer, |_| Ok::<_, ()>(())).is_none());
    }

    #[test]
    fn indexes_follow_puts_renames_and_deletes() {
        let mut c = Catalogue::default();
        c.apply(&stored("pool", "p1", "a", &[]));
        c.apply(&stored("virtualservice", "v1", "vs", &["/api/pool/p1"]));
        assert_eq!(c.find_by_name("pool", "t", "a").unwrap().uuid, "p1");
        assert_eq!(c.referrers("/api/pool/p1").collect::<Vec<_>>(), ["/api/virtualservice/v1"]);
        c.apply(&stored("pool", "p1", "b", &[]));
        assert!(c.find_by_name("pool", "t", "a").is_none());
        assert!(c.find_by_name("pool", "t", "b").is_some());
        c.apply(&stored("virtualservice", "v1", "vs", &[]));
        assert_eq!(c.referrers("/api/pool/p1").count(), 0);
        c.apply(&Change::Delete { kind: "pool".into(), uuid: "p1".into() });
        assert!(c.get("pool", "p1").is_none() && c.find_by_name("pool", "t", "b").is_none());
        assert_eq!(c.count("pool"), 0);
    }
}

/// How far a catalogue fed from the backend (etcd's watch) has got: the revision of the last
/// commit it applied. The writer waits on it before answering, readers before a consistent read.
#[derive(Debug, Default)]
pub struct Applied {
    revision: std::sync::Mutex<i64>,
    changed: std::sync::Condvar,
    notify: tokio::sync::Notify,
}

impl Applied {
    pub fn current(&self) -> i64 {
        *self.revision.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn advance(&self, revision: i64) {
        let mut current = self.revision.lock().unwrap_or_else(|e| e.into_inner());
        if revision > *current {
            *current = revision;
            self.changed.notify_all();
            self.notify.notify_waiters();
        }
    }

    /// Blocks (a thread, not a task) until `revision` is applied or `timeout` passes.
    pub fn wait_blocking(&self, revision: i64, timeout: std::time::Duration) -> bool {
        let current = self.revision.lock().unwrap_or_else(|e| e.into_inner());
        let (current, _) =
            self.changed.wait_timeout_while(current, timeout, |c| *c < revision).unwrap_or_else(|e| e.into_inner());
        *current >= revision
    }

    /// Waits until `revision` is applied.
    pub async fn wait(&self, revision: i64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.current() >= revision {
                return;
            }
            notified.await;
        }
    }
}
