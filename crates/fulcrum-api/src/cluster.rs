//! This node's place in the controller cluster. Every operation that only the leader may
//! perform (uploads, image deletion) asks [`require_leader`], and nothing else decides it.

use axum::http::StatusCode;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRole {
    Leader,
    /// A member that follows the leader at this address (`https://10.0.0.1:9443`).
    Follower {
        leader: String,
    },
}

/// This node in a cluster on etcd: the store's cluster handle and who leads, as this node last
/// learned it (from winning, or from the election key while it waits).
pub struct Membership {
    pub cluster: fulcrum_store::election::Cluster,
    /// Who leads as this node last learned it; a change wakes requests it is passing on.
    known_leader: tokio::sync::watch::Sender<Option<fulcrum_store::election::Leader>>,
    /// The controllers as last read from etcd (told to agents with every heartbeat).
    known_nodes: std::sync::RwLock<Vec<fulcrum_store::election::NodeState>>,
}

impl Membership {
    pub fn new(cluster: fulcrum_store::election::Cluster) -> Membership {
        Membership {
            cluster,
            known_leader: tokio::sync::watch::Sender::new(None),
            known_nodes: std::sync::RwLock::default(),
        }
    }

    pub fn me(&self) -> fulcrum_store::election::Leader {
        self.cluster.election.me()
    }

    /// Who leads: as last learned, else as the election key says now.
    pub async fn current_leader(&self) -> Option<fulcrum_store::election::Leader> {
        if let Some(known) = self.leader() {
            return Some(known);
        }
        let found = self.cluster.election.leader().await.ok().flatten();
        if found.is_some() {
            self.set_leader(found.clone());
        }
        found
    }

    /// Every controller that joined, read from etcd now (and remembered for [`Self::controllers`]).
    pub async fn nodes(&self) -> Result<Vec<fulcrum_store::election::NodeState>, fulcrum_store::StoreError> {
        let nodes = self.cluster.nodes().await?;
        *self.known_nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes.clone();
        Ok(nodes)
    }

