//! The etcd dialect against a real etcd (one member on 127.0.0.1, with auth
//! enabled): every operation through `store::Client`, as a worker makes it
//! (login, lease grant, read, txn), with the guarantees of the webdis Lua
//! scripts. Skipped when `etcd` is not installed, except under CI.

// The helpers of a test may fail the test like its body does (the lints
// allow this inside `#[test]` functions only).
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use session_affinity::config::Config;
use session_affinity::store::{Client, Memory, Op, Progress, Reply, StoreError, MAX_CALLS};

const PREFIX: &str = "sa:";
const PASSWORD: &str = "proxy-password";
const A: &str = "127.0.0.1:1#a";
const B: &str = "127.0.0.1:2#b";

/// One etcd member, killed and its data removed on drop.
struct Etcd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    fn start() -> Option<Etcd> {
        if Command::new("etcd").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(std::env::var_os("CI").is_none(), "etcd is not installed (`.ci/setup tests` installs it)");
            eprintln!("etcd is not installed; skipping");
            return None;
        }
        let (port, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("sa-etcd-store-{}-{port}", std::process::id()));
        let client = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let etcd = Etcd { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd.get_health() != Some(true) {
            assert!(Instant::now() < deadline, "etcd not healthy within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // A user whose role may only touch the key prefix, then auth on.
        for (path, body) in [
            ("/v3/auth/user/add", r#"{"name":"root","password":"root-password"}"#.to_string()),
            ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#.into()),
            ("/v3/auth/role/add", r#"{"name":"session-affinity"}"#.into()),
            ("/v3/auth/role/grant", format!(r#"{{"name":"session-affinity","perm":{{"permType":"READWRITE","key":"{}","range_end":"{}"}}}}"#, STANDARD.encode(PREFIX), STANDARD.encode("sa;"))),
            ("/v3/auth/user/add", format!(r#"{{"name":"proxy","password":"{PASSWORD}"}}"#)),
            ("/v3/auth/user/grant", r#"{"user":"proxy","role":"session-affinity"}"#.into()),
            ("/v3/auth/enable", "{}".into()),
        ] {
            let (status, answer) = etcd.post(path, &[], body.as_bytes());
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
        }
        Some(etcd)
    }

    fn get_health(&self) -> Option<bool> {
        let (status, body) = http(self.port, "GET", "/health", &[], b"").ok()?;
        Some(status == 200 && String::from_utf8_lossy(&body).contains("true"))
    }

    fn post(&self, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u32, Vec<u8>) {
        http(self.port, "POST", path, headers, body).unwrap()
    }

    /// A key's value and lease id, read as root.
    fn read(&self, key: &str) -> Option<(String, String)> {
        let (_, token) = self.post("/v3/auth/authenticate", &[], br#"{"name":"root","password":"root-password"}"#);
        let token: serde_json::Value = serde_json::from_slice(&token).unwrap();
        let auth = [("authorization", token["token"].as_str().unwrap().to_string())];
        let (_, body) = self.post("/v3/kv/range", &auth, format!(r#"{{"key":"{}"}}"#, STANDARD.encode(key)).as_bytes());
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let kv = body["kvs"].get(0)?;
        let value = String::from_utf8(STANDARD.decode(kv["value"].as_str().unwrap_or("")).unwrap()).unwrap();
        Some((value, kv["lease"].as_str().unwrap_or("0").to_string()))
    }
}

/// One HTTP/1.0 exchange (no chunked answers), bounded in time.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nhost: etcd\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let status = String::from_utf8_lossy(&answer[..split]).split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, answer[split + 4..].to_vec()))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A worker of one proxy: its store client and memory.
struct Worker {
    config: Config,
    memory: Memory,
    nonces: u32,
    calls: Vec<String>,
}

impl Worker {
    fn new() -> Worker {
        let json = format!(
            r#"{{"keys":[{{"id":"k","secret":"0123456789abcdef0123456789abcdef"}}],
                "store":{{"cluster":"etcd","dialect":"etcd","etcd":{{"lease_bucket":"10s"}},"auth":{{"username":"proxy","password":"{PASSWORD}"}}}}}}"#
        );
        Worker { config: Config::parse(json.as_bytes(), &|_| None).unwrap(), memory: Memory::default(), nonces: 0, calls: Vec::new() }
    }

    /// Runs `op` to its end, call by call, as the filter's worker does.
    fn run(&mut self, etcd: &Etcd, op: Op) -> Result<Reply, StoreError> {
        let client = Client::new(self.config.store.as_ref().unwrap());
        self.nonces += 1;
        let mut call = client.call(op, format!("nonce-{}-{}", self.nonces, now_ms()), &self.memory, now_ms());
        for _ in 0..MAX_CALLS {
            let path = call.headers.iter().find(|(n, _)| *n == ":path").unwrap().1.clone();
            self.calls.push(path.clone());
            let headers: Vec<(&str, String)> = call.headers.iter().filter(|(n, _)| !n.starts_with(':')).cloned().collect();
            let (status, body) = etcd.post(&path, &headers, &call.body);
            call = match client.reply(&call, Some(status), &body, 1, &mut self.memory, now_ms())? {
                Progress::Done(reply) => return Ok(reply),
                Progress::Call(next) => next,
                Progress::Retry { error, .. } => return Err(error),
            };
        }
        panic!("more than {MAX_CALLS} calls");
    }
}

fn sid(n: u32) -> String {
    format!("{n:0>22}")
}

fn begin(sid: &str, from: &str, lease: &str, lease_ms: u64) -> Op {
    Op::Begin { sid: sid.into(), from: from.into(), lease: lease.into(), lease_ms }
}

fn commit(sid: &str, lease: &str, to: &str, state: Option<&str>) -> Op {
    Op::Commit { sid: sid.into(), lease: lease.into(), to: to.into(), state: state.map(str::to_string), ttl_ms: 60_000 }
}

fn write(sid: &str, from: &str, to: &str, state: Option<&str>) -> Op {
    Op::Write { sid: sid.into(), from: from.into(), to: to.into(), state: state.map(str::to_string), ttl_ms: 60_000 }
}

fn end(sid: &str, owner: &str, lease: Option<&str>) -> Op {
    Op::End { sid: sid.into(), owner: owner.into(), lease: lease.map(str::to_string), tombstone_ms: 60_000 }
}

fn rotate(sid: &str, new_sid: &str, from: &str, lease: Option<&str>, state: Option<&str>) -> Op {
    let state = state.map(str::to_string);
    Op::Rotate { sid: sid.into(), new_sid: new_sid.into(), from: from.into(), lease: lease.map(str::to_string), to: B.into(), state, ttl_ms: 60_000, tombstone_ms: 60_000 }
}

fn acquired(state: Option<&str>) -> Result<Reply, StoreError> {
    Ok(Reply::Acquired { state: state.map(str::to_string) })
}

fn conflict(owner: Option<&str>) -> Result<Reply, StoreError> {
    Ok(Reply::Conflict { owner: owner.map(str::to_string) })
}

#[test]
fn every_operation_keeps_the_webdis_guarantees_on_a_real_etcd() {
    let Some(etcd) = Etcd::start() else { return };
    let (mut p1, mut p2) = (Worker::new(), Worker::new());
    let s = sid(1);

    // A first write creates the session; the first call of a worker logs in and grants a lease.
    assert_eq!(p1.run(&etcd, write(&s, A, A, Some("st1"))), Ok(Reply::Stored));
    assert_eq!(p1.calls, ["/v3/auth/authenticate", "/v3/lease/grant", "/v3/kv/txn"]);
    assert_eq!(p1.run(&etcd, write(&s, B, B, Some("zombie"))), conflict(Some(A)), "a host that does not own it");

    // Failover: one lease at a time; another proxy waits; ours may ask again.
    assert_eq!(p1.run(&etcd, begin(&s, A, "L1", 10_000)), acquired(Some("st1")));
    assert_eq!(p2.run(&etcd, begin(&s, A, "L2", 10_000)), Ok(Reply::Busy));
    assert_eq!(p1.run(&etcd, begin(&s, A, "L1", 10_000)), acquired(Some("st1")), "a repeated begin keeps our lease");
    assert_eq!(p1.run(&etcd, write(&s, A, A, Some("st-during"))), conflict(Some(A)), "no write while a failover runs");
    assert_eq!(p2.run(&etcd, commit(&s, "L2", B, None)), conflict(Some(A)), "no commit without the lease");
    assert_eq!(p1.run(&etcd, commit(&s, "L1", B, Some("st2"))), Ok(Reply::Stored));
    assert_eq!(p1.run(&etcd, commit(&s, "L1", B, Some("st2"))), Ok(Reply::Stored), "a commit sent again after a lost answer");
    assert_eq!(p2.run(&etcd, begin(&s, A, "L2", 10_000)), Ok(Reply::Moved { owner: B.into() }));
    assert_eq!(p2.run(&etcd, write(&s, B, B, Some("st3"))), Ok(Reply::Stored));
    assert_eq!(etcd.read(&format!("{PREFIX}{s}")).unwrap().0, B);
    assert_eq!(etcd.read(&format!("{PREFIX}{s}:lease")), None, "the commit dropped the lease");

    // A lease that ran out can be taken over.
    assert_eq!(p1.run(&etcd, begin(&s, B, "L3", 1)), acquired(Some("st3")));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(p2.run(&etcd, begin(&s, B, "L4", 10_000)), acquired(Some("st3")));
    assert_eq!(p1.run(&etcd, commit(&s, "L3", A, None)), conflict(Some(B)), "the expired holder lost it");
    assert_eq!(p2.run(&etcd, Op::Release { sid: s.clone(), lease: "L4".into() }), Ok(Reply::Stored));
    assert_eq!(p1.run(&etcd, begin(&s, B, "L5", 10_000)), acquired(Some("st3")), "a released lease is free at once");
    assert_eq!(p1.run(&etcd, commit(&s, "L5", A, None)), Ok(Reply::Stored));
    assert_eq!(etcd.read(&format!("{PREFIX}{s}:state")).unwrap().0, "st3", "a commit without state keeps it");

    // End: fenced on the owner; a failover's lease does not stop it; nothing comes back.
    assert_eq!(p2.run(&etcd, end(&s, B, None)), conflict(Some(A)));
    assert_eq!(p2.run(&etcd, begin(&s, A, "L6", 10_000)), acquired(Some("st3")));
    assert_eq!(p1.run(&etcd, end(&s, A, None)), Ok(Reply::Stored));
    assert_eq!(p1.run(&etcd, end(&s, A, None)), Ok(Reply::Stored), "an end sent again");
    assert_eq!(p2.run(&etcd, commit(&s, "L6", B, Some("revived"))), conflict(None), "the failover under way fails");
    assert_eq!(p2.run(&etcd, begin(&s, A, "L7", 10_000)), Ok(Reply::Ended));
    assert_eq!(p2.run(&etcd, write(&s, A, A, Some("x"))), Ok(Reply::Ended));
    assert_eq!(etcd.read(&format!("{PREFIX}{s}:state")), None);

    // End by the lease holder of a session someone else owns.
    let s2 = sid(2);
    assert_eq!(p1.run(&etcd, write(&s2, A, A, Some("st"))), Ok(Reply::Stored));
    assert_eq!(p2.run(&etcd, begin(&s2, A, "M1", 10_000)), acquired(Some("st")));
    assert_eq!(p2.run(&etcd, end(&s2, B, Some("M1"))), Ok(Reply::Stored));
    assert_eq!(p1.run(&etcd, begin(&s2, A, "M2", 10_000)), Ok(Reply::Ended));
}

#[test]
fn rotation_moves_the_session_atomically_and_refuses_a_taken_id() {
    let Some(etcd) = Etcd::start() else { return };
    let mut p = Worker::new();
    let (old, new, taken) = (sid(10), sid(11), sid(12));
    assert_eq!(p.run(&etcd, write(&old, A, A, Some("st"))), Ok(Reply::Stored));
    assert_eq!(p.run(&etcd, write(&taken, A, A, Some("other"))), Ok(Reply::Stored));
    assert_eq!(p.run(&etcd, rotate(&old, &taken, B, None, None)), conflict(Some(A)), "fenced on the owner");
    assert_eq!(p.run(&etcd, rotate(&old, &taken, A, None, None)), Ok(Reply::Taken));

    // Without new state the stored one moves: a read, then the txn fenced on its revision.
    p.calls.clear();
    assert_eq!(p.run(&etcd, rotate(&old, &new, A, None, None)), Ok(Reply::Stored));
    assert_eq!(p.calls, ["/v3/kv/range", "/v3/kv/txn"]);
    assert_eq!(p.run(&etcd, rotate(&old, &new, A, None, None)), Ok(Reply::Stored), "a rotation sent again");
    assert_eq!(p.run(&etcd, begin(&new, B, "L", 10_000)), acquired(Some("st")));
    assert_eq!(p.run(&etcd, begin(&old, A, "L", 10_000)), Ok(Reply::Ended));

    // With new state, by the failover that holds the lease.
    let (a, b) = (sid(20), sid(21));
    assert_eq!(p.run(&etcd, write(&a, A, A, Some("old-state"))), Ok(Reply::Stored));
    assert_eq!(p.run(&etcd, begin(&a, A, "R1", 10_000)), acquired(Some("old-state")));
    assert_eq!(p.run(&etcd, rotate(&a, &b, A, Some("R1"), Some("bound-to-b"))), Ok(Reply::Stored));
    assert_eq!(etcd.read(&format!("{PREFIX}{b}:state")).unwrap().0, "bound-to-b");
    assert_eq!(etcd.read(&format!("{PREFIX}{a}")).unwrap().0, "ended");
    assert_eq!(etcd.read(&format!("{PREFIX}{a}:lease")), None);
}

#[test]
fn sessions_share_a_few_leases_and_every_key_has_one() {
    let Some(etcd) = Etcd::start() else { return };
    let mut p = Worker::new();
    let mut leases = std::collections::BTreeSet::new();
    for n in 0..20 {
        let s = sid(100 + n);
        assert_eq!(p.run(&etcd, write(&s, A, A, Some("st"))), Ok(Reply::Stored));
        assert_eq!(p.run(&etcd, Op::Touch { sid: s.clone(), owner: A.into(), ttl_ms: 60_000 }), Ok(Reply::Stored));
        for suffix in ["", ":state", ":call"] {
            let (_, lease) = etcd.read(&format!("{PREFIX}{s}{suffix}")).unwrap();
            assert_ne!(lease, "0", "{s}{suffix} has no lease");
            leases.insert(lease);
        }
    }
    assert!(leases.len() <= 3, "20 sessions, {} leases: {leases:?}", leases.len());
    let grants = p.calls.iter().filter(|c| *c == "/v3/lease/grant").count();
    assert_eq!(grants, leases.len(), "one grant per lease, kept by the worker: {:?}", p.calls);
}
