//! What the benches share: the Synapse-style token of `docs/performance.md` (5 caveats, V1), the
//! implementations it is compared with, and a toy revocation store.
#![allow(dead_code)]

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::RwLock;

use hmac::{Hmac, Mac};
use http::request::Parts;
use sha2::Sha256;
use tower_matrix_auth::{
    hooks::{Revocation, RevocationCheck, RevocationStatus},
    KeyRing, MacaroonSecret, MatrixUser, TokenId, TokenType,
};

pub const SECRET: &str = "bench macaroon secret";
pub const USER: &str = "@alice:example.org";
/// 2100-01-01: 13 digits like a real `time <` caveat, and never expires during a run.
pub const EXPIRES_AT_MS: u64 = 4_102_444_800_000;
pub const CAVEATS: [&str; 5] = [
    "gen = 1",
    "user_id = @alice:example.org",
    "type = access",
    "nonce = abcdefgh12345678",
    "time < 4102444800000",
];

pub fn keys() -> KeyRing {
    KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET))
}

/// The Synapse shape: location, identifier `key`, the five caveats above, V1, base64url without
/// padding: 304 characters.
pub fn synapse_token(keys: &KeyRing) -> String {
    let token = keys
        .mint(USER, TokenType::Access)
        .unwrap()
        .location("example.org")
        .nonce("abcdefgh12345678")
        .expires_at_ms(EXPIRES_AT_MS)
        .to_token();
    assert_eq!(token.len(), 304);
    token
}

/// One HMAC-SHA256 with RustCrypto `hmac` + `sha2`, the way anyone would write it.
pub fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The root key `SECRET` derives to (libmacaroons' derivation).
pub fn root_key() -> [u8; 32] {
    hmac(b"macaroons-key-generator", SECRET.as_bytes())
}

/// The floor: the token's whole chain, 6 HMACs (identifier, then each caveat), nothing else.
pub fn chain_floor(root_key: &[u8; 32]) -> [u8; 32] {
    let mut signature = hmac(black_box(root_key), black_box(b"key"));
    for caveat in black_box(&CAVEATS) {
        signature = hmac(&signature, caveat.as_bytes());
    }
    signature
}

/// The floor with the `hmac` crate as a verifier would use it at its best: the root key's keyed
/// state built once and cloned for the first link (the verifier precomputes that link too); every
/// later link is keyed by the previous signature, so it needs a keyed state of its own.
pub fn chain_floor_keyed_clone(root_keyed: &Hmac<Sha256>) -> [u8; 32] {
    let mut first = root_keyed.clone();
    first.update(black_box(b"key"));
    let mut signature: [u8; 32] = first.finalize().into_bytes().into();
    for caveat in black_box(&CAVEATS) {
        signature = hmac(&signature, caveat.as_bytes());
    }
    signature
}

/// The same floor with the HMAC the verifier itself uses (written on SHA-256's compression
/// function, see `src/hmac_sha256.rs`): the floor "with the same HMAC implementation".
pub fn chain_floor_same_hmac(root_key: &[u8; 32]) -> [u8; 32] {
    let mut signature = tower_matrix_auth::__hmac_sha256_32(black_box(root_key), black_box(b"key"));
    for caveat in black_box(&CAVEATS) {
        signature = tower_matrix_auth::__hmac_sha256_32(&signature, caveat.as_bytes());
    }
    signature
}

fn parts(request: http::request::Builder) -> Parts {
    request.body(()).unwrap().into_parts().0
}

/// `GET whoami` with `Authorization: Bearer <token>`.
pub fn header_request(token: &str) -> Parts {
    parts(
        http::Request::get("/_matrix/client/v3/account/whoami")
            .header("authorization", format!("Bearer {token}")),
    )
}

/// `GET whoami?access_token=<token>`.
pub fn query_request(token: &str) -> Parts {
    parts(http::Request::get(format!(
        "/_matrix/client/v3/account/whoami?access_token={token}"
    )))
}

/// The `macaroon` crate 0.3 with a verifier for the same caveats: deserialize + verify.
pub struct MacaroonCrate {
    key: macaroon::MacaroonKey,
    verifier: macaroon::Verifier,
}

impl MacaroonCrate {
    pub fn new() -> Self {
        macaroon::initialize().unwrap();
        let mut verifier = macaroon::Verifier::default();
        verifier.satisfy_exact("gen = 1".into());
        verifier.satisfy_exact("user_id = @alice:example.org".into());
        verifier.satisfy_exact("type = access".into());
        verifier.satisfy_general(|c| c.0.starts_with(b"nonce = "));
        verifier.satisfy_general(|c| {
            let Some(at) = c.0.strip_prefix(b"time < ") else {
                return false;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            std::str::from_utf8(at)
                .ok()
                .and_then(|at| at.parse::<u64>().ok())
                .is_some_and(|at| now < at)
        });
        Self {
            key: macaroon::MacaroonKey::generate(SECRET.as_bytes()),
            verifier,
        }
    }

    pub fn verify(&self, token: &str) {
        let m = macaroon::Macaroon::deserialize(token).unwrap();
        self.verifier.verify(&m, &self.key, vec![]).unwrap();
    }
}

/// `jsonwebtoken` 9 HS256 with comparable claims: decode + validate (signature, `exp`, `iss`).
///
/// The claims decode into a `serde_json::Map` because this crate has no `serde` derive at hand;
/// a derived struct would save jsonwebtoken a few small allocations.
pub struct Jwt {
    pub token: String,
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

pub type JwtClaims = serde_json::Map<String, serde_json::Value>;

impl Jwt {
    pub fn new() -> Self {
        let claims = serde_json::json!({
            "sub": USER,
            "gen": 1,
            "typ": "access",
            "nonce": "abcdefgh12345678",
            "exp": EXPIRES_AT_MS / 1000,
            "iss": "example.org",
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["example.org"]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        let jwt = Self {
            token,
            key: jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
            validation,
        };
        jwt.verify(&jwt.token);
        jwt
    }

    pub fn verify(&self, token: &str) -> JwtClaims {
        jsonwebtoken::decode::<JwtClaims>(token, &self.key, &self.validation)
            .unwrap()
            .claims
    }
}

/// The simplest in-memory revocation store: a set of revoked token ids behind a lock, holding
/// `revoked` ids none of which is the benchmarked token's.
pub struct HashSetStore(RwLock<HashSet<TokenId>>);

impl HashSetStore {
    pub fn with_revoked(revoked: usize) -> Self {
        let ids = (0..revoked as u128).map(|i| TokenId::from_bytes(i.to_le_bytes()));
        Self(RwLock::new(ids.collect()))
    }
}

impl Revocation for HashSetStore {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        let revoked = self.0.read().unwrap().contains(&user.token_id());
        RevocationCheck::ready(Ok(if revoked {
            RevocationStatus::Revoked
        } else {
            RevocationStatus::Active
        }))
    }
}
