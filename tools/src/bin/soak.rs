//! A bounded soak of the example homeserver under hostile traffic, on loopback only: run it with
//! `scripts/soak.sh short|long`, which builds both in release (the homeserver with
//! `cargo build --release --example homeserver`, this driver with
//! `cargo build --release -p tower-matrix-auth-tools --bin soak`), starts the homeserver on a free
//! loopback port, runs this driver, and stops the server.
//!
//! ```text
//! soak --addr 127.0.0.1:PORT --secret S [--seconds 5] [--connections 32] [--server-pid PID]
//!      [--server-log FILE] [--probe-p99-ms 500] [--rss-growth-mib 32] [--printed-token T]
//!      [--many-addresses 1]
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
use tower_matrix_auth::{
    macaroon::{attenuate, MacaroonFormat},
    KeyRing, MacaroonSecret, TokenType,
};

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
    /// `hostile` (the default) or `lifecycle`.
    mode: String,
    /// Lifecycle mode: the users `soak0`.. (one a connection) log in with this password.
    password: String,
    /// Lifecycle mode: the server's `MATRIX_TOKEN_LIFETIME_MS` (and access token lifetime).
    lifetime_ms: u64,
    /// Lifecycle mode: which store the server uses, for the report.
    store: String,
    /// Hostile mode: every request claims a random client address in `X-Forwarded-For` (the
    /// server trusts loopback as its proxy and limits failed token checks per address), so the
    /// limiter meets a flood from many addresses; a `429 M_LIMIT_EXCEEDED` is then also a right
    /// answer to a request whose token is not valid.
    many_addresses: bool,
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
        mode: take("mode").unwrap_or_else(|| "hostile".into()),
        password: take("password").unwrap_or_default(),
        lifetime_ms: number("lifetime-ms", 2_000)?,
        store: take("store").unwrap_or_else(|| "memory".into()),
        many_addresses: take("many-addresses").is_some_and(|v| v == "1"),
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
        json: alice().serialize(MacaroonFormat::V2Json),
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
    /// Requests sent, and how many of them got the right answer.
    fn totals(&self) -> (u64, u64) {
        let total = self.kinds.values().map(|(n, _)| n).sum();
        let right = self.kinds.values().map(|(_, r)| r).sum();
        (total, right)
    }

    /// Sent and right per kind (headed `kinds`), answers by class, then every wrong answer after
    /// `summary`; labels padded to `width`.
    fn print(&self, kinds: &str, width: usize, summary: &str) {
        println!("  {kinds} (sent / right):");
        for (kind, (sent, ok)) in &self.kinds {
            println!("    {kind:<width$} {sent:>8} {ok:>8}");
        }
        println!("  answers by class:");
        for (class, n) in &self.classes {
            println!("    {class:<width$} {n:>8}", width = width.max(32));
        }
        println!("  {summary}");
        for wrong in &self.wrong {
            println!("    WRONG {wrong}");
        }
    }

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

