//! The middleware service: decides for each request whether it passes, and with which identity.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use tower_service::Service;

use crate::body::ResponseBody;
use crate::error::{Missing, Rejection, Unknown};
use crate::extract::{find_token, strip_query_token};
use crate::future::ResponseFuture;
use crate::identity::{MatrixUser, TokenType};
use crate::layer::{Config, QueryToken, Requirement};
use crate::revocation::{RevocationCheck, RevocationError, RevocationStatus};
use crate::verify::Verified;

/// The service [`crate::MatrixAuthLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct MatrixAuth<S> {
    inner: S,
    config: Arc<Config>,
}

/// What to do with a request once its token was looked at.
pub(crate) enum Decision {
    /// Call the inner service, with an identity or (skipped, optional) without one.
    Pass(Option<MatrixUser>),
    Reject(Rejection),
    /// The signature and caveats hold; the revocation store has yet to answer.
    AwaitRevocation {
        check: RevocationCheck,
        verified: Verified,
        allowed: Allowances,
    },
}

impl<S> MatrixAuth<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl Config {
    /// Everything that can be decided without waiting: extraction, verification, and the
    /// revocation answer when the store has it at hand.
    pub(crate) fn decide(&self, parts: &Parts) -> Decision {
        let requirement = self.requirement(parts);
        if requirement == Requirement::Skip {
            return Decision::Pass(None);
        }
        let token = match find_token(parts, self.query_token == QueryToken::Allowed) {
            Ok(Some(token)) => token,
            Ok(None) if requirement == Requirement::Optional => return Decision::Pass(None),
            Ok(None) => return Decision::Reject(Rejection::missing(Missing::NoToken)),
            Err(missing) => return Decision::Reject(Rejection::missing(missing)),
        };
        let verified = match self
            .verifier
            .verify_allowing_expired(&token, TokenType::Access, parts)
        {
            Ok(verified) => verified,
            Err(rejection) => return Decision::Reject(rejection),
        };
        let allowed = Allowances {
            guests: self.guests_allowed(parts),
            expired: verified.expired && self.expired_allowed(parts),
        };
        match self.revocation.check(&verified.user).now_or_later() {
            Ok(outcome) => match settle(outcome, verified, allowed) {
                Ok(user) => Decision::Pass(Some(user)),
                Err(rejection) => Decision::Reject(rejection),
            },
            Err(check) => Decision::AwaitRevocation {
                check,
                verified,
                allowed,
            },
        }
    }

    /// Readies an admitted request for the inner service: the identity goes into the
    /// extensions, the query token out of the URI.
    pub(crate) fn admit<B>(
        &self,
        mut parts: Parts,
        body: B,
        user: Option<MatrixUser>,
    ) -> (Request<B>, tracing::Span) {
        if self.strip_query_token {
            if let Some(uri) = strip_query_token(&parts.uri) {
                parts.uri = uri;
            }
        }
        let span = match &user {
            Some(user) => {
                tracing::Span::current().record("user_id", user.user_id());
                tracing::debug_span!(
                    "matrix_auth",
                    user_id = user.user_id(),
                    device_id = user.device_id(),
                    is_guest = user.is_guest()
                )
            }
            None => tracing::Span::none(),
        };
        if let Some(user) = user {
            parts.extensions.insert(user);
        }
        (Request::from_parts(parts, body), span)
    }

    pub(crate) fn reject(&self, rejection: &Rejection) -> Response<bytes::Bytes> {
        tracing::debug!(
            errcode = rejection.errcode(),
            reason = rejection.reason(),
            "matrix request rejected"
        );
        self.render(rejection)
    }
}

/// What the route allows beyond a plain valid token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowances {
    pub(crate) guests: bool,
    /// The token expired and the route takes expired tokens (logout).
    pub(crate) expired: bool,
}

/// The verdict once the revocation state is known. A revoked token is refused outright, even
/// when expired: a soft logout would only invite a refresh that cannot succeed.
pub(crate) fn settle(
    outcome: Result<RevocationStatus, RevocationError>,
    verified: Verified,
    allowed: Allowances,
) -> Result<MatrixUser, Rejection> {
    match outcome {
        Err(error) => {
            tracing::warn!(%error, "revocation check failed; refusing the request");
            Err(Rejection::unavailable())
        }
        Ok(RevocationStatus::Revoked) => Err(Rejection::unknown(Unknown::Revoked)),
        Ok(RevocationStatus::Active) if verified.expired && !allowed.expired => {
            Err(Rejection::unknown(Unknown::Expired))
        }
        Ok(RevocationStatus::Active) if verified.user.is_guest() && !allowed.guests => {
            Err(Rejection::guest_forbidden())
        }
        Ok(RevocationStatus::Active) => Ok(verified.user),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MatrixAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        match self.config.decide(&parts) {
            Decision::Pass(user) => {
                let (request, span) = self.config.admit(parts, body, user);
                let future = {
                    let _entered = span.enter();
                    self.inner.call(request)
                };
                ResponseFuture::called(future, span)
            }
            Decision::Reject(rejection) => ResponseFuture::rejected(self.config.reject(&rejection)),
            Decision::AwaitRevocation {
                check,
                verified,
                allowed,
            } => {
                // The service that was driven ready goes into the future; a clone stays here.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::awaiting_revocation(
                    check,
                    crate::future::Waiting {
                        service: ready,
                        parts,
                        body,
                        verified,
                        allowed,
                        config: self.config.clone(),
                    },
                )
            }
        }
    }
}
