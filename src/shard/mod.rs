//! A shard: one thread pinned to one core, driving its rings and its hub. Each loop iteration
//! runs the hub's one turn (`hub::turn`: reap, mail, timers, end of turn, post mail, sends,
//! closes) with this module's io_uring [`Driver`], then publishes counters and sleeps until
//! something happens. Everything here moves bytes between io_uring and the sans-IO hub;
//! decisions live in the hub.
//!
//! At stop, every operation still pending on any ring is cancelled and its last completion
//! awaited before the hub (which owns the frames sends point at) and the rings' buffers are
//! freed (`shutdown`).

pub mod bufring;
pub mod driver;
pub mod listener;
pub mod mesh;
pub mod sendmsg;
pub mod sys;
pub mod uring;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use self::driver::{Cqe, Ring, RingParams};
use self::mesh::Mesh;
use self::sendmsg::{FRAMES_PER_SEND, Slots};
use crate::config::ReadMode;
use crate::hub::mail::Mail;
use crate::hub::turn::{self, Budget, Driver};
use crate::hub::{Hub, HubConfig, Now, Teardown};
use crate::ids::{ConnKey, ShardId, UnixMs};
use crate::metrics::{Series, Snapshot};
use crate::room::durable::StoreOp;
use crate::store::Store;

/// Operation tags in the top byte of user_data.
mod op {
    pub const ACCEPT: u8 = 1;
    pub const RECV: u8 = 2;
    pub const SEND: u8 = 3;
    pub const SENDMSG: u8 = 4;
    pub const WAKE: u8 = 5;
    pub const CANCEL: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const POLL: u8 = 8;
    pub const RECV_ONCE: u8 = 9;
    /// SO_LINGER 0 before an abortive close.
    pub const LINGER: u8 = 10;
    /// Kernel TLS: the `tls` ULP, then the send keys (linked).
    pub const KTLS_ULP: u8 = 11;
    pub const KTLS_TX: u8 = 12;
}

/// user_data = op (8 bits) | aux (24 bits: sendmsg slot or ring) | connection key (32 bits).
const AUX_BITS: u32 = 24;
const AUX_MASK: u32 = (1 << AUX_BITS) - 1;

fn user_data(op: u8, aux: u32, key: u32) -> u64 {
    debug_assert!(aux <= AUX_MASK);
    (u64::from(op) << 56) | (u64::from(aux & AUX_MASK) << 32) | u64::from(key)
}

fn split(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ((ud >> 32) as u32) & AUX_MASK, ud as u32)
}

/// Rings per shard fit the 16 bits `Io` keeps for them, and sendmsg slots (and ring indexes)
/// the 24-bit aux field of user_data; `ShardParams::check` holds the config to these.
pub const RINGS_MAX: usize = 1 << 16;
pub const SENDMSG_SLOTS_MAX: usize = 1 << AUX_BITS;
const _: () = assert!(RINGS_MAX <= SENDMSG_SLOTS_MAX, "a ring index must fit the aux field too");

/// The driver's handle of a connection, kept in the hub's `Conn::io`: ring, slot and which
/// operations are pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Io(u64);

impl Io {
    /// Bits 0..32: the direct-descriptor slot; 32..48: the ring; 48..55: the flags below.
    const RING_SHIFT: u32 = 32;
    const RING_MASK: u64 = 0xFFFF;
    /// The armed input request (multishot poll or multishot receive) is pending.
    const RECV: u64 = 1 << 48;
    const SEND: u64 = 1 << 49;
    const CANCEL: u64 = 1 << 50;
    const TERM: u64 = 1 << 51;
    /// Poll mode: a one-shot receive is in flight.
    const READ: u64 = 1 << 52;
    /// Poll mode: readiness arrived while that receive was in flight; read again after it.
    const AGAIN: u64 = 1 << 53;
    /// Ending with `Teardown::Reset`: SO_LINGER 0 before the close.
    const RESET: u64 = 1 << 54;
    /// The send in flight is a sendmsg (its user_data carries a slot the connection does not
    /// keep, so it is cancelled by descriptor).
    const MSG: u64 = 1 << 55;
    /// The kernel-TLS setsockopts are in flight (they read the hub's `crypto_info`).
    const KTLS: u64 = 1 << 56;
    const FLAGS: u64 =
        Io::RECV | Io::SEND | Io::CANCEL | Io::TERM | Io::READ | Io::AGAIN | Io::RESET | Io::MSG | Io::KTLS;

