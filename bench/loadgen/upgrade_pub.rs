//! The `upgrade` publisher, a thread of its own: `rate` messages a second round rooms
//! r0..r{R-1} through the business API (one keep-alive connection, `fanout_pub::Http`), each
//! retried until the gateway takes it — on 503 (the rooms are frozen while they move) and on a
//! lost connection (the old process closes its API connections once the new one serves) — as the
//! README asks of a business client. It counts what was accepted per room (202), the retries,
//! the answers lost after the request went out (such a retry may publish twice: the run's seq
//! accounting tells), and how long each message took from its first try to its 202 — the ones
//! that waited for the hand-over.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::fanout_msg::{Header, message};
use crate::fanout_pub::Http;
use crate::pace::TokenBucket;
use crate::sys::monotonic_ns;

/// A message that took longer than this from its first try to its 202 waited for the upgrade
/// (on loopback a publish answers in well under a millisecond).
pub const WAITED_MS: u64 = 100;
/// Pause before retrying a 503 (a hand-over freezes the rooms for well under a second).
const RETRY_503: Duration = Duration::from_millis(10);
/// Pause before retrying after a lost connection (a failed connect already paused 100 ms).
const RETRY_LOST: Duration = Duration::from_millis(10);
/// A message still refused after this long is given up (counted; the run fails).
const GIVE_UP: Duration = Duration::from_secs(60);
/// The publisher's longest nap between pacing checks.
const NAP: Duration = Duration::from_millis(5);

/// The publisher's running totals, read by the main thread each sample.
#[derive(Debug, Default)]
pub struct PubCount {
    pub accepted: AtomicU64,
    pub retried_503: AtomicU64,
    pub retried_lost: AtomicU64,
    /// Requests written whose answer never came (retried: maybe published twice).
    pub answers_lost: AtomicU64,
    pub waited: AtomicU64,
    /// Non-retryable refusals (any status but 202 and 503), and messages given up.
    pub refused: AtomicU64,
    pub given_up: AtomicU64,
}

/// What the publisher reports at the end.
#[derive(Debug)]
pub struct PubResult {
    pub accepted_per_room: Vec<u64>,
    /// `status_NNN` (refused), `api_*` (connection errors, retried).
    pub errors: BTreeMap<String, u64>,
    /// Microseconds from first try to 202, per accepted message.
    pub latency_us: Histogram<u64>,
}

/// What the publisher does.
pub struct PubPlan {
    pub api: SocketAddrV4,
    pub api_key: String,
    pub rooms: u32,
    pub rate_per_s: f64,
    pub message_bytes: usize,
}

/// Publishes until `stop`; the message in hand when it is set is still seen through.
pub fn run(plan: PubPlan, stop: Arc<AtomicBool>, count: Arc<PubCount>) -> PubResult {
    let all: Vec<u32> = (0..plan.rooms).collect();
    let mut http = Http::new(plan.api, &plan.api.to_string(), &plan.api_key, &all);
    let mut result = PubResult {
        accepted_per_room: vec![0; plan.rooms as usize],
        errors: BTreeMap::new(),
        latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
    };
    let mut msg = Vec::with_capacity(plan.message_bytes);
    // A burst of 100 ms: a late wake-up catches up; a stall (the hand-over) does not flood after.
    let mut bucket =
        TokenBucket::new(plan.rate_per_s, (plan.rate_per_s / 10.0).clamp(1.0, 65536.0) as u32, Instant::now());
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        if bucket.take(Instant::now(), 1) == 0 {
            std::thread::sleep(bucket.wait(Instant::now()).min(NAP));
            continue;
        }
        let room = (seq % u64::from(plan.rooms)) as u32;
        message(&Header { seq, send_ns: monotonic_ns(), room, publisher: 0 }, plan.message_bytes, &mut msg);
        publish_one(&mut http, room, &msg, &count, &mut result);
        seq += 1;
    }
    result
}

/// One message, until accepted, refused or given up.
fn publish_one(http: &mut Http, room: u32, msg: &[u8], count: &PubCount, result: &mut PubResult) {
    let first = Instant::now();
    loop {
        match http.send(room as usize, msg) {
            Ok(202) => {
                let us = first.elapsed().as_micros() as u64;
                result.latency_us.saturating_record(us.max(1));
                result.accepted_per_room[room as usize] += 1;
                count.accepted.fetch_add(1, Ordering::Relaxed);
                if us > WAITED_MS * 1000 {
                    count.waited.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(503) => {
                count.retried_503.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(RETRY_503);
            }
            Ok(status) => {
                *result.errors.entry(format!("status_{status}")).or_insert(0) += 1;
                count.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                *result.errors.entry(e.kind).or_insert(0) += 1;
                count.retried_lost.fetch_add(1, Ordering::Relaxed);
                if e.sent {
                    count.answers_lost.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(RETRY_LOST);
            }
        }
        if first.elapsed() > GIVE_UP {
            count.given_up.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// Reads one request's head and body; None at the end of the stream.
    fn read_request(r: &mut BufReader<TcpStream>) -> Option<String> {
        let mut first = String::new();
        if r.read_line(&mut first).ok()? == 0 {
            return None;
        }
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).ok()?;
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some(first.trim().to_string())
    }

    #[test]
    fn refused_and_lost_publishes_are_retried_until_accepted_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(api) = listener.local_addr().unwrap() else { unreachable!() };
        let server = std::thread::spawn(move || {
            let mut lines = Vec::new();
            // First connection: 202, then two 503s, then the connection closes unanswered.
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for answer in ["202 Accepted", "503 Service Unavailable", "503 Service Unavailable"] {
                lines.push(read_request(&mut r).unwrap());
                write!(w, "HTTP/1.1 {answer}\r\nContent-Length: 2\r\n\r\n{{}}").unwrap();
            }
            lines.push(read_request(&mut r).unwrap());
            drop((r, w));
            // Second connection: everything accepted.
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            while let Some(line) = read_request(&mut r) {
                lines.push(line);
                write!(w, "HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{{}}").unwrap();
            }
            lines
        });
        let mut http = Http::new(api, "h", "", &[0, 1]);
        let count = PubCount::default();
        let mut result = PubResult {
            accepted_per_room: vec![0; 2],
            errors: BTreeMap::new(),
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap(),
        };
        let mut msg = Vec::new();
        message(&Header { seq: 0, send_ns: 1, room: 0, publisher: 0 }, 100, &mut msg);
        publish_one(&mut http, 0, &msg, &count, &mut result);
        publish_one(&mut http, 1, &msg, &count, &mut result);
        publish_one(&mut http, 1, &msg, &count, &mut result);
        drop(http);
        let lines = server.join().unwrap();
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert_eq!(lines[0], "POST /v1/rooms/r0/messages HTTP/1.1");
        assert!(lines[1..].iter().all(|l| l == "POST /v1/rooms/r1/messages HTTP/1.1"), "{lines:?}");
        assert_eq!(result.accepted_per_room, vec![1, 2]);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!((load(&count.accepted), load(&count.retried_503)), (3, 2));
        assert_eq!((load(&count.retried_lost), load(&count.answers_lost)), (1, 1), "{:?}", result.errors);
        assert_eq!((load(&count.refused), load(&count.given_up)), (0, 0));
        assert_eq!(result.latency_us.len(), 3);
    }
}
