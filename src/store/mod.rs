//! Durable room state in Redis (`redis.url`): the owners' writes and loads (`room::durable`)
//! go through bounded queues to the store's own threads, so no shard ever waits on Redis.
//!
//! - `writer`: takes every write, holds it in a bounded buffer, and sends batches as one
//!   pipeline; while Redis is slow or away the buffer fills (oldest dropped past
//!   `redis.write_buffer_max`), and the writer reconnects with backoff and sends what waited,
//!   in order. Writes are idempotent, so a batch cut by a dropped connection is sent again.
//! - `loader`: reads a room's state when its owner first needs it and mails it back
//!   (`OwnerMail::Loaded`); Redis down answers at once with nothing (the room goes on from
//!   memory).
//! - replay pages are read on the API thread that asks, on a connection of its own.
//!
//! `keys` is where everything lives, `encode` the commands and replies (sans-IO).

pub mod encode;
pub mod keys;
mod loader;
pub mod stats;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use self::encode::{Cursor, Retention};
use self::stats::StoreStats;
use crate::cluster::lease::Leases;
use crate::config::Config;
use crate::proto::Message;
use crate::room::durable::StoreOp;
use crate::shard::mesh::Mesh;

/// Writes queued from the shards to the writer (beyond it, `write_buffer_max` holds them).
const WRITE_QUEUE: usize = 65_536;
/// Loads queued to the loader; beyond it a load fails at once (the room goes on from memory).
const LOAD_QUEUE: usize = 8_192;

/// The store as the shards and the API see it.
pub struct Store {
    writes: ArrayQueue<StoreOp>,
    loads: ArrayQueue<StoreOp>,
    stats: Arc<StoreStats>,
    stop: AtomicBool,
    /// Set with `stop`: how long the writer may go on sending what waits.
    flush_until: Mutex<Option<Instant>>,
    client: redis::Client,
    timeout: Duration,
    retention: Retention,
    /// Connections for replay requests, reused by the API threads.
    pool: Mutex<Vec<redis::Connection>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// In a cluster: room leases, taken by the loader and released by the writer.
    leases: Option<Arc<Leases>>,
}

impl Store {
    /// Starts the writer and the loader for `config.redis` (None without a URL). Redis need not
    /// be up: the threads connect when it is.
    pub fn start(config: &Config, mesh: Arc<Mesh>, leases: Option<Arc<Leases>>) -> Result<Option<Arc<Store>>, String> {
        let c = &config.redis;
        if c.url.is_empty() {
            return Ok(None);
        }
        let client = redis::Client::open(c.url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
        let store = Arc::new(Store {
            writes: ArrayQueue::new(WRITE_QUEUE),
            loads: ArrayQueue::new(LOAD_QUEUE),
            stats: Arc::new(StoreStats::default()),
            stop: AtomicBool::new(false),
            flush_until: Mutex::new(None),
            client,
            timeout: Duration::from_millis(c.timeout_ms),
            retention: Retention {
                prefix: c.prefix.clone(),
                history_messages_max: config.rooms.history_messages_max,
                replay_retention_ms: i64::try_from(c.replay_retention_s.saturating_mul(1000)).unwrap_or(i64::MAX),
                replay_messages_max: c.replay_messages_max,
                attr_log_len_max: config.rooms.attr_log_len_max,
                room_ttl_s: c.room_ttl_s,
            },
            pool: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            leases,
        });
        let backoff_max = Duration::from_millis(c.reconnect_max_ms);
        let (w, buffer_max) = (Arc::clone(&store), c.write_buffer_max);
        let writer = std::thread::Builder::new()
            .name("redis-writer".into())
            .spawn(move || writer::run(&w, buffer_max, backoff_max))
            .map_err(|e| e.to_string())?;
        let l = Arc::clone(&store);
        let loader = std::thread::Builder::new()
            .name("redis-loader".into())
            .spawn(move || loader::run(&l, &mesh, backoff_max))
            .map_err(|e| e.to_string())?;
        if let Ok(mut t) = store.threads.lock() {
            t.extend([writer, loader]);
        }
        Ok(Some(store))
    }

    /// Takes a write or a load from a shard; gives it back when the queue is full.
    pub fn offer(&self, op: StoreOp) -> Result<(), StoreOp> {
        match op {
            StoreOp::Load { .. } => self.loads.push(op),
            _ => self.writes.push(op),
        }
    }

    /// Whether Redis answers (for `/healthz`).
    pub fn up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// One page of a room's messages by server time (`from` to `to_ms`, inclusive), and the
    /// cursor after it. On the calling (API) thread.
    pub fn replay(
        &self,
        room: &str,
        from: Cursor,
        to_ms: i64,
        limit: usize,
    ) -> Result<(Vec<Message>, Option<Cursor>), String> {
        let mut con = match self.pool.lock().ok().and_then(|mut p| p.pop()) {
            Some(con) => con,
            None => self.connect().map_err(|e| format!("redis: {e}"))?,
        };
        let mut pipe = redis::pipe();
        encode::replay(&mut pipe, &self.retention.prefix, room, from, to_ms, limit);
        let replies: Vec<redis::Value> = pipe.query(&mut con).map_err(|e| format!("redis: {e}"))?;
        if let Ok(mut p) = self.pool.lock() {
            p.push(con);
        }
        StoreStats::add(&self.stats.replays, 1);
        let reply = replies.first().cloned().unwrap_or(redis::Value::Nil);
        Ok(encode::parse_replay(&reply, from, limit))
    }

    /// Stops the threads; the writer first sends what waits, for at most `grace`.
    pub fn stop(&self, grace: Duration) {
        if let Ok(mut until) = self.flush_until.lock() {
            *until = Some(Instant::now() + grace);
        }
        self.stop.store(true, Ordering::Release);
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = self.client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        StoreStats::add(&self.stats.connects, 1);
        Ok(con)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Stopping, and the time to send what waits is over.
    fn flush_over(&self) -> bool {
        self.stopping() && self.flush_until.lock().map_or(true, |u| u.is_none_or(|u| Instant::now() >= u))
    }
}
