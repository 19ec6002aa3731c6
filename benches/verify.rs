//! The verification group of issue 4: our full verification of a Synapse-style token against
//! the chain-only floor (the same RustCrypto HMAC), the `macaroon` crate and `jsonwebtoken`.
//!
//! Run with `cargo bench --bench verify`. Compare ratios within one run, never absolute times.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer, TokenType, Verifier};

const SECRET: &str = "bench macaroon secret";
/// 2100-01-01: 13 digits like a real `time <` caveat, and never expires during a run.
const EXPIRES_AT_MS: u64 = 4_102_444_800_000;
const CAVEATS: [&str; 5] = [
    "gen = 1",
    "user_id = @alice:example.org",
    "type = access",
    "nonce = abcdefgh12345678",
    "time < 4102444800000",
];

fn keys() -> KeyRing {
    KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET))
}

/// The Synapse shape: location, identifier `key`, five caveats, V1, base64url: 304 characters.
fn synapse_token(keys: &KeyRing) -> String {
    let token = keys
        .mint("@alice:example.org", TokenType::Access)
        .unwrap()
        .location("example.org")
        .nonce("abcdefgh12345678")
        .expires_at_ms(EXPIRES_AT_MS)
        .to_token();
    assert_eq!(token.len(), 304);
    token
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn verification(c: &mut Criterion) {
    let keys = keys();
    let token = synapse_token(&keys);
    let root_key: [u8; 32] = hmac(b"macaroons-key-generator", SECRET.as_bytes());
    let bare = http::Request::new(()).into_parts().0;
    let header = http::Request::get("/_matrix/client/v3/account/whoami")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let query = http::Request::get(format!(
        "/_matrix/client/v3/account/whoami?access_token={token}"
    ))
    .body(())
    .unwrap()
    .into_parts()
    .0;
    // Without the cache: every iteration is a full verification.
    let verifier = Verifier::new(keys.clone()).token_cache(0);
    let layer = MatrixAuthLayer::with_verifier(verifier.clone());
    let cached_verifier = Verifier::new(keys.clone());
    let cached_layer = MatrixAuthLayer::new(keys.clone());
    for layer in [&layer, &cached_layer] {
        for parts in [&header, &query] {
            let user = layer.__authenticate(parts).unwrap().unwrap().unwrap();
            assert_eq!(user.user_id(), "@alice:example.org");
        }
    }
    assert!(cached_verifier
        .verify(token.as_bytes(), TokenType::Access, &bare)
        .is_ok());
    assert_eq!(cached_verifier.cached_tokens(), 1);
    assert_eq!(cached_layer.verifier().cached_tokens(), 1);

    let mut group = c.benchmark_group("verify");
    group.bench_function("one_hmac", |b| {
        b.iter(|| hmac(black_box(&root_key), black_box(CAVEATS[1].as_bytes())))
    });
    group.bench_function("chain_floor_6_hmac", |b| {
        b.iter(|| {
            let mut sig = hmac(black_box(&root_key), black_box(b"key"));
            for caveat in black_box(&CAVEATS) {
                sig = hmac(&sig, caveat.as_bytes());
            }
            sig
        })
    });
    // Extraction from the header, decoding, parsing, the chain, the caveats, the identity.
    group.bench_function("ours_header", |b| {
        b.iter(|| layer.__authenticate(black_box(&header)))
    });
    group.bench_function("ours_query", |b| {
        b.iter(|| layer.__authenticate(black_box(&query)))
    });
    group.bench_function("ours_verify_bytes", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(token.as_bytes()), TokenType::Access, &bare)
                .unwrap()
        })
    });
    group.bench_function("cache_hit_header", |b| {
        b.iter(|| cached_layer.__authenticate(black_box(&header)))
    });
    group.bench_function("cache_hit_verify_bytes", |b| {
        b.iter(|| {
            cached_verifier
                .verify(black_box(token.as_bytes()), TokenType::Access, &bare)
                .unwrap()
        })
    });

    let key = macaroon::MacaroonKey::generate(SECRET.as_bytes());
    let mut theirs = macaroon::Verifier::default();
    theirs.satisfy_exact("gen = 1".into());
    theirs.satisfy_exact("user_id = @alice:example.org".into());
    theirs.satisfy_exact("type = access".into());
    theirs.satisfy_general(|c| c.0.starts_with(b"nonce = "));
    theirs.satisfy_general(|c| {
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
    macaroon::initialize().unwrap();
    let m = macaroon::Macaroon::deserialize(&token).unwrap();
    theirs.verify(&m, &key, vec![]).unwrap();
    group.bench_function("macaroon_crate", |b| {
        b.iter(|| {
            let m = macaroon::Macaroon::deserialize(black_box(&token)).unwrap();
            theirs.verify(&m, &key, vec![]).unwrap();
        })
    });

    let claims = serde_json::json!({
        "sub": "@alice:example.org",
        "gen": 1,
        "typ": "access",
        "nonce": "abcdefgh12345678",
        "exp": EXPIRES_AT_MS / 1000,
        "iss": "example.org",
    });
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let decoding_key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["example.org"]);
    validation.set_required_spec_claims(&["exp", "sub", "iss"]);
    type JwtClaims = serde_json::Map<String, serde_json::Value>;
    jsonwebtoken::decode::<JwtClaims>(&jwt, &decoding_key, &validation).unwrap();
    group.bench_function("jsonwebtoken_hs256", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<JwtClaims>(black_box(&jwt), &decoding_key, &validation).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
