//! HTTP promises of `docs/API.md` checked on the wire: `HEAD` wherever `GET`
//! works, `Expect: 100-continue`, transfer codings, header values that are
//! not UTF-8, the keep-alive idle close, and every metric the document names.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::contract::*;
use common::*;
use serde_json::json;

#[test]
fn head_is_answered_wherever_get_is_with_the_same_head_and_no_body() {
    let s = Server::start();
    let room = uniq("Headed");
    let mut c = s.ws(&room, "poster");
    c.round_trip("one message", WAIT);
    let messages = format!("/rooms/{}/messages", enc(&room));
    let paths = [
        "/healthz".to_string(),
        "/readyz".to_string(),
        "/rooms".to_string(),
        messages.clone(),
        format!("{messages}?limit=1"),
        format!("{messages}?limit=0"),                       // 400
        format!("/rooms/{}/messages", enc(&uniq("nosuch"))), // 404
        format!("/ws/{}?username=x", enc(&room)),            // 426 without upgrade headers
        "/metrics".to_string(),
    ];
    for path in &paths {
        let get = s.get(path);
        let sent = then_healthz_and_close(
            s.addr(),
            format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        let (head, rest) = split_head(&sent);
        assert_eq!(head.status, get.status, "HEAD {path}: {head:?} vs {get:?}");
        for name in ["content-type", "access-control-allow-origin"] {
            assert_eq!(head.header(name), get.header(name), "HEAD {path}: {name}");
        }
        let length: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path}: no Content-Length: {head:?}"));
        if path != "/metrics" {
            // (The metrics text changes between two calls.)
            assert_eq!(length, get.body.len(), "HEAD {path}: Content-Length");
        }
        // The next bytes are the answer to the next request: no body came.
        let (next, body) = split_head(rest);
        assert_eq!(
            next.status,
            200,
            "HEAD {path}: what followed the head: {:?}",
            String::from_utf8_lossy(rest)
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(body).ok(),
            Some(json!({"status": "ok"})),
            "HEAD {path}: what followed the head: {:?}",
            String::from_utf8_lossy(rest)
        );
    }
}

#[test]
fn expect_100_continue_is_honoured() {
    let s = Server::start();
    let name = uniq("patient");
    let body = json!({"username": name, "password_hash": "correct horse battery"}).to_string();
    let mut c = RawHttp::connect(s.addr());
    // The head alone: the server must invite the body.
    c.send(
        format!(
            "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = c
        .read_response(WAIT)
        .expect("100 Continue before the body is sent");
    assert_eq!(interim.status, 100, "{interim:?}");
    c.send(body.as_bytes());
    let r = c.read_response(WAIT).expect("the final answer");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json(), json!({"message": "User registered successfully"}));
    // The connection carries on.
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response(WAIT).expect("healthz").status, 200);

    // A head that is refused gets its final answer at once, not an invitation.
    let mut c = RawHttp::connect(s.addr());
    c.send(
        b"POST /register HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
          Content-Length: 100000\r\n\r\n",
    );
    let r = c.read_response(WAIT).expect("an answer to the head");
    assert_eq!(r.status, 413, "{}", r.body_text());
    assert!(c.closed_within(WAIT), "connection left open after 413");

    // Any other expectation cannot be met.
    assert_refused_and_closed(
        &s,
        b"POST /register HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}",
        417,
    );
    s.assert_still_serving();
}

#[test]
fn transfer_codings_other_than_chunked_are_501() {
    // `identity` too: RFC 9112 has no such coding any more, and a proxy may
    // frame its body otherwise than by the `Content-Length` beside it.
    let s = Server::start();
    for coding in ["gzip", "deflate", "gzip, identity", "br", "identity"] {
        let req = format!(
            "POST /register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\
             Content-Length: 2\r\n\r\n{{}}"
        );
        assert_refused_and_closed(&s, req.as_bytes(), 501);
    }
}