    fn new(ring: usize, slot: u32) -> Io {
        debug_assert!(ring < RINGS_MAX);
        Io(((ring as u64 & Io::RING_MASK) << Io::RING_SHIFT) | u64::from(slot))
    }
    fn ring(self) -> usize {
        ((self.0 >> Io::RING_SHIFT) & Io::RING_MASK) as usize
    }
    fn slot(self) -> u32 {
        self.0 as u32
    }
    fn has(self, f: u64) -> bool {
        self.0 & f != 0
    }
    fn with(self, f: u64) -> Io {
        Io(self.0 | f)
    }
    fn without(self, f: u64) -> Io {
        Io(self.0 & !f)
    }
}

// The flags sit above the ring bits, and the ring field holds RINGS_MAX rings.
const _: () = assert!(Io::FLAGS & (Io::RING_MASK << Io::RING_SHIFT) == 0);
const _: () = assert!(Io::FLAGS & 0xFFFF_FFFF == 0);
const _: () = assert!(Io::RING_MASK + 1 == RINGS_MAX as u64);

/// Accepts kept in flight per shard (at least one per listener), each with its own buffer for
/// the peer's address (a multishot accept would write every peer's address to one buffer).
/// Enough that a connect storm keeps the listener drained between two reaps.
const ACCEPTS_IN_FLIGHT: usize = 16;

/// Accept moves to another ring this many slots before its table is full: an eighth of the
/// table, because in a connect storm the kernel can accept hundreds of connections between two
/// reaps, and one accepted into a full table is lost (counted as `ring_full`).
pub fn accept_margin(files_max: u32) -> u32 {
    (files_max / 8).clamp(1, 4096)
}
/// Longest sleep without a reason to wake.
const SLEEP_MAX: Duration = Duration::from_millis(500);
/// The loop's load is measured over windows this long.
const LOAD_WINDOW: Duration = Duration::from_millis(50);
/// Counters are copied for the metrics endpoint at most this often while the shard is busy,
/// and whenever it goes to sleep.
const PUBLISH_EVERY_MS: u64 = 50;
/// At stop, how long to wait for cancelled operations to finish before giving up on them
/// (their memory is then leaked, never freed under the kernel).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// What a shard needs beyond its hub's config.
#[derive(Clone, Debug)]
pub struct ShardParams {
    pub ring: RingParams,
    pub read_mode: ReadMode,
    pub rings_max: usize,
    pub sendmsg_slots_max: usize,
    pub stop_grace: Duration,
}

/// How a shard ended: operations it had to wait for at stop, and whether all finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardExit {
    /// Operations pending on the rings when the shard stopped (all cancelled, then awaited).
    pub ops_awaited: usize,
    /// Of those, sends still writing frames the hub owns.
    pub sends_awaited: usize,
    /// Every operation finished before the memory was freed (else it was leaked).
    pub finished: bool,
}

/// One shard's loop state.
pub struct Shard {
    // Declared (and so dropped) before the hub: the rings are torn down before the frames
    // their sends name are freed — and `shutdown` has waited for every operation before that.
    io: ShardIo,
    hub: Hub,
    metrics: Arc<[Snapshot]>,
    start: Instant,
    last_publish_ms: u64,
    stop_at: Option<u64>,
    stop_grace: Duration,
    /// Load measure: time slept in the current window, and its start.
    slept: Duration,
    load_window_start: Instant,
    load: u32,
}

/// One accept in flight and the buffer it writes its peer's address to.
struct AcceptSlot {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
    /// The ring it is armed on.
    ring: Option<usize>,
    /// Cancelled at stop and not yet completed: not to be armed again.
    cancelled: bool,
}

impl Default for AcceptSlot {
    fn default() -> Self {
        // SAFETY: sockaddr_storage is plain old data (integers and byte arrays): all zeros is
        // a valid value (family AF_UNSPEC).
        let addr = unsafe { std::mem::zeroed() };
        AcceptSlot { addr, len: 0, ring: None, cancelled: false }
    }
}

impl AcceptSlot {
    /// The peer's address the completed accept wrote.
    fn peer(&self) -> Option<SocketAddr> {
        let len = usize::try_from(self.len).ok()?;
        let storage = &self.addr as *const libc::sockaddr_storage;
        match i32::from(self.addr.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote an AF_INET address of at least that size into the
                // storage, which is larger and aligned for every sockaddr type.
                let sin = unsafe { &*storage.cast::<libc::sockaddr_in>() };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for AF_INET6.
                let sin6 = unsafe { &*storage.cast::<libc::sockaddr_in6>() };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
            }
            _ => None,
        }
    }
}

