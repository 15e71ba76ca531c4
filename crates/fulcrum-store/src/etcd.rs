//! The store on etcd, for controllers that share one configuration: the same [`Backend`]
//! contract as the embedded store (a commit is durable when it returns, and all of it or none is stored),
//! with every commit fenced by the leader's election key.
//!
//! Layout under the prefix (default `/fulcrum/`):
//! - `o/<type>/<uuid>`: the object's last whole write — `J` and its JSON, or, for a body too big
//!   for one etcd value, `C` and a manifest naming its chunks;
//! - `c/<type>/<uuid>/<generation>/<index>`: the chunks of one whole write;
//! - `e/<type>/<uuid>/<sequence>`: JSON Patch edit logs since that write, as in the embedded store.
//!
//! No value approaches etcd's request limit (1.5 MiB by default): values are at most
//! [`CHUNK_BYTES`], and one transaction carries at most [`TXN_BUDGET_BYTES`]. A big body's chunks
//! are written first, under a fresh generation nobody refers to yet; the one transaction that
//! commits the batch then points the object at them. So a batch becomes visible whole or not at
//! all, and a PATCH to a pool of 5,000 servers writes its edit log, not the pool.
//!
//! Fencing: the commit transaction (and every chunk write) compares the election key's create
//! revision with the one this node won it at. A deposed, paused or partitioned leader's commit
//! fails in etcd itself, whatever that node believes.
//!
//! Every node's catalogue is fed by a watch of the prefix (the [`Feed`]), the leader's
//! included: the writer answers once the feed applied its commit, so a node's catalogue holds
//! only committed state, in etcd's order, whoever committed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, Txn, TxnOp, WatchOptions,
};
use serde_json::Value;

use crate::StoreError;
use crate::backend::Backend;
use crate::catalogue::{Change, Stored};

/// The largest value written: a chunk of a big body, an inline body, an edit log.
pub const CHUNK_BYTES: usize = 256 << 10;
/// What one transaction may carry, well under etcd's 1.5 MiB request limit.
pub const TXN_BUDGET_BYTES: usize = 1 << 20;
/// The etcd cluster must allow transactions of this many operations (`--max-txn-ops`; its
/// default, 128, is too few for group commit): a change takes at most three (its record, and the
/// removal of its old edit logs and chunks).
pub const REQUIRED_MAX_TXN_OPS: usize = 4096;
/// The most changes one commit carries.
pub const MAX_CHANGES_PER_COMMIT: usize = REQUIRED_MAX_TXN_OPS / 4;
/// How long one etcd request may take: without a quorum, a write is refused (503) this soon.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// The key every commit puts, under the prefix.
pub const REVISION_MARKER: &str = "rev";

/// The proof of leadership every commit carries: the election key and the create revision this
/// node won it at. Empty while this node is not the leader.
#[derive(Debug, Default)]
pub struct Fence {
    held: Mutex<Option<(Vec<u8>, i64)>>,
}

impl Fence {
    pub fn hold(&self, key: Vec<u8>, create_revision: i64) {
        *self.lock() = Some((key, create_revision));
    }

    pub fn release(&self) {
        *self.lock() = None;
    }

    pub fn is_held(&self) -> bool {
        self.lock().is_some()
    }

