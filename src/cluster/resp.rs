//! Just enough RESP2 for a pub/sub connection, sans-IO: commands out, and an incremental parser
//! for what comes back (subscription confirmations and pushed messages), so the link can read
//! whatever bytes have arrived without blocking and never loses a half-read reply.
#![forbid(unsafe_code)]

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    /// None: the null bulk string.
    Bulk(Option<Vec<u8>>),
    Array(Vec<Value>),
}

/// A reply that is not RESP2, or larger than allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed;

/// Nesting deeper than pub/sub ever sends is refused rather than followed.
const DEPTH_MAX: usize = 4;

/// A command as a RESP array of bulk strings.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The first complete reply in `buf` and the bytes it took; None when more bytes are needed.
/// Bulk strings longer than `bulk_max` are refused. An incomplete reply costs a walk over its
/// headers only (payloads are skipped by length, nothing is copied), so a large message read in
/// many pieces is not re-parsed whole each time.
pub fn parse(buf: &[u8], bulk_max: usize) -> Result<Option<(Value, usize)>, Malformed> {
    if walk(buf, 0, bulk_max, 0, false)?.is_none() {
        return Ok(None);
    }
    Ok(walk(buf, 0, bulk_max, 0, true)?.and_then(|(v, used)| v.map(|v| (v, used))))
}

/// The reply at `at`: where it ends if it is complete, and (when `build`) its value.
fn walk(
    buf: &[u8],
    at: usize,
    bulk_max: usize,
    depth: usize,
    build: bool,
) -> Result<Option<(Option<Value>, usize)>, Malformed> {
    if depth > DEPTH_MAX {
        return Err(Malformed);
    }
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some(end) = line_end(buf, at + 1) else {
        // A header line longer than any valid one is not waited for.
        return if buf.len() - at > 64 && kind != b'+' && kind != b'-' { Err(Malformed) } else { Ok(None) };
    };
    let line = &buf[at + 1..end];
    let next = end + 2;
    let done = |v: Value, to: usize| Ok(Some((build.then_some(v), to)));
    match kind {
        b'+' => done(if build { Value::Simple(text(line)?) } else { Value::Int(0) }, next),
        b'-' => done(if build { Value::Error(text(line)?) } else { Value::Int(0) }, next),
        b':' => done(Value::Int(number(line)?), next),
        b'$' => {
            let n = number(line)?;
            if n == -1 {
                return done(Value::Bulk(None), next);
            }
            let n = usize::try_from(n).map_err(|_| Malformed)?;
            if n > bulk_max {
                return Err(Malformed);
            }
            if buf.len() < next + n + 2 {
                return Ok(None);
            }
            if &buf[next + n..next + n + 2] != b"\r\n" {
                return Err(Malformed);
            }
            let v = if build { Value::Bulk(Some(buf[next..next + n].to_vec())) } else { Value::Bulk(None) };
            done(v, next + n + 2)
        }
        b'*' => {
            let n = number(line)?;
            if n == -1 {
                return done(Value::Array(Vec::new()), next);
            }
            let n = usize::try_from(n).map_err(|_| Malformed)?;
            // Each element takes at least 3 bytes: a count past what could arrive is refused.
            if n > bulk_max / 3 + 1 {
                return Err(Malformed);
            }
            let mut items = Vec::with_capacity(if build { n.min(16) } else { 0 });
            let mut pos = next;
            for _ in 0..n {
                match walk(buf, pos, bulk_max, depth + 1, build)? {
                    Some((v, p)) => {
                        items.extend(v);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            done(Value::Array(items), pos)
        }
        _ => Err(Malformed),
    }
}

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| from + p)
}

fn text(line: &[u8]) -> Result<String, Malformed> {
    String::from_utf8(line.to_vec()).map_err(|_| Malformed)
}

fn number(line: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(line).ok().and_then(|s| s.parse().ok()).ok_or(Malformed)
}

/// What a subscriber connection is pushed.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// A published message: (channel, payload).
    Message(Vec<u8>, Vec<u8>),
    /// A `SUBSCRIBE` took effect for this channel.
    Subscribed(Vec<u8>),
    /// An error reply (refused authentication, too many clients, no permission).
    Error(String),
    /// Anything else (other confirmations).
    Other,
}

pub fn push(v: Value) -> Push {
    let items = match v {
        Value::Array(items) => items,
        Value::Error(e) => return Push::Error(e),
        _ => return Push::Other,
    };
    let mut it = items.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(Value::Bulk(Some(kind))), Some(Value::Bulk(Some(channel))), Some(Value::Bulk(Some(payload))))
            if kind == b"message" =>
        {
            Push::Message(channel, payload)
        }
        (Some(Value::Bulk(Some(kind))), Some(Value::Bulk(Some(channel))), Some(Value::Int(_)))
            if kind == b"subscribe" =>
        {
            Push::Subscribed(channel)
        }
        _ => Push::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Value::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Value::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Value::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Value::Bulk(Some(b)) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            "[a-z ]{0,12}".prop_map(Value::Simple),
            "[A-Z a-z]{0,12}".prop_map(Value::Error),
            any::<i64>().prop_map(Value::Int),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)).prop_map(Value::Bulk),
        ];
        leaf.prop_recursive(2, 16, 4, |inner| proptest::collection::vec(inner, 0..4).prop_map(Value::Array))
    }

    proptest! {
        /// Every reply parses back, and every strict prefix of it asks for more bytes.
        #[test]
        fn replies_parse_whole_and_wait_when_cut(v in value()) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            prop_assert_eq!(parse(&bytes, 1 << 20), Ok(Some((v.clone(), bytes.len()))));
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut], 1 << 20), Ok(None));
            }
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn garbage_is_refused_or_waited_for(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&bytes, 1 << 10);
        }
    }

    #[test]
    fn messages_and_bounds() {
        let pushed = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nabc\r\n";
        let (v, n) = parse(pushed, 1 << 10).unwrap().unwrap();
        assert_eq!(n, pushed.len());
        assert_eq!(push(v), Push::Message(b"ch".to_vec(), b"abc".to_vec()));
        let confirm = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        assert_eq!(push(parse(confirm, 1 << 10).unwrap().unwrap().0), Push::Subscribed(b"ch".to_vec()));
        let gone = b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n";
        assert_eq!(push(parse(gone, 1 << 10).unwrap().unwrap().0), Push::Other);
        let refused = b"-ERR max number of clients reached\r\n";
        assert_eq!(
            push(parse(refused, 1 << 10).unwrap().unwrap().0),
            Push::Error("ERR max number of clients reached".into())
        );
        assert_eq!(parse(b"$100\r\n", 10), Err(Malformed), "longer than allowed");
        assert_eq!(parse(b"?x\r\n", 10), Err(Malformed));
        assert_eq!(command(&[b"SUBSCRIBE", b"a"]), b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n");
    }
}
