//! The gateway's io_uring driver: typed helpers that build each submission entry the shard
//! needs, on a [`super::uring::Uring`] (the ring, its direct-descriptor table and its
//! provided-buffer ring). Pushing an entry whose pointers must outlive the call is the one
//! unsafe step; the helpers that take such pointers are `unsafe fn` and say what the caller
//! must keep alive.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types::{CancelBuilder, DestinationSlot, Fd, Fixed};
use io_uring::{IoUring, opcode, squeue};

use super::bufring::BufRing;
pub use super::uring::Cqe;
use super::uring::{BUFFER_GROUP, Uring};

/// SO_LINGER {on, 0}: a close after it discards the socket's unsent bytes and sends an RST. A
/// static, because the kernel reads it when the setsockopt runs, after the push has returned.
static LINGER_RESET: libc::linger = libc::linger { l_onoff: 1, l_linger: 0 };
/// The TCP upper-layer protocol kernel TLS is (`setsockopt(SOL_TCP, TCP_ULP, "tls")`); static
/// for the same reason.
static ULP_TLS: [u8; 3] = *b"tls";
/// `TLS_TX` of `include/uapi/linux/tls.h`: the send direction's `crypto_info`.
const TLS_TX: u32 = 1;

/// Sizes of one ring.
#[derive(Clone, Copy, Debug)]
pub struct RingParams {
    pub entries: u32,
    pub files_max: u32,
    pub recv_buffers: u16,
    pub recv_buffer_bytes: u32,
}

/// One io_uring with its direct descriptors and receive buffers.
pub struct Ring {
    ring: Uring,
    /// Direct-descriptor slots in this ring's table, and how many are taken.
    pub files_max: u32,
    pub files_used: u32,
    /// Operations pushed whose last completion has not been reaped: while any is, the memory
    /// they name must stay (see `Shard::shutdown`).
    pending: usize,
}

