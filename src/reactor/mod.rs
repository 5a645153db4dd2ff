//! The event loop: one thread owns the listener, every connection and the
//! room registry, and never blocks.
//!
//! Lifecycle of a connection: accepted as HTTP (a `Slab` entry whose key is
//! its `mio::Token`), it reads requests and answers them in order; answers
//! that need the store or bcrypt are computed by a worker and arrive back as a
//! completion ([`Outcome`]) while the connection waits. A `GET /ws/{room}`
//! upgrade turns the same entry into a WebSocket: it joins its room as
//! *joining*, gets its history from a worker, then goes *live*. A closing
//! connection sends what is queued, shuts its write side, and lingers until
//! the peer hangs up or a deadline passes.
//!
//! This file holds the [`Reactor`], its parts, and [`Reactor::run`]: the
//! order of one pass. Each part and each concern has a file of its own, and
//! a step that needs several parts is given them as arguments:
//!
//! | file | owns |
//! |---|---|
//! | `conns.rs` | the poll, the listener and the connection slab: accepting, dropping, writing, lingering |
//! | `http_conn.rs` | HTTP requests in, answers out, the WebSocket upgrade |
//! | `ws_conn.rs` | WebSocket frames in, chat messages checked, the backlog limit, closes |
//! | `pipeline.rs` | group commit: pending messages to the store, stored batches back |
//! | `joins.rs` | a new member's history (the cache, shared room reads), then live |
//! | `relay.rs` | with a broker: batches of every process in seq order, gaps read from the store |
//! | `census.rs` | member counts for `GET /rooms`: this process's, plus the other processes' with a broker |
//! | `fanout.rs` | a stored batch queued to every member; slow consumers; closing a room |
//! | `completions.rs` | the worker lanes, and the one place finished work comes back |
//! | `timers.rs` | deadlines and pings |
//! | `budget.rs` | the memory budget of all connections together |
//! | `trim.rs` | giving freed memory back after a wave of closes |
//! | `shutdown.rs` | the graceful stop |
//! | `metrics_text.rs` | the `/metrics` page |
//!
//! The room registry is `crate::rooms`, the endpoints `crate::api`.
//! `docs/ARCHITECTURE.md` walks a chat message and a join through them.

mod budget;
mod census;
mod completions;
mod conns;
mod fanout;
mod http_conn;
mod joins;
mod metrics_text;
mod pipeline;
mod relay;
mod shutdown;
mod timers;
mod trim;
mod ws_conn;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Token, Waker};

use crate::api::Api;
use crate::auth::Tokens;
use crate::config::Config;
use crate::metrics::Shared;
use crate::presence::Presence;
use crate::rooms::Rooms;
use crate::store::Store;
use budget::Budget;
use census::Census;
use completions::{Completions, LaneSizes, Lanes};
use conns::{Conns, Kind, LISTENER, WAKER};
use joins::Joins;
use pipeline::Pipeline;
use relay::Relay;
use shutdown::Shutdown;
use trim::Trim;

pub use completions::{BatchOf, Outcome};
pub use joins::RESUME_LIMIT;

/// While writing to many sockets in one pass, look for finished store work
/// after this many.
const FLUSH_CHECK_EVERY: usize = 32;
/// While writing to many sockets in one pass, handle socket events this often.
/// Every 32 writes (about 0.25 ms) made batches so small that the extra
/// per-batch work cost more than it saved; 2 ms is about 256 writes.
const MID_PASS_POLL: Duration = Duration::from_millis(2);

