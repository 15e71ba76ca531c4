//! What an attacker or a careless script can do from outside, refused: oversized logins,
//! guessing across names, timing that reveals names, bad tenant headers, empty names, old
//! sessions after a password change, locking every administrator out (and the way back in).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{Launch, PASSWORD, start, temp_dir, try_start};
use serde_json::json;

fn form(api: &common::Api) -> common::Api {
    api.clone().header("Content-Type", "application/x-www-form-urlencoded")
}

#[test]
fn an_oversized_login_is_refused_before_it_is_read_whole() {
    let data = temp_dir();
    let c = start(data.path());
    let mut body = b"username=admin&password=".to_vec();
    body.resize(4 << 20, b'x');
    let r = form(&c.anonymous()).send("POST", "/login", Some(&body));
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.error().contains("larger than the limit"), "{}", r.error());
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "login answers carry the usual headers");
    assert!(c.login("admin", PASSWORD).is_ok(), "a normal login still works");
}

#[test]
fn a_client_guessing_across_names_is_stopped_and_timing_does_not_tell_names_apart() {
    let data = temp_dir();
    let c = start(data.path());
    let to = addr_of(&c);
    // A failed login from `source`: its status and how long it took.
    let attempt = |source: &str, user: &str| {
        let body = format!("username={user}&password=wrong-guess");
        let request = format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = connect_from(source, to);
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let started = Instant::now();
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, started.elapsed())
    };
    // A failed login costs the same whether the user exists or not. Known and unknown names
    // alternate, so both see the same load (other tests run alongside); several client
    // addresses keep each under the per-name limit.
    attempt("127.0.0.9", "warm-up-the-decoy");
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for source in ["127.0.0.10", "127.0.0.11", "127.0.0.12"] {
        for i in 0..4 {
            let (status, took) = attempt(source, "admin");
            assert_eq!(status, 401);
            known.push(took);
            let (status, took) = attempt(source, &format!("nobody-{i}"));
            assert_eq!(status, 401);
            unknown.push(took);
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    let ratio = unknown.as_secs_f64() / known.as_secs_f64();
    println!("failed login: known user {known:?}, unknown {unknown:?} (medians of 12)");
    assert!((0.5..2.0).contains(&ratio), "unknown {unknown:?} vs known {known:?}: ratio {ratio}");
    // 30 failures per client per minute whatever the names: the 31st, for a fresh name, is 429.
    let long = "n".repeat(8 << 10);
    for i in 0..30 {
        assert_eq!(attempt("127.0.0.13", &format!("{long}{i}")).0, 401);
    }
    assert_eq!(attempt("127.0.0.13", "yet-another-name").0, 429);
    assert_eq!(attempt("127.0.0.14", "yet-another-name").0, 401, "other clients are not throttled");
}

/// POST /api/pool as admin with raw bytes for X-Avi-Tenant (clients may send any bytes).
fn create_pool_in_tenant(c: &common::Controller, name: &str, tenant: &[u8]) -> String {
    let addr = c.url.trim_start_matches("http://").to_string();
    let body = json!({"name": name}).to_string();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
    let mut request = format!(
        "POST /api/pool HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\nX-Avi-Tenant: ",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(tenant);
    request.extend_from_slice(b"\r\n\r\n");
    request.extend_from_slice(body.as_bytes());
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(&request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_tenant_header_that_is_not_utf8_is_refused() {
    let data = temp_dir();
    let c = start(data.path());
    let answer = create_pool_in_tenant(&c, "p-bad-tenant", b"\xff\xfeadmin");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("not valid UTF-8"), "{answer}");
    assert_eq!(c.admin().object("/api/pool")["count"], 0, "nothing was created in any tenant");
    // A tenant name in UTF-8 beyond ASCII is a name like any other.
    let api = c.admin();
    assert_eq!(api.post("/api/tenant", &json!({"name": "équipe"})).status, 201);
    let answer = create_pool_in_tenant(&c, "p1", "équipe".as_bytes());
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.contains("tenant-"), "the pool is in the tenant named équipe: {answer}");
}

#[test]
fn names_must_not_be_empty() {
    let data = temp_dir();
    let c = start(data.path());
    let api = c.admin();
    for name in ["", "   "] {
        let r = api.post("/api/pool", &json!({"name": name}));
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.error().contains("name"), "{}", r.error());
    }
    let pool = api.post("/api/pool", &json!({"name": "p"})).json();
    let path = format!("/api/pool/{}", pool["uuid"].as_str().unwrap());
    assert_eq!(api.put(&path, &json!({"name": ""})).status, 400);
    let r = api.send("PATCH", &path, Some(json!({"replace": {"name": ""}}).to_string().as_bytes()));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(api.object(&path)["name"], "p");
}

#[test]
fn a_new_password_ends_the_users_other_sessions() {
    let data = temp_dir();
    let c = start(data.path());
    let api = c.admin();
    let user = api.post(
        "/api/user",
        &json!({"name": "ops", "username": "ops", "password": "Ops-pass-12",
                "access": [{"role_ref": "/api/role?name=System-ReadOnly", "all_tenants": true}]}),
    );
    assert_eq!(user.status, 201, "{}", user.body);
    let uuid = user.json()["uuid"].as_str().unwrap().to_string();
    let old = c.login("ops", "Ops-pass-12").unwrap();
    assert_eq!(old.get("/api/pool").status, 200);
    // An administrator resets the password: the user's open session ends.
    let mut body = api.object(&format!("/api/user/{uuid}"));
    body["password"] = json!("Reset-pass-34");
    assert_eq!(api.put(&format!("/api/user/{uuid}"), &body).status, 200);
    let r = old.get("/api/pool");
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.error().contains("password changed"), "{}", r.error());
    // The user changes their own password: their other sessions end, this one goes on.
    let (here, elsewhere) = (c.login("ops", "Reset-pass-34").unwrap(), c.login("ops", "Reset-pass-34").unwrap());
    let r = here.put("/api/useraccount", &json!({"old_password": "Reset-pass-34", "password": "Own-pass-56"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(here.get("/api/pool").status, 200);
    assert_eq!(elsewhere.get("/api/pool").status, 401);
    assert!(c.login("ops", "Own-pass-56").is_ok());
    // Sessions are stored: a restart (even kill -9) ends none, and revives none that ended.
    let url = c.url.clone();
    c.kill9();
    let c = start(data.path());
    let (here, elsewhere) = (here.at(&c.url), elsewhere.at(&c.url));
    assert_ne!(url, c.url, "a new port, so the old connection is not reused");
    assert_eq!(here.get("/api/pool").status, 200, "the session outlived the restart");
    assert_eq!(here.post("/api/pool", &json!({"name": "denied"})).status, 403, "read-only, as before");
    assert_eq!(elsewhere.get("/api/pool").status, 401);
    assert_eq!(here.send("POST", "/logout", None).status, 200);
    assert_eq!(here.get("/api/pool").status, 401);
}

#[test]
fn nobody_can_lock_every_administrator_out_and_the_host_can_let_one_back_in() {
    let data = temp_dir();
    let c = start(data.path());
    let api = c.admin();
    let admin_path = "/api/user/user-1";
    let role = api.object("/api/role?name=System-Admin")["results"][0]["uuid"].as_str().unwrap().to_string();
    let role_path = format!("/api/role/{role}");
    // The three requests that used to lock everybody out.
    let attempts = [
        api.put(admin_path, &json!({"name": "admin", "username": "admin"})),
        api.put(&role_path, &json!({"name": "System-Admin"})),
        api.send("PATCH", admin_path, Some(json!({"replace": {"access": []}}).to_string().as_bytes())),
        api.put(admin_path, &{
            let mut body = api.object(admin_path);
            body["is_active"] = json!(false);
            body
        }),
    ];
    for r in attempts {
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(r.error().contains("administrative rights") || r.error().contains("built in"), "{}", r.error());
    }
    assert_eq!(api.get("/api/pool").status, 200, "admin still has every right");
    assert_eq!(api.object(&role_path)["privileges"][0]["resource"], "*");
    assert_eq!(api.delete(&role_path).status, 403, "a built-in role cannot be deleted");
    // With a second full administrator, admin's rights may go.
    let other = api.post(
        "/api/user",
        &json!({"name": "root2", "username": "root2", "password": "Root2-pass-1",
                "access": [{"role_ref": "/api/role?name=System-Admin", "all_tenants": true}]}),
    );
    assert_eq!(other.status, 201, "{}", other.body);
    let r = api.send("PATCH", admin_path, Some(json!({"replace": {"access": []}}).to_string().as_bytes()));
    assert_eq!(r.status, 200, "{}", r.body);

    // The host's way back in: refused while the controller runs, then it restores admin.
    let reset = |password: &str| {
        Command::new(env!("CARGO_BIN_EXE_fulcrum"))
            .args(["admin", "reset-password", "--user", "admin", "--password", password, "--data-dir"])
            .arg(data.path())
            .output()
            .unwrap()
    };
    let busy = reset("Back-in-pass-1");
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"), "{}", String::from_utf8_lossy(&busy.stderr));
    c.terminate();
    let done = reset("Back-in-pass-1");
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let c = try_start(Launch::plain(data.path())).unwrap();
    let back = common::Api::new(&c.url).basic("admin", "Back-in-pass-1");
    assert_eq!(back.post("/api/pool", &json!({"name": "after-recovery"})).status, 201);
    assert!(common::Api::new(&c.url).basic("admin", PASSWORD).get("/api/pool").status == 401);
}

/// A controller with short timeouts and a small per-client bound, for the connection tests.
fn strict_controller(data: &std::path::Path) -> common::Controller {
    let args =
        ["--header-timeout", "1", "--idle-timeout", "2", "--body-timeout", "1", "--max-connections-per-client", "40"];
    try_start(Launch { args: &args, ..Launch::plain(data) }).unwrap()
}

fn addr_of(c: &common::Controller) -> std::net::SocketAddr {
    c.url.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection from a chosen loopback address (so tests can be different clients).
fn connect_from(source: &str, to: std::net::SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let ip: std::net::Ipv4Addr = source.parse().unwrap();
    // SAFETY: a fresh socket, bound and connected with valid sockaddr_in values, then owned
    // by the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
            sin_zero: [0; 8],
        };
        let local = sockaddr(ip, 0);
        let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, &local as *const _ as *const libc::sockaddr, size), 0, "bind {source}");
        let std::net::SocketAddr::V4(to) = to else { panic!("IPv4 only") };
        let remote = sockaddr(*to.ip(), to.port());
        assert_eq!(libc::connect(fd, &remote as *const _ as *const libc::sockaddr, size), 0, "connect");
        TcpStream::from_raw_fd(fd)
    }
}

