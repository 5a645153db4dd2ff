//! Recent history from memory on the embedded store: joins answered without
//! a store read, joins of one room sharing one read with each member getting
//! exactly its history, and a second process on the same data directory
//! never leaving a stale history behind.

mod common;

use common::history::*;
use common::*;

/// Two server processes on one SQLite data directory.
#[test]
fn a_second_process_on_the_data_dir_never_leaves_a_stale_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path").to_owned();
    a_second_process_never_leaves_a_stale_history(|| {
        Server::start_with(&[
            ("DATA_DIR", data.as_str()),
            ("TOKEN_SECRET", "one secret for both processes"),
        ])
    });
}

/// Joins of a room that is not in memory wait for one store read, which
/// answers them all: new members, resumes inside the history it read, a
/// resume past the newest message (a new member), and a resume older than
/// the history, which gets a read of its own. The store lane is held busy
/// (one thread, stuck on a delete behind the test's SQLite write lock) so
/// that every join arrives while the room's read waits.
#[test]
fn joins_of_one_room_share_one_read_and_each_get_exactly_their_history() {
    let mut s = Server::start_with(&[("STORE_THREADS", "1"), ("HISTORY_LIMIT", "20")]);
    let room = uniq("busy");
    post_messages(&s, &room, "alice", "m", 30);
    let doomed = uniq("doomed");
    let r = s.post(
        "/rooms",
        &serde_json::json!({"name": doomed, "username": "alice"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    // A fresh process: nothing in memory.
    s.restart();
    await_trusted(&s);

    let lock = s.hold_write_lock();
    let mut delete = RawHttp::connect(s.addr());
    delete.send(
        format!(
            "DELETE /rooms?name={}&username=alice HTTP/1.1\r\nHost: x\r\n\r\n",
            enc(&doomed)
        )
        .as_bytes(),
    );
    s.await_metric(
        "chatconnect_worker_queue_depth{lane=\"store\"}",
        "the delete to be taken by the store thread",
        |v| v == 0.0,
    );

    let reads = metric(&s, READS);
    let shared = metric(&s, SHARED);
    let sinces: Vec<Option<i64>> = [None, Some(25), Some(10), Some(5), Some(30), Some(999)]
        .into_iter()
        .cycle()
        .take(30)
        .collect();
    let mut members: Vec<WsClient> = sinces
        .iter()
        .enumerate()
        .map(|(i, since)| {
            let q = since.map_or(String::new(), |v| format!("&since={v}"));
            s.ws_path(&format!("/ws/{}?username=m{i}{q}", enc(&room)))
        })
        .collect();
    s.await_metric(
        SHARED,
        "every join after the first to wait for its read",
        |v| v == shared + (members.len() - 1) as f64,
    );
    lock.execute_batch("ROLLBACK").expect("release the lock");
    let r = delete.read_response(WAIT).expect("the delete's answer");
    assert_eq!(
        r.status,
        200,
        "the delete waited for the lock: {}",
        r.body_text()
    );

    for (m, since) in members.iter_mut().zip(&sinces) {
        let want = expected_seqs(30, 20, *since);
        let got: Vec<i64> = m
            .recv_n(want.len(), MARKER_WAIT)
            .iter()
            .map(|v| v["seq"].as_i64().expect("seq"))
            .collect();
        assert_eq!(got, want, "since {since:?}");
    }
    // Nothing else came first: the next frame of each is the same marker.
    let marker = uniq("marker");
    members[0].send_content(&marker);
    for m in &mut members {
        let v = m.expect_json(MARKER_WAIT);
        assert_eq!(v["content"], marker.as_str(), "{v}");
    }
    let too_old = sinces.iter().filter(|s| **s == Some(5)).count() as f64;
    assert_eq!(
        metric(&s, READS),
        reads + 1.0 + too_old,
        "one read for the room, one per resume older than it"
    );
}

/// A room's history is answered from memory once it has been read, and
/// stays whole as messages are stored; a resume inside it too.
#[test]
fn a_read_room_is_answered_from_memory_and_stays_whole() {
    let s = Server::start_with(&[("HISTORY_LIMIT", "10")]);
    await_trusted(&s);
    let room = uniq("warm");
    post_messages(&s, &room, "alice", "a", 15);
    let (hits, reads) = (metric(&s, HITS), metric(&s, READS));
    for round in 0..3 {
        let all = stored(&s, &room);
        let want = all[all.len() - 10..].to_vec();
        assert_eq!(
            join_history(&s, &room, "bob", "", 10),
            want,
            "round {round}"
        );
        // bob's marker is stored now too.
        let all = stored(&s, &room);
        let since = all[all.len() - 4].0;
        let want = all[all.len() - 3..].to_vec();
        let got = join_history(&s, &room, "carol", &format!("&since={since}"), 3);
        assert_eq!(got, want, "round {round}");
        post_messages(&s, &room, "alice", &format!("more{round}"), 4);
    }
    // post_messages joins too (resuming at the newest): every join was a hit.
    assert_eq!(metric(&s, HITS), hits + 9.0);
    assert_eq!(metric(&s, READS), reads, "no store read after the first");
    // A resume from before what memory holds goes to the store.
    let all = stored(&s, &room);
    let got = join_history(&s, &room, "dave", "&since=2", all.len() - 2);
    assert_eq!(got, all[2..].to_vec());
    assert_eq!(metric(&s, READS), reads + 1.0);
}

/// The cache keeps to its budget: a budget too small for one room's
/// history keeps nothing, and every join reads the store.
#[test]
fn a_cache_without_room_keeps_nothing_and_joins_read_the_store() {
    let s = Server::start_with(&[("HISTORY_CACHE", "0")]);
    let room = uniq("cold");
    post_messages(&s, &room, "alice", "a", 5);
    let reads = metric(&s, READS);
    let want = stored(&s, &room);
    assert_eq!(join_history(&s, &room, "bob", "", 5), want);
    assert_eq!(metric(&s, READS), reads + 1.0);
    assert_eq!(metric(&s, "chatconnect_history_cache_bytes"), 0.0);
}
