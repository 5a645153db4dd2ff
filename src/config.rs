//! Configuration: environment variables, a `.env` file and command-line flags,
//! in one place.
//!
//! Precedence, highest first: a flag, a variable already in the environment, a
//! line of `./.env`, the default. An empty variable counts as unset, so
//! `MONGO_URI=` in a `.env` file selects the embedded store as the seed's
//! example file implies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How the server learns who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// The seed's behaviour: the `username` parameter is trusted, a token wins when sent.
    Open,
    /// WebSocket connects and room changes need a valid bearer token.
    Token,
}

/// Every setting of the server. `chatserver --help` prints this table.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chatserver",
    version,
    about = "ChatConnect: REST accounts and rooms, WebSocket chat, SQLite or MongoDB storage.",
    after_help = "Each flag can also be set by the environment variable shown, or by a line \
                  of ./.env. An empty variable counts as unset."
)]
pub struct Config {
    /// Listen port (0 picks a free one and logs it)
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// Listen address
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Let several processes bind the same HOST:PORT (SO_REUSEPORT); the
    /// kernel spreads new connections over them (`true` or `false`)
    #[arg(long, env = "REUSE_PORT", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = parse_bool)]
    pub reuse_port: bool,

    /// Serve the web client at `/` (`true` or `false`)
    #[arg(long, env = "WEB_UI", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = parse_bool)]
    pub web_ui: bool,

    /// MongoDB connection string; unset means the embedded SQLite store
    #[arg(long, env = "MONGO_URI", hide_env_values = true)]
    pub mongo_uri: Option<String>,

    /// MongoDB database name
    #[arg(long, env = "MONGO_DB", default_value = "chatapp")]
    pub mongo_db: String,

    /// MongoDB server selection and connect timeout
    #[arg(long, env = "MONGO_TIMEOUT", default_value = "3s", value_parser = parse_interval)]
    pub mongo_timeout: Duration,

    /// Directory of the embedded database and the generated token secret
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// `open` trusts the username parameter; `token` requires bearer tokens
    #[arg(long, env = "AUTH_MODE", value_enum, default_value_t = AuthMode::Open)]
    pub auth_mode: AuthMode,

    /// Token signing secret (generated once into DATA_DIR when unset)
    #[arg(long, env = "TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,

    /// Token lifetime
    #[arg(long, env = "TOKEN_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub token_ttl: Duration,

    /// bcrypt cost for new password hashes
    #[arg(long, env = "BCRYPT_COST", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Threads for blocking work (default: cores, at least 2)
    #[arg(long, env = "WORKERS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub workers: Option<u32>,

    /// Messages sent to a WebSocket when it joins
    #[arg(long, env = "HISTORY_LIMIT", default_value_t = 50)]
    pub history_limit: usize,

    /// Memory for the recent history of active rooms, kept so joins need no
    /// store read (0 turns the cache off)
    #[arg(long, env = "HISTORY_CACHE", default_value = "32MiB", value_parser = parse_size)]
    pub history_cache: usize,

    /// Threads for store reads and REST store calls (default: WORKERS on
    /// SQLite, 16 on MongoDB)
    #[arg(long, env = "STORE_THREADS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub store_threads: Option<u32>,

    /// Threads writing chat messages, each one write in flight (default:
    /// WORKERS on SQLite, 1 on MongoDB)
    #[arg(long, env = "STORE_WRITERS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub store_writers: Option<u32>,

    /// Longest message content, in characters
    #[arg(long, env = "MAX_MESSAGE_CHARS", default_value_t = 4000)]
    pub max_message_chars: usize,

    /// Value of Access-Control-Allow-Origin
    #[arg(long, env = "CORS_ORIGIN", default_value = "*")]
    pub cors_origin: String,

    /// Messages per second per WebSocket; 0 turns the limit off
    #[arg(long, env = "WS_RATE_LIMIT", default_value_t = 100.0)]
    pub ws_rate_limit: f64,

