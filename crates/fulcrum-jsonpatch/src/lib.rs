//! JSON Pointer (RFC 6901) and the JSON Patch (RFC 6902) operations `add`, `remove`, `replace`
//! and `test` on a `serde_json::Value`.
//!
//! Used twice: by the PATCH engine for paths below a field it understands, and by the store to
//! replay the edit log it keeps instead of rewriting whole objects.

use serde_json::Value;

/// Splits `/a/b~1c` into `["a", "b/c"]`.
pub fn parse_pointer(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(vec![]);
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!("path '{pointer}' must start with '/'"));
    };
    Ok(rest.split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect())
}

/// Encodes segments back into a pointer.
pub fn to_pointer<S: AsRef<str>>(segments: &[S]) -> String {
    segments.iter().map(|s| format!("/{}", s.as_ref().replace('~', "~0").replace('/', "~1"))).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Add,
    Remove,
    Replace,
    Test,
}

impl OpKind {
    pub fn parse(name: &str) -> Option<OpKind> {
        Some(match name {
            "add" => OpKind::Add,
            "remove" => OpKind::Remove,
            "replace" => OpKind::Replace,
            "test" => OpKind::Test,
            _ => return None,
        })
    }
}

/// Why an operation could not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The path does not lead anywhere.
    Path(String),
    /// A `test` found another value.
    TestFailed(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Path(m) | OpError::TestFailed(m) => f.write_str(m),
        }
    }
}

fn index(segment: &str, len: usize, allow_end: bool) -> Option<usize> {
    if allow_end && segment == "-" {
        return Some(len);
    }
    if segment.len() > 1 && segment.starts_with('0') {
        return None;
    }
    segment.parse::<usize>().ok().filter(|&i| i < len || (allow_end && i == len))
}

/// Applies one operation at `path` (segments) inside `doc`.
pub fn apply(doc: &mut Value, op: OpKind, path: &[String], value: Option<&Value>) -> Result<(), OpError> {
    let shown = to_pointer(path);
    let Some((last, parents)) = path.split_last() else {
        return match op {
            OpKind::Add | OpKind::Replace => {
                *doc = value.cloned().unwrap_or(Value::Null);
                Ok(())
            }
            OpKind::Test if Some(&*doc) == value => Ok(()),
            OpKind::Test => Err(OpError::TestFailed(format!("test failed at '{shown}'"))),
            OpKind::Remove => Err(OpError::Path("cannot remove the whole document".into())),
        };
    };
    let mut parent = doc;
    for segment in parents {
        parent = match parent {
            Value::Object(map) => map.get_mut(segment.as_str()),
            Value::Array(items) => index(segment, items.len(), false).and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| OpError::Path(format!("path '{shown}' does not exist")))?;
    }
    let missing = || OpError::Path(format!("path '{shown}' does not exist"));
    let value = || value.cloned().unwrap_or(Value::Null);
    match parent {
        Value::Object(map) => match op {
            OpKind::Add => {
                map.insert(last.clone(), value());
            }
            OpKind::Replace => *map.get_mut(last.as_str()).ok_or_else(missing)? = value(),
            OpKind::Remove => {
                map.remove(last.as_str()).ok_or_else(missing)?;
            }
            OpKind::Test => {
                if map.get(last.as_str()) != Some(&value()) {
                    return Err(OpError::TestFailed(format!("test failed at '{shown}'")));
                }
            }
        },
        Value::Array(items) => {
            let i = index(last, items.len(), op == OpKind::Add).ok_or_else(missing)?;
            match op {
                OpKind::Add => items.insert(i, value()),
                OpKind::Replace => items[i] = value(),
                OpKind::Remove => {
                    items.remove(i);
                }
                OpKind::Test => {
                    if items[i] != value() {
                        return Err(OpError::TestFailed(format!("test failed at '{shown}'")));
                    }
                }
            }
        }
        _ => return Err(missing()),
    }
    Ok(())
}

/// Applies a whole JSON Patch document (`[{"op", "path", "value"}, ...]`) in order.
pub fn apply_all(doc: &mut Value, ops: &[Value]) -> Result<(), OpError> {
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .and_then(OpKind::parse)
            .ok_or_else(|| OpError::Path(format!("bad operation {op}")))?;
        let path = parse_pointer(op.get("path").and_then(Value::as_str).unwrap_or_default()).map_err(OpError::Path)?;
        apply(doc, kind, &path, op.get("value"))?;
    }
    Ok(())
}

