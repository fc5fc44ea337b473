//! Token check at the door: the WebSocket handshake hands the `token` query parameter here and
//! gets back who the user is and what it may do (JWT, HS256, RFC 7519 / RFC 7515 compact form).
#![forbid(unsafe_code)]

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Number, Value};
use sha2::Sha256;

/// Longest token accepted. A token rides in the handshake's request line, which is itself
/// bounded; 4 KiB leaves room for a generous claim set and stops base64/JSON work on junk early.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// Longest `sub` accepted: user ids are keys of the shard's user index, so they stay short.
pub const SUBJECT_BYTES_MAX: usize = 128;

/// Entries of the `types` and `rooms` claims, and bytes of each: the grants are kept per
/// signed-in user on every shard holding one of its connections.
pub const GRANTS_MAX: usize = 32;
pub const GRANT_BYTES_MAX: usize = 64;

/// The shortest secret accepted: an HS256 key shorter than the hash's 256 bits can be guessed
/// offline from one captured token.
pub const SECRET_BYTES_MIN: usize = 32;

/// What a token must carry besides a valid signature.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_s: u64,
    /// Refuse tokens without `exp` (they would never expire).
    pub require_exp: bool,
    /// When set, `aud` (a string or an array of strings) must name it.
    pub audience: Option<String>,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`): non-empty, at most [`SUBJECT_BYTES_MAX`] bytes.
    pub sub: String,
    /// Expiry, Unix seconds (`exp`).
    pub exp: Option<u64>,
    /// Not-before, Unix seconds (`nbf`).
    pub nbf: Option<u64>,
    /// May this user send chat (`send`, default true)? False makes a read-only viewer.
    pub send: bool,
    /// May this user moderate its room with `moderate` frames (`admin`, default false)?
    pub admin: bool,
    /// May this user set its room's attributes (`attrs`, default false)?
    pub attrs: bool,
    /// The user's level (`level`, default 0): the weight of its chat inside a priority bucket,
    /// so a high-level user's line beats an anonymous one.
    pub level: i32,
    /// Message types this user may `send` beyond the configured client types (`types`); never
    /// the system types.
    pub types: Vec<String>,
    /// Rooms where `admin` and `attrs` apply (`rooms`; `"*"` = every room). Without it those
    /// rights apply nowhere.
    pub rooms: Vec<String>,
}

impl Claims {
    /// Whether the admin and attribute rights of this token reach `room`.
    pub fn rights_in(rooms: &[String], room: &str) -> bool {
        rooms.iter().any(|r| r == "*" || r == room)
    }
}

/// Why a token was refused. Each maps to a metric label with [`TokenError::reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url segments, bad JSON, wrong claim types, or too long.
    Malformed,
    /// The header names an algorithm other than HS256 (including "none").
    Algorithm,
    /// The HMAC does not match.
    Signature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `sub` is missing, not a string, empty or too long.
    Subject,
    /// No `exp`, and the gateway requires one.
    NoExpiry,
    /// `aud` does not name this gateway's audience.
    Audience,
    /// `iss` is not this gateway's issuer.
    Issuer,
}

impl TokenError {
    /// Label for the `reason` of the refused-token counter.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "alg",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "nbf",
            TokenError::Subject => "subject",
            TokenError::NoExpiry => "no_exp",
            TokenError::Audience => "aud",
            TokenError::Issuer => "iss",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token refused: {}", self.reason())
    }
}

impl std::error::Error for TokenError {}

/// Checks HS256 tokens against one shared secret. Cheap to call: the key schedule is done once
/// in [`Verifier::new`] and cloned per token.
#[derive(Clone)]
pub struct Verifier {
    mac: Hmac<Sha256>,
    rules: Rules,
}

impl fmt::Debug for Verifier {
    // The keyed MAC state is derived from the secret: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("rules", &self.rules).finish_non_exhaustive()
    }
}

impl Verifier {
    /// `secret` is the HS256 key shared with the business server; `rules` say what else a token
    /// must carry. Refusing an empty or short secret is config validation's job.
    pub fn new(secret: &[u8], rules: Rules) -> Self {
        Verifier { mac: keyed_mac(secret), rules }
    }

