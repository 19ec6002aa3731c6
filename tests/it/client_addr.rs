//! The client's address over real HTTP: axum's `ConnectInfo` as the peer, `X-Forwarded-For` and
//! `Forwarded` believed from trusted proxies only, and application services' IP ranges.

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::{Json, Router};
use http::StatusCode;
use tower_matrix_auth::hooks::{AppService, AppServices, ManualClock};
use tower_matrix_auth::layer::{ClientAddr, ForwardedHeader, TrustedProxies};
use tower_matrix_auth::{MatrixAuthLayer, MatrixUser, Verifier};

use crate::common::*;

const AS_TOKEN: &str = "as_token_ranged_0123456789";

async fn echo(request: axum::extract::Request) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "client": request.extensions().get::<ClientAddr>().map(|c| c.0.to_string()),
        "user_id": request.extensions().get::<MatrixUser>().map(|u| u.user_id().to_owned()),
    }))
}

/// `layer` (reading axum's `ConnectInfo`) around the echo, on loopback.
async fn serve(layer: MatrixAuthLayer) -> SocketAddr {
    let layer = layer.peer_addr(|parts| {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())
    });
    let app = Router::new()
        .route("/{*path}", axum::routing::any(echo))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

/// GET `path` with a bearer token and extra headers, by hand over TCP: status and JSON.
async fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, serde_json::Value) {
    let (status, json, _) = get_with_head(addr, path, token, headers).await;
    (status, json)
}

/// [`get`], with the response head too (lower case).
async fn get_with_head(
    addr: SocketAddr,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, serde_json::Value, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = StatusCode::from_u16(response[9..12].parse().unwrap()).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_default(),
        head.to_ascii_lowercase(),
    )
}

fn layer() -> MatrixAuthLayer {
    MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
}

#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let token = access_token(&[]);
    // Loopback is not trusted: whatever the client writes, it is 127.0.0.1.
    let untrusted = serve(layer().trusted_proxies("10.0.0.0/8".parse().unwrap())).await;
    for header in [
        ("X-Forwarded-For", "198.51.100.7"),
        ("Forwarded", "for=198.51.100.7"),
    ] {
        let (status, json) = get(untrusted, "/x", &token, &[header]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json["client"], "127.0.0.1", "{header:?}");
    }
    // Loopback is the trusted proxy: the rightmost hop it did not add is the client.
    let trusted = serve(layer().trusted_proxies("127.0.0.1, 10.0.0.0/8".parse().unwrap())).await;
    let (_, json) = get(
        trusted,
        "/x",
        &token,
        &[("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.1.1.1")],
    )
    .await;
    assert_eq!(json["client"], "198.51.100.7");
    // `Forwarded` only from proxies configured to write it.
    let forwarded = &[("Forwarded", "for=\"[2001:db8::7]:1234\"")];
    let (_, json) = get(trusted, "/x", &token, forwarded).await;
    assert_eq!(json["client"], "127.0.0.1");
    let rfc7239 = serve(
        layer().trusted_proxies(
            "127.0.0.1"
                .parse::<TrustedProxies>()
                .unwrap()
                .header(ForwardedHeader::Forwarded),
        ),
    )
    .await;
    let (_, json) = get(rfc7239, "/x", &token, forwarded).await;
    assert_eq!(json["client"], "2001:db8::7");
    let (_, json) = get(trusted, "/x", &token, &[]).await;
    assert_eq!(json["client"], "127.0.0.1");
    // Without any configuration the layer reads no address at all.
    let addr = crate::common::server::serve_echo(layer()).await;
    let (status, json, _) =
        crate::common::server::send(addr, "GET", "/x", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(json.get("client").is_none());
}