/// What an edit log (one that applies) did to the entries of the list at `/<field>`: for each
/// entry after it, `Some(i)` if it is entry `i` of the `len_before` before, untouched, `None` if
/// the log added, replaced or changed it. `None` as a whole when the log sets the field itself
/// or says something this cannot follow. A renderer copies the untouched entries' text.
pub fn list_origins(ops: &[Value], field: &str, len_before: usize) -> Option<Vec<Option<usize>>> {
    let mut origins: Vec<Option<usize>> = (0..len_before).map(Some).collect();
    for op in ops {
        let kind = OpKind::parse(op.get("op")?.as_str()?)?;
        let path = parse_pointer(op.get("path")?.as_str()?).ok()?;
        match path.as_slice() {
            [first, ..] if first != field => {}
            [] | [_] => return None,
            [_, entry, inside @ ..] => {
                let at = index(entry, origins.len(), kind == OpKind::Add && inside.is_empty())?;
                match (kind, inside.is_empty()) {
                    (OpKind::Test, _) => {}
                    (OpKind::Add, true) => origins.insert(at, None),
                    (OpKind::Remove, true) => {
                        origins.remove(at);
                    }
                    (OpKind::Replace, true) | (_, false) => origins[at] = None,
                }
            }
        }
    }
    Some(origins)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_escape_and_unescape() {
        assert_eq!(parse_pointer("/a~1b/c~0d").unwrap(), ["a/b", "c~d"]);
        assert_eq!(to_pointer(&["a/b", "c~d"]), "/a~1b/c~0d");
        assert!(parse_pointer("a").is_err());
    }

    #[test]
    fn rfc6902_operations() {
        let mut doc = json!({"a": [1, 2], "b": {"c": 1}});
        apply_all(
            &mut doc,
            &[
                json!({"op": "add", "path": "/a/-", "value": 3}),
                json!({"op": "add", "path": "/a/0", "value": 0}),
                json!({"op": "remove", "path": "/a/1"}),
                json!({"op": "replace", "path": "/b/c", "value": 5}),
                json!({"op": "add", "path": "/b/d", "value": true}),
                json!({"op": "test", "path": "/a", "value": [0, 2, 3]}),
            ],
        )
        .unwrap();
        assert_eq!(doc, json!({"a": [0, 2, 3], "b": {"c": 5, "d": true}}));
        let e = apply_all(&mut doc, &[json!({"op": "test", "path": "/b/c", "value": 6})]).unwrap_err();
        assert!(matches!(e, OpError::TestFailed(_)));
        assert!(apply_all(&mut doc, &[json!({"op": "replace", "path": "/x", "value": 1})]).is_err());
        assert!(apply_all(&mut doc, &[json!({"op": "remove", "path": "/a/9"})]).is_err());
        assert!(apply_all(&mut doc, &[json!({"op": "add", "path": "/a/01", "value": 1})]).is_err());
    }

    #[test]
    fn list_origins_follow_adds_removes_and_changes() {
        let ops = [
            json!({"op": "add", "path": "/servers/-", "value": {}}),
            json!({"op": "remove", "path": "/servers/0"}),
            json!({"op": "replace", "path": "/servers/1/enabled", "value": false}),
            json!({"op": "add", "path": "/servers/0", "value": {}}),
            json!({"op": "replace", "path": "/description", "value": "d"}),
            json!({"op": "replace", "path": "/servers/3", "value": {}}),
        ];
        // Before: a b c. After: X b c' Y', where ' marks a change.
        assert_eq!(list_origins(&ops, "servers", 3), Some(vec![None, Some(1), None, None]));
        assert_eq!(list_origins(&ops[4..5], "servers", 2), Some(vec![Some(0), Some(1)]));
        assert_eq!(list_origins(&[json!({"op": "replace", "path": "/servers", "value": []})], "servers", 2), None);
        assert_eq!(
            list_origins(&[json!({"op": "remove", "path": "/servers/2"})], "servers", 2),
            None,
            "a log that does not apply"
        );
        assert_eq!(list_origins(&[json!({"op": "move", "from": "/a", "path": "/servers/0"})], "servers", 1), None);
    }
}
