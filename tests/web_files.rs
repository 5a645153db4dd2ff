//! The web client's files as HTTP serves them (no browser needed): types,
//! `ETag` and `304` on revalidation, the security headers, `HEAD`, methods,
//! `WEB_UI=false`, and the API untouched beside them. The page itself is
//! tested in Chromium by `tests/browser.rs`.

mod common;

use common::*;

fn get(server: &Server, path: &str, extra: &str) -> RawResponse {
    raw_request(
        server.addr(),
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn every_file_has_its_type_a_tag_and_the_security_headers() {
    let server = Server::start();
    for (path, ty) in [
        ("/", "text/html; charset=utf-8"),
        ("/web/app.js", "text/javascript; charset=utf-8"),
        ("/web/style.css", "text/css; charset=utf-8"),
        ("/web/icon.svg", "image/svg+xml"),
    ] {
        let r = get(&server, path, "");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(ty), "{path}");
        assert!(!r.body.is_empty(), "{path}");
        let csp = r.header("content-security-policy").expect("CSP");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        let tag = r.header("etag").expect("ETag").to_string();
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");

        // Revalidation: the same tag (also weak, in a list, or `*`) is 304
        // with no body; another tag gets the file again.
        for inm in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let r = get(&server, path, &format!("If-None-Match: {inm}\r\n"));
            assert_eq!(r.status, 304, "{path} {inm}");
            assert!(r.body.is_empty());
            assert_eq!(r.header("etag"), Some(tag.as_str()));
            assert!(r.header("content-length").is_none());
        }
        let r = get(&server, path, "If-None-Match: \"other\"\r\n");
        assert_eq!(r.status, 200);
        assert!(!r.body.is_empty());
    }
    // The page has no inline script (the CSP would block it) and loads
    // nothing from elsewhere.
    let page = String::from_utf8(get(&server, "/", "").body).unwrap();
    assert!(page.contains("<script type=\"module\" src=\"/web/app.js\"></script>"));
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    assert!(page.contains("<meta name=\"chatconnect-auth\" content=\"open\">"));
}

#[test]
fn head_options_and_other_methods_on_the_files() {
    let server = Server::start();
    let r = server.request("HEAD", "/", None, &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(r.header("etag").is_some());
    let r = server.request("OPTIONS", "/web/app.js", None, &[]);
    assert_eq!(r.status, 204);
    let r = server.post_raw("/", "{}");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, OPTIONS"));
    assert_eq!(server.get("/web/nothing.js").status, 404);
    assert_eq!(server.get("/web/").status, 404);
}

#[test]
fn an_if_none_match_that_is_not_utf8_is_ignored_not_refused() {
    let server = Server::start();
    let req =
        b"GET / HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"\xff\xfe\"\r\nConnection: close\r\n\r\n"
            .to_vec();
    let r = raw_request(server.addr(), &req);
    assert_eq!(r.status, 200);
}

#[test]
fn token_mode_is_named_in_the_page() {
    let server = Server::start_with(&[("AUTH_MODE", "token")]);
    let page = String::from_utf8(get(&server, "/", "").body).unwrap();
    assert!(page.contains("<meta name=\"chatconnect-auth\" content=\"token\">"));
}

#[test]
fn web_ui_false_leaves_only_the_api() {
    let server = Server::start_with(&[("WEB_UI", "false")]);
    for path in ["/", "/web/app.js", "/web/style.css"] {
        let r = server.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"], "Not found");
    }
    assert_eq!(server.get("/rooms").status, 200);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn the_api_beside_the_files_is_unchanged() {
    let server = Server::start();
    let r = server.get("/rooms");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("content-security-policy").is_none());
    assert!(r.header("etag").is_none());
    let room = uniq("beside");
    let mut c = server.ws(&room, "u");
    c.round_trip("hi", WAIT);
    assert_eq!(server.messages(&room, "").len(), 1);
}
