//! The generic object API: list, get, create, replace and delete any type in the schema.
//!
//! A write reads in one breath: check access → parse and validate (pure, schema) → in the
//! writer: resolve references, check uniqueness, store → render the stored object.

use std::cmp::Ordering;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fulcrum_schema::{
    ListExtents, Previous, Registry, RenderOptions, Scope, TypeDef, for_each_ref, is_hidden, normalize, object_path,
    object_url, refs, render_json_from, rewrite_refs,
};
use fulcrum_store::{Catalogue, Indexer, Meta, Stored, Txn};
use serde_json::{Map, Value, json};

use crate::access::{self, ADMIN_TENANT, Level, TenantScope};
use crate::app::{App, RequestContext};
use crate::auth::hash_password;
use crate::error::ApiError;

pub const MAX_PAGE_SIZE: usize = 200;
pub const DEFAULT_PAGE_SIZE: usize = 25;

/// How the catalogue indexes an object: its tenant, name and references (tenant_ref included,
/// so a tenant that still holds objects cannot be deleted).
pub fn indexer() -> Indexer {
    Arc::new(|kind: &str, value: &Value| {
        let reg = Registry::get();
        let mut meta = Meta {
            tenant: String::new(),
            name: value.get("name").and_then(Value::as_str).map(String::from),
            refs: Vec::new(),
        };
        if let Some(tenant) = value.get("tenant_ref").and_then(Value::as_str) {
            meta.tenant = refs::split_canonical(tenant).map(|(_, u)| u.to_string()).unwrap_or_default();
            meta.refs.push(tenant.to_string());
        }
        if let (Some(t), Some(map)) = (reg.type_def(kind), value.as_object()) {
            for_each_ref(reg, reg.schema_of(t), map, &mut |_, r| {
                if refs::split_canonical(r).is_some() && !meta.refs.iter().any(|x| x == r) {
                    meta.refs.push(r.to_string());
                }
            });
        }
        meta
    })
}

/// The tenant whose names an object of this type lives among ("" for global types).
fn name_scope<'a>(type_def: &TypeDef, tenant: &'a str) -> &'a str {
    if type_def.scope == Scope::Global { "" } else { tenant }
}

fn visible(ctx: &RequestContext, type_def: &TypeDef, stored: &Stored) -> bool {
    match (type_def.scope, &ctx.scope) {
        (Scope::Global, _) if type_def.path == "tenant" => ctx.principal.can_enter(&stored.uuid),
        (Scope::Global, _) => true,
        (Scope::Tenant, TenantScope::One(t)) => stored.meta.tenant == *t,
        (Scope::Tenant, TenantScope::All) => ctx.principal.level(&stored.meta.tenant, type_def.path) >= Level::Read,
    }
}

/// The object `uuid` of a type if this request may see it, else 404.
pub(crate) fn find_visible<'a>(
    cat: &'a Catalogue,
    ctx: &RequestContext,
    type_def: &TypeDef,
    uuid: &str,
) -> Result<&'a Arc<Stored>, ApiError> {
    cat.get(type_def.path, uuid).filter(|s| visible(ctx, type_def, s)).ok_or_else(|| not_found(type_def, uuid))
}

/// Refuses the request unless the caller has `needed` access to the type in the request's tenant.
pub fn require(ctx: &RequestContext, type_def: &TypeDef, needed: Level) -> Result<(), ApiError> {
    let tenant = match (type_def.scope, type_def.path) {
        // Tenants, system settings and the cluster are readable by every user...
        (Scope::Global, "tenant" | "systemconfiguration" | "controllerproperties" | "cluster")
            if needed == Level::Read =>
        {
            return Ok(());
        }
        // ...and otherwise governed by the user's rights in the admin tenant.
        (Scope::Global, _) => ADMIN_TENANT,
        (Scope::Tenant, _) => match &ctx.scope {
            TenantScope::One(t) => t.as_str(),
            TenantScope::All if needed == Level::Read => return Ok(()),
            TenantScope::All => return Err(ctx.scope.for_write().unwrap_err()),
        },
    };
    if ctx.principal.level(tenant, type_def.path) >= needed {
        Ok(())
    } else {
        let what = if needed == Level::Write { "write" } else { "read" };
        Err(ApiError::forbidden(format!(
            "User '{}' may not {what} {} objects in this tenant",
            ctx.principal.username, type_def.path
        )))
    }
}

