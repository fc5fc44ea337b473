//! The `fanout` scenario, run by the main thread: subscribe M members into R rooms (the
//! workers and their rings, as `connect` does), make sure all are subscribed, then publish for
//! a warm-up and a measured window (publisher threads), let the deliveries drain, and report
//! what the members received: deliveries and frames per second, losses (counted by the server
//! or not), latency to each member and to the last one, and CPU per million deliveries.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use crate::addrs::{Sources, parse_target, sockaddr_in};
use crate::errors::ErrorCounts;
use crate::fanout_book::{Book, Mode};
use crate::fanout_msg::{HEADER_BYTES, Kind, Streams, room_name};
use crate::fanout_pub::{PubPlan, PubResult};
use crate::fanout_recv::{FanoutReads, LATENCY_NS_MAX, Tally};
use crate::fanout_report::{Report, ServerCounters, counted, deliveries, latency, summary};
use crate::handshake::upgrade;
use crate::probe::{Api, cpu_s, series_sum, tree_cpu_s};
use crate::ring::RingParams;
use crate::sys::monotonic_ns;
use crate::worker::{Counters, Plan, Shared, Stat};

/// Extra time subscribing may take over M ÷ connect rate (dropped SYNs are retried after
/// 1, 3, 7, 15 s).
const SUBSCRIBE_SLACK: Duration = Duration::from_secs(30);
/// How long barrage's online counts may take to match the subscribed count.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// The drain after the window ends: over when every expected delivery is in, when none came
/// for `DRAIN_IDLE` (longer than any block interval a run uses), or after `DRAIN_MAX`.
const DRAIN_IDLE: Duration = Duration::from_secs(3);
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// Files per ring left for the process's own descriptors (ring fds, eventfds, publishers).
const FD_RESERVE: u64 = 1024;
/// Connections started and not yet subscribed, at most (all threads together).
const PENDING_MAX: u32 = 4096;
/// Each ring: 128 × 32 KiB receive buffers (4 MiB) shared by its subscribers, so a read takes
/// many frames, and a block of a few hundred messages fits in one read.
const RING: RingParams =
    RingParams { sq_entries: 1024, cq_entries: 16384, files: 0, recv_buffers: 128, recv_buffer_bytes: 32 * 1024 };
/// The largest message a publisher may send (a peer's frame, barrage's `data`).
const MESSAGE_BYTES_MAX: usize = 65536;

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// The server's WebSocket listener (IPv4 loopback only); several, comma-separated, spread
    /// the members over a cluster's nodes (member i dials the (i mod N)-th); publishers use the
    /// first (and --api).
    #[arg(long)]
    target: String,
    /// What the server is: barrage, a peer broadcast server, or Nchan.
    #[arg(long, value_enum)]
    kind: Kind,
    /// Subscribers; member i joins room r{i % rooms}.
    #[arg(long)]
    members: u64,
    #[arg(long, default_value_t = 1)]
    rooms: u32,
    /// Messages per second, all rooms and publishers together (paced).
    #[arg(long, conflicts_with = "saturate", required_unless_present = "saturate")]
    rate: Option<f64>,
    /// Closed loop: per room, publish while published − received by the room's last member
    /// is under --window.
    #[arg(long)]
    saturate: bool,
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long)]
    duration_s: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Where to write the JSON report.
    #[arg(long)]
    json: PathBuf,
    /// barrage's business API (required for kind barrage: publishing, online counts, metrics).
    #[arg(long)]
    api: Option<String>,
    /// The server's pid, to read its CPU time (and its children's: nginx's workers) over the
    /// window.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Publisher threads (each one HTTP connection, or one WebSocket per room it feeds).
    #[arg(long, default_value_t = 2)]
    publishers: u32,
    /// Source addresses, `A-B` inclusive, in 127.0.0.0/8.
    #[arg(long, default_value = "127.0.1.1-127.0.1.40")]
    sources: String,
    /// Source ports, `P-Q` inclusive, bound explicitly on every source address.
    #[arg(long, default_value = "10000-60999")]
    ports: String,
    /// Receiving threads, each with its own rings and 1/K of the members.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    #[arg(long, default_value = "/sub")]
    sub_path: String,
    #[arg(long, default_value = "/pub")]
    pub_path: String,
    /// A name for this run, copied into the report.
    #[arg(long)]
    label: Option<String>,
    /// Hard limit on the whole run, after which it reports and exits.
    #[arg(long, default_value_t = 600)]
    deadline_s: u64,
    /// API key, if the gateway has one.
    #[arg(long, env = "BARRAGE_API_KEY", default_value = "", hide_env_values = true)]
    api_key: String,
    /// New subscriber connections per second while subscribing.
    #[arg(long, default_value_t = 20_000.0)]
    connect_rate: f64,
    /// Ping every subscriber once per this many ms (0 = never); for runs longer than the
    /// server's idle timeout.
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
    /// Members 0..N stop reading once subscribed and hold their connections open (readers that
    /// stall: their socket buffers fill, the server sheds and closes them); nothing is expected
    /// of them. Never a room's last member (its sentinel): N ≤ members − rooms.
    #[arg(long, default_value_t = 0)]
    stalled: u64,
    /// Seconds to hold every member subscribed before publishing begins (an idle baseline for
    /// whoever samples the server meanwhile).
    #[arg(long, default_value_t = 0.0)]
    idle_s: f64,
}

