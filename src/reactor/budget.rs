//! The memory budget of all connections together (`MAX_CLIENT_MEMORY`),
//! enforced the way Redis enforces `maxmemory-clients`: when the bytes held
//! by every connection's buffers pass the budget, no connection is read
//! until the connections holding the most are closed and the total is back
//! under it.
//!
//! What is counted, and how it is kept exact, is in `conns.rs` (inputs,
//! settled as they change) and `crate::outbuf` (queues, counted as chunks
//! are queued and written; a chunk shared by many queues once). This part
//! owns the policy: when reads wait, who is closed, the log of an episode,
//! and the figures `/metrics` shows.
//!
//! Called by the pass in `mod.rs`: before a connection is read
//! ([`Budget::hold_read`]), and after every read and every flush
//! ([`Budget::enforce`]).

use std::time::{Duration, Instant};

use super::conns::{Conns, Kind};
use super::http_conn;
use super::ws_conn;
use crate::http::Response;
use crate::rooms::Rooms;
use crate::ws::close;

/// An episode ends once the total has stayed under the budget this long;
/// the next time over is a new one (and is logged again).
const CALM: Duration = Duration::from_secs(1);
/// Over the budget, connections are closed until the total is down to this
/// share of it (in eighths): closing only until just under would leave the
/// next pass over again, and the loop closing one connection per pass.
const LOW_WATER_EIGHTHS: usize = 7;

pub(super) struct Budget {
    /// Bytes allowed; 0 is no cap.
    limit: usize,
    /// Connections whose read waits for the total to come back under.
    paused: Vec<usize>,
    episode: Option<Episode>,
    /// Highest total seen at the end of a pass.
    pub(super) peak: usize,
    /// Connections closed for the budget.
    pub(super) closed: u64,
    /// Reads put off because the total was over.
    pub(super) read_pauses: u64,
}

/// One stretch of time over the budget, for its log lines.
struct Episode {
    started: Instant,
    last_over: Instant,
    highest: usize,
    closed_http: u64,
    closed_ws: u64,
}

impl Budget {
    pub(super) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            paused: Vec::new(),
            episode: None,
            peak: 0,
            closed: 0,
            read_pauses: 0,
        }
    }

    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    /// True when reading `token` must wait: the connections hold more than
    /// the budget, and this one holds at least its share (the mean). A
    /// connection holding less, such as a member that reads what it is
    /// sent, is read as usual: it is not what put the total over. A
    /// connection that waits is read again once [`Budget::enforce`] has
    /// brought the total back under.
    pub(super) fn hold_read(&mut self, conns: &Conns, token: usize) -> bool {
        if self.limit == 0 {
            return false;
        }
        let total = conns.client_memory();
        if total <= self.limit {
            return false;
        }
        let held = conns.get(token).map_or(0, |c| c.held());
        if held == 0 || held.saturating_mul(conns.len()) < total {
            return false;
        }
        self.paused.push(token);
        self.read_pauses += 1;
        true
    }

    /// After a flush: over the budget, close the connections that hold the
    /// most, biggest first, until the total is back under (to seven eighths
    /// of the budget); then let the reads that waited go on.
    pub(super) fn enforce(&mut self, conns: &mut Conns, rooms: &mut Rooms, now: Instant) {
        let total = conns.client_memory();
        self.peak = self.peak.max(total);
        if self.limit == 0 {
            return;
        }
        if total > self.limit {
            self.close_biggest(conns, rooms, total, now);
        } else if let Some(e) = &self.episode {
            if now.duration_since(e.last_over) >= CALM {
                log::warn!(
                    "client memory back under MAX_CLIENT_MEMORY ({} bytes) after {} ms: \
                     highest {} bytes; closed {} HTTP and {} WebSocket connections",
                    self.limit,
                    e.last_over.duration_since(e.started).as_millis(),
                    e.highest,
                    e.closed_http,
                    e.closed_ws
                );
                self.episode = None;
            }
        }
        // Whether or not closing got it under (nothing left to close), the
        // waiting reads go on: the next pass measures again.
        for token in self.paused.drain(..) {
            conns.continue_later(token);
        }
    }

    fn close_biggest(&mut self, conns: &mut Conns, rooms: &mut Rooms, total: usize, now: Instant) {
        let e = self.episode.get_or_insert_with(|| {
            log::warn!(
                "client memory {total} bytes is over MAX_CLIENT_MEMORY ({} bytes): \
                 closing the connections that hold the most",
                self.limit
            );
            Episode {
                started: now,
                last_over: now,
                highest: total,
                closed_http: 0,
                closed_ws: 0,
            }
        });
        e.last_over = now;
        e.highest = e.highest.max(total);
        let target = self.limit / 8 * LOW_WATER_EIGHTHS;
        let mut holders = conns.holders();
        holders.sort_unstable_by(|a, b| b.cmp(a));
        for (_, token) in holders {
            if conns.client_memory() <= target {
                break;
            }
            match conns.kind(token) {
                Some(Kind::Http(_)) => e.closed_http += 1,
                Some(Kind::Ws(_)) => e.closed_ws += 1,
                _ => continue,
            }
            self.closed += 1;
            evict(conns, rooms, token);
        }
    }
}

/// Close `token` for the budget and free what it holds: unsent output not
/// yet started is dropped, a 503 (HTTP) or a 1008 close (WebSocket) is
/// queued where the peer can still get it whole, and what the socket takes
/// now is written. A connection that still holds anything after that is
/// dropped at once.
fn evict(conns: &mut Conns, rooms: &mut Rooms, token: usize) {
    match conns.kind(token) {
        Some(Kind::Http(_)) => {
            let Some(h) = conns.http_mut(token) else {
                return;
            };
            h.inbuf = Vec::new();
            // A worker's late answer is not wanted any more.
            h.awaiting = None;
            h.out.discard_unstarted();
            if h.out.is_empty() {
                let mut resp = Response::error(503, "Server is over its memory budget");
                resp.close = true;
                http_conn::respond(conns, token, resp, false, false);
            } else {
                h.closing = true;
            }
        }
        Some(Kind::Ws(_)) => ws_conn::send_close(
            conns,
            rooms,
            token,
            close::POLICY,
            "server memory budget: too much unsent or unread data",
            true,
        ),
        _ => return,
    }
    conns.settle(token);
    conns.flush(rooms, token);
    if conns.get_mut(token).is_some_and(|c| c.held() > 0) {
        conns.drop(rooms, token);
    }
}