    /// Burst allowance of the rate limit
    #[arg(long, env = "WS_RATE_BURST", default_value_t = 200.0)]
    pub ws_rate_burst: f64,

    /// Unsent bytes per WebSocket before it is closed as a slow consumer (1008)
    #[arg(long, env = "WS_MAX_BACKLOG", default_value = "1MiB", value_parser = parse_size)]
    pub ws_max_backlog: usize,

    /// Redis URL of the broker that lets several processes serve one chat
    /// (redis://[user:pass@]host:port[/db]); unset: one process
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,

    /// Prefix of the broker's channels, so deployments can share a Redis
    #[arg(long, env = "BROKER_PREFIX", default_value = "chatconnect")]
    pub broker_prefix: String,

    /// Bytes all connections' buffers may hold together; over it, the
    /// connections holding the most are closed (0 = no cap)
    #[arg(long, env = "MAX_CLIENT_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    pub max_client_memory: usize,

    /// Largest WebSocket frame or message (1009 above it)
    #[arg(long, env = "WS_MAX_MESSAGE", default_value = "64KiB", value_parser = parse_size)]
    pub ws_max_message: usize,

    /// Server ping period; a silent connection is closed after three periods
    #[arg(long, env = "PING_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub ping_interval: Duration,

    /// Time a client has to send a complete request head (408 after it)
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub http_header_timeout: Duration,

    /// Time an idle keep-alive HTTP connection is kept open between requests
    #[arg(long, env = "HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_interval)]
    pub http_idle_timeout: Duration,

    /// Largest HTTP request head (431 above it)
    #[arg(long, env = "HTTP_MAX_HEAD", default_value = "16KiB", value_parser = parse_size)]
    pub http_max_head: usize,

    /// Largest HTTP request body (413 above it)
    #[arg(long, env = "HTTP_MAX_BODY", default_value = "64KiB", value_parser = parse_size)]
    pub http_max_body: usize,

    /// Most messages in one store write, over all its rooms (1 turns group commit off)
    #[arg(long, env = "STORE_BATCH_MAX", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub store_batch_max: u32,

    /// Longest a graceful shutdown may take before connections are dropped
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// Every variable the server reads (the empty-means-unset rule uses it; test
/// harnesses clear them so the machine's environment cannot leak in).
pub const VARIABLES: &[&str] = &[
    "PORT",
    "HOST",
    "REUSE_PORT",
    "WEB_UI",
    "MONGO_URI",
    "MONGO_DB",
    "MONGO_TIMEOUT",
    "DATA_DIR",
    "AUTH_MODE",
    "TOKEN_SECRET",
    "TOKEN_TTL",
    "BCRYPT_COST",
    "WORKERS",
    "HISTORY_LIMIT",
    "HISTORY_CACHE",
    "STORE_THREADS",
    "STORE_WRITERS",
    "MAX_MESSAGE_CHARS",
    "CORS_ORIGIN",
    "WS_RATE_LIMIT",
    "WS_RATE_BURST",
    "WS_MAX_BACKLOG",
    "WS_MAX_MESSAGE",
    "MAX_CLIENT_MEMORY",
    "BROKER_URL",
    "BROKER_PREFIX",
    "PING_INTERVAL",
    "HTTP_HEADER_TIMEOUT",
    "HTTP_IDLE_TIMEOUT",
    "HTTP_MAX_HEAD",
    "HTTP_MAX_BODY",
    "STORE_BATCH_MAX",
    "SHUTDOWN_TIMEOUT",
];

impl Config {
    /// Read `./.env`, drop empty variables, then parse flags and environment.
    /// Must run before any other thread starts (it edits the environment).
    pub fn load() -> Config {
        // A missing .env is normal; a malformed one is worth a warning, which
        // the caller cannot log yet (logging needs the config), so print it.
        if let Err(err) = dotenvy::from_path(".env") {
            if !err.not_found() {
                eprintln!("warning: ignoring ./.env: {err}");
            }
        }
        for name in VARIABLES {
            if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
                // SAFETY of the call: start-up is single-threaded here.
                std::env::remove_var(name);
            }
        }
        Config::parse()
    }

