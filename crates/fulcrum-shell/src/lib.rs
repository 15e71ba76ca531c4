//! `fulcrum shell`: an interactive shell against a controller, with the look of the
//! controller's own CLI (`[admin:host]: > show pool`).

pub mod client;
pub mod table;
pub mod terminal;
pub mod upgrade;
pub mod upload;
pub mod words;

use std::path::PathBuf;

use fulcrum_schema::Registry;
use std::cell::RefCell;
use std::rc::Rc;

use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};
use serde_json::Value;

pub use client::{Client, ClientError, Reply};

pub struct Options {
    pub controller: String,
    pub user: String,
    pub password: String,
    pub tenant: String,
    /// Verify the controller's certificate against this CA file instead of accepting it.
    pub ca_file: Option<PathBuf>,
}

/// One parsed shell command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show {
        kind: String,
        name: Option<String>,
    },
    /// `show pool-async status <patch_id>`
    AsyncStatus(String),
    /// `show pool <name> server`: each server's health and traffic, as the SEs see them.
    PoolServers(String),
    /// `upload image filename <path>`
    UploadImage(PathBuf),
    /// `delete <type> <name>`
    Delete {
        kind: String,
        name: String,
    },
    /// `upgrade|patch|rollback|rollbackpatch|resume ...`
    Upgrade(upgrade::Operation),
    /// `show upgrade status [detail]`
    UpgradeStatus {
        detail: bool,
    },
    /// `help`, `?`, `help <command>`, `<command> ?`
    Help(Option<String>),
    /// The cluster's state and its nodes, from `/api/cluster/runtime`.
    ShowCluster,
    Clear,
    Exit,
    Nothing,
}

pub fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => Ok(Command::Nothing),
        ["help"] | ["?"] => Ok(Command::Help(None)),
        ["help", topic] => Ok(Command::Help(Some(topic.to_string()))),
        [verb, .., "?"] => Ok(Command::Help(Some(verb.to_string()))),
        ["clear"] => Ok(Command::Clear),
        ["exit"] | ["quit"] => Ok(Command::Exit),
        ["show", "pool-async", "status", id] => Ok(Command::AsyncStatus(id.to_string())),
        ["show", "pool-async", ..] => Err("usage: show pool-async status <patch_id>".into()),
        ["show", "upgrade", "status"] => Ok(Command::UpgradeStatus { detail: false }),
        ["show", "upgrade", "status", "detail"] => Ok(Command::UpgradeStatus { detail: true }),
        ["show", "upgrade", ..] => Err("usage: show upgrade status [detail]".into()),
        ["show", "cluster"] => Ok(Command::ShowCluster),
        ["show", "pool", name @ .., "server"] if !name.is_empty() => Ok(Command::PoolServers(name.join(" "))),
        [verb @ ("upgrade" | "patch" | "rollback" | "rollbackpatch" | "resume"), rest @ ..] => {
            let mut all = vec![*verb];
            all.extend_from_slice(rest);
            upgrade::parse(&all).map(Command::Upgrade)
        }
        ["show", kind] => Ok(Command::Show { kind: kind.to_string(), name: None }),
        ["show", kind, name @ ..] => Ok(Command::Show { kind: kind.to_string(), name: Some(name.join(" ")) }),
        ["show"] => Err("show what? (show <type> [<name>])".into()),
        ["upload", "image", "filename", path @ ..] if !path.is_empty() => {
            Ok(Command::UploadImage(PathBuf::from(path.join(" "))))
        }
        ["upload", ..] => Err("usage: upload image filename <path>".into()),
        ["delete", kind, name @ ..] if !name.is_empty() => {
            Ok(Command::Delete { kind: kind.to_string(), name: name.join(" ") })
        }
        ["delete", ..] => Err("usage: delete <type> <name>".into()),
        [verb, ..] => Err(format!("unknown command '{verb}'; type help")),
    }
}

pub(crate) fn error_text(reply: &Reply) -> String {
    let message = reply.body.get("error").and_then(Value::as_str).map_or_else(|| reply.body.to_string(), String::from);
    format!("Error ({}): {message}", reply.status)
}

