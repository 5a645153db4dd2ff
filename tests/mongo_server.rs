//! End to end with `MONGO_URI`: the real `chatserver` binary on MongoDB
//! (this binary's FerretDB, or the MongoDB named by `MONGO_URI`), each test on
//! a database of its own.
//!
//! Covered: the API on MongoDB and the documents it writes; restarts; the
//! indexes made at start; a database that already holds duplicate usernames;
//! taking over the Go server's database; two server processes on one
//! database; group-commit batch sizes in /metrics; and faults: no database at
//! start, the database stopped and restarted under connected clients.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::mongo::{
    self, assert_required_indexes, find_all, free_port, missing_indexes, unique_db, FerretInstance,
    TestDb,
};
use common::*;
use mongodb::bson::{doc, Bson, DateTime, Document};
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";
/// The body of every 503 for a call that needs the store while it is down.
const STORE_DOWN: &str = "Storage is unavailable; try again shortly";

/// Start a server on `db` (MONGO_URI, MONGO_DB, MONGO_TIMEOUT=2s) plus `extra`.
fn start(db: &TestDb, extra: &[(&str, &str)]) -> Server {
    let env = db.server_env();
    let mut v: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    v.extend_from_slice(extra);
    Server::start_with(&v)
}

/// Start a server on database `db` of the MongoDB at `uri`, for the fault
/// tests that run their own FerretDB (MONGO_TIMEOUT=2s).
fn start_at(uri: &str, db: &str) -> Server {
    Server::start_with(&[
        ("MONGO_URI", uri),
        ("MONGO_DB", db),
        ("MONGO_TIMEOUT", "2s"),
    ])
}

fn creds(user: &str, pw: &str) -> Value {
    json!({"username": user, "password_hash": pw})
}

fn bson_int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Int32(n)) => *n as i64,
        Some(Bson::Double(f)) if f.fract() == 0.0 => *f as i64,
        other => panic!("{key} is {other:?} in {d}"),
    }
}

fn bson_date(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::DateTime(t)) => t.timestamp_millis(),
        other => panic!("{key} must be a BSON date, is {other:?} in {d}"),
    }
}

fn contents(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["content"].as_str().unwrap_or("<none>").to_string())
        .collect()
}

/// Room documents as the original wrote them, created at 1970-01-01T00:00:01Z.
fn seed_rooms(db: &TestDb, rooms: &[(&str, &str)]) {
    let docs: Vec<Document> = rooms
        .iter()
        .map(|(name, creator)| {
            doc! {"name": *name, "creator": *creator, "created_at": DateTime::from_millis(1_000)}
        })
        .collect();
    db.coll("rooms")
        .insert_many(docs)
        .run()
        .expect("seed rooms");
}

/// A message document as the original wrote it (no `seq`).
fn legacy_message(room: &str, username: &str, content: &str, at_millis: i64) -> Document {
    doc! {"room_id": room, "username": username, "content": content,
    "timestamp": DateTime::from_millis(at_millis)}
}

/// Poll `/readyz` until 200; panics after `timeout`. Returns how long it took.
fn wait_ready(s: &Server, timeout: Duration) -> Duration {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < timeout {
        let r = s.get("/readyz");
        if r.status == 200 {
            return t.elapsed();
        }
        last = Some(r);
        thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "/readyz not 200 within {timeout:?}: last {last:?}\n--- server log ---\n{}",
        s.log_text()
    );
}

/// Every message of a room through `GET /rooms/{name}/messages`, paging
/// backwards with `before` 200 at a time.
fn full_history(s: &Server, room: &str) -> Vec<Value> {
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut before: Option<i64> = None;
    for _ in 0..100 {
        let q = match before {
            None => "limit=200".to_string(),
            Some(b) => format!("limit=200&before={b}"),
        };
        let page = s.messages(room, &q);
        if page.is_empty() {
            break;
        }
        let first = page[0]["seq"].as_i64().expect("seq");
        pages.push(page);
        before = Some(first);
    }
    pages.into_iter().rev().flatten().collect()
}

