//! Business API: the private HTTP/1.1 listener that business servers use to publish to rooms,
//! read room info and scrape metrics. `http` turns bytes into request heads, requests and
//! responses into bytes; `access` decides from a head who may call; `server` owns the sockets and
//! threads, asks the [`Handler`] to admit each head before reading its body, then to handle the
//! request; `stats` counts what the listener does, for `/metrics`.
#![forbid(unsafe_code)]
pub mod access;
mod batch;
pub mod http;
mod publish;
mod replay;
mod rooms;
pub mod routes;
pub mod server;
pub mod stats;

pub use access::{Access, Denied};
pub use http::{HttpError, Limits, Method, Progress, Request, RequestHead, RequestReader, Response};
pub use server::{Handler, Server, ServerConfig};
pub use stats::{ServerCounters, ServerStats};
