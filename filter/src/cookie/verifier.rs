//! Cookie values a worker already verified, so a session's later requests
//! skip the MAC.
//!
//! A direct-mapped table: bounded, no eviction bookkeeping, and a hit costs one
//! slot computation and one comparison. The times are still checked on every
//! hit (expiry, and an issue time too far ahead of a clock stepped back).
//! Each entry remembers the key ring that verified it, so a new configuration
//! (say, with a key removed) never trusts what the old one accepted.
//!
//! A hit needs the exact bytes of a cookie that verified, compared in
//! constant time, so it tells an attacker nothing about other cookies.

use std::cell::RefCell;

use subtle::ConstantTimeEq;

use super::{check_times, decode, Claims, Rejection};
use crate::keys::KeyRing;

/// How many verified cookies a worker remembers (a power of two).
const SLOTS: usize = 4096;

#[derive(Debug, Default)]
pub struct VerifiedCookies {
    /// (key ring fingerprint, claims) per slot.
    slots: RefCell<Vec<Option<(u64, Claims)>>>,
}

impl VerifiedCookies {
    /// Same answer as [`decode`] for the cookie's bytes, faster for a cookie
    /// seen before (a hit needs no UTF-8 check: it equals text that passed one).
    pub fn decode(&self, raw: &[u8], keys: &KeyRing, now: u64) -> Result<Claims, Rejection> {
        let slot = slot_of(raw);
        let ring = keys.fingerprint();
        let hit = self.slots.try_borrow().ok().and_then(|slots| {
            let (filled_by, claims) = slots.get(slot)?.as_ref()?;
            (*filled_by == ring && same_bytes(claims.value().as_bytes(), raw)).then(|| claims.clone())
        });
        if let Some(claims) = hit {
            return check_times(&claims, now).map(|()| claims);
        }
        let text = std::str::from_utf8(raw).map_err(|_| Rejection::Malformed)?;
        let claims = decode(text, keys, now)?;
        if let Ok(mut slots) = self.slots.try_borrow_mut() {
            if slots.is_empty() {
                slots.resize(SLOTS, None);
            }
            if let Some(entry) = slots.get_mut(slot) {
                *entry = Some((ring, claims.clone()));
            }
        }
        Ok(claims)
    }
}

/// The cache slot of a cookie value, from its last 8 bytes: in a cookie that
/// can hit, those are MAC output (uniform, and beyond a client's choosing).
fn slot_of(raw: &[u8]) -> usize {
    let tail = raw.len().checked_sub(8).and_then(|at| raw.get(at..)).and_then(|t| <[u8; 8]>::try_from(t).ok());
    let word = tail.map_or(0, u64::from_le_bytes);
    // Fibonacci hashing: the multiply spreads every input bit into the top bits.
    (word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS.trailing_zeros())) as usize
}

/// Whether two byte strings are equal, in time that depends only on their
/// lengths (which are not secret): eight bytes per constant-time step.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails = words_a.remainder().ct_eq(words_b.remainder());
    let word = |w: &[u8]| <[u8; 8]>::try_from(w).map_or(0, u64::from_le_bytes);
    let same = words_a.zip(words_b).fold(tails, |same, (x, y)| same & word(x).ct_eq(&word(y)));
    bool::from(same)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{claims, cookie, ring, sealed, NOW};
    use super::super::NewClaims;
    use super::*;

    #[test]
    fn answers_like_decode_and_still_expires() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        let value = cookie(&keys, &claims());
        for _ in 0..2 {
            assert_eq!(cache.decode(value.as_bytes(), &keys, NOW), decode(value.as_str(), &keys, NOW));
        }
        assert_eq!(cache.decode(value.as_bytes(), &keys, NOW + 3600), Err(Rejection::Expired));
        let forged = value.replacen("10.0.0.7", "10.0.0.8", 1);
        assert_eq!(cache.decode(forged.as_bytes(), &keys, NOW), Err(Rejection::BadSignature));
        assert_eq!(cache.decode(b"garbage", &keys, NOW), Err(Rejection::Malformed));
    }

    #[test]
    fn sealed_cookies_are_opened_once_then_served_from_the_cache() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        let value = sealed(&keys, &claims());
        let first = cache.decode(value.as_bytes(), &keys, NOW).unwrap();
        assert_eq!(Ok(&first), decode(value.as_str(), &keys, NOW).as_ref());
        let slot = &cache.slots.borrow()[slot_of(value.as_bytes())];
        assert_eq!(slot.as_ref().map(|(_, c)| c.value()), Some(value.as_str()));
        assert_eq!(cache.decode(value.as_bytes(), &keys, NOW), Ok(first));
        assert_eq!(cache.decode(value.as_bytes(), &keys, NOW + 3600), Err(Rejection::Expired));
        assert_eq!(cache.decode(value.as_bytes(), &ring(&["k2"]), NOW), Err(Rejection::UnknownKey));
    }

    #[test]
    fn a_clock_stepped_back_sees_a_cached_cookie_as_decode_does() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        let value = cookie(&keys, &claims());
        assert!(cache.decode(value.as_bytes(), &keys, NOW).is_ok());
        let before = NOW - 1000;
        assert_eq!(decode(value.as_str(), &keys, before), Err(Rejection::Malformed), "issued too far in the future");
        assert_eq!(cache.decode(value.as_bytes(), &keys, before), Err(Rejection::Malformed));
    }

    #[test]
    fn a_new_key_ring_does_not_trust_what_the_old_one_verified() {
        let (old, new) = (ring(&["k1"]), ring(&["k2"]));
        let cache = VerifiedCookies::default();
        let value = cookie(&old, &claims());
        assert!(cache.decode(value.as_bytes(), &old, NOW).is_ok());
        assert_eq!(cache.decode(value.as_bytes(), &new, NOW), Err(Rejection::UnknownKey));
    }

    #[test]
    fn stays_bounded() {
        let keys = ring(&["k1"]);
        let cache = VerifiedCookies::default();
        for i in 0..SLOTS + 10 {
            let sid = format!("{i:0>22}");
            let value = cookie(&keys, &NewClaims { sid: &sid, ..claims() });
            assert!(cache.decode(value.as_bytes(), &keys, NOW).is_ok());
            assert!(cache.decode(value.as_bytes(), &keys, NOW).is_ok(), "a hit right after the miss");
        }
        assert_eq!(cache.slots.borrow().len(), SLOTS);
    }

    #[test]
    fn same_bytes_compares_every_word_and_the_tail() {
        let a = b"0123456789abcdefXYZ";
        assert!(same_bytes(a, a));
        for at in 0..a.len() {
            let mut b = *a;
            b[at] ^= 1;
            assert!(!same_bytes(a, &b), "a change at byte {at} went unseen");
        }
        assert!(!same_bytes(a, &a[..18]));
        assert!(same_bytes(b"", b""));
    }

    #[test]
    fn cookies_spread_over_the_slots() {
        let keys = ring(&["k1"]);
        let mut used = std::collections::HashSet::new();
        for i in 0..512 {
            let sid = format!("{i:0>22}");
            let slot = slot_of(cookie(&keys, &NewClaims { sid: &sid, ..claims() }).as_bytes());
            assert!(slot < SLOTS);
            used.insert(slot);
        }
        // 512 uniform draws from 4096 slots leave about 482 distinct.
        assert!(used.len() > 440, "only {} distinct slots", used.len());
        assert_eq!(slot_of(b"short"), slot_of(b""));
    }
}
