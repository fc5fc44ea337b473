//! The hub: everything one shard knows, as a sans-IO state machine, in two halves that meet
//! only by mail. The **host** (`host/`) holds the shard's connections and what they are in; the
//! **desk** (`desk.rs`) owns a share of the rooms (their mixers, history, lists, attributes and
//! block ticks). A request from a connection to a room's owner, and the owner's blocks and
//! answers, travel as typed mail (`mail.rs`): to this shard's other half at once, to other
//! shards through the post office (`post.rs`), which waits for full inboxes and never drops
//! control mail. `turn.rs` is the one order in which a shard's loop runs all of it.
//!
//! The data flow: bytes → `host::upgrade` → `host::session` → `OwnerMail` → `desk` →
//! `room::Owner` cuts and encodes a block → `HostMail::Deliver` to each shard with members →
//! `host::fanout` → each member's queue in the outbox → `poll_send` → one send per connection.
//!
//! Inputs: `handle_accept`, `handle_recv`, `handle_eof`, `handle_sent` (completions),
//! `handle_mail`, `handle_timeout`, `handle_load`. Outputs: `poll_ready` + `poll_send` (frames
//! to write), `poll_close` (connections to end, and how: `Teardown`), `flush_mail` (mail for
//! other shards),
//! `poll_timeout`. No sockets, no clocks: the simulation drives it exactly as the shard does.
#![forbid(unsafe_code)]

pub mod desk;
pub mod host;
pub mod mail;
pub mod post;
pub mod turn;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use self::desk::{Desk, DeskConfig, Load};
use self::host::Host;
pub use self::host::Teardown;
use self::mail::{HostMail, Mail};
use self::post::PostOffice;
use crate::config::Config;
pub use crate::ids::Now;
use crate::ids::{ConnKey, ShardId};
use crate::metrics::{Counters, Series};
use crate::room::attrs::AttrLimits;
use crate::room::durable::StoreOp;
use crate::room::limit::Rate;
use crate::room::mixer::MixerLimits;
use crate::room::moderation::ModerationLimits;
use crate::room::owner::OwnerConfig;
use crate::wire::HandshakeLimits;
use crate::wire::reader::ReadLimits;

