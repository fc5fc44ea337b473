//! A cluster of barrage nodes over Redis (`cluster.enabled`, on the `redis.url` of durable
//! state): every node announces itself with a heartbeat and knows the live set and its peers'
//! public URLs (`members`, `heartbeat`). Built so far: membership, `GET /v1/cluster`, and
//! drains that send clients to the other live nodes. Room ownership cluster-wide (rendezvous
//! over this set, confirmed by a lease) and the block channel build on it.
//!
//! The heartbeat runs on its own thread; shards and the API read the last set it saw.
#![forbid(unsafe_code)]

pub mod heartbeat;
pub mod lease;
pub mod link;
pub mod members;
pub mod placement;
pub mod relay;
pub mod resp;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::heartbeat::Keys;
use self::lease::Leases;
use self::link::{Link, LinkConfig, LinkStats};
use self::members::Members;
use self::placement::Placement;
use self::relay::Channels;
use crate::config::Config;
use crate::shard::mesh::Mesh;

/// A node's id and public URL: `cluster.node_id` (else the URL) and `cluster.public_url`
/// (else the address the public listener is bound to).
pub fn identity(config: &Config, listening: std::net::SocketAddr) -> (String, String) {
    let url = config.cluster.public_url(listening);
    let me = if config.cluster.node_id.is_empty() { url.clone() } else { config.cluster.node_id.clone() };
    (me, url)
}

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
    placement: Arc<Placement>,
    stats: Stats,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    link_stats: Arc<LinkStats>,
    link_stop: Arc<AtomicBool>,
    link_thread: Mutex<Option<JoinHandle<()>>>,
    leases: Arc<Leases>,
}

#[derive(Default)]
struct Stats {
    up: AtomicBool,
    nodes: AtomicU64,
    heartbeats: AtomicU64,
    errors: AtomicU64,
}

impl Cluster {
    /// Starts the heartbeat and the link when `cluster.enabled` (None otherwise). Redis need
    /// not be up: the node joins when it is, and counts as alone until then.
    pub fn start(
        config: &Config,
        listening: std::net::SocketAddr,
        placement: Arc<Placement>,
        mesh: Arc<Mesh>,
        leases: Arc<Leases>,
    ) -> Result<Option<Arc<Cluster>>, String> {
        let c = &config.cluster;
        if !c.enabled {
            return Ok(None);
        }
        let client = redis::Client::open(config.redis.url.as_str()).map_err(|e| format!("redis.url: {e}"))?;
        let (me, url) = identity(config, listening);
        let link_stats = Arc::new(LinkStats::default());
        let link_stop = Arc::new(AtomicBool::new(false));
        let link = Link {
            me: me.clone(),
            channels: Channels::new(&config.redis.prefix),
            mesh,
            placement: Arc::clone(&placement),
            leases: Arc::clone(&leases),
            client: client.clone(),
            cfg: LinkConfig {
                relay_queue_max: c.relay_queue_max,
                asks_max: c.asks_max,
                ask_timeout: Duration::from_millis(c.ask_timeout_ms),
                timeout: Duration::from_millis(config.redis.timeout_ms),
                backoff_max: Duration::from_millis(config.redis.reconnect_max_ms),
            },
            stats: Arc::clone(&link_stats),
            stop: Arc::clone(&link_stop),
        };
        let link_thread = std::thread::Builder::new()
            .name("barrage-link".into())
            .spawn(move || link.run())
            .map_err(|e| format!("cluster link thread: {e}"))?;
        let cluster = Arc::new(Cluster {
            link_stats,
            link_stop,
            link_thread: Mutex::new(Some(link_thread)),
            leases,
            placement,
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
        self.placement.members()
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

    /// Stops the heartbeat and leaves the set at once (peers need not wait for the TTL), then
    /// stops the link.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.link_stop.store(true, Ordering::Release);
        let handle = self.link_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The link's publisher and subscriber reach Redis (requests and frames cross nodes).
    pub fn link_up(&self) -> bool {
        self.link_stats.up.load(Ordering::Relaxed)
    }

    /// Rooms whose lease this node holds.
    pub fn leases_held(&self) -> usize {
        self.leases.held().len()
    }

    /// Where rooms are owned, as this node sees it.
    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
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
        let l = &self.link_stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let link: [(&str, &str, &str, u64); 14] = [
            (
                "barrage_cluster_link_up",
                "gauge",
                "1 while the link's publisher and subscriber reach Redis.",
                u64::from(l.up.load(Ordering::Relaxed)),
            ),
            (
                "barrage_cluster_relayed_total",
                "counter",
                "Messages the link published to Redis (requests, answers, frames, cluster-wide mail).",
                get(&l.published),
            ),
            ("barrage_cluster_received_total", "counter", "Messages the link received from Redis.", get(&l.received)),
            (
                "barrage_cluster_frames_total{way=\"out\"}",
                "counter",
                "Room frames published once for members on other nodes (out) and taken from other nodes' owners (in).",
                get(&l.frames_out),
            ),
            ("barrage_cluster_frames_total{way=\"in\"}", "counter", "", get(&l.frames_in)),
            (
                "barrage_cluster_relay_dropped_total",
                "counter",
                "Relayed messages dropped: the queue to Redis past cluster.relay_queue_max, or a block for a full shard inbox (its members see a seq gap and poll).",
                get(&l.dropped),
            ),
            (
                "barrage_cluster_asks_total{result=\"expired\"}",
                "counter",
                "Forwarded API calls by outcome: expired (no answer within cluster.ask_timeout_ms), refused (cluster.asks_max waiting).",
                get(&l.asks_expired),
            ),
            ("barrage_cluster_asks_total{result=\"refused\"}", "counter", "", get(&l.refused)),
            (
                "barrage_cluster_malformed_total",
                "counter",
                "Messages from Redis that did not parse (dropped).",
                get(&l.malformed),
            ),
            (
                "barrage_cluster_link_errors_total",
                "counter",
                "Link connections to Redis that failed or broke (reconnected with backoff).",
                get(&l.errors),
            ),
            (
                "barrage_cluster_subscriptions",
                "gauge",
                "Room channels followed (rooms other nodes own with members here).",
                get(&l.subscriptions),
            ),
            (
                "barrage_cluster_resyncs_total{way=\"out\"}",
                "counter",
                "Resyncs this node asked for (out: its view of the live set changed, or its subscriber subscribed again) and took from other nodes (in): every room's members are reported to its owner again and owners send their bans and whitelists out again.",
                get(&l.resyncs_out),
            ),
            ("barrage_cluster_resyncs_total{way=\"in\"}", "counter", "", get(&l.resyncs_in)),
            (
                "barrage_cluster_leases",
                "gauge",
                "Room leases this node holds (the rooms whose mixer runs here).",
                self.leases.held().len() as u64,
            ),
        ];
        for (name, kind, help, value) in link {
            let base = name.split('{').next().unwrap_or(name);
            if !help.is_empty() {
                let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} {kind}");
            }
            let _ = writeln!(out, "{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP barrage_cluster_lease_renewals_total Lease renewals Redis took; lost: renewals that found another node holding the lease.\n# TYPE barrage_cluster_lease_renewals_total counter\nbarrage_cluster_lease_renewals_total{{result=\"ok\"}} {}\nbarrage_cluster_lease_renewals_total{{result=\"lost\"}} {}",
            get(&l.renewals),
            get(&l.lost)
        );
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
                    self.placement.set(members);
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
