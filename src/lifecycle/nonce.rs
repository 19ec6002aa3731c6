//! The session nonce: what every token the issuer mints records about its session.
//!
//! The nonce is the only place for that bookkeeping: the tokens must stay acceptable to Synapse's
//! rules (pymacaroons), which allow `nonce = <anything>` but no new caveat keys.
//!
//! `nonce = <session: 32 hex>.<generation>.<issued ms>.<kind: a|r|l>.<session start ms>.<epoch>.<session expiry ms or ->`
//!
//! The issuer writes it as the token's **first** caveat. A holder of a token can only append
//! caveats, so a nonce in first place was written by someone holding the key: a holder of a token
//! minted without such a nonce cannot graft one on to reach another session's state. A nonce in
//! any other place is the token's own (a [`crate::TokenId`]), never a session's.
//!
//! A session is one login (one device). Its first access and refresh tokens are generation 0;
//! each refresh mints the next generation. Revocation works on sessions and generations, so a
//! refresh token and the access token issued with it are revoked together.
//!
//! * The *epoch* is the user's "log out everywhere" floor when the session began (0 if they never
//!   did): every generation carries it, so a later log-out-everywhere revokes the whole session,
//!   whatever refresh was in flight and whichever process minted it, with no clock comparison.
//! * The *session expiry* is the latest `time <` of any token of the session minted up to this
//!   generation (`-` when one of them never expires): the store keeps a logged-out session's
//!   state until then, plus the clock leeway, and not a moment less.

use std::fmt;

use crate::identity::{MatrixUser, TokenType};

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
    /// When the session began: the `issued_ms` of its generation 0.
    pub started_ms: u64,
    /// The user's "log out everywhere" floor when the session began: a floor above it revokes
    /// every generation of the session.
    pub epoch: u64,
    /// The latest expiry of any token of the session up to this generation, ms since the epoch;
    /// `None` when one of them never expires.
    pub session_expires_ms: Option<u64>,
}

impl TokenNonce {
    /// Reads a nonce value; `None` for nonces minted elsewhere (Synapse's random ones, or this
    /// crate's before the session fields were added).
    pub fn parse(value: &str) -> Option<Self> {
        // The shortest is `<32 hex>.0.0.a.0.0.-`. Synapse's 16-character nonces stop here, before
        // the split: the revocation check parses the nonce of every request.
        if value.len() < 44 {
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
        let started_ms = parse_decimal(parts.next()?)?;
        let epoch = parse_decimal(parts.next()?)?;
        let session_expires_ms = match parts.next()? {
            "-" => None,
            text => Some(parse_decimal(text)?),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            session,
            generation,
            issued_ms,
            kind,
            started_ms,
            epoch,
            session_expires_ms,
        })
    }

    /// The session nonce of a verified token: a nonce in this crate's shape written as the
    /// token's first caveat, where only the minter can write. `None` otherwise, also for a
    /// session nonce that a holder appended to a token minted without one.
    pub fn of(user: &MatrixUser) -> Option<Self> {
        if !user.nonce_is_minters() {
            return None;
        }
        user.nonce().and_then(Self::parse)
    }

    /// Whether the nonce's kind is the token's type: an access nonce on a refresh token (or any
    /// other mix) is refused.
    pub fn matches(&self, token_type: TokenType) -> bool {
        matches!(
            (self.kind, token_type),
            (NonceKind::Access, TokenType::Access)
                | (NonceKind::Refresh, TokenType::Refresh)
                | (NonceKind::Login, TokenType::Login)
        )
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
            "{:032x}.{}.{}.{}.{}.{}.",
            self.session.0,
            self.generation,
            self.issued_ms,
            self.kind.letter(),
            self.started_ms,
            self.epoch,
        )?;
        match self.session_expires_ms {
            Some(at) => write!(f, "{at}"),
            None => f.write_str("-"),
        }
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
            started_ms: 1_600_000_000_000,
            epoch: 42,
            session_expires_ms: Some(1_800_000_000_000),
        };
        let text = nonce.to_string();
        assert_eq!(
            text,
            "00000000000000000000000000000abc.7.1700000000000.r.1600000000000.42.1800000000000"
        );
        assert_eq!(TokenNonce::parse(&text), Some(nonce));
        let never = TokenNonce {
            session_expires_ms: None,
            ..nonce
        };
        assert!(never.to_string().ends_with(".42.-"));
        assert_eq!(TokenNonce::parse(&never.to_string()), Some(never));
        // The shortest nonce there is parses; the length check before the split is exact.
        let shortest = TokenNonce {
            session: SessionId(0),
            generation: 0,
            issued_ms: 0,
            kind: NonceKind::Access,
            started_ms: 0,
            epoch: 0,
            session_expires_ms: None,
        };
        assert_eq!(shortest.to_string().len(), 44);
        assert_eq!(TokenNonce::parse(&shortest.to_string()), Some(shortest));
        let body = "00000000000000000000000000000abc.7.1700000000000";
        for bad in [
            "0000000000000000000000000000000.0.0.a.0.0.-".to_owned(),
            "kZ3pQx9LwT2mVbRc".to_owned(),
            // The four-field nonces of earlier versions are not session nonces.
            format!("{body}.r"),
            format!("{body}.x.1.2.-"),
            format!("{body}.r.1.2.-.extra"),
            format!("{body}.r.1.2"),
            format!("{body}.r.1.+2.-"),
            format!("{body}.r.1.2.+3"),
            "0000000000000000000000000000abc.7.1700000000000.r.1.2.-".to_owned(),
            "00000000000000000000000000000abc.+7.1700000000000.r.1.2.-".to_owned(),
            "+0000000000000000000000000000abc.7.1700000000000.r.1.2.-".to_owned(),
            "00000000000000000000000000000abc.99999999999.1700000000000.r.1.2.-".to_owned(),
        ] {
            assert_eq!(TokenNonce::parse(&bad), None, "{bad}");
        }
    }
}
