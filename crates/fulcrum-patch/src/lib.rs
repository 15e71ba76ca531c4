//! PATCH of the Avi API, as a pure function from (object, patch) to (object, what changed).
//!
//! Two request forms:
//! - classic: `{"add" | "replace" | "delete": {<field>: <value>, ...}}`. Scalars are set (add,
//!   replace) or reset to their default (delete). Lists of objects are matched by the key the
//!   schema gives (a pool server by `ip.addr` + `port`): add inserts or updates the matching
//!   entry, delete removes matching entries, replace sets the list. Lists of scalars and refs
//!   add what is missing and delete what is given. Nested objects are edited one level deep.
//! - `json_patch`: RFC 6902 operations whose paths may name list entries by key
//!   (`/servers/1.1.1.1:80`) or index.
//!
//! The result is not yet validated as a whole; the caller normalizes it. The [`Touch`] list says
//! which parts changed so the store can write an edit log rather than the whole object.

pub mod merge;

use std::collections::HashMap;

use fulcrum_jsonpatch::OpKind;
use fulcrum_schema::{
    Kind, ListKey, ListSpec, ObjectSchema, Registry, SchemaError, check_unique_keys, entry_key_with, normalize_value,
    rewrite_refs, type_name,
};
use serde_json::{Map, Value, json};

/// At most this many operations in one json_patch request.
pub const MAX_JSON_PATCH_OPS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Replace,
    Delete,
}

#[derive(Debug, Clone)]
pub struct JsonOp {
    pub kind: OpKind,
    pub path: Vec<String>,
    pub value: Option<Value>,
}

#[derive(Debug, Clone)]
pub enum Patch {
    Classic { op: Op, fields: Map<String, Value> },
    Json(Vec<JsonOp>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The request is malformed or would make the object invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// A json_patch `test` failed (409).
    #[error("{0}")]
    TestFailed(String),
}

impl From<SchemaError> for PatchError {
    fn from(e: SchemaError) -> PatchError {
        PatchError::Invalid(e.to_string())
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> PatchError {
    PatchError::Invalid(message.into())
}

/// What a patch changed, in the order it changed it. List indices are those at the moment of
/// the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touch {
    /// A top-level field was set, reset or rewritten as a whole.
    Field(String),
    /// An entry was appended to a top-level list.
    Append(String, usize),
    /// An entry of a top-level list was updated in place.
    Entry(String, usize),
    /// An entry of a top-level list was removed.
    Remove(String, usize),
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub object: Map<String, Value>,
    pub touched: Vec<Touch>,
}

/// How to take back one step of a patch applied in place (top-level fields and list entries).
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Restore a top-level field (`None`: it was absent).
    Field(String, Option<Value>),
    /// Restore entry `i` of list `f`.
    Entry(String, usize, Value),
    /// Drop the last entry of list `f`.
    Pop(String),
    /// Put the entry back at `i` of list `f`.
    Insert(String, usize, Value),
    /// Remove the entry inserted at `i` of list `f`.
    RemoveAt(String, usize),
}

/// What a patch applied in place did, and how to take it back.
#[derive(Debug, Clone, Default)]
pub struct InPlace {
    pub touched: Vec<Touch>,
    pub undo: Vec<Undo>,
}

impl InPlace {
    /// Whether a top-level field was absent before the patch.
    pub fn was_absent(&self, field: &str) -> bool {
        self.undo.iter().find_map(|u| match u {
            Undo::Field(f, before) if f == field => Some(before.is_none()),
            Undo::Entry(f, ..) | Undo::Pop(f) | Undo::Insert(f, ..) | Undo::RemoveAt(f, _) if f == field => Some(false),
            _ => None,
        }) == Some(true)
    }
}

/// Key → position of the entries of an object's keyed top-level lists. Kept with the object
/// from one PATCH to the next (the writer keeps it for a group commit), it makes matching an
/// entry, and checking that an added one is unique, cost O(1) instead of a scan of the list.
/// It describes the object it was built for and the patches applied since; after a rollback
/// (or any change made without it) it must be dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListIndexes {
    lists: HashMap<String, HashMap<String, usize>>,
    /// Fields of the object the indexed keys fall back on (a pool's `default_server_port`).
    parents: Vec<&'static str>,
}

impl ListIndexes {
    /// Where the entry with this key is in list `field`, if the index covers that list.
    pub fn position(&self, field: &str, key: &str) -> Option<Option<usize>> {
        self.lists.get(field).map(|index| index.get(key).copied())
    }

    /// The lists it covers.
    pub fn lists(&self) -> impl Iterator<Item = &str> {
        self.lists.keys().map(String::as_str)
    }

