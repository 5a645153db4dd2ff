//! REST endpoints against the real binary: accounts, rooms, messages,
//! operations, CORS, 404/405. Every status, every error body.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";

// ---------------------------------------------------------------------------
// Register

#[test]
fn register_then_duplicate_is_409() {
    let s = Server::start();
    let name = uniq("alice");
    let r = s.post(
        "/register",
        &json!({"username": name, "password_hash": PASSWORD}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"message": "User registered successfully"}));

    let again = s.post(
        "/register",
        &json!({"username": name, "password_hash": "another password"}),
    );
    again.expect_error_text(409, "Username already taken");

    // The first password still works, the second does not.
    assert_eq!(
        s.post(
            "/login",
            &json!({"username": name, "password_hash": PASSWORD})
        )
        .status,
        200
    );
    s.post(
        "/login",
        &json!({"username": name, "password_hash": "another password"}),
    )
    .expect_error_text(401, "Invalid credentials");
}

#[test]
fn register_accepts_password_alias() {
    let s = Server::start();
    let name = uniq("bob");
    let r = s.post(
        "/register",
        &json!({"username": name, "password": PASSWORD}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["message"], "User registered successfully");
    // Log in with either field name.
    let a = s.post("/login", &json!({"username": name, "password": PASSWORD}));
    assert_eq!(a.status, 200, "{a:?}");
    let b = s.post(
        "/login",
        &json!({"username": name, "password_hash": PASSWORD}),
    );
    assert_eq!(b.status, 200, "{b:?}");
}

#[test]
fn register_validates_username() {
    let s = Server::start();
    let bad_names: Vec<Value> = vec![
        json!(""),
        json!("a".repeat(33)),
        json!("has space"),
        json!("slash/name"),
        json!("caf\u{e9}"),
        json!("emoji\u{1F600}"),
        json!("semi;colon"),
        json!("tab\tname"),
        json!(5),
        json!(null),
        json!(["array"]),
    ];
    for name in bad_names {
        let r = s.post(
            "/register",
            &json!({"username": name, "password_hash": PASSWORD}),
        );
        r.expect_error(400);
    }
    // The edges that are fine: 1 char, 32 chars, every allowed punctuation.
    for name in ["x", &"a".repeat(32), "A-Z_a.z-0_9"] {
        let r = s.post(
            "/register",
            &json!({"username": name, "password_hash": PASSWORD}),
        );
        assert_eq!(r.status, 200, "username {name:?}: {r:?}");
    }
}

#[test]
fn register_refuses_reserved_anonymous() {
    let s = Server::start();
    let r = s.post(
        "/register",
        &json!({"username": "Anonymous", "password_hash": PASSWORD}),
    );
    assert!(
        r.status == 400 || r.status == 409,
        "registering the reserved name Anonymous must be refused with 400 (or 409): {r:?}"
    );
    r.expect_error(r.status);
    // and it cannot log in either
    s.post(
        "/login",
        &json!({"username": "Anonymous", "password_hash": PASSWORD}),
    )
    .expect_error(401);
}

#[test]
fn register_validates_password_length_in_bytes() {
    let s = Server::start();
    let cases: Vec<(String, u16)> = vec![
        ("1234567".into(), 400),            // 7 bytes
        ("12345678".into(), 200),           // 8 bytes
        ("a".repeat(72), 200),              // 72 bytes
        ("a".repeat(73), 400),              // 73 bytes
        ("\u{e9}".repeat(36), 200),         // 36 chars, 72 bytes
        ("\u{e9}".repeat(37), 400),         // 37 chars, 74 bytes
        ("\u{e9}\u{e9}\u{e9}".into(), 400), // 3 chars, 6 bytes
    ];
    for (pw, want) in cases {
        let name = uniq("pw");
        let r = s.post("/register", &json!({"username": name, "password_hash": pw}));
        if want == 200 {
            assert_eq!(r.status, 200, "password of {} bytes: {r:?}", pw.len());
            let l = s.post("/login", &json!({"username": name, "password_hash": pw}));
            assert_eq!(
                l.status,
                200,
                "login with a {}-byte password: {l:?}",
                pw.len()
            );
            // bcrypt reads only 72 bytes: a longer password that starts
            // with this one is still the wrong password.
            let longer = format!("{pw}x");
            let l = s.post(
                "/login",
                &json!({"username": name, "password_hash": longer}),
            );
            assert_eq!(l.status, 401, "login with {} bytes: {l:?}", longer.len());
        } else {
            r.expect_error(want);
        }
    }
}

#[test]
fn register_rejects_bad_bodies() {
    let s = Server::start();
    for body in [
        "",
        "not json",
        "{",
        "[]",
        "\"string\"",
        "42",
        "{\"username\": \"someone\"}",
        "{\"password_hash\": \"correct horse battery\"}",
        "{\"username\": \"someone\", \"password_hash\": 12345678}",
        "{\"username\": \"someone\", \"password_hash\": null}",
    ] {
        let r = s.post_raw("/register", body);
        r.expect_error(400);
    }
    // Nothing above created "someone".
    let r = s.post(
        "/register",
        &json!({"username": "someone", "password_hash": PASSWORD}),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn password_is_never_stored_or_logged() {
    let s = Server::start();
    let secret = "Plaintext-Never-Stored-42";
    let name = uniq("carol");
    s.register(&name, secret);
    s.login(&name, secret);
    s.post(
        "/login",
        &json!({"username": name, "password_hash": "wrong-Plaintext-99"}),
    )
    .expect_error_text(401, "Invalid credentials");
    // Whatever those calls logged is in before the line of a later
    // registration: wait for that line instead of sleeping.
    let later = uniq("later");
    s.register(&later, PASSWORD);
    s.await_log(&format!("registered user {later}"), WAIT);
    assert!(
        !s.log_text().contains(secret),
        "password appears in the log:\n{}",
        s.log_text()
    );
    assert!(
        !s.log_text().contains("wrong-Plaintext-99"),
        "password appears in the log"
    );
    // No file of the data directory holds the plain password.
    let mut files = 0;
    for entry in walk(&s.data_dir()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        files += 1;
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} contains the plain password",
            entry.display()
        );
    }
    assert!(
        files > 0,
        "no data files found under {}",
        s.data_dir().display()
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Login

#[test]
fn login_returns_message_username_and_jwt() {
    let secret = "test-secret-0123456789-abcdef";
    let s = Server::start_with(&[("TOKEN_SECRET", secret)]);
    let name = uniq("dave");
    s.register(&name, PASSWORD);
    let r = s.post(
        "/login",
        &json!({"username": name, "password_hash": PASSWORD}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["message"], "Login successful");
    assert_eq!(v["username"], name.as_str());
    let token = v["token"].as_str().expect("token string");

    let header = jsonwebtoken::decode_header(token).expect("token is a JWT");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("token verifies with TOKEN_SECRET");
    assert_eq!(data.claims["sub"], name.as_str());
    let exp = data.claims["exp"].as_i64().expect("numeric exp");
    let now = now_millis() / 1000;
    let ttl = exp - now;
    assert!(
        (24 * 3600 - 120..=24 * 3600 + 120).contains(&ttl),
        "default token lifetime should be 24 h, exp - now = {ttl} s"
    );
}

#[test]
fn login_failures_are_401_invalid_credentials() {
    let s = Server::start();
    let name = uniq("erin");
    s.register(&name, PASSWORD);
    let wrong = s.post(
        "/login",
        &json!({"username": name, "password_hash": "wrong password"}),
    );
    wrong.expect_error_text(401, "Invalid credentials");
    let unknown = s.post(
        "/login",
        &json!({"username": uniq("ghost"), "password_hash": PASSWORD}),
    );
    unknown.expect_error_text(401, "Invalid credentials");
    assert_eq!(
        wrong.body, unknown.body,
        "unknown user and wrong password must look the same"
    );
    // Case matters.
    s.post(
        "/login",
        &json!({"username": name.to_uppercase(), "password_hash": PASSWORD}),
    )
    .expect_error(401);
}

/// A stored hash of absurd cost (corrupt, or planted in a database the
/// server took over) is refused at once instead of occupying a hash thread
/// for days; logins of other users go on.
#[test]
fn login_against_a_hash_of_absurd_cost_is_refused_quickly() {
    let s = Server::start_with(&[("WORKERS", "2")]);
    let heavy = uniq("heavy");
    let light = uniq("light");
    s.register(&heavy, PASSWORD);
    s.register(&light, PASSWORD);
    let db = rusqlite::Connection::open(s.data_dir().join("chatconnect.db"))
        .expect("open the database beside the server");
    // The user's own hash, well formed, with its cost raised to the maximum.
    let own: String = db
        .query_row(
            "SELECT password_hash FROM users WHERE username = ?1",
            [&heavy],
            |r| r.get(0),
        )
        .expect("read the hash");
    let cost = &own[3..7];
    assert!(cost.starts_with('$') && cost.ends_with('$'), "{own}");
    let planted = format!("{}$31${}", &own[..3], &own[7..]);
    let changed = db
        .execute(
            "UPDATE users SET password_hash = ?1 WHERE username = ?2",
            rusqlite::params![planted, heavy],
        )
        .expect("plant the hash");
    assert_eq!(changed, 1);
    for _ in 0..3 {
        let t = Instant::now();
        s.post(
            "/login",
            &json!({"username": heavy, "password_hash": PASSWORD}),
        )
        .expect_error_text(401, "Invalid credentials");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
    // Both hash threads are free: a normal login still works.
    s.login(&light, PASSWORD);
}

#[test]
fn login_rejects_bad_bodies() {
    let s = Server::start();
    for body in [
        "",
        "not json",
        "{",
        "[]",
        "{\"username\": 5, \"password_hash\": \"correct horse battery\"}",
    ] {
        let r = s.post_raw("/login", body);
        r.expect_error(400);
    }
    // Missing fields: a malformed body.
    for body in [
        "{}",
        "{\"username\": \"someone\"}",
        "{\"password_hash\": \"correct horse battery\"}",
    ] {
        s.post_raw("/login", body).expect_error(400);
    }
}

#[test]
fn login_unknown_user_takes_as_long_as_wrong_password() {
    // With the default cost a verification is clearly measurable.
    let s = Server::start_with(&[("BCRYPT_COST", "10")]);
    let name = uniq("frank");
    s.register(&name, PASSWORD);
    let time = |user: &str| {
        let t = Instant::now();
        let r = s.post(
            "/login",
            &json!({"username": user, "password_hash": "not the password"}),
        );
        assert_eq!(r.status, 401);
        t.elapsed()
    };
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..3 {
        wrong.push(time(&name));
        unknown.push(time(&format!("nobody{i}")));
    }
    wrong.sort();
    unknown.sort();
    let (w, u) = (wrong[1], unknown[1]);
    assert!(
        u * 2 >= w,
        "unknown user answered in {u:?}, wrong password in {w:?}: an unknown user must be \
         verified against a dummy hash so both take about as long"
    );
}

// ---------------------------------------------------------------------------
// Rooms

#[test]
fn rooms_empty_list_is_empty_array() {
    let s = Server::start();
    let r = s.get("/rooms");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!([]),
        "no rooms must be [] (the original sent null)"
    );
}

#[test]
fn create_room_201_then_409() {
    let s = Server::start();
    let room = uniq("General");
    let before = now_millis();
    let r = s.post("/rooms", &json!({"name": room, "username": "alice"}));
    assert_eq!(r.status, 201, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], room.as_str());
    assert_eq!(v["creator"], "alice");
    let created = v["created_at"].as_str().expect("created_at string");
    assert!(
        is_rfc3339_utc(created),
        "created_at {created:?} is not RFC 3339 UTC ending in Z"
    );
    let t = parse_rfc3339_millis(created);
    assert!(
        t >= before - 2000 && t <= now_millis() + 2000,
        "created_at {created} is not now"
    );

    let dup = s.post("/rooms", &json!({"name": room, "username": "bob"}));
    dup.expect_error(409);

    let list = s.rooms();
    let found: Vec<&Value> = list.iter().filter(|r| r["name"] == room.as_str()).collect();
    assert_eq!(found.len(), 1, "{list:?}");
    assert_eq!(
        found[0]["creator"], "alice",
        "the 409 must not change the creator"
    );
    assert_eq!(found[0]["created_at"], v["created_at"]);
}

#[test]
fn create_room_validates_name_and_username() {
    let s = Server::start();
    let bad: Vec<Value> = vec![
        json!(""),
        json!("   "),
        json!("a".repeat(65)),
        json!("with/slash"),
        json!("ctrl\u{1}char"),
        json!("new\nline"),
        json!("tab\tchar"),
        json!("del\u{7f}char"),
        json!(7),
        json!(null),
    ];
    for name in bad {
        let r = s.post("/rooms", &json!({"name": name, "username": "alice"}));
        r.expect_error(400);
    }
    // Missing username (open mode) and bad bodies.
    s.post("/rooms", &json!({"name": uniq("NoUser")}))
        .expect_error(400);
    s.post_raw("/rooms", "not json").expect_error(400);
    s.post_raw("/rooms", "").expect_error(400);
    s.post_raw("/rooms", "{\"username\": \"alice\"}")
        .expect_error(400);
    assert!(
        s.rooms().is_empty(),
        "a refused create left a room behind: {:?}",
        s.rooms()
    );

    // Edges that are fine: 64 chars, spaces inside, non-ASCII.
    for name in [
        "b".repeat(64),
        "Caf\u{e9} du coin \u{1F600}".to_string(),
        "x".into(),
    ] {
        let r = s.post("/rooms", &json!({"name": name, "username": "alice"}));
        assert_eq!(r.status, 201, "room {name:?}: {r:?}");
        assert_eq!(r.json()["name"], name.as_str());
    }
}

#[test]
fn rooms_listed_oldest_first_with_fields() {
    let s = Server::start();
    let tag = uniq("ord");
    // Created in reverse alphabetical order: the list must follow creation.
    let names = [format!("{tag}-c"), format!("{tag}-b"), format!("{tag}-a")];
    for n in &names {
        let r = s.post("/rooms", &json!({"name": n, "username": "alice"}));
        assert_eq!(r.status, 201, "{r:?}");
        std::thread::sleep(Duration::from_millis(30));
    }
    let list = s.rooms();
    let got: Vec<&str> = list
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(got, names.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let mut last = 0;
    for r in &list {
        assert_eq!(r["creator"], "alice");
        let c = r["created_at"].as_str().expect("created_at");
        assert!(is_rfc3339_utc(c), "{c:?}");
        let t = parse_rfc3339_millis(c);
        assert!(t >= last, "created_at not ascending: {list:?}");
        last = t;
    }
}

#[test]
fn websocket_join_creates_room_with_creator() {
    let s = Server::start();
    let room = uniq("Lobby");
    let user = uniq("gina");
    let _c = s.ws(&room, &user);
    // The room is created by the join, which completes just after the 101
    // (with the history): allow it a moment, bounded.
    let deadline = std::time::Instant::now() + WAIT;
    let found = loop {
        let list = s.rooms();
        if let Some(r) = list.iter().find(|r| r["name"] == room.as_str()) {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "room never listed: {list:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(found["creator"], user.as_str());
    // A second joiner does not change the creator.
    let _d = s.ws(&room, "someone_else");
    let list = s.rooms();
    let found = list
        .iter()
        .find(|r| r["name"] == room.as_str())
        .expect("room");
    assert_eq!(found["creator"], user.as_str());
    // POST on an existing (WebSocket-created) room is 409.
    s.post("/rooms", &json!({"name": room, "username": "x"}))
        .expect_error(409);
}

#[test]
fn delete_room_status_codes() {
    let s = Server::start();
    let room = uniq("Doomed");
    assert_eq!(
        s.post("/rooms", &json!({"name": room, "username": "owner"}))
            .status,
        201
    );

    let q = |name: Option<&str>, user: Option<&str>| {
        let mut parts = Vec::new();
        if let Some(n) = name {
            parts.push(format!("name={}", enc(n)));
        }
        if let Some(u) = user {
            parts.push(format!("username={}", enc(u)));
        }
        format!("/rooms?{}", parts.join("&"))
    };
    s.delete(&q(None, Some("owner")))
        .expect_error_text(400, "Room name and username required");
    s.delete(&q(Some(&room), None))
        .expect_error_text(400, "Room name and username required");
    s.delete("/rooms")
        .expect_error_text(400, "Room name and username required");
    s.delete(&q(Some(""), Some("owner")))
        .expect_error_text(400, "Room name and username required");
    s.delete(&q(Some(&uniq("nosuch")), Some("owner")))
        .expect_error_text(404, "Room not found");
    s.delete(&q(Some(&room), Some("intruder")))
        .expect_error_text(403, "Only the room creator can delete this room");
    assert!(
        s.rooms().iter().any(|r| r["name"] == room.as_str()),
        "403 must not delete"
    );

    let ok = s.delete(&q(Some(&room), Some("owner")));
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json(), json!({"message": "Room deleted successfully"}));
    assert!(
        !s.rooms().iter().any(|r| r["name"] == room.as_str()),
        "room still listed"
    );
    s.delete(&q(Some(&room), Some("owner")))
        .expect_error_text(404, "Room not found");
    s.get(&format!("/rooms/{}/messages", enc(&room)))
        .expect_error(404);
}

#[test]
fn delete_removes_messages_new_room_of_same_name_is_empty() {
    let s = Server::start();
    let room = uniq("Recycled");
    let owner = uniq("owner");
    post_messages(&s, &room, &owner, "old", 5);
    assert_eq!(s.messages(&room, "").len(), 5);
    let r = s.delete(&format!(
        "/rooms?name={}&username={}",
        enc(&room),
        enc(&owner)
    ));
    assert_eq!(r.status, 200, "{r:?}");
    // Same name again, by someone else.
    let r = s.post("/rooms", &json!({"name": room, "username": "newowner"}));
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["creator"], "newowner");
    assert_eq!(
        s.messages(&room, ""),
        Vec::<Value>::new(),
        "old messages came back"
    );
    let mut c = s.ws(&room, "newowner");
    c.expect_marker_next("no history");
}

// ---------------------------------------------------------------------------
// Messages endpoint

#[test]
fn messages_endpoint_pages_with_before_and_limit() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Paged");
    let echoes = post_messages(&s, &room, "poster", "p", 60);
    assert_eq!(seqs(&echoes), (1..=60).collect::<Vec<i64>>());

    let all = s.messages(&room, "");
    assert!(!all.is_empty());
    let sq = seqs(&all);
    assert_eq!(
        *sq.last().unwrap(),
        60,
        "newest page must end at the newest message"
    );
    assert!(
        sq.windows(2).all(|w| w[1] == w[0] + 1),
        "oldest first, no gaps: {sq:?}"
    );
    assert!(sq.len() <= 200);

    assert_eq!(
        seqs(&s.messages(&room, "limit=10")),
        (51..=60).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&s.messages(&room, "limit=10&before=51")),
        (41..=50).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&s.messages(&room, "before=5&limit=10")),
        (1..=4).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&s.messages(&room, "limit=3&before=1")),
        Vec::<i64>::new()
    );
    assert_eq!(
        seqs(&s.messages(&room, "limit=100")),
        (1..=60).collect::<Vec<_>>()
    );

    // Messages have the frame's fields.
    let page = s.messages(&room, "limit=1&before=8");
    assert_eq!(page.len(), 1);
    let m = &page[0];
    assert_eq!(m["seq"], 7);
    assert_eq!(m["room_id"], room.as_str());
    assert_eq!(m["username"], "poster");
    assert_eq!(m["content"], "p-6");
    assert!(
        is_rfc3339_millis_utc(m["timestamp"].as_str().unwrap_or("")),
        "{m}"
    );
    assert_eq!(
        m, &echoes[6],
        "REST and WebSocket must show the same message"
    );
}

