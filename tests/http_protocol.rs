//! HTTP/1.1 on the wire, with a raw socket: keep-alive, pipelining,
//! `Connection: close`, HTTP/1.0, malformed requests, size limits, slowloris,
//! split bodies, and the WebSocket endpoint without an upgrade. After each bad
//! request the server must still serve everyone else. Where a request ends
//! (`Content-Length`, `Transfer-Encoding`, line ends) is in `http_framing.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::contract::assert_refused_and_closed;
use common::*;

fn get_req(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n")
}

#[test]
fn pipelined_requests_answered_in_order_on_one_connection() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    let body = format!("{{\"name\":\"{}\",\"username\":\"pipe\"}}", uniq("Piped"));
    let batch = format!(
        "{}{}POST /rooms HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}{}{}",
        get_req("/healthz", ""),
        get_req("/nope", ""),
        body.len(),
        body,
        get_req("/rooms", ""),
        get_req("/healthz", ""),
    );
    c.send(batch.as_bytes()); // one write
    let statuses: Vec<u16> = (0..5)
        .map(|i| {
            c.read_response(WAIT)
                .unwrap_or_else(|e| panic!("response {i}: {e}"))
                .status
        })
        .collect();
    assert_eq!(statuses, vec![200, 404, 201, 200, 200]);
    // Still open: one more on the same connection.
    c.send(get_req("/healthz", "").as_bytes());
    let r = c.read_response(WAIT).expect("response after the pipeline");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
}

#[test]
fn pipelined_responses_keep_bodies_apart() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    let mut batch = String::new();
    for _ in 0..20 {
        batch.push_str(&get_req("/healthz", ""));
        batch.push_str(&get_req("/rooms", ""));
    }
    c.send(batch.as_bytes());
    for i in 0..20 {
        let a = c
            .read_response(WAIT)
            .unwrap_or_else(|e| panic!("pair {i}: {e}"));
        assert_eq!(a.status, 200);
        assert_eq!(a.json(), serde_json::json!({"status": "ok"}));
        let b = c
            .read_response(WAIT)
            .unwrap_or_else(|e| panic!("pair {i}: {e}"));
        assert_eq!(b.status, 200);
        assert_eq!(b.json(), serde_json::json!([]));
    }
}

#[test]
fn connection_close_closes_after_response() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    c.send(get_req("/healthz", "Connection: close\r\n").as_bytes());
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(r.status, 200);
    assert!(
        c.closed_within(WAIT),
        "server kept the connection open after Connection: close"
    );
}

#[test]
fn http10_closes_after_response() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    c.send(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
    assert!(
        c.closed_within(WAIT),
        "server kept an HTTP/1.0 connection open"
    );
}

#[test]
fn keep_alive_serves_many_sequential_requests() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    for i in 0..50 {
        c.send(get_req("/healthz", "").as_bytes());
        let r = c
            .read_response(WAIT)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200);
    }
}

#[test]
fn malformed_requests_get_400_and_close() {
    let s = Server::start();
    let cases: Vec<&[u8]> = vec![
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /healthz HTTP/9.9.9\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost localhost\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n: novalue\r\n\r\n",
        b"GET /he\x00althz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", // a TLS hello
        // Headers the server reads, with values that are not UTF-8: ignoring
        // them would misread the request (for the framing headers, see
        // `http_framing.rs`).
        b"GET /rooms HTTP/1.1\r\nHost: x\r\nConnection: close\xff\r\n\r\n",
        b"DELETE /rooms?name=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
    ];
    for bytes in cases {
        assert_refused_and_closed(&s, bytes, 400);
    }
    // A header the server does not read may carry any octets.
    let r = raw_request(
        s.addr(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    s.assert_still_serving();
}

#[test]
fn query_that_does_not_decode_is_400() {
    let s = Server::start();
    for target in [
        "/rooms?x=%zz",
        "/rooms/General/messages?limit=%ff",
        "/ws/General?username=x&since=%ff",
        "/healthz?%",
    ] {
        let r = raw_request(s.addr(), get_req(target, WS_UPGRADE_HEADERS).as_bytes());
        assert_eq!(r.status, 400, "{target}: {}", r.body_text());
        assert!(
            r.body_text().contains("percent-encoded"),
            "{target}: {}",
            r.body_text()
        );
    }
    s.assert_still_serving();
}

#[test]
fn oversized_head_is_431() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    let big = "a".repeat(20 * 1024);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = c.try_send(req.as_bytes());
    let r = c
        .read_response(WAIT)
        .expect("response to an oversized head");
    assert_eq!(r.status, 431, "{}", r.body_text());
    assert!(r.json()["error"].is_string());
    assert!(c.closed_within(WAIT), "connection left open after 431");
    // A head of 20 KiB spread over many headers, too.
    let mut c = RawHttp::connect(s.addr());
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..400 {
        req.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(50)));
    }
    req.push_str("\r\n");
    let _ = c.try_send(req.as_bytes());
    let r = c.read_response(WAIT).expect("response to many headers");
    assert_eq!(r.status, 431, "{}", r.body_text());
    assert!(c.closed_within(WAIT), "connection left open after 431");
    s.assert_still_serving();
}

