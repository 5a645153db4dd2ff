//! Scenario `fanout`: S senders and M members in one room. A ramp of send
//! rates (`ramp.rs`), every delivery counted, latency from the send time
//! carried in the content; the figure is the highest rate (and its
//! deliveries/s) with p99 under the limit and nothing lost; or, with
//! `--once`, one step at a fixed rate (everything delivered?, its p99).
//!
//! Called by `main` for `loadgen fanout` (scripts/bench.sh runs it against
//! each target). This file lays out the room over the worker processes; the
//! ramp does the rest.

use crate::cli::Ctx;
use crate::ramp::{run_ramp, Ramp};
use crate::seed::seed_rooms;
use crate::workers::{ranges, Group};
use crate::Outcome;

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let members: u64 = o.num("members", 5000, 500);
    let senders: u64 = o.num("senders", 10, 5).clamp(1, members);
    let seed: u32 = o.num("seed", 3, 3);
    let procs: usize = o.num("procs", 2, 2).max(1);
    let ramp = Ramp::from_opts(o, (2.0, 20.0), (11, 3));
    let room = format!("fanout-{}", ctx.tag);
    seed_rooms(ctx.addr, std::slice::from_ref(&room), seed)?;
    let history = ctx.history(seed);
    // The senders get a process of their own. In a member process a send
    // timer fires late whenever that process is busy reading its share of
    // a pass (p99 15 to 23 ms behind schedule at 5,000 members, against 4 to
    // 5 ms alone), and latency counts from the scheduled send time. The
    // senders are members too: they receive every message. With several
    // instances (`--addr A,B`), the senders and each process's members are
    // split evenly over them, in contiguous runs.
    let insts = ctx.addrs.len();
    let group = |first: u64, count: u64, senders: Vec<(u32, u64)>, inst: usize| Group {
        room: room.clone(),
        prefix: "f".into(),
        first,
        count: count as u32,
        history,
        senders,
        inst: inst as u8,
    };
    // Members first..first + count over the instances, senders among them
    // (global sender index = member index) when `send`.
    let split = |first: u64, count: u64, send: bool| -> Vec<Group> {
        ranges(count, insts)
            .into_iter()
            .enumerate()
            .filter(|(_, (lo, hi))| hi > lo)
            .map(|(i, (lo, hi))| {
                let senders = if send {
                    (lo..hi).map(|s| ((s - lo) as u32, first + s)).collect()
                } else {
                    Vec::new()
                };
                group(first + lo, hi - lo, senders, i)
            })
            .collect()
    };
    let mut groups = vec![split(0, senders, true)];
    groups.extend(
        ranges(members - senders, procs)
            .into_iter()
            .filter(|(lo, hi)| hi > lo)
            .map(|(lo, hi)| split(senders + lo, hi - lo, false)),
    );
    let mut out = run_ramp(ctx, groups, senders, &ramp)?;
    out.set("members", members as f64);
    out.set("senders", senders as f64);
    Ok(out)
}
