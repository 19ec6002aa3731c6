//! The decision pipeline: why a request passes, with which identity, or why it is refused.
//!
//! Everything the layer decides is here, in the order it is decided: which requirement applies
//! to the route ([`Policy::requirement`]), the token's extraction, `as_token`s, the macaroon's
//! verification or the resolver, then [`Policy::settle`] (revocation, account state, expiry,
//! guests, suspension) and [`Policy::admit`]. The service and its future only carry requests
//! between these steps; they decide nothing.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};

use crate::error::{Kind, Missing, Rejection, Unknown};
use crate::hooks::account::{suspended_may, AccountDirectory, AccountStatus};
use crate::hooks::resolver::{opaque_token_id, ResolveFuture, TokenResolver};
use crate::hooks::revocation::{BackendError, Revocation, RevocationCheck, RevocationStatus};
use crate::identity::{MatrixUser, TokenId, TokenType};
use crate::layer::extract::{find_token, strip_query_token};
use crate::layer::{GuestPolicy, QueryToken};
use crate::macaroon::verify::{Verified, Verifier};
use crate::routes::{is_logout_route, is_normal_path};

type Predicate = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;
type Renderer = Arc<dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync>;

/// How the layer treats one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requirement {
    /// Not ours (federation, `/versions`): passed on untouched.
    Skip,
    /// A token is verified if present; without one the request passes unauthenticated.
    Optional,
    /// A valid token is required.
    Required,
}

#[derive(Clone)]
pub(crate) struct Policy {
    pub(crate) verifier: Verifier,
    pub(crate) query_token: QueryToken,
    pub(crate) strip_query_token: bool,
    pub(crate) guests: GuestPolicy,
    pub(crate) guests_allowed_when: Vec<Predicate>,
    pub(crate) skip_when: Vec<Predicate>,
    pub(crate) optional: bool,
    pub(crate) optional_when: Vec<Predicate>,
    pub(crate) expired_allowed_when: Vec<Predicate>,
    pub(crate) suspended_allowed_when: Vec<Predicate>,
    /// Scopes a request must have when its token has a scope set: `(rule, scope)`.
    pub(crate) scopes_required_when: Vec<(Predicate, Arc<str>)>,
    pub(crate) revocation: Arc<dyn Revocation>,
    pub(crate) resolver: Option<Arc<dyn TokenResolver>>,
    pub(crate) accounts: Option<Arc<dyn AccountDirectory>>,
    #[cfg(feature = "appservice")]
    pub(crate) appservices: crate::hooks::appservice::AppServices,
    pub(crate) renderer: Option<Renderer>,
}

/// Whether one of `rules` grants its exception to this request. Never on a path that is not
/// normal (dot segments, `//`), whatever a rule says: this is the one place every path-dependent
/// exception goes through, so a predicate written with `starts_with` or `contains` cannot be
/// walked out of its prefix with `..`. The path is scanned only once a rule said yes.
fn granted(rules: &[Predicate], parts: &Parts) -> bool {
    rules.iter().any(|p| p(parts)) && is_normal_path(parts.uri.path())
}

impl Policy {
    pub(crate) fn requirement(&self, parts: &Parts) -> Requirement {
        if granted(&self.skip_when, parts) {
            Requirement::Skip
        } else if self.optional || granted(&self.optional_when, parts) {
            Requirement::Optional
        } else {
            Requirement::Required
        }
    }

    pub(crate) fn guests_allowed(&self, parts: &Parts) -> bool {
        self.guests == GuestPolicy::Allowed || granted(&self.guests_allowed_when, parts)
    }

    pub(crate) fn expired_allowed(&self, parts: &Parts) -> bool {
        granted(&self.expired_allowed_when, parts)
    }

    pub(crate) fn suspended_allowed(&self, parts: &Parts) -> bool {
        granted(&self.suspended_allowed_when, parts)
    }

    pub(crate) fn render(&self, rejection: &Rejection) -> Response<Bytes> {
        match &self.renderer {
            Some(render) => render(rejection),
            None => rejection.to_response(),
        }
    }
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

impl Policy {
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
        #[cfg(feature = "appservice")]
        if !self.appservices.is_empty() {
            if let Some(appservice) = self.appservices.find(&token) {
                return self.appservice_decision(appservice, parts);
            }
        }
        // A token that cannot be a macaroon (its first byte says so) goes to the resolver
        // without a verification attempt.
        if let Some(resolver) = &self.resolver {
            if self.verifier.cannot_be_macaroon(&token) {
                return self.resolver_decision(resolver.as_ref(), &token, parts);
            }
        }
        match self
            .verifier
            .verify_allowing_expired(&token, TokenType::Access, parts)
        {
            Ok(verified) => self.after_verification(verified, parts),
            // Macaroons are told apart by their format alone, as the verifier reports it: a
            // macaroon, valid or not, never reaches the resolver; anything else does.
            Err(rejection) if rejection.is_not_a_macaroon() => match &self.resolver {
                Some(resolver) => self.resolver_decision(resolver.as_ref(), &token, parts),
                None => Decision::Reject(rejection),
            },
            Err(rejection) => Decision::Reject(rejection),
        }
    }

