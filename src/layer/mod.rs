//! The tower side: the layer a homeserver adds, the service it wraps, and the plumbing between.
//!
//! | File | What it holds |
//! |---|---|
//! | `mod.rs` | [`MatrixAuthLayer`], the builder: everything a homeserver configures |
//! | `decision.rs` | **the decision pipeline**: why a request passes or is refused |
//! | `extract.rs` | where the token comes from: `Authorization: Bearer`, `?access_token=` |
//! | `client_addr.rs` | who sent the request: the peer, or what trusted proxies say |
//! | `limit.rs` | the failed-authentication limiter (feature `limiter`) |
//! | `metrics.rs` | what the layer counts (feature `metrics`) |
//! | `service.rs` | [`MatrixAuth`], the service: hands requests to the pipeline and on |
//! | `future.rs` | [`ResponseFuture`]: waits for a store or resolver, then calls the service |
//! | `body.rs` | [`ResponseBody`]: the inner body or our error's bytes |
//!
//! # Metrics
//!
//! With the feature `metrics`, the layer reports through the `metrics` facade: nothing is
//! recorded unless the application installs a recorder (e.g. `metrics-exporter-prometheus`), and
//! without one a report costs a few nanoseconds. No label holds a token, a user id or any other
//! unbounded value.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `matrix_auth_decisions_total` | counter | `outcome`: `ok`, `missing_token`, `unknown_token`, `expired`, `locked`, `suspended`, `deactivated`, `guest_forbidden`, `appservice_forbidden`, `unavailable`, `rate_limited`, `insufficient_scope` (a [`require_scope_when`](MatrixAuthLayer::require_scope_when) rule); for `ok`, `credential`: `macaroon`, `opaque`, `appservice`, `oauth2`, or `none` (an optional route without a token) |
//! | `matrix_auth_wait_seconds` | histogram | `on`: `revocation` (a store that answered later), `resolver` (opaque tokens, introspection) |
//! | `matrix_auth_token_cache_total` | counter | `result`: `hit`, `miss` (the verified-token cache, on the layer's path) |
//! | `matrix_auth_resolver_cache_total` | counter | `result`: `hit` (the resolver had the answer at hand, e.g. the introspection cache), `miss` (it was asked and waited for) |
//! | `matrix_auth_store_healthy` | gauge | none: 1 while the PostgreSQL store is connected with its view proven current, 0 while it fails closed |
//! | `matrix_auth_refresh_replays_total` | counter | `action`: `granted_in_grace`, `refused`, `session_revoked`: replayed refresh tokens at `/v3/refresh` (see [`Sessions::refresh_policy`](crate::Sessions::refresh_policy)) |
//!
//! Skipped requests (skip rules, the federation OpenID route) are not decisions and are not
//! counted.

mod body;
mod client_addr;
mod decision;
pub(crate) mod extract;
mod future;
#[cfg(feature = "limiter")]
mod limit;
#[cfg(feature = "metrics")]
pub(crate) mod metrics;
mod service;

pub use body::ResponseBody;
pub use client_addr::{
    ClientAddr, ForwardedHeader, InvalidIpRanges, IpRanges, PeerAddr, TrustedProxies,
};
pub use future::ResponseFuture;
#[cfg(feature = "limiter")]
#[cfg_attr(docsrs, doc(cfg(feature = "limiter")))]
pub use limit::{FailureLimit, DEFAULT_MAX_ADDRESSES};
pub use service::MatrixAuth;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::Response;
use tower_layer::Layer;

use crate::error::Rejection;
use crate::hooks::account::AccountDirectory;
use crate::hooks::resolver::TokenResolver;
use crate::hooks::revocation::{NeverRevoked, Revocation};
use crate::lifecycle::Sessions;
use crate::macaroon::keys::KeyRing;
use crate::macaroon::verify::Verifier;
use decision::{Decision, Policy};

/// Whether the `access_token` query parameter is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueryToken {
    /// Read it (spec v1.19: servers MUST support both places). The default.
    #[default]
    Allowed,
    /// Read it for application services only: a query token that is a configured `as_token`
    /// authenticates, any other is ignored as if it were absent (the header decides). For a
    /// server on spec v1.20 (MSC4127), which removes `?access_token=` from the client-server API
    /// while its application-service API still mentions it: bridges written against that text
    /// keep working, users must use `Authorization: Bearer`. Without the `appservice` feature, or
    /// without application services, the same as [`QueryToken::Ignored`].
    AppServicesOnly,
    /// Ignore it for everyone: only `Authorization: Bearer` authenticates.
    Ignored,
}

