//! Load generator for ChatConnect (and for the two yardsticks, `floor` and
//! `baseline_tokio`, which speak the same URL shape and message format).
//!
//! Run: `cargo bench --bench loadgen -- SCENARIO --addr 127.0.0.1:PORT
//! [--server-pid PID] [--kind server|baseline|floor] [--label NAME]
//! [--store sqlite|ferretdb] [--json-out FILE] [--quick] [scenario flags]`, or
//! `cargo bench --bench loadgen -- report DIR` to turn a directory of JSON
//! results into the Markdown table with ratios. `--help` lists the flags.
//!
//! Scenarios (each bounded in count and time):
//! - `idle`: N WebSockets over R rooms that already hold history; server
//!   RSS per connection above the baseline, and the connect rate.
//! - `fanout`: S senders and M members in one room; a ramp of send rates,
//!   every delivery counted, latency from the send time carried in the
//!   content (the senders have a client process of their own); the figure
//!   is the highest rate with p99 under the limit and nothing lost. With
//!   `--once`, one step at a fixed rate instead of the ramp.
//! - `many`: 1000 rooms of 10 members, everyone chatting (or K senders a
//!   room); same ramp, or `--once`.
//! - `joinstorm`: N WebSockets over R rooms with history connecting at once
//!   (or C at a time) while a chatter in another room times its round
//!   trips; joined, refused, failed, exact histories, joins/s, RSS.
//! - `login`: L concurrent login loops while one WebSocket client measures
//!   its round trip; logins/s against the bcrypt bound.
//! - `rest`: `GET /rooms` with keep-alive (wrk when installed).
//!
//! Sockets are spread over worker processes (copies of this binary started
//! with `--worker`, one single-threaded tokio runtime each): the coordinator
//! sends each a JSON spec on stdin, they answer JSON lines on stdout.
//! Send and receive times are `CLOCK_MONOTONIC`, the same clock in every
//! process, so a latency can cross processes.
//!
//! Where things are: this file reads the command line (`cli.rs`), runs one
//! scenario (`scenarios/`, a file each) and prints its JSON result;
//! `ramp.rs` is the rate ramp that `fanout` and `many` share; `workers/` the
//! worker processes (their protocol, the coordinator's pool, the connections
//! inside a worker, a join storm's side of them); `seed.rs`, `http.rs` and
//! `chatter.rs` the coordinator's own small clients; `hist.rs` the latency histogram; `sys.rs` process figures from
//! `/proc`; `report.rs` the Markdown table (a row per store for chatserver,
//! from `--store`). The WebSocket client and the ramp
//! verdict are in `benches/common/`, shared with the tests.

#[path = "../common/verdict.rs"]
mod verdict;
#[path = "../common/ws_client.rs"]
mod ws_client;

mod chatter;
mod cli;
mod cluster;
mod hist;
mod http;
mod ramp;
mod report;
mod scenarios;
mod seed;
mod sys;
mod workers;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

use cli::{die, Ctx, Opts, USAGE};

/// The field of a chat message frame that carries its text.
pub const CONTENT: &str = "content";

/// What a scenario found.
pub struct Outcome {
    pub ok: bool,
    pub metrics: BTreeMap<String, f64>,
    pub details: Value,
    pub notes: Vec<String>,
}

impl Default for Outcome {
    /// Passed, with nothing found yet.
    fn default() -> Outcome {
        Outcome {
            ok: true,
            metrics: BTreeMap::new(),
            details: Value::Null,
            notes: Vec::new(),
        }
    }
}

impl Outcome {
    /// Record figure `k`; a value that is not finite is left out.
    pub fn set(&mut self, k: &str, v: f64) {
        if v.is_finite() {
            self.metrics.insert(k.to_string(), v);
        }
    }

