//! The business API's front: admit the caller from the head (`access.rs`: API key, or loopback
//! when none is set), route the request to its resource (`publish.rs`, `rooms.rs`), and the
//! plumbing they share — mail to the shards and waiting for their answers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Duration;

use serde_json::json;

use super::access::{Access, Denied};
use super::http::{Method, Request, RequestHead, Response};
use super::server::Handler;
use super::stats::ServerCounters;
use crate::cluster::Cluster;
use crate::config::{Config, TypeDefaults};
use crate::hub::mail::{Mail, Reply};
use crate::ids::ShardId;
use crate::metrics::{self, Snapshot};
use crate::room::RoomName;
use crate::shard::mesh::Mesh;
use crate::store::Store;

/// How long an API request waits for the shards before answering 503.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The API handler.
pub struct Routes {
    pub(super) mesh: Arc<Mesh>,
    /// The config a drain's plan starts from.
    config: Config,
    metrics: Arc<[Snapshot]>,
    access: Access,
    pub(super) name_bytes_max: usize,
    pub(super) data_bytes_max: usize,
    /// Items in one `POST /v1/publish`.
    pub(super) batch_items_max: usize,
    /// `api.body_bytes_max`: also the longest line of a streamed publish.
    pub(super) body_bytes_max: usize,
    pub(super) types: BTreeMap<String, TypeDefaults>,
    pub(super) next_id: AtomicU64,
    /// Batch publishes' items by result: accepted, refused (here or by the owner).
    pub(super) batch_items: [AtomicU64; 2],
    pub(super) batches: AtomicU64,
    /// Streamed publishes (NDJSON, chunked) served.
    pub(super) streams: AtomicU64,
    /// Durable state (with `redis.url`): replay, and Redis's health.
    pub(super) store: Option<Arc<Store>>,
    /// The cluster link (with `cluster.enabled`): the live set, drains to peers.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// The business hooks (for their metrics).
    hooks: Option<Arc<crate::hooks::Hooks>>,
}

/// A response either way; `Err` short-circuits with `?`.
pub(super) type Answer = Result<Response, Response>;

impl Routes {
    pub fn new(config: &Config, mesh: Arc<Mesh>, metrics: Arc<[Snapshot]>, store: Option<Arc<Store>>) -> Routes {
        Routes {
            config: config.clone(),
            mesh,
            metrics,
            store,
            cluster: None,
            hooks: None,
            access: Access::new(&config.api.key),
            name_bytes_max: config.rooms.name_bytes_max,
            data_bytes_max: config.rooms.data_bytes_max,
            batch_items_max: config.api.batch_items_max,
            body_bytes_max: config.api.body_bytes_max,
            types: config.types.clone(),
            next_id: AtomicU64::new(0),
            batch_items: [AtomicU64::new(0), AtomicU64::new(0)],
            batches: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        }
    }

    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Routes {
        self.cluster = cluster;
        self
    }

    pub fn with_hooks(mut self, hooks: Option<Arc<crate::hooks::Hooks>>) -> Routes {
        self.hooks = hooks;
        self
    }

