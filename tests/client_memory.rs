//! The memory budget of all connections together (`MAX_CLIENT_MEMORY`):
//! clients that pipeline HTTP requests and never read, and WebSocket members
//! of a busy room that stop reading, are held under a small budget set here;
//! the connections holding the most are closed; a client that reads keeps
//! chatting throughout; the count goes back to nothing once they have gone,
//! and so does the resident size.

mod common;

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use common::contract::ensure_fd_limit;
use common::*;
use serde_json::json;
use tungstenite::Message;

const BUDGET: usize = 4 << 20;
/// What one pass may add before the budget is enforced at its end: one
/// connection's turn (an input cap and a high-water mark of answers), and
/// what workers and fan-out deliver meanwhile.
const ONE_PASS: usize = 512 << 10;

fn gauge(s: &Server) -> usize {
    metric_value(&s.metrics(), "chatconnect_client_memory_bytes").expect("gauge") as usize
}

fn closes(s: &Server) -> usize {
    metric_value(&s.metrics(), "chatconnect_client_memory_closes_total").expect("counter") as usize
}

/// After everyone but the test's own clients has gone, the count is back
/// to (almost) nothing: what the queues and inputs held was given back.
fn count_returns_to_nothing(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = gauge(s);
    while now > 4096 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        now = gauge(s);
    }
    assert!(
        now <= 4096,
        "the connections still count {now} bytes after the clients that held them have gone"
    );
}

