//! The worker's side of a join storm (`loadgen joinstorm`): answer `Armed`,
//! wait for `Go`, then open every socket of the spec at once (or a capped
//! number at a time), each upgrading and checking the history it receives,
//! and report the outcome as one `Storm` message.
//!
//! Called by `process.rs` when the spec names a storm; joined sockets are
//! then served by `process::serve` like any other. The coordinator's side
//! is `scenarios/joinstorm.rs`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, Lines};

use super::process::{emit, serve, WCtx};
use super::{Spec, StormReport, StormSpec, WorkerCmd, WorkerMsg};
use crate::hist::Hist;
use crate::ws_client::{
    self, field_seq, field_str, mono_ns, refused_status, ws_path, WsConn, OP_CLOSE, OP_TEXT,
};
use crate::CONTENT;

/// How one socket's join ended.
enum Outcome {
    /// Upgraded and its history complete (at `joined_ns`); `exact` when
    /// that history was what it should be.
    Joined {
        started_ns: u64,
        joined_ns: u64,
        exact: bool,
    },
    Refused(u16),
    Failed(String),
}

/// One socket's report to the worker: its outcome, the retries it took, and
/// when its last upgrade was answered 101 (0: never).
struct Done {
    outcome: Outcome,
    retries: u32,
    upgrade_ns: u64,
}

/// Arm, wait for `Go`, run the storm and emit its `Storm` report. Returns
/// when every socket joined or failed, or the storm's limit passed; the
/// joined sockets stay open (served by their tasks) until the worker ends.
pub(super) async fn run<R: AsyncBufRead + Unpin>(
    w: &Rc<WCtx>,
    spec: &Spec,
    storm: StormSpec,
    lines: &mut Lines<R>,
) {
    emit(&WorkerMsg::Armed);
    let start_ns = loop {
        match lines.next_line().await {
            Ok(Some(line)) => match serde_json::from_str::<WorkerCmd>(&line) {
                Ok(WorkerCmd::Go { start_ns }) => break start_ns,
                Ok(WorkerCmd::Quit) => std::process::exit(0),
                _ => eprintln!("worker: expected Go, got {line}"),
            },
            // The coordinator is gone: nothing to report to.
            _ => std::process::exit(0),
        }
    };
    let limit = w.instant_of(start_ns) + Duration::from_secs_f64(storm.limit_s);
    tokio::time::sleep_until(w.instant_of(start_ns)).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut total = 0u64;
    for g in &spec.groups {
        // The newest `history` of the `seeded` messages, oldest first.
        let first_seed = storm.seeded.saturating_sub(g.history);
        for i in 0..g.count {
            let path = ws_path(&g.room, &format!("{}{}", g.prefix, g.first + i as u64));
            tokio::task::spawn_local(storm_conn(
                w.clone(),
                path,
                g.history,
                first_seed,
                storm,
                limit,
                tx.clone(),
            ));
            total += 1;
        }
    }
    drop(tx);
    let mut rep = StormReport::default();
    let mut hist = Hist::default();
    let mut done = 0u64;
    // Every socket reports by the limit; a second more for the stragglers'
    // reports to arrive.
    while done < total {
        let msg = tokio::time::timeout_at(limit + Duration::from_secs(1), rx.recv()).await;
        let Ok(Some(d)) = msg else { break };
        done += 1;
        rep.retries += u64::from(d.retries);
        if d.upgrade_ns > 0 {
            rep.upgraded += 1;
            rep.last_upgrade_ns = rep.last_upgrade_ns.max(d.upgrade_ns);
        }
        match d.outcome {
            Outcome::Joined {
                started_ns,
                joined_ns,
                exact,
            } => {
                rep.joined += 1;
                rep.history_exact += u64::from(exact);
                rep.last_joined_ns = rep.last_joined_ns.max(joined_ns);
                hist.record(joined_ns.saturating_sub(started_ns) / 1000);
            }
            Outcome::Refused(code) => {
                *rep.refused.entry(code.to_string()).or_insert(0) += 1;
                rep.first_error
                    .get_or_insert_with(|| format!("upgrade refused with {code}"));
            }
            Outcome::Failed(e) => {
                rep.failed += 1;
                rep.first_error.get_or_insert(e);
            }
        }
    }
    if done < total {
        rep.failed += total - done;
        rep.first_error
            .get_or_insert_with(|| format!("{} sockets never reported", total - done));
    }
    rep.hist = hist.sparse();
    rep.max_us = hist.max;
    emit(&WorkerMsg::Storm(rep));
}

