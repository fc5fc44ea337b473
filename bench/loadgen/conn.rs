//! Per-connection state: struct-of-arrays per ring, indexed by the connection's direct-descriptor
//! slot, 4 bytes a connection (state 1 + flags 1 + blocks 2) beside the scenario's read state
//! (`worker::Reads::Lane`: 20 bytes for `connect`). And the pool of
//! connect contexts: the source address a connect chain's bind reads and the upgrade request its
//! send writes, kept still until the chain's last completion.
#![forbid(unsafe_code)]

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Slot not handed out.
    #[default]
    Free,
    /// The connect chain is in the kernel.
    Dialing,
    /// Upgrade request sent; waiting for the 101.
    Upgrading,
    /// Upgraded; waiting for the welcome.
    Open,
    /// Welcome received: a member of its room.
    Joined,
    /// We sent Close (the soak's churn); waiting for the server's Close or the end of the stream.
    Closing,
    /// Failed or closed; the slot is reused only after `Conns::release` (the soak's churn).
    Dead,
}

/// A receive is in flight.
pub const RECV: u8 = 1;
/// The poll fired while a receive was in flight: receive again after it.
pub const POLL_AGAIN: u8 = 2;
/// A ping (or pong) send is in flight.
pub const PING: u8 = 4;
/// A stalled reader (`fanout --stalled`): subscribed, never read again, held open.
pub const STALL: u8 = 8;
/// A multishot poll is armed (its last completion, without MORE, has not arrived).
pub const POLL: u8 = 16;
/// Our Close frame's send is in flight.
pub const BYE: u8 = 32;
/// The connection replaces one the churn closed (its failures are reconnect failures).
pub const RECONNECT: u8 = 64;
/// Requests that may still complete for a slot: it is reused only when none is out.
pub const IN_FLIGHT: u8 = RECV | PING | POLL | BYE;

/// The connections on one ring. Slots are handed out in order, each once, unless a dead one
/// is released (the soak's churn, once nothing of it is in flight): then it is handed out
/// again, after the next submit has carried its close to the kernel.
pub struct Conns {
    pub state: Vec<State>,
    pub flags: Vec<u8>,
    /// Blocks received since the probe started (saturating).
    pub blocks: Vec<u16>,
    /// Slots ever handed out: every slot below is or was in use.
    used: u32,
    /// Released slots ready to be handed out again.
    free: Vec<u32>,
    /// Released slots whose close may not have been submitted yet.
    freed: Vec<u32>,
}

impl Conns {
    pub fn new(capacity: u32) -> Conns {
        let n = capacity as usize;
        Conns {
            state: vec![State::Free; n],
            flags: vec![0; n],
            blocks: vec![0; n],
            used: 0,
            free: Vec::new(),
            freed: Vec::new(),
        }
    }

    /// Bytes of user memory per slot.
    pub const fn bytes_per_slot() -> usize {
        std::mem::size_of::<State>() + 1 + std::mem::size_of::<u16>()
    }

    pub fn capacity(&self) -> u32 {
        self.state.len() as u32
    }

    pub fn used(&self) -> u32 {
        self.used
    }

    /// A released slot, else the next unused one.
    pub fn take_slot(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if self.used >= self.capacity() {
            return None;
        }
        self.used += 1;
        Some(self.used - 1)
    }

    /// Whether `take_slot` would hand out a slot.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty() || self.used < self.capacity()
    }

    /// Releases dead `slot` if nothing of it is in flight; true if it did. It is handed out
    /// again only after `after_submit`.
    pub fn release(&mut self, slot: u32) -> bool {
        let s = slot as usize;
        if self.state[s] != State::Dead || self.flags[s] & IN_FLIGHT != 0 {
            return false;
        }
        self.state[s] = State::Free;
        self.flags[s] = 0;
        self.blocks[s] = 0;
        self.freed.push(slot);
        true
    }

    /// The ring has submitted what was pushed (the released slots' closes among it).
    pub fn after_submit(&mut self) {
        self.free.append(&mut self.freed);
    }
}

/// The longest upgrade request a connect chain sends: barrage's with a room and a resume cursor
/// (`GET /ws?room=r99&after=1882449317462017`, the host, the key, the subprotocol) is about 220
/// bytes; a peer's path is the user's. 384 bytes × `pending_max` contexts: 1.5 MiB at 4,096.
pub const REQUEST_BYTES_MAX: usize = 384;

/// One connect chain in the kernel.
#[derive(Clone, Copy)]
pub struct Dial {
    /// Read by the chain's bind; must not change until `left` reaches 0.
    pub src: libc::sockaddr_in,
    /// The upgrade request, written by the chain's send; must not change until `left` reaches 0.
    request: [u8; REQUEST_BYTES_MAX],
    pub lane: u32,
    pub slot: u32,
    /// Bytes the upgrade send must write (the start of `request`).
    pub request_len: u32,
    /// Completions still to come (the chain posts one per operation).
    pub left: u8,
    /// An operation of the chain failed (the first failure is the one counted).
    pub failed: bool,
}

