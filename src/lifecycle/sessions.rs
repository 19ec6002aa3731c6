//! The life of a token: login, the refresh exchange (both endpoints), logout, log out everywhere,
//! single-use login tokens. One engine, [`Sessions`], over an [`Issuer`], a [`Verifier`] and a
//! [`TokenStore`](crate::store::TokenStore); the refresh endpoints are tower services a homeserver mounts as they are.
//!
//! The lifecycle tables this file implements are written once, in `docs/sessions.md`, and
//! rendered on [`Sessions`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_service::Service;

use crate::hooks::revocation::{BackendError, RevocationStatus};
use crate::identity::{MatrixUser, TokenType};
use crate::lifecycle::issuer::{IssuedTokens, Issuer, SessionRequest};
use crate::lifecycle::nonce::{NonceKind, TokenNonce};
use crate::macaroon::verify::Verifier;
use crate::store::{
    keep_until_ms, RefreshMode, RefreshOutcome, RefreshPolicy, RefreshRequest, TokenRef, TokenStore,
};

/// Largest request body the refresh endpoints read.
const MAX_BODY: usize = 64 * 1024;

/// Decides whether a request may go on, for the refresh endpoints: `Some(retry_after)` refuses
/// it with `429 M_LIMIT_EXCEEDED`.
pub trait RefreshRateLimit: Send + Sync + 'static {
    /// Checks one request.
    fn check(&self, parts: &Parts) -> Option<Duration>;
}

impl<F> RefreshRateLimit for F
where
    F: Fn(&Parts) -> Option<Duration> + Send + Sync + 'static,
{
    fn check(&self, parts: &Parts) -> Option<Duration> {
        self(parts)
    }
}

impl<R: RefreshRateLimit + ?Sized> RefreshRateLimit for Arc<R> {
    fn check(&self, parts: &Parts) -> Option<Duration> {
        (**self).check(parts)
    }
}

