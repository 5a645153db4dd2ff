//! The web client: the files under `web/`, built into the binary, served at
//! `/` and `/web/...` (unless `WEB_UI=false`).
//!
//! The files are embedded at compile time, so the server needs nothing on
//! disk and works offline. Each answer carries a strong `ETag` (a hash of
//! the file, computed once at start) and `Cache-Control: no-cache`, so a
//! browser revalidates and gets `304` with no body while the file is the
//! same; a strict `Content-Security-Policy` (scripts and styles only from
//! this origin, no inline code, no framing) and `X-Content-Type-Options:
//! nosniff`. The page learns the server's `AUTH_MODE` from a `<meta>` tag
//! filled in at start.
//!
//! Called by `crate::api`'s router for `GET`/`HEAD` of those paths.

use crate::config::AuthMode;
use crate::http::{Request, Response};

/// What the page may load: its own scripts, styles and icon, and API calls
/// and WebSockets to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self'; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
pub struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    etag: String,
}

/// The web client's files, ready to serve.
pub struct Web {
    assets: Vec<Asset>,
}

impl Web {
    /// The files, with the page told which `AUTH_MODE` the server runs.
    pub fn new(auth_mode: AuthMode) -> Web {
        let mode = match auth_mode {
            AuthMode::Open => "open",
            AuthMode::Token => "token",
        };
        let index = include_str!("../web/index.html").replace("{{AUTH_MODE}}", mode);
        let files: [(&'static str, &'static str, Vec<u8>); 4] = [
            ("/", "text/html; charset=utf-8", index.into_bytes()),
            (
                "/web/app.js",
                "text/javascript; charset=utf-8",
                include_bytes!("../web/app.js").to_vec(),
            ),
            (
                "/web/style.css",
                "text/css; charset=utf-8",
                include_bytes!("../web/style.css").to_vec(),
            ),
            (
                "/web/icon.svg",
                "image/svg+xml",
                include_bytes!("../web/icon.svg").to_vec(),
            ),
        ];
        let assets = files
            .into_iter()
            .map(|(path, content_type, body)| Asset {
                path,
                content_type,
                etag: format!("\"{:016x}\"", fnv1a(&body)),
                body,
            })
            .collect();
        Web { assets }
    }

    /// The file served at `path`, if any.
    pub fn asset(&self, path: &str) -> Option<&Asset> {
        self.assets.iter().find(|a| a.path == path)
    }
}

impl Asset {
    /// The answer for a `GET` or `HEAD` of this file: `200` with it, or
    /// `304` when the browser's copy is current.
    pub fn answer(&self, req: &Request) -> Response {
        let fresh = req
            .if_none_match
            .as_deref()
            .is_some_and(|v| etag_matches(v, &self.etag));
        let mut resp = Response::text(200, self.content_type, String::new());
        if fresh {
            resp.status = 304;
        } else {
            resp.body = self.body.clone();
        }
        resp.extra = vec![
            ("ETag", self.etag.clone()),
            ("Cache-Control", "no-cache".into()),
            ("Content-Security-Policy", CSP.into()),
            ("X-Content-Type-Options", "nosniff".into()),
            ("Referrer-Policy", "no-referrer".into()),
        ];
        resp
    }
}

/// `If-None-Match` against our tag (RFC 9110 13.1.2: `*`, or a list of
/// tags compared weakly, so `W/"x"` matches `"x"`).
fn etag_matches(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// A 64-bit FNV-1a hash: enough to tell versions of a file apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_compare_weakly_and_in_lists() {
        let tag = "\"00ff\"";
        assert!(etag_matches("\"00ff\"", tag));
        assert!(etag_matches("W/\"00ff\"", tag));
        assert!(etag_matches("\"aa\", \"00ff\"", tag));
        assert!(etag_matches("*", tag));
        assert!(!etag_matches("\"00fe\"", tag));
        assert!(!etag_matches("", tag));
    }

    #[test]
    fn the_page_names_the_auth_mode_and_every_file_has_a_tag() {
        let web = Web::new(AuthMode::Token);
        let page = &web.assets[0];
        let text = String::from_utf8(page.body.clone()).unwrap();
        assert!(text.contains("content=\"token\""), "{text}");
        assert!(!text.contains("{{"));
        let open = Web::new(AuthMode::Open);
        assert_ne!(open.assets[0].etag, page.etag);
        for a in &web.assets {
            assert!(a.etag.len() == 18 && a.etag.starts_with('"'));
        }
    }
}
