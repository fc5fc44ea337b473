//! What a reader that stops reading costs the kernel, over real loopback sockets against the
//! real binary: accepted sockets carry the capped send buffer (`websocket.send_buffer_bytes`,
//! read back with `ss -tmi` as the socket's `tb`), and the slow consumer is closed with an RST
//! (`websocket.abortive_close`): the client sees a connection reset, not a clean FIN, because
//! the kernel dropped the bytes it still held instead of keeping them for a reader that never
//! reads. With both knobs off, the old behaviour: an autotuned buffer and a FIN.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Gateway, http, upgrade_request};
use serde_json::json;
use socket2::{Domain, Socket, Type};

/// How the gateway's end of a stalled reader's connection looked, and how it ended.
struct Stalled {
    /// The server socket's send buffer (`ss` skmem `tb`), in bytes.
    send_buffer: u64,
    /// What the client read after the slow-consumer close: a reset, or EOF.
    ending: Ending,
}

#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Reset,
    Eof,
}

/// Connects a reader with a small receive buffer (so the server's buffers fill at once), joins
/// room `room` and never reads; publishes big messages until the gateway closes it as a slow
/// consumer; then reads what is left and says how the connection ended.
fn stall_one_reader(gw: &Gateway, room: &str) -> Stalled {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&gw.ws.into()).unwrap();
    let mut client: TcpStream = socket.into();
    std::io::Write::write_all(&mut client, &upgrade_request(&format!("/ws?room={room}"), &[])).unwrap();
    gw.wait_online(room, 1);
    let send_buffer = server_send_buffer(gw.ws, client.local_addr().unwrap());
    let big = json!({"data_b64": "A".repeat(4000)}).to_string();
    let t = Instant::now();
    while gw.metric("barrage_closed_total{reason=\"slow_consumer\"}") < 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "the stalled reader was never closed");
        for _ in 0..20 {
            let (status, body) = http(gw.api, "POST", &format!("/v1/rooms/{room}/messages"), Some(&big), &[]);
            assert_eq!(status, 202, "{body}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let ending = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ending::Eof,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break Ending::Reset,
            Err(e) => panic!("reading after the slow-consumer close: {e}"),
        }
    };
    Stalled { send_buffer, ending }
}

/// The send buffer (`tb`) of the gateway's socket for the connection from `client`, read with
/// `ss -Htmn` (iproute2) while it is established.
fn server_send_buffer(server: SocketAddr, client: SocketAddr) -> u64 {
    let filter = format!("( sport = :{} and dport = :{} )", server.port(), client.port());
    let t = Instant::now();
    loop {
        let out = Command::new("ss")
            .args(["-Htmn", "state", "established", &filter])
            .output()
            .expect("ss (iproute2) reads the socket's memory");
        let text = String::from_utf8_lossy(&out.stdout);
        let tb = text.split([',', '(', ')']).find_map(|f| f.strip_prefix("tb")?.parse().ok());
        if let Some(tb) = tb {
            return tb;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no established socket {filter} in ss: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stalled_reader_has_a_capped_send_buffer_and_is_reset() {
    let gw = Gateway::start(&[
        "--send-buffer-bytes",
        "8192",
        "--slow-consumer-ms",
        "300",
        "--send-queue-frames-max",
        "4",
        "--room-rate-per-s",
        "0",
    ]);
    let s = stall_one_reader(&gw, "stall");
    // The kernel doubles SO_SNDBUF for its bookkeeping (socket(7)): inherited from the listener.
    assert_eq!(s.send_buffer, 16_384, "the accepted socket carries the configured send buffer");
    assert_eq!(s.ending, Ending::Reset, "a slow consumer is closed with an RST, not a FIN");
    assert_eq!(gw.metric("barrage_resets_total"), 1);
    assert_eq!(gw.metric("barrage_reset_failed_total"), 0);
}

#[test]
fn with_both_knobs_off_the_buffer_autotunes_and_the_close_is_a_fin() {
    let gw = Gateway::start(&[
        "--send-buffer-bytes",
        "0",
        "--abortive-close",
        "false",
        "--slow-consumer-ms",
        "300",
        "--send-queue-frames-max",
        "4",
        "--room-rate-per-s",
        "0",
    ]);
    let s = stall_one_reader(&gw, "stall");
    let tcp_wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
    let default: u64 = tcp_wmem.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(s.send_buffer >= default, "autotuned: {} (tcp_wmem default {default})", s.send_buffer);
    assert_eq!(s.ending, Ending::Eof, "an orderly close: the client reads everything, then EOF");
    assert_eq!(gw.metric("barrage_resets_total"), 0);
}
