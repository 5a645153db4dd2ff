//! Which other server processes write the same database, and so whether the
//! history cache (`crate::history`) may be trusted.
//!
//! A cached history misses a message another process stored after it was
//! read. Several processes may share a database (MongoDB, or one SQLite data
//! directory), so each process announces itself on the store and reads who
//! else is there, every [`PERIOD`], on a thread of its own ([`start`]): a
//! document per process on MongoDB, a lock on a file beside the SQLite
//! database (`Store::announce`). The rules:
//!
//! - The cache is trusted only while this process's view is fresh (its last
//!   successful round started less than [`VIEW_MAX_AGE`] ago) and shows no
//!   other live process.
//! - A process that finds others when it announces itself (at start, or
//!   after a break in its view) writes nothing until it has been announced
//!   for [`WRITE_DELAY`], which is longer than `VIEW_MAX_AGE`: so any process
//!   that serves from its cache after that first write has, in a fresh view,
//!   seen the writer. One that finds nobody writes at once: a process
//!   starting later finds it, and waits.
//! - Every round that sees another process, the round after it, and a round
//!   after a break in the view (a failed round, a long pause, or a lost
//!   connection to the database, which may come back empty) start a new
//!   *generation*. A cache entry is
//!   served only under the generation its store read began in, so an entry
//!   that could have missed another process's write is never served.
//! - A lost connection ends trust at once, not at the next round: from the
//!   moment the store counts the loss until a round begun after it has
//!   succeeded (and so started a new generation), nothing is served from
//!   the cache.
//! - A process is taken for gone when its counter has not moved for
//!   [`DEAD_AFTER`] (no clocks are compared across hosts); one that stops
//!   cleanly withdraws at once.
//!
//! The reactor asks [`Presence::generation`] and [`Presence::may_write`];
//! `/metrics` shows [`Presence::peers`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreResult};

/// How often a process announces itself and looks at the others.
pub const PERIOD: Duration = Duration::from_millis(250);
/// How old a view may be and still be trusted.
pub const VIEW_MAX_AGE: Duration = Duration::from_millis(1000);
/// How long a process announces itself before its first write.
pub const WRITE_DELAY: Duration = Duration::from_millis(1250);
/// A process whose counter has not moved for this long is gone.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How old this process's view may be while it writes: well under
/// `DEAD_AFTER`, so that the others still count it as present. A break
/// longer than this counts as leaving: the process announces itself for
/// `WRITE_DELAY` again before writing.
pub const WRITE_VIEW_MAX_AGE: Duration = Duration::from_secs(3);
/// Records of processes gone this long are removed from the database.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Never: a time (in milliseconds since `start`) that is not reached.
const NEVER: u64 = u64::MAX;

/// Reads the store's count of lost connections (`Store::connection_losses`).
pub type LossCount = Box<dyn Fn() -> u64 + Send + Sync>;

pub struct Presence {
    started: Instant,
    /// The store's count of lost connections, now.
    losses: LossCount,
    /// That count when the last successful round began.
    losses_at_view: AtomicU64,
    /// `generation << 1 | alone`, in one atomic so both change together.
    state: AtomicU64,
    /// When the last successful round started, in ms since `started` (plus
    /// one; 0 = never).
    view_at: AtomicU64,
    /// From when this process may write, in ms since `started`.
    writable_from: AtomicU64,
    /// Other live processes in the last view.
    peers: AtomicU64,
    stop: AtomicBool,
}