/// Arguments checked and turned into what the run needs.
struct Setup {
    target: SocketAddrV4,
    targets: Vec<SocketAddrV4>,
    api: Option<Api>,
    sources: Sources,
    files_per_ring: u32,
    mode: Mode,
}

/// Runs the scenario; returns the exit code (0 pass, 1 fail, 2 refused arguments).
pub fn run(args: FanoutArgs) -> i32 {
    let setup = match validate(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("barrage-load: {e}");
            return 2;
        }
    };
    let streams = Streams { publishers: args.publishers, rooms: args.rooms };
    let mut book = Book::new(streams, args.members, setup.mode, args.duration_s, monotonic_ns());
    book.stalled = args.stalled;
    let book = Arc::new(book);
    let mut run = Run::new(&args, Arc::clone(&book));
    let protocol = (args.kind == Kind::Barrage).then_some("barrage.v1.proto");
    let host = setup.target.to_string();
    // Built once and leaked: the kernel reads them for as long as any connection starts.
    let requests: &'static [Vec<u8>] = Box::leak(
        (0..args.rooms)
            .map(|k| upgrade(&host, &args.kind.sub_path(&args.sub_path, k), protocol))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let targets: &'static [libc::sockaddr_in] =
        Box::leak(setup.targets.iter().map(|&t| sockaddr_in(t)).collect::<Vec<_>>().into_boxed_slice());
    for t in 0..u64::from(args.threads) {
        let threads = u64::from(args.threads);
        let (lo, hi) = (args.members * t / threads, args.members * (t + 1) / threads);
        let plan = Plan {
            first: lo,
            count: hi - lo,
            rate_per_s: args.connect_rate / threads as f64,
            pending_max: (PENDING_MAX / args.threads).max(1),
            files_per_ring: setup.files_per_ring,
            ring: RING,
            sources: setup.sources,
            rooms: args.rooms,
            requests,
            targets,
            churn: None,
        };
        if let Err(e) = run.start_worker(t, plan) {
            eprintln!("barrage-load: cannot start load thread {t}: {e}");
            run.stop_workers();
            return 1;
        }
    }
    let report = run.phases(&setup);
    finish(&args, &report)
}

