//! Each shard's own listening socket: SO_REUSEPORT so the kernel spreads new connections over
//! shards, a large backlog for connect storms, and the socket options accepted connections
//! inherit (TCP_NODELAY for prompt small frames, keepalive, and a fixed send buffer).

use std::io;
use std::net::SocketAddr;

use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// A non-blocking listening socket bound with SO_REUSEPORT. `keepalive_s` > 0 turns on TCP
/// keepalive (first probe after that many idle seconds, then 3 probes 10 s apart): the backstop
/// for peers that vanish without a FIN. `send_buffer_bytes` > 0 sets SO_SNDBUF, which also
/// turns off send-buffer autotuning: a reader that stops reading pins at most about twice that
/// in the kernel. Accepted sockets inherit these options (a socket accepted from a listener is a
/// clone of it; `accepted_sockets_inherit_...` below checks it on the running kernel).
pub fn bind(addr: SocketAddr, backlog: u32, keepalive_s: u32, send_buffer_bytes: u32) -> io::Result<Socket> {
    let socket = bound(addr)?;
    prepare(&socket, backlog, keepalive_s, send_buffer_bytes)?;
    Ok(socket)
}

/// Sets this process's options on a listener taken over from the process it replaces (its
/// queue, and the options of connections accepted from now on, follow this config).
pub fn adopt(socket: &Socket, backlog: u32, keepalive_s: u32, send_buffer_bytes: u32) -> io::Result<()> {
    if socket.local_addr()?.as_socket().is_none() || socket.r#type()? != Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::other("a descriptor handed over is not a listening TCP socket"));
    }
    prepare(socket, backlog, keepalive_s, send_buffer_bytes)
}

fn prepare(socket: &Socket, backlog: u32, keepalive_s: u32, send_buffer_bytes: u32) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    if send_buffer_bytes > 0 {
        socket.set_send_buffer_size(send_buffer_bytes as usize)?;
    }
    if keepalive_s > 0 {
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(u64::from(keepalive_s)))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        socket.set_tcp_keepalive(&ka)?;
    }
    socket.set_nonblocking(true)?;
    // On a listening socket, listen(2) again only sets the backlog.
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(())
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
    fn accepted_sockets_inherit_nodelay_keepalive_and_send_buffer() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 16, 75, 16 * 1024).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        l.set_nonblocking(false).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(75));
        // The kernel doubles SO_SNDBUF for its bookkeeping (socket(7)).
        assert_eq!(s.send_buffer_size().unwrap(), 32 * 1024);
    }

    #[test]
    fn zero_leaves_the_send_buffer_to_autotuning() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 16, 0, 0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        l.set_nonblocking(false).unwrap();
        let (s, _) = l.accept().unwrap();
        let tcp_wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
        let default: usize = tcp_wmem.split_whitespace().nth(1).unwrap().parse().unwrap();
        // Autotuned: at least tcp_wmem's default, and on loopback (a 64 KiB MSS) already grown
        // to megabytes when the connection is established.
        assert!(s.send_buffer_size().unwrap() >= default, "{} < {default}", s.send_buffer_size().unwrap());
    }
}
