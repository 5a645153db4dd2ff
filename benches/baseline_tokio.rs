//! The baseline: ChatConnect's chat semantics written the usual way, as a
//! yardstick for the load generator.
//!
//! tokio with its default multi-threaded runtime, a task per connection,
//! tokio-tungstenite with its default configuration, one
//! `tokio::sync::broadcast` channel per room, JSON in and out with serde,
//! `seq` and `timestamp` assigned per room under the room's lock, the last
//! 50 messages kept in memory and sent on join, no database. Same URL shape
//! and message format as chatserver (`GET /ws/{room}?username=U`, client
//! sends `{"content":..}`, everyone receives
//! `{"room_id","username","content","timestamp","seq"}`), plus
//! `GET /rooms`, `POST /register` and `POST /login` (bcrypt on the blocking
//! pool), so the load generator drives it unchanged.
//!
//! Run: `PORT=0 HOST=127.0.0.1 BCRYPT_COST=10 cargo bench --bench
//! baseline_tokio`; it prints `listening on 127.0.0.1:PORT` on stderr.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const HISTORY: usize = 50;
const CHANNEL: usize = 1024;

struct Room {
    name: String,
    creator: String,
    created_at: String,
    tx: broadcast::Sender<String>,
    state: Mutex<RoomState>,
}

struct RoomState {
    seq: i64,
    history: VecDeque<String>,
}

#[derive(Default)]
struct Rooms {
    list: Vec<Arc<Room>>,
    by_name: HashMap<String, Arc<Room>>,
}

struct App {
    rooms: Mutex<Rooms>,
    users: Mutex<HashMap<String, String>>,
    cost: u32,
}

#[derive(Serialize)]
struct OutMsg<'a> {
    room_id: &'a str,
    username: &'a str,
    content: &'a str,
    timestamp: String,
    seq: i64,
}

#[derive(Deserialize)]
struct InMsg {
    content: String,
}

#[derive(Deserialize)]
struct Creds {
    username: String,
    #[serde(alias = "password")]
    password_hash: String,
}

#[tokio::main]
async fn main() {
    let host = std::env::var("HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = std::env::var("PORT")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "0".into());
    let cost = std::env::var("BCRYPT_COST")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(10);
    let addr: SocketAddr = match format!("{host}:{port}").parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("baseline: bad HOST/PORT: {e}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("baseline: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => eprintln!("baseline listening on {a}"),
        Err(e) => eprintln!("baseline: {e}"),
    }
    let app = Arc::new(App {
        rooms: Mutex::new(Rooms::default()),
        users: Mutex::new(HashMap::new()),
        cost,
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    handle(stream, app).await;
                });
            }
            Err(e) => {
                eprintln!("baseline: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl App {
    fn room(&self, name: &str, creator: &str) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if let Some(r) = rooms.by_name.get(name) {
            return r.clone();
        }
        let (tx, _) = broadcast::channel(CHANNEL);
        let room = Arc::new(Room {
            name: name.to_string(),
            creator: creator.to_string(),
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            tx,
            state: Mutex::new(RoomState {
                seq: 0,
                history: VecDeque::with_capacity(HISTORY),
            }),
        });
        rooms.list.push(room.clone());
        rooms.by_name.insert(name.to_string(), room.clone());
        room
    }
}

/// An HTTP connection: requests answered in turn until it upgrades or ends.
async fn handle(mut stream: TcpStream, app: Arc<App>) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // Read one request head (and its body).
        let (head_len, method, path, headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut hs);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("/").to_string(),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
                _ => {
                    let _ = respond(&mut stream, 400, "{\"error\":\"bad request\"}", false).await;
                    return;
                }
            }
            match tokio::time::timeout(Duration::from_secs(60), stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        let body_len: usize = header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if body_len > 64 * 1024 {
            let _ = respond(&mut stream, 413, "{\"error\":\"body too large\"}", false).await;
            return;
        }
        while buf.len() < head_len + body_len {
            match tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
        let body = buf[head_len..head_len + body_len].to_vec();
        buf.drain(..head_len + body_len);
        let keep_alive = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));

        if let (Some(room), Some(key)) = (route.strip_prefix("/ws/"), header("sec-websocket-key")) {
            if method != "GET" || room.is_empty() {
                let _ = respond(&mut stream, 400, "{\"error\":\"bad upgrade\"}", false).await;
                return;
            }
            let username = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("username="))
                .map(percent_decode)
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "Anonymous".into());
            let room = percent_decode(room);
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            let ws = WebSocketStream::from_partially_read(stream, buf, Role::Server, None).await;
            chat(ws, app, room, username).await;
            return;
        }

        let ok = match (method.as_str(), route) {
            ("GET", "/rooms") => {
                let list: Vec<serde_json::Value> = lock(&app.rooms)
                    .list
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r.name, "creator": r.creator, "created_at": r.created_at
                        })
                    })
                    .collect();
                let body = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
                respond(&mut stream, 200, &body, keep_alive).await
            }
            ("GET", "/healthz") => {
                respond(&mut stream, 200, "{\"status\":\"ok\"}", keep_alive).await
            }
            ("POST", "/register") => {
                let (status, body) = register(&app, &body).await;
                respond(&mut stream, status, &body, keep_alive).await
            }
            ("POST", "/login") => {
                let (status, body) = login(&app, &body).await;
                respond(&mut stream, status, &body, keep_alive).await
            }
            _ => respond(&mut stream, 404, "{\"error\":\"not found\"}", keep_alive).await,
        };
        if ok.is_err() || !keep_alive {
            return;
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" }
    );
    stream.write_all(resp.as_bytes()).await
}

