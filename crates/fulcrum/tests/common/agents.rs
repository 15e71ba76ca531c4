//! Real SE agent processes for tests, and waiting on the controller.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::packages::BIN;
use super::{Api, Controller};

pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(c: &Controller, token: Option<&str>, dir: &Path, name: &str, extra: &[&str]) -> Agent {
        Agent::start_in(c, token, None, dir, name, extra)
    }

    /// Starts an agent in working directory `cwd`, so that `dir` may be relative to it (as
    /// the README's `--data-dir ./se1`).
    pub fn start_in(
        c: &Controller,
        token: Option<&str>,
        cwd: Option<&Path>,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        Agent::start_at(&c.url, token, cwd, dir, name, extra)
    }

    /// Starts an agent given `controllers` (one URL, or several separated by commas).
    pub fn start_at(
        controllers: &str,
        token: Option<&str>,
        cwd: Option<&Path>,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        Agent::start_under(&[], controllers, token, cwd, dir, name, extra)
    }

    /// Starts an agent on the first CPU only (`taskset -c 0`), as an SE given one core.
    pub fn start_on_one_core(c: &Controller, token: Option<&str>, dir: &Path, name: &str) -> Agent {
        Agent::start_under(&["taskset", "-c", "0"], &c.url, token, None, dir, name, &[])
    }

    /// Starts an agent through `wrapper` (a command that runs the agent, or nothing).
    fn start_under(
        wrapper: &[&str],
        controllers: &str,
        token: Option<&str>,
        cwd: Option<&Path>,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        let absolute = cwd.map_or_else(|| dir.to_path_buf(), |cwd| cwd.join(dir));
        fs::create_dir_all(&absolute).unwrap();
        let log = absolute.with_extension("log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(["se-agent", "--controller", controllers, "--name", name, "--data-dir"]).arg(dir).args(extra);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = cmd
            .env("FULCRUM_LOG", "info")
            .env_remove("FULCRUM_JOIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn agent");
        Agent { child, dir: absolute, log }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the agent to exit on its own.
    pub fn exits(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent still running; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn credential(&self) -> String {
        let identity: Value = serde_json::from_slice(&fs::read(self.dir.join("identity.json")).unwrap()).unwrap();
        identity["credential"].as_str().unwrap().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn token(api: &Api, group: &str) -> (String, String) {
    let r = api.post("/api/sejointoken", &json!({"se_group_ref": format!("/api/serviceenginegroup?name={group}")}));
    assert_eq!(r.status, 201, "{}", r.error());
    let body = r.json();
    (body["uuid"].as_str().unwrap().to_string(), body["token"].as_str().unwrap().to_string())
}

pub fn se_by_name(api: &Api, name: &str) -> Option<Value> {
    api.object(&format!("/api/serviceengine?name={name}"))["results"].as_array().unwrap().first().cloned()
}

pub fn state(se: &Value) -> &str {
    se["oper_status"]["state"].as_str().unwrap_or_default()
}
