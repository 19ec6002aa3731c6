//! Feature `ruma`: the JSON ruma sends for our rejections is the JSON the layer sends, and the
//! identity converts to ruma's identifiers.
//!
//! Every kind of rejection is provoked by a real request through the layer (`oneshot`), twice:
//! once rendered by the layer itself, once by a layer that renders with ruma
//! (`ruma_common::api::error::Error::from(&rejection)` then ruma's own
//! `try_into_http_response`). Status, `Content-Type` and the parsed JSON must be equal.
#![cfg(feature = "ruma")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use ruma_common::api::error::{Error as RumaError, ErrorKind, UnknownTokenErrorData};
use ruma_common::api::OutgoingResponseExt;
use ruma_common::{IdParseError, OwnedUserId};
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    hooks::{
        AccountStatus, AppService, AppServices, BackendError, ManualClock, MemoryAccounts,
        ResolveFuture, ResolvedToken, Revocation, RevocationCheck, RevocationStatus, StaticTokens,
        TokenResolver,
    },
    MatrixAuthLayer, MatrixUser, Rejection, Verifier,
};

const AS_TOKEN: &str = "as_token_irc_0123456789";

/// What went over the wire.
#[derive(Debug)]
struct Sent {
    status: StatusCode,
    headers: http::HeaderMap,
    json: serde_json::Value,
}

async fn send(layer: MatrixAuthLayer, request: Request<Full<Bytes>>) -> Sent {
    let response = layer
        .layer(service_fn(echo))
        .oneshot(request)
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Sent {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&body).expect("a JSON body"),
    }
}

/// How a homeserver built on ruma renders an error.
fn render_with_ruma(rejection: &Rejection) -> Response<Bytes> {
    RumaError::from(rejection)
        .try_into_http_response::<Vec<u8>>()
        .expect("ruma serializes a standard error body")
        .map(Bytes::from)
}

/// Sends `request()` through `layer` rendered by the layer and rendered by ruma; asserts the two
/// responses are the same and returns what was sent, and the rejection.
async fn same_on_the_wire(
    layer: &MatrixAuthLayer,
    request: impl Fn() -> Request<Full<Bytes>>,
) -> (Sent, Rejection) {
    let ours = send(layer.clone(), request()).await;
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let with_ruma = layer.clone().render_rejection(move |rejection| {
        *record.lock().unwrap() = Some(rejection.clone());
        render_with_ruma(rejection)
    });
    let theirs = send(with_ruma, request()).await;
    let rejection = seen
        .lock()
        .unwrap()
        .take()
        .expect("the request was rejected");

    assert!(ours.json["inner"].is_null(), "the inner service never ran");
    assert_eq!(ours.status, theirs.status, "{rejection:?}");
    assert_eq!(ours.json, theirs.json, "{rejection:?}");
    assert_eq!(
        ours.headers["content-type"], theirs.headers["content-type"],
        "{rejection:?}"
    );
    // The one header ruma does not write: Retry-After on 503 (it does for M_LIMIT_EXCEEDED only).
    if rejection.is_unavailable() {
        assert_eq!(ours.headers["retry-after"], "1");
        assert!(theirs.headers.get("retry-after").is_none());
    } else {
        assert!(ours.headers.get("retry-after").is_none());
    }
    (ours, rejection)
}

fn get(uri: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    match token {
        Some(token) => bearer(uri, token),
        None => plain(uri),
    }
}

struct DownResolver;

impl TokenResolver for DownResolver {
    fn resolve(&self, _: &str) -> ResolveFuture {
        Box::pin(async { Err(BackendError::new("database down")) })
    }
}

struct Store(Result<RevocationStatus, ()>);

impl Revocation for Store {
    fn check(&self, _: &MatrixUser) -> RevocationCheck {
        RevocationCheck::ready(
            self.0
                .map_err(|()| BackendError::new("database unreachable")),
        )
    }
}

fn base() -> MatrixAuthLayer {
    MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
}

