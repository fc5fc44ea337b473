//! fastwebsockets broadcast peer for bench/fanout.sh (the peer contract in bench/peers/README.md).
//!
//! `GET /sub?room=R` subscribes, `GET /pub?room=R` publishes: every binary message a publisher
//! sends goes to every subscriber of R as one binary frame with that payload. The upgrade goes
//! through hyper (`fastwebsockets::upgrade`), as the library's examples do.
//!
//! Broadcast path: one `tokio::sync::broadcast` channel per room; the payload is a `Bytes` shared
//! by every receiver and each subscriber's task writes it with `write_frame` (one frame, one
//! write). Queue/drop policy: the channel keeps the last CHANNEL_CAPACITY messages; a receiver
//! that falls further behind gets `Lagged(n)` and skips those n messages (counted and printed).
//!
//! Run: `PORT=8080 THREADS=2 peer-fastwebsockets` (or `peer-fastwebsockets PORT THREADS`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};

/// Messages a room's channel keeps for receivers that are behind; tokio needs a bound. Beyond
/// it a receiver skips (broadcast's lag policy), so this only sets how far behind is tolerated.
const CHANNEL_CAPACITY: usize = 4096;
/// The listen(2) backlog (the kernel clamps it to net.core.somaxconn).
const BACKLOG: i32 = 65535;

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Bytes>>>>;
type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

static LAGGED: AtomicU64 = AtomicU64::new(0);

fn main() {
    let (port, threads) = port_threads();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap();
    rt.block_on(serve(port, threads));
}

fn port_threads() -> (u16, usize) {
    let mut args = std::env::args().skip(1);
    let port = args.next().or_else(|| std::env::var("PORT").ok()).map_or(8080, |p| p.parse().expect("PORT"));
    let threads = args.next().or_else(|| std::env::var("THREADS").ok()).map_or(2, |t| t.parse().expect("THREADS"));
    (port, threads)
}

async fn serve(port: u16, threads: usize) {
    let listener = listen(SocketAddr::from(([127, 0, 0, 1], port)));
    eprintln!("fastwebsockets peer on 127.0.0.1:{port}, {threads} worker threads");
    tokio::spawn(report_lag());
    let rooms: Rooms = Arc::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE at the fd cap: back off instead of spinning.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let rooms = rooms.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, rooms.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
        });
    }
}

/// A listening socket with a real backlog (tokio's `TcpListener::bind` uses 1024).
fn listen(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_tcp_nodelay(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(BACKLOG).unwrap();
    s.set_nonblocking(true).unwrap();
    TcpListener::from_std(s.into()).unwrap()
}

async fn handle(mut req: Request<Incoming>, rooms: Rooms) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let room = req.uri().query().and_then(room_of);
    let path = req.uri().path().to_owned();
    let (Some(room), "/sub" | "/pub") = (room, path.as_str()) else {
        let mut not_found = Response::new(Empty::new());
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return Ok(not_found);
    };
    let (response, fut) = upgrade::upgrade(&mut req)?;
    let tx = rooms.lock().unwrap().entry(room).or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0).clone();
    let subscribe = path == "/sub";
    // Subscribe before answering, so nothing published after the 101 is missed.
    let rx = subscribe.then(|| tx.subscribe());
    tokio::spawn(async move {
        let Ok(ws) = fut.await else { return };
        match rx {
            Some(rx) => subscriber(ws, rx).await,
            None => publisher(ws, tx).await,
        }
    });
    Ok(response)
}

fn room_of(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| kv.strip_prefix("room=")).map(str::to_owned)
}

/// Writes every room message; a second task reads, only to notice the end (subscribers send
/// nothing but Close; `read_frame` is not cancel-safe, so it gets a task of its own).
async fn subscriber(ws: fastwebsockets::WebSocket<Upgraded>, mut rx: broadcast::Receiver<Bytes>) {
    let (mut read, mut write) = ws.split(tokio::io::split);
    let (done_tx, mut done) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut ignore = |_: Frame<'_>| async { Ok::<_, WebSocketError>(()) };
        while let Ok(frame) = read.read_frame(&mut ignore).await {
            if frame.opcode == OpCode::Close {
                break;
            }
        }
        drop(done_tx);
    });
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(payload) => {
                    if write.write_frame(Frame::binary(Payload::Borrowed(&payload))).await.is_err() { break }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => { LAGGED.fetch_add(n, Ordering::Relaxed); }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = &mut done => break,
        }
    }
}

async fn publisher(ws: fastwebsockets::WebSocket<Upgraded>, tx: broadcast::Sender<Bytes>) {
    let mut ws = FragmentCollector::new(ws);
    while let Ok(frame) = ws.read_frame().await {
        match frame.opcode {
            // One copy per message (into the shared Bytes), none per subscriber. No subscribers
            // is not an error for a broadcast.
            OpCode::Binary => drop(tx.send(Bytes::copy_from_slice(&frame.payload))),
            OpCode::Close => break,
            _ => {}
        }
    }
}

async fn report_lag() {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = LAGGED.load(Ordering::Relaxed);
        if now != last {
            eprintln!("lagged (skipped by the broadcast channel): {now} deliveries");
            last = now;
        }
    }
}