pub struct Reactor {
    /// The poll, the listener and every connection (`conns.rs`).
    conns: Conns,
    /// The active rooms: members and group-commit state (`crate::rooms`).
    rooms: Rooms,
    /// Which rooms go to the store next, and the writes in flight
    /// (`pipeline.rs`).
    pipeline: Pipeline,
    /// Recent history in memory and the store reads of joins (`joins.rs`).
    joins: Joins,
    /// The worker lanes, and where their results come back
    /// (`completions.rs`).
    lanes: Lanes,
    completions: Completions,
    /// The endpoints (`crate::api`).
    api: Api,
    /// Whether, and since when, the server is stopping (`shutdown.rs`).
    shutdown: Shutdown,
    /// What the workers measure, for `/metrics`.
    shared: Arc<Shared>,
    /// How often deadlines are checked (`timers.rs`).
    tick: Duration,
    /// When freed memory was last given back (`trim.rs`).
    trim: Trim,
    /// The memory budget of all connections together (`budget.rs`).
    budget: Budget,
    /// Other processes' batches through the broker, in order (`relay.rs`).
    relay: Relay,
    /// Member counts of this and the other processes (`census.rs`).
    census: Census,
    /// Events buffer for taking socket events in the middle of a pass.
    mid_pass_events: Option<Events>,
}

