//! Numbers for `GET /metrics`, in Prometheus text format.
//!
//! Counters that only the reactor changes live in plain fields of the reactor
//! ([`Counters`]); what worker threads measure (store call latency, batch
//! sizes) goes through the atomic [`Histogram`]s of [`Shared`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::{DeleteOutcome, NewMessage, Room, RoomBatch, Store, StoreResult, StoredMessage};

/// A fixed-bucket histogram that any thread can add to.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, so an integer atomic can hold it.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Append this histogram under `name` with its HELP line.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// What worker threads record.
pub struct Shared {
    pub store_latency: Histogram,
    pub store_errors: AtomicU64,
    pub batch_size: Histogram,
    /// From a chat message's arrival to its broadcast: waiting for a store
    /// write, the write, and the reactor picking up the completion.
    pub commit_latency: Histogram,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            store_latency: Histogram::new(LATENCY_BOUNDS),
            store_errors: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_BOUNDS),
            commit_latency: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

/// Counters owned by the reactor thread.
#[derive(Default, Debug)]
pub struct Counters {
    pub http_connections: u64,
    pub ws_connections: u64,
    pub http_requests: u64,
    pub messages_received: u64,
    pub messages_rejected: u64,
    pub messages_stored: u64,
    pub messages_delivered: u64,
    pub slow_consumer_closes: u64,
    pub accept_pauses: u64,
    /// Connections closed, for any reason, since start.
    pub connections_closed: u64,
}

/// Helper to write one gauge or counter.
pub fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// A [`Store`] that times every call into [`Shared::store_latency`].
pub struct TimedStore {
    inner: std::sync::Arc<dyn Store>,
    shared: std::sync::Arc<Shared>,
}

impl TimedStore {
    pub fn new(inner: std::sync::Arc<dyn Store>, shared: std::sync::Arc<Shared>) -> TimedStore {
        TimedStore { inner, shared }
    }

    fn timed<T>(&self, call: impl FnOnce(&dyn Store) -> StoreResult<T>) -> StoreResult<T> {
        let start = std::time::Instant::now();
        let out = call(self.inner.as_ref());
        self.record(start, u64::from(out.is_err()));
        out
    }

    /// One store call that started at `start` and had `failed` failures.
    fn record(&self, start: std::time::Instant, failed: u64) {
        let took: Duration = start.elapsed();
        self.shared.store_latency.observe(took.as_secs_f64());
        if failed > 0 {
            self.shared
                .store_errors
                .fetch_add(failed, Ordering::Relaxed);
        }
    }
}

impl Store for TimedStore {
    fn ping(&self) -> StoreResult<()> {
        self.timed(|s| s.ping())
    }
    fn create_user(&self, username: &str, password_hash: &str) -> StoreResult<()> {
        self.timed(|s| s.create_user(username, password_hash))
    }
    fn password_hash(&self, username: &str) -> StoreResult<Option<String>> {
        self.timed(|s| s.password_hash(username))
    }
    fn create_room(&self, room: &Room) -> StoreResult<()> {
        self.timed(|s| s.create_room(room))
    }
    fn ensure_room(&self, room: &Room) -> StoreResult<Room> {
        self.timed(|s| s.ensure_room(room))
    }
    fn get_room(&self, name: &str) -> StoreResult<Option<Room>> {
        self.timed(|s| s.get_room(name))
    }
    fn list_rooms(&self) -> StoreResult<Vec<Room>> {
        self.timed(|s| s.list_rooms())
    }
    fn delete_room(&self, name: &str, requester: &str) -> StoreResult<DeleteOutcome> {
        self.timed(|s| s.delete_room(name, requester))
    }
    fn append_messages(&self, room: &str, batch: &[NewMessage]) -> StoreResult<Vec<StoredMessage>> {
        self.shared.batch_size.observe(batch.len() as f64);
        self.timed(|s| s.append_messages(room, batch))
    }
    // Presence rounds are not chat work: they are not timed.
    fn announce(&self, me: &str, beat: i64) -> StoreResult<Vec<(String, i64)>> {
        self.inner.announce(me, beat)
    }
    fn withdraw(&self, id: &str) -> StoreResult<()> {
        self.inner.withdraw(id)
    }
    fn connection_losses(&self) -> u64 {
        self.inner.connection_losses()
    }
    fn heard(&self, room: &str, seq: Option<i64>) {
        self.inner.heard(room, seq)
    }
    fn append_many(&self, batches: &[RoomBatch]) -> Vec<StoreResult<Vec<StoredMessage>>> {
        let messages: usize = batches.iter().map(|b| b.messages.len()).sum();
        self.shared.batch_size.observe(messages as f64);
        let start = std::time::Instant::now();
        let out = self.inner.append_many(batches);
        self.record(start, out.iter().filter(|r| r.is_err()).count() as u64);
        out
    }
    fn messages_before(
        &self,
        room: &str,
        before: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.timed(|s| s.messages_before(room, before, limit))
    }
    fn messages_after(
        &self,
        room: &str,
        since: i64,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.timed(|s| s.messages_after(room, since, limit))
    }
}
