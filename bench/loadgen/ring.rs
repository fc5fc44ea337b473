//! The load generator's io_uring driver: typed builders for each submission entry it needs, on
//! the gateway's ring ([`barrage::shard::uring::Uring`]: one ring, its direct-descriptor table
//! where the sockets live, never in the process fd table, and its provided-buffer ring for
//! reads). Pushing an entry whose pointers must outlive the call is the one unsafe step; the one
//! builder that takes such a pointer from its caller is an `unsafe fn` and says what must stay
//! alive.

use std::io;
use std::os::fd::RawFd;

use barrage::shard::bufring::BufRing;
pub use barrage::shard::uring::Cqe;
use barrage::shard::uring::{BUFFER_GROUP, Uring};

use crate::conn::DialPtrs;
use io_uring::types::{CancelBuilder, DestinationSlot, Fixed};
use io_uring::{IoUring, opcode, squeue};

/// SO_REUSEADDR's value, read by the kernel when the setsockopt runs: a static, so it outlives
/// every request.
static ONE: libc::c_int = 1;
const SOCKADDR_IN_LEN: u32 = std::mem::size_of::<libc::sockaddr_in>() as u32;

/// What a completion answers; the high byte of its user data. The low 32 bits are a dial
/// index (connect chain) or a slot (everything after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Socket = 1,
    SockOpt,
    Bind,
    Connect,
    Upgrade,
    Poll,
    Recv,
    Ping,
    Cancel,
    Close,
    /// Our Close frame (the soak's churn).
    Bye,
}

impl Tag {
    const ALL: [Tag; 11] = [
        Tag::Socket,
        Tag::SockOpt,
        Tag::Bind,
        Tag::Connect,
        Tag::Upgrade,
        Tag::Poll,
        Tag::Recv,
        Tag::Ping,
        Tag::Cancel,
        Tag::Close,
        Tag::Bye,
    ];

    fn data(self, index: u32) -> u64 {
        (u64::from(self as u8) << 56) | u64::from(index)
    }
}

/// The load generator's reading of a completion's user data.
pub trait Tagged {
    /// What the completion answers.
    fn tag(&self) -> Option<Tag>;
    /// The dial index (connect chain) or the slot (everything after).
    fn index(&self) -> u32;
}

impl Tagged for Cqe {
    fn tag(&self) -> Option<Tag> {
        let byte = (self.user_data >> 56) as u8;
        Tag::ALL.into_iter().find(|t| *t as u8 == byte)
    }

    fn index(&self) -> u32 {
        self.user_data as u32
    }
}

/// Sizes of one ring.
#[derive(Clone, Copy, Debug)]
pub struct RingParams {
    pub sq_entries: u32,
    pub cq_entries: u32,
    /// Direct-descriptor slots (≤ RLIMIT_NOFILE: the kernel's cap on a table).
    pub files: u32,
    /// Provided receive buffers (a power of two), shared by all the ring's connections.
    pub recv_buffers: u16,
    pub recv_buffer_bytes: u32,
}

/// One io_uring with its direct descriptors and receive buffers.
pub struct Ring {
    ring: Uring,
}

impl Ring {
    /// A ring with a sparse table of `p.files` direct descriptors whose completions also
    /// signal the eventfd `wake` while notifications are on.
    pub fn new(p: RingParams, wake: RawFd) -> io::Result<Ring> {
        let uring = IoUring::builder().setup_cqsize(p.cq_entries).setup_submit_all().build(p.sq_entries)?;
        let bufs = BufRing::new(p.recv_buffers, p.recv_buffer_bytes)?;
        let mut ring = Ring { ring: Uring::new(uring, p.files, bufs, Some(wake))? };
        ring.set_notify(false);
        Ok(ring)
    }

