//! A seeded fault-injecting HTTP proxy in front of moto, and `pixtract run` through it (issue 17): 503s, connection
//! resets and stalls on ~10% of requests, plus a few keys whose GETs fail long enough to exhaust the client's own
//! retries. Every document must end up in the output exactly once, without `--force`, and the documents that ran
//! out of retries show it in their `attempt`.
//!
//! Whether a request is hit is a pure function of (seed, request line, how many times this same request line was
//! seen), so the schedule does not depend on thread timing: the same run against the same bucket meets the same
//! faults. (Requests whose line holds run-specific names, e.g. a new Parquet file's key, differ between runs and so
//! meet different faults.)

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pipeline::{duckdb, write_spec};
use crate::util::{Moto, pixtract, repo_root, text, tiny_model};

/// What the proxy does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `503 SlowDown` without forwarding.
    Unavailable,
    /// The connection is reset (RST) after the request was read, without forwarding.
    Reset,
    /// Forwarded after a pause (a slow server).
    Stall,
}

/// The fault schedule.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    pub seed: u64,
    /// Share of requests that meet a fault.
    pub share: f64,
    /// GETs of paths ending in one of these fail with 503 for their first `outage_requests` occurrences.
    pub outage_suffixes: Vec<String>,
    pub outage_requests: u32,
    pub stall: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct FaultStats {
    pub requests: u64,
    pub faults: HashMap<Fault, u64>,
    pub outage_503s: u64,
}

/// A proxy on a free loopback port forwarding to `upstream_port`, one request per connection (it answers
/// `Connection: close`, so the client opens a new connection per request and every request is counted).
pub struct FaultyProxy {
    pub port: u16,
    stats: Arc<Mutex<FaultStats>>,
    stop: Arc<AtomicBool>,
}

