//! The command line: the usage text, the flags (`Opts`), and what every
//! scenario is given (`Ctx`: the target, its kind and the flags).
//!
//! `main` parses the arguments here; scenarios read their own flags with
//! `Opts::num` and `Opts::text`, each with a full and a `--quick` default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::ws_client::mono_ns;

pub const USAGE: &str = "\
loadgen: load scenarios for ChatConnect and its yardsticks

usage: cargo bench --bench loadgen -- SCENARIO [flags]
       cargo bench --bench loadgen -- report DIR

scenarios: idle, fanout, many, joinstorm, login, rest

common flags:
  --addr HOST:PORT     server to drive (default 127.0.0.1:8000)
  --server-pid PID     server process, for RSS and CPU figures
  --kind K             server | baseline | floor (floor: no history, no seq, no login)
  --label NAME         name of the target in reports (default: the kind)
  --store NAME         the store the server runs on (sqlite, ferretdb): recorded in
                       the result; the report gives each store a row of its own
  --json-out FILE      also write the JSON result there
  --quick              small sizes, for development
  --procs N            client processes (default 2, more for idle and joinstorm when
                       needed: one per 9,000 sockets; fanout adds one for its senders)
  --history-limit N    messages the server sends on join (default 50)

idle:   --conns 19000 --rooms 100 --seed 10 --hold 10
        --concurrency 96 (handshakes in flight over all processes: keep it under
        the target's accept backlog, or SYNs are dropped and retried a second later)
fanout: --members 5000 --senders 10 --rate 2 --factor 2 --steps 11 --refine 3
        --retrials 6 (extra trials: the top passing rate and the failed one above
        it need two alike) --step-secs 4 --drain-secs 5 --p99-limit-ms 100
        --size 64 --seed 3 --all-steps
        --deadline-ms D (deliveries within D ms count as on time; default the p99 limit)
        --once: no ramp, one step at --rate msg/s for --step-secs, reported whether it
        passed or not (all delivered?, fraction on time, p50/p99); fails only on a loss
many:   --rooms 1000 --room-size 10 --senders-per-room K (default: every member)
        --rate 250 (total msg/s) --factor 2 --steps 8 --refine 3 (rest as fanout)
joinstorm: --conns 5000 --rooms 50 --seed 20 (history messages per room; each socket
        must get the newest min(seed, --history-limit) in seq order) --in-flight 200
        (connects in flight over all processes; 0 = all at once) --chat-rate 20 (msg/s
        of the chatter in a room of its own; 0 = none) --quiet-secs 2 (chatting before
        the storm) --hold 2 (after it, before RSS) --connect-timeout 60 (per socket)
        --storm-secs 120 (the whole storm) --retries 0 --retry-ms 200 (refused upgrades
        tried again; none by default: a refusal is a refusal)
        --quick: --conns 1000 --rooms 20 --quiet-secs 1 --hold 1 --connect-timeout 30
        --storm-secs 60
login:  --logins 8 --secs 10 --quiet-secs 3 --rtt-interval-ms 10 --workers N --cost 10
rest:   --conns 50 --secs 10 --threads 2 --rooms 20 --no-wrk

cluster (fanout and many over several instances of one chat, sharing a store and a
Redis broker): --addr A,B (one address per instance; members and senders are split
evenly, each room over every instance) --server-pid PA,PB (same order)
        --redis HOST:PORT (the broker: its CPU and bytes per message, from INFO)
        --single FILE (the same scenario's JSON result on one instance: the ratio of
        deliveries/s, and a hop step at its sustained rate) --hop-rate R (that step's
        rate without --single). The result is named cluster-fanout or cluster-many;
        its latencies are split into same-instance and cross-instance deliveries.
";

/// The arguments: `--key value` (or `--key=value`), bare flags, positionals.
pub struct Opts {
    pub vals: HashMap<String, String>,
    flags: Vec<String>,
    pub pos: Vec<String>,
}

const BOOL_FLAGS: &[&str] = &[
    "--quick",
    "--no-wrk",
    "--all-steps",
    "--once",
    "--help",
    "-h",
];

pub fn die(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2);
}

