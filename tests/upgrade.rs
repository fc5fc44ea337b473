//! Zero-downtime upgrade over real loopback sockets and two real processes: a new barrage takes
//! the listeners and rooms of the running one through the control socket, the old one drains
//! its clients into it and exits. Clients follow the README's client algorithm.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use barrage::proto::{Block, Message, ServerFrame, server_frame};
use common::{Client, Gateway, http};
use prost::Message as _;
use serde_json::{Value, json};
use tungstenite::protocol::Message as WsMessage;

const ROOMS: [&str; 2] = ["up0", "up1"];

fn flags<'a>(control: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = vec![
        "--upgrade-control-socket",
        control,
        // Fast waves so the test is short; the history holds what a drain this long misses.
        "--drain-reconnect-rate-per-s",
        "40",
        "--drain-delay-ms",
        "50",
        "--drain-jitter-ms",
        "200",
        "--history-messages-max",
        "400",
    ];
    f.extend_from_slice(extra);
    f
}

/// A viewer following the README's client algorithm: per room the last seq shown; duplicates
/// dropped; a gap filled by short polling before showing the block; on `reconnect` (or a lost
/// connection) it reconnects to the same address with `after=last`.
struct Follower {
    room: String,
    last: u64,
    /// (seq, text) of every message shown, in order.
    shown: Vec<(u64, String)>,
    duplicates: u64,
    gaps_filled: u64,
    reconnect_frames: u64,
    connections: u64,
}

impl Follower {
    fn new(room: &str) -> Follower {
        Follower {
            room: room.into(),
            last: 0,
            shown: Vec::new(),
            duplicates: 0,
            gaps_filled: 0,
            reconnect_frames: 0,
            connections: 0,
        }
    }

    /// Follows until `stop` is set and it has shown `target`'s seq for its room.
    fn run(mut self, ws: SocketAddr, stop: &AtomicBool, target: &Mutex<Option<u64>>) -> Follower {
        let deadline = Instant::now() + Duration::from_secs(60);
        'connections: while Instant::now() < deadline {
            let caught_up = || stop.load(Ordering::Acquire) && target.lock().unwrap().is_some_and(|t| self.last >= t);
            if caught_up() {
                break;
            }
            let after = if self.last > 0 { format!("&after={}", self.last) } else { String::new() };
            let url = format!("ws://{ws}/ws?room={}{after}", self.room);
            let Ok((mut socket, _)) = tungstenite::connect(url.as_str()) else {
                // A draining process refuses upgrades (503) until its accepts are cancelled.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            self.connections += 1;
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = socket.get_ref() {
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            }
            loop {
                if stop.load(Ordering::Acquire) && target.lock().unwrap().is_some_and(|t| self.last >= t) {
                    break 'connections;
                }
                let frame = match socket.read() {
                    Ok(WsMessage::Binary(b)) => ServerFrame::decode(b.as_ref()).unwrap().frame.unwrap(),
                    Ok(_) => continue,
                    Err(tungstenite::Error::Io(e))
                        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                    {
                        continue;
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue 'connections;
                    }
                };
                match frame {
                    server_frame::Frame::Block(b) => self.show(&b, ws),
                    server_frame::Frame::Reconnect(r) => {
                        self.reconnect_frames += 1;
                        assert_eq!(r.url, "", "an upgrade reconnects to the same address");
                        std::thread::sleep(Duration::from_millis(u64::from(r.delay_ms)));
                        continue 'connections;
                    }
                    _ => {}
                }
            }
        }
        self
    }

    fn show(&mut self, block: &Block, ws: SocketAddr) {
        for m in &block.messages {
            if m.seq <= self.last {
                self.duplicates += 1;
                continue;
            }
            if self.last != 0 && m.seq > self.last + 1 {
                self.fill_gap(ws, m.seq);
            }
            self.record(m.seq, &m.data);
        }
    }

