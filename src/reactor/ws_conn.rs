//! WebSocket connections: frames in, chat messages checked and handed to
//! their room's pending batch (`pipeline.rs`), error frames, the backlog
//! limit of a member that stops reading, and the closing handshake.
//!
//! Called by the pass in `mod.rs` for a readable WebSocket, and by every step
//! that tells a member something or closes it: fan-out, joins, the pipeline,
//! the timers and the shutdown.

use std::io;
use std::net::Shutdown;
use std::rc::Rc;
use std::time::Instant;

use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::{Message, WebSocket};

use super::conns::{Conns, Scheduled, LINGER, TURN_BUDGET};
use super::fanout;
use super::pipeline::Pipeline;
use crate::outbuf::{Chunk, Kept};
use crate::rooms::{ConnRef, Rooms};
use crate::ws::{self, close, Bucket, WsIo};

pub(super) enum Phase {
    /// Waiting for the history; live messages are kept here meanwhile.
    Joining {
        buffered: Vec<(i64, Kept)>,
        bytes: usize,
    },
    Live,
    /// A close frame is queued; `shut` once it has gone out.
    Closing {
        deadline: Instant,
        shut: bool,
    },
}

impl Phase {
    /// A close frame was just queued: the peer has `LINGER` to hang up.
    fn closing() -> Phase {
        Phase::Closing {
            deadline: Instant::now() + LINGER,
            shut: false,
        }
    }
}

pub(super) struct WsConn {
    pub(super) ws: WebSocket<WsIo>,
    pub(super) room_key: usize,
    pub(super) member: usize,
    pub(super) username: Rc<str>,
    pub(super) phase: Phase,
    pub(super) last_seen: Instant,
    pub(super) last_ping: Instant,
    bucket: Bucket,
    /// Queued history bytes that do not count as backlog (until the queue
    /// has drained once).
    pub(super) allowance: usize,
    /// Highest seq already sent by the join (history or buffer): a batch
    /// whose completion arrives after the history that already held it is
    /// not sent again.
    pub(super) sent_upto: i64,
}

impl WsConn {
    /// A member of room `room_key` (member key `member`), joining.
    pub(super) fn new(
        ws: WebSocket<WsIo>,
        room_key: usize,
        member: usize,
        username: &str,
        rate_burst: f64,
    ) -> WsConn {
        let now = Instant::now();
        WsConn {
            ws,
            room_key,
            member,
            username: Rc::from(username),
            phase: Phase::Joining {
                buffered: Vec::new(),
                bytes: 0,
            },
            last_seen: now,
            last_ping: now,
            bucket: Bucket::new(rate_burst, now),
            allowance: 0,
            sent_upto: i64::MIN,
        }
    }

    /// Bytes of the slots of the frames kept while joining (the frames
    /// themselves are counted as queued chunks are: `crate::outbuf`).
    pub(super) fn waiting_slots(&self) -> usize {
        match &self.phase {
            Phase::Joining { buffered, .. } => {
                buffered.capacity() * std::mem::size_of::<(i64, Kept)>()
            }
            _ => 0,
        }
    }

    /// Bytes of the frames kept while joining.
    pub(super) fn waiting_bytes(&self) -> usize {
        match &self.phase {
            Phase::Joining { bytes, .. } => *bytes,
            _ => 0,
        }
    }

    pub(super) fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    /// Its unsent bytes are over `limit` (the history of its join aside).
    pub(super) fn over_backlog(&self, limit: usize) -> bool {
        self.ws.get_ref().out.len() > limit + self.allowance
    }

    /// Everything queued is written: the history no longer counts aside, and
    /// a closing connection shuts its write side (once). True when it did,
    /// so that the connection is read until the peer hangs up.
    pub(super) fn sent_all(&mut self) -> bool {
        self.allowance = 0;
        if let Phase::Closing { shut, .. } = &mut self.phase {
            if !*shut {
                *shut = true;
                let _ = self.ws.get_ref().sock.shutdown(Shutdown::Write);
                return true;
            }
        }
        false
    }
}

