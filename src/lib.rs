#![doc = include_str!("../docs/crate.md")]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations, rust_2018_idioms)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
mod axum;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
mod identity;
mod json;
pub mod layer;
pub mod lifecycle;
pub mod macaroon;
pub mod routes;
#[cfg(feature = "ruma")]
mod ruma;
pub mod store;

pub use error::Rejection;
pub use hooks::{
    AccountState, AccountStates, AccountStatus, Clock, ManualClock, NeverRevoked, ResolveFuture,
    ResolvedToken, Revocation, RevocationCheck, RevocationError, RevocationStatus, StaticTokens,
    SystemClock, TokenResolver,
};
#[cfg(feature = "appservice")]
pub use hooks::{AppService, AppServices, InvalidRegistration};
pub use identity::{Credential, MatrixUser, TokenId, TokenType};
pub use layer::{
    GuestPolicy, MatrixAuth, MatrixAuthLayer, QueryToken, ResponseBody, ResponseFuture,
};
pub use lifecycle::{
    ExchangeError, IssuedTokens, Issuer, NonceKind, RateLimit, RefreshEndpoint, SessionId,
    SessionRequest, Sessions, TokenNonce, DEFAULT_LOGIN_TOKEN_LIFETIME_MS,
    DEFAULT_REFRESHABLE_ACCESS_LIFETIME_MS,
};
pub use macaroon::{
    attenuate, is_valid_user_id, Caveat, EmptySecret, Format, KeyRing, MacaroonSecret,
    TokenBuilder, Verifier, DEFAULT_MAX_CAVEATS, DEFAULT_MAX_TOKEN_LEN, DEFAULT_TOKEN_CACHE,
    RECOMMENDED_SECRET_LEN,
};
pub use routes::{is_logout_route, is_normal_path, is_whoami_route};
#[cfg(feature = "postgres")]
pub use store::postgres::{PostgresOptions, PostgresStore};
pub use store::{memory::MemoryStore, RefreshMode, TokenStore};

#[cfg(feature = "axum")]
pub use crate::axum::{AppServiceRejection, AppServiceRequest, MissingMatrixUser};

/// Not a public API: the chain's HMAC-SHA256 with a 32-byte key, so that `benches/` can measure
/// the chain floor with the very implementation the verifier uses.
#[doc(hidden)]
pub fn __hmac_sha256_32(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    macaroon::hmac_sha256::hmac32(key, message)
}

/// A layer configured and then dropped is a compile-time warning, not a silent no-op:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer};
/// let layer = MatrixAuthLayer::new(KeyRing::new().with_key("k", MacaroonSecret::from_passphrase("s")));
/// layer.clone().skip_path("/x"); // the rule would be lost
/// ```
///
/// ```
/// #![deny(unused_must_use)]
/// use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer};
/// let layer = MatrixAuthLayer::new(KeyRing::new().with_key("k", MacaroonSecret::from_passphrase("s")));
/// let layer = layer.skip_path("/x");
/// # drop(layer);
/// ```
#[cfg(doctest)]
pub struct MustUseBuilders;

/// The README's code blocks, compiled and run as doctests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