#[tokio::test]
async fn an_application_service_token_works_only_from_its_ip_ranges() {
    let appservices = || {
        AppServices::new()
            .with(
                AppService::new("ranged", AS_TOKEN, "@ranged:example.org")
                    .unwrap()
                    .ip_ranges("198.51.100.0/24")
                    .unwrap(),
            )
            .unwrap()
    };
    let behind_proxy = serve(
        layer()
            .appservices(appservices())
            .trusted_proxies("127.0.0.1".parse().unwrap()),
    )
    .await;
    let from = |hop: &'static str| [("X-Forwarded-For", hop)];
    let (status, json) = get(behind_proxy, "/x", AS_TOKEN, &from("198.51.100.7")).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["user_id"], "@ranged:example.org");
    let (status, json) = get(behind_proxy, "/x", AS_TOKEN, &from("203.0.113.1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["errcode"], "M_UNKNOWN_TOKEN");
    // Direct from loopback, outside the ranges; a spoofed header from an untrusted peer is no help.
    let direct = serve(layer().appservices(appservices())).await;
    let (status, _) = get(direct, "/x", AS_TOKEN, &from("198.51.100.7")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Bad ranges are refused at registration.
    assert!(AppService::new("bad", "t", "@bad:example.org")
        .unwrap()
        .ip_ranges("198.51.100.0/40")
        .is_err());
}

/// The failed-authentication limiter over HTTP: a flood of bad tokens from one address gets 429
/// before any verification, while a valid token the cache holds, an application service and
/// other addresses keep working; a token never seen before waits with the flood.
#[tokio::test]
async fn a_flood_of_bad_tokens_is_limited_per_address() {
    use tower_matrix_auth::layer::FailureLimit;
    let appservices = AppServices::new()
        .with(AppService::new("bridge", AS_TOKEN, "@bridge:example.org").unwrap())
        .unwrap();
    let addr = serve(
        layer()
            .failure_limit(FailureLimit::per_minute(5).unwrap())
            .trusted_proxies("127.0.0.1".parse().unwrap())
            .appservices(appservices),
    )
    .await;
    let good = access_token(&[]);
    let (status, _) = get(addr, "/x", &good, &[]).await;
    assert_eq!(status, StatusCode::OK, "verified once, now cached");
    let forged = mint_with(
        "not our secret",
        "key",
        &["gen = 1", "user_id = @m:x", "type = access"],
        macaroon::Format::V1,
    );
    for attempt in 0..6 {
        let (status, json) = get(addr, "/x", &forged, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {attempt}");
        assert_eq!(json["errcode"], "M_UNKNOWN_TOKEN");
    }
    // Over budget: refused before any verification, with when to come back.
    let (status, json, head) = get_with_head(addr, "/x", &forged, &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json["errcode"], "M_LIMIT_EXCEEDED");
    let retry_ms = json["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry_ms > 0 && retry_ms <= 12_000, "{retry_ms}");
    let retry_after: u64 = head
        .lines()
        .find_map(|line| line.strip_prefix("retry-after: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(retry_after, retry_ms.div_ceil(1000));
    // The cached token and the application service still pass from the same address.
    assert_eq!(get(addr, "/x", &good, &[]).await.0, StatusCode::OK);
    assert_eq!(get(addr, "/x", AS_TOKEN, &[]).await.0, StatusCode::OK);
    // A valid token never seen before is not known good: it waits like the flood.
    let fresh = access_token(&["nonce = fresh"]);
    assert_eq!(
        get(addr, "/x", &fresh, &[]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client (behind the trusted proxy) has its own budget.
    let other = [("X-Forwarded-For", "198.51.100.7")];
    assert_eq!(
        get(addr, "/x", &forged, &other).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(addr, "/x", &fresh, &other).await.0, StatusCode::OK);
    // A request without a token costs nothing and is never counted or limited differently.
    let (status, json, _) = crate::common::server::send(addr, "GET", "/x", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["errcode"], "M_MISSING_TOKEN");
}

/// The client cannot choose its address behind a proxy that appends to `X-Forwarded-For`: a
/// `Forwarded` it writes is never read, and bytes it writes that are no address (or not UTF-8)
/// make the address unknown rather than the proxy's, so an allow-list refuses.
#[tokio::test]
async fn a_client_cannot_choose_its_address_behind_a_proxy() {
    let token = access_token(&[]);
    let addr = serve(layer().trusted_proxies("127.0.0.1".parse().unwrap())).await;
    // What nginx sends for a client at 203.0.113.1 that wrote its own `Forwarded`.
    let (_, json) = get(
        addr,
        "/x",
        &token,
        &[
            ("Forwarded", "for=198.51.100.7"),
            ("X-Forwarded-For", "203.0.113.1"),
        ],
    )
    .await;
    assert_eq!(json["client"], "203.0.113.1");
    let (_, json) = get(addr, "/x", &token, &[("X-Forwarded-For", "unknown")]).await;
    assert_eq!(
        json["client"],
        serde_json::Value::Null,
        "unknown, not the proxy"
    );

    let ranged = AppServices::new()
        .with(
            AppService::new("ranged", AS_TOKEN, "@ranged:example.org")
                .unwrap()
                .ip_ranges("127.0.0.1")
                .unwrap(),
        )
        .unwrap();
    let addr = serve(
        layer()
            .appservices(ranged)
            .trusted_proxies("127.0.0.1".parse().unwrap()),
    )
    .await;
    // Directly from the allowed host: passes.
    assert_eq!(get(addr, "/x", AS_TOKEN, &[]).await.0, StatusCode::OK);
    // Through the proxy from elsewhere, with junk written before the proxy's hop: refused.
    for junk in ["garbage, 203.0.113.1", "203.0.113.1"] {
        let (status, _) = get(addr, "/x", AS_TOKEN, &[("X-Forwarded-For", junk)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{junk}");
    }
    // A hop the proxy reports that nobody can read: the address is unknown, refused.
    let (status, _) = get(addr, "/x", AS_TOKEN, &[("X-Forwarded-For", "_hidden")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Expired tokens are ours: clients send them in the ordinary course (several requests in flight
/// when a token expires), so they never count against the address, and the refreshed token that
/// follows is not limited.
#[tokio::test]
async fn expired_tokens_are_not_failures_for_the_limiter() {
    use tower_matrix_auth::layer::FailureLimit;
    let addr = serve(layer().failure_limit(FailureLimit::per_minute(2).unwrap())).await;
    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
    for _ in 0..6 {
        let (status, json) = get(addr, "/x", &expired, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(json["soft_logout"], true);
    }
    let refreshed = access_token(&["nonce = refreshed"]);
    assert_eq!(get(addr, "/x", &refreshed, &[]).await.0, StatusCode::OK);
}
