//! The 22 prechecks of the product document, in its order, each over [`Facts`] the controller
//! measured. Errors block an operation; warnings block it unless `skip_warnings`. Levels and
//! what each measures: docs/prechecks.md.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::{ActionOnError, ImageFacts, Ops, Version};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    #[serde(rename = "UPGRADE_PRE_CHECK_SUCCESS")]
    Success,
    #[serde(rename = "UPGRADE_PRE_CHECK_WARNING")]
    Warning,
    #[serde(rename = "UPGRADE_PRE_CHECK_ERROR")]
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub check_code: String,
    pub description: String,
    pub state: Level,
    pub details: Vec<String>,
}

/// What is asked: which nodes take part and what they install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub ops: Ops,
    pub controller: bool,
    /// SE group uuids that take part.
    pub groups: Vec<String>,
    /// What the controller installs (an upgrade's image, a patch's controller patch).
    pub controller_image: Option<ImageFacts>,
    /// What the SEs install.
    pub se_image: Option<ImageFacts>,
    pub action_on_error: ActionOnError,
    pub disruptive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeFacts {
    pub uuid: String,
    pub name: String,
    pub up: bool,
    pub licensed: bool,
    pub running: Option<Version>,
    pub previous: Option<Version>,
    pub free_disk_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VsFacts {
    pub name: String,
    /// SE uuids it runs on.
    pub on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupFacts {
    pub uuid: String,
    pub name: String,
    pub ses: Vec<SeFacts>,
    pub virtualservices: Vec<VsFacts>,
    /// An operation holds the group (in progress or suspended), described.
    pub held_by: Option<String>,
    pub suspended: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub controller: Version,
    pub controller_previous: Option<Version>,
    /// Why the controller cluster is not ready, if it is not.
    pub cluster_problem: Option<String>,
    /// (controllers up, controllers in the cluster).
    pub cluster_nodes: (usize, usize),
    pub backup_age_secs: Option<u64>,
    /// `enforcing`, `permissive`, or `None` when SELinux is absent.
    pub selinux: Option<String>,
    pub operation_in_progress: Option<String>,
    /// Every SE group (those not taking part count for the active versions).
    pub groups: Vec<GroupFacts>,
    pub controller_free_disk_bytes: u64,
    pub gslb_services: Vec<String>,
    /// Objects that do not validate under the new version's schema.
    pub config_problems: Vec<String>,
    pub open_alerts: Vec<String>,
    pub max_alerts: usize,
    /// (name, vtype) of every cloud.
    pub clouds: Vec<(String, String)>,
    /// The Docker version the controller runs under, when it runs in Docker.
    pub controller_docker_version: Option<String>,
    pub controller_address: String,
    /// Whether that address was assigned by DHCP (`None`: unknown).
    pub address_dynamic: Option<bool>,
    /// What each controller node's systemd says of service start timeouts.
    pub systemd: Vec<NodeSystemd>,
    /// (node, free bytes) of the cluster's other controller nodes, as each last reported.
    pub other_nodes_free_disk: Vec<(String, u64)>,
}

/// A controller node's systemd manager configuration, as it read it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeSystemd {
    pub node: String,
    /// The file read (`/etc/systemd/system.conf`, or `FULCRUM_SYSTEMD_CONF`).
    pub file: String,
    /// `DefaultTimeoutStartSec` in seconds; `None` when unset (or the file is absent).
    pub default_timeout_start_secs: Option<u64>,
}

/// What the seed asks of systemd before an upgrade from 18.x or older to 21.1 or newer.
pub const SYSTEMD_START_TIMEOUT_SECS: u64 = 120;

/// `DefaultTimeoutStartSec` of a systemd `system.conf`, in seconds (`infinity` as `u64::MAX`):
/// the last assignment in its `[Manager]` section wins; `None` when it is unset or commented
/// out. Values are systemd time spans: `90`, `90s`, `2min`, `1min 30s`, `1h`, `500ms`.
pub fn default_timeout_start_secs(conf: &str) -> Option<u64> {
    let mut in_manager = false;
    let mut found = None;
    for line in conf.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_manager = line == "[Manager]";
            continue;
        }
        if !in_manager || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=')
            && key.trim() == "DefaultTimeoutStartSec"
        {
            found = time_span_secs(value.trim());
        }
    }
    found
}

