//! Zero-downtime upgrade on one box: the new process asks the old one, over a Unix control
//! socket (`upgrade.control_socket`), for its listening sockets and its rooms; the old one cuts
//! every pending message into blocks, freezes its rooms, and hands both over; the new one
//! starts serving them and says so; the old one then drains its clients into it (reconnect to
//! the same address, resuming by seq) and exits.
//!
//! Why hand the sockets over rather than bind a second set with SO_REUSEPORT: a listening
//! socket that is passed keeps its accept queue, so no connection the kernel completed for the
//! old process is reset when it exits (closing one SO_REUSEPORT listener resets the connections
//! queued on it unless `net.ipv4.tcp_migrate_req` is set); the API listener needs no
//! SO_REUSEPORT (a stray second gateway cannot silently take half the business API); and the
//! same conversation carries the rooms' state at the moment the old process stops changing
//! it, which socket activation by systemd cannot.
//!
//! `wire` is the conversation as bytes, `fds` passes descriptors, `control` is the old
//! process's side, `takeover` the new one's.
#![forbid(unsafe_code)]

pub mod control;
mod fds;
pub mod takeover;
pub mod wire;

use socket2::Socket;

use crate::proto::RoomState;

/// What a new process takes over from the one it replaces.
pub struct Inherited {
    /// The business API's listening socket.
    pub api: Socket,
    /// The public listeners, one per old shard (their accept queues included).
    pub public: Vec<Socket>,
    /// The old process's rooms, every pending message already cut into their history.
    pub rooms: Vec<RoomState>,
}
