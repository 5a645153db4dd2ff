//! WebSocket limits and misbehaving peers: binary frames, oversized frames,
//! invalid UTF-8, protocol violations, members that never read, idle
//! connections, and chat latency while logins are hashing. After each, the
//! server must still serve everyone else.

mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::Message;

fn expect_close(end: (Result<(u16, String), FrameEnd>, usize), want: u16, what: &str) {
    match end.0 {
        Ok((code, _)) => assert_eq!(code, want, "{what}: close code"),
        Err(e) => panic!("{what}: expected a close frame {want}, the stream ended with {e:?}"),
    }
}

#[test]
fn binary_frame_closes_with_1003() {
    let s = Server::start();
    let room = uniq("Bin");
    let mut bystander = s.ws(&room, "bystander");
    let mut c = s.ws(&room, "binary");
    c.ws.send(Message::binary(vec![1u8, 2, 3, 4]))
        .expect("send binary");
    let (code, _) = c.recv_until_close(WAIT);
    assert_eq!(code, 1003);
    // The bystander in the same room is unaffected.
    let m = bystander.round_trip("still here", WAIT);
    assert_eq!(m["username"], "bystander");
    s.assert_still_serving();
}

#[test]
fn oversized_message_closes_with_1009() {
    let s = Server::start();
    let room = uniq("Big");
    let mut bystander = s.ws(&room, "bystander");
    let mut c = s.ws(&room, "big");
    let content = "x".repeat(70 * 1024);
    c.send_json(&json!({ "content": content }));
    let (code, _) = c.recv_until_close(WAIT);
    assert_eq!(code, 1009);
    // Had the big message been taken, it would come before this marker.
    bystander.expect_marker_next("after the big one");
    assert_eq!(
        s.messages(&room, "").len(),
        1,
        "the oversized message was stored"
    );
    s.assert_still_serving();
}

#[test]
fn oversized_fragmented_message_closes_with_1009() {
    let s = Server::start();
    let mut raw = RawWs::connect(
        s.addr(),
        &format!("/ws/{}?username=frag", enc(&uniq("Frag"))),
    );
    // Three 30 KiB fragments: each frame is small, the message is not.
    let chunk = vec![b'a'; 30 * 1024];
    let mut sent = Vec::new();
    sent.extend(encode_frame(false, OP_TEXT, &chunk, true));
    sent.extend(encode_frame(false, OP_CONT, &chunk, true));
    sent.extend(encode_frame(true, OP_CONT, &chunk, true));
    let _ = raw.stream.write_all(&sent);
    expect_close(
        raw.read_until_close(WAIT),
        1009,
        "fragmented 90 KiB message",
    );
    s.assert_still_serving();
}

#[test]
fn ws_max_message_is_configurable() {
    let s = Server::start_with(&[("WS_MAX_MESSAGE", "1KiB")]);
    let room = uniq("Small");
    let mut ok = s.ws(&room, "ok");
    let m = ok.round_trip(&"y".repeat(900), WAIT);
    assert_eq!(m["seq"], 1);
    let mut c = s.ws(&room, "big");
    c.recv_n(1, WAIT); // the history: the one message
    c.send_content(&"z".repeat(2000));
    assert_eq!(c.recv_until_close(WAIT).0, 1009);
}

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let s = Server::start();
    let room = uniq("Utf8");
    let mut bystander = s.ws(&room, "bystander");
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=badbytes", enc(&room)));
    raw.send_frame(OP_TEXT, &[0xff, 0xfe])
        .expect("send invalid utf-8");
    expect_close(raw.read_until_close(WAIT), 1007, "text frame 0xff 0xfe");
    // Invalid UTF-8 inside otherwise valid JSON, too.
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=badbytes2", enc(&room)));
    raw.send_frame(OP_TEXT, b"{\"content\": \"caf\xc3\"}")
        .expect("send");
    expect_close(raw.read_until_close(WAIT), 1007, "truncated UTF-8 sequence");
    bystander.expect_marker_next("unaffected");
    assert_eq!(s.messages(&room, "").len(), 1);
    s.assert_still_serving();
}

