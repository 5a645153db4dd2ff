//! The connections: accepting (and pausing the listener when descriptors
//! run out), dropping a connection, and writing what is queued to one: the
//! flush list of a pass, writable interest, and the half-close and linger of
//! a connection that is closing.
//!
//! Called by the pass in `mod.rs` (socket events, the end-of-pass flush), by
//! every step that queues output (`schedule_flush`), and by the steps that
//! drop a connection.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use super::http_conn::HttpConn;
use super::ws_conn::{Phase, WsConn};
use super::Reactor;
use crate::outbuf::OutBuf;
use crate::rooms::ConnRef;

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const WAKER: Token = Token(usize::MAX - 2);
/// Messages (or requests) handled for one connection before others get a turn.
pub(super) const TURN_BUDGET: usize = 64;
/// Largest single read.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// How long a closing connection may take to hang up.
pub(super) const LINGER: Duration = Duration::from_secs(5);

pub(super) enum Kind {
    Http(Box<HttpConn>),
    Ws(Box<WsConn>),
    /// Only while an entry changes from HTTP to WebSocket.
    Upgrading,
}

pub(super) struct Conn {
    pub(super) id: u64,
    /// Registered for writable events (output is waiting on the socket).
    pub(super) want_write: bool,
    /// In the reactor's flush list.
    pub(super) queued: bool,
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
}

/// What [`discard_input`] came to.
pub(super) enum Discarded {
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
pub(super) fn discard_input(sock: &mut TcpStream) -> Discarded {
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
pub(super) fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Reactor {
    pub(super) fn accept(&mut self) {
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

    pub(super) fn conn_ref(&self, token: usize) -> Option<ConnRef> {
        self.conns.get(token).map(|c| ConnRef { token, id: c.id })
    }

    pub(super) fn live(&self, r: ConnRef) -> bool {
        self.conns.get(r.token).is_some_and(|c| c.id == r.id)
    }

    /// Forget a connection now (its socket closes when dropped).
    #[track_caller]
    pub(super) fn drop_conn(&mut self, token: usize) {
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
    pub(super) fn schedule_flush(&mut self, token: usize) {
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

    /// Write what the socket takes; arrange a writable event for the rest.
    pub(super) fn flush(&mut self, token: usize) {
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
}
