#![no_main]
//! Client bytes cut into reads of one size (the first byte picks it), with small limits so that
//! the size checks and the spill buffer are reached quickly.
use barrage::wire::frame::{CONTROL_PAYLOAD_MAX, HEADER_BYTES_MAX};
use barrage::wire::{Flow, ReadLimits, Reader};

const LIMITS: ReadLimits = ReadLimits {
    frame_bytes_max: 0x100,
    message_bytes_max: 0x400,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut reader = Reader::default();
    for chunk in rest.chunks(usize::from(first).max(1)) {
        let mut read = chunk.to_vec();
        if reader
            .feed(&mut read, &LIMITS, &mut |_| Flow::Continue)
            .is_err()
        {
            return;
        }
        let held_max = LIMITS.message_bytes_max + CONTROL_PAYLOAD_MAX + HEADER_BYTES_MAX;
        assert!(reader.buffered_bytes() <= held_max);
    }
});
