//! The coordinator's side of the worker processes: start them and have
//! their members join (`Pool::start`), or arm them for a join storm
//! (`Pool::arm`, then `Go`), send them commands, collect one answer of a
//! kind from every worker.
//!
//! Used by the idle and joinstorm scenarios and the ramp (`ramp.rs`);
//! dropping the pool ends its workers (Quit, EOF, then a kill after 10 s).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Group, Spec, StormSpec, WorkerCmd, WorkerMsg};
use crate::cli::{Ctx, Kind};
use crate::sys::cpu_secs;

/// How the members of a pool joined.
pub struct Joined {
    pub ok: u64,
    pub failed: u64,
    /// The first worker's first error, if any failed.
    pub first_error: Option<String>,
    /// From the first spec sent to the last worker ready.
    pub secs: f64,
}

/// The coordinator's handle on its worker processes.
pub struct Pool {
    kids: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::Receiver<(usize, String)>,
}

impl Pool {
    /// One worker per entry of `groups`, each told to join those members
    /// (`idle`: free their read buffers once joined; `size`: length of the
    /// messages they send); returns once every worker has reported its
    /// connections joined or failed (90 s, plus 1 s per 200 connections).
    /// `--concurrency` handshakes are in flight over all the workers.
    pub fn start(
        ctx: &Ctx,
        groups: &[Vec<Group>],
        idle: bool,
        size: usize,
    ) -> Result<(Pool, Joined), String> {
        let concurrency: usize = ctx.opts.num("concurrency", 96, 96);
        let conns: u64 = groups.iter().flatten().map(|g| g.count as u64).sum();
        let mut pool = Pool::spawn(groups.len())?;
        let t0 = Instant::now();
        for (w, g) in groups.iter().enumerate() {
            let spec = Spec {
                addr: ctx.addr,
                addrs: if ctx.cluster() {
                    ctx.addrs.clone()
                } else {
                    Vec::new()
                },
                has_seq: ctx.kind != Kind::Floor,
                concurrency: concurrency.div_ceil(groups.len()),
                connect_timeout_s: 60.0,
                idle,
                size,
                groups: g.clone(),
                storm: None,
            };
            pool.send(w, &spec)?;
        }
        let ready = pool.collect("ready", Duration::from_secs(90 + conns / 200))?;
        let mut joined = Joined {
            ok: 0,
            failed: 0,
            first_error: None,
            secs: t0.elapsed().as_secs_f64(),
        };
        for m in &ready {
            if let WorkerMsg::Ready {
                ok, failed, error, ..
            } = m
            {
                joined.ok += ok;
                joined.failed += failed;
                if joined.first_error.is_none() {
                    joined.first_error = error.clone();
                }
            }
        }
        Ok((pool, joined))
    }

    /// One worker per entry of `groups`, each given its share of a join
    /// storm and `concurrency` connect slots (its share of the storm's cap);
    /// returns once every worker has answered `Armed`. Nothing is opened
    /// before `Go`.
    pub fn arm(
        ctx: &Ctx,
        groups: &[Vec<Group>],
        storm: StormSpec,
        concurrency: usize,
        connect_timeout_s: f64,
    ) -> Result<Pool, String> {
        let mut pool = Pool::spawn(groups.len())?;
        for (w, g) in groups.iter().enumerate() {
            let spec = Spec {
                addr: ctx.addr,
                addrs: Vec::new(),
                has_seq: ctx.kind != Kind::Floor,
                concurrency,
                connect_timeout_s,
                idle: true,
                size: 64,
                groups: g.clone(),
                storm: Some(storm),
            };
            pool.send(w, &spec)?;
        }
        pool.collect("armed", Duration::from_secs(30))?;
        Ok(pool)
    }

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

    pub fn send<T: Serialize>(&mut self, i: usize, msg: &T) -> Result<(), String> {
        let line = serde_json::to_string(msg).map_err(|e| e.to_string())?;
        let w = &mut self.stdins[i];
        writeln!(w, "{line}")
            .and_then(|_| w.flush())
            .map_err(|e| format!("worker {i} is gone: {e}"))
    }

    pub fn send_all<T: Serialize>(&mut self, msg: &T) -> Result<(), String> {
        for i in 0..self.stdins.len() {
            self.send(i, msg)?;
        }
        Ok(())
    }

    /// One message of kind `want` from every worker, within `timeout`.
    pub fn collect(&self, want: &str, timeout: Duration) -> Result<Vec<WorkerMsg>, String> {
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

    pub fn cpu_secs(&self) -> f64 {
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
