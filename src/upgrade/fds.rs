//! Listening sockets passed between processes over the control socket (SCM_RIGHTS), through
//! rustix's safe wrappers: a received descriptor arrives as an `OwnedFd`.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, recvmsg, sendmsg,
};

use super::wire::FDS_MAX;

/// Sends `bytes` (all of them) with `fds` attached to the first byte.
pub fn send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > FDS_MAX {
        return Err(io::Error::other(format!("{} descriptors, at most {FDS_MAX} pass in one message", fds.len())));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("descriptors do not fit the control buffer"));
    }
    let sent = sendmsg(stream, &[io::IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
    // The descriptors went with the first byte; the rest is plain data.
    io::Write::write_all(&mut &*stream, &bytes[sent..])
}

/// Fills `buf` (all of it), taking the descriptors attached to its first byte.
pub fn recv(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_MAX))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(stream, &mut [io::IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other("descriptors were cut off (more than one message carries)"));
    }
    if got.bytes == 0 && !buf.is_empty() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    io::Read::read_exact(&mut &*stream, &mut buf[got.bytes..])?;
    Ok(fds)
}

/// Borrowed descriptors of sockets, for `send`.
pub fn borrow<T: AsFd>(sockets: &[T]) -> Vec<BorrowedFd<'_>> {
    sockets.iter().map(AsFd::as_fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_listening_socket_crosses_with_its_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued before the hand-over: the receiver accepts it.
        let _client = TcpStream::connect(addr).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send(&a, b"hello", &borrow(&[&listener])).unwrap();
        drop(listener);
        let mut buf = [0u8; 5];
        let fds = recv(&b, &mut buf).unwrap();
        assert_eq!((&buf, fds.len()), (b"hello", 1));
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), addr);
        let (_, peer) = received.accept().unwrap();
        assert!(peer.ip().is_loopback());
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(recv(&b, &mut [0u8; 4]).is_err());
    }
}
