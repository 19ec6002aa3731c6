//! Opaque tokens beside macaroons: a homeserver migrating to (or from) macaroons has tokens in
//! its database (Synapse's `syt_…`); a resolver turns those into the same identity.
//!
//! The layer recognises macaroons by their wire format (decoding and parsing, no HMAC), so a
//! macaroon, valid or not, never reaches the resolver; anything else does, and a miss is
//! `M_UNKNOWN_TOKEN`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::hooks::revocation::BackendError;
use crate::identity::{Credential, MatrixUser, Scopes, TokenId};

/// Who an opaque token belongs to.
///
/// Two answers are equal when their public fields are (whatever a cache prepared inside).
#[derive(Clone)]
#[non_exhaustive]
pub struct ResolvedToken {
    /// The user id.
    pub user_id: String,
    /// The device, if the token was issued to one.
    pub device_id: Option<String>,
    /// Whether the user is a guest.
    pub is_guest: bool,
    /// When the token expires (ms since the epoch); past it the layer answers `M_UNKNOWN_TOKEN`,
    /// with a soft logout if [`Self::soft_logout_on_expiry`] says so.
    pub expires_at_ms: Option<u64>,
    /// Whether an expired token gets `"soft_logout": true` (the default, right for a homeserver's
    /// own tokens, which a refresh renews). An OAuth 2.0 server's answer cannot tell expiry from
    /// revocation, so [`Self::oauth2`] turns it off.
    pub soft_logout_on_expiry: bool,
    /// The token's OAuth 2.0 scopes, if it has a scope set (see [`crate::MatrixUser::scopes`]);
    /// `None` for a token that is not limited by scopes (the default).
    pub scopes: Option<Scopes>,
    /// Whether an OAuth 2.0 server issued the token: the identity's credential is then
    /// [`Credential::OAuth2`](crate::Credential::OAuth2) rather than
    /// [`Credential::Opaque`](crate::Credential::Opaque).
    pub oauth2: bool,
    /// The identity, built once by a cache that shares this answer between requests (so a hit
    /// costs no hashing of the token for its id, no copy of its strings); the layer uses it only
    /// while it still matches the fields above.
    pub(crate) identity: Option<MatrixUser>,
}

impl ResolvedToken {
    /// A token of `user_id`, no device, not a guest, never expiring.
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            device_id: None,
            is_guest: false,
            expires_at_ms: None,
            soft_logout_on_expiry: true,
            scopes: None,
            oauth2: false,
            identity: None,
        }
    }

    /// With its identity built for `token` (see [`Self::identity`]), if its user id is valid.
    #[cfg_attr(not(feature = "oauth2"), allow(dead_code))]
    pub(crate) fn prepared_for(mut self, token: &str) -> Self {
        self.identity = crate::macaroon::caveat::is_valid_user_id(&self.user_id)
            .then(|| self.build_identity(opaque_token_id(token.as_bytes())));
        self
    }

    /// The identity the layer gives this answer: the built one while it matches, else `None`.
    pub(crate) fn built_identity(&self) -> Option<&MatrixUser> {
        self.identity.as_ref().filter(|user| {
            user.user_id() == self.user_id
                && user.device_id() == self.device_id.as_deref()
                && user.is_guest() == self.is_guest
                && user.expires_at_ms() == self.expires_at_ms
                && user.scopes() == self.scopes.as_ref()
                && (user.credential() == Credential::OAuth2) == self.oauth2
        })
    }

    /// The identity for this answer (its user id already checked).
    pub(crate) fn build_identity(&self, token_id: TokenId) -> MatrixUser {
        let credential = if self.oauth2 {
            Credential::OAuth2
        } else {
            Credential::Opaque
        };
        MatrixUser::vouched(
            credential,
            &self.user_id,
            self.device_id.as_deref(),
            self.is_guest,
            self.expires_at_ms,
            token_id,
            None,
        )
        .with_scopes(self.scopes.clone())
    }

    /// Issued to `device_id`.
    pub fn device_id(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    /// Whether the user is a guest.
    pub fn guest(mut self, is_guest: bool) -> Self {
        self.is_guest = is_guest;
        self
    }

    /// Expires at `at_ms` (ms since the epoch).
    pub fn expires_at_ms(mut self, at_ms: u64) -> Self {
        self.expires_at_ms = Some(at_ms);
        self
    }

    /// Whether an expired token gets `"soft_logout": true` (default: yes).
    #[must_use]
    pub fn soft_logout_on_expiry(mut self, soft_logout: bool) -> Self {
        self.soft_logout_on_expiry = soft_logout;
        self
    }

    /// The token's scope set: [`crate::MatrixUser::scopes`] returns it, and the layer's
    /// [`require_scope_when`](crate::MatrixAuthLayer::require_scope_when) rules apply to it.
    #[must_use]
    pub fn scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = Some(scopes);
        self
    }

    /// Issued by an OAuth 2.0 server: [`Credential::OAuth2`](crate::Credential::OAuth2), and no
    /// soft logout on expiry (such a server answers an expired and a revoked token alike).
    #[must_use]
    pub fn oauth2(mut self) -> Self {
        self.oauth2 = true;
        self.soft_logout_on_expiry = false;
        self
    }
}

