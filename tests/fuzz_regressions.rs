//! What the fuzz targets in `fuzz/` found, kept as ordinary tests (the inputs also stay in
//! `fuzz/seeds/`, so every fuzz run replays them).

use http::Request;
use tower_matrix_auth::{Format, KeyRing, MacaroonSecret, ManualClock, TokenType, Verifier};

const NOW_MS: u64 = 1_700_000_000_000;

fn keys() -> KeyRing {
    KeyRing::new().with_key(
        "key",
        MacaroonSecret::from_passphrase("fuzz regression secret"),
    )
}

/// `differential`, seed `regression-v2json-duplicate-keys`: V2JSON that gives keys twice, where
/// the `macaroon` crate stops at the first copy (with a base64 error) and we read the last copy,
/// as `serde_json` (and Python's `json`, which pymacaroons uses) do. The harness had recognised
/// that documented exception only when the crate reported "duplicate field".
#[test]
fn v2json_keys_given_twice_read_as_their_last_copy() {
    let verifier = Verifier::new(keys()).clock(ManualClock::new(NOW_MS));
    let parts = Request::new(()).into_parts().0;

    // The input itself: a macaroon under a key this ring does not hold, so refused, cleanly.
    let input = include_bytes!("../fuzz/seeds/differential/regression-v2json-duplicate-keys");
    let refused = verifier
        .verify(input, TokenType::Access, &parts)
        .unwrap_err();
    assert!(refused.is_unknown_token() && !refused.soft_logout());

    // The rule it exposed: only the last copy of a key counts, so the signature that verifies is
    // the one read last.
    let token = keys()
        .mint("@alice:example.org", TokenType::Access)
        .unwrap()
        .nonce("n0nce")
        .serialize(Format::V2Json);
    let json: serde_json::Value = serde_json::from_str(&token).unwrap();
    let good = format!("\"s64\":{}", json["s64"]);
    let bad = "\"s64\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"";
    assert!(token.contains(&good));
    let last_good = token.replace(&good, &format!("{bad},{good}"));
    let last_bad = token.replace(&good, &format!("{good},{bad}"));
    let user = verifier
        .verify(last_good.as_bytes(), TokenType::Access, &parts)
        .expect("the last copy is the right signature");
    assert_eq!(user.user_id(), "@alice:example.org");
    assert!(verifier
        .verify(last_bad.as_bytes(), TokenType::Access, &parts)
        .unwrap_err()
        .is_unknown_token());
}
