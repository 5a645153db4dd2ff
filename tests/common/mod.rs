//! End-to-end test harness: starts the real `chatserver` binary on port 0 in a
//! fresh temporary directory and talks to it over HTTP (ureq), WebSocket
//! (tungstenite) and raw TCP (for what well-behaved clients never send).
//!
//! Every wait here is bounded: a test that hangs is a failed test with the
//! server's last log lines in its message, never a stuck CI run.

#![allow(dead_code)]

pub mod contract;
pub mod history;
pub mod mongo;
pub mod redis;
pub mod service;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Default time any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long a marker's echo may take (see [`WsClient::expect_marker_next`]).
///
/// Absence is proven with a marker, never with a quiet window: after the
/// action under test, a member sends a message and reads up to its echo.
/// The server queues a member's frames in order, and broadcasts a room's
/// messages in `seq` order after the member's history; so whatever it
/// queued to this member before it stored the marker (history, a
/// broadcast, an error frame) arrives before the echo. "Nothing arrived"
/// is "the echo is the next frame", however slow the server is, where a
/// quiet window proves only that nothing arrived in time. The marker is a
/// stored message like any other (it takes the next `seq`).
pub const MARKER_WAIT: Duration = Duration::from_secs(10);

/// Frames read while looking for a marker before giving up.
const MARKER_MAX_BEFORE: usize = 10_000;

/// How long the server may take to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines kept for failure messages.
const LOG_KEEP: usize = 200;

/// Every configuration variable the server knows: removed from the child's
/// environment so that the machine's environment cannot leak into a test.
pub const CONFIG_VARS: &[&str] = chatconnect::config::VARIABLES;

// ---------------------------------------------------------------------------
// Unique names

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique within this test process run (and across test binaries
/// thanks to the pid), made only of characters valid in usernames and room
/// names, at most 32 characters for short prefixes.
pub fn uniq(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}", std::process::id())
}

/// Percent-encode a path segment or query value (everything but unreserved).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Server process

type Log = Arc<Mutex<VecDeque<String>>>;

fn push_log(log: &Log, line: String) {
    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
    if l.len() >= LOG_KEEP {
        l.pop_front();
    }
    l.push_back(line);
}

/// Parse `listening on 127.0.0.1:PORT` out of a log line.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on ")? + "listening on ".len();
    let rest = &line[at..];
    let rest = rest.trim_start_matches(['h', 't', 'p', ':', '/']);
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// How long one HTTP call may take before the test fails (a guard against a
/// hung server, not a bound on speed).
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// The harness's HTTP client: statuses are answers, not errors; no proxy.
fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .proxy(None)
        .build()
        .new_agent()
}

/// A running `chatserver` child process, killed on drop.
pub struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    root: tempfile::TempDir,
    env: Vec<(String, String)>,
    log: Log,
    agent: ureq::Agent,
}