/// One shard's connections, owned rooms and outgoing mail.
pub struct Hub {
    shard: ShardId,
    host: Host,
    desk: Desk,
    post: PostOffice,
    /// Mail the halves gathered, being routed, and mail for this shard, handled before the
    /// call that caused it returns.
    routing: Vec<(ShardId, Mail)>,
    local: VecDeque<Mail>,
    /// Reused buffer of store ops.
    store_ops: Vec<StoreOp>,
    busy_permille: u32,
    /// The cluster's placement generation last acted on.
    placement_seen: u64,
    /// The post office's and the driver's counts.
    counters: Counters,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        // In a cluster the link is one more destination (mail for rooms other nodes own).
        let destinations = cfg.shards + usize::from(cfg.placement.is_some());
        let desk = DeskConfig {
            block_interval_ms: cfg.block_interval_ms,
            block_wait_max_ms: cfg.block_wait_max_ms,
            owner: cfg.owner.clone(),
            name_bytes_max: cfg.name_bytes_max,
            loads: cfg.loads,
        };
        Hub {
            shard: cfg.shard,
            post: PostOffice::new(destinations, cfg.mesh_overflow_max),
            desk: Desk::new(desk),
            host: Host::new(cfg),
            routing: Vec::new(),
            local: VecDeque::new(),
            store_ops: Vec::new(),
            busy_permille: 0,
            placement_seen: 0,
            counters: Counters::default(),
        }
    }

    /// Rooms (this shard's share) and moderation replicas (every room's) taken over from the
    /// process this one replaces; call before the shard takes connections.
    pub fn import(
        &mut self,
        rooms: Vec<crate::proto::RoomState>,
        replicas: Vec<crate::room::owner::Replica>,
        now: Now,
    ) {
        self.desk.import(rooms, now);
        self.host.import_replicas(replicas, now);
    }

    // ---- inputs ----

    /// A new TCP connection from `peer` (when known). None when the shard is full or
    /// stopping, or the address is over its rate: the driver closes it.
    pub fn handle_accept(&mut self, io: u64, peer: Option<std::net::SocketAddr>, now: Now) -> Option<ConnKey> {
        self.host.handle_accept(io, peer, now)
    }

    /// Bytes received on a connection (the driver's buffer, ours until we return).
    pub fn handle_recv(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        self.host.handle_recv(key, data, now);
        self.route(now);
    }

    /// The peer closed its side, or reading failed: nothing more will arrive.
    pub fn handle_eof(&mut self, key: ConnKey, now: Now) {
        self.host.handle_eof(key);
        self.route(now);
    }

    /// A send completed: `result` is bytes written or a negative errno.
    pub fn handle_sent(&mut self, key: ConnKey, result: i32, now: Now) {
        self.host.handle_sent(key, result);
        self.route(now);
    }

    /// The kernel took a TLS connection's send keys (`result` 0) or refused them (-errno):
    /// see `poll_kernel_tls`.
    pub fn handle_kernel_tls(&mut self, key: ConnKey, result: i32) {
        self.host.handle_kernel_tls(key, result);
    }

    /// One item from this shard's inbox.
    pub fn handle_mail(&mut self, mail: Mail, now: Now) {
        self.dispatch(mail, now);
        self.route(now);
    }

    /// Timeouts, block ticks and sweeps, when due (see `poll_timeout`).
    pub fn handle_timeout(&mut self, now: Now) {
        self.host.handle_timeout(now);
        let (backlog, conns) = self.host.backlog();
        self.desk.handle_timeout(now, Load { backlog, conns, busy_permille: self.busy_permille }, &self.post);
        self.route(now);
    }

    /// The driver's measure of recent load: the share of time (in thousandths) the busiest
    /// shard's loop was not sleeping. Block ticks wait while it is high.
    pub fn handle_load(&mut self, busy_permille: u32) {
        self.busy_permille = busy_permille;
    }

    /// End of a turn: membership reports to owners, gauges. In a cluster, when the live set
    /// changed since the last turn, owners let go of rooms that moved to another node and
    /// every room reports its members to its owner again.
    pub fn end_turn(&mut self, now: Now) {
        if let Some(p) = self.host.placement() {
            let generation = p.generation();
            if generation != self.placement_seen {
                self.placement_seen = generation;
                self.desk.placement_changed(now, &|room| p.is_mine(room.as_str()));
                self.host.placement_changed();
            }
        }
        self.host.end_turn(&self.post);
        self.route(now);
    }

    /// The driver has closed an ended connection and none of its operations is pending.
    pub fn release(&mut self, key: ConnKey) {
        self.host.release(key);
    }

    // ---- outputs ----

    /// Milliseconds until `handle_timeout` has work.
    pub fn poll_timeout(&self, now: Now) -> u64 {
        self.host.next_timeout(now).min(self.desk.next_timeout(now))
    }

    /// Next connection with frames to send and no send in flight.
    pub fn poll_ready(&mut self) -> Option<ConnKey> {
        self.host.poll_ready()
    }

    /// Fills `iov` with the frames one send should write to `key`; see `Host::poll_send`.
    pub fn poll_send<'a>(&'a mut self, key: ConnKey, iov: &mut [IoSlice<'a>]) -> usize {
        self.host.poll_send(key, iov)
    }

    /// Next TLS connection whose send keys go to the kernel (see `kernel_tls_info`).
    pub fn poll_kernel_tls(&mut self) -> Option<ConnKey> {
        self.host.poll_kernel_tls()
    }

    /// The `crypto_info` for `setsockopt(SOL_TLS, TLS_TX)` (after `setsockopt(TCP_ULP, "tls")`)
    /// of a connection `poll_kernel_tls` named. The bytes stay alive and unmoved until
    /// `handle_kernel_tls` for it; no send starts meanwhile.
    pub fn kernel_tls_info(&self, key: ConnKey) -> Option<&[u8]> {
        self.host.kernel_tls_info(key)
    }

    /// Next connection to cancel, close (orderly or abortively) and release.
    pub fn poll_close(&mut self) -> Option<(ConnKey, Teardown)> {
        self.host.poll_close()
    }

    /// Offers the waiting mail to the other shards' inboxes; what does not fit waits for the
    /// next turn (see `post`).
    pub fn flush_mail(&mut self, offer: &mut dyn FnMut(ShardId, Mail) -> Result<(), Mail>) {
        let flushed = self.post.flush(offer);
        self.counters.add(Series::MeshFull, flushed.shed);
        self.counters.set(Series::MeshWaiting, self.post.waiting() as u64);
    }

    /// Hands the writes and loads for durable storage to `store`; what it cannot take (its
    /// queue is full) is counted, and a load it refused lets the room go on from memory.
    pub fn flush_store(&mut self, store: &mut dyn FnMut(StoreOp) -> Result<(), StoreOp>, now: Now) {
        let mut ops = std::mem::take(&mut self.store_ops);
        self.desk.take_store_ops(&mut ops);
        for op in ops.drain(..) {
            match store(op) {
                Ok(()) => {}
                Err(StoreOp::Load { room, .. }) => self.desk.load_refused(&room, now, &self.post),
                Err(_) => self.counters.inc(Series::StoreQueueFull),
            }
        }
        self.store_ops = ops;
        self.route(now);
    }

    /// Whether mail waits for a full inbox (the driver then sleeps at most a millisecond).
    pub fn has_waiting_mail(&self) -> bool {
        self.post.waiting() > 0
    }

    // ---- the driver's handle and counts ----

    pub fn io(&self, key: ConnKey) -> u64 {
        self.host.io(key)
    }

    pub fn set_io(&mut self, key: ConnKey, io: u64) {
        self.host.set_io(key, io);
    }

    /// Counts something the driver saw.
    pub fn count(&mut self, series: Series) {
        self.counters.inc(series);
    }

    /// Sets a gauge the driver keeps.
    pub fn set_gauge(&mut self, series: Series, value: u64) {
        self.counters.set(series, value);
    }

    /// Every counter of the shard.
    pub fn counters(&self) -> Counters {
        let mut all = self.counters.clone();
        all.absorb(self.host.counters());
        all.absorb(self.desk.counters());
        all
    }

    // ---- what the driver and tests read ----

    pub fn has_ready(&self) -> bool {
        self.host.has_ready()
    }

    /// Whether `HostMail::Stop` arrived.
    pub fn stopping(&self) -> bool {
        self.host.stopping()
    }

    /// Whether a drain has started (the driver stops accepting).
    pub fn draining(&self) -> bool {
        self.host.draining()
    }

    /// Connections of any state.
    pub fn connections(&self) -> usize {
        self.host.connections()
    }

    /// Sends handed out by `poll_send` and not yet completed.
    pub fn sends_in_flight(&self) -> usize {
        self.host.sends_in_flight()
    }

    /// Frames queued to a connection, in flight included (for tests that bound a slow reader).
    pub fn queue_len(&self, key: ConnKey) -> usize {
        self.host.queue_len(key)
    }

    /// Frames stored in the outbox, each held by at least one queue (for tests).
    pub fn outbox_frames(&self) -> usize {
        self.host.outbox_frames()
    }

    // ---- routing ----

    fn dispatch(&mut self, mail: Mail, now: Now) {
        match mail {
            Mail::Owner(m) => self.desk.handle_mail(m, now, &self.post),
            // Both halves answer a resync: members are reported again, lists replicated again.
            Mail::Host(HostMail::Resync) => {
                self.host.handle_mail(HostMail::Resync, now);
                self.desk.resync(now);
            }
            Mail::Host(m) => self.host.handle_mail(m, now),
        }
    }

    /// Routes what the halves gathered: mail for this shard is handled now (which may gather
    /// more), mail for others goes to the post office — or, for a request from a connection
    /// while the way to its owner is congested, is refused (503) on the spot.
    fn route(&mut self, now: Now) {
        loop {
            self.host.take_mail(&mut self.routing);
            self.desk.take_mail(&mut self.routing);
            if self.routing.is_empty() && self.local.is_empty() {
                return;
            }
            for (to, mail) in self.routing.drain(..) {
                if to == self.shard {
                    self.local.push_back(mail);
                    continue;
                }
                let asker = match &mail {
                    Mail::Owner(m) if self.post.is_congested(to) => m.asker(),
                    Mail::Owner(_) | Mail::Host(_) => None,
                };
                match asker {
                    Some(at) => {
                        self.counters.inc(Series::MeshRefused);
                        let reason = "server busy: try again";
                        self.local.push_back(
                            HostMail::Refused { conn: at.conn, code: host::code::UNAVAILABLE, reason }.into(),
                        );
                    }
                    None => self.post.post(to, mail),
                }
            }
            while let Some(mail) = self.local.pop_front() {
                self.dispatch(mail, now);
            }
        }
    }
}