    /// The index of a list built from scratch; `None` when two entries share a key (an index
    /// could not tell them apart: the list is then scanned).
    fn build(items: &[Value], key_of: &dyn Fn(&Value) -> String) -> Option<HashMap<String, usize>> {
        let mut index = HashMap::with_capacity(items.len());
        for (i, entry) in items.iter().enumerate() {
            if index.insert(key_of(entry), i).is_some() {
                return None;
            }
        }
        Some(index)
    }
}

/// Takes back a patch applied in place, restoring the object exactly.
pub fn rollback(object: &mut Map<String, Value>, undo: Vec<Undo>) {
    for step in undo.into_iter().rev() {
        match step {
            Undo::Field(f, Some(v)) => {
                object.insert(f, v);
            }
            Undo::Field(f, None) => {
                object.shift_remove(&f);
            }
            Undo::Entry(f, i, v) => {
                if let Some(l) = object.get_mut(&f).and_then(Value::as_array_mut) {
                    l[i] = v;
                }
            }
            Undo::Pop(f) => {
                if let Some(l) = object.get_mut(&f).and_then(Value::as_array_mut) {
                    l.pop();
                }
            }
            Undo::Insert(f, i, v) => {
                if let Some(l) = object.get_mut(&f).and_then(Value::as_array_mut) {
                    l.insert(i, v);
                }
            }
            Undo::RemoveAt(f, i) => {
                if let Some(l) = object.get_mut(&f).and_then(Value::as_array_mut) {
                    l.remove(i);
                }
            }
        }
    }
}

/// Resolves a reference (canonical form in, canonical `/api/<type>/<uuid>` out), or says why not.
pub type Resolver<'a> = &'a mut dyn FnMut(&'static str, &str) -> Result<String, String>;

/// Reads a PATCH body: a classic op, `{"json_patch": [...]}`, or (with `is_json_patch`, the
/// `application/json-patch+json` content type) a bare RFC 6902 array.
pub fn parse(body: &Value, is_json_patch: bool) -> Result<Patch, PatchError> {
    if is_json_patch || body.is_array() {
        return parse_json_ops(body);
    }
    let Value::Object(map) = body else {
        return Err(invalid("PATCH body must be a JSON object with one of add, replace, delete or json_patch"));
    };
    if let Some(unknown) = map.keys().find(|k| !matches!(k.as_str(), "add" | "replace" | "delete" | "json_patch")) {
        return Err(invalid(format!(
            "unknown PATCH operation '{unknown}'; expected one of add, replace, delete or json_patch"
        )));
    }
    let mut ops = map.iter();
    let (name, value) = match (ops.next(), ops.next()) {
        (None, _) => {
            return Err(invalid("PATCH body holds no operation; expected one of add, replace, delete or json_patch"));
        }
        (Some(_), Some(_)) => {
            return Err(invalid("PATCH body must hold exactly one operation (add, replace, delete or json_patch)"));
        }
        (Some(one), None) => one,
    };
    let op = match name.as_str() {
        "json_patch" => return parse_json_ops(value),
        "add" => Op::Add,
        "replace" => Op::Replace,
        _ => Op::Delete,
    };
    match value {
        Value::Object(fields) => Ok(Patch::Classic { op, fields: fields.clone() }),
        other => Err(invalid(format!("the value of '{name}' must be an object of fields, got {}", type_name(other)))),
    }
}

fn parse_json_ops(value: &Value) -> Result<Patch, PatchError> {
    let Value::Array(items) = value else {
        return Err(invalid(format!("json_patch must be a list of operations, got {}", type_name(value))));
    };
    if items.len() > MAX_JSON_PATCH_OPS {
        return Err(invalid(format!(
            "json_patch has {} operations; at most {MAX_JSON_PATCH_OPS} are allowed",
            items.len()
        )));
    }
    let mut ops = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let name = item
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("json_patch[{i}]: 'op' is required")))?;
        let kind = OpKind::parse(name).ok_or_else(|| {
            invalid(format!("json_patch[{i}]: unsupported op '{name}'; expected add, remove, replace or test"))
        })?;
        let path = item
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("json_patch[{i}]: 'path' is required")))?;
        let path = fulcrum_jsonpatch::parse_pointer(path).map_err(|m| invalid(format!("json_patch[{i}]: {m}")))?;
        if path.is_empty() {
            return Err(invalid(format!("json_patch[{i}]: the path must name a field")));
        }
        let value = item.get("value").cloned();
        if kind != OpKind::Remove && value.is_none() {
            return Err(invalid(format!("json_patch[{i}]: '{name}' needs a 'value'")));
        }
        ops.push(JsonOp { kind, path, value });
    }
    Ok(Patch::Json(ops))
}

