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
            "chatconnect_connections_closed_total",
            "counter",
            "Connections closed, for any reason.",
            c.connections_closed,
        );
        sample(
            &mut out,
            "chatconnect_memory_trims_total",
            "counter",
            "Times freed memory was given back to the system after a wave of closes.",
            self.trim.count,
        );
        {
            let (up, published, received, instances) = self.relay.broker_figures();
            let r = &self.relay.stats;
            for (name, kind, help, value) in [
                ("chatconnect_broker_connected", "gauge", "1 while both broker connections are up (0 without BROKER_URL).", u64::from(up)),
                ("chatconnect_broker_published_total", "counter", "Batches and deletes published on the broker.", published),
                ("chatconnect_broker_received_total", "counter", "Batches received from other processes.", received),
                ("chatconnect_broker_store_reads_total", "counter", "Store reads for gaps and catch-ups after (re)subscribing.", r.reads),
                ("chatconnect_broker_repaired_total", "counter", "Messages delivered from the store that the broker had not brought.", r.repaired),
                ("chatconnect_broker_instances", "gauge", "Live processes in the last member count, this one included (0 without a reachable broker).", instances),
                ("chatconnect_broker_stale_total", "counter", "Batches dropped because the store did not have them (a room deleted and made again).", r.stale),
            ] {
                sample(&mut out, name, kind, help, value);
            }
        }
        sample(
            &mut out,
            "chatconnect_client_memory_bytes",
            "gauge",
            "Bytes held by all connections' buffers (input, queues, frames waiting).",
            self.conns.client_memory(),
        );
        sample(
            &mut out,
            "chatconnect_client_memory_peak_bytes",
            "gauge",
            "Highest client memory seen at the end of a pass since start.",
            self.budget.peak,
        );
        sample(
            &mut out,
            "chatconnect_client_memory_budget_bytes",
            "gauge",
            "MAX_CLIENT_MEMORY (0: no cap).",
            self.budget.limit(),
        );
        sample(
            &mut out,
            "chatconnect_client_memory_closes_total",
            "counter",
            "Connections closed because all connections together held more than MAX_CLIENT_MEMORY.",
            self.budget.closed,
        );
        sample(
            &mut out,
            "chatconnect_client_memory_read_pauses_total",
            "counter",
            "Reads put off while the connections held more than MAX_CLIENT_MEMORY.",
            self.budget.read_pauses,
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
                 chatconnect_worker_queue_depth{{lane=\"store\"}} {}\n\
                 chatconnect_worker_queue_depth{{lane=\"write\"}} {}\n",
                self.lanes.hash.depth(),
                self.lanes.store.depth(),
                self.lanes.write.depth()
            ),
        );
        self.history_metrics(&mut out);
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

    /// The history cache, the joins' store reads, and the other processes
    /// sharing the database.
    fn history_metrics(&self, out: &mut String) {
        let cache = self.joins.cache_stats();
        let joins = self.joins.stats();
        let lookups = cache.hits + cache.misses;
        let rows: [(&str, &str, &str, String); 13] = [
            ("chatconnect_history_cache_bytes", "gauge", "Bytes of recent history held in memory.", cache.bytes.to_string()),
            ("chatconnect_history_cache_budget_bytes", "gauge", "HISTORY_CACHE: the most the history cache may hold.", cache.budget.to_string()),
            ("chatconnect_history_cache_rooms", "gauge", "Rooms whose recent history is in memory.", cache.rooms.to_string()),
            ("chatconnect_history_cache_hits_total", "counter", "Joins answered from memory.", cache.hits.to_string()),
            ("chatconnect_history_cache_misses_total", "counter", "Joins the cache could not answer (not cached, not trusted, or resuming from before it).", cache.misses.to_string()),
            ("chatconnect_history_cache_hit_ratio", "gauge", "Hits over all lookups since start (0 before any).", format!("{:.4}", if lookups == 0 { 0.0 } else { cache.hits as f64 / lookups as f64 })),
            ("chatconnect_history_cache_evictions_total", "counter", "Rooms dropped from the cache to stay within its budget.", cache.evictions.to_string()),
            ("chatconnect_history_cache_invalidations_total", "counter", "Cached rooms dropped as possibly stale (another writer, or a gap in seq).", cache.invalidations.to_string()),
            ("chatconnect_history_reads_total", "counter", "Store reads for joins: one per room being loaded, one per resume older than the cache.", (joins.room_reads + joins.resume_reads).to_string()),
            ("chatconnect_joins_shared_total", "counter", "Joins answered without a store read of their own (cache, or a read already under way).", joins.shared_reads.to_string()),
            ("chatconnect_history_reads_waiting", "gauge", "Join reads waiting for the store lane.", joins.reads_waiting.to_string()),
            ("chatconnect_store_peers", "gauge", "Other server processes announced on this database.", self.joins.presence().peers().to_string()),
            ("chatconnect_history_cache_trusted", "gauge", "1 while the cache may answer joins (no other process writes the database, and this process's view of that is fresh).", u8::from(self.joins.presence().generation().is_some()).to_string()),
        ];
        for (name, kind, help, value) in rows {
            sample(out, name, kind, help, value);
        }
    }
}
