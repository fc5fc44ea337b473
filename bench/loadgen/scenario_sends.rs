//! The `sends` scenario: client sends through the gateway, acknowledged — N signed-in clients
//! (one thread each, blocking sockets), each sending a chat line with an id and waiting for its
//! `ack` before the next, for a while. Reports acked sends per second, the time from send to
//! ack (p50/p99: the send hook's round trip, when one is configured, plus the wait for the
//! block that gives the seq), and the gateway's CPU per send. Run with and without a send hook
//! side by side (bench/hooks.sh): the difference is what the hook adds.
//!
//! Also the `backend` command: a trivial hook backend (thread per keep-alive connection,
//! JSON) that allows every call, for measuring the hook path rather than a backend.
#![forbid(unsafe_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use barrage::proto::{ClientFrame, HookRequest, Send, ServerFrame, client_frame, server_frame};
use barrage::wire::frame::{Opcode, masked_frame};
use clap::Args;
use prost::Message as _;
use serde::Serialize;

use crate::addrs::parse_target;
use crate::probe::cpu_s;

#[derive(Args, Debug)]
pub struct SendsArgs {
    /// barrage's public listener (IPv4 loopback).
    #[arg(long)]
    ws: String,
    /// The gateway's JWT secret (clients sign their own tokens).
    #[arg(long)]
    secret: String,
    /// Clients, one thread each, one send in flight each.
    #[arg(long, default_value_t = 32)]
    clients: u32,
    #[arg(long, default_value_t = 8)]
    rooms: u32,
    #[arg(long)]
    duration_s: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    #[arg(long)]
    server_pid: Option<u32>,
    /// The backend's pid, for its CPU time too.
    #[arg(long)]
    backend_pid: Option<u32>,
    #[arg(long)]
    json: PathBuf,
    #[arg(long)]
    label: Option<String>,
}

#[derive(Debug, Serialize)]
struct SendsReport {
    scenario: &'static str,
    label: Option<String>,
    clients: u32,
    rooms: u32,
    duration_s: f64,
    acked: u64,
    refused: u64,
    errors: u64,
    sends_per_s: f64,
    ack_p50_ms: f64,
    ack_p90_ms: f64,
    ack_p99_ms: f64,
    server_cpu_us_per_send: Option<f64>,
    backend_cpu_us_per_send: Option<f64>,
}

#[derive(Default)]
struct Counts {
    acked: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

pub fn run(args: SendsArgs) -> i32 {
    let ws = match parse_target("--ws", &args.ws) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("barrage-load: {}", e.0);
            return 2;
        }
    };
    if args.clients == 0 || args.rooms == 0 || args.duration_s <= 0.0 {
        eprintln!("barrage-load: --clients, --rooms and --duration-s must be positive");
        return 2;
    }
    let counts = Arc::new(Counts::default());
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 3600;
    let threads: Vec<_> = (0..args.clients)
        .map(|i| {
            let token = barrage::auth::sign_hs256(
                args.secret.as_bytes(),
                &serde_json::json!({"sub": format!("s{i}"), "exp": exp}),
            );
            let path = format!("/ws?room=r{}&token={token}", i % args.rooms);
            let (counts, latencies, measuring, stop) =
                (Arc::clone(&counts), Arc::clone(&latencies), Arc::clone(&measuring), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                if let Err(e) = client(ws, &path, &counts, &mut mine, &measuring, &stop) {
                    eprintln!("barrage-load: client: {e}");
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s));
    let cpu = |pid: Option<u32>| pid.and_then(|p| cpu_s(&format!("/proc/{p}/stat")));
    let (server_before, backend_before) = (cpu(args.server_pid), cpu(args.backend_pid));
    let acked_before = counts.acked.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Release);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.duration_s));
    measuring.store(false, Ordering::Release);
    let elapsed = started.elapsed().as_secs_f64();
    let acked = counts.acked.load(Ordering::Relaxed) - acked_before;
    let (server_after, backend_after) = (cpu(args.server_pid), cpu(args.backend_pid));
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    let per_send =
        |b: Option<f64>, a: Option<f64>| b.zip(a).filter(|_| acked > 0).map(|(b, a)| (a - b) * 1e6 / acked as f64);
    let report = SendsReport {
        scenario: "sends",
        label: args.label.clone(),
        clients: args.clients,
        rooms: args.rooms,
        duration_s: elapsed,
        acked,
        refused: counts.refused.load(Ordering::Relaxed),
        errors: counts.errors.load(Ordering::Relaxed),
        sends_per_s: acked as f64 / elapsed,
        ack_p50_ms: pct(0.5),
        ack_p90_ms: pct(0.9),
        ack_p99_ms: pct(0.99),
        server_cpu_us_per_send: per_send(server_before, server_after),
        backend_cpu_us_per_send: per_send(backend_before, backend_after),
    };
    println!(
        "sends {}: {:.0} acked/s, ack p50 {:.2} ms p99 {:.2} ms, gateway {} µs/send, {} refused, {} errors",
        report.label.as_deref().unwrap_or(""),
        report.sends_per_s,
        report.ack_p50_ms,
        report.ack_p99_ms,
        report.server_cpu_us_per_send.map_or("-".into(), |v| format!("{v:.1}")),
        report.refused,
        report.errors
    );
    match serde_json::to_vec_pretty(&report).map(|j| std::fs::write(&args.json, j)) {
        Ok(Ok(())) => i32::from(acked == 0 || report.errors > 0),
        _ => {
            eprintln!("barrage-load: cannot write {}", args.json.display());
            1
        }
    }
}