    /// Record the server's resident size before (`keys[0]`) and after
    /// (`keys[1]`) a load, in MiB, and its growth per each of `n` `things`
    /// (`keys[2]`, bytes); a note when there was no figure to read.
    pub fn set_rss_growth(
        &mut self,
        before_kib: Option<u64>,
        after_kib: Option<u64>,
        n: u64,
        keys: [&str; 3],
        things: &str,
    ) {
        let (Some(r0), Some(r1)) = (before_kib, after_kib) else {
            self.notes
                .push("no --server-pid (or unreadable /proc): no memory figure".into());
            return;
        };
        self.set(keys[0], r0 as f64 / 1024.0);
        self.set(keys[1], r1 as f64 / 1024.0);
        if n > 0 {
            let per = (r1 as f64 - r0 as f64) * 1024.0 / n as f64;
            self.set(keys[2], per.round());
            eprintln!(
                "  server RSS {:.1} MiB -> {:.1} MiB: {per:.0} bytes per {things}",
                r0 as f64 / 1024.0,
                r1 as f64 / 1024.0
            );
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if argv.first().map(String::as_str) == Some("--worker") {
        workers::process::worker_main();
        return;
    }
    let opts = Opts::parse(&argv);
    if opts.has("--help") || opts.has("-h") || opts.pos.is_empty() {
        print!("{USAGE}");
        return;
    }
    let scenario = opts.pos[0].clone();
    if scenario == "report" {
        let Some(dir) = opts.pos.get(1) else {
            die("report needs a directory of JSON results");
        };
        match report::report(dir) {
            Ok(md) => print!("{md}"),
            Err(e) => die(&e),
        }
        return;
    }
    let ctx = Ctx::new(opts, &argv);
    if ctx.cluster()
        && !matches!(
            scenario.as_str(),
            "fanout" | "fan-out" | "many" | "many-rooms"
        )
    {
        die("several --addr addresses (a cluster) are for the fanout and many scenarios");
    }
    let started = Instant::now();
    let store = ctx
        .opts
        .vals
        .get("store")
        .map(|s| format!(" on {s}"))
        .unwrap_or_default();
    eprintln!(
        "loadgen: {scenario} against {}{store} ({})",
        ctx.label, ctx.addr
    );
    let result = match scenario.as_str() {
        "idle" => scenarios::idle::run(&ctx),
        "joinstorm" | "join-storm" => scenarios::joinstorm::run(&ctx),
        "fanout" | "fan-out" => scenarios::fanout::run(&ctx),
        "many" | "many-rooms" => scenarios::many::run(&ctx),
        "login" | "login-storm" => scenarios::login::run(&ctx),
        "rest" => scenarios::rest::run(&ctx),
        s => die(&format!("unknown scenario {s}; see --help")),
    };
    let out = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen: {scenario} failed: {e}");
            Outcome {
                ok: false,
                notes: vec![format!("failed: {e}")],
                ..Outcome::default()
            }
        }
    };
    let scenario = match scenario.as_str() {
        "fan-out" => "fanout",
        "many-rooms" => "many",
        "login-storm" => "login",
        "join-storm" => "joinstorm",
        s => s,
    };
    // Several instances of one chat are a scenario of their own in the
    // results and the report.
    let scenario = if ctx.cluster() {
        format!("cluster-{scenario}")
    } else {
        scenario.to_string()
    };
    let doc = json!({
        "scenario": scenario,
        "label": ctx.label,
        "store": ctx.opts.vals.get("store"),
        "kind": format!("{:?}", ctx.kind).to_lowercase(),
        "command": ctx.command,
        "ok": out.ok,
        "secs": started.elapsed().as_secs_f64(),
        "metrics": out.metrics,
        "details": out.details,
        "notes": out.notes,
    });
    let mut doc = doc;
    if ctx.cluster() {
        doc["instances"] = json!(ctx.addrs.len());
    }
    let text = serde_json::to_string(&doc).unwrap_or_default();
    println!("{text}");
    if let Some(path) = ctx.opts.vals.get("json-out") {
        if let Err(e) = std::fs::write(path, format!("{text}\n")) {
            die(&format!("cannot write {path}: {e}"));
        }
    }
    if !out.ok {
        std::process::exit(1);
    }
}