impl Ring {
    /// A ring with a sparse table of `files_max` direct descriptors and `recv_buffers`
    /// provided buffers. With `notify`, every completion also signals that eventfd (how a
    /// shard sleeping on its first ring hears about the others).
    pub fn new(p: RingParams, notify: Option<RawFd>) -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(p.entries * 4)
            .setup_submit_all()
            .build(p.entries)?;
        let bufs = BufRing::new(p.recv_buffers, p.recv_buffer_bytes)?;
        let ring = Uring::new(uring, p.files_max, bufs, notify)?;
        Ok(Ring { ring, files_max: p.files_max, files_used: 0, pending: 0 })
    }

    /// Pushes one entry and counts it pending until its last completion.
    ///
    /// # Safety
    /// As `Uring::push`: every pointer in `entry` stays valid until its last completion.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push_chain(&[entry]) }
    }

    /// Pushes entries as one unit (a link chain) and counts each pending until its last
    /// completion.
    ///
    /// # Safety
    /// As `Uring::push`: every pointer in `entries` stays valid until its last completion.
    unsafe fn push_chain(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ring.push(entries) }?;
        self.pending += entries.len();
        Ok(())
    }

    /// Multishot accept on `listener` into this ring's table (the kernel picks the slot).
    pub fn accept_multi(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(listener)).allocate_file_index(true).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// Accepts one connection on `listener` into this ring's table (the kernel picks the slot)
    /// and writes the peer's address to `addr` (`len` holds its size on the way in and the
    /// address length on the way out).
    ///
    /// # Safety
    /// `addr` and `len` must stay valid, unmoved and untouched until this accept's completion
    /// is reaped.
    pub unsafe fn accept(
        &mut self,
        listener: RawFd,
        addr: *mut libc::sockaddr_storage,
        len: *mut libc::socklen_t,
        user_data: u64,
    ) -> io::Result<()> {
        let e = opcode::Accept::new(Fd(listener), addr.cast(), len)
            .file_index(Some(DestinationSlot::auto_target()))
            .build()
            .user_data(user_data);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(e) }
    }

    /// Multishot receive on a direct descriptor into this ring's provided buffers.
    pub fn recv_multi(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fixed(slot), BUFFER_GROUP).build().user_data(user_data);
        // SAFETY: the entry holds no pointers; the kernel picks buffers from our buffer ring,
        // which lives as long as the ring.
        unsafe { self.push(e) }
    }

    /// Multishot poll for input on a direct descriptor: a completion per wake-up, no buffer and
    /// less kernel memory than an armed multishot receive.
    pub fn poll_multi(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::PollAdd::new(Fixed(slot), libc::POLLIN as u32).multi(true).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// One receive into a provided buffer that never waits: -EAGAIN when nothing is there.
    pub fn recv_once(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let len = self.ring.recv_buffer_bytes();
        let e = opcode::Recv::new(Fixed(slot), std::ptr::null_mut(), len)
            .buf_group(BUFFER_GROUP)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        // SAFETY: no pointer: the kernel picks a buffer from our buffer ring, which lives as
        // long as the ring.
        unsafe { self.push(e) }
    }

    /// Sends `len` bytes at `buf` on a direct descriptor.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unmodified until this send's completion is reaped.
    pub unsafe fn send(&mut self, slot: u32, buf: *const u8, len: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Send::new(Fixed(slot), buf, len).flags(libc::MSG_NOSIGNAL).build().user_data(user_data);
        // SAFETY: the caller keeps the buffer alive until completion.
        unsafe { self.push(e) }
    }

    /// Sends the buffers a msghdr lists (several queued frames in one operation).
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it names must stay valid and unmodified until
    /// this send's completion is reaped.
    pub unsafe fn sendmsg(&mut self, slot: u32, msg: *const libc::msghdr, user_data: u64) -> io::Result<()> {
        let e = opcode::SendMsg::new(Fixed(slot), msg).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data);
        // SAFETY: the caller keeps the msghdr, iovecs and buffers alive until completion.
        unsafe { self.push(e) }
    }

    /// Reads from a regular descriptor (the shard's eventfd).
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and untouched until this read's completion is reaped.
    pub unsafe fn read(&mut self, fd: RawFd, buf: *mut u8, len: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Read::new(Fd(fd), buf, len).build().user_data(user_data);
        // SAFETY: the caller keeps the buffer alive and unaliased until completion.
        unsafe { self.push(e) }
    }

    /// Cancels every request on a direct descriptor (receive and send).
    pub fn cancel_slot(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all()).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// Cancels the request that was submitted with `target`.
    pub fn cancel_request(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(target)).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// Cancels every request of this ring (the shard is stopping).
    pub fn cancel_all(&mut self, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::any()).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// Closes a direct descriptor (its slot is free once this completes).
    pub fn close_slot(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Close::new(Fixed(slot)).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(e) }
    }

    /// Closes a direct descriptor abortively: SO_LINGER {on, 0}, then close, hard-linked so
    /// the close runs after the setsockopt even if that fails (the slot is always freed). Two
    /// completions: `linger_data` (the setsockopt's result) and `close_data`.
    pub fn close_slot_reset(&mut self, slot: u32, linger_data: u64, close_data: u64) -> io::Result<()> {
        let linger = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::SOL_SOCKET as u32,
            libc::SO_LINGER as u32,
            (&raw const LINGER_RESET).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
        .build()
        .flags(squeue::Flags::IO_HARDLINK)
        .user_data(linger_data);
        let close = opcode::Close::new(Fixed(slot)).build().user_data(close_data);
        // SAFETY: the setsockopt's only pointer is to `LINGER_RESET`, a static never written;
        // the close holds no pointers.
        unsafe { self.push_chain(&[linger, close]) }
    }

    /// Hands a connection's send keys to the kernel: `TCP_ULP` "tls", then `SOL_TLS`/`TLS_TX`
    /// with `info` (a `crypto_info`), linked so the second runs only if the first succeeded
    /// (else it completes with -ECANCELED). Two completions: `ulp_data` and `tx_data`.
    ///
    /// # Safety
    /// `info` must stay alive and unmoved until the `tx_data` completion is reaped.
    pub unsafe fn kernel_tls(&mut self, slot: u32, info: &[u8], ulp_data: u64, tx_data: u64) -> io::Result<()> {
        let ulp = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::SOL_TCP as u32,
            libc::TCP_ULP as u32,
            ULP_TLS.as_ptr().cast(),
            ULP_TLS.len() as u32,
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(ulp_data);
        let tx =
            opcode::SetSockOpt::new(Fixed(slot), libc::SOL_TLS as u32, TLS_TX, info.as_ptr().cast(), info.len() as u32)
                .build()
                .user_data(tx_data);
        // SAFETY: the first setsockopt reads `ULP_TLS`, a static never written; the second reads
        // `info`, which the caller keeps alive until its completion.
        unsafe { self.push_chain(&[ulp, tx]) }
    }

    /// Copies out every completion waiting.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        let from = out.len();
        self.ring.reap(out);
        // Every entry pushed here ends with exactly one completion without MORE (none asks to
        // skip its completion): so many operations are finished.
        let finished = out[from..].iter().filter(|c| !c.more()).count();
        assert!(finished <= self.pending, "completions for operations never pushed");
        self.pending -= finished;
    }

    /// Operations pushed and not finished (their last completion not reaped).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether completions are waiting.
    pub fn has_completions(&mut self) -> bool {
        self.ring.has_completions()
    }

    /// Submits what was pushed (and flushes overflowed completions when the kernel holds some).
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Submits and sleeps until a completion arrives or `timeout` passes.
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.ring.submit_and_wait(timeout)
    }

    /// Turns the eventfd signal on completions on or off (off while the shard is awake).
    pub fn set_notify(&mut self, on: bool) {
        self.ring.set_notify(on);
    }

    /// The bytes the kernel received into buffer `bid`.
    pub fn buffer(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        self.ring.buffer(bid, len)
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.ring.recycle(bid);
    }
}
