//! The refresh policy (issue 16, part 4) over real HTTP, on the memory store and on PostgreSQL
//! with two stores standing for two processes: the grace window for a replayed refresh token,
//! counted from that token's first refresh (not from a retry of it, even one made on another
//! process whose view does not follow the refresh record), a replay outside it refused or
//! revoking the whole session, and `/r0/tokenrefresh` left strictly single use. A manual clock
//! makes the window's edges exact.

use std::sync::Arc;
use std::time::Duration;

use crate::common::server::{refresh_body, send, start_with_policy, Server, WHOAMI};
use crate::common::NOW_MS;
use http::StatusCode;
use serde_json::Value;
use tower_matrix_auth::{
    hooks::ManualClock,
    lifecycle::SessionRequest,
    store::{RefreshPolicy, ReplayAction, TokenStore},
    MemoryStore,
};

const GRACE_MS: u64 = 10_000;

/// Two servers ("processes") over the same state, on one clock.
struct Pair {
    a: Server,
    b: Server,
    clock: ManualClock,
}

async fn memory_pair(policy: RefreshPolicy) -> Pair {
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(NOW_MS);
    Pair {
        a: start_with_policy(store.clone(), clock.clone(), policy).await,
        b: start_with_policy(store, clock.clone(), policy).await,
        clock,
    }
}

#[cfg(feature = "postgres")]
async fn postgres_pair(policy: RefreshPolicy) -> Pair {
    use tower_matrix_auth::PostgresStore;
    let url = crate::common::pg::database_url();
    let clock = ManualClock::new(NOW_MS);
    let store = || async { Arc::new(PostgresStore::connect(&url).await.unwrap()) };
    Pair {
        a: start_with_policy(store().await, clock.clone(), policy).await,
        b: start_with_policy(store().await, clock.clone(), policy).await,
        clock,
    }
}

/// Both stores, or the memory store alone when no PostgreSQL is configured.
async fn pairs(policy: RefreshPolicy) -> Vec<(&'static str, Pair)> {
    let mut pairs = vec![("memory", memory_pair(policy).await)];
    #[cfg(feature = "postgres")]
    if !crate::common::pg::skip() {
        pairs.push(("postgres", postgres_pair(policy).await));
    }
    pairs
}

/// A refreshable login of a new user on `server`: its refresh token.
fn refreshable_login(server: &Server, name: &str) -> String {
    let request = SessionRequest::new().refresh(true);
    let login = server.sessions.login(&user(name), &request);
    login.refresh_token.unwrap()
}

/// A window of [`GRACE_MS`], and a replay outside it revoking the session.
fn revoking() -> RefreshPolicy {
    RefreshPolicy::new()
        .grace(Duration::from_millis(GRACE_MS))
        .on_replay(ReplayAction::RevokeSession)
}

fn user(name: &str) -> String {
    format!(
        "@{name}-{:x}:example.org",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    )
}

async fn refresh(server: &Server, token: &str) -> (StatusCode, Value) {
    let (status, json, _) = send(
        server.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(token)),
    )
    .await;
    (status, json)
}

