//! The upgrade words of the shell, as in the product's CLI: `upgrade system image_ref <name>
//! [skip_warnings]`, `patch controller controller_patch_ref <name>`, `rollback segroup
//! se_group_refs <g>...`, `resume segroup se_group_refs <g>`, `show upgrade status [detail]`.
//! Every operation first shows the preview of its checks, then starts (or says why not).

use serde_json::{Map, Value, json};

use crate::table;
use crate::{Client, error_text};

/// A parsed operation: its API path and parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub path: &'static str,
    pub params: Value,
}

const KEYS: &[&str] = &["image_ref", "controller_patch_ref", "se_patch_ref", "se_group_refs", "action_on_error"];

pub fn parse(words: &[&str]) -> Result<Operation, String> {
    let usage = "usage: upgrade|patch|rollback|rollbackpatch system|controller|segroup [image_ref <name>] \
                 [controller_patch_ref <name>] [se_patch_ref <name>] [se_group_refs <g>...] \
                 [action_on_error <ACTION>] [disruptive] [skip_warnings]; resume segroup se_group_refs <g>...";
    let (verb, scope, rest) = match words {
        [verb, scope, rest @ ..] => (*verb, *scope, rest),
        _ => return Err(usage.into()),
    };
    let path = match verb {
        "upgrade" => "upgrade",
        "patch" => "patch",
        "rollback" => "rollback",
        "rollbackpatch" => "rollbackpatch",
        "resume" if scope == "segroup" => "segroup/resume",
        _ => return Err(usage.into()),
    };
    let mut params = Map::new();
    match scope {
        "system" => {
            params.insert("system".into(), json!(true));
        }
        "controller" | "segroup" => {}
        _ => return Err(usage.into()),
    }
    let mut groups: Vec<Value> = Vec::new();
    let mut key: Option<&str> = None;
    for word in rest {
        match *word {
            "skip_warnings" | "disruptive" => {
                key = None;
                let target = if *word == "disruptive" { "se_group_options_disruptive" } else { *word };
                params.insert(target.into(), json!(true));
            }
            k if KEYS.contains(&k) => key = Some(k),
            value => match key {
                Some("se_group_refs") => groups.push(json!(format!("/api/serviceenginegroup?name={value}"))),
                Some(k) => {
                    params.insert(k.into(), json!(value));
                    key = None;
                }
                None => return Err(format!("unexpected '{value}'; {usage}")),
            },
        }
    }
    if !groups.is_empty() {
        params.insert("se_group_refs".into(), Value::Array(groups));
    }
    let mut options = Map::new();
    if let Some(a) = params.remove("action_on_error") {
        options.insert("action_on_error".into(), a);
    }
    if let Some(d) = params.remove("se_group_options_disruptive") {
        options.insert("disruptive".into(), d);
    }
    if !options.is_empty() {
        params.insert("se_group_options".into(), Value::Object(options));
    }
    if scope == "segroup" && !params.contains_key("se_group_refs") {
        return Err("name the SE groups: se_group_refs <g>...".into());
    }
    for key in ["image_ref", "controller_patch_ref", "se_patch_ref"] {
        if let Some(Value::String(name)) = params.get(key) {
            // Image names are tags; the API takes them as by-name references.
            let reference = json!(format!("/api/image?name={name}"));
            params.insert(key.into(), reference);
        }
    }
    Ok(Operation { path, params: Value::Object(params) })
}

/// The `| Field | Value |` table of an answer, its checks listed under `checks`.
fn answer_table(body: &Value) -> String {
    let mut rows = vec![
        vec!["status_code".to_string(), body["status_code"].as_str().unwrap_or_default().to_string()],
        vec!["status".to_string(), body["status"].as_str().or(body["error"].as_str()).unwrap_or_default().to_string()],
    ];
    if let Some(checks) = body["checks"].as_array().filter(|c| !c.is_empty()) {
        rows.push(vec!["checks".into(), String::new()]);
        for c in checks {
            let state = c["state"].as_str().unwrap_or_default().trim_start_matches("UPGRADE_PRE_CHECK_");
            let mark = if state == "SUCCESS" { String::new() } else { format!(" [{state}]") };
            rows.push(vec![String::new(), format!("{}{mark}", c["description"].as_str().unwrap_or_default())]);
            if state != "SUCCESS" {
                for d in c["details"].as_array().into_iter().flatten() {
                    rows.push(vec![String::new(), format!("    {}", d.as_str().unwrap_or_default())]);
                }
            }
        }
    }
    table::render(&["Field", "Value"], &rows)
}

