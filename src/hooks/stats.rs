//! Each hook's counts, shared by its workers and the shards (atomics), rendered as Prometheus
//! text: calls by outcome, requests by result, request latency as a histogram, the breaker.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::call::{Hook, Outcome};
use super::http::Failure;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestResult {
    Ok = 0,
    Timeout = 1,
    Error = 2,
    Status = 3,
    Malformed = 4,
    /// Not made: the breaker was open.
    Breaker = 5,
}

const RESULTS: [(RequestResult, &str); 6] = [
    (RequestResult::Ok, "ok"),
    (RequestResult::Timeout, "timeout"),
    (RequestResult::Error, "error"),
    (RequestResult::Status, "status"),
    (RequestResult::Malformed, "malformed"),
    (RequestResult::Breaker, "breaker"),
];

impl From<&Failure> for RequestResult {
    fn from(f: &Failure) -> RequestResult {
        match f {
            Failure::Timeout => RequestResult::Timeout,
            Failure::Io(_) => RequestResult::Error,
            Failure::Status(_) => RequestResult::Status,
            Failure::Malformed(_) => RequestResult::Malformed,
        }
    }
}

#[derive(Default)]
pub struct Stats {
    calls: [AtomicU64; 6],
    requests: [AtomicU64; 6],
    /// Calls carried by requests made (over requests: the mean batch).
    batched: AtomicU64,
    retries: AtomicU64,
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    breaker_open: AtomicBool,
    breaker_trips: AtomicU64,
    /// Calls waiting in the queue (a gauge, set by the workers).
    queued: AtomicU64,
}

impl Stats {
    pub fn call(&self, o: Outcome) {
        self.calls[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn calls_add(&self, o: Outcome, n: u64) {
        self.calls[o as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn calls(&self, o: Outcome) -> u64 {
        self.calls[o as usize].load(Ordering::Relaxed)
    }

    /// A request made with `calls` calls, and how it ended after `took`.
    pub fn request(&self, calls: usize, r: RequestResult, took: Duration) {
        self.requests[r as usize].fetch_add(1, Ordering::Relaxed);
        if r == RequestResult::Breaker {
            return;
        }
        self.batched.fetch_add(calls as u64, Ordering::Relaxed);
        let s = took.as_secs_f64();
        let bucket = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn breaker(&self, open: bool, tripped: bool) {
        self.breaker_open.store(open, Ordering::Relaxed);
        if tripped {
            self.breaker_trips.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn set_queued(&self, n: usize) {
        self.queued.store(n as u64, Ordering::Relaxed);
    }

    /// Prometheus text of the hooks that are configured.
    pub fn render(hooks: &[(Hook, &Stats)], out: &mut String) {
        if hooks.is_empty() {
            return;
        }
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        head(
            out,
            "barrage_hook_calls_total",
            "counter",
            "Hook calls by outcome (failed_*: the backend failed and the hook's fail_open decided; dropped: an event over its queue).",
        );
        for (hook, s) in hooks {
            for o in Outcome::ALL {
                let _ = writeln!(
                    out,
                    "barrage_hook_calls_total{{hook=\"{}\",outcome=\"{}\"}} {}",
                    hook.name(),
                    o.name(),
                    s.calls(o)
                );
            }
        }
        head(
            out,
            "barrage_hook_requests_total",
            "counter",
            "Requests to the backend by result (breaker: not made, the breaker was open).",
        );
        for (hook, s) in hooks {
            for (r, name) in RESULTS {
                let _ = writeln!(
                    out,
                    "barrage_hook_requests_total{{hook=\"{}\",result=\"{name}\"}} {}",
                    hook.name(),
                    get(&s.requests[r as usize])
                );
            }
        }
        let simple: [Simple; 5] = [
            (
                "barrage_hook_batched_calls_total",
                "counter",
                "Calls carried by requests made (divided by requests: the mean batch).",
                |s| s.batched.load(Ordering::Relaxed),
            ),
            (
                "barrage_hook_retries_total",
                "counter",
                "Requests asked again after a failure (connect and join only).",
                |s| s.retries.load(Ordering::Relaxed),
            ),
            ("barrage_hook_breaker_open", "gauge", "1 while the hook's circuit breaker is open.", |s| {
                u64::from(s.breaker_open.load(Ordering::Relaxed))
            }),
            ("barrage_hook_breaker_trips_total", "counter", "Times the circuit breaker opened.", |s| {
                s.breaker_trips.load(Ordering::Relaxed)
            }),
            ("barrage_hook_queued", "gauge", "Calls waiting for a request.", |s| s.queued.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, f) in simple {
            head(out, name, kind, help);
            for (hook, s) in hooks {
                let _ = writeln!(out, "{name}{{hook=\"{}\"}} {}", hook.name(), f(s));
            }
        }
        head(
            out,
            "barrage_hook_request_seconds",
            "histogram",
            "Time from a request's start to its whole answer (retries included).",
        );
        for (hook, s) in hooks {
            let mut cumulative = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                cumulative += get(&s.latency[i]);
                let _ = writeln!(
                    out,
                    "barrage_hook_request_seconds_bucket{{hook=\"{}\",le=\"{b}\"}} {cumulative}",
                    hook.name()
                );
            }
            cumulative += get(&s.latency[BUCKETS.len()]);
            let name = hook.name();
            let sum = get(&s.latency_sum_us) as f64 / 1e6;
            let _ = writeln!(
                out,
                "barrage_hook_request_seconds_bucket{{hook=\"{name}\",le=\"+Inf\"}} {cumulative}\nbarrage_hook_request_seconds_sum{{hook=\"{name}\"}} {sum}\nbarrage_hook_request_seconds_count{{hook=\"{name}\"}} {cumulative}"
            );
        }
    }
}

/// A plain series: name, kind, help, and how to read it from a hook's stats.
type Simple = (&'static str, &'static str, &'static str, fn(&Stats) -> u64);

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_a_cumulative_histogram() {
        let s = Stats::default();
        s.call(Outcome::Rewritten);
        s.request(3, RequestResult::Ok, Duration::from_micros(700));
        s.request(1, RequestResult::Timeout, Duration::from_secs(3));
        s.request(1, RequestResult::Breaker, Duration::ZERO);
        let mut out = String::new();
        Stats::render(&[(Hook::Send, &s)], &mut out);
        for line in [
            "barrage_hook_calls_total{hook=\"send\",outcome=\"rewritten\"} 1",
            "barrage_hook_requests_total{hook=\"send\",result=\"breaker\"} 1",
            "barrage_hook_batched_calls_total{hook=\"send\"} 4",
            "barrage_hook_request_seconds_bucket{hook=\"send\",le=\"0.0005\"} 0",
            "barrage_hook_request_seconds_bucket{hook=\"send\",le=\"0.001\"} 1",
            "barrage_hook_request_seconds_bucket{hook=\"send\",le=\"2.5\"} 1",
            "barrage_hook_request_seconds_bucket{hook=\"send\",le=\"+Inf\"} 2",
            "barrage_hook_request_seconds_count{hook=\"send\"} 2",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }
}
