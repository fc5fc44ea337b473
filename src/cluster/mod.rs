//! A cluster of barrage nodes over Redis (`cluster.enabled`, on the `redis.url` of durable
//! state): every node announces itself with a heartbeat and knows the live set and its peers'
//! public URLs (`members`, `heartbeat`). Built so far: membership, `GET /v1/cluster`, and
//! drains that send clients to the other live nodes. Room ownership cluster-wide (rendezvous
//! over this set, confirmed by a lease) and the block channel build on it.
//!
//! The heartbeat runs on its own thread; shards and the API read the last set it saw.
#![forbid(unsafe_code)]

pub mod heartbeat;
pub mod members;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::heartbeat::Keys;
use self::members::Members;
use crate::config::Config;

/// The cluster link of one node.
pub struct Cluster {
    me: String,
    url: String,
    keys: Keys,
    ttl_ms: u64,
    every: Duration,
    timeout: Duration,
    backoff_max: Duration,
    client: redis::Client,
    members: RwLock<Arc<Members>>,
    stats: Stats,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Stats {
    up: AtomicBool,
    nodes: AtomicU64,
    heartbeats: AtomicU64,
    errors: AtomicU64,
}

impl Cluster {
    /// Starts the heartbeat when `cluster.enabled` (None otherwise). Redis need not be up: the
    /// node joins when it is, and counts as alone until then.
    pub fn start(config: &Config, listening: std::net::SocketAddr) -> Result<Option<Arc<Cluster>>, String> {
        let c = &config.cluster;
        if !c.enabled {
            return Ok(None);
        }
        let client = redis::Client::open(config.redis.url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
        let url = c.public_url(listening);
        let me = if c.node_id.is_empty() { url.clone() } else { c.node_id.clone() };
        let cluster = Arc::new(Cluster {
            members: RwLock::new(Arc::new(Members::read(&me, Vec::new(), 0))),
            me,
            url,
            keys: Keys::new(&config.redis.prefix),
            ttl_ms: c.node_ttl_ms,
            every: Duration::from_millis(c.heartbeat_ms),
            timeout: Duration::from_millis(config.redis.timeout_ms),
            backoff_max: Duration::from_millis(config.redis.reconnect_max_ms),
            client,
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let runner = Arc::clone(&cluster);
        let handle = std::thread::Builder::new()
            .name("barrage-cluster".into())
            .spawn(move || runner.run())
            .map_err(|e| format!("cluster thread: {e}"))?;
        if let Ok(mut t) = cluster.thread.lock() {
            *t = Some(handle);
        }
        Ok(Some(cluster))
    }

    /// The live set as the last heartbeat read it.
    pub fn members(&self) -> Arc<Members> {
        self.members.read().map_or_else(|p| Arc::clone(&p.into_inner()), |m| Arc::clone(&m))
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last heartbeat reached Redis.
    pub fn up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    /// Where a drain sends clients: the other live nodes' URLs (empty when alone).
    pub fn peer_urls(&self) -> Vec<String> {
        self.members().live().iter().filter(|n| n.id != self.me && !n.url.is_empty()).map(|n| n.url.clone()).collect()
    }

    /// Stops the heartbeat and leaves the set at once (peers need not wait for the TTL).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Prometheus text of the link.
    pub fn render(&self, out: &mut String) {
        let s = &self.stats;
        let series: [(&str, &str, &str, u64); 4] = [
            ("barrage_cluster_up", "gauge", "1 while heartbeats reach Redis.", u64::from(s.up.load(Ordering::Relaxed))),
            (
                "barrage_cluster_nodes",
                "gauge",
                "Live nodes in the last heartbeat's read.",
                s.nodes.load(Ordering::Relaxed),
            ),
            (
                "barrage_cluster_heartbeats_total",
                "counter",
                "Heartbeats Redis took.",
                s.heartbeats.load(Ordering::Relaxed),
            ),
            (
                "barrage_cluster_heartbeat_errors_total",
                "counter",
                "Heartbeats that failed (Redis away, slow or refusing).",
                s.errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
    }

    fn run(&self) {
        let mut con: Option<redis::Connection> = None;
        let mut backoff = self.every;
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            if Instant::now() < next {
                std::thread::sleep(Duration::from_millis(10).min(next - Instant::now()));
                continue;
            }
            match self.beat(&mut con) {
                Ok(members) => {
                    self.stats.up.store(true, Ordering::Relaxed);
                    self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    self.stats.nodes.store(members.live().len() as u64, Ordering::Relaxed);
                    if let Ok(mut m) = self.members.write() {
                        *m = Arc::new(members);
                    }
                    backoff = self.every;
                    next = Instant::now() + self.every;
                }
                Err(e) => {
                    con = None;
                    self.stats.up.store(false, Ordering::Relaxed);
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    // Peers drop this node after its TTL; until Redis is back it sees itself alone.
                    if self.stats.errors.load(Ordering::Relaxed) == 1 {
                        eprintln!("barrage: cluster heartbeat failed: {e}");
                    }
                    next = Instant::now() + backoff;
                    backoff = (backoff * 2).min(self.backoff_max.max(self.every));
                }
            }
        }
        if let Some(c) = con.as_mut() {
            let _ = heartbeat::leave(&self.keys, &self.me).exec(c);
        }
    }

    fn beat(&self, con: &mut Option<redis::Connection>) -> Result<Members, String> {
        if con.is_none() {
            let c = self.client.get_connection_with_timeout(self.timeout).map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
            c.set_write_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
            *con = Some(c);
        }
        let Some(c) = con.as_mut() else { return Err("no connection".into()) };
        let reply: redis::Value =
            heartbeat::command(&self.keys, &self.me, self.ttl_ms, &self.url).query(c).map_err(|e| e.to_string())?;
        heartbeat::parse(&self.me, &reply)
    }
}
