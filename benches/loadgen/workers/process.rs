//! Inside a worker process (`loadgen --worker`): read the spec, open every
//! connection it names (a bounded number of handshakes at a time), then
//! obey the coordinator's commands until Quit or EOF.
//!
//! Each connection is a task that reads and counts every frame and, if it
//! is a sender, sends its share of each step's messages on schedule. A join
//! storm's spec hands the opening to `storm.rs`; its sockets are then served
//! here like any other. A load
//! message's content is `L{step} {sender} {m} {send time ns} {padding}`, so
//! the member that receives it can count it against its step and take its
//! latency from the scheduled send time. With several instances of one chat
//! (`Spec::addrs`) the sender's instance comes before the padding
//! (`i{instance}`), and the latency goes into the step's same-instance or
//! cross-instance histogram too.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::sync::{watch, Semaphore};

use super::{Spec, SplitHists, StatusReport, StepPlan, StepReport, WorkerCmd, WorkerMsg};
use crate::cli::die;
use crate::hist::Hist;
use crate::sys::runtime;
use crate::ws_client::{
    self, field_seq, field_str, mono_ns, ws_path, WsConn, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};
use crate::CONTENT;

/// One step's deliveries to this worker's members.
#[derive(Default)]
struct StepStats {
    received: u64,
    on_time: u64,
    last_ns: u64,
    hist: Hist,
    /// With several instances: sender on the receiver's instance, or not.
    same: Option<Hist>,
    cross: Option<Hist>,
}

/// Counts of the whole worker, shared by its connection tasks.
#[derive(Default)]
pub(super) struct WState {
    steps: Vec<StepStats>,
    sent: Vec<u64>,
    pub(super) status: StatusReport,
    /// The current step's `within_us`.
    within_us: u64,
    /// Several instances: deliveries are split by the sender's instance.
    split: bool,
}

impl WState {
    fn step(&mut self, k: usize) -> &mut StepStats {
        while self.steps.len() <= k {
            self.steps.push(StepStats::default());
        }
        &mut self.steps[k]
    }
}

/// What every connection task of the worker shares.
pub(super) struct WCtx {
    pub(super) addr: SocketAddr,
    /// Every instance (`Spec::addrs`); empty for one.
    addrs: Vec<SocketAddr>,
    pub(super) has_seq: bool,
    idle: bool,
    pad: String,
    pub(super) connect_timeout: Duration,
    pub(super) state: RefCell<WState>,
    pub(super) sem: Semaphore,
    plan: watch::Sender<Option<StepPlan>>,
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
    base_inst: tokio::time::Instant,
    base_ns: u64,
}

impl WCtx {
    pub(super) fn instant_of(&self, ns: u64) -> tokio::time::Instant {
        self.base_inst + Duration::from_nanos(ns.saturating_sub(self.base_ns))
    }
}

