//! Tables in the style of the controller's CLI.

use serde_json::Value;

/// Draws rows under a header with `+---+` rules, as wide as the terminal allows.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    render_within(header, rows, crate::terminal::width())
}

/// Columns narrower than this are not shrunk further (the table then overflows instead).
const MIN_COLUMN: usize = 8;

/// Draws the table within `width` columns when given: the widest columns give way first and
/// their cells wrap onto more lines, so nothing is cut off.
pub fn render_within(header: &[&str], rows: &[Vec<String>], width: Option<usize>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    if let Some(limit) = width {
        // Each column costs its width plus "| " and " "; the last rule "|" one more.
        let frame = 3 * widths.len() + 1;
        while widths.iter().sum::<usize>() + frame > limit {
            let Some(widest) = (0..widths.len()).filter(|&i| widths[i] > MIN_COLUMN).max_by_key(|&i| widths[i]) else {
                break;
            };
            widths[widest] -= 1;
        }
    }
    let rule = format!("+{}+\n", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("+"));
    let line = |cells: Vec<&str>| {
        let wrapped: Vec<Vec<String>> = cells.iter().zip(&widths).map(|(c, w)| wrap(c, *w)).collect();
        let height = wrapped.iter().map(Vec::len).max().unwrap_or(1);
        let mut out = String::new();
        for i in 0..height {
            let padded: Vec<String> = wrapped
                .iter()
                .zip(&widths)
                .map(|(lines, w)| {
                    let part = lines.get(i).map_or("", String::as_str);
                    format!(" {part}{} ", " ".repeat(w - part.chars().count()))
                })
                .collect();
            out.push_str(&format!("|{}|\n", padded.join("|")));
        }
        out
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

/// A cell's text in lines of at most `width` characters.
fn wrap(cell: &str, width: usize) -> Vec<String> {
    let chars: Vec<char> = cell.chars().collect();
    if chars.len() <= width {
        return vec![cell.to_string()];
    }
    chars.chunks(width.max(1)).map(|c| c.iter().collect()).collect()
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
    fn a_table_fits_the_width_by_wrapping_its_widest_columns() {
        let rows = vec![vec!["web".to_string(), "pool-0e5e0cf4-3f0e-4d9e-9a47-2a0b3c9bd1c7".to_string()]];
        let t = render_within(&["Name", "UUID"], &rows, Some(30));
        assert!(t.lines().all(|l| l.chars().count() <= 30), "{t}");
        let joined: String =
            t.lines().filter(|l| l.starts_with("| ")).skip(1).map(|l| l.split('|').nth(2).unwrap().trim()).collect();
        assert_eq!(joined, rows[0][1], "nothing is cut off:\n{t}");
        assert_eq!(render_within(&["Name", "UUID"], &rows, None), render_within(&["Name", "UUID"], &rows, Some(500)));
    }

    #[test]
    fn lists_and_objects_render_like_the_cli() {
        let t = render_within(&["Name", "UUID"], &[vec!["p1".into(), "pool-1".into()]], None);
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
