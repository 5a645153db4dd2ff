//! WebSocket chat: frames, ordering, identity, history, resume, joining while
//! the room is busy, error frames, rate limit, room deletion.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn echo_has_the_message_frame_shape() {
    let s = Server::start();
    let room = uniq("Shape");
    let user = uniq("alice");
    let mut c = s.ws(&room, &user);
    let before = now_millis();
    c.send_json(&json!({"room_id": room, "username": user, "content": "Hello, world!"}));
    let m = c.expect_json(WAIT);
    let obj = m.as_object().expect("frame is an object");
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["content", "room_id", "seq", "timestamp", "username"],
        "{m}"
    );
    assert_eq!(m["room_id"], room.as_str());
    assert_eq!(m["username"], user.as_str());
    assert_eq!(m["content"], "Hello, world!");
    assert_eq!(m["seq"], 1, "the first message of a new room has seq 1");
    let ts = m["timestamp"].as_str().expect("timestamp string");
    assert!(
        is_rfc3339_millis_utc(ts),
        "timestamp {ts:?} is not RFC 3339 UTC with milliseconds"
    );
    let t = parse_rfc3339_millis(ts);
    assert!(
        t >= before - 1000 && t <= now_millis() + 1000,
        "timestamp {ts} is not the server's now"
    );

    let m2 = c.round_trip("second", WAIT);
    assert_eq!(m2["seq"], 2);
    assert!(parse_rfc3339_millis(m2["timestamp"].as_str().unwrap()) >= t);
}

#[test]
fn all_members_see_the_same_messages_in_the_same_order() {
    let s = Server::start();
    let room = uniq("Together");
    const PER: usize = 20;
    let users = ["ann", "ben", "cat"];
    let mut clients: Vec<WsClient> = users.iter().map(|u| s.ws(&room, u)).collect();
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = clients
        .drain(..)
        .zip(users)
        .map(|(mut c, u)| {
            let tx = tx.clone();
            thread::spawn(move || {
                for i in 0..PER {
                    c.send_content(&format!("{u}-{i}"));
                }
                let got = c.recv_n(PER * 3, Duration::from_secs(10));
                tx.send((u, got, c)).expect("send result");
            })
        })
        .collect();
    drop(tx);
    for h in handles {
        h.join().expect("member thread");
    }
    let mut results: Vec<(&str, Vec<Value>, WsClient)> = rx.iter().collect();
    assert_eq!(results.len(), 3);
    // Nothing more (no duplicate) is on its way to anyone: the next frame of
    // every member is a marker sent after all of it.
    results[0].2.send_content("marker");
    for (u, _, c) in &mut results {
        let m = c.expect_content_next("marker");
        assert_eq!(m["seq"], (PER * 3 + 1) as i64, "member {u}: {m}");
    }
    for (u, got, _) in &results {
        assert_eq!(
            seqs(got),
            (1..=(PER * 3) as i64).collect::<Vec<_>>(),
            "member {u} must see every message exactly once, in seq order"
        );
    }
    let first = &results[0].1;
    assert_eq!(
        seqs(first),
        (1..=(PER * 3) as i64).collect::<Vec<_>>(),
        "seq increases by 1"
    );
    for (u, got, _) in &results {
        assert_eq!(
            got, first,
            "member {u} saw a different stream than {}",
            results[0].0
        );
    }
    // Each sender's own messages are in its sending order and under its name.
    for u in users {
        let mine: Vec<&str> = first
            .iter()
            .filter(|m| m["username"] == u)
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        let want: Vec<String> = (0..PER).map(|i| format!("{u}-{i}")).collect();
        assert_eq!(mine, want, "{u}'s messages");
    }
}