/// Why a refresh or a login token was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The token is not a valid token of the expected type, or was revoked or already used.
    Invalid,
    /// The store could not answer: fail closed.
    Unavailable(BackendError),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Invalid => f.write_str("token is not valid for this exchange"),
            ExchangeError::Unavailable(e) => write!(f, "token state unavailable: {e}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

#[derive(Clone)]
struct Inner {
    issuer: Issuer,
    verifier: Verifier,
    store: Arc<dyn TokenStore>,
    rate_limit: Option<Arc<dyn RefreshRateLimit>>,
    policy: RefreshPolicy,
}

#[doc = include_str!("../../docs/sessions.md")]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

impl Sessions {
    /// An engine minting with `issuer`, checking tokens with `verifier` (use the layer's, so both
    /// agree on keys, clock and caveats) and keeping state in `store`.
    pub fn new(issuer: Issuer, verifier: Verifier, store: impl TokenStore) -> Self {
        Self::with_shared_store(issuer, verifier, Arc::new(store))
    }

    /// Like [`Sessions::new`] with a store shared elsewhere.
    ///
    /// Logs a warning when the issuer mints tokens without `time <` (its defaults do: access
    /// tokens issued without a refresh token, and refresh tokens): what the store records about
    /// them is kept for good, so the store grows with every logout and refresh.
    pub fn with_shared_store(
        issuer: Issuer,
        verifier: Verifier,
        store: Arc<dyn TokenStore>,
    ) -> Self {
        if issuer.longest_session_token_ms().is_none() {
            tracing::warn!(
                "the issuer mints tokens that never expire: the revocation store keeps every \
                 logout and refresh of their sessions for good; set Issuer::session_lifetime (or \
                 access_lifetime and refresh_lifetime) to bound it"
            );
        }
        Self {
            inner: Arc::new(Inner {
                issuer,
                verifier,
                store,
                rate_limit: None,
                policy: RefreshPolicy::default(),
            }),
        }
    }

    /// Rate-limits the refresh endpoints.
    pub fn rate_limit(mut self, limit: impl RefreshRateLimit) -> Self {
        Arc::make_mut(&mut self.inner).rate_limit = Some(Arc::new(limit));
        self
    }

    /// How `/v3/refresh` treats a replayed refresh token: a grace window, and whether a replay
    /// outside it logs the session out. The default is MSC2918's: no grace, replays refused.
    /// An absolute ceiling on a session is the issuer's
    /// [`session_lifetime`](crate::Issuer::session_lifetime).
    pub fn refresh_policy(mut self, policy: RefreshPolicy) -> Self {
        Arc::make_mut(&mut self.inner).policy = policy;
        self
    }

    /// The store, to hand to the layer as its revocation check.
    pub fn store(&self) -> Arc<dyn TokenStore> {
        self.inner.store.clone()
    }

    /// The issuer.
    pub fn issuer(&self) -> &Issuer {
        &self.inner.issuer
    }

    /// The verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// Mints the tokens of a new login. Nothing is stored: a session needs state only once it
    /// is refreshed or logged out. The session carries the user's current "log out everywhere"
    /// floor, so the next log-out-everywhere revokes it.
    pub fn login(&self, user_id: &str, request: &SessionRequest) -> IssuedTokens {
        let epoch = self.inner.store.user_floor(user_id);
        self.inner.issuer.new_session(user_id, request, epoch)
    }

    /// Exchanges a refresh token for the next generation of its session.
    ///
    /// Only a refresh token with the issuer's session nonce (its first caveat, of kind `r`) is
    /// exchanged: a holder of a token minted without one cannot make it a fresh session by
    /// appending a nonce. Caveats a holder appended to the refresh token are not carried over to
    /// the successor tokens; the successor's `device_id` and `guest` come from the refresh token.
    pub async fn refresh(
        &self,
        refresh_token: &[u8],
        mode: RefreshMode,
        parts: &Parts,
    ) -> Result<IssuedTokens, ExchangeError> {
        let inner = &self.inner;
        let user = inner
            .verifier
            .verify(refresh_token, TokenType::Refresh, parts)
            .map_err(|_| ExchangeError::Invalid)?;
        let nonce = TokenNonce::of(&user)
            .filter(|nonce| nonce.kind == NonceKind::Refresh)
            .ok_or(ExchangeError::Invalid)?;
        // One instant for what the store is told to keep and for what is minted.
        let now = inner.issuer.now_ms();
        // Past the session's lifetime (set after it began, so its tokens may not say so): the
        // client logs in again.
        if inner
            .issuer
            .session_end_ms(nonce.started_ms)
            .is_some_and(|end| now >= end)
        {
            return Err(ExchangeError::Invalid);
        }
        let until = inner
            .issuer
            .successor_session_expires_ms(&nonce, now)
            .map_or(u64::MAX, |at| at.saturating_add(inner.verifier.leeway_ms()));
        let request = RefreshRequest::new(mode, until, now).policy(inner.policy);
        let outcome = inner
            .store
            .refresh(&TokenRef::of(&user), &request)
            .await
            .map_err(ExchangeError::Unavailable)?;
        record_replay(outcome);
        let generation = outcome.generation().ok_or(ExchangeError::Invalid)?;
        Ok(inner.issuer.successor(&user, &nonce, generation, now))
    }

    /// Logs out the session of a verified token: the token, the refresh token issued with it
    /// and every other generation of that login. The record is kept until every token of the
    /// session has stopped verifying (its latest `time <` plus the leeway; for good when one has
    /// no `time <`).
    pub async fn logout(&self, user: &MatrixUser) -> Result<(), BackendError> {
        let until = keep_until_ms(user, self.inner.verifier.leeway_ms());
        self.inner
            .store
            .revoke_session(&TokenRef::of(user), until)
            .await
    }

    /// Logs the user out everywhere: every session that began before this call returns is
    /// revoked, every generation of it, including generations a refresh in flight mints after
    /// this returns (they carry their session's epoch, which the new floor exceeds); and the
    /// whole session of the token that asked. Sessions that begin afterwards are not caught.
    pub async fn logout_all(&self, user: &MatrixUser) -> Result<(), BackendError> {
        let now = self.inner.issuer.now_ms();
        self.inner.store.revoke_user(user.user_id(), now).await?;
        self.logout(user).await
    }

    /// Mints a single-use login token for `m.login.token`; returns it and its lifetime in ms.
    pub fn login_token(&self, user_id: &str) -> (String, u64) {
        let epoch = self.inner.store.user_floor(user_id);
        self.inner.issuer.login_token(user_id, epoch)
    }

    /// Redeems a login token: valid, unexpired and unused, it is used up and its user returned.
    ///
    /// A login token stays single-use whatever caveats its holder appends. One minted here is
    /// known by its session nonce; one minted elsewhere must carry a `time <` caveat and is known
    /// by the HMAC chain up to its first one, which a holder cannot change by appending (a nonce
    /// included). Login tokens minted elsewhere without `time <` are refused.
    pub async fn redeem_login_token(
        &self,
        token: &[u8],
        parts: &Parts,
    ) -> Result<MatrixUser, ExchangeError> {
        let inner = &self.inner;
        let user = inner
            .verifier
            .verify(token, TokenType::Login, parts)
            .map_err(|_| ExchangeError::Invalid)?;
        let leeway = inner.verifier.leeway_ms();
        let (once, until) = match TokenNonce::of(&user) {
            Some(nonce) if nonce.kind == NonceKind::Login => {
                (TokenRef::of(&user), keep_until_ms(&user, leeway))
            }
            Some(_) => return Err(ExchangeError::Invalid),
            None => {
                let (chain, expires) = inner
                    .verifier
                    .chain_through_first_expiry(token)
                    .ok_or(ExchangeError::Invalid)?;
                (
                    TokenRef::single_use(&user, &chain),
                    expires.saturating_add(leeway),
                )
            }
        };
        let status = inner
            .store
            .check(&user)
            .await
            .map_err(ExchangeError::Unavailable)?;
        if status == RevocationStatus::Revoked {
            return Err(ExchangeError::Invalid);
        }
        let first = inner
            .store
            .consume_once(&once, until)
            .await
            .map_err(ExchangeError::Unavailable)?;
        if first {
            Ok(user)
        } else {
            Err(ExchangeError::Invalid)
        }
    }

    /// `POST /_matrix/client/v3/refresh` (MSC2918) as a tower service: body
    /// `{"refresh_token"}`, answers `{"access_token", "refresh_token", "expires_in_ms"}`; failure
    /// is `401 M_UNKNOWN_TOKEN`. Mount it where the authentication layer does not run.
    pub fn refresh_endpoint(&self) -> RefreshEndpoint {
        RefreshEndpoint {
            sessions: self.clone(),
            mode: RefreshMode::Rotating,
        }
    }

    /// `POST /_matrix/client/r0/tokenrefresh` (the original spec) as a tower service: strictly
    /// single use; answers `{"access_token", "refresh_token"}`; failure is `403 M_FORBIDDEN`.
    pub fn token_refresh_endpoint(&self) -> RefreshEndpoint {
        RefreshEndpoint {
            sessions: self.clone(),
            mode: RefreshMode::SingleUse,
        }
    }
}

/// Logs and counts replays: a replay outside the grace window means that two parties hold one
/// session, which an operator wants to see.
fn record_replay(outcome: RefreshOutcome) {
    let action = match outcome {
        RefreshOutcome::GrantedInGrace(_) => {
            tracing::debug!("refresh token replayed within the grace window: granted");
            "granted_in_grace"
        }
        RefreshOutcome::Replayed { session_revoked } => {
            tracing::warn!(
                session_revoked,
                "refresh token replayed outside the grace window: its session has moved past it"
            );
            if session_revoked {
                "session_revoked"
            } else {
                "refused"
            }
        }
        _ => return,
    };
    #[cfg(feature = "metrics")]
    metrics::counter!("matrix_auth_refresh_replays_total", "action" => action).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = action;
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("issuer", &self.inner.issuer)
            .field("rate_limited", &self.inner.rate_limit.is_some())
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// A refresh endpoint; see [`Sessions::refresh_endpoint`] and
/// [`Sessions::token_refresh_endpoint`].
#[derive(Clone, Debug)]
pub struct RefreshEndpoint {
    sessions: Sessions,
    mode: RefreshMode,
}

/// A Matrix JSON response, as the endpoints' body type.
fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    crate::json::json_response(status, &body).map(Full::new)
}

/// A Matrix JSON error, as the endpoints' body type.
fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response<Full<Bytes>> {
    crate::json::matrix_error(status, errcode, error).map(Full::new)
}

/// Reads `refresh_token` from a JSON body, or the `errcode` and `error` of the 400 that says what
/// is wrong with it.
fn refresh_token_from(body: &[u8]) -> Result<String, (&'static str, &'static str)> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| ("M_NOT_JSON", "Content not JSON."))?;
    let object = value
        .as_object()
        .ok_or(("M_BAD_JSON", "The body must be a JSON object."))?;
    match object.get("refresh_token") {
        None | Some(serde_json::Value::Null) => Err(("M_MISSING_PARAM", "Missing refresh_token.")),
        Some(serde_json::Value::String(token)) => Ok(token.clone()),
        Some(_) => Err(("M_BAD_JSON", "refresh_token must be a string.")),
    }
}

