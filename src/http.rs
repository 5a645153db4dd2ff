//! HTTP/1.1 request parsing (with `httparse`) and response writing.
//!
//! The reactor keeps each connection's unparsed bytes; [`parse`] looks at them
//! and says whether a whole request is there, how many bytes it used, or what
//! status to answer when it can never be a valid request. Only the headers the
//! server acts on are copied out, so the buffer can be drained right away.
//!
//! Framing is strict (RFC 9112 section 6): where a request ends must be read
//! the same way by this server and by any proxy in front of it, or the bytes
//! after it could be taken for a request the proxy never saw. So lines end in
//! CRLF, `Content-Length` is digits and one value, and a request with
//! `Transfer-Encoding` is never served. A request unclear on any of it is
//! refused, which closes the connection with whatever follows it unread.

use std::fmt::Write as _;

/// Request size limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
}

/// Most headers a request may carry (more is a 431).
const MAX_HEADERS: usize = 64;

/// A complete request, owning what the server uses of it.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The path as sent, still percent-encoded, without the query.
    pub path: String,
    /// Everything after `?`, still encoded.
    pub query: String,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    pub authorization: Option<String>,
    pub origin: Option<String>,
    /// `Upgrade: websocket` and `Connection: upgrade` were both sent.
    pub wants_websocket: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// `If-None-Match` (unread and left out when it is not UTF-8).
    pub if_none_match: Option<String>,
    pub body: Vec<u8>,
}

impl Request {
    /// The decoded value of query parameter `name` (first occurrence).
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(&self.query, name)
    }

    /// The bearer token, from `Authorization: Bearer` or `?token=`.
    pub fn bearer_token(&self) -> Option<String> {
        if let Some(h) = &self.authorization {
            let h = h.trim();
            // `get`: byte 7 may fall inside a multi-byte character.
            let bearer = h
                .get(..7)
                .is_some_and(|s| s.eq_ignore_ascii_case("bearer "));
            if bearer && h.len() > 7 {
                return Some(h[7..].trim().to_owned());
            }
        }
        self.query_param("token").filter(|t| !t.is_empty())
    }
}

/// What the bytes at the front of a connection's buffer amount to.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed. `head_done` tells whether only the body is
    /// missing; `expect_continue` whether the client waits for `100 Continue`.
    Incomplete {
        head_done: bool,
        expect_continue: bool,
    },
    /// A request, and the number of buffered bytes it took.
    Complete(Box<Request>, usize),
    /// Never a valid request: answer with this status and message, then close.
    Invalid(u16, &'static str),
}

/// The request headers `parse` reads.
#[derive(Clone, Copy)]
enum Field {
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    Authorization,
    Origin,
    WsKey,
    WsVersion,
    Expect,
    IfNoneMatch,
}

impl Field {
    fn of(name: &str) -> Option<Field> {
        const NAMES: [(&str, Field); 10] = [
            ("content-length", Field::ContentLength),
            ("transfer-encoding", Field::TransferEncoding),
            ("connection", Field::Connection),
            ("upgrade", Field::Upgrade),
            ("authorization", Field::Authorization),
            ("origin", Field::Origin),
            ("sec-websocket-key", Field::WsKey),
            ("sec-websocket-version", Field::WsVersion),
            ("expect", Field::Expect),
            ("if-none-match", Field::IfNoneMatch),
        ];
        NAMES
            .iter()
            .find(|(n, _)| name.eq_ignore_ascii_case(n))
            .map(|&(_, f)| f)
    }
}

