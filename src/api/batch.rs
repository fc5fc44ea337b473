//! `POST /v1/publish`: many messages to many rooms, users and everyone in one body — a JSON
//! array, a protobuf `PublishBatch`, or newline-delimited JSON (one item per line) — with one
//! result per item, in order. Each item passes the same checks as a single publish; the room
//! items bound for one owner shard travel as one mail (`OwnerMail::PublishBatch`), so the cost
//! per message is the owner's push, not a request, a mail and a wait.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::io::Write as _;

use prost::Message as _;
use serde_json::Value;

use super::http::{Request, Response};
use super::publish::{PublishJson, USER_BYTES_MAX, decode_json};
use super::routes::{Answer, Routes, reply_channel, wait};
use super::server::{BodyStream, StreamOut};
use crate::hub::mail::{BatchItem, HostMail, OwnerMail};
use crate::ids::{ShardId, UserId};
use crate::proto::{Broadcast, Direct, PublishBatch, server_frame};
use crate::room::owner::{PublishError, Published};
use crate::room::{Priority, RoomName};

/// The non-blank lines of an NDJSON text.
fn ndjson_lines(text: &[u8]) -> Vec<&[u8]> {
    text.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).collect()
}

/// Where one item goes.
enum Target {
    Room(crate::room::RoomName),
    User(String),
    Broadcast,
}

/// An item as checked: where it goes and what, or why it was refused before going anywhere.
type Checked = Result<(Target, crate::proto::Message, Option<Priority>), Response>;

impl Routes {
    pub(super) fn publish_batch(&self, req: &Request) -> Answer {
        let ndjson = matches!(req.head.content_type.as_deref(), Some("application/x-ndjson" | "application/jsonl"));
        let items: Vec<Checked> = match req.head.content_type.as_deref() {
            Some("application/x-protobuf" | "application/protobuf") => {
                let batch = PublishBatch::decode(req.body.as_slice())
                    .map_err(|e| Response::error(400, &format!("bad PublishBatch: {e}")))?;
                self.batch_limit(batch.items.len())?;
                batch.items.into_iter().map(|item| self.proto_item(item)).collect()
            }
            _ if ndjson => {
                let lines = ndjson_lines(&req.body);
                self.batch_limit(lines.len())?;
                lines.into_iter().map(|line| self.ndjson_item(line)).collect()
            }
            _ => {
                let items: Vec<PublishJson> = serde_json::from_slice(&req.body)
                    .map_err(|e| Response::error(400, &format!("bad JSON batch (an array of items): {e}")))?;
                self.batch_limit(items.len())?;
                items.into_iter().map(|item| self.json_item(item)).collect()
            }
        };
        let results = self.deliver_batch(items)?;
        let accepted = self.count_batch(&results);
        // Rendered by hand: a result per message is the batch's largest cost after the push.
        let mut body = Vec::with_capacity(results.len() * 26 + 48);
        if ndjson {
            for r in &results {
                r.write(&mut body);
                body.push(b'\n');
            }
            return Ok(Response::text(200, "application/x-ndjson", body));
        }
        let _ = write!(body, r#"{{"accepted":{accepted},"refused":{},"results":["#, results.len() - accepted);
        for (i, r) in results.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            r.write(&mut body);
        }
        body.extend_from_slice(b"]}");
        Ok(Response::text(200, "application/json", body))
    }

