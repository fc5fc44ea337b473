//! Business hooks: the gateway asks a stateless backend before it opens a connection
//! (`connect`), lets one into a room (`join`) or takes a client's message (`send`), and tells
//! it what happened (`events`: disconnects and leaves, fire-and-forget). Configured per hook by
//! URL (`[hook_connect]`, `[hook_join]`, `[hook_send]`, `[hook_events]`).
//!
//! No shard ever waits on the backend. A shard hands a call to its hook's bounded queue
//! ([`Gate::submit`]) and goes on; the connection, join or send waits (the shard keeps a few
//! bytes of state for it). Each hook has its own worker threads, one per in-flight request,
//! each with a keep-alive connection (`http`); a worker takes what is queued (up to
//! `batch_max` calls, waiting up to `batch_ms` for more), makes one request, and mails each
//! verdict to the shard that asked, like any other mail on the mesh. A queue full, a timeout,
//! an error or an open breaker (`breaker`) gives every call of the request the hook's failure
//! verdict (`fail_open`). Connect and join only ask, so a failed attempt is retried (`retries`);
//! a send or an event never is.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod call;
pub mod http;
pub mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use self::breaker::{Admit, Breaker};
use self::call::{Call, Hook, Outcome, SendRules, Verdict};
use self::http::{Client, Failure, Url};
use self::stats::{RequestResult, Stats};
use crate::config::{Config, HookFormat};
use crate::hub::mail::{HostMail, Mail};
use crate::shard::mesh::Mesh;

/// One hook's settings, from its config section.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: String,
    pub format: HookFormat,
    pub timeout_ms: u64,
    pub in_flight_max: usize,
    pub queue_max: usize,
    pub batch_max: usize,
    pub batch_ms: u64,
    pub fail_open: bool,
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_open_ms: u64,
}

impl Settings {
    /// Each configured hook's settings.
    pub fn all(c: &Config) -> Vec<(Hook, Settings)> {
        // The four sections share their keys; send and events are never retried, events never
        // refuse anything.
        macro_rules! settings {
            ($s:expr, $fail_open:expr, $retries:expr) => {
                Settings {
                    url: $s.url.clone(),
                    format: $s.format,
                    timeout_ms: $s.timeout_ms,
                    in_flight_max: $s.in_flight_max,
                    queue_max: $s.queue_max,
                    batch_max: $s.batch_max,
                    batch_ms: $s.batch_ms,
                    fail_open: $fail_open,
                    retries: $retries,
                    breaker_failures: $s.breaker_failures,
                    breaker_open_ms: $s.breaker_open_ms,
                }
            };
        }
        let (hc, hj, hs, he) = (&c.hook_connect, &c.hook_join, &c.hook_send, &c.hook_events);
        let all = [
            (Hook::Connect, settings!(hc, hc.fail_open, hc.retries)),
            (Hook::Join, settings!(hj, hj.fail_open, hj.retries)),
            (Hook::Send, settings!(hs, hs.fail_open, 0)),
            (Hook::Events, settings!(he, true, 0)),
        ];
        all.into_iter().filter(|(_, s)| !s.url.is_empty()).collect()
    }

    /// Checks one hook's settings; `section` names it in the error.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        Url::parse(&self.url).map_err(|e| format!("{section}.url: {e}"))?;
        let checks = [
            (self.timeout_ms >= 1, "timeout_ms must be at least 1"),
            ((1..=256).contains(&self.in_flight_max), "in_flight_max must be in 1..=256"),
            (self.queue_max >= 1, "queue_max must be at least 1"),
            ((1..=10_000).contains(&self.batch_max), "batch_max must be in 1..=10000"),
            (self.batch_ms < self.timeout_ms.max(1_000), "batch_ms must be under timeout_ms (or 1000)"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(format!("{section}.{why}")),
            None => Ok(()),
        }
    }
}

/// The shards' side of one configured hook.
struct Lane {
    tx: Sender<Call>,
    fail_open: bool,
    stats: Arc<Stats>,
}

/// The shards' side of the hooks: where calls are queued. Cheap to share.
#[derive(Default)]
pub struct Gate {
    lanes: [Option<Lane>; 4],
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on: Vec<_> = Hook::ALL.iter().filter(|h| self.has(**h)).map(|h| h.name()).collect();
        f.debug_struct("Gate").field("hooks", &on).finish()
    }
}

