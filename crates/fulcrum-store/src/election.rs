//! Leader election on etcd: the leader is the node whose lease holds the election key. Winning
//! sets the [`Fence`] every commit carries. Losing the lease (the node paused, partitioned or
//! too slow to renew) lets etcd delete the key; whoever creates it next gets a new create
//! revision, so the old leader's commits fail in etcd whatever it believes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::StoreError;
use crate::etcd::{Fence, etcd_error};

/// Who leads, as the election key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub node: String,
    pub advertise: String,
    /// The pin of the node's HTTPS certificate, so that the others can verify it.
    pub pin: Option<String>,
}

pub struct Election {
    client: Client,
    key: String,
    me: std::sync::Mutex<Leader>,
    pub(crate) ttl: Duration,
    fence: Arc<Fence>,
    /// The lease holding the key while this node leads.
    lease: std::sync::Mutex<Option<i64>>,
}

impl Election {
    /// The lease's time to live: how long a dead leader is taken for alive at most.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn new(client: Client, key: &str, me: Leader, ttl: Duration, fence: Arc<Fence>) -> Election {
        Election {
            client,
            key: key.to_string(),
            me: std::sync::Mutex::new(me),
            ttl,
            fence,
            lease: std::sync::Mutex::new(None),
        }
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let mut kv = self.client.kv_client();
        let got = kv.get(self.key.clone(), None).await.map_err(etcd_error)?;
        Ok(got.kvs().first().and_then(|kv| parse_leader(kv.value())))
    }

    /// Campaigns until this node holds the key; calls `waiting` with the leader while another
    /// node does. Returns the lease that holds the key (which [`Election::keep`] then renews)
    /// and the key's create revision, which [`Election::hold`] turns into the fence once this
    /// node has caught up with what the leaders before it committed.
    pub async fn win(&self, waiting: &mut (dyn FnMut(Option<&Leader>) + Send)) -> Result<(i64, i64), StoreError> {
        let me = self.me.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let value = serde_json::json!({"node": me.node, "advertise": me.advertise, "pin": me.pin}).to_string();
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
        // A leader that gives up (before a planned restart) deletes the key: the watch lets the
        // others campaign at once, before the leaving node is back to campaign itself.
        let mut key_changes = self.client.watch_client().watch(self.key.clone(), None).await.ok();
        loop {
            let mut lease = self.client.lease_client();
            let grant = lease.grant(ttl_secs, None).await.map_err(etcd_error)?;
            let put = TxnOp::put(self.key.clone(), value.clone(), Some(PutOptions::new().with_lease(grant.id())));
            let txn =
                Txn::new().when([Compare::create_revision(self.key.clone(), CompareOp::Equal, 0)]).and_then([put]);
            let mut kv = self.client.kv_client();
            let response = kv.txn(txn).await.map_err(etcd_error)?;
            if response.succeeded() {
                // A key created in this transaction has the transaction's revision as its
                // create revision.
                let revision =
                    response.header().map(|h| h.revision()).ok_or_else(|| StoreError::Io("etcd: no header".into()))?;
                tracing::info!(node = %me.node, revision, "won the election");
                *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(grant.id());
                return Ok((grant.id(), revision));
            }
            let _ = lease.revoke(grant.id()).await;
            waiting(self.leader().await?.as_ref());
            let pause = tokio::time::sleep((self.ttl / 4).max(Duration::from_millis(200)));
            match key_changes.as_mut() {
                Some(changes) => tokio::select! {
                    () = pause => {}
                    change = changes.message() => if !matches!(change, Ok(Some(_))) {
                        key_changes = None;
                    },
                },
                None => pause.await,
            }
        }
    }

    /// Where this node is reached and its certificate's pin, as the election key will say
    /// (known once the listener is bound and TLS set up).
    pub fn describe_me(&self, advertise: String, pin: Option<String>) {
        let mut me = self.me.lock().unwrap_or_else(|e| e.into_inner());
        me.advertise = advertise;
        me.pin = pin;
    }

    pub fn me(&self) -> Leader {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Gives the leadership up now (before a planned restart): this node stops committing, and
    /// etcd deletes the key with the lease, so another node wins without waiting for the TTL.
    pub async fn resign(&self) {
        self.fence.release();
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(lease) = lease
            && let Err(e) = self.client.lease_client().revoke(lease).await
        {
            tracing::warn!(error = %e, "cannot give the leadership up; it ends with the lease");
        }
    }

    /// Lets this node's commits through, as the holder of the key created at `revision`.
    pub fn hold(&self, revision: i64) {
        self.fence.hold(self.key.as_bytes().to_vec(), revision);
    }

    /// Renews the lease until it cannot: returns when leadership is lost (the fence is then
    /// released first, so this node stops committing even before etcd would refuse it).
    pub async fn keep(&self, lease: i64) -> StoreError {
        let mut leases = self.client.lease_client();
        let (mut keeper, mut answers) = match leases.keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => {
                self.fence.release();
                return etcd_error(e);
            }
        };
        let mut valid_until = Instant::now() + self.ttl;
        let every = (self.ttl / 3).max(Duration::from_millis(100));
        loop {
            let renewed = tokio::time::timeout(every, async {
                keeper.keep_alive().await.map_err(etcd_error)?;
                match answers.message().await.map_err(etcd_error)? {
                    Some(answer) if answer.ttl() > 0 => Ok(()),
                    // The lease is gone: etcd has deleted the key.
                    _ => Err(StoreError::NotLeader),
                }
            })
            .await
            .unwrap_or_else(|_| Err(StoreError::Io("etcd: renewing the lease timed out".into())));
            match renewed {
                Ok(()) => valid_until = Instant::now() + self.ttl,
                Err(StoreError::NotLeader) => break,
                // etcd unreachable or slow: still the leader while the lease may be valid.
                Err(e) if Instant::now() + every < valid_until => {
                    tracing::warn!(error = %e, "cannot renew the leader lease yet");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the leader lease ran out");
                    break;
                }
            }
            tokio::time::sleep(every).await;
        }
        self.fence.release();
        StoreError::NotLeader
    }
}