impl RefreshEndpoint {
    async fn handle<B>(self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body + Send,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        if parts.method != Method::POST {
            return matrix_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "Only POST is allowed here.",
            );
        }
        if let Some(limit) = &self.sessions.inner.rate_limit {
            if let Some(retry_after) = limit.check(&parts) {
                return rate_limited(retry_after);
            }
        }
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<LengthLimitError>() => {
                return matrix_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "M_TOO_LARGE",
                    "Request body too large.",
                )
            }
            // The client's body broke off (a reset connection, a chunked body cut short): what
            // arrived is no JSON document, and no token in it is looked at.
            Err(_) => {
                return matrix_error(
                    StatusCode::BAD_REQUEST,
                    "M_NOT_JSON",
                    "The request body could not be read in full.",
                )
            }
        };
        let token = match refresh_token_from(&body) {
            Ok(token) => token,
            Err((errcode, error)) => return matrix_error(StatusCode::BAD_REQUEST, errcode, error),
        };
        match self
            .sessions
            .refresh(token.as_bytes(), self.mode, &parts)
            .await
        {
            Ok(tokens) => {
                let mut answer = serde_json::json!({
                    "access_token": tokens.access_token,
                    "refresh_token": tokens.refresh_token,
                });
                if let (RefreshMode::Rotating, Some(ms)) = (self.mode, tokens.expires_in_ms) {
                    answer["expires_in_ms"] = ms.into();
                }
                json_response(StatusCode::OK, answer)
            }
            Err(ExchangeError::Invalid) => {
                tracing::debug!(mode = ?self.mode, "refresh refused");
                match self.mode {
                    RefreshMode::Rotating => matrix_error(
                        StatusCode::UNAUTHORIZED,
                        "M_UNKNOWN_TOKEN",
                        "Refresh token is not valid.",
                    ),
                    RefreshMode::SingleUse => matrix_error(
                        StatusCode::FORBIDDEN,
                        "M_FORBIDDEN",
                        "Refresh token is not valid.",
                    ),
                }
            }
            Err(ExchangeError::Unavailable(error)) => {
                tracing::warn!(%error, "refresh failed: store unavailable");
                let mut response = matrix_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "M_UNKNOWN",
                    "Cannot refresh right now; try again later.",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }
}

/// `429 M_LIMIT_EXCEEDED` with `retry_after_ms` and `Retry-After` (whole seconds, rounded up).
pub(crate) fn rate_limited(retry_after: Duration) -> Response<Full<Bytes>> {
    let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({
            "errcode": "M_LIMIT_EXCEEDED",
            "error": "Too many requests.",
            "retry_after_ms": ms,
        }),
    );
    let seconds = ms.div_ceil(1000).max(1);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&seconds.to_string()).expect("digits are a valid header value"),
    );
    response
}

impl<B> Service<Request<B>> for RefreshEndpoint
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(request).await) })
    }
}
