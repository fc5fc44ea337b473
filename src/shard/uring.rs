//! The ring under both io_uring drivers, the gateway's [`super::driver`] and the load
//! generator's: pushing entries, submitting, reaping completions, and the provided receive
//! buffers. Each driver builds its own entries; pushing one is the one unsafe step, because the
//! kernel reads and writes through the entry's pointers after the push returns.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, squeue};

use super::bufring::BufRing;

/// The provided-buffer group of every ring (one group per ring): the `buf_group` of entries
/// that let the kernel pick a receive buffer.
pub const BUFFER_GROUP: u16 = 0;

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

/// One io_uring with its direct-descriptor table and its provided receive buffers.
pub struct Uring {
    // Dropped first: tearing the ring down releases its files and the buffer registration
    // before the buffer memory below is unmapped.
    uring: IoUring,
    bufs: BufRing,
    /// Entries pushed since the last submit.
    queued: bool,
}

impl Uring {
    /// Takes a ring built with the caller's setup flags and gives it a sparse table of `files`
    /// direct descriptors and `bufs` as buffer group [`BUFFER_GROUP`]. With `notify`, every
    /// completion also signals that eventfd while notifications are on.
    pub fn new(uring: IoUring, files: u32, bufs: BufRing, notify: Option<RawFd>) -> io::Result<Uring> {
        uring.submitter().register_files_sparse(files)?;
        bufs.register(&uring, BUFFER_GROUP)?;
        if let Some(fd) = notify {
            uring.submitter().register_eventfd(fd)?;
        }
        Ok(Uring { uring, bufs, queued: false })
    }

    /// Pushes `entries` as one unit (a link chain must not be split over two submits),
    /// submitting first while the queue lacks room.
    ///
    /// # Safety
    /// Every pointer in `entries` must stay valid (and the memory it names unmoved and, for
    /// reads into it, not otherwise accessed) until that entry's last completion is reaped.
    pub unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        for _ in 0..64 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.uring.submission().push_multiple(entries) }.is_ok() {
                self.queued = true;
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("submission queue stays full"))
    }

    /// Submits what was pushed (and lets the kernel flush completions it had to hold back).
    pub fn submit(&mut self) -> io::Result<()> {
        if !self.queued && !self.uring.submission().cq_overflow() {
            return Ok(());
        }
        self.queued = false;
        match self.uring.submit() {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
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
            // ETIME: the timeout passed with nothing to reap.
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || transient(&e) => Ok(()),
            Err(e) => Err(e),
        }
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

    /// Turns the eventfd signal on completions on (before sleeping) or off (while awake).
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

    /// Provided receive buffers.
    pub fn recv_buffers(&self) -> u16 {
        self.bufs.count()
    }

    /// Bytes in one provided receive buffer (the most one receive into it can take).
    pub fn recv_buffer_bytes(&self) -> u32 {
        self.bufs.size()
    }
}

/// A submit error that only means "not now": the next submit retries.
fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY))
}
