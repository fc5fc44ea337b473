#![no_main]
use barrage::wire::handshake::{HandshakeLimits, parse_request};

const LIMITS: HandshakeLimits = HandshakeLimits {
    request_bytes_max: 0x1000,
    headers_max: 0x20,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data, &LIMITS);
});
