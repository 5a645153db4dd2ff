//! The report: a Markdown table of every figure with its ratios to the
//! yardsticks, then the ramps step by step, the notes and the command lines.
//! chatserver gets a row per store it ran on (the result's `store`, from
//! `--store`), side by side, with the ratio of each store to SQLite from the
//! same run; the yardsticks have no store and repeat on each row.
//!
//! Several instances of one chat (`cluster-fanout`, `cluster-many`) get
//! tables of their own after the main one (`cluster_tables`): deliveries/s
//! against the single instance's, what a cross-instance hop adds, and the
//! broker path's cost.
//!
//! Called by `main` for `loadgen report DIR`, which scripts/bench.sh runs
//! on its directory of JSON results once every scenario has run.

use serde_json::Value;

/// (scenario, metric, what it is, lower is better, target on chatserver)
const FIGURES: &[(&str, &str, &str, bool, &str)] = &[
    (
        "idle",
        "rss_per_conn_bytes",
        "server RSS per idle WebSocket (bytes)",
        true,
        "≤ 2048",
    ),
    (
        "idle",
        "connect_rate",
        "connects/s (upgrade + history)",
        false,
        "",
    ),
    (
        "idle",
        "conns_held",
        "WebSockets held",
        false,
        "= requested",
    ),
    (
        "idle",
        "rss_held_mib",
        "server RSS while holding them (MiB)",
        true,
        "",
    ),
    (
        "fanout",
        "deliveries_per_s",
        "sustained deliveries/s (p99 < limit, none lost)",
        false,
        "≥ 0.7 × floor",
    ),
    (
        "fanout",
        "rate_msgs",
        "at messages/s into the room",
        false,
        "",
    ),
    (
        "fanout",
        "p50_ms",
        "latency p50 at that rate (ms)",
        true,
        "",
    ),
    (
        "fanout",
        "p99_ms",
        "latency p99 at that rate (ms)",
        true,
        "< 100",
    ),
    (
        "fanout",
        "p999_ms",
        "latency p99.9 at that rate (ms)",
        true,
        "",
    ),
    (
        "fanout",
        "delivered_fraction",
        "delivered of those expected (--once)",
        false,
        "= 100 %",
    ),
    (
        "fanout",
        "within_deadline",
        "delivered within the deadline (--once)",
        false,
        "",
    ),
    (
        "many",
        "deliveries_per_s",
        "sustained deliveries/s (p99 < limit, none lost)",
        false,
        "≥ 0.7 × floor",
    ),
    ("many", "rate_msgs", "at messages/s in total", false, ""),
    ("many", "p50_ms", "latency p50 at that rate (ms)", true, ""),
    (
        "many",
        "p99_ms",
        "latency p99 at that rate (ms)",
        true,
        "< 100",
    ),
    (
        "many",
        "p999_ms",
        "latency p99.9 at that rate (ms)",
        true,
        "",
    ),
    (
        "many",
        "delivered_fraction",
        "delivered of those expected (--once)",
        false,
        "= 100 %",
    ),
    (
        "many",
        "within_deadline",
        "delivered within the deadline (--once)",
        false,
        "",
    ),
    (
        "joinstorm",
        "joined",
        "sockets joined (101 and history)",
        false,
        "= requested",
    ),
    (
        "joinstorm",
        "history_exact",
        "joined with exactly the right history",
        false,
        "= joined",
    ),
    (
        "joinstorm",
        "refused",
        "refused (any answer but 101)",
        true,
        "0",
    ),
    ("joinstorm", "failed", "failed otherwise", true, "0"),
    (
        "joinstorm",
        "storm_secs",
        "time for the whole storm to be joined (s)",
        true,
        "",
    ),
    ("joinstorm", "joins_per_s", "joins/s", false, ""),
    (
        "joinstorm",
        "join_p99_ms",
        "one socket's join p99, connect to history (ms)",
        true,
        "",
    ),
    (
        "joinstorm",
        "chat_p50_storm_ms",
        "chatter round trip p50 during the storm (ms)",
        true,
        "",
    ),
    (
        "joinstorm",
        "chat_p99_storm_ms",
        "chatter round trip p99 during the storm (ms)",
        true,
        "",
    ),
    (
        "joinstorm",
        "chat_max_storm_ms",
        "chatter round trip max during the storm (ms)",
        true,
        "",
    ),
    (
        "joinstorm",
        "rss_before_mib",
        "server RSS before the storm (MiB)",
        true,
        "",
    ),
    (
        "joinstorm",
        "rss_after_mib",
        "server RSS after it (MiB)",
        true,
        "",
    ),
    (
        "joinstorm",
        "rss_per_socket_bytes",
        "server RSS per joined socket (bytes)",
        true,
        "",
    ),
    ("login", "logins_per_s", "logins/s", false, ""),
    (
        "login",
        "bound_per_s",
        "bcrypt bound: workers / one hash",
        false,
        "",
    ),
    ("login", "of_bound", "logins/s ÷ bound", false, "≥ 0.9"),
    (
        "login",
        "rtt_p99_storm_ms",
        "WS message round trip p99 during the storm (ms; store commit included)",
        true,
        "< 5",
    ),
    (
        "login",
        "rtt_p99_quiet_ms",
        "WS message round trip p99, quiet (ms)",
        true,
        "",
    ),
    (
        "login",
        "ping_p99_storm_ms",
        "WS ping round trip p99 during the storm (ms; event loop only)",
        true,
        "< 5",
    ),
    (
        "login",
        "hash_ms",
        "one bcrypt hash, this run (ms)",
        true,
        "",
    ),
    (
        "rest",
        "requests_per_s",
        "GET /rooms requests/s (keep-alive)",
        false,
        "",
    ),
    ("rest", "p99_ms", "GET /rooms p99 (ms)", true, ""),
];

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The report of the JSON results in `dir`.
pub fn report(dir: &str) -> Result<String, String> {
    let mut docs: Vec<Value> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(v) => docs.push(v),
            Err(e) => eprintln!("skipping {}: {e}", p.display()),
        }
    }
    // A result is found by scenario, target and store (None: no store, as
    // for the yardsticks and for results without `--store`).
    let store_of = |d: &Value| d["store"].as_str().map(str::to_string);
    let find = |scn: &str, label: &str, store: Option<&str>| {
        docs.iter().find(|d| {
            d["scenario"] == scn && d["label"] == label && store_of(d).as_deref() == store
        })
    };
    // The yardsticks are looked up with or without a store.
    let yard = |scn: &str, label: &str| {
        find(scn, label, None).or_else(|| {
            docs.iter()
                .find(|d| d["scenario"] == scn && d["label"] == label)
        })
    };
    let mut stores: Vec<Option<String>> = Vec::new();
    for d in docs.iter().filter(|d| d["label"] == "chatserver") {
        let s = store_of(d);
        if !stores.contains(&s) {
            stores.push(s);
        }
    }
    // SQLite first, then FerretDB, then any other; no store last.
    stores.sort_by_key(|s| match s.as_deref() {
        Some("sqlite") => (0, String::new()),
        Some("ferretdb") => (1, String::new()),
        Some(o) => (2, o.to_string()),
        None => (3, String::new()),
    });
    let metric_of = |d: Option<&Value>, m: &str| d.and_then(|d| d["metrics"][m].as_f64());
    let mut md = String::new();
    md.push_str(
        "| scenario | figure | store | chatserver | floor | baseline | ÷ floor | ÷ baseline | ÷ sqlite | target |\n",
    );
    md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for &(scn, key, what, lower, target) in FIGURES {
        let any = docs
            .iter()
            .any(|d| d["scenario"] == scn && d["metrics"][key].is_number());
        if !any {
            continue;
        }
        let floor = metric_of(yard(scn, "floor"), key);
        let baseline = metric_of(yard(scn, "baseline"), key);
        let sqlite = metric_of(find(scn, "chatserver", Some("sqlite")), key);
        let mut rows: Vec<Option<&str>> = stores
            .iter()
            .map(|s| s.as_deref())
            .filter(|s| find(scn, "chatserver", *s).is_some())
            .collect();
        if rows.is_empty() {
            rows.push(None); // the yardsticks alone
        }
        for store in rows {
            let doc = find(scn, "chatserver", store);
            let c = metric_of(doc, key);
            let fmt = match key {
                "delivered_fraction" | "within_deadline" => fmt_share,
                "refused" | "failed" => fmt_count,
                _ => fmt_num,
            };
            let cell = |v: Option<f64>| v.map(fmt).unwrap_or_else(|| "–".into());
            let ratio = |b: Option<f64>| match (c, b) {
                (Some(a), Some(b)) if b != 0.0 => fmt_ratio(a / b),
                _ => "–".into(),
            };
            let own = |m: &str| metric_of(doc, m);
            let once = doc.is_some_and(|d| d["details"]["once"] == true);
            // One step at a fixed rate sustains nothing: its deliveries/s
            // are what that step delivered.
            let (what, target) = match (key, own("deadline_ms")) {
                ("deliveries_per_s", _) if once => (
                    "deliveries/s in the one step at a fixed rate".to_string(),
                    "",
                ),
                ("within_deadline", Some(d)) => (
                    format!("delivered within {} ms (--once)", fmt_num(d)),
                    target,
                ),
                _ => (what.to_string(), target),
            };
            let verdict = match (key, c) {
                (_, None) => String::new(),
                ("rss_per_conn_bytes", Some(v)) => mark(v <= 2048.0),
                ("conns_held", Some(v)) | ("joined", Some(v)) => {
                    mark(own("conns_requested").is_some_and(|r| v >= r))
                }
                ("history_exact", Some(v)) => mark(own("joined").is_some_and(|j| v >= j)),
                ("refused" | "failed", Some(v)) => mark(v == 0.0),
                ("delivered_fraction", Some(v)) => mark(v >= 1.0),
                ("deliveries_per_s", Some(_)) if once => String::new(),
                ("deliveries_per_s", Some(v)) => match floor {
                    Some(f) if f > 0.0 => mark(v / f >= 0.7),
                    _ => String::new(),
                },
                ("p99_ms", Some(v)) if scn != "rest" => mark(v < 100.0),
                ("of_bound", Some(v)) => mark(v >= 0.9),
                ("rtt_p99_storm_ms" | "ping_p99_storm_ms", Some(v)) => mark(v < 5.0),
                _ => String::new(),
            };
            let direction = if lower { " ↓" } else { "" };
            let t = if target.is_empty() {
                String::new()
            } else {
                format!("{target} {verdict}")
            };
            let scn_cell = if once {
                format!("{scn} --once")
            } else {
                scn.to_string()
            };
            let by_sqlite = if store == Some("sqlite") {
                "–".to_string()
            } else {
                ratio(sqlite)
            };
            md.push_str(&format!(
                "| {scn_cell} | {what}{direction} | {} | {} | {} | {} | {} | {} | {by_sqlite} | {t} |\n",
                store.unwrap_or("–"),
                cell(c),
                cell(floor),
                cell(baseline),
                ratio(floor),
                ratio(baseline),
            ));
        }
    }
    md.push_str(
        "\n↓: lower is better. Ratios are chatserver ÷ yardstick, and chatserver on this store \
         ÷ chatserver on SQLite, from the same run. \"–\": not measured or not applicable.\n",
    );

    // The ramps, step by step.
    let mut targets: Vec<(String, Option<&str>)> = stores
        .iter()
        .map(|s| ("chatserver".to_string(), s.as_deref()))
        .collect();
    targets.push(("floor".into(), None));
    targets.push(("baseline".into(), None));
    for scn in ["fanout", "many"] {
        let mut rows = String::new();
        for (label, store) in &targets {
            let doc = if label == "chatserver" {
                find(scn, label, *store)
            } else {
                yard(scn, label)
            };
            let Some(steps) = doc.and_then(|d| d["details"]["steps"].as_array()) else {
                continue;
            };
            let name = match store {
                Some(s) => format!("{label} ({s})"),
                None => label.clone(),
            };
            for s in steps {
                rows.push_str(&format!(
                    "| {name} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    fmt_num(s["rate_msgs"].as_f64().unwrap_or(0.0)),
                    fmt_num(s["deliveries_per_s"].as_f64().unwrap_or(0.0)),
                    s["received"],
                    s["expected"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["p999_ms"],
                    s["closed"],
                    s["server_cpu_pct"],
                    s["loadgen_cpu_pct"],
                    if s["ok"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    },
                ));
            }
        }
        if !rows.is_empty() {
            md.push_str(&format!(
                "\n{scn} steps:\n\n| target | msg/s | deliveries/s | received / expected | p50 ms | p99 ms | p99.9 ms | closed | server CPU % | loadgen CPU % | sustained |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n{rows}"
            ));
        }
    }
    md.push_str(&cluster_tables(&docs));
    let mut notes = String::new();
    for d in &docs {
        if let Some(ns) = d["notes"].as_array() {
            for n in ns {
                let store = store_of(d).map(|s| format!(" ({s})")).unwrap_or_default();
                notes.push_str(&format!(
                    "- {} / {}{store}: {}\n",
                    d["scenario"].as_str().unwrap_or("?"),
                    d["label"].as_str().unwrap_or("?"),
                    n.as_str().unwrap_or("")
                ));
            }
        }
    }
    if !notes.is_empty() {
        md.push_str(&format!("\nNotes:\n\n{notes}"));
    }
    md.push_str("\nLoad generator command lines:\n\n```\n");
    for d in &docs {
        md.push_str(&format!("{}\n", d["command"].as_str().unwrap_or("")));
    }
    md.push_str("```\n");
    Ok(md)
}