/// The shard's io_uring side: its rings, listener, inbox and sendmsg slots. The hub's
/// `Driver`.
struct ShardIo {
    id: ShardId,
    // The rings first: dropped before the memory their operations name (buffers, wake_buf,
    // slots).
    rings: Vec<Ring>,
    /// Its own SO_REUSEPORT listener, or those taken over from the process this one replaced
    /// (their queued connections included): accept slot `i` takes from `listeners[i % n]`.
    listeners: Vec<socket2::Socket>,
    /// The accepts in flight: where each writes its peer's address, and the ring it is armed
    /// on. Boxed so the addresses never move while the kernel may write them.
    accepts: Box<[AcceptSlot]>,
    mesh: Arc<Mesh>,
    wake_buf: Box<[u8; 8]>,
    slots: Slots,
    cqes: Vec<Cqe>,
    ring_params: RingParams,
    read_mode: ReadMode,
    rings_max: usize,
    /// Stopping: completions are taken in, nothing new is armed.
    shutting_down: bool,
    /// Durable storage's queues (with `redis.url`).
    store: Option<Arc<Store>>,
}

impl Shard {
    /// Builds the first ring; the shard accepts on `listeners` (at least one). Call on the
    /// shard's own thread: rings are single-issuer.
    pub fn new(
        hub_config: HubConfig,
        params: ShardParams,
        listeners: Vec<socket2::Socket>,
        mesh: Arc<Mesh>,
        metrics: Arc<[Snapshot]>,
        store: Option<Arc<Store>>,
    ) -> io::Result<Shard> {
        let id = hub_config.shard;
        if listeners.is_empty() {
            return Err(io::Error::other("a shard needs a listener"));
        }
        let ring = Ring::new(params.ring, None)?;
        let io = ShardIo {
            id,
            rings: vec![ring],
            accepts: (0..ACCEPTS_IN_FLIGHT.max(listeners.len())).map(|_| AcceptSlot::default()).collect(),
            listeners,
            mesh,
            wake_buf: Box::new([0; 8]),
            slots: Slots::new(params.sendmsg_slots_max),
            cqes: Vec::with_capacity(4096),
            ring_params: params.ring,
            read_mode: params.read_mode,
            rings_max: params.rings_max,
            shutting_down: false,
            store,
        };
        Ok(Shard {
            io,
            hub: Hub::new(hub_config),
            metrics,
            start: Instant::now(),
            last_publish_ms: 0,
            stop_at: None,
            stop_grace: params.stop_grace,
            slept: Duration::ZERO,
            load_window_start: Instant::now(),
            load: 0,
        })
    }

    /// Takes over rooms and replicas from the process this one replaces (before `run`).
    pub fn import(&mut self, rooms: Vec<crate::proto::RoomState>, replicas: Vec<crate::room::owner::Replica>) {
        let now = self.now();
        self.hub.import(rooms, replicas, now);
    }

    /// Runs until stopped by `HostMail::Stop` and drained (or the grace period ends), then
    /// finishes every pending operation (see `shutdown`).
    pub fn run(mut self) -> io::Result<ShardExit> {
        self.io.arm_wake()?;
        self.io.arm_accepts(&mut self.hub)?;
        loop {
            let now = self.now();
            turn::turn(&mut self.hub, &mut self.io, now, Budget::SHARD)?;
            if self.hub.draining() {
                self.io.cancel_accepts()?;
            }
            self.publish(now, false);
            if self.stopped(now)? {
                self.publish(now, true);
                return self.shutdown();
            }
            self.wait(now)?;
        }
    }

    fn now(&self) -> Now {
        let ms = self.start.elapsed().as_millis() as u64;
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Now { ms, unix: UnixMs(unix) }
    }

    fn publish(&mut self, now: Now, force: bool) {
        self.hub.count(Series::Turns);
        if force || now.ms >= self.last_publish_ms + PUBLISH_EVERY_MS {
            self.snapshot(now);
        }
    }

    /// Copies the counters to what `/metrics` reads.
    fn snapshot(&mut self, now: Now) {
        self.last_publish_ms = now.ms;
        self.hub.set_gauge(Series::Rings, self.io.rings.len() as u64);
        self.hub.counters().publish(&self.metrics[self.io.id.index()]);
    }

    /// After `HostMail::Stop`: stop accepting, and end once drained or the grace time is over.
    fn stopped(&mut self, now: Now) -> io::Result<bool> {
        if !self.hub.stopping() {
            return Ok(false);
        }
        let grace = self.stop_grace.as_millis() as u64;
        let stop_at = *self.stop_at.get_or_insert(now.ms + grace);
        self.io.cancel_accepts()?;
        Ok(self.hub.connections() == 0 || now.ms >= stop_at)
    }

