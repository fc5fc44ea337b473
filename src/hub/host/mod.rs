//! The host side of a shard: its connections and what they are in. The parts: the connection
//! table (`conns`), the local room and user indexes (`rooms`, `users`), the outbox of frames
//! and send queues (`outbox`), the partial-input budget (`intake`) and the moderation replicas
//! (`replicas`). The walk of a connection's bytes: `upgrade` (the HTTP request: accept, refuse
//! or answer a short poll) → `session` (WebSocket frames: join, send, ...; requests leave as
//! mail to the room's owner) → `fanout` (mail arriving for members: blocks, direct, broadcast,
//! kicks, answers) → the outbox → `poll_send`, one send per connection.
//!
//! Sans-IO. The driver calls, per completion: `handle_accept`, `handle_recv`, `handle_eof`,
//! `handle_sent`, `release`; and
//! takes work with `poll_ready` + `poll_send` (frames to write) and `poll_close` (connections
//! to cancel, close — orderly or abortively, see [`Teardown`] — and release). Keys it passes are
//! of connections it holds; anything else is a driver bug and fails an assertion.

mod conn;
mod conns;
mod demo;
mod drain;
mod edge;
mod fanout;
mod grants;
mod hooked;
mod intake;
pub mod outbox;
mod poll;
mod replicas;
mod rooms;
mod session;
mod tls;
mod tokens;
mod upgrade;
mod users;

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};

use self::conn::State;
use self::conns::Conns;
use self::edge::{Admit, Edge};
use self::intake::{Budget, Intake};
use self::outbox::{FrameId, Outbox, Pushed};
use self::replicas::Replicas;
use self::rooms::Rooms;
use self::users::{UserKey, Users};
use super::HubConfig;
use super::mail::{Mail, OwnerMail};
use super::post::PostOffice;
use crate::auth::Verifier;
use crate::cluster::placement::route;
use crate::hooks::call::Hook;
use crate::ids::{ConnKey, Now, ShardId};
use crate::metrics::{Counters, Series};
use crate::room::RoomName;
use crate::room::frames::Class;
use crate::room::limit::TokenBucket;
use crate::room::moderation::List;
use crate::wire::CloseCode;

pub use self::drain::{DrainPlan, Phase as DrainPhase};
pub use self::edge::EdgeLimits;
pub use self::grants::ClientTypes;
pub use self::session::code;
pub use self::upgrade::WS_PATH;

/// Timeouts are checked by sweeping a tenth of the connections every 100 ms.
const SWEEP_EVERY_MS: u64 = 100;
const SWEEP_SLICES: usize = 10;
/// Expired moderation replicas, and edge addresses whose buckets refilled, are dropped this
/// often (the edge also sweeps itself when its table is full).
const REPLICA_SWEEP_MS: u64 = 15_000;

/// How the driver closes a connection the hub ended (`poll_close`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Orderly: what the kernel still holds for the peer is sent, then a FIN. Every close that
    /// has a peer to talk to: answers to its Close, our Close (kick, idle, shutdown, protocol
    /// errors), refusals, short polls, the peer's own FIN.
    Fin,
    /// Abortive: SO_LINGER {on, 0}, then close. The kernel discards what it still holds for the
    /// peer and sends an RST, so the socket's buffers are freed at once instead of sitting in
    /// an orphaned socket for as long as the peer acknowledges window probes. For peers that
    /// are not taking their bytes: slow consumers, failed sends, and closing handshakes not
    /// finished within `close_timeout_ms` (`websocket.abortive_close`; counted as
    /// `barrage_resets_total`).
    Reset,
}

/// A connection's client address while it speaks HTTP.
struct Peer {
    /// The TCP peer's address, then the one a PROXY header named.
    addr: Option<IpAddr>,
    /// The listener expects a PROXY v2 header first and it has not been read yet.
    awaiting_proxy: bool,
}

