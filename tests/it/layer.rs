//! The layer through `oneshot`: the caveat table, the extraction rules, and every policy knob.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{BackendError, ManualClock, Revocation, RevocationCheck, RevocationStatus},
    layer::{GuestPolicy, QueryToken},
    macaroon::attenuate,
    KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, TokenId, TokenType, Verifier,
};

fn verifier() -> Verifier {
    Verifier::new(keys()).clock(ManualClock::new(NOW_MS))
}

fn layer() -> MatrixAuthLayer {
    MatrixAuthLayer::with_verifier(verifier())
}

const BASE: [&str; 4] = [
    "gen = 1",
    "user_id = @alice:example.org",
    "type = access",
    "nonce = abcdefgh12345678",
];

/// Each rule of the caveat table, accepted and rejected. `None`: accepted; `Some(soft_logout)`:
/// `M_UNKNOWN_TOKEN` with that soft_logout.
#[tokio::test]
async fn caveat_table() {
    let before = (NOW_MS - 1).to_string();
    let at = NOW_MS.to_string();
    let after = (NOW_MS + 1).to_string();
    let cases: Vec<(&str, Vec<String>, Option<bool>)> = vec![
        ("synapse shape", vec![], None),
        ("gen = 1 twice", vec!["gen = 1".into()], None),
        ("gen = 2", vec!["gen = 2".into()], Some(false)),
        ("gen == 1", vec!["gen == 1".into()], Some(false)),
        (
            "same user_id again",
            vec!["user_id = @alice:example.org".into()],
            None,
        ),
        (
            "second user_id (2016 attack)",
            vec!["user_id = @mallory:example.org".into()],
            Some(false),
        ),
        (
            "user_id with another operator",
            vec!["user_id == @alice:example.org".into()],
            Some(false),
        ),
        ("time < future", vec![format!("time < {after}")], None),
        (
            "time < now (strict)",
            vec![format!("time < {at}")],
            Some(true),
        ),
        ("time < past", vec![format!("time < {before}")], Some(true)),
        ("time > past", vec![format!("time > {before}")], None),
        (
            "time > now (strict)",
            vec![format!("time > {at}")],
            Some(false),
        ),
        ("time == now", vec![format!("time == {at}")], None),
        (
            "time == other",
            vec![format!("time == {after}")],
            Some(false),
        ),
        ("time <= now", vec![format!("time <= {after}")], Some(false)),
        (
            "time not an integer",
            vec!["time < 17e11".into()],
            Some(false),
        ),
        ("time negative", vec!["time < -1".into()], Some(false)),
        (
            "time with sign",
            vec![format!("time < +{after}")],
            Some(false),
        ),
        (
            "time overflow",
            vec!["time < 99999999999999999999999".into()],
            Some(false),
        ),
        (
            "expired plus unknown caveat is not soft",
            vec![format!("time < {before}"), "colour = red".into()],
            Some(false),
        ),
        ("second nonce", vec!["nonce = another".into()], None),
        (
            "nonce with another operator",
            vec!["nonce != x".into()],
            Some(false),
        ),
        ("guest = true", vec!["guest = true".into()], None),
        ("guest = false", vec!["guest = false".into()], Some(false)),
        ("device_id", vec!["device_id = PHONE".into()], None),
        (
            "device_id twice, same",
            vec!["device_id = PHONE".into(), "device_id = PHONE".into()],
            None,
        ),
        (
            "device_id twice, different",
            vec!["device_id = PHONE".into(), "device_id = LAPTOP".into()],
            Some(false),
        ),
        (
            "type = refresh appended",
            vec!["type = refresh".into()],
            Some(false),
        ),
        ("type = access again", vec!["type = access".into()], None),
        (
            "unknown caveat fails closed",
            vec!["method = GET".into()],
            Some(false),
        ),
        (
            "malformed: double space",
            vec!["time  < 1".into()],
            Some(false),
        ),
        ("malformed: no value", vec!["colour =".into()], Some(false)),
        (
            "malformed: key charset",
            vec!["col-our = red".into()],
            Some(false),
        ),
    ];
    for (name, extra, expected) in cases {
        let mut caveats: Vec<&str> = BASE.to_vec();
        caveats.extend(extra.iter().map(String::as_str));
        let token = mint_raw(&caveats);
        let layer = layer().guests(GuestPolicy::Allowed);
        let out = call(&layer, bearer("/x", &token)).await;
        match expected {
            None => {
                assert_eq!(out.status, StatusCode::OK, "{name}: {:?}", out.json);
                assert_eq!(out.user_id(), Some(ALICE), "{name}");
            }
            Some(soft) => {
                assert_eq!(out.status, StatusCode::UNAUTHORIZED, "{name}");
                assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN", "{name}");
                assert_eq!(
                    out.json.get("soft_logout").is_some(),
                    soft,
                    "{name}: {:?}",
                    out.json
                );
                assert!(out.json["inner"].is_null(), "{name}: the inner service ran");
            }
        }
    }
}