/// The request's view options (`fields`, `skip_default`, `include_name`).
fn view_fields(ctx: &RequestContext) -> Option<Vec<String>> {
    ctx.param("fields").map(|f| f.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

fn view<'a>(ctx: &'a RequestContext, fields: Option<&'a [String]>, include_name: bool) -> RenderOptions<'a> {
    RenderOptions {
        base_url: &ctx.base_url,
        include_name: include_name || ctx.has_param("include_name"),
        skip_default: ctx.param("skip_default").is_some_and(|v| v != "false"),
        fields,
    }
}

/// An object as JSON text, the way the request asked to see it.
fn render_one(
    ctx: &RequestContext,
    cat: &Catalogue,
    type_def: &TypeDef,
    stored: &Stored,
    include_name: bool,
) -> Vec<u8> {
    render_one_from(ctx, cat, type_def, stored, include_name, None).0
}

/// [`render_one`], from the rendering of the version `stored` was edited from when there is one
/// (see [`render_json_from`]), and where its list entries lie.
fn render_one_from(
    ctx: &RequestContext,
    cat: &Catalogue,
    type_def: &TypeDef,
    stored: &Stored,
    include_name: bool,
    previous: Option<Previous<'_>>,
) -> (Vec<u8>, ListExtents) {
    let fields = view_fields(ctx);
    let opts = view(ctx, fields.as_deref(), include_name);
    let empty = Map::new();
    let map = stored.value.as_object().unwrap_or(&empty);
    let name_of = |r: &str| cat.get_path(r).and_then(|s| s.meta.name.clone());
    render_json_from(Registry::get(), type_def, map, &opts, &name_of, previous)
}

/// The shared rendering of `stored` (see [`SharedRenders`]) for `ctx`'s view.
fn render_shared(
    app: &App,
    ctx: &RequestContext,
    cat: &Catalogue,
    type_def: &TypeDef,
    stored: &Arc<Stored>,
    include_name: bool,
) -> bytes::Bytes {
    app.renders.render(cat, stored, view_key(ctx, include_name), |previous| {
        render_one_from(ctx, cat, type_def, stored, include_name, previous)
    })
}

/// Whether an object is big enough for GETs to share its rendering: a list of this many
/// entries takes longer to render than the sharing costs.
fn worth_sharing(stored: &Stored) -> bool {
    const ENTRIES: usize = 64;
    stored.value.as_object().is_some_and(|m| m.values().any(|v| v.as_array().is_some_and(|a| a.len() >= ENTRIES)))
}

/// What a request's view of an object depends on besides the object: the same key, the same
/// bytes.
fn view_key(ctx: &RequestContext, include_name: bool) -> String {
    let opts = view(ctx, None, include_name);
    format!("{}|{}|{}|{:?}", opts.base_url, opts.include_name, opts.skip_default, view_fields(ctx))
}

pub static SHARED_RENDERS: fulcrum_metrics::Counter = fulcrum_metrics::Counter::new(
    "fulcrum_shared_renders_total",
    "Answers of object writes and GETs of big objects by whether their rendering was made for them, made from the rendering of the version before, or shared with others of the same version.",
    &["outcome"],
);

/// Renderings shared by answers that show the same version of an object the same way: every
/// PATCH of one group commit answers the same committed object, so a big pool is rendered once
/// per commit, not once per PATCH, and GETs share it until it changes. Keyed by the
/// catalogue's generation (any change, a rename of a referenced object included, moves it), so
/// a shared rendering is never stale. A version that an edit made is rendered from the kept
/// rendering of the version before (same view, no name changed since), re-rendering only the
/// list entries the edit touched: a PATCH of one server of 5,000 costs a copy of the text.
#[derive(Debug, Default)]
pub struct SharedRenders {
    /// The latest renderings, at most [`SHARED_RENDERINGS`]: the answers of one commit arrive
    /// together, in a few views (one per node a client asked through), while the next commit's
    /// may already be arriving.
    entries: std::sync::Mutex<Vec<SharedRender>>,
}

const SHARED_RENDERINGS: usize = 16;

/// How many edits back a rendering may be made from.
const LINEAGE_STEPS: usize = 8;

/// A rendering's text and where its list entries lie in it.
type Made = (bytes::Bytes, ListExtents);
type Rendering = Arc<std::sync::OnceLock<Made>>;

#[derive(Debug)]
struct SharedRender {
    generation: u64,
    names_generation: u64,
    /// Held weakly: the allocation (so its address) stays while the entry lives, the object's
    /// memory does not.
    object: std::sync::Weak<Stored>,
    view: String,
    rendering: Rendering,
}

impl SharedRenders {
    /// The rendering of `stored` as of `cat` seen through `view`: made by the first caller (the
    /// others wait for it), then shared.
    fn render(
        &self,
        cat: &Catalogue,
        stored: &Arc<Stored>,
        view: String,
        render: impl FnOnce(Option<Previous<'_>>) -> (Vec<u8>, ListExtents),
    ) -> bytes::Bytes {
        let (generation, names_generation) = (cat.generation(), cat.names_generation());
        let (cell, previous) = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let found = entries.iter().find(|e| {
                e.generation == generation && std::ptr::eq(e.object.as_ptr(), Arc::as_ptr(stored)) && e.view == view
            });
            match found {
                Some(e) => (e.rendering.clone(), None),
                None => {
                    let previous = closest_rendered(&entries, cat, stored, &view, names_generation);
                    if entries.len() >= SHARED_RENDERINGS
                        && let Some(oldest) =
                            entries.iter().enumerate().min_by_key(|(_, e)| e.generation).map(|(i, _)| i)
                    {
                        entries.swap_remove(oldest);
                    }
                    let cell = Rendering::default();
                    entries.push(SharedRender {
                        generation,
                        names_generation,
                        object: Arc::downgrade(stored),
                        view,
                        rendering: cell.clone(),
                    });
                    (cell, previous)
                }
            }
        };
        let mut outcome = "shared";
        let (bytes, _) = cell.get_or_init(|| {
            let before = previous.as_ref().and_then(|(cell, since)| Some((made_soon(cell)?, since)));
            let origins: Vec<(String, Vec<Option<usize>>)> = before.map_or_else(Vec::new, |((_, extents), since)| {
                extents
                    .lists()
                    .filter_map(|(list, len)| {
                        Some((list.to_string(), fulcrum_jsonpatch::list_origins(since, list, len)?))
                    })
                    .collect()
            });
            let made = match before {
                Some(((json, extents), _)) if !origins.is_empty() => {
                    outcome = "from_previous";
                    render(Some(Previous { json, extents, origins: &origins }))
                }
                _ => {
                    outcome = "made";
                    render(None)
                }
            };
            (bytes::Bytes::from(made.0), made.1)
        });
        SHARED_RENDERS.add(&[outcome], 1);
        bytes.clone()
    }
}

/// The closest earlier version of `stored` with a rendering in `view` among `entries`, and the
/// edits since: a version whose answers were all given after the next commit was never
/// rendered, so look past it (up to [`LINEAGE_STEPS`] edits back).
fn closest_rendered(
    entries: &[SharedRender],
    cat: &Catalogue,
    stored: &Arc<Stored>,
    view: &str,
    names_generation: u64,
) -> Option<(Rendering, Vec<Value>)> {
    let mut edits: Vec<&[Value]> = Vec::new();
    let mut at = cat.lineage(Arc::as_ptr(stored));
    while let Some(lineage) = at
        && edits.len() < LINEAGE_STEPS
    {
        edits.push(&lineage.edits);
        let kept = entries.iter().find(|e| {
            std::ptr::eq(e.object.as_ptr(), lineage.from.as_ptr())
                && e.view == view
                && e.names_generation == names_generation
        });
        if let Some(e) = kept {
            let since = edits.iter().rev().flat_map(|e| e.iter().cloned()).collect();
            return Some((e.rendering.clone(), since));
        }
        at = cat.lineage(lineage.from.as_ptr());
    }
    None
}

/// A rendering another answer is making: the version before's, which the answers of the last
/// commit may still be making while this commit's arrive. Worth a short wait (copying from it
/// takes a fraction of rendering afresh); not an unbounded one (its maker may have failed).
fn made_soon(cell: &std::sync::OnceLock<Made>) -> Option<&Made> {
    const TRIES: u32 = 100;
    for _ in 0..TRIES {
        if let Some(made) = cell.get() {
            return Some(made);
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    cell.get()
}

fn bytes_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let body: axum::body::Body = body.into();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("request body is empty; expected a JSON object"));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    Ok(value)
}

fn not_found(type_def: &TypeDef, uuid: &str) -> ApiError {
    ApiError::not_found(format!("{} '{uuid}' not found", type_def.path))
}

fn sort_key<'a>(stored: &'a Stored, field: &str) -> Option<&'a Value> {
    stored.value.get(field)
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().partial_cmp(&y.as_f64()).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// `type:uuid` (as in `refers_to=pool:pool-1`) to a canonical path.
fn type_uuid_param(ctx: &RequestContext, name: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = ctx.param(name) else {
        return Ok(None);
    };
    let (kind, uuid) = value
        .split_once(':')
        .filter(|(k, u)| !k.is_empty() && !u.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("{name} must be <type>:<uuid>, got '{value}'")))?;
    Ok(Some(refs::canonical(kind, uuid)))
}

