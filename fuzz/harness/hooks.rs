//! What a hook worker reads from a business backend: an HTTP response cut into reads of one
//! size (the first byte picks it; the second picks the body format), then the body decoded as a
//! `HookResponse` and judged against a batch of send calls (rewrites bounded). Nothing may
//! panic; once a prefix parses whole, the whole input parses the same; every verdict's rewrite
//! stays within the bounds.
use barrage::config::{Config, HookFormat};
use barrage::hooks::call::{self, Call, SendCall, SendRules, Verdict};
use barrage::hooks::http::{self, Parsed};
use barrage::hub::mail::ConnAt;
use barrage::ids::{ConnId, ConnKey, ShardId, UserId};
use barrage::proto::Message;
use barrage::room::{Priority, RoomName};

const BODY_MAX: usize = 1 << 16;
const DATA_MAX: usize = 64;

pub fn response(data: &[u8]) {
    let [first, second, rest @ ..] = data else { return };
    let step = usize::from(first % 32) + 1;
    let format = if second % 2 == 0 { HookFormat::Json } else { HookFormat::Protobuf };
    let mut end = 0;
    let parsed = loop {
        end = (end + step).min(rest.len());
        let eof = end == rest.len();
        match http::parse_response(&rest[..end], eof, BODY_MAX) {
            Ok(Parsed::Partial) if !eof => continue,
            Ok(Parsed::Partial) => return,
            Ok(Parsed::Complete(r)) => {
                assert!(r.body.len() <= BODY_MAX);
                break r;
            }
            Err(_) => return,
        }
    };
    if let Ok(Parsed::Complete(again)) = http::parse_response(rest, true, BODY_MAX) {
        assert_eq!(again.status, parsed.status);
    }
    let Ok(resp) = call::decode(&parsed.body, format) else { return };
    let rules = SendRules { data_bytes_max: DATA_MAX, types: std::sync::Arc::new(Config::default().types) };
    let calls: Vec<Call> = (0..3).map(send_call).collect();
    let mut out = Vec::new();
    if call::judge(calls, resp, &rules, &mut out).is_err() {
        return;
    }
    for (verdict, _) in out {
        if let Verdict::Send { call, outcome: Ok(()) } = verdict {
            assert!(call.msg.data.len() <= DATA_MAX);
            assert!(!call.msg.r#type.is_empty() && call.msg.r#type.len() <= 32);
            assert!(call.msg.coalesce_key.len() <= 64);
        }
    }
}

fn send_call(i: u32) -> Call {
    let at = ConnAt { shard: ShardId(0), conn: ConnId { key: ConnKey(i), generation: 1 } };
    Call::Send(Box::new(SendCall {
        room: RoomName::parse("r", 64).unwrap_or_else(|_| unreachable!()),
        msg: Message { r#type: "chat".into(), data: b"hello".to_vec(), ..Message::default() },
        user: UserId::new("u"),
        weight: 0,
        priority: Priority::Low,
        from: at,
        ack: None,
    }))
}