/// The first frame must be an error frame with `code`; returns it.
fn expect_error_frame(c: &mut WsClient, code: &str, timeout: Duration, s: &Server) -> Value {
    match c.recv(timeout) {
        Event::Text(t) => {
            let v: Value = serde_json::from_str(&t).expect("JSON frame");
            assert_eq!(
                v["code"], code,
                "expected an error frame {code}, got {v}\n--- server log ---\n{}",
                s.log_text()
            );
            assert!(
                v["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "error frame without a sentence: {v}"
            );
            v
        }
        other => panic!(
            "expected an error frame {code} within {timeout:?}, got {other:?}\n--- server log ---\n{}",
            s.log_text()
        ),
    }
}

// ---------------------------------------------------------------------------
// The API on MongoDB

#[test]
fn mongo_register_login_rooms_chat_history_delete() {
    let db = TestDb::new("basic");
    let s = start(&db, &[]);
    assert_eq!(s.get("/readyz").status, 200, "{}", s.log_text());

    s.register("alice", PASSWORD);
    s.register("bob", PASSWORD);
    s.post("/register", &creds("alice", "another password"))
        .expect_error_text(409, "Username already taken");
    let token = s.login("alice", PASSWORD);
    assert!(!token.is_empty());
    s.post("/login", &creds("alice", "wrong password"))
        .expect_error_text(401, "Invalid credentials");
    s.post("/login", &creds("nobody", PASSWORD))
        .expect_error_text(401, "Invalid credentials");

    let r = s.post("/rooms", &json!({"name": "General", "username": "alice"}));
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["creator"], "alice");
    s.post("/rooms", &json!({"name": "General", "username": "bob"}))
        .expect_error(409);
    let rooms = s.rooms();
    assert_eq!(rooms.len(), 1, "{rooms:?}");
    assert_eq!(rooms[0]["name"], "General");
    assert_eq!(rooms[0]["creator"], "alice");
    let created_at = parse_rfc3339_millis(rooms[0]["created_at"].as_str().expect("created_at"));

    let mut a = s.ws("General", "alice");
    let mut b = s.ws("General", "bob");
    let m1 = a.round_trip("hello from alice", WAIT);
    assert_eq!(m1["seq"], 1);
    assert_eq!(b.expect_json(WAIT)["content"], "hello from alice");
    b.send_content("hi from bob");
    let m2 = b.expect_json(WAIT);
    assert_eq!(m2["seq"], 2);
    assert_eq!(a.expect_json(WAIT)["content"], "hi from bob");

    let hist = s.messages("General", "");
    assert_eq!(contents(&hist), ["hello from alice", "hi from bob"]);
    assert_eq!(seqs(&hist), [1, 2]);
    assert_eq!(hist[0], m1, "history equals what was broadcast");
    assert_eq!(s.messages("General", "before=2&limit=5"), vec![m1.clone()]);

    // The documents, with the seed's collections and field names.
    let users = find_all(&db.coll("users"), doc! {}, doc! {"username": 1});
    assert_eq!(users.len(), 2, "{users:?}");
    for u in &users {
        let h = u.get_str("password_hash").expect("password_hash string");
        assert!(h.starts_with("$2"), "not a bcrypt hash: {u}");
        assert!(
            !format!("{u}").contains(PASSWORD),
            "plain password stored: {u}"
        );
    }
    let room_docs = find_all(&db.coll("rooms"), doc! {}, doc! {});
    assert_eq!(room_docs.len(), 1);
    assert_eq!(room_docs[0].get_str("name"), Ok("General"));
    assert_eq!(room_docs[0].get_str("creator"), Ok("alice"));
    // The API shows created_at to the second (as the seed's example does).
    assert_eq!(
        bson_date(&room_docs[0], "created_at").div_euclid(1000),
        created_at.div_euclid(1000),
        "created_at in the document vs GET /rooms"
    );
    let msg_docs = find_all(&db.coll("messages"), doc! {}, doc! {"seq": 1});
    assert_eq!(msg_docs.len(), 2);
    for (d, m) in msg_docs.iter().zip(&hist) {
        assert_eq!(d.get_str("room_id"), Ok("General"), "{d}");
        assert_eq!(d.get_str("username").ok(), m["username"].as_str(), "{d}");
        assert_eq!(d.get_str("content").ok(), m["content"].as_str(), "{d}");
        assert_eq!(
            bson_date(d, "timestamp"),
            parse_rfc3339_millis(m["timestamp"].as_str().unwrap()),
            "{d}"
        );
        assert_eq!(Some(bson_int(d, "seq")), m["seq"].as_i64(), "{d}");
    }

    // Delete: only the creator; the messages go with the room.
    s.delete("/rooms?name=General&username=bob")
        .expect_error_text(403, "Only the room creator can delete this room");
    let r = s.delete("/rooms?name=General&username=alice");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(a.recv_until_close(WAIT).0, 4404);
    assert_eq!(b.recv_until_close(WAIT).0, 4404);
    assert!(s.rooms().is_empty());
    assert_eq!(
        db.coll("messages").count_documents(doc! {}).run().unwrap(),
        0,
        "messages left behind by the delete"
    );
    assert_eq!(db.coll("rooms").count_documents(doc! {}).run().unwrap(), 0);
    assert_eq!(s.get("/rooms/General/messages").status, 404);
}

#[test]
fn mongo_data_survives_a_server_restart() {
    let db = TestDb::new("restart");
    let mut s = start(&db, &[]);
    s.register("carol", PASSWORD);
    let sent = post_messages(&s, "Durable", "carol", "m", 3);
    s.restart();
    s.login("carol", PASSWORD);
    s.post("/register", &creds("carol", PASSWORD))
        .expect_error_text(409, "Username already taken");
    let rooms = s.rooms();
    assert!(
        rooms
            .iter()
            .any(|r| r["name"] == "Durable" && r["creator"] == "carol"),
        "{rooms:?}"
    );
    assert_eq!(s.messages("Durable", ""), sent);
    let mut c = s.ws("Durable", "dave");
    let hist = c.recv_n(3, WAIT);
    assert_eq!(hist, sent, "join history after the restart");
    let m = c.round_trip("after restart", WAIT);
    assert_eq!(m["seq"], 4, "numbering continues after the restart");
}

#[test]
fn mongo_db_defaults_to_chatapp() {
    // A database server of its own: the default name must not touch a
    // shared MongoDB's `chatapp`.
    let dir = tempfile::tempdir().expect("temp dir");
    let ferret = FerretInstance::start(dir.path(), free_port());
    let uri = ferret.uri();
    let s = Server::start_with(&[("MONGO_URI", &uri), ("MONGO_TIMEOUT", "2s")]);
    s.register("defaulted", PASSWORD);
    let users = find_all(
        &mongo::collection(&uri, "chatapp", "users"),
        doc! {},
        doc! {},
    );
    assert_eq!(users.len(), 1, "{users:?}\n{}", s.log_text());
    assert_eq!(users[0].get_str("username"), Ok("defaulted"));
}

#[test]
fn mongo_indexes_are_created_at_server_start() {
    let db = TestDb::new("startidx");
    let s = start(&db, &[]);
    // Made at start, perhaps just after the listening line: allow a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let missing = missing_indexes(&db.db());
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "indexes missing 10 s after start: {missing:#?}\n--- server log ---\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_required_indexes(&db.db());
}

