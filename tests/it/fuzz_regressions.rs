//! What the fuzz targets in `fuzz/` found, kept as ordinary tests (the inputs also stay in
//! `fuzz/seeds/`, so every fuzz run replays them).

use http::Request;
use tower_matrix_auth::{
    hooks::ManualClock, macaroon::MacaroonFormat, KeyRing, MacaroonSecret, TokenType, Verifier,
};

const NOW_MS: u64 = 1_700_000_000_000;

fn keys() -> KeyRing {
    KeyRing::new().with_key(
        "key",
        MacaroonSecret::from_passphrase("fuzz regression secret"),
    )
}

/// `differential`, seed `regression-v2json-duplicate-keys`: V2JSON that gives keys twice, where
/// the `macaroon` crate stops at the first copy (with a base64 error) and we read the last copy,
/// as `serde_json` (and Python's `json`, which pymacaroons uses) do. The harness had recognised
/// that documented exception only when the crate reported "duplicate field".
#[test]
fn v2json_keys_given_twice_read_as_their_last_copy() {
    let verifier = Verifier::new(keys()).clock(ManualClock::new(NOW_MS));
    let parts = Request::new(()).into_parts().0;

    // The input itself: a macaroon under a key this ring does not hold, so refused, cleanly.
    let input = include_bytes!("../../fuzz/seeds/differential/regression-v2json-duplicate-keys");
    let refused = verifier
        .verify(input, TokenType::Access, &parts)
        .unwrap_err();
    assert!(refused.is_unknown_token() && !refused.soft_logout());

    // The rule it exposed: only the last copy of a key counts, so the signature that verifies is
    // the one read last.
    let token = keys()
        .mint("@alice:example.org", TokenType::Access)
        .unwrap()
        .nonce("n0nce")
        .serialize(MacaroonFormat::V2Json);
    let json: serde_json::Value = serde_json::from_str(&token).unwrap();
    let good = format!("\"s64\":{}", json["s64"]);
    let bad = "\"s64\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"";
    assert!(token.contains(&good));
    let last_good = token.replace(&good, &format!("{bad},{good}"));
    let last_bad = token.replace(&good, &format!("{good},{bad}"));
    let user = verifier
        .verify(last_good.as_bytes(), TokenType::Access, &parts)
        .expect("the last copy is the right signature");
    assert_eq!(user.user_id(), "@alice:example.org");
    assert!(verifier
        .verify(last_bad.as_bytes(), TokenType::Access, &parts)
        .unwrap_err()
        .is_unknown_token());
}

/// `layer`, seed `regression-appservice-user-id-not-a-user-id`: an application service asked to
/// act as `?user_id=@irc_a:example.ouser%5Fid==@irc_b:example.org`. Its namespace regex,
/// `@irc_.*:example.org`, matches the decoded value, which is no Matrix user id (the server name
/// would be `example.ouser_id==@irc_b:example.org`), and the layer handed it to the inner service
/// as the identity. A `?user_id=` must now also be a Matrix user id, or `403 M_FORBIDDEN`, as
/// for a user outside the namespaces (fail closed, as for a resolver's answers).
#[tokio::test]
async fn an_appservice_acts_only_as_matrix_user_ids() {
    use std::convert::Infallible;

    use http::{Response, StatusCode};
    use http_body_util::BodyExt;
    use tower::{service_fn, Layer, ServiceExt};
    use tower_matrix_auth::{
        hooks::{AppService, AppServices},
        MatrixAuthLayer, MatrixUser,
    };

    const AS_TOKEN: &str = "irc_as_token_for_the_regression";
    let appservices = AppServices::new()
        .with(
            AppService::new("irc", AS_TOKEN, "@irc_bot:example.org")
                .unwrap()
                .user_namespace("@irc_.*:example.org", true)
                .unwrap(),
        )
        .unwrap();
    let service = MatrixAuthLayer::new(keys())
        .appservices(appservices)
        .layer(service_fn(|request: Request<()>| async move {
            let user = request.extensions().get::<MatrixUser>().unwrap();
            Ok::<_, Infallible>(Response::new(user.user_id().to_owned()))
        }));
    let ask = |target: &[u8]| {
        let request = Request::builder()
            .uri(target)
            .header("Authorization", format!("Bearer {AS_TOKEN}"))
            .body(())
            .unwrap();
        let service = service.clone();
        async move {
            let response = service.oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };

    // The input itself: config byte, the request target, then the as_token in a header.
    let input =
        include_bytes!("../../fuzz/seeds/layer/regression-appservice-user-id-not-a-user-id");
    let mut lines = input[1..].split(|&b| b == b'\n');
    let target = lines.next().unwrap();
    assert_eq!(lines.next(), Some(&b"Authorization: Bearer $IRC"[..]));
    let forbidden = |(status, body): (StatusCode, String)| {
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, json["errcode"].as_str()),
            (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"))
        );
    };
    forbidden(ask(target).await);
    // More of what `.*` matches: control characters, spaces, bytes that are not UTF-8.
    for query in ["%00", "%0D", "a%20b", "%FF", "a:example.org:8448:x"] {
        let target = format!("/x?user_id=@irc_{query}:example.org");
        forbidden(ask(target.as_bytes()).await);
    }
    // A user id of the namespace, and the sender, still pass.
    for (query, user_id) in [
        ("?user_id=@irc_alice:example.org", "@irc_alice:example.org"),
        ("?user_id=%40irc_bob%3Aexample.org", "@irc_bob:example.org"),
        ("", "@irc_bot:example.org"),
    ] {
        let target = format!("/x{query}");
        assert_eq!(
            ask(target.as_bytes()).await,
            (StatusCode::OK, user_id.to_owned())
        );
    }
}

