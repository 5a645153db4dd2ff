//! Member counts for `GET /rooms`: this process's own, plus, with a broker,
//! those of the other processes (`crate::broker::census`).
//!
//! Once a [`REFRESH`] the tick hands the broker a snapshot of the rooms
//! with members here; what the other processes count arrives as a broker
//! event and replaces the last figures whole. Without a broker this is the
//! room registry's count and nothing more.
//!
//! Called by the pass (`on_tick`), the completions (the broker's counts,
//! and the room list answer).

use std::collections::HashMap;
use std::time::Instant;

use crate::broker::census::{Reporter, REFRESH};
use crate::rooms::Rooms;

pub(super) struct Census {
    reporter: Option<Reporter>,
    /// Members on the other processes, per room, as last reported.
    remote: HashMap<String, u64>,
    next_report: Instant,
}

impl Census {
    pub(super) fn new(reporter: Option<Reporter>) -> Census {
        Census {
            reporter,
            remote: HashMap::new(),
            next_report: Instant::now(),
        }
    }

    /// Once a tick: report this process's counts when due.
    pub(super) fn on_tick(&mut self, rooms: &Rooms, now: Instant) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        if now < self.next_report {
            return;
        }
        self.next_report = now + REFRESH;
        reporter.report(rooms.member_counts());
    }

    /// The other processes' counts, fresh from the broker.
    pub(super) fn remote(&mut self, counts: HashMap<String, u64>) {
        self.remote = counts;
    }

    /// Members of room `name` on every process.
    pub(super) fn members(&self, rooms: &Rooms, name: &str) -> u64 {
        rooms.member_count(name) as u64 + self.remote.get(name).copied().unwrap_or(0)
    }
}
