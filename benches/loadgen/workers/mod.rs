//! Worker processes: copies of this binary started with `--worker`, each
//! holding a share of the sockets on one single-threaded tokio runtime.
//!
//! This file is their protocol, one JSON object a line: the coordinator
//! sends a `Spec` (what to open) and then `WorkerCmd`s on a worker's stdin;
//! the worker answers `WorkerMsg`s on its stdout. A join storm's spec makes
//! the worker answer `Armed` and wait for `Go` before it opens anything, and
//! report its joins as `Storm` instead of `Ready`. `pool.rs` is the
//! coordinator's side (the scenarios start a `Pool`), `process.rs` the
//! worker's (its connections and their counts), `storm.rs` the worker's side
//! of a join storm. `spread` lays sockets out over rooms and processes.

pub mod pool;
pub mod process;
pub mod storm;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a worker opens and how its connections behave.
#[derive(Serialize, Deserialize, Clone)]
pub struct Spec {
    pub addr: SocketAddr,
    /// Every instance of one chat, when there are several: a group's
    /// members connect to `addrs[Group::inst]`, senders name their instance
    /// in what they send, and deliveries are timed separately for senders on
    /// the receiver's instance and on another one. Empty: `addr` alone.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    pub has_seq: bool,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    pub connect_timeout_s: f64,
    /// Free read buffers once joined (idle sockets).
    pub idle: bool,
    /// Length of message contents sent.
    pub size: usize,
    pub groups: Vec<Group>,
    /// A join storm: wait for `Go`, then open everything at once.
    #[serde(default)]
    pub storm: Option<StormSpec>,
}

/// How the sockets of a join storm join and what their history must be.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct StormSpec {
    /// Messages seeded into each room (`seed {i}: ...`, i from 0); a member
    /// must receive the newest `Group::history` of them, in seq order.
    pub seeded: u32,
    /// Upgrades refused (any answer but 101) tried again, per socket.
    pub retries: u32,
    /// Pause before trying a refused upgrade again.
    pub retry_ms: u64,
    /// Sockets not joined this long after `Go` count as failed.
    pub limit_s: f64,
}

/// `count` members of `room`, named `{prefix}{first + i}`.
#[derive(Serialize, Deserialize, Clone)]
pub struct Group {
    pub room: String,
    pub prefix: String,
    pub first: u64,
    pub count: u32,
    /// History frames each member waits for before it counts as joined.
    pub history: u32,
    /// Members that send: (index in the group, global sender index).
    pub senders: Vec<(u32, u64)>,
    /// The instance (index in `Spec::addrs`) its members connect to.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inst: u8,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// One step of a ramp: message `m` (0..total_msgs) is sent by global sender
/// `m % total_senders` at `start_ns + m * period_ns`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct StepPlan {
    pub step: u32,
    pub start_ns: u64,
    pub period_ns: u64,
    pub total_msgs: u64,
    pub total_senders: u64,
    /// Deliveries this worker's members should receive.
    pub expected: u64,
    pub deadline_ns: u64,
    /// Deliveries within this many microseconds of their send time are
    /// counted as on time (0: none are).
    #[serde(default)]
    pub within_us: u64,
}

/// What the coordinator asks of a worker once its connections are open.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum WorkerCmd {
    Step(StepPlan),
    /// Wait for the rest of a step's deliveries, then report it again.
    Drain {
        step: u32,
        expected: u64,
        deadline_ns: u64,
    },
    Status,
    /// Start a join storm at `start_ns` (`CLOCK_MONOTONIC`).
    Go {
        start_ns: u64,
    },
    Quit,
}

/// A worker's deliveries of one step: counts and its latency histogram.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct StepReport {
    pub step: u32,
    pub sent: u64,
    pub received: u64,
    pub last_ns: u64,
    pub max_us: u64,
    pub hist: Vec<(u32, u64)>,
    /// Deliveries within the step's `within_us`.
    #[serde(default)]
    pub on_time: u64,
    /// With several instances: the latencies of deliveries whose sender is
    /// on the receiver's instance, and on another one (sparse, and max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitHists>,
}

/// A step's deliveries split by where the sender was.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct SplitHists {
    pub same: Vec<(u32, u64)>,
    pub same_max_us: u64,
    pub cross: Vec<(u32, u64)>,
    pub cross_max_us: u64,
}