/// One shard's connections, indexes and outgoing frames.
pub struct Host {
    cfg: HubConfig,
    verifier: Option<Verifier>,
    conns: Conns,
    intake: Intake,
    rooms: Rooms,
    users: Users,
    outbox: Outbox,
    replicas: Replicas,
    /// Send-rate state of connections that sent recently (8 B each; idle viewers hold none).
    send_buckets: HashMap<ConnKey, TokenBucket>,
    /// Join-rate state of connections that joined by frame recently.
    join_buckets: HashMap<ConnKey, TokenBucket>,
    /// Compressed messages, the same way.
    inflate_buckets: HashMap<ConnKey, TokenBucket>,
    /// A drain in progress, and how many owners have flushed for it.
    drain: Option<drain::Drain>,
    flushed: usize,
    /// Rates per client address.
    edge: Edge,
    /// The client address of connections still speaking HTTP (gone once a WebSocket opens).
    peers: HashMap<ConnKey, Peer>,
    /// Plain-HTTP requests waiting for their answer (keep-alive, CORS origin).
    http: HashMap<ConnKey, poll::HttpRequest>,
    /// When signed-in connections' tokens expire (only tokens with an `exp`).
    expiries: HashMap<ConnKey, tokens::Expiry>,
    /// Handshakes waiting for the connect hook, and joins waiting for the join hook.
    connecting: HashMap<ConnKey, hooked::Connecting>,
    joining: HashMap<ConnKey, (RoomName, u64)>,
    /// TLS state of each connection, when the listener speaks TLS (`tls.cert`).
    tls: HashMap<ConnKey, tls::TlsConn>,
    /// TLS connections whose send keys are ready for the kernel (`poll_kernel_tls`).
    kernel_tls: Vec<ConnKey>,
    /// Connections on the raw echo endpoint (conformance testing): messages go back as they
    /// came. Few, if any: a set, not a flag in every connection.
    echoes: HashSet<ConnKey>,
    /// The shard's one permessage-deflate inflater, for every connection's compressed messages.
    /// Made at the first compressed message.
    inflater: Option<Box<crate::wire::deflate::Inflater>>,
    /// The connection whose read is being handled, and the replies gathered for it: they leave
    /// as one queued frame, so a burst of small client frames costs one queue slot.
    replying: Option<ConnKey>,
    replies: Vec<u8>,
    counters: Counters,
    /// Mail to room owners (this shard's own included), taken by the hub after each call.
    mail: Vec<(ShardId, Mail)>,
    next_sweep_ms: u64,
    next_replica_sweep_ms: u64,
    stopping: bool,
}

impl Host {
    pub fn new(cfg: HubConfig) -> Host {
        let verifier = (!cfg.jwt_secret.is_empty()).then(|| Verifier::new(&cfg.jwt_secret, cfg.token_rules.clone()));
        Host {
            verifier,
            conns: Conns::new(cfg.conns_max),
            intake: Intake::new(cfg.partial_bytes_max, cfg.partial_bytes_conn_max),
            rooms: Rooms::default(),
            users: Users::default(),
            outbox: Outbox::default(),
            replicas: Replicas::default(),
            send_buckets: HashMap::new(),
            join_buckets: HashMap::new(),
            inflate_buckets: HashMap::new(),
            drain: None,
            flushed: 0,
            edge: Edge::new(cfg.edge),
            peers: HashMap::new(),
            http: HashMap::new(),
            expiries: HashMap::new(),
            connecting: HashMap::new(),
            joining: HashMap::new(),
            tls: HashMap::new(),
            kernel_tls: Vec::new(),
            echoes: HashSet::new(),
            inflater: None,
            replying: None,
            replies: Vec::new(),
            counters: Counters::default(),
            mail: Vec::new(),
            next_sweep_ms: SWEEP_EVERY_MS,
            next_replica_sweep_ms: REPLICA_SWEEP_MS,
            stopping: false,
            cfg,
        }
    }

    // ---- the driver's calls ----

