//! What the filter writes to clients: cookies (signed, refreshed, moving or
//! expired) and its two local replies, the 307 replay and the 503 retry-later.

use super::Worker;
use crate::config::Config;
use crate::cookie::{self, Claims, NewClaims, FLAG_MOVING};
use crate::host::{HttpHost, WorkerHost};

/// A moving cookie only has to carry the very next request.
const MOVING_TTL_SECS: u64 = 60;

/// Where a session is pinned, for a new cookie.
#[derive(Debug, Clone, Copy)]
pub struct Pin<'a> {
    pub sid: &'a str,
    pub cluster: &'a str,
    pub upstream: &'a str,
    pub instance: &'a str,
    /// When the session started (its absolute lifetime counts from here).
    pub since: u64,
}

impl<'a> Pin<'a> {
    /// The pin a cookie records.
    pub fn of(claims: &'a Claims) -> Pin<'a> {
        Pin { sid: claims.sid(), cluster: claims.cluster(), upstream: claims.upstream(), instance: claims.instance(), since: claims.since }
    }
}

/// Renders cookies and local replies under one configuration.
pub struct Issuer<'a> {
    pub config: &'a Config,
    /// Draws the random bytes each sealed cookie needs.
    pub worker: &'a Worker,
    pub context_id: u32,
}

impl Issuer<'_> {
    /// A `Set-Cookie` value pinning `pin`, valid from now; `None` when the
    /// session is past its absolute lifetime or a field cannot be encoded.
    pub fn set_cookie(&self, host: &mut impl WorkerHost, pin: Pin<'_>, flags: u8) -> Option<String> {
        let now = host.now_ms() / 1000;
        let c = &self.config.cookie;
        let end_of_life = pin.since.saturating_add(c.max_lifetime_secs);
        let mut exp = now.saturating_add(c.ttl_secs).min(end_of_life);
        if flags & FLAG_MOVING != 0 {
            let lease_secs = self.config.store.as_ref().map_or(0, |s| s.lease_ms / 1000);
            exp = exp.min(now.saturating_add(MOVING_TTL_SECS.max(2 * lease_secs)));
        }
        if exp <= now {
            return None;
        }
        let claims = NewClaims {
            sid: pin.sid,
            cluster: pin.cluster,
            upstream: pin.upstream,
            instance: pin.instance,
            since: pin.since,
            iat: now,
            exp,
            flags,
        };
        let fresh = self.worker.unguessable(host, self.config, self.context_id);
        let value = cookie::issue(&claims, &self.config.keys, c.format, &fresh)?;
        Some(self.render(&value, exp - now))
    }

    /// The claims of a cookie for `pin`, as if it had just been issued and read
    /// back (to follow a session to the owner another proxy chose).
    pub fn claims(&self, pin: Pin<'_>, now: u64) -> Option<Claims> {
        let exp = now.saturating_add(self.config.cookie.ttl_secs);
        let claims = NewClaims { sid: pin.sid, cluster: pin.cluster, upstream: pin.upstream, instance: pin.instance, since: pin.since, iat: now, exp, flags: 0 };
        cookie::decode(cookie::encode(&claims, &self.config.keys)?, &self.config.keys, now).ok()
    }

    /// A `Set-Cookie` value that removes the cookie.
    pub fn expired_cookie(&self) -> String {
        self.render("", 0)
    }

    fn render(&self, value: &str, max_age: u64) -> String {
        let c = &self.config.cookie;
        format!("{}={}{}; Max-Age={}", c.name, value, c.attributes, max_age)
    }

    /// Whether a cookie should be re-issued on this response: signed with an
    /// older key or in the other format, past `refresh_after` of its life, or
    /// (with a store) old enough that the store entry needs its idle timer
    /// reset; or the first return of a new session's cookie.
    pub fn needs_refresh(&self, claims: &Claims, now: u64) -> bool {
        // A new session's cookie that came back: its store entry may now live.
        if Some(claims.kid()) != self.config.keys.signing_id() || claims.format() != self.config.cookie.format || claims.is_new() {
            return true;
        }
        let age = now.saturating_sub(claims.iat);
        let life = claims.exp.saturating_sub(claims.iat) as f64;
        let idle_half = self.config.store.as_ref().map_or(u64::MAX, |s| s.idle_ttl_ms / 2000);
        age as f64 >= life * self.config.cookie.refresh_after || age >= idle_half
    }

    /// Answers 307 to the same URL with `set_cookie`, so the client repeats
    /// the request (a browser replays a POST with its body).
    pub fn replay(&self, host: &mut impl HttpHost, path: &str, set_cookie: &str) {
        host.send_response(
            307,
            &[("location", same_site_location(path)), ("set-cookie", set_cookie), ("cache-control", "no-store")],
            "session moved; repeat the request\n",
        );
    }

    /// A 503 that tells the client to retry, optionally re-pinning its cookie.
    pub fn retry_later(&self, host: &mut impl HttpHost, body: &str, set_cookie: Option<&str>) {
        let retry_after = self.config.store.as_ref().map_or(1, |s| s.retry_after_secs).to_string();
        let mut headers = vec![("retry-after", retry_after.as_str()), ("cache-control", "no-store")];
        if let Some(set_cookie) = set_cookie {
            headers.push(("set-cookie", set_cookie));
        }
        host.send_response(503, &headers, body);
    }
}

/// The request's own path as a redirect target, or "/" when a browser could
/// read it as another site ("//evil.example", "/\\evil.example"): the replay
/// must never be an open redirect.
pub fn same_site_location(path: &str) -> &str {
    let bytes = path.as_bytes();
    let same_site = bytes.first() == Some(&b'/') && !matches!(bytes.get(1), Some(b'/' | b'\\'));
    if same_site {
        path
    } else {
        "/"
    }
}
