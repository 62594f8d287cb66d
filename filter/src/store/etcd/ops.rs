//! The seven store operations as etcd txn trees: the same guarantees as the
//! webdis Lua scripts, each one atomic txn.
//!
//! Keys of a session (`P` is `store.key_prefix`):
//! - `P<sid>`: the owner ("upstream#instance"), or `ended` for a tombstone;
//! - `P<sid>:state`: the state, when there is one;
//! - `P<sid>:lease` and `P<sid>:lease_end`: during a failover, the lease
//!   holder's token and the lease's end (ms since the epoch, 16 digits);
//! - `P<sid>:call`: the nonce of the latest call, which every txn writes and
//!   reads back, so that its answer names the call it belongs to.
//!
//! Fencing compares values, not `mod_revision`: an owner, a lease token or a
//! tombstone is exactly what the decision is about, and a value check
//! needs no read before the txn (a revision check would, and would also
//! fail on a harmless refresh such as a touch). Only a rotation that moves
//! the stored state fences on `mod_revision` (see [`Copied`]).
//!
//! The lease's end is compared to the caller's clock, like cookie expiry:
//! proxies' clocks must agree to well within `store.lease`. Every operation
//! can be sent again after an answer was lost and still tell the truth: a
//! commit or rotation that already happened answers stored.

use super::txn::{Branch, Cmp, Do, Leaf, Order, Txn};
use crate::store::Op;

/// The owner value of an ended session. Owners always contain '#'.
pub const TOMBSTONE: &str = "ended";

/// The keys of one session.
#[derive(Debug)]
pub struct Keys {
    pub owner: String,
    pub state: String,
    pub lease: String,
    pub lease_end: String,
    pub call: String,
}

impl Keys {
    pub fn of(prefix: &str, sid: &str) -> Keys {
        let key = |suffix: &str| format!("{prefix}{sid}{suffix}");
        Keys { owner: key(""), state: key(":state"), lease: key(":lease"), lease_end: key(":lease_end"), call: key(":call") }
    }
}

/// The state a rotation moves, as a read before its txn found it: the txn
/// copies it only if the state key is still at that revision (a txn cannot
/// copy a value from one key to another itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub state: Option<String>,
    /// Of the state key; 0 when there was none.
    pub mod_revision: u64,
}

impl Copied {
    fn unchanged(&self, key: &str) -> Cmp {
        match self.state {
            Some(_) => Cmp::ModRevision(key.into(), self.mod_revision),
            None => absent(key),
        }
    }
}

/// A time as the lease-end key holds it: fixed width, so that byte order is time order.
pub fn stamp(ms: u64) -> String {
    format!("{ms:016}")
}

fn eq(key: &str, value: &str) -> Cmp {
    Cmp::Value(key.into(), Order::Equal, value.into())
}
fn ne(key: &str, value: &str) -> Cmp {
    Cmp::Value(key.into(), Order::NotEqual, value.into())
}
fn absent(key: &str) -> Cmp {
    Cmp::Absent(key.into())
}
fn present(key: &str) -> Cmp {
    Cmp::Present(key.into())
}
fn put(key: &str, value: &str) -> Do {
    Do::Put(key.into(), value.into())
}
fn del(key: &str) -> Do {
    Do::Delete(key.into())
}
fn range(key: &str) -> Do {
    Do::Range(key.into())
}
fn txn(compare: Vec<Cmp>, success: Branch, failure: Branch) -> Txn {
    Txn { compare, success, failure }
}
fn leaf(leaf: Leaf, ops: Vec<Do>) -> Branch {
    Branch { ops, leaf: Some(leaf) }
}
/// A branch that goes on with a nested txn.
fn then(nested: Txn) -> Branch {
    Branch { ops: vec![Do::Txn(Box::new(nested))], leaf: None }
}

/// Another proxy's lease is running: held, and not yet at its end.
fn lease_running(k: &Keys, now_ms: u64) -> Vec<Cmp> {
    vec![present(&k.lease), Cmp::Value(k.lease_end.clone(), Order::Greater, stamp(now_ms))]
}

/// Moves `key` to the operation's lease if it exists.
fn keep_if_present(key: &str) -> Do {
    Do::Txn(Box::new(txn(vec![present(key)], leaf(Leaf::Stored, vec![Do::Keep(key.into())]), leaf(Leaf::Stored, vec![]))))
}

/// The top of every operation: both branches write the call's nonce first
/// and read it back last, so the answer carries it.
fn top(k: &Keys, nonce: &str, compare: Vec<Cmp>, success: Branch, failure: Branch) -> Txn {
    let wrap = |mut branch: Branch| {
        branch.ops.insert(0, put(&k.call, nonce));
        branch.ops.push(range(&k.call));
        branch
    };
    txn(compare, wrap(success), wrap(failure))
}