pub(super) fn emit(msg: &WorkerMsg) {
    let line = serde_json::to_string(msg).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The worker's `main`: its spec is the first line on stdin.
pub fn worker_main() {
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
    // With several instances, " i{inst}" takes 3 bytes of the padding.
    let split = spec.addrs.len() > 1;
    let pad_len = spec.size.saturating_sub(if split { 43 } else { 40 });
    let w = Rc::new(WCtx {
        addr: spec.addr,
        addrs: spec.addrs.clone(),
        has_seq: spec.has_seq,
        idle: spec.idle,
        pad: "x".repeat(pad_len.max(1)),
        connect_timeout: Duration::from_secs_f64(spec.connect_timeout_s),
        state: RefCell::new(WState {
            split,
            ..WState::default()
        }),
        sem: Semaphore::new(spec.concurrency.max(1)),
        plan: plan_tx,
        ready: ready_tx,
        base_inst,
        base_ns,
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    match spec.storm {
        Some(storm) => super::storm::run(&w, &spec, storm, &mut lines).await,
        None => join_all(&w, &spec, &mut ready_rx).await,
    }
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(cmd) = serde_json::from_str::<WorkerCmd>(&line) else {
            eprintln!("worker: bad command {line}");
            continue;
        };
        match cmd {
            WorkerCmd::Step(plan) => {
                w.state.borrow_mut().within_us = plan.within_us;
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
            WorkerCmd::Go { .. } => eprintln!("worker: Go outside a join storm"),
            WorkerCmd::Quit => break,
        }
    }
}

/// Open every connection of the spec (a bounded number of handshakes at a
/// time) and report `Ready` once each has joined or failed.
async fn join_all(
    w: &Rc<WCtx>,
    spec: &Spec,
    ready_rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
) {
    let started = Instant::now();
    let mut total = 0u64;
    for g in &spec.groups {
        for i in 0..g.count {
            let user = format!("{}{}", g.prefix, g.first + i as u64);
            let path = ws_path(&g.room, &user);
            let sender = g.senders.iter().find(|(k, _)| *k == i).map(|(_, s)| *s);
            tokio::task::spawn_local(conn_task(w.clone(), path, g.history, sender, g.inst));
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
    let split = match (&s.same, &s.cross) {
        (None, None) => None,
        (a, b) => {
            let (a, b) = (a.clone().unwrap_or_default(), b.clone().unwrap_or_default());
            Some(SplitHists {
                same: a.sparse(),
                same_max_us: a.max,
                cross: b.sparse(),
                cross_max_us: b.max,
            })
        }
    };
    StepReport {
        step,
        sent,
        received: s.received,
        last_ns: s.last_ns,
        max_us: s.hist.max,
        hist: s.hist.sparse(),
        on_time: s.on_time,
        split,
    }
}

/// Connect, upgrade and read the history: the connection has joined.
async fn join(w: &WCtx, path: &str, history: u32, inst: u8) -> Result<(WsConn, i64), String> {
    let addr = w.addrs.get(inst as usize).copied().unwrap_or(w.addr);
    let mut c = ws_client::connect(addr, path)
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

/// Account for one text frame received by a member on instance `inst`.
fn on_text(st: &mut WState, has_seq: bool, p: &[u8], now: u64, last_seq: &mut i64, inst: u8) {
    st.status.live_frames += 1;
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
            // L{step} {sender} {m} {send time ns} [i{instance}] {padding}
            let mut it = c[1..].split(|b| *b == b' ');
            let step = it.next().and_then(parse_u64);
            let t = it.nth(2).and_then(parse_u64);
            if let (Some(step), Some(t)) = (step, t) {
                let (within, split) = (st.within_us, st.split);
                let s = st.step(step as usize);
                let us = now.saturating_sub(t) / 1000;
                s.received += 1;
                if within > 0 && us <= within {
                    s.on_time += 1;
                }
                s.last_ns = s.last_ns.max(now);
                s.hist.record(us);
                if split {
                    let from = it
                        .next()
                        .and_then(|f| f.strip_prefix(b"i"))
                        .and_then(parse_u64);
                    let h = if from == Some(inst as u64) {
                        &mut s.same
                    } else {
                        &mut s.cross
                    };
                    h.get_or_insert_with(Hist::default).record(us);
                }
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

async fn conn_task(w: Rc<WCtx>, path: String, history: u32, sender: Option<u64>, inst: u8) {
    let permit = w.sem.acquire().await.ok();
    let joined = tokio::time::timeout(w.connect_timeout, join(&w, &path, history, inst)).await;
    drop(permit);
    let (c, last_seq) = match joined {
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
    let _ = w.ready.send(Ok(()));
    serve(w, c, last_seq, sender, inst).await;
}

/// A joined connection (to instance `inst`) until it closes: read and count
/// every frame, answer pings, and send this sender's share of each step.
pub(super) async fn serve(
    w: Rc<WCtx>,
    mut c: WsConn,
    mut last_seq: i64,
    sender: Option<u64>,
    inst: u8,
) {
    w.state.borrow_mut().status.alive += 1;
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
                        OP_TEXT => on_text(&mut st, w.has_seq, f.payload, now, &mut last_seq, inst),
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
                    let text = if w.addrs.len() > 1 {
                        format!(
                            "{{\"content\":\"L{} {} {} {} i{inst} {}\"}}",
                            p.step,
                            sender.unwrap_or(0),
                            m,
                            t,
                            w.pad
                        )
                    } else {
                        format!(
                            "{{\"content\":\"L{} {} {} {} {}\"}}",
                            p.step,
                            sender.unwrap_or(0),
                            m,
                            t,
                            w.pad
                        )
                    };
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