    /// Cancels every operation still pending on every ring and feeds their completions to the
    /// hub until none is pending: only then may the frames sends point at (the hub's), the
    /// msghdrs (`slots`), the wake buffer and the receive buffers be freed. If the kernel does
    /// not finish them within `SHUTDOWN_WAIT`, that memory is leaked instead.
    fn shutdown(mut self) -> io::Result<ShardExit> {
        self.io.shutting_down = true;
        let mut exit = ShardExit {
            ops_awaited: self.io.rings.iter().map(Ring::pending).sum(),
            sends_awaited: self.hub.sends_in_flight(),
            finished: false,
        };
        for ring in &mut self.io.rings {
            ring.cancel_all(user_data(op::CANCEL, 0, 0))?;
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while Instant::now() < deadline {
            for ring in &mut self.io.rings {
                ring.submit()?;
            }
            let now = self.now();
            self.io.reap(&mut self.hub, now)?;
            if self.io.rings.iter().all(|r| r.pending() == 0) {
                exit.finished = true;
                break;
            }
            self.io.rings[0].submit_and_wait(Duration::from_millis(10))?;
        }
        if exit.finished {
            assert_eq!(self.hub.sends_in_flight(), 0, "every send completed");
        } else {
            eprintln!("barrage: shard {}: operations still pending after {SHUTDOWN_WAIT:?}; leaking", self.io.id.0);
            std::mem::forget(self);
        }
        Ok(exit)
    }

    /// Every LOAD_WINDOW, publishes the share of time the loop did not sleep (smoothed over two
    /// windows) and tells the hub the busiest shard's, so block ticks wait while any shard that
    /// fans them out is saturated.
    fn measure_load(&mut self) {
        let elapsed = self.load_window_start.elapsed();
        if elapsed < LOAD_WINDOW {
            return;
        }
        let busy = 1000 - (self.slept.as_micros() * 1000 / elapsed.as_micros().max(1)).min(1000) as u32;
        self.load = (self.load + busy) / 2;
        self.io.mesh.inbox(self.io.id).set_load(self.load);
        self.hub.handle_load(self.io.mesh.max_load());
        self.slept = Duration::ZERO;
        self.load_window_start = Instant::now();
    }

    /// Submits everything and sleeps until a completion, mail or the next deadline.
    fn wait(&mut self, now: Now) -> io::Result<()> {
        let mut timeout = Duration::from_millis(self.hub.poll_timeout(now)).min(SLEEP_MAX);
        if self.hub.has_ready() {
            timeout = Duration::ZERO;
        }
        if self.hub.has_waiting_mail() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        // About to sleep (up to SLEEP_MAX): `/metrics` shows all this shard has done, not a
        // copy up to PUBLISH_EVERY_MS old (an idle shard takes no turn to publish again).
        if !timeout.is_zero() && self.last_publish_ms != now.ms {
            self.snapshot(now);
        }
        let rings = &mut self.io.rings;
        let inbox = self.io.mesh.inbox(self.io.id);
        let mut sleep = !timeout.is_zero() && inbox.prepare_sleep();
        if sleep {
            // Sub-rings signal the eventfd only while we sleep; look once more after enabling
            // so a completion that landed in between is not slept on.
            for ring in &mut rings[1..] {
                ring.set_notify(true);
            }
            sleep = !rings[1..].iter_mut().any(|r| r.has_completions());
        }
        for ring in &mut rings[1..] {
            ring.submit()?;
        }
        if sleep {
            // Submit first: io_uring runs most sends inline while submitting, and that is work,
            // not sleep, for the load measure (a busy shard lets blocks grow instead of sending
            // more frames).
            rings[0].submit()?;
            let before = Instant::now();
            rings[0].submit_and_wait(timeout)?;
            self.slept += before.elapsed();
        } else {
            rings[0].submit()?;
        }
        inbox.woke();
        for ring in &mut rings[1..] {
            ring.set_notify(false);
        }
        self.measure_load();
        Ok(())
    }
}

impl Driver for ShardIo {
    type Error = io::Error;

    fn reap(&mut self, hub: &mut Hub, now: Now) -> io::Result<()> {
        for r in 0..self.rings.len() {
            let mut cqes = std::mem::take(&mut self.cqes);
            self.rings[r].reap(&mut cqes);
            for cqe in cqes.drain(..) {
                self.complete(hub, r, cqe, now)?;
            }
            self.cqes = cqes;
        }
        Ok(())
    }

