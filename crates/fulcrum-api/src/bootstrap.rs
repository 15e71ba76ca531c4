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
        ("sslprofile", String::new(), json!({"name": "System-Standard-Portal", "type": "SSL_PROFILE_TYPE_SYSTEM"})),
        app_profile("System-DNS", "APPLICATION_PROFILE_TYPE_DNS"),
        app_profile("System-Syslog", "APPLICATION_PROFILE_TYPE_SYSLOG"),
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

/// The product's default key-and-certificate objects: a root CA and the certificates it
/// issues, each with its own freshly generated key.
const DEFAULT_CERTIFICATES: &[(&str, &str)] = &[
    ("System-Default-Cert", "SSL_CERTIFICATE_TYPE_VIRTUALSERVICE"),
    ("System-Default-Cert-EC", "SSL_CERTIFICATE_TYPE_VIRTUALSERVICE"),
    ("System-Default-Portal-Cert", "SSL_CERTIFICATE_TYPE_SYSTEM"),
    ("System-Default-Portal-Cert-EC256", "SSL_CERTIFICATE_TYPE_SYSTEM"),
    ("System-Default-Secure-Channel-Cert", "SSL_CERTIFICATE_TYPE_SYSTEM"),
];
const ROOT_CA: &str = "System-Default-Root-CA";

/// (body, private key PEM) of each default certificate. Keys are ECDSA P-256: ring, the one
/// crypto provider, cannot generate RSA keys (the product's System-Default-Cert is RSA 2048).
fn default_certificates(node_ip: &str) -> Result<Vec<(Value, String)>, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let params = |common_name: &str, sans: Vec<String>| -> Result<CertificateParams, rcgen::Error> {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.distinguished_name.push(DnType::OrganizationName, "Fulcrum");
        p.not_before = rcgen::date_time_ymd(2026, 1, 1);
        p.not_after = rcgen::date_time_ymd(2036, 1, 1);
        Ok(p)
    };
    let body = |name: &str, kind: &str, pem: String, common_name: &str, self_signed: bool| {
        json!({
            "name": name, "type": kind, "format": "SSL_PEM", "status": "SSL_CERTIFICATE_FINISHED",
            "created_by": "system",
            "certificate": {
                "certificate": pem, "self_signed": self_signed, "expiry_status": "SSL_CERTIFICATE_GOOD",
                "subject": {"common_name": common_name, "organization": "Fulcrum"},
                "issuer": {"common_name": ROOT_CA, "organization": "Fulcrum"},
            },
        })
    };
    let mut ca_params = params(ROOT_CA, vec![])?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let mut out =
        vec![(body(ROOT_CA, "SSL_CERTIFICATE_TYPE_CA", ca_cert.pem(), ROOT_CA, true), ca_key.serialize_pem())];
    let issuer = Issuer::new(ca_params, ca_key);
    for (name, kind) in DEFAULT_CERTIFICATES {
        let key = KeyPair::generate()?;
        let cert = params(name, vec![node_ip.to_string(), "localhost".to_string()])?.signed_by(&key, &issuer)?;
        out.push((body(name, kind, cert.pem(), name, false), key.serialize_pem()));
    }
    Ok(out)
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
    let certificates = default_certificates(node_ip)
        .map_err(|e| ApiError::internal(format!("cannot make the default certificates: {e}")))?;
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
            let certificate_type = reg.type_def("sslkeyandcertificate").expect("defined");
            for (body, key) in certificates {
                let config = normalize(reg, reg.schema_of(certificate_type), &body)?;
                // The private key is kept but never shown: it lives among the hidden fields.
                let hidden = json!({"_system_default": true, "_private_key": key});
                let uuid = format!("sslkeyandcertificate-{}", uuid::Uuid::new_v4());
                let hidden = hidden.as_object().cloned().unwrap_or_default();
                store_object(txn, certificate_type, &uuid, config, ADMIN_TENANT, hidden)?;
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

/// Gives `user` (made if missing) the password, an active account and System-Admin in all
/// tenants, and System-Admin its full privileges: the recovery when every administrator is
/// locked out. Written directly, past the API's guards, since the API is the way that failed.
pub async fn restore_administrator(store: &Store, user: &str, password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::bad_request("the new password must be at least 8 characters"));
    }
    let hash = hash_password(password);
    let user = user.to_string();
    store
        .write(move |txn| {
            let stamp = txn.timestamp_micros().to_string();
            let role = txn
                .find_by_name("role", ADMIN_TENANT, "System-Admin")
                .or_else(|| txn.find_by_name("role", "", "System-Admin"))
                .ok_or_else(|| ApiError::internal("the store has no System-Admin role"))?;
            let mut role_value = role.value.clone();
            role_value["privileges"] = json!([{"resource": "*", "type": "WRITE_ACCESS"}]);
            role_value["_last_modified"] = json!(stamp);
            let role_ref = format!("/api/role/{}", role.uuid);
            txn.put("role", &role.uuid, role_value);
            let admin_access = json!({"role_ref": role_ref, "all_tenants": true});
            match txn.find_by_name("user", "", &user) {
                Some(existing) => {
                    let mut value = existing.value.clone();
                    value["_password_hash"] = json!(hash);
                    value["is_active"] = json!(true);
                    let mut access = value.get("access").and_then(Value::as_array).cloned().unwrap_or_default();
                    access.retain(|a| a.get("role_ref") != Some(&json!(role_ref)));
                    access.push(admin_access);
                    value["access"] = json!(access);
                    value["_last_modified"] = json!(stamp);
                    txn.put("user", &existing.uuid, value);
                }
                None => {
                    let reg = Registry::get();
                    let t = reg.type_def("user").expect("defined");
                    let body = json!({
                        "name": user, "username": user, "is_superuser": true,
                        "default_tenant_ref": "/api/tenant/admin", "access": [admin_access],
                    });
                    let config = normalize(reg, reg.schema_of(t), &body)?;
                    let hidden = json!({"_password_hash": hash});
                    let uuid = format!("user-{}", uuid::Uuid::new_v4());
                    store_object(txn, t, &uuid, config, ADMIN_TENANT, hidden.as_object().cloned().unwrap_or_default())?;
                }
            }
            Ok(())
        })
        .await
        .map_err(ApiError::from)
}
