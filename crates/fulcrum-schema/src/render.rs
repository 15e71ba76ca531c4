//! Turning a stored object into what a client sees: references as URLs (with `#name` when
//! asked), the object's own `url`, and the `fields` / `skip_default` views.
//!
//! The JSON text is written straight from the stored object, rewriting references on the way:
//! a pool of thousands of servers is answered without copying it first.

use serde_json::{Map, Value};

use crate::model::{Kind, ListSpec, ObjectSchema, TypeDef};
use crate::refs;
use crate::types::Registry;

/// How a response should show an object.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    /// `https://host:port`, from the request.
    pub base_url: &'a str,
    /// Append `#name` to references (POST/PUT responses, `?include_name`).
    pub include_name: bool,
    /// Leave out fields whose value is their default.
    pub skip_default: bool,
    /// Only these top-level fields (plus `name`, `url`, `uuid`).
    pub fields: Option<&'a [String]>,
}

/// The URL path of an object: `/api/<type>/<uuid>`, or `/api/<type>` for a singleton.
pub fn object_path(type_def: &TypeDef, uuid: &str) -> String {
    if type_def.singleton { format!("/api/{}", type_def.path) } else { refs::canonical(type_def.path, uuid) }
}

/// The `url` of a stored object as a client sees it.
pub fn object_url(type_def: &TypeDef, stored: &Map<String, Value>, opts: &RenderOptions<'_>) -> String {
    let uuid = stored.get("uuid").and_then(Value::as_str).unwrap_or_default();
    let name = stored.get("name").and_then(Value::as_str);
    refs::render(opts.base_url, &object_path(type_def, uuid), name.filter(|_| opts.include_name))
}

/// Hidden fields are kept with an object but never shown (`_password_hash`, `_system_default`).
pub fn is_hidden(key: &str) -> bool {
    key.starts_with('_') && key != "_last_modified"
}

struct Writer<'a> {
    reg: &'a Registry,
    opts: &'a RenderOptions<'a>,
    name_of: &'a dyn Fn(&str) -> Option<String>,
    out: Vec<u8>,
    /// The sub-schemas met so far, by name: a list of 5,000 servers names the same two
    /// sub-schemas 10,000 times, and a linear look-up by address beats hashing the name.
    schemas: Vec<(&'static str, &'a ObjectSchema)>,
}

impl<'a> Writer<'a> {
    fn raw(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
    }

    fn json(&mut self, value: &Value) {
        match value {
            Value::Bool(true) => self.raw("true"),
            Value::Bool(false) => self.raw("false"),
            Value::String(s) => self.string(s),
            _ => serde_json::to_writer(&mut self.out, value).expect("writing JSON to memory cannot fail"),
        }
    }

    fn string(&mut self, text: &str) {
        // Most strings need no escaping (field names, addresses, enum values); copy those whole.
        if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.out.reserve(text.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(text.as_bytes());
            self.out.push(b'"');
        } else {
            serde_json::to_writer(&mut self.out, text).expect("writing JSON to memory cannot fail");
        }
    }

    fn reference(&mut self, canonical: &str) {
        let name = if self.opts.include_name { (self.name_of)(canonical) } else { None };
        let shown = refs::render(self.opts.base_url, canonical, name.as_deref());
        self.string(&shown);
    }

