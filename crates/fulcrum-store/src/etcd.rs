//! The store on etcd, for controllers that share one configuration: the same [`Backend`]
//! contract as redb (a commit is durable when it returns, and all of it or none is stored),
//! with every commit fenced by the leader's election key.
//!
//! Layout under the prefix (default `/fulcrum/`):
//! - `o/<type>/<uuid>`: the object's last whole write — `J` and its JSON, or, for a body too big
//!   for one etcd value, `C` and a manifest naming its chunks;
//! - `c/<type>/<uuid>/<generation>/<index>`: the chunks of one whole write;
//! - `e/<type>/<uuid>/<sequence>`: JSON Patch edit logs since that write, as in the redb backend.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, Txn, TxnOp};
use serde_json::Value;

use crate::StoreError;
use crate::backend::Backend;
use crate::catalogue::Change;

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
/// Edit logs are compacted into a whole write past max(this, 4 × the object), as in redb.
const COMPACT_MIN_BYTES: u64 = 256 << 10;
const COMPACT_FACTOR: u64 = 4;

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
        self.log_bytes + more > COMPACT_MIN_BYTES.max(COMPACT_FACTOR * self.base_bytes)
    }
}

pub struct EtcdBackend {
    client: Client,
    runtime: tokio::runtime::Handle,
    prefix: String,
    fence: Arc<Fence>,
    state: HashMap<String, ObjectState>,
    loaded: Option<Vec<(String, String, Value)>>,
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    StoreError::Io(format!("etcd: {e}"))
}

fn corrupt(key: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{key}: {what}"))
}

/// The keys of a prefix, page by page (a page stays far below the client's message limit).
async fn range(client: &Client, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
    const PAGE: i64 = 64;
    let mut kv = client.kv_client().max_decoding_message_size(64 << 20);
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        let mut page = kv.get(from.clone(), Some(options)).await.map_err(etcd_error)?;
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = [last.key(), b"\0"].concat();
        out.extend(kvs);
        if !more {
            break;
        }
    }
    Ok(out)
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