/// One client: connect, then send and wait for each ack until stopped.
fn client(
    ws: std::net::SocketAddrV4,
    path: &str,
    counts: &Counts,
    latencies: &mut Vec<u32>,
    measuring: &AtomicBool,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut s = TcpStream::connect(ws)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&crate::handshake::upgrade(&ws.to_string(), path, Some("barrage.v1.proto")))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if line.starts_with("HTTP/1.1") && !line.starts_with("HTTP/1.1 101") {
            return Err(io::Error::other(format!("handshake: {}", line.trim())));
        }
    }
    let mut frame = Vec::new();
    for n in 0u64.. {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let id = n.to_string();
        let send = Send { r#type: "chat".into(), data: format!("line {n}").into_bytes(), id: id.clone() };
        let msg = ClientFrame { frame: Some(client_frame::Frame::Send(send)) }.encode_to_vec();
        frame.clear();
        masked_frame(true, Opcode::Binary as u8, &msg, [1, 2, 3, 4], &mut frame);
        let sent = Instant::now();
        s.write_all(&frame)?;
        loop {
            let payload = read_frame(&mut r)?;
            let Ok(f) = ServerFrame::decode(payload.as_slice()) else { continue };
            let Some(server_frame::Frame::Ack(a)) = f.frame else { continue };
            if a.id != id {
                continue;
            }
            if a.code == 0 {
                counts.acked.fetch_add(1, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                }
            } else {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            break;
        }
    }
    Ok(())
}

/// One unmasked server frame's payload.
fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0).min(1 << 24)];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Where to listen (loopback).
    #[arg(long)]
    listen: String,
}

/// A trivial hook backend: allows every call (JSON), one thread per keep-alive connection.
pub fn backend(args: BackendArgs) -> i32 {
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("barrage-load: backend {}: {e}", args.listen);
            return 2;
        }
    };
    println!("backend listening on {}", args.listen);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = serve(conn);
        });
    }
    0
}

fn serve(conn: TcpStream) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        let mut len = 0;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
        let req: HookRequest = serde_json::from_slice(&body).unwrap_or_default();
        let verdicts = |n: usize| vec!["{}"; n].join(",");
        let answer = format!(
            "{{\"connect\":[{}],\"join\":[{}],\"send\":[{}]}}",
            verdicts(req.connect.len()),
            verdicts(req.join.len()),
            verdicts(req.send.len())
        );
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        )?;
    }
}
