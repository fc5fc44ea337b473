//! The TypeScript SDK (`sdk/js`, npm package `barrage-client`) against the real binary: its own
//! test suite (`node --test`: the pure parts, the generated code being current, and live tests
//! of order, duplicates, gap filling, resume across a restart, attributes, short-poll fallback
//! and acknowledged sends, and the demo page in headless Chromium) run with this build's
//! `barrage`. Installs Node and Chromium from Debian when the machine has none, and the SDK's
//! packages from npm (`npm ci`, pinned by package-lock.json).
use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// `node` and `npm`, installed with apt when missing.
fn ensure_node() {
    if run(Command::new("node").arg("--version")) && run(Command::new("npm").arg("--version")) {
        return;
    }
    let ok = run(Command::new("apt-get").arg("update").arg("-qq"))
        && run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "nodejs", "npm"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(ok, "node and npm are needed for the SDK tests: apt-get install nodejs npm failed");
}

/// Debian's `chromium`, for the demo's browser test, installed with apt when missing.
fn ensure_chromium() {
    if ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().any(|p| Path::new(p).exists()) {
        return;
    }
    let ok = run(Command::new("apt-get").arg("update").arg("-qq"))
        && run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(ok, "Chromium is needed for the demo's browser test: apt-get install chromium failed");
}

#[test]
fn the_typescript_sdk_passes_its_suite_against_this_build() {
    ensure_node();
    ensure_chromium();
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/js");
    if !sdk.join("node_modules/.package-lock.json").exists() {
        let ok = run(Command::new("npm").args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&sdk));
        assert!(ok, "npm ci in sdk/js failed");
    }
    assert!(run(Command::new("npm").args(["run", "--silent", "build"]).current_dir(&sdk)), "tsc failed");
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "test/"])
        .current_dir(&sdk)
        .env("BARRAGE_BIN", env!("CARGO_BIN_EXE_barrage"))
        .output()
        .expect("node --test");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the SDK's tests failed:\n{report}\n{}", String::from_utf8_lossy(&out.stderr));
    // The spec reporter's summary: `ℹ pass N`.
    let passed =
        report.lines().find_map(|l| l.trim_start_matches('ℹ').trim().strip_prefix("pass ")?.parse::<u32>().ok());
    assert!(passed >= Some(14), "fewer SDK tests ran than exist ({passed:?}):\n{report}");
}