    fn schema(&mut self, name: &'static str) -> &'a ObjectSchema {
        if let Some((_, schema)) = self.schemas.iter().find(|(n, _)| std::ptr::eq(*n, name)) {
            return schema;
        }
        let schema = self.reg.schema(name);
        self.schemas.push((name, schema));
        schema
    }

    fn value(&mut self, kind: &Kind, value: &Value) {
        match (kind, value) {
            (Kind::Ref(_), Value::String(s)) => self.reference(s),
            (Kind::Obj(name), Value::Object(map)) => {
                let schema = self.schema(name);
                self.object(schema, map);
            }
            (Kind::List(spec), Value::Array(items)) => {
                self.raw("[");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.raw(",");
                    }
                    self.value(&spec.item, item);
                }
                self.raw("]");
            }
            _ => self.json(value),
        }
    }

    /// Writes `{...}` of a nested object.
    fn object(&mut self, schema: &ObjectSchema, map: &Map<String, Value>) {
        self.raw("{");
        self.fields(schema, map, None);
        self.raw("}");
    }

    /// Writes an object's fields, each after a comma unless it is the first written (at the top
    /// level, `url` is always written before them). At the top level (`top`: the previous
    /// rendering, the extents found) the object's own fields (`tenant_ref`) and the `fields`
    /// view apply, and each list's entries are placed on record.
    fn fields(&mut self, schema: &ObjectSchema, map: &Map<String, Value>, mut top: Option<&mut TopLevel<'_>>) {
        let mut first = top.is_none();
        // Stored objects keep their schema's field order, so each key's field is found where
        // the search for the previous one ended.
        let mut next_field = 0;
        for (key, value) in map {
            if is_hidden(key) {
                continue;
            }
            if top.is_some()
                && let Some(fields) = self.opts.fields
                && key != "name"
                && key != "uuid"
                && !fields.iter().any(|f| f == key)
            {
                continue;
            }
            let field = schema.field_from(key, &mut next_field);
            if field.is_some_and(|f| f.write_only) {
                continue;
            }
            if self.opts.skip_default && field.is_some_and(|f| f.default.as_ref() == Some(value)) {
                continue;
            }
            if !first {
                self.raw(",");
            }
            first = false;
            self.string(key);
            self.raw(":");
            match (field.map(|f| &f.kind), value, top.as_deref_mut()) {
                (Some(Kind::List(spec)), Value::Array(items), Some(top)) => self.top_list(key, spec, items, top),
                (Some(kind), _, _) => self.value(kind, value),
                (None, Value::String(s), Some(_)) if key == "tenant_ref" => self.reference(s),
                (None, _, _) => self.json(value),
            }
        }
    }

    /// A top-level list, recording where each entry lies if it has [`RECORDED_ENTRIES`] or
    /// more (a short list renders faster than it is recorded); an entry the previous rendering
    /// already holds, unchanged, is copied from it.
    fn top_list(&mut self, key: &str, spec: &ListSpec, items: &[Value], top: &mut TopLevel<'_>) {
        let record = items.len() >= RECORDED_ENTRIES;
        let reused = top.previous.and_then(|p| {
            let origins = p.origins.iter().find(|(k, _)| k == key).map(|(_, o)| o)?;
            let before = p.extents.of(key)?;
            let fits = origins.len() == items.len() && origins.iter().flatten().all(|&i| i < before.len());
            fits.then_some((p.json, origins, before))
        });
        let mut entries = Vec::with_capacity(if record { items.len() } else { 0 });
        self.raw("[");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.raw(",");
            }
            let at = self.out.len();
            match reused.and_then(|(json, origins, before)| Some((json, before[origins[i]?]))) {
                Some((json, (from, to))) => self.out.extend_from_slice(&json[from as usize..to as usize]),
                None => self.value(&spec.item, item),
            }
            if record {
                entries.push((at as u32, self.out.len() as u32));
            }
        }
        self.raw("]");
        if record {
            top.extents.0.push((key.to_string(), entries));
        }
    }
}

/// How long a top-level list must be for its entries' places to be recorded.
const RECORDED_ENTRIES: usize = 16;

/// Where the entries of each long top-level list of an object lie in its rendering (byte
/// ranges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListExtents(Vec<(String, Vec<(u32, u32)>)>);

impl ListExtents {
    /// Each top-level list rendered, with how many entries it had.
    pub fn lists(&self) -> impl Iterator<Item = (&str, usize)> {
        self.0.iter().map(|(k, e)| (k.as_str(), e.len()))
    }

    fn of(&self, list: &str) -> Option<&[(u32, u32)]> {
        self.0.iter().find(|(k, _)| k == list).map(|(_, e)| e.as_slice())
    }
}

/// A rendering of the object's previous version, seen the same way (same view, same names of
/// referenced objects), and how each top-level list's entries relate to it: for each entry now,
/// the entry it was then if the edit left it as it was (`None`: rendered afresh). Lists not
/// named are rendered afresh, and so is everything outside the lists.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub json: &'a [u8],
    pub extents: &'a ListExtents,
    pub origins: &'a [(String, Vec<Option<usize>>)],
}

