//! Scenarios of the history cache that hold on either store, and the pieces
//! they share: what a join receives, the cache's counters, and several
//! processes on one database.
//!
//! Used by `tests/history_cache.rs` (SQLite) and `tests/mongo_history.rs`
//! (FerretDB).

#![allow(dead_code)]

use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use super::*;

pub const HITS: &str = "chatconnect_history_cache_hits_total";
pub const MISSES: &str = "chatconnect_history_cache_misses_total";
pub const READS: &str = "chatconnect_history_reads_total";
pub const SHARED: &str = "chatconnect_joins_shared_total";
pub const PEERS: &str = "chatconnect_store_peers";
pub const TRUSTED: &str = "chatconnect_history_cache_trusted";

/// The value of metric `name` now (0 when absent).
pub fn metric(s: &Server, name: &str) -> f64 {
    metric_value(&s.metrics(), name).unwrap_or(0.0)
}

/// Join `room` as `user` (with `query` appended, such as `&since=3`), read
/// `n` history frames, then prove nothing else came before live messages:
/// the member's own marker must be the next frame. Returns the seqs and
/// contents of the history.
pub fn join_history(
    s: &Server,
    room: &str,
    user: &str,
    query: &str,
    n: usize,
) -> Vec<(i64, String)> {
    let mut c = s.ws_path(&format!("/ws/{}?username={}{query}", enc(room), enc(user)));
    let got = c.recv_n(n, MARKER_WAIT);
    c.expect_marker_next(&uniq("marker"));
    got.iter().map(seq_and_content).collect()
}

pub fn seq_and_content(m: &Value) -> (i64, String) {
    (
        m["seq"].as_i64().unwrap_or_else(|| panic!("no seq: {m}")),
        m["content"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The history `room` holds in the store, through the REST API, as
/// (seq, content), oldest first.
pub fn stored(s: &Server, room: &str) -> Vec<(i64, String)> {
    s.messages(room, "limit=100")
        .iter()
        .map(seq_and_content)
        .collect()
}

/// Wait until the server trusts its cache (its presence view is fresh and
/// shows no other process).
pub fn await_trusted(s: &Server) {
    s.await_metric(TRUSTED, "the cache to be trusted", |v| v == 1.0);
}

/// Two processes on one database. Process A answers joins of a room from
/// memory; process B starts and stores messages in that room. A's next join
/// must hold them: A sees B and stops trusting its cache. Once B has
/// stopped, A trusts its cache again, after one fresh read.
///
/// `start` starts a server on the shared database.
pub fn a_second_process_never_leaves_a_stale_history(start: impl Fn() -> Server) {
    let a = start();
    await_trusted(&a);
    let room = uniq("shared");
    post_messages(&a, &room, "alice", "from-a", 3);
    // A cached the room when alice joined and kept her three messages.
    let hits = metric(&a, HITS);
    let want = stored(&a, &room);
    let h = join_history(&a, &room, "reader", "", 3);
    assert_eq!(h, want);
    assert_eq!(metric(&a, HITS), hits + 1.0, "the join came from memory");
    // The marker of that join is the fourth message.

    let mut b = start();
    a.await_metric(PEERS, "A to see B", |v| v >= 1.0);
    assert_eq!(
        metric(&a, TRUSTED),
        0.0,
        "A must not trust its cache beside B"
    );
    post_messages(&b, &room, "bob", "from-b", 2);
    let want = stored(&b, &room);
    assert_eq!(want.len(), 6, "{want:?}");
    let h = join_history(&a, &room, "reader2", "", 6);
    assert_eq!(h, want, "A's join must hold what B stored");

    // B leaves cleanly: A trusts its cache again, with B's messages in it.
    b.sigterm();
    b.wait_exit(Duration::from_secs(10));
    a.await_metric(PEERS, "A to see B gone", |v| v == 0.0);
    await_trusted(&a);
    let want = stored(&a, &room);
    let h = join_history(&a, &room, "reader3", "", want.len());
    assert_eq!(h, want);
    let hits = metric(&a, HITS);
    let h = join_history(&a, &room, "reader4", "", want.len() + 1);
    assert_eq!(h, stored(&a, &room)[..want.len() + 1].to_vec());
    assert_eq!(metric(&a, HITS), hits + 1.0, "trusted again");
}

/// What a join with `since` gets from a room whose messages are seqs
/// `1..=newest`, with `limit` as HISTORY_LIMIT.
pub fn expected_seqs(newest: i64, limit: i64, since: Option<i64>) -> Vec<i64> {
    match since {
        Some(s) if s <= newest => ((s + 1).max(1)..=newest).collect(),
        _ => ((newest - limit + 1).max(1)..=newest).collect(),
    }
}

/// A raw upgrade written to a fresh connection, its answer not read yet.
pub fn send_upgrade(addr: std::net::SocketAddr, path_and_query: &str) -> TcpStream {
    use std::io::Write;
    let mut stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_nodelay(true).ok();
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).expect("write upgrade");
    stream
}

/// Read `n` text frames from a member and return their seqs.
pub fn read_seqs(ws: &mut RawWs, n: usize, timeout: Duration) -> Vec<i64> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        match ws.read_frame(timeout) {
            Ok(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).expect("JSON frame");
                seqs.push(v["seq"].as_i64().unwrap_or_else(|| panic!("no seq: {v}")));
            }
            Ok(f) => panic!("unexpected frame opcode {}", f.opcode),
            Err(e) => panic!("after {} of {n} history frames: {e:?}", seqs.len()),
        }
    }
    seqs
}
