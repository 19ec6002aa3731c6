//! The token lifecycle end to end over HTTP: login, whoami, both refresh endpoints, logout,
//! log out everywhere, login tokens; with real concurrency against a real server.
#![cfg(feature = "axum")]

use crate::common::server::{refresh_body, send, start_memory as start};
use crate::common::*;
use http::StatusCode;
use tower_matrix_auth::lifecycle::SessionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_refresh_keeps_old_tokens_until_the_new_ones_are_used() {
    let s = start().await;
    let login = s.sessions.login(
        ALICE,
        &SessionRequest::new().device_id("PHONE").refresh(true),
    );
    let (a0, r0) = (
        login.access_token.clone(),
        login.refresh_token.clone().unwrap(),
    );
    assert_eq!(login.expires_in_ms, Some(60_000));
    let whoami = crate::common::server::WHOAMI;
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&a0), None).await.0,
        StatusCode::OK
    );

    // An access token is never accepted by a refresh endpoint, nor a refresh token by the layer.
    let (status, json, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(&a0)),
    )
    .await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&r0), None).await.1["errcode"],
        "M_UNKNOWN_TOKEN"
    );

    let (status, json, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(&r0)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["expires_in_ms"], 60_000);
    let (a1, r1) = (
        json["access_token"].as_str().unwrap().to_owned(),
        json["refresh_token"].as_str().unwrap().to_owned(),
    );

    // Until a1 or r1 is used, a0 and r0 still work.
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&a0), None).await.0,
        StatusCode::OK
    );
    // First use of the successor: a0 and r0 die.
    let (status, json, _) = send(s.addr, "GET", whoami, Some(&a1), None).await;
    assert_eq!(
        (status, json["device_id"].as_str()),
        (StatusCode::OK, Some("PHONE"))
    );
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&a0), None).await.1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    let (status, _, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(&r0)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "reused refresh token");

    // The access token expires; the refresh token still refreshes.
    s.clock.advance_ms(60_001);
    let (status, json, _) = send(s.addr, "GET", whoami, Some(&a1), None).await;
    assert_eq!(
        (status, json["soft_logout"].as_bool()),
        (StatusCode::UNAUTHORIZED, Some(true))
    );
    let (status, json, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/refresh",
        None,
        Some(&refresh_body(&r1)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let a2 = json["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&a2), None).await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenrefresh_is_single_use_and_exactly_one_of_many_concurrent_calls_wins() {
    let s = start().await;
    let login = s
        .sessions
        .login(ALICE, &SessionRequest::new().refresh(true));
    let r0 = login.refresh_token.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (addr, body) = (s.addr, refresh_body(&r0));
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
    let mut won = Vec::new();
    for task in tasks {
        let (status, json, _) = task.await.unwrap();
        match status {
            StatusCode::OK => won.push(json),
            StatusCode::FORBIDDEN => assert_eq!(json["errcode"], "M_FORBIDDEN"),
            other => panic!("unexpected {other}: {json}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one concurrent refresh succeeds");
    // The old access token died at once; the new one works.
    let whoami = crate::common::server::WHOAMI;
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&login.access_token), None)
            .await
            .1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    let a1 = won[0]["access_token"].as_str().unwrap();
    assert_eq!(
        send(s.addr, "GET", whoami, Some(a1), None).await.0,
        StatusCode::OK
    );
    assert!(won[0]["refresh_token"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_endpoints_answer_bad_bodies_and_rate_limits() {
    let s = start().await;
    for (path, failure) in [
        ("/_matrix/client/v3/refresh", StatusCode::UNAUTHORIZED),
        ("/_matrix/client/r0/tokenrefresh", StatusCode::FORBIDDEN),
    ] {
        let cases = [
            ("not json", "M_NOT_JSON"),
            ("[1,2]", "M_BAD_JSON"),
            ("{}", "M_MISSING_PARAM"),
            ("{\"refresh_token\": 5}", "M_BAD_JSON"),
        ];
        for (body, errcode) in cases {
            let (status, json, _) = send(s.addr, "POST", path, None, Some(body)).await;
            assert_eq!(
                (status, json["errcode"].as_str()),
                (StatusCode::BAD_REQUEST, Some(errcode)),
                "{path} {body}"
            );
        }
        let (status, _, _) = send(s.addr, "POST", path, None, Some(&refresh_body("forged"))).await;
        assert_eq!(status, failure);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: x\r\nx-test-flood: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 2"),
        "{response}"
    );
    assert!(
        response.contains("\"retry_after_ms\":1500") && response.contains("M_LIMIT_EXCEEDED"),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_and_logout_all_accept_expired_tokens_and_revoke_linked_ones() {
    let s = start().await;
    let whoami = crate::common::server::WHOAMI;
    let phone = s.sessions.login(
        ALICE,
        &SessionRequest::new().device_id("PHONE").refresh(true),
    );
    let laptop = s
        .sessions
        .login(ALICE, &SessionRequest::new().device_id("LAPTOP"));
    let bob = s
        .sessions
        .login("@bob:example.org", &SessionRequest::default());

    // Logout with an expired access token: accepted; its refresh token dies with it.
    s.clock.advance_ms(60_001);
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&phone.access_token), None)
            .await
            .1["soft_logout"],
        true
    );
    let (status, _, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/logout",
        Some(&phone.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let body = refresh_body(phone.refresh_token.as_deref().unwrap());
    assert_eq!(
        send(
            s.addr,
            "POST",
            "/_matrix/client/v3/refresh",
            None,
            Some(&body)
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    // Expired routes other than logout still ask for a soft logout.
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&laptop.access_token), None)
            .await
            .0,
        StatusCode::OK
    );

    // Log out everywhere: every token of Alice's minted before now, none of Bob's.
    s.clock.advance_ms(1);
    let (status, _, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/logout/all",
        Some(&laptop.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&laptop.access_token), None)
            .await
            .1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&bob.access_token), None)
            .await
            .0,
        StatusCode::OK
    );
    s.clock.advance_ms(1);
    let fresh = s.sessions.login(ALICE, &SessionRequest::default());
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&fresh.access_token), None)
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn login_tokens_are_single_use() {
    let s = start().await;
    let (token, lifetime) = s.sessions.login_token(ALICE);
    assert_eq!(lifetime, 120_000);
    let parts = http::Request::new(()).into_parts().0;
    // Not an access token.
    let whoami = crate::common::server::WHOAMI;
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&token), None).await.1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    let user = s
        .sessions
        .redeem_login_token(token.as_bytes(), &parts)
        .await
        .unwrap();
    assert_eq!(user.user_id(), ALICE);
    assert!(
        s.sessions
            .redeem_login_token(token.as_bytes(), &parts)
            .await
            .is_err(),
        "second use"
    );
    let (late, _) = s.sessions.login_token(ALICE);
    s.clock.advance_ms(120_000);
    assert!(
        s.sessions
            .redeem_login_token(late.as_bytes(), &parts)
            .await
            .is_err(),
        "expired"
    );
}

