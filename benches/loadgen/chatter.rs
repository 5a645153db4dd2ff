//! The chatter: one WebSocket client in a room of its own that sends at a
//! fixed rate (open loop: on schedule, whether or not the last echo came)
//! and times each message from its scheduled send to its echo. It keeps
//! every message's send time and round trip, so the caller can take the
//! latencies of any window (before a storm, during it).
//!
//! Started by the joinstorm scenario's coordinator before the storm, on a
//! thread and runtime of its own, so the storm's workers never delay it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::hist::Hist;
use crate::sys::runtime;
use crate::ws_client::{self, field_str, mono_ns, ws_path, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use crate::CONTENT;

/// Most messages one chatter sends (at 20 msg/s, over 13 hours).
const MAX_MSGS: usize = 1_000_000;
/// How long the chatter waits for its last echoes once told to stop.
const GRACE: Duration = Duration::from_secs(2);

/// Every message sent: its scheduled send time (ns, `CLOCK_MONOTONIC`) and
/// its round trip in µs, `None` when no echo came.
#[derive(Default)]
pub struct ChatLog {
    pub msgs: Vec<(u64, Option<u64>)>,
}

impl ChatLog {
    /// Round trips of the messages scheduled in `from_ns..=to_ns`, and how
    /// many of those got no echo.
    pub fn window(&self, from_ns: u64, to_ns: u64) -> (Hist, u64) {
        let mut h = Hist::default();
        let mut lost = 0;
        for &(t, rtt) in &self.msgs {
            if t < from_ns || t > to_ns {
                continue;
            }
            match rtt {
                Some(us) => h.record(us),
                None => lost += 1,
            }
        }
        (h, lost)
    }

    /// Messages that got no echo at all.
    pub fn lost(&self) -> u64 {
        self.msgs.iter().filter(|m| m.1.is_none()).count() as u64
    }
}

/// A running chatter.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<ChatLog, String>>,
}

impl Chatter {
    /// Connect to `room` and chat at `rate` messages/s; returns once the
    /// first echo came back (the room is active), within 15 s.
    pub fn start(addr: SocketAddr, room: String, rate: f64) -> Result<Chatter, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let st = stop.clone();
        let handle =
            std::thread::spawn(move || runtime().block_on(chat(addr, room, rate, st, ready_tx)));
        let chatter = Chatter { stop, handle };
        match ready_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(()) => Ok(chatter),
            Err(_) => match chatter.finish() {
                Err(e) => Err(e),
                Ok(_) => Err("chatter: no echo within 15 s".into()),
            },
        }
    }

    /// Stop sending, wait (2 s at most) for the last echoes; the log.
    pub fn finish(self) -> Result<ChatLog, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| "chatter panicked".to_string())?
    }
}

/// The index `k` of one of the chatter's messages (`C{k} {send ns}`).
fn chat_index(payload: &[u8]) -> Option<usize> {
    let c = field_str(payload, CONTENT)?.strip_prefix(b"C")?;
    let end = c.iter().position(|b| *b == b' ')?;
    std::str::from_utf8(&c[..end]).ok()?.parse().ok()
}

async fn chat(
    addr: SocketAddr,
    room: String,
    rate: f64,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<()>,
) -> Result<ChatLog, String> {
    let mut c = tokio::time::timeout(
        Duration::from_secs(10),
        ws_client::connect(addr, &ws_path(&room, "chatter")),
    )
    .await
    .map_err(|_| "chatter: no upgrade in 10 s".to_string())?
    .map_err(|e| format!("chatter: {e}"))?;
    let period = (1e9 / rate.max(0.1)) as u64;
    let t0 = mono_ns();
    let base = tokio::time::Instant::now();
    let at = |ns: u64| base + Duration::from_nanos(ns.saturating_sub(t0));
    let mut log = ChatLog::default();
    let mut announced = false;
    let mut grace_end: Option<u64> = None;
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    loop {
        let now = mono_ns();
        loop {
            let f = match c.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(format!("chatter: {e}")),
            };
            match f.opcode {
                OP_TEXT => {
                    if let Some(m) = chat_index(f.payload).and_then(|k| log.msgs.get_mut(k)) {
                        m.1.get_or_insert(now.saturating_sub(m.0) / 1000);
                    }
                }
                OP_PING => pongs.push(f.payload.to_vec()),
                OP_CLOSE => return Err(format!("chatter: closed ({:?})", c.close_code)),
                _ => {}
            }
        }
        for p in pongs.drain(..) {
            c.send(OP_PONG, &p)
                .await
                .map_err(|e| format!("chatter: {e}"))?;
        }
        if !announced && log.msgs.first().is_some_and(|m| m.1.is_some()) {
            announced = true;
            let _ = ready.send(());
        }
        if grace_end.is_none() && stop.load(Ordering::SeqCst) {
            grace_end = Some(now + GRACE.as_nanos() as u64);
        }
        if let Some(g) = grace_end {
            if now >= g || log.msgs.iter().all(|m| m.1.is_some()) {
                break;
            }
        }
        let sending = grace_end.is_none() && log.msgs.len() < MAX_MSGS;
        let next = t0 + log.msgs.len() as u64 * period;
        // Wake for the next send, and at least every 20 ms to see `stop`.
        let wake = if sending { next } else { u64::MAX }.min(now + 20_000_000);
        tokio::select! {
            r = c.fill() => match r {
                Ok(0) => return Err("chatter: connection closed".into()),
                Err(e) => return Err(format!("chatter: {e}")),
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(at(wake)) => {
                if sending && mono_ns() >= next {
                    let k = log.msgs.len();
                    c.send_text(&format!("{{\"content\":\"C{k} {next}\"}}"))
                        .await
                        .map_err(|e| format!("chatter: {e}"))?;
                    log.msgs.push((next, None));
                }
            }
        }
    }
    let _ = c.close(1000).await;
    Ok(log)
}
