//! Macaroon verification: limits, decoding, the HMAC chain and its constant-time comparison,
//! then the caveat rules of [`crate::macaroon::caveat`].
//!
//! The chain is computed here rather than by the `macaroon` crate, whose `Verifier` compares the
//! final signature with `==`, cannot see a clock or the request, and costs several times the
//! HMACs themselves (see `docs/formats.md` and `docs/performance.md`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use crate::error::{Rejection, Unknown};
use crate::hooks::clock::{Clock, SystemClock};
use crate::identity::{MatrixUser, TokenType, VerifiedClaims};
use crate::macaroon::cache::TokenCache;
use crate::macaroon::caveat::{Caveat, CaveatCheck, CaveatFailure, CaveatRules, STANDARD_KEYS};
use crate::macaroon::keys::KeyRing;
use crate::macaroon::wire::{self, CaveatList, FormatError};

/// Default longest token accepted, in bytes as sent.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 4096;
/// Default largest number of caveats accepted.
pub const DEFAULT_MAX_CAVEATS: usize = 64;
/// Default number of verified tokens remembered (see [`Verifier::token_cache`]).
pub const DEFAULT_TOKEN_CACHE: usize = 4096;

#[doc = include_str!("../../docs/verifier.md")]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct Verifier {
    keys: KeyRing,
    rules: CaveatRules,
    clock: Arc<dyn Clock>,
    max_token_len: usize,
    max_caveats: usize,
    cache_capacity: usize,
    /// Shared by clones, which verify alike; replaced by every builder method.
    cache: Option<Arc<TokenCache>>,
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
            cache_capacity: DEFAULT_TOKEN_CACHE,
            cache: TokenCache::new(DEFAULT_TOKEN_CACHE).map(Arc::new),
        }
    }

    /// A fresh cache after a configuration change: entries verified under the old settings
    /// must not answer for the new ones.
    fn reconfigured(mut self) -> Self {
        self.cache = TokenCache::new(self.cache_capacity).map(Arc::new);
        self
    }

    /// Replaces the clock (tests use [`crate::hooks::ManualClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self.reconfigured()
    }

    /// Tolerance for `time` caveats, for clocks that disagree a little.
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.rules.leeway_ms = crate::hooks::clock::millis(leeway);
        self.reconfigured()
    }

    /// The tolerance for `time` caveats: how long after its `time <` a token still verifies.
    pub(crate) fn leeway_ms(&self) -> u64 {
        self.rules.leeway_ms
    }

    /// Longest token accepted (bytes as sent); longer ones are refused before any decoding.
    pub fn max_token_len(mut self, max: usize) -> Self {
        self.max_token_len = max;
        self.reconfigured()
    }

    /// Most caveats accepted; parsing stops at the first one over.
    pub fn max_caveats(mut self, max: usize) -> Self {
        self.max_caveats = max;
        self.reconfigured()
    }

    /// Remembers up to `capacity` recently verified tokens (default [`DEFAULT_TOKEN_CACHE`](crate::macaroon::DEFAULT_TOKEN_CACHE); 0
    /// turns the cache off), so that a repeat skips decoding and the HMAC chain.
    ///
    /// A hit still refuses, or soft-logs-out, a token whose `time <` caveat has passed, and the
    /// layer still asks its revocation store. A hit requires the very same token, byte for byte.
    /// Only tokens whose verdict depends on nothing but the token and the clock's `time <` are
    /// remembered: not those with `time >`, `time ==` or custom caveats, not those longer than
    /// 1 KiB, not expired ones. Memory: at most `capacity` tokens of at most 1 KiB and their
    /// identities, about 2 MiB for the default capacity and Synapse-sized tokens.
    ///
    /// Clones of a verifier share its cache; every builder method starts a new one.
    pub fn token_cache(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self.reconfigured()
    }

    /// How many verified tokens the cache holds now (0 without a cache).
    pub fn cached_tokens(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.len())
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
        self.reconfigured()
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
        match self.cached(token, expected) {
            Some(verified) => Ok(verified),
            None => self.verify_in_full(token, expected, parts),
        }
    }

    /// Whether `token` is within the length limit yet cannot be a macaroon in any format (its
    /// first byte says so, [`wire::may_be_macaroon`]): what the layer sends to a resolver
    /// without trying to verify it.
    pub(crate) fn cannot_be_macaroon(&self, token: &[u8]) -> bool {
        token.len() <= self.max_token_len && !wire::may_be_macaroon(token)
    }

    /// The verdict on a token the cache holds, verified before as `expected`: its identity, and
    /// whether it has expired since. `None` when it must be verified in full.
    pub(crate) fn cached(&self, token: &[u8], expected: TokenType) -> Option<Verified> {
        if token.len() > self.max_token_len {
            return None;
        }
        let user = self.cache.as_deref()?.get(token)?;
        // Another type: verified in full, for the full rejection.
        if user.token_type() != expected {
            return None;
        }
        // The one check a hit repeats, the only one that depends on the clock; tokens without
        // `time <` do not even read it.
        let expired = user
            .expires_at_ms()
            .is_some_and(|at| self.clock.now_ms() >= at.saturating_add(self.rules.leeway_ms));
        Some(Verified { user, expired })
    }

    /// [`Verifier::verify_allowing_expired`] without asking the cache (but filling it).
    pub(crate) fn verify_in_full(
        &self,
        token: &[u8],
        expected: TokenType,
        parts: &Parts,
    ) -> Result<Verified, Rejection> {
        if token.len() > self.max_token_len {
            return Err(Rejection::unknown(Unknown::TooLong));
        }
        let cache = self.cache.as_deref();
        let now_ms = self.clock.now_ms();

        let format = |e: FormatError| Rejection::unknown(Unknown::Format(e));
        let mut buf = [0; wire::DECODE_BUF];
        let decoded = wire::decode_token_into(token, &mut buf).map_err(format)?;
        let mut list = CaveatList::new();
        let macaroon =
            wire::parse_binary_listing(&decoded, self.max_caveats, &mut list).map_err(format)?;
        let key = self
            .keys
            .find(macaroon.identifier)
            .ok_or(Rejection::unknown(Unknown::NoSuchKey))?;

        let caveats = list.iter(&macaroon);
        if caveats.clone().any(|caveat| caveat.third_party) {
            return Err(Rejection::unknown(Unknown::Caveat(
                CaveatFailure::ThirdParty,
            )));
        }
        let signature = key.chain(caveats.clone().map(|caveat| caveat.id));
        // Constant time: a forger learns nothing from how long a wrong signature took.
        if !crate::macaroon::ct::bytes_equal(&signature, macaroon.signature) {
            return Err(Rejection::unknown(Unknown::BadSignature));
        }

        let section_text = macaroon.caveat_text();
        let claims = self
            .rules
            .evaluate(caveats.clone(), section_text, expected, now_ms, parts)
            .map_err(|failure| Rejection::unknown(Unknown::Caveat(failure)))?;
        let user = MatrixUser::from_claims(VerifiedClaims {
            user_id: claims.user_id,
            device_id: claims.device_id,
            nonce: claims.nonce,
            nonce_first: claims.nonce_first,
            expires_before_nonce_ms: claims.expires_before_nonce_ms,
            is_guest: claims.is_guest,
            token_type: claims.token_type,
            expires_at_ms: claims.expires_at_ms,
            signature: macaroon.signature,
        });
        if let Some(cache) = cache {
            if !claims.expired && caveats.clone().all(|caveat| cacheable(caveat.id)) {
                cache.insert(token, &user);
            }
        }
        Ok(Verified {
            user,
            expired: claims.expired,
        })
    }
}

