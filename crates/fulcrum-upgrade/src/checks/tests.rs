use super::*;

fn image(version: &str, build: u64, kind: &str) -> ImageFacts {
    ImageFacts {
        uuid: "image-1".into(),
        name: format!("{version}-{build}-20261122.101500"),
        kind: kind.into(),
        target: Version::new(version, build, None),
        min_version: "30.1.1".into(),
        se_free_disk_bytes: 1000,
        controller_free_disk_bytes: 1000,
        cloud_types: vec![],
        docker_version: None,
        carries_controller: true,
        carries_se: true,
        bundle_patches: vec![],
        size: 100,
        missing_on: vec![],
    }
}

fn se(name: &str) -> SeFacts {
    SeFacts {
        uuid: format!("se-{name}"),
        name: name.into(),
        up: true,
        licensed: true,
        running: Some(Version::new("30.2.1", 9001, None)),
        previous: None,
        free_disk_bytes: 1 << 30,
    }
}

fn facts() -> Facts {
    let group = |uuid: &str, ses: Vec<SeFacts>| GroupFacts {
        uuid: uuid.into(),
        name: uuid.into(),
        ses,
        virtualservices: vec![VsFacts { name: format!("vs-{uuid}"), on: vec![format!("se-{uuid}1")] }],
        held_by: None,
        suspended: false,
    };
    Facts {
        controller: Version::new("30.2.1", 9001, None),
        controller_previous: None,
        cluster_problem: None,
        cluster_nodes: (1, 1),
        backup_age_secs: Some(60),
        selinux: None,
        operation_in_progress: None,
        groups: vec![group("g1", vec![se("g11"), se("g12")]), group("g2", vec![se("g21"), se("g22")])],
        controller_free_disk_bytes: 1 << 30,
        gslb_services: vec![],
        config_problems: vec![],
        open_alerts: vec![],
        max_alerts: 0,
        clouds: vec![("Default-Cloud".into(), "CLOUD_NONE".into())],
        controller_docker_version: None,
        controller_address: "127.0.0.1".into(),
        address_dynamic: Some(false),
        systemd: vec![],
        other_nodes_free_disk: vec![],
    }
}

fn system_upgrade(to: ImageFacts) -> Request {
    Request {
        ops: Ops::Upgrade,
        controller: true,
        groups: vec!["g1".into(), "g2".into()],
        controller_image: Some(to.clone()),
        se_image: Some(to),
        action_on_error: ActionOnError::Suspend,
        disruptive: false,
    }
}

fn state_of(checks: &[CheckResult], code: &str) -> Level {
    checks.iter().find(|c| c.check_code == code).unwrap_or_else(|| panic!("{code} missing")).state
}

#[test]
fn a_healthy_system_passes_all_22_in_the_documents_order() {
    let checks = run(&system_upgrade(image("30.2.2", 9100, "controller")), &facts());
    assert_eq!(checks.len(), 22);
    assert_eq!(checks[0].description, "Check Controller Cluster readiness for upgrade operations.");
    assert_eq!(checks[21].description, "Checks if se has a valid license state.");
    let failing: Vec<_> = checks.iter().filter(|c| c.state != Level::Success).collect();
    assert!(failing.is_empty(), "{failing:#?}");
    assert_eq!(verdict(&checks, false), Level::Success);
}

#[test]
fn warnings_need_skip_warnings_and_errors_block_always() {
    let mut f = facts();
    f.backup_age_secs = None;
    let checks = run(&system_upgrade(image("30.2.2", 9100, "controller")), &f);
    assert_eq!(state_of(&checks, "SYSERR_CHECK_BACKUP"), Level::Warning);
    assert_eq!(verdict(&checks, false), Level::Warning);
    assert_eq!(verdict(&checks, true), Level::Success);
    f.groups[0].ses[1].up = false;
    let checks = run(&system_upgrade(image("30.2.2", 9100, "controller")), &f);
    assert_eq!(state_of(&checks, "SYSERR_CHECK_SE_REACHABILITY"), Level::Error);
    assert_eq!(verdict(&checks, true), Level::Error);
}

