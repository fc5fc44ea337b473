//! The few raw system calls beside io_uring: the descriptor limit (which also caps a ring's
//! direct-descriptor table), the eventfd a worker sleeps on, the shared monotonic clock, the
//! clock-tick unit of /proc CPU times, a receive that never waits, and our own niceness.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        // SAFETY: setrlimit reads one rlimit from the valid `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        r.rlim_cur = r.rlim_max;
    }
    Ok(r.rlim_cur)
}

/// A non-blocking eventfd: the rings post to it when completions arrive while a worker
/// sleeps, and the main thread writes to it to wake a worker with news.
pub struct Wake(OwnedFd);

impl Wake {
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a fresh descriptor owned
        // by nothing else, so the OwnedFd becomes its only owner.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raw(&self) -> i32 {
        self.0.as_raw_fd()
    }

    /// Wakes the sleeper (best effort: a full counter already means "awake").
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from the valid local `one` to our own eventfd.
        let _ = unsafe { libc::write(self.raw(), (&raw const one).cast(), 8) };
    }

    /// Sleeps until signalled or `timeout` passes, then resets the counter.
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.raw(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: poll reads and writes exactly one pollfd, the valid local `pfd`.
        let _ = unsafe { libc::poll(&mut pfd, 1, ms) };
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into the valid local `count`; non-blocking, so an
        // empty counter returns EAGAIN at once.
        let _ = unsafe { libc::read(self.raw(), (&raw mut count).cast(), 8) };
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every process on the box shares, so a publish
/// stamped by one process and a receipt read by another compare (`Instant` is opaque).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`): the unit of /proc/PID/stat's CPU times.
pub fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// One receive that never waits (MSG_DONTWAIT): Ok(0) at EOF, WouldBlock when nothing is there.
pub fn recv_dontwait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most `buf.len()` bytes into the valid, exclusively borrowed `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// The calling thread's nice value (−20..=19; a process started under `nice -n 19` has 19).
pub fn niceness() -> i32 {
    // SAFETY: getpriority takes no pointers; for PRIO_PROCESS and who = 0 it reads the caller's
    // nice value. Its -1 is ambiguous with an error only in theory: for the calling thread it
    // cannot fail.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}
