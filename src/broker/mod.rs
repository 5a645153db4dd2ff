//! The link to the pub/sub broker (Redis) through which several server
//! processes serve one chat (`BROKER_URL`).
//!
//! A process that stores a batch publishes it on its room's channel
//! (`{BROKER_PREFIX}:room:{name}`); every process with members in that room
//! is subscribed to the channel and delivers it. Deleting a room is
//! published on `{BROKER_PREFIX}:rooms`, to which every process listens.
//! Redis is not trusted to deliver everything: the reactor's relay
//! (`reactor/relay.rs`) puts what arrives in `seq` order and reads whatever
//! is missing from the store, which stays the source of truth.
//!
//! Two threads of their own, each with one connection and the redis crate's
//! synchronous API, so the reactor never waits on Redis:
//! - the *publisher* sends what the reactor hands it, in order, keeping
//!   what it could not send while Redis is away (up to a bound);
//! - the *subscriber* keeps the channels of the rooms the reactor names
//!   subscribed, and hands each notice to the reactor through `deliver`
//!   (a completion and the waker, as workers do).
//!
//! A third thread keeps the member counts of every process in Redis
//! (`census.rs`), for `GET /rooms`.
//!
//! All reconnect on their own, with a backoff.

pub mod census;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

/// What the subscriber tells the reactor.
pub enum Event {
    /// The channel of this room is subscribed (again, after a reconnect):
    /// whatever was published before may have been missed.
    Subscribed(String),
    /// The subscriber lost its connection: nothing arrives until it is back.
    Lost,
    /// Another process stored a batch.
    Batch(wire::Batch),
    /// Another process deleted a room.
    Deleted(String),
    /// The other processes' members, per room (`census.rs`); empty while
    /// Redis is away.
    Counts(HashMap<String, u64>),
}

/// What `/metrics` shows of the broker.
#[derive(Default)]
pub struct BrokerStats {
    pub subscriber_up: AtomicBool,
    pub publisher_up: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    /// Live processes in the last member count, this one included (0 while
    /// Redis is away).
    pub instances: AtomicU64,
}

/// Notices waiting for the publisher at most; past it the oldest goes (the
/// processes that miss it read it from the store at their next gap).
const PUBLISH_BACKLOG: usize = 100_000;
/// How long a thread blocks on Redis before looking at its commands.
const POLL: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

enum SubCmd {
    Subscribe(String),
    Unsubscribe(String),
}

/// The reactor's handle on the two threads.
pub struct Broker {
    /// This process, as named in what it publishes.
    pub id: u64,
    prefix: String,
    to_pub: Sender<(Vec<u8>, Vec<u8>)>,
    to_sub: Sender<SubCmd>,
    pub stats: Arc<BrokerStats>,
}

/// Check a `BROKER_URL` before anything starts.
pub fn check_url(url: &str) -> Result<(), String> {
    if !url.starts_with("redis://") {
        return Err(format!(
            "BROKER_URL {url:?} must be redis://[user:pass@]host:port[/db]"
        ));
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("BROKER_URL {url:?} is not a valid Redis URL: {e}"))
}