impl Server {
    /// Start with the harness's defaults.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Start with extra environment variables (they override the defaults).
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Server::start_with_setup(env, |_| {})
    }

    /// Start after `setup` has prepared the working directory (the data
    /// directory is `root/data`, which does not exist yet).
    pub fn start_with_setup(env: &[(&str, &str)], setup: impl FnOnce(&Path)) -> Server {
        let root = tempfile::Builder::new()
            .prefix("chatconnect-test-")
            .tempdir()
            .expect("create temp dir");
        setup(root.path());
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log: Log = Arc::new(Mutex::new(VecDeque::new()));
        let (child, addr) = spawn_server(root.path(), &env, &log);
        Server {
            child: Some(child),
            addr,
            root,
            env,
            log,
            agent: http_agent(HTTP_TIMEOUT),
        }
    }

    /// Allow each HTTP call `timeout` instead of [`HTTP_TIMEOUT`], for calls
    /// that are slow by nature.
    pub fn set_http_timeout(&mut self, timeout: Duration) {
        self.agent = http_agent(timeout);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_base(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// The working directory of the server.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Take SQLite's write lock on the server's database from a connection
    /// of the test's own (`BEGIN IMMEDIATE`, what another process's write
    /// holds) until the returned connection rolls back or is dropped.
    pub fn hold_write_lock(&self) -> rusqlite::Connection {
        let lock = rusqlite::Connection::open(self.data_dir().join("chatconnect.db"))
            .expect("open the database beside the server");
        lock.execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        lock
    }

    /// The last log lines (stderr and stdout), for failure messages.
    pub fn log_text(&self) -> String {
        let l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("VmRSS:") {
                let num: String = rest.chars().filter(|c| c.is_ascii_digit()).collect();
                return num.parse().expect("VmRSS number");
            }
        }
        panic!("no VmRSS in /proc/{}/status", self.pid());
    }

    pub fn sigterm(&self) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
    }

    /// Wait for the process to exit; panics (with the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server running");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("try_wait: {e}"),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not exit within {timeout:?}\n--- server log ---\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop (SIGTERM, must exit 0), then start again on the same
    /// working directory, data directory and environment. The port changes.
    pub fn restart(&mut self) {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "server exited with {status} on SIGTERM\n--- server log ---\n{}",
            self.log_text()
        );
        self.child = None;
        push_log(&self.log, "---------- restart ----------".into());
        let (child, addr) = spawn_server(self.root.path(), &self.env, &self.log);
        self.child = Some(child);
        self.addr = addr;
    }

    /// Start again after the process has already exited (after `sigterm`
    /// and `wait_exit`), on the same directories and environment.
    pub fn restart_after_exit(&mut self) {
        let child = self.child.as_mut().expect("server process");
        let exited = child.try_wait().expect("try_wait");
        assert!(
            exited.is_some(),
            "restart_after_exit: the server is still running"
        );
        self.child = None;
        push_log(&self.log, "---------- restart ----------".into());
        let (child, addr) = spawn_server(self.root.path(), &self.env, &self.log);
        self.child = Some(child);
        self.addr = addr;
    }

    // --- HTTP -------------------------------------------------------------

    /// Any request. `body` is sent as is (with `Content-Type: application/json`
    /// unless `headers` names another).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{}", self.base_url(), path);
        let has_ct = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        let result = match method {
            "GET" | "DELETE" | "OPTIONS" | "HEAD" => {
                let mut rb = match method {
                    "GET" => self.agent.get(&url),
                    "DELETE" => self.agent.delete(&url),
                    "HEAD" => self.agent.head(&url),
                    _ => self.agent.options(&url),
                };
                for (k, v) in headers {
                    rb = rb.header(*k, *v);
                }
                rb.call()
            }
            "POST" | "PUT" | "PATCH" => {
                let mut rb = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.patch(&url),
                };
                for (k, v) in headers {
                    rb = rb.header(*k, *v);
                }
                match body {
                    Some(b) => {
                        if !has_ct {
                            rb = rb.header("Content-Type", "application/json");
                        }
                        rb.send(b.to_string())
                    }
                    None => rb.send_empty(),
                }
            }
            other => panic!("unsupported method {other}"),
        };
        let mut resp = result.unwrap_or_else(|e| {
            panic!(
                "{method} {path}: request failed: {e}\n--- server log ---\n{}",
                self.log_text()
            )
        });
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into(),
                )
            })
            .collect();
        let body = if method == "HEAD" {
            String::new()
        } else {
            resp.body_mut()
                .with_config()
                .limit(64 * 1024 * 1024)
                .read_to_string()
                .unwrap_or_else(|e| panic!("{method} {path}: reading body: {e}"))
        };
        Resp {
            method: method.into(),
            path: path.into(),
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None, &[])
    }

    pub fn get_auth(&self, path: &str, token: &str) -> Resp {
        let bearer = format!("Bearer {token}");
        self.request("GET", path, None, &[("Authorization", &bearer)])
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.request("POST", path, Some(&body.to_string()), &[])
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Resp {
        self.request("POST", path, Some(body), &[])
    }

    pub fn post_auth(&self, path: &str, body: &Value, token: &str) -> Resp {
        let bearer = format!("Bearer {token}");
        self.request(
            "POST",
            path,
            Some(&body.to_string()),
            &[("Authorization", &bearer)],
        )
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.request("DELETE", path, None, &[])
    }

    pub fn delete_auth(&self, path: &str, token: &str) -> Resp {
        let bearer = format!("Bearer {token}");
        self.request("DELETE", path, None, &[("Authorization", &bearer)])
    }

    /// Register a user (asserting 200).
    pub fn register(&self, username: &str, password: &str) {
        let r = self.post(
            "/register",
            &serde_json::json!({"username": username, "password_hash": password}),
        );
        assert_eq!(
            r.status,
            200,
            "register {username}: {r:?}\n{}",
            self.log_text()
        );
    }

    /// Log in (asserting 200) and return the token.
    pub fn login(&self, username: &str, password: &str) -> String {
        let r = self.post(
            "/login",
            &serde_json::json!({"username": username, "password_hash": password}),
        );
        assert_eq!(
            r.status,
            200,
            "login {username}: {r:?}\n{}",
            self.log_text()
        );
        r.json()["token"]
            .as_str()
            .unwrap_or_else(|| panic!("login response without token: {r:?}"))
            .to_string()
    }

    /// Register then log in; returns the token.
    pub fn user_with_token(&self, username: &str) -> String {
        self.register(username, "correct horse battery");
        self.login(username, "correct horse battery")
    }

    /// Messages of a room through the REST API (asserting 200).
    pub fn messages(&self, room: &str, query: &str) -> Vec<Value> {
        let path = if query.is_empty() {
            format!("/rooms/{}/messages", enc(room))
        } else {
            format!("/rooms/{}/messages?{query}", enc(room))
        };
        let r = self.get(&path);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.json()
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("not an array: {r:?}"))
    }

    /// The newest `seq` of a room through REST; 0 for a room without
    /// messages or without a room.
    pub fn newest_seq(&self, room: &str) -> i64 {
        let path = format!("/rooms/{}/messages?limit=1", enc(room));
        let r = self.get(&path);
        match r.status {
            404 => 0,
            200 => r.json()[0]["seq"].as_i64().unwrap_or(0),
            _ => panic!("GET {path}: {r:?}"),
        }
    }

    /// The rooms listed by `GET /rooms` (asserting 200 and an array).
    pub fn rooms(&self) -> Vec<Value> {
        let r = self.get("/rooms");
        assert_eq!(r.status, 200, "GET /rooms: {r:?}");
        r.json()
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("not an array: {r:?}"))
    }

    /// The `/metrics` text (asserting 200).
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {r:?}");
        r.body
    }

    /// Poll `/metrics` until the sample `name` (with its labels, if any)
    /// satisfies `ok`, and return it; panics after [`WAIT`], saying it was
    /// waiting for `what`.
    pub fn await_metric(&self, name: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = metric_value(&self.metrics(), name);
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {name} is {v:?} after {WAIT:?}\n--- server log ---\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait until the server's log contains `text`; panics (with the log)
    /// after `timeout`.
    pub fn await_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log after {timeout:?}:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    // --- WebSocket --------------------------------------------------------

    /// `ws://ADDR/ws/ROOM?username=NAME` (room and name percent-encoded).
    pub fn ws_url(&self, room: &str, username: &str) -> String {
        format!(
            "{}/ws/{}?username={}",
            self.ws_base(),
            enc(room),
            enc(username)
        )
    }

    /// Connect to a room; panics when the upgrade fails.
    pub fn ws(&self, room: &str, username: &str) -> WsClient {
        self.ws_path(&format!("/ws/{}?username={}", enc(room), enc(username)))
    }

    /// Connect to a path (with query); panics when the upgrade fails.
    pub fn ws_path(&self, path_and_query: &str) -> WsClient {
        self.try_ws(path_and_query, &[]).unwrap_or_else(|e| {
            panic!(
                "WebSocket connect {path_and_query} failed: {}\n--- server log ---\n{}",
                describe_ws_error(&e),
                self.log_text()
            )
        })
    }

    /// Connect to a path with extra request headers.
    pub fn try_ws(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, tungstenite::Error> {
        let url = format!("{}{}", self.ws_base(), path_and_query);
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                tungstenite::http::HeaderValue::from_str(v).expect("header value"),
            );
        }
        let stream = TcpStream::connect(self.addr).map_err(tungstenite::Error::Io)?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        stream.set_nodelay(true).ok();
        let (ws, _resp) = tungstenite::client::client(req, MaybeTlsStream::Plain(stream)).map_err(
            |e| match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::Io(
                    std::io::Error::new(ErrorKind::TimedOut, "handshake interrupted"),
                ),
            },
        )?;
        Ok(WsClient { ws })
    }

    /// The HTTP status of a refused WebSocket upgrade (panics if it succeeded).
    pub fn ws_refused_status(&self, path_and_query: &str, headers: &[(&str, &str)]) -> u16 {
        match self.try_ws(path_and_query, headers) {
            Ok(_) => panic!("WebSocket upgrade to {path_and_query} unexpectedly succeeded"),
            Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => {
                panic!("WebSocket connect {path_and_query}: expected an HTTP refusal, got {e}")
            }
        }
    }

    /// Assert the server still serves: `/healthz` answers and a fresh
    /// WebSocket gets its own message back.
    pub fn assert_still_serving(&self) {
        let r = self.get("/healthz");
        assert_eq!(
            r.status,
            200,
            "healthz after the incident: {r:?}\n{}",
            self.log_text()
        );
        let room = uniq("alive");
        let mut c = self.ws(&room, &uniq("alive"));
        c.send_content("still alive?");
        let m = c.expect_json(WAIT);
        assert_eq!(
            m["content"],
            "still alive?",
            "echo after the incident: {m}\n{}",
            self.log_text()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `chatserver` binary to run in `root`: none of the caller's
/// configuration variables, a free port on 127.0.0.1, data in `root/data`,
/// info logging, no stdin. Callers add their environment and pipes.
pub fn server_command(root: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatserver"));
    cmd.current_dir(root);
    for var in CONFIG_VARS {
        cmd.env_remove(var);
    }
    cmd.env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", root.join("data"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

fn spawn_server(root: &Path, env: &[(String, String)], log: &Log) -> (Child, SocketAddr) {
    let mut cmd = server_command(root);
    cmd.env("BCRYPT_COST", "4");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn chatserver");

    let (tx, rx) = mpsc::channel::<SocketAddr>();
    let stderr = child.stderr.take().expect("stderr piped");
    let stdout = child.stdout.take().expect("stdout piped");
    {
        let log = log.clone();
        let tx = tx.clone();
        thread::spawn(move || drain_lines(stderr, &log, Some(tx)));
    }
    {
        let log = log.clone();
        thread::spawn(move || drain_lines(stdout, &log, Some(tx)));
    }

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(addr) => return (child, addr),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Give the readers a moment to collect the last lines.
            thread::sleep(Duration::from_millis(200));
            let text = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("chatserver exited with {status} before listening\n--- server log ---\n{text}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text = log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("chatserver did not print `listening on` within {START_TIMEOUT:?}\n--- server log ---\n{text}");
        }
    }
}

fn drain_lines(pipe: impl Read, log: &Log, tx: Option<mpsc::Sender<SocketAddr>>) {
    let mut reader = BufReader::new(pipe);
    let mut tx = tx;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if let Some(addr) = parse_listening(&text) {
            if let Some(tx) = tx.take() {
                let _ = tx.send(addr);
            }
        }
        push_log(log, text);
    }
}

/// Run the binary to completion with arguments and extra environment
/// (in a fresh temp dir). Returns (status, stdout, stderr); panics after `timeout`.
pub fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let root = tempfile::tempdir().expect("temp dir");
    let mut cmd = server_command(root.path());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn chatserver");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatserver {args:?} did not exit within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------
// HTTP responses

#[derive(Debug, Clone)]
pub struct Resp {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; asserts `Content-Type: application/json`.
    pub fn json(&self) -> Value {
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.to_ascii_lowercase().starts_with("application/json"),
            "{} {}: Content-Type is {ct:?}, expected application/json: {self:?}",
            self.method,
            self.path
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {}: body is not JSON ({e}): {self:?}",
                self.method, self.path
            )
        })
    }

    /// Asserts the status and that the body is `{"error": "<non-empty sentence>"}`;
    /// returns the sentence.
    pub fn expect_error(&self, status: u16) -> String {
        assert_eq!(
            self.status, status,
            "{} {}: {self:?}",
            self.method, self.path
        );
        let v = self.json();
        let text = v["error"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "{} {}: error body without \"error\" string: {self:?}",
                    self.method, self.path
                )
            })
            .to_string();
        assert!(
            !text.trim().is_empty(),
            "{} {}: empty error sentence",
            self.method,
            self.path
        );
        text
    }

    /// Asserts the status and the exact error sentence.
    pub fn expect_error_text(&self, status: u16, text: &str) {
        let got = self.expect_error(status);
        assert_eq!(got, text, "{} {}: {self:?}", self.method, self.path);
    }
}

