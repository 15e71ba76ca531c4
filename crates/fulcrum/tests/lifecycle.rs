//! Starting, stopping and crashing the controller.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Api, Launch, start, temp_dir, try_start};
use serde_json::json;

#[test]
fn https_by_default_with_a_certificate_kept_across_restarts() {
    let dir = temp_dir();
    let launch = || Launch { plain_http: false, ..Launch::plain(dir.path()) };
    let c = try_start(launch()).unwrap();
    assert!(c.url.starts_with("https://127.0.0.1:"), "{}", c.url);
    let r = c.admin().get("/api/cluster/version");
    assert_eq!(r.status, 200);
    assert!(r.header("Strict-Transport-Security").is_some());
    let cert_path = dir.path().join("tls/server.crt");
    let cert = std::fs::read(&cert_path).unwrap();
    let key_mode = std::fs::metadata(dir.path().join("tls/server.key")).unwrap().permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    drop(c);
    let c = try_start(launch()).unwrap();
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert, "the certificate is reused");
    // The certificate verifies against itself as a CA (the shell's --ca-cert).
    let tls = fulcrum_shell::client::tls_config(Some(&cert_path)).unwrap();
    let agent = ureq::AgentBuilder::new().tls_config(tls).build();
    let url = c.url.replace("127.0.0.1", "localhost");
    assert_eq!(agent.get(&format!("{url}/api/cluster/status")).call().unwrap().status(), 200);
}

#[test]
fn initial_password_is_generated_printed_once_and_kept_private() {
    let dir = temp_dir();
    let c = try_start(Launch { password: None, ..Launch::plain(dir.path()) }).unwrap();
    let line =
        c.banner.iter().find(|l| l.starts_with("Generated the initial admin password: ")).expect("password printed");
    let password = line.rsplit(' ').next().unwrap().to_string();
    assert!(password.len() >= 16);
    let file = dir.path().join("initial-admin-password");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), password);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(Api::new(&c.url).basic("admin", &password).get("/api/pool").status, 200);
    assert_eq!(Api::new(&c.url).basic("admin", "admin").get("/api/pool").status, 401, "no static default");
    drop(c);
    let c = try_start(Launch { password: None, ..Launch::plain(dir.path()) }).unwrap();
    assert!(c.banner.iter().all(|l| !l.contains("password")), "printed only on first start");
    assert_eq!(Api::new(&c.url).basic("admin", &password).get("/api/pool").status, 200);
}

#[test]
fn clear_errors_for_a_taken_port_a_bad_data_dir_and_a_shared_data_dir() {
    let dir = temp_dir();
    let first = start(dir.path());
    let addr = first.url.trim_start_matches("http://").to_string();
    let other = temp_dir();
    let err = try_start(Launch { listen: &addr, ..Launch::plain(other.path()) }).err().unwrap();
    assert!(err.contains(&format!("cannot listen on {addr}: the address is already in use")), "{err}");
    let err = try_start(Launch::plain(dir.path())).err().unwrap();
    assert!(err.contains("is in use by another fulcrum process"), "{err}");
    let file = other.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let err = try_start(Launch::plain(&file.join("data"))).err().unwrap();
    assert!(err.contains("cannot create it"), "{err}");
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = temp_dir();
    let c = start(dir.path());
    assert_eq!(c.admin().post("/api/pool", &json!({"name": "before-stop"})).status, 201);
    let status = c.terminate();
    assert!(status.success(), "{status:?}");
    let c = start(dir.path());
    assert_eq!(c.admin().object("/api/pool?name=before-stop")["count"], 1);
}

/// 1,000 creates from 32 concurrent clients; `kill -9` once about half are acknowledged; every
/// acknowledged object must be there, intact, after a restart.
#[test]
fn acknowledged_creates_survive_kill_9() {
    const CLIENTS: usize = 32;
    const TOTAL: usize = 1000;
    let dir = temp_dir();
    let c = start(dir.path());
    let api = c.admin();
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (api, next, acked) = (api.clone(), next.clone(), acked.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= TOTAL {
                        return;
                    }
                    let body = json!({"name": format!("durable-{i}"), "description": format!("payload {i}"),
                        "servers": [{"ip": {"addr": format!("10.0.{}.{}", i / 256, i % 256), "type": "V4"}}]});
                    match api.try_post("/api/pool", &body) {
                        Ok(r) if r.status == 201 => {
                            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                            acked.lock().unwrap().insert(i, v);
                        }
                        Ok(r) => panic!("unexpected {}: {}", r.status, r.body),
                        Err(_) => return, // the controller is gone
                    }
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while acked.lock().unwrap().len() < TOTAL / 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    c.kill9();
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= TOTAL / 2, "only {} acknowledged", acked.len());
    let c = start(dir.path());
    let api = c.admin();
    for (i, created) in &acked {
        let got = api.object(&format!("/api/pool/{}", created["uuid"].as_str().unwrap()));
        assert_eq!(got["name"], format!("durable-{i}"));
        assert_eq!(got["description"], format!("payload {i}"));
        assert_eq!(got["_last_modified"], created["_last_modified"]);
        assert_eq!(got["servers"][0]["ip"]["addr"], created["servers"][0]["ip"]["addr"]);
    }
    // Writes in flight at the kill are either wholly there or absent.
    let all = api.object("/api/pool?page_size=200&name.contains=durable-")["count"].as_u64().unwrap() as usize;
    assert!(all >= acked.len() && all <= TOTAL, "{all} pools after restart, {} acknowledged", acked.len());
    println!("acknowledged {} of {TOTAL} before kill -9; {all} present after restart", acked.len());
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    use std::io::{BufRead, BufReader};
    let dir = temp_dir();
    let log_path = dir.path().join("serve.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["serve", "--plain-http", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("FULCRUM_LOG", "info")
        .env("FULCRUM_ADMIN_PASSWORD", common::PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let url = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("fulcrum listening on ").map(String::from))
        .expect("the controller starts");
    assert_eq!(Api::new(&url).basic("admin", common::PASSWORD).get("/api/pool").status, 200);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("INFO"), "the log has lines: {log}");
    assert!(!log.contains('\u{1b}'), "no ANSI escapes in a log file: {log:?}");
}