fn validate(args: &FanoutArgs) -> Result<Setup, String> {
    let targets = args
        .target
        .split(',')
        .map(|t| parse_target("--target", t.trim()).map_err(|e| e.0))
        .collect::<Result<Vec<_>, _>>()?;
    let target = targets[0];
    let api = match &args.api {
        Some(a) => Some(Api { addr: parse_target("--api", a).map_err(|e| e.0)?, key: args.api_key.clone() }),
        None if args.kind == Kind::Barrage => {
            return Err("--kind barrage needs --api (publishing goes through it)".into());
        }
        None => None,
    };
    let sources = Sources::parse(&args.sources, &args.ports).map_err(|e| e.0)?;
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if args.members == 0 || args.rooms == 0 || args.threads == 0 || args.publishers == 0 {
        return Err("--members, --rooms, --threads and --publishers must be positive".into());
    }
    if u64::from(args.rooms) > args.members || u64::from(args.threads) > args.members {
        return Err("--rooms and --threads may not exceed --members (every room needs a member)".into());
    }
    if args.stalled > args.members - u64::from(args.rooms) {
        return Err("--stalled may not exceed --members − --rooms (a room's last member reads)".into());
    }
    if !(positive(args.duration_s) && args.warmup_s.is_finite() && args.warmup_s >= 0.0) {
        return Err("--duration-s must be positive and --warmup-s not negative".into());
    }
    if !(args.idle_s.is_finite() && args.idle_s >= 0.0) {
        return Err("--idle-s must not be negative".into());
    }
    if args.idle_s + args.warmup_s + args.duration_s > args.deadline_s as f64 {
        return Err("--idle-s + --warmup-s + --duration-s exceed --deadline-s".into());
    }
    if !positive(args.connect_rate) {
        return Err("--connect-rate must be positive".into());
    }
    if !(HEADER_BYTES..=MESSAGE_BYTES_MAX).contains(&args.message_bytes) {
        return Err(format!(
            "--message-bytes must be {HEADER_BYTES}..={MESSAGE_BYTES_MAX} (the header is {HEADER_BYTES})"
        ));
    }
    let mode = match (args.rate, args.saturate) {
        (Some(r), false) if positive(r) => Mode::Rate(r),
        (Some(_), false) => return Err("--rate must be positive".into()),
        (None, true) if args.window > 0 => Mode::Saturate(args.window),
        (None, true) => return Err("--window must be positive".into()),
        _ => return Err("give exactly one of --rate and --saturate".into()),
    };
    for (flag, path) in [("--sub-path", &args.sub_path), ("--pub-path", &args.pub_path)] {
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            return Err(format!("{flag} {path}: a path starts with / and has no spaces"));
        }
    }
    if sources.capacity() < args.members {
        return Err(format!(
            "--sources × --ports = {} source pairs, fewer than --members {}: widen --sources or --ports",
            sources.capacity(),
            args.members
        ));
    }
    if sources.contains(target) {
        return Err(format!("--sources {sources} include the target {target}"));
    }
    if let Some(pid) = args.server_pid
        && cpu_s(&format!("/proc/{pid}/stat")).is_none()
    {
        return Err(format!("--server-pid {pid}: cannot read /proc/{pid}/stat"));
    }
    let soft = crate::sys::raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let files_per_ring = soft.saturating_sub(FD_RESERVE).min(u64::from(u32::MAX)) as u32;
    if files_per_ring == 0 {
        return Err(format!("RLIMIT_NOFILE {soft} leaves no direct descriptors per ring"));
    }
    Ok(Setup { target, targets, api, sources, files_per_ring, mode })
}

/// Writes the JSON, prints the summary, and picks the exit code.
fn finish(args: &FanoutArgs, report: &Report) -> i32 {
    println!("{}", summary(report));
    let written = serde_json::to_vec_pretty(report)
        .map_err(|e| e.to_string())
        .and_then(|json| std::fs::write(&args.json, json).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("barrage-load: writing {}: {e}", args.json.display());
        return 1;
    }
    if report.passed { 0 } else { 1 }
}

