//! The signature check is constant-time by construction, not by measurement (no timed tests
//! here: a timer on a shared 2-core machine proves nothing either way).
//!
//! - `src/verify.rs` computes the whole HMAC chain for every caveat of the token, whatever the
//!   signature says, then compares the 32 signature bytes as four `u64` words with
//!   `subtle::ConstantTimeEq` on slices: no early exit, an optimization barrier per element.
//! - What the token's caveats say is looked at only after the comparison, so a forged signature
//!   never reaches code that depends on which byte was wrong.
//!
//! These tests pin both halves down: `subtle`'s slice comparison visits every element whatever
//! the position of the first difference, and a token whose signature is wrong in its first byte
//! takes the same path, with the same answer, as one wrong in its last byte.

use std::cell::Cell;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use subtle::{Choice, ConstantTimeEq};
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    Format, KeyRing, MacaroonSecret, ManualClock, MatrixAuthLayer, TokenType, Verifier,
};

const NOW_MS: u64 = 1_700_000_000_000;

thread_local! {
    static COMPARED: Cell<usize> = const { Cell::new(0) };
}

/// A word that counts how often `subtle` compares it.
struct Counted(u64);

impl ConstantTimeEq for Counted {
    fn ct_eq(&self, other: &Self) -> Choice {
        COMPARED.with(|c| c.set(c.get() + 1));
        self.0.ct_eq(&other.0)
    }
}

fn words(bytes: &[u8; 32]) -> Vec<Counted> {
    bytes
        .chunks(8)
        .map(|chunk| Counted(u64::from_le_bytes(chunk.try_into().unwrap())))
        .collect()
}

/// The comparison primitive: every word is compared, wherever the first difference is.
#[test]
fn subtle_compares_every_word_wherever_the_difference_is() {
    let signature = [0x5a; 32];
    for at in [None, Some(0), Some(7), Some(8), Some(24), Some(31)] {
        let mut other = signature;
        if let Some(at) = at {
            other[at] ^= 1;
        }
        COMPARED.with(|c| c.set(0));
        let equal = words(&signature)[..].ct_eq(&words(&other)[..]);
        assert_eq!(bool::from(equal), at.is_none());
        assert_eq!(COMPARED.with(Cell::get), 4, "difference at {at:?}");
    }
}

/// The verifier's source still compares with `subtle`, never with `==` on the signature.
#[test]
fn the_verifier_compares_signatures_with_subtle() {
    let source = include_str!("../src/verify.rs");
    assert!(source.contains("use subtle::ConstantTimeEq;"));
    assert!(source.contains(".ct_eq("));
    for shortcut in ["signature ==", "== macaroon.signature", "signature.eq("] {
        assert!(!source.contains(shortcut), "`{shortcut}` in src/verify.rs");
    }
}

fn keys() -> KeyRing {
    KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("timing test secret"))
}

/// Alice's token as V2 binary (its last 32 bytes are the signature) with one bit of signature
/// byte `at` flipped.
fn with_bad_signature_byte(at: usize) -> String {
    let token = keys()
        .mint("@alice:example.org", TokenType::Access)
        .unwrap()
        .nonce("n0nce")
        .expires_at_ms(NOW_MS + 60_000)
        .serialize(Format::V2);
    let mut binary = URL_SAFE_NO_PAD.decode(token).unwrap();
    let start = binary.len() - 32;
    binary[start + at] ^= 0x01;
    URL_SAFE_NO_PAD.encode(binary)
}

#[test]
fn first_and_last_signature_byte_failures_take_the_same_path() {
    let verifier = Verifier::new(keys()).clock(ManualClock::new(NOW_MS));
    let parts = Request::new(()).into_parts().0;
    let rejections: Vec<_> = (0..32)
        .map(|at| {
            verifier
                .verify(
                    with_bad_signature_byte(at).as_bytes(),
                    TokenType::Access,
                    &parts,
                )
                .expect_err("a wrong signature")
        })
        .collect();
    // Same reason (the comparison, not the parser or the caveats), same answer, every byte.
    for rejection in &rejections {
        assert_eq!(rejection, &rejections[0]);
        assert_eq!(rejection.reason(), "signature does not verify");
        assert_eq!(format!("{rejection:?}"), format!("{:?}", rejections[0]));
    }
    assert!(rejections[0].is_unknown_token() && !rejections[0].soft_logout());
}

#[test]
fn first_and_last_signature_byte_failures_get_the_same_response() {
    let layer = MatrixAuthLayer::new(keys()).clock(ManualClock::new(NOW_MS));
    let answer = |at: usize| {
        let request = Request::get("/_matrix/client/v3/account/whoami")
            .header(
                "authorization",
                format!("Bearer {}", with_bad_signature_byte(at)),
            )
            .body(Full::<Bytes>::default())
            .unwrap();
        let service = layer.layer(service_fn(|_: Request<Full<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default()))
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let response = service.oneshot(request).await.unwrap();
            let (parts, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts.status, format!("{:?}", parts.headers), body)
        })
    };
    let first = answer(0);
    assert_eq!(first.0, 401);
    assert_eq!(answer(31), first);
    assert_eq!(answer(16), first);
}
