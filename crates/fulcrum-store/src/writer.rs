//! The single committer: every change goes through one round at a time, which group-commits.
//!
//! A write is a closure run against a [`Txn`]: a view of the catalogue plus the changes already
//! accepted into the current batch. A round runs every pending closure, commits all accepted
//! changes in one backend transaction (one fsync), applies them to the catalogue, and only then
//! answers the callers. A write that finds nothing running or queued (and a last round that had
//! no company) runs its round on its own thread; otherwise it queues, and the writer thread
//! takes what is queued as the next batch.
//! So checks (unique names, existing references) are serialised with the commit, throughput
//! grows with the number of concurrent writers, and readers never see a change that is not yet
//! durable.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fulcrum_metrics::{Histogram, LATENCY_BUCKETS, SIZE_BUCKETS};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::StoreError;
use crate::backend::Backend;
use crate::catalogue::{Catalogue, Change, Indexer, Meta, Stored};

/// At most this many writes share one commit.
const MAX_BATCH: usize = 4096;

pub static COMMIT_SECONDS: Histogram =
    Histogram::new("fulcrum_store_commit_seconds", "Time of one durable commit (fsync included).", "", LATENCY_BUCKETS);
pub static COMMIT_BATCH_SIZE: Histogram =
    Histogram::new("fulcrum_store_commit_batch_size", "Writes group-committed in one transaction.", "", SIZE_BUCKETS);

/// Why a write did not happen.
#[derive(Debug)]
pub enum WriteError<E> {
    /// The closure refused it; nothing was changed.
    Rejected(E),
    /// It was accepted but could not be made durable; nothing was changed.
    Storage(StoreError),
}

type Finisher = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&mut Txn<'_>) -> (bool, Finisher) + Send>;

/// What the caller keeps next to an object it edits in place, for the length of a batch (the
/// API keeps the indexes of a pool's server list there), opaque to the store. It describes the
/// object as the edits that kept it left it; anything else that writes the object drops it.
pub type Scratch = Option<Box<dyn std::any::Any + Send>>;

/// An object's pending state in an overlay.
struct Pending {
    /// `None`: deleted.
    stored: Option<Arc<Stored>>,
    /// The edit log from the committed object to `stored`, while the change is only edits;
    /// `None` once anything wrote the object whole (or deleted it).
    edits: Option<Vec<Value>>,
    scratch: Scratch,
}

impl Pending {
    fn new(stored: Option<Arc<Stored>>, edits: Option<Vec<Value>>) -> Pending {
        Pending { stored, edits, scratch: None }
    }

    /// `later` happened after `self`.
    fn then(&mut self, later: Pending) {
        self.edits = match (self.edits.take(), later.edits) {
            (Some(mut mine), Some(theirs)) => {
                mine.extend(theirs);
                Some(mine)
            }
            _ => None,
        };
        self.stored = later.stored;
        self.scratch = later.scratch;
    }

    fn into_change(self, kind: String, uuid: String) -> (Change, Scratch) {
        let change = match (self.stored, self.edits) {
            (Some(stored), Some(edits)) => Change::Edit { stored, edits: Arc::new(edits) },
            (Some(stored), None) => Change::Put(stored),
            (None, _) => Change::Delete { kind, uuid },
        };
        (change, self.scratch)
    }
}

/// What an in-place edit leaves with an object past its commit, for the next batch's first edit
/// of it. Only the last round's are kept, and none for a fed catalogue (the feed, not this
/// round, makes its versions).
type Carried = HashMap<(String, String), Kept>;

struct Kept {
    /// The committed version this describes (the address names it: the weak reference keeps it
    /// from being reused).
    of: std::sync::Weak<Stored>,
    /// The edit's scratch: it describes that version, and so a copy of it (a copy keeps the
    /// order of lists), which then need not rebuild it.
    scratch: Scratch,
    /// A copy of that version to edit: the version the commit replaced, brought up to date by
    /// replaying the commit's edit log. The next batch then starts editing a 5,000-server pool
    /// in O(change), instead of copying it whole and freeing the version before.
    spare: Option<Value>,
}

#[derive(Default)]
struct Overlay {
    objects: HashMap<(String, String), Pending>,
    /// (kind, tenant, name) → uuid, for objects written in this overlay.
    names: HashMap<(String, String, String), String>,
}

impl Overlay {
    fn absorb(&mut self, other: Overlay) {
        for (key, pending) in other.objects {
            match self.objects.get_mut(&key) {
                Some(mine) => mine.then(pending),
                None => {
                    self.objects.insert(key, pending);
                }
            }
        }
        self.names.extend(other.names);
    }

    fn record(&mut self, kind: &str, uuid: &str, pending: Pending) {
        let key = (kind.to_string(), uuid.to_string());
        match self.objects.get_mut(&key) {
            Some(mine) => mine.then(pending),
            None => {
                self.objects.insert(key, pending);
            }
        }
    }
}

/// A write's view: committed state, plus the batch so far, plus this write's own changes.
pub struct Txn<'a> {
    base: &'a Catalogue,
    batch: &'a mut Overlay,
    carried: &'a mut Carried,
    current: Overlay,
    indexer: &'a Indexer,
    clock: &'a mut u64,
    /// Set once an edit took an object out of the batch to change it in place: if this write
    /// then panics, the batch can no longer be trusted and is refused whole.
    borrowed_from_batch: bool,
}

/// Where the state an in-place edit starts from came from.
enum Origin {
    /// This write's own earlier change (with its edit log, if it is only edits).
    Current(Option<Vec<Value>>),
    /// An earlier write of the batch.
    Batch,
    /// Committed state (copied: readers may hold it).
    Base,
}

