//! The MongoDB store, through the `mongodb` crate's synchronous API (worker
//! threads only).
//!
//! Documents keep the Go original's collections and field names, so this
//! server can take over a database the original wrote:
//! `users {username, password_hash}`, `rooms {name, creator, created_at}`,
//! `messages {room_id, username, content, timestamp, seq}` (dates as BSON
//! dates). The original's messages have no `seq`: the first time a room is
//! used, its seq-less messages are numbered 1, 2, ... in timestamp order, and
//! new messages continue after them.
//!
//! Sequence numbers are allocated without transactions (MongoDB-wire servers
//! such as FerretDB do not have them, and a standalone MongoDB neither): a
//! batch is inserted with the next numbers under a unique `(room_id, seq)`
//! index, and when another process took some of those numbers first, the
//! insert stops at the clash and the rest is retried above the new highest
//! `seq`. Several processes can therefore write to one room at once and every
//! message still gets a distinct number in one order.
//!
//! Where numbering goes on is known without asking the messages: from what
//! this process wrote, and otherwise from the room document's `last_seq`
//! (this server's extension of the original's room document). A write
//! raises `last_seq` (never lowers it) to the highest number it stored: a
//! room's first write in a process, then at most once every ten seconds
//! while the room is busy (`RAISE_EVERY`), and at once over the numbers of a failed
//! write. It is a guess like any other: too low (writes of the last seconds
//! in another process, or a raise that was lost) costs a clash and a retry
//! above the highest stored `seq`. Its presence also says the room's legacy
//! messages are numbered. So a write reads the room documents it needs
//! (one query for all its rooms), inserts, and checks its rooms still exist
//! (one query, or the command raising `last_seq`, or both): at most four
//! commands whatever the number of rooms (five right after a failed write
//! whose raise was lost), none of them on the messages but the insert,
//! unless it clashed or a room has no `last_seq` yet (a room of the Go
//! original or of an earlier version of this server, once). Which
//! query uses which index, and what FerretDB makes of each:
//! docs/STORE_QUERIES.md.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::sync::{Client, Collection, Database};
use mongodb::IndexModel;
use mongodb::ServerType;

use super::{
    append_each, DeleteOutcome, Millis, NewMessage, Room, RoomBatch, Store, StoreError,
    StoreResult, StoredMessage,
};

/// Connections the client may open when MONGO_URI does not say
/// (`maxPoolSize`): enough for every store thread at once.
const POOL_SIZE: u32 = 64;

/// The collection where running server processes announce themselves
/// (`crate::presence`).
const INSTANCES: &str = "instances";

/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11000;
/// "Not implemented" (FerretDB answers it for partial indexes).
const NOT_IMPLEMENTED: i32 = 238;
/// Attempts at placing a batch before giving up (each lost race means
/// another process stored messages in between, so this is never reached in
/// practice).
const MAX_ATTEMPTS: usize = 100;

pub struct MongoStore {
    db: Database,
    users: Collection<Document>,
    rooms: Collection<Document>,
    messages: Collection<Document>,
    /// Indexes exist (created at start, or by the first call after the
    /// database came back). Cleared whenever the driver loses the server,
    /// since the database that comes back may be a new, empty one.
    prepared: Arc<AtomicBool>,
    /// Times the driver lost the server: `prepare` keeps its result only if
    /// this did not change while it ran.
    losses: Arc<AtomicU64>,
    /// Usernames and room names have unique indexes. Without one (the
    /// database already held duplicates), creating a user or a room is a
    /// lookup then an insert, and `claims` makes that pair one step for
    /// this process's threads.
    users_unique: AtomicBool,
    rooms_unique: AtomicBool,
    claims: Mutex<()>,
    /// Rooms whose legacy messages are numbered, in this process.
    numbered: Mutex<HashSet<String>>,
    /// Rooms a thread has claimed for numbering: `false` while it checks
    /// whether there is anything to number, `true` while it numbers. Calls
    /// arriving meanwhile wait for the check, and for the numbering only
    /// when told to.
    numbering: Mutex<HashMap<String, bool>>,
    /// What this process knows of each room's numbering: the highest `seq`
    /// it stored or retired, for the room document (`_id`) it belongs to (a
    /// room deleted and created again by another process has a new `_id`,
    /// so the guess of the old room, too high, which no clash would reveal,
    /// is not used for it), and how far it raised that document's
    /// `last_seq`.
    last_seq: Mutex<HashMap<String, Known>>,
    /// The highest seq other processes said (through the broker) they
    /// stored, per room: where this process's next write starts, so that
    /// two processes writing one room do not clash on every write.
    heard: Mutex<HashMap<String, i64>>,
}

/// How many multi-room inserts one `append_many` tries, each without the
/// room that clashed in the one before.
const TOGETHER_TRIES: usize = 4;

/// What became of a multi-room insert (`MongoStore::append_together`).
enum Together {
    /// Written: each room's result, in order.
    Written(Vec<StoreResult<Vec<StoredMessage>>>),
    /// Nothing written, because of a numbering clash in the batch at this
    /// index (when the server says which).
    Clashed(Option<usize>),
}

/// Rooms `heard` remembers at most; past it, it starts again (it is only a
/// hint: without it a write clashes once and renumbers).
const HEARD_MAX: usize = 100_000;

/// One room's entry in `MongoStore::last_seq`.
struct Known {
    key: Bson,
    /// Highest number this process stored or retired in the room.
    seq: i64,
    /// Highest `last_seq` this process raised the document to, and when.
    raised: Option<(i64, Instant)>,
    /// Highest number of a failed write that the document's `last_seq` may
    /// not cover yet: raised before this process stores above it.
    retired: Option<i64>,
}

/// How often a busy room's `last_seq` is raised by this process's writes
/// (a room's first write in this process always raises it). Raising costs a
/// write on the room document, which FerretDB makes its own transaction
/// (about a millisecond per room on a laptop disk): on every write it would
/// take a 64-room write from one transaction to 65. So `last_seq` may lag
/// this process's writes by up to this long; another process (or this one
/// restarted) then clashes once on that room and reads its highest `seq`.
/// At one second, 200 busy rooms cost 200 such commits a second, which
/// took FerretDB's p99 at 2,000 msg/s over 200 rooms from 71 ms to 244 ms.
const RAISE_EVERY: Duration = Duration::from_secs(10);

