//! The HTTP endpoints: routing, input checks, and the worker jobs that answer.
//!
//! Handlers run on the reactor thread and must stay cheap: they parse and
//! check the request, then either answer at once or return a job for a worker
//! lane (bcrypt on the hashing lane, everything else that touches the store on
//! the store lane). See `docs/API.md` for the contract they implement.
//!
//! `Api` holds what the handlers read (the configuration and the token
//! keys) and nothing of the reactor's own state: the reactor hands each
//! parsed request to `Api::route` and carries out the `Action` it returns.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::{self, Tokens};
use crate::config::{AuthMode, Config};
use crate::http::{percent_decode, query_decodes, Request, Response};
use crate::reactor::Outcome;
use crate::rooms::ConnRef;
use crate::store::{DeleteOutcome, Room, Store, StoreError, StoreResult};
use crate::web::Web;
use crate::workers::Job;
use crate::ws::{self, WireMessage};

/// Largest page of `GET /rooms/{name}/messages`.
pub const MAX_PAGE: usize = 200;
const DEFAULT_PAGE: usize = 50;

/// What a request handler decided.
pub(crate) enum Action {
    Reply(Response),
    /// Password hashing (and the store calls around it): the hashing lane.
    Hash(Job<Outcome>),
    /// Store calls: the store lane.
    Store(Job<Outcome>),
    /// Deleting `room`: the store lane, with the room's live entry fenced
    /// until the outcome is back (see `rooms::Room::deleting`).
    Delete {
        room: String,
        job: Job<Outcome>,
    },
    Upgrade(Upgrade),
}

/// A WebSocket upgrade that passed every check.
pub(crate) struct Upgrade {
    pub room: String,
    pub username: String,
    pub since: Option<i64>,
    pub accept: String,
}

type Answer = Result<Action, Response>;

/// OPTIONS answers 204; a method outside `allow` answers 405.
fn check_method(method: &str, allow: &'static str) -> Option<Response> {
    if method == "OPTIONS" {
        return Some(Response::no_content(allow));
    }
    let ok = allow
        .split(", ")
        .any(|m| m == method || (m == "GET" && method == "HEAD"));
    (!ok).then(|| Response::method_not_allowed(allow))
}

/// The body as a JSON object.
fn json_body(req: &Request) -> Result<Map<String, Value>, Response> {
    if req.body.is_empty() {
        return Err(Response::error(400, "Request body must be a JSON object"));
    }
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Response::error(400, "Request body must be a JSON object")),
        Err(e) => Err(Response::error(400, &format!("Invalid JSON: {e}"))),
    }
}

/// A string field: `Ok(None)` when absent or null, 400 when another type.
fn str_field<'a>(map: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Response> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Response::error(
            400,
            &format!("Field '{name}' must be a string"),
        )),
    }
}

/// `username` and password (`password_hash`, or its alias `password`) of a
/// register or login body.
fn credentials(req: &Request) -> Result<(String, String), Response> {
    let body = json_body(req)?;
    let username = str_field(&body, "username")?;
    let password = match str_field(&body, "password_hash")? {
        Some(p) => Some(p),
        None => str_field(&body, "password")?,
    };
    match (username, password) {
        (Some(u), Some(p)) => Ok((u.to_owned(), p.to_owned())),
        _ => Err(Response::error(
            400,
            "username and password_hash are required",
        )),
    }
}

/// A name someone claims in open mode. Looser than the registration rule,
/// so names written by the Go original keep working.
fn claimed_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Some("username must be 1 to 64 characters without control characters");
    }
    None
}

/// The endpoints and what they read.
pub(crate) struct Api {
    cfg: Arc<Config>,
    tokens: Tokens,
    /// The web client's files (`WEB_UI`).
    web: Option<Web>,
}

impl Api {
    pub(crate) fn new(cfg: Arc<Config>, tokens: Tokens) -> Api {
        let web = cfg.web_ui.then(|| Web::new(cfg.auth_mode));
        Api { cfg, tokens, web }
    }

    /// Decide what to do with a request of connection `conn`. `metrics`
    /// renders the `/metrics` page (the only answer that reads the
    /// reactor's state).
    pub(crate) fn route(
        &self,
        conn: ConnRef,
        req: &Request,
        metrics: &dyn Fn() -> String,
    ) -> Action {
        match self.route_inner(conn, req, metrics) {
            Ok(action) => action,
            Err(resp) => Action::Reply(resp),
        }
    }

