//! The running process's side of an upgrade: a thread serving the control socket. On a
//! takeover request it pauses the API acceptor, has every owner cut its pending messages and
//! export its rooms (then refuse changes), hands over the listeners and the rooms, and waits
//! for the new process's `READY`: then it retires the API and drains its clients into the new
//! process; on anything else it thaws the rooms and carries on as before.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use prost::Message as _;
use socket2::Socket;

use super::fds;
use super::wire::{Answer, FDS_MAX, READY, REASON_BYTES_MAX, REQUEST_BYTES_MAX, Request};
use crate::api::server::Gate;
use crate::config::Config;
use crate::drain::{self, Progress};
use crate::hub::mail::{Mail, OwnerMail, Reply};
use crate::ids::ShardId;
use crate::metrics::Snapshot;
use crate::proto::{RoomState, StateSnapshot};
use crate::shard::mesh::Mesh;

/// How often the control thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
/// How long a client of the control socket has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long every shard has to export its rooms.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control thread hands over and steers.
pub struct Holdings {
    pub mesh: Arc<Mesh>,
    pub metrics: Arc<[Snapshot]>,
    /// Duplicates of the public listeners, one per shard, and of the API listener.
    pub public: Vec<Socket>,
    pub api: Socket,
    pub api_gate: Gate,
    pub config: Config,
    /// Set once a new process serves the listeners and this one drains into it.
    pub handed_over: Arc<AtomicBool>,
}

/// The control socket and its thread. Dropping it stops the thread and removes the socket
/// file, unless another process has replaced it.
pub struct Control {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    ino: u64,
}

impl Control {
    /// Binds `path`. A socket file where a barrage still answers is refused unless `replace`
    /// (this process took over from that one); a stale one is removed.
    pub fn open(path: &str, replace: bool, holdings: Holdings) -> io::Result<Control> {
        let path = PathBuf::from(path);
        if path.exists() {
            if !replace && UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "a barrage is serving the control socket {}: start this one with --takeover to replace it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let ino = std::fs::metadata(&path)?.ino();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = thread::Builder::new().name("upgrade-control".into()).spawn(move || {
            serve(&listener, &holdings, &thread_stop);
        })?;
        Ok(Control { stop, thread: Some(thread), path, ino })
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(listener: &UnixListener, h: &Holdings, stop: &AtomicBool) {
    let poll_timeout = rustix::time::Timespec { tv_sec: 0, tv_nsec: STOP_POLL.as_nanos() as i64 };
    while !stop.load(Ordering::Acquire) {
        let mut fds = [rustix::event::PollFd::new(listener, rustix::event::PollFlags::IN)];
        if !matches!(rustix::event::poll(&mut fds, Some(&poll_timeout)), Ok(1..)) {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else { continue };
        match takeover(stream, h) {
            Ok(true) => {
                h.handed_over.store(true, Ordering::Release);
                return;
            }
            Ok(false) => {}
            Err(e) => eprintln!("barrage: upgrade: {e}; this process keeps serving"),
        }
    }
}

/// One takeover request, answered: true once the new process is serving and the drain began;
/// false for a connection that closed without a word (a process checking whether a barrage
/// serves the socket).
fn takeover(stream: UnixStream, h: &Holdings) -> io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(Duration::from_millis(h.config.upgrade.timeout_ms)))?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(REQUEST_BYTES_MAX as u64 + 1)).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(false);
    }
    let request = match Request::decode(line.strip_suffix(b"\n").unwrap_or(&line)) {
        Ok(r) => r,
        Err(e) => return refuse(&stream, &e.to_string()),
    };
    let shards = h.mesh.shards();
    if Progress::read(&h.metrics).phases[0] != shards {
        return refuse(&stream, "this process is draining");
    }
    if h.public.len() + 1 > FDS_MAX {
        return refuse(&stream, "more listeners than one message carries (server.shards over 252)");
    }
    h.api_gate.pause();
    let rooms = match export(&h.mesh) {
        Ok(rooms) => rooms,
        Err(e) => {
            back_out(h);
            return refuse(&stream, &format!("exporting the rooms: {e}"));
        }
    };
    let handed = hand_over(&stream, h, rooms);
    match handed {
        Ok((rooms, bytes)) => {
            h.api_gate.retire();
            // Into the new process on the same address, never to cluster peers.
            let plan = drain::plan(&h.config, shards, request.drain.overrides(), &[]);
            drain::start(&h.mesh, &plan);
            println!(
                "barrage: upgrade: pid {} serves the listeners and {rooms} rooms ({bytes} bytes); draining into it at \
                 {} reconnects/s",
                request.pid,
                plan.rate_per_s.saturating_mul(shards as u32)
            );
            Ok(true)
        }
        Err(e) => {
            back_out(h);
            Err(io::Error::new(e.kind(), format!("pid {}: {e}", request.pid)))
        }
    }
}

