//! Bearer tokens: `AUTH_MODE=token` (identity only from the token) and the
//! token rules of `open` mode (a token sent is verified and wins).

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "suite-secret-0123456789-abcdefgh";

fn token_server() -> Server {
    Server::start_with(&[("AUTH_MODE", "token"), ("TOKEN_SECRET", SECRET)])
}

fn sign(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn now_s() -> i64 {
    now_millis() / 1000
}

/// Tokens that must all be refused.
fn bad_tokens(user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("garbage", "not-a-token".to_string()),
        (
            "wrong secret",
            sign(
                &json!({"sub": user, "exp": now_s() + 3600}),
                "some-other-secret-0123456789",
            ),
        ),
        (
            "expired",
            sign(
                &json!({"sub": user, "iat": now_s() - 7200, "exp": now_s() - 3600}),
                SECRET,
            ),
        ),
        ("no exp", sign(&json!({"sub": user}), SECRET)),
        ("no sub", sign(&json!({"exp": now_s() + 3600}), SECRET)),
        ("alg none", {
            // header {"alg":"none","typ":"JWT"}, payload {"sub":user,"exp":...}, no signature
            let good = sign(&json!({"sub": user, "exp": now_s() + 3600}), SECRET);
            let payload = good.split('.').nth(1).unwrap().to_string();
            format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")
        }),
    ]
}

#[test]
fn token_mode_websocket_needs_a_valid_token() {
    let s = token_server();
    let user = uniq("alice");
    let good = s.user_with_token(&user);
    let room = uniq("Guarded");
    let base = format!("/ws/{}?username={}", enc(&room), enc(&user));
    assert_eq!(s.ws_refused_status(&base, &[]), 401, "no token");
    for (what, t) in bad_tokens(&user) {
        assert_eq!(
            s.ws_refused_status(&format!("{base}&token={}", enc(&t)), &[]),
            401,
            "{what} token in query"
        );
        let bearer = format!("Bearer {t}");
        assert_eq!(
            s.ws_refused_status(&base, &[("Authorization", &bearer)]),
            401,
            "{what} token in header"
        );
    }
    assert_eq!(
        s.ws_refused_status(&base, &[("Authorization", "Basic YWxpY2U6cGFzc3dvcmQ=")]),
        401,
        "Basic auth is not a token"
    );
    // None of the refusals created the room.
    assert!(
        !s.rooms().iter().any(|r| r["name"] == room.as_str()),
        "a refused connect created the room"
    );
    // The good token connects.
    let mut c = s.ws_path(&format!("{base}&token={}", enc(&good)));
    assert_eq!(c.round_trip("let me in", WAIT)["username"], user.as_str());
}

#[test]
fn token_mode_identity_comes_from_query_token() {
    let s = token_server();
    let alice = uniq("alice");
    let token = s.user_with_token(&alice);
    let room = uniq("Who");
    let mut c = s.ws_path(&format!(
        "/ws/{}?username=mallory&token={}",
        enc(&room),
        enc(&token)
    ));
    let m = c.round_trip("hi", WAIT);
    assert_eq!(
        m["username"],
        alice.as_str(),
        "the username parameter must not override the token"
    );
    let list = s.rooms();
    let r = list
        .iter()
        .find(|r| r["name"] == room.as_str())
        .expect("room created on connect");
    assert_eq!(r["creator"], alice.as_str());
    // No username parameter at all is fine with a token.
    let mut d = s.ws_path(&format!("/ws/{}?token={}", enc(&room), enc(&token)));
    assert_eq!(d.round_trip("again", WAIT)["username"], alice.as_str()); // after the history
}

#[test]
fn token_mode_identity_comes_from_bearer_header() {
    let s = token_server();
    let bob = uniq("bob");
    let token = s.user_with_token(&bob);
    let room = uniq("Header");
    let bearer = format!("Bearer {token}");
    let mut c = s
        .try_ws(
            &format!("/ws/{}?username=mallory", enc(&room)),
            &[("Authorization", &bearer)],
        )
        .unwrap_or_else(|e| panic!("bearer connect: {}", describe_ws_error(&e)));
    assert_eq!(c.round_trip("via header", WAIT)["username"], bob.as_str());
}

#[test]
fn token_mode_room_mutations_need_a_token() {
    let s = token_server();
    let alice = uniq("alice");
    let bob = uniq("bob");
    let ta = s.user_with_token(&alice);
    let tb = s.user_with_token(&bob);
    let room = uniq("Owned");

    // Create.
    s.post("/rooms", &json!({"name": room, "username": alice}))
        .expect_error(401);
    for (what, t) in bad_tokens(&alice) {
        let r = s.post_auth("/rooms", &json!({"name": room, "username": alice}), &t);
        assert_eq!(r.status, 401, "POST /rooms with a {what} token: {r:?}");
        r.expect_error(401);
    }
    let r = s.post_auth("/rooms", &json!({"name": room, "username": "mallory"}), &ta);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.json()["creator"],
        alice.as_str(),
        "creator comes from the token"
    );
    let other = uniq("NoName");
    let r = s.post_auth("/rooms", &json!({"name": other}), &ta);
    assert_eq!(
        r.status, 201,
        "in token mode the body needs no username: {r:?}"
    );

    // Delete.
    let q = format!("/rooms?name={}&username={}", enc(&room), enc(&alice));
    s.delete(&q).expect_error(401);
    for (what, t) in bad_tokens(&alice) {
        let r = s.delete_auth(&q, &t);
        assert_eq!(r.status, 401, "DELETE with a {what} token: {r:?}");
    }
    // Bob's valid token, even claiming to be alice in the query: forbidden.
    s.delete_auth(&q, &tb)
        .expect_error_text(403, "Only the room creator can delete this room");
    assert!(s.rooms().iter().any(|r| r["name"] == room.as_str()));
    let r = s.delete_auth(&q, &ta);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["message"], "Room deleted successfully");
}

