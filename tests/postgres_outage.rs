//! The database goes away mid-test: the layer fails closed (503, never an authenticated request)
//! and recovers on its own when it comes back. Its own test binary: it stops the shared server.
#![cfg(all(feature = "postgres", feature = "axum"))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::pg::{database_url, pg_ctl, wait_until};
use common::server::{send, start_with, WHOAMI};
use http::StatusCode;
use tower_matrix_auth::{hooks::ManualClock, lifecycle::SessionRequest, PostgresStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_closed_and_recovers() {
    if common::pg::skip() {
        return;
    }
    let store = PostgresStore::connect(&database_url()).await.unwrap();
    let server = start_with(Arc::new(store.clone()), ManualClock::new(common::NOW_MS)).await;
    let alive = server
        .sessions
        .login("@outage-alive:example.org", &SessionRequest::default());
    let revoked = server
        .sessions
        .login("@outage-revoked:example.org", &SessionRequest::default());
    let (code, _, _) = send(
        server.addr,
        "POST",
        "/_matrix/client/v3/logout",
        Some(&revoked.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);

    pg_ctl(&["stop", "-m", "fast"]);
    let noticed = wait_until(Duration::from_secs(10), || !store.is_healthy()).await;
    for token in [&alive.access_token, &revoked.access_token] {
        let (status, json, _) = send(server.addr, "GET", WHOAMI, Some(token), None).await;
        assert_eq!(
            (status, json["errcode"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("M_UNKNOWN"))
        );
    }
    // Writes fail too, and say so.
    let (code, _, _) = send(
        server.addr,
        "POST",
        "/_matrix/client/v3/logout",
        Some(&alive.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    // Forged tokens are still plain 401s: they never reach the store.
    assert_eq!(
        send(server.addr, "GET", WHOAMI, Some("forged"), None)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    pg_ctl(&["start"]);
    let recovered = wait_until(Duration::from_secs(15), || store.is_healthy()).await;
    eprintln!(
        "outage noticed after {noticed:?}; recovered {recovered:?} after the database came back"
    );
    assert_eq!(
        send(server.addr, "GET", WHOAMI, Some(&alive.access_token), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        send(
            server.addr,
            "GET",
            WHOAMI,
            Some(&revoked.access_token),
            None
        )
        .await
        .1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
}