/// Sends the offer (listeners attached) and the rooms, and waits for `READY`.
fn hand_over(stream: &UnixStream, h: &Holdings, rooms: Vec<RoomState>) -> io::Result<(usize, usize)> {
    let count = rooms.len();
    let snapshot = StateSnapshot { rooms }.encode_to_vec();
    let header = Answer::Offer { public: h.public.len() as u16, snapshot_bytes: snapshot.len() as u64 }.encode();
    let mut sockets = vec![&h.api];
    sockets.extend(h.public.iter());
    fds::send(stream, &header, &fds::borrow(&sockets))?;
    (&*stream).write_all(&snapshot)?;
    stream.set_read_timeout(Some(Duration::from_millis(h.config.upgrade.timeout_ms)))?;
    let mut ready = [0u8; READY.len()];
    (&*stream).read_exact(&mut ready)?;
    if &ready != READY {
        return Err(io::Error::other("the new process did not say READY"));
    }
    Ok((count, snapshot.len()))
}

fn refuse(stream: &UnixStream, reason: &str) -> io::Result<bool> {
    let reason = &reason.as_bytes()[..reason.len().min(REASON_BYTES_MAX)];
    let header = Answer::Refusal { reason_bytes: reason.len() as u16 }.encode();
    (&*stream).write_all(&header)?;
    (&*stream).write_all(reason)?;
    Err(io::Error::other(format!("refused a takeover: {}", String::from_utf8_lossy(reason))))
}

/// Every owner cuts its pending messages, exports its rooms and freezes them.
fn export(mesh: &Mesh) -> io::Result<Vec<RoomState>> {
    let deadline = Instant::now() + EXPORT_TIMEOUT;
    let mut waits = Vec::with_capacity(mesh.shards());
    for i in 0..mesh.shards() {
        let (tx, rx) = sync_channel(1);
        post(mesh, ShardId(i as u16), OwnerMail::Export { reply: Reply(tx) }.into(), deadline)?;
        waits.push(rx);
    }
    let mut rooms = Vec::new();
    for rx in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        rooms.extend(rx.recv_timeout(left).map_err(|_| io::Error::other("a shard did not export in time"))?);
    }
    Ok(rooms)
}

/// The upgrade failed: the rooms take changes again and the API accepts again.
fn back_out(h: &Holdings) {
    let deadline = Instant::now() + EXPORT_TIMEOUT;
    for i in 0..h.mesh.shards() {
        if post(&h.mesh, ShardId(i as u16), OwnerMail::Thaw.into(), deadline).is_err() {
            eprintln!("barrage: upgrade: shard {i} could not be told to thaw its rooms");
        }
    }
    h.api_gate.resume();
}

/// Posts mail that must arrive, waiting out a full inbox until `deadline`.
fn post(mesh: &Mesh, to: ShardId, mut mail: Mail, deadline: Instant) -> io::Result<()> {
    loop {
        match mesh.send(to, mail) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() >= deadline => return Err(io::Error::other("a shard's inbox stayed full")),
            Err(back) => {
                mail = back;
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