#[tokio::test]
async fn every_rejection_is_the_same_json_through_ruma() {
    let token = access_token(&[]);
    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
    let guest = access_token(&["guest = true"]);
    let forged = mint_with(
        "wrong secret",
        "key",
        &["user_id = @alice:example.org", "type = access"],
        macaroon::Format::V2,
    );
    let mixed = || {
        Request::get(format!("/x?access_token={token}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap()
    };
    let locked = MemoryAccounts::default();
    locked.set(ALICE, AccountStatus::Locked);
    let suspended = MemoryAccounts::default();
    suspended.set(ALICE, AccountStatus::Suspended);
    let deactivated = MemoryAccounts::default();
    deactivated.set(ALICE, AccountStatus::Deactivated);
    let appservices = base().appservices(
        AppServices::new()
            .with(
                AppService::new("irc", AS_TOKEN, "@irc_bot:example.org")
                    .unwrap()
                    .user_namespace("@irc_.*:example.org", true)
                    .unwrap(),
            )
            .unwrap()
            .devices(|_, device_id| device_id == "KNOWN"),
    );
    let send_message = "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/txn1";

    // (what, layer, request, status, errcode, soft_logout, ruma's kind)
    type Case<'a> = (
        &'a str,
        MatrixAuthLayer,
        Box<dyn Fn() -> Request<Full<Bytes>> + 'a>,
        StatusCode,
        &'a str,
        bool,
        ErrorKind,
    );
    let unknown_token = |soft_logout: bool| {
        let mut data = UnknownTokenErrorData::new();
        data.soft_logout = soft_logout;
        ErrorKind::UnknownToken(data)
    };
    let cases: Vec<Case<'_>> = vec![
        (
            "missing token",
            base(),
            Box::new(|| get("/x", None)),
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            false,
            ErrorKind::MissingToken,
        ),
        (
            "header and query token mixed",
            base(),
            Box::new(mixed),
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            false,
            ErrorKind::MissingToken,
        ),
        (
            "forged",
            base(),
            Box::new(|| get("/x", Some(&forged))),
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            false,
            unknown_token(false),
        ),
        (
            "expired: soft logout",
            base(),
            Box::new(|| get("/x", Some(&expired))),
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            true,
            unknown_token(true),
        ),
        (
            "revoked",
            base().revocation(Store(Ok(RevocationStatus::Revoked))),
            Box::new(|| get("/x", Some(&token))),
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            false,
            unknown_token(false),
        ),
        (
            "deactivated",
            base().accounts(deactivated),
            Box::new(|| get("/x", Some(&token))),
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            false,
            unknown_token(false),
        ),
        (
            "guest where guests may not go",
            base(),
            Box::new(|| get("/x", Some(&guest))),
            StatusCode::FORBIDDEN,
            "M_GUEST_ACCESS_FORBIDDEN",
            false,
            ErrorKind::GuestAccessForbidden,
        ),
        (
            "locked account",
            base().accounts(locked),
            Box::new(|| get("/_matrix/client/v3/sync", Some(&token))),
            StatusCode::UNAUTHORIZED,
            "M_USER_LOCKED",
            true,
            ErrorKind::UserLocked,
        ),
        (
            "suspended account sending a message",
            base().accounts(suspended),
            Box::new(|| {
                Request::put(send_message)
                    .header("authorization", format!("Bearer {token}"))
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap()
            }),
            StatusCode::FORBIDDEN,
            "M_USER_SUSPENDED",
            false,
            ErrorKind::UserSuspended,
        ),
        (
            "application service outside its namespace",
            appservices.clone(),
            Box::new(|| get("/x?user_id=@alice:example.org", Some(AS_TOKEN))),
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            false,
            ErrorKind::Forbidden,
        ),
        (
            "application service naming an unknown device",
            appservices,
            Box::new(|| {
                get(
                    "/x?user_id=@irc_a:example.org&device_id=NOPE",
                    Some(AS_TOKEN),
                )
            }),
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN_DEVICE",
            false,
            ErrorKind::UnknownDevice,
        ),
        (
            "revocation store unavailable",
            base().revocation(Store(Err(()))),
            Box::new(|| get("/x", Some(&token))),
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            false,
            ErrorKind::Unknown,
        ),
        (
            "token resolver unavailable",
            base().resolver(DownResolver),
            Box::new(|| get("/x", Some("syt_opaque_token"))),
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            false,
            ErrorKind::Unknown,
        ),
    ];

    for (what, layer, request, status, errcode, soft_logout, kind) in cases {
        let (sent, rejection) = same_on_the_wire(&layer, request).await;
        assert_eq!(
            (
                sent.status,
                sent.json["errcode"].as_str(),
                sent.json["soft_logout"].as_bool().unwrap_or(false)
            ),
            (status, Some(errcode), soft_logout),
            "{what}: provoked the intended rejection"
        );
        assert_eq!(sent.json["error"], rejection.message(), "{what}");
        let error = RumaError::from(rejection.clone());
        assert_eq!(error.status_code, status, "{what}");
        assert_eq!(
            error.error_kind(),
            Some(&kind),
            "{what}: mirrors the errcode"
        );
        assert_eq!(
            error.to_string(),
            format!("[{} / {errcode}] {}", status.as_u16(), rejection.message()),
            "{what}"
        );
    }
}

