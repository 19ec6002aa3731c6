//! Constant-time equality for credentials: signatures, cached tokens, `as_token`s, opaque tokens.
//!
//! `subtle` compares slices a byte at a time with an optimization barrier for each byte, which
//! for a 300-byte token costs several times the cache lookup it guards. Here the differences are
//! OR-ed together eight bytes at a time, with no branch on the data, and only the final word goes
//! through `subtle`'s barrier. Lengths are not secret (a token's length is visible on the wire),
//! so unequal lengths return at once.

use subtle::ConstantTimeEq;

/// Whether `a` and `b` hold the same bytes, in time that depends only on their lengths.
pub(crate) fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = words_a.remainder().iter().zip(words_b.remainder());
    let word = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    let mut difference = 0u64;
    for (x, y) in words_a.zip(words_b) {
        difference |= word(x) ^ word(y);
    }
    for (x, y) in tail {
        difference |= u64::from(x ^ y);
    }
    difference.ct_eq(&0).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_every_bit_of_every_length_agrees() {
        let base: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect();
        for len in 0..base.len() {
            let a = &base[..len];
            assert!(bytes_equal(a, a), "{len}");
            assert!(!bytes_equal(a, &base[..len + 1]), "{len} vs longer");
            for i in 0..len {
                for bit in 0..8 {
                    let mut b = a.to_vec();
                    b[i] ^= 1 << bit;
                    assert!(!bytes_equal(a, &b), "{len} {i} {bit}");
                }
            }
        }
    }
}
