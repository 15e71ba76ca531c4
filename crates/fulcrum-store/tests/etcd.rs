//! The etcd backend against a real etcd (Debian's `etcd-server`, which the test command
//! installs): what is committed is loaded back, big objects stay within etcd's limits and are
//! edited in place, and a commit without the leader's key is refused by etcd itself.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use fulcrum_store::etcd::{CHUNK_BYTES, EtcdBackend, Fence};
use fulcrum_store::{Indexer, Meta, Store, StoreError, WriteError};
use serde_json::{Value, json};

#[path = "../../fulcrum/tests/common/etcd.rs"]
#[allow(dead_code)]
mod etcd_support;
use etcd_support::Etcd;

fn etcd() -> Etcd {
    Etcd::start(1)
}

fn indexer() -> Indexer {
    Arc::new(|_kind: &str, v: &Value| Meta {
        tenant: "t".into(),
        name: v.get("name").and_then(Value::as_str).map(String::from),
        refs: vec![],
    })
}

/// Takes the election key for this test's "node"; the fence then carries it.
async fn lead(client: &mut etcd_client::Client, key: &str, node: &str) -> Arc<Fence> {
    let put = TxnOp::put(key, node, None::<PutOptions>);
    let txn = Txn::new().when([Compare::create_revision(key, CompareOp::Equal, 0)]).and_then([put]);
    assert!(client.txn(txn).await.unwrap().succeeded(), "the key was free");
    let got = client.get(key, None).await.unwrap();
    let fence = Arc::new(Fence::default());
    fence.hold(key.as_bytes().to_vec(), got.kvs()[0].create_revision());
    fence
}