#[test]
fn messages_endpoint_clamps_limit_to_200() {
    let s = Server::start_with(&[("WS_RATE_LIMIT", "0")]);
    let room = uniq("Big");
    post_messages(&s, &room, "poster", "b", 230);
    let page = s.messages(&room, "limit=500");
    assert_eq!(
        seqs(&page),
        (31..=230).collect::<Vec<_>>(),
        "limit over 200 is clamped to 200"
    );
    let page = s.messages(&room, "limit=200&before=31");
    assert_eq!(seqs(&page), (1..=30).collect::<Vec<_>>());
}

#[test]
fn messages_endpoint_errors() {
    let s = Server::start();
    let room = uniq("Errs");
    post_messages(&s, &room, "poster", "e", 3);
    let base = format!("/rooms/{}/messages", enc(&room));
    for q in [
        "limit=0",
        "limit=abc",
        "limit=-1",
        "before=xyz",
        "before=",
        "limit=1.5",
    ] {
        s.get(&format!("{base}?{q}")).expect_error(400);
    }
    s.get(&format!("/rooms/{}/messages", enc(&uniq("nosuch"))))
        .expect_error_text(404, "Room not found");
    // unknown room with a bad limit: either error is fine, but it is an error
    let r = s.get(&format!("/rooms/{}/messages?limit=0", enc(&uniq("nosuch"))));
    assert!(r.status == 400 || r.status == 404, "{r:?}");
    r.expect_error(r.status);
}