    /// A new TCP connection from `peer` (when the driver knows it). None when the shard is full
    /// or stopping, or the address is over its connection rate: the driver closes it.
    pub fn handle_accept(&mut self, io: u64, peer: Option<SocketAddr>, now: Now) -> Option<ConnKey> {
        self.counters.inc(Series::Accepted);
        let addr = peer.map(|p| p.ip());
        // Behind a balancer the peer is the balancer: the client's address comes first.
        let awaiting_proxy = self.cfg.proxy_protocol;
        if let Some(ip) = addr.filter(|_| !awaiting_proxy)
            && !self.admit_connection(ip, now)
        {
            return None;
        }
        let id =
            if self.stopping { None } else { self.conns.insert(io, now.tick_after(self.cfg.handshake_timeout_ms)) };
        let Some(id) = id else {
            self.counters.inc(Series::RefusedFull);
            return None;
        };
        if addr.is_some() || awaiting_proxy {
            self.peers.insert(id.key, Peer { addr, awaiting_proxy });
        }
        if self.cfg.tls.is_some() {
            self.tls_accept(id.key);
        }
        Some(id.key)
    }

    /// The edge's word on one more connection from `ip` (counted when it is no).
    fn admit_connection(&mut self, ip: IpAddr, now: Now) -> bool {
        match self.edge.connection(ip, now.ms) {
            Admit::Yes => true,
            Admit::Limited => {
                self.counters.inc(Series::RefusedAddrRate);
                false
            }
            Admit::TableFull => {
                self.counters.inc(Series::RefusedAddrTable);
                false
            }
        }
    }

    /// Bytes received on a connection (the driver's buffer, ours until we return).
    pub fn handle_recv(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        self.counters.add(Series::BytesIn, data.len() as u64);
        self.replying = Some(key);
        match self.cfg.tls.is_some() {
            // Behind a balancer the PROXY header comes in the clear, before TLS.
            true if self.cfg.proxy_protocol && self.peers.get(&key).is_some_and(|p| p.awaiting_proxy) => {
                self.read_proxy(key, data, now)
            }
            true => self.tls_recv(key, data, now),
            false => self.plain_recv(key, data, now),
        }
        self.flush_replies(now);
    }

    /// Plaintext from a connection: the bytes received, or what TLS decrypted of them.
    fn plain_recv(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        let conn = self.conns.get_mut(key);
        match conn.state {
            State::Handshake if self.peers.get(&key).is_some_and(|p| p.awaiting_proxy) => {
                self.read_proxy(key, data, now)
            }
            State::Handshake if self.connecting.contains_key(&key) => self.early_input(key, data, now),
            State::Handshake => self.read_handshake(key, data, now),
            State::Open => {
                conn.deadline = now.tick_after(self.cfg.idle_timeout_ms);
                self.read_frames(key, data, now);
            }
            State::Closing => self.read_frames(key, data, now),
            // A request sent before the answer to the last one: not queued (see poll.rs).
            State::Polling => self.polling_input(key),
            // Input after our final answer: discarded.
            State::Flushing | State::Terminating => {}
        }
    }

    /// The peer closed its side, or reading failed: nothing more will arrive.
    pub fn handle_eof(&mut self, key: ConnKey) {
        match self.conns.get(key).state {
            State::Terminating => {}
            State::Closing | State::Flushing => self.terminate(key, None),
            State::Handshake | State::Open | State::Polling => self.terminate(key, Some(Series::ClosedPeer)),
        }
    }

    /// Next connection with frames to send and no send in flight.
    pub fn poll_ready(&mut self) -> Option<ConnKey> {
        self.conns.pop_ready()
    }

    /// Fills `iov` with the frames one send should write to `key` and marks them in flight;
    /// returns how many (0: nothing to send now). The bytes stay alive and unmoved until
    /// `handle_sent` for this connection.
    pub fn poll_send<'a>(&'a mut self, key: ConnKey, iov: &mut [IoSlice<'a>]) -> usize {
        if self.cfg.tls.is_some() {
            return self.tls_poll_send(key, iov);
        }
        self.plain_poll_send(key, iov)
    }

