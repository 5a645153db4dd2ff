//! Group commit on the embedded store: messages stored per second when each
//! message is its own transaction, against batches of the size the reactor
//! forms under load. Same store, same machine, same run, so the ratio is
//! meaningful.
//!
//! Run: `cargo bench --bench group_commit` (optionally `-- SECONDS`, the time
//! spent on each batch size; default 3).

use std::time::{Duration, Instant};

use chatconnect::store::sqlite::SqliteStore;
use chatconnect::store::{NewMessage, Room, Store};

/// Store batches of `batch` messages into a fresh room for about `budget`;
/// returns messages per second.
fn rate(store: &SqliteStore, room: &str, batch: usize, budget: Duration) -> f64 {
    store
        .create_room(&Room {
            name: room.into(),
            creator: "bench".into(),
            created_at: 0,
        })
        .expect("create room");
    let msgs: Vec<NewMessage> = (0..batch)
        .map(|i| NewMessage {
            username: "bench".into(),
            content: format!("message {i} with a typical chat length of text in it"),
            timestamp: 1_700_000_000_000 + i as i64,
        })
        .collect();
    let start = Instant::now();
    let mut stored = 0usize;
    while start.elapsed() < budget {
        stored += store.append_messages(room, &msgs).expect("append").len();
    }
    stored as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let budget = Duration::from_secs(secs);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open store");
    println!("SQLite group commit ({secs} s per size, WAL, synchronous=FULL)");
    let single = rate(&store, "single", 1, budget);
    println!("batch    1: {single:>10.0} msg/s");
    for batch in [16, 64, 256] {
        let r = rate(&store, &format!("batch{batch}"), batch, budget);
        println!(
            "batch {batch:>4}: {r:>10.0} msg/s  ({:.1}x batch 1)",
            r / single
        );
    }
}
