//! The verified identity the layer puts into request extensions.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// What a token may be used for: the `type` caveat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenType {
    /// `type = access`: every endpoint except the refresh exchange.
    Access,
    /// `type = refresh`: only the refresh exchange.
    Refresh,
    /// `type = login`: only `m.login.token` login.
    Login,
}

impl TokenType {
    /// The caveat value.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::Access => "access",
            TokenType::Refresh => "refresh",
            TokenType::Login => "login",
        }
    }

    pub(crate) fn from_caveat_value(value: &str) -> Option<Self> {
        match value {
            "access" => Some(TokenType::Access),
            "refresh" => Some(TokenType::Refresh),
            "login" => Some(TokenType::Login),
            _ => None,
        }
    }
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stable, non-secret id of a minted token, for revocation.
///
/// It is the SHA-256 (first 16 bytes) of the user id and the token's first `nonce` caveat, so a
/// holder who appends caveats (attenuation) keeps the same id and cannot escape a revocation.
/// A token without a nonce (Synapse before 0.18.5) gets the hash of its signature instead, which
/// attenuation does change: mint with a nonce when revocation matters (this crate always does).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId([u8; 16]);

impl TokenId {
    pub(crate) fn from_nonce(user_id: &str, nonce: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(b"nonce\0")
            .chain_update(user_id.as_bytes())
            .chain_update([0])
            .chain_update(nonce.as_bytes())
            .finalize();
        Self::from_digest(&digest)
    }

    /// For a credential that is not a macaroon (an opaque token, an `as_token`): a hash of it,
    /// never the credential itself.
    pub(crate) fn from_secret(kind: &str, secret: &[u8]) -> Self {
        let digest = Sha256::new()
            .chain_update(kind.as_bytes())
            .chain_update([0])
            .chain_update(secret)
            .finalize();
        Self::from_digest(&digest)
    }

    pub(crate) fn from_signature(signature: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"signature\0")
            .chain_update(signature)
            .finalize();
        Self::from_digest(&digest)
    }

    fn from_digest(digest: &[u8]) -> Self {
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }

    /// The raw 16 bytes (e.g. for a database key).
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Rebuilds an id from bytes a store kept.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

/// A Matrix user whose token the layer verified, found in the request's extensions.
///
/// With the `axum` feature it is also an extractor; otherwise read it with
/// `request.extensions().get::<MatrixUser>()`. Cloning is cheap (one reference count and a few
/// words). `Debug` shows who the user is, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct MatrixUser {
    /// user id, then device id, then nonce, in one allocation shared by clones.
    text: Arc<str>,
    user_id_end: usize,
    device_id_end: Option<usize>,
    has_nonce: bool,
    /// The nonce is the token's first caveat, where only the minter can write.
    nonce_first: bool,
    /// The earliest `time <` before the first nonce (see [`MatrixUser::nonce_expiry_ms`]),
    /// `u64::MAX` for none: a word, not an `Option`'s two, on every verified request.
    expires_before_nonce_ms: u64,
    is_guest: bool,
    token_type: TokenType,
    expires_at_ms: Option<u64>,
    token_id: TokenId,
    credential: Credential,
    /// The application service's registration id, for [`Credential::AppService`].
    appservice: Option<Arc<str>>,
    /// The OAuth 2.0 scope set, for tokens that carry one.
    scopes: Option<Scopes>,
    suspended: bool,
}

/// An OAuth 2.0 scope set (RFC 6749 §3.3: space-separated scope tokens), as the token server
/// granted it: order kept, duplicates dropped. Cloning is one reference count.
///
/// ```
/// use tower_matrix_auth::Scopes;
/// let scopes = Scopes::parse("urn:matrix:client:api:* urn:matrix:client:device:PHONE");
/// assert!(scopes.contains("urn:matrix:client:api:*"));
/// assert!(!scopes.contains("urn:synapse:admin:*"));
/// assert_eq!(scopes.iter().count(), 2);
/// ```
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Scopes(Arc<[Box<str>]>);

impl Scopes {
    /// Parses a `scope` value: tokens separated by spaces (runs of spaces and empty tokens
    /// ignored).
    pub fn parse(scope: &str) -> Self {
        Self::from_iter(scope.split(' '))
    }

    /// Whether `scope` is in the set, compared exactly (no wildcard matching: a `*` in a Matrix
    /// scope is part of its name).
    pub fn contains(&self, scope: &str) -> bool {
        self.0.iter().any(|s| &**s == scope)
    }

    /// The scope tokens, in the order the server gave them.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|s| &**s)
    }

    /// How many distinct scope tokens.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> FromIterator<&'a str> for Scopes {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        // A set beside the list: a hostile answer with thousands of scopes stays linear.
        let mut seen = std::collections::HashSet::new();
        let mut scopes: Vec<Box<str>> = Vec::new();
        for scope in iter {
            if !scope.is_empty() && seen.insert(scope) {
                scopes.push(scope.into());
            }
        }
        Self(scopes.into())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl fmt::Display for Scopes {
    /// Space-separated, as in an OAuth 2.0 `scope` parameter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope)?;
        }
        Ok(())
    }
}