    /// Every controller that joined, as last read.
    pub fn known_nodes(&self) -> Vec<fulcrum_store::election::NodeState> {
        self.known_nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The controllers an agent may talk to, as last read.
    pub fn controllers(&self) -> Vec<fulcrum_se_protocol::ControllerAddress> {
        let nodes = self.known_nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .map(|n| fulcrum_se_protocol::ControllerAddress { url: n.advertise.clone(), pin: n.pin.clone() })
            .collect()
    }

    pub fn role(&self) -> NodeRole {
        if self.cluster.leads() {
            return NodeRole::Leader;
        }
        let leader = self.known_leader.borrow().clone();
        NodeRole::Follower { leader: leader.map_or_else(|| "(being elected)".to_string(), |l| l.advertise) }
    }

    pub fn leader(&self) -> Option<fulcrum_store::election::Leader> {
        self.known_leader.borrow().clone()
    }

    /// Resolves when the leader this node knows of changes.
    pub fn leader_changes(&self) -> tokio::sync::watch::Receiver<Option<fulcrum_store::election::Leader>> {
        self.known_leader.subscribe()
    }

    fn set_leader(&self, leader: Option<fulcrum_store::election::Leader>) {
        self.known_leader.send_if_modified(|known| {
            let changed = *known != leader;
            *known = leader;
            changed
        });
    }
}

/// The one home of the work only the leader does: the async PATCH merge timer, the SE loop
/// (liveness, licenses, placement), the upgrade executor, the sweep of stored sessions, the
/// cluster object's node list and the image records' per-node copy states. Started when this node leads,
/// each resuming from what is stored; stopped when it no longer does.
pub struct LeaderServices {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LeaderServices {
    pub fn start(app: &std::sync::Arc<crate::app::App>) -> LeaderServices {
        {
            // What was queued before (by this node or a leader before it) is merged from here.
            let cat = app.store.read();
            let requests: Vec<_> = cat.iter(crate::asyncpatch::KIND).cloned().collect();
            let cycles: Vec<_> = cat.iter(crate::asyncpatch::CYCLE_KIND).cloned().collect();
            app.async_patches.recover(&requests, &cycles);
        }
        app.engines.begin_watch();
        app.upgrade.take_over(&app.store.read());
        let tasks = vec![
            tokio::spawn(crate::asyncpatch::run_timer(app.clone())),
            tokio::spawn(crate::engines::run(app.clone())),
            tokio::spawn(crate::upgrade::run(app.clone())),
            tokio::spawn(crate::sessions::run_sweeper(app.clone())),
            tokio::spawn(crate::system::run_cluster_object(app.clone())),
            tokio::spawn(crate::images::replica::run_node_states(app.clone())),
        ];
        LeaderServices { tasks }
    }

    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// A cluster node's life: campaign, lead (with the leader services) while the lease holds,
/// then campaign again. Never returns.
pub async fn run_leadership(app: std::sync::Arc<crate::app::App>) {
    let Some(membership) = app.cluster.clone() else { return };
    loop {
        let won = membership.cluster.election.win(&mut |leader| membership.set_leader(leader.cloned())).await;
        let (lease, revision) = match won {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(error = %e, "cannot campaign for the leadership; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        // Before the first commit: the catalogue holds everything the leaders before committed
        // (their fences died when this node created the key, so nothing more of theirs lands).
        if let Some(applied) = app.store.applied()
            && let Err(e) = membership.cluster.consistent(applied, std::time::Duration::from_secs(30)).await
        {
            tracing::error!(error = %e, "cannot catch up with the cluster; leading anyway");
        }
        membership.cluster.election.hold(revision);
        membership.set_leader(Some(membership.me()));
        tracing::info!(node = %membership.me().node, "leading the cluster");
        // The first leader of a new store makes its defaults; every leader clears what
        // interrupted uploads left.
        if let Err(e) = crate::server::bootstrap_once(&app.store, &app.data_dir, &app.listen.ip().to_string()).await {
            tracing::error!(error = %e, "cannot make the default objects");
        }
        if let Err(e) = ensure_secret(&app.store).await {
            tracing::error!(error = %e, "cannot make the secret controllers pass requests on with");
        }
        if let Err(e) = app.images.recover(&app.store).await {
            tracing::warn!(error = %e, "cannot clear interrupted uploads");
        }
        let services = LeaderServices::start(&app);
        let lost = membership.cluster.election.keep(lease).await;
        services.stop();
        membership.set_leader(None);
        tracing::warn!(error = %lost, node = %membership.me().node, "no longer the leader; following");
    }
}

/// The kind holding the secret controllers show each other when one passes a request on (only
/// nodes that read the store know it): the leader then trusts what the follower says of the
/// client, such as its address, and accepts the follower's internal calls.
const SECRET_KIND: &str = "clustersecret";
const SECRET_UUID: &str = "forwarding";
pub const SECRET_HEADER: &str = "x-fulcrum-cluster-secret";
/// The client's address, as the follower that passed the request on saw it.
pub const CLIENT_HEADER: &str = "x-fulcrum-client";

pub fn secret(app: &crate::app::App) -> Option<String> {
    let cat = app.store.read();
    cat.get(SECRET_KIND, SECRET_UUID)?.value.get("secret")?.as_str().map(String::from)
}

/// Whether the request was passed on by another controller of this cluster.
pub fn from_peer(app: &crate::app::App, headers: &axum::http::HeaderMap) -> bool {
    use sha2::{Digest, Sha256};
    let (Some(shown), Some(known)) = (headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok()), secret(app)) else {
        return false;
    };
    // Digests compared, so the time taken does not say how much of the secret was right.
    Sha256::digest(shown.as_bytes()) == Sha256::digest(known.as_bytes())
}

/// Made once by the first leader; every later leader finds it.
pub async fn ensure_secret(store: &fulcrum_store::Store) -> Result<(), ApiError> {
    if store.read().get(SECRET_KIND, SECRET_UUID).is_some() {
        return Ok(());
    }
    let secret = crate::auth::random_token(40);
    store
        .write(move |txn| {
            if txn.get(SECRET_KIND, SECRET_UUID).is_none() {
                txn.put(SECRET_KIND, SECRET_UUID, serde_json::json!({ "secret": secret }));
            }
            Ok::<_, ApiError>(())
        })
        .await?;
    Ok(())
}

/// What a follower tells the leader about a request it passes on.
pub struct Hop {
    /// This node's name.
    pub me: String,
    /// The client's address.
    pub client: String,
    pub secret: Option<String>,
}

impl Hop {
    pub fn new(app: &crate::app::App, membership: &Membership, client: String) -> Hop {
        Hop { me: membership.me().node, client, secret: secret(app) }
    }
}

/// Passes a request on to the leader and returns its answer. While no leader is known, or
/// the one known cannot be reached (it died, and its lease has not run out yet), the request
/// waits for the next leader, for at most twice the lease's time to live: an election then
/// costs the client time, not an error. A request that may have reached a leader is never
/// sent twice: if that leader is replaced before it answers (paused, partitioned), the client
/// gets a 503 and decides.
pub async fn pass_on(
    membership: &Membership,
    hop: &Hop,
    parts: &axum::http::request::Parts,
    body: bytes::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let patience = membership.cluster.election.ttl() * 2 + std::time::Duration::from_secs(1);
    let deadline = tokio::time::Instant::now() + patience;
    let mut changes = membership.leader_changes();
    loop {
        changes.mark_unchanged();
        let Some(leader) = membership.current_leader().await else {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return Err(no_leader());
            }
            continue;
        };
        // Finding the leader may itself have recorded it: only a change from now counts.
        changes.mark_unchanged();
        let answer = tokio::select! {
            answer = crate::forward::to_leader(&leader, hop, parts, body.clone()) => answer,
            _ = changes.changed() => return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cluster's leader changed while the request was passed on; retry it",
            )),
        };
        match answer {
            Err(crate::forward::Undelivered::NotSent(e)) => {
                // Nothing was sent: wait for the election to name another leader, then send it there.
                if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                    return Err(e);
                }
            }
            answer => return answer.map_err(ApiError::from),
        }
    }
}

fn no_leader() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no controller leads the cluster at the moment; retry shortly")
}

/// A request of this node's own (not a client's) to the leader, such as recording sessions,
/// passed on as a client's would be.
pub async fn call_leader(
    membership: &Membership,
    hop: &Hop,
    path: &str,
    body: bytes::Bytes,
) -> Result<axum::response::Response, ApiError> {
    let (parts, ()) = axum::http::Request::builder()
        .method(axum::http::Method::POST)
        .uri(path)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(())
        .map_err(|e| ApiError::internal(e.to_string()))?
        .into_parts();
    pass_on(membership, hop, &parts, body).await
}

/// Refuses the request on a follower, naming the leader so the client knows where to go.
pub fn require_leader(role: &NodeRole, what: &str) -> Result<(), ApiError> {
    match role {
        NodeRole::Leader => Ok(()),
        NodeRole::Follower { leader } => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!("{what} is accepted only on the cluster leader, at {leader}; this node is a follower"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_name_the_leader() {
        assert!(require_leader(&NodeRole::Leader, "An upload").is_ok());
        let err =
            require_leader(&NodeRole::Follower { leader: "https://10.0.0.1:9443".into() }, "An upload").unwrap_err();
        assert_eq!(err.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(err.message.contains("https://10.0.0.1:9443"), "{}", err.message);
    }
}
