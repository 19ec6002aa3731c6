//! The verified-token cache from the outside: a repeat is answered from the cache with the same
//! identity, yet expiry and revocation still apply, the cache stays bounded, and no token that
//! is not the cached one, byte for byte, gets its identity.
//!
//! A hit hands out a clone of the cached identity, which shares its text; a full verification
//! builds a new one. So `same_allocation` tells a hit from a miss without any timing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::common::*;
use base64::Engine as _;
use http::StatusCode;
use tower_matrix_auth::{
    hooks::{ManualClock, Revocation, RevocationCheck, RevocationStatus},
    macaroon::attenuate,
    MatrixAuthLayer, MatrixUser, TokenId, TokenType, Verifier,
};

fn verifier() -> Verifier {
    Verifier::new(keys()).clock(ManualClock::new(NOW_MS))
}

fn parts() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

fn same_allocation(a: &MatrixUser, b: &MatrixUser) -> bool {
    std::ptr::eq(a.user_id().as_ptr(), b.user_id().as_ptr())
}

#[test]
fn a_hit_returns_the_same_identity() {
    let verifier = verifier();
    let token = mint_raw(&[
        "gen = 1",
        "user_id = @alice:example.org",
        "type = access",
        "nonce = abcdefgh12345678",
        "device_id = PHONE",
        &format!("time < {}", NOW_MS + 60_000),
    ]);
    assert_eq!(verifier.cached_tokens(), 0);
    let first = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(verifier.cached_tokens(), 1);
    let second = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert!(same_allocation(&first, &second), "the repeat was a hit");
    assert_eq!(first, second);
    assert_eq!(second.user_id(), ALICE);
    assert_eq!(second.device_id(), Some("PHONE"));
    assert_eq!(second.nonce(), Some("abcdefgh12345678"));
    assert_eq!(second.expires_at_ms(), Some(NOW_MS + 60_000));
    assert_eq!(first.token_id(), second.token_id());
    assert_eq!(verifier.cached_tokens(), 1);

    // Clones of the verifier share the cache.
    let clone = verifier.clone();
    let third = clone
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert!(same_allocation(&first, &third));
}

#[tokio::test]
async fn a_hit_through_the_layer_gives_the_inner_service_the_same_user() {
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
    let token = access_token(&[]);
    let first = call(&layer, bearer("/x", &token)).await;
    let second = call(&layer, bearer("/x", &token)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json, second.json);
    assert_eq!(layer.verifier().cached_tokens(), 1);
    // The query parameter is the same token, so the same entry.
    let third = call(&layer, plain(&format!("/x?access_token={token}"))).await;
    assert_eq!(third.user_id(), Some(ALICE));
    assert_eq!(layer.verifier().cached_tokens(), 1);
}

/// A V2JSON token may hold spaces, so it can come only in a query. Verified there and cached, it
/// is still refused in a header, whatever the cache holds: extraction decides before the cache.
#[tokio::test]
async fn a_token_with_spaces_verified_from_a_query_is_still_refused_in_a_header() {
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
    let token = mint_with(
        SECRET,
        "key",
        &[
            "gen = 1",
            "user_id = @alice:example.org",
            "type = access",
            "nonce = abcdefgh12345678",
        ],
        macaroon::Format::V2JSON,
    )
    // The same JSON with the spaces a JSON writer may put in.
    .replace(",\"", ", \"");
    assert!(token.contains(' '), "{token}");
    let encoded: String = token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    for _ in 0..2 {
        let from_query = call(&layer, plain(&format!("/x?access_token={encoded}"))).await;
        assert_eq!(from_query.user_id(), Some(ALICE));
    }
    // Cached: a hit would vouch for it, yet the header is refused before the cache is asked.
    assert_eq!(layer.verifier().cached_tokens(), 1);
    let from_header = call(&layer, bearer("/x", &token)).await;
    assert_eq!(from_header.status, StatusCode::UNAUTHORIZED);
    assert_eq!(from_header.errcode(), "M_MISSING_TOKEN");
}