#[test]
fn client_cannot_set_room_username_or_timestamp() {
    let s = Server::start();
    let room = uniq("Honest");
    let other_room = uniq("Elsewhere");
    let user = uniq("trudy");
    let mut c = s.ws(&room, &user);
    let mut watcher = s.ws(&room, "watcher");
    c.send_json(&json!({
        "room_id": other_room,
        "username": "mallory",
        "timestamp": "1999-01-01T00:00:00.000Z",
        "seq": 999,
        "content": "spoof attempt"
    }));
    for m in [c.expect_json(WAIT), watcher.expect_json(WAIT)] {
        assert_eq!(m["room_id"], room.as_str(), "{m}");
        assert_eq!(m["username"], user.as_str(), "{m}");
        assert_eq!(m["seq"], 1, "{m}");
        let ts = m["timestamp"].as_str().unwrap();
        assert!(
            !ts.starts_with("1999"),
            "client-set timestamp was kept: {m}"
        );
        assert!(
            (parse_rfc3339_millis(ts) - now_millis()).abs() < 60_000,
            "{m}"
        );
    }
    // Nothing went to the other room.
    s.get(&format!("/rooms/{}/messages", enc(&other_room)))
        .expect_error(404);
    let stored = s.messages(&room, "");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["username"], user.as_str());
}

#[test]
fn missing_username_is_anonymous() {
    let s = Server::start();
    let room = uniq("Anon");
    let mut c = s.ws_path(&format!("/ws/{}", enc(&room)));
    let m = c.round_trip("who am i", WAIT);
    assert_eq!(m["username"], "Anonymous");
    let mut c2 = s.ws_path(&format!("/ws/{}?username=", enc(&room)));
    let m = c2.round_trip("and me", WAIT); // after the history
    assert_eq!(m["username"], "Anonymous");
}

#[test]
fn messages_stay_in_their_room() {
    let s = Server::start();
    let (ra, rb) = (uniq("RoomA"), uniq("RoomB"));
    let mut a = s.ws(&ra, "a");
    let mut b = s.ws(&rb, "b");
    a.round_trip("for A only", WAIT);
    // A's message went out with its echo: b's next frame is its own.
    b.expect_marker_next("for B only");
    a.expect_marker_next("A again");
    assert_eq!(seqs(&s.messages(&ra, "")), vec![1, 2]);
    assert_eq!(seqs(&s.messages(&rb, "")), vec![1]);
}

#[test]
fn joiner_gets_newest_50_oldest_first() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("History");
    let echoes = post_messages(&s, &room, "poster", "h", 60);
    assert_eq!(seqs(&echoes), (1..=60).collect::<Vec<_>>());
    let mut j = s.ws(&room, "joiner");
    let hist = j.recv_n(50, WAIT);
    assert_eq!(
        seqs(&hist),
        (11..=60).collect::<Vec<_>>(),
        "history must be exactly the newest 50, oldest first"
    );
    for (h, e) in hist.iter().zip(&echoes[10..]) {
        assert_eq!(h, e, "history frame differs from the live frame");
    }
    // Nothing more, then live traffic.
    let m = j.expect_marker_next("after history");
    assert_eq!(m["seq"], 61);
}

#[test]
fn history_limit_is_configurable() {
    let s = Server::start_with(&[("HISTORY_LIMIT", "5")]);
    let room = uniq("Short");
    post_messages(&s, &room, "poster", "s", 12);
    let mut j = s.ws(&room, "joiner");
    assert_eq!(seqs(&j.recv_n(5, WAIT)), (8..=12).collect::<Vec<_>>());
    assert_eq!(j.expect_marker_next("after history")["seq"], 13);
}

#[test]
fn new_room_has_no_history() {
    let s = Server::start();
    let mut c = s.ws(&uniq("Fresh"), "x");
    assert_eq!(c.expect_marker_next("first")["seq"], 1);
}

#[test]
fn since_resumes_after_a_seq() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Resume");
    post_messages(&s, &room, "poster", "r", 60);
    let path = |since: &str| format!("/ws/{}?username=back&since={since}", enc(&room));

    let mut c = s.ws_path(&path("55"));
    let got = c.recv_n(5, WAIT);
    assert_eq!(seqs(&got), (56..=60).collect::<Vec<_>>());
    assert_eq!(got[0]["content"], "r-55");
    let m = c.expect_marker_next("after resume");
    assert_eq!(m["seq"], 61);

    // since=0: everything (more than the 50 of plain history).
    let mut c = s.ws_path(&path("0"));
    assert_eq!(seqs(&c.recv_n(61, WAIT)), (1..=61).collect::<Vec<_>>());
    assert_eq!(c.expect_marker_next("caught up")["seq"], 62);

    // since at the newest: nothing, then live.
    let mut c = s.ws_path(&path("62"));
    assert_eq!(c.expect_marker_next("live again")["seq"], 63);
    // since beyond the newest is not a position in this room: the newest
    // 50, as for a new member, then live.
    let mut c2 = s.ws_path(&path("500"));
    assert_eq!(seqs(&c2.recv_n(50, WAIT)), (14..=63).collect::<Vec<_>>());
    assert_eq!(c2.expect_marker_next("and live")["seq"], 64);
    let m = c.expect_json(WAIT);
    assert_eq!(
        (m["seq"].as_i64(), m["content"].as_str()),
        (Some(64), Some("and live"))
    );
}

