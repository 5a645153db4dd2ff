//! HTTP connections: reading requests, parsing them in order, handing each
//! to the endpoints (`crate::api`), queuing the answers, and the upgrade
//! that turns the connection into a WebSocket.
//!
//! Called by the pass in `mod.rs` for a readable HTTP socket, by
//! `completions.rs` when a worker has computed an answer, and by the timers
//! and the shutdown for the answers they give (408, 503).

use std::io::{self, Read};
use std::net::Shutdown;
use std::time::Instant;

use mio::net::TcpStream;
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::conns::{Conns, Kind, LINGER, READ_CHUNK, TURN_BUDGET};
use super::joins::{self, Joins};
use super::pipeline::Pipeline;
use super::ws_conn::{self, WsConn};
use super::Reactor;
use crate::api::{Action, Upgrade};
use crate::http::{self, Parsed, Request, Response};
use crate::outbuf::{Chunk, OutBuf};
use crate::rooms::{ConnRef, Rooms};
use crate::ws::WsIo;

/// A connection's unsent response bytes above which no further pipelined
/// request is parsed until the peer reads. With the input cap
/// (`HTTP_MAX_HEAD` + `HTTP_MAX_BODY` + one read), this bounds what a client
/// that pipelines and never reads can make the server hold. At 1 MiB, 500
/// such clients held 564 MiB; a peer that reads gets its answers as fast at
/// 64 KiB, which is more than a socket's send buffer takes at once.
const HTTP_OUT_HIGH_WATER: usize = 64 << 10;

pub(super) struct HttpConn {
    pub(super) sock: TcpStream,
    pub(super) inbuf: Vec<u8>,
    pub(super) out: OutBuf,
    /// When the request being read must be complete (or, when `idle`, when
    /// the idle keep-alive connection is closed).
    pub(super) deadline: Instant,
    pub(super) idle: bool,
    /// A worker is computing the answer: (keep-alive, HEAD).
    pub(super) awaiting: Option<(bool, bool)>,
    /// Close once the output is sent.
    pub(super) closing: bool,
    /// Write side shut, reading until the peer hangs up.
    pub(super) lingering: bool,
    peer_eof: bool,
    continue_sent: bool,
    read_paused: bool,
}

impl HttpConn {
    /// A connection just accepted; its first request is due by `deadline`.
    pub(super) fn new(sock: TcpStream, deadline: Instant) -> HttpConn {
        HttpConn {
            sock,
            inbuf: Vec::new(),
            out: OutBuf::default(),
            deadline,
            idle: false,
            awaiting: None,
            closing: false,
            lingering: false,
            peer_eof: false,
            continue_sent: false,
            read_paused: false,
        }
    }

    /// Everything queued is written: a closing connection shuts its write
    /// side and lingers. True when the connection has more to do in the next
    /// pass (wait for the hang-up, or parse pipelined requests).
    pub(super) fn sent_all(&mut self) -> bool {
        if self.closing && !self.lingering {
            self.lingering = true;
            self.deadline = Instant::now() + LINGER;
            let _ = self.sock.shutdown(Shutdown::Write);
            true
        } else {
            self.awaiting.is_none() && !self.inbuf.is_empty() && !self.closing
        }
    }
}

impl Reactor {
    /// A readable HTTP socket: read what arrived, then answer the requests
    /// it completes.
    pub(super) fn read_http(&mut self, token: usize) {
        if read_requests(&mut self.conns, &mut self.rooms, token) {
            self.process_http(token);
        }
    }

