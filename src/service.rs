//! The middleware service: decides for each request whether it passes, and with which identity.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use tower_service::Service;

use crate::account::{suspended_may, AccountStatus};
use crate::body::ResponseBody;
use crate::error::{Kind, Missing, Rejection, Unknown};
use crate::extract::{find_token, strip_query_token};
use crate::future::ResponseFuture;
use crate::identity::{Credential, MatrixUser, TokenId, TokenType};
use crate::layer::{Config, QueryToken, Requirement};
use crate::resolver::ResolveFuture;
use crate::revocation::{RevocationCheck, RevocationError, RevocationStatus};
use crate::routes::is_logout_route;
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
    },
    /// Not a macaroon: the homeserver's resolver has yet to say whose token it is.
    AwaitResolver {
        resolving: ResolveFuture,
        token_id: TokenId,
    },
}

impl<S: Clone> MatrixAuth<S> {
    /// Parks a request until an asynchronous answer: the service that was driven ready goes
    /// into the future, a clone stays here.
    fn park<B>(&mut self, parts: Parts, body: B) -> crate::future::Waiting<S, B> {
        let clone = self.inner.clone();
        crate::future::Waiting {
            service: std::mem::replace(&mut self.inner, clone),
            parts,
            body,
            config: self.config.clone(),
        }
    }
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
        let found = match find_token(parts, self.query_token == QueryToken::Allowed) {
            Ok(Some(found)) => found,
            Ok(None) if requirement == Requirement::Optional => return Decision::Pass(None),
            Ok(None) => return Decision::Reject(Rejection::missing(Missing::NoToken)),
            Err(missing) => return Decision::Reject(Rejection::missing(missing)),
        };
        // A cache hit first, unless `as_token`s come first: the cache holds visible-ASCII tokens
        // only, so a hit also settles the one extraction rule `find_token` left open.
        if !self.appservices_configured() {
            if let Some(verified) = self.verifier.cached(&found.token, TokenType::Access) {
                return self.after_verification(verified, parts);
            }
        }
        self.decide_in_full(found, parts)
    }

    fn appservices_configured(&self) -> bool {
        #[cfg(feature = "appservice")]
        return !self.appservices.is_empty();
        #[cfg(not(feature = "appservice"))]
        return false;
    }

    /// The rest of [`Config::decide`] for a token the cache did not vouch for: the extraction
    /// rule left open, `as_token`s, the full verification, or the resolver for opaque tokens.
    fn decide_in_full(&self, found: crate::extract::Found<'_>, parts: &Parts) -> Decision {
        let token = match found.checked() {
            Ok(token) => token,
            Err(missing) => return Decision::Reject(Rejection::missing(missing)),
        };
        #[cfg(feature = "appservice")]
        if !self.appservices.is_empty() {
            if let Some(appservice) = self.appservices.find(&token) {
                return self.appservice_decision(appservice, parts);
            }
        }
        match self
            .verifier
            .verify_in_full(&token, TokenType::Access, parts)
        {
            Ok(verified) => self.after_verification(verified, parts),
            // Macaroons are told apart by their format alone, as the verifier reports it: a
            // macaroon, valid or not, never reaches the resolver; anything else does.
            Err(rejection) if rejection.is_not_a_macaroon() => match &self.resolver {
                Some(resolver) => {
                    let Ok(text) = std::str::from_utf8(&token) else {
                        return Decision::Reject(Rejection::unknown(Unknown::NotResolved));
                    };
                    Decision::AwaitResolver {
                        resolving: resolver.resolve(text),
                        token_id: TokenId::from_secret("opaque", &token),
                    }
                }
                None => Decision::Reject(rejection),
            },
            Err(rejection) => Decision::Reject(rejection),
        }
    }

    /// A verified macaroon's decision: the revocation store's answer, now or later.
    fn after_verification(&self, verified: Verified, parts: &Parts) -> Decision {
        match self.revocation.check(&verified.user).now_or_later() {
            Ok(outcome) => match self.settle(outcome, verified, parts) {
                Ok(user) => Decision::Pass(Some(user)),
                Err(rejection) => Decision::Reject(rejection),
            },
            Err(check) => Decision::AwaitRevocation { check, verified },
        }
    }

    /// An `as_token`: who the application service acts as, from `?user_id=` / `?device_id=`,
    /// then that user's account state.
    ///
    /// The spec's account rules apply to the user, whoever makes the request: a deactivated
    /// user cannot be acted as (`403 M_FORBIDDEN`), a suspended one only as suspended accounts
    /// may act (`403 M_USER_SUSPENDED`, and [`MatrixUser::is_suspended`] is set). A lock is not
    /// applied, as in Synapse: it keeps the user's own sessions out, while the service holds a
    /// credential of its own. No revocation store is asked: an `as_token` is not a session.
    #[cfg(feature = "appservice")]
    fn appservice_decision(
        &self,
        appservice: &crate::appservice::AppService,
        parts: &Parts,
    ) -> Decision {
        use crate::appservice::Masquerade;
        let (id, user_id, device_id) = match self.appservices.masquerade(appservice, parts) {
            Masquerade::Forbidden => {
                return Decision::Reject(Rejection::of(Kind::AppserviceForbidden))
            }
            Masquerade::UnknownDevice => {
                return Decision::Reject(Rejection::of(Kind::UnknownDevice))
            }
            Masquerade::As {
                appservice: id,
                user_id,
                device_id,
            } => (id, user_id, device_id),
        };
        let mut user = MatrixUser::vouched(
            Credential::AppService,
            &user_id,
            device_id.as_deref(),
            false,
            None,
            TokenId::from_secret("appservice", id.as_bytes()),
            Some(id),
        );
        match self.account_status(&user_id) {
            AccountStatus::Deactivated => {
                Decision::Reject(Rejection::of(Kind::AppserviceForbidden))
            }
            AccountStatus::Suspended => match self.suspension(parts) {
                Ok(()) => {
                    user.mark_suspended();
                    Decision::Pass(Some(user))
                }
                Err(rejection) => Decision::Reject(rejection),
            },
            _ => Decision::Pass(Some(user)),
        }
    }

    /// The account state of `user_id`: active without an [`crate::AccountState`] hook.
    fn account_status(&self, user_id: &str) -> AccountStatus {
        self.accounts
            .as_ref()
            .map_or(AccountStatus::Active, |accounts| accounts.status(user_id))
    }

    /// Whether a suspended account may make this request.
    fn suspension(&self, parts: &Parts) -> Result<(), Rejection> {
        if suspended_may(parts) || self.suspended_allowed(parts) {
            Ok(())
        } else {
            Err(Rejection::of(Kind::Suspended))
        }
    }

    /// What the resolver's answer means for this request.
    pub(crate) fn settle_resolved(
        &self,
        outcome: Result<Option<crate::resolver::ResolvedToken>, RevocationError>,
        token_id: TokenId,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        match outcome {
            Err(error) => {
                tracing::warn!(%error, "token resolver failed; refusing the request");
                Err(Rejection::unavailable())
            }
            Ok(None) => Err(Rejection::unknown(Unknown::NotResolved)),
            Ok(Some(resolved)) if !crate::caveat::is_valid_user_id(&resolved.user_id) => {
                tracing::warn!("token resolver answered a user id that is not a Matrix user id");
                Err(Rejection::unknown(Unknown::NotResolved))
            }
            Ok(Some(resolved)) => {
                let expired = resolved
                    .expires_at_ms
                    .is_some_and(|at| self.verifier.now_ms() >= at);
                let user = MatrixUser::vouched(
                    Credential::Opaque,
                    &resolved.user_id,
                    resolved.device_id.as_deref(),
                    resolved.is_guest,
                    resolved.expires_at_ms,
                    token_id,
                    None,
                );
                // Revocation of opaque tokens is the resolver's business: a revoked one is unknown.
                self.settle(
                    Ok(RevocationStatus::Active),
                    Verified { user, expired },
                    parts,
                )
            }
        }
    }

    /// The verdict once the revocation state is known, in this order: revoked, then the
    /// account's state (deactivated, locked), then expiry, guests, and suspension. A revoked
    /// token is refused outright even when expired: a soft logout would only invite a refresh
    /// that cannot succeed.
    pub(crate) fn settle(
        &self,
        outcome: Result<RevocationStatus, RevocationError>,
        verified: Verified,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        match outcome {
            Err(error) => {
                tracing::warn!(%error, "revocation check failed; refusing the request");
                return Err(Rejection::unavailable());
            }
            Ok(RevocationStatus::Revoked) => return Err(Rejection::unknown(Unknown::Revoked)),
            Ok(RevocationStatus::Active) => {}
        }
        let Verified { mut user, expired } = verified;
        let status = self.account_status(user.user_id());
        match status {
            AccountStatus::Deactivated => return Err(Rejection::unknown(Unknown::Deactivated)),
            AccountStatus::Locked if !is_logout_route(parts) => {
                return Err(Rejection::of(Kind::Locked))
            }
            _ => {}
        }
        if expired && !self.expired_allowed(parts) {
            return Err(Rejection::unknown(Unknown::Expired));
        }
        if user.is_guest() && !self.guests_allowed(parts) {
            return Err(Rejection::guest_forbidden());
        }
        if status == AccountStatus::Suspended {
            self.suspension(parts)?;
            user.mark_suspended();
        }
        Ok(user)
    }

    /// Readies an admitted request for the inner service: the identity goes into the
    /// extensions, the query token out of the URI (or the request is refused if it cannot be).
    pub(crate) fn admit<B>(
        &self,
        mut parts: Parts,
        body: B,
        user: Option<MatrixUser>,
    ) -> Result<(Request<B>, tracing::Span), Rejection> {
        if self.strip_query_token {
            if let Some(uri) = strip_query_token(&parts.uri).map_err(Rejection::missing)? {
                parts.uri = uri;
            }
        }
        let span = match &user {
            Some(user) => {
                user.record_in_current_span();
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
        Ok((Request::from_parts(parts, body), span))
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
            Decision::Pass(user) => match self.config.admit(parts, body, user) {
                Ok((request, span)) => {
                    let future = {
                        let _entered = span.enter();
                        self.inner.call(request)
                    };
                    ResponseFuture::called(future, span)
                }
                Err(rejection) => ResponseFuture::rejected(self.config.reject(&rejection)),
            },
            Decision::Reject(rejection) => ResponseFuture::rejected(self.config.reject(&rejection)),
            Decision::AwaitRevocation { check, verified } => {
                ResponseFuture::awaiting_revocation(check, verified, self.park(parts, body))
            }
            Decision::AwaitResolver {
                resolving,
                token_id,
            } => ResponseFuture::awaiting_resolver(resolving, token_id, self.park(parts, body)),
        }
    }
}