    /// Verifies a compact JWS: header must say alg HS256 (typ optional, any other alg incl.
    /// "none" → Algorithm), signature by HMAC-SHA256 compared in constant time, base64url without
    /// padding (strict), claims JSON with `sub` a non-empty string of at most 128 bytes (else
    /// Subject), `exp`/`nbf` numeric seconds (exp <= now - leeway → Expired; nbf > now + leeway →
    /// NotYetValid; no exp while required → NoExpiry), `aud`/`iss` when the rules name them
    /// (→ Audience, Issuer). Token length over 4096 bytes → Malformed.
    ///
    /// The signature is checked before the payload is parsed, so claims from an unsigned or
    /// forged token are never looked at.
    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let (signing_input, signature_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (header_b64, payload_b64) = signing_input.split_once('.').ok_or(TokenError::Malformed)?;
        if payload_b64.contains('.') {
            return Err(TokenError::Malformed);
        }
        check_header(&decode_segment(header_b64)?)?;
        self.check_signature(signing_input.as_bytes(), &decode_segment(signature_b64)?)?;
        let (claims, audience, issuer) = parse_claims(&decode_segment(payload_b64)?)?;
        check_times(&claims, now_unix_s, self.rules.leeway_s)?;
        if self.rules.require_exp && claims.exp.is_none() {
            return Err(TokenError::NoExpiry);
        }
        if let Some(want) = &self.rules.audience
            && !audience.iter().any(|a| a == want)
        {
            return Err(TokenError::Audience);
        }
        if let Some(want) = &self.rules.issuer
            && issuer.as_deref() != Some(want.as_str())
        {
            return Err(TokenError::Issuer);
        }
        Ok(claims)
    }

    fn check_signature(&self, signing_input: &[u8], signature: &[u8]) -> Result<(), TokenError> {
        let mut mac = self.mac.clone();
        mac.update(signing_input);
        // verify_slice compares in constant time (subtle) and refuses a wrong length.
        mac.verify_slice(signature).map_err(|_| TokenError::Signature)
    }
}

/// Signs claims (a JSON object) with HS256: for tests, the `barrage token` CLI and examples.
pub fn sign_hs256(secret: &[u8], claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{payload}");
    let mut mac = keyed_mac(secret);
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

fn keyed_mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length (long ones are hashed, short ones padded), so this
    // constructor cannot fail; its Result only exists for fixed-key MACs sharing the trait.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

/// Strict base64url: no padding, no whitespace, no non-zero trailing bits.
fn decode_segment(segment: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Malformed)
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    crit: Option<Value>,
}

fn check_header(json: &[u8]) -> Result<(), TokenError> {
    let header: RawHeader = parse_object(json)?;
    if header.alg.as_ref().and_then(Value::as_str) != Some("HS256") {
        return Err(TokenError::Algorithm);
    }
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we understand none.
    if header.crit.is_some() {
        return Err(TokenError::Malformed);
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<Value>,
    exp: Option<Number>,
    nbf: Option<Number>,
    send: Option<bool>,
    admin: Option<bool>,
    attrs: Option<bool>,
    level: Option<i32>,
    types: Option<Vec<String>>,
    rooms: Option<Vec<String>>,
    aud: Option<Value>,
    iss: Option<String>,
}

/// The claims, and the audiences and issuer they name (checked against the rules).
fn parse_claims(json: &[u8]) -> Result<(Claims, Vec<String>, Option<String>), TokenError> {
    let raw: RawClaims = parse_object(json)?;
    let sub = match raw.sub {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= SUBJECT_BYTES_MAX => s,
        _ => return Err(TokenError::Subject),
    };
    let audience = match raw.aud {
        None => Vec::new(),
        Some(Value::String(a)) => vec![a],
        Some(Value::Array(all)) => all
            .into_iter()
            .map(|a| a.as_str().map(str::to_owned).ok_or(TokenError::Malformed))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(TokenError::Malformed),
    };
    let claims = Claims {
        sub,
        exp: raw.exp.as_ref().map(seconds).transpose()?,
        nbf: raw.nbf.as_ref().map(seconds).transpose()?,
        send: raw.send.unwrap_or(true),
        admin: raw.admin.unwrap_or(false),
        attrs: raw.attrs.unwrap_or(false),
        level: raw.level.unwrap_or(0),
        types: grants(raw.types)?,
        rooms: grants(raw.rooms)?,
    };
    Ok((claims, audience, raw.iss))
}

/// A bounded list claim (`types`, `rooms`).
fn grants(list: Option<Vec<String>>) -> Result<Vec<String>, TokenError> {
    let list = list.unwrap_or_default();
    if list.len() > GRANTS_MAX || list.iter().any(|g| g.is_empty() || g.len() > GRANT_BYTES_MAX) {
        return Err(TokenError::Malformed);
    }
    Ok(list)
}

/// Parses a JSON object only. A derived struct would also take a JSON array positionally; the
/// leading `{` rules that out, and the derive refuses duplicate known keys (no "which `sub`?").
fn parse_object<T: for<'de> Deserialize<'de>>(json: &[u8]) -> Result<T, TokenError> {
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(TokenError::Malformed);
    }
    serde_json::from_slice(json).map_err(|_| TokenError::Malformed)
}

