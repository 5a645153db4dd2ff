//! Scenario `joinstorm`: N WebSockets over R rooms, each room seeded
//! beforehand with H messages, all connecting at once (or at most C connects
//! in flight, `--in-flight`) from several client processes, while a chatter
//! in another, already active room sends at a fixed rate and times each
//! message's round trip. Reports the sockets joined, refused (by status) and
//! failed otherwise, those whose history was exactly the newest
//! min(H, history limit) seeded messages in seq order, the time for the whole
//! storm to be joined and joins/s, each socket's join latency, the chatter's
//! round trips during the storm, and the server's RSS before and after with
//! the bytes per socket. No retries unless `--retries` (a refusal is a
//! refusal); every socket is bounded by `--connect-timeout` and the storm by
//! `--storm-secs`.
//!
//! Called by `main` for `loadgen joinstorm` (scripts/bench.sh runs it against
//! each target and store). The workers' side is `workers/storm.rs`, the
//! chatter `chatter.rs`.

use std::time::Duration;

use serde_json::json;

use crate::chatter::{ChatLog, Chatter};
use crate::cli::Ctx;
use crate::hist::{ms, Hist};
use crate::seed::seed_rooms;
use crate::sys::rss_kib;
use crate::workers::pool::Pool;
use crate::workers::{
    merge_status, procs_for, spread, status_json, StormReport, StormSpec, WorkerCmd, WorkerMsg,
};
use crate::ws_client::mono_ns;
use crate::Outcome;

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let conns: u64 = o.num("conns", 5000, 1000).max(1);
    let rooms: u64 = o.num("rooms", 50, 20).clamp(1, conns);
    let seed: u32 = o.num("seed", 20, 20);
    let in_flight: u64 = o.num("in-flight", 200, 200);
    let procs: usize = o.num("procs", procs_for(conns), procs_for(conns));
    let chat_rate: f64 = o.num("chat-rate", 20.0, 20.0);
    let quiet: f64 = o.num("quiet-secs", 2.0, 1.0);
    let hold: f64 = o.num("hold", 2.0, 1.0);
    let connect_timeout: f64 = o.num("connect-timeout", 60.0, 30.0);
    let storm = StormSpec {
        seeded: seed,
        retries: o.num("retries", 0, 0),
        retry_ms: o.num("retry-ms", 200, 200),
        limit_s: o.num("storm-secs", 120.0, 60.0),
    };
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("storm-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, seed)?;
    let history = ctx.history(seed);

    // The chatter's room is active before the storm: it has chatted for
    // `quiet` seconds (its round trips then are the quiet figure).
    let chatter = if chat_rate > 0.0 {
        let room = format!("storm-{}-chat", ctx.tag);
        Some(Chatter::start(ctx.addr, room, chat_rate)?)
    } else {
        None
    };
    std::thread::sleep(Duration::from_secs_f64(quiet));
    let rss0 = ctx.pid.and_then(rss_kib);

    let groups = spread(conns, &names, procs, "s", history);
    let per_proc = if in_flight == 0 {
        conns as usize
    } else {
        in_flight.div_ceil(groups.len() as u64) as usize
    };
    let mut pool = Pool::arm(ctx, &groups, storm, per_proc, connect_timeout)?;
    let go_ns = mono_ns() + 100_000_000;
    pool.send_all(&WorkerCmd::Go { start_ns: go_ns })?;
    eprintln!(
        "  storm: {conns} sockets over {rooms} rooms ({history} history frames each), {} in flight, {} processes",
        if in_flight == 0 {
            "all".to_string()
        } else {
            in_flight.to_string()
        },
        groups.len()
    );
    let wait = Duration::from_secs_f64(storm.limit_s + 30.0);
    let reps = pool.collect("storm", wait)?;
    let resolved_ns = mono_ns();
    let rep = merge_storm(&reps);
    let refused: u64 = rep.refused.values().sum();
    // The storm lasts until its last socket joined; when some failed, until
    // every socket was done.
    let end_ns = if rep.failed == 0 && rep.last_joined_ns > 0 {
        rep.last_joined_ns
    } else {
        resolved_ns
    };
    let storm_secs = end_ns.saturating_sub(go_ns) as f64 / 1e9;
    // Not a number (left out of the figures) when nothing was upgraded.
    let upgrades_secs = if rep.last_upgrade_ns > 0 {
        rep.last_upgrade_ns.saturating_sub(go_ns) as f64 / 1e9
    } else {
        f64::NAN
    };
    let join_hist = Hist::from_sparse(&rep.hist, rep.max_us);

    std::thread::sleep(Duration::from_secs_f64(hold));
    let rss1 = ctx.pid.and_then(rss_kib);
    pool.send_all(&WorkerCmd::Status)?;
    let status = merge_status(&pool.collect("status", Duration::from_secs(30))?);
    let log = match chatter {
        Some(c) => c.finish()?,
        None => ChatLog::default(),
    };
    drop(pool);
    let (quiet_h, _) = log.window(0, go_ns.saturating_sub(1));
    let (storm_h, storm_lost) = log.window(go_ns, end_ns);
    let chat_lost = log.lost();

    eprintln!(
        "  {} upgraded, {} joined ({} with the exact history), {refused} refused {:?}, {} failed; \
         storm over in {storm_secs:.2}s ({:.0} joins/s)",
        rep.upgraded,
        rep.joined,
        rep.history_exact,
        rep.refused,
        rep.failed,
        rep.joined as f64 / storm_secs.max(1e-3)
    );
    if join_hist.n > 0 {
        eprintln!(
            "  join latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms; last upgrade at {upgrades_secs:.2}s",
            ms(join_hist.quantile(0.5)),
            ms(join_hist.quantile(0.99)),
            ms(join_hist.max),
        );
    }
    if chat_rate > 0.0 && storm_h.n == 0 {
        eprintln!(
            "  chatter: no round trip fell within the storm ({storm_lost} lost); quiet p99 {:.2} ms",
            ms(quiet_h.quantile(0.99))
        );
    } else if chat_rate > 0.0 {
        eprintln!(
            "  chatter round trip during the storm p50 {:.2} ms p99 {:.2} ms max {:.2} ms \
             ({} samples, {storm_lost} lost); quiet p99 {:.2} ms",
            ms(storm_h.quantile(0.5)),
            ms(storm_h.quantile(0.99)),
            ms(storm_h.max),
            storm_h.n,
            ms(quiet_h.quantile(0.99)),
        );
    }
    if let Some(e) = &rep.first_error {
        eprintln!("  first error: {e}");
    }

    let mut out = Outcome::default();
    out.set("conns_requested", conns as f64);
    out.set("upgraded", rep.upgraded as f64);
    out.set("joined", rep.joined as f64);
    out.set("history_exact", rep.history_exact as f64);
    out.set("refused", refused as f64);
    for (code, n) in &rep.refused {
        out.set(&format!("refused_{code}"), *n as f64);
    }
    out.set("failed", rep.failed as f64);
    out.set("retries", rep.retries as f64);
    out.set("storm_secs", storm_secs);
    out.set("upgrades_secs", upgrades_secs);
    out.set(
        "joins_per_s",
        (rep.joined as f64 / storm_secs.max(1e-3)).round(),
    );
    if join_hist.n > 0 {
        out.set("join_p50_ms", ms(join_hist.quantile(0.5)));
        out.set("join_p99_ms", ms(join_hist.quantile(0.99)));
        out.set("join_max_ms", ms(join_hist.max));
    }
    if storm_h.n > 0 {
        out.set("chat_p50_storm_ms", ms(storm_h.quantile(0.5)));
        out.set("chat_p99_storm_ms", ms(storm_h.quantile(0.99)));
        out.set("chat_max_storm_ms", ms(storm_h.max));
    }
    if quiet_h.n > 0 {
        out.set("chat_p99_quiet_ms", ms(quiet_h.quantile(0.99)));
    }
    if chat_rate > 0.0 {
        out.set("chat_samples_storm", storm_h.n as f64);
        out.set("chat_lost", chat_lost as f64);
    }
    out.set("held", status.alive as f64);
    out.set("frames_after_history", status.live_frames as f64);
    out.set_rss_growth(
        rss0,
        rss1,
        rep.joined,
        ["rss_before_mib", "rss_after_mib", "rss_per_socket_bytes"],
        "socket",
    );
    if rep.joined < conns || rep.history_exact < rep.joined {
        out.ok = false;
        out.notes.push(format!(
            "{} of {conns} joined ({} with the exact history), {refused} refused {:?}, {} failed; first error: {}",
            rep.joined,
            rep.history_exact,
            rep.refused,
            rep.failed,
            rep.first_error.clone().unwrap_or_default()
        ));
    }
    if status.alive < rep.joined || status.live_frames > 0 {
        out.ok = false;
        out.notes.push(format!(
            "{} of {} joined sockets still open after the hold, {} frames after the history (none expected)",
            status.alive, rep.joined, status.live_frames
        ));
    }
    if chat_lost > 0 {
        out.ok = false;
        out.notes
            .push(format!("the chatter lost {chat_lost} messages (no echo)"));
    }
    if chat_rate > 0.0 && storm_h.n < 5 {
        out.notes.push(format!(
            "only {} chatter round trips fell within the storm ({storm_secs:.2}s at {chat_rate} msg/s)",
            storm_h.n
        ));
    }
    out.details = json!({
        "refused_by_status": rep.refused,
        "first_error": rep.first_error,
        "rooms": rooms,
        "seed": seed,
        "history": history,
        "in_flight": in_flight,
        "procs": groups.len(),
        "chat_rate": chat_rate,
        "status": status_json(&status),
    });
    Ok(out)
}

/// The workers' storm reports, added up.
fn merge_storm(msgs: &[WorkerMsg]) -> StormReport {
    let mut t = StormReport::default();
    let mut h = Hist::default();
    for m in msgs {
        if let WorkerMsg::Storm(r) = m {
            t.upgraded += r.upgraded;
            t.joined += r.joined;
            t.history_exact += r.history_exact;
            t.failed += r.failed;
            t.retries += r.retries;
            for (k, v) in &r.refused {
                *t.refused.entry(k.clone()).or_insert(0) += v;
            }
            if t.first_error.is_none() {
                t.first_error = r.first_error.clone();
            }
            t.last_upgrade_ns = t.last_upgrade_ns.max(r.last_upgrade_ns);
            t.last_joined_ns = t.last_joined_ns.max(r.last_joined_ns);
            h.merge(&Hist::from_sparse(&r.hist, r.max_us));
        }
    }
    t.hist = h.sparse();
    t.max_us = h.max;
    t
}