    /// Short polls `after=last` until the gap before `until` is closed.
    fn fill_gap(&mut self, ws: SocketAddr, until: u64) {
        self.gaps_filled += 1;
        while self.last + 1 < until {
            let (status, body) =
                http(ws, "GET", &format!("/v1/rooms/{}/messages?after={}", self.room, self.last), None, &[]);
            assert_eq!(status, 200, "{body}");
            let page: Value = serde_json::from_str(&body).unwrap();
            let messages = page["messages"].as_array().unwrap();
            assert!(!messages.is_empty(), "a gap the history cannot fill: {body}");
            for m in messages {
                let m: Message = serde_json::from_value(m.clone()).unwrap();
                if m.seq > self.last && m.seq < until {
                    self.record(m.seq, &m.data);
                }
            }
        }
    }

    fn record(&mut self, seq: u64, data: &[u8]) {
        self.last = seq;
        self.shown.push((seq, String::from_utf8_lossy(data).into_owned()));
    }
}

/// One request on a fresh connection, tolerant of the moment the old process retires its API:
/// None when the connection failed before an answer (the publish may or may not have landed).
fn try_http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// What the publisher sent: per room, texts answered 202, and texts whose answer was lost.
#[derive(Default)]
struct Sent {
    accepted: [BTreeSet<String>; 2],
    unknown: [BTreeSet<String>; 2],
    refused_503: u64,
}

