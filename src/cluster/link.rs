//! The cluster link: one thread per node between its shards and Redis pub/sub.
//!
//! Shards (and API threads) address it like one more shard (`Placement::link`): mail for a
//! room another node owns arrives here and is relayed to that node's channel; a local owner's
//! frames for members on other nodes arrive here (its member slot) and are published once on
//! the room's channel. From Redis it takes requests for rooms this node owns (each becomes the
//! same mail a local shard would have sent, its answer relayed back), answers to what it
//! forwarded, frames of rooms it has members in (handed to every shard as they are: the
//! owner's bytes), and cluster-wide kicks, replicas, direct and broadcast frames.
//!
//! It also keeps this node's room leases alive (`lease`). Nothing here blocks a shard: the
//! shards meet it through the mesh's bounded inbox, and everything it holds is bounded by
//! `cluster.relay_queue_max` and `cluster.asks_max`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

use prost::Message as _;

use super::lease::{Leases, Take};
use super::placement::Placement;
use super::relay::{self, Answer, Asker, Body, Channels, Relay};
use super::resp::{self, Push};
use crate::hub::mail::{AttrsSnapshot, BatchItem, ConnAt, HostMail, Mail, Origin, OwnerMail, Reply};
use crate::ids::{ConnId, ConnKey, ShardId, UserId};
use crate::room::RoomName;
use crate::room::attrs::AttrError;
use crate::room::moderation::ModerationError;
use crate::room::owner::{ModerationLists, PublishError, Published, RoomInfo};
use crate::shard::mesh::Mesh;

/// Mail taken from the inbox per loop turn.
const MAIL_PER_TURN: usize = 4_096;
/// Messages published per pipeline.
const PUBLISH_BATCH: usize = 512;
/// Leases renewed per script run.
const RENEW_BATCH: usize = 256;
/// A relayed request passes at most this many nodes that do not own its room.
const HOPS_MAX: u32 = 2;
/// The largest payload read from Redis.
const PAYLOAD_MAX: usize = 64 << 20;
const IDLE: Duration = Duration::from_millis(1);
/// The longest sleep with nothing pending.
const IDLE_MAX: Duration = Duration::from_millis(50);
/// How often owed answers are looked for while any are.
const OWED_POLL: Duration = Duration::from_micros(100);
const BACKOFF_MIN: Duration = Duration::from_millis(50);

/// The link's bounds and timings.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub relay_queue_max: usize,
    pub asks_max: usize,
    pub ask_timeout: Duration,
    pub timeout: Duration,
    pub backoff_max: Duration,
}

/// What the link counts (rendered with the cluster's metrics).
#[derive(Default)]
pub struct LinkStats {
    pub up: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub frames_out: AtomicU64,
    pub frames_in: AtomicU64,
    pub dropped: AtomicU64,
    pub asks_expired: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    pub errors: AtomicU64,
    pub subscriptions: AtomicU64,
    pub renewals: AtomicU64,
    pub lost: AtomicU64,
    pub resyncs_out: AtomicU64,
    pub resyncs_in: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Everything the thread needs, fixed at start.
pub struct Link {
    pub me: String,
    pub channels: Channels,
    pub mesh: Arc<Mesh>,
    pub placement: Arc<Placement>,
    pub leases: Arc<Leases>,
    pub client: redis::Client,
    pub cfg: LinkConfig,
    pub stats: Arc<LinkStats>,
    pub stop: Arc<AtomicBool>,
}

/// A local owner's answers to a batch, in its items' order.
type BatchAnswers = Vec<Result<Published, PublishError>>;

/// One room's members on other nodes, per (node, shard): (members, json, deflate,
/// deflate_json), as in `OwnerMail::Presence`.
type RemoteMembers = HashMap<(String, u32), [u32; 4]>;

/// Who waits on this node for an API call forwarded to an owner node.
enum Waiter {
    Publish(Reply<Result<Published, PublishError>>),
    Batch(Reply<Vec<Result<Published, PublishError>>>, usize),
    Moderate(Reply<Result<(), ModerationError>>),
    SetAttr(Reply<Result<u64, AttrError>>),
    Info(Reply<RoomInfo>),
    Lists(Reply<ModerationLists>),
    Attrs(Reply<AttrsSnapshot>),
}

impl Waiter {
    fn answer(self, a: Answer) {
        match self {
            Waiter::Publish(r) => r.send(match a.error {
                Some(e) => Err(relay::publish_error(e)),
                None => Ok(Published { id: a.id, coalesced: a.coalesced }),
            }),
            Waiter::Batch(r, n) => {
                let mut results: Vec<_> = a
                    .results
                    .into_iter()
                    .map(|x| match x.error {
                        Some(e) => Err(relay::publish_error(e)),
                        None => Ok(Published { id: x.id, coalesced: x.coalesced }),
                    })
                    .collect();
                // An answer short of items (never from this build) leaves the rest to retry.
                results.resize(n, Err(PublishError::HandedOver));
                r.send(results)
            }
            Waiter::Moderate(r) => r.send(a.error.map_or(Ok(()), |e| Err(relay::moderation_error(e)))),
            Waiter::SetAttr(r) => r.send(a.error.map_or(Ok(a.version), |e| Err(relay::attr_error(e)))),
            Waiter::Info(r) => r.send(RoomInfo { online: a.online, last_seq: a.last_seq, pending: a.pending as usize }),
            Waiter::Lists(r) => r.send(relay::lists_in(a.entries)),
            Waiter::Attrs(r) => {
                r.send((a.version, a.attrs.into_iter().filter(|e| !e.deleted).map(|e| (e.key, e.value)).collect()))
            }
        }
    }

    /// The owner could not be asked: a refusal meaning "retry" where the call has one.
    fn refuse(self) {
        match self {
            Waiter::Publish(r) => r.send(Err(PublishError::HandedOver)),
            Waiter::Batch(r, n) => r.send(vec![Err(PublishError::HandedOver); n]),
            Waiter::Moderate(r) => r.send(Err(ModerationError::Busy)),
            Waiter::SetAttr(r) => r.send(Err(AttrError::HandedOver)),
            // Reads have no refusal: the API answers 503 when they time out.
            Waiter::Info(_) | Waiter::Lists(_) | Waiter::Attrs(_) => {}
        }
    }
}

/// A top-rooms call: the other nodes' rooms, merged as they answer.
struct Gather {
    reply: Reply<Vec<(RoomName, u64)>>,
    waiting: usize,
    rooms: Vec<(RoomName, u64)>,
    deadline: Instant,
}

/// An answer this node owes another: polled until the local owner replies.
struct Owed {
    node: String,
    deadline: Instant,
    poll: Box<dyn FnMut() -> Option<Answer> + Send>,
}

/// Connections on other nodes waiting for this node's owners, by a ConnId of the link's own
/// (its slot and a generation), so a late answer for a reused slot is dropped.
struct Tokens {
    slots: Vec<Option<(String, Asker)>>,
    generations: Vec<u32>,
    next: usize,
}

impl Tokens {
    fn new(n: usize) -> Tokens {
        Tokens { slots: vec![None; n], generations: vec![0; n], next: 0 }
    }

