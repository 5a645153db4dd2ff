//! Scenario `many`: 1,000 rooms of 10 members, everyone chatting (or the
//! first `--senders-per-room` of each room). The same ramp of send rates as
//! fan-out (`ramp.rs`) over many small rooms: the figure is the highest total
//! rate (and its deliveries/s) with p99 under the limit and nothing lost; or,
//! with `--once`, one step at a fixed total rate.
//!
//! Called by `main` for `loadgen many` (scripts/bench.sh runs it against
//! each target). This file lays out the rooms over the worker processes;
//! the ramp does the rest.

use crate::cli::Ctx;
use crate::ramp::{run_ramp, Ramp};
use crate::seed::seed_rooms;
use crate::workers::{ranges, Group};
use crate::Outcome;

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let rooms: u64 = o.num("rooms", 1000, 100).max(1);
    let size: u64 = o.num("room-size", 10, 10).max(1);
    let per_room: u64 = o.num("senders-per-room", size, size).clamp(1, size);
    let seed: u32 = o.num("seed", 2, 2);
    let procs: usize = o.num("procs", 2, 2).max(1);
    let ramp = Ramp::from_opts(o, (250.0, 500.0), (8, 3));
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("many-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, seed)?;
    let history = ctx.history(seed);
    // With several instances (`--addr A,B`) each room's members, and its
    // senders among them, are split evenly over the instances in contiguous
    // runs: every room spans every instance.
    let insts = ctx.addrs.len();
    let mut groups: Vec<Vec<Group>> = vec![Vec::new(); procs];
    for (r, name) in names.iter().enumerate() {
        let r = r as u64;
        for (i, (lo, hi)) in ranges(size, insts).into_iter().enumerate() {
            if hi <= lo {
                continue;
            }
            groups[(r % procs as u64) as usize].push(Group {
                room: name.clone(),
                prefix: "m".into(),
                first: r * size + lo,
                count: (hi - lo) as u32,
                history,
                // Sender order interleaves rooms, so consecutive messages go
                // to different rooms.
                senders: (lo..hi.min(per_room))
                    .map(|k| ((k - lo) as u32, k * rooms + r))
                    .collect(),
                inst: i as u8,
            });
        }
    }
    let mut out = run_ramp(ctx, groups, rooms * per_room, &ramp)?;
    out.set("rooms", rooms as f64);
    out.set("room_size", size as f64);
    out.set("senders_per_room", per_room as f64);
    Ok(out)
}