/// FNV-1a, then SplitMix64's finaliser: a well-mixed 64-bit hash of text, stable across platforms.
fn hash(seed: u64, text: &str, n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FaultPlan {
    /// The fault for the `n`-th (1-based) occurrence of `request_line`, if any.
    pub fn decide(&self, request_line: &str, n: u64) -> Option<Fault> {
        let h = hash(self.seed, request_line, n);
        let draw = (h >> 11) as f64 / (1u64 << 53) as f64;
        (draw < self.share).then(|| match h % 3 {
            0 => Fault::Unavailable,
            1 => Fault::Reset,
            _ => Fault::Stall,
        })
    }

    fn outage(&self, request_line: &str, n: u64) -> bool {
        let mut parts = request_line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        method == "GET"
            && n <= self.outage_requests as u64
            && self.outage_suffixes.iter().any(|s| path.ends_with(s))
    }
}

impl FaultyProxy {
    pub fn start(upstream_port: u16, plan: FaultPlan) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stats = Arc::new(Mutex::new(FaultStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let plan = Arc::new(plan);
        {
            let (stats, stop) = (stats.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let (stats, seen, plan) = (stats.clone(), seen.clone(), plan.clone());
                            std::thread::spawn(move || {
                                serve(client, upstream_port, &plan, &seen, &stats)
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(e) => panic!("proxy accept: {e}"),
                    }
                }
            });
        }
        FaultyProxy { port, stats, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stats(&self) -> FaultStats {
        self.stats.lock().unwrap().clone()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads one HTTP message head (up to the blank line) and, by its Content-Length, the body.
fn read_message(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "the fault proxy handles Content-Length bodies only: {head}"
    );
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// The head with its `Connection` header replaced by `Connection: close`.
fn closing(head: &str) -> String {
    let mut out: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            !l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        })
        .collect();
    out.push("Connection: close");
    out.join("\r\n") + "\r\n\r\n"
}

/// Closes with a TCP reset (SO_LINGER 0) rather than an orderly FIN.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn serve(
    mut client: TcpStream,
    upstream_port: u16,
    plan: &FaultPlan,
    seen: &Mutex<HashMap<String, u64>>,
    stats: &Mutex<FaultStats>,
) {
    let Some((head, body)) = read_message(&mut client) else {
        return;
    };
    let line = head.lines().next().unwrap_or("").to_string();
    let n = {
        let mut seen = seen.lock().unwrap();
        let n = seen.entry(line.clone()).or_default();
        *n += 1;
        *n
    };
    let (outage, fault) = (plan.outage(&line, n), plan.decide(&line, n));
    {
        let mut s = stats.lock().unwrap();
        s.requests += 1;
        if outage {
            s.outage_503s += 1;
        } else if let Some(f) = fault {
            *s.faults.entry(f).or_default() += 1;
        }
    }
    let unavailable = |mut client: TcpStream| {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        let _ = write!(
            client,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match (outage, fault) {
        (true, _) | (false, Some(Fault::Unavailable)) => return unavailable(client),
        (false, Some(Fault::Reset)) => return reset(client),
        (false, Some(Fault::Stall)) => std::thread::sleep(plan.stall),
        (false, None) => {}
    }
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return unavailable(client);
    };
    if upstream.write_all(closing(&head).as_bytes()).is_err() || upstream.write_all(&body).is_err() {
        return unavailable(client);
    }
    let mut response = Vec::new();
    if upstream.read_to_end(&mut response).is_err() {
        return reset(client);
    }
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return reset(client);
    };
    let head = closing(&String::from_utf8_lossy(&response[..head_end + 4]));
    let _ = client.write_all(head.as_bytes());
    let _ = client.write_all(&response[head_end + 4..]);
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// The plan is deterministic: the same request line and occurrence always meet the same fault, and about
/// `share` of requests meet one.
#[test]
fn fault_plan_is_seeded_and_hits_its_share() {
    let plan = FaultPlan {
        seed: 17,
        share: 0.10,
        outage_suffixes: vec!["/in/doc03.png".into()],
        outage_requests: 7,
        stall: Duration::from_millis(1),
    };
    let lines: Vec<String> = (0..5000)
        .map(|i| format!("GET /flaky/in/doc{i}.png HTTP/1.1"))
        .collect();
    let first: Vec<_> = lines.iter().map(|l| plan.decide(l, 1)).collect();
    let again: Vec<_> = lines.iter().map(|l| plan.decide(l, 1)).collect();
    assert_eq!(first, again);
    let hit = first.iter().filter(|f| f.is_some()).count();
    assert!((400..600).contains(&hit), "{hit} of 5000");
    for kind in [Fault::Unavailable, Fault::Reset, Fault::Stall] {
        assert!(first.iter().filter(|f| **f == Some(kind)).count() > 100, "{kind:?}");
    }
    // Another seed, another schedule.
    let other = FaultPlan { seed: 18, ..plan.clone() };
    assert_ne!(first, lines.iter().map(|l| other.decide(l, 1)).collect::<Vec<_>>());
    assert!(plan.outage("GET /flaky/in/doc03.png HTTP/1.1", 7));
    assert!(!plan.outage("GET /flaky/in/doc03.png HTTP/1.1", 8));
    assert!(!plan.outage("PUT /flaky/in/doc03.png HTTP/1.1", 1));
}

/// N documents on S3 through the faulty proxy, output on S3 through it too: every document exactly once (one row
/// that is not `retry`), no `--force`; the two outage documents ran out of the client's retries in the first run
/// (a `retry` row, attempt 1) and were done by the second; the third run finds nothing to do.
#[test]
fn run_through_a_faulty_s3_gives_every_document_exactly_once() {
    use futures::TryStreamExt;
    use object_store::{ObjectStoreExt, PutPayload};
    let n_docs = 12;
    let moto = Moto::start();
    moto.create_bucket("flaky");
    let store = moto.store("flaky");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refs = ["rgba", "grayscale", "tiny_image", "system_prompt"];
    rt.block_on(async {
        for i in 0..n_docs {
            let bytes =
                std::fs::read(tiny_model().join(format!("reference/{}/image0.png", refs[i % 4])))
                    .unwrap();
            store
                .put(
                    &object_store::path::Path::from(format!("in/doc{i:02}.png")),
                    PutPayload::from(bytes),
                )
                .await
                .unwrap();
        }
    });
    // 1 + 6 retries per request in the client (store::retry_config): 7 failures in a row exhaust them.
    let proxy = FaultyProxy::start(
        moto.port,
        FaultPlan {
            seed: 17,
            share: 0.10,
            outage_suffixes: vec!["/in/doc03.png".into(), "/in/doc08.png".into()],
            outage_requests: 7,
            stall: Duration::from_millis(1500),
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        Path::new("s3://flaky/in/"),
        Path::new("s3://flaky/out/"),
    );
    let mut s = std::fs::read_to_string(&spec).unwrap();
    s.push_str("[limits]\nmax_failed_share = 1.0\n");
    std::fs::write(&spec, s).unwrap();
    let mut env = moto.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut outputs = Vec::new();
    for run in 1..=3 {
        let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
        let t = text(&out);
        println!("run {run}: exit {:?}: {}", out.status.code(), t.lines().last().unwrap_or(""));
        assert!(matches!(out.status.code(), Some(0 | 2)), "run {run}: {t}");
        outputs.push(t);
    }
    assert!(outputs[0].contains(&format!("{n_docs} documents")), "{}", outputs[0]);
    assert!(outputs[1].contains("2 documents"), "{}", outputs[1]);
    assert!(
        outputs[2].contains(&format!("0 documents (0 failed, {n_docs} skipped")),
        "{}",
        outputs[2]
    );
    let stats = proxy.stats();
    println!("proxy: {stats:?}");
    let faults: u64 = stats.faults.values().sum();
    assert!(stats.faults.len() == 3, "every kind of fault was met: {stats:?}");
    assert!(
        (faults as f64) > 0.04 * stats.requests as f64 && (faults as f64) < 0.2 * stats.requests as f64,
        "{stats:?}"
    );
    assert_eq!(stats.outage_503s, 14, "7 per outage document: {stats:?}");

    // The output, copied down (directly from moto) for DuckDB.
    let local = tmp.path().join("copy");
    rt.block_on(async {
        let objects: Vec<_> = store
            .list(Some(&object_store::path::Path::from("out")))
            .try_collect()
            .await
            .unwrap();
        for m in objects.iter().filter(|m| m.location.as_ref().ends_with(".parquet")) {
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            let path = local.join(m.location.as_ref());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    });
    let glob = format!("{}/**/*.parquet", local.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), count(*) FILTER (WHERE status <> 'retry'), \
         string_agg(CASE WHEN status = 'retry' THEN attempt::VARCHAR END, ',') \
         FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY 1 ORDER BY 1"
    ));
    let lines: Vec<&str> = rows.lines().collect();
    assert_eq!(lines.len(), n_docs, "{rows}");
    for l in &lines {
        let f: Vec<&str> = l.split('|').collect();
        assert_eq!(f[1], "1", "exactly one final row per document: {rows}");
        let outage = f[0] == "doc03.png" || f[0] == "doc08.png";
        assert_eq!(f[2] == "1", outage, "a retry row, attempt 1, for outage documents only: {rows}");
    }
}
