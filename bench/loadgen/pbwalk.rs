//! barrage's `ServerFrame`, walked as its bytes arrive: a hand-rolled protobuf reader that
//! follows `block` (field 2) → `messages` (field 4) → `data` (field 9) and keeps, per message,
//! only the first `HEADER_BYTES` of its data; everything else is skipped by length. Nothing is
//! decoded into owned structs and nothing is reassembled: the state between reads (a varint in
//! progress, the nested ends, the header so far) is about 60 bytes whatever the frame's size or
//! where the reads split it.
#![forbid(unsafe_code)]

use crate::fanout_msg::HEADER_BYTES;

/// What the walk found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    /// A `welcome` (field 1 of `ServerFrame`).
    Welcome,
    /// A block's message whose data starts with a full header.
    Message(&'a [u8; HEADER_BYTES]),
    /// A block's message without data, or with less than a header of it.
    Short,
}

/// Why a frame was not a `ServerFrame` (the rest of it is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Step {
    /// Reading a field's key.
    #[default]
    Key,
    /// Reading a varint value nobody needs.
    SkipVarint,
    /// Reading the length of a length-delimited field, to open it as `Into`.
    Len(Into),
    /// Skipping bytes up to `until`.
    Skip,
    /// A message's data, up to `until`: the header is kept, the rest skipped.
    Data,
    /// Not protobuf: ignore the rest of the frame.
    Broken,
}

/// What a length-delimited field opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Into {
    Skipped,
    Block,
    Message,
    Data,
}

/// The walk through one frame. `pos` counts the frame's bytes walked; the ends are positions
/// (0: not inside one — an opened field's end is never 0, its key and length come first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PbWalk {
    pos: u32,
    block_end: u32,
    msg_end: u32,
    until: u32,
    varint: u64,
    shift: u8,
    step: Step,
    has_data: bool,
    hdr_len: u8,
    hdr: [u8; HEADER_BYTES],
}

impl PbWalk {
    /// Walks the next bytes of the frame; `on` hears of each welcome and message in order.
    pub fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(Found<'_>)) {
        while !bytes.is_empty() {
            bytes = match self.step {
                Step::Key if self.msg_end != 0 && (self.msg_end - self.pos) as usize <= bytes.len() => {
                    match self.whole_message(bytes, on) {
                        Some(rest) => rest,
                        None => self.varint_step(bytes, on),
                    }
                }
                Step::Key | Step::SkipVarint | Step::Len(_) => self.varint_step(bytes, on),
                Step::Skip => {
                    let rest = self.advance(bytes);
                    if self.pos == self.until {
                        self.field_done(on);
                    }
                    rest
                }
                Step::Data => self.data(bytes, on),
                Step::Broken => return,
            };
        }
    }

    /// The frame ended: it was whole if every field it opened closed. Resets for the next.
    pub fn finish(&mut self) -> Result<(), Malformed> {
        let whole = self.step == Step::Key && self.block_end == 0 && self.msg_end == 0;
        *self = PbWalk::default();
        if whole { Ok(()) } else { Err(Malformed) }
    }

    /// The fast path: the rest of the open message is all in `bytes`, so walk it as a slice.
    /// Commits only if the whole rest parses; otherwise (None) the byte-wise walk takes over and
    /// reaches the same verdict.
    fn whole_message<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Found<'_>)) -> Option<&'a [u8]> {
        let n = (self.msg_end - self.pos) as usize;
        let body = &bytes[..n];
        let (mut i, mut data) = (0, None);
        while i < n {
            let (key, k) = varint(&body[i..])?;
            i += k;
            match (key >> 3, key & 7) {
                (0, _) => return None,
                (_, 0) => i += varint(&body[i..])?.1,
                (_, 1) => i += 8,
                (_, 5) => i += 4,
                (field, 2) => {
                    let (len, k) = varint(&body[i..])?;
                    i += k;
                    let len = usize::try_from(len).ok().filter(|l| *l <= n - i)?;
                    if field == 9 {
                        data = Some(&body[i..i + len]);
                    }
                    i += len;
                }
                _ => return None,
            }
        }
        if i != n {
            return None;
        }
        // The last data field wins (as in the byte-wise walk), which may have come in an
        // earlier read.
        if let Some(d) = data {
            let h = d.len().min(HEADER_BYTES);
            self.hdr[..h].copy_from_slice(&d[..h]);
            self.hdr_len = h as u8;
            self.has_data = true;
        }
        self.pos = self.msg_end;
        self.field_done(on);
        Some(&bytes[n..])
    }