/// CPU seconds of the server and of this process at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    server: Option<f64>,
    own: Option<f64>,
}

impl Cpu {
    fn now(pid: Option<u32>) -> Cpu {
        Cpu { server: pid.and_then(tree_cpu_s), own: cpu_s("/proc/self/stat") }
    }
}

/// What the phases measured, for the report.
#[derive(Default)]
struct Measured {
    subscribed: u64,
    cpu_before: Cpu,
    cpu_after: Cpu,
    counters_before: Option<ServerCounters>,
    counters_after: Option<ServerCounters>,
    drain_s: f64,
    end: Counters,
}

/// What the receiving threads gathered, merged.
struct Gathered {
    latency: Histogram<u64>,
    counts: Vec<u32>,
    worst_us: Vec<u32>,
    tally: Tally,
}

/// The main thread's view of a run.
struct Run<'a> {
    args: &'a FanoutArgs,
    book: Arc<Book>,
    workers: Vec<Arc<Shared>>,
    handles: Vec<JoinHandle<(ErrorCounts, FanoutReads)>>,
    publishers: Vec<JoinHandle<PubResult>>,
    start: Instant,
    deadline: Instant,
    deadline_hit: bool,
    phase: &'static str,
    last_tick: Instant,
    last_received: u64,
    last_print: Option<Instant>,
    tty: bool,
    errors: BTreeMap<String, u64>,
    publish_errors: BTreeMap<String, u64>,
    stalls: u64,
}