#[test]
fn versions_downgrade_min_version_patches_and_active_versions() {
    let checks = run(&system_upgrade(image("30.2.0", 8000, "controller")), &facts());
    let v = checks.iter().find(|c| c.check_code == "SYSERR_CHECK_VERSION_COMPATIBILITY").unwrap();
    assert_eq!(v.state, Level::Error);
    assert!(v.details[0].contains("rollback"), "{:?}", v.details);

    let mut old = facts();
    old.controller = Version::new("30.1.0", 1, None);
    let checks = run(&system_upgrade(image("30.2.2", 9100, "controller")), &old);
    assert_eq!(state_of(&checks, "SYSERR_CHECK_VERSION_COMPATIBILITY"), Level::Error);

    // SE groups alone cannot go past the controller.
    let mut only_g1 = system_upgrade(image("30.2.2", 9100, "controller"));
    only_g1.controller = false;
    only_g1.groups = vec!["g1".into()];
    assert_eq!(state_of(&run(&only_g1, &facts()), "SYSERR_CHECK_VERSION_COMPATIBILITY"), Level::Error);

    // A patch for another release.
    let mut patch = image("30.2.2", 9100, "se_patch");
    patch.target.patch = Some("2p1".into());
    let request = Request {
        ops: Ops::Patch,
        controller: false,
        groups: vec!["g1".into()],
        controller_image: None,
        se_image: Some(patch),
        ..system_upgrade(image("1", 1, "x"))
    };
    assert_eq!(state_of(&run(&request, &facts()), "SYSERR_CHECK_VERSION_COMPATIBILITY"), Level::Error);

    // Three releases at once: controller 30.2.2, g1 on 30.2.1, g2 on 30.2.0.
    let mut three = facts();
    for s in &mut three.groups[1].ses {
        s.running = Some(Version::new("30.2.0", 8000, None));
    }
    let mut controller_only = system_upgrade(image("30.2.2", 9100, "controller"));
    controller_only.groups.clear();
    assert_eq!(state_of(&run(&controller_only, &three), "SYSERR_CHECK_ACTIVE_VERSIONS"), Level::Error);
}

#[test]
fn idempotence_disruption_licenses_clouds_disk_and_the_rest() {
    let mut f = facts();
    for g in &mut f.groups {
        for s in &mut g.ses {
            s.running = Some(Version::new("30.2.2", 9100, None));
        }
    }
    f.controller = Version::new("30.2.2", 9100, None);
    let all_there = run(&system_upgrade(image("30.2.2", 9100, "controller")), &f);
    assert_eq!(state_of(&all_there, "SYSERR_CHECK_IDEMPOTENCE"), Level::Error);

    let mut f = facts();
    f.groups[0].ses.truncate(1);
    f.groups[1].ses[0].licensed = false;
    f.groups[1].ses[1].free_disk_bytes = 10;
    f.gslb_services = vec!["gs1".into()];
    f.open_alerts = vec!["SE 'x' is down".into()];
    f.selinux = Some("enforcing".into());
    f.address_dynamic = Some(true);
    f.config_problems = vec!["pool 'p': bad".into()];
    f.cluster_problem = Some("the store is read-only".into());
    f.operation_in_progress = Some("UPGRADE op-1".into());
    f.groups[1].held_by = Some("UPGRADE op-1 (suspended)".into());
    let mut to = image("30.2.2", 9100, "controller_docker");
    to.cloud_types = vec!["CLOUD_VCENTER".into()];
    to.docker_version = Some("20.10".into());
    to.missing_on = vec!["node 127.0.0.1".into()];
    let checks = run(&system_upgrade(to), &f);
    for (code, level) in [
        ("SYSERR_CHECK_CLUSTER_STATE", Level::Error),
        ("SYSERR_CHECK_SE_LINUX_ENABLED", Level::Warning),
        ("SYSERR_CHECK_UPGRADE_IN_PROGRESS", Level::Error),
        ("SYSERR_CHECK_SE_GROUP_UPGRADE_OPS_INPROGRESS", Level::Error),
        ("SYSERR_CHECK_SE_DISK_SPACE", Level::Error),
        ("SYSERR_CHECK_VS_DISRUPUTION", Level::Warning),
        ("SYSERR_CHECK_IMAGE_AVAILABILITY", Level::Error),
        ("SYSERR_GSLB_FEATURE_CHECK", Level::Warning),
        ("SYSERR_CONFIGURATION_CHECK", Level::Error),
        ("SYSERR_CHECK_ALERTS", Level::Warning),
        ("SYSERR_CHECK_CLOUD_COMPATIBILITY", Level::Error),
        ("SYSERR_DOCKER_VERSION_CHECK", Level::Error),
        ("SYSERR_IP_TYPE_CHECK", Level::Warning),
        ("SYSERR_CHECK_SE_LICENSE", Level::Error),
    ] {
        assert_eq!(state_of(&checks, code), level, "{code}");
    }
    let disrupted = checks.iter().find(|c| c.check_code == "SYSERR_CHECK_VS_DISRUPUTION").unwrap();
    assert!(disrupted.details[0].contains("vs-g1"), "named: {:?}", disrupted.details);
}

