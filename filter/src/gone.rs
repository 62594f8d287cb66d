//! The proxy-wide view of upstream hosts and app instances that are gone.
//!
//! One shared-data entry holds the whole (small) table, so every worker VM
//! sees what any worker learned. Writers use a compare-and-swap loop with a
//! bounded number of tries and fail open: losing a mark only means the next
//! request finds the host gone itself. Each worker keeps a local copy that its
//! tick refreshes, so the pinned path reads no shared data.
//!
//! A mark is forgotten as soon as the host answers again (evidence newer than
//! the mark), or when it expires. A host that came back as a new instance is
//! recorded as running that instance: its old instance's sessions are still
//! gone, its new sessions are not. A host seen down is recorded with the
//! instance that died there, so an owner another proxy found at that address
//! since (a new instance) is joined, not moved again. Marks of one host are
//! written at most once per [`MARK_INTERVAL_MS`], whatever drives them.

use std::collections::HashSet;

use crate::host::{update_shared, SharedData};
use crate::ids::{is_instance, is_upstream};

/// The shared-data key holding the table.
pub const SHARED_KEY: &str = "session_affinity.gone";
/// At most this many entries are kept; the oldest go first.
const MAX_ENTRIES: usize = 1024;
/// Tries of the compare-and-swap loop before giving up (fail open).
const CAS_TRIES: usize = 8;
/// The same sighting of a host is written to shared data at most this often.
pub const MARK_INTERVAL_MS: u64 = 1000;

/// What was seen about one upstream address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// Nothing answers at the address (Envoy's 503 UH or UF) where `instance`
    /// ran: its sessions are gone, and every session when it is empty. A new
    /// instance another proxy saw answer there since is not gone.
    Down { instance: String },
    /// The address runs this app instance; sessions of any other instance there are gone.
    Runs { instance: String },
}

impl Sighting {
    /// Nothing answers where `instance` ran ("": whichever instance it was).
    pub fn down(instance: &str) -> Self {
        Sighting::Down { instance: instance.to_string() }
    }

    /// Whether a session pinned to `instance` must fail over.
    pub fn strands(&self, instance: &str) -> bool {
        match self {
            Sighting::Down { instance: down } => down.is_empty() || instance.is_empty() || down == instance,
            Sighting::Runs { instance: current } => !instance.is_empty() && current != instance,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    upstream: String,
    until_ms: u64,
    /// When the sighting was made: only later evidence overrules it.
    marked_ms: u64,
    sighting: Sighting,
}

/// What a call changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Written to shared data.
    Written,
    /// Nothing to do (already known, or too soon to write again).
    Unchanged,
    /// Every CAS race was lost; only this worker's copy has it.
    LocalOnly,
}

#[derive(Debug, Default)]
pub struct GoneTable {
    entries: Vec<Entry>,
    /// CAS token of the shared entry this copy was read from.
    seen_cas: Option<u32>,
}

impl GoneTable {
    /// Whether a session pinned to `instance` at `upstream` must fail over.
    pub fn is_gone(&self, upstream: &str, instance: &str, now_ms: u64) -> bool {
        self.entries.iter().any(|e| e.upstream == upstream && e.until_ms > now_ms && e.sighting.strands(instance))
    }