    fn next_mail(&mut self) -> Option<Mail> {
        self.mesh.inbox(self.id).pop()
    }

    fn offer_mail(&mut self, to: ShardId, mail: Mail) -> Result<(), Mail> {
        self.mesh.send(to, mail)
    }

    fn offer_store(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        match &self.store {
            Some(store) => store.offer(op),
            None => Err(op),
        }
    }

    /// Turns a ready connection's queued frames into one send (a sendmsg of up to
    /// `FRAMES_PER_SEND` frames when a slot is free and there is more than one).
    fn start_send(&mut self, hub: &mut Hub, key: ConnKey) -> io::Result<()> {
        let io = Io(hub.io(key));
        assert!(!io.has(Io::SEND), "{key:?} listed ready with a send in flight");
        if io.has(Io::TERM) {
            // Ended after it was listed: its queue is gone (`poll_send` would hand out nothing).
            return Ok(());
        }
        let mut bufs: [(*const u8, usize); FRAMES_PER_SEND] = [(std::ptr::null(), 0); FRAMES_PER_SEND];
        let slot = self.slots.alloc();
        let cap = if slot.is_some() { FRAMES_PER_SEND } else { 1 };
        let n = {
            let mut iov = [IoSlice::new(&[]); FRAMES_PER_SEND];
            let n = hub.poll_send(key, &mut iov[..cap]);
            for (b, s) in bufs.iter_mut().zip(&iov[..n]) {
                *b = (s.as_ptr(), s.len());
            }
            n
        };
        // A slot is only used when the send carries more than one frame.
        let slot = match slot {
            Some(s) if n < 2 => {
                self.slots.release(s);
                None
            }
            other => other,
        };
        let ring = &mut self.rings[io.ring()];
        let sent = match slot {
            _ if n == 0 => return Ok(()),
            None => {
                let (ptr, len) = bufs[0];
                // SAFETY: the hub keeps frames handed out by `poll_send` alive and unmoved until
                // `handle_sent` for this connection, which we call from this send's completion;
                // `release` asserts no send is in flight, and `Shard::shutdown` awaits this
                // completion before the hub is dropped.
                unsafe { ring.send(io.slot(), ptr, len as u32, user_data(op::SEND, 0, key.0))? };
                io.with(Io::SEND)
            }
            Some(s) => {
                let hdr = self.slots.fill(s, &bufs[..n]);
                // SAFETY: as above for the frames; the msghdr and its iovecs live in a slot
                // chunk that never moves and is released only by this send's completion (and
                // `slots` outlives the rings: `ShardIo` drops its rings first).
                unsafe { ring.sendmsg(io.slot(), hdr, user_data(op::SENDMSG, s, key.0))? };
                io.with(Io::SEND | Io::MSG)
            }
        };
        hub.set_io(key, sent.0);
        Ok(())
    }

    /// Hands a TLS connection's send keys to the kernel; no send starts until the answer.
    fn start_kernel_tls(&mut self, hub: &mut Hub, key: ConnKey) -> io::Result<()> {
        let io = Io(hub.io(key));
        let Some(info) = hub.kernel_tls_info(key) else { return Ok(()) };
        let (ulp, tx) = (user_data(op::KTLS_ULP, 0, key.0), user_data(op::KTLS_TX, 0, key.0));
        // SAFETY: the hub keeps the info alive and unmoved until `handle_kernel_tls` for this
        // connection, which we call from the `tx` completion; `release` asserts no hand-over is
        // in flight, `finish_if_idle` waits for it (Io::KTLS), and `Shard::shutdown` awaits it
        // before the hub is dropped.
        unsafe { self.rings[io.ring()].kernel_tls(io.slot(), info, ulp, tx)? };
        hub.set_io(key, io.with(Io::KTLS).0);
        Ok(())
    }