#[test]
fn protocol_violations_close_with_1002() {
    let s = Server::start();
    let room = uniq("Proto");
    // An unmasked client frame.
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=unmasked", enc(&room)));
    raw.stream
        .write_all(&encode_frame(true, OP_TEXT, b"{\"content\":\"hi\"}", false))
        .expect("send");
    expect_close(raw.read_until_close(WAIT), 1002, "unmasked client frame");
    // A reserved opcode.
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=reserved", enc(&room)));
    raw.stream
        .write_all(&encode_frame(true, 0x3, b"??", true))
        .expect("send");
    expect_close(raw.read_until_close(WAIT), 1002, "reserved opcode 3");
    // A continuation frame with nothing to continue.
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=cont", enc(&room)));
    raw.stream
        .write_all(&encode_frame(true, OP_CONT, b"orphan", true))
        .expect("send");
    expect_close(raw.read_until_close(WAIT), 1002, "orphan continuation");
    assert_eq!(s.messages(&room, "").len(), 0);
    s.assert_still_serving();
}

#[test]
fn fragmented_text_message_is_reassembled() {
    let s = Server::start();
    let room = uniq("Pieces");
    let mut watcher = s.ws(&room, "watcher");
    let mut raw = RawWs::connect(s.addr(), &format!("/ws/{}?username=pieces", enc(&room)));
    let mut bytes = Vec::new();
    bytes.extend(encode_frame(false, OP_TEXT, b"{\"content\":", true));
    bytes.extend(encode_frame(true, OP_PING, b"mid", true)); // control frame in between
    bytes.extend(encode_frame(false, OP_CONT, b" \"in three", true));
    bytes.extend(encode_frame(true, OP_CONT, b" parts\"}", true));
    raw.stream.write_all(&bytes).expect("send");
    let m = watcher.expect_json(WAIT);
    assert_eq!(m["content"], "in three parts");
    assert_eq!(m["username"], "pieces");
}

#[test]
fn slow_consumer_is_closed_with_1008_and_memory_stays_bounded() {
    let s = Server::start_with(&[("WS_MAX_BACKLOG", "256KiB"), ("WS_RATE_LIMIT", "0")]);
    let room = uniq("Flood");
    let path = format!("/ws/{}?username=", enc(&room));

    // The member that never reads.
    let mut stuck = non_reading_member(&s, &format!("{path}stuck"));

    // The flooder writes on one thread and reads its echoes on another.
    let mut flood = RawWs::connect(s.addr(), &format!("{path}flooder"));
    let mut writer = flood.stream.try_clone().expect("clone");
    const N: usize = 2000;
    const SIZE: usize = 3000; // ~6 MB in all
    let reader = thread::spawn(move || -> Result<usize, String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut got = 0usize;
        while got < N {
            let left = deadline.saturating_duration_since(Instant::now());
            match flood.read_frame(left) {
                Ok(f) if f.opcode == OP_TEXT && f.fin => got += 1,
                Ok(f) if f.opcode == OP_CONT && f.fin => got += 1,
                Ok(f) if f.opcode == OP_CLOSE => {
                    return Err(format!(
                    "the flooder, which reads all the time, was closed after {got} echoes: {:?}",
                    String::from_utf8_lossy(&f.payload)
                ))
                }
                Ok(_) => {}
                Err(e) => return Err(format!("flooder got {got} of {N} echoes, then {e:?}")),
            }
        }
        Ok(got)
    });
    let done = Arc::new(AtomicBool::new(false));
    let done_w = done.clone();
    let write_thread = thread::spawn(move || {
        let mut written = 0;
        for i in 0..N {
            let content = format!("{i:05}-{}", "x".repeat(SIZE));
            let frame = encode_client_frame(
                OP_TEXT,
                json!({ "content": content }).to_string().as_bytes(),
            );
            if writer.write_all(&frame).is_err() {
                break;
            }
            written += 1;
        }
        done_w.store(true, Ordering::SeqCst);
        written
    });

    let mut max_rss = 0;
    let t = Instant::now();
    while !(done.load(Ordering::SeqCst) && reader.is_finished())
        && t.elapsed() < Duration::from_secs(100)
    {
        max_rss = max_rss.max(s.rss_kib());
        thread::sleep(Duration::from_millis(50));
    }
    let written = write_thread.join().expect("writer");
    let flooder = reader.join().expect("flooder reader");
    max_rss = max_rss.max(s.rss_kib());
    assert!(
        max_rss < 150 * 1024,
        "server RSS reached {} MiB while one member did not read",
        max_rss / 1024
    );

    // The stuck member's socket: whatever was in flight, then a 1008 close.
    let (end, data_frames) = stuck.read_until_close(Duration::from_secs(30));
    match end {
        Ok((code, _)) => assert_eq!(code, 1008, "after {data_frames} frames"),
        Err(e) => panic!("slow consumer: no 1008 close frame after {data_frames} frames, stream ended with {e:?}"),
    }
    assert!(
        data_frames < N,
        "the stuck member was sent all {data_frames} messages: its backlog was not limited"
    );
    s.assert_still_serving();
    // A member that reads as fast as it can is not a slow consumer.
    assert_eq!(written, N, "the flooder could not write all its messages");
    assert_eq!(
        flooder,
        Ok(N),
        "the flooder (a reading member) must get every echo"
    );
}