#[test]
fn head_just_under_limit_is_served() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(12 * 1024)
    );
    c.send(req.as_bytes());
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(
        r.status,
        200,
        "a 12 KiB head is under the 16 KiB default: {}",
        r.body_text()
    );
}

#[test]
fn head_limit_is_configurable() {
    let s = Server::start_with(&[("HTTP_MAX_HEAD", "2048")]);
    let small = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(1000)
    );
    assert_eq!(raw_request(s.addr(), small.as_bytes()).status, 200);
    let mut c = RawHttp::connect(s.addr());
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(3000)
    );
    let _ = c.try_send(big.as_bytes());
    assert_eq!(c.read_response(WAIT).expect("response").status, 431);
}

#[test]
fn oversized_body_is_413() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    // Only the head: the server must answer from the Content-Length alone.
    c.send(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n");
    let r = c
        .read_response(WAIT)
        .expect("response to an oversized Content-Length");
    assert_eq!(r.status, 413, "{}", r.body_text());
    assert!(r.json()["error"].is_string());
    assert!(c.closed_within(WAIT), "connection left open after 413");
    // A full oversized body sent at once gets the same answer.
    let mut c = RawHttp::connect(s.addr());
    let body = format!(
        "{{\"username\":\"x\",\"password_hash\":\"{}\"}}",
        "y".repeat(70 * 1024)
    );
    let req = format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = c.try_send(req.as_bytes());
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(r.status, 413);
    assert!(c.closed_within(WAIT), "connection left open after 413");
    s.assert_still_serving();
}

#[test]
fn body_limit_is_configurable_and_sizes_parse_kib() {
    let s = Server::start_with(&[("HTTP_MAX_BODY", "1KiB")]);
    let small = serde_json::json!({"username": uniq("small"), "password_hash": "p".repeat(60)});
    assert_eq!(s.post("/register", &small).status, 200);
    let big = serde_json::json!({"username": uniq("big"), "password_hash": "p".repeat(60), "pad": "z".repeat(1500)});
    s.post("/register", &big).expect_error(413);
}

#[test]
fn body_split_across_writes_is_assembled() {
    let s = Server::start();
    let name = uniq("split");
    let body = format!("{{\"username\":\"{name}\",\"password_hash\":\"correct horse battery\"}}");
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut c = RawHttp::connect(s.addr());
    // head in two pieces, body in two pieces
    let (h1, h2) = head.split_at(20);
    c.send(h1.as_bytes());
    thread::sleep(Duration::from_millis(100));
    c.send(h2.as_bytes());
    let (b1, b2) = body.split_at(10);
    c.send(b1.as_bytes());
    thread::sleep(Duration::from_millis(150));
    c.send(b2.as_bytes());
    let r = c.read_response(WAIT).expect("response");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.json()["message"], "User registered successfully");
}