#[test]
fn since_from_a_deleted_room_gets_the_new_rooms_messages() {
    // A client saw seq 30 in a room that was then deleted and created
    // again; it reconnects with since=30.
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Reborn");
    post_messages(&s, &room, "owner", "old", 30);
    let r = s.delete(&format!("/rooms?name={}&username=owner", enc(&room)));
    assert_eq!(r.status, 200, "{r:?}");
    post_messages(&s, &room, "owner", "new", 3);
    let mut c = s.ws_path(&format!("/ws/{}?username=back&since=30", enc(&room)));
    let got = c.recv_n(3, WAIT);
    assert_eq!(seqs(&got), vec![1, 2, 3], "{got:?}");
    assert_eq!(got[0]["content"], "new-0");
    let m = c.expect_marker_next("back again");
    assert_eq!(m["seq"], 4);
}

#[test]
fn since_sends_at_most_the_newest_1000() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Backlog");
    post_messages(&s, &room, "poster", "k", 1010);
    let mut c = s.ws_path(&format!("/ws/{}?username=late&since=0", enc(&room)));
    let got = c.recv_n(1000, Duration::from_secs(20));
    assert_eq!(
        seqs(&got),
        (11..=1010).collect::<Vec<_>>(),
        "since=0 with 1010 stored: the newest 1000"
    );
    assert_eq!(c.expect_marker_next("nothing more")["seq"], 1011);
    // The client pages the gap over REST.
    let gap = s.messages(&room, "before=11&limit=200");
    assert_eq!(seqs(&gap), (1..=10).collect::<Vec<_>>());
}

#[test]
fn joining_while_room_is_busy_loses_and_duplicates_nothing() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Busy");
    const N: usize = 300;
    let mut sender = s.ws(&room, "sender");
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        for i in 0..N {
            sender.send_content(&format!("m{i}"));
            if i == 100 {
                tx.send(()).expect("signal");
            }
            if i % 5 == 4 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        let echoes = sender.recv_n(N, Duration::from_secs(30));
        seqs(&echoes)
    });
    rx.recv_timeout(Duration::from_secs(15))
        .expect("sender reached message 100");
    let mut joiner = s.ws(&room, "joiner");
    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && got.len() < 2 * N {
        match joiner.recv_json(Duration::from_secs(5)) {
            Some(m) => {
                let last = m["seq"] == N as i64;
                got.push(m);
                if last {
                    break;
                }
            }
            None => break,
        }
    }
    // Nothing after the last: the next frame is a marker.
    let marker = joiner.expect_marker_next("joiner done");
    assert_eq!(marker["seq"], N as i64 + 1);
    let sender_seqs = t.join().expect("sender thread");
    assert_eq!(
        sender_seqs,
        (1..=N as i64).collect::<Vec<_>>(),
        "sender's echoes"
    );

    let sq = seqs(&got);
    assert!(!sq.is_empty(), "joiner received nothing");
    assert_eq!(
        *sq.last().unwrap(),
        N as i64,
        "joiner did not reach the last message: {sq:?}"
    );
    for w in sq.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "gap or duplicate between {} and {} in {sq:?}",
            w[0],
            w[1]
        );
    }
    assert!(
        sq[0] <= 101 + 50,
        "joined mid-stream but first seq is {}",
        sq[0]
    );
    for m in &got {
        let seq = m["seq"].as_i64().unwrap();
        assert_eq!(m["content"], format!("m{}", seq - 1), "{m}");
    }
}

