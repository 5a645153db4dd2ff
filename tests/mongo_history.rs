//! Recent history from memory on MongoDB (a FerretDB this test binary
//! starts): a second process on the same database never leaves a stale
//! history behind, a join storm larger than any worker queue is never
//! refused and costs about one read per room, and a chat message is not
//! delayed by a queue of join reads.
//!
//! The storm and the latency test load the machine: they take turns
//! (`HEAVY`), so neither measures the other.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::contract::ensure_fd_limit;
use common::history::*;
use common::mongo::TestDb;
use common::*;
use mongodb::bson::{doc, DateTime, Document};

static HEAVY: Mutex<()> = Mutex::new(());

fn start(db: &TestDb, extra: &[(&str, &str)]) -> Server {
    let env = db.server_env();
    let mut v: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    v.push(("TOKEN_SECRET", "one secret for every process"));
    v.extend_from_slice(extra);
    Server::start_with(&v)
}

/// Rooms `names`, each with messages seq 1..=n, written straight into the
/// database (as another process would have).
fn seed(db: &TestDb, names: &[String], n: i64) {
    let rooms: Vec<Document> = names
        .iter()
        .map(|r| doc! {"name": r, "creator": "seed", "created_at": DateTime::now()})
        .collect();
    db.coll("rooms")
        .insert_many(rooms)
        .run()
        .expect("seed rooms");
    let mut msgs = Vec::new();
    for r in names {
        for seq in 1..=n {
            msgs.push(
                doc! {"room_id": r, "username": "seed", "content": format!("{r}-{seq}"),
                "timestamp": DateTime::from_millis(1_000 + seq), "seq": seq},
            );
        }
    }
    for chunk in msgs.chunks(1000) {
        db.coll("messages")
            .insert_many(chunk.to_vec())
            .run()
            .expect("seed messages");
    }
}

#[test]
fn a_second_process_on_the_database_never_leaves_a_stale_history() {
    let db = TestDb::new("twoproc");
    a_second_process_never_leaves_a_stale_history(|| start(&db, &[]));
}

/// More joins at once than the store lane's queue holds (4,096): every one
/// is answered 101 and gets its room's history, in order, from about one
/// read per room.
#[test]
fn a_join_storm_over_the_queue_size_is_not_refused() {
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    const SOCKETS: usize = 5_000;
    const ROOMS: usize = 50;
    ensure_fd_limit(SOCKETS as u64 + 1_000);
    let db = TestDb::new("storm");
    let names: Vec<String> = (0..ROOMS).map(|i| format!("storm-{i}")).collect();
    seed(&db, &names, 20);
    let s = start(&db, &[("HISTORY_LIMIT", "20")]);
    await_trusted(&s);
    let reads = metric(&s, READS);

    let t = Instant::now();
    let streams: Vec<_> = (0..SOCKETS)
        .map(|i| {
            let room = &names[i % ROOMS];
            send_upgrade(s.addr(), &format!("/ws/{room}?username=u{i}"))
        })
        .collect();
    let sent = t.elapsed();
    for (i, stream) in streams.into_iter().enumerate() {
        let mut ws = RawWs::from_stream_after_handshake(stream, s.addr());
        let seqs = read_seqs(&mut ws, 20, Duration::from_secs(60));
        assert_eq!(seqs, (1..=20).collect::<Vec<i64>>(), "socket {i}");
    }
    let took = t.elapsed();
    let used = metric(&s, READS) - reads;
    eprintln!(
        "{SOCKETS} joins over {ROOMS} rooms: upgrades sent in {sent:?}, all histories in \
         {took:?}, {used} store reads"
    );
    assert!(
        used <= 2.0 * ROOMS as f64,
        "{used} store reads for {ROOMS} rooms: joins must share them"
    );
}

/// A queue of join reads (one store thread, hundreds of new rooms, each a
/// read of its own) does not delay chat in an active room: message writes
/// have their own lane.
#[test]
fn a_chat_message_does_not_wait_behind_join_reads() {
    let _heavy = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let db = TestDb::new("writesfirst");
    let s = start(&db, &[("STORE_THREADS", "1"), ("WS_RATE_LIMIT", "0")]);
    await_trusted(&s);
    let room = uniq("active");
    let mut alice = s.ws(&room, "alice");
    alice.round_trip("warm up", MARKER_WAIT);
    let mut unloaded: Vec<Duration> = (0..10)
        .map(|i| {
            let t = Instant::now();
            alice.round_trip(&format!("quiet {i}"), MARKER_WAIT);
            t.elapsed()
        })
        .collect();
    unloaded.sort();
    let median = unloaded[unloaded.len() / 2];

    // 400 joins, each to a new room: 400 reads for one thread.
    let joiners: Vec<_> = (0..400)
        .map(|i| send_upgrade(s.addr(), &format!("/ws/new-{i}?username=j{i}")))
        .collect();
    s.await_metric(
        "chatconnect_history_reads_waiting",
        "a queue of join reads",
        |v| v >= 50.0,
    );
    let mut loaded = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        alice.round_trip(&format!("busy {i}"), MARKER_WAIT);
        loaded.push(t.elapsed());
    }
    let still = metric(&s, "chatconnect_history_reads_waiting");
    let worst = loaded.iter().max().copied().unwrap_or_default();
    let bound = (median * 10).max(Duration::from_millis(250));
    eprintln!(
        "unloaded median {median:?}; under {still} waiting reads, worst {worst:?} (bound {bound:?})"
    );
    assert!(
        still > 0.0,
        "the reads must still be queued after the round trips"
    );
    assert!(
        worst <= bound,
        "a message waited {worst:?} behind join reads"
    );
    drop(joiners);
}