/// A readable WebSocket: take its frames, a turn's worth at a time.
pub(super) fn read(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    shutting_down: bool,
    token: usize,
) {
    let mut budget = TURN_BUDGET;
    loop {
        let Some(w) = conns.ws_mut(token) else {
            return;
        };
        if w.is_closing() {
            return conns.discard_input(rooms, token);
        }
        if budget == 0 {
            conns.continue_later(token);
            break;
        }
        match w.ws.read() {
            Ok(msg) => {
                w.ws.get_mut().input.message_taken();
                w.last_seen = Instant::now();
                budget -= 1;
                match msg {
                    Message::Text(text) => {
                        if !shutting_down {
                            on_text(conns, rooms, pipeline, token, text.as_str());
                        }
                        // Shutting down: not accepted, not acknowledged; the
                        // client sees 1001 next.
                    }
                    Message::Binary(_) => {
                        return send_close(
                            conns,
                            rooms,
                            token,
                            close::UNSUPPORTED,
                            "binary frames are not supported",
                            false,
                        )
                    }
                    Message::Close(_) => {
                        // tungstenite queued its reply; send it and hang up.
                        let _ = w.ws.flush();
                        leave_room(conns, rooms, token);
                        if let Some(w) = conns.ws_mut(token) {
                            w.phase = Phase::closing();
                        }
                        schedule_flush(conns, rooms, token);
                        return;
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(WsError::Capacity(_)) => {
                return send_close(
                    conns,
                    rooms,
                    token,
                    close::TOO_BIG,
                    "message too big",
                    false,
                )
            }
            Err(WsError::Utf8(_)) => {
                return send_close(
                    conns,
                    rooms,
                    token,
                    close::INVALID_DATA,
                    "text frame is not valid UTF-8",
                    false,
                )
            }
            Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return conns.drop(rooms, token)
            }
            Err(WsError::Protocol(p)) => {
                log::debug!("websocket protocol violation: {p}");
                return send_close(
                    conns,
                    rooms,
                    token,
                    close::PROTOCOL,
                    "protocol violation",
                    false,
                );
            }
            Err(_) => return conns.drop(rooms, token),
        }
    }
    // Pongs tungstenite owes go into the queue.
    if let Some(w) = conns.ws_mut(token) {
        let _ = w.ws.flush();
    }
    schedule_flush(conns, rooms, token);
}

/// A chat message from member `token`: checked, then handed to its room's
/// pending batch, or refused with an error frame.
fn on_text(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    token: usize,
    text: &str,
) {
    let now = Instant::now();
    let (rate, burst) = (conns.cfg.ws_rate_limit, conns.cfg.ws_rate_burst);
    let max_chars = conns.cfg.max_message_chars;
    let Some(w) = conns.ws_mut(token) else {
        return;
    };
    if !w.bucket.allow(now, rate, burst) {
        return refuse(
            conns,
            rooms,
            token,
            "rate_limited",
            "too many messages; slow down (message not stored)",
        );
    }
    let content = match parse_content(text) {
        Ok(c) => c,
        Err(why) => return refuse(conns, rooms, token, "invalid_json", why),
    };
    if content.trim().is_empty() {
        return refuse(
            conns,
            rooms,
            token,
            "empty_content",
            "content must not be empty",
        );
    }
    if content.chars().count() > max_chars {
        let why = format!("content must be at most {max_chars} characters");
        return refuse(conns, rooms, token, "too_long", &why);
    }
    let (room_key, username) = (w.room_key, w.username.to_string());
    let Some(sender) = conns.conn_ref(token) else {
        return;
    };
    if pipeline.accept(rooms, room_key, sender, username, content) {
        conns.counters.messages_received += 1;
    }
}

/// A chat message not accepted: counted, and the sender told why.
fn refuse(conns: &mut Conns, rooms: &mut Rooms, token: usize, code: &str, why: &str) {
    conns.counters.messages_rejected += 1;
    send_error(conns, rooms, token, code, why);
}

/// Queue WebSocket `token` for the end-of-pass flush, after something was
/// queued to it. One whose socket was full when last written waits for its
/// writable event instead; until then nothing queued to it leaves, so this
/// is where a WebSocket that stopped reading meets the backlog limit,
/// whatever filled it (pongs, error frames, history).
pub(super) fn schedule_flush(conns: &mut Conns, rooms: &mut Rooms, token: usize) {
    if schedule_over_backlog(conns, token) {
        fanout::close_slow_consumer(conns, rooms, token);
    }
}

/// [`Conns::schedule_flush`] for a WebSocket; true when it waits for its
/// socket with an unsent backlog over the limit (the caller closes it).
pub(super) fn schedule_over_backlog(conns: &mut Conns, token: usize) -> bool {
    match conns.schedule_flush(token) {
        Scheduled::ThisPass => false,
        Scheduled::WhenWritable => {
            let limit = conns.cfg.ws_max_backlog;
            conns.ws_mut(token).is_some_and(|w| w.over_backlog(limit))
        }
    }
}

/// Queue an error frame (`{"error": ...}`) to a member that is not closing.
pub(super) fn send_error(
    conns: &mut Conns,
    rooms: &mut Rooms,
    token: usize,
    code: &str,
    text: &str,
) {
    if let Some(w) = conns.ws_mut(token) {
        if !w.is_closing() {
            w.ws.get_mut()
                .out
                .push(Chunk::new(ws::error_frame(code, text)));
            schedule_flush(conns, rooms, token);
        }
    }
}

/// A `store_unavailable` frame to each live sender, once per sender.
pub(super) fn tell_not_stored(
    conns: &mut Conns,
    rooms: &mut Rooms,
    senders: Vec<ConnRef>,
    text: &str,
) {
    let mut told = std::collections::HashSet::new();
    for s in senders {
        if told.insert(s) && conns.live(s) {
            send_error(conns, rooms, s.token, "store_unavailable", text);
        }
    }
}

fn leave_room(conns: &mut Conns, rooms: &mut Rooms, token: usize) {
    if let Some(w) = conns.ws_mut(token) {
        if !w.is_closing() {
            rooms.leave(w.room_key, w.member);
        }
    }
}

/// Send a close frame and hang up once it is out; the member leaves its
/// room now. `discard` drops queued frames first (a slow consumer's
/// backlog).
pub(super) fn send_close(
    conns: &mut Conns,
    rooms: &mut Rooms,
    token: usize,
    code: u16,
    reason: &str,
    discard: bool,
) {
    leave_room(conns, rooms, token);
    let Some(w) = conns.ws_mut(token) else {
        return;
    };
    if w.is_closing() {
        return;
    }
    let out = &mut w.ws.get_mut().out;
    if discard {
        out.discard_unstarted();
    }
    out.push(Chunk::new(ws::close_frame(code, reason)));
    w.phase = Phase::closing();
    schedule_flush(conns, rooms, token);
}

/// The `content` of a client frame, or why there is none.
fn parse_content(text: &str) -> Result<String, &'static str> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| "message must be JSON: {\"content\": \"...\"}")?;
    match value {
        serde_json::Value::Object(mut map) => match map.remove("content") {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(_) => Err("content must be a string"),
            None => Err("message needs a content field"),
        },
        _ => Err("message must be a JSON object with a content field"),
    }
}
