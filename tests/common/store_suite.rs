//! The store conformance suite: one function per contract of
//! `chatconnect::store::Store`, each taking `&dyn Store`, so that every
//! backend runs the very same checks.
//!
//! Every call makes its own names (random suffix), so the functions can run in
//! parallel against one shared database (a MongoDB used by several runs) and
//! never see each other's rows: where a call lists shared state (`list_rooms`)
//! it looks only at its own names.
//!
//! To run the list against a backend, from a test file at the crate root:
//!
//! ```ignore
//! #[path = "common/store_suite.rs"]
//! #[macro_use]
//! mod store_suite;
//!
//! fn open() -> store_suite::TestStore { /* build the backend */ }
//!
//! store_suite_tests!(open);
//! ```
//!
//! which expands to one `#[test]` per function in [`ALL`].

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use chatconnect::store::{
    DeleteOutcome, NewMessage, Room, RoomBatch, Store, StoreError, StoredMessage,
};

/// A backend under test plus whatever must live as long as it (a temp dir).
pub struct TestStore {
    pub store: Box<dyn Store>,
    pub keep: Option<Box<dyn std::any::Any>>,
}

impl TestStore {
    pub fn new(store: Box<dyn Store>, keep: Option<Box<dyn std::any::Any>>) -> TestStore {
        TestStore { store, keep }
    }
}

/// One contract check.
pub type Check = fn(&dyn Store);

/// Every contract, by name. `store_suite_tests!` makes one test of each.
pub const ALL: &[(&str, Check)] = &[
    ("ping_answers", ping_answers),
    ("user_create_and_read_hash", user_create_and_read_hash),
    ("unknown_user_has_no_hash", unknown_user_has_no_hash),
    ("duplicate_user_conflicts", duplicate_user_conflicts),
    ("create_room_then_get", create_room_then_get),
    ("unknown_room_is_none", unknown_room_is_none),
    ("duplicate_room_conflicts", duplicate_room_conflicts),
    (
        "ensure_room_creates_then_existing_wins",
        ensure_room_creates_then_existing_wins,
    ),
    (
        "ensure_room_keeps_room_made_by_create",
        ensure_room_keeps_room_made_by_create,
    ),
    (
        "list_rooms_oldest_first_ties_by_name",
        list_rooms_oldest_first_ties_by_name,
    ),
    (
        "delete_unknown_room_not_found",
        delete_unknown_room_not_found,
    ),
    (
        "delete_by_non_creator_forbidden_keeps_everything",
        delete_by_non_creator_forbidden_keeps_everything,
    ),
    (
        "delete_by_creator_removes_room_and_messages",
        delete_by_creator_removes_room_and_messages,
    ),
    (
        "append_numbers_from_one_in_slice_order",
        append_numbers_from_one_in_slice_order,
    ),
    (
        "append_continues_across_batches",
        append_continues_across_batches,
    ),
    (
        "append_to_missing_room_is_no_such_room",
        append_to_missing_room_is_no_such_room,
    ),
    (
        "append_after_delete_is_no_such_room",
        append_after_delete_is_no_such_room,
    ),
    ("rooms_number_independently", rooms_number_independently),
    (
        "append_many_numbers_each_room_on_its_own",
        append_many_numbers_each_room_on_its_own,
    ),
    (
        "append_many_missing_room_fails_alone",
        append_many_missing_room_fails_alone,
    ),
    (
        "concurrent_appends_get_unique_contiguous_seqs",
        concurrent_appends_get_unique_contiguous_seqs,
    ),
    (
        "messages_before_pages_oldest_first",
        messages_before_pages_oldest_first,
    ),
    (
        "messages_before_limit_larger_than_room",
        messages_before_limit_larger_than_room,
    ),
    (
        "messages_after_returns_what_follows",
        messages_after_returns_what_follows,
    ),
    (
        "messages_after_returns_newest_limit_when_more_match",
        messages_after_returns_newest_limit_when_more_match,
    ),
    ("messages_stay_in_their_room", messages_stay_in_their_room),
    ("content_round_trips_exactly", content_round_trips_exactly),
];