fn page_param(ctx: &RequestContext, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
    match ctx.param(name) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("{name} must be an integer from 1 to {max}, got '{v}'"))),
        },
    }
}

/// One page of a collection as a list request's parameters select it.
struct Page<'c> {
    count: usize,
    items: Vec<&'c Arc<Stored>>,
    /// The next page's URL, when there is one.
    next: Option<String>,
}

/// Filters, sorts and pages a collection by the request's parameters (`name`, `name.contains`,
/// `refers_to`, `sort`, `page`, …); `path` is the collection's own path, for `next`.
fn select_page<'c>(
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    cat: &'c Catalogue,
    path: &str,
) -> Result<Page<'c>, ApiError> {
    let page_size = page_param(ctx, "page_size", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
    let page = page_param(ctx, "page", 1, usize::MAX)?;
    let refers_to = type_uuid_param(ctx, "refers_to")?;
    let referred_by = type_uuid_param(ctx, "referred_by")?;
    let names_in: Option<Vec<&str>> = ctx.param("name.in").map(|v| v.split(',').collect());
    let uuids_in: Option<Vec<&str>> = ctx.param("uuid.in").map(|v| v.split(',').collect());
    let contains = ctx.param("name.contains");
    let icontains = ctx.param("name.icontains").map(str::to_lowercase);
    let referred_by_refs: Option<Vec<String>> =
        referred_by.as_ref().map(|p| cat.get_path(p).map(|s| s.meta.refs.clone()).unwrap_or_default());
    let matches: Vec<&Arc<Stored>> = cat
        .iter(type_def.path)
        .filter(|s| visible(ctx, type_def, s))
        .filter(|s| {
            let name = s.meta.name.as_deref().unwrap_or_default();
            ctx.param("name").is_none_or(|n| n == name)
                && contains.is_none_or(|c| name.contains(c))
                && icontains.as_deref().is_none_or(|c| name.to_lowercase().contains(c))
                && names_in.as_ref().is_none_or(|ns| ns.contains(&name))
                && uuids_in.as_ref().is_none_or(|us| us.contains(&s.uuid.as_str()))
                && refers_to.as_ref().is_none_or(|target| s.meta.refs.contains(target))
                && referred_by_refs.as_ref().is_none_or(|refs| refs.contains(&s.path()))
        })
        .collect();
    let sort = ctx.param("sort").unwrap_or("name");
    let (field, descending) = match sort.strip_prefix('-') {
        Some(f) => (f, true),
        None => (sort, false),
    };
    let count = matches.len();
    let start = (page - 1).saturating_mul(page_size).min(count);
    let end = (start + page_size).min(count);
    let next = (end < count).then(|| ctx.url_with_params(path, &[("page", (page + 1).to_string())]));
    // Each object's sort key is looked up once, not at every comparison.
    let keyed = matches.into_iter().map(|s| (sort_key(s, field), s)).collect();
    let items = page_in_order(keyed, start..end, |(ka, a), (kb, b)| {
        let o = compare(*ka, *kb).then_with(|| a.uuid.cmp(&b.uuid));
        if descending { o.reverse() } else { o }
    });
    Ok(Page { count, items: items.into_iter().map(|(_, s)| s).collect(), next })
}

/// The entries at `range` of `items` as if sorted by `order` (a total order), without sorting
/// what comes after the range: a first page of a large collection costs a linear pass and a
/// sort of the page, not a sort of the whole collection.
fn page_in_order<T>(mut items: Vec<T>, range: std::ops::Range<usize>, order: impl Fn(&T, &T) -> Ordering) -> Vec<T> {
    if range.end < items.len() {
        // Moves the `range.end` first entries before the rest, in no particular order.
        items.select_nth_unstable_by(range.end, &order);
        items.truncate(range.end);
    }
    items.sort_unstable_by(&order);
    items.drain(..range.start.min(items.len()));
    items
}

/// `{"count", "results": [...], "next"}` around already rendered results.
fn page_body(page: &Page<'_>, results: impl Iterator<Item = Vec<u8>>) -> Response {
    let mut body = format!("{{\"count\":{},\"results\":[", page.count).into_bytes();
    for (i, result) in results.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend(result);
    }
    body.push(b']');
    if let Some(next) = &page.next {
        body.extend(format!(",\"next\":{}", Value::from(next.as_str())).into_bytes());
    }
    body.push(b'}');
    bytes_response(StatusCode::OK, body)
}

pub fn list(app: &App, ctx: &RequestContext, type_def: &'static TypeDef) -> Result<Response, ApiError> {
    require(ctx, type_def, Level::Read)?;
    let cat = app.store.read();
    let page = select_page(ctx, type_def, &cat, &format!("/api/{}", type_def.path))?;
    let results = page
        .items
        .iter()
        .map(|stored| render_one(ctx, &cat, type_def, &with_live_fields(app, type_def, stored), false));
    Ok(page_body(&page, results))
}

/// `GET /api/virtualservice-inventory`: a page of virtual services, each as
/// `{uuid, config, runtime}` (its configuration and where it runs), the product's inventory
/// view; the list parameters of `/api/virtualservice` apply.
pub fn vs_inventory(app: &App, ctx: &RequestContext) -> Result<Response, ApiError> {
    let type_def = Registry::get().type_def(crate::engines::VS_KIND).expect("virtualservice is defined");
    require(ctx, type_def, Level::Read)?;
    let cat = app.store.read();
    let page = select_page(ctx, type_def, &cat, "/api/virtualservice-inventory")?;
    let results = page.items.iter().map(|stored| {
        let config = render_one(ctx, &cat, type_def, stored, false);
        let runtime = crate::engines::runtime_of(app, ctx, &cat, stored);
        let mut item = format!("{{\"uuid\":{},\"config\":", Value::String(stored.uuid.clone())).into_bytes();
        item.extend_from_slice(&config);
        item.extend(format!(",\"runtime\":{runtime}}}").into_bytes());
        item
    });
    Ok(page_body(&page, results))
}

/// The uuid of a singleton (there is exactly one, created at first start).
pub fn singleton_uuid(app: &App, type_def: &TypeDef) -> Result<String, ApiError> {
    app.store
        .read()
        .iter(type_def.path)
        .next()
        .map(|s| s.uuid.clone())
        .ok_or_else(|| ApiError::internal(format!("{} is missing", type_def.path)))
}

pub fn get(app: &App, ctx: &RequestContext, type_def: &'static TypeDef, uuid: &str) -> Result<Response, ApiError> {
    require(ctx, type_def, Level::Read)?;
    let cat = app.store.read();
    let stored = find_visible(&cat, ctx, type_def, uuid)?;
    if type_def.path != crate::engines::SE_KIND && worth_sharing(stored) {
        return Ok(bytes_response(StatusCode::OK, render_shared(app, ctx, &cat, type_def, stored, false)));
    }
    let shown = with_live_fields(app, type_def, stored);
    Ok(bytes_response(StatusCode::OK, render_one(ctx, &cat, type_def, &shown, false)))
}