    /// A token that is not a macaroon: the resolver's cached answer now, or its look-up.
    fn resolver_decision(
        &self,
        resolver: &dyn TokenResolver,
        token: &[u8],
        parts: &Parts,
    ) -> Decision {
        let Ok(text) = std::str::from_utf8(token) else {
            return Decision::Reject(Rejection::unknown(Unknown::NotResolved));
        };
        // A cache hit is decided now: no parked request, no future.
        if let Some(resolved) = resolver.resolve_now(text) {
            return match self.settle_resolved_token(&resolved, || opaque_token_id(token), parts) {
                Ok(user) => Decision::Pass(Some(user)),
                Err(rejection) => Decision::Reject(rejection),
            };
        }
        Decision::AwaitResolver {
            resolving: resolver.resolve(text),
            token_id: opaque_token_id(token),
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
        appservice: &crate::hooks::appservice::AppService,
        parts: &Parts,
    ) -> Decision {
        use crate::hooks::appservice::Masquerade;
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
            crate::identity::Credential::AppService,
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

    /// The account state of `user_id`: active without an [`crate::hooks::AccountDirectory`] hook.
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
        outcome: Result<Option<crate::hooks::resolver::ResolvedToken>, BackendError>,
        token_id: TokenId,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        match outcome {
            Err(error) => {
                tracing::warn!(%error, "token resolver failed; refusing the request");
                Err(Rejection::unavailable())
            }
            Ok(None) => Err(Rejection::unknown(Unknown::NotResolved)),
            Ok(Some(resolved)) => self.settle_resolved_token(&resolved, || token_id, parts),
        }
    }

    /// The verdict on a token the resolver knows: its identity (built before, or now), then
    /// [`Self::settle`]'s rules, with the soft logout on expiry as the resolver said.
    fn settle_resolved_token(
        &self,
        resolved: &crate::hooks::resolver::ResolvedToken,
        token_id: impl FnOnce() -> TokenId,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        let user = match resolved.built_identity() {
            Some(user) => user.clone(),
            None if !crate::macaroon::caveat::is_valid_user_id(&resolved.user_id) => {
                tracing::warn!("token resolver answered a user id that is not a Matrix user id");
                return Err(Rejection::unknown(Unknown::NotResolved));
            }
            None => resolved.build_identity(token_id()),
        };
        let expired = resolved
            .expires_at_ms
            .is_some_and(|at| self.verifier.now_ms() >= at);
        // Revocation of opaque tokens is the resolver's business: a revoked one is unknown.
        self.settle_expiring(
            Ok(RevocationStatus::Active),
            Verified { user, expired },
            parts,
            resolved.soft_logout_on_expiry,
        )
    }

    /// The verdict once the revocation state is known, in this order: revoked, then the
    /// account's state (deactivated, locked), then expiry, guests, and suspension. A revoked
    /// token is refused outright even when expired: a soft logout would only invite a refresh
    /// that cannot succeed.
    pub(crate) fn settle(
        &self,
        outcome: Result<RevocationStatus, BackendError>,
        verified: Verified,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        self.settle_expiring(outcome, verified, parts, true)
    }

    /// [`Self::settle`], saying whether an expired token gets a soft logout: a macaroon always
    /// does; a resolved token as its resolver said ([`ResolvedToken::soft_logout_on_expiry`]).
    /// Last, the scope rules, for a token with a scope set.
    ///
    /// [`ResolvedToken::soft_logout_on_expiry`]: crate::hooks::ResolvedToken::soft_logout_on_expiry
    fn settle_expiring(
        &self,
        outcome: Result<RevocationStatus, BackendError>,
        verified: Verified,
        parts: &Parts,
        soft_logout_on_expiry: bool,
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
            return Err(Rejection::unknown(if soft_logout_on_expiry {
                Unknown::Expired
            } else {
                Unknown::ExpiredNoSoftLogout
            }));
        }
        if user.is_guest() && !self.guests_allowed(parts) {
            return Err(Rejection::guest_forbidden());
        }
        if status == AccountStatus::Suspended {
            self.suspension(parts)?;
            user.mark_suspended();
        }
        if let Some(scopes) = user.scopes() {
            self.scopes_required(scopes, parts)?;
        }
        Ok(user)
    }

    /// Whether a token with this scope set may make this request: every rule that picks the
    /// request names a scope the set must hold. (Unlike the exceptions, a rule here only ever
    /// narrows, so it applies on any path, normal or not.)
    fn scopes_required(&self, scopes: &crate::Scopes, parts: &Parts) -> Result<(), Rejection> {
        for (rule, scope) in &self.scopes_required_when {
            if !scopes.contains(scope) && rule(parts) {
                return Err(Rejection::of(Kind::InsufficientScope));
            }
        }
        Ok(())
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

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixAuthPolicy")
            .field("verifier", &self.verifier)
            .field("query_token", &self.query_token)
            .field("strip_query_token", &self.strip_query_token)
            .field("guests", &self.guests)
            .field("guest_rules", &self.guests_allowed_when.len())
            .field("skip_rules", &self.skip_when.len())
            .field("optional", &self.optional)
            .field("optional_rules", &self.optional_when.len())
            .field("scope_rules", &self.scopes_required_when.len())
            .field("custom_renderer", &self.renderer.is_some())
            .finish_non_exhaustive()
    }
}
