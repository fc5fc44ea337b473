//! The store threads' counters, shared with the API's `/metrics` (atomics: the store runs on
//! its own threads, not on a shard).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default)]
pub struct StoreStats {
    /// Redis answers (set by the writer after each success or failure).
    pub up: AtomicBool,
    pub buffered: AtomicU64,
    pub written: AtomicU64,
    pub commands: AtomicU64,
    pub dropped_overflow: AtomicU64,
    pub dropped_refused: AtomicU64,
    pub errors: AtomicU64,
    pub connects: AtomicU64,
    pub loads: AtomicU64,
    pub load_errors: AtomicU64,
    pub malformed: AtomicU64,
    pub replays: AtomicU64,
}

impl StoreStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        let g = Self::get;
        let series: [(&str, &str, &str, u64); 11] = [
            (
                "barrage_redis_up",
                "gauge",
                "1 while Redis answers the writer.",
                u64::from(self.up.load(Ordering::Relaxed)),
            ),
            (
                "barrage_redis_write_buffer",
                "gauge",
                "Writes waiting for Redis (bounded by redis.write_buffer_max).",
                g(&self.buffered),
            ),
            (
                "barrage_redis_writes_total",
                "counter",
                "Store writes (a block, an attribute or list change) Redis took.",
                g(&self.written),
            ),
            (
                "barrage_redis_commands_total",
                "counter",
                "Redis commands the writer sent (pipelined per batch).",
                g(&self.commands),
            ),
            (
                "barrage_redis_writes_overflowed_total",
                "counter",
                "Writes dropped, oldest first, while redis.write_buffer_max were waiting.",
                g(&self.dropped_overflow),
            ),
            (
                "barrage_redis_writes_refused_total",
                "counter",
                "Write batches Redis refused with an error no retry fixes (dropped).",
                g(&self.dropped_refused),
            ),
            (
                "barrage_redis_errors_total",
                "counter",
                "Redis connections lost or refused, and failed commands.",
                g(&self.errors),
            ),
            (
                "barrage_redis_connects_total",
                "counter",
                "Connections made to Redis (the first, and each reconnection).",
                g(&self.connects),
            ),
            ("barrage_redis_reads_total", "counter", "Rooms read from Redis for loading.", g(&self.loads)),
            (
                "barrage_redis_read_errors_total",
                "counter",
                "Room reads that failed (answered as failed loads).",
                g(&self.load_errors),
            ),
            (
                "barrage_redis_malformed_total",
                "counter",
                "Entries read back from Redis that barrage could not decode (skipped).",
                g(&self.malformed),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP barrage_replay_requests_total Replay pages served from Redis.\n# TYPE barrage_replay_requests_total counter\nbarrage_replay_requests_total {}",
            g(&self.replays)
        );
    }
}
