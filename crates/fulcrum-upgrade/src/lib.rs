//! Upgrade orchestration without I/O: the 22 prechecks over a snapshot of facts, and the
//! persisted state of an operation (controller steps, SE groups, SEs) with its transitions.
//! The controller gathers the facts and drives the steps; everything deciding lives here, so
//! it is tested without a controller. See docs/prechecks.md.

pub mod checks;
pub mod operation;

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// What a node (the controller, an SE) runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub build: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
}

impl Version {
    pub fn new(version: &str, build: u64, patch: Option<&str>) -> Version {
        Version { version: version.into(), build, patch: patch.map(String::from) }
    }

    /// `30.2.1-9001` or `30.2.1-9001-2p1`.
    pub fn label(&self) -> String {
        match &self.patch {
            Some(p) => format!("{}-{}-{p}", self.version, self.build),
            None => format!("{}-{}", self.version, self.build),
        }
    }

    /// Parses a label.
    pub fn parse(label: &str) -> Option<Version> {
        let mut parts = label.splitn(3, '-');
        let version = parts.next()?.to_string();
        let build = parts.next()?.parse().ok()?;
        Some(Version { version, build, patch: parts.next().map(String::from) })
    }

    /// Orders base versions (version, then build), patches aside.
    pub fn cmp_base(&self, other: &Version) -> Ordering {
        fulcrum_package::compare_versions(&self.version, &other.version)
            .unwrap_or(Ordering::Equal)
            .then(self.build.cmp(&other.build))
    }

    pub fn same_base(&self, other: &Version) -> bool {
        self.cmp_base(other) == Ordering::Equal
    }

    pub fn base(&self) -> Version {
        Version { patch: None, ..self.clone() }
    }
}

/// The operations of the product's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Ops {
    Upgrade,
    Patch,
    Rollback,
    Rollbackpatch,
    SegroupResume,
}

impl Ops {
    pub fn as_str(self) -> &'static str {
        match self {
            Ops::Upgrade => "UPGRADE",
            Ops::Patch => "PATCH",
            Ops::Rollback => "ROLLBACK",
            Ops::Rollbackpatch => "ROLLBACKPATCH",
            Ops::SegroupResume => "SEGROUP_RESUME",
        }
    }

    pub fn is_rollback(self) -> bool {
        matches!(self, Ops::Rollback | Ops::Rollbackpatch)
    }
}

/// `se_group_options.action_on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ActionOnError {
    #[default]
    #[serde(rename = "SUSPEND_UPGRADE_OPS_ON_ERROR")]
    Suspend,
    #[serde(rename = "CONTINUE_UPGRADE_OPS_ON_ERROR")]
    Continue,
    #[serde(rename = "ROLLBACK_UPGRADE_OPS_ON_ERROR")]
    Rollback,
}

impl ActionOnError {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionOnError::Suspend => "SUSPEND_UPGRADE_OPS_ON_ERROR",
            ActionOnError::Continue => "CONTINUE_UPGRADE_OPS_ON_ERROR",
            ActionOnError::Rollback => "ROLLBACK_UPGRADE_OPS_ON_ERROR",
        }
    }
}

/// What the controller knows about an image that takes part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFacts {
    pub uuid: String,
    pub name: String,
    /// The package kind (`controller`, `se_patch`, `bundle`, ...).
    pub kind: String,
    /// What a node runs once it has installed this image.
    pub target: Version,
    pub min_version: String,
    pub se_free_disk_bytes: u64,
    pub controller_free_disk_bytes: u64,
    pub cloud_types: Vec<String>,
    pub docker_version: Option<String>,
    pub carries_controller: bool,
    pub carries_se: bool,
    /// Names of the patches a bundle carries.
    pub bundle_patches: Vec<String>,
    pub size: u64,
    /// Whether the image's file is present and whole on every cluster member (and which are not).
    pub missing_on: Vec<String>,
}