#[test]
fn room_names_are_percent_decoded_in_paths() {
    let s = Server::start();
    let room = format!("My Room {}", uniq("x"));
    let user = uniq("henry");
    // Created through a percent-encoded WebSocket path.
    let mut c = s.ws(&room, &user);
    let echo = c.round_trip("hello with spaces", WAIT);
    assert_eq!(echo["room_id"], room.as_str());
    assert!(
        s.rooms().iter().any(|r| r["name"] == room.as_str()),
        "{:?}",
        s.rooms()
    );
    let path = format!("/rooms/{}/messages", room.replace(' ', "%20"));
    let r = s.get(&path);
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "{v}");
    assert_eq!(v[0]["content"], "hello with spaces");
    assert_eq!(v[0]["room_id"], room.as_str());

    // Non-ASCII names too.
    let room2 = format!("Caf\u{e9} \u{1F600} {}", uniq("y"));
    let mut c2 = s.ws(&room2, &user);
    c2.round_trip("bonjour", WAIT);
    let page = s.messages(&room2, "");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["room_id"], room2.as_str());
    // and delete with a percent-encoded query
    let r = s.delete(&format!(
        "/rooms?name={}&username={}",
        enc(&room2),
        enc(&user)
    ));
    assert_eq!(r.status, 200, "{r:?}");
}