    /// The worker count in force.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2),
        }
    }

    /// Threads of the store lane (reads and REST calls). A network database
    /// spends most of a call waiting for the reply, so MongoDB gets many
    /// whatever the core count; SQLite works on this machine's cores.
    pub fn store_threads(&self) -> usize {
        match (self.store_threads, &self.mongo_uri) {
            (Some(n), _) => n as usize,
            (None, Some(_)) => 16,
            (None, None) => self.worker_count(),
        }
    }

    /// Threads of the write lane (chat messages), one write in flight each.
    /// On MongoDB one write at a time, carrying every room's waiting
    /// messages, measured best: on FerretDB two writers at 2,000 msg/s over
    /// 200 rooms doubled the p99 (158 ms against 71 ms), four made it 397 ms.
    pub fn store_writers(&self) -> usize {
        match (self.store_writers, &self.mongo_uri) {
            (Some(n), _) => n as usize,
            (None, Some(_)) => 1,
            (None, None) => self.worker_count(),
        }
    }

    /// The listen address, or a sentence saying what is wrong with HOST/PORT.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = if host == "localhost" {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            host.parse()
                .map_err(|_| format!("HOST {:?} is not an IP address", self.host))?
        };
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// The longest duration any setting takes: timers are added to the clock,
/// and ten years keeps every sum far from overflowing. A year as humantime
/// counts it (365.25 days), so that `10y` is accepted.
const LONGEST: Duration = Duration::from_secs(10 * 31_557_600);

/// `30s`, `500ms`, `24h`, `1h 30m`; a bare number is seconds. Zero is
/// allowed; more than ten years is not.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); try 30s or 24h"))?,
    };
    if d > LONGEST {
        return Err(format!("{s:?} is longer than ten years"));
    }
    Ok(d)
}

/// A period or timeout: at least 10 ms (zero would time everything out at
/// once).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{:?} is too short; use at least 10ms", s.trim()));
    }
    Ok(d)
}

/// A token lifetime: at least a second, since tokens count whole seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{:?} is too short; use at least 1s", s.trim()));
    }
    Ok(d)
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`), any case.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{:?} is not a boolean; use true or false",
            s.trim()
        )),
    }
}

/// `64KiB`, `1MiB`, `512`, `2KB`; binary and decimal suffixes, case-insensitive.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; try 65536, 64KiB or 1MiB"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}; use KiB or MiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("2kb").unwrap(), 2000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("11 years").is_err());
        assert!(parse_duration("10y").is_ok());
        assert!(parse_interval("0s").is_err());
        assert_eq!(parse_interval("10ms").unwrap(), Duration::from_millis(10));
        assert!(parse_ttl("999ms").is_err());
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn bools() {
        assert!(parse_bool("true").unwrap());
        assert!(parse_bool(" TRUE ").unwrap());
        assert!(parse_bool("1").unwrap());
        assert!(!parse_bool("false").unwrap());
        assert!(!parse_bool("0").unwrap());
        assert!(parse_bool("maybe").is_err());
    }

    #[test]
    fn reuse_port_flag() {
        // Flags only: a flag wins over the environment, so the machine's
        // REUSE_PORT cannot change the outcome.
        let c = Config::try_parse_from(["chatserver", "--reuse-port", "true"]).unwrap();
        assert!(c.reuse_port);
        let c = Config::try_parse_from(["chatserver", "--reuse-port=false"]).unwrap();
        assert!(!c.reuse_port);
        let c = Config::try_parse_from(["chatserver", "--reuse-port"]).unwrap();
        assert!(c.reuse_port);
        assert!(Config::try_parse_from(["chatserver", "--reuse-port", "sure"]).is_err());
    }
}
