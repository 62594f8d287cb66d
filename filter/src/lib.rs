//! Session affinity for Envoy and Istio: a proxy-wasm HTTP filter that pins a
//! session to an upstream host with a signed cookie, and moves the session's
//! state through a session store when that host is gone.
//!
//! # Module map
//!
//! Layers, bottom up (each uses only those below it):
//! 1. [`ids`] (session id, upstream, instance, owner), [`headers`] (header
//!    maps, internal header names);
//! 2. [`keys`] (HMAC key ring), then [`cookie`] (the signed cookie and the
//!    per-worker cache of verified cookies);
//! 3. [`config`] (JSON in, immutable settings out);
//! 4. [`store`] (typed operations; the webdis and etcd dialects);
//! 5. [`host`] (what the core needs from a proxy), [`exclusive`] (state that
//!    is borrowed without conflicts), then [`gone`] (the shared
//!    table of gone hosts), [`breaker`] (the store's circuit breaker),
//!    [`ended`] (sessions ended without the store's word), [`metrics`];
//! 6. [`flow`] (every decision, per request);
//! 7. the shells that connect the core to a proxy: `shell::wasm` (proxy-wasm),
//!    and the native Envoy module in `filter/native` (its own crate).
//!
//! A pinned request: the shell hands the request headers to
//! `flow::Flow::on_request_headers` → `flow::request` reads the cookie
//! (`cookie::VerifiedCookies`, no MAC on a repeat), checks its cluster and the
//! gone table → `host.route_to(upstream)`; on the way back
//! `flow::response` reads the app's answer and `flow::session` refreshes the
//! cookie or writes new state (`store::Op::Write`) when the app sent some.
//!
//! A failover: `flow::request` finds the host gone (or the cookie flagged
//! moving) → `flow::failover` asks the store (`store::Op::Begin`: lease and
//! state), sends the request unpinned with the state, and on the answer
//! commits the new owner (`store::Op::Commit`) and re-pins the cookie. A host
//! found gone mid-request (`flow::response`: 503 UH/UF) is marked in `gone`
//! and the request is replayed with a 307 that carries a moving cookie.

pub mod breaker;
pub mod config;
pub mod cookie;
pub mod ended;
pub mod exclusive;
pub mod flow;
pub mod gone;
pub mod headers;
pub mod host;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(target_arch = "wasm32")]
mod shell {
    mod wasm;
}
