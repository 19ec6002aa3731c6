//! What the layer logs: the user id after success and the reason of a rejection, never a token.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use tower_matrix_auth::{hooks::ManualClock, MatrixAuthLayer, Verifier};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A formatting subscriber writing into the returned buffer, the default until the guard drops;
/// span closings are logged, with their fields.
fn capture(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(flavor = "current_thread")]
async fn logs_name_the_user_and_the_reason_but_never_the_token() {
    let (captured, _guard) = capture(tracing::Level::TRACE);

    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
    let token = access_token(&[]);
    let forged = mint_with(
        "wrong secret",
        "key",
        &["user_id = @alice:example.org", "type = access"],
        macaroon::Format::V1,
    );
    let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);

    let out = call(&layer, plain(&format!("/x?access_token={token}"))).await;
    assert_eq!(out.status, StatusCode::OK);
    tracing::info!(uri = %out.json["uri"], "inner service saw");
    assert_eq!(
        call(&layer, bearer("/x", &forged)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&layer, bearer("/x", &expired)).await.status,
        StatusCode::UNAUTHORIZED
    );

    let logs = captured.text();
    assert!(
        logs.contains("matrix_auth") && logs.contains(ALICE),
        "{logs}"
    );
    assert!(logs.contains("signature does not verify"), "{logs}");
    assert!(logs.contains("time <"), "{logs}");
    for secret in [token.as_str(), forged.as_str(), expired.as_str(), SECRET] {
        assert!(
            !logs.contains(secret),
            "a token or key reached the log:\n{logs}"
        );
    }
    // Not even a recognisable piece of one (the nonce is part of every token here).
    assert!(!logs.contains("abcdefgh12345678"), "{logs}");
}

/// The layer fills in a `user_id` field that the request span (a `TraceLayer`'s, say) declared
/// empty, as `Display` (no quotes); it leaves it empty on a rejection, and leaves spans without
/// such a field alone.
#[tokio::test(flavor = "current_thread")]
async fn the_request_span_gets_the_user_id_once_verified() {
    use tracing::Instrument;

    let (captured, _guard) = capture(tracing::Level::INFO);

    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
    let token = access_token(&[]);
    let forged = mint_with(
        "wrong secret",
        "key",
        &["user_id = @alice:example.org", "type = access"],
        macaroon::Format::V1,
    );

    let accepted = tracing::info_span!("accepted", user_id = tracing::field::Empty);
    let out = call(&layer, bearer("/x", &token))
        .instrument(accepted)
        .await;
    assert_eq!(out.status, StatusCode::OK);
    let rejected = tracing::info_span!("rejected", user_id = tracing::field::Empty);
    let out = call(&layer, bearer("/x", &forged))
        .instrument(rejected)
        .await;
    assert_eq!(out.status, StatusCode::UNAUTHORIZED);
    let fieldless = tracing::info_span!("fieldless", path = "/x");
    let out = call(&layer, bearer("/x", &token))
        .instrument(fieldless)
        .await;
    assert_eq!(out.status, StatusCode::OK);

    let logs = captured.text();
    let closing = |name: &str| {
        logs.lines()
            .find(|line| line.contains(&format!(" {name}")) && line.contains("close"))
            .unwrap_or_else(|| panic!("no close line for {name}:\n{logs}"))
            .to_owned()
    };
    assert!(
        closing("accepted").contains(&format!("accepted{{user_id={ALICE}}}")),
        "{logs}"
    );
    assert!(closing("rejected").contains("rejected: "), "{logs}");
    assert!(!closing("rejected").contains("user_id"), "{logs}");
    assert!(
        closing("fieldless").contains("fieldless{path=\"/x\"}"),
        "{logs}"
    );
    assert!(!closing("fieldless").contains("user_id"), "{logs}");
}