/// What the caller authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Credential {
    /// A macaroon this layer verified.
    Macaroon,
    /// An opaque token the homeserver's [`crate::hooks::TokenResolver`] knew.
    Opaque,
    /// An application service's `as_token` (acting as its sender or a user of its namespaces).
    AppService,
    /// An access token issued by an OAuth 2.0 server (the Matrix Authentication Service), that
    /// the resolver introspected (feature `oauth2`, or any resolver answering
    /// [`ResolvedToken::oauth2`](crate::hooks::ResolvedToken::oauth2)).
    OAuth2,
}

/// The parts of a verified token that make up a [`MatrixUser`].
pub(crate) struct VerifiedClaims<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) device_id: Option<&'a str>,
    pub(crate) nonce: Option<&'a str>,
    pub(crate) nonce_first: bool,
    pub(crate) expires_before_nonce_ms: Option<u64>,
    pub(crate) is_guest: bool,
    pub(crate) token_type: TokenType,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) signature: &'a [u8; 32],
}

/// Texts up to this long are joined on the stack, so a user costs a single allocation.
const JOIN_ON_STACK: usize = 256;

/// `pieces` joined into one shared string, allocating once when they fit [`JOIN_ON_STACK`].
fn join(pieces: [&str; 3]) -> Arc<str> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    if len > JOIN_ON_STACK {
        return Arc::from(pieces.concat());
    }
    let mut buf = [0u8; JOIN_ON_STACK];
    let mut at = 0;
    for piece in pieces {
        buf[at..at + piece.len()].copy_from_slice(piece.as_bytes());
        at += piece.len();
    }
    // Joined UTF-8 is UTF-8; the check is the price of `forbid(unsafe_code)`.
    Arc::from(std::str::from_utf8(&buf[..len]).expect("joined UTF-8 is UTF-8"))
}

impl MatrixUser {
    pub(crate) fn from_claims(claims: VerifiedClaims<'_>) -> Self {
        let token_id = match claims.nonce {
            Some(nonce) => TokenId::from_nonce(claims.user_id, nonce),
            None => TokenId::from_signature(claims.signature),
        };
        let device_id = claims.device_id.unwrap_or("");
        let user_id_end = claims.user_id.len();
        Self {
            text: join([claims.user_id, device_id, claims.nonce.unwrap_or("")]),
            user_id_end,
            device_id_end: claims.device_id.map(|d| user_id_end + d.len()),
            has_nonce: claims.nonce.is_some(),
            nonce_first: claims.nonce_first,
            expires_before_nonce_ms: claims.expires_before_nonce_ms.unwrap_or(u64::MAX),
            is_guest: claims.is_guest,
            token_type: claims.token_type,
            expires_at_ms: claims.expires_at_ms,
            token_id,
            credential: Credential::Macaroon,
            appservice: None,
            scopes: None,
            suspended: false,
        }
    }

    /// A user another mechanism vouched for (an opaque token, an application service).
    pub(crate) fn vouched(
        credential: Credential,
        user_id: &str,
        device_id: Option<&str>,
        is_guest: bool,
        expires_at_ms: Option<u64>,
        token_id: TokenId,
        appservice: Option<Arc<str>>,
    ) -> Self {
        let user_id_end = user_id.len();
        Self {
            text: join([user_id, device_id.unwrap_or(""), ""]),
            user_id_end,
            device_id_end: device_id.map(|d| user_id_end + d.len()),
            has_nonce: false,
            nonce_first: false,
            expires_before_nonce_ms: u64::MAX,
            is_guest,
            token_type: TokenType::Access,
            expires_at_ms,
            token_id,
            credential,
            appservice,
            scopes: None,
            suspended: false,
        }
    }

    /// With the token's OAuth 2.0 scope set.
    pub(crate) fn with_scopes(mut self, scopes: Option<Scopes>) -> Self {
        self.scopes = scopes;
        self
    }

    pub(crate) fn mark_suspended(&mut self) {
        self.suspended = true;
    }

    /// What the caller authenticated with.
    pub fn credential(&self) -> Credential {
        self.credential
    }

    /// The registration id of the application service making the request, if one is.
    pub fn appservice(&self) -> Option<&str> {
        self.appservice.as_deref()
    }

    /// Whether an application service makes the request (acting as [`Self::user_id`]).
    pub fn is_appservice(&self) -> bool {
        self.credential == Credential::AppService
    }

    /// The OAuth 2.0 scopes the token was granted, for a token that has a scope set
    /// ([`Credential::OAuth2`]); `None` for the others (macaroons, opaque database tokens,
    /// `as_token`s), which scopes do not limit.
    pub fn scopes(&self) -> Option<&Scopes> {
        self.scopes.as_ref()
    }

