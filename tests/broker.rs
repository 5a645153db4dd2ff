//! Several server processes serving one chat through a real Redis
//! (`BROKER_URL`), on one shared SQLite `DATA_DIR` and on MongoDB
//! (FerretDB): members spread over the processes and senders on each get
//! every message once and in `seq` order; Redis killed and started again
//! mid-chat loses nothing; Redis absent at start and arriving later; a room
//! deleted on one process closes its members on the others, and the room
//! made again under its name gets none of the old room's messages; member
//! counts in `GET /rooms` add up every process, and a dead process drops
//! out of them; a malformed `BROKER_URL` is refused at start.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::mongo::TestDb;
use common::redis::Redis;
use common::*;
use serde_json::Value;

/// Processes on one SQLite directory, all on `redis`.
fn sqlite_cluster(redis: &Redis, n: usize) -> (tempfile::TempDir, Vec<Server>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path").to_string();
    let url = redis.url();
    let servers = (0..n)
        .map(|_| {
            Server::start_with(&[
                ("DATA_DIR", &data),
                ("BROKER_URL", &url),
                ("WS_RATE_LIMIT", "0"),
                ("TOKEN_SECRET", "one secret shared by every process"),
            ])
        })
        .collect();
    (dir, servers)
}

/// Read frames until `want` chat messages (content `s…`) have come,
/// checking that seqs rise by one (no gap, nothing twice) throughout.
fn receive_all(c: &mut WsClient, want: usize, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut got: Vec<Value> = Vec::new();
    let is_chat = |m: &Value| m["content"].as_str().is_some_and(|t| t.starts_with('s'));
    while got.iter().filter(|m| is_chat(m)).count() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = c.recv_json(left) else {
            panic!(
                "got {} of {want} messages; last {:?}",
                got.len(),
                got.last()
            );
        };
        assert!(m.get("error").is_none(), "error frame: {m}");
        if let Some(prev) = got.last() {
            assert_eq!(
                m["seq"].as_i64(),
                prev["seq"].as_i64().map(|s| s + 1),
                "after {prev} came {m}: a gap or a duplicate"
            );
        }
        got.push(m);
    }
    got
}

/// Members on every process, a sender on every process: each member gets
/// all the messages, once each, in seq order, and the same sequence.
fn everyone_gets_everything(servers: &[Server], per_sender: usize) {
    let room = uniq("shared");
    let mut members: Vec<WsClient> = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        for j in 0..2 {
            let mut c = s.ws(&room, &format!("m{i}-{j}"));
            // Live (its empty history is out) before anyone sends.
            c.round_trip(&format!("hello from m{i}-{j}"), WAIT);
            members.push(c);
        }
    }
    let hellos = members.len();
    let senders: Vec<thread::JoinHandle<()>> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = s.ws(&room, &format!("sender{i}"));
            thread::spawn(move || {
                for k in 0..per_sender {
                    c.send_content(&format!("s{i}-{k}"));
                }
                // Stays connected until its own messages are back.
                let mut mine = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while mine < per_sender && Instant::now() < deadline {
                    if let Some(m) = c.recv_json(Duration::from_secs(5)) {
                        if m["username"] == format!("sender{i}").as_str() {
                            mine += 1;
                        }
                    }
                }
            })
        })
        .collect();
    let total = servers.len() * per_sender;
    let mut sequences = Vec::new();
    for (i, c) in members.iter_mut().enumerate() {
        // Each member saw the hellos after its own; read to the last one.
        let got = receive_all(c, total, Duration::from_secs(60));
        let chat = got
            .iter()
            .filter(|m| m["content"].as_str().is_some_and(|t| t.starts_with('s')))
            .count();
        assert_eq!(chat, total, "member {i}");
        sequences.push(
            got.iter()
                .map(|m| (m["seq"].as_i64().unwrap(), m["content"].to_string()))
                .collect::<Vec<_>>(),
        );
    }
    for h in senders {
        h.join().expect("sender");
    }
    // Everyone saw the same messages under the same seqs.
    let last = |v: &Vec<(i64, String)>| v.last().cloned();
    for s in &sequences[1..] {
        assert_eq!(last(s), last(&sequences[0]), "members disagree");
    }
    assert!(hellos > 0);
}

