//! The `connect` scenario, run by the main thread: ramp N connections into R rooms at a set
//! rate, check the gateway counts them, hold them, prove every one still receives its room's
//! blocks, and report memory per connection. The connections themselves live in the workers;
//! this thread steers them, samples once a second, and talks to the gateway's API.
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

use crate::addrs::{Sources, parse_target, sockaddr_in};
use crate::errors::ErrorCounts;
use crate::handshake::{Subprotocol, request};
use crate::probe::{Api, Readings};
use crate::report::{Blocks, Report, Sample, per_conn, progress_line, summary};
use crate::ring::RingParams;
use crate::worker::{ConnectReads, Counters, Plan, Shared, Stat};

/// Extra time the ramp may take over N ÷ rate: dropped SYNs are retried after 1, 3, 7, 15 s.
const RAMP_SLACK: Duration = Duration::from_secs(30);
/// How long the gateway's online counts may take to match the joined count.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// How long every joined connection has to see a block after the probe is published.
const PROBE_WAIT: Duration = Duration::from_secs(60);
/// Files per ring left for the process's own descriptors (ring fds, eventfds, API sockets).
const FD_RESERVE: u64 = 1024;
/// Each ring: SQ entries (a connect chain takes 5), CQ entries (bursts overflow into the
/// kernel's list, never lost), and 64 × 2 KiB receive buffers shared by its connections.
const RING: RingParams =
    RingParams { sq_entries: 512, cq_entries: 8192, files: 0, recv_buffers: 64, recv_buffer_bytes: 2048 };
const PROBE_BODY: &str = r#"{"type":"notice","priority":"whitelist","text":"density probe"}"#;

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// The gateway's WebSocket listener (IPv4 loopback only).
    #[arg(long)]
    target: String,
    /// The gateway's business API (IPv4 loopback only).
    #[arg(long)]
    api: String,
    /// API key, if the gateway has one.
    #[arg(long, env = "BARRAGE_API_KEY", default_value = "", hide_env_values = true)]
    api_key: String,
    /// Connections to open and hold.
    #[arg(long)]
    connections: u64,
    /// Rooms r0..r{R-1}; connection i joins r{i % R}.
    #[arg(long)]
    rooms: u32,
    /// New connections per second (all threads together).
    #[arg(long)]
    rate: f64,
    /// Seconds to hold every connection once all have joined.
    #[arg(long)]
    hold_s: u64,
    /// Longest the ramp may take before the run moves on (default: N / rate + 30 s, the slack
    /// covering SYN retries). Raise it when the rate is a ceiling rather than what the box does.
    #[arg(long)]
    ramp_s: Option<u64>,
    /// Where to write the JSON report.
    #[arg(long)]
    json: PathBuf,
    /// Source addresses, `A-B` inclusive, in 127.0.0.0/8.
    #[arg(long, default_value = "127.0.1.1-127.0.1.40")]
    sources: String,
    /// Source ports, `P-Q` inclusive, bound explicitly on every source address.
    #[arg(long, default_value = "10000-60999")]
    ports: String,
    /// Independent load threads, each with its own rings and a share of connections and rate.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Direct descriptors per ring; 0 = RLIMIT_NOFILE − 1024.
    #[arg(long, default_value_t = 0)]
    ring_files: u32,
    /// The gateway's pid, to sample its RSS.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Ping every joined connection once per this many ms during the hold (0 = never).
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
    /// Hard limit on the whole run, after which it reports and exits.
    #[arg(long, default_value_t = 600)]
    deadline_s: u64,
    /// Subprotocol offered in the upgrade.
    #[arg(long, value_enum, default_value_t = Subprotocol::Proto)]
    subprotocol: Subprotocol,
    /// Connections started and not yet joined, at most (all threads together): keeps the
    /// gateway's accept queues (somaxconn) from overflowing when it handshakes slower than --rate.
    #[arg(long, default_value_t = 4096)]
    pending_max: u32,
}

/// Arguments checked and turned into what the run needs.
struct Setup {
    target: SocketAddrV4,
    api: Api,
    sources: Sources,
    files_per_ring: u32,
}

