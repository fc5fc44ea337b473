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

/// Whether the kernel can take TLS send keys: `tls` is among the TCP upper-layer protocols, or
/// becomes one when asked for (the kernel loads a modular `tls` on the first TCP_ULP request).
/// Err says why not, for the start-up line.
pub fn kernel_tls() -> Result<(), String> {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_available_ulp";
    let listed = |s: &str| s.split_whitespace().any(|u| u == "tls");
    if std::fs::read_to_string(PATH).is_ok_and(|s| listed(&s)) {
        return Ok(());
    }
    // Ask once on an unconnected socket: the kernel looks the ULP up (loading its module) before
    // it checks the socket, so ENOENT means there is none and anything else (ENOTCONN) means
    // there is one now.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|e| e.to_string())?;
    let name = b"tls";
    // SAFETY: setsockopt reads `name.len()` bytes from `name`, a live static array; the socket is
    // owned by `sock` for the whole call.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    let err = io::Error::last_os_error();
    if r == 0 || err.raw_os_error() != Some(libc::ENOENT) {
        return Ok(());
    }
    let have = std::fs::read_to_string(PATH).unwrap_or_default();
    Err(format!("no `tls` ULP in this kernel ({PATH}: {}; CONFIG_TLS unset or its module missing)", have.trim()))
}
