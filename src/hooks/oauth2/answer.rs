//! What an introspection answer means: RFC 7662 §2.2, mapped to an identity as Synapse maps
//! the Matrix Authentication Service's answers (`synapse/api/auth/mas.py`).
//!
//! Three outcomes, kept apart because they lead to different responses:
//!
//! - [`Answer::Active`]: a token the layer may admit (the layer still checks its expiry);
//! - [`Answer::Refused`]: the token server said no, or said yes to a token this homeserver must
//!   not accept (no Matrix API scope, two devices, no user): `401 M_UNKNOWN_TOKEN`;
//! - [`Answer::Broken`]: not an introspection answer at all (not JSON, no boolean `active`, a
//!   known field of the wrong type): the token server misbehaves, so the request fails closed
//!   with `503` and nobody is logged out.

use std::sync::Arc;

use serde_json::Value;

use crate::hooks::resolver::ResolvedToken;
use crate::identity::Scopes;

/// The Matrix client API scope (spec v1.15), which every token must carry.
pub(crate) const API_SCOPE: &str = "urn:matrix:client:api:*";
/// The same, as MSC2967 spelled it before the spec; MAS lists both.
pub(crate) const UNSTABLE_API_SCOPE: &str = "urn:matrix:org.matrix.msc2967.client:api:*";
/// The prefix of a device scope: `urn:matrix:client:device:<device id>`.
pub(crate) const DEVICE_SCOPE_PREFIX: &str = "urn:matrix:client:device:";
/// The same, in MSC2967's spelling.
pub(crate) const UNSTABLE_DEVICE_SCOPE_PREFIX: &str =
    "urn:matrix:org.matrix.msc2967.client:device:";

/// Maps the `sub` claim to a Matrix user id, when `username` is not what names the user.
pub(crate) type SubMapper = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How an answer is read: the server name that `username` is joined with, or a mapping of `sub`.
#[derive(Clone)]
pub(crate) struct Mapping {
    pub(crate) server_name: Arc<str>,
    pub(crate) from_sub: Option<SubMapper>,
}

/// Why an active answer was refused (for logs: never the token, never the user's claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Inactive,
    NoApiScope,
    TwoDevices,
    NoUser,
    NotAnAccessToken,
}

impl Refusal {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Refusal::Inactive => "the token server answered active: false",
            Refusal::NoApiScope => "the token lacks the urn:matrix:client:api:* scope",
            Refusal::TwoDevices => "the token names two different devices",
            Refusal::NoUser => "the answer names no usable user (username, or sub mapping)",
            Refusal::NotAnAccessToken => "the answer's token_type is not an access token",
        }
    }
}

/// What one introspection answer means.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// An active token of this identity, expiring at `expires_at_ms` (from `exp`) if it does.
    Active(ResolvedToken),
    Refused(Refusal),
    /// Not an answer this resolver can trust either way (the text says why, for the log).
    Broken(&'static str),
}

