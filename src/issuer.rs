//! Minting the tokens of a session: access, refresh, guest and login tokens, each with a nonce
//! that names its session, its generation and when it was issued.
//!
//! The nonce is the only place for that bookkeeping: the tokens must stay acceptable to Synapse's
//! rules (pymacaroons), which allow `nonce = <anything>` but no new caveat keys.
//!
//! `nonce = <session: 32 hex>.<generation>.<issued ms>.<kind: a|r|l>`
//!
//! A session is one login (one device). Its first access and refresh tokens are generation 0;
//! each refresh mints the next generation. Revocation works on sessions and generations, so a
//! refresh token and the access token issued with it are revoked together.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::clock::{Clock, SystemClock};
use crate::identity::{MatrixUser, TokenType};
use crate::keys::KeyRing;
use crate::wire::Format;

/// One login's identity in the revocation state: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u128);

impl SessionId {
    /// A fresh random session id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).expect("the operating system's random source works");
        Self(u128::from_le_bytes(bytes))
    }

    /// The raw value (e.g. for a database key).
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds an id a store kept.
    pub fn from_u128(value: u128) -> Self {
        Self(value)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({:032x})", self.0)
    }
}

/// What a token minted here is for, as its nonce says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceKind {
    /// An access token (guest or not).
    Access,
    /// A refresh token.
    Refresh,
    /// A single-use login token (`m.login.token`).
    Login,
}

impl NonceKind {
    fn letter(self) -> char {
        match self {
            NonceKind::Access => 'a',
            NonceKind::Refresh => 'r',
            NonceKind::Login => 'l',
        }
    }
}

/// The parsed value of a `nonce` caveat this crate minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenNonce {
    /// The login the token belongs to.
    pub session: SessionId,
    /// 0 for the login's first tokens, one more for each refresh.
    pub generation: u32,
    /// When the token was minted, ms since the epoch.
    pub issued_ms: u64,
    /// What the token is for.
    pub kind: NonceKind,
}

impl TokenNonce {
    /// Reads a nonce value; `None` for nonces minted elsewhere (Synapse's random ones).
    pub fn parse(value: &str) -> Option<Self> {
        // The shortest is `<32 hex>.0.0.a`. Synapse's 16-character nonces stop here, before the
        // split: the revocation check parses the nonce of every request.
        if value.len() < 38 {
            return None;
        }
        let mut parts = value.split('.');
        // Hex digits only: `from_str_radix` also takes a leading `+`, which would give one
        // session a second spelling.
        let session = parts
            .next()
            .filter(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))?;
        let session = SessionId(u128::from_str_radix(session, 16).ok()?);
        let generation = parse_decimal(parts.next()?)?.try_into().ok()?;
        let issued_ms = parse_decimal(parts.next()?)?;
        let kind = match parts.next()? {
            "a" => NonceKind::Access,
            "r" => NonceKind::Refresh,
            "l" => NonceKind::Login,
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            session,
            generation,
            issued_ms,
            kind,
        })
    }

    /// The nonce of a verified token, if this crate minted it.
    pub fn of(user: &MatrixUser) -> Option<Self> {
        user.nonce().and_then(Self::parse)
    }
}

fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for TokenNonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:032x}.{}.{}.{}",
            self.session.0,
            self.generation,
            self.issued_ms,
            self.kind.letter()
        )
    }
}

/// Default lifetime of a login token: two minutes, as Synapse.
pub const DEFAULT_LOGIN_TOKEN_LIFETIME_MS: u64 = 120_000;
/// Default lifetime of an access token that comes with a refresh token: five minutes, as
/// Synapse's `refreshable_access_token_lifetime`.
pub const DEFAULT_REFRESHABLE_ACCESS_LIFETIME_MS: u64 = 300_000;

/// The tokens of one login or one refresh.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedTokens {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when one was asked for.
    pub refresh_token: Option<String>,
    /// How long the access token lives, when it expires.
    pub expires_in_ms: Option<u64>,
    /// The access token's expiry, ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// The refresh token's expiry, ms since the epoch.
    pub refresh_expires_at_ms: Option<u64>,
    /// The session both tokens belong to.
    pub session: SessionId,
    /// Their generation.
    pub generation: u32,
}

impl fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_in_ms", &self.expires_in_ms)
            .field("session", &self.session)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What a new session is for.
#[derive(Debug, Clone, Default)]
pub struct SessionRequest {
    /// The device the tokens are issued to.
    pub device_id: Option<String>,
    /// Whether to issue a refresh token (and so an expiring access token).
    pub refresh: bool,
    /// Whether the user is a guest.
    pub guest: bool,
}