/// What a hub needs from the config.
#[derive(Clone)]
pub struct HubConfig {
    pub shard: ShardId,
    pub shards: usize,
    pub conns_max: usize,
    pub handshake: HandshakeLimits,
    pub read: ReadLimits,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub heartbeat_ms: u32,
    pub allow_anonymous: bool,
    pub echo_path: String,
    pub name_bytes_max: usize,
    pub data_bytes_max: usize,
    pub send_queue_frames_max: usize,
    pub partial_bytes_max: usize,
    pub partial_bytes_conn_max: usize,
    pub block_interval_ms: u64,
    pub block_wait_max_ms: u64,
    pub jwt_secret: Vec<u8>,
    /// What a token must carry (expiry, audience, issuer, leeway).
    pub token_rules: crate::auth::Rules,
    /// How long a connection whose token expired has to refresh it.
    pub refresh_grace_ms: u64,
    /// Which types clients may send, at what priority.
    pub client_types: Arc<host::ClientTypes>,
    /// Browser origins allowed to open WebSockets and poll (empty: any).
    pub origins: Arc<[String]>,
    /// Rates per client address.
    pub edge: host::EdgeLimits,
    /// Every connection starts with a PROXY v2 header naming the client.
    pub proxy_protocol: bool,
    /// Sends per connection.
    pub send_rate: Rate,
    /// Join frames per connection.
    pub join_rate: Rate,
    /// Compressed messages per connection (permessage-deflate).
    pub inflate_rate: Rate,
    pub slow_consumer_ms: u64,
    /// Close peers that are not taking their bytes with an RST (see `Teardown::Reset`).
    pub abortive_close: bool,
    pub poll_limit_max: usize,
    /// Mails waiting per destination shard before block deliveries to it are shed and new
    /// requests for it refused (see `post`).
    pub mesh_overflow_max: usize,
    /// The owner table of this shard's rooms.
    pub owner: OwnerConfig,
    /// Loading rooms from durable storage.
    pub loads: desk::LoadLimits,
    /// In a cluster: which node owns each room (`with_placement`).
    pub placement: Option<Arc<crate::cluster::placement::Placement>>,
    /// The business hooks' queues, when any hook is configured (`with_hooks`).
    pub hooks: Option<Arc<crate::hooks::Gate>>,
    /// Serve the demo page; and hand out development tokens there.
    pub demo: bool,
    pub demo_dev_tokens: bool,
    /// The public listener speaks TLS with this config (`with_tls`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Keep TLS 1.3's key-update state per connection (`tls.key_updates`).
    pub tls_key_updates: bool,
    /// Offer permessage-deflate (`websocket.deflate`), with its threshold and level for what a
    /// shard compresses itself (echoes).
    pub deflate: bool,
    pub deflate_min_bytes: usize,
    pub deflate_level: u32,
    /// Hand each TLS connection's send keys to the kernel after its handshake (`tls.kernel`,
    /// and the kernel offers the `tls` ULP): see `tls::kernel`.
    pub tls_kernel: bool,
}