impl Verifier {
    /// The HMAC chain value through the first `time <` caveat of a token this verifier already
    /// accepted, and that caveat's instant: everything up to there is its minter's (a holder can
    /// only append), so it names the token as minted, whatever was appended, and every such
    /// token expires by that instant. `None` without a `time <` caveat.
    pub(crate) fn chain_through_first_expiry(&self, token: &[u8]) -> Option<([u8; 32], u64)> {
        let mut buf = [0; wire::DECODE_BUF];
        let decoded = wire::decode_token_into(token, &mut buf).ok()?;
        let mut list = CaveatList::new();
        let macaroon = wire::parse_binary_listing(&decoded, self.max_caveats, &mut list).ok()?;
        let key = self.keys.find(macaroon.identifier)?;
        let caveats: Vec<&[u8]> = list.iter(&macaroon).map(|caveat| caveat.id).collect();
        let end = caveats.iter().position(|id| id.starts_with(b"time < "))?;
        let at = std::str::from_utf8(&caveats[end][b"time < ".len()..])
            .ok()?
            .parse()
            .ok()?;
        Some((key.chain(caveats[..=end].iter().copied()), at))
    }
}

/// Whether a caveat that held may be vouched for by the cache: the standard caveats that depend
/// on the token alone, and `time <`, which every hit checks again. Not `time >` or `time ==`
/// (a hit does not re-check them) nor custom caveats (their checkers see the request).
fn cacheable(caveat: &[u8]) -> bool {
    let key = caveat.split(|&b| b == b' ').next().unwrap_or_default();
    match key {
        b"gen" | b"user_id" | b"type" | b"nonce" | b"guest" | b"device_id" => true,
        b"time" => caveat.starts_with(b"time < "),
        _ => false,
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys)
            .field("rules", &self.rules)
            .field("max_token_len", &self.max_token_len)
            .field("max_caveats", &self.max_caveats)
            .field("token_cache", &self.cache_capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_reports_expiry_against_the_clock() {
        use crate::{hooks::ManualClock, MacaroonSecret};
        let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s"));
        let clock = ManualClock::new(1_000);
        let verifier = Verifier::new(keys.clone()).clock(clock.clone());
        let token = keys
            .mint("@a:b", TokenType::Access)
            .unwrap()
            .nonce("n")
            .expires_at_ms(2_000)
            .to_token();
        let parts = http::Request::new(()).into_parts().0;
        let verify = || {
            verifier
                .verify_allowing_expired(token.as_bytes(), TokenType::Access, &parts)
                .unwrap()
        };
        let first = verify();
        assert!(!first.expired);
        clock.set_ms(2_000);
        let second = verify();
        assert!(second.expired);
        // Answered by the cache: the very same identity.
        assert!(std::ptr::eq(
            first.user.user_id().as_ptr(),
            second.user.user_id().as_ptr()
        ));
        assert_eq!(verifier.cached_tokens(), 1);
    }
}
