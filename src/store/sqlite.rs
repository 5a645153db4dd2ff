//! The embedded store: one SQLite file in `DATA_DIR`, WAL mode.
//!
//! Worker threads share a small pool of connections (one per thread that has
//! asked, reused). Writes take SQLite's write lock with `BEGIN IMMEDIATE`, so a
//! batch of messages is one transaction and one fsync: that is what makes
//! group commit pay. Each room keeps its last `seq` in its own row, so
//! numbering a batch is one `UPDATE ... RETURNING` that also proves the room
//! still exists.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::process_lock::ProcessLock;
use super::{
    DeleteOutcome, NewMessage, Room, RoomBatch, Store, StoreError, StoreResult, StoredMessage,
};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "chatconnect.db";

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    username      TEXT PRIMARY KEY NOT NULL,
    password_hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rooms (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    creator    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    room_id   TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    username  TEXT NOT NULL,
    content   TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;
";

pub struct SqliteStore {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// Held by every writing call. SQLite admits one writer at a time and
    /// makes the others sleep and poll ([`wait_for_lock`]), so this
    /// process's writers queue here instead and each starts the moment the
    /// previous one commits.
    writer: Mutex<()>,
    /// Device and inode of the database file when it was opened.
    file: Option<(u64, u64)>,
    /// The other server processes on this data directory (`process_lock.rs`).
    processes: ProcessLock,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn unavailable(err: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

/// The tables have the columns this server reads and writes. `CREATE TABLE
/// IF NOT EXISTS` leaves a table of another program's alone, so a database
/// of someone else's (or a broken one) is refused here, at start and by
/// `/readyz`, instead of failing every call.
fn check_shape(conn: &Connection) -> rusqlite::Result<()> {
    for sql in [
        "SELECT username, password_hash FROM users LIMIT 0",
        "SELECT id, name, creator, created_at, last_seq FROM rooms LIMIT 0",
        "SELECT room_id, seq, username, content, timestamp FROM messages LIMIT 0",
    ] {
        // Prepared afresh and run: a cached statement would not notice a
        // table changed since.
        conn.prepare(sql)?.query([])?.next()?;
    }
    Ok(())
}

/// Why the database could not be opened at start.
enum OpenError {
    Sqlite(rusqlite::Error),
    /// The file has a newer schema version than this server knows.
    Newer(i64),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        OpenError::Sqlite(e)
    }
}

/// The first nap of a call that finds the database locked by another
/// connection (another server process writing the same file).
const BUSY_NAP_FIRST: Duration = Duration::from_micros(50);
/// The longest nap between two tries.
const BUSY_NAP_MAX: Duration = Duration::from_millis(1);
/// Tries before the call fails as busy: with naps of at most
/// `BUSY_NAP_MAX`, about five seconds.
const BUSY_TRIES: i32 = 5_000;

/// The busy handler: whether to try for the lock again after `tries` tries,
/// having napped first. SQLite's own handler backs off to 100 ms naps, so a
/// writer that met another process's transaction (which commits in about a
/// millisecond) slept on long after it ended, and under steady writes from
/// two processes lost the race again and again, tens of milliseconds each
/// time. Here the naps double from 50 µs to 1 ms and stay there.
fn wait_for_lock(tries: i32) -> bool {
    if tries >= BUSY_TRIES {
        return false;
    }
    let nap = BUSY_NAP_FIRST.saturating_mul(1 << tries.clamp(0, 10));
    std::thread::sleep(nap.min(BUSY_NAP_MAX));
    true
}

/// Another connection holds a lock this step needs.
fn is_busy(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _)
        if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == ErrorCode::ConstraintViolation)
}

