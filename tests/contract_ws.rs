//! WebSocket and room promises of `docs/API.md` that need a particular state:
//! upgrades refused for invalid room names and `since` values, the `members`
//! count of `GET /rooms` (with `chatconnect_rooms_active`), and the `503` for
//! an upgrade to a room while it is being deleted (held there by taking
//! SQLite's write lock, so the delete cannot finish until the test lets it).

mod common;

use common::contract::*;
use common::*;
use serde_json::{json, Value};

#[test]
fn upgrade_with_an_invalid_room_name_or_since_is_400() {
    let s = Server::start();
    let long = "a".repeat(65);
    let bad_rooms = [
        long.as_str(),
        "%01room",
        "new%0Aline",
        "del%7F",
        "%20%20",
        "a%2Fb",
        "a/b",
        "%FF",
    ];
    for room in bad_rooms {
        let r = raw_upgrade(s.addr(), &format!("/ws/{room}?username=x"));
        assert_eq!(r.status, 400, "room {room:?}: {}", r.body_text());
        assert!(r.json()["error"].is_string(), "room {room:?}");
    }
    let room = uniq("Since");
    for since in [
        "abc",
        "-1",
        "1.5",
        "",
        "%20",
        "0x10",
        "99999999999999999999",
    ] {
        let path = format!("/ws/{}?username=x&since={since}", enc(&room));
        let r = raw_upgrade(s.addr(), &path);
        assert_eq!(r.status, 400, "since={since:?}: {}", r.body_text());
        assert!(r.json()["error"].is_string(), "since={since:?}");
    }
    // The edges that are fine: 64 characters, since=0.
    let edge = "b".repeat(64);
    let mut a = s.ws(&edge, "x");
    a.round_trip("64 characters", WAIT);
    let mut b = s.ws_path(&format!("/ws/{}?username=x&since=0", enc(&room)));
    b.round_trip("since zero", WAIT);
    // Both joins are complete (their echoes came back); the refused
    // upgrades created nothing.
    let mut names: Vec<String> = s
        .rooms()
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    names.sort();
    let mut want = vec![edge, room];
    want.sort();
    assert_eq!(names, want);
}

/// `members` of one room in `GET /rooms`.
fn members(list: &[Value], room: &str) -> Value {
    list.iter()
        .find(|r| r["name"] == room)
        .unwrap_or_else(|| panic!("{room} not listed: {list:?}"))["members"]
        .clone()
}

/// Wait until `GET /rooms` shows `want` members in `room`.
fn wait_members(s: &Server, room: &str, want: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = s.rooms();
        if members(&list, room) == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{room}: expected {want} members: {list:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn rooms_list_counts_connected_members_and_rooms_active_counts_rooms_in_use() {
    let s = Server::start();
    assert_eq!(metric(&s, "chatconnect_rooms_active"), 0.0);
    let (ra, rb, rc) = (uniq("Two"), uniq("One"), uniq("None"));
    let r = s.post("/rooms", &json!({"name": rc, "username": "maker"}));
    assert_eq!(r.status, 201, "{r:?}");
    let mut a1 = s.ws(&ra, "a1");
    let mut a2 = s.ws(&ra, "a2");
    let mut b1 = s.ws(&rb, "b1");
    for (c, text) in [
        (&mut a1, "a1 here"),
        (&mut a2, "a2 here"),
        (&mut b1, "b1 here"),
    ] {
        c.round_trip(text, WAIT);
    }
    let list = s.rooms();
    assert_eq!(members(&list, &ra), 2, "{list:?}");
    assert_eq!(members(&list, &rb), 1, "{list:?}");
    assert_eq!(members(&list, &rc), 0, "{list:?}");
    for r in &list {
        // Rooms carry their creation time to the second.
        let created = r["created_at"].as_str().unwrap_or_default();
        assert!(
            created.len() == 20 && is_rfc3339_utc(created),
            "created_at of {r}"
        );
    }
    // Rooms in use: the two with members, not the one without.
    assert_eq!(metric(&s, "chatconnect_rooms_active"), 2.0);

    let _ = b1.ws.close(None);
    assert!(matches!(b1.recv(WAIT), Event::Close(_)));
    wait_members(&s, &rb, 0);
    assert_eq!(metric(&s, "chatconnect_rooms_active"), 1.0);
    assert_eq!(members(&s.rooms(), &ra), 2);

    drop(a1);
    wait_members(&s, &ra, 1);
    drop(a2);
    wait_members(&s, &ra, 0);
    assert_eq!(metric(&s, "chatconnect_rooms_active"), 0.0);
}

#[test]
fn upgrade_to_a_room_being_deleted_is_503_until_the_delete_is_done() {
    let s = Server::start();
    let room = uniq("Deleting");
    let r = s.post("/rooms", &json!({"name": room, "username": "owner"}));
    assert_eq!(r.status, 201, "{r:?}");
    let mut member = s.ws(&room, "member");
    member.round_trip("before the delete", WAIT);

    // With the write lock taken, the delete waits in the store (up to the
    // server's 5 s busy timeout) and the room stays fenced.
    let lock = s.hold_write_lock();
    let mut parsed = Parsed::start(&s);
    let mut delete = RawHttp::connect(s.addr());
    delete.send(
        format!(
            "DELETE /rooms?name={}&username=owner HTTP/1.1\r\nHost: x\r\n\r\n",
            enc(&room)
        )
        .as_bytes(),
    );
    parsed.wait_for(&s, 1);

    let path = format!("/ws/{}?username=late", enc(&room));
    for _ in 0..2 {
        let r = raw_upgrade(s.addr(), &path);
        assert_eq!(r.status, 503, "{}", r.body_text());
        assert_eq!(
            r.json(),
            json!({"error": "Room is being deleted; retry shortly"})
        );
    }

    lock.execute_batch("ROLLBACK").expect("release the lock");
    let r = delete.read_response(WAIT).expect("the delete's answer");
    assert_eq!(
        r.status,
        200,
        "the delete must have waited for the lock and then succeeded (a 503 \
         means it gave up after 5 s: the test stalled that long): {}",
        r.body_text()
    );
    assert_eq!(r.json(), json!({"message": "Room deleted successfully"}));
    assert_eq!(
        member.recv_until_close(WAIT),
        (4404, "room deleted".to_string())
    );
    // Done: the name is free, and the new room starts empty (the first
    // frame is the new member's own message).
    let mut late = s.ws_path(&path);
    late.send_content("first of the new room");
    let m = late.expect_json(WAIT);
    assert_eq!(m["content"], "first of the new room", "{m}");
    assert_eq!(m["seq"], 1, "{m}");
}
