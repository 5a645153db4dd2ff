//! Work done off the reactor thread comes back here, into the pass.
//!
//! Every worker sends its result, an [`Outcome`], over one channel and wakes
//! the loop. [`Reactor::apply_completions`] takes them, a bounded number per
//! pass, and `apply` hands each to the step that owns it. A second source of
//! finished work (such as a broker relaying the batches other instances
//! stored) is one more sender on that channel and one more arm of `Outcome`
//! and of `apply`, not a new path.

use std::time::Instant;

use super::Reactor;
use crate::api;
use crate::http::Response;
use crate::rooms::{ConnRef, DeferredJoin};
use crate::store::{Room, StoreResult, StoredMessage};
use crate::ws::close;

/// Jobs waiting per worker lane before the server answers 503.
pub(super) const QUEUE_CAPACITY: usize = 4096;

/// A completion from a worker.
pub enum Outcome {
    /// An HTTP answer for a waiting connection.
    Http { conn: ConnRef, resp: Response },
    /// The room list, to be decorated with live member counts.
    Rooms {
        conn: ConnRef,
        result: StoreResult<Vec<Room>>,
    },
    /// A room was deleted (or not): answer, and close its members if it was.
    Deleted {
        conn: ConnRef,
        room: String,
        resp: Response,
        deleted: bool,
    },
    /// A joining WebSocket's room exists and here is its history.
    Joined {
        conn: ConnRef,
        room: String,
        since: Option<i64>,
        result: StoreResult<Vec<StoredMessage>>,
    },
    /// A store write of several rooms' batches finished; one result per
    /// room, in the order of `rooms`.
    Batches {
        rooms: Vec<BatchOf>,
        results: Vec<StoreResult<Vec<StoredMessage>>>,
    },
}

/// One room's part of a store write.
pub struct BatchOf {
    pub(super) room_key: usize,
    pub(super) room_id: u64,
    pub(super) senders: Vec<ConnRef>,
    /// When the oldest message of the batch arrived.
    pub(super) oldest: Instant,
}

impl Reactor {
    /// Apply what the workers finished. Bounded, so a flood of completions
    /// cannot starve socket events; `more_done` asks for a quick next pass.
    pub(super) fn apply_completions(&mut self) {
        self.more_done = false;
        for _ in 0..4096 {
            let Ok(outcome) = self.done.try_recv() else {
                return;
            };
            self.apply(outcome);
        }
        self.more_done = true;
    }

    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Http { conn, resp } => self.complete_http(conn, resp),
            Outcome::Rooms { conn, result } => {
                let resp = api::room_list(result, |name| self.rooms.member_count(name));
                self.complete_http(conn, resp);
            }
            Outcome::Deleted {
                conn,
                room,
                resp,
                deleted,
            } => {
                if let Some(key) = self.rooms.end_delete(&room) {
                    if deleted {
                        self.close_room(key, close::ROOM_DELETED, "room deleted");
                    } else if let Some(r) = self.rooms.get_mut(key) {
                        if r.deleting == 0 && !r.pending.is_empty() && !r.dirty {
                            // Not deleted after all: what waited goes now.
                            r.dirty = true;
                            self.dirty_rooms.push(key);
                        }
                    }
                }
                self.complete_http(conn, resp);
            }
            Outcome::Joined {
                conn,
                room,
                since,
                result,
            } => {
                // The history was read by one store thread while another may
                // have been writing this room's batch: if that batch is still
                // in flight, the history may hold part of it (or, cut to the
                // newest HISTORY_LIMIT, hold its end but not its start). The
                // member takes its history once the batch is broadcast, so
                // its buffer holds the whole batch and the merge has no gap.
                if let Some(r) = self.rooms.key_of(&room).and_then(|k| self.rooms.get_mut(k)) {
                    if r.inflight && result.is_ok() {
                        r.deferred_joins.push(DeferredJoin {
                            conn,
                            since,
                            result,
                        });
                        return;
                    }
                }
                self.joined(conn, &room, since, result)
            }
            Outcome::Batches { rooms, results } => {
                self.writes_inflight -= 1;
                for (b, result) in rooms.into_iter().zip(results) {
                    if result.is_ok() {
                        let waited = b.oldest.elapsed().as_secs_f64();
                        self.shared.commit_latency.observe(waited);
                    }
                    self.batch_done(b.room_key, b.room_id, b.senders, result);
                }
            }
        }
    }
}
