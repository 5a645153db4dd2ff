//! The rate ramp that the fan-out and many-rooms scenarios share: members
//! join over the worker processes, then steps of a fixed send rate run one
//! after another (each step's deliveries counted and timed by the members),
//! and the verdict (`benches/common/verdict.rs`) names the highest rate
//! sustained with p99 under the limit and nothing lost. With `--once` there
//! is no ramp: one step at `--rate` for `--step-secs`, reported whether it
//! passed or not (everything delivered?, the fraction within `--deadline-ms`,
//! its latencies).
//!
//! `scenarios/fanout.rs` and `scenarios/many.rs` lay out their rooms and
//! senders as worker groups and call `run_ramp`; everything after that is
//! here.
//!
//! With several instances of one chat (`--addr A,B`), each step also takes
//! the broker path's figures (`cluster.rs`), and after the ramp one more
//! step, the *hop step*, runs at the single instance's sustained rate
//! (`--single FILE`, or `--hop-rate`): what a cross-instance hop adds is
//! read there. It does not count in the verdict.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::cli::{die, Ctx, Opts};
use crate::cluster::{ClusterStep, Probe};
use crate::hist::{ms, Hist};
use crate::sys::cpu_secs;
use crate::verdict;
use crate::workers::pool::Pool;
use crate::workers::{merge_status, Group, StepPlan, WorkerCmd, WorkerMsg};
use crate::ws_client::mono_ns;
use crate::Outcome;

/// The ramp's settings, from the command line.
pub struct Ramp {
    rate: f64,
    factor: f64,
    steps: u32,
    refine: u32,
    /// Extra trials that settle the two rates the verdict turns on.
    retrials: u32,
    step_secs: f64,
    drain_secs: f64,
    p99_limit_ms: f64,
    /// A delivery within this latency is on time.
    deadline_ms: f64,
    all_steps: bool,
    /// One step at `rate`, no ramp.
    once: bool,
}

impl Ramp {
    /// The flags of a ramp; `rate` and `steps` are the scenario's (full, quick)
    /// defaults.
    pub fn from_opts(o: &Opts, rate: (f64, f64), steps: (u32, u32)) -> Ramp {
        let p99_limit_ms = o.num("p99-limit-ms", 100.0, 100.0);
        Ramp {
            rate: o.num("rate", rate.0, rate.1),
            factor: o.num("factor", 2.0, 2.0),
            steps: o.num("steps", steps.0, steps.1).max(1),
            refine: o.num("refine", 3, 0),
            retrials: o.num("retrials", 6, 2),
            step_secs: o.num("step-secs", 4.0, 2.0),
            drain_secs: o.num("drain-secs", 5.0, 3.0),
            p99_limit_ms,
            deadline_ms: o.num("deadline-ms", p99_limit_ms, p99_limit_ms),
            all_steps: o.has("--all-steps"),
            once: o.has("--once"),
        }
    }
}

/// The steps as the verdict sees them.
fn trials(steps: &[StepSummary]) -> Vec<verdict::Trial> {
    steps
        .iter()
        .map(|s| verdict::Trial {
            rate: s.rate_msgs,
            ok: s.ok,
            broken: s.broken(),
        })
        .collect()
}

/// The highest rate that passed by majority, reported by its slowest passing
/// trial.
fn sustained(steps: &[StepSummary]) -> Option<StepSummary> {
    let rate = verdict::sustained_rate(&trials(steps))?;
    steps
        .iter()
        .filter(|s| s.ok && s.rate_msgs == rate)
        .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .cloned()
}

/// One step's figures, as they go into the result's details.
#[derive(Clone, Serialize)]
struct StepSummary {
    step: u32,
    rate_msgs: f64,
    msgs: u64,
    sent: u64,
    expected: u64,
    received: u64,
    /// Deliveries within the deadline, and their fraction of those expected.
    on_time: u64,
    within_deadline: f64,
    deliveries_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    order_violations: u64,
    error_frames: u64,
    closed: u64,
    server_cpu_pct: Option<f64>,
    loadgen_cpu_pct: f64,
    ok: bool,
    /// Several instances: the broker path's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterStep>,
}