    /// Skips up to `until`; returns what is left of `bytes`.
    fn advance<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let n = bytes.len().min((self.until - self.pos) as usize);
        self.pos += n as u32;
        &bytes[n..]
    }

    fn data<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Found<'_>)) -> &'a [u8] {
        let have = usize::from(self.hdr_len);
        let n = (HEADER_BYTES - have).min((self.until - self.pos) as usize).min(bytes.len());
        self.hdr[have..have + n].copy_from_slice(&bytes[..n]);
        self.hdr_len += n as u8;
        self.pos += n as u32;
        let rest = self.advance(&bytes[n..]);
        if self.pos == self.until {
            self.field_done(on);
        }
        rest
    }

    /// Reads varint bytes; acts on the value once it is whole.
    fn varint_step<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Found<'_>)) -> &'a [u8] {
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
                Step::SkipVarint => self.field_done(on),
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
        match (self.msg_end, self.block_end) {
            (0, 0) => u32::MAX,
            (0, b) => b,
            (m, _) => m,
        }
    }

    /// A key: decide what its value is to us.
    fn key(&mut self, key: u64, on: &mut impl FnMut(Found<'_>)) {
        let (field, wire) = (key >> 3, key & 7);
        let level = if self.msg_end != 0 {
            2
        } else if self.block_end != 0 {
            1
        } else {
            0
        };
        self.step = match (level, field, wire) {
            (_, 0, _) => Step::Broken,
            (0, 1, 2) => {
                on(Found::Welcome);
                Step::Len(Into::Skipped)
            }
            (0, 2, 2) => Step::Len(Into::Block),
            (1, 4, 2) => Step::Len(Into::Message),
            (2, 9, 2) => Step::Len(Into::Data),
            (_, _, 0) => Step::SkipVarint,
            (_, _, 2) => Step::Len(Into::Skipped),
            (_, _, 1) => self.skip(8),
            (_, _, 5) => self.skip(4),
            _ => Step::Broken,
        };
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
    fn open(&mut self, into: Into, len: u64, on: &mut impl FnMut(Found<'_>)) {
        let end = match u32::try_from(len).ok().and_then(|l| self.pos.checked_add(l)) {
            Some(end) if end <= self.inner_end() => end,
            _ => {
                self.step = Step::Broken;
                return;
            }
        };
        self.step = Step::Key;
        match into {
            Into::Block => self.block_end = end,
            Into::Message => {
                self.msg_end = end;
                self.has_data = false;
                self.hdr_len = 0;
            }
            Into::Data => {
                self.has_data = true;
                self.hdr_len = 0;
                self.until = end;
                self.step = Step::Data;
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

    /// A field is over: back to keys, closing the message and block that end here.
    fn field_done(&mut self, on: &mut impl FnMut(Found<'_>)) {
        self.step = Step::Key;
        if self.msg_end != 0 && self.pos == self.msg_end {
            self.msg_end = 0;
            if self.has_data && usize::from(self.hdr_len) == HEADER_BYTES {
                on(Found::Message(&self.hdr));
            } else {
                on(Found::Short);
            }
        }
        if self.block_end != 0 && self.msg_end == 0 && self.pos == self.block_end {
            self.block_end = 0;
        }
    }
}

/// A whole varint at the start of `b`: (value, bytes); None if it does not end within 10 bytes
/// or within `b`.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout_msg::{Header, message};
    use barrage::proto::{Block, Message, ServerFrame, Welcome, server_frame};
    use proptest::prelude::*;
    use prost::Message as _;

    fn data(seq: u64, len: usize) -> Vec<u8> {
        let mut m = Vec::new();
        message(&Header { seq, send_ns: 1000 + seq, room: 3, publisher: 1 }, len, &mut m);
        m
    }

    /// A block as barrage encodes it: every field of every message set, so the walker has to
    /// skip varints, strings, and lengths of every size around the data.
    fn block_frame(datas: &[Vec<u8>]) -> Vec<u8> {
        let messages = datas
            .iter()
            .enumerate()
            .map(|(i, d)| Message {
                id: 1 << (i * 7 % 60),
                room: "r3".into(),
                seq: 1_882_449_317_462_017 + i as u64,
                r#type: "chat".into(),
                priority: (i % 3) as i32,
                weight: -(i as i32),
                sender: "u".repeat(i * 40),
                created_ms: 1_700_000_000_000,
                data: d.clone(),
                coalesce_key: if i % 2 == 0 { "k".into() } else { String::new() },
                ttl_ms: 10_000,
            })
            .collect();
        let block = Block {
            room: "r3".into(),
            first_seq: 5,
            last_seq: 9,
            messages,
            online: 500,
            server_ms: -3,
            ..Block::default()
        };
        ServerFrame { frame: Some(server_frame::Frame::Block(block)) }.encode_to_vec()
    }

    fn welcome_frame() -> Vec<u8> {
        let w = Welcome { conn_id: 77, heartbeat_ms: 30_000, server_ms: 1, room: "r3".into(), ..Welcome::default() };
        ServerFrame { frame: Some(server_frame::Frame::Welcome(w)) }.encode_to_vec()
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Seen {
        Welcome,
        Seq(u64),
        Short,
    }

    fn walk(frame: &[u8], cuts: &[usize]) -> (Vec<Seen>, Result<(), Malformed>) {
        let mut w = PbWalk::default();
        let mut seen = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&frame.len())) {
            w.feed(&frame[at..cut], &mut |f| {
                seen.push(match f {
                    Found::Welcome => Seen::Welcome,
                    Found::Message(h) => Seen::Seq(Header::read(h).seq),
                    Found::Short => Seen::Short,
                })
            });
            at = cut;
        }
        (seen, w.finish())
    }

    fn mixed() -> (Vec<u8>, Vec<Seen>) {
        let datas = vec![data(0, 100), data(1, 24), vec![1, 2, 3], data(3, 300), Vec::new(), data(5, 100)];
        let want = vec![Seen::Seq(0), Seen::Seq(1), Seen::Short, Seen::Seq(3), Seen::Short, Seen::Seq(5)];
        (block_frame(&datas), want)
    }

    #[test]
    fn a_welcome_and_a_block_whole() {
        assert_eq!(walk(&welcome_frame(), &[]), (vec![Seen::Welcome], Ok(())));
        let (frame, want) = mixed();
        assert_eq!(walk(&frame, &[]), (want, Ok(())));
        assert_eq!(walk(&block_frame(&[]), &[]), (vec![], Ok(())));
    }

    #[test]
    fn every_two_way_split_of_a_block_gives_the_same_messages() {
        let (frame, want) = mixed();
        for cut in 0..=frame.len() {
            assert_eq!(walk(&frame, &[cut]), (want.clone(), Ok(())), "cut {cut}");
        }
    }

    #[test]
    fn every_three_way_split_of_a_small_block() {
        let frame = block_frame(&[data(7, 30), vec![9; 5]]);
        let want = vec![Seen::Seq(7), Seen::Short];
        for a in 0..=frame.len() {
            for b in a..=frame.len() {
                assert_eq!(walk(&frame, &[a, b]), (want.clone(), Ok(())), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_and_a_big_block() {
        let datas: Vec<Vec<u8>> = (0..1000).map(|i| data(i, 100)).collect();
        let frame = block_frame(&datas);
        assert!(frame.len() > 100_000);
        let want: Vec<Seen> = (0..1000).map(Seen::Seq).collect();
        let cuts: Vec<usize> = (1..frame.len()).collect();
        assert_eq!(walk(&frame, &cuts), (want.clone(), Ok(())));
        let cuts: Vec<usize> = (1..frame.len()).step_by(4093).collect();
        assert_eq!(walk(&frame, &cuts), (want, Ok(())));
    }

    #[test]
    fn data_read_before_the_fast_path_takes_the_rest_is_kept() {
        // A message: data first, then a long string field; cut right after the data so the
        // rest (a whole tail) goes by the fast path.
        let mut m = vec![0x4A, 24];
        m.extend_from_slice(&data(11, 24));
        m.extend_from_slice(&[0x3A, 3, b'a', b'b', b'c', 0x08, 0x05]);
        let mut f = vec![0x12, (m.len() + 2) as u8, 0x22, m.len() as u8];
        f.extend_from_slice(&m);
        for cut in 0..=f.len() {
            assert_eq!(walk(&f, &[cut]), (vec![Seen::Seq(11)], Ok(())), "cut {cut}");
        }
    }

    #[test]
    fn the_walker_is_reusable_and_small() {
        let (frame, want) = mixed();
        let mut w = PbWalk::default();
        for _ in 0..3 {
            let mut n = 0;
            w.feed(&frame, &mut |_| n += 1);
            assert_eq!(n, want.len());
            assert_eq!(w.finish(), Ok(()));
        }
        assert!(std::mem::size_of::<PbWalk>() <= 64, "{}", std::mem::size_of::<PbWalk>());
    }

    #[test]
    fn nested_lengths_that_overrun_their_parent_are_malformed() {
        // A block of length 5 holding a message that claims 10 bytes.
        let frame = [0x12, 0x05, 0x22, 0x0A, 0x4A, 0x01, 0x00];
        assert_eq!(walk(&frame, &[]).1, Err(Malformed));
        // A message whose data claims more than the message holds.
        let frame = [0x12, 0x04, 0x22, 0x02, 0x4A, 0x05];
        assert_eq!(walk(&frame, &[]).1, Err(Malformed));
        // A fixed64 field crossing the message's end.
        let frame = [0x12, 0x05, 0x22, 0x03, 0x09, 1, 2];
        assert_eq!(walk(&frame, &[]).1, Err(Malformed));
        // A varint running past the message's end.
        let frame = [0x12, 0x05, 0x22, 0x02, 0x08, 0x80, 0x01];
        assert_eq!(walk(&frame, &[]).1, Err(Malformed));
    }

    #[test]
    fn truncated_and_garbage_frames_are_malformed() {
        let (frame, _) = mixed();
        for len in 1..frame.len() {
            let (_, r) = walk(&frame[..len], &[]);
            // A cut can only look whole where the block's length ended, which it never does early.
            assert_eq!(r, Err(Malformed), "len {len}");
        }
        assert_eq!(walk(&[0x13, 0x00], &[]).1, Err(Malformed), "wire type 3 (group)");
        assert_eq!(walk(&[0x00], &[]).1, Err(Malformed), "field 0");
        let endless = [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(walk(&endless, &[]).1, Err(Malformed), "an endless varint");
        assert_eq!(walk(&[0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], &[]).1, Err(Malformed), "a 32 GiB block");
    }

    #[test]
    fn fields_it_does_not_know_are_skipped_at_every_level() {
        // ServerFrame { pong(6) {1: 5}, block { online(5) fixed64-ish junk..., messages [..] } }
        let mut f = vec![0x32, 0x02, 0x08, 0x05];
        let m = {
            let mut m = vec![0x0D, 1, 2, 3, 4, 0x11, 1, 2, 3, 4, 5, 6, 7, 8, 0x4A, 24];
            m.extend_from_slice(&data(42, 24));
            m.extend_from_slice(&[0x52, 0x00]);
            m
        };
        let mut b = vec![0x28, 0x96, 0x01, 0x22, m.len() as u8];
        b.extend_from_slice(&m);
        f.extend_from_slice(&[0x12, b.len() as u8]);
        f.extend_from_slice(&b);
        f.extend_from_slice(&[0x4A, 0x00]);
        for cut in 0..=f.len() {
            assert_eq!(walk(&f, &[cut]), (vec![Seen::Seq(42)], Ok(())), "cut {cut}");
        }
    }

    proptest! {
        #[test]
        fn any_split_into_reads_gives_the_same_messages(
            lens in proptest::collection::vec(0usize..400, 0..20),
            cuts in proptest::collection::vec(0usize..10_000, 0..12),
        ) {
            let datas: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &l)| if l < HEADER_BYTES { vec![0; l] } else { data(i as u64, l) }).collect();
            let want: Vec<Seen> = lens.iter().enumerate().map(|(i, &l)| if l < HEADER_BYTES { Seen::Short } else { Seen::Seq(i as u64) }).collect();
            let frame = block_frame(&datas);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (frame.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(walk(&frame, &cuts), (want, Ok(())));
        }
    }
}
