//! A bounded soak of the example homeserver under hostile traffic, on loopback only: run it with
//! `scripts/soak.sh short|long`, which builds both in release, starts the homeserver on a free
//! loopback port, runs this driver, and stops the server.
//!
//! ```text
//! soak --addr 127.0.0.1:PORT --secret S [--seconds 5] [--connections 32] [--server-pid PID]
//!      [--server-log FILE] [--probe-p99-ms 500] [--rss-growth-mib 32] [--printed-token T]
//! ```
//!
//! Many connections at once send a mix of valid, expired, forged, attenuated, malformed, missing
//! and conflicting tokens (tokens minted here with the server's secret via `KeyRing::mint` and
//! `attenuate`), including a 100 KiB token, a 100 KiB header beside a valid token and a 60 KiB
//! query; raw TCP connections send what hyper refuses before the layer sees it (a 1 MiB query, a
//! 200 KiB query, a 1 MiB header, 150 headers). Every request's right answer is known in
//! advance and checked:
//!
//! - a request the layer sees gets exactly its status and `errcode` (and `soft_logout`, and
//!   the user for valid ones);
//! - an oversized request that hyper refuses before the layer sees it (its head is bigger than
//!   hyper's ~400 KiB read buffer, its request target longer than the 64 KiB an `http::Uri`
//!   holds, or it has more than 100 headers) may get any 4xx hyper picks (431, 414), or a closed
//!   connection; what is never right is a 5xx, a 2xx, or no answer within 10 s.
//!
//! Meanwhile one probe connection sends a valid request every 10 ms and records its latency, and
//! the server's resident memory (`VmRSS` in `/proc/PID/status`) is sampled every second. The run
//! fails on any wrong answer, 5xx or hang, a probe p99 over the limit, RSS growing more than
//! the limit between the end of the warm-up (a fifth of the run) and the end, or a token found
//! in the server's log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_matrix_auth::{attenuate, Format, KeyRing, MacaroonSecret, TokenType};

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
const DEVICES: &str = "/_matrix/client/v3/devices";
const SERVER_NAME: &str = "localhost";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

struct Options {
    addr: SocketAddr,
    secret: String,
    seconds: u64,
    connections: usize,
    server_pid: Option<u32>,
    server_log: Option<String>,
    probe_p99_ms: u64,
    rss_growth_mib: u64,
    /// The token the homeserver minted and printed at start-up.
    printed_token: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut map = BTreeMap::new();
    while let Some(flag) = args.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or(format!("unexpected argument {flag}"))?;
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        map.insert(name.to_owned(), value);
    }
    let take = |name: &str| map.get(name).cloned();
    let number = |name: &str, default: u64| -> Result<u64, String> {
        take(name).map_or(Ok(default), |v| {
            v.parse().map_err(|_| format!("--{name} {v}"))
        })
    };
    Ok(Options {
        addr: take("addr")
            .ok_or("--addr is required")?
            .parse()
            .map_err(|e| format!("--addr: {e}"))?,
        secret: take("secret").ok_or("--secret is required")?,
        seconds: number("seconds", 5)?,
        connections: number("connections", 32)? as usize,
        server_pid: take("server-pid").and_then(|p| p.parse().ok()),
        server_log: take("server-log"),
        probe_p99_ms: number("probe-p99-ms", 500)?,
        rss_growth_mib: number("rss-growth-mib", 32)?,
        printed_token: take("printed-token").filter(|t| !t.is_empty()),
    })
}