    fn issue(&mut self, node: &str, asker: Asker) -> ConnId {
        let i = self.next;
        self.next = (self.next + 1) % self.slots.len();
        self.generations[i] = self.generations[i].wrapping_add(1);
        self.slots[i] = Some((node.to_owned(), asker));
        ConnId { key: ConnKey(i as u32), generation: self.generations[i] }
    }

    fn get(&self, id: ConnId) -> Option<&(String, Asker)> {
        let i = id.key.0 as usize;
        (self.generations.get(i) == Some(&id.generation)).then(|| self.slots[i].as_ref()).flatten()
    }
}

/// The subscriber connection: raw RESP, read without blocking.
struct Sub {
    stream: TcpStream,
    buf: Vec<u8>,
}

struct State<'a> {
    link: &'a Link,
    shards: usize,
    out: VecDeque<(String, Vec<u8>)>,
    /// Control mail for shards whose inbox was full, tried again every turn.
    to_shards: VecDeque<(ShardId, Mail)>,
    asks: HashMap<u64, (Waiter, Instant)>,
    next_req: u64,
    /// Top-rooms calls waiting for every other node's answer.
    gathers: HashMap<u64, Gather>,
    owed: Vec<Owed>,
    tokens: Tokens,
    /// Members here of rooms other nodes own, per shard: the rooms whose channel to follow.
    local: HashMap<RoomName, HashMap<u16, u32>>,
    /// Members elsewhere of rooms this node owns, per (node, shard).
    remote: HashMap<RoomName, RemoteMembers>,
    subscribed: HashSet<String>,
    sub: Option<Sub>,
    con: Option<redis::Connection>,
    next_connect: Instant,
    backoff: Duration,
    next_renew: Instant,
    generation: u64,
}

impl Link {
    /// The thread's body; returns when `stop` is set.
    pub fn run(&self) {
        let mut s = State {
            link: self,
            shards: self.mesh.shards(),
            out: VecDeque::new(),
            to_shards: VecDeque::new(),
            asks: HashMap::new(),
            next_req: 1,
            gathers: HashMap::new(),
            owed: Vec::new(),
            tokens: Tokens::new(self.cfg.asks_max),
            local: HashMap::new(),
            remote: HashMap::new(),
            subscribed: HashSet::new(),
            sub: None,
            con: None,
            next_connect: Instant::now(),
            backoff: BACKOFF_MIN,
            next_renew: Instant::now(),
            generation: self.placement.generation(),
        };
        let Some(inbox) = self.mesh.link() else { return };
        while !self.stop.load(Ordering::Acquire) {
            let mut busy = false;
            for _ in 0..MAIL_PER_TURN {
                let Some(mail) = self.mesh.inbox(inbox).pop() else { break };
                busy = true;
                s.outgoing(mail);
            }
            let generation = self.placement.generation();
            if generation != s.generation {
                s.generation = generation;
                s.placement_changed();
            }
            s.connect();
            busy |= s.read();
            s.collect_owed();
            busy |= s.publish();
            s.retry_shards();
            s.renew();
            s.expire();
            if !busy {
                s.wait(inbox);
            }
        }
    }
}

