//! Per-connection state: struct-of-arrays per ring, indexed by the connection's direct-descriptor
//! slot, 4 bytes a connection (state 1 + flags 1 + blocks 2) beside the scenario's read state
//! (`worker::Reads::Lane`: 20 bytes for `connect`). And the pool of
//! connect contexts: the source address a connect chain's bind reads, kept still until the
//! chain's last completion.
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
    /// Failed or closed; the slot is not reused.
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

/// The connections on one ring. Slots are handed out once each, in order: a run opens each
/// connection once, so a failed slot is never needed again.
pub struct Conns {
    pub state: Vec<State>,
    pub flags: Vec<u8>,
    /// Blocks received since the probe started (saturating).
    pub blocks: Vec<u16>,
    used: u32,
}

impl Conns {
    pub fn new(capacity: u32) -> Conns {
        let n = capacity as usize;
        Conns { state: vec![State::Free; n], flags: vec![0; n], blocks: vec![0; n], used: 0 }
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

    /// The next unused slot.
    pub fn take_slot(&mut self) -> Option<u32> {
        if self.used >= self.capacity() {
            return None;
        }
        self.used += 1;
        Some(self.used - 1)
    }
}

/// One connect chain in the kernel.
#[derive(Clone, Copy)]
pub struct Dial {
    /// Read by the chain's bind; must not change until `left` reaches 0.
    pub src: libc::sockaddr_in,
    pub lane: u32,
    pub slot: u32,
    /// Bytes the upgrade send must write.
    pub request_len: u32,
    /// Completions still to come (the chain posts one per operation).
    pub left: u8,
    /// An operation of the chain failed (the first failure is the one counted).
    pub failed: bool,
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

    /// Takes a context for a new chain; returns its index and the address its bind reads.
    pub fn start(
        &mut self,
        src: libc::sockaddr_in,
        lane: u32,
        slot: u32,
        request_len: u32,
    ) -> Option<(u32, *const libc::sockaddr_in)> {
        let i = self.free.pop()?;
        let d = &mut self.pool[i as usize];
        *d = Dial { src, lane, slot, request_len, left: DIAL_OPS, failed: false };
        Some((i, &raw const d.src))
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
    fn dial_contexts_are_bounded_and_reused_after_finish() {
        let mut d = Dials::new(2);
        let sa = crate::addrs::sockaddr_in("127.0.1.1:10000".parse().unwrap());
        let (a, pa) = d.start(sa, 0, 7, 100).unwrap();
        let (b, _) = d.start(sa, 0, 8, 100).unwrap();
        assert!(d.start(sa, 0, 9, 100).is_none());
        assert_eq!(d.in_flight(), 2);
        assert_eq!(d.get_mut(a).unwrap().slot, 7);
        d.finish(a);
        assert!(d.get_mut(a).is_none());
        let (c, pc) = d.start(sa, 0, 9, 100).unwrap();
        assert_eq!((c, pc), (a, pa));
        assert_ne!(b, c);
    }
}
