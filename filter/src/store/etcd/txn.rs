//! etcd transactions as trees. A tree is rendered as the JSON gateway's
//! `/v3/kv/txn` request, and walked again over the answer to find which
//! branches etcd took: every branch ends in a [`Leaf`] (or a nested txn that
//! does), so the answer's meaning is read off the request itself.
//!
//! etcd evaluates every comparison of the tree against the store as it was
//! before the txn, then applies the taken branches' writes at one revision:
//! the whole tree is one atomic step.

use std::fmt::Write;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;

/// A condition on one key; a txn's conditions must all hold. A value
/// comparison on a missing key is false, whatever the operator.
#[derive(Debug, Clone)]
pub enum Cmp {
    Value(String, Order, String),
    /// The key does not exist (version 0).
    Absent(String),
    Present(String),
    /// The key's last write was at this revision.
    ModRevision(String, u64),
}

#[derive(Debug, Clone, Copy)]
pub enum Order {
    Equal,
    NotEqual,
    /// Byte order: for fixed-width decimal numbers, numeric order.
    Greater,
}

/// One operation of a branch. Everything a tree writes expires with one lease.
#[derive(Debug, Clone)]
pub enum Do {
    Put(String, String),
    /// Re-attaches the key to the lease, keeping its value (the key must exist).
    Keep(String),
    Delete(String),
    Range(String),
    Txn(Box<Txn>),
}

/// What a branch means when it is the deepest one taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Stored,
    Conflict,
    Ended,
    /// The owner key is someone else's (or a tombstone).
    Moved,
    Busy,
    Acquired,
    Taken,
}

#[derive(Debug, Clone)]
pub struct Branch {
    pub ops: Vec<Do>,
    /// None: a nested txn in `ops` says.
    pub leaf: Option<Leaf>,
}

#[derive(Debug, Clone)]
pub struct Txn {
    pub compare: Vec<Cmp>,
    pub success: Branch,
    pub failure: Branch,
}

impl Txn {
    /// The request body, every write attached to `lease`.
    pub fn render(&self, lease: u64) -> Vec<u8> {
        let mut out = String::with_capacity(2048);
        self.render_into(lease, &mut out);
        out.into_bytes()
    }

    fn render_into(&self, lease: u64, out: &mut String) {
        out.push_str("{\"compare\":[");
        for (i, cmp) in self.compare.iter().enumerate() {
            comma(out, i);
            cmp.render(out);
        }
        for (name, branch) in [("success", &self.success), ("failure", &self.failure)] {
            let _ = write!(out, "],\"{name}\":[");
            for (i, op) in branch.ops.iter().enumerate() {
                comma(out, i);
                op.render(lease, out);
            }
        }
        out.push_str("]}");
    }
}

fn comma(out: &mut String, index: usize) {
    if index > 0 {
        out.push(',');
    }
}

/// `"key":"<base64>"`.
fn key(out: &mut String, key: &str) {
    out.push_str("\"key\":\"");
    STANDARD.encode_string(key, out);
    out.push('"');
}

impl Cmp {
    fn render(&self, out: &mut String) {
        out.push('{');
        match self {
            Cmp::Value(k, order, value) => {
                key(out, k);
                let result = match order {
                    Order::Equal => "EQUAL",
                    Order::NotEqual => "NOT_EQUAL",
                    Order::Greater => "GREATER",
                };
                let _ = write!(out, ",\"target\":\"VALUE\",\"result\":\"{result}\",\"value\":\"");
                STANDARD.encode_string(value, out);
                out.push('"');
            }
            Cmp::Absent(k) => {
                key(out, k);
                out.push_str(",\"target\":\"VERSION\",\"result\":\"EQUAL\",\"version\":\"0\"");
            }
            Cmp::Present(k) => {
                key(out, k);
                out.push_str(",\"target\":\"VERSION\",\"result\":\"GREATER\",\"version\":\"0\"");
            }
            Cmp::ModRevision(k, revision) => {
                key(out, k);
                let _ = write!(out, ",\"target\":\"MOD\",\"result\":\"EQUAL\",\"mod_revision\":\"{revision}\"");
            }
        }
        out.push('}');
    }
}

