//! References between objects (`*_ref`, `*_refs`).
//!
//! Clients send references in several forms (a full URL with or without `#name`,
//! `/api/<type>/<uuid>`, a bare uuid, `/api/<type>?name=<name>`). Inside Fulcrum a reference is
//! kept in one canonical form, `/api/<type>/<uuid>`; a by-name reference is kept as
//! `/api/<type>?name=<name>` only until the write that carries it resolves it.

use percent_encoding::percent_decode_str;

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefTarget {
    Uuid { kind: String, uuid: String },
    Name { kind: String, name: String },
}

impl RefTarget {
    /// The form stored in objects.
    pub fn canonical(&self) -> String {
        match self {
            RefTarget::Uuid { kind, uuid } => canonical(kind, uuid),
            RefTarget::Name { kind, name } => format!("/api/{kind}?name={name}"),
        }
    }
}

/// `/api/<kind>/<uuid>`.
pub fn canonical(kind: &str, uuid: &str) -> String {
    format!("/api/{kind}/{uuid}")
}

/// Splits a canonical `/api/<kind>/<uuid>` into its parts.
pub fn split_canonical(reference: &str) -> Option<(&str, &str)> {
    let rest = reference.strip_prefix("/api/")?;
    let (kind, uuid) = rest.split_once('/')?;
    (!kind.is_empty() && !uuid.is_empty() && !uuid.contains('/')).then_some((kind, uuid))
}

/// Parses any accepted input form of a reference to an object of type `expected`.
pub fn parse(expected: &str, input: &str) -> Result<RefTarget, String> {
    let input = input.trim();
    let without_fragment = input.split('#').next().unwrap_or_default();
    if without_fragment.is_empty() {
        return Err("empty reference".into());
    }
    let path = match without_fragment.split_once("://") {
        Some((_scheme, rest)) => match rest.find('/') {
            Some(i) => &rest[i..],
            None => return Err(format!("reference '{input}' has no path")),
        },
        None => without_fragment,
    };
    let Some(api_path) = path.strip_prefix("/api/") else {
        if path.contains('/') || path.contains('?') {
            return Err(format!("reference '{input}' is not a uuid, a URL or /api/<type>/<uuid>"));
        }
        return Ok(RefTarget::Uuid { kind: expected.into(), uuid: path.into() });
    };
    let (path_part, query) = match api_path.split_once('?') {
        Some((p, q)) => (p.trim_end_matches('/'), Some(q)),
        None => (api_path.trim_end_matches('/'), None),
    };
    let (kind, uuid) = match path_part.split_once('/') {
        Some((kind, uuid)) => (kind, Some(uuid)),
        None => (path_part, None),
    };
    if kind != expected {
        return Err(format!("reference '{input}' points to a {kind}, expected a {expected}"));
    }
    match (uuid, query) {
        (Some(uuid), _) if !uuid.is_empty() && !uuid.contains('/') => {
            Ok(RefTarget::Uuid { kind: kind.into(), uuid: uuid.into() })
        }
        (None, Some(query)) => {
            let name = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("name="))
                .ok_or_else(|| format!("reference '{input}' names no object (expected ?name=<name>)"))?;
            let name = percent_decode_str(&name.replace('+', " ")).decode_utf8_lossy().into_owned();
            if name.is_empty() {
                return Err(format!("reference '{input}' has an empty name"));
            }
            Ok(RefTarget::Name { kind: kind.into(), name })
        }
        _ => Err(format!("reference '{input}' is not of the form /api/{expected}/<uuid>")),
    }
}

/// The form a client sees: `https://host/api/<kind>/<uuid>`, with `#name` when asked for.
pub fn render(base_url: &str, canonical: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{base_url}{canonical}#{name}"),
        None => format!("{base_url}{canonical}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid(kind: &str, uuid: &str) -> RefTarget {
        RefTarget::Uuid { kind: kind.into(), uuid: uuid.into() }
    }

    #[test]
    fn every_client_form_parses() {
        let want = uuid("vsvip", "vsvip-1");
        for input in [
            "https://10.0.0.1/api/vsvip/vsvip-1",
            "https://10.0.0.1:9443/api/vsvip/vsvip-1#my vip",
            "http://127.0.0.1:1234/api/vsvip/vsvip-1/",
            "/api/vsvip/vsvip-1",
            "vsvip-1",
        ] {
            assert_eq!(parse("vsvip", input).unwrap(), want, "{input}");
        }
        let by_name = RefTarget::Name { kind: "cloud".into(), name: "Default Cloud".into() };
        for input in [
            "/api/cloud?name=Default%20Cloud",
            "/api/cloud/?name=Default+Cloud",
            "https://h/api/cloud?name=Default%20Cloud",
        ] {
            assert_eq!(parse("cloud", input).unwrap(), by_name, "{input}");
        }
    }

    #[test]
    fn wrong_or_malformed_references_are_refused() {
        assert!(parse("pool", "/api/vsvip/vsvip-1").unwrap_err().contains("expected a pool"));
        assert!(parse("pool", "").is_err());
        assert!(parse("pool", "/api/pool").is_err());
        assert!(parse("pool", "/api/pool?x=1").is_err());
        assert!(parse("pool", "a/b").is_err());
        assert!(parse("pool", "https://host").is_err());
    }

    #[test]
    fn canonical_round_trip() {
        let r = uuid("pool", "pool-9");
        assert_eq!(split_canonical(&r.canonical()), Some(("pool", "pool-9")));
        assert_eq!(render("https://h", &r.canonical(), Some("p")), "https://h/api/pool/pool-9#p");
        assert_eq!(split_canonical("/api/pool?name=x"), None);
    }
}