/// Runs the scenario; returns the exit code (0 pass, 1 fail, 2 refused arguments).
pub fn run(args: ConnectArgs) -> i32 {
    let setup = match validate(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("barrage-load: {e}");
            return 2;
        }
    };
    let started = Instant::now();
    let mut run = Run::new(&args, started);
    // Built once and leaked: the kernel reads them for as long as any connection starts.
    let requests: &'static [Vec<u8>] = Box::leak(
        (0..args.rooms)
            .map(|k| request(&setup.target.to_string(), &format!("r{k}"), args.subprotocol))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let target: &'static libc::sockaddr_in = Box::leak(Box::new(sockaddr_in(setup.target)));
    let before = Readings::now(args.gateway_pid);
    let mut handles = Vec::new();
    for t in 0..u64::from(args.threads) {
        let (lo, hi) =
            (args.connections * t / u64::from(args.threads), args.connections * (t + 1) / u64::from(args.threads));
        let plan = Plan {
            first: lo,
            count: hi - lo,
            rate_per_s: args.rate / f64::from(args.threads),
            pending_max: (args.pending_max / args.threads).max(1),
            files_per_ring: setup.files_per_ring,
            ring: RING,
            sources: setup.sources,
            rooms: args.rooms,
            requests,
            targets: std::slice::from_ref(target),
            churn: None,
        };
        match start_worker(t, plan, args.subprotocol) {
            Ok((shared, handle)) => {
                run.workers.push(shared);
                handles.push(handle);
            }
            Err(e) => {
                eprintln!("barrage-load: cannot start load thread {t}: {e}");
                run.stop(handles);
                return 1;
            }
        }
    }
    let report = run.phases(&setup, before, handles);
    finish(&args, &report)
}

fn validate(args: &ConnectArgs) -> Result<Setup, String> {
    let target = parse_target("--target", &args.target).map_err(|e| e.0)?;
    let api = parse_target("--api", &args.api).map_err(|e| e.0)?;
    let sources = Sources::parse(&args.sources, &args.ports).map_err(|e| e.0)?;
    let rate_ok = args.rate.is_finite() && args.rate > 0.0;
    if args.connections == 0 || args.rooms == 0 || args.threads == 0 || !rate_ok {
        return Err("--connections, --rooms, --threads and --rate must be positive".into());
    }
    if u64::from(args.threads) > args.connections {
        return Err("--threads exceeds --connections".into());
    }
    if sources.capacity() < args.connections {
        return Err(format!(
            "--sources × --ports = {} addresses × {} ports = {} source pairs, fewer than --connections {}: \
             widen --sources or --ports",
            sources.addresses(),
            sources.capacity() / u64::from(sources.addresses()),
            sources.capacity(),
            args.connections
        ));
    }
    if sources.contains(target) {
        return Err(format!("--sources {sources} include the target {target}"));
    }
    if args.pending_max < args.threads {
        return Err("--pending-max must be at least --threads".into());
    }
    let soft = crate::sys::raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let files_per_ring = match args.ring_files {
        0 => soft.saturating_sub(FD_RESERVE).min(u64::from(u32::MAX)) as u32,
        n if u64::from(n) > soft => {
            return Err(format!(
                "--ring-files {n} exceeds RLIMIT_NOFILE {soft} (the kernel caps a ring's table at it)"
            ));
        }
        n => n,
    };
    if files_per_ring == 0 {
        return Err(format!("RLIMIT_NOFILE {soft} leaves no direct descriptors per ring: give --ring-files"));
    }
    if let Some(pid) = args.gateway_pid
        && crate::probe::rss_bytes(&format!("/proc/{pid}/status")).is_none()
    {
        return Err(format!("--gateway-pid {pid}: cannot read /proc/{pid}/status"));
    }
    Ok(Setup { target, api: Api { addr: api, key: args.api_key.clone() }, sources, files_per_ring })
}

fn start_worker(t: u64, plan: Plan, protocol: Subprotocol) -> std::io::Result<(Arc<Shared>, JoinHandle<ErrorCounts>)> {
    let shared = Arc::new(Shared::new()?);
    let theirs = Arc::clone(&shared);
    let reads = ConnectReads { protocol };
    let handle = std::thread::Builder::new()
        .name(format!("load-{t}"))
        .spawn(move || crate::worker::run(plan, theirs, reads).0)?;
    Ok((shared, handle))
}

/// Writes the JSON, prints the summary, and picks the exit code.
fn finish(args: &ConnectArgs, report: &Report) -> i32 {
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

/// What the phases found, for the report.
struct Measured {
    ramp_s: f64,
    ramp_handshakes: u64,
    gateway_online: Option<u64>,
    /// Memory just before the ramp and just before the probe.
    before: Readings,
    after: Readings,
    /// Connections open when `after` was read: the divisor of the per-connection figures.
    held_after: u64,
    blocks: Blocks,
    /// Counters at the end of the probe.
    end: Counters,
}

/// The main thread's view of a run.
struct Run<'a> {
    args: &'a ConnectArgs,
    workers: Vec<Arc<Shared>>,
    start: Instant,
    deadline: Instant,
    deadline_hit: bool,
    phase: &'static str,
    samples: Vec<Sample>,
    last_sample: Instant,
    last_handshakes: u64,
    peak_hs_per_s: f64,
    last_print: Option<Instant>,
    tty: bool,
    errors: BTreeMap<String, u64>,
}

