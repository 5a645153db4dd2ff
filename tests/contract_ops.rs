//! Operational promises of `docs/API.md`: SIGINT, a second signal, the `503`
//! of a full worker queue, `/readyz` when the SQLite file is replaced, and the
//! values (not only the names) of the metrics.
//!
//! States that must hold while the test looks are made to hold by
//! construction: `WORKERS=1` with `BCRYPT_COST=31` gives one hashing thread
//! a hash that takes days, so every later hash job waits in the queue.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::contract::*;
use common::*;
use serde_json::json;

/// The one hashing thread never finishes its first job.
const STUCK_HASHING: &[(&str, &str)] = &[("WORKERS", "1"), ("BCRYPT_COST", "31")];

const HASH_QUEUE: &str = "chatconnect_worker_queue_depth{lane=\"hash\"}";

/// Jobs a worker lane holds before answering 503 (`QUEUE_CAPACITY` in
/// src/reactor/completions.rs; not a setting).
const QUEUE_CAPACITY: usize = 4096;

/// A raw `POST /register` for `name`.
fn register_request(name: &str) -> Vec<u8> {
    let body = json!({"username": name, "password_hash": "correct horse battery"}).to_string();
    format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Start a registration that occupies the only hashing thread for good;
/// returns its connection (no answer will come).
fn occupy_the_hashing_thread(s: &Server) -> RawHttp {
    let mut parsed = Parsed::start(s);
    let mut c = RawHttp::connect(s.addr());
    c.send(&register_request(&uniq("stuck")));
    parsed.wait_for(s, 1);
    // Submitted (it was parsed) and no longer queued: the thread has it.
    wait_metric(s, HASH_QUEUE, 0.0);
    c
}

#[test]
fn sigint_shuts_down_gracefully() {
    let mut s = Server::start();
    let room = uniq("Interrupted");
    let mut a = s.ws(&room, "a");
    let echo = a.round_trip("before SIGINT", WAIT);
    signal(&s, libc::SIGINT);
    assert_eq!(a.recv_until_close(WAIT).0, 1001);
    drop(a);
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", s.log_text());
    s.restart_after_exit();
    assert_eq!(s.messages(&room, ""), vec![echo]);
}

#[test]
fn a_second_signal_exits_at_once_with_status_1() {
    // A registration that never gets its answer holds the graceful
    // shutdown until SHUTDOWN_TIMEOUT, a minute here.
    let mut env = STUCK_HASHING.to_vec();
    env.push(("SHUTDOWN_TIMEOUT", "60s"));
    let mut s = Server::start_with(&env);
    let mut member = s.ws(&uniq("Held"), "member");
    member.round_trip("hello", WAIT);
    let _held = occupy_the_hashing_thread(&s);
    s.sigterm();
    // The shutdown is under way: the member is told.
    assert_eq!(member.recv_until_close(WAIT).0, 1001);
    drop(member);
    let t = Instant::now();
    signal(&s, libc::SIGINT);
    let status = s.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", s.log_text());
    eprintln!("exited {:?} after the second signal", t.elapsed());
}

#[test]
fn a_full_hash_queue_answers_503_busy_and_nothing_else_waits_for_it() {
    ensure_fd_limit(QUEUE_CAPACITY as u64 + 1024);
    let s = Server::start_with(STUCK_HASHING);
    let _stuck = occupy_the_hashing_thread(&s);
    let queued: Vec<TcpStream> = (0..QUEUE_CAPACITY)
        .map(|i| {
            let mut c = RawHttp::connect(s.addr());
            c.send(&register_request(&format!("q{i}")));
            c.stream
        })
        .collect();
    wait_metric(&s, HASH_QUEUE, QUEUE_CAPACITY as f64);

    let r = s.post(
        "/register",
        &json!({"username": uniq("late"), "password_hash": "correct horse battery"}),
    );
    r.expect_error_text(503, "Server is busy; retry shortly");
    let r = s.post(
        "/login",
        &json!({"username": "q0", "password_hash": "correct horse battery"}),
    );
    r.expect_error_text(503, "Server is busy; retry shortly");
    assert_eq!(metric(&s, HASH_QUEUE), QUEUE_CAPACITY as f64);

    // What needs no hashing is answered meanwhile: the store lane, the
    // checks done before hashing, and a password too long to be anyone's
    // (401 at once, as API.md promises).
    assert_eq!(s.get("/rooms").status, 200);
    s.post(
        "/register",
        &json!({"username": "x", "password_hash": "short"}),
    )
    .expect_error(400);
    s.post(
        "/login",
        &json!({"username": "q1", "password_hash": "p".repeat(73)}),
    )
    .expect_error_text(401, "Invalid credentials");
    s.assert_still_serving();
    drop(queued);
}

#[test]
fn rejected_and_received_messages_are_counted_exactly() {
    // A bucket of 5 that refills once in 100 s: the sixth message is over.
    let s = Server::start_with(&[
        ("WS_RATE_LIMIT", "0.01"),
        ("WS_RATE_BURST", "5"),
        ("MAX_MESSAGE_CHARS", "10"),
    ]);
    let rejected = "chatconnect_messages_rejected_total";
    let received = "chatconnect_messages_received_total";
    assert_eq!(metric(&s, rejected), 0.0);
    assert_eq!(metric(&s, received), 0.0);
    let mut c = s.ws(&uniq("Counted"), "counted");
    let frames = [
        ("not json".to_string(), "invalid_json"),
        (json!({"content": "   "}).to_string(), "empty_content"),
        (json!({"content": "x".repeat(11)}).to_string(), "too_long"),
        (json!({"content": "ok 1"}).to_string(), ""),
        (json!({"content": "ok 2"}).to_string(), ""),
        (json!({"content": "over 1"}).to_string(), "rate_limited"),
        (json!({"content": "over 2"}).to_string(), "rate_limited"),
    ];
    for (text, code) in &frames {
        c.send_text(text);
        let answer = c.expect_json(WAIT);
        if code.is_empty() {
            assert!(answer["seq"].is_i64(), "{text}: {answer}");
        } else {
            assert_eq!(answer["code"], *code, "{text}: {answer}");
        }
    }
    // Every answer is in, so every count is final.
    assert_eq!(metric(&s, rejected), 5.0);
    assert_eq!(metric(&s, received), 2.0);
    assert_eq!(metric(&s, "chatconnect_messages_stored_total"), 2.0);
}

/// The cumulative counts of a histogram's buckets, in the order printed
/// (the last is `+Inf`).
fn buckets(text: &str, name: &str) -> Vec<f64> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bucket line {l:?}"))
        })
        .collect()
}