    /// One connection's start as a link chain: socket into `slot` → SO_REUSEADDR → bind
    /// `at.src` → connect `dst` → send the `at.request_len` bytes at `at.request`. A failure
    /// cancels the rest (each still completes, with -ECANCELED), so exactly five completions
    /// tagged with `dial` arrive.
    ///
    /// # Safety
    /// `at.src` must point to a sockaddr_in, and `at.request` to `at.request_len` bytes, that
    /// stay valid and unmodified until the fifth completion is reaped.
    pub unsafe fn dial(
        &mut self,
        slot: u32,
        dial: u32,
        at: DialPtrs,
        dst: &'static libc::sockaddr_in,
    ) -> io::Result<()> {
        let target = DestinationSlot::try_from_slot_target(slot)
            .map_err(|s| io::Error::other(format!("slot {s} out of range")))?;
        let fd = Fixed(slot);
        let link = squeue::Flags::IO_LINK;
        let (src, request, len) = (at.src, at.request, at.request_len);
        let chain = [
            opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
                .file_index(Some(target))
                .build()
                .flags(link)
                .user_data(Tag::Socket.data(dial)),
            opcode::SetSockOpt::new(
                fd,
                libc::SOL_SOCKET as u32,
                libc::SO_REUSEADDR as u32,
                (&raw const ONE).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
            .build()
            .flags(link)
            .user_data(Tag::SockOpt.data(dial)),
            opcode::Bind::new(fd, src.cast(), SOCKADDR_IN_LEN).build().flags(link).user_data(Tag::Bind.data(dial)),
            opcode::Connect::new(fd, (dst as *const libc::sockaddr_in).cast(), SOCKADDR_IN_LEN)
                .build()
                .flags(link)
                .user_data(Tag::Connect.data(dial)),
            opcode::Send::new(fd, request, len).flags(libc::MSG_NOSIGNAL).build().user_data(Tag::Upgrade.data(dial)),
        ];
        // SAFETY: `ONE` and `dst` are 'static; the caller keeps `src` and `request` alive
        // until the chain's last completion.
        unsafe { self.ring.push(&chain) }
    }

    /// A multishot poll for readability: about a quarter of a multishot receive's kernel
    /// memory, and it holds no buffer.
    pub fn poll_readable(&mut self, slot: u32) -> io::Result<()> {
        let e =
            opcode::PollAdd::new(Fixed(slot), libc::POLLIN as u32).multi(true).build().user_data(Tag::Poll.data(slot));
        // SAFETY: the entry holds no pointers.
        unsafe { self.ring.push(&[e]) }
    }

    /// One receive into a buffer the kernel picks from this ring's provided buffers. It does
    /// not wait: with nothing to read it completes with -EAGAIN (the poll says when to retry).
    pub fn recv(&mut self, slot: u32) -> io::Result<()> {
        let e = opcode::Recv::new(Fixed(slot), std::ptr::null_mut(), self.ring.recv_buffer_bytes())
            .flags(libc::MSG_DONTWAIT)
            .buf_group(BUFFER_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(Tag::Recv.data(slot));
        // SAFETY: no pointer of ours: the kernel picks a buffer from the buffer ring, which
        // lives as long as the ring.
        unsafe { self.ring.push(&[e]) }
    }

    /// Sends fixed bytes (a ping, pong or close frame).
    pub fn send_static(&mut self, slot: u32, tag: Tag, bytes: &'static [u8]) -> io::Result<()> {
        let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("send too long"))?;
        let e = opcode::Send::new(Fixed(slot), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(tag.data(slot));
        // SAFETY: `bytes` is 'static.
        unsafe { self.ring.push(&[e]) }
    }

    /// Cancels the requests on `slot` that may still wait — those tagged `waiting`: its
    /// multishot poll, a send — and closes it; only failures complete (ENOENT: it had ended).
    /// Receives never wait (MSG_DONTWAIT). Each cancel names its request by user data, a hash
    /// lookup: cancelling by descriptor walks every armed poll of the ring, which at 19,000
    /// connections a ring and 1,000 closes a second took most of a core (the soak's churn).
    pub fn close(&mut self, slot: u32, waiting: &[Tag]) -> io::Result<()> {
        let skip = squeue::Flags::SKIP_SUCCESS;
        for tag in waiting {
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(tag.data(slot)))
                .build()
                .flags(skip)
                .user_data(Tag::Cancel.data(slot));
            // SAFETY: the entry holds no pointers.
            unsafe { self.ring.push(&[cancel])? };
        }
        let close = opcode::Close::new(Fixed(slot)).build().flags(skip).user_data(Tag::Close.data(slot));
        // SAFETY: the entry holds no pointers.
        unsafe { self.ring.push(&[close]) }
    }

    /// Copies out every completion waiting.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        self.ring.reap(out);
    }

    pub fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    /// Submits what was pushed (and lets the kernel flush completions it had to hold back).
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Turns the eventfd signal on completions on (before sleeping) or off (while awake).
    pub fn set_notify(&mut self, on: bool) {
        self.ring.set_notify(on);
    }

    /// The bytes the kernel received into buffer `bid`.
    pub fn buffer(&mut self, bid: u16, len: usize) -> Option<&[u8]> {
        self.ring.buffer(bid, len).map(|b| &*b)
    }

    /// Provided receive buffers.
    pub fn recv_buffers(&self) -> u16 {
        self.ring.recv_buffers()
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.ring.recycle(bid);
    }
}