impl EtcdBackend {
    /// Connects and reads everything stored under `prefix` (so that `load` does no I/O).
    pub async fn open(endpoints: &[String], prefix: &str, fence: Arc<Fence>) -> Result<EtcdBackend, StoreError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(10))
            .with_keep_alive(std::time::Duration::from_secs(2), std::time::Duration::from_secs(4));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Open(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let mut backend = EtcdBackend {
            client,
            runtime: tokio::runtime::Handle::current(),
            prefix: prefix.to_string(),
            fence,
            state: HashMap::new(),
            loaded: None,
        };
        backend.loaded = Some(backend.read_all().await?);
        Ok(backend)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn key(&self, area: &str, object: &str) -> String {
        format!("{}{area}/{object}", self.prefix)
    }

    async fn read_all(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        let objects_prefix = format!("{}o/", self.prefix);
        let chunks_prefix = format!("{}c/", self.prefix);
        let edits_prefix = format!("{}e/", self.prefix);
        let mut chunks: HashMap<String, Vec<u8>> = HashMap::new();
        for kv in range(&self.client, &chunks_prefix).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            chunks.insert(key, kv.value().to_vec());
        }
        let mut bodies: HashMap<String, Value> = HashMap::new();
        for kv in range(&self.client, &objects_prefix).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let object = key[objects_prefix.len()..].to_string();
            let (body, state) = match kv.value().split_first() {
                Some((b'J', json)) => {
                    let body = serde_json::from_slice(json).map_err(|e| corrupt(&key, e))?;
                    (body, ObjectState { base_bytes: json.len() as u64, ..ObjectState::default() })
                }
                Some((b'C', manifest)) => {
                    let manifest: Value = serde_json::from_slice(manifest).map_err(|e| corrupt(&key, e))?;
                    let generation = manifest["generation"].as_u64().ok_or_else(|| corrupt(&key, "no generation"))?;
                    let count = manifest["chunks"].as_u64().ok_or_else(|| corrupt(&key, "no chunk count"))?;
                    let mut json = Vec::new();
                    for index in 0..count {
                        let chunk_key = self.key("c", &chunk_name(&object, generation, index));
                        json.extend(chunks.get(&chunk_key).ok_or_else(|| corrupt(&chunk_key, "missing chunk"))?);
                    }
                    let body = serde_json::from_slice(&json).map_err(|e| corrupt(&key, e))?;
                    let state = ObjectState {
                        base_bytes: json.len() as u64,
                        chunks: Some(generation),
                        ..ObjectState::default()
                    };
                    (body, state)
                }
                _ => return Err(corrupt(&key, "unknown record")),
            };
            bodies.insert(object.clone(), body);
            self.state.insert(object, state);
        }
        for kv in range(&self.client, &edits_prefix).await? {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let (object, seq) = key[edits_prefix.len()..].rsplit_once('/').ok_or_else(|| corrupt(&key, "bad key"))?;
            let seq = u64::from_str_radix(seq, 16).map_err(|e| corrupt(&key, e))?;
            let body = bodies.get_mut(object).ok_or_else(|| corrupt(&key, "edit log for a missing object"))?;
            let ops: Vec<Value> = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
            fulcrum_jsonpatch::apply_all(body, &ops).map_err(|e| corrupt(&key, e))?;
            let state = self.state.entry(object.to_string()).or_default();
            state.next_seq = seq + 1;
            state.log_bytes += kv.value().len() as u64;
        }
        let mut out = Vec::with_capacity(bodies.len());
        for (object, body) in bodies {
            let (kind, uuid) = object.split_once('/').ok_or_else(|| corrupt(&object, "bad key"))?;
            out.push((kind.to_string(), uuid.to_string(), body));
        }
        Ok(out)
    }

    /// Runs `ops` as one transaction fenced by the leader's key.
    async fn fenced(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let compare = self.fence.compare().ok_or(StoreError::NotLeader)?;
        let response =
            self.client.kv_client().txn(Txn::new().when([compare]).and_then(ops)).await.map_err(etcd_error)?;
        if response.succeeded() { Ok(()) } else { Err(StoreError::NotLeader) }
    }

    async fn commit_async(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.len() > MAX_CHANGES_PER_COMMIT {
            return Err(StoreError::Io(format!(
                "a batch of {} changes is more than one etcd transaction may carry",
                changes.len()
            )));
        }
        let mut plan = Plan::default();
        for change in changes {
            match change {
                Change::Edit { stored, edits } => {
                    let object = format!("{}/{}", stored.kind, stored.uuid);
                    let log = serde_json::to_vec(edits).map_err(|e| StoreError::Io(e.to_string()))?;
                    let state = self.state.get(&object).copied().unwrap_or_default();
                    let fits = log.len() <= CHUNK_BYTES && plan.final_bytes + log.len() <= TXN_BUDGET_BYTES;
                    if state.base_bytes > 0 && fits && !state.should_compact(log.len() as u64) {
                        plan.final_bytes += log.len();
                        let key = self.key("e", &format!("{object}/{:016x}", state.next_seq));
                        plan.ops.push(TxnOp::put(key, log.clone(), None));
                        let next = ObjectState {
                            next_seq: state.next_seq + 1,
                            log_bytes: state.log_bytes + log.len() as u64,
                            ..state
                        };
                        plan.updates.push((object, Some(next)));
                        continue;
                    }
                    self.plan_whole(&mut plan, object, &stored.value, state)?;
                }
                Change::Put(stored) => {
                    let object = format!("{}/{}", stored.kind, stored.uuid);
                    let state = self.state.get(&object).copied().unwrap_or_default();
                    self.plan_whole(&mut plan, object, &stored.value, state)?;
                }
                Change::Delete { kind, uuid } => {
                    let object = format!("{kind}/{uuid}");
                    let state = self.state.get(&object).copied().unwrap_or_default();
                    plan.ops.push(TxnOp::delete(self.key("o", &object), None));
                    self.plan_removals(&mut plan, &object, state);
                    plan.updates.push((object, None));
                }
            }
        }
        // The chunks first, nobody pointing at them yet; then the one transaction that does.
        for batch in plan.chunks.chunks((TXN_BUDGET_BYTES / CHUNK_BYTES).max(1)) {
            let ops = batch.iter().map(|(key, bytes)| TxnOp::put(key.clone(), bytes.clone(), None)).collect();
            self.fenced(ops).await?;
        }
        self.fenced(plan.ops).await?;
        for (object, state) in plan.updates {
            match state {
                Some(s) => self.state.insert(object, s),
                None => self.state.remove(&object),
            };
        }
        Ok(())
    }

    /// Writes the whole body: inline when it fits the value and transaction budgets, else in
    /// chunks of a new generation; the old edit logs and chunks go.
    fn plan_whole(&self, plan: &mut Plan, object: String, value: &Value, state: ObjectState) -> Result<(), StoreError> {
        let body = serde_json::to_vec(value).map_err(|e| StoreError::Io(e.to_string()))?;
        let record = if body.len() < CHUNK_BYTES && plan.final_bytes + body.len() <= TXN_BUDGET_BYTES {
            plan.final_bytes += body.len();
            [b"J".as_slice(), &body].concat()
        } else {
            let generation: u64 = rand::random();
            let pieces: Vec<&[u8]> = body.chunks(CHUNK_BYTES).collect();
            for (index, piece) in pieces.iter().enumerate() {
                plan.chunks.push((self.key("c", &chunk_name(&object, generation, index as u64)), piece.to_vec()));
            }
            let manifest = serde_json::json!({"generation": generation, "chunks": pieces.len(), "bytes": body.len()});
            [b"C".as_slice(), manifest.to_string().as_bytes()].concat()
        };
        plan.ops.push(TxnOp::put(self.key("o", &object), record.clone(), None));
        self.plan_removals(plan, &object, state);
        let chunks = (record[0] == b'C').then(|| {
            let manifest: Value = serde_json::from_slice(&record[1..]).expect("made above");
            manifest["generation"].as_u64().expect("made above")
        });
        plan.updates
            .push((object, Some(ObjectState { base_bytes: body.len() as u64, chunks, ..ObjectState::default() })));
        Ok(())
    }

    fn plan_removals(&self, plan: &mut Plan, object: &str, state: ObjectState) {
        if state.next_seq > 0 {
            plan.ops
                .push(TxnOp::delete(self.key("e", &format!("{object}/")), Some(DeleteOptions::new().with_prefix())));
        }
        if let Some(generation) = state.chunks {
            let old = self.key("c", &format!("{object}/{generation:016x}/"));
            plan.ops.push(TxnOp::delete(old, Some(DeleteOptions::new().with_prefix())));
        }
    }
}

fn chunk_name(object: &str, generation: u64, index: u64) -> String {
    format!("{object}/{generation:016x}/{index:08x}")
}

/// One commit, prepared: chunks to write first, then the fenced transaction.
#[derive(Default)]
struct Plan {
    chunks: Vec<(String, Vec<u8>)>,
    ops: Vec<TxnOp>,
    final_bytes: usize,
    updates: Vec<(String, Option<ObjectState>)>,
}

impl Backend for EtcdBackend {
    fn load(&mut self) -> Result<Vec<(String, String, Value)>, StoreError> {
        match self.loaded.take() {
            Some(objects) => Ok(objects),
            None => {
                let runtime = self.runtime.clone();
                runtime.block_on(self.read_all())
            }
        }
    }

    fn commit(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.commit_async(changes))
    }

    fn max_changes_per_commit(&self) -> usize {
        MAX_CHANGES_PER_COMMIT
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
        assert!(small.should_compact(COMPACT_MIN_BYTES + 1));
        let big = ObjectState { base_bytes: 1 << 20, log_bytes: 3 << 20, ..ObjectState::default() };
        assert!(!big.should_compact(1000));
        assert!(big.should_compact(2 << 20));
    }
}