// ---------------------------------------------------------------------------
// JSON and time helpers

/// True for `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn is_rfc3339_millis_utc(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && s.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
}

/// True for an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || !s.ends_with('Z') {
        return false;
    }
    let base = b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
    let tail = &s[19..s.len() - 1];
    base && (tail.is_empty()
        || (tail.starts_with('.')
            && tail.len() > 1
            && tail[1..].bytes().all(|c| c.is_ascii_digit())))
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn parse_rfc3339_millis(s: &str) -> i64 {
    assert!(is_rfc3339_utc(s), "not an RFC 3339 UTC time: {s:?}");
    let num = |a: usize, b: usize| -> i64 { s[a..b].parse().expect("digits") };
    let (y, mo, d) = (num(0, 4), num(5, 7), num(8, 10));
    let (h, mi, se) = (num(11, 13), num(14, 16), num(17, 19));
    let frac = &s[19..s.len() - 1];
    let ms = if frac.is_empty() {
        0
    } else {
        let digits = &frac[1..];
        let mut v: i64 = 0;
        for (i, c) in digits.bytes().take(3).enumerate() {
            v += (c - b'0') as i64 * [100, 10, 1][i];
        }
        v
    };
    // days from civil (Howard Hinnant's algorithm)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    ((days * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The seqs of a list of message frames.
pub fn seqs(msgs: &[Value]) -> Vec<i64> {
    msgs.iter()
        .map(|m| {
            m["seq"]
                .as_i64()
                .unwrap_or_else(|| panic!("message without integer seq: {m}"))
        })
        .collect()
}

/// Sum of the samples of a metric (exact name, any labels).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix(name) {
            let rest = if rest.starts_with('{') {
                match rest.find('}') {
                    Some(i) => &rest[i + 1..],
                    None => continue,
                }
            } else if rest.starts_with(' ') {
                rest
            } else {
                continue;
            };
            if let Some(v) = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// WebSocket client (tungstenite)

pub struct WsClient {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

/// What `WsClient::recv` saw.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Binary(Vec<u8>),
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame (reset, EOF).
    Gone(String),
    Timeout,
}

pub fn describe_ws_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!(
            "HTTP {} {}",
            resp.status(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

impl WsClient {
    fn stream(&self) -> &TcpStream {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(s) => s,
            _ => unreachable!("plain ws:// only"),
        }
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.stream()
            .set_read_timeout(Some(t.max(Duration::from_millis(1))))
            .expect("set_read_timeout");
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .expect("ws send");
    }

    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    /// Send `{"content": content}`.
    pub fn send_content(&mut self, content: &str) {
        self.send_json(&serde_json::json!({ "content": content }));
    }

    /// Like `send_content` but reports failure (the server may have
    /// closed the socket).
    pub fn try_send_content(&mut self, content: &str) -> Result<(), tungstenite::Error> {
        let text = serde_json::json!({ "content": content }).to_string();
        self.ws.send(Message::text(text))
    }

    /// The next data or close event, skipping pings and pongs.
    pub fn recv(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Event::Timeout;
            }
            self.set_read_timeout(deadline - now);
            match self.ws.read() {
                Ok(Message::Text(t)) => return Event::Text(t.to_string()),
                Ok(Message::Binary(b)) => return Event::Binary(b.to_vec()),
                Ok(Message::Close(f)) => {
                    // Send the close reply tungstenite has queued, as a
                    // well-behaved client does at once.
                    let _ = self.ws.flush();
                    return Event::Close(f.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => return Event::Gone(e.to_string()),
            }
        }
    }

    /// The next text frame as JSON, or None on timeout. Panics on close.
    pub fn recv_json(&mut self, timeout: Duration) -> Option<Value> {
        match self.recv(timeout) {
            Event::Text(t) => Some(
                serde_json::from_str(&t)
                    .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {t}")),
            ),
            Event::Timeout => None,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame as JSON; panics on timeout.
    pub fn expect_json(&mut self, timeout: Duration) -> Value {
        self.recv_json(timeout)
            .unwrap_or_else(|| panic!("no frame within {timeout:?}"))
    }

    /// Exactly `n` frames (panics when they do not come in time).
    pub fn recv_n(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_json(left) {
                Some(v) => out.push(v),
                None => panic!(
                    "got {} of {n} frames within {timeout:?}: last {:?}",
                    out.len(),
                    out.last()
                ),
            }
        }
        out
    }

    /// Read until a close frame; returns (code, reason). Panics on timeout or
    /// when the connection ends without a close frame.
    pub fn recv_until_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        for _ in 0..1_000_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Event::Text(_) | Event::Binary(_) => continue,
                Event::Close(Some(cr)) => return cr,
                Event::Close(None) => return (1005, String::new()),
                Event::Gone(why) => panic!("connection ended without a close frame: {why}"),
                Event::Timeout => panic!("no close frame within {timeout:?}"),
            }
        }
        panic!("too many frames before the close");
    }

    /// Send content and wait for its echo (skipping other frames); returns the echo.
    pub fn round_trip(&mut self, content: &str, timeout: Duration) -> Value {
        self.send_content(content);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .recv_json(left)
                .unwrap_or_else(|| panic!("no echo of {content:?} within {timeout:?}"));
            if m["content"] == content {
                return m;
            }
        }
    }

    /// The frames received before the message whose content is `content`
    /// (sent by this member or another), and that message. Panics when it
    /// does not come within `timeout`.
    fn recv_until_content(&mut self, content: &str, timeout: Duration) -> (Vec<Value>, Value) {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        for _ in 0..MARKER_MAX_BEFORE {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_json(left).unwrap_or_else(|| {
                panic!(
                    "no message {content:?} within {timeout:?}; {} frames before it: {:?}",
                    before.len(),
                    before.last()
                )
            });
            if m.get("seq").is_some() && m["content"] == content {
                return (before, m);
            }
            before.push(m);
        }
        panic!("over {MARKER_MAX_BEFORE} frames before the message {content:?}");
    }

    /// Send `marker` as a message and assert that its echo is the next
    /// frame: nothing else was on its way to this member (see
    /// [`MARKER_WAIT`] for why). Returns the echo.
    pub fn expect_marker_next(&mut self, marker: &str) -> Value {
        self.send_content(marker);
        self.expect_content_next(marker)
    }

    /// Assert that the next frame is the message `content` (a marker another
    /// member sent). Returns it.
    pub fn expect_content_next(&mut self, content: &str) -> Value {
        let (before, m) = self.recv_until_content(content, MARKER_WAIT);
        assert!(
            before.is_empty(),
            "expected the message {content:?} next, got {} frames first: {before:?}",
            before.len()
        );
        m
    }
}

