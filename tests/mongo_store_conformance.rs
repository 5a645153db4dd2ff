//! The store conformance suite (`common/store_suite.rs`) against the MongoDB
//! store, one fresh database per test (dropped afterwards), on this binary's
//! FerretDB or on the MongoDB named by `MONGO_URI`; plus what only the MongoDB
//! store promises: its indexes, tolerance of a database that already breaks
//! them, the Go server's documents without `seq`, and a client that does not
//! need the server to be up.

#[path = "common/store_suite.rs"]
#[macro_use]
mod store_suite;

#[path = "common/mongo.rs"]
mod mongo;
// What `mongo.rs` shares with the other test services (as `super::service`).
#[path = "common/service.rs"]
#[allow(dead_code)]
mod service;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chatconnect::store::mongo::MongoStore;
use chatconnect::store::{
    DeleteOutcome, NewMessage, Room, RoomBatch, Store, StoreError, StoreResult, StoredMessage,
};
use mongodb::bson::{doc, Bson, DateTime, Document};

use mongo::{
    assert_required_indexes, command_bytes, find_all, index_keys, key_fields, FerretInstance,
    ReplyCutter, Step, TestDb,
};

/// Server selection and connect timeout of the stores made here.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The one place that calls `MongoStore::connect` with a reachable server.
fn connect_store(uri: &str, db: &str) -> MongoStore {
    MongoStore::connect(uri, db, TIMEOUT).expect("MongoStore::connect")
}

/// A store on a fresh database, prepared as the server prepares it.
fn open_mongo() -> store_suite::TestStore {
    let db = TestDb::new("conf");
    let store = connect_store(&db.uri, &db.name);
    store.prepare().expect("MongoStore::prepare");
    store_suite::TestStore::new(Box::new(store), Some(Box::new(db)))
}

store_suite_tests!(open_mongo);

