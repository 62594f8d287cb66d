//! Sessions this proxy ended without the store's word that their tombstone
//! stands: the store failed or was out when the app ended them, or the end
//! went out in the background (a request replayed as a new session).
//!
//! Every worker of the process sees the same table (shared data: every VM of
//! the wasm build, every thread of the native one), and a failover of a
//! session listed here starts a new session instead of asking the store, for
//! `store.idle_ttl` after the end: as long as a tombstone would have stood.
//!
//! The table is a fixed set of buckets (a shared-data key cannot be
//! deleted), each a short list of "sid until_ms" lines; a write drops expired
//! entries, and a full bucket drops the entry that expires first. Writers use
//! compare-and-swap with a bounded number of tries: a lost race is reported,
//! never waited on.

use crate::host::{update_shared, SharedData};

/// Buckets, by a hash of the session id.
const BUCKETS: u64 = 16;
/// Entries one bucket keeps at most (so the table holds 1,024).
const PER_BUCKET: usize = 64;
const CAS_TRIES: usize = 8;

fn key(sid: &str) -> String {
    // FNV-1a: session ids are random, so any spread will do.
    let hash = sid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("session_affinity.ended.{}", hash % BUCKETS)
}

fn entries(value: Option<&[u8]>) -> Vec<(&str, u64)> {
    let text = value.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
    text.lines()
        .filter_map(|line| {
            let (sid, until) = line.split_once(' ')?;
            Some((sid, until.parse().ok()?))
        })
        .collect()
}

/// Whether a session id can be listed (one line, one word).
fn listable(sid: &str) -> bool {
    !sid.is_empty() && sid.bytes().all(|b| b.is_ascii_graphic())
}

/// Lists `sid` as ended until `until_ms`. False when every race was lost or
/// the id cannot be listed (the caller says so in its log).
pub fn remember(shared: &dyn SharedData, sid: &str, until_ms: u64, now_ms: u64) -> bool {
    if !listable(sid) {
        return false;
    }
    update_shared(shared, &key(sid), CAS_TRIES, |value| {
        let mut kept: Vec<(&str, u64)> = entries(value).into_iter().filter(|&(s, until)| until > now_ms && s != sid).collect();
        while kept.len() >= PER_BUCKET {
            let Some(first) = kept.iter().enumerate().min_by_key(|(_, (_, until))| *until).map(|(i, _)| i) else { break };
            kept.swap_remove(first);
        }
        kept.push((sid, until_ms));
        Some(kept.iter().map(|(s, until)| format!("{s} {until}\n")).collect::<String>().into_bytes())
    })
}

/// Whether `sid` is listed as ended at `now_ms`.
pub fn has_ended(shared: &dyn SharedData, sid: &str, now_ms: u64) -> bool {
    let (value, _) = shared.get(&key(sid));
    entries(value.as_deref()).iter().any(|&(s, until)| s == sid && until > now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeShared;

    #[test]
    fn an_ended_session_is_seen_by_every_reader_until_it_expires() {
        let shared = FakeShared::default();
        assert!(remember(&shared, "sidA", 1_000, 0));
        assert!(has_ended(&shared, "sidA", 999));
        assert!(!has_ended(&shared, "sidA", 1_000), "expired");
        assert!(!has_ended(&shared, "sidB", 0));
        assert!(remember(&shared, "sidA", 5_000, 10), "remembered again: the later end counts");
        assert!(has_ended(&shared, "sidA", 4_000));
    }

    #[test]
    fn a_full_bucket_drops_the_entry_that_expires_first() {
        let shared = FakeShared::default();
        // Ids that share one bucket.
        let ids: Vec<String> = (0..10_000).map(|i| format!("s{i}")).filter(|s| key(s) == key("s0")).take(PER_BUCKET + 1).collect();
        for (i, sid) in ids.iter().enumerate() {
            assert!(remember(&shared, sid, 10_000 + i as u64, 0));
        }
        assert!(!has_ended(&shared, &ids[0], 1), "the soonest to expire went");
        assert!(ids[1..].iter().all(|sid| has_ended(&shared, sid, 1)));
    }

    #[test]
    fn garbage_and_unlistable_ids_are_harmless() {
        let shared = FakeShared::default();
        assert!(!remember(&shared, "two words", 1_000, 0));
        assert!(!remember(&shared, "", 1_000, 0));
        shared.set(&key("sidA"), b"\xff\xfe nonsense\nsidA notanumber\n", None);
        assert!(!has_ended(&shared, "sidA", 0));
        assert!(remember(&shared, "sidA", 1_000, 0));
        assert!(has_ended(&shared, "sidA", 0));
    }
}
