//! Scenario `rest`: `GET /rooms` over keep-alive connections, from wrk when
//! it is installed (the usual figure) or from the built-in client. Measures
//! requests/s and their p50 and p99.
//!
//! Called by `main` for `loadgen rest` (scripts/bench.sh runs it against
//! each target).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::Ctx;
use crate::hist::ms;
use crate::http::{http_once, repeat, Request};
use crate::seed::seed_rooms;
use crate::sys::runtime;
use crate::Outcome;

/// A program on the `PATH`.
fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

pub fn run(ctx: &Ctx) -> Result<Outcome, String> {
    let o = &ctx.opts;
    let conns: usize = o.num("conns", 50, 20).max(1);
    let secs: f64 = o.num("secs", 10.0, 3.0);
    let threads: usize = o.num("threads", 2, 2).clamp(1, conns);
    let rooms: u64 = o.num("rooms", 20, 5);
    let names: Vec<String> = (0..rooms)
        .map(|r| format!("rest-{}-{r}", ctx.tag))
        .collect();
    seed_rooms(ctx.addr, &names, 1)?;
    let rt = runtime();
    let (status, body) = rt.block_on(http_once(ctx.addr, "GET", "/rooms", None))?;
    if status != 200 || body.first() != Some(&b'[') {
        return Err(format!(
            "GET /rooms answered {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    let mut out = Outcome::default();
    out.set("body_bytes", body.len() as f64);
    let url = format!("http://{}/rooms", ctx.addr);
    let wrk = if o.has("--no-wrk") {
        None
    } else {
        find_in_path("wrk")
    };
    if let Some(wrk) = wrk {
        let args = vec![
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{}s", secs.ceil() as u64),
            "--latency".into(),
            url.clone(),
        ];
        eprintln!("  wrk {}", args.join(" "));
        let text = run_bounded(&wrk, &args, Duration::from_secs_f64(secs + 30.0))?;
        let w = parse_wrk(&text).ok_or_else(|| format!("cannot read wrk's output:\n{text}"))?;
        out.set("requests_per_s", w.0.round());
        out.set("p50_ms", w.1);
        out.set("p99_ms", w.2);
        out.set("non_2xx", w.3 as f64);
        out.details =
            json!({ "tool": "wrk", "command": format!("wrk {}", args.join(" ")), "output": text });
        if w.3 > 0 {
            out.ok = false;
            out.notes.push(format!("{} answers were not 2xx", w.3));
        }
    } else {
        let t0 = Instant::now();
        let rooms = Request {
            method: "GET",
            path: "/rooms",
            body: None,
            limit: Duration::from_secs(10),
        };
        let s = repeat(&rt, ctx.addr, rooms, conns, secs);
        let elapsed = t0.elapsed().as_secs_f64();
        out.set("requests_per_s", (s.ok as f64 / elapsed).round());
        out.set("p50_ms", ms(s.hist.quantile(0.5)));
        out.set("p99_ms", ms(s.hist.quantile(0.99)));
        out.set("non_2xx", s.failed as f64);
        out.details = json!({ "tool": "built-in keep-alive client", "conns": conns });
        out.notes
            .push("wrk not found: built-in client (install wrk for the usual figure)".into());
        if s.failed > 0 {
            out.ok = false;
            out.notes
                .push(format!("{} requests failed or were not 200", s.failed));
        }
    }
    eprintln!(
        "  GET /rooms: {:.0} requests/s, p99 {:.2} ms",
        out.metrics.get("requests_per_s").copied().unwrap_or(0.0),
        out.metrics.get("p99_ms").copied().unwrap_or(0.0)
    );
    Ok(out)
}

/// Run a command to completion within `limit`; its standard output.
fn run_bounded(prog: &std::path::Path, args: &[String], limit: Duration) -> Result<String, String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", prog.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} ran past {limit:?}", prog.display()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
    reader.join().map_err(|_| "reader panicked".to_string())
}

/// wrk's requests/s, p50 and p99 (ms) and non-2xx count.
fn parse_wrk(text: &str) -> Option<(f64, f64, f64, u64)> {
    let dur = |s: &str| -> Option<f64> {
        let s = s.trim();
        let (num, mul) = if let Some(v) = s.strip_suffix("us") {
            (v, 0.001)
        } else if let Some(v) = s.strip_suffix("ms") {
            (v, 1.0)
        } else if let Some(v) = s.strip_suffix('s') {
            (v, 1000.0)
        } else if let Some(v) = s.strip_suffix('m') {
            (v, 60_000.0)
        } else {
            return None;
        };
        num.parse::<f64>()
            .ok()
            .map(|n| (n * mul * 1000.0).round() / 1000.0)
    };
    let mut rps = None;
    let (mut p50, mut p99, mut bad) = (None, None, 0);
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = t.strip_prefix("50%") {
            p50 = dur(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = dur(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            bad = v.trim().parse().unwrap_or(0);
        }
    }
    Some((rps?, p50?, p99?, bad))
}
