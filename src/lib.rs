#![doc = include_str!("../docs/crate.md")]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations, rust_2018_idioms)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod axum;
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

pub use crate::error::Rejection;
pub use crate::identity::{Credential, MatrixUser, Scopes, TokenId, TokenType};
pub use crate::layer::{MatrixAuth, MatrixAuthLayer};
pub use crate::lifecycle::{Issuer, Sessions};
pub use crate::macaroon::{KeyRing, MacaroonSecret, Verifier};
pub use crate::store::MemoryStore;
#[cfg(feature = "postgres")]
pub use crate::store::PostgresStore;

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