impl PartialEq for ResolvedToken {
    fn eq(&self, other: &Self) -> bool {
        self.user_id == other.user_id
            && self.device_id == other.device_id
            && self.is_guest == other.is_guest
            && self.expires_at_ms == other.expires_at_ms
            && self.soft_logout_on_expiry == other.soft_logout_on_expiry
            && self.scopes == other.scopes
            && self.oauth2 == other.oauth2
    }
}

impl Eq for ResolvedToken {}

impl fmt::Debug for ResolvedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedToken")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("is_guest", &self.is_guest)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("soft_logout_on_expiry", &self.soft_logout_on_expiry)
            .field("scopes", &self.scopes)
            .field("oauth2", &self.oauth2)
            .finish()
    }
}

/// The [`TokenId`] of an opaque token: a hash of it, never the token.
pub(crate) fn opaque_token_id(token: &[u8]) -> TokenId {
    TokenId::from_secret("opaque", token)
}

/// The answer of a resolver: `Ok(None)` for an unknown token, `Err` when it could not look
/// (the layer then fails closed with `503 M_UNKNOWN`).
pub type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<Option<ResolvedToken>, BackendError>> + Send>>;

#[doc = include_str!("../../docs/opaque_tokens.md")]
pub trait TokenResolver: Send + Sync + 'static {
    /// Resolves one token, as sent by the client.
    fn resolve(&self, token: &str) -> ResolveFuture;

    /// The answer for `token` if it is at hand without waiting (a cache hit): the layer then
    /// decides at once, without parking the request. `None`, the default, sends the token to
    /// [`Self::resolve`]. An `Arc`, so that a cache hands out its entry without copying it.
    /// Only a positive answer belongs here: a resolver that does not know
    /// the token returns `None` and lets `resolve` say so.
    fn resolve_now(&self, token: &str) -> Option<Arc<ResolvedToken>> {
        let _ = token;
        None
    }
}

/// A closure is a resolver:
///
/// ```
/// use tower_matrix_auth::hooks::{ResolveFuture, ResolvedToken};
/// # let keys = tower_matrix_auth::KeyRing::new().with_key("k", tower_matrix_auth::MacaroonSecret::from_passphrase("s"));
/// let layer = tower_matrix_auth::MatrixAuthLayer::new(keys).resolver(|token: &str| -> ResolveFuture {
///     let known = (token == "syt_opaque").then(|| ResolvedToken::user("@alice:example.org"));
///     Box::pin(std::future::ready(Ok(known)))
/// });
/// # drop(layer);
/// ```
impl<F> TokenResolver for F
where
    F: Fn(&str) -> ResolveFuture + Send + Sync + 'static,
{
    fn resolve(&self, token: &str) -> ResolveFuture {
        self(token)
    }
}

impl<R: TokenResolver + ?Sized> TokenResolver for Arc<R> {
    fn resolve(&self, token: &str) -> ResolveFuture {
        (**self).resolve(token)
    }

    fn resolve_now(&self, token: &str) -> Option<Arc<ResolvedToken>> {
        (**self).resolve_now(token)
    }
}

/// A fixed set of opaque tokens, compared in constant time: for tests and demos.
#[derive(Clone, Default)]
pub struct StaticTokens {
    tokens: Arc<Vec<(Box<[u8]>, ResolvedToken)>>,
}

impl StaticTokens {
    /// Adds a token.
    pub fn with(self, token: impl AsRef<[u8]>, resolved: ResolvedToken) -> Self {
        let mut tokens = (*self.tokens).clone();
        tokens.push((token.as_ref().into(), resolved));
        Self {
            tokens: Arc::new(tokens),
        }
    }
}

impl TokenResolver for StaticTokens {
    fn resolve(&self, token: &str) -> ResolveFuture {
        // Every entry is compared, so the time taken does not say which one matched.
        let mut found = None;
        for (candidate, resolved) in self.tokens.iter() {
            if crate::macaroon::ct::bytes_equal(candidate.as_ref(), token.as_bytes()) {
                found = Some(resolved.clone());
            }
        }
        Box::pin(std::future::ready(Ok(found)))
    }
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: HashMap<&str, usize> =
            self.tokens.iter().fold(HashMap::new(), |mut m, (_, r)| {
                *m.entry(r.user_id.as_str()).or_default() += 1;
                m
            });
        f.debug_struct("StaticTokens")
            .field("tokens_per_user", &users)
            .finish()
    }
}
