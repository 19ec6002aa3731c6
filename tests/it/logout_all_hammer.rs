//! `/logout/all` against refreshes in flight, over real HTTP, on both stores (PostgreSQL with two
//! processes' worth of servers): once it has returned, no token of a session that existed before
//! it verifies anywhere, whatever the refreshes were doing.
#![cfg(all(feature = "postgres", feature = "axum"))]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::server::{refresh_body, send, start_with, Server, WHOAMI};
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{Clock, ManualClock, SystemClock},
    lifecycle::SessionRequest,
    store::TokenStore,
    MemoryStore, PostgresStore,
};

const SESSIONS: usize = 6;

fn uid() -> String {
    format!(
        "@hammer-{:x}:example.org",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    )
}

/// Refreshes every session in a loop on alternate servers while `/logout/all` runs once.
async fn hammer(servers: &[Server]) {
    let user = uid();
    let with_refresh = SessionRequest::new().refresh(true);
    let minted = Arc::new(Mutex::new(Vec::new()));
    let logged_out = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let login = servers[0].sessions.login(&user, &with_refresh);
        minted.lock().unwrap().push(login.access_token.clone());
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let (minted, logged_out, stop) = (minted.clone(), logged_out.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut refresh = login.refresh_token.unwrap();
            let mut n = i;
            let mut late_successes = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let addr = addrs[n % addrs.len()];
                let started_after_logout = logged_out.load(Ordering::SeqCst);
                let (status, json, _) = send(
                    addr,
                    "POST",
                    "/_matrix/client/v3/refresh",
                    None,
                    Some(&refresh_body(&refresh)),
                )
                .await;
                if status != StatusCode::OK {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                if started_after_logout {
                    late_successes += 1;
                }
                let access = json["access_token"].as_str().unwrap().to_owned();
                minted.lock().unwrap().push(access.clone());
                // Use the successor, which makes it the session's live generation.
                let _ = send(addr, "GET", WHOAMI, Some(&access), None).await;
                refresh = json["refresh_token"].as_str().unwrap().to_owned();
            }
            late_successes
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asking = servers[0].sessions.login(&user, &SessionRequest::default());
    let (status, _, _) = send(
        servers[0].addr,
        "POST",
        "/_matrix/client/v3/logout/all",
        Some(&asking.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    logged_out.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut late = 0;
    for task in tasks {
        late += task.await.unwrap();
    }
    assert_eq!(
        late, 0,
        "a refresh started after /logout/all returned succeeded"
    );
    let minted = minted.lock().unwrap().clone();
    assert!(
        minted.len() > SESSIONS * 2,
        "the hammer refreshed: {} tokens",
        minted.len()
    );
    // Notifications reach the other process within milliseconds; allow them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for token in &minted {
        for server in servers {
            let (status, json, _) = send(server.addr, "GET", WHOAMI, Some(token), None).await;
            assert_eq!(
                (status, json["errcode"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN")),
                "a token of a session older than /logout/all still verifies"
            );
        }
    }
    // A login afterwards works.
    let after = servers[0].sessions.login(&user, &SessionRequest::default());
    for server in servers {
        let (status, _, _) =
            send(server.addr, "GET", WHOAMI, Some(&after.access_token), None).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_wins_every_race_on_the_memory_store() {
    let clock = ManualClock::new(SystemClock.now_ms());
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let server = start_with(store, clock).await;
    hammer(&[server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_wins_every_race_across_two_postgres_processes() {
    if crate::common::pg::skip() {
        return;
    }
    let url = crate::common::pg::database_url();
    let clock = ManualClock::new(SystemClock.now_ms());
    let a = PostgresStore::connect(&url).await.unwrap();
    let b = PostgresStore::connect(&url).await.unwrap();
    let servers = [
        start_with(Arc::new(a), clock.clone()).await,
        start_with(Arc::new(b), clock).await,
    ];
    hammer(&servers).await;
}
