//! A shard: one thread pinned to one core, driving its rings and its hub. The loop's rhythm:
//! reap completions from every ring, drain the inbox, run the tick, flush, turn ready
//! connections into sends, close what ended, submit once, sleep until something happens.
//! Everything here moves bytes between io_uring and the sans-IO hub; decisions live in the hub.

pub mod bufring;
pub mod driver;
pub mod listener;
pub mod mesh;
pub mod sendmsg;
pub mod sys;
pub mod uring;

use std::collections::VecDeque;
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
use crate::hub::{Hub, HubConfig, Now};
use crate::ids::{ShardId, UnixMs};
use crate::metrics::{Series, Snapshot};

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
}

/// user_data = op (8 bits) | aux (24 bits: sendmsg slot or ring) | connection key (32 bits).
fn user_data(op: u8, aux: u32, key: u32) -> u64 {
    (u64::from(op) << 56) | (u64::from(aux & 0xFF_FFFF) << 32) | u64::from(key)
}

fn split(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ((ud >> 32) & 0xFF_FFFF) as u32, ud as u32)
}

/// The driver's handle of a connection, kept in the hub's `Conn::io`: ring, slot and which
/// operations are pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Io(u64);

impl Io {
    /// The armed input request (multishot poll or multishot receive) is pending.
    const RECV: u64 = 1 << 48;
    const SEND: u64 = 1 << 49;
    const CANCEL: u64 = 1 << 50;
    const TERM: u64 = 1 << 51;
    /// Poll mode: a one-shot receive is in flight.
    const READ: u64 = 1 << 52;
    /// Poll mode: readiness arrived while that receive was in flight; read again after it.
    const AGAIN: u64 = 1 << 53;