#[test]
fn commit_seconds_and_batch_size_observe_every_write() {
    let s = Server::start();
    let mut c = s.ws(&uniq("Timed"), "timed");
    assert_eq!(metric(&s, "chatconnect_commit_seconds_count"), 0.0);
    // One message at a time: each is a write of its own.
    let t = Instant::now();
    for i in 0..3 {
        c.round_trip(&format!("timed {i}"), WAIT);
    }
    let spent = t.elapsed().as_secs_f64();
    let text = s.metrics();
    let value =
        |name: &str| metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    assert_eq!(value("chatconnect_commit_seconds_count"), 3.0);
    let sum = value("chatconnect_commit_seconds_sum");
    // Each commit lies inside its round trip.
    assert!(
        sum > 0.0 && sum <= spent,
        "commit seconds sum {sum} for round trips of {spent} s"
    );
    let b = buckets(&text, "chatconnect_commit_seconds");
    assert!(b.windows(2).all(|w| w[0] <= w[1]), "not cumulative: {b:?}");
    assert_eq!(b.last(), Some(&3.0), "{b:?}");
    assert_eq!(value("chatconnect_store_batch_size_count"), 3.0);
    assert_eq!(value("chatconnect_store_batch_size_sum"), 3.0);
    assert_eq!(
        buckets(&text, "chatconnect_store_batch_size").first(),
        Some(&3.0),
        "three writes of one message each, all in the first bucket"
    );
}

#[test]
fn a_replaced_database_file_fails_readyz_and_counts_store_errors() {
    let s = Server::start();
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ready"}));
    let errors = "chatconnect_store_errors_total";
    assert_eq!(metric(&s, errors), 0.0);

    // Another SQLite database moved into the server's file name.
    let db = s.data_dir().join("chatconnect.db");
    let other = s.data_dir().join("replacement.db");
    rusqlite::Connection::open(&other)
        .and_then(|c| c.execute_batch("CREATE TABLE notes (text TEXT);"))
        .expect("make another database");
    std::fs::rename(&other, &db).expect("replace the database file");

    for n in 1..=2 {
        s.get("/readyz")
            .expect_error_text(503, "Storage is unavailable");
        assert_eq!(metric(&s, errors), n as f64);
    }
}