    /// Whether this copy has any entry for `upstream` (so `alive` may have work).
    pub fn mentions(&self, upstream: &str) -> bool {
        self.entries.iter().any(|e| e.upstream == upstream)
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

    /// Records a sighting, unless the same one was recorded less than
    /// [`MARK_INTERVAL_MS`] ago.
    pub fn mark(&mut self, shared: &dyn SharedData, upstream: &str, sighting: Sighting, now_ms: u64, ttl_ms: u64) -> Change {
        if matches!(&sighting, Sighting::Runs { instance } if instance.is_empty()) {
            return Change::Unchanged; // no instance id: nothing to tell instances apart by
        }
        let fresh = |e: &Entry| e.upstream == upstream && e.sighting == sighting && now_ms < e.marked_ms.saturating_add(MARK_INTERVAL_MS);
        if self.entries.iter().any(fresh) {
            return Change::Unchanged;
        }
        let entry = Entry { upstream: upstream.to_string(), until_ms: now_ms.saturating_add(ttl_ms), marked_ms: now_ms, sighting };
        self.update(shared, now_ms, |entries| {
            // Two instances seen down at one address, by any worker: the address is down.
            let widened = match (&entry.sighting, entries.iter().find(|e| e.upstream == upstream && e.until_ms > now_ms)) {
                (Sighting::Down { instance }, Some(Entry { sighting: Sighting::Down { instance: known }, .. })) if known != instance => {
                    Some(Entry { sighting: Sighting::down(""), ..entry.clone() })
                }
                _ => None,
            };
            upsert(entries, widened.unwrap_or_else(|| entry.clone()), now_ms);
            true
        })
    }

    /// Evidence that `upstream` runs `instance` (it answered a request sent at
    /// `sent_ms`): forgets a mark made before that, keeping the new instance's
    /// sessions pinned. Costs nothing when the host is not marked.
    pub fn alive(&mut self, shared: &dyn SharedData, upstream: &str, instance: &str, sent_ms: u64, now_ms: u64, ttl_ms: u64) -> Change {
        let overruled = |e: &Entry| {
            e.upstream == upstream
                && e.until_ms > now_ms
                && e.marked_ms < sent_ms
                // Any answer overrules a down mark; a runs mark only when another instance answered.
                && (matches!(e.sighting, Sighting::Down { .. }) || e.sighting.strands(instance))
        };
        if !self.entries.iter().any(overruled) {
            return Change::Unchanged;
        }
        let runs = (!instance.is_empty()).then(|| Entry {
            upstream: upstream.to_string(),
            until_ms: now_ms.saturating_add(ttl_ms),
            marked_ms: sent_ms,
            sighting: Sighting::Runs { instance: instance.to_string() },
        });
        self.update(shared, now_ms, |entries| {
            if !entries.iter().any(overruled) {
                return false; // another worker got there first
            }
            entries.retain(|e| e.upstream != upstream);
            if let Some(runs) = &runs {
                upsert(entries, runs.clone(), now_ms);
            }
            true
        })
    }

    /// Applies `change` to the shared table (CAS loop) and to this copy.
    fn update(&mut self, shared: &dyn SharedData, now_ms: u64, change: impl Fn(&mut Vec<Entry>) -> bool) -> Change {
        for _ in 0..CAS_TRIES {
            let (value, cas) = shared.get(SHARED_KEY);
            let mut entries = value.map(|v| parse(&v)).unwrap_or_default();
            entries.retain(|e| e.until_ms > now_ms);
            if !change(&mut entries) {
                self.entries = entries;
                self.seen_cas = cas;
                return Change::Unchanged;
            }
            if shared.set(SHARED_KEY, &serialize(&entries), cas) {
                self.entries = entries;
                // The next refresh re-reads once; the token after our write is unknown.
                self.seen_cas = None;
                return Change::Written;
            }
        }
        change(&mut self.entries);
        Change::LocalOnly
    }
}

/// Upstream addresses this proxy has seen answer. Envoy answers 503 UH for a
/// pinned host that is unhealthy or not in its endpoint view; a host no
/// worker of this proxy ever saw may only be newer than this proxy's view
/// (another replica learned of it first, envoyproxy/envoy#42686), which is no
/// proof that it is gone. Each worker keeps a copy; the first sighting of a
/// host goes to shared data too, and the rare UH path reads it there.
/// Bounded: a full copy starts over, a full shared list drops its older
/// half; either only makes hosts unseen.
#[derive(Debug, Default)]
pub struct SeenHosts(HashSet<String>);

/// The shared-data key listing the upstreams seen, one per line.
pub const SEEN_KEY: &str = "session_affinity.seen";
/// Upstreams remembered per worker, and in shared data.
const MAX_SEEN: usize = 4096;

impl SeenHosts {
    /// `upstream` answered. Costs a set lookup when it is already known.
    pub fn saw(&mut self, shared: &dyn SharedData, upstream: &str) {
        if self.0.contains(upstream) {
            return;
        }
        if self.0.len() >= MAX_SEEN {
            self.0.clear();
        }
        self.0.insert(upstream.to_string());
        // A lost race only leaves the host unseen by the other workers.
        update_shared(shared, SEEN_KEY, CAS_TRIES, |value| {
            let mut lines: Vec<&str> = value.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("").lines().collect();
            if lines.contains(&upstream) {
                return None;
            }
            if lines.len() >= MAX_SEEN {
                lines.drain(..MAX_SEEN / 2);
            }
            lines.push(upstream);
            Some(lines.join("\n").into_bytes())
        });
    }