/// Publishes one message every 20 ms, alternating rooms, until `stop`; a 503 (the rooms are
/// moving) is retried with the same text, as a business client does.
fn publisher(api: SocketAddr, stop: Arc<AtomicBool>, sent: Arc<Mutex<Sent>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let i = (n % 2) as usize;
            let text = format!("m{n}");
            let body = json!({"type": "chat", "text": text}).to_string();
            loop {
                match try_http(api, "POST", &format!("/v1/rooms/{}/messages", ROOMS[i]), &body) {
                    Some((202, _)) => {
                        sent.lock().unwrap().accepted[i].insert(text.clone());
                        break;
                    }
                    Some((503, _)) => {
                        sent.lock().unwrap().refused_503 += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Some((status, body)) => panic!("publish answered {status}: {body}"),
                    None => {
                        sent.lock().unwrap().unknown[i].insert(text.clone());
                        break;
                    }
                }
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn last_seq(api: SocketAddr, room: &str) -> u64 {
    let (status, body) = http(api, "GET", &format!("/v1/rooms/{room}"), None, &[]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["last_seq"].as_u64().or_else(|| v["last_seq"].as_str().and_then(|s| s.parse().ok())).unwrap()
}

/// The issue's scenario: viewers following the client algorithm and a publisher running
/// throughout; a new process takes over; every viewer shows every accepted message exactly
/// once, in seq order, without a gap; history, seqs, bans and attributes carry over; the old
/// process exits by itself.
#[test]
fn an_upgrade_loses_nothing_and_clients_see_no_gap_and_no_duplicate() {
    let dir = std::env::temp_dir().join(format!("barrage-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    let control = control.to_str().unwrap();
    let mut old = Gateway::start(&flags(control, &[]));

    let stop = Arc::new(AtomicBool::new(false));
    let targets: Vec<Arc<Mutex<Option<u64>>>> = ROOMS.iter().map(|_| Arc::new(Mutex::new(None))).collect();
    let followers: Vec<_> = (0..12)
        .map(|i| {
            let (stop, target, ws) = (Arc::clone(&stop), Arc::clone(&targets[i % 2]), old.ws);
            std::thread::spawn(move || Follower::new(ROOMS[i % 2]).run(ws, &stop, &target))
        })
        .collect();
    for room in ROOMS {
        old.wait_online(room, 6);
    }
    let sent = Arc::new(Mutex::new(Sent::default()));
    let publishing = Arc::new(AtomicBool::new(false));
    let pub_thread = publisher(old.api, Arc::clone(&publishing), Arc::clone(&sent));
    std::thread::sleep(Duration::from_millis(700));

    // State the next process must keep: a ban with an expiry, an attribute.
    let (status, body) =
        http(old.api, "POST", "/v1/rooms/up0/bans", Some(r#"{"user":"mallory","duration_ms":3600000}"#), &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(old.api, "PUT", "/v1/rooms/up0/attributes/seat1", Some(r#"{"value":"alice"}"#), &[]);
    assert!(status == 200 || status == 202, "{status} {body}");
    let seq_before = last_seq(old.api, "up0");

    let new = Gateway::start(&flags(control, &["--takeover", ""]));
    assert_eq!((new.ws, new.api), (old.ws, old.api), "the same addresses, handed over");
    assert!(old.wait_exit(Duration::from_secs(30)), "the old process drains into the new one and exits");
    std::thread::sleep(Duration::from_millis(500));
    publishing.store(true, Ordering::Release);
    pub_thread.join().unwrap();

    for (i, room) in ROOMS.iter().enumerate() {
        *targets[i].lock().unwrap() = Some(last_seq(new.api, room));
    }
    stop.store(true, Ordering::Release);
    let followers: Vec<Follower> = followers.into_iter().map(|f| f.join().unwrap()).collect();

    let sent = sent.lock().unwrap();
    assert!(sent.accepted.iter().all(|s| s.len() > 20), "publishing ran throughout");
    let mut suppressed = 0;
    for f in &followers {
        let i = ROOMS.iter().position(|r| *r == f.room).unwrap();
        let seqs: Vec<u64> = f.shown.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{}: a gap or a repeat in {seqs:?}", f.room);
        let shown: BTreeSet<String> = f.shown.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(shown.len(), f.shown.len(), "{}: a message shown twice", f.room);
        let missing: Vec<_> = sent.accepted[i].difference(&shown).collect();
        assert!(missing.is_empty(), "{}: accepted but never shown: {missing:?}", f.room);
        let extra: Vec<_> = shown.difference(&sent.accepted[i]).filter(|t| !sent.unknown[i].contains(*t)).collect();
        assert!(extra.is_empty(), "{}: shown but never published: {extra:?}", f.room);
        assert!(f.reconnect_frames >= 1 && f.connections >= 2, "{} moved by a reconnect frame", f.room);
        suppressed += f.duplicates;
    }
    eprintln!(
        "upgrade: {} + {} accepted, {} answered 503 and retried, {suppressed} duplicates suppressed, {} gaps filled",
        sent.accepted[0].len(),
        sent.accepted[1].len(),
        sent.refused_503,
        followers.iter().map(|f| f.gaps_filled).sum::<u64>()
    );

    // The seqs continued; a fresh viewer's backfill reaches back before the upgrade.
    assert!(last_seq(new.api, "up0") > seq_before);
    let mut fresh = Client::connect(&new.url("?room=up0"), None);
    fresh.welcome();
    let backfill = fresh.block();
    assert!(backfill.messages.first().is_some_and(|m| m.seq <= seq_before), "history came along");
    // The ban (with its expiry) and the attribute came along.
    let (_, lists) = http(new.api, "GET", "/v1/rooms/up0/moderation", None, &[]);
    let lists: Value = serde_json::from_str(&lists).unwrap();
    assert_eq!(lists["bans"][0]["user"], "mallory", "{lists}");
    assert!(lists["bans"][0]["until_ms"].as_i64().is_some(), "{lists}");
    let mut banned = Client::connect(&new.url(&format!("?room=up0&token={}", common::token("mallory"))), None);
    banned.welcome();
    let refused = loop {
        match banned.recv() {
            server_frame::Frame::Error(e) => break e.code == 403,
            server_frame::Frame::Block(_) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert!(refused, "a user banned before the upgrade is refused after it");
    let (_, attrs) = http(new.api, "GET", "/v1/rooms/up0/attributes", None, &[]);
    assert!(attrs.contains("seat1") && attrs.contains("alice"), "{attrs}");
    assert!(new.metric("barrage_handover_rooms_total{way=\"imported\"}") >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new process that asks and then never says READY (it hangs): at `upgrade.timeout_ms` the
/// old one takes its rooms back — publishes held while it waited are served, and viewers keep
/// getting blocks.
#[test]
fn a_takeover_that_never_completes_leaves_the_old_process_serving() {
    let dir = std::env::temp_dir().join(format!("barrage-upgrade-abort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    let control = control.to_str().unwrap();
    let gw = Gateway::start(&flags(control, &["--upgrade-timeout-ms", "1500"]));
    let mut viewer = Client::connect(&gw.url("?room=r"), None);
    viewer.welcome();
    gw.wait_online("r", 1);

    let mut ctl = UnixStream::connect(control).unwrap();
    ctl.write_all(b"{\"version\":1,\"pid\":1}\n").unwrap();
    let mut header = [0u8; 16];
    ctl.read_exact(&mut header).unwrap();
    assert_eq!(&header[..4], b"BRGO", "an offer");
    // While the rooms are frozen the API accepts nothing: this publish waits in the queue.
    let api = gw.api;
    let held =
        std::thread::spawn(move || try_http(api, "POST", "/v1/rooms/r/messages", r#"{"type":"chat","text":"held"}"#));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!held.is_finished(), "accepting is paused while the rooms are handed over");
    drop(ctl);
    let (status, body) = held.join().unwrap().expect("answered once the old process carries on");
    assert_eq!(status, 202, "{body}");
    let block = viewer.block();
    assert_eq!(block.messages[0].data, b"held");
    assert_eq!(gw.publish("r", json!({"type": "chat", "text": "after"})).0, 202);

    // A second gateway on the same control socket without --takeover is refused.
    let clash = std::process::Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--jwt-secret", common::SECRET])
        .args(["--upgrade-control-socket", control])
        .output()
        .unwrap();
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("--takeover"), "{clash:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A new process whose `upgrade.snapshot_bytes_max` is smaller than the rooms' state refuses
/// it, says why and exits; the old one keeps serving with its rooms.
#[test]
fn a_snapshot_over_the_bound_is_refused_and_the_old_process_keeps_its_rooms() {
    let dir = std::env::temp_dir().join(format!("barrage-upgrade-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    let control = control.to_str().unwrap();
    let gw = Gateway::start(&flags(control, &[]));
    for i in 0..20 {
        assert_eq!(gw.publish("big", json!({"type": "chat", "text": format!("message {i}")})).0, 202);
    }
    std::thread::sleep(Duration::from_millis(200));
    let seq = last_seq(gw.api, "big");
    let new = std::process::Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--jwt-secret", common::SECRET])
        .args(["--upgrade-control-socket", control, "--upgrade-snapshot-bytes-max", "100", "--takeover"])
        .output()
        .unwrap();
    assert!(!new.status.success());
    let err = String::from_utf8_lossy(&new.stderr);
    assert!(err.contains("upgrade.snapshot_bytes_max"), "{err}");
    // The old process thawed: it takes publishes, and its seqs go on from where they were.
    assert_eq!(gw.publish("big", json!({"type": "chat", "text": "after"})).0, 202);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(last_seq(gw.api, "big"), seq + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--takeover` where no barrage serves the control socket starts fresh (one command for first
/// starts and upgrades) and serves the socket itself.
#[test]
fn a_takeover_with_nobody_there_starts_fresh() {
    let dir = std::env::temp_dir().join(format!("barrage-upgrade-fresh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("control.sock");
    let gw = Gateway::start(&flags(control.to_str().unwrap(), &["--takeover", ""]));
    assert!(gw.stdout.iter().any(|l| l.contains("starting fresh")), "{:?}", gw.stdout);
    assert_eq!(gw.publish("r", json!({"type": "chat", "text": "x"})).0, 202);
    assert!(UnixStream::connect(&control).is_ok(), "it serves the control socket");
    let _ = std::fs::remove_dir_all(&dir);
}