// ---------------------------------------------------------------------------
// Operations

#[test]
fn healthz_readyz_metrics() {
    let s = Server::start();
    let h = s.get("/healthz");
    assert_eq!(h.status, 200);
    assert_eq!(h.json(), json!({"status": "ok"}));
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"status": "ready"}));
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    let ct = m.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "metrics Content-Type {ct:?}");
    for name in [
        "chatconnect_ws_connections",
        "chatconnect_http_connections",
        "chatconnect_messages_stored_total",
        "chatconnect_messages_delivered_total",
        "chatconnect_rooms_active",
        "chatconnect_worker_queue_depth",
        "chatconnect_store_call_seconds",
    ] {
        assert!(
            m.body.contains(name),
            "metric {name} missing from /metrics:\n{}",
            m.body
        );
    }
    for line in m
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        assert!(
            line.starts_with("chatconnect_"),
            "metric line without the prefix: {line:?}"
        );
        let value = line.rsplit(' ').next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok(),
            "metric line without a numeric value: {line:?}"
        );
    }
}

#[test]
fn metrics_count_stored_and_delivered_messages() {
    let s = Server::start();
    let room = uniq("Counted");
    let mut a = s.ws(&room, "a");
    let mut b = s.ws(&room, "b");
    // Both members live (history done) before the baseline: frames sent as
    // history are not counted as deliveries.
    a.round_trip("from a", WAIT);
    b.round_trip("from b", WAIT); // skips "from a", then its own echo
    assert_eq!(a.expect_json(WAIT)["content"], "from b");
    // Both counters move in the pass that broadcasts, before the frames
    // leave: once a has "from b", they count every message so far.
    let text = s.metrics();
    let stored0 = metric_value(&text, "chatconnect_messages_stored_total").expect("stored metric");
    let delivered0 =
        metric_value(&text, "chatconnect_messages_delivered_total").expect("delivered metric");

    for i in 0..3 {
        a.send_content(&format!("m{i}"));
    }
    a.recv_n(3, WAIT);
    b.recv_n(3, WAIT);
    let ws_now = metric_value(&s.metrics(), "chatconnect_ws_connections").expect("ws metric");
    assert!(
        ws_now >= 2.0,
        "chatconnect_ws_connections = {ws_now} with two sockets open"
    );

    let text = s.metrics();
    let stored = metric_value(&text, "chatconnect_messages_stored_total").expect("stored metric");
    let delivered =
        metric_value(&text, "chatconnect_messages_delivered_total").expect("delivered metric");
    assert_eq!(
        (stored - stored0, delivered - delivered0),
        (3.0, 6.0),
        "after 3 messages to 2 members: stored {stored0} -> {stored}, delivered {delivered0} -> {delivered}"
    );
}

