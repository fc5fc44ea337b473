//! The `ingest` scenario: how many messages a second barrage's business API takes in, and what
//! each costs the gateway — K keep-alive connections, each sending requests back to back for a
//! while: one protobuf `PublishRequest` per request (`single`), a protobuf `PublishBatch` of B
//! items (`batch`), B NDJSON lines (`ndjson`), or one streamed NDJSON request per connection
//! whose chunks carry B lines each, every chunk's answer read before the next (`stream`), round
//! the rooms `r0..rR`. Counts the messages
//! the answers say were accepted, and reads the gateway's CPU time over the window.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use barrage::proto::{PublishBatch, PublishItem, PublishRequest, publish_item};
use clap::{Args, ValueEnum};
use prost::Message as _;
use serde::Serialize;

use crate::addrs::parse_target;
use crate::probe::cpu_s;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestMode {
    Single,
    Batch,
    Ndjson,
    Stream,
}

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// barrage's business API (IPv4 loopback).
    #[arg(long)]
    api: String,
    #[arg(long, value_enum)]
    mode: IngestMode,
    /// Items per request (batch and ndjson).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Keep-alive connections, one thread each.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    #[arg(long, default_value_t = 1000)]
    rooms: u32,
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    #[arg(long)]
    duration_s: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// The gateway's pid, for its CPU time over the window.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long)]
    json: PathBuf,
    #[arg(long)]
    label: Option<String>,
}

#[derive(Debug, Serialize)]
struct IngestReport {
    scenario: &'static str,
    label: Option<String>,
    mode: IngestMode,
    batch: usize,
    connections: u32,
    rooms: u32,
    message_bytes: usize,
    duration_s: f64,
    requests: u64,
    accepted: u64,
    refused: u64,
    errors: u64,
    messages_per_s: f64,
    server_cpu_s: Option<f64>,
    /// Gateway CPU per accepted message, µs.
    server_cpu_us_per_message: Option<f64>,
    loadgen_cpu_s: Option<f64>,
}

/// Counts shared by the sending threads.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
}

pub fn run(args: IngestArgs) -> i32 {
    let api = match parse_target("--api", &args.api) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("barrage-load: {}", e.0);
            return 2;
        }
    };
    if args.connections == 0 || args.rooms == 0 || args.batch == 0 || args.duration_s <= 0.0 {
        eprintln!("barrage-load: --connections, --rooms, --batch and --duration-s must be positive");
        return 2;
    }
    let counts = Arc::new(Counts::default());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..args.connections)
        .map(|t| {
            let requests = requests(&args, t);
            let (counts, measuring, stop) = (Arc::clone(&counts), Arc::clone(&measuring), Arc::clone(&stop));
            let mode = args.mode;
            std::thread::spawn(move || match mode {
                IngestMode::Stream => stream_loop(api, &requests, &counts, &measuring, &stop),
                _ => send_loop(api, mode, &requests, &counts, &measuring, &stop),
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.warmup_s));
    let server_before = args.server_pid.and_then(|p| cpu_s(&format!("/proc/{p}/stat")));
    let own_before = cpu_s("/proc/self/stat");
    measuring.store(true, Ordering::Release);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.duration_s));
    measuring.store(false, Ordering::Release);
    let elapsed = started.elapsed().as_secs_f64();
    let server_after = args.server_pid.and_then(|p| cpu_s(&format!("/proc/{p}/stat")));
    let own_after = cpu_s("/proc/self/stat");
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let accepted = get(&counts.accepted);
    let server_cpu_s = server_before.zip(server_after).map(|(b, a)| a - b);
    let report = IngestReport {
        scenario: "ingest",
        label: args.label.clone(),
        mode: args.mode,
        batch: if args.mode == IngestMode::Single { 1 } else { args.batch },
        connections: args.connections,
        rooms: args.rooms,
        message_bytes: args.message_bytes,
        duration_s: elapsed,
        requests: get(&counts.requests),
        accepted,
        refused: get(&counts.refused),
        errors: get(&counts.errors),
        messages_per_s: accepted as f64 / elapsed,
        server_cpu_s,
        server_cpu_us_per_message: server_cpu_s.filter(|_| accepted > 0).map(|s| s * 1e6 / accepted as f64),
        loadgen_cpu_s: own_before.zip(own_after).map(|(b, a)| a - b),
    };
    println!(
        "ingest {:?} (batch {}): {:.0} messages/s, gateway {} µs/message, {} requests, {} refused, {} errors",
        report.mode,
        report.batch,
        report.messages_per_s,
        report.server_cpu_us_per_message.map_or("-".into(), |v| format!("{v:.2}")),
        report.requests,
        report.refused,
        report.errors
    );
    match serde_json::to_vec_pretty(&report).map(|j| std::fs::write(&args.json, j)) {
        Ok(Ok(())) => i32::from(accepted == 0 || report.errors > 0),
        _ => {
            eprintln!("barrage-load: cannot write {}", args.json.display());
            1
        }
    }
}

