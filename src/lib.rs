//! barrage: an io_uring, thread-per-core WebSocket message edge for live rooms.
//!
//! Data flow: `shard` (io_uring: accept, receive, send; runs `hub::turn`) → `hub::host` (one
//! shard's connections, sans-IO) → `wire` (RFC 6455 bytes ↔ events) → `envelope` (events ↔
//! protobuf/JSON frames) → `hub::mail` to the room's owner → `hub::desk` → `room` (the owner's
//! mixer cuts and encodes a block once) → `hub::mail` to every shard with members →
//! `hub::host::outbox` (one encoded frame, many queues) → `shard` (one send per connection).
//! `api` feeds the shards over the `shard::mesh`.
//!
//! `unsafe` lives in `shard` only (io_uring, the buffer ring, sendmsg, syscalls); every other
//! module forbids it, and every unsafe block says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]
pub mod api;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod doctor;
pub mod drain;
pub mod envelope;
pub mod gateway;
pub mod hooks;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod proto;
pub mod room;
pub mod shard;
pub mod store;
pub mod tls;
pub mod upgrade;
pub mod wire;
