//! HTTP connections: reading requests, parsing them in order, handing each
//! to the endpoints (`crate::api`), queuing the answers, and the upgrade
//! that turns the connection into a WebSocket.
//!
//! Called by the pass for a readable HTTP socket, by completions when a
//! worker has computed an answer, and by the timers and the shutdown for the
//! answers they give (408, 503).

use std::io::{self, Read};
use std::rc::Rc;
use std::time::Instant;

use mio::net::TcpStream;
use tungstenite::protocol::Role;
use tungstenite::WebSocket;

use super::completions::Outcome;
use super::conns::{discard_input, Discarded, Kind, READ_CHUNK, TURN_BUDGET};
use super::joins::RESUME_LIMIT;
use super::ws_conn::{Phase, WsConn};
use super::Reactor;
use crate::api::{Action, Upgrade};
use crate::http::{self, Parsed, Request, Response};
use crate::outbuf::OutBuf;
use crate::rooms::ConnRef;
use crate::store::{Room, Store};
use crate::workers::Job;
use crate::ws::{self, Bucket, WsIo};

/// A connection's unsent response bytes above which no further pipelined
/// request is parsed until the peer reads.
const HTTP_OUT_HIGH_WATER: usize = 1 << 20;

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
    pub(super) peer_eof: bool,
    pub(super) continue_sent: bool,
    pub(super) read_paused: bool,
}

impl Reactor {
    pub(super) fn http_mut(&mut self, token: usize) -> Option<&mut HttpConn> {
        match self.conns.get_mut(token).map(|c| &mut c.kind) {
            Some(Kind::Http(h)) => Some(h),
            _ => None,
        }
    }

