//! Authenticate Matrix client-server requests with macaroon access tokens, as a tower layer.
//!
//! [`MatrixAuthLayer`] takes the access token from `Authorization: Bearer` or the
//! `access_token` query parameter, verifies it as a macaroon (the HMAC chain, compared in
//! constant time, and every caveat, failing closed on anything unknown), puts the verified
//! [`MatrixUser`] into the request's extensions and answers everything else with the Matrix JSON
//! error: `401 M_MISSING_TOKEN`, `401 M_UNKNOWN_TOKEN` (with `"soft_logout": true` when the token
//! merely expired) or `403 M_GUEST_ACCESS_FORBIDDEN`.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, TokenType};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("macaroon secret"));
//! let token = keys.mint("@alice:example.org", TokenType::Access).unwrap().nonce("n1").to_token();
//!
//! let service = ServiceBuilder::new()
//!     .layer(MatrixAuthLayer::new(keys))
//!     .service(service_fn(|request: Request<String>| async move {
//!         let user = request.extensions().get::<MatrixUser>().expect("the layer put it there");
//!         Ok::<_, std::convert::Infallible>(Response::new(user.user_id().to_owned()))
//!     }));
//!
//! // Accepted: the inner service sees Alice.
//! let request = Request::get("/_matrix/client/v3/account/whoami")
//!     .header("Authorization", format!("Bearer {token}"))
//!     .body(String::new())?;
//! let response = service.clone().oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//!
//! // Rejected: no token, so the inner service never runs.
//! let request = Request::get("/_matrix/client/v3/account/whoami").body(String::new())?;
//! let response = service.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
//! assert_eq!(&body[..], br#"{"errcode":"M_MISSING_TOKEN","error":"Missing access token."}"#);
//! # Ok(())
//! # }
//! ```
//!
//! The source has one module per concern: `extract` finds the token, `wire` reads the macaroon
//! formats, `verify` computes the chain, `caveat` holds every caveat rule (the whole policy in one
//! file), `identity` is what handlers receive, `error` and `body` are the Matrix error responses,
//! `mint` writes tokens, [`routes`] recognises the Matrix routes that path-dependent rules name,
//! and `layer`, `service` and `future` are the tower plumbing.
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
