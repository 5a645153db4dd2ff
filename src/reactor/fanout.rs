//! Fan-out: a stored batch, encoded once, queued to every member of its
//! room; members left with an unsent backlog over the limit are closed
//! (slow consumers); and closing every member of a room that is deleted.
//!
//! Called by the pipeline when a batch is stored, by `conns.rs` and
//! `ws_conn.rs` when a member's backlog passes the limit, and by
//! completions when a room is deleted.

use std::rc::Rc;

use super::conns::Conns;
use super::ws_conn::{self, Phase};
use crate::outbuf::{Chunk, Kept};
use crate::rooms::Rooms;
use crate::store::StoredMessage;
use crate::ws::{self, close};

/// A batch of stored messages encoded once: the frames back to back in one
/// shared chunk, frame `i` ending at `ends[i]` with seq `seqs[i]` (rising).
pub(super) struct Encoded {
    chunk: Rc<Chunk>,
    ends: Vec<usize>,
    seqs: Vec<i64>,
}

impl Encoded {
    pub(super) fn new(stored: &[StoredMessage]) -> Encoded {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(stored.len());
        let mut seqs = Vec::with_capacity(stored.len());
        for m in stored {
            ws::message_frame_into(&mut bytes, m);
            ends.push(bytes.len());
            seqs.push(m.seq);
        }
        Encoded {
            chunk: Chunk::new(bytes),
            ends,
            seqs,
        }
    }

    /// A batch that arrived encoded (from another process, by the broker).
    pub(super) fn received(batch: crate::broker::wire::Batch) -> Encoded {
        Encoded {
            chunk: Chunk::new(batch.bytes),
            ends: batch.ends,
            seqs: batch.seqs,
        }
    }

    /// The part of the batch after seq `upto`, or `None` if nothing is:
    /// the batch itself when all of it is (the usual case), a copy of its
    /// tail otherwise.
    pub(super) fn after(self, upto: i64) -> Option<Encoded> {
        let skip = self.seqs.partition_point(|&s| s <= upto);
        if skip == 0 {
            return Some(self);
        }
        if skip == self.seqs.len() {
            return None;
        }
        let start = self.ends[skip - 1];
        Some(Encoded {
            chunk: Chunk::new(&self.chunk[start..]),
            ends: self.ends[skip..].iter().map(|e| e - start).collect(),
            seqs: self.seqs[skip..].to_vec(),
        })
    }

    pub(super) fn first_seq(&self) -> i64 {
        self.seqs.first().copied().unwrap_or(i64::MAX)
    }

    pub(super) fn last_seq(&self) -> i64 {
        self.seqs.last().copied().unwrap_or(i64::MIN)
    }

    /// (seq, frame) of each message.
    pub(super) fn each(&self) -> impl ExactSizeIterator<Item = (i64, &[u8])> {
        (0..self.seqs.len()).map(|i| (self.seqs[i], self.frame(i)))
    }

    /// Each message as a frame of its own, for the recent history.
    pub(super) fn frames(&self) -> Vec<crate::history::Frame> {
        (0..self.seqs.len())
            .map(|i| (self.seqs[i], Rc::from(self.frame(i))))
            .collect()
    }

    fn frame(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.chunk[start..self.ends[i]]
    }
}

/// Queue a stored batch to every member of room `room_key`, then close the
/// members it left over their backlog limit.
pub(super) fn deliver(conns: &mut Conns, rooms: &mut Rooms, room_key: usize, batch: &Encoded) {
    let mut slow = Vec::new();
    broadcast(conns, rooms, room_key, batch, &mut slow);
    for token in slow {
        close_slow_consumer(conns, rooms, token);
    }
}

/// A live member takes the whole batch as one shared chunk: one queue entry
/// however many messages it holds. A member whose join already sent part of
/// the batch, and members still joining (who keep messages until their
/// history is out), take single frames. Members over their backlog limit
/// are added to `slow`.
fn broadcast(
    conns: &mut Conns,
    rooms: &Rooms,
    room_key: usize,
    batch: &Encoded,
    slow: &mut Vec<usize>,
) {
    let Some(room) = rooms.get(room_key) else {
        return;
    };
    let (Some(&first_seq), Some(&last_seq), Some(&last_end)) =
        (batch.seqs.first(), batch.seqs.last(), batch.ends.last())
    else {
        return;
    };
    let max_backlog = conns.cfg.ws_max_backlog;
    let mut delivered = 0;
    // Members still joining keep single frames: made once, on first need,
    // and shared by all of them.
    let mut singles: Option<Vec<Rc<Chunk>>> = None;
    for (_, &token) in room.members.iter() {
        let Some(w) = conns.ws_mut(token) else {
            continue;
        };
        match &mut w.phase {
            Phase::Live => {
                if last_seq <= w.sent_upto {
                    continue;
                }
                let out = &mut w.ws.get_mut().out;
                if first_seq > w.sent_upto {
                    out.push(batch.chunk.clone());
                    delivered += batch.ends.len() as u64;
                } else {
                    let upto = w.sent_upto;
                    let skip = batch.seqs.partition_point(|&s| s <= upto);
                    let start = batch.ends[skip - 1];
                    out.push_bytes(&batch.chunk[start..last_end]);
                    delivered += (batch.ends.len() - skip) as u64;
                }
            }
            Phase::Joining { buffered, bytes } => {
                let frames = singles.get_or_insert_with(|| {
                    (0..batch.seqs.len())
                        .map(|i| Chunk::new(batch.frame(i)))
                        .collect()
                });
                for (&seq, frame) in batch.seqs.iter().zip(frames.iter()) {
                    *bytes += frame.len();
                    buffered.push((seq, Kept::new(frame.clone())));
                }
                if *bytes > max_backlog {
                    slow.push(token);
                }
                conns.settle(token);
                continue;
            }
            Phase::Closing { .. } => continue,
        }
        // A socket that was full when last tried: what is queued now is
        // unsent backlog.
        if ws_conn::schedule_over_backlog(conns, token) {
            slow.push(token);
        }
    }
    conns.counters.messages_delivered += delivered;
}

/// Close with 1008 a WebSocket whose unsent backlog passed the limit,
/// dropping what it was not sent yet (once: not if already closing).
pub(super) fn close_slow_consumer(conns: &mut Conns, rooms: &mut Rooms, token: usize) {
    match conns.ws_mut(token) {
        Some(w) if !w.is_closing() => {}
        _ => return,
    }
    conns.counters.slow_consumer_closes += 1;
    ws_conn::send_close(
        conns,
        rooms,
        token,
        close::POLICY,
        "slow consumer: backlog over the limit",
        true,
    );
}

/// Close every member of a room and forget the room (what waited for
/// the store is dropped: never acknowledged, never stored). With a batch
/// in flight the entry stays as a tombstone until that batch is done.
/// The upgrade refuses joins to a room being deleted or a tombstone.
pub(super) fn close_room(
    conns: &mut Conns,
    rooms: &mut Rooms,
    room_key: usize,
    code: u16,
    reason: &str,
) {
    let members: Vec<usize> = match rooms.get(room_key) {
        Some(r) => r.members.iter().map(|(_, &t)| t).collect(),
        None => return,
    };
    for token in members {
        ws_conn::send_close(conns, rooms, token, code, reason, false);
    }
    if let Some(r) = rooms.get_mut(room_key) {
        r.pending.clear();
        r.deferred_joins.clear();
        r.tombstone = r.inflight;
    }
    // Kept (closed to joins) while a batch is in flight or another
    // delete of it is under way.
    rooms.drop_if_idle(room_key);
}
