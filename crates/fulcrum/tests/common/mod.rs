//! Test harness: starts the real `fulcrum` binary on an ephemeral 127.0.0.1 port and talks HTTP
//! to it.
#![allow(dead_code)]

pub mod agents;
pub mod cluster;
pub mod etcd;
pub mod linearizability;
pub mod packages;
pub mod pty;
pub mod traffic;
pub mod upgrades;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

pub const PASSWORD: &str = "Test-admin-1";

pub struct Controller {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    /// Lines printed on stdout before the listening line.
    pub banner: Vec<String>,
    /// HOME for shells run against this controller (their history and upload sessions).
    pub shell_home: tempfile::TempDir,
}

pub struct Launch<'a> {
    pub data_dir: &'a Path,
    pub plain_http: bool,
    pub password: Option<&'a str>,
    pub listen: &'a str,
    /// More `fulcrum serve` arguments.
    pub args: &'a [&'a str],
    /// More environment variables.
    pub env: &'a [(&'a str, &'a str)],
}

impl<'a> Launch<'a> {
    pub fn plain(data_dir: &'a Path) -> Launch<'a> {
        Launch { data_dir, plain_http: true, password: Some(PASSWORD), listen: "127.0.0.1:0", args: &[], env: &[] }
    }
}

/// A controller process that has not said where it listens yet.
pub struct Starting {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    data_dir: PathBuf,
    /// What it printed so far.
    pub banner: Vec<String>,
}

/// Starts the binary without waiting for it to listen.
pub fn spawn(launch: Launch<'_>) -> Starting {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fulcrum"));
    cmd.args(["serve", "--listen", launch.listen, "--data-dir"]).arg(launch.data_dir);
    if launch.plain_http {
        cmd.arg("--plain-http");
    }
    cmd.args(launch.args);
    cmd.env("FULCRUM_LOG", "warn").env_remove("FULCRUM_ADMIN_PASSWORD").envs(launch.env.iter().copied());
    if let Some(p) = launch.password {
        cmd.env("FULCRUM_ADMIN_PASSWORD", p);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn fulcrum");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Starting { child: Some(child), lines, data_dir: launch.data_dir.to_path_buf(), banner: Vec::new() }
}

impl Starting {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits up to `within` for a line containing `text` (kept in the banner); false if none came.
    pub fn wait_for_line(&mut self, text: &str, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.banner.push(line);
                    if found {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits up to `within` for the listening line; the controller, or its stderr if it exited.
    pub fn listening(mut self, within: Duration) -> Result<Controller, String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("fulcrum listening on ") {
                        return Ok(Controller {
                            child: self.child.take().expect("running"),
                            url: url.to_string(),
                            data_dir: std::mem::take(&mut self.data_dir),
                            banner: std::mem::take(&mut self.banner),
                            shell_home: tempfile::Builder::new().prefix("fulcrum-shell-home-").tempdir().unwrap(),
                        });
                    }
                    self.banner.push(line);
                }
                Err(_) => {
                    let mut child = self.child.take().expect("running");
                    let _ = child.kill();
                    let _ = child.wait();
                    let mut err = String::new();
                    child.stderr.take().unwrap().read_to_string(&mut err).ok();
                    return Err(format!("{}\n{err}", self.banner.join("\n")));
                }
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the binary; returns its stderr when it exits before listening.
pub fn try_start(launch: Launch<'_>) -> Result<Controller, String> {
    spawn(launch).listening(Duration::from_secs(30))
}

pub fn start(data_dir: &Path) -> Controller {
    try_start(Launch::plain(data_dir)).expect("fulcrum starts")
}

impl Controller {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn terminate(mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("fulcrum did not exit within 10 s of SIGTERM");
    }

    /// A client authenticated as admin with HTTP Basic.
    pub fn admin(&self) -> Api {
        Api::new(&self.url).basic("admin", PASSWORD)
    }

    /// A client without credentials.
    pub fn anonymous(&self) -> Api {
        Api::new(&self.url)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error message in {}", self.body)).to_string()
    }
}

#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    pub base: String,
    headers: Vec<(String, String)>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let agent = ureq::AgentBuilder::new()
            .tls_config(fulcrum_shell::client::tls_config(None).unwrap())
            .timeout(Duration::from_secs(60))
            .build();
        Api { agent, base: base.to_string(), headers: vec![] }
    }

    pub fn basic(self, user: &str, password: &str) -> Api {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.header("Authorization", &format!("Basic {token}"))
    }

    pub fn header(mut self, name: &str, value: &str) -> Api {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The same client, giving up on an answer after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Api {
        self.agent = ureq::AgentBuilder::new()
            .tls_config(fulcrum_shell::client::tls_config(None).unwrap())
            .timeout(timeout)
            .build();
        self
    }

    /// The same client (credentials, session) speaking to another controller.
    pub fn at(&self, base: &str) -> Api {
        Api { agent: self.agent.clone(), base: base.to_string(), headers: self.headers.clone() }
    }

    pub fn tenant(self, name: &str) -> Api {
        self.header("X-Avi-Tenant", name)
    }

    /// Any method (including odd spellings) to any path under the base URL.
    pub fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in &self.headers {
            req = req.set(k, v);
        }
        let has_type = self.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        let result = match body {
            Some(b) if has_type => req.send_bytes(b),
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let mut names = response.headers_names();
        names.dedup();
        let headers =
            names.iter().flat_map(|n| response.all(n).into_iter().map(move |v| (n.clone(), v.to_string()))).collect();
        let status = response.status();
        let mut body = String::new();
        response.into_reader().read_to_string(&mut body).unwrap();
        Resp { status, body, headers }
    }

    /// Like `send`, but a transport error is returned instead of panicking (for crash tests).
    pub fn try_post(&self, path: &str, body: &Value) -> Result<Resp, String> {
        self.try_send("POST", path, body)
    }

    pub fn try_send(&self, method: &str, path: &str, body: &Value) -> Result<Resp, String> {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (k, v) in &self.headers {
            req = req.set(k, v);
        }
        match req.send_json(body.clone()) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                let status = r.status();
                Ok(Resp { status, body: r.into_string().unwrap_or_default(), headers: vec![] })
            }
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.send("POST", path, Some(body.to_string().as_bytes()))
    }
    pub fn put(&self, path: &str, body: &Value) -> Resp {
        self.send("PUT", path, Some(body.to_string().as_bytes()))
    }
    pub fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path, None)
    }

