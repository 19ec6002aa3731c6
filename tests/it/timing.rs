//! The signature check is constant-time by construction, not by measurement (no timed tests
//! here: a timer on a shared 2-core machine proves nothing either way).
//!
//! - `src/macaroon/verify.rs` computes the whole HMAC chain for every caveat of the token, whatever the
//!   signature says, then compares the 32 signature bytes with `src/macaroon/ct.rs`: the differences of
//!   all four `u64` words are OR-ed together with no branch, and only the result goes through
//!   `subtle`'s optimization barrier.
//! - What the token's caveats say is looked at only after the comparison, so a forged signature
//!   never reaches code that depends on which byte was wrong.
//!
//! These tests pin both halves down: the primitive has no exit that depends on the data (and
//! every credential comparison uses it), and a token whose signature is wrong in its first byte
//! takes the same path, with the same answer, as one wrong in its last byte.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    hooks::ManualClock, macaroon::MacaroonFormat, KeyRing, MacaroonSecret, MatrixAuthLayer,
    TokenType, Verifier,
};

const NOW_MS: u64 = 1_700_000_000_000;

/// The comparison primitive, `src/macaroon/ct.rs`: the differences of all words are OR-ed together with
/// no branch and no early exit, and only the accumulated word is tested, through `subtle`.
#[test]
fn the_comparison_primitive_has_no_data_dependent_exit() {
    let source = include_str!("../../src/macaroon/ct.rs");
    let body = &source[source.find("pub(crate) fn bytes_equal").unwrap()..];
    let body = &body[..body.find("\n}\n").unwrap()];
    // The one early return is on the lengths, which are public.
    assert_eq!(body.matches("return").count(), 1, "{body}");
    assert!(body.contains("if a.len() != b.len() {\n        return false;"));
    assert!(!body.contains("break"));
    assert_eq!(body.matches("difference |=").count(), 2);
    assert!(body.contains("difference.ct_eq(&0)"));
    // Bytes are never compared with `==`, which may stop at the first difference.
    assert!(!body.contains("x == y") && !body.contains("a == b"));
}

/// Every credential comparison goes through that primitive, never through `==`.
#[test]
fn credentials_are_compared_with_the_constant_time_primitive() {
    let uses = [
        (
            include_str!("../../src/macaroon/verify.rs"),
            "crate::macaroon::ct::bytes_equal(&signature, macaroon.signature)",
        ),
        (
            include_str!("../../src/macaroon/cache.rs"),
            "crate::macaroon::ct::bytes_equal(&entry.token, token)",
        ),
        (
            include_str!("../../src/hooks/appservice.rs"),
            "crate::macaroon::ct::bytes_equal(appservice.as_token",
        ),
        (
            include_str!("../../src/hooks/resolver.rs"),
            "crate::macaroon::ct::bytes_equal(candidate",
        ),
    ];
    for (source, call) in uses {
        assert!(source.contains(call), "`{call}` missing");
    }
    let verify = uses[0].0;
    for shortcut in ["signature ==", "== macaroon.signature", "signature.eq("] {
        assert!(
            !verify.contains(shortcut),
            "`{shortcut}` in src/macaroon/verify.rs"
        );
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
        .serialize(MacaroonFormat::V2);
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
    let layer =
        MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
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
