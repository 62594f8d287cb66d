//! What a response says, decided from its headers and Envoy's response flags:
//! whether an app was reached, and what the app told the filter. Pure.

use crate::config::Config;
use crate::headers::HeaderMap;
use crate::ids::{is_instance, is_sid};
use crate::store::is_header_value;

/// Envoy `response.flags` bits: UH (no healthy upstream), UF (connection
/// failure), UR (upstream remote reset), UC (upstream connection termination).
pub const FLAG_UH: u64 = 0x2;
pub const FLAG_UR: u64 = 0x10;
pub const FLAG_UF: u64 = 0x20;
pub const FLAG_UC: u64 = 0x40;

/// Whether the request reached an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// An app answered.
    Served,
    /// Envoy had no healthy host to send it to (503 UH): no app saw it.
    NoHealthyHost,
    /// The host refused the connection (503 UF), or a mesh sidecar answered
    /// for an app it could not reach: no app saw it.
    ConnectFailed,
    /// The connection broke before any answer (503 UC/UR): an app may have
    /// seen it, so only a safe method may be repeated.
    ConnectionLost,
}

/// The parts of a response the flow looks at, read with one host call.
#[derive(Debug, Default)]
pub struct ResponseView<'a> {
    pub status: u32,
    pub instance: Option<&'a str>,
    /// New session state, if the app sent a usable one.
    pub state: Option<&'a str>,
    /// The app sent a state header, usable or not.
    pub state_sent: bool,
    pub unknown: bool,
    pub end: bool,
    /// The header value of a rotation (`Some("")` when it names no valid id).
    pub rotate: Option<&'a str>,
    /// A mesh sidecar's mark on its own reply: the Envoy response flags it
    /// answered with (UF: its app refused the connection; UC: the connection
    /// broke), so the flags cross the mesh.
    pub unreached: Option<&'a str>,
    /// Internal header names present, to strip before the client sees them
    /// (an array: the pinned path allocates nothing for them).
    internal: [&'a [u8]; INTERNAL_RESPONSE_HEADERS],
    internal_count: usize,
}

/// How many of the header names are response headers the client must not see.
const INTERNAL_RESPONSE_HEADERS: usize = 9;

impl<'a> ResponseView<'a> {
    pub fn read(headers: &'a HeaderMap, config: &Config) -> ResponseView<'a> {
        let h = &config.headers;
        let mut view = ResponseView::default();
        for (name, value) in headers.iter() {
            let text = || std::str::from_utf8(value).ok();
            if name == b":status" {
                view.status = text().and_then(|s| s.parse().ok()).unwrap_or(0);
                continue;
            }
            if name == h.instance_id.as_bytes() {
                // An empty or unusable id is no id: it must not look like a restart.
                view.instance = text().filter(|i| !i.is_empty() && is_instance(i));
            } else if name == h.session_state.as_bytes() {
                view.state_sent = true;
                view.state = Some(value).filter(|v| !v.is_empty() && is_header_value(v)).and_then(|_| text());
            } else if name == h.session_unknown.as_bytes() {
                view.unknown = true;
            } else if name == h.session_end.as_bytes() {
                view.end = true;
            } else if name == h.session_rotate.as_bytes() {
                view.rotate = Some(text().filter(|s| is_sid(s)).unwrap_or(""));
            } else if name == h.unreached.as_bytes() {
                view.unreached = text();
            } else if name != h.route.as_bytes() && name != h.session_id.as_bytes() && name != h.session_new.as_bytes() {
                // The app echoing the filter's request headers back must not
                // show them to the client either.
                continue;
            }
            if !view.internal().contains(&name) {
                if let Some(slot) = view.internal.get_mut(view.internal_count) {
                    *slot = name;
                    view.internal_count += 1;
                }
            }
        }
        view
    }

    pub fn internal(&self) -> &[&'a [u8]] {
        self.internal.get(..self.internal_count).unwrap_or_default()
    }

    /// An error with no instance id, to a session pinned to an instance: the
    /// app speaks the contract and marks every answer of its own, so this one
    /// came from around it, from the app server (Tomcat answers 400 or 404
    /// for the moments its connector outlives its stopping web app). A
    /// sidecar's mark says more, and wins; Envoy's own reply carries response
    /// flags (`flags`, a host call, read last).
    pub fn is_app_server_error(&self, pinned_instance: &str, flags: impl FnOnce() -> u64) -> bool {
        self.status >= 400 && self.instance.is_none() && self.unreached.is_none() && !pinned_instance.is_empty() && flags() == 0
    }

    /// Whether the request reached an app. `flags` reads Envoy's response
    /// flags (a host call), only for a 503.
    pub fn reach(&self, flags: impl FnOnce() -> u64) -> Reach {
        if self.status != 503 {
            return Reach::Served;
        }
        // A sidecar's own reply never carries the app's instance id; an answer
        // that does is the app's, whatever headers it sends.
        if let (Some(sidecar_flags), None) = (self.unreached, self.instance) {
            let has = |flag: &str| sidecar_flags.split(',').any(|f| f.trim() == flag);
            // UO (overloaded) or NR (no route) on a sidecar says nothing about its app.
            return if has("UC") || has("UR") {
                Reach::ConnectionLost
            } else if has("UF") || has("UH") || has("URX") {
                Reach::ConnectFailed
            } else {
                Reach::Served
            };
        }
        let flags = flags();
        if flags & FLAG_UF != 0 {
            Reach::ConnectFailed
        } else if flags & FLAG_UH != 0 {
            Reach::NoHealthyHost
        } else if flags & (FLAG_UC | FLAG_UR) != 0 {
            Reach::ConnectionLost
        } else {
            Reach::Served
        }
    }
}
