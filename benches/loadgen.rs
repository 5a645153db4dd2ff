//! Load generator for ChatConnect (and for the two yardsticks, `floor` and
//! `baseline_tokio`, which speak the same URL shape and message format).
//!
//! Run: `cargo bench --bench loadgen -- SCENARIO --addr 127.0.0.1:PORT
//! [--server-pid PID] [--kind server|baseline|floor] [--label NAME]
//! [--json-out FILE] [--quick] [scenario flags]`, or
//! `cargo bench --bench loadgen -- report DIR` to turn a directory of JSON
//! results into the Markdown table with ratios. `--help` lists the flags.
//!
//! Scenarios (each bounded in count and time):
//! - `idle`: N WebSockets over R rooms that already hold history; server
//!   RSS per connection above the baseline, and the connect rate.
//! - `fanout`: S senders and M members in one room; a ramp of send rates,
//!   every delivery counted, latency from the send time carried in the
//!   content (the senders have a client process of their own); the figure
//!   is the highest rate with p99 under the limit and nothing lost.
//! - `many`: 1000 rooms of 10 members, everyone chatting; same ramp.
//! - `login`: L concurrent login loops while one WebSocket client measures
//!   its round trip; logins/s against the bcrypt bound.
//! - `rest`: `GET /rooms` with keep-alive (wrk when installed).
//!
//! Sockets are spread over worker processes (copies of this binary started
//! with `--worker`, one single-threaded tokio runtime each): the coordinator
//! sends each a JSON spec on stdin, they answer JSON lines on stdout.
//! Send and receive times are `CLOCK_MONOTONIC`, the same clock in every
//! process, so a latency can cross processes.

#[path = "common/verdict.rs"]
mod verdict;
#[path = "common/ws_client.rs"]
mod ws_client;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::rc::Rc;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

use ws_client::{
    field_seq, field_str, mono_ns, ws_path, WsConn, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};

const USAGE: &str = "\
loadgen: load scenarios for ChatConnect and its yardsticks

usage: cargo bench --bench loadgen -- SCENARIO [flags]
       cargo bench --bench loadgen -- report DIR

scenarios: idle, fanout, many, login, rest

common flags:
  --addr HOST:PORT     server to drive (default 127.0.0.1:8000)
  --server-pid PID     server process, for RSS and CPU figures
  --kind K             server | baseline | floor (floor: no history, no seq, no login)
  --label NAME         name of the target in reports (default: the kind)
  --json-out FILE      also write the JSON result there
  --quick              small sizes, for development
  --procs N            client processes (default 2, more for idle when needed;
                       fanout adds one for its senders)
  --history-limit N    messages the server sends on join (default 50)

idle:   --conns 19000 --rooms 100 --seed 10 --hold 10
        --concurrency 96 (handshakes in flight over all processes: keep it under
        the target's accept backlog, or SYNs are dropped and retried a second later)
fanout: --members 5000 --senders 10 --rate 2 --factor 2 --steps 11 --refine 3
        --retrials 6 (extra trials: the top passing rate and the failed one above
        it need two alike) --step-secs 4 --drain-secs 5 --p99-limit-ms 100
        --size 64 --seed 3 --all-steps
many:   --rooms 1000 --room-size 10 --rate 250 --factor 2 --steps 8 --refine 3 (rest as fanout)
login:  --logins 8 --secs 10 --quiet-secs 3 --rtt-interval-ms 10 --workers N --cost 10
rest:   --conns 50 --secs 10 --threads 2 --rooms 20 --no-wrk
";

// ===========================================================================
// Command line

struct Opts {
    vals: HashMap<String, String>,
    flags: Vec<String>,
    pos: Vec<String>,
}

const BOOL_FLAGS: &[&str] = &["--quick", "--no-wrk", "--all-steps", "--help", "-h"];

fn die(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2);
}

impl Opts {
    fn parse(argv: &[String]) -> Opts {
        let mut o = Opts {
            vals: HashMap::new(),
            flags: Vec::new(),
            pos: Vec::new(),
        };
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if BOOL_FLAGS.contains(&a.as_str()) {
                o.flags.push(a.clone());
            } else if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    o.vals.insert(k.to_string(), v.to_string());
                } else {
                    let Some(v) = argv.get(i + 1) else {
                        die(&format!("--{k} needs a value"));
                    };
                    o.vals.insert(k.to_string(), v.clone());
                    i += 1;
                }
            } else {
                o.pos.push(a.clone());
            }
            i += 1;
        }
        o
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A number: the flag if given, else the full or the quick default.
    fn num<T: FromStr>(&self, key: &str, full: T, quick: T) -> T {
        match self.vals.get(key) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{key}: not a valid number: {v}"))),
            None if self.has("--quick") => quick,
            None => full,
        }
    }

    fn text(&self, key: &str, default: &str) -> String {
        self.vals
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Server,
    Baseline,
    Floor,
}

struct Ctx {
    addr: SocketAddr,
    pid: Option<u32>,
    kind: Kind,
    label: String,
    tag: String,
    opts: Opts,
    command: String,
}

impl Ctx {
    /// History frames a member receives on joining a room holding `seeded`.
    fn history(&self, seeded: u32) -> u32 {
        if self.kind == Kind::Floor {
            0
        } else {
            seeded.min(self.opts.num("history-limit", 50, 50))
        }
    }
}

/// What a scenario found.
struct Outcome {
    ok: bool,
    metrics: BTreeMap<String, f64>,
    details: Value,
    notes: Vec<String>,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            ok: true,
            metrics: BTreeMap::new(),
            details: Value::Null,
            notes: Vec::new(),
        }
    }
    fn set(&mut self, k: &str, v: f64) {
        if v.is_finite() {
            self.metrics.insert(k.to_string(), v);
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if argv.first().map(String::as_str) == Some("--worker") {
        worker_main();
        return;
    }
    let opts = Opts::parse(&argv);
    if opts.has("--help") || opts.has("-h") || opts.pos.is_empty() {
        print!("{USAGE}");
        return;
    }
    let scenario = opts.pos[0].clone();
    if scenario == "report" {
        let Some(dir) = opts.pos.get(1) else {
            die("report needs a directory of JSON results");
        };
        match report(dir) {
            Ok(md) => print!("{md}"),
            Err(e) => die(&e),
        }
        return;
    }
    let addr: SocketAddr = opts
        .text("addr", "127.0.0.1:8000")
        .parse()
        .unwrap_or_else(|_| die("--addr must be HOST:PORT with a numeric address"));
    if !addr.ip().is_loopback() {
        die("--addr must be a loopback address (127.0.0.0/8 or ::1)");
    }
    let kind = match opts.text("kind", "server").as_str() {
        "server" | "chatserver" => Kind::Server,
        "baseline" => Kind::Baseline,
        "floor" => Kind::Floor,
        k => die(&format!("--kind: unknown kind {k}")),
    };
    let pid = opts.vals.get("server-pid").map(|p| {
        p.parse()
            .unwrap_or_else(|_| die("--server-pid must be a number"))
    });
    let label = opts.text(
        "label",
        match kind {
            Kind::Server => "chatserver",
            Kind::Baseline => "baseline",
            Kind::Floor => "floor",
        },
    );
    let tag = format!("{:x}", (mono_ns() / 1000) % 0xff_ffff);
    let command = format!("loadgen {}", argv.join(" "));
    let ctx = Ctx {
        addr,
        pid,
        kind,
        label,
        tag,
        opts,
        command,
    };
    let started = Instant::now();
    eprintln!("loadgen: {scenario} against {} ({addr})", ctx.label);
    let result = match scenario.as_str() {
        "idle" => scenario_idle(&ctx),
        "fanout" | "fan-out" => scenario_fanout(&ctx),
        "many" | "many-rooms" => scenario_many(&ctx),
        "login" | "login-storm" => scenario_login(&ctx),
        "rest" => scenario_rest(&ctx),
        s => die(&format!("unknown scenario {s}; see --help")),
    };
    let out = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {scenario} failed: {e}");
            let mut o = Outcome::new();
            o.ok = false;
            o.notes.push(format!("failed: {e}"));
            o
        }
    };
    let scenario = match scenario.as_str() {
        "fan-out" => "fanout",
        "many-rooms" => "many",
        "login-storm" => "login",
        s => s,
    };
    let doc = json!({
        "scenario": scenario,
        "label": ctx.label,
        "kind": format!("{:?}", ctx.kind).to_lowercase(),
        "command": ctx.command,
        "ok": out.ok,
        "secs": started.elapsed().as_secs_f64(),
        "metrics": out.metrics,
        "details": out.details,
        "notes": out.notes,
    });
    let text = serde_json::to_string(&doc).unwrap_or_default();
    println!("{text}");
    if let Some(path) = ctx.opts.vals.get("json-out") {
        if let Err(e) = std::fs::write(path, format!("{text}\n")) {
            die(&format!("cannot write {path}: {e}"));
        }
    }
    if !out.ok {
        std::process::exit(1);
    }
}

