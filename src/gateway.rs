//! Starting and stopping the whole gateway: the listeners (one SO_REUSEPORT socket per shard,
//! or those taken over from the process this one replaces), the mesh, one pinned thread per
//! shard (each builds its rings on its own thread), the business API, and the upgrade control
//! socket.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::routes::Routes;
use crate::api::{Server, ServerConfig};
use crate::cluster::Cluster;
use crate::cluster::lease::Leases;
use crate::cluster::placement::Placement;
use crate::config::KernelTls;
use crate::config::{Config, ConfigError};
use crate::hooks::Hooks;
use crate::hub::HubConfig;
use crate::hub::mail::{HostMail, Mail};
use crate::ids::ShardId;
use crate::metrics::Snapshot;
use crate::proto::RoomState;
use crate::room::RoomName;
use crate::room::owner::{Replica, replicas};
use crate::shard::driver::RingParams;
use crate::shard::mesh::Mesh;
use crate::shard::{Shard, ShardExit, ShardParams, listener, sys};
use crate::store::Store;
use crate::upgrade::Inherited;
use crate::upgrade::control::{Control, Holdings};

/// Sendmsg slots (multi-frame sends in flight) per shard at most: 16,384 × ~300 B = 5 MiB.
const SENDMSG_SLOTS_PER_SHARD: usize = 16_384;
const _: () = assert!(SENDMSG_SLOTS_PER_SHARD <= crate::shard::SENDMSG_SLOTS_MAX, "a slot index fits user_data");

/// A running gateway.
pub struct Gateway {
    mesh: Arc<Mesh>,
    metrics: Arc<[Snapshot]>,
    config: Config,
    shards: Vec<JoinHandle<std::io::Result<ShardExit>>>,
    api: Option<Server>,
    /// Duplicates of the shards' listeners, for handing over on an upgrade.
    public_listeners: Vec<socket2::Socket>,
    control: Option<Control>,
    handed_over: Arc<AtomicBool>,
    /// Durable room state (with `redis.url`).
    store: Option<Arc<Store>>,
    /// The cluster link (with `cluster.enabled`).
    cluster: Option<Arc<Cluster>>,
    /// The business hooks' workers (with any `hook_*.url`).
    hooks: Option<Arc<Hooks>>,
    pub public_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub shard_count: usize,
    pub ring_files_max: u32,
    /// With TLS: whether sends go through kernel TLS, or why not.
    pub kernel_tls: Option<Result<(), String>>,
}

/// Why the gateway did not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError(e.0)
    }
}

impl Gateway {
    /// Validates the config and starts every shard and the API; returns once all listen. With
    /// `upgrade.control_socket` set, serves it (refused if a barrage already does).
    pub fn start(config: &Config) -> Result<Gateway, StartError> {
        let mut gateway = Gateway::start_with(config, None)?;
        gateway.open_control(false)?;
        Ok(gateway)
    }

    /// Starts in place of the barrage serving `upgrade.control_socket`: takes its listeners and
    /// rooms, serves them, then tells it to drain its clients into this process. With no
    /// barrage there, starts as `start` does (so one command serves first starts and upgrades).
    pub fn take_over(config: &Config) -> Result<Gateway, StartError> {
        config.validate()?;
        let taken = crate::upgrade::takeover::request(config).map_err(|e| StartError(format!("upgrade: {e}")))?;
        let Some((inherited, pending)) = taken else {
            println!("barrage: upgrade: no barrage serves {}; starting fresh", config.upgrade.control_socket);
            return Gateway::start(config);
        };
        let rooms = inherited.rooms.len();
        let mut gateway = Gateway::start_with(config, Some(inherited))?;
        pending.ready().map_err(|e| StartError(format!("upgrade: telling the old process: {e}")))?;
        println!("barrage: upgrade: took over the listeners and {rooms} rooms");
        gateway.open_control(true)?;
        Ok(gateway)
    }