/// A key field of `entry` (dotted path), or the parent's value standing in for it.
fn key_part<'a>(entry: &'a Value, path: &str, fallbacks: &'a [(&str, Value)]) -> Option<&'a Value> {
    let mut at = Some(entry);
    for segment in path.split('.') {
        at = at.and_then(|v| v.get(segment));
    }
    at.or_else(|| fallbacks.iter().find(|(k, _)| *k == path).map(|(_, v)| v))
}

/// Whether two entries of a list have the same key; compares in place, allocating nothing, so a
/// scan over thousands of entries stays cheap.
fn same_key(spec: &ListSpec, a: &Value, b: &Value, fallbacks: &[(&str, Value)]) -> bool {
    match &spec.key {
        ListKey::None => false,
        ListKey::Value => a == b,
        ListKey::Fields(paths) => paths.iter().all(|p| key_part(a, p, fallbacks) == key_part(b, p, fallbacks)),
    }
}

/// The parent's values that stand in for key fields an entry leaves out.
pub(crate) fn key_fallbacks(
    spec: &ListSpec,
    schema: &ObjectSchema,
    parent: &Map<String, Value>,
) -> Vec<(&'static str, Value)> {
    spec.key_defaults
        .iter()
        .filter_map(|(key, parent_field)| {
            Some((*key, parent.get(*parent_field).cloned().or_else(|| schema.field(parent_field)?.default.clone())?))
        })
        .collect()
}

/// Above this many entries in one request, matching builds an index instead of scanning.
const SCAN_LIMIT: usize = 16;

struct Engine<'a, 'r> {
    reg: &'static Registry,
    resolve: Resolver<'r>,
    touched: &'a mut Vec<Touch>,
    undo: &'a mut Vec<Undo>,
    indexes: &'a mut ListIndexes,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_string() } else { format!("{parent}.{name}") }
}

/// Applies `patch` to a copy of a stored object (identity fields included; they pass through).
pub fn apply(
    schema: &ObjectSchema,
    current: &Map<String, Value>,
    patch: &Patch,
    resolve: Resolver<'_>,
) -> Result<Applied, PatchError> {
    let mut object = current.clone();
    let done = apply_in_place(schema, &mut object, patch, resolve)?;
    Ok(Applied { object, touched: done.touched })
}

/// Applies `patch` to a stored object in place. On error the object is restored before
/// returning; on success [`InPlace::undo`] can still take the patch back (when a later check
/// refuses the result).
pub fn apply_in_place(
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    patch: &Patch,
    resolve: Resolver<'_>,
) -> Result<InPlace, PatchError> {
    apply_in_place_indexed(schema, object, patch, resolve, &mut ListIndexes::default())
}

/// [`apply_in_place`] with the object's list indexes (built as needed, kept up to date). On
/// error the object is restored and `indexes` emptied.
pub fn apply_in_place_indexed(
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    patch: &Patch,
    resolve: Resolver<'_>,
    indexes: &mut ListIndexes,
) -> Result<InPlace, PatchError> {
    let mut done = InPlace::default();
    let mut engine =
        Engine { reg: Registry::get(), resolve, touched: &mut done.touched, undo: &mut done.undo, indexes };
    let result = match patch {
        Patch::Classic { op, fields } => engine.classic(schema, object, *op, fields, "", None),
        Patch::Json(ops) => ops.iter().enumerate().try_for_each(|(i, op)| {
            engine.json_op(schema, object, op).map_err(|e| match e {
                PatchError::Invalid(m) => PatchError::Invalid(format!("json_patch[{i}]: {m}")),
                PatchError::TestFailed(m) => PatchError::TestFailed(format!("json_patch[{i}]: {m}")),
            })
        }),
    };
    match result {
        Ok(()) => Ok(done),
        Err(e) => {
            rollback(object, done.undo);
            indexes.lists.clear();
            Err(e)
        }
    }
}

impl Engine<'_, '_> {
    /// Remembers a top-level field's value before it changes (nested edits are covered by the
    /// snapshot of their top-level field).
    fn save_field(&mut self, top: Option<&str>, object: &Map<String, Value>, name: &str) {
        if top.is_none() {
            self.undo.push(Undo::Field(name.to_string(), object.get(name).cloned()));
        }
    }

    fn touch(&mut self, top: Option<&str>, name: &str, touch: impl FnOnce(String) -> Touch) {
        let touch = match top {
            Some(top) => Touch::Field(top.to_string()),
            None => touch(name.to_string()),
        };
        // A field rewritten as a whole may be an indexed list, or a parent value keys fall back
        // on (a pool's default_server_port): those indexes no longer hold.
        if let Touch::Field(field) = &touch {
            if self.indexes.parents.contains(&field.as_str()) {
                self.indexes.lists.clear();
            }
            self.indexes.lists.remove(field);
        }
        self.touched.push(touch);
    }