#[test]
fn mongo_duplicate_usernames_at_start_are_logged_and_still_taken() {
    let db = TestDb::new("dupstart");
    let h = |pw: &str| bcrypt::hash(pw, 4).expect("bcrypt");
    db.coll("users")
        .insert_many(vec![
            doc! {"username": "twin", "password_hash": h("twin password 1")},
            doc! {"username": "twin", "password_hash": h("twin password 2")},
            doc! {"username": "triplet", "password_hash": h("triplet password")},
            doc! {"username": "triplet", "password_hash": h("triplet password")},
            doc! {"username": "triplet", "password_hash": h("triplet password")},
            doc! {"username": "loner", "password_hash": h("loner password")},
            // Users of the original without a usable hash.
            doc! {"username": "hashless"},
            doc! {"username": "numeric", "password_hash": 12345},
        ])
        .run()
        .expect("seed users");
    // Six hash threads, so that the racing registrations below do race.
    let s = start(&db, &[("WORKERS", "6")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = s.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("duplicate usernames") && l.contains("twin"));
        if let Some(line) = line {
            assert!(
                line.contains("triplet"),
                "the log line must name every duplicated username: {line}"
            );
            assert!(
                !line.contains("loner"),
                "a unique username is not a duplicate: {line}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `duplicate usernames` log line naming twin and triplet\n--- server log ---\n{log}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.get("/readyz").status, 200);
    for name in ["twin", "triplet", "loner"] {
        s.post("/register", &creds(name, PASSWORD))
            .expect_error_text(409, "Username already taken");
    }
    s.login("triplet", "triplet password");
    s.login("loner", "loner password");
    for name in ["hashless", "numeric"] {
        s.post("/register", &creds(name, PASSWORD))
            .expect_error_text(409, "Username already taken");
        s.post("/login", &creds(name, PASSWORD))
            .expect_error_text(401, "Invalid credentials");
    }
    s.register("newcomer", PASSWORD);
    s.post("/register", &creds("newcomer", PASSWORD))
        .expect_error_text(409, "Username already taken");
    assert_eq!(
        db.coll("users")
            .count_documents(doc! {"username": {"$in": [
                "twin", "triplet", "loner", "newcomer", "hashless", "numeric"
            ]}})
            .run()
            .unwrap(),
        9,
        "a refused registration must not insert"
    );
    // Without the unique index, registrations of one new name racing each
    // other still make one user.
    for round in 0..5 {
        let name = format!("racer{round}");
        let statuses: Vec<u16> = thread::scope(|sc| {
            let hs: Vec<_> = (0..6)
                .map(|_| sc.spawn(|| s.post("/register", &creds(&name, PASSWORD)).status))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let made = db
            .coll("users")
            .count_documents(doc! {"username": &name})
            .run()
            .unwrap();
        assert_eq!(made, 1, "{name}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|&&c| c == 200).count(),
            1,
            "{name}: {statuses:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Taking over the Go server's database

#[test]
fn mongo_takes_over_the_go_servers_database() {
    let db = TestDb::new("goseed");
    let hash = bcrypt::hash_with_result("gopher password", 4)
        .expect("bcrypt")
        .format_for_version(bcrypt::Version::TwoA);
    assert!(hash.starts_with("$2a$04$"), "{hash}");
    db.coll("users")
        .insert_many(vec![
            doc! {"username": "gopher", "password_hash": &hash},
            doc! {"username": "gerald", "password_hash": &hash},
        ])
        .run()
        .expect("seed users");
    let lounge_at = parse_rfc3339_millis("2023-05-01T10:00:00.123Z");
    let attic_at = parse_rfc3339_millis("2023-05-02T08:30:00Z");
    db.coll("rooms")
        .insert_many(vec![
            doc! {"name": "Go Lounge", "creator": "gopher", "created_at": DateTime::from_millis(lounge_at)},
            doc! {"name": "Go Attic", "creator": "gerald", "created_at": DateTime::from_millis(attic_at)},
        ])
        .run()
        .expect("seed rooms");
    // Messages as Go wrote them: no seq; inserted out of timestamp order.
    let t0 = lounge_at + 60_000;
    let lounge: Vec<(&str, &str, i64)> = vec![
        ("gerald", "three", t0 + 3_000),
        ("gopher", "one", t0 + 1_000),
        ("gopher", "five", t0 + 5_000),
        ("gerald", "two", t0 + 2_000),
        ("gopher", "four", t0 + 4_000),
    ];
    let attic: Vec<(&str, &str, i64)> = vec![
        ("gerald", "attic b", t0 + 20_000),
        ("gerald", "attic a", t0 + 10_000),
        ("gopher", "attic c", t0 + 30_000),
    ];
    let docs = |room: &str, rows: &[(&str, &str, i64)]| -> Vec<Document> {
        rows.iter()
            .map(|(u, c, t)| legacy_message(room, u, c, *t))
            .collect()
    };
    let mut all_docs = docs("Go Lounge", &lounge);
    all_docs.extend(docs("Go Attic", &attic));
    db.coll("messages")
        .insert_many(all_docs)
        .run()
        .expect("seed messages");
    let sorted = |rows: &[(&str, &str, i64)]| {
        let mut v: Vec<(String, String, i64)> = rows
            .iter()
            .map(|(u, c, t)| (u.to_string(), c.to_string(), *t))
            .collect();
        v.sort_by_key(|r| r.2);
        v
    };
    let lounge_sorted = sorted(&lounge);
    let attic_sorted = sorted(&attic);
    // `want` is the legacy rows from seq 1 on; `got` is the page from `first`.
    let check_page = |got: &[Value], want: &[(String, String, i64)], first: usize, room: &str| {
        let want = &want[first - 1..];
        assert!(got.len() <= want.len(), "{room}: {got:?}");
        for (i, (m, (u, c, t))) in got.iter().zip(want).enumerate() {
            assert_eq!(
                m["content"],
                c.as_str(),
                "{room}: order by timestamp: {got:?}"
            );
            assert_eq!(m["username"], u.as_str(), "{room}: {m}");
            assert_eq!(m["room_id"], room, "{m}");
            assert_eq!(m["seq"], (first + i) as i64, "{room}: legacy seq: {m}");
            let ts = m["timestamp"].as_str().expect("timestamp");
            assert_eq!(parse_rfc3339_millis(ts), *t, "{room}: timestamp of {m}");
        }
    };
    let check_legacy = |got: &[Value], want: &[(String, String, i64)], room: &str| {
        assert_eq!(got.len(), want.len(), "{room}: {got:?}");
        check_page(got, want, 1, room);
    };

    let s = start(&db, &[]);

    // The Go user logs in with its $2a$ hash.
    let token = s.login("gopher", "gopher password");
    assert!(!token.is_empty());
    s.post("/login", &creds("gopher", "not the password"))
        .expect_error_text(401, "Invalid credentials");
    s.post("/register", &creds("gopher", PASSWORD))
        .expect_error_text(409, "Username already taken");

    // Rooms with their creators and the BSON dates, oldest first.
    let rooms = s.rooms();
    let names: Vec<&str> = rooms.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["Go Lounge", "Go Attic"], "{rooms:?}");
    assert_eq!(rooms[0]["creator"], "gopher");
    assert_eq!(rooms[1]["creator"], "gerald");
    // created_at comes from the BSON date (the API shows it to the second).
    assert_eq!(
        parse_rfc3339_millis(rooms[0]["created_at"].as_str().expect("created_at")) / 1000,
        lounge_at / 1000,
        "{rooms:?}"
    );
    assert_eq!(
        parse_rfc3339_millis(rooms[1]["created_at"].as_str().expect("created_at")) / 1000,
        attic_at / 1000,
        "{rooms:?}"
    );

    // Lounge first used by a join: its history oldest first by timestamp.
    let mut reader = s.ws("Go Lounge", "reader");
    let hist = reader.recv_n(5, WAIT);
    check_legacy(&hist, &lounge_sorted, "Go Lounge");
    check_legacy(&s.messages("Go Lounge", ""), &lounge_sorted, "Go Lounge");
    let page = s.messages("Go Lounge", "before=4&limit=2");
    assert_eq!(seqs(&page), [2, 3]);
    check_page(&page, &lounge_sorted, 2, "Go Lounge");

    // Attic first used by a history read.
    check_legacy(&s.messages("Go Attic", ""), &attic_sorted, "Go Attic");

    // New messages follow the old ones (and nothing came after the five).
    let m = reader.expect_marker_next("new from rust");
    assert_eq!(m["seq"], 6, "{m}");
    let all = s.messages("Go Lounge", "");
    assert_eq!(all.len(), 6);
    check_legacy(&all[..5], &lounge_sorted, "Go Lounge");
    assert_eq!(all[5], m);
    let mut late = s.ws("Go Attic", "late");
    late.recv_n(3, WAIT);
    assert_eq!(late.round_trip("attic news", WAIT)["seq"], 4);
    // Resume by seq works across legacy and new messages.
    let mut resumed = s.ws_path(&format!("/ws/{}?username=back&since=1", enc("Go Attic")));
    let got = resumed.recv_n(3, WAIT);
    assert_eq!(seqs(&got), [2, 3, 4]);
    assert_eq!(contents(&got), ["attic b", "attic c", "attic news"]);
    resumed.expect_marker_next("nothing more");

    // The legacy documents kept their fields and got their seq.
    let legacy = find_all(
        &db.coll("messages"),
        doc! {"room_id": "Go Lounge"},
        doc! {"timestamp": 1},
    );
    assert_eq!(legacy.len(), 6, "{legacy:?}");
    for (i, d) in legacy.iter().enumerate() {
        assert_eq!(bson_int(d, "seq"), i as i64 + 1, "{d}");
        assert!(
            d.get_str("username").is_ok() && d.get_str("content").is_ok(),
            "{d}"
        );
        bson_date(d, "timestamp");
    }

    // The creator (and only the creator) deletes the room: the legacy
    // messages go with it.
    s.delete(&format!("/rooms?name={}&username=reader", enc("Go Lounge")))
        .expect_error_text(403, "Only the room creator can delete this room");
    let r = s.delete_auth(
        &format!("/rooms?name={}&username=gopher", enc("Go Lounge")),
        &token,
    );
    assert_eq!(r.status, 200, "{r:?}\n{}", s.log_text());
    assert_eq!(reader.recv_until_close(WAIT).0, 4404);
    let names: Vec<String> = s
        .rooms()
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert_eq!(names, ["Go Attic"]);
    assert_eq!(
        db.coll("messages")
            .count_documents(doc! {"room_id": "Go Lounge"})
            .run()
            .unwrap(),
        0,
        "legacy messages left behind by the delete"
    );
    assert_eq!(
        s.get(&format!("/rooms/{}/messages", enc("Go Lounge")))
            .status,
        404
    );
}

// ---------------------------------------------------------------------------
// Several processes, one database

#[test]
fn two_server_processes_share_one_database() {
    const N: usize = 150;
    let db = TestDb::new("twoproc");
    let sa = start(&db, &[("WS_RATE_LIMIT", "0")]);
    let sb = start(&db, &[("WS_RATE_LIMIT", "0")]);
    let r = sa.post("/rooms", &json!({"name": "Shared", "username": "alice"}));
    assert_eq!(r.status, 201, "{r:?}");
    // B sees the room A made.
    assert!(sb.rooms().iter().any(|r| r["name"] == "Shared"));

    let mut ca = sa.ws("Shared", "alice");
    let mut cb = sb.ws("Shared", "bob");
    let send = |c: &mut WsClient, who: &str| -> Vec<Value> {
        let msgs: Vec<String> = (0..N).map(|i| format!("{who}-{i}")).collect();
        for m in &msgs {
            c.send_content(m);
        }
        // A process broadcasts only what it stored itself: exactly the
        // client's own messages come back, in its order. The other's
        // messages can come first only as the join's history (its read may
        // run after the other process stored some).
        let mut frames = c.recv_n(N, Duration::from_secs(30));
        let history = frames.iter().take_while(|m| m["username"] != who).count();
        frames.extend(c.recv_n(history, Duration::from_secs(30)));
        let echoes = frames.split_off(history);
        assert_eq!(contents(&echoes), msgs, "{who}'s echoes");
        echoes
    };
    let (ea, eb) = thread::scope(|sc| {
        let ha = sc.spawn(|| send(&mut ca, "alice"));
        let hb = sc.spawn(|| send(&mut cb, "bob"));
        (
            ha.join().expect("alice's thread"),
            hb.join().expect("bob's thread"),
        )
    });

    let hist_a = full_history(&sa, "Shared");
    let hist_b = full_history(&sb, "Shared");
    assert!(
        hist_a.len() == 2 * N,
        "{} messages in the history, {} sent and echoed:\n{}\necho seqs: {}\n{}\n--- server A log ---\n{}\n--- server B log ---\n{}",
        hist_a.len(),
        2 * N,
        diagnose_history(&hist_a, &db),
        echo_runs(&ea),
        echo_runs(&eb),
        sa.log_text(),
        sb.log_text()
    );
    assert_eq!(hist_a, hist_b, "both processes read one history");
    assert_eq!(
        seqs(&hist_a),
        (1..=2 * N as i64).collect::<Vec<_>>(),
        "seqs 1..{} distinct and in order",
        2 * N
    );
    for (who, echoes) in [("alice", &ea), ("bob", &eb)] {
        let mine: Vec<&Value> = hist_a.iter().filter(|m| m["username"] == who).collect();
        let want: Vec<String> = (0..N).map(|i| format!("{who}-{i}")).collect();
        assert_eq!(
            mine.iter()
                .map(|m| m["content"].as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
            want,
            "{who}'s messages in send order"
        );
        // What was broadcast is what was stored.
        for (h, e) in mine.iter().zip(echoes.iter()) {
            assert_eq!(*h, e, "{who}: broadcast and stored differ");
        }
    }
    // And each client's next frame is its own marker: nothing else was
    // queued to it meanwhile (a process does not relay the other's messages;
    // that each got exactly its own is shown by the histories above).
    ca.expect_marker_next("alice is done");
    cb.expect_marker_next("bob is done");
}

/// Process B deletes a room and creates it again while process A still
/// has a member in it (processes do not tell each other about deletes). A's
/// next message goes into the new room numbered after B's messages there,
/// not after what A remembered of the old room, which would put it out of
/// order and make a member resuming after it miss B's next messages.
#[test]
fn a_room_created_again_by_another_process_numbers_on_from_its_own_messages() {
    let db = TestDb::new("recreate");
    let sa = start(&db, &[("WS_RATE_LIMIT", "0")]);
    let sb = start(&db, &[("WS_RATE_LIMIT", "0")]);
    let r = sa.post("/rooms", &json!({"name": "Again", "username": "alice"}));
    assert_eq!(r.status, 201, "{r:?}");
    let mut ca = sa.ws("Again", "alice");
    for i in 0..20 {
        ca.round_trip(&format!("old{i}"), WAIT);
    }
    let r = sb.delete("/rooms?name=Again&username=alice");
    assert_eq!(r.status, 200, "{r:?}");
    let r = sb.post("/rooms", &json!({"name": "Again", "username": "bob"}));
    assert_eq!(r.status, 201, "{r:?}");
    let mut cb = sb.ws("Again", "bob");
    for i in 0..3 {
        cb.round_trip(&format!("b-first{i}"), WAIT);
    }
    let middle = ca.round_trip("a-middle", WAIT);
    assert_eq!(middle["seq"], 4, "{middle}\n--- A ---\n{}", sa.log_text());
    for i in 0..3 {
        cb.round_trip(&format!("b-last{i}"), WAIT);
    }
    let hist = full_history(&sb, "Again");
    assert_eq!(
        contents(&hist),
        ["b-first0", "b-first1", "b-first2", "a-middle", "b-last0", "b-last1", "b-last2"]
    );
    assert_eq!(seqs(&hist), (1..=7).collect::<Vec<i64>>());
    // A member resuming after the message it saw last misses nothing.
    let mut c = sa.ws_path("/ws/Again?username=carol&since=4");
    let resumed = c.recv_n(3, WAIT);
    assert_eq!(contents(&resumed), ["b-last0", "b-last1", "b-last2"]);
}

/// A legacy `seq` that is not a number (a string here) neither blocks its
/// room nor confuses the numbering: joins, history and new messages work,
/// and new numbers come after every numeric one.
#[test]
fn a_legacy_seq_that_is_not_a_number_does_not_block_its_room() {
    let db = TestDb::new("oddseq");
    seed_rooms(&db, &[("Odd", "gopher")]);
    let mut numbered = legacy_message("Odd", "gopher", "numbered", 2_000);
    numbered.insert("seq", 1);
    let mut stringly = legacy_message("Odd", "gopher", "stringly", 3_000);
    stringly.insert("seq", "2");
    let unnumbered = legacy_message("Odd", "gopher", "unnumbered", 4_000);
    db.coll("messages")
        .insert_many(vec![numbered, stringly, unnumbered])
        .run()
        .expect("seed messages");
    let s = start(&db, &[]);
    let hist = s.messages("Odd", "");
    assert!(
        contents(&hist).contains(&"unnumbered".to_string()),
        "{hist:?}"
    );
    let mut bob = s.ws("Odd", "bob");
    let joined = bob.recv_n(3, WAIT);
    assert!(
        joined.iter().all(|m| m.get("code").is_none()),
        "{joined:?}\n{}",
        s.log_text()
    );
    let echo = bob.round_trip("fresh", WAIT);
    let top = db
        .coll("messages")
        .find(doc! {"room_id": "Odd", "content": {"$ne": "fresh"}})
        .run()
        .expect("find")
        .filter_map(|d| match d.ok()?.get("seq")? {
            Bson::Int32(n) => Some(i64::from(*n)),
            Bson::Int64(n) => Some(*n),
            _ => None,
        })
        .max()
        .expect("numbered messages");
    assert!(
        echo["seq"].as_i64().expect("seq") > top,
        "{echo} not after {top}"
    );
}

/// A room of more messages than FerretDB deletes in one statement is
/// deleted whole, and a new room of that name starts empty.
#[test]
fn a_room_of_many_messages_is_deleted_whole() {
    const N: usize = 33_000;
    let db = TestDb::new("bigroom");
    seed_rooms(&db, &[("Big", "alice")]);
    let docs: Vec<Document> = (0..N)
        .map(|i| {
            let mut d = legacy_message("Big", "alice", &format!("m{i}"), 2_000 + i as i64);
            d.insert("seq", (i + 1) as i64);
            d
        })
        .collect();
    for chunk in docs.chunks(5_000) {
        db.coll("messages")
            .insert_many(chunk.to_vec())
            .run()
            .expect("seed messages");
    }
    let mut s = start(&db, &[]);
    // Up to a minute on FerretDB on a busy machine.
    s.set_http_timeout(Duration::from_secs(300));
    let t = Instant::now();
    let r = s.delete("/rooms?name=Big&username=alice");
    eprintln!("deleting {N} messages took {:?}", t.elapsed());
    assert_eq!(r.status, 200, "{r:?}\n{}", s.log_text());
    let left = db
        .coll("messages")
        .count_documents(doc! {"room_id": "Big"})
        .run()
        .expect("count");
    assert_eq!(left, 0);
    let r = s.post("/rooms", &json!({"name": "Big", "username": "bob"}));
    assert_eq!(r.status, 201, "{r:?}");
    assert!(s.messages("Big", "").is_empty());
}

/// Rooms of the original are numbered in the background once the database
/// answers, not only when a call first uses them.
#[test]
fn legacy_messages_are_numbered_in_the_background_after_start() {
    let db = TestDb::new("bgnumber");
    seed_rooms(&db, &[("Quiet", "gopher")]);
    let docs: Vec<Document> = (0..30)
        .map(|i| legacy_message("Quiet", "gopher", &format!("q{i}"), 60_000 - i * 1_000))
        .collect();
    db.coll("messages")
        .insert_many(docs)
        .run()
        .expect("seed messages");
    let s = start(&db, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = db
            .coll("messages")
            .count_documents(doc! {"seq": {"$exists": false}})
            .run()
            .expect("count");
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} messages still unnumbered\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Numbered oldest first: the history reads q29 (oldest) .. q0.
    let hist = s.messages("Quiet", "limit=100");
    let want: Vec<String> = (0..30).rev().map(|i| format!("q{i}")).collect();
    assert_eq!(contents(&hist), want);
    assert_eq!(seqs(&hist), (1..=30).collect::<Vec<i64>>());
}

/// How many legacy messages this database takes about `target` to number,
/// and at least 600. The server numbers them one update each, and an update
/// can cost more in a bigger collection (FerretDB's do), so a few updates
/// are timed here in a collection of 600 documents.
fn messages_numbered_in(db: &TestDb, target: Duration) -> i64 {
    const AT_LEAST: i64 = 600;
    const TIMED: usize = 50;
    let probe = db.coll("probe");
    let ids: Vec<Bson> = probe
        .insert_many((0..AT_LEAST).map(|i| doc! {"n": i}))
        .run()
        .expect("probe documents")
        .inserted_ids
        .into_values()
        .take(TIMED)
        .collect();
    let t = Instant::now();
    for (i, id) in ids.into_iter().enumerate() {
        probe
            .update_one(
                doc! {"_id": id, "seq": {"$exists": false}},
                doc! {"$set": {"seq": i as i64}},
            )
            .run()
            .expect("probe update");
    }
    let per_update = t.elapsed() / TIMED as u32;
    probe.drop().run().expect("drop the probe");
    let n = ((target.as_secs_f64() / per_update.as_secs_f64()) as i64).clamp(AT_LEAST, 200_000);
    eprintln!("{per_update:?} per update: {n} messages to number");
    n
}

/// While a room of many legacy messages is being numbered (in the
/// background after start), calls for it answer 503 after a second instead
/// of holding a store thread until the numbering ends, and other rooms are
/// served meanwhile. The room is made big enough for this database to take
/// about ten seconds over it, and the test watches the numbering in the
/// database: it has begun before the calls, and has not ended after them.
#[test]
fn a_room_being_numbered_answers_503_and_other_rooms_go_on() {
    let db = TestDb::new("numbering");
    let n = messages_numbered_in(&db, Duration::from_secs(10));
    seed_rooms(&db, &[("Legacy", "gopher"), ("Other", "gopher")]);
    let docs: Vec<Document> = (0..n)
        .map(|i| legacy_message("Legacy", "gopher", &format!("l{i}"), 10_000 + i))
        .collect();
    let messages = db.coll("messages");
    for chunk in docs.chunks(5_000) {
        messages
            .insert_many(chunk.to_vec())
            .run()
            .expect("seed messages");
    }
    let unnumbered = || {
        messages
            .count_documents(doc! {"room_id": "Legacy", "seq": {"$exists": false}})
            .run()
            .expect("count unnumbered messages") as i64
    };
    let s = start(&db, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while unnumbered() == n {
        assert!(
            Instant::now() < deadline,
            "no message of {n} numbered 20 s after start\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let statuses: Vec<u16> = thread::scope(|sc| {
        let hs: Vec<_> = (0..2)
            .map(|_| sc.spawn(|| s.get("/rooms/Legacy/messages").status))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut other = s.ws("Other", "x");
    other.round_trip("meanwhile", WAIT);
    let left = unnumbered();
    eprintln!("after the calls ({statuses:?}): {left} of {n} left to number");
    assert!(
        left > 0,
        "the numbering of {n} messages ended before the calls did (they answered \
         {statuses:?}): nothing was shown\n{}",
        s.log_text()
    );
    assert_eq!(statuses, [503, 503], "{left} of {n} left\n{}", s.log_text());
    // The numbering goes on to the end: seqs 1..=n in timestamp order.
    let deadline = Instant::now() + Duration::from_secs(300);
    while unnumbered() > 0 {
        assert!(
            Instant::now() < deadline,
            "numbering never ended\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(500));
    }
    let newest = s.messages("Legacy", "limit=1");
    assert_eq!(seqs(&newest), [n]);
    assert_eq!(contents(&newest), [format!("l{}", n - 1)]);
    let oldest = s.messages("Legacy", "before=2");
    assert_eq!(seqs(&oldest), [1]);
    assert_eq!(contents(&oldest), ["l0"]);
}

/// Echoes as runs of consecutive seqs: "seq a..b: content x..y".
fn echo_runs(echoes: &[Value]) -> String {
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < echoes.len() {
        let mut j = i;
        while j + 1 < echoes.len()
            && echoes[j + 1]["seq"].as_i64() == echoes[j]["seq"].as_i64().map(|s| s + 1)
        {
            j += 1;
        }
        runs.push(format!(
            "{}..{}: {}..{}",
            echoes[i]["seq"], echoes[j]["seq"], echoes[i]["content"], echoes[j]["content"]
        ));
        i = j + 1;
    }
    runs.join(", ")
}

/// What is wrong with a history that should hold every message once.
fn diagnose_history(hist: &[Value], db: &TestDb) -> String {
    let mut by_content: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for m in hist {
        by_content
            .entry(m["content"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(m["seq"].as_i64().unwrap_or(-1));
    }
    let dups: Vec<String> = by_content
        .iter()
        .filter(|(_, s)| s.len() > 1)
        .map(|(c, s)| format!("{c} at seqs {s:?}"))
        .collect();
    let mut all_seqs = seqs(hist);
    let n = all_seqs.len();
    all_seqs.sort();
    all_seqs.dedup();
    let docs = db
        .coll("messages")
        .count_documents(doc! {})
        .run()
        .map(|n| n.to_string())
        .unwrap_or_else(|e| e.to_string());
    // The history as runs: "seq a..b: content x..y".
    let mut runs: Vec<String> = Vec::new();
    let mut i = 0;
    while i < hist.len() {
        let mut j = i;
        while j + 1 < hist.len()
            && hist[j + 1]["seq"].as_i64() == hist[j]["seq"].as_i64().map(|s| s + 1)
            && hist[j + 1]["username"] == hist[i]["username"]
        {
            j += 1;
        }
        runs.push(format!(
            "{}..{}: {}..{}",
            hist[i]["seq"], hist[j]["seq"], hist[i]["content"], hist[j]["content"]
        ));
        i = j + 1;
    }
    format!(
        "runs: {runs:?}\n{} distinct contents, {} of them stored more than once (first: {:?}); {} distinct seqs of {n}; {docs} documents in messages",
        by_content.len(),
        dups.len(),
        &dups[..dups.len().min(8)],
        all_seqs.len()
    )
}

// ---------------------------------------------------------------------------
// Group commit

#[test]
fn batch_sizes_show_in_metrics() {
    const CLIENTS: usize = 4;
    const PER: usize = 100;
    let db = TestDb::new("batch");
    let s = start(&db, &[("WS_RATE_LIMIT", "0")]);
    let before = s.metrics();
    assert_eq!(
        metric_value(&before, "chatconnect_store_batch_size_count"),
        Some(0.0),
        "{before}"
    );
    let mut clients: Vec<WsClient> = (0..CLIENTS)
        .map(|i| s.ws("Burst", &format!("u{i}")))
        .collect();
    thread::scope(|sc| {
        for (i, c) in clients.iter_mut().enumerate() {
            sc.spawn(move || {
                for j in 0..PER {
                    c.send_content(&format!("u{i}-{j}"));
                }
                let got = c.recv_n(CLIENTS * PER, Duration::from_secs(30));
                let mine: Vec<String> = got
                    .iter()
                    .filter(|m| m["username"] == format!("u{i}").as_str())
                    .map(|m| m["content"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(
                    mine,
                    (0..PER).map(|j| format!("u{i}-{j}")).collect::<Vec<_>>()
                );
            });
        }
    });
    let text = s.metrics();
    let count = metric_value(&text, "chatconnect_store_batch_size_count").expect("_count");
    let sum = metric_value(&text, "chatconnect_store_batch_size_sum").expect("_sum");
    let le1 = text
        .lines()
        .find_map(|l| l.strip_prefix("chatconnect_store_batch_size_bucket{le=\"1\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no _bucket{{le=\"1\"}} in\n{text}"));
    assert!(count > 0.0, "{text}");
    assert_eq!(
        sum,
        (CLIENTS * PER) as f64,
        "every stored message in one batch:\n{text}"
    );
    assert!(
        le1 < count,
        "no batch of more than one message among {count} batches ({le1} of size 1)"
    );
    assert!(count < (CLIENTS * PER) as f64);
    assert_eq!(
        db.coll("messages").count_documents(doc! {}).run().unwrap(),
        (CLIENTS * PER) as u64
    );
}

// ---------------------------------------------------------------------------
// Faults

#[test]
fn server_starts_without_the_database_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let uri = format!("mongodb://127.0.0.1:{port}/");
    let db = unique_db("nodb");
    let s = start_at(&uri, &db);
    assert_eq!(s.get("/healthz").status, 200);

    // A store call fails after about MONGO_TIMEOUT (2 s), not much later.
    let t = Instant::now();
    s.get("/readyz")
        .expect_error_text(503, "Storage is unavailable");
    let took = t.elapsed();
    eprintln!("readyz 503 after {took:?} with the database down");
    assert!(took < Duration::from_secs(8), "readyz took {took:?}");

    // Everything that needs the store answers 503 with a JSON error, at once
    // (each after about MONGO_TIMEOUT).
    let t = Instant::now();
    thread::scope(|sc| {
        sc.spawn(|| {
            s.get("/readyz")
                .expect_error_text(503, "Storage is unavailable")
        });
        sc.spawn(|| {
            s.post("/register", &creds("early", PASSWORD))
                .expect_error_text(503, STORE_DOWN)
        });
        sc.spawn(|| {
            s.post("/login", &creds("early", PASSWORD))
                .expect_error_text(503, STORE_DOWN)
        });
        sc.spawn(|| s.get("/rooms").expect_error_text(503, STORE_DOWN));
        sc.spawn(|| {
            s.post("/rooms", &json!({"name": "Early", "username": "early"}))
                .expect_error_text(503, STORE_DOWN)
        });
        sc.spawn(|| {
            // A join that cannot load its room: error frame, then 1011.
            let mut c = s.ws("Nowhere", "early");
            expect_error_frame(&mut c, "store_unavailable", Duration::from_secs(15), &s);
            let (code, _) = c.recv_until_close(Duration::from_secs(5));
            assert_eq!(code, 1011);
        });
    });
    eprintln!("the 503s took {:?}", t.elapsed());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the 503s took {:?}",
        t.elapsed()
    );
    assert_eq!(
        s.get("/healthz").status,
        200,
        "healthz while the store is down"
    );

    // The database comes up: the server recovers without a restart.
    let pid = s.pid();
    let ferret = FerretInstance::start(dir.path(), port);
    let took = wait_ready(&s, Duration::from_secs(20));
    eprintln!("readyz 200 {took:?} after the database came up");
    assert_eq!(s.pid(), pid);
    s.register("early", PASSWORD);
    s.login("early", PASSWORD);
    let r = s.post("/rooms", &json!({"name": "Early", "username": "early"}));
    assert_eq!(r.status, 201, "{r:?}");
    let mut c = s.ws("Nowhere", "early");
    assert_eq!(c.round_trip("now it works", WAIT)["seq"], 1);
    let names: Vec<String> = s
        .rooms()
        .iter()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert!(
        names.contains(&"Early".to_string()) && names.contains(&"Nowhere".to_string()),
        "{names:?}"
    );
    // The indexes the server could not make at start are made now.
    let handle = mongo::database(&ferret.uri(), &db);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let missing = missing_indexes(&handle);
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "indexes still missing after the recovery: {missing:#?}\n--- server log ---\n{}",
            s.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The database comes back empty (a new server on the same address, as
/// after losing its volume): the server creates its indexes again before
/// storing, so numbers stay unique.
#[test]
fn indexes_are_created_again_when_the_database_comes_back_empty() {
    let first = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut ferret = FerretInstance::start(first.path(), port);
    let db = unique_db("wiped");
    let s = start_at(&ferret.uri(), &db);
    wait_ready(&s, Duration::from_secs(20));
    let mut alice = s.ws("Wiped", "alice");
    alice.round_trip("before", WAIT);
    assert_required_indexes(&mongo::database(&ferret.uri(), &db));

    ferret.stop();
    let second = tempfile::tempdir().expect("temp dir");
    let _fresh = FerretInstance::start(second.path(), port);
    assert!(
        !missing_indexes(&mongo::database(&ferret.uri(), &db)).is_empty(),
        "the new database should start without indexes"
    );
    wait_ready(&s, Duration::from_secs(20));
    // The room is gone with the old database; a new join makes it again.
    // Alice's leave is waited for: a member still in the room when bob
    // speaks would make the room's write find no room, and close it (4404).
    drop(alice);
    s.await_metric("chatconnect_ws_connections", "alice gone", |v| v == 0.0);
    let mut bob = s.ws("Wiped", "bob");
    let m = bob.round_trip("after", Duration::from_secs(10));
    assert_eq!(m["seq"], 1, "{m}");
    assert_required_indexes(&mongo::database(&ferret.uri(), &db));
}

#[test]
fn database_stops_and_restarts_under_connected_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut ferret = FerretInstance::start(dir.path(), port);
    let db = unique_db("bounce");
    let s = start_at(&ferret.uri(), &db);
    let mut alice = s.ws("Resilient", "alice");
    let mut bob = s.ws("Resilient", "bob");
    let first = alice.round_trip("before", WAIT);
    assert_eq!(bob.expect_json(WAIT)["content"], "before");

    ferret.stop();
    let t = Instant::now();
    alice.send_content("lost");
    expect_error_frame(&mut alice, "store_unavailable", Duration::from_secs(15), &s);
    eprintln!("store_unavailable {:?} after the send", t.elapsed());
    s.get("/readyz")
        .expect_error_text(503, "Storage is unavailable");

    ferret.start_again();
    let took = wait_ready(&s, Duration::from_secs(20));
    eprintln!("readyz 200 {took:?} after the database came back");
    // Nothing came of "lost": the next frame of each is alice's next message.
    let back = alice.expect_marker_next("back");
    let b = bob.expect_json(Duration::from_secs(10));
    assert_eq!(b, back, "bob gets what alice got");
    assert!(
        back["seq"].as_i64() > first["seq"].as_i64(),
        "{back} after {first}"
    );

    let hist = s.messages("Resilient", "");
    assert_eq!(
        contents(&hist),
        ["before", "back"],
        "the failed message is never stored"
    );
    assert_eq!(hist[1], back);
    let stored = mongo::collection(&ferret.uri(), &db, "messages")
        .count_documents(doc! {"content": "lost"})
        .run()
        .expect("count");
    assert_eq!(stored, 0, "the failed message reached the database");
    // A fresh join after the recovery sees the same history.
    let mut carol = s.ws("Resilient", "carol");
    assert_eq!(carol.recv_n(2, WAIT), hist);
    // And nothing more reached anyone: the next frame is a marker.
    alice.expect_marker_next("the end");
    bob.expect_content_next("the end");
    carol.expect_content_next("the end");
}