/// [`check`], where a `429 M_LIMIT_EXCEEDED` (with `retry_after_ms`) is also right for a request
/// that must be refused: its address may have run out of failed checks.
fn check_limited(expect: &Expect, status: StatusCode, body: &[u8]) -> (String, Result<(), String>) {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if matches!(expect, Expect::Error { .. })
        && status == StatusCode::TOO_MANY_REQUESTS
        && json["errcode"] == "M_LIMIT_EXCEEDED"
        && json["retry_after_ms"].is_u64()
    {
        return ("429 M_LIMIT_EXCEEDED".into(), Ok(()));
    }
    check(expect, status, body)
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
    many_addresses: bool,
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
            let mut request = build(kind);
            if many_addresses {
                // Any IPv4 address from 1.0.0.0 to 223.255.255.255. A draw in 127/8 (one in
                // 224) sends no header: such requests come from loopback itself, which soon runs
                // out of failed checks and gets 429s, while the probe's valid token, from the
                // same address, must keep passing (valid users behind one NAT keep working).
                let claimed = std::net::Ipv4Addr::from(rng.gen_range(0x0100_0000u32..0xe000_0000));
                if !claimed.is_loopback() {
                    request.headers_mut().insert(
                        "x-forwarded-for",
                        HeaderValue::from_str(&claimed.to_string()).expect("an address"),
                    );
                }
            }
            let response = s.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts.status, body))
        })
        .await;
        let (class, right) = match answer {
            Ok(Ok((status, body))) if many_addresses => check_limited(&kind.expect, status, &body),
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

/// The server's resident memory over a run: at the start, once a second while the run lasts (the
/// warm-up ends after a fifth of it), and at the end once the server has settled.
struct ServerMemory {
    pid: Option<u32>,
    start: Option<u64>,
    warm: Option<u64>,
    samples: Vec<u64>,
    end: Option<u64>,
}

impl ServerMemory {
    fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            start: pid.and_then(rss_kib),
            warm: None,
            samples: Vec::new(),
            end: None,
        }
    }

    /// Samples once a second until `duration` has passed since `started`.
    async fn watch(&mut self, started: Instant, duration: Duration) {
        while started.elapsed() < duration {
            tokio::time::sleep(
                Duration::from_secs(1).min(duration.saturating_sub(started.elapsed())),
            )
            .await;
            if let Some(rss) = self.pid.and_then(rss_kib) {
                self.samples.push(rss);
                if self.warm.is_none() && started.elapsed() >= duration / 5 {
                    self.warm = Some(rss);
                }
            }
        }
    }

    /// The last reading, after letting the server settle (a closed connection's buffers).
    async fn settle(&mut self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.end = self.pid.and_then(rss_kib);
    }

    /// Prints the readings; a failure if memory grew by more than `growth_mib` after the warm-up.
    fn check(&self, growth_mib: u64, failed: &mut Vec<String>) {
        let (Some(start), Some(end)) = (self.start, self.end) else {
            return;
        };
        let warm = self.warm.unwrap_or(start);
        let peak = self.samples.iter().copied().max().unwrap_or(end);
        println!(
            "  server RSS: start {}, after warm-up {}, peak {}, end {}",
            mib(start),
            mib(warm),
            mib(peak),
            mib(end)
        );
        if end > warm + growth_mib * 1024 {
            failed.push(format!(
                "server RSS grew by more than {growth_mib} MiB after the warm-up"
            ));
        }
    }
}

/// p50, p99 and max of `latencies` (sorted here).
fn latency_summary(latencies: &mut [Duration]) -> (Duration, Duration, Duration) {
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    (
        percentile(latencies, 0.50),
        percentile(latencies, 0.99),
        max,
    )
}

