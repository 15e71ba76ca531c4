//! The object model of the Avi-compatible API, as data, and the pure functions over it:
//! validation and defaults, references, rendering, OpenAPI.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of HTTP or storage.

pub mod model;
pub mod openapi;
pub mod refs;
pub mod render;
pub mod types;
pub mod validate;

pub use model::{Field, Kind, ListKey, ListSpec, ObjectSchema, Scope, TypeDef};
pub use render::{
    ListExtents, Previous, RenderOptions, is_hidden, object_path, object_url, render, render_json, render_json_from,
};
pub use types::Registry;
pub use validate::{
    SchemaError, check_unique_keys, entry_key, entry_key_with, for_each_ref, normalize, normalize_value, rewrite_refs,
    type_name,
};
