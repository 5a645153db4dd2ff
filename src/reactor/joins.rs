//! Joining a room: a new member gets the room's recent history, then goes
//! live, with nothing twice and no gap.
//!
//! The part [`Joins`] owns the history cache (`crate::history`), the room
//! reads under way, and the queue of store reads waiting for the store lane.
//! A join is answered, in order of preference:
//!
//! 1. **from the cache**, with no store call, when the room is cached under
//!    the current presence generation (`crate::presence`): at once;
//! 2. **from the room's read**: the first join of an uncached room starts one
//!    read (`ensure_room` and the newest `HISTORY_LIMIT` messages); every
//!    join of that room until it is back waits for the same read, which then
//!    fills the cache and answers them all, resumes included where it holds
//!    their position;
//! 3. **from a read of its own**, for a resume (`since=`) older than what the
//!    room's history holds (`messages_after`, up to `RESUME_LIMIT`).
//!
//! While a read is out, the batches stored for the room are kept with it
//! (`Load::stored`) and each waiting member buffers them too
//! (`Phase::Joining`): the history ends where they begin. Reads wait in this
//! part's queue, not the lane's, so no join is refused because the store is
//! slow: at most `read_slots` are in the lane at once, and message writes
//! have a lane of their own.
//!
//! Called by the upgrade (`http_conn.rs`), by completions (a read is back),
//! by the pipeline (a batch is stored or failed, a read waited for it), and by
//! completions again when a room is deleted.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use super::completions::{Lanes, Outcome};
use super::conns::Conns;
use super::fanout::Encoded;
use super::pipeline::Pipeline;
use super::ws_conn::{self, Phase};
use crate::api::Upgrade;
use crate::config::Config;
use crate::history::{self, Answer, Frame, HistoryCache};
use crate::outbuf::Chunk;
use crate::presence::Presence;
use crate::rooms::{ConnRef, DeferredJoin, Rooms};
use crate::store::{Room, Store, StoreResult, StoredMessage};
use crate::workers::Job;
use crate::ws::{self, close};

pub use crate::history::RESUME_LIMIT;

/// A room's history read under way.
struct Load {
    /// Which incarnation of the registry entry asked (`rooms::Room::id`).
    room_id: u64,
    /// Members waiting for it, with their `since`.
    waiters: Vec<(ConnRef, Option<i64>)>,
    /// Batches of the room stored since the read was asked for.
    stored: Vec<Frame>,
    /// A batch of the room failed meanwhile: the read may have seen its
    /// messages before they were taken back, so it is not cached.
    tainted: bool,
    /// The presence generation when the read was asked for; `None`: not to
    /// be cached.
    generation: Option<u64>,
    /// The read came back while a batch of the room was in flight; it is
    /// answered once that batch is done.
    held: Option<StoreResult<Vec<StoredMessage>>>,
}