/// A systemd time span in whole seconds (rounded down).
fn time_span_secs(span: &str) -> Option<u64> {
    if span == "infinity" {
        return Some(u64::MAX);
    }
    if let Ok(secs) = span.parse::<u64>() {
        return Some(secs);
    }
    let mut total_ms: u64 = 0;
    let mut rest = span;
    while !rest.trim_start().is_empty() {
        rest = rest.trim_start();
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c.is_whitespace()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms = match unit {
            "ms" | "msec" => 1,
            "" | "s" | "sec" | "second" | "seconds" => 1_000,
            "m" | "min" | "minute" | "minutes" => 60_000,
            "h" | "hr" | "hour" | "hours" => 3_600_000,
            "d" | "day" | "days" => 86_400_000,
            _ => return None,
        };
        total_ms = total_ms.checked_add(number.checked_mul(ms)?)?;
    }
    Some(total_ms / 1000)
}

/// (major, minor) of a version such as `18.2.3` or `30.2.1`.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next().unwrap_or("0").parse().ok()?))
}

/// The seed's systemd note: from 18.x or older to 21.1 or newer, every node needs systemd to
/// wait at least 120 s for a service to start. The nodes that do not, with why.
pub fn systemd_problems(from: &Version, to: Option<&Version>, nodes: &[NodeSystemd]) -> Vec<String> {
    let crosses = matches!(
        (major_minor(&from.version), to.and_then(|t| major_minor(&t.version))),
        (Some((from_major, _)), Some(target)) if from_major <= 18 && target >= (21, 1)
    );
    if !crosses {
        return vec![];
    }
    nodes
        .iter()
        .filter(|n| n.default_timeout_start_secs.is_none_or(|s| s < SYSTEMD_START_TIMEOUT_SECS))
        .map(|n| {
            let now = n.default_timeout_start_secs.map_or_else(|| "unset (systemd's default is 90 s)".to_string(), |s| format!("{s} s"));
            format!(
                "Controller node '{}': DefaultTimeoutStartSec in {} is {now}; an upgrade from {} to {} needs at least {SYSTEMD_START_TIMEOUT_SECS} s. Set DefaultTimeoutStartSec={SYSTEMD_START_TIMEOUT_SECS}s under [Manager] there and run 'systemctl daemon-reexec'.",
                n.node,
                n.file,
                from.version,
                to.map(|t| t.version.as_str()).unwrap_or_default()
            )
        })
        .collect()
}

/// A backup older than this is no backup for an upgrade.
pub const BACKUP_MAX_AGE_SECS: u64 = 24 * 3600;

struct Out(Vec<CheckResult>);

impl Out {
    fn push(&mut self, code: &str, description: &str, level: Level, details: Vec<String>) {
        self.0.push(CheckResult { check_code: code.into(), description: description.into(), state: level, details });
    }
}

/// Error when `problems` is not empty, else success with `ok`.
fn error_if(problems: Vec<String>, ok: impl Into<String>) -> (Level, Vec<String>) {
    if problems.is_empty() { (Level::Success, vec![ok.into()]) } else { (Level::Error, problems) }
}

fn warning_if(problems: Vec<String>, ok: impl Into<String>) -> (Level, Vec<String>) {
    if problems.is_empty() { (Level::Success, vec![ok.into()]) } else { (Level::Warning, problems) }
}

/// The SE groups that take part.
fn groups<'a>(request: &'a Request, facts: &'a Facts) -> impl Iterator<Item = &'a GroupFacts> {
    facts.groups.iter().filter(|g| request.groups.contains(&g.uuid))
}

