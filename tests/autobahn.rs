//! RFC 6455 conformance: the Autobahn|Testsuite fuzzing client (0.8.2, Python 2.7) against the
//! gateway's echo endpoint: every case but permessage-deflate's over plain TCP and over TLS
//! (`wss://`, a certificate the test makes), and permessage-deflate's (12.*, 13.*) with
//! `websocket.deflate` on.
//! Installs the suite (and wsaccel, its C speed-ups) with pip into target/ on first run. Fails
//! on any case Autobahn does not rate OK or INFORMATIONAL: NON-STRICT (a deviation Autobahn
//! tolerates) fails as FAILED does.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Gateway;

const SUITE: &str = "autobahntestsuite==0.8.2";
/// Autobahn's C masking and UTF-8 validation: pure-Python masking makes the 1,000-message
/// permessage-deflate cases take minutes each.
const ACCEL: &str = "wsaccel==0.6.2";
const PYENV_PYTHON27: &str = "/root/.pyenv/versions/2.7.18/bin/python";

fn python27() -> PathBuf {
    if let Ok(p) = std::env::var("BARRAGE_PYTHON27") {
        return PathBuf::from(p);
    }
    if Path::new(PYENV_PYTHON27).exists() {
        return PathBuf::from(PYENV_PYTHON27);
    }
    let found = Command::new("python2.7").arg("--version").status().is_ok_and(|s| s.success());
    assert!(found, "Autobahn|Testsuite needs Python 2.7: set BARRAGE_PYTHON27 or install pyenv's 2.7.18");
    PathBuf::from("python2.7")
}

/// Once per test binary: the tests run in parallel and would race pip over one directory.
fn install(python: &Path) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| install_once(python)).clone()
}

fn install_once(python: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn-py27");
    let ready = dir.join(".ready");
    let want = format!("{SUITE} {ACCEL}");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(want.as_str()) {
        let ok = Command::new(python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", "--target"])
            .arg(&dir)
            .args([SUITE, ACCEL])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {want} failed (wsaccel builds with a C compiler and Python 2.7's headers)");
        std::fs::write(&ready, want).unwrap();
    }
    dir
}

#[test]
fn autobahn_fuzzing_client_reports_no_failures() {
    let max = (16 << 20).to_string();
    let gw = Gateway::start(&["--echo-path", "/echo", "--frame-bytes-max", &max, "--message-bytes-max", &max]);
    fuzz(&format!("ws://{}/echo", gw.ws), "autobahn-report", &["*"], &["12.*", "13.*"], &[], 301);
}

/// RFC 7692 through the echo endpoint: 1,000 messages of each size compressed both ways, in
/// two runs side by side (12.*: the default offer, 13.*: offers with parameters; each takes
/// minutes of the Python client's zlib).
#[test]
fn autobahn_permessage_deflate_12() {
    deflate_cases("12.*", "autobahn-report-deflate-12", 90);
}

/// Offers that ask the server for a window under 15 bits (13.3.*, 13.5.*: `server_max_window_bits=9`)
/// are declined, since one compressed block serves every member and the server cannot shrink
/// it for one: the client goes on uncompressed and Autobahn rates those UNIMPLEMENTED. 13.7.*
/// offers the same first and falls back to an acceptable offer, which is taken.
#[test]
fn autobahn_permessage_deflate_13() {
    deflate_cases("13.*", "autobahn-report-deflate-13", 126);
}

/// permessage-deflate cases whose offer the server declines (see above).
const DECLINED: &[&str] = &["13.3.", "13.5."];

fn deflate_cases(cases: &str, report: &str, min_cases: usize) {
    let max = (16 << 20).to_string();
    let gw = Gateway::start(&[
        "--echo-path",
        "/echo",
        "--frame-bytes-max",
        &max,
        "--message-bytes-max",
        &max,
        "--deflate",
        "true",
        // Kernel autotuning: with a 64 KiB send buffer and loopback's 64 KiB segments, each
        // 100 KB echo waits out the client's delayed ACK (40 ms), 1,000 times per case.
        "--send-buffer-bytes",
        "0",
    ]);
    fuzz(&format!("ws://{}/echo", gw.ws), report, &[cases], &[], DECLINED, min_cases);
}

#[test]
fn autobahn_fuzzing_client_reports_no_failures_over_tls() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn-tls-cert");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let max = (16 << 20).to_string();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    let gw = Gateway::start(&[
        "--echo-path",
        "/echo",
        "--frame-bytes-max",
        &max,
        "--message-bytes-max",
        &max,
        "--tls-cert",
        c.to_str().unwrap(),
        "--tls-key",
        k.to_str().unwrap(),
    ]);
    fuzz(&format!("wss://localhost:{}/echo", gw.ws.port()), "autobahn-report-tls", &["*"], &["12.*", "13.*"], &[], 301);
}

/// Runs `cases` but `exclude` against `url` (at least `min_cases` of them); fails on any not
/// rated OK or INFORMATIONAL, but for the `declined` case groups (id prefixes), which must be
/// rated UNIMPLEMENTED.
fn fuzz(url: &str, report: &str, cases: &[&str], exclude: &[&str], declined: &[&str], min_cases: usize) {
    let python = python27();
    let site = install(&python);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(report);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let spec = serde_json::json!({
        "outdir": out.join("servers"),
        "servers": [{"agent": "barrage", "url": url}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    });
    let spec_path = out.join("fuzzingclient.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn/wstest.py");
    let status = Command::new(&python)
        .arg(runner)
        .arg(&site)
        .args(["-m", "fuzzingclient", "-s"])
        .arg(&spec_path)
        .current_dir(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run wstest");
    assert!(status.success(), "wstest exited with {status}");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("servers/index.json")).unwrap()).unwrap();
    let cases = index["barrage"].as_object().expect("barrage results");
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    let mut bad = Vec::new();
    for (id, result) in cases {
        let is_declined = declined.iter().any(|p| id.starts_with(p));
        for key in ["behavior", "behaviorClose"] {
            let verdict = result[key].as_str().unwrap_or("?");
            if key == "behavior" {
                *tally.entry(verdict.to_string()).or_default() += 1;
            }
            let fine = match (is_declined, key) {
                (true, "behavior") => verdict == "UNIMPLEMENTED",
                _ => {
                    matches!(verdict, "OK" | "INFORMATIONAL" | "UNIMPLEMENTED")
                        && (is_declined || verdict != "UNIMPLEMENTED")
                }
            };
            if !fine {
                bad.push(format!("{id} {key}={verdict}"));
            }
        }
    }
    println!("Autobahn|Testsuite 0.8.2 at {url}: {} cases: {tally:?}", cases.len());
    assert!(cases.len() >= min_cases, "only {} cases ran, expected {min_cases}", cases.len());
    assert!(bad.is_empty(), "Autobahn cases not OK or INFORMATIONAL: {bad:?}");
}
