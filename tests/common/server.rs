//! A small homeserver built from the crate's parts, on loopback, for the lifecycle tests.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use tower_matrix_auth::{
    hooks::ManualClock,
    store::{RefreshPolicy, TokenStore},
    Issuer, MatrixAuthLayer, MatrixUser, Sessions, Verifier,
};

use super::{keys, NOW_MS};

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub sessions: Sessions,
    pub clock: ManualClock,
}

async fn whoami(user: MatrixUser) -> Json<serde_json::Value> {
    Json(serde_json::json!({"user_id": user.user_id(), "device_id": user.device_id()}))
}

/// whoami behind the layer, logout and logout/all (expired tokens allowed), both refresh
/// endpoints (rate-limited when a request carries `x-test-flood`). `clock` drives everything.
pub async fn start_with(store: Arc<dyn TokenStore>, clock: ManualClock) -> Server {
    start_with_policy(store, clock, RefreshPolicy::default()).await
}

/// [`start_with`], with a refresh policy.
pub async fn start_with_policy(
    store: Arc<dyn TokenStore>,
    clock: ManualClock,
    policy: RefreshPolicy,
) -> Server {
    let verifier = Verifier::new(keys()).clock(clock.clone());
    let issuer = Issuer::new(keys())
        .clock(clock.clone())
        .refreshable_access_lifetime(std::time::Duration::from_millis(60_000));
    let sessions = Sessions::with_shared_store(issuer, verifier.clone(), store)
        .rate_limit(|parts: &http::request::Parts| {
            parts
                .headers
                .get("x-test-flood")
                .is_some()
                .then(|| Duration::from_millis(1500))
        })
        .refresh_policy(policy);
    let auth = MatrixAuthLayer::with_verifier(verifier)
        .revocation(sessions.store())
        .allow_expired_on_logout();
    let (logout, logout_all) = (sessions.clone(), sessions.clone());
    let app = Router::new()
        .route("/_matrix/client/v3/account/whoami", get(whoami))
        .route(
            "/_matrix/client/v3/logout",
            post(move |user: MatrixUser| async move {
                match logout.logout(&user).await {
                    Ok(()) => (StatusCode::OK, Json(serde_json::json!({}))),
                    Err(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(serde_json::json!({"errcode": "M_UNKNOWN"})),
                    ),
                }
            }),
        )
        .route(
            "/_matrix/client/v3/logout/all",
            post(move |user: MatrixUser| async move {
                match logout_all.logout_all(&user).await {
                    Ok(()) => (StatusCode::OK, Json(serde_json::json!({}))),
                    Err(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(serde_json::json!({"errcode": "M_UNKNOWN"})),
                    ),
                }
            }),
        )
        .route_layer(auth)
        .route_service("/_matrix/client/v3/refresh", sessions.refresh_endpoint())
        .route_service(
            "/_matrix/client/r0/tokenrefresh",
            sessions.token_refresh_endpoint(),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        addr,
        sessions,
        clock,
    }
}

pub async fn start_memory() -> Server {
    start_with(
        Arc::new(tower_matrix_auth::MemoryStore::new()),
        ManualClock::new(NOW_MS),
    )
    .await
}

/// Raw HTTP/1.1, so the test sees exactly what a client sees: status, JSON body, head.
pub async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, serde_json::Value, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = StatusCode::from_u16(response[9..12].parse().unwrap()).unwrap();
    let (head, payload) = response.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(payload).unwrap_or(serde_json::Value::Null),
        head.to_owned(),
    )
}

pub fn refresh_body(token: &str) -> String {
    serde_json::json!({ "refresh_token": token }).to_string()
}

pub const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

/// Echoes the identity the layer attached, and what the inner service saw of the request.
async fn echo(request: axum::extract::Request) -> Json<serde_json::Value> {
    let user = request.extensions().get::<MatrixUser>();
    Json(serde_json::json!({
        "inner": true,
        "user_id": user.map(|u| u.user_id()),
        "device_id": user.and_then(|u| u.device_id()),
        "appservice": user.and_then(|u| u.appservice()),
        "credential": user.map(|u| format!("{:?}", u.credential())),
        "suspended": user.map(|u| u.is_suspended()),
        "uri": request.uri().to_string(),
        "path": request.uri().path(),
    }))
}

/// `layer` around an echo of every path and method, on loopback: the layer alone decides.
pub async fn serve_echo(layer: MatrixAuthLayer) -> std::net::SocketAddr {
    let app = Router::new()
        .route("/{*path}", axum::routing::any(echo))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}
