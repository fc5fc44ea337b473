//! The business API over loopback through the real binary: API key (checked before the body is
//! read), validation errors as JSON 4xx, protobuf bodies, room info, health and metrics.
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use barrage::proto::{Priority, PublishRequest};
use common::{Client, Gateway, http};
use prost::Message as _;
use serde_json::{Value, json};

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["error"].as_str().unwrap_or_else(|| panic!("no error field: {body}")).to_string()
}

#[test]
fn api_key_is_required_when_configured() {
    let gw = Gateway::start(&["--api-key", "k3y"]);
    let body = Some(r#"{"text":"x"}"#);
    let (s, b) = http(gw.api, "POST", "/v1/rooms/r/messages", body, &[]);
    assert_eq!(s, 401, "{b}");
    assert!(error_of(&b).contains("API key"));
    let (s, _) = http(gw.api, "POST", "/v1/rooms/r/messages", body, &[("X-Api-Key", "wrong")]);
    assert_eq!(s, 401);
    let (s, _) = http(gw.api, "POST", "/v1/rooms/r/messages", body, &[("Authorization", "Bearer k3y")]);
    assert_eq!(s, 202);
    let (s, _) = http(gw.api, "GET", "/metrics", None, &[("X-Api-Key", "k3y")]);
    assert_eq!(s, 200);
    let (s, b) = http(gw.api, "GET", "/healthz", None, &[]);
    assert_eq!((s, serde_json::from_str::<Value>(&b).unwrap()["status"].as_str()), (200, Some("ok")));
}

/// The `barrage_api_*` samples of one scrape, by series (name and labels).
fn api_metrics(gw: &Gateway, key: &str) -> HashMap<String, u64> {
    let (status, text) = http(gw.api, "GET", "/metrics", None, &[("X-Api-Key", key)]);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with("barrage_api_"))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn unauthorised_large_post_is_refused_before_its_body_is_read() {
    const BODY: usize = 8 << 20;
    let gw = Gateway::start(&["--api-key", "k3y", "--api-body-bytes-max", &(2 * BODY).to_string()]);
    let mut s = TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/broadcast HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let started = Instant::now();
    // The body goes out from another thread, as fast as the server takes it.
    let mut body_out = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let (chunk, mut sent) = ([b' '; 64 * 1024], 0);
        while sent < BODY {
            match body_out.write(&chunk[..(BODY - sent).min(chunk.len())]) {
                Ok(n) => sent += n,
                Err(e) => return (sent, Some(e)),
            }
        }
        (sent, None)
    });
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 401 "), "{status_line}");
    assert!(started.elapsed() < Duration::from_secs(3), "401 after {:?}", started.elapsed());
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest); // the server closes (a RST may follow the response)
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("Connection: close\r\n") && rest.contains("API key required"), "{rest}");
    // The server never read the body: the client could not send it all.
    let (sent, error) = writer.join().unwrap();
    assert!(sent < BODY && error.is_some(), "sent {sent} of {BODY}, error {error:?}");
    let after = api_metrics(&gw, "k3y");
    assert_eq!(after["barrage_api_auth_failures_total{reason=\"key_missing\"}"], 1);
    let read = after["barrage_api_bytes_in_total"];
    assert!(read < 256 * 1024, "the API read {read} bytes");
}

#[test]
fn unauthorised_expect_continue_gets_401_not_100() {
    let gw = Gateway::start(&["--api-key", "k3y"]);
    let mut s = TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = "POST /v1/broadcast HTTP/1.1\r\nHost: t\r\nX-Api-Key: nope\r\nExpect: 100-continue\r\n\
                Content-Length: 1000000\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401 "), "{out}");
    assert!(!out.contains("100 Continue") && out.contains("wrong API key"), "{out}");
}

