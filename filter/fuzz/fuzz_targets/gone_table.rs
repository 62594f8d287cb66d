//! The gone table: two workers' copies over one shared-data entry (with real
//! CAS semantics), arbitrary or structured bytes in that entry, marks, refreshes
//! and lookups in any order.
//!
//! Properties: no panic on any shared-data content; after a worker marks a valid
//! host (with an instance the flow could have read from a response, i.e. one
//! `cookie::is_instance` accepts), it sees the host as the sighting says; and a
//! worker that refreshes after a successful mark sees the same as the marker.
#![no_main]

use std::cell::{Cell, RefCell};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sa_fuzz::{ensure, Text, HOSTS, INSTANCES, NOW_MS};
use session_affinity::cookie;
use session_affinity::gone::{GoneTable, SharedData, Sighting, SHARED_KEY};

#[derive(Default)]
struct Shared {
    entry: RefCell<Option<(Vec<u8>, u32)>>,
    lose_races: Cell<bool>,
}

impl SharedData for Shared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        assert_eq!(key, SHARED_KEY);
        match &*self.entry.borrow() {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        assert_eq!(key, SHARED_KEY);
        let mut entry = self.entry.borrow_mut();
        let current = entry.as_ref().map(|(_, c)| *c);
        if self.lose_races.get() || (cas.is_some() && cas != current) {
            return false;
        }
        *entry = Some((value.to_vec(), current.unwrap_or(0).wrapping_add(1)));
        true
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Another writer puts arbitrary bytes in the entry.
    Garbage(Vec<u8>),
    /// Another writer puts table lines in the entry: host, until (ms from now), instance.
    Lines(Vec<(Text, i32, Text)>),
    /// Another writer fills the table with `count` distinct down hosts.
    Fill {
        count: u16,
        until: i32,
    },
    Mark {
        second: bool,
        host: Text,
        down: bool,
        instance: Text,
        ttl_ms: u32,
    },
    Refresh {
        second: bool,
    },
    Advance(u32),
    LoseRaces(bool),
    Query {
        second: bool,
        host: Text,
        instance: Text,
    },
}

fn put(shared: &Shared, bytes: Vec<u8>) {
    let mut entry = shared.entry.borrow_mut();
    let cas = entry.as_ref().map_or(1, |(_, c)| c.wrapping_add(1));
    *entry = Some((bytes, cas));
}

const PROBES: &[&str] = &["", "pod-a", "pod-b", "-", "demo-7f9c"];

fuzz_target!(|ops: Vec<Op>| {
    let shared = Shared::default();
    let mut tables = [GoneTable::default(), GoneTable::default()];
    let mut now = NOW_MS;
    for op in ops.iter().take(32) {
        match op {
            Op::Garbage(bytes) => put(&shared, bytes.clone()),
            Op::Lines(lines) => {
                let mut text = String::new();
                for (host, until, instance) in lines {
                    let until = sa_fuzz::rel(now, *until);
                    text.push_str(&format!("{} {} {}\n", host.get(HOSTS), until, instance.get(INSTANCES)));
                }
                put(&shared, text.into_bytes());
            }
            Op::Fill { count, until } => {
                let until = sa_fuzz::rel(now, *until);
                let text: String = (0..usize::from(*count) % 1100)
                    .map(|i| format!("10.{}.{}.{}:80 {}\n", i / 65536 % 256, i / 256 % 256, i % 256, until.saturating_add(i as u64)))
                    .collect();
                put(&shared, text.into_bytes());
            }
            Op::Mark { second, host, down, instance, ttl_ms } => {
                let (host, instance) = (host.get(HOSTS), instance.get(INSTANCES));
                let sighting = if *down { Sighting::Down } else { Sighting::Replaced { instance: instance.to_string() } };
                let i = usize::from(*second);
                let stored = tables[i].mark(&shared, host, sighting.clone(), now, u64::from(*ttl_ms));
                // What the flow can produce: hosts from verified cookies, instances read from responses.
                if !cookie::is_host(host) || (!*down && (instance.is_empty() || !cookie::is_instance(instance))) {
                    continue;
                }
                for probe in PROBES {
                    let expected = *ttl_ms > 0
                        && match &sighting {
                            Sighting::Down => true,
                            Sighting::Replaced { instance } => !probe.is_empty() && probe != instance,
                        };
                    assert_eq!(tables[i].is_gone(host, probe, now), expected, "marker: {host} {sighting:?} probe {probe:?}");
                }
                if stored {
                    let other = 1 - i;
                    tables[other].refresh(&shared);
                    for probe in PROBES {
                        let (theirs, ours) = (tables[other].is_gone(host, probe, now), tables[i].is_gone(host, probe, now));
                        ensure!(
                            theirs == ours,
                            "gone-roundtrip",
                            "after marking {host} {sighting:?}, is_gone(instance {probe:?}) is {ours} for the marker and {theirs} for another worker; shared entry {:?}",
                            shared.entry.borrow().as_ref().map(|(v, _)| String::from_utf8_lossy(v).into_owned())
                        );
                    }
                }
            }
            Op::Refresh { second } => tables[usize::from(*second)].refresh(&shared),
            Op::Advance(ms) => now = now.saturating_add(u64::from(*ms)),
            Op::LoseRaces(lose) => shared.lose_races.set(*lose),
            Op::Query { second, host, instance } => {
                let _ = tables[usize::from(*second)].is_gone(host.get(HOSTS), instance.get(INSTANCES), now);
            }
        }
    }
});
