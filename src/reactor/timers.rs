//! Every tick: the deadlines of HTTP requests, idle keep-alive connections
//! and lingering closes; WebSocket pings and idle closes.
//!
//! Called by the pass in `mod.rs` once per tick.

use std::time::Instant;

use super::conns::Kind;
use super::ws_conn::Phase;
use super::Reactor;
use crate::http::Response;
use crate::ws::{self, close};

impl Reactor {
    pub(super) fn on_tick(&mut self, now: Instant) {
        let ping = self.cfg.ping_interval;
        let idle_limit = ping * 3;
        let mut timed_out = Vec::new();
        let mut gone = Vec::new();
        let mut idle = Vec::new();
        let mut pinged = Vec::new();
        for (token, conn) in self.conns.iter_mut() {
            match &mut conn.kind {
                Kind::Http(h) => {
                    if h.awaiting.is_some() || now < h.deadline {
                        continue;
                    }
                    if h.idle || h.closing || h.lingering {
                        gone.push(token);
                    } else {
                        timed_out.push(token);
                    }
                }
                Kind::Ws(w) => match w.phase {
                    Phase::Closing { deadline, .. } => {
                        if now >= deadline {
                            gone.push(token);
                        }
                    }
                    Phase::Joining { .. } | Phase::Live => {
                        if now.saturating_duration_since(w.last_seen) >= idle_limit {
                            idle.push(token);
                        } else if now.saturating_duration_since(w.last_ping) >= ping {
                            w.last_ping = now;
                            w.ws.get_mut().out.push_bytes(&ws::PING_FRAME);
                            pinged.push(token);
                        }
                    }
                },
                Kind::Upgrading => {}
            }
        }
        for token in gone {
            self.drop_conn(token);
        }
        for token in timed_out {
            let mut resp = Response::error(408, "Request not received in time");
            resp.close = true;
            self.respond(token, resp, false, false);
        }
        for token in idle {
            self.ws_close(token, close::GOING_AWAY, "idle timeout", true);
        }
        for token in pinged {
            self.schedule_flush(token);
        }
        if self.accept_paused {
            self.resume_accepting();
        }
        self.flush_all();
    }
}