#[test]
fn metrics_count_the_api_listener_itself() {
    let gw = Gateway::start(&["--api-key", "k3y"]);
    let key = [("X-Api-Key", "k3y")];
    let before = api_metrics(&gw, "k3y");
    let (s, _) = http(gw.api, "POST", "/v1/rooms/r/messages", Some(r#"{"text":"x"}"#), &[]);
    assert_eq!(s, 401);
    let (s, _) = http(gw.api, "GET", "/v1/nothing", None, &key);
    assert_eq!(s, 404);
    let (s, _) = http(gw.api, "POST", "/v1/rooms/r/messages", Some(r#"{"text":"x"}"#), &key);
    assert_eq!(s, 202);
    let mut raw = TcpStream::connect(gw.api).unwrap();
    raw.write_all(b"NOT HTTP\r\n\r\n").unwrap();
    let mut out = String::new();
    raw.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    let after = api_metrics(&gw, "k3y");
    let moved = |series: &str| after[series] - before.get(series).copied().unwrap_or(0);
    // The first scrape is counted in the second: a response is counted as it is written.
    assert_eq!(moved("barrage_api_requests_total{status=\"2xx\"}"), 2);
    assert_eq!(moved("barrage_api_requests_total{status=\"4xx\"}"), 3);
    assert_eq!(moved("barrage_api_requests_total{status=\"5xx\"}"), 0);
    assert_eq!(moved("barrage_api_auth_failures_total{reason=\"key_missing\"}"), 1);
    assert_eq!(moved("barrage_api_auth_failures_total{reason=\"key_wrong\"}"), 0);
    assert_eq!(moved("barrage_api_requests_refused_total{reason=\"malformed\"}"), 1);
    assert_eq!(moved("barrage_api_connections_accepted_total"), 5);
    assert!(moved("barrage_api_bytes_in_total") > 100 && moved("barrage_api_bytes_out_total") > 100);
    let (_, text) = http(gw.api, "GET", "/metrics", None, &key);
    for family in ["barrage_api_requests_total counter", "barrage_api_connections gauge"] {
        assert!(text.contains(&format!("# TYPE {family}\n")), "missing {family}");
    }
}

#[test]
fn malformed_requests_get_a_4xx_that_says_what_is_wrong() {
    let gw = Gateway::start(&["--data-bytes-max", "16"]);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("POST", "/v1/rooms/r/messages", Some("{"), 400, "bad JSON"),
        ("POST", "/v1/rooms/r/messages", Some(r#"{"txt":"x"}"#), 400, "unknown field"),
        ("POST", "/v1/rooms/r/messages", Some(r#"{"priority":"urgent"}"#), 400, "priority"),
        ("POST", "/v1/rooms/r/messages", Some(r#"{"text":"x","data_b64":"AA=="}"#), 400, "not both"),
        ("POST", "/v1/rooms/r/messages", Some(r#"{"data_b64":"!!"}"#), 400, "data_b64"),
        ("POST", "/v1/rooms/r/messages", Some(r#"{"text":"this is longer than sixteen"}"#), 413, "larger than 16"),
        ("POST", "/v1/rooms/bad%20room/messages", Some(r#"{"text":"x"}"#), 400, "room name"),
        ("POST", "/v1/rooms/%zz/messages", Some(r#"{"text":"x"}"#), 400, "percent"),
        ("GET", "/v1/rooms/r/messages", None, 405, "method"),
        ("DELETE", "/v1/broadcast", None, 405, "method"),
        ("GET", "/v1/nothing", None, 404, "no such resource"),
    ];
    for &(method, path, body, status, needle) in cases {
        let (s, b) = http(gw.api, method, path, body, &[]);
        assert_eq!(s, status, "{method} {path} {body:?}: {b}");
        assert!(error_of(&b).contains(needle), "{method} {path}: {b}");
    }
}

#[test]
fn curl_style_form_content_type_is_read_as_json() {
    let gw = Gateway::start(&[]);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (s, b) = http(gw.api, "POST", "/v1/rooms/r/messages", Some(r#"{"text":"hi"}"#), &form);
    assert_eq!(s, 202, "{b}");
    let (s, b) = http(gw.api, "POST", "/v1/rooms/r/messages", Some("text=hi"), &form);
    assert_eq!(s, 400);
    assert!(error_of(&b).contains("bad JSON"), "{b}");
}

#[test]
fn protobuf_bodies_publish_too() {
    let gw = Gateway::start(&[]);
    let mut c = Client::connect(&gw.url("?room=pb"), None);
    c.welcome();
    gw.wait_online("pb", 1);
    let req = PublishRequest {
        r#type: "gift".into(),
        priority: Some(Priority::High as i32),
        weight: 7,
        data: vec![1, 2, 3],
        sender: "shop".into(),
        ..PublishRequest::default()
    };
    let body = req.encode_to_vec();
    let mut s = TcpStream::connect(gw.api).unwrap();
    let head = format!(
        "POST /v1/rooms/pb/messages HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    let block = c.block();
    let m = &block.messages[0];
    assert_eq!(
        (m.r#type.as_str(), m.weight, m.data.as_slice(), m.sender.as_str()),
        ("gift", 7, &[1u8, 2, 3][..], "shop")
    );
    assert_eq!(m.priority, Priority::High as i32);
}

#[test]
fn room_info_reports_online_and_last_seq() {
    let gw = Gateway::start(&[]);
    let (s, b) = http(gw.api, "GET", "/v1/rooms/empty", None, &[]);
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap(),
        json!({"room": "empty", "online": 0, "last_seq": 0, "pending": 0})
    );
    let mut a = Client::connect(&gw.url("?room=info"), None);
    let mut b2 = Client::connect(&gw.url("?room=info"), None);
    a.welcome();
    b2.welcome();
    gw.wait_online("info", 2);
    gw.publish("info", json!({"text": "1"}));
    gw.publish("info", json!({"text": "2"}));
    let block = a.block();
    let (_, body) = http(gw.api, "GET", "/v1/rooms/info", None, &[]);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["last_seq"].as_u64(), Some(block.last_seq));
    assert_eq!(v["online"], 2);
}

#[test]
fn metrics_are_prometheus_text_with_handshake_and_traffic_counters() {
    let gw = Gateway::start(&[]);
    let mut c = Client::connect(&gw.url("?room=m"), None);
    c.welcome();
    common::eventually("handshake counted", || gw.metric("barrage_handshakes_total{result=\"ok\"}") == 1);
    let (s, text) = http(gw.api, "GET", "/metrics", None, &[]);
    assert_eq!(s, 200);
    for name in [
        "barrage_connections{shard=\"0\"}",
        "barrage_bytes_in_total",
        "barrage_frames_out_total",
        "barrage_blocks_total",
        "barrage_messages_dropped_total{shard=\"1\",reason=\"overflow\"}",
        "# TYPE barrage_closed_total counter",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(gw.metric("barrage_bytes_out_total") > 0);
    assert_eq!(gw.metric("barrage_websockets"), 1);
}
