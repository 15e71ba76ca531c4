//! First start: the default objects every controller has, and the admin account.

use std::io::Write;
use std::path::Path;

use fulcrum_schema::{Registry, normalize};
use fulcrum_store::Store;
use serde_json::{Value, json};

use crate::access::ADMIN_TENANT;
use crate::auth::{hash_password, random_token};
use crate::error::ApiError;
use crate::objects::store_object;

pub const ADMIN_USER_UUID: &str = "user-1";
pub const PASSWORD_ENV: &str = "FULCRUM_ADMIN_PASSWORD";
pub const PASSWORD_FILE: &str = "initial-admin-password";
/// SE cores of the license a fresh controller starts with.
pub const EVALUATION_CORES: u64 = 20;

/// Writes a file only its owner can read, durably.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// (type, uuid or "" for a generated one, body) of every default object, in dependency order.
fn defaults(node_ip: &str) -> Vec<(&'static str, String, Value)> {
    let role = |name: &str, access: &str| {
        ("role", String::new(), json!({"name": name, "privileges": [{"resource": "*", "type": access}]}))
    };
    let hm = |name: &str, kind: &str| ("healthmonitor", String::new(), json!({"name": name, "type": kind}));
    let app_profile =
        |name: &str, kind: &str| ("applicationprofile", String::new(), json!({"name": name, "type": kind}));
    vec![
        ("tenant", ADMIN_TENANT.to_string(), json!({"name": "admin", "description": "Default tenant", "local": true})),
        role("System-Admin", "WRITE_ACCESS"),
        role("System-ReadOnly", "READ_ACCESS"),
        role("Tenant-Admin", "WRITE_ACCESS"),
        (
            "cloud",
            String::new(),
            json!({"name": "Default-Cloud", "vtype": "CLOUD_NONE", "dhcp_enabled": true, "license_type": "LIC_CORES", "license_tier": "ENTERPRISE"}),
        ),
        ("vrfcontext", String::new(), json!({"name": "global", "system_default": true})),
        ("vrfcontext", String::new(), json!({"name": "management", "system_default": true})),
        ("serviceenginegroup", String::new(), json!({"name": "Default-Group"})),
        hm("System-HTTP", "HEALTH_MONITOR_HTTP"),
        hm("System-HTTPS", "HEALTH_MONITOR_HTTPS"),
        hm("System-TCP", "HEALTH_MONITOR_TCP"),
        hm("System-Ping", "HEALTH_MONITOR_PING"),
        app_profile("System-HTTP", "APPLICATION_PROFILE_TYPE_HTTP"),
        app_profile("System-Secure-HTTP", "APPLICATION_PROFILE_TYPE_HTTP"),
        app_profile("System-L4-Application", "APPLICATION_PROFILE_TYPE_L4"),
        app_profile("System-SSL-Application", "APPLICATION_PROFILE_TYPE_SSL"),
        ("networkprofile", String::new(), json!({"name": "System-TCP-Proxy"})),
        ("networkprofile", String::new(), json!({"name": "System-UDP-Fast-Path"})),
        ("sslprofile", String::new(), json!({"name": "System-Standard"})),
        ("sslprofile", String::new(), json!({"name": "System-Standard-PFS"})),
        ("analyticsprofile", String::new(), json!({"name": "System-Analytics-Profile"})),
        ("systemconfiguration", "default".to_string(), json!({"portal_configuration": {}, "global_tenant_config": {}})),
        ("controllerproperties", String::new(), json!({})),
        // What a fresh controller may run: an evaluation license, as the product ships with.
        (
            "controllerlicense",
            String::new(),
            json!({"licenses": [{"license_id": "evaluation", "license_name": "Evaluation", "cores": EVALUATION_CORES}]}),
        ),
        (
            "cluster",
            String::new(),
            json!({"name": "cluster-0-1", "nodes": [{"ip": {"addr": node_ip, "type": "V4"}, "name": node_ip}]}),
        ),
    ]
}

/// Creates the default objects and the admin user unless they exist. Returns the generated
/// admin password when one was made (it is printed once and kept in DATA/initial-admin-password).
pub async fn ensure_defaults(store: &Store, data_dir: &Path, node_ip: &str) -> Result<Option<String>, ApiError> {
    if store.read().get("tenant", ADMIN_TENANT).is_some() {
        return Ok(None);
    }
    let (password, generated) = match std::env::var(PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => (p, false),
        _ => (random_token(20), true),
    };
    if password.len() < 8 {
        return Err(ApiError::bad_request(format!("{PASSWORD_ENV} must be at least 8 characters")));
    }
    if generated {
        write_private(&data_dir.join(PASSWORD_FILE), format!("{password}\n").as_bytes())
            .map_err(|e| ApiError::internal(format!("cannot write {PASSWORD_FILE}: {e}")))?;
    }
    let hash = hash_password(&password);
    let node_ip = node_ip.to_string();
    store
        .write(move |txn| {
            let reg = Registry::get();
            for (kind, uuid, body) in defaults(&node_ip) {
                let type_def = reg.type_def(kind).expect("default types are defined");
                let uuid = if uuid.is_empty() { format!("{kind}-{}", uuid::Uuid::new_v4()) } else { uuid };
                let config = normalize(reg, reg.schema_of(type_def), &body)?;
                let hidden = json!({"_system_default": true});
                store_object(
                    txn,
                    type_def,
                    &uuid,
                    config,
                    ADMIN_TENANT,
                    hidden.as_object().cloned().unwrap_or_default(),
                )?;
            }
            let admin = json!({
                "name": "admin", "username": "admin", "full_name": "System Administrator", "is_superuser": true,
                "default_tenant_ref": "/api/tenant/admin",
                "access": [{"role_ref": "/api/role?name=System-Admin", "all_tenants": true}],
            });
            let hidden = json!({"_system_default": true, "_password_hash": hash});
            let user = reg.type_def("user").expect("defined");
            let config = normalize(reg, reg.schema_of(user), &admin)?;
            store_object(
                txn,
                user,
                ADMIN_USER_UUID,
                config,
                ADMIN_TENANT,
                hidden.as_object().cloned().unwrap_or_default(),
            )?;
            Ok(())
        })
        .await?;
    Ok(generated.then_some(password))
}
