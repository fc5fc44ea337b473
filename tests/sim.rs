//! A seeded, deterministic simulation of many clients and rooms through the sans-IO core, after
//! TigerBeetle's VOPR and quinn's `tests/util.rs` `Pair`: S hubs, each run by the same
//! `hub::turn` that `src/shard` runs (completions, mail, timers, end of turn, mail out, sends,
//! closes) with a simulated driver in place of io_uring, an in-memory mesh, a simulated clock
//! that steps and jumps, and C WebSocket clients that upgrade in pieces, join, chat, read slowly
//! or not at all, misbehave, disconnect and reconnect, while the test publishes, moderates and
//! sets attributes as the business API does. No sockets, threads or real
//! clock: a seed replays the same run.
//!
//! Invariants, each failure naming the seed and the turn:
//! 1. per connection and room, live blocks' seqs strictly increase, consecutive inside a block,
//!    in priority order, none expired; backfill is de-duplicated by seq as the README's client
//!    does; attribute deltas never skip a version;
//! 2. every whitelist message an owner accepted reaches its room's witness exactly once;
//! 3. counters balance (accepted = blocked + dropped + pending) and witnesses saw exactly what
//!    owners blocked, and never a message coalesced away;
//! 4. memory: every queue within `send_queue_frames_max`, outbox frames within the queued ones,
//!    nothing left once every client is gone;
//! 5. nothing panics; malformed bytes close the connection with the right code.
//!
//! Bugs this simulation found (and that were fixed) stay checked as regressions: the driver or
//! client records each with its first occurrence and the run goes on (so one hides nothing
//! else), then the seed fails listing them: a partly sent frame shed from a full queue (which
//! corrupted the stream), enter/leave messages without their room, and enter/leave messages not
//! counted as accepted.
//!
//! `cargo test --test sim`. `BARRAGE_SIM_SEEDS=N` adds N more seeds, `BARRAGE_SIM_SEED=S` runs
//! only seed S, `BARRAGE_SIM_TURNS=T` sets the main phase's turns (turns before it do not depend
//! on T, so a failure at turn X reproduces with any T reaching X),. Add
//! `-- --nocapture` for one line per seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::IoSlice;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};

use barrage::config::Config;
use barrage::hub::mail::{HostMail, Mail, Origin, OwnerMail, Reply};
use barrage::hub::turn::{self, Budget, Driver};
use barrage::hub::{Hub, HubConfig, Now, Teardown};
use barrage::ids::{ConnKey, ShardId, UnixMs, UserId};
use barrage::metrics::Series;
use barrage::proto::{
    AttrSync, Attrs, Block, Broadcast, ClientFrame, Direct, Join, Leave, Message, Ping, Send, ServerFrame,
    client_frame, server_frame,
};
use barrage::room::durable::StoreOp;
use barrage::room::frames::{Class, SharedFrame};
use barrage::room::owner::{ModAction, PublishError, Published, RoomInfo};
use barrage::room::{Priority, RoomName};
use barrage::shard::sendmsg::FRAMES_PER_SEND;
use barrage::wire::frame::masked_frame;
use prost::Message as _;

/// Seeds run by `cargo test`: fixed, so every run is the same run.
const SEEDS: [u64; 16] = [1, 2, 3, 5, 8, 13, 21, 34, 0xB1A5, 0xDA11, 0xC0FFEE, 0xFEED, 0x5EED, 0xBEEF, 0x7777, 0x2024];
/// Turns of the main phase per seed (about 10 ms of simulated time each).
const MAIN_TURNS: u64 = 4_000;
const SECRET: &str = "sim-secret-0123456789-0123456789";
/// The wall clock at the start of every run.
const UNIX_START_MS: i64 = 1_750_000_000_000;
/// Witnesses join before anything is published, and the counters are read after this.
const WARMUP_MS: u64 = 2_000;

#[test]
fn simulation() {
    let seeds = seeds();
    let turns = env_u64("BARRAGE_SIM_TURNS").unwrap_or(MAIN_TURNS);
    let started = std::time::Instant::now();
    // Two threads: each seed's world is built and run inside one thread, so each stays
    // deterministic; only the order of the report lines varies.
    let workers = 2;
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let mine: Vec<u64> = seeds.iter().copied().skip(w).step_by(workers).collect();
                s.spawn(move || mine.into_iter().filter_map(|seed| run_seed(seed, turns).err()).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("worker")).collect()
    });
    println!("sim: {} seeds x {turns} main turns in {:.1?}", seeds.len(), started.elapsed());
    assert!(failures.is_empty(), "{} of {} seeds failed:\n{}", failures.len(), seeds.len(), failures.join("\n"));
}

fn seeds() -> Vec<u64> {
    if let Some(one) = env_u64("BARRAGE_SIM_SEED") {
        return vec![one];
    }
    let mut seeds = SEEDS.to_vec();
    let mut more = Rng(0x05EE_D0F5_EED5);
    seeds.extend((0..env_u64("BARRAGE_SIM_SEEDS").unwrap_or(0)).map(|_| more.next_u64()));
    seeds
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

thread_local! {
    /// The turn this thread's world is in, for the report of a panic.
    static TURN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs one seed; a failed invariant or a panic comes back as a line naming the seed.
fn run_seed(seed: u64, turns: u64) -> Result<(), String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed, turns);
        let result = world.run();
        (result, world.summary())
    }));
    match outcome {
        Ok((Ok(()), summary)) => {
            println!("seed {seed:#x}: ok  {summary}");
            Ok(())
        }
        Ok((Err(e), summary)) => {
            let line = format!("seed {seed:#x}: {e}\n    ({summary})");
            eprintln!("{line}");
            Err(line)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let line = format!("seed {seed:#x}: PANIC at turn {}: {what}", TURN.get());
            eprintln!("{line}");
            Err(line)
        }
    }
}

// ---- randomness and time ----

/// SplitMix64: tiny, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// lo..=hi random bytes.
    fn data(&mut self, lo: u64, hi: u64) -> Vec<u8> {
        let n = self.range(lo, hi) as usize;
        self.bytes(n)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.index(i + 1));
        }
    }
}

/// The simulated clock: monotonic `ms` that steps and sometimes jumps forward (a stalled VM),
/// and a wall clock that follows it but is sometimes stepped back a little (NTP), then slews.
struct Clock {
    ms: u64,
    skew_ms: i64,
    jumps: bool,
    /// When the last forward jump landed: deadlines are swept only as time flows after it.
    jumped_at_ms: u64,
}

impl Clock {
    fn now(&self) -> Now {
        Now { ms: self.ms, unix: UnixMs(UNIX_START_MS + self.ms as i64 + self.skew_ms) }
    }

    fn advance(&mut self, rng: &mut Rng) {
        self.ms += rng.range(1, 20);
        if self.skew_ms < 0 {
            self.skew_ms = (self.skew_ms + 3).min(0);
        }
        if self.jumps && rng.chance(0.0005) {
            self.ms += rng.range(1_000, 6_000);
            self.jumped_at_ms = self.ms;
        }
        if self.jumps && rng.chance(0.0005) && self.skew_ms > -5_000 {
            self.skew_ms -= rng.range(200, 2_500) as i64;
        }
    }
}

// ---- the seed's shape ----

/// What a seed decides about its world.
struct Params {
    shards: usize,
    clients: usize,
    rooms: usize,
    presence: bool,
    queue_max: usize,
    block_max: usize,
    pending_max: usize,
    block_interval_ms: u64,
    main_turns: u64,
}

impl Params {
    fn new(rng: &mut Rng, main_turns: u64) -> Params {
        let rooms = rng.range(5, 20) as usize;
        Params {
            shards: rng.range(2, 4) as usize,
            clients: rng.range(40, 120) as usize,
            rooms,
            presence: rng.chance(0.5),
            queue_max: [4, 8, 16][rng.index(3)],
            block_max: [3, 5, 10, 20][rng.index(4)],
            pending_max: [40, 100, 300][rng.index(3)],
            block_interval_ms: [50, 100, 200][rng.index(3)],
            main_turns,
        }
    }

    fn config(&self) -> Config {
        let mut c = Config::default();
        c.server.connections_max = (self.clients + self.rooms) * 2;
        c.server.send_queue_frames_max = self.queue_max as u32;
        let w = &mut c.websocket;
        w.handshake_timeout_ms = 5_000;
        w.heartbeat_ms = 10_000;
        w.idle_timeout_ms = 20_000;
        w.close_timeout_ms = 2_000;
        w.slow_consumer_ms = 1_500;
        c.auth.jwt_secret = SECRET.into();
        let r = &mut c.rooms;
        r.block_interval_ms = self.block_interval_ms;
        r.block_messages_max = self.block_max;
        r.pending_messages_max = self.pending_max;
        r.presence_events = self.presence;
        r.room_rate_per_s = 30;
        r.room_rate_burst = 60;
        r.history_messages_max = 30;
        c.validate().expect("sim config is valid");
        c
    }

    /// A message type's default priority (the config's `[types]`).
    fn type_default(kind: &str, c: &Config) -> Priority {
        c.type_defaults(kind).priority
    }
}

// ---- the network: sockets, drivers and the mesh ----

/// How a client reads: its sends complete at once, now and then, or never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Speed {
    Fast,
    Slow,
    Stalled,
}

/// A send submitted by the driver: the bytes `next_send` handed out, copied at that moment.
struct InFlight {
    bytes: Vec<u8>,
    /// Length of each slice: the first is the head frame from `sent_offset`, the rest whole.
    lens: Vec<usize>,
    started: u64,
}

/// One TCP connection: the client's side (bytes each way, FIN, RST) and the driver's view of
/// it (the `Io` flags of `src/shard/mod.rs`: input armed, send pending, terminating, cancelled).
struct Socket {
    key: Option<ConnKey>,
    to_server: VecDeque<u8>,
    /// The client closed its side: EOF once `to_server` is read.
    fin: bool,
    /// The client reset: reads and sends fail.
    reset: bool,
    to_client: Vec<u8>,
    /// The client closed its socket and reads nothing more.
    client_gone: bool,
    speed: Speed,
    recv: bool,
    send: Option<InFlight>,
    term: bool,
    cancel: bool,
    /// The driver closed the socket and released the connection.
    closed: bool,
    /// ... abortively (`Teardown::Reset`, SO_LINGER 0): the client reads what reached it, then
    /// a reset instead of EOF.
    aborted: bool,
    /// The unwritten tail of the frame the last (partial) send cut: the next send must start
    /// with exactly these bytes.
    rest: Option<Vec<u8>>,
    /// The byte stream to the client broke (a known bug): the client gives up on it.
    corrupt: bool,
}

