//! The `upgrade` scenario, run by the main thread: ramp N clients into R rooms of the running
//! (old) gateway, learn each room's last seq (the baseline), publish `--publish-per-s` round the
//! rooms (`upgrade_pub`: retries on 503 and lost connections), and after `--steady-s` start the
//! new gateway with `--takeover-cmd`; it takes the listeners and rooms, and the old one drains
//! its clients into it and exits. Every client follows the README's client algorithm
//! (`upgrade_recv` → `upgrade_follow`: per-client last seq, duplicates dropped, gaps asked of the
//! short poll `upgrade_gaps`, `reconnect` → wait its delay → resume `after=last`; unexpected
//! closes back off). Publishing goes on `--after-s` past the old process's exit, then stops; the
//! rooms' final seqs (the targets) are read and the clients given `--catchup-s` to reach them.
//! Every second one TSV row: both processes' RSS and peak RSS (VmHWM), the API's /metrics
//! (handshakes; which process answered), our clients' counts and the publisher's. The JSON
//! report has the drain time, the reconnect rate, messages accepted, lost (gaps the history
//! could not fill + seqs not reached by the end), duplicates, retries.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::addrs::{Sources, parse_target, sockaddr_in};
use crate::churn::PAIR_REST;
use crate::errors::ErrorCounts;
use crate::handshake::{Subprotocol, request};
use crate::probe::{Api, alive, cpu_s, hwm_bytes, rss_bytes, series_by_label};
use crate::ring::RingParams;
use crate::upgrade_gaps::GapTally;
use crate::upgrade_pub::{PubCount, PubPlan, PubResult};
use crate::upgrade_recv::{FollowReads, RoomSeqs, TALLIES, Tally, TallyShared};
use crate::worker::{ChurnPlan, Counters, Plan, Shared, Stat};

/// Extra time the ramp may take over N ÷ rate: dropped SYNs are retried after 1, 3, 7, 15 s.
const RAMP_SLACK: Duration = Duration::from_secs(30);
/// How long the gateway's online counts may take to match the joined count.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// Files per ring left for the process's own descriptors (ring fds, eventfds, API sockets).
const FD_RESERVE: u64 = 1024;
/// As `soak`'s rings; a resume's backfill (up to the history's size, ~170 bytes a message)
/// arrives in a few receives.
const RING: RingParams =
    RingParams { sq_entries: 512, cq_entries: 8192, files: 0, recv_buffers: 64, recv_buffer_bytes: 2048 };
/// How often the old and new processes are looked at (exit, peak RSS).
const WATCH_EVERY: Duration = Duration::from_millis(10);
/// How long a room's last seq may take to settle (its pending messages cut into a block: the
/// block interval, 1 s by default).
const SEQ_WAIT: Duration = Duration::from_secs(10);
/// How often the API is asked, during the takeover, whether the new process answers it.
const READY_POLL: Duration = Duration::from_millis(100);

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// The gateway's WebSocket listener (IPv4 loopback only), the same for both processes.
    #[arg(long)]
    target: String,
    /// The gateway's business API (IPv4 loopback only), the same for both processes.
    #[arg(long)]
    api: String,
    /// API key, if the gateway has one.
    #[arg(long, env = "BARRAGE_API_KEY", default_value = "", hide_env_values = true)]
    api_key: String,
    /// Clients to open and keep following.
    #[arg(long)]
    connections: u64,
    /// Rooms r0..r{R-1}; client i follows r{i % R}.
    #[arg(long, default_value_t = 100)]
    rooms: u32,
    /// New connections per second during the ramp (all threads together).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Longest the ramp may take (default: N / rate + 30 s).
    #[arg(long)]
    ramp_s: Option<u64>,
    /// Messages posted per second through the business API, round the rooms.
    #[arg(long, default_value_t = 50.0)]
    publish_per_s: f64,
    /// Bytes of a published message's data (a 24-byte header, then dots).
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Seconds of publishing before the takeover.
    #[arg(long, default_value_t = 20)]
    steady_s: u64,
    /// The shell command (`sh -c`) that starts the new gateway with `--takeover`; it should
    /// `exec` the gateway, so that its pid is the gateway's. Run at nice 0 whatever ours is.
    #[arg(long)]
    takeover_cmd: String,
    /// The old gateway's pid (it must exit by itself once drained).
    #[arg(long)]
    gateway_pid: u32,
    /// Longest wait for the old process to exit after the takeover starts.
    #[arg(long, default_value_t = 900)]
    drain_wait_s: u64,
    /// Seconds of publishing after the old process exited.
    #[arg(long, default_value_t = 10)]
    after_s: u64,
    /// Longest wait, once publishing stopped, for every client to reach its room's last seq.
    #[arg(long, default_value_t = 120)]
    catchup_s: u64,
    /// Where the samples go, one row a second (written as they are taken).
    #[arg(long)]
    tsv: PathBuf,
    /// Where the JSON report goes.
    #[arg(long)]
    json: PathBuf,
    /// A name for the run in the report (e.g. the drain rate).
    #[arg(long)]
    label: Option<String>,
    /// Source addresses, `A-B` inclusive, in 127.0.0.0/8.
    #[arg(long, default_value = "127.0.1.1-127.0.1.40")]
    sources: String,
    /// Source ports, `P-Q` inclusive, bound explicitly on every source address.
    #[arg(long, default_value = "10000-60999")]
    ports: String,
    /// Independent load threads, each with its own rings, clients and source pairs.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Direct descriptors per ring; 0 = RLIMIT_NOFILE − 1024.
    #[arg(long, default_value_t = 0)]
    ring_files: u32,
    /// Connections started and not yet joined, at most (all threads together): the ramp's and
    /// the reconnects'.
    #[arg(long, default_value_t = 4096)]
    pending_max: u32,
    /// Hard limit on the whole run (0 = the sum of every phase's bound + 60 s).
    #[arg(long, default_value_t = 0)]
    deadline_s: u64,
}

