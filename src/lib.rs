//! barrage: an io_uring, thread-per-core WebSocket message edge for live rooms.
pub mod proto;
pub mod wire;
