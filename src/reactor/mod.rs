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
mod fanout;
mod http_conn;
mod joins;
mod metrics_text;
mod pipeline;
mod shutdown;
mod timers;
mod ws_conn;

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use crate::api::Api;
use crate::auth::Tokens;
use crate::config::Config;
use crate::http::ResponseHeaders;
use crate::metrics::{Counters, Shared};
use crate::outbuf::OutBuf;
use crate::rooms::{ConnRef, Rooms};
use crate::store::Store;
use crate::workers::Pool;
use crate::ws;
use http_conn::HttpConn;
use shutdown::ShutdownState;
use ws_conn::{Phase, WsConn};

use completions::QUEUE_CAPACITY;
pub use completions::{BatchOf, Outcome};
pub use joins::RESUME_LIMIT;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);

/// Messages (or requests) handled for one connection before others get a turn.
const TURN_BUDGET: usize = 64;
/// Largest single read.
const READ_CHUNK: usize = 16 * 1024;
/// How long a closing connection may take to hang up.
const LINGER: Duration = Duration::from_secs(5);
/// While writing to many sockets in one pass, look for finished store work
/// after this many.
const FLUSH_CHECK_EVERY: usize = 32;
/// While writing to many sockets in one pass, handle socket events this often.
/// Every 32 writes (about 0.25 ms) made batches so small that the extra
/// per-batch work cost more than it saved; 2 ms is about 256 writes.
const MID_PASS_POLL: Duration = Duration::from_millis(2);
enum Kind {
    Http(Box<HttpConn>),
    Ws(Box<WsConn>),
    /// Only while an entry changes from HTTP to WebSocket.
    Upgrading,
}

struct Conn {
    id: u64,
    /// Registered for writable events (output is waiting on the socket).
    want_write: bool,
    /// In the reactor's flush list.
    queued: bool,
    kind: Kind,
}

impl Conn {
    /// The socket and its queue.
    fn io(&mut self) -> Option<(&mut TcpStream, &mut OutBuf)> {
        match &mut self.kind {
            Kind::Http(h) => Some((&mut h.sock, &mut h.out)),
            Kind::Ws(w) => {
                let io = w.ws.get_mut();
                Some((&mut io.sock, &mut io.out))
            }
            Kind::Upgrading => None,
        }
    }
}