impl Txn<'_> {
    pub fn get(&self, kind: &str, uuid: &str) -> Option<Arc<Stored>> {
        if self.current.objects.is_empty() && self.batch.objects.is_empty() {
            return self.base.get(kind, uuid).cloned();
        }
        let key = (kind.to_string(), uuid.to_string());
        if let Some(entry) = self.current.objects.get(&key).or_else(|| self.batch.objects.get(&key)) {
            return entry.stored.clone();
        }
        self.base.get(kind, uuid).cloned()
    }

    pub fn get_path(&self, path: &str) -> Option<Arc<Stored>> {
        let (kind, uuid) = path.strip_prefix("/api/")?.split_once('/')?;
        self.get(kind, uuid)
    }

    pub fn find_by_name(&self, kind: &str, tenant: &str, name: &str) -> Option<Arc<Stored>> {
        let key = (kind.to_string(), tenant.to_string(), name.to_string());
        let candidates = [
            self.current.names.get(&key).cloned(),
            self.batch.names.get(&key).cloned(),
            self.base.find_by_name(kind, tenant, name).map(|s| s.uuid.clone()),
        ];
        // An index entry may be stale (renamed or deleted later in the batch): confirm it.
        candidates.into_iter().flatten().find_map(|uuid| {
            self.get(kind, &uuid).filter(|s| s.meta.tenant == tenant && s.meta.name.as_deref() == Some(name))
        })
    }

    /// Paths of the objects that currently refer to `target`.
    pub fn referrers(&self, target: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .base
            .referrers(target)
            .filter(|path| self.get_path(path).is_some_and(|s| s.meta.refs.iter().any(|r| r == target)))
            .cloned()
            .collect();
        for entry in self.batch.objects.values().chain(self.current.objects.values()).filter_map(|p| p.stored.as_ref())
        {
            let path = entry.path();
            if entry.meta.refs.iter().any(|r| r == target)
                && !out.contains(&path)
                && self.get(&entry.kind, &entry.uuid).is_some_and(|s| Arc::ptr_eq(&s, entry))
            {
                out.push(path);
            }
        }
        out
    }

    /// Every object of a type as this write sees it.
    pub fn list(&self, kind: &str) -> Vec<Arc<Stored>> {
        let mut seen: HashMap<String, Arc<Stored>> =
            self.base.iter(kind).map(|s| (s.uuid.clone(), s.clone())).collect();
        for overlay in [self.batch, &self.current] {
            for ((k, uuid), entry) in &overlay.objects {
                if k == kind {
                    match &entry.stored {
                        Some(s) => seen.insert(uuid.clone(), s.clone()),
                        None => seen.remove(uuid),
                    };
                }
            }
        }
        seen.into_values().collect()
    }

    /// Stores `value` as object `kind/uuid` (create or replace).
    pub fn put(&mut self, kind: &str, uuid: &str, value: Value) -> Arc<Stored> {
        self.write(kind, uuid, value, None)
    }

    /// Stores `value` as the new state of an existing object, with the edit log (JSON Patch
    /// operations) that turns the current state into it, so the backend can store the log
    /// instead of the whole object.
    pub fn edit(&mut self, kind: &str, uuid: &str, value: Value, edits: Vec<Value>) -> Arc<Stored> {
        self.write(kind, uuid, value, Some(edits))
    }

    /// Edits an existing object in place: `f` gets this transaction (for lookups) and the
    /// object's body, changes it and returns the edit log (`None`: store the object whole), or
    /// refuses after restoring the body exactly. Repeated edits of one object within a batch share one copy of it (copied from
    /// committed state once), so their cost follows the size of the change. `None` when the
    /// object does not exist.
    pub fn edit_with<T, E>(
        &mut self,
        kind: &str,
        uuid: &str,
        f: impl FnOnce(&Txn<'_>, &mut Value) -> Result<(Option<Vec<Value>>, T), E>,
    ) -> Option<Result<T, E>> {
        self.edit_with_scratch(kind, uuid, |txn, value, _| f(txn, value).map(|(edits, t)| (edits, t, false)))
    }

    /// [`Txn::edit_with`], with the [`Scratch`] the batch's earlier edits of the object kept
    /// (empty for its first edit in the batch). A refused edit loses it. `f` also says whether
    /// the edit left the object's index entry ([`Meta`]: name, tenant, references) as it was,
    /// so that a small edit of a big object does not walk all of it to index it again.
    pub fn edit_with_scratch<T, E>(
        &mut self,
        kind: &str,
        uuid: &str,
        f: impl FnOnce(&Txn<'_>, &mut Value, &mut Scratch) -> Result<(Option<Vec<Value>>, T, bool), E>,
    ) -> Option<Result<T, E>> {
        let key = (kind.to_string(), uuid.to_string());
        let unwrap = |arc: Arc<Stored>| match Arc::try_unwrap(arc) {
            Ok(stored) => (stored.value, stored.meta),
            Err(shared) => (shared.value.clone(), shared.meta.clone()),
        };
        let (mut value, old_meta, origin, mut scratch) = if let Some(mut pending) = self.current.objects.remove(&key) {
            let Some(stored) = pending.stored.take() else {
                self.current.objects.insert(key, pending);
                return None;
            };
            let (value, meta) = unwrap(stored);
            (value, meta, Origin::Current(pending.edits), pending.scratch)
        } else if let Some(pending) = self.batch.objects.get_mut(&key) {
            let stored = pending.stored.take()?;
            self.borrowed_from_batch = true;
            let (value, meta) = unwrap(stored);
            (value, meta, Origin::Batch, pending.scratch.take())
        } else {
            let stored = self.base.get(kind, uuid)?;
            // The scratch and the spare copy kept from the commit that made this version (the
            // address names it: the weak reference keeps it from being reused).
            let (scratch, spare) = match self.carried.remove(&key) {
                Some(kept) if std::ptr::eq(kept.of.as_ptr(), Arc::as_ptr(stored)) => (kept.scratch, kept.spare),
                _ => (None, None),
            };
            let value = spare.unwrap_or_else(|| stored.value.clone());
            (value, stored.meta.clone(), Origin::Base, scratch)
        };
        let outcome = f(self, &mut value, &mut scratch);
        let rebuild = |value: Value, meta: Meta| Arc::new(Stored { kind: kind.into(), uuid: uuid.into(), value, meta });
        match outcome {
            Ok((edits, result, same_meta)) => {
                let meta = if same_meta { old_meta } else { (self.indexer)(kind, &value) };
                debug_assert!(
                    !same_meta || meta == (self.indexer)(kind, &value),
                    "an edit said it left {kind} {uuid}'s index entry as it was, and did not"
                );
                if let Some(name) = &meta.name {
                    self.current.names.insert((kind.into(), meta.tenant.clone(), name.clone()), uuid.into());
                }
                let edits = match (origin, edits) {
                    (Origin::Current(Some(mut earlier)), Some(edits)) => {
                        earlier.extend(edits);
                        Some(earlier)
                    }
                    (Origin::Current(_), _) | (_, None) => None,
                    (Origin::Batch | Origin::Base, Some(edits)) => Some(edits),
                };
                self.current.objects.insert(key, Pending { stored: Some(rebuild(value, meta)), edits, scratch });
                Some(Ok(result))
            }
            Err(e) => {
                // `f` restored the body, so the old index entry still describes it.
                match origin {
                    Origin::Current(edits) => {
                        self.current.objects.insert(key, Pending::new(Some(rebuild(value, old_meta)), edits));
                    }
                    Origin::Batch => {
                        if let Some(pending) = self.batch.objects.get_mut(&key) {
                            pending.stored = Some(rebuild(value, old_meta));
                        }
                    }
                    Origin::Base => {}
                }
                Some(Err(e))
            }
        }
    }

    fn write(&mut self, kind: &str, uuid: &str, value: Value, edits: Option<Vec<Value>>) -> Arc<Stored> {
        let meta = (self.indexer)(kind, &value);
        let stored = Arc::new(Stored { kind: kind.into(), uuid: uuid.into(), value, meta });
        if let Some(name) = &stored.meta.name {
            self.current.names.insert((kind.into(), stored.meta.tenant.clone(), name.clone()), uuid.into());
        }
        self.current.record(kind, uuid, Pending::new(Some(stored.clone()), edits));
        stored
    }

    pub fn delete(&mut self, kind: &str, uuid: &str) {
        self.current.record(kind, uuid, Pending::new(None, None));
    }

    /// Microseconds since the epoch, strictly increasing across writes: the `_last_modified`
    /// of what this write stores.
    pub fn timestamp_micros(&mut self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        *self.clock = now.max(*self.clock + 1);
        *self.clock
    }
}

/// The catalogue plus the one committer at a time that changes it.
pub struct Store {
    catalogue: Arc<RwLock<Catalogue>>,
    shared: Arc<Shared>,
    /// Whether a write may commit on its caller's thread when nothing else is committing or
    /// waiting (see [`Backend::commits_on_any_thread`]).
    inline: bool,
    health: Arc<std::sync::Mutex<Health>>,
    /// Set when the backend feeds the catalogue (etcd): how far it has got.
    applied: Option<Arc<crate::catalogue::Applied>>,
}

/// What the store's callers and its writer thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer thread when a job is queued while nobody commits.
    queued: Condvar,
    /// Locked only by whoever set `Queue::busy`, so never contended.
    committer: Mutex<Committer>,
}

