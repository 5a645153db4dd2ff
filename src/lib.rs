//! ChatConnect: a real-time chat server on a single-threaded `mio` reactor.
//!
//! `main.rs` only reads the configuration and calls [`serve`]. The modules, in
//! the order a request meets them: [`reactor`] (the event loop), [`http`]
//! (parsing and responses), [`api`] (the endpoints), [`ws`] and [`rooms`]
//! (WebSocket connections and the live room registry), [`history`] (recent
//! history in memory) and [`presence`] (whether other processes write the
//! same database), [`workers`] (the threads that do blocking work), [`store`]
//! (persistence), plus [`config`], [`auth`], [`metrics`] and [`outbuf`].

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod history;
pub mod http;
pub mod metrics;
pub mod outbuf;
pub mod presence;
pub mod reactor;
pub mod rooms;
pub mod store;
pub mod web;
pub mod workers;
pub mod ws;
pub mod ws_input;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use config::{AuthMode, Config};
use store::Store;

/// Open the store, bind, serve until SIGINT or SIGTERM, then shut down
/// gracefully. Errors are sentences for the operator.
pub fn serve(cfg: Config) -> Result<(), String> {
    raise_fd_limit();
    if let Some(url) = &cfg.broker_url {
        broker::check_url(url)?;
    }
    let shared = Arc::new(metrics::Shared::default());
    let backend: Arc<dyn Store> = match &cfg.mongo_uri {
        Some(uri) => {
            let mongo = store::mongo::MongoStore::connect(uri, &cfg.mongo_db, cfg.mongo_timeout)
                .map_err(|e| format!("cannot use MONGO_URI: {e}"))?;
            log::info!("store: MongoDB database {:?}", mongo.database_name());
            let mongo = Arc::new(mongo);
            prepare_in_background(mongo.clone());
            mongo
        }
        None => {
            let s = store::sqlite::SqliteStore::open(&cfg.data_dir)
                .map_err(|e| format!("cannot open the embedded store: {e}"))?;
            log::info!("store: SQLite at {}", s.path().display());
            Arc::new(s)
        }
    };
    let store: Arc<dyn Store> = Arc::new(metrics::TimedStore::new(backend, shared.clone()));

    let secret = auth::load_secret(cfg.token_secret.as_deref(), &cfg.data_dir)?;
    let tokens = auth::Tokens::new(&secret, cfg.token_ttl);
    if cfg.auth_mode == AuthMode::Open {
        log::warn!(
            "AUTH_MODE=open: clients choose their own username; set AUTH_MODE=token to require logins"
        );
    }

    // Other processes on the same database: the history cache trusts itself
    // only while there are none (`presence`).
    let counted = store.clone();
    let presence = presence::Presence::new(Box::new(move || counted.connection_losses()));
    let announcing = presence::start(presence.clone(), store.clone())
        .map_err(|e| format!("cannot start the presence thread: {e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let lanes = (cfg.worker_count(), cfg.store_threads(), cfg.store_writers());
    let (reactor, waker) =
        reactor::Reactor::new(cfg, store, shared, tokens, presence.clone(), stop.clone())
            .map_err(|e| format!("cannot listen: {e}"))?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if stop.swap(true, Ordering::SeqCst) {
                    log::warn!("second signal {sig}: exiting now");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: shutting down gracefully");
                let _ = waker.wake();
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;

    log::info!(
        "chatserver listening on {} ({} hash, {} store, {} write threads)",
        reactor.local_addr(),
        lanes.0,
        lanes.1,
        lanes.2
    );
    let result = reactor.run().map_err(|e| format!("event loop failed: {e}"));
    // Withdraw from the database, so other processes trust their caches
    // again at once.
    // Not waited for past a second: a round may be stuck on an unreachable
    // database, and the process is ending anyway.
    presence.stop();
    let waited = std::time::Instant::now();
    while !announcing.is_finished() && waited.elapsed() < std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    result
}

/// Every socket is a file descriptor, and many shells and service managers
/// start processes with a soft limit of 1024 under a far higher hard limit.
/// Raise the soft limit to the hard one, as the Go runtime does for the
/// original server, so that the first thousand idle clients do not exhaust
/// it. A failure only leaves the limit as it was.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        log::warn!(
            "cannot read the open file limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let soft = lim.rlim_cur;
    if soft < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            log::info!("open file limit raised from {soft} to {}", lim.rlim_max);
            return;
        }
        log::warn!(
            "cannot raise the open file limit from {soft} to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    log::info!("open file limit: {soft} (each connection takes one)");
}

/// Create MongoDB's indexes as soon as the database answers, without holding
/// up start-up: the server serves (with 503s) while the database is away.
fn prepare_in_background(mongo: Arc<store::mongo::MongoStore>) {
    let spawned = std::thread::Builder::new()
        .name("mongo-prepare".into())
        .spawn(move || {
            let mut delay = std::time::Duration::from_secs(1);
            loop {
                match mongo.prepare() {
                    Ok(()) => {
                        log::info!("MongoDB indexes ready");
                        match mongo.number_all_legacy() {
                            Ok(0) => {}
                            Ok(n) => log::info!("numbered the earlier messages of {n} rooms"),
                            Err(e) => log::warn!(
                                "numbering earlier messages stopped ({e}); rooms are numbered on first use"
                            ),
                        }
                        return;
                    }
                    Err(e) => {
                        log::warn!("MongoDB not ready ({e}); retrying in {delay:?}");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the index thread: {e}; indexes are created on first use");
    }
}
