//! The value types every other module speaks in: session ids, upstream
//! addresses, app instances, and the owner that names both.
//!
//! Validation lives here once. A value that passes these checks can travel in
//! a cookie, a header and a store key unquoted.

use std::fmt;
use std::net::SocketAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Length of a session id: 16 random bytes in base64url without padding.
pub const SID_LEN: usize = 22;
/// Longest upstream address accepted ("[v6]:port" fits).
pub const MAX_UPSTREAM_LEN: usize = 64;
/// Longest app instance id accepted.
pub const MAX_INSTANCE_LEN: usize = 64;

/// A session id: 22 base64url characters, unguessable when made by
/// [`SessionId::from_random`] (or by an app from 16 CSPRNG bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    pub fn from_random(bytes: &[u8; 16]) -> SessionId {
        SessionId(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A session id in text, if it has the right form.
    pub fn parse(text: &str) -> Option<SessionId> {
        is_sid(text).then(|| SessionId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn is_sid(text: &str) -> bool {
    text.len() == SID_LEN && is_base64url(text)
}

pub fn is_base64url(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An upstream host exactly as Envoy prints `upstream.address`: "ip:port".
pub fn is_upstream(text: &str) -> bool {
    text.len() <= MAX_UPSTREAM_LEN && text.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0)
}

/// An app instance id (the app's `x-instance-id`); empty when the app sends none.
pub fn is_instance(text: &str) -> bool {
    text.len() <= MAX_INSTANCE_LEN && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The app process that holds a session: an upstream address and the instance
/// running there. The store records it as "upstream#instance".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    pub upstream: &'a str,
    pub instance: &'a str,
}

impl<'a> Owner<'a> {
    /// Splits "upstream#instance" at the last '#', checking both parts.
    pub fn parse(text: &'a str) -> Option<Owner<'a>> {
        let (upstream, instance) = text.rsplit_once('#')?;
        (is_upstream(upstream) && is_instance(instance)).then_some(Owner { upstream, instance })
    }
}

impl fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.upstream, self.instance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_22_base64url_characters() {
        let sid = SessionId::from_random(&[0xff; 16]);
        assert_eq!(sid.as_str().len(), SID_LEN);
        assert_eq!(SessionId::parse(sid.as_str()), Some(sid));
        for bad in ["", "short", "AAAAAAAAAAAAAAAAAAAAA=", "AAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA/A"] {
            assert_eq!(SessionId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn upstreams_are_socket_addresses_with_a_port() {
        for good in ["10.0.0.1:80", "[fd00::7]:8080", "127.0.0.1:65535"] {
            assert!(is_upstream(good), "{good}");
        }
        for bad in ["10.0.0.1", "10.0.0.1:0", "example.com:80", "/run/app.sock", ""] {
            assert!(!is_upstream(bad), "{bad}");
        }
    }

    #[test]
    fn owners_split_at_the_last_hash_and_print_back() {
        let owner = Owner::parse("10.0.0.1:80#pod-a").unwrap();
        assert_eq!((owner.upstream, owner.instance), ("10.0.0.1:80", "pod-a"));
        assert_eq!(owner.to_string(), "10.0.0.1:80#pod-a");
        assert_eq!(Owner::parse("10.0.0.1:80#").map(|o| o.instance), Some(""));
        assert_eq!(Owner::parse("nonsense"), None);
        assert_eq!(Owner::parse("10.0.0.1:80#pod a"), None);
    }
}
