//! Durable room state over a real Redis (its own private server per test) and real gateway
//! processes: what a room knows survives a restart, replay answers by server time, and Redis
//! going away neither stops delivery nor loses or repeats writes.

mod common;

use std::time::{Duration, Instant};

use barrage::proto::{client_frame, server_frame};
use common::{Client, Gateway, Redis, eventually, http, token};
use serde_json::{Value, json};

fn gateway(redis: &Redis) -> Gateway {
    Gateway::start(&["--redis", &redis.url(), "--block-interval-ms", "20"])
}

fn last_seq(gw: &Gateway, room: &str) -> u64 {
    let (_, body) = http(gw.api, "GET", &format!("/v1/rooms/{room}"), None, &[]);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["last_seq"].as_u64().or_else(|| v["last_seq"].as_str().and_then(|s| s.parse().ok())).unwrap()
}

fn replay(gw: &Gateway, room: &str, query: &str) -> Value {
    let (status, body) = http(gw.api, "GET", &format!("/v1/rooms/{room}/replay?{query}"), None, &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn seq(m: &Value) -> u64 {
    m["seq"].as_str().and_then(|s| s.parse().ok()).or_else(|| m["seq"].as_u64()).unwrap()
}

fn created(m: &Value) -> i64 {
    m["createdMs"].as_str().and_then(|s| s.parse().ok()).or_else(|| m["createdMs"].as_i64()).unwrap()
}

/// The issue's newcomer scenario: publish, restart barrage, and a viewer who rejoins gets the
/// same history and later seqs; mutes, bans and attributes are still there.
#[test]
fn history_seqs_lists_and_attributes_survive_a_restart() {
    let redis = Redis::start();
    let mut first = gateway(&redis);
    let mut viewer = Client::connect(&first.url("?room=d"), None);
    viewer.welcome();
    first.wait_online("d", 1);
    for i in 0..5 {
        assert_eq!(first.publish("d", json!({"type": "chat", "text": format!("m{i}")})).0, 202);
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.extend(viewer.block().messages.iter().map(|m| m.seq));
    }
    let put = http(first.api, "PUT", "/v1/rooms/d/attributes/seat1", Some(r#"{"value":"alice"}"#), &[]);
    assert_eq!(put.0, 200, "{put:?}");
    let ban = http(first.api, "POST", "/v1/rooms/d/bans", Some(r#"{"user":"mallory","duration_ms":3600000}"#), &[]);
    assert_eq!(ban.0, 200, "{ban:?}");
    let mute = http(first.api, "POST", "/v1/rooms/d/mutes", Some(r#"{"user":"eve"}"#), &[]);
    assert_eq!(mute.0, 200, "{mute:?}");
    let before = last_seq(&first, "d");
    drop(viewer);
    assert!(first.terminate(), "a clean stop sends what waits to Redis");

    let second = gateway(&redis);
    // A short poll is the first to ask for the room: served from Redis.
    let (status, body) = http(second.ws, "GET", "/v1/rooms/d/messages?after=0", None, &[]);
    assert_eq!(status, 200, "{body}");
    let polled: Vec<u64> =
        serde_json::from_str::<Value>(&body).unwrap()["messages"].as_array().unwrap().iter().map(seq).collect();
    assert_eq!(polled, seen, "a poll after the restart reads the stored history");
    let mut back = Client::connect(&second.url("?room=d"), None);
    back.welcome();
    let backfill = back.block();
    assert!(backfill.backfill);
    let restored: Vec<u64> = backfill.messages.iter().map(|m| m.seq).collect();
    assert_eq!(restored, seen, "the same history, the same seqs");
    assert_eq!(second.publish("d", json!({"type": "chat", "text": "after"})).0, 202);
    let next = loop {
        // The attribute snapshot comes with the backfill.
        let server_frame::Frame::Block(b) = back.recv() else { continue };
        if let Some(m) = b.messages.iter().find(|m| m.data == b"after") {
            break m.seq;
        }
    };
    assert!(next > before, "seqs go on increasing across the restart: {next} after {before}");

    let (_, attrs) = http(second.api, "GET", "/v1/rooms/d/attributes", None, &[]);
    assert!(attrs.contains("seat1") && attrs.contains("alice"), "{attrs}");
    let (_, lists) = http(second.api, "GET", "/v1/rooms/d/moderation", None, &[]);
    let lists: Value = serde_json::from_str(&lists).unwrap();
    assert_eq!(lists["bans"][0]["user"], "mallory", "{lists}");
    assert!(lists["bans"][0]["until_ms"].as_i64().is_some(), "the ban keeps its expiry: {lists}");
    assert_eq!(lists["mutes"][0]["user"], "eve", "{lists}");
    assert!(lists["mutes"][0]["until_ms"].is_null(), "until lifted: {lists}");
    // Enforced, not only listed.
    let mut mallory = Client::connect(&second.url(&format!("?room=d&token={}", token("mallory"))), None);
    mallory.welcome();
    let refused = loop {
        match mallory.recv() {
            server_frame::Frame::Error(e) => break e.code,
            _ => continue,
        }
    };
    assert_eq!(refused, 403, "banned before the restart, refused after it");
    let mut eve = Client::connect(&second.url(&format!("?room=d&token={}", token("eve"))), None);
    eve.welcome();
    eve.send(client_frame::Frame::Send(barrage::proto::Send {
        r#type: "chat".into(),
        data: b"hi".to_vec(),
        ..Default::default()
    }));
    let code = loop {
        match eve.recv() {
            server_frame::Frame::Error(e) => break e.code,
            _ => continue,
        }
    };
    assert_eq!(code, 403, "muted before the restart, muted after it");
}

/// Replay answers by server time, inclusive at both edges, in order, page by page.
#[test]
fn replay_by_server_time_is_exact_at_its_edges() {
    let redis = Redis::start();
    let gw = gateway(&redis);
    for i in 0..6 {
        assert_eq!(gw.publish("rp", json!({"type": "chat", "text": format!("r{i}")})).0, 202);
        std::thread::sleep(Duration::from_millis(15));
    }
    let mut all = Vec::new();
    eventually("all six in Redis", || {
        all = replay(&gw, "rp", "from_ms=0")["messages"].as_array().unwrap().clone();
        all.len() == 6
    });
    let times: Vec<i64> = all.iter().map(created).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "server-time order, distinct times: {times:?}");
    let texts = |ms: &[Value]| -> Vec<String> {
        ms.iter()
            .map(|m| {
                let data = m["data"].as_str().unwrap();
                String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data).unwrap())
                    .unwrap()
            })
            .collect()
    };
    // Both edges included; one millisecond past either excludes that message.
    let page = replay(&gw, "rp", &format!("from_ms={}&to_ms={}", times[1], times[4]));
    assert_eq!(texts(page["messages"].as_array().unwrap()), ["r1", "r2", "r3", "r4"]);
    assert!(page.get("next_cursor").is_none());
    let inner = replay(&gw, "rp", &format!("from_ms={}&to_ms={}", times[1] + 1, times[4] - 1));
    assert_eq!(texts(inner["messages"].as_array().unwrap()), ["r2", "r3"]);
    // Pages of two, by cursor.
    let mut got = Vec::new();
    let mut query = format!("from_ms={}&to_ms={}&limit=2", times[0], times[5]);
    for _ in 0..10 {
        let page = replay(&gw, "rp", &query);
        got.extend(texts(page["messages"].as_array().unwrap()));
        match page.get("next_cursor").and_then(Value::as_str) {
            Some(c) => query = format!("from_ms={}&to_ms={}&limit=2&cursor={c}", times[0], times[5]),
            None => break,
        }
    }
    assert_eq!(got, ["r0", "r1", "r2", "r3", "r4", "r5"]);
    let (status, _) = http(gw.api, "GET", "/v1/rooms/rp/replay?from_ms=5&to_ms=1", None, &[]);
    assert_eq!(status, 400);
    let (status, _) = http(gw.api, "GET", "/v1/rooms/rp/replay?cursor=bad", None, &[]);
    assert_eq!(status, 400);
}

/// Redis killed mid-run: viewers keep receiving, `/healthz` says degraded, and what was written
/// meanwhile lands once Redis is back — each message once.
#[test]
fn with_redis_gone_delivery_goes_on_and_writes_land_when_it_returns() {
    let mut redis = Redis::start();
    let gw = gateway(&redis);
    let mut viewer = Client::connect(&gw.url("?room=k"), None);
    viewer.welcome();
    gw.wait_online("k", 1);
    assert_eq!(gw.publish("k", json!({"type": "chat", "text": "before"})).0, 202);
    viewer.block();
    redis.kill();
    let mut delivered = Vec::new();
    for i in 0..10 {
        assert_eq!(gw.publish("k", json!({"type": "chat", "text": format!("down{i}")})).0, 202);
    }
    while delivered.len() < 10 {
        delivered.extend(viewer.block().messages.iter().map(|m| m.seq));
    }
    eventually("/healthz says degraded", || http(gw.api, "GET", "/healthz", None, &[]).1.contains("degraded"));
    assert!(gw.metric("barrage_redis_write_buffer") > 0 || gw.metric("barrage_redis_errors_total") > 0);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let (_, body) = http(gw.api, "GET", "/v1/rooms/k/replay?from_ms=0&limit=100", None, &[]);
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let seqs: Vec<u64> = v["messages"].as_array().map(|a| a.iter().map(seq).collect()).unwrap_or_default();
        if seqs.len() >= 10 || Instant::now() > deadline {
            break seqs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The restarted Redis is empty: what it holds is exactly what was written while it was away
    // (and "before", if its write was still waiting), each once.
    let down: Vec<u64> = stored.iter().copied().filter(|s| delivered.contains(s)).collect();
    assert_eq!(down, delivered, "every write made while Redis was away, once, in order: {stored:?}");
    eventually("/healthz says ok again", || http(gw.api, "GET", "/healthz", None, &[]).1.contains("\"redis\":\"up\""));
}

/// `barrage doctor --redis URL` checks the connection, the version and the eviction policy.
#[test]
fn doctor_checks_the_redis_connection() {
    let redis = Redis::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["doctor", "--connections", "10", "--redis", &redis.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[ok   ] redis connection"), "{text}");
    assert!(text.contains("[ok   ] redis version"), "{text}");
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["doctor", "--connections", "10", "--redis", &redis.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[SHORT] redis maxmemory-policy"), "{text}");
    assert!(!out.status.success());
}

/// `redis.write_buffer_max`: with Redis away, writes past the bound drop the oldest (counted),
/// and what is left lands when it returns.
#[test]
fn the_write_buffer_is_bounded_while_redis_is_away() {
    let mut redis = Redis::start();
    let gw = Gateway::start(&["--redis", &redis.url(), "--block-interval-ms", "20", "--redis-write-buffer-max", "3"]);
    eventually("Redis up", || http(gw.api, "GET", "/healthz", None, &[]).1.contains("\"redis\":\"up\""));
    redis.kill();
    for i in 0..10 {
        assert_eq!(gw.publish("w", json!({"type": "chat", "text": format!("w{i}")})).0, 202);
        // One block each: ten writes.
        std::thread::sleep(Duration::from_millis(60));
    }
    eventually("seven writes dropped", || gw.metric("barrage_redis_writes_overflowed_total") == 7);
    assert_eq!(gw.metric("barrage_redis_write_buffer"), 3);
    redis.restart();
    let mut texts = Vec::new();
    eventually("the three left land", || {
        let page = replay(&gw, "w", "from_ms=0");
        texts = page["messages"].as_array().unwrap().iter().map(|m| m["data"].as_str().unwrap().to_owned()).collect();
        texts.len() == 3
    });
    let decode = |b: &str| {
        String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).unwrap()).unwrap()
    };
    assert_eq!(texts.iter().map(|t| decode(t)).collect::<Vec<_>>(), ["w7", "w8", "w9"], "the newest kept, in order");
}