fn connect(db: &TestDb) -> MongoStore {
    connect_store(&db.uri, &db.name)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A room alice creates now.
fn alices_room(name: &str) -> Room {
    Room {
        name: name.into(),
        creator: "alice".into(),
        created_at: now_ms(),
    }
}

fn msg(username: &str, content: &str, timestamp: i64) -> NewMessage {
    NewMessage {
        username: username.into(),
        content: content.into(),
        timestamp,
    }
}

fn seqs(msgs: &[StoredMessage]) -> Vec<i64> {
    msgs.iter().map(|m| m.seq).collect()
}

fn contents(msgs: &[StoredMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.content.clone()).collect()
}

/// A normalised view of a collection's indexes: (keys, unique), sorted.
fn index_set(db: &TestDb, coll: &str) -> Vec<String> {
    let mut v: Vec<String> = index_keys(&db.coll(coll))
        .into_iter()
        .map(|(k, u)| format!("{k} unique={u}"))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Indexes

#[test]
fn mongo_prepare_creates_indexes() {
    let db = TestDb::new("idx");
    let store = connect(&db);
    store.prepare().expect("prepare");
    assert_required_indexes(&db.db());
}

#[test]
fn mongo_prepare_is_idempotent() {
    let db = TestDb::new("idem");
    let store = connect(&db);
    store.prepare().expect("first prepare");
    let before: Vec<Vec<String>> = ["users", "rooms", "messages"]
        .iter()
        .map(|c| index_set(&db, c))
        .collect();
    store.prepare().expect("second prepare on the same handle");
    // A second process starting on the same database prepares it again.
    let other = connect(&db);
    other.prepare().expect("prepare from another handle");
    let after: Vec<Vec<String>> = ["users", "rooms", "messages"]
        .iter()
        .map(|c| index_set(&db, c))
        .collect();
    assert_eq!(before, after, "prepare must not add or change indexes");
    assert_required_indexes(&db.db());
    // and the store still works
    store.create_user("alice", "$2b$04$x").expect("create_user");
    assert_eq!(
        other.create_user("alice", "$2b$04$y"),
        Err(StoreError::Conflict)
    );
}

#[test]
fn mongo_duplicate_usernames_do_not_stop_prepare() {
    let db = TestDb::new("dupusers");
    // A database written without the unique index, holding duplicates.
    db.coll("users")
        .insert_many(vec![
            doc! {"username": "twin", "password_hash": "$2a$04$first"},
            doc! {"username": "twin", "password_hash": "$2a$04$second"},
            doc! {"username": "triplet", "password_hash": "$2a$04$a"},
            doc! {"username": "triplet", "password_hash": "$2a$04$b"},
            doc! {"username": "triplet", "password_hash": "$2a$04$c"},
            doc! {"username": "single", "password_hash": "$2a$04$s"},
        ])
        .run()
        .expect("seed users");
    let store = connect(&db);
    assert_eq!(
        store.prepare(),
        Ok(()),
        "prepare must not fail on duplicate usernames"
    );
    // The other collections' indexes are made all the same.
    let rooms = index_keys(&db.coll("rooms"));
    assert!(
        rooms.iter().any(|(k, u)| *u && key_fields(k) == ["name"]),
        "rooms index missing after a users index failure: {rooms:?}"
    );
    let messages = index_keys(&db.coll("messages"));
    assert!(
        messages
            .iter()
            .any(|(k, _)| key_fields(k).starts_with(&["room_id".into(), "seq".into()])),
        "messages index missing after a users index failure: {messages:?}"
    );
    // Taken names stay taken.
    for name in ["twin", "triplet", "single"] {
        assert_eq!(
            store.create_user(name, "$2b$04$new"),
            Err(StoreError::Conflict),
            "create_user({name}) over an existing name"
        );
    }
    let twin = store.password_hash("twin").expect("password_hash(twin)");
    assert!(
        matches!(
            twin.as_deref(),
            Some("$2a$04$first") | Some("$2a$04$second")
        ),
        "password_hash of a duplicated user: {twin:?}"
    );
    // Nothing was added for them.
    let n = db
        .coll("users")
        .count_documents(doc! {"username": {"$in": ["twin", "triplet", "single"]}})
        .run()
        .expect("count");
    assert_eq!(n, 6, "a refused create_user must not insert");
    // New names still register once.
    assert_eq!(store.create_user("fresh", "$2b$04$one"), Ok(()));
    assert_eq!(
        store.create_user("fresh", "$2b$04$two"),
        Err(StoreError::Conflict)
    );
    assert_eq!(
        store.password_hash("fresh"),
        Ok(Some("$2b$04$one".to_string()))
    );
    // A second prepare (a restart) does not fail either.
    assert_eq!(connect(&db).prepare(), Ok(()));
}

// ---------------------------------------------------------------------------
// Without prepare, without a server

#[test]
fn mongo_store_works_without_prepare() {
    let db = TestDb::new("noprep");
    let store = connect(&db);
    assert_eq!(store.ping(), Ok(()));
    assert_eq!(store.create_user("alice", "$2b$04$h"), Ok(()));
    assert_eq!(
        store.password_hash("alice"),
        Ok(Some("$2b$04$h".to_string()))
    );
    assert_eq!(
        store.create_user("alice", "$2b$04$other"),
        Err(StoreError::Conflict)
    );
    let room = Room {
        name: "General".into(),
        creator: "alice".into(),
        created_at: 1_700_000_000_123,
    };
    assert_eq!(store.create_room(&room), Ok(()));
    assert_eq!(store.create_room(&room), Err(StoreError::Conflict));
    let stored = store
        .append_messages("General", &[msg("alice", "a", 1), msg("alice", "b", 2)])
        .expect("append");
    assert_eq!(seqs(&stored), vec![1, 2]);
    assert_eq!(store.messages_before("General", None, 10), Ok(stored));
}

#[test]
fn mongo_connect_does_not_need_the_server() {
    // Nothing listens on this port.
    let port = mongo::free_port();
    let uri = format!("mongodb://127.0.0.1:{port}/");
    let t = Instant::now();
    let store = MongoStore::connect(&uri, "cc_nobody", Duration::from_secs(2))
        .expect("connect without a server");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "connect waited {:?} for a server",
        t.elapsed()
    );
    let t = Instant::now();
    match store.ping() {
        Err(StoreError::Unavailable(why)) => assert!(!why.is_empty()),
        other => panic!("ping with no server: {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "ping took {:?} to fail",
        t.elapsed()
    );
    assert!(
        matches!(
            store.password_hash("alice"),
            Err(StoreError::Unavailable(_))
        ),
        "a store call with no server must be Unavailable"
    );
    assert!(
        MongoStore::connect("this is not a uri", "cc_x", TIMEOUT).is_err(),
        "an unparseable URI must be refused"
    );
}

// ---------------------------------------------------------------------------
// The Go server's documents

/// Seed a Go-style room with messages that have no `seq`, inserted out of
/// timestamp order. Returns the contents in timestamp order and their times.
fn seed_legacy_room(db: &TestDb, room: &str, creator: &str, created_at: i64) -> Vec<(String, i64)> {
    db.coll("rooms")
        .insert_one(doc! {
            "name": room,
            "creator": creator,
            "created_at": DateTime::from_millis(created_at),
        })
        .run()
        .expect("seed room");
    let base = 1_650_000_000_000i64;
    // (content, timestamp offset), deliberately not in timestamp order
    let rows = [
        ("third", 30_000),
        ("first", 10),
        ("fourth", 40_500),
        ("second", 20_000),
    ];
    let docs: Vec<Document> = rows
        .iter()
        .map(|(c, off)| {
            doc! {
                "room_id": room,
                "username": "gopher",
                "content": format!("{room}:{c}"),
                "timestamp": DateTime::from_millis(base + off),
            }
        })
        .collect();
    db.coll("messages")
        .insert_many(docs)
        .run()
        .expect("seed messages");
    let mut sorted: Vec<(String, i64)> = rows
        .iter()
        .map(|(c, off)| (format!("{room}:{c}"), base + off))
        .collect();
    sorted.sort_by_key(|(_, t)| *t);
    sorted
}

#[test]
fn mongo_legacy_messages_are_numbered_by_timestamp() {
    let db = TestDb::new("legacy");
    let created = 1_640_000_000_456i64;
    let by_read = seed_legacy_room(&db, "ByRead", "gopher", created);
    let by_append = seed_legacy_room(&db, "ByAppend", "gopher", created + 1);
    let by_after = seed_legacy_room(&db, "ByAfter", "gopher", created + 2);
    let by_ensure = seed_legacy_room(&db, "ByEnsure", "gopher", created + 3);
    let store = connect(&db);
    store.prepare().expect("prepare over legacy data");

    // The room documents read back with their BSON dates.
    assert_eq!(
        store.get_room("ByRead"),
        Ok(Some(Room {
            name: "ByRead".into(),
            creator: "gopher".into(),
            created_at: created
        }))
    );
    let listed = store.list_rooms().expect("list_rooms");
    let names: Vec<&str> = listed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ByRead", "ByAppend", "ByAfter", "ByEnsure"]);

    let expect_legacy = |got: &[StoredMessage], want: &[(String, i64)], room: &str| {
        assert_eq!(seqs(got), vec![1, 2, 3, 4], "{room}: seqs {got:?}");
        assert_eq!(
            contents(got),
            want.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>(),
            "{room}: legacy order"
        );
        for (m, (_, t)) in got.iter().zip(want) {
            assert_eq!(m.timestamp, *t, "{room}: timestamp of {m:?}");
            assert_eq!(m.username, "gopher");
            assert_eq!(m.room_id, room);
        }
    };

    // First use: a history read.
    let read = store
        .messages_before("ByRead", None, 50)
        .expect("read legacy");
    expect_legacy(&read, &by_read, "ByRead");
    let new = store
        .append_messages("ByRead", &[msg("alice", "new", now_ms())])
        .expect("append after legacy");
    assert_eq!(seqs(&new), vec![5]);
    let all = store.messages_before("ByRead", None, 50).expect("read all");
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(&all[4], &new[0]);

    // First use: an append.
    let new = store
        .append_messages(
            "ByAppend",
            &[msg("bob", "x", now_ms()), msg("bob", "y", now_ms())],
        )
        .expect("append to legacy room");
    assert_eq!(
        seqs(&new),
        vec![5, 6],
        "new messages follow the legacy ones"
    );
    let all = store.messages_before("ByAppend", None, 50).expect("read");
    expect_legacy(&all[..4], &by_append, "ByAppend");
    assert_eq!(&all[4..], &new[..]);

    // First use: a resume read.
    let after = store
        .messages_after("ByAfter", 0, 100)
        .expect("messages_after");
    expect_legacy(&after, &by_after, "ByAfter");
    assert_eq!(
        seqs(&store.messages_after("ByAfter", 2, 100).expect("after 2")),
        vec![3, 4]
    );

    // First use: a join (ensure_room, then history).
    let r = store
        .ensure_room(&Room {
            name: "ByEnsure".into(),
            creator: "someone-else".into(),
            created_at: now_ms(),
        })
        .expect("ensure_room");
    assert_eq!(r.creator, "gopher", "the legacy room wins");
    assert_eq!(r.created_at, created + 3);
    let hist = store.messages_before("ByEnsure", None, 2).expect("page");
    assert_eq!(seqs(&hist), vec![3, 4]);
    assert_eq!(
        contents(&hist),
        by_ensure[2..]
            .iter()
            .map(|(c, _)| c.clone())
            .collect::<Vec<_>>()
    );

    // The documents keep the seed's field names and types; seq is added.
    let docs = find_all(
        &db.coll("messages"),
        doc! {"room_id": "ByRead"},
        doc! {"seq": 1},
    );
    assert_eq!(docs.len(), 5);
    for (i, d) in docs.iter().enumerate() {
        assert!(
            matches!(d.get("timestamp"), Some(Bson::DateTime(_))),
            "timestamp must stay a BSON date: {d}"
        );
        assert!(d.get_str("room_id").is_ok(), "room_id: {d}");
        assert!(d.get_str("username").is_ok(), "username: {d}");
        assert!(d.get_str("content").is_ok(), "content: {d}");
        let seq = match d.get("seq") {
            Some(Bson::Int64(n)) => *n,
            Some(Bson::Int32(n)) => *n as i64,
            Some(Bson::Double(f)) => *f as i64,
            other => panic!("seq is {other:?} in {d}"),
        };
        assert_eq!(seq, i as i64 + 1, "{d}");
    }
    // Legacy messages were numbered in place, not copied.
    let total = db
        .coll("messages")
        .count_documents(doc! {})
        .run()
        .expect("count");
    assert_eq!(total, 4 * 4 + 1 + 2);

    // A second handle (a restart) sees the same numbers and continues.
    let again = connect(&db);
    assert_eq!(
        seqs(&again.messages_before("ByAfter", None, 50).expect("read")),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        seqs(
            &again
                .append_messages("ByAfter", &[msg("c", "z", now_ms())])
                .expect("append")
        ),
        vec![5]
    );
}

#[test]
fn mongo_legacy_room_delete_removes_legacy_messages() {
    let db = TestDb::new("legdel");
    seed_legacy_room(&db, "Old", "gopher", 1_600_000_000_000);
    let store = connect(&db);
    assert_eq!(
        store.delete_room("Old", "intruder"),
        Ok(chatconnect::store::DeleteOutcome::Forbidden)
    );
    assert_eq!(
        store.delete_room("Old", "gopher"),
        Ok(chatconnect::store::DeleteOutcome::Deleted)
    );
    let left = db
        .coll("messages")
        .count_documents(doc! {"room_id": "Old"})
        .run()
        .expect("count");
    assert_eq!(left, 0, "legacy messages survived the delete");
}

// ---------------------------------------------------------------------------
// Several handles (processes) on one database

#[test]
fn mongo_two_handles_allocate_distinct_seqs() {
    let db = TestDb::new("twoh");
    let a = connect(&db);
    let b = connect(&db);
    a.prepare().expect("prepare a");
    b.prepare().expect("prepare b");
    let room = alices_room("Shared");
    a.create_room(&room).expect("create");
    const BATCHES: usize = 15;
    const SIZE: usize = 4;
    let results: Vec<Vec<StoredMessage>> = std::thread::scope(|s| {
        let hs: Vec<_> = [("a", &a), ("b", &b)]
            .into_iter()
            .flat_map(|(tag, store)| {
                (0..2).map(move |t| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for bi in 0..BATCHES {
                            let batch: Vec<NewMessage> = (0..SIZE)
                                .map(|i| msg(tag, &format!("{tag}{t}-{bi}-{i}"), now_ms()))
                                .collect();
                            let got = store
                                .append_messages("Shared", &batch)
                                .expect("concurrent append");
                            let s = seqs(&got);
                            assert_eq!(
                                s,
                                (s[0]..s[0] + SIZE as i64).collect::<Vec<_>>(),
                                "a batch is numbered contiguously"
                            );
                            out.extend(got);
                        }
                        out
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut seen = HashSet::new();
    for m in results.iter().flatten() {
        assert!(seen.insert(m.seq), "seq {} given twice", m.seq);
    }
    let total = 4 * BATCHES * SIZE;
    let all = b.messages_before("Shared", None, 1000).expect("read");
    assert_eq!(seqs(&all), (1..=total as i64).collect::<Vec<_>>());
    // Each writer's messages are in its own order.
    for per in &results {
        let order: Vec<i64> = per.iter().map(|m| m.seq).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }
}

/// How "another process" writes in the tests below: through a store of its
/// own, which raises the room's `last_seq`, or as an earlier version of this
/// server did, straight into the collection with the next numbers and
/// without touching `last_seq` (so the store's guess is too low and its
/// insert clashes).
#[derive(Clone, Copy, Debug)]
enum Other {
    Store,
    Unaware,
}

/// `other` appends messages `contents` to `room`; returns their seqs.
fn other_writes(db: &TestDb, other: Other, room: &str, contents: &[&str]) -> Vec<i64> {
    let batch: Vec<NewMessage> = contents.iter().map(|c| msg("b", c, now_ms())).collect();
    match other {
        Other::Store => seqs(&connect(db).append_messages(room, &batch).expect("b")),
        Other::Unaware => {
            let top = db
                .coll("messages")
                .find_one(doc! {"room_id": room})
                .sort(doc! {"seq": -1})
                .run()
                .expect("find")
                .and_then(|d| d.get_i64("seq").ok())
                .unwrap_or(0);
            let docs: Vec<Document> = batch
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    doc! {
                        "room_id": room,
                        "username": &m.username,
                        "content": &m.content,
                        "timestamp": DateTime::from_millis(m.timestamp),
                        "seq": top + 1 + i as i64,
                    }
                })
                .collect();
            db.coll("messages").insert_many(docs).run().expect("b");
            (top + 1..=top + batch.len() as i64).collect()
        }
    }
}

/// Another process took the numbers this handle expected to use next, and
/// the batch is large (the server's batches go up to STORE_BATCH_MAX, 256 by
/// default): every message is still stored exactly once, in batch order,
/// with distinct seqs and no gap.
#[test]
fn mongo_large_batch_after_another_process_wrote_is_stored_once() {
    for other in [Other::Store, Other::Unaware] {
        large_batch_after(other);
    }
}

fn large_batch_after(other: Other) {
    let db = TestDb::new("bigclash");
    let a = connect(&db);
    let b = connect(&db);
    a.prepare().expect("prepare");
    let room = alices_room("Busy");
    a.create_room(&room).expect("create");
    // a learns the room's numbers...
    assert_eq!(
        seqs(
            &a.append_messages("Busy", &[msg("a", "a-first", now_ms())])
                .expect("a")
        ),
        vec![1]
    );
    // ...then another process appends behind its back...
    let from_b = other_writes(&db, other, "Busy", &["b0", "b1", "b2"]);
    assert_eq!(from_b, vec![2, 3, 4], "{other:?}");
    // ...and a stores a large batch.
    const BIG: usize = 150;
    let batch: Vec<NewMessage> = (0..BIG)
        .map(|i| msg("a", &format!("big-{i}"), now_ms()))
        .collect();
    let stored = a.append_messages("Busy", &batch).expect("big batch");
    let all = b.messages_before("Busy", None, 1000).expect("read");
    let docs = db
        .coll("messages")
        .count_documents(doc! {"room_id": "Busy"})
        .run()
        .expect("count");
    let mut sorted = contents(&all);
    sorted.sort();
    let read = sorted.len();
    sorted.dedup();
    assert_eq!(
        (docs, read, read - sorted.len()),
        (4 + BIG as u64, 4 + BIG, 0),
        "{other:?}: (documents, messages read, duplicated contents); seqs returned {:?}; seqs read {:?}",
        seqs(&stored),
        seqs(&all)
    );
    assert_eq!(
        seqs(&stored),
        (5..5 + BIG as i64).collect::<Vec<_>>(),
        "{other:?}: the batch follows b's messages"
    );
    assert_eq!(seqs(&all), (1..=(4 + BIG) as i64).collect::<Vec<_>>());
    assert_eq!(&all[4..], &stored[..]);
}

/// A multi-room write where another process has meanwhile written into one
/// of the rooms: the one-insert path numbers after it (the room's
/// `last_seq`), or, when the other process did not raise `last_seq`, clashes
/// on that room's numbers, takes its documents back out, and the write is
/// redone room by room. Every room ends with each message exactly once,
/// numbered without gaps.
#[test]
fn mongo_append_many_after_another_process_wrote_is_stored_once() {
    for other in [Other::Store, Other::Unaware] {
        append_many_after(other);
    }
}

fn append_many_after(other: Other) {
    let db = TestDb::new("manyclash");
    let a = connect(&db);
    let b = connect(&db);
    a.prepare().expect("prepare");
    let names = ["North", "South", "East"];
    for name in names {
        a.create_room(&alices_room(name)).expect("create");
        // a learns each room's numbers.
        a.append_messages(name, &[msg("a", &format!("{name}-first"), now_ms())])
            .expect("first");
    }
    // Another process writes into South behind a's back.
    let from_b = other_writes(&db, other, "South", &["b0", "b1"]);
    assert_eq!(from_b, vec![2, 3], "{other:?}");
    let batches: Vec<RoomBatch> = names
        .iter()
        .map(|name| RoomBatch {
            room: (*name).into(),
            messages: (0..3)
                .map(|i| msg("a", &format!("{name}-{i}"), now_ms()))
                .collect(),
        })
        .collect();
    let results = a.append_many(&batches);
    assert_eq!(results.len(), 3);
    let stored: Vec<Vec<StoredMessage>> = results
        .into_iter()
        .map(|r| r.expect("append_many"))
        .collect();
    assert_eq!(seqs(&stored[0]), vec![2, 3, 4], "North");
    assert_eq!(
        seqs(&stored[1]),
        vec![4, 5, 6],
        "{other:?}: South follows b's messages"
    );
    assert_eq!(seqs(&stored[2]), vec![2, 3, 4], "East");
    for (name, want) in [("North", 4), ("South", 6), ("East", 4)] {
        let all = b.messages_before(name, None, 100).expect("read");
        assert_eq!(
            seqs(&all),
            (1..=want).collect::<Vec<_>>(),
            "{other:?}: {name}: every message once, no gap"
        );
        let docs = db
            .coll("messages")
            .count_documents(doc! {"room_id": name})
            .run()
            .expect("count");
        assert_eq!(docs, want as u64, "{name}: no leftover documents");
    }
    // The multi-room path still works for a afterwards (its numbers are
    // up to date again).
    let again = a.append_many(&[
        RoomBatch {
            room: "North".into(),
            messages: vec![msg("a", "n-last", now_ms())],
        },
        RoomBatch {
            room: "South".into(),
            messages: vec![msg("a", "s-last", now_ms())],
        },
    ]);
    assert_eq!(seqs(again[0].as_ref().expect("north")), vec![5]);
    assert_eq!(seqs(again[1].as_ref().expect("south")), vec![7]);
}

// ---------------------------------------------------------------------------
// A write whose reply is lost

/// A store that talks to a FerretDB of its own through a [`ReplyCutter`],
/// with rooms "r" and "s" holding one message each (seq 1), written by
/// another handle: so this store's first write to each raises the room's
/// `last_seq`, and that `update` of `rooms` is its room check.
fn store_behind_cutter(tag: &str) -> (tempfile::TempDir, FerretInstance, ReplyCutter, MongoStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ferret = FerretInstance::start(dir.path(), mongo::free_port());
    let cutter = ReplyCutter::start(([127, 0, 0, 1], ferret.port()).into());
    let name = mongo::unique_db(tag);
    let before = connect_store(&ferret.uri(), &name);
    before.prepare().expect("prepare");
    for room in ["r", "s"] {
        before.create_room(&alices_room(room)).expect("create room");
        let first = before
            .append_messages(room, &[msg("alice", "before", now_ms())])
            .expect("first message");
        assert_eq!(seqs(&first), vec![1]);
    }
    let store = connect_store(&cutter.uri(), &name);
    store.prepare().expect("prepare");
    (dir, ferret, cutter, store)
}

/// The write failed, and `room` holds only its one earlier message. The
/// numbers the failed write was given (2 up to `next - 1`) are not given
/// again: the next message gets `next`.
fn assert_nothing_kept(
    store: &MongoStore,
    room: &str,
    outcome: &StoreResult<Vec<StoredMessage>>,
    next: i64,
) {
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{room}: the reply was lost, so the write must fail: {outcome:?}"
    );
    let all = store.messages_after(room, 0, 100).expect("read back");
    assert_eq!(
        contents(&all),
        vec!["before"],
        "{room}: a write reported as failed left messages behind"
    );
    let after = store
        .append_messages(room, &[msg("alice", "after", now_ms())])
        .expect("append after the failure");
    assert_eq!(
        seqs(&after),
        vec![next],
        "{room}: numbering goes on above the failed write's numbers"
    );
}

#[test]
fn mongo_insert_whose_reply_is_lost_is_not_kept() {
    let (_dir, _ferret, cutter, store) = store_behind_cutter("cut1");
    cutter.arm(vec![Step::Cut(command_bytes("insert", "messages"))]);
    let batch: Vec<NewMessage> = ["m1", "m2", "m3"]
        .iter()
        .map(|c| msg("bob", c, now_ms()))
        .collect();
    let outcome = store.append_messages("r", &batch);
    assert_eq!(cutter.cuts(), 1, "the relay cut the insert's reply");
    assert_nothing_kept(&store, "r", &outcome, 5);
}

/// The room check after an insert, here the command raising the room's
/// `last_seq` (an `update` of `rooms`; not retried by the driver).
#[test]
fn mongo_room_check_after_an_insert_lost_is_not_kept() {
    let (_dir, _ferret, cutter, store) = store_behind_cutter("cut2");
    cutter.arm(vec![
        Step::Pass(command_bytes("insert", "messages")),
        Step::Cut(command_bytes("update", "rooms")),
    ]);
    let batch = [msg("bob", "m1", now_ms()), msg("bob", "m2", now_ms())];
    let outcome = store.append_messages("r", &batch);
    assert_eq!(cutter.cuts(), 1, "the relay cut the room check's reply");
    assert_nothing_kept(&store, "r", &outcome, 4);
}

/// The insert's reply is lost and so is the command raising `last_seq` over
/// the numbers it retired: the next write raises `last_seq` before it
/// inserts above them, so that no other process, numbering from
/// `last_seq`, can put a message into the gap below messages stored.
#[test]
fn mongo_retired_numbers_are_raised_before_the_next_write() {
    let (_dir, ferret, cutter, store) = store_behind_cutter("cut5");
    cutter.arm(vec![
        Step::Cut(command_bytes("insert", "messages")),
        Step::Cut(command_bytes("update", "rooms")),
    ]);
    let batch = [msg("bob", "m1", now_ms()), msg("bob", "m2", now_ms())];
    let outcome = store.append_messages("r", &batch);
    assert_eq!(cutter.cuts(), 2, "the insert's and the raise's replies");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    // The server carried out the update whose reply was cut: undo it, as
    // if it had been lost on the way there.
    let rooms = mongo::collection(&ferret.uri(), store.database_name(), "rooms");
    rooms
        .update_one(doc! {"name": "r"}, doc! {"$set": {"last_seq": 1_i64}})
        .run()
        .expect("reset last_seq");
    // The next write: an update of rooms goes out before its insert (whose
    // reply is cut here, to see the order).
    cutter.arm(vec![
        Step::Pass(command_bytes("update", "rooms")),
        Step::Cut(command_bytes("insert", "messages")),
    ]);
    let outcome = store.append_messages("r", &[msg("bob", "m3", now_ms())]);
    assert_eq!(cutter.cuts(), 3, "last_seq was raised before the insert");
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    let last_seq = rooms
        .find_one(doc! {"name": "r"})
        .run()
        .expect("find")
        .expect("room r")
        .get_i64("last_seq")
        .expect("last_seq");
    assert_eq!(last_seq, 4, "raised over 2..3, then over the lost 4");
    // Another process numbers after every retired number.
    let other = connect_store(&ferret.uri(), store.database_name());
    let next = other
        .append_messages("r", &[msg("carol", "next", now_ms())])
        .expect("append from another process");
    assert_eq!(seqs(&next), vec![5]);
    assert_nothing_kept_but(&other, "r", &["before", "next"]);
}

/// `room` holds exactly these contents, in this order.
fn assert_nothing_kept_but(store: &MongoStore, room: &str, want: &[&str]) {
    let all = store.messages_after(room, 0, 100).expect("read back");
    assert_eq!(contents(&all), want, "{room}");
}

#[test]
fn mongo_multi_room_insert_whose_reply_is_lost_is_not_kept() {
    let insert = || command_bytes("insert", "messages");
    let check = || command_bytes("update", "rooms");
    for (tag, plan, cuts) in [
        ("cut3", vec![Step::Cut(insert())], 1),
        ("cut4", vec![Step::Pass(insert()), Step::Cut(check())], 1),
    ] {
        let (_dir, _ferret, cutter, store) = store_behind_cutter(tag);
        cutter.arm(plan);
        let batches: Vec<RoomBatch> = ["r", "s"]
            .iter()
            .map(|room| RoomBatch {
                room: (*room).into(),
                messages: vec![msg("bob", &format!("{room}-1"), now_ms())],
            })
            .collect();
        let outcomes = store.append_many(&batches);
        assert_eq!(cutter.cuts(), cuts, "{tag}: the relay cut the replies");
        for (room, outcome) in ["r", "s"].iter().zip(&outcomes) {
            assert_nothing_kept(&store, room, outcome, 3);
        }
    }
}

// ---------------------------------------------------------------------------
// Round trips

/// A TCP relay in front of a server that records the CRUD commands passing
/// through it, as (command, collection), e.g. ("find", "rooms"). Handshakes,
/// heartbeats and other administrative commands are left out.
struct CommandLog {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl CommandLog {
    fn start(upstream: std::net::SocketAddr) -> CommandLog {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let seen: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut to_client), Ok(mut from_server)) =
                    (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let log = log.clone();
                std::thread::spawn(move || loop {
                    // One wire message: length, header, OP_MSG flags, then
                    // the body section (kind 0), whose first element names
                    // the command and its collection.
                    let mut len = [0u8; 4];
                    if client.read_exact(&mut len).is_err() {
                        break;
                    }
                    let n = i32::from_le_bytes(len) as usize;
                    let mut msg = vec![0u8; n.saturating_sub(4)];
                    if n < 16 || client.read_exact(&mut msg).is_err() {
                        break;
                    }
                    if msg.len() > 17 && msg[16] == 0 {
                        if let Ok(body) = Document::from_reader(&msg[17..]) {
                            if let Some((cmd, Bson::String(coll))) = body.iter().next() {
                                const CRUD: [&str; 8] = [
                                    "find",
                                    "insert",
                                    "update",
                                    "delete",
                                    "aggregate",
                                    "distinct",
                                    "findAndModify",
                                    "count",
                                ];
                                if CRUD.contains(&cmd.as_str()) {
                                    log.lock().unwrap().push((cmd.clone(), coll.clone()));
                                }
                            }
                        }
                    }
                    if server.write_all(&len).is_err() || server.write_all(&msg).is_err() {
                        break;
                    }
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                });
            }
        });
        CommandLog { port, seen }
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// The commands recorded since the last call, counted and sorted.
    fn take(&self) -> Vec<(String, String, usize)> {
        let mut counts: std::collections::BTreeMap<(String, String), usize> = Default::default();
        for c in self.seen.lock().unwrap().drain(..) {
            *counts.entry(c).or_default() += 1;
        }
        counts.into_iter().map(|((a, b), n)| (a, b, n)).collect()
    }
}

fn commands(list: &[(&str, &str, usize)]) -> Vec<(String, String, usize)> {
    list.iter()
        .map(|(a, b, n)| (a.to_string(), b.to_string(), *n))
        .collect()
}

/// The commands of one write: the room documents read, the insert, and the
/// check that the rooms still exist, which is the command raising their
/// `last_seq` (when all are due), a second read (when none is), or both.
fn assert_one_write(log: &CommandLog, what: &str) {
    let got = log.take();
    let raise = commands(&[
        ("find", "rooms", 1),
        ("insert", "messages", 1),
        ("update", "rooms", 1),
    ]);
    let read = commands(&[("find", "rooms", 2), ("insert", "messages", 1)]);
    let both = commands(&[
        ("find", "rooms", 2),
        ("insert", "messages", 1),
        ("update", "rooms", 1),
    ]);
    assert!(
        got == raise || got == read || got == both,
        "{what}: {got:?}"
    );
}

/// A write costs the same commands however many rooms it spans, and a
/// process that has not written a room before does not query its messages
/// to number it (the room document says where numbering goes on).
#[test]
fn mongo_a_write_costs_the_same_commands_however_many_rooms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ferret = FerretInstance::start(dir.path(), mongo::free_port());
    let log = CommandLog::start(([127, 0, 0, 1], ferret.port()).into());
    let name = mongo::unique_db("trips");
    let writer = connect_store(&ferret.uri(), &name);
    writer.prepare().expect("prepare");
    let rooms: Vec<String> = (0..50).map(|i| format!("room{i:02}")).collect();
    for r in &rooms {
        writer.create_room(&alices_room(r)).expect("create room");
        writer
            .append_messages(r, &[msg("alice", "first", now_ms())])
            .expect("first message");
    }
    // Another process, which has written nothing yet.
    let store = connect_store(&log.uri(), &name);
    store.prepare().expect("prepare");
    log.take();
    // Its first write to each room raises the room's last_seq.
    let first_write = commands(&[
        ("find", "rooms", 1),
        ("insert", "messages", 1),
        ("update", "rooms", 1),
    ]);
    for n in [2, 50] {
        let batches: Vec<RoomBatch> = rooms[..n]
            .iter()
            .map(|r| RoomBatch {
                room: r.clone(),
                messages: vec![msg("bob", &format!("to {n}"), now_ms())],
            })
            .collect();
        let results = store.append_many(&batches);
        if n == 2 {
            assert_eq!(log.take(), first_write, "a first write to {n} rooms");
        } else {
            assert_one_write(&log, "a write to 50 rooms");
        }
        for (r, result) in rooms.iter().zip(&results) {
            let want = if n == 2 {
                vec![2]
            } else {
                vec![2 + (r < &rooms[2]) as i64]
            };
            assert_eq!(seqs(result.as_ref().expect("stored")), want, "{r}");
        }
    }
    // One room, first written by this process.
    let stored = store
        .append_messages(&rooms[49], &[msg("bob", "single", now_ms())])
        .expect("append");
    assert_eq!(seqs(&stored), vec![3]);
    assert_one_write(&log, "a one-room write");
    // Again, within RAISE_EVERY: no raise.
    let again: Vec<RoomBatch> = rooms
        .iter()
        .map(|r| RoomBatch {
            room: r.clone(),
            messages: vec![msg("bob", "again", now_ms())],
        })
        .collect();
    for r in store.append_many(&again) {
        r.expect("stored");
    }
    assert_one_write(&log, "a second write to 50 rooms");
    // A history read: one query.
    let hist = store.messages_before(&rooms[49], None, 50).expect("read");
    assert_eq!(seqs(&hist), vec![1, 2, 3, 4]);
    assert_eq!(log.take(), commands(&[("find", "messages", 1)]));
    // The first use of a room by this process also reads its document
    // (are its messages numbered?).
    writer.create_room(&alices_room("quiet")).expect("create");
    store.messages_before("quiet", None, 50).expect("read");
    assert_eq!(
        log.take(),
        commands(&[("find", "messages", 1), ("find", "rooms", 1)])
    );
    store.messages_after("quiet", 0, 50).expect("read");
    assert_eq!(log.take(), commands(&[("find", "messages", 1)]));
}

/// A room of the Go original (no `last_seq`) is numbered once, in whichever
/// process uses it first; afterwards its document tells every process, so
/// a new one's first write asks nothing of the messages. Start-up
/// (`number_all_legacy`) does the same for every room.
#[test]
fn mongo_a_legacy_room_is_numbered_once_for_every_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ferret = FerretInstance::start(dir.path(), mongo::free_port());
    let log = CommandLog::start(([127, 0, 0, 1], ferret.port()).into());
    let name = mongo::unique_db("legonce");
    let db = TestDb {
        uri: ferret.uri(),
        name: name.clone(),
    };
    seed_legacy_room(&db, "Lounge", "gopher", 1_640_000_000_000);
    seed_legacy_room(&db, "Attic", "gopher", 1_640_000_000_001);
    let first = connect_store(&ferret.uri(), &name);
    first.prepare().expect("prepare");
    assert_eq!(
        seqs(
            &first
                .append_messages("Lounge", &[msg("a", "new", now_ms())])
                .expect("append")
        ),
        vec![5]
    );
    let lounge = db
        .coll("rooms")
        .find_one(doc! {"name": "Lounge"})
        .run()
        .expect("find")
        .expect("room");
    assert_eq!(lounge.get_i64("last_seq"), Ok(5), "{lounge}");
    // Another process: no query of the messages to write into Lounge.
    let other = connect_store(&log.uri(), &name);
    other.prepare().expect("prepare");
    log.take();
    let stored = other
        .append_messages("Lounge", &[msg("b", "more", now_ms())])
        .expect("append");
    assert_eq!(seqs(&stored), vec![6]);
    assert_eq!(
        log.take(),
        commands(&[
            ("find", "rooms", 1),
            ("insert", "messages", 1),
            ("update", "rooms", 1),
        ])
    );
    // Start-up numbers Attic and gives every room last_seq.
    assert_eq!(other.number_all_legacy(), Ok(1));
    for d in find_all(&db.coll("rooms"), doc! {}, doc! {"name": 1}) {
        let want = if d.get_str("name") == Ok("Attic") {
            4
        } else {
            6
        };
        assert_eq!(d.get_i64("last_seq"), Ok(want), "{d}");
    }
    assert_eq!(
        seqs(&first.messages_before("Attic", None, 10).expect("read")),
        vec![1, 2, 3, 4]
    );
}

