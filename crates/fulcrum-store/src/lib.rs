//! Durable object storage and the in-memory catalogue that reads are served from.
//!
//! Architecture invariant: nothing here knows the object schema or HTTP. Objects are JSON with
//! an index entry ([`Meta`]) computed by the caller.
//! Architecture invariant: a change is visible to readers only after it is durable.

pub mod backend;
pub mod catalogue;
pub mod election;
pub mod etcd;
pub mod lsm;
pub mod writer;

pub use backend::{Backend, MemoryBackend, RedbBackend};
pub use catalogue::{Applied, Catalogue, Change, Indexer, Meta, Stored};
pub use lsm::{FjallBackend, migrate_from_redb};
pub use writer::{Health, Scratch, Store, Txn, WriteError};

/// Errors of the storage layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store: {0}")]
    Open(String),
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is shut down")]
    Closed,
    #[error("the write failed unexpectedly and was not stored")]
    Aborted,
    #[error("this controller is not the cluster leader: it commits nothing")]
    NotLeader,
    /// The backend did not answer in time (etcd without a quorum): the commit may or may not
    /// have happened, and is seen whole or not at all.
    #[error("{0}")]
    Indeterminate(String),
}