/// Mints tokens with a key ring's minting key.
///
/// Access tokens carry `gen = 1`, `user_id`, `type = access`, `nonce`, then `guest = true`,
/// `device_id` and `time <` when they apply: Synapse's caveats plus `device_id`, so pymacaroons
/// with Synapse's rules (and `device_id` allowed) accepts them.
#[derive(Clone)]
pub struct Issuer {
    keys: KeyRing,
    clock: Arc<dyn Clock>,
    /// User id → that user's tokens are stamped no earlier than this (ms since the epoch): the
    /// millisecond after their last "log out everywhere", kept only until the clock passes it.
    /// Shared by clones.
    floors: Arc<Mutex<HashMap<String, u64>>>,
    location: Option<String>,
    access_lifetime_ms: Option<u64>,
    refreshable_access_lifetime_ms: u64,
    refresh_lifetime_ms: Option<u64>,
    login_lifetime_ms: u64,
    format: Format,
}

impl Issuer {
    /// An issuer with the system clock: access tokens without refresh never expire (as
    /// Synapse's default), refreshable ones live five minutes, refresh tokens do not expire, login
    /// tokens live two minutes; V1 base64url without padding.
    pub fn new(keys: KeyRing) -> Self {
        assert!(
            !keys.is_empty(),
            "an Issuer needs a key ring with a minting key"
        );
        Self {
            keys,
            clock: Arc::new(SystemClock),
            floors: Arc::default(),
            location: None,
            access_lifetime_ms: None,
            refreshable_access_lifetime_ms: DEFAULT_REFRESHABLE_ACCESS_LIFETIME_MS,
            refresh_lifetime_ms: None,
            login_lifetime_ms: DEFAULT_LOGIN_TOKEN_LIFETIME_MS,
            format: Format::V1,
        }
    }

    /// Replaces the clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Shares a clock with a verifier or layer.
    pub fn shared_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The location written into tokens (Synapse wrote the server name; it is not signed).
    pub fn location(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }

    /// Lifetime of access tokens issued without a refresh token (default: none).
    pub fn access_lifetime_ms(mut self, lifetime: Option<u64>) -> Self {
        self.access_lifetime_ms = lifetime;
        self
    }

    /// Lifetime of access tokens issued with a refresh token (default: five minutes).
    pub fn refreshable_access_lifetime_ms(mut self, lifetime: u64) -> Self {
        self.refreshable_access_lifetime_ms = lifetime;
        self
    }

    /// Lifetime of refresh tokens (default: none).
    pub fn refresh_lifetime_ms(mut self, lifetime: Option<u64>) -> Self {
        self.refresh_lifetime_ms = lifetime;
        self
    }

    /// Lifetime of login tokens (default: two minutes).
    pub fn login_lifetime_ms(mut self, lifetime: u64) -> Self {
        self.login_lifetime_ms = lifetime;
        self
    }

    /// The serialization of minted tokens (default V1, as Synapse).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// The key ring.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The current time as the issuer sees it.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The instant written into tokens minted now for `user_id`: the clock, but never before the
    /// floor a "log out everywhere" of theirs set ([`Issuer::stamp_after`]).
    pub(crate) fn stamp_ms(&self, user_id: &str) -> u64 {
        let now = self.clock.now_ms();
        let floors = self.floors.lock().unwrap_or_else(PoisonError::into_inner);
        match floors.get(user_id) {
            Some(&floor) => now.max(floor),
            None => now,
        }
    }

    /// Stamps the tokens of `user_id` minted from now on (by this issuer and its clones) after
    /// `instant_ms`, even within the same millisecond of the clock: "log out everywhere" revokes
    /// the tokens minted up to `instant_ms` inclusive and must not catch a login right after it.
    pub(crate) fn stamp_after(&self, user_id: &str, instant_ms: u64) {
        let now = self.clock.now_ms();
        let mut floors = self.floors.lock().unwrap_or_else(PoisonError::into_inner);
        // Floors the clock has passed mean nothing any more: the map holds only the users who
        // logged out everywhere within the last millisecond or so.
        floors.retain(|_, floor| *floor > now);
        let floor = floors.entry(user_id.to_owned()).or_insert(0);
        *floor = (*floor).max(instant_ms.saturating_add(1));
    }

    /// The longest any token minted here can live, `None` if some never expire.
    pub fn max_lifetime_ms(&self) -> Option<u64> {
        let refresh = self.refresh_lifetime_ms?;
        let access = self.access_lifetime_ms?;
        Some(
            refresh
                .max(access)
                .max(self.refreshable_access_lifetime_ms)
                .max(self.login_lifetime_ms),
        )
    }

    /// The longest an access or refresh token (the tokens of a session) can live, `None` if some
    /// never expire. Login tokens are sessions of their own, so they do not count: the state of a
    /// logged-out session is kept this long, not two minutes longer.
    pub(crate) fn session_lifetime_ms(&self) -> Option<u64> {
        let refresh = self.refresh_lifetime_ms?;
        let access = self.access_lifetime_ms?;
        Some(refresh.max(access).max(self.refreshable_access_lifetime_ms))
    }