impl<'a> Run<'a> {
    fn new(args: &'a ConnectArgs, start: Instant) -> Run<'a> {
        Run {
            args,
            workers: Vec::new(),
            start,
            deadline: start + Duration::from_secs(args.deadline_s),
            deadline_hit: false,
            phase: "ramp",
            samples: Vec::new(),
            last_sample: start,
            last_handshakes: 0,
            peak_hs_per_s: 0.0,
            last_print: None,
            tty: std::io::stdout().is_terminal(),
            errors: BTreeMap::new(),
        }
    }

    /// Every worker's counters added up.
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
        }
        self.deadline_hit
    }

    /// Samples (once a second) and prints progress (every second on a TTY, else every 5 s).
    fn tick(&mut self) {
        let now = Instant::now();
        let since = now.duration_since(self.last_sample);
        if since < Duration::from_secs(1) {
            return;
        }
        let c = self.counters();
        let r = Readings::now(self.args.gateway_pid);
        let hs = c[Stat::Handshakes];
        let hs_per_s = (hs - self.last_handshakes.min(hs)) as f64 / since.as_secs_f64();
        self.peak_hs_per_s = self.peak_hs_per_s.max(hs_per_s);
        self.last_handshakes = hs;
        self.last_sample = now;
        let t_s = now.duration_since(self.start).as_secs_f64();
        self.samples.push(Sample {
            t_s,
            open: c[Stat::Open],
            joined: c[Stat::Joined],
            reached: c[Stat::Reached],
            handshakes_per_s: hs_per_s,
            errors: c[Stat::Errors],
            gateway_rss_bytes: r.gateway_rss,
            slab_bytes: r.slab,
            loadgen_rss_bytes: r.own_rss,
        });
        let line = progress_line(t_s, self.phase, &c, hs_per_s, &r);
        if self.tty {
            print!("\r{line}\x1b[K");
            let _ = std::io::stdout().flush();
        } else if self.last_print.is_none_or(|p| now.duration_since(p) >= Duration::from_secs(5)) {
            println!("{line}");
            self.last_print = Some(now);
        }
    }

    /// Sleeps in short steps (sampling as it goes) until `done`, `until`, or the deadline;
    /// returns whether `done` held.
    fn wait_until(&mut self, until: Instant, mut done: impl FnMut(&Counters) -> bool) -> bool {
        loop {
            self.tick();
            if done(&self.counters()) {
                return true;
            }
            if Instant::now() >= until || self.past_deadline() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wake_all(&self) {
        for w in &self.workers {
            w.wake.signal();
        }
    }

    /// Ramp, settle, hold, probe; then stop the workers and build the report.
    fn phases(&mut self, setup: &Setup, before: Readings, handles: Vec<JoinHandle<ErrorCounts>>) -> Report {
        self.phase = "ramp";
        let ramp = match self.args.ramp_s {
            Some(s) => Duration::from_secs(s),
            None => Duration::from_secs_f64(self.args.connections as f64 / self.args.rate) + RAMP_SLACK,
        };
        let ramp_until = self.start + ramp;
        self.wait_until(ramp_until, Counters::ramp_over);
        let ramp_s = self.start.elapsed().as_secs_f64();
        let ramp_handshakes = self.counters()[Stat::Handshakes];

        // With nobody joined there is nothing to settle, hold or probe.
        let nobody = self.counters()[Stat::Joined] == 0;
        self.phase = "settle";
        let gateway_online = if nobody || self.past_deadline() { None } else { self.settle(&setup.api) };

        self.phase = "hold";
        if !nobody && !self.past_deadline() {
            self.workers.iter().for_each(|w| w.ping_ms.store(self.args.ping_ms, Ordering::Relaxed));
            self.wake_all();
            let until = Instant::now() + Duration::from_secs(self.args.hold_s);
            self.wait_until(until, |_| false);
            self.workers.iter().for_each(|w| w.ping_ms.store(0, Ordering::Relaxed));
        }
        let after = Readings::now(self.args.gateway_pid);
        let held_after = self.counters()[Stat::Open];

        self.phase = "probe";
        let blocks = if nobody || self.past_deadline() { Blocks::default() } else { self.probe(&setup.api) };
        let end = self.counters();
        self.tick();
        if self.tty {
            println!();
        }
        self.stop(handles);
        let m = Measured { ramp_s, ramp_handshakes, gateway_online, before, after, held_after, blocks, end };
        self.report(setup, m)
    }

    fn report(&mut self, setup: &Setup, m: Measured) -> Report {
        let (c, n) = (m.end, self.args.connections);
        let held = c[Stat::Open];
        let blocks = Blocks {
            reached: c[Stat::Reached],
            missing: c[Stat::Joined] - c[Stat::Reached].min(c[Stat::Joined]),
            ..m.blocks
        };
        let (before, after) = (m.before, m.after);
        Report {
            scenario: "connect",
            target: setup.target.to_string(),
            connections_target: n,
            connections_held: held,
            joined: c[Stat::Joined],
            ramp_s: m.ramp_s,
            handshakes_per_s_mean: if m.ramp_s > 0.0 { m.ramp_handshakes as f64 / m.ramp_s } else { 0.0 },
            handshakes_per_s_peak: self.peak_hs_per_s,
            gateway_rss_before_bytes: before.gateway_rss,
            gateway_rss_after_ramp_bytes: after.gateway_rss,
            gateway_bytes_per_conn: per_conn(before.gateway_rss, after.gateway_rss, m.held_after),
            slab_before_bytes: before.slab,
            slab_after_ramp_bytes: after.slab,
            sunreclaim_before_bytes: before.sunreclaim,
            sunreclaim_after_ramp_bytes: after.sunreclaim,
            kernel_bytes_per_pair: per_conn(before.slab, after.slab, m.held_after),
            loadgen_rss_bytes: after.own_rss,
            loadgen_bytes_per_conn: per_conn(before.own_rss, after.own_rss, m.held_after),
            loadgen_state_bytes_per_conn: ConnectReads::bytes_per_slot(),
            blocks,
            errors: std::mem::take(&mut self.errors),
            samples: std::mem::take(&mut self.samples),
            rooms: self.args.rooms,
            sources: setup.sources.to_string(),
            threads: self.args.threads,
            rings: c[Stat::Rings],
            gateway_online: m.gateway_online,
            pings_sent: c[Stat::PingsSent],
            pongs: c[Stat::Pongs],
            frames: c[Stat::Frames],
            recv_nobufs: c[Stat::RecvNoBufs],
            deadline_hit: self.deadline_hit,
            passed: held == n && c[Stat::Joined] == n && blocks.missing == 0,
        }
    }

    /// Waits (bounded) until the gateway's online counts add up to our joined count; returns
    /// the last sum seen.
    fn settle(&mut self, api: &Api) -> Option<u64> {
        let until = Instant::now() + SETTLE_WAIT;
        let mut last = None;
        loop {
            let joined = self.counters()[Stat::Joined];
            let mut sum = Some(0u64);
            for k in 0..self.args.rooms {
                self.tick();
                if self.past_deadline() {
                    return last;
                }
                match api.online(&format!("r{k}")) {
                    Ok(n) => sum = sum.map(|s| s + n),
                    Err(e) => {
                        self.error(e.kind());
                        sum = None;
                        break;
                    }
                }
            }
            if sum.is_some() {
                last = sum;
            }
            if sum == Some(joined) {
                return last;
            }
            if Instant::now() >= until || self.past_deadline() {
                self.error("online_mismatch".into());
                return last;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Zeroes every connection's block count, publishes one whitelist notice per room, and
    /// waits (bounded) until every joined connection has a block; returns the rooms probed and
    /// the timings (the counts are filled in by the caller).
    fn probe(&mut self, api: &Api) -> Blocks {
        self.workers.iter().for_each(|w| w.probe_gen.store(1, Ordering::Release));
        self.wake_all();
        let acked = self.wait_until(Instant::now() + Duration::from_secs(5), |c| c[Stat::ProbeGen] == 1);
        if !acked {
            self.error("probe_not_acknowledged".into());
            return Blocks::default();
        }
        let publish_start = Instant::now();
        let mut probed = 0;
        for k in 0..self.args.rooms {
            self.tick();
            if self.past_deadline() {
                break;
            }
            match api.publish(&format!("r{k}"), PROBE_BODY) {
                Ok(202) => probed += 1,
                Ok(status) => self.error(format!("probe_status_{status}")),
                Err(e) => self.error(format!("probe_{}", e.kind())),
            }
        }
        let publish_s = publish_start.elapsed().as_secs_f64();
        let all = self.wait_until(Instant::now() + PROBE_WAIT, |c| c[Stat::Reached] >= c[Stat::Joined]);
        let all_reached_s = all.then(|| publish_start.elapsed().as_secs_f64());
        Blocks { probed_rooms: probed, reached: 0, missing: 0, publish_s, all_reached_s }
    }

    /// Tells every worker to stop, waits for them (their rings close every connection), and
    /// adds their error counts to ours.
    fn stop(&mut self, handles: Vec<JoinHandle<ErrorCounts>>) {
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
        }
        self.wake_all();
        for h in handles {
            match h.join() {
                Ok(counts) => counts.merge_into(&mut self.errors),
                Err(_) => self.error("worker_panicked".into()),
            }
        }
    }
}