#[tokio::test]
async fn required_caveats() {
    let cases = [
        ("no user_id", vec!["gen = 1", "type = access"]),
        ("no type", vec!["gen = 1", "user_id = @alice:example.org"]),
        ("bad user id", vec!["user_id = alice", "type = access"]),
        (
            "user id without server",
            vec!["user_id = @alice", "type = access"],
        ),
        (
            "refresh token",
            vec!["user_id = @alice:example.org", "type = refresh"],
        ),
        (
            "login token",
            vec!["user_id = @alice:example.org", "type = login"],
        ),
        (
            "unknown type",
            vec!["user_id = @alice:example.org", "type = admin"],
        ),
    ];
    for (name, caveats) in cases {
        let out = call(&layer(), bearer("/x", &mint_raw(&caveats))).await;
        assert_eq!(
            (out.status, out.errcode()),
            (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            "{name}"
        );
    }
    // gen is not required: Synapse never required it and attenuation cannot remove it anyway.
    let out = call(
        &layer(),
        bearer(
            "/x",
            &mint_raw(&["user_id = @alice:example.org", "type = access"]),
        ),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
}

/// Regression for the 2016 Synapse bug: a holder of Alice's token appended
/// `user_id = <someone else>` and was taken for that user.
#[tokio::test]
async fn regression_2016_appended_user_id_is_rejected() {
    let alice = access_token(&[]);
    let forged = attenuate(&alice, "user_id = @admin:example.org").unwrap();
    let out = call(&layer(), bearer("/x", &forged)).await;
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    assert!(out.json["inner"].is_null());
    // The same append done with the independent `macaroon` crate.
    let mut caveats = BASE.to_vec();
    caveats.push("user_id = @admin:example.org");
    let out = call(&layer(), bearer("/x", &mint_raw(&caveats))).await;
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
}

#[tokio::test]
async fn attenuation_narrows_but_keeps_identity_and_token_id() {
    let token = access_token(&[]);
    let plain_out = call(&layer(), bearer("/x", &token)).await;
    let narrowed = attenuate(&token, &format!("time < {}", NOW_MS + 60_000)).unwrap();
    let out = call(&layer(), bearer("/x", &narrowed)).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.json["expires_at_ms"], NOW_MS + 60_000);
    assert_eq!(
        out.json["token_id"], plain_out.json["token_id"],
        "attenuation must not escape revocation"
    );
    let expired = attenuate(&token, &format!("time < {}", NOW_MS - 1)).unwrap();
    let out = call(&layer(), bearer("/x", &expired)).await;
    assert_eq!(out.json["soft_logout"], true);
}

#[tokio::test]
async fn signature_and_keys() {
    // No location: it is not signed, so changing it would (rightly) not matter.
    let token = keys()
        .mint(ALICE, TokenType::Access)
        .unwrap()
        .nonce("abcdefgh12345678")
        .to_token();
    // Every single-character change of the token is refused, never a panic or a 500.
    let bytes = token.as_bytes();
    for i in 0..bytes.len() {
        let mut changed = bytes.to_vec();
        changed[i] = if changed[i] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(changed).unwrap();
        let out = call(&layer(), bearer("/x", &changed)).await;
        if out.status == StatusCode::OK {
            // Base64 has slack in its last character's low bits: same bytes, same token.
            assert_eq!(i, bytes.len() - 1, "change at {i} accepted");
        } else {
            assert_eq!(out.status, StatusCode::UNAUTHORIZED, "change at {i}");
        }
    }
    let wrong_secret = mint_with("another secret", "key", &BASE, macaroon::Format::V1);
    assert_eq!(
        call(&layer(), bearer("/x", &wrong_secret)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
    let unknown_id = mint_with(SECRET, "key9", &BASE, macaroon::Format::V1);
    assert_eq!(
        call(&layer(), bearer("/x", &unknown_id)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
}

#[tokio::test]
async fn key_rotation() {
    let old = mint_with("old secret", "key", &BASE, macaroon::Format::V1);
    let new = mint_with("new secret", "key2", &BASE, macaroon::Format::V2);
    let ring = KeyRing::new()
        .with_key("key2", MacaroonSecret::from_passphrase("new secret"))
        .with_key("key", MacaroonSecret::from_passphrase("old secret"));
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(ring.clone()).clock(ManualClock::new(NOW_MS)));
    assert_eq!(
        call(&layer, bearer("/x", &old)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&layer, bearer("/x", &new)).await.status,
        StatusCode::OK
    );
    // The ring mints with its first key, and that token verifies.
    let minted = ring
        .mint(ALICE, TokenType::Access)
        .unwrap()
        .nonce("n")
        .to_token();
    assert_eq!(
        call(&layer, bearer("/x", &minted)).await.status,
        StatusCode::OK
    );
    let retired = MatrixAuthLayer::new(
        KeyRing::new().with_key("key2", MacaroonSecret::from_passphrase("new secret")),
    );
    assert_eq!(
        call(&retired, bearer("/x", &old)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
}

#[tokio::test]
async fn every_format_and_encoding() {
    use base64::Engine;
    for (name, format) in [
        ("v1", macaroon::Format::V1),
        ("v2", macaroon::Format::V2),
        ("v2json", macaroon::Format::V2JSON),
    ] {
        let token = mint_with(SECRET, "key", &BASE, format);
        let mut encodings = vec![token.clone()];
        if name != "v2json" {
            let binary = base64::engine::general_purpose::URL_SAFE
                .decode(&token)
                .unwrap();
            encodings.push(base64::engine::general_purpose::STANDARD.encode(&binary));
            encodings.push(base64::engine::general_purpose::STANDARD_NO_PAD.encode(&binary));
            encodings.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&binary));
        }
        for encoded in encodings {
            let query = format!("/x?access_token={}", urlencode(&encoded));
            let out = call(&layer(), plain(&query)).await;
            assert_eq!(out.status, StatusCode::OK, "{name} {encoded}");
            assert_eq!(out.user_id(), Some(ALICE));
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn extraction_rules() {
    let token = access_token(&[]);
    let q = |extra: &str| format!("/x?access_token={token}{extra}");
    let missing = |out: &Outcome, why: &str| {
        assert_eq!(
            (out.status, out.errcode()),
            (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            "{why}"
        );
        assert!(
            out.json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{why}"
        );
    };
    missing(&call(&layer(), plain("/x")).await, "no token");
    missing(
        &call(&layer(), plain("/x?access_token=")).await,
        "empty query token",
    );
    missing(&call(&layer(), bearer("/x", "")).await, "empty bearer");
    let both = bearer(&q(""), &token);
    let out = call(&layer(), both).await;
    missing(&out, "header and query");
    assert!(out.json["error"].as_str().unwrap().contains("Mixing"));
    missing(
        &call(&layer(), plain(&q(&format!("&access_token={token}")))).await,
        "two query tokens",
    );
    let two_headers = http::Request::get("/x")
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Default::default())
        .unwrap();
    missing(&call(&layer(), two_headers).await, "two headers");
    for value in [
        "Basic YWxpY2U6cGFzc3dvcmQ=".to_owned(),
        format!("Bearer  {token}"),
        format!("Bearer {token} extra"),
        format!("Token {token}"),
    ] {
        let request = http::Request::get("/x")
            .header("authorization", value)
            .body(Default::default())
            .unwrap();
        missing(&call(&layer(), request).await, "not bearer");
    }
    let non_ascii = http::Request::get("/x")
        .header(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .body(Default::default())
        .unwrap();
    missing(&call(&layer(), non_ascii).await, "non-ASCII header");
    // The scheme is case-insensitive.
    let lower = http::Request::get("/x")
        .header("authorization", format!("bearer {token}"))
        .body(Default::default())
        .unwrap();
    assert_eq!(call(&layer(), lower).await.status, StatusCode::OK);
    // A query token that is garbage is an unknown token, not a missing one.
    assert_eq!(
        call(&layer(), plain("/x?access_token=%FF%00garbage"))
            .await
            .errcode(),
        "M_UNKNOWN_TOKEN"
    );
}

#[tokio::test]
async fn query_tokens_can_be_ignored_and_are_stripped() {
    let token = access_token(&[]);
    let out = call(&layer(), plain(&format!("/x?a=1&access_token={token}&b=2"))).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(
        out.json["uri"], "/x?a=1&b=2",
        "the inner service must not see the token"
    );
    let keep = layer().strip_query_token(false);
    let out = call(&keep, plain(&format!("/x?access_token={token}"))).await;
    assert!(out.json["uri"].as_str().unwrap().contains(&token));
    let header_only = layer().query_token(QueryToken::Ignored);
    let out = call(&header_only, plain(&format!("/x?access_token={token}"))).await;
    assert_eq!(out.errcode(), "M_MISSING_TOKEN");
    let out = call(
        &header_only,
        bearer(&format!("/x?access_token={token}"), &token),
    )
    .await;
    assert_eq!(
        out.status,
        StatusCode::OK,
        "an ignored parameter cannot cause a mixing error"
    );
    assert_eq!(out.json["uri"], "/x");
}

#[tokio::test]
async fn limits() {
    let many: Vec<String> = (0..70).map(|i| format!("nonce = {i}")).collect();
    let mut caveats = BASE.to_vec();
    caveats.extend(many.iter().map(String::as_str));
    let token = mint_raw(&caveats);
    assert_eq!(
        call(&layer(), bearer("/x", &token)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
    assert_eq!(
        call(
            &MatrixAuthLayer::with_verifier(verifier().max_caveats(100)),
            bearer("/x", &token)
        )
        .await
        .status,
        StatusCode::OK
    );
    let long = "A".repeat(4097);
    assert_eq!(
        call(&layer(), bearer("/x", &long)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
    let token = access_token(&[]);
    assert_eq!(
        call(
            &MatrixAuthLayer::with_verifier(verifier().max_token_len(token.len() - 1)),
            bearer("/x", &token)
        )
        .await
        .errcode(),
        "M_UNKNOWN_TOKEN"
    );
}

#[tokio::test]
async fn skip_and_optional() {
    let token = access_token(&[]);
    let layer = layer()
        .skip_path("/_matrix/client/versions")
        .skip_path_prefix("/_matrix/federation/")
        .optional_when(|parts| parts.uri.path() == "/public");
    let out = call(&layer, plain("/_matrix/client/versions")).await;
    assert_eq!(
        (out.status, out.json["user_id"].is_null()),
        (StatusCode::OK, true)
    );
    let federation = http::Request::get("/_matrix/federation/v1/version")
        .header("authorization", "X-Matrix origin=\"a\",key=\"b\",sig=\"c\"")
        .body(Default::default())
        .unwrap();
    assert_eq!(call(&layer, federation).await.status, StatusCode::OK);
    assert_eq!(call(&layer, plain("/public")).await.status, StatusCode::OK);
    assert_eq!(
        call(&layer, bearer("/public", &token)).await.user_id(),
        Some(ALICE)
    );
    assert_eq!(
        call(&layer, bearer("/public", "forged")).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
    let basic = http::Request::get("/public")
        .header("authorization", "Basic eA==")
        .body(Default::default())
        .unwrap();
    assert_eq!(
        call(&layer, basic).await.errcode(),
        "M_MISSING_TOKEN",
        "a malformed header is not 'no token'"
    );
    assert_eq!(
        call(&layer, plain("/private")).await.errcode(),
        "M_MISSING_TOKEN"
    );
    let everywhere = MatrixAuthLayer::new(keys()).optional();
    assert_eq!(
        call(&everywhere, plain("/private")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn guests() {
    let guest = access_token(&["guest = true"]);
    let out = call(&layer(), bearer("/x", &guest)).await;
    assert_eq!(
        (out.status, out.errcode()),
        (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN")
    );
    let some = layer().allow_guests_when(|p| p.uri.path() == "/whoami");
    let out = call(&some, bearer("/whoami", &guest)).await;
    assert_eq!(
        (out.status, out.json["is_guest"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    assert_eq!(
        call(&some, bearer("/devices", &guest)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&layer().guests(GuestPolicy::Allowed), bearer("/x", &guest))
            .await
            .status,
        StatusCode::OK
    );
    // A guest token that expired asks for a soft logout, not a 403.
    let expired_guest = access_token(&["guest = true", &format!("time < {}", NOW_MS - 5)]);
    assert_eq!(
        call(&layer(), bearer("/x", &expired_guest)).await.json["soft_logout"],
        true
    );
}

#[tokio::test]
async fn clock_and_leeway() {
    let clock = ManualClock::new(NOW_MS);
    let verifier = Verifier::new(keys()).clock(clock.clone());
    let layer = MatrixAuthLayer::with_verifier(verifier.clone());
    let token = access_token(&[&format!("time < {}", NOW_MS + 1000)]);
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    clock.advance_ms(1000);
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.json["soft_logout"],
        true
    );
    let lenient =
        MatrixAuthLayer::with_verifier(verifier.leeway(std::time::Duration::from_millis(500)));
    assert_eq!(
        call(&lenient, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    clock.advance_ms(500);
    assert_eq!(
        call(&lenient, bearer("/x", &token)).await.json["soft_logout"],
        true
    );
}

#[tokio::test]
async fn custom_caveats_see_the_request() {
    let layer = MatrixAuthLayer::with_verifier(verifier().caveat("method", |caveat, parts| {
        caveat.op() == "=" && caveat.value() == parts.method.as_str()
    }));
    let token = access_token(&["method = GET"]);
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    let post = http::Request::post("/x")
        .header("authorization", format!("Bearer {token}"))
        .body(Default::default())
        .unwrap();
    assert_eq!(call(&layer, post).await.errcode(), "M_UNKNOWN_TOKEN");
    // Without the checker the same token fails closed.
    assert_eq!(
        call(&self::layer(), bearer("/x", &token)).await.errcode(),
        "M_UNKNOWN_TOKEN"
    );
}

#[test]
#[should_panic(expected = "standard Matrix caveat")]
fn standard_caveats_cannot_be_redefined() {
    let _ = verifier().caveat("user_id", |_, _| true);
}

/// A store that answers after a delay (like a database would) and counts its calls.
struct SlowDenylist {
    revoked: TokenId,
    calls: AtomicUsize,
    fail: bool,
}

impl Revocation for SlowDenylist {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let revoked = user.token_id() == self.revoked;
        let fail = self.fail;
        RevocationCheck::pending(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if fail {
                return Err(BackendError::new("database unreachable"));
            }
            Ok(if revoked {
                RevocationStatus::Revoked
            } else {
                RevocationStatus::Active
            })
        })
    }
}

#[tokio::test]
async fn revocation_hook() {
    let token = access_token(&[]);
    let probe = call(&layer(), bearer("/x", &token)).await;
    let id_hex = probe.json["token_id"].as_str().unwrap().to_owned();
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let store = Arc::new(SlowDenylist {
        revoked: TokenId::from_bytes(id),
        calls: AtomicUsize::new(0),
        fail: false,
    });
    let layer = layer().revocation(store.clone());
    let out = call(&layer, bearer("/x", &token)).await;
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    assert!(out.json.get("soft_logout").is_none());
    // Attenuated, expired, it is still the revoked token: no soft logout invitation.
    let expired = attenuate(&token, &format!("time < {}", NOW_MS - 1)).unwrap();
    assert!(call(&layer, bearer("/x", &expired))
        .await
        .json
        .get("soft_logout")
        .is_none());
    let other = mint_raw(&[
        "gen = 1",
        "user_id = @bob:example.org",
        "type = access",
        "nonce = zzz",
    ]);
    assert_eq!(
        call(&layer, bearer("/x", &other)).await.user_id(),
        Some("@bob:example.org")
    );
    // Forged tokens never reach the store.
    let before = store.calls.load(Ordering::SeqCst);
    call(&layer, bearer("/x", "forged")).await;
    assert_eq!(store.calls.load(Ordering::SeqCst), before);

    let down = self::layer().revocation(SlowDenylist {
        revoked: TokenId::from_bytes([0; 16]),
        calls: AtomicUsize::new(0),
        fail: true,
    });
    let out = call(&down, bearer("/x", &other)).await;
    assert_eq!(
        (out.status, out.errcode()),
        (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN")
    );
    assert!(out.json["inner"].is_null(), "fail closed");
}

#[tokio::test]
async fn custom_rendering_and_error_bodies() {
    let layer = layer().render_rejection(|rejection| {
        let mut response = http::Response::new(bytes::Bytes::from(format!(
            "{{\"custom\":\"{}\"}}",
            rejection.errcode()
        )));
        *response.status_mut() = rejection.status();
        response
    });
    let out = call(&layer, plain("/x")).await;
    assert_eq!(out.status, StatusCode::UNAUTHORIZED);
    assert_eq!(out.json["custom"], "M_MISSING_TOKEN");
    // Default bodies: JSON, both fields, and never the token.
    let token = access_token(&["colour = red"]);
    let out = call(&self::layer(), bearer("/x", &token)).await;
    assert_eq!(out.headers["content-type"], "application/json");
    assert!(out.json["error"].is_string() && out.json["errcode"].is_string());
    assert!(!out.json.to_string().contains(&token));
}

#[tokio::test]
async fn debug_output_never_shows_secrets_or_tokens() {
    let token = access_token(&["device_id = PHONE"]);
    let layer = layer().guests(GuestPolicy::Allowed);
    let layer_debug = format!("{layer:?}");
    assert!(!layer_debug.contains(SECRET) && layer_debug.contains("key"));
    let ring = keys();
    let parts = http::Request::new(()).into_parts().0;
    let user = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts)
        .unwrap();
    let user_debug = format!("{user:?}");
    assert!(
        user_debug.contains(ALICE)
            && !user_debug.contains("abcdefgh12345678")
            && !user_debug.contains(&token)
    );
    assert!(!format!("{ring:?}").contains(SECRET));
    let rejection = layer
        .verifier()
        .verify(b"garbage", TokenType::Access, &parts)
        .unwrap_err();
    assert!(!format!("{rejection:?}{rejection}").contains("garbage"));
}