impl State<'_> {
    /// Sleeps until mail or Redis bytes arrive: the inbox's eventfd (written by a sender that
    /// finds the link asleep) and the subscriber socket, polled. While answers are owed (they
    /// come on reply channels, which wake nobody) or something waits to be sent, at most a
    /// millisecond (`OWED_POLL` for answers); otherwise up to `IDLE_MAX`, so renewals and
    /// expiries still run.
    fn wait(&mut self, inbox: ShardId) {
        let mailbox = self.link.mesh.inbox(inbox);
        if !mailbox.prepare_sleep() {
            return;
        }
        // Answers owed come on reply channels that wake nobody: looked at often, as a forwarded
        // call's round trip waits on them.
        let timeout = if !self.owed.is_empty() {
            OWED_POLL
        } else if !self.out.is_empty() || !self.to_shards.is_empty() || self.sub.is_none() {
            IDLE
        } else {
            IDLE_MAX
        };
        let timeout = rustix::event::Timespec { tv_sec: 0, tv_nsec: timeout.as_nanos() as i64 };
        let wake = mailbox.wake_file();
        let flags = rustix::event::PollFlags::IN;
        let _ = match &self.sub {
            Some(sub) => {
                let mut fds = [rustix::event::PollFd::new(wake, flags), rustix::event::PollFd::new(&sub.stream, flags)];
                rustix::event::poll(&mut fds, Some(&timeout))
            }
            None => rustix::event::poll(&mut [rustix::event::PollFd::new(wake, flags)], Some(&timeout)),
        };
        // Drains the eventfd (nonblocking: nothing to read is fine).
        let mut counter = [0u8; 8];
        let _ = (&*wake).read(&mut counter);
        mailbox.woke();
    }

    // ---- from this node's shards and API threads ----

    fn outgoing(&mut self, mail: Mail) {
        match mail {
            Mail::Owner(m) => self.forward(m, 0),
            Mail::Host(m) => self.owner_mail(m),
        }
    }

    /// A request for a room another node owns: relayed to it (or, if the room became this
    /// node's meanwhile, handed to its owner shard here).
    fn forward(&mut self, mail: OwnerMail, hops: u32) {
        let Some(room) = room_of(&mail) else {
            // Top rooms asks every other node; a batch goes to the node that owns its rooms (the
            // API grouped them); flush and export are node-local.
            match mail {
                OwnerMail::TopRooms { n, reply } => self.gather_top(n, reply),
                OwnerMail::PublishBatch { items, reply } => self.forward_batch(items, reply),
                _ => {}
            }
            return;
        };
        if let OwnerMail::Presence { room, from, members, .. } = &mail {
            self.track_local(room.clone(), from.0, *members);
        }
        let Some(node) = self.link.placement.owner_node(room.as_str()) else {
            let to = room.owner(self.shards);
            self.mail_shard(to, mail.into());
            return;
        };
        let Some(body) = self.request_body(mail) else { return };
        self.send_to(&self.link.channels.node(&node), body, hops);
    }

    /// The relayed form of a request; API callers wait in `asks` (refused when it is full).
    fn request_body(&mut self, mail: OwnerMail) -> Option<Body> {
        let conn = |from: ConnAt| Asker {
            req: 0,
            shard: u32::from(from.shard.0),
            key: from.conn.key.0,
            generation: from.conn.generation,
        };
        Some(match mail {
            OwnerMail::Publish { room, msg, priority, reply } => {
                let asker = self.ask(Waiter::Publish(reply))?;
                Body::Publish(relay::Publish {
                    room: room.as_str().into(),
                    msg: Some(*msg),
                    priority: relay::priority_code(priority),
                    asker: Some(asker),
                })
            }
            OwnerMail::Send { room, msg, user, weight, priority, from, ack } => Body::Send(relay::Send {
                room: room.as_str().into(),
                msg: Some(*msg),
                user: user.as_str().into(),
                weight,
                priority: relay::priority_code(Some(priority)),
                asker: Some(conn(from)),
                ack: ack.map(String::from).unwrap_or_default(),
            }),
            OwnerMail::Presence { room, from, members, json, deflate, deflate_json, left, left_users } => {
                Body::Presence(relay::Presence {
                    room: room.as_str().into(),
                    shard: u32::from(from.0),
                    members,
                    json,
                    deflate,
                    deflate_json,
                    left,
                    left_users: left_users.iter().map(|u| u.as_str().to_owned()).collect(),
                })
            }
            OwnerMail::Joined { room, from, user, after } => Body::Joined(relay::Joined {
                room: room.as_str().into(),
                user: user.map(|u| u.as_str().to_owned()),
                after,
                asker: Some(conn(from)),
            }),
            OwnerMail::Poll { room, after, limit, from } => Body::Poll(relay::Poll {
                room: room.as_str().into(),
                after,
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
                asker: Some(conn(from)),
            }),
            OwnerMail::AttrSync { room, after, from } => {
                Body::AttrSync(relay::AttrSync { room: room.as_str().into(), after, asker: Some(conn(from)) })
            }
            OwnerMail::Moderate { room, user, action, reason, origin } => {
                let asker = match origin {
                    Origin::Api(reply) => self.ask(Waiter::Moderate(reply))?,
                    Origin::Conn(at) => conn(at),
                };
                let (action, until_ms) = relay::action_code(action);
                Body::Moderate(relay::Moderate {
                    room: room.as_str().into(),
                    user: user.as_str().into(),
                    action,
                    until_ms,
                    reason: reason.to_string(),
                    asker: Some(asker),
                })
            }
            OwnerMail::SetAttr { room, key, value, origin } => {
                let asker = match origin {
                    Origin::Api(reply) => self.ask(Waiter::SetAttr(reply))?,
                    Origin::Conn(at) => conn(at),
                };
                Body::SetAttr(relay::SetAttr { room: room.as_str().into(), key, value, asker: Some(asker) })
            }
            OwnerMail::RoomInfo { room, reply } => self.query(room, relay::QUERY_INFO, Waiter::Info(reply))?,
            OwnerMail::ModerationList { room, reply } => self.query(room, relay::QUERY_LISTS, Waiter::Lists(reply))?,
            OwnerMail::Attrs { room, reply } => self.query(room, relay::QUERY_ATTRS, Waiter::Attrs(reply))?,
            OwnerMail::TopRooms { .. }
            | OwnerMail::PublishBatch { .. }
            | OwnerMail::Flush
            | OwnerMail::Export { .. }
            | OwnerMail::Thaw
            | OwnerMail::Loaded { .. }
            | OwnerMail::Held { .. }
            | OwnerMail::LeaseLost { .. } => return None,
        })
    }

    /// A batch's items for rooms one other node owns (the API grouped them): one relayed
    /// message, one answer with a result per item. Items whose room the receiver does not own
    /// (the set moved meanwhile) come back refused with "retry".
    fn forward_batch(&mut self, items: Vec<BatchItem>, reply: Reply<Vec<Result<Published, PublishError>>>) {
        let node = items.first().and_then(|(room, _, _)| self.link.placement.owner_node(room.as_str()));
        let Some(node) = node else {
            reply.send(vec![Err(PublishError::HandedOver); items.len()]);
            return;
        };
        let Some(asker) = self.ask(Waiter::Batch(reply, items.len())) else { return };
        let items = items
            .into_iter()
            .map(|(room, msg, priority)| relay::Publish {
                room: room.as_str().into(),
                msg: Some(msg),
                priority: relay::priority_code(priority),
                asker: None,
            })
            .collect();
        let body = Body::PublishBatch(relay::PublishBatch { items, asker: Some(asker) });
        self.send_to(&self.link.channels.node(&node), body, 0);
    }

    /// Asks every other live node for its top `n` owned rooms; the reply is sent once all
    /// answered or half the ask timeout passed (the local owners answer the API directly).
    fn gather_top(&mut self, n: usize, reply: Reply<Vec<(RoomName, u64)>>) {
        let members = self.link.placement.members();
        let peers: Vec<String> = members.live().iter().filter(|p| p.id != self.link.me).map(|p| p.id.clone()).collect();
        if peers.is_empty() {
            reply.send(Vec::new());
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let deadline = Instant::now() + self.link.cfg.ask_timeout / 2;
        self.gathers.insert(req, Gather { reply, waiting: peers.len(), rooms: Vec::new(), deadline });
        for peer in peers {
            let query = relay::Query {
                room: n.to_string(),
                kind: relay::QUERY_TOP,
                asker: Some(Asker { req, ..Asker::default() }),
            };
            self.send_to(&self.link.channels.node(&peer), Body::Query(query), 0);
        }
    }

    fn query(&mut self, room: RoomName, kind: u32, waiter: Waiter) -> Option<Body> {
        let asker = self.ask(waiter)?;
        Some(Body::Query(relay::Query { room: room.as_str().into(), kind, asker: Some(asker) }))
    }

    /// Registers an API caller; None (and refused) when `asks_max` wait already.
    fn ask(&mut self, waiter: Waiter) -> Option<Asker> {
        if self.asks.len() >= self.link.cfg.asks_max {
            add(&self.link.stats.refused, 1);
            waiter.refuse();
            return None;
        }
        let req = self.next_req;
        self.next_req += 1;
        self.asks.insert(req, (waiter, Instant::now() + self.link.cfg.ask_timeout));
        Some(Asker { req, ..Asker::default() })
    }

    /// Mail from a local owner for members elsewhere, or answers for connections elsewhere.
    fn owner_mail(&mut self, mail: HostMail) {
        let channels = &self.link.channels;
        match mail {
            HostMail::Deliver { room, frame } => {
                add(&self.link.stats.frames_out, 1);
                let channel = channels.room(room.as_str());
                self.send_to(&channel, Body::Frame(relay::frame_out(room.as_str(), &frame)), 0);
            }
            HostMail::ToConn { room, conn, frames } => {
                let Some((node, asker)) = self.tokens.get(conn).cloned() else { return };
                let frames = frames.iter().map(|f| relay::frame_out(room.as_str(), f)).collect();
                let body = Body::ToConn(relay::ToConn { room: room.as_str().into(), frames, asker: Some(asker) });
                self.send_to(&channels.node(&node), body, 0);
            }
            HostMail::PollAnswer { conn, status, body } => {
                let Some((node, asker)) = self.tokens.get(conn).cloned() else { return };
                let answer = Body::PollAnswer(relay::PollAnswer {
                    status: u32::from(status),
                    body: body.to_vec(),
                    asker: Some(asker),
                });
                self.send_to(&channels.node(&node), answer, 0);
            }
            HostMail::Ack { conn, ack } => {
                let Some((node, asker)) = self.tokens.get(conn).cloned() else { return };
                let body = Body::Ack(relay::AckTo { ack: Some(ack), asker: Some(asker) });
                self.send_to(&channels.node(&node), body, 0);
            }
            HostMail::Refused { conn, code, reason } => {
                let Some((node, asker)) = self.tokens.get(conn).cloned() else { return };
                let body = Body::Refused(relay::Refused { code, reason: reason.into(), asker: Some(asker) });
                self.send_to(&channels.node(&node), body, 0);
            }
            HostMail::Kick { room, user, reason } => {
                let kick =
                    relay::Kick { room: room.as_str().into(), user: user.as_str().into(), reason: reason.to_string() };
                self.send_to(&channels.all(), Body::Kick(kick), 0);
            }
            HostMail::Replicate { room, user, list, until_ms, add } => {
                let r = relay::Replicate {
                    room: room.as_str().into(),
                    user: user.as_str().into(),
                    list: relay::list_code(list),
                    until_ms,
                    add,
                };
                self.send_to(&channels.all(), Body::Replicate(r), 0);
            }
            HostMail::ToUser { user, frame, reply } => {
                let body = Body::ToUser(relay::ToUser {
                    user: user.as_str().into(),
                    frame: Some(relay::frame_out("", &frame)),
                });
                self.send_to(&channels.all(), body, 0);
                if let Some(r) = reply {
                    r.send(0);
                }
            }
            HostMail::ToAll { frame, reply } => {
                self.send_to(
                    &channels.all(),
                    Body::ToAll(relay::ToAll { frame: Some(relay::frame_out("", &frame)) }),
                    0,
                );
                if let Some(r) = reply {
                    r.send(0);
                }
            }
            // A drain's and a stop's mail, and hook verdicts, are for local shards only.
            HostMail::Drain(_)
            | HostMail::Flushed
            | HostMail::Stop
            | HostMail::Hook(_)
            | HostMail::TlsConfig(_)
            | HostMail::Resync => {}
        }
    }

    /// Queues a message for Redis; past `relay_queue_max` the oldest is dropped (counted).
    fn send_to(&mut self, channel: &str, body: Body, hops: u32) {
        if self.out.len() >= self.link.cfg.relay_queue_max {
            self.out.pop_front();
            add(&self.link.stats.dropped, 1);
        }
        let relay = Relay { from: self.link.me.clone(), body: Some(body), hops };
        self.out.push_back((channel.to_owned(), relay.encode_to_vec()));
    }

    /// Counts this node's members of a room another node owns, and follows its channel while
    /// there are any.
    fn track_local(&mut self, room: RoomName, shard: u16, members: u32) {
        let entry = self.local.entry(room.clone()).or_default();
        if members == 0 {
            entry.remove(&shard);
        } else {
            entry.insert(shard, members);
        }
        if entry.is_empty() {
            self.local.remove(&room);
        }
        self.resubscribe(&room);
    }

    fn wants(&self, room: &RoomName) -> bool {
        self.local.contains_key(room) && !self.link.placement.is_mine(room.as_str())
    }

    /// Subscribes to or leaves the room's channel as `wants` says.
    fn resubscribe(&mut self, room: &RoomName) {
        let channel = self.link.channels.room(room.as_str());
        let (want, have) = (self.wants(room), self.subscribed.contains(&channel));
        if want == have {
            return;
        }
        let verb: &[u8] = if want { b"SUBSCRIBE" } else { b"UNSUBSCRIBE" };
        if want {
            self.subscribed.insert(channel.clone());
        } else {
            self.subscribed.remove(&channel);
        }
        self.link.stats.subscriptions.store(self.subscribed.len() as u64, Ordering::Relaxed);
        // Not connected: the reconnection subscribes to all of `subscribed`.
        let failed = match &mut self.sub {
            Some(sub) => sub.stream.write_all(&resp::command(&[verb, channel.as_bytes()])).is_err(),
            None => false,
        };
        if failed {
            self.drop_sub();
        }
    }

    /// Asks every other node to report its members to their rooms' owners again, and its
    /// owners to send their rooms' bans and whitelists out again.
    fn resync(&mut self) {
        add(&self.link.stats.resyncs_out, 1);
        self.send_to(&self.link.channels.all(), Body::Resync(relay::Resync {}), 0);
    }

    /// The live set changed: rooms may have moved here or away. Every node reports its
    /// members again (see `relay::Resync`): this node's shards do so on their own.
    fn placement_changed(&mut self) {
        self.resync();
        let rooms: Vec<RoomName> = self.local.keys().cloned().collect();
        for room in &rooms {
            self.resubscribe(room);
        }
        // Rooms no longer owned here forget their remote members (the new owner hears from
        // those nodes again); dead nodes' members are no longer counted.
        let members = self.link.placement.members();
        let live: HashSet<&str> = members.live().iter().map(|n| n.id.as_str()).collect();
        let rooms: Vec<RoomName> = self.remote.keys().cloned().collect();
        for room in rooms {
            if !self.link.placement.is_mine(room.as_str()) {
                self.remote.remove(&room);
                continue;
            }
            let Some(by) = self.remote.get_mut(&room) else { continue };
            let before = by.len();
            by.retain(|(node, _), _| live.contains(node.as_str()));
            if by.len() != before {
                self.report_remote(&room, 0, Vec::new());
            }
        }
    }

    // ---- from Redis ----

    /// Reads what the subscriber connection has; true if anything came.
    fn read(&mut self) -> bool {
        let Some(mut sub) = self.sub.take() else { return false };
        let (got, alive) = read_some(&mut sub);
        let mut messages = Vec::new();
        let mut at = 0;
        let mut malformed = false;
        let (mut refused, mut resubscribed) = (None, false);
        loop {
            match resp::parse(&sub.buf[at..], PAYLOAD_MAX) {
                Ok(Some((value, used))) => {
                    at += used;
                    match resp::push(value) {
                        Push::Message(channel, payload) => messages.push((channel, payload)),
                        Push::Subscribed(channel) => {
                            resubscribed |= channel == self.link.channels.node(&self.link.me).as_bytes();
                        }
                        Push::Error(e) => refused = Some(e),
                        Push::Other => {}
                    }
                }
                Ok(None) => break,
                Err(resp::Malformed) => {
                    malformed = true;
                    break;
                }
            }
        }
        sub.buf.drain(..at);
        if malformed {
            add(&self.link.stats.malformed, 1);
        }
        if alive && !malformed && refused.is_none() {
            self.sub = Some(sub);
        } else {
            // An error reply (refused AUTH, too many clients, no permission) would leave the
            // connection open and deaf: closed and tried again like a broken one.
            if let Some(e) = refused
                && self.link.stats.errors.load(Ordering::Relaxed) == 0
            {
                eprintln!("barrage: cluster link: the subscriber was refused: {e}");
            }
            self.drop_sub();
        }
        // Subscribed (again): what was published to this node before (other nodes' presence
        // reports, ban replicas) is lost, so every node reports and replicates again — at start
        // too, since the first resync (the node's first read of the set) may have gone out
        // before the node listened.
        if resubscribed {
            self.resync();
            self.mail_every_shard(|| HostMail::Resync);
        }
        for (channel, payload) in messages {
            add(&self.link.stats.received, 1);
            match Relay::decode(payload.as_slice()) {
                Ok(r) if r.from != self.link.me => self.incoming(&channel, r),
                Ok(_) => {}
                Err(_) => add(&self.link.stats.malformed, 1),
            }
        }
        got
    }

    fn incoming(&mut self, channel: &[u8], r: Relay) {
        let Some(body) = r.body else { return };
        let from = r.from;
        match body {
            Body::Frame(f) => {
                let Some(room) = std::str::from_utf8(channel).ok().and_then(|c| self.link.channels.room_of(c)) else {
                    return;
                };
                let Some(room) = relay::room(room) else { return };
                // A room that moved here meanwhile is delivered by its owner shard.
                if self.link.placement.is_mine(room.as_str()) {
                    return;
                }
                add(&self.link.stats.frames_in, 1);
                let frame = Arc::new(relay::frame_in(f));
                self.mail_every_shard(|| HostMail::Deliver { room: room.clone(), frame: Arc::clone(&frame) });
            }
            Body::Kick(k) => {
                let Some(room) = relay::room(&k.room) else { return };
                let (user, reason): (UserId, Arc<str>) = (UserId::new(&k.user), k.reason.into());
                self.mail_every_shard(|| HostMail::Kick {
                    room: room.clone(),
                    user: user.clone(),
                    reason: reason.clone(),
                });
            }
            Body::Replicate(x) => {
                let (Some(room), Some(list)) = (relay::room(&x.room), relay::list(x.list)) else { return };
                let user = UserId::new(&x.user);
                self.mail_every_shard(|| HostMail::Replicate {
                    room: room.clone(),
                    user: user.clone(),
                    list,
                    until_ms: x.until_ms,
                    add: x.add,
                });
            }
            Body::ToUser(t) => {
                let Some(f) = t.frame else { return };
                let (user, frame) = (UserId::new(&t.user), Arc::new(relay::frame_in(f)));
                self.mail_every_shard(|| HostMail::ToUser {
                    user: user.clone(),
                    frame: Arc::clone(&frame),
                    reply: None,
                });
            }
            Body::ToAll(t) => {
                let Some(f) = t.frame else { return };
                let frame = Arc::new(relay::frame_in(f));
                self.mail_every_shard(|| HostMail::ToAll { frame: Arc::clone(&frame), reply: None });
            }
            Body::Resync(_) => {
                add(&self.link.stats.resyncs_in, 1);
                self.mail_every_shard(|| HostMail::Resync);
            }
            Body::Answer(a) => {
                if let Some((waiter, _)) = self.asks.remove(&a.req) {
                    waiter.answer(a);
                } else if let Some(g) = self.gathers.get_mut(&a.req) {
                    g.rooms.extend(a.rooms.into_iter().filter_map(|r| Some((relay::room(&r.room)?, r.online))));
                    g.waiting -= 1;
                    if g.waiting == 0
                        && let Some(g) = self.gathers.remove(&a.req)
                    {
                        g.reply.send(g.rooms);
                    }
                }
            }
            Body::ToConn(t) => {
                let (Some(room), Some(at)) = (relay::room(&t.room), self.conn_at(t.asker.as_ref())) else { return };
                let frames = t.frames.into_iter().map(|f| Arc::new(relay::frame_in(f))).collect();
                self.mail_shard(at.shard, HostMail::ToConn { room, conn: at.conn, frames }.into());
            }
            Body::PollAnswer(p) => {
                let Some(at) = self.conn_at(p.asker.as_ref()) else { return };
                let status = u16::try_from(p.status).unwrap_or(500);
                self.mail_shard(at.shard, HostMail::PollAnswer { conn: at.conn, status, body: p.body.into() }.into());
            }
            Body::Ack(a) => {
                let (Some(at), Some(ack)) = (self.conn_at(a.asker.as_ref()), a.ack) else { return };
                self.mail_shard(at.shard, HostMail::Ack { conn: at.conn, ack }.into());
            }
            Body::Refused(x) => {
                let Some(at) = self.conn_at(x.asker.as_ref()) else { return };
                let reason = relay::known_reason(&x.reason);
                self.mail_shard(at.shard, HostMail::Refused { conn: at.conn, code: x.code, reason }.into());
            }
            request => self.serve(&from, request, r.hops),
        }
    }

    /// A connection on this node named in an answer.
    fn conn_at(&self, asker: Option<&Asker>) -> Option<ConnAt> {
        let a = asker?;
        let shard = u16::try_from(a.shard).ok().filter(|&s| usize::from(s) < self.shards)?;
        Some(ConnAt { shard: ShardId(shard), conn: ConnId { key: ConnKey(a.key), generation: a.generation } })
    }

    /// A request from `node` for a room this node owns: the same mail a local shard sends,
    /// with its answer relayed back.
    fn serve(&mut self, node: &str, body: Body, hops: u32) {
        if let Body::Query(q) = &body
            && q.kind == relay::QUERY_TOP
        {
            let (n, req) = (q.room.parse::<usize>().unwrap_or(20), q.asker.as_ref().map_or(0, |a| a.req));
            self.serve_top(node, n, req);
            return;
        }
        if let Body::PublishBatch(b) = body {
            self.serve_batch(node, b);
            return;
        }
        let Some(name) = request_room(&body) else { return };
        let Some(room) = relay::room(name) else {
            add(&self.link.stats.malformed, 1);
            return;
        };
        if let Some(owner) = self.link.placement.owner_node(room.as_str()) {
            // This node's view differs from the sender's: pass it on once or twice, then drop
            // it (the asker times out; views agree again within a heartbeat).
            if hops < HOPS_MAX {
                let relay = Relay { from: node.to_owned(), body: Some(body), hops: hops + 1 };
                self.out.push_back((self.link.channels.node(&owner), relay.encode_to_vec()));
            }
            return;
        }
        let to = room.owner(self.shards);
        let link = self.link.placement.link();
        let conn = |tokens: &mut Tokens, asker: Option<Asker>| ConnAt {
            shard: link,
            conn: tokens.issue(node, asker.unwrap_or_default()),
        };
        let mail = match body {
            Body::Publish(p) => {
                let req = p.asker.map_or(0, |a| a.req);
                let (tx, rx) = sync_channel(1);
                self.owe(node, rx, move |r: Result<Published, PublishError>| match r {
                    Ok(p) => Answer { req, id: p.id, coalesced: p.coalesced, ..Answer::default() },
                    Err(e) => Answer { req, error: Some(relay::publish_error_code(e)), ..Answer::default() },
                });
                let priority = relay::priority(p.priority);
                OwnerMail::Publish { room, msg: Box::new(p.msg.unwrap_or_default()), priority, reply: Reply(tx) }
            }
            Body::Send(x) => OwnerMail::Send {
                room,
                msg: Box::new(x.msg.unwrap_or_default()),
                user: UserId::new(&x.user),
                weight: x.weight,
                priority: relay::priority(x.priority).unwrap_or_default(),
                from: conn(&mut self.tokens, x.asker),
                ack: (!x.ack.is_empty()).then(|| x.ack.into()),
            },
            Body::Presence(p) => {
                let by = self.remote.entry(room.clone()).or_default();
                if p.members == 0 {
                    by.remove(&(node.to_owned(), p.shard));
                } else {
                    by.insert((node.to_owned(), p.shard), [p.members, p.json, p.deflate, p.deflate_json]);
                }
                let users = p.left_users.iter().map(|u| UserId::new(u)).collect();
                self.report_remote(&room, p.left, users);
                return;
            }
            Body::Joined(j) => OwnerMail::Joined {
                room,
                from: conn(&mut self.tokens, j.asker),
                user: j.user.as_deref().map(UserId::new),
                after: j.after,
            },
            Body::Poll(p) => {
                OwnerMail::Poll { room, after: p.after, limit: p.limit as usize, from: conn(&mut self.tokens, p.asker) }
            }
            Body::AttrSync(a) => OwnerMail::AttrSync { room, after: a.after, from: conn(&mut self.tokens, a.asker) },
            Body::Moderate(m) => {
                let Some(action) = relay::action(m.action, m.until_ms) else { return };
                let origin = match m.asker {
                    Some(a) if a.req != 0 => {
                        let req = a.req;
                        let (tx, rx) = sync_channel(1);
                        self.owe(node, rx, move |r: Result<(), ModerationError>| Answer {
                            req,
                            error: r.err().map(relay::moderation_error_code),
                            ..Answer::default()
                        });
                        Origin::Api(Reply(tx))
                    }
                    asker => Origin::Conn(conn(&mut self.tokens, asker)),
                };
                OwnerMail::Moderate { room, user: UserId::new(&m.user), action, reason: m.reason.into(), origin }
            }
            Body::SetAttr(x) => {
                let origin = match x.asker {
                    Some(a) if a.req != 0 => {
                        let req = a.req;
                        let (tx, rx) = sync_channel(1);
                        self.owe(node, rx, move |r: Result<u64, AttrError>| match r {
                            Ok(version) => Answer { req, version, ..Answer::default() },
                            Err(e) => Answer { req, error: Some(relay::attr_error_code(e)), ..Answer::default() },
                        });
                        Origin::Api(Reply(tx))
                    }
                    asker => Origin::Conn(conn(&mut self.tokens, asker)),
                };
                OwnerMail::SetAttr { room, key: x.key, value: x.value, origin }
            }
            Body::Query(q) => {
                let req = q.asker.map_or(0, |a| a.req);
                match q.kind {
                    relay::QUERY_INFO => {
                        let (tx, rx) = sync_channel(1);
                        self.owe(node, rx, move |i: RoomInfo| Answer {
                            req,
                            online: i.online,
                            last_seq: i.last_seq,
                            pending: i.pending as u64,
                            ..Answer::default()
                        });
                        OwnerMail::RoomInfo { room, reply: Reply(tx) }
                    }
                    relay::QUERY_LISTS => {
                        let (tx, rx) = sync_channel(1);
                        self.owe(node, rx, move |l: ModerationLists| Answer {
                            req,
                            entries: relay::lists_out(&l),
                            ..Answer::default()
                        });
                        OwnerMail::ModerationList { room, reply: Reply(tx) }
                    }
                    _ => {
                        let (tx, rx) = sync_channel(1);
                        self.owe(node, rx, move |(version, entries): AttrsSnapshot| Answer {
                            req,
                            version,
                            attrs: entries
                                .into_iter()
                                .map(|(key, value)| crate::proto::AttrEntry { key, value, deleted: false })
                                .collect(),
                            ..Answer::default()
                        });
                        OwnerMail::Attrs { room, reply: Reply(tx) }
                    }
                }
            }
            _ => return,
        };
        self.mail_shard(to, mail.into());
    }

    /// Another node's batch for rooms this node owns: one mail per owner shard here, one
    /// answer with every item's result in order; items for rooms not owned here are refused
    /// with "retry" (the sender's view of the set was older).
    fn serve_batch(&mut self, node: &str, b: relay::PublishBatch) {
        let req = b.asker.as_ref().map_or(0, |a| a.req);
        let retry = || relay::ItemResult {
            error: Some(relay::publish_error_code(PublishError::HandedOver)),
            ..relay::ItemResult::default()
        };
        let mut out: Vec<relay::ItemResult> = (0..b.items.len()).map(|_| retry()).collect();
        let mut per_shard: Vec<(Vec<usize>, Vec<BatchItem>)> =
            (0..self.shards).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, item) in b.items.into_iter().enumerate() {
            if let Some(room) = relay::room(&item.room).filter(|r| self.link.placement.is_mine(r.as_str())) {
                let s = room.owner(self.shards).index();
                per_shard[s].0.push(i);
                per_shard[s].1.push((room, item.msg.unwrap_or_default(), relay::priority(item.priority)));
            }
        }
        let mut waits: Vec<(Vec<usize>, Receiver<BatchAnswers>)> = Vec::new();
        for (s, (positions, items)) in per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let (tx, rx) = sync_channel(1);
            self.mail_shard(ShardId(s as u16), OwnerMail::PublishBatch { items, reply: Reply(tx) }.into());
            waits.push((positions, rx));
        }
        // Items a shard never answered (it dropped the mail) stay refused with "retry".
        let poll = Box::new(move || {
            waits.retain(|(positions, rx)| match rx.try_recv() {
                Ok(answers) => {
                    for (&i, a) in positions.iter().zip(answers) {
                        out[i] = match a {
                            Ok(p) => relay::ItemResult { error: None, id: p.id, coalesced: p.coalesced },
                            Err(e) => relay::ItemResult {
                                error: Some(relay::publish_error_code(e)),
                                ..relay::ItemResult::default()
                            },
                        };
                    }
                    false
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => false,
            });
            waits.is_empty().then(|| Answer { req, results: std::mem::take(&mut out), ..Answer::default() })
        });
        self.owed.push(Owed { node: node.to_owned(), deadline: Instant::now() + self.link.cfg.ask_timeout, poll });
    }

    /// Another node's top-rooms call: every local owner is asked, the answer goes when all
    /// have replied.
    fn serve_top(&mut self, node: &str, n: usize, req: u64) {
        let mut waits = Vec::with_capacity(self.shards);
        for i in 0..self.shards {
            let (tx, rx) = sync_channel(1);
            self.mail_shard(ShardId(i as u16), OwnerMail::TopRooms { n, reply: Reply(tx) }.into());
            waits.push(rx);
        }
        let mut rooms: Vec<(RoomName, u64)> = Vec::new();
        let poll = Box::new(move || {
            waits.retain(|rx| match rx.try_recv() {
                Ok(r) => {
                    rooms.extend(r);
                    false
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => false,
            });
            waits.is_empty().then(|| Answer {
                req,
                rooms: rooms
                    .drain(..)
                    .map(|(r, online)| relay::RoomCount { room: r.as_str().to_owned(), online })
                    .collect(),
                ..Answer::default()
            })
        });
        self.owed.push(Owed { node: node.to_owned(), deadline: Instant::now() + self.link.cfg.ask_timeout, poll });
    }

    /// Remembers an answer owed to `node`, polled from `rx` and converted by `answer`.
    fn owe<T: Send + 'static>(&mut self, node: &str, rx: Receiver<T>, answer: impl Fn(T) -> Answer + Send + 'static) {
        let poll = Box::new(move || rx.try_recv().ok().map(&answer));
        self.owed.push(Owed { node: node.to_owned(), deadline: Instant::now() + self.link.cfg.ask_timeout, poll });
    }

    /// Tells the room's owner shard how many members the other nodes have (its link slot).
    fn report_remote(&mut self, room: &RoomName, left: u32, left_users: Vec<UserId>) {
        let [members, json, deflate, deflate_json] = self
            .remote
            .get(room)
            .map(|by| {
                by.values().fold([0u32; 4], |mut sum, counts| {
                    for (s, c) in sum.iter_mut().zip(counts) {
                        *s = s.saturating_add(*c);
                    }
                    sum
                })
            })
            .unwrap_or_default();
        if members == 0 {
            self.remote.remove(room);
        }
        let from = self.link.placement.link();
        let mail =
            OwnerMail::Presence { room: room.clone(), from, members, json, deflate, deflate_json, left, left_users };
        self.mail_shard(room.owner(self.shards), mail.into());
    }

    fn collect_owed(&mut self) {
        let now = Instant::now();
        let mut done = Vec::new();
        self.owed.retain_mut(|o| match (o.poll)() {
            Some(answer) => {
                done.push((o.node.clone(), answer));
                false
            }
            None => now < o.deadline,
        });
        for (node, answer) in done {
            let channel = self.link.channels.node(&node);
            self.send_to(&channel, Body::Answer(answer), 0);
        }
    }

    // ---- to this node's shards ----

    fn mail_every_shard(&mut self, mut mail: impl FnMut() -> HostMail) {
        for i in 0..self.shards {
            self.mail_shard(ShardId(i as u16), mail().into());
        }
    }

    /// Mails a shard; a full inbox keeps control mail for the next turn and drops a block
    /// delivery (counted: its members see a seq gap and poll).
    fn mail_shard(&mut self, to: ShardId, mail: Mail) {
        if !self.to_shards.is_empty() {
            self.to_shards.push_back((to, mail));
            return;
        }
        if let Err(back) = self.link.mesh.send(to, mail) {
            self.keep(to, back);
        }
    }

    fn keep(&mut self, to: ShardId, mail: Mail) {
        if matches!(&mail, Mail::Host(m) if m.delivery_class().is_some()) {
            add(&self.link.stats.dropped, 1);
            return;
        }
        if self.to_shards.len() >= self.link.cfg.relay_queue_max {
            add(&self.link.stats.dropped, 1);
            return;
        }
        self.to_shards.push_back((to, mail));
    }

    fn retry_shards(&mut self) {
        while let Some((to, mail)) = self.to_shards.pop_front() {
            if let Err(back) = self.link.mesh.send(to, mail) {
                self.to_shards.push_front((to, back));
                return;
            }
        }
    }

    // ---- Redis ----

    /// (Re)connects both connections when due: the publisher, and the subscriber with every
    /// channel this node follows.
    fn connect(&mut self) {
        if (self.sub.is_some() && self.con.is_some()) || Instant::now() < self.next_connect {
            return;
        }
        let ok = self.connect_pub().and_then(|()| self.connect_sub());
        match ok {
            Ok(()) => {
                self.backoff = BACKOFF_MIN;
                self.link.stats.up.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                if self.link.stats.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("barrage: cluster link: {e}");
                }
                self.link.stats.up.store(false, Ordering::Relaxed);
                self.sub = None;
                self.con = None;
                self.next_connect = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(self.link.cfg.backoff_max);
            }
        }
    }

    fn connect_pub(&mut self) -> Result<(), String> {
        if self.con.is_some() {
            return Ok(());
        }
        let timeout = self.link.cfg.timeout;
        let c = self.link.client.get_connection_with_timeout(timeout).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        c.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        self.con = Some(c);
        Ok(())
    }

    fn connect_sub(&mut self) -> Result<(), String> {
        if self.sub.is_some() {
            return Ok(());
        }
        let info = self.link.client.get_connection_info();
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err("the cluster link needs a redis:// (TCP) URL".into());
        };
        let timeout = self.link.cfg.timeout;
        let addr = (host.as_str(), *port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| format!("redis host {host} has no address"))?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => hello.extend(resp::command(&[b"AUTH", user.as_bytes(), password.as_bytes()])),
                None => hello.extend(resp::command(&[b"AUTH", password.as_bytes()])),
            }
        }
        let (node, all) = (self.link.channels.node(&self.link.me), self.link.channels.all());
        let mut channels: Vec<&[u8]> = vec![b"SUBSCRIBE", node.as_bytes(), all.as_bytes()];
        channels.extend(self.subscribed.iter().map(String::as_bytes));
        hello.extend(resp::command(&channels));
        stream.write_all(&hello).map_err(|e| e.to_string())?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        // An AUTH refusal comes back as an error reply; the read loop sees the connection
        // work or fail like any other.
        self.sub = Some(Sub { stream, buf: Vec::new() });
        Ok(())
    }

    fn drop_sub(&mut self) {
        self.sub = None;
        self.link.stats.up.store(false, Ordering::Relaxed);
        add(&self.link.stats.errors, 1);
        self.next_connect = Instant::now() + self.backoff;
    }

    /// Publishes what waits, in order, a batch per pipeline; true if anything went.
    fn publish(&mut self) -> bool {
        if self.out.is_empty() {
            return false;
        }
        let Some(con) = self.con.as_mut() else { return false };
        let mut sent = false;
        while !self.out.is_empty() {
            let n = self.out.len().min(PUBLISH_BATCH);
            let mut pipe = redis::pipe();
            for (channel, payload) in self.out.iter().take(n) {
                pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            }
            if pipe.exec(con).is_err() {
                // Sent again once a connection is back (a duplicate frame is dropped by seq).
                add(&self.link.stats.errors, 1);
                self.link.stats.up.store(false, Ordering::Relaxed);
                self.con = None;
                self.next_connect = Instant::now() + self.backoff;
                return sent;
            }
            self.out.drain(..n);
            add(&self.link.stats.published, n as u64);
            sent = true;
        }
        sent
    }

    /// Renews this node's leases every third of `lease_ms`; a lease found taken stops its
    /// room here.
    fn renew(&mut self) {
        if Instant::now() < self.next_renew {
            return;
        }
        let leases = &self.link.leases;
        self.next_renew = Instant::now() + Duration::from_millis(leases.lease_ms() / 3);
        let Some(con) = self.con.as_mut() else { return };
        let held = leases.held();
        let mut lost = Vec::new();
        for chunk in held.chunks(RENEW_BATCH) {
            let rooms: Vec<&RoomName> = chunk.iter().map(|(r, _)| r).collect();
            match leases.take_cmd(&rooms).query::<redis::Value>(con) {
                Ok(reply) => {
                    add(&self.link.stats.renewals, chunk.len() as u64);
                    for ((room, shard), take) in chunk.iter().zip(Leases::parse_take(&reply, chunk.len())) {
                        if let Take::Held(_) = take {
                            lost.push((room.clone(), *shard));
                        }
                    }
                }
                Err(_) => {
                    add(&self.link.stats.errors, 1);
                    self.con = None;
                    break;
                }
            }
        }
        for (room, shard) in lost {
            add(&self.link.stats.lost, 1);
            leases.forget(&room);
            self.mail_shard(shard, OwnerMail::LeaseLost { room }.into());
        }
    }

    /// API callers whose owner did not answer in time are dropped (their own wait ends in a
    /// 503).
    fn expire(&mut self) {
        let now = Instant::now();
        let before = self.asks.len();
        self.asks.retain(|_, (_, deadline)| now < *deadline);
        add(&self.link.stats.asks_expired, (before - self.asks.len()) as u64);
        let late: Vec<u64> = self.gathers.iter().filter(|(_, g)| g.deadline <= now).map(|(r, _)| *r).collect();
        for req in late {
            if let Some(g) = self.gathers.remove(&req) {
                g.reply.send(g.rooms);
            }
        }
    }
}

