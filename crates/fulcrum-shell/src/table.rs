//! Tables in the style of the controller's CLI.

use serde_json::Value;

/// Draws rows under a header with `+---+` rules.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let rule = format!("+{}+\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!(" {c}{} ", " ".repeat(w - c.chars().count()))).collect();
        format!("|{}|\n", padded.join("|"))
    };
    let mut out = rule.clone();
    out.push_str(&line(header.to_vec()));
    out.push_str(&rule);
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out.push_str(&rule);
    out
}

/// A reference is shown by the name after `#` when there is one, as the CLI does.
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) if s.contains("/api/") => {
            s.rsplit_once('#').map_or_else(|| s.rsplit('/').next().unwrap_or(s).to_string(), |(_, n)| n.to_string())
        }
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `{addr, type}` reads better as its address.
fn as_address(value: &Value) -> Option<String> {
    let map = value.as_object()?;
    (map.len() == 2 && map.contains_key("addr") && map.contains_key("type")).then(|| scalar(&map["addr"]))
}

fn flatten(key: &str, value: &Value, depth: usize, rows: &mut Vec<Vec<String>>) {
    let indent = "  ".repeat(depth);
    if let Some(addr) = as_address(value) {
        rows.push(vec![format!("{indent}{key}"), addr]);
        return;
    }
    match value {
        Value::Object(map) => {
            rows.push(vec![format!("{indent}{key}"), String::new()]);
            for (k, v) in map {
                flatten(k, v, depth + 1, rows);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Object(map) if as_address(item).is_none() => {
                        rows.push(vec![format!("{indent}{key}[{}]", i + 1), String::new()]);
                        for (k, v) in map {
                            flatten(k, v, depth + 1, rows);
                        }
                    }
                    _ => rows.push(vec![
                        format!("{indent}{key}[{}]", i + 1),
                        as_address(item).unwrap_or_else(|| scalar(item)),
                    ]),
                }
            }
        }
        _ => rows.push(vec![format!("{indent}{key}"), scalar(value)]),
    }
}

/// `| Field | Value |` for one object, nested fields indented.
pub fn object(value: &Value) -> String {
    let mut rows = Vec::new();
    if let Value::Object(map) = value {
        for (k, v) in map.iter().filter(|(k, _)| k.as_str() != "url") {
            flatten(k, v, 0, &mut rows);
        }
    }
    render(&["Field", "Value"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_and_objects_render_like_the_cli() {
        let t = render(&["Name", "UUID"], &[vec!["p1".into(), "pool-1".into()]]);
        assert_eq!(
            t,
            "+------+--------+\n| Name | UUID   |\n+------+--------+\n| p1   | pool-1 |\n+------+--------+\n"
        );
        let o = object(&json!({"url": "x", "name": "p", "cloud_ref": "https://h/api/cloud/c-1#Default-Cloud",
            "servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 80}]}));
        assert!(o.contains("| cloud_ref  | Default-Cloud |"), "{o}");
        assert!(o.contains("| servers[1] |               |"), "{o}");
        assert!(o.contains("|   ip       | 1.1.1.1       |"), "{o}");
        assert!(!o.contains("url"), "{o}");
    }
}