#[test]
fn pipelining_clients_are_held_under_the_budget_and_the_biggest_are_closed() {
    const CONNS: usize = 200;
    ensure_fd_limit(CONNS as u64 + 200);
    let budget = BUDGET.to_string();
    let s = Server::start_with(&[("MAX_CLIENT_MEMORY", &budget)]);
    assert_eq!(
        metric_value(&s.metrics(), "chatconnect_client_memory_budget_bytes"),
        Some(BUDGET as f64)
    );
    let room = uniq("beside");
    let mut alice = s.ws(&room, "alice");
    alice.round_trip("before", WAIT);
    let rss_before = s.rss_kib();

    // 100 KB of `GET /metrics` per connection, sent until the server stops
    // taking it; nothing is ever read.
    let mut attackers = Pipeliners::open(&s, CONNS);
    let mut highest = 0;
    let mut max_rss = rss_before;
    let mut round_trips = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        attackers.push();
        highest = highest.max(gauge(&s));
        max_rss = max_rss.max(s.rss_kib());
        // A client that reads is served all the while.
        alice.round_trip(&format!("during {round_trips}"), WAIT);
        // At a chatter's pace, well under the message rate limit.
        thread::sleep(Duration::from_millis(20));
        round_trips += 1;
    }
    let sent = attackers.sent();
    let closed = closes(&s);
    eprintln!(
        "{CONNS} pipelining clients sent {sent} bytes; counted at most {highest} bytes \
         (budget {BUDGET}); {closed} closed; RSS {rss_before} -> max {max_rss} KiB; \
         {round_trips} round trips meanwhile"
    );
    assert!(
        sent >= CONNS * 64 * 1024,
        "the clients could not even send 64 KiB each ({sent} bytes): the test proves nothing"
    );
    assert!(closed > 0, "no connection was closed for the budget");
    assert!(
        highest <= BUDGET + ONE_PASS,
        "the connections held {highest} bytes, over the budget of {BUDGET} by more than one pass"
    );
    let grown_kib = max_rss.saturating_sub(rss_before);
    assert!(
        grown_kib < 16 * 1024,
        "server RSS grew by {grown_kib} KiB under a {BUDGET}-byte budget"
    );

    // The attackers were closed: each stream ends (after what it was sent).
    let mut ended = 0;
    for (c, _) in &mut attackers.conns {
        c.set_nonblocking(false).expect("blocking");
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 64 * 1024];
        loop {
            match c.read(&mut buf) {
                Ok(0) => {
                    ended += 1;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    ended += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert!(
        ended >= closed.min(CONNS) / 2,
        "{closed} closed for the budget, but only {ended} attacker streams ended"
    );
    let log = s.log_text();
    assert!(
        log.contains("over MAX_CLIENT_MEMORY"),
        "the episode is not in the log"
    );
    drop(attackers);
    alice.round_trip("after", WAIT);
    count_returns_to_nothing(&s);
    assert!(
        log.matches("over MAX_CLIENT_MEMORY").count() <= 3,
        "the episode was logged more than once or twice:\n{log}"
    );

    // And the resident size comes back close to where it was.
    let limit = 2 * rss_before + 16 * 1024;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = s.rss_kib();
    while now > limit && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        now = s.rss_kib();
    }
    assert!(now <= limit, "RSS stayed at {now} KiB (limit {limit} KiB)");
}

#[test]
fn members_of_a_busy_room_that_stop_reading_are_closed_for_the_budget() {
    const STUCK: usize = 20;
    const N: usize = 1500;
    const SIZE: usize = 3000; // 4.5 MB through the room
    let budget = (1usize << 20).to_string();
    // The per-connection backlog limit is out of the way: only the budget
    // can close anyone here.
    let s = Server::start_with(&[
        ("MAX_CLIENT_MEMORY", &budget),
        ("WS_MAX_BACKLOG", "64MiB"),
        ("WS_RATE_LIMIT", "0"),
    ]);
    let room = uniq("busy");
    let path = format!("/ws/{}?username=", enc(&room));
    let mut stuck: Vec<RawWs> = (0..STUCK)
        .map(|i| non_reading_member(&s, &format!("{path}stuck{i}")))
        .collect();
    let mut alice = s.ws(&room, "alice");
    let mut bob = s.ws(&room, "bob");
    alice.round_trip("hello", WAIT);
    bob.expect_content_next("hello");

    // Bob reads everything, in order, on his own thread.
    let reader = thread::spawn(move || -> Result<usize, String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut got = 0;
        while got < N {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(m) = bob.recv_json(left) else {
                return Err(format!("bob got {got} of {N}, then nothing"));
            };
            if m.get("error").is_some() {
                return Err(format!("bob got an error frame: {m}"));
            }
            let want = format!("{got:05}");
            let content = m["content"].as_str().unwrap_or_default();
            if !content.starts_with(&want) {
                return Err(format!("bob expected {want}…, got {content:.10}"));
            }
            got += 1;
        }
        Ok(got)
    });

    // Alice sends in rounds and reads her echoes, so she is never behind.
    let mut highest = 0;
    for round in 0..N / 50 {
        for i in 0..50 {
            let n = round * 50 + i;
            let content = format!("{n:05}-{}", "x".repeat(SIZE));
            alice
                .ws
                .send(Message::text(json!({ "content": content }).to_string()))
                .expect("send");
        }
        let echoes = alice.recv_n(50, Duration::from_secs(30));
        assert_eq!(echoes.len(), 50, "alice, who reads, missed echoes");
        highest = highest.max(gauge(&s));
    }
    let bob_got = reader.join().expect("bob's thread");
    assert_eq!(bob_got, Ok(N), "bob, who reads, must get every message");
    let closed = closes(&s);
    eprintln!("{STUCK} stuck members: counted at most {highest} bytes; {closed} closed");
    assert!(
        highest <= (1 << 20) + ONE_PASS,
        "the connections held {highest} bytes, over the budget of 1 MiB by more than one pass"
    );
    assert!(
        closed >= STUCK,
        "only {closed} of {STUCK} stuck members were closed"
    );
    assert_eq!(
        metric_value(&s.metrics(), "chatconnect_slow_consumer_closes_total"),
        Some(0.0),
        "the per-connection limit closed someone: the test meant the budget to"
    );
    // Each stuck member's stream ends: a 1008 close if it got through,
    // otherwise the connection was dropped.
    for (i, m) in stuck.iter_mut().enumerate() {
        match m.read_until_close(Duration::from_secs(30)) {
            (Ok((code, reason)), _) => {
                assert_eq!(code, 1008, "stuck{i}: close code ({reason})");
                assert!(
                    reason.contains("memory budget"),
                    "stuck{i}: reason {reason:?}"
                );
            }
            (Err(FrameEnd::Eof), _) => {}
            (Err(FrameEnd::Error(_)), _) => {}
            (Err(FrameEnd::Timeout), n) => {
                panic!("stuck{i} still open after {n} frames: not closed for the budget")
            }
        }
    }
    drop(stuck);
    alice.round_trip("after", WAIT);
    count_returns_to_nothing(&s);
}