impl<'a> Run<'a> {
    fn new(args: &'a FanoutArgs, book: Arc<Book>) -> Run<'a> {
        let start = Instant::now();
        Run {
            args,
            book,
            workers: Vec::new(),
            handles: Vec::new(),
            publishers: Vec::new(),
            start,
            deadline: start + Duration::from_secs(args.deadline_s),
            deadline_hit: false,
            phase: "subscribe",
            last_tick: start,
            last_received: 0,
            last_print: None,
            tty: std::io::stdout().is_terminal(),
            errors: BTreeMap::new(),
            publish_errors: BTreeMap::new(),
            stalls: 0,
        }
    }

    fn start_worker(&mut self, t: u64, plan: Plan) -> std::io::Result<()> {
        let shared = Arc::new(Shared::new()?);
        let theirs = Arc::clone(&shared);
        let reads = FanoutReads::new(self.args.kind, Arc::clone(&self.book));
        let handle = std::thread::Builder::new()
            .name(format!("sub-{t}"))
            .spawn(move || crate::worker::run(plan, theirs, reads))?;
        self.workers.push(shared);
        self.handles.push(handle);
        Ok(())
    }

    fn counters(&self) -> Counters {
        let mut all = Counters::zero_for_merge();
        for w in &self.workers {
            all.merge(&w.load());
        }
        all
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    /// True once the hard deadline has passed (and notes it once).
    fn past_deadline(&mut self) -> bool {
        if Instant::now() >= self.deadline && !self.deadline_hit {
            self.deadline_hit = true;
            self.error("deadline".into());
            self.book.stop.store(true, Ordering::Release);
        }
        self.deadline_hit
    }

    /// Prints progress once a second on a TTY, every 5 s otherwise.
    fn tick(&mut self) {
        let now = Instant::now();
        let since = now.duration_since(self.last_tick);
        if since < Duration::from_secs(1) {
            return;
        }
        let c = self.counters();
        let received = self.book.received.load(Ordering::Relaxed);
        let per_s = (received - self.last_received.min(received)) as f64 / since.as_secs_f64();
        let published: u64 = self.book.stream.iter().map(|s| s.published.load(Ordering::Relaxed)).sum();
        self.last_tick = now;
        self.last_received = received;
        let line = format!(
            "[{:7.1}s] {:<9} subscribed {:>8}/{}  published {:>9}  received/s {:>10.0}  errors {:>6}",
            now.duration_since(self.start).as_secs_f64(),
            self.phase,
            c[Stat::Joined],
            self.args.members,
            published,
            per_s,
            c[Stat::Errors]
        );
        if self.tty {
            print!("\r{line}\x1b[K");
            let _ = std::io::stdout().flush();
        } else if self.last_print.is_none_or(|p| now.duration_since(p) >= Duration::from_secs(5)) {
            println!("{line}");
            self.last_print = Some(now);
        }
    }

    /// Sleeps in short steps until `done`, `until`, or the deadline; returns whether `done` held.
    fn wait_until(&mut self, until: Instant, mut done: impl FnMut(&Run<'_>) -> bool) -> bool {
        loop {
            self.tick();
            if done(self) {
                return true;
            }
            if Instant::now() >= until || self.past_deadline() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sleeps until CLOCK_MONOTONIC reaches `ns` (or the deadline).
    fn sleep_until_ns(&mut self, ns: u64) {
        let left = Duration::from_nanos(ns.saturating_sub(monotonic_ns()));
        let until = Instant::now() + left;
        self.wait_until(until, |_| monotonic_ns() >= ns);
    }

    /// Subscribe, settle, publish over warm-up and window, drain; then stop and report.
    fn phases(&mut self, setup: &Setup) -> Report {
        let subscribe_for =
            Duration::from_secs_f64(self.args.members as f64 / self.args.connect_rate) + SUBSCRIBE_SLACK;
        self.wait_until(self.start + subscribe_for, |r| r.counters().ramp_over());
        let mut m = Measured { subscribed: self.counters()[Stat::Joined], ..Measured::default() };
        if m.subscribed < self.args.members {
            self.error("not_subscribed".into());
        }
        if let Some(api) = &setup.api
            && m.subscribed > 0
            && !self.past_deadline()
        {
            self.phase = "settle";
            self.settle(api);
        }
        if m.subscribed > 0 && self.args.idle_s > 0.0 && !self.past_deadline() {
            self.phase = "idle";
            self.wait_until(Instant::now() + Duration::from_secs_f64(self.args.idle_s), |_| false);
        }
        if m.subscribed > 0 && !self.past_deadline() {
            self.workers.iter().for_each(|w| w.ping_ms.store(self.args.ping_ms, Ordering::Relaxed));
            self.workers.iter().for_each(|w| w.wake.signal());
            self.measure(setup, &mut m);
        }
        m.end = self.counters();
        self.tick();
        if self.tty {
            println!();
        }
        let gathered = self.stop_workers();
        self.report(setup, m, gathered)
    }

    /// Publishers on; warm-up; the window (CPU and counters read at both ends); publishers
    /// off; the drain.
    fn measure(&mut self, setup: &Setup, m: &mut Measured) {
        let now = monotonic_ns();
        let window_start = now + (self.args.warmup_s * 1e9) as u64;
        let window_end = window_start + (self.args.duration_s * 1e9) as u64;
        self.book.set_window(window_start, window_end);
        self.phase = "warm-up";
        for p in 0..self.args.publishers {
            let plan = PubPlan {
                p,
                kind: self.args.kind,
                addr: match &setup.api {
                    Some(api) if self.args.kind == Kind::Barrage => api.addr,
                    _ => setup.target,
                },
                api_key: self.args.api_key.clone(),
                pub_path: self.args.pub_path.clone(),
                message_bytes: self.args.message_bytes,
                book: Arc::clone(&self.book),
            };
            match std::thread::Builder::new().name(format!("pub-{p}")).spawn(move || crate::fanout_pub::run(plan)) {
                Ok(h) => self.publishers.push(h),
                Err(e) => {
                    self.error(format!("publisher_spawn_{}", crate::errors::errno_name(e.raw_os_error().unwrap_or(0))))
                }
            }
        }
        self.sleep_until_ns(window_start);
        self.phase = "window";
        m.cpu_before = Cpu::now(self.args.server_pid);
        m.counters_before = self.server_counters(setup);
        self.sleep_until_ns(window_end);
        m.cpu_after = Cpu::now(self.args.server_pid);
        self.phase = "drain";
        let drain_start = Instant::now();
        self.join_publishers();
        self.drain();
        m.drain_s = drain_start.elapsed().as_secs_f64();
        m.counters_after = self.server_counters(setup);
    }

    fn join_publishers(&mut self) {
        for h in std::mem::take(&mut self.publishers) {
            match h.join() {
                Ok(r) => {
                    for (k, v) in r.errors {
                        *self.publish_errors.entry(k).or_insert(0) += v;
                    }
                    self.stalls += r.stalls;
                }
                Err(_) => self.error("publisher_panicked".into()),
            }
        }
    }

    /// Deliveries every member should receive of the measured messages so far.
    fn expected(&self) -> u64 {
        let b = &self.book;
        (0..b.streams.count()).map(|j| b.measured(j) * b.readers_in(b.streams.of(j).1)).sum()
    }

    /// Waits until every expected delivery is in, none came for `DRAIN_IDLE`, or `DRAIN_MAX`.
    fn drain(&mut self) {
        let expected = self.expected();
        let until = Instant::now() + DRAIN_MAX;
        let (mut last, mut moved) = (u64::MAX, Instant::now());
        self.wait_until(until, |r| {
            let got = r.book.delivered.load(Ordering::Relaxed);
            if got != last {
                (last, moved) = (got, Instant::now());
            }
            got >= expected || moved.elapsed() >= DRAIN_IDLE
        });
    }

    /// barrage's drop counters (None for peers, or when the API does not answer).
    fn server_counters(&mut self, setup: &Setup) -> Option<ServerCounters> {
        if self.args.kind != Kind::Barrage {
            return None;
        }
        let api = setup.api.as_ref()?;
        match api.metrics() {
            Ok(text) => Some(ServerCounters {
                messages_dropped: series_sum(&text, "barrage_messages_dropped_total"),
                frames_dropped: series_sum(&text, "barrage_frames_dropped_total"),
            }),
            Err(e) => {
                self.error(format!("metrics_{}", e.kind()));
                None
            }
        }
    }

    /// Waits (bounded) until barrage's online counts add up to the subscribed count.
    fn settle(&mut self, api: &Api) {
        let until = Instant::now() + SETTLE_WAIT;
        loop {
            let joined = self.counters()[Stat::Joined];
            let mut sum = Some(0u64);
            for k in 0..self.args.rooms {
                self.tick();
                match api.online(&room_name(k)) {
                    Ok(n) => sum = sum.map(|s| s + n),
                    Err(e) => {
                        self.error(e.kind());
                        sum = None;
                        break;
                    }
                }
            }
            if sum == Some(joined) {
                return;
            }
            if Instant::now() >= until || self.past_deadline() {
                self.error("online_mismatch".into());
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the publishers (if still running) and the workers (their rings close every
    /// connection); merges what the workers gathered.
    fn stop_workers(&mut self) -> Gathered {
        self.book.stop.store(true, Ordering::Release);
        self.join_publishers();
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
            w.wake.signal();
        }
        let tracked = self.book.tracked() as usize;
        let mut g = Gathered {
            latency: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid bounds"),
            counts: vec![0; tracked],
            worst_us: vec![0; tracked],
            tally: Tally::default(),
        };
        for h in std::mem::take(&mut self.handles) {
            match h.join() {
                Ok((errors, reads)) => {
                    errors.merge_into(&mut self.errors);
                    reads.errors.merge_into(&mut self.errors);
                    if g.latency.add(&reads.latency).is_err() {
                        self.error("histogram_merge".into());
                    }
                    for (a, b) in g.counts.iter_mut().zip(&reads.counts) {
                        *a = a.saturating_add(*b);
                    }
                    for (a, b) in g.worst_us.iter_mut().zip(&reads.worst_us) {
                        *a = (*a).max(*b);
                    }
                    g.tally.merge(&reads.tally);
                }
                Err(_) => self.error("worker_panicked".into()),
            }
        }
        g
    }

    fn report(&mut self, setup: &Setup, m: Measured, g: Gathered) -> Report {
        let args = self.args;
        let d = deliveries(&self.book, &g.counts, &g.worst_us);
        let published: u64 = (0..self.book.streams.count()).map(|j| self.book.measured(j)).sum();
        let lost = d.expected - d.delivered;
        let duration = args.duration_s;
        let in_window = g.tally.window_messages;
        let server_counters = match (m.counters_before, m.counters_after) {
            (Some(a), Some(b)) => Some(ServerCounters {
                messages_dropped: b.messages_dropped.saturating_sub(a.messages_dropped),
                frames_dropped: b.frames_dropped.saturating_sub(a.frames_dropped),
            }),
            _ => None,
        };
        let members_per_message = if published > 0 { d.expected as f64 / published as f64 } else { 0.0 };
        let server_dropped_counted = match args.kind {
            Kind::Barrage => {
                Some(server_counters.map_or(0, |c| counted(&d, &c, members_per_message, g.tally.max_per_frame)))
            }
            _ => None,
        };
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let server_cpu_s = diff(m.cpu_before.server, m.cpu_after.server);
        let explained = lost == 0 || (args.kind == Kind::Barrage && Some(lost) == server_dropped_counted);
        let (mode, rate_target, window) = match setup.mode {
            Mode::Rate(r) => ("rate", Some(r), None),
            Mode::Saturate(w) => ("saturate", None, Some(w)),
        };
        Report {
            scenario: "fanout",
            label: args.label.clone(),
            kind: args.kind.name(),
            target: setup.target.to_string(),
            members: args.members,
            rooms: args.rooms,
            mode,
            rate_target,
            window,
            message_bytes: args.message_bytes,
            duration_s: duration,
            subscribed: m.subscribed,
            published,
            publish_rate: published as f64 / duration,
            delivered: d.delivered,
            delivered_per_s: in_window as f64 / duration,
            frames: g.tally.window_frames,
            frames_per_s: g.tally.window_frames as f64 / duration,
            bytes_per_s: g.tally.window_bytes as f64 / duration,
            messages_per_frame: if g.tally.window_frames > 0 {
                in_window as f64 / g.tally.window_frames as f64
            } else {
                0.0
            },
            expected: d.expected,
            lost,
            server_dropped_counted,
            latency_ns: latency(&g.latency),
            reach_all_ns: d.reach_all,
            server_cpu_s,
            cpu_s_per_million_deliveries: server_cpu_s.filter(|_| in_window > 0).map(|s| s / (in_window as f64 / 1e6)),
            loadgen_cpu_s: diff(m.cpu_before.own, m.cpu_after.own),
            publish_errors: std::mem::take(&mut self.publish_errors),
            errors: std::mem::take(&mut self.errors),
            passed: m.subscribed == args.members && published > 0 && explained,
            warmup_s: args.warmup_s,
            publishers: args.publishers,
            threads: args.threads,
            delivered_in_window: in_window,
            lost_whole: d.lost_whole,
            lost_partial: d.lost_partial,
            messages_missing: d.messages_missing,
            duplicates: d.duplicates,
            server_counters,
            messages_per_frame_max: g.tally.max_per_frame,
            stale_messages: g.tally.stale,
            saturate_stalls: self.stalls,
            drain_s: m.drain_s,
            rings: m.end[Stat::Rings],
            recv_nobufs: m.end[Stat::RecvNoBufs],
            deadline_hit: self.deadline_hit,
            stalled: args.stalled,
        }
    }
}
