//! Header maps as the proxy hands them over (one buffer, read in place), and
//! the set of internal header names a client must never send in any spelling.
//!
//! proxy-wasm serialises a map as `count`, then `count` pairs of (name
//! length, value length), then every name and value each followed by a NUL,
//! all lengths little-endian u32. Reading it in place costs one allocation
//! per map instead of two per header, which is most of what the pinned path
//! would otherwise spend.

/// Envoy router headers the filter sets itself on requests the load balancer
/// places; a client's copy could make Envoy retry a pinned request elsewhere.
const ENVOY_RETRY_HEADERS: [&str; 3] = ["x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-retriable-header-names"];

/// Every header name of the app contract, and the Envoy retry headers. A
/// request header that is any spelling of one of these (case folded, `_` for
/// `-`) is the client's and never reaches an app: CGI-style servers (wsgiref,
/// PHP-FPM, Rack) read `x_session_state` as `HTTP_X_SESSION_STATE`.
#[derive(Debug, Clone)]
pub struct InternalHeaders {
    names: Vec<String>,
    /// Bit `n` set: some name is `n` bytes long (names of 64 bytes or more
    /// set none and are compared always). Most request headers are ruled
    /// out by their length alone.
    lengths: u64,
    long_names: bool,
}

impl InternalHeaders {
    /// `contract`: the app contract's header names, as configured.
    pub fn new<'a>(contract: impl IntoIterator<Item = &'a str>) -> InternalHeaders {
        let mut names: Vec<String> = contract.into_iter().map(str::to_string).collect();
        names.extend(ENVOY_RETRY_HEADERS.iter().map(|n| n.to_string()));
        let lengths = names.iter().filter(|n| n.len() < 64).fold(0, |bits, n| bits | 1 << n.len());
        let long_names = names.iter().any(|n| n.len() >= 64);
        InternalHeaders { names, lengths, long_names }
    }

    /// Whether `name` (as a client sent it) spells an internal header.
    pub fn matches(&self, name: &[u8]) -> bool {
        let possible = if name.len() < 64 { self.lengths & 1 << name.len() != 0 } else { self.long_names };
        possible && self.names.iter().any(|internal| same_header(name, internal.as_bytes()))
    }
}

/// Header names compared as a CGI gateway would: ASCII case folded, and `_`
/// taken for `-`. `canonical` is lower case with `-`.
fn same_header(name: &[u8], canonical: &[u8]) -> bool {
    name.len() == canonical.len()
        && name.iter().zip(canonical).all(|(&a, &c)| a.to_ascii_lowercase() == c || (a == b'_' && c == b'-'))
}

/// A serialised header map.
#[derive(Debug, Default, Clone)]
pub struct HeaderMap {
    bytes: Vec<u8>,
}

impl HeaderMap {
    pub fn from_serialized(bytes: Vec<u8>) -> HeaderMap {
        HeaderMap { bytes }
    }

    /// Serialises pairs the way proxy-wasm does, in one allocation of the
    /// exact size: how a host without that format (Envoy's native ABI, the
    /// fakes) hands over a map.
    pub fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone) -> HeaderMap {
        let length = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let (count, text) = pairs.clone().fold((0, 0), |(count, text), (name, value)| (count + 1, text + name.len() + value.len() + 2));
        let mut bytes = Vec::with_capacity(4 + count * 8 + text);
        bytes.extend_from_slice(&length(count));
        for (name, value) in pairs.clone() {
            bytes.extend_from_slice(&length(name.len()));
            bytes.extend_from_slice(&length(value.len()));
        }
        for (name, value) in pairs {
            bytes.extend_from_slice(name);
            bytes.push(0);
            bytes.extend_from_slice(value);
            bytes.push(0);
        }
        HeaderMap { bytes }
    }

    /// The (name, value) pairs in order. A malformed buffer ends the iteration
    /// early rather than failing.
    pub fn iter(&self) -> Pairs<'_> {
        let count = read_u32(&self.bytes, 0).unwrap_or(0);
        // Each pair needs at least 8 bytes of lengths: bounds a lying count.
        let count = count.min(self.bytes.len() / 8);
        Pairs { bytes: &self.bytes, index: 0, count, data: 4 + count * 8 }
    }
}

pub struct Pairs<'a> {
    bytes: &'a [u8],
    index: usize,
    count: usize,
    /// Where the next name starts.
    data: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let sizes = 4 + self.index * 8;
        let name_len = read_u32(self.bytes, sizes)?;
        let value_len = read_u32(self.bytes, sizes + 4)?;
        let name = self.bytes.get(self.data..self.data.checked_add(name_len)?)?;
        let value_at = self.data + name_len + 1;
        let value = self.bytes.get(value_at..value_at.checked_add(value_len)?)?;
        self.data = value_at + value_len + 1;
        self.index += 1;
        Some((name, value))
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeaderNames;

    fn internal(names: &HeaderNames) -> InternalHeaders {
        InternalHeaders::new(names.named().iter().map(|(_, name)| *name))
    }

    #[test]
    fn every_spelling_of_an_internal_header_matches() {
        let defaults = internal(&HeaderNames::default());
        for name in ["x-session-state", "X-Session-State", "x_session_state", "X_SESSION_ID", "x-session_new", "x-envoy-retry-on", "x_envoy_max_retries"] {
            assert!(defaults.matches(name.as_bytes()), "{name}");
        }
        for name in ["x-session-states", "x-session", "cookie", "x-session-stat", "xxsession-id"] {
            assert!(!defaults.matches(name.as_bytes()), "{name}");
        }
        let long = "x-".repeat(40);
        let names = HeaderNames { session_id: long.clone(), ..HeaderNames::default() };
        assert!(internal(&names).matches(long.to_uppercase().as_bytes()), "names of 64 bytes and more too");
    }

    #[test]
    fn pairs_read_back_as_serialised() {
        let pairs: [(&[u8], &[u8]); 3] = [(b":path", b"/a"), (b"cookie", b"sa=1; b=2"), (b"empty", b"")];
        let map = HeaderMap::from_pairs(pairs.iter().copied());
        assert_eq!(map.bytes.capacity(), map.bytes.len(), "sized exactly");
        assert_eq!(map.iter().collect::<Vec<_>>(), pairs);
    }

    #[test]
    fn malformed_buffers_end_early_without_panicking() {
        let whole = HeaderMap::from_pairs([(&b"name"[..], &b"value"[..])].into_iter()).bytes;
        for cut in 0..whole.len() {
            let map = HeaderMap::from_serialized(whole[..cut].to_vec());
            assert!(map.iter().count() <= 1);
        }
        let lying = HeaderMap::from_serialized(vec![0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
        assert_eq!(lying.iter().count(), 0);
        assert_eq!(HeaderMap::default().iter().count(), 0);
    }
}
