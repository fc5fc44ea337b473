//! The demo page on the public listener: served from the binary, switched off by a knob, and
//! the development token route off unless asked for.
mod common;

use barrage::auth::{Rules, Verifier};
use common::{Gateway, SECRET, http};

#[test]
fn the_demo_page_and_its_script_are_served_and_tokens_only_when_asked() {
    let gw = Gateway::start(&[]);
    let (status, page) = http(gw.ws, "GET", "/demo/", None, &[]);
    assert_eq!(status, 200);
    assert!(page.contains("<script type=\"module\" src=\"app.js\">"), "{page}");
    let (status, script) = http(gw.ws, "GET", "/demo/app.js", None, &[]);
    assert_eq!(status, 200);
    assert!(script.len() > 10_000 && script.contains("barrage.v1"), "the bundled SDK and schema");
    assert_eq!(http(gw.ws, "GET", "/demo/nope.css", None, &[]).0, 404);
    let (status, body) = http(gw.ws, "GET", "/demo/token?user=alice", None, &[]);
    assert_eq!(status, 404, "development tokens are off by default: {body}");
    drop(gw);

    let gw = Gateway::start(&["--demo-dev-tokens", "true"]);
    let (status, body) = http(gw.ws, "GET", "/demo/token?user=alice", None, &[]);
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let rules = Rules { require_exp: true, ..Rules::default() };
    let claims = Verifier::new(SECRET.as_bytes(), rules).verify(token["token"].as_str().unwrap(), now).unwrap();
    assert_eq!((claims.sub.as_str(), claims.send, claims.types.as_slice()), ("alice", true, &["gift".to_string()][..]));
    assert_eq!(http(gw.ws, "GET", "/demo/token?user=", None, &[]).0, 400);
    drop(gw);

    let gw = Gateway::start(&["--demo", "false"]);
    assert_eq!(http(gw.ws, "GET", "/demo/", None, &[]).0, 404, "switched off");
}
