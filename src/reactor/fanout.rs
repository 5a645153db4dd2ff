//! Fan-out: a stored batch, encoded once, queued to every member of its
//! room; members left with an unsent backlog over the limit are closed
//! (slow consumers); and closing every member of a room that is deleted.
//!
//! Called by the pipeline when a batch is stored, by the flush when a
//! member's backlog passes the limit, and by completions when a room is
//! deleted.

use std::rc::Rc;

use super::conns::Kind;
use super::ws_conn::Phase;
use super::Reactor;
use crate::ws::close;

impl Reactor {
    /// Queue a stored batch to every member of a room. `chunk` holds the
    /// batch's frames back to back (frame `i` ends at `ends[i]` and has seq
    /// `seqs[i]`, rising), so a live member takes the whole batch as one shared
    /// chunk: one queue entry however many messages it holds. A member whose
    /// join already sent part of the batch, and members still joining (who
    /// keep messages until their history is out), take single frames.
    pub(super) fn broadcast(
        &mut self,
        room_key: usize,
        seqs: &[i64],
        chunk: &Rc<[u8]>,
        ends: &[usize],
        slow: &mut Vec<usize>,
    ) {
        let Some(room) = self.rooms.get(room_key) else {
            return;
        };
        let (Some(&first_seq), Some(&last_seq), Some(&last_end)) =
            (seqs.first(), seqs.last(), ends.last())
        else {
            return;
        };
        let frame_at = |i: usize| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            &chunk[start..ends[i]]
        };
        let max_backlog = self.cfg.ws_max_backlog;
        for (_, &token) in room.members.iter() {
            let Some(conn) = self.conns.get_mut(token) else {
                continue;
            };
            let Kind::Ws(w) = &mut conn.kind else {
                continue;
            };
            match &mut w.phase {
                Phase::Live => {
                    if last_seq <= w.sent_upto {
                        continue;
                    }
                    let out = &mut w.ws.get_mut().out;
                    if first_seq > w.sent_upto {
                        out.push(chunk.clone());
                        self.counters.messages_delivered += ends.len() as u64;
                    } else {
                        let upto = w.sent_upto;
                        let skip = seqs.partition_point(|&s| s <= upto);
                        let start = ends[skip - 1];
                        out.push_bytes(&chunk[start..last_end]);
                        self.counters.messages_delivered += (ends.len() - skip) as u64;
                    }
                    if conn.want_write {
                        // The socket was full when last tried: what is
                        // queued now is unsent backlog.
                        if out.len() > max_backlog + w.allowance {
                            slow.push(token);
                        }
                    } else if !conn.queued {
                        conn.queued = true;
                        self.flush_list.push(token);
                    }
                }
                Phase::Joining { buffered, bytes } => {
                    for (i, &seq) in seqs.iter().enumerate() {
                        let frame = frame_at(i);
                        buffered.push((seq, Rc::from(frame)));
                        *bytes += frame.len();
                    }
                    if *bytes > max_backlog {
                        slow.push(token);
                    }
                }
                Phase::Closing { .. } => {}
            }
        }
    }

    pub(super) fn close_slow(&mut self, slow: &mut Vec<usize>) {
        for token in slow.drain(..) {
            self.close_slow_consumer(token);
        }
    }

    /// Close with 1008 a WebSocket whose unsent backlog passed the limit,
    /// dropping what it was not sent yet (once: not if already closing).
    pub(super) fn close_slow_consumer(&mut self, token: usize) {
        match self.ws_mut(token) {
            Some(w) if !matches!(w.phase, Phase::Closing { .. }) => {}
            _ => return,
        }
        self.counters.slow_consumer_closes += 1;
        self.ws_close(
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
    pub(super) fn close_room(&mut self, room_key: usize, code: u16, reason: &str) {
        let members: Vec<usize> = match self.rooms.get(room_key) {
            Some(r) => r.members.iter().map(|(_, &t)| t).collect(),
            None => return,
        };
        for token in members {
            self.ws_close(token, code, reason, false);
        }
        if let Some(r) = self.rooms.get_mut(room_key) {
            r.pending.clear();
            r.deferred_joins.clear();
            r.tombstone = r.inflight;
        }
        // Kept (closed to joins) while a batch is in flight or another
        // delete of it is under way.
        self.rooms.drop_if_idle(room_key);
    }
}