/// The tables of the cluster runs (several instances, one Redis): one row
/// per run in each, the step tables after them; empty without such runs.
fn cluster_tables(docs: &[Value]) -> String {
    let runs: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["scenario"]
                .as_str()
                .is_some_and(|s| s.starts_with("cluster-"))
        })
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let m = |d: &Value, k: &str| d["metrics"][k].as_f64();
    let c = |v: Option<f64>| v.map(fmt_num).unwrap_or_else(|| "–".into());
    let name = |d: &Value| {
        format!(
            "{} | {} | {}",
            d["scenario"].as_str().unwrap_or("?"),
            d["store"].as_str().unwrap_or("–"),
            d["instances"].as_u64().unwrap_or(0)
        )
    };
    let mut md = String::from(
        "\nSeveral instances of one chat, one Redis (members and senders split evenly; \
         the single instance's figure is the same scenario's on one instance, same run):\n\n\
         | scenario | store | instances | deliveries/s, one instance | deliveries/s, split | ÷ one | target | \
         hop step msg/s | same-instance p50 / p99 ms | cross-instance p50 / p99 ms | hop adds p50 ms | \
         hop adds p99 ms | target |\n\
         |---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|\n",
    );
    for d in &runs {
        let ratio = m(d, "of_single");
        let hop99 = m(d, "hop_p99_added_ms");
        let pair = |a: &str, b: &str| match (m(d, a), m(d, b)) {
            (Some(x), Some(y)) => format!("{} / {}", fmt_num(x), fmt_num(y)),
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | ≥ 0.7 {} | {} | {} | {} | {} | {} | ≤ 5 {} |\n",
            name(d),
            c(m(d, "single_deliveries_per_s")),
            c(m(d, "deliveries_per_s")),
            ratio.map(fmt_ratio).unwrap_or_else(|| "–".into()),
            ratio.map(|r| mark(r >= 0.7)).unwrap_or_default(),
            c(m(d, "hop_rate_msgs")),
            pair("hop_same_p50_ms", "hop_same_p99_ms"),
            pair("hop_cross_p50_ms", "hop_cross_p99_ms"),
            c(m(d, "hop_p50_added_ms")),
            c(hop99),
            hop99.map(|h| mark(h <= 5.0)).unwrap_or_default(),
        ));
    }
    md.push_str(
        "\nThe broker path's cost in the hop step: CPU of each instance's broker threads \
         (`broker-pub`, `broker-sub`; `/proc/PID/task/*/schedstat`) per batch on \
         `/metrics` (`chatconnect_broker_published_total`, `_received_total`; a batch read \
         counts the publisher's own echo too), both processes' CPU above the single \
         instance's at the same rate per batch published or received, and Redis's CPU and \
         bytes (`INFO`) per batch and per message sent:\n\n\
         | scenario | store | instances | msg per batch | publisher µs / batch | subscriber µs / received | \
         subscriber µs / batch read | processes: extra µs / batch | Redis µs / batch published | \
         Redis CPU % | Redis bytes in / msg | Redis bytes out / msg |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for d in &runs {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            name(d),
            c(m(d, "msgs_per_batch")),
            c(m(d, "pub_us_per_batch")),
            c(m(d, "sub_us_per_received")),
            c(m(d, "sub_us_per_arrival")),
            c(m(d, "extra_cpu_us_per_batch")),
            c(m(d, "redis_us_per_batch")),
            c(m(d, "redis_cpu_pct")),
            c(m(d, "redis_in_per_msg")),
            c(m(d, "redis_out_per_msg")),
        ));
    }
    for d in &runs {
        let mut steps: Vec<&Value> = d["details"]["steps"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let warmup = &d["details"]["warmup_step"];
        if warmup.is_object() {
            steps.insert(0, warmup);
        }
        let hop = &d["details"]["hop_step"];
        if hop.is_object() {
            steps.push(hop);
        }
        if steps.is_empty() {
            continue;
        }
        md.push_str(&format!(
            "\n{} steps ({}, {} instances; warm-up: the first, outside the verdict; hop: the last, \
             at the single instance's rate):\n\n\
             | msg/s | deliveries/s | received / expected | p99 ms | same p99 ms | cross p99 ms | \
             servers CPU % | Redis CPU % | msg per batch | publisher µs / batch | subscriber µs / received | sustained |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
            d["scenario"].as_str().unwrap_or("?"),
            d["store"].as_str().unwrap_or("–"),
            d["instances"].as_u64().unwrap_or(0),
        ));
        for s in steps {
            let k = &s["cluster"];
            let f = |v: &Value| v.as_f64().map(fmt_num).unwrap_or_else(|| "–".into());
            let verdict = if std::ptr::eq(s, hop) {
                "hop"
            } else if std::ptr::eq(s, warmup) {
                "warm-up"
            } else if s["ok"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            };
            md.push_str(&format!(
                "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {verdict} |\n",
                f(&s["rate_msgs"]),
                f(&s["deliveries_per_s"]),
                s["received"],
                s["expected"],
                f(&s["p99_ms"]),
                f(&k["same_p99_ms"]),
                f(&k["cross_p99_ms"]),
                f(&k["servers_cpu_pct"]),
                f(&k["redis_cpu_pct"]),
                f(&k["msgs_per_batch"]),
                f(&k["pub_us_per_batch"]),
                f(&k["sub_us_per_received"]),
            ));
        }
    }
    md
}

/// A count: a whole number, never "0.00".
fn fmt_count(v: f64) -> String {
    if v.abs() >= 1000.0 {
        fmt_num(v)
    } else {
        format!("{v:.0}")
    }
}

/// A fraction as a percentage, rounded down (so 0.9996 is not 100 %).
fn fmt_share(v: f64) -> String {
    format!("{:.2} %", (v * 10_000.0).floor() / 100.0)
}

/// A ratio to two decimals, or to two significant digits when smaller.
fn fmt_ratio(r: f64) -> String {
    if r.abs() >= 0.1 || r == 0.0 {
        format!("{r:.2}")
    } else {
        let digits = (1.0 - r.abs().log10().floor()) as usize;
        format!("{r:.digits$}")
    }
}

fn mark(ok: bool) -> String {
    if ok { "✅" } else { "❌" }.to_string()
}
