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
    /// idle: for measuring the fan-out's cost over TLS. Prints the bytes read at the end.
    #[arg(long)]
    read: bool,
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
    let request = crate::handshake::request(&target.to_string(), &args.room, crate::handshake::Subprotocol::Proto);
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
            members.push(Member { sock, tls, phase: Phase::Connecting, seen: Vec::new() });
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
            if let Err(e) = step(m, &request, &mut buf) {
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
        let mut read = 0u64;
        while Instant::now() < until {
            events.clear();
            epoll::wait(&poll, rustix::buffer::spare_capacity(&mut events), Some(&second))?;
            for ev in &events {
                let m = &mut members[ev.data.u64() as usize];
                read += drain(m, &mut buf).unwrap_or(0);
            }
        }
        println!("{}", serde_json::json!({ "scenario": "hold", "read_bytes": read }));
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

/// Reads (and decrypts) what a joined member was sent; returns the plaintext bytes.
fn drain(m: &mut Member, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match m.sock.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
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
                        total += plain as u64;
                    }
                }
            }
            None => total += n as u64,
        }
    }
}

/// Moves one member along as far as its socket allows.
fn step(m: &mut Member, request: &[u8], buf: &mut [u8]) -> io::Result<()> {
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
            if m.seen.len() > end + 4 + 2 {
                m.phase = Phase::Joined;
                return Ok(());
            }
        }
    }
}