    /// Answer the buffered requests, in order, until one needs a worker.
    fn process_http(&mut self, token: usize) {
        let limits = http::Limits {
            max_head: self.conns.cfg.http_max_head,
            max_body: self.conns.cfg.http_max_body,
        };
        let mut budget = TURN_BUDGET;
        loop {
            let Some(h) = self.conns.http_mut(token) else {
                return;
            };
            if h.awaiting.is_some() || h.closing || h.out.len() > HTTP_OUT_HIGH_WATER {
                break;
            }
            if budget == 0 {
                self.conns.continue_later(token);
                break;
            }
            budget -= 1;
            if h.inbuf.is_empty() {
                if h.peer_eof {
                    h.closing = true;
                }
                break;
            }
            match http::parse(&h.inbuf, limits) {
                Parsed::Incomplete {
                    head_done,
                    expect_continue,
                } => {
                    if head_done && expect_continue && !h.continue_sent {
                        h.continue_sent = true;
                        h.out.push_bytes(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    if h.peer_eof {
                        h.closing = true;
                    }
                    break;
                }
                Parsed::Invalid(status, text) => {
                    let mut resp = Response::error(status, text);
                    resp.close = true;
                    h.inbuf = Vec::new();
                    respond(&mut self.conns, token, resp, false, false);
                    break;
                }
                Parsed::Complete(req, used) => {
                    h.inbuf.drain(..used);
                    if h.inbuf.is_empty() {
                        h.inbuf = Vec::new();
                    }
                    h.continue_sent = false;
                    if h.read_paused {
                        h.read_paused = false;
                        self.conns.continue_later(token);
                    }
                    self.conns.counters.http_requests += 1;
                    self.dispatch(token, *req);
                }
            }
        }
        self.conns.schedule_flush(token);
    }

    /// Carry out what the endpoints decide for one request: answer now, hand
    /// a job to a worker lane, or upgrade.
    fn dispatch(&mut self, token: usize, req: Request) {
        let Some(conn) = self.conns.conn_ref(token) else {
            return;
        };
        let head_only = req.method == "HEAD";
        let shutting_down = self.shutdown.in_progress();
        let keep_alive = req.keep_alive && !shutting_down;
        if shutting_down {
            let mut resp = Response::error(503, "Server is shutting down");
            resp.close = true;
            return respond(&mut self.conns, token, resp, false, head_only);
        }
        let action = self.api.route(conn, &req, &|| self.metrics_text());
        let (pool, job, deleting) = match action {
            Action::Reply(resp) => {
                return respond(&mut self.conns, token, resp, keep_alive, head_only)
            }
            Action::Upgrade(up) => {
                self.relay.want(&up.room);
                return upgrade(
                    &mut self.conns,
                    &mut self.rooms,
                    &mut self.pipeline,
                    &mut self.joins,
                    token,
                    up,
                );
            }
            Action::Hash(job) => (&self.lanes.hash, job, None),
            Action::Store(job) => (&self.lanes.store, job, None),
            Action::Delete { room, job } => (&self.lanes.store, job, Some(room)),
        };
        if pool.try_submit(job).is_err() {
            log::warn!("{} queue full; answering 503", pool.name());
            let resp = Response::error(503, "Server is busy; retry shortly");
            return respond(&mut self.conns, token, resp, keep_alive, head_only);
        }
        if let Some(room) = deleting {
            self.rooms.begin_delete(&room);
        }
        if let Some(h) = self.conns.http_mut(token) {
            h.awaiting = Some((keep_alive, head_only));
        }
    }

    /// Answer a waiting connection, then carry on with its pipeline.
    pub(super) fn complete_http(&mut self, conn: ConnRef, resp: Response) {
        if !self.conns.live(conn) {
            return;
        }
        let Some(h) = self.conns.http_mut(conn.token) else {
            return;
        };
        let Some((keep_alive, head_only)) = h.awaiting else {
            return;
        };
        respond(&mut self.conns, conn.token, resp, keep_alive, head_only);
        self.process_http(conn.token);
    }
}

/// Read what the socket has into the connection's buffer. False when there
/// is nothing to parse: the connection is lingering (its input is thrown
/// away) or gone.
fn read_requests(conns: &mut Conns, rooms: &mut Rooms, token: usize) -> bool {
    let cap = conns.cfg.http_max_head + conns.cfg.http_max_body + READ_CHUNK;
    let header_timeout = conns.cfg.http_header_timeout;
    let Some(h) = conns.http_mut(token) else {
        return false;
    };
    if h.lingering {
        // Discard until the peer hangs up.
        conns.discard_input(rooms, token);
        return false;
    }
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        if h.read_paused || h.peer_eof {
            break;
        }
        if h.inbuf.len() >= cap {
            h.read_paused = true;
            break;
        }
        match h.sock.read(&mut chunk) {
            Ok(0) => h.peer_eof = true,
            Ok(n) => {
                if h.idle {
                    h.idle = false;
                    h.deadline = Instant::now() + header_timeout;
                }
                h.inbuf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                conns.drop(rooms, token);
                return false;
            }
        }
    }
    true
}

/// Queue a response on an HTTP connection.
pub(super) fn respond(
    conns: &mut Conns,
    token: usize,
    resp: Response,
    keep_alive: bool,
    head_only: bool,
) {
    let bytes = http::serialize(&resp, keep_alive, head_only, &conns.headers);
    let header_timeout = conns.cfg.http_header_timeout;
    let idle_timeout = conns.cfg.http_idle_timeout;
    let Some(h) = conns.http_mut(token) else {
        return;
    };
    h.out.push(Chunk::new(bytes));
    h.awaiting = None;
    if !keep_alive || resp.close {
        h.closing = true;
    } else {
        let now = Instant::now();
        if h.inbuf.is_empty() {
            h.idle = true;
            h.deadline = now + idle_timeout;
        } else {
            h.deadline = now + header_timeout;
        }
    }
    conns.schedule_flush(token);
}

/// A WebSocket upgrade that passed the endpoint's checks: answer 101, turn
/// the connection into a member of its room, *joining* until its history is
/// out, and ask for the history (`joins.rs`: from memory, or a store read
/// that waits in the reactor, so a join is never refused for a busy store).
fn upgrade(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    joins: &mut Joins,
    token: usize,
    up: Upgrade,
) {
    let Some(conn) = conns.conn_ref(token) else {
        return;
    };
    let fenced = rooms
        .key_of(&up.room)
        .and_then(|k| rooms.get(k))
        .is_some_and(|r| r.deleting > 0 || r.tombstone);
    if fenced {
        let resp = Response::error(503, "Room is being deleted; retry shortly");
        return respond(conns, token, resp, false, false);
    }
    let ws_config = conns.ws_config;
    let rate_burst = conns.cfg.ws_rate_burst;
    let Some(entry) = conns.get_mut(token) else {
        return;
    };
    let Kind::Http(h) = &mut entry.kind else {
        return;
    };
    let handshake = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        up.accept
    );
    h.out.push_bytes(handshake.as_bytes());
    // Swap the HTTP state for the WebSocket state in the same slab entry.
    let Kind::Http(h) = std::mem::replace(&mut entry.kind, Kind::Upgrading) else {
        return;
    };
    let HttpConn {
        sock, inbuf, out, ..
    } = *h;
    let io = WsIo::new(sock, out, &inbuf);
    let socket = if inbuf.is_empty() {
        WebSocket::from_raw_socket(io, Role::Server, Some(ws_config))
    } else {
        WebSocket::from_partially_read(io, inbuf, Role::Server, Some(ws_config))
    };
    let (room_key, member) = rooms.join(&up.room, token);
    entry.kind = Kind::Ws(Box::new(WsConn::new(
        socket,
        room_key,
        member,
        &up.username,
        rate_burst,
    )));
    conns.counters.http_connections -= 1;
    conns.counters.ws_connections += 1;
    joins::begin(conns, rooms, pipeline, joins, conn, &up);
    // Frames may have arrived with the upgrade request.
    conns.continue_later(token);
    ws_conn::schedule_flush(conns, rooms, token);
}
