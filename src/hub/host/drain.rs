//! Draining a shard's connections without a stampede. A drain starts on every shard at once
//! (`HostMail::Drain`): the shard stops taking connections and upgrades, and every owner cuts
//! its rooms' pending messages into blocks at once and says so (`HostMail::Flushed`) after
//! them. Once every owner has, nothing accepted before the drain is still pending anywhere,
//! and the waves begin: at a bounded rate, each WebSocket gets its last frames, then
//! `reconnect` (a delay with jitter, an optional URL) and a Close (1001), and is closed once
//! they are written. What is left at the deadline is closed.

use std::sync::Arc;

use super::Host;
use super::conn::State;
use crate::hub::mail::OwnerMail;
use crate::ids::{ConnKey, Now};
use crate::metrics::Series;
use crate::proto::{Reconnect, ServerFrame, server_frame};
use crate::room::limit::{Rate, TokenBucket};
use crate::wire::CloseCode;

/// What a drain asks of every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainPlan {
    /// Reconnects sent per second by this shard (0: all at once).
    pub rate_per_s: u32,
    /// How long after the start stragglers are closed.
    pub deadline_ms: u64,
    /// The least delay a client is told to wait before reconnecting.
    pub delay_ms: u32,
    /// Extra delay spread over clients (0..=jitter_ms, by connection), so their reconnects do
    /// not arrive together.
    pub jitter_ms: u32,
    /// Where to reconnect: one of these, spread by connection ("" = the same address; in a
    /// cluster, the other live nodes).
    pub urls: Arc<[Arc<str>]>,
    pub reason: Arc<str>,
}

impl DrainPlan {
    /// The URL told to one connection: one of the plan's URLs by a hash of the connection, so
    /// a cluster's peers get even shares ("" without any).
    pub fn url_for(&self, key: ConnKey, generation: u32) -> &str {
        let mut h = (u64::from(generation) << 32 | u64::from(key.0)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h ^= h >> 32;
        match self.urls.len() {
            0 => "",
            n => &self.urls[(h % n as u64) as usize],
        }
    }
}

/// Where a drain is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for every owner's flush.
    Flushing,
    /// Sending reconnects.
    Waves,
    /// No WebSocket left.
    Done,
}

/// A shard's drain in progress.
pub struct Drain {
    plan: DrainPlan,
    deadline_ms: u64,
    shards: usize,
    bucket: TokenBucket,
    /// The next table slot the waves look at (no connection is added while draining, so one
    /// pass over the table reaches every one).
    cursor: u32,
    pub phase: Phase,
}

impl Drain {
    pub fn new(plan: DrainPlan, shards: usize, now: Now) -> Drain {
        let rate = Self::rate(&plan);
        let bucket = TokenBucket::new(&rate, now.ms);
        Drain { deadline_ms: now.ms + plan.deadline_ms, plan, shards, bucket, cursor: 0, phase: Phase::Flushing }
    }

    /// One token a connection; a burst of a tenth of a second (at least one) so waves are smooth.
    fn rate(plan: &DrainPlan) -> Rate {
        Rate { per_s: plan.rate_per_s, burst: (plan.rate_per_s / 10).max(1) }
    }

    /// The delay told to one connection: the plan's, plus its share of the jitter (spread by a
    /// hash of the connection, so the shard needs no random source).
    fn delay_ms(&self, key: ConnKey, generation: u32) -> u32 {
        let mut h = (u64::from(key.0) << 32 | u64::from(generation)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        let spread = u64::from(self.plan.jitter_ms) + 1;
        self.plan.delay_ms.saturating_add((h % spread) as u32)
    }
}

impl Host {
    /// A drain starts: accept nothing more, have this shard's owner flush its rooms; waves
    /// begin once every owner has.
    pub(super) fn start_drain(&mut self, plan: DrainPlan, now: Now) {
        if self.drain.is_some() {
            return;
        }
        self.counters.set(Series::DrainPhase, 1);
        self.drain = Some(Drain::new(plan, self.cfg.shards, now));
        let me = self.cfg.shard;
        self.mail.push((me, OwnerMail::Flush.into()));
        // Another shard's owner may have flushed before this shard heard of the drain.
        self.owner_flushed(0, now);
    }

    /// `owners` more owners have cut their pending messages into blocks (and mailed them before
    /// saying so). They are counted even before this shard hears of the drain: the mesh
    /// orders mail per sender only.
    pub(super) fn owner_flushed(&mut self, owners: usize, now: Now) {
        self.flushed += owners;
        if let Some(d) = &mut self.drain {
            if self.flushed >= d.shards && d.phase == Phase::Flushing {
                d.phase = Phase::Waves;
                self.counters.set(Series::DrainPhase, 2);
                self.drain_turn(now);
            }
        }
    }

    /// Whether a drain has started (the driver stops accepting).
    pub fn draining(&self) -> bool {
        self.drain.is_some()
    }

    /// Milliseconds until the drain has work (`u64::MAX` when none).
    pub(super) fn drain_timeout(&self, now: Now) -> u64 {
        match &self.drain {
            Some(d) if d.phase == Phase::Waves => 10,
            Some(d) if d.phase == Phase::Flushing => d.deadline_ms.saturating_sub(now.ms),
            _ => u64::MAX,
        }
    }

    /// The waves: reconnects within the rate; at the deadline every connection left is closed.
    pub(super) fn drain_turn(&mut self, now: Now) {
        let Some(d) = &self.drain else { return };
        let (phase, past_deadline, cursor) = (d.phase, now.ms >= d.deadline_ms, d.cursor);
        if phase == Phase::Done || (phase == Phase::Flushing && !past_deadline) {
            return;
        }
        let mut sent = 0u64;
        let mut stopped_at = None;
        for key in self.conns.keys_from(cursor) {
            let Some(conn) = self.conns.try_get(key) else { continue };
            let (state, generation) = (conn.state, conn.generation);
            if past_deadline {
                if state != State::Terminating {
                    self.terminate(key, Some(Series::ClosedDrainDeadline));
                }
                continue;
            }
            if state != State::Open {
                continue;
            }
            let Some(d) = &mut self.drain else { return };
            let rate = Drain::rate(&d.plan);
            if !d.bucket.try_take(&rate, now.ms) {
                stopped_at = Some(key.0);
                break;
            }
            let delay_ms = d.delay_ms(key, generation);
            let url = d.plan.url_for(key, generation).to_string();
            let reconnect = Reconnect { delay_ms, reason: d.plan.reason.to_string(), url };
            self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Reconnect(reconnect)) }, now);
            self.fail(key, CloseCode::GOING_AWAY, "server draining", Series::ClosedDrain, now);
            sent += 1;
        }
        self.counters.add(Series::Reconnects, sent);
        let left = self.conns.len();
        self.counters.set(Series::DrainRemaining, left as u64);
        if let Some(d) = &mut self.drain {
            d.cursor = stopped_at.unwrap_or(u32::MAX);
            if left == 0 {
                d.phase = Phase::Done;
                self.counters.set(Series::DrainPhase, 3);
            }
        }
    }
}