#[test]
fn members_connected_before_a_burst_receive_all_of_it() {
    // A member whose upgrade has completed is in the room: a burst sent right
    // after must reach it whole, even when the burst outgrows HISTORY_LIMIT
    // before the member's history has been loaded (several members joining a
    // new room at once, then an immediate burst).
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    const N: usize = 120;
    for round in 0..10 {
        let room = uniq("Burst");
        let mut sender = s.ws(&room, "sender");
        let mut joiners: Vec<WsClient> =
            (0..3).map(|i| s.ws(&room, &format!("joiner{i}"))).collect();
        for i in 0..N {
            sender.send_content(&format!("burst{i}"));
        }
        for (j, joiner) in joiners.iter_mut().enumerate() {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while got.len() < N {
                let left = deadline.saturating_duration_since(Instant::now());
                match joiner.recv_json(left.min(Duration::from_secs(2))) {
                    Some(m) => got.push(m),
                    None => break,
                }
            }
            assert_eq!(
                seqs(&got),
                (1..=N as i64).collect::<Vec<_>>(),
                "round {round}, joiner {j}: connected before the burst but did not get all of it"
            );
        }
        sender.recv_n(N, Duration::from_secs(15));
    }
}

#[test]
fn invalid_messages_get_error_frames_and_are_not_stored() {
    let s = Server::start();
    let room = uniq("Errors");
    let mut c = s.ws(&room, "erratic");
    let mut watcher = s.ws(&room, "watcher");
    let cases: Vec<(String, &str)> = vec![
        ("not json at all".into(), "invalid_json"),
        ("{\"content\": ".into(), "invalid_json"),
        ("[1, 2, 3]".into(), "invalid_json"),
        ("\"just a string\"".into(), "invalid_json"),
        (json!({"content": 42}).to_string(), "invalid_json"),
        (json!({"content": null}).to_string(), "invalid_json"),
        (json!({"content": ["a"]}).to_string(), "invalid_json"),
        (
            json!({"content": {"text": "hi"}}).to_string(),
            "invalid_json",
        ),
        (
            json!({"message": "no content field"}).to_string(),
            "invalid_json",
        ),
        (json!({"content": ""}).to_string(), "empty_content"),
        (json!({"content": "   "}).to_string(), "empty_content"),
        (json!({"content": " \n\t "}).to_string(), "empty_content"),
        (json!({"content": "x".repeat(4001)}).to_string(), "too_long"),
        (
            json!({"content": "\u{e9}".repeat(4001)}).to_string(),
            "too_long",
        ),
    ];
    for (text, code) in &cases {
        c.send_text(text);
        let m = c.expect_json(WAIT);
        assert_eq!(m["code"], *code, "for {:.80}: {m}", text);
        assert!(
            m["error"].as_str().is_some_and(|e| !e.is_empty()),
            "error frame without text: {m}"
        );
        assert!(
            m.get("seq").is_none(),
            "an error frame is not a message: {m}"
        );
    }
    // The connection stayed open, and the edges that are fine are accepted:
    // exactly 4000 characters, counted as characters not bytes.
    let long = "x".repeat(4000);
    let m = c.round_trip(&long, WAIT);
    assert_eq!(
        m["seq"], 1,
        "none of the rejected messages may have used a seq"
    );
    let wide = "\u{e9}".repeat(4000); // 8000 bytes, 4000 characters
    let m = c.round_trip(&wide, WAIT);
    assert_eq!(m["seq"], 2);
    // Content with surrounding spaces is kept as sent.
    let m = c.round_trip("  padded  ", WAIT);
    assert_eq!(m["content"], "  padded  ");
    // The watcher saw only the three accepted messages, never an error frame.
    let seen = watcher.recv_n(3, WAIT);
    assert_eq!(seqs(&seen), vec![1, 2, 3]);
    assert_eq!(seqs(&s.messages(&room, "")), vec![1, 2, 3]);
    watcher.expect_marker_next("nothing else");
}

#[test]
fn max_message_chars_is_configurable() {
    let s = Server::start_with(&[("MAX_MESSAGE_CHARS", "10")]);
    let mut c = s.ws(&uniq("Tiny"), "t");
    c.send_content("12345678901");
    assert_eq!(c.expect_json(WAIT)["code"], "too_long");
    let m = c.round_trip("1234567890", WAIT);
    assert_eq!(m["seq"], 1);
}