#[tokio::test]
async fn minted_access_tokens_have_synapse_caveats_plus_device_id() {
    let s = start().await;
    let login = s
        .sessions
        .login(ALICE, &SessionRequest::new().device_id("D").guest(true));
    let parsed = macaroon::Macaroon::deserialize(&login.access_token).unwrap();
    let caveats: Vec<String> = parsed
        .first_party_caveats()
        .iter()
        .map(|c| match c {
            macaroon::Caveat::FirstParty(fp) => {
                String::from_utf8(fp.predicate().0.clone()).unwrap()
            }
            _ => unreachable!(),
        })
        .collect();
    // The session nonce comes first, where no holder of the token can write; then Synapse's
    // caveats in Synapse's order.
    assert!(caveats[0].starts_with("nonce = "));
    assert_eq!(
        caveats[1..4],
        [
            "gen = 1".to_owned(),
            format!("user_id = {ALICE}"),
            "type = access".to_owned()
        ]
    );
    assert_eq!(
        caveats[4..],
        ["guest = true".to_owned(), "device_id = D".to_owned()]
    );
    assert!(
        !login.access_token.contains('='),
        "V1 base64url without padding"
    );
}

#[tokio::test]
async fn logout_all_in_the_same_millisecond_revokes_earlier_logins_and_spares_later_ones() {
    // The clock stands still: every step happens within one millisecond.
    let s = start().await;
    let whoami = crate::common::server::WHOAMI;
    let phone = s.sessions.login(ALICE, &SessionRequest::default());
    let laptop = s.sessions.login(ALICE, &SessionRequest::default());
    let (status, _, _) = send(
        s.addr,
        "POST",
        "/_matrix/client/v3/logout/all",
        Some(&laptop.access_token),
        Some("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for token in [&phone.access_token, &laptop.access_token] {
        assert_eq!(
            send(s.addr, "GET", whoami, Some(token), None).await.1["errcode"],
            "M_UNKNOWN_TOKEN"
        );
    }
    let after = s.sessions.login(ALICE, &SessionRequest::default());
    assert_eq!(
        send(s.addr, "GET", whoami, Some(&after.access_token), None)
            .await
            .0,
        StatusCode::OK
    );
}

/// A body that sends `first`, then fails as a connection reset mid-body would.
struct BrokenBody {
    first: Option<bytes::Bytes>,
}

impl http_body::Body for BrokenBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(Some(match self.first.take() {
            Some(data) => Ok(http_body::Frame::data(data)),
            None => Err(std::io::ErrorKind::ConnectionReset.into()),
        }))
    }
}