/// Parse the request at the front of `buf`.
pub fn parse(buf: &[u8], limits: Limits) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_head {
                return Parsed::Invalid(431, "Request header fields too large");
            }
            return Parsed::Incomplete {
                head_done: false,
                expect_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(431, "Too many request header fields")
        }
        Err(_) => return Parsed::Invalid(400, "Malformed HTTP request"),
    };
    if head_len > limits.max_head {
        return Parsed::Invalid(431, "Request header fields too large");
    }
    if has_bare_lf(&buf[..head_len]) {
        return Parsed::Invalid(400, "Request lines must end in CRLF");
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid(400, "Malformed HTTP request");
    };

    let mut out = Request {
        method: method.to_owned(),
        ..Request::default()
    };
    match target.split_once('?') {
        Some((p, q)) => {
            out.path = p.to_owned();
            out.query = q.to_owned();
        }
        None => out.path = target.to_owned(),
    }
    if !out.path.starts_with('/') {
        return Parsed::Invalid(400, "Request target must be an absolute path");
    }

    let mut framing = Framing::default();
    let mut conn_close = false;
    let mut conn_upgrade = false;
    let mut upgrade_ws = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        // Headers not read here may carry any octets.
        let Some(field) = Field::of(h.name) else {
            continue;
        };
        // Only a cache check: a value it cannot read matches nothing.
        if let Field::IfNoneMatch = field {
            out.if_none_match = std::str::from_utf8(h.value)
                .ok()
                .map(|v| trim_ows(v).to_owned());
            continue;
        }
        // Non-UTF-8 values are legal in general, but ignoring one of these
        // would misread the request: its body length (and so where the next
        // request starts), its credentials.
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parsed::Invalid(400, "Malformed header value");
        };
        let value = trim_ows(value);
        match field {
            Field::ContentLength => {
                if let Err(text) = framing.content_length(value) {
                    return Parsed::Invalid(400, text);
                }
            }
            Field::TransferEncoding => framing.transfer_encoding(value),
            Field::Connection => {
                for token in value.split(',') {
                    let t = trim_ows(token);
                    if t.eq_ignore_ascii_case("close") {
                        conn_close = true;
                    } else if t.eq_ignore_ascii_case("upgrade") {
                        conn_upgrade = true;
                    }
                }
            }
            Field::Upgrade => {
                upgrade_ws = value
                    .split(',')
                    .any(|t| trim_ows(t).eq_ignore_ascii_case("websocket"));
            }
            Field::Authorization => out.authorization = Some(value.to_owned()),
            Field::Origin => out.origin = Some(value.to_owned()),
            Field::WsKey => out.ws_key = Some(value.to_owned()),
            Field::WsVersion => out.ws_version = Some(value.to_owned()),
            Field::IfNoneMatch => {}
            Field::Expect => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Parsed::Invalid(417, "Unsupported Expect header");
                }
            }
        }
    }
    // RFC 9112: HTTP/1.0 closes unless asked; here HTTP/1.0 always closes, as
    // the API promises, which every 1.0 client copes with.
    out.keep_alive = minor == 1 && !conn_close;
    out.wants_websocket = upgrade_ws && conn_upgrade;

    let body_len = match framing.body_len() {
        Ok(n) => n,
        Err((status, text)) => return Parsed::Invalid(status, text),
    };
    if body_len > limits.max_body {
        return Parsed::Invalid(413, "Request body too large");
    }
    let total = head_len + body_len;
    if buf.len() < total {
        return Parsed::Incomplete {
            head_done: true,
            expect_continue,
        };
    }
    out.body = buf[head_len..total].to_vec();
    Parsed::Complete(Box::new(out), total)
}

/// How a request's headers frame its body (RFC 9112 section 6), gathered
/// over all its `Content-Length` and `Transfer-Encoding` fields.
#[derive(Default)]
struct Framing {
    /// The one `Content-Length` value, once any was sent.
    content_length: Option<usize>,
    /// A `Transfer-Encoding` field was sent.
    coded: bool,
    /// Its codings, across all its fields: how often `chunked` appears,
    /// whether another one does (`identity` too: RFC 9112 has no such coding
    /// any more, and a proxy may frame it as anything), and whether one is
    /// empty.
    chunked: usize,
    unknown: bool,
    empty: bool,
}

impl Framing {
    /// One `Content-Length` field: a list of decimal numbers, all equal to
    /// each other and to those of any earlier field (RFC 9110 section 8.6).
    /// No sign, no inner space, no empty element.
    fn content_length(&mut self, value: &str) -> Result<(), &'static str> {
        for item in value.split(',') {
            let item = trim_ows(item);
            if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                return Err("Invalid Content-Length header");
            }
            let Ok(n) = item.parse::<usize>() else {
                return Err("Invalid Content-Length header");
            };
            if self.content_length.is_some_and(|old| old != n) {
                return Err("Conflicting Content-Length headers");
            }
            self.content_length = Some(n);
        }
        Ok(())
    }

    /// One `Transfer-Encoding` field: a list of codings.
    fn transfer_encoding(&mut self, value: &str) {
        self.coded = true;
        for item in value.split(',') {
            let coding = trim_ows(item);
            let chunked = coding.eq_ignore_ascii_case("chunked");
            self.chunked += usize::from(chunked);
            self.empty |= coding.is_empty();
            self.unknown |= !chunked && !coding.is_empty();
        }
    }

    /// The body length, or the answer that refuses the request: a body is
    /// never framed by `Transfer-Encoding`. A coding other than `chunked` is
    /// `501`; `chunked` alone asks for `411`; `chunked` with
    /// `Content-Length` or twice is a body whose end is in doubt: `400`
    /// (RFC 9112 section 6.3).
    fn body_len(&self) -> Result<usize, (u16, &'static str)> {
        if !self.coded {
            return Ok(self.content_length.unwrap_or(0));
        }
        if self.empty {
            return Err((400, "Malformed Transfer-Encoding header"));
        }
        if self.unknown {
            return Err((501, "Unsupported Transfer-Encoding"));
        }
        if self.content_length.is_some() {
            return Err((
                400,
                "Content-Length and Transfer-Encoding together; send Content-Length alone",
            ));
        }
        if self.chunked > 1 {
            return Err((400, "Invalid Transfer-Encoding: chunked more than once"));
        }
        Err((
            411,
            "Chunked request bodies are not accepted; send Content-Length",
        ))
    }
}