// ===========================================================================
// Latency histogram: log-linear buckets, 32 per power of two (about 3 %
// resolution), mergeable across processes by adding counts.

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB as usize;

#[derive(Clone)]
struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }
}

impl Hist {
    fn index(v: u64) -> usize {
        if v < SUB {
            v as usize
        } else {
            let e = 63 - v.leading_zeros();
            let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
            ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
        }
    }

    /// A representative value (the middle) of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            i
        } else {
            let e = (i / SUB) as u32 + SUB_BITS - 1;
            let low = (SUB + i % SUB) << (e - SUB_BITS);
            low + (1u64 << (e - SUB_BITS)) / 2
        }
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.n += o.n;
        self.max = self.max.max(o.max);
    }

    /// The `q` quantile (0..=1), or 0 when empty.
    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let want = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    fn sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    fn from_sparse(s: &[(u32, u64)], max: u64) -> Hist {
        let mut h = Hist::default();
        for &(i, c) in s {
            if (i as usize) < BUCKETS {
                h.counts[i as usize] += c;
                h.n += c;
            }
        }
        h.max = max;
        h
    }
}

/// Microseconds to milliseconds, rounded to 0.01.
fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

// ===========================================================================
// Process figures

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("cannot start a tokio runtime: {e}")))
}

// ===========================================================================
// Worker processes

/// What a worker opens and how its connections behave.
#[derive(Serialize, Deserialize, Clone)]
struct Spec {
    addr: SocketAddr,
    has_seq: bool,
    /// Handshakes in flight at once.
    concurrency: usize,
    connect_timeout_s: f64,
    /// Free read buffers once joined (idle sockets).
    idle: bool,
    /// Length of message contents sent.
    size: usize,
    groups: Vec<Group>,
}

/// `count` members of `room`, named `{prefix}{first + i}`.
#[derive(Serialize, Deserialize, Clone)]
struct Group {
    room: String,
    prefix: String,
    first: u64,
    count: u32,
    /// History frames each member waits for before it counts as joined.
    history: u32,
    /// Members that send: (index in the group, global sender index).
    senders: Vec<(u32, u64)>,
}

