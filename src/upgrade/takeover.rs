//! The new process's side of an upgrade: ask the running process for its listeners and rooms,
//! then, once serving them, say `READY` (see `wire`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use prost::Message as _;
use socket2::Socket;

use super::Inherited;
use super::fds;
use super::wire::{Answer, DrainRequest, HEADER_BYTES, READY, Request, VERSION};
use crate::config::Config;
use crate::proto::StateSnapshot;

/// A takeover whose offer was received: say `ready` once serving, or drop it and the old
/// process keeps its rooms.
pub struct Pending {
    stream: UnixStream,
}

impl Pending {
    /// Tells the old process to drain into this one.
    pub fn ready(mut self) -> io::Result<()> {
        self.stream.write_all(READY)
    }
}

/// Asks the process serving `upgrade.control_socket` for its listeners and rooms, with this
/// config's `[drain]` as the way it moves its clients here. None when no process serves the
/// socket (the first start: nothing to take over; a barrage serving elsewhere still holds the
/// API address, so a fresh start then fails on it rather than running beside it).
pub fn request(config: &Config) -> io::Result<Option<(Inherited, Pending)>> {
    let path = &config.upgrade.control_socket;
    if path.is_empty() {
        return Err(io::Error::other("--takeover needs upgrade.control_socket"));
    }
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("control socket {path}: {e}"))),
    };
    let timeout = Duration::from_millis(config.upgrade.timeout_ms);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let d = &config.drain;
    let drain = DrainRequest {
        rate_per_s: Some(d.reconnect_rate_per_s),
        deadline_ms: Some(d.deadline_ms),
        delay_ms: Some(d.delay_ms),
        jitter_ms: Some(d.jitter_ms),
    };
    (&stream).write_all(&Request { version: VERSION, pid: std::process::id(), drain }.encode())?;

    let mut header = [0u8; HEADER_BYTES];
    let fds = fds::recv(&stream, &mut header)?;
    let (public, snapshot_bytes) = match Answer::decode(&header).map_err(io::Error::other)? {
        Answer::Refusal { reason_bytes } => {
            let mut reason = vec![0u8; usize::from(reason_bytes)];
            (&stream).read_exact(&mut reason)?;
            return Err(io::Error::other(format!("the running barrage refused: {}", String::from_utf8_lossy(&reason))));
        }
        Answer::Offer { public, snapshot_bytes } => (usize::from(public), snapshot_bytes),
    };
    if fds.len() != public + 1 {
        return Err(io::Error::other(format!("offer names {} listeners, {} arrived", public + 1, fds.len())));
    }
    if snapshot_bytes > config.upgrade.snapshot_bytes_max {
        return Err(io::Error::other(format!(
            "the rooms' state is {snapshot_bytes} bytes, over upgrade.snapshot_bytes_max = {}",
            config.upgrade.snapshot_bytes_max
        )));
    }
    let mut snapshot = Vec::new();
    (&stream).take(snapshot_bytes).read_to_end(&mut snapshot)?;
    if snapshot.len() as u64 != snapshot_bytes {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let rooms = StateSnapshot::decode(&snapshot[..]).map_err(|e| io::Error::other(format!("rooms' state: {e}")))?.rooms;
    let mut sockets = fds.into_iter().map(Socket::from);
    let api = sockets.next().ok_or_else(|| io::Error::other("no API listener"))?;
    let inherited = Inherited { api, public: sockets.collect(), rooms };
    Ok(Some((inherited, Pending { stream })))
}
