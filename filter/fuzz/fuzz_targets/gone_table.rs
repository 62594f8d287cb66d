//! The gone table: three workers' copies over one shared-data entry (the
//! `testing` fake, with real CAS), marks, "alive" evidence, refreshes and
//! lookups in any order, lost CAS races, and other writers putting table
//! lines or garbage in the entry.
//!
//! Properties (what the flow can produce: upstreams from verified cookies or
//! Envoy, instances the response reader accepts, gone_ttl at least 1s):
//! - no panic on any shared-data content;
//! - after a mark, the marker sees the upstream as the sighting says;
//! - a worker that refreshes after a mark or an "alive" was written sees the
//!   upstream as the writer does;
//! - the same mark made again within MARK_INTERVAL_MS writes nothing;
//! - after `alive(upstream, instance, sent)`, that instance is gone only on
//!   evidence made at or after `sent` (a mark made before the evidence is
//!   cleared; the answering instance is never made gone).
//!
//! Garbage that happens to parse can hold entries no filter writes (several
//! per upstream, or expiring before their rate limit), so it suspends the
//! last three properties until table lines replace it.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, rel, Text, INSTANCES, NOW_MS, UPSTREAMS};
use serde::{Deserialize, Serialize};
use session_affinity::gone::{Change, GoneTable, Sighting, MARK_INTERVAL_MS, SHARED_KEY};
use session_affinity::host::SharedData;
use session_affinity::ids::{is_instance, is_upstream};
use session_affinity::testing::FakeShared;

#[derive(Arbitrary, Debug, Clone, Serialize, Deserialize)]
enum Seen {
    Down,
    Runs(Text),
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
enum Step {
    /// Another writer puts arbitrary bytes in the entry.
    Garbage(Vec<u8>),
    /// Another writer puts table lines in the entry: upstream, sighting,
    /// marked (ms from now), how long after the mark it expires.
    Lines(Vec<(Text, Seen, i32, u32)>),
    /// Another writer fills the table with `count` distinct down upstreams.
    Fill {
        count: u16,
        until: i32,
    },
    Mark {
        table: u8,
        upstream: Text,
        seen: Seen,
        ttl_ms: u32,
    },
    /// The upstream answered as `instance` a request sent `ago` ms before now.
    Alive {
        table: u8,
        upstream: Text,
        instance: Text,
        ago: u16,
        ttl_ms: u32,
    },
    Refresh {
        table: u8,
    },
    /// Move the clock, ms (backwards too: clocks get stepped).
    Clock(i32),
    LoseRaces(bool),
    Query {
        table: u8,
        upstream: Text,
        instance: Text,
    },
}

#[derive(Arbitrary, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    steps: Vec<Step>,
}

const TABLES: usize = 3;
const PROBES: &[&str] = &["", "pod-a", "pod-b", "-", "demo-7f9c"];

/// Evidence about an upstream: what was seen, and when.
struct Evidence {
    upstream: String,
    marked_ms: u64,
    sighting: Sighting,
}

/// Writes `bytes` as another writer would, whatever races this worker loses.
fn put(shared: &FakeShared, bytes: Vec<u8>) {
    let mut data = shared.data.borrow_mut();
    let cas = data.get(SHARED_KEY).map_or(1, |(_, c)| c.wrapping_add(1));
    data.insert(SHARED_KEY.to_string(), (bytes, cas));
}

fn shared_text(shared: &FakeShared) -> String {
    shared.get(SHARED_KEY).0.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()
}

struct World {
    shared: FakeShared,
    tables: [GoneTable; TABLES],
    now: u64,
    evidence: Vec<Evidence>,
    /// Garbage in the entry may hold entries no filter writes.
    tainted: bool,
    /// Per table: its last change (upstream, sighting, when, whether it was written).
    last: [Option<(String, Sighting, u64, bool)>; TABLES],
}

impl World {
    /// After `table` wrote the shared entry: a refreshing worker sees `upstream` as it does.
    fn check_roundtrip(&mut self, table: usize, upstream: &str) {
        let other = (table + 1) % TABLES;
        self.tables[other].refresh(&self.shared);
        self.last[other] = None;
        for probe in PROBES {
            let (ours, theirs) =
                (self.tables[table].is_gone(upstream, probe, self.now), self.tables[other].is_gone(upstream, probe, self.now));
            ensure!(
                ours == theirs,
                "gone-roundtrip",
                "is_gone({upstream}, {probe:?}) is {ours} for the writer and {theirs} after a refresh; entry {:?}",
                shared_text(&self.shared)
            );
        }
    }

    fn mark(&mut self, t: usize, upstream: &str, sighting: Sighting, ttl_ms: u64) {
        let writes = self.shared.writes();
        let repeat = matches!(&self.last[t], Some((u, s, at, true)) if u == upstream && *s == sighting && self.now < at.saturating_add(MARK_INTERVAL_MS));
        let change = self.tables[t].mark(&self.shared, upstream, sighting.clone(), self.now, ttl_ms);
        if change != Change::Unchanged {
            self.evidence.push(Evidence { upstream: upstream.to_string(), marked_ms: self.now, sighting: sighting.clone() });
        }
        let usable =
            is_upstream(upstream) && !matches!(&sighting, Sighting::Runs { instance } if instance.is_empty() || !is_instance(instance));
        if !usable {
            self.last[t] = None;
            return;
        }
        if repeat && !self.tainted {
            ensure!(
                change == Change::Unchanged && self.shared.writes() == writes,
                "mark-interval",
                "{upstream} {sighting:?} marked again within {MARK_INTERVAL_MS} ms: {change:?}"
            );
        }
        if !self.tainted {
            for probe in PROBES {
                let expected = sighting.strands(probe);
                let seen = self.tables[t].is_gone(upstream, probe, self.now);
                ensure!(seen == expected, "mark-seen", "after marking {upstream} {sighting:?} ({change:?}), is_gone({probe:?}) is {seen}");
            }
        }
        if change == Change::Written {
            self.check_roundtrip(t, upstream);
        }
        self.last[t] = Some((upstream.to_string(), sighting, self.now, change != Change::Unchanged));
    }

