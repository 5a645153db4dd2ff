//! The relay: with a broker (`BROKER_URL`), the stored batches of every
//! process reach the members here exactly once and in `seq` order.
//!
//! Every batch for a room, stored here or announced by another process,
//! goes through [`Relay::offer`]. A room keeps `upto`, the highest seq its
//! members here have had (in their history or live). A batch that continues
//! it is delivered (fan-out, and the recent history); one that leaves a gap
//! is held. A gap that the broker does not fill within [`GAP_WAIT`] is read
//! from the store, on the store lane: the store is the source of truth, so
//! nothing is ever skipped. A held batch that the store does not have even
//! after a read that started later is stale (its room was deleted and made
//! again) and is dropped.
//!
//! A room is subscribed when its first member here joins and unsubscribed
//! once it has none. Each time the subscriber (re)subscribes a room, what
//! was published before may have been missed, so the room reads from
//! `upto` onward (a catch-up): that is how a process that was cut off from
//! Redis, or that joined a room just as another process stored in it,
//! misses nothing.
//!
//! Without a broker the relay is a pass-through: [`Relay::offer`] delivers
//! at once, as before, with no cost beyond a branch.
//!
//! Called by the pipeline (a batch stored here), the completions (broker
//! events and the relay's store reads), the dispatch of an upgrade (a room
//! wanted) and the pass (`poll`: gaps due for a read, rooms to drop).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::completions::{Lanes, Outcome};
use super::conns::Conns;
use super::fanout::{self, Encoded};
use super::joins::Joins;
use super::ws_conn::Phase;
use crate::broker::{Broker, Event};
use crate::rooms::Rooms;
use crate::store::{Store, StoreResult, StoredMessage};
use crate::workers::Job;
use crate::ws::close;

/// How long a gap may wait for the broker to fill it before the store is
/// read. Batches of one room from different processes usually arrive
/// within a few milliseconds of each other.
pub(super) const GAP_WAIT: Duration = Duration::from_millis(150);
/// Messages one store call of a relay read asks for.
const READ_LIMIT: usize = 1000;
/// Store calls one relay read makes at most; a longer gap takes more reads.
const READ_PAGES: usize = 100;

/// One room's place in the stream.
#[derive(Default)]
struct Sync {
    /// The highest seq the members here have had; `None` until known.
    upto: Option<i64>,
    /// Batches ahead of `upto`, by first seq, with when they arrived.
    held: BTreeMap<i64, (Instant, Encoded)>,
    /// Since when a gap has waited.
    gap_since: Option<Instant>,
    /// When the store read under way for this room started.
    reading: Option<Instant>,
    /// (Re)subscribed: read what may have been missed.
    catch_up: bool,
}

/// A relay read, back from the store lane.
pub struct RelayRead {
    room: String,
    after: i64,
    result: StoreResult<Vec<StoredMessage>>,
    /// The read reached `after` (a very long gap takes several).
    complete: bool,
}

/// What the relay counts, for `/metrics`.
#[derive(Default)]
pub(super) struct RelayStats {
    pub(super) reads: u64,
    pub(super) repaired: u64,
    pub(super) stale: u64,
}

pub(super) struct Relay {
    broker: Option<Broker>,
    /// Told what other processes stored (`Store::heard`), so that this
    /// process numbers its next write of a room after theirs.
    store: Arc<dyn Store>,
    rooms: HashMap<String, Sync>,
    /// Rooms with something to do in [`Relay::poll`]: batches held, a
    /// catch-up due, or a read under way. The pass looks only at these.
    pending: HashSet<String>,
    pub(super) stats: RelayStats,
}

impl Relay {
    pub(super) fn new(broker: Option<Broker>, store: Arc<dyn Store>) -> Relay {
        Relay {
            broker,
            store,
            rooms: HashMap::new(),
            pending: HashSet::new(),
            stats: RelayStats::default(),
        }
    }

    /// A member is joining `room` here: receive its batches.
    pub(super) fn want(&mut self, room: &str) {
        let Some(b) = &self.broker else {
            return;
        };
        if !self.rooms.contains_key(room) {
            self.rooms.insert(room.to_string(), Sync::default());
            b.subscribe(room);
        }
    }

    /// A batch of `room_key` was stored here: tell the other processes,
    /// then deliver it in order.
    pub(super) fn stored(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        room_key: usize,
        batch: Encoded,
    ) {
        if let (Some(b), Some(r)) = (&self.broker, rooms.get(room_key)) {
            b.publish_batch(&r.name, batch.each());
        }
        self.offer(conns, rooms, joins, room_key, batch, true);
    }

    /// A room was deleted here: tell the other processes.
    pub(super) fn deleted(&mut self, room: &str) {
        if let Some(b) = &self.broker {
            b.publish_deleted(room);
        }
        self.forget_position(room);
    }

    /// A deleted room's place in the stream means nothing for a room made
    /// again under its name. The entry (and its subscription) stays until
    /// [`Relay::sweep`] finds the room gone.
    fn forget_position(&mut self, room: &str) {
        if let Some(s) = self.rooms.get_mut(room) {
            *s = Sync::default();
        }
    }