impl Do {
    fn render(&self, lease: u64, out: &mut String) {
        match self {
            Do::Put(k, value) => {
                out.push_str("{\"request_put\":{");
                key(out, k);
                out.push_str(",\"value\":\"");
                STANDARD.encode_string(value, out);
                let _ = write!(out, "\",\"lease\":\"{lease}\"}}}}");
            }
            Do::Keep(k) => {
                out.push_str("{\"request_put\":{");
                key(out, k);
                let _ = write!(out, ",\"ignore_value\":true,\"lease\":\"{lease}\"}}}}");
            }
            Do::Delete(k) => {
                out.push_str("{\"request_delete_range\":{");
                key(out, k);
                out.push_str("}}");
            }
            Do::Range(k) => {
                out.push_str("{\"request_range\":{");
                key(out, k);
                out.push_str("}}");
            }
            Do::Txn(txn) => {
                out.push_str("{\"request_txn\":");
                txn.render_into(lease, out);
                out.push('}');
            }
        }
    }
}

/// Any answer of the gateway, read into one shape: a txn's (`succeeded`,
/// `responses`), a range's (`kvs`), a login's (`token`), a lease grant's
/// (`ID`) or an error (`error`). The gateway leaves out false, zero and empty
/// fields. One type for all keeps the module small.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Body {
    pub succeeded: bool,
    pub responses: Vec<Response>,
    pub kvs: Vec<KeyValue>,
    pub token: String,
    /// Lease ids are int64, as decimal strings.
    #[serde(rename = "ID")]
    pub id: String,
    pub error: String,
}

/// One entry of a txn's `responses`: one of these is there.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Response {
    pub response_range: Option<Body>,
    pub response_put: Option<IgnoredAny>,
    pub response_delete_range: Option<IgnoredAny>,
    pub response_txn: Option<Body>,
}

/// Keys and values in base64, numbers as decimal strings.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub mod_revision: String,
}

/// A key's value as a range read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub value: String,
    pub mod_revision: u64,
}

impl Body {
    /// A range's value of `key`, if it exists; an answer about any other key is refused.
    pub fn value_of(&self, wanted: &str) -> Result<Option<Found>, String> {
        let Some(kv) = self.kvs.first() else { return Ok(None) };
        let decode = |text: &str| STANDARD.decode(text).ok().and_then(|bytes| String::from_utf8(bytes).ok());
        let name = decode(&kv.key).ok_or("a key that is not base64 text")?;
        if name != wanted || self.kvs.len() > 1 {
            return Err(format!("a read of {wanted:?} answered with key {name:?}"));
        }
        let value = decode(&kv.value).ok_or("a value that is not base64 text")?;
        let mod_revision = kv.mod_revision.parse().map_err(|_| "a mod_revision that is not a number")?;
        Ok(Some(Found { value, mod_revision }))
    }
}

/// What the ranges of a txn read, in order: (key, value if it exists).
pub type Reads = Vec<(String, Option<Found>)>;

/// Walks `reply` along `txn`: the leaf of the deepest branch taken; adds
/// what every range on the way read to `reads`.
pub fn walk(txn: &Txn, reply: &Body, reads: &mut Reads) -> Result<Leaf, String> {
    let branch = if reply.succeeded { &txn.success } else { &txn.failure };
    if branch.ops.len() != reply.responses.len() {
        return Err(format!("{} answers to {} operations", reply.responses.len(), branch.ops.len()));
    }
    let mut leaf = branch.leaf;
    for (op, answer) in branch.ops.iter().zip(&reply.responses) {
        match (op, answer) {
            (Do::Range(key), Response { response_range: Some(range), .. }) => reads.push((key.clone(), range.value_of(key)?)),
            (Do::Txn(nested), Response { response_txn: Some(nested_reply), .. }) => leaf = Some(walk(nested, nested_reply, reads)?),
            (Do::Put(..) | Do::Keep(_), Response { response_put: Some(_), .. }) | (Do::Delete(_), Response { response_delete_range: Some(_), .. }) => {}
            _ => return Err("an answer of another kind than the operation".into()),
        }
    }
    leaf.ok_or_else(|| "a branch without an outcome".into())
}

#[cfg(any(test, feature = "testing"))]
type Way = (Vec<serde_json::Value>, Option<Leaf>);