/// Arguments checked and turned into what the run needs.
struct Setup {
    target: SocketAddrV4,
    api: Api,
    sources: Sources,
    files_per_ring: u32,
    ramp: Duration,
    deadline: Duration,
}

/// Source pairs a run needs: every client held, every client once more for its reconnect (the
/// first pair rests 61 s past TIME_WAIT, longer than most drains), twice the in-flight cap, and a
/// quarter spare for reconnects that fail and come back.
pub fn pairs_needed(connections: u64, pending_max: u64) -> u64 {
    let base = 2 * connections + 2 * pending_max;
    base + base / 4
}

/// Runs the scenario; returns the exit code (0 pass, 1 fail, 2 refused arguments).
pub fn run(args: UpgradeArgs) -> i32 {
    let setup = match validate(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("barrage-load: {e}");
            return 2;
        }
    };
    let tsv = match std::fs::File::create(&args.tsv) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => {
            eprintln!("barrage-load: {}: {e}", args.tsv.display());
            return 2;
        }
    };
    // Built once and leaked: the first connection of each client joins without a cursor.
    let requests: &'static [Vec<u8>] = Box::leak(
        (0..args.rooms)
            .map(|k| request(&setup.target.to_string(), &format!("r{k}"), Subprotocol::Proto))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let target: &'static libc::sockaddr_in = Box::leak(Box::new(sockaddr_in(setup.target)));
    let seqs = Arc::new(RoomSeqs::new(args.rooms));
    let (gap_tx, gap_rx) = std::sync::mpsc::channel();
    let gap_tally = Arc::new(GapTally::default());
    let public = Api { addr: setup.target, key: String::new() };
    let gap_thread = {
        let tally = Arc::clone(&gap_tally);
        std::thread::Builder::new()
            .name("short-poll".into())
            .spawn(move || crate::upgrade_gaps::run(public, gap_rx, tally))
    };
    let gap_thread = match gap_thread {
        Ok(h) => h,
        Err(e) => {
            eprintln!("barrage-load: cannot start the short-poll thread: {e}");
            return 1;
        }
    };
    let mut run = Run::new(&args, &setup, tsv, Arc::clone(&seqs), Arc::clone(&gap_tally));
    let (threads, pairs) = (u64::from(args.threads), setup.sources.capacity());
    let mut handles = Vec::new();
    for t in 0..threads {
        let (lo, hi) = (args.connections * t / threads, args.connections * (t + 1) / threads);
        let (p_lo, p_hi) = (pairs * t / threads, pairs * (t + 1) / threads);
        let plan = Plan {
            first: lo,
            count: hi - lo,
            rate_per_s: args.rate / threads as f64,
            pending_max: (args.pending_max / args.threads).max(1),
            files_per_ring: setup.files_per_ring,
            ring: RING,
            sources: setup.sources,
            rooms: args.rooms,
            requests,
            targets: std::slice::from_ref(target),
            // No churn of our own (rate 0): the plan gives slot reuse, the pair pool and the
            // slots' client indices that reconnects need.
            churn: Some(ChurnPlan {
                pairs_first: p_lo,
                pairs_count: p_hi - p_lo,
                pair_rest: PAIR_REST,
                close_wait: Duration::from_secs(10),
                seed: t,
            }),
        };
        let tally = Arc::new(TallyShared::new());
        let reads = FollowReads::new(
            lo,
            hi - lo,
            args.rooms,
            setup.target.to_string(),
            Arc::clone(&seqs),
            gap_tx.clone(),
            Arc::clone(&tally),
        );
        match start_worker(t, plan, reads) {
            Ok((shared, handle)) => {
                run.workers.push(shared);
                run.tallies.push(tally);
                handles.push(handle);
            }
            Err(e) => {
                eprintln!("barrage-load: cannot start load thread {t}: {e}");
                drop(gap_tx);
                let _ = run.stop(handles);
                return 1;
            }
        }
    }
    drop(gap_tx);
    let report = run.phases(handles, gap_thread);
    println!("{}", summary(&report));
    let written = serde_json::to_vec_pretty(&report)
        .map_err(|e| e.to_string())
        .and_then(|json| std::fs::write(&args.json, json).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("barrage-load: writing {}: {e}", args.json.display());
        return 1;
    }
    if report.passed { 0 } else { 1 }
}