    fn route(&self, req: &Request, server: &ServerCounters) -> Answer {
        let (path, method) = (req.head.path.as_str(), req.head.method);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (get, post) = (matches!(method, Method::Get | Method::Head), matches!(method, Method::Post));
        let (put, delete) = (matches!(method, Method::Put), matches!(method, Method::Delete));
        match segments.as_slice() {
            ["healthz"] if get => Ok(self.health()),
            ["metrics"] if get => {
                Ok(Response::text(200, "text/plain; version=0.0.4", self.metrics_text(server).into_bytes()))
            }
            ["v1", "rooms"] if get => self.top_rooms(&req.head.query),
            ["v1", "rooms", room] if get => self.room_info(room),
            ["v1", "rooms", room, "messages"] if post => self.publish_room(room, req),
            ["v1", "rooms", room, "replay"] if get => self.replay(room, req),
            ["v1", "rooms", room, "moderation"] if get => self.moderation_lists(room),
            ["v1", "rooms", room, list @ ("kick" | "mutes" | "bans" | "whitelist")] if post => {
                self.moderate(room, list, None, req)
            }
            ["v1", "rooms", room, list @ ("mutes" | "bans" | "whitelist"), user] if delete => {
                self.moderate(room, list, Some(user), req)
            }
            ["v1", "rooms", room, "attributes"] if get => self.attributes(room),
            ["v1", "rooms", room, "attributes", key] if put || delete => self.set_attribute(room, key, req, delete),
            ["v1", "users", user, "messages"] if post => self.publish_user(user, req),
            ["v1", "broadcast"] if post => self.broadcast(req),
            ["v1", "publish"] if post => self.publish_batch(req),
            ["v1", "admin", "drain"] if get => Ok(self.drain_progress(200)),
            ["v1", "admin", "drain"] if post => self.drain(req),
            ["v1", "cluster"] if get => Ok(self.cluster_info()),
            ["healthz"]
            | ["metrics"]
            | ["v1", "rooms"]
            | ["v1", "rooms", _]
            | ["v1", "rooms", _, _]
            | ["v1", "rooms", _, _, _]
            | ["v1", "users", _, "messages"]
            | ["v1", "broadcast"]
            | ["v1", "publish"]
            | ["v1", "cluster"] => Err(Response::error(405, "method not allowed on this resource")),
            _ => Err(Response::error(404, &format!("no such resource: {path}"))),
        }
    }

    fn health(&self) -> Response {
        let connections: u64 = self.metrics.iter().map(|s| s.get(metrics::Series::Connections)).sum();
        let mut body = json!({"status": "ok", "shards": self.mesh.shards(), "connections": connections});
        if let Some(cluster) = &self.cluster {
            let link = cluster.link_up();
            body["cluster"] = json!({
                "node": cluster.me(),
                "nodes": cluster.members().live().len(),
                "up": cluster.up(),
                "link": link,
                "leases": cluster.leases_held(),
            });
            if !cluster.up() || !link {
                body["status"] = json!("degraded");
            }
        }
        if let Some(store) = &self.store {
            // Delivery goes on from memory while Redis is away; writes wait for it.
            let up = store.up();
            body["redis"] = json!(if up { "up" } else { "down" });
            if !up {
                body["status"] = json!("degraded");
            }
        }
        Response::json(200, &body)
    }