fn unavailable(e: MongoError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn error_code(e: &MongoError) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::InsertMany(im) => im
            .write_errors
            .as_ref()
            .and_then(|v| v.first())
            .map(|w| w.code),
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// The index (in the documents sent) of the first document an
/// `insert_many` refused, if the error says.
fn first_failed_index(e: &MongoError) -> Option<usize> {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(im) => im.write_errors.as_ref()?.first().map(|w| w.index),
        _ => None,
    }
}

/// The driver gave up before sending anything (no server to send to).
fn never_sent(e: &MongoError) -> bool {
    matches!(*e.kind, ErrorKind::ServerSelection { .. })
}

/// The highest `seq` numbering continues from. A legacy database could hold
/// one near the top of the range, where adding a batch would wrap around
/// and reorder the room; far below it, a batch never can.
const SEQ_LIMIT: i64 = 1 << 62;

/// The number after `last`, or an error once the room is past `SEQ_LIMIT`.
fn seq_after(room: &str, last: i64) -> StoreResult<i64> {
    if last >= SEQ_LIMIT {
        return Err(StoreError::Unavailable(format!(
            "room {room:?} has a message numbered {last}, too high to number after"
        )));
    }
    Ok(last + 1)
}

/// The room document's field holding (at least) the highest `seq` written
/// to the room; see the module comment.
const LAST_SEQ: &str = "last_seq";

/// A `seq` condition matching every numeric `seq`, and no string one a
/// legacy database may hold: a plain range, which MongoDB answers from the
/// `(room_id, seq)` index (a range implies the partial index's `$exists`).
fn any_number() -> Document {
    doc! { "$gte": i64::MIN }
}

/// What a multi-room insert wrote: the document ids, which of them each
/// room's batch has (by index in the batches), and each room's last number.
struct Written<'a> {
    ids: &'a [ObjectId],
    spans: &'a [(usize, std::ops::Range<usize>)],
    tops: &'a [(&'a str, &'a Bson, i64)],
}

/// What a write needs of a room document: which room of that name it is
/// (`_id`: a room deleted and created again has a new one), and its
/// `last_seq` when it has one.
struct RoomHead {
    key: Bson,
    last_seq: Option<i64>,
}

impl RoomHead {
    fn from_doc(d: &Document) -> Option<RoomHead> {
        Some(RoomHead {
            key: d.get("_id")?.clone(),
            last_seq: int_field(d, LAST_SEQ),
        })
    }
}

fn is_duplicate(e: &MongoError) -> bool {
    error_code(e) == Some(DUPLICATE_KEY)
}

/// An integer field, whatever numeric type wrote it.
fn int_field(d: &Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// The `_id` of the first document of `coll` matching `filter`.
fn first_id(coll: &Collection<Document>, filter: Document) -> StoreResult<Option<Bson>> {
    let d = coll
        .find_one(filter)
        .projection(doc! { "_id": 1 })
        .run()
        .map_err(unavailable)?;
    Ok(d.and_then(|d| d.get("_id").cloned()))
}

fn str_field(d: &Document, key: &str) -> String {
    d.get_str(key).unwrap_or_default().to_owned()
}

/// A date field as milliseconds (the original writes BSON dates).
fn millis_field(d: &Document, key: &str) -> Millis {
    match d.get(key) {
        Some(Bson::DateTime(t)) => t.timestamp_millis(),
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => *v as i64,
        Some(Bson::String(s)) => humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as Millis),
        _ => 0,
    }
}

fn room_from_doc(d: &Document) -> Room {
    Room {
        name: str_field(d, "name"),
        creator: str_field(d, "creator"),
        created_at: millis_field(d, "created_at"),
    }
}

/// The document of a new message (the original's fields, plus `seq`).
fn message_doc(id: ObjectId, room: &str, m: &NewMessage, seq: i64) -> Document {
    doc! {
        "_id": id,
        "room_id": room,
        "username": &m.username,
        "content": &m.content,
        "timestamp": DateTime::from_millis(m.timestamp),
        "seq": seq,
    }
}

fn message_from_doc(d: &Document) -> StoredMessage {
    StoredMessage {
        room_id: str_field(d, "room_id"),
        username: str_field(d, "username"),
        content: str_field(d, "content"),
        timestamp: millis_field(d, "timestamp"),
        seq: int_field(d, "seq").unwrap_or(0),
    }
}

fn index(keys: Document, name: &str, unique: bool) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_owned())
                .unique(unique.then_some(true))
                .build(),
        )
        .build()
}

impl MongoStore {
    /// A store for database `db` at `uri`. Does not contact the server:
    /// it may be down now and come up later.
    pub fn connect(uri: &str, db: &str, timeout: Duration) -> StoreResult<MongoStore> {
        let mut options = ClientOptions::parse(uri)
            .run()
            .map_err(|e| StoreError::Unavailable(format!("invalid MONGO_URI: {e}")))?;
        options.app_name = Some("chatconnect".into());
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        // The driver's default pool (10) is smaller than the store lanes can
        // use at once; connections are opened only as they are needed.
        if options.max_pool_size.is_none() {
            options.max_pool_size = Some(POOL_SIZE);
        }
        let prepared = Arc::new(AtomicBool::new(false));
        let losses = Arc::new(AtomicU64::new(0));
        let (lost, count) = (prepared.clone(), losses.clone());
        options.sdam_event_handler = Some(EventHandler::callback(move |event: SdamEvent| {
            let gone = match &event {
                SdamEvent::ServerHeartbeatFailed(_) => true,
                SdamEvent::ServerDescriptionChanged(c) => {
                    c.new_description.server_type() == ServerType::Unknown
                }
                _ => false,
            };
            if gone {
                count.fetch_add(1, Ordering::SeqCst);
                lost.store(false, Ordering::SeqCst);
            }
        }));
        let client = Client::with_options(options).map_err(unavailable)?;
        let db = client.database(db);
        Ok(MongoStore {
            users: db.collection("users"),
            rooms: db.collection("rooms"),
            messages: db.collection("messages"),
            db,
            prepared,
            losses,
            users_unique: AtomicBool::new(true),
            rooms_unique: AtomicBool::new(true),
            claims: Mutex::new(()),
            numbered: Mutex::new(HashSet::new()),
            numbering: Mutex::new(HashMap::new()),
            last_seq: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
        })
    }

    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// Drop the whole database (benchmarks and tests clean up with it).
    pub fn drop_database(&self) -> StoreResult<()> {
        self.db.drop().run().map_err(unavailable)
    }

