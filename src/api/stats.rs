//! Business API, the listener's own counters: the connection threads bump atomics (the API is
//! not a shard: a few business connections, a thread each, so nothing here sits on the viewers'
//! path), and `/metrics` renders a [`ServerStats`] snapshot as Prometheus text beside the
//! shards' series.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::access::Denied;
use super::http::HttpError;

/// Final responses are counted by status class, so the series set is fixed.
const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
const DENIED: usize = Denied::ALL.len();
const REFUSED: usize = HttpError::ALL.len();

/// Live counters of one API listener, shared by its acceptor and connection threads.
#[derive(Default)]
pub struct ServerCounters {
    /// Connections being served: the metric's gauge and the count the acceptor holds against
    /// `connections_max`, both.
    pub(super) active: AtomicUsize,
    accepted: AtomicU64,
    refused_full: AtomicU64,
    refused_spawn: AtomicU64,
    idle_timeouts: AtomicU64,
    requests: [AtomicU64; CLASSES.len()],
    denied: [AtomicU64; DENIED],
    refused: [AtomicU64; REFUSED],
    handler_panics: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// A snapshot of [`ServerCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub connections_accepted: u64,
    /// Gauge: connections being served now.
    pub connections_active: u64,
    /// Refused with 503 because `connections_max` were being served.
    pub connections_refused: u64,
    /// Closed at once because no thread could be started for them.
    pub connections_unspawned: u64,
    /// Closed because a request did not arrive whole within `idle_timeout_ms`.
    pub idle_timeouts: u64,
    /// Final responses by status class (2xx, 3xx, 4xx, 5xx), whoever answered: the routes, the
    /// authoriser's refusals, the reader's.
    pub requests: [u64; CLASSES.len()],
    /// Requests refused on their head, by [`Denied`] (in `Denied::ALL` order).
    pub denied: [u64; DENIED],
    /// Requests the reader refused, by [`HttpError`] (in `HttpError::ALL` order).
    pub refused: [u64; REFUSED],
    /// Route panics, answered 500 (a bug in the routes).
    pub handler_panics: u64,
    /// Bytes read off and written to API connections (heads, bodies, responses, 100s, 503s).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl ServerCounters {
    pub fn snapshot(&self) -> ServerStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: load(&self.accepted),
            connections_active: self.active.load(Ordering::Relaxed) as u64,
            connections_refused: load(&self.refused_full),
            connections_unspawned: load(&self.refused_spawn),
            idle_timeouts: load(&self.idle_timeouts),
            requests: self.requests.each_ref().map(load),
            denied: self.denied.each_ref().map(load),
            refused: self.refused.each_ref().map(load),
            handler_panics: load(&self.handler_panics),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
        }
    }

    pub(super) fn accepted(&self) {
        bump(&self.accepted, 1);
    }

    pub(super) fn refused_full(&self) {
        bump(&self.refused_full, 1);
    }

    pub(super) fn refused_spawn(&self) {
        bump(&self.refused_spawn, 1);
    }

    pub(super) fn idle_timeout(&self) {
        bump(&self.idle_timeouts, 1);
    }

    /// A final response with this status is about to be written.
    pub(super) fn responded(&self, status: u16) {
        bump(&self.requests[class_index(status)], 1);
    }

    pub(super) fn denied(&self, denied: Denied) {
        bump(&self.denied[denied as usize], 1);
    }

    pub(super) fn refused(&self, error: HttpError) {
        bump(&self.refused[error as usize], 1);
    }

    pub(super) fn handler_panic(&self) {
        bump(&self.handler_panics, 1);
    }

    pub(super) fn read(&self, bytes: usize) {
        bump(&self.bytes_in, bytes as u64);
    }

    pub(super) fn wrote(&self, bytes: usize) {
        bump(&self.bytes_out, bytes as u64);
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// 2xx → 0 … 5xx → 3; a status outside 200..=599 (a route bug) lands in the nearest class.
fn class_index(status: u16) -> usize {
    usize::from((status / 100).clamp(2, 5) - 2)
}

impl ServerStats {
    /// Final responses written, all classes.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Final responses in the class of `status` (404 → all 4xx).
    pub fn requests_like(&self, status: u16) -> u64 {
        self.requests[class_index(status)]
    }

    pub fn denied_for(&self, denied: Denied) -> u64 {
        self.denied[denied as usize]
    }

    pub fn refused_for(&self, error: HttpError) -> u64 {
        self.refused[error as usize]
    }

    /// Prometheus text exposition, `barrage_api_*` families with HELP and TYPE, for
    /// `metrics::render`'s extra lines.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4 * 1024);
        for Family(name, kind, help, samples) in self.families() {
            let _ = writeln!(out, "# HELP barrage_api_{name} {help}\n# TYPE barrage_api_{name} {kind}");
            for (labels, value) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "barrage_api_{name} {value}");
                } else {
                    let _ = writeln!(out, "barrage_api_{name}{{{labels}}} {value}");
                }
            }
        }
        out
    }

    /// Every family, in exposition order.
    fn families(&self) -> [Family; 10] {
        let one = |value| vec![(String::new(), value)];
        let classes = CLASSES.into_iter().zip(self.requests);
        let denied = Denied::ALL.map(|d| (denied_label(d), self.denied_for(d)));
        let refused = HttpError::ALL.map(|e| (refused_label(e), self.refused_for(e)));
        let refused_connections =
            [("connections_max", self.connections_refused), ("thread_spawn", self.connections_unspawned)];
        [
            Family(
                "connections_accepted_total",
                "counter",
                "API connections accepted, refused ones too.",
                one(self.connections_accepted),
            ),
            Family("connections", "gauge", "API connections being served.", one(self.connections_active)),
            Family(
                "connections_refused_total",
                "counter",
                "API connections closed at once: 503 over api.connections_max, or no thread could be started.",
                labelled("reason", refused_connections),
            ),
            Family(
                "idle_timeouts_total",
                "counter",
                "API connections closed because a request did not arrive whole within api.idle_timeout_ms.",
                one(self.idle_timeouts),
            ),
            Family(
                "requests_total",
                "counter",
                "API requests answered, by status class (routes' answers and refusals alike).",
                labelled("status", classes),
            ),
            Family(
                "auth_failures_total",
                "counter",
                "API requests refused on their head (401, 403) before any of the body was read; the connection is closed.",
                labelled("reason", denied),
            ),
            Family(
                "requests_refused_total",
                "counter",
                "API requests the HTTP reader refused (400, 411, 413, 431); the connection is closed.",
                labelled("reason", refused),
            ),
            Family(
                "handler_panics_total",
                "counter",
                "API routes that panicked, answered 500 (a bug).",
                one(self.handler_panics),
            ),
            Family("bytes_in_total", "counter", "Bytes read off API connections.", one(self.bytes_in)),
            Family("bytes_out_total", "counter", "Bytes written to API connections.", one(self.bytes_out)),
        ]
    }
}