impl Presence {
    /// Nothing is trusted or written until [`start`]'s thread has a view.
    /// `losses` reads the store's count of lost connections.
    pub fn new(losses: LossCount) -> Arc<Presence> {
        Arc::new(Presence {
            started: Instant::now(),
            losses,
            losses_at_view: AtomicU64::new(0),
            state: AtomicU64::new(0),
            view_at: AtomicU64::new(0),
            writable_from: AtomicU64::new(NEVER),
            peers: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The generation a cache entry must carry to be served now, or `None`
    /// when the cache is not to be trusted (another process may be writing,
    /// this view is too old to say, or the connection to the database was
    /// lost since the view began).
    pub fn generation(&self) -> Option<u64> {
        let state = self.state.load(Ordering::SeqCst);
        let view_at = self.view_at.load(Ordering::SeqCst);
        let fresh = view_at > 0
            && self.now_ms().saturating_sub(view_at - 1) < VIEW_MAX_AGE.as_millis() as u64;
        let connected = (self.losses)() == self.losses_at_view.load(Ordering::SeqCst);
        (fresh && connected && state & 1 == 1).then_some(state >> 1)
    }

    /// Whether this process may write the database now.
    pub fn may_write(&self) -> bool {
        let now = self.now_ms();
        let view_at = self.view_at.load(Ordering::SeqCst);
        view_at > 0
            && now.saturating_sub(view_at - 1) < WRITE_VIEW_MAX_AGE.as_millis() as u64
            && now >= self.writable_from.load(Ordering::SeqCst)
    }

    /// Other live server processes on this database.
    pub fn peers(&self) -> u64 {
        self.peers.load(Ordering::Relaxed)
    }

    /// Ask the announcing thread to withdraw and end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What the announcing thread remembers between rounds.
struct View {
    me: String,
    beat: i64,
    /// Each other process's last counter and when it was seen to change.
    seen: HashMap<String, (i64, Instant)>,
    generation: u64,
    others_before: bool,
    last_ok: Option<Instant>,
    /// A round failed since the last one that did not.
    failed: bool,
    /// The store's count of lost connections at the last round.
    losses: u64,
    /// From when this process may write, once announced.
    writable_from: Option<Instant>,
}

impl View {
    /// Before the first round: nobody seen, so nothing trusted yet.
    fn new(me: String) -> View {
        View {
            me,
            beat: 0,
            seen: HashMap::new(),
            generation: 0,
            others_before: true,
            last_ok: None,
            failed: false,
            losses: 0,
            writable_from: None,
        }
    }
}

/// Start announcing this process on `store` every [`PERIOD`] until
/// [`Presence::stop`]; the thread withdraws the process before it ends.
pub fn start(presence: Arc<Presence>, store: Arc<dyn Store>) -> std::io::Result<JoinHandle<()>> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let me = format!(
        "{}-{}-{}",
        host,
        std::process::id(),
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    std::thread::Builder::new()
        .name("presence".into())
        .spawn(move || {
            let mut view = View::new(me);
            while !presence.stop.load(Ordering::SeqCst) {
                let began = Instant::now();
                round(&presence, store.as_ref(), &mut view, began);
                let spent = began.elapsed();
                if spent < PERIOD {
                    std::thread::sleep(PERIOD - spent);
                }
            }
            if let Err(e) = store.withdraw(&view.me) {
                log::warn!("could not withdraw this process from the database: {e}");
            }
        })
}

/// One announcement and look at the others.
fn round(presence: &Presence, store: &dyn Store, view: &mut View, began: Instant) {
    view.beat += 1;
    note_losses(presence, view);
    let list = store.announce(&view.me, view.beat);
    for id in apply(presence, view, list, began) {
        let _ = store.withdraw(&id);
    }
}

/// Before a round: a connection lost since the last one is a break in the
/// view, as a failed round is.
fn note_losses(presence: &Presence, view: &mut View) {
    let losses = (presence.losses)();
    if losses != view.losses {
        view.losses = losses;
        view.failed = true;
    }
}

/// Take in the list of announced processes (or the failure to get it) of a
/// round that began at `began`; returns the processes gone so long that
/// their announcements should be removed.
fn apply(
    presence: &Presence,
    view: &mut View,
    list: StoreResult<Vec<(String, i64)>>,
    began: Instant,
) -> Vec<String> {
    let list = match list {
        Ok(list) => list,
        Err(e) => {
            log::debug!("presence round failed: {e}");
            view.failed = true;
            return Vec::new();
        }
    };
    let now = Instant::now();
    let mut forget = Vec::new();
    let mut others = 0;
    let mut present = Vec::with_capacity(list.len());
    for (id, beat) in list {
        if id == view.me {
            continue;
        }
        let entry = view.seen.entry(id.clone()).or_insert((beat, now));
        if entry.0 != beat {
            *entry = (beat, now);
        }
        let still = now.duration_since(entry.1);
        if still < DEAD_AFTER {
            others += 1;
        } else if still >= FORGET_AFTER {
            forget.push(id.clone());
        }
        present.push(id);
    }
    view.seen.retain(|id, _| present.contains(id));

    let gap = view.last_ok.map(|t| began.duration_since(t));
    let broken = view.failed || gap.is_none_or(|g| g >= VIEW_MAX_AGE);
    view.failed = false;
    if gap.is_none_or(|g| g >= WRITE_VIEW_MAX_AGE) {
        // Announced anew: others may not know of this process yet.
        let delay = if others > 0 {
            WRITE_DELAY
        } else {
            Duration::ZERO
        };
        view.writable_from = Some(began + delay);
    }
    if others > 0 || view.others_before || broken {
        view.generation += 1;
    }
    view.others_before = others > 0;
    view.last_ok = Some(began);

    let alone = u64::from(others == 0);
    presence
        .state
        .store(view.generation << 1 | alone, Ordering::SeqCst);
    let at = began.duration_since(presence.started).as_millis() as u64;
    presence.view_at.store(at + 1, Ordering::SeqCst);
    let from = view.writable_from.unwrap_or(began + WRITE_DELAY);
    presence.writable_from.store(
        from.duration_since(presence.started).as_millis() as u64,
        Ordering::SeqCst,
    );
    presence.peers.store(others, Ordering::Relaxed);
    // After the new generation: a reader that sees this count also sees
    // the generation started for it.
    presence.losses_at_view.store(view.losses, Ordering::SeqCst);
    forget
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::{StoreError, StoreResult};

    /// The announcement part of a store: a list of who is there, or down.
    struct Board {
        others: std::sync::Mutex<Option<Vec<(String, i64)>>>,
    }

    impl Board {
        fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
            let others = self.others.lock().unwrap().clone();
            let mut all = others.ok_or(StoreError::Unavailable("down".into()))?;
            all.push((me.to_owned(), beat));
            Ok(all)
        }
    }

    fn view() -> View {
        View::new("me".into())
    }

    fn step(p: &Presence, board: &Board, v: &mut View, began: Instant) {
        v.beat += 1;
        note_losses(p, v);
        let list = board.announce(&v.me, v.beat);
        apply(p, v, list, began);
    }

    #[test]
    fn nothing_is_trusted_or_written_before_a_view() {
        let p = Presence::new(Box::new(|| 0));
        assert_eq!(p.generation(), None);
        assert!(!p.may_write());
    }

    #[test]
    fn alone_a_process_trusts_its_cache_and_writes_at_once() {
        let p = Presence::new(Box::new(|| 0));
        let board = Board {
            others: std::sync::Mutex::new(Some(Vec::new())),
        };
        let mut v = view();
        step(&p, &board, &mut v, Instant::now());
        let g = p.generation().expect("trusted");
        assert!(p.may_write());
        step(&p, &board, &mut v, Instant::now());
        assert_eq!(
            p.generation(),
            Some(g),
            "a quiet round keeps the generation"
        );
    }

    #[test]
    fn another_process_ends_trust_until_a_round_after_it_is_gone() {
        let p = Presence::new(Box::new(|| 0));
        let board = Board {
            others: std::sync::Mutex::new(Some(vec![("other".into(), 1)])),
        };
        let mut v = view();
        step(&p, &board, &mut v, Instant::now());
        assert_eq!(p.generation(), None, "not alone");
        assert!(!p.may_write(), "others must see this process first");
        *board.others.lock().unwrap() = Some(Vec::new());
        step(&p, &board, &mut v, Instant::now());
        let g = p.generation().expect("alone again");
        step(&p, &board, &mut v, Instant::now());
        assert_eq!(p.generation(), Some(g));
        assert_eq!(p.peers(), 0);
    }

    #[test]
    fn a_break_in_the_view_starts_a_new_generation() {
        let p = Presence::new(Box::new(|| 0));
        let board = Board {
            others: std::sync::Mutex::new(Some(Vec::new())),
        };
        let mut v = view();
        let t0 = Instant::now();
        step(&p, &board, &mut v, t0);
        let g = v.generation;
        *board.others.lock().unwrap() = None;
        step(&p, &board, &mut v, t0 + PERIOD);
        *board.others.lock().unwrap() = Some(Vec::new());
        step(&p, &board, &mut v, t0 + 2 * PERIOD);
        assert!(v.generation > g, "a failed round starts a new generation");
        let g = v.generation;
        step(&p, &board, &mut v, t0 + 3 * PERIOD);
        assert_eq!(v.generation, g);
        step(&p, &board, &mut v, t0 + 4 * PERIOD + VIEW_MAX_AGE);
        assert!(v.generation > g, "so does a long pause");
    }

    #[test]
    fn a_lost_connection_ends_trust_at_once_until_a_round_after_it() {
        let lost = Arc::new(AtomicU64::new(0));
        let count = lost.clone();
        let p = Presence::new(Box::new(move || count.load(Ordering::SeqCst)));
        let board = Board {
            others: std::sync::Mutex::new(Some(Vec::new())),
        };
        let mut v = view();
        step(&p, &board, &mut v, Instant::now());
        let g = p.generation().expect("trusted");
        lost.fetch_add(1, Ordering::SeqCst);
        assert_eq!(p.generation(), None, "distrusted before the next round");
        step(&p, &board, &mut v, Instant::now());
        let after = p.generation().expect("trusted again after a round");
        assert!(after > g, "under a new generation: {after} after {g}");
    }
}