/// The writes waiting for a round, and whether one is running.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Someone (the writer thread or an inline caller) is running a round.
    busy: bool,
    /// A write queued behind the round now running.
    queued_while_busy: bool,
    /// The last round had company (it took more than one write, or writes waited behind it):
    /// under such load writes go to the writer thread, so that batches stay whole and tokio
    /// workers keep serving requests.
    contended: bool,
    /// The store was dropped: the writer thread ends once the queue is empty.
    closed: bool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a round starting with `first` (the caller set `busy`); returns whether jobs were
    /// queued meanwhile that it had no room for.
    fn round(&self, first: Job) -> bool {
        // A panic outside the writes' own closures (the backend's, say) must not leave the
        // store busy for ever: the round's callers see `Aborted` (their answers are dropped)
        // and the next round starts afresh.
        let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.committer.lock().unwrap_or_else(|e| e.into_inner()).round(first, || self.queue().jobs.pop_front())
        }))
        .unwrap_or_else(|_| {
            tracing::error!("a commit round panicked; its writes were refused");
            0
        });
        let mut queue = self.queue();
        queue.busy = false;
        queue.contended = std::mem::take(&mut queue.queued_while_busy) || taken > 1;
        !queue.jobs.is_empty()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.queued.notify_one();
    }
}

/// Whether the last commit succeeded; if not, since when commits fail and why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    pub failing_since: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Commits that failed since the store was opened.
    pub failed_commits: u64,
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.failing_since.is_none()
    }

    fn record(&mut self, outcome: &Result<(), StoreError>) {
        match outcome {
            Ok(()) => {
                if let Some(since) = self.failing_since.take() {
                    tracing::info!(failing_for = ?since.elapsed().unwrap_or_default(), "the store commits again");
                }
                self.last_error = None;
            }
            Err(e) => {
                self.failed_commits += 1;
                self.failing_since.get_or_insert_with(SystemTime::now);
                self.last_error = Some(e.to_string());
            }
        }
    }
}