#[test]
fn member_that_sends_but_never_reads_is_closed_with_1008() {
    // Every frame it sends gets an answer (an error frame for invalid JSON,
    // a pong for a ping) that it never reads. Those answers must meet the
    // backlog limit as broadcasts do, instead of growing the server.
    let s = Server::start_with(&[("WS_MAX_BACKLOG", "256KiB"), ("WS_RATE_LIMIT", "0")]);
    let closes =
        || metric_value(&s.metrics(), "chatconnect_slow_consumer_closes_total").expect("metric");
    for (what, opcode, payload) in [
        ("invalid JSON", OP_TEXT, b"x".to_vec()),
        ("pings", OP_PING, vec![b'p'; 125]),
    ] {
        let before = closes();
        let rss_before = s.rss_kib();
        let path = format!("/ws/{}?username=deaf", enc(&uniq("Deaf")));
        let mut deaf = non_reading_member(&s, &path);
        let burst: Vec<u8> = encode_client_frame(opcode, &payload).repeat(1000);
        // Up to 200,000 frames: their answers fill 256 KiB dozens of times.
        let mut sent = 0;
        while sent < 200 && closes() == before {
            if deaf.stream.write_all(&burst).is_err() {
                break;
            }
            sent += 1;
        }
        assert_eq!(
            closes(),
            before + 1.0,
            "{what}: no slow-consumer close after {sent}000 frames while not reading"
        );
        let grown = s.rss_kib().saturating_sub(rss_before);
        assert!(
            grown < 64 * 1024,
            "{what}: server RSS grew by {} MiB",
            grown / 1024
        );
        expect_close(deaf.read_until_close(Duration::from_secs(30)), 1008, what);
    }
    s.assert_still_serving();
}

