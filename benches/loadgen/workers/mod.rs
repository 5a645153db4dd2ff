//! Worker processes: copies of this binary started with `--worker`, each
//! holding a share of the sockets on one single-threaded tokio runtime.
//!
//! This file is their protocol, one JSON object a line: the coordinator
//! sends a `Spec` (what to open) and then `WorkerCmd`s on a worker's stdin;
//! the worker answers `WorkerMsg`s on its stdout. `pool.rs` is the
//! coordinator's side (the scenarios start a `Pool`), `process.rs` the
//! worker's (its connections and their counts).

pub mod pool;
pub mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a worker opens and how its connections behave.
#[derive(Serialize, Deserialize, Clone)]
pub struct Spec {
    pub addr: SocketAddr,
    pub has_seq: bool,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    pub connect_timeout_s: f64,
    /// Free read buffers once joined (idle sockets).
    pub idle: bool,
    /// Length of message contents sent.
    pub size: usize,
    pub groups: Vec<Group>,
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

/// A worker's answers: `Ready` once every connection joined (or failed),
/// then one `Step` or `Status` per command.
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
}

impl WorkerMsg {
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerMsg::Ready { .. } => "ready",
            WorkerMsg::Step(_) => "step",
            WorkerMsg::Status(_) => "status",
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
