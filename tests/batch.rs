//! `POST /v1/publish` over real sockets: JSON arrays, protobuf batches and NDJSON, one result per
//! item in order, each item checked as a single publish is (size, target, the room's rate), the
//! batch bounded by `api.batch_items_max`, and every accepted message delivered.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use barrage::proto::{PublishBatch, PublishItem, PublishRequest, publish_item, server_frame};
use common::{Client, Gateway, http, token};
use prost::Message as _;
use serde_json::{Value, json};

fn post_raw(gw: &Gateway, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(gw.api).unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Texts of the messages `c` receives in blocks until it has `n`.
fn texts(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        if let server_frame::Frame::Block(b) = c.recv() {
            out.extend(b.messages.iter().map(|m| String::from_utf8_lossy(&m.data).into_owned()));
        }
    }
    out
}

#[test]
fn a_json_batch_reaches_rooms_users_and_everyone_with_a_result_per_item() {
    let gw = Gateway::start(&["--data-bytes-max", "16"]);
    let mut a = Client::connect(&gw.url("?room=a"), None);
    a.welcome();
    let mut b = Client::connect(&gw.url(&format!("?room=b&token={}", token("bob"))), None);
    b.welcome();
    gw.wait_online("a", 1);
    gw.wait_online("b", 1);
    let batch = json!([
        {"room": "a", "text": "a1"},
        {"room": "b", "text": "b1", "type": "gift"},
        {"room": "a", "text": "this one is far too long"},
        {"room": "a", "text": "a2"},
        {"room": "a%20b", "text": "x"},
        {"user": "bob", "text": "direct"},
        {"broadcast": true, "text": "all"},
        {"room": "a", "user": "bob", "text": "two targets"},
    ]);
    let (status, body) = http(gw.api, "POST", "/v1/publish", Some(&batch.to_string()), &[]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 8, "one result per item, in order: {body}");
    assert!(r[0]["id"].is_string() && r[1]["id"].is_string() && r[3]["id"].is_string());
    assert_eq!(r[2]["status"], 413, "{body}");
    assert_eq!(r[4]["status"], 400);
    assert_eq!(r[5]["connections"], 1, "bob's one connection");
    assert_eq!(r[6]["connections"], 2);
    assert_eq!(r[7]["status"], 400);
    assert_eq!((v["accepted"].as_u64(), v["refused"].as_u64()), (Some(5), Some(3)));
    // Room a's two accepted messages, in the batch's order; the broadcast to both.
    let mut got_a = Vec::new();
    let mut broadcast = false;
    while got_a.len() < 2 || !broadcast {
        match a.recv() {
            server_frame::Frame::Block(blk) => {
                got_a.extend(blk.messages.iter().map(|m| String::from_utf8_lossy(&m.data).into_owned()))
            }
            server_frame::Frame::Broadcast(_) => broadcast = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got_a, ["a1", "a2"]);
    let (mut direct, mut broadcast, mut blocks) = (false, false, Vec::new());
    while !(direct && broadcast && !blocks.is_empty()) {
        match b.recv() {
            server_frame::Frame::Direct(d) => direct = d.message.unwrap().data == b"direct",
            server_frame::Frame::Broadcast(_) => broadcast = true,
            server_frame::Frame::Block(blk) => blocks.extend(blk.messages),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((blocks[0].r#type.as_str(), &blocks[0].data[..]), ("gift", &b"b1"[..]));
    // Counted: one batch, five items accepted, three refused.
    assert_eq!(gw.metric("barrage_api_batches_total"), 1);
    assert_eq!(gw.metric("barrage_api_batch_items_total{result=\"accepted\"}"), 5);
    assert_eq!(gw.metric("barrage_api_batch_items_total{result=\"refused\"}"), 3);
    // The target fields belong to batch items only.
    let (status, _) = http(gw.api, "POST", "/v1/rooms/a/messages", Some(r#"{"room":"b","text":"x"}"#), &[]);
    assert_eq!(status, 400);
}

#[test]
fn protobuf_and_ndjson_batches_and_the_bounds() {
    let gw = Gateway::start(&["--api-batch-items-max", "4", "--room-rate-per-s", "1", "--room-rate-burst", "2"]);
    let mut c = Client::connect(&gw.url("?room=p"), None);
    c.welcome();
    gw.wait_online("p", 1);
    let item = |text: &str| PublishItem {
        target: Some(publish_item::Target::Room("p".into())),
        message: Some(PublishRequest { data: text.as_bytes().to_vec(), ..PublishRequest::default() }),
    };
    // The room's rate (burst 2) refuses the third item with 429; the others go through.
    let batch = PublishBatch { items: vec![item("p1"), item("p2"), item("p3")] };
    let (status, body) = post_raw(&gw, "application/x-protobuf", &batch.encode_to_vec());
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["results"][2]["status"], 429, "{body}");
    assert_eq!(v["accepted"], 2);
    assert_eq!(texts(&mut c, 2), ["p1", "p2"]);
    // Past api.batch_items_max the whole batch is refused.
    let batch = PublishBatch { items: (0..5).map(|i| item(&format!("x{i}"))).collect() };
    let (status, body) = post_raw(&gw, "application/x-protobuf", &batch.encode_to_vec());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 4"), "{body}");
    // NDJSON: one result line per item line; a malformed line is that item's 400.
    std::thread::sleep(std::time::Duration::from_millis(2_100)); // the room's bucket refills
    let lines = "{\"room\":\"p\",\"text\":\"n1\"}\n\n{\"room\":\"p\",\"text\":\n{\"room\":\"p\",\"text\":\"n2\"}\n";
    let (status, body) = post_raw(&gw, "application/x-ndjson", lines.as_bytes());
    assert_eq!(status, 200, "{body}");
    let results: Vec<Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 3, "{body}");
    assert!(results[0]["id"].is_string() && results[2]["id"].is_string());
    assert_eq!(results[1]["status"], 400);
    assert_eq!(texts(&mut c, 2), ["n1", "n2"]);
    // A body that is not an array of items is refused whole.
    let (status, _) = http(gw.api, "POST", "/v1/publish", Some(r#"{"room":"p"}"#), &[]);
    assert_eq!(status, 400);
}

/// Reads one chunk of a chunked answer: its data, or None for the last (zero) chunk.
fn read_chunk(r: &mut std::io::BufReader<TcpStream>) -> Option<Vec<u8>> {
    use std::io::BufRead;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let size = usize::from_str_radix(line.trim(), 16).unwrap();
    let mut data = vec![0u8; size + 2];
    r.read_exact(&mut data).unwrap();
    assert_eq!(&data[size..], b"\r\n");
    data.truncate(size);
    (size > 0).then_some(data)
}

fn chunk(bytes: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", bytes.len()).as_bytes(), bytes, b"\r\n"].concat()
}

#[test]
fn an_ndjson_stream_is_answered_as_it_goes_on_one_keep_alive_connection() {
    use std::io::BufRead;
    let gw = Gateway::start(&["--api-body-bytes-max", "4096"]);
    let mut viewer = Client::connect(&gw.url("?room=st1"), None);
    viewer.welcome();
    gw.wait_online("st1", 1);
    let s = TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    w.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let mut head = String::new();
    // The answer starts before the body ends: send one chunk, read its results.
    w.write_all(&chunk(b"{\"room\":\"st1\",\"text\":\"one\"}\n{\"room\":\"st1\",\"te")).unwrap();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("Transfer-Encoding: chunked"), "{head}");
    let first = String::from_utf8(read_chunk(&mut r).unwrap()).unwrap();
    assert_eq!(first.lines().count(), 1, "the complete line only: {first}");
    assert!(first.starts_with("{\"id\":"), "{first}");
    // The split line completes in the next chunk, beside a refused item and a direct one.
    w.write_all(&chunk(b"xt\":\"two\"}\n{\"room\":\"\",\"text\":\"x\"}\n{\"user\":\"nobody\",\"text\":\"psst\"}\n"))
        .unwrap();
    let second = String::from_utf8(read_chunk(&mut r).unwrap()).unwrap();
    let results: Vec<Value> = second.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 3, "{second}");
    assert!(results[0]["id"].is_string());
    assert_eq!(results[1]["status"], 400);
    assert_eq!(results[2]["connections"], 0);
    // A last line without its newline, then the end of the body ends the answer.
    w.write_all(&chunk(b"{\"room\":\"st1\",\"text\":\"three\"}")).unwrap();
    w.write_all(b"0\r\n\r\n").unwrap();
    let third = String::from_utf8(read_chunk(&mut r).unwrap()).unwrap();
    assert!(third.starts_with("{\"id\":"), "{third}");
    assert_eq!(read_chunk(&mut r), None, "the zero chunk ends the answer");
    assert_eq!(texts(&mut viewer, 3), ["one", "two", "three"]);
    // The connection carries the next request.
    w.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(gw.metric("barrage_api_streams_total"), 1);

    // A chunk over api.body_bytes_max ends the stream and the connection.
    let mut s = TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /v1/publish HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("0\r\n\r\n"), "{out}");
    // A chunked body anywhere else is still refused.
    let mut s = TcpStream::connect(gw.api).unwrap();
    s.write_all(b"POST /v1/rooms/x/messages HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 411"), "{out}");
}
