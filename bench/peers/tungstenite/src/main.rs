//! tokio-tungstenite broadcast peer for bench/fanout.sh (the peer contract in bench/peers/README.md).
//!
//! `GET /sub?room=R` subscribes, `GET /pub?room=R` publishes: every binary message a publisher
//! sends goes to every subscriber of R as one binary frame with that payload.
//!
//! Broadcast path: one `tokio::sync::broadcast` channel per room (the idiomatic tokio fan-out);
//! the payload is a `Bytes` shared by every receiver, and each subscriber's task writes it with
//! `send` (one frame, one flush). Queue/drop policy, the library's own: the channel keeps the last
//! CHANNEL_CAPACITY messages; a receiver that falls further behind gets `Lagged(n)` and skips
//! those n messages (counted and printed here). tungstenite's own per-connection buffers are left
//! at their defaults (a 128 KiB read buffer per connection, an unbounded write buffer).
//!
//! Run: `PORT=8080 THREADS=2 peer-tungstenite` (or `peer-tungstenite PORT THREADS`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Messages a room's channel keeps for receivers that are behind; tokio needs a bound. Beyond
/// it a receiver skips (broadcast's lag policy), so this only sets how far behind is tolerated.
const CHANNEL_CAPACITY: usize = 4096;
/// The listen(2) backlog (the kernel clamps it to net.core.somaxconn).
const BACKLOG: i32 = 65535;

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Bytes>>>>;

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
    eprintln!("tokio-tungstenite peer on 127.0.0.1:{port}, {threads} worker threads");
    tokio::spawn(report_lag());
    let rooms: Rooms = Arc::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, rooms.clone()));
            }
            // EMFILE at the fd cap: back off instead of spinning.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
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

async fn connection(stream: TcpStream, rooms: Rooms) {
    let _ = stream.set_nodelay(true);
    let mut target = None;
    let callback = |req: &Request, resp: Response| {
        target = Some((req.uri().path().to_owned(), req.uri().query().and_then(room_of)));
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else { return };
    let Some((path, Some(room))) = target else { return };
    let tx = rooms.lock().unwrap().entry(room).or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0).clone();
    match path.as_str() {
        "/sub" => subscriber(ws, tx.subscribe()).await,
        "/pub" => publisher(ws, tx).await,
        _ => {}
    }
}

fn room_of(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| kv.strip_prefix("room=")).map(str::to_owned)
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Writes every room message, and reads only to notice the end (subscribers send nothing but
/// Close). Both `recv`s are cancel-safe, so one `select!` serves both directions.
async fn subscriber(ws: Ws, mut rx: broadcast::Receiver<Bytes>) {
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Ok(payload) => if sink.send(Message::Binary(payload)).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(n)) => { LAGGED.fetch_add(n, Ordering::Relaxed); }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            m = stream.next() => match m {
                Some(Ok(m)) if !m.is_close() => {}
                _ => break,
            },
        }
    }
}

async fn publisher(mut ws: Ws, tx: broadcast::Sender<Bytes>) {
    while let Some(Ok(m)) = ws.next().await {
        match m {
            // No subscribers is not an error for a broadcast.
            Message::Binary(payload) => drop(tx.send(payload)),
            Message::Close(_) => break,
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
