//! Figures of a process from `/proc` (the server's memory and CPU time, the
//! workers' CPU time), and the single-threaded tokio runtime every async
//! part of the load generator runs on.

use crate::cli::die;

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time of a process, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_cpu_secs(&format!("/proc/{pid}"))
}

/// CPU time of the threads of process `pid` named `name` (their `comm`;
/// every thread when `None`), in seconds, from each thread's `schedstat`
/// (nanoseconds; `stat` counts in 10 ms ticks, too coarse for one thread
/// over a few seconds), or its `stat` where there is no `schedstat`. None
/// if there is no such thread.
pub fn threads_cpu_secs(pid: u32, name: Option<&str>) -> Option<f64> {
    let mut total = None;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = t.path();
        if let Some(name) = name {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
        }
        let ns = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        let secs = match ns {
            Some(ns) => Some(ns as f64 / 1e9),
            None => stat_cpu_secs(&dir.to_string_lossy()),
        };
        if let Some(c) = secs {
            *total.get_or_insert(0.0) += c;
        }
    }
    total
}

/// The CPU time in `DIR/stat` (a process's or a thread's), in seconds.
fn stat_cpu_secs(dir: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// A current-thread runtime with timers and I/O.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(&format!("cannot start a tokio runtime: {e}")))
}
