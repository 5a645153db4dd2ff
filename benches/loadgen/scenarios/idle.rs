//! Scenario `idle`: N WebSockets over R rooms that already hold history.
//! Measures the server's RSS per held connection above its baseline (the
//! target is 2 KiB or less), how many stay open through the hold, and the
//! connect rate (upgrade plus history).
//!
//! Called by `main` for `loadgen idle` (scripts/bench.sh runs it against
//! each target). The connections are spread over worker processes, more of
//! them for large N (one per 9,000 sockets, at least two).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::Ctx;
use crate::seed::seed_rooms;
use crate::sys::rss_kib;
use crate::workers::pool::{Joined, Pool};
use crate::workers::{merge_status, procs_for, spread, status_json, WorkerCmd};
use crate::Outcome;

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let conns: u64 = o.num("conns", 19_000, 2_000);
    let rooms: u64 = o.num("rooms", 100, 20).max(1);
    let seed: u32 = o.num("seed", 10, 5);
    let hold: f64 = o.num("hold", 10.0, 2.0);
    let procs: usize = o.num("procs", procs_for(conns), procs_for(conns));
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("idle-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, seed)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = ctx.pid.and_then(rss_kib);

    let groups = spread(conns, &names, procs, "i", ctx.history(seed));
    let (mut pool, joined) = Pool::start(ctx, &groups, true, 64)?;
    let Joined {
        ok,
        failed,
        first_error,
        secs: connect_secs,
    } = joined;
    eprintln!(
        "  {ok} connections joined ({failed} failed) in {connect_secs:.2}s: {:.0}/s",
        ok as f64 / connect_secs
    );
    // Hold, sampling the server's memory once a second.
    let mut rss_samples = Vec::new();
    let hold_end = Instant::now() + Duration::from_secs_f64(hold);
    loop {
        std::thread::sleep(
            Duration::from_millis(1000).min(hold_end.saturating_duration_since(Instant::now())),
        );
        if let Some(r) = ctx.pid.and_then(rss_kib) {
            rss_samples.push(r);
        }
        if Instant::now() >= hold_end {
            break;
        }
    }
    pool.send_all(&WorkerCmd::Status)?;
    let status = merge_status(&pool.collect("status", Duration::from_secs(30))?);
    drop(pool);

    let mut out = Outcome::default();
    out.set("conns_requested", conns as f64);
    out.set("conns_ok", ok as f64);
    out.set("conns_failed", failed as f64);
    out.set("connect_secs", connect_secs);
    out.set("connect_rate", ok as f64 / connect_secs);
    out.set("conns_held", status.alive as f64);
    out.set("history_frames", status.history_frames as f64);
    out.set_rss_growth(
        rss0,
        rss_samples.last().copied(),
        ok,
        ["rss_base_mib", "rss_held_mib", "rss_per_conn_bytes"],
        "connection",
    );
    if failed > 0 || status.alive < ok {
        out.ok = false;
        out.notes.push(format!(
            "{failed} connections failed, {} of {ok} still open after the hold; first error: {}",
            status.alive,
            first_error.unwrap_or_default()
        ));
    }
    out.details = json!({ "rss_samples_kib": rss_samples, "status": status_json(&status) });
    Ok(out)
}
