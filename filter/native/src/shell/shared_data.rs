//! The core's [`SharedData`] (the gone table, the store's circuit breaker)
//! for every worker of this Envoy process: one map behind a mutex, with a
//! version per entry for compare-and-swap, as proxy-wasm's shared data has.
//!
//! The pinned path never takes the lock. A worker re-reads the gone table
//! only when the map's generation (bumped by every write) moved since its
//! last read, which is one relaxed atomic load per request. Writes are rare
//! (a host found gone, a store call's outcome changing the breaker) and hold
//! the lock for a copy of one small value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use session_affinity::host::SharedData;

/// The process's shared data. Every configuration of the module shares it,
/// as every wasm VM with the same `vm_id` shares proxy-wasm's.
pub struct ProcessShared;

struct Entry {
    value: Vec<u8>,
    version: u32,
}

static ENTRIES: Mutex<BTreeMap<String, Entry>> = Mutex::new(BTreeMap::new());
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Locks the map. A panic while it was held cannot have left an entry half
/// written (each write is one insert), so a poisoned lock is used as is.
fn entries() -> MutexGuard<'static, BTreeMap<String, Entry>> {
    ENTRIES.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ProcessShared {
    /// Moves on every successful write: a reader whose generation is current
    /// has nothing new to read.
    pub fn generation(&self) -> u64 {
        GENERATION.load(Ordering::Acquire)
    }
}

impl SharedData for ProcessShared {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match entries().get(key) {
            Some(entry) => (Some(entry.value.clone()), Some(entry.version)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut entries = entries();
        let current = entries.get(key).map(|e| e.version);
        if cas.is_some() && cas != current {
            return false;
        }
        let version = current.map_or(1, |v| v.wrapping_add(1).max(1));
        match entries.get_mut(key) {
            Some(entry) => {
                entry.value.clear();
                entry.value.extend_from_slice(value);
                entry.version = version;
            }
            None => {
                entries.insert(key.to_owned(), Entry { value: value.to_vec(), version });
            }
        }
        GENERATION.fetch_add(1, Ordering::Release);
        true
    }
}