    /// `poll_send` of a connection whose bytes leave as they are (plain, or kernel TLS).
    fn plain_poll_send<'a>(&'a mut self, key: ConnKey, iov: &mut [IoSlice<'a>]) -> usize {
        let conn = self.conns.get_mut(key);
        if conn.state == State::Terminating || conn.queue.is_empty() || conn.queue.in_flight() {
            return 0;
        }
        let format = conn.wire();
        let n = self.outbox.gather(&mut conn.queue, format, iov);
        if n > 0 {
            self.conns.send_started();
            self.counters.inc(Series::Sends);
            self.counters.add(Series::FramesOut, n as u64);
        }
        n
    }

    /// A send completed: `result` is bytes written or a negative errno.
    pub fn handle_sent(&mut self, key: ConnKey, result: i32) {
        if self.cfg.tls.is_some() {
            return self.tls_sent(key, result);
        }
        self.plain_sent(key, result);
    }

    /// `handle_sent` of a connection whose bytes leave as they are (plain, or kernel TLS).
    fn plain_sent(&mut self, key: ConnKey, result: i32) {
        self.conns.send_ended();
        let conn = self.conns.get_mut(key);
        assert!(conn.queue.in_flight(), "{key:?}: a send completed with none in flight");
        let format = conn.wire();
        if result < 0 {
            self.outbox.abort(&mut conn.queue);
            if conn.state != State::Terminating {
                // The socket is broken: nothing more reaches the peer anyway.
                self.abort(key, Series::ClosedError);
            }
            return;
        }
        self.counters.add(Series::BytesOut, result as u64);
        self.outbox.sent(&mut conn.queue, format, result as usize);
        if conn.queue.is_empty() {
            // Caught up: no longer behind, whatever was shed before.
            conn.behind_since = 0;
        }
        match conn.state {
            State::Terminating => self.outbox.clear(&mut conn.queue),
            _ if !conn.queue.is_empty() => self.conns.mark_ready(key),
            State::Flushing => self.terminate(key, None),
            State::Handshake | State::Open | State::Closing | State::Polling => {}
        }
    }

    /// The next connection ended by the hub and how to close it: the driver cancels its
    /// operations, closes the socket (for `Teardown::Reset`, after setting SO_LINGER 0) and
    /// calls `release` once nothing of its is in flight.
    pub fn poll_close(&mut self) -> Option<(ConnKey, Teardown)> {
        self.conns.pop_closing()
    }

    /// The driver has closed an ended connection and none of its operations is pending:
    /// forget it. Its queued frames are freed here, so a send still writing them would read
    /// freed memory: that is asserted, not assumed.
    pub fn release(&mut self, key: ConnKey) {
        let mut conn = self.conns.remove(key);
        assert_eq!(conn.state, State::Terminating, "{key:?} released before it ended");
        assert!(!conn.queue.in_flight(), "{key:?} released with a send in flight");
        if !self.tls.is_empty() {
            assert!(!self.tls_sending(key), "{key:?} released with a TLS send in flight");
            self.tls.remove(&key);
        }
        if !self.echoes.is_empty() {
            self.echoes.remove(&key);
        }
        self.outbox.abort(&mut conn.queue);
        self.outbox.clear(&mut conn.queue);
        assert!(conn.queue.is_empty());
    }

    /// The driver's handle of a connection.
    pub fn io(&self, key: ConnKey) -> u64 {
        self.conns.get(key).io
    }

    pub fn set_io(&mut self, key: ConnKey, io: u64) {
        self.conns.get_mut(key).io = io;
    }

    // ---- time and the end of a turn ----

    /// Milliseconds until `handle_timeout` has work.
    pub fn next_timeout(&self, now: Now) -> u64 {
        self.next_sweep_ms.saturating_sub(now.ms).min(self.drain_timeout(now))
    }

    /// Sweeps a slice of the connections for expired deadlines and slow readers; now and then
    /// drops expired moderation replicas.
    pub fn handle_timeout(&mut self, now: Now) {
        self.drain_turn(now);
        if now.ms >= self.next_sweep_ms {
            self.sweep(now);
            self.next_sweep_ms = now.ms + SWEEP_EVERY_MS;
        }
        if now.ms >= self.next_replica_sweep_ms {
            self.edge.sweep(now.ms);
            self.replicas.sweep(now.unix.0);
            self.next_replica_sweep_ms = now.ms + REPLICA_SWEEP_MS;
        }
    }