/// Reads an answer body.
pub(crate) fn read(body: &[u8], mapping: &Mapping) -> Answer {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return Answer::Broken("the answer is not a JSON object");
    };
    match answer.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Answer::Refused(Refusal::Inactive),
        _ => return Answer::Broken("the answer has no boolean `active`"),
    }
    let text = |name: &str| -> Result<Option<&str>, &'static str> {
        match answer.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err("a field of an active answer is not a string"),
        }
    };
    let (scope, username, sub, device_field, token_type) = match (
        text("scope"),
        text("username"),
        text("sub"),
        text("device_id"),
        text("token_type"),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        _ => return Answer::Broken("a field of an active answer is not a string"),
    };
    let expires_at_ms = match answer.get("exp") {
        None | Some(Value::Null) => None,
        // Seconds since the epoch (RFC 7662 §2.2, a NumericDate); fractions are allowed by
        // RFC 7519 and rounded down.
        Some(Value::Number(n)) => match n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(seconds) => Some(seconds.saturating_mul(1000)),
            None => return Answer::Broken("`exp` is not a date"),
        },
        Some(_) => return Answer::Broken("`exp` is not a number"),
    };
    // A refresh token presented as an access token (MAS refuses the mismatch itself; another
    // server may not).
    if token_type.is_some_and(|t| t.eq_ignore_ascii_case("refresh_token")) {
        return Answer::Refused(Refusal::NotAnAccessToken);
    }
    let scopes = Scopes::parse(scope.unwrap_or(""));
    if !scopes.contains(API_SCOPE) && !scopes.contains(UNSTABLE_API_SCOPE) {
        return Answer::Refused(Refusal::NoApiScope);
    }
    // The device: the `device_id` field (MAS with `X-MAS-Supports-Device-Id: 1`) and every
    // device scope, in either spelling, must agree.
    let mut device: Option<String> = device_field.filter(|d| !d.is_empty()).map(str::to_owned);
    for scope in scopes.iter() {
        let named = scope
            .strip_prefix(DEVICE_SCOPE_PREFIX)
            .or_else(|| scope.strip_prefix(UNSTABLE_DEVICE_SCOPE_PREFIX));
        if let Some(named) = named.filter(|d| !d.is_empty()) {
            match &device {
                Some(known) if known != named => return Answer::Refused(Refusal::TwoDevices),
                Some(_) => {}
                None => device = Some(named.to_owned()),
            }
        }
    }
    let user_id = match &mapping.from_sub {
        Some(map) => sub.and_then(|sub| map(sub)),
        // A localpart, nothing more: no `:` that would move the user to another server.
        None => username
            .filter(|u| !u.is_empty() && !u.contains(':'))
            .map(|localpart| format!("@{localpart}:{}", mapping.server_name)),
    };
    let Some(user_id) = user_id.filter(|u| crate::macaroon::caveat::is_valid_user_id(u)) else {
        return Answer::Refused(Refusal::NoUser);
    };
    let mut resolved = ResolvedToken::user(user_id).oauth2().scopes(scopes);
    if let Some(device) = device {
        resolved = resolved.device_id(device);
    }
    if let Some(at) = expires_at_ms {
        resolved = resolved.expires_at_ms(at);
    }
    Answer::Active(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping() -> Mapping {
        Mapping {
            server_name: "example.org".into(),
            from_sub: None,
        }
    }

    fn active(body: Value) -> ResolvedToken {
        match read(body.to_string().as_bytes(), &mapping()) {
            Answer::Active(resolved) => resolved,
            other => panic!("expected an active answer, got {other:?}"),
        }
    }

    fn refused(body: Value) -> Refusal {
        match read(body.to_string().as_bytes(), &mapping()) {
            Answer::Refused(why) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// MAS's answer for an OAuth 2.0 access token (`IntrospectionResponse` for
    /// `TokenType::AccessToken`): the scope normalised to both spellings, `username`, `sub`,
    /// `exp`/`expires_in`/`iat`/`nbf` in seconds, `jti`, no `device_id` (it is in the scope).
    #[test]
    fn mas_oauth2_access_token() {
        let resolved = active(json!({
            "active": true,
            "scope": "urn:matrix:client:api:* urn:matrix:client:device:ABCDEFGHIJ \
                      urn:matrix:org.matrix.msc2967.client:api:* \
                      urn:matrix:org.matrix.msc2967.client:device:ABCDEFGHIJ openid",
            "client_id": "01J4B7YH3Z9C8G7T0Q1V2W3X4Y",
            "username": "alice",
            "token_type": "access_token",
            "exp": 1_700_000_300,
            "expires_in": 300,
            "iat": 1_700_000_000,
            "nbf": 1_700_000_000,
            "sub": "01J4B7YH3Z9C8G7T0Q1V2W3X4Z",
            "jti": "01J4B7YH3Z9C8G7T0Q1V2W3X50",
        }));
        assert_eq!(resolved.user_id, "@alice:example.org");
        assert_eq!(resolved.device_id.as_deref(), Some("ABCDEFGHIJ"));
        assert_eq!(resolved.expires_at_ms, Some(1_700_000_300_000));
        assert!(resolved.oauth2 && !resolved.soft_logout_on_expiry && !resolved.is_guest);
        let scopes = resolved.scopes.expect("a scope set");
        assert!(scopes.contains("openid") && scopes.contains(API_SCOPE));
        assert_eq!(scopes.len(), 5);
    }

    #[test]
    fn equality_ignores_what_a_cache_prepared() {
        let plain = ResolvedToken::user("@alice:example.org").oauth2();
        let prepared = plain.clone().prepared_for("mat_token");
        assert!(prepared.identity.is_some());
        assert_eq!(plain, prepared);
        assert_ne!(plain, plain.clone().device_id("D"));
    }

    /// MAS's answer for a compatibility (legacy `/login`) token with the device-id header: the
    /// device both as a field and as scopes, no `exp` when the session does not expire.
    #[test]
    fn mas_compat_token_with_device_field() {
        let resolved = active(json!({
            "active": true,
            "scope": "urn:matrix:client:api:* urn:matrix:org.matrix.msc2967.client:api:* \
                      urn:matrix:client:device:PHONE urn:matrix:org.matrix.msc2967.client:device:PHONE",
            "client_id": "01J4B7YH3Z9C8G7T0Q1V2W3X4Y",
            "username": "bob",
            "token_type": "access_token",
            "iat": 1_700_000_000,
            "nbf": 1_700_000_000,
            "sub": "01J4B7YH3Z9C8G7T0Q1V2W3X4Z",
            "jti": "01J4B7YH3Z9C8G7T0Q1V2W3X50",
            "device_id": "PHONE",
        }));
        assert_eq!(resolved.user_id, "@bob:example.org");
        assert_eq!(resolved.device_id.as_deref(), Some("PHONE"));
        assert_eq!(resolved.expires_at_ms, None);
    }

    /// A compat session whose device id cannot be a scope token (a space in it): MAS sends only
    /// the field.
    #[test]
    fn device_only_in_the_field() {
        let resolved = active(json!({
            "active": true, "scope": "urn:matrix:client:api:*", "username": "bob",
            "device_id": "MY PHONE",
        }));
        assert_eq!(resolved.device_id.as_deref(), Some("MY PHONE"));
    }

    /// MAS's inactive answer, the same for every invalid case: `{"active": false}` only.
    #[test]
    fn mas_inactive() {
        assert_eq!(refused(json!({"active": false})), Refusal::Inactive);
        // Whatever else an inactive answer carries, it stays inactive.
        assert_eq!(
            refused(json!({"active": false, "username": "alice", "scope": API_SCOPE})),
            Refusal::Inactive
        );
    }

    #[test]
    fn scope_rules() {
        // Only the unstable API scope: accepted, as Synapse does.
        let resolved = active(json!({
            "active": true, "username": "alice",
            "scope": "urn:matrix:org.matrix.msc2967.client:api:* urn:matrix:org.matrix.msc2967.client:device:OLD",
        }));
        assert_eq!(resolved.device_id.as_deref(), Some("OLD"));
        // No API scope, or none at all.
        assert_eq!(
            refused(
                json!({"active": true, "username": "alice", "scope": "openid urn:matrix:client:device:X"})
            ),
            Refusal::NoApiScope
        );
        assert_eq!(
            refused(json!({"active": true, "username": "alice"})),
            Refusal::NoApiScope
        );
        // A prefix is not the scope; scopes are compared whole.
        assert_eq!(
            refused(
                json!({"active": true, "username": "alice", "scope": "urn:matrix:client:api:*x"})
            ),
            Refusal::NoApiScope
        );
        // Two devices, in one spelling or across both, or against the field.
        for scope in [
            "urn:matrix:client:api:* urn:matrix:client:device:A urn:matrix:client:device:B",
            "urn:matrix:client:api:* urn:matrix:client:device:A urn:matrix:org.matrix.msc2967.client:device:B",
        ] {
            assert_eq!(
                refused(json!({"active": true, "username": "alice", "scope": scope})),
                Refusal::TwoDevices
            );
        }
        assert_eq!(
            refused(
                json!({"active": true, "username": "alice", "device_id": "A",
                "scope": "urn:matrix:client:api:* urn:matrix:client:device:B"})
            ),
            Refusal::TwoDevices
        );
        // No device at all: an identity without one.
        let resolved = active(json!({"active": true, "username": "alice", "scope": API_SCOPE}));
        assert_eq!(resolved.device_id, None);
        // A refresh token is not an access token.
        assert_eq!(
            refused(
                json!({"active": true, "username": "alice", "scope": API_SCOPE, "token_type": "refresh_token"})
            ),
            Refusal::NotAnAccessToken
        );
    }

    #[test]
    fn users() {
        assert_eq!(
            refused(json!({"active": true, "scope": API_SCOPE})),
            Refusal::NoUser
        );
        assert_eq!(
            refused(json!({"active": true, "scope": API_SCOPE, "username": ""})),
            Refusal::NoUser
        );
        // A localpart that makes no user id, or would name another server.
        for username in ["a b", "alice:evil.example", "@alice:example.org"] {
            assert_eq!(
                refused(json!({"active": true, "scope": API_SCOPE, "username": username})),
                Refusal::NoUser,
                "{username}"
            );
        }
        let by_sub = Mapping {
            server_name: "example.org".into(),
            from_sub: Some(Arc::new(|sub: &str| {
                (sub == "248289761001").then(|| "@carol:example.org".to_owned())
            })),
        };
        let body = json!({"active": true, "scope": API_SCOPE, "sub": "248289761001", "username": "ignored"});
        match read(body.to_string().as_bytes(), &by_sub) {
            Answer::Active(resolved) => assert_eq!(resolved.user_id, "@carol:example.org"),
            other => panic!("{other:?}"),
        }
        let body = json!({"active": true, "scope": API_SCOPE, "sub": "unknown"});
        assert!(matches!(
            read(body.to_string().as_bytes(), &by_sub),
            Answer::Refused(Refusal::NoUser)
        ));
    }

    #[test]
    fn broken_answers_fail_closed() {
        for body in [
            &b""[..],
            b"not json",
            b"[]",
            b"{}",
            b"{\"active\": \"true\"}",
            b"{\"active\": 1}",
            b"{\"active\": null}",
            b"{\"active\": true, \"scope\": 5, \"username\": \"alice\"}",
            b"{\"active\": true, \"scope\": \"urn:matrix:client:api:*\", \"username\": \"alice\", \"exp\": \"soon\"}",
            b"{\"active\": true, \"scope\": \"urn:matrix:client:api:*\", \"username\": \"alice\", \"exp\": -1}",
        ] {
            assert!(
                matches!(read(body, &mapping()), Answer::Broken(_)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Huge `exp` saturates instead of overflowing.
        let resolved =
            active(json!({"active": true, "scope": API_SCOPE, "username": "a", "exp": u64::MAX}));
        assert_eq!(resolved.expires_at_ms, Some(u64::MAX));
    }
}