/// Runs one command and returns what to print.
pub fn execute(client: &mut Client, command: &Command) -> Result<String, String> {
    let reg = Registry::get();
    match command {
        Command::Nothing | Command::Exit => Ok(String::new()),
        Command::Clear => Ok("\x1b[H\x1b[2J".to_string()),
        Command::Help(topic) => words::help(topic.as_deref()),
        Command::Upgrade(op) => upgrade::execute(client, op),
        Command::UpgradeStatus { detail } => upgrade::status(client, *detail),
        Command::ShowCluster => {
            let reply = client.get("cluster/runtime").map_err(|e| e.to_string())?;
            if reply.status != 200 {
                return Err(error_text(&reply));
            }
            Ok(cluster_table(&reply.body))
        }
        Command::AsyncStatus(id) => {
            let reply = client.get(&format!("pool-async/status/{id}")).map_err(|e| e.to_string())?;
            if reply.status == 200 { Ok(table::object(&reply.body)) } else { Err(error_text(&reply)) }
        }
        Command::PoolServers(name) => {
            let uuid = uuid_by_name(client, "pool", name)?;
            let reply = client.get(&format!("pool/{uuid}/runtime/server")).map_err(|e| e.to_string())?;
            if reply.status != 200 {
                return Err(error_text(&reply));
            }
            Ok(pool_server_table(&reply.body))
        }
        Command::UploadImage(path) => {
            let image = upload::upload_image(client, path, &mut std::io::stderr())?;
            let cell = |k: &str| image.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
            Ok(table::render(&["Name", "UUID", "Status"], &[vec![cell("name"), cell("uuid"), image_status(&image)]]))
        }
        Command::Delete { kind, name } => {
            reg.type_def(kind).filter(|t| !t.singleton).ok_or_else(|| format!("unknown type '{kind}'"))?;
            let uuid = uuid_by_name(client, kind, name)?;
            let reply = client.request("DELETE", &format!("{kind}/{uuid}"), None).map_err(|e| e.to_string())?;
            if reply.status == 204 { Ok(format!("Deleted {kind} {name}\n")) } else { Err(error_text(&reply)) }
        }
        Command::Show { kind, name } => {
            let type_def = reg.type_def(kind).ok_or_else(|| format!("unknown type '{kind}'"))?;
            if type_def.singleton {
                let reply = client.get(&format!("{kind}?include_name")).map_err(|e| e.to_string())?;
                return if reply.status == 200 { Ok(table::object(&reply.body)) } else { Err(error_text(&reply)) };
            }
            match name {
                Some(name) => {
                    let query = form_urlencoded::Serializer::new(String::new()).append_pair("name", name).finish();
                    let reply = client.get(&format!("{kind}?{query}&include_name")).map_err(|e| e.to_string())?;
                    if reply.status != 200 {
                        return Err(error_text(&reply));
                    }
                    let object = reply.body["results"].get(0).ok_or_else(|| format!("{kind} '{name}' not found"))?;
                    let mut out = table::object(object);
                    if kind == "serviceenginegroup" {
                        // A group is shown with its SEs: their versions and states side by side.
                        let uuid = text(object, "uuid");
                        let listing = Listing::of("serviceengine");
                        let rows =
                            list_rows(client, &format!("serviceengine?refers_to=serviceenginegroup:{uuid}"), listing)?;
                        out.push_str(&format!("Service engines ({}):\n", rows.len()));
                        out.push_str(&table::render(listing.header, &rows));
                    }
                    Ok(out)
                }
                None => {
                    let listing = Listing::of(kind);
                    let rows = list_rows(client, kind, listing)?;
                    Ok(table::render(listing.header, &rows))
                }
            }
        }
    }
}

/// The uuid of the `kind` object named `name`.
fn uuid_by_name(client: &mut Client, kind: &str, name: &str) -> Result<String, String> {
    let query = form_urlencoded::Serializer::new(String::new()).append_pair("name", name).finish();
    let reply = client.get(&format!("{kind}?{query}&fields=uuid")).map_err(|e| e.to_string())?;
    reply.body["results"][0]["uuid"].as_str().map(String::from).ok_or_else(|| format!("{kind} '{name}' not found"))
}