/// `lifecycle`, seed `regression-nonce-signs`: the target's nonce oracle (the docs' grammar,
/// `<session: 32 hex>.<generation>.<issued ms>.<a|r|l>.<start>.<epoch>.<expiry|->`) refuses a session spelled with a
/// leading `+`, which `TokenNonce::parse` took (`u128::from_str_radix` accepts a sign), so one
/// session had two spellings (and two `TokenId`s). Found reading the code the oracle flagged,
/// before a fuzz run reached it; the seed makes every run replay it.
#[test]
fn a_nonce_session_is_32_hex_digits_and_nothing_else() {
    use tower_matrix_auth::lifecycle::TokenNonce;

    let input = include_bytes!("../../fuzz/seeds/lifecycle/regression-nonce-signs");
    let signed: Vec<&str> = std::str::from_utf8(input)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("N+"))
        .collect();
    assert_eq!(signed.len(), 2);
    for rest in signed {
        let plus = format!("+{rest}");
        assert_eq!(TokenNonce::parse(&plus), None, "{plus}");
        // The same value spelled with 32 digits is a nonce.
        let digits = format!("0{rest}");
        let nonce = TokenNonce::parse(&digits).expect("32 hex digits");
        assert_eq!(nonce.to_string(), digits);
    }
}

/// `lifecycle`, seeds `regression-sweep-attenuated-logout` and
/// `regression-sweep-attenuated-login-token`: for a
/// token without the issuer's session nonce, the store kept a logout or a used login token until
/// the earliest `time <` of the token that made the record, a holder's appended one included,
/// although the record speaks for every token of the same `TokenId` (user and first nonce), or
/// of the same chain through the first `time <` (login tokens minted elsewhere). Once the
/// attenuated copy has expired, a sweep forgets the record and the original, which has not
/// expired, passed again. Fixed: the record of a token with a nonce minted elsewhere lasts until the
/// earliest `time <` before that nonce (for good without one), a login token's until its first `time <`.
mod sweep_after_an_attenuated_copy {
    use super::*;
    use tower_matrix_auth::{
        hooks::{Revocation, RevocationStatus},
        macaroon::attenuate,
        Issuer, MemoryStore, Sessions,
    };

    fn sessions() -> (ManualClock, Verifier, MemoryStore, Sessions) {
        let clock = ManualClock::new(NOW_MS);
        let verifier = Verifier::new(keys()).clock(clock.clone());
        let store = MemoryStore::new().with_clock(clock.clone());
        let issuer = Issuer::new(keys()).clock(clock.clone());
        let sessions = Sessions::new(issuer, verifier.clone(), store.clone());
        (clock, verifier, store, sessions)
    }

    #[tokio::test]
    async fn the_original_stays_logged_out() {
        let (clock, verifier, store, sessions) = sessions();
        let parts = Request::new(()).into_parts().0;
        // A token minted elsewhere (a nonce, no `time <`), logged out through a copy that
        // expires in 10 ms: the original is revoked with it (same TokenId)...
        let original = keys()
            .mint("@alice:example.org", TokenType::Access)
            .unwrap()
            .nonce("q0mP8wYb5J2sRxL1")
            .to_token();
        let copy = attenuate(&original, &format!("time < {}", NOW_MS + 10)).unwrap();
        let user = verifier
            .verify(copy.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        sessions.logout(&user).await.unwrap();
        let original = verifier
            .verify(original.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        assert_eq!(
            store.check(&original).await.unwrap(),
            RevocationStatus::Revoked
        );
        // ... and stays revoked after a sweep once the copy has expired.
        clock.advance_ms(10);
        store.sweep();
        assert_eq!(
            store.check(&original).await.unwrap(),
            RevocationStatus::Revoked,
            "the logout was forgotten"
        );
    }

    #[tokio::test]
    async fn a_login_token_stays_used() {
        let (clock, _, store, sessions) = sessions();
        let parts = Request::new(()).into_parts().0;
        // A login token minted elsewhere, used through a copy that expires in 10 ms.
        let login = keys()
            .mint("@alice:example.org", TokenType::Login)
            .unwrap()
            .expires_at_ms(NOW_MS + 60_000)
            .to_token();
        let copy = attenuate(&login, &format!("time < {}", NOW_MS + 10)).unwrap();
        let redeem = |token: &str| {
            let sessions = sessions.clone();
            let (token, parts) = (token.to_owned(), parts.clone());
            async move {
                sessions
                    .redeem_login_token(token.as_bytes(), &parts)
                    .await
                    .is_ok()
            }
        };
        assert!(redeem(&copy).await);
        assert!(!redeem(&login).await);
        clock.advance_ms(10);
        store.sweep();
        assert!(!redeem(&login).await, "a login token was redeemed twice");
    }
}
