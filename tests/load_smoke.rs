//! Load smoke test against the real binary: it holds 2,000 idle WebSockets
//! (joined to rooms that have history, as real clients do) in little
//! memory, and a room of 500 members receives all of 1,000 messages, in
//! order. Memory and counts only, no timing assertions; every wait is
//! bounded, so a regression fails with a message instead of hanging.
//!
//! The full-size figures and their ratios to the yardsticks come from
//! `scripts/bench.sh`; this test keeps the two properties from regressing
//! between benchmark runs.

mod common;
#[path = "../benches/common/ws_client.rs"]
mod ws_client;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::contract::ensure_fd_limit;
use common::{parse_listening, server_command};
use tokio::sync::Semaphore;
use ws_client::{field_seq, field_str, ws_path, WsConn, OP_CLOSE, OP_TEXT};

/// Handshakes in flight at once: well under the server's accept backlog,
/// so no SYN is dropped and retried a second later.
const CONCURRENCY: usize = 64;

/// Longest any phase of a test may take.
const PHASE: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("chatconnect-load-smoke-")
            .tempdir()
            .expect("create a temp dir");
        // In the temp dir: no stray .env file.
        let mut cmd = server_command(dir.path());
        cmd.env("WS_RATE_LIMIT", "0")
            .env("BCRYPT_COST", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start chatserver");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let keep = log.clone();
        // Keep draining stderr for the server's whole life.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(addr) = parse_listening(&line) {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
                let mut l = keep.lock().unwrap_or_else(|p| p.into_inner());
                if l.len() >= 100 {
                    l.pop_front();
                }
                l.push_back(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chatserver printed no 'listening on' line within 30 s; log:\n{}",
                    log_text(&log)
                );
            }
        };
        Server {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read the server's /proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc status")
    }

    fn log(&self) -> String {
        log_text(&self.log)
    }

    /// A gauge or counter from `GET /metrics`.
    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.addr).expect("connect for /metrics");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .expect("send GET /metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read /metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_text(log: &Arc<Mutex<VecDeque<String>>>) -> String {
    let l = log.lock().unwrap_or_else(|p| p.into_inner());
    l.iter().cloned().collect::<Vec<_>>().join("\n")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Read frames until `want` text frames have arrived; their payloads.
async fn read_texts(c: &mut WsConn, want: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        while got.len() < want {
            let Some(f) = c.next_frame().map_err(|e| e.to_string())? else {
                break;
            };
            match f.opcode {
                OP_TEXT => got.push(f.payload.to_vec()),
                OP_CLOSE => return Err(format!("closed by the server ({:?})", c.close_code)),
                _ => {}
            }
        }
        if got.len() < want && c.fill().await.map_err(|e| e.to_string())? == 0 {
            return Err(format!(
                "connection closed after {} of {want} frames",
                got.len()
            ));
        }
    }
    Ok(got)
}

/// Fill `room` with `n` messages `seed {i}` and wait for their echoes.
async fn seed(addr: SocketAddr, room: &str, n: usize) {
    let mut c = ws_client::connect(addr, &ws_path(room, "seeder"))
        .await
        .expect("seeder connects");
    for i in 0..n {
        c.send_text(&format!("{{\"content\":\"seed {i}\"}}"))
            .await
            .expect("seed message sent");
    }
    read_texts(&mut c, n).await.expect("seed echoes");
    let _ = c.close(1000).await;
}

/// Open `n` WebSockets spread over `rooms`, each joined: it has received
/// the room's `history` messages, checked to be `seed 0..` with seqs 1.. .
async fn open_joined(
    addr: SocketAddr,
    rooms: &[String],
    n: usize,
    history: usize,
) -> Result<Vec<WsConn>, String> {
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let room = rooms[i % rooms.len()].clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let path = ws_path(&room, &format!("member{i}"));
            let mut c = ws_client::connect(addr, &path)
                .await
                .map_err(|e| format!("member {i}: {e}"))?;
            let frames = read_texts(&mut c, history)
                .await
                .map_err(|e| format!("member {i} history: {e}"))?;
            for (k, f) in frames.iter().enumerate() {
                let seq = field_seq(f);
                let content = field_str(f, "content");
                if seq != Some(k as i64 + 1) || content != Some(format!("seed {k}").as_bytes()) {
                    return Err(format!(
                        "member {i}: history frame {k} is {}",
                        String::from_utf8_lossy(f)
                    ));
                }
            }
            c.release();
            Ok::<WsConn, String>(c)
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        conns.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(conns)
}

