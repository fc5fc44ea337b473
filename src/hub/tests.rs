//! Hub-level tests through the public API (the same calls the shard driver makes).
use std::sync::mpsc::sync_channel;

use super::mail::{Mail, Origin, Reply};
use super::{Hub, HubConfig, Now};
use crate::config::Config;
use crate::ids::{ShardId, UnixMs};
use crate::metrics::Series;
use crate::proto::Message;
use crate::room::RoomName;
use crate::room::owner::Sender;

fn at(ms: u64) -> Now {
    Now { ms, unix: UnixMs(1_795_000_000_000 + ms as i64) }
}

fn hub(interval_ms: u64, wait_max_ms: u64) -> Hub {
    let mut c = Config::default();
    c.rooms.block_interval_ms = interval_ms;
    c.rooms.block_wait_max_ms = wait_max_ms;
    Hub::new(HubConfig::new(&c, ShardId(0), 1))
}

fn publish(h: &mut Hub, now: Now) {
    let (tx, _rx) = sync_channel(1);
    let room = RoomName::parse("r", 64).unwrap();
    let msg = Box::new(Message { r#type: "notice".into(), data: b"x".to_vec(), ..Message::default() });
    let sender = Sender::Api { priority_given: false };
    h.on_mail(Mail::Publish { room, msg, sender, origin: Origin::Api(Reply(tx)) }, now);
}

fn blocks(h: &mut Hub) -> u64 {
    h.counters().get(Series::BlocksCut)
}

#[test]
fn a_saturated_shard_defers_blocks_up_to_the_max_wait() {
    let mut h = hub(100, 300);
    publish(&mut h, at(0));
    h.set_busy(900);
    h.on_tick(at(100));
    assert_eq!(blocks(&mut h), 0, "busy: the block waits");
    assert!(h.next_timeout(at(100)) <= 5, "and looks again soon");
    publish(&mut h, at(150));
    h.on_tick(at(250));
    assert_eq!(blocks(&mut h), 0);
    assert!(h.counters().get(Series::BlocksDeferred) >= 2);
    h.on_tick(at(400));
    assert_eq!(blocks(&mut h), 1, "overdue by block_wait_max_ms: cut anyway, both messages in it");
    assert_eq!(h.counters().get(Series::MessagesOut), 2);
    // Idle again: the next block goes out on time.
    h.set_busy(100);
    publish(&mut h, at(410));
    let due = 410 + h.next_timeout(at(410));
    assert!(due <= 500, "the next tick is due by the interval, not later: {due}");
    h.on_tick(at(due));
    assert_eq!(blocks(&mut h), 2);
}

#[test]
fn a_zero_wait_never_defers() {
    let mut h = hub(100, 0);
    publish(&mut h, at(0));
    h.set_busy(1000);
    h.on_tick(at(100));
    assert_eq!(blocks(&mut h), 1);
    assert_eq!(h.counters().get(Series::BlocksDeferred), 0);
}
