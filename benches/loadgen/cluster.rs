//! Several instances of one chat (`--addr A,B`): what a ramp step measures
//! of the broker path besides deliveries.
//!
//! Before and after each step the coordinator takes a `Snapshot`: per
//! instance, its process CPU and the CPU of its two broker threads
//! (`broker-pub`, `broker-sub`; all from each thread's
//! `/proc/PID/task/TID/schedstat`, in nanoseconds), and its
//! `chatconnect_broker_published_total` / `_received_total` counters
//! (`GET /metrics`); of Redis (`--redis`), `INFO`'s bytes in and out and its
//! CPU. `ClusterStep::new` turns two snapshots and the step's deliveries
//! (split by same-instance and cross-instance sender) into the figures that
//! go into the step's details: the latency a hop adds, CPU per published
//! and per received batch, bytes on the wire per message.
//!
//! Used by `ramp.rs` when the context has several addresses.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::{die, Ctx};
use crate::hist::{ms, Hist};
use crate::sys::threads_cpu_secs;
use crate::workers::{StepReport, WorkerMsg};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the coordinator reads of the instances and Redis.
pub struct Probe {
    addrs: Vec<SocketAddr>,
    pids: Vec<u32>,
    redis: Option<SocketAddr>,
}

/// One instance's counters at a moment.
#[derive(Clone, Default)]
struct Inst {
    cpu: Option<f64>,
    pub_cpu: Option<f64>,
    sub_cpu: Option<f64>,
    published: Option<f64>,
    received: Option<f64>,
    store_reads: Option<f64>,
}

/// Redis's counters at a moment; `reply` is the length of the INFO answer
/// itself (counted in the next snapshot's bytes out).
#[derive(Clone, Copy, Default)]
struct RedisInfo {
    bytes_in: f64,
    bytes_out: f64,
    cpu: f64,
    reply: f64,
}

/// Everything at one moment.
pub struct Snapshot {
    at: Instant,
    insts: Vec<Inst>,
    redis: Option<RedisInfo>,
}

impl Probe {
    /// The probe of a cluster run, or none for one instance.
    pub fn of(ctx: &Ctx) -> Option<Probe> {
        if !ctx.cluster() {
            return None;
        }
        let redis = ctx.opts.vals.get("redis").map(|r| {
            let a: SocketAddr = r
                .parse()
                .unwrap_or_else(|_| die("--redis must be HOST:PORT with a numeric address"));
            if !a.ip().is_loopback() {
                die("--redis must be a loopback address");
            }
            a
        });
        Some(Probe {
            addrs: ctx.addrs.clone(),
            pids: ctx.pids.clone(),
            redis,
        })
    }

    pub fn snapshot(&self) -> Snapshot {
        let insts = self
            .addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let pid = self.pids.get(i).copied();
                let metrics = get_metrics(*addr).unwrap_or_default();
                let m = |name: &str| {
                    metrics.lines().find_map(|l| {
                        let (k, v) = l.split_once(' ')?;
                        (k == name).then(|| v.trim().parse().ok())?
                    })
                };
                Inst {
                    cpu: pid.and_then(|p| threads_cpu_secs(p, None)),
                    pub_cpu: pid.and_then(|p| threads_cpu_secs(p, Some("broker-pub"))),
                    sub_cpu: pid.and_then(|p| threads_cpu_secs(p, Some("broker-sub"))),
                    published: m("chatconnect_broker_published_total"),
                    received: m("chatconnect_broker_received_total"),
                    store_reads: m("chatconnect_broker_store_reads_total"),
                }
            })
            .collect();
        Snapshot {
            at: Instant::now(),
            insts,
            redis: self.redis.and_then(redis_info),
        }
    }
}

/// `GET /metrics` on a connection of its own.
fn get_metrics(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: loadgen\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = Vec::new();
    s.take(4 << 20).read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let (_, rest) = text.split_once("\r\n\r\n")?;
    Some(rest.to_string())
}

/// `INFO` on a connection of its own (RESP, inline command): bytes in and
/// out so far, CPU so far.
fn redis_info(addr: SocketAddr) -> Option<RedisInfo> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    (&s).write_all(b"INFO\r\n").ok()?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).ok()?;
    let len: usize = head.strip_prefix('$')?.trim().parse().ok()?;
    if len > 1 << 20 {
        return None;
    }
    let mut body = vec![0; len + 2];
    r.read_exact(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let f = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(RedisInfo {
        bytes_in: f("total_net_input_bytes")?,
        bytes_out: f("total_net_output_bytes")?,
        cpu: f("used_cpu_sys")? + f("used_cpu_user")?,
        reply: (head.len() + len + 2) as f64,
    })
}

/// One instance's share of a step.
#[derive(Clone, Serialize)]
pub struct InstStep {
    pub cpu_pct: Option<f64>,
    pub published: Option<f64>,
    pub received: Option<f64>,
    /// CPU of the `broker-pub` / `broker-sub` threads over the step (µs).
    pub pub_thread_us: Option<f64>,
    pub sub_thread_us: Option<f64>,
    pub store_reads: Option<f64>,
}

