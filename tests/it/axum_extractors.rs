//! The layer in an axum `Router`, served by a real server on loopback, with the extractors.
#![cfg(feature = "axum")]

use crate::common::*;
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use tower_matrix_auth::{
    hooks::ManualClock, layer::GuestPolicy, MatrixAuthLayer, MatrixUser, Verifier,
};

async fn whoami(user: MatrixUser) -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"user_id": user.user_id(), "device_id": user.device_id(), "is_guest": user.is_guest()}),
    )
}

async fn maybe(user: Option<MatrixUser>) -> String {
    user.map_or_else(|| "anonymous".to_owned(), |u| u.user_id().to_owned())
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .unwrap();
    let status: u16 = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (StatusCode::from_u16(status).unwrap(), body)
}

#[tokio::test]
async fn extractors_in_a_router() {
    let auth =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .guests(GuestPolicy::Allowed);
    let app = Router::new()
        .route("/whoami", get(whoami))
        .route("/maybe", get(maybe).layer(auth.clone().optional()))
        .layer(auth.skip_path("/maybe").skip_path("/unguarded"))
        .route("/unguarded", get(whoami));
    let addr = serve(app).await;
    let token = access_token(&["device_id = PHONE"]);

    let (status, body) = fetch(addr, "/whoami", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (json["user_id"].as_str(), json["device_id"].as_str()),
        (Some(ALICE), Some("PHONE"))
    );

    let (status, body) = fetch(addr, "/whoami", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("M_MISSING_TOKEN"));

    assert_eq!(fetch(addr, "/maybe", None).await.1, "anonymous");
    assert_eq!(fetch(addr, "/maybe", Some(&token)).await.1, ALICE);
    assert_eq!(
        fetch(addr, "/maybe", Some("forged")).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A route the layer does not cover: the extractor says what is misconfigured.
    let (status, body) = fetch(addr, "/unguarded", Some(&token)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("authentication layer missing"), "{body}");
}