#[test]
fn idle_websockets_cost_at_most_4_kib_each() {
    const CONNS: usize = 2000;
    const ROOMS: usize = 4;
    const HISTORY: usize = 5;
    ensure_fd_limit(8192);
    let server = Server::start();
    let addr = server.addr;
    let rt = runtime();
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("idle-smoke-{r}")).collect();
    let (before, conns) = rt.block_on(async {
        for r in &rooms {
            tokio::time::timeout(PHASE, seed(addr, r, HISTORY))
                .await
                .expect("seeding finishes in time");
        }
        // Let the seeding settle before the baseline.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = server.rss_kib();
        let conns = tokio::time::timeout(PHASE, open_joined(addr, &rooms, CONNS, HISTORY))
            .await
            .unwrap_or_else(|_| panic!("{CONNS} WebSockets not joined within {PHASE:?}"))
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        (before, conns)
    });
    let after = server.rss_kib();
    assert_eq!(conns.len(), CONNS);
    assert_eq!(
        server.metric("chatconnect_ws_connections"),
        CONNS as u64,
        "the server should hold every WebSocket"
    );
    let per_conn = after.saturating_sub(before) as f64 * 1024.0 / CONNS as f64;
    eprintln!(
        "server RSS {before} KiB -> {after} KiB with {CONNS} idle WebSockets: {per_conn:.0} bytes each"
    );
    assert!(
        per_conn <= 4096.0,
        "an idle WebSocket costs {per_conn:.0} bytes of server RSS (limit 4096): {before} KiB -> {after} KiB"
    );
    drop(conns);
}

#[test]
fn a_room_of_500_gets_all_1000_messages_in_order() {
    const MEMBERS: usize = 500;
    const MESSAGES: usize = 1000;
    const HISTORY: usize = 3;
    ensure_fd_limit(8192);
    let server = Server::start();
    let addr = server.addr;
    let rt = runtime();
    let room = "fanout-smoke".to_string();
    let result: Result<(), String> = rt.block_on(async {
        tokio::time::timeout(PHASE, seed(addr, &room, HISTORY))
            .await
            .map_err(|_| "seeding timed out".to_string())?;
        let members = tokio::time::timeout(
            PHASE,
            open_joined(addr, std::slice::from_ref(&room), MEMBERS, HISTORY),
        )
        .await
        .map_err(|_| format!("{MEMBERS} members not joined within {PHASE:?}"))??;

        // Every member reads the live messages and checks them as they come.
        let mut readers = Vec::with_capacity(MEMBERS);
        for (i, mut c) in members.into_iter().enumerate() {
            readers.push(tokio::spawn(async move {
                let frames = read_texts(&mut c, MESSAGES)
                    .await
                    .map_err(|e| format!("member {i}: {e}"))?;
                let mut last = HISTORY as i64;
                for (k, f) in frames.iter().enumerate() {
                    let seq = field_seq(f).ok_or(format!("member {i}: frame without seq"))?;
                    if seq <= last {
                        return Err(format!("member {i}: seq {seq} after {last}"));
                    }
                    last = seq;
                    let want = format!("m{k}");
                    if field_str(f, "content") != Some(want.as_bytes()) {
                        return Err(format!(
                            "member {i}: message {k} is {} (expected content {want})",
                            String::from_utf8_lossy(f)
                        ));
                    }
                }
                Ok::<(), String>(())
            }));
        }

        // One sender, not a member of the 500, sends as fast as it can and
        // reads its own echoes so its socket never backs up.
        let mut sender = ws_client::connect(addr, &ws_path(&room, "sender"))
            .await
            .map_err(|e| format!("sender: {e}"))?;
        read_texts(&mut sender, HISTORY).await?;
        let send_all = async {
            for k in 0..MESSAGES {
                sender
                    .send_text(&format!("{{\"content\":\"m{k}\"}}"))
                    .await
                    .map_err(|e| format!("sender: {e}"))?;
            }
            read_texts(&mut sender, MESSAGES).await.map(|_| ())
        };
        tokio::time::timeout(PHASE, send_all)
            .await
            .map_err(|_| "the sender's echoes did not all arrive in time".to_string())??;

        let deadline = tokio::time::Instant::now() + PHASE;
        for r in readers {
            tokio::time::timeout_at(deadline, r)
                .await
                .map_err(|_| "members did not receive every message in time".to_string())?
                .map_err(|e| e.to_string())??;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\nserver log:\n{}", server.log());
    }
    assert_eq!(
        server.metric("chatconnect_messages_stored_total"),
        (HISTORY + MESSAGES) as u64
    );
    // Members that read are never what the memory budget closes, even
    // with the backlog of a fan-out pass to 500 of them.
    assert_eq!(server.metric("chatconnect_client_memory_closes_total"), 0);
    assert_eq!(server.metric("chatconnect_slow_consumer_closes_total"), 0);
}
