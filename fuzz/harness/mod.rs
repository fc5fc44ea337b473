//! What each fuzz target does with one input, written once: the targets in `fuzz_targets/` call
//! these, and so does `tests/fuzz_regressions.rs`, which replays the kept inputs in
//! `fuzz/seeds/` and `fuzz/regressions/` in the normal test suite. Both include this directory
//! with `#[path]`, so it uses only `barrage`'s public API, `prost` and `serde_json`.
pub mod cluster;
pub mod envelope;
pub mod hooks;
pub mod wire;

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// Every target, by the name of its directory under `fuzz/seeds/` and `fuzz/regressions/`.
pub const TARGETS: [(&str, Target); 7] = [
    ("handshake", wire::handshake),
    ("frame_reader", wire::frame_reader),
    ("envelope", envelope::run),
    ("proxy", wire::proxy),
    ("cluster_relay", cluster::relay),
    ("hook_response", hooks::response),
    ("deflate", wire::deflate),
];