    /// Whether any worker of this proxy saw `upstream` answer.
    pub fn has_seen(&self, shared: &dyn SharedData, upstream: &str) -> bool {
        self.0.contains(upstream)
            || shared.get(SEEN_KEY).0.is_some_and(|v| v.split(|b| *b == b'\n').any(|line| line == upstream.as_bytes()))
    }
}

fn upsert(entries: &mut Vec<Entry>, entry: Entry, now_ms: u64) {
    entries.retain(|e| e.until_ms > now_ms && e.upstream != entry.upstream);
    while entries.len() >= MAX_ENTRIES {
        let Some(oldest) = entries.iter().enumerate().min_by_key(|(_, e)| e.until_ms).map(|(i, _)| i) else { break };
        entries.swap_remove(oldest);
    }
    entries.push(entry);
}

/// One line per entry: `upstream until_ms marked_ms`, then ` instance` for
/// runs or ` !instance` for down (nothing for down at every instance).
fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut out = String::with_capacity(entries.len() * 56);
    for e in entries {
        out.push_str(&format!("{} {} {}", e.upstream, e.until_ms, e.marked_ms));
        match &e.sighting {
            Sighting::Runs { instance } => out.push_str(&format!(" {instance}")),
            Sighting::Down { instance } if !instance.is_empty() => out.push_str(&format!(" !{instance}")),
            Sighting::Down { .. } => {}
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
            let upstream = parts.next().filter(|u| is_upstream(u))?;
            let until_ms = parts.next()?.parse().ok()?;
            let marked_ms = parts.next()?.parse().ok()?;
            let sighting = match parts.next() {
                None => Sighting::down(""),
                Some(i) => match i.strip_prefix('!') {
                    Some(d) if !d.is_empty() && is_instance(d) => Sighting::Down { instance: d.to_string() },
                    None if !i.is_empty() && is_instance(i) => Sighting::Runs { instance: i.to_string() },
                    _ => return None,
                },
            };
            parts.next().is_none().then(|| Entry { upstream: upstream.to_string(), until_ms, marked_ms, sighting })
        })
        .take(MAX_ENTRIES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeShared;

    const H: &str = "10.0.0.1:80";

    #[test]
    fn down_hosts_are_gone_until_the_entry_expires() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        assert_eq!(t.mark(&shared, H, Sighting::down(""), 1000, 500), Change::Written);
        assert!(t.is_gone(H, "any", 1499));
        assert!(!t.is_gone(H, "any", 1500));
        assert!(!t.is_gone("10.0.0.2:80", "any", 1000));
    }

    #[test]
    fn replaced_instances_are_gone_but_the_new_one_is_not() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        t.mark(&shared, H, Sighting::Runs { instance: "b".into() }, 0, 1000);
        assert!(t.is_gone(H, "a", 10));
        assert!(!t.is_gone(H, "b", 10));
        assert!(!t.is_gone(H, "", 10), "no instance id: only address failures count");
    }

    #[test]
    fn other_workers_see_marks_after_refresh() {
        let shared = FakeShared::default();
        let mut writer = GoneTable::default();
        let mut reader = GoneTable::default();
        reader.refresh(&shared);
        writer.mark(&shared, H, Sighting::down(""), 0, 1000);
        writer.mark(&shared, "10.0.0.2:80", Sighting::down(""), 0, 1000);
        assert!(!reader.is_gone(H, "", 1));
        reader.refresh(&shared);
        assert!(reader.is_gone(H, "", 1) && reader.is_gone("10.0.0.2:80", "", 1));
    }

