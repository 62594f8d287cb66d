//! Unguessable bytes for session ids and store nonces: the kernel's CSPRNG
//! (`getrandom`), read a few hundred bytes at a time per thread so a new
//! session rarely pays for a system call.

use std::cell::RefCell;

/// 32 ids per refill.
const POOL_BYTES: usize = 512;

struct Pool {
    bytes: [u8; POOL_BYTES],
    /// Bytes handed out; each is handed out once.
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL_BYTES], used: POOL_BYTES }) };
}

/// 16 bytes from the kernel's CSPRNG; `None` if it cannot be read (the core
/// then derives ids from its signing key).
pub fn bytes16() -> Option<[u8; 16]> {
    POOL.with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        if pool.used + 16 > POOL_BYTES {
            if let Err(error) = getrandom::fill(&mut pool.bytes) {
                log::warn!("session-affinity-native: getrandom failed ({error})");
                return None;
            }
            pool.used = 0;
        }
        let at = pool.used;
        let taken = pool.bytes.get(at..at + 16)?;
        let mut out = [0u8; 16];
        out.copy_from_slice(taken);
        // Handed out once: wiped from the pool.
        pool.bytes.get_mut(at..at + 16)?.fill(0);
        pool.used = at + 16;
        Some(out)
    })
}
