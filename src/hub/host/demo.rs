//! The live-room demo (`GET /demo/`): the page and its script, built from `sdk/js/demo` and
//! embedded in the binary (switched off with `demo.enabled = false`), and — only with
//! `demo.dev_tokens` — a development route that signs a token for any user name, so the page's
//! send box works without a business backend.

use super::Host;
use crate::ids::{ConnKey, Now};
use crate::wire::handshake as wire;

const INDEX_HTML: &[u8] = include_bytes!("../../../sdk/js/demo/index.html");
const APP_JS: &[u8] = include_bytes!("../../../sdk/js/demo/app.js");

/// How long a development token lasts.
const DEV_TOKEN_S: u64 = 3600;

impl Host {
    /// `GET /demo/...`: `rest` is the path after `/demo/`.
    pub(super) fn demo(&mut self, key: ConnKey, rest: &[&str], query: &str, now: Now) {
        match rest {
            [] | [""] | ["index.html"] => self.http_answer_typed(key, 200, "text/html; charset=utf-8", INDEX_HTML, now),
            ["app.js"] => self.http_answer_typed(key, 200, "text/javascript; charset=utf-8", APP_JS, now),
            ["token"] => self.dev_token(key, query, now),
            _ => self.http_answer_typed(key, 404, "text/plain", b"no such demo file", now),
        }
    }

    /// `GET /demo/token?user=U` → `{"token": ...}`: may send chat and gifts for an hour.
    fn dev_token(&mut self, key: ConnKey, query: &str, now: Now) {
        let user = wire::query_param(query, "user").map(|u| u.into_owned()).unwrap_or_default();
        let refusal = if !self.cfg.demo_dev_tokens || self.cfg.jwt_secret.is_empty() {
            Some((404, "development tokens are off (demo.dev_tokens, auth.jwt_secret)"))
        } else if user.is_empty() || user.len() > crate::auth::SUBJECT_BYTES_MAX {
            Some((400, "user must be 1..=128 bytes"))
        } else {
            None
        };
        if let Some((status, why)) = refusal {
            let body = serde_json::json!({ "error": why }).to_string();
            return self.http_answer_typed(key, status, "application/json", body.as_bytes(), now);
        }
        let exp = (now.unix.0.max(0) as u64) / 1000 + DEV_TOKEN_S;
        let claims = serde_json::json!({ "sub": user, "exp": exp, "send": true, "types": ["gift"] });
        let token = crate::auth::sign_hs256(&self.cfg.jwt_secret, &claims);
        let body = serde_json::json!({ "token": token }).to_string();
        self.http_answer_typed(key, 200, "application/json", body.as_bytes(), now);
    }
}