#[tokio::test]
async fn an_expired_token_is_still_soft_logged_out_on_a_hit() {
    let clock = ManualClock::new(NOW_MS);
    let layer = MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(clock.clone()));
    let token = access_token(&[&format!("time < {}", NOW_MS + 1_000)]);
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    let cached = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(layer.verifier().cached_tokens(), 1);

    clock.advance_ms(1_000);
    let out = call(&layer, bearer("/x", &token)).await;
    assert_eq!(out.status, StatusCode::UNAUTHORIZED);
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    assert_eq!(out.json["soft_logout"], true);
    let direct = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap_err();
    assert!(direct.is_expired());

    // The entry is still there (a hit, once the clock allows it again): expiry was decided
    // against the clock, not by forgetting the token.
    clock.set_ms(NOW_MS);
    let again = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert!(same_allocation(&cached, &again));
}

#[test]
fn leeway_applies_on_a_hit() {
    let clock = ManualClock::new(NOW_MS);
    let verifier = Verifier::new(keys())
        .clock(clock.clone())
        .leeway(std::time::Duration::from_millis(500));
    let token = access_token(&[&format!("time < {}", NOW_MS + 1_000)]);
    let first = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    clock.advance_ms(1_499);
    let second = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert!(same_allocation(&first, &second));
    clock.advance_ms(1);
    assert!(verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap_err()
        .is_expired());
}

/// Revokes by token id; counts its calls.
#[derive(Default)]
struct Denylist {
    revoked: Mutex<HashSet<TokenId>>,
    calls: AtomicUsize,
}

impl Revocation for Denylist {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let revoked = self.revoked.lock().unwrap().contains(&user.token_id());
        RevocationCheck::ready(Ok(if revoked {
            RevocationStatus::Revoked
        } else {
            RevocationStatus::Active
        }))
    }
}

#[tokio::test]
async fn a_revoked_token_is_rejected_on_a_hit() {
    let store = Arc::new(Denylist::default());
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
            .revocation(store.clone());
    let token = access_token(&[]);
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&layer, bearer("/x", &token)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        2,
        "asked on the hit too"
    );

    let user = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    store.revoked.lock().unwrap().insert(user.token_id());
    let out = call(&layer, bearer("/x", &token)).await;
    assert_eq!(out.status, StatusCode::UNAUTHORIZED);
    assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    assert!(out.json.get("soft_logout").is_none());
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);

    // It was a hit: the token is still cached, only the store said no.
    let again = layer
        .verifier()
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert!(same_allocation(&user, &again));
    // Attenuation does not escape it either, cached or not.
    let narrower = attenuate(&token, &format!("time < {}", NOW_MS + 5_000)).unwrap();
    for _ in 0..2 {
        let out = call(&layer, bearer("/x", &narrower)).await;
        assert_eq!(out.errcode(), "M_UNKNOWN_TOKEN");
    }
}

#[test]
fn the_cache_is_bounded() {
    let verifier = verifier().token_cache(8);
    let mut users = Vec::new();
    for i in 0..200 {
        let token = access_token(&[&format!("nonce = extra{i}")]);
        users.push(
            verifier
                .verify(token.as_bytes(), TokenType::Access, &parts())
                .unwrap(),
        );
        assert!(
            verifier.cached_tokens() <= 8,
            "{}",
            verifier.cached_tokens()
        );
    }
    assert!(verifier.cached_tokens() > 0);
    // Default: 4096.
    assert_eq!(tower_matrix_auth::macaroon::DEFAULT_TOKEN_CACHE, 4096);
}

/// Replaces bytes of a V1 token's binary form and writes it back in the same shape.
fn tamper(token: &str, from: &str, to: &str) -> String {
    assert_eq!(from.len(), to.len());
    let engine = if token.ends_with('=') {
        base64::engine::general_purpose::URL_SAFE
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    };
    let binary = engine.decode(token).unwrap();
    let text = String::from_utf8_lossy(&binary).into_owned();
    assert!(text.contains(from));
    let mut tampered = binary.clone();
    let at = text.find(from).unwrap();
    tampered[at..at + to.len()].copy_from_slice(to.as_bytes());
    engine.encode(tampered)
}

