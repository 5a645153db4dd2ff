//! The store pipeline (group commit). A chat message accepted from a member
//! waits in its room's pending list; every room with waiting messages and
//! no batch in flight gives its next batch, and the batches of many rooms go
//! to the write lane as one write. When the write is back, each stored batch
//! is encoded once and queued to its room (`fanout.rs`), kept in the room's
//! recent history and answers the joins that waited for it (`joins.rs`), and
//! the senders of a batch that failed are told. Nothing is written before
//! `crate::presence` allows this process to write.
//!
//! The per-room state (pending messages, batch in flight, confirmed) lives in
//! `crate::rooms`; this part owns the order in which rooms are written and
//! how many writes are in flight. Called by `ws_conn.rs` (a message is
//! accepted), by the pass (submitting), and by completions (a write is done,
//! a room is confirmed or not deleted after all).

use std::sync::Arc;
use std::time::Instant;

use super::completions::{BatchOf, Lanes, Outcome};
use super::conns::Conns;
use super::fanout::{self, Encoded};
use super::joins::{self, Joins};
use super::relay::Relay;
use super::ws_conn;
use crate::config::Config;
use crate::metrics::Shared;
use crate::presence::Presence;
use crate::rooms::{ConnRef, Pending, Room, Rooms};
use crate::store::{NewMessage, RoomBatch, Store, StoreError, StoreResult, StoredMessage};
use crate::workers::Job;
use crate::ws::{self, close};

pub(super) struct Pipeline {
    /// Rooms that may have a batch to give, in the order they got one.
    dirty_rooms: Vec<usize>,
    /// Store writes of messages submitted and not yet complete, and how many
    /// may be (the store lane's thread count).
    writes_inflight: usize,
    write_slots: usize,
    /// Most messages in one write, over all its rooms (`STORE_BATCH_MAX`).
    write_max: usize,
    /// Most bytes of one room's batch (a quarter of `WS_MAX_BACKLOG`).
    byte_cap: usize,
    /// Where the commit latency of each batch is recorded.
    shared: Arc<Shared>,
    /// Whether this process may write yet.
    presence: Arc<Presence>,
}

impl Pipeline {
    pub(super) fn new(
        cfg: &Config,
        write_slots: usize,
        shared: Arc<Shared>,
        presence: Arc<Presence>,
    ) -> Pipeline {
        Pipeline {
            dirty_rooms: Vec::new(),
            writes_inflight: 0,
            write_slots,
            write_max: cfg.store_batch_max as usize,
            // A batch is queued to every member at once, so its bytes stay
            // well under the slow-consumer limit: a member that reads keeps
            // up.
            byte_cap: cfg.ws_max_backlog / 4,
            shared,
            presence,
        }
    }

    /// A message from `sender` joins room `room_key`'s pending list, stamped
    /// so that timestamps never go backwards in a room. False when the room
    /// is gone.
    pub(super) fn accept(
        &mut self,
        rooms: &mut Rooms,
        room_key: usize,
        sender: ConnRef,
        username: String,
        content: String,
    ) -> bool {
        let Some(room) = rooms.get_mut(room_key) else {
            return false;
        };
        let ts = ws::now_millis().max(room.last_ts);
        room.last_ts = ts;
        room.pending.push(Pending {
            arrived: Instant::now(),
            sender,
            msg: NewMessage {
                username,
                content,
                timestamp: ts,
            },
        });
        self.queue_room(room_key, room);
        true
    }

    /// Room `key` has waiting messages: list it for the next write (once).
    pub(super) fn queue_room(&mut self, key: usize, room: &mut Room) {
        if !room.pending.is_empty() && !room.dirty {
            room.dirty = true;
            self.dirty_rooms.push(key);
        }
    }

    /// The store holds room `key` now (a join created or found it): its
    /// messages may be written, and any waiting are listed.
    pub(super) fn confirm(&mut self, key: usize, room: &mut Room) {
        room.confirmed = true;
        self.queue_room(key, room);
    }

    /// Rooms are waiting for a store write and a write may start.
    pub(super) fn can_submit(&self) -> bool {
        !self.dirty_rooms.is_empty()
            && self.writes_inflight < self.write_slots
            && self.presence.may_write()
    }

