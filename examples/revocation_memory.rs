//! Measures what revocation state costs: entries and heap bytes after one million login/logout
//! cycles, with the default issuer (tokens without `time <`: every logout is kept for good) and
//! with lifetimes on every token (the sweep forgets a logout once the session's tokens have
//! stopped verifying).
//!
//! ```text
//! cargo run --release --example revocation_memory
//! MATRIX_DATABASE_URL=postgresql://… cargo run --release --example revocation_memory
//! ```
//!
//! With `MATRIX_DATABASE_URL`, it also measures the PostgreSQL store: the table's size and a new
//! process's view (heap bytes, load time) over one million logged-out sessions written with SQL,
//! after checking on a few thousand real cycles that the store writes what the SQL writes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tower_matrix_auth::{
    hooks::{Clock, ManualClock, SystemClock},
    lifecycle::SessionRequest,
    Issuer, KeyRing, MacaroonSecret, MemoryStore, Sessions, TokenType, Verifier,
};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CYCLES: u64 = 1_000_000;
const USERS: u64 = 10_000;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn keys() -> KeyRing {
    KeyRing::new().with_key(
        "key",
        MacaroonSecret::from_passphrase("revocation memory measurement secret"),
    )
}

/// `cycles` logins, each logged out at once, through `sessions`.
async fn login_logout(sessions: &Sessions, verifier: &Verifier, cycles: u64) {
    let parts = http::Request::new(()).into_parts().0;
    for i in 0..cycles {
        let user_id = format!("@user{}:example.org", i % USERS);
        let tokens = sessions.login(&user_id, &SessionRequest::default());
        let user = verifier
            .verify(tokens.access_token.as_bytes(), TokenType::Access, &parts)
            .expect("just minted");
        sessions.logout(&user).await.expect("the store answers");
    }
}

async fn memory() {
    for (name, issuer) in [
        ("default issuer (no lifetimes)", Issuer::new(keys())),
        (
            "every token with a lifetime (1 h access, 1 d refresh)",
            Issuer::new(keys())
                .access_lifetime(Some(std::time::Duration::from_millis(3_600_000)))
                .refresh_lifetime(Some(std::time::Duration::from_millis(86_400_000))),
        ),
    ] {
        let clock = ManualClock::new(SystemClock.now_ms());
        let store = MemoryStore::new().with_clock(clock.clone());
        let verifier = Verifier::new(keys()).clock(clock.clone()).token_cache(0);
        let sessions = Sessions::new(issuer.clock(clock.clone()), verifier.clone(), store.clone());
        let before = LIVE.load(Ordering::Relaxed);
        let started = Instant::now();
        login_logout(&sessions, &verifier, CYCLES).await;
        let used = LIVE.load(Ordering::Relaxed) - before;
        println!(
            "memory store, {name}: {CYCLES} login/logout cycles in {:.1} s: {} entries, {:.1} MiB heap, {:.0} bytes per entry",
            started.elapsed().as_secs_f64(),
            store.len(),
            mib(used),
            used as f64 / store.len().max(1) as f64,
        );
        clock.advance_ms(86_400_000 + 1);
        store.sweep();
        println!(
            "  a day later, after the sweep: {} entries, {:.1} MiB heap",
            store.len(),
            mib(LIVE.load(Ordering::Relaxed) - before)
        );
    }
}

async fn postgres(url: &str) {
    use tower_matrix_auth::PostgresStore;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("the database answers");
    tokio::spawn(connection);
    // Real cycles first: the rows the store writes for a logged-out session of the default issuer.
    let store = PostgresStore::connect(url).await.expect("connects");
    let verifier = Verifier::new(keys()).token_cache(0);
    let sessions = Sessions::new(Issuer::new(keys()), verifier.clone(), store.clone());
    let real = 2_000;
    let started = Instant::now();
    login_logout(&sessions, &verifier, real).await;
    println!(
        "postgres store: {real} real login/logout cycles in {:.1} s ({:.0} logouts/s)",
        started.elapsed().as_secs_f64(),
        real as f64 / started.elapsed().as_secs_f64()
    );
    let forever: i64 = client
        .query_one(
            "SELECT count(*) FROM matrix_auth_sessions WHERE revoked AND until_ms = $1",
            &[&i64::MAX],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        forever >= real as i64,
        "every logout of the default issuer is kept for good"
    );
    // Then a million such rows, as SQL writes them.
    client
        .execute(
            "INSERT INTO matrix_auth_sessions (session_id, live_generation, pending_generation, next_generation, revoked, until_ms, version, user_id) \
             SELECT md5('revocation-memory-' || g), 0, NULL, 1, TRUE, $1, 1, '@user' || (g % 10000) || ':example.org' \
             FROM generate_series(1, $2::bigint) AS g ON CONFLICT DO NOTHING",
            &[&i64::MAX, &(CYCLES as i64)],
        )
        .await
        .unwrap();
    let (rows, bytes): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), pg_total_relation_size('matrix_auth_sessions') FROM matrix_auth_sessions",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    println!(
        "postgres store: {rows} rows, table and indexes {:.1} MiB ({:.0} bytes per row)",
        mib(bytes as usize),
        bytes as f64 / rows as f64
    );
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    let fresh = PostgresStore::connect(url).await.expect("connects");
    let loaded = started.elapsed();
    let used = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "postgres store: a new process loads its view in {:.2} s: {:.1} MiB heap ({:.0} bytes per session)",
        loaded.as_secs_f64(),
        mib(used),
        used as f64 / rows as f64
    );
    drop(fresh);
    client
        .execute(
            "DELETE FROM matrix_auth_sessions WHERE user_id LIKE '@user%:example.org' AND version = 1 AND revoked",
            &[],
        )
        .await
        .unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    memory().await;
    if let Ok(url) = std::env::var("MATRIX_DATABASE_URL") {
        postgres(&url).await;
    }
}
