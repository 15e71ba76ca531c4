//! Turning a stored object into what a client sees: references as URLs (with `#name` when
//! asked), the object's own `url`, and the `fields` / `skip_default` views.

use serde_json::{Map, Value};

use crate::model::{Kind, ObjectSchema, TypeDef};
use crate::refs;
use crate::types::Registry;
use crate::validate::rewrite_refs;

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

/// Renders a stored object (taken by value: rendering rewrites it in place). `name_of` gives the
/// name of a referenced object (canonical form in).
pub fn render(
    reg: &Registry,
    type_def: &TypeDef,
    mut body: Map<String, Value>,
    opts: &RenderOptions<'_>,
    name_of: &dyn Fn(&str) -> Option<String>,
) -> Value {
    let schema = reg.schema_of(type_def);
    let show = |canonical: &str| {
        let name = if opts.include_name { name_of(canonical) } else { None };
        refs::render(opts.base_url, canonical, name.as_deref())
    };
    // A reference that cannot be rendered does not exist: rewriting never fails here.
    let _ = rewrite_refs(reg, schema, &mut body, &mut |_, r| Ok(show(r)));
    if let Some(Value::String(tenant)) = body.get_mut("tenant_ref") {
        *tenant = show(tenant);
    }
    if opts.skip_default {
        strip_defaults(reg, schema, &mut body);
    }
    if let Some(fields) = opts.fields {
        body.retain(|k, _| k == "name" || k == "uuid" || fields.iter().any(|f| f == k));
    }
    let uuid = body.get("uuid").and_then(Value::as_str).unwrap_or_default();
    let name = body.get("name").and_then(Value::as_str);
    let url = refs::render(opts.base_url, &object_path(type_def, uuid), name.filter(|_| opts.include_name));
    let mut out = Map::with_capacity(body.len() + 1);
    out.insert("url".into(), Value::String(url));
    out.extend(body);
    Value::Object(out)
}

fn strip_defaults(reg: &Registry, schema: &ObjectSchema, object: &mut Map<String, Value>) {
    for field in &schema.fields {
        let Some(value) = object.get_mut(field.name) else {
            continue;
        };
        if field.default.as_ref() == Some(value) {
            object.remove(field.name);
            continue;
        }
        if let (Kind::Obj(name), Value::Object(inner)) = (&field.kind, value) {
            strip_defaults(reg, reg.schema(name), inner);
        }
    }
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
            "cloud_ref": "/api/cloud/cloud-1", "default_server_port": 80, "enabled": true});
        let stored = stored.as_object().unwrap().clone();
        let names = |r: &str| Some(format!("name-of:{r}"));
        let plain = render(reg, t, stored.clone(), &RenderOptions { base_url: "https://h:1", ..Default::default() }, &names);
        assert_eq!(plain["url"], "https://h:1/api/pool/pool-1");
        assert_eq!(plain["cloud_ref"], "https://h:1/api/cloud/cloud-1");
        assert_eq!(plain["tenant_ref"], "https://h:1/api/tenant/admin");
        let named = render(
            reg,
            t,
            stored.clone(),
            &RenderOptions { base_url: "https://h:1", include_name: true, ..Default::default() },
            &names,
        );
        assert_eq!(named["url"], "https://h:1/api/pool/pool-1#p");
        assert_eq!(named["cloud_ref"], "https://h:1/api/cloud/cloud-1#name-of:/api/cloud/cloud-1");
        let lean =
            render(reg, t, stored.clone(), &RenderOptions { base_url: "", skip_default: true, ..Default::default() }, &names);
        assert!(lean.get("default_server_port").is_none() && lean.get("enabled").is_none());
        let fields = ["enabled".to_string()];
        let some = render(
            reg,
            t,
            stored.clone(),
            &RenderOptions { base_url: "", fields: Some(&fields), ..Default::default() },
            &names,
        );
        let keys: Vec<_> = some.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["url", "uuid", "name", "enabled"]);
    }
}
