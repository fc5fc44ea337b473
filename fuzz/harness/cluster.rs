//! What a cluster node reads from Redis: RESP replies on its subscriber connection (cut into
//! reads of one size, the first byte picks it), each pushed message's payload decoded as a
//! relayed message, frames rebuilt. Nothing may panic; a parse never claims more bytes than it
//! was given, and a complete reply parses the same from its own bytes alone.
use barrage::cluster::relay::{self, Body, Relay};
use barrage::cluster::resp;
use prost::Message as _;

const BULK_MAX: usize = 1 << 16;

pub fn relay(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else { return };
    let step = usize::from(first % 32) + 1;
    let mut buf = Vec::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match resp::parse(&buf, BULK_MAX) {
                Ok(Some((value, used))) => {
                    assert!(used <= buf.len());
                    assert_eq!(resp::parse(&buf[..used], BULK_MAX), Ok(Some((value.clone(), used))));
                    buf.drain(..used);
                    if let resp::Push::Message(channel, payload) = resp::push(value) {
                        take(&channel, &payload);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn take(channel: &[u8], payload: &[u8]) {
    let channels = relay::Channels::new("barrage:");
    if let Ok(c) = std::str::from_utf8(channel) {
        let _ = channels.room_of(c).and_then(relay::room);
    }
    let Ok(r) = Relay::decode(payload) else { return };
    match r.body {
        Some(Body::Frame(f)) => {
            let (proto, json) = (f.proto.clone(), f.json.clone());
            let frame = relay::frame_in(f);
            assert_eq!((&*frame.proto, frame.json.as_deref()), (&proto[..], json.as_deref()), "byte for byte");
        }
        Some(Body::Moderate(m)) => {
            let _ = relay::action(m.action, m.until_ms);
        }
        Some(Body::Answer(a)) => {
            let _ = relay::lists_in(a.entries);
            if let Some(e) = a.error {
                let _ = (relay::publish_error(e), relay::moderation_error(e), relay::attr_error(e));
            }
        }
        Some(Body::Refused(x)) => {
            let _ = relay::known_reason(&x.reason);
        }
        _ => {}
    }
}