/// A refresh that must succeed: its access and refresh tokens.
async fn refreshed(server: &Server, token: &str) -> (String, String) {
    let (status, json) = refresh(server, token).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    (
        json["access_token"].as_str().unwrap().to_owned(),
        json["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn whoami(server: &Server, token: &str) -> StatusCode {
    send(server.addr, "GET", WHOAMI, Some(token), None).await.0
}

/// Waits (5 s at most) until `server` answers `status` for `token`: another process hears of a
/// change by notification.
async fn eventually(server: &Server, token: &str, status: StatusCode, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while whoami(server, token).await != status {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_refused(status: StatusCode, json: &Value, what: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {json}");
    assert_eq!(json["errcode"], "M_UNKNOWN_TOKEN", "{what}");
    assert_ne!(
        json["soft_logout"], true,
        "{what}: a replay is no soft logout"
    );
}

/// Login on a; the refresh on a at t0, its lost response retried on b 100 ms later (which
/// replaces the unused successor), the retry's access token used on b: generation 0 is now a
/// replay whose grace runs from t0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_within_the_grace_window_gets_a_working_pair() {
    let policy = RefreshPolicy::new().grace(Duration::from_millis(GRACE_MS));
    for (store, Pair { a, b, clock }) in pairs(policy).await {
        let r0 = refreshable_login(&a, "grace");
        let t0 = NOW_MS;
        let _lost = refreshed(&a, &r0).await;
        clock.advance_ms(100);
        let (a2, r2) = refreshed(&b, &r0).await;
        assert_eq!(whoami(&b, &a2).await, StatusCode::OK, "{store}");
        // On a, whose view may not have heard of the first use yet: the row decides.
        clock.set_ms(t0 + GRACE_MS - 1);
        let (again, r_again) = refreshed(&a, &r0).await;
        // Counted from t0, the first refresh, not from the retry at t0 + 100: closed now.
        clock.set_ms(t0 + GRACE_MS);
        let (status, json) = refresh(&a, &r0).await;
        assert_refused(status, &json, store);
        // Refused only (the default action): the session goes on, and the pair minted in grace
        // is of the generation in use, as good as the one the client moved on with.
        for server in [&a, &b] {
            assert_eq!(whoami(server, &again).await, StatusCode::OK, "{store}");
            assert_eq!(whoami(server, &a2).await, StatusCode::OK, "{store}");
        }
        let (next, _) = refreshed(&b, &r_again).await;
        assert_eq!(whoami(&a, &next).await, StatusCode::OK, "{store}");
        // The other copy of that generation's refresh token is now a replay in turn, with a
        // window from that refresh.
        let (granted, _) = refreshed(&a, &r2).await;
        assert_eq!(whoami(&b, &granted).await, StatusCode::OK, "{store}");
        clock.advance_ms(GRACE_MS);
        let (status, json) = refresh(&a, &r2).await;
        assert_refused(status, &json, store);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_outside_the_grace_window_can_revoke_the_whole_session() {
    let policy = revoking();
    for (store, Pair { a, b, clock }) in pairs(policy).await {
        let r0 = refreshable_login(&a, "revoke");
        let (a1, r1) = refreshed(&a, &r0).await;
        assert_eq!(whoami(&a, &a1).await, StatusCode::OK, "{store}");
        // Within the window: granted, nothing revoked.
        clock.advance_ms(GRACE_MS - 1);
        let (in_grace, _) = refreshed(&b, &r0).await;
        assert_eq!(whoami(&b, &in_grace).await, StatusCode::OK, "{store}");
        // Outside it, on the other process: refused, and every generation logged out.
        clock.advance_ms(1);
        let (status, json) = refresh(&b, &r0).await;
        assert_refused(status, &json, store);
        for token in [&a1, &in_grace] {
            eventually(
                &a,
                token,
                StatusCode::UNAUTHORIZED,
                "the session is logged out",
            )
            .await;
            assert_eq!(whoami(&b, token).await, StatusCode::UNAUTHORIZED, "{store}");
        }
        let (status, json) = refresh(&a, &r1).await;
        assert_refused(status, &json, store);
    }
}

/// Without the policy's action, the same replay leaves the session alone: the contrast that
/// makes the test above mean something.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_replay_is_only_refused() {
    for (store, Pair { a, b, .. }) in pairs(RefreshPolicy::default()).await {
        let r0 = refreshable_login(&a, "default");
        let (a1, r1) = refreshed(&a, &r0).await;
        assert_eq!(whoami(&a, &a1).await, StatusCode::OK, "{store}");
        let (status, json) = refresh(&b, &r0).await;
        assert_refused(status, &json, store);
        assert_eq!(whoami(&b, &a1).await, StatusCode::OK, "{store}");
        refreshed(&a, &r1).await;
    }
}

/// `/r0/tokenrefresh` is strictly single use whatever the policy: the loser is refused (403)
/// within the window and nothing is revoked outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenrefresh_ignores_the_policy() {
    let policy = revoking();
    for (store, Pair { a, b, clock }) in pairs(policy).await {
        let r0 = refreshable_login(&a, "r0");
        let tokenrefresh = |server: &Server| {
            let addr = server.addr;
            let body = refresh_body(&r0);
            async move {
                let (status, json, _) = send(
                    addr,
                    "POST",
                    "/_matrix/client/r0/tokenrefresh",
                    None,
                    Some(&body),
                )
                .await;
                (status, json)
            }
        };
        let (status, won) = tokenrefresh(&a).await;
        assert_eq!(status, StatusCode::OK, "{store}: {won}");
        let winner = won["access_token"].as_str().unwrap().to_owned();
        let (status, json) = tokenrefresh(&b).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{store}: within the window {json}"
        );
        clock.advance_ms(GRACE_MS);
        let (status, json) = tokenrefresh(&b).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{store}: {json}");
        assert_eq!(whoami(&a, &winner).await, StatusCode::OK, "{store}");
        assert_eq!(whoami(&b, &winner).await, StatusCode::OK, "{store}");

        // A token used up at /r0/tokenrefresh has no grace at /v3/refresh either, nor has an
        // older one: rotated at t, then its successor used up at /r0 on the other process.
        let r0 = refreshable_login(&a, "r0-then-v3");
        let (a1, r1) = refreshed(&a, &r0).await;
        assert_eq!(whoami(&a, &a1).await, StatusCode::OK, "{store}");
        let (status, json, _) = send(
            b.addr,
            "POST",
            "/_matrix/client/r0/tokenrefresh",
            None,
            Some(&refresh_body(&r1)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{store}: {json}");
        let a2 = json["access_token"].as_str().unwrap().to_owned();
        let (status, json) = refresh(&a, &r0).await;
        assert_refused(status, &json, store);
        // A replay outside any window, with "revoke": the session is logged out.
        eventually(
            &b,
            &a2,
            StatusCode::UNAUTHORIZED,
            "the session is logged out",
        )
        .await;
    }
}

/// Concurrent replays within the window, half on each process, with the session's own client
/// refreshing at the same time: every answer is a working pair or a refusal, never an error, and
/// the session ends in one consistent state both processes agree on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_within_the_window_and_a_refresh() {
    let policy = RefreshPolicy::new().grace(Duration::from_millis(GRACE_MS));
    for (store, Pair { a, b, .. }) in pairs(policy).await {
        let a = Arc::new(a);
        let b = Arc::new(b);
        let r0 = refreshable_login(&a, "race");
        let (a1, r1) = refreshed(&a, &r0).await;
        assert_eq!(whoami(&a, &a1).await, StatusCode::OK, "{store}");
        // One replay before the race, granted for certain.
        let (before_race, _) = refreshed(&b, &r0).await;
        let mut granted = vec![before_race];
        let mut tasks = Vec::new();
        for i in 0..16_usize {
            let server = if i % 2 == 0 { a.clone() } else { b.clone() };
            let token = if i == 0 { r1.clone() } else { r0.clone() };
            tasks.push(tokio::spawn(async move {
                let (status, json) = refresh(&server, &token).await;
                (i, status, json)
            }));
        }
        let mut first = None;
        for task in tasks {
            let (i, status, json) = task.await.unwrap();
            match (i, status) {
                (0, StatusCode::OK) => {
                    first = Some(json["access_token"].as_str().unwrap().to_owned())
                }
                (_, StatusCode::OK) => {
                    granted.push(json["access_token"].as_str().unwrap().to_owned())
                }
                // A replay decided after the client's refresh of generation 1 has no grace left:
                // only the generation most recently refreshed has one.
                (1.., _) => assert_refused(status, &json, store),
                (0, _) => panic!("{store}: the client's own refresh: {status} {json}"),
            }
        }
        let first = first.unwrap();
        // The client's own refresh (request 0) minted a pending successor; the replays granted
        // got the generation in use. Once the successor is used, both processes agree.
        assert_eq!(whoami(&b, &first).await, StatusCode::OK, "{store}");
        for token in &granted {
            eventually(&a, token, StatusCode::UNAUTHORIZED, "superseded on a").await;
            eventually(&b, token, StatusCode::UNAUTHORIZED, "superseded on b").await;
        }
        assert_eq!(whoami(&a, &first).await, StatusCode::OK, "{store}");
    }
}

/// Two tabs refresh the same token before either uses its successor: the successor replaced gets
/// a pair of the generation in use within the window, as the token both refreshed does; outside
/// it is refused, but that is no replay (nobody used the session through it), so "revoke" leaves
/// the session, and the other tab, alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_racing_are_no_replay() {
    let policy = revoking();
    for (store, Pair { a, b, clock }) in pairs(policy).await {
        let r0 = refreshable_login(&a, "tabs");
        let (_, r1) = refreshed(&a, &r0).await; // tab A
        let (a2, _) = refreshed(&b, &r0).await; // tab B: replaces A's unused successor
        assert_eq!(whoami(&b, &a2).await, StatusCode::OK, "{store}");
        clock.advance_ms(100);
        let (again, _) = refreshed(&a, &r1).await;
        for server in [&a, &b] {
            assert_eq!(whoami(server, &again).await, StatusCode::OK, "{store}");
            assert_eq!(whoami(server, &a2).await, StatusCode::OK, "{store}");
        }
        // Outside the window.
        clock.advance_ms(GRACE_MS);
        let (status, json) = refresh(&a, &r1).await;
        assert_refused(status, &json, store);
        assert_eq!(whoami(&a, &a2).await, StatusCode::OK, "{store}");
        assert_eq!(whoami(&b, &a2).await, StatusCode::OK, "{store}");
    }
}

/// A process of the release before the refresh policy shares the database (a rolling upgrade):
/// it knows nothing of the refresh record, but its refresh advances `next_generation`, which
/// makes the record stale, so the window of the generation before closes as the docs say.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_process_refreshing_closes_the_window() {
    use tower_matrix_auth::{lifecycle::TokenNonce, TokenType};
    if crate::common::pg::skip() {
        return;
    }
    let policy = RefreshPolicy::new().grace(Duration::from_millis(GRACE_MS));
    let Pair { a, b, .. } = postgres_pair(policy).await;
    let r0 = refreshable_login(&a, "rolling");
    let (a1, _r1) = refreshed(&a, &r0).await;
    assert_eq!(whoami(&a, &a1).await, StatusCode::OK);
    let parts = http::Request::new(()).into_parts().0;
    let user = a
        .sessions
        .verifier()
        .verify(r0.as_bytes(), TokenType::Refresh, &parts)
        .unwrap();
    let session = format!("{:032x}", TokenNonce::of(&user).unwrap().session.as_u128());
    // What the older release's refresh of generation 1 writes: the columns it knows, and its
    // seven-field notification.
    let (client, connection) =
        tokio_postgres::connect(&crate::common::pg::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "UPDATE matrix_auth_sessions SET pending_generation = next_generation, \
             next_generation = next_generation + 1, version = version + 1 \
             WHERE session_id = $1 RETURNING live_generation, pending_generation, \
             next_generation, until_ms, version, user_id",
            &[&session],
        )
        .await
        .unwrap();
    let payload = format!(
        "s {session} {} {} {} 0 {} {} {}",
        row.get::<_, i64>(0),
        row.get::<_, i64>(1),
        row.get::<_, i64>(2),
        row.get::<_, i64>(3),
        row.get::<_, i64>(4),
        row.get::<_, String>(5)
    );
    client
        .execute(
            "SELECT pg_notify('matrix_auth_revocations', $1)",
            &[&payload],
        )
        .await
        .unwrap();
    // Within the window by the clock, but generation 1 was refreshed since: refused.
    let (status, json) = refresh(&b, &r0).await;
    assert_refused(status, &json, "postgres");
}
