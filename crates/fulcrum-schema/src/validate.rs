//! Checking an object against its schema and filling in defaults.
//!
//! The result of [`normalize`] is the stored form of an object's configuration: only known
//! fields, every value of the right type and within range, defaults filled in, references in
//! canonical form. Identity fields (`uuid`, `url`, `tenant_ref`, `_last_modified`) are not part
//! of the schema; the API layer owns them.

use std::collections::HashSet;
use std::fmt;

use serde_json::{Map, Value};

use crate::model::{Kind, ListKey, ListSpec, ObjectSchema};
use crate::refs;
use crate::types::Registry;

/// What is wrong with an object, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// Dotted path of the field (`servers[3].ratio`); empty for the object itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field '{}': {}", self.field, self.message)
        }
    }
}

impl std::error::Error for SchemaError {}

fn err(field: &str, message: impl Into<String>) -> SchemaError {
    SchemaError { field: field.to_string(), message: message.into() }
}

/// Checks `input` against `schema` and returns the stored form of the object.
/// Unknown fields are dropped, as the controller does.
pub fn normalize(reg: &Registry, schema: &ObjectSchema, input: &Value) -> Result<Map<String, Value>, SchemaError> {
    normalize_object(reg, schema, input, At::Root(""))
}

fn normalize_object(
    reg: &Registry,
    schema: &ObjectSchema,
    input: &Value,
    at: At<'_>,
) -> Result<Map<String, Value>, SchemaError> {
    let Value::Object(input) = input else {
        return Err(err(&at.to_string(), format!("expected an object, got {}", type_name(input))));
    };
    // Sized once: grown by doubling, a pool's map would hold room for twice its fields, and an
    // object is kept in memory as long as it exists.
    let mut out = Map::with_capacity(schema.fields.len());
    for field in &schema.fields {
        let path = At::Field(&at, field.name);
        match input.get(field.name) {
            Some(value) if !value.is_null() => {
                out.insert(field.name.into(), normalize_at(reg, &field.kind, value, path)?);
            }
            _ => {
                if let Some(default) = &field.default {
                    out.insert(field.name.into(), default.clone());
                } else if field.required {
                    return Err(err(&path.to_string(), "is required"));
                }
            }
        }
    }
    if let Some(hook) = schema.hook {
        hook(&mut out).map_err(|message| err(&at.to_string(), message))?;
    }
    // After the hook: it may fill key fields (a server's port), which makes entries comparable.
    for field in &schema.fields {
        if let (Kind::List(spec), Some(Value::Array(items))) = (&field.kind, out.get(field.name)) {
            check_unique_keys(spec, items, &out, &At::Field(&at, field.name).to_string())?;
        }
    }
    Ok(out)
}

/// Refuses a list holding two entries with the same key (key fields an entry leaves out are
/// taken from `parent`, see [`ListSpec::key_defaults`]).
pub fn check_unique_keys(
    spec: &ListSpec,
    items: &[Value],
    parent: &Map<String, Value>,
    at: &str,
) -> Result<(), SchemaError> {
    if spec.key == ListKey::None {
        return Ok(());
    }
    let fallback = |path: &str| {
        let (_, parent_field) = spec.key_defaults.iter().find(|(k, _)| *k == path)?;
        parent.get(*parent_field).cloned()
    };
    let mut seen = HashSet::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(key) = entry_key_with(&spec.key, item, &fallback)
            && !seen.insert(key.clone())
        {
            return Err(err(&format!("{at}[{i}]"), format!("duplicate entry {key}")));
        }
    }
    Ok(())
}

/// How an error names the kind of value it got ("a list", "an object", ...).
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks one value against its kind (`at` names it in errors) and returns its stored form.
pub fn normalize_value(reg: &Registry, kind: &Kind, value: &Value, at: &str) -> Result<Value, SchemaError> {
    normalize_at(reg, kind, value, At::Root(at))
}

fn normalize_at(reg: &Registry, kind: &Kind, value: &Value, at: At<'_>) -> Result<Value, SchemaError> {
    let wrong = |expected: &str| err(&at.to_string(), format!("expected {expected}, got {}", type_name(value)));
    match kind {
        Kind::Any => Ok(value.clone()),
        Kind::Str => match value {
            Value::String(_) => Ok(value.clone()),
            _ => Err(wrong("a string")),
        },
        Kind::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            // The controller accepts booleans written as strings ("local": "true").
            Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(Value::Bool(true)),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(Value::Bool(false)),
            _ => Err(wrong("a boolean")),
        },
        Kind::Int { min, max } => {
            let n = match value {
                Value::Number(n) => n.as_i64().ok_or_else(|| wrong("an integer"))?,
                Value::String(s) => s.trim().parse::<i64>().map_err(|_| wrong("an integer"))?,
                _ => return Err(wrong("an integer")),
            };
            if n < *min || n > *max {
                return Err(err(&at.to_string(), format!("value {n} is out of range {min}..{max}")));
            }
            Ok(Value::from(n))
        }
        Kind::Enum(values) => {
            let Value::String(s) = value else {
                return Err(wrong("a string"));
            };
            if values.contains(&s.as_str()) {
                Ok(value.clone())
            } else {
                Err(err(&at.to_string(), format!("unknown value '{s}'; expected one of {}", values.join(", "))))
            }
        }
        Kind::Ref(target) => {
            let Value::String(s) = value else {
                return Err(wrong("a reference string"));
            };
            let parsed = refs::parse(target, s).map_err(|m| err(&at.to_string(), m))?;
            Ok(Value::String(parsed.canonical()))
        }
        Kind::Obj(name) => Ok(Value::Object(normalize_object(reg, reg.schema(name), value, at)?)),
        Kind::List(spec) => normalize_list(reg, spec, value, at),
    }
}