    /// The object's JSON, asserting it exists.
    pub fn object(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("fulcrum-test-").tempdir().unwrap()
}

/// `fulcrum shell -c <command>` as admin, with its own HOME.
pub fn shell_command(c: &Controller, command: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fulcrum"));
    cmd.args(["shell", "--controller", &c.url, "--user", "admin", "--password", PASSWORD, "-c", command])
        .env("HOME", c.shell_home.path());
    cmd
}

/// Runs one `fulcrum shell -c` command as admin; returns stdout and stderr.
pub fn shell(c: &Controller, command: &str) -> (String, String) {
    let out = shell_command(c, command).output().expect("run the shell");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{command}: {stdout}{stderr}");
    (stdout, stderr)
}

impl Controller {
    /// Logs in as the SDK does (form POST /login); a client carrying the session cookie and its
    /// CSRF token, or the refusal.
    pub fn login(&self, user: &str, password: &str) -> Result<Api, Resp> {
        let form = form_urlencoded_pair("username", user) + "&" + &form_urlencoded_pair("password", password);
        let r = self.anonymous().header("Content-Type", "application/x-www-form-urlencoded").send(
            "POST",
            "/login",
            Some(form.as_bytes()),
        );
        if r.status != 200 {
            return Err(r);
        }
        let cookie = |name: &str| {
            r.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
                .find_map(|(_, c)| c.split(';').next()?.strip_prefix(&format!("{name}=")).map(String::from))
                .expect("login sets the cookie")
        };
        let (session, csrf) = (cookie("avi-sessionid"), cookie("csrftoken"));
        Ok(self
            .anonymous()
            .header("Cookie", &format!("avi-sessionid={session}; csrftoken={csrf}"))
            .header("X-CSRFToken", &csrf))
    }
}

fn form_urlencoded_pair(key: &str, value: &str) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!("{}={}", encode(key), encode(value))
}