/// The status and errcode a refresh endpoint answers `body` with.
async fn refresh_answer<B>(
    endpoint: &tower_matrix_auth::lifecycle::RefreshEndpoint,
    body: B,
) -> (StatusCode, String)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let request = http::Request::post("/refresh").body(body).unwrap();
    let response = endpoint.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let errcode = json["errcode"].as_str().unwrap_or_default().to_owned();
    (status, errcode)
}

/// A body that breaks off is not JSON (400 `M_NOT_JSON`), even when what arrived held a valid
/// refresh token, which stays usable; only a body over the limit is 413 `M_TOO_LARGE`.
#[tokio::test]
async fn refresh_endpoints_answer_a_broken_body_as_not_json_and_leave_the_token_alone() {
    use http_body_util::Full;
    use tower_matrix_auth::{Issuer, MemoryStore, Sessions, Verifier};

    let sessions = Sessions::new(
        Issuer::new(keys()).refreshable_access_lifetime(std::time::Duration::from_millis(60_000)),
        Verifier::new(keys()),
        MemoryStore::new(),
    );
    let login = SessionRequest::new().refresh(true);
    for endpoint in [
        sessions.refresh_endpoint(),
        sessions.token_refresh_endpoint(),
    ] {
        let tokens = sessions.login(ALICE, &login);
        let refresh = tokens.refresh_token.clone().unwrap();
        let whole = || bytes::Bytes::from(refresh_body(&refresh));

        let broken = BrokenBody {
            first: Some(whole()),
        };
        assert_eq!(
            refresh_answer(&endpoint, broken).await,
            (StatusCode::BAD_REQUEST, "M_NOT_JSON".to_owned())
        );
        let huge = format!(
            "{{\"refresh_token\": \"{refresh}\", \"pad\": \"{}\"}}",
            "x".repeat(70_000)
        );
        assert_eq!(
            refresh_answer(&endpoint, Full::new(bytes::Bytes::from(huge))).await,
            (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE".to_owned())
        );
        // Neither refusal spent the token.
        assert_eq!(
            refresh_answer(&endpoint, Full::new(whole())).await,
            (StatusCode::OK, String::new())
        );
    }
}
