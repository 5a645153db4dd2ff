//! A Redis of a test's own, for the tests of several server processes that
//! share one chat through a broker: a real `redis-server` (never a mock) on a
//! free 127.0.0.1 port, with its log in a temporary directory, that a test
//! can kill (a crash) and start again on the same port. Also a tiny RESP
//! client to look at it from the test (`PUBSUB NUMSUB`, `PUBLISH`, ...).
//!
//! Used by `tests/redis_harness.rs` and the broker's end-to-end tests.
//! `scripts/test.sh` installs Debian's `redis-server`; without it the tests
//! fail (a missing service must fail the run, never skip it).
//!
//! Every wait is bounded: a Redis that does not answer is a panic with its
//! log, never a stuck test.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::service::{free_port, ServiceProcess, StartError};

/// How long a started Redis may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the port may stay taken when starting again on it.
const PORT_RETRY: Duration = Duration::from_secs(10);

/// How long one command of [`Redis::cmd`] may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);

/// The log file in the instance's directory (appended to by every start).
const LOG_FILE: &str = "redis.log";

/// `redis-server` on `path` (a `PATH`-style list), or a sentence saying how
/// to get it.
pub fn find_redis_server(path: Option<OsString>) -> Result<PathBuf, String> {
    let dirs = path.unwrap_or_default();
    for dir in std::env::split_paths(&dirs) {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(
        "redis-server is not installed (not on PATH): the broker tests need a real \
         Redis; scripts/test.sh installs Debian's redis-server (apt-get install \
         redis-server)"
            .to_string(),
    )
}

/// The `redis-server` binary on this machine's `PATH`; panics when there is
/// none.
pub fn redis_server_binary() -> PathBuf {
    find_redis_server(std::env::var_os("PATH")).unwrap_or_else(|e| panic!("{e}"))
}

/// A `redis-server` child process with its own directory, killed on drop.
pub struct Redis {
    bin: PathBuf,
    dir: tempfile::TempDir,
    proc: ServiceProcess,
}

impl Redis {
    /// Start on a free 127.0.0.1 port and wait until it answers PING (and
    /// is the process started, by the pid it reports).
    /// Panics (with Redis's log) when it cannot.
    pub fn start() -> Redis {
        let bin = redis_server_binary();
        let dir = tempfile::Builder::new()
            .prefix("chatconnect-redis-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        // A free port can be taken between choosing it and Redis binding
        // it: choose another then.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match spawn_redis(&bin, dir.path(), port) {
                Ok(child) => {
                    let proc = ServiceProcess::running("redis-server", port, child);
                    return Redis { bin, dir, proc };
                }
                Err(StartError::PortTaken(log)) => last = log,
                Err(StartError::Other(e)) => panic!("{e}"),
            }
        }
        panic!("redis-server found every port it tried taken:\n{last}");
    }

    /// Start again after [`kill`](Self::kill): same port, empty data (it
    /// keeps nothing on disk). Panics when the port stays taken or it does
    /// not answer.
    pub fn start_again(&mut self) {
        let (bin, dir) = (&self.bin, self.dir.path());
        self.proc
            .start(PORT_RETRY, |port| spawn_redis(bin, dir, port));
    }

    /// The address for `BROKER_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// The directory Redis runs in (its log is there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of Redis's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.path().join(LOG_FILE))
    }

    /// Run one command and return Redis's raw reply (`+PONG\r\n`,
    /// `*2\r\n$1\r\nx\r\n:0\r\n`, ...). Panics (with the log) when Redis
    /// does not answer.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args).unwrap_or_else(|e| {
            panic!(
                "redis {args:?}: {e}\n--- redis log ---\n{}",
                self.log_tail()
            )
        })
    }

    /// Like [`cmd`](Self::cmd), with the failure as a value.
    pub fn try_cmd(&self, args: &[&str]) -> Result<String, String> {
        command(self.addr(), args, CMD_TIMEOUT)
    }
}

/// `kill`, `is_running`, `pid`, `port` and `addr` are the process's
/// (`service::ServiceProcess`).
impl std::ops::Deref for Redis {
    type Target = ServiceProcess;
    fn deref(&self) -> &ServiceProcess {
        &self.proc
    }
}

impl std::ops::DerefMut for Redis {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.proc
    }
}

