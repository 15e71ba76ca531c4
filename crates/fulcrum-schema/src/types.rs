//! The object types Fulcrum serves, as data: every field's kind, default, range, enum values,
//! whether it is required, and for every list of objects the key that identifies an entry.
//!
//! Defaults and ranges follow the Avi 30.2.1 schema (see the API reference §7); where Fulcrum
//! deliberately differs, the field's description says so.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::model::{Field, Kind, ListKey, ListSpec, ObjectSchema, Scope, TypeDef};

/// All schemas and API types, looked up by name.
#[derive(Debug)]
pub struct Registry {
    schemas: HashMap<&'static str, ObjectSchema>,
    types: Vec<TypeDef>,
    /// Per schema, the indices of the fields that may hold references (directly or nested), so
    /// walks over references skip everything else.
    ref_fields: HashMap<&'static str, Vec<usize>>,
}

impl Registry {
    /// The one registry, built on first use.
    pub fn get() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(build)
    }

    pub fn schema(&self, name: &str) -> &ObjectSchema {
        self.schemas.get(name).unwrap_or_else(|| panic!("schema {name} is not defined"))
    }

    pub fn type_def(&self, path: &str) -> Option<&TypeDef> {
        self.types.iter().find(|t| t.path == path)
    }

    pub fn types(&self) -> &[TypeDef] {
        &self.types
    }

    /// Indices of the fields of schema `name` that may hold references.
    pub fn ref_fields(&self, name: &str) -> &[usize] {
        self.ref_fields.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn schemas(&self) -> impl Iterator<Item = &ObjectSchema> {
        self.schemas.values()
    }

    /// The schema of an API type.
    pub fn schema_of(&self, type_def: &TypeDef) -> &ObjectSchema {
        self.schema(type_def.schema)
    }
}