#[test]
fn a_crafted_token_never_gets_a_cached_identity() {
    let verifier = verifier().token_cache(1);
    let token = access_token(&[]);
    let alice = verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(verifier.cached_tokens(), 1);

    // Same length, same end (where the signature and so the cache's hash sits), another user:
    // it lands on the cached entry's slot, and must still be verified, and refused.
    let crafted = tamper(&token, "@alice:", "@alicf:");
    assert_eq!(crafted.len(), token.len());
    assert_eq!(crafted[crafted.len() - 40..], token[token.len() - 40..]);
    let rejection = verifier
        .verify(crafted.as_bytes(), TokenType::Access, &parts())
        .unwrap_err();
    assert_eq!(rejection.errcode(), "M_UNKNOWN_TOKEN");
    assert!(!rejection.is_expired());
    // The unsigned location may change freely: a different token, verified in full, same user.
    let relocated = tamper(&token, "example.org\n", "example.net\n");
    let same_user = verifier
        .verify(relocated.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(same_user.user_id(), ALICE);
    assert!(!same_allocation(&alice, &same_user));
}

#[test]
fn what_the_cache_never_vouches_for() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let verifier = verifier().caveat("method", move |caveat, parts| {
        counted.fetch_add(1, Ordering::SeqCst);
        caveat.value() == parts.method.as_str()
    });
    let custom = access_token(&["method = GET"]);
    let later = access_token(&[&format!("time > {}", NOW_MS - 1)]);
    let exact = access_token(&[&format!("time == {NOW_MS}")]);
    for _ in 0..3 {
        for token in [&custom, &later, &exact] {
            verifier
                .verify(token.as_bytes(), TokenType::Access, &parts())
                .unwrap();
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the checker ran every time"
    );
    assert_eq!(verifier.cached_tokens(), 0);

    // An expired token is not stored; a token of another type is verified in full.
    let expired = access_token(&[&format!("time < {NOW_MS}")]);
    assert!(verifier
        .verify(expired.as_bytes(), TokenType::Access, &parts())
        .is_err());
    assert_eq!(verifier.cached_tokens(), 0);
    let refresh = mint_raw(&["gen = 1", "user_id = @alice:example.org", "type = refresh"]);
    verifier
        .verify(refresh.as_bytes(), TokenType::Refresh, &parts())
        .unwrap();
    assert_eq!(verifier.cached_tokens(), 1);
    let wrong = verifier
        .verify(refresh.as_bytes(), TokenType::Access, &parts())
        .unwrap_err();
    assert_eq!(wrong.errcode(), "M_UNKNOWN_TOKEN");
}

#[test]
fn configuration_changes_start_a_fresh_cache() {
    let verifier = verifier();
    let token = access_token(&[]);
    verifier
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(verifier.clone().cached_tokens(), 1);
    let stricter = verifier.clone().max_caveats(3);
    assert_eq!(stricter.cached_tokens(), 0);
    assert!(stricter
        .verify(token.as_bytes(), TokenType::Access, &parts())
        .is_err());
    let off = verifier.clone().token_cache(0);
    off.verify(token.as_bytes(), TokenType::Access, &parts())
        .unwrap();
    assert_eq!(off.cached_tokens(), 0);
    let layer = MatrixAuthLayer::with_verifier(Verifier::new(keys()).token_cache(0));
    assert_eq!(layer.verifier().cached_tokens(), 0);
}

#[test]
fn concurrent_hits_and_misses_stay_correct() {
    let verifier = verifier().token_cache(16);
    let users: Vec<String> = (0..32).map(|i| format!("@user{i}:example.org")).collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|user| mint_raw(&["gen = 1", &format!("user_id = {user}"), "type = access"]))
        .collect();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (verifier, users, tokens) = (&verifier, &users, &tokens);
            scope.spawn(move || {
                for round in 0..200 {
                    let i = (round * 7 + t * 5) % tokens.len();
                    let user = verifier
                        .verify(tokens[i].as_bytes(), TokenType::Access, &parts())
                        .unwrap();
                    assert_eq!(user.user_id(), users[i]);
                }
            });
        }
    });
    assert!(verifier.cached_tokens() <= 16);
}