/// Seconds until the server closes `stream` (reading and dropping whatever it sends).
fn seconds_until_closed(stream: &mut TcpStream, limit: Duration) -> f64 {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed().as_secs_f64(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed().as_secs_f64(),
            Err(e) => panic!("still open after {limit:?}: {e}"),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn slow_and_idle_clients_are_closed_within_the_timeouts_while_others_are_served() {
    let data = temp_dir();
    let c = strict_controller(data.path());
    let to = addr_of(&c);
    // Headers a byte at a time: closed by the header timeout (1 s).
    let mut slow_headers = connect_from("127.0.0.2", to);
    slow_headers.write_all(b"GET /api/pool HTTP/1.1\r\nHost: x\r\n").unwrap();
    let dribble = {
        let mut s = slow_headers.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if s.write_all(b"X").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Meanwhile a normal client is answered at once.
    let started = Instant::now();
    assert_eq!(c.admin().get("/api/pool").status, 200);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let took = seconds_until_closed(&mut slow_headers, Duration::from_secs(8));
    assert!(took < 4.0, "slow headers kept {took} s");
    dribble.join().unwrap();
    // Connected and silent: closed by the header or idle timeout.
    let mut silent = connect_from("127.0.0.2", to);
    let took = seconds_until_closed(&mut silent, Duration::from_secs(8));
    assert!(took < 4.0, "a silent connection kept {took} s");
    // Idle after a request (keep-alive): closed by the idle timeout (2 s).
    let mut kept = connect_from("127.0.0.2", to);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
    kept.write_all(format!("GET /api/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\r\n").as_bytes())
        .unwrap();
    let took = seconds_until_closed(&mut kept, Duration::from_secs(8));
    assert!(took < 5.0, "an idle keep-alive connection kept {took} s");
    // A body a byte at a time: 408 once it is older than the body timeout and too slow.
    let mut slow_body = connect_from("127.0.0.2", to);
    slow_body
        .write_all(
            format!(
                "POST /api/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n\
                 Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
    let dribble = {
        let mut s = slow_body.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..40 {
                if s.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    slow_body.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut answer = vec![0u8; 4096];
    let n = slow_body.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("stopped arriving"), "{answer}");
    drop(slow_body);
    dribble.join().unwrap();
    assert_eq!(c.admin().object("/api/pool")["count"], 0);
}

#[test]
fn connections_beyond_the_bound_are_refused_clearly_and_other_clients_still_served() {
    let data = temp_dir();
    let c = strict_controller(data.path());
    let to = addr_of(&c);
    let hogs: Vec<TcpStream> = (0..40).map(|_| connect_from("127.0.0.3", to)).collect();
    // Let the controller take them all.
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = connect_from("127.0.0.3", to);
    refused.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = refused.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"error\"") && answer.contains("one client"), "{answer}");
    // Another client is served at once.
    let started = Instant::now();
    assert_eq!(c.admin().get("/api/pool").status, 200);
    let took = started.elapsed();
    println!("a normal request while one client holds 40 connections: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop(hogs);
}

#[test]
fn unauthenticated_bodies_are_not_kept_in_memory() {
    let data = temp_dir();
    let c = strict_controller(data.path());
    let to = addr_of(&c);
    let before = rss_kib(c.pid());
    let chunk = vec![b' '; 1 << 20];
    let mut senders: Vec<TcpStream> = Vec::new();
    for _ in 0..32 {
        let mut s = connect_from("127.0.0.4", to);
        s.write_all(
            b"POST /api/pool HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8388000\r\n\r\n",
        )
        .unwrap();
        for _ in 0..4 {
            s.write_all(&chunk).unwrap();
        }
        senders.push(s);
    }
    let grown_mib = rss_kib(c.pid()).saturating_sub(before) / 1024;
    println!("32 unauthenticated 4 MiB bodies grew the controller by {grown_mib} MiB");
    assert!(grown_mib < 64, "{grown_mib} MiB kept for unauthenticated bodies");
    for mut s in senders {
        let mut answer = String::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 401") || answer.is_empty(), "{answer}");
    }
}

fn https_controller(data: &std::path::Path) -> common::Controller {
    try_start(Launch { plain_http: false, ..Launch::plain(data) }).unwrap()
}

/// Runs `fulcrum se-agent` against `url` until it exits or `limit` passes; (exited, log).
fn run_agent(url: &str, token: &str, dir: &std::path::Path, extra: &[&str], limit: Duration) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["se-agent", "--controller", url, "--join-token", token, "--name", "se-t", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("FULCRUM_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut exited = false;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    (exited, log)
}

#[test]
fn an_agent_given_only_the_join_token_trusts_its_controller_and_no_impostor() {
    let (real_data, impostor_data) = (temp_dir(), temp_dir());
    let real = https_controller(real_data.path());
    let impostor = https_controller(impostor_data.path());
    let (_, token) = common::agents::token(&real.admin(), "Default-Group");
    assert_eq!(token.split('.').count(), 3, "an HTTPS controller's token names its certificate: {token}");
    let work = temp_dir();

    // Pointed at the impostor, the agent refuses in the TLS handshake: no secret is sent.
    let (exited, log) = run_agent(&impostor.url, &token, &work.path().join("fooled"), &[], Duration::from_secs(8));
    assert!(log.contains("not the controller's one named by the join token"), "exited {exited}: {log}");
    let metrics = impostor.anonymous().get("/metrics").body;
    assert!(!metrics.contains("se-agent/join"), "the impostor saw a join: {metrics}");
    assert!(!work.path().join("fooled/identity.json").exists());

    // Pointed at the real one, it joins and remembers the pin for later runs.
    let mut agent = common::agents::Agent::start(&real, Some(&token), &work.path().join("se1"), "se1", &[]);
    common::agents::wait_for("the agent joined", Duration::from_secs(30), || {
        common::agents::se_by_name(&real.admin(), "se1").map(drop)
    });
    let identity = std::fs::read_to_string(work.path().join("se1/identity.json")).unwrap();
    assert!(identity.contains(token.rsplit('.').next().unwrap()), "{identity}");
    agent.kill9();

    // A token without the pin, over HTTPS, without --ca-cert: refused unless --insecure.
    let bare = token.rsplit_once('.').unwrap().0.to_string();
    let (exited, log) = run_agent(&real.url, &bare, &work.path().join("bare"), &[], Duration::from_secs(8));
    assert!(exited && log.contains("cannot verify the controller"), "{log}");
    let (_, log) = run_agent(&real.url, &bare, &work.path().join("lab"), &["--insecure"], Duration::from_secs(4));
    assert!(log.contains("--insecure"), "{log}");
    common::agents::wait_for("the insecure agent joined", Duration::from_secs(10), || {
        work.path().join("lab/identity.json").exists().then_some(())
    });
}

/// Sends raw bytes and returns the whole answer.
fn raw_exchange(c: &common::Controller, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr_of(c)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn errors_from_below_the_application_carry_json_bodies_and_405_says_what_is_allowed() {
    let data = temp_dir();
    let c = start(data.path());
    let header = |size: usize| {
        [b"GET /api/pool HTTP/1.1\r\nHost: x\r\nX-Big: ".as_slice(), &vec![b'a'; size], b"\r\n\r\n"].concat()
    };
    let uri = |size: usize| [b"GET /".as_slice(), &vec![b'a'; size], b" HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
    // Past the application's limits, and past hyper's buffer (answered below the application).
    for (request, status, says) in [
        (header(100_000), "431", "headers are too large"),
        (header(2_000_000), "431", "headers are too large"),
        (uri(20_000), "414", "URI is too long"),
        (uri(100_000), "414", "URI is too long"),
        (b"GARBAGE\r\n\r\n".to_vec(), "400", "not valid HTTP"),
    ] {
        let answer = raw_exchange(&c, &request);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        assert!(answer.contains("content-type: application/json"), "{answer}");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert!(json["error"].as_str().unwrap().contains(says), "{answer}");
    }
    let api = c.admin();
    let r = api.get("/login");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert!(!r.error().is_empty());
    let pool = api.post("/api/pool", &json!({"name": "p"})).json();
    let r = api.post(&format!("/api/pool/{}", pool["uuid"].as_str().unwrap()), &json!({}));
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET, PUT, PATCH, DELETE"));
    let r = api.send("DELETE", "/api/cluster/status", None);
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET"));
    // Under HTTPS, logins too say to keep using HTTPS.
    let tls_data = temp_dir();
    let tls = https_controller(tls_data.path());
    let r =
        form(&tls.anonymous()).send("POST", "/login", Some(format!("username=admin&password={PASSWORD}").as_bytes()));
    assert_eq!(r.status, 200);
    assert!(r.header("strict-transport-security").is_some_and(|v| v.contains("max-age")), "{:?}", r.headers);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[test]
fn private_keys_are_stored_but_never_shown() {
    let data = temp_dir();
    let c = start(data.path());
    let api = c.admin();
    let key =
        "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    let r = api.post(
        "/api/sslkeyandcertificate",
        &json!({"name": "mine", "key": key, "key_passphrase": "pass", "certificate": {"certificate": "PEM"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(!r.body.contains("PRIVATE KEY") && !r.body.contains("key_passphrase"), "{}", r.body);
    let path = format!("/api/sslkeyandcertificate/{}", r.json()["uuid"].as_str().unwrap());
    let shown = api.object(&path);
    assert!(shown.get("key").is_none(), "{shown}");
    let listed = api.get("/api/sslkeyandcertificate?name=mine").body;
    assert!(!listed.contains("PRIVATE KEY"), "{listed}");
    // A client PUTs back what it read (without the key): the key is kept.
    let mut body = shown.clone();
    body["type"] = json!("SSL_CERTIFICATE_TYPE_VIRTUALSERVICE");
    assert_eq!(api.put(&path, &body).status, 200);
    let export = api.object("/api/configuration/export");
    let stored = export["objects"]["sslkeyandcertificate"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "mine")
        .unwrap()
        .clone();
    assert_eq!(stored["key"], key, "the key is still stored");
}
