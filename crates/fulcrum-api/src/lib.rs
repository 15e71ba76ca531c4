//! The HTTP edge of the controller: the Avi-compatible REST API.
//!
//! Architecture invariant: this is the one crate that wires schema, store and HTTP together;
//! the schema and store crates know nothing of HTTP.

pub mod access;
pub mod analytics;
pub mod app;
pub mod asyncpatch;
pub mod auth;
pub mod bootstrap;
pub mod cluster;
pub mod connections;
pub mod endpoints;
pub mod engines;
pub mod error;
pub mod forward;
pub mod images;
pub mod multipart;
pub mod objects;
pub mod server;
pub mod sessions;
pub mod system;
pub mod tls;
pub mod ui;
pub mod upgrade;
pub mod version;

pub use error::ApiError;
pub use server::{ClusterConfig, ServeConfig, ServeError, serve};
