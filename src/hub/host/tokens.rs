//! A connection's token after the handshake: signing in (flags, the user index, grants), the
//! expiry watch — a connection whose token expires is told so (error 401) and closed (1008)
//! `refresh_grace_ms` later unless it sends `refresh` with a new token for the same user — and
//! the refresh itself.

use super::Host;
use super::conn::{State, flag};
use super::grants::Grants;
use super::session::code;
use super::users::UserKey;
use crate::auth::Claims;
use crate::ids::{ConnKey, Now, UserId};
use crate::metrics::Series;
use crate::proto::{Refresh, Refreshed, ServerFrame, server_frame};
use crate::wire::CloseCode;

/// When a connection's token expires, and whether it has been told.
pub struct Expiry {
    exp_ms: i64,
    told: bool,
}

impl Host {
    /// Applies a verified token to a connection: flags, the user index, and the expiry watch.
    /// Returns when the token expires (Unix ms; 0 = never).
    pub(super) fn sign_in(&mut self, key: ConnKey, claims: &Claims) -> i64 {
        let conn = self.conns.get_mut(key);
        conn.flags |= flag::SIGNED_IN;
        conn.flags &= !(flag::CAN_SEND | flag::ADMIN | flag::ATTRS);
        for (granted, f) in [(claims.send, flag::CAN_SEND), (claims.admin, flag::ADMIN), (claims.attrs, flag::ATTRS)] {
            if granted {
                conn.flags |= f;
            }
        }
        let grants = Grants::from_claims(claims);
        match conn.user {
            UserKey::NONE => {
                let user = self.users.add(&UserId::new(&claims.sub), key, claims.level, grants);
                self.conns.get_mut(key).user = user;
            }
            user => self.users.update(user, claims.level, grants),
        }
        let exp_ms = claims.exp.map_or(0, |s| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX));
        match claims.exp {
            Some(_) => {
                self.expiries.insert(key, Expiry { exp_ms, told: false });
            }
            None => {
                self.expiries.remove(&key);
            }
        }
        exp_ms
    }

    /// The sweep's look at a signed-in connection's token.
    pub(super) fn check_expiry(&mut self, key: ConnKey, now: Now) {
        let grace = self.cfg.refresh_grace_ms as i64;
        let Some(e) = self.expiries.get_mut(&key) else { return };
        if e.told && now.unix.0 >= e.exp_ms.saturating_add(grace) {
            self.close(key, CloseCode::POLICY, "token expired", Series::ClosedExpired, now);
        } else if !e.told && now.unix.0 >= e.exp_ms {
            e.told = true;
            let why = "token expired: send refresh with a new token";
            self.send_error(key, code::UNAUTHORIZED, why, now);
        }
    }

    /// `refresh {token}`: a new token for the same user replaces the connection's.
    pub(super) fn refresh(&mut self, key: ConnKey, r: Refresh, now: Now) {
        let conn = self.conns.get(key);
        let Some(user) = self.users.id(conn.user).cloned() else {
            return self.send_error(key, code::BAD_REQUEST, "anonymous viewers have no token to refresh", now);
        };
        let Some(verifier) = &self.verifier else {
            return self.send_error(key, code::UNAUTHORIZED, "tokens are not accepted", now);
        };
        let now_s = (now.unix.0.max(0) / 1000) as u64;
        let claims = match verifier.verify(&r.token, now_s) {
            Ok(c) => c,
            Err(e) => {
                self.counters.inc(Series::RefreshRefused);
                return self.send_error(key, code::UNAUTHORIZED, e.reason(), now);
            }
        };
        if claims.sub != user.as_str() {
            self.counters.inc(Series::RefreshRefused);
            return self.send_error(key, code::FORBIDDEN, "a refresh must be for the same user", now);
        }
        debug_assert_eq!(self.conns.get(key).state, State::Open);
        let expires_ms = self.sign_in(key, &claims);
        self.counters.inc(Series::Refreshes);
        let frame = ServerFrame { frame: Some(server_frame::Frame::Refreshed(Refreshed { expires_ms })) };
        self.send_frame(key, &frame, now);
    }
}