impl StepSummary {
    /// The step's line on stderr, and one more when something was lost.
    fn log(&self) {
        let s = self;
        eprintln!(
            "  step {}: {:.1} msg/s: {}/{} delivered, {:.0} deliveries/s, \
             p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms, {:.1}% on time, \
             server CPU {}%, loadgen CPU {}%{}",
            s.step,
            s.rate_msgs,
            s.received,
            s.expected,
            s.deliveries_per_s,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.within_deadline * 100.0,
            s.server_cpu_pct
                .map(|c| c.to_string())
                .unwrap_or("?".into()),
            s.loadgen_cpu_pct,
            if s.ok { "" } else { "  [not sustained]" }
        );
        if let Some(c) = &s.cluster {
            let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or("?".into());
            eprintln!(
                "    same instance p50 {} ms p99 {} ms ({}), cross p50 {} ms p99 {} ms ({}); \
                 servers CPU {}%, {} batches published, {} received, {} msg/batch, \
                 pub {} µs/batch, sub {} µs/received; Redis {} B in, {} B out per msg, \
                 {} µs/batch, CPU {}%",
                c.same_p50_ms,
                c.same_p99_ms,
                c.same_n,
                c.cross_p50_ms,
                c.cross_p99_ms,
                c.cross_n,
                o(c.servers_cpu_pct),
                o(c.published),
                o(c.received),
                o(c.msgs_per_batch),
                o(c.pub_us_per_batch),
                o(c.sub_us_per_received),
                o(c.redis_in_per_msg),
                o(c.redis_out_per_msg),
                o(c.redis_us_per_batch),
                o(c.redis_cpu_pct),
            );
        }
        if s.closed > 0 || s.order_violations > 0 || s.error_frames > 0 || s.sent < s.msgs {
            eprintln!(
                "    {} connections closed by the server so far, {} out of order, {} error frames, {}/{} sent",
                s.closed, s.order_violations, s.error_frames, s.sent, s.msgs
            );
        }
    }

    /// Lost deliveries or connections (not every message was sent,
    /// deliveries differ from those expected, or a connection closed): what
    /// it leaves queued would spoil the next step, so it is a failure
    /// outright and never tried again.
    fn broken(&self) -> bool {
        self.sent != self.msgs || self.received != self.expected || self.closed > 0
    }
}

/// The worker processes of a ramp and the steps run so far.
struct RampRun<'a> {
    ctx: &'a Ctx,
    pool: Pool,
    groups: &'a [Vec<Group>],
    total_senders: u64,
    ramp: &'a Ramp,
    steps: Vec<StepSummary>,
    /// Deliveries each worker expects in the last step.
    last: Vec<u64>,
    seen_violations: u64,
    seen_errors: u64,
    /// Another step can start clean: no step broke, or the last broken one
    /// closed no connection and its deliveries all arrived in the end.
    usable: bool,
    /// Several instances: what is read of them and Redis around each step.
    probe: Option<Probe>,
    /// The number of the next step.
    next_step: u32,
}