impl Store {
    /// Loads every object from `backend` and starts the writer.
    pub fn open(mut backend: impl Backend, indexer: Indexer) -> Result<Store, StoreError> {
        let mut catalogue = Catalogue::default();
        let mut clock = 0u64;
        for (kind, uuid, value) in backend.load()? {
            let meta = indexer(&kind, &value);
            if let Some(ts) = value.get("_last_modified").and_then(Value::as_str).and_then(|s| s.parse::<u64>().ok()) {
                clock = clock.max(ts);
            }
            catalogue.apply(&Change::Put(Arc::new(Stored { kind, uuid, value, meta })));
        }
        let catalogue = Arc::new(RwLock::new(catalogue));
        let applied = backend.start_feed(catalogue.clone(), indexer.clone());
        let health = Arc::new(std::sync::Mutex::new(Health::default()));
        let inline = backend.commits_on_any_thread();
        // A batch takes more writes only while it holds under half what the backend can commit
        // at once, so that the write taken last still fits.
        let fill_to = (backend.max_changes_per_commit() / 2).max(1);
        let committer = Committer {
            backend: Box::new(backend),
            catalogue: catalogue.clone(),
            indexer,
            clock,
            health: health.clone(),
            fed: applied.clone(),
            reclaim: reclaimer(),
            fill_to,
            carried: Carried::new(),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            committer: Mutex::new(committer),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("fulcrum-writer".into())
            .spawn(move || run_writer(&writer))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Store { catalogue, shared, inline, health, applied })
    }

    /// For a fed catalogue (etcd): how far it has got, to wait for a revision before a read.
    pub fn applied(&self) -> Option<&Arc<crate::catalogue::Applied>> {
        self.applied.as_ref()
    }

    /// Whether commits succeed (for health pages and metrics).
    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A consistent view of committed state. Do not hold it across an `.await`, and do not
    /// take a second one while holding it (debug builds panic): std's `RwLock` makes new
    /// readers wait behind a waiting writer, so the second read would wait for the writer,
    /// which waits for the first.
    pub fn read(&self) -> CatalogueView<'_> {
        VIEWS_HELD.with(|held| {
            debug_assert_eq!(held.get(), 0, "this thread already holds a view of the catalogue: use that one");
            held.set(held.get() + 1);
        });
        CatalogueView { guard: self.catalogue.read().unwrap_or_else(|e| e.into_inner()) }
    }

    /// Runs `f` in a commit round; its changes are durable and visible when this returns `Ok`.
    pub async fn write<R, E>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R, E> + Send + 'static,
    ) -> Result<R, WriteError<E>>
    where
        R: Send + 'static,
        E: Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, WriteError<E>>>();
        let job: Job = Box::new(move |txn| match f(txn) {
            Ok(value) => {
                let finish: Finisher = Box::new(move |outcome| {
                    let _ = tx.send(match outcome {
                        Ok(()) => Ok(value),
                        Err(e) => Err(WriteError::Storage(e.clone())),
                    });
                });
                (true, finish)
            }
            Err(e) => {
                let _ = tx.send(Err(WriteError::Rejected(e)));
                (false, Box::new(|_| {}))
            }
        });
        self.submit(job).map_err(WriteError::Storage)?;
        rx.await.map_err(|_| WriteError::Storage(StoreError::Aborted))?
    }

    /// Runs `job` here when nothing else commits or waits (and nothing waited behind the last
    /// round), or queues it for the writer thread.
    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let mut queue = self.shared.queue();
        if queue.closed {
            return Err(StoreError::Closed);
        }
        if self.inline && !queue.busy && queue.jobs.is_empty() && !queue.contended {
            // Nothing to group with: commit here rather than wake the writer thread and be
            // woken back, two hand-offs that cost a lone client more than its fsync. The
            // worker blocks for one commit, as the writer thread would have.
            queue.busy = true;
            drop(queue);
            debug_assert_eq!(VIEWS_HELD.with(|held| held.get()), 0, "a write while holding a view of the catalogue");
            if self.shared.round(job) {
                // What was queued meanwhile is the writer thread's.
                self.shared.queued.notify_one();
            }
        } else {
            queue.jobs.push_back(job);
            queue.queued_while_busy |= queue.busy;
            let idle = !queue.busy;
            drop(queue);
            if idle {
                self.shared.queued.notify_one();
            }
        }
        Ok(())
    }
}

thread_local! {
    /// Views of the catalogue this thread holds (see [`Store::read`]).
    static VIEWS_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A read of the committed catalogue, from [`Store::read`].
pub struct CatalogueView<'a> {
    guard: RwLockReadGuard<'a, Catalogue>,
}

impl std::ops::Deref for CatalogueView<'_> {
    type Target = Catalogue;

    fn deref(&self) -> &Catalogue {
        &self.guard
    }
}

impl Drop for CatalogueView<'_> {
    fn drop(&mut self) {
        VIEWS_HELD.with(|held| held.set(held.get().saturating_sub(1)));
    }
}

/// What the writer no longer needs: replaced versions, unused spare copies.
pub(crate) type Garbage = Vec<Box<dyn Send>>;

/// Frees what the writer hands it.
pub(crate) fn reclaimer() -> mpsc::Sender<Garbage> {
    let (tx, rx) = mpsc::channel::<Garbage>();
    let spawned =
        std::thread::Builder::new().name("fulcrum-reclaim".into()).spawn(move || rx.into_iter().for_each(drop));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no reclaim thread; the writer frees old versions itself");
    }
    tx
}

