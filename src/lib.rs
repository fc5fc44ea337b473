//! barrage: an io_uring, thread-per-core WebSocket message edge for live rooms.
pub mod api;
pub mod auth;
pub mod proto;