    /// Create the indexes (idempotent). A collection that already holds
    /// duplicates of a unique key (the original had no unique indexes) gets
    /// a plain index instead, and the duplicates are logged.
    pub fn prepare(&self) -> StoreResult<()> {
        let losses_before = self.losses.load(Ordering::SeqCst);
        let users = self.unique_or_report(&self.users, "username", "usernames")?;
        self.users_unique.store(users, Ordering::SeqCst);
        let rooms = self.unique_or_report(&self.rooms, "name", "room names")?;
        self.rooms_unique.store(rooms, Ordering::SeqCst);
        // Legacy messages have no seq, so the unique index must leave them
        // out: a partial index where the server has them, else a sparse one
        // (FerretDB leaves documents without the field out of it).
        let partial = IndexModel::builder()
            .keys(doc! { "room_id": 1, "seq": 1 })
            .options(
                IndexOptions::builder()
                    .name("room_id_seq_unique".to_owned())
                    .unique(true)
                    .partial_filter_expression(doc! { "seq": { "$exists": true } })
                    .build(),
            )
            .build();
        match self.messages.create_index(partial).run() {
            Ok(_) => {}
            Err(e) if error_code(&e) == Some(NOT_IMPLEMENTED) => {
                let sparse = IndexModel::builder()
                    .keys(doc! { "room_id": 1, "seq": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("room_id_seq_unique".to_owned())
                            .unique(true)
                            .sparse(true)
                            .build(),
                    )
                    .build();
                self.messages
                    .create_index(sparse)
                    .run()
                    .map_err(unavailable)?;
            }
            Err(e) => return Err(unavailable(e)),
        }
        self.messages
            .create_index(index(
                doc! { "room_id": 1, "timestamp": 1 },
                "room_id_timestamp",
                false,
            ))
            .run()
            .map_err(unavailable)?;
        self.prepared.store(true, Ordering::SeqCst);
        if self.losses.load(Ordering::SeqCst) != losses_before {
            // Lost meanwhile: the indexes may be on a database that is gone.
            self.prepared.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// True when the unique index is in place.
    fn unique_or_report(
        &self,
        coll: &Collection<Document>,
        key: &str,
        what: &str,
    ) -> StoreResult<bool> {
        let unique = index(doc! { key: 1 }, &format!("{key}_unique"), true);
        let failure = match coll.create_index(unique).run() {
            Ok(_) => return Ok(true),
            Err(e) => e,
        };
        // MongoDB says 11000 when existing duplicates block a unique index;
        // FerretDB says "UNIQUE constraint failed" under another code. Look
        // at the data rather than at the code.
        let dups = self.duplicates(coll, key)?;
        if dups.is_empty() {
            return Err(unavailable(failure));
        }
        log::warn!(
            "duplicate {what} in {}: {dups:?}; keeping a non-unique index, and new \
             duplicates are still refused",
            coll.name()
        );
        coll.create_index(index(doc! { key: 1 }, &format!("{key}_lookup"), false))
            .run()
            .map_err(unavailable)?;
        Ok(false)
    }

    /// Held while creating a user (`users`) or a room while no unique index
    /// guards its name; `None` when one does.
    fn claim(&self, unique: &AtomicBool) -> Option<std::sync::MutexGuard<'_, ()>> {
        if unique.load(Ordering::SeqCst) {
            return None;
        }
        Some(self.claims.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Values of `key` held by more than one document, sorted.
    fn duplicates(&self, coll: &Collection<Document>, key: &str) -> StoreResult<Vec<String>> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let cursor = coll
            .find(doc! {})
            .projection(doc! { key: 1, "_id": 0 })
            .run()
            .map_err(unavailable)?;
        for d in cursor {
            let d = d.map_err(unavailable)?;
            *seen.entry(str_field(&d, key)).or_default() += 1;
        }
        let mut dups: Vec<String> = seen
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k)
            .collect();
        dups.sort();
        Ok(dups)
    }

    fn ensure_prepared(&self) -> StoreResult<()> {
        if self.prepared.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.prepare()
    }

    fn room_doc(&self, name: &str) -> StoreResult<Option<Document>> {
        self.rooms
            .find_one(doc! { "name": name })
            .run()
            .map_err(unavailable)
    }

    /// The room document named `name`, as a write needs it: which room of
    /// that name this is (the first in the collection's order, should a
    /// legacy database hold several; not sorted, because a sort makes
    /// FerretDB read every room where it otherwise stops at the first
    /// match, which cost a write per room 39 % of its rate).
    fn room_head(&self, name: &str) -> StoreResult<Option<RoomHead>> {
        let d = self
            .rooms
            .find_one(doc! { "name": name })
            .projection(doc! { "_id": 1, LAST_SEQ: 1 })
            .run()
            .map_err(unavailable)?;
        Ok(d.as_ref().and_then(RoomHead::from_doc))
    }

    /// Highest `seq` stored in a room (0 when none). Only numbers count: a
    /// legacy document with, say, a string seq would sort above them all.
    /// Off the write path: a write asks only after a clash, or for a room
    /// without `last_seq`.
    fn max_seq(&self, room: &str) -> StoreResult<i64> {
        let top = self
            .messages
            .find_one(doc! { "room_id": room, "seq": any_number() })
            .sort(doc! { "seq": -1 })
            .projection(doc! { "seq": 1, "_id": 0 })
            .run()
            .map_err(unavailable)?;
        Ok(top.and_then(|d| int_field(&d, "seq")).unwrap_or(0))
    }

    /// The seq a new message of `room` (its document `head`) should get:
    /// after the highest of what this process knows for that room document
    /// and the document's `last_seq`; after the highest stored when neither
    /// is known. Also the number `last_seq` must be raised to before the
    /// write inserts, if any: this process retired the numbers of a failed
    /// write above it and could not raise it then. Numbers retired, and so
    /// not stored, below numbers stored are the one gap a `last_seq` too low
    /// would not reveal by a clash: another process would number into it,
    /// below messages already seen.
    fn next_seq(&self, room: &str, head: &RoomHead) -> StoreResult<(i64, Option<i64>)> {
        let (known, retired) = self
            .last_seq
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room)
            .filter(|k| k.key == head.key)
            .map_or((None, None), |k| (Some(k.seq), k.retired));
        let heard = self
            .heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(room)
            .copied();
        let last = match known.max(head.last_seq).max(heard) {
            Some(s) => s,
            None => self.max_seq(room)?,
        };
        let raise_first = retired.filter(|r| head.last_seq.is_none_or(|l| l < *r));
        Ok((seq_after(room, last)?, raise_first))
    }

    /// Whether a write that stored up to `top` in `room` should raise the
    /// room document's `last_seq` now (see `RAISE_EVERY`).
    fn raise_due(&self, room: &str, key: &Bson, top: i64) -> bool {
        let map = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        match map
            .get(room)
            .filter(|k| k.key == *key)
            .and_then(|k| k.raised)
        {
            None => true,
            Some((raised, at)) => top > raised && at.elapsed() >= RAISE_EVERY,
        }
    }

    /// `settle` succeeded for these rooms: their documents' `last_seq` is at
    /// least what was given.
    fn note_raised(&self, rooms: &[(&str, &Bson, i64)]) {
        let now = Instant::now();
        let mut map = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        for (room, key, top) in rooms {
            let k = match map.get_mut(*room) {
                Some(k) if k.key == **key => k,
                _ => {
                    map.insert(
                        (*room).to_owned(),
                        Known {
                            key: (*key).clone(),
                            seq: *top,
                            raised: None,
                            retired: None,
                        },
                    );
                    map.get_mut(*room).expect("just inserted")
                }
            };
            k.seq = k.seq.max(*top);
            if k.raised.is_none_or(|(r, _)| r <= *top) {
                k.raised = Some((*top, now));
            }
            if k.retired.is_some_and(|r| r <= *top) {
                k.retired = None;
            }
        }
    }

    /// Raise the `last_seq` of each room document (by `_id`) to at least the
    /// number given, in one command. Returns how many of the documents
    /// exist: a write's proof that its rooms were not deleted meanwhile.
    fn settle(&self, rooms: &[(&Bson, i64)]) -> StoreResult<u64> {
        if rooms.is_empty() {
            return Ok(0);
        }
        let updates: Vec<Document> = rooms
            .iter()
            .map(|(key, top)| {
                doc! {
                    "q": { "_id": (*key).clone() },
                    "u": { "$max": { LAST_SEQ: *top } },
                }
            })
            .collect();
        let reply = self
            .db
            .run_command(doc! {
                "update": self.rooms.name(),
                "updates": updates,
                "ordered": false,
            })
            .run()
            .map_err(unavailable)?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(first) = errors.first() {
                return Err(StoreError::Unavailable(format!(
                    "raising last_seq of {} rooms failed: {first}",
                    errors.len()
                )));
            }
        }
        Ok(int_field(&reply, "n").map_or(0, |n| n.max(0) as u64))
    }

