//! The PostgreSQL scale benchmark (issue 17): PostgreSQL's own ceiling for what one refresh must
//! do, measured with `pgbench`, beside the store's refresh path driven through `Sessions` from
//! 1, 2 and 4 processes, each with its own `PostgresStore`. `benches/pg_scale.sh` runs it against
//! a throwaway server:
//!
//! ```text
//! pg_scale run --url URL [--clients 16] [--seconds 10] [--procs 1,2,4] [--pgbench PATH]
//!              [--ops refresh,tokenrefresh,logout,logout-all] [--pool N]
//! pg_scale worker --url URL --clients N --seconds S --start-ms T --out FILE
//! pg_scale size --url URL --clients ROWS [--skip-view 1] [--skip-purge 1] [--reuse 1]
//! pg_scale fanout --url URL [--clients 16] [--seconds 10] [--procs 4]
//! pg_scale http --url URL [--clients 16] [--seconds 10] [--procs 1,2,4] [--fanout 1]
//!               [--ops login,refresh,tokenrefresh,logout,logout-all] [--sticky 1] [--pool N]
//!               [--homeserver PATH]
//! ```
//!
//! `http` measures the same operations through the example homeserver
//! (`cargo build --release --example homeserver`; `--homeserver` names another binary): for each
//! process count it starts that many homeservers on loopback ports (one database, one macaroon
//! secret, `RUST_LOG=warn`), and one client process (a single-threaded tokio runtime, so that it
//! takes at most one of the cores it shares with the servers and PostgreSQL) runs `--clients`
//! clients, each with a keep-alive HTTP/1.1 connection to every process, its requests going
//! round-robin over them (`--sticky 1`: client `i` sends all of its requests to process
//! `i % procs`, as behind a load balancer that keeps a client on one process; `--pool N`: each
//! homeserver's `MATRIX_DATABASE_POOL`). One request each: `login` is `POST /v3/login` (password, with a
//! refresh token); `refresh` and `tokenrefresh` are chains of `POST /v3/refresh` and
//! `/r0/tokenrefresh`, each with the refresh token of the previous answer (on whichever process
//! the previous refresh ran: one write that promotes the previous generation and mints the next,
//! as in `run`; the new access token is never used, as in `run`); `logout` and `logout-all` are
//! `POST /v3/logout` and `/logout/all` of a session the client minted with the same secret (a
//! login stores nothing, so minting it here leaves the logout the only request timed; logout/all
//! with a fresh user each time, whose floor no earlier logout/all has raised). Any answer but a
//! 2xx, or none within 10 s, is counted, reported, and fails the run once the tables are
//! printed. `--fanout 1` adds, with four processes: while the clients refresh, a fresh session is
//! logged out on the first process every ~20 ms and whoami is polled back to back on the three
//! others until each answers 401; it reports the time from the logout's 200 to each first 401,
//! and the poll's round trip, which bounds the resolution.
//!
//! `size` also reports each purge batch's server-side time (the durations the server logs with
//! `log_min_duration_statement = 0`, read from `$MATRIX_TEST_PG_DIR/log`), since the store has no
//! per-batch hook.
//!
//! `fanout` measures NOTIFY fan-out under write load: while `--procs` worker processes refresh
//! (as in `run`), four more stores log sessions out on one and time how long until the three
//! others refuse them.
//!
//! `size` (ROWS given as `--clients`) measures the store at size: with ROWS logged-out sessions,
//! the view's start-up load (time, peak RSS during it, RSS after it and after `malloc_trim`,
//! beside the map's own size computed from its layout), and the reload after the listening
//! connection is killed (how long checks fail closed); then `purge_expired` on ROWS expired rows
//! beside the single `DELETE` it replaced. `--reuse 1` keeps the sessions table if it already
//! holds ROWS rows (and leaves them there, unless the purge replaces them; otherwise the table is
//! emptied at the end); `--skip-purge 1` skips the purge.
//!
//! `run` prints one table: for each process count, pgbench's rates (the ceilings, with as many
//! listening connections as the store has processes: one refresh's work as a transaction of
//! separate statements, and as the one statement the store sends) and the store's, as req/s,
//! p50/p99 and the store's fraction of each ceiling. Every process of a row runs `clients / procs` tasks; each
//! task logs in once and then refreshes its session (`POST /_matrix/client/v3/refresh`'s path,
//! `RefreshMode::Rotating`, each refresh with the previous one's refresh token, so each is one
//! write that promotes the previous generation and mints the next). `--ops` adds other
//! operations: `tokenrefresh` (`/r0/tokenrefresh`'s single-use refresh), `logout` (a login, which
//! stores nothing, then its logout: one write) and `logout-all` (a login, then `/logout/all`:
//! the user's floor and the session, two writes).

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tower_matrix_auth::store::{PostgresOptions, RefreshMode};
use tower_matrix_auth::{Issuer, KeyRing, MacaroonSecret, PostgresStore, Sessions, Verifier};

const SECRET: &str = "pg_scale macaroon secret";
const BENCH_ROWS: u32 = 10_000;

/// The runtime `size`, `fanout` and `worker` run on (multi-threaded, two workers).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn usage() -> ! {
    eprintln!(
        "usage: pg_scale run --url URL [--clients N] [--seconds S] [--procs 1,2,4] [--pgbench PATH] [--pool N]\n       pg_scale http --url URL [--clients N] [--seconds S] [--procs 1,2,4] [--ops login,refresh,tokenrefresh,logout,logout-all] [--fanout 1] [--sticky 1] [--pool N] [--homeserver PATH]\n       pg_scale size --url URL --clients ROWS [--skip-view 1] [--skip-purge 1] [--reuse 1]\n       pg_scale worker --url URL --clients N --seconds S --start-ms T --out FILE"
    );
    std::process::exit(2)
}

