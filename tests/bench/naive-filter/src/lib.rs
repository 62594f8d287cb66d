//! BENCHMARK BASELINE, NOT A PRODUCT FILTER.
//!
//! The "naive minimal sticky wasm filter" that `tests/bench/run` uses to
//! calibrate the real filter's pinned path. It does what any straightforward
//! first implementation of signed sticky sessions would do on each request,
//! and nothing more:
//!
//! 1. read the `cookie` request header and find the `sa` cookie;
//! 2. split the v2 value `2|sid|cluster|host|instance|since|iat|exp|kid|flags|tag`
//!    (the format of the working contract, so the same cookie drives this
//!    baseline and the real filter);
//! 3. key a fresh HMAC-SHA256 with the secret (every request, no cached key
//!    state), MAC every byte before the tag, and compare it with the decoded
//!    tag in constant time (`verify_slice`);
//! 4. check `exp` against the wall clock;
//! 5. on success write `x-session-route: base64(host)` for Envoy's
//!    `stateful_session` filter (header state, strict); otherwise remove any
//!    client-sent copy of that header.
//!
//! There are no new sessions, no Set-Cookie, no key rotation (the kid is not
//! checked), no metrics and no failover. Its plugin configuration is the raw
//! HMAC secret (a `StringValue`). It uses the same crypto crates as the filter
//! (hmac 0.12, sha2 0.10, base64 0.22). Host calls are the fallible
//! `proxy_wasm::hostcalls` ones; nothing here can panic.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use sha2::Sha256;

/// The cookie this baseline reads.
const COOKIE_NAME: &[u8] = b"sa";
/// The override header read by `stateful_session` (header session state).
const ROUTE_HEADER: &str = "x-session-route";
/// Shortest secret accepted, as in the real filter.
const MIN_SECRET_LEN: usize = 32;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(NaiveRoot { secret: Rc::from(Vec::new()) })
    });
}}

/// Root context: holds the secret read once from the plugin configuration.
struct NaiveRoot {
    secret: Rc<[u8]>,
}

impl Context for NaiveRoot {}

impl RootContext for NaiveRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let Ok(Some(secret)) = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        else {
            log::warn!("naive: plugin configuration (the HMAC secret) is missing");
            return false;
        };
        if secret.len() < MIN_SECRET_LEN {
            log::warn!("naive: secret must be at least {MIN_SECRET_LEN} bytes");
            return false;
        }
        self.secret = Rc::from(secret);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Naive {
            secret: Rc::clone(&self.secret),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Per-request context.
struct Naive {
    secret: Rc<[u8]>,
}

impl Context for Naive {}

impl HttpContext for Naive {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let route = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "cookie")
            .ok()
            .flatten()
            .and_then(|cookies| pinned_host(&cookies, &self.secret, now_secs()));
        let result = match route {
            Some(host) => hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                ROUTE_HEADER,
                Some(&STANDARD.encode(host)),
            ),
            None => hostcalls::remove_map_value(MapType::HttpRequestHeaders, ROUTE_HEADER),
        };
        if result.is_err() {
            log::warn!("naive: could not write the {ROUTE_HEADER} header");
        }
        Action::Continue
    }
}

/// Wall-clock seconds since the epoch; 0 when the host cannot tell (then every
/// cookie with a future expiry still passes, which is fine for a baseline).
fn now_secs() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Returns the pinned host of a valid, unexpired `sa` cookie in a `cookie`
/// header value, or `None`.
fn pinned_host(cookie_header: &[u8], secret: &[u8], now: u64) -> Option<String> {
    let value = find_cookie(cookie_header, COOKIE_NAME)?;
    // The signed part is every byte up to and including the last '|'.
    let bar = value.iter().rposition(|&b| b == b'|')?;
    let (signed, tag_field) = value.split_at(bar.checked_add(1)?);
    let tag = URL_SAFE_NO_PAD.decode(tag_field).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(signed);
    mac.verify_slice(&tag).ok()?;

    let text = std::str::from_utf8(signed).ok()?;
    let mut fields = text.split('|');
    let (Some("2"), Some(_sid), Some(_cluster), Some(host), Some(_instance), Some(_since), Some(_iat), Some(exp), Some(_kid), Some(flags)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return None;
    };
    let exp: u64 = exp.parse().ok()?;
    let flags: u32 = flags.parse().ok()?;
    if exp <= now || flags & 1 != 0 || host.is_empty() {
        return None;
    }
    Some(host.to_owned())
}

/// Finds the value of cookie `name` in a `cookie` header (`a=1; b=2`).
fn find_cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (key, rest) = pair.split_at(eq);
        (key == name).then(|| rest.get(1..)).flatten()
    })
}
