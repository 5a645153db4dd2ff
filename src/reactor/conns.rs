//! The connections: the `mio::Poll`, the listener, and the slab of open
//! connections whose keys are their tokens. This part owns accepting (and
//! pausing the listener when descriptors run out), dropping a connection,
//! and writing what is queued to one: the flush list of a pass, writable
//! interest, and the half-close and linger of a connection that is closing.
//!
//! Called by the pass in `mod.rs` (socket events, the end-of-pass flush), by
//! every step that queues output (`schedule_flush`), and by the steps that
//! drop a connection. A connection's protocol state lives in `http_conn.rs`
//! and `ws_conn.rs`; only the socket and its queue are handled here.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;

use super::fanout;
use super::http_conn::HttpConn;
use super::ws_conn::WsConn;
use crate::config::Config;
use crate::http::ResponseHeaders;
use crate::metrics::Counters;
use crate::outbuf::OutBuf;
use crate::rooms::{ConnRef, Rooms};
use crate::ws;

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const WAKER: Token = Token(usize::MAX - 2);

/// Messages (or requests) handled for one connection before others get a turn.
pub(super) const TURN_BUDGET: usize = 64;
/// Largest single read.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// How long a closing connection may take to hang up.
pub(super) const LINGER: Duration = Duration::from_secs(5);
/// Accept backlog: room for a burst of connects (load tests open thousands
/// at once); the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

pub(super) enum Kind {
    Http(Box<HttpConn>),
    Ws(Box<WsConn>),
    /// Only while an entry changes from HTTP to WebSocket.
    Upgrading,
}

pub(super) struct Conn {
    pub(super) id: u64,
    /// Its input bytes as last counted into `Conns::inputs` ([`Conns::settle`]).
    inputs: usize,
    /// Registered for writable events (output is waiting on the socket).
    want_write: bool,
    /// In the flush list.
    queued: bool,
    pub(super) kind: Kind,
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

    /// Input bytes it holds: an HTTP connection's buffer; what tungstenite
    /// holds of a WebSocket's input, and the slots of the frames a joining
    /// member keeps until its history is out (the frames are counted as
    /// queued chunks).
    fn input_bytes(&self) -> usize {
        match &self.kind {
            Kind::Http(h) => h.inbuf.capacity(),
            Kind::Ws(w) => w.ws.get_ref().input.held() + w.waiting_slots(),
            Kind::Upgrading => 0,
        }
    }

    /// Bytes it holds, or keeps alive: its input, and every chunk in its
    /// queue or kept while joining in full (shared or not). The memory budget closes the
    /// connections with the most first.
    pub(super) fn held(&self) -> usize {
        let out = match &self.kind {
            Kind::Http(h) => h.out.len(),
            Kind::Ws(w) => w.ws.get_ref().out.len() + w.waiting_bytes(),
            Kind::Upgrading => 0,
        };
        self.inputs + out
    }
}

/// When output just queued to a connection leaves.
pub(super) enum Scheduled {
    /// In this pass's flush (or never: the connection is gone).
    ThisPass,
    /// Its socket was full when last written: after its writable event.
    WhenWritable,
}

pub(super) struct Conns {
    /// The configuration, read by every connection step.
    pub(super) cfg: Arc<Config>,
    /// Headers every HTTP answer carries.
    pub(super) headers: ResponseHeaders,
    /// Limits of a WebSocket once upgraded.
    pub(super) ws_config: WebSocketConfig,
    /// What happened to connections and their messages, for `/metrics`.
    pub(super) counters: Counters,
    poll: Poll,
    /// Registered with `poll` for as long as the loop runs.
    _waker: Arc<Waker>,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    accept_paused: bool,
    slab: Slab<Conn>,
    next_id: u64,
    /// The connections' input bytes, as last settled.
    inputs: usize,
    /// Connections with output queued in this pass, written at its end.
    flush_list: Vec<usize>,
    /// Connections that stopped early to let others run.
    again: Vec<usize>,
}

