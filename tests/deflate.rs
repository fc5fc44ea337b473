//! permessage-deflate over loopback: Python `websockets` (which offers it, as browsers do)
//! beside a plain client, over `ws://` and `wss://`, and a raw client sending a decompression
//! bomb and junk.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::{Gateway, token, venv_python};

#[test]
fn python_websockets_negotiates_and_gets_the_same_blocks_compressed() {
    negotiates(None);
}

/// The same over `wss://`: compressed blocks are sealed like any frame.
#[test]
fn python_websockets_negotiates_over_wss() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deflate-wss-cert");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    negotiates(Some(&dir));
}

/// Runs tests/python/deflate_client.py against a gateway with permessage-deflate on (and TLS
/// with the certificate in `tls`).
fn negotiates(tls: Option<&Path>) {
    let python = venv_python();
    let (cert, key) = tls.map(|d| (d.join("cert.pem"), d.join("key.pem"))).unzip();
    let mut args = vec!["--deflate", "true", "--deflate-min-bytes", "64", "--block-interval-ms", "300"];
    if let (Some(cert), Some(key)) = (&cert, &key) {
        args.extend(["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    }
    let gw = Gateway::start(&args);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/deflate_client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(gw.ws.to_string())
        .arg(gw.api.to_string())
        .arg(token("alice"))
        .args(cert.iter())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert_eq!(gw.metric("barrage_deflate_connections_total"), 1, "the declined offer is not counted");
    assert!(gw.metric("barrage_deflate_frames_total") >= 1, "blocks were compressed");
    assert!(gw.metric("barrage_inflated_messages_total") >= 1, "the client's compressed send was inflated");
    let (zin, zout) = (
        gw.metric("barrage_deflate_bytes_total{stage=\"in\"}"),
        gw.metric("barrage_deflate_bytes_total{stage=\"out\"}"),
    );
    assert!(zout < zin, "compressed smaller: {zout} of {zin}");
}

#[test]
fn a_decompression_bomb_is_closed_with_1009_and_junk_with_1007() {
    let gw = Gateway::start(&["--deflate", "true", "--message-bytes-max", "65536"]);
    let mut s = TcpStream::connect(gw.ws).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let request = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
    s.write_all(request.as_bytes()).unwrap();
    // 10 MiB of zeros, deflated to about 10 KB.
    let mut z = Vec::new();
    barrage::wire::deflate::compress(&vec![0u8; 10 << 20], 9, &mut z);
    let mut frame = Vec::new();
    barrage::wire::frame::masked_frame(true, 0x40 | 0x2, &z, [9, 8, 7, 6], &mut frame);
    s.write_all(&frame).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("a 101") + 4;
    assert!(String::from_utf8_lossy(&got[..head_end]).contains("permessage-deflate"));
    // The welcome, then Close 1009.
    let close = got.windows(2).rposition(|w| w[0] == 0x88).expect("a Close frame");
    assert_eq!(u16::from_be_bytes([got[close + 2], got[close + 3]]), 1009);
    common::eventually("counted", || gw.metric("barrage_inflate_refused_total{reason=\"too_big\"}") == 1);
    // Not DEFLATE at all (a block of the reserved type): 1007.
    let mut s = TcpStream::connect(gw.ws).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut junk = Vec::new();
    barrage::wire::frame::masked_frame(true, 0x40 | 0x2, &[0xff; 16], [9, 8, 7, 6], &mut junk);
    s.write_all(&junk).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let close = got.windows(2).rposition(|w| w[0] == 0x88).expect("a Close frame");
    assert_eq!(u16::from_be_bytes([got[close + 2], got[close + 3]]), 1007);
    common::eventually("counted", || gw.metric("barrage_inflate_refused_total{reason=\"invalid\"}") == 1);
    // Without the extension negotiated, RSV1 is a protocol error (1002).
    let mut s = TcpStream::connect(gw.ws).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(request.replace("Sec-WebSocket-Extensions: permessage-deflate\r\n", "").as_bytes()).unwrap();
    s.write_all(&frame).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let close = got.windows(2).rposition(|w| w[0] == 0x88).expect("a Close frame");
    assert_eq!(u16::from_be_bytes([got[close + 2], got[close + 3]]), 1002);
}

/// A flood of tiny compressed messages (each could inflate to the message limit) is closed with
/// 1008 past `websocket.inflate_rate_per_s`, counted, the rest never inflated.
#[test]
fn compressed_messages_past_their_rate_are_closed_with_1008() {
    let gw = Gateway::start(&["--deflate", "true", "--inflate-rate-per-s", "5", "--inflate-rate-burst", "10"]);
    let mut s = TcpStream::connect(gw.ws).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let request = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
    s.write_all(request.as_bytes()).unwrap();
    // 100 compressed app-level pings at once (a ClientFrame with an empty ping: field 4).
    let ping = [0x22, 0x00];
    let mut z = Vec::new();
    barrage::wire::deflate::compress(&ping, 6, &mut z);
    let mut flood = Vec::new();
    for _ in 0..100 {
        barrage::wire::frame::masked_frame(true, 0x40 | 0x2, &z, [9, 8, 7, 6], &mut flood);
    }
    s.write_all(&flood).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let close = got.windows(2).rposition(|w| w[0] == 0x88).expect("a Close frame");
    assert_eq!(u16::from_be_bytes([got[close + 2], got[close + 3]]), 1008);
    common::eventually("counted", || gw.metric("barrage_inflate_refused_total{reason=\"rate\"}") == 1);
    let inflated = gw.metric("barrage_inflated_messages_total");
    assert!((10..=11).contains(&inflated), "the burst, not the flood: {inflated}");
}