/// Ends the run: passed, or failed with every reason and a non-zero exit.
fn verdict(failed: &[String]) {
    if failed.is_empty() {
        println!("soak: passed");
    } else {
        println!("soak: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
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
    match options.mode.as_str() {
        "hostile" => {}
        "lifecycle" => return lifecycle::run(options).await,
        other => {
            eprintln!("soak: --mode {other}: hostile or lifecycle");
            std::process::exit(2);
        }
    }
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

    let mut memory = ServerMemory::start(options.server_pid);
    let started = Instant::now();
    let probe_task = tokio::spawn(probe(options.addr, tokens.alice.clone(), stop.clone()));
    let mut tasks = Vec::new();
    for i in 0..options.connections {
        tasks.push(tokio::spawn(worker(
            options.addr,
            kinds.clone(),
            0x50a6_0000 + i as u64,
            options.many_addresses,
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

    memory.watch(started, duration).await;
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
    memory.settle().await;

    let tally = tally.lock().unwrap();
    let (total, right) = tally.totals();
    println!(
        "soak: {total} requests in {:.1} s ({:.0}/s) over {} connections + 2 raw",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        options.connections
    );
    tally.print(
        "by kind",
        24,
        &format!(
            "wrong answers: {}, 5xx: {}, hangs: {}, reconnects after a connection error: {}",
            total - right,
            tally.server_errors,
            tally.hangs,
            tally.reconnects
        ),
    );

    let (p50, p99, max) = latency_summary(&mut latencies);
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
    memory.check(options.rss_growth_mib, &mut failed);
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
    verdict(&failed);
}

/// `--mode lifecycle`: many clients at once, each its own user (`soak<i>`), repeat
/// login → whoami → refresh → whoami → logout (every fourth cycle: a second login, then
/// `logout/all`), alternating `/v3/refresh` and `/r0/tokenrefresh`, and check every answer against
/// the docs' lifecycle table:
///
/// - after `/v3/refresh` the old access token works until the new one is used, then
///   `401 M_UNKNOWN_TOKEN`, and the old refresh token is refused (`401 M_UNKNOWN_TOKEN`);
/// - after `/r0/tokenrefresh` the old access token is refused at once and the old refresh token
///   gets `403 M_FORBIDDEN`;
/// - after `logout` the access and refresh tokens are refused; after `logout/all` the other
///   login's token too;
/// - a logged-out access token presented again later, still unexpired (after the server's store
///   had time to sweep), is still `401 M_UNKNOWN_TOKEN` without a soft logout; once expired, any
///   `401 M_UNKNOWN_TOKEN` (the state may have been forgotten: a soft logout is then right).
///
/// Every request's latency is recorded; the server's RSS is sampled every second. Logouts leave
/// revocation state behind, which the store must forget once the tokens expire (the soak script
/// makes every lifetime short), so RSS must level off.
mod lifecycle {
    use super::*;
    use http_body_util::Full;
    use serde_json::{json, Value};
    use std::collections::VecDeque;

    const LOGIN: &str = "/_matrix/client/v3/login";
    const REFRESH: &str = "/_matrix/client/v3/refresh";
    const TOKENREFRESH: &str = "/_matrix/client/r0/tokenrefresh";
    const LOGOUT: &str = "/_matrix/client/v3/logout";
    const LOGOUT_ALL: &str = "/_matrix/client/v3/logout/all";

    /// One keep-alive connection, reopened after an error.
    struct Client {
        addr: SocketAddr,
        sender: Option<SendRequest<Full<Bytes>>>,
        latencies: Vec<Duration>,
    }

    /// What came back, or what went wrong on the way.
    enum Reply {
        Answer(StatusCode, Value),
        Failed(String),
    }

    impl Client {
        async fn send(
            &mut self,
            method: &str,
            path: &str,
            token: Option<&str>,
            body: Option<&Value>,
        ) -> Reply {
            if self.sender.is_none() {
                let stream = match TcpStream::connect(self.addr).await {
                    Ok(stream) => stream,
                    Err(e) => return Reply::Failed(format!("connect: {e}")),
                };
                let _ = stream.set_nodelay(true);
                match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                    Ok((sender, connection)) => {
                        tokio::spawn(connection);
                        self.sender = Some(sender);
                    }
                    Err(e) => return Reply::Failed(format!("handshake: {e}")),
                }
            }
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", SERVER_NAME);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
            let request = request
                .header("content-type", "application/json")
                .body(Full::new(body))
                .expect("a valid request");
            let sender = self.sender.as_mut().expect("connected");
            let start = Instant::now();
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let (parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok::<_, hyper::Error>((parts.status, body))
            })
            .await;
            self.latencies.push(start.elapsed());
            match answer {
                Ok(Ok((status, body))) => {
                    Reply::Answer(status, serde_json::from_slice(&body).unwrap_or_default())
                }
                Ok(Err(e)) => {
                    self.sender = None;
                    Reply::Failed(format!("connection error: {e}"))
                }
                Err(_) => {
                    self.sender = None;
                    Reply::Failed("no answer in 10 s".into())
                }
            }
        }
    }

    /// What a request must get.
    enum Want<'a> {
        /// 200 and a body this predicate accepts.
        Ok(&'a dyn Fn(&Value) -> bool),
        /// This status and errcode; `soft_logout`: `Some(b)` exactly, `None` either way.
        Error(u16, &'static str, Option<bool>),
    }

    /// Records one answer; returns the body when it was the right one.
    fn judge(tally: &Mutex<Tally>, kind: &'static str, reply: Reply, want: Want) -> Option<Value> {
        let (class, right, body) = match reply {
            Reply::Failed(why) => {
                let class = if why.starts_with("no answer") {
                    "no answer in 10 s".to_owned()
                } else {
                    "connection error".to_owned()
                };
                (class, Err(why), None)
            }
            Reply::Answer(status, json) => {
                let errcode = json["errcode"].as_str().unwrap_or_default().to_owned();
                let soft = json.get("soft_logout") == Some(&Value::Bool(true));
                let class = match (errcode.is_empty(), soft) {
                    (true, _) => status.as_u16().to_string(),
                    (false, false) => format!("{} {errcode}", status.as_u16()),
                    (false, true) => format!("{} {errcode} soft_logout", status.as_u16()),
                };
                let right = match want {
                    Want::Ok(accept) if status == StatusCode::OK && accept(&json) => Ok(()),
                    Want::Error(code, want_errcode, want_soft)
                        if status.as_u16() == code
                            && errcode == want_errcode
                            && want_soft.is_none_or(|w| w == soft) =>
                    {
                        Ok(())
                    }
                    // The answer's shape only: a token in a body never reaches the report.
                    _ => Err(format!("got {class}")),
                };
                let body = right.is_ok().then_some(json);
                (class, right, body)
            }
        };
        tally.lock().unwrap().record(kind, class, right);
        body
    }

    fn string(json: &Value, key: &str) -> Option<String> {
        json[key].as_str().map(str::to_owned)
    }

    /// A logged-out access token to present again later.
    struct Revoked {
        token: String,
        /// Before this, the token has certainly not expired (it was minted after the login was
        /// sent): the store must still know it is revoked.
        unexpired_until: Instant,
        /// After this it has certainly expired (it was minted before the answer came).
        expired_after: Instant,
    }

    struct Worker {
        index: usize,
        user_id: String,
        password: String,
        lifetime: Duration,
        tally: Arc<Mutex<Tally>>,
        revoked: VecDeque<Revoked>,
        /// Rechecked late in their life; to recheck once expired.
        expiring: VecDeque<Revoked>,
        /// A sample of the tokens sent, to look for in the server's log.
        checked_tokens: Vec<String>,
    }

    impl Worker {
        fn login_body(&self, device: &str, refresh: bool) -> Value {
            json!({
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": format!("soak{}", self.index)},
                "password": self.password,
                "refresh_token": refresh,
                "device_id": device,
            })
        }

        /// Logs in; returns the access and refresh tokens and when the login was sent.
        async fn login(
            &self,
            client: &mut Client,
            device: &str,
            refresh: bool,
        ) -> Option<(String, Option<String>, Instant)> {
            let lifetime_ms = self.lifetime.as_millis() as u64;
            let sent = Instant::now();
            let reply = client
                .send("POST", LOGIN, None, Some(&self.login_body(device, refresh)))
                .await;
            let accept = |j: &Value| {
                j["user_id"] == self.user_id.as_str()
                    && j["device_id"] == device
                    && j["access_token"].is_string()
                    && j["refresh_token"].is_string() == refresh
                    && j["expires_in_ms"] == lifetime_ms
            };
            let kind = if refresh {
                "login (refresh)"
            } else {
                "login (second device)"
            };
            let json = judge(&self.tally, kind, reply, Want::Ok(&accept))?;
            Some((
                string(&json, "access_token")?,
                string(&json, "refresh_token"),
                sent,
            ))
        }

        async fn whoami(
            &self,
            client: &mut Client,
            kind: &'static str,
            token: &str,
            device: &str,
            valid: bool,
        ) {
            let reply = client.send("GET", WHOAMI, Some(token), None).await;
            let accept = |j: &Value| {
                j["user_id"] == self.user_id.as_str()
                    && j["device_id"] == device
                    && j["is_guest"] == false
            };
            let want = if valid {
                Want::Ok(&accept)
            } else {
                Want::Error(401, "M_UNKNOWN_TOKEN", Some(false))
            };
            judge(&self.tally, kind, reply, want);
        }

        async fn refresh(
            &self,
            client: &mut Client,
            kind: &'static str,
            path: &str,
            token: &str,
            valid: bool,
        ) -> Option<(String, String)> {
            let body = json!({ "refresh_token": token });
            let reply = client.send("POST", path, None, Some(&body)).await;
            let rotating = path == REFRESH;
            let lifetime_ms = self.lifetime.as_millis() as u64;
            let accept = |j: &Value| {
                j["access_token"].is_string()
                    && j["refresh_token"].is_string()
                    && (!rotating || j["expires_in_ms"] == lifetime_ms)
            };
            let want = match (valid, rotating) {
                (true, _) => Want::Ok(&accept),
                (false, true) => Want::Error(401, "M_UNKNOWN_TOKEN", Some(false)),
                (false, false) => Want::Error(403, "M_FORBIDDEN", None),
            };
            let json = judge(&self.tally, kind, reply, want)?;
            Some((
                string(&json, "access_token")?,
                string(&json, "refresh_token")?,
            ))
        }

        async fn logout(&self, client: &mut Client, kind: &'static str, path: &str, token: &str) {
            let reply = client
                .send("POST", path, Some(token), Some(&json!({})))
                .await;
            let accept = |j: &Value| j == &json!({});
            judge(&self.tally, kind, reply, Want::Ok(&accept));
        }

        /// Logged-out tokens whose time has come are presented again: once late in their life
        /// (the store has swept meanwhile, and must not have forgotten them), once expired.
        async fn recheck(&mut self, client: &mut Client) {
            let margin = Duration::from_millis(100);
            let late = (self.lifetime / 4).max(Duration::from_millis(200));
            while let Some(front) = self.revoked.front() {
                let now = Instant::now();
                if now + late < front.unexpired_until {
                    break;
                }
                let revoked = self.revoked.pop_front().expect("there is a front");
                if now + margin < revoked.unexpired_until {
                    let reply = client.send("GET", WHOAMI, Some(&revoked.token), None).await;
                    let want = Want::Error(401, "M_UNKNOWN_TOKEN", Some(false));
                    judge(
                        &self.tally,
                        "logged-out token, late in its life",
                        reply,
                        want,
                    );
                }
                self.expiring.push_back(revoked);
            }
            while let Some(front) = self.expiring.front() {
                if Instant::now() < front.expired_after + margin {
                    break;
                }
                let revoked = self.expiring.pop_front().expect("there is a front");
                let reply = client.send("GET", WHOAMI, Some(&revoked.token), None).await;
                let want = Want::Error(401, "M_UNKNOWN_TOKEN", None);
                judge(&self.tally, "logged-out token, expired", reply, want);
                self.checked_tokens.push(revoked.token);
            }
        }

        /// One cycle; `n` picks the refresh endpoint and whether it ends with logout/all.
        async fn cycle(&mut self, client: &mut Client, n: u64) -> bool {
            let everywhere = n % 4 == 3; // every fourth cycle
            let device = format!("W{}A", self.index);
            let other_device = format!("W{}B", self.index);
            let other = if everywhere {
                let Some((b, _, _)) = self.login(client, &other_device, false).await else {
                    return false;
                };
                self.whoami(client, "whoami, second device", &b, &other_device, true)
                    .await;
                Some(b)
            } else {
                None
            };
            let Some((a0, Some(r0), sent)) = self.login(client, &device, true).await else {
                return false;
            };
            self.whoami(client, "whoami a0", &a0, &device, true).await;
            let (a1, r1) = if n % 2 == 0 {
                let Some((a1, r1)) = self
                    .refresh(client, "v3/refresh r0", REFRESH, &r0, true)
                    .await
                else {
                    return false;
                };
                self.whoami(client, "whoami a0, successor unused", &a0, &device, true)
                    .await;
                self.whoami(client, "whoami a1 (first use)", &a1, &device, true)
                    .await;
                self.whoami(client, "whoami a0, successor used", &a0, &device, false)
                    .await;
                self.refresh(client, "v3/refresh r0 again", REFRESH, &r0, false)
                    .await;
                (a1, r1)
            } else {
                let Some((a1, r1)) = self
                    .refresh(client, "r0/tokenrefresh r0", TOKENREFRESH, &r0, true)
                    .await
                else {
                    return false;
                };
                self.whoami(client, "whoami a0 after tokenrefresh", &a0, &device, false)
                    .await;
                self.refresh(client, "r0/tokenrefresh r0 again", TOKENREFRESH, &r0, false)
                    .await;
                self.whoami(client, "whoami a1", &a1, &device, true).await;
                (a1, r1)
            };
            match &other {
                Some(b) => {
                    self.logout(client, "logout/all", LOGOUT_ALL, &a1).await;
                    self.whoami(
                        client,
                        "whoami, second device, after logout/all",
                        b,
                        &other_device,
                        false,
                    )
                    .await;
                }
                None => self.logout(client, "logout", LOGOUT, &a1).await,
            }
            self.whoami(client, "whoami a1 after logout", &a1, &device, false)
                .await;
            self.refresh(client, "v3/refresh r1 after logout", REFRESH, &r1, false)
                .await;
            // a1 was minted after the login was sent, and before now.
            self.revoked.push_back(Revoked {
                token: a1,
                unexpired_until: sent + self.lifetime,
                expired_after: Instant::now() + self.lifetime,
            });
            self.recheck(client).await;
            true
        }
    }

    pub(super) async fn run(options: Options) {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let duration = Duration::from_secs(options.seconds);
        let lifetime = Duration::from_millis(options.lifetime_ms);
        let cycles = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut memory = ServerMemory::start(options.server_pid);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for index in 0..options.connections {
            let mut worker = Worker {
                index,
                user_id: format!("@soak{index}:{SERVER_NAME}"),
                password: options.password.clone(),
                lifetime,
                tally: tally.clone(),
                revoked: VecDeque::new(),
                expiring: VecDeque::new(),
                checked_tokens: Vec::new(),
            };
            let (stop, cycles, addr) = (stop.clone(), cycles.clone(), options.addr);
            tasks.push(tokio::spawn(async move {
                let mut client = Client {
                    addr,
                    sender: None,
                    latencies: Vec::new(),
                };
                let mut n = index as u64;
                while !stop.load(Ordering::Relaxed) {
                    if worker.cycle(&mut client, n).await {
                        cycles.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // Something was wrong (recorded): start again on a fresh connection.
                        client.sender = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    n += 1;
                }
                // The last few tokens this worker sent, for the log check.
                let keep = worker.checked_tokens.len().saturating_sub(16);
                let tokens = worker.checked_tokens.split_off(keep);
                (client.latencies, tokens)
            }));
        }
        memory.watch(started, duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let mut sent_tokens = Vec::new();
        let mut broken_workers = 0;
        for task in tasks {
            match tokio::time::timeout(ANSWER_TIMEOUT * 3, task).await {
                Ok(Ok((l, tokens))) => {
                    latencies.extend(l);
                    sent_tokens.extend(tokens);
                }
                _ => broken_workers += 1,
            }
        }
        let elapsed = started.elapsed();
        memory.settle().await;

        let tally = tally.lock().unwrap();
        let (total, right) = tally.totals();
        let cycles = cycles.load(Ordering::Relaxed);
        println!(
            "soak lifecycle ({} store, token lifetime {} ms): {cycles} cycles, {total} requests in \
             {:.1} s ({:.0} cycles/s, {:.0} requests/s) over {} connections",
            options.store,
            options.lifetime_ms,
            elapsed.as_secs_f64(),
            cycles as f64 / elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            options.connections
        );
        tally.print(
            "by step",
            44,
            &format!(
                "wrong answers: {}, 5xx: {}, hangs: {}",
                total - right,
                tally.server_errors,
                tally.hangs
            ),
        );
        let (p50, p99, max) = latency_summary(&mut latencies);
        println!(
            "  latency of every request: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
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
        if cycles == 0 {
            failed.push("no cycle completed".to_owned());
        }
        if p99 > Duration::from_millis(options.probe_p99_ms) {
            failed.push(format!("p99 over {} ms", options.probe_p99_ms));
        }
        memory.check(options.rss_growth_mib, &mut failed);
        if let Some(path) = &options.server_log {
            let log = std::fs::read(path).unwrap_or_default();
            // Tokens are base64url words; a token in the log would be one (or end one).
            let tails: std::collections::HashSet<&[u8]> = sent_tokens
                .iter()
                .map(|t| &t.as_bytes()[t.len().saturating_sub(40)..])
                .collect();
            let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
            let leaked = log
                .split(|b| !base64url(b))
                .filter(|word| word.len() >= 40 && tails.contains(&word[word.len() - 40..]))
                .count();
            println!(
                "  server log: {} bytes, {} of the tokens sent checked, found in it: {leaked}",
                log.len(),
                tails.len()
            );
            if tails.is_empty() {
                failed.push("no token to look for in the server log".to_owned());
            }
            if leaked > 0 {
                failed.push("a token reached the server log".to_owned());
            }
        }
        verdict(&failed);
    }
}
