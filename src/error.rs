//! Why a request was refused, and the Matrix JSON error that says so.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::macaroon::caveat::CaveatFailure;
use crate::macaroon::wire::FormatError;

/// Why a request was refused: a small opaque type to query with `is_*()` and render.
///
/// `Display` gives the text sent to the client; `Debug` adds the internal reason (e.g. which
/// caveat rule failed). Neither ever contains the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Rejection {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Missing(Missing),
    Unknown(Unknown),
    GuestForbidden,
    Unavailable,
    /// The account is locked: `401 M_USER_LOCKED`, soft logout.
    Locked,
    /// The account is suspended and this action is not for suspended accounts.
    Suspended,
    /// An application service asked to act as a user outside its namespaces.
    #[cfg_attr(not(feature = "appservice"), allow(dead_code))]
    AppserviceForbidden,
    /// An application service named a device the homeserver does not know.
    #[cfg_attr(not(feature = "appservice"), allow(dead_code))]
    UnknownDevice,
    /// Too many failed token checks from this address: retry after this many milliseconds.
    #[cfg_attr(not(feature = "limiter"), allow(dead_code))]
    RateLimited(u64),
    /// The token's scope set lacks a scope the route requires.
    InsufficientScope,
}

/// Token extraction failures: all `401 M_MISSING_TOKEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    NoToken,
    Mixed,
    TooManyHeaders,
    TooManyQueryTokens,
    NotBearer,
    /// The query token could not be taken out of the URI: the request is refused rather than
    /// passed on with the token in it (or to another path).
    Unstrippable,
}

/// Verification failures: all `401 M_UNKNOWN_TOKEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    TooLong,
    Format(FormatError),
    NoSuchKey,
    BadSignature,
    Caveat(CaveatFailure),
    Expired,
    /// Expired, but the token's issuer asks for no soft logout (an OAuth 2.0 server's token).
    ExpiredNoSoftLogout,
    Revoked,
    /// The account behind the token was deactivated.
    Deactivated,
    /// An opaque token the resolver does not know.
    NotResolved,
    /// An `as_token` from outside its application service's IP ranges.
    #[cfg_attr(not(feature = "appservice"), allow(dead_code))]
    AppserviceAddress,
}

impl Rejection {
    pub(crate) fn missing(why: Missing) -> Self {
        Self {
            kind: Kind::Missing(why),
        }
    }

    pub(crate) fn unknown(why: Unknown) -> Self {
        Self {
            kind: Kind::Unknown(why),
        }
    }

    #[cfg_attr(not(feature = "limiter"), allow(dead_code))]
    pub(crate) fn rate_limited(retry_after: std::time::Duration) -> Self {
        let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        Self {
            kind: Kind::RateLimited(ms.max(1)),
        }
    }

    pub(crate) fn guest_forbidden() -> Self {
        Self {
            kind: Kind::GuestForbidden,
        }
    }

    pub(crate) fn unavailable() -> Self {
        Self {
            kind: Kind::Unavailable,
        }
    }

    pub(crate) fn of(kind: Kind) -> Self {
        Self { kind }
    }