impl Opts {
    pub fn parse(argv: &[String]) -> Opts {
        let mut o = Opts {
            vals: HashMap::new(),
            flags: Vec::new(),
            pos: Vec::new(),
        };
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if BOOL_FLAGS.contains(&a.as_str()) {
                o.flags.push(a.clone());
            } else if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    o.vals.insert(k.to_string(), v.to_string());
                } else {
                    let Some(v) = argv.get(i + 1) else {
                        die(&format!("--{k} needs a value"));
                    };
                    o.vals.insert(k.to_string(), v.clone());
                    i += 1;
                }
            } else {
                o.pos.push(a.clone());
            }
            i += 1;
        }
        o
    }

    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// A number: the flag if given, else the full or the quick default.
    pub fn num<T: FromStr>(&self, key: &str, full: T, quick: T) -> T {
        match self.vals.get(key) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| die(&format!("--{key}: not a valid number: {v}"))),
            None if self.has("--quick") => quick,
            None => full,
        }
    }

    pub fn text(&self, key: &str, default: &str) -> String {
        self.vals
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

/// What is driven: chatserver or one of its yardsticks (`floor` has no
/// history, no `seq` and no login).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Server,
    Baseline,
    Floor,
}

/// What every scenario is given.
pub struct Ctx {
    /// The first (or only) instance: seeding, and every single-server
    /// scenario.
    pub addr: SocketAddr,
    /// Every instance of one chat (`--addr A,B`); `[addr]` for one.
    pub addrs: Vec<SocketAddr>,
    /// The server process, for its RSS and CPU time (the first instance's).
    pub pid: Option<u32>,
    /// The process of each instance, in the order of `addrs` (may be empty).
    pub pids: Vec<u32>,
    pub kind: Kind,
    /// The target's name in the results and the report.
    pub label: String,
    /// Unique to this run, in room names, so runs do not share rooms.
    pub tag: String,
    pub opts: Opts,
    /// The load generator's command line, for the report.
    pub command: String,
}

impl Ctx {
    /// The target and flags of a scenario run; exits with a message when a
    /// flag is wrong. `argv` is kept, as the command line of the result.
    pub fn new(opts: Opts, argv: &[String]) -> Ctx {
        let addrs: Vec<SocketAddr> = opts
            .text("addr", "127.0.0.1:8000")
            .split(',')
            .map(|a| {
                let addr: SocketAddr = a.trim().parse().unwrap_or_else(|_| {
                    die("--addr must be HOST:PORT[,HOST:PORT..] with numeric addresses")
                });
                if !addr.ip().is_loopback() {
                    die("--addr must be a loopback address (127.0.0.0/8 or ::1)");
                }
                addr
            })
            .collect();
        let addr = addrs[0];
        let kind = match opts.text("kind", "server").as_str() {
            "server" | "chatserver" => Kind::Server,
            "baseline" => Kind::Baseline,
            "floor" => Kind::Floor,
            k => die(&format!("--kind: unknown kind {k}")),
        };
        let pids: Vec<u32> = opts
            .vals
            .get("server-pid")
            .map(|p| {
                p.split(',')
                    .map(|p| {
                        p.trim().parse().unwrap_or_else(|_| {
                            die("--server-pid must be a number (or numbers, A,B)")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if addrs.len() > 1 && !pids.is_empty() && pids.len() != addrs.len() {
            die("--server-pid needs one process per --addr address");
        }
        if addrs.len() > 1 && kind != Kind::Server {
            die("several --addr addresses (a cluster) need --kind server");
        }
        let pid = pids.first().copied();
        let label = opts.text(
            "label",
            match kind {
                Kind::Server => "chatserver",
                Kind::Baseline => "baseline",
                Kind::Floor => "floor",
            },
        );
        let tag = format!("{:x}", (mono_ns() / 1000) % 0xff_ffff);
        let command = format!("loadgen {}", argv.join(" "));
        Ctx {
            addr,
            addrs,
            pid,
            pids,
            kind,
            label,
            tag,
            opts,
            command,
        }
    }

    /// Several instances of one chat (`--addr A,B`).
    pub fn cluster(&self) -> bool {
        self.addrs.len() > 1
    }

    /// History frames a member receives on joining a room holding `seeded`.
    pub fn history(&self, seeded: u32) -> u32 {
        if self.kind == Kind::Floor {
            0
        } else {
            seeded.min(self.opts.num("history-limit", 50, 50))
        }
    }
}
