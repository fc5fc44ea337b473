//! The few raw system calls the shards need beyond io_uring: an eventfd for wake-ups and the
//! file-descriptor limit that caps each ring's direct-descriptor table.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// A non-blocking eventfd (counter starts at 0).
pub fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd takes no pointers; a negative return is an error, anything else is a new
    // descriptor that nothing else owns, so wrapping it in an OwnedFd transfers sole ownership.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above: `fd` is a fresh, valid descriptor owned by no one else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// (soft, hard) RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (the kernel caps a ring's fixed-file table
/// at the soft limit) and returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limit()?;
    if soft < hard {
        let r = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads one rlimit from the valid `r`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(nofile_limit()?.0)
}
