//! The `soak` scenario, run by the main thread: ramp N connections into R rooms, then for
//! `--duration-s` close `--churn-per-s` random joined ones a second (each reopened into the same
//! room at once: the workers' churn) while a publisher thread posts `--publish-per-s` messages a
//! second round the rooms through the business API; every `--sample-s` one TSV row of the
//! gateway's memory and counters, the kernel's TCP memory and ours. Then stop churning and
//! publishing, let the last closes end, check the gateway's online counts add up to ours, and
//! report. The connections live in the workers (`worker`, with a churn plan); this thread
//! steers them, samples, and talks to the gateway's API.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::addrs::{Sources, parse_target, sockaddr_in};
use crate::churn::{PAIR_REST, pairs_needed};
use crate::errors::ErrorCounts;
use crate::fanout_msg::{Header, message};
use crate::fanout_pub::Http;
use crate::handshake::{Subprotocol, request};
use crate::pace::TokenBucket;
use crate::probe::{
    Api, Readings, SOCKSTAT_PAGE_BYTES, SocketStates, TcpStat, series_by_label, series_sum, socket_states,
};
use crate::ring::RingParams;
use crate::sys::monotonic_ns;
use crate::worker::{ChurnPlan, ConnectReads, Counters, Plan, Shared, Stat};

/// Extra time the ramp may take over N ÷ rate: dropped SYNs are retried after 1, 3, 7, 15 s.
const RAMP_SLACK: Duration = Duration::from_secs(30);
/// How long the gateway's online counts may take to match the joined count.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// After the churn stops, how long the last closes and reconnects may take (beyond the close
/// wait, which bounds the closes).
const DRAIN_SLACK: Duration = Duration::from_secs(15);
/// Files per ring left for the process's own descriptors (ring fds, eventfds, API sockets).
const FD_RESERVE: u64 = 1024;
/// As `connect`'s rings: a reconnect's welcome and history backfill (up to 50 messages, a few
/// KB) arrive in a few receives.
const RING: RingParams =
    RingParams { sq_entries: 512, cq_entries: 8192, files: 0, recv_buffers: 64, recv_buffer_bytes: 2048 };
/// The publisher's longest nap between pacing checks.
const PUBLISH_NAP: Duration = Duration::from_millis(5);
/// Messages the publisher sends in a row before it looks at the clock again.
const PUBLISH_BURST_MAX: u64 = 64;
/// The achieved churn must reach this share of the target for the run to pass.
const CHURN_ACHIEVED_MIN: f64 = 0.95;

