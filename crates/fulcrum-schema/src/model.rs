//! The vocabulary a schema is written in: field kinds, fields, object schemas and API types.
//!
//! A schema is plain data. Validation, defaults, reference handling, PATCH list keys and the
//! OpenAPI document all read the same tables, so nothing about a type is written twice.

use serde_json::{Map, Value};

/// What a field holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Str,
    Int {
        min: i64,
        max: i64,
    },
    Bool,
    Enum(&'static [&'static str]),
    /// A reference to an object of the named API type (`pool`, `tenant`, ...).
    Ref(&'static str),
    /// A nested object described by the named sub-schema.
    Obj(&'static str),
    List(Box<ListSpec>),
    /// Free-form JSON, stored as given.
    Any,
}

/// A list field: what its items are, how many there may be, and what identifies an item.
#[derive(Debug, Clone, PartialEq)]
pub struct ListSpec {
    pub item: Kind,
    pub max: Option<usize>,
    pub key: ListKey,
    /// A key field an entry may leave out, and the field of the parent object whose value it
    /// then takes (a pool server without `port` has the pool's `default_server_port`).
    pub key_defaults: &'static [(&'static str, &'static str)],
}

/// How the entries of a list are told apart (used to reject duplicates and by PATCH).
#[derive(Debug, Clone, PartialEq)]
pub enum ListKey {
    /// Entries have no identity: the list can only be replaced as a whole.
    None,
    /// Scalars and references: an entry is its own key.
    Value,
    /// Objects: the entry is identified by these fields (dotted paths into the entry).
    Fields(&'static [&'static str]),
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Option<Value>,
    pub required: bool,
    /// Set by the controller only: a PUT keeps the stored value, a PATCH that touches it is refused.
    pub read_only: bool,
    /// A secret (a private key): stored and used, never shown; a PUT without it keeps it.
    pub write_only: bool,
    pub description: &'static str,
}

impl Field {
    pub fn new(name: &'static str, kind: Kind) -> Field {
        Field { name, kind, default: None, required: false, read_only: false, write_only: false, description: "" }
    }
    pub fn required(mut self) -> Field {
        self.required = true;
        self
    }
    pub fn default(mut self, value: impl Into<Value>) -> Field {
        self.default = Some(value.into());
        self
    }
    pub fn read_only(mut self) -> Field {
        self.read_only = true;
        self
    }
    pub fn write_only(mut self) -> Field {
        self.write_only = true;
        self
    }
    pub fn describe(mut self, text: &'static str) -> Field {
        self.description = text;
        self
    }
}

/// A check or fill-in that involves more than one field (a server's port defaults to the
/// pool's `default_server_port`). Runs after the fields are checked and defaulted.
pub type Hook = fn(&mut Map<String, Value>) -> Result<(), String>;

/// The part of a [`Hook`] that concerns one entry of one list (the hook is this, for every
/// entry): a PATCH that only touched some entries runs it on those alone.
#[derive(Debug, Clone, Copy)]
pub struct EntryHook {
    pub list: &'static str,
    /// Fills in entry `index` of the list, from the object's other fields.
    pub fill: fn(&mut Map<String, Value>, usize),
}

#[derive(Debug, Clone)]
pub struct ObjectSchema {
    pub name: &'static str,
    pub fields: Vec<Field>,
    pub hook: Option<Hook>,
    /// Set when `hook` only fills in entries of one list.
    pub entry_hook: Option<EntryHook>,
}

impl ObjectSchema {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Like [`field`](Self::field), searching from position `*from` on (wrapping round) and
    /// leaving `*from` just past the match: walking an object's keys in schema order finds each
    /// at once.
    pub fn field_from(&self, name: &str, from: &mut usize) -> Option<&Field> {
        let start = (*from).min(self.fields.len());
        let (before, after) = self.fields.split_at(start);
        let found = after
            .iter()
            .position(|f| f.name == name)
            .map(|i| start + i)
            .or_else(|| before.iter().position(|f| f.name == name));
        let i = found?;
        *from = i + 1;
        Some(&self.fields[i])
    }

    pub fn read_only_fields(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.fields.iter().filter(|f| f.read_only).map(|f| f.name)
    }

    pub fn write_only_fields(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.fields.iter().filter(|f| f.write_only).map(|f| f.name)
    }
}

/// Whether objects of a type belong to a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Global,
}

/// A type served under `/api/<path>`.
#[derive(Debug, Clone)]
pub struct TypeDef {
    /// The path segment and the prefix of generated uuids (`pool` → `pool-<uuid4>`).
    pub path: &'static str,
    /// The object schema's name (`Pool`).
    pub schema: &'static str,
    pub scope: Scope,
    /// Served at `/api/<path>` without a uuid; exactly one object exists.
    pub singleton: bool,
    /// Only the system creates these (for example SEs are created when agents join).
    pub system_created: bool,
}
