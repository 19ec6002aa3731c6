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

/// Who an opaque token belongs to.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolvedToken {
    /// The user id.
    pub user_id: String,
    /// The device, if the token was issued to one.
    pub device_id: Option<String>,
    /// Whether the user is a guest.
    pub is_guest: bool,
    /// When the token expires (ms since the epoch); past it the layer answers a soft logout.
    pub expires_at_ms: Option<u64>,
}

impl ResolvedToken {
    /// A token of `user_id`, no device, not a guest, never expiring.
    pub fn user(user_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            device_id: None,
            is_guest: false,
            expires_at_ms: None,
        }
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
}

impl fmt::Debug for ResolvedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedToken")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("is_guest", &self.is_guest)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// The answer of a resolver: `Ok(None)` for an unknown token, `Err` when it could not look
/// (the layer then fails closed with `503 M_UNKNOWN`).
pub type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<Option<ResolvedToken>, BackendError>> + Send>>;

#[doc = include_str!("../../docs/opaque_tokens.md")]
pub trait TokenResolver: Send + Sync + 'static {
    /// Resolves one token, as sent by the client.
    fn resolve(&self, token: &str) -> ResolveFuture;
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
