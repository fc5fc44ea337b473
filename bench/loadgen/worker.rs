//! One load thread: its rings ("lanes", each a ring and the connections in its table) and its
//! share of the connections. Each loop turn reaps every ring's completions and runs them
//! through the connections' state, opens the connections the token bucket allows, sends the
//! pings that are due, submits once per ring, publishes its counters, and sleeps on its eventfd
//! when nothing happened. The main thread steers it through `Shared` and reads its counters.
//! What the bytes read mean is the scenario's business (`Reads`): `ConnectReads` counts frames
//! for `connect` and `soak`, `fanout_recv` takes messages apart for `fanout`. With a churn plan
//! (`soak`), the loop also closes random joined connections at the rate the main thread sets
//! (a Close frame, then the server's answer) and opens a new one into the same room for each,
//! from a source pair that has rested past TIME_WAIT; a slot comes back for reuse once nothing
//! of its last connection is in flight. A scenario whose clients come back by themselves
//! (`upgrade`: told to reconnect, or closed unexpectedly) says so when a connection ends
//! (`Reads::ended`); the loop then opens it again when due (`reopen`), with the request the
//! scenario gives (`Reads::request`: a resume cursor), within the same in-flight cap as the ramp.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::addrs::{Sources, sockaddr_in};
use crate::churn::{CLOSE_FRAME, Deadlines, Due, PairPool, Rng, locate};
use crate::conn::{BYE, Conns, Dials, PING, POLL, POLL_AGAIN, RECONNECT, RECV, STALL, State};
use crate::errors::{ErrorCounts, ErrorKind, Op};
use crate::frames::{Event, Kind, ReadError, Reader};
use crate::handshake::Subprotocol;
use crate::pace::TokenBucket;
use crate::reopen::{Reopen, Reopens};
use crate::ring::{Cqe, Ring, RingParams, Tag, Tagged};
use crate::sys::Wake;

/// A masked WebSocket ping with an empty payload (FIN|ping, MASK|0, a fixed mask key).
static PING_FRAME: [u8; 6] = [0x89, 0x80, 0x5A, 0x17, 0xC3, 0x9E];
/// A masked WebSocket pong with an empty payload: the answer to a server's ping.
static PONG_FRAME: [u8; 6] = [0x8A, 0x80, 0x5A, 0x17, 0xC3, 0x9E];
/// Longest sleep with nothing to do (the main thread wakes us sooner when it has news).
const IDLE_SLEEP: Duration = Duration::from_millis(100);
/// Random slots looked at for a joined connection to close before a churn turn gives up (the
/// slots are mostly joined ones, so 16 misses in a row mean there are hardly any).
const VICTIM_TRIES: u32 = 16;
/// Seconds of churn a late loop turn may catch up on at once (the bucket's burst).
const CHURN_BURST_S: f64 = 0.25;

/// What one worker does.
#[derive(Clone)]
pub struct Plan {
    /// Connection indices `first..first + count` are this worker's.
    pub first: u64,
    pub count: u64,
    pub rate_per_s: f64,
    /// Connections started and not yet joined (or failed), at most: the ramp follows the
    /// gateway's handshake pace instead of burying it (and its accept queue) under SYNs.
    pub pending_max: u32,
    /// Direct descriptors per ring; the last ring gets only what is left.
    pub files_per_ring: u32,
    pub ring: RingParams,
    pub sources: Sources,
    pub rooms: u32,
    /// One upgrade request per room, built once.
    pub requests: &'static [Vec<u8>],
    /// Connection `i` dials `targets[i % len]` (several nodes of a cluster share the members).
    pub targets: &'static [libc::sockaddr_in],
    /// Close and reopen connections (`soak`); None: each connection opens once.
    pub churn: Option<ChurnPlan>,
}

/// How a worker churns. The rate comes later, from the main thread (`Shared::churn_milli_per_s`).
#[derive(Clone, Copy, Debug)]
pub struct ChurnPlan {
    /// Source pairs `pairs_first..pairs_first + pairs_count` of `Plan::sources` are this
    /// worker's, for its first connections and every reconnect.
    pub pairs_first: u64,
    pub pairs_count: u64,
    /// How long a pair rests after its connection closed.
    pub pair_rest: Duration,
    /// How long a close waits for the server's answer before the socket is just closed.
    pub close_wait: Duration,
    pub seed: u64,
}

/// The scenario's half of the loop: what the bytes a connection reads mean.
pub trait Reads {
    /// Read state of one ring's connections, indexed by slot.
    type Lane;
    /// The state for a new ring of `capacity` slots.
    fn lane(&mut self, capacity: u32) -> Self::Lane;
    /// Connection `index` (run-wide, `Plan::first`-based) is starting in `slot`.
    fn start(&mut self, lane: &mut Self::Lane, slot: u32, index: u64);
    /// One read's bytes for `slot`: moves `conns.state` on (Upgrading → Open → Joined), counts
    /// into `c`, and says whether to close the connection or answer a ping.
    fn absorb(
        &mut self,
        lane: &mut Self::Lane,
        conns: &mut Conns,
        slot: u32,
        bytes: &[u8],
        c: &mut Counters,
    ) -> Absorbed;
    /// Once a loop turn, when the worker publishes its counters.
    fn publish(&mut self) {}
    /// The upgrade request of connection `index` into `room` when it is not the plan's one for
    /// the room (a resume cursor); None: the plan's.
    fn request(&mut self, _index: u64, _room: u32) -> Option<&[u8]> {
        None
    }
    /// Connection `index` ended (`why`; `joined`: it had joined; needs a churn plan, which keeps
    /// the slots' indices): whether that was expected, and whether to open it again. Default:
    /// an error, gone for good.
    fn ended(&mut self, _index: u64, _why: ErrorKind, _joined: bool) -> Ended {
        Ended::default()
    }
}

/// What becomes of a connection that ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// Not an error (the server said it would close it: a `reconnect` frame).
    pub expected: bool,
    /// Open it again (same index and room) after this long.
    pub reopen_after: Option<Duration>,
}

