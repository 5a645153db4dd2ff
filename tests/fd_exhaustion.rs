//! When the process runs out of file descriptors, `accept` fails with EMFILE
//! and the listener stays readable. The server must neither spin nor stop
//! serving: it pauses accepting and resumes once a connection closes.
//!
//! The server is started under `ulimit -n 64` so the limit is reached with a
//! handful of client sockets. A second test checks that a low soft limit
//! under a higher hard one is raised at start.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `GET path` on a connection of its own; the whole answer, head and body.
fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `chatconnect_accept_pauses_total` from `/metrics`.
fn accept_pauses(addr: SocketAddr) -> f64 {
    let answer = get(addr, "/metrics").expect("GET /metrics");
    common::metric_value(&answer, "chatconnect_accept_pauses_total")
        .unwrap_or_else(|| panic!("no accept pause counter in {answer}"))
}

/// A server started by `sh` after `limits` (ulimit commands), with its
/// stderr lines on a channel and the address it listens on.
struct Server {
    child: std::process::Child,
    addr: SocketAddr,
    /// Kept so that the thread draining stderr goes on (the server would
    /// block on a full pipe otherwise).
    _log: std::sync::mpsc::Receiver<String>,
    /// The lines logged up to and including the listening line.
    start_log: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    /// A failed test must not leave its server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_under(limits: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_chatserver");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{limits} && exec '{bin}'"))
        .current_dir(dir.path())
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", dir.path().join("data"))
        .env("BCRYPT_COST", "4")
        .env("WORKERS", "2")
        .env("RUST_LOG", "info")
        .env_remove("MONGO_URI")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chatserver");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut start_log = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server did not say where it listens");
        if let Some(addr) = common::parse_listening(&line) {
            start_log.push(line);
            break addr;
        }
        start_log.push(line);
    };
    Server {
        child,
        addr,
        _log: rx,
        start_log,
        _dir: dir,
    }
}

/// SIGTERM, then the exit status must be success within 10 s.
fn stop(mut server: Server) {
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn emfile_does_not_spin_and_serving_resumes() {
    // Soft and hard limit both 64: nothing to raise.
    let server = start_under("ulimit -n 64");
    let (pid, addr) = (server.child.id(), server.addr);

    // Hold far more connections than the server has descriptors for.
    let mut held = Vec::new();
    for _ in 0..120 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    assert!(held.len() >= 80, "only {} connections opened", held.len());
    std::thread::sleep(Duration::from_millis(500));

    // With accepting paused, an idle server uses next to no CPU.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "server burned {used} CPU ticks in 2 s while out of descriptors (a spinning accept loop)"
    );
    // Free the descriptors: the server serves again without a restart.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        if let Some(a) = get(addr, "/healthz").filter(|a| a.starts_with("HTTP/1.1 200")) {
            break a;
        }
        assert!(Instant::now() < deadline, "server never served again");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer.contains(r#"{"status":"ok"}"#), "{answer}");
    assert!(accept_pauses(addr) >= 1.0, "no accept pause was counted");

    stop(server);
}

/// A soft limit of 128 under a hard one of 600: the server raises its own
/// soft limit (as the Go original's runtime did), so 300 connections are
/// all served instead of the accept loop pausing after about a hundred.
#[test]
fn soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let server = start_under("ulimit -S -n 128 && ulimit -H -n 600");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id()))
        .expect("read /proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], &["600", "600"], "{line}");

    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect_timeout(&server.addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.windows(15).any(|w| w == br#"{"status":"ok"}"#) {
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("connection {i} got no answer: {e}"));
            assert!(n > 0, "connection {i} closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        held.push(s);
    }
    assert!(
        server
            .start_log
            .iter()
            .any(|l| l.contains("open file limit raised from 128 to 600")),
        "{:?}",
        server.start_log
    );
    assert_eq!(accept_pauses(server.addr), 0.0, "accepting paused");
    drop(held);
    stop(server);
}