    fn new(ring: usize, slot: u32) -> Io {
        Io(((ring as u64 & 0xFFFF) << 32) | u64::from(slot))
    }
    fn ring(self) -> usize {
        ((self.0 >> 32) & 0xFFFF) as usize
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

/// Accept moves to another ring this many slots before its table is full: an eighth of the
/// table, because in a connect storm the kernel can accept hundreds of connections between two
/// reaps, and one accepted into a full table is lost (counted as `ring_full`).
pub fn accept_margin(files_max: u32) -> u32 {
    (files_max / 8).clamp(1, 4096)
}
/// Mail handled per turn, so a flood of mail cannot starve the sockets.
const MAIL_PER_TURN: usize = 8192;
/// Sends submitted per turn: completions are reaped between batches, so a block for a huge
/// room does not pile its whole fan-out into the completion queues at once.
const SENDS_PER_TURN: usize = 32 * 1024;
/// Longest sleep without a reason to wake.
const SLEEP_MAX: Duration = Duration::from_millis(500);
/// The loop's load is measured over windows this long.
const LOAD_WINDOW: Duration = Duration::from_millis(50);
/// Counters are copied for the metrics endpoint at most this often.
const PUBLISH_EVERY_MS: u64 = 50;

/// What a shard needs beyond its hub's config.
#[derive(Clone, Debug)]
pub struct ShardParams {
    pub listen: SocketAddr,
    pub backlog: u32,
    pub tcp_keepalive_s: u32,
    pub ring: RingParams,
    pub read_mode: ReadMode,
    pub rings_max: usize,
    pub sendmsg_slots_max: usize,
    pub mesh_backlog_max: usize,
    pub stop_grace: Duration,
}

/// One shard's loop state.
pub struct Shard {
    id: ShardId,
    hub: Hub,
    rings: Vec<Ring>,
    params: ShardParams,
    listener: socket2::Socket,
    /// The ring holding the multishot accept, if armed.
    accept_ring: Option<usize>,
    mesh: Arc<Mesh>,
    metrics: Arc<[Snapshot]>,
    wake_buf: Box<[u8; 8]>,
    slots: Slots,
    cqes: Vec<Cqe>,
    closing: Vec<u32>,
    /// Mail that found its inbox full, retried next turn.
    mail_backlog: VecDeque<(ShardId, Mail)>,
    start: Instant,
    last_publish_ms: u64,
    stop_at: Option<u64>,
    /// Load measure: time slept in the current window, and its start.
    slept: Duration,
    load_window_start: Instant,
    load: u32,
}

impl Shard {
    /// Binds the listener and builds the first ring. Call on the shard's own thread: rings are
    /// single-issuer.
    pub fn new(
        hub_config: HubConfig,
        params: ShardParams,
        mesh: Arc<Mesh>,
        metrics: Arc<[Snapshot]>,
    ) -> io::Result<Shard> {
        let id = hub_config.shard;
        let listener = listener::bind(params.listen, params.backlog, params.tcp_keepalive_s)?;
        let ring = Ring::new(params.ring, None)?;
        let hub = Hub::new(hub_config);
        Ok(Shard {
            id,
            hub,
            rings: vec![ring],
            slots: Slots::new(params.sendmsg_slots_max),
            params,
            listener,
            accept_ring: None,
            mesh,
            metrics,
            wake_buf: Box::new([0; 8]),
            cqes: Vec::with_capacity(4096),
            closing: Vec::new(),
            mail_backlog: VecDeque::new(),
            start: Instant::now(),
            last_publish_ms: 0,
            stop_at: None,
            slept: Duration::ZERO,
            load_window_start: Instant::now(),
            load: 0,
        })
    }

    /// Runs until stopped by `Mail::Stop` and drained (or the grace period ends).
    pub fn run(mut self) -> io::Result<()> {
        self.arm_wake()?;
        self.arm_accept()?;
        loop {
            let now = self.now();
            self.reap(now)?;
            self.read_mail(now);
            if self.hub.next_timeout(now) == 0 {
                self.hub.on_tick(now);
            }
            self.hub.flush(now);
            self.send_mail();
            self.start_sends()?;
            self.start_closes()?;
            self.publish(now, false);
            if self.stopped(now)? {
                self.publish(now, true);
                return Ok(());
            }
            self.wait(now)?;
        }
    }

    fn now(&self) -> Now {
        let ms = self.start.elapsed().as_millis() as u64;
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Now { ms, unix: UnixMs(unix) }
    }

    fn reap(&mut self, now: Now) -> io::Result<()> {
        for r in 0..self.rings.len() {
            let mut cqes = std::mem::take(&mut self.cqes);
            self.rings[r].reap(&mut cqes);
            for cqe in cqes.drain(..) {
                self.complete(r, cqe, now)?;
            }
            self.cqes = cqes;
        }
        Ok(())
    }

    fn complete(&mut self, r: usize, cqe: Cqe, now: Now) -> io::Result<()> {
        let (tag, aux, key) = split(cqe.user_data);
        match tag {
            op::ACCEPT => self.accepted(r, cqe, now)?,
            op::RECV => self.received(r, key, cqe, now)?,
            op::POLL => self.polled(r, key, cqe)?,
            op::RECV_ONCE => self.received_once(r, key, cqe, now)?,
            op::SEND | op::SENDMSG => {
                if tag == op::SENDMSG {
                    self.slots.release(aux);
                }
                self.sent(key, cqe.result)?;
            }
            op::WAKE => self.arm_wake()?,
            op::CLOSE => {
                let ring = &mut self.rings[r];
                ring.files_used = ring.files_used.saturating_sub(1);
                if self.accept_ring.is_none() {
                    self.arm_accept()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn accepted(&mut self, r: usize, cqe: Cqe, now: Now) -> io::Result<()> {
        if !cqe.more() && self.accept_ring == Some(r) {
            self.accept_ring = None;
        }
        if cqe.result >= 0 {
            let slot = cqe.result as u32;
            self.rings[r].files_used += 1;
            match self.hub.open(Io::new(r, slot).0, now) {
                Some(key) => {
                    self.arm_input(r, slot, key)?;
                    self.hub.set_io(key, Io::new(r, slot).with(Io::RECV).0);
                }
                None => self.rings[r].close_slot(slot, user_data(op::CLOSE, 0, 0))?,
            }
            let ring = &self.rings[r];
            if self.accept_ring == Some(r) && ring.files_used + accept_margin(ring.files_max) >= ring.files_max {
                // Move the accept before this table fills; the old one ends with ECANCELED.
                self.rings[r].cancel_request(user_data(op::ACCEPT, r as u32, 0), user_data(op::CANCEL, 0, 0))?;
                self.accept_ring = None;
            }
        } else if cqe.result == -libc::ENFILE {
            self.hub.counters().inc(Series::RefusedNoSlot);
        }
        if self.accept_ring.is_none() {
            self.arm_accept()?;
        }
        Ok(())
    }

    /// Arms the multishot accept on a ring with free slots, opening a new ring if all are full.
    fn arm_accept(&mut self) -> io::Result<()> {
        if self.hub.stopping() || self.accept_ring.is_some() {
            return Ok(());
        }
        let free = |ring: &Ring| ring.files_used + accept_margin(ring.files_max) < ring.files_max;
        let r = match self.rings.iter().position(free) {
            Some(r) => r,
            None if self.rings.len() < self.params.rings_max => {
                let wake = self.mesh.inbox(self.id).wake_fd();
                let mut ring = Ring::new(self.params.ring, Some(wake))?;
                ring.set_notify(false);
                self.rings.push(ring);
                self.hub.counters().set(Series::Rings, self.rings.len() as u64);
                self.rings.len() - 1
            }
            // Every ring is full: accepting resumes when a close frees a slot.
            None => return Ok(()),
        };
        let fd = self.listener.as_raw_fd();
        self.rings[r].accept_multi(fd, user_data(op::ACCEPT, r as u32, 0))?;
        self.accept_ring = Some(r);
        Ok(())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.mesh.inbox(self.id).wake_fd();
        let buf = self.wake_buf.as_mut_ptr();
        // SAFETY: `wake_buf` is a heap allocation owned by this shard, never read or moved
        // while the read is pending, and it outlives ring 0 (the shard drops both together,
        // and the ring is torn down first as the kernel then drops the read).
        unsafe { self.rings[0].read(fd, buf, 8, user_data(op::WAKE, 0, 0)) }
    }

    /// Arms the connection's standing input request, by read mode.
    fn arm_input(&mut self, r: usize, slot: u32, key: u32) -> io::Result<()> {
        match self.params.read_mode {
            ReadMode::Poll => self.rings[r].poll_multi(slot, user_data(op::POLL, 0, key)),
            ReadMode::Recv => self.rings[r].recv_multi(slot, user_data(op::RECV, 0, key)),
        }
    }

    /// Poll mode: the socket is readable (or failed). Start a receive unless one is running.
    fn polled(&mut self, r: usize, key: u32, cqe: Cqe) -> io::Result<()> {
        let Some(mut io) = self.hub.io(key).map(Io) else { return Ok(()) };
        if cqe.result < 0 {
            self.hub.on_eof(key);
        } else if io.has(Io::TERM) {
        } else if io.has(Io::READ) {
            io = io.with(Io::AGAIN);
        } else {
            self.rings[r].recv_once(io.slot(), user_data(op::RECV_ONCE, 0, key))?;
            io = io.with(Io::READ);
        }
        if !cqe.more() {
            io = io.without(Io::RECV);
            if cqe.result >= 0 && !io.has(Io::TERM) {
                self.rings[r].poll_multi(io.slot(), user_data(op::POLL, 0, key))?;
                io = io.with(Io::RECV);
            }
        }
        self.hub.set_io(key, io.0);
        self.finish_if_idle(key, io)
    }

    /// Poll mode: a one-shot receive completed. Read again while the socket has more.
    fn received_once(&mut self, r: usize, key: u32, cqe: Cqe, now: Now) -> io::Result<()> {
        let res = cqe.result;
        if res > 0
            && let Some(bid) = cqe.buffer()
        {
            if let Some(data) = self.rings[r].buffer(bid, res as usize) {
                self.hub.on_recv(key, data, now);
            }
            self.rings[r].recycle(bid);
        } else if res == -libc::ENOBUFS {
            self.hub.counters().inc(Series::RecvNoBuffers);
        } else if res != -libc::EAGAIN {
            // 0 is the peer's FIN; anything else is a reset, an error or our cancel.
            self.hub.on_eof(key);
        }
        let Some(io) = self.hub.io(key).map(Io) else { return Ok(()) };
        let again = io.has(Io::AGAIN) || (res > 0 && cqe.sock_nonempty()) || res == -libc::ENOBUFS;
        let mut io = io.without(Io::READ).without(Io::AGAIN);
        if again && (res > 0 || res == -libc::EAGAIN || res == -libc::ENOBUFS) && !io.has(Io::TERM) {
            self.rings[r].recv_once(io.slot(), user_data(op::RECV_ONCE, 0, key))?;
            io = io.with(Io::READ);
        }
        self.hub.set_io(key, io.0);
        self.finish_if_idle(key, io)
    }

    /// Recv mode: a multishot receive delivered bytes, ended, or failed.
    fn received(&mut self, r: usize, key: u32, cqe: Cqe, now: Now) -> io::Result<()> {
        let res = cqe.result;
        if res > 0 {
            if let Some(bid) = cqe.buffer() {
                if let Some(data) = self.rings[r].buffer(bid, res as usize) {
                    self.hub.on_recv(key, data, now);
                }
                self.rings[r].recycle(bid);
            }
        } else if res == -libc::ENOBUFS {
            self.hub.counters().inc(Series::RecvNoBuffers);
        } else {
            // 0 is the peer's FIN; anything else is a reset or another error.
            self.hub.on_eof(key);
        }
        if cqe.more() {
            return Ok(());
        }
        let Some(io) = self.hub.io(key).map(Io) else { return Ok(()) };
        let io = io.without(Io::RECV);
        if (res > 0 || res == -libc::ENOBUFS) && !io.has(Io::TERM) {
            // The multishot ended without an error (buffers ran dry): arm it again.
            self.arm_input(io.ring(), io.slot(), key)?;
            self.hub.set_io(key, io.with(Io::RECV).0);
            return Ok(());
        }
        self.hub.set_io(key, io.0);
        self.finish_if_idle(key, io)
    }

    fn sent(&mut self, key: u32, result: i32) -> io::Result<()> {
        let Some(io) = self.hub.io(key).map(Io) else { return Ok(()) };
        let io = io.without(Io::SEND);
        self.hub.set_io(key, io.0);
        self.hub.on_sent(key, result);
        self.finish_if_idle(key, io)
    }

    /// Turns every ready connection's queued frames into one send each.
    fn start_sends(&mut self) -> io::Result<()> {
        let mut bufs: [(*const u8, usize); FRAMES_PER_SEND] = [(std::ptr::null(), 0); FRAMES_PER_SEND];
        for _ in 0..SENDS_PER_TURN {
            let Some(key) = self.hub.pop_ready() else { break };
            let Some(io) = self.hub.io(key).map(Io) else { continue };
            if io.has(Io::SEND) || io.has(Io::TERM) {
                continue;
            }
            let slot = self.slots.alloc();
            let cap = if slot.is_some() { FRAMES_PER_SEND } else { 1 };
            let n = {
                let mut iov = [IoSlice::new(&[]); FRAMES_PER_SEND];
                let n = self.hub.next_send(key, &mut iov[..cap]);
                for (b, s) in bufs.iter_mut().zip(&iov[..n]) {
                    *b = (s.as_ptr(), s.len());
                }
                n
            };
            let ring = &mut self.rings[io.ring()];
            // A slot is only used when the send carries more than one frame.
            let slot = match slot {
                Some(s) if n < 2 => {
                    self.slots.release(s);
                    None
                }
                other => other,
            };
            match slot {
                _ if n == 0 => continue,
                None => {
                    let (ptr, len) = bufs[0];
                    // SAFETY: the hub keeps frames handed out by `next_send` alive and unmoved
                    // until `on_sent` for this connection, which we call from this send's
                    // completion (or after its cancellation completes).
                    unsafe { ring.send(io.slot(), ptr, len as u32, user_data(op::SEND, 0, key))? };
                }
                Some(s) => {
                    let hdr = self.slots.fill(s, &bufs[..n]);
                    // SAFETY: as above for the frames; the msghdr and its iovecs live in a slot
                    // chunk that never moves and is released only by this send's completion.
                    unsafe { ring.sendmsg(io.slot(), hdr, user_data(op::SENDMSG, s, key))? };
                }
            }
            self.hub.set_io(key, io.with(Io::SEND).0);
        }
        Ok(())
    }

    /// Cancels the operations of connections the hub ended, and closes those with none left.
    fn start_closes(&mut self) -> io::Result<()> {
        self.hub.take_terminating(&mut self.closing);
        let closing = std::mem::take(&mut self.closing);
        for &key in &closing {
            let Some(io) = self.hub.io(key).map(Io) else { continue };
            let mut io = io.with(Io::TERM);
            if (io.has(Io::RECV) || io.has(Io::READ) || io.has(Io::SEND)) && !io.has(Io::CANCEL) {
                self.rings[io.ring()].cancel_slot(io.slot(), user_data(op::CANCEL, 0, key))?;
                io = io.with(Io::CANCEL);
            }
            self.hub.set_io(key, io.0);
            self.finish_if_idle(key, io)?;
        }
        self.closing = closing;
        self.closing.clear();
        Ok(())
    }

    /// Closes the socket and forgets the connection once it is ending and nothing is pending.
    fn finish_if_idle(&mut self, key: u32, io: Io) -> io::Result<()> {
        if io.has(Io::TERM) && !io.has(Io::RECV) && !io.has(Io::READ) && !io.has(Io::SEND) {
            self.rings[io.ring()].close_slot(io.slot(), user_data(op::CLOSE, 0, 0))?;
            self.hub.release(key);
        }
        Ok(())
    }

    fn read_mail(&mut self, now: Now) {
        let inbox = self.mesh.inbox(self.id);
        for _ in 0..MAIL_PER_TURN {
            let Some(mail) = inbox.pop() else { break };
            self.hub.on_mail(mail, now);
        }
    }

    fn send_mail(&mut self) {
        let mesh = &self.mesh;
        let mut retry = std::mem::take(&mut self.mail_backlog);
        retry.extend(self.hub.take_mail());
        for (to, mail) in retry.drain(..) {
            if let Err(mail) = mesh.send(to, mail) {
                if self.mail_backlog.len() < self.params.mesh_backlog_max {
                    self.mail_backlog.push_back((to, mail));
                } else {
                    self.hub.counters().inc(Series::MeshFull);
                }
            }
        }
    }

    fn publish(&mut self, now: Now, force: bool) {
        if force || now.ms >= self.last_publish_ms + PUBLISH_EVERY_MS {
            self.last_publish_ms = now.ms;
            let id = self.id.index();
            let c = self.hub.counters();
            c.set(Series::Rings, self.rings.len() as u64);
            c.publish(&self.metrics[id]);
        }
        self.hub.counters().inc(Series::Turns);
    }

    /// After `Mail::Stop`: stop accepting, and end once drained or the grace time is over.
    fn stopped(&mut self, now: Now) -> io::Result<bool> {
        if !self.hub.stopping() {
            return Ok(false);
        }
        let grace = self.params.stop_grace.as_millis() as u64;
        let stop_at = *self.stop_at.get_or_insert(now.ms + grace);
        if let Some(r) = self.accept_ring.take() {
            self.rings[r].cancel_request(user_data(op::ACCEPT, r as u32, 0), user_data(op::CANCEL, 0, 0))?;
        }
        Ok(self.hub.connections() == 0 || now.ms >= stop_at)
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
        self.mesh.inbox(self.id).set_load(self.load);
        self.hub.set_busy(self.mesh.max_load());
        self.slept = Duration::ZERO;
        self.load_window_start = Instant::now();
    }

    /// Submits everything and sleeps until a completion, mail or the next deadline.
    fn wait(&mut self, now: Now) -> io::Result<()> {
        let mut timeout = Duration::from_millis(self.hub.next_timeout(now)).min(SLEEP_MAX);
        if self.hub.has_ready() {
            timeout = Duration::ZERO;
        }
        if !self.mail_backlog.is_empty() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        let inbox = self.mesh.inbox(self.id);
        let mut sleep = !timeout.is_zero() && inbox.prepare_sleep();
        if sleep {
            // Sub-rings signal the eventfd only while we sleep; look once more after enabling
            // so a completion that landed in between is not slept on.
            for ring in &mut self.rings[1..] {
                ring.set_notify(true);
            }
            sleep = !self.rings[1..].iter_mut().any(|r| r.has_completions());
        }
        for ring in &mut self.rings[1..] {
            ring.submit()?;
        }
        if sleep {
            // Submit first: io_uring runs most sends inline while submitting, and that is work,
            // not sleep, for the load measure (a busy shard lets blocks grow instead of sending
            // more frames).
            self.rings[0].submit()?;
            let before = Instant::now();
            self.rings[0].submit_and_wait(timeout)?;
            self.slept += before.elapsed();
        } else {
            self.rings[0].submit()?;
        }
        inbox.woke();
        for ring in &mut self.rings[1..] {
            ring.set_notify(false);
        }
        self.measure_load();
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
        let io = Io::new(77, 19_999).with(Io::RECV).with(Io::TERM);
        assert_eq!((io.ring(), io.slot()), (77, 19_999));
        assert!(io.has(Io::RECV) && io.has(Io::TERM) && !io.has(Io::SEND));
        assert!(!io.without(Io::RECV).has(Io::RECV));
    }
}
