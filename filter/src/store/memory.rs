//! What a worker remembers between the calls of its store operations.

use crate::keys::Secret;

/// Leases a worker keeps: buckets in use only move forward, so the oldest go.
const MAX_LEASES: usize = 64;

/// What a worker remembers between store calls, for the dialect that needs
/// it: etcd's auth token and the shared leases it granted (webdis keeps
/// nothing). Every dialect takes it, so it lives beside them.
#[derive(Debug, Default)]
pub struct Memory {
    pub(super) token: Option<Secret>,
    /// (bucket, lease id), oldest bucket first.
    pub(super) leases: Vec<(u64, u64)>,
}

impl Memory {
    pub(super) fn lease(&self, bucket: u64) -> Option<u64> {
        self.leases.iter().find(|(b, _)| *b == bucket).map(|(_, id)| *id)
    }

    /// Keeps lease `id` for `bucket`, forgetting buckets that ended
    /// (`current` is the bucket now is in).
    pub(super) fn remember(&mut self, bucket: u64, id: u64, current: u64) {
        self.leases.retain(|(b, _)| *b != bucket && *b > current);
        if self.leases.len() >= MAX_LEASES {
            self.leases.remove(0);
        }
        let at = self.leases.partition_point(|(b, _)| *b < bucket);
        self.leases.insert(at, (bucket, id));
    }

    pub(super) fn forget(&mut self, lease: u64) {
        self.leases.retain(|(_, id)| *id != lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_keeps_a_bounded_set_of_current_leases() {
        let mut memory = Memory::default();
        memory.remember(10, 1, 5);
        memory.remember(12, 2, 5);
        memory.remember(11, 3, 5);
        assert_eq!(memory.leases, [(10, 1), (11, 3), (12, 2)]);
        memory.remember(13, 4, 11);
        assert_eq!(memory.leases, [(12, 2), (13, 4)], "buckets that ended are forgotten");
        for bucket in 100..100 + MAX_LEASES as u64 + 5 {
            memory.remember(bucket, bucket, 11);
        }
        assert_eq!(memory.leases.len(), MAX_LEASES);
        assert_eq!(memory.lease(104 + MAX_LEASES as u64), Some(104 + MAX_LEASES as u64));
        memory.forget(104 + MAX_LEASES as u64);
        assert_eq!(memory.lease(104 + MAX_LEASES as u64), None);
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let memory = Memory { token: Some(Secret(b"secret-token".to_vec())), leases: vec![] };
        assert!(!format!("{memory:?}").contains("secret-token"));
    }
}