pub struct Reactor {
    cfg: Arc<Config>,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    accept_paused: bool,
    conns: Slab<Conn>,
    next_id: u64,
    rooms: Rooms,
    hash_pool: Pool<Outcome>,
    store_pool: Pool<Outcome>,
    done: Receiver<Outcome>,
    _waker: Arc<Waker>,
    api: Api,
    headers: ResponseHeaders,
    counters: Counters,
    shared: Arc<Shared>,
    ws_config: WebSocketConfig,
    flush_list: Vec<usize>,
    again: Vec<usize>,
    dirty_rooms: Vec<usize>,
    /// Store writes of messages submitted and not yet complete, and how many
    /// may be (the store lane's thread count).
    writes_inflight: usize,
    write_slots: usize,
    stop: Arc<AtomicBool>,
    shutdown: Option<ShutdownState>,
    more_done: bool,
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
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let workers = cfg.worker_count();
        let hash_pool = Pool::new(
            "hash",
            workers,
            QUEUE_CAPACITY,
            5,
            store.clone(),
            done_tx.clone(),
            waker.clone(),
        )?;
        let store_pool = Pool::new(
            "store",
            workers,
            QUEUE_CAPACITY,
            0,
            store,
            done_tx,
            waker.clone(),
        )?;
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
        let reactor = Reactor {
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            accept_paused: false,
            conns: Slab::with_capacity(1024),
            next_id: 0,
            rooms: Rooms::default(),
            hash_pool,
            store_pool,
            done: done_rx,
            _waker: waker.clone(),
            api,
            headers,
            counters: Counters::default(),
            shared,
            ws_config,
            flush_list: Vec::new(),
            again: Vec::new(),
            dirty_rooms: Vec::new(),
            writes_inflight: 0,
            write_slots: workers,
            stop,
            shutdown: None,
            more_done: false,
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
                || self.more_done
                || self.can_submit()
            {
                Duration::ZERO
            } else if self.shutdown.is_some() {
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
            self.submit_batches();
            self.flush_all();

            let now = Instant::now();
            if now >= next_tick {
                self.on_tick(now);
                next_tick = now + self.tick;
            }
            if self.shutdown.is_none() && self.stop.load(Ordering::SeqCst) {
                self.begin_shutdown();
            }
            if self.shutdown.is_some() && self.shutdown_step() {
                break;
            }
        }
        log::info!("waiting for workers to finish");
        let started = self
            .shutdown
            .as_ref()
            .map_or_else(Instant::now, |s| s.started);
        let deadline = started + self.cfg.shutdown_timeout;
        let Reactor {
            hash_pool,
            store_pool,
            ..
        } = self;
        hash_pool.shutdown(deadline);
        store_pool.shutdown(deadline);
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

    // ----- connections -------------------------------------------------

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut sock, _peer)) => {
                    let _ = sock.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let token = entry.key();
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut sock, Token(token), Interest::READABLE)
                    {
                        log::warn!("cannot register a new connection: {e}");
                        continue;
                    }
                    self.next_id += 1;
                    entry.insert(Conn {
                        id: self.next_id,
                        want_write: false,
                        queued: false,
                        kind: Kind::Http(Box::new(HttpConn {
                            sock,
                            inbuf: Vec::new(),
                            out: OutBuf::default(),
                            deadline: Instant::now() + self.cfg.http_header_timeout,
                            idle: false,
                            awaiting: None,
                            closing: false,
                            lingering: false,
                            peer_eof: false,
                            continue_sent: false,
                            read_paused: false,
                        })),
                    });
                    self.counters.http_connections += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE/ENFILE (and ENOBUFS/ENOMEM) leave the connection
                    // in the backlog, so the listener stays readable: stop
                    // polling it until a connection closes, or it would spin.
                    let exhausted = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    if exhausted {
                        self.pause_accepting(&e);
                    } else {
                        log::warn!("accept failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn pause_accepting(&mut self, e: &io::Error) {
        if self.accept_paused {
            return;
        }
        if let Some(l) = &mut self.listener {
            let _ = self.poll.registry().deregister(l);
        }
        self.accept_paused = true;
        self.counters.accept_pauses += 1;
        log::warn!(
            "accept paused: {e} ({} connections open); resuming when one closes",
            self.conns.len()
        );
    }

    fn resume_accepting(&mut self) {
        if !self.accept_paused {
            return;
        }
        if let Some(l) = &mut self.listener {
            if let Err(e) = self
                .poll
                .registry()
                .register(l, LISTENER, Interest::READABLE)
            {
                log::error!("cannot resume accepting: {e}");
                return;
            }
        }
        self.accept_paused = false;
        self.accept();
    }

    fn conn_ref(&self, token: usize) -> Option<ConnRef> {
        self.conns.get(token).map(|c| ConnRef { token, id: c.id })
    }

    fn live(&self, r: ConnRef) -> bool {
        self.conns.get(r.token).is_some_and(|c| c.id == r.id)
    }

    /// Forget a connection now (its socket closes when dropped).
    #[track_caller]
    fn drop_conn(&mut self, token: usize) {
        let Some(conn) = self.conns.try_remove(token) else {
            return;
        };
        log::debug!(
            "connection {} (token {token}) dropped at {}",
            conn.id,
            std::panic::Location::caller()
        );
        match conn.kind {
            Kind::Http(_) => self.counters.http_connections -= 1,
            Kind::Ws(w) => {
                self.counters.ws_connections -= 1;
                if !matches!(w.phase, Phase::Closing { .. }) {
                    self.rooms.leave(w.room_key, w.member);
                }
            }
            Kind::Upgrading => {}
        }
        if self.accept_paused {
            self.resume_accepting();
        }
    }

    /// Queue `token` for the end-of-pass flush, after something was queued
    /// to it. A connection whose socket was full when last written waits for
    /// its writable event instead; until then nothing queued to it leaves,
    /// so this is where a WebSocket that stopped reading meets the backlog
    /// limit, whatever filled it (pongs, error frames, broadcasts).
    fn schedule_flush(&mut self, token: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if !c.want_write {
            if !c.queued {
                c.queued = true;
                self.flush_list.push(token);
            }
            return;
        }
        if let Kind::Ws(w) = &c.kind {
            if w.ws.get_ref().out.len() > self.cfg.ws_max_backlog + w.allowance {
                self.close_slow_consumer(token);
            }
        }
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
                if now - last_poll >= MID_PASS_POLL && self.shutdown.is_none() {
                    self.poll_now();
                    self.apply_completions();
                    self.submit_batches();
                    // Counted from the end of that work, which can itself
                    // take milliseconds (a broadcast to thousands).
                    last_poll = Instant::now();
                } else if !self.done.is_empty() {
                    self.apply_completions();
                    self.submit_batches();
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

    /// Write what the socket takes; arrange a writable event for the rest.
    fn flush(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let Some((sock, out)) = conn.io() else {
            return;
        };
        let drained = match out.write_to(sock) {
            Ok(d) => d,
            Err(_) => {
                self.drop_conn(token);
                return;
            }
        };
        if !drained {
            if let Kind::Ws(w) = &conn.kind {
                let unsent = w.ws.get_ref().out.len();
                let limit = self.cfg.ws_max_backlog + w.allowance;
                if unsent > limit && !matches!(w.phase, Phase::Closing { .. }) {
                    return self.close_slow_consumer(token);
                }
            }
        }
        if drained == conn.want_write {
            let interest = if drained {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let registry: &Registry = self.poll.registry();
            let Some((sock, _)) = conn.io() else {
                return;
            };
            if registry.reregister(sock, Token(token), interest).is_err() {
                self.drop_conn(token);
                return;
            }
            conn.want_write = !drained;
        }
        if !drained {
            return;
        }
        // Everything is out: finish a close, or resume a paused pipeline.
        match &mut conn.kind {
            Kind::Http(h) => {
                if h.closing && !h.lingering {
                    h.lingering = true;
                    h.deadline = Instant::now() + LINGER;
                    let _ = h.sock.shutdown(Shutdown::Write);
                    self.again.push(token);
                } else if h.awaiting.is_none() && !h.inbuf.is_empty() && !h.closing {
                    self.again.push(token);
                }
            }
            Kind::Ws(w) => {
                w.allowance = 0;
                if let Phase::Closing { shut, .. } = &mut w.phase {
                    if !*shut {
                        *shut = true;
                        let _ = w.ws.get_ref().sock.shutdown(Shutdown::Write);
                        self.again.push(token);
                    }
                }
            }
            Kind::Upgrading => {}
        }
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

/// What [`discard_input`] came to.
enum Discarded {
    /// The peer hung up (or the socket failed): drop the connection.
    Gone,
    /// Everything sent so far is read.
    All,
    /// A turn's worth was read and more may wait: come back next turn.
    More,
}

/// Read and throw away what a closing peer sends, a turn's worth at a time,
/// so that one that keeps sending gets no more of the loop than one that
/// chats.
fn discard_input(sock: &mut TcpStream) -> Discarded {
    let mut chunk = [0u8; READ_CHUNK];
    for _ in 0..TURN_BUDGET {
        match sock.read(&mut chunk) {
            Ok(0) => return Discarded::Gone,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Discarded::All,
            Err(_) => return Discarded::Gone,
        }
    }
    Discarded::More
}

/// Accept backlog: room for a burst of connects (load tests open thousands
/// at once); the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener with a deep accept backlog (`TcpListener::bind`
/// would leave it at 128, and a burst past that gets its SYNs dropped and
/// retried a second later).
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}