#[test]
fn idle_connection_without_pongs_is_closed() {
    let s = Server::start_with(&[("PING_INTERVAL", "1s")]);
    let room = uniq("Idle");
    let addr = s.addr();
    let p1 = format!("/ws/{}?username=silent", enc(&room));
    let p2 = format!("/ws/{}?username=chatty", enc(&room));

    // A raw client that completes the handshake, then never answers anything.
    let silent = thread::spawn(move || {
        let mut raw = RawWs::connect(addr, &p1);
        let t = Instant::now();
        let mut pings = 0;
        let ended = loop {
            match raw.read_frame(Duration::from_secs(15).saturating_sub(t.elapsed())) {
                Ok(f) if f.opcode == OP_PING => pings += 1,
                Ok(f) if f.opcode == OP_CLOSE => break format!("close frame {:?}", f.payload),
                Ok(_) => {}
                Err(FrameEnd::Timeout) => {
                    return Err(format!("still open after {:?}", t.elapsed()))
                }
                Err(e) => break format!("{e:?}"),
            }
        };
        Ok((t.elapsed(), pings, ended))
    });

    // A raw client that never answers pings but sends a message twice a second.
    let chatty = thread::spawn(move || {
        let mut raw = RawWs::connect(addr, &p2);
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed() < Duration::from_millis(5500) {
            let msg = json!({"content": format!("tick{i}")}).to_string();
            if raw.send_frame(OP_TEXT, msg.as_bytes()).is_err() {
                return Err(format!(
                    "chatty client's write failed after {:?}",
                    t.elapsed()
                ));
            }
            i += 1;
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                match raw.read_frame(until.saturating_duration_since(Instant::now())) {
                    Ok(f) if f.opcode == OP_CLOSE => {
                        return Err(format!("chatty client closed after {:?}", t.elapsed()))
                    }
                    Ok(_) => {}
                    Err(FrameEnd::Timeout) => break,
                    Err(e) => {
                        return Err(format!("chatty client lost after {:?}: {e:?}", t.elapsed()))
                    }
                }
            }
        }
        Ok(())
    });

    // A normal client that keeps reading (tungstenite answers pings).
    let mut normal = s.ws(&room, "normal");
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(6000) {
        match normal.recv(Duration::from_millis(200)) {
            Event::Timeout | Event::Text(_) => {}
            other => panic!(
                "a client that answers pings was dropped after {:?}: {other:?}",
                t.elapsed()
            ),
        }
    }
    let m = normal.round_trip("still connected", WAIT);
    assert_eq!(m["username"], "normal");

    let (elapsed, pings, how) = silent
        .join()
        .expect("silent thread")
        .unwrap_or_else(|e| panic!("silent client: {e}"));
    assert!(
        pings >= 1,
        "the server sent no ping within {elapsed:?} with PING_INTERVAL=1s"
    );
    assert!(
        elapsed >= Duration::from_millis(2000) && elapsed <= Duration::from_secs(7),
        "silent client closed after {elapsed:?} ({how}); expected about three ping periods"
    );
    chatty
        .join()
        .expect("chatty thread")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Chat does not wait for password hashing. While 20 cost-12 logins keep
/// both hash threads busy, with more waiting for them throughout (shown by
/// the hash queue's depth before and after), a WebSocket round trip stays
/// within a few times its (median) unloaded time plus two logins' worth of noise. Were
/// the hashing on the event loop, or chat's store work queued behind it, a
/// round trip would wait for at least half the queued logins (five or more).
/// The bound comes from what this machine measured in this test, so a slow
/// machine and a fast one get the same verdict.
#[test]
fn chat_stays_fast_while_logins_hash() {
    const LOGINS: usize = 20;
    // Two hash threads whatever the machine: the logins take ten rounds.
    let mut s = Server::start_with(&[("BCRYPT_COST", "12"), ("WORKERS", "2")]);
    // The last logins wait for all the others: tens of seconds on a busy
    // machine.
    s.set_http_timeout(Duration::from_secs(120));
    let user = uniq("hasher");
    let creds = json!({"username": user, "password_hash": "correct horse battery"});
    s.register(&user, "correct horse battery");
    let room = uniq("Latency");
    let mut c = s.ws(&room, "chatter");
    c.round_trip("warm up", WAIT);
    let timed_round_trip = |c: &mut WsClient, content: &str| {
        let t = Instant::now();
        c.round_trip(content, Duration::from_secs(10));
        t.elapsed()
    };

    // Unloaded: the median of a few round trips (one hiccup must not
    // loosen the bound), and one login.
    let mut unloaded: Vec<Duration> = (0..5)
        .map(|i| timed_round_trip(&mut c, &format!("unloaded {i}")))
        .collect();
    unloaded.sort();
    let unloaded = unloaded[unloaded.len() / 2];
    let t = Instant::now();
    assert_eq!(s.post("/login", &creds).status, 200);
    let one_login = t.elapsed();
    let limit = 3 * unloaded + 2 * one_login;

    let hash_queue = "chatconnect_worker_queue_depth{lane=\"hash\"}";
    let (worst, waiting) = thread::scope(|scope| {
        let logins: Vec<_> = (0..LOGINS)
            .map(|_| scope.spawn(|| s.post("/login", &creds).status))
            .collect();
        s.await_metric(
            hash_queue,
            "half the logins waiting for a hash thread",
            |depth| depth >= (LOGINS / 2) as f64,
        );
        let worst = (0..3)
            .map(|i| timed_round_trip(&mut c, &format!("during logins {i}")))
            .max()
            .unwrap();
        let waiting = metric_value(&s.metrics(), hash_queue).expect("hash queue depth");
        for h in logins {
            assert_eq!(
                h.join().expect("login thread"),
                200,
                "a login failed under load"
            );
        }
        (worst, waiting)
    });
    eprintln!(
        "round trips: unloaded {unloaded:?}, during the logins {worst:?}; one login {one_login:?}"
    );
    assert!(
        worst < limit,
        "a WebSocket round trip took {worst:?} while {LOGINS} logins were hashing \
         (unloaded {unloaded:?}, one login {one_login:?}: limit {limit:?})"
    );
    assert!(
        waiting >= 1.0,
        "the logins finished before the round trips: the test measured nothing"
    );
}