/// What a connect chain reads from its context, valid until its last completion (the pool is
/// leaked, and an entry is not reused before `Dials::finish`).
#[derive(Clone, Copy, Debug)]
pub struct DialPtrs {
    pub src: *const libc::sockaddr_in,
    pub request: *const u8,
    pub request_len: u32,
}

/// Completions one connect chain posts: socket, setsockopt, bind, connect, send.
pub const DIAL_OPS: u8 = 5;

/// Connect contexts, at most `capacity` in flight. The array is leaked: it lives for the rest
/// of the process, so a chain still in the kernel when a worker stops early (a deadline) can
/// never read freed memory. Entries are reused only after their chain's last completion.
pub struct Dials {
    pool: &'static mut [Dial],
    free: Vec<u32>,
}

impl Dials {
    pub fn new(capacity: u32) -> Dials {
        let blank = Dial {
            src: crate::addrs::sockaddr_in(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0)),
            request: [0; REQUEST_BYTES_MAX],
            lane: 0,
            slot: 0,
            request_len: 0,
            left: 0,
            failed: false,
        };
        let pool = Box::leak(vec![blank; capacity as usize].into_boxed_slice());
        Dials { pool, free: (0..capacity).rev().collect() }
    }

    pub fn in_flight(&self) -> u32 {
        (self.pool.len() - self.free.len()) as u32
    }

    /// Takes a context for a new chain and copies `request` into it; returns its index and what
    /// the chain reads: the address its bind reads and the bytes its send writes. None when
    /// every context is in flight or `request` is longer than `REQUEST_BYTES_MAX`.
    pub fn start(&mut self, src: libc::sockaddr_in, lane: u32, slot: u32, request: &[u8]) -> Option<(u32, DialPtrs)> {
        if request.len() > REQUEST_BYTES_MAX {
            return None;
        }
        let i = self.free.pop()?;
        let d = &mut self.pool[i as usize];
        d.request[..request.len()].copy_from_slice(request);
        d.src = src;
        (d.lane, d.slot, d.request_len, d.left, d.failed) = (lane, slot, request.len() as u32, DIAL_OPS, false);
        Some((i, DialPtrs { src: &raw const d.src, request: d.request.as_ptr(), request_len: d.request_len }))
    }

    pub fn get_mut(&mut self, i: u32) -> Option<&mut Dial> {
        self.pool.get_mut(i as usize).filter(|d| d.left > 0)
    }

    /// Returns a context after its chain's last completion.
    pub fn finish(&mut self, i: u32) {
        if let Some(d) = self.pool.get_mut(i as usize) {
            d.left = 0;
            self.free.push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_s_state_is_four_bytes_a_connection() {
        assert_eq!(Conns::bytes_per_slot(), 4);
    }

    #[test]
    fn slots_are_handed_out_once_in_order() {
        let mut c = Conns::new(2);
        assert_eq!(c.take_slot(), Some(0));
        assert_eq!(c.take_slot(), Some(1));
        assert_eq!(c.take_slot(), None);
        assert_eq!(c.used(), 2);
    }

    #[test]
    fn a_dead_slot_comes_back_only_when_quiet_and_after_a_submit() {
        let mut c = Conns::new(2);
        let (a, b) = (c.take_slot().unwrap(), c.take_slot().unwrap());
        assert!(!c.has_room());
        c.state[a as usize] = State::Joined;
        assert!(!c.release(a), "a live slot stays");
        c.state[a as usize] = State::Dead;
        c.flags[a as usize] = POLL | RECONNECT;
        assert!(!c.release(a), "its poll may still complete");
        c.flags[a as usize] = RECONNECT;
        assert!(c.release(a));
        assert_eq!((c.state[a as usize], c.flags[a as usize]), (State::Free, 0));
        assert!(!c.has_room(), "not before the close is submitted");
        assert_eq!(c.take_slot(), None);
        c.after_submit();
        assert!(c.has_room());
        assert_eq!(c.take_slot(), Some(a));
        assert_eq!(c.take_slot(), None);
        assert_eq!(c.used(), 2);
        assert_ne!(a, b);
    }

    #[test]
    fn dial_contexts_are_bounded_and_reused_after_finish() {
        let mut d = Dials::new(2);
        let sa = crate::addrs::sockaddr_in("127.0.1.1:10000".parse().unwrap());
        let (a, pa) = d.start(sa, 0, 7, b"GET /a").unwrap();
        let (b, _) = d.start(sa, 0, 8, b"GET /b").unwrap();
        assert!(d.start(sa, 0, 9, b"GET /c").is_none());
        assert_eq!(d.in_flight(), 2);
        assert_eq!(d.get_mut(a).unwrap().slot, 7);
        assert_eq!(pa.request_len, 6);
        d.finish(a);
        assert!(d.get_mut(a).is_none());
        let (c, pc) = d.start(sa, 0, 9, b"GET /longer").unwrap();
        assert_eq!((c, pc.src, pc.request, pc.request_len), (a, pa.src, pa.request, 11));
        assert_eq!(&d.pool[c as usize].request[..11], b"GET /longer");
        assert_ne!(b, c);
        d.finish(c);
        assert!(d.start(sa, 0, 9, &[b'x'; REQUEST_BYTES_MAX + 1]).is_none(), "too long for a context");
        assert_eq!(d.in_flight(), 1);
    }
}
