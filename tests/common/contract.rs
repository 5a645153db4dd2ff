//! Helpers of the contract tests (`tests/contract_*.rs`): signals, a raw
//! exchange for answers the harness's readers cannot frame (a `HEAD` answer
//! carries a `Content-Length` but no body), and reads of `/metrics` that
//! wait for a value instead of sleeping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::{find_subslice, metric_value, RawHttp, RawResponse, Server, WAIT, WS_UPGRADE_HEADERS};

/// Send `sig` (`libc::SIGINT`, `libc::SIGTERM`, ...) to the server process.
pub fn signal(s: &Server, sig: libc::c_int) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(s.pid() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({sig}) failed");
}

/// Raise this process's open-file soft limit to at least `n` (the hard limit
/// permitting); panics when it cannot, rather than let a test fail obscurely.
pub fn ensure_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n && lim.rlim_max >= n {
            lim.rlim_cur = n;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "this test needs {n} open files; the limit is {} (hard {})",
        lim.rlim_cur,
        lim.rlim_max
    );
}

/// A `GET` upgrade request for `path_and_query` with valid WebSocket headers,
/// on a fresh connection; the server's answer (a refusal has a JSON body).
pub fn raw_upgrade(addr: SocketAddr, path_and_query: &str) -> RawResponse {
    let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: x\r\n{WS_UPGRADE_HEADERS}\r\n");
    super::raw_request(addr, req.as_bytes())
}

/// Split one response head off the front of `bytes`: the head (with an
/// empty body) and the bytes after it.
pub fn split_head(bytes: &[u8]) -> (RawResponse, &[u8]) {
    let end = find_subslice(bytes, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(bytes)
        )
    });
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let head = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    (head, &bytes[end + 4..])
}

/// Send `first` and then `GET /healthz` with `Connection: close` on one
/// connection, and read everything the server sends until it closes.
/// Panics when the server does not close within [`WAIT`].
pub fn then_healthz_and_close(addr: SocketAddr, first: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).expect("tcp connect");
    c.set_nodelay(true).ok();
    c.write_all(first).expect("send the first request");
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send GET /healthz");
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close within {WAIT:?}; got {:?}",
            String::from_utf8_lossy(&out)
        );
        c.set_read_timeout(Some(left)).ok();
        match c.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading: {e}; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
}

/// One sample of `/metrics` (a name with its labels, exactly as printed).
pub fn metric(s: &Server, sample: &str) -> f64 {
    let text = s.metrics();
    metric_value(&text, sample).unwrap_or_else(|| panic!("no {sample} in /metrics:\n{text}"))
}

/// Wait until the sample reads `want`; panics with the last value after [`WAIT`].
pub fn wait_metric(s: &Server, sample: &str, want: f64) {
    s.await_metric(sample, &format!("expected {want}"), |got| got == want);
}

const REQUESTS: &str = "chatconnect_http_requests_total";

/// Knows when requests sent on other connections have been read by the
/// server. The reactor handles a request in the pass that parses it, so
/// once it is counted its effect (a job queued, a room fenced) is in place.
pub struct Parsed {
    baseline: f64,
    reads: f64,
}

impl Parsed {
    /// Take the baseline: call before sending the requests to wait for.
    pub fn start(s: &Server) -> Parsed {
        Parsed {
            baseline: metric(s, REQUESTS),
            reads: 0.0,
        }
    }

    /// Wait until `n` requests besides these `/metrics` reads have been
    /// parsed since [`Parsed::start`].
    pub fn wait_for(&mut self, s: &Server, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            // Each read counts itself.
            self.reads += 1.0;
            let got = metric(s, REQUESTS) - self.baseline - self.reads;
            if got >= n as f64 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{got} of {n} requests parsed within {WAIT:?}\n--- server log ---\n{}",
                s.log_text()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Send `bytes` on a fresh connection: the answer must be `status` with a
/// JSON error, and the server must close the connection after it.
pub fn assert_refused_and_closed(s: &Server, bytes: &[u8], status: u16) {
    let shown = String::from_utf8_lossy(bytes).into_owned();
    let mut c = RawHttp::connect(s.addr());
    c.send(bytes);
    let r = c
        .read_response(WAIT)
        .unwrap_or_else(|e| panic!("{shown:?}: {e}"));
    assert_eq!(r.status, status, "{shown:?}: {}", r.body_text());
    assert!(
        r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{shown:?}: {}",
        r.body_text()
    );
    assert!(
        c.closed_within(WAIT),
        "{shown:?}: connection left open after {status}"
    );
}