/// Runs every check. The order and the descriptions are the product's.
pub fn run(request: &Request, facts: &Facts) -> Vec<CheckResult> {
    let mut out = Out(Vec::with_capacity(22));
    let ses = || groups(request, facts).flat_map(|g| g.ses.iter().map(move |s| (g, s)));

    // 1. Controller cluster readiness.
    let (up, total) = facts.cluster_nodes;
    let ready = format!("The controller cluster is ready ({up} of {total} nodes up, leader known).");
    let (level, details) = error_if(facts.cluster_problem.iter().cloned().collect(), ready);
    out.push(
        "SYSERR_CHECK_CLUSTER_STATE",
        "Check Controller Cluster readiness for upgrade operations.",
        level,
        details,
    );

    // 2. A recent configuration backup.
    let backup = match facts.backup_age_secs {
        None => {
            vec!["No configuration backup exists: take one (POST /api/configuration/backup) before upgrading.".into()]
        }
        Some(age) if age > BACKUP_MAX_AGE_SECS => {
            vec![format!(
                "The latest configuration backup is {} hours old: take a new one before upgrading.",
                age / 3600
            )]
        }
        Some(_) => vec![],
    };
    let (level, details) = warning_if(backup, "A configuration backup from the last 24 hours exists.");
    out.push(
        "SYSERR_CHECK_BACKUP",
        "Check and inform user to take a backup prior to upgrade operations.",
        level,
        details,
    );

    // 3. SELinux.
    let selinux = match facts.selinux.as_deref() {
        Some("enforcing") => {
            vec!["SELinux is enforcing on the controller node: the new version's files may be denied.".into()]
        }
        _ => vec![],
    };
    let state = facts.selinux.clone().unwrap_or_else(|| "not enabled".into());
    let (level, details) = warning_if(selinux, format!("SELinux on the controller node: {state}."));
    out.push("SYSERR_CHECK_SE_LINUX_ENABLED", "Check if se linux is enabled on controller nodes.", level, details);

    // 4. An operation in progress.
    let (level, details) = error_if(
        facts.operation_in_progress.iter().map(|o| format!("An upgrade operation is in progress: {o}.")).collect(),
        "No upgrade operation is in progress.",
    );
    out.push("SYSERR_CHECK_UPGRADE_IN_PROGRESS", "Check if upgrade operation is already in progress.", level, details);

    // 5. SE groups held by an operation (a resume wants them suspended).
    let held: Vec<String> = groups(request, facts)
        .filter_map(|g| match (request.ops, &g.held_by, g.suspended) {
            (Ops::SegroupResume, _, true) => None,
            (Ops::SegroupResume, _, false) => {
                Some(format!("SE group '{}' is not suspended: there is nothing to resume.", g.name))
            }
            (_, Some(op), _) => Some(format!("SE group '{}' has an ongoing operation: {op}.", g.name)),
            (_, None, _) => None,
        })
        .collect();
    let (level, details) = error_if(held, "No SE group taking part has an ongoing operation.");
    out.push(
        "SYSERR_CHECK_SE_GROUP_UPGRADE_OPS_INPROGRESS",
        "Check ServiceEngineGroup has an ongoing upgrade operation.",
        level,
        details,
    );

    // 6. Version compatibility.
    out.push(
        "SYSERR_CHECK_VERSION_COMPATIBILITY",
        "Check image version compatibility for upgrade operations.",
        version_level(request, facts).0,
        version_level(request, facts).1,
    );

    // 7. SE reachability.
    let unreachable: Vec<String> = ses()
        .filter(|(_, s)| !s.up)
        .map(|(g, s)| format!("SE '{}' of SE group '{}' is not reachable (down).", s.name, g.name))
        .collect();
    let (level, details) = error_if(unreachable, "Every SE taking part is reachable.");
    out.push(
        "SYSERR_CHECK_SE_REACHABILITY",
        "Check ServiceEngine reachability for upgrade operations.",
        level,
        details,
    );

    // 8. SE disk space.
    let se_need = request.se_image.as_ref().map_or(0, |i| i.se_free_disk_bytes.max(1) + i.size);
    let short: Vec<String> = ses()
        // An SE that is not reachable has told nothing of its disk; check 7 reports it.
        .filter(|(_, s)| request.se_image.is_some() && s.up && s.free_disk_bytes < se_need)
        .map(|(_, s)| format!("SE '{}' has {} bytes free, the image needs {se_need}.", s.name, s.free_disk_bytes))
        .collect();
    let (level, details) = error_if(short, format!("Every SE taking part has {se_need} bytes free."));
    out.push("SYSERR_CHECK_SE_DISK_SPACE", "Check ServiceEngine disk space for upgrade operations.", level, details);

    // 9. Controller disk space.
    let ctl_need = match (&request.controller_image, request.controller) {
        (Some(i), true) => i.controller_free_disk_bytes + i.size,
        _ => 0,
    };
    // Every node installs the image into its own slot: each needs the room.
    let others_short = facts.other_nodes_free_disk.iter().filter(|(_, free)| *free < ctl_need).map(|(node, free)| {
        format!("Controller node '{node}' has {free} bytes free (as it last reported), the image needs {ctl_need}.")
    });
    let (level, details) = error_if(
        (facts.controller_free_disk_bytes < ctl_need)
            .then(|| {
                format!(
                    "The controller has {} bytes free, the image needs {ctl_need}.",
                    facts.controller_free_disk_bytes
                )
            })
            .into_iter()
            .chain(others_short)
            .collect(),
        format!(
            "The controller has {} bytes free (needs {ctl_need}){}.",
            facts.controller_free_disk_bytes,
            if facts.other_nodes_free_disk.is_empty() { "" } else { ", and so has every other node" }
        ),
    );
    out.push(
        "SYSERR_CHECK_CLUSTER_DISK_SPACE",
        "Check Controller Cluster disk space for upgrade operations.",
        level,
        details,
    );

    // 10. Virtual services the operation would disrupt.
    let disrupted = disrupted_virtual_services(request, facts);
    let (level, details) = warning_if(
        disrupted
            .iter()
            .map(|(g, vs)| format!("Virtual service '{vs}' of SE group '{g}' will be disrupted."))
            .collect(),
        "No virtual service will be disrupted.",
    );
    out.push(
        "SYSERR_CHECK_VS_DISRUPUTION",
        "Check and inform Virtual Service(s) disruption for upgrade operations.",
        level,
        details,
    );

    // 11. Idempotence: nodes already where the operation takes them.
    let (level, details) = idempotence(request, facts);
    out.push("SYSERR_CHECK_IDEMPOTENCE", "Check idempotent operations for upgrade operations.", level, details);

    // 12. At most two active versions afterwards.
    let (level, details) = active_versions(request, facts);
    out.push(
        "SYSERR_CHECK_ACTIVE_VERSIONS",
        "Check active versions compatibility for upgrade operations.",
        level,
        details,
    );

    // 13. SE group error recovery options.
    let recovery = match request.action_on_error {
        ActionOnError::Continue if !request.groups.is_empty() => vec![
            "action_on_error is CONTINUE_UPGRADE_OPS_ON_ERROR: SEs that fail stay on their version and the group ends with mixed versions.".to_string(),
        ],
        _ => vec![],
    };
    let (level, details) =
        warning_if(recovery, format!("On an SE failure the group will follow {}.", request.action_on_error.as_str()));
    out.push(
        "SYSERR_CHECK_SE_GROUP_ERROR_RECOVERY",
        "Check ServiceEngineGroup error recovery options prior to upgrade operations.",
        level,
        details,
    );

    // 14. The image on every cluster member.
    let missing: Vec<String> = [&request.controller_image, &request.se_image]
        .into_iter()
        .flatten()
        .flat_map(|i| {
            i.missing_on.iter().map(move |node| format!("Image '{}' is missing or damaged on {node}.", i.name))
        })
        .collect();
    let (level, details) = error_if(missing, "The image is present and whole on every cluster member.");
    out.push(
        "SYSERR_CHECK_IMAGE_AVAILABILITY",
        "Check Image state across Cluster members for upgrade operations.",
        level,
        details,
    );

    // 15. Patches in an image bundle, and patches that carry what they are asked for.
    let (level, details) = patch_in_bundle(request);
    out.push("SYSERR_CHECK_PATCH_IMAGE", "Checks for the patch in image bundle.", level, details);

    // 16. GSLB.
    let gslb = if facts.gslb_services.is_empty() {
        vec![]
    } else {
        vec![format!(
            "GSLB is configured ({} service(s): {}). Upgrade the GSLB leader site first, then the follower sites; keep the sites within the supported version skew.",
            facts.gslb_services.len(),
            facts.gslb_services.join(", ")
        )]
    };
    let (level, details) = warning_if(gslb, "GSLB is not configured.");
    out.push(
        "SYSERR_GSLB_FEATURE_CHECK",
        "Checks if Gslb Feature is enabled and provides feature specific messages.",
        level,
        details,
    );

    // 17. The system configuration: the objects under the new version's schema (an error),
    // and each node's systemd start timeout when the upgrade crosses 18.x → 21.1 (a warning).
    let target = request.controller_image.as_ref().map(|i| &i.target);
    let systemd = if request.controller { systemd_problems(&facts.controller, target, &facts.systemd) } else { vec![] };
    let (level, details) = match (facts.config_problems.is_empty(), systemd.is_empty()) {
        (false, _) => (Level::Error, facts.config_problems.iter().chain(&systemd).cloned().collect()),
        (true, false) => (Level::Warning, systemd),
        (true, true) => (Level::Success, vec!["The configuration validates under the new version.".to_string()]),
    };
    out.push("SYSERR_CONFIGURATION_CHECK", "Checks the system configuration.", level, details);

    // 18. Open alerts.
    let alerts = if facts.open_alerts.len() > facts.max_alerts {
        let mut d = vec![format!("{} open alert(s), more than {}:", facts.open_alerts.len(), facts.max_alerts)];
        d.extend(facts.open_alerts.iter().take(20).cloned());
        d
    } else {
        vec![]
    };
    let (level, details) = warning_if(alerts, format!("{} open alert(s).", facts.open_alerts.len()));
    out.push("SYSERR_CHECK_ALERTS", "Check total number of alerts for upgrade operations.", level, details);

    // 19. Cloud types the new version supports.
    let unsupported: Vec<String> = [&request.controller_image, &request.se_image]
        .into_iter()
        .flatten()
        .filter(|i| !i.cloud_types.is_empty())
        .flat_map(|i| {
            facts.clouds.iter().filter(|(_, t)| !i.cloud_types.contains(t)).map(move |(name, t)| {
                format!(
                    "Cloud '{name}' is of type {t}, which {} does not support ({}).",
                    i.name,
                    i.cloud_types.join(", ")
                )
            })
        })
        .collect();
    let (level, details) = error_if(unsupported, "Every cloud's type is supported by the new version.");
    out.push(
        "SYSERR_CHECK_CLOUD_COMPATIBILITY",
        "Checks if the cloud api versions are compatible after upgrade.",
        level,
        details,
    );

    // 20. Docker version.
    let (level, details) = docker(request, facts);
    out.push("SYSERR_DOCKER_VERSION_CHECK", "Checks if Docker version is compatible.", level, details);

    // 21. DHCP or static controller address.
    let (level, details) = match facts.address_dynamic {
        Some(true) => (
            Level::Warning,
            vec![format!(
                "The controller address {} is assigned by DHCP: if it changes across the restart, SEs cannot reconnect. Make it static.",
                facts.controller_address
            )],
        ),
        Some(false) => {
            (Level::Success, vec![format!("The controller address {} is static.", facts.controller_address)])
        }
        None => {
            (Level::Success, vec![format!("The controller address {} is not DHCP-assigned.", facts.controller_address)])
        }
    };
    out.push("SYSERR_IP_TYPE_CHECK", "Checks if configured IP type is DHCP or STATIC.", level, details);

    // 22. SE licenses.
    let unlicensed: Vec<String> = ses()
        .filter(|(_, s)| !s.licensed)
        .map(|(g, s)| format!("SE '{}' of SE group '{}' is not licensed.", s.name, g.name))
        .collect();
    let (level, details) = error_if(unlicensed, "Every SE taking part holds a license.");
    out.push("SYSERR_CHECK_SE_LICENSE", "Checks if se has a valid license state.", level, details);

    out.0
}

