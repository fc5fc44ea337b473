//! What went wrong, by kind: every failure the network can cause is counted here under a
//! stable name (`connect_ECONNREFUSED`, `status_503`, `closed_by_server_1001`, ...) instead of
//! stopping the run.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use crate::frames::FrameError;
use crate::handshake::HeadError;

/// The operation a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Socket,
    SockOpt,
    Bind,
    Connect,
    Upgrade,
    Poll,
    Recv,
    Ping,
    /// Sending our Close frame (the soak's churn).
    Bye,
    Ring,
    Submit,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Socket => "socket",
            Op::SockOpt => "setsockopt",
            Op::Bind => "bind",
            Op::Connect => "connect",
            Op::Upgrade => "upgrade_send",
            Op::Poll => "poll",
            Op::Recv => "recv",
            Op::Ping => "ping_send",
            Op::Bye => "close_send",
            Op::Ring => "ring_setup",
            Op::Submit => "submit",
        }
    }
}

/// One kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An operation failed with this errno (positive).
    Os(Op, i32),
    /// The upgrade request went out only in part.
    ShortSend,
    Head(HeadError),
    Frame(FrameError),
    /// A Close frame, with its code if it had one.
    ClosedByServer(Option<u16>),
    /// The stream ended without a Close frame.
    Eof,
    /// ECONNRESET on a read.
    Reset,
    /// Ran out of source pairs or connection slots (a bug in sizing if it ever shows).
    NoSlot,
    /// A scenario's own kind (`fanout`: `short_message`, `wrong_room`, ...).
    Named(&'static str),
}

impl ErrorKind {
    pub fn name(self) -> String {
        match self {
            ErrorKind::Os(op, errno) => format!("{}_{}", op.name(), errno_name(errno)),
            ErrorKind::ShortSend => "upgrade_short_send".into(),
            ErrorKind::Head(HeadError::Status(s)) => format!("status_{s}"),
            ErrorKind::Head(HeadError::BadStatusLine) => "bad_status_line".into(),
            ErrorKind::Head(HeadError::BadAccept) => "bad_accept".into(),
            ErrorKind::Head(HeadError::TooLarge) => "head_too_large".into(),
            ErrorKind::Frame(FrameError::Masked) => "frame_masked".into(),
            ErrorKind::Frame(FrameError::Reserved) => "frame_reserved".into(),
            ErrorKind::Frame(FrameError::TooLong) => "frame_too_long".into(),
            ErrorKind::ClosedByServer(Some(code)) => format!("closed_by_server_{code}"),
            ErrorKind::ClosedByServer(None) => "closed_by_server".into(),
            ErrorKind::Eof => "eof".into(),
            ErrorKind::Reset => "reset".into(),
            ErrorKind::NoSlot => "no_slot".into(),
            ErrorKind::Named(name) => name.into(),
        }
    }
}

/// Counts per kind. A handful of kinds ever show up, so a short list beats a map, and adding
/// to a kind already seen never allocates.
#[derive(Debug, Default, Clone)]
pub struct ErrorCounts {
    counts: Vec<(ErrorKind, u64)>,
    total: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        self.total += 1;
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((kind, 1)),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Adds these counts into a name → count map (for the report).
    pub fn merge_into(&self, out: &mut BTreeMap<String, u64>) {
        for (kind, n) in &self.counts {
            *out.entry(kind.name()).or_insert(0) += n;
        }
    }
}

/// The symbolic name of an errno (positive), or `E<n>`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOSPC => "ENOSPC",
        libc::EPIPE => "EPIPE",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOBUFS => "ENOBUFS",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("E{errno}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        assert_eq!(ErrorKind::Os(Op::Connect, libc::ECONNREFUSED).name(), "connect_ECONNREFUSED");
        assert_eq!(ErrorKind::Os(Op::Bind, 9999).name(), "bind_E9999");
        assert_eq!(ErrorKind::Head(HeadError::Status(503)).name(), "status_503");
        assert_eq!(ErrorKind::ClosedByServer(Some(1001)).name(), "closed_by_server_1001");
        assert_eq!(ErrorKind::Reset.name(), "reset");
    }

    #[test]
    fn counts_add_up_and_merge() {
        let mut c = ErrorCounts::default();
        c.add(ErrorKind::Eof);
        c.add(ErrorKind::Eof);
        c.add(ErrorKind::Reset);
        assert_eq!(c.total(), 3);
        let mut m = BTreeMap::new();
        c.merge_into(&mut m);
        c.merge_into(&mut m);
        assert_eq!(m["eof"], 4);
        assert_eq!(m["reset"], 2);
    }
}
