//! The loader thread: reads a room's state when its owner first needs it (two pipelined
//! rounds: the room's keys, then its moderation entries) and mails it back. With Redis away
//! it answers at once with nothing, and tries again after a backoff.

use std::time::{Duration, Instant};

use super::Store;
use super::encode::{self, LOAD_FIRST_REPLIES};
use super::stats::StoreStats;
use crate::cluster::lease::{Leases, Take};
use crate::hub::mail::{Mail, OwnerMail};
use crate::ids::ShardId;
use crate::proto::RoomState;
use crate::room::RoomName;
use crate::room::durable::StoreOp;
use crate::shard::mesh::Mesh;

/// Loads read in one pipeline.
const BATCH_LOADS: usize = 64;
const IDLE: Duration = Duration::from_millis(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// How long an answer waits for a full inbox before it is given up (the owner's load timeout
/// has answered by then).
const MAIL_WAIT: Duration = Duration::from_secs(2);

pub(super) fn run(store: &Store, mesh: &Mesh, backoff_max: Duration) {
    let mut con: Option<redis::Connection> = None;
    let mut backoff = BACKOFF_MIN;
    let mut next_attempt = Instant::now();
    while !store.stopping() {
        let mut batch = Vec::new();
        while batch.len() < BATCH_LOADS {
            match store.loads.pop() {
                Some(StoreOp::Load { room, owner }) => batch.push((room, owner)),
                Some(_) => {}
                None => break,
            }
        }
        if batch.is_empty() {
            std::thread::sleep(IDLE);
            continue;
        }
        if con.is_none() && Instant::now() >= next_attempt {
            match store.connect() {
                Ok(c) => {
                    con = Some(c);
                    backoff = BACKOFF_MIN;
                }
                Err(_) => {
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(backoff_max);
                }
            }
        }
        // In a cluster a room is read only once its lease is this node's; the others are
        // answered `Held` and asked for again by their owners.
        let mut held = Vec::new();
        if let (Some(leases), Some(c)) = (&store.leases, con.as_mut()) {
            let rooms: Vec<&RoomName> = batch.iter().map(|(r, _)| r).collect();
            match leases.take_cmd(&rooms).query::<redis::Value>(c) {
                Ok(reply) => {
                    let takes = Leases::parse_take(&reply, rooms.len());
                    let mut kept = Vec::with_capacity(batch.len());
                    for ((room, owner), take) in batch.into_iter().zip(takes) {
                        match take {
                            Take::Ours => {
                                leases.taken(&room, owner);
                                kept.push((room, owner));
                            }
                            Take::Held(_) => held.push((room, owner)),
                        }
                    }
                    batch = kept;
                }
                Err(_) => {
                    con = None;
                    next_attempt = Instant::now() + backoff;
                }
            }
        }
        for (room, owner) in held {
            send(mesh, owner, Mail::from(OwnerMail::Held { room }));
        }
        let rooms: Vec<&RoomName> = batch.iter().map(|(r, _)| r).collect();
        let states = match con.as_mut().map(|c| read(store, c, &rooms)) {
            Some(Ok(states)) => states,
            Some(Err(_)) | None => {
                if con.take().is_some() {
                    next_attempt = Instant::now() + backoff;
                }
                StoreStats::add(&store.stats.load_errors, batch.len() as u64);
                vec![None; batch.len()]
            }
        };
        StoreStats::add(&store.stats.loads, batch.len() as u64);
        for ((room, owner), state) in batch.into_iter().zip(states) {
            send(mesh, owner, Mail::from(OwnerMail::Loaded { room, state: state.map(Box::new) }));
        }
    }
}

/// Mails an answer to an owner, waiting a while for a full inbox.
fn send(mesh: &Mesh, owner: ShardId, mut mail: Mail) {
    let deadline = Instant::now() + MAIL_WAIT;
    while let Err(back) = mesh.send(owner, mail) {
        if Instant::now() >= deadline {
            break;
        }
        mail = back;
        std::thread::sleep(IDLE);
    }
}

/// Reads the rooms' states (two pipelined rounds for the whole batch).
fn read(store: &Store, con: &mut redis::Connection, rooms: &[&RoomName]) -> redis::RedisResult<Vec<Option<RoomState>>> {
    let prefix = &store.retention.prefix;
    let mut first = redis::pipe();
    for room in rooms {
        encode::load_first(&mut first, prefix, room.as_str());
    }
    let replies: Vec<redis::Value> = first.query(con)?;
    let mut partials = Vec::with_capacity(rooms.len());
    let mut second = redis::pipe();
    for (room, replies) in rooms.iter().zip(replies.chunks(LOAD_FIRST_REPLIES)) {
        let (partial, bad) = encode::parse_first(room.as_str(), replies);
        StoreStats::add(&store.stats.malformed, bad);
        encode::load_second(&mut second, prefix, &partial);
        partials.push(partial);
    }
    let entries: Vec<redis::Value> = if second.cmd_iter().next().is_some() { second.query(con)? } else { Vec::new() };
    let mut at = 0;
    let mut out = Vec::with_capacity(partials.len());
    for partial in partials {
        let n = partial.listed.len();
        let state = encode::parse_second(partial, entries.get(at..at + n).unwrap_or(&[]));
        at += n;
        out.push(Some(state));
    }
    Ok(out)
}