/// One step of a ramp: message `m` (0..total_msgs) is sent by global sender
/// `m % total_senders` at `start_ns + m * period_ns`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
struct StepPlan {
    step: u32,
    start_ns: u64,
    period_ns: u64,
    total_msgs: u64,
    total_senders: u64,
    /// Deliveries this worker's members should receive.
    expected: u64,
    deadline_ns: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum WorkerCmd {
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

#[derive(Serialize, Deserialize, Clone, Default)]
struct StepReport {
    step: u32,
    sent: u64,
    received: u64,
    last_ns: u64,
    max_us: u64,
    hist: Vec<(u32, u64)>,
}

#[derive(Serialize, Deserialize, Clone, Default)]
struct StatusReport {
    alive: u64,
    closed: u64,
    close_codes: BTreeMap<String, u64>,
    error_frames: u64,
    order_violations: u64,
    history_frames: u64,
    send_errors: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WorkerMsg {
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
    fn kind(&self) -> &'static str {
        match self {
            WorkerMsg::Ready { .. } => "ready",
            WorkerMsg::Step(_) => "step",
            WorkerMsg::Status(_) => "status",
        }
    }
}

/// The coordinator's handle on its worker processes.
struct Pool {
    kids: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::Receiver<(usize, String)>,
}

impl Pool {
    fn spawn(n: usize) -> Result<Pool, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let mut kids = Vec::new();
        let mut stdins = Vec::new();
        for i in 0..n {
            let mut child = Command::new(&exe)
                .arg("--worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start a worker process: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err("worker pipes missing".into());
            };
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
            kids.push(child);
            stdins.push(stdin);
        }
        Ok(Pool { kids, stdins, rx })
    }

    fn send<T: Serialize>(&mut self, i: usize, msg: &T) -> Result<(), String> {
        let line = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        let w = &mut self.stdins[i];
        writeln!(w, "{line}")
            .and_then(|_| w.flush())
            .map_err(|e| format!("worker {i} is gone: {e}"))
    }

    fn send_all<T: Serialize>(&mut self, msg: &T) -> Result<(), String> {
        for i in 0..self.stdins.len() {
            self.send(i, msg)?;
        }
        Ok(())
    }

    /// One message of kind `want` from every worker, within `timeout`.
    fn collect(&self, want: &str, timeout: Duration) -> Result<Vec<WorkerMsg>, String> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<WorkerMsg>> = (0..self.kids.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, line)) => match serde_json::from_str::<WorkerMsg>(&line) {
                    Ok(m) if m.kind() == want => got[i] = Some(m),
                    Ok(m) => eprintln!("worker {i}: unexpected {} message", m.kind()),
                    Err(_) => eprintln!("worker {i}: {line}"),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("workers did not report {want} within {timeout:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("a worker exited before reporting {want}"))
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    fn cpu_secs(&self) -> f64 {
        self.kids.iter().filter_map(|k| cpu_secs(k.id())).sum()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for i in 0..self.stdins.len() {
            let _ = self.send(i, &WorkerCmd::Quit);
        }
        self.stdins.clear(); // EOF on stdin also ends a worker
        let deadline = Instant::now() + Duration::from_secs(10);
        for k in &mut self.kids {
            loop {
                match k.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = k.kill();
                        let _ = k.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

// ----- inside a worker process ----------------------------------------------

#[derive(Default)]
struct StepStats {
    received: u64,
    last_ns: u64,
    hist: Hist,
}

#[derive(Default)]
struct WState {
    steps: Vec<StepStats>,
    sent: Vec<u64>,
    status: StatusReport,
}

impl WState {
    fn step(&mut self, k: usize) -> &mut StepStats {
        while self.steps.len() <= k {
            self.steps.push(StepStats::default());
        }
        &mut self.steps[k]
    }
}

struct WCtx {
    addr: SocketAddr,
    has_seq: bool,
    idle: bool,
    pad: String,
    connect_timeout: Duration,
    state: RefCell<WState>,
    sem: Semaphore,
    plan: watch::Sender<Option<StepPlan>>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    base_inst: tokio::time::Instant,
    base_ns: u64,
}

impl WCtx {
    fn instant_of(&self, ns: u64) -> tokio::time::Instant {
        self.base_inst + Duration::from_nanos(ns.saturating_sub(self.base_ns))
    }
}

fn emit(msg: &WorkerMsg) {
    let line = serde_json::to_string(msg).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn worker_main() {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
        die("worker: no spec on stdin");
    }
    let spec: Spec =
        serde_json::from_str(&line).unwrap_or_else(|e| die(&format!("worker spec: {e}")));
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker_run(spec));
}

async fn worker_run(spec: Spec) {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let (plan_tx, _) = watch::channel(None);
    let base_inst = tokio::time::Instant::now();
    let base_ns = mono_ns();
    let w = Rc::new(WCtx {
        addr: spec.addr,
        has_seq: spec.has_seq,
        idle: spec.idle,
        pad: "x".repeat(spec.size.saturating_sub(40).max(1)),
        connect_timeout: Duration::from_secs_f64(spec.connect_timeout_s),
        state: RefCell::new(WState::default()),
        sem: Semaphore::new(spec.concurrency.max(1)),
        plan: plan_tx,
        ready: ready_tx,
        base_inst,
        base_ns,
    });
    let started = Instant::now();
    let mut total = 0u64;
    for g in &spec.groups {
        for i in 0..g.count {
            let user = format!("{}{}", g.prefix, g.first + i as u64);
            let path = ws_path(&g.room, &user);
            let sender = g.senders.iter().find(|(k, _)| *k == i).map(|(_, s)| *s);
            tokio::task::spawn_local(conn_task(w.clone(), path, g.history, sender));
            total += 1;
        }
    }
    // Every connection reports once (joined, or why not) within the
    // connect timeout; the deadline covers the queue of handshakes too.
    let deadline = tokio::time::Instant::now()
        + w.connect_timeout
        + Duration::from_secs_f64(total as f64 / 500.0);
    let (mut ok, mut failed, mut error) = (0u64, 0u64, None);
    while ok + failed < total {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ok += 1,
            Ok(Some(Err(e))) => {
                failed += 1;
                error.get_or_insert(e);
            }
            _ => break,
        }
    }
    if ok + failed < total {
        error.get_or_insert(format!("{} connections never joined", total - ok - failed));
        failed = total - ok;
    }
    emit(&WorkerMsg::Ready {
        ok,
        failed,
        secs: started.elapsed().as_secs_f64(),
        error,
    });

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(cmd) = serde_json::from_str::<WorkerCmd>(&line) else {
            eprintln!("worker: bad command {line}");
            continue;
        };
        match cmd {
            WorkerCmd::Step(plan) => {
                w.plan.send_replace(Some(plan));
                let rep = wait_step(&w, plan.step, plan.expected, plan.deadline_ns).await;
                emit(&WorkerMsg::Step(rep));
            }
            WorkerCmd::Drain {
                step,
                expected,
                deadline_ns,
            } => {
                let rep = wait_step(&w, step, expected, deadline_ns).await;
                emit(&WorkerMsg::Step(rep));
            }
            WorkerCmd::Status => {
                let s = w.state.borrow().status.clone();
                emit(&WorkerMsg::Status(s));
            }
            WorkerCmd::Quit => break,
        }
    }
}

/// Wait until step `k` has `expected` deliveries or the deadline passes.
async fn wait_step(w: &WCtx, step: u32, expected: u64, deadline_ns: u64) -> StepReport {
    let k = step as usize;
    loop {
        let got = w.state.borrow_mut().step(k).received;
        if got >= expected || mono_ns() >= deadline_ns {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut st = w.state.borrow_mut();
    let sent = st.sent.get(k).copied().unwrap_or(0);
    let s = st.step(k);
    StepReport {
        step,
        sent,
        received: s.received,
        last_ns: s.last_ns,
        max_us: s.hist.max,
        hist: s.hist.sparse(),
    }
}

/// Connect, upgrade and read the history: the connection has joined.
async fn join(w: &WCtx, path: &str, history: u32) -> Result<(WsConn, i64), String> {
    let mut c = ws_client::connect(w.addr, path)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut got = 0;
    let mut last_seq = 0;
    loop {
        while got < history {
            let Some(f) = c.next_frame().map_err(|e| e.to_string())? else {
                break;
            };
            match f.opcode {
                OP_TEXT => {
                    got += 1;
                    if let Some(s) = field_seq(f.payload) {
                        last_seq = s;
                    }
                }
                OP_CLOSE => return Err(format!("closed while joining ({:?})", c.close_code)),
                _ => {}
            }
        }
        if got >= history {
            w.state.borrow_mut().status.history_frames += got as u64;
            return Ok((c, last_seq));
        }
        match c.fill().await {
            Ok(0) => return Err("closed before its history arrived".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

const CONTENT: &str = "content";

/// Account for one text frame.
fn on_text(st: &mut WState, has_seq: bool, p: &[u8], now: u64, last_seq: &mut i64) {
    if has_seq {
        if let Some(seq) = field_seq(p) {
            if seq <= *last_seq {
                st.status.order_violations += 1;
            }
            *last_seq = seq;
        }
    }
    match field_str(p, CONTENT) {
        Some(c) if c.first() == Some(&b'L') => {
            // L{step} {sender} {m} {send time ns} {padding}
            let mut it = c[1..].split(|b| *b == b' ');
            let step = it.next().and_then(parse_u64);
            let t = it.nth(2).and_then(parse_u64);
            if let (Some(step), Some(t)) = (step, t) {
                let s = st.step(step as usize);
                s.received += 1;
                s.last_ns = s.last_ns.max(now);
                s.hist.record(now.saturating_sub(t) / 1000);
            }
        }
        Some(_) => {}
        None => {
            if p.starts_with(b"{\"error\"") {
                st.status.error_frames += 1;
            }
        }
    }
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u64;
    }
    Some(v)
}

async fn conn_task(w: Rc<WCtx>, path: String, history: u32, sender: Option<u64>) {
    let permit = w.sem.acquire().await.ok();
    let joined = tokio::time::timeout(w.connect_timeout, join(&w, &path, history)).await;
    drop(permit);
    let (mut c, mut last_seq) = match joined {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = w.ready.send(Err(e));
            return;
        }
        Err(_) => {
            let _ = w
                .ready
                .send(Err(format!("not joined within {:?}", w.connect_timeout)));
            return;
        }
    };
    w.state.borrow_mut().status.alive += 1;
    let _ = w.ready.send(Ok(()));
    if w.idle {
        c.release();
    }
    let mut plan_rx = w.plan.subscribe();
    plan_rx.mark_unchanged();
    // (plan, next message index this sender owns)
    let mut sending: Option<(StepPlan, u64)> = None;
    let mut pongs: Vec<Vec<u8>> = Vec::new();
    let mut watching = sender.is_some();
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    'conn: loop {
        {
            let now = mono_ns();
            let mut st = w.state.borrow_mut();
            loop {
                match c.next_frame() {
                    Ok(Some(f)) => match f.opcode {
                        OP_TEXT => on_text(&mut st, w.has_seq, f.payload, now, &mut last_seq),
                        OP_PING => pongs.push(f.payload.to_vec()),
                        OP_CLOSE => break 'conn,
                        _ => {}
                    },
                    Ok(None) => break,
                    Err(_) => break 'conn,
                }
            }
        }
        for p in pongs.drain(..) {
            if c.send(OP_PONG, &p).await.is_err() {
                break 'conn;
            }
        }
        let next_at = sending
            .as_ref()
            .map(|(p, m)| w.instant_of(p.start_ns + m * p.period_ns));
        tokio::select! {
            r = c.fill() => match r {
                Ok(0) | Err(_) => break 'conn,
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(next_at.unwrap_or(far)), if next_at.is_some() => {
                let now = mono_ns();
                while let Some((p, m)) = sending.as_mut() {
                    let t = p.start_ns + *m * p.period_ns;
                    if t > now {
                        break;
                    }
                    let text = format!(
                        "{{\"content\":\"L{} {} {} {} {}\"}}",
                        p.step,
                        sender.unwrap_or(0),
                        m,
                        t,
                        w.pad
                    );
                    if c.send_text(&text).await.is_err() {
                        w.state.borrow_mut().status.send_errors += 1;
                        break 'conn;
                    }
                    {
                        let mut st = w.state.borrow_mut();
                        let k = p.step as usize;
                        if st.sent.len() <= k {
                            st.sent.resize(k + 1, 0);
                        }
                        st.sent[k] += 1;
                    }
                    *m += p.total_senders;
                    if *m >= p.total_msgs {
                        sending = None;
                    }
                }
            }
            r = plan_rx.changed(), if watching => {
                if r.is_err() {
                    // No more plans will come; keep reading until the end.
                    sending = None;
                    watching = false;
                } else if let (Some(p), Some(g)) = (*plan_rx.borrow_and_update(), sender) {
                    sending = (g < p.total_msgs).then_some((p, g));
                }
            }
        }
    }
    let mut st = w.state.borrow_mut();
    st.status.alive -= 1;
    st.status.closed += 1;
    let code = c
        .close_code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "none".into());
    *st.status.close_codes.entry(code).or_insert(0) += 1;
}

// ===========================================================================
// Small async clients used by the coordinator

/// Seed every room with `n` messages (which also creates it), `concurrency`
/// rooms at a time; returns when every seed came back to its sender.
fn seed_rooms(addr: SocketAddr, rooms: &[String], n: u32) -> Result<(), String> {
    if rooms.is_empty() || n == 0 {
        return Ok(());
    }
    let t0 = Instant::now();
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let res: Result<(), String> = local.block_on(&rt, async {
        let sem = Rc::new(Semaphore::new(32));
        let mut handles = Vec::new();
        for room in rooms {
            let room = room.clone();
            let sem = sem.clone();
            handles.push(tokio::task::spawn_local(async move {
                let _p = sem.acquire().await;
                tokio::time::timeout(Duration::from_secs(30), seed_one(addr, &room, n))
                    .await
                    .unwrap_or_else(|_| Err(format!("seeding room {room} timed out")))
            }));
        }
        for h in handles {
            h.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    });
    res?;
    eprintln!(
        "  seeded {} rooms with {n} messages each in {:.1}s",
        rooms.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn seed_one(addr: SocketAddr, room: &str, n: u32) -> Result<(), String> {
    let mut c = ws_client::connect(addr, &ws_path(room, "seeder"))
        .await
        .map_err(|e| format!("seed {room}: {e}"))?;
    for i in 0..n {
        let text = format!(
            "{{\"content\":\"seed {i}: a line of history, about as long as a chat message\"}}"
        );
        c.send_text(&text).await.map_err(|e| e.to_string())?;
    }
    let mut got = 0;
    while got < n {
        while let Some(f) = c.next_frame().map_err(|e| e.to_string())? {
            match f.opcode {
                OP_TEXT
                    if field_str(f.payload, CONTENT).is_some_and(|c| c.starts_with(b"seed ")) =>
                {
                    got += 1;
                }
                OP_CLOSE => return Err(format!("seed {room}: closed ({:?})", c.close_code)),
                _ => {}
            }
        }
        if got >= n {
            break;
        }
        if c.fill().await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("seed {room}: connection closed"));
        }
    }
    let _ = c.close(1000).await;
    Ok(())
}

/// A keep-alive HTTP/1.1 client connection.
struct Http {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Http {
    async fn connect(addr: SocketAddr) -> std::io::Result<Http> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            buf: Vec::with_capacity(4096),
            host: addr.to_string(),
        })
    }

    /// One request; the answer's status and body. `Err` if the connection
    /// broke (the caller reconnects).
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.stream.write_all(req.as_bytes()).await?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let status = resp.code.unwrap_or(0);
                    let len = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    let close = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                    });
                    while self.buf.len() < head + len {
                        self.read_more().await?;
                    }
                    let body = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    if close {
                        let _ = self.stream.shutdown().await;
                    }
                    return Ok((status, body));
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > 64 * 1024 {
                        return Err(std::io::Error::other("response head too long"));
                    }
                    self.read_more().await?;
                }
                Err(e) => return Err(std::io::Error::other(format!("bad response: {e}"))),
            }
        }
    }

    async fn read_more(&mut self) -> std::io::Result<()> {
        self.buf.reserve(16 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }
}

