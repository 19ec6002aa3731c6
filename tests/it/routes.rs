//! Path-dependent rules over real HTTP (raw request lines, so the server sees the path exactly as
//! sent, dot segments included): the exceptions for logout, whoami, suspended accounts and skipped
//! prefixes name exact routes, never a substring, a suffix or a path with dot segments (the
//! outside review's finding 3).

use crate::common::server::{send, serve_echo};
use crate::common::*;
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{AccountStatus, ManualClock, MemoryAccounts},
    routes::is_whoami_route,
    MatrixAuthLayer, Verifier,
};

fn layer() -> MatrixAuthLayer {
    MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
}

/// Routes whose last segment the client picks, set to `logout`: none is a logout.
const ENDING_IN_LOGOUT: [(&str, &str); 8] = [
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/logout",
    ),
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/state/m.room.topic/logout",
    ),
    (
        "PUT",
        "/_matrix/client/v3/user/@alice:example.org/account_data/logout",
    ),
    ("PUT", "/_matrix/client/v3/sendToDevice/m.x/logout"),
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/redact/$e/logout",
    ),
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/logou%74",
    ),
    (
        "PUT",
        "/_matrix/client/v3/rooms/!r:example.org/state/logout/all",
    ),
    (
        "POST",
        "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/x/../../../../logout",
    ),
];

const LOGOUTS: [&str; 3] = [
    "/_matrix/client/v3/logout",
    "/_matrix/client/v3/logout/all",
    "/_matrix/client/r0/logout",
];

/// A locked account passed on every route ending in `/logout` (`ends_with`); now only on
/// `POST …/logout` and `…/logout/all`.
#[tokio::test]
async fn locked_account_passes_on_the_logout_routes_only() {
    let accounts = MemoryAccounts::default();
    accounts.set(ALICE, AccountStatus::Locked);
    let addr = serve_echo(layer().accounts(accounts)).await;
    let token = access_token(&[]);
    for (method, path) in ENDING_IN_LOGOUT {
        let (status, json, _) = send(addr, method, path, Some(&token), Some("{}")).await;
        assert_eq!(
            (
                status,
                json["errcode"].as_str(),
                json["soft_logout"].as_bool()
            ),
            (StatusCode::UNAUTHORIZED, Some("M_USER_LOCKED"), Some(true)),
            "{method} {path}: {json}"
        );
    }
    let (status, json, _) = send(addr, "GET", LOGOUTS[0], Some(&token), None).await;
    assert_eq!(
        (status, json["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_USER_LOCKED")),
        "logout is POST"
    );
    for path in LOGOUTS {
        let (status, json, _) = send(addr, "POST", path, Some(&token), Some("{}")).await;
        assert_eq!(
            (status, json["user_id"].as_str()),
            (StatusCode::OK, Some(ALICE)),
            "{path}"
        );
    }
}

/// `allow_expired_on_logout` replaces the `contains("/logout")` an earlier README suggested,
/// under which an expired token worked on every route with a client-chosen segment starting with
/// `logout`.
#[tokio::test]
async fn expired_token_is_accepted_on_the_logout_routes_only() {
    let addr = serve_echo(layer().allow_expired_on_logout()).await;
    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
    for (method, path) in ENDING_IN_LOGOUT {
        let (status, json, _) = send(addr, method, path, Some(&expired), Some("{}")).await;
        assert_eq!(
            (
                status,
                json["errcode"].as_str(),
                json["soft_logout"].as_bool()
            ),
            (
                StatusCode::UNAUTHORIZED,
                Some("M_UNKNOWN_TOKEN"),
                Some(true)
            ),
            "{method} {path}: {json}"
        );
    }
    for path in LOGOUTS {
        let (status, json, _) = send(addr, "POST", path, Some(&expired), Some("{}")).await;
        assert_eq!(
            (status, json["user_id"].as_str()),
            (StatusCode::OK, Some(ALICE)),
            "{path}"
        );
    }
}

/// The suspension rule was a deny-list over the raw path: a trailing slash, the legacy
/// `POST …/send/{eventType}`, `…/upgrade` and transaction-id forms got through. It is now reads
/// plus an allow-list of writes.
#[tokio::test]
async fn suspended_account_cannot_write_through_another_form_of_a_write() {
    let accounts = MemoryAccounts::default();
    accounts.set(ALICE, AccountStatus::Suspended);
    let addr = serve_echo(layer().accounts(accounts)).await;
    let token = access_token(&[]);
    for (method, path) in [
        ("POST", "/_matrix/client/v3/createRoom/"),
        ("PUT", "/_matrix/client/v3/createRoom/txn1"),
        (
            "POST",
            "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message",
        ),
        ("POST", "/_matrix/client/v3/rooms/!r:example.org/upgrade"),
        ("POST", "/_matrix/client/v3/join/!r:example.org/"),
        ("PUT", "/_matrix/client/v3/rooms/!r:example.org/invite/txn1"),
        ("POST", "/_matrix/client/v3/rooms/!r:example.org/invit%65"),
        (
            "POST",
            "/_matrix/client/v3/rooms/!r:example.org/state/m.room.name/",
        ),
        (
            "POST",
            "/_matrix/client/v3/rooms/!r:example.org/leave/../../../createRoom",
        ),
        ("GET", "/_matrix/client/v3/rooms/%2e%2e/sync"),
    ] {
        let (status, json, _) = send(addr, method, path, Some(&token), Some("{}")).await;
        assert_eq!(
            (status, json["errcode"].as_str()),
            (StatusCode::FORBIDDEN, Some("M_USER_SUSPENDED")),
            "{method} {path}: {json}"
        );
    }
    for (method, path) in [
        ("GET", "/_matrix/client/v3/sync"),
        ("POST", "/_matrix/client/v3/rooms/!r:example.org/leave"),
        ("POST", "/_matrix/client/v3/keys/upload"),
        ("POST", "/_matrix/client/v3/logout"),
    ] {
        let (status, json, _) = send(addr, method, path, Some(&token), Some("{}")).await;
        assert_eq!(
            (status, json["suspended"].as_bool()),
            (StatusCode::OK, Some(true)),
            "{method} {path}: {json}"
        );
    }
}