/// The txn of `op`. `new` holds the keys of a rotation's new id, `copied`
/// what its read found.
pub fn tree(op: &Op, k: &Keys, new: &Keys, nonce: &str, now_ms: u64, copied: Option<&Copied>) -> Txn {
    match op {
        Op::Begin { from, lease, lease_ms, .. } => {
            let take = vec![put(&k.lease, lease), put(&k.lease_end, &stamp(now_ms.saturating_add(*lease_ms))), range(&k.state)];
            let busy = vec![present(&k.lease), ne(&k.lease, lease), Cmp::Value(k.lease_end.clone(), Order::Greater, stamp(now_ms))];
            let lease = txn(busy, leaf(Leaf::Busy, vec![]), leaf(Leaf::Acquired, take));
            top(k, nonce, vec![present(&k.owner), ne(&k.owner, from)], leaf(Leaf::Moved, vec![range(&k.owner)]), then(lease))
        }
        Op::Commit { lease, to, state, .. } => {
            // A tombstone never has a lease (end and rotate delete it), so the lease alone fences.
            let mut commit = vec![put(&k.owner, to)];
            let mut done = vec![eq(&k.owner, to)];
            match state {
                Some(state) => {
                    commit.push(put(&k.state, state));
                    done.push(eq(&k.state, state));
                }
                None => commit.push(keep_if_present(&k.state)),
            }
            commit.extend([del(&k.lease), del(&k.lease_end)]);
            let already = txn(done, leaf(Leaf::Stored, vec![]), leaf(Leaf::Conflict, vec![range(&k.owner)]));
            top(k, nonce, vec![eq(&k.lease, lease)], leaf(Leaf::Stored, commit), then(already))
        }
        Op::Write { from, to, state, .. } => {
            let write = vec![put(&k.owner, to), state.as_deref().map_or_else(|| del(&k.state), |state| put(&k.state, state))];
            let owner = txn(vec![present(&k.owner), ne(&k.owner, from), ne(&k.owner, to)], leaf(Leaf::Conflict, vec![range(&k.owner)]), leaf(Leaf::Stored, write));
            let moving = txn(lease_running(k, now_ms), leaf(Leaf::Conflict, vec![range(&k.owner)]), then(owner));
            top(k, nonce, vec![eq(&k.owner, TOMBSTONE)], leaf(Leaf::Ended, vec![]), then(moving))
        }
        Op::Touch { owner, .. } => {
            let touch = vec![put(&k.owner, owner), keep_if_present(&k.state)];
            top(k, nonce, vec![eq(&k.owner, owner)], leaf(Leaf::Stored, touch), leaf(Leaf::Stored, vec![]))
        }
        Op::Release { lease, .. } => top(k, nonce, vec![eq(&k.lease, lease)], leaf(Leaf::Stored, vec![del(&k.lease), del(&k.lease_end)]), leaf(Leaf::Stored, vec![])),
        Op::End { owner, lease, .. } => {
            // A lease another proxy holds does not stop an end: deleting it
            // makes that failover's commit fail instead.
            let end = vec![put(&k.owner, TOMBSTONE), del(&k.state), del(&k.lease), del(&k.lease_end)];
            let theirs = match lease {
                Some(lease) => then(txn(vec![eq(&k.lease, lease)], leaf(Leaf::Stored, end.clone()), leaf(Leaf::Conflict, vec![range(&k.owner)]))),
                None => leaf(Leaf::Conflict, vec![range(&k.owner)]),
            };
            top(k, nonce, vec![present(&k.owner), ne(&k.owner, owner), ne(&k.owner, TOMBSTONE)], theirs, leaf(Leaf::Stored, end))
        }
        Op::Rotate { from, lease, to, state, .. } => {
            let rotation = Rotation {
                from,
                lease: lease.as_deref(),
                to,
                state: state.as_deref().or(copied.and_then(|c| c.state.as_deref())),
                guard: copied.filter(|_| state.is_none()),
            };
            rotate(k, new, nonce, now_ms, &rotation)
        }
    }
}

/// A rotation: from the owner `from` (or our `lease`) to `to`, moving
/// `state` (given, or copied while `guard` holds).
struct Rotation<'a> {
    from: &'a str,
    lease: Option<&'a str>,
    to: &'a str,
    state: Option<&'a str>,
    guard: Option<&'a Copied>,
}

/// Fenced like an end (unless our lease), refused if the new id exists.
fn rotate(k: &Keys, new: &Keys, nonce: &str, now_ms: u64, r: &Rotation<'_>) -> Txn {
    let Rotation { from, lease, to, state, guard } = *r;
    let mut moved = vec![put(&new.owner, to)];
    moved.extend(state.map(|state| put(&new.state, state)));
    moved.extend([put(&k.owner, TOMBSTONE), del(&k.state), del(&k.lease), del(&k.lease_end)]);
    let moved = match guard {
        Some(copied) => then(txn(vec![copied.unchanged(&k.state)], leaf(Leaf::Stored, moved), leaf(Leaf::Conflict, vec![range(&k.owner)]))),
        None => leaf(Leaf::Stored, moved),
    };
    let free = txn(vec![absent(&new.owner), absent(&new.lease)], moved, leaf(Leaf::Taken, vec![]));
    let owner = txn(vec![present(&k.owner), ne(&k.owner, from)], leaf(Leaf::Conflict, vec![range(&k.owner)]), then(free.clone()));
    let fence = txn(lease_running(k, now_ms), leaf(Leaf::Conflict, vec![range(&k.owner)]), then(owner));
    let fenced = match lease {
        Some(lease) => txn(vec![eq(&k.lease, lease)], then(free), then(fence)),
        None => fence,
    };
    let mut done = vec![eq(&new.owner, to)];
    done.extend(state.map(|state| eq(&new.state, state)));
    let ended = txn(done, leaf(Leaf::Stored, vec![]), leaf(Leaf::Conflict, vec![]));
    top(k, nonce, vec![eq(&k.owner, TOMBSTONE)], then(ended), then(fenced))
}