/// A service engine as shown: its record with what its last heartbeat said over it.
fn with_live_fields(app: &App, type_def: &TypeDef, stored: &Arc<Stored>) -> Arc<Stored> {
    if type_def.path != crate::engines::SE_KIND {
        return stored.clone();
    }
    let mut value = stored.value.clone();
    if let Some(map) = value.as_object_mut() {
        map.extend(app.engines.live_fields(&stored.uuid));
    }
    Arc::new(Stored { kind: stored.kind.clone(), uuid: stored.uuid.clone(), value, meta: stored.meta.clone() })
}

/// Resolves one reference against what the writer sees: a by-name reference becomes a uuid,
/// and the target must exist and be visible from `tenant` (its own objects, the admin tenant's,
/// or global ones).
fn resolve_ref(txn: &Txn<'_>, tenant: &str, kind: &'static str, reference: &str) -> Result<String, String> {
    let reg = Registry::get();
    if let Some((k, uuid)) = refs::split_canonical(reference) {
        let reachable =
            |s: &Stored| s.meta.tenant.is_empty() || s.meta.tenant == tenant || s.meta.tenant == ADMIN_TENANT;
        return match txn.get(k, uuid) {
            Some(s) if reachable(&s) => Ok(reference.to_string()),
            _ => Err(format!("{kind} '{uuid}' not found")),
        };
    }
    let refs::RefTarget::Name { name, .. } = refs::parse(kind, reference)? else {
        unreachable!("uuid references are canonical")
    };
    let global = reg.type_def(kind).is_some_and(|t| t.scope == Scope::Global);
    let scopes: &[&str] = if global { &[""] } else { &[tenant, ADMIN_TENANT] };
    scopes
        .iter()
        .find_map(|t| txn.find_by_name(kind, t, &name))
        .map(|s| refs::canonical(kind, &s.uuid))
        .ok_or_else(|| format!("{kind} '{name}' not found"))
}

/// Resolves every reference of `body` (see [`resolve_ref`]).
fn resolve_refs(
    txn: &Txn<'_>,
    type_def: &TypeDef,
    body: &mut Map<String, Value>,
    tenant: &str,
) -> Result<(), ApiError> {
    let reg = Registry::get();
    rewrite_refs(reg, reg.schema_of(type_def), body, &mut |kind, reference| resolve_ref(txn, tenant, kind, reference))
        .map_err(ApiError::from)
}

/// A name must say something (an empty one cannot be referred to by name) and be unique in its
/// tenant.
fn check_name(
    txn: &Txn<'_>,
    type_def: &TypeDef,
    tenant: &str,
    body: &Map<String, Value>,
    uuid: &str,
) -> Result<(), ApiError> {
    let Some(name) = body.get("name").and_then(Value::as_str) else {
        return Ok(());
    };
    if name.trim().is_empty() {
        return Err(ApiError::bad_request("field 'name': must not be empty"));
    }
    match txn.find_by_name(type_def.path, name_scope(type_def, tenant), name) {
        Some(other) if other.uuid != uuid => Err(ApiError::conflict(format!(
            "{} with name '{name}' already exists in this tenant ({})",
            type_def.path, other.uuid
        ))),
        _ => Ok(()),
    }
}

/// Lays out a stored object: uuid, configuration, tenant_ref, hidden fields, _last_modified.
fn assemble(
    type_def: &TypeDef,
    uuid: &str,
    config: Map<String, Value>,
    tenant: &str,
    hidden: Map<String, Value>,
    stamp: u64,
) -> Value {
    let mut out = Map::with_capacity(config.len() + 4);
    out.insert("uuid".into(), json!(uuid));
    out.extend(config);
    if type_def.scope == Scope::Tenant {
        out.insert("tenant_ref".into(), json!(refs::canonical("tenant", tenant)));
    }
    out.extend(hidden);
    out.insert("_last_modified".into(), json!(stamp.to_string()));
    Value::Object(out)
}

/// The stored form of an object's normalized configuration under `uuid`: resolves its
/// references, checks its name is unique in its tenant, stamps `_last_modified`.
fn prepare_object(
    txn: &mut Txn<'_>,
    type_def: &TypeDef,
    uuid: &str,
    mut config: Map<String, Value>,
    tenant: &str,
    hidden: Map<String, Value>,
) -> Result<Value, ApiError> {
    if type_def.path == "user" && !config.contains_key("username") {
        let name = config.get("name").cloned().unwrap_or_default();
        config.insert("username".into(), name);
    }
    resolve_refs(txn, type_def, &mut config, tenant)?;
    check_name(txn, type_def, tenant, &config, uuid)?;
    let stamp = txn.timestamp_micros();
    Ok(assemble(type_def, uuid, config, tenant, hidden, stamp))
}

/// Stores an object whole (create or replace); see [`prepare_object`].
pub(crate) fn store_object(
    txn: &mut Txn<'_>,
    type_def: &TypeDef,
    uuid: &str,
    config: Map<String, Value>,
    tenant: &str,
    hidden: Map<String, Value>,
) -> Result<Arc<Stored>, ApiError> {
    let mut config = config;
    keep_membership(txn, type_def.path, uuid, &mut config)?;
    let value = prepare_object(txn, type_def, uuid, config, tenant, hidden)?;
    guard_administration(txn, type_def.path, uuid, Some(&value))?;
    Ok(txn.put(type_def.path, uuid, value))
}

const MEMBERSHIP_FIXED: &str = "field 'nodes': the cluster's nodes are the controllers that joined it \
     (fulcrum serve --etcd ... --node-name ...), and cannot be edited";

/// The cluster object's `nodes` are the controllers that joined: a PUT without them keeps them,
/// one that changes them is refused (the leader keeps them up to date itself).
fn keep_membership(txn: &Txn<'_>, kind: &str, uuid: &str, config: &mut Map<String, Value>) -> Result<(), ApiError> {
    let Some(existing) = txn.get(kind, uuid).filter(|_| kind == "cluster") else { return Ok(()) };
    let Some(nodes) = existing.value.get("nodes") else { return Ok(()) };
    match config.get("nodes") {
        None => {
            config.insert("nodes".into(), nodes.clone());
            Ok(())
        }
        Some(given) if given == nodes => Ok(()),
        Some(_) => Err(ApiError::bad_request(MEMBERSHIP_FIXED)),
    }
}