#[test]
fn kill_9_during_backups_leaves_no_listed_broken_backup() {
    let dir = temp_dir();
    let mut c = start(dir.path());
    let api = c.admin();
    // About 10 MB of configuration, so a backup takes long enough to be interrupted.
    for p in 0..8 {
        let servers: Vec<_> = (0..4000)
            .map(|i| json!({"ip": {"addr": format!("10.{p}.{}.{}", i / 250, i % 250), "type": "V4"}, "port": 8080}))
            .collect();
        assert_eq!(api.post("/api/pool", &json!({"name": format!("big-{p}"), "servers": servers})).status, 201);
    }
    let started = std::time::Instant::now();
    assert_eq!(api.post("/api/configuration/backup", &json!({})).status, 201);
    let one_backup = started.elapsed();
    for round in 0..6u32 {
        let api = c.admin();
        let backup = std::thread::spawn(move || api.try_post("/api/configuration/backup", &json!({})));
        // Spread the kills over the time a backup takes.
        std::thread::sleep(one_backup * round / 5);
        c.kill9();
        let _ = backup.join();
        c = start(dir.path());
        let api = c.admin();
        let listed = api.object("/api/configuration/backup");
        for b in listed["results"].as_array().unwrap() {
            let name = b["name"].as_str().unwrap();
            let r = api.get(&format!("/api/configuration/backup/{name}"));
            assert_eq!(r.status, 200);
            let whole: serde_json::Value = serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("round {round}: backup {name} is listed but broken: {e}"));
            assert_eq!(whole["objects"]["pool"].as_array().unwrap().len(), 8, "round {round}: {name}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("backups"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".json"))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
    }
}

/// A small tmpfs for a disk that fills up; `None` when this test cannot mount one (not root).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new().prefix("fulcrum-small-disk-").tempdir().ok()?.keep();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_is_survived_and_recovered_from_without_a_restart() {
    let Some(disk) = SmallDisk::mount("24m") else {
        println!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = disk.0.join("data");
    let c = start(&data);
    let api = c.admin();
    // 20 KB each, and not compressible (the journal compresses large values): the journal keeps
    // up to 1.5 MiB of zeros written ahead, room the store goes on using once the disk is full,
    // and 200 of these outgrow it.
    let pool = |name: &str| json!({"name": name, "description": fulcrum_api::auth::random_token(20_000)});
    assert_eq!(api.post("/api/pool", &pool("before")).status, 201);
    // Fill the disk.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut refused = 0;
    for i in 0..200 {
        let r = api.post("/api/pool", &pool(&format!("while-full-{i}")));
        if r.status == 201 {
            continue; // the store had a little room left
        }
        assert!(matches!(r.status, 503 | 507), "{}: {}", r.status, r.body);
        assert!(r.error().contains("not stored"), "{}", r.error());
        refused += 1;
        if refused == 3 {
            break;
        }
    }
    assert_eq!(refused, 3, "the disk never filled");
    let status = api.object("/api/cluster/status");
    assert_eq!(status["store"]["healthy"], false, "{status}");
    assert!(c.anonymous().get("/metrics").body.contains("fulcrum_store_healthy 0"));
    let before_free = api.object("/api/pool?page_size=200")["count"].as_u64().unwrap();
    // Space is back: writes succeed again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let r = api.post("/api/pool", &pool("after"));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(api.object("/api/cluster/status")["store"]["healthy"], true);
    assert!(c.anonymous().get("/metrics").body.contains("fulcrum_store_healthy 1"));
    assert_eq!(api.object("/api/pool?page_size=200")["count"].as_u64().unwrap(), before_free + 1);
    // And everything acknowledged is there after a restart.
    c.kill9();
    let c = start(&data);
    let names: Vec<String> = c.admin().object("/api/pool?page_size=200")["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"after".to_string()), "{names:?}");
    assert_eq!(names.len() as u64, before_free + 1);
    drop(c);
}