fn parse_leader(value: &[u8]) -> Option<Leader> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    Some(Leader {
        node: v["node"].as_str()?.to_string(),
        advertise: v["advertise"].as_str()?.to_string(),
        pin: v["pin"].as_str().map(String::from),
    })
}

/// Where a cluster's controllers keep everything in etcd.
pub const PREFIX: &str = "/fulcrum/";

/// This node's place in a cluster: its etcd client, its election and the fence its commits
/// carry. The API layer sees only this and the [`crate::Store`] it opens: etcd stays here.
pub struct Cluster {
    client: Client,
    pub election: Election,
    fence: Arc<Fence>,
    endpoints: Vec<String>,
    barrier: Barrier,
}

impl Cluster {
    pub async fn connect(endpoints: &[String], me: Leader, ttl: Duration) -> Result<Cluster, StoreError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(crate::etcd::OPERATION_TIMEOUT);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Open(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let fence = Arc::new(Fence::default());
        let election = Election::new(client.clone(), &format!("{PREFIX}leader"), me, ttl, fence.clone());
        Ok(Cluster { client, election, fence, endpoints: endpoints.to_vec(), barrier: Barrier::default() })
    }

    /// The store's backend, read from etcd now.
    pub async fn backend(&self) -> Result<crate::etcd::EtcdBackend, StoreError> {
        crate::etcd::EtcdBackend::open(&self.endpoints, PREFIX, self.fence.clone()).await
    }

    /// Whether this node holds the leader's fence now.
    pub fn leads(&self) -> bool {
        self.fence.is_held()
    }

    /// Waits until `applied` has reached every commit made before this call: a linearizable
    /// read then sees all of them. The reads waiting at one moment share one quorum read of the
    /// revision marker every commit puts (etcd 3.4's progress notifications cannot be relied on,
    /// and the marker's revision is one the feed always sees).
    pub async fn consistent(&self, applied: &crate::Applied, within: Duration) -> Result<(), StoreError> {
        tokio::time::timeout(within, async {
            let revision = self.barrier.revision(&self.client).await?;
            applied.wait(revision).await;
            Ok(())
        })
        .await
        .map_err(|_| StoreError::Io(format!("etcd did not confirm the latest revision within {within:?}")))?
    }
}

/// Shares one quorum read among the reads that arrive while none is being made: a read joins
/// the next read to start, never one that started before it arrived.
#[derive(Default)]
struct Barrier {
    waiting: tokio::sync::Mutex<Vec<tokio::sync::oneshot::Sender<Result<i64, StoreError>>>>,
    reading: tokio::sync::Mutex<()>,
}

impl Barrier {
    async fn revision(&self, client: &Client) -> Result<i64, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().await.push(tx);
        // Whoever takes the read lock reads for everyone queued by then; the others find their
        // answer waiting when they get it.
        let _reading = self.reading.lock().await;
        let queued = std::mem::take(&mut *self.waiting.lock().await);
        if !queued.is_empty() {
            let marker = format!("{PREFIX}{}", crate::etcd::REVISION_MARKER);
            let read = client.kv_client().get(marker, None).await.map_err(etcd_error).map(|r| {
                // Without any commit yet, the revision read is as good: nothing to wait for.
                r.kvs().first().map_or_else(|| r.header().map_or(0, |h| h.revision()), |kv| kv.mod_revision())
            });
            for waiter in queued {
                let _ = waiter.send(read.clone());
            }
        }
        rx.await.unwrap_or_else(|_| Err(StoreError::Io("the consistent read was dropped".into())))
    }
}

/// A controller of the cluster as its registration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub advertise: String,
    /// The pin of its HTTPS certificate (none under plain HTTP).
    pub pin: Option<String>,
    /// What it said of its host when it registered (its systemd settings, for the prechecks).
    pub host: serde_json::Value,
    /// Whether its liveness key (held by its own lease) is there.
    pub up: bool,
    /// Seconds since the epoch at which it last started, when up.
    pub up_since: Option<u64>,
    /// Which registration of the node is up (another one after each restart).
    pub incarnation: Option<i64>,
}