fn normalize_list(reg: &Registry, spec: &ListSpec, value: &Value, at: At<'_>) -> Result<Value, SchemaError> {
    let Value::Array(items) = value else {
        return Err(err(&at.to_string(), format!("expected a list, got {}", type_name(value))));
    };
    if let Some(max) = spec.max
        && items.len() > max
    {
        return Err(err(&at.to_string(), format!("has {} entries; at most {max} are allowed", items.len())));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(normalize_at(reg, &spec.item, item, At::Index(&at, i))?);
    }
    // Duplicate keys are checked by the enclosing object, once its hook has run.
    Ok(Value::Array(out))
}

/// The identity of a list entry under `key` (as text, for comparison and messages); `None` when
/// the list has no key.
pub fn entry_key(key: &ListKey, entry: &Value) -> Option<String> {
    entry_key_with(key, entry, &|_| None)
}

/// Like [`entry_key`], taking a key field the entry leaves out from `fallback` (the parent's
/// default, see [`crate::ListSpec::key_defaults`]).
pub fn entry_key_with(key: &ListKey, entry: &Value, fallback: &dyn Fn(&str) -> Option<Value>) -> Option<String> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match key {
        ListKey::None => None,
        ListKey::Value => Some(text(entry)),
        ListKey::Fields(paths) => {
            let parts: Vec<String> = paths
                .iter()
                .map(|path| {
                    let mut at = Some(entry);
                    for segment in path.split('.') {
                        at = at.and_then(|v| v.get(segment));
                    }
                    match at {
                        Some(v) => text(v),
                        None => fallback(path).as_ref().map(text).unwrap_or_default(),
                    }
                })
                .collect();
            Some(parts.join(":"))
        }
    }
}

