//! barrage's `ServerFrame` as an `upgrade` follower reads it, walked as its bytes arrive: which
//! frame it is (its one top-level field: welcome, block, error, kicked, reconnect, ...), each
//! block message's `seq` (`block` 2 → `messages` 4 → `seq` 3), a block's `backfill` (7) and
//! `truncated` (8), a reconnect's `delay_ms` (`reconnect` 8 → 1). Everything else is skipped by
//! length: nothing is copied, decoded into structs or reassembled, and the state between reads
//! is a few dozen bytes whatever the frame's size or where the reads split it (`pbwalk` does the
//! same for `fanout`'s message headers).
#![forbid(unsafe_code)]

/// What the walk found, in frame order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// A top-level field began: the frame's kind (1 welcome, 2 block, 5 error, 7 kicked,
    /// 8 reconnect, ...).
    Frame(u32),
    /// A block message ended; its seq (0 if it had none).
    Message(u64),
    /// A block ended (its flags come after its messages on the wire).
    BlockEnd { backfill: bool, truncated: bool },
    /// A reconnect ended.
    Reconnect { delay_ms: u32 },
}

/// The frame's fields that matter here.
pub const FRAME_WELCOME: u32 = 1;
pub const FRAME_BLOCK: u32 = 2;
pub const FRAME_ERROR: u32 = 5;
pub const FRAME_KICKED: u32 = 7;
pub const FRAME_RECONNECT: u32 = 8;

/// Why a frame was not a `ServerFrame` (the rest of it is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// The level-1 message open, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Outer {
    #[default]
    None,
    Block,
    Reconnect,
}

/// Where a varint value goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    Nothing,
    Seq,
    Backfill,
    Truncated,
    Delay,
}

/// What a length-delimited field opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Into {
    Skipped,
    Block,
    Reconnect,
    Message,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Step {
    /// Reading a field's key.
    #[default]
    Key,
    /// Reading a varint value.
    Value(Take),
    /// Reading the length of a length-delimited field.
    Len(Into),
    /// Skipping bytes up to `until`.
    Skip,
    /// Not protobuf: ignore the rest of the frame.
    Broken,
}

/// The walk through one frame. `pos` counts the frame's bytes walked; the ends are positions
/// (0: nothing open — an opened field's end is never 0, its key and length come first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowWalk {
    pos: u32,
    /// End of the open block or reconnect.
    outer_end: u32,
    /// End of the open block message.
    msg_end: u32,
    until: u32,
    varint: u64,
    seq: u64,
    delay_ms: u32,
    shift: u8,
    outer: Outer,
    step: Step,
    backfill: bool,
    truncated: bool,
}

