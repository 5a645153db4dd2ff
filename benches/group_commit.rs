//! Group commit: messages stored per second when every message is its own
//! store write, against the writes the reactor forms under load. Same store,
//! same machine, same run, so the ratios mean something.
//!
//! Two shapes are measured:
//! - **one room**: `append_messages` with batches of 1, 16, 64 and 256
//!   messages (a busy room; the fan-out case);
//! - **many rooms**: `append_many` over 64 rooms with one message each, which
//!   is what the reactor submits when many quiet rooms chat at once, against
//!   the same 64 messages written one call each.
//!
//! Run:
//!
//! ```text
//! cargo bench --bench group_commit -- [SECONDS] [--mongo URI]
//! ```
//!
//! SECONDS is the time spent on each case (default 3). Without `--mongo` the
//! embedded SQLite store in a temporary directory is measured; with it, the
//! MongoDB at URI (`scripts/bench.sh --only groupcommit` starts a FerretDB for
//! this). Every case gets a fresh store (a new SQLite file, or a new MongoDB
//! database dropped afterwards), and each room's first write is left out of
//! the timing.

use std::time::{Duration, Instant};

use chatconnect::store::mongo::MongoStore;
use chatconnect::store::sqlite::SqliteStore;
use chatconnect::store::{NewMessage, Room, RoomBatch, Store};

const MANY_ROOMS: usize = 64;

fn room(name: &str) -> Room {
    Room {
        name: name.into(),
        creator: "bench".into(),
        created_at: 0,
    }
}

fn messages(n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| NewMessage {
            username: "bench".into(),
            content: format!("message {i} with a typical chat length of text in it"),
            timestamp: 1_700_000_000_000 + i as i64,
        })
        .collect()
}

/// Store batches of `batch` messages into a fresh room for about `budget`;
/// returns messages per second.
fn one_room(store: &dyn Store, name: &str, batch: usize, budget: Duration) -> f64 {
    store.create_room(&room(name)).expect("create room");
    let msgs = messages(batch);
    // A first write finds the room's highest seq; a running server has
    // done that long before. Keep it out of the timing.
    store.append_messages(name, &msgs).expect("append");
    let start = Instant::now();
    let mut stored = 0usize;
    while start.elapsed() < budget {
        stored += store.append_messages(name, &msgs).expect("append").len();
    }
    stored as f64 / start.elapsed().as_secs_f64()
}

/// One message into each of `MANY_ROOMS` fresh rooms per round, either as one
/// `append_many` or as one `append_messages` per room; messages per second.
fn many_rooms(store: &dyn Store, tag: &str, together: bool, budget: Duration) -> f64 {
    let names: Vec<String> = (0..MANY_ROOMS).map(|i| format!("{tag}-{i}")).collect();
    for n in &names {
        store.create_room(&room(n)).expect("create room");
    }
    let one = messages(1);
    let batches: Vec<RoomBatch> = names
        .iter()
        .map(|n| RoomBatch {
            room: n.clone(),
            messages: one.clone(),
        })
        .collect();
    for n in &names {
        store.append_messages(n, &one).expect("append"); // warm-up, as above
    }
    let start = Instant::now();
    let mut stored = 0usize;
    while start.elapsed() < budget {
        if together {
            for r in store.append_many(&batches) {
                stored += r.expect("append_many").len();
            }
        } else {
            for n in &names {
                stored += store.append_messages(n, &one).expect("append").len();
            }
        }
    }
    stored as f64 / start.elapsed().as_secs_f64()
}

/// An empty store for one case, removed after it: each case starts from
/// the same state, whatever the cases before it wrote.
enum Fresh {
    Sqlite(SqliteStore, tempfile::TempDir),
    Mongo(MongoStore),
}

impl Fresh {
    fn open(mongo: Option<&str>, case: usize) -> Fresh {
        match mongo {
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = SqliteStore::open(dir.path()).expect("open store");
                Fresh::Sqlite(store, dir)
            }
            Some(uri) => {
                let db = format!("cc_group_commit_{}_{case}", std::process::id());
                let store = MongoStore::connect(uri, &db, Duration::from_secs(10))
                    .expect("connect to MongoDB");
                store.prepare().expect("create indexes");
                Fresh::Mongo(store)
            }
        }
    }

    fn store(&self) -> &dyn Store {
        match self {
            Fresh::Sqlite(s, _) => s,
            Fresh::Mongo(s) => s,
        }
    }

    fn close(self) {
        match self {
            Fresh::Sqlite(store, dir) => {
                drop(store);
                if let Err(e) = dir.close() {
                    eprintln!("could not remove the temporary store: {e}");
                }
            }
            Fresh::Mongo(store) => {
                if let Err(e) = store.drop_database() {
                    eprintln!("could not drop {}: {e}", store.database_name());
                }
            }
        }
    }
}

fn measure(mongo: Option<&str>, budget: Duration) {
    let mut case = 0;
    let mut run = |f: &dyn Fn(&dyn Store) -> f64| {
        case += 1;
        let fresh = Fresh::open(mongo, case);
        let r = f(fresh.store());
        fresh.close();
        r
    };
    let single = run(&|s| one_room(s, "single", 1, budget));
    println!("one room,  batch    1: {single:>10.0} msg/s");
    for batch in [16, 64, 256] {
        let r = run(&|s| one_room(s, &format!("batch{batch}"), batch, budget));
        println!(
            "one room,  batch {batch:>4}: {r:>10.0} msg/s  ({:.1}x batch 1)",
            r / single
        );
    }
    let apart = run(&|s| many_rooms(s, "apart", false, budget));
    println!("{MANY_ROOMS} rooms, one write each: {apart:>10.0} msg/s");
    let together = run(&|s| many_rooms(s, "together", true, budget));
    println!(
        "{MANY_ROOMS} rooms, one write for all: {together:>10.0} msg/s  ({:.1}x one write each)",
        together / apart
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    let mongo = args
        .iter()
        .position(|a| a == "--mongo")
        .map(|i| args.get(i + 1).expect("--mongo needs a URI").clone());
    let budget = Duration::from_secs(secs);
    match &mongo {
        None => println!(
            "SQLite group commit ({secs} s per case, WAL, synchronous=FULL, a fresh store each)"
        ),
        Some(uri) => println!(
            "MongoDB group commit ({secs} s per case, {uri}, a fresh database each, dropped after)"
        ),
    }
    measure(mongo.as_deref(), budget);
}
