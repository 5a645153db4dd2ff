//! Every tick: the deadlines of HTTP requests, idle keep-alive connections
//! and lingering closes; WebSocket pings and idle closes.
//!
//! Called by the pass in `mod.rs` once per tick (its length is
//! [`interval`]).

use std::time::{Duration, Instant};

use super::conns::{Conns, Kind};
use super::http_conn::respond;
use super::ws_conn::{self, Phase};
use crate::config::Config;
use crate::http::Response;
use crate::rooms::Rooms;
use crate::ws::{self, close};

/// How often deadlines are checked: a quarter of the shortest of them,
/// between 50 ms and 1 s.
pub(super) fn interval(cfg: &Config) -> Duration {
    (cfg.ping_interval / 4)
        .min(cfg.http_header_timeout / 4)
        .min(cfg.http_idle_timeout / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Close what is past its deadline (408 for a request not received in
/// time), ping WebSockets due for one, and retry a paused listener.
pub(super) fn on_tick(conns: &mut Conns, rooms: &mut Rooms, now: Instant) {
    let ping = conns.cfg.ping_interval;
    let idle_limit = ping * 3;
    let mut timed_out = Vec::new();
    let mut gone = Vec::new();
    let mut idle = Vec::new();
    let mut pinged = Vec::new();
    for (token, conn) in conns.iter_mut() {
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
        conns.drop(rooms, token);
    }
    for token in timed_out {
        let mut resp = Response::error(408, "Request not received in time");
        resp.close = true;
        respond(conns, token, resp, false, false);
    }
    for token in idle {
        ws_conn::send_close(conns, rooms, token, close::GOING_AWAY, "idle timeout", true);
    }
    for token in pinged {
        ws_conn::schedule_flush(conns, rooms, token);
    }
    conns.resume_accepting();
}
