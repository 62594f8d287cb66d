//! The etcd dialect without etcd: its calls, its answers and what it
//! remembers. `filter/tests/etcd_semantics.rs` runs the same trees on a real
//! etcd.

use super::*;

const SID: &str = "AAAAAAAAAAAAAAAAAAAAAA";
const OTHER_SID: &str = "BBBBBBBBBBBBBBBBBBBBBB";
const NOW_MS: u64 = 1_800_000_000_000;
const LOGIN: &[u8] = br#"{"name":"proxy","password":"pw"}"#;

fn login() -> Secret {
    Secret(LOGIN.to_vec())
}

fn etcd(login: Option<&Secret>) -> Etcd<'_> {
    Etcd::new("sa:", 60_000, login)
}

fn begin(sid: &str) -> Op {
    Op::Begin { sid: sid.into(), from: "10.0.0.1:80#a".into(), lease: "L1".into(), lease_ms: 10_000 }
}

fn rotate(state: Option<&str>) -> Op {
    Op::Rotate {
        sid: SID.into(),
        new_sid: OTHER_SID.into(),
        from: "h:1#a".into(),
        lease: Some("L1".into()),
        to: "h:2#b".into(),
        state: state.map(str::to_string),
        ttl_ms: 60_000,
        tombstone_ms: 60_000,
    }
}

/// Every operation, with the replies each can give.
fn cases() -> Vec<(Op, Vec<Reply>)> {
    let owner = || Some("10.0.0.2:80#b".to_string());
    vec![
        (
            begin(SID),
            vec![
                Reply::Acquired { state: None },
                Reply::Acquired { state: Some("st".into()) },
                Reply::Moved { owner: "10.0.0.2:80#b".into() },
                Reply::Busy,
                Reply::Ended,
            ],
        ),
        (
            Op::Commit { sid: SID.into(), lease: "L1".into(), to: "h:2#b".into(), state: Some("st".into()), ttl_ms: 60_000 },
            vec![Reply::Stored, Reply::Conflict { owner: owner() }, Reply::Conflict { owner: None }],
        ),
        (Op::Commit { sid: SID.into(), lease: "L1".into(), to: "h:2#b".into(), state: None, ttl_ms: 60_000 }, vec![Reply::Stored, Reply::Conflict { owner: owner() }]),
        (
            Op::Write { sid: SID.into(), from: "h:1#a".into(), to: "h:1#a".into(), state: Some("st".into()), ttl_ms: 60_000 },
            vec![Reply::Stored, Reply::Ended, Reply::Conflict { owner: owner() }],
        ),
        (Op::Write { sid: SID.into(), from: "h:1#a".into(), to: "h:2#b".into(), state: None, ttl_ms: 60_000 }, vec![Reply::Stored]),
        (Op::Touch { sid: SID.into(), owner: "h:1#a".into(), ttl_ms: 60_000 }, vec![Reply::Stored]),
        (Op::Release { sid: SID.into(), lease: "L1".into() }, vec![Reply::Stored]),
        (Op::End { sid: SID.into(), owner: "h:1#a".into(), lease: None, tombstone_ms: 60_000 }, vec![Reply::Stored, Reply::Conflict { owner: owner() }]),
        (Op::End { sid: SID.into(), owner: "h:1#a".into(), lease: Some("L1".into()), tombstone_ms: 60_000 }, vec![Reply::Stored, Reply::Conflict { owner: owner() }]),
        (rotate(Some("st")), vec![Reply::Stored, Reply::Taken, Reply::Conflict { owner: owner() }, Reply::Conflict { owner: None }]),
    ]
}

/// Memory as after a login and the grant of `op`'s lease.
fn ready(e: &Etcd<'_>, op: &Op) -> (Memory, u64) {
    let mut memory = Memory { token: Some(Secret(b"tok".to_vec())), leases: Vec::new() };
    let bucket = e.bucket(op, NOW_MS);
    memory.remember(bucket, 77, NOW_MS / 60_000);
    (memory, bucket)
}

