//! Controllers of a cluster on a real etcd, as the cluster tests start them.

use std::path::Path;
use std::time::Duration;

use super::etcd::Etcd;
use super::{Controller, Launch, spawn};

/// A controller named `name` of the cluster on `etcd` at address `ip` (lease TTL 2 s), with
/// more `serve` arguments, and HTTPS when `https`.
pub fn node_with(data: &Path, etcd: &Etcd, name: &str, ip: &str, extra: &[&str], https: bool) -> Controller {
    let endpoints = etcd.endpoints();
    let mut args = vec!["--etcd", endpoints.as_str(), "--node-name", name, "--lease-ttl", "2"];
    args.extend_from_slice(extra);
    let listen = format!("{ip}:0");
    let launch = Launch { args: &args, listen: &listen, plain_http: !https, ..Launch::plain(data) };
    spawn(launch).listening(Duration::from_secs(30)).unwrap()
}
