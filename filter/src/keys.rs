//! The key ring: the first key signs and seals, every key verifies and opens,
//! so a key can be rotated without breaking live sessions.
//!
//! Each key's HMAC state is keyed once at configure time and cloned per use,
//! which skips re-hashing the padded key on every request. Its sealing key
//! (ChaCha20-Poly1305) is derived from the same secret, under a label no
//! signed message can start with.

use std::fmt;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
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
/// Length of a sealing nonce in bytes (ChaCha20-Poly1305).
pub const NONCE_LEN: usize = 12;
/// Length of a sealing tag in bytes (Poly1305).
pub const SEAL_TAG_LEN: usize = 16;

/// What the sealing key is derived from (HMAC of this under the secret).
const SEAL_KEY_LABEL: &[u8] = b"session-affinity cookie sealing key";
/// What a sealing nonce is derived from, before the fresh bytes and the plaintext.
const NONCE_LABEL: &[u8] = b"session-affinity cookie nonce|";

struct Key {
    id: String,
    mac: HmacSha256,
    aead: ChaCha20Poly1305,
}

impl Key {
    fn new(id: String, secret: &Secret) -> Option<Key> {
        let mac = <HmacSha256 as Mac>::new_from_slice(&secret.0).ok()?;
        let mut derive = mac.clone();
        derive.update(SEAL_KEY_LABEL);
        let aead = ChaCha20Poly1305::new(&derive.finalize().into_bytes());
        Some(Key { id, mac, aead })
    }
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
        let keys: Vec<Key> = keys.into_iter().filter_map(|(id, secret)| Key::new(id, &secret)).collect();
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
        let Some(key) = self.find(kid) else {
            return false;
        };
        let mut mac = key.mac.clone();
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }

    /// Encrypts `buffer` in place with the signing key, authenticating `aad`
    /// too; returns the nonce and the tag. The nonce is an HMAC of `fresh`
    /// (random bytes, new for each call) and the plaintext: unique as long as
    /// either is, so even a repeated random draw never reuses a nonce for
    /// another plaintext.
    pub fn seal(&self, aad: &[u8], fresh: &[u8], buffer: &mut [u8]) -> Option<([u8; NONCE_LEN], [u8; SEAL_TAG_LEN])> {
        let key = self.keys.first()?;
        let mut mac = key.mac.clone();
        mac.update(NONCE_LABEL);
        mac.update(fresh);
        mac.update(buffer);
        let nonce: [u8; NONCE_LEN] = *mac.finalize().into_bytes().first_chunk()?;
        let tag = key.aead.encrypt_in_place_detached(&Nonce::from(nonce), aad, buffer).ok()?;
        Some((nonce, tag.into()))
    }

    /// Decrypts `buffer` in place with key `kid`; false (and `buffer` not to
    /// be used) unless `tag` authenticates it and `aad`. Poly1305 compares in
    /// constant time.
    pub fn open(&self, kid: &str, aad: &[u8], nonce: &[u8; NONCE_LEN], buffer: &mut [u8], tag: &[u8; SEAL_TAG_LEN]) -> bool {
        let Some(key) = self.find(kid) else {
            return false;
        };
        key.aead.decrypt_in_place_detached(&Nonce::from(*nonce), aad, buffer, &Tag::from(*tag)).is_ok()
    }

    fn find(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == kid)
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
    fn first_key_seals_and_every_key_opens() {
        let (old, new) = (ring(&["k1"]), ring(&["k2", "k1"]));
        let mut buffer = *b"plain text";
        let (nonce, tag) = old.seal(b"aad", &[7; 16], &mut buffer).unwrap();
        assert_ne!(&buffer, b"plain text");
        let sealed = buffer;
        assert!(new.open("k1", b"aad", &nonce, &mut buffer, &tag));
        assert_eq!(&buffer, b"plain text");
        for (kid, aad) in [("k2", &b"aad"[..]), ("k1", b"aaX"), ("nope", b"aad")] {
            let mut copy = sealed;
            assert!(!new.open(kid, aad, &nonce, &mut copy, &tag), "{kid} {aad:?}");
        }
        let mut flipped = sealed;
        flipped[0] ^= 1;
        assert!(!new.open("k1", b"aad", &nonce, &mut flipped, &tag));
    }

    #[test]
    fn nonces_differ_by_fresh_bytes_or_by_plaintext() {
        let r = ring(&["k1"]);
        let nonce = |fresh: u8, text: &[u8]| r.seal(b"", &[fresh; 16], &mut text.to_vec()).unwrap().0;
        assert_ne!(nonce(1, b"same"), nonce(2, b"same"));
        assert_ne!(nonce(1, b"same"), nonce(1, b"other"), "a repeated draw still gives another nonce");
        assert_eq!(nonce(1, b"same"), nonce(1, b"same"));
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