/// A cluster step's figures beyond the deliveries.
#[derive(Clone, Serialize)]
pub struct ClusterStep {
    /// Deliveries whose sender is on the receiver's instance, and on another.
    pub same_n: u64,
    pub same_p50_ms: f64,
    pub same_p99_ms: f64,
    pub cross_n: u64,
    pub cross_p50_ms: f64,
    pub cross_p99_ms: f64,
    /// What a cross-instance hop adds: cross minus same.
    pub hop_p50_added_ms: f64,
    pub hop_p99_added_ms: f64,
    pub wall_s: f64,
    pub insts: Vec<InstStep>,
    /// Every instance's process CPU added up (% of one core).
    pub servers_cpu_pct: Option<f64>,
    pub published: Option<f64>,
    pub received: Option<f64>,
    /// Messages sent in the step per published batch.
    pub msgs_per_batch: Option<f64>,
    /// Broker threads' CPU per batch: the publisher's per batch it
    /// published, the subscriber's per batch received from another
    /// instance, and per batch it read at all (its own echoes included:
    /// Redis sends a batch to every subscriber, the publisher too).
    pub pub_us_per_batch: Option<f64>,
    pub sub_us_per_received: Option<f64>,
    pub sub_us_per_arrival: Option<f64>,
    /// Redis: bytes in and out over the step (the probes' own INFO
    /// exchanges taken out), per message sent, and its CPU.
    pub redis_in_bytes: Option<f64>,
    pub redis_out_bytes: Option<f64>,
    pub redis_in_per_msg: Option<f64>,
    pub redis_out_per_msg: Option<f64>,
    pub redis_cpu_pct: Option<f64>,
    pub redis_us_per_batch: Option<f64>,
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

fn sum(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    v.sum()
}

fn per(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn round2(v: Option<f64>) -> Option<f64> {
    v.map(|v| (v * 100.0).round() / 100.0)
}

impl ClusterStep {
    /// The figures of a step from its snapshots before and after, the
    /// workers' step reports and the messages sent.
    pub fn new(a: &Snapshot, b: &Snapshot, reps: &[WorkerMsg], sent: u64) -> ClusterStep {
        let (mut same, mut cross) = (Hist::default(), Hist::default());
        for m in reps {
            if let WorkerMsg::Step(StepReport { split: Some(s), .. }) = m {
                same.merge(&Hist::from_sparse(&s.same, s.same_max_us));
                cross.merge(&Hist::from_sparse(&s.cross, s.cross_max_us));
            }
        }
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let insts: Vec<InstStep> = a
            .insts
            .iter()
            .zip(&b.insts)
            .map(|(x, y)| InstStep {
                cpu_pct: delta(x.cpu, y.cpu).map(|c| (c / wall * 1000.0).round() / 10.0),
                published: delta(x.published, y.published),
                received: delta(x.received, y.received),
                pub_thread_us: delta(x.pub_cpu, y.pub_cpu).map(|c| (c * 1e6).round()),
                sub_thread_us: delta(x.sub_cpu, y.sub_cpu).map(|c| (c * 1e6).round()),
                store_reads: delta(x.store_reads, y.store_reads),
            })
            .collect();
        let published = sum(insts.iter().map(|i| i.published));
        let received = sum(insts.iter().map(|i| i.received));
        let pub_us = sum(insts.iter().map(|i| i.pub_thread_us));
        let sub_us = sum(insts.iter().map(|i| i.sub_thread_us));
        let arrivals = match (published, received) {
            (Some(p), Some(r)) => Some(p + r),
            _ => None,
        };
        let (rin, rout, rcpu) = match (a.redis, b.redis) {
            (Some(x), Some(y)) => (
                // Each probe's INFO request is 6 bytes in; the first
                // probe's answer is counted in the second's bytes out.
                Some(y.bytes_in - x.bytes_in - 6.0),
                Some(y.bytes_out - x.bytes_out - x.reply),
                Some(y.cpu - x.cpu),
            ),
            _ => (None, None, None),
        };
        let sent = Some(sent as f64);
        let p = ms;
        ClusterStep {
            same_n: same.n,
            same_p50_ms: p(same.quantile(0.5)),
            same_p99_ms: p(same.quantile(0.99)),
            cross_n: cross.n,
            cross_p50_ms: p(cross.quantile(0.5)),
            cross_p99_ms: p(cross.quantile(0.99)),
            hop_p50_added_ms: round2(Some(ms(cross.quantile(0.5)) - ms(same.quantile(0.5))))
                .unwrap_or(0.0),
            hop_p99_added_ms: round2(Some(ms(cross.quantile(0.99)) - ms(same.quantile(0.99))))
                .unwrap_or(0.0),
            wall_s: (wall * 1000.0).round() / 1000.0,
            servers_cpu_pct: round2(sum(insts.iter().map(|i| i.cpu_pct))),
            published,
            received,
            msgs_per_batch: round2(per(sent, published)),
            pub_us_per_batch: round2(per(pub_us, published)),
            sub_us_per_received: round2(per(sub_us, received)),
            sub_us_per_arrival: round2(per(sub_us, arrivals)),
            redis_in_bytes: rin,
            redis_out_bytes: rout,
            redis_in_per_msg: round2(per(rin, sent)),
            redis_out_per_msg: round2(per(rout, sent)),
            redis_cpu_pct: rcpu.map(|c| (c / wall * 1000.0).round() / 10.0),
            redis_us_per_batch: round2(per(rcpu.map(|c| c * 1e6), published)),
            insts,
        }
    }
}
