//! Leader election on etcd: the leader is the node whose lease holds the election key. Winning
//! sets the [`Fence`] every commit carries. Losing the lease (the node paused, partitioned or
//! too slow to renew) lets etcd delete the key; whoever creates it next gets a new create
//! revision, so the old leader's commits fail in etcd whatever it believes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::StoreError;
use crate::etcd::Fence;

/// Who leads, as the election key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    pub node: String,
    pub advertise: String,
}

pub struct Election {
    client: Client,
    key: String,
    me: Leader,
    ttl: Duration,
    fence: Arc<Fence>,
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    StoreError::Io(format!("etcd: {e}"))
}

impl Election {
    pub fn new(client: Client, key: &str, me: Leader, ttl: Duration, fence: Arc<Fence>) -> Election {
        Election { client, key: key.to_string(), me, ttl, fence }
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let mut kv = self.client.kv_client();
        let got = kv.get(self.key.clone(), None).await.map_err(etcd_error)?;
        Ok(got.kvs().first().and_then(|kv| parse_leader(kv.value())))
    }

    /// Campaigns until this node holds the key; calls `waiting` with the leader while another
    /// node does. Returns the lease that holds the key, which [`Election::keep`] then renews.
    pub async fn win(&self, waiting: &mut dyn FnMut(Option<&Leader>)) -> Result<i64, StoreError> {
        let value = serde_json::json!({"node": self.me.node, "advertise": self.me.advertise}).to_string();
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
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
                self.fence.hold(self.key.as_bytes().to_vec(), revision);
                tracing::info!(node = %self.me.node, revision, "won the election");
                return Ok(grant.id());
            }
            let _ = lease.revoke(grant.id()).await;
            waiting(self.leader().await?.as_ref());
            tokio::time::sleep((self.ttl / 4).max(Duration::from_millis(200))).await;
        }
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
    Some(Leader { node: v["node"].as_str()?.to_string(), advertise: v["advertise"].as_str()?.to_string() })
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
}

impl Cluster {
    pub async fn connect(endpoints: &[String], me: Leader, ttl: Duration) -> Result<Cluster, StoreError> {
        let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Open(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let fence = Arc::new(Fence::default());
        let election = Election::new(client.clone(), &format!("{PREFIX}leader"), me, ttl, fence.clone());
        Ok(Cluster { client, election, fence, endpoints: endpoints.to_vec() })
    }

    /// The store's backend, read from etcd now (call it once this node leads).
    pub async fn backend(&self) -> Result<crate::etcd::EtcdBackend, StoreError> {
        let _ = &self.client;
        crate::etcd::EtcdBackend::open(&self.endpoints, PREFIX, self.fence.clone()).await
    }
}
