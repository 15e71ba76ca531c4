//! The manifest: what a package is, what it needs, and the hash of every file it carries.
//!
//! The manifest is the only thing that is signed, so everything a controller or an SE trusts
//! about a package is either in it or hashed by it.

use std::cmp::Ordering;
use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::PackageError;

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_PATH: &str = "manifest.json";
pub const SIGNATURE_PATH: &str = "manifest.sig";
/// Where a package's controller files and its SE image live inside the archive.
pub const CONTROLLER_ROOT: &str = "controller/";
pub const SE_ROOT: &str = "se/";
/// A manifest larger than this is not a manifest (it is read into memory).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageKind {
    /// A controller for VM-based installs (controller.pkg); carries an SE image too.
    Controller,
    /// A Docker-based controller (controller_docker.tgz).
    ControllerDocker,
    /// A full patch: controller and SE (avi_patch.pkg).
    AviPatch,
    /// A controller patch (controller_patch.pkg).
    ControllerPatch,
    /// An SE patch (se_patch.pkg).
    SePatch,
    /// A composite: a base image and optionally a controller patch and an SE patch.
    Bundle,
}

impl PackageKind {
    pub const ALL: [PackageKind; 6] = [
        PackageKind::Controller,
        PackageKind::ControllerDocker,
        PackageKind::AviPatch,
        PackageKind::ControllerPatch,
        PackageKind::SePatch,
        PackageKind::Bundle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PackageKind::Controller => "controller",
            PackageKind::ControllerDocker => "controller_docker",
            PackageKind::AviPatch => "avi_patch",
            PackageKind::ControllerPatch => "controller_patch",
            PackageKind::SePatch => "se_patch",
            PackageKind::Bundle => "bundle",
        }
    }

    pub fn parse(s: &str) -> Option<PackageKind> {
        PackageKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn is_patch(self) -> bool {
        matches!(self, PackageKind::AviPatch | PackageKind::ControllerPatch | PackageKind::SePatch)
    }

    /// Whether the kind carries controller files and an SE image: (required, allowed) each.
    fn payloads(self) -> (Presence, Presence) {
        use Presence::*;
        match self {
            PackageKind::Controller | PackageKind::AviPatch => (Required, Required),
            PackageKind::ControllerDocker => (Required, Optional),
            PackageKind::ControllerPatch => (Required, Forbidden),
            PackageKind::SePatch => (Forbidden, Required),
            PackageKind::Bundle => (Forbidden, Forbidden),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Presence {
    Required,
    Optional,
    Forbidden,
}

/// What the target must offer before the package may be installed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Free disk the controller needs to install the package.
    #[serde(default)]
    pub controller_free_disk_bytes: u64,
    /// Free disk each SE needs to install the SE image.
    #[serde(default)]
    pub se_free_disk_bytes: u64,
    /// Oldest Docker version a Docker-based controller may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_version: Option<String>,
    /// Cloud types the version supports (`CLOUD_NONE`, `CLOUD_VCENTER`, ...); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cloud_types: Vec<String>,
}

/// The controller files or the SE image: a directory of the archive and optional hooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// `controller/` or `se/`.
    pub root: String,
    /// Run before the files are switched in, from inside the new slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_install: Option<String>,
    /// Run after the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_install: Option<String>,
    /// Run once the new version has restarted; failing it switches back to the old slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

impl Payload {
    /// The hooks that exist, with their names.
    pub fn hooks(&self) -> impl Iterator<Item = &String> {
        [&self.pre_install, &self.post_install, &self.health_check].into_iter().flatten()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub sha256: String,
    pub size: u64,
    /// Unix permission bits (executables keep theirs).
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentRole {
    Base,
    ControllerPatch,
    SePatch,
}

impl ComponentRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentRole::Base => "base",
            ComponentRole::ControllerPatch => "controller_patch",
            ComponentRole::SePatch => "se_patch",
        }
    }

    /// The package kinds a component in this role may be.
    fn accepts(self, kind: PackageKind) -> bool {
        match self {
            ComponentRole::Base => matches!(kind, PackageKind::Controller | PackageKind::ControllerDocker),
            ComponentRole::ControllerPatch => kind == PackageKind::ControllerPatch,
            ComponentRole::SePatch => kind == PackageKind::SePatch,
        }
    }
}

/// A package inside a bundle: a file of the bundle that is itself a signed package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub role: ComponentRole,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub product: String,
    pub kind: PackageKind,
    /// `30.2.1`
    pub version: String,
    pub build: u64,
    /// `20261122.101500` (UTC)
    pub build_date: String,
    /// `30.2.1-9001-20261122.101500`, or `30.2.1-9001-2p1-20261122.101500` for a patch.
    pub tag: String,
    /// `2p1` for patches; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_version: Option<String>,
    /// The oldest version this package upgrades from.
    pub min_version: String,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se_image: Option<Payload>,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
}