/// A store read waiting for room in the store lane.
#[derive(Clone)]
enum Read {
    /// A room's history (creating the room if it is new).
    Room {
        room_key: usize,
        room_id: u64,
        room: Room,
    },
    /// One member's resume from before what the room's history holds.
    Resume {
        conn: ConnRef,
        room: String,
        since: i64,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct JoinStats {
    /// Joins answered without a read of their own (a shared read, or the
    /// cache).
    pub(super) shared_reads: u64,
    /// Room history reads and resume reads sent to the store.
    pub(super) room_reads: u64,
    pub(super) resume_reads: u64,
    pub(super) reads_waiting: usize,
}

pub(super) struct Joins {
    cache: HistoryCache,
    presence: Arc<Presence>,
    loads: HashMap<usize, Load>,
    waiting: VecDeque<Read>,
    inflight: usize,
    /// Most reads in the store lane at once.
    read_slots: usize,
    history_limit: usize,
    stats: JoinStats,
}

impl Joins {
    pub(super) fn new(cfg: &Config, presence: Arc<Presence>, read_slots: usize) -> Joins {
        Joins {
            cache: HistoryCache::new(cfg.history_cache, cfg.history_limit),
            presence,
            loads: HashMap::new(),
            waiting: VecDeque::new(),
            inflight: 0,
            read_slots: read_slots.max(1),
            history_limit: cfg.history_limit,
            stats: JoinStats::default(),
        }
    }

    pub(super) fn cache_stats(&self) -> history::CacheStats {
        self.cache.stats()
    }

    pub(super) fn stats(&self) -> JoinStats {
        JoinStats {
            reads_waiting: self.waiting.len(),
            ..self.stats
        }
    }

    pub(super) fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Reads wait and one may go to the lane now.
    pub(super) fn can_submit(&self) -> bool {
        !self.waiting.is_empty() && self.inflight < self.read_slots
    }

    /// Hand waiting reads to the store lane, as many as may be in flight.
    /// A lane full of other work (REST calls) keeps them for a later pass.
    pub(super) fn submit(&mut self, lanes: &Lanes) {
        while self.can_submit() && !lanes.store_full() {
            let Some(read) = self.waiting.pop_front() else {
                return;
            };
            match lanes.store.try_submit(self.read_job(read.clone())) {
                Ok(()) => self.inflight += 1,
                Err(_) => {
                    self.waiting.push_front(read);
                    return;
                }
            }
        }
    }

    fn read_job(&mut self, read: Read) -> Job<Outcome> {
        match read {
            Read::Room {
                room_key,
                room_id,
                room,
            } => {
                self.stats.room_reads += 1;
                let limit = self.history_limit;
                Box::new(move |store: &dyn Store| {
                    let result = store
                        .ensure_room(&room)
                        .and_then(|_| store.messages_before(&room.name, None, limit));
                    Outcome::Loaded {
                        room_key,
                        room_id,
                        result,
                    }
                })
            }
            Read::Resume { conn, room, since } => {
                self.stats.resume_reads += 1;
                Box::new(move |store: &dyn Store| {
                    let result = store.messages_after(&room, since, RESUME_LIMIT);
                    Outcome::Joined {
                        conn,
                        room,
                        since: Some(since),
                        result,
                    }
                })
            }
        }
    }

    /// A read sent by [`submit`](Self::submit) is back.
    pub(super) fn read_done(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// A batch of room `room_key` is stored: it extends the room's cached
    /// history and its read under way, if it has either.
    pub(super) fn stored(&mut self, rooms: &Rooms, room_key: usize, batch: &Encoded) {
        let Some(room) = rooms.get(room_key) else {
            return;
        };
        let load = self
            .loads
            .get_mut(&room_key)
            .filter(|l| l.room_id == room.id);
        if load.is_none() && !self.cache.contains(&room.name) {
            return;
        }
        let frames = batch.frames();
        if let Some(load) = load {
            load.stored.extend_from_slice(&frames);
        }
        self.cache
            .append(&room.name, &frames, |n| rooms.member_count(n) > 0);
    }

    /// A batch of room `room_key` failed: a read under way may have seen
    /// its messages before they were taken back.
    pub(super) fn failed(&mut self, room_key: usize) {
        if let Some(load) = self.loads.get_mut(&room_key) {
            load.tainted = true;
        }
    }

    /// Room `name` is gone from the store (deleted, or found missing).
    pub(super) fn forget(&mut self, name: &str) {
        self.cache.remove(name);
    }
}

/// Encode stored messages as cache frames.
fn frames_of<'a>(stored: impl Iterator<Item = &'a StoredMessage>) -> Vec<Frame> {
    stored
        .map(|m| {
            let mut bytes = Vec::new();
            ws::message_frame_into(&mut bytes, m);
            (m.seq, Rc::from(bytes))
        })
        .collect()
}

/// A new member of room `up.room` (connection `conn`, already in the room as
/// *joining*): answer it from the cache, or have it wait for the room's
/// read, starting one if there is none.
pub(super) fn begin(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    joins: &mut Joins,
    conn: ConnRef,
    up: &Upgrade,
) {
    let Some(room_key) = conns.ws_mut(conn.token).map(|w| w.room_key) else {
        return;
    };
    let Some(room_id) = rooms.get(room_key).map(|r| r.id) else {
        return;
    };
    let generation = joins.presence.generation();
    match joins.cache.serve(&up.room, generation, up.since) {
        Some(Answer::History(bytes, last)) => {
            // A trusted entry means the room is in the store.
            if let Some(r) = rooms.get_mut(room_key) {
                pipeline.confirm(room_key, r);
            }
            joins.stats.shared_reads += 1;
            return go_live(conns, rooms, conn, bytes, last);
        }
        Some(Answer::TooOld) => {
            joins.waiting.push_back(Read::Resume {
                conn,
                room: up.room.clone(),
                since: up.since.unwrap_or(0),
            });
            return;
        }
        None => {}
    }
    if let Some(load) = joins.loads.get_mut(&room_key) {
        if load.room_id == room_id {
            load.waiters.push((conn, up.since));
            joins.stats.shared_reads += 1;
            return;
        }
    }
    joins.loads.insert(
        room_key,
        Load {
            room_id,
            waiters: vec![(conn, up.since)],
            stored: Vec::new(),
            tainted: false,
            generation,
            held: None,
        },
    );
    joins.waiting.push_back(Read::Room {
        room_key,
        room_id,
        room: Room {
            name: up.room.clone(),
            creator: up.username.clone(),
            created_at: ws::now_millis(),
        },
    });
}

/// A room's history read is back.
pub(super) fn loaded(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    joins: &mut Joins,
    room_key: usize,
    room_id: u64,
    result: StoreResult<Vec<StoredMessage>>,
) {
    let Some(load) = joins.loads.get_mut(&room_key) else {
        return;
    };
    if load.room_id != room_id {
        return; // for an entry dropped since; the new one has its own read
    }
    let Some(room) = rooms.get_live(room_key, room_id) else {
        joins.loads.remove(&room_key);
        return; // everyone left
    };
    // The read ran beside this room's batch in flight: it may hold part of
    // it. It is answered once that batch is stored and kept in `stored`.
    if room.inflight && result.is_ok() {
        load.held = Some(result);
        return;
    }
    let Some(load) = joins.loads.remove(&room_key) else {
        return;
    };
    let history = match result {
        Ok(h) => h,
        Err(e) => {
            log::warn!("join failed: {e}");
            for (conn, _) in load.waiters {
                refuse(conns, rooms, conn);
            }
            return;
        }
    };
    // The room exists in the store now: its batches may go.
    let name = room.name.clone();
    let fenced = room.deleting > 0 || room.tombstone;
    pipeline.confirm(room_key, room);

    // Every message stored above `floor` is in `frames`: the history (all
    // of the room when it is shorter than asked), then what was stored
    // meanwhile.
    let floor = if history.len() < joins.history_limit {
        0
    } else {
        history.first().map_or(0, |m| m.seq - 1)
    };
    let first_stored = load.stored.first().map(|f| f.0);
    let mut frames = frames_of(
        history
            .iter()
            .filter(|m| first_stored.is_none_or(|f| m.seq < f)),
    );
    frames.extend(load.stored);
    if let (Some(generation), false, false) = (load.generation, load.tainted, fenced) {
        joins.cache.fill(&name, floor, &frames, generation, |n| {
            rooms.member_count(n) > 0
        });
    }
    let mut newest = None;
    for (conn, since) in load.waiters {
        match history::answer(&frames, floor, since, joins.history_limit, &mut newest) {
            Answer::History(bytes, last) => go_live(conns, rooms, conn, bytes, last),
            Answer::TooOld => joins.waiting.push_back(Read::Resume {
                conn,
                room: name.to_string(),
                since: since.unwrap_or(0),
            }),
        }
    }
}

/// Room `room_key`'s batch in flight is done: a read held for it goes on.
pub(super) fn batch_done(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    joins: &mut Joins,
    room_key: usize,
) {
    let Some(load) = joins.loads.get_mut(&room_key) else {
        return;
    };
    let Some(result) = load.held.take() else {
        return;
    };
    let room_id = load.room_id;
    loaded(conns, rooms, pipeline, joins, room_key, room_id, result);
}

/// Tell a member its room could not be loaded, and close it.
fn refuse(conns: &mut Conns, rooms: &mut Rooms, conn: ConnRef) {
    if !conns.live(conn) {
        return;
    }
    ws_conn::send_error(
        conns,
        rooms,
        conn.token,
        "store_unavailable",
        "cannot load the room: the store is unavailable",
    );
    ws_conn::send_close(
        conns,
        rooms,
        conn.token,
        close::INTERNAL,
        "store unavailable",
        false,
    );
}

/// Send a joining member `history` (frames back to back, up to seq `last`,
/// the newest stored) and make it live. What it buffered while waiting is in
/// the history already, unless newer.
fn go_live(conns: &mut Conns, rooms: &mut Rooms, conn: ConnRef, history: Rc<Chunk>, last: i64) {
    if !conns.live(conn) {
        return;
    }
    let Some(w) = conns.ws_mut(conn.token) else {
        return;
    };
    if !matches!(w.phase, Phase::Joining { .. }) {
        return; // closed while waiting
    }
    let Phase::Joining { buffered, .. } = std::mem::replace(&mut w.phase, Phase::Live) else {
        return;
    };
    let bytes_len = history.len();
    let out = &mut w.ws.get_mut().out;
    if bytes_len > 0 {
        out.push(history);
    }
    w.sent_upto = last;
    let mut delivered = 0;
    for (seq, frame) in buffered {
        if seq > w.sent_upto {
            out.push(frame.chunk());
            w.sent_upto = seq;
            delivered += 1;
        }
    }
    // The history itself does not count against the backlog limit.
    w.allowance = bytes_len;
    conns.counters.messages_delivered += delivered;
    ws_conn::schedule_flush(conns, rooms, conn.token);
}

/// A member's own resume read is back.
pub(super) fn history_read(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    conn: ConnRef,
    room: String,
    since: Option<i64>,
    result: StoreResult<Vec<StoredMessage>>,
) {
    // As for a room's read: with a batch of the room in flight, the read
    // may hold part of it, so the member takes it once the batch is out.
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

/// Send a member its resume and the messages buffered since it joined, and
/// make it live.
pub(super) fn joined(
    conns: &mut Conns,
    rooms: &mut Rooms,
    pipeline: &mut Pipeline,
    conn: ConnRef,
    room: &str,
    since: Option<i64>,
    result: StoreResult<Vec<StoredMessage>>,
) {
    if result.is_ok() {
        if let Some(key) = rooms.key_of(room) {
            if let Some(r) = rooms.get_mut(key) {
                pipeline.confirm(key, r);
            }
        }
    }
    if !conns.live(conn) {
        return;
    }
    let history = match result {
        Ok(h) => h,
        Err(e) => {
            log::warn!("resume failed: {e}");
            return refuse(conns, rooms, conn);
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
    out.push(Chunk::new(bytes));
    let mut delivered = 0;
    for (seq, frame) in buffered {
        if since.is_none_or(|s| seq > s) {
            out.push(frame.chunk());
            delivered += 1;
        }
    }
    // The history itself does not count against the backlog limit.
    w.allowance = bytes_len;
    conns.counters.messages_delivered += delivered;
    ws_conn::schedule_flush(conns, rooms, conn.token);
}
