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
    let anon = form(&c.anonymous());
    let attempt = |user: &str| {
        let started = Instant::now();
        let r = anon.send("POST", "/login", Some(format!("username={user}&password=wrong-guess").as_bytes()));
        (r.status, started.elapsed())
    };
    // A failed login costs the same whether the user exists or not (medians of 4, under the
    // per-name limit of 5).
    let median = |user: &str| {
        let mut times: Vec<Duration> = (0..4)
            .map(|_| {
                let (status, took) = attempt(user);
                assert_eq!(status, 401);
                took
            })
            .collect();
        times.sort();
        times[2]
    };
    let known = median("admin");
    let unknown = median("nobody-by-this-name");
    let ratio = unknown.as_secs_f64() / known.as_secs_f64();
    assert!((0.5..2.0).contains(&ratio), "unknown {unknown:?} vs known {known:?}: ratio {ratio}");
    // 30 failures per client per minute whatever the names: the 31st, for a fresh name, is 429.
    let long = "n".repeat(8 << 10);
    for i in 0..(30 - 8) {
        assert_eq!(attempt(&format!("{long}{i}")).0, 401);
    }
    let (status, _) = attempt("yet-another-name");
    assert_eq!(status, 429);
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