#[test]
fn slowloris_gets_408_and_is_closed() {
    let s = Server::start_with(&[("HTTP_HEADER_TIMEOUT", "1s")]);
    let mut c = RawHttp::connect(s.addr());
    let t = Instant::now();
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    // Trickle a header byte now and then, never finishing the head.
    let mut served_meanwhile = false;
    for i in 0..10 {
        thread::sleep(Duration::from_millis(100));
        if c.try_send(format!("X-{i}: y\r\n").as_bytes()).is_err() {
            break;
        }
        if i == 3 {
            // Others are served while the slow client waits.
            served_meanwhile = s.get("/healthz").status == 200;
        }
    }
    assert!(
        served_meanwhile,
        "server stalled while a slow client trickled its head"
    );
    let r = c
        .read_response(Duration::from_secs(5))
        .expect("408 response");
    let waited = t.elapsed();
    assert_eq!(r.status, 408, "{}", r.body_text());
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "408 after {waited:?} with HTTP_HEADER_TIMEOUT=1s"
    );
    assert!(c.closed_within(WAIT), "connection left open after 408");
}

#[test]
fn idle_connection_without_request_is_closed_after_header_timeout() {
    let s = Server::start_with(&[("HTTP_HEADER_TIMEOUT", "500ms")]);
    let mut c = RawHttp::connect(s.addr());
    // Nothing sent at all: a connection that never starts a request is closed
    // (with or without a 408) after the timeout.
    let t = Instant::now();
    let ended = match c.read_response(Duration::from_secs(5)) {
        Ok(r) => {
            assert_eq!(r.status, 408);
            c.closed_within(WAIT)
        }
        Err(_) => t.elapsed() < Duration::from_secs(4),
    };
    assert!(
        ended,
        "idle connection was not closed within a few seconds of a 500ms header timeout"
    );
}

#[test]
fn ws_path_without_upgrade_is_426_and_missing_room_400() {
    let s = Server::start();
    let r = s.get("/ws/SomeRoom?username=x");
    r.expect_error(426);
    // Missing room, with and without upgrade headers.
    let r = s.get("/ws/?username=x");
    r.expect_error(400);
    assert_eq!(s.ws_refused_status("/ws/?username=x", &[]), 400);
    assert_eq!(s.ws_refused_status("/ws/", &[]), 400);
    s.assert_still_serving();
}

#[test]
fn bad_websocket_handshakes_are_refused_cleanly() {
    let s = Server::start();
    // Upgrade without a key / with the wrong version: 400, never a 101.
    for extra in [
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
    ] {
        let r = raw_request(s.addr(), get_req("/ws/Room1?username=x", extra).as_bytes());
        assert_eq!(
            r.status,
            400,
            "bad handshake {extra:?}: {}",
            r.body_text()
        );
        assert!(r.json()["error"].is_string(), "{}", r.body_text());
    }
    // An upgrade must be a GET (RFC 6455), not a HEAD. (The answer to a
    // HEAD has no body: read its status line only.)
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(WAIT)).expect("timeout");
    let head = get_req("/ws/Room1?username=x", WS_UPGRADE_HEADERS).replacen("GET", "HEAD", 1);
    c.write_all(head.as_bytes()).expect("send");
    let mut status_line = [0u8; 12];
    c.read_exact(&mut status_line).expect("status line");
    assert_eq!(&status_line, b"HTTP/1.1 400", "HEAD with upgrade headers");
    // POST to a WebSocket path is a wrong method, with or without the
    // upgrade headers.
    let r = s.post_raw("/ws/Room1", "{}");
    r.expect_error(405);
    assert_eq!(r.header("allow"), Some("GET, OPTIONS"), "{r:?}");
    let post = format!(
        "POST /ws/Room1?username=x HTTP/1.1\r\nHost: x\r\n{WS_UPGRADE_HEADERS}Content-Length: 0\r\n\r\n"
    );
    let r = raw_request(s.addr(), post.as_bytes());
    assert_eq!(r.status, 405, "{}", r.body_text());
    assert_eq!(r.header("allow"), Some("GET, OPTIONS"));
    assert!(r.json()["error"].is_string(), "{}", r.body_text());
    s.assert_still_serving();
}

#[test]
fn many_parallel_connections_are_served() {
    let s = Server::start();
    let addr = s.addr();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            thread::spawn(move || {
                let mut c = RawHttp::connect(addr);
                for _ in 0..20 {
                    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
                    let r = c.read_response(WAIT).expect("response");
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
}
