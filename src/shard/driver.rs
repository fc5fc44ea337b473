//! The io_uring driver: one ring with its direct-descriptor table and its provided-buffer ring,
//! and typed helpers that build each submission entry. Pushing an entry whose pointers must
//! outlive the call is the one unsafe step; the helpers that take such pointers are `unsafe fn`
//! and say what the caller must keep alive.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::bufring::BufRing;

/// The provided-buffer group every ring registers (one group per ring).
const BUFFER_GROUP: u16 = 0;

/// One completion, copied out of the ring so handlers may push new entries freely.
#[derive(Clone, Copy, Debug)]
pub struct Cqe {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Cqe {
    /// The socket still had data when this receive completed.
    pub fn sock_nonempty(&self) -> bool {
        cqueue::sock_nonempty(self.flags)
    }

    /// More completions will follow for this (multishot) request.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer the kernel filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

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
    // Dropped first: tearing the ring down releases its files and the buffer registration
    // before the buffer memory below is unmapped.
    uring: IoUring,
    bufs: BufRing,
    /// Direct-descriptor slots in this ring's table, and how many are taken.
    pub files_max: u32,
    pub files_used: u32,
    /// Entries pushed since the last submit.
    queued: bool,
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
        uring.submitter().register_files_sparse(p.files_max)?;
        let bufs = BufRing::new(p.recv_buffers, p.recv_buffer_bytes)?;
        bufs.register(&uring, BUFFER_GROUP)?;
        if let Some(fd) = notify {
            uring.submitter().register_eventfd(fd)?;
        }
        Ok(Ring { uring, bufs, files_max: p.files_max, files_used: 0, queued: false })
    }

    /// Pushes one entry, submitting first when the queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid (and the memory it names unmoved and, for
    /// reads, not otherwise accessed) until the entry's last completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..64 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                self.queued = true;
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("submission queue stays full"))
    }

    /// Multishot accept on `listener` into this ring's table (the kernel picks the slot).
    pub fn accept_multi(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(listener)).allocate_file_index(true).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(&e) }
    }

    /// Multishot receive on a direct descriptor into this ring's provided buffers.
    pub fn recv_multi(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fixed(slot), BUFFER_GROUP).build().user_data(user_data);
        // SAFETY: the entry holds no pointers; the kernel picks buffers from our buffer ring,
        // which lives as long as the ring.
        unsafe { self.push(&e) }
    }

    /// Multishot poll for input on a direct descriptor: a completion per wake-up, no buffer and
    /// less kernel memory than an armed multishot receive.
    pub fn poll_multi(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::PollAdd::new(Fixed(slot), libc::POLLIN as u32).multi(true).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(&e) }
    }

    /// One receive into a provided buffer that never waits: -EAGAIN when nothing is there.
    pub fn recv_once(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let len = self.bufs.size();
        let e = opcode::Recv::new(Fixed(slot), std::ptr::null_mut(), len)
            .buf_group(BUFFER_GROUP)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data);
        // SAFETY: no pointer: the kernel picks a buffer from our buffer ring, which lives as
        // long as the ring.
        unsafe { self.push(&e) }
    }

    /// Sends `len` bytes at `buf` on a direct descriptor.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unmodified until this send's completion is reaped.
    pub unsafe fn send(&mut self, slot: u32, buf: *const u8, len: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Send::new(Fixed(slot), buf, len).flags(libc::MSG_NOSIGNAL).build().user_data(user_data);
        // SAFETY: the caller keeps the buffer alive until completion.
        unsafe { self.push(&e) }
    }

    /// Sends the buffers a msghdr lists (several queued frames in one operation).
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it names must stay valid and unmodified until
    /// this send's completion is reaped.
    pub unsafe fn sendmsg(&mut self, slot: u32, msg: *const libc::msghdr, user_data: u64) -> io::Result<()> {
        let e = opcode::SendMsg::new(Fixed(slot), msg).flags(libc::MSG_NOSIGNAL as u32).build().user_data(user_data);
        // SAFETY: the caller keeps the msghdr, iovecs and buffers alive until completion.
        unsafe { self.push(&e) }
    }

    /// Reads from a regular descriptor (the shard's eventfd).
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and untouched until this read's completion is reaped.
    pub unsafe fn read(&mut self, fd: RawFd, buf: *mut u8, len: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Read::new(Fd(fd), buf, len).build().user_data(user_data);
        // SAFETY: the caller keeps the buffer alive and unaliased until completion.
        unsafe { self.push(&e) }
    }

    /// Cancels every request on a direct descriptor (receive and send).
    pub fn cancel_slot(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all()).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(&e) }
    }

    /// Cancels the request that was submitted with `target`.
    pub fn cancel_request(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(CancelBuilder::user_data(target)).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(&e) }
    }

    /// Closes a direct descriptor (its slot is free once this completes).
    pub fn close_slot(&mut self, slot: u32, user_data: u64) -> io::Result<()> {
        let e = opcode::Close::new(Fixed(slot)).build().user_data(user_data);
        // SAFETY: the entry holds no pointers.
        unsafe { self.push(&e) }
    }

    /// Copies out every completion waiting.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        for c in self.uring.completion() {
            out.push(Cqe { user_data: c.user_data(), result: c.result(), flags: c.flags() });
        }
    }

    /// Whether completions are waiting.
    pub fn has_completions(&mut self) -> bool {
        !self.uring.completion().is_empty()
    }

    /// Submits what was pushed (and flushes overflowed completions when the kernel holds some).
    pub fn submit(&mut self) -> io::Result<()> {
        if !self.queued && !self.uring.submission().cq_overflow() {
            return Ok(());
        }
        self.queued = false;
        match self.uring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits and sleeps until a completion arrives or `timeout` passes.
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.queued = false;
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.uring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Turns the eventfd signal on completions on or off (off while the shard is awake).
    pub fn set_notify(&mut self, on: bool) {
        let cq = self.uring.completion();
        if on { cq.enable_eventfd() } else { cq.disable_eventfd() }
    }

    /// The bytes the kernel received into buffer `bid`.
    pub fn buffer(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        self.bufs.filled(bid, len)
    }

    /// Hands buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.bufs.give_back(bid);
    }
}
