//! etcd v3 through its JSON gateway (`/v3/`): each operation is one txn
//! ([`ops`]), so each is atomic in etcd, on whichever member Envoy picks
//! (followers forward writes to the leader).
//!
//! Before its txn an operation may need a login (`store.auth`: the token is
//! kept per worker and a rejected one is renewed and the call made again), a
//! lease grant, or, for a rotation that moves the stored state, a read. The
//! worker's [`Memory`] keeps what those calls learn, so an operation usually
//! takes one call. A call that fails (no answer, a timeout, a member without
//! quorum) is made again, so it can reach another member: every txn tells the
//! truth when repeated.
//!
//! TTLs without a lease per session: keys share one etcd lease per time
//! bucket (`store.etcd.lease_bucket`), the one whose end covers the key's
//! expiry, granted on demand and kept per worker. A key lives its TTL plus up
//! to one bucket; a worker holds about one lease per bucket per TTL in use.

mod ops;
mod txn;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::{Dialect, Exchange, Memory, Next, Op, Reply, Request, Step, StoreError};
use crate::keys::Secret;
pub use ops::Copied;
use ops::{tree, Keys, TOMBSTONE};
use txn::{walk, Body, Leaf};

/// Keys are written only with a lease that has at least this long to live,
/// so a lease never ends under a call in flight.
const MIN_LIFE_MS: u64 = 10_000;
pub struct Etcd<'a> {
    prefix: &'a str,
    bucket_ms: u64,
    /// The `/v3/auth/authenticate` body, if etcd has auth enabled.
    login: Option<&'a Secret>,
}

impl<'a> Etcd<'a> {
    pub fn new(prefix: &'a str, bucket_ms: u64, login: Option<&'a Secret>) -> Etcd<'a> {
        Etcd { prefix, bucket_ms: bucket_ms.max(1), login }
    }

    /// The bucket whose lease covers everything `op` writes.
    fn bucket(&self, op: &Op, now_ms: u64) -> u64 {
        let ttl = match op {
            Op::Begin { lease_ms, .. } => *lease_ms,
            Op::Commit { ttl_ms, .. } | Op::Write { ttl_ms, .. } | Op::Touch { ttl_ms, .. } => *ttl_ms,
            Op::Release { .. } => 0,
            Op::End { tombstone_ms, .. } => *tombstone_ms,
            Op::Rotate { ttl_ms, tombstone_ms, .. } => (*ttl_ms).max(*tombstone_ms),
        };
        now_ms.saturating_add(ttl.max(MIN_LIFE_MS)) / self.bucket_ms + 1
    }

    /// The next call `op` needs, given what the worker knows.
    fn plan(&self, op: &Op, memory: &Memory, now_ms: u64, copied: Option<Copied>) -> Step {
        if self.login.is_some() && memory.token.is_none() {
            return Step::Login;
        }
        let bucket = self.bucket(op, now_ms);
        let Some(lease) = memory.lease(bucket) else { return Step::Grant { bucket } };
        if matches!(op, Op::Rotate { state: None, .. }) && copied.is_none() {
            return Step::Read;
        }
        Step::Txn { lease, copied }
    }

    fn keys(&self, sid: &str) -> Keys {
        Keys::of(self.prefix, sid)
    }

    fn new_keys(&self, op: &Op) -> Keys {
        match op {
            Op::Rotate { new_sid, .. } => self.keys(new_sid),
            _ => self.keys(op.sid()),
        }
    }

    /// What a txn's answer means, once it is known to answer this call.
    fn txn_reply(&self, op: &Op, nonce: &str, copied: Option<&Copied>, body: &[u8], now_ms: u64) -> Result<Reply, StoreError> {
        let k = self.keys(op.sid());
        let reply: Body = serde_json::from_slice(body).map_err(|_| StoreError::Protocol(format!("a {} got an answer that is not a txn's", op.name())))?;
        check_echo(op, &k.call, nonce, &reply)?;
        let mut reads = Vec::new();
        let tree = tree(op, &k, &self.new_keys(op), nonce, now_ms, copied);
        let leaf = walk(&tree, &reply, &mut reads).map_err(|what| StoreError::Protocol(format!("{} answer: {what}", op.name())))?;
        let read = |key: &str| reads.iter().rev().find(|(k, _)| k == key).and_then(|(_, found)| found.as_ref()).map(|f| f.value.clone());
        Ok(match leaf {
            Leaf::Stored => Reply::Stored,
            Leaf::Busy => Reply::Busy,
            Leaf::Taken => Reply::Taken,
            Leaf::Ended => Reply::Ended,
            Leaf::Acquired => Reply::Acquired { state: read(&k.state) },
            Leaf::Moved => match read(&k.owner) {
                Some(owner) if owner == TOMBSTONE => Reply::Ended,
                Some(owner) => Reply::Moved { owner },
                None => return Err(StoreError::Protocol("begin answer: moved, without an owner".into())),
            },
            Leaf::Conflict => Reply::Conflict { owner: read(&k.owner).filter(|owner| owner != TOMBSTONE) },
        })
    }

    /// A call etcd did not serve: a token to renew, a lease to grant again,
    /// or an error.
    fn refused(&self, op: &Op, step: &Step, status: u32, body: &[u8], memory: &mut Memory, now_ms: u64) -> Result<Next, StoreError> {
        let message = serde_json::from_slice::<Body>(body).map(|e| e.error).unwrap_or_default();
        let token_refused = status == 401 || (status == 400 && ["user name is empty", "auth store is old", "invalid auth token"].iter().any(|m| message.contains(m)));
        match step {
            Step::Login if status == 400 => Err(StoreError::Protocol("etcd refused store.auth's user name or password".into())),
            Step::Login => Err(StoreError::Unavailable(status)),
            _ if token_refused && self.login.is_none() => Err(StoreError::Protocol("etcd has auth enabled; set store.auth".into())),
            _ if token_refused => {
                memory.token = None;
                Ok(Next::Call(Step::Login))
            }
            _ if status == 403 => Err(StoreError::Protocol("etcd denied access; the user's role needs readwrite on store.key_prefix".into())),
            Step::Txn { lease, .. } if status == 404 && message.contains("lease not found") => {
                memory.forget(*lease);
                Ok(Next::Call(self.plan(op, memory, now_ms, None)))
            }
            // Anything else etcd refused outright would be refused again.
            _ if (400..500).contains(&status) && status != 429 => Err(StoreError::Protocol(format!("etcd refused a {} call ({status}): {message}", op.name()))),
            _ => Err(StoreError::Unavailable(status)),
        }
    }
}