    fn mint(
        &self,
        user_id: &str,
        token_type: TokenType,
        nonce: TokenNonce,
        guest: bool,
        device_id: Option<&str>,
        expires_at_ms: Option<u64>,
    ) -> String {
        let mut builder = self
            .keys
            .mint(user_id, token_type)
            .expect("checked in Issuer::new")
            .nonce(nonce.to_string());
        if let Some(location) = &self.location {
            builder = builder.location(location.clone());
        }
        if guest {
            builder = builder.guest();
        }
        if let Some(device_id) = device_id {
            builder = builder.device_id(device_id);
        }
        if let Some(at) = expires_at_ms {
            builder = builder.expires_at_ms(at);
        }
        builder.serialize(self.format)
    }

    /// Mints the tokens of one generation of a session.
    fn generation(
        &self,
        user_id: &str,
        session: SessionId,
        generation: u32,
        request: &SessionRequest,
    ) -> IssuedTokens {
        let now = self.stamp_ms(user_id);
        let access_lifetime = if request.refresh {
            Some(self.refreshable_access_lifetime_ms)
        } else {
            self.access_lifetime_ms
        };
        let expires_at_ms = access_lifetime.map(|l| now.saturating_add(l));
        let device_id = request.device_id.as_deref();
        let nonce = |kind| TokenNonce {
            session,
            generation,
            issued_ms: now,
            kind,
        };
        let access_token = self.mint(
            user_id,
            TokenType::Access,
            nonce(NonceKind::Access),
            request.guest,
            device_id,
            expires_at_ms,
        );
        let refresh_expires_at_ms = self.refresh_lifetime_ms.map(|l| now.saturating_add(l));
        let refresh_token = request.refresh.then(|| {
            self.mint(
                user_id,
                TokenType::Refresh,
                nonce(NonceKind::Refresh),
                request.guest,
                device_id,
                refresh_expires_at_ms,
            )
        });
        IssuedTokens {
            access_token,
            refresh_token,
            expires_in_ms: access_lifetime,
            expires_at_ms,
            refresh_expires_at_ms: refresh_expires_at_ms.filter(|_| request.refresh),
            session,
            generation,
        }
    }

    /// Mints the first tokens of a new session (a login or a registration).
    pub fn new_session(&self, user_id: &str, request: &SessionRequest) -> IssuedTokens {
        self.generation(user_id, SessionId::random(), 0, request)
    }

    /// Mints the next generation for the session of a verified refresh token.
    pub(crate) fn successor(
        &self,
        refresh: &MatrixUser,
        session: SessionId,
        generation: u32,
    ) -> IssuedTokens {
        let request = SessionRequest {
            device_id: refresh.device_id().map(str::to_owned),
            refresh: true,
            guest: refresh.is_guest(),
        };
        self.generation(refresh.user_id(), session, generation, &request)
    }

    /// Mints a single-use login token (`m.login.token`) for `user_id`.
    pub fn login_token(&self, user_id: &str) -> (String, u64) {
        let now = self.stamp_ms(user_id);
        let expires_at = now.saturating_add(self.login_lifetime_ms);
        let nonce = TokenNonce {
            session: SessionId::random(),
            generation: 0,
            issued_ms: now,
            kind: NonceKind::Login,
        };
        let token = self.mint(
            user_id,
            TokenType::Login,
            nonce,
            false,
            None,
            Some(expires_at),
        );
        (token, self.login_lifetime_ms)
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("keys", &self.keys)
            .field("access_lifetime_ms", &self.access_lifetime_ms)
            .field(
                "refreshable_access_lifetime_ms",
                &self.refreshable_access_lifetime_ms,
            )
            .field("refresh_lifetime_ms", &self.refresh_lifetime_ms)
            .field("login_lifetime_ms", &self.login_lifetime_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_round_trip_and_strictness() {
        let nonce = TokenNonce {
            session: SessionId(0xabc),
            generation: 7,
            issued_ms: 1_700_000_000_000,
            kind: NonceKind::Refresh,
        };
        let text = nonce.to_string();
        assert_eq!(text, "00000000000000000000000000000abc.7.1700000000000.r");
        assert_eq!(TokenNonce::parse(&text), Some(nonce));
        // The shortest nonce there is parses; the length check before the split is exact.
        let shortest = TokenNonce {
            session: SessionId(0),
            generation: 0,
            issued_ms: 0,
            kind: NonceKind::Access,
        };
        assert_eq!(shortest.to_string().len(), 38);
        assert_eq!(TokenNonce::parse(&shortest.to_string()), Some(shortest));
        for bad in [
            "0000000000000000000000000000000.0.0.a",
            "kZ3pQx9LwT2mVbRc",
            "00000000000000000000000000000abc.7.1700000000000",
            "00000000000000000000000000000abc.7.1700000000000.x",
            "00000000000000000000000000000abc.7.1700000000000.r.extra",
            "0000000000000000000000000000abc.7.1700000000000.r",
            "00000000000000000000000000000abc.+7.1700000000000.r",
            "+0000000000000000000000000000abc.7.1700000000000.r",
            "00000000000000000000000000000abc.99999999999.1700000000000.r",
        ] {
            assert_eq!(TokenNonce::parse(bad), None, "{bad}");
        }
    }
}