#[derive(Args, Debug)]
pub struct SoakArgs {
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
    /// Rooms r0..r{R-1}; connection i joins r{i % R}, and its replacements the same room.
    #[arg(long)]
    rooms: u32,
    /// New connections per second during the ramp (all threads together).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Longest the ramp may take (default: N / rate + 30 s).
    #[arg(long)]
    ramp_s: Option<u64>,
    /// Joined connections closed (Close 1000, then the server's answer) and reopened into the
    /// same room per second, all threads together, for the whole soak; victims are drawn at
    /// random, so a connection lives N / churn seconds on average. 0 = none.
    #[arg(long, default_value_t = 0.0)]
    churn_per_s: f64,
    /// Messages posted per second through the business API, round the rooms (each room gets
    /// publish / R a second). 0 = none.
    #[arg(long, default_value_t = 0.0)]
    publish_per_s: f64,
    /// Bytes of a published message's data (a 24-byte header, then dots).
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// Seconds of churn and publishing, after the ramp.
    #[arg(long)]
    duration_s: u64,
    /// Seconds between TSV rows.
    #[arg(long, default_value_t = 10)]
    sample_s: u64,
    /// Where the samples go, one row each `--sample-s` (written as they are taken).
    #[arg(long)]
    tsv: PathBuf,
    /// Where the JSON report goes.
    #[arg(long)]
    json: PathBuf,
    /// Source addresses, `A-B` inclusive, in 127.0.0.0/8.
    #[arg(long, default_value = "127.0.1.1-127.0.1.40")]
    sources: String,
    /// Source ports, `P-Q` inclusive, bound explicitly on every source address.
    #[arg(long, default_value = "10000-60999")]
    ports: String,
    /// Independent load threads, each with its own rings, share of connections, churn and pairs.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Direct descriptors per ring; 0 = RLIMIT_NOFILE − 1024.
    #[arg(long, default_value_t = 0)]
    ring_files: u32,
    /// The gateway's pid, to sample its RSS and CPU time.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Ping every joined connection once per this many ms during the soak (0 = never).
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
    /// How long a churn close waits for the server's answer before closing the socket anyway
    /// (counted as `close_timeout`).
    #[arg(long, default_value_t = 10_000)]
    close_wait_ms: u64,
    /// Hard limit on the whole run (0 = ramp allowance + duration + 180 s).
    #[arg(long, default_value_t = 0)]
    deadline_s: u64,
    /// Subprotocol offered in the upgrade.
    #[arg(long, value_enum, default_value_t = Subprotocol::Proto)]
    subprotocol: Subprotocol,
    /// Connections started and not yet joined, at most (all threads together).
    #[arg(long, default_value_t = 4096)]
    pending_max: u32,
    /// Seed of the victims' dice (thread t uses seed + t).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also list the sockets on this local port each row (`ss -Htanm state all sport = :PORT`,
    /// the gateway's listener port): the gateway's own TCP sockets by state and their buffer
    /// memory, apart from the rest of the box. 0 = off.
    #[arg(long, default_value_t = 0)]
    ss_port: u16,
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

/// Runs the scenario; returns the exit code (0 pass, 1 fail, 2 refused arguments).
pub fn run(args: SoakArgs) -> i32 {
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
    // Built once and leaked: the kernel reads them for as long as any connection starts.
    let requests: &'static [Vec<u8>] = Box::leak(
        (0..args.rooms)
            .map(|k| request(&setup.target.to_string(), &format!("r{k}"), args.subprotocol))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let target: &'static libc::sockaddr_in = Box::leak(Box::new(sockaddr_in(setup.target)));
    let mut run = Run::new(&args, &setup, tsv);
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
            churn: Some(ChurnPlan {
                pairs_first: p_lo,
                pairs_count: p_hi - p_lo,
                pair_rest: PAIR_REST,
                close_wait: Duration::from_millis(args.close_wait_ms),
                seed: args.seed.wrapping_add(t),
            }),
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
    let report = run.phases(handles);
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

fn validate(args: &SoakArgs) -> Result<Setup, String> {
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
    let rates_ok = [args.churn_per_s, args.publish_per_s].iter().all(|r| r.is_finite() && *r >= 0.0);
    if !rates_ok || args.duration_s == 0 || args.sample_s == 0 {
        return Err("--churn-per-s and --publish-per-s must be ≥ 0, --duration-s and --sample-s positive".into());
    }
    if args.churn_per_s > args.connections as f64 {
        return Err("--churn-per-s exceeds --connections (each connection would close more than once a second)".into());
    }
    if args.message_bytes < crate::fanout_msg::HEADER_BYTES {
        return Err(format!("--message-bytes must be at least {}", crate::fanout_msg::HEADER_BYTES));
    }
    let needed = pairs_needed(args.connections, args.churn_per_s, PAIR_REST, u64::from(args.pending_max));
    if sources.capacity() < needed {
        return Err(format!(
            "--sources × --ports = {} source pairs; {} connections churning {}/s need {needed} \
             (held, resting {} s past TIME_WAIT, in flight, and a quarter spare): widen --sources",
            sources.capacity(),
            args.connections,
            args.churn_per_s,
            PAIR_REST.as_secs()
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
            return Err(format!("--ring-files {n} exceeds RLIMIT_NOFILE {soft}"));
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
    let ramp = match args.ramp_s {
        Some(s) => Duration::from_secs(s),
        None => Duration::from_secs_f64(args.connections as f64 / args.rate) + RAMP_SLACK,
    };
    let deadline = match args.deadline_s {
        0 => ramp + Duration::from_secs(args.duration_s) + SETTLE_WAIT * 3 + DRAIN_SLACK * 6,
        s => Duration::from_secs(s),
    };
    Ok(Setup { target, api: Api { addr: api, key: args.api_key.clone() }, sources, files_per_ring, ramp, deadline })
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

/// What the publisher thread has done so far.
#[derive(Default)]
struct PubCount {
    published: AtomicU64,
    failed: AtomicU64,
}

/// Posts `rate` messages a second round rooms r0..r{rooms-1} over one keep-alive connection
/// until `stop`; returns its error counts.
fn publisher(
    api: SocketAddrV4,
    key: String,
    rooms: u32,
    rate: f64,
    message_bytes: usize,
    stop: Arc<AtomicBool>,
    count: Arc<PubCount>,
) -> BTreeMap<String, u64> {
    let all: Vec<u32> = (0..rooms).collect();
    let mut http = Http::new(api, &api.to_string(), &key, &all);
    let mut errors = BTreeMap::new();
    let mut msg = Vec::with_capacity(message_bytes);
    // A burst of 100 ms: a late wake-up catches up, a stall does not flood.
    let mut bucket = TokenBucket::new(rate, (rate / 10.0).clamp(1.0, 65536.0) as u32, Instant::now());
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let n = bucket.take(Instant::now(), PUBLISH_BURST_MAX);
        for _ in 0..n {
            let room = (seq % u64::from(rooms)) as u32;
            message(&Header { seq, send_ns: monotonic_ns(), room, publisher: 0 }, message_bytes, &mut msg);
            let counter = if http.post(room as usize, &msg, &mut errors) { &count.published } else { &count.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            seq += 1;
        }
        if n == 0 {
            std::thread::sleep(bucket.wait(Instant::now()).min(PUBLISH_NAP));
        }
    }
    errors
}

/// The gateway's counters at one moment (None: /metrics did not answer).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayCounters {
    pub connections: u64,
    pub websockets: u64,
    pub rings: u64,
    pub refused: BTreeMap<String, u64>,
    pub handshakes: BTreeMap<String, u64>,
    pub closed: BTreeMap<String, u64>,
    pub resets: u64,
    pub rooms_owned: u64,
    pub rooms_kept: u64,
    pub partial_bytes: u64,
    pub edge_addresses: u64,
    pub sends_in_flight: u64,
    pub mesh_waiting: u64,
    pub messages_accepted: u64,
    pub messages_dropped: BTreeMap<String, u64>,
    pub frames_dropped: BTreeMap<String, u64>,
    pub block_deliveries: u64,
}

impl GatewayCounters {
    pub fn parse(text: &str) -> GatewayCounters {
        let sum = |name| series_sum(text, name);
        GatewayCounters {
            connections: sum("barrage_connections"),
            websockets: sum("barrage_websockets"),
            rings: sum("barrage_rings"),
            refused: series_by_label(text, "barrage_refused_total", "reason"),
            handshakes: series_by_label(text, "barrage_handshakes_total", "result"),
            closed: series_by_label(text, "barrage_closed_total", "reason"),
            resets: sum("barrage_resets_total"),
            rooms_owned: sum("barrage_rooms_owned"),
            rooms_kept: sum("barrage_rooms_kept"),
            partial_bytes: sum("barrage_partial_bytes"),
            edge_addresses: sum("barrage_edge_addresses"),
            sends_in_flight: sum("barrage_sends_in_flight"),
            mesh_waiting: sum("barrage_mesh_waiting"),
            messages_accepted: sum("barrage_messages_accepted_total"),
            messages_dropped: series_by_label(text, "barrage_messages_dropped_total", "reason"),
            frames_dropped: series_by_label(text, "barrage_frames_dropped_total", "reason"),
            block_deliveries: sum("barrage_block_deliveries_total"),
        }
    }
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

/// One TSV row: a moment of the run, from every side.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub t_s: f64,
    pub phase: &'static str,
    pub c: Counters,
    /// Per second since the last row: churn closes started, reconnects joined, messages
    /// published, frames received.
    pub churn_per_s: f64,
    pub reconnects_joined_per_s: f64,
    pub publish_per_s: f64,
    pub frames_per_s: f64,
    pub published: u64,
    pub publish_failed: u64,
    pub readings: Readings,
    pub tcp: Option<TcpStat>,
    pub tcp_slab: Option<u64>,
    pub gw_sockets: Option<SocketStates>,
    pub gateway_cpu_s: Option<f64>,
    pub loadgen_cpu_s: Option<f64>,
    pub loadavg1: Option<f64>,
    pub gw: Option<GatewayCounters>,
}

/// The label values of `barrage_closed_total` given a column of their own; the rest add up in
/// `gw_closed_other`.
const CLOSED_COLUMNS: [&str; 5] = ["peer", "idle", "slow_consumer", "close_timeout", "io_error"];

impl Row {
    /// (column name, value) in TSV order: the one place both come from.
    pub fn columns(&self) -> Vec<(&'static str, String)> {
        let c = &self.c;
        let opt = |v: Option<u64>| v.map_or("NA".to_string(), |v| v.to_string());
        let f1 = |v: f64| format!("{v:.1}");
        let mut cols = vec![
            ("t_s", format!("{:.1}", self.t_s)),
            ("phase", self.phase.to_string()),
            ("open", c[Stat::Open].to_string()),
            ("joined", c[Stat::Joined].to_string()),
            ("closing", c[Stat::Closing].to_string()),
            ("dialing", c[Stat::Dialing].to_string()),
            ("closes", c[Stat::Closes].to_string()),
            ("closes_done", c[Stat::ClosesDone].to_string()),
            ("close_timeouts", c[Stat::CloseTimeouts].to_string()),
            ("reconnects", c[Stat::Reconnects].to_string()),
            ("reconnects_joined", c[Stat::ReconnectsJoined].to_string()),
            ("reconnects_failed", c[Stat::ReconnectsFailed].to_string()),
            ("churn_skipped", c[Stat::ChurnSkipped].to_string()),
            ("pairs_resting", c[Stat::PairsResting].to_string()),
            ("loadgen_errors", c[Stat::Errors].to_string()),
            ("churn_per_s", f1(self.churn_per_s)),
            ("reconnects_joined_per_s", f1(self.reconnects_joined_per_s)),
            ("published", self.published.to_string()),
            ("publish_failed", self.publish_failed.to_string()),
            ("publish_per_s", f1(self.publish_per_s)),
            ("frames_per_s", f1(self.frames_per_s)),
            ("gateway_rss_bytes", opt(self.readings.gateway_rss)),
            ("tcp_inuse", opt(self.tcp.map(|t| t.inuse))),
            ("tcp_orphan", opt(self.tcp.map(|t| t.orphan))),
            ("tcp_tw", opt(self.tcp.map(|t| t.tw))),
            ("tcp_alloc", opt(self.tcp.map(|t| t.alloc))),
            ("tcp_mem_bytes", opt(self.tcp.map(|t| t.mem_pages * SOCKSTAT_PAGE_BYTES))),
            ("tcp_slab_bytes", opt(self.tcp_slab)),
            ("gw_sock_estab", opt(self.gw_sockets.map(|s| s.established))),
            ("gw_sock_time_wait", opt(self.gw_sockets.map(|s| s.time_wait))),
            ("gw_sock_close_wait", opt(self.gw_sockets.map(|s| s.close_wait))),
            ("gw_sock_closing", opt(self.gw_sockets.map(|s| s.closing))),
            ("gw_sock_other", opt(self.gw_sockets.map(|s| s.other))),
            ("gw_sock_mem_bytes", opt(self.gw_sockets.map(|s| s.mem_bytes))),
            ("slab_bytes", opt(self.readings.slab)),
            ("sunreclaim_bytes", opt(self.readings.sunreclaim)),
            ("loadgen_rss_bytes", opt(self.readings.own_rss)),
            ("gateway_cpu_s", self.gateway_cpu_s.map_or("NA".into(), |v| format!("{v:.2}"))),
            ("loadgen_cpu_s", self.loadgen_cpu_s.map_or("NA".into(), |v| format!("{v:.2}"))),
            ("loadavg1", self.loadavg1.map_or("NA".into(), |v| format!("{v:.2}"))),
        ];
        let g = self.gw.as_ref();
        let gv = |f: &dyn Fn(&GatewayCounters) -> u64| opt(g.map(f));
        cols.extend([
            ("gw_connections", gv(&|g| g.connections)),
            ("gw_websockets", gv(&|g| g.websockets)),
            ("gw_rings", gv(&|g| g.rings)),
            ("gw_refused", gv(&|g| total(&g.refused))),
            ("gw_hs_ok", gv(&|g| get(&g.handshakes, "ok"))),
            ("gw_hs_timeout", gv(&|g| get(&g.handshakes, "timeout"))),
            ("gw_hs_failed", gv(&|g| total(&g.handshakes) - get(&g.handshakes, "ok"))),
        ]);
        for reason in CLOSED_COLUMNS {
            cols.push((closed_column(reason), gv(&|g| get(&g.closed, reason))));
        }
        cols.extend([
            (
                "gw_closed_other",
                gv(&|g| total(&g.closed) - CLOSED_COLUMNS.iter().map(|r| get(&g.closed, r)).sum::<u64>()),
            ),
            ("gw_resets", gv(&|g| g.resets)),
            ("gw_rooms_owned", gv(&|g| g.rooms_owned)),
            ("gw_rooms_kept", gv(&|g| g.rooms_kept)),
            ("gw_partial_bytes", gv(&|g| g.partial_bytes)),
            ("gw_edge_addresses", gv(&|g| g.edge_addresses)),
            ("gw_sends_in_flight", gv(&|g| g.sends_in_flight)),
            ("gw_mesh_waiting", gv(&|g| g.mesh_waiting)),
            ("gw_messages_accepted", gv(&|g| g.messages_accepted)),
            ("gw_messages_dropped", gv(&|g| total(&g.messages_dropped))),
            ("gw_frames_dropped", gv(&|g| total(&g.frames_dropped))),
            ("gw_block_deliveries", gv(&|g| g.block_deliveries)),
        ]);
        cols
    }

    pub fn header(&self) -> String {
        self.columns().iter().map(|(k, _)| *k).collect::<Vec<_>>().join("\t")
    }

    pub fn line(&self) -> String {
        self.columns().into_iter().map(|(_, v)| v).collect::<Vec<_>>().join("\t")
    }
}

fn closed_column(reason: &str) -> &'static str {
    match reason {
        "peer" => "gw_closed_peer",
        "idle" => "gw_closed_idle",
        "slow_consumer" => "gw_closed_slow_consumer",
        "close_timeout" => "gw_closed_close_timeout",
        "io_error" => "gw_closed_io_error",
        _ => "gw_closed_unknown",
    }
}

/// The JSON report of the `soak` scenario.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub target: String,
    pub connections_target: u64,
    pub rooms: u32,
    pub threads: u32,
    pub rings: u64,
    pub sources: String,
    pub ramp_s: f64,
    pub joined_after_ramp: u64,
    pub gateway_online_after_ramp: Option<u64>,
    pub soak_s: f64,
    pub churn_per_s_target: f64,
    /// Churn closes started ÷ soak seconds.
    pub churn_per_s_achieved: f64,
    pub closes: u64,
    pub closes_done: u64,
    pub close_timeouts: u64,
    pub reconnects: u64,
    pub reconnects_joined: u64,
    /// Reconnects that ended before their welcome: the churn's handshake failures.
    pub reconnects_failed: u64,
    pub churn_skipped: u64,
    pub publish_per_s_target: f64,
    pub published: u64,
    pub publish_failed: u64,
    pub publish_per_s_achieved: f64,
    pub frames: u64,
    pub blocks: u64,
    /// At the end, after the churn stopped and the last closes ended.
    pub open_end: u64,
    pub joined_end: u64,
    pub gateway_online_end: Option<u64>,
    pub gateway_rss_start_bytes: Option<u64>,
    pub gateway_rss_end_bytes: Option<u64>,
    pub gateway_start: Option<GatewayCounters>,
    pub gateway_end: Option<GatewayCounters>,
    pub errors: BTreeMap<String, u64>,
    pub publish_errors: BTreeMap<String, u64>,
    pub samples: usize,
    pub tsv: String,
    pub deadline_hit: bool,
    /// Everyone joined after the ramp and at the end, the gateway's online counts agreed both
    /// times, no reconnect failed and no close went unanswered, every publish was accepted,
    /// the churn reached 95 % of its target, the deadline was not hit.
    pub passed: bool,
}

/// The main thread's view of a run.
struct Run<'a> {
    args: &'a SoakArgs,
    setup: &'a Setup,
    workers: Vec<Arc<Shared>>,
    start: Instant,
    deadline: Instant,
    deadline_hit: bool,
    phase: &'static str,
    tsv: std::io::BufWriter<std::fs::File>,
    rows: usize,
    next_sample: Instant,
    last: Option<Row>,
    publish: Arc<PubCount>,
    errors: BTreeMap<String, u64>,
    publish_errors: BTreeMap<String, u64>,
}

impl<'a> Run<'a> {
    fn new(args: &'a SoakArgs, setup: &'a Setup, tsv: std::io::BufWriter<std::fs::File>) -> Run<'a> {
        let start = Instant::now();
        Run {
            args,
            setup,
            workers: Vec::new(),
            start,
            deadline: start + setup.deadline,
            deadline_hit: false,
            phase: "ramp",
            tsv,
            rows: 0,
            next_sample: start,
            last: None,
            publish: Arc::new(PubCount::default()),
            errors: BTreeMap::new(),
            publish_errors: BTreeMap::new(),
        }
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

    fn past_deadline(&mut self) -> bool {
        if Instant::now() >= self.deadline && !self.deadline_hit {
            self.deadline_hit = true;
            self.error("deadline".into());
        }
        self.deadline_hit
    }

    fn gateway(&mut self) -> Option<GatewayCounters> {
        match self.setup.api.metrics() {
            Ok(text) => Some(GatewayCounters::parse(&text)),
            Err(e) => {
                self.error(format!("metrics_{}", e.kind()));
                None
            }
        }
    }

    /// The sockets on `--ss-port`, by state (None: off, or `ss` failed, counted).
    fn gateway_sockets(&mut self) -> Option<SocketStates> {
        let port = self.args.ss_port;
        if port == 0 {
            return None;
        }
        let sport = format!(":{port}");
        let out = std::process::Command::new("ss").args(["-Htanm", "state", "all", "sport", "=", &sport]).output();
        match out {
            Ok(o) if o.status.success() => Some(socket_states(&String::from_utf8_lossy(&o.stdout))),
            Ok(_) => {
                self.error("ss_failed".into());
                None
            }
            Err(e) => {
                self.error(format!("ss_{:?}", e.kind()).to_lowercase());
                None
            }
        }
    }

    /// Takes a row now: every side read, rates against the last row; written and printed.
    fn sample(&mut self) -> Row {
        let now = Instant::now();
        let t_s = now.duration_since(self.start).as_secs_f64();
        let c = self.counters();
        let gw = self.gateway();
        let pid = self.args.gateway_pid;
        let mut row = Row {
            t_s,
            phase: self.phase,
            c,
            published: self.publish.published.load(Ordering::Relaxed),
            publish_failed: self.publish.failed.load(Ordering::Relaxed),
            readings: Readings::now(pid),
            tcp: std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|t| crate::probe::tcp_sockstat(&t)),
            tcp_slab: std::fs::read_to_string("/proc/slabinfo").ok().and_then(|t| crate::probe::tcp_slab_bytes(&t)),
            gw_sockets: self.gateway_sockets(),
            gateway_cpu_s: pid.and_then(|p| crate::probe::cpu_s(&format!("/proc/{p}/stat"))),
            loadgen_cpu_s: crate::probe::cpu_s("/proc/self/stat"),
            loadavg1: std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| crate::probe::loadavg1(&t)),
            gw,
            ..Row::default()
        };
        if let Some(last) = &self.last {
            let dt = (row.t_s - last.t_s).max(1e-3);
            let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
            row.churn_per_s = per_s(c[Stat::Closes], last.c[Stat::Closes]);
            row.reconnects_joined_per_s = per_s(c[Stat::ReconnectsJoined], last.c[Stat::ReconnectsJoined]);
            row.publish_per_s = per_s(row.published, last.published);
            row.frames_per_s = per_s(c[Stat::Frames], last.c[Stat::Frames]);
        }
        if self.rows == 0 {
            let _ = writeln!(self.tsv, "{}", row.header());
        }
        let _ = writeln!(self.tsv, "{}", row.line());
        let _ = self.tsv.flush();
        self.rows += 1;
        println!("{}", progress(&row));
        self.last = Some(row.clone());
        row
    }

