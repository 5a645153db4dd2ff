//! Another process holding SQLite's write lock (as a second server on the
//! same `DATA_DIR` does for each batch it commits): the server's write goes
//! through within milliseconds of the lock's release, and a lock held past
//! the server's five-second wait fails the write with an error frame
//! instead of stalling the room.
//!
//! The lock is taken with `Server::hold_write_lock`: `BEGIN IMMEDIATE` on a
//! connection of the test's own, which is what another process's write
//! transaction holds.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long after the lock's release the sender's own message came back,
/// having sent it `held` before the release.
fn delivered_after_release(s: &Server, c: &mut WsClient, text: &str, held: Duration) -> Duration {
    let lock = s.hold_write_lock();
    c.send_content(text);
    thread::sleep(held);
    lock.execute_batch("ROLLBACK").expect("release the lock");
    let released = Instant::now();
    let m = c.expect_json(Duration::from_secs(10));
    let took = released.elapsed();
    assert_eq!(m["content"], text, "{m}");
    took
}

#[test]
fn a_write_goes_through_within_milliseconds_of_the_lock_being_released() {
    let s = Server::start();
    let room = uniq("Locked");
    let mut c = s.ws(&room, "writer");
    c.round_trip("the room exists", WAIT);
    // Held 440 ms: SQLite's own busy handler has napped 1, 2, 5, 10, 15,
    // 20, 25, 25, 25, 50, 50 and then 100 ms at a time, so it would look
    // again only about 528 ms after the first try, some 90 ms after the
    // release. The server's handler naps at most a millisecond.
    let mut waits: Vec<Duration> = (0..5)
        .map(|i| {
            delivered_after_release(&s, &mut c, &format!("held {i}"), Duration::from_millis(440))
        })
        .collect();
    waits.sort();
    eprintln!("release to delivery: {waits:?}");
    let median = waits[waits.len() / 2];
    assert!(
        median < Duration::from_millis(40),
        "release to delivery: {waits:?} (median {median:?})\n--- server log ---\n{}",
        s.log_text()
    );
}

#[test]
fn a_lock_held_past_the_wait_fails_the_write_with_an_error_frame() {
    let s = Server::start();
    let room = uniq("Stuck");
    let mut c = s.ws(&room, "writer");
    c.round_trip("the room exists", WAIT);
    let lock = s.hold_write_lock();
    let sent = Instant::now();
    c.send_content("never stored");
    let frame: Value = match c.recv(Duration::from_secs(15)) {
        Event::Text(t) => serde_json::from_str(&t).expect("JSON frame"),
        other => panic!(
            "expected an error frame, got {other:?}\n--- server log ---\n{}",
            s.log_text()
        ),
    };
    let waited = sent.elapsed();
    assert_eq!(frame["code"], "store_unavailable", "{frame}");
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(12)).contains(&waited),
        "the write should give up after about 5 s, not {waited:?}"
    );
    lock.execute_batch("ROLLBACK").expect("release the lock");
    // Nothing of the failed message was stored, and the room goes on.
    let m = c.round_trip("after the lock", WAIT);
    assert_eq!(m["seq"], 2, "the failed message took no number: {m}");
    let contents: Vec<Value> = s
        .messages(&room, "")
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        contents,
        ["the room exists", "after the lock"],
        "{contents:?}"
    );
}