#[test]
fn token_mode_reads_and_accounts_need_no_token() {
    let s = token_server();
    assert_eq!(s.get("/rooms").status, 200);
    assert_eq!(s.get("/healthz").status, 200);
    let user = uniq("carol");
    // register and login work without a token (that is how one gets a token)
    let token = s.user_with_token(&user);
    let room = uniq("Readable");
    let mut c = s.ws_path(&format!("/ws/{}?token={}", enc(&room), enc(&token)));
    c.round_trip("public", WAIT);
    let r = s.get(&format!("/rooms/{}/messages", enc(&room)));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()[0]["content"], "public");
}

#[test]
fn token_ttl_is_honoured() {
    let s = Server::start_with(&[
        ("AUTH_MODE", "token"),
        ("TOKEN_SECRET", SECRET),
        ("TOKEN_TTL", "2s"),
    ]);
    let user = uniq("brief");
    let token = s.user_with_token(&user);
    let room = uniq("Brief");
    let path = format!("/ws/{}?token={}", enc(&room), enc(&token));
    let mut c = s.ws_path(&path);
    c.round_trip("while valid", WAIT);
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(
        s.ws_refused_status(&path, &[]),
        401,
        "token still accepted after its 2 s lifetime"
    );
    s.post_auth("/rooms", &json!({"name": uniq("Late")}), &token)
        .expect_error(401);
}

#[test]
fn open_mode_bad_tokens_are_401() {
    let s = Server::start_with(&[("TOKEN_SECRET", SECRET)]);
    let user = uniq("dan");
    s.register(&user, "correct horse battery");
    let room = uniq("OpenBad");
    for (what, t) in bad_tokens(&user) {
        let status = s.ws_refused_status(
            &format!(
                "/ws/{}?username={}&token={}",
                enc(&room),
                enc(&user),
                enc(&t)
            ),
            &[],
        );
        assert_eq!(status, 401, "open mode, {what} token on connect");
        let r = s.post_auth("/rooms", &json!({"name": room, "username": user}), &t);
        assert_eq!(
            r.status, 401,
            "open mode, POST /rooms with a {what} token: {r:?}"
        );
        let r = s.delete_auth(
            &format!("/rooms?name={}&username={}", enc(&room), enc(&user)),
            &t,
        );
        assert_eq!(
            r.status, 401,
            "open mode, DELETE with a {what} token: {r:?}"
        );
    }
    // Without any token, open mode works as the seed did.
    let mut c = s.ws(&room, &user);
    assert_eq!(c.round_trip("open", WAIT)["username"], user.as_str());
}

#[test]
fn open_mode_valid_token_wins_over_username() {
    let s = Server::start();
    let alice = uniq("alice");
    let bob = uniq("bob");
    let ta = s.user_with_token(&alice);
    let tb = s.user_with_token(&bob);
    let room = uniq("OpenTok");
    let mut c = s.ws_path(&format!(
        "/ws/{}?username=mallory&token={}",
        enc(&room),
        enc(&ta)
    ));
    assert_eq!(c.round_trip("signed", WAIT)["username"], alice.as_str());

    let room2 = uniq("OpenPost");
    let r = s.post_auth(
        "/rooms",
        &json!({"name": room2, "username": "mallory"}),
        &ta,
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["creator"], alice.as_str());
    // Bob's token claiming alice's name cannot delete alice's room.
    let q = format!("/rooms?name={}&username={}", enc(&room2), enc(&alice));
    s.delete_auth(&q, &tb)
        .expect_error_text(403, "Only the room creator can delete this room");
    assert_eq!(s.delete_auth(&q, &ta).status, 200);
}

#[test]
fn authorization_with_multibyte_characters_is_answered() {
    // Values whose byte 7, where a "Bearer " scheme ends, falls inside a
    // two-byte character (é): not Bearer credentials, so ignored like any
    // other scheme (open mode serves the request, token mode has no token).
    // And a Bearer token made of such characters: invalid, so 401.
    let request = |server: &Server, method: &str, room: &str, value: &str| {
        let (target, body) = match method {
            "POST" => (
                "/rooms".to_string(),
                format!(r#"{{"name":"{room}","username":"amy"}}"#),
            ),
            "GET" => (format!("/ws/{room}?username=amy"), String::new()),
            _ => (format!("/rooms?name={room}&username=amy"), String::new()),
        };
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n\
             {WS_UPGRADE_HEADERS}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw_request(server.addr(), req.as_bytes()).status
    };
    let open = Server::start_with(&[("TOKEN_SECRET", SECRET)]);
    let token = token_server();
    for value in ["Bearer\u{e9}token", "\u{e9}\u{e9}\u{e9}\u{e9}"] {
        let room = uniq("Straddle");
        for (method, want) in [("POST", 201), ("GET", 101), ("DELETE", 200)] {
            let got = request(&open, method, &room, value);
            assert_eq!(got, want, "open mode, {method} with {value:?}");
            let got = request(&token, method, &room, value);
            assert_eq!(got, 401, "token mode, {method} with {value:?}");
        }
    }
    let room = uniq("Straddle");
    for method in ["POST", "GET", "DELETE"] {
        for server in [&open, &token] {
            let got = request(server, method, &room, "Bearer \u{e9}\u{e9}\u{e9}");
            assert_eq!(
                got, 401,
                "{method} with a Bearer token of two-byte characters"
            );
        }
    }
    open.assert_still_serving();
    assert_eq!(token.get("/healthz").status, 200);
    assert!(!token.user_with_token(&uniq("amy")).is_empty());
}
