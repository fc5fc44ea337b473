//! The wire schema (`proto/barrage/v1/barrage.proto`) as Rust types: prost for the binary
//! encoding, pbjson for proto3's canonical JSON mapping. Generated at build time.
#![allow(clippy::all, missing_docs)]
#![forbid(unsafe_code)]

include!(concat!(env!("OUT_DIR"), "/barrage.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/barrage.v1.serde.rs"));
