//! The life of a session: minting its tokens ([`Issuer`]), reading their nonces
//! ([`TokenNonce`]), and the engine that logs in, refreshes and logs out ([`Sessions`]) over a
//! [`crate::store::TokenStore`].

pub(crate) mod issuer;
pub(crate) mod nonce;
pub(crate) mod sessions;

pub use issuer::{
    IssuedTokens, Issuer, SessionRequest, DEFAULT_LOGIN_TOKEN_LIFETIME,
    DEFAULT_REFRESHABLE_ACCESS_LIFETIME,
};
pub use nonce::{NonceKind, SessionId, TokenNonce};
pub use sessions::{ExchangeError, RefreshEndpoint, RefreshRateLimit, Sessions};
