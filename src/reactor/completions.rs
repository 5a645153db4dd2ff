//! Work done off the reactor thread: the worker lanes it goes to, and the
//! one place where it comes back into the pass.
//!
//! Every worker sends its result, an [`Outcome`], over one channel and wakes
//! the loop. [`Reactor::apply_completions`] takes them, a bounded number per
//! pass, and `apply` hands each to the step that owns it: an HTTP answer to
//! `http_conn.rs`, a history to `joins.rs`, a store write to `pipeline.rs`,
//! a deleted room to `fanout.rs` (and the history cache forgets it). A second source of finished work (such as
//! a broker relaying the batches other instances stored) is one more sender
//! on that channel and one more arm of `Outcome` and of `apply`, not a new
//! path.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use mio::Waker;

use super::{fanout, joins, Reactor};
use crate::api;
use crate::broker::Event;
use crate::http::Response;
use crate::rooms::ConnRef;
use crate::store::{Room, Store, StoreResult, StoredMessage};
use crate::workers::Pool;
use crate::ws::close;

/// Jobs waiting per worker lane before the server answers 503.
const QUEUE_CAPACITY: usize = 4096;
/// Completions applied in one go before socket events get a turn again.
const APPLY_MAX: usize = 4096;

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
    /// A room's history read (`joins.rs`): the room exists in the store
    /// and here are its newest messages.
    Loaded {
        room_key: usize,
        room_id: u64,
        result: StoreResult<Vec<StoredMessage>>,
    },
    /// One member's resume read: the messages after its `since`.
    Joined {
        conn: ConnRef,
        room: String,
        since: Option<i64>,
        result: StoreResult<Vec<StoredMessage>>,
    },
    /// The broker's subscriber reports (`crate::broker`).
    Broker(crate::broker::Event),
    /// A relay read: the messages of a room after a seq (`relay.rs`).
    Relay(super::relay::RelayRead),
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

/// The worker lanes: password hashing (slow on purpose, at a lower
/// priority), store reads and REST calls, and chat message writes, so that
/// neither a login storm nor a join storm ever delays a chat message waiting
/// to be stored.
pub(super) struct Lanes {
    pub(super) hash: Pool<Outcome>,
    pub(super) store: Pool<Outcome>,
    pub(super) write: Pool<Outcome>,
}

/// How many threads each lane has.
pub(super) struct LaneSizes {
    pub(super) hash: usize,
    pub(super) store: usize,
    pub(super) write: usize,
}

/// The receiving end of the workers' results.
pub(super) struct Completions {
    done: Receiver<Outcome>,
    /// For another source of completions (the broker).
    sender: crossbeam_channel::Sender<Outcome>,
    /// The last `apply_completions` stopped at its bound: more are waiting.
    more: bool,
}

/// Start the lanes; they send their results to the returned
/// [`Completions`] and wake the loop with `waker`.
pub(super) fn start(
    sizes: &LaneSizes,
    store: Arc<dyn Store>,
    waker: &Arc<Waker>,
) -> io::Result<(Lanes, Completions)> {
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let done_tx_keep = done_tx.clone();
    let hash = Pool::new(
        "hash",
        sizes.hash,
        QUEUE_CAPACITY,
        5,
        store.clone(),
        done_tx.clone(),
        waker.clone(),
    )?;
    let write = Pool::new(
        "write",
        sizes.write,
        QUEUE_CAPACITY,
        0,
        store.clone(),
        done_tx.clone(),
        waker.clone(),
    )?;
    let store = Pool::new(
        "store",
        sizes.store,
        QUEUE_CAPACITY,
        0,
        store,
        done_tx,
        waker.clone(),
    )?;
    let completions = Completions {
        done: done_rx,
        sender: done_tx_keep,
        more: false,
    };
    Ok((Lanes { hash, store, write }, completions))
}

impl Lanes {
    /// The store lane takes no more jobs now.
    pub(super) fn store_full(&self) -> bool {
        self.store.depth() >= QUEUE_CAPACITY
    }

    /// The write lane takes no more jobs now.
    pub(super) fn write_full(&self) -> bool {
        self.write.depth() >= QUEUE_CAPACITY
    }

    /// Let the threads finish, waiting no later than `deadline`.
    pub(super) fn shutdown(self, deadline: Instant) {
        self.hash.shutdown(deadline);
        self.store.shutdown(deadline);
        self.write.shutdown(deadline);
    }
}

impl Completions {
    /// Results are waiting.
    pub(super) fn waiting(&self) -> bool {
        !self.done.is_empty()
    }

    /// The last round stopped at its bound with more waiting: the next
    /// pass must not sleep.
    pub(super) fn more(&self) -> bool {
        self.more
    }

    /// A sender for another source of finished work.
    pub(super) fn sender(&self) -> crossbeam_channel::Sender<Outcome> {
        self.sender.clone()
    }
}

impl Reactor {
    /// Apply what the workers finished. Bounded, so a flood of completions
    /// cannot starve socket events; `more` asks for a quick next pass.
    pub(super) fn apply_completions(&mut self) {
        self.completions.more = false;
        for _ in 0..APPLY_MAX {
            let Ok(outcome) = self.completions.done.try_recv() else {
                return;
            };
            self.apply(outcome);
        }
        self.completions.more = true;
    }

    /// Hand one completion to the step that owns it.
    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Http { conn, resp } => self.complete_http(conn, resp),
            Outcome::Rooms { conn, result } => {
                let resp = api::room_list(result, |name| self.census.members(&self.rooms, name));
                self.complete_http(conn, resp);
            }
            Outcome::Deleted {
                conn,
                room,
                resp,
                deleted,
            } => {
                if deleted {
                    self.joins.forget(&room);
                    self.relay.deleted(&room);
                }
                if let Some(key) = self.rooms.end_delete(&room) {
                    if deleted {
                        fanout::close_room(
                            &mut self.conns,
                            &mut self.rooms,
                            key,
                            close::ROOM_DELETED,
                            "room deleted",
                        );
                    } else if let Some(r) = self.rooms.get_mut(key) {
                        if r.deleting == 0 {
                            // Not deleted after all: what waited goes now.
                            self.pipeline.queue_room(key, r);
                        }
                    }
                }
                self.complete_http(conn, resp);
            }
            Outcome::Loaded {
                room_key,
                room_id,
                result,
            } => {
                self.joins.read_done();
                joins::loaded(
                    &mut self.conns,
                    &mut self.rooms,
                    &mut self.pipeline,
                    &mut self.joins,
                    room_key,
                    room_id,
                    result,
                )
            }
            Outcome::Joined {
                conn,
                room,
                since,
                result,
            } => {
                self.joins.read_done();
                joins::history_read(
                    &mut self.conns,
                    &mut self.rooms,
                    &mut self.pipeline,
                    conn,
                    room,
                    since,
                    result,
                )
            }
            Outcome::Batches { rooms, results } => self.pipeline.written(
                &mut self.conns,
                &mut self.rooms,
                &mut self.joins,
                &mut self.relay,
                rooms,
                results,
            ),
            Outcome::Broker(Event::Counts(counts)) => self.census.remote(counts),
            Outcome::Broker(event) => {
                self.relay
                    .on_event(&mut self.conns, &mut self.rooms, &mut self.joins, event)
            }
            Outcome::Relay(read) => {
                self.relay
                    .read_done(&mut self.conns, &mut self.rooms, &mut self.joins, read)
            }
        }
    }
}