    /// End of a turn: tell owners about membership changes (held while the way to an owner is
    /// congested: the room stays dirty and reports later) and refresh gauges.
    pub fn end_turn(&mut self, post: &PostOffice) {
        let shards = self.cfg.shards;
        let me = self.cfg.shard;
        let placement = self.cfg.placement.as_deref();
        let hold = |room: &RoomName| {
            let owner = route(room, shards, placement);
            owner != me && post.is_congested(owner)
        };
        let mail = &mut self.mail;
        self.rooms.flush_presence(&hold, &mut |p| {
            let report = OwnerMail::Presence {
                room: p.room.clone(),
                from: me,
                members: p.members,
                json: p.json,
                deflate: p.deflate,
                deflate_json: p.deflate_json,
                left: p.left,
                left_users: p.left_users,
            };
            mail.push((route(p.room, shards, placement), report.into()));
        });
        let c = &mut self.counters;
        c.set(Series::Connections, self.conns.len() as u64);
        c.set(Series::ConnectionsOpen, self.conns.websockets());
        c.set(Series::RoomsLocal, self.rooms.len() as u64);
        c.set(Series::PartialBytes, self.intake.bytes() as u64);
        c.set(Series::SendsInFlight, self.conns.sends_in_flight() as u64);
        c.set(Series::EdgeAddresses, self.edge.len() as u64);
    }

    /// Moves the mail gathered since the last call to `out`.
    pub fn take_mail(&mut self, out: &mut Vec<(ShardId, Mail)>) {
        out.append(&mut self.mail);
    }

    // ---- what the hub and tests read ----

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Connections waiting for a send or with one in flight, and connections in all: the
    /// owner's blocks wait while the last fan-out is still being written to many.
    pub fn backlog(&self) -> (usize, usize) {
        (self.conns.ready_len() + self.conns.sends_in_flight(), self.conns.len())
    }

    pub fn sends_in_flight(&self) -> usize {
        self.conns.sends_in_flight()
    }