/// One shard as the driver sees it: its hub, the connections it holds and the accepts waiting.
struct SimDriver {
    keys: BTreeMap<ConnKey, usize>,
    accepts: VecDeque<usize>,
    /// Connections the hub had closed with `Teardown::Reset`.
    resets: u64,
}

/// The unwritten tail of the frame a send of `written` bytes stopped inside, if any.
fn cut_frame_rest(f: &InFlight, written: usize) -> Option<Vec<u8>> {
    let mut end = 0;
    for len in &f.lens {
        let start = end;
        end += len;
        if written < end {
            return (written > start).then(|| f.bytes[written..end].to_vec());
        }
    }
    None
}

/// Mail in flight: per sender → receiver pair, FIFO, stamped with the turn it was sent.
type Queue = VecDeque<(u64, Mail)>;

struct Net {
    hubs: Vec<Hub>,
    drivers: Vec<SimDriver>,
    sockets: Vec<Socket>,
    /// `mesh[from][to]`; `from == shards` is the business API.
    mesh: Vec<Vec<Queue>>,
}

impl Net {
    fn connect(&mut self, hub: usize, speed: Speed) -> usize {
        let sock = self.sockets.len();
        self.sockets.push(Socket {
            key: None,
            to_server: VecDeque::new(),
            fin: false,
            reset: false,
            to_client: Vec::new(),
            client_gone: false,
            speed,
            recv: false,
            send: None,
            term: false,
            cancel: false,
            closed: false,
            aborted: false,
            rest: None,
            corrupt: false,
        });
        self.drivers[hub].accepts.push_back(sock);
        sock
    }

    fn write(&mut self, sock: usize, bytes: &[u8]) {
        let s = &mut self.sockets[sock];
        if !s.fin && !s.reset {
            s.to_server.extend(bytes);
        }
    }

    fn post(&mut self, from: usize, to: usize, turn: u64, mail: Mail) {
        self.mesh[from][to].push_back((turn, mail));
    }
}

// ---- the world ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Only the witnesses connect and join.
    Warmup,
    /// Everything happens.
    Main,
    /// Every other client leaves; carried whitelist messages drain to the witnesses.
    Drain,
    /// The witnesses leave; the hubs must end up empty.
    Final,
}

/// Counter totals over all hubs at one moment.
#[derive(Default, Clone, Copy, Debug)]
struct Totals {
    accepted: u64,
    coalesced: u64,
    blocked: u64,
    overflow: u64,
    expired: u64,
    witness_seen: u64,
}

struct World {
    p: Params,
    config: Config,
    rng: Rng,
    clock: Clock,
    turn: u64,
    phase: Phase,
    net: Net,
    clients: Vec<SimClient>,
    rooms: Vec<String>,
    users: Vec<String>,
    api: Api,
    /// Totals when the warmup ended: the witnesses see every block cut after it.
    baseline: Totals,
    stats: BTreeMap<&'static str, u64>,
    /// Library bugs already analysed (see the report): counted with their first occurrence,
    /// and failing the seed at its end instead of stopping it, so they hide nothing else.
    known: BTreeMap<&'static str, (u64, String)>,
}

impl World {
    fn new(seed: u64, main_turns: u64) -> World {
        let mut rng = Rng(seed);
        let p = Params::new(&mut rng, main_turns);
        let config = p.config();
        let hubs = (0..p.shards).map(|i| Hub::new(HubConfig::new(&config, ShardId(i as u16), p.shards))).collect();
        let drivers =
            (0..p.shards).map(|_| SimDriver { keys: BTreeMap::new(), accepts: VecDeque::new(), resets: 0 }).collect();
        let mesh = (0..=p.shards).map(|_| (0..p.shards).map(|_| VecDeque::new()).collect()).collect();
        let rooms: Vec<String> = (0..p.rooms).map(|i| format!("room{i}")).collect();
        // One witness per room (anonymous, fast, proto, on a shard by turns), then the crowd.
        let mut clients: Vec<SimClient> = (0..p.rooms).map(|r| SimClient::witness(r, r % p.shards)).collect();
        let mut users = Vec::new();
        for i in 0..p.clients {
            let c = SimClient::random(i, &mut rng);
            if let Some(u) = &c.user {
                users.push(u.name.clone());
            }
            clients.push(c);
        }
        World {
            config,
            rng,
            clock: Clock { ms: 0, skew_ms: 0, jumps: false, jumped_at_ms: 0 },
            turn: 0,
            phase: Phase::Warmup,
            net: Net { hubs, drivers, sockets: Vec::new(), mesh },
            clients,
            rooms,
            users,
            api: Api::default(),
            baseline: Totals::default(),
            stats: BTreeMap::new(),
            known: BTreeMap::new(),
            p,
        }
    }

    fn run(&mut self) -> Result<(), String> {
        self.run_until(WARMUP_MS)?;
        self.check_witnesses_up()?;
        self.baseline = self.totals();
        self.phase = Phase::Main;
        self.clock.jumps = true;
        for _ in 0..self.p.main_turns {
            self.step()?;
        }
        // Long enough for a full backlog of whitelist messages to leave a block at a time.
        self.phase = Phase::Drain;
        let ticks = (self.p.pending_max / self.p.block_max) as u64 + 20;
        self.run_until(self.clock.ms + ticks * self.p.block_interval_ms + 3_000)?;
        self.check_pending_drained()?;
        self.check_delivery()?;
        self.phase = Phase::Final;
        self.run_until(self.clock.ms + 8_000)?;
        self.check_empty()?;
        if self.known.is_empty() || std::env::var_os("BARRAGE_SIM_ALLOW_KNOWN").is_some() {
            return Ok(());
        }
        let lines: Vec<String> = self.known.iter().map(|(k, (n, first))| format!("{k} x{n}, {first}")).collect();
        Err(format!("known bugs seen:\n      {}", lines.join("\n      ")))
    }

    fn run_until(&mut self, ms: u64) -> Result<(), String> {
        while self.clock.ms < ms {
            self.step()?;
        }
        Ok(())
    }

    /// One turn, with the turn, phase and time added to any failure (`run_seed` adds the seed).
    fn step(&mut self) -> Result<(), String> {
        self.turn().map_err(|e| format!("turn {} ({:?}, t={} ms): {e}", self.turn, self.phase, self.clock.ms))
    }

    /// Clients act, the API publishes, every shard runs one loop turn (in a random order, now
    /// and then skipping one, as a busy core would), then answers and bytes are read.
    fn turn(&mut self) -> Result<(), String> {
        self.turn += 1;
        TURN.set(self.turn);
        self.clock.advance(&mut self.rng);
        let now = self.clock.now();
        for c in 0..self.clients.len() {
            self.client_act(c, now)?;
        }
        if self.phase == Phase::Main {
            self.api_turn(now);
        }
        let mut order: Vec<usize> = (0..self.p.shards).collect();
        self.rng.shuffle(&mut order);
        for h in order {
            if self.rng.chance(0.02) {
                continue;
            }
            self.drive(h, now)?;
            self.check_memory(h)?;
        }
        self.api.collect(&mut self.stats)?;
        for c in 0..self.clients.len() {
            self.client_read(c, now)?;
        }
        Ok(())
    }

    /// Records an occurrence of a known library bug.
    fn known(&mut self, bug: &'static str, detail: impl FnOnce() -> String) {
        let at = (self.turn, self.clock.ms);
        self.known
            .entry(bug)
            .or_insert_with(|| (0, format!("first at turn {} (t={} ms): {}", at.0, at.1, detail())))
            .0 += 1;
    }

