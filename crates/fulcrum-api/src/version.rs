//! The version this controller reports, and time formatting for API fields.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The Avi API version Fulcrum is compatible with, and the built-in base version a fresh data
/// dir starts from.
pub const VERSION: &str = "30.2.1";
pub const BUILD: u64 = 9001;
/// Build date of the base version, in the tag's `YYYYMMDD.HHMMSS` form.
pub const BUILD_DATE: &str = "20261101.000000";

pub use fulcrum_package::tag_of;

/// The `version` object of `/login`, `/api/initial-data` and `/api/cluster/version`: what the
/// controller runs (its active slot).
pub fn info(running: &crate::upgrade::slots::SlotInfo) -> Value {
    let mut out = json!({
        "Version": running.version,
        "build": running.build,
        "Tag": running.tag,
        "min_version": 15.2,
        "ProductName": "Fulcrum Controller",
        "Product": "controller",
    });
    if let Some(p) = &running.patch {
        out["patch"] = json!(p);
    }
    out
}

/// RFC 3339 in UTC with microseconds, as the controller prints times.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let [year, month, day, hour, minute, second] = fulcrum_package::civil_utc(d.as_secs() as i64);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:06}+00:00", d.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_micros(1_595_317_883_372_279)),
            "2020-07-21T07:51:23.372279+00:00"
        );
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000+00:00");
    }
}
