//! The mesh: one bounded lock-free inbox per shard, written by other shards and the API threads,
//! with an eventfd wake-up that is written only when the receiving shard is about to sleep.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crossbeam_queue::ArrayQueue;

use super::sys;
use crate::hub::mail::Mail;
use crate::ids::ShardId;

/// One shard's inbox.
pub struct Inbox {
    queue: ArrayQueue<Mail>,
    wake: File,
    /// Set by the shard before it sleeps; a sender that clears it writes the eventfd.
    sleeping: AtomicBool,
    /// The shard's recent loop load in thousandths, published every load window.
    load: AtomicU32,
}

impl Inbox {
    /// Next mail, if any.
    pub fn pop(&self) -> Option<Mail> {
        self.queue.pop()
    }

    /// Announces that the shard will sleep. Returns false if mail is already waiting (then the
    /// shard must not sleep). Pairs with the SeqCst swap in `Mesh::send`: either the sender
    /// sees `sleeping` and wakes us, or we see its mail here.
    pub fn prepare_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.queue.is_empty() {
            return true;
        }
        self.sleeping.store(false, Ordering::SeqCst);
        false
    }

    /// The shard is awake again.
    pub fn woke(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// The eventfd the shard's ring reads (sub-rings also signal it on completions).
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The same eventfd, for a thread that polls it (the cluster link) and drains it with a
    /// read.
    pub fn wake_file(&self) -> &File {
        &self.wake
    }

    /// Publishes this shard's loop load (thousandths) for the other shards' block ticks.
    pub fn set_load(&self, permille: u32) {
        self.load.store(permille, Ordering::Relaxed);
    }

    /// Mail waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Every shard's inbox, and in a cluster one more for the cluster link (`link`), which the
/// shards address like another shard.
pub struct Mesh {
    inboxes: Box<[Inbox]>,
    shards: usize,
}

impl Mesh {
    /// Inboxes of `queue_len` slots for `shards` shards.
    pub fn new(shards: usize, queue_len: usize) -> io::Result<Arc<Mesh>> {
        Self::build(shards, queue_len, false)
    }

    /// The same, plus the cluster link's inbox (`link`).
    pub fn with_link(shards: usize, queue_len: usize) -> io::Result<Arc<Mesh>> {
        Self::build(shards, queue_len, true)
    }

    fn build(shards: usize, queue_len: usize, link: bool) -> io::Result<Arc<Mesh>> {
        let inboxes = (0..shards + usize::from(link))
            .map(|_| {
                Ok(Inbox {
                    queue: ArrayQueue::new(queue_len),
                    wake: sys::eventfd()?,
                    sleeping: AtomicBool::new(false),
                    load: AtomicU32::new(0),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Arc::new(Mesh { inboxes: inboxes.into_boxed_slice(), shards }))
    }

    /// Shards (the link not counted).
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The cluster link's address, when there is one: one past the last shard.
    pub fn link(&self) -> Option<ShardId> {
        (self.inboxes.len() > self.shards).then_some(ShardId(self.shards as u16))
    }

    pub fn inbox(&self, shard: ShardId) -> &Inbox {
        &self.inboxes[shard.index()]
    }

    /// The busiest shard's published load: a room's block fans out on every shard with members,
    /// so its owner waits while any of them is saturated, not only itself.
    pub fn max_load(&self) -> u32 {
        self.inboxes.iter().map(|i| i.load.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    /// Posts mail to a shard; gives it back when the inbox is full.
    pub fn send(&self, to: ShardId, mail: Mail) -> Result<(), Mail> {
        let inbox = &self.inboxes[to.index()];
        inbox.queue.push(mail)?;
        if inbox.sleeping.load(Ordering::SeqCst) && inbox.sleeping.swap(false, Ordering::SeqCst) {
            // Nonblocking eventfd write: it fails only if the counter would overflow, and then
            // the shard is awake anyway.
            let _ = (&inbox.wake).write(&1u64.to_ne_bytes());
        }
        Ok(())
    }

    /// Wakes a shard whatever it is doing (used to stop it).
    pub fn wake(&self, to: ShardId) {
        let _ = (&self.inboxes[to.index()].wake).write(&1u64.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::mail::HostMail;

    #[test]
    fn max_load_is_the_busiest_shards() {
        let mesh = Mesh::new(3, 4).unwrap();
        assert_eq!(mesh.max_load(), 0);
        mesh.inbox(ShardId(1)).set_load(900);
        mesh.inbox(ShardId(2)).set_load(300);
        assert_eq!(mesh.max_load(), 900);
        mesh.inbox(ShardId(1)).set_load(100);
        assert_eq!(mesh.max_load(), 300);
    }

    #[test]
    fn a_full_inbox_gives_mail_back_and_a_sleeping_shard_is_woken_once() {
        let mesh = Mesh::new(2, 64).unwrap();
        let to = ShardId(1);
        let inbox = mesh.inbox(to);
        assert!(inbox.prepare_sleep(), "nothing waiting: may sleep");
        mesh.send(to, Mail::from(HostMail::Stop)).unwrap_or_else(|_| panic!("room for one"));
        let mut counter = [0u8; 8];
        use std::io::Read;
        assert_eq!((&inbox.wake).read(&mut counter).unwrap(), 8, "the sleeper was woken");
        for _ in 1..64 {
            assert!(mesh.send(to, Mail::from(HostMail::Stop)).is_ok());
        }
        assert!(mesh.send(to, Mail::from(HostMail::Stop)).is_err(), "the 65th mail does not fit");
        assert!((&inbox.wake).read(&mut counter).is_err(), "no wake-ups while awake");
        assert!(!inbox.prepare_sleep(), "mail is waiting: must not sleep");
        assert_eq!(inbox.len(), 64);
    }
}