    /// Messages wait only for this process's first announcement to settle
    /// (`crate::presence`): the loop should look again soon.
    pub(super) fn waiting_to_write(&self) -> bool {
        !self.dirty_rooms.is_empty() && !self.presence.may_write()
    }

    /// Group commit. Every room with waiting messages and no batch in flight
    /// gives its next batch, and the batches of many rooms go to the store as
    /// one write (one transaction and fsync on SQLite), up to
    /// `STORE_BATCH_MAX` messages. At most one write per store thread is in
    /// flight: while they run, new messages gather for the next one, so the
    /// busier the server, the bigger the writes.
    pub(super) fn submit(&mut self, rooms: &mut Rooms, lanes: &Lanes) {
        let write_max = self.write_max;
        while self.can_submit() {
            if lanes.write_full() {
                return; // retried on the next pass
            }
            let keys = std::mem::take(&mut self.dirty_rooms);
            let mut rest = Vec::new();
            let mut parts: Vec<BatchOf> = Vec::new();
            let mut batches: Vec<RoomBatch> = Vec::new();
            let mut total = 0;
            for key in keys {
                let Some(room) = rooms.get_mut(key) else {
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
                    if n > 0 && bytes > self.byte_cap {
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
            if lanes.write.try_submit(job).is_ok() {
                self.writes_inflight += 1;
            } else {
                log::error!("store queue refused a write of {total} messages");
                for key in keys {
                    if let Some(room) = rooms.get_mut(key) {
                        room.inflight = false;
                    }
                }
            }
        }
    }

    /// A store write is back: one result per room, in the order of `parts`.
    pub(super) fn written(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        relay: &mut Relay,
        parts: Vec<BatchOf>,
        results: Vec<StoreResult<Vec<StoredMessage>>>,
    ) {
        self.writes_inflight -= 1;
        for (part, result) in parts.into_iter().zip(results) {
            if result.is_ok() {
                let waited = part.oldest.elapsed().as_secs_f64();
                self.shared.commit_latency.observe(waited);
            }
            self.batch_done(conns, rooms, joins, relay, part, result);
        }
    }

    /// One room's batch is back: send it to the room and keep it in the
    /// room's recent history (or tell its senders it was not stored), answer
    /// the joins that waited for it, and list the room again if more messages
    /// wait.
    fn batch_done(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        relay: &mut Relay,
        part: BatchOf,
        result: StoreResult<Vec<StoredMessage>>,
    ) {
        let room_key = part.room_key;
        let Some(room) = rooms.get_live(room_key, part.room_id) else {
            return; // the room was deleted meanwhile; its members are closed
        };
        room.inflight = false;
        if room.tombstone {
            // Deleted while this batch was written: nobody is told, and the
            // name is free again.
            return rooms.drop_if_idle(room_key);
        }
        match result {
            Ok(stored) => {
                conns.counters.messages_stored += stored.len() as u64;
                relay.stored(conns, rooms, joins, room_key, Encoded::new(&stored));
            }
            Err(StoreError::NoSuchRoom) => {
                log::info!("room vanished from the store; closing its members");
                if let Some(r) = rooms.get(room_key) {
                    let name = r.name.clone();
                    joins.forget(&name);
                }
                joins.failed(room_key);
                return fanout::close_room(
                    conns,
                    rooms,
                    room_key,
                    close::ROOM_DELETED,
                    "room deleted",
                );
            }
            Err(e) => {
                joins.failed(room_key);
                log::warn!("batch of {} not stored: {e}", part.senders.len());
                ws_conn::tell_not_stored(
                    conns,
                    rooms,
                    part.senders,
                    "message not stored: the store is unavailable; try again",
                );
            }
        }
        let mut deferred = Vec::new();
        let mut name = None;
        if let Some(room) = rooms.get_mut(room_key) {
            self.queue_room(room_key, room);
            deferred = std::mem::take(&mut room.deferred_joins);
            name = Some(room.name.clone());
        }
        if let Some(name) = name {
            for j in deferred {
                joins::joined(conns, rooms, self, j.conn, &name, j.since, j.result);
            }
            joins::batch_done(conns, rooms, self, joins, room_key);
        }
        rooms.drop_if_idle(room_key);
    }
}
