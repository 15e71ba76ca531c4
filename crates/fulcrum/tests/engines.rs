//! Service engines through the real binaries: one controller and real `fulcrum se-agent`
//! processes (and `--simulate` for many). Joining, heartbeats, down and up, placement,
//! licenses, A/B installs with their failures, being cut off.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::agents::{Agent, se_by_name, state, token, wait_for};
use common::packages::{Packages, upload};
use common::{Api, Controller, Launch, shell, temp_dir, try_start};
use serde_json::{Value, json};

/// Fast heartbeats so that "down" and "back up" happen within a test's patience.
const ENGINE_ARGS: &[&str] = &["--se-heartbeat-interval", "0.3", "--se-down-after", "2", "--se-health-timeout", "20"];

fn controller(data: &Path) -> Controller {
    try_start(Launch { args: ENGINE_ARGS, ..Launch::plain(data) }).expect("controller starts")
}

fn runtime(api: &Api, vs: &str) -> Value {
    api.object(&format!("/api/virtualservice/{vs}/runtime"))
}

/// The SE that serves a virtual service (placed and confirmed by the agent).
fn serving(api: &Api, vs: &str) -> Option<String> {
    let rt = runtime(api, vs);
    let se = &rt["vip_summary"][0]["service_engine"][0];
    (rt["oper_status"]["state"] == "OPER_UP" && se["active_on_se"] == true).then(|| se["uuid"].as_str().unwrap().into())
}