/// The answer's last read is of this session's call key, and finds this
/// call's nonce: else it answers some other call.
fn check_echo(op: &Op, call_key: &str, nonce: &str, reply: &Body) -> Result<(), StoreError> {
    let echo = reply.responses.last().and_then(|last| last.response_range.as_ref());
    let echo = echo.and_then(|range| range.value_of(call_key).ok().flatten()).map(|found| found.value);
    match echo {
        Some(echo) if echo == nonce => Ok(()),
        other => Err(StoreError::Mismatch(format!("a {} call of session {} got an answer for call {other:?}", op.name(), op.sid()))),
    }
}

impl Dialect for Etcd<'_> {
    fn first_step(&self, op: &Op, memory: &Memory, now_ms: u64) -> Step {
        self.plan(op, memory, now_ms, None)
    }

    fn request(&self, call: Exchange<'_>, memory: &Memory) -> Request {
        let Exchange { op, step, nonce, now_ms } = call;
        let authorization = memory.token.as_ref().map(|t| String::from_utf8_lossy(&t.0).into_owned());
        let (path, body) = match step {
            Step::Login => ("/v3/auth/authenticate", self.login.map(|l| l.0.clone()).unwrap_or_default()),
            Step::Grant { bucket } => {
                let end_ms = bucket.saturating_mul(self.bucket_ms);
                let ttl = end_ms.saturating_sub(now_ms).div_ceil(1000).saturating_add(1);
                ("/v3/lease/grant", format!("{{\"TTL\":{ttl}}}").into_bytes())
            }
            Step::Read => ("/v3/kv/range", format!("{{\"key\":\"{}\"}}", STANDARD.encode(self.keys(op.sid()).state)).into_bytes()),
            Step::Txn { lease, copied } => ("/v3/kv/txn", tree(op, &self.keys(op.sid()), &self.new_keys(op), nonce, now_ms, copied.as_ref()).render(*lease)),
            Step::Op => ("/v3/kv/txn", Vec::new()),
        };
        let authorization = authorization.filter(|_| *step != Step::Login);
        Request { path: path.into(), content_type: "application/json", authorization, body }
    }

    fn reply(&self, call: Exchange<'_>, status: u32, body: &[u8], memory: &mut Memory) -> Result<Next, StoreError> {
        let Exchange { op, step, nonce, now_ms } = call;
        if status != 200 {
            return self.refused(op, step, status, body, memory, now_ms);
        }
        let unreadable = |what: &str| StoreError::Protocol(format!("etcd {what} answer not understood"));
        let answer = || serde_json::from_slice::<Body>(body);
        match step {
            Step::Login => {
                // The answer holds the token: it goes nowhere but the memory.
                let reply = answer().ok().filter(|a| !a.token.is_empty()).ok_or_else(|| unreadable("login"))?;
                memory.token = Some(Secret(reply.token.into_bytes()));
                Ok(Next::Call(self.plan(op, memory, now_ms, None)))
            }
            Step::Grant { bucket } => {
                let id = answer().ok().and_then(|a| a.id.parse().ok()).ok_or_else(|| unreadable("lease grant"))?;
                memory.remember(*bucket, id, now_ms / self.bucket_ms);
                Ok(Next::Call(self.plan(op, memory, now_ms, None)))
            }
            Step::Read => {
                let reply = answer().map_err(|_| unreadable("read"))?;
                let found = reply.value_of(&self.keys(op.sid()).state).map_err(|what| StoreError::Mismatch(format!("rotate read: {what}")))?;
                let copied = found.map_or(Copied { state: None, mod_revision: 0 }, |f| Copied { state: Some(f.value), mod_revision: f.mod_revision });
                Ok(Next::Call(self.plan(op, memory, now_ms, Some(copied))))
            }
            Step::Txn { copied, .. } => self.txn_reply(op, nonce, copied.as_ref(), body, now_ms).map(Next::Done),
            Step::Op => Err(StoreError::Protocol("not an etcd call".into())),
        }
    }

    /// Elsewhere in the cluster, or a moment later, the call may succeed
    /// (a member without quorum, a leader election, a member that is down).
    fn retries(&self, error: &StoreError) -> bool {
        matches!(error, StoreError::Timeout | StoreError::Unavailable(_) | StoreError::Busy)
    }
}