/// `MatrixUser::record_in_current_span`, for requests authenticated outside the layer, writes
/// the field exactly as the layer does, and does nothing where there is no span or no field.
#[test]
fn an_identity_records_itself_in_the_current_span() {
    use tower_matrix_auth::{TokenType, Verifier};

    let (captured, _guard) = capture(tracing::Level::INFO);

    let parts = http::Request::new(()).into_parts().0;
    let user = Verifier::new(keys())
        .clock(ManualClock::new(NOW_MS))
        .verify(access_token(&[]).as_bytes(), TokenType::Access, &parts)
        .expect("a valid token");
    user.record_in_current_span(); // no span: nothing to fill in, and no panic
    tracing::info_span!("declared", user_id = tracing::field::Empty)
        .in_scope(|| user.record_in_current_span());
    tracing::info_span!("undeclared", path = "/x").in_scope(|| user.record_in_current_span());

    let logs = captured.text();
    assert!(
        logs.contains(&format!(" declared{{user_id={ALICE}}}: ")),
        "{logs}"
    );
    assert!(logs.contains(" undeclared{path=\"/x\"}: "), "{logs}");
    assert_eq!(logs.matches("user_id").count(), 1, "{logs}");
}

/// OAuth 2.0 introspection (feature `oauth2`): whatever the token server answers, or fails to,
/// the logs name the reason and never the token (nor the client's shared secret).
#[cfg(feature = "oauth2")]
#[tokio::test(flavor = "current_thread")]
async fn introspection_logs_never_the_token() {
    use common::introspection::{mas_active, IntrospectionServer, Mode};
    use tower_matrix_auth::hooks::oauth2::{ClientAuth, Introspection};

    let (captured, _guard) = capture(tracing::Level::TRACE);
    let server = IntrospectionServer::start().await;
    let clock = ManualClock::new(NOW_MS);
    let introspection = Introspection::new(server.uri(), "example.org")
        .client_auth(ClientAuth::shared_secret("SHAREDsecretVALUE"))
        .timeout(std::time::Duration::from_millis(300))
        .clock(clock.clone());
    let layer = MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(clock))
        .resolver(introspection.clone());
    let now_s = NOW_MS / 1000;
    let active = "mat_ACTIVEtokenSECRETpart0123456_abcdef";
    let inactive = "mat_INACTIVEtokenSECRETpart01234_abcdef";
    server.answer_for(
        active,
        mas_active("alice", Some("PHONE"), now_s + 300, now_s),
    );
    server.answer_for(
        "mat_NOSCOPEtokenSECRETpart012345_abcdef",
        serde_json::json!({"active": true, "username": "alice", "scope": "openid"}),
    );
    let whoami = "/_matrix/client/v3/account/whoami";
    let out = call(&layer, bearer(whoami, active)).await;
    assert_eq!(out.status, StatusCode::OK);
    let out = call(&layer, bearer(whoami, active)).await; // a cache hit
    assert_eq!(out.status, StatusCode::OK);
    let out = call(&layer, plain(&format!("{whoami}?access_token={inactive}"))).await;
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    let out = call(
        &layer,
        bearer(whoami, "mat_NOSCOPEtokenSECRETpart012345_abcdef"),
    )
    .await;
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    for mode in [Mode::Status500, Mode::NotJson, Mode::Stall] {
        server.set_mode(mode);
        let out = call(
            &layer,
            bearer(whoami, "mat_FAILINGtokenSECRETpart01234_abcdef"),
        )
        .await;
        assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    tracing::debug!(?introspection, "state at the end");

    let logs = captured.text();
    assert!(logs.contains("matrix request rejected"), "{logs}");
    assert!(logs.contains("introspection refused the token"), "{logs}");
    assert!(logs.contains("token resolver failed"), "{logs}");
    assert!(logs.contains("did not answer in time"), "{logs}");
    assert!(!logs.contains("SECRETpart"), "a token was logged:\n{logs}");
    assert!(
        !logs.contains("SHAREDsecret"),
        "the shared secret was logged:\n{logs}"
    );
}
