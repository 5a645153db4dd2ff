//! Joining a room. The upgrade makes the new member *joining* and asks the
//! store lane for the room's history; meanwhile the member buffers the
//! batches broadcast to its room. When the history is back, the member is
//! sent the history, then the buffered messages it does not hold, and goes
//! live: nothing twice, no gap.
//!
//! Called by completions (a history is back) and by the pipeline (a join
//! that waited for its room's batch in flight).

use std::rc::Rc;

use super::ws_conn::Phase;
use super::Reactor;
use crate::rooms::ConnRef;
use crate::store::{StoreResult, StoredMessage};
use crate::ws::{self, close};

/// Messages sent instead of the recent history when a client resumes.
pub const RESUME_LIMIT: usize = 1000;

impl Reactor {
    pub(super) fn joined(
        &mut self,
        conn: ConnRef,
        room: &str,
        since: Option<i64>,
        result: StoreResult<Vec<StoredMessage>>,
    ) {
        // The room exists in the store now: its batches may go, whatever
        // became of the member that asked.
        if result.is_ok() {
            if let Some(key) = self.rooms.key_of(room) {
                if let Some(r) = self.rooms.get_mut(key) {
                    r.confirmed = true;
                    self.pipeline.queue_room(key, r);
                }
            }
        }
        if !self.live(conn) {
            return;
        }
        let history = match result {
            Ok(h) => h,
            Err(e) => {
                log::warn!("join failed: {e}");
                self.send_error(
                    conn.token,
                    "store_unavailable",
                    "cannot load the room: the store is unavailable",
                );
                return self.ws_close(conn.token, close::INTERNAL, "store unavailable", false);
            }
        };
        let Some(w) = self.ws_mut(conn.token) else {
            return;
        };
        if !matches!(w.phase, Phase::Joining { .. }) {
            return; // closed while its history was loading
        }
        let Phase::Joining { buffered, .. } = std::mem::replace(&mut w.phase, Phase::Live) else {
            return;
        };
        // The buffer holds every message broadcast since this member joined
        // the room, without a gap, up to now; the history ends at or after
        // the point where the buffer starts. So: the history up to the first
        // buffered message, then the whole buffer. Nothing twice, no gap.
        let first_buffered = buffered.first().map(|(seq, _)| *seq);
        // Completions of different workers may arrive in either order: a
        // batch the history already holds can still be on its way.
        w.sent_upto = history
            .last()
            .map(|m| m.seq)
            .max(buffered.last().map(|(seq, _)| *seq))
            .max(since)
            .unwrap_or(i64::MIN);
        let mut bytes = Vec::new();
        for m in history
            .iter()
            .filter(|m| first_buffered.is_none_or(|f| m.seq < f))
        {
            ws::message_frame_into(&mut bytes, m);
        }
        let bytes_len = bytes.len();
        let out = &mut w.ws.get_mut().out;
        out.push(Rc::from(bytes));
        let mut delivered = 0;
        for (seq, frame) in buffered {
            if since.is_none_or(|s| seq > s) {
                out.push(frame);
                delivered += 1;
            }
        }
        // The history itself does not count against the backlog limit.
        w.allowance = bytes_len;
        self.counters.messages_delivered += delivered;
        self.schedule_flush(conn.token);
    }
}