    /// Whether the token's scope set holds `scope`, e.g. Synapse's admin scope
    /// `urn:synapse:admin:*`; always false for a token without a scope set (see [`Self::scopes`]).
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.as_ref().is_some_and(|s| s.contains(scope))
    }

    /// Whether the account is suspended (spec v1.13): the layer already refused what suspended
    /// accounts may never do; finer rules (redacting only one's own events) are the handler's.
    pub fn is_suspended(&self) -> bool {
        self.suspended
    }

    /// The user id from the `user_id` caveat, e.g. `@alice:example.org`.
    pub fn user_id(&self) -> &str {
        &self.text[..self.user_id_end]
    }

    /// Fills in the `user_id` field of the current span, if it declares one (a `TraceLayer`
    /// request span made with `user_id = tracing::field::Empty`); otherwise does nothing.
    ///
    /// The layer does this for every request it admits. Call it for requests you authenticate
    /// another way (a login, a refresh exchange), so that their log lines name the user alike.
    ///
    /// It is what `Span::current().record("user_id", ..)` does, without cloning the span handle
    /// and dropping it again (each a trip through the subscriber's span registry), and as
    /// `Display`: a formatting subscriber writes `@alice:example.org` as it is instead of
    /// escaping it as a `Debug` string. A user id is validated before it gets here, so it holds
    /// no space or control character that could break a log line.
    pub fn record_in_current_span(&self) {
        let user_id = self.user_id();
        tracing::dispatcher::get_default(|dispatch| {
            let current = dispatch.current_span();
            let (Some(id), Some(metadata)) = (current.id(), current.metadata()) else {
                return;
            };
            let Some(field) = metadata.fields().field("user_id") else {
                return;
            };
            let value = tracing::field::display(user_id);
            let values = [(&field, Some(&value as &dyn tracing::Value))];
            dispatch.record(
                id,
                &tracing::span::Record::new(&metadata.fields().value_set(&values)),
            );
        });
    }

    /// The `device_id` caveat, if the token was issued to a device.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id_end
            .map(|end| &self.text[self.user_id_end..end])
    }

    /// Whether the token carries `guest = true`.
    pub fn is_guest(&self) -> bool {
        self.is_guest
    }

    /// The token's `type` caveat.
    pub fn token_type(&self) -> TokenType {
        self.token_type
    }

    /// When the token stops being valid (the earliest `time <` caveat), in ms since the epoch.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.expires_at_ms
    }

    /// The stable id revocation stores key on.
    pub fn token_id(&self) -> TokenId {
        self.token_id
    }

    /// The value of the token's first `nonce` caveat: the part of the token the minter chose to
    /// make it unique. Not a credential on its own, but it is kept out of `Debug` all the same.
    pub fn nonce(&self) -> Option<&str> {
        if !self.has_nonce {
            return None;
        }
        let start = self.device_id_end.unwrap_or(self.user_id_end);
        Some(&self.text[start..])
    }

    /// Whether [`Self::nonce`] was the token's first caveat: a place no holder of the token can
    /// write to (appending is all a holder can do), so only the minter put it there.
    pub(crate) fn nonce_is_minters(&self) -> bool {
        self.nonce_first
    }

    /// When every token sharing this token's first nonce has expired: the earliest `time <`
    /// written before that nonce, the part of the token its minter wrote. `None` when none was
    /// (the minter's token may never expire, whatever a holder appended later).
    pub(crate) fn nonce_expiry_ms(&self) -> Option<u64> {
        Some(self.expires_before_nonce_ms).filter(|&at| at != u64::MAX)
    }
}

impl fmt::Debug for MatrixUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixUser")
            .field("user_id", &self.user_id())
            .field("device_id", &self.device_id())
            .field("is_guest", &self.is_guest())
            .field("token_type", &self.token_type())
            .field("expires_at_ms", &self.expires_at_ms())
            .field("token_id", &self.token_id())
            .field("credential", &self.credential)
            .field("appservice", &self.appservice())
            .field("scopes", &self.scopes)
            .field("suspended", &self.suspended)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_back_out_of_the_shared_buffer() {
        let user = MatrixUser::from_claims(VerifiedClaims {
            user_id: "@alice:example.org",
            device_id: Some("DEVICE"),
            nonce: Some("n0nce"),
            nonce_first: false,
            expires_before_nonce_ms: None,
            is_guest: false,
            token_type: TokenType::Access,
            expires_at_ms: Some(5),
            signature: &[1; 32],
        });
        assert_eq!(user.user_id(), "@alice:example.org");
        assert_eq!(user.device_id(), Some("DEVICE"));
        assert_eq!(user.nonce(), Some("n0nce"));
        assert_eq!(
            user.token_id(),
            TokenId::from_nonce("@alice:example.org", "n0nce")
        );
        let debug = format!("{user:?}");
        assert!(debug.contains("@alice:example.org") && !debug.contains("n0nce"));

        let bare = MatrixUser::from_claims(VerifiedClaims {
            user_id: "@bob:example.org",
            device_id: None,
            nonce: None,
            nonce_first: false,
            expires_before_nonce_ms: None,
            is_guest: true,
            token_type: TokenType::Access,
            expires_at_ms: None,
            signature: &[2; 32],
        });
        assert_eq!((bare.device_id(), bare.nonce()), (None, None));
        assert_eq!(bare.token_id(), TokenId::from_signature(&[2; 32]));
        assert_ne!(bare.token_id(), TokenId::from_signature(&[3; 32]));
    }
}