    /// `POST /v1/admin/drain` (body optional: `{url, reason, rate_per_s, deadline_ms, delay_ms,
    /// jitter_ms}` over the config's `[drain]`): every shard stops accepting and moves its
    /// clients off in waves. Answers 202 with the progress.
    fn drain(&self, req: &Request) -> Answer {
        let overrides: crate::drain::Overrides = if req.body.is_empty() {
            crate::drain::Overrides::default()
        } else {
            serde_json::from_slice(&req.body).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))?
        };
        let peers = self.cluster.as_ref().map(|c| c.peer_urls()).unwrap_or_default();
        let plan = crate::drain::plan(&self.config, self.mesh.shards(), overrides, &peers);
        crate::drain::start(&self.mesh, &plan);
        Ok(self.drain_progress(202))
    }

    /// `GET /v1/cluster`: this node and the live set as its last heartbeat read it (404 when
    /// the node is not in a cluster).
    fn cluster_info(&self) -> Response {
        let Some(cluster) = &self.cluster else {
            return Response::error(404, "not in a cluster (cluster.enabled is false)");
        };
        let m = cluster.members();
        let nodes: Vec<_> = m
            .live()
            .iter()
            .map(|n| json!({"id": n.id, "url": n.url, "expires_ms": n.expires_ms, "self": n.id == cluster.me()}))
            .collect();
        Response::json(
            200,
            &json!({"node": cluster.me(), "url": cluster.url(), "up": cluster.up(), "as_of_ms": m.as_of_ms(), "nodes": nodes}),
        )
    }

    fn drain_progress(&self, status: u16) -> Response {
        Response::json(status, &crate::drain::Progress::read(&self.metrics).json())
    }

    /// The shards' series, then the API listener's own.
    fn metrics_text(&self, server: &ServerCounters) -> String {
        let mut tail = server.snapshot().render();
        if let Some(store) = &self.store {
            store.stats().render(&mut tail);
        }
        if let Some(cluster) = &self.cluster {
            cluster.render(&mut tail);
        }
        self.render_batches(&mut tail);
        if let Some(hooks) = &self.hooks {
            hooks.render(&mut tail);
        }
        metrics::render(&self.metrics, &tail)
    }

    pub(super) fn room_name(&self, raw: &str) -> Result<RoomName, Response> {
        let name = percent_decode(raw).ok_or_else(|| Response::error(400, "bad percent-encoding in room"))?;
        RoomName::parse(&name, self.name_bytes_max).map_err(|e| Response::error(400, e.message()))
    }

    /// Sends one mail per shard and sums their counts.
    pub(super) fn to_every_shard(&self, mut mail: impl FnMut(Option<Reply<usize>>) -> Mail) -> Result<usize, Response> {
        let mut waits = Vec::with_capacity(self.mesh.shards());
        for i in 0..self.mesh.shards() {
            let (reply, rx) = reply_channel::<usize>();
            self.post(ShardId(i as u16), mail(Some(reply)))?;
            waits.push(rx);
        }
        waits.iter().map(wait).sum()
    }

    /// Where mail for a room's owner goes: its owner shard, or in a cluster the link when
    /// another node owns the room.
    pub(super) fn owner_of(&self, room: &RoomName) -> ShardId {
        let placement = self.cluster.as_ref().map(|c| c.placement().as_ref());
        crate::cluster::placement::route(room, self.mesh.shards(), placement)
    }

    /// In a cluster, hands mail for every node (direct and broadcast frames) to the link.
    pub(super) fn to_other_nodes(&self, mail: Mail) -> Result<(), Response> {
        match self.mesh.link() {
            Some(link) => self.post(link, mail),
            None => Ok(()),
        }
    }

    /// Posts mail to a shard; a full inbox is a 503 (the gateway is overloaded).
    pub(super) fn post(&self, to: ShardId, mail: Mail) -> Result<(), Response> {
        self.mesh.send(to, mail).map_err(|_| Response::error(503, "gateway busy: shard inbox full"))
    }
}

impl Handler for Routes {
    fn admit(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
        self.access.check(head, peer)
    }

    fn handle(&self, request: &Request, _peer: SocketAddr, server: &ServerCounters) -> Response {
        self.route(request, server).unwrap_or_else(|e| e)
    }

    /// `POST /v1/publish` with an NDJSON body sent chunked: a stream of items, answered as it
    /// goes (see `batch::publish_stream`).
    fn streams(&self, head: &RequestHead) -> Option<&'static str> {
        let ndjson = matches!(head.content_type.as_deref(), Some("application/x-ndjson" | "application/jsonl"));
        (head.method == Method::Post && head.path == "/v1/publish" && ndjson).then_some("application/x-ndjson")
    }

    fn stream(
        &self,
        _head: &RequestHead,
        body: &mut crate::api::server::BodyStream<'_>,
        out: &mut crate::api::server::StreamOut<'_>,
    ) -> std::io::Result<()> {
        self.publish_stream(body, out)
    }
}

pub(super) fn reply_channel<T>() -> (Reply<T>, Receiver<T>) {
    let (tx, rx) = sync_channel(1);
    (Reply(tx), rx)
}

pub(super) fn wait<T>(rx: &Receiver<T>) -> Result<T, Response> {
    rx.recv_timeout(SHARD_REPLY_TIMEOUT).map_err(|_| Response::error(503, "a shard did not answer in time"))
}

/// Decodes %XX escapes of a path segment; None for a bad escape or non-UTF-8 result.
pub(super) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%E4%BD%A0").as_deref(), Some("你"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