    /// Samples if a row is due.
    fn tick(&mut self) {
        if Instant::now() >= self.next_sample {
            self.sample();
            let every = Duration::from_secs(self.args.sample_s);
            while self.next_sample <= Instant::now() {
                self.next_sample += every;
            }
        }
    }

    /// Sleeps in short steps (sampling as rows come due) until `done`, `until`, or the deadline;
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

    fn set_churn(&self, per_s: f64) {
        for w in &self.workers {
            w.churn_milli_per_s.store((per_s / f64::from(self.args.threads) * 1000.0) as u64, Ordering::Relaxed);
            w.wake.signal();
        }
    }

    /// Ramp, settle, soak, drain, settle; then stop the workers and build the report.
    fn phases(&mut self, handles: Vec<JoinHandle<ErrorCounts>>) -> Report {
        let ramp_until = self.start + self.setup.ramp;
        self.wait_until(ramp_until, Counters::ramp_over);
        let ramp_s = self.start.elapsed().as_secs_f64();
        let joined_after_ramp = self.counters()[Stat::Joined];
        self.phase = "settle";
        let online_after_ramp = self.settle();

        self.phase = "soak";
        let soak_start = Instant::now();
        let first = self.sample();
        self.next_sample = soak_start + Duration::from_secs(self.args.sample_s);
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = self.start_publisher(&stop);
        self.workers.iter().for_each(|w| w.ping_ms.store(self.args.ping_ms, Ordering::Relaxed));
        self.set_churn(self.args.churn_per_s);
        let soak_until = soak_start + Duration::from_secs(self.args.duration_s);
        self.wait_until(soak_until, |_| false);
        self.set_churn(0.0);
        stop.store(true, Ordering::Release);
        let soak_s = soak_start.elapsed().as_secs_f64();
        let soaked = self.counters();
        let published = self.publish.published.load(Ordering::Relaxed);
        if let Some(h) = publisher {
            match h.join() {
                Ok(errors) => self.publish_errors = errors,
                Err(_) => self.error("publisher_panicked".into()),
            }
        }
        self.workers.iter().for_each(|w| w.ping_ms.store(0, Ordering::Relaxed));

        // The last closes end (answered or timed out) and the last reconnects join or fail.
        self.phase = "drain";
        let drain_until = Instant::now() + Duration::from_millis(self.args.close_wait_ms) + DRAIN_SLACK;
        let drained = self.wait_until(drain_until, |c| {
            c[Stat::Closing] == 0
                && c[Stat::Dialing] == 0
                && c[Stat::Attempted] == c[Stat::JoinedTotal] + c[Stat::Failed]
        });
        if !drained {
            self.error("drain_incomplete".into());
        }
        self.phase = "settle";
        let online_end = self.settle();
        self.phase = "end";
        let last = self.sample();
        self.stop(handles);
        let end = last.c;
        let achieved = |n: u64| if soak_s > 0.0 { n as f64 / soak_s } else { 0.0 };
        let churn_achieved = achieved(soaked[Stat::Closes]);
        let n = self.args.connections;
        let publish_failed = self.publish.failed.load(Ordering::Relaxed);
        let passed = joined_after_ramp == n
            && end[Stat::Joined] == n
            && online_after_ramp == Some(n)
            && online_end == Some(n)
            && end[Stat::ReconnectsFailed] == 0
            && end[Stat::CloseTimeouts] == 0
            && publish_failed == 0
            && churn_achieved >= self.args.churn_per_s * CHURN_ACHIEVED_MIN
            && !self.deadline_hit;
        Report {
            scenario: "soak",
            target: self.setup.target.to_string(),
            connections_target: n,
            rooms: self.args.rooms,
            threads: self.args.threads,
            rings: end[Stat::Rings],
            sources: self.setup.sources.to_string(),
            ramp_s,
            joined_after_ramp,
            gateway_online_after_ramp: online_after_ramp,
            soak_s,
            churn_per_s_target: self.args.churn_per_s,
            churn_per_s_achieved: churn_achieved,
            closes: end[Stat::Closes],
            closes_done: end[Stat::ClosesDone],
            close_timeouts: end[Stat::CloseTimeouts],
            reconnects: end[Stat::Reconnects],
            reconnects_joined: end[Stat::ReconnectsJoined],
            reconnects_failed: end[Stat::ReconnectsFailed],
            churn_skipped: end[Stat::ChurnSkipped],
            publish_per_s_target: self.args.publish_per_s,
            published,
            publish_failed,
            publish_per_s_achieved: achieved(published),
            frames: end[Stat::Frames],
            blocks: end[Stat::Blocks],
            open_end: end[Stat::Open],
            joined_end: end[Stat::Joined],
            gateway_online_end: online_end,
            gateway_rss_start_bytes: first.readings.gateway_rss,
            gateway_rss_end_bytes: last.readings.gateway_rss,
            gateway_start: first.gw,
            gateway_end: last.gw,
            errors: std::mem::take(&mut self.errors),
            publish_errors: std::mem::take(&mut self.publish_errors),
            samples: self.rows,
            tsv: self.args.tsv.display().to_string(),
            deadline_hit: self.deadline_hit,
            passed,
        }
    }

