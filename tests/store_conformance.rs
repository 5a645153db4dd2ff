//! The store conformance suite (`common/store_suite.rs`) against the embedded
//! SQLite store, one fresh database per test; plus what only SQLite promises
//! (the database file survives a reopen).
//!
//! Another backend runs the same list with its own `open` function and one
//! `store_suite_tests!(open)` line.

#[path = "common/store_suite.rs"]
#[macro_use]
mod store_suite;

use chatconnect::store::sqlite::SqliteStore;
use chatconnect::store::{DeleteOutcome, NewMessage, Room, Store, StoreError};

fn open_sqlite() -> store_suite::TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("data")).expect("open sqlite store");
    store_suite::TestStore::new(Box::new(store), Some(Box::new(dir)))
}

store_suite_tests!(open_sqlite);

#[test]
fn sqlite_data_survives_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let room = Room {
        name: "General".into(),
        creator: "alice".into(),
        created_at: 1_700_000_000_000,
    };
    {
        let s = SqliteStore::open(&data).expect("open");
        s.create_user("alice", "$2b$04$hash").expect("user");
        s.create_room(&room).expect("room");
        let batch: Vec<NewMessage> = (0..3)
            .map(|i| NewMessage {
                username: "alice".into(),
                content: format!("m{i}"),
                timestamp: 1_700_000_000_000 + i,
            })
            .collect();
        s.append_messages("General", &batch).expect("append");
    }
    let s = SqliteStore::open(&data).expect("reopen");
    assert_eq!(
        s.password_hash("alice"),
        Ok(Some("$2b$04$hash".to_string()))
    );
    assert_eq!(s.get_room("General"), Ok(Some(room)));
    assert_eq!(s.create_user("alice", "x"), Err(StoreError::Conflict));
    let msgs = s.messages_before("General", None, 10).expect("read");
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // numbering continues after the reopen
    let more = s
        .append_messages(
            "General",
            &[NewMessage {
                username: "bob".into(),
                content: "m3".into(),
                timestamp: 5,
            }],
        )
        .expect("append after reopen");
    assert_eq!(more[0].seq, 4);
    assert_eq!(
        s.delete_room("General", "alice"),
        Ok(DeleteOutcome::Deleted)
    );
}

#[test]
fn sqlite_creates_missing_data_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("deep").join("er").join("data");
    let s = SqliteStore::open(&data).expect("open creates the directory");
    assert!(data.is_dir());
    assert_eq!(s.ping(), Ok(()));
}

#[test]
fn sqlite_two_handles_share_one_database() {
    // Two opens of one directory (as after a restart while a straggler
    // thread still holds the old one) see each other's writes.
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let a = SqliteStore::open(&data).expect("open a");
    let b = SqliteStore::open(&data).expect("open b");
    let room = Room {
        name: "Shared".into(),
        creator: "alice".into(),
        created_at: 1,
    };
    a.create_room(&room).expect("room via a");
    assert_eq!(b.create_room(&room), Err(StoreError::Conflict));
    let m = NewMessage {
        username: "alice".into(),
        content: "x".into(),
        timestamp: 2,
    };
    assert_eq!(
        a.append_messages("Shared", std::slice::from_ref(&m))
            .expect("a")[0]
            .seq,
        1
    );
    assert_eq!(b.append_messages("Shared", &[m]).expect("b")[0].seq, 2);
}
