//! A worker's background work: the store calls that outlive their stream
//! (queued, in flight, retrying), their answers, and the tick cadence. Both
//! shells drive it with one vocabulary, from the worker's own context (wasm:
//! the root's tick and call answers; native: the main thread's scheduler
//! and configuration callouts):
//! - [`Worker::on_tick`] sends what is due and says when to tick again;
//! - [`Worker::on_reply`] reads the answer to one of those calls;
//! - [`Worker::take_queued`] / [`Worker::enqueue`] move a thread's queue to
//!   the one sender when that is another thread (native).

use log::warn;

use super::worker::{is_state_change, Answer, Sent, Worker};
use crate::config::Config;
use crate::host::{HttpHost, WorkerHost};
use crate::metrics::Counter;
use crate::store::{Op, Reply, StoreCall};

/// The tick while the worker has nothing waiting: counters are flushed and
/// the gone table re-read this often.
pub const IDLE_TICK_MS: u64 = 1000;
/// The tick while calls wait to go out (a retry's pause, a session's call
/// behind one still out) or streams wait on the worker.
pub const BUSY_TICK_MS: u64 = 10;
/// Background calls held at most per list; beyond it the oldest are
/// forgotten, counted (a store that never answers cannot grow this).
pub const MAX_HELD: usize = 1024;

/// The calls a worker holds for no stream.
#[derive(Debug, Default)]
pub(super) struct Background {
    /// Waiting to be sent from the worker's context.
    queued: Vec<StoreCall>,
    /// Sent, waiting for their answers.
    in_flight: Vec<Sent>,
    /// Failed, to go out again at a time: (due, call).
    retrying: Vec<(u64, StoreCall)>,
}

/// Pushes `item`, first removing and returning the oldest if `held` is full.
/// Every bounded list of calls (here and in a shell) goes through this.
pub fn push_bounded<T>(held: &mut Vec<T>, item: T) -> Option<T> {
    let dropped = (held.len() >= MAX_HELD).then(|| held.remove(0));
    held.push(item);
    dropped
}

impl Worker {
    /// Queues `op` for the worker to send: the call outlives the stream, and
    /// its answer is counted by the worker. False when the breaker is open.
    pub fn send_in_background(&self, host: &mut impl HttpHost, config: &Config, context_id: u32, op: Op) -> bool {
        let Some(call) = self.make_call(host, config, context_id, op) else { return false };
        self.enqueue(call);
        host.wake_worker();
        true
    }

    /// Queues a call for [`Worker::on_tick`]. A session's state writes go
    /// out one at a time, and a newer one replaces a queued older one, so they
    /// land in order.
    pub fn enqueue(&self, call: StoreCall) {
        let dropped = self.background(|b| match b.queued.iter_mut().find(|q| is_write(&q.op) && is_write(&call.op) && q.op.sid() == call.op.sid()) {
            Some(older) => {
                *older = call;
                None
            }
            None => push_bounded(&mut b.queued, call),
        });
        if let Some(dropped) = dropped {
            self.dropped(&dropped.op);
        }
    }

    /// Takes the queued calls, for a shell whose workers hand their calls to
    /// one long-lived sender (each goes to that sender's [`Worker::enqueue`]).
    pub fn take_queued(&self) -> Vec<StoreCall> {
        self.background(|b| std::mem::take(&mut b.queued))
    }

    /// Sends the due retries and the queued calls, from the worker's own
    /// context (so their answers come to [`Worker::on_reply`], and no
    /// stream's end cancels them). Returns when to run again: in
    /// [`BUSY_TICK_MS`] while calls still wait, `None` when idle.
    pub fn on_tick(&self, host: &mut impl WorkerHost, config: &Config) -> Option<u64> {
        self.send_retries(host, config);
        for call in self.take_queued() {
            // A session's call waits its turn while its previous one is out.
            let ready = self.background(|b| {
                let sid = call.op.sid();
                let busy = b.in_flight.iter().any(|s| s.call.op.sid() == sid) || b.retrying.iter().any(|(_, c)| c.op.sid() == sid);
                if busy {
                    b.queued.push(call);
                    None
                } else {
                    Some(call)
                }
            });
            let Some(call) = ready else { continue };
            let now = host.now_ms();
            match self.dispatch(host, config, &call) {
                Some(token) => self.track(Sent { token, call, started_ms: now }),
                None if is_state_change(&call.op) => self.unprotected(now),
                None => {}
            }
        }
        let waiting = self.background(|b| !b.queued.is_empty() || !b.retrying.is_empty());
        waiting.then_some(BUSY_TICK_MS)
    }

    /// The answer to a background call (its stream may be gone): counted,
    /// never acted on, except that an operation's next call goes out.
    pub fn on_reply(&self, host: &mut impl WorkerHost, config: &Config, token: u64, status: Option<u32>, body: &[u8], now_ms: u64) {
        let found = self.background(|b| {
            let at = b.in_flight.iter().position(|s| s.token == token)?;
            Some(b.in_flight.remove(at))
        });
        let Some(sent) = found else { return };
        let answer = self.store_reply(host, config, &sent, status, body, now_ms);
        self.background_answer(&sent.call.op, answer, now_ms);
    }

    /// Sends the worker's retries that are due.
    fn send_retries(&self, host: &mut impl WorkerHost, config: &Config) {
        let now = host.now_ms();
        let due = self.background(|b| {
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut b.retrying).into_iter().partition(|(at, _)| *at <= now);
            b.retrying = later;
            due
        });
        for (_, call) in due {
            let op = call.op.clone();
            let answer = self.resend(host, config, call);
            self.background_answer(&op, answer, now);
        }
    }

    /// Remembers a background call in flight.
    fn track(&self, sent: Sent) {
        if let Some(dropped) = self.background(|b| push_bounded(&mut b.in_flight, sent)) {
            self.dropped(&dropped.call.op);
        }
    }

    /// What a background call led to: wait for the next call, retry later,
    /// or count the outcome.
    fn background_answer(&self, op: &Op, answer: Answer, now_ms: u64) {
        let result = match answer {
            Answer::Reply(result) => result,
            Answer::Waiting(next) => return self.track(*next),
            Answer::Later { call, due_ms } => {
                if let Some((_, dropped)) = self.background(|b| push_bounded(&mut b.retrying, (due_ms, *call))) {
                    self.dropped(&dropped.op);
                }
                return;
            }
        };
        match result {
            Ok(Reply::Conflict { owner }) if matches!(op, Op::Write { .. } | Op::Commit { .. }) => {
                self.count(Counter::StoreWritesRejected);
                warn!("store refused a {} from a host that does not own the session (owner {owner:?})", op.name());
            }
            Ok(_) => {}
            Err(_) if is_state_change(op) => self.unprotected(now_ms),
            Err(_) => {}
        }
    }

    /// Counts a background call forgotten because its list was full (the
    /// store is far behind); a change it carried is not protected.
    pub fn dropped(&self, op: &Op) {
        self.count(Counter::StoreCallsDropped);
        if is_state_change(op) {
            self.count(Counter::StoreWritesUnprotected);
        }
    }
}

fn is_write(op: &Op) -> bool {
    matches!(op, Op::Write { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_list_drops_its_oldest_item() {
        let mut held: Vec<usize> = (0..MAX_HELD).collect();
        assert_eq!(push_bounded(&mut held, MAX_HELD), Some(0));
        assert_eq!((held.len(), held.first(), held.last()), (MAX_HELD, Some(&1), Some(&MAX_HELD)));
        let mut short = vec![1];
        assert_eq!(push_bounded(&mut short, 2), None);
    }
}
