//! Replays every input the fuzzers keep through the harness the cargo-fuzz targets run
//! (`fuzz/harness/`): `fuzz/seeds/<target>/` (starting points) and `fuzz/regressions/<target>/`
//! (every crash found, kept once fixed). CI holds them without a fuzzer or a nightly compiler.
use std::path::Path;

#[path = "../fuzz/harness/mod.rs"]
mod harness;

#[test]
fn every_kept_fuzz_input_replays_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let (mut replayed, mut failed) = (0, Vec::new());
    for (target, run) in harness::TARGETS {
        for kept in ["seeds", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root.join(kept).join(target)) else { continue };
            let mut paths: Vec<_> = dir.map(|entry| entry.unwrap().path()).collect();
            paths.sort();
            for path in paths {
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    failed.push(path.display().to_string());
                }
                replayed += 1;
            }
        }
    }
    assert!(failed.is_empty(), "fuzz inputs that fail again: {failed:?}");
    assert!(replayed >= 12, "only {replayed} inputs found under {}", root.display());
}
