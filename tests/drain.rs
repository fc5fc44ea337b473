//! Draining over real loopback sockets: a SIGTERM delivers everything accepted before it and
//! then sends every viewer `reconnect`; a drain sends those in waves at the configured rate.

mod common;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use barrage::proto::{ServerFrame, server_frame};
use common::{Client, Gateway, Raw, http};
use prost::Message as _;
use serde_json::{Value, json};

/// Attack of the issue: 20 publishes answered 202, SIGTERM 0.3 s later. Every viewer gets all
/// 20, then `reconnect`, then a 1001 close; the process then exits by itself.
#[test]
fn sigterm_delivers_everything_accepted_then_sends_reconnect() {
    let mut gw =
        Gateway::start(&["--block-interval-ms", "1000", "--drain-delay-ms", "250", "--drain-jitter-ms", "500"]);
    let mut viewers: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(&gw.url("?room=live"), None);
            c.welcome();
            c
        })
        .collect();
    gw.wait_online("live", 3);
    for i in 0..20 {
        let (status, body) = gw.publish("live", json!({"text": format!("m{i}"), "type": "chat"}));
        assert_eq!(status, 202, "{body}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let _ = std::process::Command::new("kill").arg("-TERM").arg(gw.pid().to_string()).status();
    for v in &mut viewers {
        let mut got = 0;
        let reconnect = loop {
            match v.recv() {
                server_frame::Frame::Block(b) => got += b.messages.len(),
                server_frame::Frame::Reconnect(r) => break r,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(got, 20, "every message answered 202 before the drain arrived");
        assert!((250..=750).contains(&reconnect.delay_ms), "delay with jitter: {}", reconnect.delay_ms);
        assert_eq!(v.close_code(), Some(1001));
    }
    assert!(gw.wait_exit(Duration::from_secs(10)), "the drained process exits by itself");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The next server frame of a raw upgraded connection, or None when nothing is there yet.
fn try_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<server_frame::Frame> {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk) {
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => panic!("read: {e}"),
    }
    let h = barrage::wire::frame::decode_header(buf).ok()??;
    let end = h.header_len + h.payload_len as usize;
    if buf.len() < end {
        return None;
    }
    let frame = ServerFrame::decode(&buf[h.header_len..end]).ok().and_then(|f| f.frame);
    buf.drain(..end);
    frame
}

/// 2,000 viewers drained at 500 reconnects a second: the reconnects arrive in waves whose rate
/// stays within 20 % of the configured one, and `GET /v1/admin/drain` follows it to `done`.
#[test]
fn a_drain_sends_reconnects_in_waves_at_the_configured_rate() {
    let gw = Gateway::start(&["--connections-max", "5000"]);
    let mut viewers: Vec<(TcpStream, Vec<u8>, bool)> = (0..2_000)
        .map(|_| {
            let mut r = Raw::upgraded(gw.ws, "?room=crowd");
            r.read_frame(); // welcome
            let s = r.into_stream();
            s.set_nonblocking(true).unwrap();
            (s, Vec::new(), false)
        })
        .collect();
    gw.wait_online("crowd", 2_000);
    let (status, body) = http(gw.api, "POST", "/v1/admin/drain", Some(r#"{"rate_per_s": 500}"#), &[]);
    assert_eq!(status, 202, "{body}");
    let started = Instant::now();
    let mut arrivals = Vec::new();
    while arrivals.len() < viewers.len() && started.elapsed() < Duration::from_secs(20) {
        for (s, buf, told) in viewers.iter_mut().filter(|(_, _, told)| !*told) {
            while let Some(frame) = try_frame(s, buf) {
                if let server_frame::Frame::Reconnect(_) = frame {
                    arrivals.push(started.elapsed());
                    *told = true;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(arrivals.len(), 2_000, "every viewer was sent reconnect");
    arrivals.sort();
    // The rate over the waves, leaving out the first burst (a tenth of a second's worth).
    let from = arrivals[100];
    let to = arrivals[arrivals.len() - 1];
    let rate = 1_900.0 / (to - from).as_secs_f64();
    println!("observed {rate:.0} reconnects/s, configured 500");
    assert!((400.0..=600.0).contains(&rate), "observed {rate:.0} reconnects/s, configured 500");
    common::eventually("the drain reports done", || {
        let (_, body) = http(gw.api, "GET", "/v1/admin/drain", None, &[]);
        serde_json::from_str::<Value>(&body).unwrap()["state"] == "done"
    });
    assert!(gw.metric("barrage_reconnects_sent_total") == 2_000);
}
