//! Each shard's own listening socket: SO_REUSEPORT so the kernel spreads new connections over
//! shards, a large backlog for connect storms, and the socket options accepted connections
//! inherit (TCP_NODELAY for prompt small frames).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// A non-blocking listening socket bound with SO_REUSEPORT.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = bound(addr)?;
    socket.set_tcp_nodelay(true)?;
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