/// Shows the preview, then starts the operation.
pub fn execute(client: &mut Client, op: &Operation) -> Result<String, String> {
    let preview =
        client.request("POST", &format!("{}/preview", op.path), Some(&op.params)).map_err(|e| e.to_string())?;
    if preview.status != 200 {
        return Err(error_text(&preview));
    }
    let mut out = String::from("Previewing upgrade\n");
    out.push_str(&answer_table(&preview.body));
    let started = client.request("POST", op.path, Some(&op.params)).map_err(|e| e.to_string())?;
    if started.status == 200 {
        out.push_str("Starting upgrade\n");
        out.push_str(&answer_table(
            &json!({"status_code": started.body["status_code"], "status": started.body["status"]}),
        ));
        Ok(out)
    } else if started.body.get("status_code").is_some() {
        out.push_str(&answer_table(&started.body));
        Err(out)
    } else {
        Err(format!("{out}{}", error_text(&started)))
    }
}

/// `show upgrade status [detail]`.
pub fn status(client: &mut Client, detail: bool) -> Result<String, String> {
    let reply = client.get("upgradestatusinfo").map_err(|e| e.to_string())?;
    if reply.status != 200 {
        return Err(error_text(&reply));
    }
    let nodes = reply.body["results"].as_array().cloned().unwrap_or_default();
    if detail {
        return Ok(nodes.iter().map(table::object).collect::<Vec<_>>().join(""));
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let text = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            vec![
                text(&n["name"]),
                text(&n["node_type"]),
                text(&n["state"]["state"]),
                format!("{}%", n["progress"].as_u64().unwrap_or(0)),
                text(&n["version"]),
                text(&n["previous_version"]),
                text(&n["upgrade_ops"]),
            ]
        })
        .collect();
    Ok(table::render(&["Name", "Node Type", "State", "Progress", "Version", "Previous Version", "Operation"], &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documents_commands_parse() {
        let op = parse(&["upgrade", "system", "image_ref", "30.3.3-7235-20230110.035149", "skip_warnings"]).unwrap();
        assert_eq!(op.path, "upgrade");
        assert_eq!(
            op.params,
            json!({"system": true, "skip_warnings": true, "image_ref": "/api/image?name=30.3.3-7235-20230110.035149"})
        );
        let op =
            parse(&["patch", "controller", "controller_patch_ref", "23.1.1-7189-2p1-20221216.192828", "skip_warnings"])
                .unwrap();
        assert_eq!(op.path, "patch");
        assert_eq!(op.params["controller_patch_ref"], "/api/image?name=23.1.1-7189-2p1-20221216.192828");
        let op = parse(&[
            "upgrade",
            "segroup",
            "image_ref",
            "x",
            "se_group_refs",
            "g1",
            "g2",
            "action_on_error",
            "CONTINUE_UPGRADE_OPS_ON_ERROR",
            "disruptive",
        ])
        .unwrap();
        assert_eq!(
            op.params["se_group_refs"],
            json!(["/api/serviceenginegroup?name=g1", "/api/serviceenginegroup?name=g2"])
        );
        assert_eq!(
            op.params["se_group_options"],
            json!({"action_on_error": "CONTINUE_UPGRADE_OPS_ON_ERROR", "disruptive": true})
        );
        assert_eq!(parse(&["resume", "segroup", "se_group_refs", "g1"]).unwrap().path, "segroup/resume");
        assert!(parse(&["upgrade", "segroup", "image_ref", "x"]).is_err(), "groups are needed");
        assert!(parse(&["upgrade", "moon"]).is_err());
    }
}