/// What the layer refuses, the homeserver can allow: here, messages to an administrators' room.
#[tokio::test]
async fn homeserver_widens_what_a_suspended_account_may_do() {
    use tower_matrix_auth::routes::ClientRoute;
    let accounts = MemoryAccounts::default();
    accounts.set(ALICE, AccountStatus::Suspended);
    let layer = layer().accounts(accounts).allow_suspended_when(|parts| {
        ClientRoute::parse(parts.uri.path()).is_some_and(|route| {
            route.matches("rooms/{roomId}/send/m.room.message/{txnId}")
                && route.segments().nth(1) == Some("!admins:example.org")
        })
    });
    let addr = serve_echo(layer).await;
    let token = access_token(&[]);
    let to = |room: &str| format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/t1");
    let (status, _, _) = send(addr, "PUT", &to("!admins:example.org"), Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(
        addr,
        "PUT",
        &to("!admins%3Aexample.org"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "decoded, the same room");
    let (status, _, _) = send(addr, "PUT", &to("!other:example.org"), Some(&token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Dot segments: no route, so no exception.
    let walked = "/_matrix/client/v3/rooms/!admins:example.org/send/m.room.message/t1/../../../../!other:example.org/send/m.room.message/t1";
    let (status, _, _) = send(addr, "PUT", walked, Some(&token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// `skip_path_prefix` matched the raw path, so a prefix could be walked out of with `..`; under a
/// router that resolves dot segments the request would reach a client route unauthenticated.
#[tokio::test]
async fn dot_segments_are_never_skipped() {
    let layer = layer()
        .skip_path("/_matrix/client/versions")
        .skip_path_prefix("/_matrix/federation/")
        .skip_when(|parts| parts.uri.path().starts_with("/_matrix/key/"));
    let addr = serve_echo(layer).await;
    for path in [
        "/_matrix/federation/../client/v3/account/whoami",
        "/_matrix/federation/%2e%2e/client/v3/account/whoami",
        "/_matrix/federation/.%2E/client/v3/account/whoami",
        "/_matrix/federation/v1/../../client/v3/account/whoami",
        "/_matrix/federation/./../client/v3/account/whoami",
        "/_matrix/key/../client/v3/account/whoami",
        "/_matrix/client/versions/../v3/account/whoami",
    ] {
        let (status, json, _) = send(addr, "GET", path, None, None).await;
        assert_eq!(
            (status, json["errcode"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN")),
            "{path}: {json}"
        );
    }
    for path in [
        "/_matrix/federation/v1/version",
        "/_matrix/key/v2/server",
        "/_matrix/client/versions",
    ] {
        let (status, json, _) = send(addr, "GET", path, None, None).await;
        assert_eq!(
            (status, json["inner"].as_bool()),
            (StatusCode::OK, Some(true)),
            "{path}"
        );
    }
}

/// The example's guest rule was `ends_with("/account/whoami")`, which a state event of type
/// `account` with state key `whoami` also ends with.
#[tokio::test]
async fn guests_pass_on_whoami_only() {
    let addr = serve_echo(layer().allow_guests_when(is_whoami_route)).await;
    let guest = access_token(&["guest = true"]);
    let (status, json, _) = send(
        addr,
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&guest),
        None,
    )
    .await;
    assert_eq!(
        (status, json["user_id"].as_str()),
        (StatusCode::OK, Some(ALICE))
    );
    for (method, path) in [
        (
            "PUT",
            "/_matrix/client/v3/rooms/!r:example.org/state/account/whoami",
        ),
        (
            "GET",
            "/_matrix/client/v3/rooms/!r:example.org/state/account/whoami",
        ),
        ("GET", "/_matrix/client/v3/devices/../account/whoami"),
    ] {
        let (status, json, _) = send(addr, method, path, Some(&guest), Some("{}")).await;
        assert_eq!(
            (status, json["errcode"].as_str()),
            (StatusCode::FORBIDDEN, Some("M_GUEST_ACCESS_FORBIDDEN")),
            "{method} {path}: {json}"
        );
    }
}