    /// The HTTP status:
    ///
    /// - 401 for `M_MISSING_TOKEN`, `M_UNKNOWN_TOKEN` (a token that does not verify, is revoked or
    ///   expired, of a deactivated account, or an opaque token nobody knows) and `M_USER_LOCKED`;
    /// - 403 for `M_GUEST_ACCESS_FORBIDDEN` (a guest where guests may not go), `M_USER_SUSPENDED`
    ///   (a write a suspended account may not make) and `M_FORBIDDEN` (an application service
    ///   acting as a user it may not act as, or a token without a scope the route requires);
    /// - 400 for `M_UNKNOWN_DEVICE` (an application service's `?device_id=` the user does not
    ///   have);
    /// - 429 for `M_LIMIT_EXCEEDED`, when too many failed token checks came from the client's
    ///   address (with `Retry-After` and `retry_after_ms`; feature `limiter`);
    /// - 503 for `M_UNKNOWN`, when the revocation store or the token resolver could not answer
    ///   (the response also carries `Retry-After: 1`).
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Missing(_) | Kind::Unknown(_) | Kind::Locked => StatusCode::UNAUTHORIZED,
            Kind::GuestForbidden
            | Kind::Suspended
            | Kind::AppserviceForbidden
            | Kind::InsufficientScope => StatusCode::FORBIDDEN,
            Kind::UnknownDevice => StatusCode::BAD_REQUEST,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The Matrix `errcode`.
    pub fn errcode(&self) -> &'static str {
        match self.kind {
            Kind::Missing(_) => "M_MISSING_TOKEN",
            Kind::Unknown(_) => "M_UNKNOWN_TOKEN",
            Kind::GuestForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            Kind::Unavailable => "M_UNKNOWN",
            Kind::Locked => "M_USER_LOCKED",
            Kind::Suspended => "M_USER_SUSPENDED",
            Kind::AppserviceForbidden | Kind::InsufficientScope => "M_FORBIDDEN",
            Kind::UnknownDevice => "M_UNKNOWN_DEVICE",
            Kind::RateLimited(_) => "M_LIMIT_EXCEEDED",
        }
    }

    /// The human-readable `error` text sent to the client.
    pub fn message(&self) -> &'static str {
        match self.kind {
            Kind::Missing(Missing::NoToken) => "Missing access token.",
            Kind::Missing(Missing::Mixed) => {
                "Mixing Authorization headers and access_token query parameters."
            }
            Kind::Missing(Missing::TooManyHeaders) => "Too many Authorization headers.",
            Kind::Missing(Missing::TooManyQueryTokens) => "Too many access_token query parameters.",
            Kind::Missing(Missing::NotBearer) => {
                "Invalid Authorization header: expected `Authorization: Bearer <access token>`."
            }
            Kind::Missing(Missing::Unstrippable) => {
                "The access_token query parameter could not be removed from the request."
            }
            Kind::Unknown(Unknown::Expired | Unknown::ExpiredNoSoftLogout) => {
                "Access token has expired."
            }
            Kind::Unknown(_) => "Unrecognised access token.",
            Kind::GuestForbidden => "Guest access is not allowed here.",
            Kind::Unavailable => "Cannot check the access token right now; try again later.",
            Kind::Locked => "This account has been locked.",
            Kind::Suspended => "This account is suspended and cannot do this.",
            Kind::AppserviceForbidden => "The application service cannot act as this user.",
            Kind::UnknownDevice => "Unknown device for this user.",
            Kind::RateLimited(_) => "Too many failed attempts to authenticate; try again later.",
            Kind::InsufficientScope => "The access token was not granted the scope this needs.",
        }
    }

    /// Whether the response carries `"soft_logout": true`, telling the client to refresh or log
    /// in again without wiping its data: the token is valid but its `time <` caveat no longer
    /// holds (or an opaque token's resolved expiry has passed), or the account is locked
    /// (`M_USER_LOCKED`, which the spec pairs with a soft logout).
    pub fn soft_logout(&self) -> bool {
        self.kind == Kind::Unknown(Unknown::Expired) || self.is_locked()
    }

    /// The account is locked (`401 M_USER_LOCKED`).
    pub fn is_locked(&self) -> bool {
        self.kind == Kind::Locked
    }

    /// The account is suspended and the request is one suspended accounts may not make.
    pub fn is_suspended(&self) -> bool {
        self.kind == Kind::Suspended
    }

    /// An application service request refused for its `user_id` or `device_id` parameter.
    pub fn is_appservice_refusal(&self) -> bool {
        matches!(self.kind, Kind::AppserviceForbidden | Kind::UnknownDevice)
    }

    /// No usable token in the request (`M_MISSING_TOKEN`).
    pub fn is_missing_token(&self) -> bool {
        matches!(self.kind, Kind::Missing(_))
    }

    /// A token was present but is not valid here (`M_UNKNOWN_TOKEN`).
    pub fn is_unknown_token(&self) -> bool {
        matches!(self.kind, Kind::Unknown(_))
    }

    /// The token is genuine but has expired (with a soft logout or, for a token whose issuer
    /// asks for none such as an OAuth 2.0 server's, without).
    pub fn is_expired(&self) -> bool {
        matches!(
            self.kind,
            Kind::Unknown(Unknown::Expired | Unknown::ExpiredNoSoftLogout)
        )
    }

    /// The token's scope set lacks a scope the route requires (`403 M_FORBIDDEN`, see
    /// [`crate::MatrixAuthLayer::require_scope_when`]).
    pub fn is_insufficient_scope(&self) -> bool {
        self.kind == Kind::InsufficientScope
    }

    /// The token is genuine but the revocation check says it was revoked.
    pub fn is_revoked(&self) -> bool {
        self.kind == Kind::Unknown(Unknown::Revoked)
    }

    /// A guest token on a route that does not allow guests.
    pub fn is_guest_forbidden(&self) -> bool {
        self.kind == Kind::GuestForbidden
    }

    /// Refused before any check: too many failed token checks came from this address
    /// (`429 M_LIMIT_EXCEEDED`, see [`crate::MatrixAuthLayer::failure_limit`]).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self.kind, Kind::RateLimited(_))
    }

    /// For a rate-limited request, when to try again, in milliseconds.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self.kind {
            Kind::RateLimited(ms) => Some(ms),
            _ => None,
        }
    }

    /// The revocation state could not be read, so the request was refused (fail closed).
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Unavailable
    }

    /// The token is not a macaroon at all (too long, or not in any macaroon format), as
    /// opposed to a macaroon that failed a check. Too many caveats is still a macaroon.
    ///
    /// A token over the length limit is not one of them: the limit bounds every token, whatever
    /// will look at it (the verifier, a resolver, a token server), so it never reaches a resolver.
    pub(crate) fn is_not_a_macaroon(&self) -> bool {
        matches!(self.kind, Kind::Unknown(Unknown::Format(e)) if e != FormatError::TooManyCaveats)
    }

    /// Whether the token failed in a way anyone can produce at will (forged, garbled, unknown to
    /// the key ring or the resolver, a caveat that does not hold): what the failed-authentication
    /// limiter counts. Not an expired, revoked or deactivated token: those were minted by us,
    /// clients send them in the ordinary course (several requests in flight when a token
    /// expires), and counting them would limit busy addresses, not attackers.
    #[cfg_attr(not(feature = "limiter"), allow(dead_code))]
    pub(crate) fn is_guessable_failure(&self) -> bool {
        matches!(
            self.kind,
            Kind::Unknown(
                Unknown::TooLong
                    | Unknown::Format(_)
                    | Unknown::NoSuchKey
                    | Unknown::BadSignature
                    | Unknown::Caveat(_)
                    | Unknown::NotResolved
            )
        )
    }

    /// The `outcome` label of the `matrix_auth_decisions_total` metric: a fixed, small set.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn outcome(&self) -> &'static str {
        match self.kind {
            Kind::Missing(_) => "missing_token",
            Kind::Unknown(Unknown::Expired) => "expired",
            Kind::Unknown(Unknown::Deactivated) => "deactivated",
            Kind::Unknown(_) => "unknown_token",
            Kind::GuestForbidden => "guest_forbidden",
            Kind::Unavailable => "unavailable",
            Kind::Locked => "locked",
            Kind::Suspended => "suspended",
            Kind::AppserviceForbidden | Kind::UnknownDevice => "appservice_forbidden",
            Kind::RateLimited(_) => "rate_limited",
            Kind::InsufficientScope => "insufficient_scope",
        }
    }

    /// What went wrong internally, for logs: never the token, never shown to the client.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            Kind::Missing(Missing::NoToken) => "no access token in the request",
            Kind::Missing(Missing::Mixed) => "both an Authorization header and a query token",
            Kind::Missing(Missing::TooManyHeaders) => "more than one Authorization header",
            Kind::Missing(Missing::TooManyQueryTokens) => "more than one access_token parameter",
            Kind::Missing(Missing::NotBearer) => "Authorization header is not `Bearer <token>`",
            Kind::Missing(Missing::Unstrippable) => "the query token could not be stripped",
            Kind::Unknown(Unknown::TooLong) => "token longer than the configured limit",
            Kind::Unknown(Unknown::Format(FormatError::TooManyCaveats)) => {
                "more caveats than the configured limit"
            }
            Kind::Unknown(Unknown::Format(_)) => "not a macaroon in any supported format",
            Kind::Unknown(Unknown::NoSuchKey) => "macaroon identifier names no key in the ring",
            Kind::Unknown(Unknown::BadSignature) => "signature does not verify",
            Kind::Unknown(Unknown::Caveat(failure)) => failure.describe(),
            Kind::Unknown(Unknown::Expired) => "a `time <` caveat no longer holds",
            Kind::Unknown(Unknown::ExpiredNoSoftLogout) => {
                "the resolved token expired (its issuer asks for no soft logout)"
            }
            Kind::Unknown(Unknown::Revoked) => "token was revoked",
            Kind::Unknown(Unknown::Deactivated) => "the account was deactivated",
            Kind::Unknown(Unknown::NotResolved) => "opaque token unknown to the resolver",
            Kind::Unknown(Unknown::AppserviceAddress) => {
                "application service token from outside its IP ranges"
            }
            Kind::GuestForbidden => "guest token on a route that forbids guests",
            Kind::Unavailable => "revocation or token state unavailable",
            Kind::Locked => "the account is locked",
            Kind::Suspended => "suspended account, action not allowed",
            Kind::AppserviceForbidden => "application service user_id outside its namespaces",
            Kind::UnknownDevice => "application service device_id unknown",
            Kind::RateLimited(_) => "too many failed token checks from this address",
            Kind::InsufficientScope => "the token lacks a scope the route requires",
        }
    }

    /// The Matrix JSON body: `{"errcode", "error"}`, plus `"soft_logout": true` when it applies.
    pub fn to_json(&self) -> String {
        self.json().to_string()
    }

    fn json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "errcode": self.errcode(),
            "error": self.message(),
        });
        if self.soft_logout() {
            body["soft_logout"] = true.into();
        }
        if let Some(ms) = self.retry_after_ms() {
            // Deprecated since spec v1.10 in favour of `Retry-After`, still read by clients.
            body["retry_after_ms"] = ms.into();
        }
        body
    }

    /// The complete response: status, `Content-Type: application/json` and the JSON body.
    pub fn to_response(&self) -> Response<Bytes> {
        let mut response = crate::json::json_response(self.status(), &self.json());
        if self.is_unavailable() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(ms) = self.retry_after_ms() {
            let seconds = ms.div_ceil(1000).max(1);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("digits are a header value"),
            );
        }
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("errcode", &self.errcode())
            .field("reason", &self.reason())
            .finish()
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies() {
        let expired = Rejection::unknown(Unknown::Expired);
        let body: serde_json::Value = serde_json::from_str(&expired.to_json()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Access token has expired.", "soft_logout": true})
        );
        let forged = Rejection::unknown(Unknown::BadSignature);
        let body: serde_json::Value = serde_json::from_str(&forged.to_json()).unwrap();
        assert_eq!(body.get("soft_logout"), None);
        assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
        let response = Rejection::missing(Missing::Mixed).to_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(Rejection::guest_forbidden().status(), StatusCode::FORBIDDEN);
        assert!(format!("{forged:?}").contains("signature does not verify"));
    }
}