fn version_level(request: &Request, facts: &Facts) -> (Level, Vec<String>) {
    let mut problems = Vec::new();
    let mut check_node = |who: &str,
                          running: Option<&Version>,
                          previous: Option<&Version>,
                          image: Option<&ImageFacts>| {
        let Some(running) = running else {
            problems.push(format!("{who} has not reported its version."));
            return;
        };
        match request.ops {
            Ops::Upgrade | Ops::SegroupResume => {
                let Some(image) = image else { return };
                if image.target.cmp_base(running) == Ordering::Less {
                    problems.push(format!(
                        "{who} runs {}; image {} is older: a downgrade is done with rollback, not upgrade.",
                        running.label(),
                        image.target.label()
                    ));
                }
                if fulcrum_package::compare_versions(&running.version, &image.min_version) == Some(Ordering::Less) {
                    problems.push(format!(
                        "{who} runs {}; image {} upgrades from {} or newer only.",
                        running.version, image.name, image.min_version
                    ));
                }
            }
            Ops::Patch => {
                let Some(image) = image else { return };
                if !image.target.same_base(running) {
                    problems.push(format!(
                        "{who} runs {}; patch {} is for {}.",
                        running.label(),
                        image.name,
                        image.target.base().label()
                    ));
                }
            }
            Ops::Rollback | Ops::Rollbackpatch => match previous {
                None => problems.push(format!("{who} has no previous version to roll back to.")),
                Some(p) if request.ops == Ops::Rollbackpatch && (!p.same_base(running) || running.patch.is_none()) => {
                    problems.push(format!(
                        "{who} runs {}; its previous version {} is not the same release without the patch.",
                        running.label(),
                        p.label()
                    ));
                }
                Some(_) => {}
            },
        }
    };
    if request.controller {
        check_node(
            "The controller",
            Some(&facts.controller),
            facts.controller_previous.as_ref(),
            request.controller_image.as_ref(),
        );
    }
    for g in groups(request, facts) {
        for se in &g.ses {
            check_node(
                &format!("SE '{}'", se.name),
                se.running.as_ref(),
                se.previous.as_ref(),
                request.se_image.as_ref(),
            );
        }
    }
    // SEs never run a newer release than the controller will.
    if let Some(image) = &request.se_image
        && matches!(request.ops, Ops::Upgrade | Ops::SegroupResume)
    {
        let controller_after = match (&request.controller_image, request.controller) {
            (Some(c), true) => c.target.clone(),
            _ => facts.controller.clone(),
        };
        if image.target.cmp_base(&controller_after) == Ordering::Greater {
            problems.push(format!(
                "SE groups cannot run {} while the controller runs {}: upgrade the controller first.",
                image.target.label(),
                controller_after.label()
            ));
        }
    }
    error_if(problems, "The image's version is compatible with every node taking part.")
}

