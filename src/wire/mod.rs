//! The WebSocket wire (RFC 6455), sans-IO: bytes a socket read go in, events and bytes to write
//! come out. The shard owns the sockets and the clock; nothing here does I/O or reads time.
//!
//! Data flow for one connection: behind a balancer, [`proxy`] first takes the PROXY v2 header
//! naming the client; [`handshake`] parses the upgrade request and builds the
//! response; then [`reader`] turns client bytes into [`reader::Event`]s (using [`frame`] to decode
//! headers and unmask), and [`frame`] builds the server's frames; [`close`] names close codes.
#![forbid(unsafe_code)]

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod proxy;
pub mod reader;

pub use close::CloseCode;
pub use frame::{Header, Opcode};
pub use handshake::{HandshakeError, HandshakeLimits, Parsed, Request, Subprotocol, Upgrade};
pub use reader::{Event, Flow, ReadError, ReadLimits, Reader};