impl RampRun<'_> {
    /// One phase of the ramp: up to `count` steps, each at the rate `next`
    /// picks from the steps so far, until it picks none or a broken step
    /// leaves the members unusable. A broken step is drained (or not) before
    /// `next` is asked again.
    fn phase(
        &mut self,
        count: u32,
        next: impl Fn(&[StepSummary]) -> Option<f64>,
    ) -> Result<(), String> {
        for _ in 0..count {
            if !self.usable {
                break;
            }
            let Some(rate) = next(&self.steps) else {
                break;
            };
            let s = self.step(rate)?;
            if s.broken() {
                self.usable = s.closed == 0 && self.drain()?;
            }
        }
        Ok(())
    }

    /// Deliveries each worker's members should receive in a step of `msgs`
    /// messages: what each global sender sends, added up per room, times
    /// the worker's members in that room.
    fn expected(&self, msgs: u64) -> Vec<u64> {
        let total_senders = self.total_senders;
        let count = |g: u64| {
            if g < msgs {
                (msgs - g).div_ceil(total_senders)
            } else {
                0
            }
        };
        let mut per_room: HashMap<&str, u64> = HashMap::new();
        for g in self.groups.iter().flatten() {
            let n: u64 = g.senders.iter().map(|(_, s)| count(*s)).sum();
            *per_room.entry(g.room.as_str()).or_insert(0) += n;
        }
        self.groups
            .iter()
            .map(|gs| {
                gs.iter()
                    .map(|g| per_room.get(g.room.as_str()).copied().unwrap_or(0) * g.count as u64)
                    .sum()
            })
            .collect()
    }

    /// Run one step at `rate` messages per second in total; its summary.
    fn step(&mut self, rate: f64) -> Result<StepSummary, String> {
        let ramp = self.ramp;
        // Numbered over every step run, the warm-up and hop steps too (a
        // worker counts deliveries by this number).
        let k = self.next_step;
        self.next_step += 1;
        let total_senders = self.total_senders;
        let msgs = ((rate * ramp.step_secs).round() as u64).max(1);
        let period_ns = (1e9 / rate) as u64;
        self.last = self.expected(msgs);
        let start_ns = mono_ns() + 300_000_000;
        let deadline_ns = start_ns + ((ramp.step_secs + ramp.drain_secs) * 1e9) as u64;
        let pid = self.ctx.pid;
        let snap0 = self.probe.as_ref().map(Probe::snapshot);
        let cpu0 = (pid.and_then(cpu_secs), self.pool.cpu_secs(), Instant::now());
        for (w, &exp) in self.last.iter().enumerate() {
            let plan = StepPlan {
                step: k,
                start_ns,
                period_ns,
                total_msgs: msgs,
                total_senders,
                expected: exp,
                deadline_ns,
                within_us: (ramp.deadline_ms * 1000.0) as u64,
            };
            self.pool.send(w, &WorkerCmd::Step(plan))?;
        }
        let expected: u64 = self.last.iter().sum();
        let wait = Duration::from_secs_f64(0.3 + ramp.step_secs + ramp.drain_secs + 20.0);
        let reps = self.pool.collect("step", wait)?;
        let cpu1 = (pid.and_then(cpu_secs), self.pool.cpu_secs(), Instant::now());
        let snap1 = self.probe.as_ref().map(Probe::snapshot);
        self.pool.send_all(&WorkerCmd::Status)?;
        let status = merge_status(&self.pool.collect("status", Duration::from_secs(30))?);

        let mut hist = Hist::default();
        let (mut sent, mut received, mut on_time, mut last_ns) = (0, 0, 0, 0);
        for m in &reps {
            if let WorkerMsg::Step(r) = m {
                sent += r.sent;
                received += r.received;
                on_time += r.on_time;
                last_ns = last_ns.max(r.last_ns);
                hist.merge(&Hist::from_sparse(&r.hist, r.max_us));
            }
        }
        let span = (last_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-3);
        let wall = cpu1.2.duration_since(cpu0.2).as_secs_f64().max(1e-3);
        let mut s = StepSummary {
            step: k,
            rate_msgs: rate,
            msgs,
            sent,
            expected,
            received,
            on_time,
            within_deadline: on_time as f64 / expected.max(1) as f64,
            deliveries_per_s: (received as f64 / span).round(),
            p50_ms: ms(hist.quantile(0.5)),
            p99_ms: ms(hist.quantile(0.99)),
            p999_ms: ms(hist.quantile(0.999)),
            max_ms: ms(hist.max),
            order_violations: status.order_violations - self.seen_violations,
            error_frames: status.error_frames - self.seen_errors,
            closed: status.closed,
            server_cpu_pct: match (cpu0.0, cpu1.0) {
                (Some(a), Some(b)) => Some(((b - a) / wall * 100.0).round()),
                _ => None,
            },
            loadgen_cpu_pct: ((cpu1.1 - cpu0.1) / wall * 100.0).round(),
            ok: false,
            cluster: match (&snap0, &snap1) {
                (Some(a), Some(b)) => Some(ClusterStep::new(a, b, &reps, sent)),
                _ => None,
            },
        };
        self.seen_violations = status.order_violations;
        self.seen_errors = status.error_frames;
        s.ok = !s.broken()
            && s.order_violations == 0
            && s.error_frames == 0
            && s.p99_ms < ramp.p99_limit_ms;
        s.log();
        self.steps.push(s.clone());
        Ok(s)
    }

    /// Wait (at most 30 s) for the rest of the last step's deliveries;
    /// whether they all arrived, so that another step can start clean.
    fn drain(&mut self) -> Result<bool, String> {
        let Some(step) = self.steps.last().map(|s| s.step) else {
            return Ok(true);
        };
        let t0 = Instant::now();
        let deadline_ns = mono_ns() + 30_000_000_000;
        for (w, &expected) in self.last.clone().iter().enumerate() {
            self.pool.send(
                w,
                &WorkerCmd::Drain {
                    step,
                    expected,
                    deadline_ns,
                },
            )?;
        }
        let reps = self.pool.collect("step", Duration::from_secs(50))?;
        let received: u64 = reps
            .iter()
            .map(|m| match m {
                WorkerMsg::Step(r) => r.received,
                _ => 0,
            })
            .sum();
        let expected: u64 = self.last.iter().sum();
        eprintln!(
            "  step {step}: {received}/{expected} delivered after {:.1}s more",
            t0.elapsed().as_secs_f64()
        );
        Ok(received >= expected)
    }
}

