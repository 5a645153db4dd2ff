//! Recent history in memory: the newest `HISTORY_LIMIT` stored messages of
//! each recently used room, as encoded frames, so that a join (and a `since=`
//! resume within that range) is answered without a store call.
//!
//! Owned by the reactor thread (the frames are `Rc`s shared with the
//! connections' queues). `reactor/joins.rs` fills an entry from a room's
//! history read and serves joins from it; `reactor/pipeline.rs` appends every
//! batch the store confirms; a delete removes the room.
//!
//! An entry is *complete above its floor*: every message stored in the room
//! with a `seq` above `floor` is in it, in order. A batch that does not
//! continue the entry (its first `seq` past the next one expected) means a
//! write this process did not see, and the entry is dropped. Whether an entry
//! may be trusted at all when other processes can write the database is the
//! caller's question: each entry records the presence generation it was filled
//! under (`crate::presence`), and the caller serves it only while that
//! generation is current.
//!
//! The cache has a byte budget. Filling past it evicts the least recently
//! used rooms, rooms without members first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;

use crate::outbuf::Chunk;

/// One frame of the cache: a message's `seq` and its encoded frame.
pub type Frame = (i64, Rc<[u8]>);

/// Fixed cost counted per entry and per frame on top of the frame bytes, so
/// the budget also covers the bookkeeping of many tiny messages.
const ENTRY_OVERHEAD: usize = 128;
const FRAME_OVERHEAD: usize = 40;

struct Entry {
    frames: VecDeque<Frame>,
    /// Every stored message with a `seq` above this is in `frames`.
    floor: i64,
    /// Bytes counted against the budget.
    bytes: usize,
    /// Position in the recency order (`HistoryCache::order`).
    tick: u64,
    /// Presence generation the entry was filled under.
    generation: u64,
    /// What a new member gets, built by the first one and shared by all
    /// until the next batch.
    newest: Option<Rc<Chunk>>,
}

impl Entry {
    /// Highest seq the entry knows (its floor when it holds nothing).
    fn last(&self) -> i64 {
        self.frames.back().map_or(self.floor, |f| f.0)
    }
}

/// Most messages sent instead of the recent history when a client resumes
/// with `since=`.
pub const RESUME_LIMIT: usize = 1000;

/// What the cache can give a join.
pub enum Answer {
    /// The frames to send, oldest first, back to back in one shared chunk,
    /// and the highest seq the room has stored (what the member has now seen
    /// up to). Every new member of a room shares one chunk.
    History(Rc<Chunk>, i64),
    /// The member resumes from before what the cache holds: the store must
    /// answer.
    TooOld,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub rooms: usize,
    pub bytes: usize,
    pub budget: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub invalidations: u64,
}

pub struct HistoryCache {
    entries: HashMap<Rc<str>, Entry>,
    /// Recency order: tick -> room; the smallest tick is the least recently used.
    order: BTreeMap<u64, Rc<str>>,
    next_tick: u64,
    bytes: usize,
    budget: usize,
    limit: usize,
    stats: CacheStats,
}

/// What a member that has seen up to `since` (none: a new member) should
/// get of `frames`, given that the room holds everything above `floor`.
/// `newest` keeps the new members' chunk, built on first use.
pub fn answer(
    frames: &[Frame],
    floor: i64,
    since: Option<i64>,
    limit: usize,
    newest: &mut Option<Rc<Chunk>>,
) -> Answer {
    let last = frames.last().map_or(floor, |f| f.0);
    match since {
        // A position at or past the newest message: nothing to resend. Past
        // the newest is no position in this room (the client saw an earlier
        // room of this name): it gets what a new member gets.
        Some(s) if s == last => Answer::History(Chunk::new(Vec::new()), last),
        // Seqs start at 1: a floor of 0 holds the whole room.
        Some(s) if s < last && s < floor && floor > 0 => Answer::TooOld,
        Some(s) if s < last => {
            let after = frames.partition_point(|f| f.0 <= s);
            let from = after.max(frames.len().saturating_sub(RESUME_LIMIT));
            Answer::History(concat(&frames[from..]), last)
        }
        _ => {
            let chunk = newest.get_or_insert_with(|| {
                let from = frames.len().saturating_sub(limit);
                concat(&frames[from..])
            });
            Answer::History(chunk.clone(), last)
        }
    }
}

/// Frames back to back in one chunk.
pub fn concat(frames: &[Frame]) -> Rc<Chunk> {
    let mut bytes = Vec::with_capacity(frames.iter().map(|f| f.1.len()).sum());
    for f in frames {
        bytes.extend_from_slice(&f.1);
    }
    Chunk::new(bytes)
}

fn frame_cost(f: &Frame) -> usize {
    f.1.len() + FRAME_OVERHEAD
}

