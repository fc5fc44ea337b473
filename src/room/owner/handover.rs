//! A room's state as one barrage process hands it to the next on an upgrade (`upgrade/`):
//! `export` after every pending message was cut into blocks, `import` into the new process's
//! owner before it takes any connection. Seqs, history, attributes (version and entries; the
//! change log stays behind, so a client behind the version gets a snapshot) and moderation
//! entries with their expiries pass; members do not (they reconnect and resume by seq).

use super::{OwnedRoom, Owner, OwnerConfig};
use crate::ids::{Now, UserId};
use crate::proto::{AttrEntry, ModerationEntry, RoomState, moderation_entry};
use crate::room::RoomName;
use crate::room::attrs::AttrLog;
use crate::room::history::History;
use crate::room::mixer::Mixer;
use crate::room::moderation::List;

/// What an import took and what it could not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub rooms: u64,
    /// Rooms refused: a bad name, or `rooms_max` rooms with state already held.
    pub rooms_skipped: u64,
    /// Attributes and moderation entries over this process's bounds.
    pub entries_skipped: u64,
}

/// A ban or whitelist entry every hosting shard must hold from the start (`Replicas`).
pub type Replica = (RoomName, UserId, List, Option<i64>);

impl Owner {
    /// Every room whose state outlives its members, or that has handed out seqs: what the next
    /// process must continue. Call after the pending messages were cut (they are not carried).
    pub fn export(&self, now_ms: i64) -> Vec<RoomState> {
        let mut out = Vec::new();
        for (name, r) in &self.rooms {
            if !r.kept && r.mixer.last_seq() == r.base_seq {
                continue;
            }
            let mut moderation = Vec::new();
            for (list, wire) in LISTS {
                for e in r.moderation.entries(list, now_ms) {
                    let until_ms = e.until_ms.unwrap_or(0);
                    moderation.push(ModerationEntry { list: wire as i32, user: e.user, until_ms });
                }
            }
            out.push(RoomState {
                room: name.as_str().to_owned(),
                base_seq: r.base_seq,
                last_seq: r.mixer.last_seq(),
                evicted_seq: r.history.evicted_seq(),
                history: r.history.recent().cloned().collect(),
                attrs_version: r.attrs.version(),
                attrs: r
                    .attrs
                    .snapshot()
                    .map(|(k, v)| AttrEntry { key: k.to_owned(), value: v.to_vec(), deleted: false })
                    .collect(),
                moderation,
                kept: r.kept,
            });
        }
        out
    }

    /// Takes over rooms another process exported. Input from another process is still input:
    /// names are checked, bounds are this process's, and a room already here is left alone.
    pub fn import(&mut self, states: Vec<RoomState>, name_bytes_max: usize, now: Now) -> Imported {
        let mut done = Imported::default();
        for s in states {
            let Ok(name) = RoomName::parse(&s.room, name_bytes_max) else {
                done.rooms_skipped += 1;
                continue;
            };
            if self.rooms.contains_key(&name) || (s.kept && self.kept >= self.config.rooms_max) {
                done.rooms_skipped += 1;
                continue;
            }
            let kept = s.kept;
            let r = Self::room_mut(&mut self.rooms, &self.config, &name, now);
            done.entries_skipped += restore(r, &self.config, s, Continue::Exactly, now);
            if kept {
                r.kept = true;
                self.kept += 1;
            }
            done.rooms += 1;
        }
        done
    }
}

/// How a restored room's seqs go on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Continue {
    /// From the state's last seq: a live hand-over, where nothing was cut after the export.
    Exactly,
    /// From the later of the state's last seq and this room's own start (`seq_base` of its
    /// creation): state read back from storage may miss the last blocks cut before a crash, and a
    /// seq must never be handed out twice.
    After,
}

/// Puts `s` into `r` (history, seqs, attributes, moderation; `kept` is the caller's); returns
/// the attributes and moderation entries over this process's bounds, skipped.
pub(super) fn restore(r: &mut OwnedRoom, cfg: &OwnerConfig, s: RoomState, how: Continue, now: Now) -> u64 {
    let mut skipped = 0;
    let last_seq = s.last_seq.max(s.base_seq);
    match how {
        Continue::Exactly => {
            r.base_seq = s.base_seq;
            r.mixer = Mixer::starting_after(last_seq);
        }
        Continue::After => {
            if s.base_seq != 0 {
                r.base_seq = r.base_seq.min(s.base_seq);
            }
            // Publishes taken while the room loaded wait in the mixer: keep them.
            r.mixer.continue_after(last_seq);
        }
    }
    r.history = History::restore(cfg.history_messages_max, s.history, s.evicted_seq);
    let entries = s.attrs.into_iter().filter(|a| !a.deleted).map(|a| (a.key, a.value)).collect();
    let version = match how {
        Continue::Exactly => s.attrs_version,
        Continue::After => s.attrs_version.max(r.attrs.version()),
    };
    let (attrs, over) = AttrLog::restore(version, entries, &cfg.attrs);
    skipped += over as u64;
    r.attrs = attrs;
    r.attrs_sent = version;
    r.snapshot = None;
    r.backfill = None;
    r.poll_cache.clear();
    r.resumes.clear();
    for e in s.moderation {
        let until = (e.until_ms != 0).then_some(e.until_ms);
        let added = list_of(e.list).map(|l| r.moderation.add(l, &e.user, until, now.unix.0, &cfg.moderation));
        if !matches!(added, Some(Ok(()))) {
            skipped += 1;
        }
    }
    skipped
}

/// The ban and whitelist entries in `states`, for every hosting shard's replicas.
pub fn replicas(states: &[RoomState], name_bytes_max: usize) -> Vec<Replica> {
    let mut out = Vec::new();
    for s in states {
        let Ok(name) = RoomName::parse(&s.room, name_bytes_max) else { continue };
        for e in &s.moderation {
            if let Some(list @ (List::Ban | List::Whitelist)) = list_of(e.list) {
                let until = (e.until_ms != 0).then_some(e.until_ms);
                out.push((name.clone(), UserId::new(&e.user), list, until));
            }
        }
    }
    out
}

const LISTS: [(List, moderation_entry::List); 3] = [
    (List::Mute, moderation_entry::List::Mute),
    (List::Ban, moderation_entry::List::Ban),
    (List::Whitelist, moderation_entry::List::Whitelist),
];

fn list_of(wire: i32) -> Option<List> {
    let wire = moderation_entry::List::try_from(wire).ok()?;
    LISTS.iter().find(|(_, w)| *w == wire).map(|(l, _)| *l)
}