/// What a request must get.
#[derive(Debug, Clone)]
enum Expect {
    /// 200 with this user (and guest flag).
    User { user_id: &'static str, guest: bool },
    /// 200, no authentication involved.
    Ok,
    /// This status and errcode; `soft_logout` as given.
    Error {
        status: u16,
        errcode: &'static str,
        soft_logout: bool,
    },
}

fn error(status: u16, errcode: &'static str) -> Expect {
    Expect::Error {
        status,
        errcode,
        soft_logout: false,
    }
}

/// One kind of request the workers send over hyper: a name, a weight, a builder and its answer.
struct Kind {
    name: &'static str,
    weight: u32,
    method: &'static str,
    uri: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    expect: Expect,
}

struct Tokens {
    alice: String,
    guest: String,
    expired: String,
    attenuated: String,
    attack_2016: String,
    refresh: String,
    forged: String,
    json: String,
}

impl Tokens {
    fn all(&self) -> [&str; 8] {
        [
            &self.alice,
            &self.guest,
            &self.expired,
            &self.attenuated,
            &self.attack_2016,
            &self.refresh,
            &self.forged,
            &self.json,
        ]
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn tokens(secret: &str) -> Tokens {
    let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(secret));
    let alice = || {
        keys.mint("@alice:localhost", TokenType::Access)
            .unwrap()
            .nonce("soak-alice-nonce")
            .device_id("SOAKDEVICE")
    };
    let token = alice().to_token();
    let forger = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("not it"));
    Tokens {
        guest: keys
            .mint("@guest:localhost", TokenType::Access)
            .unwrap()
            .nonce("soak-guest-nonce")
            .guest()
            .to_token(),
        expired: alice().expires_at_ms(now_ms() - 1_000).to_token(),
        attenuated: attenuate(&token, &format!("time < {}", now_ms() + 3_600_000)).unwrap(),
        attack_2016: attenuate(&token, "user_id = @mallory:localhost").unwrap(),
        refresh: keys
            .mint("@alice:localhost", TokenType::Refresh)
            .unwrap()
            .nonce("soak-refresh-nonce")
            .to_token(),
        forged: forger
            .mint("@alice:localhost", TokenType::Access)
            .unwrap()
            .to_token(),
        json: alice().serialize(Format::V2Json),
        alice: token,
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn kinds(t: &Tokens) -> Vec<Kind> {
    let bearer = |token: &str| ("authorization", format!("Bearer {token}").into_bytes());
    let alice = Expect::User {
        user_id: "@alice:localhost",
        guest: false,
    };
    let unknown = error(401, "M_UNKNOWN_TOKEN");
    let missing = error(401, "M_MISSING_TOKEN");
    let kind = |name, weight, uri: &str, headers: Vec<(&'static str, Vec<u8>)>, expect| Kind {
        name,
        weight,
        method: "GET",
        uri: uri.to_owned(),
        headers,
        expect,
    };
    // An `http::Uri` holds at most 64 KiB: a longer request target is hyper's to refuse.
    let padding = "p".repeat(60 * 1024);
    vec![
        kind(
            "valid header",
            20,
            WHOAMI,
            vec![bearer(&t.alice)],
            alice.clone(),
        ),
        kind(
            "valid query",
            8,
            &format!("{WHOAMI}?access_token={}", t.alice),
            vec![],
            alice.clone(),
        ),
        kind(
            "valid V2JSON query",
            4,
            &format!("{WHOAMI}?a=1&access_token={}", percent_encode(&t.json)),
            vec![],
            alice.clone(),
        ),
        kind(
            "attenuated",
            4,
            WHOAMI,
            vec![bearer(&t.attenuated)],
            alice.clone(),
        ),
        kind(
            "guest whoami",
            4,
            WHOAMI,
            vec![bearer(&t.guest)],
            Expect::User {
                user_id: "@guest:localhost",
                guest: true,
            },
        ),
        kind(
            "guest devices",
            4,
            DEVICES,
            vec![bearer(&t.guest)],
            error(403, "M_GUEST_ACCESS_FORBIDDEN"),
        ),
        kind(
            "expired",
            8,
            WHOAMI,
            vec![bearer(&t.expired)],
            Expect::Error {
                status: 401,
                errcode: "M_UNKNOWN_TOKEN",
                soft_logout: true,
            },
        ),
        kind(
            "forged",
            8,
            WHOAMI,
            vec![bearer(&t.forged)],
            unknown.clone(),
        ),
        kind(
            "2016 user_id attack",
            4,
            WHOAMI,
            vec![bearer(&t.attack_2016)],
            unknown.clone(),
        ),
        kind(
            "refresh as access",
            4,
            DEVICES,
            vec![bearer(&t.refresh)],
            unknown.clone(),
        ),
        kind(
            "malformed",
            6,
            WHOAMI,
            vec![bearer("bm90IGEgbWFjYXJvb24")],
            unknown.clone(),
        ),
        kind(
            "too long",
            2,
            WHOAMI,
            vec![bearer(&"A".repeat(5000))],
            unknown.clone(),
        ),
        kind(
            "100 KiB token",
            1,
            WHOAMI,
            vec![bearer(&"A".repeat(100 * 1024))],
            unknown.clone(),
        ),
        kind(
            "100 KiB other header",
            1,
            WHOAMI,
            vec![
                bearer(&t.alice),
                ("x-padding", "x".repeat(100 * 1024).into_bytes()),
            ],
            alice.clone(),
        ),
        kind(
            "60 KiB query",
            1,
            &format!("{WHOAMI}?pad={padding}&access_token={}", t.alice),
            vec![],
            alice.clone(),
        ),
        kind("missing", 8, WHOAMI, vec![], missing.clone()),
        kind(
            "empty query token",
            2,
            &format!("{WHOAMI}?access_token="),
            vec![],
            missing.clone(),
        ),
        kind(
            "mixed",
            4,
            &format!("{WHOAMI}?access_token={}", t.alice),
            vec![bearer(&t.alice)],
            missing.clone(),
        ),
        kind(
            "two headers",
            4,
            WHOAMI,
            vec![bearer(&t.alice), bearer(&t.alice)],
            missing.clone(),
        ),
        kind(
            "two query tokens",
            2,
            &format!("{WHOAMI}?access_token={0}&access_token={0}", t.alice),
            vec![],
            missing.clone(),
        ),
        kind(
            "basic",
            2,
            WHOAMI,
            vec![("authorization", b"Basic dXNlcjpwYXNz".to_vec())],
            missing.clone(),
        ),
        kind(
            "non-UTF-8 header",
            2,
            WHOAMI,
            vec![("authorization", b"Bearer \xe9t\xe9\xff".to_vec())],
            missing.clone(),
        ),
        kind(
            "versions",
            2,
            "/_matrix/client/versions",
            vec![],
            Expect::Ok,
        ),
        kind(
            "unknown endpoint",
            2,
            "/_matrix/client/v3/nope",
            vec![bearer(&t.forged)],
            error(404, "M_UNRECOGNIZED"),
        ),
    ]
}

// ---- Results ------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    /// Per kind: sent, right answers.
    kinds: BTreeMap<&'static str, (u64, u64)>,
    /// Answers by class: `200`, `401 M_UNKNOWN_TOKEN`, `closed`, ...
    classes: BTreeMap<String, u64>,
    wrong: Vec<String>,
    server_errors: u64,
    hangs: u64,
    reconnects: u64,
}

impl Tally {
    fn record(&mut self, kind: &'static str, class: String, right: Result<(), String>) {
        let entry = self.kinds.entry(kind).or_default();
        entry.0 += 1;
        if class.starts_with('5') {
            self.server_errors += 1;
        }
        if class == "no answer in 10 s" {
            self.hangs += 1;
        }
        match right {
            Ok(()) => entry.1 += 1,
            Err(why) => {
                if self.wrong.len() < 20 {
                    self.wrong.push(format!("{kind}: {why}"));
                }
            }
        }
        *self.classes.entry(class).or_default() += 1;
    }
}

fn check(expect: &Expect, status: StatusCode, body: &[u8]) -> (String, Result<(), String>) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let errcode = json["errcode"].as_str().unwrap_or_default();
    let class = if errcode.is_empty() {
        status.as_u16().to_string()
    } else {
        format!("{} {errcode}", status.as_u16())
    };
    let got = || format!("got {status} {}", String::from_utf8_lossy(body));
    let right = match expect {
        Expect::Ok if status == StatusCode::OK => Ok(()),
        Expect::User { user_id, guest }
            if status == StatusCode::OK
                && json["user_id"] == *user_id
                && json["is_guest"] == *guest =>
        {
            Ok(())
        }
        Expect::Error {
            status: want,
            errcode: code,
            soft_logout,
        } if status.as_u16() == *want
            && errcode == *code
            && json.get("soft_logout").is_some() == *soft_logout =>
        {
            Ok(())
        }
        _ => Err(format!("expected {expect:?}, {}", got())),
    };
    (class, right)
}

async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

fn build(kind: &Kind) -> Request<Empty<Bytes>> {
    let mut request = Request::builder()
        .method(kind.method)
        .uri(&kind.uri)
        .header("host", SERVER_NAME)
        .body(Empty::new())
        .expect("a valid request");
    for (name, value) in &kind.headers {
        request.headers_mut().append(
            *name,
            HeaderValue::from_bytes(value).expect("a valid header value"),
        );
    }
    request
}

/// One keep-alive connection sending weighted random kinds until the deadline.
async fn worker(
    addr: SocketAddr,
    kinds: Arc<Vec<Kind>>,
    seed: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let total: u32 = kinds.iter().map(|k| k.weight).sum();
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) {
        let mut pick = rng.gen_range(0..total);
        let kind = kinds
            .iter()
            .find(|k| {
                if pick < k.weight {
                    true
                } else {
                    pick -= k.weight;
                    false
                }
            })
            .expect("a kind");
        if sender.is_none() {
            match connect(addr).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    tally.lock().unwrap().record(
                        kind.name,
                        format!("connect error: {e}"),
                        Err(e.to_string()),
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected");
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            s.ready().await?;
            let response = s.send_request(build(kind)).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts.status, body))
        })
        .await;
        let (class, right) = match answer {
            Ok(Ok((status, body))) => check(&kind.expect, status, &body),
            Ok(Err(e)) => {
                sender = None;
                tally.lock().unwrap().reconnects += 1;
                ("connection error".into(), Err(e.to_string()))
            }
            Err(_) => {
                sender = None;
                ("no answer in 10 s".into(), Err("hang".into()))
            }
        };
        tally.lock().unwrap().record(kind.name, class, right);
    }
}