/// What one read asks of the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Absorbed {
    /// Close the connection, counted under this kind.
    pub close: Option<ErrorKind>,
    /// The server pinged: send a pong (unless a ping or pong send is already out).
    pub pong: bool,
    /// Stop reading this connection for good, and hold it open (a stalled reader).
    pub stall: bool,
    /// Send this (a protocol's join message, once per connection).
    pub hello: Option<&'static [u8]>,
}

/// A worker's counters: running totals and levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    /// Connections started.
    Attempted,
    /// Started connections that ended before joining.
    Failed,
    /// 101 responses accepted.
    Handshakes,
    /// Connections that ever joined.
    JoinedTotal,
    /// Connected and not closed (level).
    Open,
    /// Joined and not closed (level).
    Joined,
    /// Joined connections with at least one block since the probe began (level).
    Reached,
    Frames,
    Blocks,
    PingsSent,
    Pongs,
    Errors,
    Rings,
    /// Connect chains in the kernel (level).
    Dialing,
    /// Receives that found the buffer ring empty (retried).
    RecvNoBufs,
    /// Closes sent and not yet ended (level).
    Closing,
    /// Churn closes started (a Close frame sent).
    Closes,
    /// Churn closes the server answered (its Close frame, or the end of the stream).
    ClosesDone,
    /// Churn closes unanswered within the wait, then closed by us.
    CloseTimeouts,
    /// Connections opened to replace closed ones.
    Reconnects,
    /// Reconnects that joined (their welcome arrived).
    ReconnectsJoined,
    /// Reconnects that ended before joining: the churn's handshake failures.
    ReconnectsFailed,
    /// Churn turns that found no joined connection to close, or no slot or pair to reopen.
    ChurnSkipped,
    /// Source pairs resting after a close, or rested and not yet taken again (level).
    PairsResting,
    /// Connections the scenario wants opened again, waiting for their time or the in-flight cap
    /// (level).
    Reopening,
    /// The probe generation the block counts belong to.
    ProbeGen,
    /// 1 once no more connections will be started (all started, or a ring could not be made).
    RampStopped,
}

pub const STATS: usize = Stat::RampStopped as usize + 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters([u64; STATS]);

impl Index<Stat> for Counters {
    type Output = u64;
    fn index(&self, s: Stat) -> &u64 {
        &self.0[s as usize]
    }
}

impl IndexMut<Stat> for Counters {
    fn index_mut(&mut self, s: Stat) -> &mut u64 {
        &mut self.0[s as usize]
    }
}

impl Counters {
    /// Adds another worker's counters (ProbeGen and RampStopped take the minimum: "all have").
    pub fn merge(&mut self, other: &Counters) {
        for (i, v) in other.0.iter().enumerate() {
            if i == Stat::ProbeGen as usize || i == Stat::RampStopped as usize {
                self.0[i] = self.0[i].min(*v);
            } else {
                self.0[i] += v;
            }
        }
    }

    /// The identity of `merge`.
    pub fn zero_for_merge() -> Counters {
        let mut c = Counters::default();
        c[Stat::ProbeGen] = u64::MAX;
        c[Stat::RampStopped] = u64::MAX;
        c
    }

    /// Every started connection has joined or failed, and none will be started.
    pub fn ramp_over(&self) -> bool {
        self[Stat::RampStopped] == 1 && self[Stat::JoinedTotal] + self[Stat::Failed] >= self[Stat::Attempted]
    }

    fn sub(&mut self, s: Stat) {
        self[s] = self[s].saturating_sub(1);
    }
}

/// Between the main thread and one worker.
pub struct Shared {
    /// Signalled by the worker's rings while it sleeps, and by the main thread with news.
    pub wake: Wake,
    pub stop: AtomicBool,
    /// Ping every joined connection once per this many ms; 0 = no pings.
    pub ping_ms: AtomicU64,
    /// Bumped by the main thread: zero the block counts (the probe starts).
    pub probe_gen: AtomicU64,
    /// Churn closes (and reopens) per second × 1000; 0 = none. Needs `Plan::churn`.
    pub churn_milli_per_s: AtomicU64,
    stats: [AtomicU64; STATS],
}

