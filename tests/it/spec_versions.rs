//! The spec's versions, over HTTP: `?access_token=` for application services only on a v1.20
//! server (MSC4127 removes it from the client-server API), and the federation API's OpenID
//! `access_token`, which is never the layer's.

use http::StatusCode;
use tower_matrix_auth::hooks::{AppService, AppServices, ManualClock};
use tower_matrix_auth::layer::QueryToken;
use tower_matrix_auth::{MatrixAuthLayer, Verifier};

use crate::common::server::{send, serve_echo};
use crate::common::*;

const AS_TOKEN: &str = "as_token_bridge_0123456789";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

fn layer() -> MatrixAuthLayer {
    MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
}

fn bridge() -> AppServices {
    AppServices::new()
        .with(
            AppService::new("bridge", AS_TOKEN, "@bridge:example.org")
                .unwrap()
                .user_namespace("@bridge_.*:example.org", true)
                .unwrap(),
        )
        .unwrap()
}

/// `QueryToken::AppServicesOnly`: a user's query token is ignored as if absent (the header, or
/// nothing, decides), an `as_token` in the query still authenticates, and the parameter is never
/// passed on.
#[tokio::test]
async fn a_v1_20_server_reads_query_tokens_of_application_services_only() {
    let addr = serve_echo(
        layer()
            .query_token(QueryToken::AppServicesOnly)
            .appservices(bridge()),
    )
    .await;
    let user = access_token(&[]);
    let get = |path: String, header: Option<String>| async move {
        send(addr, "GET", &path, header.as_deref(), None).await
    };

    // A user's token in the query: not read, so no token at all.
    let (status, json, _) = get(format!("{WHOAMI}?access_token={user}"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["errcode"], "M_MISSING_TOKEN");
    // The same beside a header: the header decides (under `Allowed` this is the mixing error).
    let (status, json, _) = get(format!("{WHOAMI}?access_token={user}"), Some(user.clone())).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["user_id"], ALICE);
    assert_eq!(
        json["uri"], WHOAMI,
        "the ignored parameter is still stripped"
    );
    // An `as_token` in the query authenticates the bridge.
    let (status, json, _) = get(format!("{WHOAMI}?access_token={AS_TOKEN}"), None).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["user_id"], "@bridge:example.org");
    assert_eq!(json["uri"], WHOAMI);
    // An `as_token` in the query beside a header is ambiguous, as ever.
    let (status, json, _) = get(
        format!("{WHOAMI}?access_token={AS_TOKEN}"),
        Some(user.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["errcode"], "M_MISSING_TOKEN");

    // `Allowed` (the default) still reads both; `Ignored` reads neither.
    let allowed = serve_echo(layer().appservices(bridge())).await;
    let (status, _, _) = send(
        allowed,
        "GET",
        &format!("{WHOAMI}?access_token={user}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ignored = serve_echo(
        layer()
            .query_token(QueryToken::Ignored)
            .appservices(bridge()),
    )
    .await;
    let (status, json, _) = send(
        ignored,
        "GET",
        &format!("{WHOAMI}?access_token={AS_TOKEN}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json["errcode"], "M_MISSING_TOKEN");
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=…` carries an OpenID token another
/// server hands in. The layer neither authenticates it nor strips it, even when no rule skips
/// the federation API, and a skip rule passes the query on untouched too.
#[tokio::test]
async fn the_federation_openid_token_is_never_claimed() {
    const USERINFO: &str = "/_matrix/federation/v1/openid/userinfo?access_token=openid_abc123";
    for layer in [
        layer(),
        layer().skip_path_prefix("/_matrix/federation/"),
        layer().query_token(QueryToken::Ignored),
    ] {
        let addr = serve_echo(layer).await;
        let (status, json, _) = send(addr, "GET", USERINFO, None, None).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(
            json["uri"], USERINFO,
            "the OpenID token reaches the handler"
        );
        assert_eq!(json["user_id"], serde_json::Value::Null);
    }
    // Only that route, in normal form: others are authenticated as configured.
    let addr = serve_echo(layer()).await;
    for path in [
        "/_matrix/federation/v1/openid/userinfo/x?access_token=openid_abc123",
        "/_matrix/federation/v1/openid/userinfo/?access_token=openid_abc123",
        "/_matrix/federation/v1/openid/%75serinfo?access_token=openid_abc123",
        "/_matrix/federation/v1/../v1/openid/userinfo?access_token=openid_abc123",
        "/_matrix/client/v3/openid/userinfo?access_token=openid_abc123",
    ] {
        let (status, json, _) = send(addr, "GET", path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {json}");
    }
    let (status, _, _) = send(
        addr,
        "POST",
        "/_matrix/federation/v1/openid/userinfo?access_token=openid_abc123",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "GET only");
}

/// A skipped request is passed on as it came: a skip rule is not the layer's to read, so it does
/// not strip an `access_token` it did not check either.
#[tokio::test]
async fn skipped_requests_keep_their_query() {
    let addr = serve_echo(layer().skip_path("/_matrix/client/versions")).await;
    let (status, json, _) = send(
        addr,
        "GET",
        "/_matrix/client/versions?access_token=whatever",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json["uri"],
        "/_matrix/client/versions?access_token=whatever"
    );
}
