//! Upgrade orchestration (issue 7): 1,000 simulated SEs in 50 groups. The time of a preview
//! (all 22 checks), and the wall time of a system upgrade whose installs are instant (small
//! package, no hooks), 10 groups at once — the orchestration's own overhead. The peer, in the
//! same run: the same 1,000 SEs told to install the next version all at once with the per-SE
//! install API, no orchestration (no ordering, batches, drains or checks).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Common, PASSWORD, UpgradeArgs, basic, start_fulcrum_with};

struct Api {
    agent: ureq::Agent,
    url: String,
    auth: String,
}

impl Api {
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let request = self.agent.request(method, &format!("{}{path}", self.url)).set("Authorization", &self.auth);
        let response = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match response {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(ureq::Error::Status(code, r)) => {
                panic!("{method} {path}: {code} {}", r.into_string().unwrap_or_default())
            }
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// GET through a controller restart.
    fn get(&self, path: &str) -> Value {
        for _ in 0..200 {
            let r = self.agent.get(&format!("{}{path}", self.url)).set("Authorization", &self.auth).call();
            if let Ok(r) = r {
                return r.into_json().unwrap_or(Value::Null);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("GET {path}: the controller does not answer");
    }
}

fn fulcrum(binary: &std::path::Path, args: &[&str]) {
    let out = Command::new(binary).args(args).output().expect("run fulcrum");
    assert!(out.status.success(), "fulcrum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn package(binary: &std::path::Path, dir: &std::path::Path, version: &str, build: &str) -> Vec<u8> {
    for (sub, file) in [("controller", "bin/controller"), ("se", "bin/se")] {
        let path = dir.join(format!("{sub}-{version}")).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("#!/bin/sh\necho {version}\n")).unwrap();
    }
    let out = dir.join(format!("{version}.pkg"));
    let (controller, se, key) =
        (dir.join(format!("controller-{version}")), dir.join(format!("se-{version}")), dir.join("bench.secret"));
    fulcrum(
        binary,
        &[
            "pkg",
            "build",
            "--kind",
            "controller",
            "--version",
            version,
            "--build",
            build,
            "--date",
            "20261122.101500",
            "--min-version",
            "30.1.1",
            "--controller-dir",
            controller.to_str().unwrap(),
            "--se-dir",
            se.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn upload(api: &Api, bytes: &[u8]) -> String {
    let boundary = "----bench-upgrade";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.pkg\"\r\n\r\n")
        .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = api
        .agent
        .post(&format!("{}/api/image", api.url))
        .set("Authorization", &api.auth)
        .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
        .send_bytes(&body)
        .expect("upload");
    r.into_json::<Value>().unwrap()["name"].as_str().unwrap().to_string()
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not done within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every SE's version, as `version-build`.
fn versions(api: &Api) -> Vec<String> {
    let mut out = Vec::new();
    for page in 1.. {
        let r = api.get(&format!("/api/serviceengine?page_size=200&page={page}&fields=version,build"));
        out.extend(
            r["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| format!("{}-{}", s["version"].as_str().unwrap_or("?"), s["build"])),
        );
        if r.get("next").is_none() {
            break;
        }
    }
    out
}

pub fn run(common: &Common, args: &UpgradeArgs) {
    let groups = args.groups;
    let per_group = args.ses / groups;
    println!(
        "\n== upgrade orchestration: {} simulated SEs in {groups} groups, {} groups at once",
        per_group * groups,
        args.concurrent
    );
    let dir = tempfile::Builder::new().prefix("upgrade-bench-").tempdir_in(".").unwrap();
    fulcrum(&common.fulcrum, &["pkg", "keygen", "--out", dir.path().join("bench").to_str().unwrap()]);
    let fulcrum_process = start_fulcrum_with(
        &common.fulcrum,
        Some(&dir.path().join("bench.pub")),
        &["--se-heartbeat-interval", "2", "--se-down-after", "60"],
    );
    let api = Api { agent: ureq::agent(), url: fulcrum_process.url.clone(), auth: basic() };
    let _ = PASSWORD;
    api.send(
        "PUT",
        "/api/controllerlicense",
        Some(json!({"licenses": [{"license_id": "bench", "cores": per_group * groups}]})),
    );
    let mut agents: Vec<Child> = Vec::new();
    for g in 0..groups {
        let name = if g == 0 { "Default-Group".to_string() } else { format!("G{g:02}") };
        if g > 0 {
            api.send("POST", "/api/serviceenginegroup", Some(json!({"name": name})));
        }
        let token = api.send(
            "POST",
            "/api/sejointoken",
            Some(json!({"se_group_ref": format!("/api/serviceenginegroup?name={name}")})),
        );
        agents.push(
            Command::new(&common.fulcrum)
                .args(["se-agent", "--controller", &api.url, "--data-dir"])
                .arg(dir.path().join(format!("ses-{g:02}")))
                .args(["--simulate", &per_group.to_string(), "--cores", "1", "--name", &format!("g{g:02}")])
                .args(["--join-token", token["token"].as_str().unwrap()])
                .env("FULCRUM_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
                .expect("simulated SEs"),
        );
    }
    let total = per_group * groups;
    wait("SEs joined", Duration::from_secs(180), || {
        api.get("/api/licenseusage")["num_licensed_ses"].as_u64() == Some(total as u64)
    });
    let next = upload(&api, &package(&common.fulcrum, dir.path(), "30.2.2", "9100"));
    let after = upload(&api, &package(&common.fulcrum, dir.path(), "30.2.3", "9200"));
    api.send("POST", "/api/configuration/backup", Some(json!({})));
    // Let every SE report once more, so the checks see them all reachable.
    std::thread::sleep(Duration::from_secs(3));

    let mut previews = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let preview = api.send(
            "POST",
            "/api/upgrade/preview",
            Some(json!({"image_ref": format!("/api/image?name={next}"), "system": true})),
        );
        previews.push(started.elapsed());
        assert_eq!(preview["checks"].as_array().unwrap().len(), 22);
    }
    previews.sort();
    let preview = previews[previews.len() / 2];
    println!("  preview (22 checks, {total} SEs, {groups} groups): median {:.1} ms of 5", preview.as_secs_f64() * 1e3);

    api.send(
        "PATCH",
        "/api/controllerproperties",
        Some(json!({"replace": {"upgrade_concurrent_segroups": args.concurrent}})),
    );
    let started = Instant::now();
    let answer = api.send(
        "POST",
        "/api/upgrade",
        Some(json!({"image_ref": format!("/api/image?name={next}"), "system": true, "skip_warnings": true})),
    );
    assert_eq!(answer["status_code"], "SYSERR_UPGRADE_SYSTEM_STARTED", "{answer}");
    let mut controller_done = None;
    wait("the system upgrade", Duration::from_secs(1800), || {
        let summary = api.get("/api/upgradestatussummary");
        let nodes = summary["results"].as_array().cloned().unwrap_or_default();
        if controller_done.is_none() && nodes.first().is_some_and(|n| n["state"]["state"] == "UPGRADE_FSM_COMPLETED") {
            controller_done = Some(started.elapsed());
        }
        let states: Vec<&str> = nodes.iter().map(|n| n["state"]["state"].as_str().unwrap_or("")).collect();
        assert!(
            !states.iter().any(|s| s.contains("ERROR") || s.contains("SUSPENDED")),
            "the upgrade failed: {summary}"
        );
        states.iter().all(|s| *s == "UPGRADE_FSM_COMPLETED")
    });
    let orchestrated = started.elapsed();
    let all: Vec<String> = versions(&api);
    assert!(all.iter().all(|v| v == "30.2.2-9100") && all.len() == total, "every SE upgraded");
    let controller_part = controller_done.unwrap_or_default();
    println!(
        "  system upgrade (controller restart + {total} SEs, {} groups at once, rolling 1 SE per group): {:.1} s (controller part {:.1} s; SE part {:.1} s = {:.1} ms per SE per group lane)",
        args.concurrent,
        orchestrated.as_secs_f64(),
        controller_part.as_secs_f64(),
        (orchestrated - controller_part).as_secs_f64(),
        (orchestrated - controller_part).as_secs_f64() * 1e3 / (total as f64 / args.concurrent as f64)
    );

    // The peer: every SE commanded at once, no orchestration.
    std::thread::sleep(Duration::from_secs(3));
    let mut uuids = Vec::new();
    for page in 1.. {
        let r = api.get(&format!("/api/serviceengine?page_size=200&page={page}&fields=uuid"));
        uuids.extend(r["results"].as_array().unwrap().iter().map(|s| s["uuid"].as_str().unwrap().to_string()));
        if r.get("next").is_none() {
            break;
        }
    }
    let started = Instant::now();
    for uuid in &uuids {
        api.send("POST", &format!("/api/serviceengine/{uuid}/install"), Some(json!({"image_ref": after})));
    }
    wait("the direct installs", Duration::from_secs(1800), || versions(&api).iter().all(|v| v == "30.2.3-9200"));
    let direct = started.elapsed();
    println!("  the same installs sent to all {total} SEs at once (no orchestration): {:.1} s", direct.as_secs_f64());
    println!(
        "  SE part of the orchestrated upgrade / unorchestrated installs: {:.2}x (rolling, {} groups at once, drains and checks vs everything at once)",
        (orchestrated - controller_part).as_secs_f64() / direct.as_secs_f64(),
        args.concurrent
    );
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}
