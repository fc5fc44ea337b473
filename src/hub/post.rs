//! The post office: mail this shard sends to other shards, kept per destination until that
//! shard's inbox takes it. Mail to one shard leaves in the order it was posted. A bounded inbox
//! can be full (its shard is busy); then the mail waits here, in the destination's overflow,
//! and is offered again every turn.
//!
//! The overflow is bounded by `mesh_overflow_max` per destination, and only block deliveries
//! may be shed to keep it there, lowest class first, oldest first — by the rules a slow reader's
//! send queue follows — and counted (the members there see a seq gap and fill it by short
//! poll). Control mail (kicks, replicas, refusals, answers) is never dropped: while a
//! destination's overflow is at its bound, the shard refuses *new requests* that would add mail
//! for it (see `is_congested`), so what still arrives is answers to requests already accepted,
//! each of which adds a bounded number of mails.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use super::mail::Mail;
use crate::ids::ShardId;
use crate::room::frames::Class;

/// Outgoing mail of one shard, per destination.
pub struct PostOffice {
    waiting: Box<[VecDeque<Mail>]>,
    overflow_max: usize,
    /// Per destination: the last flush left `overflow_max` or more mails waiting.
    congested: Box<[bool]>,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Mails taken by their inbox.
    pub sent: usize,
    /// Block deliveries shed to keep an overflow within its bound.
    pub shed: u64,
}

impl PostOffice {
    /// An office for `shards` destinations, each overflow bounded at `overflow_max` mails.
    pub fn new(shards: usize, overflow_max: usize) -> PostOffice {
        PostOffice {
            waiting: (0..shards).map(|_| VecDeque::new()).collect(),
            overflow_max,
            congested: vec![false; shards].into_boxed_slice(),
        }
    }

    /// Queues mail for another shard; it leaves at the next `flush`.
    pub fn post(&mut self, to: ShardId, mail: Mail) {
        self.waiting[to.index()].push_back(mail);
    }

    /// Whether the way to `to` is congested: new requests that would add mail for it are
    /// refused until it drains.
    pub fn is_congested(&self, to: ShardId) -> bool {
        self.congested[to.index()]
    }

    /// Mails waiting, all destinations together (a gauge).
    pub fn waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    /// Offers each destination's mail to its inbox, in order, until the inbox refuses one;
    /// then sheds block deliveries where an overflow is over its bound.
    pub fn flush(&mut self, offer: &mut dyn FnMut(ShardId, Mail) -> Result<(), Mail>) -> Flushed {
        let mut flushed = Flushed::default();
        for (i, queue) in self.waiting.iter_mut().enumerate() {
            let to = ShardId(i as u16);
            while let Some(mail) = queue.pop_front() {
                match offer(to, mail) {
                    Ok(()) => flushed.sent += 1,
                    Err(back) => {
                        queue.push_front(back);
                        break;
                    }
                }
            }
            flushed.shed += shed(queue, self.overflow_max);
            self.congested[i] = queue.len() >= self.overflow_max;
        }
        flushed
    }
}

/// Drops block deliveries, lowest class first and oldest first within a class, until `queue`
/// holds at most `max` mails or no delivery is left. Returns how many were dropped.
fn shed(queue: &mut VecDeque<Mail>, max: usize) -> u64 {
    let mut dropped = 0;
    for class in [Class::Low, Class::High, Class::Keep] {
        let mut excess = queue.len().saturating_sub(max);
        if excess == 0 {
            break;
        }
        queue.retain(|mail| {
            let shed = excess > 0 && matches!(mail, Mail::Host(m) if m.delivery_class() == Some(class));
            excess -= usize::from(shed);
            dropped += u64::from(shed);
            !shed
        });
    }
    dropped
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::mail::HostMail;
    use crate::ids::UserId;
    use crate::room::RoomName;
    use crate::room::frames::SharedFrame;

    fn deliver(class: Class, tag: u8) -> Mail {
        let frame = Arc::new(SharedFrame::plain(vec![tag].into(), None, class));
        Mail::Host(HostMail::Deliver { room: RoomName::parse("r", 8).unwrap(), frame })
    }

    fn kick(user: &str) -> Mail {
        let room = RoomName::parse("r", 8).unwrap();
        Mail::Host(HostMail::Kick { room, user: UserId::new(user), reason: Arc::from("x") })
    }

    /// What a mail is, for comparing queues: "k:user" or "d:tag".
    fn label(m: &Mail) -> String {
        match m {
            Mail::Host(HostMail::Kick { user, .. }) => format!("k:{user}"),
            Mail::Host(HostMail::Deliver { frame, .. }) => format!("d:{}", frame.proto[0]),
            _ => "other".into(),
        }
    }

    #[test]
    fn mail_waits_in_order_while_the_inbox_is_full() {
        let mut post = PostOffice::new(2, 8);
        let to = ShardId(1);
        for u in ["a", "b", "c"] {
            post.post(to, kick(u));
        }
        // The inbox takes one, then is full.
        let mut inbox = Vec::new();
        let f = post.flush(&mut |_, m| {
            if !inbox.is_empty() {
                return Err(m);
            }
            inbox.push(label(&m));
            Ok(())
        });
        assert_eq!((f.sent, f.shed, post.waiting()), (1, 0, 2));
        assert!(!post.is_congested(to));
        post.post(to, kick("d"));
        post.flush(&mut |_, m| {
            inbox.push(label(&m));
            Ok(())
        });
        assert_eq!(inbox, ["k:a", "k:b", "k:c", "k:d"], "nothing lost, nothing reordered");
        assert_eq!(post.waiting(), 0);
    }

    #[test]
    fn over_the_bound_only_deliveries_are_shed_lowest_class_first() {
        let mut post = PostOffice::new(1, 4);
        let to = ShardId(0);
        post.post(to, deliver(Class::High, 1));
        post.post(to, kick("a"));
        post.post(to, deliver(Class::Low, 2));
        post.post(to, deliver(Class::Keep, 3));
        post.post(to, kick("b"));
        post.post(to, deliver(Class::Low, 4));
        post.post(to, kick("c"));
        // Nothing fits: 7 waiting, bound 4 — the two low deliveries go, then the oldest high.
        let f = post.flush(&mut |_, m| Err(m));
        assert_eq!(f.shed, 3);
        assert!(post.is_congested(to), "at its bound: new requests are refused");
        let mut left = Vec::new();
        post.flush(&mut |_, m| {
            left.push(label(&m));
            Ok(())
        });
        assert_eq!(left, ["k:a", "d:3", "k:b", "k:c"]);
        assert!(!post.is_congested(to), "drained");
    }

    #[test]
    fn control_mail_is_never_shed_even_past_the_bound() {
        let mut post = PostOffice::new(1, 2);
        for u in ["a", "b", "c", "d"] {
            post.post(ShardId(0), kick(u));
        }
        post.post(ShardId(0), deliver(Class::Keep, 9));
        let f = post.flush(&mut |_, m| Err(m));
        assert_eq!((f.shed, post.waiting()), (1, 4), "the delivery went, every kick stayed");
        assert!(post.is_congested(ShardId(0)));
    }
}