impl SqliteStore {
    /// Open (creating when needed) the database in `dir`.
    pub fn open(dir: &Path) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let mut store = SqliteStore {
            path: dir.join(DB_FILE),
            idle: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
            file: None,
            processes: ProcessLock::new(dir.join("chatserver.lock")),
        };
        // Another process creating the same database at this moment (while
        // it switches the file to WAL or writes the schema) makes these steps
        // fail with "locked" at once, whatever the busy timeout: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.prepare() {
                Ok(conn) => {
                    store.put(conn);
                    store.file = file_id(&store.path);
                    return Ok(store);
                }
                Err(OpenError::Sqlite(e)) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(OpenError::Sqlite(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot open {}: {e}",
                        store.path.display()
                    )))
                }
                Err(OpenError::Newer(version)) => {
                    return Err(StoreError::Unavailable(format!(
                        "{} was written by a newer chatserver (schema {version}, this one knows {SCHEMA_VERSION})",
                        store.path.display()
                    )))
                }
            }
        }
    }

    /// A connection to a database whose schema is in place.
    fn prepare(&self) -> Result<Connection, OpenError> {
        let conn = self.connect_raw()?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(OpenError::Newer(version));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        check_shape(&conn)?;
        Ok(conn)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file at `path` is still the one opened at start.
    fn same_file(&self) -> bool {
        file_id(&self.path).is_some_and(|id| Some(id) == self.file)
    }

    fn connect(&self) -> StoreResult<Connection> {
        self.connect_raw().map_err(|e| {
            StoreError::Unavailable(format!("cannot open {}: {e}", self.path.display()))
        })
    }

    fn connect_raw(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open(&self.path)?;
        conn.busy_handler(Some(wait_for_lock))?;
        // WAL lets readers run beside the writer; FULL makes every commit
        // durable before the reactor broadcasts it (one fsync per batch).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(conn)
    }

    fn take(&self) -> StoreResult<Connection> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(conn) => Ok(conn),
            None => self.connect(),
        }
    }

    fn put(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    /// Run `f` with a pooled connection. A connection whose call failed is
    /// dropped rather than pooled, in case it was left in a bad state.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = self.take()?;
        let out = f(&mut conn);
        if !matches!(out, Err(StoreError::Unavailable(_))) {
            self.put(conn);
        }
        out
    }

    /// [`SqliteStore::with`] for calls that write: one writer at a time.
    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> StoreResult<T>) -> StoreResult<T> {
        let _turn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.with(f)
    }
}

fn room_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Room> {
    Ok(Room {
        name: r.get(0)?,
        creator: r.get(1)?,
        created_at: r.get(2)?,
    })
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        room_id: r.get(0)?,
        seq: r.get(1)?,
        username: r.get(2)?,
        content: r.get(3)?,
        timestamp: r.get(4)?,
    })
}

fn query_messages(
    conn: &Connection,
    sql: &str,
    room: &str,
    bound: i64,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    let mut stmt = conn.prepare_cached(sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(params![room, bound, limit as i64], message_from_row)
        .map_err(unavailable)?;
    let mut out = rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)?;
    out.reverse();
    Ok(out)
}

/// Number and insert one room's batch inside the caller's transaction.
/// `NoSuchRoom` is found before anything is written.
fn append_in(
    conn: &Connection,
    room: &str,
    batch: &[NewMessage],
) -> StoreResult<Vec<StoredMessage>> {
    // Numbers are taken first: a missing room fails here, before any write.
    let last: Option<i64> = conn
        .prepare_cached(
            "UPDATE rooms SET last_seq = last_seq + ?2 WHERE name = ?1 RETURNING last_seq",
        )
        .and_then(|mut st| {
            st.query_row(params![room, batch.len() as i64], |r| r.get(0))
                .optional()
        })
        .map_err(unavailable)?;
    let Some(last) = last else {
        return Err(StoreError::NoSuchRoom);
    };
    let first = last - batch.len() as i64 + 1;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO messages (room_id, seq, username, content, timestamp)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(unavailable)?;
    let mut stored = Vec::with_capacity(batch.len());
    for (i, m) in batch.iter().enumerate() {
        let seq = first + i as i64;
        insert
            .execute(params![room, seq, m.username, m.content, m.timestamp])
            .map_err(unavailable)?;
        stored.push(m.stored(room, seq));
    }
    Ok(stored)
}