#[test]
fn rate_limit_refuses_excess_messages() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "5"), ("WS_RATE_BURST", "5")]);
    let room = uniq("Limited");
    let mut c = s.ws(&room, "spammer");
    const N: usize = 30;
    for i in 0..N {
        c.send_content(&format!("spam{i}"));
    }
    let frames = c.recv_n(N, Duration::from_secs(10));
    let accepted: Vec<&Value> = frames.iter().filter(|f| f.get("seq").is_some()).collect();
    let limited = frames
        .iter()
        .filter(|f| f["code"] == "rate_limited")
        .count();
    assert_eq!(
        accepted.len() + limited,
        N,
        "every message gets an echo or rate_limited: {frames:?}"
    );
    assert!(
        accepted.len() >= 5,
        "the burst of 5 must pass, {} did",
        accepted.len()
    );
    assert!(
        accepted.len() <= 10,
        "rate 5/s burst 5 let {} of {N} instant messages through",
        accepted.len()
    );
    assert!(limited >= N - 10);
    let stored = s.messages(&room, "limit=100");
    assert_eq!(
        stored.len(),
        accepted.len(),
        "rate-limited messages were stored"
    );
    // The bucket refills: after a second, messages pass again.
    thread::sleep(Duration::from_millis(1200));
    let m = c.round_trip("after a pause", WAIT);
    assert!(m.get("seq").is_some(), "{m}");
}

#[test]
fn default_rate_limit_allows_a_burst_of_200() {
    let s = Server::start();
    let mut c = s.ws(&uniq("Burst"), "burster");
    for i in 0..150 {
        c.send_content(&format!("b{i}"));
    }
    let frames = c.recv_n(150, Duration::from_secs(15));
    let limited: Vec<&Value> = frames.iter().filter(|f| f.get("code").is_some()).collect();
    assert!(
        limited.is_empty(),
        "150 messages are within the default burst of 200: {limited:?}"
    );
}

#[test]
fn deleting_a_room_closes_members_with_4404() {
    let s = Server::start();
    let room = uniq("Closing");
    let owner = uniq("owner");
    let mut a = s.ws(&room, &owner);
    let mut b = s.ws(&room, "member");
    a.round_trip("before delete", WAIT);
    b.expect_json(WAIT);
    let r = s.delete(&format!(
        "/rooms?name={}&username={}",
        enc(&room),
        enc(&owner)
    ));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(a.recv_until_close(WAIT), (4404, "room deleted".to_string()));
    assert_eq!(b.recv_until_close(WAIT), (4404, "room deleted".to_string()));
    // A new room of the same name starts empty.
    let mut c = s.ws(&room, "newcomer");
    let m = c.expect_marker_next("fresh start");
    assert_eq!(s.messages(&room, ""), vec![m.clone()]);
    let list = s.rooms();
    let found = list
        .iter()
        .find(|r| r["name"] == room.as_str())
        .expect("re-created room");
    assert_eq!(found["creator"], "newcomer");
    // Members of other rooms were not disturbed.
    s.assert_still_serving();
}

#[test]
fn sender_may_leave_right_after_sending() {
    let s = Server::start();
    let room = uniq("Leaver");
    let mut watcher = s.ws(&room, "watcher");
    {
        let mut c = s.ws(&room, "leaver");
        c.send_content("goodbye");
        let _ = c.ws.close(None);
        let _ = c.ws.flush();
    }
    let m = watcher.expect_json(WAIT);
    assert_eq!(m["content"], "goodbye");
    assert_eq!(m["username"], "leaver");
}

#[test]
fn client_close_is_answered_and_ping_is_ponged() {
    let s = Server::start();
    let mut raw = RawWs::connect(
        s.addr(),
        &format!("/ws/{}?username=pinger", enc(&uniq("Ping"))),
    );
    raw.send_frame(OP_PING, b"are you there").expect("ping");
    let f = loop {
        let f = raw.read_frame(WAIT).expect("pong");
        if f.opcode != OP_PING {
            break f;
        }
    };
    assert_eq!(f.opcode, OP_PONG, "{f:?}");
    assert_eq!(f.payload, b"are you there");
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    raw.send_frame(OP_CLOSE, &payload).expect("close");
    let (end, _) = raw.read_until_close(WAIT);
    let (code, _) = end.expect("server answers a close with a close");
    assert_eq!(code, 1000);
}

/// How one member session of the delete race below ended.
enum RaceEnd {
    /// Every message it sent came back.
    Echoed,
    /// Closed with 4404 (the room was deleted under it), after sending these.
    Deleted(Vec<String>),
    /// The upgrade was refused: the room was being deleted.
    Refused,
}

