//! What a caller may do: users carry `access` entries (a role, in one tenant or in all), roles
//! carry privileges (`*` or `PERMISSION_<TYPE>` with NO/READ/WRITE access). Requests are scoped to
//! one tenant by `X-Avi-Tenant` / `X-Avi-Tenant-UUID`.

use axum::http::HeaderMap;
use fulcrum_store::{Catalogue, Stored};
use serde_json::Value;

use crate::error::ApiError;

pub const ADMIN_TENANT: &str = "admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    None,
    Read,
    Write,
}

impl Level {
    fn parse(s: &str) -> Level {
        match s {
            "WRITE_ACCESS" => Level::Write,
            "READ_ACCESS" => Level::Read,
            _ => Level::None,
        }
    }

    /// The name a role's privilege `type` spells this level with.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Write => "WRITE_ACCESS",
            Level::Read => "READ_ACCESS",
            Level::None => "NO_ACCESS",
        }
    }
}

#[derive(Debug, Clone)]
struct Grant {
    /// `None`: every tenant.
    tenant: Option<String>,
    privileges: Vec<(String, Level)>,
}

/// A user's grants; `role` looks a role up by its reference.
fn grants_of(user: &Value, role: &dyn Fn(&str) -> Option<Value>) -> Vec<Grant> {
    let mut grants = Vec::new();
    for entry in user.get("access").and_then(Value::as_array).into_iter().flatten() {
        let role = entry.get("role_ref").and_then(Value::as_str).and_then(role);
        let privileges = role
            .and_then(|r| r.get("privileges").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| Some((p.get("resource")?.as_str()?.to_string(), Level::parse(p.get("type")?.as_str()?))))
            .collect();
        let all = entry.get("all_tenants").and_then(Value::as_bool).unwrap_or(false);
        let tenant = if all {
            None
        } else {
            entry.get("tenant_ref").and_then(Value::as_str).map(|t| last_segment(t).to_string())
        };
        grants.push(Grant { tenant, privileges });
    }
    grants
}

fn is_superuser_of(grants: &[Grant]) -> bool {
    grants.iter().any(|g| g.tenant.is_none() && g.privileges.iter().any(|(r, l)| r == "*" && *l == Level::Write))
}

/// Whether one of `users` (their stored bodies) is active and may do everything everywhere:
/// a write to users or roles that would leave none is refused, so nobody can lock every
/// administrator out.
pub fn someone_administers<'a>(
    users: impl IntoIterator<Item = &'a Value>,
    role: &dyn Fn(&str) -> Option<Value>,
) -> bool {
    users.into_iter().any(|user| {
        user.get("is_active").and_then(Value::as_bool) != Some(false)
            && user.get("_password_hash").is_some()
            && is_superuser_of(&grants_of(user, role))
    })
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_uuid: String,
    pub username: String,
    pub default_tenant: String,
    /// The session the request came with (none for HTTP Basic).
    pub session: Option<String>,
    grants: Vec<Grant>,
}

fn last_segment(reference: &str) -> &str {
    reference.rsplit('/').next().unwrap_or(reference)
}

impl Principal {
    pub fn from_user(catalogue: &Catalogue, user: &Stored) -> Principal {
        let v = &user.value;
        let grants = grants_of(v, &|r| catalogue.get_path(r).map(|role| role.value.clone()));
        let default_tenant = v
            .get("default_tenant_ref")
            .and_then(Value::as_str)
            .map(|t| last_segment(t).to_string())
            .or_else(|| grants.iter().find_map(|g| g.tenant.clone()))
            .unwrap_or_else(|| ADMIN_TENANT.to_string());
        Principal {
            user_uuid: user.uuid.clone(),
            username: v
                .get("username")
                .or_else(|| v.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            default_tenant,
            session: None,
            grants,
        }
    }

    /// The privileges of the grants that apply in `tenant` (its own and the all-tenant ones).
    fn privileges_in<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a (String, Level)> {
        self.grants.iter().filter(move |g| g.tenant.as_deref().is_none_or(|t| t == tenant)).flat_map(|g| &g.privileges)
    }

    /// Access to objects of API type `kind` in tenant `tenant`.
    pub fn level(&self, tenant: &str, kind: &str) -> Level {
        let resource = format!("PERMISSION_{}", kind.to_uppercase());
        self.privileges_in(tenant)
            .filter(|(r, _)| r == "*" || *r == resource)
            .map(|(_, level)| *level)
            .max()
            .unwrap_or(Level::None)
    }

    /// Whether the user has any access in a tenant.
    pub fn can_enter(&self, tenant: &str) -> bool {
        self.privileges_in(tenant).any(|(_, l)| *l > Level::None)
    }

    /// What the user may do in `tenant`, one entry per resource (`*` or `PERMISSION_<TYPE>`)
    /// at its highest level: what a client (the web UI) needs to know which actions to offer.
    pub fn privileges(&self, tenant: &str) -> Vec<(String, Level)> {
        let mut merged: std::collections::BTreeMap<&str, Level> = std::collections::BTreeMap::new();
        for (resource, level) in self.privileges_in(tenant) {
            let entry = merged.entry(resource).or_insert(*level);
            *entry = (*entry).max(*level);
        }
        merged.into_iter().map(|(r, l)| (r.to_string(), l)).collect()
    }

    /// Full access everywhere: shown as `is_superuser`.
    pub fn is_superuser(&self) -> bool {
        is_superuser_of(&self.grants)
    }

    pub fn tenants<'a>(&self, catalogue: &'a Catalogue) -> Vec<&'a std::sync::Arc<Stored>> {
        catalogue.iter("tenant").filter(|t| self.can_enter(&t.uuid)).collect()
    }
}

/// The tenant a request works in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    One(String),
    /// `X-Avi-Tenant: *`: reads across every tenant the user may enter.
    All,
}

impl TenantScope {
    /// The tenant new objects go to.
    pub fn for_write(&self) -> Result<&str, ApiError> {
        match self {
            TenantScope::One(t) => Ok(t),
            TenantScope::All => {
                Err(ApiError::bad_request("X-Avi-Tenant '*' is for reads only; name one tenant to write"))
            }
        }
    }
}

pub fn resolve_tenant(
    catalogue: &Catalogue,
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<TenantScope, ApiError> {
    // A tenant name may be any UTF-8 (not only the visible ASCII `to_str` accepts); a header
    // that is not UTF-8 names no tenant and must not fall back to the default one.
    let header = |name: &str| -> Result<Option<&str>, ApiError> {
        let Some(value) = headers.get(name) else { return Ok(None) };
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::bad_request(format!("header {name} is not valid UTF-8")))?
            .trim();
        Ok(Some(text).filter(|v| !v.is_empty()))
    };
    let tenant = if let Some(name) = header("x-avi-tenant")? {
        if name == "*" {
            return Ok(TenantScope::All);
        }
        catalogue
            .find_by_name("tenant", "", name)
            .map(|t| t.uuid.clone())
            .ok_or_else(|| ApiError::forbidden(format!("Tenant '{name}' does not exist!")))?
    } else if let Some(uuid) = header("x-avi-tenant-uuid")? {
        catalogue
            .get("tenant", uuid)
            .map(|t| t.uuid.clone())
            .ok_or_else(|| ApiError::forbidden(format!("Tenant '{uuid}' does not exist!")))?
    } else {
        principal.default_tenant.clone()
    };
    if !principal.can_enter(&tenant) {
        return Err(ApiError::forbidden(format!("User '{}' has no access to tenant '{tenant}'", principal.username)));
    }
    Ok(TenantScope::One(tenant))
}
