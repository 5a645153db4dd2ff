//! Scenario `login`: L concurrent login loops (bcrypt on the server's
//! worker threads) while one WebSocket client measures its round trips.
//! Measures logins/s against the bcrypt bound (workers / one hash, timed
//! here), and whether the event loop stays responsive during the storm: a
//! chat message's round trip (stored first) and a ping's (the loop alone),
//! quiet and during the storm.
//!
//! Called by `main` for `loadgen login` (scripts/bench.sh runs it against
//! each target; the floor has no login, so it gets round trips only).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::Ctx;
use crate::hist::{ms, Hist};
use crate::http::{http_once, repeat, Request, Tally};
use crate::sys::runtime;
use crate::ws_client::{
    self, field_str, mono_ns, ws_path, WsConn, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};
use crate::{Outcome, CONTENT};

/// One bcrypt hash at `cost`, timed on this thread: the median of `n`.
fn hash_ms(cost: u32, n: usize) -> Result<f64, String> {
    let mut t = Vec::new();
    for _ in 0..n.max(1) {
        let t0 = Instant::now();
        bcrypt::hash("benchmark-password", cost).map_err(|e| format!("bcrypt: {e}"))?;
        t.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let logins: usize = o.num("logins", 8, 4).max(1);
    let secs: f64 = o.num("secs", 10.0, 3.0);
    let quiet: f64 = o.num("quiet-secs", 3.0, 1.0);
    let interval: u64 = o.num("rtt-interval-ms", 10, 10);
    let cost: u32 = o.num("cost", 10, 10);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers: usize = o.num("workers", cores.max(2), cores.max(2));
    let hash = hash_ms(cost, o.num("hash-samples", 5, 3))?;
    let bound = workers as f64 * 1000.0 / hash;
    eprintln!("  one bcrypt hash at cost {cost}: {hash:.1} ms; bound {workers} x 1/hash = {bound:.1} logins/s");

    let rt = runtime();
    let user = format!("storm{}", ctx.tag);
    let body = format!("{{\"username\":\"{user}\",\"password_hash\":\"benchmark-password\"}}");
    let (status, _) = rt.block_on(http_once(ctx.addr, "POST", "/register", Some(&body)))?;
    let supported = status == 200 || status == 409;
    if !supported {
        eprintln!("  POST /register answered {status}: no logins on this target, round trips only");
    }

    // The round-trip client runs on its own thread and runtime.
    let phase = Arc::new(AtomicU8::new(0));
    let (addr, room, ph) = (ctx.addr, format!("rtt-{}", ctx.tag), phase.clone());
    let rtt = std::thread::spawn(move || runtime().block_on(rtt_client(addr, room, ph, interval)));
    std::thread::sleep(Duration::from_secs_f64(quiet));
    phase.store(1, Ordering::SeqCst);
    let t0 = Instant::now();
    let tally = if supported {
        let login = Request {
            method: "POST",
            path: "/login",
            body: Some(body),
            limit: Duration::from_secs(30),
        };
        repeat(&rt, ctx.addr, login, logins, secs)
    } else {
        std::thread::sleep(Duration::from_secs_f64(secs));
        Tally::default()
    };
    let Tally {
        ok,
        failed: bad,
        hist: login_hist,
    } = tally;
    let elapsed = t0.elapsed().as_secs_f64();
    phase.store(2, Ordering::SeqCst);
    let RttHists {
        quiet: quiet_h,
        storm: storm_h,
        ping_quiet,
        ping_storm,
        lost,
    } = rtt
        .join()
        .map_err(|_| "round-trip client panicked".to_string())??;

    let mut out = Outcome::default();
    out.set("hash_ms", (hash * 100.0).round() / 100.0);
    if supported {
        out.set("workers", workers as f64);
        out.set("bound_per_s", (bound * 10.0).round() / 10.0);
        let rate = ok as f64 / elapsed;
        out.set("logins_per_s", (rate * 10.0).round() / 10.0);
        out.set("of_bound", (rate / bound * 1000.0).round() / 1000.0);
        out.set("login_p50_ms", ms(login_hist.quantile(0.5)));
        out.set("login_p99_ms", ms(login_hist.quantile(0.99)));
        out.set("logins_ok", ok as f64);
        out.set("logins_failed", bad as f64);
        eprintln!(
            "  {ok} logins in {elapsed:.1}s ({bad} failed): {rate:.1}/s = {:.2} of the bound",
            rate / bound
        );
    } else {
        out.notes.push("no login endpoint: round trips only".into());
    }
    out.set("rtt_p50_quiet_ms", ms(quiet_h.quantile(0.5)));
    out.set("rtt_p99_quiet_ms", ms(quiet_h.quantile(0.99)));
    out.set("rtt_p50_storm_ms", ms(storm_h.quantile(0.5)));
    out.set("rtt_p99_storm_ms", ms(storm_h.quantile(0.99)));
    out.set("rtt_max_storm_ms", ms(storm_h.max));
    out.set("rtt_samples", storm_h.n as f64);
    out.set("rtt_lost", lost as f64);
    out.set("ping_p99_quiet_ms", ms(ping_quiet.quantile(0.99)));
    out.set("ping_p50_storm_ms", ms(ping_storm.quantile(0.5)));
    out.set("ping_p99_storm_ms", ms(ping_storm.quantile(0.99)));
    out.set("ping_max_storm_ms", ms(ping_storm.max));
    eprintln!(
        "  WebSocket message round trip p99: {:.2} ms quiet, {:.2} ms during the storm ({} samples, {lost} lost); ping p99 {:.2} ms during the storm",
        ms(quiet_h.quantile(0.99)),
        ms(storm_h.quantile(0.99)),
        storm_h.n,
        ms(ping_storm.quantile(0.99)),
    );
    if lost > 0 || (supported && ok == 0) {
        out.ok = false;
        out.notes
            .push(format!("{lost} round trips lost, {ok} logins"));
    }
    Ok(out)
}

/// Send a message every `interval` ms and wait for its echo: round-trip
/// times while `phase` is 0 (quiet) and 1 (storm); stops at 2.
async fn rtt_client(
    addr: SocketAddr,
    room: String,
    phase: Arc<AtomicU8>,
    interval: u64,
) -> Result<RttHists, String> {
    let mut c = tokio::time::timeout(
        Duration::from_secs(10),
        ws_client::connect(addr, &ws_path(&room, "rtt")),
    )
    .await
    .map_err(|_| "round-trip client: no upgrade in 10 s".to_string())?
    .map_err(|e| format!("round-trip client: {e}"))?;
    let mut h = RttHists::default();
    let mut n = 0u64;
    // Bounded: the coordinator sets phase 2 after quiet + storm seconds.
    while phase.load(Ordering::SeqCst) < 2 {
        n += 1;
        let p = phase.load(Ordering::SeqCst);
        let marker = format!("R{n} ");
        let t = mono_ns();
        c.send_text(&format!("{{\"content\":\"{marker}{t}\"}}"))
            .await
            .map_err(|e| format!("round-trip client: {e}"))?;
        let echoed = |op: u8, payload: &[u8]| {
            op == OP_TEXT
                && field_str(payload, CONTENT).is_some_and(|x| x.starts_with(marker.as_bytes()))
        };
        match await_reply(&mut c, t, echoed).await? {
            Some(us) if p == 0 => h.quiet.record(us),
            Some(us) => h.storm.record(us),
            None => h.lost += 1,
        }
        // A ping: the event loop answers it without the store, so this is
        // the loop's own responsiveness.
        let t = mono_ns();
        c.send(OP_PING, marker.as_bytes())
            .await
            .map_err(|e| format!("round-trip client: {e}"))?;
        let pong = |op: u8, payload: &[u8]| op == OP_PONG && payload == marker.as_bytes();
        match await_reply(&mut c, t, pong).await? {
            Some(us) if p == 0 => h.ping_quiet.record(us),
            Some(us) => h.ping_storm.record(us),
            None => h.lost += 1,
        }
        tokio::time::sleep(Duration::from_millis(interval)).await;
    }
    let _ = c.close(1000).await;
    Ok(h)
}

/// Wait up to 2 s for the frame `is_reply` picks out; its round trip in
/// microseconds since `sent_ns`, or `None` when none came in time.
async fn await_reply(
    c: &mut WsConn,
    sent_ns: u64,
    is_reply: impl Fn(u8, &[u8]) -> bool,
) -> Result<Option<u64>, String> {
    let wait = async {
        loop {
            while let Some(f) = c.next_frame()? {
                if is_reply(f.opcode, f.payload) {
                    return Ok::<bool, std::io::Error>(true);
                }
                if f.opcode == OP_CLOSE {
                    return Ok(false);
                }
            }
            if c.fill().await? == 0 {
                return Ok(false);
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), wait).await {
        Ok(Ok(true)) => Ok(Some((mono_ns() - sent_ns) / 1000)),
        Ok(Ok(false)) | Ok(Err(_)) => Err("round-trip client: connection closed".into()),
        Err(_) => Ok(None),
    }
}

/// Round trips measured by the login scenario's WebSocket client: its own
/// chat message back from the server (stored first: a durable commit), and a
/// ping's pong (the event loop alone), before and during the storm.
#[derive(Default)]
struct RttHists {
    quiet: Hist,
    storm: Hist,
    ping_quiet: Hist,
    ping_storm: Hist,
    lost: u64,
}