// ---------------------------------------------------------------------------
// CORS, 404, 405, content type

fn assert_cors(r: &Resp, origin: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(origin),
        "{} {}: {r:?}",
        r.method,
        r.path
    );
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, DELETE, OPTIONS"),
        "{} {}: {r:?}",
        r.method,
        r.path
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Content-Type, Authorization"),
        "{} {}: {r:?}",
        r.method,
        r.path
    );
}

#[test]
fn cors_headers_on_every_response() {
    let s = Server::start();
    let room = uniq("Cors");
    let responses = vec![
        s.get("/healthz"),
        s.get("/rooms"),
        s.post("/rooms", &json!({"name": room, "username": "a"})),
        s.post("/rooms", &json!({"name": room, "username": "a"})), // 409
        s.post_raw("/register", "junk"),                           // 400
        s.post(
            "/login",
            &json!({"username": "nobody", "password_hash": PASSWORD}),
        ), // 401
        s.get("/no/such/path"),                                    // 404
        s.request("PUT", "/rooms", Some("{}"), &[]),               // 405
        s.get("/metrics"),
    ];
    for r in &responses {
        assert_cors(r, "*");
    }
}

#[test]
fn options_on_known_paths_is_204() {
    let s = Server::start();
    for (path, allow) in [
        ("/rooms", "GET, POST, DELETE, OPTIONS"),
        ("/register", "POST, OPTIONS"),
        ("/login", "POST, OPTIONS"),
        ("/healthz", "GET, OPTIONS"),
        ("/readyz", "GET, OPTIONS"),
        ("/metrics", "GET, OPTIONS"),
        ("/rooms/General/messages", "GET, OPTIONS"),
        ("/ws/General", "GET, OPTIONS"),
    ] {
        let r = s.request(
            "OPTIONS",
            path,
            None,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
            ],
        );
        assert_eq!(r.status, 204, "OPTIONS {path}: {r:?}");
        assert_cors(&r, "*");
        assert_eq!(r.header("allow"), Some(allow), "OPTIONS {path}: {r:?}");
    }
    let r = s.request("OPTIONS", "/definitely/not/here", None, &[]);
    r.expect_error(404);
}