/// Every answer etcd could give to `txn` that ends in `want`, each range
/// finding `value(key)`. For tests.
#[cfg(any(test, feature = "testing"))]
pub fn answers(txn: &Txn, want: Leaf, value: &dyn Fn(&str) -> Option<String>) -> Vec<serde_json::Value> {
    use serde_json::json;
    let mut found = Vec::new();
    for (succeeded, branch) in [(true, &txn.success), (false, &txn.failure)] {
        // Every way through the branch so far: (responses, leaf).
        let mut ways: Vec<Way> = vec![(Vec::new(), branch.leaf)];
        for op in &branch.ops {
            let answer = match op {
                Do::Put(..) | Do::Keep(_) => json!({"response_put": {"header": {}}}),
                Do::Delete(_) => json!({"response_delete_range": {"header": {}}}),
                Do::Range(key) => {
                    let kv = value(key).map(|v| json!({"key": STANDARD.encode(key), "value": STANDARD.encode(v), "mod_revision": "5"}));
                    json!({"response_range": {"header": {}, "kvs": kv.into_iter().collect::<Vec<_>>()}})
                }
                Do::Txn(nested) => {
                    let nested = answers(nested, want, value);
                    ways = ways.into_iter().flat_map(|(done, _)| nested.iter().map(move |n| ([done.clone(), vec![json!({"response_txn": n})]].concat(), Some(want)))).collect();
                    continue;
                }
            };
            ways.iter_mut().for_each(|(done, _)| done.push(answer.clone()));
        }
        let whole = ways.into_iter().filter(|(_, leaf)| *leaf == Some(want));
        found.extend(whole.map(|(responses, _)| json!({"header": {"revision": "5"}, "succeeded": succeeded, "responses": responses})));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Txn {
        Txn {
            compare: vec![Cmp::Value("k".into(), Order::NotEqual, "v".into()), Cmp::Absent("a".into())],
            success: Branch { ops: vec![Do::Put("k".into(), "v".into()), Do::Range("k".into())], leaf: Some(Leaf::Stored) },
            failure: Branch {
                ops: vec![Do::Txn(Box::new(Txn {
                    compare: vec![Cmp::ModRevision("k".into(), 7), Cmp::Present("k".into())],
                    success: Branch { ops: vec![Do::Keep("k".into()), Do::Delete("a".into())], leaf: Some(Leaf::Busy) },
                    failure: Branch { ops: vec![], leaf: Some(Leaf::Taken) },
                }))],
                leaf: None,
            },
        }
    }

    #[test]
    fn renders_the_gateway_json_with_base64_keys_and_one_lease() {
        let json: serde_json::Value = serde_json::from_slice(&sample().render(42)).unwrap();
        let expected = serde_json::json!({
            "compare": [
                {"key": "aw==", "target": "VALUE", "result": "NOT_EQUAL", "value": "dg=="},
                {"key": "YQ==", "target": "VERSION", "result": "EQUAL", "version": "0"}],
            "success": [
                {"request_put": {"key": "aw==", "value": "dg==", "lease": "42"}},
                {"request_range": {"key": "aw=="}}],
            "failure": [{"request_txn": {
                "compare": [
                    {"key": "aw==", "target": "MOD", "result": "EQUAL", "mod_revision": "7"},
                    {"key": "aw==", "target": "VERSION", "result": "GREATER", "version": "0"}],
                "success": [
                    {"request_put": {"key": "aw==", "ignore_value": true, "lease": "42"}},
                    {"request_delete_range": {"key": "YQ=="}}],
                "failure": []}}]
        });
        assert_eq!(json, expected);
    }

    fn walked(reply: &str) -> Result<(Leaf, Reads), String> {
        let reply: Body = serde_json::from_str(reply).unwrap();
        let mut reads = Vec::new();
        walk(&sample(), &reply, &mut reads).map(|leaf| (leaf, reads))
    }

    #[test]
    fn walking_the_answer_finds_the_branch_taken_and_what_it_read() {
        let (leaf, reads) = walked(
            r#"{"header":{},"succeeded":true,"responses":[{"response_put":{"header":{}}},
                {"response_range":{"kvs":[{"key":"aw==","value":"dg==","mod_revision":"9","version":"1"}],"count":"1"}}]}"#,
        )
        .unwrap();
        assert_eq!((leaf, reads), (Leaf::Stored, vec![("k".into(), Some(Found { value: "v".into(), mod_revision: 9 }))]));
        let nested = r#"{"responses":[{"response_txn":{"header":{},"succeeded":true,"responses":[{"response_put":{}},{"response_delete_range":{}}]}}]}"#;
        assert_eq!(walked(nested).unwrap().0, Leaf::Busy);
        assert_eq!(walked(r#"{"responses":[{"response_txn":{"header":{}}}]}"#).unwrap().0, Leaf::Taken);
    }

    #[test]
    fn an_answer_that_does_not_fit_the_request_is_refused() {
        for reply in [
            r#"{"succeeded":true,"responses":[{"response_put":{}}]}"#,
            r#"{"succeeded":true,"responses":[{"response_put":{}},{"response_put":{}}]}"#,
            r#"{"responses":[{"response_range":{}}]}"#,
            r#"{"succeeded":true,"responses":[{"response_put":{}},{"response_range":{"kvs":[{"key":"b3RoZXI=","mod_revision":"1"}]}}]}"#,
        ] {
            assert!(walked(reply).is_err(), "{reply}");
        }
    }
}
