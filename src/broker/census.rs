//! Live member counts across processes: each process's count of members per
//! room, kept in Redis, so that `GET /rooms` on any process counts everyone.
//!
//! Each process owns one key, `{prefix}:members:{id}`, holding a JSON object
//! of its rooms with members (`{"General": 3}`), written with an expiry of
//! [`EXPIRY`] and rewritten every [`REFRESH`]; its id is also in the set
//! `{prefix}:instances`. A round writes this process's key, reads the set,
//! reads every other process's key in one `MGET`, and removes from the set
//! the ids whose key has expired. A process that dies stops refreshing its
//! key, so it drops out of everyone's counts within `EXPIRY + REFRESH`; one
//! that stops cleanly removes its key at once. No clocks are compared across
//! hosts: Redis expires the keys.
//!
//! One thread of its own with its own connection (so a slow round never
//! delays a publish). The reactor hands it a snapshot of its counts about
//! once a [`REFRESH`] (`Reporter::report`) and receives the other processes'
//! totals as [`Event::Counts`] through the same `deliver` as the subscriber.
//! While Redis is unreachable the others' counts are reported empty: this
//! process then counts only its own members, as a single instance does.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{connect, Backoff, BrokerStats, Event};

/// How often a process rewrites its counts and reads the others'.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long a process's counts stay without being rewritten.
pub const EXPIRY: Duration = Duration::from_secs(3);

/// Members per room in this process (rooms with none are left out).
pub type Counts = HashMap<String, u64>;

/// The reactor's side: hands the census thread this process's counts.
pub struct Reporter {
    tx: Sender<Counts>,
}

impl Reporter {
    pub(super) fn new(tx: Sender<Counts>) -> Reporter {
        Reporter { tx }
    }

    /// This process's counts now.
    pub fn report(&self, counts: Counts) {
        let _ = self.tx.send(counts);
    }
}

/// Where this process's counts live in Redis.
pub(super) struct Keys {
    id: String,
    mine: String,
    instances: String,
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, id: u64) -> Keys {
        let id = format!("{id:016x}");
        Keys {
            mine: format!("{prefix}:members:{id}"),
            instances: format!("{prefix}:instances"),
            prefix: prefix.to_string(),
            id,
        }
    }

    fn of(&self, id: &str) -> String {
        format!("{}:members:{id}", self.prefix)
    }
}

/// The census thread: a round every [`REFRESH`] (sooner after a snapshot
/// when one is due), until the reactor's `Reporter` is dropped.
pub(super) fn run(
    client: redis::Client,
    rx: Receiver<Counts>,
    keys: Keys,
    stats: Arc<BrokerStats>,
    deliver: Arc<dyn Fn(Event) + Send + Sync>,
) {
    let mut conn: Option<redis::Connection> = None;
    let mut backoff = Backoff::new();
    let mut latest = Counts::new();
    let mut next_round = Instant::now();
    // Whether the others' counts last reported were empty because Redis
    // was away (so an empty report is not sent again every round).
    let mut reported_empty = true;
    loop {
        match rx.recv_timeout(REFRESH) {
            Ok(c) => latest = c,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if let Some(c) = &mut conn {
                    withdraw(c, &keys);
                }
                return;
            }
        }
        if let Some(c) = rx.try_iter().last() {
            latest = c;
        }
        let now = Instant::now();
        if now < next_round {
            continue;
        }
        next_round = now + REFRESH;
        if conn.is_none() && backoff.ready() {
            match connect(&client) {
                Ok(c) => {
                    conn = Some(c);
                    backoff.reset();
                }
                Err(_) => backoff.failed(),
            }
        }
        let outcome = conn.as_mut().map(|c| round(c, &keys, &latest));
        if let Some(Ok(others)) = outcome {
            stats
                .instances
                .store(others.instances + 1, Ordering::Relaxed);
            reported_empty = false;
            deliver(Event::Counts(others.members));
            continue;
        }
        if let Some(Err(e)) = outcome {
            log::debug!("broker: member counts round failed: {e}");
            conn = None;
            backoff.failed();
        }
        // No Redis: this process counts only its own members.
        stats.instances.store(0, Ordering::Relaxed);
        if !reported_empty {
            reported_empty = true;
            deliver(Event::Counts(HashMap::new()));
        }
    }
}

/// What one round learnt of the other processes.
struct Others {
    /// Live processes besides this one.
    instances: u64,
    /// Their members, summed per room.
    members: HashMap<String, u64>,
}

/// Write this process's counts, then read everyone else's.
fn round(c: &mut redis::Connection, keys: &Keys, counts: &Counts) -> redis::RedisResult<Others> {
    let value = serde_json::to_vec(counts).expect("a map of strings to numbers is JSON");
    let (ids,): (Vec<String>,) = redis::pipe()
        .cmd("SET")
        .arg(&keys.mine)
        .arg(value)
        .arg("PX")
        .arg(EXPIRY.as_millis() as u64)
        .ignore()
        .cmd("SADD")
        .arg(&keys.instances)
        .arg(&keys.id)
        .ignore()
        .cmd("SMEMBERS")
        .arg(&keys.instances)
        .query(c)?;
    let others: Vec<String> = ids.into_iter().filter(|id| *id != keys.id).collect();
    let mut out = Others {
        instances: 0,
        members: HashMap::new(),
    };
    if others.is_empty() {
        return Ok(out);
    }
    let names: Vec<String> = others.iter().map(|id| keys.of(id)).collect();
    let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&names).query(c)?;
    let mut gone = Vec::new();
    for (id, value) in others.iter().zip(values) {
        let Some(value) = value else {
            gone.push(id);
            continue;
        };
        out.instances += 1;
        // A value this version cannot read counts as nobody.
        let Ok(theirs) = serde_json::from_slice::<HashMap<String, u64>>(&value) else {
            continue;
        };
        for (room, n) in theirs {
            *out.members.entry(room).or_default() += n;
        }
    }
    if !gone.is_empty() {
        redis::cmd("SREM").arg(&keys.instances).arg(&gone).exec(c)?;
    }
    Ok(out)
}

/// A clean stop: this process's counts go at once (best effort; otherwise
/// they expire).
fn withdraw(c: &mut redis::Connection, keys: &Keys) {
    let _ = redis::pipe()
        .cmd("DEL")
        .arg(&keys.mine)
        .ignore()
        .cmd("SREM")
        .arg(&keys.instances)
        .arg(&keys.id)
        .ignore()
        .exec(c);
}