#[test]
fn many_members_all_receive_a_broadcast() {
    let s = Server::start();
    let room = uniq("Crowd");
    let mut members: Vec<WsClient> = (0..100).map(|i| s.ws(&room, &format!("m{i}"))).collect();
    members[0].send_content("to everyone");
    for (i, m) in members.iter_mut().enumerate() {
        let f = m.expect_json(WAIT);
        assert_eq!(f["content"], "to everyone", "member {i}");
        assert_eq!(f["seq"], 1);
    }
    let ws_gauge = metric_value(&s.metrics(), "chatconnect_ws_connections").expect("metric");
    assert!(
        ws_gauge >= 100.0,
        "chatconnect_ws_connections = {ws_gauge} with 100 open"
    );
    drop(members);
    // The gauge comes back down once they are gone.
    s.await_metric("chatconnect_ws_connections", "the clients left", |g| {
        g < 100.0
    });
}

/// Regression: a client closed for a bad frame while its history was still
/// loading used to be revived as live when the history arrived, and its next
/// read crashed the server. The frames ride in the same write as the upgrade
/// request, so the close always happens before the history comes back.
#[test]
fn closed_while_joining_stays_closed_and_server_survives() {
    let s = Server::start();
    let room = uniq("EarlyClose");
    let mut bystander = s.ws(&room, "bystander");
    for (i, (frame, want)) in [
        (
            encode_client_frame(OP_TEXT, &vec![b'x'; 70 * 1024]),
            1009u16,
        ),
        (encode_client_frame(OP_BINARY, b"bin"), 1003),
        (encode_client_frame(OP_TEXT, &[0xff, 0xfe]), 1007),
    ]
    .into_iter()
    .enumerate()
    {
        let mut stream = TcpStream::connect(s.addr()).unwrap();
        let mut bytes = format!(
            "GET /ws/{}?username=early{i} HTTP/1.1\r\nHost: x\r\n{WS_UPGRADE_HEADERS}\r\n",
            enc(&room)
        )
        .into_bytes();
        bytes.extend_from_slice(&frame);
        // Keep the connection open after the bad frame, so the server still
        // holds it when the history completes.
        let _ = stream.write_all(&bytes);
        let mut raw = RawWs::from_stream_after_handshake(stream, s.addr());
        expect_close(raw.read_until_close(WAIT), want, "bad frame before history");
        // A closed connection's later frames are ignored, never chat.
        let ghost = json!({ "content": format!("ghost {i}") }).to_string();
        let _ = raw.send_frame(OP_TEXT, ghost.as_bytes());
        // Hang up: once the server has let the connection go (only the
        // bystander is left), it has read all of it, the ghost included.
        let _ = raw.stream.shutdown(Shutdown::Write);
        s.await_metric("chatconnect_ws_connections", "the closed one let go", |n| {
            n == 1.0
        });
        // Had the ghost been taken as chat, it would come before this.
        bystander.expect_marker_next(&format!("still here {i}"));
    }
    let stored = s.messages(&room, "limit=200");
    assert!(
        stored
            .iter()
            .all(|m| !m["content"].as_str().unwrap_or("").starts_with("ghost")),
        "a closed connection's message was stored: {stored:?}"
    );
    assert_eq!(stored.len(), 3, "{stored:?}");
    s.assert_still_serving();
}
