//! The web client at `/` in a real browser: Debian's `chromium`, headless,
//! driven over the DevTools protocol (the `headless_chrome` crate), against
//! the real binary. Two browsers register, log in, make a room and talk
//! both ways; a reload resumes without duplicates; a server restart under
//! an open page is recovered from, with what was sent meanwhile shown once;
//! user content that looks like HTML stays text; token mode logs in and
//! refuses a wrong password; a room deleted from the page sends its members
//! back to the list; scrolling up pages through older messages, and an
//! error frame shows in the room. The tests fail, never skip, when Chromium cannot start
//! (`scripts/test.sh` installs it).
//!
//! The desktop and phone screenshots in `docs/screenshots/` come from
//! here: set `UPDATE_SCREENSHOTS=1` to write them there (otherwise they go
//! to `target/screenshots/`).

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use headless_chrome::protocol::cdp::Emulation;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::Value;

/// One browser at a time: each is several processes, and the machine may
/// have two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);
const PAGE_WAIT: Duration = Duration::from_secs(20);

fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: the browser tests need Chromium (scripts/test.sh installs Debian's \
         chromium; or set CHROMIUM to its path)",
        path.display()
    );
    path
}

/// A headless Chromium with a fresh profile (so two of them are two users).
fn browser(size: (u32, u32)) -> Browser {
    let options = LaunchOptions::default_builder()
        .path(Some(chromium()))
        .headless(true)
        // Root in a container: Chromium's sandbox cannot start.
        .sandbox(false)
        .window_size(Some(size))
        .idle_browser_timeout(Duration::from_secs(300))
        .build()
        .expect("launch options");
    Browser::new(options).unwrap_or_else(|e| panic!("Chromium did not start: {e}"))
}

/// A tab of `browser` showing the web client of `server`.
fn open(browser: &Browser, server: &Server) -> Arc<Tab> {
    let tab = browser.new_tab().expect("new tab");
    tab.set_default_timeout(PAGE_WAIT);
    tab.navigate_to(&format!("{}/", server.base_url()))
        .expect("navigate");
    tab.wait_until_navigated().expect("page loaded");
    tab
}

/// The value of a JavaScript expression in the page.
fn eval(tab: &Tab, js: &str) -> Value {
    let r = tab
        .evaluate(js, false)
        .unwrap_or_else(|e| panic!("evaluate {js}: {e}"));
    r.value.unwrap_or(Value::Null)
}

/// Wait until a JavaScript expression is true; panics with `what` and the
/// page's text after [`PAGE_WAIT`].
fn wait_for(tab: &Tab, js: &str, what: &str) {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        if eval(tab, js) == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let text = eval(tab, "document.body.innerText");
            panic!("waited {PAGE_WAIT:?} for {what}; the page shows:\n{text}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Click the element `selector`.
fn click(tab: &Tab, selector: &str) {
    tab.wait_for_element(selector)
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .unwrap_or_else(|e| panic!("click {selector}: {e}"));
}

/// Type into the element `selector` as a user would (it gets the focus).
fn type_into(tab: &Tab, selector: &str, text: &str) {
    click(tab, selector);
    tab.type_str(text).expect("type");
}

fn visible(id: &str) -> String {
    format!("!document.getElementById('{id}').hidden")
}

/// Register `name` through the sign-in form, which logs in after.
fn register_in_page(tab: &Tab, name: &str) {
    wait_for(tab, &visible("signin"), "the sign-in form");
    type_into(tab, "#username", name);
    type_into(tab, "#password", "password1");
    click(tab, "#register");
    wait_for(tab, &visible("lobby"), "the room list after registering");
}

/// A JavaScript expression: the item of `room` in the room list, or
/// `undefined` while it is not listed.
fn listed(room: &str) -> String {
    format!(
        "[...document.querySelectorAll('#rooms .room-item')].find(li => \
         li.querySelector('.room-link').textContent === {})",
        serde_json::to_string(room).unwrap()
    )
}

/// Open `room` from the list (it must be listed) and wait until live.
fn enter_from_list(tab: &Tab, room: &str) {
    let item = listed(room);
    wait_for(tab, &format!("!!({item})"), "the room in the list");
    eval(
        tab,
        &format!("({item}).querySelector('.room-link').click(), true"),
    );
    wait_live(tab);
}

/// Make `room` from the list's form with the keyboard (its name, then
/// Enter), which opens it; wait until live.
fn create_in_page(tab: &Tab, room: &str) {
    type_into(tab, "#room-name", room);
    tab.press_key("Enter").expect("Enter");
    wait_live(tab);
}

fn wait_live(tab: &Tab) {
    wait_for(
        tab,
        "document.getElementById('state').dataset.state === 'live'",
        "the room to be live",
    );
}

/// Send a message the way a user does: type it, press Enter.
fn say(tab: &Tab, text: &str) {
    type_into(tab, "#text", text);
    tab.press_key("Enter").expect("Enter");
}

/// The messages the page shows: (seq, author, text, marked as mine).
fn shown(tab: &Tab) -> Vec<(i64, String, String, bool)> {
    let v = eval(
        tab,
        "JSON.stringify([...document.querySelectorAll('#messages .msg')].map(li => \
         [Number(li.dataset.seq), li.querySelector('.author').textContent, \
          li.querySelector('.content').textContent, li.classList.contains('mine')]))",
    );
    let rows: Vec<(i64, String, String, bool)> =
        serde_json::from_str(v.as_str().expect("a JSON string")).expect("rows");
    rows
}

fn wait_shown(tab: &Tab, text: &str) {
    let js = format!(
        "[...document.querySelectorAll('#messages .content')].some(p => p.textContent === {})",
        serde_json::to_string(text).unwrap()
    );
    wait_for(tab, &js, &format!("the message {text:?}"));
}

/// Every message once, in order: seqs strictly rising with no gap.
fn assert_once_in_order(rows: &[(i64, String, String, bool)]) {
    for w in rows.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "gap or duplicate in {rows:?}");
    }
}