struct TopLevel<'a> {
    previous: Option<Previous<'a>>,
    extents: ListExtents,
}

/// Renders a stored object as JSON text. `name_of` gives the name of a referenced object
/// (canonical form in).
pub fn render_json(
    reg: &Registry,
    type_def: &TypeDef,
    stored: &Map<String, Value>,
    opts: &RenderOptions<'_>,
    name_of: &dyn Fn(&str) -> Option<String>,
) -> Vec<u8> {
    render_json_from(reg, type_def, stored, opts, name_of, None).0
}

/// [`render_json`], copying what `previous` (the rendering of the version this one was edited
/// from) holds of the entries the edit did not touch, so that a small edit of a big list costs
/// about a copy of the text, not a rendering; and where this rendering's list entries lie, for
/// the next. The text is the same as [`render_json`]'s, byte for byte, as long as `previous`
/// is what it says it is.
pub fn render_json_from(
    reg: &Registry,
    type_def: &TypeDef,
    stored: &Map<String, Value>,
    opts: &RenderOptions<'_>,
    name_of: &dyn Fn(&str) -> Option<String>,
    previous: Option<Previous<'_>>,
) -> (Vec<u8>, ListExtents) {
    let capacity = previous.map_or(256, |p| p.json.len() + 256);
    let mut w = Writer { reg, opts, name_of, out: Vec::with_capacity(capacity), schemas: Vec::new() };
    let url = object_url(type_def, stored, opts);
    w.raw("{\"url\":");
    w.string(&url);
    let mut top = TopLevel { previous, extents: ListExtents::default() };
    w.fields(reg.schema_of(type_def), stored, Some(&mut top));
    w.raw("}");
    (w.out, top.extents)
}