/// Oversized or odd requests over raw TCP, each on a fresh connection.
async fn raw_worker(
    addr: SocketAddr,
    token: String,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let huge_query = format!(
        "GET {WHOAMI}?access_token={token}&pad={} HTTP/1.1\r\nhost: {SERVER_NAME}\r\n\r\n",
        "q".repeat(1024 * 1024)
    );
    let many_headers =
        format!(
        "GET {WHOAMI} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nauthorization: Bearer {token}\r\n{}\r\n",
        (0..150).map(|i| format!("x-h{i}: {i}\r\n")).collect::<String>()
    );
    let huge_header = format!(
        "GET {WHOAMI} HTTP/1.1\r\nhost: {SERVER_NAME}\r\nauthorization: Bearer {token}\r\nx-big: {}\r\n\r\n",
        "h".repeat(1024 * 1024)
    );
    let long_uri = format!(
        "GET {WHOAMI}?access_token={token}&pad={} HTTP/1.1\r\nhost: {SERVER_NAME}\r\n\r\n",
        "u".repeat(200 * 1024)
    );
    let cases: [(&'static str, &str); 4] = [
        ("1 MiB query (raw)", &huge_query),
        ("200 KiB query (raw)", &long_uri),
        ("150 headers (raw)", &many_headers),
        ("1 MiB header (raw)", &huge_header),
    ];
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let (name, request) = cases[i % cases.len()];
        i += 1;
        let outcome = tokio::time::timeout(ANSWER_TIMEOUT, async {
            let mut stream = TcpStream::connect(addr).await?;
            // The server may answer and close before it read everything: a failed write is
            // fine, the answer (or the close) is what counts.
            let _ = stream.write_all(request.as_bytes()).await;
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        head.extend_from_slice(&buf[..n]);
                        if head.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
            Ok::<_, std::io::Error>(head)
        })
        .await;
        let (class, right) = match outcome {
            Err(_) => ("no answer in 10 s".to_owned(), Err("hang".to_owned())),
            Ok(Err(e)) => (format!("connect error: {e}"), Err(e.to_string())),
            Ok(Ok(head)) if head.is_empty() => ("closed".to_owned(), Ok(())),
            Ok(Ok(head)) => {
                let line = String::from_utf8_lossy(&head);
                let status = line.split(' ').nth(1).unwrap_or("?").to_owned();
                let right = if status.starts_with('4') {
                    Ok(())
                } else {
                    Err(format!("expected a 4xx or a close, got {status}"))
                };
                (format!("{status} (hyper)"), right)
            }
        };
        tally.lock().unwrap().record(name, class, right);
    }
}