/// Where a value sits in an object, formatted only when an error needs it (walks over large
/// lists must not allocate a path per entry).
#[derive(Clone, Copy)]
enum At<'a> {
    Root(&'a str),
    Field(&'a At<'a>, &'static str),
    Index(&'a At<'a>, usize),
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root(path) => f.write_str(path),
            At::Field(parent, name) => match parent {
                At::Root("") => f.write_str(name),
                _ => write!(f, "{parent}.{name}"),
            },
            At::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Visits every reference in a stored object, with the type it must point to.
pub fn for_each_ref(
    reg: &Registry,
    schema: &ObjectSchema,
    object: &Map<String, Value>,
    visit: &mut dyn FnMut(&'static str, &str),
) {
    for &i in reg.ref_fields(schema.name) {
        let field = &schema.fields[i];
        if let Some(value) = object.get(field.name) {
            visit_value(reg, &field.kind, value, visit);
        }
    }
}

fn visit_value(reg: &Registry, kind: &Kind, value: &Value, visit: &mut dyn FnMut(&'static str, &str)) {
    match (kind, value) {
        (Kind::Ref(target), Value::String(s)) => visit(target, s),
        (Kind::Obj(name), Value::Object(map)) => for_each_ref(reg, reg.schema(name), map, visit),
        (Kind::List(spec), Value::Array(items)) => {
            items.iter().for_each(|item| visit_value(reg, &spec.item, item, visit))
        }
        _ => {}
    }
}

/// Rewrites every reference in a stored object in place; `rewrite` may refuse one, and the
/// error names the field.
pub fn rewrite_refs(
    reg: &Registry,
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    rewrite: &mut dyn FnMut(&'static str, &str) -> Result<String, String>,
) -> Result<(), SchemaError> {
    rewrite_object(reg, schema, object, At::Root(""), rewrite)
}

fn rewrite_object(
    reg: &Registry,
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    at: At<'_>,
    rewrite: &mut dyn FnMut(&'static str, &str) -> Result<String, String>,
) -> Result<(), SchemaError> {
    for &i in reg.ref_fields(schema.name) {
        let field = &schema.fields[i];
        if let Some(value) = object.get_mut(field.name) {
            rewrite_value(reg, &field.kind, value, At::Field(&at, field.name), rewrite)?;
        }
    }
    Ok(())
}

fn rewrite_value(
    reg: &Registry,
    kind: &Kind,
    value: &mut Value,
    at: At<'_>,
    rewrite: &mut dyn FnMut(&'static str, &str) -> Result<String, String>,
) -> Result<(), SchemaError> {
    match (kind, value) {
        (Kind::Ref(target), Value::String(s)) => {
            *s = rewrite(target, s).map_err(|m| err(&at.to_string(), m))?;
        }
        (Kind::Obj(name), Value::Object(map)) => rewrite_object(reg, reg.schema(name), map, at, rewrite)?,
        (Kind::List(spec), Value::Array(items)) => {
            for (i, item) in items.iter_mut().enumerate() {
                rewrite_value(reg, &spec.item, item, At::Index(&at, i), rewrite)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(input: Value) -> Result<Map<String, Value>, SchemaError> {
        let reg = Registry::get();
        normalize(reg, reg.schema("Pool"), &input)
    }

    #[test]
    fn pool_defaults_match_the_controller() {
        let p = pool(json!({"name": "p", "servers": [{"ip": {"addr": "10.0.0.1", "type": "V4"}}]})).unwrap();
        assert_eq!(p["default_server_port"], 80);
        assert_eq!(p["lb_algorithm"], "LB_ALGORITHM_LEAST_CONNECTIONS");
        assert_eq!(p["request_queue_enabled"], false);
        assert_eq!(p["cloud_ref"], "/api/cloud?name=Default-Cloud");
        let server = &p["servers"][0];
        assert_eq!(server["ratio"], 1);
        assert_eq!(server["enabled"], true);
        assert_eq!(server["port"], 80);
        assert_eq!(server["hostname"], "10.0.0.1");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({}), "name", "is required"),
            (json!({"name": 5}), "name", "expected a string"),
            (json!({"name": "p", "default_server_port": 0}), "default_server_port", "out of range"),
            (json!({"name": "p", "lb_algorithm": "FOO"}), "lb_algorithm", "unknown value 'FOO'"),
            (
                json!({"name": "p", "servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 25}]}),
                "servers[0].ratio",
                "out of range",
            ),
            (
                json!({"name": "p", "servers": [{"ip": {"addr": "nope", "type": "V4"}}]}),
                "servers[0].ip",
                "not a valid V4",
            ),
            (json!({"name": "p", "servers": {}}), "servers", "expected a list"),
            (json!({"name": "p", "cloud_ref": "/api/pool/x"}), "cloud_ref", "expected a cloud"),
        ];
        for (input, field, message) in cases {
            let e = pool(input.clone()).unwrap_err();
            assert_eq!(e.field, field, "{input}");
            assert!(e.message.contains(message), "{input}: {e}");
        }
    }

    #[test]
    fn lists_enforce_their_maximum_and_their_keys() {
        let servers: Vec<Value> = (0..5001)
            .map(|i| json!({"ip": {"addr": format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256), "type": "V4"}}))
            .collect();
        let e = pool(json!({"name": "p", "servers": servers})).unwrap_err();
        assert!(e.message.contains("at most 5000"), "{e}");
        let dup = json!({"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 80});
        let e = pool(json!({"name": "p", "servers": [dup.clone(), dup]})).unwrap_err();
        assert!(e.message.contains("duplicate entry 1.1.1.1:80"), "{e}");
    }

    #[test]
    fn unknown_fields_are_dropped_and_strings_coerce() {
        let p = pool(json!({"name": "p", "bogus": 1, "enabled": "false", "default_server_port": "8080"})).unwrap();
        assert!(!p.contains_key("bogus"));
        assert_eq!(p["enabled"], false);
        assert_eq!(p["default_server_port"], 8080);
        assert!(!p.contains_key("servers"), "a list without a default stays absent");
    }

    #[test]
    fn references_are_visited_and_rewritten() {
        let reg = Registry::get();
        let schema = reg.schema("Pool");
        let mut p =
            pool(json!({"name": "p", "health_monitor_refs": ["hm-1", "https://h/api/healthmonitor/hm-2#x"]})).unwrap();
        let mut seen = vec![];
        for_each_ref(reg, schema, &p, &mut |kind, r| seen.push(format!("{kind} {r}")));
        assert!(seen.contains(&"healthmonitor /api/healthmonitor/hm-2".to_string()), "{seen:?}");
        rewrite_refs(reg, schema, &mut p, &mut |_, r| Ok(r.to_uppercase())).unwrap();
        assert_eq!(p["health_monitor_refs"][0], "/API/HEALTHMONITOR/HM-1");
        let e = rewrite_refs(reg, schema, &mut p, &mut |_, _| Err("gone".into())).unwrap_err();
        assert!(
            e.field.starts_with("cloud_ref") || e.field.starts_with("vrf_ref") || e.field.contains("health"),
            "{e}"
        );
    }
}