/// The image name the product gives a build: `version-build[-patch]-date`.
pub fn tag_of(version: &str, build: u64, patch_version: Option<&str>, build_date: &str) -> String {
    match patch_version {
        Some(p) => format!("{version}-{build}-{p}-{build_date}"),
        None => format!("{version}-{build}-{build_date}"),
    }
}

/// `30.2.1` → [30, 2, 1]; two to four numeric parts.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    let parts: Vec<u64> =
        v.split('.').map(|p| p.parse().ok().filter(|_| !p.is_empty() && p.len() <= 6)).collect::<Option<_>>()?;
    (2..=4).contains(&parts.len()).then_some(parts)
}

/// Orders versions numerically, a missing part counting as 0 (`30.2` == `30.2.0`).
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse_version(a)?, parse_version(b)?);
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Some((0..len).map(|i| at(&a, i).cmp(&at(&b, i))).find(|o| o.is_ne()).unwrap_or(Ordering::Equal))
}

/// `2p1` → (2, 1).
pub fn parse_patch_version(p: &str) -> Option<(u64, u64)> {
    let (major, minor) = p.split_once('p')?;
    let number = |s: &str| {
        s.parse::<u64>().ok().filter(|_| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit()))
    };
    Some((number(major)?, number(minor)?))
}

