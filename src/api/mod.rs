//! Business API: the private HTTP/1.1 listener that business servers use to publish to rooms,
//! read room info and scrape metrics. `http` turns bytes into requests and responses into bytes;
//! `server` owns the sockets and threads and calls a [`Handler`] per request.
#![forbid(unsafe_code)]
pub mod http;
mod publish;
mod rooms;
pub mod routes;
pub mod server;

pub use http::{HttpError, Limits, Method, Progress, Request, RequestHead, RequestReader, Response};
pub use server::{Handler, Server, ServerConfig, ServerStats};
