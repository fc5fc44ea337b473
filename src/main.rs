//! The `barrage` binary: see `cli.rs`.
#![forbid(unsafe_code)]
fn main() {
    std::process::exit(barrage::cli::main());
}