fn is_build_date(d: &str) -> bool {
    let b = d.as_bytes();
    b.len() == 15 && b[8] == b'.' && b.iter().enumerate().all(|(i, c)| i == 8 || c.is_ascii_digit())
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A path inside an archive that cannot escape the directory it is unpacked into: relative,
/// no `..` or `.` segments, no empty segments, no backslashes or NULs.
pub fn check_entry_path(path: &str) -> Result<(), PackageError> {
    let bad = |why: &str| Err(PackageError::UnsafePath(format!("'{path}' {why}")));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.starts_with('/') {
        return bad("is absolute");
    }
    if path.contains('\\') || path.contains('\0') {
        return bad("contains a backslash or NUL");
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    for segment in trimmed.split('/') {
        match segment {
            ".." => return bad("contains '..'"),
            "." | "" => return bad("contains an empty or '.' segment"),
            _ => {}
        }
    }
    Ok(())
}

impl Manifest {
    pub fn is_patch(&self) -> bool {
        self.kind.is_patch()
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    pub fn component(&self, role: ComponentRole) -> Option<&Component> {
        self.components.iter().find(|c| c.role == role)
    }

    /// Total bytes of the files the manifest lists.
    pub fn payload_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Checks everything about the manifest that does not need the files.
    pub fn check(&self) -> Result<(), PackageError> {
        let bad = |msg: String| Err(PackageError::Manifest(msg));
        if self.format != FORMAT_VERSION {
            return bad(format!("format {} is not supported (expected {FORMAT_VERSION})", self.format));
        }
        if self.product.trim().is_empty() {
            return bad("product is empty".into());
        }
        for (field, v) in [("version", &self.version), ("min_version", &self.min_version)] {
            if parse_version(v).is_none() {
                return bad(format!("{field} '{v}' is not a version such as 30.2.1"));
            }
        }
        if compare_versions(&self.min_version, &self.version) == Some(Ordering::Greater) {
            return bad(format!("min_version {} is newer than version {}", self.min_version, self.version));
        }
        if self.build == 0 {
            return bad("build must be a positive number".into());
        }
        if !is_build_date(&self.build_date) {
            return bad(format!("build_date '{}' must look like 20261122.101500", self.build_date));
        }
        match (&self.patch_version, self.kind.is_patch()) {
            (None, true) => return bad(format!("a {} package needs a patch_version such as 2p1", self.kind.as_str())),
            (Some(_), false) => return bad(format!("a {} package has no patch_version", self.kind.as_str())),
            (Some(p), true) if parse_patch_version(p).is_none() => {
                return bad(format!("patch_version '{p}' must look like 2p1"));
            }
            _ => {}
        }
        let expected = tag_of(&self.version, self.build, self.patch_version.as_deref(), &self.build_date);
        if self.tag != expected {
            return bad(format!(
                "tag '{}' does not match version, build, patch and date (expected '{expected}')",
                self.tag
            ));
        }
        if self.kind == PackageKind::ControllerDocker && self.requirements.docker_version.is_none() {
            return bad("a controller_docker package must state requirements.docker_version".into());
        }
        if let Some(d) = &self.requirements.docker_version
            && parse_version(d).is_none()
        {
            return bad(format!("requirements.docker_version '{d}' is not a version"));
        }
        let mut seen = HashSet::new();
        for file in &self.files {
            check_entry_path(&file.path)?;
            if file.path == MANIFEST_PATH || file.path == SIGNATURE_PATH || file.path.ends_with('/') {
                return bad(format!("files lists '{}', which cannot be a payload file", file.path));
            }
            if !seen.insert(file.path.as_str()) {
                return bad(format!("files lists '{}' twice", file.path));
            }
            if !is_sha256_hex(&file.sha256) {
                return bad(format!("the sha256 of '{}' is not 64 lowercase hex digits", file.path));
            }
        }
        let (controller, se) = self.kind.payloads();
        self.check_payload("controller", &self.controller, CONTROLLER_ROOT, controller)?;
        self.check_payload("se_image", &self.se_image, SE_ROOT, se)?;
        self.check_components()?;
        for file in &self.files {
            let in_payload = [(&self.controller, CONTROLLER_ROOT), (&self.se_image, SE_ROOT)]
                .iter()
                .any(|(p, root)| p.is_some() && file.path.starts_with(root));
            let is_component = self.components.iter().any(|c| c.path == file.path);
            if !in_payload && !is_component {
                return bad(format!("file '{}' is neither under a payload root nor a component", file.path));
            }
        }
        Ok(())
    }

    fn check_payload(
        &self,
        field: &str,
        payload: &Option<Payload>,
        root: &str,
        presence: Presence,
    ) -> Result<(), PackageError> {
        let kind = self.kind.as_str();
        let bad = |msg: String| Err(PackageError::Manifest(msg));
        let Some(payload) = payload else {
            return if presence == Presence::Required {
                bad(format!("a {kind} package must have '{field}' (files under {root})"))
            } else {
                Ok(())
            };
        };
        if presence == Presence::Forbidden {
            return bad(format!("a {kind} package has no '{field}'"));
        }
        if payload.root != root {
            return bad(format!("{field}.root must be '{root}', got '{}'", payload.root));
        }
        if !self.files.iter().any(|f| f.path.starts_with(root)) {
            return bad(format!("{field} has no files under {root}"));
        }
        for hook in payload.hooks() {
            if !hook.starts_with(root) || self.file(hook).is_none() {
                return bad(format!("{field} hook '{hook}' is not a file of the package under {root}"));
            }
        }
        Ok(())
    }

    fn check_components(&self) -> Result<(), PackageError> {
        let bad = |msg: String| Err(PackageError::Manifest(msg));
        if self.kind != PackageKind::Bundle {
            return if self.components.is_empty() {
                Ok(())
            } else {
                bad(format!("a {} package has no components", self.kind.as_str()))
            };
        }
        if self.component(ComponentRole::Base).is_none() {
            return bad("a bundle must have a base component".into());
        }
        let mut roles = HashSet::new();
        for c in &self.components {
            if !roles.insert(c.role) {
                return bad(format!("a bundle has one {} component at most", c.role.as_str()));
            }
            if self.file(&c.path).is_none() {
                return bad(format!("component '{}' is not listed in files", c.path));
            }
        }
        if self.files.len() != self.components.len() {
            return bad("a bundle carries only its components".into());
        }
        Ok(())
    }

    /// Checks a verified component's manifest against its role and the bundle.
    pub fn check_component(&self, role: ComponentRole, part: &Manifest) -> Result<(), PackageError> {
        let bad = |msg: String| Err(PackageError::Manifest(msg));
        if !role.accepts(part.kind) {
            return bad(format!("the {} component is a {} package", role.as_str(), part.kind.as_str()));
        }
        if role == ComponentRole::Base {
            if (part.version.as_str(), part.build, part.build_date.as_str())
                != (self.version.as_str(), self.build, self.build_date.as_str())
            {
                return bad(format!("the bundle's version, build and date must be its base's ({})", part.tag));
            }
        } else if compare_versions(&part.version, &self.version) != Some(Ordering::Equal) {
            return bad(format!(
                "the {} component is for version {}, the bundle is {}",
                role.as_str(),
                part.version,
                self.version
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(kind: PackageKind) -> Manifest {
        let patch = kind.is_patch().then(|| "2p1".to_string());
        let (controller, se) = kind.payloads();
        let mut files = Vec::new();
        let payload = |presence: Presence, root: &str, files: &mut Vec<FileEntry>| {
            (presence == Presence::Required).then(|| {
                files.push(FileEntry {
                    path: format!("{root}bin/fulcrum"),
                    sha256: "a".repeat(64),
                    size: 3,
                    mode: 0o755,
                });
                Payload { root: root.into(), pre_install: None, post_install: None, health_check: None }
            })
        };
        let controller = payload(controller, CONTROLLER_ROOT, &mut files);
        let se_image = payload(se, SE_ROOT, &mut files);
        let mut components = Vec::new();
        if kind == PackageKind::Bundle {
            files.push(FileEntry { path: "base.pkg".into(), sha256: "b".repeat(64), size: 10, mode: 0o644 });
            components.push(Component { role: ComponentRole::Base, path: "base.pkg".into() });
        }
        let date = "20261122.101500".to_string();
        Manifest {
            format: 1,
            product: "fulcrum".into(),
            kind,
            tag: tag_of("30.2.2", 9100, patch.as_deref(), &date),
            version: "30.2.2".into(),
            build: 9100,
            build_date: date,
            patch_version: patch,
            min_version: "30.1.1".into(),
            requirements: Requirements {
                docker_version: (kind == PackageKind::ControllerDocker).then(|| "20.10".into()),
                ..Requirements::default()
            },
            controller,
            se_image,
            files,
            components,
        }
    }

    #[test]
    fn every_kind_has_a_valid_sample() {
        for kind in PackageKind::ALL {
            sample(kind).check().unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
    }

    #[test]
    fn tags_follow_the_product() {
        assert_eq!(tag_of("18.2.7", 5000, None, "20191009.205501"), "18.2.7-5000-20191009.205501");
        assert_eq!(tag_of("23.1.1", 7189, Some("2p1"), "20221216.192828"), "23.1.1-7189-2p1-20221216.192828");
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("30.2.10", "30.2.9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("30.2", "30.2.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("18.2.7", "30.1.1"), Some(Ordering::Less));
        assert_eq!(compare_versions("x", "30.1.1"), None);
        assert_eq!(parse_patch_version("2p1"), Some((2, 1)));
        assert_eq!(parse_patch_version("p1"), None);
    }

    #[test]
    fn entry_paths_cannot_escape() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", ""] {
            assert!(check_entry_path(bad).is_err(), "{bad}");
        }
        for good in ["controller/bin/fulcrum", "se/", "a..b/c"] {
            check_entry_path(good).unwrap();
        }
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            ("tag", Box::new(|m| m.tag = "30.2.2-1-20261122.101500".into())),
            ("patch_version", Box::new(|m| m.patch_version = Some("2p1".into()))),
            ("min_version", Box::new(|m| m.min_version = "31.1.1".into())),
            ("build_date", Box::new(|m| m.build_date = "2026-11-22".into())),
            ("twice", Box::new(|m| m.files.push(m.files[0].clone()))),
            ("sha256", Box::new(|m| m.files[0].sha256 = "xyz".into())),
            ("'se_image'", Box::new(|m| m.se_image = None)),
            (
                "neither",
                Box::new(|m| {
                    let mut extra = m.files[0].clone();
                    extra.path = "other/x".into();
                    m.files.push(extra);
                }),
            ),
            ("'..'", Box::new(|m| m.files[0].path = "controller/../../etc/passwd".into())),
            ("hook", Box::new(|m| m.controller.as_mut().unwrap().pre_install = Some("controller/missing".into()))),
            (
                "no components",
                Box::new(|m| m.components.push(Component { role: ComponentRole::Base, path: "x".into() })),
            ),
        ];
        for (expected, mutate) in mutations {
            let mut m = sample(PackageKind::Controller);
            mutate(&mut m);
            let err = m.check().unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn bundles_need_a_base_and_one_of_each_role() {
        let mut m = sample(PackageKind::Bundle);
        m.components.clear();
        assert!(m.check().unwrap_err().to_string().contains("base component"));
        let mut m = sample(PackageKind::Bundle);
        m.components.push(m.components[0].clone());
        assert!(m.check().unwrap_err().to_string().contains("at most"));
        let bundle = sample(PackageKind::Bundle);
        bundle.check_component(ComponentRole::Base, &sample(PackageKind::Controller)).unwrap();
        assert!(bundle.check_component(ComponentRole::Base, &sample(PackageKind::SePatch)).is_err());
        assert!(bundle.check_component(ComponentRole::SePatch, &sample(PackageKind::SePatch)).is_ok());
    }
}
