//! The store pipeline (group commit): every room with waiting messages and
//! no batch in flight gives its next batch, the batches of many rooms go to
//! the store lane as one write, and when the write is back each stored batch
//! is sent to its room, the joins that waited for it are answered, and the
//! senders of a batch that failed are told.
//!
//! Called by the pass (submitting) and by completions (a write is done).

use std::rc::Rc;

use super::completions::{BatchOf, Outcome};
use super::Reactor;
use crate::rooms::ConnRef;
use crate::store::{RoomBatch, Store, StoreError, StoreResult, StoredMessage};
use crate::workers::Job;
use crate::ws::{self, close};

impl Reactor {
    /// Rooms are waiting for a store write and a write may start.
    pub(super) fn can_submit(&self) -> bool {
        !self.dirty_rooms.is_empty() && self.writes_inflight < self.write_slots
    }

    /// Group commit. Every room with waiting messages and no batch in flight
    /// gives its next batch, and the batches of many rooms go to the store as
    /// one write (one transaction and fsync on SQLite), up to
    /// `STORE_BATCH_MAX` messages. At most one write per store thread is in
    /// flight: while they run, new messages gather for the next one, so the
    /// busier the server, the bigger the writes.
    pub(super) fn submit_batches(&mut self) {
        let write_max = self.cfg.store_batch_max as usize;
        // A batch is queued to every member at once, so its bytes stay well
        // under the slow-consumer limit: a member that reads keeps up.
        let byte_cap = self.cfg.ws_max_backlog / 4;
        while self.can_submit() {
            if self.lanes.store_full() {
                return; // retried on the next pass
            }
            let keys = std::mem::take(&mut self.dirty_rooms);
            let mut rest = Vec::new();
            let mut parts: Vec<BatchOf> = Vec::new();
            let mut batches: Vec<RoomBatch> = Vec::new();
            let mut total = 0;
            for key in keys {
                let Some(room) = self.rooms.get_mut(key) else {
                    continue;
                };
                if total >= write_max {
                    rest.push(key); // still dirty: the next write takes it
                    continue;
                }
                room.dirty = false;
                if room.inflight
                    || !room.confirmed
                    || room.deleting > 0
                    || room.tombstone
                    || room.pending.is_empty()
                {
                    continue;
                }
                let mut n = 0;
                let mut bytes = 0;
                for p in room.pending.iter().take(write_max - total) {
                    bytes += p.msg.content.len() + p.msg.username.len() + 128;
                    if n > 0 && bytes > byte_cap {
                        break;
                    }
                    n += 1;
                }
                let mut senders = Vec::with_capacity(n);
                let mut messages = Vec::with_capacity(n);
                let oldest = room.pending[0].arrived;
                for p in room.pending.drain(..n) {
                    senders.push(p.sender);
                    messages.push(p.msg);
                }
                total += n;
                room.inflight = true;
                parts.push(BatchOf {
                    room_key: key,
                    room_id: room.id,
                    senders,
                    oldest,
                });
                batches.push(RoomBatch {
                    room: room.name.to_string(),
                    messages,
                });
            }
            self.dirty_rooms = rest;
            if parts.is_empty() {
                continue;
            }
            let keys: Vec<usize> = parts.iter().map(|p| p.room_key).collect();
            let job: Job<Outcome> = Box::new(move |store: &dyn Store| Outcome::Batches {
                results: store.append_many(&batches),
                rooms: parts,
            });
            // Only the reactor submits, so after the depth check this cannot
            // fail; if it does, the batches are lost: say so.
            if self.lanes.store.try_submit(job).is_ok() {
                self.writes_inflight += 1;
            } else {
                log::error!("store queue refused a write of {total} messages");
                for key in keys {
                    if let Some(room) = self.rooms.get_mut(key) {
                        room.inflight = false;
                    }
                }
            }
        }
    }

    pub(super) fn batch_done(
        &mut self,
        room_key: usize,
        room_id: u64,
        senders: Vec<ConnRef>,
        result: StoreResult<Vec<StoredMessage>>,
    ) {
        let Some(room) = self.rooms.get_live(room_key, room_id) else {
            return; // the room was deleted meanwhile; its members are closed
        };
        room.inflight = false;
        if room.tombstone {
            // Deleted while this batch was written: nobody is told, and the
            // name is free again.
            return self.rooms.drop_if_idle(room_key);
        }
        match result {
            Ok(stored) => {
                self.counters.messages_stored += stored.len() as u64;
                let mut slow = Vec::new();
                let mut bytes = Vec::new();
                let mut ends = Vec::with_capacity(stored.len());
                let mut seqs = Vec::with_capacity(stored.len());
                for m in &stored {
                    ws::message_frame_into(&mut bytes, m);
                    ends.push(bytes.len());
                    seqs.push(m.seq);
                }
                let chunk: Rc<[u8]> = Rc::from(bytes);
                self.broadcast(room_key, &seqs, &chunk, &ends, &mut slow);
                self.close_slow(&mut slow);
            }
            Err(StoreError::NoSuchRoom) => {
                log::info!("room vanished from the store; closing its members");
                return self.close_room(room_key, close::ROOM_DELETED, "room deleted");
            }
            Err(e) => {
                log::warn!("batch of {} not stored: {e}", senders.len());
                self.tell_not_stored(
                    senders,
                    "message not stored: the store is unavailable; try again",
                );
            }
        }
        let mut deferred = Vec::new();
        let mut name = None;
        if let Some(room) = self.rooms.get_mut(room_key) {
            if !room.pending.is_empty() && !room.dirty {
                room.dirty = true;
                self.dirty_rooms.push(room_key);
            }
            deferred = std::mem::take(&mut room.deferred_joins);
            name = Some(room.name.clone());
        }
        if let Some(name) = name {
            for j in deferred {
                self.joined(j.conn, &name, j.since, j.result);
            }
        }
        self.rooms.drop_if_idle(room_key);
    }
}