    /// A value checked against its kind, with its references resolved.
    fn checked(
        &mut self,
        schema: &ObjectSchema,
        name: &str,
        kind: &Kind,
        value: &Value,
        at: &str,
    ) -> Result<Value, PatchError> {
        let normalized = normalize_value(self.reg, kind, value, at)?;
        let mut holder = Map::new();
        holder.insert(name.to_string(), normalized);
        rewrite_refs(self.reg, schema, &mut holder, self.resolve)
            .map_err(|e| invalid(format!("field '{at}': {}", e.message)))?;
        Ok(holder.remove(name).unwrap_or(Value::Null))
    }

    /// Only the fields an entry gives, each checked: for updating a matching entry in place.
    fn partial_entry(
        &mut self,
        schema: &ObjectSchema,
        entry: &Value,
        at: &str,
    ) -> Result<Map<String, Value>, PatchError> {
        let Value::Object(given) = entry else {
            return Err(invalid(format!("field '{at}': expected an object, got {}", type_name(entry))));
        };
        let mut out = Map::new();
        for (name, value) in given {
            let field =
                schema.field(name).ok_or_else(|| invalid(format!("field '{}': unknown field", join(at, name))))?;
            if value.is_null() {
                continue;
            }
            let value = self.checked(schema, name, &field.kind, value, &join(at, name))?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    fn reset(object: &mut Map<String, Value>, field: &fulcrum_schema::Field) {
        match &field.default {
            Some(default) => {
                object.insert(field.name.to_string(), default.clone());
            }
            None => {
                object.shift_remove(field.name);
            }
        }
    }

    fn classic(
        &mut self,
        schema: &ObjectSchema,
        object: &mut Map<String, Value>,
        op: Op,
        fields: &Map<String, Value>,
        at: &str,
        top: Option<&str>,
    ) -> Result<(), PatchError> {
        for (name, value) in fields {
            let path = join(at, name);
            let field = schema.field(name).ok_or_else(|| invalid(format!("field '{path}': unknown field")))?;
            match &field.kind {
                Kind::Obj(sub) => {
                    if top.is_some() {
                        return Err(invalid(format!("field '{path}': PATCH edits nested fields to depth 1 only")));
                    }
                    let Value::Object(inner_fields) = value else {
                        return Err(invalid(format!("field '{path}': expected an object, got {}", type_name(value))));
                    };
                    self.save_field(top, object, name);
                    let inner = object.entry(name.clone()).or_insert_with(|| Value::Object(Map::new()));
                    if !inner.is_object() {
                        *inner = Value::Object(Map::new());
                    }
                    let inner = inner.as_object_mut().expect("made an object above");
                    self.classic(self.reg.schema(sub), inner, op, inner_fields, &path, Some(top.unwrap_or(name)))?;
                    self.touched.push(Touch::Field(top.unwrap_or(name).to_string()));
                }
                Kind::List(spec) => self.classic_list(schema, object, spec, field.name, op, value, &path, top)?,
                kind => {
                    match op {
                        Op::Add | Op::Replace => {
                            let value = self.checked(schema, name, kind, value, &path)?;
                            self.save_field(top, object, name);
                            object.insert(name.clone(), value);
                        }
                        Op::Delete => {
                            self.save_field(top, object, name);
                            Self::reset(object, field);
                        }
                    }
                    self.touch(top, name, Touch::Field);
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn classic_list(
        &mut self,
        schema: &ObjectSchema,
        object: &mut Map<String, Value>,
        spec: &ListSpec,
        name: &'static str,
        op: Op,
        value: &Value,
        path: &str,
        top: Option<&str>,
    ) -> Result<(), PatchError> {
        let field = schema.field(name).expect("caller found it");
        if op == Op::Delete && !value.is_array() && spec.key != ListKey::None {
            // `{"delete": {"servers": null}}` and the like: reset the list.
            self.save_field(top, object, name);
            Self::reset(object, field);
            self.touch(top, name, Touch::Field);
            return Ok(());
        }
        let Value::Array(items) = value else {
            return Err(invalid(format!("field '{path}': expected a list, got {}", type_name(value))));
        };
        if op == Op::Replace {
            let list = self.checked(schema, name, &field.kind, value, path)?;
            self.save_field(top, object, name);
            object.insert(name.to_string(), list);
            self.touch(top, name, Touch::Field);
            return Ok(());
        }
        if spec.key == ListKey::None {
            return Err(invalid(format!(
                "field '{path}': its entries have no key, so PATCH can only replace the whole list"
            )));
        }
        let item_schema = match &spec.item {
            Kind::Obj(s) => Some(self.reg.schema(s)),
            _ => None,
        };
        // Key fields an entry may leave out take the parent's value (a server's port).
        let fallbacks = key_fallbacks(spec, schema, object);
        let key_of = |entry: &Value| {
            entry_key_with(&spec.key, entry, &|path| fallbacks.iter().find(|(k, _)| *k == path).map(|(_, v)| v.clone()))
                .unwrap_or_default()
        };
        if !object.get(name).is_some_and(Value::is_array) {
            self.save_field(top, object, name);
            object.insert(name.to_string(), Value::Array(vec![]));
        }
        let record = top.is_none();
        // A top-level list is matched through the object's kept index; a nested one through an
        // index of this request (for many entries) or a scan.
        if record && !self.indexes.lists.contains_key(name) {
            let items_now = object.get(name).and_then(Value::as_array).expect("made a list above");
            if let Some(index) = ListIndexes::build(items_now, &key_of) {
                self.indexes.lists.insert(name.to_string(), index);
                for (_, parent) in spec.key_defaults {
                    if !self.indexes.parents.contains(parent) {
                        self.indexes.parents.push(parent);
                    }
                }
            }
        }
        // A kept index came from earlier patches, possibly of an earlier commit: in debug
        // builds (every test) it is checked against the list it claims to describe.
        debug_assert!(
            !record
                || self.indexes.lists.get(name).is_none_or(|kept| {
                    let items_now = object.get(name).and_then(Value::as_array).expect("made a list above");
                    ListIndexes::build(items_now, &key_of).as_ref() == Some(kept)
                }),
            "the kept index of list '{name}' agrees with the list"
        );
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut indexed = false;
        for (i, raw) in items.iter().enumerate() {
            let at = format!("{path}[{i}]");
            // The incoming entry in stored form: only its own fields for objects.
            let entry = match item_schema {
                Some(s) => Value::Object(self.partial_entry(s, raw, &at)?),
                None => {
                    let checked = normalize_value(self.reg, &spec.item, raw, &at)?;
                    let mut holder = Map::new();
                    holder.insert(name.to_string(), Value::Array(vec![checked]));
                    rewrite_refs(self.reg, schema, &mut holder, self.resolve)
                        .map_err(|e| invalid(format!("field '{at}': {}", e.message)))?;
                    holder
                        .remove(name)
                        .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                        .unwrap_or(Value::Null)
                }
            };
            let items_now = object.get_mut(name).and_then(Value::as_array_mut).expect("made a list above");
            let kept = if record { self.indexes.lists.get_mut(name) } else { None };
            let key = if kept.is_some() || items.len() > SCAN_LIMIT { key_of(&entry) } else { String::new() };
            let found = if let Some(kept) = &kept {
                kept.get(&key).copied()
            } else if items.len() > SCAN_LIMIT {
                if !indexed {
                    index = items_now.iter().enumerate().map(|(i, e)| (key_of(e), i)).collect();
                    indexed = true;
                }
                index.get(&key).copied()
            } else {
                items_now.iter().position(|e| same_key(spec, e, &entry, &fallbacks))
            };
            match (op, found) {
                (Op::Add, Some(pos)) => {
                    if record {
                        self.undo.push(Undo::Entry(name.to_string(), pos, items_now[pos].clone()));
                    }
                    if let (Some(existing), Value::Object(given)) = (items_now[pos].as_object_mut(), &entry) {
                        existing.extend(given.clone());
                    }
                    self.touch(top, name, |n| Touch::Entry(n, pos));
                }
                (Op::Add, None) => {
                    let full = normalize_value(self.reg, &spec.item, &entry, &at)?;
                    items_now.push(full);
                    if record {
                        self.undo.push(Undo::Pop(name.to_string()));
                    }
                    let pos = items_now.len() - 1;
                    match kept {
                        Some(kept) => {
                            kept.insert(key, pos);
                        }
                        None => {
                            index.insert(key, pos);
                        }
                    }
                    self.touch(top, name, |n| Touch::Append(n, pos));
                }
                (Op::Delete, Some(pos)) => {
                    let removed = items_now.remove(pos);
                    if record {
                        self.undo.push(Undo::Insert(name.to_string(), pos, removed));
                    }
                    match kept {
                        // The entries after it moved up by one.
                        Some(kept) => {
                            kept.remove(&key);
                            kept.values_mut().filter(|p| **p > pos).for_each(|p| *p -= 1);
                        }
                        None => indexed = false,
                    }
                    self.touch(top, name, |n| Touch::Remove(n, pos));
                }
                // Deleting an entry that is not there changes nothing.
                (Op::Delete, None) => {}
                (Op::Replace, _) => unreachable!("handled above"),
            }
        }
        Ok(())
    }

    fn json_op(
        &mut self,
        schema: &ObjectSchema,
        object: &mut Map<String, Value>,
        op: &JsonOp,
    ) -> Result<(), PatchError> {
        let (top, rest) = op.path.split_first().expect("parse refuses empty paths");
        let field = schema.field(top).ok_or_else(|| invalid(format!("field '{top}': unknown field")))?;
        let value = op.value.as_ref();
        if rest.is_empty() {
            return match (op.kind, &field.kind) {
                // The SDK's form: add of a list to a list field appends (or updates) entries.
                (OpKind::Add, Kind::List(spec)) if value.is_some_and(Value::is_array) && spec.key != ListKey::None => {
                    self.classic_list(schema, object, spec, field.name, Op::Add, value.expect("checked"), top, None)
                }
                (OpKind::Add | OpKind::Replace, kind) => {
                    let checked = self.checked(schema, top, kind, value.expect("parse requires it"), top)?;
                    self.save_field(None, object, top);
                    object.insert(top.clone(), checked);
                    self.touched.push(Touch::Field(top.clone()));
                    Ok(())
                }
                (OpKind::Remove, _) => {
                    self.save_field(None, object, top);
                    Self::reset(object, field);
                    self.touched.push(Touch::Field(top.clone()));
                    Ok(())
                }
                (OpKind::Test, kind) => {
                    let expected = self.checked(schema, top, kind, value.expect("parse requires it"), top)?;
                    if object.get(top.as_str()) == Some(&expected) {
                        Ok(())
                    } else {
                        Err(PatchError::TestFailed(format!("test failed at '/{top}'")))
                    }
                }
            };
        }
        match &field.kind {
            Kind::List(spec) => self.json_list_op(schema, object, spec, field.name, op, rest),
            Kind::Obj(_) | Kind::Any => {
                if op.kind != OpKind::Test {
                    self.save_field(None, object, top);
                }
                let sub = object.entry(top.clone()).or_insert_with(|| Value::Object(Map::new()));
                fulcrum_jsonpatch::apply(sub, op.kind, rest, value).map_err(|e| match e {
                    fulcrum_jsonpatch::OpError::TestFailed(m) => PatchError::TestFailed(format!("{m} (in '{top}')")),
                    fulcrum_jsonpatch::OpError::Path(m) => invalid(format!("{m} (in '{top}')")),
                })?;
                if op.kind != OpKind::Test {
                    self.touched.push(Touch::Field(top.clone()));
                }
                Ok(())
            }
            _ => Err(invalid(format!("field '{top}' is a scalar; it has no '{}'", rest.join("/")))),
        }
    }

    fn json_list_op(
        &mut self,
        schema: &ObjectSchema,
        object: &mut Map<String, Value>,
        spec: &ListSpec,
        name: &'static str,
        op: &JsonOp,
        rest: &[String],
    ) -> Result<(), PatchError> {
        // Entries added, moved or removed by position: the list's index is rebuilt when next needed.
        self.indexes.lists.remove(name);
        let fallbacks = key_fallbacks(spec, schema, object);
        if !object.get(name).is_some_and(Value::is_array) {
            self.save_field(None, object, name);
            object.insert(name.to_string(), Value::Array(vec![]));
        }
        let Some(Value::Array(list)) = object.get_mut(name) else { unreachable!("made a list above") };
        let segment = &rest[0];
        let by_key = list.iter().position(|e| {
            entry_key_with(&spec.key, e, &|p| fallbacks.iter().find(|(k, _)| *k == p).map(|(_, v)| v.clone()))
                .as_deref()
                == Some(segment.as_str())
        });
        let pos = match by_key {
            Some(pos) => pos,
            None if segment == "-" && op.kind == OpKind::Add && rest.len() == 1 => list.len(),
            None => segment
                .parse::<usize>()
                .ok()
                .filter(|&i| i < list.len() || (op.kind == OpKind::Add && rest.len() == 1 && i == list.len()))
                .ok_or_else(|| invalid(format!("field '{name}' has no entry '{segment}'")))?,
        };
        let at = format!("{name}[{pos}]");
        if rest.len() == 1 {
            match op.kind {
                OpKind::Add | OpKind::Replace => {
                    let checked =
                        normalize_value(self.reg, &spec.item, op.value.as_ref().expect("parse requires it"), &at)?;
                    let mut holder = Map::new();
                    holder.insert(name.to_string(), Value::Array(vec![checked]));
                    rewrite_refs(self.reg, schema, &mut holder, self.resolve)
                        .map_err(|e| invalid(format!("field '{at}': {}", e.message)))?;
                    let entry = holder
                        .remove(name)
                        .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                        .unwrap_or_default();
                    let list = object.get_mut(name).and_then(Value::as_array_mut).expect("a list");
                    if op.kind == OpKind::Replace {
                        let old = std::mem::replace(&mut list[pos], entry);
                        self.undo.push(Undo::Entry(name.to_string(), pos, old));
                        self.touched.push(Touch::Entry(name.to_string(), pos));
                    } else if pos == list.len() {
                        list.push(entry);
                        self.undo.push(Undo::Pop(name.to_string()));
                        self.touched.push(Touch::Append(name.to_string(), pos));
                    } else {
                        list.insert(pos, entry);
                        self.undo.push(Undo::RemoveAt(name.to_string(), pos));
                        self.touched.push(Touch::Field(name.to_string()));
                    }
                }
                OpKind::Remove => {
                    let removed = list.remove(pos);
                    self.undo.push(Undo::Insert(name.to_string(), pos, removed));
                    self.touched.push(Touch::Remove(name.to_string(), pos));
                }
                OpKind::Test => {
                    let expected =
                        normalize_value(self.reg, &spec.item, op.value.as_ref().expect("parse requires it"), &at)?;
                    if list[pos] != expected {
                        return Err(PatchError::TestFailed(format!("test failed at '/{name}/{segment}'")));
                    }
                }
            }
            return Ok(());
        }
        if op.kind != OpKind::Test {
            self.undo.push(Undo::Entry(name.to_string(), pos, list[pos].clone()));
        }
        let entry = &mut list[pos];
        fulcrum_jsonpatch::apply(entry, op.kind, &rest[1..], op.value.as_ref()).map_err(|e| match e {
            fulcrum_jsonpatch::OpError::TestFailed(m) => PatchError::TestFailed(format!("{m} (in '{at}')")),
            fulcrum_jsonpatch::OpError::Path(m) => invalid(format!("{m} (in '{at}')")),
        })?;
        if op.kind != OpKind::Test {
            let normalized = normalize_value(self.reg, &spec.item, entry, &at)?;
            *entry = normalized;
            self.touched.push(Touch::Entry(name.to_string(), pos));
        }
        Ok(())
    }
}

/// The top-level fields a patch changed, in order, each once.
pub fn touched_fields(touched: &[Touch]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in touched {
        let (Touch::Field(f) | Touch::Append(f, _) | Touch::Entry(f, _) | Touch::Remove(f, _)) = t;
        if !out.contains(f) {
            out.push(f.clone());
        }
    }
    out
}

/// Where the entries of list `field` that a patch appended or updated are once it is done, in
/// order: `touched` records each index as it was at the moment of the change, so a later
/// removal moves the entries after it up by one, and drops the entry it removes. The list
/// must not have been touched whole (an insert in the middle is recorded as `Touch::Field`).
pub fn entries_now(touched: &[Touch], field: &str) -> Vec<usize> {
    let mut entries: Vec<usize> = Vec::new();
    for t in touched {
        match t {
            Touch::Append(f, i) | Touch::Entry(f, i) if f == field => entries.push(*i),
            Touch::Remove(f, removed) if f == field => {
                entries.retain(|i| i != removed);
                entries.iter_mut().filter(|i| **i > *removed).for_each(|i| *i -= 1);
            }
            _ => {}
        }
    }
    entries.sort_unstable();
    entries.dedup();
    entries
}

/// Validates a patched object, given that it was valid before: only what the patch touched is
/// checked again (whole fields, or the touched entries of a list plus the list's own rules: its
/// maximum and unique keys), then the schema's object hook runs. The cost follows the size of
/// the change, not of the object, except for the O(n) list rules.
pub fn validate(schema: &ObjectSchema, object: &mut Map<String, Value>, touched: &[Touch]) -> Result<(), PatchError> {
    validate_indexed(schema, object, touched, &ListIndexes::default())
}

/// [`validate`] with the object's list indexes as [`apply_in_place_indexed`] left them: an
/// added entry is then checked unique, and a hook that only fills in list entries run, in
/// O(1) per touched entry.
pub fn validate_indexed(
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    touched: &[Touch],
    indexes: &ListIndexes,
) -> Result<(), PatchError> {
    let reg = Registry::get();
    for name in touched_fields(touched) {
        let field = schema.field(&name).ok_or_else(|| invalid(format!("field '{name}': unknown field")))?;
        let entries_only =
            matches!(field.kind, Kind::List(_)) && touched.iter().all(|t| !matches!(t, Touch::Field(f) if *f == name));
        match (&field.kind, object.get_mut(&name)) {
            (Kind::List(spec), Some(Value::Array(items))) if entries_only => {
                for i in entries_now(touched, &name) {
                    if i < items.len() {
                        items[i] = normalize_value(reg, &spec.item, &items[i], &format!("{name}[{i}]"))?;
                    }
                }
                if let Some(max) = spec.max
                    && items.len() > max
                {
                    return Err(invalid(format!(
                        "field '{name}': has {} entries; at most {max} are allowed",
                        items.len()
                    )));
                }
            }
            (_, Some(value)) if !value.is_null() => {
                *value = normalize_value(reg, &field.kind, value, &name)?;
            }
            _ => {
                object.remove(&name);
                match &field.default {
                    Some(default) => {
                        object.insert(name.clone(), default.clone());
                    }
                    None if field.required => return Err(invalid(format!("field '{name}': is required"))),
                    None => {}
                }
            }
        }
    }
    if let Some(hook) = schema.hook {
        // Only entries of the hook's list were added or updated (none removed, so the indices
        // recorded still name them): fill in those, not the whole list. Entries only removed:
        // the others were filled in before.
        let only = |list: &str, removed: bool| {
            touched.iter().all(|t| match t {
                Touch::Append(f, _) | Touch::Entry(f, _) => !removed && f == list,
                Touch::Remove(f, _) => removed && f == list,
                Touch::Field(_) => false,
            })
        };
        match schema.entry_hook {
            Some(entry_hook) if only(entry_hook.list, true) => {}
            Some(entry_hook) if only(entry_hook.list, false) => {
                for t in touched {
                    if let Touch::Append(_, i) | Touch::Entry(_, i) = t {
                        (entry_hook.fill)(object, *i);
                    }
                }
            }
            _ => hook(object).map_err(invalid)?,
        }
    }
    for name in touched_fields(touched) {
        let (Some(field), Some(Value::Array(items))) = (schema.field(&name), object.get(&name)) else { continue };
        let Kind::List(spec) = &field.kind else { continue };
        let whole = touched.iter().any(|t| matches!(t, Touch::Field(f) if *f == name));
        if whole {
            check_unique_keys(spec, items, object, &name)?;
            continue;
        }
        // Only the touched entries can have brought a duplicate. An entry the index holds at
        // its own position has a key no other entry has.
        let fallbacks = key_fallbacks(spec, schema, object);
        let unique_by_index = |i: usize, entry: &Value| {
            let key =
                entry_key_with(&spec.key, entry, &|p| key_part(entry, p, &fallbacks).cloned()).unwrap_or_default();
            indexes.position(&name, &key) == Some(Some(i))
        };
        // Where the added or updated entries are now: a later removal in the same patch moved them.
        for i in entries_now(touched, &name) {
            if let Some(entry) = items.get(i)
                && !unique_by_index(i, entry)
                && let Some(j) =
                    items.iter().enumerate().position(|(j, e)| j != i && same_key(spec, e, entry, &fallbacks))
            {
                let key =
                    entry_key_with(&spec.key, entry, &|p| key_part(entry, p, &fallbacks).cloned()).unwrap_or_default();
                return Err(invalid(format!("field '{name}[{}]': duplicate entry {key}", i.max(j))));
            }
        }
    }
    Ok(())
}

/// The edit log of a change: JSON Patch operations that turn `before` into `after` (the final,
/// normalized object), touching only what changed. A field rewritten as a whole, or a list whose
/// entries were both removed and added, is written whole.
pub fn edit_log(touched: &[Touch], was_absent: &dyn Fn(&str) -> bool, after: &Map<String, Value>) -> Vec<Value> {
    let list_of = |t: &Touch| match t {
        Touch::Field(f) | Touch::Append(f, _) | Touch::Entry(f, _) | Touch::Remove(f, _) => f.clone(),
    };
    let mut whole: Vec<String> = Vec::new();
    for t in touched {
        let field = list_of(t);
        let mixed = matches!(t, Touch::Append(..) | Touch::Entry(..))
            && touched.iter().any(|o| matches!(o, Touch::Remove(f, _) if *f == field));
        // A list that did not exist before cannot be appended to: write it whole.
        let new_list = !matches!(t, Touch::Field(_)) && was_absent(&field);
        if (matches!(t, Touch::Field(_)) || mixed || new_list) && !whole.contains(&field) {
            whole.push(field);
        }
    }
    let mut ops = Vec::new();
    for t in touched {
        if whole.contains(&list_of(t)) {
            continue;
        }
        let entry = |f: &str, i: usize| after.get(f).and_then(|l| l.get(i)).cloned().unwrap_or(Value::Null);
        ops.push(match t {
            Touch::Append(f, i) => json!({"op": "add", "path": format!("/{f}/-"), "value": entry(f, *i)}),
            Touch::Entry(f, i) => json!({"op": "replace", "path": format!("/{f}/{i}"), "value": entry(f, *i)}),
            Touch::Remove(f, i) => json!({"op": "remove", "path": format!("/{f}/{i}")}),
            Touch::Field(_) => unreachable!("whole fields are written below"),
        });
    }
    for field in whole {
        let path = fulcrum_jsonpatch::to_pointer(&[&field]);
        match after.get(&field) {
            Some(v) => ops.push(json!({"op": "add", "path": path, "value": v})),
            None if !was_absent(&field) => ops.push(json!({"op": "remove", "path": path})),
            None => {}
        }
    }
    ops
}

#[cfg(test)]
mod tests;
