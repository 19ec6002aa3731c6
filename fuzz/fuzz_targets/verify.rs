//! Target 1: arbitrary bytes as a token through the whole verifier, for every token type. The
//! answer must be the docs' (limits, format, key, chain, caveat table), computed
//! independently by `expected_verdict`; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_matrix_auth_fuzz::{
    assert_verdict, empty_parts, expected_verdict, verifier, TOKEN_TYPES,
};

fuzz_target!(|token: &[u8]| {
    for expected in TOKEN_TYPES {
        let got = verifier().verify(token, expected, empty_parts());
        assert_verdict(token, expected, &expected_verdict(token, expected), &got);
    }
});