/// One socket of the storm: take a connect slot, upgrade (again after a
/// refusal while retries are left), read and check the history, report, and
/// once joined stay open. Everything ends by `limit`.
async fn storm_conn(
    w: Rc<WCtx>,
    path: String,
    history: u32,
    first_seed: u32,
    storm: StormSpec,
    limit: tokio::time::Instant,
    tx: tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let mut retries = 0;
    let upgraded = Cell::new(0u64);
    let attempt = async {
        let _permit = w.sem.acquire().await;
        let started_ns = mono_ns();
        let deadline = limit.min(tokio::time::Instant::now() + w.connect_timeout);
        let r = tokio::time::timeout_at(deadline, async {
            loop {
                match join_checked(&w, &path, history, first_seed, &upgraded).await {
                    Err(Outcome::Refused(_)) if retries < storm.retries => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(storm.retry_ms)).await;
                    }
                    r => return r,
                }
            }
        })
        .await;
        match r {
            Ok(r) => r.map(|(c, last_seq, exact)| {
                let joined = Outcome::Joined {
                    started_ns,
                    joined_ns: mono_ns(),
                    exact,
                };
                (c, last_seq, joined)
            }),
            Err(_) => Err(Outcome::Failed(format!(
                "not joined within {:?} (or by the storm's limit)",
                w.connect_timeout
            ))),
        }
    };
    let r = tokio::time::timeout_at(limit, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(Outcome::Failed(
                "no connect slot before the storm's limit".into(),
            ))
        });
    let upgrade_ns = upgraded.get();
    match r {
        Ok((c, last_seq, joined)) => {
            let _ = tx.send(Done {
                outcome: joined,
                retries,
                upgrade_ns,
            });
            serve(w, c, last_seq, None, 0).await;
        }
        Err(outcome) => {
            let _ = tx.send(Done {
                outcome,
                retries,
                upgrade_ns,
            });
        }
    }
}

/// Upgrade `path` (noting when the 101 came in `upgraded`) and read its
/// `history` frames, checking that they are the seeded messages
/// `first_seed..` in order with rising seqs: the connection, its last seq,
/// and whether the history was exact. A refusal or failure is the outcome
/// to report.
async fn join_checked(
    w: &WCtx,
    path: &str,
    history: u32,
    first_seed: u32,
    upgraded: &Cell<u64>,
) -> Result<(WsConn, i64, bool), Outcome> {
    let mut c = match ws_client::connect(w.addr, path).await {
        Ok(c) => c,
        Err(e) => {
            return Err(match refused_status(&e) {
                Some(code) => Outcome::Refused(code),
                None => Outcome::Failed(format!("connect: {e}")),
            })
        }
    };
    upgraded.set(mono_ns());
    let (mut got, mut last_seq, mut exact) = (0u32, 0i64, true);
    loop {
        while got < history {
            let f = match c.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(Outcome::Failed(format!("history: {e}"))),
            };
            match f.opcode {
                OP_TEXT => {
                    let want = format!("seed {}:", first_seed + got);
                    let content_ok = field_str(f.payload, CONTENT)
                        .is_some_and(|x| x.starts_with(want.as_bytes()));
                    let seq = field_seq(f.payload);
                    let seq_ok = !w.has_seq || seq.is_some_and(|s| s > last_seq);
                    exact &= content_ok && seq_ok;
                    if let Some(s) = seq {
                        last_seq = s;
                    }
                    got += 1;
                }
                OP_CLOSE => {
                    return Err(Outcome::Failed(format!(
                        "closed while joining ({:?})",
                        c.close_code
                    )))
                }
                _ => {}
            }
        }
        if got >= history {
            w.state.borrow_mut().status.history_frames += u64::from(got);
            return Ok((c, last_seq, exact));
        }
        match c.fill().await {
            Ok(0) => {
                return Err(Outcome::Failed(format!(
                    "closed after {got} of {history} history frames"
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Outcome::Failed(format!("read: {e}"))),
        }
    }
}
