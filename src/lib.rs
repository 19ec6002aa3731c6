#![doc = include_str!("../docs/crate.md")]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations, rust_2018_idioms)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod account;
#[cfg(feature = "appservice")]
mod appservice;
mod body;
mod cache;
mod caveat;
mod clock;
mod ct;
#[cfg(test)]
mod differential_tests;
mod error;
mod extract;
mod future;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod hmac_sha256;
mod identity;
mod issuer;
mod json;
mod keys;
mod layer;
mod mint;
mod resolver;
mod revocation;
pub mod routes;
#[cfg(feature = "ruma")]
mod ruma;
mod service;
mod sessions;
pub mod store;
#[cfg(any(test, feature = "fuzzing"))]
mod v2json_dialect;
mod verify;
mod wire;

#[cfg(feature = "axum")]
mod axum;

pub use account::{AccountState, AccountStates, AccountStatus};
#[cfg(feature = "appservice")]
pub use appservice::{AppService, AppServices, InvalidRegistration};
pub use body::ResponseBody;
pub use caveat::{is_valid_user_id, Caveat};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::Rejection;
pub use future::ResponseFuture;
pub use identity::{Credential, MatrixUser, TokenId, TokenType};
pub use issuer::{
    IssuedTokens, Issuer, NonceKind, SessionId, SessionRequest, TokenNonce,
    DEFAULT_LOGIN_TOKEN_LIFETIME_MS, DEFAULT_REFRESHABLE_ACCESS_LIFETIME_MS,
};
pub use keys::{EmptySecret, KeyRing, MacaroonSecret, RECOMMENDED_SECRET_LEN};
pub use layer::{GuestPolicy, MatrixAuthLayer, QueryToken};
pub use mint::{attenuate, TokenBuilder};
pub use resolver::{ResolveFuture, ResolvedToken, StaticTokens, TokenResolver};
pub use revocation::{
    NeverRevoked, Revocation, RevocationCheck, RevocationError, RevocationStatus,
};
pub use routes::{is_logout_route, is_normal_path, is_whoami_route};
pub use service::MatrixAuth;
pub use sessions::{ExchangeError, RateLimit, RefreshEndpoint, Sessions};
#[cfg(feature = "postgres")]
pub use store::postgres::{PostgresOptions, PostgresStore};
pub use store::{memory::MemoryStore, RefreshMode, TokenStore};
pub use verify::{Verifier, DEFAULT_MAX_CAVEATS, DEFAULT_MAX_TOKEN_LEN, DEFAULT_TOKEN_CACHE};
pub use wire::Format;

#[cfg(feature = "axum")]
pub use crate::axum::{AppServiceRejection, AppServiceRequest, MissingMatrixUser};

/// Not a public API: the chain's HMAC-SHA256 with a 32-byte key, so that `benches/` can measure
/// the chain floor with the very implementation the verifier uses.
#[doc(hidden)]
pub fn __hmac_sha256_32(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    hmac_sha256::hmac32(key, message)
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