    #[test]
    fn the_same_mark_is_written_at_most_once_a_second() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        assert_eq!(t.mark(&shared, H, Sighting::down(""), 0, 30_000), Change::Written);
        for at in [1, 500, 999] {
            assert_eq!(t.mark(&shared, H, Sighting::down(""), at, 30_000), Change::Unchanged, "{at}");
        }
        assert_eq!(shared.writes(), 1);
        assert_eq!(t.mark(&shared, H, Sighting::down(""), 1000, 30_000), Change::Written);
        assert_eq!(t.mark(&shared, H, Sighting::Runs { instance: "b".into() }, 1001, 30_000), Change::Written, "a new sighting is news");
    }

    #[test]
    fn a_host_that_answers_again_is_forgotten_and_its_new_instance_stays_pinned() {
        let shared = FakeShared::default();
        let (mut a, mut b) = (GoneTable::default(), GoneTable::default());
        a.mark(&shared, H, Sighting::down(""), 1000, 30_000);
        assert_eq!(a.alive(&shared, H, "new", 900, 2000, 30_000), Change::Unchanged, "an answer sent before the mark proves nothing");
        assert!(a.is_gone(H, "new", 2000));
        assert_eq!(a.alive(&shared, H, "new", 1500, 2000, 30_000), Change::Written);
        assert!(!a.is_gone(H, "new", 2001));
        assert!(a.is_gone(H, "old", 2001), "the old instance's sessions still fail over");
        b.refresh(&shared);
        assert!(!b.is_gone(H, "new", 2001) && b.is_gone(H, "old", 2001));
        assert_eq!(b.alive(&shared, H, "new", 2500, 3000, 30_000), Change::Unchanged, "already known");
    }

    #[test]
    fn an_app_without_instance_ids_is_simply_forgotten_when_it_answers() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        t.mark(&shared, H, Sighting::down(""), 1000, 30_000);
        assert_eq!(t.alive(&shared, H, "", 1500, 2000, 30_000), Change::Written);
        assert!(!t.is_gone(H, "", 2001) && !t.is_gone(H, "x", 2001));
    }

    #[test]
    fn lost_races_fail_open_but_keep_the_local_mark() {
        let shared = FakeShared::default();
        shared.lose_races.set(true);
        let mut t = GoneTable::default();
        assert_eq!(t.mark(&shared, H, Sighting::down(""), 0, 1000), Change::LocalOnly);
        assert!(t.is_gone(H, "", 1));
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_oldest() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        for i in 0..(MAX_ENTRIES + 10) {
            let host = format!("10.0.{}.{}:80", i / 250, i % 250);
            t.mark(&shared, &host, Sighting::down(""), 0, 1000 + i as u64);
        }
        assert_eq!(t.entries.len(), MAX_ENTRIES);
        assert!(!t.is_gone("10.0.0.0:80", "", 1));
        assert!(t.is_gone("10.0.4.33:80", "", 1));
    }

    #[test]
    fn every_sighting_reads_back_as_written() {
        let sightings = [
            Sighting::down(""),
            Sighting::down("pod-a"),
            Sighting::Runs { instance: "-".into() },
            Sighting::Runs { instance: "pod-a".into() },
        ];
        for sighting in sightings {
            let entries = vec![Entry { upstream: H.into(), until_ms: 5, marked_ms: 3, sighting }];
            assert_eq!(parse(&serialize(&entries)), entries);
        }
    }

    #[test]
    fn an_instance_seen_down_strands_its_sessions_not_a_newer_instance_at_the_address() {
        let shared = FakeShared::default();
        let mut t = GoneTable::default();
        t.mark(&shared, H, Sighting::down("pod-a"), 1000, 30_000);
        assert!(t.is_gone(H, "pod-a", 1001));
        assert!(t.is_gone(H, "", 1001), "a session of an unknown instance cannot tell");
        assert!(!t.is_gone(H, "pod-b", 1001), "another proxy saw pod-b answer there");
        t.mark(&shared, H, Sighting::down("pod-b"), 1002, 30_000);
        assert!(t.is_gone(H, "pod-c", 1003), "two instances down at one address: the address is down");
    }

    #[test]
    fn two_workers_seeing_two_instances_down_at_one_address_mark_the_address() {
        let shared = FakeShared::default();
        let (mut a, mut b, mut reader) = (GoneTable::default(), GoneTable::default(), GoneTable::default());
        a.mark(&shared, H, Sighting::down("pod-a"), 1000, 30_000);
        b.mark(&shared, H, Sighting::down("pod-b"), 1001, 30_000);
        reader.refresh(&shared);
        assert!(reader.is_gone(H, "pod-c", 1002));
    }

    #[test]
    fn a_host_one_worker_saw_is_seen_by_every_worker() {
        let shared = FakeShared::default();
        let (mut a, b) = (SeenHosts::default(), SeenHosts::default());
        assert!(!b.has_seen(&shared, H));
        a.saw(&shared, H);
        a.saw(&shared, H);
        assert_eq!(shared.writes(), 1, "a host already seen costs no write");
        assert!(a.has_seen(&shared, H) && b.has_seen(&shared, H));
        assert!(!b.has_seen(&shared, "10.0.0.2:80") && !b.has_seen(&shared, "10.0.0.1:8"));
    }

    #[test]
    fn seen_hosts_are_bounded() {
        let shared = FakeShared::default();
        let mut seen = SeenHosts::default();
        for i in 0..=MAX_SEEN {
            seen.saw(&shared, &format!("10.1.{}.{}:80", i / 250, i % 250));
        }
        assert!(seen.0.len() <= MAX_SEEN);
        let listed = shared.get(SEEN_KEY).0.unwrap_or_default();
        assert!(listed.split(|b| *b == b'\n').count() <= MAX_SEEN);
        assert!(seen.has_seen(&shared, &format!("10.1.{}.{}:80", MAX_SEEN / 250, MAX_SEEN % 250)));
    }

    #[test]
    fn garbage_in_shared_data_is_ignored() {
        assert!(parse(b"\xff\xfe").is_empty());
        assert!(parse(b"not a line\n10.0.0.1:80 x 1\n10.0.0.1:80 5 1 a b\n10.0.0.1:80 5 1 \n10.0.0.1:80 5\n").is_empty());
        assert_eq!(parse(b"10.0.0.1:80 5 1\n10.0.0.2:80 5 1 -\n10.0.0.3:80 5 1 !pod-a\n").len(), 3);
        assert!(parse(b"10.0.0.1:80 5 1 !\n10.0.0.1:80 5 1 !a!b\n").is_empty());
    }
}
