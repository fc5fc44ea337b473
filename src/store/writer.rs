//! The writer thread: everything the owners write, in order, pipelined to Redis in batches.
//! Redis slow or away fills a bounded buffer (the oldest dropped past `write_buffer_max`);
//! reconnection backs off from 50 ms to `reconnect_max_ms`; a batch whose connection broke is
//! sent again whole (writes are idempotent). At stop, what waits is sent within the grace.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::Store;
use super::encode;
use super::stats::StoreStats;
use crate::room::durable::StoreOp;

/// Writes per pipeline (a block's messages are one write).
const BATCH_WRITES: usize = 256;
/// How long the writer sleeps when there is nothing to send.
const IDLE: Duration = Duration::from_millis(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// How often an idle writer checks that Redis still answers.
const PING_EVERY: Duration = Duration::from_secs(1);

pub(super) fn run(store: &Store, buffer_max: usize, backoff_max: Duration) {
    let stats = &store.stats;
    let mut buffer: VecDeque<StoreOp> = VecDeque::new();
    let mut con: Option<redis::Connection> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    let mut last_ping = Instant::now();
    loop {
        while let Some(op) = store.writes.pop() {
            if buffer.len() >= buffer_max {
                buffer.pop_front();
                StoreStats::add(&stats.dropped_overflow, 1);
            }
            buffer.push_back(op);
        }
        stats.buffered.store(buffer.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if store.stopping() && (buffer.is_empty() || store.flush_over()) {
            return;
        }
        if buffer.is_empty() {
            // Idle: keep `up` (and /healthz) true to Redis, with a PING now and then.
            if let Some(c) = con.as_mut()
                && last_ping.elapsed() >= PING_EVERY
            {
                last_ping = Instant::now();
                if redis::cmd("PING").exec(c).is_err() {
                    StoreStats::add(&stats.errors, 1);
                    stats.up.store(false, std::sync::atomic::Ordering::Relaxed);
                    con = None;
                }
            }
            if con.is_some() || Instant::now() < next_attempt {
                std::thread::sleep(IDLE);
                continue;
            }
        }
        let Some(c) = con.as_mut() else {
            if Instant::now() < next_attempt {
                std::thread::sleep(IDLE);
                continue;
            }
            match store.connect() {
                Ok(c) => {
                    con = Some(c);
                    backoff = BACKOFF_MIN;
                    stats.up.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) => {
                    StoreStats::add(&stats.errors, 1);
                    stats.up.store(false, std::sync::atomic::Ordering::Relaxed);
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(backoff_max);
                }
            }
            continue;
        };
        let n = buffer.len().min(BATCH_WRITES);
        let mut pipe = redis::pipe();
        let mut commands = 0;
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        for op in buffer.iter().take(n) {
            commands += encode::write(&mut pipe, op, &store.retention, now_ms);
            // After the room's last writes, in the same order: the next owner loads them.
            if let (StoreOp::Release { room }, Some(leases)) = (op, &store.leases) {
                leases.release_cmd(&mut pipe, room);
                commands += 1;
            }
        }
        match pipe.exec(c) {
            Ok(()) => {
                if let Some(leases) = &store.leases {
                    for op in buffer.iter().take(n) {
                        if let StoreOp::Release { room } = op {
                            leases.forget(room);
                        }
                    }
                }
                buffer.drain(..n);
                StoreStats::add(&stats.written, n as u64);
                StoreStats::add(&stats.commands, commands as u64);
                stats.up.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() => {
                // Sent again whole once a connection is back.
                StoreStats::add(&stats.errors, 1);
                stats.up.store(false, std::sync::atomic::Ordering::Relaxed);
                con = None;
                next_attempt = Instant::now() + backoff;
                backoff = (backoff * 2).min(backoff_max);
            }
            Err(e) => {
                // An answer no retry changes (a key of another type, Redis out of memory):
                // dropped, counted and said, so the buffer does not wedge behind it.
                StoreStats::add(&stats.errors, 1);
                StoreStats::add(&stats.dropped_refused, n as u64);
                eprintln!("barrage: redis refused {n} writes: {e}");
                buffer.drain(..n);
            }
        }
    }
}