/// Like [`render_json`], as a `Value` (for the few places that need one).
pub fn render(
    reg: &Registry,
    type_def: &TypeDef,
    stored: &Map<String, Value>,
    opts: &RenderOptions<'_>,
    name_of: &dyn Fn(&str) -> Option<String>,
) -> Value {
    serde_json::from_slice(&render_json(reg, type_def, stored, opts, name_of)).expect("rendered JSON parses")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_and_url_render_from_the_request_host() {
        let reg = Registry::get();
        let t = reg.type_def("pool").unwrap();
        let stored = json!({"uuid": "pool-1", "name": "p", "tenant_ref": "/api/tenant/admin",
            "cloud_ref": "/api/cloud/cloud-1", "default_server_port": 80, "enabled": true,
            "health_monitor_refs": ["/api/healthmonitor/hm-1"], "fail_action": {"type": "FAIL_ACTION_CLOSE_CONN"},
            "servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 80, "ratio": 1, "nw_ref": "/api/network/n-1"}],
            "_password_hash": "secret", "_last_modified": "5"});
        let stored = stored.as_object().unwrap();
        let names = |r: &str| Some(format!("name-of:{r}"));
        let plain = render(reg, t, stored, &RenderOptions { base_url: "https://h:1", ..Default::default() }, &names);
        assert_eq!(plain["url"], "https://h:1/api/pool/pool-1");
        assert_eq!(plain["cloud_ref"], "https://h:1/api/cloud/cloud-1");
        assert_eq!(plain["tenant_ref"], "https://h:1/api/tenant/admin");
        assert_eq!(plain["health_monitor_refs"][0], "https://h:1/api/healthmonitor/hm-1");
        assert_eq!(plain["servers"][0]["nw_ref"], "https://h:1/api/network/n-1");
        assert_eq!(plain["_last_modified"], "5");
        assert!(plain.get("_password_hash").is_none());
        let keys: Vec<&String> = plain.as_object().unwrap().keys().take(3).collect();
        assert_eq!(keys, ["url", "uuid", "name"]);
        let named = render(
            reg,
            t,
            stored,
            &RenderOptions { base_url: "https://h:1", include_name: true, ..Default::default() },
            &names,
        );
        assert_eq!(named["url"], "https://h:1/api/pool/pool-1#p");
        assert_eq!(named["cloud_ref"], "https://h:1/api/cloud/cloud-1#name-of:/api/cloud/cloud-1");
        let lean =
            render(reg, t, stored, &RenderOptions { base_url: "", skip_default: true, ..Default::default() }, &names);
        assert!(lean.get("default_server_port").is_none() && lean.get("enabled").is_none());
        assert!(lean["servers"][0].get("ratio").is_none(), "defaults are left out at every depth");
        assert_eq!(lean["fail_action"], json!({}));
        let fields = ["enabled".to_string()];
        let some = render(
            reg,
            t,
            stored,
            &RenderOptions { base_url: "", fields: Some(&fields), ..Default::default() },
            &names,
        );
        let keys: Vec<_> = some.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["url", "uuid", "name", "enabled"]);
        let empty = render(reg, t, &Map::new(), &RenderOptions::default(), &names);
        assert_eq!(empty, json!({"url": "/api/pool/"}));
    }

    fn writer<'a>(opts: &'a RenderOptions<'a>, name_of: &'a dyn Fn(&str) -> Option<String>) -> Writer<'a> {
        Writer { reg: Registry::get(), opts, name_of, out: Vec::new(), schemas: Vec::new() }
    }

    proptest::proptest! {
        /// Strings copied whole are exactly what serde_json writes, escapes and all.
        #[test]
        fn strings_are_written_as_serde_json_writes_them(text in "(?s).{0,40}", other in proptest::char::any()) {
            let opts = RenderOptions::default();
            let mut w = writer(&opts, &|_| None);
            let text = format!("{text}{other}");
            w.string(&text);
            w.json(&Value::String(text.clone()));
            w.json(&Value::Bool(text.len() % 2 == 0));
            let expected = [
                serde_json::to_vec(&text).unwrap(),
                serde_json::to_vec(&text).unwrap(),
                serde_json::to_vec(&(text.len() % 2 == 0)).unwrap(),
            ]
            .concat();
            proptest::prop_assert_eq!(w.out, expected);
        }

        /// Searching from anywhere finds the field a plain search finds.
        #[test]
        fn a_field_is_found_from_any_position(from in 0usize..64, pick in 0usize..64, missing in "[a-z_]{1,12}") {
            let schema = Registry::get().schema("Server");
            let name = schema.fields[pick % schema.fields.len()].name;
            let mut at = from;
            let found = schema.field_from(name, &mut at).map(|f| f.name);
            proptest::prop_assert_eq!(found, Some(name));
            proptest::prop_assert_eq!(schema.fields[at - 1].name, name);
            let mut at = from;
            proptest::prop_assert_eq!(schema.field_from(&missing, &mut at).map(|f| f.name), schema.field(&missing).map(|f| f.name));
        }
    }

    #[test]
    fn fields_out_of_schema_order_render_the_same() {
        let reg = Registry::get();
        let t = reg.type_def("pool").unwrap();
        let stored = json!({"uuid": "pool-1", "name": "p", "cloud_ref": "/api/cloud/cloud-1",
            "servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "port": 80, "nw_ref": "/api/network/n-1", "ratio": 2},
                        {"nw_ref": "/api/network/n-2", "ratio": 3, "port": 81, "ip": {"type": "V4", "addr": "1.1.1.2"}}],
            "health_monitor_refs": ["/api/healthmonitor/hm-1"]});
        let mut reversed = Map::new();
        for (k, v) in stored.as_object().unwrap().iter().rev() {
            reversed.insert(k.clone(), v.clone());
        }
        let opts = RenderOptions { base_url: "https://h:1", include_name: true, ..Default::default() };
        let names = |r: &str| Some(format!("n:{r}"));
        let in_order = render(reg, t, stored.as_object().unwrap(), &opts, &names);
        let out_of_order = render(reg, t, &reversed, &opts, &names);
        assert_eq!(in_order, out_of_order);
        assert_eq!(out_of_order["servers"][1]["nw_ref"], "https://h:1/api/network/n-2#n:/api/network/n-2");
        assert_eq!(
            out_of_order["health_monitor_refs"][0],
            "https://h:1/api/healthmonitor/hm-1#n:/api/healthmonitor/hm-1"
        );
    }
}