#[derive(Clone)]
struct Args {
    url: String,
    clients: usize,
    seconds: u64,
    procs: Vec<usize>,
    pgbench: Option<PathBuf>,
    start_ms: u64,
    out: Option<PathBuf>,
    pool: Option<usize>,
    skip_view: bool,
    skip_purge: bool,
    reuse: bool,
    ops: Vec<String>,
    /// `http`: the example homeserver's binary (default: `examples/homeserver` beside this one).
    homeserver: Option<PathBuf>,
    /// `http`: also time the NOTIFY fan-out between four homeserver processes.
    fanout: bool,
    /// `http`: each client sends every request to one process (client `i` to process
    /// `i % procs`) instead of round-robin.
    sticky: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        url: String::new(),
        clients: 16,
        seconds: 10,
        procs: vec![1, 2, 4],
        pgbench: None,
        start_ms: 0,
        out: None,
        pool: None,
        skip_view: false,
        skip_purge: false,
        reuse: false,
        ops: vec!["refresh".into()],
        homeserver: None,
        fanout: false,
        sticky: false,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--url" => a.url = value,
            "--clients" => a.clients = value.parse().unwrap_or_else(|_| usage()),
            "--seconds" => a.seconds = value.parse().unwrap_or_else(|_| usage()),
            "--procs" => {
                a.procs = value
                    .split(',')
                    .map(|p| p.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--pgbench" => a.pgbench = Some(value.into()),
            "--start-ms" => a.start_ms = value.parse().unwrap_or_else(|_| usage()),
            "--out" => a.out = Some(value.into()),
            "--pool" => a.pool = Some(value.parse().unwrap_or_else(|_| usage())),
            "--skip-view" => a.skip_view = value == "1",
            "--skip-purge" => a.skip_purge = value == "1",
            "--reuse" => a.reuse = value == "1",
            "--ops" => a.ops = value.split(',').map(str::to_owned).collect(),
            "--homeserver" => a.homeserver = Some(value.into()),
            "--fanout" => a.fanout = value == "1",
            "--sticky" => a.sticky = value == "1",
            _ => usage(),
        }
    }
    if a.url.is_empty() {
        usage();
    }
    a
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("run") => run(parse(args)),
        Some("http") => {
            let args: Vec<String> = args.collect();
            let ops_given = args.iter().any(|a| a == "--ops");
            let mut args = parse(args.into_iter());
            if !ops_given {
                args.ops = over_http::ALL_OPS.iter().map(|&o| o.to_owned()).collect();
            }
            over_http::run(args)
        }
        Some("size") => {
            let args = parse(args);
            runtime().block_on(size(args));
        }
        Some("fanout") => {
            let args = parse(args);
            runtime().block_on(fanout(args));
        }
        Some("worker") => {
            let args = parse(args);
            runtime().block_on(worker(args));
        }
        _ => usage(),
    }
}

fn engine(store: PostgresStore) -> Sessions {
    let keys = || KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET));
    let issuer = Issuer::new(keys())
        .refreshable_access_lifetime(Duration::from_secs(300))
        .refresh_lifetime(Some(Duration::from_secs(3600)));
    Sessions::new(issuer, Verifier::new(keys()), store)
}

/// One process of a row: `clients` tasks refreshing their own sessions from `start_ms` for
/// `seconds`; writes every refresh's latency (µs, one a line) to `out`.
async fn worker(args: Args) {
    let mut options = PostgresOptions::default();
    if let Some(pool) = args.pool {
        options = options.max_connections(pool);
    }
    let store = PostgresStore::connect_with(&args.url, options)
        .await
        .expect("connecting the store");
    let sessions = std::sync::Arc::new(engine(store));
    let start = UNIX_EPOCH + Duration::from_millis(args.start_ms);
    let wait = start
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let begin = Instant::now() + wait;
    let end = begin + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let op = args
        .ops
        .first()
        .cloned()
        .unwrap_or_else(|| "refresh".into());
    for i in 0..args.clients {
        let sessions = sessions.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let request = tower_matrix_auth::lifecycle::SessionRequest::new().refresh(true);
            let user = format!("@scale{}-{i}:example.org", std::process::id());
            let tokens = sessions.login(&user, &request);
            let mut refresh = tokens.refresh_token.expect("a refresh token");
            let parts = http::Request::new(()).into_parts().0;
            tokio::time::sleep_until(begin.into()).await;
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < end {
                let t = Instant::now();
                let ok = match op.as_str() {
                    "refresh" | "tokenrefresh" => {
                        let mode = if op == "refresh" {
                            RefreshMode::Rotating
                        } else {
                            RefreshMode::SingleUse
                        };
                        match sessions.refresh(refresh.as_bytes(), mode, &parts).await {
                            Ok(next) => {
                                refresh = next.refresh_token.expect("a refresh token");
                                true
                            }
                            Err(e) => {
                                first_error.get_or_insert_with(|| format!("{e:?}"));
                                false
                            }
                        }
                    }
                    // A login (nothing stored), then its logout: one write.
                    "logout" | "logout-all" => {
                        let tokens = sessions.login(&user, &request);
                        let who = sessions
                            .verifier()
                            .verify(
                                tokens.access_token.as_bytes(),
                                tower_matrix_auth::TokenType::Access,
                                &parts,
                            )
                            .expect("a valid token");
                        let outcome = if op == "logout" {
                            sessions.logout(&who).await
                        } else {
                            sessions.logout_all(&who).await
                        };
                        if let Err(e) = &outcome {
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                        outcome.is_ok()
                    }
                    other => panic!("unknown op {other}"),
                };
                if ok {
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut out = String::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e, first_error) = task.await.expect("a worker task");
        errors += e;
        if let Some(error) = first_error {
            // The first error of each task, on standard error (the table counts them all).
            eprintln!("pg_scale worker {}: {error}", std::process::id());
        }
        for l in latencies {
            let _ = writeln!(out, "{l}");
        }
    }
    let _ = writeln!(out, "errors {errors}");
    std::fs::write(args.out.expect("--out"), out).expect("writing the latencies");
}

fn pgbench_path(given: Option<PathBuf>) -> PathBuf {
    if let Some(p) = given {
        return p;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| "pgbench".into())
}

struct Figures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
}

fn figures(mut latencies_us: Vec<u64>, seconds: u64, errors: u64) -> Figures {
    latencies_us.sort_unstable();
    let pct = |p: f64| {
        if latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies_us.len() as f64 * p).ceil() as usize).clamp(1, latencies_us.len());
        latencies_us[i - 1] as f64 / 1000.0
    };
    Figures {
        rate: latencies_us.len() as f64 / seconds as f64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        errors,
    }
}

