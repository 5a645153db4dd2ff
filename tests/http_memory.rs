//! What a client that pipelines requests and never reads its answers can
//! make the server hold: about one input cap (`HTTP_MAX_HEAD` +
//! `HTTP_MAX_BODY` + one read) and one output high-water mark (64 KiB) per
//! connection, not the megabyte of answers it used to queue; and that the
//! memory goes back to the system once they have gone.

mod common;

use std::time::{Duration, Instant};

use common::contract::ensure_fd_limit;
use common::*;

#[test]
fn clients_that_pipeline_and_never_read_hold_little_and_memory_comes_back() {
    const CONNS: usize = 500;
    ensure_fd_limit(CONNS as u64 + 200);
    let s = Server::start();
    let room = uniq("beside");
    let mut alice = s.ws(&room, "alice");
    alice.round_trip("before", WAIT);
    let before = s.rss_kib();

    // 100 KB of `GET /metrics` per connection, sent until the server stops
    // taking it; nothing is ever read.
    let mut attackers = Pipeliners::open(&s, CONNS);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if !attackers.push() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let sent = attackers.sent();
    let grown = s.rss_kib().saturating_sub(before);
    let per_conn = grown / CONNS as u64;
    eprintln!("{CONNS} pipelining clients sent {sent} bytes; server RSS grew {grown} KiB, {per_conn} KiB each");
    assert!(
        sent >= CONNS * 64 * 1024,
        "the clients could not even send 64 KiB each ({sent} bytes): the test proves nothing"
    );
    // 16 KiB head + 64 KiB body + a read + 64 KiB of answers + one answer,
    // with room for the allocator; at a 1 MiB high-water mark it was 1,141.
    assert!(per_conn < 400, "{per_conn} KiB held per pipelining client");

    // A client that reads is served meanwhile.
    alice.round_trip("during", WAIT);
    assert_eq!(s.get("/healthz").status, 200);
    drop(attackers);
    alice.round_trip("after", WAIT);

    // Once they have gone, the resident size comes back close to where it
    // was: within twice the baseline plus 16 MiB, in 10 s. (glibc kept 56
    // of the 84 MiB before the server trimmed after a wave of closes.)
    let limit = 2 * before + 16 * 1024;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = s.rss_kib();
    while now > limit && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = s.rss_kib();
    }
    eprintln!("RSS {before} KiB before, {now} KiB after they closed (limit {limit})");
    assert!(
        now <= limit,
        "RSS stayed at {now} KiB after the clients closed (limit {limit} KiB)"
    );
}