    fn alive(&mut self, t: usize, upstream: &str, instance: &str, sent: u64, ttl_ms: u64) {
        let change = self.tables[t].alive(&self.shared, upstream, instance, sent, self.now, ttl_ms);
        self.last[t] = None;
        if change != Change::Unchanged && !instance.is_empty() {
            self.evidence.push(Evidence {
                upstream: upstream.to_string(),
                marked_ms: sent,
                sighting: Sighting::Runs { instance: instance.to_string() },
            });
        }
        if !is_upstream(upstream) || !is_instance(instance) {
            return;
        }
        if !self.tainted && self.tables[t].is_gone(upstream, instance, self.now) {
            let newer = self.evidence.iter().any(|e| e.upstream == upstream && e.marked_ms >= sent && e.sighting.strands(instance));
            ensure!(
                newer,
                "alive",
                "{upstream} answered as {instance:?} (sent at {sent}) is still gone at {} ({change:?}) with no newer evidence; entry {:?}",
                self.now,
                shared_text(&self.shared)
            );
        }
        if change == Change::Written {
            self.check_roundtrip(t, upstream);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = sa_fuzz::read::<Input>(data) else { return };
    let mut w = World {
        shared: FakeShared::default(),
        tables: Default::default(),
        now: NOW_MS,
        evidence: Vec::new(),
        tainted: false,
        last: Default::default(),
    };
    let seen = |s: &Seen| match s {
        Seen::Down => Sighting::down(""),
        Seen::Runs(i) => Sighting::Runs { instance: i.get(INSTANCES).to_string() },
    };
    for step in input.steps.iter().take(32) {
        match step {
            Step::Garbage(bytes) => {
                put(&w.shared, bytes.clone());
                w.tainted = true;
            }
            Step::Lines(lines) => {
                // What another filter writes: one line per upstream, each
                // living at least a second (gone_ttl >= 1s).
                let mut text = String::new();
                let mut written: Vec<&str> = Vec::new();
                for (upstream, sighting, marked, life) in lines.iter().take(16) {
                    let upstream = upstream.get(UPSTREAMS);
                    let sighting = seen(sighting);
                    let instance = match &sighting {
                        Sighting::Down { .. } => None,
                        Sighting::Runs { instance } => Some(instance.as_str()),
                    };
                    if !is_upstream(upstream) || written.contains(&upstream) || instance.is_some_and(|i| i.is_empty() || !is_instance(i)) {
                        continue;
                    }
                    written.push(upstream);
                    let marked_ms = rel(w.now, i64::from(*marked));
                    let until = marked_ms.saturating_add(1000 + u64::from(*life));
                    text.push_str(&format!("{upstream} {until} {marked_ms}"));
                    if let Some(instance) = instance {
                        text.push_str(&format!(" {instance}"));
                    }
                    text.push('\n');
                    w.evidence.push(Evidence { upstream: upstream.to_string(), marked_ms, sighting });
                }
                put(&w.shared, text.into_bytes());
                w.tainted = false;
            }
            Step::Fill { count, until } => {
                let until = rel(w.now, i64::from(*until)).max(1000);
                let text: String = (0..usize::from(*count) % 1100)
                    .map(|i| {
                        format!(
                            "10.{}.{}.{}:80 {} {}\n",
                            i / 65536 % 256,
                            i / 256 % 256,
                            i % 256,
                            until.saturating_add(i as u64),
                            until - 1000
                        )
                    })
                    .collect();
                for i in 0..usize::from(*count) % 1100 {
                    let upstream = format!("10.{}.{}.{}:80", i / 65536 % 256, i / 256 % 256, i % 256);
                    w.evidence.push(Evidence { upstream, marked_ms: until - 1000, sighting: Sighting::down("") });
                }
                put(&w.shared, text.into_bytes());
                w.tainted = false;
            }
            Step::Mark { table, upstream, seen: s, ttl_ms } => {
                let ttl = 1000 + u64::from(*ttl_ms);
                w.mark(usize::from(*table) % TABLES, upstream.get(UPSTREAMS), seen(s), ttl);
            }
            Step::Alive { table, upstream, instance, ago, ttl_ms } => {
                let sent = w.now.saturating_sub(u64::from(*ago));
                let ttl = 1000 + u64::from(*ttl_ms);
                w.alive(usize::from(*table) % TABLES, upstream.get(UPSTREAMS), instance.get(INSTANCES), sent, ttl);
            }
            Step::Refresh { table } => {
                let t = usize::from(*table) % TABLES;
                w.tables[t].refresh(&w.shared);
                w.last[t] = None;
            }
            Step::Clock(ms) => w.now = rel(w.now, i64::from(*ms)),
            Step::LoseRaces(lose) => w.shared.lose_races.set(*lose),
            Step::Query { table, upstream, instance } => {
                let _ = w.tables[usize::from(*table) % TABLES].is_gone(upstream.get(UPSTREAMS), instance.get(INSTANCES), w.now);
            }
        }
    }
});