/// What another process said it stored (`Store::heard`, from the broker)
/// is where this process numbers next, in both write paths; a hint for a
/// deleted room is forgotten.
#[test]
fn mongo_numbers_after_what_another_process_said_it_stored() {
    let db = TestDb::new("heard");
    let a = connect(&db);
    a.prepare().expect("prepare");
    for name in ["Told", "Quiet"] {
        a.create_room(&alices_room(name)).expect("create");
        a.append_messages(name, &[msg("a", "first", now_ms())])
            .expect("first");
    }
    // Another process writes 2..=4 into Told without raising last_seq, and
    // says so through the broker.
    assert_eq!(
        other_writes(&db, Other::Unaware, "Told", &["b0", "b1", "b2"]),
        vec![2, 3, 4]
    );
    a.heard("Told", Some(4));
    let results = a.append_many(&[
        RoomBatch {
            room: "Told".into(),
            messages: vec![msg("a", "t", now_ms())],
        },
        RoomBatch {
            room: "Quiet".into(),
            messages: vec![msg("a", "q", now_ms())],
        },
    ]);
    let stored: Vec<Vec<StoredMessage>> = results.into_iter().map(|r| r.expect("write")).collect();
    assert_eq!(seqs(&stored[0]), vec![5]);
    assert_eq!(seqs(&stored[1]), vec![2]);
    assert_eq!(other_writes(&db, Other::Unaware, "Told", &["b3"]), vec![6]);
    a.heard("Told", Some(6));
    let one = a
        .append_messages("Told", &[msg("a", "u", now_ms())])
        .expect("write");
    assert_eq!(seqs(&one), vec![7]);
    let all = a.messages_before("Told", None, 100).expect("read");
    assert_eq!(seqs(&all), (1..=7).collect::<Vec<_>>());

    // Deleted and made again: the old room's hint does not number the new.
    a.heard("Told", Some(1000));
    assert_eq!(
        a.delete_room("Told", "alice").expect("delete"),
        DeleteOutcome::Deleted
    );
    a.create_room(&alices_room("Told")).expect("again");
    let fresh = a
        .append_messages("Told", &[msg("a", "new", now_ms())])
        .expect("write");
    assert_eq!(seqs(&fresh), vec![1]);
    // A room deleted through another process: its hint is withdrawn.
    a.heard("Quiet", Some(1000));
    a.heard("Quiet", None);
    let next = a
        .append_messages("Quiet", &[msg("a", "q2", now_ms())])
        .expect("write");
    assert_eq!(seqs(&next), vec![3]);
}