#[test]
fn headers_the_server_reads_must_be_utf8() {
    // The other headers of the list in API.md are checked in http_protocol.rs.
    let s = Server::start();
    let upgrade = |broken: &[u8]| -> Vec<u8> {
        let mut req = b"GET /ws/Room1?username=x HTTP/1.1\r\nHost: x\r\n".to_vec();
        for line in [
            &b"Upgrade: websocket"[..],
            b"Connection: Upgrade",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ] {
            let name = &line[..line.iter().position(|&b| b == b':').unwrap()];
            if !broken.starts_with(name) {
                req.extend_from_slice(line);
                req.extend_from_slice(b"\r\n");
            }
        }
        req.extend_from_slice(broken);
        req.extend_from_slice(b"\r\n\r\n");
        req
    };
    for broken in [
        &b"Upgrade: web\xffsocket"[..],
        b"Sec-WebSocket-Version: 1\xff3",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\xff==",
        b"Origin: http://caf\xe9.example",
        b"Expect: 100-continue\xff",
    ] {
        assert_refused_and_closed(&s, &upgrade(broken), 400);
    }
    // The same request with valid values is upgraded.
    let mut ok = RawWs::connect(s.addr(), "/ws/Room1?username=x");
    ok.send_frame(OP_TEXT, br#"{"content": "valid"}"#)
        .expect("send");
    let f = ok.read_frame(WAIT).expect("echo");
    assert_eq!(f.opcode, OP_TEXT, "{f:?}");
}

#[test]
fn idle_keep_alive_connection_is_closed_quietly_after_http_idle_timeout() {
    // The head timeout is far longer: only the idle timeout can close.
    let s = Server::start_with(&[
        ("HTTP_IDLE_TIMEOUT", "1500ms"),
        ("HTTP_HEADER_TIMEOUT", "60s"),
    ]);
    let mut c = RawHttp::connect(s.addr());
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let t = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(20)),
        "an idle keep-alive connection was not closed quietly (nothing sent) \
         within 20 s of HTTP_IDLE_TIMEOUT=1500ms"
    );
    let waited = t.elapsed();
    // The deadline starts when the answer is queued, a little before it is
    // read here.
    assert!(
        waited >= Duration::from_millis(1000),
        "closed {waited:?} after the answer with HTTP_IDLE_TIMEOUT=1500ms"
    );
}

#[test]
fn idle_keep_alive_connection_outlives_the_header_timeout() {
    let s = Server::start_with(&[
        ("HTTP_IDLE_TIMEOUT", "30s"),
        ("HTTP_HEADER_TIMEOUT", "300ms"),
    ]);
    let mut c = RawHttp::connect(s.addr());
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response(WAIT).expect("first answer").status, 200);
    // Idle between requests for four times the header timeout.
    thread::sleep(Duration::from_millis(1200));
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c
        .read_response(WAIT)
        .expect("an answer on the kept connection after 1.2 s idle");
    assert_eq!(r.status, 200);
}

/// The names listed under `GET /metrics` in API.md, each with whether the
/// document calls it a histogram.
fn documented_metrics() -> Vec<(String, bool)> {
    let doc = include_str!("../docs/API.md");
    let start = doc
        .find("- `GET /metrics`")
        .expect("GET /metrics in API.md");
    let section = &doc[start..];
    let section = &section[..section.find("and more.").expect("the end of the list")];
    let mut out = Vec::new();
    let mut pieces = section.split('`');
    // Odd pieces are code spans; the text after each says what it is.
    let _ = pieces.next();
    while let (Some(code), Some(after)) = (pieces.next(), pieces.next()) {
        if let Some(name) = code.strip_prefix("chatconnect_") {
            let name = name.split('{').next().unwrap_or(name);
            out.push((
                format!("chatconnect_{name}"),
                after.trim_start().starts_with("(histogram"),
            ));
        }
    }
    out
}

#[test]
fn every_metric_the_api_names_is_exported_with_its_type() {
    let documented = documented_metrics();
    for known in [
        ("chatconnect_http_connections".to_string(), false),
        ("chatconnect_commit_seconds".to_string(), true),
    ] {
        assert!(
            documented.contains(&known),
            "API.md's list did not parse as expected: {documented:?}"
        );
    }
    let s = Server::start();
    let text = s.metrics();
    for (name, histogram) in documented {
        let kind = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
            .unwrap_or_else(|| panic!("{name} is documented but not exported:\n{text}"));
        if histogram {
            assert_eq!(kind, "histogram", "{name}");
            for suffix in ["_bucket{le=\"+Inf\"}", "_sum", "_count"] {
                assert!(
                    metric_value(&text, &format!("{name}{suffix}")).is_some(),
                    "{name}{suffix} missing:\n{text}"
                );
            }
        } else {
            assert!(
                kind == "gauge" || kind == "counter",
                "{name} has type {kind}"
            );
            assert!(
                metric_value(&text, &name).is_some(),
                "{name} has no sample:\n{text}"
            );
        }
    }
}