impl Broker {
    /// Start the threads. `deliver` runs on the subscriber and census
    /// threads for each event; it must not block. The reporter is how the
    /// reactor hands the census its member counts.
    pub fn start(
        url: &str,
        prefix: &str,
        deliver: impl Fn(Event) + Send + Sync + 'static,
    ) -> Result<(Broker, census::Reporter), String> {
        check_url(url)?;
        let deliver: Arc<dyn Fn(Event) + Send + Sync> = Arc::new(deliver);
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let id = process_id();
        let stats = Arc::new(BrokerStats::default());
        let (to_pub, pub_rx) = crossbeam_channel::unbounded();
        let (to_sub, sub_rx) = crossbeam_channel::unbounded();
        let control = format!("{prefix}:rooms");
        {
            let (client, stats) = (client.clone(), stats.clone());
            thread::Builder::new()
                .name("broker-pub".into())
                .spawn(move || publisher(client, pub_rx, stats))
                .map_err(|e| e.to_string())?;
        }
        let (to_census, census_rx) = crossbeam_channel::unbounded();
        {
            let (client, stats, deliver) = (client.clone(), stats.clone(), deliver.clone());
            let keys = census::Keys::new(prefix, id);
            thread::Builder::new()
                .name("broker-census".into())
                .spawn(move || census::run(client, census_rx, keys, stats, deliver))
                .map_err(|e| e.to_string())?;
        }
        {
            let (stats, prefix) = (stats.clone(), prefix.to_string());
            thread::Builder::new()
                .name("broker-sub".into())
                .spawn(move || subscriber(client, sub_rx, stats, id, prefix, control, deliver))
                .map_err(|e| e.to_string())?;
        }
        let broker = Broker {
            id,
            prefix: prefix.to_string(),
            to_pub,
            to_sub,
            stats,
        };
        Ok((broker, census::Reporter::new(to_census)))
    }

    /// Publish a stored batch of `room`.
    pub fn publish_batch<'a>(
        &self,
        room: &str,
        frames: impl ExactSizeIterator<Item = (i64, &'a [u8])>,
    ) {
        let payload = wire::encode_batch(self.id, room, frames);
        let _ = self
            .to_pub
            .send((room_channel(&self.prefix, room), payload));
    }

    /// Tell every process that `room` was deleted.
    pub fn publish_deleted(&self, room: &str) {
        let payload = wire::encode_deleted(self.id, room);
        let channel = format!("{}:rooms", self.prefix).into_bytes();
        let _ = self.to_pub.send((channel, payload));
    }

    /// Receive the batches of `room` (it has members here).
    pub fn subscribe(&self, room: &str) {
        let _ = self.to_sub.send(SubCmd::Subscribe(room.to_string()));
    }

    /// Stop receiving `room` (its last member here left).
    pub fn unsubscribe(&self, room: &str) {
        let _ = self.to_sub.send(SubCmd::Unsubscribe(room.to_string()));
    }
}

/// A number naming this process on the broker: random enough that two
/// processes never share it.
fn process_id() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish()
}

fn room_channel(prefix: &str, room: &str) -> Vec<u8> {
    let mut c = format!("{prefix}:room:").into_bytes();
    c.extend_from_slice(room.as_bytes());
    c
}

/// Waits between connection attempts: doubling, up to a bound.
struct Backoff {
    next: Duration,
    not_before: Instant,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_MIN,
            not_before: Instant::now(),
        }
    }

    fn ready(&self) -> bool {
        Instant::now() >= self.not_before
    }

    fn failed(&mut self) {
        self.not_before = Instant::now() + self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    client.get_connection_with_timeout(CONNECT_TIMEOUT)
}

fn publisher(client: redis::Client, rx: Receiver<(Vec<u8>, Vec<u8>)>, stats: Arc<BrokerStats>) {
    let mut conn: Option<redis::Connection> = None;
    let mut backlog: VecDeque<(Vec<u8>, Vec<u8>)> = VecDeque::new();
    let mut backoff = Backoff::new();
    let mut warned = false;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(item) => backlog.push_back(item),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        backlog.extend(rx.try_iter());
        while backlog.len() > PUBLISH_BACKLOG {
            backlog.pop_front();
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if conn.is_none() && backoff.ready() {
            match connect(&client) {
                Ok(c) => {
                    conn = Some(c);
                    backoff.reset();
                    stats.publisher_up.store(true, Ordering::Relaxed);
                    if warned {
                        log::warn!("broker: publisher connected again");
                        warned = false;
                    }
                }
                Err(e) => {
                    backoff.failed();
                    if !warned {
                        log::warn!("broker: cannot connect the publisher: {e}; retrying");
                        warned = true;
                    }
                }
            }
        }
        let Some(c) = &mut conn else {
            continue;
        };
        while let Some((channel, payload)) = backlog.front() {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel[..])
                .arg(&payload[..])
                .query(c);
            match sent {
                Ok(_) => {
                    backlog.pop_front();
                    stats.published.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::warn!("broker: publish failed: {e}; reconnecting");
                    warned = true;
                    conn = None;
                    stats.publisher_up.store(false, Ordering::Relaxed);
                    backoff.failed();
                    break;
                }
            }
        }
    }
}

