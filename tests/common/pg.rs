//! The PostgreSQL server `scripts/postgres.sh` started for the tests.

/// Whether this test must skip for want of a PostgreSQL server: a plain `cargo test` on a fresh
/// clone has none, and says so; `./scripts/test.sh` starts one and sets
/// `MATRIX_REQUIRE_POSTGRES`, under which a missing server fails the test instead.
pub fn skip() -> bool {
    if std::env::var_os("MATRIX_TEST_DATABASE_URL").is_some() {
        return false;
    }
    assert!(
        std::env::var_os("MATRIX_REQUIRE_POSTGRES").is_none(),
        "MATRIX_REQUIRE_POSTGRES is set but MATRIX_TEST_DATABASE_URL is not"
    );
    eprintln!(
        "skipped: needs PostgreSQL (MATRIX_TEST_DATABASE_URL unset; ./scripts/test.sh starts one)"
    );
    true
}

pub fn database_url() -> String {
    std::env::var("MATRIX_TEST_DATABASE_URL").expect(
        "MATRIX_TEST_DATABASE_URL is not set: run ./scripts/test.sh, or `eval \"$(scripts/postgres.sh start)\"` first",
    )
}

/// Runs the server's control script (`stop -m fast`, `start`).
pub fn pg_ctl(args: &[&str]) {
    let ctl = std::env::var("MATRIX_TEST_PG_CTL")
        .expect("MATRIX_TEST_PG_CTL is not set: see scripts/postgres.sh");
    let status = std::process::Command::new(ctl)
        .args(args)
        .status()
        .expect("pg_ctl runs");
    assert!(status.success(), "pg_ctl {args:?} failed");
}

/// Waits until `condition` holds, polling every millisecond; returns how long it took.
pub async fn wait_until(
    limit: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < limit,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    start.elapsed()
}

/// The result of a future if it is ready on its first poll (a store answering from its view).
pub fn poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(&mut future).poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// A new, empty database on the test server, for a test that must not see other tests' rows;
/// returns its URL.
pub async fn fresh_database_url(name: &str) -> String {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the test database answers");
    tokio::spawn(connection);
    let dbname = format!(
        "{name}_{:x}",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    );
    client
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .expect("CREATE DATABASE");
    let (base, query) = url
        .split_once('?')
        .map_or((url.as_str(), ""), |(b, q)| (b, q));
    let (server, _) = base.rsplit_once('/').expect("a URL with a database path");
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{server}/{dbname}{query}")
}
