//! The web UI: plain ES modules and a stylesheet, built into the binary, served at `/` (the
//! page) and `/ui/<file>` (its assets) on the API's own port and scheme. The UI is a client of
//! the public API only: it logs in with `/login`, sends the session's CSRF token, and shows
//! what the API answers. Nothing here reads the store.
//!
//! There is no build step: the browser loads the modules as they are in `crates/fulcrum-api/ui`,
//! so `cargo build` is all it takes (ARCHITECTURE.md says why).

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Scripts only from this origin's files (no inline script, no `eval`), styles likewise, the
/// API as the only thing to talk to, and no framing by other sites.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($($path:literal => $content_type:expr),* $(,)?) => {
        &[$(Asset { path: $path, content_type: $content_type, body: include_bytes!(concat!("../ui/", $path)) }),*]
    };
}

const JS: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = assets! {
    "index.html" => "text/html; charset=utf-8",
    "app.css" => "text/css; charset=utf-8",
    "icon.svg" => "image/svg+xml",
    "js/main.js" => JS,
    "js/api.js" => JS,
    "js/dom.js" => JS,
    "js/sha256.js" => JS,
    "js/upload.js" => JS,
    "js/pages/login.js" => JS,
    "js/pages/dashboard.js" => JS,
    "js/pages/pools.js" => JS,
    "js/pages/virtualservices.js" => JS,
    "js/pages/engines.js" => JS,
    "js/pages/images.js" => JS,
    "js/pages/upgrades.js" => JS,
    "js/pages/asyncpatch.js" => JS,
};

fn serve(path: &str) -> Option<Response> {
    let asset = ASSETS.iter().find(|a| a.path == path)?;
    let mut response = (StatusCode::OK, asset.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    Some(response)
}

/// `GET /`: the page (every view of the UI is a `#/...` address within it).
pub async fn index() -> Response {
    serve("index.html").expect("index.html is built in")
}

/// `GET /ui/<file>`.
pub async fn asset(Path(path): Path<String>) -> Response {
    serve(&path).unwrap_or_else(|| ApiError::not_found(format!("no such UI file: /ui/{path}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_built_in() {
        // An import of a file missing from ASSETS would be a 404 in the browser.
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(asset.body).expect("UTF-8");
            let dir = asset.path.rsplit_once('/').map_or("", |(d, _)| d);
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let spec = line.split(['"', '\'']).nth(1).expect("import has a quoted path");
                let resolved = resolve(dir, spec.strip_prefix("/ui/").map_or(spec, |s| s));
                assert!(
                    ASSETS.iter().any(|a| a.path == resolved),
                    "{} imports {spec} ({resolved}), which is not built in",
                    asset.path
                );
            }
        }
    }

    fn resolve(dir: &str, spec: &str) -> String {
        let mut parts: Vec<&str> = if spec.starts_with("./") || spec.starts_with("../") {
            dir.split('/').filter(|p| !p.is_empty()).collect()
        } else {
            Vec::new()
        };
        for part in spec.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        parts.join("/")
    }

    #[test]
    fn no_asset_uses_inline_script_or_html_injection() {
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("UTF-8");
            // The page must work under its own CSP: no inline handlers or scripts...
            assert!(!text.contains(" onclick=") && !text.contains(" onload="), "{} has an inline handler", asset.path);
            if asset.path.ends_with(".html") {
                assert!(!text.contains("<script>"), "{} has an inline script", asset.path);
            }
            // ...and values from the API are set as text, never parsed as HTML.
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
                assert!(!text.contains(sink), "{} uses {sink}", asset.path);
            }
        }
    }
}