/// `show pool <name> server`: a row per server.
fn pool_server_table(servers: &Value) -> String {
    let rows: Vec<Vec<String>> = servers
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let number = |p: &str| s.pointer(p).map_or_else(String::new, |v| v.to_string());
            let reasons: Vec<&str> = s
                .pointer("/oper_status/reason")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let p99 =
                s.pointer("/stats/latency_p99_ms").and_then(Value::as_f64).map_or("-".into(), |v| format!("{v} ms"));
            vec![
                format!(
                    "{}:{}",
                    s.pointer("/ip_addr/addr").and_then(Value::as_str).unwrap_or_default(),
                    number("/port")
                ),
                number("/enabled"),
                s.pointer("/oper_status/state").and_then(Value::as_str).unwrap_or_default().to_string(),
                reasons.join("; "),
                number("/stats/requests"),
                number("/stats/errors"),
                number("/stats/open_connections"),
                p99,
            ]
        })
        .collect();
    table::render(&["Server", "Enabled", "State", "Reason", "Requests", "Errors", "Open conns", "p99 latency"], &rows)
}

/// `show cluster`: the cluster's state, then a row per controller.
fn cluster_table(runtime: &Value) -> String {
    let state = runtime.pointer("/cluster_state/state").and_then(Value::as_str).unwrap_or("unknown");
    let rows: Vec<Vec<String>> = runtime["node_states"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    let role = text(n, "role").trim_start_matches("CLUSTER_").to_lowercase();
                    let up = text(n, "state").trim_start_matches("CLUSTER_").to_lowercase();
                    vec![text(n, "name"), role, up, text(n, "mgmt_ip"), text(n, "up_since")]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!("Cluster state: {state}\n");
    out.push_str(&table::render(&["Name", "Role", "State", "Mgmt IP", "Up Since"], &rows));
    out
}

/// What `show <type>` prints for a type: most show name and uuid; images their status; SEs
/// their group, version and states.
#[derive(Clone, Copy)]
struct Listing {
    header: &'static [&'static str],
    fields: &'static str,
    row: fn(&Value) -> Vec<String>,
}

impl Listing {
    fn of(kind: &str) -> Listing {
        match kind {
            "image" => Listing {
                header: &["Name", "UUID", "Status", "Controller Nodes"],
                fields: "name,uuid,img_state,progress,node_states",
                row: |i| vec![text(i, "name"), text(i, "uuid"), image_status(i), node_copies(i)],
            },
            "serviceengine" => Listing {
                header: &["Name", "UUID", "SE Group", "Version", "Oper State", "License", "Install", "Last Heartbeat"],
                fields: "name,uuid,se_group_ref,version,build,patch_version,oper_status,license_state,install_status,last_heartbeat",
                row: se_row,
            },
            _ => Listing {
                header: &["Name", "UUID"],
                fields: "name,uuid",
                row: |i| vec![text(i, "name"), text(i, "uuid")],
            },
        }
    }
}

fn text(item: &Value, field: &str) -> String {
    item.get(field).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// The name a rendered reference carries after `#`.
fn ref_name(item: &Value, field: &str) -> String {
    item.get(field).and_then(Value::as_str).and_then(|r| r.split_once('#')).map_or_else(String::new, |(_, n)| n.into())
}

fn se_row(se: &Value) -> Vec<String> {
    let mut version = text(se, "version");
    if let Some(build) = se.get("build").and_then(Value::as_u64) {
        version = format!("{version}-{build}");
    }
    if let Some(patch) = se.get("patch_version").and_then(Value::as_str) {
        version = format!("{version}-{patch}");
    }
    let install = match (se.pointer("/install_status/operation"), se.pointer("/install_status/state")) {
        (Some(op), Some(state)) => format!(
            "{} {}",
            op.as_str().unwrap_or_default().trim_start_matches("SE_").to_lowercase(),
            state.as_str().unwrap_or_default()
        ),
        _ => String::new(),
    };
    vec![
        text(se, "name"),
        text(se, "uuid"),
        ref_name(se, "se_group_ref"),
        version,
        se.pointer("/oper_status/state").and_then(Value::as_str).unwrap_or_default().to_string(),
        text(se, "license_state").trim_start_matches("LICENSE_STATE_").to_string(),
        install,
        text(se, "last_heartbeat"),
    ]
}

/// Every page of a listing, as table rows.
fn list_rows(client: &mut Client, path_and_filter: &str, listing: Listing) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let separator = if path_and_filter.contains('?') { '&' } else { '?' };
    for page in 1.. {
        let reply = client
            .get(&format!(
                "{path_and_filter}{separator}page_size=200&page={page}&include_name&fields={}",
                listing.fields
            ))
            .map_err(|e| e.to_string())?;
        if reply.status != 200 {
            return Err(error_text(&reply));
        }
        rows.extend(reply.body["results"].as_array().into_iter().flatten().map(listing.row));
        if reply.body.get("next").is_none() {
            break;
        }
    }
    Ok(rows)
}