impl Store for SqliteStore {
    fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
        self.processes.announce(me, beat)
    }

    fn withdraw(&self, id: &str) -> StoreResult<()> {
        self.processes.withdraw(id);
        Ok(())
    }

    fn ping(&self) -> StoreResult<()> {
        if !self.same_file() {
            return Err(StoreError::Unavailable(format!(
                "{} was removed or replaced while the server ran; restart it",
                self.path.display()
            )));
        }
        self.with(|c| check_shape(c).map_err(unavailable))
    }

    fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<()> {
        self.write(|c| {
            match c.execute(
                "INSERT INTO users (username, password_hash) VALUES (?1, ?2)",
                params![username, password_hash],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn password_hash(&self, username: &str) -> StoreResult<Option<String>> {
        self.with(|c| {
            c.query_row(
                "SELECT password_hash FROM users WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
    }

    fn create_room(&self, room: &Room) -> StoreResult<()> {
        self.write(|c| {
            match c.execute(
                "INSERT INTO rooms (name, creator, created_at) VALUES (?1, ?2, ?3)",
                params![room.name, room.creator, room.created_at],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn ensure_room(&self, room: &Room) -> StoreResult<Room> {
        // Most joins find their room: a read, which never waits for writers.
        if let Some(found) = self.get_room(&room.name)? {
            return Ok(found);
        }
        self.write(|c| {
            c.execute(
                "INSERT INTO rooms (name, creator, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
                params![room.name, room.creator, room.created_at],
            )
            .map_err(unavailable)?;
            c.query_row(
                "SELECT name, creator, created_at FROM rooms WHERE name = ?1",
                [&room.name],
                room_from_row,
            )
            .map_err(unavailable)
        })
    }

    fn get_room(&self, name: &str) -> StoreResult<Option<Room>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, creator, created_at FROM rooms WHERE name = ?1",
                [name],
                room_from_row,
            )
            .optional()
            .map_err(unavailable)
        })
    }

    fn list_rooms(&self) -> StoreResult<Vec<Room>> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT name, creator, created_at FROM rooms ORDER BY created_at, name",
                )
                .map_err(unavailable)?;
            let rows = stmt.query_map([], room_from_row).map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
    }

    fn delete_room(&self, name: &str, requester: &str) -> StoreResult<DeleteOutcome> {
        self.write(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let creator: Option<String> = tx
                .query_row("SELECT creator FROM rooms WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(unavailable)?;
            let outcome = match creator {
                None => DeleteOutcome::NotFound,
                Some(c) if c != requester => DeleteOutcome::Forbidden,
                Some(_) => {
                    tx.execute("DELETE FROM messages WHERE room_id = ?1", [name])
                        .map_err(unavailable)?;
                    tx.execute("DELETE FROM rooms WHERE name = ?1", [name])
                        .map_err(unavailable)?;
                    DeleteOutcome::Deleted
                }
            };
            tx.commit().map_err(unavailable)?;
            Ok(outcome)
        })
    }

    fn append_messages(&self, room: &str, batch: &[NewMessage]) -> StoreResult<Vec<StoredMessage>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let stored = append_in(&tx, room, batch)?;
            tx.commit().map_err(unavailable)?;
            Ok(stored)
        })
    }

    fn append_many(&self, batches: &[RoomBatch]) -> Vec<StoreResult<Vec<StoredMessage>>> {
        let all = self.write(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut results = Vec::with_capacity(batches.len());
            for b in batches {
                if b.messages.is_empty() {
                    results.push(Ok(Vec::new()));
                    continue;
                }
                match append_in(&tx, &b.room, &b.messages) {
                    Ok(stored) => results.push(Ok(stored)),
                    // Found out before anything of this room was written:
                    // it fails alone and the others go on.
                    Err(StoreError::NoSuchRoom) => results.push(Err(StoreError::NoSuchRoom)),
                    // Anything else may have left part of this room's batch
                    // in the transaction: dropping it rolls all back.
                    Err(e) => return Err(e),
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(results)
        });
        match all {
            Ok(results) => results,
            Err(e) => batches.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn messages_before(
        &self,
        room: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.with(|c| {
            query_messages(
                c,
                "SELECT room_id, seq, username, content, timestamp FROM messages
                 WHERE room_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                room,
                before.unwrap_or(i64::MAX),
                limit,
            )
        })
    }

    fn messages_after(
        &self,
        room: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.with(|c| {
            query_messages(
                c,
                "SELECT room_id, seq, username, content, timestamp FROM messages
                 WHERE room_id = ?1 AND seq > ?2 ORDER BY seq DESC LIMIT ?3",
                room,
                since,
                limit,
            )
        })
    }
}
