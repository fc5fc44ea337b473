//! Business API: the private HTTP/1.1 listener that business servers use to publish to rooms,
//! read room info and scrape metrics. `http` turns bytes into requests and responses into bytes;
//! the server (next) owns the sockets and threads.
pub mod http;
// pub mod routes; — the handler: API key check, routes, JSON/protobuf bodies, gateway glue.

pub use http::{HttpError, Limits, Method, Progress, Request, RequestReader, Response};
