//! The interactive shell at a real (pseudo-)terminal: the password prompt, Tab completion,
//! `?` and `help`, Ctrl-C at the prompt, tables that fit the width, history kept on exit.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pty::Pty;
use common::{PASSWORD, start, temp_dir};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const PROMPT: &str = "[admin:127.0.0.1]: > ";
const COLUMNS: u16 = 64;

#[test]
fn the_interactive_shell_behaves_like_the_products_cli() {
    let data = temp_dir();
    let c = start(data.path());
    let api = c.admin();
    for name in ["web-pool-1", "db-pool"] {
        let servers: Vec<_> =
            (1..=3).map(|i| json!({"ip": {"addr": format!("10.0.0.{i}"), "type": "V4"}, "port": 8080})).collect();
        assert_eq!(api.post("/api/pool", &json!({"name": name, "servers": servers})).status, 201);
    }

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fulcrum"));
    cmd.args(["shell", "--controller", &c.url, "--user", "admin"])
        .env("HOME", c.shell_home.path())
        .env("TERM", "xterm")
        .env_remove("FULCRUM_PASSWORD");
    let mut shell = Pty::spawn(cmd, COLUMNS);

    // The password is asked for and not echoed.
    shell.expect("Password for admin: ", WAIT);
    shell.send(&format!("{PASSWORD}\r"));
    let shown = shell.expect(PROMPT, WAIT);
    assert!(!shown.contains(PASSWORD), "the password was echoed: {shown}");

    // `?` lists the commands; `upgrade ?` the command's keywords.
    shell.send("?\r");
    let help = shell.expect(PROMPT, WAIT);
    for verb in ["show", "upload", "upgrade", "patch", "delete", "clear", "exit"] {
        assert!(help.contains(verb), "`?` lists {verb}: {help}");
    }
    shell.send("upgrade ?\r");
    let keywords = shell.expect(PROMPT, WAIT);
    for keyword in ["image_ref", "se_group_refs", "action_on_error", "skip_warnings"] {
        assert!(keywords.contains(keyword), "`upgrade ?` names {keyword}: {keywords}");
    }

    // Tab completes a command word with a space after it, then an object name asked of the
    // controller: had either not completed (or not added its space), the command would fail.
    shell.send("sh\t");
    shell.expect("show ", WAIT);
    shell.send("pool web-p\t");
    shell.expect("web-pool-1 ", WAIT);
    shell.send("\r");
    let detail = shell.expect(PROMPT, WAIT);
    assert!(detail.contains("10.0.0.3"), "the pool is shown: {detail}");
    assert!(!detail.to_lowercase().contains("error"), "{detail}");

    // A keyword completes too; Ctrl-C then drops the half-typed line and keeps the shell.
    shell.send("upgrade segroup skip_w\t");
    shell.expect("upgrade segroup skip_warnings ", WAIT);
    shell.send("\u{3}");
    shell.expect(PROMPT, WAIT);
    shell.send("show pool\r");
    let table = shell.expect(PROMPT, WAIT);
    assert!(table.contains("web-pool-1") && table.contains("db-pool"), "{table}");
    // Tables fit the terminal (a pool's detail is about 90 columns wide unwrapped).
    for line in table.lines().chain(detail.lines()) {
        assert!(line.chars().count() <= COLUMNS as usize, "wider than {COLUMNS} columns: {line:?}\n{table}");
    }

    // `clear` clears the screen; `exit` ends the shell and keeps the history.
    shell.send("clear\r");
    shell.expect(PROMPT, WAIT);
    shell.send("exit\r");
    assert!(shell.wait_success(WAIT), "the shell exits cleanly");
    let history = std::fs::read_to_string(c.shell_home.path().join(".fulcrum_shell_history")).unwrap();
    assert!(history.contains("show pool web-pool-1"), "{history}");
    assert!(!history.contains(PASSWORD), "{history}");
}
