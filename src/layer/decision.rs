//! The decision pipeline: why a request passes, with which identity, or why it is refused.
//!
//! Everything the layer decides is here, in the order it is decided: which requirement applies
//! to the route ([`Policy::requirement`]), the token's extraction, `as_token`s, the macaroon's
//! verification or the resolver, then [`Policy::settle`] (revocation, account state, expiry,
//! guests, suspension) and [`Policy::admit`]. The service and its future only carry requests
//! between these steps; they decide nothing.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};

use crate::error::{Kind, Missing, Rejection, Unknown};
use crate::hooks::account::{suspended_may, AccountDirectory, AccountStatus};
use crate::hooks::resolver::{opaque_token_id, ResolveFuture, TokenResolver};
use crate::hooks::revocation::{BackendError, Revocation, RevocationCheck, RevocationStatus};
use crate::identity::{MatrixUser, TokenId, TokenType};
use crate::layer::client_addr::{ClientAddr, PeerAddr, TrustedProxies};
use crate::layer::extract::{find_token, strip_query_token, QueryTokens};
use crate::layer::{GuestPolicy, QueryToken};
use crate::macaroon::verify::{Verified, Verifier};
use crate::routes::{is_logout_route, is_normal_path, is_openid_userinfo_route};

type Predicate = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;
type Renderer = Arc<dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync>;
pub(crate) type PeerReader = Arc<dyn Fn(&Parts) -> Option<IpAddr> + Send + Sync>;

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
    pub(crate) trusted_proxies: TrustedProxies,
    pub(crate) peer_addr: Option<PeerReader>,
    #[cfg(feature = "limiter")]
    pub(crate) failure_limiter: Option<Arc<crate::layer::limit::FailureLimiter>>,
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
        if granted(&self.skip_when, parts)
            || (is_openid_userinfo_route(parts) && is_normal_path(parts.uri.path()))
        {
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
    /// Not ours (a skip rule, the federation API's OpenID route): call the inner service with
    /// the request exactly as it came, its query included.
    Untouched,
    /// Call the inner service, with an identity or (an optional route) without one.
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
            return Decision::Untouched;
        }
        let query_tokens = match self.query_token {
            QueryToken::Allowed => QueryTokens::All,
            QueryToken::AppServicesOnly if self.appservices_configured() => {
                QueryTokens::Only(&|token| self.is_as_token(token))
            }
            _ => QueryTokens::None,
        };
        let token = match find_token(parts, query_tokens) {
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
        #[cfg(feature = "limiter")]
        if let Some(wait) = self.limited_for(&token, parts) {
            return Decision::Reject(Rejection::rate_limited(wait));
        }
        // A token that cannot be a macaroon (its first byte says so) goes to the resolver
        // without a verification attempt.
        if let Some(resolver) = &self.resolver {
            if self.verifier.cannot_be_macaroon(&token) {
                return self.resolver_decision(resolver.as_ref(), &token, parts);
            }
        }
        match self.verify(&token, parts) {
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

    fn appservices_configured(&self) -> bool {
        #[cfg(feature = "appservice")]
        return !self.appservices.is_empty();
        #[cfg(not(feature = "appservice"))]
        return false;
    }

    /// Whether `token` is the `as_token` of a configured application service.
    #[cfg_attr(not(feature = "appservice"), allow(unused_variables))]
    fn is_as_token(&self, token: &[u8]) -> bool {
        #[cfg(feature = "appservice")]
        return self.appservices.find(token).is_some();
        #[cfg(not(feature = "appservice"))]
        return false;
    }

    /// How long this request's address is still limited, unless its token is known good (the
    /// verified-token cache holds it, or the resolver has it at hand, as the introspection cache
    /// does): checked only when some address is limited at all.
    #[cfg(feature = "limiter")]
    fn limited_for(&self, token: &[u8], parts: &Parts) -> Option<std::time::Duration> {
        let limiter = self.failure_limiter.as_ref()?;
        if !limiter.any_limited() {
            return None;
        }
        let wait = limiter.limited_for(self.read_client_addr(parts)?)?;
        if self.verifier.cached(token, TokenType::Access).is_some() {
            return None;
        }
        let resolved_now = self.resolver.as_ref().is_some_and(|resolver| {
            std::str::from_utf8(token).is_ok_and(|text| resolver.resolve_now(text).is_some())
        });
        (!resolved_now).then_some(wait)
    }

    /// The verifier's verdict on an access token: the cache's, or a full verification.
    fn verify(&self, token: &[u8], parts: &Parts) -> Result<Verified, Rejection> {
        match self.verifier.cached(token, TokenType::Access) {
            Some(verified) => {
                #[cfg(feature = "metrics")]
                crate::layer::metrics::token_cache(true);
                Ok(verified)
            }
            None => {
                #[cfg(feature = "metrics")]
                crate::layer::metrics::token_cache(false);
                self.verifier
                    .verify_in_full(token, TokenType::Access, parts)
            }
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
        let now = resolver.resolve_now(text);
        #[cfg(feature = "metrics")]
        crate::layer::metrics::resolver_cache(now.is_some());
        if let Some(resolved) = now {
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
        if appservice.has_ip_ranges() && !appservice.allows(self.read_client_addr(parts)) {
            return Decision::Reject(Rejection::unknown(Unknown::AppserviceAddress));
        }
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
    /// request names a scope the set must hold. On a path that is not normal (dot segments,
    /// `//`), which a rule written with `starts_with` may misjudge while the router behind
    /// normalises it (`/_synapse//admin/…`), every rule applies: such a request needs every
    /// scope the rules name.
    fn scopes_required(&self, scopes: &crate::Scopes, parts: &Parts) -> Result<(), Rejection> {
        let mut normal = None;
        for (rule, scope) in &self.scopes_required_when {
            if scopes.contains(scope) {
                continue;
            }
            let applies =
                !*normal.get_or_insert_with(|| is_normal_path(parts.uri.path())) || rule(parts);
            if applies {
                return Err(Rejection::of(Kind::InsufficientScope));
            }
        }
        Ok(())
    }

    /// Readies an admitted request for the inner service: the identity goes into the
    /// extensions, the query token out of the URI (or the request is refused if it cannot be).
    /// Whether anything configured needs the client's address: reading it costs a few extension
    /// and header look-ups, which a layer that never uses it does not pay.
    fn wants_client_addr(&self) -> bool {
        #[cfg(feature = "limiter")]
        if self.failure_limiter.is_some() {
            return true;
        }
        self.peer_addr.is_some() || !self.trusted_proxies.is_empty()
    }

    /// The client's address ([`crate::layer::ClientAddr`]): the peer from the configured reader,
    /// a [`crate::layer::PeerAddr`] or a `SocketAddr` extension, then the trusted proxies' word.
    pub(crate) fn client_addr(&self, parts: &Parts) -> Option<IpAddr> {
        if !self.wants_client_addr() {
            return None;
        }
        self.read_client_addr(parts)
    }

    /// [`Policy::client_addr`], whether or not anything asked for it.
    fn read_client_addr(&self, parts: &Parts) -> Option<IpAddr> {
        let peer = match &self.peer_addr {
            Some(read) => read(parts),
            None => None,
        }
        .or_else(|| parts.extensions.get::<PeerAddr>().map(|peer| peer.0.ip()))
        .or_else(|| parts.extensions.get::<SocketAddr>().map(SocketAddr::ip))?;
        self.trusted_proxies.client(peer, parts)
    }

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
        let client = self.client_addr(&parts);
        let span = match &user {
            Some(user) => {
                user.record_in_current_span();
                let span = tracing::debug_span!(
                    "matrix_auth",
                    user_id = user.user_id(),
                    device_id = user.device_id(),
                    is_guest = user.is_guest(),
                    client = tracing::field::Empty,
                );
                if let Some(client) = client {
                    span.record("client", tracing::field::display(client));
                }
                span
            }
            None => tracing::Span::none(),
        };
        #[cfg(feature = "metrics")]
        crate::layer::metrics::admitted(user.as_ref());
        if let Some(user) = user {
            parts.extensions.insert(user);
        }
        if let Some(addr) = client {
            parts.extensions.insert(ClientAddr(addr));
        }
        Ok((Request::from_parts(parts, body), span))
    }

    /// [`Policy::reject`] for a request whose token was checked: a failed check
    /// (`M_UNKNOWN_TOKEN`) counts against the client's address when a limiter is configured.
    pub(crate) fn refuse(&self, parts: &Parts, rejection: &Rejection) -> Response<bytes::Bytes> {
        let client = self.client_addr(parts);
        #[cfg(feature = "limiter")]
        if let (Some(limiter), Some(addr)) = (&self.failure_limiter, client) {
            if rejection.is_guessable_failure() {
                limiter.note_failure(addr);
            }
        }
        self.respond(rejection, client)
    }

    fn limiter_debug(&self) -> Option<&dyn fmt::Debug> {
        #[cfg(feature = "limiter")]
        return self
            .failure_limiter
            .as_deref()
            .map(|limiter| limiter as &dyn fmt::Debug);
        #[cfg(not(feature = "limiter"))]
        return None;
    }

    /// The response to a request refused before its token was looked at.
    pub(crate) fn reject(&self, rejection: &Rejection) -> Response<bytes::Bytes> {
        self.respond(rejection, None)
    }

    fn respond(&self, rejection: &Rejection, client: Option<IpAddr>) -> Response<bytes::Bytes> {
        #[cfg(feature = "metrics")]
        crate::layer::metrics::refused(rejection);
        // An absent client address records no field.
        tracing::debug!(
            errcode = rejection.errcode(),
            reason = rejection.reason(),
            client = client.map(tracing::field::display),
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
            .field("trusted_proxies", &self.trusted_proxies)
            .field("peer_addr_reader", &self.peer_addr.is_some())
            .field("limiter", &self.limiter_debug())
            .finish_non_exhaustive()
    }
}