#[cfg(any(test, feature = "testing"))]
impl Etcd<'_> {
    /// An answer etcd could give to `op`'s txn that means `reply`. For tests.
    pub fn answer(&self, op: &Op, nonce: &str, copied: Option<&Copied>, reply: &Reply) -> Option<Vec<u8>> {
        let k = self.keys(op.sid());
        let (leaves, owner, state): (&[Leaf], _, _) = match reply {
            Reply::Stored => (&[Leaf::Stored], None, None),
            Reply::Busy => (&[Leaf::Busy], None, None),
            Reply::Taken => (&[Leaf::Taken], None, None),
            Reply::Ended => (&[Leaf::Ended, Leaf::Moved], Some(TOMBSTONE.to_string()), None),
            Reply::Acquired { state } => (&[Leaf::Acquired], None, state.clone()),
            Reply::Moved { owner } => (&[Leaf::Moved], Some(owner.clone()), None),
            Reply::Conflict { owner } => (&[Leaf::Conflict], owner.clone(), None),
        };
        let value = |key: &str| match key {
            _ if key == k.call => Some(nonce.to_string()),
            _ if key == k.owner => owner.clone(),
            _ if key == k.state => state.clone(),
            _ => None,
        };
        let tree = tree(op, &k, &self.new_keys(op), nonce, 0, copied);
        let candidates = leaves.iter().flat_map(|leaf| txn::answers(&tree, *leaf, &value));
        let mut bodies = candidates.filter_map(|answer| serde_json::to_vec(&answer).ok());
        bodies.find(|body| self.txn_reply(op, nonce, copied, body, 0).as_ref() == Ok(reply))
    }
}

#[cfg(test)]
mod tests;