/// A phone's viewport (a headless window is at least 500 px wide, so the
/// width is emulated), then the page loaded again under it.
fn phone_viewport(tab: &Tab) {
    tab.call_method(Emulation::SetDeviceMetricsOverride {
        width: PHONE.0,
        height: PHONE.1,
        device_scale_factor: 1.0,
        mobile: true,
        scale: None,
        screen_width: None,
        screen_height: None,
        position_x: None,
        position_y: None,
        dont_set_visible_size: None,
        screen_orientation: None,
        viewport: None,
        display_feature: None,
        device_posture: None,
    })
    .expect("phone viewport");
    tab.reload(false, None).expect("reload");
    tab.wait_until_navigated().expect("reloaded");
}

fn screenshot(tab: &Tab, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let dir = if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
    };
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

#[test]
fn two_browsers_talk_both_ways_and_a_reload_resumes_without_duplicates() {
    let _one = serial();
    let server = Server::start();
    let room = uniq("Garden");

    let a = browser(DESKTOP);
    let ta = open(&a, &server);
    // The page and its files carry the promised headers.
    let r = server.get("/");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-security-policy")
        .is_some_and(|v| v.contains("script-src 'self'")));
    register_in_page(&ta, "alice");
    // Keyboard only: the name field, then Enter.
    create_in_page(&ta, &room);
    say(&ta, "hello from alice");
    wait_shown(&ta, "hello from alice");

    let b = browser(DESKTOP);
    let tb = open(&b, &server);
    register_in_page(&tb, "bob");
    enter_from_list(&tb, &room);
    wait_shown(&tb, "hello from alice");
    say(&tb, "hi alice, bob here");
    wait_shown(&ta, "hi alice, bob here");
    say(&ta, "nice to see you");
    wait_shown(&tb, "nice to see you");

    // Own messages are marked, others' are not.
    let seen_by_a = shown(&ta);
    let seen_by_b = shown(&tb);
    assert_eq!(seen_by_a.len(), 3, "{seen_by_a:?}");
    assert_eq!(seen_by_a, {
        let mut v = seen_by_b.clone();
        for row in &mut v {
            row.3 = row.1 == "alice";
        }
        v
    });
    assert!(seen_by_b.iter().all(|r| r.3 == (r.1 == "bob")));
    assert_once_in_order(&seen_by_a);

    // A reload comes back to the room, shows each message once, and goes on.
    tb.reload(false, None).expect("reload");
    tb.wait_until_navigated().expect("reloaded");
    wait_live(&tb);
    wait_shown(&tb, "nice to see you");
    say(&ta, "after the reload");
    wait_shown(&tb, "after the reload");
    let after = shown(&tb);
    assert_eq!(after.len(), 4, "{after:?}");
    assert_once_in_order(&after);

    // The room list counts both members (refreshed while shown).
    let c = browser(DESKTOP);
    let tc = open(&c, &server);
    register_in_page(&tc, "carol");
    let meta = format!(
        "!!({item}) && ({item}).querySelector('.meta').textContent.startsWith('2 online')",
        item = listed(&room)
    );
    wait_for(&tc, &meta, "2 members listed");
    screenshot(&tc, "desktop-rooms.png");
    screenshot(&ta, "desktop-room.png");

    // At phone width the same room is readable.
    let p = browser(PHONE);
    let tp = open(&p, &server);
    phone_viewport(&tp);
    register_in_page(&tp, "dora");
    enter_from_list(&tp, &room);
    wait_shown(&tp, "after the reload");
    assert_eq!(eval(&tp, "window.innerWidth"), Value::from(PHONE.0));
    let fits = eval(
        &tp,
        "document.documentElement.scrollWidth <= window.innerWidth",
    );
    assert_eq!(
        fits,
        Value::Bool(true),
        "the page scrolls sideways at 390 px"
    );
    screenshot(&tp, "phone-room.png");
}

