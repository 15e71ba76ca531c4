//! The README's five-minute tour, run as written: its code blocks are read from README.md
//! (never copied here), the `sh` ones run in order in one bash, the `python` one through the
//! SDK's Python, the `serve` block in the background, against a fresh controller. `cargo run
//! [-q] --release -- ARGS` reaches the binary under test through a stand-in `cargo` on PATH, so
//! the text stays exactly what a reader types.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Api, temp_dir};
use serde_json::Value;

const TOUR_PORT: u16 = 9080;
const TOUR_PASSWORD: &str = "Tour-pass-1";
/// The whole tour, builds of packages and two upgrades included, must end well within this.
const TOUR_LIMIT: Duration = Duration::from_secs(900);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The fenced blocks of the tour section: (language, text).
fn tour_blocks(readme: &str) -> Vec<(String, String)> {
    let start = readme.find("## Five-minute tour").expect("the README has its tour");
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```").filter(|l| !l.is_empty()) {
            let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            blocks.push((lang.trim().to_string(), body.join("\n")));
        }
    }
    blocks
}

/// A `cargo` that only knows `cargo run [-q] [--release] -- ARGS` and runs the binary under test.
fn cargo_stand_in(dir: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = run ] || {{ echo \"tour: only 'cargo run' is expected, got: $*\" >&2; exit 97; }}\n\
         shift\n\
         while [ \"$1\" != -- ]; do case \"$1\" in -q|--release) shift ;; *) echo \"tour: unexpected '$1'\" >&2; exit 97 ;; esac; done\n\
         shift\n\
         exec '{}' \"$@\"\n",
        env!("CARGO_BIN_EXE_fulcrum")
    );
    let path = dir.join("cargo");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The Python that has the SDK: FULCRUM_TOUR_PYTHON (scripts/test sets it), else the venv.
fn sdk_python() -> PathBuf {
    let python = std::env::var_os("FULCRUM_TOUR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(python.exists(), "no Python with avisdk at {}: run ./scripts/test, which prepares it", python.display());
    python
}

/// Kills a bash and everything it started (its process group) when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn bash(work: &Path, path_env: &str, script: &str, log: &Path) -> Group {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(work)
        .env("PATH", path_env)
        .env("HOME", work.join(".home"))
        .env_remove("FULCRUM_PASSWORD")
        .env_remove("FULCRUM_JOIN_TOKEN")
        .env("FULCRUM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("bash runs");
    Group(child)
}

#[test]
fn the_readme_tour_runs_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let blocks = tour_blocks(&readme);
    assert!(blocks.len() >= 8, "the tour's blocks: {blocks:?}");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", TOUR_PORT)).is_ok(),
        "the tour uses 127.0.0.1:{TOUR_PORT}, which something else holds"
    );
    let work = temp_dir();
    copy_dir(&repo_root().join("examples"), &work.path().join("examples"));
    std::fs::create_dir_all(work.path().join(".home")).unwrap();
    let bin = work.path().join(".bin");
    std::fs::create_dir_all(&bin).unwrap();
    cargo_stand_in(&bin);
    let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let python = sdk_python();

    // One bash for everything but the controller, which runs beside it as in its own terminal.
    let mut script = String::from("set -e\n");
    let mut serve = None;
    for (lang, text) in &blocks {
        match lang.as_str() {
            "sh" if text.contains("-- serve") => {
                // The blocks before it (keys, trust) have run: let the controller start, and wait for it.
                serve = Some(text.clone());
                script.push_str("touch tour/.ready\n");
                script.push_str("for i in $(seq 100); do [ -f tour/.serving ] && break; sleep 0.1; done\n");
            }
            "sh" => {
                script.push_str(text);
                script.push('\n');
            }
            "python" => script.push_str(&format!("'{}' - <<'TOUR_PYTHON'\n{text}\nTOUR_PYTHON\n", python.display())),
            other => panic!("a tour block in an unexpected language: {other}"),
        }
    }
    let serve = serve.expect("the tour starts the controller");
    let serve_script =
        format!("for i in $(seq 600); do [ -f tour/.ready ] && break; sleep 0.1; done\ntouch tour/.serving\n{serve}\n");

    let started = Instant::now();
    let _controller = bash(work.path(), &path_env, &serve_script, &work.path().join("serve.log"));
    let mut tour = bash(work.path(), &path_env, &script, &work.path().join("tour.log"));
    let status = loop {
        if let Some(status) = tour.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < TOUR_LIMIT, "the tour did not finish within {TOUR_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut log = String::new();
    std::fs::File::open(work.path().join("tour.log")).unwrap().read_to_string(&mut log).unwrap();
    let serve_log = std::fs::read_to_string(work.path().join("serve.log")).unwrap_or_default();
    eprintln!("the tour took {:?}", started.elapsed());
    assert!(status.success(), "the tour stopped ({status:?}):\n{log}\n--- controller:\n{serve_log}");

    // What the reader saw, and where the tour left the system.
    for seen in [
        "\"name\":\"web\"",
        "app-vs",
        "Directory listing for /",
        "127.0.0.2:8001",
        "SYSERR_SUCCESS",
        "Default-Group",
        "se1",
        "UPGRADE_FSM_COMPLETED",
    ] {
        assert!(log.contains(seen), "'{seen}' not shown:\n{log}");
    }
    let api = Api::new(&format!("http://127.0.0.1:{TOUR_PORT}")).basic("admin", TOUR_PASSWORD);
    let version = api.object("/api/cluster/version");
    assert!(version.to_string().contains("30.2.2"), "the controller was upgraded: {version}");
    let history = api.object("/api/upgradestatusinfo");
    let states: Vec<&Value> = history["results"].as_array().unwrap().iter().map(|n| &n["state"]["state"]).collect();
    assert!(states.iter().all(|s| *s == "UPGRADE_FSM_COMPLETED"), "every part of the upgrades completed: {states:?}");
    assert_eq!(api.object("/api/licenseusage")["num_ses"], 0, "revoking the token removed the SEs");
    for artifact in ["tour/release.secret", "tour/release.pkg", "tour/data", "tour/se1"] {
        assert!(work.path().join(artifact).exists(), "{artifact} is under tour/");
    }
    let stray: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !["tour", "examples", ".bin", ".home", "tour.log", "serve.log"].contains(&n.as_str()))
        .collect();
    assert!(stray.is_empty(), "the tour left files outside tour/: {stray:?}");
}

#[test]
fn cargo_run_names_the_controller_binary() {
    // The README's commands are `cargo run --release -- …` in a workspace that has a second
    // binary (the benchmarks): the workspace's default member must settle which one runs.
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let table: Vec<&str> = manifest.lines().skip_while(|l| !l.starts_with("[workspace]")).collect();
    let line = table.iter().find(|l| l.starts_with("default-members")).expect("default-members is set");
    assert!(line.contains("\"crates/fulcrum\""), "{line}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["run", "-q", "--locked", "--", "--version"])
        .current_dir(repo_root())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("fulcrum "), "{}", String::from_utf8_lossy(&out.stdout));
}