/// One `#[test]` per suite function, each on a fresh handle from `$open`
/// (a path to a `fn() -> store_suite::TestStore`). The suite module must be
/// declared at the crate root as `store_suite`.
#[macro_export]
macro_rules! store_suite_tests {
    ($open:path) => {
        $crate::store_suite_tests!(@each $open;
            ping_answers,
            user_create_and_read_hash,
            unknown_user_has_no_hash,
            duplicate_user_conflicts,
            create_room_then_get,
            unknown_room_is_none,
            duplicate_room_conflicts,
            ensure_room_creates_then_existing_wins,
            ensure_room_keeps_room_made_by_create,
            list_rooms_oldest_first_ties_by_name,
            delete_unknown_room_not_found,
            delete_by_non_creator_forbidden_keeps_everything,
            delete_by_creator_removes_room_and_messages,
            append_numbers_from_one_in_slice_order,
            append_continues_across_batches,
            append_to_missing_room_is_no_such_room,
            append_after_delete_is_no_such_room,
            rooms_number_independently,
            append_many_numbers_each_room_on_its_own,
            append_many_missing_room_fails_alone,
            concurrent_appends_get_unique_contiguous_seqs,
            messages_before_pages_oldest_first,
            messages_before_limit_larger_than_room,
            messages_after_returns_what_follows,
            messages_after_returns_newest_limit_when_more_match,
            messages_stay_in_their_room,
            content_round_trips_exactly
        );
    };
    (@each $open:path; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let handle: $crate::store_suite::TestStore = $open();
                $crate::store_suite::$name(&*handle.store);
            }
        )*
        /// Every check of the suite runs: see `store_suite::assert_complete`.
        #[test]
        fn suite_list_is_complete() {
            $crate::store_suite::assert_complete(&[$(stringify!($name)),*]);
        }
    };
}

/// The macro's list, [`ALL`] and the checks this file declares (every
/// `pub fn NAME(store: &dyn Store)`, read from its own source) must name the
/// same functions, so that a check left out of both lists fails the suite
/// instead of silently never running.
pub fn assert_complete(macro_list: &[&str]) {
    let all: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        macro_list,
        &all[..],
        "store_suite_tests! and ALL must list the same checks in the same order"
    );
    let declared = declared_checks();
    let not_in = |names: &[&'static str], list: &[&str]| -> Vec<&'static str> {
        names
            .iter()
            .copied()
            .filter(|n| !list.contains(n))
            .collect()
    };
    let unlisted = not_in(&declared, &all);
    assert!(
        unlisted.is_empty(),
        "checks in store_suite.rs that ALL and store_suite_tests! do not list: {unlisted:?}"
    );
    let unknown = not_in(&all, &declared);
    assert!(
        unknown.is_empty(),
        "listed, but no `pub fn NAME(store: &dyn Store)` in store_suite.rs: {unknown:?}"
    );
}