async fn http_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let fut = async {
        let mut h = Http::connect(addr).await?;
        h.request(method, path, body).await
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(r) => r.map_err(|e| format!("{method} {path}: {e}")),
        Err(_) => Err(format!("{method} {path}: no answer within 30 s")),
    }
}

// ===========================================================================
// Scenario: idle

fn default_procs(conns: u64) -> usize {
    (conns.div_ceil(9000) as usize).max(2)
}

/// Split `n` items into `parts` contiguous ranges.
fn ranges(n: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    (0..parts)
        .map(|i| (n * i / parts, n * (i + 1) / parts))
        .collect()
}

fn scenario_idle(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let conns: u64 = o.num("conns", 19_000, 2_000);
    let rooms: u64 = o.num("rooms", 100, 20).max(1);
    let seed: u32 = o.num("seed", 10, 5);
    let hold: f64 = o.num("hold", 10.0, 2.0);
    let procs: usize = o.num("procs", default_procs(conns), default_procs(conns));
    let concurrency: usize = o.num("concurrency", 96, 96);
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("idle-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, seed)?;
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = ctx.pid.and_then(rss_kib);

    let history = ctx.history(seed);
    let mut pool = Pool::spawn(procs)?;
    let t0 = Instant::now();
    let mut named = 0u64;
    for (w, (lo, hi)) in ranges(conns, procs).into_iter().enumerate() {
        let mut groups = Vec::new();
        for (r, name) in names.iter().enumerate() {
            let r = r as u64;
            // connections i in lo..hi with i % rooms == r
            let first = lo + (r + rooms - lo % rooms) % rooms;
            if first >= hi {
                continue;
            }
            let count = (hi - first).div_ceil(rooms) as u32;
            let first_name = named;
            named += count as u64;
            groups.push(Group {
                room: name.clone(),
                prefix: "i".into(),
                first: first_name,
                count,
                history,
                senders: Vec::new(),
            });
        }
        let spec = Spec {
            addr: ctx.addr,
            has_seq: ctx.kind != Kind::Floor,
            concurrency: concurrency.div_ceil(procs),
            connect_timeout_s: 60.0,
            idle: true,
            size: 64,
            groups,
        };
        pool.send(w, &spec)?;
    }
    let ready = pool.collect("ready", Duration::from_secs(60 + conns / 200 + 30))?;
    let connect_secs = t0.elapsed().as_secs_f64();
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for m in &ready {
        if let WorkerMsg::Ready {
            ok: a,
            failed: b,
            error,
            ..
        } = m
        {
            ok += a;
            failed += b;
            errors.extend(error.clone());
        }
    }
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

    let mut out = Outcome::new();
    out.set("conns_requested", conns as f64);
    out.set("conns_ok", ok as f64);
    out.set("conns_failed", failed as f64);
    out.set("connect_secs", connect_secs);
    out.set("connect_rate", ok as f64 / connect_secs);
    out.set("conns_held", status.alive as f64);
    out.set("history_frames", status.history_frames as f64);
    if let (Some(r0), Some(&r1)) = (rss0, rss_samples.last()) {
        out.set("rss_base_mib", r0 as f64 / 1024.0);
        out.set("rss_held_mib", r1 as f64 / 1024.0);
        if ok > 0 {
            let per = (r1 as f64 - r0 as f64) * 1024.0 / ok as f64;
            out.set("rss_per_conn_bytes", per.round());
            eprintln!(
                "  server RSS {:.1} MiB -> {:.1} MiB: {per:.0} bytes per connection",
                r0 as f64 / 1024.0,
                r1 as f64 / 1024.0
            );
        }
    } else {
        out.notes
            .push("no --server-pid (or unreadable /proc): no memory figure".into());
    }
    if failed > 0 || status.alive < ok {
        out.ok = false;
        out.notes.push(format!(
            "{failed} connections failed, {} of {ok} still open after the hold; first error: {}",
            status.alive,
            errors.first().cloned().unwrap_or_default()
        ));
    }
    out.details = json!({ "rss_samples_kib": rss_samples, "status": status_json(&status) });
    Ok(out)
}

fn merge_status(msgs: &[WorkerMsg]) -> StatusReport {
    let mut t = StatusReport::default();
    for m in msgs {
        if let WorkerMsg::Status(s) = m {
            t.alive += s.alive;
            t.closed += s.closed;
            t.error_frames += s.error_frames;
            t.order_violations += s.order_violations;
            t.history_frames += s.history_frames;
            t.send_errors += s.send_errors;
            for (k, v) in &s.close_codes {
                *t.close_codes.entry(k.clone()).or_insert(0) += v;
            }
        }
    }
    t
}

fn status_json(s: &StatusReport) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

// ===========================================================================
// Scenarios: fan-out and many rooms (a ramp of send rates)

struct Ramp {
    rate: f64,
    factor: f64,
    steps: u32,
    refine: u32,
    /// Extra trials that settle the two rates the verdict turns on.
    retrials: u32,
    step_secs: f64,
    drain_secs: f64,
    p99_limit_ms: f64,
    all_steps: bool,
}

impl Ramp {
    fn from_opts(o: &Opts, rate: (f64, f64), steps: (u32, u32)) -> Ramp {
        Ramp {
            rate: o.num("rate", rate.0, rate.1),
            factor: o.num("factor", 2.0, 2.0),
            steps: o.num("steps", steps.0, steps.1).max(1),
            refine: o.num("refine", 3, 0),
            retrials: o.num("retrials", 6, 2),
            step_secs: o.num("step-secs", 4.0, 2.0),
            drain_secs: o.num("drain-secs", 5.0, 3.0),
            p99_limit_ms: o.num("p99-limit-ms", 100.0, 100.0),
            all_steps: o.has("--all-steps"),
        }
    }
}

fn scenario_fanout(ctx: &Ctx) -> Result<Outcome, String> {
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
    // senders are members too: they receive every message.
    let group = |first: u64, count: u64, senders: Vec<(u32, u64)>| Group {
        room: room.clone(),
        prefix: "f".into(),
        first,
        count: count as u32,
        history,
        senders,
    };
    let mut groups = vec![vec![group(
        0,
        senders,
        (0..senders).map(|s| (s as u32, s)).collect(),
    )]];
    groups.extend(
        ranges(members - senders, procs)
            .into_iter()
            .filter(|(lo, hi)| hi > lo)
            .map(|(lo, hi)| vec![group(senders + lo, hi - lo, Vec::new())]),
    );
    let mut out = run_ramp(ctx, groups, senders, &ramp)?;
    out.set("members", members as f64);
    out.set("senders", senders as f64);
    Ok(out)
}

fn scenario_many(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let rooms: u64 = o.num("rooms", 1000, 100).max(1);
    let size: u64 = o.num("room-size", 10, 10).max(1);
    let seed: u32 = o.num("seed", 2, 2);
    let procs: usize = o.num("procs", 2, 2).max(1);
    let ramp = Ramp::from_opts(o, (250.0, 500.0), (8, 3));
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("many-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, seed)?;
    let history = ctx.history(seed);
    let mut groups: Vec<Vec<Group>> = vec![Vec::new(); procs];
    for (r, name) in names.iter().enumerate() {
        let r = r as u64;
        groups[(r % procs as u64) as usize].push(Group {
            room: name.clone(),
            prefix: "m".into(),
            first: r * size,
            count: size as u32,
            history,
            // Sender order interleaves rooms, so consecutive messages go to
            // different rooms.
            senders: (0..size).map(|k| (k as u32, k * rooms + r)).collect(),
        });
    }
    let mut out = run_ramp(ctx, groups, rooms * size, &ramp)?;
    out.set("rooms", rooms as f64);
    out.set("room_size", size as f64);
    Ok(out)
}

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

#[derive(Clone, Serialize)]
struct StepSummary {
    step: u32,
    rate_msgs: f64,
    msgs: u64,
    sent: u64,
    expected: u64,
    received: u64,
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
}

impl StepSummary {
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
    pool: &'a mut Pool,
    groups: &'a [Vec<Group>],
    total_senders: u64,
    ramp: &'a Ramp,
    steps: Vec<StepSummary>,
    /// Deliveries each worker expects in the last step.
    last: Vec<u64>,
    seen_violations: u64,
    seen_errors: u64,
}

impl RampRun<'_> {
    /// Run one step at `rate` messages per second in total; its summary.
    fn step(&mut self, rate: f64) -> Result<StepSummary, String> {
        let ramp = self.ramp;
        let k = self.steps.len() as u32;
        let total_senders = self.total_senders;
        let msgs = ((rate * ramp.step_secs).round() as u64).max(1);
        let period_ns = (1e9 / rate) as u64;
        // Messages each global sender sends, per room, then each worker's
        // expected deliveries.
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
        let start_ns = mono_ns() + 300_000_000;
        let deadline_ns = start_ns + ((ramp.step_secs + ramp.drain_secs) * 1e9) as u64;
        let pid = self.ctx.pid;
        let cpu0 = (pid.and_then(cpu_secs), self.pool.cpu_secs(), Instant::now());
        self.last.clear();
        for (w, gs) in self.groups.iter().enumerate() {
            let exp: u64 = gs
                .iter()
                .map(|g| per_room.get(g.room.as_str()).copied().unwrap_or(0) * g.count as u64)
                .sum();
            self.last.push(exp);
            let plan = StepPlan {
                step: k,
                start_ns,
                period_ns,
                total_msgs: msgs,
                total_senders,
                expected: exp,
                deadline_ns,
            };
            self.pool.send(w, &WorkerCmd::Step(plan))?;
        }
        let expected: u64 = self.last.iter().sum();
        let wait = Duration::from_secs_f64(0.3 + ramp.step_secs + ramp.drain_secs + 20.0);
        let reps = self.pool.collect("step", wait)?;
        let cpu1 = (pid.and_then(cpu_secs), self.pool.cpu_secs(), Instant::now());
        self.pool.send_all(&WorkerCmd::Status)?;
        let status = merge_status(&self.pool.collect("status", Duration::from_secs(30))?);

        let mut hist = Hist::default();
        let (mut sent, mut received, mut last_ns) = (0, 0, 0);
        for m in &reps {
            if let WorkerMsg::Step(r) = m {
                sent += r.sent;
                received += r.received;
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
        };
        self.seen_violations = status.order_violations;
        self.seen_errors = status.error_frames;
        s.ok = !s.broken()
            && s.order_violations == 0
            && s.error_frames == 0
            && s.p99_ms < ramp.p99_limit_ms;
        eprintln!(
            "  step {k}: {rate:.1} msg/s: {received}/{expected} delivered, {:.0} deliveries/s, \
             p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms, server CPU {}%, loadgen CPU {}%{}",
            s.deliveries_per_s,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.server_cpu_pct.map(|c| c.to_string()).unwrap_or("?".into()),
            s.loadgen_cpu_pct,
            if s.ok { "" } else { "  [not sustained]" }
        );
        if s.closed > 0 || s.order_violations > 0 || s.error_frames > 0 || sent < msgs {
            eprintln!(
                "    {} connections closed by the server so far, {} out of order, {} error frames, {sent}/{msgs} sent",
                s.closed, s.order_violations, s.error_frames
            );
        }
        self.steps.push(s.clone());
        Ok(s)
    }

    /// After a broken step: whether another can start clean (no connection
    /// was closed, and the rest of its deliveries arrived).
    fn recover(&mut self, s: &StepSummary) -> Result<bool, String> {
        Ok(s.closed == 0 && self.drain()?)
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

fn run_ramp(
    ctx: &Ctx,
    groups: Vec<Vec<Group>>,
    total_senders: u64,
    ramp: &Ramp,
) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let concurrency: usize = o.num("concurrency", 96, 96);
    let size: usize = o.num("size", 64, 64);
    let conns: u64 = groups.iter().flatten().map(|g| g.count as u64).sum();
    let mut pool = Pool::spawn(groups.len())?;
    let t0 = Instant::now();
    for (w, g) in groups.iter().enumerate() {
        let spec = Spec {
            addr: ctx.addr,
            has_seq: ctx.kind != Kind::Floor,
            concurrency: concurrency.div_ceil(groups.len()),
            connect_timeout_s: 60.0,
            idle: false,
            size,
            groups: g.clone(),
        };
        pool.send(w, &spec)?;
    }
    let ready = pool.collect("ready", Duration::from_secs(90 + conns / 200))?;
    let connect_secs = t0.elapsed().as_secs_f64();
    let mut failed = 0;
    let mut first_err = None;
    for m in &ready {
        if let WorkerMsg::Ready {
            failed: f, error, ..
        } = m
        {
            failed += f;
            if first_err.is_none() {
                first_err = error.clone();
            }
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {conns} connections failed to join; first error: {}",
            first_err.unwrap_or_default()
        ));
    }
    eprintln!("  {conns} members joined in {connect_secs:.2}s");

    let mut run = RampRun {
        ctx,
        pool: &mut pool,
        groups: &groups,
        total_senders,
        ramp,
        steps: Vec::new(),
        last: Vec::new(),
        seen_violations: 0,
        seen_errors: 0,
    };
    // Ramp up through every step, unless one loses messages or members
    // (what it leaves queued would spoil the next) or is far past the limit.
    let mut usable = true;
    let mut rate = ramp.rate;
    for _ in 0..ramp.steps {
        let s = run.step(rate)?;
        if s.broken() {
            usable = run.recover(&s)?;
            break;
        }
        if !ramp.all_steps && s.p99_ms > 5.0 * ramp.p99_limit_ms {
            break;
        }
        rate *= ramp.factor;
    }
    // Refine between the highest sustained rate and the lowest rate above
    // it that was not; below the first step when even that one failed.
    for _ in 0..ramp.refine {
        if !usable {
            break;
        }
        let lo = run
            .steps
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.rate_msgs)
            .reduce(f64::max);
        let next = match lo {
            None => {
                let lowest = run.steps.iter().map(|s| s.rate_msgs).reduce(f64::min);
                match lowest {
                    Some(l) => l / ramp.factor,
                    None => break,
                }
            }
            Some(lo) => {
                let hi = run
                    .steps
                    .iter()
                    .filter(|s| !s.ok && s.rate_msgs > lo)
                    .map(|s| s.rate_msgs)
                    .reduce(f64::min);
                match hi {
                    Some(hi) if hi / lo > 1.05 => (lo * hi).sqrt(),
                    _ => break,
                }
            }
        };
        let s = run.step(next)?;
        if s.broken() {
            usable = run.recover(&s)?;
        }
    }
    // One 4 s step is decided by its few slowest passes, so a single lucky
    // or unlucky step would move the answer by a factor of two. The highest
    // sustained rate and the lowest failed rate above it get up to three
    // trials each; two alike decide.
    for _ in 0..ramp.retrials {
        if !usable {
            break;
        }
        let Some(rate) = verdict::next_trial(&trials(&run.steps)) else {
            break;
        };
        let s = run.step(rate)?;
        if s.broken() {
            usable = run.recover(&s)?;
        }
    }
    let steps = std::mem::take(&mut run.steps);
    drop(pool);
    let best = sustained(&steps);

    let mut out = Outcome::new();
    out.set("members_joined_secs", connect_secs);
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
    Ok(out)
}

// ===========================================================================
// Scenario: login storm

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

fn scenario_login(ctx: &Ctx) -> Result<Outcome, String> {
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
    let mut login_hist = Hist::default();
    let (mut ok, mut bad) = (0u64, 0u64);
    if supported {
        let local = tokio::task::LocalSet::new();
        let stats = Rc::new(RefCell::new((0u64, 0u64, Hist::default())));
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        local.block_on(&rt, async {
            let mut hs = Vec::new();
            for _ in 0..logins {
                hs.push(tokio::task::spawn_local(login_loop(
                    ctx.addr,
                    body.clone(),
                    end,
                    stats.clone(),
                )));
            }
            for h in hs {
                let _ = h.await;
            }
        });
        let s = stats.borrow();
        ok = s.0;
        bad = s.1;
        login_hist = s.2.clone();
    } else {
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
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

    let mut out = Outcome::new();
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

async fn login_loop(
    addr: SocketAddr,
    body: String,
    end: tokio::time::Instant,
    stats: Rc<RefCell<(u64, u64, Hist)>>,
) {
    let mut conn: Option<Http> = None;
    while tokio::time::Instant::now() < end {
        let mut h = match conn.take() {
            Some(h) => h,
            None => match tokio::time::timeout(Duration::from_secs(5), Http::connect(addr)).await {
                Ok(Ok(h)) => h,
                _ => {
                    stats.borrow_mut().1 += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let t = mono_ns();
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            h.request("POST", "/login", Some(&body)),
        )
        .await;
        let mut s = stats.borrow_mut();
        match r {
            Ok(Ok((200, _))) => {
                s.0 += 1;
                s.2.record((mono_ns() - t) / 1000);
                conn = Some(h);
            }
            Ok(Ok(_)) => {
                s.1 += 1;
                conn = Some(h);
            }
            _ => s.1 += 1,
        }
    }
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

// ===========================================================================
// Scenario: REST

fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn scenario_rest(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let conns: usize = o.num("conns", 50, 20).max(1);
    let secs: f64 = o.num("secs", 10.0, 3.0);
    let threads: usize = o.num("threads", 2, 2).clamp(1, conns);
    let rooms: u64 = o.num("rooms", 20, 5);
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("rest-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, 1)?;
    let rt = runtime();
    let (status, body) = rt.block_on(http_once(ctx.addr, "GET", "/rooms", None))?;
    if status != 200 || body.first() != Some(&b'[') {
        return Err(format!(
            "GET /rooms answered {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let mut out = Outcome::new();
    out.set("body_bytes", body.len() as f64);
    let url = format!("http://{}/rooms", ctx.addr);
    let wrk = if o.has("--no-wrk") {
        None
    } else {
        find_in_path("wrk")
    };
    if let Some(wrk) = wrk {
        let args = vec![
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{}s", secs.ceil() as u64),
            "--latency".into(),
            url.clone(),
        ];
        eprintln!("  wrk {}", args.join(" "));
        let text = run_bounded(&wrk, &args, Duration::from_secs_f64(secs + 30.0))?;
        let w = parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))?;
        out.set("requests_per_s", w.0.round());
        out.set("p50_ms", w.1);
        out.set("p99_ms", w.2);
        out.set("non_2xx", w.3 as f64);
        out.details =
            json!({ "tool": "wrk", "command": format!("wrk {}", args.join(" ")), "output": text });
        if w.3 > 0 {
            out.ok = false;
            out.notes.push(format!("{} answers were not 2xx", w.3));
        }
    } else {
        let local = tokio::task::LocalSet::new();
        let stats = Rc::new(RefCell::new((0u64, 0u64, Hist::default())));
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let t0 = Instant::now();
        local.block_on(&rt, async {
            let mut hs = Vec::new();
            for _ in 0..conns {
                let stats = stats.clone();
                let addr = ctx.addr;
                hs.push(tokio::task::spawn_local(async move {
                    let mut conn: Option<Http> = None;
                    while tokio::time::Instant::now() < end {
                        let mut h = match conn.take() {
                            Some(h) => h,
                            None => match tokio::time::timeout(
                                Duration::from_secs(5),
                                Http::connect(addr),
                            )
                            .await
                            {
                                Ok(Ok(h)) => h,
                                _ => {
                                    stats.borrow_mut().1 += 1;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            },
                        };
                        let t = mono_ns();
                        let r = tokio::time::timeout(
                            Duration::from_secs(10),
                            h.request("GET", "/rooms", None),
                        )
                        .await;
                        let mut s = stats.borrow_mut();
                        match r {
                            Ok(Ok((200, _))) => {
                                s.0 += 1;
                                s.2.record((mono_ns() - t) / 1000);
                                conn = Some(h);
                            }
                            Ok(Ok(_)) => {
                                s.1 += 1;
                                conn = Some(h);
                            }
                            _ => s.1 += 1,
                        }
                    }
                }));
            }
            for h in hs {
                let _ = h.await;
            }
        });
        let elapsed = t0.elapsed().as_secs_f64();
        let s = stats.borrow();
        out.set("requests_per_s", (s.0 as f64 / elapsed).round());
        out.set("p50_ms", ms(s.2.quantile(0.5)));
        out.set("p99_ms", ms(s.2.quantile(0.99)));
        out.set("non_2xx", s.1 as f64);
        out.details = json!({ "tool": "built-in keep-alive client", "conns": conns });
        out.notes
            .push("wrk not found: built-in client (install wrk for the usual figure)".into());
        if s.1 > 0 {
            out.ok = false;
            out.notes
                .push(format!("{} requests failed or were not 200", s.1));
        }
    }
    eprintln!(
        "  GET /rooms: {:.0} requests/s, p99 {:.2} ms",
        out.metrics.get("requests_per_s").copied().unwrap_or(0.0),
        out.metrics.get("p99_ms").copied().unwrap_or(0.0)
    );
    Ok(out)
}

/// Run a command to completion within `limit`; its standard output.
fn run_bounded(prog: &std::path::Path, args: &[String], limit: Duration) -> Result<String, String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", prog.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} ran past {limit:?}", prog.display()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
    reader.join().map_err(|_| "reader panicked".to_string())
}

/// wrk's requests/s, p50 and p99 (ms) and non-2xx count.
fn parse_wrk(text: &str) -> Option<(f64, f64, f64, u64)> {
    let dur = |s: &str| -> Option<f64> {
        let s = s.trim();
        let (num, mul) = if let Some(v) = s.strip_suffix("us") {
            (v, 0.001)
        } else if let Some(v) = s.strip_suffix("ms") {
            (v, 1.0)
        } else if let Some(v) = s.strip_suffix('s') {
            (v, 1000.0)
        } else if let Some(v) = s.strip_suffix('m') {
            (v, 60_000.0)
        } else {
            return None;
        };
        num.parse::<f64>()
            .ok()
            .map(|n| (n * mul * 1000.0).round() / 1000.0)
    };
    let mut rps = None;
    let (mut p50, mut p99, mut bad) = (None, None, 0);
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = dur(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = dur(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            bad = v.trim().parse().unwrap_or(0);
        }
    }
    Some((rps?, p50?, p99?, bad))
}

// ===========================================================================
// Report: a Markdown table of every figure with its ratios to the yardsticks

/// (scenario, metric, what it is, lower is better, target on chatserver)
const FIGURES: &[(&str, &str, &str, bool, &str)] = &[
    (
        "idle",
        "rss_per_conn_bytes",
        "server RSS per idle WebSocket (bytes)",
        true,
        "≤ 2048",
    ),
    (
        "idle",
        "connect_rate",
        "connects/s (upgrade + history)",
        false,
        "",
    ),
    (
        "idle",
        "conns_held",
        "WebSockets held",
        false,
        "= requested",
    ),
    (
        "idle",
        "rss_held_mib",
        "server RSS while holding them (MiB)",
        true,
        "",
    ),
    (
        "fanout",
        "deliveries_per_s",
        "sustained deliveries/s (p99 < limit, none lost)",
        false,
        "≥ 0.7 × floor",
    ),
    (
        "fanout",
        "rate_msgs",
        "at messages/s into the room",
        false,
        "",
    ),
    (
        "fanout",
        "p50_ms",
        "latency p50 at that rate (ms)",
        true,
        "",
    ),
    (
        "fanout",
        "p99_ms",
        "latency p99 at that rate (ms)",
        true,
        "< 100",
    ),
    (
        "fanout",
        "p999_ms",
        "latency p99.9 at that rate (ms)",
        true,
        "",
    ),
    (
        "many",
        "deliveries_per_s",
        "sustained deliveries/s (p99 < limit, none lost)",
        false,
        "≥ 0.7 × floor",
    ),
    ("many", "rate_msgs", "at messages/s in total", false, ""),
    ("many", "p50_ms", "latency p50 at that rate (ms)", true, ""),
    (
        "many",
        "p99_ms",
        "latency p99 at that rate (ms)",
        true,
        "< 100",
    ),
    (
        "many",
        "p999_ms",
        "latency p99.9 at that rate (ms)",
        true,
        "",
    ),
    ("login", "logins_per_s", "logins/s", false, ""),
    (
        "login",
        "bound_per_s",
        "bcrypt bound: workers / one hash",
        false,
        "",
    ),
    ("login", "of_bound", "logins/s ÷ bound", false, "≥ 0.9"),
    (
        "login",
        "rtt_p99_storm_ms",
        "WS message round trip p99 during the storm (ms; store commit included)",
        true,
        "< 5",
    ),
    (
        "login",
        "rtt_p99_quiet_ms",
        "WS message round trip p99, quiet (ms)",
        true,
        "",
    ),
    (
        "login",
        "ping_p99_storm_ms",
        "WS ping round trip p99 during the storm (ms; event loop only)",
        true,
        "< 5",
    ),
    (
        "login",
        "hash_ms",
        "one bcrypt hash, this run (ms)",
        true,
        "",
    ),
    (
        "rest",
        "requests_per_s",
        "GET /rooms requests/s (keep-alive)",
        false,
        "",
    ),
    ("rest", "p99_ms", "GET /rooms p99 (ms)", true, ""),
];

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn report(dir: &str) -> Result<String, String> {
    let mut docs: Vec<Value> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => docs.push(v),
            Err(e) => eprintln!("skipping {}: {e}", p.display()),
        }
    }
    let find = |scn: &str, label: &str| {
        docs.iter()
            .find(|d| d["scenario"] == scn && d["label"] == label)
    };
    let metric =
        |scn: &str, label: &str, m: &str| find(scn, label).and_then(|d| d["metrics"][m].as_f64());
    let mut md = String::new();
    md.push_str(
        "| scenario | figure | chatserver | floor | baseline | ÷ floor | ÷ baseline | target |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---|\n");
    for &(scn, key, what, lower, target) in FIGURES {
        if ["chatserver", "floor", "baseline"]
            .iter()
            .all(|l| find(scn, l).is_none())
        {
            continue;
        }
        let cell = |l: &str| {
            metric(scn, l, key)
                .map(fmt_num)
                .unwrap_or_else(|| "–".into())
        };
        let c = metric(scn, "chatserver", key);
        let ratio = |l: &str| match (c, metric(scn, l, key)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let verdict = match (key, c) {
            (_, None) => String::new(),
            ("rss_per_conn_bytes", Some(v)) => mark(v <= 2048.0),
            ("conns_held", Some(v)) => {
                mark(metric(scn, "chatserver", "conns_requested").is_some_and(|r| v >= r))
            }
            ("deliveries_per_s", Some(v)) => match metric(scn, "floor", key) {
                Some(f) if f > 0.0 => mark(v / f >= 0.7),
                _ => String::new(),
            },
            ("p99_ms", Some(v)) if scn != "rest" => mark(v < 100.0),
            ("of_bound", Some(v)) => mark(v >= 0.9),
            ("rtt_p99_storm_ms" | "ping_p99_storm_ms", Some(v)) => mark(v < 5.0),
            _ => String::new(),
        };
        let direction = if lower { " ↓" } else { "" };
        let t = if target.is_empty() {
            String::new()
        } else {
            format!("{target} {verdict}")
        };
        md.push_str(&format!(
            "| {scn} | {what}{direction} | {} | {} | {} | {} | {} | {t} |\n",
            cell("chatserver"),
            cell("floor"),
            cell("baseline"),
            ratio("floor"),
            ratio("baseline"),
        ));
    }
    md.push_str("\n↓: lower is better. Ratios are chatserver ÷ yardstick. \"–\": not measured or not applicable.\n");

    // The ramps, step by step.
    for scn in ["fanout", "many"] {
        let mut rows = String::new();
        for label in ["chatserver", "floor", "baseline"] {
            let Some(steps) = find(scn, label).and_then(|d| d["details"]["steps"].as_array())
            else {
                continue;
            };
            for s in steps {
                rows.push_str(&format!(
                    "| {label} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    fmt_num(s["rate_msgs"].as_f64().unwrap_or(0.0)),
                    fmt_num(s["deliveries_per_s"].as_f64().unwrap_or(0.0)),
                    s["received"],
                    s["expected"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["p999_ms"],
                    s["closed"],
                    s["server_cpu_pct"],
                    s["loadgen_cpu_pct"],
                    if s["ok"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                ));
            }
        }
        if !rows.is_empty() {
            md.push_str(&format!(
                "\n{scn} steps:\n\n| target | msg/s | deliveries/s | received / expected | p50 ms | p99 ms | p99.9 ms | closed | server CPU % | loadgen CPU % | sustained |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n{rows}"
            ));
        }
    }
    let mut notes = String::new();
    for d in &docs {
        if let Some(ns) = d["notes"].as_array() {
            for n in ns {
                notes.push_str(&format!(
                    "- {} / {}: {}\n",
                    d["scenario"].as_str().unwrap_or("?"),
                    d["label"].as_str().unwrap_or("?"),
                    n.as_str().unwrap_or("")
                ));
            }
        }
    }
    if !notes.is_empty() {
        md.push_str(&format!("\nNotes:\n\n{notes}"));
    }
    md.push_str("\nLoad generator command lines:\n\n```\n");
    for d in &docs {
        md.push_str(&format!("{}\n", d["command"].as_str().unwrap_or("")));
    }
    md.push_str("```\n");
    Ok(md)
}

fn mark(ok: bool) -> String {
    if ok { "✅" } else { "❌" }.to_string()
}