/// One member session of the delete race below: connect, send a few
/// messages, wait for each echo. A session may only end in one of the
/// documented ways; anything else fails the test.
fn race_session(s: &Server, room: &str, tag: &str) -> RaceEnd {
    let path = format!("/ws/{}?username={tag}", enc(room));
    let mut c = match s.try_ws(&path, &[]) {
        Ok(c) => c,
        Err(tungstenite::Error::Http(resp)) if resp.status() == 503 => {
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .expect("a JSON body with the 503");
            assert_eq!(
                body,
                json!({"error": "Room is being deleted; retry shortly"}),
                "session {tag}"
            );
            thread::sleep(Duration::from_millis(5));
            return RaceEnd::Refused;
        }
        Err(e) => panic!(
            "session {tag}: the upgrade must succeed or answer 503, got {}",
            describe_ws_error(&e)
        ),
    };
    let sent: Vec<String> = (0..5).map(|n| format!("{tag}-{n}")).collect();
    for content in &sent {
        c.send_content(content);
    }
    let mut echoed = 0;
    while echoed < sent.len() {
        match c.recv(WAIT) {
            Event::Text(t) => {
                let m: Value = serde_json::from_str(&t).expect("a JSON frame");
                assert!(m.get("seq").is_some(), "session {tag}: not a message: {m}");
                if m["username"] == tag {
                    echoed += 1;
                }
            }
            Event::Close(Some((4404, _))) => return RaceEnd::Deleted(sent),
            other => panic!("session {tag}: expected its echoes or a 4404 close, got {other:?}"),
        }
    }
    RaceEnd::Echoed
}

#[test]
fn deleting_a_busy_room_keeps_its_messages_out_of_the_next_room_of_that_name() {
    // Members keep sending and reconnecting while the room is deleted, so a
    // message is always on its way to the store and a reconnect may create
    // the room again at once. Nothing sent on a session that ended with 4404
    // may turn up in the new room. Bounded: 12 rounds of about 0.5 s.
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let closed_by_delete = std::sync::atomic::AtomicUsize::new(0);
    for round in 0..12 {
        let room = uniq("Busy");
        let r = s.post("/rooms", &json!({"name": room, "username": "owner"}));
        assert_eq!(r.status, 201, "{r:?}");
        let stop = AtomicBool::new(false);
        let deleted_sessions: Mutex<Vec<String>> = Mutex::new(Vec::new());
        thread::scope(|scope| {
            for t in 0..16 {
                let (s, room, stop, out) = (&s, &room, &stop, &deleted_sessions);
                let closed_by_delete = &closed_by_delete;
                scope.spawn(move || {
                    for k in 0..200 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let tag = format!("r{round}t{t}k{k}");
                        if let RaceEnd::Deleted(sent) = race_session(s, room, &tag) {
                            closed_by_delete.fetch_add(1, Ordering::SeqCst);
                            out.lock().unwrap().extend(sent);
                        }
                    }
                });
            }
            thread::sleep(Duration::from_millis(150 + 20 * round));
            let d = s.delete(&format!("/rooms?name={}&username=owner", enc(&room)));
            assert_eq!(d.status, 200, "{d:?}");
            thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::SeqCst);
        });
        let gone = deleted_sessions.into_inner().unwrap();
        let r = s.get(&format!("/rooms/{}/messages?limit=100", enc(&room)));
        // Whatever the race left, the name is usable again at once.
        let mut after = s.ws(&room, "after");
        after.round_trip("after the delete", WAIT); // after any history
        if r.status == 404 {
            continue; // nobody created it again
        }
        let leaked: Vec<String> = r
            .json()
            .as_array()
            .expect("a page")
            .iter()
            .filter_map(|m| m["content"].as_str())
            .filter(|c| gone.iter().any(|g| g == c))
            .map(str::to_owned)
            .collect();
        assert!(
            leaked.is_empty(),
            "round {round}: sent on sessions closed with 4404, yet in the new room: {leaked:?}"
        );
    }
    // The race was a race: deletes met sessions under way.
    assert!(
        closed_by_delete.into_inner() > 0,
        "no session was ever closed by a delete"
    );
    s.assert_still_serving();
}
