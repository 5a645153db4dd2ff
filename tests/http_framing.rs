//! Request framing on the wire (RFC 9112 section 6): where one request ends
//! and the next begins. Each attempt to make the server and a front proxy
//! disagree about that (request smuggling) is sent on a fresh connection
//! with a valid `GET /healthz` right behind it in the same write. A refused
//! attempt must be answered once and the connection closed, so that the
//! request behind it is never answered; an accepted one must leave the request
//! behind it intact, so that it is answered `200`.
//!
//! Malformed requests that do not bear on framing are in `http_protocol.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The valid request sent right behind every attempt.
const NEXT: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// What must happen after the answer to the attempt.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// The connection closes; the request behind is never answered.
    Closed,
    /// The request behind is answered `200` on the same connection.
    Served,
}

struct Attempt {
    what: &'static str,
    bytes: &'static [u8],
    status: u16,
    then: Then,
}

const fn refused(what: &'static str, bytes: &'static [u8], status: u16) -> Attempt {
    Attempt {
        what,
        bytes,
        status,
        then: Then::Closed,
    }
}

const fn served(what: &'static str, bytes: &'static [u8]) -> Attempt {
    Attempt {
        what,
        bytes,
        status: 200,
        then: Then::Served,
    }
}

const CONTENT_LENGTH: &[Attempt] = &[
    refused(
        "a plus sign",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\nxx",
        400,
    ),
    refused(
        "a minus sign",
        b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        400,
    ),
    refused(
        "a space inside",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1 1\r\n\r\nxxxxxxxxxxx",
        400,
    ),
    refused(
        "hex",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\nxx",
        400,
    ),
    refused(
        "a decimal point",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2.0\r\n\r\nxx",
        400,
    ),
    refused(
        "letters",
        b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
    ),
    refused(
        "an empty value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
        400,
    ),
    refused(
        "an empty value without a space",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
        400,
    ),
    refused(
        "a value that is not UTF-8",
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: \xff\xff40\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a vertical tab before the digits",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: \x0b2\r\n\r\nxx",
        400,
    ),
    refused(
        "a no-break space after the digits",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\xc2\xa0\r\n\r\nxx",
        400,
    ),
    refused(
        "a number too large for any body",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    refused(
        "a list with an empty element",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2,\r\n\r\nxx",
        400,
    ),
    refused(
        "a list of different values",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 20\r\n\r\nxx",
        400,
    ),
    refused(
        "repeated headers with different values",
        b"POST /rooms HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n{\"a\":1}",
        400,
    ),
    served(
        "a list of equal values",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\nxx",
    ),
    served(
        "repeated headers with equal values",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nxx",
    ),
    served(
        "spaces and tabs around the value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: \t2 \t\r\n\r\nxx",
    ),
    served(
        "leading zeros",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 002\r\n\r\nxx",
    ),
];

const TRANSFER_ENCODING: &[Attempt] = &[
    refused(
        "chunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        411,
    ),
    refused(
        "chunked, in HTTP/1.0",
        b"POST /login HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        411,
    ),
    refused(
        "Chunked, capitalised",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
        411,
    ),
    refused(
        "chunked after two spaces",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n",
        411,
    ),
    refused(
        "Content-Length, then chunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunked, then Content-Length",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunked, then Content-Length: 0",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunked twice in one header",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunked in two headers",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "chunked with a trailing comma",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "an empty value",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n",
        400,
    ),
    refused(
        "a value that is not UTF-8",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xff\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "a space before the colon",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    refused(
        "xchunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "chunked with a parameter",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked;x=1\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "chunked and a no-break space",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xc2\xa0\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "gzip, chunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "identity, with Content-Length",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nxx",
        501,
    ),
    refused(
        "identity, alone",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        501,
    ),
    refused(
        "identity, chunked",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "identity then chunked, in two headers",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    refused(
        "chunked, identity",
        b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        501,
    ),
];

const LINES: &[Attempt] = &[
    refused(
        "obsolete line folding with a space",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Content-Length: 2\r\n\r\nxx",
        400,
    ),
    refused(
        "obsolete line folding with a tab",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tContent-Length: 2\r\n\r\nxx",
        400,
    ),
    refused(
        "a first header line starting with a space",
        b"GET /healthz HTTP/1.1\r\n Content-Length: 2\r\nHost: x\r\n\r\nxx",
        400,
    ),
    refused(
        "bare LF line endings",
        b"GET /healthz HTTP/1.1\nHost: x\n\n",
        400,
    ),
    refused(
        "a bare LF hiding Content-Length inside a value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\nContent-Length: 2\r\n\r\nxx",
        400,
    ),
    refused(
        "a bare LF after the request line",
        b"GET /healthz HTTP/1.1\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a bare LF ending the head",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
        400,
    ),
    refused(
        "a bare LF before the request line",
        b"\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a bare CR inside a value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\rContent-Length: 2\r\n\r\nxx",
        400,
    ),
    refused(
        "a bare CR ending the request line",
        b"GET /healthz HTTP/1.1\rHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a space between the header name and the colon",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\nxx",
        400,
    ),
    refused(
        "a tab between the header name and the colon",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length\t: 2\r\n\r\nxx",
        400,
    ),
    refused(
        "NUL in Content-Length",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\x00\r\n\r\nxx",
        400,
    ),
    refused(
        "NUL in a header the server does not read",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        400,
    ),
    refused(
        "a control character in a value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
        400,
    ),
    refused(
        "DEL in a value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
        400,
    ),
    served(
        "a tab inside a value",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\tb\r\n\r\n",
    ),
    served(
        "an empty line (CRLF) before the request line",
        b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
];

const REQUEST_LINE: &[Attempt] = &[
    refused(
        "two spaces after the method",
        b"GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "two spaces before the version",
        b"GET /healthz  HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a space after the version",
        b"GET /healthz HTTP/1.1 \r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a space before the method",
        b" GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a tab between method and target",
        b"GET\t/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a space inside the target",
        b"GET /heal thz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
    refused(
        "a lower-case version",
        b"GET /healthz http/1.1\r\nHost: x\r\n\r\n",
        400,
    ),
];

/// Send `a` with [`NEXT`] behind it; what went differently from the table.
fn check(s: &Server, a: &Attempt) -> Result<(), String> {
    let mut c = RawHttp::connect(s.addr());
    let mut bytes = a.bytes.to_vec();
    bytes.extend_from_slice(NEXT);
    c.send(&bytes);
    let r = c.read_response(WAIT)?;
    if r.status != a.status {
        return Err(format!(
            "answered {} {}, expected {}",
            r.status,
            r.body_text(),
            a.status
        ));
    }
    if r.status >= 400 {
        let body: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("{} without a JSON body ({e})", r.status))?;
        if body["error"].as_str().is_none_or(str::is_empty) {
            return Err(format!("{} without an error: {body}", r.status));
        }
    }
    match a.then {
        Then::Closed => {
            if !c.closed_within(WAIT) {
                return Err(format!(
                    "after {}, the connection stayed open or the request behind was answered",
                    r.status
                ));
            }
        }
        Then::Served => {
            let next = c
                .read_response(WAIT)
                .map_err(|e| format!("the request behind: {e}"))?;
            if next.status != 200 || next.json() != serde_json::json!({"status": "ok"}) {
                return Err(format!(
                    "the request behind was answered {} {}",
                    next.status,
                    next.body_text()
                ));
            }
        }
    }
    Ok(())
}

/// Every attempt of `table` on one server; all differences reported at once.
fn run(table: &[Attempt]) {
    let s = Server::start();
    let wrong: Vec<String> = table
        .iter()
        .filter_map(|a| {
            check(&s, a).err().map(|e| {
                format!(
                    "{} ({:?}, {}, {:?}): {e}",
                    a.what,
                    String::from_utf8_lossy(a.bytes),
                    a.status,
                    a.then
                )
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} attempts went wrong:\n{}",
        wrong.len(),
        table.len(),
        wrong.join("\n")
    );
    s.assert_still_serving();
}

#[test]
fn content_length_is_digits_and_one_value() {
    run(CONTENT_LENGTH);
}

#[test]
fn transfer_encoding_is_chunked_alone_or_refused() {
    run(TRANSFER_ENCODING);
}

#[test]
fn header_lines_end_in_crlf_and_do_not_fold() {
    run(LINES);
}

#[test]
fn request_line_has_single_spaces() {
    run(REQUEST_LINE);
}

#[test]
fn chunked_request_body_is_refused_with_411() {
    let s = Server::start();
    let mut c = RawHttp::connect(s.addr());
    let body = "{\"username\":\"chunky\",\"password_hash\":\"correct horse battery\"}";
    let req = format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    c.send(req.as_bytes());
    let t = Instant::now();
    let r = c
        .read_response(WAIT)
        .expect("a chunked body must get an answer, not hang");
    assert_eq!(r.status, 411, "{}", r.body_text());
    assert!(r.json()["error"].is_string());
    assert!(t.elapsed() < Duration::from_secs(3));
    // The user was not created through the chunked request.
    let r = s.post(
        "/register",
        &serde_json::json!({"username": "chunky", "password_hash": "correct horse battery"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    s.assert_still_serving();
}
