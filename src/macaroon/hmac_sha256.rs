//! HMAC-SHA256 for the macaroon chain, written on SHA-256's compression function.
//!
//! Every link of a macaroon chain is keyed with the previous 32-byte signature, so the chain is
//! the hot path of verification. Keyed that way, an HMAC over a short caveat is exactly four
//! compressions: the key's inner pad, the padded message, the key's outer pad, the padded inner
//! digest. The `hmac` crate computes the same four, but its buffering and key handling make a
//! Synapse token's chain cost a quarter more (1.71 µs against 1.37 µs, see
//! `docs/performance.md`); here each step is one fixed-size block copy and one call to
//! `sha2::compress256`, which uses SHA-NI when the CPU has it.
//!
//! Only 32-byte keys are handled here: every chain link, and the libmacaroons key derivation,
//! whose 23-byte key `keys.rs` zero-pads to 32 bytes as HMAC itself would. The `hmac` crate is
//! the reference in the tests (every message length, both key shapes), not a dependency.

use sha2::digest::generic_array::GenericArray;

/// SHA-256 block size in bytes.
const BLOCK: usize = 64;
/// HMAC key and SHA-256 digest size in bytes.
pub(crate) const KEY_LEN: usize = 32;

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

fn compress(state: &mut [u32; 8], block: &[u8; BLOCK]) {
    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
}

/// An HMAC key with both pads already hashed: signing a message of up to 55 bytes then costs
/// two compressions.
#[derive(Clone)]
pub(crate) struct PreparedKey {
    /// State after `key ^ ipad`.
    inner: [u32; 8],
    /// State after `key ^ opad`.
    outer: [u32; 8],
}

impl PreparedKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        let mut ipad = [0x36; BLOCK];
        let mut opad = [0x5c; BLOCK];
        for (i, byte) in key.iter().enumerate() {
            ipad[i] ^= byte;
            opad[i] ^= byte;
        }
        let (mut inner, mut outer) = (IV, IV);
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        Self { inner, outer }
    }

    /// `HMAC-SHA256(key, message)`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; KEY_LEN] {
        let mut inner = self.inner;
        let mut blocks = message.chunks_exact(BLOCK);
        for block in &mut blocks {
            compress(&mut inner, block.try_into().expect("a whole block"));
        }
        // The tail, 0x80, zeros, then the bit length of everything hashed (the pad block
        // included): one block, or two when fewer than 9 bytes are left after the tail.
        let tail = blocks.remainder();
        let bits = ((BLOCK + message.len()) as u64) * 8;
        let mut last = [0; 2 * BLOCK];
        last[..tail.len()].copy_from_slice(tail);
        last[tail.len()] = 0x80;
        let end = if tail.len() + 9 <= BLOCK {
            BLOCK
        } else {
            2 * BLOCK
        };
        last[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        for block in last[..end].chunks_exact(BLOCK) {
            compress(&mut inner, block.try_into().expect("a whole block"));
        }

        // The outer hash: the 32-byte inner digest, padded, after the outer pad block.
        let mut block = [0; BLOCK];
        for (bytes, word) in block.chunks_exact_mut(4).zip(inner) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        block[KEY_LEN] = 0x80;
        block[BLOCK - 8..].copy_from_slice(&(((BLOCK + KEY_LEN) as u64) * 8).to_be_bytes());
        let mut outer = self.outer;
        compress(&mut outer, &block);

        let mut digest = [0; KEY_LEN];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(outer) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }
}

/// `HMAC-SHA256(key, message)` for a 32-byte key: one chain link.
pub(crate) fn hmac32(key: &[u8; KEY_LEN], message: &[u8]) -> [u8; KEY_LEN] {
    PreparedKey::new(key).sign(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn reference(key: &[u8], message: &[u8]) -> [u8; KEY_LEN] {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn agrees_with_the_hmac_crate_on_every_length_around_the_block_edges() {
        let message: Vec<u8> = (0..=600u32).map(|i| (i * 131 + 7) as u8).collect();
        for (k, key) in [[0u8; KEY_LEN], [0xff; KEY_LEN], reference(b"k", b"m")]
            .iter()
            .enumerate()
        {
            for len in 0..message.len() {
                assert_eq!(
                    hmac32(key, &message[..len]),
                    reference(key, &message[..len]),
                    "key {k}, length {len}"
                );
            }
        }
    }

    #[test]
    fn matches_rfc_4231_test_case_2_shape() {
        // RFC 4231 case 2 uses a 4-byte key; zero-padding it to 32 bytes is the same HMAC key.
        let mut key = [0; KEY_LEN];
        key[..4].copy_from_slice(b"Jefe");
        let expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let got: String = hmac32(&key, b"what do ya want for nothing?")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }
}