    /// Cancels the operations of a connection the hub ended, and closes it (abortively for
    /// `Teardown::Reset`) once none is left.
    fn start_close(&mut self, hub: &mut Hub, key: ConnKey, how: Teardown) -> io::Result<()> {
        let mut io = Io(hub.io(key)).with(Io::TERM);
        if how == Teardown::Reset {
            io = io.with(Io::RESET);
        }
        if (io.has(Io::RECV) || io.has(Io::READ) || io.has(Io::SEND)) && !io.has(Io::CANCEL) {
            self.cancel_ops(key, io)?;
            io = io.with(Io::CANCEL);
        }
        hub.set_io(key, io.0);
        self.finish_if_idle(hub, key, io)
    }
}

impl ShardIo {
    fn complete(&mut self, hub: &mut Hub, r: usize, cqe: Cqe, now: Now) -> io::Result<()> {
        let (tag, aux, key) = split(cqe.user_data);
        let key = ConnKey(key);
        match tag {
            op::ACCEPT => self.accepted(hub, r, aux as usize, cqe, now),
            op::RECV => self.received(hub, r, key, cqe, now),
            op::POLL => self.polled(hub, r, key, cqe, now),
            op::RECV_ONCE => self.received_once(hub, r, key, cqe, now),
            op::SEND | op::SENDMSG => {
                if tag == op::SENDMSG {
                    self.slots.release(aux);
                }
                let io = Io(hub.io(key)).without(Io::SEND | Io::MSG);
                hub.set_io(key, io.0);
                hub.handle_sent(key, cqe.result, now);
                self.finish_if_idle(hub, key, io)
            }
            op::WAKE => self.arm_wake(),
            op::CLOSE => {
                let ring = &mut self.rings[r];
                assert!(ring.files_used > 0, "a close for a slot never taken");
                ring.files_used -= 1;
                self.arm_accepts(hub)
            }
            op::CANCEL => Ok(()),
            // Its failure fails the linked TLS_TX too, which reports it.
            op::KTLS_ULP => Ok(()),
            op::KTLS_TX => {
                let io = Io(hub.io(key)).without(Io::KTLS);
                hub.set_io(key, io.0);
                hub.handle_kernel_tls(key, cqe.result);
                self.finish_if_idle(hub, key, io)
            }
            op::LINGER => {
                // The close linked after it runs anyway, orderly.
                if cqe.result < 0 {
                    hub.count(Series::ResetFailed);
                }
                Ok(())
            }
            other => panic!("a completion with an unknown tag {other}"),
        }
    }

    fn accepted(&mut self, hub: &mut Hub, r: usize, i: usize, cqe: Cqe, now: Now) -> io::Result<()> {
        let slot = &mut self.accepts[i];
        slot.ring = None;
        slot.cancelled = false;
        if cqe.result >= 0 {
            let peer = slot.peer();
            let fd = cqe.result as u32;
            self.rings[r].files_used += 1;
            // A stopping hub takes no connection: one accepted while the accepts were being
            // cancelled is closed at once.
            match hub.handle_accept(Io::new(r, fd).0, peer, now) {
                Some(key) => {
                    self.arm_input(r, fd, key)?;
                    hub.set_io(key, Io::new(r, fd).with(Io::RECV).0);
                }
                None => self.rings[r].close_slot(fd, user_data(op::CLOSE, 0, 0))?,
            }
        } else if cqe.result == -libc::ENFILE {
            hub.count(Series::RefusedNoSlot);
        }
        self.arm_accepts(hub)
    }

    /// Cancels the accepts in flight (stopping or draining: no new connection).
    fn cancel_accepts(&mut self) -> io::Result<()> {
        for (i, slot) in self.accepts.iter_mut().enumerate() {
            if let Some(r) = slot.ring.take() {
                // The slot stays busy until the cancelled accept completes (its buffer with it).
                slot.cancelled = true;
                self.rings[r].cancel_request(user_data(op::ACCEPT, i as u32, 0), user_data(op::CANCEL, 0, 0))?;
            }
        }
        Ok(())
    }