/// Whether guest tokens (`guest = true`) reach the inner service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestPolicy {
    /// Guests get `403 M_GUEST_ACCESS_FORBIDDEN`. The default.
    #[default]
    Forbidden,
    /// Guests pass, marked by [`crate::MatrixUser::is_guest`].
    Allowed,
}

#[doc = include_str!("../../docs/layer.md")]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct MatrixAuthLayer {
    policy: Arc<Policy>,
}

impl MatrixAuthLayer {
    /// A layer verifying with `keys`: header and query tokens, guests forbidden, nothing
    /// skipped, nothing revoked, the system clock.
    pub fn new(keys: KeyRing) -> Self {
        Self::with_verifier(Verifier::new(keys))
    }

    /// A layer around a configured [`Verifier`]: its clock, leeway, limits, custom caveats and
    /// token cache are configured there, in one place, and nowhere on the layer.
    pub fn with_verifier(verifier: Verifier) -> Self {
        Self {
            policy: Arc::new(Policy {
                verifier,
                query_token: QueryToken::Allowed,
                strip_query_token: true,
                guests: GuestPolicy::Forbidden,
                guests_allowed_when: Vec::new(),
                skip_when: Vec::new(),
                optional: false,
                optional_when: Vec::new(),
                expired_allowed_when: Vec::new(),
                suspended_allowed_when: Vec::new(),
                scopes_required_when: Vec::new(),
                revocation: Arc::new(NeverRevoked),
                resolver: None,
                accounts: None,
                #[cfg(feature = "appservice")]
                appservices: crate::hooks::appservice::AppServices::default(),
                renderer: None,
                trusted_proxies: TrustedProxies::none(),
                peer_addr: None,
                #[cfg(feature = "limiter")]
                failure_limiter: None,
            }),
        }
    }

    /// The layer for the tokens `sessions` issues: its verifier, and its store as the revocation
    /// hook. The layer and the refresh endpoints then verify alike; configure the verifier before
    /// building the [`Sessions`].
    pub fn for_sessions(sessions: &Sessions) -> Self {
        Self::with_verifier(sessions.verifier().clone()).revocation(sessions.store())
    }

    fn update(mut self, change: impl FnOnce(&mut Policy)) -> Self {
        change(Arc::make_mut(&mut self.policy));
        self
    }

    /// Whether the `access_token` query parameter is read (default: allowed). A server on spec
    /// v1.20 sets `.query_token(QueryToken::AppServicesOnly)`. Whatever the setting, the parameter
    /// is removed from the URI the inner service sees ([`Self::strip_query_token`]).
    pub fn query_token(self, policy: QueryToken) -> Self {
        self.update(|c| c.query_token = policy)
    }

    /// Whether `access_token` is removed from the URI the inner service sees (default: yes), so
    /// that a `TraceLayer` or access log after this layer cannot record it.
    pub fn strip_query_token(self, strip: bool) -> Self {
        self.update(|c| c.strip_query_token = strip)
    }

    /// Whether guest tokens pass (default: forbidden).
    pub fn guests(self, policy: GuestPolicy) -> Self {
        self.update(|c| c.guests = policy)
    }