/// Writes to users and roles must not lock administrators out: a write that would leave no
/// active user with full rights everywhere (as `admin` has through System-Admin) is refused, and
/// the built-in roles keep their privileges. `changed` is the object's new body (`None`: it is
/// being deleted); the check runs inside the write, so concurrent writes cannot slip past it.
fn guard_administration(txn: &Txn<'_>, kind: &str, uuid: &str, changed: Option<&Value>) -> Result<(), ApiError> {
    if kind != "user" && kind != "role" {
        return Ok(());
    }
    let existing = txn.get(kind, uuid);
    if kind == "role"
        && let Some(role) = existing.as_deref().filter(|r| r.value.get("_system_default") == Some(&json!(true)))
        && changed.map(|c| c.get("privileges")) != Some(role.value.get("privileges"))
    {
        return Err(ApiError::conflict(format!(
            "role '{}' is built in: its privileges cannot be changed and it cannot be deleted; \
             create a role of your own instead",
            role.meta.name.as_deref().unwrap_or(uuid)
        )));
    }
    let users = txn.list("user");
    let role_now = |r: &str| txn.get_path(r).map(|s| s.value.clone());
    let before = access::someone_administers(users.iter().map(|u| &u.value), &role_now);
    let after_users = users
        .iter()
        .filter(|u| !(kind == "user" && u.uuid == uuid))
        .map(|u| &u.value)
        .chain(changed.filter(|_| kind == "user"));
    let role_after = |r: &str| {
        if kind == "role" && r.rsplit('/').next() == Some(uuid) { changed.cloned() } else { role_now(r) }
    };
    if before && !access::someone_administers(after_users, &role_after) {
        return Err(ApiError::conflict(
            "this change would leave no active user with full administrative rights (a role with \
             WRITE_ACCESS to every resource, in all tenants); keep at least one such user",
        ));
    }
    Ok(())
}