/// One metric family: name after `barrage_api_`, type, help, and its samples as (labels, value).
struct Family(&'static str, &'static str, &'static str, Vec<(String, u64)>);

/// Samples of one labelled family: `key="value"` per pair.
fn labelled(key: &str, pairs: impl IntoIterator<Item = (&'static str, u64)>) -> Vec<(String, u64)> {
    pairs.into_iter().map(|(value, n)| (format!("{key}=\"{value}\""), n)).collect()
}

fn denied_label(denied: Denied) -> &'static str {
    match denied {
        Denied::KeyMissing => "key_missing",
        Denied::KeyWrong => "key_wrong",
        Denied::NotLoopback => "not_loopback",
    }
}

fn refused_label(error: HttpError) -> &'static str {
    match error {
        HttpError::HeadTooLarge => "head_too_large",
        HttpError::BodyTooLarge => "body_too_large",
        HttpError::Malformed => "malformed",
        HttpError::LengthRequired => "length_required",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_orders_index_the_arrays() {
        assert!(Denied::ALL.iter().enumerate().all(|(i, d)| *d as usize == i));
        assert!(HttpError::ALL.iter().enumerate().all(|(i, e)| *e as usize == i));
    }

    #[test]
    fn statuses_fall_in_their_class() {
        assert_eq!([200, 202, 301, 401, 404, 413, 500, 503].map(class_index), [0, 0, 1, 2, 2, 2, 3, 3]);
        assert_eq!([100, 0, 600, 999].map(class_index), [0, 0, 3, 3]);
    }

    #[test]
    fn counters_reach_the_snapshot() {
        let c = ServerCounters::default();
        c.accepted();
        c.accepted();
        c.refused_full();
        c.idle_timeout();
        c.responded(202);
        c.responded(401);
        c.responded(404);
        c.denied(Denied::KeyWrong);
        c.refused(HttpError::BodyTooLarge);
        c.read(100);
        c.wrote(40);
        c.active.store(3, Ordering::Relaxed);
        let s = c.snapshot();
        assert_eq!((s.connections_accepted, s.connections_active, s.connections_refused), (2, 3, 1));
        assert_eq!((s.idle_timeouts, s.requests, s.requests_total()), (1, [1, 0, 2, 0], 3));
        assert_eq!((s.requests_like(200), s.requests_like(499)), (1, 2));
        assert_eq!((s.denied_for(Denied::KeyWrong), s.denied_for(Denied::KeyMissing)), (1, 0));
        assert_eq!((s.refused_for(HttpError::BodyTooLarge), s.refused_for(HttpError::Malformed)), (1, 0));
        assert_eq!((s.bytes_in, s.bytes_out, s.handler_panics), (100, 40, 0));
    }

    #[test]
    fn render_is_prometheus_text() {
        let stats = ServerStats {
            connections_accepted: 7,
            requests: [5, 0, 2, 1],
            denied: [1, 0, 0],
            refused: [0, 3, 0, 0],
            bytes_in: 1234,
            ..ServerStats::default()
        };
        let text = stats.render();
        for line in [
            "# TYPE barrage_api_connections_accepted_total counter\nbarrage_api_connections_accepted_total 7\n",
            "# TYPE barrage_api_connections gauge\nbarrage_api_connections 0\n",
            "barrage_api_connections_refused_total{reason=\"connections_max\"} 0\n",
            "barrage_api_requests_total{status=\"2xx\"} 5\n",
            "barrage_api_requests_total{status=\"5xx\"} 1\n",
            "barrage_api_auth_failures_total{reason=\"key_missing\"} 1\n",
            "barrage_api_auth_failures_total{reason=\"not_loopback\"} 0\n",
            "barrage_api_requests_refused_total{reason=\"body_too_large\"} 3\n",
            "barrage_api_idle_timeouts_total 0\n",
            "barrage_api_bytes_in_total 1234\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Every sample belongs to a family declared once, just above it, with HELP and TYPE.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!declared.contains(&name), "{name} declared twice");
                assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP");
                declared.push(name);
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last(), Some(&name), "{line} outside its family");
                assert!(line.rsplit(' ').next().unwrap().parse::<u64>().is_ok(), "{line}");
            }
        }
        assert_eq!(declared.len(), 10);
    }
}
