//! The `fanout` scenario of the load generator against the real gateway, CI-sized: 500
//! subscribers in 2 rooms, 200 messages a second for 2 s through the business API (protobuf),
//! received inside block frames. Asserts correctness only (everyone subscribed, every message
//! reached every member of its room, every delivery timed), never speed.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Gateway;

#[test]
fn five_hundred_members_in_two_rooms_receive_every_message() {
    let gw = Gateway::start_raw(&[
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--block-interval-ms",
        "50",
        "--block-messages-max",
        "1000",
        "--pending-messages-max",
        "100000",
        "--room-rate-per-s",
        "0",
    ]);
    let json = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fanout.json");
    let _ = std::fs::remove_file(&json);
    let out = Command::new(env!("CARGO_BIN_EXE_barrage-load"))
        .args(["fanout", "--kind", "barrage", "--target", &gw.ws.to_string(), "--api", &gw.api.to_string()])
        .args(["--members", "500", "--rooms", "2", "--rate", "200", "--duration-s", "2"])
        .args(["--sources", "127.0.3.1-127.0.3.2", "--ports", "30000-30999", "--deadline-s", "120"])
        .args(["--label", "ci"])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run barrage-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "barrage-load failed ({}):\n{stdout}\n{stderr}", out.status);
    let text = std::fs::read_to_string(&json).expect("the JSON report");
    let r: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {text}"));
    assert_eq!(r["scenario"], "fanout");
    assert_eq!(
        (r["kind"].as_str(), r["mode"].as_str(), r["label"].as_str()),
        (Some("barrage"), Some("rate"), Some("ci"))
    );
    assert_eq!(n("subscribed"), 500, "{stdout}");
    let published = n("published");
    // 200/s for 2 s, give or take the pacing's edges and a slow API turn.
    assert!((300..=420).contains(&published), "published {published}\n{stdout}");
    assert_eq!(n("expected"), published * 250, "{stdout}");
    assert_eq!(n("delivered"), published * 250, "lossless\n{stdout}");
    assert_eq!(n("lost"), 0, "{stdout}");
    assert_eq!(r["server_dropped_counted"], 0, "{stdout}");
    assert_eq!(r["latency_ns"]["count"].as_u64(), Some(n("delivered")), "{stdout}");
    assert!(r["latency_ns"]["p99"].as_u64().is_some_and(|p| p > 0), "{stdout}");
    assert_eq!(r["reach_all_ns"]["count"].as_u64(), Some(published), "{stdout}");
    assert!(n("frames") > 0 && r["messages_per_frame"].as_f64().is_some_and(|m| m >= 1.0), "{stdout}");
    assert!(r["publish_errors"].as_object().is_some_and(|m| m.is_empty()), "{stdout}");
    assert!(r["server_cpu_s"].is_null(), "no --server-pid given");
    assert_eq!(r["passed"], true);
}

#[test]
fn refused_arguments_exit_2() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_barrage-load")).arg("fanout").args(args).output().expect("run").status.code()
    };
    let base = ["--target", "127.0.0.1:9", "--members", "10", "--duration-s", "1", "--json", "/dev/null"];
    // barrage without --api; both --rate and --saturate; neither; a non-loopback target.
    assert_eq!(run(&[&base[..], &["--kind", "barrage", "--rate", "10"]].concat()), Some(2));
    assert_eq!(run(&[&base[..], &["--kind", "broadcast", "--rate", "10", "--saturate"]].concat()), Some(2));
    assert_eq!(run(&[&base[..], &["--kind", "broadcast"]].concat()), Some(2));
    assert_eq!(run(&[&base[..], &["--kind", "nchan", "--rate", "10", "--rooms", "11"]].concat()), Some(2));
    let far = ["--target", "10.0.0.1:80", "--members", "1", "--duration-s", "1", "--json", "/dev/null"];
    assert_eq!(run(&[&far[..], &["--kind", "broadcast", "--rate", "1"]].concat()), Some(2));
}