    fn route_inner(&self, conn: ConnRef, req: &Request, metrics: &dyn Fn() -> String) -> Answer {
        let method = req.method.as_str();
        let path = req.path.as_str();
        if !query_decodes(&req.query) {
            return Err(Response::error(
                400,
                "Query string is not valid percent-encoded UTF-8",
            ));
        }
        let allowed = |allow: &'static str| match check_method(method, allow) {
            Some(resp) => Err(resp),
            None => Ok(()),
        };
        match path {
            "/register" => {
                allowed("POST, OPTIONS")?;
                self.register(conn, req)
            }
            "/login" => {
                allowed("POST, OPTIONS")?;
                self.login(conn, req)
            }
            "/rooms" => {
                allowed("GET, POST, DELETE, OPTIONS")?;
                match method {
                    "POST" => self.create_room(conn, req),
                    "DELETE" => self.delete_room(conn, req),
                    _ => Ok(Action::Store(Box::new(move |s: &dyn Store| {
                        Outcome::Rooms {
                            conn,
                            result: s.list_rooms(),
                        }
                    }))),
                }
            }
            "/healthz" => {
                allowed("GET, OPTIONS")?;
                Ok(Action::Reply(Response::json(
                    200,
                    &serde_json::json!({ "status": "ok" }),
                )))
            }
            "/readyz" => {
                allowed("GET, OPTIONS")?;
                Ok(Action::Store(Box::new(move |s: &dyn Store| {
                    let resp = match s.ping() {
                        Ok(()) => Response::json(200, &serde_json::json!({ "status": "ready" })),
                        Err(e) => {
                            log::warn!("readiness check failed: {e}");
                            Response::error(503, "Storage is unavailable")
                        }
                    };
                    Outcome::Http { conn, resp }
                })))
            }
            "/metrics" => {
                allowed("GET, OPTIONS")?;
                Ok(Action::Reply(Response::text(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics(),
                )))
            }
            "/ws" => {
                allowed("GET, OPTIONS")?;
                Err(Response::error(
                    400,
                    "Room name required: connect to /ws/{room}",
                ))
            }
            _ => {
                if let Some(rest) = path.strip_prefix("/ws/") {
                    allowed("GET, OPTIONS")?;
                    return self.ws_upgrade(req, rest);
                }
                if let Some(name) = path
                    .strip_prefix("/rooms/")
                    .and_then(|p| p.strip_suffix("/messages"))
                {
                    allowed("GET, OPTIONS")?;
                    return self.room_messages(conn, req, name);
                }
                if let Some(asset) = self.web.as_ref().and_then(|w| w.asset(path)) {
                    allowed("GET, OPTIONS")?;
                    return Ok(Action::Reply(asset.answer(req)));
                }
                Err(Response::error(404, "Not found"))
            }
        }
    }

    /// Who is asking. A token, when sent, must be valid and wins; in token
    /// mode one is required; otherwise the claimed name (if any) is used.
    fn identity(&self, req: &Request, claimed: Option<&str>) -> Result<Option<String>, Response> {
        if let Some(token) = req.bearer_token() {
            return match self.tokens.verify(&token) {
                Some(user) => Ok(Some(user)),
                None => Err(Response::error(401, "Invalid or expired token")),
            };
        }
        if self.cfg.auth_mode == AuthMode::Token {
            return Err(Response::error(
                401,
                "Authentication required: send Authorization: Bearer <token> (from POST /login)",
            ));
        }
        match claimed {
            None => Ok(None),
            Some(name) => match claimed_name_problem(name) {
                Some(why) => Err(Response::error(400, why)),
                None => Ok(Some(name.to_owned())),
            },
        }
    }

    fn register(&self, conn: ConnRef, req: &Request) -> Answer {
        let (username, password) = credentials(req)?;
        if let Some(why) = auth::username_problem(&username) {
            return Err(Response::error(400, why));
        }
        if auth::is_reserved(&username) {
            return Err(Response::error(400, "username 'Anonymous' is reserved"));
        }
        if let Some(why) = auth::password_problem(&password) {
            return Err(Response::error(400, why));
        }
        let cost = self.cfg.bcrypt_cost;
        Ok(Action::Hash(Box::new(move |store: &dyn Store| {
            // A taken name is refused before spending a hash on it; the
            // unique key still decides any race.
            let resp = match store.password_hash(&username) {
                Ok(Some(_)) => Response::error(409, "Username already taken"),
                Err(e) => store_error_response(&e),
                Ok(None) => match bcrypt::hash(&password, cost) {
                    Err(e) => {
                        log::error!("bcrypt failed: {e}");
                        Response::error(500, "Could not hash the password")
                    }
                    Ok(hash) => match store.create_user(&username, &hash) {
                        Ok(()) => {
                            log::info!("registered user {username}");
                            Response::message(200, "User registered successfully")
                        }
                        Err(StoreError::Conflict) => Response::error(409, "Username already taken"),
                        Err(e) => store_error_response(&e),
                    },
                },
            };
            Outcome::Http { conn, resp }
        })))
    }

    fn login(&self, conn: ConnRef, req: &Request) -> Answer {
        let (username, password) = credentials(req)?;
        // bcrypt reads 72 bytes and ignores the rest, so a longer password
        // would log in as its first 72 bytes; no account has one (register
        // refuses them, as the original's bcrypt did). No minimum here:
        // accounts the original made may have shorter passwords.
        if password.len() > auth::MAX_PASSWORD_BYTES {
            return Err(Response::error(401, "Invalid credentials"));
        }
        let cost = self.cfg.bcrypt_cost;
        let tokens: Tokens = self.tokens.clone();
        Ok(Action::Hash(Box::new(move |store: &dyn Store| {
            let stored = match store.password_hash(&username) {
                Ok(h) => h,
                Err(e) => {
                    return Outcome::Http {
                        conn,
                        resp: store_error_response(&e),
                    }
                }
            };
            // An unknown user costs one verification too, so the answer's
            // timing does not tell which names exist.
            // So does a stored value that is no bcrypt hash (an account of
            // the original without one) or one of absurd cost.
            let cost_limit = cost.max(auth::MAX_VERIFY_COST);
            let checkable = stored.as_deref().filter(|h| match auth::hash_cost(h) {
                Some(c) if c > cost_limit => {
                    log::warn!(
                        "the stored password hash of {username:?} has a bcrypt cost above {cost_limit}; refusing to verify it"
                    );
                    false
                }
                Some(_) => true,
                None => false,
            });
            let ok = match checkable {
                Some(hash) => bcrypt::verify(&password, hash).unwrap_or(false),
                None => {
                    let _ = bcrypt::verify(&password, auth::dummy_hash(cost));
                    false
                }
            };
            let resp = if !ok {
                Response::error(401, "Invalid credentials")
            } else {
                match tokens.issue(&username) {
                    Ok(token) => Response::json(
                        200,
                        &serde_json::json!({
                            "message": "Login successful",
                            "username": username,
                            "token": token,
                        }),
                    ),
                    Err(e) => {
                        log::error!("cannot sign a token: {e}");
                        Response::error(500, "Could not issue a token")
                    }
                }
            };
            Outcome::Http { conn, resp }
        })))
    }

    fn create_room(&self, conn: ConnRef, req: &Request) -> Answer {
        let body = json_body(req)?;
        let name = str_field(&body, "name")?;
        let claimed = str_field(&body, "username")?;
        let creator = self.identity(req, claimed)?;
        let Some(name) = name else {
            return Err(Response::error(400, "Room name required"));
        };
        if let Some(why) = auth::room_name_problem(name) {
            return Err(Response::error(400, why));
        }
        let Some(creator) = creator else {
            return Err(Response::error(400, "Room name and username required"));
        };
        let room = Room {
            name: name.to_owned(),
            creator,
            created_at: ws::now_millis(),
        };
        Ok(Action::Store(Box::new(move |store: &dyn Store| {
            let resp = match store.create_room(&room) {
                Ok(()) => Response::json(201, &room_json(&room)),
                Err(StoreError::Conflict) => Response::error(409, "Room already exists"),
                Err(e) => store_error_response(&e),
            };
            Outcome::Http { conn, resp }
        })))
    }

    fn delete_room(&self, conn: ConnRef, req: &Request) -> Answer {
        let name = req.query_param("name").filter(|n| !n.is_empty());
        let claimed = req.query_param("username").filter(|n| !n.is_empty());
        let requester = self.identity(req, claimed.as_deref())?;
        let (Some(name), Some(requester)) = (name, requester) else {
            return Err(Response::error(400, "Room name and username required"));
        };
        let room = name.clone();
        let job: Job<Outcome> = Box::new(move |store: &dyn Store| {
            let (resp, deleted) = match store.delete_room(&name, &requester) {
                Ok(DeleteOutcome::Deleted) => {
                    log::info!("room {name:?} deleted by {requester}");
                    (Response::message(200, "Room deleted successfully"), true)
                }
                Ok(DeleteOutcome::NotFound) => (Response::error(404, "Room not found"), false),
                Ok(DeleteOutcome::Forbidden) => (
                    Response::error(403, "Only the room creator can delete this room"),
                    false,
                ),
                Err(e) => (store_error_response(&e), false),
            };
            Outcome::Deleted {
                conn,
                room: name,
                resp,
                deleted,
            }
        });
        Ok(Action::Delete { room, job })
    }

    fn room_messages(&self, conn: ConnRef, req: &Request, encoded: &str) -> Answer {
        let Some(name) = percent_decode(encoded, false) else {
            return Err(Response::error(
                400,
                "Room name is not valid percent-encoded UTF-8",
            ));
        };
        if let Some(why) = auth::room_name_problem(&name) {
            return Err(Response::error(400, why));
        }
        let limit = match req.query_param("limit") {
            None => DEFAULT_PAGE,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n.min(MAX_PAGE),
                _ => {
                    return Err(Response::error(
                        400,
                        "limit must be a whole number from 1 to 200",
                    ))
                }
            },
        };
        let before = match req.query_param("before") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => return Err(Response::error(400, "before must be a message seq number")),
            },
        };
        Ok(Action::Store(Box::new(move |store: &dyn Store| {
            let resp = match store.get_room(&name) {
                Ok(None) => Response::error(404, "Room not found"),
                Err(e) => store_error_response(&e),
                Ok(Some(_)) => match store.messages_before(&name, before, limit) {
                    Ok(page) => {
                        let list: Vec<WireMessage<'_>> =
                            page.iter().map(WireMessage::from).collect();
                        Response::json(200, &list)
                    }
                    Err(e) => store_error_response(&e),
                },
            };
            Outcome::Http { conn, resp }
        })))
    }

    fn ws_upgrade(&self, req: &Request, encoded: &str) -> Answer {
        if encoded.is_empty() {
            return Err(Response::error(
                400,
                "Room name required: connect to /ws/{room}",
            ));
        }
        let Some(room) = percent_decode(encoded, false) else {
            return Err(Response::error(
                400,
                "Room name is not valid percent-encoded UTF-8",
            ));
        };
        if let Some(why) = auth::room_name_problem(&room) {
            return Err(Response::error(400, why));
        }
        if !req.wants_websocket {
            return Err(Response::error(
                426,
                "This endpoint needs a WebSocket upgrade (Upgrade: websocket)",
            ));
        }
        if req.method != "GET" {
            return Err(Response::error(400, "A WebSocket upgrade must be a GET"));
        }
        if req.ws_version.as_deref() != Some("13") {
            return Err(Response::error(
                400,
                "Unsupported WebSocket version; use 13",
            ));
        }
        let Some(key) = req.ws_key.as_deref().filter(|k| !k.is_empty()) else {
            return Err(Response::error(400, "Missing Sec-WebSocket-Key"));
        };
        let claimed = req.query_param("username").filter(|n| !n.is_empty());
        let username = self
            .identity(req, claimed.as_deref())?
            .unwrap_or_else(|| auth::ANONYMOUS.to_owned());
        let since = match req.query_param("since") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 0 => Some(n),
                _ => return Err(Response::error(400, "since must be a message seq number")),
            },
        };
        Ok(Action::Upgrade(Upgrade {
            room,
            username,
            since,
            accept: ws::accept_key(key),
        }))
    }
}