/// (group name, virtual service name) of what the operation would disrupt: everything on a
/// group's SEs when `disruptive`, else what has nowhere to go (a group with one SE up).
pub fn disrupted_virtual_services(request: &Request, facts: &Facts) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in groups(request, facts) {
        let up = g.ses.iter().filter(|s| s.up).count();
        for vs in &g.virtualservices {
            if !vs.on.is_empty() && (request.disruptive || up < 2) {
                out.push((g.name.clone(), vs.name.clone()));
            }
        }
    }
    out
}

fn idempotence(request: &Request, facts: &Facts) -> (Level, Vec<String>) {
    let mut already = Vec::new();
    let mut total = 0;
    if request.controller && !request.ops.is_rollback() {
        total += 1;
        if let Some(image) = &request.controller_image
            && image.target == facts.controller
        {
            already.push(format!("The controller already runs {}.", image.target.label()));
        }
    }
    if !request.ops.is_rollback() && request.ops != Ops::SegroupResume {
        for g in groups(request, facts) {
            total += 1;
            let Some(image) = &request.se_image else { continue };
            if !g.ses.is_empty() && g.ses.iter().all(|s| s.running.as_ref() == Some(&image.target)) {
                already.push(format!("SE group '{}' already runs {}.", g.name, image.target.label()));
            }
        }
    }
    match (already.len(), total) {
        (0, _) => (Level::Success, vec!["Every node taking part changes version.".into()]),
        (n, t) if n == t => {
            already.push("Nothing to do.".into());
            (Level::Error, already)
        }
        _ => {
            already.push("Those are skipped.".into());
            (Level::Warning, already)
        }
    }
}

