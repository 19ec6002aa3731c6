//! Macaroon verification: limits, decoding, the HMAC chain and its constant-time comparison,
//! then the caveat rules of [`crate::caveat`].
//!
//! The chain is computed here rather than by the `macaroon` crate, whose `Verifier` compares the
//! final signature with `==`, cannot see a clock or the request, and costs several times the
//! HMACs themselves (see the README's Performance section).

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use subtle::ConstantTimeEq;

use crate::caveat::{Caveat, CaveatCheck, CaveatFailure, CaveatRules, STANDARD_KEYS};
use crate::clock::{Clock, SystemClock};
use crate::error::{Rejection, Unknown};
use crate::identity::{MatrixUser, TokenType, VerifiedClaims};
use crate::keys::{hmac, KeyRing};
use crate::wire::{self, FormatError};

/// Default longest token accepted, in bytes as sent.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;
/// Default largest number of caveats accepted.
pub const DEFAULT_MAX_CAVEATS: usize = 64;

/// Checks tokens against a key ring and the caveat rules. The layer owns one; a homeserver can
/// use one directly too (the refresh exchange, login tokens).
///
/// ```
/// use tower_matrix_auth::{KeyRing, MacaroonSecret, TokenType, Verifier};
/// let verifier = Verifier::new(KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s")));
/// let parts = http::Request::new(()).into_parts().0;
/// let rejection = verifier.verify(b"not a macaroon", TokenType::Access, &parts).unwrap_err();
/// assert_eq!(rejection.errcode(), "M_UNKNOWN_TOKEN");
/// ```
#[derive(Clone)]
pub struct Verifier {
    keys: KeyRing,
    rules: CaveatRules,
    clock: Arc<dyn Clock>,
    max_token_len: usize,
    max_caveats: usize,
}

/// A token whose signature and caveats hold, perhaps past its `time <` caveat.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) user: MatrixUser,
    pub(crate) expired: bool,
}

impl Verifier {
    /// A verifier with the system clock, no leeway and the default limits.
    pub fn new(keys: KeyRing) -> Self {
        Self {
            keys,
            rules: CaveatRules::default(),
            clock: Arc::new(SystemClock),
            max_token_len: DEFAULT_MAX_TOKEN_LEN,
            max_caveats: DEFAULT_MAX_CAVEATS,
        }
    }

    /// Replaces the clock (tests use [`crate::ManualClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Tolerance for `time` caveats, for clocks that disagree a little.
    pub fn leeway_ms(mut self, leeway_ms: u64) -> Self {
        self.rules.leeway_ms = leeway_ms;
        self
    }

    /// Longest token accepted (bytes as sent); longer ones are refused before any decoding.
    pub fn max_token_len(mut self, max: usize) -> Self {
        self.max_token_len = max;
        self
    }

    /// Most caveats accepted; parsing stops at the first one over.
    pub fn max_caveats(mut self, max: usize) -> Self {
        self.max_caveats = max;
        self
    }

    /// Accepts caveats with `key`, when `check` says they hold for the request.
    ///
    /// # Panics
    /// If `key` is one of the standard caveats (`gen`, `user_id`, `type`, `time`, `nonce`,
    /// `guest`, `device_id`): their meaning is fixed.
    pub fn caveat<F>(mut self, key: &str, check: F) -> Self
    where
        F: Fn(&Caveat<'_>, &Parts) -> bool + Send + Sync + 'static,
    {
        assert!(
            !STANDARD_KEYS.contains(&key),
            "`{key}` is a standard Matrix caveat; its rule cannot be replaced"
        );
        let check: CaveatCheck = Arc::new(check);
        self.rules.custom.retain(|(k, _)| &**k != key);
        self.rules.custom.push((key.into(), check));
        self
    }

    /// The key ring.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The current time as this verifier sees it.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Verifies a token for an endpoint that takes `expected` tokens. An expired token is refused
    /// (`soft_logout`). No revocation check: that is the layer's (or the caller's) next step.
    pub fn verify(
        &self,
        token: &[u8],
        expected: TokenType,
        parts: &Parts,
    ) -> Result<MatrixUser, Rejection> {
        let verified = self.verify_allowing_expired(token, expected, parts)?;
        if verified.expired {
            return Err(Rejection::unknown(Unknown::Expired));
        }
        Ok(verified.user)
    }

    /// Like [`Verifier::verify`], but reports expiry instead of refusing.
    pub(crate) fn verify_allowing_expired(
        &self,
        token: &[u8],
        expected: TokenType,
        parts: &Parts,
    ) -> Result<Verified, Rejection> {
        if token.len() > self.max_token_len {
            return Err(Rejection::unknown(Unknown::TooLong));
        }
        let format = |e: FormatError| Rejection::unknown(Unknown::Format(e));
        let decoded = wire::decode_token(token).map_err(format)?;
        let macaroon = wire::parse_binary(decoded.bytes(), self.max_caveats).map_err(format)?;
        let key = self
            .keys
            .find(macaroon.identifier)
            .ok_or(Rejection::unknown(Unknown::NoSuchKey))?;

        let mut signature = key.first_link;
        for caveat in macaroon.caveats() {
            if caveat.third_party {
                return Err(Rejection::unknown(Unknown::Caveat(
                    CaveatFailure::ThirdParty,
                )));
            }
            signature = hmac(&signature, caveat.id);
        }
        if !bool::from(signature.ct_eq(macaroon.signature)) {
            return Err(Rejection::unknown(Unknown::BadSignature));
        }

        let claims = self
            .rules
            .evaluate(macaroon.caveats(), expected, self.clock.now_ms(), parts)
            .map_err(|failure| Rejection::unknown(Unknown::Caveat(failure)))?;
        let user = MatrixUser::from_claims(VerifiedClaims {
            user_id: claims.user_id,
            device_id: claims.device_id,
            nonce: claims.nonce,
            is_guest: claims.is_guest,
            token_type: claims.token_type,
            expires_at_ms: claims.expires_at_ms,
            signature: macaroon.signature,
        });
        Ok(Verified {
            user,
            expired: claims.expired,
        })
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("rules", &self.rules)
            .field("max_token_len", &self.max_token_len)
            .field("max_caveats", &self.max_caveats)
            .finish_non_exhaustive()
    }
}