    fn bump(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn totals(&mut self) -> Totals {
        let mut t = Totals::default();
        for hub in &self.net.hubs {
            let c = hub.counters();
            t.accepted += c.get(Series::MessagesIn);
            t.coalesced += c.get(Series::MessagesCoalesced);
            t.blocked += c.get(Series::MessagesOut);
            t.overflow += c.get(Series::DropOverflow);
            t.expired += c.get(Series::DropExpired);
        }
        t.witness_seen = self.clients.iter().filter_map(|c| c.witness.as_ref()).map(|w| w.seen.len() as u64).sum();
        t
    }

    fn summary(&mut self) -> String {
        let t = self.totals();
        // Hub counters summed over shards: what this seed exercised.
        let mut counters = BTreeMap::new();
        for hub in &self.net.hubs {
            let c = hub.counters();
            for (name, s) in [
                ("closed_slow", Series::ClosedSlow),
                ("closed_idle", Series::ClosedIdle),
                ("closed_protocol", Series::ClosedProtocol),
                ("closed_envelope", Series::ClosedEnvelope),
                ("closed_kicked", Series::ClosedKicked),
                ("closed_peer", Series::ClosedPeer),
                ("closed_io_error", Series::ClosedError),
                ("closed_close_timeout", Series::ClosedCloseTimeout),
                ("closed_reset", Series::ClosedReset),
                ("hs_timeout", Series::HsTimeout),
                ("hs_token", Series::HsToken),
                ("refused_full", Series::RefusedFull),
                ("frames_dropped", Series::FramesDropped),
                ("frames_missed_json", Series::FramesMissed),
                ("drop_backlog", Series::DropBacklog),
                ("drop_room_rate", Series::DropRate),
                ("drop_muted", Series::DropMuted),
                ("send_rate_limited", Series::SendRateLimited),
                ("send_refused", Series::SendRefused),
                ("join_banned", Series::JoinBanned),
                ("moderations", Series::Moderations),
                ("attr_frames", Series::AttrFrames),
                ("direct", Series::DirectDeliveries),
                ("broadcast", Series::BroadcastDeliveries),
            ] {
                *counters.entry(name).or_insert(0u64) += c.get(s);
            }
        }
        format!(
            "S={} C={} R={} presence={} queue={} block={} pending={} interval={}ms turns={} sim={}s \
             accepted={} blocked={} overflow={} expired={} coalesced={} witness={} {:?} {:?}",
            self.p.shards,
            self.p.clients,
            self.p.rooms,
            self.p.presence,
            self.p.queue_max,
            self.p.block_max,
            self.p.pending_max,
            self.p.block_interval_ms,
            self.turn,
            self.clock.ms / 1000,
            t.accepted,
            t.blocked,
            t.overflow,
            t.expired,
            t.coalesced,
            t.witness_seen,
            counters,
            self.stats,
        )
    }
}

// ---- the simulated driver: src/shard/mod.rs's io_uring side, simulated ----

impl World {
    /// One loop turn of shard `h`: the hub's own `turn` (the one `src/shard` runs), with the
    /// simulated driver below. Now and then the turn's mail or send budget is short, as
    /// `Budget::SHARD` can be under load.
    fn drive(&mut self, h: usize, now: Now) -> Result<(), String> {
        let mail = if self.rng.chance(0.05) { self.rng.below(8) as usize } else { usize::MAX };
        let sends = if self.rng.chance(0.1) { self.rng.range(1, 4) as usize } else { usize::MAX };
        let Net { hubs, drivers, sockets, mesh } = &mut self.net;
        let mut io = SimIo {
            h,
            shards: self.p.shards,
            turn: self.turn,
            clock_ms: self.clock.ms,
            rng: &mut self.rng,
            driver: &mut drivers[h],
            sockets,
            mesh,
            stats: &mut self.stats,
            known: &mut self.known,
        };
        turn::turn(&mut hubs[h], &mut io, now, Budget { mail, sends })
    }
}

/// The simulated io_uring side of shard `h` for one turn: its sockets and its inbox.
struct SimIo<'a> {
    h: usize,
    shards: usize,
    turn: u64,
    clock_ms: u64,
    rng: &'a mut Rng,
    driver: &'a mut SimDriver,
    sockets: &'a mut Vec<Socket>,
    mesh: &'a mut Vec<Vec<Queue>>,
    stats: &'a mut BTreeMap<&'static str, u64>,
    known: &'a mut BTreeMap<&'static str, (u64, String)>,
}

impl Driver for SimIo<'_> {
    type Error = String;

    /// Accept completions, then each connection's send and receive completions, connections in
    /// a random order (completions of different sockets arrive in any order).
    fn reap(&mut self, hub: &mut Hub, now: Now) -> Result<(), String> {
        let h = self.h;
        while let Some(sock) = self.driver.accepts.pop_front() {
            match hub.handle_accept(sock as u64, None, now) {
                Some(key) => {
                    if let Some(old) = self.driver.keys.insert(key, sock) {
                        return Err(format!("hub {h} reused {key:?} of socket {old} before its release"));
                    }
                    let s = &mut self.sockets[sock];
                    s.key = Some(key);
                    s.recv = true;
                }
                // Refused (full or stopping): the driver closes the socket at once.
                None => self.sockets[sock].closed = true,
            }
        }
        let mut socks: Vec<usize> = self.driver.keys.values().copied().collect();
        self.rng.shuffle(&mut socks);
        for sock in socks {
            self.complete_send(hub, sock, now)?;
            self.complete_recv(hub, sock, now);
        }
        Ok(())
    }

    /// Mail sent before this turn, FIFO per sender, senders interleaved at random.
    fn next_mail(&mut self) -> Option<Mail> {
        let (h, turn) = (self.h, self.turn);
        let ready: Vec<usize> =
            (0..self.mesh.len()).filter(|&f| self.mesh[f][h].front().is_some_and(|(t, _)| *t < turn)).collect();
        if ready.is_empty() {
            return None;
        }
        let from = ready[self.rng.index(ready.len())];
        self.mesh[from][h].pop_front().map(|(_, mail)| mail)
    }

    /// Every inbox takes everything (the post office's overflow is tested in the hub's tests);
    /// mail to itself would be a hub bug (it handles its own mail at once).
    fn offer_mail(&mut self, to: ShardId, mail: Mail) -> Result<(), Mail> {
        assert!(to.index() != self.h && to.index() < self.shards, "hub {} mailed shard {to:?}", self.h);
        self.mesh[self.h][to.index()].push_back((self.turn, mail));
        Ok(())
    }

    /// The simulated gateway has no durable storage (its hubs are not durable, so they hand
    /// out nothing to store).
    fn offer_store(&mut self, op: StoreOp) -> Result<(), StoreOp> {
        Err(op)
    }

    /// A ready connection's queued frames become one send: up to `FRAMES_PER_SEND` frames, or
    /// one when no sendmsg slot is free.
    fn start_send(&mut self, hub: &mut Hub, key: ConnKey) -> Result<(), String> {
        let h = self.h;
        let sock = hub.io(key) as usize;
        if self.driver.keys.get(&key) != Some(&sock) {
            return Err(format!("hub {h} {key:?}: io handle {sock} is not the driver's socket"));
        }
        let s = &mut self.sockets[sock];
        if s.send.is_some() {
            return Err(format!("hub {h} {key:?} listed ready with a send in flight"));
        }
        if s.term {
            return Ok(());
        }
        let cap = if self.rng.chance(0.05) { 1 } else { FRAMES_PER_SEND };
        let mut iov = [IoSlice::new(&[]); FRAMES_PER_SEND];
        let frames = hub.poll_send(key, &mut iov[..cap]);
        if frames > cap {
            return Err(format!("poll_send filled {frames} of {cap} slices"));
        }
        if frames == 0 {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for slice in &iov[..frames] {
            bytes.extend_from_slice(slice);
        }
        let lens: Vec<usize> = iov[..frames].iter().map(|s| s.len()).collect();
        if let Some(rest) = s.rest.take()
            && bytes.get(..lens[0]) != Some(rest.as_slice())
        {
            // Known bug: the frame a partial send cut was shed from the queue while
            // `sent_offset` still pointed into it (outbox.rs lowest_droppable), so this send
            // starts in the middle of another frame.
            s.corrupt = true;
            let detail = format!("hub {h} {key:?}: {} bytes of a cut frame expected, got {}", rest.len(), lens[0]);
            self.known("partially sent frame shed", || detail);
        }
        self.sockets[sock].send = Some(InFlight { bytes, lens, started: self.turn });
        Ok(())
    }

    /// A connection the hub ended: cancel what is pending, close (abortively if asked) and
    /// release once nothing is.
    fn start_close(&mut self, hub: &mut Hub, key: ConnKey, how: Teardown) -> Result<(), String> {
        let sock = hub.io(key) as usize;
        let s = &mut self.sockets[sock];
        if s.term {
            return Err(format!("hub {} handed {key:?} to close twice", self.h));
        }
        s.term = true;
        if how == Teardown::Reset {
            s.aborted = true;
            self.driver.resets += 1;
        }
        if s.recv || s.send.is_some() {
            s.cancel = true;
        }
        self.finish_if_idle(hub, sock);
        Ok(())
    }
}

impl SimIo<'_> {
    /// A pending send completes when its reader allows it, or once cancelled; a partial count
    /// is as likely as a full one for anything but a fast reader.
    fn complete_send(&mut self, hub: &mut Hub, sock: usize, now: Now) -> Result<(), String> {
        let (rng, turn) = (&mut *self.rng, self.turn);
        let s = &mut self.sockets[sock];
        let Some(f) = &s.send else { return Ok(()) };
        let due = match s.speed {
            _ if s.cancel => true,
            Speed::Fast => turn > f.started,
            Speed::Slow => turn > f.started + 2 && rng.chance(0.08),
            Speed::Stalled => false,
        };
        if !due {
            return Ok(());
        }
        let f = s.send.take().expect("checked above");
        // An empty slice only comes from the known bug below (an offset past a shorter head).
        if (f.bytes.is_empty() || f.lens.contains(&0)) && !s.corrupt {
            return Err(format!("a send with an empty slice: {:?}", f.lens));
        }
        let (len, key) = (f.bytes.len() as u64, s.key.expect("accepted"));
        let mut partial = false;
        let result = if s.cancel && rng.chance(0.6) {
            -libc::ECANCELED
        } else if s.reset {
            -libc::ECONNRESET
        } else if s.client_gone && s.fin && rng.chance(0.3) {
            -libc::EPIPE
        } else if s.corrupt {
            len as i32
        } else {
            let n = if s.speed == Speed::Fast && !s.cancel && rng.chance(0.75) { len } else { rng.range(1, len) };
            if !s.client_gone {
                s.to_client.extend_from_slice(&f.bytes[..n as usize]);
            }
            s.rest = cut_frame_rest(&f, n as usize);
            partial = n < len;
            n as i32
        };
        if partial {
            *self.stats.entry("partial_sends").or_default() += 1;
        }
        hub.handle_sent(key, result, now);
        self.finish_if_idle(hub, sock);
        Ok(())
    }

    /// Received bytes in one to three reads of random sizes (multishot receive into 4 KiB
    /// buffers), or the end of input: FIN, reset, or our own cancel.
    fn complete_recv(&mut self, hub: &mut Hub, sock: usize, now: Now) {
        let s = &mut self.sockets[sock];
        if !s.recv || s.closed {
            return;
        }
        let key = s.key.expect("accepted");
        if s.cancel || s.reset || (s.fin && s.to_server.is_empty()) {
            // -ECANCELED, -ECONNRESET or 0: the multishot receive ends.
            s.recv = false;
            hub.handle_eof(key, now);
            self.finish_if_idle(hub, sock);
            return;
        }
        for _ in 0..self.rng.range(1, 3) {
            let s = &mut self.sockets[sock];
            if s.to_server.is_empty() {
                break;
            }
            let n = self.rng.range(1, s.to_server.len().min(4096) as u64) as usize;
            let mut chunk: Vec<u8> = s.to_server.drain(..n).collect();
            hub.handle_recv(key, &mut chunk, now);
        }
    }

    /// Closes the socket and releases the connection once it is ending and nothing is pending.
    fn finish_if_idle(&mut self, hub: &mut Hub, sock: usize) {
        let s = &mut self.sockets[sock];
        if s.term && !s.recv && s.send.is_none() && !s.closed {
            s.closed = true;
            let key = s.key.expect("accepted");
            hub.release(key);
            self.driver.keys.remove(&key);
        }
    }

    /// Records an occurrence of a known library bug (see `World::known`).
    fn known(&mut self, bug: &'static str, detail: impl FnOnce() -> String) {
        let (turn, ms) = (self.turn, self.clock_ms);
        self.known.entry(bug).or_insert_with(|| (0, format!("first at turn {turn} (t={ms} ms): {}", detail()))).0 += 1;
    }
}

