//! What each Envoy thread keeps per filter configuration: the parsed config
//! and the core's [`Worker`] (the verified-cookie cache, the local copy of the
//! gone table, pending counts, the store calls it queued).
//!
//! A worker thread's state is used only by that thread's streams, so it needs
//! no lock: it lives in a thread local, found by the configuration it belongs
//! to. Envoy's main thread has one too: the sender of the calls that outlive
//! their stream (`super::SessionAffinity::tick`, fed by `super::Shared::hand_over`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Weak};

use session_affinity::config::Config;
use session_affinity::flow::Worker;

use super::shared_data::ProcessShared;
use super::Shared;

/// One thread's state for one configuration.
pub struct ThreadState {
    pub config: Rc<Config>,
    pub worker: Rc<Worker>,
    /// Numbers this thread's streams for the core's logs.
    streams: Cell<u32>,
}

impl ThreadState {
    /// A number for a new stream's logs.
    pub fn next_stream(&self) -> u32 {
        let n = self.streams.get().wrapping_add(1);
        self.streams.set(n);
        n
    }

    /// Re-reads the process's gone table if any worker wrote shared data
    /// since this thread last read it (an atomic load otherwise).
    pub fn refresh_gone(&self) {
        self.worker.refresh_gone(&ProcessShared, Some(ProcessShared.generation()));
    }
}

struct Slot {
    owner: Weak<Shared>,
    state: Rc<ThreadState>,
}

thread_local! {
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// This thread's state for the configuration `shared`, made on first use;
/// `None` if its JSON no longer parses here (it did when Envoy loaded it).
pub fn this_thread(shared: &Arc<Shared>) -> Option<Rc<ThreadState>> {
    SLOTS.with(|slots| {
        let mut slots = slots.try_borrow_mut().ok()?;
        if let Some(slot) = slots.iter().find(|s| std::ptr::eq(s.owner.as_ptr(), Arc::as_ptr(shared))) {
            return Some(Rc::clone(&slot.state));
        }
        // Configurations Envoy has destroyed leave their slots behind: drop them now.
        slots.retain(|s| s.owner.strong_count() > 0);
        let config = shared.parse().ok()?;
        let state = Rc::new(ThreadState {
            config: Rc::new(config),
            worker: Rc::default(),
            streams: Cell::new(0),
        });
        slots.push(Slot { owner: Arc::downgrade(shared), state: Rc::clone(&state) });
        Some(state)
    })
}
