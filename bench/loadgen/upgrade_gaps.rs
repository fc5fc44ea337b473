//! The `upgrade` clients' short polls, on a thread of their own: a follower that saw a gap
//! (`upgrade_recv` → `GapAsk`) has shown the message after it and marked the gap (the README
//! allows either order); this thread asks the public listener for the missing seqs
//! (`GET /v1/rooms/R/messages?after=LAST`, page by page) and counts how many the history still
//! had (recovered) and how many it did not (lost). The same gap seen by many members of a room
//! is polled once. Blocking HTTP, off the workers' loops: gaps are the exception.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use crate::probe::{Api, json_u64};
use crate::upgrade_recv::GapAsk;

/// Messages a poll asks for (the gateway caps it at `poll_limit_max`, 100 by default).
const POLL_LIMIT: u32 = 100;
/// Pages one gap may take: a gap longer than the history is lost beyond it anyway.
const PAGES_MAX: u32 = 1000;

/// What the polls found, in all.
#[derive(Debug, Default)]
pub struct GapTally {
    /// Gaps asked about (one per client that saw one).
    pub asks: AtomicU64,
    /// Asks whose every missing seq the history still had.
    pub filled: AtomicU64,
    /// Missing messages the polls found, and those they did not (summed over asks).
    pub recovered: AtomicU64,
    pub lost: AtomicU64,
    /// Polls without an answer, or with one that was not the page expected.
    pub poll_errors: AtomicU64,
}

/// Polls for every gap asked until the channel closes (every worker's clients are gone).
pub fn run(public: Api, asks: Receiver<GapAsk>, tally: Arc<GapTally>) {
    let mut known: HashMap<GapAsk, u64> = HashMap::new();
    for ask in asks {
        tally.asks.fetch_add(1, Ordering::Relaxed);
        let found = match known.get(&ask) {
            Some(&n) => n,
            None => {
                let n = poll_gap(&public, ask, &tally);
                known.insert(ask, n);
                n
            }
        };
        let wanted = ask.until - ask.after - 1;
        tally.recovered.fetch_add(found, Ordering::Relaxed);
        tally.lost.fetch_add(wanted - found, Ordering::Relaxed);
        if found == wanted {
            tally.filled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How many of the gap's seqs the history has.
fn poll_gap(public: &Api, ask: GapAsk, tally: &GapTally) -> u64 {
    let mut cursor = ask.after;
    let mut found = 0;
    for _ in 0..PAGES_MAX {
        let path = format!("/v1/rooms/r{}/messages?after={cursor}&limit={POLL_LIMIT}", ask.room);
        let seqs = match public.get(&path) {
            Ok((200, body)) => page_seqs(&body),
            _ => None,
        };
        let Some(seqs) = seqs else {
            tally.poll_errors.fetch_add(1, Ordering::Relaxed);
            break;
        };
        found += in_gap(&seqs, ask);
        match seqs.last() {
            Some(&last) if last + 1 < ask.until && last > cursor => cursor = last,
            _ => break,
        }
    }
    found
}

/// The seqs of a short poll's page, in order; None if it is not one.
fn page_seqs(body: &str) -> Option<Vec<u64>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["messages"].as_array()?.iter().map(|m| json_u64(&m["seq"])).collect()
}

/// Seqs strictly between the gap's ends (a page is in order, each seq once).
fn in_gap(seqs: &[u64], ask: GapAsk) -> u64 {
    seqs.iter().filter(|&&s| s > ask.after && s < ask.until).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};

    #[test]
    fn a_page_s_seqs_are_read_as_strings_or_numbers() {
        let body = r#"{"messages":[{"id":"3","room":"r1","seq":"1882449317462017","type":"chat"},
            {"seq":1882449317462018}],"next":1882449317462019,"truncated":false,"poll_interval_ms":1500}"#;
        assert_eq!(page_seqs(body), Some(vec![1_882_449_317_462_017, 1_882_449_317_462_018]));
        assert_eq!(page_seqs(r#"{"messages":[],"next":5}"#), Some(vec![]));
        assert_eq!(page_seqs(r#"{"error":"bad cursor"}"#), None);
        assert_eq!(page_seqs(r#"{"messages":[{"seq":"x"}]}"#), None);
        let ask = GapAsk { room: 1, after: 10, until: 14 };
        assert_eq!(in_gap(&[9, 10, 11, 12, 13, 14, 15], ask), 3);
    }

    /// A short-poll server over `history` (seqs), answering pages of at most 2.
    fn serve(history: Vec<u64>, polls: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut paths = Vec::new();
            for _ in 0..polls {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut b).unwrap();
                    req.extend_from_slice(&b[..n]);
                }
                let line = String::from_utf8_lossy(&req).lines().next().unwrap().to_string();
                let path = line.split_whitespace().nth(1).unwrap().to_string();
                let after: u64 = path.split("after=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
                let page: Vec<String> =
                    history.iter().filter(|&&s| s > after).take(2).map(|s| format!(r#"{{"seq":"{s}"}}"#)).collect();
                let body = format!(r#"{{"messages":[{}],"truncated":false}}"#, page.join(","));
                let _ =
                    write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                paths.push(path);
            }
            paths
        });
        (addr, h)
    }

    #[test]
    fn a_gap_is_polled_page_by_page_once_and_counted() {
        // The history lost seq 103: a gap after 100 until 106 recovers 101, 102, 104, 105.
        let (addr, server) = serve(vec![101, 102, 104, 105, 106, 107], 2);
        let SocketAddr::V4(addr) = addr else { unreachable!() };
        let (tx, rx) = std::sync::mpsc::channel();
        let tally = Arc::new(GapTally::default());
        let ask = GapAsk { room: 4, after: 100, until: 106 };
        tx.send(ask).unwrap();
        tx.send(ask).unwrap();
        drop(tx);
        run(Api { addr, key: String::new() }, rx, Arc::clone(&tally));
        let paths = server.join().unwrap();
        assert_eq!(paths[0], "/v1/rooms/r4/messages?after=100&limit=100");
        assert_eq!(paths[1], "/v1/rooms/r4/messages?after=102&limit=100", "105 closes the gap: no third page");
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(load(&tally.asks), 2, "asked twice, polled once");
        assert_eq!((load(&tally.recovered), load(&tally.lost)), (8, 2));
        assert_eq!((load(&tally.filled), load(&tally.poll_errors)), (0, 0));
    }
}
