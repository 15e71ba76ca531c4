//! The OpenAPI 3 document, generated from the same tables that validate requests.

use serde_json::{Map, Value, json};

use crate::model::{Kind, ListKey, ObjectSchema};
use crate::types::Registry;

fn kind_schema(kind: &Kind) -> Value {
    match kind {
        Kind::Str => json!({"type": "string"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        Kind::Enum(values) => json!({"type": "string", "enum": values}),
        Kind::Ref(target) => {
            json!({"type": "string", "description": format!("Reference to a {target}: URL, /api/{target}/<uuid>, uuid or /api/{target}?name=<name>.")})
        }
        Kind::Obj(name) => json!({"$ref": format!("#/components/schemas/{name}")}),
        Kind::List(spec) => {
            let mut list = json!({"type": "array", "items": kind_schema(&spec.item)});
            if let Some(max) = spec.max {
                list["maxItems"] = json!(max);
            }
            if let ListKey::Fields(keys) = &spec.key {
                list["x-list-key"] = json!(keys);
            }
            list
        }
        Kind::Any => json!({}),
    }
}

fn object_schema(schema: &ObjectSchema) -> Value {
    let mut properties = Map::new();
    let mut required = vec![];
    for field in &schema.fields {
        let mut prop = kind_schema(&field.kind);
        if let Some(default) = &field.default {
            prop["default"] = default.clone();
        }
        if !field.description.is_empty() {
            prop["description"] = json!(field.description);
        }
        if field.write_only {
            prop["writeOnly"] = json!(true);
        }
        if field.required {
            required.push(field.name);
        }
        properties.insert(field.name.into(), prop);
    }
    let mut out = json!({"type": "object", "properties": properties});
    if !required.is_empty() {
        out["required"] = json!(required);
    }
    out
}

fn identity_fields(reg: &Registry, schema_name: &str) -> Value {
    let mut s = object_schema(reg.schema(schema_name));
    let props = s["properties"].as_object_mut().expect("properties");
    for field in ["uuid", "url", "tenant_ref", "_last_modified"] {
        props.insert(field.into(), json!({"type": "string", "readOnly": true}));
    }
    s
}

/// The name of a type's schema as answers show it: the same fields, none required, since
/// `?fields=` may ask for any of them only.
fn read_schema_name(schema_name: &str) -> String {
    format!("{schema_name}Read")
}

/// The errors an operation may answer, by method: any request may be malformed (400),
/// unauthenticated (401), forbidden (403), aimed at nothing (404) or with a method the path does
/// not take (405), too slow (408), too large (413), throttled (429) or meet a store that cannot
/// commit (503); writes may also conflict (409), fail a precondition (412) or find the disk full
/// (507).
pub fn error_responses(method: &str) -> Map<String, Value> {
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut codes = vec!["400", "401", "403", "404", "405", "408", "413", "429", "503"];
    if !method.eq_ignore_ascii_case("get") {
        codes.extend(["409", "412", "507"]);
    }
    codes.into_iter().map(|c| (c.to_string(), error.clone())).collect()
}

/// `responses` of an operation: its successes and the errors of its method.
pub fn responses(method: &str, successes: Value) -> Value {
    let mut out = error_responses(method);
    if let Value::Object(ok) = successes {
        out.extend(ok);
    }
    Value::Object(out)
}

/// The whole document.
pub fn document(version: &str) -> Value {
    let reg = Registry::get();
    let mut schemas = Map::new();
    for schema in reg.schemas() {
        schemas.insert(schema.name.into(), object_schema(schema));
    }
    for t in reg.types() {
        let whole = identity_fields(reg, t.schema);
        let mut read = whole.clone();
        read.as_object_mut().expect("an object schema").remove("required");
        schemas.insert(t.schema.into(), whole);
        schemas.insert(read_schema_name(t.schema), read);
    }
    schemas.insert("Error".into(), json!({"type": "object", "properties": {"error": {"type": "string"}}}));
    let mut paths = Map::new();
    for t in reg.types() {
        let item_ref = json!({"$ref": format!("#/components/schemas/{}", t.schema)});
        let read_ref = json!({"$ref": format!("#/components/schemas/{}", read_schema_name(t.schema))});
        let one = json!({"description": "OK", "content": {"application/json": {"schema": read_ref}}});
        let body = json!({"required": true, "content": {"application/json": {"schema": item_ref}}});
        // A pool's PATCH in async mode is accepted for a later merge.
        let patched = if t.path == "pool" {
            json!({"200": one, "202": {"description": "Accepted for the next async merge"}})
        } else {
            json!({"200": one})
        };
        if t.singleton {
            paths.insert(
                format!("/api/{}", t.path),
                json!({
                    "get": {"tags": [t.path], "responses": responses("get", json!({"200": one}))},
                    "put": {"tags": [t.path], "requestBody": body, "responses": responses("put", json!({"200": one}))},
                    "patch": {"tags": [t.path], "responses": responses("patch", patched)},
                }),
            );
            continue;
        }
        let list = json!({"description": "OK", "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "next": {"type": "string"}, "results": {"type": "array", "items": read_ref}}
        }}}});
        let params = json!([
            {"name": "name", "in": "query", "schema": {"type": "string"}},
            {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
            {"name": "fields", "in": "query", "schema": {"type": "string"}},
            {"name": "sort", "in": "query", "schema": {"type": "string"}},
            {"name": "include_name", "in": "query", "schema": {"type": "string"}},
            {"name": "skip_default", "in": "query", "schema": {"type": "string"}},
            {"name": "refers_to", "in": "query", "schema": {"type": "string"}},
            {"name": "referred_by", "in": "query", "schema": {"type": "string"}},
        ]);
        let mut collection = json!({"get": {"tags": [t.path], "parameters": params, "responses": responses("get", json!({"200": list}))}});
        if !t.system_created {
            collection["post"] =
                json!({"tags": [t.path], "requestBody": body, "responses": responses("post", json!({"201": one}))});
        }
        paths.insert(format!("/api/{}", t.path), collection);
        let uuid_param = json!([{"name": "uuid", "in": "path", "required": true, "schema": {"type": "string"}}]);
        paths.insert(
            format!("/api/{}/{{uuid}}", t.path),
            json!({
                "parameters": uuid_param,
                "get": {"tags": [t.path], "responses": responses("get", json!({"200": one}))},
                "put": {"tags": [t.path], "requestBody": body, "responses": responses("put", json!({"200": one}))},
                "patch": {"tags": [t.path], "responses": responses("patch", patched)},
                "delete": {"tags": [t.path], "responses": responses("delete", json!({"204": {"description": "Deleted"}}))},
            }),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Fulcrum controller API", "version": version},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sessionid"}
            }
        },
        "security": [{"basic": []}, {"session": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_describes_every_type_with_its_defaults() {
        let doc = super::document("test");
        assert_eq!(doc["components"]["schemas"]["Pool"]["properties"]["default_server_port"]["default"], 80);
        assert_eq!(doc["components"]["schemas"]["Pool"]["properties"]["servers"]["x-list-key"][0], "ip.addr");
        assert!(doc["paths"]["/api/pool/{uuid}"]["delete"].is_object());
        assert!(doc["paths"]["/api/systemconfiguration"]["put"].is_object());
        assert!(doc["paths"]["/api/serviceengine"]["post"].is_null());
        // Answers may be partial (`?fields=`): their schema requires nothing; requests do.
        assert!(doc["components"]["schemas"]["PoolRead"]["required"].is_null());
        assert_eq!(doc["components"]["schemas"]["Pool"]["required"][0], "name");
        let put = &doc["paths"]["/api/pool/{uuid}"]["put"]["responses"];
        for code in ["400", "401", "403", "404", "409", "412", "413", "429", "507"] {
            assert!(put[code].is_object(), "PUT documents {code}");
        }
        assert!(doc["paths"]["/api/pool"]["get"]["responses"]["409"].is_null(), "a read does not conflict");
    }
}