fn active_versions(request: &Request, facts: &Facts) -> (Level, Vec<String>) {
    let mut versions: Vec<Version> = Vec::new();
    let mut add = |v: Version| {
        let base = v.base();
        if !versions.contains(&base) {
            versions.push(base);
        }
    };
    match (&request.controller_image, request.controller, request.ops) {
        (Some(i), true, Ops::Upgrade | Ops::Patch) => add(i.target.clone()),
        (_, true, Ops::Rollback | Ops::Rollbackpatch) => {
            add(facts.controller_previous.clone().unwrap_or(facts.controller.clone()))
        }
        _ => add(facts.controller.clone()),
    }
    for g in &facts.groups {
        let taking_part = request.groups.contains(&g.uuid);
        for se in &g.ses {
            let after = match (taking_part, request.ops, &request.se_image) {
                (true, Ops::Upgrade | Ops::Patch | Ops::SegroupResume, Some(i)) => Some(i.target.clone()),
                (true, Ops::Rollback | Ops::Rollbackpatch, _) => se.previous.clone().or(se.running.clone()),
                _ => se.running.clone(),
            };
            if let Some(v) = after {
                add(v);
            }
        }
    }
    let labels: Vec<String> = versions.iter().map(Version::label).collect();
    if versions.len() > 2 {
        (
            Level::Error,
            vec![format!(
                "The operation would leave {} versions active ({}); at most two may be.",
                versions.len(),
                labels.join(", ")
            )],
        )
    } else {
        (Level::Success, vec![format!("Active versions afterwards: {}.", labels.join(", "))])
    }
}

