//! The density load generator against the real gateway, CI-sized: 20,000 WebSocket connections
//! from 4 loopback source addresses into 20 rooms, held, then a probe block to every room.
//! Asserts correctness only (every connection held, joined, and reached), never speed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Gateway;

#[test]
fn twenty_thousand_connections_hold_join_and_each_receive_a_block() {
    let gw = Gateway::start_raw(&[
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--connections-max",
        "30000",
        "--idle-timeout-ms",
        "600000",
        "--heartbeat-ms",
        "300000",
    ]);
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("density-connect.json");
    let _ = std::fs::remove_file(&json);
    let out = Command::new(env!("CARGO_BIN_EXE_barrage-load"))
        .args(["connect", "--target", &gw.ws.to_string(), "--api", &gw.api.to_string()])
        .args(["--connections", "20000", "--rooms", "20", "--rate", "20000", "--hold-s", "2"])
        .args(["--sources", "127.0.2.1-127.0.2.4", "--ports", "20000-29999", "--deadline-s", "240"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run barrage-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "barrage-load failed ({}):\n{stdout}\n{stderr}", out.status);
    let text = std::fs::read_to_string(&json).expect("the JSON report");
    let report: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(report["connections_held"], 20000, "{stdout}");
    assert_eq!(report["joined"], 20000, "{stdout}");
    assert_eq!(report["blocks"]["probed_rooms"], 20, "{stdout}");
    assert_eq!(report["blocks"]["missing"], 0, "{stdout}");
    assert_eq!(report["blocks"]["reached"], 20000, "{stdout}");
    assert!(report["samples"].as_array().is_some_and(|s| !s.is_empty()), "{stdout}");
}