/// Join every member (one worker process per entry of `groups`), run the
/// ramp, and report the sustained rate.
pub fn run_ramp(
    ctx: &Ctx,
    groups: Vec<Vec<Group>>,
    total_senders: u64,
    ramp: &Ramp,
) -> Result<Outcome, String> {
    let size: usize = ctx.opts.num("size", 64, 64);
    let conns: u64 = groups.iter().flatten().map(|g| g.count as u64).sum();
    let (pool, joined) = Pool::start(ctx, &groups, false, size)?;
    if joined.failed > 0 {
        return Err(format!(
            "{} of {conns} connections failed to join; first error: {}",
            joined.failed,
            joined.first_error.unwrap_or_default()
        ));
    }
    eprintln!("  {conns} members joined in {:.2}s", joined.secs);

    let mut run = RampRun {
        ctx,
        pool,
        groups: &groups,
        total_senders,
        ramp,
        steps: Vec::new(),
        last: Vec::new(),
        seen_violations: 0,
        seen_errors: 0,
        usable: true,
        probe: Probe::of(ctx),
        next_step: 0,
    };
    let single = single_result(ctx);
    // Several instances: the first writes of a room from each instance
    // stalled the first step for hundreds of ms in trials (on both
    // same-instance and cross-instance deliveries), which ended the ramp at
    // its first rate. One step at the first rate warms them up; it is
    // reported (`warmup_step`) but not part of the verdict.
    let warmup = if ctx.cluster() && !ramp.once {
        eprintln!("  warm-up step (not part of the verdict):");
        let w = run.step(ramp.rate)?;
        if w.broken() {
            run.usable = w.closed == 0 && run.drain()?;
        }
        run.steps.pop();
        Some(w)
    } else {
        None
    };
    if ramp.once {
        run.phase(1, |steps| steps.is_empty().then_some(ramp.rate))?;
        let steps = std::mem::take(&mut run.steps);
        drop(run); // ends the workers
        let step = steps.first().ok_or("the step did not run")?;
        let mut out = outcome_once(step, &steps, ramp, joined.secs);
        if ctx.cluster() {
            cluster_figures(&mut out, Some(step), Some(step), single.as_ref());
        }
        return Ok(out);
    }
    // Ramp up through every step, unless one loses messages or members
    // (what it leaves queued would spoil the next) or is far past the limit.
    run.phase(ramp.steps, |steps| match steps.last() {
        None => Some(ramp.rate),
        Some(s) if s.broken() => None,
        Some(s) if !ramp.all_steps && s.p99_ms > 5.0 * ramp.p99_limit_ms => None,
        Some(s) => Some(s.rate_msgs * ramp.factor),
    })?;
    // Refine between the highest sustained rate and the lowest rate above
    // it that was not; below the first step when even that one failed.
    run.phase(ramp.refine, |steps| refine_rate(steps, ramp.factor))?;
    // One 4 s step is decided by its few slowest passes, so a single lucky
    // or unlucky step would move the answer by a factor of two. The highest
    // sustained rate and the lowest failed rate above it get up to three
    // trials each; two alike decide.
    run.phase(ramp.retrials, |steps| verdict::next_trial(&trials(steps)))?;
    // Several instances: one more step at the single instance's sustained
    // rate, outside the verdict.
    let hop_rate = ctx.opts.vals.get("hop-rate").map(|r| {
        r.parse::<f64>()
            .unwrap_or_else(|_| die("--hop-rate must be a number"))
    });
    let hop_rate = hop_rate.or_else(|| single.as_ref()?["metrics"]["rate_msgs"].as_f64());
    let mut hop = None;
    if let (true, Some(rate), true) = (ctx.cluster(), hop_rate, run.usable) {
        if rate > 0.0 {
            eprintln!("  hop step at the single instance's sustained rate:");
            hop = Some(run.step(rate)?);
            run.steps.pop();
        }
    }
    let steps = std::mem::take(&mut run.steps);
    drop(run); // ends the workers
    let mut out = outcome(&steps, ramp, joined.secs);
    if ctx.cluster() {
        let best = sustained(&steps);
        cluster_figures(&mut out, best.as_ref(), hop.as_ref(), single.as_ref());
        if let Some(h) = &hop {
            out.details["hop_step"] = serde_json::to_value(h).unwrap_or(Value::Null);
        }
        if let Some(w) = &warmup {
            out.details["warmup_step"] = serde_json::to_value(w).unwrap_or(Value::Null);
            out.set("warmup_p99_ms", w.p99_ms);
        }
    }
    Ok(out)
}