    /// Deliver `batch` if it continues the room's stream, hold it if it
    /// leaves a gap, drop what the members already had.
    fn offer(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        room_key: usize,
        batch: Encoded,
        local: bool,
    ) {
        if self.broker.is_none() {
            return deliver(conns, rooms, joins, room_key, &batch);
        }
        let Some(name) = rooms.get(room_key).map(|r| r.name.clone()) else {
            return;
        };
        // Every room with members here has its entry (`want`); this only
        // makes sure of it.
        self.want(&name);
        let Some(sync) = self.rooms.get_mut(&*name) else {
            return;
        };
        if sync.upto.is_none() {
            sync.upto = live_position(conns, rooms, room_key);
        }
        match sync.upto {
            None if local => {
                // Nobody here has a position yet (all still joining): the
                // joins take it by seq, as without a broker.
                sync.upto = Some(batch.last_seq());
                deliver(conns, rooms, joins, room_key, &batch);
            }
            Some(upto) if batch.last_seq() <= upto => {}
            Some(upto) if batch.first_seq() <= upto + 1 => {
                if let Some(part) = batch.after(upto) {
                    sync.upto = Some(part.last_seq());
                    deliver(conns, rooms, joins, room_key, &part);
                }
                drain(sync, conns, rooms, joins, room_key);
            }
            // A gap (or no position yet): wait for what is missing.
            _ => {
                sync.held.insert(batch.first_seq(), (Instant::now(), batch));
                sync.gap_since.get_or_insert_with(Instant::now);
            }
        }
        if !sync.held.is_empty() && !self.pending.contains(&*name) {
            self.pending.insert(name.to_string());
        }
    }

    /// Something the broker's subscriber reported.
    pub(super) fn on_event(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        event: Event,
    ) {
        match event {
            Event::Subscribed(room) => {
                if let Some(s) = self.rooms.get_mut(&room) {
                    s.catch_up = true;
                    self.pending.insert(room);
                }
            }
            // Every room is subscribed again once the connection is back,
            // and catches up then.
            Event::Lost => {}
            Event::Batch(b) => {
                if let Some(&last) = b.seqs.last() {
                    self.store.heard(&b.room, Some(last));
                }
                let Some(key) = rooms.key_of(&b.room) else {
                    return;
                };
                self.offer(conns, rooms, joins, key, Encoded::received(b), false);
            }
            // The census's, not the relay's (the completions route them).
            Event::Counts(_) => {}
            Event::Deleted(room) => {
                self.store.heard(&room, None);
                self.forget_position(&room);
                joins.forget(&room);
                if let Some(key) = rooms.key_of(&room) {
                    fanout::close_room(conns, rooms, key, close::ROOM_DELETED, "room deleted");
                }
            }
        }
    }

    /// Once a tick: forget the rooms nobody here is in any more, and stop
    /// receiving them.
    pub(super) fn sweep(&mut self, rooms: &Rooms) {
        let Some(broker) = &self.broker else {
            return;
        };
        self.rooms.retain(|name, _| {
            let here = rooms.key_of(name).is_some();
            if !here {
                broker.unsubscribe(name);
            }
            here
        });
        let tracked = &self.rooms;
        self.pending.retain(|name| tracked.contains_key(name));
    }

    /// Once a pass: read the gaps that waited long enough and the rooms
    /// that (re)subscribed. Only the rooms with something pending are
    /// looked at.
    pub(super) fn poll(&mut self, conns: &Conns, rooms: &Rooms, lanes: &Lanes, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let tracked = &mut self.rooms;
        let stats = &mut self.stats;
        self.pending.retain(|name| {
            let (Some(sync), Some(key)) = (tracked.get_mut(name), rooms.key_of(name)) else {
                return false;
            };
            if sync.held.is_empty() && !sync.catch_up && sync.reading.is_none() {
                return false;
            }
            if sync.upto.is_none() {
                sync.upto = live_position(conns, rooms, key);
            }
            let Some(upto) = sync.upto else {
                return true;
            };
            let gap_due = sync
                .gap_since
                .is_some_and(|t| now.duration_since(t) >= GAP_WAIT);
            if sync.reading.is_some() || !(sync.catch_up || gap_due) {
                return true;
            }
            let room = name.clone();
            let job: Job<Outcome> = Box::new(move |store: &dyn Store| {
                let (result, complete) = match read_after(store, &room, upto) {
                    Ok((m, complete)) => (Ok(m), complete),
                    Err(e) => (Err(e), false),
                };
                Outcome::Relay(RelayRead {
                    room,
                    after: upto,
                    result,
                    complete,
                })
            });
            if lanes.store.try_submit(job).is_ok() {
                sync.reading = Some(now);
                sync.catch_up = false;
                stats.reads += 1;
            }
            true
        });
    }

