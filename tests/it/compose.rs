//! Composing into real homeserver stacks, over HTTP: application services, opaque tokens
//! beside macaroons, account state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::server::{send, serve_echo};
use crate::common::*;
use axum::routing::any;
use axum::Router;
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{
        AccountStatus, AppService, AppServices, BackendError, ManualClock, MemoryAccounts,
        ResolveFuture, ResolvedToken, StaticTokens, TokenResolver,
    },
    MatrixAuthLayer, MatrixUser, Verifier,
};

const AS_TOKEN: &str = "as_token_irc_0123456789";
const OTHER_AS_TOKEN: &str = "as_token_slack_9876543210";

fn appservices() -> AppServices {
    AppServices::new()
        .with(
            AppService::new("irc", AS_TOKEN, "@irc_bot:example.org")
                .unwrap()
                .user_namespace("@irc_.*:example.org", true)
                .unwrap()
                .user_namespace("@shared_.*:example.org", false)
                .unwrap(),
        )
        .unwrap()
        .with(
            AppService::new("slack", OTHER_AS_TOKEN, "@slack_bot:example.org")
                .unwrap()
                .user_namespace("@slack_.*:example.org", true)
                .unwrap()
                .user_namespace("@shared_exclusive_.*:example.org", true)
                .unwrap(),
        )
        .unwrap()
        .devices(|user_id, device_id| user_id == "@irc_alice:example.org" && device_id == "KNOWN")
}

#[tokio::test]
async fn application_services() {
    let addr = serve_echo(
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .appservices(appservices()),
    )
    .await;
    let get = |path: &'static str, token: &'static str| async move {
        send(addr, "GET", path, Some(token), None).await
    };

    let (status, json, _) = get("/x", AS_TOKEN).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json["user_id"], "@irc_bot:example.org",
        "no user_id: the sender"
    );
    assert_eq!(
        (json["appservice"].as_str(), json["credential"].as_str()),
        (Some("irc"), Some("AppService"))
    );

    let (status, json, _) = get("/x?user_id=@irc_alice:example.org", AS_TOKEN).await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some("@irc_alice:example.org"))
    );
    let (_, json, _) = get("/x?user_id=%40irc_bob%3Aexample.org", AS_TOKEN).await;
    assert_eq!(json["user_id"], "@irc_bob:example.org", "percent-decoded");
    let (status, json, _) = get(
        "/x?user_id=@irc_alice:example.org&device_id=KNOWN",
        AS_TOKEN,
    )
    .await;
    assert_eq!(
        (status, json["device_id"].as_str()),
        (StatusCode::OK, Some("KNOWN"))
    );

    for (path, status, errcode) in [
        (
            "/x?user_id=@alice:example.org",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        (
            "/x?user_id=@irc_alice:example.org.evil",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        (
            "/x?user_id=@slack_carol:example.org",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        // In irc's non-exclusive namespace but slack's exclusive one.
        (
            "/x?user_id=@shared_exclusive_dan:example.org",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        (
            "/x?user_id=@irc_a:example.org&user_id=@irc_b:example.org",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
        (
            "/x?user_id=@irc_alice:example.org&device_id=NOPE",
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN_DEVICE",
        ),
        (
            "/x?device_id=KNOWN",
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN_DEVICE",
        ),
    ] {
        let (got, json, _) = get(path, AS_TOKEN).await;
        assert_eq!(
            (got, json["errcode"].as_str()),
            (status, Some(errcode)),
            "{path}"
        );
    }
    let (status, json, _) = get("/x?user_id=@shared_dan:example.org", AS_TOKEN).await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some("@shared_dan:example.org"))
    );

    // The as_token also works as a query parameter, and a near miss is just an unknown token.
    let (status, json, _) = send(
        addr,
        "GET",
        &format!("/x?access_token={OTHER_AS_TOKEN}"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, json["appservice"].as_str()),
        (StatusCode::OK, Some("slack"))
    );
    let (status, json, _) = get("/x", "as_token_irc_0123456788").await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );

    // Ordinary users cannot masquerade: user_id and device_id are not theirs to set.
    let token = access_token(&[]);
    let (status, json, _) = send(
        addr,
        "GET",
        "/x?user_id=@irc_alice:example.org&device_id=KNOWN",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some(ALICE))
    );
    assert!(json["device_id"].is_null() && json["appservice"].is_null());
}

/// Counts lookups, so the test can prove macaroons never reach it.
struct CountingResolver {
    inner: StaticTokens,
    calls: AtomicUsize,
    fail: bool,
}

impl TokenResolver for CountingResolver {
    fn resolve(&self, token: &str) -> ResolveFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Box::pin(async { Err(BackendError::new("database down")) });
        }
        let lookup = self.inner.resolve(token);
        Box::pin(async move {
            tokio::task::yield_now().await; // answers later, like a database
            lookup.await
        })
    }
}