    /// A stream of NDJSON items (`POST /v1/publish`, chunked): each chunk's complete lines go
    /// out as one batch (several when over `api.batch_items_max`), and their results, one line
    /// each in order, come back as one chunk of the answer. A line may span chunks; one longer
    /// than `api.body_bytes_max` ends the stream (413). Memory stays within one chunk and one
    /// partial line, however long the stream runs.
    pub(super) fn publish_stream(&self, body: &mut BodyStream<'_>, out: &mut StreamOut<'_>) -> std::io::Result<()> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        let mut partial: Vec<u8> = Vec::new();
        let mut answer = Vec::new();
        while let Some(chunk) = body.next_chunk()? {
            partial.extend_from_slice(&chunk);
            let Some(end) = partial.iter().rposition(|&b| b == b'\n').map(|i| i + 1) else {
                if partial.len() > self.body_bytes_max {
                    Outcome::Refused(413, "an NDJSON line is longer than api.body_bytes_max".into()).write(&mut answer);
                    answer.push(b'\n');
                    return out.chunk(&answer);
                }
                continue;
            };
            self.stream_lines(&partial[..end], &mut answer);
            out.chunk(&answer)?;
            answer.clear();
            partial.drain(..end);
        }
        // A last line without its newline.
        self.stream_lines(&partial, &mut answer);
        out.chunk(&answer)
    }

    /// Publishes complete NDJSON lines in batches of at most `api.batch_items_max`, a result
    /// line per item into `answer`.
    fn stream_lines(&self, text: &[u8], answer: &mut Vec<u8>) {
        for group in ndjson_lines(text).chunks(self.batch_items_max) {
            let items: Vec<Checked> = group.iter().map(|line| self.ndjson_item(line)).collect();
            let results = match self.deliver_batch(items) {
                Ok(results) => results,
                // The gateway could not take the batch (an inbox full, a shard late): every item
                // of it gets that answer, and the stream goes on.
                Err(r) => (0..group.len()).map(|_| Outcome::refused(&r)).collect(),
            };
            self.count_batch(&results);
            for r in &results {
                r.write(answer);
                answer.push(b'\n');
            }
        }
    }

    fn ndjson_item(&self, line: &[u8]) -> Checked {
        match serde_json::from_slice::<PublishJson>(line) {
            Ok(item) => self.json_item(item),
            Err(e) => Err(Response::error(400, &format!("bad item: {e}"))),
        }
    }

    /// Counts an answered batch; returns its accepted items.
    fn count_batch(&self, results: &[Outcome]) -> usize {
        let accepted = results.iter().filter(|r| matches!(r, Outcome::Published(..) | Outcome::Sent(..))).count();
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_items[0].fetch_add(accepted as u64, Ordering::Relaxed);
        self.batch_items[1].fetch_add((results.len() - accepted) as u64, Ordering::Relaxed);
        accepted
    }

    /// Prometheus text of the batch counters.
    pub(super) fn render_batches(&self, out: &mut String) {
        use std::fmt::Write as _;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP barrage_api_batches_total Batch publishes answered (POST /v1/publish).\n# TYPE barrage_api_batches_total counter\nbarrage_api_batches_total {}\n# HELP barrage_api_batch_items_total Batch items by result: accepted, or refused (by the checks here or by the room's owner; the owner's reasons are in barrage_messages_dropped_total).\n# TYPE barrage_api_batch_items_total counter\nbarrage_api_batch_items_total{{result=\"accepted\"}} {}\nbarrage_api_batch_items_total{{result=\"refused\"}} {}",
            get(&self.batches),
            get(&self.batch_items[0]),
            get(&self.batch_items[1])
        );
        let _ = writeln!(
            out,
            "# HELP barrage_api_streams_total Streamed publishes (NDJSON sent chunked to POST /v1/publish) served.\n# TYPE barrage_api_streams_total counter\nbarrage_api_streams_total {}",
            get(&self.streams)
        );
    }

    fn batch_limit(&self, n: usize) -> Result<(), Response> {
        match n > self.batch_items_max {
            true => Err(Response::error(413, &format!("a batch holds at most {} items", self.batch_items_max))),
            false => Ok(()),
        }
    }

    fn json_item(&self, mut item: PublishJson) -> Checked {
        let (room, user) = (item.room.take(), item.user.take());
        let target = self.target(room.as_deref(), user.as_deref(), item.broadcast.take().unwrap_or(false))?;
        let (msg, priority) = decode_json(item)?;
        Ok((target, self.check(msg)?, priority))
    }

    fn proto_item(&self, item: crate::proto::PublishItem) -> Checked {
        use crate::proto::publish_item::Target as T;
        let target = match &item.target {
            Some(T::Room(r)) => self.target(Some(r), None, false)?,
            Some(T::User(u)) => self.target(None, Some(u), false)?,
            Some(T::Broadcast(b)) => self.target(None, None, *b)?,
            None => self.target(None, None, false)?,
        };
        let (msg, priority) = super::publish::decode_proto(item.message.unwrap_or_default())?;
        Ok((target, self.check(msg)?, priority))
    }

    fn target(&self, room: Option<&str>, user: Option<&str>, broadcast: bool) -> Result<Target, Response> {
        match (room, user, broadcast) {
            (Some(r), None, false) => Ok(Target::Room(self.item_room(r)?)),
            (None, Some(u), false) if !u.is_empty() && u.len() <= USER_BYTES_MAX => Ok(Target::User(u.to_owned())),
            (None, Some(_), false) => Err(Response::error(400, "user id must be 1..=128 bytes")),
            (None, None, true) => Ok(Target::Broadcast),
            _ => Err(Response::error(400, "an item names exactly one of room, user, broadcast")),
        }
    }

    /// A room named in a batch item: a plain string, not a path segment (no percent-decoding).
    fn item_room(&self, name: &str) -> Result<RoomName, Response> {
        RoomName::parse(name, self.name_bytes_max).map_err(|e| Response::error(400, e.message()))
    }

    /// Sends the checked items: room items in one mail per owner shard (one batch per owner
    /// node, through the cluster link, for rooms other nodes own), direct and broadcast items as
    /// single ones; results in order.
    fn deliver_batch(&self, items: Vec<Checked>) -> Result<Vec<Outcome>, Response> {
        let n = items.len();
        let mut results: Vec<Outcome> = (0..n).map(|_| Outcome::Lost).collect();
        let shards = self.mesh.shards();
        // Per owner shard: the items' positions and the items.
        let mut per_shard: Vec<(Vec<usize>, Vec<BatchItem>)> = (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
        let mut forwarded = Vec::new();
        let mut others = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Err(refusal) => results[i] = Outcome::refused(&refusal),
                Ok((Target::Room(room), msg, priority)) => match self.owner_of(&room) {
                    to if to.index() < shards => {
                        per_shard[to.index()].0.push(i);
                        per_shard[to.index()].1.push((room, msg, priority));
                    }
                    link => forwarded.push((i, link, room, msg, priority)),
                },
                Ok((target, msg, priority)) => others.push((i, target, msg, priority)),
            }
        }
        let mut waits = Vec::new();
        for (s, (positions, batch)) in per_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let (reply, rx) = reply_channel::<Vec<Result<Published, PublishError>>>();
            self.post(ShardId(s as u16), OwnerMail::PublishBatch { items: batch, reply }.into())?;
            waits.push((positions, rx));
        }
        // Rooms other nodes own: one batch per owner node, through the link.
        let mut per_node: std::collections::HashMap<String, (ShardId, Vec<usize>, Vec<BatchItem>)> =
            std::collections::HashMap::new();
        for (i, link, room, msg, priority) in forwarded {
            let node = self.cluster.as_ref().and_then(|c| c.placement().owner_node(room.as_str())).unwrap_or_default();
            let entry = per_node.entry(node).or_insert_with(|| (link, Vec::new(), Vec::new()));
            entry.1.push(i);
            entry.2.push((room, msg, priority));
        }
        for (_, (link, positions, batch)) in per_node {
            let (reply, rx) = reply_channel::<Vec<Result<Published, PublishError>>>();
            self.post(link, OwnerMail::PublishBatch { items: batch, reply }.into())?;
            waits.push((positions, rx));
        }
        for (positions, rx) in waits {
            let answers = wait(&rx)?;
            for (i, answer) in positions.into_iter().zip(answers) {
                results[i] = Outcome::from(answer);
            }
        }
        for (i, target, msg, priority) in others {
            results[i] = self.direct_or_broadcast(target, msg, priority)?;
        }
        Ok(results)
    }

    /// A direct or broadcast item, as `POST /v1/users/{user}/messages` and `/v1/broadcast` do.
    fn direct_or_broadcast(
        &self,
        target: Target,
        msg: crate::proto::Message,
        priority: Option<Priority>,
    ) -> Result<Outcome, Response> {
        let (msg, class) = self.stamp(msg, priority);
        let id = msg.id;
        let n = match target {
            Target::User(user) => {
                let frame = super::publish::shared(server_frame::Frame::Direct(Direct { message: Some(msg) }), class);
                let user = UserId::new(&user);
                let n = self.to_every_shard(|reply| {
                    HostMail::ToUser { user: user.clone(), frame: Arc::clone(&frame), reply }.into()
                })?;
                self.to_other_nodes(HostMail::ToUser { user, frame, reply: None }.into())?;
                n
            }
            _ => {
                let frame =
                    super::publish::shared(server_frame::Frame::Broadcast(Broadcast { message: Some(msg) }), class);
                let n = self.to_every_shard(|reply| HostMail::ToAll { frame: Arc::clone(&frame), reply }.into())?;
                self.to_other_nodes(HostMail::ToAll { frame, reply: None }.into())?;
                n
            }
        };
        Ok(Outcome::Sent(id, n))
    }
}