async fn register(app: &Arc<App>, body: &[u8]) -> (u16, String) {
    let Ok(c) = serde_json::from_slice::<Creds>(body) else {
        return (400, "{\"error\":\"bad request\"}".into());
    };
    if lock(&app.users).contains_key(&c.username) {
        return (409, "{\"error\":\"Username already taken\"}".into());
    }
    let cost = app.cost;
    let hash = match tokio::task::spawn_blocking(move || bcrypt::hash(c.password_hash, cost)).await
    {
        Ok(Ok(h)) => h,
        _ => return (500, "{\"error\":\"hashing failed\"}".into()),
    };
    let mut users = lock(&app.users);
    if users.contains_key(&c.username) {
        return (409, "{\"error\":\"Username already taken\"}".into());
    }
    users.insert(c.username, hash);
    (200, "{\"message\":\"User registered successfully\"}".into())
}

async fn login(app: &Arc<App>, body: &[u8]) -> (u16, String) {
    let Ok(c) = serde_json::from_slice::<Creds>(body) else {
        return (400, "{\"error\":\"bad request\"}".into());
    };
    let hash = lock(&app.users).get(&c.username).cloned();
    let Some(hash) = hash else {
        return (401, "{\"error\":\"Invalid credentials\"}".into());
    };
    let pw = c.password_hash;
    match tokio::task::spawn_blocking(move || bcrypt::verify(pw, &hash)).await {
        Ok(Ok(true)) => (
            200,
            serde_json::json!({
                "message": "Login successful", "username": c.username, "token": "baseline"
            })
            .to_string(),
        ),
        _ => (401, "{\"error\":\"Invalid credentials\"}".into()),
    }
}

/// A WebSocket member of a room: history, then live traffic both ways.
async fn chat(ws: WebSocketStream<TcpStream>, app: Arc<App>, room_name: String, username: String) {
    let room = app.room(&room_name, &username);
    // Subscribe under the room lock: messages are numbered and sent under
    // the same lock, so nothing falls between the history and the live feed.
    let (history, mut rx) = {
        let st = lock(&room.state);
        (
            st.history.iter().cloned().collect::<Vec<_>>(),
            room.tx.subscribe(),
        )
    };
    let (mut sink, mut stream) = ws.split();
    for h in history {
        if sink.send(Message::text(h)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(text) => {
                    if sink.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Policy,
                            reason: "slow consumer".into(),
                        })))
                        .await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            f = stream.next() => match f {
                Some(Ok(Message::Text(t))) => {
                    let err = match serde_json::from_str::<InMsg>(t.as_str()) {
                        Err(_) => Some(r#"{"error":"invalid message","code":"invalid_json"}"#),
                        Ok(m) if m.content.trim().is_empty() => {
                            Some(r#"{"error":"content must not be empty","code":"empty_content"}"#)
                        }
                        Ok(m) if m.content.chars().count() > 4000 => {
                            Some(r#"{"error":"content too long","code":"too_long"}"#)
                        }
                        Ok(m) => {
                            let mut st = lock(&room.state);
                            st.seq += 1;
                            let json = serde_json::to_string(&OutMsg {
                                room_id: &room.name,
                                username: &username,
                                content: &m.content,
                                timestamp: now_rfc3339(),
                                seq: st.seq,
                            })
                            .unwrap_or_default();
                            if st.history.len() == HISTORY {
                                st.history.pop_front();
                            }
                            st.history.push_back(json.clone());
                            let _ = room.tx.send(json);
                            None
                        }
                    };
                    if let Some(e) = err {
                        if sink.send(Message::text(e)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
