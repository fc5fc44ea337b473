//! Starting and stopping the whole gateway: the mesh, one pinned thread per shard (each binds
//! its own SO_REUSEPORT listener and builds its rings on its own thread), and the business API.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::routes::Routes;
use crate::api::{Server, ServerConfig};
use crate::config::{Config, ConfigError};
use crate::hub::HubConfig;
use crate::hub::mail::{HostMail, Mail};
use crate::ids::ShardId;
use crate::metrics::Snapshot;
use crate::shard::driver::RingParams;
use crate::shard::mesh::Mesh;
use crate::shard::{Shard, ShardExit, ShardParams, listener, sys};

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
    pub public_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub shard_count: usize,
    pub ring_files_max: u32,
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
    /// Validates the config and starts every shard and the API; returns once all listen.
    pub fn start(config: &Config) -> Result<Gateway, StartError> {
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
        let (listen, _port_hold) = resolve_port(config.server.listen)?;
        let params = ShardParams {
            listen,
            backlog: config.server.listen_backlog,
            tcp_keepalive_s: config.websocket.tcp_keepalive_s,
            send_buffer_bytes: config.websocket.send_buffer_bytes,
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
        let mesh = Mesh::new(shards, config.server.mesh_queue_len).map_err(|e| StartError(format!("mesh: {e}")))?;
        let metrics: Arc<[Snapshot]> = (0..shards).map(|_| Snapshot::default()).collect();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(shards);
        for i in 0..shards {
            let hub = HubConfig::new(config, ShardId(i as u16), shards);
            let core = if config.server.pin_cores && !cores.is_empty() { Some(cores[i % cores.len()]) } else { None };
            let (params, mesh, metrics, ready) =
                (params.clone(), Arc::clone(&mesh), Arc::clone(&metrics), ready_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    match Shard::new(hub, params, mesh, metrics) {
                        Ok(shard) => {
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
            public_addr: params.listen,
            api_addr: config.api.listen,
            shard_count: shards,
            ring_files_max: files_max,
        };
        if let Some(e) = failure {
            gateway.stop();
            return Err(StartError(e));
        }
        let routes = Routes::new(config, Arc::clone(&gateway.mesh), metrics);
        let api_config = ServerConfig {
            connections_max: config.api.connections_max,
            idle_timeout_ms: config.api.idle_timeout_ms,
            limits: crate::api::Limits { body_bytes_max: config.api.body_bytes_max, ..crate::api::Limits::default() },
        };
        match Server::start(config.api.listen, api_config, Arc::new(routes)) {
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

    /// Starts a drain with the config's `[drain]` plan: every shard stops accepting and moves
    /// its clients off in waves (see `hub::host::drain`).
    pub fn drain(&self) {
        let plan = crate::drain::plan(&self.config, self.shard_count, crate::drain::Overrides::default());
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
        exits
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
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

/// Port 0 means "any": pick one now so every shard binds the same port. The returned socket
/// holds the port until the shards have bound it.
fn resolve_port(addr: SocketAddr) -> Result<(SocketAddr, Option<socket2::Socket>), StartError> {
    if addr.port() != 0 {
        return Ok((addr, None));
    }
    let (probe, local) = listener::reserve_port(addr).map_err(|e| StartError(format!("listen {addr}: {e}")))?;
    Ok((local, Some(probe)))
}
