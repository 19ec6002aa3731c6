//! The layer in a real hyper 1 server on loopback, driven by a real HTTP client and raw TCP.

use std::convert::Infallible;
use std::net::SocketAddr;

use crate::common::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_matrix_auth::{hooks::ManualClock, MatrixAuthLayer, MatrixUser, Verifier};

async fn whoami(request: Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let user = request.extensions().get::<MatrixUser>().expect("layer ran");
    let body = serde_json::json!({"user_id": user.user_id(), "uri": request.uri().to_string()});
    Ok(http::Response::new(Full::new(Bytes::from(
        body.to_string(),
    ))))
}

/// Starts a server with the layer on an ephemeral loopback port; it lives as long as the runtime.
async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ServiceBuilder::new()
        .layer(MatrixAuthLayer::with_verifier(
            Verifier::new(keys()).clock(ManualClock::new(NOW_MS)),
        ))
        .service_fn(whoami);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (StatusCode, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::get(format!("http://{addr}{path}"));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = client
        .request(request.body(Full::default()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response.headers().get("content-type").cloned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    if status != StatusCode::OK {
        assert_eq!(content_type.unwrap(), "application/json");
    }
    (status, serde_json::from_slice(&body).unwrap())
}

/// Sends raw bytes (headers the http crate would not build) and returns the status line.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        response.extend_from_slice(&buf[..n]);
        if n == 0 || response.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_real_http() {
    let addr = start().await;
    let token = access_token(&[]);
    let (status, json) = get(
        addr,
        "/_matrix/client/v3/account/whoami",
        Some(&format!("Bearer {token}")),
    )
    .await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some(ALICE))
    );

    let (status, json) = get(addr, &format!("/whoami?x=1&access_token={token}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["uri"], "/whoami?x=1");

    let (status, json) = get(addr, "/whoami", None).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );

    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
    let (status, json) = get(addr, "/whoami", Some(&format!("Bearer {expired}"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (json["errcode"].as_str(), json["soft_logout"].as_bool()),
        (Some("M_UNKNOWN_TOKEN"), Some(true))
    );

    let (status, json) = get(addr, "/whoami", Some("Bearer not-a-macaroon")).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_get_clean_401s() {
    let addr = start().await;
    let token = access_token(&[]);
    let cases: Vec<Vec<u8>> = vec![
        b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n".to_vec(),
        format!("GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").into_bytes(),
        b"GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Basic YTpi\r\nConnection: close\r\n\r\n".to_vec(),
        format!("GET /x?access_token=%ZZ{token} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").into_bytes(),
        format!("GET /x?access_token={} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "A".repeat(60_000)).into_bytes(),
        format!("GET /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", "Q".repeat(50_000)).into_bytes(),
    ];
    for (i, request) in cases.iter().enumerate() {
        let status = raw(addr, request).await;
        assert!(status.starts_with("HTTP/1.1 401"), "case {i}: {status}");
    }
    // Still serving valid requests afterwards.
    let (status, _) = get(addr, "/x", Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_traffic_gets_exact_answers() {
    let addr = start().await;
    let valid = format!("Bearer {}", access_token(&[]));
    let forged = format!(
        "Bearer {}",
        mint_with(
            "wrong",
            "key",
            &["user_id = @alice:example.org", "type = access"],
            macaroon::Format::V1
        )
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (valid, forged) = (valid.clone(), forged.clone());
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                0 => assert_eq!(get(addr, "/x", Some(&valid)).await.0, StatusCode::OK),
                1 => assert_eq!(
                    get(addr, "/x", Some(&forged)).await.1["errcode"],
                    "M_UNKNOWN_TOKEN"
                ),
                _ => assert_eq!(get(addr, "/x", None).await.1["errcode"], "M_MISSING_TOKEN"),
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
