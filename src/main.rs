//! The `barrage` binary: see `cli.rs`.
fn main() {
    std::process::exit(barrage::cli::main());
}