/// The identifiers a handler reads, converted by an inner service from the identity the layer
/// attached.
async fn ruma_ids(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = request
        .extensions()
        .get::<MatrixUser>()
        .expect("authenticated");
    let converted: Result<OwnedUserId, IdParseError> = user.try_into();
    assert_eq!(converted, user.ruma_user_id(), "TryFrom agrees");
    let body = serde_json::json!({
        "user_id": user.user_id(),
        "ruma_user_id": converted.as_ref().ok().map(|id| id.as_str()),
        "historical": converted.as_ref().ok().map(|id| id.is_historical()),
        "error": converted.as_ref().err().map(|e| format!("{e:?}")),
        "ruma_device_id": user.ruma_device_id().map(|d| d.as_str().to_owned()),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

async fn ids(layer: MatrixAuthLayer, token: &str) -> serde_json::Value {
    let response = layer
        .layer(service_fn(ruma_ids))
        .oneshot(bearer("/x", token))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn token_of(user_id: &str, extra: &[&str]) -> String {
    let user_caveat = format!("user_id = {user_id}");
    let mut caveats = vec![
        "gen = 1",
        user_caveat.as_str(),
        "type = access",
        "nonce = abcdefgh12345678",
    ];
    caveats.extend_from_slice(extra);
    mint_raw(&caveats)
}

#[tokio::test]
async fn identity_converts_to_ruma_identifiers() {
    // An ordinary user with a device.
    let json = ids(base(), &access_token(&["device_id = PHONE"])).await;
    assert_eq!(json["ruma_user_id"], ALICE);
    assert_eq!(json["historical"], false);
    assert_eq!(json["ruma_device_id"], "PHONE");
    let json = ids(base(), &access_token(&[])).await;
    assert!(json["ruma_device_id"].is_null());

    // A historical user id (upper case, punctuation the current grammar no longer allows): the
    // layer accepts it, and so does ruma, which marks it historical.
    for historical in ["@Alice:example.org", "@al!ce~:example.org"] {
        let json = ids(base(), &token_of(historical, &[])).await;
        assert_eq!(
            (json["ruma_user_id"].as_str(), json["historical"].as_bool()),
            (Some(historical), Some(true)),
            "{historical}"
        );
    }

    // Server names the layer's grammar accepts but ruma's does not: a 5-digit port above 65535,
    // a bracketed host that is not an IPv6 address. The layer authenticates the user; the
    // conversion reports the error instead of inventing an id.
    for odd in ["@alice:example.org:99999", "@alice:[1:2]"] {
        let json = ids(base(), &token_of(odd, &[])).await;
        assert_eq!(json["user_id"], odd);
        assert_eq!(
            (json["ruma_user_id"].as_str(), json["error"].as_str()),
            (None, Some("InvalidServerName")),
            "{odd}"
        );
    }

    // A resolver that vouches for something that is not a user id is refused (fail closed), so
    // every identity that reaches a handler has a syntactically valid user id.
    let resolver = StaticTokens::default().with("syt_no_sigil", ResolvedToken::user("alice"));
    let response = base()
        .resolver(resolver)
        .layer(service_fn(ruma_ids))
        .oneshot(bearer("/x", "syt_no_sigil"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // An application service acting as a user of its namespace, on a device.
    let appservices = AppServices::new()
        .with(
            AppService::new("irc", AS_TOKEN, "@irc_bot:example.org")
                .unwrap()
                .user_namespace("@irc_.*:example.org", true)
                .unwrap(),
        )
        .unwrap()
        .devices(|_, device_id| device_id == "KNOWN");
    let response = base()
        .appservices(appservices)
        .layer(service_fn(ruma_ids))
        .oneshot(bearer(
            "/x?user_id=@irc_alice:example.org&device_id=KNOWN",
            AS_TOKEN,
        ))
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            json["ruma_user_id"].as_str(),
            json["ruma_device_id"].as_str()
        ),
        (Some("@irc_alice:example.org"), Some("KNOWN"))
    );
}
