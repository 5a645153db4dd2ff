//! WebSocket connections: frames in, chat messages checked and handed to
//! their room's pending batch, error frames, and the closing handshake.
//!
//! Called by the pass for a readable WebSocket, and by every step that tells
//! a member something or closes it: fan-out, joins, the pipeline, the timers
//! and the shutdown.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::{Message, WebSocket};

use super::conns::{discard_input, Discarded, Kind, LINGER, TURN_BUDGET};
use super::Reactor;
use crate::rooms::ConnRef;
use crate::ws::{self, close, Bucket, WsIo};

pub(super) enum Phase {
    /// Waiting for the history; live messages are kept here meanwhile.
    Joining {
        buffered: Vec<(i64, Rc<[u8]>)>,
        bytes: usize,
    },
    Live,
    /// A close frame is queued; `shut` once it has gone out.
    Closing {
        deadline: Instant,
        shut: bool,
    },
}

pub(super) struct WsConn {
    pub(super) ws: WebSocket<WsIo>,
    pub(super) room_key: usize,
    pub(super) member: usize,
    pub(super) username: Rc<str>,
    pub(super) phase: Phase,
    pub(super) last_seen: Instant,
    pub(super) last_ping: Instant,
    pub(super) bucket: Bucket,
    /// Queued history bytes that do not count as backlog (until the queue
    /// has drained once).
    pub(super) allowance: usize,
    /// Highest seq already sent by the join (history or buffer): a batch
    /// whose completion arrives after the history that already held it is
    /// not sent again.
    pub(super) sent_upto: i64,
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

impl Reactor {
    pub(super) fn ws_mut(&mut self, token: usize) -> Option<&mut WsConn> {
        match self.conns.get_mut(token).map(|c| &mut c.kind) {
            Some(Kind::Ws(w)) => Some(w),
            _ => None,
        }
    }

    pub(super) fn read_ws(&mut self, token: usize) {
        let mut budget = TURN_BUDGET;
        loop {
            let Some(w) = self.ws_mut(token) else {
                return;
            };
            if matches!(w.phase, Phase::Closing { .. }) {
                return self.drain_closing(token);
            }
            if budget == 0 {
                self.again.push(token);
                break;
            }
            match w.ws.read() {
                Ok(msg) => {
                    w.last_seen = Instant::now();
                    budget -= 1;
                    match msg {
                        Message::Text(text) => self.on_text(token, text.as_str()),
                        Message::Binary(_) => {
                            return self.ws_close(
                                token,
                                close::UNSUPPORTED,
                                "binary frames are not supported",
                                false,
                            )
                        }
                        Message::Close(_) => {
                            // tungstenite queued its reply; send it and hang up.
                            let _ = w.ws.flush();
                            self.leave_room(token);
                            if let Some(w) = self.ws_mut(token) {
                                w.phase = Phase::Closing {
                                    deadline: Instant::now() + LINGER,
                                    shut: false,
                                };
                            }
                            self.schedule_flush(token);
                            return;
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(WsError::Capacity(_)) => {
                    return self.ws_close(token, close::TOO_BIG, "message too big", false)
                }
                Err(WsError::Utf8(_)) => {
                    return self.ws_close(
                        token,
                        close::INVALID_DATA,
                        "text frame is not valid UTF-8",
                        false,
                    )
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    return self.drop_conn(token)
                }
                Err(WsError::Protocol(p)) => {
                    log::debug!("websocket protocol violation: {p}");
                    return self.ws_close(token, close::PROTOCOL, "protocol violation", false);
                }
                Err(_) => return self.drop_conn(token),
            }
        }
        // Pongs tungstenite owes go into the queue.
        if let Some(w) = self.ws_mut(token) {
            let _ = w.ws.flush();
        }
        self.schedule_flush(token);
    }

    /// A closing connection: discard input until the peer hangs up.
    fn drain_closing(&mut self, token: usize) {
        let Some(w) = self.ws_mut(token) else {
            return;
        };
        match discard_input(&mut w.ws.get_mut().sock) {
            Discarded::Gone => self.drop_conn(token),
            Discarded::All => {}
            Discarded::More => self.again.push(token),
        }
    }

    pub(super) fn send_error(&mut self, token: usize, code: &str, text: &str) {
        if let Some(w) = self.ws_mut(token) {
            if !matches!(w.phase, Phase::Closing { .. }) {
                w.ws.get_mut()
                    .out
                    .push(Rc::from(ws::error_frame(code, text)));
                self.schedule_flush(token);
            }
        }
    }

    fn on_text(&mut self, token: usize, text: &str) {
        if self.shutdown.in_progress() {
            return; // not accepted, not acknowledged: the client sees 1001 next
        }
        let now = Instant::now();
        let (rate, burst) = (self.cfg.ws_rate_limit, self.cfg.ws_rate_burst);
        let max_chars = self.cfg.max_message_chars;
        let Some(w) = self.ws_mut(token) else {
            return;
        };
        if !w.bucket.allow(now, rate, burst) {
            self.counters.messages_rejected += 1;
            return self.send_error(
                token,
                "rate_limited",
                "too many messages; slow down (message not stored)",
            );
        }
        let content = match parse_content(text) {
            Ok(c) => c,
            Err(why) => {
                self.counters.messages_rejected += 1;
                return self.send_error(token, "invalid_json", why);
            }
        };
        if content.trim().is_empty() {
            self.counters.messages_rejected += 1;
            return self.send_error(token, "empty_content", "content must not be empty");
        }
        if content.chars().count() > max_chars {
            self.counters.messages_rejected += 1;
            let why = format!("content must be at most {max_chars} characters");
            return self.send_error(token, "too_long", &why);
        }
        let Some(w) = self.ws_mut(token) else {
            return;
        };
        let (room_key, username) = (w.room_key, w.username.to_string());
        let Some(id) = self.conns.get(token).map(|c| c.id) else {
            return;
        };
        let sender = ConnRef { token, id };
        if self
            .pipeline
            .accept(&mut self.rooms, room_key, sender, username, content)
        {
            self.counters.messages_received += 1;
        }
    }

    fn leave_room(&mut self, token: usize) {
        if let Some(w) = self.ws_mut(token) {
            if !matches!(w.phase, Phase::Closing { .. }) {
                let (k, m) = (w.room_key, w.member);
                self.rooms.leave(k, m);
            }
        }
    }

    /// Send a close frame and hang up once it is out. `discard` drops queued
    /// frames first (a slow consumer's backlog).
    pub(super) fn ws_close(&mut self, token: usize, code: u16, reason: &str, discard: bool) {
        self.leave_room(token);
        let Some(w) = self.ws_mut(token) else {
            return;
        };
        if matches!(w.phase, Phase::Closing { .. }) {
            return;
        }
        let out = &mut w.ws.get_mut().out;
        if discard {
            out.discard_unstarted();
        }
        out.push(Rc::from(ws::close_frame(code, reason)));
        w.phase = Phase::Closing {
            deadline: Instant::now() + LINGER,
            shut: false,
        };
        self.schedule_flush(token);
    }

    /// A `store_unavailable` frame to each live sender, once per sender.
    pub(super) fn tell_not_stored(&mut self, senders: Vec<ConnRef>, text: &str) {
        let mut told = std::collections::HashSet::new();
        for s in senders {
            if told.insert(s) && self.live(s) {
                self.send_error(s.token, "store_unavailable", text);
            }
        }
    }
}
