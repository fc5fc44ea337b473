//! Counters: each shard bumps plain integers on its own core and publishes a copy to shared
//! atomics once per loop turn, so nothing atomic sits on the per-connection path. The API thread
//! reads the copies and renders Prometheus text.
#![forbid(unsafe_code)]
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Declares every series once: variant, metric name, label (or none), help text.
macro_rules! series {
    ($( $variant:ident => $name:literal $( { $lk:literal = $lv:literal } )?, $kind:literal, $help:literal; )*) => {
        /// One series of one metric (a metric with labels has one variant per label value).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Series { $( $variant, )* }

        impl Series {
            /// Every series, in declaration order.
            pub const ALL: &'static [Series] = &[ $( Series::$variant, )* ];
            /// Number of series.
            pub const COUNT: usize = Self::ALL.len();

            fn meta(self) -> (&'static str, Option<(&'static str, &'static str)>, &'static str, &'static str) {
                match self { $( Series::$variant => ($name, series!(@label $( $lk, $lv )?), $kind, $help), )* }
            }
        }
    };
    (@label) => { None };
    (@label $k:literal, $v:literal) => { Some(($k, $v)) };
}

series! {
    Connections => "barrage_connections", "gauge", "Open connections (any phase).";
    ConnectionsOpen => "barrage_websockets", "gauge", "Connections past the WebSocket handshake.";
    Rings => "barrage_rings", "gauge", "io_uring rings driven by the shard.";
    Accepted => "barrage_accepted_total", "counter", "TCP connections accepted.";
    RefusedFull => "barrage_refused_total" {"reason" = "connections_max"}, "counter", "Connections closed at once because the shard was full.";
    RefusedNoSlot => "barrage_refused_total" {"reason" = "ring_full"}, "counter", "Accepts that failed for want of a direct-descriptor slot.";
    RefusedAddrRate => "barrage_refused_total" {"reason" = "addr_rate"}, "counter", "";
    RefusedAddrTable => "barrage_refused_total" {"reason" = "addr_table"}, "counter", "";
    HandshakeOk => "barrage_handshakes_total" {"result" = "ok"}, "counter", "WebSocket handshakes by result.";
    HsTooLarge => "barrage_handshakes_total" {"result" = "too_large"}, "counter", "";
    HsMalformed => "barrage_handshakes_total" {"result" = "malformed"}, "counter", "";
    HsMethod => "barrage_handshakes_total" {"result" = "method"}, "counter", "";
    HsNotUpgrade => "barrage_handshakes_total" {"result" = "not_upgrade"}, "counter", "";
    HsVersion => "barrage_handshakes_total" {"result" = "version"}, "counter", "";
    HsKey => "barrage_handshakes_total" {"result" = "key"}, "counter", "";
    HsSubprotocol => "barrage_handshakes_total" {"result" = "subprotocol"}, "counter", "";
    HsPath => "barrage_handshakes_total" {"result" = "path"}, "counter", "";
    HsToken => "barrage_handshakes_total" {"result" = "token"}, "counter", "";
    HsAnonymous => "barrage_handshakes_total" {"result" = "anonymous"}, "counter", "";
    HsRoom => "barrage_handshakes_total" {"result" = "room"}, "counter", "";
    HsOrigin => "barrage_handshakes_total" {"result" = "origin"}, "counter", "";
    HsRate => "barrage_handshakes_total" {"result" = "addr_rate"}, "counter", "";
    HsProxy => "barrage_handshakes_total" {"result" = "proxy"}, "counter", "";
    HsDraining => "barrage_handshakes_total" {"result" = "draining"}, "counter", "";
    HsTimeout => "barrage_handshakes_total" {"result" = "timeout"}, "counter", "";
    HsHook => "barrage_handshakes_total" {"result" = "hook"}, "counter", "";
    TlsHandshakes => "barrage_tls_handshakes_total" {"result" = "ok"}, "counter", "TLS handshakes on the public listener, by result.";
    TlsHandshake => "barrage_tls_handshakes_total" {"result" = "malformed"}, "counter", "";
    TlsHandshakeAlert => "barrage_tls_handshakes_total" {"result" = "alert"}, "counter", "";
    TlsHandshakeTooLarge => "barrage_tls_handshakes_total" {"result" = "too_large"}, "counter", "";
    TlsHandshakeIncompatible => "barrage_tls_handshakes_total" {"result" = "incompatible"}, "counter", "";
    TlsRecord => "barrage_tls_errors_total" {"reason" = "record"}, "counter", "TLS connections ended after the handshake: a record that does not decrypt or is malformed, or the peer's fatal alert.";
    TlsAlert => "barrage_tls_errors_total" {"reason" = "alert"}, "counter", "";
    TlsKeyUpdate => "barrage_tls_errors_total" {"reason" = "key_update"}, "counter", "";
    DeflateNegotiated => "barrage_deflate_connections_total", "counter", "WebSocket connections that negotiated permessage-deflate.";
    DeflateFrames => "barrage_deflate_frames_total", "counter", "Compressed twins made of live block frames (one per block and wire format with a member that negotiated permessage-deflate).";
    DeflateBytesIn => "barrage_deflate_bytes_total" {"stage" = "in"}, "counter", "Bytes of live block frames for rooms with permessage-deflate members, before (in) and after (out) compression; a frame left uncompressed (small, or not shrinking) counts the same in both.";
    DeflateBytesOut => "barrage_deflate_bytes_total" {"stage" = "out"}, "counter", "";
    Inflated => "barrage_inflated_messages_total", "counter", "Compressed client messages inflated.";
    InflateTooBig => "barrage_inflate_refused_total" {"reason" = "too_big"}, "counter", "Compressed client messages refused: inflated past websocket.message_bytes_max (closed 1009), or not valid DEFLATE or not UTF-8 text once inflated (closed 1007), or past websocket.inflate_rate_per_s (closed 1008, not inflated).";
    InflateInvalid => "barrage_inflate_refused_total" {"reason" = "invalid"}, "counter", "";
    InflateRate => "barrage_inflate_refused_total" {"reason" = "rate"}, "counter", "";
    TlsKernel => "barrage_tls_kernel_total" {"result" = "ok"}, "counter", "TLS connections whose send keys went to the kernel (kernel TLS), or that the kernel refused and are sealed in user space (fallback).";
    TlsKernelFallback => "barrage_tls_kernel_total" {"result" = "fallback"}, "counter", "";
    HttpRequests => "barrage_http_requests_total", "counter", "Plain HTTP requests on the public listener.";
    FramesIn => "barrage_frames_in_total", "counter", "WebSocket frames (messages and control) received.";
    BytesIn => "barrage_bytes_in_total", "counter", "Bytes received on the public listener.";
    FramesOut => "barrage_frames_out_total", "counter", "Frames (and HTTP responses) written.";
    BytesOut => "barrage_bytes_out_total", "counter", "Bytes written on the public listener.";
    Sends => "barrage_sends_total", "counter", "Send operations submitted (several queued frames leave in one).";
    BlocksCut => "barrage_blocks_total", "counter", "Blocks cut by room owners (one encode per wire format each).";
    BlocksDeferred => "barrage_block_ticks_deferred_total", "counter", "Block ticks put off a few ms because a shard was saturated or the last fan-out was still being written.";
    BlockDeliveries => "barrage_block_deliveries_total", "counter", "Block frames queued to members.";
    DirectDeliveries => "barrage_direct_deliveries_total", "counter", "Direct frames queued to a user's connections.";
    BroadcastDeliveries => "barrage_broadcast_deliveries_total", "counter", "Broadcast frames queued.";
    MessagesIn => "barrage_messages_accepted_total", "counter", "Room messages accepted by owners' mixers.";
    MessagesOut => "barrage_messages_blocked_total", "counter", "Room messages placed in blocks.";
    DropOverflow => "barrage_messages_dropped_total" {"reason" = "overflow"}, "counter", "Room messages dropped, by reason.";
    DropBacklog => "barrage_messages_dropped_total" {"reason" = "backlog"}, "counter", "";
    DropNoRoom => "barrage_messages_dropped_total" {"reason" = "rooms_max"}, "counter", "";
    DropExpired => "barrage_messages_dropped_total" {"reason" = "expired"}, "counter", "";
    DropRate => "barrage_messages_dropped_total" {"reason" = "room_rate"}, "counter", "";
    DropMuted => "barrage_messages_dropped_total" {"reason" = "muted"}, "counter", "";
    DropHandover => "barrage_messages_dropped_total" {"reason" = "handover"}, "counter", "";
    MessagesCoalesced => "barrage_messages_coalesced_total", "counter", "Pending messages superseded by a newer one with the same coalesce key.";
    SendRateLimited => "barrage_client_sends_rate_limited_total", "counter", "Client sends refused by the per-connection rate.";
    JoinBanned => "barrage_joins_refused_total" {"reason" = "banned"}, "counter", "Joins refused.";
    JoinRateLimited => "barrage_joins_refused_total" {"reason" = "rate"}, "counter", "";
    JoinHookRefused => "barrage_joins_refused_total" {"reason" = "hook"}, "counter", "";
    Moderations => "barrage_moderation_actions_total", "counter", "Moderation actions applied by room owners.";
    AttrFrames => "barrage_attr_frames_total", "counter", "Attribute delta or snapshot frames fanned out by owners.";
    Polls => "barrage_polls_total", "counter", "Short polls answered on the public listener.";
    RefusedAttrs => "barrage_requests_refused_total" {"reason" = "attrs"}, "counter", "Attribute, moderation and poll requests refused (bad key, too large, list full, bad cursor).";
    RefusedModeration => "barrage_requests_refused_total" {"reason" = "moderation"}, "counter", "";
    RefusedPoll => "barrage_requests_refused_total" {"reason" = "poll"}, "counter", "";
    RefusedRights => "barrage_requests_refused_total" {"reason" = "rights"}, "counter", "";
    RefusedHandover => "barrage_requests_refused_total" {"reason" = "handover"}, "counter", "";
    SendRefused => "barrage_client_sends_refused_total" {"reason" = "rules"}, "counter", "Client sends refused: by the sender rules (anonymous, read-only token, no room, too big), or for a type the client may not send.";
    SendTypeRefused => "barrage_client_sends_refused_total" {"reason" = "type"}, "counter", "";
    SendHookRefused => "barrage_client_sends_refused_total" {"reason" = "hook"}, "counter", "";
    FramesDropped => "barrage_frames_dropped_total" {"reason" = "slow_consumer"}, "counter", "Frames not delivered to a connection, by reason.";
    FramesMissed => "barrage_frames_dropped_total" {"reason" = "format"}, "counter", "";
    MeshFull => "barrage_frames_dropped_total" {"reason" = "mesh_full"}, "counter", "";
    MeshWaiting => "barrage_mesh_waiting", "gauge", "Mails waiting for another shard's full inbox (per-destination overflow, bounded by server.mesh_overflow_max).";
    MeshRefused => "barrage_requests_refused_total" {"reason" = "mesh_congested"}, "counter", "";
    ReplyConnGone => "barrage_replies_dropped_total" {"reason" = "conn_gone"}, "counter", "Owner answers not delivered: the connection had ended (or its slot holds a newer one), or it left the room the answer was for.";
    ReplyLeftRoom => "barrage_replies_dropped_total" {"reason" = "left_room"}, "counter", "";
    ClosedPeer => "barrage_closed_total" {"reason" = "peer"}, "counter", "Connections closed, by reason.";
    ClosedProtocol => "barrage_closed_total" {"reason" = "protocol"}, "counter", "";
    ClosedUtf8 => "barrage_closed_total" {"reason" = "utf8"}, "counter", "";
    ClosedTooBig => "barrage_closed_total" {"reason" = "too_big"}, "counter", "";
    ClosedInflate => "barrage_closed_total" {"reason" = "inflate"}, "counter", "";
    ClosedEnvelope => "barrage_closed_total" {"reason" = "envelope"}, "counter", "";
    ClosedSlow => "barrage_closed_total" {"reason" = "slow_consumer"}, "counter", "";
    ClosedIdle => "barrage_closed_total" {"reason" = "idle"}, "counter", "";
    ClosedError => "barrage_closed_total" {"reason" = "io_error"}, "counter", "";
    ClosedShutdown => "barrage_closed_total" {"reason" = "shutdown"}, "counter", "";
    ClosedKicked => "barrage_closed_total" {"reason" = "kicked"}, "counter", "";
    ClosedBudget => "barrage_closed_total" {"reason" = "partial_budget"}, "counter", "";
    ClosedPartialConn => "barrage_closed_total" {"reason" = "partial_conn"}, "counter", "";
    ClosedCloseTimeout => "barrage_closed_total" {"reason" = "close_timeout"}, "counter", "";
    ClosedDrain => "barrage_closed_total" {"reason" = "drain"}, "counter", "";
    ClosedDrainDeadline => "barrage_closed_total" {"reason" = "drain_deadline"}, "counter", "";
    ClosedExpired => "barrage_closed_total" {"reason" = "token_expired"}, "counter", "";
    Refreshes => "barrage_token_refreshes_total" {"result" = "ok"}, "counter", "Token refreshes on open connections, by result.";
    RefreshRefused => "barrage_token_refreshes_total" {"result" = "refused"}, "counter", "";
    ClosedReset => "barrage_resets_total", "counter", "Connections closed abortively (SO_LINGER 0, an RST: the kernel frees their unsent bytes at once): slow consumers, failed sends, unanswered closes. Also counted in barrage_closed_total by reason.";
    ResetFailed => "barrage_reset_failed_total", "counter", "Abortive closes whose SO_LINGER could not be set (closed orderly instead).";
    RoomsOwned => "barrage_rooms_owned", "gauge", "Rooms whose mixer runs on this shard.";
    RoomsKept => "barrage_rooms_kept", "gauge", "Owned rooms with state of their own (messages, attributes, moderation), counted against rooms.rooms_max; the others exist only while they have members.";
    RoomsLocal => "barrage_rooms_local", "gauge", "Rooms with members on this shard.";
    SendsInFlight => "barrage_sends_in_flight", "gauge", "Send operations submitted and not completed (a reader that stopped reading holds one).";
    EdgeAddresses => "barrage_edge_addresses", "gauge", "Client addresses tracked for the per-address rates (against server.addr_table_max).";
    PartialBytes => "barrage_partial_bytes", "gauge", "Bytes held for partial input (request heads, frames, fragmented messages), against server.partial_bytes_max.";
    RecvNoBuffers => "barrage_recv_buffer_exhausted_total", "counter", "Multishot receives re-armed because the provided-buffer ring ran dry.";
    Turns => "barrage_loop_turns_total", "counter", "Shard loop turns.";
    DrainPhase => "barrage_drain_phase", "gauge", "Drain progress: 0 none, 1 flushing rooms, 2 sending reconnects in waves, 3 done.";
    DrainRemaining => "barrage_drain_remaining", "gauge", "Connections left on a draining shard.";
    Reconnects => "barrage_reconnects_sent_total", "counter", "Reconnect frames sent by a drain.";
    LoadFound => "barrage_redis_loads_total" {"result" = "found"}, "counter", "Rooms loaded from Redis on first use, by result: found state, found nothing, failed (Redis down or the store's queue full), timed out (redis.load_timeout_ms), skipped (redis.loads_max loading already).";
    LoadEmpty => "barrage_redis_loads_total" {"result" = "empty"}, "counter", "";
    LoadFailed => "barrage_redis_loads_total" {"result" = "failed"}, "counter", "";
    LoadTimeout => "barrage_redis_loads_total" {"result" = "timeout"}, "counter", "";
    LoadSkipped => "barrage_redis_loads_total" {"result" = "skipped"}, "counter", "";
    LoadWaitersFull => "barrage_redis_load_waiters_full_total", "counter", "Requests for a loading room served from memory because redis.load_waiters_max were waiting.";
    StoreQueueFull => "barrage_redis_writes_dropped_total" {"reason" = "queue_full"}, "counter", "Writes for Redis dropped: the store's queue from the shards was full, or its buffer (redis.write_buffer_max) overflowed while Redis was away.";
    RoomsExported => "barrage_handover_rooms_total" {"way" = "exported"}, "counter", "Rooms handed to a new process on an upgrade, or taken from the old one.";
    RoomsImported => "barrage_handover_rooms_total" {"way" = "imported"}, "counter", "";
    ImportSkipped => "barrage_handover_skipped_total", "counter", "Rooms, attributes and moderation entries of an upgrade's snapshot refused by this process (bad names, over its bounds).";
    LeaseHeld => "barrage_cluster_leases_total" {"event" = "held"}, "counter", "Room leases in a cluster, by event: a load found another node holding the lease (tried again), a renewal found the lease taken (the room stopped here), a room let go because the live set moved it to another node.";
    LeaseLost => "barrage_cluster_leases_total" {"event" = "lost"}, "counter", "";
    RoomsMoved => "barrage_cluster_leases_total" {"event" = "moved"}, "counter", "";
}

