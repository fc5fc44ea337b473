//! `wss://` over loopback: the gateway with a certificate the test makes, a Rust client
//! (rustls + tungstenite) and Python `websockets` trusting it, blocks and sends both ways, a
//! client that does not trust the certificate refused, TLS 1.2 and 1.3.
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;

use barrage::proto::{Join, client_frame, server_frame};
use common::{Gateway, http};
use prost::Message as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::protocol::Message as WsMessage;

struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn new(tag: &str) -> Cert {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("barrage-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
        Cert { dir, der: c.cert.der().clone() }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).to_string_lossy().into_owned()
    }

    /// A gateway serving TLS with this certificate, with `extra` flags.
    fn gateway(&self, extra: &[&str]) -> Gateway {
        Gateway::start(&self.flags(extra).iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn flags(&self, extra: &[&str]) -> Vec<String> {
        let mut flags = vec!["--tls-cert".into(), self.path("cert.pem"), "--tls-key".into(), self.path("key.pem")];
        flags.extend(extra.iter().map(|f| f.to_string()));
        flags
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Wss = tungstenite::WebSocket<StreamOwned<ClientConnection, TcpStream>>;

fn connect(
    gw: &Gateway,
    trusted: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    query: &str,
) -> Result<Wss, String> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(barrage::tls::provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(gw.ws).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let stream = StreamOwned::new(conn, tcp);
    let url = format!("wss://localhost:{}/ws{query}", gw.ws.port());
    tungstenite::client::client(url, stream).map(|(ws, _)| ws).map_err(|e| e.to_string())
}

fn frame(ws: &mut Wss) -> server_frame::Frame {
    loop {
        match ws.read().expect("a frame") {
            WsMessage::Binary(b) => return barrage::proto::ServerFrame::decode(b.as_ref()).unwrap().frame.unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn wss_carries_blocks_with_tls_13_and_12_and_refuses_an_untrusted_certificate() {
    let cert = Cert::new("main");
    let gw = cert.gateway(&[]);
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let mut a = connect(&gw, &cert.der, versions, "?room=t1").expect("wss connect");
        assert!(matches!(frame(&mut a), server_frame::Frame::Welcome(_)));
        let mut b = connect(&gw, &cert.der, versions, "").expect("wss connect");
        assert!(matches!(frame(&mut b), server_frame::Frame::Welcome(_)));
        let join = barrage::proto::ClientFrame {
            frame: Some(client_frame::Frame::Join(Join { room: "t1".into(), after_seq: 0 })),
        };
        b.send(WsMessage::binary(join.encode_to_vec())).unwrap();
        gw.wait_online("t1", 2);
        // A block larger than one TLS record, to both members.
        let text = "x".repeat(3000);
        for i in 0..8 {
            let (status, _) = gw.publish("t1", serde_json::json!({"text": format!("{i}{text}")}));
            assert_eq!(status, 202);
        }
        for ws in [&mut a, &mut b] {
            let mut got = 0;
            while got < 8 {
                if let server_frame::Frame::Block(blk) = frame(ws) {
                    got += blk.messages.len();
                }
            }
        }
        a.close(None).unwrap();
        let _ = a.flush();
        drop(b);
        gw.wait_online("t1", 0);
    }
    // A client that does not trust the certificate: its handshake fails, the gateway counts it.
    let other = Cert::new("other");
    let Err(refused) = connect(&gw, &other.der, &[&rustls::version::TLS13], "") else {
        panic!("a client that does not trust the certificate connected")
    };
    assert!(refused.to_lowercase().contains("certificate") || refused.contains("UnknownIssuer"), "{refused}");
    common::eventually("the failed handshake counted", || {
        gw.metric("barrage_tls_handshakes_total{result=\"alert\"}") >= 1
    });
    assert!(gw.metric("barrage_tls_handshakes_total{result=\"ok\"}") >= 4);
    // Plain HTTP to a TLS listener is not TLS: closed without an answer, counted.
    let mut plain = TcpStream::connect(gw.ws).unwrap();
    plain.write_all(b"GET /demo/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "no HTTP answer on a TLS listener");
    common::eventually("the malformed handshake counted", || {
        gw.metric("barrage_tls_handshakes_total{result=\"malformed\"}") >= 1
    });
    let (status, _) = http(gw.api, "GET", "/healthz", None, &[]);
    assert_eq!(status, 200, "the gateway goes on");
}

/// The README's newcomer: only a certificate and key given, the listener takes wss's port
/// 8443, and Python `websockets` opens `wss://127.0.0.1:8443/ws?room=r` and receives a block.
#[test]
fn python_websockets_over_wss() {
    let python = common::venv_python();
    let cert = Cert::new("py");
    let flags = cert.flags(&["--api-listen", "127.0.0.1:0"]);
    let gw = Gateway::start_raw(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(gw.ws.to_string(), "0.0.0.0:8443", "wss's port by default");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/wss_client.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg("127.0.0.1:8443")
        .arg(gw.api.to_string())
        .arg(cert.path("cert.pem"))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python wss client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let first = Cert::new("hup1");
    let gw = first.gateway(&[]);
    let mut old = connect(&gw, &first.der, &[&rustls::version::TLS13], "?room=hup").expect("wss connect");
    assert!(matches!(frame(&mut old), server_frame::Frame::Welcome(_)));
    // New files in place, then SIGHUP.
    let second = Cert::new("hup2");
    std::fs::copy(second.path("cert.pem"), first.path("cert.pem")).unwrap();
    std::fs::copy(second.path("key.pem"), first.path("key.pem")).unwrap();
    let _ = std::process::Command::new("kill").arg("-HUP").arg(gw.pid().to_string()).status();
    common::eventually("the new certificate served", || {
        connect(&gw, &second.der, &[&rustls::version::TLS13], "").is_ok()
    });
    assert!(connect(&gw, &first.der, &[&rustls::version::TLS13], "").is_err(), "the old certificate is gone");
    // The connection made with the old certificate goes on.
    gw.wait_online("hup", 1);
    assert_eq!(gw.publish("hup", serde_json::json!({"text": "still here"})).0, 202);
    loop {
        if let server_frame::Frame::Block(b) = frame(&mut old) {
            assert_eq!(b.messages[0].data, b"still here");
            break;
        }
    }
}

#[test]
fn a_client_key_update_is_followed_only_when_kept() {
    let cert = Cert::new("ku");
    let ping = barrage::proto::ClientFrame { frame: Some(client_frame::Frame::Ping(barrage::proto::Ping {})) };
    for keep in [true, false] {
        let gw = cert.gateway(&["--tls-key-updates", if keep { "true" } else { "false" }]);
        let mut ws = connect(&gw, &cert.der, &[&rustls::version::TLS13], "").expect("wss connect");
        assert!(matches!(frame(&mut ws), server_frame::Frame::Welcome(_)));
        ws.get_mut().conn.refresh_traffic_keys().unwrap();
        ws.send(WsMessage::binary(ping.encode_to_vec())).unwrap();
        if keep {
            assert!(matches!(frame(&mut ws), server_frame::Frame::Pong(_)), "rekeyed and still talking");
        } else {
            assert!(ws.read().is_err(), "closed: the key-update state was not kept");
            common::eventually("counted", || gw.metric("barrage_tls_errors_total{reason=\"key_update\"}") == 1);
        }
    }
}

/// A flood of handshakes that never finish costs at most the partial-input budget: the
/// connections holding the most are closed once it is full, and the gateway goes on.
#[test]
fn a_tls_handshake_flood_stays_within_the_partial_input_budget() {
    let cert = Cert::new("flood");
    let budget = 256 * 1024;
    let gw = cert.gateway(&["--shards", "1", "--partial-bytes-max", &budget.to_string()]);
    // Each: a handshake record announcing 16,000 bytes, and 12,000 of them.
    let mut flood = Vec::new();
    for _ in 0..60 {
        let mut s = TcpStream::connect(gw.ws).unwrap();
        let mut bytes = vec![22, 3, 1, 0x3e, 0x80];
        bytes.extend(std::iter::repeat_n(1u8, 12_000));
        let _ = s.write_all(&bytes);
        flood.push(s);
    }
    common::eventually("connections closed for the budget", || {
        gw.metric("barrage_closed_total{reason=\"partial_budget\"}") >= 1
    });
    let held = gw.metric("barrage_partial_bytes");
    assert!(held <= budget as u64, "held {held} over the budget {budget}");
    // A real client still gets in.
    let mut ws = connect(&gw, &cert.der, &[&rustls::version::TLS13], "").expect("wss connect");
    assert!(matches!(frame(&mut ws), server_frame::Frame::Welcome(_)));
}

/// Kernel TLS: where the kernel has the `tls` ULP, the send keys go to it after the handshake
/// and blocks still arrive; where it does not (this CI's kernel: CONFIG_TLS unset), the part
/// that needs it is skipped with the reason printed, and the start-up line says why records
/// are sealed in user space.
#[test]
fn kernel_tls_takes_the_send_keys_where_the_kernel_has_it() {
    let cert = Cert::new("ktls");
    let gw = cert.gateway(&[]);
    let line = gw.stdout.iter().find(|l| l.trim_start().starts_with("TLS")).expect("a start-up line on TLS").clone();
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let mut ws = connect(&gw, &cert.der, versions, "?room=k1").expect("wss connect");
        assert!(matches!(frame(&mut ws), server_frame::Frame::Welcome(_)));
        gw.wait_online("k1", 1);
        // Blocks larger than a record.
        for i in 0..8 {
            let text = format!("{i}{}", "k".repeat(3000));
            assert_eq!(gw.publish("k1", serde_json::json!({"text": text})).0, 202);
        }
        let mut got = 0;
        while got < 8 {
            if let server_frame::Frame::Block(b) = frame(&mut ws) {
                got += b.messages.len();
            }
        }
        drop(ws);
        gw.wait_online("k1", 0);
    }
    let kernel = gw.metric("barrage_tls_kernel_total{result=\"ok\"}");
    match barrage::shard::sys::kernel_tls() {
        Ok(()) => {
            assert!(line.contains("sealed by the kernel"), "{line}");
            assert_eq!(kernel, 2, "both connections' sends went through kernel TLS");
        }
        Err(why) => {
            eprintln!("kernel_tls_takes_the_send_keys_where_the_kernel_has_it: kernel part skipped: {why}");
            assert!(line.contains("sealed in user space") && line.contains(&why), "{line}");
            assert_eq!(kernel, 0);
        }
    }
    drop(gw);
    let gw = cert.gateway(&["--tls-kernel", "off"]);
    let line = gw.stdout.iter().find(|l| l.trim_start().starts_with("TLS")).unwrap();
    assert!(line.contains("kernel TLS: off (tls.kernel = off)"), "{line}");
    drop(gw);
    // `on` tries every connection without probing: here the io_uring setsockopts run; where the
    // kernel refuses them the connection falls back to user space, counted, and still works.
    let gw = cert.gateway(&["--tls-kernel", "on"]);
    let mut ws = connect(&gw, &cert.der, &[&rustls::version::TLS13], "?room=k2").expect("wss connect");
    assert!(matches!(frame(&mut ws), server_frame::Frame::Welcome(_)));
    gw.wait_online("k2", 1);
    assert_eq!(gw.publish("k2", serde_json::json!({"text": "after the hand-over"})).0, 202);
    while !matches!(frame(&mut ws), server_frame::Frame::Block(_)) {}
    let (ok, fallback) = (
        gw.metric("barrage_tls_kernel_total{result=\"ok\"}"),
        gw.metric("barrage_tls_kernel_total{result=\"fallback\"}"),
    );
    match barrage::shard::sys::kernel_tls() {
        Ok(()) => assert_eq!((ok, fallback), (1, 0)),
        Err(_) => assert_eq!((ok, fallback), (0, 1), "refused by this kernel: sealed in user space"),
    }
}

/// Behind an L4 balancer: the PROXY v2 header in the clear, then TLS on the same stream; the
/// client's address from the header is the one the per-address rate counts.
#[test]
fn a_proxy_header_before_the_tls_handshake_names_the_client() {
    let cert = Cert::new("proxy");
    let gw = cert.gateway(&[
        "--shards",
        "1",
        "--proxy-protocol",
        "true",
        "--addr-conn-rate-per-s",
        "1",
        "--addr-conn-rate-burst",
        "1",
    ]);
    let via = |client: &str| -> Result<Wss, String> {
        let mut tcp = TcpStream::connect(gw.ws).unwrap();
        tcp.write_all(&barrage::wire::proxy::header(client.parse().unwrap(), gw.ws, &[])).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der.clone()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(barrage::tls::provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
        let url = format!("wss://localhost:{}/ws?room=p1", gw.ws.port());
        tungstenite::client::client(url, StreamOwned::new(conn, tcp)).map(|(ws, _)| ws).map_err(|e| e.to_string())
    };
    // Two clients through one balancer address: each has its own rate.
    let mut a = via("198.51.100.1:4000").expect("first client");
    assert!(matches!(frame(&mut a), server_frame::Frame::Welcome(_)));
    let mut b = via("198.51.100.2:4000").expect("second client");
    assert!(matches!(frame(&mut b), server_frame::Frame::Welcome(_)));
    gw.wait_online("p1", 2);
    assert!(via("198.51.100.1:4001").is_err(), "the first client again in the same second is refused");
    common::eventually("counted", || gw.metric("barrage_refused_total{reason=\"addr_rate\"}") == 1);
    // TLS without the header: closed, counted.
    assert!(connect(&gw, &cert.der, &[&rustls::version::TLS13], "").is_err());
    common::eventually("counted", || gw.metric("barrage_handshakes_total{result=\"proxy\"}") == 1);
}

/// A handshake the server refuses gets its alert before the close, and is counted by reason.
#[test]
fn a_refused_handshake_gets_its_alert() {
    let cert = Cert::new("alert");
    let gw = cert.gateway(&[]);
    let mut roots = RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(barrage::tls::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/2 only: the gateway speaks http/1.1.
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tcp = TcpStream::connect(gw.ws).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let err = conn.complete_io(&mut tcp).expect_err("the handshake is refused");
    assert!(err.to_string().contains("NoApplicationProtocol"), "the client got the alert: {err}");
    common::eventually("counted", || gw.metric("barrage_tls_handshakes_total{result=\"incompatible\"}") == 1);
}

/// Several certificates: the client's SNI picks the one for its name (the fallback to the first
/// is `tls::sni`'s unit test).
#[test]
fn sni_picks_the_certificate_for_the_name_asked() {
    let make = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem(), c.cert.der().clone())
    };
    let dir = std::env::temp_dir().join(format!("barrage-tls-sni-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ders = Vec::new();
    for name in ["live.example", "*.cdn.example"] {
        let (cert, key, der) = make(name);
        let file = name.replace('*', "star");
        std::fs::write(dir.join(format!("{file}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key).unwrap();
        ders.push(der);
    }
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let certs = format!("{},{}", path("live.example.pem"), path("star.cdn.example.pem"));
    let keys = format!("{},{}", path("live.example.key"), path("star.cdn.example.key"));
    let gw = Gateway::start(&["--tls-cert", &certs, "--tls-key", &keys]);
    let open = |name: &str, trusted: &CertificateDer<'static>| -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(barrage::tls::provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn =
            ClientConnection::new(Arc::new(config), ServerName::try_from(name.to_string()).unwrap()).unwrap();
        let mut tcp = TcpStream::connect(gw.ws).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    open("live.example", &ders[0]).expect("the first certificate by its name");
    open("a.cdn.example", &ders[1]).expect("the second, by its wildcard");
    assert!(open("a.cdn.example", &ders[0]).is_err(), "not the first for the second's name");
    let _ = std::fs::remove_dir_all(&dir);
}