impl Shared {
    pub fn new() -> std::io::Result<Shared> {
        Ok(Shared {
            wake: Wake::new()?,
            stop: AtomicBool::new(false),
            ping_ms: AtomicU64::new(0),
            probe_gen: AtomicU64::new(0),
            churn_milli_per_s: AtomicU64::new(0),
            stats: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    pub fn load(&self) -> Counters {
        Counters(std::array::from_fn(|i| self.stats[i].load(Ordering::Relaxed)))
    }

    fn store(&self, c: &Counters) {
        for (a, v) in self.stats.iter().zip(c.0) {
            a.store(v, Ordering::Relaxed);
        }
    }
}

/// One ring and the connections in its table.
struct Lane<L> {
    ring: Ring,
    conns: Conns,
    reads: L,
    /// Receives in the kernel: at most one per provided buffer, so a receive never finds the
    /// buffer ring empty (receives do not wait: MSG_DONTWAIT, so each returns within a submit).
    recvs_in_flight: u32,
    /// Slots waiting for receive budget, each at most once (its RECV flag is set).
    ready: VecDeque<u32>,
    /// Per slot, with a churn plan: who holds it (empty without one).
    meta: Vec<SlotMeta>,
}

/// What the churn needs to know about a slot's connection.
#[derive(Clone, Copy, Debug, Default)]
struct SlotMeta {
    room: u32,
    /// Tells this connection from a later one in the same slot.
    serial: u32,
    pair: u64,
    /// The connection's run-wide index (`Reads::start`'s).
    index: u64,
}

impl<L> Lane<L> {
    /// Receives on `slot` now if the budget allows and nobody is queued, else queues it.
    fn want_recv(&mut self, slot: u32) -> std::io::Result<()> {
        self.conns.flags[slot as usize] |= RECV;
        if self.ready.is_empty() && self.recvs_in_flight < self.recv_budget() {
            self.recvs_in_flight += 1;
            return self.ring.recv(slot);
        }
        self.ready.push_back(slot);
        Ok(())
    }

    fn recv_budget(&self) -> u32 {
        u32::from(self.ring.recv_buffers())
    }
}

/// Pings spread evenly over an interval: by `elapsed`, `elapsed / interval × slots` slots have
/// been visited.
struct PingRound {
    start: Instant,
    interval_ms: u64,
    visited: u64,
}

/// A worker's churn: the victims' dice, its source pairs, the closes waiting for an answer.
struct Churn {
    plan: ChurnPlan,
    rng: Rng,
    pairs: PairPool,
    deadlines: Deadlines,
    /// The rate in force (× 1000) and its bucket (None while 0).
    rate_milli: u64,
    bucket: Option<TokenBucket>,
    serial: u32,
    /// Connections opened by the churn so far (their `Reads::start` index, past the plan's).
    reopened: u64,
}

struct Worker<R: Reads> {
    plan: Plan,
    churn: Option<Churn>,
    shared: Arc<Shared>,
    reads: R,
    lanes: Vec<Lane<R::Lane>>,
    dials: Dials,
    bucket: TokenBucket,
    /// Connections started so far (offset from `plan.first`).
    next: u64,
    c: Counters,
    errors: ErrorCounts,
    cqes: Vec<Cqe>,
    probe_gen: u64,
    ping: Option<PingRound>,
    ring_failed: bool,
    /// Connections to open again (`Reads::ended`).
    reopens: Reopens,
}

/// Runs a worker until the main thread says stop; returns its error counts and its `Reads`
/// (with whatever they gathered). Its rings (and so all its connections) are closed on return.
pub fn run<R: Reads>(plan: Plan, shared: Arc<Shared>, reads: R) -> (ErrorCounts, R) {
    let now = Instant::now();
    let burst = TokenBucket::default_burst(plan.rate_per_s);
    let churn = plan.churn.map(|c| Churn {
        plan: c,
        rng: Rng::new(c.seed),
        pairs: PairPool::new(c.pairs_first, c.pairs_count, c.pair_rest),
        deadlines: Deadlines::default(),
        rate_milli: 0,
        bucket: None,
        serial: 0,
        reopened: 0,
    });
    let mut w = Worker {
        churn,
        bucket: TokenBucket::new(plan.rate_per_s, burst, now),
        dials: Dials::new(plan.pending_max),
        lanes: Vec::new(),
        next: 0,
        c: Counters::default(),
        errors: ErrorCounts::default(),
        cqes: Vec::with_capacity(plan.ring.cq_entries as usize),
        probe_gen: 0,
        ping: None,
        ring_failed: false,
        reopens: Reopens::default(),
        plan,
        shared,
        reads,
    };
    while !w.shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let mut busy = w.reap();
        w.check_probe();
        busy |= w.ramp(now);
        busy |= w.reopen(now);
        busy |= w.churn(now);
        w.close_overdue(now);
        let ping_wait = w.ping(now);
        w.submit();
        w.publish();
        if !busy {
            let waits = [w.ramp_wait(now), ping_wait, w.churn_wait(now), w.reopen_wait(now)];
            let wait = waits.into_iter().flatten().min().unwrap_or(IDLE_SLEEP);
            w.sleep(wait.min(IDLE_SLEEP));
        }
    }
    w.publish();
    drop(w.lanes);
    (w.errors, w.reads)
}

impl<R: Reads> Worker<R> {
    /// Handles every completion waiting on every ring; true if there were any.
    fn reap(&mut self) -> bool {
        let mut cqes = std::mem::take(&mut self.cqes);
        let mut any = false;
        for li in 0..self.lanes.len() {
            cqes.clear();
            self.lanes[li].ring.reap(&mut cqes);
            any |= !cqes.is_empty();
            for cqe in &cqes {
                self.complete(li, cqe);
            }
        }
        cqes.clear();
        self.cqes = cqes;
        any
    }

    fn complete(&mut self, li: usize, cqe: &Cqe) {
        match cqe.tag() {
            Some(t @ (Tag::Socket | Tag::SockOpt | Tag::Bind | Tag::Connect | Tag::Upgrade)) => self.on_dial(t, cqe),
            Some(Tag::Poll) => self.on_poll(li, cqe),
            Some(Tag::Recv) => self.on_recv(li, cqe),
            Some(Tag::Ping) => self.on_ping(li, cqe),
            Some(Tag::Bye) => self.on_bye(li, cqe),
            Some(Tag::Cancel | Tag::Close) | None => {}
        }
    }

    /// One operation of a connect chain finished; after the fifth, the connection is open
    /// (and starts listening) or failed (and its slot is closed).
    fn on_dial(&mut self, tag: Tag, cqe: &Cqe) {
        let index = cqe.index();
        let Some(d) = self.dials.get_mut(index) else { return };
        let failure = match tag {
            Tag::Upgrade if cqe.result >= 0 && cqe.result as u32 != d.request_len => Some(ErrorKind::ShortSend),
            _ if cqe.result < 0 => Some(ErrorKind::Os(op_of(tag), -cqe.result)),
            _ => None,
        };
        if let Some(kind) = failure
            && !d.failed
        {
            d.failed = true;
            self.errors.add(kind);
        }
        d.left -= 1;
        if d.left > 0 {
            return;
        }
        let (li, slot, failed) = (d.lane as usize, d.slot, d.failed);
        self.dials.finish(index);
        self.c.sub(Stat::Dialing);
        let Some(lane) = self.lanes.get_mut(li) else { return };
        let s = slot as usize;
        if failed {
            lane.conns.state[s] = State::Dead;
            let reconnect = lane.conns.flags[s] & RECONNECT != 0;
            let meta = lane.meta.get(s).copied();
            // The socket may exist (a failed bind or connect): free the slot's file. The chain
            // is over, so nothing of it waits.
            if let Err(e) = lane.ring.close(slot, &[]) {
                self.errors.add(os(Op::Submit, &e));
            }
            self.failed(reconnect);
            if let Some(m) = meta {
                self.after_end(m.index, m.room, ErrorKind::Named("dial_failed"), false);
            }
            self.give_back_pair(li, slot);
            self.release(li, slot);
            return;
        }
        lane.conns.state[s] = State::Upgrading;
        self.c[Stat::Open] += 1;
        match lane.ring.poll_readable(slot) {
            Ok(()) => lane.conns.flags[s] |= POLL,
            Err(e) => self.kill(li, slot, os(Op::Submit, &e)),
        }
    }

    /// A connection ended before joining.
    fn failed(&mut self, reconnect: bool) {
        self.c[Stat::Failed] += 1;
        if reconnect {
            self.c[Stat::ReconnectsFailed] += 1;
        }
    }

    /// Tells the scenario connection `index` (of `room`) ended, and queues it to be opened
    /// again if it asks; returns whether the end was expected (no error).
    fn after_end(&mut self, index: u64, room: u32, why: ErrorKind, joined: bool) -> bool {
        let e = self.reads.ended(index, why, joined);
        if let Some(after) = e.reopen_after {
            self.reopens.push(Reopen { at: Instant::now() + after, index, room });
        }
        e.expected
    }

    /// The socket is readable (data, EOF or an error): receive unless a receive is out.
    fn on_poll(&mut self, li: usize, cqe: &Cqe) {
        let slot = cqe.index();
        let Some(lane) = self.lanes.get_mut(li) else { return };
        let s = slot as usize;
        let Some(flags) = lane.conns.flags.get_mut(s) else { return };
        if !cqe.more() {
            *flags &= !POLL;
        }
        if !is_live(lane.conns.state.get(s).copied()) {
            self.release(li, slot);
            return;
        }
        if cqe.result < 0 {
            self.kill(li, slot, ErrorKind::Os(Op::Poll, -cqe.result));
            return;
        }
        let mut result = Ok(());
        if lane.conns.flags[s] & STALL != 0 {
            // Stalled: readiness (data, or the server's close) is ignored; nothing is read.
            return;
        }
        if lane.conns.flags[s] & RECV != 0 {
            lane.conns.flags[s] |= POLL_AGAIN;
        } else {
            result = lane.want_recv(slot);
        }
        if result.is_ok() && !cqe.more() {
            result = lane.ring.poll_readable(slot);
            if result.is_ok() {
                lane.conns.flags[s] |= POLL;
            }
        }
        if let Err(e) = result {
            self.kill(li, slot, os(Op::Submit, &e));
        }
    }

    /// Bytes (or EOF, or nothing yet, or an error) for one connection.
    fn on_recv(&mut self, li: usize, cqe: &Cqe) {
        let slot = cqe.index();
        let s = slot as usize;
        let Some(lane) = self.lanes.get_mut(li) else { return };
        lane.recvs_in_flight = lane.recvs_in_flight.saturating_sub(1);
        let Some(flags) = lane.conns.flags.get_mut(s) else { return };
        *flags &= !RECV;
        let live = is_live(lane.conns.state.get(s).copied());
        let mut failure = None;
        if let Some(bid) = cqe.buffer() {
            if live && cqe.result > 0 {
                let Lane { ring, conns, reads, .. } = lane;
                let got = match ring.buffer(bid, cqe.result as usize) {
                    Some(bytes) => self.reads.absorb(reads, conns, slot, bytes, &mut self.c),
                    None => Absorbed { close: Some(ErrorKind::Os(Op::Recv, libc::EFAULT)), ..Absorbed::default() },
                };
                failure = got.close;
                if got.stall && failure.is_none() {
                    lane.conns.flags[s] |= STALL;
                } else if got.pong && failure.is_none() {
                    pong(lane, slot, &mut self.errors);
                }
                if let (Some(hello), None) = (got.hello, failure) {
                    // Sent as a ping is (its completion clears the same flag); the join comes
                    // long before any ping could.
                    lane.conns.flags[s] |= PING;
                    if let Err(e) = lane.ring.send_static(slot, Tag::Ping, hello) {
                        lane.conns.flags[s] &= !PING;
                        self.errors.add(os(Op::Submit, &e));
                    }
                }
            }
            lane.ring.recycle(bid);
        }
        if live {
            self.after_recv(li, slot, cqe, failure);
        } else {
            self.release(li, slot);
        }
        self.drain_ready(li);
    }

    /// Closes on EOF or an error; else receives again if there is more to read: the kernel
    /// says so, the poll fired meanwhile, or the buffers ran dry (which the budget prevents).
    fn after_recv(&mut self, li: usize, slot: u32, cqe: &Cqe, failure: Option<ErrorKind>) {
        let failure = failure.or(match cqe.result {
            0 => Some(ErrorKind::Eof),
            r if r == -libc::EAGAIN || r == -libc::ENOBUFS => {
                if r == -libc::ENOBUFS {
                    self.c[Stat::RecvNoBufs] += 1;
                }
                None
            }
            r if r == -libc::ECONNRESET => Some(ErrorKind::Reset),
            r if r < 0 => Some(ErrorKind::Os(Op::Recv, -r)),
            _ if cqe.buffer().is_none() => Some(ErrorKind::Os(Op::Recv, libc::EFAULT)),
            _ => None,
        });
        if let Some(kind) = failure {
            self.kill(li, slot, kind);
            return;
        }
        let Some(lane) = self.lanes.get_mut(li) else { return };
        let flags = &mut lane.conns.flags[slot as usize];
        let again = *flags & POLL_AGAIN != 0;
        *flags &= !POLL_AGAIN;
        if *flags & STALL != 0 {
            return;
        }
        let more = (cqe.result > 0 && cqe.sock_nonempty()) || cqe.result == -libc::ENOBUFS;
        if (more || again)
            && let Err(e) = lane.want_recv(slot)
        {
            self.kill(li, slot, os(Op::Submit, &e));
        }
    }

    /// Issues the receives that waited for budget.
    fn drain_ready(&mut self, li: usize) {
        let reuse = self.churn.is_some();
        while let Some(lane) = self.lanes.get_mut(li)
            && lane.recvs_in_flight < lane.recv_budget()
            && let Some(slot) = lane.ready.pop_front()
        {
            let s = slot as usize;
            if !is_live(lane.conns.state.get(s).copied()) {
                lane.conns.flags[s] &= !RECV;
                if reuse {
                    lane.conns.release(slot);
                }
                continue;
            }
            lane.recvs_in_flight += 1;
            if let Err(e) = lane.ring.recv(slot) {
                lane.recvs_in_flight -= 1;
                lane.conns.flags[s] &= !RECV;
                self.kill(li, slot, os(Op::Submit, &e));
            }
        }
    }

    fn on_ping(&mut self, li: usize, cqe: &Cqe) {
        let s = cqe.index() as usize;
        let Some(lane) = self.lanes.get_mut(li) else { return };
        let Some(flags) = lane.conns.flags.get_mut(s) else { return };
        *flags &= !PING;
        // A failed ping is counted; the read side sees the connection's end and closes it.
        if cqe.result < 0 && is_live(lane.conns.state.get(s).copied()) {
            self.errors.add(ErrorKind::Os(Op::Ping, -cqe.result));
        }
        self.release(li, cqe.index());
    }

    /// Our Close frame went out (or not: the read side then sees the end).
    fn on_bye(&mut self, li: usize, cqe: &Cqe) {
        let s = cqe.index() as usize;
        let Some(lane) = self.lanes.get_mut(li) else { return };
        let Some(flags) = lane.conns.flags.get_mut(s) else { return };
        *flags &= !BYE;
        if cqe.result < 0 && is_live(lane.conns.state.get(s).copied()) {
            self.errors.add(ErrorKind::Os(Op::Bye, -cqe.result));
        }
        self.release(li, cqe.index());
    }

    /// With a churn plan, hands a dead slot back to its lane once nothing of it is in flight.
    fn release(&mut self, li: usize, slot: u32) {
        if self.churn.is_some()
            && let Some(lane) = self.lanes.get_mut(li)
        {
            lane.conns.release(slot);
        }
    }

    /// With a churn plan, the source pair of the connection in `slot` goes to rest.
    fn give_back_pair(&mut self, li: usize, slot: u32) {
        if let Some(churn) = &mut self.churn
            && let Some(meta) = self.lanes.get(li).and_then(|l| l.meta.get(slot as usize))
        {
            churn.pairs.give_back(meta.pair, Instant::now());
        }
    }

    /// Ends a connection: counts why (a churn close the server answered is no error), fixes
    /// the levels, cancels its requests, closes its slot.
    fn kill(&mut self, li: usize, slot: u32, kind: ErrorKind) {
        let s = slot as usize;
        let Some(lane) = self.lanes.get(li) else { return };
        let Some(&state) = lane.conns.state.get(s) else { return };
        let (flags, blocks, meta) = (lane.conns.flags[s], lane.conns.blocks[s], lane.meta.get(s).copied());
        let mut error = true;
        // Some(had joined) when the scenario hears of the end (not for our own closes).
        let mut tell = None;
        match state {
            State::Upgrading | State::Open => {
                self.c.sub(Stat::Open);
                self.c[Stat::Failed] += 1;
                if flags & RECONNECT != 0 {
                    self.c[Stat::ReconnectsFailed] += 1;
                }
                tell = Some(false);
            }
            State::Joined => {
                self.c.sub(Stat::Open);
                self.c.sub(Stat::Joined);
                if blocks > 0 {
                    self.c.sub(Stat::Reached);
                }
                tell = Some(true);
            }
            State::Closing => {
                self.c.sub(Stat::Open);
                self.c.sub(Stat::Closing);
                if matches!(kind, ErrorKind::ClosedByServer(_) | ErrorKind::Eof) {
                    self.c[Stat::ClosesDone] += 1;
                    error = false;
                }
            }
            _ => return,
        }
        if let (Some(joined), Some(m)) = (tell, meta)
            && self.after_end(m.index, m.room, kind, joined)
        {
            error = false;
        }
        let lane = &mut self.lanes[li];
        lane.conns.state[s] = State::Dead;
        if error {
            self.errors.add(kind);
        }
        let flags = lane.conns.flags[s];
        let waiting = [(POLL, Tag::Poll), (PING, Tag::Ping), (BYE, Tag::Bye)];
        let mut tags = [Tag::Poll; 3];
        let mut n = 0;
        for (flag, tag) in waiting {
            if flags & flag != 0 {
                tags[n] = tag;
                n += 1;
            }
        }
        if let Err(e) = lane.ring.close(slot, &tags[..n]) {
            self.errors.add(os(Op::Submit, &e));
        }
        self.give_back_pair(li, slot);
        self.release(li, slot);
    }

    /// A new probe: block counts start again from zero.
    fn check_probe(&mut self) {
        let gen_now = self.shared.probe_gen.load(Ordering::Acquire);
        if gen_now == self.probe_gen {
            return;
        }
        for lane in &mut self.lanes {
            lane.conns.blocks.fill(0);
        }
        self.c[Stat::Reached] = 0;
        self.probe_gen = gen_now;
        self.c[Stat::ProbeGen] = gen_now;
    }

    /// Starts the connections the bucket and the in-flight cap allow; true if any.
    fn ramp(&mut self, now: Instant) -> bool {
        if self.next >= self.plan.count || self.ring_failed {
            self.c[Stat::RampStopped] = 1;
            return false;
        }
        let room = u64::from(self.plan.pending_max).saturating_sub(self.pending());
        let n = self.bucket.take(now, room.min(self.plan.count - self.next));
        for _ in 0..n {
            let i = self.plan.first + self.next;
            self.next += 1;
            self.start_one(i, (i % u64::from(self.plan.rooms)) as u32, false);
        }
        n > 0
    }

    /// How long until the ramp can start another connection (None: not ramping, or blocked
    /// on the pending cap, which completions lift).
    fn ramp_wait(&mut self, now: Instant) -> Option<Duration> {
        if self.next >= self.plan.count || self.ring_failed || self.pending() >= u64::from(self.plan.pending_max) {
            return None;
        }
        Some(self.bucket.wait(now))
    }

    /// Starts the reopens due by `now`, within the in-flight cap; true if any.
    fn reopen(&mut self, now: Instant) -> bool {
        let mut room = u64::from(self.plan.pending_max).saturating_sub(self.pending());
        let mut any = false;
        while room > 0
            && let Some(r) = self.reopens.pop_due(now)
        {
            self.start_one(r.index, r.room, true);
            room -= 1;
            any = true;
        }
        any
    }

    /// How long until the next reopen is due (None: none waits, or the in-flight cap holds
    /// them, which completions lift).
    fn reopen_wait(&self, now: Instant) -> Option<Duration> {
        if self.pending() >= u64::from(self.plan.pending_max) {
            return None;
        }
        self.reopens.wait(now)
    }

    /// Connections started that have neither joined nor failed yet (at least the dials in
    /// flight, so the dial pool, sized `pending_max`, never runs dry).
    fn pending(&self) -> u64 {
        let c = &self.c;
        (c[Stat::Attempted] - (c[Stat::JoinedTotal] + c[Stat::Failed]).min(c[Stat::Attempted]))
            .max(u64::from(self.dials.in_flight()))
    }

    /// Connection `i` into `room`: its source pair (the grid's `i`-th, or with a churn plan
    /// the next rested one), its request (the scenario's, else its room's), a slot, a chain.
    fn start_one(&mut self, i: u64, room: u32, reconnect: bool) {
        self.c[Stat::Attempted] += 1;
        if reconnect {
            self.c[Stat::Reconnects] += 1;
        }
        let pair = match &mut self.churn {
            Some(churn) => churn.pairs.take(Instant::now()),
            None => Some(i),
        };
        let Some((pair, src)) = pair.and_then(|p| Some((p, self.plan.sources.pair(p)?))) else {
            self.failed(reconnect);
            self.errors.add(ErrorKind::NoSlot);
            self.after_end(i, room, ErrorKind::NoSlot, false);
            return;
        };
        let requests: &'static [Vec<u8>] = self.plan.requests;
        let target = &self.plan.targets[(i % self.plan.targets.len() as u64) as usize];
        let slot = self.lane_with_room().and_then(|li| Some((li, self.lanes[li].conns.take_slot()?)));
        let request = self.reads.request(i, room).unwrap_or(&requests[room as usize]);
        let dial = slot.and_then(|(li, slot)| self.dials.start(sockaddr_in(src), li as u32, slot, request));
        let (Some((li, slot)), Some((d, at))) = (slot, dial) else {
            if let Some((li, slot)) = slot {
                // Taken, but no dial context: nothing was pushed for it.
                self.lanes[li].conns.state[slot as usize] = State::Dead;
                self.release(li, slot);
            }
            self.failed(reconnect);
            self.errors.add(ErrorKind::NoSlot);
            if let Some(churn) = &mut self.churn {
                churn.pairs.give_back(pair, Instant::now());
            }
            self.after_end(i, room, ErrorKind::NoSlot, false);
            return;
        };
        let serial = self.churn.as_mut().map_or(0, |c| {
            c.serial = c.serial.wrapping_add(1);
            c.serial
        });
        let lane = &mut self.lanes[li];
        let s = slot as usize;
        lane.conns.state[s] = State::Dialing;
        lane.conns.flags[s] = if reconnect { RECONNECT } else { 0 };
        if let Some(meta) = lane.meta.get_mut(s) {
            *meta = SlotMeta { room, serial, pair, index: i };
        }
        self.reads.start(&mut lane.reads, slot, i);
        // SAFETY: `at` points into the dial pool, which is leaked (never freed), and its entry
        // `d` is not reused or written until `Dials::finish(d)`: `on_dial` calls it only after
        // the chain's fifth and last completion, and the error arm below only when `dial`
        // failed, which pushes all five entries or none.
        match unsafe { lane.ring.dial(slot, d, at, target) } {
            Ok(()) => self.c[Stat::Dialing] += 1,
            Err(e) => {
                self.dials.finish(d);
                lane.conns.state[s] = State::Dead;
                self.failed(reconnect);
                self.errors.add(os(Op::Submit, &e));
                self.give_back_pair(li, slot);
                self.release(li, slot);
                self.after_end(i, room, os(Op::Submit, &e), false);
            }
        }
    }

    /// A lane with a free slot (with a churn plan, released slots count), else a new one
    /// sized for what is left (with a churn plan, full size: its slots are reused).
    fn lane_with_room(&mut self) -> Option<usize> {
        if let Some(li) = self.lanes.iter().position(|l| l.conns.has_room()) {
            return Some(li);
        }
        if self.ring_failed {
            return None;
        }
        // `next` already counts the connection being started.
        let left = (self.plan.count + 1).saturating_sub(self.next).max(1);
        let files = match self.churn {
            Some(_) => self.plan.files_per_ring,
            None => u32::try_from(left).unwrap_or(u32::MAX).min(self.plan.files_per_ring),
        };
        match Ring::new(RingParams { files, ..self.plan.ring }, self.shared.wake.raw()) {
            Ok(ring) => {
                let reads = self.reads.lane(files);
                let meta = if self.churn.is_some() { vec![SlotMeta::default(); files as usize] } else { Vec::new() };
                self.lanes.push(Lane {
                    ring,
                    conns: Conns::new(files),
                    reads,
                    recvs_in_flight: 0,
                    ready: VecDeque::new(),
                    meta,
                });
                self.c[Stat::Rings] += 1;
                Some(self.lanes.len() - 1)
            }
            Err(e) => {
                self.errors.add(os(Op::Ring, &e));
                self.ring_failed = true;
                None
            }
        }
    }

    /// Sends the pings due by `now`; returns how long until the next one (None: not pinging).
    fn ping(&mut self, now: Instant) -> Option<Duration> {
        let interval_ms = self.shared.ping_ms.load(Ordering::Relaxed);
        if interval_ms == 0 {
            self.ping = None;
            return None;
        }
        let files = u64::from(self.plan.files_per_ring);
        let slots: u64 = self.lanes.iter().map(|l| u64::from(l.conns.used())).sum();
        let round = self.ping.get_or_insert(PingRound { start: now, interval_ms, visited: 0 });
        if slots == 0 {
            return Some(IDLE_SLEEP);
        }
        let elapsed_ms = now.saturating_duration_since(round.start).as_millis() as u64;
        let due = (u128::from(elapsed_ms) * u128::from(slots) / u128::from(round.interval_ms)) as u64;
        while round.visited < due {
            // Every lane but the last is full, so a linear index splits by `files`.
            let k = round.visited % slots;
            round.visited += 1;
            let (li, s) = ((k / files) as usize, (k % files) as usize);
            let Some(lane) = self.lanes.get_mut(li) else { continue };
            if lane.conns.state.get(s) != Some(&State::Joined) || lane.conns.flags[s] & (PING | STALL) != 0 {
                continue;
            }
            lane.conns.flags[s] |= PING;
            match lane.ring.send_static(s as u32, Tag::Ping, &PING_FRAME) {
                Ok(()) => self.c[Stat::PingsSent] += 1,
                Err(e) => {
                    lane.conns.flags[s] &= !PING;
                    self.errors.add(os(Op::Submit, &e));
                }
            }
        }
        let per_ping_us = (round.interval_ms * 1000 / slots).max(1000);
        Some(Duration::from_micros(per_ping_us))
    }

    fn submit(&mut self) {
        for lane in &mut self.lanes {
            if let Err(e) = lane.ring.submit() {
                self.errors.add(os(Op::Submit, &e));
            }
            lane.conns.after_submit();
        }
    }

    /// With a churn plan and a rate set: closes the joined connections the bucket allows (and
    /// opens one for each), within the in-flight cap; true if any.
    fn churn(&mut self, now: Instant) -> bool {
        let pending = self.pending();
        let Some(churn) = &mut self.churn else { return false };
        let milli = self.shared.churn_milli_per_s.load(Ordering::Relaxed);
        if milli != churn.rate_milli {
            churn.rate_milli = milli;
            let rate = milli as f64 / 1000.0;
            let burst = (rate * CHURN_BURST_S).clamp(1.0, 65536.0) as u32;
            churn.bucket = (milli > 0).then(|| TokenBucket::new(rate, burst, now));
        }
        let Some(bucket) = &mut churn.bucket else { return false };
        let room = u64::from(self.plan.pending_max).saturating_sub(pending);
        let n = bucket.take(now, room);
        for _ in 0..n {
            self.churn_one(now);
        }
        n > 0
    }

    /// How long until the churn's next close (None: not churning).
    fn churn_wait(&mut self, now: Instant) -> Option<Duration> {
        let churn = self.churn.as_mut()?;
        let bucket = churn.bucket.as_mut().map(|b| b.wait(now));
        [bucket, churn.deadlines.wait(now)].into_iter().flatten().min()
    }

    /// Closes one random joined connection and opens another into its room.
    fn churn_one(&mut self, now: Instant) {
        let files = self.plan.files_per_ring;
        let slots: u64 = self.lanes.iter().map(|l| u64::from(l.conns.used())).sum();
        let Some(churn) = &mut self.churn else { return };
        let mut victim = None;
        for _ in 0..VICTIM_TRIES {
            if slots == 0 {
                break;
            }
            // Every lane has `files` slots (a churn plan sizes them all so).
            let (li, slot) = locate(churn.rng.below(slots), files);
            let lane = &self.lanes[li];
            let s = slot as usize;
            if lane.conns.state[s] == State::Joined && lane.conns.flags[s] & STALL == 0 {
                victim = Some((li, slot, lane.meta[s]));
                break;
            }
        }
        let Some((li, slot, meta)) = victim else {
            self.c[Stat::ChurnSkipped] += 1;
            return;
        };
        let at = now + churn.plan.close_wait;
        churn.deadlines.push(Due { at, lane: li as u32, slot, serial: meta.serial });
        let i = self.plan.first + self.plan.count + churn.reopened;
        churn.reopened += 1;
        self.start_close(li, slot);
        self.start_one(i, meta.room, true);
    }

    /// Sends Close (1000) on a joined connection; the server's answer ends it (`kill`).
    fn start_close(&mut self, li: usize, slot: u32) {
        let lane = &mut self.lanes[li];
        let s = slot as usize;
        lane.conns.state[s] = State::Closing;
        self.c.sub(Stat::Joined);
        if lane.conns.blocks[s] > 0 {
            self.c.sub(Stat::Reached);
        }
        self.c[Stat::Closing] += 1;
        self.c[Stat::Closes] += 1;
        lane.conns.flags[s] |= BYE;
        if let Err(e) = lane.ring.send_static(slot, Tag::Bye, &CLOSE_FRAME) {
            lane.conns.flags[s] &= !BYE;
            self.kill(li, slot, os(Op::Submit, &e));
        }
    }

    /// Closes the connections whose close went unanswered too long.
    fn close_overdue(&mut self, now: Instant) {
        loop {
            let Some(due) = self.churn.as_mut().and_then(|c| c.deadlines.pop_due(now)) else { return };
            let (li, s) = (due.lane as usize, due.slot as usize);
            let Some(lane) = self.lanes.get(li) else { continue };
            if lane.conns.state[s] == State::Closing && lane.meta[s].serial == due.serial {
                self.c[Stat::CloseTimeouts] += 1;
                self.kill(li, due.slot, ErrorKind::Named("close_timeout"));
            }
        }
    }

    fn publish(&mut self) {
        self.reads.publish();
        if let Some(churn) = &self.churn {
            self.c[Stat::PairsResting] = churn.pairs.resting() as u64;
        }
        self.c[Stat::Reopening] = self.reopens.len() as u64;
        self.c[Stat::Errors] = self.errors.total();
        self.shared.store(&self.c);
    }

    /// Sleeps until a completion, news from the main thread, or `timeout`.
    fn sleep(&mut self, timeout: Duration) {
        for lane in &mut self.lanes {
            lane.ring.set_notify(true);
        }
        // A completion posted before notifications went on would not signal: look first.
        if !self.lanes.iter_mut().any(|l| l.ring.has_completions()) {
            self.shared.wake.wait(timeout);
        }
        for lane in &mut self.lanes {
            lane.ring.set_notify(false);
        }
    }
}

/// Answers a server's ping with an empty pong, unless a ping or pong send is already out
/// (one is as good as another to a server checking liveness).
fn pong<L>(lane: &mut Lane<L>, slot: u32, errors: &mut ErrorCounts) {
    let s = slot as usize;
    if lane.conns.flags[s] & PING != 0 {
        return;
    }
    lane.conns.flags[s] |= PING;
    if let Err(e) = lane.ring.send_static(slot, Tag::Ping, &PONG_FRAME) {
        lane.conns.flags[s] &= !PING;
        errors.add(os(Op::Submit, &e));
    }
}

/// The `connect` scenario's reads: each connection's head and frames, counted as they pass
/// (welcomes, blocks, pongs), payloads skipped.
pub struct ConnectReads {
    pub protocol: Subprotocol,
}

impl ConnectReads {
    /// Bytes of user memory per connection slot: the loop's state and the frame reader.
    pub const fn bytes_per_slot() -> usize {
        Conns::bytes_per_slot() + std::mem::size_of::<Reader>()
    }
}

impl Reads for ConnectReads {
    type Lane = Vec<Reader>;

    fn lane(&mut self, capacity: u32) -> Vec<Reader> {
        vec![Reader::default(); capacity as usize]
    }

    fn start(&mut self, lane: &mut Vec<Reader>, slot: u32, _index: u64) {
        lane[slot as usize] = Reader::default();
    }

    fn absorb(
        &mut self,
        lane: &mut Vec<Reader>,
        conns: &mut Conns,
        slot: u32,
        bytes: &[u8],
        c: &mut Counters,
    ) -> Absorbed {
        let close = absorb(&mut lane[slot as usize], conns, slot as usize, bytes, self.protocol, c);
        Absorbed { close, ..Absorbed::default() }
    }
}

/// Runs one read through a connection's reader and state; returns why to close it, if so.
fn absorb(
    reader: &mut Reader,
    conns: &mut Conns,
    s: usize,
    bytes: &[u8],
    protocol: Subprotocol,
    c: &mut Counters,
) -> Option<ErrorKind> {
    let Conns { state, blocks, flags: conns_flags, .. } = conns;
    let mut close = None;
    let fed = reader.feed(bytes, |e| match e {
        Event::Upgraded => {
            c[Stat::Handshakes] += 1;
            if state[s] == State::Upgrading {
                state[s] = State::Open;
            }
        }
        Event::Frame(f) => {
            c[Stat::Frames] += 1;
            match f.kind(protocol) {
                Kind::Welcome if state[s] == State::Open => {
                    state[s] = State::Joined;
                    c[Stat::Joined] += 1;
                    c[Stat::JoinedTotal] += 1;
                    if conns_flags[s] & RECONNECT != 0 {
                        c[Stat::ReconnectsJoined] += 1;
                    }
                }
                Kind::Block => {
                    c[Stat::Blocks] += 1;
                    if state[s] == State::Joined {
                        blocks[s] = blocks[s].saturating_add(1);
                        if blocks[s] == 1 {
                            c[Stat::Reached] += 1;
                        }
                    }
                }
                Kind::Pong => c[Stat::Pongs] += 1,
                Kind::Close if close.is_none() => close = Some(ErrorKind::ClosedByServer(f.close_code())),
                _ => {}
            }
        }
    });
    match fed {
        Err(ReadError::Head(h)) => Some(ErrorKind::Head(h)),
        Err(ReadError::Frame(f)) => Some(ErrorKind::Frame(f)),
        Ok(()) => close,
    }
}

fn is_live(state: Option<State>) -> bool {
    matches!(state, Some(State::Upgrading | State::Open | State::Joined | State::Closing))
}

fn op_of(tag: Tag) -> Op {
    match tag {
        Tag::Socket => Op::Socket,
        Tag::SockOpt => Op::SockOpt,
        Tag::Bind => Op::Bind,
        Tag::Connect => Op::Connect,
        Tag::Upgrade => Op::Upgrade,
        Tag::Poll => Op::Poll,
        Tag::Recv => Op::Recv,
        Tag::Ping => Op::Ping,
        Tag::Bye => Op::Bye,
        Tag::Cancel | Tag::Close => Op::Submit,
    }
}

fn os(op: Op, e: &std::io::Error) -> ErrorKind {
    ErrorKind::Os(op, e.raw_os_error().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_totals_and_takes_the_minimum_of_flags() {
        let mut a = Counters::default();
        a[Stat::Open] = 3;
        a[Stat::RampStopped] = 1;
        a[Stat::ProbeGen] = 2;
        let mut b = Counters::default();
        b[Stat::Open] = 4;
        b[Stat::RampStopped] = 0;
        b[Stat::ProbeGen] = 2;
        let mut all = Counters::zero_for_merge();
        all.merge(&a);
        all.merge(&b);
        assert_eq!(all[Stat::Open], 7);
        assert_eq!(all[Stat::RampStopped], 0);
        assert_eq!(all[Stat::ProbeGen], 2);
    }

    #[test]
    fn a_connect_connection_costs_a_few_dozen_bytes() {
        assert_eq!(ConnectReads::bytes_per_slot(), 24);
    }

    #[test]
    fn ramp_is_over_when_every_start_is_resolved() {
        let mut c = Counters::default();
        c[Stat::Attempted] = 10;
        c[Stat::JoinedTotal] = 8;
        c[Stat::Failed] = 2;
        assert!(!c.ramp_over());
        c[Stat::RampStopped] = 1;
        assert!(c.ramp_over());
        c[Stat::Failed] = 1;
        assert!(!c.ramp_over());
    }
}