// ---- the business API, as the test plays it ----

/// A publish whose answer has not come back yet.
struct PendingPublish {
    rx: Receiver<Result<Published, PublishError>>,
    room: usize,
    whitelist: bool,
    key: String,
}

/// What the owner said about one accepted message.
struct Accepted {
    room: usize,
    whitelist: bool,
    /// A later publish with the same coalesce key replaced it while it was pending.
    coalesced_away: bool,
}

/// Answers still to come, and the ledger of accepted API messages.
#[derive(Default)]
struct Api {
    /// In send order: per owner the answers come in that order too (the mesh is FIFO).
    publishes: VecDeque<PendingPublish>,
    /// Other requests: a poll that says whether the answer came (Err when it never can).
    others: Vec<Box<dyn FnMut() -> Result<bool, String>>>,
    room_info: Vec<(usize, Receiver<RoomInfo>)>,
    infos: BTreeMap<usize, RoomInfo>,
    accepted: BTreeMap<u64, Accepted>,
    /// (room, coalesce key) → the newest accepted message with that key.
    keyed: BTreeMap<(usize, String), u64>,
}

impl Api {
    fn collect(&mut self, stats: &mut BTreeMap<&'static str, u64>) -> Result<(), String> {
        let mut waiting = VecDeque::new();
        while let Some(p) = self.publishes.pop_front() {
            match p.rx.try_recv() {
                Ok(Ok(published)) => self.accept(&p, published)?,
                Ok(Err(e)) => *stats.entry(publish_error_name(e)).or_default() += 1,
                Err(TryRecvError::Empty) => waiting.push_back(p),
                Err(TryRecvError::Disconnected) => return Err("a publish was dropped unanswered".into()),
            }
        }
        self.publishes = waiting;
        let mut others = std::mem::take(&mut self.others);
        let mut kept = Vec::new();
        for mut poll in others.drain(..) {
            if !poll()? {
                kept.push(poll);
            }
        }
        self.others = kept;
        let mut kept = Vec::new();
        for (room, rx) in self.room_info.drain(..) {
            match rx.try_recv() {
                Ok(info) => {
                    self.infos.insert(room, info);
                }
                Err(TryRecvError::Empty) => kept.push((room, rx)),
                Err(TryRecvError::Disconnected) => return Err("a room info request was dropped".into()),
            }
        }
        self.room_info = kept;
        Ok(())
    }

    fn accept(&mut self, p: &PendingPublish, published: Published) -> Result<(), String> {
        let Published { id, coalesced } = published;
        if !p.key.is_empty() {
            let older = self.keyed.insert((p.room, p.key.clone()), id);
            if coalesced {
                // The pending message with that key was the newest one accepted with it.
                let older = older.ok_or_else(|| format!("message {id:#x} coalesced with nothing"))?;
                let a = self.accepted.get_mut(&older).expect("ledger");
                a.coalesced_away = true;
            }
        } else if coalesced {
            return Err(format!("message {id:#x} without a coalesce key was coalesced"));
        }
        let entry = Accepted { room: p.room, whitelist: p.whitelist, coalesced_away: false };
        if self.accepted.insert(id, entry).is_some() {
            return Err(format!("message id {id:#x} accepted twice"));
        }
        Ok(())
    }

    /// Tracks an answer we do not inspect, only that it comes.
    fn expect<T: 'static>(&mut self, rx: Receiver<T>) {
        self.others.push(Box::new(move || match rx.try_recv() {
            Ok(_) => Ok(true),
            Err(TryRecvError::Empty) => Ok(false),
            Err(TryRecvError::Disconnected) => Err("an API request was dropped unanswered".into()),
        }));
    }
}

fn publish_error_name(e: PublishError) -> &'static str {
    match e {
        PublishError::Backlog => "api_backlog",
        PublishError::RoomsFull => "api_rooms_full",
        PublishError::RateLimited => "api_rate",
        PublishError::Muted => "api_muted",
        PublishError::HandedOver => "api_handed_over",
    }
}

/// Coalesce keys the API uses (never `presence:*`, the owner's own).
const KEYS: [&str; 3] = ["pk:1", "pk:2", "score"];
const KINDS: [&str; 6] = ["chat", "gift", "like", "pk", "notice", "song"];

impl World {
    fn api_turn(&mut self, now: Now) {
        if self.rng.chance(0.08) {
            for _ in 0..self.rng.range(1, 3) {
                let room = self.rng.index(self.p.rooms);
                self.publish(room, None);
            }
        }
        if self.rng.chance(0.003) {
            // A burst into one room: overflow, backlog, rate limit and carried whitelist.
            let room = self.rng.index(self.p.rooms);
            let whitelist_share = [0.0, 0.3, 0.9][self.rng.index(3)];
            for _ in 0..self.rng.range(20, 150) {
                let wl = self.rng.chance(whitelist_share);
                self.publish(room, Some(wl));
            }
            self.bump("bursts");
        }
        if self.rng.chance(0.006) && !self.users.is_empty() {
            self.moderate(now);
        }
        if self.rng.chance(0.005) {
            self.set_attr();
        }
        if self.rng.chance(0.003) && !self.users.is_empty() {
            let user = UserId::new(&self.users[self.rng.index(self.users.len())]);
            let frame = self.api_frame(now, false);
            for to in 0..self.p.shards {
                let mail = HostMail::ToUser { user: user.clone(), frame: Arc::clone(&frame), reply: None };
                self.net.post(self.p.shards, to, self.turn, mail.into());
            }
        }
        if self.rng.chance(0.0005) {
            let frame = self.api_frame(now, true);
            for to in 0..self.p.shards {
                let mail = HostMail::ToAll { frame: Arc::clone(&frame), reply: None };
                self.net.post(self.p.shards, to, self.turn, mail.into());
            }
        }
    }

    /// A room message as `POST /v1/rooms/{room}/messages` sends it to the owner. `whitelist`
    /// forces the priority (bursts); otherwise priority, type, weight, key and ttl are random.
    fn publish(&mut self, room: usize, whitelist: Option<bool>) {
        let r = &mut self.rng;
        let kind = KINDS[r.index(KINDS.len())];
        let (given, priority) = match whitelist {
            Some(true) => (true, Priority::Whitelist),
            Some(false) => (true, if r.chance(0.5) { Priority::High } else { Priority::Low }),
            None if r.chance(0.8) => (true, [Priority::Low, Priority::High, Priority::Whitelist][r.index(3)]),
            None => (false, Params::type_default(kind, &self.config)),
        };
        let key = if r.chance(0.15) { KEYS[r.index(KEYS.len())].to_string() } else { String::new() };
        let ttl_ms = if r.chance(0.3) { 0 } else { r.range(50, 3_000) as u32 };
        let msg = Message {
            r#type: kind.into(),
            weight: r.range(0, 100) as i32 - 5,
            data: r.data(1, 40),
            ttl_ms,
            coalesce_key: key.clone(),
            ..Message::default()
        };
        let name = RoomName::parse(&self.rooms[room], 64).expect("room names are valid");
        let owner = name.owner(self.p.shards).index();
        let (tx, rx) = sync_channel(1);
        let named = given.then_some(priority);
        let mail = OwnerMail::Publish { room: name, msg: Box::new(msg), priority: named, reply: Reply(tx) };
        self.net.post(self.p.shards, owner, self.turn, mail.into());
        let whitelist = priority == Priority::Whitelist;
        self.api.publishes.push_back(PendingPublish { rx, room, whitelist, key });
    }

    /// A moderation action, mostly on a user online in a room it joined (so kicks land).
    fn moderate(&mut self, now: Now) {
        let online: Vec<(&str, &String)> = self
            .clients
            .iter()
            .filter_map(|c| Some((c.user.as_ref()?.name.as_str(), c.conn.as_ref()?)))
            .flat_map(|(u, conn)| conn.joined.iter().map(move |room| (u, room)))
            .collect();
        let r = &mut self.rng;
        let (user, room) = match online.len() {
            n if n > 0 && r.chance(0.8) => {
                let (u, room) = online[r.index(n)];
                (UserId::new(u), room.clone())
            }
            _ => (UserId::new(&self.users[r.index(self.users.len())]), self.rooms[r.index(self.p.rooms)].clone()),
        };
        let until = |r: &mut Rng| r.chance(0.5).then(|| now.unix.0 + r.range(500, 8_000) as i64);
        let action = match r.below(10) {
            0..3 => ModAction::Kick,
            3 => ModAction::Mute { until_ms: until(r) },
            4 => ModAction::Unmute,
            5 | 6 => ModAction::Ban { until_ms: until(r) },
            7 => ModAction::Unban,
            8 => ModAction::Whitelist,
            _ => ModAction::Unwhitelist,
        };
        let name = RoomName::parse(&room, 64).expect("valid");
        let owner = name.owner(self.p.shards).index();
        let (tx, rx) = sync_channel(1);
        let reason = Arc::from("sim");
        let mail = OwnerMail::Moderate { room: name, user, action, reason, origin: Origin::Api(Reply(tx)) };
        self.net.post(self.p.shards, owner, self.turn, mail.into());
        self.api.expect(rx);
        self.bump("moderations");
    }

    fn set_attr(&mut self) {
        let r = &mut self.rng;
        let name = RoomName::parse(&self.rooms[r.index(self.p.rooms)], 64).expect("valid");
        let key = format!("seat{}", r.below(6));
        let value = (!r.chance(0.2)).then(|| r.data(0, 16));
        let owner = name.owner(self.p.shards).index();
        let (tx, rx) = sync_channel(1);
        let mail = OwnerMail::SetAttr { room: name, key, value, origin: Origin::Api(Reply(tx)) };
        self.net.post(self.p.shards, owner, self.turn, mail.into());
        self.api.expect(rx);
    }