/// The requests thread `t` sends, round robin: built once (the gateway stamps ids and times).
fn requests(args: &IngestArgs, t: u32) -> Vec<Vec<u8>> {
    let data = vec![b'.'; args.message_bytes];
    let room = |i: usize| format!("r{}", (i + t as usize * 7919) % args.rooms as usize);
    let n = 8;
    (0..n)
        .map(|k| {
            let (path, content_type, body) = match args.mode {
                IngestMode::Single => {
                    let p = PublishRequest { data: data.clone(), ..PublishRequest::default() };
                    (format!("/v1/rooms/{}/messages", room(k)), "application/x-protobuf", p.encode_to_vec())
                }
                IngestMode::Batch => {
                    let items = (0..args.batch)
                        .map(|i| PublishItem {
                            target: Some(publish_item::Target::Room(room(k * args.batch + i))),
                            message: Some(PublishRequest { data: data.clone(), ..PublishRequest::default() }),
                        })
                        .collect();
                    ("/v1/publish".into(), "application/x-protobuf", PublishBatch { items }.encode_to_vec())
                }
                IngestMode::Ndjson | IngestMode::Stream => {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let mut body = Vec::new();
                    for i in 0..args.batch {
                        let line = serde_json::json!({"room": room(k * args.batch + i), "text": text});
                        body.extend_from_slice(line.to_string().as_bytes());
                        body.push(b'\n');
                    }
                    ("/v1/publish".into(), "application/x-ndjson", body)
                }
            };
            if args.mode == IngestMode::Stream {
                // One chunk of the stream (its head is written once per connection).
                return [format!("{:x}\r\n", body.len()).as_bytes(), &body, b"\r\n"].concat();
            }
            let mut req = format!(
                "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            req
        })
        .collect()
}

fn send_loop(
    api: SocketAddrV4,
    mode: IngestMode,
    requests: &[Vec<u8>],
    counts: &Counts,
    measuring: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut k = 0;
    while !stop.load(Ordering::Acquire) {
        let s = match stream.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect(api) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream.insert(s)
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let req = &requests[k % requests.len()];
        k += 1;
        let answer = s.write_all(req).and_then(|()| response(s, &mut buf));
        let counting = measuring.load(Ordering::Acquire);
        match answer {
            Ok((status, body)) => {
                let (ok, refused) = tally(mode, status, body);
                if counting {
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    counts.accepted.fetch_add(ok, Ordering::Relaxed);
                    counts.refused.fetch_add(refused, Ordering::Relaxed);
                }
            }
            Err(_) => {
                if counting {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
                stream = None;
            }
        }
    }
}

/// The `stream` mode: one streamed request per connection, a chunk of lines at a time, each
/// chunk's answer (one chunk of result lines) read before the next is sent.
fn stream_loop(api: SocketAddrV4, chunks: &[Vec<u8>], counts: &Counts, measuring: &AtomicBool, stop: &AtomicBool) {
    use std::io::BufRead;
    const HEAD: &[u8] =
        b"POST /v1/publish HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
    let open = || -> io::Result<(TcpStream, io::BufReader<TcpStream>)> {
        let mut s = TcpStream::connect(api)?;
        s.set_nodelay(true)?;
        s.write_all(HEAD)?;
        let r = io::BufReader::new(s.try_clone()?);
        Ok((s, r))
    };
    let mut conn: Option<(TcpStream, io::BufReader<TcpStream>, bool)> = None;
    let (mut k, mut line, mut answer) = (0, String::new(), Vec::new());
    while !stop.load(Ordering::Acquire) {
        let (w, r, headed) = match conn.as_mut() {
            Some(c) => c,
            None => match open() {
                Ok((w, r)) => conn.insert((w, r, false)),
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let chunk = &chunks[k % chunks.len()];
        k += 1;
        let mut exchange = || -> io::Result<(u64, u64)> {
            w.write_all(chunk)?;
            while !*headed {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                *headed = line == "\r\n";
            }
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(io::Error::other)?;
            answer.resize(size + 2, 0);
            r.read_exact(&mut answer)?;
            Ok(tally(IngestMode::Ndjson, 200, &answer[..size]))
        };
        let result = exchange();
        let counting = measuring.load(Ordering::Acquire);
        match result {
            Ok((ok, refused)) if counting => {
                counts.requests.fetch_add(1, Ordering::Relaxed);
                counts.accepted.fetch_add(ok, Ordering::Relaxed);
                counts.refused.fetch_add(refused, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                if counting {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
                conn = None;
            }
        }
    }
}

/// (accepted, refused) from one answer.
fn tally(mode: IngestMode, status: u16, body: &[u8]) -> (u64, u64) {
    match (mode, status) {
        (IngestMode::Single, 202) => (1, 0),
        (IngestMode::Single, _) => (0, 1),
        (IngestMode::Batch, 200) => {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            (v["accepted"].as_u64().unwrap_or(0), v["refused"].as_u64().unwrap_or(0))
        }
        (IngestMode::Ndjson, 200) => {
            let lines = body.split(|&b| b == b'\n').filter(|l| !l.is_empty());
            let (mut ok, mut no) = (0, 0);
            for line in lines {
                if line.starts_with(br#"{"id""#) { ok += 1 } else { no += 1 }
            }
            (ok, no)
        }
        _ => (0, 1),
    }
}

/// Reads one response: (status, body). `buf` is reused.
fn response<'a>(s: &mut TcpStream, buf: &'a mut Vec<u8>) -> io::Result<(u16, &'a [u8])> {
    buf.clear();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(buf).map_err(|e| io::Error::other(e.to_string()))? {
            let status = resp.code.unwrap_or(0);
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head + len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok((status, &buf[head..head + len]));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
