//! The report: a Markdown table of every figure with its ratios to the
//! yardsticks, then the ramps step by step, the notes and the command lines.
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
    let find = |scn: &str, label: &str| {
        docs.iter()
            .find(|d| d["scenario"] == scn && d["label"] == label)
    };
    let metric =
        |scn: &str, label: &str, m: &str| find(scn, label).and_then(|d| d["metrics"][m].as_f64());
    let mut md = String::new();
    md.push_str(
        "| scenario | figure | chatserver | floor | baseline | ÷ floor | ÷ baseline | target |\n",
    );
    md.push_str("|---|---|---:|---:|---:|---:|---:|---|\n");
    for &(scn, key, what, lower, target) in FIGURES {
        if ["chatserver", "floor", "baseline"]
            .iter()
            .all(|l| find(scn, l).is_none())
        {
            continue;
        }
        let cell = |l: &str| {
            metric(scn, l, key)
                .map(fmt_num)
                .unwrap_or_else(|| "–".into())
        };
        let c = metric(scn, "chatserver", key);
        let ratio = |l: &str| match (c, metric(scn, l, key)) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let verdict = match (key, c) {
            (_, None) => String::new(),
            ("rss_per_conn_bytes", Some(v)) => mark(v <= 2048.0),
            ("conns_held", Some(v)) => {
                mark(metric(scn, "chatserver", "conns_requested").is_some_and(|r| v >= r))
            }
            ("deliveries_per_s", Some(v)) => match metric(scn, "floor", key) {
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
        md.push_str(&format!(
            "| {scn} | {what}{direction} | {} | {} | {} | {} | {} | {t} |\n",
            cell("chatserver"),
            cell("floor"),
            cell("baseline"),
            ratio("floor"),
            ratio("baseline"),
        ));
    }
    md.push_str("\n↓: lower is better. Ratios are chatserver ÷ yardstick. \"–\": not measured or not applicable.\n");

    // The ramps, step by step.
    for scn in ["fanout", "many"] {
        let mut rows = String::new();
        for label in ["chatserver", "floor", "baseline"] {
            let Some(steps) = find(scn, label).and_then(|d| d["details"]["steps"].as_array())
            else {
                continue;
            };
            for s in steps {
                rows.push_str(&format!(
                    "| {label} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
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
    let mut notes = String::new();
    for d in &docs {
        if let Some(ns) = d["notes"].as_array() {
            for n in ns {
                notes.push_str(&format!(
                    "- {} / {}: {}\n",
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

fn mark(ok: bool) -> String {
    if ok { "✅" } else { "❌" }.to_string()
}