    /// Keeps `ACCEPTS_IN_FLIGHT` accepts armed, each on a ring whose table has room for it (the
    /// margin keeps a storm from filling a table between two reaps), opening a new ring when
    /// every table is near full. Accepting resumes when a close frees a slot.
    fn arm_accepts(&mut self, hub: &mut Hub) -> io::Result<()> {
        if hub.stopping() || hub.draining() || self.shutting_down {
            return Ok(());
        }
        for i in 0..self.accepts.len() {
            if self.accepts[i].ring.is_some() || self.accepts[i].cancelled {
                continue;
            }
            let fd = self.listeners[i % self.listeners.len()].as_raw_fd();
            let armed = |r: usize, accepts: &[AcceptSlot]| accepts.iter().filter(|a| a.ring == Some(r)).count() as u32;
            let room = |r: usize, ring: &Ring| {
                ring.files_used + armed(r, &self.accepts) + accept_margin(ring.files_max) < ring.files_max
            };
            let r = match self.rings.iter().enumerate().position(|(r, ring)| room(r, ring)) {
                Some(r) => r,
                None if self.rings.len() < self.rings_max => {
                    let wake = self.mesh.inbox(self.id).wake_fd();
                    let mut ring = Ring::new(self.ring_params, Some(wake))?;
                    ring.set_notify(false);
                    self.rings.push(ring);
                    hub.set_gauge(Series::Rings, self.rings.len() as u64);
                    self.rings.len() - 1
                }
                None => return Ok(()),
            };
            let slot = &mut self.accepts[i];
            slot.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let (addr, len): (*mut libc::sockaddr_storage, *mut libc::socklen_t) = (&mut slot.addr, &mut slot.len);
            // SAFETY: the slot lives in `accepts`, a boxed slice that never moves or shrinks
            // while the driver lives; it is not touched until this accept completes (`ring`
            // marks it armed), and `Shard::shutdown` awaits that completion before freeing it.
            unsafe { self.rings[r].accept(fd, addr, len, user_data(op::ACCEPT, i as u32, 0))? };
            self.accepts[i].ring = Some(r);
        }
        Ok(())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if self.shutting_down {
            return Ok(());
        }
        let fd = self.mesh.inbox(self.id).wake_fd();
        let buf = self.wake_buf.as_mut_ptr();
        // SAFETY: `wake_buf` is a heap allocation owned by this driver, never read or moved
        // while the read is pending; `Shard::shutdown` awaits the read's completion, and the
        // rings are dropped before it in any case.
        unsafe { self.rings[0].read(fd, buf, 8, user_data(op::WAKE, 0, 0)) }
    }

    /// Cancels a connection's requests in flight by their user_data: the kernel finds each in
    /// its hash of armed requests, where a cancel by descriptor walks every request armed on
    /// the ring (most of the gateway's CPU at 1,000 closes a second with 100,000 connections).
    /// Only a sendmsg in flight, whose slot the connection does not keep, is cancelled by
    /// descriptor. The key cannot name a newer connection meanwhile: it is released only once
    /// every one of these requests has completed.
    fn cancel_ops(&mut self, key: ConnKey, io: Io) -> io::Result<()> {
        let (ring, cancel) = (&mut self.rings[io.ring()], user_data(op::CANCEL, 0, key.0));
        if io.has(Io::RECV) {
            let input = match self.read_mode {
                ReadMode::Poll => op::POLL,
                ReadMode::Recv => op::RECV,
            };
            ring.cancel_request(user_data(input, 0, key.0), cancel)?;
        }
        if io.has(Io::READ) {
            ring.cancel_request(user_data(op::RECV_ONCE, 0, key.0), cancel)?;
        }
        if io.has(Io::SEND) && io.has(Io::MSG) {
            ring.cancel_slot(io.slot(), cancel)?;
        } else if io.has(Io::SEND) {
            ring.cancel_request(user_data(op::SEND, 0, key.0), cancel)?;
        }
        Ok(())
    }

    /// Arms the connection's standing input request, by read mode.
    fn arm_input(&mut self, r: usize, slot: u32, key: ConnKey) -> io::Result<()> {
        match self.read_mode {
            ReadMode::Poll => self.rings[r].poll_multi(slot, user_data(op::POLL, 0, key.0)),
            ReadMode::Recv => self.rings[r].recv_multi(slot, user_data(op::RECV, 0, key.0)),
        }
    }

    /// Poll mode: the socket is readable (or failed). Start a receive unless one is running.
    fn polled(&mut self, hub: &mut Hub, r: usize, key: ConnKey, cqe: Cqe, now: Now) -> io::Result<()> {
        let mut io = Io(hub.io(key));
        if cqe.result < 0 {
            hub.handle_eof(key, now);
        } else if io.has(Io::TERM) || self.shutting_down {
        } else if io.has(Io::READ) {
            io = io.with(Io::AGAIN);
        } else {
            self.rings[r].recv_once(io.slot(), user_data(op::RECV_ONCE, 0, key.0))?;
            io = io.with(Io::READ);
        }
        if !cqe.more() {
            io = io.without(Io::RECV);
            if cqe.result >= 0 && !io.has(Io::TERM) && !self.shutting_down {
                self.rings[r].poll_multi(io.slot(), user_data(op::POLL, 0, key.0))?;
                io = io.with(Io::RECV);
            }
        }
        hub.set_io(key, io.0);
        self.finish_if_idle(hub, key, io)
    }

