//! The token side: macaroons from the root key to the verdict, with no HTTP plumbing.
//!
//! | File | What it holds |
//! |---|---|
//! | `keys.rs` | root keys, derived the libmacaroons way, and the key ring that rotates them |
//! | `hmac_sha256.rs` | the chain's HMAC-SHA256 (see `docs/performance.md` for why it is ours) |
//! | `wire/` | the wire formats, one file each: `v1.rs`, `v2.rs`, `json.rs` (V2JSON), `serialize.rs` |
//! | `caveat.rs` | **the caveat rules**: every caveat key, what it means, how it fails |
//! | `verify.rs` | the [`Verifier`]: limits, decoding, chain, constant-time compare, caveats |
//! | `cache.rs` | the verified-token cache |
//! | `mint.rs` | minting and attenuating tokens |
//! | `ct.rs` | constant-time equality for credentials |

mod cache;
pub(crate) mod caveat;
pub(crate) mod ct;
#[cfg(test)]
mod differential_tests;
pub(crate) mod hmac_sha256;
pub(crate) mod keys;
pub(crate) mod mint;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod v2json_dialect;
pub(crate) mod verify;
pub(crate) mod wire;

pub use caveat::{is_valid_user_id, Caveat};
pub use keys::{EmptySecret, KeyRing, MacaroonSecret, RECOMMENDED_SECRET_LEN};
pub use mint::{attenuate, TokenBuilder};
pub use verify::{Verifier, DEFAULT_MAX_CAVEATS, DEFAULT_MAX_TOKEN_LEN, DEFAULT_TOKEN_CACHE};
pub use wire::MacaroonFormat;