fn subscriber(
    client: redis::Client,
    rx: Receiver<SubCmd>,
    stats: Arc<BrokerStats>,
    me: u64,
    prefix: String,
    control: String,
    deliver: Arc<dyn Fn(Event) + Send + Sync>,
) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut backoff = Backoff::new();
    let mut logged_down = false;
    loop {
        take_commands(&rx, &mut wanted);
        if !backoff.ready() {
            thread::sleep(POLL);
            continue;
        }
        let mut conn = match connect(&client) {
            Ok(c) => c,
            Err(e) => {
                backoff.failed();
                if !logged_down {
                    log::warn!(
                        "broker: cannot reach {}: {e}; serving as a single instance until it answers",
                        client.get_connection_info().addr
                    );
                    logged_down = true;
                }
                continue;
            }
        };
        backoff.reset();
        logged_down = false;
        let result = session(
            &mut conn,
            &rx,
            &mut wanted,
            &stats,
            me,
            &prefix,
            &control,
            &*deliver,
        );
        stats.subscriber_up.store(false, Ordering::Relaxed);
        if let Err(e) = result {
            log::warn!("broker: connection lost: {e}; local fan-out goes on; reconnecting");
            logged_down = true;
        }
        deliver(Event::Lost);
        backoff.failed();
    }
}

/// Apply the reactor's (un)subscribe requests to `wanted`; true if any came.
fn take_commands(rx: &Receiver<SubCmd>, wanted: &mut HashSet<String>) -> bool {
    let mut any = false;
    for cmd in rx.try_iter() {
        any = true;
        match cmd {
            SubCmd::Subscribe(r) => wanted.insert(r),
            SubCmd::Unsubscribe(r) => wanted.remove(&r),
        };
    }
    any
}

/// One connection's life: subscribe to what is wanted, pass on what
/// arrives, until the connection fails.
#[allow(clippy::too_many_arguments)]
fn session(
    conn: &mut redis::Connection,
    rx: &Receiver<SubCmd>,
    wanted: &mut HashSet<String>,
    stats: &BrokerStats,
    me: u64,
    prefix: &str,
    control: &str,
    deliver: &dyn Fn(Event),
) -> redis::RedisResult<()> {
    let mut ps = conn.as_pubsub();
    ps.set_read_timeout(Some(POLL))?;
    ps.subscribe(control)?;
    stats.subscriber_up.store(true, Ordering::Relaxed);
    log::info!("broker: connected; subscribed to {control}");
    let mut active: HashSet<String> = HashSet::new();
    // Everything wanted is new on a new connection.
    let mut changed = true;
    loop {
        changed |= take_commands(rx, wanted);
        if changed {
            changed = false;
            let adds: Vec<String> = wanted.difference(&active).cloned().collect();
            for room in adds {
                ps.subscribe(room_channel(prefix, &room))?;
                active.insert(room.clone());
                deliver(Event::Subscribed(room));
            }
            let drops: Vec<String> = active.difference(wanted).cloned().collect();
            for room in drops {
                ps.unsubscribe(room_channel(prefix, &room))?;
                active.remove(&room);
            }
        }
        let msg = match ps.get_message() {
            Ok(m) => m,
            Err(e) if e.is_timeout() => continue,
            Err(e) => return Err(e),
        };
        let payload: Vec<u8> = match msg.get_payload() {
            Ok(p) => p,
            Err(_) => continue,
        };
        match wire::decode(&payload) {
            Some(wire::Notice::Batch(b)) if b.from != me => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                deliver(Event::Batch(b));
            }
            Some(wire::Notice::Deleted { from, room }) if from != me => {
                deliver(Event::Deleted(room));
            }
            Some(_) => {}
            None => log::debug!("broker: ignored a message this version cannot read"),
        }
    }
}