impl HubConfig {
    /// The hub config of shard `shard` out of `shards`.
    pub fn new(c: &Config, shard: ShardId, shards: usize) -> HubConfig {
        HubConfig {
            shard,
            shards,
            conns_max: c.server.connections_max.div_ceil(shards),
            handshake: HandshakeLimits {
                request_bytes_max: c.websocket.handshake_bytes_max,
                headers_max: c.websocket.handshake_headers_max,
            },
            read: ReadLimits {
                frame_bytes_max: c.websocket.frame_bytes_max,
                message_bytes_max: c.websocket.message_bytes_max,
                // Per connection: set by each read from the connection's flag.
                deflate: false,
            },
            deflate: c.websocket.deflate,
            deflate_min_bytes: c.websocket.deflate_min_bytes,
            deflate_level: c.websocket.deflate_level,
            handshake_timeout_ms: c.websocket.handshake_timeout_ms,
            idle_timeout_ms: c.websocket.idle_timeout_ms,
            close_timeout_ms: c.websocket.close_timeout_ms,
            heartbeat_ms: c.websocket.heartbeat_ms,
            allow_anonymous: c.websocket.allow_anonymous,
            echo_path: c.websocket.echo_path.clone(),
            name_bytes_max: c.rooms.name_bytes_max,
            data_bytes_max: c.rooms.data_bytes_max,
            send_queue_frames_max: c.server.send_queue_frames_max as usize,
            partial_bytes_max: c.server.partial_bytes_max,
            partial_bytes_conn_max: c.partial_bytes_conn(),
            block_interval_ms: c.rooms.block_interval_ms,
            block_wait_max_ms: c.rooms.block_wait_max_ms,
            jwt_secret: c.auth.jwt_secret.as_bytes().to_vec(),
            token_rules: crate::auth::Rules {
                leeway_s: c.auth.jwt_leeway_s,
                require_exp: c.auth.require_exp,
                audience: (!c.auth.audience.is_empty()).then(|| c.auth.audience.clone()),
                issuer: (!c.auth.issuer.is_empty()).then(|| c.auth.issuer.clone()),
            },
            refresh_grace_ms: c.auth.refresh_grace_ms,
            client_types: Arc::new(host::ClientTypes::new(c)),
            edge: host::EdgeLimits {
                connections: Rate { per_s: c.server.addr_conn_rate_per_s, burst: c.server.addr_conn_rate_burst },
                requests: Rate { per_s: c.server.addr_request_rate_per_s, burst: c.server.addr_request_rate_burst },
                addresses_max: c.server.addr_table_max,
            },
            proxy_protocol: c.server.proxy_protocol,
            origins: c
                .websocket
                .origins
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(String::from)
                .collect(),
            send_rate: Rate { per_s: c.rooms.send_rate_per_s, burst: c.rooms.send_rate_burst },
            join_rate: Rate { per_s: c.rooms.join_rate_per_s, burst: c.rooms.join_rate_burst },
            inflate_rate: Rate { per_s: c.websocket.inflate_rate_per_s, burst: c.websocket.inflate_rate_burst },
            slow_consumer_ms: c.websocket.slow_consumer_ms,
            abortive_close: c.websocket.abortive_close,
            poll_limit_max: c.rooms.poll_limit_max,
            mesh_overflow_max: c.server.mesh_overflow_max,
            owner: owner_config(c, shard, shards),
            loads: desk::LoadLimits {
                in_flight_max: c.redis.loads_max,
                waiters_max: c.redis.load_waiters_max,
                timeout_ms: c.redis.load_timeout_ms,
                held_timeout_ms: c.cluster.lease_ms * 2 + c.redis.load_timeout_ms,
            },
            placement: None,
            hooks: None,
            demo: c.demo.enabled,
            demo_dev_tokens: c.demo.dev_tokens,
            tls: None,
            tls_key_updates: c.tls.key_updates,
            tls_kernel: false,
        }
    }

