//! The proxy-wide view of upstream hosts and app instances that are gone.
//!
//! One shared-data entry holds the whole (small) table, so every worker VM
//! sees what any worker learned. Writers use a compare-and-swap loop with a
//! bounded number of tries and fail open: losing a mark only means the next
//! request finds the host gone itself. Each worker keeps a local copy that its
//! tick refreshes, so the pinned path reads no shared data.
//!
//! Entries expire, so a host that comes back is used again.

/// The shared-data key holding the table.
pub const SHARED_KEY: &str = "session_affinity.gone";
/// At most this many entries are kept; the oldest go first.
const MAX_ENTRIES: usize = 1024;
/// Tries of the compare-and-swap loop before giving up (fail open).
const CAS_TRIES: usize = 8;

/// What was seen about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// Nothing answers at the address (Envoy's 503 UH or UF).
    Down,
    /// The address now runs this app instance; sessions of any other instance there are gone.
    Replaced { instance: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    host: String,
    until_ms: u64,
    sighting: Sighting,
}

/// Shared data as the table needs it.
pub trait SharedData {
    /// The value and its CAS token.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Stores `value` if the entry still has CAS token `cas`; false on a mismatch or error.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

#[derive(Debug, Default)]
pub struct GoneTable {
    entries: Vec<Entry>,
    /// CAS token of the shared entry this copy was read from.
    seen_cas: Option<u32>,
}

impl GoneTable {
    /// Whether a session pinned to `instance` at `host` must fail over.
    pub fn is_gone(&self, host: &str, instance: &str, now_ms: u64) -> bool {
        self.entries.iter().any(|e| {
            e.host == host
                && e.until_ms > now_ms
                && match &e.sighting {
                    Sighting::Down => true,
                    Sighting::Replaced { instance: current } => !instance.is_empty() && current != instance,
                }
        })
    }

    /// Re-reads the shared table if it changed since the last read.
    pub fn refresh(&mut self, shared: &dyn SharedData) {
        let (value, cas) = shared.get(SHARED_KEY);
        if cas.is_some() && cas == self.seen_cas {
            return;
        }
        self.entries = value.map(|v| parse(&v)).unwrap_or_default();
        self.seen_cas = cas;
    }

    /// Records a sighting in the shared table and in this copy. Returns false
    /// when the shared write lost every CAS race (the local copy still learns it).
    pub fn mark(&mut self, shared: &dyn SharedData, host: &str, sighting: Sighting, now_ms: u64, ttl_ms: u64) -> bool {
        if matches!(&sighting, Sighting::Replaced { instance } if instance.is_empty()) {
            return false; // no instance id: nothing to tell instances apart by
        }
        let entry = Entry { host: host.to_string(), until_ms: now_ms.saturating_add(ttl_ms), sighting };
        for _ in 0..CAS_TRIES {
            let (value, cas) = shared.get(SHARED_KEY);
            let mut entries = value.map(|v| parse(&v)).unwrap_or_default();
            upsert(&mut entries, entry.clone(), now_ms);
            if shared.set(SHARED_KEY, &serialize(&entries), cas) {
                self.entries = entries;
                // The next refresh re-reads once; the token after our write is unknown.
                self.seen_cas = None;
                return true;
            }
        }
        upsert(&mut self.entries, entry, now_ms);
        false
    }
}

fn upsert(entries: &mut Vec<Entry>, entry: Entry, now_ms: u64) {
    entries.retain(|e| e.until_ms > now_ms && e.host != entry.host);
    while entries.len() >= MAX_ENTRIES {
        let Some(oldest) = entries.iter().enumerate().min_by_key(|(_, e)| e.until_ms).map(|(i, _)| i) else { break };
        entries.swap_remove(oldest);
    }
    entries.push(entry);
}

/// One line per entry: `host until_ms` for down, `host until_ms instance` for replaced.
fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut out = String::with_capacity(entries.len() * 48);
    for e in entries {
        out.push_str(&format!("{} {}", e.host, e.until_ms));
        if let Sighting::Replaced { instance } = &e.sighting {
            out.push(' ');
            out.push_str(instance);
        }
        out.push('\n');
    }
    out.into_bytes()
}

