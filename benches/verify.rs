//! The verification figures of `docs/performance.md` with criterion: our full verification of a Synapse-style
//! token against the chain-only floor (the same RustCrypto HMAC), the `macaroon` crate and
//! `jsonwebtoken`, and the verified-token cache.
//!
//! `cargo bench --bench verify`. Compare ratios within one run, never absolute times; the
//! published figures come from `benches/ratios.rs`, which interleaves the same cases.

mod common;

use std::hint::black_box;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use tower_matrix_auth::{MatrixAuthLayer, TokenType, Verifier};

fn verification(c: &mut Criterion) {
    let keys = keys();
    let token = synapse_token(&keys);
    let root_key = root_key();
    let bare = http::Request::new(()).into_parts().0;
    let header = header_request(&token);
    let query = query_request(&token);
    // Without the cache: every iteration is a full verification.
    let verifier = Verifier::new(keys.clone()).token_cache(0);
    let layer = MatrixAuthLayer::with_verifier(verifier.clone());
    let cached_verifier = Verifier::new(keys.clone());
    let cached_layer = MatrixAuthLayer::new(keys.clone());
    for layer in [&layer, &cached_layer] {
        for parts in [&header, &query] {
            let user = layer.__authenticate(parts).unwrap().unwrap().unwrap();
            assert_eq!(user.user_id(), USER);
        }
    }
    assert!(cached_verifier
        .verify(token.as_bytes(), TokenType::Access, &bare)
        .is_ok());
    assert_eq!(cached_verifier.cached_tokens(), 1);
    assert_eq!(cached_layer.verifier().cached_tokens(), 1);
    let crate_ = MacaroonCrate::new();
    crate_.verify(&token);
    let jwt = Jwt::new();

    let mut group = c.benchmark_group("verify");
    group.bench_function("one_hmac", |b| {
        b.iter(|| hmac(black_box(&root_key), black_box(CAVEATS[1].as_bytes())))
    });
    group.bench_function("chain_floor_6_hmac", |b| b.iter(|| chain_floor(&root_key)));
    group.bench_function("chain_floor_6_hmac_same_impl", |b| {
        b.iter(|| chain_floor_same_hmac(&root_key))
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
    group.bench_function("macaroon_crate", |b| {
        b.iter(|| crate_.verify(black_box(&token)))
    });
    group.bench_function("jsonwebtoken_hs256", |b| {
        b.iter(|| jwt.verify(black_box(&jwt.token)))
    });
    group.bench_function("cache_hit_verify_bytes", |b| {
        b.iter(|| {
            cached_verifier
                .verify(black_box(token.as_bytes()), TokenType::Access, &bare)
                .unwrap()
        })
    });
    group.bench_function("cache_hit_header", |b| {
        b.iter(|| cached_layer.__authenticate(black_box(&header)))
    });
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