    pub(super) fn read_http(&mut self, token: usize) {
        let cap = self.cfg.http_max_head + self.cfg.http_max_body + READ_CHUNK;
        let header_timeout = self.cfg.http_header_timeout;
        let Some(h) = self.http_mut(token) else {
            return;
        };
        if h.lingering {
            // Discard until the peer hangs up.
            return match discard_input(&mut h.sock) {
                Discarded::Gone => self.drop_conn(token),
                Discarded::All => {}
                Discarded::More => self.again.push(token),
            };
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
                Err(_) => return self.drop_conn(token),
            }
        }
        self.process_http(token);
    }

    /// Answer the buffered requests, in order, until one needs a worker.
    fn process_http(&mut self, token: usize) {
        let limits = http::Limits {
            max_head: self.cfg.http_max_head,
            max_body: self.cfg.http_max_body,
        };
        let mut budget = TURN_BUDGET;
        loop {
            let Some(h) = self.http_mut(token) else {
                return;
            };
            if h.awaiting.is_some() || h.closing || h.out.len() > HTTP_OUT_HIGH_WATER {
                break;
            }
            if budget == 0 {
                self.again.push(token);
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
                    self.respond(token, resp, false, false);
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
                        self.again.push(token);
                    }
                    self.counters.http_requests += 1;
                    self.dispatch(token, *req);
                }
            }
        }
        self.schedule_flush(token);
    }

    fn dispatch(&mut self, token: usize, req: Request) {
        let Some(conn) = self.conn_ref(token) else {
            return;
        };
        let head_only = req.method == "HEAD";
        let shutting_down = self.shutdown.in_progress();
        let keep_alive = req.keep_alive && !shutting_down;
        if shutting_down {
            let mut resp = Response::error(503, "Server is shutting down");
            resp.close = true;
            return self.respond(token, resp, false, head_only);
        }
        let action = self.api.route(conn, &req, &|| self.metrics_text());
        let (pool, job, deleting) = match action {
            Action::Reply(resp) => return self.respond(token, resp, keep_alive, head_only),
            Action::Upgrade(up) => return self.upgrade(token, req, up),
            Action::Hash(job) => (&self.lanes.hash, job, None),
            Action::Store(job) => (&self.lanes.store, job, None),
            Action::Delete { room, job } => (&self.lanes.store, job, Some(room)),
        };
        if pool.try_submit(job).is_err() {
            log::warn!("{} queue full; answering 503", pool.name());
            let resp = Response::error(503, "Server is busy; retry shortly");
            return self.respond(token, resp, keep_alive, head_only);
        }
        if let Some(room) = deleting {
            self.rooms.begin_delete(&room);
        }
        if let Some(h) = self.http_mut(token) {
            h.awaiting = Some((keep_alive, head_only));
        }
    }

    /// Queue a response on an HTTP connection.
    pub(super) fn respond(
        &mut self,
        token: usize,
        resp: Response,
        keep_alive: bool,
        head_only: bool,
    ) {
        let bytes = http::serialize(&resp, keep_alive, head_only, &self.headers);
        let header_timeout = self.cfg.http_header_timeout;
        let idle_timeout = self.cfg.http_idle_timeout;
        let Some(h) = self.http_mut(token) else {
            return;
        };
        h.out.push(Rc::from(bytes));
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
        self.schedule_flush(token);
    }

    /// Answer a waiting connection, then carry on with its pipeline.
    pub(super) fn complete_http(&mut self, conn: ConnRef, resp: Response) {
        if !self.live(conn) {
            return;
        }
        let Some(h) = self.http_mut(conn.token) else {
            return;
        };
        let Some((keep_alive, head_only)) = h.awaiting else {
            return;
        };
        self.respond(conn.token, resp, keep_alive, head_only);
        self.process_http(conn.token);
    }

    fn upgrade(&mut self, token: usize, req: Request, up: Upgrade) {
        let Some(conn) = self.conn_ref(token) else {
            return;
        };
        let fenced = self
            .rooms
            .key_of(&up.room)
            .and_then(|k| self.rooms.get(k))
            .is_some_and(|r| r.deleting > 0 || r.tombstone);
        if fenced {
            let resp = Response::error(503, "Room is being deleted; retry shortly");
            return self.respond(token, resp, false, false);
        }
        // Ask for the room and its history first: if the queue is full the
        // client gets a plain 503 instead of a socket that never joins.
        let history_limit = self.cfg.history_limit;
        let since = up.since;
        let room = Room {
            name: up.room.clone(),
            creator: up.username.clone(),
            created_at: ws::now_millis(),
        };
        let job: Job<Outcome> = Box::new(move |store: &dyn Store| {
            let mut since = since;
            let result = store.ensure_room(&room).and_then(|_| {
                if let Some(s) = since {
                    // A `since` past the room's newest message is no position
                    // in it (the client saw an earlier room of this name,
                    // deleted since): that client gets what a new member
                    // gets. The newest is read first; what is stored after
                    // that read reaches the member live.
                    let newest = store.messages_before(&room.name, None, 1)?;
                    if newest.last().map_or(0, |m| m.seq) >= s {
                        return store.messages_after(&room.name, s, RESUME_LIMIT);
                    }
                    since = None;
                }
                store.messages_before(&room.name, None, history_limit)
            });
            Outcome::Joined {
                conn,
                room: room.name,
                since,
                result,
            }
        });
        if self.lanes.store.try_submit(job).is_err() {
            let resp = Response::error(503, "Server is busy; retry shortly");
            return self.respond(token, resp, false, false);
        }

        let Some(entry) = self.conns.get_mut(token) else {
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
        drop(req);
        // Swap the HTTP state for the WebSocket state in the same slab entry.
        let Kind::Http(h) = std::mem::replace(&mut entry.kind, Kind::Upgrading) else {
            return;
        };
        let HttpConn {
            sock, inbuf, out, ..
        } = *h;
        let io = WsIo { sock, out };
        let socket = if inbuf.is_empty() {
            WebSocket::from_raw_socket(io, Role::Server, Some(self.ws_config))
        } else {
            WebSocket::from_partially_read(io, inbuf, Role::Server, Some(self.ws_config))
        };
        let (room_key, member) = self.rooms.join(&up.room, token);
        let now = Instant::now();
        entry.kind = Kind::Ws(Box::new(WsConn {
            ws: socket,
            room_key,
            member,
            username: Rc::from(up.username.as_str()),
            phase: Phase::Joining {
                buffered: Vec::new(),
                bytes: 0,
            },
            last_seen: now,
            last_ping: now,
            bucket: Bucket::new(self.cfg.ws_rate_burst, now),
            allowance: 0,
            sent_upto: i64::MIN,
        }));
        self.counters.http_connections -= 1;
        self.counters.ws_connections += 1;
        // Frames may have arrived with the upgrade request.
        self.again.push(token);
        self.schedule_flush(token);
    }
}