/// Send `n` messages `prefix-0..n` through a fresh connection and return the
/// echoes (asserting they are in order).
pub fn post_messages(
    server: &Server,
    room: &str,
    user: &str,
    prefix: &str,
    n: usize,
) -> Vec<Value> {
    // Joined after the room's newest message: no history comes first.
    let newest = server.newest_seq(room);
    let mut c = server.ws_path(&format!(
        "/ws/{}?username={}&since={newest}",
        enc(room),
        enc(user)
    ));
    let contents: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut out = Vec::with_capacity(n);
    // Send in chunks so neither side's buffers matter.
    for chunk in contents.chunks(100) {
        for content in chunk {
            c.send_content(content);
        }
        let echoes = c.recv_n(chunk.len(), Duration::from_secs(20));
        for (e, want) in echoes.iter().zip(chunk) {
            assert_eq!(
                e["content"].as_str(),
                Some(want.as_str()),
                "echo order: {e}"
            );
        }
        out.extend(echoes);
    }
    out
}

// ---------------------------------------------------------------------------
// Raw TCP: HTTP

/// A raw HTTP/1.1 connection that keeps unread bytes between responses.
pub struct RawHttp {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body_text()))
    }
}

fn find_subslice(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

impl RawHttp {
    pub fn connect(addr: SocketAddr) -> RawHttp {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        RawHttp {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// Like `send` but reports failure (the server may have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read more bytes into the buffer; Ok(0) on EOF.
    fn fill(&mut self, deadline: Instant) -> std::io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "deadline"));
        }
        self.stream.set_read_timeout(Some(left)).ok();
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                Err(std::io::Error::new(ErrorKind::TimedOut, "timeout"))
            }
            Err(e) => Err(e),
        }
    }

    /// Read one response (head plus Content-Length body).
    pub fn read_response(&mut self, timeout: Duration) -> Result<RawResponse, String> {
        let deadline = Instant::now() + timeout;
        let head_end = loop {
            if let Some(i) = find_subslice(&self.buf, b"\r\n\r\n") {
                break i;
            }
            match self.fill(deadline) {
                Ok(0) => {
                    return Err(format!(
                        "EOF before a complete response head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "reading response head: {e}; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(format!("bad status line {status_line:?}"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        self.buf.drain(..head_end + 4);
        let cl = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let no_body = status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else if let Some(n) = cl {
            while self.buf.len() < n {
                match self.fill(deadline) {
                    Ok(0) => return Err(format!("EOF inside a {n}-byte body")),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading body: {e}")),
                }
            }
            self.buf.drain(..n).collect()
        } else {
            // No length: body runs to EOF.
            loop {
                match self.fill(deadline) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading close-delimited body: {e}")),
                }
            }
            std::mem::take(&mut self.buf)
        };
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// True when the server closes the connection (EOF or reset) within
    /// `timeout` without sending anything more.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..10_000 {
            match self.fill(deadline) {
                Ok(0) => return self.buf.is_empty(),
                Ok(_) => continue, // more data: keep reading, but it means not clean
                Err(e) if e.kind() == ErrorKind::TimedOut => return false,
                Err(_) => return true, // reset
            }
        }
        false
    }
}

/// Send `bytes` on a fresh connection and read one response.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawResponse {
    let mut c = RawHttp::connect(addr);
    c.send(bytes);
    c.read_response(WAIT).unwrap_or_else(|e| {
        panic!(
            "raw request {:?}: {e}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })
}

// ---------------------------------------------------------------------------
// Raw TCP: WebSocket

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The headers of a valid WebSocket upgrade request (a fixed key), each
/// ending in CRLF, for requests written by hand.
pub const WS_UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// A client frame, masked, FIN set.
pub fn encode_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode_frame(true, opcode, payload, true)
}

/// Any frame: `fin` flag, opcode, payload, masked or not.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= 0xffff {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A WebSocket on a socket with a small receive buffer, so that what the
/// server sends it backs up at once when it does not read.
pub fn non_reading_member(s: &Server, path: &str) -> RawWs {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect(&s.addr().into()).expect("connect");
    RawWs::handshake(sock.into(), s.addr(), path)
}

/// An attacker's connections that pipeline requests and never read: each
/// sends 100 KB of `GET /metrics` (an answer of about 12 KB each) as the
/// server takes it.
pub struct Pipeliners {
    payload: Vec<u8>,
    /// Each connection (non-blocking) with the bytes it has sent.
    pub conns: Vec<(TcpStream, usize)>,
}

impl Pipeliners {
    /// `n` connections to `s`, nothing sent yet.
    pub fn open(s: &Server, n: usize) -> Pipeliners {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let conns = (0..n)
            .map(|_| {
                let c = TcpStream::connect(s.addr()).expect("connect");
                c.set_nonblocking(true).expect("nonblocking");
                (c, 0)
            })
            .collect();
        Pipeliners {
            payload: req.repeat(100_000 / req.len()),
            conns,
        }
    }

    /// Send on each connection what its socket takes now; true if any
    /// took something.
    pub fn push(&mut self) -> bool {
        let mut progress = false;
        for (c, sent) in self.conns.iter_mut() {
            if *sent < self.payload.len() {
                if let Ok(n) = c.write(&self.payload[*sent..]) {
                    *sent += n;
                    progress |= n > 0;
                }
            }
        }
        progress
    }

    /// Bytes sent on all connections.
    pub fn sent(&self) -> usize {
        self.conns.iter().map(|(_, n)| n).sum()
    }
}

/// A WebSocket spoken by hand over a TcpStream.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// One server frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub enum FrameEnd {
    Timeout,
    Eof,
    Error(String),
}

impl RawWs {
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> RawWs {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        RawWs::handshake(stream, addr, path_and_query)
    }

    /// Perform the client handshake on `stream`; asserts 101 and the accept key.
    pub fn handshake(mut stream: TcpStream, addr: SocketAddr, path_and_query: &str) -> RawWs {
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let key = tungstenite::handshake::client::generate_key();
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).expect("handshake write");
        let (raw, head) = RawWs::read_upgrade(stream);
        let want = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let accept = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|(_, v)| v.trim().to_string());
        assert_eq!(
            accept.as_deref(),
            Some(want.as_str()),
            "Sec-WebSocket-Accept in {head:?}"
        );
        raw
    }

    /// For a stream whose upgrade request the caller wrote itself: read the
    /// `101` answer (asserting it) and keep whatever followed it.
    pub fn from_stream_after_handshake(stream: TcpStream, _addr: SocketAddr) -> RawWs {
        RawWs::read_upgrade(stream).0
    }

    /// Read a response head, assert `101`, return the socket and the head.
    fn read_upgrade(mut stream: TcpStream) -> (RawWs, String) {
        let mut buf = Vec::new();
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(i) = find_subslice(&buf, b"\r\n\r\n") {
                break i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no handshake response within {WAIT:?}: {:?}",
                String::from_utf8_lossy(&buf)
            );
            stream.set_read_timeout(Some(left)).ok();
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => panic!("EOF during handshake: {:?}", String::from_utf8_lossy(&buf)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(e) => panic!("handshake read: {e}"),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got {head:?}"
        );
        buf.drain(..end + 4);
        (RawWs { stream, buf }, head)
    }

    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(&encode_client_frame(opcode, payload))
    }

    /// Read one frame (no reassembly).
    pub fn read_frame(&mut self, timeout: Duration) -> Result<Frame, FrameEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrameEnd::Timeout);
            }
            self.stream.set_read_timeout(Some(left)).ok();
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(FrameEnd::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(e) => return Err(FrameEnd::Error(e.to_string())),
            }
        }
    }

    /// Read frames until a close frame, answering nothing. Returns the close
    /// (code, reason), or the way the stream ended otherwise, and how many
    /// data frames came before it.
    pub fn read_until_close(
        &mut self,
        timeout: Duration,
    ) -> (Result<(u16, String), FrameEnd>, usize) {
        let deadline = Instant::now() + timeout;
        let mut data = 0usize;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OP_CLOSE => {
                    let code = if f.payload.len() >= 2 {
                        u16::from_be_bytes([f.payload[0], f.payload[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[])).into_owned();
                    return (Ok((code, reason)), data);
                }
                Ok(f) => {
                    if f.opcode == OP_TEXT || f.opcode == OP_BINARY || f.opcode == OP_CONT {
                        data += 1;
                    }
                }
                Err(end) => return (Err(end), data),
            }
        }
    }
}

/// Parse one unmasked (or masked) frame at the start of `buf`.
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let len7 = (buf[1] & 0x7f) as usize;
    let mut pos = 2;
    let len = match len7 {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            pos = 4;
            u16::from_be_bytes([buf[2], buf[3]]) as usize
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            pos = 10;
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize
        }
        n => n,
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return None;
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < pos + len {
        return None;
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        pos + len,
    ))
}