fn psql(url: &str, sql: &str) {
    let bin = pgbench_path(None).with_file_name("psql");
    let status = Command::new(bin)
        .args(["-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running psql");
    assert!(status.success(), "psql failed: {sql}");
}

/// The two ceilings: what one refresh must do as a transaction of separate statements (lock,
/// update, notify: five round trips), and as the single statement the store sends.
#[derive(Clone, Copy)]
enum Script {
    Transaction,
    Statement,
}

/// pgbench with the statements one refresh needs, `listeners` connections listening.
fn pgbench(args: &Args, script_kind: Script, listeners: usize, dir: &Path) -> Figures {
    let script = dir.join("refresh.sql");
    let body = match script_kind {
        Script::Transaction => {
            "BEGIN;\n\
             SELECT version FROM pg_scale_bench WHERE id = :id FOR UPDATE;\n\
             UPDATE pg_scale_bench SET version = version + 1 WHERE id = :id;\n\
             SELECT pg_notify('pg_scale', 's ' || :id);\n\
             END;\n"
        }
        Script::Statement => {
            "WITH w AS (UPDATE pg_scale_bench SET version = version + 1 \
             WHERE id = :id RETURNING version) \
             SELECT pg_notify('pg_scale', 's ' || :id || ' ' || version) FROM w;\n"
        }
    };
    std::fs::write(&script, format!("\\set id random(1, {BENCH_ROWS})\n{body}"))
        .expect("writing the pgbench script");
    // Listening connections, as the store's processes have: NOTIFY's delivery is part of the cost.
    let mut listening = Vec::new();
    let bin = pgbench_path(args.pgbench.clone()).with_file_name("psql");
    for _ in 0..listeners {
        let mut child = Command::new(&bin)
            .args(["-q", &args.url])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("a listening psql");
        use std::io::Write;
        // psql reads notifications only between commands: one every few ms drains the queue.
        let mut stdin = child.stdin.take().expect("psql's stdin");
        let _ = writeln!(stdin, "LISTEN pg_scale;");
        let seconds = args.seconds + 2;
        std::thread::spawn(move || {
            for _ in 0..seconds * 100 {
                if writeln!(stdin, "SELECT 1;").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        listening.push(child);
    }
    let prefix = dir.join(format!("pgbench_{listeners}"));
    let output = Command::new(pgbench_path(args.pgbench.clone()))
        .args(["-n", "-M", "prepared", "-l", "--log-prefix"])
        .arg(&prefix)
        .args([
            "-c",
            &args.clients.to_string(),
            "-j",
            "2",
            "-T",
            &args.seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(&args.url)
        .current_dir(dir)
        .output()
        .expect("running pgbench");
    for mut child in listening {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut latencies = Vec::new();
    let mut failed = 0;
    for entry in std::fs::read_dir(dir)
        .expect("the work directory")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("pgbench_{listeners}.")) {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())
            .unwrap_or_default()
            .lines()
        {
            // client_id transaction_no time script_no time_epoch time_us
            match line.split(' ').nth(2).map(str::parse::<u64>) {
                Some(Ok(us)) => latencies.push(us),
                _ => failed += 1,
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
    figures(latencies, args.seconds, failed)
}

/// The store with `procs` processes of `clients / procs` tasks each.
fn store(args: &Args, procs: usize, dir: &Path) -> Figures {
    store_op(args, "refresh", procs, dir)
}

/// The store running `op` with `procs` processes of `clients / procs` tasks each.
fn store_op(args: &Args, op: &str, procs: usize, dir: &Path) -> Figures {
    let exe = std::env::current_exe().expect("this binary");
    let start_ms = now_ms() + 3000 + 500 * procs as u64;
    let per = args.clients.div_ceil(procs);
    let children: Vec<_> = (0..procs)
        .map(|i| {
            let out = dir.join(format!("store_{procs}_{i}"));
            let mut command = Command::new(&exe);
            command.args([
                "worker",
                "--url",
                &args.url,
                "--clients",
                &per.to_string(),
                "--seconds",
                &args.seconds.to_string(),
                "--start-ms",
                &start_ms.to_string(),
                "--ops",
                op,
                "--out",
            ]);
            command.arg(&out);
            if let Some(pool) = args.pool {
                command.args(["--pool", &pool.to_string()]);
            }
            (command.spawn().expect("a worker process"), out)
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for (mut child, out) in children {
        assert!(child.wait().expect("a worker").success(), "a worker failed");
        for line in std::fs::read_to_string(&out)
            .expect("a worker's output")
            .lines()
        {
            match line.strip_prefix("errors ") {
                Some(e) => errors += e.parse::<u64>().unwrap_or(0),
                None => latencies.push(line.parse().unwrap_or(0)),
            }
        }
    }
    figures(latencies, args.seconds, errors)
}

fn run(args: Args) {
    let dir = std::env::temp_dir().join(format!("pg_scale.{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a work directory");
    psql(
        &args.url,
        &format!(
            "DROP TABLE IF EXISTS pg_scale_bench; \
             CREATE TABLE pg_scale_bench (id INT PRIMARY KEY, version BIGINT NOT NULL); \
             INSERT INTO pg_scale_bench SELECT i, 0 FROM generate_series(1, {BENCH_ROWS}) i;"
        ),
    );
    println!(
        "clients {} (split over the processes), {} s a run, refresh = one row locked and updated + one NOTIFY",
        args.clients, args.seconds
    );
    println!(
        "| processes | operation | pgbench tx req/s (p50 / p99 ms) | pgbench 1-statement req/s (p50 / p99 ms) | store req/s (p50 / p99 ms) | store errors | store / tx | store / 1-statement |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &procs in &args.procs {
        let tx = pgbench(&args, Script::Transaction, procs, &dir);
        let one = pgbench(&args, Script::Statement, procs, &dir);
        let cell = |f: &Figures| format!("{:.0} ({:.2} / {:.2})", f.rate, f.p50_ms, f.p99_ms);
        for op in &args.ops {
            let ours = store_op(&args, op, procs, &dir);
            println!(
                "| {procs} | {op} | {} | {} | {} | {} | {:.2} | {:.2} |",
                cell(&tx),
                cell(&one),
                cell(&ours),
                ours.errors,
                ours.rate / tx.rate,
                ours.rate / one.rate
            );
        }
        if tx.errors + one.errors > 0 {
            println!(
                "  (pgbench log lines not understood: {})",
                tx.errors + one.errors
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// This process's CPU time (user and system) so far: the client's share of a load, which the
/// wall time mixes with the server's and with whatever else the machine runs.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which is in parentheses): utime and stime are the
            // 12th and 13th, in clock ticks (100 a second on Linux).
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

fn rss_bytes() -> u64 {
    status_kb("VmRSS:") * 1024
}

/// Resets the kernel's peak RSS (`VmHWM`) to the current RSS.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_bytes() -> u64 {
    status_kb("VmHWM:") * 1024
}

/// Gives the allocator's free memory back to the kernel (glibc), so that the RSS that remains is
/// what is in use.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes a size and touches only the allocator's own state.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// One bucket of the view's session map: a `SessionId` (a `u128`, 16-aligned) and an `Entry`
/// (the user's key, 8 bytes, and a `SessionState`, 40), plus hashbrown's control byte.
const BUCKET_BYTES: u64 = 16 + 48 + 1;

/// The bytes of the view's session map holding `rows` sessions: hashbrown keeps at most 7/8 of
/// its buckets full, and their number is a power of two.
fn map_bytes(rows: u64) -> u64 {
    let buckets = if rows < 8 {
        8
    } else {
        (rows * 8).div_ceil(7).next_power_of_two()
    };
    buckets * BUCKET_BYTES
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// The view and `purge_expired` at `args.clients` rows.
async fn size(args: Args) {
    let rows = args.clients;
    let setup = |sql: String| {
        let url = args.url.clone();
        async move {
            tokio::task::spawn_blocking(move || psql(&url, &sql))
                .await
                .expect("psql");
        }
    };
    // Creates the tables (a store loads them too: only when there are none).
    let url = args.url.clone();
    let exists = tokio::task::spawn_blocking(move || {
        psql_value(
            &url,
            "SELECT to_regclass('matrix_auth_sessions') IS NOT NULL",
        )
    })
    .await
    .expect("psql");
    if exists != "t" {
        drop(PostgresStore::connect(&args.url).await.expect("a store"));
    }
    if !args.skip_view {
        view_at_size(&args, rows, &setup).await;
    }
    if !args.skip_purge {
        purge_at_size(&args, rows, &setup).await;
    }
    if !args.reuse {
        // A database shared with the tests must not keep millions of rows: every store that
        // connects to it loads them.
        setup("TRUNCATE matrix_auth_sessions".into()).await;
    }
}

fn psql_value(url: &str, sql: &str) -> String {
    let bin = pgbench_path(None).with_file_name("psql");
    let output = Command::new(bin)
        .args(["-qAt", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .output()
        .expect("running psql");
    assert!(output.status.success(), "psql failed: {sql}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Samples the RSS every millisecond until `stop`; returns the highest seen (the kernel's
/// `VmHWM` is the exact figure; this is a check on it).
fn sample_peak(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_bytes());
            std::thread::sleep(Duration::from_millis(1));
        }
        peak
    })
}

async fn view_at_size<F: std::future::Future<Output = ()>>(
    args: &Args,
    rows: usize,
    setup: &impl Fn(String) -> F,
) {
    let have = {
        let url = args.url.clone();
        tokio::task::spawn_blocking(move || {
            psql_value(&url, "SELECT count(*) FROM matrix_auth_sessions")
        })
        .await
        .expect("psql")
    };
    let generated = if args.reuse && have == rows.to_string() {
        None
    } else {
        let t = Instant::now();
        setup(format!(
            "TRUNCATE matrix_auth_sessions; INSERT INTO matrix_auth_sessions SELECT md5(i::text), 0, NULL, 1, TRUE, 9223372036854775807, 1, \
             '@user' || (i % 100000) || ':example.org' FROM generate_series(1, {rows}) i"
        ))
        .await;
        let generated = t.elapsed();
        // Hint bits and statistics, so that the first load does not pay for them.
        setup("VACUUM ANALYZE matrix_auth_sessions".into()).await;
        Some(generated)
    };
    trim();
    let before = rss_bytes();
    reset_peak();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_peak(stop.clone());
    let cpu = cpu_seconds();
    let t = Instant::now();
    let store = PostgresStore::connect_with(
        &args.url,
        PostgresOptions::default().setup_timeout(Duration::from_secs(600)),
    )
    .await
    .expect("a store");
    let load = t.elapsed();
    let cpu = cpu_seconds() - cpu;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = peak_bytes().max(sampler.join().expect("the sampler"));
    let after = rss_bytes();
    trim();
    let trimmed = rss_bytes();
    let per = |bytes: u64| bytes.saturating_sub(before) as f64 / rows as f64;
    println!(
        "| {rows} logged-out sessions | generated in {} | loaded in {:.2} s ({:.2} s CPU here) | peak +{} ({:.0} B/session) | after +{} ({:.0} B/session), after malloc_trim +{} ({:.0} B/session) | map {} ({:.0} B/session) |",
        generated.map_or("(reused)".to_owned(), |g| format!("{:.1} s", g.as_secs_f64())),
        load.as_secs_f64(),
        cpu,
        mb(peak.saturating_sub(before)),
        per(peak),
        mb(after.saturating_sub(before)),
        per(after),
        mb(trimmed.saturating_sub(before)),
        per(trimmed),
        mb(map_bytes(rows as u64)),
        map_bytes(rows as u64) as f64 / rows as f64,
    );
    // A reconnection: the listening connection killed, the store fails closed until it has
    // reconnected and reloaded everything (into the view it already has).
    let before = rss_bytes();
    reset_peak();
    let url = args.url.clone();
    tokio::task::spawn_blocking(move || {
        psql_value(
            &url,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'tower-matrix-auth'",
        )
    })
    .await
    .expect("psql");
    let cpu = cpu_seconds();
    let t = Instant::now();
    while store.is_healthy() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let noticed = t.elapsed();
    while !store.is_healthy() && t.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let back = t.elapsed();
    let cpu = cpu_seconds() - cpu;
    let peak = peak_bytes();
    println!(
        "| {rows} logged-out sessions, reconnection | unhealthy after {:.3} s | healthy again after {:.2} s ({:.2} s CPU here; checks refused meanwhile) | peak +{} over the loaded view ({:.0} B/session) |",
        noticed.as_secs_f64(),
        back.as_secs_f64(),
        cpu,
        mb(peak.saturating_sub(before)),
        peak.saturating_sub(before) as f64 / rows as f64
    );
    drop(store);
}

async fn purge_at_size<F: std::future::Future<Output = ()>>(
    args: &Args,
    rows: usize,
    setup: &impl Fn(String) -> F,
) {
    // Purge: the same number of expired rows.
    setup(format!(
        "TRUNCATE matrix_auth_sessions; INSERT INTO matrix_auth_sessions SELECT md5(i::text), 0, NULL, 1, TRUE, 1000, 1, \
         '@user' || (i % 100000) || ':example.org' FROM generate_series(1, {rows}) i"
    ))
    .await;
    setup("VACUUM ANALYZE matrix_auth_sessions".into()).await;
    // Each batch's own time, from the server's statement log (the store has no per-batch hook).
    let log = statement_log();
    let log_from = log
        .as_ref()
        .and_then(|l| std::fs::metadata(l).ok())
        .map_or(0, |m| m.len());
    if log.is_some() {
        setup("ALTER SYSTEM SET log_min_duration_statement = 0".into()).await;
        setup("SELECT pg_reload_conf()".into()).await;
    }
    let store = PostgresStore::connect(&args.url).await.expect("a store");
    let t = Instant::now();
    let deleted = store.purge_expired().await.expect("a purge");
    let batched = t.elapsed();
    drop(store);
    if let Some(log) = log {
        setup("ALTER SYSTEM RESET log_min_duration_statement".into()).await;
        setup("SELECT pg_reload_conf()".into()).await;
        print_batches(&log, log_from);
    }
    setup(format!(
        "INSERT INTO matrix_auth_sessions SELECT md5(i::text), 0, NULL, 1, TRUE, 1000, 1, \
         '@user' || (i % 100000) || ':example.org' FROM generate_series(1, {rows}) i"
    ))
    .await;
    setup("VACUUM ANALYZE matrix_auth_sessions".into()).await;
    let t = Instant::now();
    setup("DELETE FROM matrix_auth_sessions WHERE until_ms <= 2000".into()).await;
    let single = t.elapsed();
    println!(
        "| purge {deleted} expired rows | batched: {:.2} s in {} statements ({:.1} ms each) | one DELETE: {:.2} s holding every row lock |",
        batched.as_secs_f64(),
        deleted.div_ceil(5000),
        batched.as_secs_f64() * 1000.0 / deleted.div_ceil(5000).max(1) as f64,
        single.as_secs_f64()
    );
}

/// The server's log of the throwaway server (`scripts/postgres.sh` writes it to
/// `$MATRIX_TEST_PG_DIR/log`), if there is one.
fn statement_log() -> Option<PathBuf> {
    std::env::var_os("MATRIX_TEST_PG_DIR")
        .map(|dir| PathBuf::from(dir).join("log"))
        .filter(|log| log.exists())
}

/// The durations the server logged (`log_min_duration_statement = 0`) for the purge's batches,
/// the `DELETE … USING doomed` statements executed after byte `from` of `log`.
fn print_batches(log: &Path, from: u64) {
    use std::io::{Read, Seek};
    let mut text = String::new();
    let mut file = std::fs::File::open(log).expect("the server's log");
    file.seek(std::io::SeekFrom::Start(from))
        .expect("seeking the log");
    file.read_to_string(&mut text).expect("reading the log");
    // `… LOG:  duration: 53.712 ms  execute s3: WITH doomed AS (…) DELETE FROM …`
    let mut us: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("execute") && l.contains("DELETE FROM matrix_auth_sessions"))
        .filter_map(|l| {
            l.split("duration: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map(|ms| (ms * 1000.0) as u64)
        .collect();
    let (first, last) = (us.first().copied(), us.last().copied());
    let n = us.len();
    let total_ms = us.iter().sum::<u64>() as f64 / 1000.0;
    let f = figures(std::mem::take(&mut us), 1, 0);
    let ms = |v: Option<u64>| v.map_or(f64::NAN, |v| v as f64 / 1000.0);
    println!(
        "| purge batches (server-side, {n} logged) | mean {:.1} ms | p50 {:.1} ms | p99 {:.1} ms | max {:.1} ms | first {:.1} ms, last {:.1} ms |",
        total_ms / n.max(1) as f64,
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        ms(first),
        ms(last)
    );
}

/// The time from a logout acknowledged on one store to its refusal on three others, under the
/// refresh load of `args.procs[0]` worker processes.
async fn fanout(args: Args) {
    use tower_matrix_auth::hooks::{Revocation, RevocationStatus};
    use tower_matrix_auth::TokenType;
    let procs = args.procs.first().copied().unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("pg_scale_fanout.{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a work directory");
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(PostgresStore::connect(&args.url).await.expect("a store"));
    }
    let origin = engine(stores[0].clone());
    let parts = http::Request::new(()).into_parts().0;
    let load = {
        let args = Args {
            url: args.url.clone(),
            clients: args.clients,
            seconds: args.seconds,
            procs: vec![procs],
            pgbench: None,
            start_ms: 0,
            out: None,
            pool: args.pool,
            skip_view: true,
            skip_purge: true,
            reuse: false,
            ops: vec!["refresh".into()],
            homeserver: None,
            fanout: false,
            sticky: false,
        };
        let dir = dir.clone();
        std::thread::spawn(move || store(&args, procs, &dir))
    };
    // The workers start 3 s + 0.5 s a process from now; probe in the middle of their run.
    tokio::time::sleep(Duration::from_millis(3000 + 500 * procs as u64 + 1000)).await;
    let mut latencies = Vec::new();
    let probe_until = Instant::now() + Duration::from_secs(args.seconds.saturating_sub(2).max(1));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    while Instant::now() < probe_until {
        let tokens = origin.login(
            "@fanout:example.org",
            &tower_matrix_auth::lifecycle::SessionRequest::new(),
        );
        let user = origin
            .verifier()
            .verify(tokens.access_token.as_bytes(), TokenType::Access, &parts)
            .expect("a valid token");
        origin.logout(&user).await.expect("a logout");
        let committed = Instant::now();
        let mut pending: Vec<usize> = vec![1, 2, 3];
        while !pending.is_empty() && committed.elapsed() < Duration::from_secs(5) {
            pending.retain(|&k| {
                let mut check = stores[k].check(&user);
                match std::pin::Pin::new(&mut check).poll(&mut cx) {
                    std::task::Poll::Ready(Ok(RevocationStatus::Revoked)) => {
                        latencies.push(committed.elapsed().as_micros() as u64);
                        false
                    }
                    _ => true,
                }
            });
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probes = latencies.len();
    let ours = load.join().expect("the load");
    let fan = figures(latencies, 1, 0);
    println!(
        "| {procs} load processes, {:.0} refreshes/s | {} refusals seen | fan-out p50 {:.2} ms, p99 {:.2} ms |",
        ours.rate, probes, fan.p50_ms, fan.p99_ms
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pg_scale http`: the same operations through the example homeserver's HTTP endpoints, with
/// 1, 2 and 4 homeserver processes on loopback against the one database, and (`--fanout 1`) the
/// NOTIFY fan-out between four homeserver processes, timed over HTTP.
mod over_http {
    use super::{figures, pgbench, psql, Args, Figures, Script, BENCH_ROWS};
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::client::conn::http1::SendRequest;
    use hyper_util::rt::TokioIo;
    use serde_json::{json, Value};
    use tokio::net::TcpStream;
    use tower_matrix_auth::lifecycle::SessionRequest;
    use tower_matrix_auth::{Issuer, KeyRing, MacaroonSecret, MemoryStore, Sessions, Verifier};

    pub const ALL_OPS: [&str; 5] = ["login", "refresh", "tokenrefresh", "logout", "logout-all"];
    const PASSWORD: &str = "pg_scale password";
    /// The homeservers' `MATRIX_MACAROON_SECRET` (32 bytes or more: no warning in their logs).
    const SECRET: &str = "pg_scale http macaroon secret, 32+ bytes";
    const SERVER_NAME: &str = "localhost";
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
    const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

    /// One homeserver process.
    struct Server {
        child: Child,
        addr: SocketAddr,
        log: PathBuf,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn homeserver(given: Option<&Path>) -> PathBuf {
        given.map(Path::to_path_buf).unwrap_or_else(|| {
            // target/release/pg_scale → target/release/examples/homeserver
            std::env::current_exe()
                .expect("this binary")
                .with_file_name("examples")
                .join("homeserver")
        })
    }

    /// Starts `procs` homeservers on free loopback ports, all with the same secret and database.
    fn start(args: &Args, procs: usize, dir: &Path) -> Vec<Server> {
        let users: Vec<String> = (0..args.clients)
            .map(|i| format!("bench{i}:{PASSWORD}"))
            .collect();
        (0..procs)
            .map(|i| {
                let log = dir.join(format!("homeserver_{procs}_{i}.log"));
                let mut command = Command::new(homeserver(args.homeserver.as_deref()));
                if let Some(pool) = args.pool {
                    command.env("MATRIX_DATABASE_POOL", pool.to_string());
                }
                let mut child = command
                    .env("MATRIX_LISTEN", "127.0.0.1:0")
                    .env("MATRIX_DATABASE_URL", &args.url)
                    .env("MATRIX_MACAROON_SECRET", SECRET)
                    .env("MATRIX_SERVER_NAME", SERVER_NAME)
                    .env("MATRIX_USERS", users.join(","))
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(&log).expect("a log file"))
                    .spawn()
                    .expect("starting the homeserver (cargo build --release --example homeserver)");
                let stdout = child.stdout.take().expect("its stdout");
                let addr = BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .find_map(|l| l.strip_prefix("listening on http://").map(str::to_owned))
                    .unwrap_or_else(|| {
                        panic!("homeserver {i} did not start: see {}", log.display())
                    })
                    .parse()
                    .expect("an address");
                Server { child, addr, log }
            })
            .collect()
    }

    /// The lines of the servers' logs at `WARN` or `ERROR`.
    fn server_complaints(servers: &[Server]) -> Vec<String> {
        let mut lines = Vec::new();
        for s in servers {
            let text = std::fs::read_to_string(&s.log).unwrap_or_default();
            for l in text.lines() {
                let l = l.trim();
                // Expected: the servers mint tokens that never expire (no lifetimes are set).
                if (l.contains("WARN") || l.contains("ERROR")) && !l.contains("never expire") {
                    lines.push(l.to_owned());
                }
            }
        }
        lines
    }

    /// One keep-alive HTTP/1.1 connection, reopened after an error.
    struct Conn {
        addr: SocketAddr,
        sender: Option<SendRequest<Full<Bytes>>>,
    }

    impl Conn {
        fn new(addr: SocketAddr) -> Self {
            Conn { addr, sender: None }
        }

        /// The status and the body, or why there was none.
        async fn send(
            &mut self,
            method: Method,
            path: &str,
            token: Option<&str>,
            body: Option<&Value>,
        ) -> Result<(StatusCode, Bytes), String> {
            if self.sender.is_none() {
                let stream = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let _ = stream.set_nodelay(true);
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                tokio::task::spawn_local(connection);
                self.sender = Some(sender);
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
            let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let (parts, body) = response.into_parts();
                Ok::<_, hyper::Error>((parts.status, body.collect().await?.to_bytes()))
            })
            .await;
            match answer {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(e)) => {
                    self.sender = None;
                    Err(format!("connection error: {e}"))
                }
                Err(_) => {
                    self.sender = None;
                    Err("no answer in 10 s".into())
                }
            }
        }
    }

    /// A status and errcode, or a transport failure, as counted in the report.
    fn class(answer: &Result<(StatusCode, Bytes), String>) -> String {
        match answer {
            Ok((status, body)) => {
                let json: Value = serde_json::from_slice(body).unwrap_or_default();
                match json["errcode"].as_str() {
                    Some(code) => format!("{} {code}", status.as_u16()),
                    None => status.as_u16().to_string(),
                }
            }
            Err(why) => why.split(':').next().unwrap_or(why).to_owned(),
        }
    }

    /// The field `key` of a 2xx answer's JSON body.
    fn field(answer: &Result<(StatusCode, Bytes), String>, key: &str) -> Option<String> {
        match answer {
            Ok((status, body)) if status.is_success() => serde_json::from_slice::<Value>(body)
                .ok()?
                .get(key)?
                .as_str()
                .map(str::to_owned),
            _ => None,
        }
    }

    fn login_body(i: usize) -> Value {
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": format!("bench{i}")},
            "password": PASSWORD,
            "refresh_token": true,
        })
    }

    /// Mints sessions here, as a login on a homeserver would (a login stores nothing), so that a
    /// logout's request is the only one timed.
    fn minting() -> Sessions {
        let keys = || KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET));
        let issuer = Issuer::new(keys()).location(SERVER_NAME);
        Sessions::new(issuer, Verifier::new(keys()), MemoryStore::new())
    }

    /// What one run of an operation measured: the 2xx answers' latencies (µs) and every other
    /// answer by class.
    #[derive(Default)]
    struct Tally {
        latencies: Vec<u64>,
        errors: BTreeMap<String, u64>,
    }

    impl Tally {
        fn merge(&mut self, other: Tally) {
            self.latencies.extend(other.latencies);
            for (k, v) in other.errors {
                *self.errors.entry(k).or_default() += v;
            }
        }
    }

    /// Client `i`'s loop: `op` until `end`, request `k` to process `(i + k) % procs`.
    async fn client(
        i: usize,
        op: &'static str,
        addrs: Rc<Vec<SocketAddr>>,
        begin: Instant,
        end: Instant,
        mint: Rc<Sessions>,
        sticky: bool,
    ) -> Tally {
        let mut conns: Vec<Conn> = addrs.iter().map(|&a| Conn::new(a)).collect();
        let procs = conns.len();
        let mut tally = Tally::default();
        // A session to refresh, from a login over HTTP (untimed).
        let mut refresh = None;
        if op == "refresh" || op == "tokenrefresh" {
            let answer = conns[i % procs]
                .send(
                    Method::POST,
                    "/_matrix/client/v3/login",
                    None,
                    Some(&login_body(i)),
                )
                .await;
            refresh = Some(field(&answer, "refresh_token").expect("a login with a refresh token"));
        }
        for c in &mut conns {
            // Connected before the clock starts.
            let _ = c
                .send(Method::GET, "/_matrix/client/versions", None, None)
                .await;
        }
        let user = format!("@bench{i}:{SERVER_NAME}");
        tokio::time::sleep_until(begin.into()).await;
        let mut k = i;
        while Instant::now() < end {
            let conn = &mut conns[if sticky { i % procs } else { k % procs }];
            k += 1;
            let t = Instant::now();
            let answer = match op {
                "login" => {
                    conn.send(
                        Method::POST,
                        "/_matrix/client/v3/login",
                        None,
                        Some(&login_body(i)),
                    )
                    .await
                }
                "refresh" | "tokenrefresh" => {
                    let path = if op == "refresh" {
                        "/_matrix/client/v3/refresh"
                    } else {
                        "/_matrix/client/r0/tokenrefresh"
                    };
                    let body = json!({ "refresh_token": refresh.as_deref() });
                    let answer = conn.send(Method::POST, path, None, Some(&body)).await;
                    if let Some(next) = field(&answer, "refresh_token") {
                        refresh = Some(next);
                    }
                    answer
                }
                "logout" | "logout-all" => {
                    // logout/all raises the user's floor, which a session minted here (epoch 0)
                    // would be under: a fresh user each time.
                    let user = if op == "logout" {
                        user.clone()
                    } else {
                        format!("@bench{i}x{k}:{SERVER_NAME}")
                    };
                    let tokens = mint.login(&user, &SessionRequest::new());
                    let t = Instant::now();
                    let path = if op == "logout" {
                        "/_matrix/client/v3/logout"
                    } else {
                        "/_matrix/client/v3/logout/all"
                    };
                    let answer = conn
                        .send(
                            Method::POST,
                            path,
                            Some(&tokens.access_token),
                            Some(&json!({})),
                        )
                        .await;
                    if answer.as_ref().is_ok_and(|(s, _)| s.is_success()) {
                        tally.latencies.push(t.elapsed().as_micros() as u64);
                    } else {
                        *tally.errors.entry(class(&answer)).or_default() += 1;
                    }
                    continue;
                }
                other => panic!("unknown operation {other}"),
            };
            if answer.as_ref().is_ok_and(|(s, _)| s.is_success()) {
                tally.latencies.push(t.elapsed().as_micros() as u64);
            } else {
                *tally.errors.entry(class(&answer)).or_default() += 1;
                if refresh.is_some() {
                    // The chain is broken: a new session (untimed, but inside the window).
                    let answer = conn
                        .send(
                            Method::POST,
                            "/_matrix/client/v3/login",
                            None,
                            Some(&login_body(i)),
                        )
                        .await;
                    refresh = field(&answer, "refresh_token").or(refresh);
                }
            }
        }
        tally
    }

    /// `clients` clients running `op` against the servers for `seconds`.
    async fn load(args: &Args, op: &'static str, addrs: &[SocketAddr]) -> Tally {
        let addrs = Rc::new(addrs.to_vec());
        let mint = Rc::new(minting());
        let begin = Instant::now() + Duration::from_secs(2);
        let end = begin + Duration::from_secs(args.seconds);
        let tasks: Vec<_> = (0..args.clients)
            .map(|i| {
                tokio::task::spawn_local(client(
                    i,
                    op,
                    addrs.clone(),
                    begin,
                    end,
                    mint.clone(),
                    args.sticky,
                ))
            })
            .collect();
        let mut tally = Tally::default();
        for t in tasks {
            tally.merge(t.await.expect("a client"));
        }
        tally
    }

    pub fn run(args: Args) {
        let dir = std::env::temp_dir().join(format!("pg_scale_http.{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a work directory");
        psql(
            &args.url,
            &format!(
                "DROP TABLE IF EXISTS pg_scale_bench; \
                 CREATE TABLE pg_scale_bench (id INT PRIMARY KEY, version BIGINT NOT NULL); \
                 INSERT INTO pg_scale_bench SELECT i, 0 FROM generate_series(1, {BENCH_ROWS}) i;"
            ),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let local = tokio::task::LocalSet::new();
        // Creates the store's tables, so that they can be emptied between rows.
        local.block_on(&runtime, async {
            drop(
                tower_matrix_auth::PostgresStore::connect(&args.url)
                    .await
                    .expect("a store"),
            )
        });
        println!(
            "HTTP: {} clients (one keep-alive connection to each homeserver process, requests {}), {} s a run; login = POST /v3/login with a refresh token; refresh, tokenrefresh = a chain of POST /v3/refresh (/r0/tokenrefresh), each with the previous answer's refresh token; logout, logout-all = POST /v3/logout (/logout/all) of a session minted by the client",
            args.clients,
            if args.sticky {
                "each to one process (sticky)"
            } else {
                "round-robin"
            },
            args.seconds
        );
        println!(
            "| processes | operation | pgbench tx req/s (p50 / p99 ms) | pgbench 1-statement req/s (p50 / p99 ms) | HTTP req/s (p50 / p99 ms) | non-2xx | HTTP / tx | HTTP / 1-statement |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut failures = Vec::new();
        let mut complaints = Vec::new();
        let cell = |f: &Figures| format!("{:.0} ({:.2} / {:.2})", f.rate, f.p50_ms, f.p99_ms);
        for &procs in &args.procs {
            let tx = pgbench(&args, Script::Transaction, procs, &dir);
            let one = pgbench(&args, Script::Statement, procs, &dir);
            psql(
                &args.url,
                "TRUNCATE matrix_auth_sessions; TRUNCATE matrix_auth_users",
            );
            let servers = start(&args, procs, &dir);
            let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
            for op in &args.ops {
                let op: &'static str = ALL_OPS
                    .iter()
                    .find(|o| *o == op)
                    .unwrap_or_else(|| panic!("unknown operation {op}"));
                let tally = local.block_on(&runtime, load(&args, op, &addrs));
                let errors: u64 = tally.errors.values().sum();
                for (class, n) in &tally.errors {
                    failures.push(format!("{procs} processes, {op}: {n} × {class}"));
                }
                let ours = figures(tally.latencies, args.seconds, errors);
                let (vs_tx, vs_one) = if op == "login" {
                    ("–".to_owned(), "–".to_owned())
                } else {
                    (
                        format!("{:.2}", ours.rate / tx.rate),
                        format!("{:.2}", ours.rate / one.rate),
                    )
                };
                println!(
                    "| {procs} | {op} | {} | {} | {} | {errors} | {vs_tx} | {vs_one} |",
                    cell(&tx),
                    cell(&one),
                    cell(&ours),
                );
            }
            if args.fanout && procs == 4 {
                let line = fanout(&args, &addrs, &mut failures);
                println!("{line}");
            }
            complaints.extend(server_complaints(&servers));
        }
        if args.fanout && !args.procs.contains(&4) {
            let servers = start(&args, 4, &dir);
            let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
            let line = fanout(&args, &addrs, &mut failures);
            println!("{line}");
            complaints.extend(server_complaints(&servers));
        }
        let _ = std::fs::remove_dir_all(&dir);
        if !complaints.is_empty() {
            println!(
                "homeserver log lines at WARN or ERROR: {}",
                complaints.len()
            );
            for l in complaints.iter().take(10) {
                println!("  {l}");
            }
        }
        if !failures.is_empty() {
            println!("FAILED: answers other than 2xx (or none):");
            for f in &failures {
                println!("  {f}");
            }
            std::process::exit(1);
        }
    }

    /// What the fan-out probe saw.
    #[derive(Default)]
    struct Probe {
        logouts: u64,
        /// From the logout's 200 to the first 401 on another process, µs.
        delays: Vec<u64>,
        /// The round trip of each poll that saw the 401, µs: how late the refusal may have been
        /// seen (it happened between that poll's request and its answer, or before).
        rtts: Vec<u64>,
        first_poll: u64,
        missed: u64,
        failures: Vec<String>,
    }

    /// While the clients refresh (round-robin over the processes), log a fresh session out on the
    /// first process every ~20 ms and poll whoami on the others, back to back on keep-alive
    /// connections, until each refuses the token. The probe runs on a thread and runtime of its
    /// own, so that its timestamps do not wait for the load's tasks.
    fn fanout(args: &Args, addrs: &[SocketAddr], failures: &mut Vec<String>) -> String {
        assert!(addrs.len() >= 2, "fan-out needs two processes");
        let probe_addrs = addrs.to_vec();
        let seconds = args.seconds;
        let probe = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            tokio::task::LocalSet::new().block_on(&runtime, probe(probe_addrs, seconds))
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let tally = tokio::task::LocalSet::new().block_on(&runtime, load(args, "refresh", addrs));
        let probe = probe.join().expect("the probe");
        failures.extend(probe.failures);
        let load_errors: u64 = tally.errors.values().sum();
        for (class, k) in &tally.errors {
            failures.push(format!("fan-out load (refresh): {k} × {class}"));
        }
        if probe.missed > 0 {
            failures.push(format!(
                "fan-out: {} refusals not seen within 5 s",
                probe.missed
            ));
        }
        let load_rate = figures(tally.latencies, args.seconds, 0).rate;
        let timed = probe.delays.len();
        let fan = figures(probe.delays, 1, 0);
        let rtt = figures(probe.rtts, 1, 0);
        format!(
            "| fan-out, {} processes, {:.0} refreshes/s ({load_errors} non-2xx) | {} logouts, {timed} refusals timed, {:.0}% at the first poll | logout's 200 → first 401 elsewhere: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms | the 401 poll's round trip (the resolution): p50 {:.2} ms, p99 {:.2} ms |",
            addrs.len(),
            load_rate,
            probe.logouts,
            100.0 * probe.first_poll as f64 / timed.max(1) as f64,
            fan.p50_ms,
            fan.p99_ms,
            fan.max_ms,
            rtt.p50_ms,
            rtt.p99_ms,
        )
    }

    async fn probe(addrs: Vec<SocketAddr>, seconds: u64) -> Probe {
        // The load's clients start in 2 s; probe inside their run.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mint = minting();
        let mut origin = Conn::new(addrs[0]);
        let mut others: Vec<Conn> = addrs[1..].iter().map(|&a| Conn::new(a)).collect();
        let mut p = Probe::default();
        let until = Instant::now() + Duration::from_secs(seconds.saturating_sub(2).max(1));
        while Instant::now() < until {
            p.logouts += 1;
            let user = format!("@fanout{}:{SERVER_NAME}", p.logouts);
            let token = mint.login(&user, &SessionRequest::new()).access_token;
            // Known (and in the verified-token cache) on every other process first.
            for c in &mut others {
                let answer = c.send(Method::GET, WHOAMI, Some(&token), None).await;
                if !answer.as_ref().is_ok_and(|(s, _)| s.is_success()) {
                    p.failures.push(format!(
                        "fan-out, whoami before the logout: {}",
                        class(&answer)
                    ));
                }
            }
            let answer = origin
                .send(
                    Method::POST,
                    "/_matrix/client/v3/logout",
                    Some(&token),
                    Some(&json!({})),
                )
                .await;
            let acknowledged = Instant::now();
            if !answer.as_ref().is_ok_and(|(s, _)| s.is_success()) {
                p.failures
                    .push(format!("fan-out, logout: {}", class(&answer)));
                continue;
            }
            let polls = others.iter_mut().map(|c| {
                let token = token.clone();
                async move {
                    let mut rtts = Vec::new();
                    while acknowledged.elapsed() < Duration::from_secs(5) {
                        let t = Instant::now();
                        let answer = c.send(Method::GET, WHOAMI, Some(&token), None).await;
                        rtts.push(t.elapsed().as_micros() as u64);
                        match &answer {
                            Ok((s, _)) if s.is_success() => continue,
                            Ok((s, _)) if *s == StatusCode::UNAUTHORIZED => {
                                return (Some(acknowledged.elapsed()), rtts, None)
                            }
                            _ => return (None, rtts, Some(class(&answer))),
                        }
                    }
                    (None, rtts, None)
                }
            });
            for (delay, rtts, wrong) in futures_join(polls).await {
                let polls = rtts.len();
                if delay.is_some() {
                    p.rtts.extend(rtts.last());
                }
                match (delay, wrong) {
                    (Some(d), _) => {
                        p.delays.push(d.as_micros() as u64);
                        if polls == 1 {
                            p.first_poll += 1;
                        }
                    }
                    (None, Some(class)) => {
                        p.failures.push(format!("fan-out, whoami after: {class}"))
                    }
                    (None, None) => p.missed += 1,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// Runs the futures concurrently (on this task) and returns their outputs in order.
    async fn futures_join<F: std::future::Future>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut futures: Vec<_> = futures.map(|f| Some(Box::pin(f))).collect();
        let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
                if let Some(fut) = f {
                    match fut.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            *out = Some(v);
                            *f = None;
                        }
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        outputs.into_iter().map(|o| o.expect("an output")).collect()
    }
}