/// NumericDate (RFC 7519 §2): non-negative seconds, possibly fractional (truncated).
fn seconds(n: &Number) -> Result<u64, TokenError> {
    if let Some(s) = n.as_u64() {
        return Ok(s);
    }
    match n.as_f64() {
        // `as` saturates at u64::MAX for huge values, which reads as "far future".
        Some(f) if f.is_finite() && f >= 0.0 => Ok(f as u64),
        _ => Err(TokenError::Malformed),
    }
}

fn check_times(claims: &Claims, now: u64, leeway: u64) -> Result<(), TokenError> {
    // Checked, not saturating: `now - leeway` below zero expires nothing, and `now + leeway`
    // past u64::MAX is later than any nbf.
    let expired = match (claims.exp, now.checked_sub(leeway)) {
        (Some(exp), Some(cutoff)) => exp <= cutoff,
        _ => false,
    };
    if expired {
        return Err(TokenError::Expired);
    }
    let early = match (claims.nbf, now.checked_add(leeway)) {
        (Some(nbf), Some(cutoff)) => nbf > cutoff,
        _ => false,
    };
    if early {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const SECRET: &[u8] = b"barrage-test-secret";
    const NOW: u64 = 1_700_000_000;

    fn verifier() -> Verifier {
        Verifier::new(SECRET, Rules { leeway_s: 30, ..Rules::default() })
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with any header, signed correctly with SECRET.
    fn token_with_header(header: &str, claims: &Value) -> String {
        let signing_input = format!("{}.{}", b64(header.as_bytes()), b64(claims.to_string().as_bytes()));
        let mut mac = keyed_mac(SECRET);
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()))
    }

    #[test]
    fn round_trip() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice", "exp": NOW + 60, "nbf": NOW - 5}));
        let claims = verifier().verify(&token, NOW).unwrap();
        let expect = Claims {
            sub: "alice".into(),
            exp: Some(NOW + 60),
            nbf: Some(NOW - 5),
            send: true,
            admin: false,
            attrs: false,
            level: 0,
            types: Vec::new(),
            rooms: Vec::new(),
        };
        assert_eq!(claims, expect);
    }

    #[test]
    fn jwt_io_vector_verifies() {
        // The example token on jwt.io (HS256, secret "your-256-bit-secret"), no exp/nbf.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                     eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
                     SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let claims = Verifier::new(b"your-256-bit-secret", Rules { leeway_s: 0, ..Rules::default() })
            .verify(token, NOW)
            .unwrap();
        assert_eq!(claims.sub, "1234567890");
        assert_eq!((claims.exp, claims.nbf, claims.send), (None, None, true));
    }

    #[test]
    fn sign_matches_python_vector() {
        // python3: hmac.new(b"barrage-test-secret", signing_input, hashlib.sha256), base64url
        // without padding, claims as json.dumps(sort_keys=True, separators=(',', ':')).
        let expected = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                        eyJleHAiOjIwMDAwMDAwMDAsInNlbmQiOmZhbHNlLCJzdWIiOiJhbGljZSJ9.\
                        iqztyZyqqmEoKEUIz-cX1qG7hhaRgc96T-RIIMYzBFk";
        let token = sign_hs256(SECRET, &json!({"sub": "alice", "exp": 2_000_000_000u64, "send": false}));
        assert_eq!(token, expected);
        let claims = verifier().verify(expected, NOW).unwrap();
        assert!(!claims.send);
        assert_eq!(claims.exp, Some(2_000_000_000));
    }

    #[test]
    fn wrong_secret_is_signature() {
        let token = sign_hs256(b"other", &json!({"sub": "alice"}));
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Signature));
    }

    #[test]
    fn tampered_payload_is_signature() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice", "send": false}));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(json!({"sub": "alice", "send": true}).to_string().as_bytes());
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(verifier().verify(&tampered, NOW), Err(TokenError::Signature));
    }

    #[test]
    fn tampered_signature_is_refused() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice"}));
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
        bytes[0] ^= 1;
        let flipped = format!("{input}.{}", b64(&bytes));
        assert_eq!(verifier().verify(&flipped, NOW), Err(TokenError::Signature));
        let truncated = format!("{input}.{}", b64(&bytes[..31]));
        assert_eq!(verifier().verify(&truncated, NOW), Err(TokenError::Signature));
        let empty = format!("{input}.");
        assert_eq!(verifier().verify(&empty, NOW), Err(TokenError::Signature));
    }

    #[test]
    fn alg_none_and_others_are_refused() {
        let claims = json!({"sub": "alice"});
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"alg":"hs256"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"alg":256}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            let token = token_with_header(header, &claims);
            assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Algorithm), "{header}");
        }
        // The classic "none" attack: no signature at all.
        let unsigned = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(claims.to_string().as_bytes()));
        assert_eq!(verifier().verify(&unsigned, NOW), Err(TokenError::Algorithm));
    }

    #[test]
    fn typ_is_optional_and_crit_is_refused() {
        let claims = json!({"sub": "alice"});
        assert!(verifier().verify(&token_with_header(r#"{"alg":"HS256"}"#, &claims), NOW).is_ok());
        let crit = token_with_header(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#, &claims);
        assert_eq!(verifier().verify(&crit, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn expiry_with_leeway() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice", "exp": NOW}));
        let v = verifier(); // leeway 30 s
        assert!(v.verify(&token, NOW + 29).is_ok());
        assert_eq!(v.verify(&token, NOW + 30), Err(TokenError::Expired));
        assert_eq!(
            Verifier::new(SECRET, Rules { leeway_s: 0, ..Rules::default() }).verify(&token, NOW),
            Err(TokenError::Expired)
        );
        assert!(Verifier::new(SECRET, Rules { leeway_s: 0, ..Rules::default() }).verify(&token, NOW - 1).is_ok());
    }

    #[test]
    fn not_before_with_leeway() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice", "nbf": NOW + 100}));
        let v = verifier(); // leeway 30 s
        assert_eq!(v.verify(&token, NOW + 69), Err(TokenError::NotYetValid));
        assert!(v.verify(&token, NOW + 70).is_ok());
        assert_eq!(
            Verifier::new(SECRET, Rules { leeway_s: 0, ..Rules::default() }).verify(&token, NOW + 99),
            Err(TokenError::NotYetValid)
        );
        assert!(Verifier::new(SECRET, Rules { leeway_s: 0, ..Rules::default() }).verify(&token, NOW + 100).is_ok());
    }

    #[test]
    fn leeway_does_not_overflow() {
        let token = sign_hs256(SECRET, &json!({"sub": "a", "exp": u64::MAX, "nbf": u64::MAX}));
        let v = Verifier::new(SECRET, Rules { leeway_s: u64::MAX, ..Rules::default() });
        assert!(v.verify(&token, u64::MAX).is_ok());
        let old = sign_hs256(SECRET, &json!({"sub": "a", "exp": 0}));
        assert!(v.verify(&old, 0).is_ok());
    }

    #[test]
    fn fractional_times_are_accepted_negative_are_not() {
        let token = sign_hs256(SECRET, &json!({"sub": "a", "exp": (NOW + 60) as f64 + 0.5}));
        assert_eq!(verifier().verify(&token, NOW).unwrap().exp, Some(NOW + 60));
        for claims in [
            json!({"sub": "a", "exp": -1}),
            json!({"sub": "a", "nbf": -0.5}),
            json!({"sub": "a", "exp": "soon"}),
            json!({"sub": "a", "send": "yes"}),
        ] {
            let token = sign_hs256(SECRET, &claims);
            assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Malformed), "{claims}");
        }
    }

    #[test]
    fn subject_must_be_short_non_empty_string() {
        let long = "x".repeat(SUBJECT_BYTES_MAX + 1);
        for claims in [json!({}), json!({"sub": ""}), json!({"sub": null}), json!({"sub": 42}), json!({"sub": long})] {
            let token = sign_hs256(SECRET, &claims);
            assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Subject), "{claims}");
        }
        let max = "x".repeat(SUBJECT_BYTES_MAX);
        let token = sign_hs256(SECRET, &json!({"sub": max}));
        assert!(verifier().verify(&token, NOW).is_ok());
    }

    #[test]
    fn admin_attrs_and_level_claims() {
        let token = sign_hs256(SECRET, &json!({"sub": "mod", "admin": true, "attrs": true, "level": 42}));
        let c = verifier().verify(&token, NOW).unwrap();
        assert_eq!((c.admin, c.attrs, c.level), (true, true, 42));
        let token = sign_hs256(SECRET, &json!({"sub": "x", "admin": "yes"}));
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn send_false_makes_read_only() {
        let token = sign_hs256(SECRET, &json!({"sub": "viewer", "send": false}));
        assert!(!verifier().verify(&token, NOW).unwrap().send);
    }

    #[test]
    fn non_object_json_is_malformed() {
        // A derived struct would read an array positionally; a signed array is still refused.
        let header = b64(br#"{"alg":"HS256"}"#);
        let signing_input = format!("{header}.{}", b64(br#"["alice",1,1,true]"#));
        let mut mac = keyed_mac(SECRET);
        mac.update(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Malformed));
        let array_header = token_with_header(r#"["HS256"]"#, &json!({"sub": "a"}));
        assert_eq!(verifier().verify(&array_header, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn duplicate_subject_is_malformed() {
        let header = b64(br#"{"alg":"HS256"}"#);
        let signing_input = format!("{header}.{}", b64(br#"{"sub":"alice","sub":"admin"}"#));
        let mut mac = keyed_mac(SECRET);
        mac.update(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn shape_errors_are_malformed() {
        let token = sign_hs256(SECRET, &json!({"sub": "alice"}));
        let v = verifier();
        for bad in [
            String::new(),
            "abc".to_string(),
            "a.b".to_string(),
            format!("{token}.extra"),
            format!("{token}="),      // padding
            token.replace('.', "=."), // padded segments
            format!(" {token}"),      // whitespace
            "x".repeat(TOKEN_BYTES_MAX + 1),
        ] {
            assert_eq!(v.verify(&bad, NOW), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn oversize_token_is_malformed_even_if_signed() {
        let claims = json!({"sub": "alice", "pad": "p".repeat(TOKEN_BYTES_MAX)});
        let token = sign_hs256(SECRET, &claims);
        assert!(token.len() > TOKEN_BYTES_MAX);
        assert_eq!(verifier().verify(&token, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn reasons_are_metric_labels() {
        let all = [
            TokenError::Malformed,
            TokenError::Algorithm,
            TokenError::Signature,
            TokenError::Expired,
            TokenError::NotYetValid,
            TokenError::Subject,
        ];
        let labels: Vec<&str> = all.iter().map(TokenError::reason).collect();
        assert_eq!(labels, ["malformed", "alg", "signature", "expired", "nbf", "subject"]);
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", Verifier::new(b"hunter2", Rules { leeway_s: 5, ..Rules::default() }));
        assert!(!shown.contains("hunter2") && shown.contains("leeway_s: 5"), "{shown}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".{0,600}", now in any::<u64>()) {
            prop_assert!(verifier().verify(&s, now).is_err());
        }

        #[test]
        fn token_shaped_garbage_never_panics(
            h in "[A-Za-z0-9_-]{0,60}", p in "[A-Za-z0-9_-]{0,80}", s in "[A-Za-z0-9_-]{0,50}",
        ) {
            let _ = verifier().verify(&format!("{h}.{p}.{s}"), NOW);
        }

        #[test]
        fn any_changed_character_is_refused(index in any::<prop::sample::Index>(), c in any::<char>()) {
            let token = sign_hs256(SECRET, &json!({"sub": "alice", "send": false}));
            let i = index.index(token.len());
            prop_assume!(token.as_bytes()[i] as char != c);
            let mut changed = token.clone();
            changed.replace_range(i..=i, c.encode_utf8(&mut [0; 4]));
            prop_assert!(verifier().verify(&changed, NOW).is_err());
        }
    }

    #[test]
    fn expiry_is_required_unless_the_rules_waive_it() {
        let strict = Verifier::new(SECRET, Rules { leeway_s: 30, require_exp: true, ..Rules::default() });
        let forever = sign_hs256(SECRET, &json!({"sub": "a"}));
        assert_eq!(strict.verify(&forever, NOW), Err(TokenError::NoExpiry));
        assert!(verifier().verify(&forever, NOW).is_ok(), "the operator opted out");
        let timed = sign_hs256(SECRET, &json!({"sub": "a", "exp": NOW + 60}));
        assert!(strict.verify(&timed, NOW).is_ok());
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let rules = Rules { audience: Some("barrage".into()), issuer: Some("shop".into()), ..Rules::default() };
        let v = Verifier::new(SECRET, rules);
        let ok = [
            json!({"sub": "a", "aud": "barrage", "iss": "shop"}),
            json!({"sub": "a", "aud": ["x", "barrage"], "iss": "shop"}),
        ];
        for claims in ok {
            assert!(v.verify(&sign_hs256(SECRET, &claims), NOW).is_ok(), "{claims}");
        }
        let aud = [json!({"sub": "a", "iss": "shop"}), json!({"sub": "a", "aud": "other", "iss": "shop"})];
        for claims in aud {
            assert_eq!(v.verify(&sign_hs256(SECRET, &claims), NOW), Err(TokenError::Audience), "{claims}");
        }
        let iss = json!({"sub": "a", "aud": "barrage", "iss": "evil"});
        assert_eq!(v.verify(&sign_hs256(SECRET, &iss), NOW), Err(TokenError::Issuer));
        let bad = json!({"sub": "a", "aud": 7});
        assert_eq!(v.verify(&sign_hs256(SECRET, &bad), NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn grants_are_bounded_and_scope_rights() {
        let c = verifier()
            .verify(&sign_hs256(SECRET, &json!({"sub": "a", "types": ["gift"], "rooms": ["r1"]})), NOW)
            .unwrap();
        assert_eq!((c.types, c.rooms.clone()), (vec!["gift".to_string()], vec!["r1".to_string()]));
        assert!(Claims::rights_in(&c.rooms, "r1") && !Claims::rights_in(&c.rooms, "r2"));
        assert!(Claims::rights_in(&["*".to_string()], "any"));
        assert!(!Claims::rights_in(&[], "r1"), "no rooms claim: rights apply nowhere");
        let many: Vec<String> = (0..=GRANTS_MAX).map(|i| format!("t{i}")).collect();
        for claims in [
            json!({"sub": "a", "types": many}),
            json!({"sub": "a", "rooms": [""]}),
            json!({"sub": "a", "types": "gift"}),
        ] {
            assert_eq!(verifier().verify(&sign_hs256(SECRET, &claims), NOW), Err(TokenError::Malformed), "{claims}");
        }
    }
}
