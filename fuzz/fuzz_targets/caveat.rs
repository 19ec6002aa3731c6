//! Target 3: the caveat parser and the caveat rules.
//!
//! Input: one control byte (format and expected token type), then caveats separated by `\n`.
//! Each caveat goes through `Caveat::parse` and `is_valid_user_id` against the independent
//! grammar of `tests/oracle`; then all of them are signed with the server's key (as a minter
//! that wrote them would) and verified: with a genuine signature, the caveat table is all that
//! decides, and the verifier must agree with the oracle's table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_matrix_auth::fuzzing::sign;
use tower_matrix_auth::{
    macaroon::{is_valid_user_id, Caveat, MacaroonFormat},
    MacaroonSecret,
};
use tower_matrix_auth_fuzz::oracle::{caveat_parts, user_id_ok};
use tower_matrix_auth_fuzz::{
    assert_verdict, empty_parts, expected_verdict, verifier, KEYS, MAX_CAVEATS, TOKEN_TYPES,
};

fn check_grammar(bytes: &[u8]) {
    let ours = Caveat::parse(bytes).map(|c| (c.key(), c.op(), c.value()));
    assert_eq!(
        ours,
        caveat_parts(bytes),
        "Caveat::parse({:?})",
        bytes.escape_ascii().to_string()
    );
    if let Ok(text) = std::str::from_utf8(bytes) {
        assert_eq!(
            is_valid_user_id(text),
            user_id_ok(text),
            "is_valid_user_id({text:?})"
        );
    }
    if let Some((_, _, value)) = ours {
        assert_eq!(
            is_valid_user_id(value),
            user_id_ok(value),
            "is_valid_user_id({value:?})"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let caveats: Vec<&[u8]> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split(|&b| b == b'\n').collect()
    };
    for caveat in &caveats {
        check_grammar(caveat);
    }
    if caveats.len() > MAX_CAVEATS {
        return;
    }
    let format = [
        MacaroonFormat::V1,
        MacaroonFormat::V2,
        MacaroonFormat::V2Json,
    ][usize::from(control % 3)];
    let expected = TOKEN_TYPES[usize::from(control / 3 % 3)];
    let (identifier, secret) = KEYS[usize::from(control / 9 % 2)];
    let token = sign(
        &MacaroonSecret::from_passphrase(secret),
        identifier.as_bytes(),
        &caveats,
        format,
    );
    let got = verifier().verify(token.as_bytes(), expected, empty_parts());
    assert_verdict(
        token.as_bytes(),
        expected,
        &expected_verdict(token.as_bytes(), expected),
        &got,
    );
});