// Small constructors keep the tables below readable.
fn f(name: &'static str, kind: Kind) -> Field {
    Field::new(name, kind)
}
fn s() -> Kind {
    Kind::Str
}
fn b() -> Kind {
    Kind::Bool
}
fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}
fn en(values: &'static [&'static str]) -> Kind {
    Kind::Enum(values)
}
fn r(target: &'static str) -> Kind {
    Kind::Ref(target)
}
fn o(schema: &'static str) -> Kind {
    Kind::Obj(schema)
}
fn list(item: Kind, key: ListKey) -> Kind {
    Kind::List(Box::new(ListSpec { item, max: None, key, key_defaults: &[] }))
}
fn list_max(item: Kind, key: ListKey, max: usize) -> Kind {
    Kind::List(Box::new(ListSpec { item, max: Some(max), key, key_defaults: &[] }))
}
/// A list of references: each entry is its own key.
fn refs(target: &'static str) -> Kind {
    list(r(target), ListKey::Value)
}
fn strs() -> Kind {
    list(s(), ListKey::Value)
}
fn keyed(schema: &'static str, key: &'static [&'static str]) -> Kind {
    list(o(schema), ListKey::Fields(key))
}
/// A default reference, resolved by name in the object's tenant (then the admin tenant).
fn ref_default(target: &str, name: &str) -> Value {
    Value::String(format!("/api/{target}?name={name}"))
}

const U16: (i64, i64) = (1, 65535);
const U32_MAX: i64 = u32::MAX as i64;

fn schema(name: &'static str, fields: Vec<Field>) -> ObjectSchema {
    ObjectSchema { name, fields, hook: None, entry_hook: None }
}

fn api_type(path: &'static str, schema: &'static str, scope: Scope) -> TypeDef {
    TypeDef { path, schema, scope, singleton: false, system_created: false }
}

/// Common to most configuration objects.
fn named(mut fields: Vec<Field>) -> Vec<Field> {
    let mut all = vec![
        f("name", s()).required(),
        f("description", s()),
        f("markers", list(o("RoleFilterMatchLabel"), ListKey::Fields(&["key"]))),
    ];
    all.append(&mut fields);
    all
}

fn check_ip_addr(obj: &mut Map<String, Value>) -> Result<(), String> {
    let addr = obj.get("addr").and_then(Value::as_str).unwrap_or_default();
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let ok = match kind {
        "V4" => addr.parse::<Ipv4Addr>().is_ok(),
        "V6" => addr.parse::<Ipv6Addr>().is_ok(),
        _ => !addr.is_empty(),
    };
    if ok { Ok(()) } else { Err(format!("'{addr}' is not a valid {kind} address")) }
}

/// A server without a port takes the pool's `default_server_port`; its hostname defaults to
/// its address, as the controller stores it.
fn fill_pool_servers(pool: &mut Map<String, Value>) -> Result<(), String> {
    let count = pool.get("servers").and_then(Value::as_array).map_or(0, Vec::len);
    for index in 0..count {
        fill_pool_server(pool, index);
    }
    Ok(())
}

/// A server's port defaults to the pool's `default_server_port`, its hostname to its address.
fn fill_pool_server(pool: &mut Map<String, Value>, index: usize) {
    let default_port = pool.get("default_server_port").cloned().unwrap_or(json!(80));
    let Some(server) = pool.get_mut("servers").and_then(|s| s.get_mut(index)).and_then(Value::as_object_mut) else {
        return;
    };
    if !server.contains_key("port") {
        server.insert("port".into(), default_port);
    }
    if !server.contains_key("hostname") {
        let addr = server.get("ip").and_then(|ip| ip.get("addr")).cloned().unwrap_or(Value::Null);
        server.insert("hostname".into(), addr);
    }
}

fn check_merge_period(props: &mut Map<String, Value>) -> Result<(), String> {
    match props.get("async_patch_merge_period").and_then(Value::as_i64) {
        Some(0) | None => Ok(()),
        Some(p) if (30..=120).contains(&p) => Ok(()),
        Some(p) => Err(format!(
            "field 'async_patch_merge_period': value {p} is not allowed; use 0 (off) or a period within 30..120 seconds"
        )),
    }
}

fn check_range(obj: &mut Map<String, Value>) -> Result<(), String> {
    let family = |key: &str| obj.get(key).and_then(|ip| ip.get("type")).cloned();
    if family("begin") != family("end") {
        return Err("'begin' and 'end' must be of the same address type".into());
    }
    Ok(())
}

/// Health monitors of type HTTP/HTTPS carry their own sub-object; fill it so the object reads
/// like the controller's.
fn fill_health_monitor(hm: &mut Map<String, Value>) -> Result<(), String> {
    let key = match hm.get("type").and_then(Value::as_str) {
        Some("HEALTH_MONITOR_HTTP") => "http_monitor",
        Some("HEALTH_MONITOR_HTTPS") => "https_monitor",
        _ => return Ok(()),
    };
    hm.entry(key).or_insert_with(|| {
        json!({"http_request": "GET / HTTP/1.0", "http_response_code": ["HTTP_2XX", "HTTP_3XX"], "exact_http_request": false})
    });
    Ok(())
}

const LB_ALGORITHMS: &[&str] = &[
    "LB_ALGORITHM_LEAST_CONNECTIONS",
    "LB_ALGORITHM_ROUND_ROBIN",
    "LB_ALGORITHM_FASTEST_RESPONSE",
    "LB_ALGORITHM_CONSISTENT_HASH",
    "LB_ALGORITHM_LEAST_LOAD",
    "LB_ALGORITHM_FEWEST_SERVERS",
    "LB_ALGORITHM_RANDOM",
    "LB_ALGORITHM_FEWEST_TASKS",
    "LB_ALGORITHM_NEAREST_SERVER",
    "LB_ALGORITHM_CORE_AFFINITY",
    "LB_ALGORITHM_TOPOLOGY",
];
const LB_HASHES: &[&str] = &[
    "LB_ALGORITHM_CONSISTENT_HASH_SOURCE_IP_ADDRESS",
    "LB_ALGORITHM_CONSISTENT_HASH_SOURCE_IP_ADDRESS_AND_PORT",
    "LB_ALGORITHM_CONSISTENT_HASH_URI",
    "LB_ALGORITHM_CONSISTENT_HASH_CUSTOM_HEADER",
    "LB_ALGORITHM_CONSISTENT_HASH_CUSTOM_STRING",
    "LB_ALGORITHM_CONSISTENT_HASH_CALLID",
];
const CLOUD_TYPES: &[&str] = &[
    "CLOUD_NONE",
    "CLOUD_VCENTER",
    "CLOUD_OPENSTACK",
    "CLOUD_AWS",
    "CLOUD_VCA",
    "CLOUD_APIC",
    "CLOUD_MESOS",
    "CLOUD_LINUXSERVER",
    "CLOUD_DOCKER_UCP",
    "CLOUD_RANCHER",
    "CLOUD_OSHIFT_K8S",
    "CLOUD_AZURE",
    "CLOUD_GCP",
    "CLOUD_NSXT",
];
const HM_TYPES: &[&str] = &[
    "HEALTH_MONITOR_PING",
    "HEALTH_MONITOR_TCP",
    "HEALTH_MONITOR_HTTP",
    "HEALTH_MONITOR_HTTPS",
    "HEALTH_MONITOR_EXTERNAL",
    "HEALTH_MONITOR_UDP",
    "HEALTH_MONITOR_DNS",
    "HEALTH_MONITOR_GSLB",
    "HEALTH_MONITOR_SIP",
    "HEALTH_MONITOR_RADIUS",
    "HEALTH_MONITOR_SMTP",
    "HEALTH_MONITOR_SMTPS",
    "HEALTH_MONITOR_POP3",
    "HEALTH_MONITOR_POP3S",
    "HEALTH_MONITOR_IMAP",
    "HEALTH_MONITOR_IMAPS",
    "HEALTH_MONITOR_FTP",
    "HEALTH_MONITOR_FTPS",
    "HEALTH_MONITOR_LDAP",
    "HEALTH_MONITOR_LDAPS",
    "HEALTH_MONITOR_SCTP",
];
const LICENSE_TIERS: &[&str] =
    &["ENTERPRISE_16", "ENTERPRISE", "ENTERPRISE_18", "BASIC", "ESSENTIALS", "ENTERPRISE_WITH_CLOUD_SERVICES"];
const HTTP_CODES: &[&str] = &["HTTP_ANY", "HTTP_1XX", "HTTP_2XX", "HTTP_3XX", "HTTP_4XX", "HTTP_5XX"];
const ACCESS_TYPES: &[&str] = &["NO_ACCESS", "READ_ACCESS", "WRITE_ACCESS"];

fn sub_schemas() -> Vec<ObjectSchema> {
    vec![
        ObjectSchema {
            name: "IpAddr",
            fields: vec![f("addr", s()).required(), f("type", en(&["V4", "DNS", "V6"])).required()],
            hook: Some(check_ip_addr),
            entry_hook: None,
        },
        schema("IpAddrPrefix", vec![f("ip_addr", o("IpAddr")).required(), f("mask", int(0, 128)).required()]),
        ObjectSchema {
            name: "IpAddrRange",
            fields: vec![f("begin", o("IpAddr")).required(), f("end", o("IpAddr")).required()],
            hook: Some(check_range),
            entry_hook: None,
        },
        schema(
            "IpAddrPort",
            vec![f("ip", o("IpAddr")), f("port", int(U16.0, U16.1)).required(), f("hostname", s()), f("name", s())],
        ),
        schema("KeyValue", vec![f("key", s()).required(), f("value", s())]),
        schema("RoleFilterMatchLabel", vec![f("key", s()).required(), f("values", strs())]),
        schema(
            "Server",
            vec![
                f("ip", o("IpAddr")).required(),
                f("port", int(0, 65535)).describe("Absent: the pool's default_server_port."),
                f("ratio", int(1, 20)).default(1),
                f("enabled", b()).default(true),
                f("hostname", s()),
                f("description", s()),
                f("resolve_server_by_dns", b()).default(false),
                f("rewrite_host_header", b()).default(false),
                f("static", b()).default(false),
                f("verify_network", b()).default(false),
                f("external_uuid", s()),
                f("availability_zone", s()),
                f("server_node", s()),
                f("preference_order", int(1, 128)),
                f("nw_ref", r("network")),
            ],
        ),
        schema(
            "FailAction",
            vec![
                f(
                    "type",
                    en(&[
                        "FAIL_ACTION_CLOSE_CONN",
                        "FAIL_ACTION_HTTP_REDIRECT",
                        "FAIL_ACTION_HTTP_LOCAL_RSP",
                        "FAIL_ACTION_BACKUP_POOL",
                    ]),
                )
                .default("FAIL_ACTION_CLOSE_CONN"),
            ],
        ),
        schema(
            "Service",
            vec![
                f("port", int(0, 65535)).required(),
                f("port_range_end", int(0, 65535)),
                f("enable_ssl", b()).default(false),
                f("enable_http2", b()).default(false),
                f("override_application_profile_ref", r("applicationprofile")),
                f("override_network_profile_ref", r("networkprofile")),
                f("is_active_ftp_data_port", b()).default(false),
            ],
        ),
        schema(
            "HTTPPolicies",
            vec![f("index", int(0, U32_MAX)).required(), f("http_policy_set_ref", r("httppolicyset")).required()],
        ),
        schema(
            "Vip",
            vec![
                f("vip_id", s()).default("0"),
                f("ip_address", o("IpAddr")),
                f("ip6_address", o("IpAddr")),
                f("enabled", b()).default(true),
                f("auto_allocate_ip", b()).default(false),
                f("auto_allocate_floating_ip", b()).default(false),
                f("avi_allocated_vip", b()).default(false),
                f("avi_allocated_fip", b()).default(false),
                f("auto_allocate_ip_type", en(&["V4_ONLY", "V6_ONLY", "V4_V6"])).default("V4_ONLY"),
                f("prefix_length", int(0, 128)).default(32),
            ],
        ),
        schema(
            "GslbPoolMember",
            vec![
                f("ip", o("IpAddr")),
                f("fqdn", s()),
                f("enabled", b()).default(true),
                f("ratio", int(1, 20)).default(1),
                f("vs_uuid", s()),
                f("cluster_uuid", s()),
                f("hostname", s()),
                f("description", s()),
                f("preference_order", int(1, 128)).default(1),
            ],
        ),
        schema(
            "GslbPool",
            vec![
                f("name", s()).required(),
                f(
                    "algorithm",
                    en(&[
                        "GSLB_ALGORITHM_ROUND_ROBIN",
                        "GSLB_ALGORITHM_CONSISTENT_HASH",
                        "GSLB_ALGORITHM_GEO",
                        "GSLB_ALGORITHM_TOPOLOGY",
                    ]),
                )
                .required(),
                f("priority", int(0, 100)).default(10),
                f("enabled", b()).default(true),
                f("members", list(o("GslbPoolMember"), ListKey::None)),
                f("description", s()),
                f("manual_resume", b()).default(false),
            ],
        ),
        schema(
            "LinuxServerHost",
            vec![
                f("host_ip", o("IpAddr")).required(),
                f("host_attr", keyed("HostAttributes", &["attr_key"])),
                f("node_availability_zone", s()),
                f("se_group_ref", r("serviceenginegroup")),
            ],
        ),
        schema("HostAttributes", vec![f("attr_key", s()).required(), f("attr_val", s())]),
        schema(
            "LinuxServerConfiguration",
            vec![
                f("hosts", keyed("LinuxServerHost", &["host_ip.addr"])),
                f("se_inband_mgmt", b()).default(false),
                f("se_log_disk_path", s()),
                f("se_log_disk_size_GB", int(1, 1000)).default(5),
                f("se_sys_disk_path", s()),
                f("se_sys_disk_size_GB", int(1, 1000)).default(10),
                f("ssh_user_ref", r("cloudconnectoruser")),
            ],
        ),
        schema(
            "TenantConfiguration",
            vec![
                f("tenant_vrf", b()).default(false),
                f("se_in_provider_context", b()).default(true),
                f("tenant_access_to_provider_se", b()).default(true),
            ],
        ),
        schema(
            "PortalConfiguration",
            vec![
                f("allow_basic_authentication", b())
                    .default(true)
                    .describe("Fulcrum default: true (HTTP Basic auth over HTTPS, as the product docs use it)."),
                f("api_force_timeout", int(0, 10080)).default(24),
                f("disable_remote_cli_shell", b()).default(false),
                f("disable_swagger", b()).default(false),
                f("enable_clickjacking_protection", b()).default(true),
                f("enable_http", b()).default(true),
                f("enable_https", b()).default(true),
                f("http_port", int(U16.0, U16.1)),
                f("https_port", int(U16.0, U16.1)),
                f("minimum_password_length", int(6, 32)).default(8),
                f("password_strength_check", b()).default(false),
                f("redirect_to_https", b()).default(true),
                f("sslkeyandcertificate_refs", refs("sslkeyandcertificate")),
                f("use_uuid_from_input", b()).default(false),
            ],
        ),
        schema(
            "SnmpConfiguration",
            vec![
                f("community", s()),
                f("version", en(&["SNMP_VER2", "SNMP_VER3"])).default("SNMP_VER2"),
                f("sys_contact", s()),
                f("sys_location", s()),
                f("large_trap_payload", b()).default(false),
            ],
        ),
        schema("DNSConfiguration", vec![f("server_list", keyed("IpAddr", &["addr"])), f("search_domain", s())]),
        schema("NTPConfiguration", vec![f("ntp_servers", list(o("NTPServer"), ListKey::Fields(&["server.addr"])))]),
        schema("NTPServer", vec![f("server", o("IpAddr")).required(), f("key_number", int(1, 65534))]),
        schema(
            "HealthMonitorHttp",
            vec![
                f("http_request", s()).default("GET / HTTP/1.0"),
                f("http_response_code", list(en(HTTP_CODES), ListKey::Value)),
                f("http_response", s()),
                f("exact_http_request", b()).default(false),
                f("maintenance_code", list(int(101, 599), ListKey::Value)),
                f("maintenance_response", s()),
            ],
        ),
        schema(
            "HealthMonitorTcp",
            vec![f("tcp_request", s()), f("tcp_response", s()), f("tcp_half_open", b()).default(false)],
        ),
        schema(
            "UserRole",
            vec![
                f("role_ref", r("role")).required(),
                f("tenant_ref", r("tenant")),
                f("all_tenants", b()).default(false),
            ],
        ),
        schema(
            "Permission",
            vec![
                f("resource", s()).required().describe("PERMISSION_<TYPE>, or * for every type."),
                f("type", en(ACCESS_TYPES)).required(),
            ],
        ),
        schema(
            "BuildInfo",
            vec![
                f("build_no", int(0, U32_MAX)),
                f("date", s()),
                f("min_version", s()),
                f("patch_version", s()),
                f("product", s()),
                f("product_name", s()),
                f("tag", s()),
                f("version", s()),
            ],
        ),
        schema(
            "OperationalStatus",
            vec![
                f("state", en(&["OPER_UP", "OPER_DOWN", "OPER_RESOURCES", "OPER_UNAVAIL", "OPER_DISABLED"])),
                f("reason", strs()),
                f("last_changed_time", o("TimeStamp")),
            ],
        ),
        schema(
            "SeResources",
            vec![f("num_vcpus", int(0, 4096)), f("memory", int(0, i64::MAX)), f("disk", int(0, i64::MAX))],
        ),
        schema(
            "SeInstallStatus",
            vec![
                f("command_id", int(0, i64::MAX)),
                f("operation", en(&["SE_INSTALL", "SE_ROLLBACK"])),
                f("image_ref", r("image")),
                f("image_name", s()),
                f("state", s()),
                f("progress", int(0, 100)),
                f("reason", s()),
                f("start_time", s()),
                f("end_time", s()),
                f("events", Kind::Any),
            ],
        ),
        schema(
            "SingleLicense",
            vec![
                f("license_id", s()).required(),
                f("license_name", s()),
                f("cores", int(0, 1_000_000)).required().describe("SE cores this license allows."),
            ],
        ),
        schema("PatchInfo", vec![f("patch_type", s()), f("reboot", b()).default(false)]),
        schema(
            "PackageDetails",
            vec![
                f("build", o("BuildInfo")),
                f("hash", s()).describe("sha256 of the package file"),
                f("path", s()),
                f("patch", o("PatchInfo")),
            ],
        ),
        schema("TimeStamp", vec![f("secs", int(0, i64::MAX)).required(), f("usecs", int(0, 999_999)).required()]),
        schema(
            "ImageUploadOpsStatus",
            vec![
                f(
                    "state",
                    en(&["IMAGE_FSM_STARTED", "IMAGE_FSM_IN_PROGRESS", "IMAGE_FSM_COMPLETED", "IMAGE_FSM_FAILED"]),
                ),
                f("reason", s()),
                f("last_changed_time", o("TimeStamp")),
            ],
        ),
        schema(
            "ImageCloudData",
            vec![f("cloud_name", s()), f("cloud_data_values", list(o("KeyValue"), ListKey::Fields(&["key"])))],
        ),
        schema("ClusterNode", vec![f("ip", o("IpAddr")).required(), f("name", s()).default("node"), f("vm_uuid", s())]),
        schema(
            "SSLCertificate",
            vec![
                f("certificate", s()),
                f("subject", o("SSLCertificateDescription")),
                f("issuer", o("SSLCertificateDescription")),
                f("expiry_status", s()),
                f("self_signed", b()),
            ],
        ),
        schema("SSLCertificateDescription", vec![f("common_name", s()), f("organization", s())]),
        schema("HTTPRequestPolicy", vec![f("rules", list(Kind::Any, ListKey::Fields(&["index"])))]),
    ]
}

fn object_schemas() -> Vec<ObjectSchema> {
    vec![
        schema(
            "Tenant",
            named(vec![
                f("local", b()).default(true),
                f("config_settings", o("TenantConfiguration")),
                f("attrs", keyed("KeyValue", &["key"])),
                f("created_by", s()),
            ]),
        ),
        schema(
            "User",
            vec![
                f("name", s()).required(),
                f("username", s()),
                f("full_name", s()),
                f("email", s()),
                f("local", b()).default(true),
                f("is_superuser", b()).default(false),
                f("is_active", b()).default(true),
                f("access", keyed("UserRole", &["tenant_ref"])),
                f("default_tenant_ref", r("tenant")),
            ],
        ),
        schema(
            "Image",
            vec![
                f("name", s()).required(),
                f("type", en(&["IMAGE_TYPE_PATCH", "IMAGE_TYPE_SYSTEM", "IMAGE_TYPE_MUST_CHECK"])),
                f("controller_info", o("PackageDetails")),
                f("se_info", o("PackageDetails")),
                f("controller_patch_name", s()),
                f("se_patch_name", s()),
                f("controller_patch_ref", r("image")),
                f("se_patch_ref", r("image")),
                f("uber_bundle", b()).default(false),
                f("cloud_info_values", list(o("ImageCloudData"), ListKey::Fields(&["cloud_name"]))),
                f("migrations", Kind::Any).describe("Requirements of the package (SupportedMigrations)."),
                f("img_state", o("ImageUploadOpsStatus")),
                f("progress", int(0, 100)).default(0).describe("Upload progress in percent."),
                f("start_time", s()),
                f("end_time", s()),
                f("duration", int(0, U32_MAX)).describe("Seconds the upload took."),
                f("size", int(0, i64::MAX)).describe("Bytes of the package file."),
                f("tasks_completed", int(0, U32_MAX)).default(0),
                f("total_tasks", int(0, U32_MAX)).default(0),
                f("node_states", keyed("ImageNodeState", &["node"]))
                    .describe("Each controller node's copy of the package file (Fulcrum; reported, not configured)."),
            ],
        ),
        schema(
            "ImageNodeState",
            vec![
                f("node", s()).required(),
                f("up", b()),
                f(
                    "state",
                    en(&["IMAGE_FSM_STARTED", "IMAGE_FSM_IN_PROGRESS", "IMAGE_FSM_COMPLETED", "IMAGE_FSM_FAILED"]),
                ),
                f("progress", int(0, 100)),
                f("reason", s()),
                f("last_failure", s()).describe("The last failure of this node's copy, kept after it was replaced."),
                f("last_changed_time", o("TimeStamp")),
            ],
        ),
        schema("Role", named(vec![f("privileges", keyed("Permission", &["resource"]))])),
        schema(
            "Cloud",
            named(vec![
                f("vtype", en(CLOUD_TYPES)).required(),
                f("mtu", int(68, 9000)).default(1500),
                f("dhcp_enabled", b()).default(false),
                f(
                    "license_type",
                    en(&["LIC_BACKEND_SERVERS", "LIC_SOCKETS", "LIC_CORES", "LIC_HOSTS", "LIC_SE_BANDWIDTH"]),
                ),
                f("license_tier", en(LICENSE_TIERS)),
                f("ipam_provider_ref", r("ipamdnsproviderprofile")),
                f("dns_provider_ref", r("ipamdnsproviderprofile")),
                f("linuxserver_configuration", o("LinuxServerConfiguration")),
                f("prefer_static_routes", b()).default(false),
                f("state_based_dns_registration", b()).default(true),
                f("autoscale_polling_interval", int(60, 3600)).default(60),
            ]),
        ),
        schema(
            "VrfContext",
            named(vec![
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("system_default", b()).default(false),
            ]),
        ),
        ObjectSchema {
            name: "Pool",
            fields: named(vec![
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("vrf_ref", r("vrfcontext")).default(ref_default("vrfcontext", "global")),
                f("enabled", b()).default(true),
                f("default_server_port", int(U16.0, U16.1)).default(80),
                f("lb_algorithm", en(LB_ALGORITHMS)).default("LB_ALGORITHM_LEAST_CONNECTIONS"),
                f("lb_algorithm_hash", en(LB_HASHES)).default("LB_ALGORITHM_CONSISTENT_HASH_SOURCE_IP_ADDRESS"),
                f("lb_algorithm_consistent_hash_hdr", s()),
                f("request_queue_enabled", b()).default(false),
                f("request_queue_depth", int(0, U32_MAX)).default(128),
                f(
                    "servers",
                    Kind::List(Box::new(ListSpec {
                        item: o("Server"),
                        max: Some(5000),
                        key: ListKey::Fields(&["ip.addr", "port"]),
                        key_defaults: &[("port", "default_server_port")],
                    })),
                ),
                f("health_monitor_refs", list_max(r("healthmonitor"), ListKey::Value, 50)),
                f("inline_health_monitor", b()).default(true),
                f("min_servers_up", int(1, U32_MAX)),
                f("graceful_disable_timeout", int(-1, 7200)).default(1),
                f("connection_ramp_duration", int(0, 300)).default(10),
                f("max_concurrent_connections_per_server", int(0, U32_MAX)).default(0),
                f("use_service_port", b()).default(false),
                f("append_port", en(&["NON_DEFAULT_80_443", "NEVER", "ALWAYS"])).default("NON_DEFAULT_80_443"),
                f("sni_enabled", b()).default(true),
                f("server_name", s()),
                f("ssl_profile_ref", r("sslprofile")),
                f("ssl_key_and_certificate_ref", r("sslkeyandcertificate")),
                f("fail_action", o("FailAction")),
                f("server_timeout", int(0, 21_600_000)).default(0),
                f("pool_type", en(&["POOL_TYPE_GENERIC_APP", "POOL_TYPE_OAUTH"])).default("POOL_TYPE_GENERIC_APP"),
                f(
                    "server_disable_type",
                    en(&["DISALLOW_NEW_CONNECTION", "ALLOW_NEW_CONNECTION_IF_PERSISTENCE_PRESENT"]),
                )
                .default("DISALLOW_NEW_CONNECTION"),
                f("analytics_profile_ref", r("analyticsprofile"))
                    .default(ref_default("analyticsprofile", "System-Analytics-Profile")),
                f("ipaddrgroup_ref", r("ipaddrgroup")),
                f("domain_name", strs()),
                f("east_west", b()).default(false),
                f("delete_server_on_dns_refresh", b()).default(true),
                f("enable_http2", b()).default(false),
                f("created_by", s()),
            ]),
            hook: Some(fill_pool_servers),
            entry_hook: Some(crate::model::EntryHook { list: "servers", fill: fill_pool_server }),
        },
        schema(
            "VsVip",
            named(vec![
                f("vip", keyed("Vip", &["vip_id"])),
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("vrf_context_ref", r("vrfcontext")).default(ref_default("vrfcontext", "global")),
                f("east_west_placement", b()).default(false),
                f("dns_info", list(Kind::Any, ListKey::None)),
            ]),
        ),
        schema(
            "VirtualService",
            named(vec![
                f("enabled", b()).default(true),
                f("traffic_enabled", b()).default(true),
                f("type", en(&["VS_TYPE_NORMAL", "VS_TYPE_VH_PARENT", "VS_TYPE_VH_CHILD"])).default("VS_TYPE_NORMAL"),
                f("services", list(o("Service"), ListKey::Fields(&["port"]))),
                f("vsvip_ref", r("vsvip")),
                f("pool_ref", r("pool")),
                f("pool_group_ref", r("poolgroup")),
                f("application_profile_ref", r("applicationprofile"))
                    .default(ref_default("applicationprofile", "System-HTTP")),
                f("network_profile_ref", r("networkprofile"))
                    .default(ref_default("networkprofile", "System-TCP-Proxy")),
                f("se_group_ref", r("serviceenginegroup")).default(ref_default("serviceenginegroup", "Default-Group")),
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("cloud_type", en(CLOUD_TYPES)).default("CLOUD_NONE"),
                f("vrf_context_ref", r("vrfcontext")).default(ref_default("vrfcontext", "global")),
                f("ssl_profile_ref", r("sslprofile")),
                f("ssl_key_and_certificate_refs", refs("sslkeyandcertificate")),
                f("http_policies", keyed("HTTPPolicies", &["index"])),
                f("vh_domain_name", strs()),
                f("analytics_profile_ref", r("analyticsprofile"))
                    .default(ref_default("analyticsprofile", "System-Analytics-Profile")),
                f("east_west_placement", b()).default(false),
                f(
                    "flow_dist",
                    en(&[
                        "LOAD_AWARE",
                        "CONSISTENT_HASH_SOURCE_IP_ADDRESS",
                        "CONSISTENT_HASH_SOURCE_IP_ADDRESS_AND_PORT",
                    ]),
                )
                .default("LOAD_AWARE"),
                f("created_by", s()),
            ]),
        ),
        ObjectSchema {
            name: "HealthMonitor",
            fields: named(vec![
                f("type", en(HM_TYPES)).required(),
                f("send_interval", int(1, 3600)).default(10),
                f("receive_timeout", int(1, 2400)).default(4),
                f("successful_checks", int(1, 50)).default(2),
                f("failed_checks", int(1, 50)).default(2),
                f("monitor_port", int(0, 65535)),
                f("is_federated", b()).default(false),
                f("allow_duplicate_monitors", b()),
                f("http_monitor", o("HealthMonitorHttp")),
                f("https_monitor", o("HealthMonitorHttp")),
                f("tcp_monitor", o("HealthMonitorTcp")),
            ]),
            hook: Some(fill_health_monitor),
            entry_hook: None,
        },
        schema(
            "ServiceEngineGroup",
            named(vec![
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("ha_mode", en(&["HA_MODE_SHARED_PAIR", "HA_MODE_SHARED", "HA_MODE_LEGACY_ACTIVE_STANDBY"]))
                    .default("HA_MODE_SHARED"),
                f("active_standby", b()).default(false),
                f("algo", en(&["PLACEMENT_ALGO_PACKED", "PLACEMENT_ALGO_DISTRIBUTED"]))
                    .default("PLACEMENT_ALGO_PACKED"),
                f("max_se", int(0, 1000)).default(10),
                f("max_vs_per_se", int(1, 1000)).default(10),
                f("min_scaleout_per_vs", int(1, 64)).default(1),
                f("max_scaleout_per_vs", int(1, 64)).default(4),
                f("buffer_se", int(0, U32_MAX)).default(1),
                f("vcpus_per_se", int(1, 64)).default(1),
                f("memory_per_se", int(1024, U32_MAX)).default(2048),
                f("disk_per_se", int(1, U32_MAX)).default(15),
                f("se_name_prefix", s()).default("Avi"),
                f("se_deprovision_delay", int(0, 10080)).default(120),
                f("placement_mode", en(&["PLACEMENT_MODE_AUTO"])).default("PLACEMENT_MODE_AUTO"),
                f(
                    "license_type",
                    en(&["LIC_BACKEND_SERVERS", "LIC_SOCKETS", "LIC_CORES", "LIC_HOSTS", "LIC_SE_BANDWIDTH"]),
                ),
                f("license_tier", en(LICENSE_TIERS)),
                f("reboot_on_panic", b()).default(true),
                f("vs_scalein_timeout_for_upgrade", int(0, U32_MAX)).default(30),
                f("vs_switchover_timeout", int(0, U32_MAX)).default(300),
            ]),
        ),
        schema(
            "ServiceEngine",
            vec![
                f("name", s()).default("VM name unknown"),
                f("se_group_ref", r("serviceenginegroup")).default(ref_default("serviceenginegroup", "Default-Group")),
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f(
                    "enable_state",
                    en(&[
                        "SE_STATE_ENABLED",
                        "SE_STATE_DISABLED_FOR_PLACEMENT",
                        "SE_STATE_DISABLED",
                        "SE_STATE_DISABLED_FORCE",
                    ]),
                )
                .default("SE_STATE_ENABLED"),
                f("controller_ip", s()),
                f("container_mode", b()).default(false),
                f("container_type", en(&["CONTAINER_TYPE_HOST", "CONTAINER_TYPE_BRIDGE"]))
                    .default("CONTAINER_TYPE_HOST"),
                f("controller_created", b()).default(true),
                f("availability_zone", s()),
                f("flavor", s()),
                f("hypervisor", s()),
                // What the agent reports and the controller decides; never set by clients.
                f("oper_status", o("OperationalStatus")).read_only(),
                f("version", s()).read_only().describe("Version of the SE's active slot, as the agent reports it."),
                f("build", int(0, i64::MAX)).read_only(),
                f("patch_version", s()).read_only(),
                f("previous_version", s()).read_only().describe("What the other slot holds (the rollback target)."),
                f("resources", o("SeResources")).read_only(),
                f("free_disk_bytes", int(0, i64::MAX)).read_only().describe("Free space of the agent's data dir."),
                f("last_heartbeat", s()).read_only(),
                f("license_state", en(&["LICENSE_STATE_LICENSED", "LICENSE_STATE_UNLICENSED"])).read_only(),
                f("licensed_cores", int(0, U32_MAX)).read_only(),
                f("vs_refs", refs("virtualservice")).read_only().describe("Virtual services placed on this SE."),
                f("install_status", o("SeInstallStatus")).read_only(),
            ],
        ),
        schema(
            "SeJoinToken",
            named(vec![
                f("se_group_ref", r("serviceenginegroup")).required(),
                f("created", s()).read_only(),
                f("joined", int(0, U32_MAX)).read_only().default(0).describe("How many SEs joined with it."),
            ]),
        ),
        schema("ControllerLicense", vec![f("licenses", keyed("SingleLicense", &["license_id"]))]),
        schema(
            "IpAddrGroup",
            named(vec![
                f("addrs", keyed("IpAddr", &["addr"])),
                f("prefixes", keyed("IpAddrPrefix", &["ip_addr.addr", "mask"])),
                f("ranges", keyed("IpAddrRange", &["begin.addr", "end.addr"])),
                f("ip_ports", keyed("IpAddrPort", &["ip.addr", "port"])),
                f("country_codes", strs()),
            ]),
        ),
        schema(
            "StringGroup",
            named(vec![
                f("type", en(&["SG_TYPE_STRING", "SG_TYPE_KEYVAL"])).required().default("SG_TYPE_STRING"),
                f("kv", keyed("KeyValue", &["key"])),
                f("longest_match", b()).default(false),
            ]),
        ),
        schema(
            "MicroService",
            named(vec![f("application_name", s()), f("orchestrator_name", s()), f("created_by", s())]),
        ),
        schema("MicroServiceGroup", named(vec![f("service_refs", refs("microservice")), f("created_by", s())])),
        schema(
            "GslbService",
            named(vec![
                f("enabled", b()).default(true),
                f("domain_names", strs()),
                f("groups", keyed("GslbPool", &["name"])),
                f("health_monitor_refs", list_max(r("healthmonitor"), ListKey::Value, 6)),
                f(
                    "health_monitor_scope",
                    en(&[
                        "GSLB_SERVICE_HEALTH_MONITOR_ALL_MEMBERS",
                        "GSLB_SERVICE_HEALTH_MONITOR_ONLY_NON_AVI_MEMBERS",
                    ]),
                )
                .default("GSLB_SERVICE_HEALTH_MONITOR_ALL_MEMBERS"),
                f("pool_algorithm", en(&["GSLB_SERVICE_ALGORITHM_PRIORITY", "GSLB_SERVICE_ALGORITHM_GEO"]))
                    .default("GSLB_SERVICE_ALGORITHM_PRIORITY"),
                f("ttl", int(0, 86400)),
                f("num_dns_ip", int(1, 20)),
                f("min_members", int(0, 65535)).default(0),
                f("controller_health_status_enabled", b()).default(true),
                f("is_federated", b()).default(true),
                f("use_edns_client_subnet", b()).default(true),
                f("site_persistence_enabled", b()).default(false),
                f("wildcard_match", b()).default(false),
                f("resolve_cname", b()).default(false),
                f("hm_off", b()).default(false),
            ]),
        ),
        schema(
            "SSLKeyAndCertificate",
            named(vec![
                f(
                    "type",
                    en(&[
                        "SSL_CERTIFICATE_TYPE_VIRTUALSERVICE",
                        "SSL_CERTIFICATE_TYPE_SYSTEM",
                        "SSL_CERTIFICATE_TYPE_CA",
                    ]),
                )
                .default("SSL_CERTIFICATE_TYPE_VIRTUALSERVICE"),
                f("certificate", o("SSLCertificate")),
                f("key", s()).write_only().describe("The private key (PEM): stored and used, never shown."),
                f("key_passphrase", s()).write_only(),
                f("certificate_base64", b()).default(false),
                f("key_base64", b()).default(false),
                f("format", en(&["SSL_PEM", "SSL_PKCS12"])).default("SSL_PEM"),
                f("status", s()).default("SSL_CERTIFICATE_FINISHED"),
                f("created_by", s()),
            ]),
        ),
        schema(
            "SSLProfile",
            named(vec![
                f("accepted_versions", list(Kind::Any, ListKey::None)),
                f("accepted_ciphers", s()),
                f("type", en(&["SSL_PROFILE_TYPE_APPLICATION", "SSL_PROFILE_TYPE_SYSTEM"]))
                    .default("SSL_PROFILE_TYPE_APPLICATION"),
            ]),
        ),
        schema(
            "ApplicationProfile",
            named(vec![
                f(
                    "type",
                    en(&[
                        "APPLICATION_PROFILE_TYPE_L4",
                        "APPLICATION_PROFILE_TYPE_HTTP",
                        "APPLICATION_PROFILE_TYPE_SYSLOG",
                        "APPLICATION_PROFILE_TYPE_DNS",
                        "APPLICATION_PROFILE_TYPE_SSL",
                        "APPLICATION_PROFILE_TYPE_SIP",
                    ]),
                )
                .required(),
                f("http_profile", Kind::Any),
            ]),
        ),
        schema("NetworkProfile", named(vec![f("profile", Kind::Any), f("connection_mirror", b()).default(false)])),
        schema("AnalyticsProfile", named(vec![f("apdex_response_threshold", int(1, 30000)).default(500)])),
        schema(
            "Network",
            named(vec![
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
                f("dhcp_enabled", b()).default(true),
            ]),
        ),
        schema(
            "PoolGroup",
            named(vec![
                f("members", list(Kind::Any, ListKey::None)),
                f("cloud_ref", r("cloud")).default(ref_default("cloud", "Default-Cloud")),
            ]),
        ),
        schema("IpamDnsProviderProfile", named(vec![f("type", s()).required()])),
        schema("CloudConnectorUser", named(vec![f("private_key", s()), f("public_key", s())])),
        schema(
            "HTTPPolicySet",
            named(vec![
                f("http_request_policy", o("HTTPRequestPolicy")),
                f("http_response_policy", o("HTTPRequestPolicy")),
                f("http_security_policy", o("HTTPRequestPolicy")),
                f("is_internal_policy", b()).default(false),
                f("created_by", s()),
            ]),
        ),
        schema(
            "SystemConfiguration",
            vec![
                f("portal_configuration", o("PortalConfiguration")),
                f("global_tenant_config", o("TenantConfiguration")),
                f("dns_virtualservice_refs", refs("virtualservice")),
                f("dns_configuration", o("DNSConfiguration")),
                f("ntp_configuration", o("NTPConfiguration")),
                f("snmp_configuration", o("SnmpConfiguration")),
                f("default_license_tier", en(LICENSE_TIERS)).default("ENTERPRISE_WITH_CLOUD_SERVICES"),
                f("docker_mode", b()).default(false),
                f("fips_mode", b()).default(false),
                f("common_criteria_mode", b()).default(false),
                f("enable_cors", b()).default(false),
                f("welcome_workflow_complete", b()).default(false),
                f("ssh_ciphers", strs()),
                f("ssh_hmacs", strs()),
                f("linux_configuration", Kind::Any),
                f("email_configuration", Kind::Any),
                f("admin_auth_configuration", Kind::Any),
                f("rekey_time_limit", s()).default("none"),
                f("rekey_volume_limit", s()).default("default"),
            ],
        ),
        ObjectSchema {
            name: "ControllerProperties",
            fields: vec![
                f("async_patch_merge_period", int(0, 120))
                    .default(0)
                    .describe("Seconds async PATCH requests are queued before they are merged; 0 is off, else 30-120."),
                f("async_patch_request_cleanup_duration", int(5, 120))
                    .default(60)
                    .describe("Minutes a finished async PATCH request's status is kept."),
                f("api_idle_timeout", int(0, 43200)).default(15).describe("Minutes an idle session lives."),
                f("upgrade_concurrent_segroups", int(1, 1000))
                    .default(1)
                    .describe("SE groups an upgrade operation works on at once."),
                f("upgrade_se_batch_size", int(1, 1000))
                    .default(1)
                    .describe("SEs of a group upgraded at once (rolling)."),
                f("upgrade_se_timeout", int(10, 86400))
                    .default(600)
                    .describe("Seconds an SE has to finish its install before it counts as failed."),
                f("upgrade_controller_node_timeout", int(10, 86400)).default(300).describe(
                    "Seconds a controller node has for one upgrade step (for its restart: to be back on the new version).",
                ),
                f("upgrade_vs_move_timeout", int(1, 3600))
                    .default(30)
                    .describe("Seconds to wait for an SE's virtual services to move before it is upgraded anyway."),
                f("upgrade_max_alerts", int(0, 100000))
                    .default(0)
                    .describe("Open alerts above which the upgrade prechecks warn."),
                f("api_perf_logging_threshold", int(10, U32_MAX)).default(10000),
                f("default_minimum_api_timeout", int(60, 3600)).default(60),
                f("allow_unauthenticated_apis", b()).default(false),
                f("allow_unauthenticated_nodes", b()).default(false),
                f("cleanup_sessions_timeout_period", int(1, U32_MAX)).default(60),
                f("dead_se_detection_timer", int(1, 1200)).default(360),
                f("max_dead_se_in_grp", int(1, 1000)).default(1),
                f("dns_refresh_period", int(1, 10080)).default(60),
                f("upgrade_lease_time", int(600, 1800)).default(600),
                f("seupgrade_segroup_min_dead_timeout", int(60, U32_MAX)).default(360),
                f("system_report_limit", int(5, 100)).default(10),
            ],
            hook: Some(check_merge_period),
            entry_hook: None,
        },
        schema(
            "Cluster",
            vec![
                f("name", s()).required().default("cluster-0-1"),
                f("nodes", keyed("ClusterNode", &["ip.addr"])),
                f("virtual_ip", o("IpAddr")),
                f("rejoin_nodes_automatically", b()).default(true),
            ],
        ),
    ]
}

fn api_types() -> Vec<TypeDef> {
    use Scope::{Global, Tenant};
    let singleton = |path, schema| TypeDef { path, schema, scope: Global, singleton: true, system_created: false };
    vec![
        api_type("tenant", "Tenant", Global),
        api_type("user", "User", Global),
        api_type("role", "Role", Global),
        api_type("cloud", "Cloud", Tenant),
        api_type("vrfcontext", "VrfContext", Tenant),
        api_type("network", "Network", Tenant),
        api_type("ipamdnsproviderprofile", "IpamDnsProviderProfile", Tenant),
        api_type("cloudconnectoruser", "CloudConnectorUser", Tenant),
        api_type("pool", "Pool", Tenant),
        api_type("poolgroup", "PoolGroup", Tenant),
        api_type("vsvip", "VsVip", Tenant),
        api_type("virtualservice", "VirtualService", Tenant),
        api_type("healthmonitor", "HealthMonitor", Tenant),
        api_type("serviceenginegroup", "ServiceEngineGroup", Tenant),
        TypeDef {
            path: "serviceengine",
            schema: "ServiceEngine",
            scope: Tenant,
            singleton: false,
            system_created: true,
        },
        TypeDef { path: "image", schema: "Image", scope: Tenant, singleton: false, system_created: true },
        TypeDef { path: "sejointoken", schema: "SeJoinToken", scope: Tenant, singleton: false, system_created: true },
        api_type("ipaddrgroup", "IpAddrGroup", Tenant),
        api_type("stringgroup", "StringGroup", Tenant),
        api_type("microservice", "MicroService", Tenant),
        api_type("microservicegroup", "MicroServiceGroup", Tenant),
        api_type("gslbservice", "GslbService", Tenant),
        api_type("sslkeyandcertificate", "SSLKeyAndCertificate", Tenant),
        api_type("sslprofile", "SSLProfile", Tenant),
        api_type("applicationprofile", "ApplicationProfile", Tenant),
        api_type("networkprofile", "NetworkProfile", Tenant),
        api_type("analyticsprofile", "AnalyticsProfile", Tenant),
        api_type("httppolicyset", "HTTPPolicySet", Tenant),
        singleton("systemconfiguration", "SystemConfiguration"),
        singleton("controllerproperties", "ControllerProperties"),
        singleton("cluster", "Cluster"),
        singleton("controllerlicense", "ControllerLicense"),
    ]
}

fn build() -> Registry {
    let mut schemas = HashMap::new();
    for schema in sub_schemas().into_iter().chain(object_schemas()) {
        let name = schema.name;
        assert!(schemas.insert(name, schema).is_none(), "schema {name} defined twice");
    }
    fn holds_refs(schemas: &HashMap<&'static str, ObjectSchema>, kind: &Kind) -> bool {
        match kind {
            Kind::Ref(_) => true,
            Kind::Obj(name) => schemas[name].fields.iter().any(|f| holds_refs(schemas, &f.kind)),
            Kind::List(spec) => holds_refs(schemas, &spec.item),
            _ => false,
        }
    }
    let ref_fields = schemas
        .values()
        .map(|s| {
            (
                s.name,
                s.fields.iter().enumerate().filter(|(_, f)| holds_refs(&schemas, &f.kind)).map(|(i, _)| i).collect(),
            )
        })
        .collect();
    Registry { schemas, types: api_types(), ref_fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every schema, kind and reference named anywhere must exist, so a typo fails here
    /// rather than at the first request that touches the field.
    #[test]
    fn every_name_used_in_the_tables_is_defined() {
        let reg = Registry::get();
        fn check(reg: &Registry, kind: &Kind, at: &str) {
            match kind {
                Kind::Obj(name) => assert!(reg.schemas.contains_key(name), "{at}: schema {name}"),
                Kind::Ref(target) => assert!(reg.type_def(target).is_some(), "{at}: type {target}"),
                Kind::List(spec) => {
                    check(reg, &spec.item, at);
                    if let (ListKey::Fields(keys), Kind::Obj(name)) = (&spec.key, &spec.item) {
                        for key in *keys {
                            let first = key.split('.').next().unwrap();
                            assert!(reg.schema(name).field(first).is_some(), "{at}: key {key}");
                        }
                    }
                }
                _ => {}
            }
        }
        for schema in reg.schemas() {
            for field in &schema.fields {
                check(reg, &field.kind, &format!("{}.{}", schema.name, field.name));
            }
        }
        for t in reg.types() {
            reg.schema(t.schema);
        }
    }
}