    fn start_publisher(&mut self, stop: &Arc<AtomicBool>) -> Option<JoinHandle<BTreeMap<String, u64>>> {
        if self.args.publish_per_s <= 0.0 {
            return None;
        }
        let (api, key) = (self.setup.api.addr, self.setup.api.key.clone());
        let (rooms, rate, bytes) = (self.args.rooms, self.args.publish_per_s, self.args.message_bytes);
        let (stop, count) = (Arc::clone(stop), Arc::clone(&self.publish));
        let spawned = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || publisher(api, key, rooms, rate, bytes, stop, count));
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                self.error(format!("publisher_spawn_{}", e.kind()).to_lowercase());
                None
            }
        }
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
                if self.past_deadline() {
                    return last;
                }
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

    /// Tells every worker to stop, waits for them (their rings close every connection), and
    /// adds their error counts to ours.
    fn stop(&mut self, handles: Vec<JoinHandle<ErrorCounts>>) {
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
            w.wake.signal();
        }
        for h in handles {
            match h.join() {
                Ok(counts) => counts.merge_into(&mut self.errors),
                Err(_) => self.error("worker_panicked".into()),
            }
        }
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / f64::from(1 << 20)))
}

/// The live line, one per row.
fn progress(r: &Row) -> String {
    let c = &r.c;
    format!(
        "[{:7.1}s] {:<6} joined {:>7} closing {:>4} churn/s {:>6.0} reconnect fails {:>4} pub/s {:>5.0} frames/s {:>7.0} \
         gateway {} tcp mem {} tw {} errors {}",
        r.t_s,
        r.phase,
        c[Stat::Joined],
        c[Stat::Closing],
        r.churn_per_s,
        c[Stat::ReconnectsFailed],
        r.publish_per_s,
        r.frames_per_s,
        mib(r.readings.gateway_rss),
        mib(r.tcp.map(|t| t.mem_pages * SOCKSTAT_PAGE_BYTES)),
        r.tcp.map_or("-".into(), |t| t.tw.to_string()),
        c[Stat::Errors],
    )
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "soak {}: {} connections in {} rooms, ramp {:.1} s, joined {} (gateway online {})\n",
        r.target,
        r.connections_target,
        r.rooms,
        r.ramp_s,
        r.joined_after_ramp,
        r.gateway_online_after_ramp.map_or("-".into(), |n| n.to_string())
    );
    s += &format!(
        "  soak {:.0} s: churn {:.1}/s (target {}), closes {} answered {} timed out {}; reconnects {} joined {} failed {}; skipped {}\n",
        r.soak_s,
        r.churn_per_s_achieved,
        r.churn_per_s_target,
        r.closes,
        r.closes_done,
        r.close_timeouts,
        r.reconnects,
        r.reconnects_joined,
        r.reconnects_failed,
        r.churn_skipped
    );
    s += &format!(
        "  published {} ({:.1}/s, target {}), failed {}; frames received {}, blocks {}\n",
        r.published, r.publish_per_s_achieved, r.publish_per_s_target, r.publish_failed, r.frames, r.blocks
    );
    s += &format!(
        "  end: open {} joined {} (gateway online {}); gateway RSS {} -> {}\n",
        r.open_end,
        r.joined_end,
        r.gateway_online_end.map_or("-".into(), |n| n.to_string()),
        mib(r.gateway_rss_start_bytes),
        mib(r.gateway_rss_end_bytes)
    );
    let list = |m: &BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        }
    };
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
    fn every_row_has_a_value_per_column_and_no_tab_inside() {
        let mut row = Row { t_s: 12.34, phase: "soak", ..Row::default() };
        let header = row.header();
        let names: Vec<&str> = header.split('\t').collect();
        assert_eq!(names.len(), row.line().split('\t').count());
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{header}");
        assert!(!names.contains(&"gw_closed_unknown"));
        // Unknown readings are NA; known ones are numbers.
        let line = row.line();
        assert!(line.starts_with("12.3\tsoak\t0\t"), "{line}");
        assert!(line.contains("\tNA\t"), "{line}");
        row.gw = Some(GatewayCounters::default());
        row.tcp = Some(TcpStat { inuse: 1, orphan: 2, tw: 3, alloc: 4, mem_pages: 5 });
        let cols = row.columns();
        let col = |k: &str| cols.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(col("tcp_mem_bytes"), "20480");
        assert_eq!(col("gw_closed_other"), "0");
    }

    #[test]
    fn gateway_counters_sum_shards_and_split_labels() {
        let text = "barrage_connections{shard=\"0\"} 10\nbarrage_connections{shard=\"1\"} 12\n\
            barrage_handshakes_total{shard=\"0\",result=\"ok\"} 100\n\
            barrage_handshakes_total{shard=\"1\",result=\"ok\"} 50\n\
            barrage_handshakes_total{shard=\"1\",result=\"timeout\"} 2\n\
            barrage_closed_total{shard=\"0\",reason=\"peer\"} 40\n\
            barrage_closed_total{shard=\"1\",reason=\"kicked\"} 1\n";
        let g = GatewayCounters::parse(text);
        assert_eq!(g.connections, 22);
        assert_eq!((get(&g.handshakes, "ok"), total(&g.handshakes)), (150, 152));
        let row = Row { gw: Some(g), ..Row::default() };
        let cols = row.columns();
        let col = |k: &str| cols.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(col("gw_hs_failed"), "2");
        assert_eq!(col("gw_closed_peer"), "40");
        assert_eq!(col("gw_closed_other"), "1");
    }
}