    pub fn has_ready(&self) -> bool {
        self.conns.ready_len() > 0
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Frames queued to a connection, in flight included.
    pub fn queue_len(&self, key: ConnKey) -> usize {
        self.conns.get(key).queue.len()
    }

    /// Frames stored in the outbox, each held by at least one queue.
    pub fn outbox_frames(&self) -> usize {
        self.outbox.frames()
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    // ---- shared by upgrade, session and fanout ----

    /// Walks a slice of the connections and acts on expired deadlines and slow readers; drops
    /// rate buckets that have refilled (a new one starts full), so only connections that sent or
    /// joined in the last seconds hold one.
    fn sweep(&mut self, now: Now) {
        let (send, join, inflate) = (self.cfg.send_rate, self.cfg.join_rate, self.cfg.inflate_rate);
        self.send_buckets.retain(|_, b| !b.is_full(&send, now.ms));
        self.join_buckets.retain(|_, b| !b.is_full(&join, now.ms));
        self.inflate_buckets.retain(|_, b| !b.is_full(&inflate, now.ms));
        let tick = now.tick();
        let slow_ticks = self.cfg.slow_consumer_ms.div_ceil(100) as u32;
        for key in self.conns.sweep_slice(SWEEP_SLICES) {
            let Some(conn) = self.conns.try_get(key) else { continue };
            if conn.behind_longer_than(slow_ticks, tick) {
                self.slow_consumer(key, now);
                continue;
            }
            if conn.state == State::Open && conn.has(conn::flag::SIGNED_IN) {
                self.check_expiry(key, now);
            }
            let conn = self.conns.get(key);
            if conn.deadline == 0 || conn.deadline > tick {
                continue;
            }
            match conn.state {
                State::Handshake | State::Polling => {
                    self.counters.inc(Series::HsTimeout);
                    self.terminate(key, None);
                }
                State::Open => self.close(key, CloseCode::GOING_AWAY, "idle timeout", Series::ClosedIdle, now),
                // Our Close (or final answer) went unanswered: whatever of it is still unsent
                // is not being read.
                State::Closing | State::Flushing => self.abort(key, Series::ClosedCloseTimeout),
                State::Terminating => {}
            }
        }
    }

    /// Queues the replies gathered for the connection whose read is being handled.
    fn flush_replies(&mut self, now: Now) {
        let Some(key) = self.replying.take() else { return };
        if self.replies.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.replies);
        if self.conns.get(key).state != State::Terminating {
            let id = self.outbox.add_owned(bytes, Class::Keep);
            self.enqueue(key, id, now);
        }
    }

    /// Queues a frame to one connection, shedding lower frames if its queue is full. Returns
    /// false when the frame was not queued.
    fn enqueue(&mut self, key: ConnKey, frame: FrameId, now: Now) -> bool {
        let max = self.cfg.send_queue_frames_max;
        let conn = self.conns.get_mut(key);
        let pushed = self.outbox.push(&mut conn.queue, frame, max);
        self.outbox.forget_if_unused(frame);
        if pushed != Pushed::Queued {
            self.counters.inc(Series::FramesDropped);
            conn.fell_behind(now.tick());
        }
        match pushed {
            Pushed::Queued | Pushed::DroppedOldest => {
                self.conns.mark_ready(key);
                true
            }
            Pushed::DroppedNew => false,
            Pushed::Full => {
                self.slow_consumer(key, now);
                false
            }
        }
    }

    /// Queues bytes built for one connection (never dropped for a later frame). During the
    /// connection's own read they join its gathered replies.
    fn enqueue_owned(&mut self, key: ConnKey, bytes: Vec<u8>, now: Now) -> bool {
        if self.replying == Some(key) {
            self.replies.extend_from_slice(&bytes);
            return true;
        }
        let id = self.outbox.add_owned(bytes, Class::Keep);
        self.enqueue(key, id, now)
    }

    /// Encodes a server frame for one connection in its format and queues it.
    fn send_frame(&mut self, key: ConnKey, frame: &crate::proto::ServerFrame, now: Now) -> bool {
        let bytes = crate::envelope::encode(frame, self.conns.get(key).format());
        self.enqueue_owned(key, bytes, now)
    }

    /// A reader that cannot keep up: closed (it would only fall further behind), unless its
    /// user is whitelisted in its room, who is never auto-kicked and just keeps shedding.
    fn slow_consumer(&mut self, key: ConnKey, now: Now) {
        let conn = self.conns.get(key);
        let user = self.users.id(conn.user);
        let room = self.rooms.get(conn.room).map(|r| &r.name);
        if let (Some(user), Some(room)) = (user, room)
            && self.replicas.contains(room, List::Whitelist, user, now.unix.0)
        {
            return;
        }
        self.abort(key, Series::ClosedSlow);
    }

    /// Ends a connection now and has the driver close it orderly (`Teardown::Fin`).
    fn terminate(&mut self, key: ConnKey, reason: Option<Series>) {
        self.end(key, reason, Teardown::Fin);
    }

    /// Ends a connection whose peer is not taking its bytes: closed with an RST, so the kernel
    /// frees what it holds for it at once (`Teardown::Reset`), unless
    /// `websocket.abortive_close` is off.
    fn abort(&mut self, key: ConnKey, reason: Series) {
        let how = if self.cfg.abortive_close { Teardown::Reset } else { Teardown::Fin };
        self.end(key, Some(reason), how);
    }

    /// Ends a connection: out of its room and user index, queue dropped (but what is in
    /// flight), and handed to the driver to close as `how` says.
    fn end(&mut self, key: ConnKey, reason: Option<Series>, how: Teardown) {
        let conn = self.conns.get_mut(key);
        if conn.state == State::Terminating {
            return;
        }
        let opened = conn.has(conn::flag::OPENED);
        conn.state = State::Terminating;
        conn.deadline = 0;
        conn.reader.reset();
        self.outbox.clear(&mut conn.queue);
        self.intake.release(key);
        if opened {
            self.conns.closed_websocket();
        }
        if let Some(r) = reason {
            self.counters.inc(r);
        }
        self.send_buckets.remove(&key);
        self.join_buckets.remove(&key);
        self.inflate_buckets.remove(&key);
        self.http.remove(&key);
        self.peers.remove(&key);
        self.expiries.remove(&key);
        self.connecting.remove(&key);
        self.joining.remove(&key);
        self.tls_end(key);
        self.leave_room(key);
        if opened && self.hooked(Hook::Events) {
            self.hook_event(key, None);
        }
        self.leave_user(key);
        if how == Teardown::Reset {
            self.counters.inc(Series::ClosedReset);
        }
        self.conns.push_closing(key, how);
    }

    /// Acts on where a connection's partial input left the budgets: over its own cap it is
    /// failed (1009); over the shard's, the connections holding the most are closed (1013, or
    /// 503 in the handshake) until the budget holds — which may be this one.
    fn within_budget(&mut self, key: ConnKey, budget: Budget, now: Now) {
        match budget {
            Budget::Within => {}
            Budget::ConnOver => {
                self.intake.release(key);
                self.conns.get_mut(key).reader.reset();
                let why = "partial input over the per-connection cap";
                self.fail(key, CloseCode::TOO_BIG, why, Series::ClosedPartialConn, now);
            }
            Budget::ShardFull => {
                while self.intake.over() {
                    let Some(victim) = self.intake.largest() else { break };
                    self.evict(victim, now);
                    if victim == key {
                        break;
                    }
                }
            }
        }
    }

    /// Closes a connection for holding the most partial input while the shard's budget is
    /// full, freeing what it holds at once.
    fn evict(&mut self, key: ConnKey, now: Now) {
        self.intake.release(key);
        let conn = self.conns.get_mut(key);
        conn.reader.reset();
        match conn.state {
            State::Handshake => {
                self.counters.inc(Series::ClosedBudget);
                self.busy(key, now);
            }
            State::Open | State::Closing => {
                self.fail(key, CloseCode::TRY_AGAIN, "server busy: try again", Series::ClosedBudget, now)
            }
            State::Polling | State::Flushing | State::Terminating => self.terminate(key, Some(Series::ClosedBudget)),
        }
    }

    fn leave_user(&mut self, key: ConnKey) {
        let conn = self.conns.get_mut(key);
        let user = std::mem::replace(&mut conn.user, UserKey::NONE);
        if user != UserKey::NONE {
            self.users.remove(user, key);
        }
    }

    /// Mail to a room's owner (this shard's included: the hub routes it).
    fn ask_owner(&mut self, room: &RoomName, mail: OwnerMail) {
        self.mail.push((route(room, self.cfg.shards, self.cfg.placement.as_deref()), mail.into()));
    }

    /// The cluster's placement, in a cluster.
    pub fn placement(&self) -> Option<std::sync::Arc<crate::cluster::placement::Placement>> {
        self.cfg.placement.clone()
    }

    /// Rooms' owners may have moved between nodes: every room reports its members again.
    pub fn placement_changed(&mut self) {
        self.rooms.mark_all();
    }
}

impl Host {
    /// Keeps a ban or whitelist entry of a room's owner (a replica).
    fn replicate(&mut self, room: RoomName, user: &crate::ids::UserId, list: List, until_ms: Option<i64>, now: Now) {
        let limits = self.cfg.owner.moderation;
        self.replicas.add(room, user, list, until_ms, now.unix.0, &limits);
    }

    /// The bans and whitelist entries of rooms taken over from another process, before this
    /// shard takes connections (so a banned user's join is refused from the first one).
    pub fn import_replicas(&mut self, replicas: Vec<crate::room::owner::Replica>, now: Now) {
        for (room, user, list, until_ms) in replicas {
            self.replicate(room, &user, list, until_ms, now);
        }
    }
}