fn hidden_of(stored: &Stored) -> Map<String, Value> {
    stored
        .value
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| is_hidden(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn new_uuid(type_def: &TypeDef, ctx: &RequestContext) -> Result<String, ApiError> {
    match ctx.header("slug") {
        Some(slug) if slug.is_empty() || slug.len() > 200 || slug.contains(['/', '?', '#', ' ']) => {
            Err(ApiError::bad_request(format!("Slug '{slug}' is not a valid uuid")))
        }
        Some(slug) => Ok(slug.to_string()),
        None => Ok(format!("{}-{}", type_def.path, uuid::Uuid::new_v4())),
    }
}

/// Fields only some types have: a user's password becomes a hidden hash.
fn hidden_fields(type_def: &TypeDef, input: &Value, creating: bool) -> Result<Map<String, Value>, ApiError> {
    let mut hidden = Map::new();
    if type_def.path == "user" {
        match input.get("password").and_then(Value::as_str) {
            Some(p) if p.len() >= 8 => {
                hidden.insert("_password_hash".into(), json!(hash_password(p)));
            }
            Some(_) => {
                return Err(ApiError::bad_request("field 'password': must be at least 8 characters"));
            }
            None if creating => return Err(ApiError::bad_request("field 'password': is required")),
            None => {}
        }
    }
    Ok(hidden)
}

pub async fn create(
    app: &App,
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    body: &[u8],
) -> Result<Response, ApiError> {
    if type_def.singleton || type_def.system_created {
        return Err(ApiError::method_not_allowed("POST"));
    }
    require(ctx, type_def, Level::Write)?;
    let input = parse_body(body)?;
    let reg = Registry::get();
    let config = normalize(reg, reg.schema_of(type_def), &input)?;
    let hidden = hidden_fields(type_def, &input, true)?;
    let tenant = ctx.scope.for_write()?.to_string();
    let uuid = if type_def.path == "tenant" && ctx.header("slug").is_none() {
        format!("tenant-{}", uuid::Uuid::new_v4())
    } else {
        new_uuid(type_def, ctx)?
    };
    let stored = app
        .store
        .write(move |txn| {
            if txn.get(type_def.path, &uuid).is_some() {
                return Err(ApiError::conflict(format!("{} with uuid '{uuid}' already exists", type_def.path)));
            }
            store_object(txn, type_def, &uuid, config, &tenant, hidden)
        })
        .await?;
    let cat = app.store.read();
    Ok(render_created(ctx, &cat, type_def, &stored))
}

/// 201 with a new object and its Location.
pub(crate) fn render_created(ctx: &RequestContext, cat: &Catalogue, type_def: &TypeDef, stored: &Stored) -> Response {
    let mut response = bytes_response(StatusCode::CREATED, render_one(ctx, cat, type_def, stored, true));
    let url = stored.value.as_object().map(|m| object_url(type_def, m, &view(ctx, None, true))).unwrap_or_default();
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn last_modified(value: &Value) -> Option<u64> {
    match value.get("_last_modified")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

pub async fn replace(
    app: &App,
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    uuid: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    require(ctx, type_def, Level::Write)?;
    {
        let cat = app.store.read();
        let existing = find_visible(&cat, ctx, type_def, uuid)?;
        // The SDK's own tests PUT a singleton with an empty body and expect it back unchanged.
        if type_def.singleton && body.iter().all(u8::is_ascii_whitespace) {
            return Ok(bytes_response(StatusCode::OK, render_one(ctx, &cat, type_def, existing, true)));
        }
    }
    let mut input = parse_body(body)?;
    let reg = Registry::get();
    let read_only: Vec<&'static str> = reg.schema_of(type_def).read_only_fields().collect();
    // Clients PUT back what they read: the controller's own fields keep their stored values.
    if let Some(map) = input.as_object_mut() {
        map.retain(|k, _| !read_only.contains(&k.as_str()));
    }
    let mut config = normalize(reg, reg.schema_of(type_def), &input)?;
    let new_hidden = hidden_fields(type_def, &input, false)?;
    let expected = last_modified(&input);
    let uuid = uuid.to_string();
    let own_session = ctx.principal.session.clone().filter(|_| ctx.principal.user_uuid == uuid);
    let stored = app
        .store
        .write(move |txn| {
            let existing = txn.get(type_def.path, &uuid).ok_or_else(|| not_found(type_def, &uuid))?;
            let stored_stamp = last_modified(&existing.value).unwrap_or(0);
            if let Some(expected) = expected
                && expected < stored_stamp
            {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!("Concurrent update: {} '{uuid}' changed since it was read (_last_modified {expected} < {stored_stamp}); reload and retry", type_def.path),
                ));
            }
            let tenant = existing.meta.tenant.clone();
            for field in read_only {
                if let Some(v) = existing.value.get(field) {
                    config.insert(field.to_string(), v.clone());
                }
            }
            // Clients PUT back what they read, which never holds a secret: keep the stored one.
            for field in reg.schema_of(type_def).write_only_fields() {
                if !config.contains_key(field)
                    && let Some(v) = existing.value.get(field)
                {
                    config.insert(field.to_string(), v.clone());
                }
            }
            let mut hidden = hidden_of(&existing);
            hidden.extend(new_hidden);
            let stored = store_object(txn, type_def, &uuid, config, &tenant, hidden)?;
            // A new password ends the user's sessions (they no longer match it), except the
            // one of a user who set their own.
            if let Some(session) = own_session.as_deref()
                && let Some(hash) = stored.value.get("_password_hash").and_then(Value::as_str)
            {
                crate::sessions::rebind_in(txn, session, hash);
            }
            Ok(stored)
        })
        .await?;
    let cat = app.store.read();
    Ok(bytes_response(StatusCode::OK, render_one(ctx, &cat, type_def, &stored, true)))
}

pub async fn delete(
    app: &App,
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    uuid: &str,
) -> Result<Response, ApiError> {
    if type_def.singleton {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    require(ctx, type_def, Level::Write)?;
    find_visible(&app.store.read(), ctx, type_def, uuid)?;
    let uuid = uuid.to_string();
    let own_user = ctx.principal.user_uuid.clone();
    app.store
        .write(move |txn| {
            let existing = txn.get(type_def.path, &uuid).ok_or_else(|| not_found(type_def, &uuid))?;
            if existing.value.get("_system_default").and_then(Value::as_bool) == Some(true) {
                return Err(ApiError::forbidden(format!(
                    "Cannot delete system default object {} '{}'",
                    type_def.path,
                    existing.meta.name.as_deref().unwrap_or(&uuid)
                )));
            }
            if type_def.path == "user" && uuid == own_user {
                return Err(ApiError::forbidden("a user cannot delete itself"));
            }
            guard_administration(txn, type_def.path, &uuid, None)?;
            let path = object_path(type_def, &uuid);
            let referrers: Vec<String> = txn
                .referrers(&path)
                .into_iter()
                .filter(|r| *r != path)
                .map(|r| match txn.get_path(&r) {
                    Some(s) => format!("{} '{}' ({})", s.kind, s.meta.name.as_deref().unwrap_or_default(), s.uuid),
                    None => r,
                })
                .collect();
            if !referrers.is_empty() {
                let shown: Vec<_> = referrers.iter().take(20).cloned().collect();
                let more =
                    if referrers.len() > 20 { format!(" and {} more", referrers.len() - 20) } else { String::new() };
                return Err(ApiError::conflict(format!(
                    "Cannot delete {} '{uuid}': it is referred to by {}{more}",
                    type_def.path,
                    shown.join(", ")
                )));
            }
            txn.delete(type_def.path, &uuid);
            Ok(())
        })
        .await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The precondition a PATCH may carry: `If-Match: <_last_modified>` or `_last_modified` in a
/// classic body.
fn patch_precondition(ctx: &RequestContext, input: &Value) -> Result<Option<u64>, ApiError> {
    if let Some(tag) = ctx.header("if-match") {
        let tag = tag.trim().trim_start_matches("W/").trim_matches('"');
        return tag
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("If-Match must be the object's _last_modified, got '{tag}'")));
    }
    let classic = input.as_object().and_then(|m| m.values().next()).and_then(|fields| fields.get("_last_modified"));
    Ok(classic.and_then(|v| last_modified(&json!({"_last_modified": v}))))
}

/// `PATCH /api/<type>/<uuid>`: applies the patch in place to the current object inside the
/// writer (so concurrent PATCHes never lose an update), re-validates what it touched (the rest
/// was valid already), rolls back on any refusal, and stores only what changed.
pub async fn patch(
    app: &App,
    ctx: &RequestContext,
    type_def: &'static TypeDef,
    uuid: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    require(ctx, type_def, Level::Write)?;
    find_visible(&app.store.read(), ctx, type_def, uuid)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("PATCH body is empty; expected add, replace, delete or json_patch"));
    }
    let input: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))?;
    let is_json_patch = ctx.header("content-type").is_some_and(|c| c.starts_with("application/json-patch+json"));
    let patch = fulcrum_patch::parse(&input, is_json_patch).map_err(patch_error)?;
    let expected = patch_precondition(ctx, &input)?;
    let uuid = uuid.to_string();
    let target = uuid.clone();
    app.store
        .write(move |txn| {
            let existing = txn.get(type_def.path, &uuid).ok_or_else(|| not_found(type_def, &uuid))?;
            let stamp = last_modified(&existing.value).unwrap_or(0);
            if let Some(expected) = expected
                && expected != stamp
            {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "Concurrent update: {} '{uuid}' is at _last_modified {stamp}, not {expected}; reload and retry",
                        type_def.path
                    ),
                ));
            }
            let tenant = existing.meta.tenant.clone();
            drop(existing);
            let new_stamp = txn.timestamp_micros();
            txn.edit_with_scratch(type_def.path, &uuid, |txn, value, scratch| {
                let object = value.as_object_mut().ok_or_else(|| ApiError::internal("stored object is not a map"))?;
                let original = cfg!(debug_assertions).then(|| object.clone());
                let schema = Registry::get().schema_of(type_def);
                // The list indexes the batch's earlier PATCHes of this object kept (a refused
                // PATCH loses them, with the batch's scratch).
                if !scratch.as_ref().is_some_and(|s| s.is::<fulcrum_patch::ListIndexes>()) {
                    *scratch = Some(Box::new(fulcrum_patch::ListIndexes::default()));
                }
                let indexes = scratch
                    .as_mut()
                    .and_then(|s| s.downcast_mut::<fulcrum_patch::ListIndexes>())
                    .expect("put there above");
                let done = fulcrum_patch::apply_in_place_indexed(
                    schema,
                    object,
                    &patch,
                    &mut |kind, r| resolve_ref(txn, &tenant, kind, r),
                    indexes,
                )
                .map_err(patch_error)?;
                // The object was valid before: checking what the patch touched keeps it valid.
                let checked = fulcrum_patch::validate_indexed(schema, object, &done.touched, indexes)
                    .map_err(patch_error)
                    .and_then(|()| {
                        let touched = fulcrum_patch::touched_fields(&done.touched);
                        if let Some(field) = touched.iter().find(|f| schema.field(f).is_some_and(|d| d.read_only)) {
                            return Err(ApiError::bad_request(format!(
                                "field '{field}' is set by the controller and cannot be changed"
                            )));
                        }
                        resolve_touched(txn, type_def, object, &done.touched, &tenant)?;
                        if touched.iter().any(|f| f == "name") {
                            check_name(txn, type_def, &tenant, object, &uuid)?;
                        }
                        if matches!(type_def.path, "user" | "role") {
                            guard_administration(txn, type_def.path, &uuid, Some(&Value::Object(object.clone())))?;
                        }
                        if type_def.path == "cluster" && touched.iter().any(|f| f == "nodes") {
                            return Err(ApiError::bad_request(MEMBERSHIP_FIXED));
                        }
                        Ok(())
                    });
                if let Err(e) = checked {
                    fulcrum_patch::rollback(object, done.undo);
                    return Err(e);
                }
                object.insert("_last_modified".into(), json!(new_stamp.to_string()));
                let mut edits = fulcrum_patch::edit_log(&done.touched, &|f| done.was_absent(f), object);
                edits.push(json!({"op": "add", "path": "/_last_modified", "value": new_stamp.to_string()}));
                if let Some(original) = original {
                    let mut replayed = Value::Object(original);
                    fulcrum_jsonpatch::apply_all(&mut replayed, &edits).expect("edit log applies");
                    assert_eq!(
                        &replayed,
                        &Value::Object(object.clone()),
                        "the edit log must replay to the patched object"
                    );
                    let whole =
                        normalize(Registry::get(), schema, &replayed).expect("the patched object is valid as a whole");
                    assert!(
                        whole.iter().all(|(k, v)| object.get(k) == Some(v)),
                        "incremental validation agrees with whole"
                    );
                }
                let same_meta = index_entry_unchanged(schema, object, &done);
                Ok((Some(edits), (), same_meta))
            })
            .unwrap_or_else(|| Err(not_found(type_def, &uuid)))
        })
        .await?;
    // What the client gets is the object as committed (it includes this PATCH, and any that
    // were committed with it).
    let cat = app.store.read();
    let stored = cat.get(type_def.path, &target).ok_or_else(|| not_found(type_def, &target))?;
    Ok(bytes_response(StatusCode::OK, render_shared(app, ctx, &cat, type_def, stored, true)))
}