/// A worker's connections so far: open, closed (by close code), and what
/// went wrong on them.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct StatusReport {
    pub alive: u64,
    pub closed: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub error_frames: u64,
    pub order_violations: u64,
    pub history_frames: u64,
    pub send_errors: u64,
    /// Text frames received after the history (live traffic).
    #[serde(default)]
    pub live_frames: u64,
}

/// A worker's share of a join storm. A socket has joined once it is
/// upgraded and its history has arrived; it is refused when the upgrade is
/// answered with anything but 101, failed otherwise (connect error, close,
/// timeout, short history).
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct StormReport {
    /// Answered 101 (joined, or failed after the upgrade).
    pub upgraded: u64,
    pub joined: u64,
    /// Joined with exactly the history it should get, in seq order.
    pub history_exact: u64,
    /// Refused sockets by the status of the last answer.
    pub refused: BTreeMap<String, u64>,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Upgrades tried again after a refusal (`--retries`).
    pub retries: u64,
    /// The last 101 and the last completed history (0: none).
    pub last_upgrade_ns: u64,
    pub last_joined_ns: u64,
    /// Per joined socket, from the start of its connect to its history
    /// complete (µs), sparse histogram and its maximum.
    pub hist: Vec<(u32, u64)>,
    pub max_us: u64,
}

/// A worker's answers: `Ready` once every connection joined (or failed),
/// or for a storm `Armed` and then `Storm`; then one `Step` or `Status`
/// per command.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    Ready {
        ok: u64,
        failed: u64,
        secs: f64,
        error: Option<String>,
    },
    Step(StepReport),
    Status(StatusReport),
    Armed,
    Storm(StormReport),
}

impl WorkerMsg {
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerMsg::Ready { .. } => "ready",
            WorkerMsg::Step(_) => "step",
            WorkerMsg::Status(_) => "status",
            WorkerMsg::Armed => "armed",
            WorkerMsg::Storm(_) => "storm",
        }
    }
}

/// The workers' status reports, added up.
pub fn merge_status(msgs: &[WorkerMsg]) -> StatusReport {
    let mut t = StatusReport::default();
    for m in msgs {
        if let WorkerMsg::Status(s) = m {
            t.alive += s.alive;
            t.closed += s.closed;
            t.error_frames += s.error_frames;
            t.order_violations += s.order_violations;
            t.history_frames += s.history_frames;
            t.send_errors += s.send_errors;
            t.live_frames += s.live_frames;
            for (k, v) in &s.close_codes {
                *t.close_codes.entry(k.clone()).or_insert(0) += v;
            }
        }
    }
    t
}

pub fn status_json(s: &StatusReport) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// Split `n` items into `parts` contiguous ranges.
pub fn ranges(n: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    (0..parts)
        .map(|i| (n * i / parts, n * (i + 1) / parts))
        .collect()
}

/// Worker processes for `conns` sockets that each hold (a process's
/// descriptors and its share of the reading stay comfortable at 9,000).
pub fn procs_for(conns: u64) -> usize {
    (conns.div_ceil(9000) as usize).max(2)
}

/// `conns` sockets over the rooms `names` (socket i in room i mod R), cut
/// into `procs` contiguous shares: one list of groups per worker process,
/// members named `{prefix}{n}` with n unique over all of them.
pub fn spread(
    conns: u64,
    names: &[String],
    procs: usize,
    prefix: &str,
    history: u32,
) -> Vec<Vec<Group>> {
    let rooms = names.len().max(1) as u64;
    let mut named = 0u64;
    let mut groups = Vec::new();
    for (lo, hi) in ranges(conns, procs) {
        let mut mine = Vec::new();
        for (r, name) in names.iter().enumerate() {
            let r = r as u64;
            // sockets i in lo..hi with i % rooms == r
            let first = lo + (r + rooms - lo % rooms) % rooms;
            if first >= hi {
                continue;
            }
            let count = (hi - first).div_ceil(rooms) as u32;
            mine.push(Group {
                room: name.clone(),
                prefix: prefix.into(),
                first: named,
                count,
                history,
                senders: Vec::new(),
                inst: 0,
            });
            named += count as u64;
        }
        groups.push(mine);
    }
    groups
}