/// The single instance's result of the same scenario (`--single FILE`).
fn single_result(ctx: &Ctx) -> Option<Value> {
    let path = ctx.opts.vals.get("single")?;
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| die(&format!("--single {path}: {e}")));
    Some(
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| die(&format!("--single {path}: not a JSON result: {e}"))),
    )
}

/// A cluster run's own figures: its deliveries/s against the single
/// instance's (`single`), what a hop adds at the single instance's rate
/// (the `hop` step; the sustained one when there is none), and the broker
/// path's cost in that step.
fn cluster_figures(
    out: &mut Outcome,
    best: Option<&StepSummary>,
    hop: Option<&StepSummary>,
    single: Option<&Value>,
) {
    let single_dps = single.and_then(|s| s["metrics"]["deliveries_per_s"].as_f64());
    if let Some(sd) = single_dps {
        out.set("single_deliveries_per_s", sd);
        if let Some(r) = single.and_then(|s| s["metrics"]["rate_msgs"].as_f64()) {
            out.set("single_rate_msgs", r);
        }
        if sd > 0.0 {
            let dps = out.metrics.get("deliveries_per_s").copied().unwrap_or(0.0);
            out.set("of_single", (dps / sd * 1000.0).round() / 1000.0);
        }
    }
    if let Some(c) = best.and_then(|b| b.cluster.as_ref()) {
        out.set("sustained_hop_p50_added_ms", c.hop_p50_added_ms);
        out.set("sustained_hop_p99_added_ms", c.hop_p99_added_ms);
    }
    let Some(h) = hop.or(best) else {
        out.notes
            .push("no step to read the cross-instance hop from".into());
        return;
    };
    out.set("hop_rate_msgs", h.rate_msgs);
    out.set("hop_deliveries_per_s", h.deliveries_per_s);
    out.set(
        "hop_delivered_fraction",
        h.received as f64 / h.expected.max(1) as f64,
    );
    out.set("hop_p99_ms", h.p99_ms);
    if hop.is_none() {
        out.notes.push(
            "no --single result or --hop-rate: the hop figures are the sustained step's".into(),
        );
    }
    if h.broken() {
        out.notes.push(format!(
            "the hop step at {} msg/s lost deliveries: {}/{} delivered, {} closed",
            h.rate_msgs, h.received, h.expected, h.closed
        ));
    }
    let Some(c) = &h.cluster else {
        return;
    };
    let o = |out: &mut Outcome, k: &str, v: Option<f64>| {
        if let Some(v) = v {
            out.set(k, v);
        }
    };
    out.set("hop_same_p50_ms", c.same_p50_ms);
    out.set("hop_same_p99_ms", c.same_p99_ms);
    out.set("hop_cross_p50_ms", c.cross_p50_ms);
    out.set("hop_cross_p99_ms", c.cross_p99_ms);
    out.set("hop_p50_added_ms", c.hop_p50_added_ms);
    out.set("hop_p99_added_ms", c.hop_p99_added_ms);
    o(out, "servers_cpu_pct", c.servers_cpu_pct);
    o(out, "batches_published", c.published);
    o(out, "batches_received", c.received);
    o(out, "msgs_per_batch", c.msgs_per_batch);
    o(out, "pub_us_per_batch", c.pub_us_per_batch);
    o(out, "sub_us_per_received", c.sub_us_per_received);
    o(out, "sub_us_per_arrival", c.sub_us_per_arrival);
    o(out, "redis_in_per_msg", c.redis_in_per_msg);
    o(out, "redis_out_per_msg", c.redis_out_per_msg);
    o(out, "redis_us_per_batch", c.redis_us_per_batch);
    o(out, "redis_cpu_pct", c.redis_cpu_pct);
    // The whole processes: both instances' CPU against the single
    // instance's at the same rate, per batch through the broker.
    let single_cpu = single.and_then(|s| {
        s["details"]["steps"]
            .as_array()?
            .iter()
            .filter(|st| st["rate_msgs"].as_f64() == Some(h.rate_msgs))
            .filter_map(|st| st["server_cpu_pct"].as_f64())
            .reduce(f64::min)
    });
    if let (Some(sc), Some(cc), Some(p), Some(r)) =
        (single_cpu, c.servers_cpu_pct, c.published, c.received)
    {
        out.set("single_cpu_pct", sc);
        if p + r > 0.0 {
            let extra_us = (cc - sc) / 100.0 * c.wall_s * 1e6 / (p + r);
            out.set("extra_cpu_us_per_batch", (extra_us * 10.0).round() / 10.0);
        }
    }
}