    /// Lets guests through on the requests `predicate` picks, e.g. whoami:
    /// `.allow_guests_when(tower_matrix_auth::routes::is_whoami_route)`. Match routes by their segments
    /// ([`crate::routes`]), not with `ends_with` or `contains`: clients choose many segments.
    /// Never applies on a path that is not normal ([`crate::routes::is_normal_path`]).
    pub fn allow_guests_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.update(|c| c.guests_allowed_when.push(Arc::new(predicate)))
    }

    /// Passes requests that `predicate` picks on untouched: no token needed, none checked.
    /// Never applies on a path that is not normal ([`crate::routes::is_normal_path`]): such a request is
    /// authenticated.
    pub fn skip_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.update(|c| c.skip_when.push(Arc::new(predicate)))
    }

    /// Passes requests whose path starts with `prefix` on untouched, e.g.
    /// `/_matrix/federation/` (authenticated by `Authorization: X-Matrix`, not by us). End the
    /// prefix with `/`, or `/_matrix/federationx` is skipped too. A path with dot segments is
    /// never skipped: `/_matrix/federation/../client/v3/account/whoami` is authenticated.
    pub fn skip_path_prefix(self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.skip_when(move |parts| parts.uri.path().starts_with(&prefix))
    }

    /// Passes requests for exactly `path` on untouched, e.g. `/_matrix/client/versions`.
    pub fn skip_path(self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.skip_when(move |parts| parts.uri.path() == path)
    }

    /// Makes authentication optional everywhere: a request without a token passes with no
    /// identity; a request with a token still needs a valid one.
    pub fn optional(self) -> Self {
        self.update(|c| c.optional = true)
    }

    /// Makes authentication optional on the requests `predicate` picks (never on a path that is
    /// not normal, [`crate::routes::is_normal_path`]).
    pub fn optional_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.update(|c| c.optional_when.push(Arc::new(predicate)))
    }

    /// Lets expired (but otherwise valid, unrevoked) tokens through on the requests `predicate`
    /// picks (never on a path that is not normal, [`crate::routes::is_normal_path`]). For the spec's
    /// `/logout` and `/logout/all`, use [`Self::allow_expired_on_logout`]: a hand-written
    /// `contains("/logout")` would also accept expired tokens on every route where the client
    /// picks a segment, e.g. `PUT …/rooms/{roomId}/send/{eventType}/logout`.
    pub fn allow_expired_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.update(|c| c.expired_allowed_when.push(Arc::new(predicate)))
    }

    /// Lets expired (but otherwise valid, unrevoked) tokens through on exactly
    /// `POST /_matrix/client/{version}/logout` and `…/logout/all`
    /// ([`crate::routes::is_logout_route`]), as the spec requires: a client whose token expired can
    /// still log out.
    pub fn allow_expired_on_logout(self) -> Self {
        self.allow_expired_when(crate::routes::is_logout_route)
    }

    /// Lets a suspended account make the requests `predicate` picks, beyond what the layer
    /// allows it (reads and a fixed list of writes, see [`crate::hooks::AccountStatus::Suspended`]),
    /// e.g. messages to the room where the server's administrators talk with suspended users,
    /// as the spec recommends. Never applies on a path that is not normal
    /// ([`crate::routes::is_normal_path`]); read the path with [`crate::routes::ClientRoute`].
    pub fn allow_suspended_when<F>(self, predicate: F) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        self.update(|c| c.suspended_allowed_when.push(Arc::new(predicate)))
    }

    /// Requires `scope` of tokens that carry an OAuth 2.0 scope set
    /// ([`crate::MatrixUser::scopes`]) on the requests `predicate` picks, e.g. Synapse's admin
    /// scope on an admin API: `.require_scope_when(is_admin_route, "urn:synapse:admin:*")`. A
    /// token without it gets `403 M_FORBIDDEN` there; rules add up (every matching rule's
    /// scope is required).
    ///
    /// Tokens without a scope set (macaroons, opaque database tokens, `as_token`s) are not
    /// limited by scopes and pass these rules: whether such a user may act as an administrator
    /// is the handler's decision, as it always was. A handler that wants an OAuth 2.0 token
    /// whatever happens checks [`crate::MatrixUser::credential`].
    ///
    /// Unlike the exceptions (`allow_*_when`, `skip_when`), a rule here only narrows: on a path
    /// that is not normal ([`crate::routes::is_normal_path`]: `//`, dot segments), which a
    /// predicate may misjudge while the router behind normalises it, every rule applies, so
    /// such a request needs every scope the rules name.
    pub fn require_scope_when<F>(self, predicate: F, scope: impl Into<String>) -> Self
    where
        F: Fn(&Parts) -> bool + Send + Sync + 'static,
    {
        let scope: Arc<str> = scope.into().into();
        self.update(|c| c.scopes_required_when.push((Arc::new(predicate), scope)))
    }

    /// Consults `revocation` for every token whose signature and caveats hold.
    pub fn revocation(self, revocation: impl Revocation) -> Self {
        self.update(|c| c.revocation = Arc::new(revocation))
    }

    /// Lets tokens that are not macaroons authenticate through `resolver` (opaque database
    /// tokens). Macaroons never reach it; a miss is `M_UNKNOWN_TOKEN`, an error fails closed.
    pub fn resolver(self, resolver: impl TokenResolver) -> Self {
        self.update(|c| c.resolver = Some(Arc::new(resolver)))
    }

    /// Consults `accounts` for every authenticated user: locked, suspended and deactivated
    /// accounts are refused or limited (see [`crate::hooks::AccountStatus`]).
    pub fn accounts(self, accounts: impl AccountDirectory) -> Self {
        self.update(|c| c.accounts = Some(Arc::new(accounts)))
    }

    /// Authenticates these application services by their `as_token` (feature `appservice`).
    #[cfg(feature = "appservice")]
    pub fn appservices(self, appservices: crate::hooks::appservice::AppServices) -> Self {
        self.update(|c| c.appservices = appservices)
    }

    /// Believes the forwarding header (`X-Forwarded-For`, or `Forwarded` with
    /// [`TrustedProxies::header`]) from these proxies only ([`TrustedProxies::client`]): the
    /// client's address is then the rightmost hop that is not one of them. From any other peer
    /// the header changes nothing, and the other header is never read. The address goes into
    /// each admitted request's extensions as [`ClientAddr`]; when a hop the proxies report cannot
    /// be read, the address is unknown (no [`ClientAddr`], never limited, refused by an
    /// application service's IP ranges).
    pub fn trusted_proxies(self, proxies: TrustedProxies) -> Self {
        self.update(|c| c.trusted_proxies = proxies)
    }

    /// Reads the connection's peer address with `read`, e.g. axum's `ConnectInfo`:
    /// `.peer_addr(|parts| parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))`.
    /// Without it, the layer reads a [`PeerAddr`] or a `std::net::SocketAddr` extension.
    pub fn peer_addr<F>(self, read: F) -> Self
    where
        F: Fn(&Parts) -> Option<std::net::IpAddr> + Send + Sync + 'static,
    {
        self.update(|c| c.peer_addr = Some(Arc::new(read)))
    }

    /// Limits failed token checks per client address (feature `limiter`, off by default): past
    /// `limit`, that address's requests whose token the verified-token cache does not hold get
    /// `429 M_LIMIT_EXCEEDED` with `Retry-After` before any verification, until its budget
    /// refills. Application services' `as_token`s are never limited. The address is the
    /// layer's ([`Self::peer_addr`], [`Self::trusted_proxies`]); a request whose address is
    /// unknown is never limited. Behind a reverse proxy, configure the trusted proxies first, or
    /// every client shares the proxy's budget.
    #[cfg(feature = "limiter")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limiter")))]
    pub fn failure_limit(self, limit: FailureLimit) -> Self {
        self.update(|c| {
            c.failure_limiter = Some(Arc::new(limit::FailureLimiter::new(limit)));
        })
    }

    /// Renders rejections with `render` instead of the standard Matrix JSON.
    pub fn render_rejection<F>(self, render: F) -> Self
    where
        F: Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.update(|c| c.renderer = Some(Arc::new(render)))
    }

    /// The layer's synchronous decision on a request head (extraction, verification, a ready
    /// revocation answer), without the tower plumbing: what `benches/` measures. `None` when the
    /// revocation store answers later. Not a stable API.
    #[doc(hidden)]
    pub fn __authenticate(
        &self,
        parts: &Parts,
    ) -> Option<Result<Option<crate::MatrixUser>, Rejection>> {
        match self.policy.decide(parts) {
            Decision::Untouched => Some(Ok(None)),
            Decision::Pass(user) => Some(Ok(user)),
            Decision::Reject(rejection) => Some(Err(rejection)),
            Decision::AwaitRevocation { .. } | Decision::AwaitResolver { .. } => None,
        }
    }

    /// The verifier this layer uses, e.g. to check refresh or login tokens elsewhere.
    pub fn verifier(&self) -> &Verifier {
        &self.policy.verifier
    }
}

impl<S> Layer<S> for MatrixAuthLayer {
    type Service = MatrixAuth<S>;

    fn layer(&self, inner: S) -> MatrixAuth<S> {
        MatrixAuth::new(inner, self.policy.clone())
    }
}

impl fmt::Debug for MatrixAuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MatrixAuthLayer")
            .field(&self.policy)
            .finish()
    }
}