/// `s` without the optional whitespace (spaces and tabs, nothing else) that
/// may surround a field value or a list element.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Whether a request head has a line feed without its carriage return.
/// `httparse` takes a bare LF for a line end (RFC 9112 section 2.2 allows
/// it), but a proxy in front may take it for a byte inside a field value and
/// so see other fields, and another body length, than this server does.
fn has_bare_lf(head: &[u8]) -> bool {
    head.first() == Some(&b'\n') || head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r')
}

/// A response before serialisation.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header, for 405 and `OPTIONS`.
    pub allow: Option<&'static str>,
    /// Forces the connection closed after this response.
    pub close: bool,
    /// More headers, each `Name: value` (the web client's files).
    pub extra: Vec<(&'static str, String)>,
}

impl Response {
    /// A JSON response from any serialisable value.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Response {
            status,
            content_type: "application/json",
            body,
            allow: None,
            close: false,
            extra: Vec::new(),
        }
    }

    /// `{"message": ...}`.
    pub fn message(status: u16, text: &str) -> Response {
        Response::json(status, &serde_json::json!({ "message": text }))
    }

    /// `{"error": ...}`.
    pub fn error(status: u16, text: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": text }))
    }

    pub fn no_content(allow: &'static str) -> Response {
        Response {
            status: 204,
            content_type: "",
            body: Vec::new(),
            allow: Some(allow),
            close: false,
            extra: Vec::new(),
        }
    }

    pub fn method_not_allowed(allow: &'static str) -> Response {
        let mut r = Response::error(405, "Method not allowed");
        r.allow = Some(allow);
        r
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
            allow: None,
            close: false,
            extra: Vec::new(),
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Per-server response headers.
pub struct ResponseHeaders {
    pub cors_origin: String,
}

/// Serialise `resp`. `head_only` leaves the body out (HEAD requests).
pub fn serialize(
    resp: &Response,
    keep_alive: bool,
    head_only: bool,
    hdrs: &ResponseHeaders,
) -> Vec<u8> {
    let mut head = String::with_capacity(320);
    let _ = write!(head, "HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    if !resp.content_type.is_empty() {
        let _ = write!(head, "Content-Type: {}\r\n", resp.content_type);
    }
    if resp.status != 204 && resp.status != 304 {
        let _ = write!(head, "Content-Length: {}\r\n", resp.body.len());
    }
    for (name, value) in &resp.extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if let Some(allow) = resp.allow {
        let _ = write!(head, "Allow: {allow}\r\n");
    }
    if resp.status == 426 {
        head.push_str("Upgrade: websocket\r\n");
    }
    let _ = write!(
        head,
        "Access-Control-Allow-Origin: {}\r\n\
         Access-Control-Allow-Methods: GET, POST, DELETE, OPTIONS\r\n\
         Access-Control-Allow-Headers: Content-Type, Authorization\r\n\
         Access-Control-Max-Age: 600\r\n",
        hdrs.cors_origin
    );
    if hdrs.cors_origin != "*" {
        head.push_str("Vary: Origin\r\n");
    }
    head.push_str(if keep_alive && !resp.close {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    out
}

/// Decode `%XX` escapes (and `+` as space when `plus_is_space`). `None` when
/// an escape is malformed or the result is not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Whether every parameter of `query` percent-decodes to UTF-8 (one that
/// does not would read as absent).
pub fn query_decodes(query: &str) -> bool {
    query
        .split('&')
        .all(|pair| percent_decode(pair, true).is_some())
}

/// The first value of `name` in an encoded query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k, true)? == name).then(|| percent_decode(v, true))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 1024,
        max_body: 64,
    };

    #[test]
    fn pipelined_requests_are_split() {
        let buf = b"GET /rooms HTTP/1.1\r\nHost: x\r\n\r\nPOST /login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let Parsed::Complete(r1, n1) = parse(buf, LIMITS) else {
            panic!()
        };
        assert_eq!(
            (r1.method.as_str(), r1.path.as_str(), r1.keep_alive),
            ("GET", "/rooms", true)
        );
        let Parsed::Complete(r2, n2) = parse(&buf[n1..], LIMITS) else {
            panic!()
        };
        assert_eq!(r2.body, b"{}");
        assert_eq!(n1 + n2, buf.len());
    }

    #[test]
    fn limits_and_errors() {
        assert!(matches!(
            parse(b"GARBAGE\r\n\r\n", LIMITS),
            Parsed::Invalid(400, _)
        ));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        assert!(matches!(
            parse(big.as_bytes(), LIMITS),
            Parsed::Invalid(431, _)
        ));
        let body = b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n";
        assert!(matches!(parse(body, LIMITS), Parsed::Invalid(413, _)));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse(chunked, LIMITS), Parsed::Invalid(411, _)));
        let partial = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert!(matches!(
            parse(partial, LIMITS),
            Parsed::Incomplete {
                head_done: true,
                ..
            }
        ));
        let old = b"GET / HTTP/1.0\r\n\r\n";
        let Parsed::Complete(r, _) = parse(old, LIMITS) else {
            panic!()
        };
        assert!(!r.keep_alive);
    }

    /// The body length `parse` reads from `headers`, or its refusal.
    fn framed(headers: &str) -> Result<usize, u16> {
        let head = format!("POST / HTTP/1.1\r\n{headers}\r\n");
        match parse(head.as_bytes(), LIMITS) {
            Parsed::Complete(..) => Ok(0),
            Parsed::Incomplete { .. } => {
                match parse(&[head.as_bytes(), &[b'x'; 64]].concat(), LIMITS) {
                    Parsed::Complete(r, _) => Ok(r.body.len()),
                    other => panic!("{headers:?}: {other:?}"),
                }
            }
            Parsed::Invalid(status, _) => Err(status),
        }
    }

    #[test]
    fn content_length_is_digits_and_one_value() {
        assert_eq!(framed("Content-Length: 2\r\n"), Ok(2));
        assert_eq!(
            framed("Content-Length: 2, 2\r\nContent-Length: 02\r\n"),
            Ok(2)
        );
        for bad in [
            "+2",
            "-1",
            "1 1",
            "0x2",
            "",
            "2,",
            ",2",
            "2, 3",
            "2\u{a0}",
            "99999999999999999999999",
        ] {
            assert_eq!(
                framed(&format!("Content-Length: {bad}\r\n")),
                Err(400),
                "{bad:?}"
            );
        }
        assert_eq!(
            framed("Content-Length: 2\r\nContent-Length: 3\r\n"),
            Err(400)
        );
    }

    #[test]
    fn transfer_encoding_never_frames_a_body() {
        let te = |v: &str| framed(&format!("Transfer-Encoding: {v}\r\n"));
        assert_eq!(te("Chunked"), Err(411));
        for bad in ["chunked, chunked", "chunked,", ""] {
            assert_eq!(te(bad), Err(400), "{bad:?}");
        }
        for unknown in [
            "gzip",
            "xchunked",
            "gzip, chunked",
            "chunked;x=1",
            "identity",
            "chunked, identity",
        ] {
            assert_eq!(te(unknown), Err(501), "{unknown:?}");
        }
        assert_eq!(
            framed("Transfer-Encoding: chunked\r\nContent-Length: 2\r\n"),
            Err(400)
        );
    }

    #[test]
    fn lines_end_in_crlf() {
        for head in [
            &b"GET / HTTP/1.1\nHost: x\n\n"[..],
            b"GET / HTTP/1.1\r\nX: 1\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
            b"\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head, LIMITS), Parsed::Invalid(400, _)),
                "{head:?}"
            );
        }
        assert!(matches!(
            parse(b"\r\nGET / HTTP/1.1\r\n\r\n", LIMITS),
            Parsed::Complete(..)
        ));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("My%20Room", false).unwrap(), "My Room");
        assert_eq!(percent_decode("a+b", true).unwrap(), "a b");
        assert!(percent_decode("%zz", false).is_none());
        assert!(percent_decode("%ff", false).is_none());
        assert_eq!(
            query_param("name=Gen%20eral&username=bob", "name").unwrap(),
            "Gen eral"
        );
        assert_eq!(query_param("a=1&b", "b").unwrap(), "");
        assert!(query_param("a=1", "b").is_none());
    }
}