impl Reactor {
    /// Bind the listener and start the worker lanes. `stop` is set (and the
    /// returned waker woken) by whoever wants the server to shut down.
    pub fn new(
        cfg: Config,
        store: Arc<dyn Store>,
        shared: Arc<Shared>,
        tokens: Tokens,
        presence: Arc<Presence>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<(Reactor, Arc<Waker>)> {
        let cfg = Arc::new(cfg);
        let addr = cfg
            .listen_addr()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (conns, waker) = Conns::bind(cfg.clone(), addr)?;
        let sizes = LaneSizes {
            hash: cfg.worker_count(),
            store: cfg.store_threads(),
            write: cfg.store_writers(),
        };
        let (lanes, completions) = completions::start(&sizes, store.clone(), &waker)?;
        let (broker, reporter) = match &cfg.broker_url {
            None => (None, None),
            Some(url) => {
                let (tx, wake) = (completions.sender(), waker.clone());
                let deliver = move |event| {
                    if tx.send(Outcome::Broker(event)).is_ok() {
                        let _ = wake.wake();
                    }
                };
                let (b, reporter) = crate::broker::Broker::start(url, &cfg.broker_prefix, deliver)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                log::info!(
                    "broker: {} (prefix {:?}); this process is {:016x}",
                    redacted(url),
                    cfg.broker_prefix,
                    b.id
                );
                (Some(b), Some(reporter))
            }
        };
        let reactor = Reactor {
            rooms: Rooms::default(),
            pipeline: Pipeline::new(&cfg, sizes.write, shared.clone(), presence.clone()),
            // Two reads per store thread keep every thread busy between passes.
            joins: Joins::new(&cfg, presence, sizes.store * 2),
            lanes,
            completions,
            api: Api::new(cfg.clone(), tokens),
            shutdown: Shutdown::new(stop, cfg.shutdown_timeout),
            shared,
            tick: timers::interval(&cfg),
            trim: Trim::new(),
            budget: Budget::new(cfg.max_client_memory),
            relay: Relay::new(broker, store),
            census: Census::new(reporter),
            mid_pass_events: Some(Events::with_capacity(1024)),
            conns,
        };
        Ok((reactor, waker))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.conns.local_addr()
    }

    /// Serve until asked to stop, then shut down gracefully.
    ///
    /// Each pass: handle readiness events, continue connections that had
    /// more input than one turn allows, apply completions, submit one store
    /// batch per room that has waiting messages and none in flight, flush
    /// every connection that got output, and every tick check deadlines.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let now = Instant::now();
            let timeout = if self.conns.has_work()
                || self.completions.more()
                || self.pipeline.can_submit()
                || self.joins.can_submit()
            {
                Duration::ZERO
            } else if self.shutdown.in_progress() || self.pipeline.waiting_to_write() {
                Duration::from_millis(20)
            } else {
                next_tick.saturating_duration_since(now)
            };
            self.conns.poll(&mut events, timeout)?;
            self.handle_events(&events);
            self.run_again();
            self.apply_completions();
            self.submit_work();
            self.flush_all();

            let now = Instant::now();
            self.relay.poll(&self.conns, &self.rooms, &self.lanes, now);
            self.budget.enforce(&mut self.conns, &mut self.rooms, now);
            if now >= next_tick {
                timers::on_tick(&mut self.conns, &mut self.rooms, now);
                self.relay.sweep(&self.rooms);
                self.census.on_tick(&self.rooms, now);
                self.flush_all();
                self.budget.enforce(&mut self.conns, &mut self.rooms, now);
                self.trim
                    .on_tick(self.conns.counters.connections_closed, now);
                next_tick = now + self.tick;
            }
            if self.shutdown.requested() {
                self.begin_shutdown();
            }
            if self.shutdown.in_progress() && self.shutdown_step() {
                break;
            }
        }
        log::info!("waiting for workers to finish");
        self.lanes.shutdown(self.shutdown.deadline());
        log::info!("stopped");
        Ok(())
    }

    fn handle_events(&mut self, events: &Events) {
        for event in events.iter() {
            match event.token() {
                LISTENER => self.conns.accept(),
                WAKER => {}
                Token(t) => {
                    if event.is_writable() {
                        self.conns.flush(&mut self.rooms, t);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.on_readable(t);
                    }
                }
            }
        }
    }

    /// Read a connection, then hold the connections to their memory budget
    /// at once (as Redis does after each client's read): what one read adds
    /// is the most the total can pass the budget by, however many
    /// connections are readable in this pass.
    fn on_readable(&mut self, token: usize) {
        if self.budget.hold_read(&self.conns, token) {
            return;
        }
        match self.conns.kind(token) {
            Some(Kind::Http(_)) => self.read_http(token),
            Some(Kind::Ws(_)) => ws_conn::read(
                &mut self.conns,
                &mut self.rooms,
                &mut self.pipeline,
                self.shutdown.in_progress(),
                token,
            ),
            Some(Kind::Upgrading) | None => return,
        }
        self.budget
            .enforce(&mut self.conns, &mut self.rooms, Instant::now());
    }

    /// Connections that stopped early to let others run.
    fn run_again(&mut self) {
        for token in self.conns.take_again() {
            self.on_readable(token);
        }
    }

    /// Write every connection that got output in this pass.
    ///
    /// Writing to every member of a big room takes tens of milliseconds.
    /// Every few milliseconds of it, the loop reads what clients sent
    /// meanwhile (so new messages go to the store now, not after the pass),
    /// and a batch the store finished is broadcast at once: the members not
    /// written yet (still queued) take it in this same write, the others in
    /// the next pass. Waiting for the end of the pass would cost every
    /// message up to two passes instead of one.
    fn flush_all(&mut self) {
        let mut list = self.conns.take_flush_list();
        let mut last_poll = Instant::now();
        for (i, token) in list.drain(..).enumerate() {
            if i % FLUSH_CHECK_EVERY == FLUSH_CHECK_EVERY - 1 {
                let now = Instant::now();
                if now - last_poll >= MID_PASS_POLL && !self.shutdown.in_progress() {
                    self.poll_now();
                    self.apply_completions();
                    self.submit_work();
                    // Counted from the end of that work, which can itself
                    // take milliseconds (a broadcast to thousands).
                    last_poll = Instant::now();
                } else if self.completions.waiting() {
                    self.apply_completions();
                    self.submit_work();
                }
            }
            self.conns.flush_queued(&mut self.rooms, token);
        }
        self.conns.restore_flush_list(list);
    }

    /// Hand the store what waits for it: message writes first, then reads.
    fn submit_work(&mut self) {
        self.pipeline.submit(&mut self.rooms, &self.lanes);
        self.joins.submit(&self.lanes);
    }

    /// Handle the socket events that are ready now, without waiting.
    fn poll_now(&mut self) {
        let Some(mut events) = self.mid_pass_events.take() else {
            return; // already inside a mid-pass poll
        };
        if self.conns.poll(&mut events, Duration::ZERO).is_ok() {
            self.handle_events(&events);
        }
        self.mid_pass_events = Some(events);
    }
}

/// A URL with its password hidden, for the log.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