    /// Numbers up to `top` of a write that failed are not given out again:
    /// this process remembers them, and `last_seq` is raised over them
    /// (best effort: when that fails too, this process's next write raises
    /// it first, see `next_seq`).
    fn retire(&self, rooms: &[(&str, &Bson, i64)]) {
        for (room, key, top) in rooms {
            self.remember_seq(room, key, *top);
            let mut map = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = map.get_mut(*room) {
                k.retired = Some(k.retired.map_or(*top, |r| r.max(*top)));
            }
        }
        let raise: Vec<(&Bson, i64)> = rooms.iter().map(|(_, k, t)| (*k, *t)).collect();
        match self.settle(&raise) {
            Ok(_) => self.note_raised(rooms),
            Err(e) => {
                log::warn!("could not raise last_seq over the numbers of a failed write: {e}")
            }
        }
    }

    fn remember_seq(&self, room: &str, key: &Bson, seq: i64) {
        let mut map = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(room) {
            Some(k) if k.key == *key => k.seq = k.seq.max(seq),
            _ => {
                map.insert(
                    room.to_owned(),
                    Known {
                        key: key.clone(),
                        seq,
                        raised: None,
                        retired: None,
                    },
                );
            }
        }
    }

    fn forget_room(&self, room: &str) {
        self.numbered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room);
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room);
        self.last_seq
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room);
    }

    /// Number the original's seq-less messages of a room, oldest first, so
    /// they page and resume like every other message. Safe to run from
    /// several processes at once: each document is numbered at most once
    /// (the update only matches it while it has no seq), and the unique
    /// index settles who gets which number.
    ///
    /// A room document with `last_seq` says its room is numbered, so after
    /// the first time (in any process) this is a look at the room document,
    /// and after the first time in this process nothing at all.
    fn number_legacy(&self, room: &str) -> StoreResult<()> {
        self.number_legacy_or_wait(room, false, false)
    }

    /// `number_legacy` for a room whose document the caller has read:
    /// nothing to ask when it has `last_seq`.
    fn number_legacy_given(&self, room: &str, last_seq: Option<i64>) -> StoreResult<()> {
        if last_seq.is_none() {
            return self.number_legacy(room);
        }
        self.numbered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(room.to_owned());
        Ok(())
    }

    /// `number_legacy`; while another thread numbers the room, wait for it
    /// (`wait`), or for at most `NUMBERING_WAIT` and then answer
    /// "unavailable", so that calls for a room of many legacy messages do
    /// not hold every store thread meanwhile, while a small room's numbering
    /// (a fraction of a second) is simply waited for. `scan`: look at the
    /// messages even when the room document says they are numbered.
    fn number_legacy_or_wait(&self, room: &str, wait: bool, scan: bool) -> StoreResult<()> {
        const NUMBERING_WAIT: Duration = Duration::from_secs(1);
        let is_numbered = || {
            self.numbered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(room)
        };
        if is_numbered() {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            {
                let mut claims = self.numbering.lock().unwrap_or_else(|p| p.into_inner());
                if is_numbered() {
                    return Ok(());
                }
                match claims.get(room) {
                    None => {
                        claims.insert(room.to_owned(), false);
                        break;
                    }
                    Some(true) if !wait && started.elapsed() >= NUMBERING_WAIT => {
                        return Err(StoreError::Unavailable(format!(
                            "the earlier messages of room {room:?} are being numbered; try again shortly"
                        )));
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = self.number_legacy_now(room, scan);
        self.numbering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(room);
        result
    }

    /// Number every room's legacy messages, and give every room document
    /// without `last_seq` one; run once the database answers after start,
    /// so that joins and writes seldom meet a room's first numbering (the
    /// queries on the messages it takes cannot use an index on FerretDB;
    /// see docs/STORE_QUERIES.md). Returns how many rooms had legacy
    /// messages.
    pub fn number_all_legacy(&self) -> StoreResult<usize> {
        let rooms = self
            .messages
            .distinct("room_id", doc! { "seq": { "$exists": false } })
            .run()
            .map_err(unavailable)?;
        let mut n = 0;
        for room in rooms.iter().filter_map(Bson::as_str) {
            self.number_legacy_or_wait(room, true, true)?;
            n += 1;
        }
        let unmarked: Vec<String> = self
            .rooms
            .find(doc! { LAST_SEQ: { "$exists": false } })
            .projection(doc! { "name": 1, "_id": 0 })
            .run()
            .map_err(unavailable)?
            .map(|d| d.map(|d| str_field(&d, "name")))
            .collect::<Result<_, _>>()
            .map_err(unavailable)?;
        for room in &unmarked {
            self.number_legacy_or_wait(room, true, false)?;
        }
        Ok(n)
    }

    /// The work of `number_legacy`, under its lock. Ends by giving the room
    /// document `last_seq` (the highest `seq` stored), which tells every
    /// process the room is numbered.
    fn number_legacy_now(&self, room: &str, scan: bool) -> StoreResult<()> {
        let head = self.room_head(room)?;
        if !scan && head.as_ref().is_some_and(|h| h.last_seq.is_some()) {
            self.numbered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(room.to_owned());
            return Ok(());
        }
        let legacy: Vec<Bson> = self
            .messages
            .find(doc! { "room_id": room, "seq": { "$exists": false } })
            .sort(doc! { "timestamp": 1, "_id": 1 })
            .projection(doc! { "_id": 1 })
            .run()
            .map_err(unavailable)?
            .map(|d| d.map(|d| d.get("_id").cloned().unwrap_or(Bson::Null)))
            .collect::<Result<_, _>>()
            .map_err(unavailable)?;
        if !legacy.is_empty() {
            log::info!(
                "numbering {} earlier messages of room {room:?}",
                legacy.len()
            );
            self.numbering
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(room.to_owned(), true);
            self.number_these(room, legacy)?;
            // Whatever this process guessed for the room is now too low.
            self.last_seq
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(room);
        }
        if let Some(head) = head {
            let top = self.max_seq(room)?;
            self.settle(&[(&head.key, top)])?;
            // Not noted as raised: the room's first write still raises it.
            self.remember_seq(room, &head.key, top);
        }
        self.numbered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(room.to_owned());
        Ok(())
    }

    /// Give the legacy messages `ids` (oldest first) the room's next numbers.
    fn number_these(&self, room: &str, ids: Vec<Bson>) -> StoreResult<()> {
        let mut next = seq_after(room, self.max_seq(room)?)?;
        for id in ids {
            let mut attempts = 0;
            loop {
                let filter = doc! { "_id": id.clone(), "seq": { "$exists": false } };
                match self
                    .messages
                    .update_one(filter, doc! { "$set": { "seq": next } })
                    .run()
                {
                    Ok(r) => {
                        if r.matched_count == 1 {
                            next += 1;
                        }
                        break;
                    }
                    Err(e) if is_duplicate(&e) && attempts < MAX_ATTEMPTS => {
                        attempts += 1;
                        next = seq_after(room, self.max_seq(room)?)?;
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        }
        Ok(())
    }

    /// After creating a room: remove messages of an earlier room of the same
    /// name that a delete left behind (the original never removed them).
    fn purge_leftovers(&self, room: &Room) -> StoreResult<()> {
        let leftovers = doc! {
            "room_id": &room.name,
            "timestamp": { "$lt": DateTime::from_millis(room.created_at) },
        };
        let gone = self.delete_messages(leftovers)?;
        if gone > 0 {
            log::info!(
                "removed {gone} messages left behind by an earlier room {:?}",
                room.name
            );
        }
        Ok(())
    }

    /// Delete the messages matching `filter`. FerretDB's SQLite backend
    /// fails a `delete_many` over more than 32,766 documents ("too many SQL
    /// variables"), which would leave a big room's history behind for the
    /// next room of that name: when the whole delete fails, the oldest
    /// 10,000 (by `_id`) go first, then the whole is tried again.
    fn delete_messages(&self, filter: Document) -> StoreResult<u64> {
        const CHUNK: u64 = 10_000;
        let mut total = 0;
        loop {
            let whole = match self.messages.delete_many(filter.clone()).run() {
                Ok(r) => return Ok(total + r.deleted_count),
                Err(e) => e,
            };
            let boundary = self
                .messages
                .find_one(filter.clone())
                .sort(doc! { "_id": 1 })
                .skip(CHUNK - 1)
                .projection(doc! { "_id": 1 })
                .run()
                .map_err(unavailable)?
                .and_then(|d| d.get("_id").cloned());
            // Fewer than a chunk: the failure was not about the size.
            let Some(boundary) = boundary else {
                return Err(unavailable(whole));
            };
            let chunk = doc! { "$and": [filter.clone(), { "_id": { "$lte": boundary } }] };
            let gone = self
                .messages
                .delete_many(chunk)
                .run()
                .map_err(unavailable)?;
            if gone.deleted_count == 0 {
                return Err(unavailable(whole));
            }
            total += gone.deleted_count;
        }
    }

    /// A new room's document: the original's fields, and `last_seq` 0 (a
    /// new room has no legacy messages to number).
    fn room_document(room: &Room) -> Document {
        doc! {
            "name": &room.name,
            "creator": &room.creator,
            "created_at": DateTime::from_millis(room.created_at),
            LAST_SEQ: 0_i64,
        }
    }

    /// The names among `names` that have a room document, with the document
    /// as `room_head` gives it (one query).
    fn existing_rooms(&self, names: &[&str]) -> StoreResult<HashMap<String, RoomHead>> {
        let cursor = self
            .rooms
            .find(doc! { "name": { "$in": names.to_vec() } })
            .projection(doc! { "name": 1, "_id": 1, LAST_SEQ: 1 })
            .run()
            .map_err(unavailable)?;
        let mut found = HashMap::new();
        for d in cursor {
            let d = d.map_err(unavailable)?;
            if let (Ok(name), Some(head)) = (d.get_str("name"), RoomHead::from_doc(&d)) {
                found.entry(name.to_owned()).or_insert(head);
            }
        }
        Ok(found)
    }

    /// The one-insert path of `append_many` (room names are distinct):
    /// one query for the room documents, one `insert_many`, and the check of
    /// `confirm_rooms`, however many rooms. Only a room without `last_seq`
    /// (once per room) costs queries of its own. `Clashed`: a numbering
    /// clash (another process took some of the numbers); nothing of this
    /// call is left stored, and the clash names the batch whose numbers
    /// were taken when the server says.
    fn append_together(&self, batches: &[&RoomBatch]) -> StoreResult<Together> {
        self.ensure_prepared()?;
        let names: Vec<&str> = batches.iter().map(|b| b.room.as_str()).collect();
        let heads = self.existing_rooms(&names)?;
        let mut results: Vec<StoreResult<Vec<StoredMessage>>> = Vec::with_capacity(batches.len());
        let mut docs: Vec<Document> = Vec::new();
        let mut ids: Vec<ObjectId> = Vec::new();
        // Which of `ids` each written batch has (by index in `batches`).
        let mut spans: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        // Rooms whose last_seq is below what this process retired.
        let mut behind: Vec<(&str, &Bson, i64)> = Vec::new();
        for b in batches {
            let Some(head) = heads.get(&b.room) else {
                results.push(Err(StoreError::NoSuchRoom));
                continue;
            };
            if let Err(e) = self.number_legacy_given(&b.room, head.last_seq) {
                results.push(Err(e));
                continue;
            }
            let next = match self.next_seq(&b.room, head) {
                Ok((n, raise_first)) => {
                    if let Some(r) = raise_first {
                        behind.push((b.room.as_str(), &head.key, r));
                    }
                    n
                }
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            let mut stored = Vec::with_capacity(b.messages.len());
            let first = ids.len();
            for (i, m) in b.messages.iter().enumerate() {
                let id = ObjectId::new();
                let seq = next + i as i64;
                ids.push(id);
                docs.push(message_doc(id, &b.room, m, seq));
                stored.push(m.stored(&b.room, seq));
            }
            spans.push((results.len(), first..ids.len()));
            results.push(Ok(stored));
        }
        if docs.is_empty() {
            return Ok(Together::Written(results));
        }
        if !behind.is_empty() {
            let raise: Vec<(&Bson, i64)> = behind.iter().map(|(_, k, t)| (*k, *t)).collect();
            self.settle(&raise)?;
            self.note_raised(&behind);
        }
        // Each room's last number in this write.
        let tops: Vec<(&str, &Bson, i64)> = batches
            .iter()
            .zip(&results)
            .filter_map(|(b, r)| {
                let last = r.as_ref().ok()?.last()?;
                Some((b.room.as_str(), &heads.get(&b.room)?.key, last.seq))
            })
            .collect();
        if let Err(e) = self.messages.insert_many(docs).ordered(true).run() {
            // Whatever went in before the failure comes back out, so no room
            // keeps part of this write; after a clash the caller writes room
            // by room, but only if nothing of this write is left.
            if never_sent(&e) {
                return Err(unavailable(e));
            }
            let clean = self.take_back(&ids);
            if is_duplicate(&e) && clean {
                let room = first_failed_index(&e).and_then(|doc| {
                    spans
                        .iter()
                        .find(|(_, ids)| ids.contains(&doc))
                        .map(|(batch, _)| *batch)
                });
                return Ok(Together::Clashed(room));
            }
            self.retire(&tops);
            return Err(unavailable(e));
        }
        let written = Written {
            ids: &ids,
            spans: &spans,
            tops: &tops,
        };
        match self.confirm_rooms(batches, &names, &written, &heads, &mut results) {
            Ok(()) => Ok(Together::Written(results)),
            Err(e) => {
                let _ = self.take_back(&ids);
                self.retire(&tops);
                Err(e)
            }
        }
    }

    /// After a multi-room insert: check the rooms still exist, raising the
    /// `last_seq` of those due (`RAISE_EVERY`). When every room is due, the
    /// command raising them is the check; otherwise the room documents are
    /// read again (one query). A room deleted (or deleted and created
    /// again) while it was written loses what was written into it, as in
    /// `append_messages`; the others remember their new numbers.
    fn confirm_rooms(
        &self,
        batches: &[&RoomBatch],
        names: &[&str],
        written: &Written,
        before: &HashMap<String, RoomHead>,
        results: &mut [StoreResult<Vec<StoredMessage>>],
    ) -> StoreResult<()> {
        let due: Vec<(&str, &Bson, i64)> = written
            .tops
            .iter()
            .filter(|(room, key, top)| self.raise_due(room, key, *top))
            .copied()
            .collect();
        if !due.is_empty() {
            let raise: Vec<(&Bson, i64)> = due.iter().map(|(_, k, t)| (*k, *t)).collect();
            let found = self.settle(&raise)?;
            self.note_raised(&due);
            if found == raise.len() as u64 && due.len() == written.tops.len() {
                return Ok(());
            }
        }
        let still = self.existing_rooms(names)?;
        for (i, span) in written.spans {
            let (b, r) = (&batches[*i], &mut results[*i]);
            let Ok(stored) = r else {
                continue;
            };
            let Some(last) = stored.last() else {
                continue;
            };
            let now = still.get(&b.room).map(|h| &h.key);
            if let Some(key) = before.get(&b.room).map(|h| &h.key) {
                if now == Some(key) {
                    self.remember_seq(&b.room, key, last.seq);
                    continue;
                }
            }
            // By `_id`: a room of that name created again meanwhile may
            // hold the same numbers.
            let ids = written.ids[span.clone()].to_vec();
            self.messages
                .delete_many(doc! { "_id": { "$in": ids } })
                .run()
                .map_err(unavailable)?;
            self.forget_room(&b.room);
            *r = Err(StoreError::NoSuchRoom);
        }
        Ok(())
    }

    /// The inserts of `append_messages`, numbering from the room's next seq
    /// and renumbering after a clash. Every document id sent to the server
    /// goes into `sent` first, and `top` rises to the highest number sent,
    /// so that a failure can take them all back and retire their numbers.
    fn insert_numbered(
        &self,
        room: &str,
        head: &RoomHead,
        batch: &[NewMessage],
        sent: &mut Vec<ObjectId>,
        top: &mut i64,
    ) -> StoreResult<Vec<StoredMessage>> {
        let key = &head.key;
        let (mut next, raise_first) = self.next_seq(room, head)?;
        if let Some(r) = raise_first {
            self.settle(&[(key, r)])?;
            self.note_raised(&[(room, key, r)]);
        }
        let mut stored: Vec<StoredMessage> = Vec::with_capacity(batch.len());
        let mut rest = batch;
        let mut attempts = 0;
        while !rest.is_empty() {
            let ids: Vec<ObjectId> = rest.iter().map(|_| ObjectId::new()).collect();
            sent.extend_from_slice(&ids);
            *top = (*top).max(next + rest.len() as i64 - 1);
            let docs: Vec<Document> = rest
                .iter()
                .zip(&ids)
                .enumerate()
                .map(|(i, (m, id))| message_doc(*id, room, m, next + i as i64))
                .collect();
            let placed = match self.messages.insert_many(docs).ordered(true).run() {
                Ok(_) => rest.len(),
                Err(e) if is_duplicate(&e) && attempts < MAX_ATTEMPTS => {
                    attempts += 1;
                    // Ordered: everything before the clash went in. Some
                    // servers (FerretDB inserts in chunks of 100) carry on
                    // after it, so remove whatever of the rest got in too
                    // before retrying it under new numbers.
                    let placed = match e.kind.as_ref() {
                        ErrorKind::InsertMany(im) => im
                            .write_errors
                            .as_ref()
                            .and_then(|v| v.first())
                            .map_or(0, |w| w.index),
                        _ => 0,
                    };
                    self.messages
                        .delete_many(doc! { "_id": { "$in": ids[placed..].to_vec() } })
                        .run()
                        .map_err(unavailable)?;
                    placed
                }
                Err(e) => {
                    if never_sent(&e) {
                        sent.truncate(sent.len() - ids.len());
                    }
                    return Err(unavailable(e));
                }
            };
            for (i, m) in rest[..placed].iter().enumerate() {
                stored.push(m.stored(room, next + i as i64));
            }
            rest = &rest[placed..];
            next = if rest.is_empty() {
                next + placed as i64
            } else {
                seq_after(room, self.max_seq(room)?)?
            };
        }
        // A delete may have removed the room while the batch was written
        // (and another process may have created a new one of that name):
        // the caller takes the batch back out so nothing outlives its room.
        // Raising last_seq on that room document (by `_id`) tells, or else
        // reading it again.
        let top = next - 1;
        let exists = if self.raise_due(room, key, top) {
            let found = self.settle(&[(key, top)])? == 1;
            self.note_raised(&[(room, key, top)]);
            found
        } else {
            self.room_head(room)?.is_some_and(|h| h.key == *key)
        };
        if !exists {
            return Err(StoreError::NoSuchRoom);
        }
        self.remember_seq(room, key, top);
        Ok(stored)
    }

    /// Remove the documents of a write that failed after it reached the
    /// server (its reply lost, or a check after it failed), so that an error
    /// means nothing of the write is stored. Best effort: if the server
    /// cannot be reached for this either, the documents stay, the log says
    /// so, and the result is false.
    ///
    /// The callers retire the numbers of a write that failed: a reader (a
    /// join's history, another process) may have seen the documents
    /// meanwhile, and a member whose history held them would skip a later
    /// message that took one of their numbers over. After a clash the
    /// numbers are reused: the write is redone and broadcast, and a joining
    /// member's history yields to the broadcast batch.
    fn take_back(&self, ids: &[ObjectId]) -> bool {
        if ids.is_empty() {
            return true;
        }
        match self
            .messages
            .delete_many(doc! { "_id": { "$in": ids.to_vec() } })
            .run()
        {
            Ok(_) => true,
            Err(e) => {
                log::error!(
                    "a failed write of {} messages could not be taken back: {e}",
                    ids.len()
                );
                false
            }
        }
    }

    fn query_messages(&self, filter: Document, limit: usize) -> StoreResult<Vec<StoredMessage>> {
        let cursor = self
            .messages
            .find(filter)
            .sort(doc! { "seq": -1 })
            .limit(limit as i64)
            .run()
            .map_err(unavailable)?;
        let mut out = cursor
            .map(|d| d.map(|d| message_from_doc(&d)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        out.reverse();
        Ok(out)
    }
}

impl Store for MongoStore {
    fn ping(&self) -> StoreResult<()> {
        self.db
            .run_command(doc! { "ping": 1 })
            .run()
            .map(|_| ())
            .map_err(unavailable)?;
        self.ensure_prepared()
    }

    fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<()> {
        self.ensure_prepared()?;
        // The unique index decides races; the lookup covers a database whose
        // duplicates kept that index from being built, and a user document
        // of the original without a usable hash (the name is still taken).
        let _claim = self.claim(&self.users_unique);
        if first_id(&self.users, doc! { "username": username })?.is_some() {
            return Err(StoreError::Conflict);
        }
        match self
            .users
            .insert_one(doc! { "username": username, "password_hash": password_hash })
            .run()
        {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate(&e) => Err(StoreError::Conflict),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn password_hash(&self, username: &str) -> StoreResult<Option<String>> {
        let user = self
            .users
            .find_one(doc! { "username": username })
            .run()
            .map_err(unavailable)?;
        // A user whose document has no string hash exists but cannot log
        // in: an empty hash never verifies.
        Ok(user.map(|d| d.get_str("password_hash").unwrap_or_default().to_owned()))
    }

    fn create_room(&self, room: &Room) -> StoreResult<()> {
        self.ensure_prepared()?;
        // As for users: the lookup covers a database without the unique index.
        let claim = self.claim(&self.rooms_unique);
        if self.room_doc(&room.name)?.is_some() {
            return Err(StoreError::Conflict);
        }
        match self.rooms.insert_one(Self::room_document(room)).run() {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Err(StoreError::Conflict),
            Err(e) => return Err(unavailable(e)),
        }
        drop(claim);
        self.forget_room(&room.name);
        self.purge_leftovers(room)
    }

    fn ensure_room(&self, room: &Room) -> StoreResult<Room> {
        self.ensure_prepared()?;
        let claim = self.claim(&self.rooms_unique);
        let created = match self
            .rooms
            .update_one(
                doc! { "name": &room.name },
                doc! { "$setOnInsert": Self::room_document(room) },
            )
            .upsert(true)
            .run()
        {
            Ok(r) => r.upserted_id.is_some(),
            // Two upserts racing: the other one created it.
            Err(e) if is_duplicate(&e) => false,
            Err(e) => return Err(unavailable(e)),
        };
        drop(claim);
        if created {
            self.forget_room(&room.name);
            self.purge_leftovers(room)?;
        }
        let stored = self
            .room_doc(&room.name)?
            .ok_or_else(|| StoreError::Unavailable("room vanished while being created".into()))?;
        self.number_legacy_given(&room.name, int_field(&stored, LAST_SEQ))?;
        Ok(room_from_doc(&stored))
    }

    fn get_room(&self, name: &str) -> StoreResult<Option<Room>> {
        Ok(self.room_doc(name)?.map(|d| room_from_doc(&d)))
    }

    fn list_rooms(&self) -> StoreResult<Vec<Room>> {
        let cursor = self
            .rooms
            .find(doc! {})
            .sort(doc! { "created_at": 1, "name": 1 })
            .run()
            .map_err(unavailable)?;
        cursor
            .map(|d| d.map(|d| room_from_doc(&d)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)
    }

    fn delete_room(&self, name: &str, requester: &str) -> StoreResult<DeleteOutcome> {
        let Some(room) = self.room_doc(name)? else {
            return Ok(DeleteOutcome::NotFound);
        };
        if str_field(&room, "creator") != requester {
            return Ok(DeleteOutcome::Forbidden);
        }
        // The room first, so a batch on its way finds no room and stores
        // nothing; then its messages. Without transactions a failure between
        // the two leaves messages behind, which creating a room of that name
        // again removes (see purge_leftovers).
        let removed = self
            .rooms
            .delete_many(doc! { "name": name })
            .run()
            .map_err(unavailable)?;
        self.forget_room(name);
        self.delete_messages(doc! { "room_id": name })?;
        Ok(if removed.deleted_count > 0 {
            DeleteOutcome::Deleted
        } else {
            DeleteOutcome::NotFound
        })
    }

    fn append_messages(&self, room: &str, batch: &[NewMessage]) -> StoreResult<Vec<StoredMessage>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_prepared()?;
        let Some(head) = self.room_head(room)? else {
            return Err(StoreError::NoSuchRoom);
        };
        self.number_legacy_given(room, head.last_seq)?;
        let mut sent = Vec::with_capacity(batch.len());
        let mut top = 0;
        let outcome = self.insert_numbered(room, &head, batch, &mut sent, &mut top);
        match &outcome {
            Ok(_) => {}
            Err(_) if sent.is_empty() => {}
            Err(StoreError::NoSuchRoom) => {
                let _ = self.take_back(&sent);
                self.forget_room(room);
            }
            Err(_) => {
                let _ = self.take_back(&sent);
                self.retire(&[(room, &head.key, top)]);
            }
        }
        outcome
    }

    /// Several rooms in one insert: one query for the room documents, one
    /// `insert_many` for every room's messages, and a check that the rooms
    /// are still there (a query, or the command raising their `last_seq`,
    /// or both), whatever the number of rooms (see `append_together`). A
    /// numbering clash
    /// (another process wrote into one of the rooms) takes this write's
    /// documents back out and stores room by room, where clashes are retried.
    /// All rooms in one insert; after a clash the room whose numbers were
    /// taken is set aside and the others are tried together again (a few
    /// times), so one busy room shared with another process does not send
    /// every room of the pass down the room-by-room path. What is set
    /// aside, or left after the tries, is written room by room.
    fn append_many(&self, batches: &[RoomBatch]) -> Vec<StoreResult<Vec<StoredMessage>>> {
        let names: HashSet<&str> = batches.iter().map(|b| b.room.as_str()).collect();
        if batches.len() < 2 || names.len() != batches.len() {
            return append_each(self, batches);
        }
        let mut results: Vec<Option<StoreResult<Vec<StoredMessage>>>> =
            batches.iter().map(|_| None).collect();
        // Indexes in `batches` still to write together.
        let mut together: Vec<usize> = (0..batches.len()).collect();
        for _ in 0..TOGETHER_TRIES {
            if together.len() < 2 {
                break;
            }
            let these: Vec<&RoomBatch> = together.iter().map(|&i| &batches[i]).collect();
            match self.append_together(&these) {
                Ok(Together::Written(written)) => {
                    for (&i, r) in together.iter().zip(written) {
                        results[i] = Some(r);
                    }
                    together.clear();
                }
                Ok(Together::Clashed(Some(k))) => {
                    together.remove(k);
                    continue;
                }
                Ok(Together::Clashed(None)) => {}
                Err(e) => {
                    for &i in &together {
                        results[i] = Some(Err(e.clone()));
                    }
                    together.clear();
                }
            }
            break;
        }
        results
            .into_iter()
            .zip(batches)
            .map(|(r, b)| r.unwrap_or_else(|| self.append_messages(&b.room, &b.messages)))
            .collect()
    }

    fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
        let instances = self.db.collection::<Document>(INSTANCES);
        instances
            .update_one(
                doc! { "_id": me },
                doc! { "$set": { "beat": beat, "at": DateTime::now() } },
            )
            .upsert(true)
            .run()
            .map_err(unavailable)?;
        let cursor = instances
            .find(doc! {})
            .projection(doc! { "beat": 1 })
            .run()
            .map_err(unavailable)?;
        let mut all = Vec::new();
        for d in cursor {
            let d = d.map_err(unavailable)?;
            if let Ok(id) = d.get_str("_id") {
                all.push((id.to_owned(), int_field(&d, "beat").unwrap_or(0)));
            }
        }
        Ok(all)
    }

    fn heard(&self, room: &str, seq: Option<i64>) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        match seq {
            // Called for every batch from the broker: the name is copied
            // only for a room not heard of before.
            Some(seq) => match heard.get_mut(room) {
                Some(top) => *top = (*top).max(seq),
                None => {
                    if heard.len() >= HEARD_MAX {
                        heard.clear();
                    }
                    heard.insert(room.to_owned(), seq);
                }
            },
            None => {
                heard.remove(room);
            }
        }
    }

    fn connection_losses(&self) -> u64 {
        self.losses.load(Ordering::SeqCst)
    }

    fn withdraw(&self, id: &str) -> StoreResult<()> {
        self.db
            .collection::<Document>(INSTANCES)
            .delete_one(doc! { "_id": id })
            .run()
            .map(|_| ())
            .map_err(unavailable)
    }

    fn messages_before(
        &self,
        room: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.number_legacy(room)?;
        // Both answered from the (room_id, seq) index on MongoDB: equality,
        // then a range (`$exists` is the partial index's own filter, so it
        // qualifies too; unlike a numeric range it keeps a legacy string
        // seq in the history, as before).
        let filter = match before {
            Some(b) => doc! { "room_id": room, "seq": { "$lt": b } },
            None => doc! { "room_id": room, "seq": { "$exists": true } },
        };
        self.query_messages(filter, limit)
    }

    fn messages_after(
        &self,
        room: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.number_legacy(room)?;
        self.query_messages(doc! { "room_id": room, "seq": { "$gt": since } }, limit)
    }
}