/// Whether a PATCH left the object's index entry (name, tenant, references) as it was: it only
/// added, updated or removed list entries that hold no reference, before or after. Then the
/// store need not walk the whole object to index it again. Checked on the touched entries
/// alone; anything else (a field rewritten, removals mixed with additions, whose recorded
/// positions may have moved) says no.
fn index_entry_unchanged(
    schema: &fulcrum_schema::ObjectSchema,
    object: &Map<String, Value>,
    done: &fulcrum_patch::InPlace,
) -> bool {
    use fulcrum_patch::{Touch, Undo};
    let reg = Registry::get();
    let no_refs = |field: &str, entry: &Value| {
        let mut holder = Map::new();
        holder.insert(field.to_string(), Value::Array(vec![entry.clone()]));
        let mut found = false;
        for_each_ref(reg, schema, &holder, &mut |_, _| found = true);
        !found
    };
    let removes = done.touched.iter().any(|t| matches!(t, Touch::Remove(..)));
    let adds = done.touched.iter().any(|t| matches!(t, Touch::Append(..) | Touch::Entry(..)));
    if removes && adds {
        return false;
    }
    let touched_ok = done.touched.iter().all(|t| match t {
        Touch::Field(_) => false,
        Touch::Append(f, i) | Touch::Entry(f, i) => {
            object.get(f).and_then(|l| l.get(*i)).is_some_and(|e| no_refs(f, e))
        }
        Touch::Remove(..) => true,
    });
    touched_ok
        && done.undo.iter().all(|u| match u {
            Undo::Insert(f, _, before) | Undo::Entry(f, _, before) => no_refs(f, before),
            Undo::Field(..) | Undo::RemoveAt(..) => false,
            Undo::Pop(_) => true,
        })
}

/// Resolves the references of what a PATCH touched: whole fields, or only the list entries it
/// added or updated (the rest of the list was resolved already).
fn resolve_touched(
    txn: &Txn<'_>,
    type_def: &TypeDef,
    object: &mut Map<String, Value>,
    touched: &[fulcrum_patch::Touch],
    tenant: &str,
) -> Result<(), ApiError> {
    use fulcrum_patch::Touch;
    for field in fulcrum_patch::touched_fields(touched) {
        let whole = touched.iter().any(|t| matches!(t, Touch::Field(f) if *f == field));
        if whole || !object.get(&field).is_some_and(Value::is_array) {
            resolve_fields(txn, type_def, object, std::slice::from_ref(&field), tenant)?;
            continue;
        }
        // Removing entries brings no new reference: only the entries added or updated (where
        // they are now) are resolved, so deleting one server of a big pool does not walk it.
        for i in fulcrum_patch::entries_now(touched, &field) {
            let Some(slot) = object.get_mut(&field).and_then(|l| l.get_mut(i)) else { continue };
            let mut part = Map::new();
            part.insert(field.clone(), Value::Array(vec![std::mem::take(slot)]));
            let outcome = resolve_refs(txn, type_def, &mut part, tenant);
            let entry = part.remove(&field).and_then(|l| l.as_array().and_then(|a| a.first().cloned()));
            if let Some(slot) = object.get_mut(&field).and_then(|l| l.get_mut(i)) {
                *slot = entry.unwrap_or_default();
            }
            outcome?;
        }
    }
    Ok(())
}

/// Resolves the references of some top-level fields in place (the others are resolved already).
pub(crate) fn resolve_fields(
    txn: &Txn<'_>,
    type_def: &TypeDef,
    object: &mut Map<String, Value>,
    fields: &[String],
    tenant: &str,
) -> Result<(), ApiError> {
    for field in fields {
        if let Some(slot) = object.get_mut(field) {
            let mut part = Map::new();
            part.insert(field.clone(), std::mem::take(slot));
            let outcome = resolve_refs(txn, type_def, &mut part, tenant);
            *slot = part.remove(field).unwrap_or_default();
            outcome?;
        }
    }
    Ok(())
}

