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
//! Each pass of the loop: handle readiness events, continue connections that
//! had more input than one turn allows, apply completions, submit one store
//! batch per room that has waiting messages and none in flight, flush every
//! connection that got output, and every tick check deadlines. A flush over
//! thousands of sockets stops every couple of milliseconds to handle socket
//! events and completions, so a message sent meanwhile need not wait for it.

mod completions;
mod conns;
mod fanout;
mod http_conn;
mod joins;
mod metrics_text;
mod pipeline;
mod shutdown;
mod timers;
mod ws_conn;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use crate::api::Api;
use crate::auth::Tokens;
use crate::config::Config;
use crate::http::ResponseHeaders;
use crate::metrics::{Counters, Shared};
use crate::rooms::Rooms;
use crate::store::Store;
use crate::ws;
use conns::{bind_listener, Conn, Kind, LISTENER, WAKER};
use pipeline::Pipeline;
use shutdown::Shutdown;

pub use completions::{BatchOf, Outcome};
use completions::{Completions, Lanes};
pub use joins::RESUME_LIMIT;

/// While writing to many sockets in one pass, look for finished store work
/// after this many.
const FLUSH_CHECK_EVERY: usize = 32;
/// While writing to many sockets in one pass, handle socket events this often.
/// Every 32 writes (about 0.25 ms) made batches so small that the extra
/// per-batch work cost more than it saved; 2 ms is about 256 writes.
const MID_PASS_POLL: Duration = Duration::from_millis(2);

pub struct Reactor {
    cfg: Arc<Config>,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    accept_paused: bool,
    conns: Slab<Conn>,
    next_id: u64,
    rooms: Rooms,
    /// The worker lanes, and where their results come back
    /// (`completions.rs`).
    lanes: Lanes,
    completions: Completions,
    _waker: Arc<Waker>,
    api: Api,
    headers: ResponseHeaders,
    counters: Counters,
    shared: Arc<Shared>,
    ws_config: WebSocketConfig,
    flush_list: Vec<usize>,
    again: Vec<usize>,
    /// Which rooms go to the store next, and the writes in flight
    /// (`pipeline.rs`).
    pipeline: Pipeline,
    /// Whether, and since when, the server is stopping (`shutdown.rs`).
    shutdown: Shutdown,
    tick: Duration,
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
        stop: Arc<AtomicBool>,
    ) -> io::Result<(Reactor, Arc<Waker>)> {
        let cfg = Arc::new(cfg);
        let addr = cfg
            .listen_addr()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let poll = Poll::new()?;
        let mut listener = bind_listener(addr)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let workers = cfg.worker_count();
        let (lanes, completions) = completions::start(workers, store, &waker)?;
        let ping = cfg.ping_interval;
        let tick = (ping / 4)
            .min(cfg.http_header_timeout / 4)
            .min(cfg.http_idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let ws_config = ws::config(cfg.ws_max_message);
        let headers = ResponseHeaders {
            cors_origin: cfg.cors_origin.clone(),
        };
        let api = Api::new(cfg.clone(), tokens);
        let shutdown = Shutdown::new(stop, cfg.shutdown_timeout);
        let pipeline = Pipeline::new(&cfg, workers, shared.clone());
        let reactor = Reactor {
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            accept_paused: false,
            conns: Slab::with_capacity(1024),
            next_id: 0,
            rooms: Rooms::default(),
            lanes,
            completions,
            _waker: waker.clone(),
            api,
            headers,
            counters: Counters::default(),
            shared,
            ws_config,
            flush_list: Vec::new(),
            again: Vec::new(),
            pipeline,
            shutdown,
            tick,
            mid_pass_events: Some(Events::with_capacity(1024)),
        };
        Ok((reactor, waker))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until asked to stop, then shut down gracefully.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let now = Instant::now();
            let timeout = if !self.again.is_empty()
                || !self.flush_list.is_empty()
                || self.completions.more()
                || self.pipeline.can_submit()
            {
                Duration::ZERO
            } else if self.shutdown.in_progress() {
                Duration::from_millis(20)
            } else {
                next_tick.saturating_duration_since(now)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.handle_events(&events);
            self.run_again();
            self.apply_completions();
            self.pipeline.submit(&mut self.rooms, &self.lanes);
            self.flush_all();

            let now = Instant::now();
            if now >= next_tick {
                self.on_tick(now);
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
                LISTENER => self.accept(),
                WAKER => {}
                Token(t) => {
                    if event.is_writable() {
                        self.flush(t);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        self.on_readable(t);
                    }
                }
            }
        }
    }

    /// Handle the socket events that are ready now, without waiting.
    fn poll_now(&mut self) {
        let Some(mut events) = self.mid_pass_events.take() else {
            return; // already inside a mid-pass poll
        };
        if self.poll.poll(&mut events, Some(Duration::ZERO)).is_ok() {
            self.handle_events(&events);
        }
        self.mid_pass_events = Some(events);
    }

    fn flush_all(&mut self) {
        let mut list = std::mem::take(&mut self.flush_list);
        let mut last_poll = Instant::now();
        for (i, token) in list.drain(..).enumerate() {
            // Writing to every member of a big room takes tens of
            // milliseconds. Every few milliseconds of it, the loop reads what
            // clients sent meanwhile (so new messages go to the store now,
            // not after the pass), and a batch the store finished is
            // broadcast at once: the members not written yet (still
            // `queued`) take it in this same write, the others in the next
            // pass. Waiting for the end of the pass would cost every message
            // up to two passes instead of one.
            if i % FLUSH_CHECK_EVERY == FLUSH_CHECK_EVERY - 1 {
                let now = Instant::now();
                if now - last_poll >= MID_PASS_POLL && !self.shutdown.in_progress() {
                    self.poll_now();
                    self.apply_completions();
                    self.pipeline.submit(&mut self.rooms, &self.lanes);
                    // Counted from the end of that work, which can itself
                    // take milliseconds (a broadcast to thousands).
                    last_poll = Instant::now();
                } else if self.completions.waiting() {
                    self.apply_completions();
                    self.pipeline.submit(&mut self.rooms, &self.lanes);
                }
            }
            // A connection dropped during the pass may have left its key to
            // one accepted since: flush it here only if it is queued, once.
            if let Some(c) = self.conns.get_mut(token) {
                if c.queued {
                    c.queued = false;
                    self.flush(token);
                }
            }
        }
        // What was scheduled during the pass waits for the next one.
        let newer = std::mem::replace(&mut self.flush_list, list);
        self.flush_list.extend(newer);
    }

    fn on_readable(&mut self, token: usize) {
        match self.conns.get(token).map(|c| &c.kind) {
            Some(Kind::Http(_)) => self.read_http(token),
            Some(Kind::Ws(_)) => self.read_ws(token),
            Some(Kind::Upgrading) | None => {}
        }
    }

    /// Connections that stopped early to let others run.
    fn run_again(&mut self) {
        let list = std::mem::take(&mut self.again);
        for token in list {
            self.on_readable(token);
        }
    }
}