    /// A relay read is back: deliver what the members here did not have,
    /// then what waited behind it; drop what the store does not have.
    pub(super) fn read_done(
        &mut self,
        conns: &mut Conns,
        rooms: &mut Rooms,
        joins: &mut Joins,
        read: RelayRead,
    ) {
        let RelayRead {
            room,
            after,
            result,
            complete,
        } = read;
        let Some(sync) = self.rooms.get_mut(&room) else {
            return;
        };
        let started = sync.reading.take();
        let Some(key) = rooms.key_of(&room) else {
            return;
        };
        let messages = match result {
            Ok(m) => m,
            Err(e) => {
                log::warn!("relay: cannot read {room:?} from the store: {e}; retrying");
                sync.gap_since = Some(Instant::now());
                self.pending.insert(room);
                return;
            }
        };
        let before = sync.upto.unwrap_or(after);
        if !messages.is_empty() {
            self.offer(conns, rooms, joins, key, Encoded::new(&messages), true);
        }
        let Some(sync) = self.rooms.get_mut(&room) else {
            return;
        };
        self.stats.repaired += (sync.upto.unwrap_or(before) - before).max(0) as u64;
        if complete {
            // Whatever the store did not have, though it arrived before the
            // read began, belongs to a room that no longer exists.
            if let (Some(started), Some(upto)) = (started, sync.upto) {
                let stale: Vec<i64> = sync
                    .held
                    .iter()
                    .filter(|(&first, (at, _))| first > upto + 1 && *at <= started)
                    .map(|(&first, _)| first)
                    .collect();
                for first in stale {
                    sync.held.remove(&first);
                    self.stats.stale += 1;
                }
            }
            sync.gap_since = (!sync.held.is_empty()).then(Instant::now);
        } else {
            // More to read: at once.
            sync.catch_up = true;
        }
        if !sync.held.is_empty() || sync.catch_up {
            self.pending.insert(room);
        }
    }

    /// Broker figures for `/metrics`: (up, published, received, live
    /// processes); without a broker, down and nothing.
    pub(super) fn broker_figures(&self) -> (bool, u64, u64, u64) {
        self.broker.as_ref().map_or((false, 0, 0, 0), |b| {
            let s = &b.stats;
            (
                s.subscriber_up.load(Ordering::Relaxed) && s.publisher_up.load(Ordering::Relaxed),
                s.published.load(Ordering::Relaxed),
                s.received.load(Ordering::Relaxed),
                s.instances.load(Ordering::Relaxed),
            )
        })
    }
}

/// Every message of `room` after `upto`, oldest first (on a worker): the
/// store answers the newest of a range, so a long gap is paged backwards.
/// True when it is all there (not cut at [`READ_PAGES`]).
fn read_after(store: &dyn Store, room: &str, upto: i64) -> StoreResult<(Vec<StoredMessage>, bool)> {
    let mut out = store.messages_after(room, upto, READ_LIMIT)?;
    let mut page_full = out.len() >= READ_LIMIT;
    for _ in 1..READ_PAGES {
        let Some(first) = out.first().map(|m| m.seq) else {
            break;
        };
        if !page_full || first <= upto + 1 {
            return Ok((out, true));
        }
        let older = store.messages_before(room, Some(first), READ_LIMIT)?;
        page_full = older.len() >= READ_LIMIT;
        let mut older: Vec<StoredMessage> = older.into_iter().filter(|m| m.seq > upto).collect();
        older.append(&mut out);
        out = older;
    }
    let done = !page_full || out.first().is_none_or(|m| m.seq <= upto + 1);
    Ok((out, done))
}

/// Deliver the held batches that now continue the stream.
fn drain(sync: &mut Sync, conns: &mut Conns, rooms: &mut Rooms, joins: &mut Joins, key: usize) {
    while let Some(entry) = sync.held.first_entry() {
        let upto = sync.upto.unwrap_or(i64::MIN);
        if *entry.key() > upto + 1 {
            break;
        }
        let (_, batch) = entry.remove();
        if let Some(part) = batch.after(upto) {
            sync.upto = Some(part.last_seq());
            deliver(conns, rooms, joins, key, &part);
        }
    }
    sync.gap_since = (!sync.held.is_empty()).then(Instant::now);
}

fn deliver(conns: &mut Conns, rooms: &mut Rooms, joins: &mut Joins, key: usize, batch: &Encoded) {
    fanout::deliver(conns, rooms, key, batch);
    joins.stored(rooms, key, batch);
}

/// The position of a room whose stream has no known position yet: the
/// lowest of what its live members have had. `None` while all are joining.
fn live_position(conns: &Conns, rooms: &Rooms, key: usize) -> Option<i64> {
    let room = rooms.get(key)?;
    room.members
        .iter()
        .filter_map(|(_, &token)| match conns.kind(token) {
            // A member that has had nothing yet (an empty room) is at 0.
            Some(super::conns::Kind::Ws(w)) if matches!(w.phase, Phase::Live) => {
                Some(w.sent_upto.max(0))
            }
            _ => None,
        })
        .min()
}