/// One shard's counters, bumped without atomics on its own core.
#[derive(Clone)]
pub struct Counters {
    values: [u64; Series::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self { values: [0; Series::COUNT] }
    }
}

impl Counters {
    /// Adds to a counter.
    #[inline]
    pub fn add(&mut self, s: Series, n: u64) {
        self.values[s as usize] += n;
    }

    /// Adds one.
    #[inline]
    pub fn inc(&mut self, s: Series) {
        self.values[s as usize] += 1;
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(&mut self, s: Series, v: u64) {
        self.values[s as usize] = v;
    }

    /// Current value.
    pub fn get(&self, s: Series) -> u64 {
        self.values[s as usize]
    }

    /// Adds every value of `other` (the parts of a shard count apart; each series is written
    /// by one part, so gauges add up too).
    pub fn absorb(&mut self, other: &Counters) {
        for (v, o) in self.values.iter_mut().zip(other.values.iter()) {
            *v += o;
        }
    }

    /// Copies every value to the shard's shared snapshot.
    pub fn publish(&self, to: &Snapshot) {
        for (slot, v) in to.values.iter().zip(self.values.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
    }
}

/// A shard's counters as last published, readable from any thread.
pub struct Snapshot {
    values: Box<[AtomicU64]>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self { values: (0..Series::COUNT).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Snapshot {
    /// Last published value.
    pub fn get(&self, s: Series) -> u64 {
        self.values[s as usize].load(Ordering::Relaxed)
    }
}

/// Renders Prometheus text exposition: per-shard series with a `shard` label, plus `extra` lines
/// (already formatted) from outside the shards.
pub fn render(shards: &[Snapshot], extra: &str) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let mut last_name = "";
    for &s in Series::ALL {
        let (name, label, kind, help) = s.meta();
        if name != last_name {
            let help = if help.is_empty() { name } else { help };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            last_name = name;
        }
        for (i, shard) in shards.iter().enumerate() {
            let v = shard.get(s);
            match label {
                Some((k, lv)) => {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\",{k}=\"{lv}\"}} {v}");
                }
                None => {
                    let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {v}");
                }
            }
        }
    }
    out.push_str(extra);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_render_shows_labelled_series() {
        let mut c = Counters::default();
        c.inc(Series::HsToken);
        c.add(Series::BytesIn, 42);
        let snaps = [Snapshot::default(), Snapshot::default()];
        c.publish(&snaps[1]);
        let text = render(&snaps, "");
        assert!(text.contains("barrage_handshakes_total{shard=\"1\",result=\"token\"} 1\n"));
        assert!(text.contains("barrage_bytes_in_total{shard=\"1\"} 42\n"));
        assert!(text.contains("barrage_bytes_in_total{shard=\"0\"} 0\n"));
        // One HELP/TYPE header per metric name, even with many label values.
        assert_eq!(text.matches("# TYPE barrage_handshakes_total counter").count(), 1);
    }
}