#[test]
fn docker_version_must_be_known_and_new_enough() {
    let mut to = image("30.2.2", 9100, "controller_docker");
    to.docker_version = Some("20.10".into());
    let docker = |have: Option<&str>, to: &ImageFacts| {
        let mut f = facts();
        f.controller_docker_version = have.map(String::from);
        let checks = run(&system_upgrade(to.clone()), &f);
        let check = checks.into_iter().find(|c| c.check_code == "SYSERR_DOCKER_VERSION_CHECK").unwrap();
        (check.state, check.details.join(" "))
    };
    assert_eq!(docker(Some("24.0.7"), &to).0, Level::Success);
    assert_eq!(docker(Some("20.10"), &to).0, Level::Success);
    let (level, details) = docker(Some("19.03.1"), &to);
    assert_eq!(level, Level::Error, "{details}");
    assert!(details.contains("needs Docker 20.10"), "{details}");
    // Running in Docker with a version nobody could read is not proof of compatibility.
    for unknown in ["", "  ", "unknown", "20.x"] {
        let (level, details) = docker(Some(unknown), &to);
        assert_eq!(level, Level::Error, "{unknown:?}: {details}");
        assert!(details.contains("cannot be determined"), "{details}");
    }
    let (level, details) = docker(None, &to);
    assert_eq!(level, Level::Error);
    assert!(details.contains("does not run in Docker"), "{details}");
    // A plain controller image does not ask about Docker at all.
    assert_eq!(docker(Some(""), &image("30.2.2", 9100, "controller")).0, Level::Success);
}

#[test]
fn systemd_start_timeouts_are_read_as_systemd_reads_them() {
    use super::default_timeout_start_secs as read;
    assert_eq!(read("[Manager]\nDefaultTimeoutStartSec=90s\n"), Some(90));
    assert_eq!(read("[Manager]\n#DefaultTimeoutStartSec=90s\n"), None, "commented out: unset");
    assert_eq!(read("DefaultTimeoutStartSec=300\n[Manager]\n"), None, "outside [Manager]");
    assert_eq!(read("[Manager]\nDefaultTimeoutStartSec = 2min\n"), Some(120));
    assert_eq!(
        read("[Manager]\nDefaultTimeoutStartSec=1min 30s\nDefaultTimeoutStartSec=150\n"),
        Some(150),
        "the last one wins"
    );
    assert_eq!(read("[Manager]\nDefaultTimeoutStartSec=infinity\n"), Some(u64::MAX));
    assert_eq!(read("[Manager]\nDefaultTimeoutStartSec=1h\n[Journal]\nDefaultTimeoutStartSec=5\n"), Some(3600));
    assert_eq!(read("[Manager]\nDefaultTimeoutStartSec=soon\n"), None);
    assert_eq!(read(""), None);
}

#[test]
fn the_systemd_note_warns_on_each_node_short_of_120_s_only_from_18_to_21_1_or_newer() {
    use super::{NodeSystemd, systemd_problems};
    let node = |name: &str, secs: Option<u64>| NodeSystemd {
        node: name.into(),
        file: "/etc/systemd/system.conf".into(),
        default_timeout_start_secs: secs,
    };
    let nodes = [node("a", Some(90)), node("b", None), node("c", Some(120))];
    let (v18, v21_1, v22_1, v21_0) = (
        Version::new("18.2.3", 9000, None),
        Version::new("21.1.1", 9000, None),
        Version::new("22.1.3", 9000, None),
        Version::new("21.0.9", 9000, None),
    );
    let warned = systemd_problems(&v18, Some(&v22_1), &nodes);
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned[0].contains("'a'") && warned[0].contains("90 s") && warned[0].contains("/etc/systemd/system.conf"));
    assert!(warned[1].contains("'b'") && warned[1].contains("unset"));
    assert_eq!(systemd_problems(&v18, Some(&v21_1), &nodes).len(), 2, "21.1 itself needs it");
    assert!(systemd_problems(&v21_1, Some(&v22_1), &nodes).is_empty(), "21.1 -> 22.1 does not");
    assert!(systemd_problems(&v18, Some(&v21_0), &nodes).is_empty(), "nor 18 -> 21.0");
    assert!(systemd_problems(&v18, None, &nodes).is_empty(), "nor an SE-only operation");
    // Through the check: a warning under "Checks the system configuration".
    let mut f = facts();
    f.controller = v18.clone();
    f.systemd = nodes.to_vec();
    let r = system_upgrade(image("22.1.3", 9000, "controller"));
    let check = run(&r, &f).into_iter().find(|c| c.check_code == "SYSERR_CONFIGURATION_CHECK").unwrap();
    assert_eq!(check.state, Level::Warning, "{check:?}");
    assert_eq!(check.details.len(), 2);
}

#[test]
fn every_controller_node_needs_room_for_the_image() {
    let mut f = facts();
    let r = system_upgrade(image("30.2.2", 9100, "controller"));
    f.other_nodes_free_disk = vec![("b".into(), 1 << 30), ("c".into(), 10)];
    let check = run(&r, &f).into_iter().find(|c| c.check_code == "SYSERR_CHECK_CLUSTER_DISK_SPACE").unwrap();
    assert_eq!(check.state, Level::Error, "{check:?}");
    assert_eq!(check.details.len(), 1);
    assert!(check.details[0].contains("'c' has 10 bytes free"), "{:?}", check.details);
    f.other_nodes_free_disk[1].1 = 1 << 30;
    let check = run(&r, &f).into_iter().find(|c| c.check_code == "SYSERR_CHECK_CLUSTER_DISK_SPACE").unwrap();
    assert_eq!(check.state, Level::Success);
    assert!(check.details[0].contains("every other node"), "{:?}", check.details);
}