    /// Starts on fresh listeners, or on `inherited` ones with the rooms that came with them.
    fn start_with(config: &Config, inherited: Option<Inherited>) -> Result<Gateway, StartError> {
        config.validate()?;
        let shards = config.shard_count();
        let files_max = ring_files_max(config)?;
        let per_shard = config.server.connections_max.div_ceil(shards);
        // Accepts fill a ring to its margin; one spare ring so accepting can move on while
        // slots are being recycled.
        let rings_max = per_shard.div_ceil((files_max - crate::shard::accept_margin(files_max)).max(1) as usize) + 1;
        if rings_max > crate::shard::RINGS_MAX {
            return Err(StartError(format!(
                "server.connections_max needs {rings_max} rings of {files_max} descriptors per shard; a shard \
                 drives at most {} (raise server.ring_files_max or server.shards)",
                crate::shard::RINGS_MAX
            )));
        }
        let (api_listener, public, rooms) = match inherited {
            Some(i) => (Some(i.api), adopt_listeners(config, i.public, shards)?, i.rooms),
            None => (None, bind_listeners(config, shards)?, Vec::new()),
        };
        let public_addr = local_addr(&public[0])?;
        let public_listeners = public
            .iter()
            .map(socket2::Socket::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StartError(format!("listener: {e}")))?;
        let mut per_shard_listeners: Vec<Vec<socket2::Socket>> = (0..shards).map(|_| Vec::new()).collect();
        for (i, l) in public.into_iter().enumerate() {
            per_shard_listeners[i % shards].push(l);
        }
        let replicas = replicas(&rooms, config.rooms.name_bytes_max);
        let mut per_shard_rooms = split_rooms(rooms, shards, config.rooms.name_bytes_max);
        let params = ShardParams {
            ring: RingParams {
                entries: config.server.ring_entries,
                files_max,
                recv_buffers: config.server.recv_buffers,
                recv_buffer_bytes: config.server.recv_buffer_bytes,
            },
            read_mode: config.server.read_mode,
            rings_max,
            sendmsg_slots_max: per_shard.clamp(256, SENDMSG_SLOTS_PER_SHARD),
            stop_grace: Duration::from_millis(config.server.stop_grace_ms),
        };
        // In a cluster: where rooms are owned (read by every shard), the room leases, and the
        // link's inbox on the mesh.
        let (placement, leases) = match config.cluster.enabled {
            true => {
                let (me, _) = crate::cluster::identity(config, public_addr);
                let leases = Leases::new(&me, config.cluster.lease_ms, &config.redis.prefix);
                (Some(Placement::new(&me, shards)), Some(Arc::new(leases)))
            }
            false => (None, None),
        };
        let mesh = match placement {
            Some(_) => Mesh::with_link(shards, config.server.mesh_queue_len),
            None => Mesh::new(shards, config.server.mesh_queue_len),
        }
        .map_err(|e| StartError(format!("mesh: {e}")))?;
        let store = Store::start(config, Arc::clone(&mesh), leases.clone()).map_err(StartError)?;
        let tls = match config.tls.cert.is_empty() {
            true => None,
            false => Some(load_tls(config)?),
        };
        let kernel_tls = match (&tls, config.tls.kernel) {
            (None, _) => None,
            (Some(_), KernelTls::Auto) => Some(sys::kernel_tls()),
            (Some(_), KernelTls::On) => Some(Ok(())),
            (Some(_), KernelTls::Off) => Some(Err("off (tls.kernel = off)".into())),
        };
        let hooks = Hooks::start(config, Arc::clone(&mesh)).map_err(StartError)?.map(Arc::new);
        let metrics: Arc<[Snapshot]> = (0..shards).map(|_| Snapshot::default()).collect();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(shards);
        for (i, listeners) in per_shard_listeners.into_iter().enumerate().rev() {
            let mut hub = HubConfig::new(config, ShardId(i as u16), shards);
            if let Some(p) = &placement {
                hub = hub.with_placement(Arc::clone(p));
            }
            if let Some(h) = &hooks {
                hub = hub.with_hooks(h.gate());
            }
            if let Some(t) = &tls {
                hub = hub.with_tls(Arc::clone(t), matches!(kernel_tls, Some(Ok(()))));
            }
            let core = if config.server.pin_cores && !cores.is_empty() { Some(cores[i % cores.len()]) } else { None };
            let (params, mesh, metrics, ready, store) =
                (params.clone(), Arc::clone(&mesh), Arc::clone(&metrics), ready_tx.clone(), store.clone());
            let (rooms, replicas): (Vec<RoomState>, Vec<Replica>) =
                (per_shard_rooms.pop().unwrap_or_default(), replicas.clone());
            let handle = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    match Shard::new(hub, params, listeners, mesh, metrics, store) {
                        Ok(mut shard) => {
                            // The rooms before the first connection: a join never sees a
                            // room this process has not taken over yet.
                            shard.import(rooms, replicas);
                            let _ = ready.send(Ok(()));
                            let result = shard.run();
                            if let Err(e) = &result {
                                // A shard whose ring failed serves nobody; a supervisor restart
                                // beats a half-alive gateway.
                                eprintln!("barrage: shard {i} failed: {e}; exiting");
                                std::process::exit(70);
                            }
                            result
                        }
                        Err(e) => {
                            let _ = ready.send(Err(format!("shard {i}: {e}")));
                            Err(e)
                        }
                    }
                })
                .map_err(|e| StartError(format!("spawn shard {i}: {e}")))?;
            handles.push(handle);
        }
        handles.reverse();
        drop(ready_tx);
        let mut failure = None;
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a shard exited during start".into()),
            }
        }
        let mut gateway = Gateway {
            mesh,
            metrics: Arc::clone(&metrics),
            config: config.clone(),
            shards: handles,
            api: None,
            public_listeners,
            control: None,
            handed_over: Arc::new(AtomicBool::new(false)),
            store: store.clone(),
            cluster: None,
            hooks: hooks.clone(),
            public_addr,
            api_addr: config.api.listen,
            shard_count: shards,
            ring_files_max: files_max,
            kernel_tls,
        };
        if let Some(e) = failure {
            gateway.stop();
            return Err(StartError(e));
        }
        let joined = match (placement, leases) {
            (Some(p), Some(l)) => Cluster::start(config, public_addr, p, Arc::clone(&gateway.mesh), l),
            _ => Ok(None),
        };
        gateway.cluster = match joined {
            Ok(c) => c,
            Err(e) => {
                gateway.stop();
                return Err(StartError(e));
            }
        };
        let routes = Routes::new(config, Arc::clone(&gateway.mesh), metrics, store)
            .with_cluster(gateway.cluster.clone())
            .with_hooks(hooks);
        let api_config = ServerConfig {
            connections_max: config.api.connections_max,
            idle_timeout_ms: config.api.idle_timeout_ms,
            limits: crate::api::Limits { body_bytes_max: config.api.body_bytes_max, ..crate::api::Limits::default() },
        };
        let started = match api_listener {
            Some(l) => Server::start_on(l, api_config, Arc::new(routes)),
            None => Server::start(config.api.listen, api_config, Arc::new(routes)),
        };
        match started {
            Ok(server) => {
                gateway.api_addr = server.local_addr();
                gateway.api = Some(server);
                Ok(gateway)
            }
            Err(e) => {
                gateway.stop();
                Err(StartError(format!("API listener {}: {e}", config.api.listen)))
            }
        }
    }

    /// Serves `upgrade.control_socket` (when set), `replace`-ing the one a taken-over process
    /// served.
    fn open_control(&mut self, replace: bool) -> Result<(), StartError> {
        let path = self.config.upgrade.control_socket.clone();
        let Some(api) = self.api.as_ref() else { return Ok(()) };
        if path.is_empty() {
            return Ok(());
        }
        let dup = |s: &socket2::Socket| s.try_clone().map_err(|e| StartError(format!("control socket: {e}")));
        let holdings = Holdings {
            mesh: Arc::clone(&self.mesh),
            metrics: Arc::clone(&self.metrics),
            public: self.public_listeners.iter().map(dup).collect::<Result<_, _>>()?,
            api: dup(api.listener())?,
            api_gate: api.gate(),
            config: self.config.clone(),
            handed_over: Arc::clone(&self.handed_over),
        };
        let control = Control::open(&path, replace, holdings);
        self.control = Some(control.map_err(|e| StartError(format!("upgrade.control_socket {path}: {e}")))?);
        Ok(())
    }

    /// Reads `tls.cert` and `tls.key` again (SIGHUP) and hands the new certificates to every
    /// shard: handshakes from then on use them, established connections go on untouched.
    pub fn reload_tls(&self) -> Result<(), StartError> {
        if self.config.tls.cert.is_empty() {
            return Err(StartError("no tls.cert to reload".into()));
        }
        let tls = load_tls(&self.config)?;
        for i in 0..self.mesh.shards() {
            let mut mail = Mail::from(HostMail::TlsConfig(Arc::clone(&tls)));
            while let Err(back) = self.mesh.send(ShardId(i as u16), mail) {
                mail = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// A new process took over this one's listeners and rooms; this one is draining into it.
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Starts a drain with the config's `[drain]` plan: every shard stops accepting and moves
    /// its clients off in waves (see `hub::host::drain`).
    pub fn drain(&self) {
        let peers = self.cluster.as_ref().map(|c| c.peer_urls()).unwrap_or_default();
        let plan = crate::drain::plan(&self.config, self.shard_count, crate::drain::Overrides::default(), &peers);
        crate::drain::start(&self.mesh, &plan);
    }

    /// Where the drain is, from the shards' last published gauges.
    pub fn drain_progress(&self) -> crate::drain::Progress {
        crate::drain::Progress::read(&self.metrics)
    }

    /// Closes every connection with 1001 and waits for the shards and the API to end; says how
    /// each shard that ran ended.
    pub fn stop(&mut self) -> Vec<ShardExit> {
        let mut exits = Vec::new();
        self.control = None;
        if let Some(api) = self.api.take() {
            api.stop();
        }
        for i in 0..self.mesh.shards() {
            let to = ShardId(i as u16);
            // Keep trying while the inbox is full: Stop must arrive.
            let mut mail = Mail::from(HostMail::Stop);
            while let Err(back) = self.mesh.send(to, mail) {
                mail = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            self.mesh.wake(to);
        }
        for h in self.shards.drain(..) {
            match h.join() {
                Ok(Err(e)) => eprintln!("barrage: shard ended with an error: {e}"),
                Err(_) => eprintln!("barrage: a shard panicked"),
                Ok(Ok(exit)) => exits.push(exit),
            }
        }
        if let Some(cluster) = self.cluster.take() {
            cluster.stop();
        }
        if let Some(hooks) = self.hooks.take() {
            hooks.stop();
        }
        // After the shards: their last blocks' writes are queued; send what waits.
        if let Some(store) = self.store.take() {
            store.stop(Duration::from_millis(self.config.server.stop_grace_ms));
        }
        exits
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The TLS server config from `tls.cert` and `tls.key`.
fn load_tls(config: &Config) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let read = |path: &str, what: &str| std::fs::read(path).map_err(|e| StartError(format!("tls.{what} {path}: {e}")));
    let mut files = Vec::new();
    for (cert, key) in config.tls.certs().into_iter().zip(config.tls.keys()) {
        files.push((read(cert, "cert")?, read(key, "key")?));
    }
    let pairs: Vec<(&[u8], &[u8])> = files.iter().map(|(c, k)| (&c[..], &k[..])).collect();
    crate::tls::server_config_sni(&pairs).map_err(|e| StartError(format!("tls: {e}")))
}

/// Direct descriptors per ring: the configured value, or RLIMIT_NOFILE less a reserve for the
/// process's own descriptors (the kernel refuses a larger table).
fn ring_files_max(config: &Config) -> Result<u32, StartError> {
    let limit = sys::raise_nofile_limit().map_err(|e| StartError(format!("RLIMIT_NOFILE: {e}")))?;
    let ceiling = limit.min(u64::from(u32::MAX)) as u32;
    match config.server.ring_files_max {
        0 => Ok(ceiling.saturating_sub(1024).max(1024.min(ceiling / 2))),
        n if n > ceiling => Err(StartError(format!(
            "server.ring_files_max = {n} exceeds RLIMIT_NOFILE = {ceiling} (the kernel caps a ring's table at it)"
        ))),
        n => Ok(n),
    }
}

/// One SO_REUSEPORT listener per shard on `server.listen` (port 0: one free port for all).
fn bind_listeners(config: &Config, shards: usize) -> Result<Vec<socket2::Socket>, StartError> {
    let mut addr = config.server.listen;
    // Port 0 means "any": pick one now so every shard binds the same port, held by a socket
    // that takes no connections until the shards have bound it.
    let _hold = match addr.port() {
        0 => {
            let (probe, local) = listener::reserve_port(addr).map_err(|e| StartError(format!("listen {addr}: {e}")))?;
            addr = local;
            Some(probe)
        }
        _ => None,
    };
    (0..shards).map(|_| bind_public(config, addr)).collect()
}

fn bind_public(config: &Config, addr: SocketAddr) -> Result<socket2::Socket, StartError> {
    let (s, w) = (&config.server, &config.websocket);
    listener::bind(addr, s.listen_backlog, w.tcp_keepalive_s, w.send_buffer_bytes)
        .map_err(|e| StartError(format!("listen {addr}: {e}")))
}

/// The listeners taken over, with this config's options, plus one more in their SO_REUSEPORT
/// group for each shard beyond their count.
fn adopt_listeners(
    config: &Config,
    mut taken: Vec<socket2::Socket>,
    shards: usize,
) -> Result<Vec<socket2::Socket>, StartError> {
    let (s, w) = (&config.server, &config.websocket);
    let first = taken.first().ok_or_else(|| StartError("upgrade: no public listener was handed over".into()))?;
    let addr = local_addr(first)?;
    let want = config.server.listen;
    if want.port() != 0 && want != addr {
        return Err(StartError(format!(
            "server.listen is {want}, the listener taken over is {addr}: an upgrade keeps the address"
        )));
    }
    for l in &taken {
        listener::adopt(l, s.listen_backlog, w.tcp_keepalive_s, w.send_buffer_bytes)
            .map_err(|e| StartError(format!("upgrade: listener {addr}: {e}")))?;
    }
    while taken.len() < shards {
        taken.push(bind_public(config, addr)?);
    }
    Ok(taken)
}

fn local_addr(socket: &socket2::Socket) -> Result<SocketAddr, StartError> {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| StartError("a listener without an address".into()))
}

/// Rooms by owning shard (a name that does not parse goes to shard 0, whose import counts it).
fn split_rooms(rooms: Vec<RoomState>, shards: usize, name_bytes_max: usize) -> Vec<Vec<RoomState>> {
    let mut out: Vec<Vec<RoomState>> = (0..shards).map(|_| Vec::new()).collect();
    for r in rooms {
        let owner = RoomName::parse(&r.room, name_bytes_max).map_or(0, |n| n.owner(shards).index());
        out[owner].push(r);
    }
    out
}