#[test]
fn three_agents_join_heartbeat_go_down_come_back_and_are_cut_off() {
    let data = temp_dir();
    let c = controller(data.path());
    let api = c.admin();
    let work = temp_dir();
    let (token_uuid, token) = token(&api, "Default-Group");

    // A wrong token is refused, clearly, and the agent stops.
    let mut bad = Agent::start(&c, Some("sejointoken-nope.secret"), &work.path().join("bad"), "bad", &[]);
    assert!(!bad.exits(Duration::from_secs(20)).success());
    assert!(bad.log_text().contains("join token not accepted"), "{}", bad.log_text());
    // A token opens nothing but joining.
    let as_user = Api::new(&c.url).header("Authorization", &format!("Bearer {token}"));
    assert_eq!(as_user.get("/api/pool").status, 401);
    assert_eq!(Api::new(&c.url).basic("admin", &token).get("/api/pool").status, 401);

    let mut agents: Vec<Agent> = (1..=3)
        .map(|i| Agent::start(&c, Some(&token), &work.path().join(format!("se{i}")), &format!("se{i}"), &[]))
        .collect();
    let ses: Vec<Value> = (1..=3)
        .map(|i| {
            wait_for("an SE up", Duration::from_secs(30), || {
                se_by_name(&api, &format!("se{i}")).filter(|s| state(s) == "OPER_UP")
            })
        })
        .collect();
    for se in &ses {
        assert!(se["se_group_ref"].as_str().unwrap().contains("Default-Group") || se["se_group_ref"].is_string());
        assert_eq!(se["version"], "30.2.1");
        assert_eq!(se["build"], 9001);
        assert!(se["free_disk_bytes"].as_u64().unwrap() > 0);
        assert!(se["resources"]["num_vcpus"].as_u64().unwrap() >= 1);
        assert_eq!(se["license_state"], "LICENSE_STATE_LICENSED");
    }
    assert_eq!(api.object(&format!("/api/sejointoken/{token_uuid}"))["joined"], 3);
    let metrics = || Api::new(&c.url).get("/metrics").body;
    wait_for("the SE gauge", Duration::from_secs(5), || {
        metrics().contains("fulcrum_service_engines_up 3").then_some(())
    });
    // Heartbeats keep arriving.
    let first = ses[0]["last_heartbeat"].as_str().unwrap().to_string();
    wait_for("a newer heartbeat", Duration::from_secs(5), || {
        se_by_name(&api, "se1").filter(|s| s["last_heartbeat"].as_str() > Some(first.as_str()))
    });
    // The SE credential opens the agent endpoints only.
    let credential = agents[0].credential();
    let as_se = Api::new(&c.url).header("Authorization", &format!("Bearer {credential}"));
    assert_eq!(as_se.get("/api/serviceengine").status, 401);
    // Read-only fields stay the controller's.
    let se1 = &ses[0]["uuid"].as_str().unwrap().to_string();
    let patched =
        api.send("PATCH", &format!("/api/serviceengine/{se1}"), Some(br#"{"replace": {"version": "99.0.0"}}"#));
    assert_eq!(patched.status, 400, "{}", patched.error());
    assert!(patched.error().contains("set by the controller"));

    // A virtual service is placed on an SE of its group, which takes it.
    let vs = api.post("/api/virtualservice", &json!({"name": "vs-a", "services": [{"port": 80}]})).json();
    let vs = vs["uuid"].as_str().unwrap().to_string();
    let host = wait_for("the VS served", Duration::from_secs(10), || serving(&api, &vs));
    assert_eq!(runtime(&api, &vs)["num_se_assigned"], 1);
    let host_se = api.object(&format!("/api/serviceengine/{host}"));
    assert_eq!(host_se["vs_refs"].as_array().unwrap().len(), 1);
    let index = (1..=3).find(|i| host_se["name"] == format!("se{i}")).unwrap() - 1;
    let hosted: Value = serde_json::from_slice(&fs::read(agents[index].dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(hosted["hosted"][0]["uuid"], vs.as_str(), "the agent itself records what it serves");

    // kill -9 of that agent: down within the timeout, and the VS moves to another SE.
    let killed_at = Instant::now();
    agents[index].kill9();
    wait_for("the SE down", Duration::from_secs(8), || {
        Some(()).filter(|()| state(&api.object(&format!("/api/serviceengine/{host}"))) == "OPER_DOWN")
    });
    assert!(killed_at.elapsed() < Duration::from_secs(6), "down after {:?}", killed_at.elapsed());
    let moved = wait_for("the VS re-placed", Duration::from_secs(10), || serving(&api, &vs).filter(|s| *s != host));
    assert_ne!(moved, host);
    // Back up after a restart (no token needed: it kept its identity).
    let name = format!("se{}", index + 1);
    agents[index] = Agent::start(&c, None, &work.path().join(&name), &name, &[]);
    wait_for("the SE up again", Duration::from_secs(10), || {
        Some(()).filter(|()| state(&api.object(&format!("/api/serviceengine/{host}"))) == "OPER_UP")
    });
    assert_eq!(serving(&api, &vs), Some(moved), "placement is sticky: nothing moves back needlessly");

    // Deleting an SE cuts it off.
    let gone = ses[2]["uuid"].as_str().unwrap();
    let victim = if gone == host { 1 } else { 2 };
    let victim_uuid = ses[victim]["uuid"].as_str().unwrap();
    assert_eq!(api.delete(&format!("/api/serviceengine/{victim_uuid}")).status, 204);
    assert!(!agents[victim].exits(Duration::from_secs(10)).success());
    assert!(agents[victim].log_text().contains("deleted or its join token revoked"), "{}", agents[victim].log_text());

    // Revoking the token cuts off every SE that joined with it; it cannot be used again.
    assert_eq!(api.delete(&format!("/api/sejointoken/{token_uuid}")).status, 204);
    for (i, agent) in agents.iter_mut().enumerate() {
        if i != victim {
            assert!(!agent.exits(Duration::from_secs(10)).success());
        }
    }
    assert_eq!(api.object("/api/serviceengine")["count"], 0);
    let mut late = Agent::start(&c, Some(&token), &work.path().join("late"), "late", &[]);
    assert!(!late.exits(Duration::from_secs(20)).success());
    assert!(late.log_text().contains("join token not accepted"));
    assert_eq!(runtime(&api, &vs)["oper_status"]["state"], "OPER_RESOURCES");
}

#[test]
fn a_controller_restart_keeps_its_ses_and_where_virtual_services_run() {
    let data = temp_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let launch = || Launch { args: ENGINE_ARGS, listen: &listen, ..Launch::plain(data.path()) };
    let c = try_start(launch()).expect("starts");
    let api = c.admin();
    // Distributed: the two virtual services land on different SEs.
    let group = api.object("/api/serviceenginegroup?name=Default-Group")["results"][0].clone();
    let g = group["uuid"].as_str().unwrap();
    let r = api.send(
        "PATCH",
        &format!("/api/serviceenginegroup/{g}"),
        Some(br#"{"replace": {"algo": "PLACEMENT_ALGO_DISTRIBUTED"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.error());
    let (_, token) = token(&api, "Default-Group");
    let work = temp_dir();
    let _sims = Agent::start(&c, Some(&token), &work.path().join("sims"), "keep", &["--simulate", "3", "--cores", "1"]);
    wait_for("3 SEs", Duration::from_secs(30), || (api.object("/api/licenseusage")["num_ses"] == 3).then_some(()));
    // keep-0001 takes nothing while the virtual services are placed, then is enabled again: the
    // placement is now one a fresh computation would not choose.
    let first = se_by_name(&api, "keep-0001").unwrap();
    let first = first["uuid"].as_str().unwrap();
    let set_state = |state: &str| {
        let body = json!({"replace": {"enable_state": state}}).to_string();
        let r = api.send("PATCH", &format!("/api/serviceengine/{first}"), Some(body.as_bytes()));
        assert_eq!(r.status, 200, "{}", r.error());
    };
    set_state("SE_STATE_DISABLED_FOR_PLACEMENT");
    let vss: Vec<String> = (1..=2)
        .map(|i| {
            let vs = api.post("/api/virtualservice", &json!({"name": format!("keep-{i}"), "services": [{"port": 80}]}));
            vs.json()["uuid"].as_str().unwrap().to_string()
        })
        .collect();
    let before: Vec<String> =
        vss.iter().map(|vs| wait_for("served", Duration::from_secs(10), || serving(&api, vs))).collect();
    assert!(!before.contains(&first.to_string()));
    set_state("SE_STATE_ENABLED");
    std::thread::sleep(Duration::from_secs(1));
    let still: Vec<Option<String>> = vss.iter().map(|vs| serving(&api, vs)).collect();
    assert_eq!(still, before.iter().cloned().map(Some).collect::<Vec<_>>(), "sticky");

    c.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let c = try_start(launch()).expect("restarts");
    let api = c.admin();
    let after: Vec<String> =
        vss.iter().map(|vs| wait_for("served again", Duration::from_secs(15), || serving(&api, vs))).collect();
    assert_eq!(after, before, "the placement the SEs report is kept across a controller restart");
    let list = api.object("/api/serviceengine");
    assert!(list["results"].as_array().unwrap().iter().all(|s| state(s) == "OPER_UP"), "{list}");
}

#[test]
fn license_cores_decide_which_ses_are_licensed() {
    let data = temp_dir();
    let c = controller(data.path());
    let api = c.admin();
    assert_eq!(api.object("/api/licenseusage")["licensed_cores"], 20, "a fresh controller has its evaluation license");
    let r = api.put("/api/controllerlicense", &json!({"licenses": [{"license_id": "small", "cores": 2}]}));
    assert_eq!(r.status, 200, "{}", r.error());
    let (_, token) = token(&api, "Default-Group");
    let work = temp_dir();
    let _sims = Agent::start(&c, Some(&token), &work.path().join("sims"), "lic", &["--simulate", "3", "--cores", "1"]);
    let all_up = || {
        let list = api.object("/api/serviceengine?page_size=10");
        let results = list["results"].as_array().unwrap().clone();
        (results.len() == 3 && results.iter().all(|s| state(s) == "OPER_UP")).then_some(results)
    };
    let ses = wait_for("3 simulated SEs", Duration::from_secs(30), all_up);
    let licensed = ses.iter().filter(|s| s["license_state"] == "LICENSE_STATE_LICENSED").count();
    assert_eq!(licensed, 2, "2 cores for 3 one-core SEs");
    let usage = api.object("/api/licenseusage");
    assert_eq!((usage["consumed_cores"].as_u64(), usage["num_unlicensed_ses"].as_u64()), (Some(2), Some(1)));
    // An unlicensed SE hosts nothing; more cores license it.
    let r = api.send(
        "PATCH",
        "/api/controllerlicense",
        Some(br#"{"add": {"licenses": [{"license_id": "more", "cores": 1}]}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.error());
    wait_for("all licensed", Duration::from_secs(10), || {
        Some(()).filter(|()| api.object("/api/licenseusage")["num_unlicensed_ses"] == 0)
    });

    // The shell shows SEs with their group, version and states, and a group with its SEs.
    let (list, _) = shell(&c, "show serviceengine");
    assert!(list.contains("| Name ") && list.contains("| SE Group ") && list.contains("| Oper State "), "{list}");
    for i in 1..=3 {
        let line = list.lines().find(|l| l.contains(&format!("lic-000{i} "))).unwrap_or_else(|| panic!("{list}"));
        for cell in ["Default-Group", "30.2.1-9001", "OPER_UP", "LICENSED"] {
            assert!(line.contains(cell), "{cell} missing in {line}");
        }
    }
    let (group, _) = shell(&c, "show serviceenginegroup Default-Group");
    assert!(group.contains("| max_vs_per_se ") && group.contains("Service engines (3):"), "{group}");
    assert_eq!(group.matches("30.2.1-9001").count(), 3, "{group}");
}

fn install(api: &Api, se: &str, image: &str) {
    install_with(api, se, image, false);
}

/// An install; `disruptive`: the SE's virtual services leave it for its restart.
fn install_with(api: &Api, se: &str, image: &str, disruptive: bool) {
    let r =
        api.post(&format!("/api/serviceengine/{se}/install"), &json!({"image_ref": image, "disruptive": disruptive}));
    assert_eq!(r.status, 202, "{}", r.error());
}

/// Waits for the SE's current operation to end; returns the SE.
fn finished(api: &Api, se: &str) -> Value {
    wait_for("the operation to end", Duration::from_secs(60), || {
        let s = api.object(&format!("/api/serviceengine/{se}"));
        let step = s["install_status"]["state"].as_str().unwrap_or_default().to_string();
        matches!(step.as_str(), "DONE" | "FAILED" | "ROLLED_BACK").then_some(s)
    })
}

fn slot_json(agent_dir: &Path, slot: &str) -> Value {
    serde_json::from_slice(&fs::read(agent_dir.join("slots").join(slot).join("slot.json")).unwrap()).unwrap()
}

/// Uploads a package; returns the image's uuid.
fn upload_image(api: &Api, path: &Path) -> String {
    let r = upload(api, path);
    assert_eq!(r.status, 201, "{}", r.error());
    r.json()["uuid"].as_str().unwrap().to_string()
}

#[test]
fn an_se_installs_a_real_package_refuses_a_tampered_one_and_rolls_back_a_sick_one() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let c = controller(data.path());
    let api = c.admin();
    let work = temp_dir();
    let marker = work.path().join("slot-agent-ran");
    // The new version carries its own agent: a wrapper that leaves a mark and runs the agent,
    // so the test sees the restart go through the new slot.
    let wrapper = format!(
        "#!/bin/sh\necho \"$FULCRUM_SE_SLOT_STARTED\" >> {}\nexec \"$FULCRUM_SE_LAUNCHER\" \"$@\"\n",
        marker.display()
    );
    let good = pkgs.with_se(
        "good.pkg",
        "30.2.2",
        "9100",
        &[
            ("bin/fulcrum", &wrapper),
            ("etc/version", "30.2.2\n"),
            ("hooks/post-install", "#!/bin/sh\ntouch \"$FULCRUM_SE_SLOT/post-install-ran\"\n"),
            // Slow enough that the SE is visibly out of service while it checks.
            ("hooks/health-check", "#!/bin/sh\nsleep 1\ntest -f etc/version\n"),
        ],
    );
    let sick = pkgs.with_se(
        "sick.pkg",
        "30.2.3",
        "9200",
        &[
            ("etc/version", "30.2.3\n"),
            ("hooks/health-check", "#!/bin/sh\necho 'data plane did not start' >&2\nexit 1\n"),
        ],
    );
    let tampered = pkgs.with_se("tampered.pkg", "30.2.4", "9300", &[("etc/version", "30.2.4\n")]);
    let good_image = upload_image(&api, &good);
    let sick_image = upload_image(&api, &sick);
    let tampered_image = upload_image(&api, &tampered);

    let (_, token) = token(&api, "Default-Group");
    let agent_dir = work.path().join("se1");
    let agent = Agent::start(&c, Some(&token), &agent_dir, "se1", &[]);
    let se =
        wait_for("the SE up", Duration::from_secs(30), || se_by_name(&api, "se1").filter(|s| state(s) == "OPER_UP"));
    let se = se["uuid"].as_str().unwrap().to_string();
    let pid = agent.child.id();
    // A virtual service on se1 (the only SE yet), and a second SE it can move to.
    let vs = api.post("/api/virtualservice", &json!({"name": "vs-up", "services": [{"port": 80}]})).json();
    let vs = vs["uuid"].as_str().unwrap().to_string();
    assert_eq!(wait_for("the VS on se1", Duration::from_secs(10), || serving(&api, &vs)), se);
    let _se2 = Agent::start(&c, Some(&token), &work.path().join("se2"), "se2", &[]);
    let se2 = wait_for("se2 up", Duration::from_secs(30), || se_by_name(&api, "se2").filter(|s| state(s) == "OPER_UP"));

    // The image is served to the SE only, resumably.
    let credential = agent.credential();
    let ranged = Api::new(&c.url)
        .header("Authorization", &format!("Bearer {credential}"))
        .header("Range", "bytes=100-")
        .send("GET", &format!("/api/se-agent/image/{tampered_image}"), None);
    assert_eq!(ranged.status, 206);
    let total = fs::metadata(&tampered).unwrap().len();
    assert_eq!(ranged.header("content-range"), Some(format!("bytes 100-{}/{total}", total - 1).as_str()));
    assert_eq!(ranged.header("content-length"), Some((total - 100).to_string().as_str()));
    assert_eq!(api.get(&format!("/api/se-agent/image/{tampered_image}")).status, 401);

    // A good install: new slot, hooks, restart into the slot's own agent, new version reported.
    // Disruptive: its virtual service does not wait on it (a non-disruptive restart would keep
    // it, handing the listening sockets to the new process; tests/dataplane.rs).
    install_with(&api, &se, "30.2.2-9100-20261122.101500", true);
    let done = finished(&api, &se);
    assert_eq!(done["install_status"]["state"], "DONE", "{}", done["install_status"]);
    assert_eq!(done["version"], "30.2.2");
    assert_eq!(done["build"], 9100);
    assert_eq!(done["previous_version"], "30.2.1-9001");
    let steps: Vec<&str> =
        done["install_status"]["events"].as_array().unwrap().iter().map(|e| e["step"].as_str().unwrap()).collect();
    for step in [
        "PENDING",
        "DOWNLOADING",
        "VERIFYING",
        "UNPACKING",
        "SWITCHING",
        "POST_INSTALL",
        "RESTARTING",
        "HEALTH_CHECK",
        "DONE",
    ] {
        assert!(steps.contains(&step), "{step} missing from {steps:?}");
    }
    // While se1 restarted into its new version (disruptively), its virtual service moved to
    // se2, and stays.
    assert_eq!(serving(&api, &vs).as_deref(), se2["uuid"].as_str(), "placement redone around the upgrade");
    assert_eq!(slot_json(&agent_dir, "b")["version"], "30.2.2", "the version comes from the installed slot");
    assert!(agent_dir.join("slots/b/post-install-ran").exists());
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "b", "the agent restarted through the new slot");
    assert_eq!(agent.child.id(), pid, "re-exec keeps the process");
    assert!(agent.log_text().contains("restarting"));
    // The image an SE runs is in use.
    let in_use = api.delete(&format!("/api/image/{good_image}"));
    assert_eq!(in_use.status, 409);
    assert!(in_use.error().contains("SE group 'Default-Group' (service engine 'se1')"), "{}", in_use.error());

    // A tampered image (changed on the controller's disk) is refused before anything is installed.
    let file = data.path().join("images").join(format!("{tampered_image}.pkg"));
    let mut bytes = fs::read(&file).unwrap();
    let at = bytes.len() - 2000;
    bytes[at] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    install(&api, &se, &tampered_image);
    let refused = finished(&api, &se);
    assert_eq!(refused["install_status"]["state"], "FAILED");
    assert!(
        refused["install_status"]["reason"].as_str().unwrap().contains("sha256 mismatch"),
        "{}",
        refused["install_status"]
    );
    assert_eq!(refused["version"], "30.2.2");
    assert_eq!(slot_json(&agent_dir, "a")["version"], "30.2.1", "the spare slot was not touched");

    // Rollback on command: back to the previous slot.
    let r = api.post(&format!("/api/serviceengine/{se}/rollback"), &json!({}));
    assert_eq!(r.status, 202, "{}", r.error());
    let back = finished(&api, &se);
    assert_eq!(back["install_status"]["state"], "DONE", "{}", back["install_status"]);
    assert_eq!(back["version"], "30.2.1");
    assert_eq!(back["previous_version"], "30.2.2-9100");

    // A version that fails its health check after the restart switches back by itself.
    install(&api, &se, &sick_image);
    let sick_end = finished(&api, &se);
    assert_eq!(sick_end["install_status"]["state"], "ROLLED_BACK", "{}", sick_end["install_status"]);
    let reason = sick_end["install_status"]["reason"].as_str().unwrap();
    assert!(reason.contains("health check failed") && reason.contains("data plane did not start"), "{reason}");
    let settled = wait_for("the old version reported", Duration::from_secs(10), || {
        let s = api.object(&format!("/api/serviceengine/{se}"));
        (s["version"] == "30.2.1").then_some(s)
    });
    assert!(settled.get("previous_version").is_none(), "a failed slot is no rollback target: {settled}");
    let again = api.post(&format!("/api/serviceengine/{se}/rollback"), &json!({}));
    assert_eq!(again.status, 409);
    assert_eq!(state(&settled), "OPER_UP");
}

#[test]
fn hooks_run_from_a_relative_data_dir_and_a_hanging_health_check_is_cut_at_the_health_timeout() {
    let pkgs = Packages::new();
    let data = pkgs.data_dir();
    let health_timeout = 4;
    let args = ["--se-heartbeat-interval", "0.3", "--se-down-after", "5", "--se-health-timeout", "4"];
    let c = try_start(Launch { args: &args, ..Launch::plain(data.path()) }).expect("controller starts");
    let api = c.admin();
    let hanging = pkgs.with_se(
        "hanging.pkg",
        "30.2.2",
        "9100",
        &[
            ("etc/version", "30.2.2\n"),
            ("hooks/post-install", "#!/bin/sh\ntouch \"$FULCRUM_SE_SLOT/post-install-ran\"\n"),
            ("hooks/health-check", "#!/bin/sh\nsleep 30\n"),
        ],
    );
    let image = upload_image(&api, &hanging);
    let (_, token) = token(&api, "Default-Group");
    let work = temp_dir();
    // As the README starts it: `--data-dir ./se1`, relative to where the agent runs.
    let agent = Agent::start_in(&c, Some(&token), Some(work.path()), Path::new("./se1"), "se1", &[]);
    let se =
        wait_for("the SE up", Duration::from_secs(30), || se_by_name(&api, "se1").filter(|s| state(s) == "OPER_UP"));
    let se = se["uuid"].as_str().unwrap().to_string();
    install(&api, &se, &image);
    let started = Instant::now();
    let end = finished(&api, &se);
    let took = started.elapsed();
    assert!(work.path().join("se1/slots/b/post-install-ran").exists(), "{}", agent.log_text());
    assert_eq!(end["install_status"]["state"], "ROLLED_BACK", "{}", end["install_status"]);
    let reason = end["install_status"]["reason"].as_str().unwrap();
    assert!(reason.contains("health check failed") && reason.contains("did not finish"), "{reason}");
    // The whole install (download, hooks, restart) fits well within the 30 s the hook would take.
    assert!(took < Duration::from_secs(health_timeout + 15), "switching back took {took:?}");
    let back = wait_for("the old version reported", Duration::from_secs(10), || {
        let s = api.object(&format!("/api/serviceengine/{se}"));
        (s["version"] == "30.2.1").then_some(s)
    });
    assert_eq!(state(&back), "OPER_UP");
}

#[test]
fn five_hundred_simulated_ses_join_one_controller() {
    let data = temp_dir();
    let c = try_start(Launch {
        args: &["--se-heartbeat-interval", "5", "--se-down-after", "30"],
        ..Launch::plain(data.path())
    })
    .expect("controller starts");
    let api = c.admin();
    let r = api.put("/api/controllerlicense", &json!({"licenses": [{"license_id": "fleet", "cores": 500}]}));
    assert_eq!(r.status, 200);
    let (_, token) = token(&api, "Default-Group");
    let work = temp_dir();
    let _sims = Agent::start(&c, Some(&token), &work.path().join("fleet"), "fleet", &["--simulate", "500"]);
    let started = Instant::now();
    wait_for("500 SEs up", Duration::from_secs(120), || {
        let usage = api.object("/api/licenseusage");
        (usage["num_ses"] == 500 && usage["num_licensed_ses"] == 500).then_some(())
    });
    let joined_in = started.elapsed();
    let up = (1..=3)
        .map(|page| api.object(&format!("/api/serviceengine?page_size=200&page={page}&fields=name,oper_status")))
        .flat_map(|p| p["results"].as_array().unwrap().clone())
        .filter(|s| state(s) == "OPER_UP")
        .count();
    assert_eq!(up, 500);
    eprintln!("500 simulated SEs joined and up in {joined_in:?}");
}

#[test]
fn license_metering_reads_the_metrics_api() {
    let data = temp_dir();
    let c = controller(data.path());
    let api = c.admin();
    let (_, token) = token(&api, "Default-Group");
    let work = temp_dir();
    let _sims = Agent::start(&c, Some(&token), &work.path().join("sim"), "sim", &["--simulate", "3"]);
    wait_for("3 licensed SEs", Duration::from_secs(30), || {
        (api.object("/api/licenseusage")["num_licensed_ses"] == 3).then_some(())
    });
    let mean = |query: &str| {
        let r = api.get(&format!("/api/analytics/metrics/controller?{query}&limit=1&step=300"));
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        r.json()["results"][0]["series"][0]["header"]["statistics"]["mean"].as_f64().unwrap()
    };
    // What license-metering scripts ask, with the values of this fleet: 3 SEs of 1 core.
    assert_eq!(mean("metric_id=controller_stats.avg_num_service_cores"), 3.0);
    assert_eq!(mean("metric_id=controller_stats.avg_num_licensed_service_cores"), 20.0);
    let group =
        api.object("/api/serviceenginegroup?name=Default-Group")["results"][0]["uuid"].as_str().unwrap().to_string();
    assert_eq!(mean(&format!("metric_id=segroup_stats.avg_license_usage&obj_id={group}")), 3.0);
    let other =
        api.post("/api/serviceenginegroup", &json!({"name": "empty"})).json()["uuid"].as_str().unwrap().to_string();
    assert_eq!(mean(&format!("metric_id=segroup_stats.avg_license_usage&obj_id={other}")), 0.0);
    // Request rates come from the same counters as /metrics: 40 answered requests, 10 of them 404.
    let before = api.get("/api/analytics/metrics/controller?metric_id=controller_stats.avg_api_request_rate");
    assert_eq!(before.status, 200, "{}", before.body);
    for i in 0..40 {
        let path = if i % 4 == 0 { "/api/pool/pool-nope" } else { "/api/pool" };
        api.get(path);
    }
    let r = api.get(
        "/api/analytics/metrics/controller?metric_id=controller_stats.avg_api_request_rate,\
         controller_stats.avg_api_error_rate&limit=3&step=60",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let series = r.json()["results"][0]["series"].clone();
    let newest = |s: &Value| s["data"].as_array().unwrap().last().unwrap()["value"].as_f64().unwrap();
    assert_eq!(series[0]["header"]["units"], "PER_SECOND");
    let (requests, errors) = (newest(&series[0]), newest(&series[1]));
    assert!(requests > 0.0 && errors > 0.0 && errors < requests, "{series}");
    assert!(series[0]["data"].as_array().unwrap().len() <= 3, "{series}");
    for (query, status, says) in [
        ("metric_id=controller_stats.avg_api_request_rate&step=0".to_string(), 400, "step must be"),
        ("metric_id=controller_stats.avg_api_request_rate&limit=x".to_string(), 400, "limit must be"),
        ("metric_id=controller_stats.nope".to_string(), 400, "unknown metric_id"),
        ("metric_id=segroup_stats.avg_license_usage".to_string(), 400, "obj_id"),
        ("metric_id=segroup_stats.avg_num_se&obj_id=serviceenginegroup-nope".to_string(), 404, "no such"),
        ("limit=1".to_string(), 400, "metric_id is required"),
    ] {
        let r = api.get(&format!("/api/analytics/metrics/controller?{query}"));
        assert_eq!(r.status, status, "{query}: {}", r.body);
        assert!(r.error().contains(says), "{query}: {}", r.error());
    }
    assert_eq!(
        c.anonymous().get("/api/analytics/metrics/controller?metric_id=controller_stats.avg_num_service_cores").status,
        401
    );
}