/// One item's result.
enum Outcome {
    /// Into a room: its id, and whether it replaced a pending message.
    Published(u64, bool),
    /// Direct or broadcast: its id and the connections it reached on this node.
    Sent(u64, usize),
    Refused(u16, String),
    /// No answer came for it (never: every item gets one; kept total for the type).
    Lost,
}

impl Outcome {
    /// An item refused before it went anywhere: the status and message a single publish
    /// answers.
    fn refused(r: &Response) -> Outcome {
        let message = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
        Outcome::Refused(r.status, message)
    }

    fn write(&self, out: &mut Vec<u8>) {
        let _ = match self {
            Outcome::Published(id, false) => write!(out, r#"{{"id":"{id}"}}"#),
            Outcome::Published(id, true) => write!(out, r#"{{"id":"{id}","coalesced":true}}"#),
            Outcome::Sent(id, n) => write!(out, r#"{{"id":"{id}","connections":{n}}}"#),
            Outcome::Refused(status, why) => {
                write!(out, r#"{{"status":{status},"error":{}}}"#, Value::String(why.clone()))
            }
            Outcome::Lost => write!(out, r#"{{"status":503,"error":"no answer"}}"#),
        };
    }
}

impl From<Result<Published, PublishError>> for Outcome {
    fn from(r: Result<Published, PublishError>) -> Outcome {
        match r {
            Ok(p) => Outcome::Published(p.id, p.coalesced),
            Err(e) => {
                let (status, why) = e.code();
                Outcome::Refused(status, why.to_owned())
            }
        }
    }
}
