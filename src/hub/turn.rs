//! One turn of a shard's loop, written once. The io_uring shard (`src/shard`) and the seeded
//! simulation (`tests/sim.rs`) both run it, each with its own [`Driver`]: the simulation tests
//! the order the shard really runs in, not a copy of it.
//!
//! The order: reap completions (accepts, reads, sends, closes) → read mail → timers and block
//! ticks → end of turn (membership reports) → hand writes and loads to the store → post mail
//! to other shards → start sends → start closes. Sends start after everything that queues frames, so one send carries all of them.

use super::mail::Mail;
use super::{Hub, Teardown};
use crate::ids::{ConnKey, Now, ShardId};
use crate::room::durable::StoreOp;

/// What a shard's loop does with the world outside the hub.
pub trait Driver {
    type Error;

    /// Feeds every completion that has arrived to the hub (`handle_accept`, `handle_recv`,
    /// `handle_eof`, `handle_sent`, `release`).
    fn reap(&mut self, hub: &mut Hub, now: Now) -> Result<(), Self::Error>;

    /// The next mail in this shard's inbox.
    fn next_mail(&mut self) -> Option<Mail>;

    /// Offers mail to another shard's inbox; gives it back when that inbox is full.
    fn offer_mail(&mut self, to: ShardId, mail: Mail) -> Result<(), Mail>;

    /// Hands a write or load to durable storage; gives it back when the store cannot take it.
    fn offer_store(&mut self, op: StoreOp) -> Result<(), StoreOp>;

    /// Starts one send of what `hub.poll_send(key, ..)` hands out.
    fn start_send(&mut self, hub: &mut Hub, key: ConnKey) -> Result<(), Self::Error>;

    /// Hands a TLS connection's send keys to the kernel (`hub.poll_kernel_tls`), answering
    /// with `hub.handle_kernel_tls`. A driver without kernel TLS refuses at once.
    fn start_kernel_tls(&mut self, hub: &mut Hub, key: ConnKey) -> Result<(), Self::Error> {
        hub.handle_kernel_tls(key, -95); // EOPNOTSUPP
        Ok(())
    }

    /// Starts ending a connection the hub let go: cancel what it has pending; close it as `how`
    /// says (for `Teardown::Reset`, SO_LINGER 0 first, so the kernel drops its unsent bytes)
    /// and `hub.release` it once nothing is.
    fn start_close(&mut self, hub: &mut Hub, key: ConnKey, how: Teardown) -> Result<(), Self::Error>;
}

/// Work per turn, so no one kind starves the others.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Mail read from the inbox: a flood of mail cannot starve the sockets.
    pub mail: usize,
    /// Sends started: completions are reaped between batches, so a block for a huge room does
    /// not pile its whole fan-out into the completion queues at once.
    pub sends: usize,
}

impl Budget {
    /// The shard's budget.
    pub const SHARD: Budget = Budget { mail: 8192, sends: 32 * 1024 };
}

/// Runs one turn of `hub` with `driver` at `now`.
pub fn turn<D: Driver>(hub: &mut Hub, driver: &mut D, now: Now, budget: Budget) -> Result<(), D::Error> {
    driver.reap(hub, now)?;
    for _ in 0..budget.mail {
        let Some(mail) = driver.next_mail() else { break };
        hub.handle_mail(mail, now);
    }
    if hub.poll_timeout(now) == 0 {
        hub.handle_timeout(now);
    }
    hub.end_turn(now);
    hub.flush_store(&mut |op| driver.offer_store(op), now);
    hub.flush_mail(&mut |to, mail| driver.offer_mail(to, mail));
    for _ in 0..budget.sends {
        let Some(key) = hub.poll_ready() else { break };
        driver.start_send(hub, key)?;
    }
    while let Some(key) = hub.poll_kernel_tls() {
        driver.start_kernel_tls(hub, key)?;
    }
    while let Some((key, how)) = hub.poll_close() {
        driver.start_close(hub, key, how)?;
    }
    Ok(())
}