#[test]
fn a_server_restart_under_an_open_page_is_recovered_with_nothing_twice() {
    let _one = serial();
    let port = service::free_port().to_string();
    let mut server = Server::start_with(&[("PORT", &port)]);
    let room = uniq("restart");
    let b = browser(DESKTOP);
    let tab = open(&b, &server);
    register_in_page(&tab, "erin");
    create_in_page(&tab, &room);
    say(&tab, "before the restart");
    wait_shown(&tab, "before the restart");

    server.restart();
    // Sent as soon as the server is back, before the page's first retry
    // has necessarily come: the page gets these through `since=`.
    let mut other = server.ws(&room, "frank");
    for k in 0..3 {
        other.round_trip(&format!("meanwhile {k}"), WAIT);
    }
    wait_live(&tab);
    wait_shown(&tab, "meanwhile 2");
    say(&tab, "after the restart");
    wait_shown(&tab, "after the restart");
    let rows = shown(&tab);
    let texts: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(
        texts,
        [
            "before the restart",
            "meanwhile 0",
            "meanwhile 1",
            "meanwhile 2",
            "after the restart"
        ],
        "{rows:?}"
    );
    assert_once_in_order(&rows);
}

#[test]
fn content_that_looks_like_html_is_shown_as_text_and_runs_nothing() {
    let _one = serial();
    let server = Server::start();
    let evil_room = "<img src=x onerror=alert(1)>";
    let evil_text = "<img src=x onerror=\"window.__pwned = 1\"><script>window.__pwned = 2</script>";
    let r = server.post(
        "/rooms",
        &serde_json::json!({"name": evil_room, "username": "mallory"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let mut m = server.ws(evil_room, "<b>mallory</b>");
    m.round_trip(evil_text, WAIT);

    let b = browser(DESKTOP);
    let tab = open(&b, &server);
    register_in_page(&tab, "grace");
    enter_from_list(&tab, evil_room);
    wait_shown(&tab, evil_text);
    assert_eq!(
        eval(&tab, "document.getElementById('room-title').textContent"),
        Value::String(evil_room.into())
    );
    let rows = shown(&tab);
    assert_eq!(rows[0].1, "<b>mallory</b>");
    assert_eq!(
        eval(
            &tab,
            "document.querySelectorAll('main img, main script, main b').length"
        ),
        Value::from(0)
    );
    assert_eq!(
        eval(&tab, "window.__pwned === undefined"),
        Value::Bool(true)
    );
}

#[test]
fn token_mode_logs_in_with_a_token_and_refuses_a_wrong_password() {
    let _one = serial();
    let server = Server::start_with(&[("AUTH_MODE", "token")]);
    server.register("heidi", "password1");
    let b = browser(DESKTOP);
    let tab = open(&b, &server);
    wait_for(&tab, &visible("signin"), "the sign-in form");
    // No way in without a password in token mode.
    assert_eq!(
        eval(&tab, "document.getElementById('guest').hidden"),
        Value::Bool(true)
    );
    type_into(&tab, "#username", "heidi");
    type_into(&tab, "#password", "wrong password");
    tab.press_key("Enter").expect("Enter");
    wait_for(
        &tab,
        "document.getElementById('signin-error').textContent.includes('Invalid credentials')",
        "the refusal",
    );
    assert_eq!(eval(&tab, "localStorage.length"), Value::from(0));

    eval(&tab, "document.getElementById('password').value = '', true");
    type_into(&tab, "#password", "password1");
    tab.press_key("Enter").expect("Enter");
    wait_for(&tab, &visible("lobby"), "the room list after logging in");
    let stored = eval(
        &tab,
        "JSON.parse(localStorage.getItem('chatconnect.session')).token",
    );
    let token = stored.as_str().expect("the page keeps the token");
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    // Room creation and the WebSocket both need the token here.
    let room = uniq("vault");
    type_into(&tab, "#room-name", &room);
    click(&tab, "#create");
    wait_live(&tab);
    say(&tab, "signed by a token");
    wait_shown(&tab, "signed by a token");
    let rows = shown(&tab);
    assert_eq!(rows[0].1, "heidi");
    let listed = server.rooms();
    let made = listed
        .iter()
        .find(|r| r["name"] == room.as_str())
        .expect("listed");
    assert_eq!(made["creator"], "heidi");

    // A kept token that has expired sends the page back to the sign-in
    // form instead of retrying a connection the server refuses.
    eval(
        &tab,
        "localStorage.setItem('chatconnect.session', JSON.stringify({username: 'heidi', \
         token: 'e30.' + btoa(JSON.stringify({sub: 'heidi', exp: 1})).replace(/=+$/, '') + '.x'})), true",
    );
    tab.reload(false, None).expect("reload");
    tab.wait_until_navigated().expect("reloaded");
    wait_for(
        &tab,
        &visible("signin"),
        "the sign-in form for an expired token",
    );
    wait_for(
        &tab,
        "document.getElementById('notice').textContent.includes('expired')",
        "the notice",
    );
}

#[test]
fn a_room_deleted_from_the_page_sends_its_members_back_to_the_list() {
    let _one = serial();
    let server = Server::start();
    let room = uniq("short-lived");
    let a = browser(DESKTOP);
    let owner = open(&a, &server);
    register_in_page(&owner, "ivan");
    create_in_page(&owner, &room);
    click(&owner, "#back");
    wait_for(&owner, &visible("lobby"), "the list");

    let b = browser(DESKTOP);
    let member = open(&b, &server);
    register_in_page(&member, "judy");
    // Only the creator is offered the delete button.
    let rooms_js = listed(&room);
    wait_for(&member, &format!("!!({rooms_js})"), "the room listed");
    assert_eq!(
        eval(
            &member,
            &format!("!!({rooms_js}).querySelector('[data-del]')")
        ),
        Value::Bool(false)
    );
    enter_from_list(&member, &room);
    say(&member, "still here");
    wait_shown(&member, "still here");

    wait_for(
        &owner,
        &format!("!!({rooms_js}) && ({rooms_js}).querySelector('.meta').textContent.startsWith('1 online')"),
        "the member counted",
    );
    // Two clicks: the first arms the button.
    eval(
        &owner,
        &format!("({rooms_js}).querySelector('[data-del]').click(), true"),
    );
    eval(
        &owner,
        &format!("({rooms_js}).querySelector('[data-del]').click(), true"),
    );
    wait_for(
        &owner,
        &format!("!({rooms_js})"),
        "the room gone from the list",
    );

    wait_for(&member, &visible("lobby"), "the member back at the list");
    wait_for(
        &member,
        "document.getElementById('notice').textContent.includes('was deleted')",
        "the notice",
    );
    assert!(!server.rooms().iter().any(|r| r["name"] == room.as_str()));
}

#[test]
fn older_messages_load_on_scrolling_up_and_error_frames_show_in_place() {
    let _one = serial();
    let server = Server::start_with(&[("WS_RATE_LIMIT", "0"), ("MAX_MESSAGE_CHARS", "40")]);
    let room = uniq("long-history");
    let mut writer = server.ws(&room, "archivist");
    for k in 1..=120 {
        writer.send_content(&format!("old message {k}"));
    }
    let _ = writer.recv_n(120, Duration::from_secs(30));

    let b = browser(DESKTOP);
    let tab = open(&b, &server);
    register_in_page(&tab, "kim");
    enter_from_list(&tab, &room);
    wait_shown(&tab, "old message 120");
    assert_eq!(shown(&tab).len(), 50, "the newest page first");
    // Scrolling to the top loads the pages before it, until the first.
    for want in [100, 120] {
        eval(
            &tab,
            "document.getElementById('messages').scrollTop = 0, true",
        );
        wait_for(
            &tab,
            &format!("document.querySelectorAll('#messages .msg').length === {want}"),
            &format!("{want} messages after scrolling up"),
        );
    }
    let rows = shown(&tab);
    assert_eq!(rows[0].2, "old message 1");
    assert_once_in_order(&rows);
    wait_for(
        &tab,
        "document.getElementById('older').hidden",
        "no more to load",
    );

    // A message over the server's limit: its error frame is shown in the
    // room, and the connection goes on.
    say(&tab, "this message is far longer than forty characters");
    wait_for(
        &tab,
        "[...document.querySelectorAll('#messages .system.error')].some(li => li.textContent.includes('too long'))",
        "the error frame",
    );
    say(&tab, "short one");
    wait_shown(&tab, "short one");
}