/// The call of `op` at `step`, now.
fn at<'a>(op: &'a Op, step: &'a Step, nonce: &'a str) -> Exchange<'a> {
    Exchange { op, step, nonce, now_ms: NOW_MS }
}

fn txn_step() -> Step {
    Step::Txn { lease: 77, copied: None }
}

#[test]
fn an_operation_logs_in_then_grants_its_lease_then_sends_its_txn() {
    let login = login();
    let e = etcd(Some(&login));
    let op = begin(SID);
    let mut memory = Memory::default();
    assert_eq!(e.first_step(&op, &memory, NOW_MS), Step::Login);
    let request = e.request(at(&op, &Step::Login, "n"), &memory);
    assert_eq!((request.path.as_str(), request.authorization, request.body.as_slice()), ("/v3/auth/authenticate", None, LOGIN));

    let next = e.reply(at(&op, &Step::Login, "n"), 200, br#"{"header":{},"token":"tok.1"}"#, &mut memory).unwrap();
    let bucket = (NOW_MS + 10_000) / 60_000 + 1;
    assert_eq!(next, Next::Call(Step::Grant { bucket }));
    let request = e.request(at(&op, &Step::Grant { bucket }, "n"), &memory);
    let ttl = (bucket * 60_000 - NOW_MS).div_ceil(1000) + 1;
    assert_eq!((request.path.as_str(), request.authorization.as_deref()), ("/v3/lease/grant", Some("tok.1")));
    assert_eq!(request.body, format!("{{\"TTL\":{ttl}}}").into_bytes());
    assert!(ttl * 1000 >= 10_000 && ttl * 1000 <= 10_000 + 60_000 + 2000, "the lease outlives the key by less than a bucket: {ttl}s");

    let next = e.reply(at(&op, &Step::Grant { bucket }, "n"), 200, br#"{"header":{},"ID":"7587","TTL":"51"}"#, &mut memory).unwrap();
    assert_eq!(next, Next::Call(Step::Txn { lease: 7587, copied: None }));
    let request = e.request(at(&op, &Step::Txn { lease: 7587, copied: None }, "n"), &memory);
    assert_eq!((request.path.as_str(), request.content_type), ("/v3/kv/txn", "application/json"));
    let body = String::from_utf8(request.body).unwrap();
    assert!(body.contains(r#""lease":"7587""#) && body.contains(&STANDARD.encode(format!("sa:{SID}:lease"))), "{body}");
    // Later operations of the worker go straight to their txn.
    assert_eq!(e.first_step(&begin(OTHER_SID), &memory, NOW_MS + 1000), Step::Txn { lease: 7587, copied: None });
}

#[test]
fn without_auth_no_login_and_no_token() {
    let e = etcd(None);
    let op = begin(SID);
    let memory = Memory::default();
    let step = e.first_step(&op, &memory, NOW_MS);
    assert!(matches!(step, Step::Grant { .. }));
    assert_eq!(e.request(at(&op, &step, "n"), &memory).authorization, None);
}

#[test]
fn every_reply_of_every_operation_reads_back() {
    let e = etcd(None);
    for (op, replies) in cases() {
        let (mut memory, _) = ready(&e, &op);
        for reply in replies {
            let answer = e.answer(&op, "n0nce", None, &reply).unwrap_or_else(|| panic!("no answer {reply:?} to {op:?}"));
            assert_eq!(e.reply(at(&op, &txn_step(), "n0nce"), 200, &answer, &mut memory), Ok(Next::Done(reply.clone())), "{op:?}");
        }
    }
    // Answers an operation cannot give are not in its tree.
    assert!(e.answer(&cases()[3].0, "n", None, &Reply::Busy).is_none());
}

#[test]
fn an_answer_to_another_call_or_session_is_never_used() {
    let e = etcd(None);
    for (op, replies) in cases() {
        let (mut memory, _) = ready(&e, &op);
        let Some(reply) = replies.last() else { continue };
        let for_other_call = e.answer(&op, "other-nonce", None, reply).unwrap();
        let result = e.reply(at(&op, &txn_step(), "n0nce"), 200, &for_other_call, &mut memory);
        assert!(matches!(result, Err(StoreError::Mismatch(_))), "{op:?}: {result:?}");
    }
    let op = begin(SID);
    let (mut memory, _) = ready(&e, &op);
    let other_session = e.answer(&begin(OTHER_SID), "n0nce", None, &Reply::Acquired { state: Some("theirs".into()) }).unwrap();
    let result = e.reply(at(&op, &txn_step(), "n0nce"), 200, &other_session, &mut memory);
    assert!(matches!(result, Err(StoreError::Mismatch(_))), "{result:?}");
    for body in [&br#"{"header":{},"succeeded":true}"#[..], br#"{"header":{},"ID":"1"}"#, br#"{"responses":[{"response_put":{}}]}"#] {
        let result = e.reply(at(&op, &txn_step(), "n0nce"), 200, body, &mut memory);
        assert!(matches!(result, Err(StoreError::Mismatch(_))), "{result:?}");
    }
    let result = e.reply(at(&op, &txn_step(), "n0nce"), 200, b"<html>", &mut memory);
    assert!(matches!(result, Err(StoreError::Protocol(_))), "{result:?}");
}

#[test]
fn an_answer_of_the_wrong_shape_is_refused_even_with_the_right_nonce() {
    let e = etcd(None);
    let op = Op::Touch { sid: SID.into(), owner: "h:1#a".into(), ttl_ms: 60_000 };
    let (mut memory, _) = ready(&e, &op);
    // A begin's answer carrying the touch's nonce under the same call key.
    let begin_answer = e.answer(&begin(SID), "n0nce", None, &Reply::Busy).unwrap();
    let result = e.reply(at(&op, &txn_step(), "n0nce"), 200, &begin_answer, &mut memory);
    assert!(matches!(result, Err(StoreError::Protocol(_))), "{result:?}");
}

#[test]
fn a_rotation_that_moves_the_stored_state_reads_it_and_fences_on_its_revision() {
    let e = etcd(None);
    let op = rotate(None);
    let (mut memory, _) = ready(&e, &op);
    assert_eq!(e.first_step(&op, &memory, NOW_MS), Step::Read);
    let request = e.request(at(&op, &Step::Read, "n"), &memory);
    assert_eq!(request.path, "/v3/kv/range");
    let read = format!(r#"{{"kvs":[{{"key":"{}","value":"{}","mod_revision":"12"}}],"count":"1"}}"#, STANDARD.encode(format!("sa:{SID}:state")), STANDARD.encode("st"));
    let copied = Copied { state: Some("st".into()), mod_revision: 12 };
    let step = Step::Txn { lease: 77, copied: Some(copied.clone()) };
    assert_eq!(e.reply(at(&op, &Step::Read, "n"), 200, read.as_bytes(), &mut memory), Ok(Next::Call(step.clone())));
    let body = String::from_utf8(e.request(at(&op, &step, "n"), &memory).body).unwrap();
    assert!(body.contains(r#""target":"MOD","result":"EQUAL","mod_revision":"12""#), "{body}");
    assert!(body.contains(&format!(r#""value":"{}""#, STANDARD.encode("st"))), "the new id gets the state read: {body}");
    // The state changed between the read and the txn: refused, nothing moved.
    let changed = e.answer(&op, "n", Some(&copied), &Reply::Conflict { owner: Some("h:1#a".into()) }).unwrap();
    assert_eq!(e.reply(at(&op, &step, "n"), 200, &changed, &mut memory), Ok(Next::Done(Reply::Conflict { owner: Some("h:1#a".into()) })));
    // Nothing stored: the txn checks the state key is still absent.
    let nothing = br#"{"header":{}}"#;
    assert_eq!(e.reply(at(&op, &Step::Read, "n"), 200, nothing, &mut memory), Ok(Next::Call(Step::Txn { lease: 77, copied: Some(Copied { state: None, mod_revision: 0 }) })));
    // A read answered for another session's key is not used.
    let theirs = format!(r#"{{"kvs":[{{"key":"{}","value":"eA==","mod_revision":"3"}}]}}"#, STANDARD.encode(format!("sa:{OTHER_SID}:state")));
    assert!(matches!(e.reply(at(&op, &Step::Read, "n"), 200, theirs.as_bytes(), &mut memory), Err(StoreError::Mismatch(_))));
}

#[test]
fn a_rejected_token_is_renewed_and_the_call_made_again() {
    let login = login();
    let e = etcd(Some(&login));
    let op = begin(SID);
    for (status, body) in [
        (401, &br#"{"error":"etcdserver: invalid auth token","code":16}"#[..]),
        (400, br#"{"error":"etcdserver: user name is empty","code":3}"#),
        (400, br#"{"error":"etcdserver: revision of auth store is old","code":3}"#),
    ] {
        let (mut memory, _) = ready(&e, &op);
        assert_eq!(e.reply(at(&op, &txn_step(), "n"), status, body, &mut memory), Ok(Next::Call(Step::Login)));
        assert!(memory.token.is_none());
    }
    let (mut memory, _) = ready(&e, &op);
    let wrong = br#"{"error":"etcdserver: authentication failed, invalid user ID or password","code":3}"#;
    let result = e.reply(at(&op, &Step::Login, "n"), 400, wrong, &mut memory);
    assert!(matches!(&result, Err(StoreError::Protocol(m)) if m.contains("store.auth")), "{result:?}");
    assert!(!e.retries(&result.unwrap_err()), "a wrong password is not tried again");
    let denied = e.reply(at(&op, &txn_step(), "n"), 403, br#"{"error":"etcdserver: permission denied","code":7}"#, &mut memory);
    assert!(matches!(&denied, Err(StoreError::Protocol(m)) if m.contains("key_prefix")), "{denied:?}");
    let no_auth = etcd(None);
    let result = no_auth.reply(at(&op, &txn_step(), "n"), 401, b"{}", &mut memory);
    assert!(matches!(&result, Err(StoreError::Protocol(m)) if m.contains("set store.auth")), "{result:?}");
}

#[test]
fn a_lease_etcd_no_longer_has_is_granted_again() {
    let e = etcd(None);
    let op = begin(SID);
    let (mut memory, bucket) = ready(&e, &op);
    let gone = br#"{"error":"etcdserver: requested lease not found","code":5}"#;
    assert_eq!(e.reply(at(&op, &txn_step(), "n"), 404, gone, &mut memory), Ok(Next::Call(Step::Grant { bucket })));
    assert_eq!(memory.lease(bucket), None);
}

#[test]
fn failures_are_tried_again_refusals_are_not() {
    let e = etcd(None);
    let op = begin(SID);
    let (mut memory, _) = ready(&e, &op);
    for (status, retried) in [(503, true), (500, true), (429, true), (400, false), (404, false)] {
        let error = e.reply(at(&op, &txn_step(), "n"), status, br#"{"error":"etcdserver: something"}"#, &mut memory).unwrap_err();
        assert_eq!(e.retries(&error), retried, "{status}: {error:?}");
    }
    assert!(e.retries(&StoreError::Timeout));
    assert!(!e.retries(&StoreError::Mismatch("x".into())));
}

#[test]
fn keys_expire_with_the_bucket_that_covers_their_ttl() {
    let e = etcd(None);
    let bucket_end = |op: &Op| e.bucket(op, NOW_MS) * 60_000;
    let write = Op::Write { sid: SID.into(), from: "a#1".into(), to: "a#1".into(), state: None, ttl_ms: 1_800_000 };
    assert!((NOW_MS + 1_800_000..NOW_MS + 1_800_000 + 60_000).contains(&(bucket_end(&write) - 1)));
    // A release keeps nothing for long, yet never writes with a lease about to end.
    let release = Op::Release { sid: SID.into(), lease: "L".into() };
    assert!(bucket_end(&release) > NOW_MS + MIN_LIFE_MS);
    assert!(ops::stamp(999) < ops::stamp(1000), "lease ends compare as times");
}