    /// A cluster node's: rooms other nodes own are reached through the link (one more mail
    /// destination), and owners count the members on other nodes in its slot.
    pub fn with_placement(mut self, placement: Arc<crate::cluster::placement::Placement>) -> HubConfig {
        self.placement = Some(placement);
        self.owner.shards = self.shards + 1;
        self.owner.cluster = true;
        self
    }

    /// Connections on the public listener speak TLS (`wss://`); `kernel`: their sends go
    /// through kernel TLS once established (the kernel was probed for it).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>, kernel: bool) -> HubConfig {
        self.tls = Some(config);
        self.tls_kernel = kernel;
        self
    }

    /// The shard asks the business hooks through `gate`.
    pub fn with_hooks(mut self, gate: Arc<crate::hooks::Gate>) -> HubConfig {
        self.hooks = Some(gate);
        self
    }
}

fn owner_config(c: &Config, shard: ShardId, shards: usize) -> OwnerConfig {
    let r = &c.rooms;
    OwnerConfig {
        shard,
        shards,
        limits: MixerLimits { block_messages_max: r.block_messages_max, pending_messages_max: r.pending_messages_max },
        // rooms_max is the node's: each owner shard keeps its share (rooms hash evenly).
        rooms_max: r.rooms_max.div_ceil(shards),
        room_idle_ms: i64::try_from(r.room_idle_ms).unwrap_or(i64::MAX),
        history_messages_max: r.history_messages_max,
        upstream: Rate { per_s: r.room_rate_per_s, burst: r.room_rate_burst },
        attrs: AttrLimits {
            keys_max: r.attr_keys_max,
            key_bytes_max: r.attr_key_bytes_max,
            value_bytes_max: r.attr_value_bytes_max,
            log_len_max: r.attr_log_len_max,
        },
        moderation: ModerationLimits { entries_max: r.moderation_entries_max },
        presence_events: r.presence_events,
        presence_users_max: r.presence_users_max,
        poll_limit_max: r.poll_limit_max,
        poll_interval_ms: [r.poll_interval_small_ms, r.poll_interval_medium_ms, r.poll_interval_large_ms],
        types: Arc::new(c.types.clone()),
        durable: !c.redis.url.is_empty(),
        cluster: false,
        deflate: c.websocket.deflate.then_some(crate::room::frames::Deflate {
            level: c.websocket.deflate_level,
            min_bytes: c.websocket.deflate_min_bytes,
        }),
    }
}

#[cfg(test)]
mod tests;