#[tokio::test]
async fn opaque_tokens_beside_macaroons() {
    let tokens = StaticTokens::default()
        .with(
            "syt_YWxpY2U_abcdefghijklmnopqrst_0a1b2c",
            ResolvedToken::user("@alice:example.org").device_id("SYNAPSE"),
        )
        .with(
            "syt_b2xk_expired",
            ResolvedToken::user("@bob:example.org").expires_at_ms(NOW_MS - 1),
        );
    let resolver = Arc::new(CountingResolver {
        inner: tokens,
        calls: AtomicUsize::new(0),
        fail: false,
    });
    let addr = serve_echo(
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .resolver(resolver.clone()),
    )
    .await;

    let (status, json, _) = send(
        addr,
        "GET",
        "/x",
        Some("syt_YWxpY2U_abcdefghijklmnopqrst_0a1b2c"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (json["user_id"].as_str(), json["device_id"].as_str()),
        (Some(ALICE), Some("SYNAPSE"))
    );
    assert_eq!(json["credential"], "Opaque");
    let (status, json, _) = send(addr, "GET", "/x", Some("syt_unknown_token"), None).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );
    let (status, json, _) = send(addr, "GET", "/x", Some("syt_b2xk_expired"), None).await;
    assert_eq!(
        (status, json["soft_logout"].as_bool()),
        (StatusCode::UNAUTHORIZED, Some(true))
    );
    assert_eq!(resolver.calls.load(Ordering::SeqCst), 3);

    // Macaroons, valid or forged, are verified here and never sent to the resolver.
    let valid = access_token(&[]);
    let forged = mint_with(
        "wrong secret",
        "key",
        &["user_id = @alice:example.org", "type = access"],
        macaroon::Format::V2,
    );
    assert_eq!(
        send(addr, "GET", "/x", Some(&valid), None).await.1["credential"],
        "Macaroon"
    );
    assert_eq!(
        send(addr, "GET", "/x", Some(&forged), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        3,
        "a macaroon reached the resolver"
    );
    // The length limit bounds opaque tokens too: one over it is refused before the resolver.
    let long = format!(
        "syt_{}",
        "x".repeat(tower_matrix_auth::macaroon::DEFAULT_MAX_TOKEN_LEN)
    );
    assert_eq!(
        send(addr, "GET", "/x", Some(&long), None).await.1["errcode"],
        "M_UNKNOWN_TOKEN"
    );
    assert_eq!(
        resolver.calls.load(Ordering::SeqCst),
        3,
        "a token over the length limit reached the resolver"
    );

    let down = Arc::new(CountingResolver {
        inner: StaticTokens::default(),
        calls: AtomicUsize::new(0),
        fail: true,
    });
    let addr = serve_echo(MatrixAuthLayer::new(keys()).resolver(down)).await;
    let (status, json, _) = send(addr, "GET", "/x", Some("syt_anything"), None).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("M_UNKNOWN")),
        "fail closed"
    );
}

#[tokio::test]
async fn account_state() {
    let accounts = MemoryAccounts::default();
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .accounts(accounts.clone());
    let addr = serve_echo(layer).await;
    let token = access_token(&[]);
    let send_message = "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/txn1";

    accounts.set(ALICE, AccountStatus::Locked);
    let (status, json, _) = send(addr, "GET", "/_matrix/client/v3/sync", Some(&token), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (json["errcode"].as_str(), json["soft_logout"].as_bool()),
        (Some("M_USER_LOCKED"), Some(true))
    );
    for logout in [
        "/_matrix/client/v3/logout",
        "/_matrix/client/v3/logout/all",
        "/_matrix/client/r0/logout",
    ] {
        assert_eq!(
            send(addr, "POST", logout, Some(&token), Some("{}")).await.0,
            StatusCode::OK,
            "{logout}"
        );
    }

    accounts.set(ALICE, AccountStatus::Suspended);
    let (status, json, _) = send(addr, "GET", "/_matrix/client/v3/sync", Some(&token), None).await;
    assert_eq!(
        (status, json["suspended"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, json, _) = send(addr, "PUT", send_message, Some(&token), Some("{}")).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_USER_SUSPENDED"))
    );
    assert_eq!(
        send(
            addr,
            "POST",
            "/_matrix/client/v3/rooms/!r:example.org/leave",
            Some(&token),
            Some("{}")
        )
        .await
        .0,
        StatusCode::OK
    );

    accounts.set(ALICE, AccountStatus::Deactivated);
    let (status, json, _) = send(addr, "GET", "/_matrix/client/v3/sync", Some(&token), None).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
    );
    assert!(json.get("soft_logout").is_none());
    // Deactivation wins over expiry: no soft logout for an account that is gone.
    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
    assert!(send(addr, "GET", "/x", Some(&expired), None)
        .await
        .1
        .get("soft_logout")
        .is_none());

    accounts.set(ALICE, AccountStatus::Active);
    let (status, json, _) = send(addr, "PUT", send_message, Some(&token), Some("{}")).await;
    assert_eq!(
        (status, json["suspended"].as_bool()),
        (StatusCode::OK, Some(false))
    );
}