/// The writer thread: runs a round whenever jobs wait and nobody else is committing.
fn run_writer(shared: &Shared) {
    loop {
        let first = {
            let mut queue = shared.queue();
            loop {
                if !queue.busy {
                    if let Some(job) = queue.jobs.pop_front() {
                        queue.busy = true;
                        break job;
                    }
                    if queue.closed {
                        return;
                    }
                }
                queue = shared.queued.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
        };
        // Whatever was queued meanwhile is taken at the top of the loop.
        shared.round(first);
    }
}

/// What commits: owned by whoever runs the current round.
struct Committer {
    backend: Box<dyn Backend>,
    catalogue: Arc<RwLock<Catalogue>>,
    indexer: Indexer,
    clock: u64,
    health: Arc<std::sync::Mutex<Health>>,
    fed: Option<Arc<crate::catalogue::Applied>>,
    reclaim: mpsc::Sender<Garbage>,
    fill_to: usize,
    carried: Carried,
}

impl Committer {
    /// Runs `first` and, while the batch has room, the jobs `more` gives; commits what they
    /// accepted in one backend transaction, applies it to the catalogue, then answers each.
    /// Returns how many jobs it ran.
    fn round(&mut self, first: Job, mut more: impl FnMut() -> Option<Job>) -> usize {
        let Committer { backend, catalogue, indexer, clock, health, fed, reclaim, fill_to, carried } = self;
        let fill_to = *fill_to;
        let mut batch = Overlay::default();
        let mut finishers = Vec::new();
        let mut poisoned = false;
        let mut taken = 0usize;
        {
            let base = catalogue.read().unwrap_or_else(|e| e.into_inner());
            let mut next = Some(first);
            while let Some(job) = next.take() {
                taken += 1;
                let mut txn = Txn {
                    base: &base,
                    batch: &mut batch,
                    carried,
                    current: Overlay::default(),
                    indexer,
                    clock,
                    borrowed_from_batch: false,
                };
                // A write that panics is refused alone (its caller sees `Aborted`); the writer
                // and the rest of the batch carry on.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut txn))) {
                    Ok((accepted, finish)) => {
                        let current = std::mem::take(&mut txn.current);
                        drop(txn);
                        if accepted {
                            batch.absorb(current);
                        }
                        finishers.push(finish);
                    }
                    Err(_) if txn.borrowed_from_batch => {
                        tracing::error!(
                            "a write panicked while editing the batch in place; the whole batch is refused"
                        );
                        poisoned = true;
                        break;
                    }
                    Err(_) => tracing::error!("a write panicked; it was refused and nothing of it was stored"),
                }
                if taken < MAX_BATCH && batch.objects.len() < fill_to {
                    next = more();
                }
            }
        }
        let outcome = if poisoned {
            Err(StoreError::Aborted)
        } else if batch.objects.is_empty() {
            Ok(())
        } else {
            let (changes, scratches): (Vec<Change>, Vec<Scratch>) =
                batch.objects.into_iter().map(|((kind, uuid), pending)| pending.into_change(kind, uuid)).unzip();
            let started = Instant::now();
            let outcome = backend.commit(&changes);
            COMMIT_SECONDS.observe("", started.elapsed().as_secs_f64());
            COMMIT_BATCH_SIZE.observe("", finishers.len() as f64);
            match &outcome {
                Ok(()) if fed.is_some() => {
                    // The feed applies the commit (with everyone else's, in order); answering
                    // after it did keeps "visible once acknowledged", and the next batch's
                    // checks see this one.
                    let revision = backend.last_commit_revision();
                    let feed = fed.as_ref().expect("checked");
                    if !feed.wait_blocking(revision, std::time::Duration::from_secs(30)) {
                        tracing::error!(revision, "the catalogue feed has not applied a commit after 30 s");
                    }
                    // The feed made its own copies: this batch's are freed off the writer's path.
                    let written = changes
                        .iter()
                        .filter_map(|c| match c {
                            Change::Put(stored) | Change::Edit { stored, .. } => {
                                Some(Box::new(stored.clone()) as Box<dyn Send>)
                            }
                            Change::Delete { .. } => None,
                        })
                        .collect();
                    let _ = reclaim.send(written);
                }
                Ok(()) => {
                    let mut garbage: Garbage = Vec::new();
                    // The version an in-place edit replaced becomes the next batch's copy, if
                    // nobody else holds it (one per change, in order).
                    let replaced: Vec<Option<Value>> = {
                        let mut cat = catalogue.write().unwrap_or_else(|e| e.into_inner());
                        let mut spare_of = |change: &Change, scratch: &Scratch| match (change, cat.apply(change)) {
                            (Change::Edit { .. }, Some(old)) if scratch.is_some() => match Arc::try_unwrap(old) {
                                Ok(old) => Some(old.value),
                                Err(shared) => {
                                    garbage.push(Box::new(shared));
                                    None
                                }
                            },
                            (_, old) => {
                                garbage.extend(old.map(|old| Box::new(old) as Box<dyn Send>));
                                None
                            }
                        };
                        changes.iter().zip(&scratches).map(|(change, scratch)| spare_of(change, scratch)).collect()
                    };
                    let kept = changes.iter().zip(scratches).zip(replaced).filter_map(|((change, scratch), old)| {
                        let (Change::Edit { stored, edits }, Some(scratch)) = (change, scratch) else { return None };
                        let key = (stored.kind.clone(), stored.uuid.clone());
                        let spare = old.and_then(|mut spare| {
                            let replayed = fulcrum_jsonpatch::apply_all(&mut spare, edits).is_ok();
                            debug_assert!(replayed && spare == stored.value, "the spare copy replays to {key:?}");
                            if replayed {
                                Some(spare)
                            } else {
                                garbage.push(Box::new(spare));
                                None
                            }
                        });
                        Some((key, Kept { of: Arc::downgrade(stored), scratch: Some(scratch), spare }))
                    });
                    let before = std::mem::replace(carried, kept.collect());
                    garbage.extend(before.into_values().filter_map(|k| k.spare).map(|v| Box::new(v) as _));
                    // Old versions (possibly large, possibly many) are freed by another thread,
                    // off the writer's path (waking it only when there is something to free).
                    if !garbage.is_empty() {
                        let _ = reclaim.send(garbage);
                    }
                }
                Err(e) => tracing::error!(error = %e, "commit failed; the batch is refused"),
            }
            outcome
        };
        if !matches!(outcome, Err(StoreError::Aborted)) {
            health.lock().unwrap_or_else(|e| e.into_inner()).record(&outcome);
        }
        for finish in finishers {
            finish(&outcome);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::catalogue::Meta;
    use crate::lsm::FjallBackend;
    use serde_json::json;

    fn indexer() -> Indexer {
        Arc::new(|_kind: &str, v: &Value| Meta {
            tenant: "t".into(),
            name: v.get("name").and_then(Value::as_str).map(String::from),
            refs: v.get("ref").and_then(Value::as_str).map(|r| vec![r.to_string()]).unwrap_or_default(),
        })
    }

    fn create(
        store: &Store,
        uuid: &'static str,
        name: &'static str,
    ) -> impl Future<Output = Result<(), WriteError<String>>> {
        store.write(move |txn| {
            if txn.find_by_name("pool", "t", name).is_some() {
                return Err(format!("{name} exists"));
            }
            txn.put("pool", uuid, json!({"name": name}));
            Ok(())
        })
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "already holds a view")]
    fn a_second_view_held_by_the_same_thread_is_refused() {
        // With a writer waiting between the two, the second would wait forever.
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        let _first = store.read();
        let _second = store.read();
    }

    #[test]
    fn a_view_is_given_back_when_dropped() {
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        for _ in 0..3 {
            assert_eq!(store.read().count("pool"), 0);
        }
        let view = store.read();
        drop(view);
        let _again = store.read();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_writers_see_each_other_within_a_batch() {
        let store = Arc::new(Store::open(MemoryBackend::default(), indexer()).unwrap());
        let (a, b) = tokio::join!(create(&store, "p1", "same"), create(&store, "p2", "same"));
        assert!(a.is_ok() != b.is_ok(), "exactly one of two same-named creates wins");
        assert_eq!(store.read().count("pool"), 1);
    }

    /// Fails its commits while `failing` is set, as a full disk does.
    struct Flaky {
        inner: MemoryBackend,
        failing: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Backend for Flaky {
        fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
            self.inner.load()
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Io("No space left on device (os error 28)".into()));
            }
            self.inner.commit(changes)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn health_shows_failing_commits_until_one_succeeds() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store =
            Store::open(Flaky { inner: MemoryBackend::default(), failing: failing.clone() }, indexer()).unwrap();
        create(&store, "p1", "a").await.unwrap();
        assert!(store.health().is_healthy());
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(create(&store, "p2", "b").await, Err(WriteError::Storage(_))));
        assert!(store.read().get("pool", "p2").is_none(), "a failed commit is not visible");
        let health = store.health();
        assert!(!health.is_healthy() && health.last_error.unwrap().contains("No space"));
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        create(&store, "p2", "b").await.unwrap();
        let health = store.health();
        assert!(health.is_healthy());
        assert_eq!(health.failed_commits, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rejected_writes_change_nothing_and_referrers_follow_the_batch() {
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        create(&store, "p1", "a").await.unwrap();
        let r = store
            .write(|txn| -> Result<(), &str> {
                txn.put("pool", "p2", json!({"name": "b"}));
                Err("no")
            })
            .await;
        assert!(matches!(r, Err(WriteError::Rejected("no"))));
        assert!(store.read().get("pool", "p2").is_none());
        let refs = store
            .write(|txn| -> Result<Vec<String>, ()> {
                txn.put("vs", "v1", json!({"name": "v", "ref": "/api/pool/p1"}));
                let during = txn.referrers("/api/pool/p1");
                txn.delete("vs", "v1");
                Ok([during, txn.referrers("/api/pool/p1")].concat())
            })
            .await
            .unwrap();
        assert_eq!(refs, ["/api/vs/v1"]);
    }

    /// Records what reaches the backend.
    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<Vec<Change>>>>);

    impl Backend for Recorder {
        fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
            Ok(vec![])
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(changes.to_vec());
            Ok(())
        }
        fn commits_on_any_thread(&self) -> bool {
            // Through the writer thread, writes that arrive together share a commit even on
            // a single-threaded runtime, which is what these tests look at.
            false
        }
    }

    /// Commits at most four changes at once, as a backend with a transaction limit does.
    #[derive(Default, Clone)]
    struct Small(Arc<std::sync::Mutex<Vec<usize>>>);

    impl Backend for Small {
        fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
            Ok(vec![])
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            if changes.len() > 4 {
                return Err(StoreError::Io(format!("{} changes in one commit", changes.len())));
            }
            self.0.lock().unwrap().push(changes.len());
            Ok(())
        }
        fn max_changes_per_commit(&self) -> usize {
            4
        }
        fn commits_on_any_thread(&self) -> bool {
            false
        }
    }

    /// The committing thread's name and how many changes it committed.
    type CommitLog = Arc<std::sync::Mutex<Vec<(Option<String>, usize)>>>;

    /// Records which thread committed how many changes; its first commit waits for `gate`.
    #[derive(Clone)]
    struct Gated {
        commits: CommitLog,
        entered: std::sync::mpsc::SyncSender<()>,
        gate: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    impl Backend for Gated {
        fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
            Ok(vec![])
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            let first = self.commits.lock().unwrap().is_empty();
            if first {
                self.entered.send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap();
            }
            let thread = std::thread::current().name().map(String::from);
            self.commits.lock().unwrap().push((thread, changes.len()));
            Ok(())
        }
    }

    fn put_pool(store: &Store, i: usize) -> impl Future<Output = Result<(), WriteError<()>>> {
        store.write(move |txn| {
            txn.put("pool", &format!("p{i}"), json!({"name": format!("p{i}")}));
            Ok(())
        })
    }

    #[test]
    fn a_lone_write_commits_on_its_callers_thread_and_writes_meanwhile_are_grouped() {
        let (entered, entered_rx) = std::sync::mpsc::sync_channel(1);
        let (open_gate, gate) = std::sync::mpsc::channel();
        let log = CommitLog::default();
        let backend = Gated { commits: log.clone(), entered, gate: Arc::new(std::sync::Mutex::new(gate)) };
        let store = Arc::new(Store::open(backend, indexer()).unwrap());
        let runtime = || tokio::runtime::Builder::new_current_thread().build().unwrap();
        let write_from = |thread: &str, i: usize| {
            let store = store.clone();
            std::thread::Builder::new()
                .name(thread.into())
                .spawn(move || runtime().block_on(put_pool(&store, i)))
                .unwrap()
        };
        let lone = write_from("lone-caller", 0);
        entered_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the lone write reached the backend");
        // While that commit is held, ten more writes arrive; the gate opens once they wait.
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            open_gate.send(()).unwrap();
        });
        let outcomes = runtime().block_on(futures_join_all((1..=10).map(|i| put_pool(&store, i))));
        assert!(outcomes.iter().all(Result::is_ok));
        lone.join().unwrap().unwrap();
        opener.join().unwrap();
        let commits = log.lock().unwrap().clone();
        assert_eq!(commits[0], (Some("lone-caller".to_string()), 1), "{commits:?}");
        assert!(commits[1..].iter().all(|(thread, _)| thread.as_deref() == Some("fulcrum-writer")), "{commits:?}");
        assert_eq!(commits[1..].iter().map(|(_, n)| n).sum::<usize>(), 10);
        assert!(commits.len() - 1 < 10, "the writes that waited share commits: {commits:?}");
        // The round after a busy one goes through the writer thread; once a round had no
        // company, a lone write commits on its caller's thread again.
        write_from("later-caller", 11).join().unwrap().unwrap();
        // A round answers its writes before it marks the store idle: wait for that, so the next
        // write finds no round running.
        let idle_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.shared.queue().busy {
            assert!(std::time::Instant::now() < idle_by, "the writer thread's round did not end");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        write_from("last-caller", 12).join().unwrap().unwrap();
        let commits = log.lock().unwrap().clone();
        let tail: Vec<_> = commits.iter().rev().take(2).rev().cloned().collect();
        assert_eq!(
            tail,
            [(Some("fulcrum-writer".to_string()), 1), (Some("last-caller".to_string()), 1)],
            "{commits:?}"
        );
        assert_eq!(store.read().count("pool"), 13);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batches_stay_within_what_the_backend_commits_at_once() {
        let backend = Small::default();
        let store = Arc::new(Store::open(backend.clone(), indexer()).unwrap());
        let writes = (0..40).map(|i| {
            let store = store.clone();
            async move {
                store
                    .write(move |txn| -> Result<(), ()> {
                        txn.put("pool", &format!("p{i}"), json!({"name": format!("p{i}")}));
                        Ok(())
                    })
                    .await
            }
        });
        for outcome in futures_join_all(writes).await {
            outcome.unwrap();
        }
        assert_eq!(store.read().count("pool"), 40);
        let commits = backend.0.lock().unwrap().clone();
        assert!(commits.iter().all(|n| *n <= 4), "{commits:?}");
        assert!(commits.len() < 40, "writes are still grouped: {commits:?}");
    }

    /// Runs futures concurrently on this task (no futures crate needed).
    async fn futures_join_all<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
        let handles: Vec<_> = futures.map(|f| Box::pin(f)).collect();
        let mut out = Vec::new();
        let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
        let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut all = true;
            for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
                if let Some(f) = slot {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            *result = Some(v);
                            *slot = None;
                        }
                        std::task::Poll::Pending => all = false,
                    }
                }
            }
            if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
        })
        .await;
        out.extend(results.into_iter().map(|r| r.expect("every future finished")));
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn edits_to_one_object_in_a_batch_reach_the_backend_as_one_log() {
        let recorder = Recorder::default();
        let store = Store::open(recorder.clone(), indexer()).unwrap();
        create(&store, "p1", "a").await.unwrap();
        let edit = |n: i64| {
            store.write(move |txn| -> Result<(), ()> {
                let mut v = txn.get("pool", "p1").unwrap().value.clone();
                v["n"] = json!(n);
                txn.edit("pool", "p1", v, vec![json!({"op": "add", "path": "/n", "value": n})]);
                Ok(())
            })
        };
        // The writer is held by a first write until both edits are queued, so one batch takes both.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let hold = store.write(move |_txn| -> Result<(), ()> {
            held.recv_timeout(std::time::Duration::from_secs(10)).expect("released");
            Ok(())
        });
        let (h, a, b, ()) = tokio::join!(hold, edit(1), edit(2), async { release.send(()).unwrap() });
        h.unwrap();
        a.unwrap();
        b.unwrap();
        let commits = recorder.0.lock().unwrap().clone();
        let last = commits.last().unwrap();
        assert_eq!(last.len(), 1);
        match &last[0] {
            Change::Edit { stored, edits } => {
                assert_eq!(edits.len(), 2, "both edits, in order");
                assert_eq!(stored.value["n"], edits[1]["value"]);
            }
            other => panic!("expected an edit, got {other:?}"),
        }
        // A create and an edit in the same batch are one whole write.
        let both = store.write(|txn| -> Result<(), ()> {
            txn.put("pool", "p2", json!({"name": "b"}));
            txn.edit("pool", "p2", json!({"name": "b", "n": 1}), vec![]);
            Ok(())
        });
        both.await.unwrap();
        let commits = recorder.0.lock().unwrap().clone();
        assert!(matches!(&commits.last().unwrap()[0], Change::Put(s) if s.value["n"] == 1));
    }

    /// Sets `n` of `uuid` in place and leaves `n` as the scratch; returns the scratch it found,
    /// and where the copy it was given keeps its name (which copy it was).
    fn bump(
        store: &Store,
        uuid: &'static str,
        n: u32,
    ) -> impl Future<Output = Result<(Option<u32>, usize), WriteError<()>>> {
        store.write(move |txn| {
            txn.edit_with_scratch("pool", uuid, |_txn, value, scratch| {
                let found = scratch.take().and_then(|s| s.downcast::<u32>().ok()).map(|b| *b);
                let copy = value["name"].as_str().unwrap().as_ptr() as usize;
                value["n"] = json!(n);
                *scratch = Some(Box::new(n));
                Ok((Some(vec![json!({"op": "add", "path": "/n", "value": n})]), (found, copy), false))
            })
            .expect("the pool exists")
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_edits_scratch_is_kept_for_the_next_batch_until_something_else_writes() {
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        create(&store, "p1", "a").await.unwrap();
        create(&store, "p2", "b").await.unwrap();
        assert_eq!(bump(&store, "p1", 1).await.unwrap().0, None);
        assert_eq!(bump(&store, "p1", 2).await.unwrap().0, Some(1), "kept past the commit");
        // A whole write of the object drops it.
        store
            .write(|txn| -> Result<(), ()> {
                txn.put("pool", "p1", json!({"name": "a", "n": 10}));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(bump(&store, "p1", 3).await.unwrap().0, None);
        // Only the last round's are kept.
        assert_eq!(bump(&store, "p2", 1).await.unwrap().0, None);
        assert_eq!(bump(&store, "p1", 4).await.unwrap().0, None);
        assert_eq!(store.read().get("pool", "p1").unwrap().value["n"], 4);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_version_an_edit_replaced_is_brought_up_to_date_as_the_next_batchs_copy() {
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        store
            .write(|txn| -> Result<(), ()> {
                txn.put("pool", "p1", json!({"name": "a", "servers": [1, 2, 3]}));
                Ok(())
            })
            .await
            .unwrap();
        let copy = async |n| bump(&store, "p1", n).await.unwrap().1;
        let name_of =
            |store: &Store| store.read().get("pool", "p1").unwrap().value["name"].as_str().unwrap().as_ptr() as usize;
        let first = name_of(&store);
        let a = copy(1).await;
        assert_ne!(a, first, "the first edit copies");
        assert_eq!(copy(2).await, first, "the version edit 1 replaced");
        assert_eq!(copy(3).await, a, "the version edit 2 replaced");
        assert_eq!(store.read().get("pool", "p1").unwrap().value, json!({"name": "a", "servers": [1, 2, 3], "n": 3}));
        // A version somebody still holds when it is replaced is theirs: the edit after copies.
        let held = store.read().get("pool", "p1").cloned().unwrap();
        assert_eq!(copy(4).await, first);
        let fresh = copy(5).await;
        assert!(fresh != first && fresh != a, "a fresh copy");
        assert_eq!(held.value["n"], 3);
        assert_eq!(store.read().get("pool", "p1").unwrap().value["n"], 5);
        // A whole write in between: the copy kept describes a version no longer committed.
        store
            .write(|txn| -> Result<(), ()> {
                txn.put("pool", "p1", json!({"name": "a", "servers": [9], "n": 10}));
                Ok(())
            })
            .await
            .unwrap();
        let whole = name_of(&store);
        assert_ne!(copy(6).await, whole);
        assert_eq!(store.read().get("pool", "p1").unwrap().value, json!({"name": "a", "servers": [9], "n": 6}));
    }

    /// Panics in its first commit, as a bug in a backend would.
    #[derive(Default)]
    struct PanicsOnce {
        inner: MemoryBackend,
        panicked: bool,
    }

    impl Backend for PanicsOnce {
        fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
            self.inner.load()
        }
        fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            if !std::mem::replace(&mut self.panicked, true) {
                panic!("a bug in a backend");
            }
            self.inner.commit(changes)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_commit_refuses_its_round_and_the_store_carries_on() {
        let store = Store::open(PanicsOnce::default(), indexer()).unwrap();
        assert!(matches!(create(&store, "p1", "a").await, Err(WriteError::Storage(StoreError::Aborted))));
        assert!(store.read().get("pool", "p1").is_none());
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), create(&store, "p2", "b"));
        next.await.expect("the store was left busy").unwrap();
        assert!(store.read().get("pool", "p2").is_some());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_write_is_refused_alone() {
        let store = Store::open(MemoryBackend::default(), indexer()).unwrap();
        let boom = store.write(|txn| -> Result<(), ()> {
            txn.put("pool", "p9", json!({"name": "half"}));
            panic!("a bug in a write");
        });
        let (boom, fine) = tokio::join!(boom, create(&store, "p1", "a"));
        assert!(matches!(boom, Err(WriteError::Storage(StoreError::Aborted))));
        fine.unwrap();
        assert!(store.read().get("pool", "p9").is_none());
        create(&store, "p2", "b").await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = Store::open(FjallBackend::open(&path).unwrap(), indexer()).unwrap();
            create(&store, "p1", "a").await.unwrap();
            create(&store, "p2", "b").await.unwrap();
            store
                .write(|txn| -> Result<(), ()> {
                    txn.delete("pool", "p1");
                    Ok(())
                })
                .await
                .unwrap();
        }
        // The first store's writer thread holds the backend (and its lock) until it sees the
        // store closed.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let store = Store::open(FjallBackend::open(&path).unwrap(), indexer()).unwrap();
        let cat = store.read();
        assert!(cat.get("pool", "p1").is_none());
        assert_eq!(cat.find_by_name("pool", "t", "b").unwrap().uuid, "p2");
    }
}