impl Cluster {
    /// Registers this node for the cluster views: a permanent member entry, and a liveness
    /// entry under a lease of its own, renewed until the process ends (so a dead node shows
    /// down within the lease TTL).
    pub async fn register(&self, started_unix: u64, host: serde_json::Value) -> Result<(), StoreError> {
        let me = self.election.me();
        self.publish_host(host).await?;
        let client = self.client.clone();
        let ttl = self.election.ttl;
        let alive_key = format!("{PREFIX}alive/{}", me.node);
        let alive = serde_json::json!({"up_since": started_unix}).to_string();
        tokio::spawn(async move {
            loop {
                let held = async {
                    let mut leases = client.lease_client();
                    let grant = leases.grant(ttl.as_secs().max(1) as i64, None).await.map_err(etcd_error)?;
                    let options = PutOptions::new().with_lease(grant.id());
                    client
                        .kv_client()
                        .put(alive_key.clone(), alive.clone(), Some(options))
                        .await
                        .map_err(etcd_error)?;
                    let (mut keeper, mut answers) = leases.keep_alive(grant.id()).await.map_err(etcd_error)?;
                    loop {
                        tokio::time::sleep((ttl / 3).max(Duration::from_millis(100))).await;
                        keeper.keep_alive().await.map_err(etcd_error)?;
                        match answers.message().await.map_err(etcd_error)? {
                            Some(answer) if answer.ttl() > 0 => {}
                            _ => return Err::<(), StoreError>(StoreError::Io("the liveness lease ran out".into())),
                        }
                    }
                };
                if let Err(e) = held.await {
                    tracing::debug!(error = %e, "registering again");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(())
    }

    /// Writes this node's permanent member entry again, with what it says of its host now (its
    /// free disk, its systemd settings), for the prechecks the leader runs.
    pub async fn publish_host(&self, host: serde_json::Value) -> Result<(), StoreError> {
        let me = self.election.me();
        let member =
            serde_json::json!({"name": me.node, "advertise": me.advertise, "pin": me.pin, "host": host}).to_string();
        let mut kv = self.client.kv_client();
        kv.put(format!("{PREFIX}members/{}", me.node), member, None).await.map_err(etcd_error)?;
        Ok(())
    }

    /// Every controller that ever registered, and whether it is up now.
    pub async fn nodes(&self) -> Result<Vec<NodeState>, StoreError> {
        let mut kv = self.client.kv_client();
        let prefixed = |area: &str| (format!("{PREFIX}{area}/"), Some(etcd_client::GetOptions::new().with_prefix()));
        let (members_key, options) = prefixed("members");
        let members = kv.get(members_key, options).await.map_err(etcd_error)?;
        let (alive_key, options) = prefixed("alive");
        let alive = kv.get(alive_key.clone(), options).await.map_err(etcd_error)?;
        // When it started, and which registration this is (a restart puts the key again).
        let up_since = |name: &str| {
            alive.kvs().iter().find(|kv| kv.key() == format!("{alive_key}{name}").as_bytes()).map(|kv| {
                let since = serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()
                    .and_then(|v| v["up_since"].as_u64())
                    .unwrap_or(0);
                (since, kv.mod_revision())
            })
        };
        let mut nodes: Vec<NodeState> = members
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).ok())
            .filter_map(|v| {
                let name = v["name"].as_str()?.to_string();
                let since = up_since(&name);
                Some(NodeState {
                    advertise: v["advertise"].as_str()?.to_string(),
                    pin: v["pin"].as_str().map(String::from),
                    host: v["host"].clone(),
                    up: since.is_some(),
                    up_since: since.map(|(s, _)| s),
                    incarnation: since.map(|(_, r)| r),
                    name,
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }
}

/// The product's cluster state for `members` controllers of which `up` are up (and whether a
/// leader is known): a lone node has no HA; all up is HA active; a majority up is compromised.
pub fn cluster_state(members: usize, up: usize, leader_known: bool) -> &'static str {
    match (members, up, leader_known) {
        (_, _, false) | (_, 0, _) => "CLUSTER_UP_HA_NOT_READY",
        (0 | 1, _, true) => "CLUSTER_UP_NO_HA",
        (m, u, true) if u == m => "CLUSTER_UP_HA_ACTIVE",
        (m, u, true) if u * 2 > m => "CLUSTER_UP_HA_COMPROMISED",
        _ => "CLUSTER_UP_HA_NOT_READY",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_states_follow_the_nodes_up() {
        assert_eq!(cluster_state(1, 1, true), "CLUSTER_UP_NO_HA");
        assert_eq!(cluster_state(3, 3, true), "CLUSTER_UP_HA_ACTIVE");
        assert_eq!(cluster_state(3, 2, true), "CLUSTER_UP_HA_COMPROMISED");
        assert_eq!(cluster_state(3, 1, true), "CLUSTER_UP_HA_NOT_READY");
        assert_eq!(cluster_state(3, 3, false), "CLUSTER_UP_HA_NOT_READY");
    }
}