impl HistoryCache {
    /// A cache of at most `budget` bytes keeping `limit` messages per room.
    pub fn new(budget: usize, limit: usize) -> HistoryCache {
        HistoryCache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
            budget,
            limit,
            stats: CacheStats {
                budget,
                ..CacheStats::default()
            },
        }
    }

    /// Answer a join of `room` from memory if the room is cached under
    /// `generation` (`None`: nothing may be trusted now); `None` (counted as
    /// a miss) when the store must be read.
    pub fn serve(
        &mut self,
        room: &str,
        generation: Option<u64>,
        since: Option<i64>,
    ) -> Option<Answer> {
        let stale = match self.entries.get(room) {
            Some(e) if Some(e.generation) == generation => false,
            Some(_) => true,
            None => {
                self.stats.misses += 1;
                return None;
            }
        };
        if stale {
            self.remove(room);
            self.stats.invalidations += 1;
            self.stats.misses += 1;
            return None;
        }
        self.touch(room);
        let limit = self.limit;
        let e = self.entries.get_mut(room)?;
        let had_chunk = e.newest.is_some();
        let answer = answer(
            e.frames.make_contiguous(),
            e.floor,
            since,
            limit,
            &mut e.newest,
        );
        // The new members' chunk, once built, counts against the budget,
        // and is kept only if it fits.
        if let (false, Some(chunk)) = (had_chunk, &e.newest) {
            if self.bytes + chunk.len() <= self.budget {
                e.bytes += chunk.len();
                self.bytes += chunk.len();
            } else {
                e.newest = None;
            }
        }
        match answer {
            Answer::TooOld => self.stats.misses += 1,
            Answer::History(..) => self.stats.hits += 1,
        }
        Some(answer)
    }

    /// Keep `frames` (oldest first; every stored message above `floor`) as
    /// room `room`'s history, filled under `generation`. `active` says which
    /// rooms have members, for the choice of what to evict.
    pub fn fill(
        &mut self,
        room: &Rc<str>,
        floor: i64,
        frames: &[Frame],
        generation: u64,
        active: impl Fn(&str) -> bool,
    ) {
        self.remove(room);
        let keep = &frames[frames.len().saturating_sub(self.limit)..];
        let floor = if keep.len() < frames.len() {
            frames[frames.len() - keep.len() - 1].0
        } else {
            floor
        };
        let bytes = ENTRY_OVERHEAD + keep.iter().map(frame_cost).sum::<usize>();
        if bytes > self.budget {
            return;
        }
        self.bytes += bytes;
        let tick = self.bump();
        self.order.insert(tick, room.clone());
        self.entries.insert(
            room.clone(),
            Entry {
                frames: keep.iter().cloned().collect(),
                floor,
                bytes,
                tick,
                generation,
                newest: None,
            },
        );
        self.evict(&active);
    }

    /// A batch of room `room` is stored (seqs rising). It joins the entry
    /// if it continues it; a batch past the next expected seq means a write
    /// this process did not see, and the entry is dropped.
    pub fn append(&mut self, room: &str, batch: &[Frame], active: impl Fn(&str) -> bool) {
        let Some(first) = batch.first() else {
            return;
        };
        let Some(e) = self.entries.get_mut(room) else {
            return;
        };
        let last = e.last();
        if first.0 > last + 1 && !(e.frames.is_empty() && e.floor == 0) {
            self.remove(room);
            self.stats.invalidations += 1;
            return;
        }
        let mut added = 0;
        for f in batch.iter().filter(|f| f.0 > last) {
            added += frame_cost(f);
            e.frames.push_back(f.clone());
        }
        let mut removed = e.newest.take().map_or(0, |c| c.len());
        while e.frames.len() > self.limit {
            if let Some(old) = e.frames.pop_front() {
                removed += frame_cost(&old);
                e.floor = old.0;
            }
        }
        e.bytes = e.bytes + added - removed;
        self.bytes = self.bytes + added - removed;
        self.evict(&active);
    }

    /// Whether room `room` has an entry (trusted or not).
    pub fn contains(&self, room: &str) -> bool {
        self.entries.contains_key(room)
    }

    /// Forget room `room` (deleted, or no longer to be trusted).
    pub fn remove(&mut self, room: &str) {
        if let Some(e) = self.entries.remove(room) {
            self.order.remove(&e.tick);
            self.bytes -= e.bytes;
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            rooms: self.entries.len(),
            bytes: self.bytes,
            ..self.stats
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn touch(&mut self, room: &str) {
        let tick = self.bump();
        if let Some(e) = self.entries.get_mut(room) {
            if let Some(name) = self.order.remove(&e.tick) {
                self.order.insert(tick, name);
            }
            e.tick = tick;
        }
    }

    /// Drop least recently used rooms until the cache is within its budget:
    /// rooms without members first, then the others.
    fn evict(&mut self, active: &impl Fn(&str) -> bool) {
        if self.bytes <= self.budget {
            return;
        }
        for idle_only in [true, false] {
            let victims: Vec<Rc<str>> = self
                .order
                .values()
                .filter(|name| !idle_only || !active(name))
                .cloned()
                .collect();
            for name in victims {
                if self.bytes <= self.budget {
                    return;
                }
                self.remove(&name);
                self.stats.evictions += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(seqs: std::ops::RangeInclusive<i64>) -> Vec<Frame> {
        seqs.map(|s| (s, Rc::from(format!("frame {s}").into_bytes())))
            .collect()
    }

    /// The seqs of the test frames ("frame N") in an answer.
    fn seqs(a: &Answer) -> Vec<i64> {
        match a {
            Answer::History(bytes, _) => String::from_utf8_lossy(bytes)
                .split("frame ")
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("seq"))
                .collect(),
            Answer::TooOld => panic!("too old"),
        }
    }

    fn none(_: &str) -> bool {
        false
    }

    #[test]
    fn a_filled_room_answers_joins_and_resumes() {
        let mut c = HistoryCache::new(1 << 20, 5);
        let room: Rc<str> = Rc::from("General");
        c.fill(&room, 0, &frames(1..=8), 1, none);
        // Only the newest five are kept: the floor rises to 3.
        assert_eq!(
            seqs(&c.serve("General", Some(1), None).unwrap()),
            vec![4, 5, 6, 7, 8]
        );
        assert_eq!(
            seqs(&c.serve("General", Some(1), Some(6)).unwrap()),
            vec![7, 8]
        );
        assert_eq!(
            seqs(&c.serve("General", Some(1), Some(3)).unwrap()),
            vec![4, 5, 6, 7, 8]
        );
        assert!(matches!(
            c.serve("General", Some(1), Some(2)),
            Some(Answer::TooOld)
        ));
        assert_eq!(
            seqs(&c.serve("General", Some(1), Some(8)).unwrap()),
            Vec::<i64>::new()
        );
        // Past the newest: what a new member gets.
        assert_eq!(
            seqs(&c.serve("General", Some(1), Some(99)).unwrap()).len(),
            5
        );
        assert!(c.serve("Other", Some(1), None).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.rooms), (5, 2, 1));
    }

    #[test]
    fn batches_extend_an_entry_and_a_gap_drops_it() {
        let mut c = HistoryCache::new(1 << 20, 3);
        let room: Rc<str> = Rc::from("r");
        c.fill(&room, 0, &frames(1..=2), 1, none);
        // A batch the history already held in part: only the rest is added.
        c.append("r", &frames(2..=4), none);
        assert_eq!(seqs(&c.serve("r", Some(1), None).unwrap()), vec![2, 3, 4]);
        assert!(matches!(
            c.serve("r", Some(1), Some(0)),
            Some(Answer::TooOld)
        ));
        // Seq 5 was stored by someone else: the entry can no longer be trusted.
        c.append("r", &frames(6..=6), none);
        assert!(c.serve("r", Some(1), None).is_none());
        assert_eq!(c.stats().invalidations, 1);
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn an_empty_new_room_takes_any_first_batch() {
        let mut c = HistoryCache::new(1 << 20, 3);
        let room: Rc<str> = Rc::from("r");
        c.fill(&room, 0, &[], 1, none);
        c.append("r", &frames(1..=1), none);
        assert_eq!(seqs(&c.serve("r", Some(1), None).unwrap()), vec![1]);
    }

    #[test]
    fn another_generation_is_a_miss() {
        let mut c = HistoryCache::new(1 << 20, 3);
        let room: Rc<str> = Rc::from("r");
        c.fill(&room, 0, &frames(1..=2), 1, none);
        assert!(c.serve("r", Some(2), None).is_none());
        assert_eq!(c.stats().rooms, 0);
    }

    #[test]
    fn the_budget_evicts_idle_rooms_first_then_the_least_recent() {
        let one = ENTRY_OVERHEAD + 3 * (7 + FRAME_OVERHEAD);
        let mut c = HistoryCache::new(3 * one, 3);
        let names: Vec<Rc<str>> = ["a", "b", "c", "d"].iter().map(|n| Rc::from(*n)).collect();
        let active = |n: &str| n == "a";
        for n in &names[..3] {
            c.fill(n, 0, &frames(1..=3), 1, active);
        }
        assert_eq!(c.stats().bytes, 3 * one);
        // A resume: touches "b" without building the new members' chunk.
        c.serve("b", Some(1), Some(1));
        // "a" is the least recent but has members: "c" goes instead.
        c.fill(&names[3], 0, &frames(1..=3), 1, active);
        assert!(c.serve("c", Some(1), None).is_none());
        assert!(c.serve("a", Some(1), Some(1)).is_some());
        assert_eq!(c.stats().evictions, 1);
        // Only active rooms left over the budget: the least recent goes.
        let all = |_: &str| true;
        c.fill(&Rc::from("e"), 0, &frames(1..=3), 1, all);
        assert!(c.stats().bytes <= 3 * one);
        assert_eq!(c.stats().evictions, 2);
    }
}
