//! What a request is, decided from its headers alone: a new session, a session to send to its pinned host, or one that
//! must fail over. Pure: it reads, it changes nothing.

use crate::config::Config;
use crate::cookie::{Claims, ClusterTag, Rejection, VerifiedCookies};
use crate::gone::GoneTable;
use crate::headers::HeaderMap;

/// Cookies with the filter's name that a request may carry and still be
/// served: more is an attack or a mess, and costs a MAC each.
pub const MAX_COOKIES: usize = 3;

/// The parts of the request headers the flow looks at, read in one pass.
#[derive(Debug, Default)]
pub struct RequestView<'a> {
    pub path: &'a [u8],
    /// GET, HEAD or OPTIONS: safe to repeat after a lost connection (RFC 9110 §9.2.2).
    pub safe_method: bool,
    /// Values of the cookies with the filter's name (a fixed array: the
    /// pinned path allocates nothing for them).
    cookies: [&'a [u8]; MAX_COOKIES],
    cookie_count: usize,
    /// More cookies with the filter's name than are looked at.
    pub too_many_cookies: bool,
    /// Client-sent header names that spell an internal header: to be removed as sent.
    pub internal: Vec<&'a [u8]>,
}

impl<'a> RequestView<'a> {
    pub fn read(headers: &'a HeaderMap, config: &Config) -> RequestView<'a> {
        let name = config.cookie.name.as_bytes();
        let mut view = RequestView::default();
        for (header, value) in headers.iter() {
            match header {
                b":path" => view.path = value,
                b":method" => view.safe_method = matches!(value, b"GET" | b"HEAD" | b"OPTIONS"),
                b"cookie" => {
                    for pair in value.split(|&b| b == b';') {
                        let pair = pair.trim_ascii();
                        let Some(eq) = pair.iter().position(|&b| b == b'=') else { continue };
                        let (key, value) = pair.split_at(eq);
                        if key != name {
                            continue;
                        }
                        match view.cookies.get_mut(view.cookie_count) {
                            Some(slot) => {
                                *slot = value.get(1..).unwrap_or_default();
                                view.cookie_count += 1;
                            }
                            None => view.too_many_cookies = true,
                        }
                    }
                }
                h if config.internal.matches(h) => view.internal.push(h),
                _ => {}
            }
        }
        view
    }

    pub fn cookies(&self) -> &[&'a [u8]] {
        self.cookies.get(..self.cookie_count).unwrap_or_default()
    }
}

/// What a request on a path that needs affinity is.
#[derive(Debug)]
pub enum Arrival {
    /// A valid cookie, but for another cluster's route: not steered, nothing marked.
    OtherCluster,
    /// No usable cookie; `Some` says why one was refused.
    New(Option<Rejection>),
    Pinned(Claims),
    /// The pinned host or instance is known gone here.
    KnownGone(Claims),
    /// The cookie says a proxy found the host gone; this is its replay.
    Moving(Claims),
}

/// Classifies a request arriving at `now_ms` on a route to the cluster tagged `cluster`.
pub fn classify(view: &RequestView<'_>, config: &Config, verified: &VerifiedCookies, gone: &GoneTable, cluster: ClusterTag, now_ms: u64) -> Arrival {
    let now = now_ms / 1000;
    let claims = match session_cookie(view, config, verified, now) {
        Ok(claims) => claims,
        Err(rejection) => return Arrival::New(rejection),
    };
    // Past its absolute lifetime whatever the cookie says (a config that
    // shortened the lifetime applies to cookies issued before it).
    if now >= claims.since.saturating_add(config.cookie.max_lifetime_secs) {
        return Arrival::New(Some(Rejection::Expired));
    }
    if claims.cluster() != cluster.as_str() {
        return Arrival::OtherCluster;
    }
    if claims.is_moving() {
        Arrival::Moving(claims)
    } else if gone.is_gone(claims.upstream(), claims.instance(), now_ms) {
        Arrival::KnownGone(claims)
    } else {
        Arrival::Pinned(claims)
    }
}

/// The session the request's cookies name. Several valid cookies are fine
/// only when they name one session (the newest wins); cookies naming
/// different sessions are ambiguous and none is trusted, so a cookie planted
/// from a sibling domain or a narrower path can never take a request over.
/// `Err(None)`: no cookie at all.
fn session_cookie(view: &RequestView<'_>, config: &Config, verified: &VerifiedCookies, now: u64) -> Result<Claims, Option<Rejection>> {
    if view.too_many_cookies {
        return Err(Some(Rejection::Ambiguous));
    }
    let mut chosen: Option<Claims> = None;
    let mut first_rejection = None;
    for value in view.cookies() {
        match verified.decode(value, &config.keys, now) {
            Ok(claims) => match &chosen {
                Some(current) if current.sid() != claims.sid() => return Err(Some(Rejection::Ambiguous)),
                Some(current) if current.iat >= claims.iat => {}
                _ => chosen = Some(claims),
            },
            Err(reason) => {
                first_rejection.get_or_insert(reason);
            }
        }
    }
    chosen.ok_or(first_rejection)
}
