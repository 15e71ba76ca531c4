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

/// The whole document.
pub fn document(version: &str) -> Value {
    let reg = Registry::get();
    let mut schemas = Map::new();
    for schema in reg.schemas() {
        schemas.insert(schema.name.into(), object_schema(schema));
    }
    for t in reg.types() {
        schemas.insert(t.schema.into(), identity_fields(reg, t.schema));
    }
    let error = json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    schemas.insert("Error".into(), json!({"type": "object", "properties": {"error": {"type": "string"}}}));
    let mut paths = Map::new();
    for t in reg.types() {
        let item_ref = json!({"$ref": format!("#/components/schemas/{}", t.schema)});
        let one = json!({"description": "OK", "content": {"application/json": {"schema": item_ref}}});
        let body = json!({"required": true, "content": {"application/json": {"schema": item_ref}}});
        if t.singleton {
            paths.insert(
                format!("/api/{}", t.path),
                json!({
                    "get": {"tags": [t.path], "responses": {"200": one, "401": error}},
                    "put": {"tags": [t.path], "requestBody": body, "responses": {"200": one, "400": error}},
                    "patch": {"tags": [t.path], "responses": {"200": one, "400": error}},
                }),
            );
            continue;
        }
        let list = json!({"description": "OK", "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "next": {"type": "string"}, "results": {"type": "array", "items": item_ref}}
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
        let mut collection =
            json!({"get": {"tags": [t.path], "parameters": params, "responses": {"200": list, "401": error}}});
        if !t.system_created {
            collection["post"] =
                json!({"tags": [t.path], "requestBody": body, "responses": {"201": one, "400": error, "409": error}});
        }
        paths.insert(format!("/api/{}", t.path), collection);
        let uuid_param = json!([{"name": "uuid", "in": "path", "required": true, "schema": {"type": "string"}}]);
        paths.insert(
            format!("/api/{}/{{uuid}}", t.path),
            json!({
                "parameters": uuid_param,
                "get": {"tags": [t.path], "responses": {"200": one, "404": error}},
                "put": {"tags": [t.path], "requestBody": body, "responses": {"200": one, "400": error, "412": error}},
                "patch": {"tags": [t.path], "responses": {"200": one, "400": error}},
                "delete": {"tags": [t.path], "responses": {"204": {"description": "Deleted"}, "409": error}},
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
    }
}