fn validate(args: &UpgradeArgs) -> Result<Setup, String> {
    let target = parse_target("--target", &args.target).map_err(|e| e.0)?;
    let api = parse_target("--api", &args.api).map_err(|e| e.0)?;
    let sources = Sources::parse(&args.sources, &args.ports).map_err(|e| e.0)?;
    let rates_ok = [args.rate, args.publish_per_s].iter().all(|r| r.is_finite() && *r > 0.0);
    if args.connections == 0 || args.rooms == 0 || args.threads == 0 || !rates_ok {
        return Err("--connections, --rooms, --threads, --rate and --publish-per-s must be positive".into());
    }
    if u64::from(args.threads) > args.connections || u64::from(args.rooms) > args.connections {
        return Err("--threads and --rooms must not exceed --connections".into());
    }
    if u64::from(u32::MAX) < args.connections {
        return Err("--connections must fit in 32 bits".into());
    }
    if args.message_bytes < crate::fanout_msg::HEADER_BYTES {
        return Err(format!("--message-bytes must be at least {}", crate::fanout_msg::HEADER_BYTES));
    }
    let needed = pairs_needed(args.connections, u64::from(args.pending_max));
    if sources.capacity() < needed {
        return Err(format!(
            "--sources × --ports = {} source pairs; {} clients reconnecting once need {needed} \
             (held, again for the reconnect, in flight, and a quarter spare): widen --sources",
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
    if args.takeover_cmd.trim().is_empty() {
        return Err("--takeover-cmd is empty".into());
    }
    if !alive(args.gateway_pid) {
        return Err(format!("--gateway-pid {}: no such running process", args.gateway_pid));
    }
    let soft = crate::sys::raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let files_per_ring = match args.ring_files {
        0 => soft.saturating_sub(FD_RESERVE).min(u64::from(u32::MAX)) as u32,
        n if u64::from(n) > soft => return Err(format!("--ring-files {n} exceeds RLIMIT_NOFILE {soft}")),
        n => n,
    };
    if files_per_ring == 0 {
        return Err(format!("RLIMIT_NOFILE {soft} leaves no direct descriptors per ring: give --ring-files"));
    }
    let ramp = match args.ramp_s {
        Some(s) => Duration::from_secs(s),
        None => Duration::from_secs_f64(args.connections as f64 / args.rate) + RAMP_SLACK,
    };
    let phases = args.steady_s + args.drain_wait_s + args.after_s + args.catchup_s + 60;
    let deadline = match args.deadline_s {
        0 => ramp + SETTLE_WAIT * 3 + Duration::from_secs(phases),
        s => Duration::from_secs(s),
    };
    Ok(Setup { target, api: Api { addr: api, key: args.api_key.clone() }, sources, files_per_ring, ramp, deadline })
}

type WorkerHandle = JoinHandle<(ErrorCounts, FollowReads)>;

fn start_worker(t: u64, plan: Plan, reads: FollowReads) -> std::io::Result<(Arc<Shared>, WorkerHandle)> {
    let shared = Arc::new(Shared::new()?);
    let theirs = Arc::clone(&shared);
    let handle =
        std::thread::Builder::new().name(format!("load-{t}")).spawn(move || crate::worker::run(plan, theirs, reads))?;
    Ok((shared, handle))
}

/// Starts `cmd` with `sh -c`, at nice 0 whatever ours (the generator runs at nice 19 so the
/// gateway is never starved by it; the new gateway must not inherit that).
fn spawn_takeover(cmd: &str) -> std::io::Result<Child> {
    let nice = crate::sys::niceness();
    let mut c = Command::new(if nice != 0 { "nice" } else { "sh" });
    if nice != 0 {
        c.args(["-n", &(-nice).to_string(), "sh"]);
    }
    c.args(["-c", cmd]).stdin(Stdio::null()).spawn()
}

/// A process watched every `WATCH_EVERY` on a thread of its own: when it exited, its peak RSS.
struct Watch {
    /// Milliseconds after the run's start when it was first seen gone (u64::MAX: still there).
    gone_ms: AtomicU64,
    /// The highest VmHWM seen (the kernel's own peak of VmRSS).
    hwm: AtomicU64,
    stop: AtomicBool,
}

impl Watch {
    fn start(pid: u32, t0: Instant) -> Arc<Watch> {
        let w =
            Arc::new(Watch { gone_ms: AtomicU64::new(u64::MAX), hwm: AtomicU64::new(0), stop: AtomicBool::new(false) });
        let theirs = Arc::clone(&w);
        let spawned = std::thread::Builder::new().name(format!("watch-{pid}")).spawn(move || {
            let status = format!("/proc/{pid}/status");
            while !theirs.stop.load(Ordering::Relaxed) {
                if let Some(h) = hwm_bytes(&status) {
                    theirs.hwm.fetch_max(h, Ordering::Relaxed);
                }
                if !alive(pid) {
                    theirs.gone_ms.store(t0.elapsed().as_millis() as u64, Ordering::Release);
                    return;
                }
                std::thread::sleep(WATCH_EVERY);
            }
        });
        if spawned.is_err() {
            eprintln!("barrage-load: cannot watch pid {pid}");
        }
        w
    }

    fn gone_s(&self) -> Option<f64> {
        let ms = self.gone_ms.load(Ordering::Acquire);
        (ms != u64::MAX).then(|| ms as f64 / 1000.0)
    }

    fn hwm(&self) -> Option<u64> {
        Some(self.hwm.load(Ordering::Relaxed)).filter(|&h| h > 0)
    }
}

/// What the API's /metrics said at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct ApiReading {
    /// The new process answered (it imported rooms); false: the old one.
    by_new: bool,
    hs_ok: u64,
    hs_failed: u64,
    connections: u64,
    reconnects_sent: u64,
}

impl ApiReading {
    fn parse(text: &str) -> ApiReading {
        let handshakes = series_by_label(text, "barrage_handshakes_total", "result");
        let handover = series_by_label(text, "barrage_handover_rooms_total", "way");
        let ok = handshakes.get("ok").copied().unwrap_or(0);
        ApiReading {
            by_new: handover.get("imported").copied().unwrap_or(0) > 0,
            hs_ok: ok,
            hs_failed: handshakes.values().sum::<u64>() - ok,
            connections: crate::probe::series_sum(text, "barrage_connections"),
            reconnects_sent: crate::probe::series_sum(text, "barrage_reconnects_sent_total"),
        }
    }
}

/// The JSON report (field names are the contract with bench/upgrade_report.py).
#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub scenario: &'static str,
    pub label: Option<String>,
    pub target: String,
    pub connections: u64,
    pub rooms: u32,
    pub threads: u32,
    pub rings: u64,
    pub sources: String,
    pub ramp_s: f64,
    pub joined_after_ramp: u64,
    pub gateway_online_after_ramp: Option<u64>,
    pub publish_per_s_target: f64,
    pub steady_s: u64,
    pub after_s: u64,
    pub old_pid: u32,
    pub new_pid: Option<u32>,
    /// Seconds from the takeover command's start until the API answered from the new process
    /// (polled every 100 ms): an upper bound on the hand-over, process start included.
    pub handover_s: Option<f64>,
    /// Seconds from the takeover command's start until the old process was gone.
    pub drain_s: Option<f64>,
    pub old_exited: bool,
    /// Seconds from the end of publishing until every client had its room's last seq.
    pub catchup_s: Option<f64>,
    pub old_rss_at_takeover_bytes: Option<u64>,
    pub old_rss_peak_bytes: Option<u64>,
    pub new_rss_peak_bytes: Option<u64>,
    pub new_rss_end_bytes: Option<u64>,
    /// The generator's reconnects that joined (resumed) during the drain, their mean rate over
    /// the drain and the best one-second row.
    pub resumes: u64,
    pub resumes_per_s_mean: Option<f64>,
    pub resumes_per_s_peak: f64,
    /// The new process's `barrage_handshakes_total{result="ok"}` at the end, and its best second.
    pub new_handshakes_ok: Option<u64>,
    pub new_handshakes_per_s_peak: Option<f64>,
    pub accepted: u64,
    /// Σ over rooms of (last seq at the end − baseline): the seqs the rooms handed out.
    pub sequenced: u64,
    /// Rooms whose sequenced count differs from their accepted count.
    pub rooms_mismatched: u64,
    pub retried_503: u64,
    pub retried_lost: u64,
    pub answers_lost: u64,
    pub waited: u64,
    pub wait_ms_p50: f64,
    pub wait_ms_p99: f64,
    pub wait_ms_max: f64,
    pub refused: u64,
    pub given_up: u64,
    /// Σ over clients of their room's sequenced messages: what following perfectly shows.
    pub expected: u64,
    pub shown: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub gaps: u64,
    pub gap_messages: u64,
    pub gaps_filled: u64,
    pub gap_recovered: u64,
    pub gap_lost: u64,
    pub behind_at_end: u64,
    /// gap_lost + behind_at_end.
    pub lost: u64,
    pub caught_up: u64,
    pub backfill_blocks: u64,
    pub backfill_messages: u64,
    pub truncated: u64,
    pub reconnect_frames: u64,
    pub moved: u64,
    pub unexpected_closes: u64,
    pub failed_starts: u64,
    pub malformed: u64,
    pub error_frames: u64,
    pub kicked: u64,
    pub poll_errors: u64,
    pub errors: BTreeMap<String, u64>,
    pub publish_errors: BTreeMap<String, u64>,
    pub samples: u64,
    pub tsv: String,
    pub deadline_hit: bool,
    pub passed: bool,
}

/// The main thread's run: the workers it steers, what it samples, what it found.
struct Run<'a> {
    args: &'a UpgradeArgs,
    setup: &'a Setup,
    start: Instant,
    workers: Vec<Arc<Shared>>,
    tallies: Vec<Arc<TallyShared>>,
    seqs: Arc<RoomSeqs>,
    gaps: Arc<GapTally>,
    publish: Arc<PubCount>,
    tsv: std::io::BufWriter<std::fs::File>,
    rows: u64,
    next_sample: Instant,
    phase: &'static str,
    old: Arc<Watch>,
    new: Option<(u32, Arc<Watch>)>,
    /// The new gateway, started by us (and so ours to reap if it dies first).
    child: Option<Child>,
    takeover_at: Option<Instant>,
    ready_at: Option<Instant>,
    last: Option<(f64, Vec<(&'static str, String)>)>,
    resumes_per_s_peak: f64,
    new_hs_per_s_peak: Option<f64>,
    new_hs_ok: Option<u64>,
    report: Report,
}

impl<'a> Run<'a> {
    fn new(
        args: &'a UpgradeArgs,
        setup: &'a Setup,
        tsv: std::io::BufWriter<std::fs::File>,
        seqs: Arc<RoomSeqs>,
        gaps: Arc<GapTally>,
    ) -> Run<'a> {
        let start = Instant::now();
        Run {
            args,
            setup,
            start,
            workers: Vec::new(),
            tallies: Vec::new(),
            seqs,
            gaps,
            publish: Arc::new(PubCount::default()),
            tsv,
            rows: 0,
            next_sample: start,
            phase: "ramp",
            old: Watch::start(args.gateway_pid, start),
            new: None,
            child: None,
            takeover_at: None,
            ready_at: None,
            last: None,
            resumes_per_s_peak: 0.0,
            new_hs_per_s_peak: None,
            new_hs_ok: None,
            report: Report::default(),
        }
    }

    fn error(&mut self, kind: String) {
        *self.report.errors.entry(kind).or_insert(0) += 1;
    }

    fn past_deadline(&mut self) -> bool {
        if self.start.elapsed() >= self.setup.deadline {
            if !self.report.deadline_hit {
                self.error("deadline".into());
            }
            self.report.deadline_hit = true;
        }
        self.report.deadline_hit
    }

    fn counters(&self) -> Counters {
        let mut all = Counters::zero_for_merge();
        for w in &self.workers {
            all.merge(&w.load());
        }
        all
    }

    fn tally(&self, t: Tally) -> u64 {
        self.tallies.iter().map(|s| s.load(t)).sum()
    }

    fn api_reading(&self) -> Option<ApiReading> {
        self.setup.api.metrics().ok().map(|t| ApiReading::parse(&t))
    }

    /// One TSV row (and a progress line) of every side, now.
    fn sample(&mut self) {
        let t_s = self.start.elapsed().as_secs_f64();
        let c = self.counters();
        let api = self.api_reading();
        let old_pid = self.args.gateway_pid;
        let proc_of = |pid: Option<u32>| {
            let rss = pid.and_then(|p| rss_bytes(&format!("/proc/{p}/status")));
            let hwm = pid.and_then(|p| hwm_bytes(&format!("/proc/{p}/status")));
            let cpu = pid.and_then(|p| cpu_s(&format!("/proc/{p}/stat")));
            (rss, hwm, cpu)
        };
        let (old_rss, old_hwm, old_cpu) = proc_of(alive(old_pid).then_some(old_pid));
        let new_pid = self.new.as_ref().map(|(p, _)| *p);
        let (new_rss, new_hwm, new_cpu) = proc_of(new_pid);
        let opt = |v: Option<u64>| v.map_or("NA".to_string(), |v| v.to_string());
        let optf = |v: Option<f64>| v.map_or("NA".to_string(), |v| format!("{v:.2}"));
        let since = self.takeover_at.map(|t| t.elapsed().as_secs_f64());
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let p = &self.publish;
        let mut cols: Vec<(&'static str, String)> = vec![
            ("t_s", format!("{t_s:.2}")),
            ("phase", self.phase.to_string()),
            ("since_takeover_s", optf(since)),
            ("open", c[Stat::Open].to_string()),
            ("joined", c[Stat::Joined].to_string()),
            ("dialing", c[Stat::Dialing].to_string()),
            ("reopening", c[Stat::Reopening].to_string()),
            ("attempted", c[Stat::Attempted].to_string()),
            ("reconnects", c[Stat::Reconnects].to_string()),
            ("reconnects_joined", c[Stat::ReconnectsJoined].to_string()),
            ("reconnects_failed", c[Stat::ReconnectsFailed].to_string()),
            ("frames", c[Stat::Frames].to_string()),
            ("loadgen_errors", c[Stat::Errors].to_string()),
        ];
        for (name, t) in TALLY_COLUMNS {
            cols.push((name, self.tally(t).to_string()));
        }
        cols.extend([
            ("accepted", load(&p.accepted).to_string()),
            ("retried_503", load(&p.retried_503).to_string()),
            ("retried_lost", load(&p.retried_lost).to_string()),
            ("answers_lost", load(&p.answers_lost).to_string()),
            ("waited", load(&p.waited).to_string()),
            ("refused", load(&p.refused).to_string()),
            ("gap_asks", load(&self.gaps.asks).to_string()),
            ("gap_recovered", load(&self.gaps.recovered).to_string()),
            ("gap_lost", load(&self.gaps.lost).to_string()),
            ("old_alive", u8::from(alive(old_pid)).to_string()),
            ("old_rss_bytes", opt(old_rss)),
            ("old_hwm_bytes", opt(old_hwm.or(self.old.hwm()))),
            ("old_cpu_s", optf(old_cpu)),
            ("new_rss_bytes", opt(new_rss)),
            ("new_hwm_bytes", opt(new_hwm)),
            ("new_cpu_s", optf(new_cpu)),
            ("api_by", api.map_or("NA".into(), |a| if a.by_new { "new" } else { "old" }.to_string())),
            ("gw_hs_ok", opt(api.map(|a| a.hs_ok))),
            ("gw_hs_failed", opt(api.map(|a| a.hs_failed))),
            ("gw_connections", opt(api.map(|a| a.connections))),
            ("gw_reconnects_sent", opt(api.map(|a| a.reconnects_sent))),
            ("loadgen_rss_bytes", opt(rss_bytes("/proc/self/status"))),
            ("loadgen_cpu_s", optf(cpu_s("/proc/self/stat"))),
            ("loadavg1", optf(std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| crate::probe::loadavg1(&t)))),
        ]);
        if self.rows == 0 {
            let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
            let _ = writeln!(self.tsv, "{}", names.join("\t"));
        }
        let values: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
        let _ = writeln!(self.tsv, "{}", values.join("\t"));
        let _ = self.tsv.flush();
        self.rows += 1;
        self.rates(t_s, &cols, api);
        println!("{}", self.progress_line(t_s, &c, old_rss, new_rss));
        self.last = Some((t_s, cols));
    }

    /// The one-second peaks: our resumes, and the new process's handshakes (rows answered by
    /// it on both ends).
    fn rates(&mut self, t_s: f64, cols: &[(&'static str, String)], api: Option<ApiReading>) {
        let Some((t0, prev)) = &self.last else { return };
        let dt = (t_s - t0).max(1e-3);
        let col =
            |cs: &[(&str, String)], k: &str| cs.iter().find(|(n, _)| *n == k).and_then(|(_, v)| v.parse::<f64>().ok());
        if let (Some(a), Some(b)) = (col(prev, "reconnects_joined"), col(cols, "reconnects_joined")) {
            self.resumes_per_s_peak = self.resumes_per_s_peak.max((b - a) / dt);
        }
        let prev_new = prev.iter().any(|(n, v)| *n == "api_by" && v == "new");
        if let Some(a) = api.filter(|a| a.by_new) {
            self.new_hs_ok = Some(a.hs_ok);
            if prev_new && let Some(before) = col(prev, "gw_hs_ok") {
                let r = (a.hs_ok as f64 - before) / dt;
                self.new_hs_per_s_peak = Some(self.new_hs_per_s_peak.unwrap_or(0.0).max(r));
            }
        }
    }

    fn progress_line(&self, t_s: f64, c: &Counters, old_rss: Option<u64>, new_rss: Option<u64>) -> String {
        let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / f64::from(1 << 20)));
        format!(
            "[{t_s:7.1}s] {:<8} joined {:>7} reopening {:>6} resumed {:>7} told {:>7} unexpected {:>4} shown {:>9} dups {:>4} gaps {:>3} caught {:>7} published {:>6} 503s {:>4} old {} new {} errors {}",
            self.phase,
            c[Stat::Joined],
            c[Stat::Reopening],
            c[Stat::ReconnectsJoined],
            self.tally(Tally::ReconnectFrames),
            self.tally(Tally::Unexpected),
            self.tally(Tally::Shown),
            self.tally(Tally::Duplicates),
            self.tally(Tally::Gaps),
            self.tally(Tally::CaughtUp),
            self.publish.accepted.load(Ordering::Relaxed),
            self.publish.retried_503.load(Ordering::Relaxed),
            mib(old_rss),
            mib(new_rss),
            c[Stat::Errors],
        )
    }

    /// Samples if a row is due.
    fn tick(&mut self) {
        if Instant::now() >= self.next_sample {
            self.sample();
            while self.next_sample <= Instant::now() {
                self.next_sample += Duration::from_secs(1);
            }
        }
    }

    /// Sleeps in short steps (sampling as rows come due) until `done`, `until`, or the deadline;
    /// returns whether `done` held.
    fn wait_until(&mut self, until: Instant, mut done: impl FnMut(&mut Self) -> bool) -> bool {
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

    /// Ramp, settle, baselines, steady, takeover and drain, after, targets, catch-up; then stop
    /// everyone and build the report.
    fn phases(&mut self, handles: Vec<WorkerHandle>, gap_thread: JoinHandle<()>) -> Report {
        let ramp_until = self.start + self.setup.ramp;
        self.wait_until(ramp_until, |r| r.counters().ramp_over());
        self.report.ramp_s = self.start.elapsed().as_secs_f64();
        self.report.joined_after_ramp = self.counters()[Stat::Joined];
        self.phase = "settle";
        self.report.gateway_online_after_ramp = self.settle();
        let seqs = Arc::clone(&self.seqs);
        let bases_ok = self.read_seqs(&seqs.bases);

        self.phase = "steady";
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = self.start_publisher(&stop);
        let steady_until = Instant::now() + Duration::from_secs(self.args.steady_s);
        self.wait_until(steady_until, |_| false);

        self.phase = "takeover";
        self.report.old_rss_at_takeover_bytes = rss_bytes(&format!("/proc/{}/status", self.args.gateway_pid));
        self.takeover();

        self.phase = "after";
        let after_until = Instant::now() + Duration::from_secs(self.args.after_s);
        self.wait_until(after_until, |_| false);
        stop.store(true, Ordering::Release);
        let published = publisher.and_then(|h| h.join().ok());
        let published_at = Instant::now();
        let targets_ok = self.read_seqs(&seqs.targets);
        self.seqs.targets_set.store(true, Ordering::Release);
        self.workers.iter().for_each(|w| w.wake.signal());

        self.phase = "catchup";
        let n = self.args.connections;
        let catchup_until = Instant::now() + Duration::from_secs(self.args.catchup_s);
        if self.wait_until(catchup_until, |r| r.tally(Tally::CaughtUp) >= n) {
            self.report.catchup_s = Some(published_at.elapsed().as_secs_f64());
        }
        self.phase = "end";
        self.sample();
        self.report.new_rss_end_bytes = self.new.as_ref().and_then(|(p, _)| rss_bytes(&format!("/proc/{p}/status")));
        let end = self.counters();
        let reads = self.stop(handles);
        self.finish(end, reads, gap_thread, published, bases_ok && targets_ok);
        std::mem::take(&mut self.report)
    }

    /// Starts the new process and waits (sampling) until the old one is gone.
    fn takeover(&mut self) {
        let at = Instant::now();
        self.takeover_at = Some(at);
        match spawn_takeover(&self.args.takeover_cmd) {
            Ok(child) => {
                let pid = child.id();
                self.report.new_pid = Some(pid);
                self.new = Some((pid, Watch::start(pid, self.start)));
                // Never ended here: the bench script ends the new gateway.
                self.child = Some(child);
            }
            Err(e) => {
                self.error(format!("takeover_spawn_{:?}", e.kind()).to_lowercase());
                return;
            }
        }
        self.sample();
        let drain_until = at + Duration::from_secs(self.args.drain_wait_s);
        let mut next_poll = at;
        let old = Arc::clone(&self.old);
        let exited = self.wait_until(drain_until, |r| {
            if r.ready_at.is_none() && Instant::now() >= next_poll {
                next_poll = Instant::now() + READY_POLL;
                if r.api_reading().is_some_and(|a| a.by_new) {
                    r.ready_at = Some(Instant::now());
                }
            }
            old.gone_s().is_some()
        });
        self.report.old_exited = exited;
        self.report.handover_s = self.ready_at.map(|t| t.duration_since(at).as_secs_f64());
        let at_s = at.duration_since(self.start).as_secs_f64();
        self.report.drain_s = self.old.gone_s().map(|g| g - at_s);
        if !exited {
            self.error("old_process_did_not_exit".into());
        }
        if let Some(child) = &mut self.child
            && !matches!(child.try_wait(), Ok(None))
        {
            self.error("new_exited".into());
        }
        // The row that shows the old process gone.
        self.sample();
    }

    fn start_publisher(&mut self, stop: &Arc<AtomicBool>) -> Option<JoinHandle<PubResult>> {
        let plan = PubPlan {
            api: self.setup.api.addr,
            api_key: self.setup.api.key.clone(),
            rooms: self.args.rooms,
            rate_per_s: self.args.publish_per_s,
            message_bytes: self.args.message_bytes,
        };
        let (stop, count) = (Arc::clone(stop), Arc::clone(&self.publish));
        match std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || crate::upgrade_pub::run(plan, stop, count))
        {
            Ok(h) => Some(h),
            Err(e) => {
                self.error(format!("publisher_spawn_{:?}", e.kind()).to_lowercase());
                None
            }
        }
    }

    /// Reads every room's last seq from the API into `into` (bases or targets), once nothing
    /// is pending in the room (an accepted message has no seq until the next block is cut),
    /// retrying each for a few seconds; false if some room never answered so.
    fn read_seqs(&mut self, into: &[AtomicU64]) -> bool {
        let mut ok = true;
        for (k, slot) in into.iter().enumerate() {
            let room = format!("r{k}");
            let until = Instant::now() + SEQ_WAIT;
            loop {
                let read = self.setup.api.last_seq(&room);
                if let Ok((seq, 0)) = read {
                    slot.store(seq, Ordering::Relaxed);
                    break;
                }
                if Instant::now() >= until {
                    self.error(read.map_or_else(|e| e.kind(), |_| "pending_at_end".into()));
                    ok = false;
                    break;
                }
                self.tick();
                std::thread::sleep(Duration::from_millis(50));
            }
            self.tick();
        }
        ok
    }

    /// Waits (bounded) until the gateway's online counts add up to our joined count; returns
    /// the last sum seen.
    fn settle(&mut self) -> Option<u64> {
        let until = Instant::now() + SETTLE_WAIT;
        let mut last = None;
        loop {
            let joined = self.counters()[Stat::Joined];
            let mut sum = Some(0u64);
            for k in 0..self.args.rooms {
                self.tick();
                match self.setup.api.online(&format!("r{k}")) {
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

    /// Tells every worker to stop and waits for them (their rings close every connection);
    /// returns their clients.
    fn stop(&mut self, handles: Vec<WorkerHandle>) -> Vec<FollowReads> {
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
            w.wake.signal();
        }
        let mut reads = Vec::new();
        for h in handles {
            match h.join() {
                Ok((counts, r)) => {
                    counts.merge_into(&mut self.report.errors);
                    r.errors.merge_into(&mut self.report.errors);
                    reads.push(r);
                }
                Err(_) => self.error("worker_panicked".into()),
            }
        }
        reads
    }

    /// Every figure of the report, from the workers' clients, the short polls and the publisher.
    fn finish(
        &mut self,
        end: Counters,
        reads: Vec<FollowReads>,
        gap_thread: JoinHandle<()>,
        published: Option<PubResult>,
        seqs_ok: bool,
    ) {
        let mut tally = [0u64; TALLIES];
        let mut behind = 0;
        for r in &reads {
            for (t, v) in tally.iter_mut().zip(r.tally) {
                *t += v;
            }
            behind += r.behind();
        }
        // The clients (and with them the last senders of gap asks) go: the short polls finish.
        drop(reads);
        if gap_thread.join().is_err() {
            self.error("short_poll_panicked".into());
        }
        let args = self.args;
        let (n, rooms) = (args.connections, args.rooms);
        let members = |k: u32| n / u64::from(rooms) + u64::from(u64::from(k) < n % u64::from(rooms));
        let mut sequenced_per_room = Vec::new();
        let mut expected = 0;
        for k in 0..rooms {
            let s = self.seqs.target(k).saturating_sub(self.seqs.bases[k as usize].load(Ordering::Relaxed));
            sequenced_per_room.push(s);
            expected += s * members(k);
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let get = |t: Tally| tally[t as usize];
        let r = &mut self.report;
        if let Some(p) = &published {
            r.rooms_mismatched =
                p.accepted_per_room.iter().zip(&sequenced_per_room).filter(|(a, s)| a != s).count() as u64;
            r.publish_errors = p.errors.clone();
            let ms = |q: f64| p.latency_us.value_at_quantile(q) as f64 / 1000.0;
            (r.wait_ms_p50, r.wait_ms_p99, r.wait_ms_max) = (ms(0.5), ms(0.99), p.latency_us.max() as f64 / 1000.0);
        }
        r.scenario = "upgrade";
        r.label = args.label.clone();
        r.target = self.setup.target.to_string();
        (r.connections, r.rooms, r.threads, r.rings) = (n, rooms, args.threads, end[Stat::Rings]);
        r.sources = self.setup.sources.to_string();
        (r.publish_per_s_target, r.steady_s, r.after_s) = (args.publish_per_s, args.steady_s, args.after_s);
        r.old_pid = args.gateway_pid;
        r.old_rss_peak_bytes = self.old.hwm();
        r.new_rss_peak_bytes = self.new.as_ref().and_then(|(_, w)| w.hwm());
        r.resumes = end[Stat::ReconnectsJoined];
        r.resumes_per_s_mean = r.drain_s.filter(|d| *d > 0.0).map(|d| r.resumes as f64 / d);
        r.resumes_per_s_peak = self.resumes_per_s_peak;
        (r.new_handshakes_ok, r.new_handshakes_per_s_peak) = (self.new_hs_ok, self.new_hs_per_s_peak);
        let p = &self.publish;
        r.accepted = load(&p.accepted);
        r.sequenced = sequenced_per_room.iter().sum();
        (r.retried_503, r.retried_lost, r.answers_lost) =
            (load(&p.retried_503), load(&p.retried_lost), load(&p.answers_lost));
        (r.waited, r.refused, r.given_up) = (load(&p.waited), load(&p.refused), load(&p.given_up));
        r.expected = expected;
        (r.shown, r.duplicates, r.stale) = (get(Tally::Shown), get(Tally::Duplicates), get(Tally::Stale));
        (r.gaps, r.gap_messages) = (get(Tally::Gaps), get(Tally::GapMessages));
        let g = &self.gaps;
        (r.gaps_filled, r.gap_recovered, r.gap_lost, r.poll_errors) =
            (load(&g.filled), load(&g.recovered), load(&g.lost), load(&g.poll_errors));
        r.behind_at_end = behind;
        r.lost = r.gap_lost + behind;
        r.caught_up = get(Tally::CaughtUp);
        (r.backfill_blocks, r.backfill_messages, r.truncated) =
            (get(Tally::BackfillBlocks), get(Tally::BackfillMessages), get(Tally::Truncated));
        (r.reconnect_frames, r.moved) = (get(Tally::ReconnectFrames), get(Tally::Moved));
        (r.unexpected_closes, r.failed_starts) = (get(Tally::Unexpected), get(Tally::FailedStarts));
        (r.malformed, r.error_frames, r.kicked) = (get(Tally::Malformed), get(Tally::ErrorFrames), get(Tally::Kicked));
        r.samples = self.rows;
        r.tsv = args.tsv.display().to_string();
        r.passed = seqs_ok
            && published.is_some()
            && r.joined_after_ramp == n
            && r.old_exited
            && r.lost == 0
            && r.caught_up == n
            && r.accepted > 0
            && r.accepted == r.sequenced
            && r.refused == 0
            && r.given_up == 0
            && !r.deadline_hit;
    }
}

/// The clients' tallies, as TSV columns.
const TALLY_COLUMNS: [(&str, Tally); 17] = [
    ("welcomes", Tally::Welcomes),
    ("blocks", Tally::Blocks),
    ("shown", Tally::Shown),
    ("duplicates", Tally::Duplicates),
    ("stale", Tally::Stale),
    ("gaps", Tally::Gaps),
    ("gap_messages", Tally::GapMessages),
    ("backfill_blocks", Tally::BackfillBlocks),
    ("backfill_messages", Tally::BackfillMessages),
    ("truncated", Tally::Truncated),
    ("reconnect_frames", Tally::ReconnectFrames),
    ("moved", Tally::Moved),
    ("unexpected_closes", Tally::Unexpected),
    ("failed_starts", Tally::FailedStarts),
    ("malformed", Tally::Malformed),
    ("error_frames", Tally::ErrorFrames),
    ("caught_up", Tally::CaughtUp),
];

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / f64::from(1 << 20)));
    let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.2} s"));
    let list = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
    let mut s = format!(
        "upgrade {}{}: {} clients in {} rooms, ramp {:.1} s, joined {} (gateway online {})\n",
        r.target,
        r.label.as_ref().map_or(String::new(), |l| format!(" ({l})")),
        r.connections,
        r.rooms,
        r.ramp_s,
        r.joined_after_ramp,
        r.gateway_online_after_ramp.map_or("-".into(), |n| n.to_string())
    );
    s += &format!(
        "  takeover: API from the new process after {}, old process gone after {} (drain); catch-up {}\n",
        secs(r.handover_s),
        secs(r.drain_s),
        secs(r.catchup_s)
    );
    s += &format!(
        "  resumes {} ({} /s mean over the drain, {:.0} /s best second); new process handshakes ok {} (best second {})\n",
        r.resumes,
        r.resumes_per_s_mean.map_or("-".into(), |v| format!("{v:.0}")),
        r.resumes_per_s_peak,
        r.new_handshakes_ok.map_or("-".into(), |v| v.to_string()),
        r.new_handshakes_per_s_peak.map_or("-".into(), |v| format!("{v:.0}/s"))
    );
    s += &format!(
        "  peak RSS: old {} (at takeover {}), new {} (end {})\n",
        mib(r.old_rss_peak_bytes),
        mib(r.old_rss_at_takeover_bytes),
        mib(r.new_rss_peak_bytes),
        mib(r.new_rss_end_bytes)
    );
    s += &format!(
        "  published: accepted {} (rooms sequenced {}, {} rooms differ); retried: 503 {}, lost connection {} (answers lost {}); waited > 100 ms {}, max {:.0} ms; refused {}, given up {}\n",
        r.accepted,
        r.sequenced,
        r.rooms_mismatched,
        r.retried_503,
        r.retried_lost,
        r.answers_lost,
        r.waited,
        r.wait_ms_max,
        r.refused,
        r.given_up
    );
    s += &format!(
        "  clients: expected {} shown {} duplicates {} gaps {} ({} messages; filled {}, recovered {}, lost {}) behind at end {} -> LOST {}; caught up {}/{}\n",
        r.expected,
        r.shown,
        r.duplicates,
        r.gaps,
        r.gap_messages,
        r.gaps_filled,
        r.gap_recovered,
        r.gap_lost,
        r.behind_at_end,
        r.lost,
        r.caught_up,
        r.connections
    );
    s += &format!(
        "  reconnect frames {} moved {} unexpected closes {} failed starts {}; backfills {} ({} messages, {} truncated); malformed {} error frames {}\n",
        r.reconnect_frames,
        r.moved,
        r.unexpected_closes,
        r.failed_starts,
        r.backfill_blocks,
        r.backfill_messages,
        r.truncated,
        r.malformed,
        r.error_frames
    );
    s += &format!("  errors: {}; publish errors: {}\n", list(&r.errors), list(&r.publish_errors));
    s += if r.passed { "  PASS" } else { "  FAIL" };
    if r.deadline_hit {
        s += " (deadline hit)";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_cover_holding_and_reconnecting_everyone() {
        assert_eq!(pairs_needed(200_000, 4096), (400_000 + 8192) * 5 / 4);
    }

    #[test]
    fn the_api_reading_tells_the_new_process_by_its_imported_rooms() {
        let old = "barrage_handshakes_total{shard=\"0\",result=\"ok\"} 100\n\
            barrage_handshakes_total{shard=\"1\",result=\"ok\"} 50\n\
            barrage_handshakes_total{shard=\"1\",result=\"timeout\"} 2\n\
            barrage_handover_rooms_total{way=\"exported\"} 0\n\
            barrage_handover_rooms_total{way=\"imported\"} 0\n\
            barrage_connections{shard=\"0\"} 7\n";
        let a = ApiReading::parse(old);
        assert!(!a.by_new);
        assert_eq!((a.hs_ok, a.hs_failed, a.connections), (150, 2, 7));
        let new = "barrage_handover_rooms_total{way=\"imported\"} 100\nbarrage_reconnects_sent_total{shard=\"0\"} 0\n";
        assert!(ApiReading::parse(new).by_new);
    }

    #[test]
    fn every_tally_but_the_flags_has_a_column() {
        let named: std::collections::HashSet<usize> = TALLY_COLUMNS.iter().map(|(_, t)| *t as usize).collect();
        assert_eq!(named.len(), TALLY_COLUMNS.len());
        // Kicked is in the report only.
        assert_eq!(named.len(), TALLIES - 1);
    }
}