/// A room as clients see it (the seed's fields, in the seed's order).
#[derive(serde::Serialize)]
pub(crate) struct RoomOut<'a> {
    name: &'a str,
    creator: &'a str,
    created_at: String,
    /// Live WebSocket members, on every process (room list only).
    #[serde(skip_serializing_if = "Option::is_none")]
    members: Option<u64>,
}

pub(crate) fn room_json(r: &Room) -> RoomOut<'_> {
    RoomOut {
        name: &r.name,
        creator: &r.creator,
        created_at: ws::rfc3339_seconds(r.created_at),
        members: None,
    }
}

/// The answer to `GET /rooms`: the stored rooms, each with its live member
/// count (`members`, from the reactor's census).
pub(crate) fn room_list(result: StoreResult<Vec<Room>>, members: impl Fn(&str) -> u64) -> Response {
    match result {
        Ok(rooms) => {
            let list: Vec<RoomOut<'_>> = rooms
                .iter()
                .map(|r| RoomOut {
                    members: Some(members(&r.name)),
                    ..room_json(r)
                })
                .collect();
            Response::json(200, &list)
        }
        Err(e) => store_error_response(&e),
    }
}

/// The HTTP answer for a failed store call.
pub(crate) fn store_error_response(e: &StoreError) -> Response {
    match e {
        StoreError::Conflict => Response::error(409, "Already exists"),
        StoreError::NoSuchRoom => Response::error(404, "Room not found"),
        StoreError::Unavailable(why) => {
            log::warn!("store unavailable: {why}");
            Response::error(503, "Storage is unavailable; try again shortly")
        }
    }
}