fn patch_error(e: fulcrum_patch::PatchError) -> ApiError {
    match e {
        fulcrum_patch::PatchError::Invalid(m) => ApiError::bad_request(m),
        fulcrum_patch::PatchError::TestFailed(m) => ApiError::conflict(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(value: Value) -> Arc<Stored> {
        let meta = fulcrum_store::Meta { tenant: String::new(), name: None, refs: vec![] };
        Arc::new(Stored { kind: "pool".into(), uuid: "p".into(), value, meta })
    }

    fn put(cat: &mut Catalogue, stored: &Arc<Stored>) {
        cat.apply(&fulcrum_store::Change::Put(stored.clone()));
    }

    proptest::proptest! {
        /// A page taken without sorting past it holds what sorting everything and slicing holds.
        #[test]
        fn a_page_in_order_is_the_slice_of_the_whole_sort(
            keys in proptest::collection::vec(0u8..20, 0..300),
            start in 0usize..320,
            len in 0usize..40,
        ) {
            // Unique second members, as uuids are: the order is total.
            let items: Vec<(u8, u32)> = keys.into_iter().zip(0..).collect();
            let end = (start + len).min(items.len());
            let start = start.min(end);
            let order = |a: &(u8, u32), b: &(u8, u32)| a.0.cmp(&b.0).then(b.1.cmp(&a.1));
            let mut sorted = items.clone();
            sorted.sort_by(order);
            proptest::prop_assert_eq!(page_in_order(items, start..end, order), sorted[start..end].to_vec());
        }
    }

    #[test]
    fn a_rendering_is_shared_only_by_the_same_version_generation_and_view() {
        let renders = SharedRenders::default();
        let mut cat = Catalogue::default();
        let calls = std::cell::Cell::new(0);
        let render = |text: &str| {
            calls.set(calls.get() + 1);
            (text.as_bytes().to_vec(), ListExtents::default())
        };
        let v1 = stored(json!({"n": 1}));
        put(&mut cat, &v1);
        assert_eq!(renders.render(&cat, &v1, "view".into(), |_| render("one")), "one");
        assert_eq!(renders.render(&cat, &v1, "view".into(), |_| render("again")), "one", "shared within a generation");
        assert_eq!(calls.get(), 1);
        assert_eq!(renders.render(&cat, &v1, "other view".into(), |_| render("two")), "two");
        put(&mut cat, &stored(json!({"unrelated": true})));
        assert_eq!(renders.render(&cat, &v1, "other view".into(), |_| render("three")), "three", "a new generation");
        // Another version of the object, even at a recycled address, is never served the old bytes.
        let v2 = stored(json!({"n": 2}));
        assert_eq!(renders.render(&cat, &v2, "other view".into(), |_| render("four")), "four");
        assert_eq!(calls.get(), 4);
        assert_eq!(renders.entries.lock().unwrap().len(), 4);
        // At most so many are kept, the oldest generations going first.
        let first_kept = cat.generation() + 1;
        for _ in 0..SHARED_RENDERINGS {
            put(&mut cat, &v2);
            renders.render(&cat, &v2, "v".into(), |_| render("x"));
        }
        let kept: Vec<u64> = renders.entries.lock().unwrap().iter().map(|e| e.generation).collect();
        assert_eq!(kept.len(), SHARED_RENDERINGS);
        assert!(kept.iter().all(|g| *g >= first_kept), "{kept:?}");
    }

    #[test]
    fn an_edited_version_is_rendered_from_the_last_rendering_of_the_one_before() {
        let reg = Registry::get();
        let type_def = reg.type_def("pool").unwrap();
        let servers: Vec<Value> =
            (0..100).map(|i| json!({"ip": {"addr": format!("10.0.0.{i}"), "type": "V4"}})).collect();
        let body = json!({"name": "p", "servers": servers, "health_monitor_refs": ["/api/healthmonitor/hm-1"]});
        let mut value = Value::Object(normalize(reg, reg.schema_of(type_def), &body).unwrap());
        value["uuid"] = json!("p");
        let monitor = |name: &str| {
            let meta = fulcrum_store::Meta { tenant: String::new(), name: Some(name.into()), refs: vec![] };
            Arc::new(Stored { kind: "healthmonitor".into(), uuid: "hm-1".into(), value: json!({"name": name}), meta })
        };
        let mut cat = Catalogue::default();
        put(&mut cat, &monitor("hm"));
        let v1 = stored(value.clone());
        put(&mut cat, &v1);
        let renders = SharedRenders::default();
        let opts = RenderOptions { base_url: "https://h", include_name: true, ..Default::default() };
        let name_of = |cat: &Catalogue, r: &str| cat.get_path(r).and_then(|s| s.meta.name.clone());
        let seen = std::cell::RefCell::new(Vec::new());
        let render = |cat: &Catalogue, stored: &Arc<Stored>, view: &str| {
            renders.render(cat, stored, view.into(), |previous| {
                seen.borrow_mut().push(previous.is_some());
                let map = stored.value.as_object().unwrap();
                render_json_from(reg, type_def, map, &opts, &|r| name_of(cat, r), previous)
            })
        };
        let fresh = |cat: &Catalogue, stored: &Stored| {
            fulcrum_schema::render_json(reg, type_def, stored.value.as_object().unwrap(), &opts, &|r| name_of(cat, r))
        };
        render(&cat, &v1, "view");
        // An edit: one server added, one removed, one changed.
        let edits = vec![
            json!({"op": "add", "path": "/servers/-", "value": {"ip": {"addr": "10.0.1.1", "type": "V4"}}}),
            json!({"op": "remove", "path": "/servers/3"}),
            json!({"op": "replace", "path": "/servers/7/ratio", "value": 5}),
        ];
        let mut edited = value.clone();
        fulcrum_jsonpatch::apply_all(&mut edited, &edits).unwrap();
        let v2 = stored(edited.clone());
        cat.apply(&fulcrum_store::Change::Edit { stored: v2.clone(), edits: Arc::new(edits.clone()) });
        assert_eq!(render(&cat, &v2, "view"), fresh(&cat, &v2));
        assert_eq!(*seen.borrow(), [false, true], "made from the rendering before");
        // Another view has no rendering before it.
        assert_eq!(render(&cat, &v2, "another view"), fresh(&cat, &v2));
        assert_eq!(seen.borrow().last(), Some(&false));
        // A version nobody rendered (its answers came after the next commit): the next is
        // rendered from the one before it, through both edit logs.
        let mut unrendered = edited.clone();
        let skipped = [json!({"op": "remove", "path": "/servers/0"})];
        fulcrum_jsonpatch::apply_all(&mut unrendered, &skipped).unwrap();
        let v3 = stored(unrendered.clone());
        cat.apply(&fulcrum_store::Change::Edit { stored: v3.clone(), edits: Arc::new(skipped.to_vec()) });
        let next = [json!({"op": "replace", "path": "/servers/40/ratio", "value": 3})];
        let mut edited = unrendered.clone();
        fulcrum_jsonpatch::apply_all(&mut edited, &next).unwrap();
        let v4 = stored(edited.clone());
        cat.apply(&fulcrum_store::Change::Edit { stored: v4.clone(), edits: Arc::new(next.to_vec()) });
        assert_eq!(render(&cat, &v4, "view"), fresh(&cat, &v4));
        assert_eq!(seen.borrow().last(), Some(&true), "made from v2's rendering");
        // A referenced object renamed since: the names kept in the entries may be stale.
        put(&mut cat, &monitor("renamed"));
        let mut again = edited.clone();
        fulcrum_jsonpatch::apply_all(&mut again, &edits[2..]).unwrap();
        let v3 = stored(again);
        cat.apply(&fulcrum_store::Change::Edit { stored: v3.clone(), edits: Arc::new(edits[2..].to_vec()) });
        assert_eq!(render(&cat, &v3, "view"), fresh(&cat, &v3));
        assert_eq!(seen.borrow().last(), Some(&false), "made afresh after a rename");
        assert!(String::from_utf8_lossy(&render(&cat, &v3, "view")).contains("#renamed"));
    }
}
