//! Joining a room. The upgrade (`http_conn.rs`) makes the new member
//! *joining* and hands [`history_job`] to the store lane; while it runs, the
//! member buffers the batches broadcast to its room (`fanout.rs`). When the
//! history is back, the member is sent the history, then the buffered
//! messages it does not hold, and goes live: nothing twice, no gap.
//!
//! Called by completions (a history is back) and by the pipeline (a join
//! that waited for its room's batch in flight).

use std::rc::Rc;

use super::completions::Outcome;
use super::conns::Conns;
use super::pipeline::Pipeline;
use super::ws_conn::{self, Phase};
use crate::api::Upgrade;
use crate::rooms::{ConnRef, DeferredJoin, Rooms};
use crate::store::{Room, Store, StoreResult, StoredMessage};
use crate::workers::Job;
use crate::ws::{self, close};

/// Messages sent instead of the recent history when a client resumes.
pub const RESUME_LIMIT: usize = 1000;

/// The store lane's part of a join: create the room if it is new, then read
/// its newest `history_limit` messages, or for a resume (`since`) what came
/// after it.
pub(super) fn history_job(conn: ConnRef, up: &Upgrade, history_limit: usize) -> Job<Outcome> {
    let since = up.since;
    let room = Room {
        name: up.room.clone(),
        creator: up.username.clone(),
        created_at: ws::now_millis(),
    };
    Box::new(move |store: &dyn Store| {
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
    })
}

/// A join's history is back from the store lane.
pub(super) fn history_read(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    conn: ConnRef,
    room: String,
    since: Option<i64>,
    result: StoreResult<Vec<StoredMessage>>,
) {
    // The history was read by one store thread while another may have been
    // writing this room's batch: if that batch is still in flight, the
    // history may hold part of it (or, cut to the newest HISTORY_LIMIT,
    // hold its end but not its start). The member takes its history once
    // the batch is broadcast, so its buffer holds the whole batch and the
    // merge has no gap.
    if let Some(r) = rooms.key_of(&room).and_then(|k| rooms.get_mut(k)) {
        if r.inflight && result.is_ok() {
            r.deferred_joins.push(DeferredJoin {
                conn,
                since,
                result,
            });
            return;
        }
    }
    joined(conns, rooms, pipeline, conn, &room, since, result)
}

/// Send a joining member its history and the messages buffered since it
/// joined, and make it live.
pub(super) fn joined(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    conn: ConnRef,
    room: &str,
    since: Option<i64>,
    result: StoreResult<Vec<StoredMessage>>,
) {
    // The room exists in the store now: its batches may go, whatever
    // became of the member that asked.
    if result.is_ok() {
        if let Some(key) = rooms.key_of(room) {
            if let Some(r) = rooms.get_mut(key) {
                r.confirmed = true;
                pipeline.queue_room(key, r);
            }
        }
    }
    if !conns.live(conn) {
        return;
    }
    let history = match result {
        Ok(h) => h,
        Err(e) => {
            log::warn!("join failed: {e}");
            ws_conn::send_error(
                conns,
                rooms,
                conn.token,
                "store_unavailable",
                "cannot load the room: the store is unavailable",
            );
            return ws_conn::send_close(
                conns,
                rooms,
                conn.token,
                close::INTERNAL,
                "store unavailable",
                false,
            );
        }
    };
    let Some(w) = conns.ws_mut(conn.token) else {
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
    conns.counters.messages_delivered += delivered;
    ws_conn::schedule_flush(conns, rooms, conn.token);
}
