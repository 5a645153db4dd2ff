//! Giving freed memory back to the system after many connections have gone.
//!
//! glibc's allocator keeps the pages of freed buffers for later use: after
//! 500 clients that each made the server hold 170 KiB closed, the process
//! stayed at 63 MiB (7 MiB before them). `malloc_trim` hands those pages
//! back. It walks the allocator's free lists, and pages given back cost a
//! fault when used again, so it runs only after a wave of closes (at least
//! `MIN_CLOSED` connections since the last trim) and at most every
//! `MIN_GAP`, from the reactor's tick.
//!
//! Called by the pass in `mod.rs` on each tick; `Conns::drop` counts the
//! closes.

use std::time::{Duration, Instant};

/// Connections closed since the last trim before another is worth it.
const MIN_CLOSED: u64 = 256;
/// Shortest time between two trims.
const MIN_GAP: Duration = Duration::from_secs(2);

pub(super) struct Trim {
    last: Instant,
    /// `Conns`'s count of closed connections at the last trim.
    closed_then: u64,
    /// How many trims ran, for `/metrics`.
    pub(super) count: u64,
}

impl Trim {
    pub(super) fn new() -> Trim {
        Trim {
            last: Instant::now(),
            closed_then: 0,
            count: 0,
        }
    }

    /// Trim if enough connections closed since the last trim, given the
    /// running count of closed connections.
    pub(super) fn on_tick(&mut self, closed: u64, now: Instant) {
        if closed.saturating_sub(self.closed_then) < MIN_CLOSED
            || now.saturating_duration_since(self.last) < MIN_GAP
        {
            return;
        }
        self.closed_then = closed;
        self.last = now;
        self.count += 1;
        give_back();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back() {
    // SAFETY: malloc_trim only reorganises the allocator's own free memory;
    // it takes no pointers and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back() {}
