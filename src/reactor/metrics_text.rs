//! The `GET /metrics` page: the reactor's counters and gauges, the depth of
//! the worker queues, and the histograms the workers fill.
//!
//! Called by the endpoints (`crate::api`), through `http_conn.rs`, for
//! `GET /metrics`.

use std::sync::atomic::Ordering;

use super::Reactor;
use crate::metrics::sample;

impl Reactor {
    /// `GET /metrics` body.
    pub(super) fn metrics_text(&self) -> String {
        let c = &self.conns.counters;
        let mut out = String::with_capacity(4096);
        sample(
            &mut out,
            "chatconnect_http_connections",
            "gauge",
            "Open HTTP connections.",
            c.http_connections,
        );
        sample(
            &mut out,
            "chatconnect_ws_connections",
            "gauge",
            "Open WebSocket connections.",
            c.ws_connections,
        );
        sample(
            &mut out,
            "chatconnect_rooms_active",
            "gauge",
            "Rooms with members or unstored messages.",
            self.rooms.len(),
        );
        sample(
            &mut out,
            "chatconnect_http_requests_total",
            "counter",
            "HTTP requests parsed.",
            c.http_requests,
        );
        sample(
            &mut out,
            "chatconnect_messages_received_total",
            "counter",
            "Chat messages accepted from clients.",
            c.messages_received,
        );
        sample(
            &mut out,
            "chatconnect_messages_rejected_total",
            "counter",
            "Chat messages refused (invalid, too long, rate limited).",
            c.messages_rejected,
        );
        sample(
            &mut out,
            "chatconnect_messages_stored_total",
            "counter",
            "Chat messages stored by this process.",
            c.messages_stored,
        );
        sample(
            &mut out,
            "chatconnect_messages_delivered_total",
            "counter",
            "Message frames queued to members.",
            c.messages_delivered,
        );
        sample(
            &mut out,
            "chatconnect_slow_consumer_closes_total",
            "counter",
            "WebSockets closed with 1008 for an unsent backlog over the limit.",
            c.slow_consumer_closes,
        );
        sample(
            &mut out,
            "chatconnect_accept_pauses_total",
            "counter",
            "Times accepting paused because descriptors ran out.",
            c.accept_pauses,
        );
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "# HELP chatconnect_worker_queue_depth Jobs waiting for a worker, by lane.\n\
                 # TYPE chatconnect_worker_queue_depth gauge\n\
                 chatconnect_worker_queue_depth{{lane=\"hash\"}} {}\n\
                 chatconnect_worker_queue_depth{{lane=\"store\"}} {}\n",
                self.lanes.hash.depth(),
                self.lanes.store.depth()
            ),
        );
        self.shared.store_latency.render(
            &mut out,
            "chatconnect_store_call_seconds",
            "Store call latency.",
        );
        self.shared.commit_latency.render(
            &mut out,
            "chatconnect_commit_seconds",
            "Per room batch: from its oldest message's arrival to its broadcast.",
        );
        sample(
            &mut out,
            "chatconnect_store_errors_total",
            "counter",
            "Store calls that failed.",
            self.shared.store_errors.load(Ordering::Relaxed),
        );
        self.shared.batch_size.render(
            &mut out,
            "chatconnect_store_batch_size",
            "Messages per store write (one transaction on SQLite), over all its rooms.",
        );
        out
    }
}
