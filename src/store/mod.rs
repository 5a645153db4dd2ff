//! Persistence behind one interface.
//!
//! The reactor never touches a store: every call here runs on a worker thread
//! (see `workers.rs`). Two backends implement [`Store`]: the embedded SQLite
//! database used when `MONGO_URI` is unset, and MongoDB. Both must pass the same
//! conformance suite (`tests/store_conformance.rs`), so the reactor can rely on
//! the contracts written on each method below without knowing which backend
//! answers.

pub mod mongo;
mod process_lock;
pub mod sqlite;

use std::fmt;

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// A room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub name: String,
    pub creator: String,
    pub created_at: Millis,
}

/// A message before the store has given it a `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub username: String,
    pub content: String,
    pub timestamp: Millis,
}

impl NewMessage {
    /// This message as stored in `room` under `seq`.
    pub fn stored(&self, room: &str, seq: i64) -> StoredMessage {
        StoredMessage {
            room_id: room.to_owned(),
            username: self.username.clone(),
            content: self.content.clone(),
            timestamp: self.timestamp,
            seq,
        }
    }
}

/// A message as stored, with its per-room sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub room_id: String,
    pub username: String,
    pub content: String,
    pub timestamp: Millis,
    pub seq: i64,
}

/// One room's part of a multi-room append (see [`Store::append_many`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomBatch {
    pub room: String,
    pub messages: Vec<NewMessage>,
}

/// What a delete request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    NotFound,
    /// The room exists but the requester did not create it; nothing was removed.
    Forbidden,
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A unique name (user or room) is already taken.
    Conflict,
    /// The room a call needs does not exist (for example it was deleted while
    /// a batch was on its way).
    NoSuchRoom,
    /// The backend cannot be reached or refused the call; the caller may retry later.
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Conflict => f.write_str("already exists"),
            StoreError::NoSuchRoom => f.write_str("no such room"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub type StoreResult<T> = Result<T, StoreError>;

/// The persistence contract. Implementations are shared by all worker threads.
pub trait Store: Send + Sync {
    /// A cheap round trip proving the backend answers.
    fn ping(&self) -> StoreResult<()>;

    /// Insert a user; `Conflict` when the name is taken.
    fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<()>;

    /// The stored bcrypt hash of a user, if the user exists.
    fn password_hash(&self, username: &str) -> StoreResult<Option<String>>;

    /// Insert a room; `Conflict` when a room of that name exists.
    fn create_room(&self, room: &Room) -> StoreResult<()>;

    /// The room of that name, creating it with `room`'s creator and time when
    /// it does not exist yet. Returns the room as stored (the existing one wins).
    fn ensure_room(&self, room: &Room) -> StoreResult<Room>;

    fn get_room(&self, name: &str) -> StoreResult<Option<Room>>;

    /// Every room, oldest first (ties by name).
    fn list_rooms(&self) -> StoreResult<Vec<Room>>;

    /// Remove a room and every message in it, atomically, if `requester`
    /// created it.
    fn delete_room(&self, name: &str, requester: &str) -> StoreResult<DeleteOutcome>;

    /// Append a batch to a room, all or nothing. Each message gets the next
    /// `seq` of the room, in slice order; the stored messages are returned in
    /// that order. `NoSuchRoom` when the room does not exist.
    fn append_messages(&self, room: &str, batch: &[NewMessage]) -> StoreResult<Vec<StoredMessage>>;

    /// Append the batches of several rooms. Each room's batch succeeds or
    /// fails on its own, exactly as [`Store::append_messages`] would; the
    /// results come back in the order of `batches`. Both backends write them
    /// all at once (one transaction on SQLite, one `insert_many` on
    /// MongoDB), so a pass of the reactor over many busy rooms costs one
    /// write, not one each; the default writes room by room.
    fn append_many(&self, batches: &[RoomBatch]) -> Vec<StoreResult<Vec<StoredMessage>>> {
        append_each(self, batches)
    }

    /// The newest `limit` messages with `seq < before` (all when `before` is
    /// `None`), returned oldest first.
    fn messages_before(
        &self,
        room: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// Announce server process `me`, whose counter `beat` rises with every
    /// call, and list every process announced on this database with its
    /// counter (`me` included). Only a database that several server processes
    /// share needs this (see `crate::presence`); the default knows only `me`.
    fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
        Ok(vec![(me.to_owned(), beat)])
    }

    /// Another process stored messages of `room` up to `seq` (it said so
    /// through the broker); `None`: `room` was deleted. Only a hint for
    /// numbering this process's next write of the room: a store that
    /// numbers from a cache (MongoDB) starts there instead of clashing with
    /// the other process's numbers and renumbering. The default ignores it
    /// (SQLite numbers from the database under its write lock).
    fn heard(&self, room: &str, seq: Option<i64>) {
        let _ = (room, seq);
    }

    /// How many times the connection to the database was lost so far. A
    /// database that came back may have come back empty or older: whatever
    /// was cached from before is not to be trusted (`crate::presence`).
    fn connection_losses(&self) -> u64 {
        0
    }

    /// Remove the announcement of process `id` (this one stopping, or one
    /// long gone).
    fn withdraw(&self, id: &str) -> StoreResult<()> {
        let _ = id;
        Ok(())
    }

    /// The newest `limit` messages with `seq > since`, returned oldest first.
    /// When more than `limit` match, the oldest ones are left out, so a caller
    /// sees a gap (its first `seq` is above `since + 1`) and pages the rest.
    fn messages_after(
        &self,
        room: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;
}

/// [`Store::append_many`] as one `append_messages` call per room.
pub fn append_each<S: Store + ?Sized>(
    store: &S,
    batches: &[RoomBatch],
) -> Vec<StoreResult<Vec<StoredMessage>>> {
    batches
        .iter()
        .map(|b| store.append_messages(&b.room, &b.messages))
        .collect()
}