/// True if something at `addr` answers an inline `PING` with `+PONG`.
pub fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A command as Redis reads it: an array of bulk strings.
pub fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Send one command to the Redis at `addr` on a new connection and return
/// its raw reply.
pub fn command(addr: SocketAddr, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("set timeouts: {e}"))?;
    s.write_all(&encode_command(args))
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut r = BufReader::new(s);
    let mut raw = Vec::new();
    read_reply(&mut r, &mut raw).map_err(|e| {
        format!(
            "reading the reply from {addr}: {e} (read so far: {:?})",
            String::from_utf8_lossy(&raw)
        )
    })?;
    String::from_utf8(raw).map_err(|e| format!("reply is not UTF-8: {e}"))
}

/// Read one complete RESP2 reply into `raw` (nested arrays included).
pub fn read_reply(r: &mut impl BufRead, raw: &mut Vec<u8>) -> Result<(), String> {
    let start = raw.len();
    let n = r.read_until(b'\n', raw).map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    let line = &raw[start..];
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err("incomplete line".into());
    }
    let kind = line[0];
    let rest = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let count = || {
        rest.parse::<i64>()
            .map_err(|_| format!("bad length {rest:?}"))
    };
    match kind {
        b'+' | b'-' | b':' => Ok(()),
        b'$' => {
            let len = count()?;
            if len < 0 {
                return Ok(());
            }
            let mut body = vec![0u8; len as usize + 2];
            r.read_exact(&mut body)
                .map_err(|e| format!("read a bulk string: {e}"))?;
            raw.extend_from_slice(&body);
            Ok(())
        }
        b'*' => {
            for _ in 0..count()?.max(0) {
                read_reply(r, raw)?;
            }
            Ok(())
        }
        other => Err(format!("unknown reply type {:?}", other as char)),
    }
}

/// A connection subscribed to channels, to see what a server publishes.
pub struct Subscriber {
    reader: BufReader<TcpStream>,
}

impl Subscriber {
    /// Subscribe to `channels` and read their confirmations.
    pub fn new(addr: SocketAddr, channels: &[&str]) -> Subscriber {
        let mut s = TcpStream::connect_timeout(&addr, CMD_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to redis at {addr}: {e}"));
        s.set_read_timeout(Some(CMD_TIMEOUT)).expect("set timeout");
        let mut args = vec!["SUBSCRIBE"];
        args.extend_from_slice(channels);
        s.write_all(&encode_command(&args))
            .unwrap_or_else(|e| panic!("SUBSCRIBE: {e}"));
        let mut sub = Subscriber {
            reader: BufReader::new(s),
        };
        for _ in channels {
            let reply = sub
                .next_raw(CMD_TIMEOUT)
                .unwrap_or_else(|e| panic!("SUBSCRIBE {channels:?}: {e}"));
            assert!(reply.contains("subscribe"), "SUBSCRIBE answered {reply:?}");
        }
        sub
    }

    /// The next raw push (`*3\r\n$7\r\nmessage\r\n...`) within `timeout`.
    pub fn next_raw(&mut self, timeout: Duration) -> Result<String, String> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("set timeout: {e}"))?;
        let mut raw = Vec::new();
        read_reply(&mut self.reader, &mut raw)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }
}

/// The last 4,000 bytes of a log file.
fn tail_of(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = text.len().saturating_sub(4000);
    String::from_utf8_lossy(&text[from..]).into_owned()
}

/// Spawn `redis-server` on 127.0.0.1:`port` in `dir` and wait (bounded)
/// until it answers PING as the process started.
fn spawn_redis(bin: &Path, dir: &Path, port: u16) -> Result<Child, StartError> {
    let log_path = dir.join(LOG_FILE);
    let offset = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| StartError::Other(format!("open {}: {e}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| StartError::Other(format!("dup the log file: {e}")))?;
    let port_s = port.to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(bin)
        .args(["--port", &port_s, "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| StartError::Other(format!("spawn {}: {e}", bin.display())))?;

    // Until it answers, watch for an early exit (the port taken).
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read(&log_path).unwrap_or_default();
            let text = text.get(offset as usize..).unwrap_or(&text);
            let text = String::from_utf8_lossy(text).into_owned();
            return Err(if text.contains("Address already in use") {
                StartError::PortTaken(text)
            } else {
                StartError::Other(format!(
                    "redis-server on port {} exited with {status} at start\n--- redis log ---\n{text}",
                    port
                ))
            });
        }
        // The one answering must be ours, not a program that had the
        // port first (ours then exits with the port taken, above).
        if ping(addr) && answering_pid(addr) == Some(child.id()) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Other(format!(
                "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}\n--- redis log ---\n{}",
                port,
                tail_of(&log_path)
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The process id the Redis at `addr` reports (`INFO server`).
fn answering_pid(addr: SocketAddr) -> Option<u32> {
    let info = command(addr, &["INFO", "server"], CMD_TIMEOUT).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
}
