//! Store scale: does a store call cost more when the messages collection is
//! bigger? Each call the join and message paths make is timed with 10,000
//! messages stored, then again with 500,000 (same rooms, more messages in
//! each), on the MongoDB store against a FerretDB this bench starts itself,
//! and on the SQLite store in a temporary directory for comparison. The
//! result is a Markdown table per store: median and p99 at each size, and
//! the ratio of the medians (1.0: the size does not matter).
//!
//! Run:
//!
//! ```text
//! cargo bench --bench store_scale -- [--small N] [--large N] [--budget SECS] [--only mongo|sqlite]
//! ```
//!
//! The FerretDB comes from `scripts/ferretdb.sh` (built once and cached,
//! started in a temporary directory, stopped at the end). The MongoDB
//! collection is filled straight through the driver, as documents this
//! server writes (with `seq`, and each room document's `last_seq`); the
//! SQLite store through its own `append_many`. Each call is sampled until
//! it has `MAX_SAMPLES` samples or has spent `--budget` seconds (8), but at
//! least `MIN_SAMPLES` times, so a call that reads the whole collection
//! (every read on FerretDB 1.x's SQLite backend does; see
//! docs/STORE_QUERIES.md) is sampled a few times only; the sample counts are
//! in the table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatconnect::store::mongo::MongoStore;
use chatconnect::store::sqlite::SqliteStore;
use chatconnect::store::{NewMessage, Room, RoomBatch, Store};
use mongodb::bson::{doc, DateTime, Document};

/// Rooms the messages are spread over.
const ROOMS: usize = 200;
/// Rooms of the multi-room write.
const MANY: usize = 50;
/// The history a join reads (the server's HISTORY_LIMIT default).
const HISTORY: usize = 50;
/// What a resume reads at most (the reactor's RESUME_LIMIT).
const RESUME: usize = 1000;
const MIN_SAMPLES: usize = 3;
const MAX_SAMPLES: usize = 40;
const DB_NAME: &str = "store_scale";

fn room_name(i: usize) -> String {
    format!("room{i:03}")
}

/// Rooms 0..MANY take the multi-room writes, room MANY the one-room
/// writes, the rooms after it up to READ_END the reads, and the rest are
/// each written once, as a room this process has not written before.
const ONE_ROOM: usize = MANY;
const READ_START: usize = MANY + 1;
const READ_END: usize = MANY + 21;

fn message(i: usize) -> NewMessage {
    NewMessage {
        username: format!("user{}", i % 37),
        content: format!("message {i}: a line of chat about as long as most of them are"),
        timestamp: 1_700_000_000_000 + i as i64,
    }
}

/// Median and p99 (nearest rank) of a sample.
fn stats(samples: &[Duration]) -> (Duration, Duration) {
    let mut s = samples.to_vec();
    s.sort();
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    (rank(0.5), rank(0.99))
}

/// Time `call` (given the sample's number) until it has MAX_SAMPLES samples
/// or has spent `budget`, and at least MIN_SAMPLES times.
fn sample(budget: Duration, mut call: impl FnMut(usize)) -> Vec<Duration> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < MAX_SAMPLES && (out.len() < MIN_SAMPLES || start.elapsed() < budget) {
        let t = Instant::now();
        call(out.len());
        out.push(t.elapsed());
    }
    out
}

/// The calls measured, in table order.
const CALLS: [&str; 6] = [
    "history: `messages_before(room, None, 50)`",
    "paging: `messages_before(room, Some(middle), 50)`",
    "since: `messages_after(room, top - 20, 1000)`",
    "append, one room, 1 message",
    "`append_many`, 50 rooms, 1 message each",
    "first append to a room this process has not written",
];

/// How many messages each room holds, as the bench knows it.
struct Fill {
    per_room: Vec<i64>,
}

impl Fill {
    fn total(&self) -> i64 {
        self.per_room.iter().sum()
    }
}