#[test]
fn cors_origin_is_configurable() {
    let s = Server::start_with(&[("CORS_ORIGIN", "https://chat.example.com")]);
    assert_cors(&s.get("/healthz"), "https://chat.example.com");
    assert_cors(&s.get("/nope"), "https://chat.example.com");
    let r = s.request(
        "OPTIONS",
        "/rooms",
        None,
        &[("Origin", "https://chat.example.com")],
    );
    assert_eq!(r.status, 204);
    assert_cors(&r, "https://chat.example.com");
}

#[test]
fn unknown_path_404_json() {
    let s = Server::start();
    // `/` is the web client (tests/web_files.rs; 404 with WEB_UI=false).
    for path in [
        "/index.html",
        "/web/nope.js",
        "/nope",
        "/rooms/x/y/z",
        "/registerx",
        "/api/rooms",
        "/rooms/x/messagesx",
    ] {
        s.get(path).expect_error(404);
    }
    s.post_raw("/nope", "{}").expect_error(404);
}

#[test]
fn wrong_method_405_with_allow() {
    let s = Server::start();
    let cases: Vec<(&str, &str, &[&str])> = vec![
        ("GET", "/register", &["POST"]),
        ("GET", "/login", &["POST"]),
        ("PUT", "/rooms", &["GET", "POST", "DELETE"]),
        ("PATCH", "/rooms", &["GET", "POST", "DELETE"]),
        ("POST", "/healthz", &["GET"]),
        ("DELETE", "/metrics", &["GET"]),
        ("POST", "/rooms/General/messages", &["GET"]),
    ];
    for (method, path, allowed) in cases {
        let body = if matches!(method, "PUT" | "PATCH" | "POST") {
            Some("{}")
        } else {
            None
        };
        let r = s.request(method, path, body, &[]);
        r.expect_error(405);
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: 405 without Allow: {r:?}"));
        for m in allowed {
            assert!(
                allow.to_ascii_uppercase().contains(m),
                "{method} {path}: Allow {allow:?} lacks {m}"
            );
        }
    }
}

#[test]
fn every_json_response_has_json_content_type() {
    let s = Server::start();
    let name = uniq("ivy");
    let room = uniq("Typed");
    let rs = vec![
        s.post(
            "/register",
            &json!({"username": name, "password_hash": PASSWORD}),
        ),
        s.post(
            "/login",
            &json!({"username": name, "password_hash": PASSWORD}),
        ),
        s.get("/rooms"),
        s.post("/rooms", &json!({"name": room, "username": name})),
        s.get(&format!("/rooms/{}/messages", enc(&room))),
        s.get("/healthz"),
        s.get("/readyz"),
        s.delete(&format!(
            "/rooms?name={}&username={}",
            enc(&room),
            enc(&name)
        )),
        s.get("/ws/SomeRoom"), // 426 error
    ];
    for r in rs {
        r.json(); // asserts Content-Type and a JSON body
        assert!(!r.body.is_empty(), "{r:?}");
    }
}