    /// A direct or broadcast frame, encoded once for both formats as the API does.
    fn api_frame(&mut self, now: Now, broadcast: bool) -> Arc<SharedFrame> {
        let priority = [Priority::Low, Priority::High, Priority::Whitelist][self.rng.index(3)];
        let msg = Message {
            id: (0xFFFF << 48) | self.turn,
            r#type: "notice".into(),
            priority: priority.wire(),
            created_ms: now.unix.0,
            data: self.rng.bytes(8),
            ..Message::default()
        };
        let class = Class::from(priority);
        let frame = if broadcast {
            server_frame::Frame::Broadcast(Broadcast { message: Some(msg) })
        } else {
            server_frame::Frame::Direct(Direct { message: Some(msg) })
        };
        Arc::new(SharedFrame::encode(&ServerFrame { frame: Some(frame) }, true, class))
    }
}

// ---- clients ----

/// A signed-in client's identity.
struct User {
    name: String,
    token: String,
}

/// A client that joins one room at the start, reads everything at once and never leaves until
/// the end: it must see every block of its room.
#[derive(Default)]
struct Witness {
    room: usize,
    /// Ids of live-block messages → (times seen, message as seen).
    seen: BTreeMap<u64, (u32, Message)>,
}

struct SimClient {
    index: usize,
    user: Option<User>,
    json: bool,
    witness: Option<Witness>,
    /// Reading speed while connected; slow readers also stall for stretches.
    speed: Speed,
    /// Stops reading for good some time after connecting.
    staller: bool,
    pings: bool,
    /// Witnesses connect to this shard.
    home: Option<usize>,
    conn: Option<ClientConn>,
    next_connect_ms: Option<u64>,
    next_act_ms: u64,
    next_ping_ms: u64,
    /// Short-poll cursors per room, carried across polls.
    cursors: BTreeMap<String, u64>,
}

/// What a connection's request asked for, and so what answer it expects.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ask {
    Upgrade,
    /// A refused upgrade or request: the status expected.
    Refusal(u16),
    /// A short poll.
    Poll {
        room: String,
        after: u64,
    },
    /// A request that never completes: the handshake timeout ends it.
    Stuck,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Http,
    Frames,
    /// The final HTTP answer arrived: nothing more may.
    Done,
}

/// What a client knows of one room on this connection.
#[derive(Default)]
struct RoomView {
    /// last_seq of the newest live block.
    last_live: Option<u64>,
    /// The README's client de-duplication: the highest seq seen, live or backfill.
    highest: u64,
    /// Attribute version held (after a snapshot).
    attrs: Option<u64>,
}

struct ClientConn {
    sock: usize,
    ask: Ask,
    buf: Vec<u8>,
    stage: Stage,
    url_room: Option<String>,
    welcomed: bool,
    /// Every room this connection asked to join: blocks of other rooms are a bug.
    joined: BTreeSet<String>,
    views: BTreeMap<String, RoomView>,
    close_got: Option<Option<u16>>,
    close_sent: bool,
    /// Our Close went out at this time; give up waiting for the answer after a while.
    closing_since: Option<u64>,
    kicked: bool,
    /// We sent malformed bytes: the close code they earn.
    malformed: Option<u16>,
    /// A staller stops reading for good at this time.
    stall_at_ms: Option<u64>,
    opened_ms: u64,
}

impl ClientConn {
    /// Leaving a room (or switching) makes the versions held stale: deltas sent while we were
    /// away may arrive before the snapshot of the next join.
    fn forget_attrs(&mut self) {
        for v in self.views.values_mut() {
            v.attrs = None;
        }
    }
}

impl SimClient {
    fn witness(room: usize, hub: usize) -> SimClient {
        SimClient {
            index: usize::MAX,
            user: None,
            json: false,
            witness: Some(Witness { room, seen: BTreeMap::new() }),
            speed: Speed::Fast,
            staller: false,
            pings: true,
            home: Some(hub),
            conn: None,
            next_connect_ms: Some(0),
            next_act_ms: u64::MAX,
            next_ping_ms: 0,
            cursors: BTreeMap::new(),
        }
    }

    fn random(index: usize, rng: &mut Rng) -> SimClient {
        let user = rng.chance(0.7).then(|| {
            let name = format!("u{index}");
            let can_send = rng.chance(0.9);
            let exp = (UNIX_START_MS / 1000) as u64 + 30 * 86_400;
            let claims = serde_json::json!({"sub": name, "exp": exp, "send": can_send, "level": rng.below(10)});
            User { token: barrage::auth::sign_hs256(SECRET.as_bytes(), &claims), name }
        });
        // A quarter read slowly; stallers (below) stop reading for good after a while.
        let speed = if rng.chance(0.25) { Speed::Slow } else { Speed::Fast };
        SimClient {
            index,
            user,
            json: rng.chance(0.4),
            witness: None,
            speed,
            staller: rng.chance(0.12),
            pings: rng.chance(0.85),
            home: None,
            conn: None,
            next_connect_ms: Some(WARMUP_MS + rng.below(3_000)),
            next_act_ms: 0,
            next_ping_ms: 0,
            cursors: BTreeMap::new(),
        }
    }
}

/// A masked client frame (the mask is random, as RFC 6455 asks); `first_byte` is FIN, RSV and
/// opcode as sent, so malformed ones can be built too.
fn masked(rng: &mut Rng, first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [rng.next_u64() as u8, rng.next_u64() as u8, rng.next_u64() as u8, rng.next_u64() as u8];
    let mut out = Vec::new();
    masked_frame(first_byte & 0x80 != 0, first_byte & 0x7F, payload, mask, &mut out);
    out
}

fn client_frame(rng: &mut Rng, json: bool, frame: client_frame::Frame) -> Vec<u8> {
    let f = ClientFrame { frame: Some(frame) };
    if json {
        masked(rng, 0x81, serde_json::to_string(&f).expect("pbjson").as_bytes())
    } else {
        masked(rng, 0x82, &f.encode_to_vec())
    }
}

fn close_frame(rng: &mut Rng, code: u16) -> Vec<u8> {
    masked(rng, 0x88, &code.to_be_bytes())
}

/// Bytes a client must not send, and the close code they earn.
fn malformed(rng: &mut Rng, json: bool) -> (Vec<u8>, u16) {
    let valid = ClientFrame { frame: Some(client_frame::Frame::Ping(Ping {})) };
    match rng.below(8) {
        // Unmasked.
        0 => (vec![0x82, 0x03, 1, 2, 3], 1002),
        // Reserved opcode; RSV1 without an extension; a fragmented ping; close code 1005.
        1 => (masked(rng, 0x83, b"x"), 1002),
        2 => (masked(rng, 0xC2, b"x"), 1002),
        3 => (masked(rng, 0x09, b"p"), 1002),
        4 => (masked(rng, 0x88, &1005u16.to_be_bytes()), 1002),
        // The other subprotocol's frame type.
        5 if json => (masked(rng, 0x82, &valid.encode_to_vec()), 1003),
        5 => (masked(rng, 0x81, serde_json::to_string(&valid).expect("pbjson").as_bytes()), 1003),
        // Not a ClientFrame; text that is not UTF-8.
        6 if json => (masked(rng, 0x81, &[0xC3, 0x28]), 1007),
        6 => (masked(rng, 0x82, &[0xFF, 0xFF, 0xFF]), 1007),
        // A frame header announcing 1 MiB.
        _ => {
            let mut b = vec![0x82, 0x80 | 127];
            b.extend_from_slice(&(1u64 << 20).to_be_bytes());
            b.extend_from_slice(&[1, 2, 3, 4]);
            (b, 1009)
        }
    }
}

