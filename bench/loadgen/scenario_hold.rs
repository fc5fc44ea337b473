//! The `hold` scenario: N idle members of one room over `ws://` or `wss://` (rustls, trusting a
//! given CA), from one source address, on plain non-blocking sockets and epoll — for measuring
//! what an idle TLS connection costs the gateway beside a plain one (bench/tls.sh), and how
//! fast it takes handshakes. Opens at most `--in-flight` at a time, waits for each one's
//! welcome, prints a JSON line when all are joined (or failed), then holds them for
//! `--hold-s` and exits. One process holds fewer than RLIMIT_NOFILE (20,000 here): run several,
//! each from its own source address.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rustix::event::epoll;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::addrs::parse_target;
use crate::frames::FrameScan;

#[derive(Args, Debug)]
pub struct HoldArgs {
    /// barrage's public listener.
    #[arg(long)]
    ws: String,
    #[arg(long)]
    connections: usize,
    #[arg(long, default_value = "hold")]
    room: String,
    /// Source address to connect from (127.0.0.0/8).
    #[arg(long, default_value = "127.0.0.2")]
    source: std::net::Ipv4Addr,
    /// Speak TLS, trusting this PEM certificate.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    #[arg(long, default_value_t = 10.0)]
    hold_s: f64,
    /// Keep reading (and decrypting) what members receive while held, instead of leaving them
    /// idle: for measuring the fan-out's cost over TLS. Prints a progress line every second
    /// (`t` unix seconds, frames and plaintext bytes read so far) and the totals at the end.
    #[arg(long)]
    read: bool,
    /// Upgrade path and query instead of barrage's `/ws?room=ROOM` (then no subprotocol is
    /// offered): `/sub?room=r0` for a peer of bench/peers.
    #[arg(long)]
    path: Option<String>,
    /// A member is joined at the 101 (for peers that send nothing on open), not at the first
    /// frame after it (barrage's welcome).
    #[arg(long)]
    no_welcome: bool,
    /// With --read: once all are joined, one more connection upgrades to this path (a peer's
    /// `/pub?room=r0`) and sends a binary message of --publish-bytes every --publish-every-ms
    /// while the members are held.
    #[arg(long)]
    publish_path: Option<String>,
    #[arg(long, default_value_t = 50)]
    publish_every_ms: u64,
    #[arg(long, default_value_t = 740)]
    publish_bytes: usize,
    /// Instead of --publish-bytes of filler: each line of this file is one message, in turn.
    #[arg(long)]
    publish_file: Option<std::path::PathBuf>,
    /// Offer permessage-deflate (as browsers do); compressed frames are counted, not inflated.
    #[arg(long)]
    deflate: bool,
    /// barrage's JSON subprotocol instead of protobuf.
    #[arg(long)]
    json: bool,
}

enum Phase {
    Connecting,
    /// Upgrade sent (through TLS when there is TLS); waiting for the 101 and the welcome.
    Upgrading,
    Joined,
    Failed,
}

struct Member {
    sock: TcpStream,
    tls: Option<Box<ClientConnection>>,
    phase: Phase,
    /// Plaintext read so far (101 head + first frame).
    seen: Vec<u8>,
    /// Frame boundaries in what was read after the 101.
    scan: FrameScan,
}

pub fn run(args: HoldArgs) -> i32 {
    let target = match parse_target("--ws", &args.ws) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("barrage-load: {}", e.0);
            return 2;
        }
    };
    let tls = match &args.ca {
        None => None,
        Some(path) => match client_config(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("barrage-load: --ca {}: {e}", path.display());
                return 2;
            }
        },
    };
    match hold(&args, target, tls) {
        Ok(ok) => i32::from(!ok),
        Err(e) => {
            eprintln!("barrage-load: hold: {e}");
            1
        }
    }
}