/// The next rate of the refining phase: the geometric middle of the highest
/// sustained rate and the lowest failed rate above it (none when they are
/// within 5 %), or a `factor` below the lowest rate when none passed.
fn refine_rate(steps: &[StepSummary], factor: f64) -> Option<f64> {
    let lo = steps
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.rate_msgs)
        .reduce(f64::max);
    match lo {
        None => {
            let lowest = steps.iter().map(|s| s.rate_msgs).reduce(f64::min);
            lowest.map(|l| l / factor)
        }
        Some(lo) => {
            let hi = steps
                .iter()
                .filter(|s| !s.ok && s.rate_msgs > lo)
                .map(|s| s.rate_msgs)
                .reduce(f64::min);
            match hi {
                Some(hi) if hi / lo > 1.05 => Some((lo * hi).sqrt()),
                _ => None,
            }
        }
    }
}

/// The figures of a `--once` run: its one step's, passed or not. It fails
/// when a message or a member was lost, not when p99 is over the limit.
fn outcome_once(s: &StepSummary, steps: &[StepSummary], ramp: &Ramp, joined_secs: f64) -> Outcome {
    let mut out = Outcome::default();
    out.set("members_joined_secs", joined_secs);
    out.set("rate_msgs", s.rate_msgs);
    out.set("deliveries_per_s", s.deliveries_per_s);
    out.set("expected", s.expected as f64);
    out.set("received", s.received as f64);
    out.set(
        "delivered_fraction",
        s.received as f64 / s.expected.max(1) as f64,
    );
    out.set("all_delivered", f64::from(u8::from(!s.broken())));
    out.set("deadline_ms", ramp.deadline_ms);
    out.set("within_deadline", s.within_deadline);
    out.set("p50_ms", s.p50_ms);
    out.set("p99_ms", s.p99_ms);
    out.set("p999_ms", s.p999_ms);
    out.set("max_ms", s.max_ms);
    out.set("order_violations", s.order_violations as f64);
    out.set("closed", s.closed as f64);
    out.ok = !s.broken() && s.order_violations == 0 && s.error_frames == 0;
    if !out.ok {
        out.notes.push(format!(
            "{}/{} delivered, {}/{} sent, {} closed, {} out of order, {} error frames",
            s.received, s.expected, s.sent, s.msgs, s.closed, s.order_violations, s.error_frames
        ));
    }
    if s.p99_ms >= ramp.p99_limit_ms {
        out.notes.push(format!(
            "p99 {} ms is over the {} ms limit at {} msg/s",
            s.p99_ms, ramp.p99_limit_ms, s.rate_msgs
        ));
    }
    out.details = json!({ "steps": steps, "once": true });
    out
}