impl Conns {
    /// Bind the listener and register it, and a waker for the workers, with a
    /// new poll.
    pub(super) fn bind(cfg: Arc<Config>, addr: SocketAddr) -> io::Result<(Conns, Arc<Waker>)> {
        let poll = Poll::new()?;
        let mut listener = bind_listener(addr, cfg.reuse_port)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let conns = Conns {
            headers: ResponseHeaders {
                cors_origin: cfg.cors_origin.clone(),
            },
            ws_config: ws::config(cfg.ws_max_message),
            counters: Counters::default(),
            cfg,
            poll,
            _waker: waker.clone(),
            listener: Some(listener),
            local_addr,
            accept_paused: false,
            slab: Slab::with_capacity(1024),
            next_id: 0,
            inputs: 0,
            flush_list: Vec::new(),
            again: Vec::new(),
        };
        Ok((conns, waker))
    }

    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Wait up to `timeout` for socket events; an interrupted wait is an
    /// empty one.
    pub(super) fn poll(&mut self, events: &mut Events, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            other => other,
        }
    }

    /// Connections wait to be written or continued: the next pass must not
    /// sleep.
    pub(super) fn has_work(&self) -> bool {
        !self.again.is_empty() || !self.flush_list.is_empty()
    }

    // ----- accepting -----------------------------------------------------

    pub(super) fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut sock, _peer)) => {
                    let _ = sock.set_nodelay(true);
                    let entry = self.slab.vacant_entry();
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
                    let deadline = Instant::now() + self.cfg.http_header_timeout;
                    entry.insert(Conn {
                        id: self.next_id,
                        inputs: 0,
                        want_write: false,
                        queued: false,
                        kind: Kind::Http(Box::new(HttpConn::new(sock, deadline))),
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
            self.slab.len()
        );
    }

    /// Poll the listener again after a pause (a no-op without one).
    pub(super) fn resume_accepting(&mut self) {
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

    /// Close the listener for good (shutdown).
    pub(super) fn stop_accepting(&mut self) {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
    }

    // ----- the slab ------------------------------------------------------

    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub(super) fn kind(&self, token: usize) -> Option<&Kind> {
        self.slab.get(token).map(|c| &c.kind)
    }

    pub(super) fn get(&self, token: usize) -> Option<&Conn> {
        self.slab.get(token)
    }

    pub(super) fn get_mut(&mut self, token: usize) -> Option<&mut Conn> {
        self.slab.get_mut(token)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut Conn)> {
        self.slab.iter_mut()
    }

    /// The tokens of the connections for which `pick` is true.
    pub(super) fn tokens_where(&self, pick: impl Fn(&Kind) -> bool) -> Vec<usize> {
        self.slab
            .iter()
            .filter(|(_, c)| pick(&c.kind))
            .map(|(t, _)| t)
            .collect()
    }

    pub(super) fn http_mut(&mut self, token: usize) -> Option<&mut HttpConn> {
        match self.slab.get_mut(token).map(|c| &mut c.kind) {
            Some(Kind::Http(h)) => Some(h),
            _ => None,
        }
    }

    pub(super) fn ws_mut(&mut self, token: usize) -> Option<&mut WsConn> {
        match self.slab.get_mut(token).map(|c| &mut c.kind) {
            Some(Kind::Ws(w)) => Some(w),
            _ => None,
        }
    }

    pub(super) fn conn_ref(&self, token: usize) -> Option<ConnRef> {
        self.slab.get(token).map(|c| ConnRef { token, id: c.id })
    }

    /// The connection `r` names is still open (its token was not reused).
    pub(super) fn live(&self, r: ConnRef) -> bool {
        self.slab.get(r.token).is_some_and(|c| c.id == r.id)
    }

    /// Forget a connection now (its socket closes when dropped); a
    /// WebSocket member leaves its room.
    #[track_caller]
    pub(super) fn drop(&mut self, rooms: &mut Rooms, token: usize) {
        let Some(conn) = self.slab.try_remove(token) else {
            return;
        };
        log::debug!(
            "connection {} (token {token}) dropped at {}",
            conn.id,
            std::panic::Location::caller()
        );
        self.counters.connections_closed += 1;
        self.inputs -= conn.inputs;
        match conn.kind {
            Kind::Http(_) => self.counters.http_connections -= 1,
            Kind::Ws(w) => {
                self.counters.ws_connections -= 1;
                if !w.is_closing() {
                    rooms.leave(w.room_key, w.member);
                }
            }
            Kind::Upgrading => {}
        }
        if self.accept_paused {
            self.resume_accepting();
        }
    }

    /// Come back to `token` in the next pass: it stopped to let others run.
    pub(super) fn continue_later(&mut self, token: usize) {
        self.again.push(token);
    }

    /// The connections to continue in this pass.
    pub(super) fn take_again(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.again)
    }

    // ----- memory --------------------------------------------------------

    /// Bytes held by all connections' buffers: their input (as last
    /// settled) and their queues (counted as they change, shared chunks
    /// once: `crate::outbuf`).
    pub(super) fn client_memory(&self) -> usize {
        self.inputs + crate::outbuf::queued_bytes()
    }

    /// Count `token`'s input bytes again after they may have changed. Every
    /// step that reads input or queues output ends in `schedule_flush`,
    /// which settles; the few that do not call this themselves.
    pub(super) fn settle(&mut self, token: usize) {
        if let Some(c) = self.slab.get_mut(token) {
            let now = c.input_bytes();
            self.inputs = self.inputs - c.inputs + now;
            c.inputs = now;
        }
    }

    /// Each connection's token and [`Conn::held`] bytes, where not zero.
    pub(super) fn holders(&self) -> Vec<(usize, usize)> {
        self.slab
            .iter()
            .map(|(t, c)| (c.held(), t))
            .filter(|&(held, _)| held > 0)
            .collect()
    }

    // ----- writing -------------------------------------------------------

    /// Queue `token` for the end-of-pass flush, after something was queued
    /// to it. A connection whose socket was full when last written waits for
    /// its writable event instead; until then nothing queued to it leaves
    /// (`ws_conn::schedule_flush` holds a WebSocket's backlog against the
    /// limit then).
    pub(super) fn schedule_flush(&mut self, token: usize) -> Scheduled {
        self.settle(token);
        let Some(c) = self.slab.get_mut(token) else {
            return Scheduled::ThisPass;
        };
        if c.want_write {
            return Scheduled::WhenWritable;
        }
        if !c.queued {
            c.queued = true;
            self.flush_list.push(token);
        }
        Scheduled::ThisPass
    }

    /// The flush list of this pass, to be written (and given back).
    pub(super) fn take_flush_list(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.flush_list)
    }

    /// Give back the (drained) flush list: what was scheduled while it was
    /// being written waits for the next pass.
    pub(super) fn restore_flush_list(&mut self, list: Vec<usize>) {
        let newer = std::mem::replace(&mut self.flush_list, list);
        self.flush_list.extend(newer);
    }

    /// Write `token` if it is still waiting in the flush list. A connection
    /// dropped during the pass may have left its key to one accepted since:
    /// flush it here only if it is queued, once.
    pub(super) fn flush_queued(&mut self, rooms: &mut Rooms, token: usize) {
        if let Some(c) = self.slab.get_mut(token) {
            if c.queued {
                c.queued = false;
                self.flush(rooms, token);
            }
        }
    }

    /// Write what the socket takes; arrange a writable event for the rest.
    /// A failed write drops the connection; a WebSocket left with more unsent
    /// than its limit is closed as a slow consumer.
    pub(super) fn flush(&mut self, rooms: &mut Rooms, token: usize) {
        let Some(conn) = self.slab.get_mut(token) else {
            return;
        };
        let Some((sock, out)) = conn.io() else {
            return;
        };
        let drained = match out.write_to(sock) {
            Ok(d) => d,
            Err(_) => {
                self.drop(rooms, token);
                return;
            }
        };
        if !drained {
            if let Kind::Ws(w) = &conn.kind {
                if w.over_backlog(self.cfg.ws_max_backlog) && !w.is_closing() {
                    return fanout::close_slow_consumer(self, rooms, token);
                }
            }
        }
        if drained == conn.want_write {
            let interest = if drained {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let Some((sock, _)) = conn.io() else {
                return;
            };
            if self
                .poll
                .registry()
                .reregister(sock, Token(token), interest)
                .is_err()
            {
                self.drop(rooms, token);
                return;
            }
            conn.want_write = !drained;
        }
        if !drained {
            return;
        }
        // Everything is out: finish a close, or resume a paused pipeline.
        let again = match &mut conn.kind {
            Kind::Http(h) => h.sent_all(),
            Kind::Ws(w) => w.sent_all(),
            Kind::Upgrading => false,
        };
        if again {
            self.again.push(token);
        }
    }

    /// A closing connection: read and throw away what the peer sends until
    /// it hangs up, a turn's worth at a time, so that one that keeps sending
    /// gets no more of the loop than one that chats.
    pub(super) fn discard_input(&mut self, rooms: &mut Rooms, token: usize) {
        let Some((sock, _)) = self.slab.get_mut(token).and_then(Conn::io) else {
            return;
        };
        match discard(sock) {
            Discarded::Gone => self.drop(rooms, token),
            Discarded::All => {}
            Discarded::More => self.again.push(token),
        }
    }
}

/// What [`discard`] came to.
enum Discarded {
    /// The peer hung up (or the socket failed): drop the connection.
    Gone,
    /// Everything sent so far is read.
    All,
    /// A turn's worth was read and more may wait: come back next turn.
    More,
}

fn discard(sock: &mut TcpStream) -> Discarded {
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

/// A non-blocking listener with a deep accept backlog (`TcpListener::bind`
/// would leave it at 128, and a burst past that gets its SYNs dropped and
/// retried a second later). With `reuse_port` (`REUSE_PORT`) it sets
/// SO_REUSEPORT, so that several processes can listen on the same address
/// and the kernel spreads new connections over them; each of them must set
/// it, and a process without it still finds the port taken.
fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into()).map_err(|e| {
        if e.kind() != io::ErrorKind::AddrInUse {
            return e;
        }
        let hint = if reuse_port {
            "the process holding it did not set REUSE_PORT=true, or runs as another user"
        } else {
            "every process sharing a port needs REUSE_PORT=true"
        };
        io::Error::new(e.kind(), format!("{addr} is already in use ({hint})"))
    })?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}