    fn compare(&self) -> Option<Compare> {
        self.lock().as_ref().map(|(key, rev)| Compare::create_revision(key.clone(), CompareOp::Equal, *rev))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Vec<u8>, i64)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the backend remembers of each object, to write only what changed.
#[derive(Debug, Default, Clone, Copy)]
struct ObjectState {
    next_seq: u64,
    log_bytes: u64,
    base_bytes: u64,
    /// The generation of the chunks the object's record points at, if it is chunked.
    chunks: Option<u64>,
}

impl ObjectState {
    fn should_compact(&self, more: u64) -> bool {
        // The same rule as the embedded store's.
        crate::backend::logs_outgrow(self.log_bytes, more, self.base_bytes)
    }
}

pub struct EtcdBackend {
    client: Client,
    runtime: tokio::runtime::Handle,
    prefix: String,
    fence: Arc<Fence>,
    /// Kept by the feed from every commit it sees (this node's and other leaders'), so that a
    /// node that becomes the leader writes only what changed from its first commit.
    state: Arc<Mutex<HashMap<String, ObjectState>>>,
    loaded: Option<Loaded>,
    last_commit: i64,
}

/// Everything under the prefix as of one revision.
struct Loaded {
    objects: Vec<(String, String, Value)>,
    revision: i64,
    /// Chunks no record points at yet: a commit in flight while the load read them.
    unclaimed_chunks: HashMap<String, Vec<u8>>,
}

/// The one mapping of etcd's errors: a timeout is indeterminate (the request may still land).
pub(crate) fn etcd_error(e: etcd_client::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("timed out") || text.contains("Timeout") || text.contains("deadline") {
        return StoreError::Indeterminate(format!(
            "etcd did not answer within {OPERATION_TIMEOUT:?} (has it lost its quorum?): {text}"
        ));
    }
    StoreError::Io(format!("etcd: {text}"))
}

fn corrupt(key: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{key}: {what}"))
}

/// The keys of a prefix as of `revision` (0: now), page by page (a page stays far below the
/// client's message limit); with the revision read.
async fn range(client: &Client, prefix: &str, revision: i64) -> Result<(Vec<KeyValue>, i64), StoreError> {
    const PAGE: i64 = 64;
    let mut kv = client.kv_client().max_decoding_message_size(64 << 20);
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    let mut at = revision;
    loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(PAGE).with_revision(at);
        let mut page = kv.get(from.clone(), Some(options)).await.map_err(etcd_error)?;
        if at == 0 {
            at = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = [last.key(), b"\0"].concat();
        out.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((out, at))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn chunk_name(object: &str, generation: u64, index: u64) -> String {
    format!("{object}/{generation:016x}/{index:08x}")
}

/// An object's body from its record (`J` + JSON, or `C` + a manifest of chunks, which are
/// taken out of `chunks`), and what the backend remembers of it.
fn decode_record(
    prefix: &str,
    key: &str,
    object: &str,
    record: &[u8],
    chunks: &mut HashMap<String, Vec<u8>>,
) -> Result<(Value, ObjectState), StoreError> {
    match record.split_first() {
        Some((b'J', json)) => {
            let body = serde_json::from_slice(json).map_err(|e| corrupt(key, e))?;
            Ok((body, ObjectState { base_bytes: json.len() as u64, ..ObjectState::default() }))
        }
        Some((b'C', manifest)) => {
            let manifest: Value = serde_json::from_slice(manifest).map_err(|e| corrupt(key, e))?;
            let generation = manifest["generation"].as_u64().ok_or_else(|| corrupt(key, "no generation"))?;
            let count = manifest["chunks"].as_u64().ok_or_else(|| corrupt(key, "no chunk count"))?;
            let mut json = Vec::new();
            for index in 0..count {
                let chunk_key = format!("{prefix}c/{}", chunk_name(object, generation, index));
                json.extend(chunks.remove(&chunk_key).ok_or_else(|| corrupt(&chunk_key, "missing chunk"))?);
            }
            let body = serde_json::from_slice(&json).map_err(|e| corrupt(key, e))?;
            let state =
                ObjectState { base_bytes: json.len() as u64, chunks: Some(generation), ..ObjectState::default() };
            Ok((body, state))
        }
        _ => Err(corrupt(key, "unknown record")),
    }
}

/// (object, sequence) of an edit log key.
fn edit_key(prefix: &str, key: &str) -> Result<(String, u64), StoreError> {
    let rest = key.strip_prefix(&format!("{prefix}e/")).ok_or_else(|| corrupt(key, "not an edit log"))?;
    let (object, seq) = rest.rsplit_once('/').ok_or_else(|| corrupt(key, "bad key"))?;
    Ok((object.to_string(), u64::from_str_radix(seq, 16).map_err(|e| corrupt(key, e))?))
}

impl EtcdBackend {
    /// Connects and reads everything stored under `prefix` (so that `load` does no I/O).
    pub async fn open(endpoints: &[String], prefix: &str, fence: Arc<Fence>) -> Result<EtcdBackend, StoreError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(OPERATION_TIMEOUT)
            // etcd answers pings more frequent than every 5 s (its --grpc-keepalive-min-time)
            // with GOAWAY, which would break the catalogue's watch every few seconds.
            .with_keep_alive(std::time::Duration::from_secs(6), std::time::Duration::from_secs(4));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Open(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let mut backend = EtcdBackend {
            client,
            runtime: tokio::runtime::Handle::current(),
            prefix: prefix.to_string(),
            fence,
            state: Arc::default(),
            loaded: None,
            last_commit: 0,
        };
        backend.loaded = Some(read_all(&backend.client, &backend.prefix, &backend.state).await?);
        Ok(backend)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn key(&self, area: &str, object: &str) -> String {
        format!("{}{area}/{object}", self.prefix)
    }

    /// Runs `ops` as one transaction fenced by the leader's key; its revision.
    async fn fenced(&self, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        let compare = self.fence.compare().ok_or(StoreError::NotLeader)?;
        let response =
            self.client.kv_client().txn(Txn::new().when([compare]).and_then(ops)).await.map_err(etcd_error)?;
        if !response.succeeded() {
            return Err(StoreError::NotLeader);
        }
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn commit_async(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.len() > MAX_CHANGES_PER_COMMIT {
            return Err(StoreError::Io(format!(
                "a batch of {} changes is more than one etcd transaction may carry",
                changes.len()
            )));
        }
        let mut plan = Plan::default();
        let known = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for change in changes {
            match change {
                Change::Edit { stored, edits } => {
                    let object = format!("{}/{}", stored.kind, stored.uuid);
                    let log = serde_json::to_vec(edits.as_slice()).map_err(|e| StoreError::Io(e.to_string()))?;
                    let state = known.get(&object).copied().unwrap_or_default();
                    let fits = log.len() <= CHUNK_BYTES && plan.final_bytes + log.len() <= TXN_BUDGET_BYTES;
                    if state.base_bytes > 0 && fits && !state.should_compact(log.len() as u64) {
                        plan.final_bytes += log.len();
                        let key = self.key("e", &format!("{object}/{:016x}", state.next_seq));
                        plan.ops.push(TxnOp::put(key, log, None));
                        continue;
                    }
                    self.plan_whole(&mut plan, &object, &stored.value, state)?;
                }
                Change::Put(stored) => {
                    let object = format!("{}/{}", stored.kind, stored.uuid);
                    let state = known.get(&object).copied().unwrap_or_default();
                    self.plan_whole(&mut plan, &object, &stored.value, state)?;
                }
                Change::Delete { kind, uuid } => {
                    let object = format!("{kind}/{uuid}");
                    let state = known.get(&object).copied().unwrap_or_default();
                    plan.ops.push(TxnOp::delete(self.key("o", &object), None));
                    self.plan_removals(&mut plan, &object, state);
                }
            }
        }
        // The chunks first, nobody pointing at them yet; then the one transaction that does.
        for batch in plan.chunks.chunks((TXN_BUDGET_BYTES / CHUNK_BYTES).max(1)) {
            let ops = batch.iter().map(|(key, bytes)| TxnOp::put(key.clone(), bytes.clone(), None)).collect();
            self.fenced(ops).await?;
        }
        // The marker every commit touches: its mod revision is the revision of the latest
        // commit, which a consistent read waits for (see `election::Cluster::consistent`).
        plan.ops.push(TxnOp::put(format!("{}{REVISION_MARKER}", self.prefix), "", None));
        // What each object now is, the feed records when it applies the commit.
        self.last_commit = self.fenced(plan.ops).await?;
        Ok(())
    }

    /// Writes the whole body: inline when it fits the value and transaction budgets, else in
    /// chunks of a new generation; the old edit logs and chunks go.
    fn plan_whole(&self, plan: &mut Plan, object: &str, value: &Value, state: ObjectState) -> Result<(), StoreError> {
        let body = serde_json::to_vec(value).map_err(|e| StoreError::Io(e.to_string()))?;
        let record = if body.len() < CHUNK_BYTES && plan.final_bytes + body.len() <= TXN_BUDGET_BYTES {
            plan.final_bytes += body.len();
            [b"J".as_slice(), &body].concat()
        } else {
            let generation: u64 = rand::random();
            let pieces: Vec<&[u8]> = body.chunks(CHUNK_BYTES).collect();
            for (index, piece) in pieces.iter().enumerate() {
                plan.chunks.push((self.key("c", &chunk_name(object, generation, index as u64)), piece.to_vec()));
            }
            let manifest = serde_json::json!({"generation": generation, "chunks": pieces.len(), "bytes": body.len()});
            [b"C".as_slice(), manifest.to_string().as_bytes()].concat()
        };
        plan.ops.push(TxnOp::put(self.key("o", object), record, None));
        self.plan_removals(plan, object, state);
        Ok(())
    }

    fn plan_removals(&self, plan: &mut Plan, object: &str, state: ObjectState) {
        if state.next_seq > 0 {
            let logs = self.key("e", &format!("{object}/"));
            plan.ops.push(TxnOp::delete(logs, Some(DeleteOptions::new().with_prefix())));
        }
        if let Some(generation) = state.chunks {
            let old = self.key("c", &format!("{object}/{generation:016x}/"));
            plan.ops.push(TxnOp::delete(old, Some(DeleteOptions::new().with_prefix())));
        }
    }
}

/// Everything under the prefix, read as of one revision; `state` is rebuilt from it.
async fn read_all(
    client: &Client,
    prefix: &str,
    state: &Mutex<HashMap<String, ObjectState>>,
) -> Result<Loaded, StoreError> {
    let objects_prefix = format!("{prefix}o/");
    let (records, revision) = range(client, &objects_prefix, 0).await?;
    let (chunk_kvs, _) = range(client, &format!("{prefix}c/"), revision).await?;
    let (edit_kvs, _) = range(client, &format!("{prefix}e/"), revision).await?;
    let mut chunks: HashMap<String, Vec<u8>> =
        chunk_kvs.into_iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())).collect();
    let mut bodies: HashMap<String, Value> = HashMap::new();
    let mut known = HashMap::new();
    for kv in records {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let object = key[objects_prefix.len()..].to_string();
        let (body, object_state) = decode_record(prefix, &key, &object, kv.value(), &mut chunks)?;
        bodies.insert(object.clone(), body);
        known.insert(object, object_state);
    }
    for kv in edit_kvs {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let (object, seq) = edit_key(prefix, &key)?;
        let body = bodies.get_mut(&object).ok_or_else(|| corrupt(&key, "edit log for a missing object"))?;
        let ops: Vec<Value> = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
        fulcrum_jsonpatch::apply_all(body, &ops).map_err(|e| corrupt(&key, e))?;
        let s = known.entry(object).or_default();
        s.next_seq = seq + 1;
        s.log_bytes += kv.value().len() as u64;
    }
    *state.lock().unwrap_or_else(|e| e.into_inner()) = known;
    let mut objects = Vec::with_capacity(bodies.len());
    for (object, body) in bodies {
        let (kind, uuid) = object.split_once('/').ok_or_else(|| corrupt(&object, "bad key"))?;
        objects.push((kind.to_string(), uuid.to_string(), body));
    }
    Ok(Loaded { objects, revision, unclaimed_chunks: chunks })
}

/// One commit, prepared: chunks to write first, then the fenced transaction.
#[derive(Default)]
struct Plan {
    chunks: Vec<(String, Vec<u8>)>,
    ops: Vec<TxnOp>,
    final_bytes: usize,
}

/// Applies every commit under the prefix to the catalogue, in etcd's order, one commit (one
/// revision) at a time under the catalogue's lock, so a read sees a commit whole or not at all.
/// What one revision does to one object, as the catalogue feed applies it.
enum Action {
    Put(Value),
    Delete,
    /// Edit logs, in order.
    Edit(Vec<Value>),
}

struct Feed {
    client: Client,
    prefix: String,
    catalogue: Arc<std::sync::RwLock<crate::Catalogue>>,
    indexer: crate::Indexer,
    state: Arc<Mutex<HashMap<String, ObjectState>>>,
    applied: Arc<crate::Applied>,
    /// Chunk values seen but not yet claimed by a record.
    chunks: HashMap<String, Vec<u8>>,
    reclaim: std::sync::mpsc::Sender<crate::writer::Garbage>,
}

impl Feed {
    async fn run(mut self, from: i64) {
        let mut next = from + 1;
        loop {
            match self.watch(next).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "the catalogue feed stopped; resuming"),
            }
            next = self.applied.current() + 1;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Watches from `start` until the stream ends; a compacted history is reloaded whole.
    async fn watch(&mut self, start: i64) -> Result<(), StoreError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut stream =
            self.client.watch_client().watch(self.prefix.clone(), Some(options)).await.map_err(etcd_error)?;
        while let Some(response) = stream.message().await.map_err(etcd_error)? {
            if response.compact_revision() > 0 {
                tracing::warn!(compacted = response.compact_revision(), "etcd compacted the history; reloading");
                self.reload().await?;
                return Ok(());
            }
            if response.canceled() {
                return Err(StoreError::Io(format!("etcd cancelled the watch: {}", response.cancel_reason())));
            }
            // Group the events by revision: one revision is one commit.
            let mut events = response.events().iter().peekable();
            while let Some(first) = events.next() {
                let revision = first.kv().map_or(0, |kv| kv.mod_revision());
                let mut group = vec![first];
                while let Some(e) = events.peek() {
                    if e.kv().map_or(0, |kv| kv.mod_revision()) != revision {
                        break;
                    }
                    group.push(events.next().expect("peeked"));
                }
                if let Err(e) = self.apply(&group, revision) {
                    // An edit that did not apply may have left its object half-changed (edits
                    // are applied in place): everything is read again.
                    tracing::error!(error = %e, revision, "cannot apply a commit to the catalogue; reloading");
                    self.reload().await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, events: &[&etcd_client::Event], revision: i64) -> Result<(), StoreError> {
        let objects = format!("{}o/", self.prefix);
        let chunks = format!("{}c/", self.prefix);
        let edits = format!("{}e/", self.prefix);
        // What this revision does to each object, decoded before the catalogue is locked; the
        // edit logs of one object in a row (a group commit of PATCHes) are joined, so they are
        // applied together.
        let mut actions: Vec<(String, Action)> = Vec::new();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let put = event.event_type() == EventType::Put;
            if key.starts_with(&chunks) {
                if put {
                    self.chunks.insert(key, kv.value().to_vec());
                } else {
                    self.chunks.remove(&key);
                }
            } else if let Some(object) = key.strip_prefix(&objects) {
                object.split_once('/').ok_or_else(|| corrupt(&key, "bad key"))?;
                let action = if put {
                    let (body, object_state) = decode_record(&self.prefix, &key, object, kv.value(), &mut self.chunks)?;
                    state.insert(object.to_string(), object_state);
                    Action::Put(body)
                } else {
                    state.remove(object);
                    Action::Delete
                };
                actions.push((object.to_string(), action));
            } else if key.starts_with(&edits) && put {
                let (object, seq) = edit_key(&self.prefix, &key)?;
                object.split_once('/').ok_or_else(|| corrupt(&key, "bad key"))?;
                let ops: Vec<Value> = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
                let s = state.entry(object.clone()).or_default();
                s.next_seq = seq + 1;
                s.log_bytes += kv.value().len() as u64;
                match actions.last_mut() {
                    Some((last, Action::Edit(earlier))) if *last == object => earlier.extend(ops),
                    _ => actions.push((object, Action::Edit(ops))),
                }
            }
        }
        drop(state);
        // An object nobody reads at this moment is edited where it lies: a small change to a
        // big object costs the change (and indexing it), not a copy. Old versions are freed off
        // the feed's path.
        let mut replaced: crate::writer::Garbage = Vec::new();
        let mut cat = self.catalogue.write().unwrap_or_else(|e| e.into_inner());
        for (object, action) in actions {
            let (kind, uuid) = object.split_once('/').unwrap_or_default();
            let change = match action {
                Action::Put(body) => {
                    let meta = (self.indexer)(kind, &body);
                    Change::Put(Arc::new(Stored { kind: kind.into(), uuid: uuid.into(), value: body, meta }))
                }
                Action::Delete => Change::Delete { kind: kind.into(), uuid: uuid.into() },
                Action::Edit(ops) => {
                    let key = format!("{edits}{object}");
                    let edit =
                        |body: &mut Value| fulcrum_jsonpatch::apply_all(body, &ops).map_err(|e| corrupt(&key, e));
                    match cat.edit_unshared(kind, uuid, &self.indexer, edit) {
                        Some(outcome) => {
                            outcome?;
                            continue;
                        }
                        None => {
                            let current = cat.get(kind, uuid).map(|s| s.value.clone());
                            let mut body = current.ok_or_else(|| corrupt(&key, "edit log for a missing object"))?;
                            edit(&mut body)?;
                            let meta = (self.indexer)(kind, &body);
                            Change::Put(Arc::new(Stored { kind: kind.into(), uuid: uuid.into(), value: body, meta }))
                        }
                    }
                }
            };
            replaced.extend(cat.apply(&change).map(|old| Box::new(old) as Box<dyn Send>));
        }
        drop(cat);
        let _ = self.reclaim.send(replaced);
        self.applied.advance(revision);
        Ok(())
    }

    /// After etcd compacted what the watch needed: everything again, as of now.
    async fn reload(&mut self) -> Result<(), StoreError> {
        let loaded = read_all(&self.client, &self.prefix, &self.state).await?;
        let mut fresh = crate::Catalogue::default();
        for (kind, uuid, value) in loaded.objects {
            let meta = (self.indexer)(&kind, &value);
            fresh.apply(&Change::Put(Arc::new(Stored { kind, uuid, value, meta })));
        }
        *self.catalogue.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.chunks = loaded.unclaimed_chunks;
        self.applied.advance(loaded.revision);
        Ok(())
    }
}

impl Backend for EtcdBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        if self.loaded.is_none() {
            let runtime = self.runtime.clone();
            let (client, prefix, state) = (self.client.clone(), self.prefix.clone(), self.state.clone());
            self.loaded = Some(runtime.block_on(async move { read_all(&client, &prefix, &state).await })?);
        }
        Ok(std::mem::take(&mut self.loaded.as_mut().expect("loaded above").objects))
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.commit_async(changes))
    }

    fn commits_on_any_thread(&self) -> bool {
        // `commit` blocks on this backend's runtime, which panics inside another runtime.
        false
    }

    fn max_changes_per_commit(&self) -> usize {
        MAX_CHANGES_PER_COMMIT
    }

    fn start_feed(
        &mut self,
        catalogue: Arc<std::sync::RwLock<crate::Catalogue>>,
        indexer: crate::Indexer,
    ) -> Option<Arc<crate::Applied>> {
        let loaded = self.loaded.take()?;
        let applied = Arc::new(crate::Applied::default());
        applied.advance(loaded.revision);
        let feed = Feed {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            catalogue,
            indexer,
            state: self.state.clone(),
            applied: applied.clone(),
            chunks: loaded.unclaimed_chunks,
            reclaim: crate::writer::reclaimer(),
        };
        self.runtime.spawn(feed.run(loaded.revision));
        Some(applied)
    }

    fn last_commit_revision(&self) -> i64 {
        self.last_commit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_after_every_key_of_the_prefix() {
        assert_eq!(prefix_end(b"/fulcrum/o/"), b"/fulcrum/o0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn compaction_follows_the_object_size() {
        let small = ObjectState { base_bytes: 100, log_bytes: 0, ..ObjectState::default() };
        assert!(!small.should_compact(1000));
        assert!(small.should_compact(crate::backend::COMPACT_MIN_BYTES + 1));
        let big = ObjectState { base_bytes: 1 << 20, log_bytes: 3 << 20, ..ObjectState::default() };
        assert!(!big.should_compact(1000));
        assert!(big.should_compact(2 << 20));
    }
}