#[test]
fn two_processes_on_one_sqlite_dir_deliver_every_message_once_in_order() {
    let redis = Redis::start();
    let (_dir, servers) = sqlite_cluster(&redis, 2);
    everyone_gets_everything(&servers, 150);
    let m = servers[0].metrics();
    assert!(metric_value(&m, "chatconnect_broker_received_total").unwrap() > 0.0);
    assert_eq!(metric_value(&m, "chatconnect_broker_connected"), Some(1.0));
}

#[test]
fn three_processes_on_mongodb_deliver_every_message_once_in_order() {
    let redis = Redis::start();
    let db = TestDb::new("broker3");
    let env = db.server_env();
    let url = redis.url();
    let servers: Vec<Server> = (0..3)
        .map(|_| {
            let mut v: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            v.push(("BROKER_URL", &url));
            v.push(("WS_RATE_LIMIT", "0"));
            Server::start_with(&v)
        })
        .collect();
    everyone_gets_everything(&servers, 60);
}

/// Redis killed mid-chat and started again (empty, as after a crash):
/// every member still gets every message once, in order; the processes say
/// so in their log and `/metrics`.
#[test]
fn redis_killed_and_started_again_mid_chat_loses_nothing() {
    let mut redis = Redis::start();
    let (_dir, servers) = sqlite_cluster(&redis, 2);
    let room = uniq("outage");
    let mut a = servers[0].ws(&room, "alice");
    let mut b = servers[1].ws(&room, "bob");
    a.round_trip("a-ready", WAIT);
    b.round_trip("b-ready", WAIT);
    // b sees a-ready (sent before b joined, or live): settle both streams.
    let mark_a = a.round_trip("mark", WAIT);
    let mark_seq = mark_a["seq"].as_i64().unwrap();
    let mut got_b = Vec::new();
    loop {
        let m = b.expect_json(WAIT);
        let done = m["content"] == "mark";
        got_b.push(m);
        if done {
            break;
        }
    }
    const N: usize = 40;
    for k in 0..N {
        if k == N / 4 {
            redis.kill();
        }
        if k == N * 3 / 4 {
            redis.start_again();
        }
        a.send_content(&format!("a{k}"));
        b.send_content(&format!("b{k}"));
        thread::sleep(Duration::from_millis(25));
    }
    for (who, c) in [("alice", &mut a), ("bob", &mut b)] {
        // Everything after the mark, once, in order: the 2N messages.
        let mut got = Vec::new();
        while got.len() < 2 * N {
            let m = c
                .recv_json(Duration::from_secs(20))
                .unwrap_or_else(|| panic!("{who} got {} of {}", got.len(), 2 * N));
            if m["seq"].as_i64().unwrap() <= mark_seq {
                continue; // alice's own mark echo came first
            }
            got.push(m);
        }
        let seqs: Vec<i64> = got.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
        let want: Vec<i64> = (mark_seq + 1..=mark_seq + 2 * N as i64).collect();
        assert_eq!(seqs, want, "{who}: a gap, a duplicate or out of order");
    }
    servers[0].await_log("broker: connection lost", Duration::from_secs(10));
    assert!(
        metric_value(
            &servers[0].metrics(),
            "chatconnect_broker_store_reads_total"
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        servers[0].await_metric("chatconnect_broker_connected", "the broker back", |v| v
            == 1.0),
        1.0
    );
}

/// No Redis at start: the processes start and serve, each on its own; once
/// Redis answers, they relay to each other, and what was said meanwhile is
/// not lost.
#[test]
fn redis_absent_at_start_is_waited_for() {
    let mut redis = Redis::start();
    redis.kill();
    let (_dir, servers) = sqlite_cluster(&redis, 2);
    servers[0].await_log("cannot reach", Duration::from_secs(10));
    assert_eq!(servers[0].get("/readyz").status, 200);
    let room = uniq("later");
    let mut a = servers[0].ws(&room, "alice");
    let mut b = servers[1].ws(&room, "bob");
    a.round_trip("alone", WAIT);
    redis.start_again();
    servers[0].await_metric("chatconnect_broker_connected", "the broker", |v| v == 1.0);
    servers[1].await_metric("chatconnect_broker_connected", "the broker", |v| v == 1.0);
    a.send_content("together");
    // Bob gets what alice said while Redis was away, then the new one.
    let m1 = b.expect_json(Duration::from_secs(10));
    let m2 = b.expect_json(Duration::from_secs(10));
    assert_eq!(
        (m1["content"].as_str(), m2["content"].as_str()),
        (Some("alone"), Some("together"))
    );
}

/// A room deleted through one process closes its members on the others
/// with 4404.
#[test]
fn a_room_deleted_on_one_process_closes_its_members_on_all() {
    let redis = Redis::start();
    let (_dir, servers) = sqlite_cluster(&redis, 2);
    let room = uniq("doomed");
    let r = servers[0].post(
        "/rooms",
        &serde_json::json!({"name": room, "username": "alice"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let mut b = servers[1].ws(&room, "bob");
    b.round_trip("here", WAIT);
    let r = servers[0].delete(&format!("/rooms?name={}&username=alice", enc(&room)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(b.recv_until_close(Duration::from_secs(10)).0, 4404);
}

#[test]
fn a_malformed_broker_url_is_refused_at_start() {
    for bad in ["http://127.0.0.1:6379", "redis://", "not a url"] {
        let (status, out, err) = run_binary(&[], &[("BROKER_URL", bad)], Duration::from_secs(20));
        let text = format!("{out}{err}");
        assert!(!status.success(), "{bad}: started anyway:\n{text}");
        assert!(text.contains("BROKER_URL"), "{bad}: {text}");
        assert!(!text.contains("listening on"), "{bad}: {text}");
    }
}

/// One process killed with SIGKILL: the other keeps serving, and a member
/// of the dead one that reconnects to it with `since=` misses nothing.
#[test]
fn a_process_killed_mid_chat_leaves_nothing_missing_for_its_members() {
    let redis = Redis::start();
    let (_dir, mut servers) = sqlite_cluster(&redis, 2);
    let room = uniq("survive");
    let mut a = servers[0].ws(&room, "alice");
    let mut b = servers[1].ws(&room, "bob");
    a.round_trip("start", WAIT);
    let seen = b.expect_json(WAIT);
    assert_eq!(seen["content"], "start");
    let mut last = seen["seq"].as_i64().unwrap();
    for k in 0..10 {
        a.round_trip(&format!("before{k}"), WAIT);
    }
    // Bob reads some of it, then his process dies.
    for _ in 0..5 {
        last = b.expect_json(WAIT)["seq"].as_i64().unwrap();
    }
    common::contract::signal(&servers[1], libc::SIGKILL);
    let _ = servers[1].wait_exit(Duration::from_secs(10));
    for k in 0..10 {
        a.round_trip(&format!("after{k}"), WAIT);
    }
    let dead = servers.pop().expect("two");
    drop(dead);
    let mut b = servers[0].ws_path(&format!("/ws/{}?username=bob&since={last}", enc(&room)));
    let got = b.recv_n(15, Duration::from_secs(10));
    let seqs: Vec<i64> = got.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (last + 1..=last + 15).collect::<Vec<_>>());
    assert_eq!(got.last().unwrap()["content"], "after9");
}

/// `members` of `room` in `server`'s `GET /rooms` (0 when not listed).
fn listed_members(server: &Server, room: &str) -> u64 {
    server
        .rooms()
        .iter()
        .find(|r| r["name"] == room)
        .and_then(|r| r["members"].as_u64())
        .unwrap_or(0)
}

/// Poll every server's room list until each counts `want` members in
/// `room`; returns how long that took. Panics after `timeout`.
fn await_members(servers: &[&Server], room: &str, want: u64, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let seen: Vec<u64> = servers.iter().map(|s| listed_members(s, room)).collect();
        if seen.iter().all(|&n| n == want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{room}: processes count {seen:?} members, not {want} each, after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /rooms` on any process counts the members of every process, follows
/// joins and leaves, and drops a process killed with SIGKILL within a few
/// seconds (its counts expire in Redis).
#[test]
fn member_counts_add_up_every_process_and_drop_a_dead_one() {
    let redis = Redis::start();
    let (_dir, mut servers) = sqlite_cluster(&redis, 3);
    let room = uniq("counted");
    let other = uniq("elsewhere");
    let mut clients = Vec::new();
    for (i, n) in [2, 1, 3].into_iter().enumerate() {
        for j in 0..n {
            let mut c = servers[i].ws(&room, &format!("m{i}-{j}"));
            c.round_trip("here", WAIT);
            clients.push((i, c));
        }
    }
    let mut lone = servers[1].ws(&other, "lone");
    lone.round_trip("here", WAIT);
    let all: Vec<&Server> = servers.iter().collect();
    await_members(&all, &room, 6, Duration::from_secs(10));
    await_members(&all, &other, 1, Duration::from_secs(10));
    for s in &servers {
        s.await_metric("chatconnect_broker_instances", "3 processes", |v| v == 3.0);
    }

    // One of process 0's members leaves.
    let at = clients.iter().position(|(i, _)| *i == 0).expect("one on 0");
    drop(clients.remove(at));
    await_members(&all, &room, 5, Duration::from_secs(10));

    // Process 2 (3 members) dies without a word.
    common::contract::signal(&servers[2], libc::SIGKILL);
    let _ = servers[2].wait_exit(Duration::from_secs(10));
    let dead = servers.pop().expect("three");
    let live: Vec<&Server> = servers.iter().collect();
    let took = await_members(&live, &room, 2, Duration::from_secs(15));
    // Its counts expire 3 s after its last refresh; others read once a
    // second.
    assert!(
        took < Duration::from_secs(6),
        "a dead process counted for {took:?}"
    );
    await_members(&live, &other, 1, Duration::from_secs(5));
    for s in &servers {
        s.await_metric("chatconnect_broker_instances", "2 processes", |v| v == 2.0);
    }
    drop(dead);
}

/// Without a broker a room's count is this process's alone.
#[test]
fn member_counts_without_a_broker_are_this_process_s() {
    let s = Server::start();
    let room = uniq("alone");
    let mut a = s.ws(&room, "a");
    let mut b = s.ws(&room, "b");
    a.round_trip("1", WAIT);
    b.round_trip("2", WAIT);
    assert_eq!(listed_members(&s, &room), 2);
    assert!(s.metrics().contains("chatconnect_broker_instances 0"));
}

/// A room deleted while messages are on their way through the broker, then
/// made again under its name at once: the new room's members, on every
/// process, get the new room's messages only, from its first seq on, once
/// each and in order.
#[test]
fn a_room_made_again_never_gets_the_old_room_s_messages() {
    let redis = Redis::start();
    let (_dir, servers) = sqlite_cluster(&redis, 2);
    let room = uniq("reborn");
    let r = servers[0].post(
        "/rooms",
        &serde_json::json!({"name": room, "username": "alice"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    // Senders on both processes keep the old room busy until it goes.
    let senders: Vec<thread::JoinHandle<()>> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut c = s.ws(&room, &format!("old{i}"));
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut k = 0;
                while Instant::now() < deadline {
                    if c.try_send_content(&format!("old{i}-{k}")).is_err() {
                        return; // closed: the room is gone
                    }
                    k += 1;
                    // Read what came back meanwhile; stop at the close.
                    loop {
                        match c.recv(Duration::from_millis(2)) {
                            Event::Text(_) => continue,
                            Event::Timeout => break,
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let r = servers[0].delete(&format!("/rooms?name={}&username=alice", enc(&room)));
    assert_eq!(r.status, 200, "{r:?}");
    let r = servers[1].post(
        "/rooms",
        &serde_json::json!({"name": room, "username": "carol"}),
    );
    assert_eq!(r.status, 201, "made again: {r:?}");
    for h in senders {
        h.join().expect("old sender");
    }
    // The new room's members, one on each process, each sending.
    let mut members: Vec<WsClient> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| s.ws(&room, &format!("new{i}")))
        .collect();
    let per = 20;
    for k in 0..per {
        for (i, c) in members.iter_mut().enumerate() {
            c.send_content(&format!("s{i}-{k}"));
        }
    }
    for (i, c) in members.iter_mut().enumerate() {
        let got = receive_all(c, 2 * per, Duration::from_secs(30));
        for m in &got {
            let text = m["content"].as_str().unwrap_or_default();
            assert!(!text.starts_with("old"), "member {i} got {m}");
        }
        assert_eq!(got[0]["seq"].as_i64(), Some(1), "member {i}: {:?}", got[0]);
    }
    let stored = servers[0].messages(&room, "");
    assert!(
        stored
            .iter()
            .all(|m| !m["content"].as_str().unwrap_or_default().starts_with("old")),
        "the new room's history holds old messages"
    );
}