fn client_config(path: &std::path::Path) -> Result<Arc<ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(barrage::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn hold(args: &HoldArgs, target: SocketAddrV4, tls: Option<Arc<ClientConfig>>) -> io::Result<bool> {
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let protocol = if args.json { crate::handshake::Subprotocol::Json } else { crate::handshake::Subprotocol::Proto };
    let mut request = match &args.path {
        Some(path) => crate::handshake::upgrade(&target.to_string(), path, None),
        None => crate::handshake::request(&target.to_string(), &args.room, protocol),
    };
    if args.deflate {
        request.truncate(request.len() - 2);
        request.extend_from_slice(b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n");
    }
    let mut members: Vec<Member> = Vec::with_capacity(args.connections);
    let (mut opened, mut joined, mut failed, mut pending) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let second = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
    let mut buf = vec![0u8; 64 * 1024];
    while joined + failed < args.connections {
        while opened < args.connections && pending < args.in_flight {
            let sock = dial(args.source, target)?;
            let i = members.len() as u64;
            epoll::add(
                &poll,
                sock.as_fd(),
                epoll::EventData::new_u64(i),
                epoll::EventFlags::IN | epoll::EventFlags::OUT,
            )?;
            let tls = match &tls {
                Some(c) => Some(Box::new(
                    ClientConnection::new(Arc::clone(c), ServerName::try_from("localhost").map_err(io::Error::other)?)
                        .map_err(io::Error::other)?,
                )),
                None => None,
            };
            let mut scan = FrameScan::default();
            scan.deflate = args.deflate;
            members.push(Member { sock, tls, phase: Phase::Connecting, seen: Vec::new(), scan });
            opened += 1;
            pending += 1;
        }
        events.clear();
        epoll::wait(&poll, rustix::buffer::spare_capacity(&mut events), Some(&second))?;
        if events.is_empty() && started.elapsed() > Duration::from_secs(120) {
            break;
        }
        for ev in &events {
            let i = ev.data.u64() as usize;
            let m = &mut members[i];
            let before = matches!(m.phase, Phase::Joined | Phase::Failed);
            if let Err(e) = step(m, &request, &mut buf, !args.no_welcome) {
                if failed == 0 {
                    eprintln!("barrage-load: hold: first failure: {e}");
                }
                m.phase = Phase::Failed;
            }
            let after_joined = matches!(m.phase, Phase::Joined);
            let after_failed = matches!(m.phase, Phase::Failed);
            if !before && (after_joined || after_failed) {
                pending -= 1;
                if after_joined {
                    joined += 1;
                    m.seen = Vec::new();
                    if args.read {
                        epoll::modify(
                            &poll,
                            m.sock.as_fd(),
                            epoll::EventData::new_u64(i as u64),
                            epoll::EventFlags::IN,
                        )?;
                    } else {
                        // Idle from now on: nothing more is asked of it.
                        let _ = epoll::delete(&poll, m.sock.as_fd());
                    }
                } else {
                    failed += 1;
                    let _ = epoll::delete(&poll, m.sock.as_fd());
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "scenario": "hold", "tls": args.ca.is_some(), "connections": args.connections,
            "joined": joined, "failed": failed, "seconds": secs, "joins_per_s": joined as f64 / secs,
        })
    );
    if args.read {
        let until = Instant::now() + Duration::from_secs_f64(args.hold_s);
        let publisher = match &args.publish_path {
            Some(path) => Some(publish(args, target, tls.clone(), path, until)?),
            None => None,
        };
        let (mut read, mut frames, mut compressed) = (0u64, 0u64, 0u64);
        let mut next_report = Instant::now();
        let tick = rustix::event::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
        while Instant::now() < until {
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(1);
                let t =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                println!(
                    "{}",
                    serde_json::json!({ "t": t, "frames": frames, "compressed": compressed, "read_bytes": read })
                );
            }
            events.clear();
            epoll::wait(&poll, rustix::buffer::spare_capacity(&mut events), Some(&tick))?;
            for ev in &events {
                let m = &mut members[ev.data.u64() as usize];
                let (b, f, z) = drain(m, &mut buf).unwrap_or((0, 0, 0));
                read += b;
                frames += f;
                compressed += z;
            }
        }
        let sent = publisher.map(|p| p.join().unwrap_or(0));
        println!(
            "{}",
            serde_json::json!({ "scenario": "hold", "read_bytes": read, "frames": frames, "published": sent })
        );
    } else {
        std::thread::sleep(Duration::from_secs_f64(args.hold_s));
    }
    Ok(failed == 0 && joined == args.connections)
}

fn dial(source: std::net::Ipv4Addr, target: SocketAddrV4) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((source, 0)).into())?;
    match s.connect(&SocketAddr::V4(target).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// Reads (and decrypts) what a joined member was sent; returns the plaintext bytes, the frames
/// that began in them and how many of those were compressed.
fn drain(m: &mut Member, buf: &mut [u8]) -> io::Result<(u64, u64, u64)> {
    let (mut total, mut frames, mut compressed) = (0u64, 0u64, 0u64);
    let mut count = |scan: &mut FrameScan, bytes: &[u8]| {
        let _ = scan.feed(bytes, &mut |f| {
            frames += 1;
            compressed += u64::from(f.compressed);
        });
    };
    loop {
        let n = match m.sock.read(buf) {
            Ok(0) => return Ok((total, frames, compressed)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, frames, compressed)),
            Err(e) => return Err(e),
        };
        match &mut m.tls {
            Some(t) => {
                let mut rd = &buf[..n];
                while !rd.is_empty() {
                    t.read_tls(&mut rd)?;
                    let state = t.process_new_packets().map_err(io::Error::other)?;
                    let plain = state.plaintext_bytes_to_read();
                    if plain > 0 {
                        let mut sink = vec![0u8; plain];
                        t.reader().read_exact(&mut sink)?;
                        count(&mut m.scan, &sink);
                        total += plain as u64;
                    }
                }
            }
            None => {
                count(&mut m.scan, &buf[..n]);
                total += n as u64;
            }
        }
    }
}

/// The paced publisher of a peer (`--publish-path`): its own thread and blocking connection;
/// returns the messages it sent.
fn publish(
    args: &HoldArgs,
    target: SocketAddrV4,
    tls: Option<Arc<ClientConfig>>,
    path: &str,
    until: Instant,
) -> io::Result<std::thread::JoinHandle<u64>> {
    let sock = TcpStream::connect(target)?;
    sock.set_nodelay(true)?;
    let mut stream: Box<dyn ReadWrite + Send> = match tls {
        Some(c) => {
            let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
            let conn = ClientConnection::new(c, name).map_err(io::Error::other)?;
            Box::new(rustls::StreamOwned::new(conn, sock))
        }
        None => Box::new(sock),
    };
    stream.write_all(&crate::handshake::upgrade(&target.to_string(), path, None))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other("the publisher's upgrade was refused"));
    }
    let messages: Vec<Vec<u8>> = match &args.publish_file {
        Some(path) => {
            std::fs::read(path)?.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(masked_binary).collect()
        }
        None => vec![masked_binary(&vec![b'x'; args.publish_bytes])],
    };
    if messages.is_empty() {
        return Err(io::Error::other("--publish-file has no lines"));
    }
    let every = Duration::from_millis(args.publish_every_ms.max(1));
    Ok(std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut next = Instant::now();
        while next < until {
            let frame = &messages[sent as usize % messages.len()];
            if stream.write_all(frame).and_then(|()| stream.flush()).is_err() {
                break;
            }
            sent += 1;
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        sent
    }))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A client's binary frame (masked, as RFC 6455 requires of clients).
fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Moves one member along as far as its socket allows; with `welcome`, a member is joined at
/// the first frame after the 101, else at the 101.
fn step(m: &mut Member, request: &[u8], buf: &mut [u8], welcome: bool) -> io::Result<()> {
    if matches!(m.phase, Phase::Connecting) {
        if let Some(e) = m.sock.take_error()? {
            return Err(e);
        }
        match &mut m.tls {
            Some(t) => t.writer().write_all(request)?,
            None => m.sock.write_all(request)?,
        }
        m.phase = Phase::Upgrading;
    }
    if let Some(t) = &mut m.tls {
        while t.wants_write() {
            match t.write_tls(&mut m.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    loop {
        let n = match m.sock.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        match &mut m.tls {
            Some(t) => {
                let mut rd = &buf[..n];
                while !rd.is_empty() {
                    t.read_tls(&mut rd)?;
                    t.process_new_packets().map_err(io::Error::other)?;
                }
                while t.wants_write() {
                    match t.write_tls(&mut m.sock) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                let _ = t.reader().read_to_end(&mut m.seen);
            }
            None => m.seen.extend_from_slice(&buf[..n]),
        }
        // The 101 head, then at least one frame (the welcome).
        if let Some(end) = m.seen.windows(4).position(|w| w == b"\r\n\r\n") {
            if !m.seen.starts_with(b"HTTP/1.1 101") {
                return Err(io::Error::other("upgrade refused"));
            }
            if !welcome || m.seen.len() > end + 4 + 2 {
                let _ = m.scan.feed(&m.seen[end + 4..], &mut |_| {});
                m.phase = Phase::Joined;
                return Ok(());
            }
        }
    }
}
