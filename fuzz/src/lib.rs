//! What the fuzz targets share: the keys (those of `tests/vectors/pymacaroons.json`, so the
//! pymacaroons seeds verify), a clock fixed at the vectors' `now_ms`, the docs' tables as
//! independent oracles (`tests/oracle/mod.rs`), an independent HMAC chain, and a poll helper for
//! futures that must be ready at once.

use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tower_matrix_auth::fuzzing::{parse_token, ParsedView};
use tower_matrix_auth::{
    hooks::ManualClock, KeyRing, MacaroonSecret, MatrixUser, Rejection, TokenType, Verifier,
};

#[path = "../../tests/oracle/mod.rs"]
pub mod oracle;

use oracle::{caveat_table, Identity, Verdict};

/// The vectors' clock.
pub const NOW_MS: u64 = 1_700_000_000_000;
/// The vectors' keys: identifier and Synapse-style `macaroon_secret_key`.
pub const KEYS: [(&str, &str); 2] = [
    (
        "key",
        "test secret: this is the synapse macaroon_secret_key",
    ),
    ("key2", "second secret for rotation"),
];
/// A secret no ring holds: tokens signed with it are forgeries.
pub const FORGER: &str = "not the server's secret";
/// The crate's default limits.
pub const MAX_TOKEN_LEN: usize = 4096;
pub const MAX_CAVEATS: usize = 64;

pub fn keys() -> KeyRing {
    KEYS.iter().fold(KeyRing::new(), |ring, (id, secret)| {
        ring.with_key(id, MacaroonSecret::from_passphrase(secret))
    })
}

/// A verifier with the default limits at [`NOW_MS`].
pub fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(keys()).clock(ManualClock::new(NOW_MS)))
}

/// Request parts with nothing in them (the standard caveats never look at the request).
pub fn empty_parts() -> &'static http::request::Parts {
    static PARTS: OnceLock<http::request::Parts> = OnceLock::new();
    PARTS.get_or_init(|| http::Request::new(()).into_parts().0)
}

pub const TOKEN_TYPES: [TokenType; 3] = [TokenType::Access, TokenType::Refresh, TokenType::Login];

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The macaroon chain computed here, from the libmacaroons definition: root key =
/// HMAC("macaroons-key-generator", secret), then HMAC over the identifier and each caveat.
pub fn chain_holds(view: &ParsedView) -> bool {
    let Some((_, secret)) = KEYS.iter().find(|(id, _)| id.as_bytes() == view.identifier) else {
        return false;
    };
    let root = hmac(b"macaroons-key-generator", secret.as_bytes());
    let mut signature = hmac(&root, &view.identifier);
    for (id, _) in &view.caveats {
        signature = hmac(&signature, id);
    }
    signature == view.signature
}

/// The chain over the identifier and the first `count` caveats of a token under one of [`KEYS`]
/// (by its identifier): what the signature would be had the token ended there. `None` for an
/// identifier no ring key has.
pub fn chain_prefix(view: &ParsedView, count: usize) -> Option<[u8; 32]> {
    let (_, secret) = KEYS
        .iter()
        .find(|(id, _)| id.as_bytes() == view.identifier)?;
    let root = hmac(b"macaroons-key-generator", secret.as_bytes());
    let mut signature = hmac(&root, &view.identifier);
    for (id, _) in view.caveats.iter().take(count) {
        signature = hmac(&signature, id);
    }
    Some(signature)
}

/// What the docs say `Verifier::verify(token, expected)` must answer: limits, the format,
/// the key, the chain, then the caveat table.
pub fn expected_verdict(token: &[u8], expected: TokenType) -> Verdict {
    expected_verdict_at(token, expected, NOW_MS)
}

/// Whether the layer verifies a token itself rather than ask a resolver: a token in one of the
/// macaroon formats (however many caveats), or one over the length limit, which is refused
/// before any resolver sees it. Anything else goes to a resolver.
pub fn is_macaroon_format(token: &[u8]) -> bool {
    token.len() > MAX_TOKEN_LEN || parse_token(token).is_some()
}

/// [`expected_verdict`] at `now_ms` instead of [`NOW_MS`].
pub fn expected_verdict_at(token: &[u8], expected: TokenType, now_ms: u64) -> Verdict {
    if token.len() > MAX_TOKEN_LEN {
        return Verdict::Reject("longer than the limit");
    }
    let Some(view) = parse_token(token) else {
        return Verdict::Reject("not a macaroon");
    };
    if view.caveats.len() > MAX_CAVEATS {
        return Verdict::Reject("too many caveats");
    }
    if !chain_holds(&view) {
        return Verdict::Reject("unknown key or bad signature");
    }
    let caveats: Vec<(&[u8], bool)> = view
        .caveats
        .iter()
        .map(|(id, third_party)| (id.as_slice(), *third_party))
        .collect();
    caveat_table(&caveats, expected.as_str(), now_ms)
}

/// The identity the oracle expects, as the crate reports it.
pub fn identity_of(user: &MatrixUser) -> Identity {
    Identity {
        user_id: user.user_id().to_owned(),
        device_id: user.device_id().map(str::to_owned),
        nonce: user.nonce().map(str::to_owned),
        is_guest: user.is_guest(),
        token_type: user.token_type().as_str().to_owned(),
        expires_at_ms: user.expires_at_ms(),
    }
}

/// Panics unless the verifier's answer is the oracle's.
pub fn assert_verdict(
    token: &[u8],
    expected: TokenType,
    verdict: &Verdict,
    got: &Result<MatrixUser, Rejection>,
) {
    let show = || String::from_utf8_lossy(token).into_owned();
    if let Err(rejection) = got {
        assert_eq!(rejection.status(), 401, "{rejection:?}");
        assert_eq!(rejection.errcode(), "M_UNKNOWN_TOKEN", "{rejection:?}");
    }
    match (verdict, got) {
        (Verdict::Accept(identity), Ok(user)) => {
            assert_eq!(identity, &identity_of(user), "token {}", show())
        }
        (Verdict::Expired(_), Err(rejection)) => {
            assert!(
                rejection.is_expired() && rejection.soft_logout(),
                "{rejection:?}"
            )
        }
        (Verdict::Reject(_), Err(rejection)) => assert!(
            !rejection.is_expired() && !rejection.soft_logout(),
            "{rejection:?} for {}",
            show()
        ),
        _ => panic!(
            "verify({}, {expected:?}): oracle says {verdict:?}, the verifier {got:?}",
            show()
        ),
    }
}

/// Polls a future once: everything on the layer's path is ready at once with `NeverRevoked`.
pub fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a future on the layer's path was not ready at once"),
    }
}