/// Reads whatever has arrived without blocking: (anything came, the connection still works).
fn read_some(sub: &mut Sub) -> (bool, bool) {
    let mut chunk = [0u8; 64 * 1024];
    let mut got = false;
    loop {
        match sub.stream.read(&mut chunk) {
            Ok(0) => return (got, false),
            Ok(n) => {
                got = true;
                sub.buf.extend_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    return (got, true);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (got, true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (got, false),
        }
    }
}

/// The room a request is for (None for node-local mail).
fn room_of(mail: &OwnerMail) -> Option<&RoomName> {
    match mail {
        OwnerMail::Publish { room, .. }
        | OwnerMail::Send { room, .. }
        | OwnerMail::Presence { room, .. }
        | OwnerMail::Joined { room, .. }
        | OwnerMail::Poll { room, .. }
        | OwnerMail::Moderate { room, .. }
        | OwnerMail::SetAttr { room, .. }
        | OwnerMail::AttrSync { room, .. }
        | OwnerMail::RoomInfo { room, .. }
        | OwnerMail::ModerationList { room, .. }
        | OwnerMail::Attrs { room, .. }
        | OwnerMail::Loaded { room, .. }
        | OwnerMail::Held { room }
        | OwnerMail::LeaseLost { room } => Some(room),
        OwnerMail::TopRooms { .. }
        | OwnerMail::PublishBatch { .. }
        | OwnerMail::Flush
        | OwnerMail::Export { .. }
        | OwnerMail::Thaw => None,
    }
}

/// The room named by a relayed request.
fn request_room(body: &Body) -> Option<&str> {
    Some(match body {
        Body::Publish(x) => &x.room,
        Body::Send(x) => &x.room,
        Body::Presence(x) => &x.room,
        Body::Joined(x) => &x.room,
        Body::Poll(x) => &x.room,
        Body::AttrSync(x) => &x.room,
        Body::Moderate(x) => &x.room,
        Body::SetAttr(x) => &x.room,
        Body::Query(x) => &x.room,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_remote_connections_until_their_slot_is_reused() {
        let mut t = Tokens::new(2);
        let a = t.issue("n1", Asker { shard: 1, key: 7, generation: 3, req: 0 });
        assert_eq!(t.get(a).map(|(n, x)| (n.as_str(), x.key)), Some(("n1", 7)));
        let _b = t.issue("n2", Asker::default());
        let c = t.issue("n3", Asker::default());
        assert_eq!(c.key, a.key, "the ring came round");
        assert!(t.get(a).is_none(), "a late answer for the old slot is dropped");
        assert!(t.get(c).is_some());
        assert!(t.get(ConnId { key: ConnKey(9), generation: 1 }).is_none());
    }
}