fn upgrade_request(path: &str, extra: &[String]) -> Vec<u8> {
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

impl World {
    /// A client's turn: (re)connect when due, heartbeat, and now and then one random action.
    fn client_act(&mut self, c: usize, now: Now) -> Result<(), String> {
        let cl = &mut self.clients[c];
        let witness = cl.witness.is_some();
        // Leaving at the end: the crowd first, then the witnesses.
        let leave = match self.phase {
            Phase::Drain => !witness,
            Phase::Final => true,
            _ => false,
        };
        if leave {
            cl.next_connect_ms = None;
            if let Some(conn) = &cl.conn
                && conn.closing_since.is_none()
            {
                if witness && conn.stage == Stage::Frames && conn.close_got.is_none() {
                    // A graceful close: the witness waits for the server's Close.
                    let bytes = close_frame(&mut self.rng, 1000);
                    let conn = cl.conn.as_mut().expect("checked");
                    self.net.write(conn.sock, &bytes);
                    conn.close_sent = true;
                    conn.closing_since = Some(now.ms);
                } else {
                    self.hang_up(c, false);
                }
            }
            return self.client_closing_timeout(c, now);
        }
        let Some(conn) = &cl.conn else {
            if cl.next_connect_ms.is_some_and(|t| now.ms >= t) && (witness || self.phase == Phase::Main) {
                self.connect(c, now);
            }
            return Ok(());
        };
        if conn.stage != Stage::Frames || !conn.welcomed || conn.close_got.is_some() || conn.closing_since.is_some() {
            return self.client_closing_timeout(c, now);
        }
        if conn.malformed.is_some() {
            return Ok(());
        }
        // Stallers stop reading for good a while after connecting; slow readers stall at times.
        if conn.stall_at_ms.is_some_and(|t| now.ms >= t) {
            self.set_speed(c, Speed::Stalled);
        } else if cl.speed != Speed::Fast && !cl.staller && self.rng.chance(0.003) {
            let s = if cl.speed == Speed::Slow { Speed::Stalled } else { Speed::Slow };
            self.set_speed(c, s);
        }
        let cl = &mut self.clients[c];
        if cl.pings && now.ms >= cl.next_ping_ms {
            cl.next_ping_ms = now.ms + self.rng.range(2_000, 6_000);
            let json = cl.json;
            let bytes = client_frame(&mut self.rng, json, client_frame::Frame::Ping(Ping {}));
            self.client_write(c, &bytes);
        }
        let cl = &mut self.clients[c];
        if !witness && self.phase == Phase::Main && now.ms >= cl.next_act_ms {
            cl.next_act_ms = now.ms + self.rng.range(100, 3_000);
            self.client_action(c, now);
        }
        Ok(())
    }

    fn set_speed(&mut self, c: usize, speed: Speed) {
        let cl = &mut self.clients[c];
        cl.speed = speed;
        if let Some(conn) = &cl.conn {
            self.net.sockets[conn.sock].speed = speed;
        }
    }

    fn client_write(&mut self, c: usize, bytes: &[u8]) {
        if let Some(conn) = &self.clients[c].conn {
            self.net.write(conn.sock, bytes);
        }
    }

    /// Our Close went unanswered for long: give up and close the socket.
    /// Deadlines the server must keep: after our Close it ends the connection within
    /// `close_timeout_ms` (plus a full sweep), and a request that never completes is dropped at
    /// `handshake_timeout_ms`. We hang up 5 s after our Close either way.
    fn client_closing_timeout(&mut self, c: usize, now: Now) -> Result<(), String> {
        let Some(conn) = &self.clients[c].conn else { return Ok(()) };
        let closed = self.net.sockets[conn.sock].closed;
        let (stuck_since, closing_since) = ((conn.ask == Ask::Stuck).then_some(conn.opened_ms), conn.closing_since);
        // The hub sweeps a tenth of its connections every 100 ms: a passed deadline is acted on
        // within a second of steady time (a clock jump passes deadlines all at once).
        let jumped = self.clock.jumped_at_ms;
        let late = |since: u64, timeout_ms: u64| now.ms > (since + timeout_ms).max(jumped) + 2_000;
        if let Some(t) = stuck_since
            && late(t, self.config.websocket.handshake_timeout_ms)
        {
            if !closed {
                return Err(format!(
                    "{}: incomplete request outlived the handshake timeout",
                    client_name(&self.clients[c])
                ));
            }
            self.bump("handshake_timeouts");
            self.hang_up(c, false);
            return Ok(());
        }
        if let Some(t) = closing_since
            && now.ms > t + 5_000
        {
            if !closed && late(t, self.config.websocket.close_timeout_ms) {
                return Err(format!("{}: still open 5 s after our Close", client_name(&self.clients[c])));
            }
            self.hang_up(c, false);
        }
        Ok(())
    }

    /// The client closes its socket (FIN, or RST) and forgets the connection.
    fn hang_up(&mut self, c: usize, reset: bool) {
        let cl = &mut self.clients[c];
        let Some(conn) = cl.conn.take() else { return };
        let s = &mut self.net.sockets[conn.sock];
        s.fin = true;
        s.reset = reset;
        s.client_gone = true;
        s.to_client.clear();
        if let Some(t) = &mut cl.next_connect_ms {
            *t = (*t).max(self.clock.ms + self.rng.range(100, 3_000));
        }
    }

    /// Opens a connection and writes its request: mostly an upgrade (room in the URL or not,
    /// either subprotocol, a token or none), sometimes a short poll or a request that must be
    /// refused, or one that never completes.
    fn connect(&mut self, c: usize, now: Now) {
        let shards = self.p.shards;
        let r = &mut self.rng;
        let cl = &mut self.clients[c];
        let hub = cl.home.unwrap_or_else(|| r.index(shards));
        let witness_room = cl.witness.as_ref().map(|w| self.rooms[w.room].clone());
        let room =
            witness_room.clone().or_else(|| r.chance(0.5).then(|| self.rooms[r.index(self.rooms.len())].clone()));
        let mut query = Vec::new();
        if let Some(room) = &room {
            query.push(format!("room={room}"));
        }
        let roll = if witness_room.is_some() { 1000 } else { r.below(1000) };
        let mut ask = Ask::Upgrade;
        match (&cl.user, roll) {
            (Some(u), 0..20) => {
                // An expired token.
                let claims = serde_json::json!({"sub": u.name, "exp": (UNIX_START_MS / 1000) as u64 - 3_600});
                query.push(format!("token={}", barrage::auth::sign_hs256(SECRET.as_bytes(), &claims)));
                ask = Ask::Refusal(401);
            }
            (Some(u), _) => query.push(format!("token={}", u.token)),
            (None, _) => {}
        }
        let mut headers = Vec::new();
        if cl.json {
            headers.push("Sec-WebSocket-Protocol: barrage.v1.json".to_string());
        } else if r.chance(0.5) {
            headers.push("Sec-WebSocket-Protocol: barrage.v1.proto".to_string());
        }
        let path = format!("/ws?{}", query.join("&"));
        let mut request = upgrade_request(&path, &headers);
        let poll_room = self.rooms[r.index(self.rooms.len())].clone();
        match roll {
            20..35 => {
                request = b"GARBAGE\x01 / HTTP/1.1\r\n\r\n".to_vec();
                ask = Ask::Refusal(400);
            }
            35..45 => {
                request = upgrade_request("/nope", &headers);
                ask = Ask::Refusal(404);
            }
            45..65 => {
                request.truncate(r.range(1, request.len() as u64 - 5) as usize);
                ask = Ask::Stuck;
            }
            65..110 => {
                let after = cl.cursors.get(&poll_room).copied().unwrap_or(0);
                let limit = r.range(1, 50);
                let q = format!("GET /v1/rooms/{poll_room}/messages?after={after}&limit={limit} HTTP/1.1\r\n\r\n");
                request = q.into_bytes();
                ask = Ask::Poll { room: poll_room, after };
            }
            _ => {}
        }
        let speed = cl.speed;
        let sock = self.net.connect(hub, speed);
        let stall_at_ms = cl.staller.then(|| now.ms + r.range(0, 10_000));
        cl.next_ping_ms = now.ms + r.range(1_000, 5_000);
        cl.conn = Some(ClientConn {
            sock,
            ask,
            buf: Vec::new(),
            stage: Stage::Http,
            url_room: room.clone(),
            welcomed: false,
            joined: room.into_iter().collect(),
            views: BTreeMap::new(),
            close_got: None,
            close_sent: false,
            closing_since: None,
            kicked: false,
            malformed: None,
            stall_at_ms,
            opened_ms: now.ms,
        });
        self.net.write(sock, &request);
        self.bump("connects");
    }

    /// One random thing an open client does.
    fn client_action(&mut self, c: usize, now: Now) {
        let r = &mut self.rng;
        let cl = &mut self.clients[c];
        let json = cl.json;
        let conn = cl.conn.as_mut().expect("open");
        let frame = |r: &mut Rng, f| client_frame(r, json, f);
        let bytes = match r.below(1000) {
            0..150 => {
                let room = self.rooms[r.index(self.rooms.len())].clone();
                conn.joined.insert(room.clone());
                conn.forget_attrs();
                frame(r, client_frame::Frame::Join(Join { room, after_seq: 0 }))
            }
            150..170 => frame(r, client_frame::Frame::Join(Join { room: "no room!".into(), ..Join::default() })),
            170..220 => {
                conn.forget_attrs();
                frame(r, client_frame::Frame::Leave(Leave { room: String::new() }))
            }
            220..600 => {
                // A chat line, or a burst above the per-connection rate.
                let n = if r.chance(0.1) { r.range(3, 8) } else { 1 };
                let mut out = Vec::new();
                for _ in 0..n {
                    let kind = if r.chance(0.2) { "gift" } else { "chat" };
                    let data = r.data(1, 64);
                    out.extend(frame(
                        r,
                        client_frame::Frame::Send(Send { r#type: kind.into(), data, ..Default::default() }),
                    ));
                }
                out
            }
            600..680 => frame(r, client_frame::Frame::Ping(Ping {})),
            680..720 => masked(r, 0x89, b"hb"),
            720..760 => {
                let room = String::new();
                let after = conn.views.values().find_map(|v| v.attrs).unwrap_or(0);
                frame(r, client_frame::Frame::AttrSync(AttrSync { room, after_version: after }))
            }
            760..785 => return self.hang_up(c, false),
            785..805 => {
                conn.close_sent = true;
                conn.closing_since = Some(now.ms);
                close_frame(r, 1000)
            }
            805..810 => return self.hang_up(c, true),
            810..825 if cl.speed == Speed::Fast && !cl.staller => {
                let (bytes, code) = malformed(r, json);
                conn.malformed = Some(code);
                *self.stats.entry("malformed_sent").or_default() += 1;
                bytes
            }
            _ => return,
        };
        self.client_write(c, &bytes);
    }

    /// Reads what arrived, checks it, and ends the connection on EOF.
    fn client_read(&mut self, c: usize, now: Now) -> Result<(), String> {
        let Some(conn) = &mut self.clients[c].conn else { return Ok(()) };
        let s = &mut self.net.sockets[conn.sock];
        if s.corrupt {
            // What comes next is garbage (a known bug, recorded by the driver): give up.
            if self.clients[c].witness.is_some() {
                return Err("the witness's stream broke (partially sent frame shed)".into());
            }
            self.hang_up(c, true);
            return Ok(());
        }
        conn.buf.append(&mut s.to_client);
        let closed = s.closed;
        let mut result = self.parse(c, now);
        if result.is_ok()
            && closed
            && self.clients[c].conn.as_ref().is_some_and(|conn| self.net.sockets[conn.sock].to_client.is_empty())
        {
            result = self.on_eof(c);
        }
        result.map_err(|e| format!("{}: {e}", client_name(&self.clients[c])))
    }

    fn parse(&mut self, c: usize, now: Now) -> Result<(), String> {
        loop {
            let Some(conn) = &mut self.clients[c].conn else { return Ok(()) };
            match conn.stage {
                Stage::Http => {
                    let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(()) };
                    if !self.http_answer(c, end + 4)? {
                        return Ok(());
                    }
                }
                Stage::Frames => {
                    let Some((opcode, payload, used)) = server_frame_at(&conn.buf)? else { return Ok(()) };
                    conn.buf.drain(..used);
                    self.on_frame(c, opcode, &payload, now)?;
                }
                Stage::Done if conn.buf.is_empty() => return Ok(()),
                Stage::Done => return Err(format!("{} bytes after the final HTTP answer", conn.buf.len())),
            }
        }
    }

    /// An HTTP answer whose head ends at `head_len`: the 101, a refusal or a poll's answer.
    /// Returns false while its body is incomplete.
    fn http_answer(&mut self, c: usize, head_len: usize) -> Result<bool, String> {
        let offered_json = self.clients[c].json;
        let conn = self.clients[c].conn.as_mut().expect("open");
        let head = String::from_utf8_lossy(&conn.buf[..head_len]).into_owned();
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status == 101 {
            if conn.ask != Ask::Upgrade {
                return Err(format!("{:?} answered 101", conn.ask));
            }
            if offered_json != head.contains("barrage.v1.json") {
                return Err(format!("101 with the wrong subprotocol: {head:?}"));
            }
            conn.buf.drain(..head_len);
            conn.stage = Stage::Frames;
            return Ok(true);
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("HTTP answer without Content-Length: {head:?}"))?;
        if conn.buf.len() < head_len + length {
            return Ok(false);
        }
        let body: Vec<u8> = conn.buf.drain(..head_len + length).skip(head_len).collect();
        conn.stage = Stage::Done;
        match conn.ask.clone() {
            Ask::Refusal(want) if want == status => Ok(true),
            Ask::Poll { room, after } => {
                let (next, roomless) = check_poll(&room, after, status, &body)?;
                if roomless > 0 {
                    self.known("presence message without room", || format!("{roomless} in a poll of {room}"));
                }
                self.clients[c].cursors.insert(room, next);
                self.bump("polls");
                Ok(true)
            }
            ask => Err(format!("{ask:?} answered {status}: {}", String::from_utf8_lossy(&body))),
        }
    }

    /// One server frame.
    fn on_frame(&mut self, c: usize, opcode: u8, payload: &[u8], now: Now) -> Result<(), String> {
        let json = self.clients[c].json;
        let conn = self.clients[c].conn.as_mut().expect("open");
        if let Some(code) = conn.close_got {
            return Err(format!("a frame (opcode {opcode:#x}) after the server's Close {code:?}"));
        }
        if conn.kicked && opcode != 0x8 {
            return Err(format!("a frame (opcode {opcode:#x}) between kicked and Close"));
        }
        let frame = match (opcode, json) {
            (0x8, _) => return self.on_close(c, payload, now),
            (0xA, _) => return Ok(()),
            (0x2, false) => ServerFrame::decode(payload).map_err(|e| format!("bad ServerFrame: {e}"))?,
            (0x1, true) => serde_json::from_slice(payload).map_err(|e| format!("bad ServerFrame JSON: {e}"))?,
            _ => return Err(format!("opcode {opcode:#x} on a {} connection", if json { "JSON" } else { "proto" })),
        };
        let Some(frame) = frame.frame else { return Err("a ServerFrame with no frame".into()) };
        if !conn.welcomed {
            let server_frame::Frame::Welcome(w) = &frame else {
                return Err(format!("first frame is not welcome: {frame:?}"));
            };
            let cl = &mut self.clients[c];
            let user = cl.user.as_ref().map_or("", |u| u.name.as_str());
            let conn = cl.conn.as_mut().expect("open");
            if w.user != user || w.room != conn.url_room.clone().unwrap_or_default() {
                return Err(format!("welcome {w:?} for user {user:?} room {:?}", conn.url_room));
            }
            conn.welcomed = true;
            return Ok(());
        }
        match frame {
            server_frame::Frame::Welcome(w) => Err(format!("a second welcome {w:?}")),
            server_frame::Frame::Block(b) => self.on_block(c, b),
            server_frame::Frame::Attrs(a) if !json => on_attrs(conn, a),
            server_frame::Frame::Kicked(k) => {
                if !conn.joined.contains(&k.room) {
                    return Err(format!("kicked from {} never joined", k.room));
                }
                conn.kicked = true;
                self.bump("kicked");
                Ok(())
            }
            server_frame::Frame::Error(e) if ![400, 401, 403, 404, 413, 429, 503].contains(&e.code) => {
                Err(format!("error frame with code {}", e.code))
            }
            server_frame::Frame::Direct(Direct { message: None })
            | server_frame::Frame::Broadcast(Broadcast { message: None }) => Err("direct without a message".into()),
            _ => Ok(()),
        }
    }

    /// The server's Close: the right code, then answer it (or just hang up).
    fn on_close(&mut self, c: usize, payload: &[u8], now: Now) -> Result<(), String> {
        let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        let conn = self.clients[c].conn.as_mut().expect("open");
        conn.close_got = Some(code);
        if conn.kicked && code != Some(1008) {
            return Err(format!("kicked, then Close {code:?}"));
        }
        if let Some(want) = conn.malformed {
            if code == Some(want) {
                self.bump("malformed_closed_right");
            } else if !matches!(code, Some(1001 | 1008)) {
                return Err(format!("malformed bytes earned Close {code:?}, expected {want}"));
            }
        }
        self.bump("server_closes");
        let conn = self.clients[c].conn.as_mut().expect("open");
        if !conn.close_sent && self.rng.chance(0.7) {
            conn.close_sent = true;
            conn.closing_since = Some(now.ms);
            let bytes = close_frame(&mut self.rng, code.unwrap_or(1000));
            self.client_write(c, &bytes);
        } else if conn.closing_since.is_none() {
            self.hang_up(c, false);
        }
        Ok(())
    }

    /// The server closed the socket and everything sent before has been read.
    fn on_eof(&mut self, c: usize) -> Result<(), String> {
        let conn = self.clients[c].conn.as_ref().expect("open");
        if let Some(want) = conn.malformed
            && conn.close_got.is_none()
        {
            return Err(format!("malformed bytes (close {want} expected) ended the connection without Close"));
        }
        if self.clients[c].witness.is_some() && self.phase != Phase::Final {
            return Err(format!("the witness lost its connection (server Close {:?})", conn.close_got));
        }
        // A partial frame or answer may be left: a connection the server ends (a slow reader)
        // is cut wherever its last send stopped.
        let stuck = conn.ask == Ask::Stuck;
        self.bump(if self.net.sockets[conn.sock].aborted { "resets_seen" } else { "eofs" });
        if stuck {
            self.bump("handshake_timeouts");
        }
        self.hang_up(c, false);
        Ok(())
    }

    /// Invariant 1 for one block; witnesses also record what they saw.
    fn on_block(&mut self, c: usize, mut b: Block) -> Result<(), String> {
        for m in &mut b.messages {
            if m.room.is_empty() && m.sender.is_empty() && (m.r#type == "enter" || m.r#type == "leave") {
                // Known bug: owner.rs post_presence builds enter/leave without `room`.
                self.known("presence message without room", || format!("{} in a block of {}", m.r#type, b.room));
                m.room = b.room.clone();
            }
        }
        let cl = &mut self.clients[c];
        let conn = cl.conn.as_mut().expect("open");
        check_block_shape(&b)?;
        if !conn.joined.contains(&b.room) {
            return Err(format!("a block of {} which this connection never joined", b.room));
        }
        let view = conn.views.entry(b.room.clone()).or_default();
        if !b.backfill {
            check_live_block(&b, view.last_live)?;
            view.last_live = Some(b.last_seq);
        }
        for m in &b.messages {
            // The README's client: keep the highest seq seen, drop anything at or below it.
            if m.seq > view.highest {
                view.highest = m.seq;
            } else if !b.backfill {
                return Err(format!(
                    "live message seq {} in {} at or below one seen ({})",
                    m.seq, b.room, view.highest
                ));
            }
        }
        if let Some(w) = &mut cl.witness
            && !b.backfill
        {
            if b.room != self.rooms[w.room] {
                return Err(format!("the witness of {} got a block of {}", self.rooms[w.room], b.room));
            }
            for m in b.messages {
                let e = w.seen.entry(m.id).or_insert((0, Message::default()));
                e.0 += 1;
                if e.0 > 1 {
                    return Err(format!("the witness of {} saw message {:#x} twice", b.room, m.id));
                }
                e.1 = m;
            }
        }
        Ok(())
    }
}

fn client_name(c: &SimClient) -> String {
    match (&c.witness, &c.user) {
        (Some(w), _) => format!("witness of room{}", w.room),
        (None, Some(u)) => {
            format!("client {} ({}, {:?}{})", c.index, u.name, c.speed, if c.json { ", json" } else { "" })
        }
        (None, None) => format!("client {} (anonymous, {:?}{})", c.index, c.speed, if c.json { ", json" } else { "" }),
    }
}

/// One unmasked, unfragmented server frame at the start of `buf`: (opcode, payload, bytes
/// used), or None while incomplete.
fn server_frame_at(buf: &[u8]) -> Result<Option<(u8, Vec<u8>, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x80 == 0 || b0 & 0x70 != 0 || b1 & 0x80 != 0 {
        return Err(format!("bad server frame header {b0:#04x} {b1:#04x} (stream corrupted?)"));
    }
    let (len, at) = match b1 & 0x7F {
        126 if buf.len() < 4 => return Ok(None),
        126 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() < 10 => return Ok(None),
        127 => (u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize, 10),
        n => (usize::from(n), 2),
    };
    if len > 1 << 20 {
        return Err(format!("a server frame of {len} bytes (stream corrupted?)"));
    }
    if buf.len() < at + len {
        return Ok(None);
    }
    Ok(Some((b0 & 0x0F, buf[at..at + len].to_vec(), at + len)))
}

/// Any block: non-empty, its seq range matches its messages, all of its room.
fn check_block_shape(b: &Block) -> Result<(), String> {
    let (Some(first), Some(last)) = (b.messages.first(), b.messages.last()) else {
        return Err(format!("an empty block of {}", b.room));
    };
    if (first.seq, last.seq) != (b.first_seq, b.last_seq) {
        return Err(format!("block {}..{} holds seqs {}..{}", b.first_seq, b.last_seq, first.seq, last.seq));
    }
    if let Some(m) = b.messages.iter().find(|m| m.room != b.room) {
        return Err(format!("a message of {} in a block of {}", m.room, b.room));
    }
    if b.messages.windows(2).any(|w| w[1].seq <= w[0].seq) {
        return Err(format!("seqs not increasing in a block of {}: {:?}", b.room, seqs(b)));
    }
    Ok(())
}

/// A live block: after the last one, consecutive, in priority order, nothing expired, and
/// sent only while the room has members.
fn check_live_block(b: &Block, last_live: Option<u64>) -> Result<(), String> {
    if let Some(last) = last_live
        && b.first_seq <= last
    {
        return Err(format!("block of {} starts at seq {} after one that ended at {last}", b.room, b.first_seq));
    }
    if b.last_seq - b.first_seq + 1 != b.messages.len() as u64 {
        return Err(format!("seqs not consecutive in a block of {}: {:?}", b.room, seqs(b)));
    }
    let order: Vec<(i32, i32)> = b.messages.iter().map(|m| (m.priority, m.weight)).collect();
    if order.windows(2).any(|w| w[0] < w[1]) {
        return Err(format!("block of {} not in priority order: {order:?}", b.room));
    }
    if let Some(m) = b.messages.iter().find(|m| {
        m.priority != Priority::Whitelist.wire() && m.ttl_ms > 0 && m.created_ms + i64::from(m.ttl_ms) < b.server_ms
    }) {
        return Err(format!(
            "expired message {:#x} (created {}, ttl {}) in a block cut at {}",
            m.id, m.created_ms, m.ttl_ms, b.server_ms
        ));
    }
    if b.online == 0 {
        return Err(format!("a live block of {} with online 0", b.room));
    }
    Ok(())
}

fn seqs(b: &Block) -> Vec<u64> {
    b.messages.iter().map(|m| m.seq).collect()
}

/// Attribute sync on a protobuf connection (JSON ones may miss a frame encoded before the
/// owner knew of them): snapshots never go back, deltas never skip a version.
fn on_attrs(conn: &mut ClientConn, a: Attrs) -> Result<(), String> {
    let view = conn.views.entry(a.room.clone()).or_default();
    match view.attrs {
        _ if a.snapshot => {
            if view.attrs.is_some_and(|held| a.version < held) {
                return Err(format!("attrs snapshot of {} at {} after holding {:?}", a.room, a.version, view.attrs));
            }
            view.attrs = Some(a.version);
        }
        None => {}
        Some(held) if a.version <= held => {}
        Some(held) if a.from_version > held => {
            return Err(format!(
                "attrs delta of {} from {} to {} while holding {held}",
                a.room, a.from_version, a.version
            ));
        }
        Some(_) => view.attrs = Some(a.version),
    }
    Ok(())
}

/// A short poll's answer: messages after the cursor, in seq order, `next` the last of them.
/// Returns `next`, and how many enter/leave messages came without their room (a known bug).
fn check_poll(room: &str, after: u64, status: u16, body: &[u8]) -> Result<(u64, usize), String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("poll body: {e}"))?;
    if status == 400 {
        // A cursor from before the room was forgotten and made again is "in the future".
        return Ok((0, 0));
    }
    if status != 200 {
        return Err(format!("poll answered {status}: {v}"));
    }
    let messages: Vec<Message> = serde_json::from_value(v["messages"].clone()).map_err(|e| format!("poll: {e}"))?;
    let next = v["next"].as_u64().ok_or("poll without next")?;
    let mut prev = after;
    let presence = |m: &Message| m.sender.is_empty() && (m.r#type == "enter" || m.r#type == "leave");
    let roomless = messages.iter().filter(|m| m.room.is_empty() && presence(m)).count();
    for m in &messages {
        if m.seq <= prev || (m.room != room && !(m.room.is_empty() && presence(m))) {
            return Err(format!("poll of {room} after {after}: seq {} (room {}) after {prev}", m.seq, m.room));
        }
        prev = m.seq;
    }
    if next != prev {
        return Err(format!("poll of {room} after {after}: next {next}, last {prev}"));
    }
    Ok((next, roomless))
}

// ---- invariants over the world ----

impl World {
    /// Invariant 4 for one hub, at every turn: the hub and its driver agree on the connections,
    /// every queue is within its bound, and every stored frame is held by some queue.
    fn check_memory(&self, h: usize) -> Result<(), String> {
        let (hub, d) = (&self.net.hubs[h], &self.net.drivers[h]);
        if hub.connections() != d.keys.len() {
            return Err(format!("hub {h} holds {} connections, its driver {}", hub.connections(), d.keys.len()));
        }
        let mut queued = 0;
        for &key in d.keys.keys() {
            let len = hub.queue_len(key);
            if len > self.p.queue_max {
                return Err(format!("hub {h} {key:?} queues {len} frames (max {})", self.p.queue_max));
            }
            queued += len;
        }
        if hub.outbox_frames() > queued {
            return Err(format!("hub {h} stores {} frames but its queues hold {queued}", hub.outbox_frames()));
        }
        Ok(())
    }

    fn check_witnesses_up(&self) -> Result<(), String> {
        for cl in self.clients.iter().filter(|c| c.witness.is_some()) {
            let up = cl.conn.as_ref().is_some_and(|c| c.welcomed && c.close_got.is_none());
            if !up {
                return Err(format!("{} is not up after the warmup", client_name(cl)));
            }
        }
        Ok(())
    }

    /// After the drain, asks every owner about every room: nothing may still be pending.
    fn check_pending_drained(&mut self) -> Result<(), String> {
        for (i, room) in self.rooms.iter().enumerate() {
            let name = RoomName::parse(room, 64).expect("valid");
            let owner = name.owner(self.p.shards).index();
            let (tx, rx) = sync_channel(1);
            let mail = OwnerMail::RoomInfo { room: name, reply: Reply(tx) };
            self.net.post(self.p.shards, owner, self.turn, mail.into());
            self.api.room_info.push((i, rx));
        }
        for _ in 0..200 {
            if self.api.room_info.is_empty() {
                break;
            }
            self.step()?;
        }
        if !self.api.room_info.is_empty() {
            return Err("room info requests unanswered".into());
        }
        if let Some((room, info)) = self.api.infos.iter().find(|(_, i)| i.pending > 0) {
            return Err(format!("room{room} still has {} messages pending after the drain: {info:?}", info.pending));
        }
        if !self.api.publishes.is_empty() {
            return Err(format!("{} publishes unanswered after the drain", self.api.publishes.len()));
        }
        Ok(())
    }

    /// Invariants 2 and 3, once everything published has had time to go out.
    fn check_delivery(&mut self) -> Result<(), String> {
        let mut seen_anywhere: BTreeMap<u64, usize> = BTreeMap::new();
        for cl in &self.clients {
            let Some(w) = &cl.witness else { continue };
            for (id, (_, m)) in &w.seen {
                seen_anywhere.insert(*id, w.room);
                let from_client = !m.sender.is_empty();
                let presence = m.sender.is_empty() && (m.r#type == "enter" || m.r#type == "leave");
                match self.api.accepted.get(id) {
                    Some(a) if a.coalesced_away => {
                        return Err(format!("the witness of room{} saw {id:#x}, coalesced away", w.room));
                    }
                    Some(a) if a.room != w.room => {
                        return Err(format!("message {id:#x} of room{} reached the witness of room{}", a.room, w.room));
                    }
                    Some(_) => {}
                    None if from_client || presence => {}
                    None => return Err(format!("the witness of room{} saw an unknown message {m:?}", w.room)),
                }
            }
        }
        // 2. Every whitelist message an owner accepted went out in exactly one block.
        let mut whitelist = 0;
        for (id, a) in &self.api.accepted {
            if a.whitelist && !a.coalesced_away {
                whitelist += 1;
                if seen_anywhere.get(id) != Some(&a.room) {
                    return Err(format!(
                        "whitelist message {id:#x} of room{} was accepted but never delivered",
                        a.room
                    ));
                }
            }
        }
        self.stats.insert("whitelist_checked", whitelist);
        // 3. Counters: what was accepted went out, was dropped, or is pending (0 by now); the
        // witnesses saw exactly what the owners blocked since the warmup.
        let t = self.totals();
        let b = self.baseline;
        if t.blocked - b.blocked != t.witness_seen - b.witness_seen {
            return Err(format!(
                "owners blocked {} messages since the warmup, the witnesses saw {}",
                t.blocked - b.blocked,
                t.witness_seen - b.witness_seen
            ));
        }
        let out = t.blocked + t.overflow + t.expired;
        // Enter/leave messages the owners post themselves count as accepted like publishes.
        if t.accepted != out {
            return Err(format!(
                "accepted {} != blocked {} + overflow {} + expired {} (pending 0, presence {})",
                t.accepted, t.blocked, t.overflow, t.expired, self.p.presence
            ));
        }
        Ok(())
    }

    /// After everyone left and the hubs idled: nothing held anywhere.
    fn check_empty(&mut self) -> Result<(), String> {
        for (h, (hub, d)) in self.net.hubs.iter().zip(&self.net.drivers).enumerate() {
            if hub.connections() != 0 || !d.keys.is_empty() {
                return Err(format!("hub {h} still holds {} connections at the end", hub.connections()));
            }
            if hub.outbox_frames() != 0 {
                return Err(format!("hub {h} still stores {} frames at the end", hub.outbox_frames()));
            }
            // Abortive closes: as many as the hub counted reached the driver, and only for
            // peers that were not taking their bytes.
            let c = hub.counters();
            let resets = c.get(Series::ClosedReset);
            if resets != d.resets {
                return Err(format!("hub {h} counted {resets} resets, its driver closed {} abortively", d.resets));
            }
            let hopeless = c.get(Series::ClosedSlow) + c.get(Series::ClosedError) + c.get(Series::ClosedCloseTimeout);
            if resets > hopeless {
                return Err(format!(
                    "hub {h}: {resets} resets, more than slow + io_error + close_timeout closes ({hopeless})"
                ));
            }
        }
        if let Some(i) = self.net.sockets.iter().position(|s| !s.closed) {
            return Err(format!("socket {i} is still open at the end"));
        }
        if let Some(cl) = self.clients.iter().find(|c| c.conn.is_some()) {
            return Err(format!("{} still holds a connection at the end", client_name(cl)));
        }
        Ok(())
    }
}
