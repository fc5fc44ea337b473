//! Each shard's own listening socket: SO_REUSEPORT so the kernel spreads new connections over
//! shards, a large backlog for connect storms, and the socket options accepted connections
//! inherit (TCP_NODELAY for prompt small frames).

use std::io;
use std::net::SocketAddr;

use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// A non-blocking listening socket bound with SO_REUSEPORT. `keepalive_s` > 0 turns on TCP
/// keepalive (first probe after that many idle seconds, then 3 probes 10 s apart): the backstop
/// for peers that vanish without a FIN. Accepted sockets inherit these options.
pub fn bind(addr: SocketAddr, backlog: u32, keepalive_s: u32) -> io::Result<Socket> {
    let socket = bound(addr)?;
    socket.set_tcp_nodelay(true)?;
    if keepalive_s > 0 {
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(u64::from(keepalive_s)))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        socket.set_tcp_keepalive(&ka)?;
    }
    socket.set_nonblocking(true)?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// For port 0: a socket bound with SO_REUSEPORT but not listening (so it takes no
/// connections), holding a free port for the shards to bind until they have.
pub fn reserve_port(addr: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let socket = bound(addr)?;
    let local = socket.local_addr()?.as_socket().ok_or_else(|| io::Error::other("no local address"))?;
    Ok((socket, local))
}

fn bound(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 16, 75).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        l.set_nonblocking(false).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(75));
    }
}