async fn open(etcd: &Etcd, fence: Arc<Fence>) -> (Store, etcd_client::Client) {
    let mut attempts = 0;
    let backend = loop {
        match EtcdBackend::open(&etcd.urls, "/test/", fence.clone()).await {
            Ok(b) => break b,
            Err(e) if attempts < 40 => {
                attempts += 1;
                wait_a_little(&e).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let client = backend.client();
    (Store::open(backend, indexer()).unwrap(), client)
}

async fn wait_a_little(_e: &StoreError) {
    tokio::time::sleep(Duration::from_millis(250)).await;
}

/// Edits the big pool in place, as a PATCH does: one server's ratio, with its edit log.
async fn set_ratio(store: &Store, server: usize, ratio: i64) -> Result<(), WriteError<()>> {
    store
        .write(move |txn| {
            let edit = json!({"op": "replace", "path": format!("/servers/{server}/ratio"), "value": ratio});
            txn.edit_with("pool", "big", |_, value| {
                value["servers"][server]["ratio"] = json!(ratio);
                Ok::<_, ()>((Some(vec![edit]), ()))
            })
            .unwrap()
        })
        .await
}

fn servers(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"ip": {"addr": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256), "type": "V4"}, "port": 8080, "ratio": 1})).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_committed_loads_back_and_big_objects_are_edited_in_place() {
    let etcd = etcd();
    let mut client = etcd_client::Client::connect(etcd.urls.clone(), None).await.unwrap();
    let fence = lead(&mut client, "/test/leader", "n1").await;
    let (store, client) = open(&etcd, fence.clone()).await;
    // Small objects, a 5,000-server pool (about 400 KB of JSON: chunked), edits, a delete.
    store
        .write(|txn| -> Result<(), ()> {
            txn.put("pool", "small", json!({"name": "small", "servers": servers(3)}));
            txn.put("pool", "gone", json!({"name": "gone"}));
            txn.put("pool", "big", json!({"name": "big", "servers": servers(5000)}));
            Ok(())
        })
        .await
        .unwrap();
    let values = |prefix: &'static str| {
        let mut client = client.clone();
        async move {
            let r = client.get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap();
            r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value().len())).collect::<Vec<_>>()
        }
    };
    let chunks_before = values("/test/c/").await;
    assert!(chunks_before.len() >= 2, "the big pool is chunked: {chunks_before:?}");
    assert!(chunks_before.iter().all(|(_, len)| *len <= CHUNK_BYTES));
    for i in 0..20 {
        set_ratio(&store, 7, i + 2).await.unwrap();
    }
    store
        .write(|txn| -> Result<(), ()> {
            txn.delete("pool", "gone");
            Ok(())
        })
        .await
        .unwrap();
    // The edits wrote logs, not the pool.
    assert_eq!(values("/test/c/").await, chunks_before);
    let edits = values("/test/e/").await;
    assert_eq!(edits.len(), 20, "{edits:?}");
    assert!(edits.iter().all(|(_, len)| *len < 200), "{edits:?}");
    let expected = store.read().get("pool", "big").unwrap().value.clone();
    assert_eq!(expected["servers"][7]["ratio"], 21);
    drop(store);

    // Another process loads exactly what was committed.
    let (again, _) = open(&etcd, fence).await;
    let cat = again.read();
    assert_eq!(cat.get("pool", "big").unwrap().value, expected);
    assert_eq!(cat.get("pool", "small").unwrap().value["servers"].as_array().unwrap().len(), 3);
    assert!(cat.get("pool", "gone").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_the_election_key_commits_nothing() {
    let etcd = etcd();
    let mut client = etcd_client::Client::connect(etcd.urls.clone(), None).await.unwrap();
    let fence = lead(&mut client, "/test/leader", "n1").await;
    let (store, _) = open(&etcd, fence.clone()).await;
    store
        .write(|txn| -> Result<(), ()> {
            txn.put("pool", "p1", json!({"name": "p1"}));
            Ok(())
        })
        .await
        .unwrap();
    // The key passes to another node (n1's lease ran out, n2 won): n1 still believes it leads.
    client.delete("/test/leader", None).await.unwrap();
    let _n2 = lead(&mut client, "/test/leader", "n2").await;
    assert!(fence.is_held());
    let refused = store
        .write(|txn| -> Result<(), ()> {
            txn.put("pool", "p2", json!({"name": "p2", "servers": servers(5000)}));
            txn.put("pool", "p3", json!({"name": "p3"}));
            Ok(())
        })
        .await;
    assert!(matches!(refused, Err(WriteError::Storage(StoreError::NotLeader))), "{refused:?}");
    assert!(store.read().get("pool", "p3").is_none());
    let stored = client.get("/test/o/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let keys: Vec<_> = stored.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect();
    assert_eq!(keys, ["/test/o/pool/p1"], "nothing of the refused batch is stored");
    assert_eq!(client.get("/test/c/", Some(GetOptions::new().with_prefix())).await.unwrap().kvs().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sees_every_commit_through_its_feed_and_carries_on_as_leader() {
    let etcd = etcd();
    let mut client = etcd_client::Client::connect(etcd.urls.clone(), None).await.unwrap();
    let leader_fence = lead(&mut client, "/test/leader", "n1").await;
    let (leader, _) = open(&etcd, leader_fence.clone()).await;
    let follower_fence = Arc::new(Fence::default());
    let (follower, _) = open(&etcd, follower_fence.clone()).await;
    leader
        .write(|txn| -> Result<(), ()> {
            txn.put("pool", "big", json!({"name": "big", "servers": servers(5000)}));
            txn.put("pool", "small", json!({"name": "small"}));
            Ok(())
        })
        .await
        .unwrap();
    for i in 0..5 {
        set_ratio(&leader, 1, i + 2).await.unwrap();
    }
    leader
        .write(|txn| -> Result<(), ()> {
            txn.delete("pool", "small");
            Ok(())
        })
        .await
        .unwrap();
    // The follower's catalogue reaches the leader's revision and then holds the same objects.
    let revision = leader.applied().unwrap().current();
    tokio::time::timeout(Duration::from_secs(10), follower.applied().unwrap().wait(revision)).await.unwrap();
    let expected = leader.read().get("pool", "big").unwrap().value.clone();
    assert_eq!(follower.read().get("pool", "big").unwrap().value, expected);
    assert!(follower.read().get("pool", "small").is_none());
    // Without the key, the follower's own write is refused by etcd.
    let refused = follower
        .write(|txn| -> Result<(), ()> {
            txn.put("pool", "nope", json!({"name": "nope"}));
            Ok(())
        })
        .await;
    assert!(matches!(refused, Err(WriteError::Storage(StoreError::NotLeader))), "{refused:?}");

    // The leader goes; the follower takes the key and edits the big pool where the leader
    // left it (its feed kept the edit log's sequence).
    leader_fence.release();
    drop(leader);
    client.delete("/test/leader", None).await.unwrap();
    let won = lead(&mut client, "/test/leader", "n2").await;
    let (key, revision) = {
        let got = client.get("/test/leader", None).await.unwrap();
        (got.kvs()[0].key().to_vec(), got.kvs()[0].create_revision())
    };
    drop(won);
    follower_fence.hold(key, revision);
    set_ratio(&follower, 2, 9).await.unwrap();
    let mut expected = expected;
    expected["servers"][2]["ratio"] = json!(9);
    let (fresh, _) = open(&etcd, Arc::new(Fence::default())).await;
    assert_eq!(fresh.read().get("pool", "big").unwrap().value, expected);
    let edits = client.get("/test/e/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(edits.kvs().len(), 6, "five edits of the old leader and one of the new, none overwritten");
}