/// One round of the six calls; `fresh` hands out the rooms for the last one.
/// The messages the writes add are counted into `fill`.
fn measure(
    store: &dyn Store,
    fill: &mut Fill,
    fresh: &mut impl Iterator<Item = usize>,
    budget: Duration,
) -> Vec<Vec<Duration>> {
    let reads: Vec<usize> = (READ_START..READ_END).collect();
    let read_room = |n: usize| reads[n % reads.len()];
    let mut out = Vec::new();
    let fill_now = &*fill;
    out.push(sample(budget, |n| {
        let got = store
            .messages_before(&room_name(read_room(n)), None, HISTORY)
            .expect("history");
        assert!(!got.is_empty());
    }));
    out.push(sample(budget, |n| {
        let r = read_room(n);
        let middle = fill_now.per_room[r] / 2;
        let got = store
            .messages_before(&room_name(r), Some(middle), HISTORY)
            .expect("page");
        assert!(!got.is_empty());
    }));
    out.push(sample(budget, |n| {
        let r = read_room(n);
        let got = store
            .messages_after(&room_name(r), fill_now.per_room[r] - 20, RESUME)
            .expect("since");
        assert_eq!(got.len(), 20);
    }));
    // Writes: the first of each kind outside the timing (a running server
    // has written its busy rooms before).
    let one = vec![message(0)];
    store
        .append_messages(&room_name(ONE_ROOM), &one)
        .expect("append");
    out.push(sample(budget, |_| {
        store
            .append_messages(&room_name(ONE_ROOM), &one)
            .expect("append");
    }));
    fill.per_room[ONE_ROOM] += 1 + out[3].len() as i64;
    let batches: Vec<RoomBatch> = (0..MANY)
        .map(|r| RoomBatch {
            room: room_name(r),
            messages: one.clone(),
        })
        .collect();
    let check = |results: Vec<chatconnect::store::StoreResult<Vec<_>>>| {
        for r in results {
            r.expect("append_many");
        }
    };
    check(store.append_many(&batches));
    out.push(sample(budget, |_| check(store.append_many(&batches))));
    for n in &mut fill.per_room[..MANY] {
        *n += 1 + out[4].len() as i64;
    }
    let mut firsts = Vec::new();
    out.push(sample(budget, |_| {
        let r = fresh.next().expect("enough rooms not written yet");
        store.append_messages(&room_name(r), &one).expect("append");
        firsts.push(r);
    }));
    for r in firsts {
        fill.per_room[r] += 1;
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn table(title: &str, small: i64, large: i64, a: &[Vec<Duration>], b: &[Vec<Duration>]) {
    let k = |n: i64| {
        if n % 1000 == 0 {
            format!("{}k", n / 1000)
        } else {
            n.to_string()
        }
    };
    let (ks, kl) = (k(small), k(large));
    println!("\n### {title}\n");
    println!(
        "| call | median {ks} | p99 {ks} | median {kl} | p99 {kl} | ratio (medians) | samples {ks} / {kl} |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, name) in CALLS.iter().enumerate() {
        let (m1, p1) = stats(&a[i]);
        let (m2, p2) = stats(&b[i]);
        println!(
            "| {name} | {} | {} | {} | {} | {:.2}x | {} / {} |",
            ms(m1),
            ms(p1),
            ms(m2),
            ms(p2),
            m2.as_secs_f64() / m1.as_secs_f64(),
            a[i].len(),
            b[i].len()
        );
    }
}

// ---------------------------------------------------------------------------
// MongoDB on a FerretDB of its own

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ferretdb.sh")
}

/// A FerretDB started by `scripts/ferretdb.sh start`, stopped when dropped.
struct Ferret {
    dir: tempfile::TempDir,
    uri: String,
}

impl Ferret {
    fn start() -> Ferret {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/ferretdb.sh");
        assert!(out.status.success(), "scripts/ferretdb.sh start failed");
        let uri = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ferret { dir, uri }
    }
}

impl Drop for Ferret {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
    }
}

/// Add messages through the driver until the collection holds `target`,
/// spread round-robin over the rooms (so each room's messages are spread
/// over the whole collection, as in a running server), numbered on from
/// each room's last, and raise each room document's `last_seq` as the
/// store would.
fn fill_mongo(db: &mongodb::sync::Database, fill: &mut Fill, target: i64) {
    const CHUNK: usize = 10_000;
    let messages = db.collection::<Document>("messages");
    let rooms = db.collection::<Document>("rooms");
    let now = fill.total();
    let mut left = (target - now).max(0) as usize;
    let mut i = now as usize;
    while left > 0 {
        let n = left.min(CHUNK);
        let docs: Vec<Document> = (0..n)
            .map(|j| {
                let r = (i + j) % ROOMS;
                fill.per_room[r] += 1;
                let m = message(i + j);
                doc! {
                    "room_id": room_name(r),
                    "username": m.username,
                    "content": m.content,
                    "timestamp": DateTime::from_millis(m.timestamp),
                    "seq": fill.per_room[r],
                }
            })
            .collect();
        messages.insert_many(docs).run().expect("fill messages");
        i += n;
        left -= n;
    }
    for (r, n) in fill.per_room.iter().enumerate() {
        rooms
            .update_one(doc! {"name": room_name(r)}, doc! {"$max": {"last_seq": *n}})
            .run()
            .expect("raise last_seq");
    }
}