fn patch_in_bundle(request: &Request) -> (Level, Vec<String>) {
    let mut details = Vec::new();
    let mut problems = Vec::new();
    for image in [&request.controller_image, &request.se_image].into_iter().flatten() {
        if image.kind == "bundle" {
            if image.bundle_patches.is_empty() {
                details.push(format!("Bundle {} carries no patch.", image.name));
            } else {
                details.push(format!(
                    "Bundle {} carries {}; they are applied with it.",
                    image.name,
                    image.bundle_patches.join(", ")
                ));
            }
        }
    }
    if request.ops == Ops::Patch {
        if let Some(i) = request.controller_image.as_ref().filter(|i| request.controller && !i.carries_controller) {
            problems.push(format!("Patch {} carries nothing for the controller.", i.name));
        }
        if let Some(i) = request.se_image.as_ref().filter(|i| !request.groups.is_empty() && !i.carries_se) {
            problems.push(format!("Patch {} carries nothing for service engines.", i.name));
        }
    }
    if !problems.is_empty() {
        return (Level::Error, problems);
    }
    if details.is_empty() {
        details.push("No image bundle takes part.".into());
    }
    (Level::Success, details)
}

fn docker(request: &Request, facts: &Facts) -> (Level, Vec<String>) {
    let Some(image) = request.controller_image.as_ref().filter(|i| request.controller && i.kind == "controller_docker")
    else {
        return (Level::Success, vec!["No Docker-based controller image takes part.".into()]);
    };
    let needed = image.docker_version.as_deref().map(str::trim).filter(|v| !v.is_empty());
    let have = match facts.controller_docker_version.as_deref().map(str::trim) {
        None => {
            return (
                Level::Error,
                vec![format!(
                    "{} is for a Docker-based controller; this controller does not run in Docker.",
                    image.name
                )],
            );
        }
        Some(have) => have,
    };
    // A version that cannot be read is not a compatible one: the check must prove compatibility.
    if fulcrum_package::parse_version(have).is_none() {
        let shown = if have.is_empty() { "unknown".to_string() } else { format!("'{have}'") };
        return (
            Level::Error,
            vec![format!(
                "The Docker version the controller runs under cannot be determined ({shown}); {} needs {}.",
                image.name,
                needed.map_or_else(|| "a known Docker version".to_string(), |n| format!("Docker {n} or newer"))
            )],
        );
    }
    match needed {
        None => (Level::Success, vec![format!("Docker {have}; {} names no minimum Docker version.", image.name)]),
        Some(needed) => match fulcrum_package::compare_versions(have, needed) {
            Some(Ordering::Less) => (
                Level::Error,
                vec![format!(
                    "{} needs Docker {needed} or newer; the controller runs under Docker {have}.",
                    image.name
                )],
            ),
            Some(_) => (Level::Success, vec![format!("Docker {have} (needs {needed}).")]),
            None => {
                (Level::Error, vec![format!("{} names an unreadable minimum Docker version '{needed}'.", image.name)])
            }
        },
    }
}

/// The verdict over checks: errors always block; warnings block unless skipped.
pub fn verdict(checks: &[CheckResult], skip_warnings: bool) -> Level {
    if checks.iter().any(|c| c.state == Level::Error) {
        Level::Error
    } else if !skip_warnings && checks.iter().any(|c| c.state == Level::Warning) {
        Level::Warning
    } else {
        Level::Success
    }
}

#[cfg(test)]
mod tests;