#[tokio::test]
async fn appservice_aware_extractors() {
    use tower_matrix_auth::axum::AppServiceRequest;
    async fn only_appservices(request: AppServiceRequest) -> String {
        format!("{} as {}", request.appservice, request.user.user_id())
    }
    async fn anyone(request: Option<AppServiceRequest>, user: MatrixUser) -> String {
        match request {
            Some(request) => format!("appservice {}", request.appservice),
            None => format!("user {}", user.user_id()),
        }
    }
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .appservices(appservices());
    let app = Router::new()
        .route("/ping", any(only_appservices))
        .route("/anyone", any(anyone))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let raw = |path: &'static str, token: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = raw("/ping?user_id=@irc_alice:example.org", AS_TOKEN.into()).await;
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("irc as @irc_alice:example.org"),
        "{response}"
    );
    let response = raw("/ping", access_token(&[])).await;
    assert!(
        response.starts_with("HTTP/1.1 403") && response.contains("M_FORBIDDEN"),
        "{response}"
    );
    assert!(raw("/anyone", AS_TOKEN.into())
        .await
        .ends_with("appservice irc"));
    assert!(raw("/anyone", access_token(&[]))
        .await
        .ends_with(&format!("user {ALICE}")));
}

/// An application service acting as a user meets that user's account state: not as a
/// deactivated user, only as suspended accounts may act as a suspended one (and the handler sees
/// `is_suspended`), and a lock does not apply (as in Synapse). Before, every state was skipped.
#[tokio::test]
async fn application_services_meet_the_users_account_state() {
    let accounts = MemoryAccounts::default();
    accounts.set("@irc_gone:example.org", AccountStatus::Deactivated);
    accounts.set("@irc_quiet:example.org", AccountStatus::Suspended);
    accounts.set("@irc_locked:example.org", AccountStatus::Locked);
    let addr = serve_echo(
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .appservices(appservices())
            .accounts(accounts),
    )
    .await;
    let send_message = |user: &str| {
        format!("/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/t1?user_id={user}")
    };
    let (status, json, _) = send(
        addr,
        "GET",
        "/x?user_id=@irc_gone:example.org",
        Some(AS_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
    );
    let (status, json, _) = send(
        addr,
        "PUT",
        &send_message("@irc_quiet:example.org"),
        Some(AS_TOKEN),
        Some("{}"),
    )
    .await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_USER_SUSPENDED"))
    );
    let (status, json, _) = send(
        addr,
        "GET",
        "/_matrix/client/v3/sync?user_id=@irc_quiet:example.org",
        Some(AS_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, json["suspended"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let (status, json, _) = send(
        addr,
        "PUT",
        &send_message("@irc_locked:example.org"),
        Some(AS_TOKEN),
        Some("{}"),
    )
    .await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some("@irc_locked:example.org"))
    );
}

/// Another registration's sender is as good as exclusively claimed: a service whose
/// non-exclusive namespace covers it cannot act as it. Duplicate ids and `as_token`s are
/// refused at registration.
#[tokio::test]
async fn application_services_stay_apart() {
    let registrations = AppServices::new()
        .with(
            AppService::new("wide", AS_TOKEN, "@wide_bot:example.org")
                .unwrap()
                .user_namespace("@.*_bot:example.org", false)
                .unwrap(),
        )
        .unwrap()
        .with(AppService::new("narrow", OTHER_AS_TOKEN, "@narrow_bot:example.org").unwrap())
        .unwrap();
    let addr = serve_echo(
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .appservices(registrations.clone()),
    )
    .await;
    let (status, _, _) = send(
        addr,
        "GET",
        "/x?user_id=@narrow_bot:example.org",
        Some(AS_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, json, _) = send(
        addr,
        "GET",
        "/x?user_id=@other_bot:example.org",
        Some(AS_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some("@other_bot:example.org"))
    );

    let same_id = AppService::new("wide", "a different token", "@x:example.org").unwrap();
    assert!(registrations.clone().with(same_id).is_err());
    let same_token = AppService::new("third", AS_TOKEN, "@x:example.org").unwrap();
    assert!(registrations.with(same_token).is_err());
}
