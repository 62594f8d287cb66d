//! The key ring: the first key signs, every key verifies, so a key can be
//! rotated without breaking live sessions.
//!
//! Each key's HMAC state is keyed once at configure time and cloned per use,
//! which skips re-hashing the padded key on every request.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A secret. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Length of an HMAC-SHA256 tag in bytes.
pub const TAG_LEN: usize = 32;

struct Key {
    id: String,
    mac: HmacSha256,
}

pub struct KeyRing {
    keys: Vec<Key>,
    /// Tells rings apart (a MAC of a fixed text under every key, folded):
    /// caches of verified cookies are only valid for the ring that filled them.
    fingerprint: u64,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_list().entries(self.keys.iter().map(|k| &k.id)).finish()
    }
}

impl KeyRing {
    /// Builds the ring from (id, secret) pairs, the signing key first.
    /// Keys whose secret the MAC refuses are skipped; HMAC accepts any length,
    /// so that does not happen in practice.
    pub fn new(keys: Vec<(String, Secret)>) -> KeyRing {
        let keys: Vec<Key> = keys
            .into_iter()
            .filter_map(|(id, secret)| HmacSha256::new_from_slice(&secret.0).ok().map(|mac| Key { id, mac }))
            .collect();
        let fingerprint = keys.iter().fold(0u64, |folded, key| {
            let mut mac = key.mac.clone();
            mac.update(b"session-affinity key ring fingerprint|");
            mac.update(key.id.as_bytes());
            let tag: [u8; TAG_LEN] = mac.finalize().into_bytes().into();
            let word = tag.first_chunk::<8>().map_or(0, |w| u64::from_le_bytes(*w));
            folded.rotate_left(7) ^ word
        });
        KeyRing { keys, fingerprint }
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The id of the key that signs new cookies.
    pub fn signing_id(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    /// Signs `message` with the signing key.
    pub fn sign(&self, message: &[u8]) -> Option<[u8; TAG_LEN]> {
        let key = self.keys.first()?;
        let mut mac = key.mac.clone();
        mac.update(message);
        Some(mac.finalize().into_bytes().into())
    }

    /// Whether `kid` names a key in the ring.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.id == kid)
    }

    /// Checks `tag` over `message` with key `kid`, in constant time.
    pub fn verify(&self, kid: &str, message: &[u8], tag: &[u8]) -> bool {
        let Some(key) = self.keys.iter().find(|k| k.id == kid) else {
            return false;
        };
        let mut mac = key.mac.clone();
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(ids.iter().map(|id| (id.to_string(), Secret(format!("secret-of-{id}-0123456789abcdef0123").into_bytes()))).collect())
    }

    #[test]
    fn first_key_signs_and_every_key_verifies() {
        let new = ring(&["k2", "k1"]);
        let old = ring(&["k1"]);
        let tag = old.sign(b"payload").unwrap();
        assert!(new.verify("k1", b"payload", &tag));
        assert_eq!(new.signing_id(), Some("k2"));
        let tag2 = new.sign(b"payload").unwrap();
        assert!(new.verify("k2", b"payload", &tag2));
        assert!(!old.verify("k2", b"payload", &tag2));
    }

    #[test]
    fn wrong_message_tag_or_key_fails() {
        let r = ring(&["k1"]);
        let tag = r.sign(b"payload").unwrap();
        assert!(!r.verify("k1", b"payloaX", &tag));
        assert!(!r.verify("k1", b"payload", &tag[..31]));
        assert!(!r.verify("nope", b"payload", &tag));
        assert!(!r.knows("nope"));
    }

    #[test]
    fn fingerprints_tell_rings_apart() {
        assert_eq!(ring(&["k1"]).fingerprint(), ring(&["k1"]).fingerprint());
        assert_ne!(ring(&["k1"]).fingerprint(), ring(&["k2"]).fingerprint());
        assert_ne!(ring(&["k1", "k2"]).fingerprint(), ring(&["k2", "k1"]).fingerprint());
        let other = KeyRing::new(vec![("k1".into(), Secret(b"another-secret-0123456789abcdef0123".to_vec()))]);
        assert_ne!(ring(&["k1"]).fingerprint(), other.fingerprint());
    }

    #[test]
    fn debug_never_shows_secrets() {
        assert_eq!(format!("{:?}", ring(&["k1"])), "[\"k1\"]");
    }
}