/// Lenient: a line that does not parse is dropped, never fatal.
fn parse(bytes: &[u8]) -> Vec<Entry> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let host = parts.next().filter(|h| crate::cookie::is_host(h))?;
            let until_ms = parts.next()?.parse().ok()?;
            let sighting = match parts.next() {
                None => Sighting::Down,
                Some(i) if !i.is_empty() && crate::cookie::is_instance(i) => Sighting::Replaced { instance: i.to_string() },
                Some(_) => return None,
            };
            parts.next().is_none().then(|| Entry { host: host.to_string(), until_ms, sighting })
        })
        .take(MAX_ENTRIES)
        .collect()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Shared data with real CAS semantics, plus a switch to make writes lose races.
    #[derive(Default)]
    pub struct FakeShared {
        pub data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub lose_races: std::cell::Cell<bool>,
    }

    impl SharedData for FakeShared {
        fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            match self.data.borrow().get(key) {
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
                None => (None, None),
            }
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            let mut data = self.data.borrow_mut();
            let current = data.get(key).map(|(_, c)| *c);
            if self.lose_races.get() || (cas.is_some() && cas != current) {
                return false;
            }
            let next = current.unwrap_or(0) + 1;
            data.insert(key.to_string(), (value.to_vec(), next));
            true
        }
    }

    #[test]
    fn down_hosts_are_gone_until_the_entry_expires() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        assert!(t.mark(&shared, "10.0.0.1:80", Sighting::Down, 1000, 500));
        assert!(t.is_gone("10.0.0.1:80", "any", 1499));
        assert!(!t.is_gone("10.0.0.1:80", "any", 1500));
        assert!(!t.is_gone("10.0.0.2:80", "any", 1000));
    }

    #[test]
    fn replaced_instances_are_gone_but_the_new_one_is_not() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        t.mark(&shared, "10.0.0.1:80", Sighting::Replaced { instance: "b".into() }, 0, 1000);
        assert!(t.is_gone("10.0.0.1:80", "a", 10));
        assert!(!t.is_gone("10.0.0.1:80", "b", 10));
        assert!(!t.is_gone("10.0.0.1:80", "", 10), "no instance id: only address failures count");
    }

    #[test]
    fn other_workers_see_marks_after_refresh() {
        let shared = FakeShared::default();
        let mut writer = GoneTable::default();
        let mut reader = GoneTable::default();
        reader.refresh(&shared);
        writer.mark(&shared, "10.0.0.1:80", Sighting::Down, 0, 1000);
        writer.mark(&shared, "10.0.0.2:80", Sighting::Down, 0, 1000);
        assert!(!reader.is_gone("10.0.0.1:80", "", 1));
        reader.refresh(&shared);
        assert!(reader.is_gone("10.0.0.1:80", "", 1) && reader.is_gone("10.0.0.2:80", "", 1));
    }

    #[test]
    fn lost_races_fail_open_but_keep_the_local_mark() {
        let shared = FakeShared::default();
        shared.lose_races.set(true);
        let mut t = GoneTable::default();
        assert!(!t.mark(&shared, "10.0.0.1:80", Sighting::Down, 0, 1000));
        assert!(t.is_gone("10.0.0.1:80", "", 1));
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_oldest() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        for i in 0..(MAX_ENTRIES + 10) {
            let host = format!("10.0.{}.{}:80", i / 250, i % 250);
            t.mark(&shared, &host, Sighting::Down, 0, 1000 + i as u64);
        }
        assert_eq!(t.entries.len(), MAX_ENTRIES);
        assert!(!t.is_gone("10.0.0.0:80", "", 1));
        assert!(t.is_gone("10.0.4.33:80", "", 1));
    }

    #[test]
    fn every_sighting_reads_back_as_written() {
        for sighting in [Sighting::Down, Sighting::Replaced { instance: "-".into() }, Sighting::Replaced { instance: "pod-a".into() }] {
            let entries = vec![Entry { host: "10.0.0.1:80".into(), until_ms: 5, sighting }];
            assert_eq!(parse(&serialize(&entries)), entries);
        }
    }

    #[test]
    fn garbage_in_shared_data_is_ignored() {
        assert!(parse(b"\xff\xfe").is_empty());
        assert!(parse(b"not a line\n10.0.0.1:80 x\n10.0.0.1:80 5 a b\n10.0.0.1:80 5 \n").is_empty());
        assert_eq!(parse(b"10.0.0.1:80 5\n10.0.0.2:80 5 -\n").len(), 2);
    }
}