/// The bench's rooms, created through the store; an empty fill, and the
/// rooms left for first appends.
fn create_rooms(store: &dyn Store) -> (Fill, std::ops::Range<usize>) {
    for r in 0..ROOMS {
        store
            .create_room(&Room {
                name: room_name(r),
                creator: "bench".into(),
                created_at: 1_600_000_000_000,
            })
            .expect("create room");
    }
    let fill = Fill {
        per_room: vec![0; ROOMS],
    };
    (fill, READ_END..ROOMS)
}

fn run_mongo(small: i64, large: i64, budget: Duration) {
    let ferret = Ferret::start();
    let client = mongodb::sync::Client::with_uri_str(&ferret.uri).expect("client");
    let db = client.database(DB_NAME);
    let store = MongoStore::connect(&ferret.uri, DB_NAME, Duration::from_secs(30))
        .expect("connect the store");
    store.prepare().expect("prepare");
    let (mut fill, mut fresh) = create_rooms(&store);
    let t = Instant::now();
    fill_mongo(&db, &mut fill, small);
    eprintln!(
        "mongo: filled to {} messages in {:.1?}; measuring",
        fill.total(),
        t.elapsed()
    );
    let a = measure(&store, &mut fill, &mut fresh, budget);
    let t = Instant::now();
    fill_mongo(&db, &mut fill, large);
    eprintln!(
        "mongo: filled to {} messages in {:.1?}; measuring",
        fill.total(),
        t.elapsed()
    );
    let b = measure(&store, &mut fill, &mut fresh, budget);
    table(
        &format!(
            "MongoStore on FerretDB v1.24.2 (SQLite backend), {}",
            ferret.uri
        ),
        small,
        large,
        &a,
        &b,
    );
    let _ = store.drop_database();
}

// ---------------------------------------------------------------------------
// SQLite

/// Add messages through the store's `append_many` until it holds `target`,
/// spread round-robin over the rooms.
fn fill_sqlite(store: &SqliteStore, fill: &mut Fill, target: i64) {
    let now = fill.total();
    let mut i = now as usize;
    let mut left = (target - now).max(0) as usize;
    while left > 0 {
        // Up to 50 messages per room and call.
        let per = (left / ROOMS).clamp(1, 50);
        let mut batches = Vec::new();
        for r in 0..ROOMS {
            let take = per.min(left);
            if take == 0 {
                break;
            }
            batches.push(RoomBatch {
                room: room_name(r),
                messages: (i..i + take).map(message).collect(),
            });
            fill.per_room[r] += take as i64;
            i += take;
            left -= take;
        }
        for r in store.append_many(&batches) {
            r.expect("fill");
        }
    }
}

fn run_sqlite(small: i64, large: i64, budget: Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open the store");
    let (mut fill, mut fresh) = create_rooms(&store);
    fill_sqlite(&store, &mut fill, small);
    eprintln!("sqlite: filled to {} messages; measuring", fill.total());
    let a = measure(&store, &mut fill, &mut fresh, budget);
    let t = Instant::now();
    fill_sqlite(&store, &mut fill, large);
    eprintln!(
        "sqlite: filled to {} messages in {:.1?}; measuring",
        fill.total(),
        t.elapsed()
    );
    let b = measure(&store, &mut fill, &mut fresh, budget);
    table("SqliteStore (temporary directory)", small, large, &a, &b);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).map(|i| {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"))
                .clone()
        })
    };
    let num = |flag: &str, default: i64| {
        value(flag).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| panic!("{flag} {v}?"))
        })
    };
    let small = num("--small", 10_000);
    let large = num("--large", 500_000);
    let budget = Duration::from_secs(num("--budget", 8) as u64);
    let only = value("--only");
    let started = Instant::now();
    println!(
        "store_scale: {ROOMS} rooms; {small} then {large} messages; up to {}s or {MAX_SAMPLES} samples per call (at least {MIN_SAMPLES})",
        budget.as_secs()
    );
    if only.as_deref() != Some("sqlite") {
        run_mongo(small, large, budget);
    }
    if only.as_deref() != Some("mongo") {
        run_sqlite(small, large, budget);
    }
    println!("\n(total {:.0?})", started.elapsed());
}