impl FollowWalk {
    /// Walks the next bytes of the frame; `on` hears what it finds, in order.
    pub fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(Found)) {
        while !bytes.is_empty() {
            bytes = match self.step {
                Step::Key | Step::Value(_) | Step::Len(_) => self.varint_step(bytes, on),
                Step::Skip => {
                    let n = bytes.len().min((self.until - self.pos) as usize);
                    self.pos += n as u32;
                    if self.pos == self.until {
                        self.field_done(on);
                    }
                    &bytes[n..]
                }
                Step::Broken => return,
            };
        }
    }

    /// The frame ended: it was whole if every field it opened closed. Resets for the next.
    pub fn finish(&mut self) -> Result<(), Malformed> {
        let whole = self.step == Step::Key && self.shift == 0 && self.outer_end == 0 && self.msg_end == 0;
        *self = FollowWalk::default();
        if whole { Ok(()) } else { Err(Malformed) }
    }

    /// Reads varint bytes; acts on the value once it is whole.
    fn varint_step<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Found)) -> &'a [u8] {
        for (i, &b) in bytes.iter().enumerate() {
            if self.shift >= 64 {
                self.step = Step::Broken;
                return &[];
            }
            self.varint |= u64::from(b & 0x7F) << self.shift;
            if b & 0x80 != 0 {
                self.shift += 7;
                continue;
            }
            self.pos += i as u32 + 1;
            let v = std::mem::take(&mut self.varint);
            self.shift = 0;
            if self.pos > self.inner_end() {
                self.step = Step::Broken;
                return &[];
            }
            match self.step {
                Step::Key => self.key(v, on),
                Step::Value(take) => {
                    self.take(take, v);
                    self.field_done(on);
                }
                Step::Len(into) => self.open(into, v, on),
                _ => unreachable!("varint_step runs only in varint steps"),
            }
            return &bytes[i + 1..];
        }
        self.pos += bytes.len() as u32;
        &[]
    }

    /// The innermost open field's end (u32::MAX at the top level: the frame ends it).
    fn inner_end(&self) -> u32 {
        match (self.msg_end, self.outer_end) {
            (0, 0) => u32::MAX,
            (0, o) => o,
            (m, _) => m,
        }
    }

    /// A key: decide what its value is to us.
    fn key(&mut self, key: u64, on: &mut impl FnMut(Found)) {
        let (field, wire) = (key >> 3, key & 7);
        let level = if self.msg_end != 0 {
            2
        } else if self.outer_end != 0 {
            1
        } else {
            0
        };
        if level == 0
            && let Ok(f) = u32::try_from(field)
        {
            on(Found::Frame(f));
        }
        self.step = match (level, self.outer, field, wire) {
            (_, _, 0, _) => Step::Broken,
            (0, _, 2, 2) => Step::Len(Into::Block),
            (0, _, 8, 2) => Step::Len(Into::Reconnect),
            (1, Outer::Block, 4, 2) => Step::Len(Into::Message),
            (1, Outer::Block, 7, 0) => Step::Value(Take::Backfill),
            (1, Outer::Block, 8, 0) => Step::Value(Take::Truncated),
            (1, Outer::Reconnect, 1, 0) => Step::Value(Take::Delay),
            (2, _, 3, 0) => Step::Value(Take::Seq),
            (_, _, _, 0) => Step::Value(Take::Nothing),
            (_, _, _, 2) => Step::Len(Into::Skipped),
            (_, _, _, 1) => self.skip(8),
            (_, _, _, 5) => self.skip(4),
            _ => Step::Broken,
        };
    }

    fn take(&mut self, take: Take, v: u64) {
        match take {
            Take::Nothing => {}
            Take::Seq => self.seq = v,
            Take::Backfill => self.backfill = v != 0,
            Take::Truncated => self.truncated = v != 0,
            Take::Delay => self.delay_ms = u32::try_from(v).unwrap_or(u32::MAX),
        }
    }

    fn skip(&mut self, n: u32) -> Step {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.inner_end() => {
                self.until = end;
                Step::Skip
            }
            _ => Step::Broken,
        }
    }

    /// A length: open the field it delimits.
    fn open(&mut self, into: Into, len: u64, on: &mut impl FnMut(Found)) {
        let end = match u32::try_from(len).ok().and_then(|l| self.pos.checked_add(l)) {
            Some(end) if end <= self.inner_end() => end,
            _ => {
                self.step = Step::Broken;
                return;
            }
        };
        self.step = Step::Key;
        match into {
            Into::Block | Into::Reconnect => {
                self.outer = if into == Into::Block { Outer::Block } else { Outer::Reconnect };
                self.outer_end = end;
                (self.backfill, self.truncated, self.delay_ms) = (false, false, 0);
            }
            Into::Message => {
                self.msg_end = end;
                self.seq = 0;
            }
            Into::Skipped => {
                self.until = end;
                self.step = Step::Skip;
            }
        }
        if self.step == Step::Key || self.pos == self.until {
            self.field_done(on);
        }
    }

    /// A field is over: back to keys, closing the message and the block or reconnect that end
    /// here.
    fn field_done(&mut self, on: &mut impl FnMut(Found)) {
        self.step = Step::Key;
        if self.msg_end != 0 && self.pos == self.msg_end {
            self.msg_end = 0;
            on(Found::Message(self.seq));
        }
        if self.outer_end != 0 && self.msg_end == 0 && self.pos == self.outer_end {
            self.outer_end = 0;
            match std::mem::take(&mut self.outer) {
                Outer::Block => on(Found::BlockEnd { backfill: self.backfill, truncated: self.truncated }),
                Outer::Reconnect => on(Found::Reconnect { delay_ms: self.delay_ms }),
                Outer::None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barrage::proto::{Block, Error, Kicked, Message, Reconnect, ServerFrame, Welcome, server_frame::Frame};
    use proptest::prelude::*;
    use prost::Message as _;

    fn encode(f: Frame) -> Vec<u8> {
        ServerFrame { frame: Some(f) }.encode_to_vec()
    }

    /// A block as barrage encodes it, every field of every message set, so the walk has to skip
    /// varints, strings and lengths of every size around the seqs.
    fn block(seqs: &[u64], backfill: bool, truncated: bool) -> Vec<u8> {
        let messages = seqs
            .iter()
            .enumerate()
            .map(|(i, &seq)| Message {
                id: 1 << (i * 7 % 60),
                room: "r3".into(),
                seq,
                r#type: "chat".into(),
                priority: (i % 3) as i32,
                weight: -(i as i32),
                sender: "u".repeat(i * 40 % 300),
                created_ms: 1_700_000_000_000,
                data: vec![b'.'; 100 + i % 200],
                coalesce_key: if i % 2 == 0 { "k".into() } else { String::new() },
                ttl_ms: 10_000,
            })
            .collect();
        encode(Frame::Block(Block {
            room: "r3".into(),
            first_seq: seqs.first().copied().unwrap_or(0),
            last_seq: seqs.last().copied().unwrap_or(0),
            messages,
            online: 500,
            server_ms: -3,
            backfill,
            truncated,
        }))
    }

    /// Frames of every kind the follower meets, and what the walk must find in each.
    fn frames() -> Vec<(Vec<u8>, Vec<Found>)> {
        let base = 1_882_449_317_462_017u64;
        let seqs: Vec<u64> = (base..base + 300).collect();
        let mut many = vec![Found::Frame(FRAME_BLOCK)];
        many.extend(seqs.iter().map(|&s| Found::Message(s)));
        many.push(Found::BlockEnd { backfill: true, truncated: true });
        vec![
            (
                encode(Frame::Welcome(Welcome { conn_id: 77, room: "r3".into(), ..Welcome::default() })),
                vec![Found::Frame(FRAME_WELCOME)],
            ),
            (
                block(&[base, base + 1], false, false),
                vec![
                    Found::Frame(FRAME_BLOCK),
                    Found::Message(base),
                    Found::Message(base + 1),
                    Found::BlockEnd { backfill: false, truncated: false },
                ],
            ),
            (block(&seqs, true, true), many),
            (
                block(&[], true, false),
                vec![Found::Frame(FRAME_BLOCK), Found::BlockEnd { backfill: true, truncated: false }],
            ),
            (
                encode(Frame::Reconnect(Reconnect { delay_ms: 2317, reason: "upgrade".into(), url: String::new() })),
                vec![Found::Frame(FRAME_RECONNECT), Found::Reconnect { delay_ms: 2317 }],
            ),
            (
                encode(Frame::Reconnect(Reconnect::default())),
                vec![Found::Frame(FRAME_RECONNECT), Found::Reconnect { delay_ms: 0 }],
            ),
            (encode(Frame::Error(Error { code: 403, reason: "banned".into() })), vec![Found::Frame(FRAME_ERROR)]),
            (encode(Frame::Kicked(Kicked { reason: "x".into(), room: "r".into() })), vec![Found::Frame(FRAME_KICKED)]),
        ]
    }

    fn walk(frame: &[u8], cuts: &[usize]) -> (Vec<Found>, Result<(), Malformed>) {
        let mut w = FollowWalk::default();
        let mut seen = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&frame.len())) {
            w.feed(&frame[at..cut], &mut |f| seen.push(f));
            at = cut;
        }
        (seen, w.finish())
    }

    #[test]
    fn every_frame_whole_and_split_in_two_anywhere() {
        for (frame, want) in frames() {
            assert_eq!(walk(&frame, &[]), (want.clone(), Ok(())));
            for cut in (0..=frame.len()).step_by(if frame.len() > 2000 { 13 } else { 1 }) {
                assert_eq!(walk(&frame, &[cut]), (want.clone(), Ok(())), "cut {cut}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        for (frame, want) in frames() {
            let cuts: Vec<usize> = (1..frame.len()).collect();
            assert_eq!(walk(&frame, &cuts), (want, Ok(())));
        }
    }

    #[test]
    fn the_walk_is_reusable_and_small() {
        let mut w = FollowWalk::default();
        for (frame, want) in frames().into_iter().cycle().take(20) {
            let mut seen = Vec::new();
            w.feed(&frame, &mut |f| seen.push(f));
            assert_eq!((seen, w.finish()), (want, Ok(())));
        }
        assert!(std::mem::size_of::<FollowWalk>() <= 48, "{}", std::mem::size_of::<FollowWalk>());
    }

    #[test]
    fn malformed_frames_are_told() {
        let (frame, _) = frames().swap_remove(1);
        for len in 1..frame.len() {
            assert_eq!(walk(&frame[..len], &[]).1, Err(Malformed), "cut short at {len}");
        }
        // A block of length 5 holding a message that claims 10 bytes.
        assert_eq!(walk(&[0x12, 0x05, 0x22, 0x0A, 0x18, 0x01, 0x00], &[]).1, Err(Malformed));
        // A seq varint running past its message's end.
        assert_eq!(walk(&[0x12, 0x04, 0x22, 0x02, 0x18, 0x80], &[]).1, Err(Malformed));
        // A fixed64 crossing the block's end.
        assert_eq!(walk(&[0x12, 0x03, 0x09, 1, 2], &[]).1, Err(Malformed));
        assert_eq!(walk(&[0x13, 0x00], &[]).1, Err(Malformed), "wire type 3 (group)");
        assert_eq!(walk(&[0x00], &[]).1, Err(Malformed), "field 0");
        let endless = [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(walk(&endless, &[]).1, Err(Malformed), "an endless varint");
        assert_eq!(walk(&[0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], &[]).1, Err(Malformed), "a 32 GiB block");
    }

    proptest! {
        #[test]
        fn any_split_into_reads_finds_the_same(
            which in 0usize..8,
            cuts in proptest::collection::vec(0usize..70_000, 0..12),
        ) {
            let (frame, want) = frames().swap_remove(which);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (frame.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(walk(&frame, &cuts), (want, Ok(())));
        }
    }
}
