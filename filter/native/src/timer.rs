//! Runs a stream's (or the main thread's) code later, on its own thread.
//!
//! Envoy 1.40's ABI gives an HTTP filter no timer, only schedulers that any
//! thread can commit to. So one process-wide thread sleeps until the
//! earliest deadline and commits the due events; Envoy then calls the
//! filter's `on_scheduled` on the stream's worker. The thread lives as long
//! as the process, so Envoy must not unload the library
//! (`dynamic_module_config.do_not_close: true`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Due {
    at: Instant,
    /// Keeps events with equal deadlines in the order they were set.
    sequence: u64,
    /// Commits the event to its scheduler.
    commit: Box<dyn FnOnce() + Send>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

static TIMER: OnceLock<Option<Sender<Due>>> = OnceLock::new();

/// Runs `commit` (a scheduler's commit) after `delay`. If the timer thread
/// cannot be started, it runs at once: late is better than never.
pub fn schedule(delay: Duration, commit: impl FnOnce() + Send + 'static) {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let due = Due { at: Instant::now() + delay, sequence, commit: Box::new(commit) };
    let sent = match TIMER.get_or_init(start) {
        Some(sender) => sender.send(due),
        None => Err(mpsc::SendError(due)),
    };
    if let Err(mpsc::SendError(due)) = sent {
        (due.commit)();
    }
}

fn start() -> Option<Sender<Due>> {
    let (sender, receiver) = mpsc::channel();
    match std::thread::Builder::new().name("sa-native-timer".into()).spawn(move || run(receiver)) {
        Ok(_) => Some(sender),
        Err(error) => {
            log::error!("session-affinity-native: cannot start the timer thread ({error}); delays are skipped");
            None
        }
    }
}

fn run(receiver: Receiver<Due>) {
    let mut pending: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    loop {
        let received = match pending.peek() {
            Some(Reverse(next)) => receiver.recv_timeout(next.at.saturating_duration_since(Instant::now())),
            None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(due) => pending.push(Reverse(due)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while pending.peek().is_some_and(|Reverse(next)| next.at <= now) {
            if let Some(Reverse(due)) = pending.pop() {
                (due.commit)();
            }
        }
    }
}