/// The names of the functions of this file (`pub` or not) whose one
/// parameter is a `&dyn Store`: the checks.
fn declared_checks() -> Vec<&'static str> {
    include_str!("store_suite.rs")
        .split('\n')
        .filter_map(|line| {
            line.strip_prefix("pub fn ")
                .or_else(|| line.strip_prefix("fn "))
        })
        .filter_map(|rest| {
            let (name, after) = rest.split_once('(')?;
            let params: Vec<&str> = after
                .split_once(')')?
                .0
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            let [param] = params.as_slice() else {
                return None;
            };
            let (_, ty) = param.split_once(':')?;
            (ty.trim() == "&dyn Store").then_some(name.trim())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Helpers

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A name no other call (in this process or another) will use.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // Mix pid, time and counter into a short random-looking suffix.
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    format!("{prefix}-{:012x}{n}", x & 0xffff_ffff_ffff)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn room(name: &str, creator: &str, created_at: i64) -> Room {
    Room {
        name: name.to_string(),
        creator: creator.to_string(),
        created_at,
    }
}

fn new_room(store: &dyn Store, creator: &str) -> Room {
    let r = room(&unique("room"), creator, now_ms());
    store.create_room(&r).expect("create_room");
    r
}

fn msg(username: &str, content: &str, timestamp: i64) -> NewMessage {
    NewMessage {
        username: username.to_string(),
        content: content.to_string(),
        timestamp,
    }
}

/// Append `n` messages `c0..c{n-1}` one batch at a time of `batch`.
fn fill(store: &dyn Store, room: &str, n: usize, batch: usize) -> Vec<StoredMessage> {
    let base = now_ms();
    let all: Vec<NewMessage> = (0..n)
        .map(|i| msg("filler", &format!("c{i}"), base + i as i64))
        .collect();
    let mut out = Vec::new();
    for chunk in all.chunks(batch) {
        out.extend(store.append_messages(room, chunk).expect("append_messages"));
    }
    out
}

fn seqs(msgs: &[StoredMessage]) -> Vec<i64> {
    msgs.iter().map(|m| m.seq).collect()
}

fn range(a: i64, b: i64) -> Vec<i64> {
    (a..=b).collect()
}

// ---------------------------------------------------------------------------
// Users

pub fn ping_answers(store: &dyn Store) {
    assert_eq!(store.ping(), Ok(()));
}

pub fn user_create_and_read_hash(store: &dyn Store) {
    let name = unique("user");
    let hash = "$2b$04$abcdefghijklmnopqrstuuJ0v5yNnq9CqV3GgBq8x4m0l8v0nQf2W";
    assert_eq!(store.create_user(&name, hash), Ok(()));
    assert_eq!(store.password_hash(&name), Ok(Some(hash.to_string())));
}

pub fn unknown_user_has_no_hash(store: &dyn Store) {
    assert_eq!(store.password_hash(&unique("nobody")), Ok(None));
}

pub fn duplicate_user_conflicts(store: &dyn Store) {
    let name = unique("dup");
    assert_eq!(store.create_user(&name, "$2b$04$first"), Ok(()));
    assert_eq!(
        store.create_user(&name, "$2b$04$second"),
        Err(StoreError::Conflict)
    );
    assert_eq!(
        store.password_hash(&name),
        Ok(Some("$2b$04$first".to_string())),
        "the first user must be kept"
    );
}

// ---------------------------------------------------------------------------
// Rooms

pub fn create_room_then_get(store: &dyn Store) {
    let r = room(&unique("room"), "alice", 1_700_000_000_123);
    assert_eq!(store.create_room(&r), Ok(()));
    assert_eq!(
        store.get_room(&r.name),
        Ok(Some(r.clone())),
        "created_at must round-trip to the millisecond"
    );
}

pub fn unknown_room_is_none(store: &dyn Store) {
    assert_eq!(store.get_room(&unique("nosuch")), Ok(None));
}

pub fn duplicate_room_conflicts(store: &dyn Store) {
    let r = new_room(store, "alice");
    let other = room(&r.name, "bob", r.created_at + 5);
    assert_eq!(store.create_room(&other), Err(StoreError::Conflict));
    assert_eq!(
        store.get_room(&r.name),
        Ok(Some(r)),
        "the first room must be kept"
    );
}

pub fn ensure_room_creates_then_existing_wins(store: &dyn Store) {
    let first = room(&unique("ens"), "alice", now_ms());
    assert_eq!(
        store.ensure_room(&first),
        Ok(first.clone()),
        "ensure_room creates a missing room"
    );
    assert_eq!(store.get_room(&first.name), Ok(Some(first.clone())));
    let second = room(&first.name, "bob", first.created_at + 1000);
    assert_eq!(
        store.ensure_room(&second),
        Ok(first.clone()),
        "the existing room wins"
    );
    assert_eq!(store.get_room(&first.name), Ok(Some(first)));
}

pub fn ensure_room_keeps_room_made_by_create(store: &dyn Store) {
    let r = new_room(store, "carol");
    let again = room(&r.name, "dave", r.created_at + 1);
    assert_eq!(store.ensure_room(&again), Ok(r.clone()));
    // and ensuring does not disturb the room's messages
    let stored = fill(store, &r.name, 3, 3);
    assert_eq!(store.ensure_room(&again), Ok(r.clone()));
    assert_eq!(store.messages_before(&r.name, None, 10), Ok(stored));
}

pub fn list_rooms_oldest_first_ties_by_name(store: &dyn Store) {
    let tag = unique("ls");
    let t = now_ms();
    // Created out of order; expected order: by time, then by name.
    let rooms = [
        room(&format!("{tag}-c"), "u", t + 20),
        room(&format!("{tag}-a"), "u", t + 30),
        room(&format!("{tag}-b"), "u", t + 10),
        room(&format!("{tag}-e"), "u", t + 20), // ties with -c: -c before -e
        room(&format!("{tag}-d"), "u", t + 20),
    ];
    for r in &rooms {
        store.create_room(r).expect("create_room");
    }
    let listed: Vec<Room> = store
        .list_rooms()
        .expect("list_rooms")
        .into_iter()
        .filter(|r| r.name.starts_with(&tag))
        .collect();
    let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            format!("{tag}-b"),
            format!("{tag}-c"),
            format!("{tag}-d"),
            format!("{tag}-e"),
            format!("{tag}-a")
        ]
    );
    // Full rows come back as stored.
    for r in &rooms {
        assert!(
            listed.contains(r),
            "list_rooms lost or changed {r:?}: {listed:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Delete

pub fn delete_unknown_room_not_found(store: &dyn Store) {
    assert_eq!(
        store.delete_room(&unique("ghost"), "alice"),
        Ok(DeleteOutcome::NotFound)
    );
}

pub fn delete_by_non_creator_forbidden_keeps_everything(store: &dyn Store) {
    let r = new_room(store, "alice");
    let stored = fill(store, &r.name, 4, 2);
    assert_eq!(
        store.delete_room(&r.name, "mallory"),
        Ok(DeleteOutcome::Forbidden)
    );
    assert_eq!(store.get_room(&r.name), Ok(Some(r.clone())));
    assert_eq!(store.messages_before(&r.name, None, 100), Ok(stored));
}

pub fn delete_by_creator_removes_room_and_messages(store: &dyn Store) {
    let r = new_room(store, "alice");
    fill(store, &r.name, 5, 5);
    assert_eq!(
        store.delete_room(&r.name, "alice"),
        Ok(DeleteOutcome::Deleted)
    );
    assert_eq!(store.get_room(&r.name), Ok(None));
    assert!(
        !store
            .list_rooms()
            .expect("list_rooms")
            .iter()
            .any(|x| x.name == r.name),
        "deleted room still listed"
    );
    assert_eq!(
        store.delete_room(&r.name, "alice"),
        Ok(DeleteOutcome::NotFound),
        "second delete"
    );
    // A new room of the same name has none of the old messages.
    let again = room(&r.name, "bob", now_ms());
    assert_eq!(store.create_room(&again), Ok(()));
    assert_eq!(
        store.messages_before(&r.name, None, 100),
        Ok(vec![]),
        "old messages survived the delete"
    );
    assert_eq!(
        store.messages_after(&r.name, 0, 100),
        Ok(vec![]),
        "old messages survived the delete"
    );
    let fresh = store
        .append_messages(&r.name, &[msg("bob", "fresh", now_ms())])
        .expect("append to re-created room");
    assert_eq!(fresh.len(), 1);
    assert_eq!(store.messages_before(&r.name, None, 100), Ok(fresh.clone()));
    assert_eq!(store.messages_after(&r.name, 0, 100), Ok(fresh));
}

// ---------------------------------------------------------------------------
// Append

pub fn append_numbers_from_one_in_slice_order(store: &dyn Store) {
    let r = new_room(store, "alice");
    let t = now_ms();
    let batch = vec![
        msg("alice", "one", t),
        msg("bob", "two", t + 1),
        msg("alice", "three", t + 1),
    ];
    let stored = store.append_messages(&r.name, &batch).expect("append");
    assert_eq!(seqs(&stored), vec![1, 2, 3]);
    for (s, n) in stored.iter().zip(&batch) {
        assert_eq!(s.room_id, r.name);
        assert_eq!(s.username, n.username);
        assert_eq!(s.content, n.content);
        assert_eq!(s.timestamp, n.timestamp);
    }
    assert_eq!(store.messages_before(&r.name, None, 10), Ok(stored));
}

pub fn append_continues_across_batches(store: &dyn Store) {
    let r = new_room(store, "alice");
    let mut all = Vec::new();
    for (i, size) in [1usize, 4, 2, 7, 1].into_iter().enumerate() {
        let batch: Vec<NewMessage> = (0..size)
            .map(|j| msg("alice", &format!("b{i}m{j}"), now_ms()))
            .collect();
        let stored = store.append_messages(&r.name, &batch).expect("append");
        let first = all.len() as i64 + 1;
        assert_eq!(
            seqs(&stored),
            range(first, first + size as i64 - 1),
            "batch {i}"
        );
        all.extend(stored);
    }
    assert_eq!(store.messages_before(&r.name, None, 100), Ok(all));
}

pub fn append_to_missing_room_is_no_such_room(store: &dyn Store) {
    let name = unique("missing");
    assert_eq!(
        store.append_messages(&name, &[msg("alice", "hello", now_ms())]),
        Err(StoreError::NoSuchRoom)
    );
    assert_eq!(
        store.get_room(&name),
        Ok(None),
        "append must not create the room"
    );
}

pub fn append_after_delete_is_no_such_room(store: &dyn Store) {
    let r = new_room(store, "alice");
    fill(store, &r.name, 2, 2);
    assert_eq!(
        store.delete_room(&r.name, "alice"),
        Ok(DeleteOutcome::Deleted)
    );
    assert_eq!(
        store.append_messages(&r.name, &[msg("alice", "late", now_ms())]),
        Err(StoreError::NoSuchRoom)
    );
}

pub fn rooms_number_independently(store: &dyn Store) {
    let a = new_room(store, "alice");
    let b = new_room(store, "bob");
    assert_eq!(seqs(&fill(store, &a.name, 3, 3)), vec![1, 2, 3]);
    assert_eq!(seqs(&fill(store, &b.name, 2, 1)), vec![1, 2]);
    assert_eq!(seqs(&fill(store, &a.name, 1, 1)), vec![4]);
}

fn room_batch(room: &str, contents: &[&str]) -> RoomBatch {
    let t = now_ms();
    RoomBatch {
        room: room.to_string(),
        messages: contents.iter().map(|c| msg("multi", c, t)).collect(),
    }
}

fn contents(msgs: &[StoredMessage]) -> Vec<&str> {
    msgs.iter().map(|m| m.content.as_str()).collect()
}

pub fn append_many_numbers_each_room_on_its_own(store: &dyn Store) {
    let a = new_room(store, "alice");
    let b = new_room(store, "bob");
    let c = new_room(store, "carol");
    fill(store, &b.name, 5, 5);
    let results = store.append_many(&[
        room_batch(&a.name, &["a1", "a2"]),
        room_batch(&b.name, &["b6"]),
        room_batch(&c.name, &[]),
        room_batch(&a.name, &["a3"]),
    ]);
    assert_eq!(results.len(), 4, "one result per batch, in order");
    let stored: Vec<Vec<StoredMessage>> = results
        .into_iter()
        .map(|r| r.expect("append_many"))
        .collect();
    assert_eq!(seqs(&stored[0]), vec![1, 2]);
    assert_eq!(contents(&stored[0]), vec!["a1", "a2"]);
    assert!(stored[0].iter().all(|m| m.room_id == a.name));
    assert_eq!(seqs(&stored[1]), vec![6]);
    assert_eq!(stored[1][0].room_id, b.name);
    assert!(stored[2].is_empty());
    assert_eq!(seqs(&stored[3]), vec![3], "the same room twice continues");
    let in_a = store.messages_after(&a.name, 0, 10).expect("read a");
    assert_eq!(contents(&in_a), vec!["a1", "a2", "a3"]);
    assert_eq!(seqs(&in_a), vec![1, 2, 3]);
    assert_eq!(
        seqs(&store.messages_after(&b.name, 0, 10).expect("read b")),
        range(1, 6)
    );
    assert_eq!(store.messages_after(&c.name, 0, 10), Ok(vec![]));
}

pub fn append_many_missing_room_fails_alone(store: &dyn Store) {
    let a = new_room(store, "alice");
    let gone = new_room(store, "bob");
    fill(store, &gone.name, 2, 2);
    assert_eq!(
        store.delete_room(&gone.name, "bob"),
        Ok(DeleteOutcome::Deleted)
    );
    let missing = unique("missing");
    let z = new_room(store, "zoe");
    let results = store.append_many(&[
        room_batch(&a.name, &["a1"]),
        room_batch(&missing, &["lost"]),
        room_batch(&gone.name, &["late"]),
        room_batch(&z.name, &["z1", "z2"]),
    ]);
    assert_eq!(results.len(), 4);
    assert_eq!(seqs(results[0].as_ref().expect("a stored")), vec![1]);
    assert_eq!(results[1], Err(StoreError::NoSuchRoom));
    assert_eq!(results[2], Err(StoreError::NoSuchRoom));
    assert_eq!(seqs(results[3].as_ref().expect("z stored")), vec![1, 2]);
    assert_eq!(store.get_room(&missing), Ok(None), "no room made");
    assert_eq!(store.get_room(&gone.name), Ok(None), "not revived");
    assert_eq!(store.messages_after(&gone.name, 0, 10), Ok(vec![]));
    assert_eq!(
        contents(&store.messages_after(&z.name, 0, 10).expect("read z")),
        vec!["z1", "z2"]
    );
}

pub fn concurrent_appends_get_unique_contiguous_seqs(store: &dyn Store) {
    let r = new_room(store, "alice");
    const THREADS: usize = 4;
    const BATCHES: usize = 6;
    const SIZE: usize = 5;
    let results: Vec<Vec<Vec<StoredMessage>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let name = r.name.clone();
                s.spawn(move || {
                    (0..BATCHES)
                        .map(|b| {
                            let batch: Vec<NewMessage> = (0..SIZE)
                                .map(|i| msg(&format!("t{t}"), &format!("t{t}b{b}i{i}"), now_ms()))
                                .collect();
                            store
                                .append_messages(&name, &batch)
                                .expect("concurrent append")
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut seen = HashSet::new();
    for per_thread in &results {
        for batch in per_thread {
            // a batch is numbered contiguously, in slice order
            let s = seqs(batch);
            assert_eq!(
                s,
                range(s[0], s[0] + SIZE as i64 - 1),
                "batch not contiguous: {s:?}"
            );
            for m in batch {
                assert!(seen.insert(m.seq), "seq {} given twice", m.seq);
            }
        }
    }
    let total = (THREADS * BATCHES * SIZE) as i64;
    let all = store
        .messages_before(&r.name, None, 1000)
        .expect("messages_before");
    assert_eq!(seqs(&all), range(1, total));
    let mut from_results: Vec<StoredMessage> = results.into_iter().flatten().flatten().collect();
    from_results.sort_by_key(|m| m.seq);
    assert_eq!(
        all, from_results,
        "stored rows differ from what append returned"
    );
}

// ---------------------------------------------------------------------------
// Reading

pub fn messages_before_pages_oldest_first(store: &dyn Store) {
    let r = new_room(store, "alice");
    let stored = fill(store, &r.name, 25, 7);
    assert_eq!(seqs(&stored), range(1, 25));
    let page = |before: Option<i64>, limit: usize| {
        seqs(
            &store
                .messages_before(&r.name, before, limit)
                .expect("messages_before"),
        )
    };
    assert_eq!(page(None, 10), range(16, 25), "newest page");
    assert_eq!(page(Some(16), 10), range(6, 15));
    assert_eq!(page(Some(6), 10), range(1, 5));
    assert_eq!(page(Some(1), 10), Vec::<i64>::new());
    assert_eq!(page(Some(26), 3), range(23, 25));
    assert_eq!(
        page(Some(1000), 3),
        range(23, 25),
        "before above the last seq"
    );
    assert_eq!(page(None, 1), vec![25]);
    // The rows are the stored ones.
    assert_eq!(
        store.messages_before(&r.name, Some(4), 2),
        Ok(stored[1..3].to_vec())
    );
}

pub fn messages_before_limit_larger_than_room(store: &dyn Store) {
    let r = new_room(store, "alice");
    let stored = fill(store, &r.name, 6, 6);
    assert_eq!(
        store.messages_before(&r.name, None, 500),
        Ok(stored.clone())
    );
    assert_eq!(
        store.messages_before(&r.name, Some(4), 500),
        Ok(stored[..3].to_vec())
    );
    let empty = new_room(store, "alice");
    assert_eq!(store.messages_before(&empty.name, None, 50), Ok(vec![]));
}

pub fn messages_after_returns_what_follows(store: &dyn Store) {
    let r = new_room(store, "alice");
    let stored = fill(store, &r.name, 25, 25);
    let after = |since: i64, limit: usize| {
        seqs(
            &store
                .messages_after(&r.name, since, limit)
                .expect("messages_after"),
        )
    };
    assert_eq!(after(20, 100), range(21, 25));
    assert_eq!(after(0, 100), range(1, 25));
    assert_eq!(after(24, 100), vec![25]);
    assert_eq!(after(25, 100), Vec::<i64>::new());
    assert_eq!(after(1000, 100), Vec::<i64>::new());
    assert_eq!(after(20, 5), range(21, 25), "exactly limit match");
    assert_eq!(
        store.messages_after(&r.name, 22, 100),
        Ok(stored[22..].to_vec())
    );
}

pub fn messages_after_returns_newest_limit_when_more_match(store: &dyn Store) {
    let r = new_room(store, "alice");
    fill(store, &r.name, 30, 10);
    let after = |since: i64, limit: usize| {
        seqs(
            &store
                .messages_after(&r.name, since, limit)
                .expect("messages_after"),
        )
    };
    assert_eq!(after(0, 10), range(21, 30), "newest 10, oldest first");
    assert_eq!(after(3, 5), range(26, 30));
    assert_eq!(after(28, 1), vec![30]);
    let empty = new_room(store, "alice");
    assert_eq!(store.messages_after(&empty.name, 0, 10), Ok(vec![]));
}

pub fn messages_stay_in_their_room(store: &dyn Store) {
    let a = new_room(store, "alice");
    let b = new_room(store, "bob");
    let t = now_ms();
    store
        .append_messages(&a.name, &[msg("alice", "in a", t)])
        .expect("append a");
    store
        .append_messages(&b.name, &[msg("bob", "in b", t), msg("bob", "in b 2", t)])
        .expect("append b");
    let in_a = store.messages_before(&a.name, None, 10).expect("read a");
    let in_b = store.messages_after(&b.name, 0, 10).expect("read b");
    assert_eq!(
        in_a.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
        vec!["in a"]
    );
    assert!(in_a.iter().all(|m| m.room_id == a.name));
    assert_eq!(
        in_b.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
        vec!["in b", "in b 2"]
    );
    assert!(in_b.iter().all(|m| m.room_id == b.name));
}

pub fn content_round_trips_exactly(store: &dyn Store) {
    // Room names and contents with spaces, quotes, non-ASCII and emoji.
    let name = format!("{} Caf\u{e9} \u{1F600} 'q' \"dq\"", unique("Room"));
    let r = room(&name, "z\u{fc}rich", 1_600_000_000_001);
    store.create_room(&r).expect("create_room");
    assert_eq!(store.get_room(&name), Ok(Some(r.clone())));
    let contents = [
        "plain",
        "  leading and trailing spaces  ",
        "line\nbreak\ttab",
        "quotes ' \" and backslash \\",
        "\u{65e5}\u{672c}\u{8a9e} \u{1F680} \u{e9}\u{e8}",
        "%s %d $1 ${x} {{}} <b>html</b>; DROP TABLE messages; --",
    ];
    let batch: Vec<NewMessage> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| msg("z\u{fc}rich", c, 1_600_000_000_100 + i as i64))
        .collect();
    let stored = store.append_messages(&name, &batch).expect("append");
    let read = store.messages_before(&name, None, 10).expect("read");
    assert_eq!(read, stored);
    for (m, c) in read.iter().zip(contents) {
        assert_eq!(m.content, c);
        assert_eq!(m.room_id, name);
        assert_eq!(m.username, "z\u{fc}rich");
    }
    // A long content too.
    let long = "x".repeat(64 * 1024);
    let s = store
        .append_messages(&name, &[msg("a", &long, 1)])
        .expect("append long");
    assert_eq!(s[0].content.len(), long.len());
    assert_eq!(
        store
            .messages_after(&name, s[0].seq - 1, 1)
            .expect("read long")[0]
            .content,
        long
    );
}
