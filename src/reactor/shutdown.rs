//! The graceful stop. Once the stop flag is set: stop accepting, answer or
//! close every HTTP connection, store the messages already accepted (or,
//! half-way through `SHUTDOWN_TIMEOUT`, tell their senders they were not),
//! close every WebSocket with 1001, and end when every connection is gone or
//! the timeout is near.
//!
//! Called by the pass in `mod.rs`: [`Reactor::begin_shutdown`] once, then
//! [`Reactor::shutdown_step`] after every pass until it says to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conns::{Conns, Kind};
use super::http_conn::respond;
use super::{ws_conn, Reactor};
use crate::http::Response;
use crate::rooms::{ConnRef, Rooms};
use crate::ws::close;

/// The part of `SHUTDOWN_TIMEOUT` kept for idle worker threads to notice
/// the end and exit, after connections are dropped.
const WORKER_GRACE: Duration = Duration::from_millis(100);

pub(super) struct Shutdown {
    /// Set (and the loop woken) by whoever wants the server to stop.
    stop: Arc<AtomicBool>,
    /// `SHUTDOWN_TIMEOUT`.
    timeout: Duration,
    /// Since the shutdown began.
    progress: Option<Progress>,
}

struct Progress {
    started: Instant,
    /// Every WebSocket has been sent its 1001.
    closing_sent: bool,
}

impl Shutdown {
    pub(super) fn new(stop: Arc<AtomicBool>, timeout: Duration) -> Shutdown {
        Shutdown {
            stop,
            timeout,
            progress: None,
        }
    }

    /// A stop was asked for and the shutdown has not begun.
    pub(super) fn requested(&self) -> bool {
        self.progress.is_none() && self.stop.load(Ordering::SeqCst)
    }

    pub(super) fn in_progress(&self) -> bool {
        self.progress.is_some()
    }

    /// When the worker threads are no longer waited for.
    pub(super) fn deadline(&self) -> Instant {
        let started = self
            .progress
            .as_ref()
            .map_or_else(Instant::now, |p| p.started);
        started + self.timeout
    }
}

impl Reactor {
    pub(super) fn begin_shutdown(&mut self) {
        log::info!(
            "shutting down: {} connections, {} active rooms",
            self.conns.len(),
            self.rooms.len()
        );
        self.conns.stop_accepting();
        self.shutdown.progress = Some(Progress {
            started: Instant::now(),
            closing_sent: false,
        });
        close_idle_http(&mut self.conns);
        self.flush_all();
    }

    /// Drive the shutdown; true when the loop may end.
    pub(super) fn shutdown_step(&mut self) -> bool {
        let timeout = self.shutdown.timeout;
        let Some(progress) = &self.shutdown.progress else {
            return false;
        };
        let elapsed = progress.started.elapsed();
        if !progress.closing_sent {
            // Store what was accepted, broadcast it, then say goodbye.
            if self.rooms.has_unstored() && elapsed < timeout / 2 {
                return false;
            }
            if self.rooms.has_unstored() {
                log::warn!("shutdown: some messages were still being stored");
                refuse_pending(&mut self.conns, &mut self.rooms);
            }
            if let Some(p) = &mut self.shutdown.progress {
                p.closing_sent = true;
            }
            let ws = self.conns.tokens_where(|k| matches!(k, Kind::Ws(_)));
            for token in ws {
                ws_conn::send_close(
                    &mut self.conns,
                    &mut self.rooms,
                    token,
                    close::GOING_AWAY,
                    "server shutting down",
                    false,
                );
            }
            self.flush_all();
            return false;
        }
        // HTTP connections that have had their answer and the server's FIN
        // are only waiting for the client to close; at shutdown, don't.
        let answered = self
            .conns
            .tokens_where(|k| matches!(k, Kind::Http(h) if h.lingering));
        for token in answered {
            self.conns.drop(&mut self.rooms, token);
        }
        if self.conns.is_empty() {
            return true;
        }
        // The last moments of the timeout are left to the worker threads.
        if elapsed >= timeout.saturating_sub(WORKER_GRACE) {
            log::warn!(
                "shutdown timeout: dropping {} connections",
                self.conns.len()
            );
            return true;
        }
        false
    }
}

/// Idle HTTP connections go now; busy ones after their answer. One whose
/// request has only partly arrived is answered 503 now rather than waited
/// for.
fn close_idle_http(conns: &mut Conns) {
    let idle = conns.tokens_where(|k| matches!(k, Kind::Http(h) if h.awaiting.is_none()));
    for token in idle {
        let Some(h) = conns.http_mut(token) else {
            continue;
        };
        if h.inbuf.is_empty() || h.closing || h.lingering {
            h.closing = true;
            conns.schedule_flush(token);
        } else {
            let mut resp = Response::error(503, "Server is shutting down");
            resp.close = true;
            respond(conns, token, resp, false, false);
        }
    }
}

/// Half-way through the shutdown timeout: the messages not yet handed
/// to the store are dropped, and their senders told so before the 1001
/// close. A batch already being written is not: it is stored if its
/// write finishes before the process exits (then it is in the history
/// for a reconnect with `since`), and lost if it does not.
fn refuse_pending(conns: &mut Conns, rooms: &mut Rooms) {
    let mut senders: Vec<ConnRef> = Vec::new();
    for key in rooms.keys() {
        if let Some(room) = rooms.get_mut(key) {
            senders.extend(room.pending.drain(..).map(|p| p.sender));
        }
    }
    if !senders.is_empty() {
        log::warn!("shutdown: {} messages not stored", senders.len());
    }
    ws_conn::tell_not_stored(
        conns,
        rooms,
        senders,
        "message not stored: the server is shutting down",
    );
}
