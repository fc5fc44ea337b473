//! Configuration: embedded defaults < TOML file < `BARRAGE_*` env < long flags, validated once
//! at start. Every bound the gateway enforces is a knob here, with its default, its reason and
//! what it costs.
#![forbid(unsafe_code)]
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::room::Priority;

/// Declares the config sections, their TOML keys and defaults, and one `--flag` / env var per key
/// from a single table, so `barrage serve --help` always lists every knob.
macro_rules! config {
    ($(
        $(#[doc = $sdoc:literal])*
        $section:ident : $Section:ident {
            $( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, $flag:ident, $env:literal; )*
        }
    )*) => {
        /// The whole configuration, one struct per TOML section.
        #[derive(Debug, Clone, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $sdoc])* #[serde(default)] pub $section: $Section, )*
            /// Per message type: default priority and time to live (`[types.gift]`).
            #[serde(default = "default_types")]
            pub types: BTreeMap<String, TypeDefaults>,
            /// The types a client may `send`, and their priority (`[client_types] chat =
            /// "low"`); a token's `types` claim adds to it, never the system types.
            #[serde(default = "default_client_types")]
            pub client_types: BTreeMap<String, Priority>,
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $section: $Section::default(), )* types: default_types(), client_types: default_client_types() }
            }
        }

        $(
            $(#[doc = $sdoc])*
            #[derive(Debug, Clone, Deserialize, Serialize)]
            #[serde(default, deny_unknown_fields)]
            pub struct $Section { $( $(#[doc = $doc])* pub $field: $ty, )* }

            impl Default for $Section {
                fn default() -> Self { Self { $( $field: $default, )* } }
            }
        )*

        /// Command-line and environment overrides of single config keys.
        #[derive(clap::Args, Debug, Default, Clone)]
        pub struct Overrides {
            $($(
                $(#[doc = $doc])*
                #[arg(long, env = $env, help_heading = stringify!($section))]
                pub $flag: Option<$ty>,
            )*)*
        }

        impl Config {
            /// Applies flags and env vars over the file's values.
            pub fn apply(&mut self, o: &Overrides) {
                $($( if let Some(v) = &o.$flag { self.$section.$field = v.clone(); } )*)*
            }
        }
    };
}

config! {
    /// Shards, listeners and io_uring resources.
    server: Server {
        /// Public listener: WebSocket upgrades and short polling (with `tls.cert` and this left
        /// at its default: 0.0.0.0:8443).
        listen: SocketAddr = addr("0.0.0.0:8080"), listen, "BARRAGE_LISTEN";
        /// Shard threads, one per core; 0 = one per available core.
        shards: usize = 0, shards, "BARRAGE_SHARDS";
        /// Pin each shard to its own core.
        pin_cores: bool = true, pin_cores, "BARRAGE_PIN_CORES";
        /// listen(2) backlog of each shard's SO_REUSEPORT socket (the kernel clamps it to
        /// net.core.somaxconn). Large so connect storms queue instead of being refused.
        listen_backlog: u32 = 65535, listen_backlog, "BARRAGE_LISTEN_BACKLOG";
        /// Concurrent connections for the whole process, split evenly over shards; over it a new
        /// connection is closed at once and counted. Costs nothing until used: rings and slab
        /// entries grow on demand (about 100 B of user memory per connection).
        connections_max: usize = 1_000_000, connections_max, "BARRAGE_CONNECTIONS_MAX";
        /// Direct descriptors per io_uring ring; the kernel caps a ring's table at RLIMIT_NOFILE,
        /// so a shard opens more rings as connections grow. 0 = RLIMIT_NOFILE minus 1024.
        ring_files_max: u32 = 0, ring_files_max, "BARRAGE_RING_FILES_MAX";
        /// Submission queue entries per ring (completion queue is 4x): 128 B of ring memory per
        /// entry, so 128 KiB per ring, about 7 B per connection at a full table.
        ring_entries: u32 = 1024, ring_entries, "BARRAGE_RING_ENTRIES";
        /// Provided receive buffers per ring, shared by all its connections: an idle connection
        /// holds none, a buffer is held only while its bytes are parsed. Costs recv_buffers *
        /// recv_buffer_bytes per ring (256 KiB, about 14 B per connection at a full table).
        recv_buffers: u16 = 64, recv_buffers, "BARRAGE_RECV_BUFFERS";
        /// Size of one provided receive buffer (a power of two).
        recv_buffer_bytes: u32 = 4096, recv_buffer_bytes, "BARRAGE_RECV_BUFFER_BYTES";
        /// How a connection waits for input. `poll`: a multishot poll per connection (about
        /// 0.26 KB of kernel memory) and a receive only when bytes are there. `recv`: a
        /// multishot receive per connection (about 0.86 KB), one fewer operation per read.
        read_mode: ReadMode = ReadMode::Poll, read_mode, "BARRAGE_READ_MODE";
        /// Slots in each cross-shard queue (one per sender and receiver). About 64 B each.
        mesh_queue_len: usize = 65536, mesh_queue_len, "BARRAGE_MESH_QUEUE_LEN";
        /// Mails a shard keeps for one other shard whose inbox is full (in order; offered again
        /// every turn). At the bound, block deliveries to that shard are shed (lowest class
        /// first, counted as frames dropped for mesh_full; members fill the gap by short poll)
        /// and new requests that would mail it are refused with 503; kicks, replicas and
        /// answers are never dropped. Costs about 64 B per waiting mail, per destination.
        mesh_overflow_max: usize = 65536, mesh_overflow_max, "BARRAGE_MESH_OVERFLOW_MAX";
        /// Bytes one shard may hold for partial input (incomplete request heads and frames,
        /// fragmented messages) across all its connections. A connection whose partial data
        /// would exceed it is closed (1013, or 503 in the handshake) and counted: a slowloris
        /// flood costs at most this, not connections x message_bytes_max.
        partial_bytes_max: usize = 64 << 20, partial_bytes_max, "BARRAGE_PARTIAL_BYTES_MAX";
        /// Bytes one connection may hold for partial input (allocated, not only used: a
        /// message's reserved buffer, a request head's capacity); over it the connection is
        /// closed (1009). At least websocket.message_bytes_max + 4 KiB and twice
        /// websocket.handshake_bytes_max (a growing head may double its capacity); 0 = that.
        partial_bytes_conn_max: usize = 0, partial_bytes_conn_max, "BARRAGE_PARTIAL_BYTES_CONN_MAX";
        /// Frames per connection waiting to be sent. A reader that falls further behind loses
        /// its oldest non-whitelist frames first, and is closed (and counted) when only
        /// undroppable frames are left. Bounds a stalled reader's memory to this many frames.
        send_queue_frames_max: u32 = 16, send_queue_frames_max, "BARRAGE_SEND_QUEUE_FRAMES_MAX";
        /// At stop (SIGTERM), how long a shard waits for its connections to finish their close
        /// handshakes before it ends anyway. Whatever it then has on its rings is cancelled and
        /// awaited before its memory is freed.
        stop_grace_ms: u64 = 4_000, stop_grace_ms, "BARRAGE_STOP_GRACE_MS";
        /// New connections per second from one client address, per shard (each shard counts its
        /// own: the node allows up to shards × this); over it a connection is closed at once
        /// (`barrage_refused_total{reason="addr_rate"}`). Generous by default: a mobile carrier
        /// puts thousands of viewers behind one address. 0 = unlimited.
        addr_conn_rate_per_s: u32 = 500, addr_conn_rate_per_s, "BARRAGE_ADDR_CONN_RATE_PER_S";
        /// Burst allowed above addr_conn_rate_per_s.
        addr_conn_rate_burst: u32 = 5_000, addr_conn_rate_burst, "BARRAGE_ADDR_CONN_RATE_BURST";
        /// Requests (WebSocket upgrades, short polls) per second from one client address, per
        /// shard; over it the request gets 429. 0 = unlimited.
        addr_request_rate_per_s: u32 = 500, addr_request_rate_per_s, "BARRAGE_ADDR_REQUEST_RATE_PER_S";
        /// Burst allowed above addr_request_rate_per_s.
        addr_request_rate_burst: u32 = 5_000, addr_request_rate_burst, "BARRAGE_ADDR_REQUEST_RATE_BURST";
        /// Client addresses each shard tracks for those rates at once (about 64 B each; an
        /// address is kept until its buckets refill). A new address while it is full is refused
        /// (`reason="addr_table"`).
        addr_table_max: usize = 262_144, addr_table_max, "BARRAGE_ADDR_TABLE_MAX";
        /// The listener sits behind an L4 balancer that sends a PROXY protocol v2 header first
        /// (in the clear, before TLS with `tls.cert`): the client's address (for the rates
        /// above) comes from it, and a connection without a valid header is closed
        /// (`barrage_handshakes_total{result="proxy"}`).
        proxy_protocol: bool = false, proxy_protocol, "BARRAGE_PROXY_PROTOCOL";
    }

    /// WebSocket handshake and framing limits.
    websocket: WebSocket {
        /// Bytes of an HTTP upgrade request head; over it the request gets 431.
        handshake_bytes_max: usize = 4096, handshake_bytes_max, "BARRAGE_HANDSHAKE_BYTES_MAX";
        /// Headers in an upgrade request; over it the request gets 431.
        handshake_headers_max: usize = 32, handshake_headers_max, "BARRAGE_HANDSHAKE_HEADERS_MAX";
        /// A connection that has not completed its handshake by then is closed and counted.
        handshake_timeout_ms: u64 = 10_000, handshake_timeout_ms, "BARRAGE_HANDSHAKE_TIMEOUT_MS";
        /// Payload of one client frame; over it the connection is closed with 1009.
        frame_bytes_max: usize = 65536, frame_bytes_max, "BARRAGE_FRAME_BYTES_MAX";
        /// A reassembled (fragmented) client message; over it the connection is closed with 1009.
        /// A connection holds at most this much while a message is partial.
        message_bytes_max: usize = 65536, message_bytes_max, "BARRAGE_MESSAGE_BYTES_MAX";
        /// permessage-deflate (RFC 7692) for clients that offer it, always without context
        /// takeover: each block is compressed once per wire format by its room's owner and the
        /// same bytes go to every member that negotiated it (no compressor per connection);
        /// clients' compressed messages are inflated by the shard's one inflater, bounded by
        /// message_bytes_max (1009 past it). Costs CPU once per block, saves bytes per member.
        deflate: bool = false, deflate, "BARRAGE_DEFLATE";
        /// Blocks (and echoed messages) smaller than this go uncompressed: deflate's framing
        /// would eat the little it saves.
        deflate_min_bytes: usize = 128, deflate_min_bytes, "BARRAGE_DEFLATE_MIN_BYTES";
        /// zlib level of that compression, 1 (fastest) to 9 (smallest).
        deflate_level: u32 = 6, deflate_level, "BARRAGE_DEFLATE_LEVEL";
        /// Compressed messages a connection may send per second: each may inflate to
        /// message_bytes_max from a few bytes, so past this the connection is closed (1008)
        /// instead of costing the shard that much work per byte received. 0 = unlimited.
        inflate_rate_per_s: u32 = 20, inflate_rate_per_s, "BARRAGE_INFLATE_RATE_PER_S";
        /// Burst allowed above inflate_rate_per_s.
        inflate_rate_burst: u32 = 40, inflate_rate_burst, "BARRAGE_INFLATE_RATE_BURST";
        /// Heartbeat interval told to clients in welcome: send a ping at least this often.
        heartbeat_ms: u32 = 30_000, heartbeat_ms, "BARRAGE_HEARTBEAT_MS";
        /// A connection silent for this long is closed (1001) and counted.
        idle_timeout_ms: u64 = 90_000, idle_timeout_ms, "BARRAGE_IDLE_TIMEOUT_MS";
        /// After the server sends Close, how long it waits for the client's Close.
        close_timeout_ms: u64 = 3_000, close_timeout_ms, "BARRAGE_CLOSE_TIMEOUT_MS";
        /// Let clients connect without a token, as read-only viewers.
        allow_anonymous: bool = true, allow_anonymous, "BARRAGE_ALLOW_ANONYMOUS";
        /// TCP keepalive on accepted sockets, the backstop for peers that vanish without a FIN
        /// and never send a byte again: probes start after this many idle seconds (then 3
        /// probes 10 s apart). 0 = off.
        tcp_keepalive_s: u32 = 120, tcp_keepalive_s, "BARRAGE_TCP_KEEPALIVE_S";
        /// A connection whose send queue has been overflowing (dropping frames) this long is
        /// closed and counted; whitelisted users are never closed for it.
        slow_consumer_ms: u64 = 10_000, slow_consumer_ms, "BARRAGE_SLOW_CONSUMER_MS";
        /// Browser origins (`https://example.com`, comma-separated) allowed to open WebSockets
        /// and short-poll; a request with another `Origin` is refused (403). "" = any origin.
        /// Requests without `Origin` (not from a browser) are not affected.
        origins: String = String::new(), origins, "BARRAGE_ORIGINS";
        /// SO_SNDBUF of accepted sockets (set on the listener, which they inherit; the kernel
        /// doubles it for its bookkeeping and caps it at net.core.wmem_max). It bounds the
        /// kernel memory a reader that stops reading pins: about twice this (64 KiB) instead of
        /// a send buffer autotuned up to tcp_wmem's max (3.8 MiB per stalled reader measured
        /// on loopback, bench/stalled.sh). Blocks are small (20 messages, a few KB) and a viewer
        /// needs a few KB/s, so 32 KiB in the kernel holds about one full send queue of
        /// blocks; past it frames wait in barrage's own queue (send_queue_frames_max), where
        /// they are shed by priority, which the kernel cannot do. A frame larger than the
        /// buffer just leaves in several sends. 0 = kernel autotuning.
        send_buffer_bytes: u32 = 32 * 1024, send_buffer_bytes, "BARRAGE_SEND_BUFFER_BYTES";
        /// Close hopeless peers abortively: a slow consumer, a connection whose send failed,
        /// and one that did not finish the closing handshake within close_timeout_ms are closed
        /// with SO_LINGER 0 (an RST), so the kernel frees their unsent bytes at once instead of
        /// keeping them in an orphaned socket for as long as the peer acknowledges probes.
        /// Every other close stays orderly (Close frame, then FIN). false = FIN for all.
        abortive_close: bool = true, abortive_close, "BARRAGE_ABORTIVE_CLOSE";
        /// Path of a raw echo endpoint for conformance testing (Autobahn); "" = off.
        echo_path: String = String::new(), echo_path, "BARRAGE_ECHO_PATH";
    }

    /// Client authentication.
    auth: Auth {
        /// HS256 secret for client tokens (JWT, `sub` = user id). "" = tokens are not accepted
        /// and every client is an anonymous viewer (if allowed).
        jwt_secret: String = String::new(), jwt_secret, "BARRAGE_JWT_SECRET";
        /// Clock skew tolerated on `exp` and `nbf`.
        jwt_leeway_s: u64 = 30, jwt_leeway_s, "BARRAGE_JWT_LEEWAY_S";
        /// Refuse tokens without `exp` (such a token never expires: a leaked one is good for
        /// ever). false = accept them.
        require_exp: bool = true, jwt_require_exp, "BARRAGE_JWT_REQUIRE_EXP";
        /// When set, a token's `aud` must name it (a string or one of an array).
        audience: String = String::new(), jwt_audience, "BARRAGE_JWT_AUDIENCE";
        /// When set, a token's `iss` must equal it.
        issuer: String = String::new(), jwt_issuer, "BARRAGE_JWT_ISSUER";
        /// When a connection's token expires it is told so (error 401) and closed (1008) this
        /// long after unless it sends `refresh` with a new token for the same user. Costs 16 B
        /// per signed-in connection whose token has an `exp`.
        refresh_grace_ms: u64 = 30_000, refresh_grace_ms, "BARRAGE_REFRESH_GRACE_MS";
    }

    /// Rooms and their merged blocks.
    rooms: Rooms {
        /// How often a room with pending messages sends a block.
        block_interval_ms: u64 = 1000, block_interval_ms, "BARRAGE_BLOCK_INTERVAL_MS";
        /// Longest a block waits past its tick while the shard is still writing the previous
        /// fan-out (more than an eighth of its connections waiting for a send): under load blocks
        /// grow instead of send queues. 0 = never wait.
        block_wait_max_ms: u64 = 1000, block_wait_max_ms, "BARRAGE_BLOCK_WAIT_MAX_MS";
        /// Messages in one block: a client renders about 15-20 a second.
        block_messages_max: usize = 20, block_messages_max, "BARRAGE_BLOCK_MESSAGES_MAX";
        /// Pending messages of one room waiting for the next block; over it a publish is refused
        /// (429 / error frame). Costs up to this many messages of data per busy room.
        pending_messages_max: usize = 1000, pending_messages_max, "BARRAGE_PENDING_MESSAGES_MAX";
        /// Rooms with state of their own (messages, attributes, moderation entries) the node
        /// keeps, split evenly over the owner shards; a publish, attribute or moderation entry
        /// for one more is refused (503 / counted). Rooms that only have members do not count:
        /// each exists only while it has a member, so they are bounded by the connections.
        rooms_max: usize = 100_000, rooms_max, "BARRAGE_ROOMS_MAX";
        /// A room with no members, nothing pending and no attributes or moderation entries is
        /// forgotten this long after its last activity (its history goes with it; seqs keep
        /// increasing and a poll cursor from before reads `truncated`). Rooms that only ever
        /// had members go a second after their last one.
        room_idle_ms: u64 = 60_000, room_idle_ms, "BARRAGE_ROOM_IDLE_MS";
        /// Bytes of a room name.
        name_bytes_max: usize = 64, name_bytes_max, "BARRAGE_NAME_BYTES_MAX";
        /// Bytes of one message's data.
        data_bytes_max: usize = 4096, data_bytes_max, "BARRAGE_DATA_BYTES_MAX";
        /// Messages a room keeps for backfill on join and for short polling. Costs up to this
        /// many messages of data per room (50 x ~200 B with 100-byte payloads: ~10 KB).
        history_messages_max: usize = 50, history_messages_max, "BARRAGE_HISTORY_MESSAGES_MAX";
        /// Upstream messages per second into one room (client sends and API publishes below
        /// whitelist priority); over it they are refused (429). 0 = unlimited.
        room_rate_per_s: u32 = 200, room_rate_per_s, "BARRAGE_ROOM_RATE_PER_S";
        /// Burst allowed above room_rate_per_s.
        room_rate_burst: u32 = 400, room_rate_burst, "BARRAGE_ROOM_RATE_BURST";
        /// Sends per second from one connection; over it the client gets an error frame (429).
        /// 0 = unlimited. State is kept only for connections that sent recently (8 B each).
        send_rate_per_s: u32 = 2, send_rate_per_s, "BARRAGE_SEND_RATE_PER_S";
        /// Burst allowed above send_rate_per_s.
        send_rate_burst: u32 = 5, send_rate_burst, "BARRAGE_SEND_RATE_BURST";
        /// `join` frames per second from one connection (the room in the URL is free); over it
        /// the client gets an error frame (429). 0 = unlimited. State is kept only for
        /// connections that joined in the last seconds (8 B each).
        join_rate_per_s: u32 = 2, join_rate_per_s, "BARRAGE_JOIN_RATE_PER_S";
        /// Burst allowed above join_rate_per_s.
        join_rate_burst: u32 = 10, join_rate_burst, "BARRAGE_JOIN_RATE_BURST";
        /// Post `enter` and `leave` messages in rooms: at most one of each per room per block,
        /// counting the users (so 5,000 joins a second make one message a second, not 5,000).
        presence_events: bool = true, presence_events, "BARRAGE_PRESENCE_EVENTS";
        /// User ids named in one enter/leave message (the rest are only counted).
        presence_users_max: usize = 10, presence_users_max, "BARRAGE_PRESENCE_USERS_MAX";
        /// Messages one short poll may return.
        poll_limit_max: usize = 100, poll_limit_max, "BARRAGE_POLL_LIMIT_MAX";
        /// Poll interval hinted to short-polling clients in rooms under 100 members.
        poll_interval_small_ms: u32 = 1500, poll_interval_small_ms, "BARRAGE_POLL_INTERVAL_SMALL_MS";
        /// ... in rooms of 100 to 1,000 members.
        poll_interval_medium_ms: u32 = 2000, poll_interval_medium_ms, "BARRAGE_POLL_INTERVAL_MEDIUM_MS";
        /// ... in rooms over 1,000 members.
        poll_interval_large_ms: u32 = 2500, poll_interval_large_ms, "BARRAGE_POLL_INTERVAL_LARGE_MS";
        /// Attribute keys in one room.
        attr_keys_max: usize = 64, attr_keys_max, "BARRAGE_ATTR_KEYS_MAX";
        /// Bytes of one attribute key.
        attr_key_bytes_max: usize = 64, attr_key_bytes_max, "BARRAGE_ATTR_KEY_BYTES_MAX";
        /// Bytes of one attribute value.
        attr_value_bytes_max: usize = 1024, attr_value_bytes_max, "BARRAGE_ATTR_VALUE_BYTES_MAX";
        /// Attribute changes kept per room for incremental sync; a client further behind gets a
        /// snapshot. Worst case per room: keys_max x (key + value) + log x (key + value).
        attr_log_len_max: usize = 128, attr_log_len_max, "BARRAGE_ATTR_LOG_LEN_MAX";
        /// Entries in each moderation list (mutes, bans, whitelist) of one room (~250 B each).
        moderation_entries_max: usize = 1000, moderation_entries_max, "BARRAGE_MODERATION_ENTRIES_MAX";
    }

    /// Draining: moving every client off this node in waves (`POST /v1/admin/drain`, SIGTERM).
    drain: Drain {
        /// SIGTERM drains (the second SIGTERM, or the deadline, stops at once); false = SIGTERM
        /// closes every connection (1001) and exits.
        on_sigterm: bool = true, drain_on_sigterm, "BARRAGE_DRAIN_ON_SIGTERM";
        /// Reconnect frames per second, node-wide (split over the shards): how fast clients
        /// are sent elsewhere. 2,000/s moves a million viewers in about 8 minutes without a
        /// reconnect storm on the next node. 0 = all at once.
        reconnect_rate_per_s: u32 = 2_000, drain_reconnect_rate_per_s, "BARRAGE_DRAIN_RECONNECT_RATE_PER_S";
        /// How long after the start every connection still open is closed.
        deadline_ms: u64 = 600_000, drain_deadline_ms, "BARRAGE_DRAIN_DEADLINE_MS";
        /// The least delay a client is told to wait before reconnecting.
        delay_ms: u32 = 500, drain_delay_ms, "BARRAGE_DRAIN_DELAY_MS";
        /// Extra delay spread over clients (0..=this, by connection) so that reconnects sent
        /// together do not arrive together.
        jitter_ms: u32 = 2_000, drain_jitter_ms, "BARRAGE_DRAIN_JITTER_MS";
        /// Where clients reconnect (a ws:// or wss:// URL); "" = the same address (another
        /// node behind the same balancer, or the process that takes over).
        url: String = String::new(), drain_url, "BARRAGE_DRAIN_URL";
    }

    /// Zero-downtime upgrade on one box: a new process (`barrage serve --takeover`) takes the
    /// listening sockets and the rooms' state from this one over a Unix control socket, then
    /// this one drains its clients into it.
    upgrade: Upgrade {
        /// Path of the control socket ("" = no upgrades). Both processes use the same path;
        /// keep it in a directory only the gateway's user can write.
        control_socket: String = String::new(), upgrade_control_socket, "BARRAGE_UPGRADE_CONTROL_SOCKET";
        /// How long the old process waits for the new one to be serving before it takes its
        /// rooms back and carries on (publishes get 503 while it waits).
        timeout_ms: u64 = 30_000, upgrade_timeout_ms, "BARRAGE_UPGRADE_TIMEOUT_MS";
        /// Bytes of the rooms' state a new process accepts from the old one (history is most
        /// of it: about 200 B per message kept).
        snapshot_bytes_max: u64 = 1 << 30, upgrade_snapshot_bytes_max, "BARRAGE_UPGRADE_SNAPSHOT_BYTES_MAX";
    }

    /// Durable room state in Redis: history, seqs, attributes and moderation outlive the
    /// process, and replay by server time. Off without a URL: everything stays in memory.
    redis: Redis {
        /// `redis://[user:password@]host:port[/db]`; "" = no Redis (the embedded default).
        url: String = String::new(), redis, "BARRAGE_REDIS";
        /// Prefix of every key barrage writes (several gateways' state can share one Redis).
        prefix: String = "barrage:".into(), redis_prefix, "BARRAGE_REDIS_PREFIX";
        /// How long messages are kept for replay by server time (per room, also capped by
        /// replay_messages_max). About 200 B of Redis memory per message kept.
        replay_retention_s: u64 = 86_400, redis_replay_retention_s, "BARRAGE_REDIS_REPLAY_RETENTION_S";
        /// Messages kept for replay per room at most, whatever their age.
        replay_messages_max: usize = 100_000, redis_replay_messages_max, "BARRAGE_REDIS_REPLAY_MESSAGES_MAX";
        /// A room's keys (history, seqs, attributes) expire this long after its last write;
        /// moderation entries keep their own expiry (or none).
        room_ttl_s: u64 = 604_800, redis_room_ttl_s, "BARRAGE_REDIS_ROOM_TTL_S";
        /// Writes held while Redis is slow or away, node-wide; past it the oldest are dropped
        /// (counted). Each is a block's messages or one attribute or list change.
        write_buffer_max: usize = 100_000, redis_write_buffer_max, "BARRAGE_REDIS_WRITE_BUFFER_MAX";
        /// Rooms being loaded from Redis at once per shard (a room not in memory is loaded on
        /// first use); past it a room starts from memory alone (counted).
        loads_max: usize = 4_096, redis_loads_max, "BARRAGE_REDIS_LOADS_MAX";
        /// Requests for one room waiting for its load; past it they are refused with 503.
        load_waiters_max: usize = 1_024, redis_load_waiters_max, "BARRAGE_REDIS_LOAD_WAITERS_MAX";
        /// A load not answered by then gives up: the room starts from memory alone (counted).
        load_timeout_ms: u64 = 1_000, redis_load_timeout_ms, "BARRAGE_REDIS_LOAD_TIMEOUT_MS";
        /// Connect and per-command timeout.
        timeout_ms: u64 = 2_000, redis_timeout_ms, "BARRAGE_REDIS_TIMEOUT_MS";
        /// Longest wait between reconnection attempts (doubling from 50 ms).
        reconnect_max_ms: u64 = 5_000, redis_reconnect_max_ms, "BARRAGE_REDIS_RECONNECT_MAX_MS";
    }

    /// Several nodes over the Redis of `redis.url`: each announces itself and knows its live
    /// peers (`GET /v1/cluster`); a drain sends clients to the other live nodes.
    cluster: Cluster {
        /// Join the cluster (needs redis.url).
        enabled: bool = false, cluster, "BARRAGE_CLUSTER";
        /// This node's name, unique in the cluster; "" = its public URL.
        node_id: String = String::new(), cluster_node_id, "BARRAGE_CLUSTER_NODE_ID";
        /// Where clients reach this node (ws:// or wss://), told to clients drained from its
        /// peers; "" = ws://ADDRESS/ws, ADDRESS the one the public listener is bound to.
        public_url: String = String::new(), cluster_public_url, "BARRAGE_CLUSTER_PUBLIC_URL";
        /// How often the node announces itself and reads the live set (one Redis script run).
        heartbeat_ms: u64 = 1_000, cluster_heartbeat_ms, "BARRAGE_CLUSTER_HEARTBEAT_MS";
        /// A node not heard from for this long is gone: the bound on how long a dead node is
        /// still listed (at least twice heartbeat_ms).
        node_ttl_ms: u64 = 5_000, cluster_node_ttl_ms, "BARRAGE_CLUSTER_NODE_TTL_MS";
        /// A room's owner holds a lease in Redis for this long and renews it every third of
        /// it; a dead owner's rooms move once both its heartbeat (node_ttl_ms) and its leases
        /// have run out. Shorter moves rooms sooner and costs more renewals.
        lease_ms: u64 = 3_000, cluster_lease_ms, "BARRAGE_CLUSTER_LEASE_MS";
        /// Messages waiting to be relayed to Redis (forwarded requests, their answers, blocks
        /// for other nodes); past it the oldest block is dropped (counted: the members there
        /// see a seq gap and poll) and new requests are refused with 503.
        relay_queue_max: usize = 65_536, cluster_relay_queue_max, "BARRAGE_CLUSTER_RELAY_QUEUE_MAX";
        /// Requests forwarded to other nodes still waiting for an answer (API calls and client
        /// requests); past it new ones are refused with 503.
        asks_max: usize = 65_536, cluster_asks_max, "BARRAGE_CLUSTER_ASKS_MAX";
        /// How long a forwarded request waits for the owner's answer before it is given up.
        ask_timeout_ms: u64 = 2_000, cluster_ask_timeout_ms, "BARRAGE_CLUSTER_ASK_TIMEOUT_MS";
    }

    /// The private business API.
    api: Api {
        /// Business API listener (keep it private).
        listen: SocketAddr = addr("127.0.0.1:9090"), api_listen, "BARRAGE_API_LISTEN";
        /// API key (Authorization: Bearer or X-Api-Key). "" = only loopback peers are served.
        key: String = String::new(), api_key, "BARRAGE_API_KEY";
        /// Concurrent API connections (one thread each); over it a connection gets 503.
        connections_max: usize = 256, api_connections_max, "BARRAGE_API_CONNECTIONS_MAX";
        /// Bytes of one API request body (a batch publish too: raise both for bigger batches).
        body_bytes_max: usize = 1 << 20, api_body_bytes_max, "BARRAGE_API_BODY_BYTES_MAX";
        /// Items in one batch publish (`POST /v1/publish`); past it the batch is refused (413).
        batch_items_max: usize = 10_000, api_batch_items_max, "BARRAGE_API_BATCH_ITEMS_MAX";
        /// An idle keep-alive API connection is closed after this long.
        idle_timeout_ms: u64 = 60_000, api_idle_timeout_ms, "BARRAGE_API_IDLE_TIMEOUT_MS";
    }

    /// TLS on the public listener (`wss://`, and HTTPS short polls): with a certificate and key
    /// set, the listener speaks only TLS 1.3 and 1.2 (rustls; ALPN http/1.1; no session
    /// tickets). An idle TLS connection keeps only its record keys (about 120 B, and rustls's
    /// key schedule with `key_updates`); a send seals its frames into one buffer, freed when
    /// written. `kill -HUP` reloads the files for new handshakes.
    tls: Tls {
        /// PEM certificate chain (leaf first); "" = no TLS. Several, comma-separated: the
        /// client's SNI picks the first whose names cover it, else the first is served.
        cert: String = String::new(), tls_cert, "BARRAGE_TLS_CERT";
        /// PEM private key of each certificate, in the same order (PKCS#8, PKCS#1 or SEC1).
        key: String = String::new(), tls_key, "BARRAGE_TLS_KEY";
        /// Follow a TLS 1.3 client's KeyUpdate: keeps rustls's key schedule per connection
        /// (about 800 B more for an idle one). false = such a client is closed (counted as
        /// `barrage_tls_errors_total{reason="key_update"}`; it reconnects): browsers and common
        /// TLS libraries do not send one to a WebSocket's volume of data.
        key_updates: bool = false, tls_key_updates, "BARRAGE_TLS_KEY_UPDATES";
        /// Kernel TLS for sending: after each handshake the send keys go to the kernel
        /// (`TCP_ULP` "tls", `TLS_TX`) and frames leave as on a plain connection (no per-member
        /// copy or seal in user space; receiving stays in user space). `auto`: when the kernel
        /// has the `tls` ULP (probed at start; the start-up line says which); `on`: tried for
        /// every connection without probing; `off`. A connection the kernel refuses is sealed
        /// in user space (`barrage_tls_kernel_total{result="fallback"}`).
        kernel: KernelTls = KernelTls::Auto, tls_kernel, "BARRAGE_TLS_KERNEL";
    }

    /// The live-room demo page on the public listener (`GET /demo/`, built from sdk/js/demo).
    demo: Demo {
        /// Serve the demo page and its script (about 120 KB, embedded in the binary).
        enabled: bool = true, demo, "BARRAGE_DEMO";
        /// `GET /demo/token?user=U` hands anyone a signed token (send rights and the `gift` type
        /// for an hour) so the demo's send box works. For development only: never turn it on
        /// where strangers reach the listener. Needs auth.jwt_secret.
        dev_tokens: bool = false, demo_dev_tokens, "BARRAGE_DEMO_DEV_TOKENS";
    }

    /// Business hook: every WebSocket handshake asks the backend first (authenticate, enrich with
    /// level and grants, or refuse). See README "Business hooks".
    hook_connect: HookConnect {
        /// The backend's URL (`http://host:port/path`); "" = no connect hook.
        url: String = String::new(), hook_connect_url, "BARRAGE_HOOK_CONNECT_URL";
        /// Request and response bodies: `json` (proto3 JSON) or `protobuf`.
        format: HookFormat = HookFormat::Json, hook_connect_format, "BARRAGE_HOOK_CONNECT_FORMAT";
        /// A request not answered by then has failed (connect, write and read together).
        timeout_ms: u64 = 1000, hook_connect_timeout_ms, "BARRAGE_HOOK_CONNECT_TIMEOUT_MS";
        /// Requests in flight at once (one keep-alive connection and thread each).
        in_flight_max: usize = 8, hook_connect_in_flight_max, "BARRAGE_HOOK_CONNECT_IN_FLIGHT_MAX";
        /// Calls waiting for a request (about 200 B each); past it a call fails at once
        /// (fail_open decides).
        queue_max: usize = 10000, hook_connect_queue_max, "BARRAGE_HOOK_CONNECT_QUEUE_MAX";
        /// Calls in one request at most.
        batch_max: usize = 64, hook_connect_batch_max, "BARRAGE_HOOK_CONNECT_BATCH_MAX";
        /// How long a request waits for more calls to batch once it has one (0: it takes
        /// what is waiting and goes: batches grow only under load).
        batch_ms: u64 = 0, hook_connect_batch_ms, "BARRAGE_HOOK_CONNECT_BATCH_MS";
        /// When the backend fails (timeout, error, breaker open, queue full): true = go on as
        /// if it had allowed (the token alone decides; no rights are granted); false = 503.
        fail_open: bool = true, hook_connect_fail_open, "BARRAGE_HOOK_CONNECT_FAIL_OPEN";
        /// Attempts after a failed one (connection error or 5xx) within timeout_ms: the
        /// call only asks, so asking again is safe.
        retries: u32 = 1, hook_connect_retries, "BARRAGE_HOOK_CONNECT_RETRIES";
        /// Consecutive failed requests that open the circuit breaker: while open no request
        /// is made and calls fail at once; 0 = no breaker.
        breaker_failures: u32 = 5, hook_connect_breaker_failures, "BARRAGE_HOOK_CONNECT_BREAKER_FAILURES";
        /// How long the breaker stays open before one request tries the backend again.
        breaker_open_ms: u64 = 5_000, hook_connect_breaker_open_ms, "BARRAGE_HOOK_CONNECT_BREAKER_OPEN_MS";
    }

    /// Business hook: every join asks the backend (allow or refuse per room).
    hook_join: HookJoin {
        /// The backend's URL (`http://host:port/path`); "" = no join hook.
        url: String = String::new(), hook_join_url, "BARRAGE_HOOK_JOIN_URL";
        /// Request and response bodies: `json` (proto3 JSON) or `protobuf`.
        format: HookFormat = HookFormat::Json, hook_join_format, "BARRAGE_HOOK_JOIN_FORMAT";
        /// A request not answered by then has failed (connect, write and read together).
        timeout_ms: u64 = 1000, hook_join_timeout_ms, "BARRAGE_HOOK_JOIN_TIMEOUT_MS";
        /// Requests in flight at once (one keep-alive connection and thread each).
        in_flight_max: usize = 8, hook_join_in_flight_max, "BARRAGE_HOOK_JOIN_IN_FLIGHT_MAX";
        /// Calls waiting for a request (about 200 B each); past it a call fails at once
        /// (fail_open decides).
        queue_max: usize = 10000, hook_join_queue_max, "BARRAGE_HOOK_JOIN_QUEUE_MAX";
        /// Calls in one request at most.
        batch_max: usize = 64, hook_join_batch_max, "BARRAGE_HOOK_JOIN_BATCH_MAX";
        /// How long a request waits for more calls to batch once it has one (0: it takes
        /// what is waiting and goes: batches grow only under load).
        batch_ms: u64 = 0, hook_join_batch_ms, "BARRAGE_HOOK_JOIN_BATCH_MS";
        /// When the backend fails (timeout, error, breaker open, queue full): true = allow as
        /// if it had said yes; false = refuse (503), so paid or private rooms stay closed.
        fail_open: bool = false, hook_join_fail_open, "BARRAGE_HOOK_JOIN_FAIL_OPEN";
        /// Attempts after a failed one (connection error or 5xx) within timeout_ms: the
        /// call only asks, so asking again is safe.
        retries: u32 = 1, hook_join_retries, "BARRAGE_HOOK_JOIN_RETRIES";
        /// Consecutive failed requests that open the circuit breaker: while open no request
        /// is made and calls fail at once; 0 = no breaker.
        breaker_failures: u32 = 5, hook_join_breaker_failures, "BARRAGE_HOOK_JOIN_BREAKER_FAILURES";
        /// How long the breaker stays open before one request tries the backend again.
        breaker_open_ms: u64 = 5_000, hook_join_breaker_open_ms, "BARRAGE_HOOK_JOIN_BREAKER_OPEN_MS";
    }

    /// Business hook: every client `send` waits for the backend's verdict (allow, refuse or
    /// rewrite) before it goes to the room's owner. Never retried: a send may cost coins.
    hook_send: HookSend {
        /// The backend's URL (`http://host:port/path`); "" = no send hook.
        url: String = String::new(), hook_send_url, "BARRAGE_HOOK_SEND_URL";
        /// Request and response bodies: `json` (proto3 JSON) or `protobuf`.
        format: HookFormat = HookFormat::Json, hook_send_format, "BARRAGE_HOOK_SEND_FORMAT";
        /// A request not answered by then has failed (connect, write and read together).
        timeout_ms: u64 = 1000, hook_send_timeout_ms, "BARRAGE_HOOK_SEND_TIMEOUT_MS";
        /// Requests in flight at once (one keep-alive connection and thread each).
        in_flight_max: usize = 8, hook_send_in_flight_max, "BARRAGE_HOOK_SEND_IN_FLIGHT_MAX";
        /// Calls waiting for a request (about 200 B each); past it a call fails at once
        /// (fail_open decides).
        queue_max: usize = 10000, hook_send_queue_max, "BARRAGE_HOOK_SEND_QUEUE_MAX";
        /// Calls in one request at most.
        batch_max: usize = 64, hook_send_batch_max, "BARRAGE_HOOK_SEND_BATCH_MAX";
        /// How long a request waits for more calls to batch once it has one (0: it takes
        /// what is waiting and goes: batches grow only under load).
        batch_ms: u64 = 0, hook_send_batch_ms, "BARRAGE_HOOK_SEND_BATCH_MS";
        /// When the backend fails (timeout, error, breaker open, queue full): true = allow as
        /// if it had said yes; false = refuse (503), so unfiltered chat stays out.
        fail_open: bool = false, hook_send_fail_open, "BARRAGE_HOOK_SEND_FAIL_OPEN";
        /// Consecutive failed requests that open the circuit breaker: while open no request
        /// is made and calls fail at once; 0 = no breaker.
        breaker_failures: u32 = 5, hook_send_breaker_failures, "BARRAGE_HOOK_SEND_BREAKER_FAILURES";
        /// How long the breaker stays open before one request tries the backend again.
        breaker_open_ms: u64 = 5_000, hook_send_breaker_open_ms, "BARRAGE_HOOK_SEND_BREAKER_OPEN_MS";
    }

    /// Business hook: disconnects and leaves, fire-and-forget and batched; never retried.
    hook_events: HookEvents {
        /// The backend's URL (`http://host:port/path`); "" = no events hook.
        url: String = String::new(), hook_events_url, "BARRAGE_HOOK_EVENTS_URL";
        /// Request and response bodies: `json` (proto3 JSON) or `protobuf`.
        format: HookFormat = HookFormat::Json, hook_events_format, "BARRAGE_HOOK_EVENTS_FORMAT";
        /// A request not answered by then has failed (connect, write and read together).
        timeout_ms: u64 = 2000, hook_events_timeout_ms, "BARRAGE_HOOK_EVENTS_TIMEOUT_MS";
        /// Requests in flight at once (one keep-alive connection and thread each).
        in_flight_max: usize = 2, hook_events_in_flight_max, "BARRAGE_HOOK_EVENTS_IN_FLIGHT_MAX";
        /// Calls waiting for a request (about 200 B each); past it a call is dropped (counted).
        queue_max: usize = 100000, hook_events_queue_max, "BARRAGE_HOOK_EVENTS_QUEUE_MAX";
        /// Calls in one request at most.
        batch_max: usize = 500, hook_events_batch_max, "BARRAGE_HOOK_EVENTS_BATCH_MAX";
        /// How long a request waits for more calls to batch once it has one (0: it takes
        /// what is waiting and goes: batches grow only under load).
        batch_ms: u64 = 200, hook_events_batch_ms, "BARRAGE_HOOK_EVENTS_BATCH_MS";
        /// Consecutive failed requests that open the circuit breaker: while open no request
        /// is made and calls fail at once; 0 = no breaker.
        breaker_failures: u32 = 5, hook_events_breaker_failures, "BARRAGE_HOOK_EVENTS_BREAKER_FAILURES";
        /// How long the breaker stays open before one request tries the backend again.
        breaker_open_ms: u64 = 5_000, hook_events_breaker_open_ms, "BARRAGE_HOOK_EVENTS_BREAKER_OPEN_MS";
    }
}

/// Defaults for one message type, applied where a message does not say (an unknown type: low,
/// never expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TypeDefaults {
    /// Priority bucket when the publisher gives none (client sends always take this).
    #[serde(default)]
    pub priority: Priority,
    /// Dropped (counted as expired) if not in a block within this many ms; 0 = never.
    #[serde(default)]
    pub ttl_ms: u32,
}

/// Types only the gateway posts (presence): never from a client or a token's grant. A type
/// whose default priority is whitelist (`notice`) is a system type too (see `Config::is_system_type`).
pub const SYSTEM_TYPES: [&str; 2] = ["enter", "leave"];

/// Clients send chat lines and likes, at low priority; anything else comes from the business
/// (the API) or a token's `types` grant.
fn default_client_types() -> BTreeMap<String, Priority> {
    [("chat", Priority::Low), ("like", Priority::Low)].into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The built-in types: chat and likes are cheap and go stale fast, gifts matter longer and
/// beat chat, PK scores are corrections, notices are never dropped.
fn default_types() -> BTreeMap<String, TypeDefaults> {
    let t = |priority, ttl_ms| TypeDefaults { priority, ttl_ms };
    [
        ("chat", t(Priority::Low, 10_000)),
        ("like", t(Priority::Low, 3_000)),
        ("enter", t(Priority::Low, 5_000)),
        ("leave", t(Priority::Low, 5_000)),
        ("gift", t(Priority::High, 30_000)),
        ("pk", t(Priority::High, 10_000)),
        ("notice", t(Priority::Whitelist, 0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// How hook bodies are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HookFormat {
    Json,
    Protobuf,
}

/// How a connection waits for input (see `server.read_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    Poll,
    Recv,
}

/// Whether TLS sends go through kernel TLS (see `tls.kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KernelTls {
    Auto,
    On,
    Off,
}

fn addr(s: &str) -> SocketAddr {
    // The literals above are valid addresses; a typo fails every test at once.
    s.parse().unwrap_or_else(|_| panic!("bad default address {s}"))
}

/// What a TLS connection may hold of one incomplete record (see `hub::host::tls`), capacity
/// included: the partial-input floor grows by it when TLS is on.
pub const TLS_RECORD_HELD: usize = 40 * 1024;

/// A config that cannot work, said plainly.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Tls {
    /// The certificate chains' files (`tls.cert`, comma-separated).
    pub fn certs(&self) -> Vec<&str> {
        list(&self.cert)
    }

    /// Their keys' files, in the same order.
    pub fn keys(&self) -> Vec<&str> {
        list(&self.key)
    }
}

fn list(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|f| !f.is_empty()).collect()
}

impl Cluster {
    /// The URL peers send this node's drained clients to: `public_url`, else the address the
    /// public listener is bound to.
    pub fn public_url(&self, listening: SocketAddr) -> String {
        if self.public_url.is_empty() { format!("ws://{listening}/ws") } else { self.public_url.clone() }
    }
}

impl Config {
    /// Reads a TOML file (unknown keys are errors, so typos do not pass silently).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError(format!("config: {e}")))?;
        // A file's [types.X] tables add to or override the built-in types, never erase them.
        for (name, defaults) in default_types() {
            c.types.entry(name).or_insert(defaults);
        }
        Ok(c)
    }

    /// Checks every bound and the relations between them, once, with a clear error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let w = &self.websocket;
        let r = &self.rooms;
        let checks: [(bool, &str); 33] = [
            (s.connections_max >= 1, "server.connections_max must be at least 1"),
            (s.shards <= 256, "server.shards must be at most 256"),
            (
                s.ring_entries.is_power_of_two() && (64..=32768).contains(&s.ring_entries),
                "server.ring_entries must be a power of two in 64..=32768",
            ),
            (
                s.recv_buffers.is_power_of_two() && s.recv_buffers >= 8,
                "server.recv_buffers must be a power of two, at least 8",
            ),
            (
                s.recv_buffer_bytes.is_power_of_two() && (256..=1 << 20).contains(&s.recv_buffer_bytes),
                "server.recv_buffer_bytes must be a power of two in 256..=1048576",
            ),
            (s.mesh_queue_len >= 64, "server.mesh_queue_len must be at least 64"),
            (s.mesh_overflow_max >= 1, "server.mesh_overflow_max must be at least 1"),
            ((2..=1024).contains(&s.send_queue_frames_max), "server.send_queue_frames_max must be in 2..=1024"),
            (w.handshake_bytes_max >= 256, "websocket.handshake_bytes_max must be at least 256"),
            (w.handshake_headers_max >= 8, "websocket.handshake_headers_max must be at least 8"),
            (w.frame_bytes_max >= 125, "websocket.frame_bytes_max must be at least 125"),
            (
                w.message_bytes_max >= w.frame_bytes_max,
                "websocket.message_bytes_max must be at least websocket.frame_bytes_max",
            ),
            (
                w.idle_timeout_ms > u64::from(w.heartbeat_ms),
                "websocket.idle_timeout_ms must exceed websocket.heartbeat_ms",
            ),
            (r.block_interval_ms >= 1 && r.block_interval_ms <= 60_000, "rooms.block_interval_ms must be in 1..=60000"),
            ((1..=1000).contains(&r.block_messages_max), "rooms.block_messages_max must be in 1..=1000"),
            (
                r.pending_messages_max >= r.block_messages_max,
                "rooms.pending_messages_max must be at least rooms.block_messages_max",
            ),
            ((1..=255).contains(&r.name_bytes_max), "rooms.name_bytes_max must be in 1..=255"),
            (self.upgrade.timeout_ms >= 100, "upgrade.timeout_ms must be at least 100"),
            (
                self.redis.url.is_empty() || self.redis.url.starts_with("redis://"),
                "redis.url must be empty or a redis:// URL",
            ),
            (
                self.redis.write_buffer_max >= 1 && self.redis.loads_max >= 1,
                "redis.write_buffer_max and redis.loads_max must be at least 1",
            ),
            (self.redis.timeout_ms >= 1, "redis.timeout_ms must be at least 1"),
            // An API request waiting for a room's load waits at most 5 s for its answer.
            ((1..=4_000).contains(&self.redis.load_timeout_ms), "redis.load_timeout_ms must be in 1..=4000"),
            (!self.cluster.enabled || !self.redis.url.is_empty(), "cluster.enabled needs redis.url"),
            (self.cluster.heartbeat_ms >= 10, "cluster.heartbeat_ms must be at least 10"),
            (
                self.cluster.node_ttl_ms >= 2 * self.cluster.heartbeat_ms,
                "cluster.node_ttl_ms must be at least twice cluster.heartbeat_ms",
            ),
            (self.cluster.lease_ms >= 300, "cluster.lease_ms must be at least 300"),
            (self.api.batch_items_max >= 1, "api.batch_items_max must be at least 1"),
            (self.cluster.relay_queue_max >= 16, "cluster.relay_queue_max must be at least 16"),
            (self.cluster.asks_max >= 16, "cluster.asks_max must be at least 16"),
            (self.cluster.ask_timeout_ms >= 10, "cluster.ask_timeout_ms must be at least 10"),
            (
                self.cluster.public_url.is_empty()
                    || self.cluster.public_url.starts_with("ws://")
                    || self.cluster.public_url.starts_with("wss://"),
                "cluster.public_url must be empty or a ws:// or wss:// URL",
            ),
            // A connection keeps the tick it fell behind in 16 bits (see hub::host::conn).
            (w.slow_consumer_ms <= 3_600_000, "websocket.slow_consumer_ms must be at most 3600000"),
            // The kernel's own floor is about 2 KiB (doubled to SOCK_MIN_SNDBUF); under 4 KiB a
            // frame header and a message no longer share a segment. Over 64 MiB is a typo.
            (
                w.send_buffer_bytes == 0 || (4096..=64 << 20).contains(&w.send_buffer_bytes),
                "websocket.send_buffer_bytes must be 0 (autotuning) or in 4096..=67108864",
            ),
        ];
        if let Some((_, msg)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(ConfigError((*msg).to_string()));
        }
        if !(1..=9).contains(&self.websocket.deflate_level) {
            return Err(ConfigError("websocket.deflate_level must be 1 to 9".into()));
        }
        if self.tls.certs().len() != self.tls.keys().len() {
            return Err(ConfigError("tls.cert and tls.key go together: as many keys as certificates".into()));
        }
        for (hook, settings) in crate::hooks::Settings::all(self) {
            settings.validate(&format!("hook_{}", hook.name())).map_err(ConfigError)?;
        }
        let secret = self.auth.jwt_secret.len();
        if secret > 0 && secret < crate::auth::SECRET_BYTES_MIN {
            return Err(ConfigError(format!(
                "auth.jwt_secret is {secret} bytes; it must be at least {} (an HS256 key shorter than the hash's \
                 256 bits can be guessed offline from one captured token)",
                crate::auth::SECRET_BYTES_MIN
            )));
        }
        for (kind, &priority) in &self.client_types {
            if self.is_system_type(kind) {
                return Err(ConfigError(format!("client_types.{kind}: a system type cannot be sent by clients")));
            }
            if priority == Priority::Whitelist {
                return Err(ConfigError(format!(
                    "client_types.{kind}: clients cannot send whitelist (only room-whitelisted users' sends ride it)"
                )));
            }
        }
        if s.partial_bytes_conn_max != 0 && s.partial_bytes_conn_max < self.partial_bytes_conn_floor() {
            return Err(ConfigError(
                "server.partial_bytes_conn_max must hold websocket.message_bytes_max + 4096 and twice \
                 websocket.handshake_bytes_max"
                    .into(),
            ));
        }
        if s.partial_bytes_max < self.partial_bytes_conn() {
            return Err(ConfigError("server.partial_bytes_max must be at least server.partial_bytes_conn_max".into()));
        }
        if s.partial_bytes_max < w.message_bytes_max + w.handshake_bytes_max {
            return Err(ConfigError(
                "server.partial_bytes_max must hold at least one websocket.message_bytes_max + handshake_bytes_max"
                    .into(),
            ));
        }
        if r.rooms_max == 0 {
            return Err(ConfigError("rooms.rooms_max must be at least 1".into()));
        }
        if r.data_bytes_max == 0 || r.data_bytes_max > 1 << 20 {
            return Err(ConfigError("rooms.data_bytes_max must be in 1..=1048576".into()));
        }
        if !w.echo_path.is_empty() && !w.echo_path.starts_with('/') {
            return Err(ConfigError("websocket.echo_path must start with '/'".into()));
        }
        Ok(())
    }

    /// The least a connection must be able to hold for partial input: one largest message with
    /// its spill box, or a request head that doubled its capacity while growing.
    fn partial_bytes_conn_floor(&self) -> usize {
        // Over TLS, one incomplete record (its buffer's capacity) may be held beside it.
        let tls = if self.tls.cert.is_empty() { 0 } else { TLS_RECORD_HELD };
        (self.websocket.message_bytes_max + 4096).max(2 * self.websocket.handshake_bytes_max) + tls
    }

    /// `server.partial_bytes_conn_max`, 0 resolved to its floor.
    pub fn partial_bytes_conn(&self) -> usize {
        match self.server.partial_bytes_conn_max {
            0 => self.partial_bytes_conn_floor(),
            n => n,
        }
    }

    /// Whether only the gateway and the API may post this type: presence events, and every
    /// type whose default priority is whitelist.
    pub fn is_system_type(&self, kind: &str) -> bool {
        SYSTEM_TYPES.contains(&kind) || self.type_defaults(kind).priority == Priority::Whitelist
    }

    /// Defaults for a message type (unknown types: low priority, no expiry).
    pub fn type_defaults(&self, kind: &str) -> TypeDefaults {
        self.types.get(kind).copied().unwrap_or(TypeDefaults { priority: Priority::Low, ttl_ms: 0 })
    }

    /// Shard count after resolving 0 to the available cores.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let c = Config::from_toml("[rooms]\nblock_messages_max = 5\n").unwrap();
        assert_eq!(c.rooms.block_messages_max, 5);
        assert_eq!(c.rooms.block_interval_ms, 1000);
        let e = Config::from_toml("[rooms]\nblock_mesages_max = 5\n").unwrap_err();
        assert!(e.0.contains("block_mesages_max"), "{e}");
    }

    #[test]
    fn types_table_has_defaults_and_can_be_overridden() {
        let c = Config::default();
        assert_eq!(c.type_defaults("gift").priority, Priority::High);
        assert_eq!(c.type_defaults("custom").ttl_ms, 0);
        let c = Config::from_toml("[types.gift]\npriority = \"whitelist\"\n[types.song]\nttl_ms = 5\n").unwrap();
        assert_eq!(c.type_defaults("gift"), TypeDefaults { priority: Priority::Whitelist, ttl_ms: 0 });
        assert_eq!(c.type_defaults("song").ttl_ms, 5);
        assert_eq!(c.type_defaults("chat").ttl_ms, 10_000, "built-ins stay");
        assert!(Config::from_toml("[types.x]\npriority = \"urgent\"\n").is_err());
    }

    #[test]
    fn flags_override_file() {
        let mut c = Config::from_toml("[api]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let o = Overrides { api_listen: Some(addr("127.0.0.1:2")), ..Default::default() };
        c.apply(&o);
        assert_eq!(c.api.listen, addr("127.0.0.1:2"));
    }

    #[test]
    fn relations_are_checked() {
        let mut c = Config::default();
        c.websocket.message_bytes_max = c.websocket.frame_bytes_max - 1;
        assert!(c.validate().unwrap_err().0.contains("message_bytes_max"));
        let mut c = Config::default();
        c.rooms.pending_messages_max = 1;
        assert!(c.validate().unwrap_err().0.contains("pending_messages_max"));
        let mut c = Config::default();
        c.server.recv_buffer_bytes = 1000;
        assert!(c.validate().unwrap_err().0.contains("recv_buffer_bytes"));
        for level in [0, 10] {
            let mut c = Config::default();
            c.websocket.deflate_level = level;
            assert!(c.validate().unwrap_err().0.contains("deflate_level"));
        }
    }

    #[test]
    fn the_cluster_needs_redis_and_a_ttl_of_two_heartbeats() {
        let clustered = |f: fn(&mut Config)| {
            let mut c = Config::default();
            c.cluster.enabled = true;
            c.redis.url = "redis://127.0.0.1:6379".into();
            f(&mut c);
            c.validate().map_err(|e| e.0)
        };
        assert_eq!(clustered(|_| {}), Ok(()));
        assert!(clustered(|c| c.redis.url.clear()).unwrap_err().contains("needs redis.url"));
        assert!(clustered(|c| c.cluster.heartbeat_ms = 9).unwrap_err().contains("heartbeat_ms"));
        assert!(clustered(|c| c.cluster.node_ttl_ms = 1_999).unwrap_err().contains("node_ttl_ms"));
        assert!(clustered(|c| c.cluster.public_url = "http://a/".into()).unwrap_err().contains("public_url"));
        let mut c = Config::default();
        assert_eq!(c.cluster.public_url(addr("127.0.0.2:8081")), "ws://127.0.0.2:8081/ws");
        c.cluster.public_url = "wss://n1.example/ws".into();
        assert_eq!(c.cluster.public_url(addr("127.0.0.2:8081")), "wss://n1.example/ws");
    }
}
