//! The PostgreSQL store against a real server: two processes' worth of stores and layers sharing
//! it, propagation of revocations between them, a restart, and real concurrency.
#![cfg(all(feature = "postgres", feature = "axum"))]

use std::sync::Arc;
use std::time::Duration;

use crate::common::pg::{database_url, poll_once, wait_until};
use crate::common::server::{refresh_body, send, start_with, WHOAMI};
use crate::common::*;
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{ManualClock, Revocation, RevocationStatus},
    lifecycle::SessionRequest,
    PostgresStore, TokenType,
};

/// A user id unique to this run: the database outlives test runs on a developer's machine.
fn uid(name: &str) -> String {
    format!(
        "{name}-{:x}:example.org",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    )
}

async fn status(store: &PostgresStore, token: &str) -> RevocationStatus {
    let parts = http::Request::new(()).into_parts().0;
    let verifier = tower_matrix_auth::Verifier::new(keys()).clock(ManualClock::new(NOW_MS));
    let user = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts)
        .expect("a valid token");
    store.check(&user).await.expect("store healthy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_revocations_and_a_restart_loses_nothing() {
    if crate::common::pg::skip() {
        return;
    }
    let url = database_url();
    let a = PostgresStore::connect(&url).await.unwrap();
    let b = PostgresStore::connect(&url).await.unwrap();
    let clock = ManualClock::new(NOW_MS);
    let server_a = start_with(Arc::new(a.clone()), clock.clone()).await;
    let server_b = start_with(Arc::new(b.clone()), clock.clone()).await;

    let login = server_a.sessions.login(
        &uid("@pg-share"),
        &SessionRequest::new().device_id("D1").refresh(true),
    );
    let token = login.access_token.clone();
    assert_eq!(
        send(server_a.addr, "GET", WHOAMI, Some(&token), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send(server_b.addr, "GET", WHOAMI, Some(&token), None)
            .await
            .0,
        StatusCode::OK
    );

    // Logout on A; B enforces it once the notification arrives. Measured, not assumed.
    let (status_code, _, _) = send(
        server_a.addr,
        "POST",
        "/_matrix/client/v3/logout",
        Some(&token),
        Some("{}"),
    )
    .await;
    assert_eq!(status_code, StatusCode::OK);
    let mut latencies = Vec::new();
    let parts = http::Request::new(()).into_parts().0;
    let user = server_b
        .sessions
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts)
        .unwrap();
    latencies.push(
        wait_until(Duration::from_secs(5), || {
            matches!(
                poll_once(b.check(&user)),
                Some(Ok(RevocationStatus::Revoked))
            )
        })
        .await,
    );
    assert_eq!(
        send(server_b.addr, "GET", WHOAMI, Some(&token), None)
            .await
            .1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    // A few more to report a median.
    for i in 0..20 {
        let login = server_a
            .sessions
            .login(&uid(&format!("@pg-lat{i}")), &SessionRequest::default());
        let user = server_b
            .sessions
            .verifier()
            .verify(login.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        assert_eq!(b.check(&user).await.unwrap(), RevocationStatus::Active);
        server_a.sessions.logout(&user).await.unwrap();
        latencies.push(
            wait_until(Duration::from_secs(5), || {
                matches!(
                    poll_once(b.check(&user)),
                    Some(Ok(RevocationStatus::Revoked))
                )
            })
            .await,
        );
    }
    latencies.sort();
    eprintln!(
        "revocation propagation A -> B over LISTEN/NOTIFY: median {:?}, max {:?} ({} samples)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len()
    );

    // Log out everywhere on B reaches A too.
    let other = server_a
        .sessions
        .login(&uid("@pg-all"), &SessionRequest::default());
    clock.advance_ms(1);
    let (code, _, _) = send(
        server_b.addr,
        "POST",
        "/_matrix/client/v3/logout/all",
        Some(&other.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let user = server_a
        .sessions
        .verifier()
        .verify(other.access_token.as_bytes(), TokenType::Access, &parts)
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        matches!(
            poll_once(a.check(&user)),
            Some(Ok(RevocationStatus::Revoked))
        )
    })
    .await;

    // A restart (a new store, a new view loaded from the database) loses nothing.
    drop((a, b));
    let c = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(status(&c, &token).await, RevocationStatus::Revoked);
    assert_eq!(
        status(&c, &other.access_token).await,
        RevocationStatus::Revoked
    );
    let alive = server_a
        .sessions
        .login(&uid("@pg-alive"), &SessionRequest::default());
    assert_eq!(
        status(&c, &alive.access_token).await,
        RevocationStatus::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenrefresh_across_two_processes_has_exactly_one_winner() {
    if crate::common::pg::skip() {
        return;
    }
    let url = database_url();
    let clock = ManualClock::new(NOW_MS);
    let a = start_with(
        Arc::new(PostgresStore::connect(&url).await.unwrap()),
        clock.clone(),
    )
    .await;
    let b = start_with(
        Arc::new(PostgresStore::connect(&url).await.unwrap()),
        clock.clone(),
    )
    .await;
    for round in 0..3 {
        let login = a.sessions.login(
            &uid(&format!("@pg-race{round}")),
            &SessionRequest::new().refresh(true),
        );
        let body = refresh_body(login.refresh_token.as_deref().unwrap());
        let mut tasks = Vec::new();
        for i in 0..24 {
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                send(
                    addr,
                    "POST",
                    "/_matrix/client/r0/tokenrefresh",
                    None,
                    Some(&body),
                )
                .await
            }));
        }
        let mut winners = 0;
        for task in tasks {
            let (status, json, _) = task.await.unwrap();
            match status {
                StatusCode::OK => winners += 1,
                StatusCode::FORBIDDEN => assert_eq!(json["errcode"], "M_FORBIDDEN"),
                other => panic!("unexpected {other}: {json}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
        // The old access token is dead on both processes (a's own write is visible at once;
        // b's view follows the notification).
        assert_eq!(
            send(a.addr, "GET", WHOAMI, Some(&login.access_token), None)
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_refresh_first_use_is_recorded_for_every_process() {
    if crate::common::pg::skip() {
        return;
    }
    let url = database_url();
    let clock = ManualClock::new(NOW_MS);
    let a = start_with(
        Arc::new(PostgresStore::connect(&url).await.unwrap()),
        clock.clone(),
    )
    .await;
    let b = start_with(
        Arc::new(PostgresStore::connect(&url).await.unwrap()),
        clock.clone(),
    )
    .await;
    let login = a
        .sessions
        .login(&uid("@pg-rotate"), &SessionRequest::new().refresh(true));
    // A successor used on b right after a's refresh, whether or not b has heard of it yet,
    // must work (b asks the database when its view does not know the generation).
    let mut refresh = login.refresh_token.clone().unwrap();
    for _ in 0..20 {
        let (status, json, _) = send(
            a.addr,
            "POST",
            "/_matrix/client/v3/refresh",
            None,
            Some(&refresh_body(&refresh)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let next = json["access_token"].as_str().unwrap();
        assert_eq!(
            send(b.addr, "GET", WHOAMI, Some(next), None).await.0,
            StatusCode::OK
        );
        refresh = json["refresh_token"].as_str().unwrap().to_owned();
    }
    let login = a
        .sessions
        .login(&uid("@pg-rotate2"), &SessionRequest::new().refresh(true));
    let (status, json, _) = send(
        a.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(login.refresh_token.as_deref().unwrap())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let successor = json["access_token"].as_str().unwrap().to_owned();
    // The old token still works everywhere until the successor is used - on the other process.
    assert_eq!(
        send(a.addr, "GET", WHOAMI, Some(&login.access_token), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send(b.addr, "GET", WHOAMI, Some(&successor), None).await.0,
        StatusCode::OK
    );
    // b recorded the first use in the database; a hears of it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = send(a.addr, "GET", WHOAMI, Some(&login.access_token), None).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old token still works on a"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The number of sessions a store's view holds, from its `Debug` output.
fn view_sessions(store: &PostgresStore) -> usize {
    let debug = format!("{store:?}");
    let count = debug
        .split("sessions: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    count.expect("PostgresStore's Debug shows its session count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_forgets_state_whose_tokens_have_all_expired() {
    if crate::common::pg::skip() {
        return;
    }
    use tower_matrix_auth::{
        hooks::{Clock, SystemClock},
        Issuer, Sessions, Verifier,
    };
    // A database of its own: rows other tests keep for good would put off the first sweep.
    let url = crate::common::pg::fresh_database_url("view_forgets").await;
    let store = PostgresStore::connect(&url).await.unwrap();
    let parts = http::Request::new(()).into_parts().0;
    let engine = |clock: &ManualClock| {
        let issuer = Issuer::new(keys())
            .clock(clock.clone())
            .refreshable_access_lifetime(std::time::Duration::from_millis(60_000))
            .access_lifetime(Some(std::time::Duration::from_millis(60_000)))
            .refresh_lifetime(Some(std::time::Duration::from_millis(60_000)));
        let verifier = Verifier::new(keys()).clock(clock.clone());
        Sessions::new(issuer, verifier, store.clone())
    };
    // A logout now: its state must outlive every sweep until its tokens expire.
    let now = ManualClock::new(SystemClock.now_ms());
    let recent = engine(&now);
    let kept = recent.login(&uid("@pg-kept"), &SessionRequest::default());
    let kept = recent
        .verifier()
        .verify(kept.access_token.as_bytes(), TokenType::Access, &parts)
        .unwrap();
    recent.logout(&kept).await.unwrap();
    let before = view_sessions(&store);

    // Logouts of sessions whose tokens (one-minute lifetimes) were minted an hour ago: expired
    // as soon as they are written, so the view may forget them.
    let past = engine(&ManualClock::new(SystemClock.now_ms() - 3_600_000));
    let user_id = uid("@pg-old");
    for _ in 0..1100 {
        let tokens = past.login(&user_id, &SessionRequest::default());
        let user = past
            .verifier()
            .verify(tokens.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        past.logout(&user).await.unwrap();
    }
    // A sweep runs once the view holds 1024 sessions (then whenever it doubles) and drops every
    // expired one; without it the view would hold all 1100 more.
    wait_until(Duration::from_secs(10), || {
        view_sessions(&store) < before + 550
    })
    .await;
    assert_eq!(
        store.check(&kept).await.unwrap(),
        RevocationStatus::Revoked,
        "an unexpired logout survives the sweeps"
    );
}

/// A plain connection to `url`, for the test's own statements.
async fn plain(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_adopt_an_unversioned_database_and_run_once_from_many_processes() {
    if crate::common::pg::skip() {
        return;
    }
    let url = crate::common::pg::fresh_database_url("migrations").await;
    let admin = plain(&url).await;
    // The schema as releases before versioning left it, with a logout in it.
    admin
        .batch_execute(
            "CREATE TABLE matrix_auth_sessions (session_id TEXT PRIMARY KEY, \
             live_generation BIGINT NOT NULL, pending_generation BIGINT, \
             next_generation BIGINT NOT NULL, revoked BOOLEAN NOT NULL, until_ms BIGINT NOT NULL, \
             version BIGINT NOT NULL, user_id TEXT NOT NULL DEFAULT ''); \
             CREATE INDEX matrix_auth_sessions_until ON matrix_auth_sessions (until_ms); \
             CREATE TABLE matrix_auth_users (user_id TEXT PRIMARY KEY, revoked_before_ms BIGINT NOT NULL); \
             INSERT INTO matrix_auth_sessions VALUES ('00000000000000000000000000000001', 0, NULL, 1, TRUE, 9223372036854775807, 1, '@old:example.org');",
        )
        .await
        .unwrap();
    // Eight processes starting at once: each migrates under the advisory lock, one after the
    // other; the first does the work, the others find it done.
    let stores = futures_join_all(
        (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { PostgresStore::connect(&url).await })
            })
            .collect(),
    )
    .await;
    assert!(stores.iter().all(|s| s.is_ok()), "every process set up");
    let versions: Vec<i32> = admin
        .query("SELECT version FROM matrix_auth_schema", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, vec![2], "one row, at the current version");
    // Migration 2 added the refresh record; the row from before reads as never refreshed.
    let record = admin
        .query_one(
            "SELECT refreshed_generation, refreshed_at_ms FROM matrix_auth_sessions",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (record.get::<_, Option<i64>>(0), record.get::<_, i64>(1)),
        (None, 0)
    );
    let kept: i64 = admin
        .query_one("SELECT count(*) FROM matrix_auth_sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the existing rows are kept");
    // And again, on a versioned database: nothing to do.
    PostgresStore::connect(&url).await.unwrap();
    let versions: i64 = admin
        .query_one("SELECT count(*) FROM matrix_auth_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 1);
}

async fn futures_join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_expired_deletes_in_batches_and_keeps_the_rest() {
    if crate::common::pg::skip() {
        return;
    }
    let url = crate::common::pg::fresh_database_url("purge_batches").await;
    let store = PostgresStore::connect(&url).await.unwrap();
    let admin = plain(&url).await;
    // 12,345 expired rows (more than two batches) and 10 that are not.
    admin
        .batch_execute(
            "INSERT INTO matrix_auth_sessions \
             SELECT lpad(to_hex(i), 32, '0'), 0, NULL, 1, TRUE, 1000, 1, '@purged:example.org' \
             FROM generate_series(1, 12345) i; \
             INSERT INTO matrix_auth_sessions \
             SELECT lpad(to_hex(i), 32, 'f'), 0, NULL, 1, TRUE, 9223372036854775807, 1, '@kept:example.org' \
             FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 12345);
    let left: i64 = admin
        .query_one("SELECT count(*) FROM matrix_auth_sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 10);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}

/// A process whose role may use the tables but not create any (PostgreSQL 15 no longer lets every
/// role create in `public`) connects to a database at the current version: the migration check
/// then needs no DDL. On a database that still needs migrating it fails, with the database's
/// reason, until a role that may create has connected once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_create_uses_a_migrated_database() {
    if crate::common::pg::skip() {
        return;
    }
    let url = crate::common::pg::fresh_database_url("no_create").await;
    let admin = plain(&url).await;
    let role = format!(
        "matrix_auth_app_{:x}",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    );
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {database} TO {role}; \
             GRANT USAGE ON SCHEMA public TO {role}; REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
             ALTER DEFAULT PRIVILEGES IN SCHEMA public \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};"
        ))
        .await
        .unwrap();
    let (head, tail) = url.split_once("://").unwrap();
    let (_, host_and_path) = tail.split_once('@').unwrap();
    let app_url = format!("{head}://{role}@{host_and_path}");

    let refused = PostgresStore::connect(&app_url).await;
    assert!(
        refused.is_err(),
        "an empty database needs a role that may create tables"
    );

    // The operator's role migrates once; the application's role then starts, and works.
    drop(PostgresStore::connect(&url).await.unwrap());
    let app = PostgresStore::connect(&app_url).await.unwrap();
    let clock = ManualClock::new(NOW_MS);
    let server = start_with(Arc::new(app.clone()), clock).await;
    let login = server
        .sessions
        .login(&uid("@no-create"), &SessionRequest::new().refresh(true));
    let (status_code, json, _) = send(
        server.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(login.refresh_token.as_deref().unwrap())),
    )
    .await;
    assert_eq!(status_code, StatusCode::OK, "{json}");
    let (status_code, _, _) = send(
        server.addr,
        "POST",
        "/_matrix/client/v3/logout",
        Some(json["access_token"].as_str().unwrap()),
        Some("{}"),
    )
    .await;
    assert_eq!(status_code, StatusCode::OK);
    drop(app);
    let _ = admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await;
}

/// `url` with `application_name` set, so that the test can find the store's connections.
fn with_application_name(url: &str, name: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// Tokens for the load tests: `revoked` are logged out by rows the test writes itself (spread
/// over the table among filler rows), `floored` by its user's floor; `control` has no row.
struct LoadTokens {
    revoked: Vec<(String, String)>,
    floored: (String, String),
    control: String,
}

/// A database holding 25,000 filler rows and the rows of `tokens.revoked` at the start, middle
/// and end of the table (so in the first, second and last of the load's batches), and a floor
/// for `tokens.floored`'s user.
async fn database_for_load(name: &str) -> (String, LoadTokens) {
    use tower_matrix_auth::lifecycle::TokenNonce;
    let url = crate::common::pg::fresh_database_url(name).await;
    let store = PostgresStore::connect(&url).await.unwrap();
    let engine = {
        let clock = ManualClock::new(NOW_MS);
        tower_matrix_auth::Sessions::new(
            tower_matrix_auth::Issuer::new(keys()).clock(clock.clone()),
            tower_matrix_auth::Verifier::new(keys()).clock(clock),
            store.clone(),
        )
    };
    let parts = http::Request::new(()).into_parts().0;
    let mint = |name: &str| {
        let user_id = uid(name);
        let token = engine
            .login(&user_id, &SessionRequest::default())
            .access_token;
        let user = engine
            .verifier()
            .verify(token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        let session = TokenNonce::of(&user).unwrap().session;
        (token, format!("{:032x}|{user_id}", session.as_u128()))
    };
    let revoked: Vec<_> = (0..4).map(|i| mint(&format!("@load-{i}"))).collect();
    let floored = mint("@load-floored");
    let control = mint("@load-control").0;
    drop(store);
    let admin = plain(&url).await;
    let row = |key: &str| {
        let (session, user_id) = key.split_once('|').unwrap();
        format!(
            "INSERT INTO matrix_auth_sessions VALUES ('{session}', 0, NULL, 1, TRUE, \
             9223372036854775807, 1, '{user_id}');"
        )
    };
    let filler = |from: u32, to: u32| {
        format!(
            "INSERT INTO matrix_auth_sessions SELECT md5(i::text), 0, NULL, 1, TRUE, \
             9223372036854775807, 1, '@filler:example.org' FROM generate_series({from}, {to}) i;"
        )
    };
    let floored_user = floored.1.split_once('|').unwrap().1.to_owned();
    admin
        .batch_execute(&format!(
            "{}{}{}{}{}INSERT INTO matrix_auth_users VALUES ('{floored_user}', 9000000000000000);",
            row(&revoked[0].1),
            filler(1, 12_000),
            row(&revoked[1].1),
            filler(12_001, 25_000),
            row(&revoked[2].1),
        ))
        .await
        .unwrap();
    (
        url,
        LoadTokens {
            revoked,
            floored,
            control,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_reads_every_row_across_its_batches() {
    if crate::common::pg::skip() {
        return;
    }
    let (url, tokens) = database_for_load("load_batches").await;
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(view_sessions(&store), 25_003, "every row is in the view");
    for (token, _) in &tokens.revoked[..3] {
        assert_eq!(status(&store, token).await, RevocationStatus::Revoked);
    }
    assert_eq!(
        status(&store, &tokens.floored.0).await,
        RevocationStatus::Revoked,
        "the users' floors are loaded"
    );
    // No row: never logged out.
    assert_eq!(
        status(&store, &tokens.revoked[3].0).await,
        RevocationStatus::Active
    );
    assert_eq!(
        status(&store, &tokens.control).await,
        RevocationStatus::Active
    );
}

/// A reload (after the listening connection is lost) that cannot finish leaves the store
/// refusing every check; one that fails midway is retried from the start, and the store answers
/// again only once a reload has completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_refuses_checks_until_a_reload_completes() {
    if crate::common::pg::skip() {
        return;
    }
    use tower_matrix_auth::hooks::Revocation as _;
    let (url, tokens) = database_for_load("load_refuses").await;
    let name = format!(
        "load_refuses_{:x}",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    );
    let store = PostgresStore::connect(&with_application_name(&url, &name))
        .await
        .unwrap();
    assert_eq!(
        status(&store, &tokens.control).await,
        RevocationStatus::Active
    );
    let admin = plain(&url).await;
    // A logout written without a notification (as by nothing that runs the store): only a
    // reload can know it.
    let (session, user_id) = tokens.revoked[3].1.split_once('|').unwrap();
    admin
        .batch_execute(&format!(
            "INSERT INTO matrix_auth_sessions VALUES ('{session}', 0, NULL, 1, TRUE, \
             9223372036854775807, 1, '{user_id}');"
        ))
        .await
        .unwrap();
    assert_eq!(
        status(&store, &tokens.revoked[3].0).await,
        RevocationStatus::Active
    );
    // Holds the reload back inside its transaction (its first read waits for the lock).
    let blocker = plain(&url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE matrix_auth_sessions IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let kill = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{name}'"
    );
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}' \
         AND wait_event_type = 'Lock'"
    );
    let user = |token: &str| {
        let parts = http::Request::new(()).into_parts().0;
        tower_matrix_auth::Verifier::new(keys())
            .clock(ManualClock::new(NOW_MS))
            .verify(token.as_bytes(), TokenType::Access, &parts)
            .unwrap()
    };
    let control = user(&tokens.control);
    let refuses = |store: &PostgresStore| {
        !store.is_healthy() && matches!(poll_once(store.check(&control)), Some(Err(_)))
    };
    for _attempt in 0..2 {
        admin.batch_execute(&kill).await.unwrap();
        wait_until(Duration::from_secs(5), || !store.is_healthy()).await;
        // The reload starts and waits for the lock, inside its transaction.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(refuses(&store), "a store answered before its reload");
            let stuck: i64 = admin.query_one(&waiting, &[]).await.unwrap().get(0);
            if stuck == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no reload began");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(refuses(&store), "a store answered during its reload");
        // The next round kills the reload midway: it must be retried.
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    wait_until(Duration::from_secs(10), || store.is_healthy()).await;
    assert_eq!(view_sessions(&store), 25_004);
    for (token, _) in &tokens.revoked {
        assert_eq!(status(&store, token).await, RevocationStatus::Revoked);
    }
    assert_eq!(
        status(&store, &tokens.floored.0).await,
        RevocationStatus::Revoked
    );
    assert_eq!(
        status(&store, &tokens.control).await,
        RevocationStatus::Active
    );
}