/// The ramp's figures: the sustained step's, and the totals of every step.
fn outcome(steps: &[StepSummary], ramp: &Ramp, joined_secs: f64) -> Outcome {
    let best = sustained(steps);
    let mut out = Outcome::default();
    out.set("members_joined_secs", joined_secs);
    match &best {
        Some(b) => {
            out.set("deliveries_per_s", b.deliveries_per_s);
            out.set("rate_msgs", b.rate_msgs);
            out.set("p50_ms", b.p50_ms);
            out.set("p99_ms", b.p99_ms);
            out.set("p999_ms", b.p999_ms);
            out.set("expected", b.expected as f64);
            out.set("received", b.received as f64);
            if steps.iter().all(|s| s.ok) {
                out.notes.push(format!(
                    "every step passed: {:.0} deliveries/s is a lower bound (raise --steps)",
                    b.deliveries_per_s
                ));
            }
        }
        None => {
            out.set("deliveries_per_s", 0.0);
            out.notes.push(format!(
                "not sustained even at {} msg/s (p99 under {} ms with nothing lost)",
                ramp.rate, ramp.p99_limit_ms
            ));
        }
    }
    let total_exp: u64 = steps.iter().map(|s| s.expected).sum();
    let total_rcv: u64 = steps.iter().map(|s| s.received).sum();
    out.set("all_steps_expected", total_exp as f64);
    out.set("all_steps_received", total_rcv as f64);
    out.set(
        "order_violations",
        steps.iter().map(|s| s.order_violations).sum::<u64>() as f64,
    );
    out.details = json!({ "steps": steps });
    out
}