impl Gate {
    /// Whether `hook` is configured.
    pub fn has(&self, hook: Hook) -> bool {
        self.lanes[hook as usize].is_some()
    }

    /// Queues a call for its hook. None: queued (its verdict comes by mail). Some: decided now
    /// — its queue is full, so the hook's failure policy answers (an event is dropped, counted).
    pub fn submit(&self, mut call: Call) -> Option<Verdict> {
        let lane = self.lanes[call.hook() as usize].as_ref()?;
        if let Call::Event(e) = &mut call {
            e.at_ms = unix_ms();
        }
        match lane.tx.try_send(call) {
            Ok(()) => None,
            Err(TrySendError::Full(call) | TrySendError::Disconnected(call)) => {
                match call::failed(call, lane.fail_open) {
                    Some((verdict, outcome)) => {
                        lane.stats.call(outcome);
                        Some(verdict)
                    }
                    None => {
                        lane.stats.call(Outcome::Dropped);
                        None
                    }
                }
            }
        }
    }

    /// A gate whose queues nobody serves, and their receiving ends: for driving a hub by hand.
    pub fn detached(settings: &[(Hook, Settings)]) -> (Gate, Vec<(Hook, Receiver<Call>)>) {
        let mut gate = Gate::default();
        let mut rxs = Vec::new();
        for (hook, s) in settings {
            let (tx, rx) = crossbeam_channel::bounded(s.queue_max);
            gate.lanes[*hook as usize] = Some(Lane { tx, fail_open: s.fail_open, stats: Arc::default() });
            rxs.push((*hook, rx));
        }
        (gate, rxs)
    }
}

fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// The hooks' threads.
pub struct Hooks {
    gate: Arc<Gate>,
    stats: Vec<(Hook, Arc<Stats>)>,
    stop: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Hooks {
    /// Starts the workers of every configured hook (None when none is). Verdicts go to the
    /// shards over `mesh`.
    pub fn start(config: &Config, mesh: Arc<Mesh>) -> Result<Option<Hooks>, String> {
        let settings = Settings::all(config);
        if settings.is_empty() {
            return Ok(None);
        }
        let rules = SendRules { data_bytes_max: config.rooms.data_bytes_max, types: Arc::new(config.types.clone()) };
        let stop = Arc::new(AtomicBool::new(false));
        let mut gate = Gate::default();
        let (mut stats, mut workers) = (Vec::new(), Vec::new());
        for (hook, s) in settings {
            let url = Url::parse(&s.url).map_err(|e| format!("hook_{}.url: {e}", hook.name()))?;
            let (tx, rx) = crossbeam_channel::bounded(s.queue_max);
            let st = Arc::new(Stats::default());
            gate.lanes[hook as usize] = Some(Lane { tx, fail_open: s.fail_open, stats: Arc::clone(&st) });
            stats.push((hook, Arc::clone(&st)));
            let shared = Arc::new(Shared {
                hook,
                settings: s.clone(),
                // A verdict may carry a rewritten message: room for each call's data and fields.
                body_max: s.batch_max * (rules.data_bytes_max + 1024) + 16 * 1024,
                rules: rules.clone(),
                breaker: Mutex::new(Breaker::new(s.breaker_failures, s.breaker_open_ms)),
                started: Instant::now(),
                stats: st,
                mesh: Arc::clone(&mesh),
                stop: Arc::clone(&stop),
            });
            for i in 0..s.in_flight_max {
                let (shared, rx, client) = (Arc::clone(&shared), rx.clone(), Client::new(url.clone()));
                let handle = std::thread::Builder::new()
                    .name(format!("hook-{}-{i}", hook.name()))
                    .spawn(move || shared.work(&rx, client))
                    .map_err(|e| format!("spawn hook worker: {e}"))?;
                workers.push(handle);
            }
        }
        Ok(Some(Hooks { gate: Arc::new(gate), stats, stop, workers: Mutex::new(workers) }))
    }

    pub fn gate(&self) -> Arc<Gate> {
        Arc::clone(&self.gate)
    }

    /// Prometheus text of every configured hook.
    pub fn render(&self, out: &mut String) {
        let hooks: Vec<(Hook, &Stats)> = self.stats.iter().map(|(h, s)| (*h, &**s)).collect();
        Stats::render(&hooks, out);
    }

    /// Stops the workers (after the shards: nobody is waiting for a verdict any more).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Hooks {
    /// A gateway that failed to start drops its hooks unstopped: the workers still end.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// What one hook's workers share.
struct Shared {
    hook: Hook,
    settings: Settings,
    body_max: usize,
    rules: SendRules,
    breaker: Mutex<Breaker>,
    started: Instant,
    stats: Arc<Stats>,
    mesh: Arc<Mesh>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    /// A worker: take a batch, ask, mail the verdicts; until stopped.
    fn work(&self, rx: &Receiver<Call>, mut client: Client) {
        let mut verdicts = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let first = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            let until = Instant::now() + Duration::from_millis(self.settings.batch_ms);
            while batch.len() < self.settings.batch_max {
                let next = match self.settings.batch_ms {
                    0 => rx.try_recv().ok(),
                    _ => rx.recv_deadline(until).ok(),
                };
                match next {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
            self.stats.set_queued(rx.len());
            self.ask(&mut client, batch, &mut verdicts);
            for (verdict, outcome) in verdicts.drain(..) {
                self.stats.call(outcome);
                self.deliver(verdict);
            }
        }
    }

    /// One request for a batch (retried where the hook allows), each call's verdict into `out`.
    fn ask(&self, client: &mut Client, batch: Vec<Call>, out: &mut Vec<(Verdict, Outcome)>) {
        let n = batch.len();
        let now_ms = || self.started.elapsed().as_millis() as u64;
        let admitted = self.breaker.lock().unwrap_or_else(|e| e.into_inner()).admit(now_ms());
        if admitted == Admit::No {
            self.stats.request(n, RequestResult::Breaker, Duration::ZERO);
            return self.fail(batch, out);
        }
        let (content_type, body) = call::encode(&batch, self.settings.format);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(self.settings.timeout_ms);
        let mut attempts = 0;
        let result = loop {
            let r = client.post(content_type, &body, deadline, self.body_max);
            match r {
                Err(f) if f.retryable() && attempts < self.settings.retries && Instant::now() < deadline => {
                    attempts += 1;
                    self.stats.retry();
                }
                r => break r,
            }
        };
        let result = result.and_then(|body| call::decode(&body, self.settings.format).map_err(Failure::Malformed));
        let judged = match result {
            Ok(resp) => {
                call::judge(batch, resp, &self.rules, out).map_err(|(calls, why)| (calls, Failure::Malformed(why)))
            }
            Err(f) => Err((batch, f)),
        };
        let took = start.elapsed();
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match judged {
            Ok(()) => {
                self.stats.request(n, RequestResult::Ok, took);
                if self.hook == Hook::Events {
                    self.stats.calls_add(Outcome::Allowed, n as u64);
                }
                breaker.succeeded();
                self.stats.breaker(false, false);
            }
            Err((calls, failure)) => {
                self.stats.request(n, RequestResult::from(&failure), took);
                let tripped = breaker.failed(now_ms());
                self.stats.breaker(breaker.is_open(), tripped);
                if tripped {
                    eprintln!("barrage: hook {}: circuit breaker open after: {failure:?}", self.hook.name());
                }
                drop(breaker);
                self.fail(calls, out);
            }
        }
    }

    /// The failure verdict of each call (events are dropped, counted).
    fn fail(&self, calls: Vec<Call>, out: &mut Vec<(Verdict, Outcome)>) {
        for c in calls {
            match call::failed(c, self.settings.fail_open) {
                Some(v) => out.push(v),
                None => self.stats.call(Outcome::Dropped),
            }
        }
    }

    /// Mails a verdict to its shard, waiting while its inbox is full (bounded: the worker has
    /// at most one batch of verdicts).
    fn deliver(&self, verdict: Verdict) {
        let to = verdict.shard();
        let mut mail = Mail::from(HostMail::Hook(Box::new(verdict)));
        while let Err(back) = self.mesh.send(to, mail) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            mail = back;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