/// The Controller Nodes column of `show image`: each node's copy of the package.
fn node_copies(image: &Value) -> String {
    let nodes = image.get("node_states").and_then(Value::as_array).into_iter().flatten();
    nodes
        .map(|n| {
            let node = text(n, "node");
            let progress = n.get("progress").and_then(Value::as_u64).unwrap_or(0);
            let mut state = match n.get("state").and_then(Value::as_str).unwrap_or_default() {
                "IMAGE_FSM_COMPLETED" => "ok".to_string(),
                "IMAGE_FSM_IN_PROGRESS" => format!("{progress}%"),
                "IMAGE_FSM_FAILED" => format!("failed: {}", text(n, "reason")),
                _ => "waiting".to_string(),
            };
            if n.get("up").and_then(Value::as_bool) == Some(false) {
                state.push_str(" (down)");
            }
            format!("{node} {state}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Status column of `show image`: SYSERR_SUCCESS for a ready image, as the controller's
/// CLI prints it; an upload in flight shows its state and progress.
fn image_status(image: &Value) -> String {
    match image.pointer("/img_state/state").and_then(Value::as_str) {
        Some("IMAGE_FSM_COMPLETED") => "SYSERR_SUCCESS".into(),
        Some("IMAGE_FSM_FAILED") => "SYSERR_FAILURE".into(),
        Some(state) => format!("{state} ({}%)", image.get("progress").and_then(Value::as_u64).unwrap_or(0)),
        None => String::new(),
    }
}

/// Completes command words, keywords and object names (asked of the controller), adding a
/// space after a completed word.
struct ShellHelper {
    client: Rc<RefCell<Client>>,
    files: FilenameCompleter,
}

impl ShellHelper {
    /// Names of objects of a type that start with `prefix` (the first 200).
    fn names(&self, kind: &str, prefix: &str) -> Vec<String> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("fields", "name")
            .append_pair("page_size", "200")
            .append_pair("name.contains", prefix)
            .finish();
        let Ok(mut client) = self.client.try_borrow_mut() else { return vec![] };
        let Ok(reply) = client.get(&format!("{kind}?{query}")) else { return vec![] };
        reply.body["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["name"].as_str())
            .filter(|n| n.starts_with(prefix) && !n.contains(char::is_whitespace))
            .map(String::from)
            .collect()
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;
    fn complete(&self, line: &str, pos: usize, ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let word = &before[start..];
        let finished: Vec<&str> = before[..start].split_whitespace().collect();
        let pair = |w: &str| Pair { display: w.to_string(), replacement: format!("{w} ") };
        let words = |list: &[&str]| list.iter().filter(|w| w.starts_with(word)).map(|w| pair(w)).collect::<Vec<_>>();
        let candidates = match words::next(&finished) {
            words::Next::Words(list) => words(&list),
            words::Next::Names(kind, also) => {
                let mut found: Vec<Pair> = self.names(kind, word).iter().map(|n| pair(n)).collect();
                found.extend(words(&also));
                found
            }
            words::Next::File => return self.files.complete(line, pos, ctx),
            words::Next::Nothing => vec![],
        };
        Ok((start, candidates))
    }
}
impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    match host_port.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host_port,
    }
}

/// Runs the shell: one command with `-c`, else interactively.
pub fn run(options: Options, one_shot: Option<&str>) -> Result<(), String> {
    let client = Client::connect(
        &options.controller,
        &options.user,
        &options.password,
        &options.tenant,
        options.ca_file.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    if let Some(line) = one_shot {
        let mut client = client;
        let command = parse(line)?;
        if matches!(command, Command::UploadImage(_)) {
            // Ctrl-C stops the upload cleanly (its session is kept for the next run).
            terminal::catch_ctrl_c();
        }
        let out = execute(&mut client, &command)?;
        print!("{out}");
        return Ok(());
    }
    terminal::catch_ctrl_c();
    let client = Rc::new(RefCell::new(client));
    let mut editor: Editor<ShellHelper, DefaultHistory> = Editor::new().map_err(|e| e.to_string())?;
    editor.set_helper(Some(ShellHelper { client: client.clone(), files: FilenameCompleter::new() }));
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".fulcrum_shell_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let prompt = format!("[{}:{}]: > ", options.user, host_of(&options.controller));
    loop {
        match editor.readline(&prompt) {
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                terminal::clear();
                match parse(&line) {
                    Ok(Command::Exit) => break,
                    Ok(command) => match execute(&mut client.borrow_mut(), &command) {
                        Ok(out) => print!("{out}"),
                        Err(e) => println!("{e}"),
                    },
                    Err(e) => println!("{e}"),
                }
                // The history survives whatever the next command does.
                if let Some(h) = &history {
                    let _ = editor.save_history(h);
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("show pool").unwrap(), Command::Show { kind: "pool".into(), name: None });
        assert_eq!(
            parse("  show pool  my pool ").unwrap(),
            Command::Show { kind: "pool".into(), name: Some("my pool".into()) }
        );
        assert_eq!(parse("").unwrap(), Command::Nothing);
        assert_eq!(parse("?").unwrap(), Command::Help(None));
        assert_eq!(parse("help upgrade").unwrap(), Command::Help(Some("upgrade".into())));
        assert_eq!(parse("upgrade segroup ?").unwrap(), Command::Help(Some("upgrade".into())));
        assert_eq!(parse("clear").unwrap(), Command::Clear);
        assert_eq!(parse("quit").unwrap(), Command::Exit);
        assert!(parse("frobnicate").unwrap_err().contains("unknown command"));
        assert!(parse("show").is_err());
        assert_eq!(parse("show pool web pool server").unwrap(), Command::PoolServers("web pool".into()));
        assert_eq!(
            parse("show pool server").unwrap(),
            Command::Show { kind: "pool".into(), name: Some("server".into()) }
        );
        let servers = serde_json::json!([{"ip_addr": {"addr": "10.0.0.1"}, "port": 80, "enabled": true,
            "oper_status": {"state": "OPER_DOWN", "reason": ["hm: connect refused"]},
            "stats": {"requests": 12, "errors": 1, "open_connections": 0, "latency_p99_ms": 2.5}}]);
        let shown = pool_server_table(&servers);
        for cell in ["10.0.0.1:80", "OPER_DOWN", "hm: connect refused", "12", "2.5 ms"] {
            assert!(shown.contains(cell), "{cell} missing:\n{shown}");
        }
        assert_eq!(parse("show cluster"), Ok(Command::ShowCluster));
        let runtime = serde_json::json!({"cluster_state": {"state": "CLUSTER_UP_HA_ACTIVE"}, "node_states": [
            {"name": "a", "role": "CLUSTER_LEADER", "state": "CLUSTER_ACTIVE", "mgmt_ip": "127.0.0.1", "up_since": "t"},
            {"name": "b", "role": "CLUSTER_FOLLOWER", "state": "CLUSTER_INACTIVE", "mgmt_ip": "127.0.0.2"}]});
        let shown = cluster_table(&runtime);
        assert!(shown.starts_with("Cluster state: CLUSTER_UP_HA_ACTIVE\n"), "{shown}");
        assert!(shown.contains("leader") && shown.contains("follower") && shown.contains("inactive"), "{shown}");
        assert_eq!(parse("show pool-async status 0042").unwrap(), Command::AsyncStatus("0042".into()));
        assert_eq!(
            parse("upload image filename /tmp/controller.pkg").unwrap(),
            Command::UploadImage(PathBuf::from("/tmp/controller.pkg"))
        );
        assert!(parse("upload image").is_err());
        assert_eq!(
            parse("delete image 18.2.7-5000-20191009.205501").unwrap(),
            Command::Delete { kind: "image".into(), name: "18.2.7-5000-20191009.205501".into() }
        );
    }

    #[test]
    fn prompt_host_drops_scheme_and_port() {
        assert_eq!(host_of("https://10.1.1.1:9443"), "10.1.1.1");
        assert_eq!(host_of("http://ctl.example/"), "ctl.example");
    }
}