    /// Poll mode: a one-shot receive completed. Read again while the socket has more.
    fn received_once(&mut self, hub: &mut Hub, r: usize, key: ConnKey, cqe: Cqe, now: Now) -> io::Result<()> {
        let res = cqe.result;
        if res > 0 {
            self.deliver(hub, r, key, &cqe, now);
        } else if res == -libc::ENOBUFS {
            hub.count(Series::RecvNoBuffers);
        } else if res != -libc::EAGAIN {
            // 0 is the peer's FIN; anything else is a reset, an error or our cancel.
            hub.handle_eof(key, now);
        }
        let io = Io(hub.io(key));
        let again = io.has(Io::AGAIN) || (res > 0 && cqe.sock_nonempty()) || res == -libc::ENOBUFS;
        let mut io = io.without(Io::READ).without(Io::AGAIN);
        let readable = res > 0 || res == -libc::EAGAIN || res == -libc::ENOBUFS;
        if again && readable && !io.has(Io::TERM) && !self.shutting_down {
            self.rings[r].recv_once(io.slot(), user_data(op::RECV_ONCE, 0, key.0))?;
            io = io.with(Io::READ);
        }
        hub.set_io(key, io.0);
        self.finish_if_idle(hub, key, io)
    }

    /// Recv mode: a multishot receive delivered bytes, ended, or failed.
    fn received(&mut self, hub: &mut Hub, r: usize, key: ConnKey, cqe: Cqe, now: Now) -> io::Result<()> {
        let res = cqe.result;
        if res > 0 {
            self.deliver(hub, r, key, &cqe, now);
        } else if res == -libc::ENOBUFS {
            hub.count(Series::RecvNoBuffers);
        } else {
            // 0 is the peer's FIN; anything else is a reset or another error.
            hub.handle_eof(key, now);
        }
        if cqe.more() {
            return Ok(());
        }
        let io = Io(hub.io(key)).without(Io::RECV);
        if (res > 0 || res == -libc::ENOBUFS) && !io.has(Io::TERM) && !self.shutting_down {
            // The multishot ended without an error (buffers ran dry): arm it again.
            self.arm_input(io.ring(), io.slot(), key)?;
            hub.set_io(key, io.with(Io::RECV).0);
            return Ok(());
        }
        hub.set_io(key, io.0);
        self.finish_if_idle(hub, key, io)
    }

    /// Hands the bytes a receive put in a provided buffer to the hub, and the buffer back.
    fn deliver(&mut self, hub: &mut Hub, r: usize, key: ConnKey, cqe: &Cqe, now: Now) {
        // A receive with buffer selection that returned bytes names the buffer it filled, within
        // the ring's buffers and their size: anything else is a kernel (or ring setup) bug.
        let Some(bid) = cqe.buffer() else { panic!("a receive of {} bytes without a buffer", cqe.result) };
        let Some(data) = self.rings[r].buffer(bid, cqe.result as usize) else {
            panic!("buffer {bid} does not hold the {} bytes received", cqe.result)
        };
        hub.handle_recv(key, data, now);
        self.rings[r].recycle(bid);
    }

    /// Closes the socket (with SO_LINGER 0 first when the hub asked for a reset) and releases
    /// the connection once it is ending and nothing is pending.
    fn finish_if_idle(&mut self, hub: &mut Hub, key: ConnKey, io: Io) -> io::Result<()> {
        if io.has(Io::TERM) && !io.has(Io::RECV) && !io.has(Io::READ) && !io.has(Io::SEND) && !io.has(Io::KTLS) {
            let (ring, close) = (&mut self.rings[io.ring()], user_data(op::CLOSE, 0, 0));
            if io.has(Io::RESET) {
                ring.close_slot_reset(io.slot(), user_data(op::LINGER, 0, 0), close)?;
            } else {
                ring.close_slot(io.slot(), close)?;
            }
            hub.release(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_and_io_round_trip() {
        let ud = user_data(op::SENDMSG, 0xAB_CDEF, 0xDEAD_BEEF);
        assert_eq!(split(ud), (op::SENDMSG, 0xAB_CDEF, 0xDEAD_BEEF));
        let io = Io::new(RINGS_MAX - 1, 19_999).with(Io::RECV).with(Io::TERM).with(Io::RESET);
        assert_eq!((io.ring(), io.slot()), (RINGS_MAX - 1, 19_999));
        assert!(io.has(Io::RECV) && io.has(Io::TERM) && !io.has(Io::SEND));
        assert!(!io.without(Io::RECV).has(Io::RECV));
        assert_eq!(io.without(Io::FLAGS), Io::new(RINGS_MAX - 1, 19_999));
    }
}
