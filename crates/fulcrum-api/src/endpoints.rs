//! Every endpoint the server answers besides the schema's object types, as one table: the
//! router refuses (405) a method the table does not list for a path, and the OpenAPI document
//! describes what the table lists, so the two cannot drift apart.

/// One path (a template, as the metrics label it) and the methods it answers.
pub struct Endpoint {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    pub summary: &'static str,
    /// Answered without a user's credentials (agents use their own).
    pub public: bool,
}

const fn ep(path: &'static str, methods: &'static [&'static str], summary: &'static str) -> Endpoint {
    Endpoint { path, methods, summary, public: false }
}

const fn open(path: &'static str, methods: &'static [&'static str], summary: &'static str) -> Endpoint {
    Endpoint { path, methods, summary, public: true }
}

pub const ENDPOINTS: &[Endpoint] = &[
    open("/login", &["POST"], "Log in (form or JSON username, password): session cookie and CSRF token."),
    open("/logout", &["POST"], "End the session the cookie names (nothing to end without one)."),
    open("/metrics", &["GET"], "Prometheus metrics."),
    open("/api/cluster/status", &["GET"], "Whether the controller is up (no login needed)."),
    open("/api/initial-data", &["GET"], "Version and setup facts (no login needed)."),
    ep("/api/cluster/runtime", &["GET"], "The cluster's state and its nodes."),
    ep("/api/cluster/version", &["GET"], "The controller's version."),
    ep("/api/useraccount", &["GET", "PUT"], "The logged-in user; PUT {old_password, password} changes the password."),
    ep("/api/openapi.json", &["GET"], "This document."),
    ep(
        "/api/pool-async/status/{patch_id}",
        &["GET"],
        "Status of an asynchronous PATCH (PATCH /api/pool/{uuid}?async_mode).",
    ),
    ep("/api/pool-async/merge", &["POST"], "Run an async PATCH merge cycle now (administrators)."),
    ep("/api/image-upload", &["POST"], "Start a resumable image upload {size, filename}."),
    ep(
        "/api/image-upload/{id}",
        &["GET", "PUT", "DELETE"],
        "A resumable upload: its offset; a chunk (Content-Range); abandon it.",
    ),
    ep("/api/image-upload/{id}/complete", &["POST"], "Verify and publish a resumable upload {sha256}."),
    ep(
        "/api/virtualservice-inventory",
        &["GET"],
        "Virtual services with where each runs: {uuid, config, runtime} per result, paged like /api/virtualservice.",
    ),
    ep("/api/licenseusage", &["GET"], "Licensed, consumed and available SE cores."),
    ep(
        "/api/analytics/metrics/controller",
        &["GET"],
        "Metrics by metric_id (license cores, SEs; obj_id for an SE group).",
    ),
    ep("/api/upgrade", &["POST"], "Upgrade the system, the controller or SE groups."),
    ep("/api/upgrade/preview", &["POST"], "The checks an upgrade would run."),
    ep("/api/patch", &["POST"], "Patch the system, the controller or SE groups."),
    ep("/api/patch/preview", &["POST"], "The checks a patch would run."),
    ep("/api/rollback", &["POST"], "Roll back to the previous version."),
    ep("/api/rollback/preview", &["POST"], "The checks a rollback would run."),
    ep("/api/rollbackpatch", &["POST"], "Remove the last patch."),
    ep("/api/rollbackpatch/preview", &["POST"], "The checks a patch rollback would run."),
    ep("/api/segroup/resume", &["POST"], "Resume suspended SE-group upgrades."),
    ep("/api/segroup/resume/preview", &["POST"], "The checks a resume would run."),
    ep("/api/upgradestatusinfo", &["GET"], "Upgrade status of the controller and of each SE group."),
    ep("/api/upgradestatusinfo/{uuid}", &["GET"], "Upgrade status of one node."),
    ep("/api/upgradestatussummary", &["GET"], "Upgrade status, summarised."),
    ep("/api/configuration/backup", &["GET", "POST"], "Configuration backups: list; make one now."),
    ep("/api/configuration/backup/{name}", &["GET"], "Download a configuration backup."),
    ep("/api/configuration/export", &["GET"], "The configuration as it is now."),
    open("/api/se-agent/join", &["POST"], "SE agents: join with a join token (Bearer)."),
    open("/api/se-agent/poll", &["POST"], "SE agents: heartbeat and long poll for commands (Bearer SE credential)."),
    open("/api/se-agent/event", &["POST"], "SE agents: report an install step."),
    open("/api/se-agent/runtime", &["POST"], "SE agents: report server health and traffic counters."),
    open("/api/se-agent/image/{uuid}", &["GET"], "SE agents: download an image (Range)."),
    ep("/api/virtualservice/{uuid}/runtime", &["GET"], "Where a virtual service runs, and its traffic."),
    ep("/api/pool/{uuid}/runtime", &["GET"], "A pool's health: servers up, and its traffic."),
    ep(
        "/api/pool/{uuid}/runtime/server",
        &["GET"],
        "Each server of a pool: its health as the SEs see it, and its traffic.",
    ),
    ep("/api/serviceengine/{uuid}/install", &["POST"], "Install an image on an SE {image_ref}."),
    ep("/api/serviceengine/{uuid}/rollback", &["POST"], "Roll an SE back to its other slot."),
];

/// The table's entry for a path template, if it is one of these endpoints.
pub fn find(path: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.path == path)
}