/// A valid request every 10 ms on its own connection: its latencies.
async fn probe(addr: SocketAddr, token: String, stop: Arc<AtomicBool>) -> (Vec<Duration>, u64) {
    let kind = Kind {
        name: "probe",
        weight: 1,
        method: "GET",
        uri: WHOAMI.into(),
        headers: vec![("authorization", format!("Bearer {token}").into_bytes())],
        expect: Expect::User {
            user_id: "@alice:localhost",
            guest: false,
        },
    };
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut sender = None;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if sender.is_none() {
            sender = connect(addr).await.ok();
        }
        let Some(s) = sender.as_mut() else {
            failures += 1;
            continue;
        };
        let start = Instant::now();
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            s.ready().await?;
            let response = s.send_request(build(&kind)).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts.status, body))
        })
        .await;
        latencies.push(start.elapsed());
        match answer {
            Ok(Ok((status, body))) if check(&kind.expect, status, &body).1.is_ok() => {}
            _ => {
                failures += 1;
                sender = None;
            }
        }
    }
    (latencies, failures)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    assert!(
        options.addr.ip().is_loopback(),
        "the soak only ever targets loopback"
    );
    let tokens = tokens(&options.secret);
    let mut kinds = kinds(&tokens);
    if let Some(printed) = &options.printed_token {
        kinds.push(Kind {
            name: "token the server printed",
            weight: 4,
            method: "GET",
            uri: WHOAMI.into(),
            headers: vec![("authorization", format!("Bearer {printed}").into_bytes())],
            expect: Expect::User {
                user_id: "@alice:localhost",
                guest: false,
            },
        });
    }
    let kinds = Arc::new(kinds);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let duration = Duration::from_secs(options.seconds);

    let rss_start = options.server_pid.and_then(rss_kib);
    let started = Instant::now();
    let probe_task = tokio::spawn(probe(options.addr, tokens.alice.clone(), stop.clone()));
    let mut tasks = Vec::new();
    for i in 0..options.connections {
        tasks.push(tokio::spawn(worker(
            options.addr,
            kinds.clone(),
            0x50a6_0000 + i as u64,
            stop.clone(),
            tally.clone(),
        )));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(raw_worker(
            options.addr,
            tokens.alice.clone(),
            stop.clone(),
            tally.clone(),
        )));
    }

    // RSS once a second; the warm-up ends after a fifth of the run.
    let mut rss_samples = Vec::new();
    let mut rss_warm = None;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1).min(duration.saturating_sub(started.elapsed())))
            .await;
        if let Some(rss) = options.server_pid.and_then(rss_kib) {
            rss_samples.push(rss);
            if rss_warm.is_none() && started.elapsed() >= duration / 5 {
                rss_warm = Some(rss);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut broken_workers = 0;
    for task in tasks {
        match tokio::time::timeout(ANSWER_TIMEOUT + Duration::from_secs(5), task).await {
            Ok(Ok(())) => {}
            _ => broken_workers += 1,
        }
    }
    let (mut latencies, probe_failures) = probe_task.await.expect("the probe task");
    let elapsed = started.elapsed();
    // Let the server settle (a closed connection's buffers) before the last reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = options.server_pid.and_then(rss_kib);

    let tally = tally.lock().unwrap();
    let total: u64 = tally.kinds.values().map(|(n, _)| n).sum();
    let right: u64 = tally.kinds.values().map(|(_, r)| r).sum();
    println!(
        "soak: {total} requests in {:.1} s ({:.0}/s) over {} connections + 2 raw",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        options.connections
    );
    println!("  by kind (sent / right):");
    for (kind, (sent, ok)) in &tally.kinds {
        println!("    {kind:<24} {sent:>8} {ok:>8}");
    }
    println!("  answers by class:");
    for (class, n) in &tally.classes {
        println!("    {class:<32} {n:>8}");
    }
    println!(
        "  wrong answers: {}, 5xx: {}, hangs: {}, reconnects after a connection error: {}",
        total - right,
        tally.server_errors,
        tally.hangs,
        tally.reconnects
    );
    for wrong in &tally.wrong {
        println!("    WRONG {wrong}");
    }

    latencies.sort();
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let max = latencies.last().copied().unwrap_or_default();
    println!(
        "  probe (valid request every 10 ms during the abuse): {} requests, {probe_failures} failed, \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );

    let mut failed = Vec::new();
    if broken_workers > 0 {
        failed.push(format!("{broken_workers} workers panicked or did not stop"));
    }
    if total != right || tally.server_errors > 0 || tally.hangs > 0 {
        failed.push("wrong answers, 5xx or hangs".to_owned());
    }
    if probe_failures > 0 || latencies.is_empty() {
        failed.push(format!("{probe_failures} probe requests failed"));
    }
    if p99 > Duration::from_millis(options.probe_p99_ms) {
        failed.push(format!("probe p99 over {} ms", options.probe_p99_ms));
    }
    if let (Some(start), Some(end)) = (rss_start, rss_end) {
        let warm = rss_warm.unwrap_or(start);
        let peak = rss_samples.iter().copied().max().unwrap_or(end);
        println!(
            "  server RSS: start {}, after warm-up {}, peak {}, end {}",
            mib(start),
            mib(warm),
            mib(peak),
            mib(end)
        );
        if end > warm + options.rss_growth_mib * 1024 {
            failed.push(format!(
                "server RSS grew by more than {} MiB after the warm-up",
                options.rss_growth_mib
            ));
        }
    }
    if let Some(path) = &options.server_log {
        let log = std::fs::read(path).unwrap_or_default();
        let leaked: Vec<&str> = tokens
            .all()
            .into_iter()
            .chain(options.printed_token.as_deref())
            .filter(|t| {
                // Binary tokens share their first bytes (the identifier, `gen = 1`): look for
                // the end, the signature; V2JSON tokens whole.
                let probe = match t.starts_with('{') {
                    true => t.as_bytes(),
                    false => &t.as_bytes()[t.len().saturating_sub(40)..],
                };
                log.windows(probe.len()).any(|w| w == probe)
            })
            .collect();
        println!(
            "  server log: {} bytes, tokens found in it: {}",
            log.len(),
            leaked.len()
        );
        if !leaked.is_empty() {
            failed.push("a token reached the server log".to_owned());
        }
    }
    if failed.is_empty() {
        println!("soak: passed");
    } else {
        println!("soak: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
}
