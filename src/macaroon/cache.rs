//! The verified-token cache: a repeat of a recently verified token skips decoding, parsing and
//! the HMAC chain, the bulk of a verification.
//!
//! What keeps it sound:
//!
//! - **No collisions.** An entry is found through a hash seeded with random keys (of the token's
//!   length and its last bytes, where the signature sits), but it is used only when the stored
//!   token equals the presented one byte for byte. The hash decides
//!   where an entry lives, never whether it matches, so no crafted token can reach another
//!   token's entry; at worst a holder of valid tokens evicts entries, which costs a verification.
//! - **Only verdicts that depend on the token alone.** The verifier stores a token only when
//!   every caveat is standard and none but `time <` depends on anything else: tokens with
//!   `time >` or `time ==` (the clock) or custom caveats (the request) are verified every time.
//!   A `time <` caveat is re-checked against the clock on every hit, through the stored
//!   [`MatrixUser::expires_at_ms`], so an expired token still gets its soft logout.
//! - **Revocation is never cached.** The layer asks its revocation store after every
//!   verification, hit or not.
//! - **Visible ASCII only.** Tokens with any other byte (a V2JSON token with spaces, sent in a
//!   query) are verified every time, so that a hit also proves that a header token obeys the
//!   extraction rules, which the layer then does not check byte by byte again.
//! - **Bounded.** A fixed number of slots, each holding at most one token of at most
//!   [`MAX_CACHED_TOKEN_LEN`] bytes; a new token takes its slot from whatever was there.
//! - **One configuration.** Every builder method of the verifier starts a fresh cache, so clones
//!   with different limits never share entries.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::identity::MatrixUser;

/// Longer tokens are not cached (a Synapse token is about 300 bytes), which bounds the memory.
pub(crate) const MAX_CACHED_TOKEN_LEN: usize = 1024;

/// Locks to spread concurrent requests over; at most this many.
const SHARDS: usize = 16;

/// The hash covers the token's length and this many final bytes: the signature's encoding in
/// the binary formats, so it differs between any two tokens. Hashing all of a 300-byte token
/// would cost as much as the rest of a hit; the equality check makes the choice safe anyway.
const HASHED_TAIL: usize = 32;

/// A bounded map from tokens as sent to the identity they verified as.
pub(crate) struct TokenCache {
    /// Random per cache, so nobody can aim tokens at a slot without seeing the process's memory.
    seeds: [u64; 3],
    shards: Box<[Mutex<Shard>]>,
    slots_per_shard: usize,
}

#[derive(Default)]
struct Shard {
    /// Empty until the first insert, then `slots_per_shard` long: direct-mapped by hash.
    slots: Vec<Option<Entry>>,
    len: usize,
}

struct Entry {
    hash: u64,
    token: Box<[u8]>,
    user: MatrixUser,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; `None` for 0 (no cache).
    pub(crate) fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        // A power of two, at most `capacity`, so that shards × slots never exceeds it.
        let shards = 1 << SHARDS.min(capacity).ilog2();
        // std's random per-process SipHash keys, drawn once, seed a cheaper hash: a hit's
        // whole budget is about a SipHash of the token.
        let random = RandomState::new();
        Some(Self {
            seeds: [0u8, 1, 2].map(|i| random.hash_one(i)),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            slots_per_shard: capacity / shards,
        })
    }

    /// Most tokens held at once.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.shards.len() * self.slots_per_shard
    }

    /// Tokens held now.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len).sum()
    }

    /// A folded-multiply hash (as in foldhash) of the length and the tail, 8 bytes at a time.
    fn hash(&self, token: &[u8]) -> u64 {
        let tail = &token[token.len().saturating_sub(HASHED_TAIL)..];
        let mix = |hash: u64, word: [u8; 8]| {
            folded_multiply(hash ^ u64::from_le_bytes(word), self.seeds[1])
        };
        let mut hash = self.seeds[0] ^ token.len() as u64;
        // Whole words as plain loads; only a token shorter than the tail has a partial one
        // (a copy of variable length is a call to `memcpy`).
        let mut words = tail.chunks_exact(8);
        for chunk in &mut words {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            hash = mix(hash, word);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            hash = mix(hash, word);
        }
        folded_multiply(hash, self.seeds[2])
    }

    fn place(&self, token: &[u8]) -> (u64, &Mutex<Shard>, usize) {
        let hash = self.hash(token);
        // The shard from the low bits, the slot from the high ones: independent.
        let shard = &self.shards[hash as usize & (self.shards.len() - 1)];
        let slot = (hash >> 32) as usize % self.slots_per_shard;
        (hash, shard, slot)
    }

    /// The identity `token` verified as, if it is held.
    pub(crate) fn get(&self, token: &[u8]) -> Option<MatrixUser> {
        if token.len() > MAX_CACHED_TOKEN_LEN {
            return None;
        }
        let (hash, shard, slot) = self.place(token);
        let shard = lock(shard);
        match shard.slots.get(slot) {
            // The token bytes are compared in constant time, like every other credential here.
            Some(Some(entry))
                if entry.hash == hash && crate::macaroon::ct::bytes_equal(&entry.token, token) =>
            {
                Some(entry.user.clone())
            }
            _ => None,
        }
    }

    /// Remembers that `token` verified as `user`, in place of whatever held its slot. The caller
    /// decides what may be cached (see the module docs).
    pub(crate) fn insert(&self, token: &[u8], user: &MatrixUser) {
        if token.len() > MAX_CACHED_TOKEN_LEN {
            return;
        }
        let (hash, shard, slot) = self.place(token);
        let entry = Entry {
            hash,
            token: token.into(),
            user: user.clone(),
        };
        let evicted = {
            let mut shard = lock(shard);
            if shard.slots.is_empty() {
                shard.slots.resize_with(self.slots_per_shard, || None);
            }
            let evicted = shard.slots[slot].replace(entry);
            if evicted.is_none() {
                shard.len += 1;
            }
            evicted
        };
        // Freed outside the lock.
        drop(evicted);
    }
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Every critical section is a lookup or a single slot write, so a poisoned lock (a panic in
/// another thread, not here) still guards a consistent shard.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{TokenType, VerifiedClaims};

    fn user(name: &str) -> MatrixUser {
        MatrixUser::from_claims(VerifiedClaims {
            user_id: name,
            device_id: None,
            nonce: Some("n"),
            nonce_first: false,
            expires_before_nonce_ms: None,
            is_guest: false,
            token_type: TokenType::Access,
            expires_at_ms: None,
            signature: &[0; 32],
        })
    }

    #[test]
    fn a_hit_returns_what_was_stored() {
        let cache = TokenCache::new(64).unwrap();
        assert!(cache.get(b"token-a").is_none());
        cache.insert(b"token-a", &user("@a:x"));
        assert_eq!(cache.get(b"token-a"), Some(user("@a:x")));
        assert!(cache.get(b"token-b").is_none());
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn zero_capacity_is_no_cache() {
        assert!(TokenCache::new(0).is_none());
    }

    #[test]
    fn capacity_bounds_the_entries() {
        for capacity in [1, 2, 3, 15, 16, 17, 100, 4096] {
            let cache = TokenCache::new(capacity).unwrap();
            assert!(cache.capacity() <= capacity && cache.capacity() > capacity / 2);
            for i in 0..capacity * 4 {
                cache.insert(format!("token-{i}").as_bytes(), &user("@a:x"));
            }
            assert!(cache.len() <= cache.capacity(), "{capacity}");
            assert!(cache
                .shards
                .iter()
                .all(|s| lock(s).slots.len() <= cache.slots_per_shard));
        }
    }

    #[test]
    fn a_token_with_the_same_hash_is_not_a_hit() {
        // Same length and same hashed tail, so the same hash and the same slot: only the
        // byte-for-byte comparison tells them apart.
        let victim = [b'v'; 300];
        let mut crafted = victim;
        crafted[0] = b'c';
        let cache = TokenCache::new(1).unwrap();
        assert_eq!(cache.place(&victim).0, cache.place(&crafted).0);
        cache.insert(&victim, &user("@victim:x"));
        assert!(cache.get(&crafted).is_none());
        assert_eq!(cache.get(&victim), Some(user("@victim:x")));
        // And the crafted token, once stored, takes the slot rather than sharing it.
        cache.insert(&crafted, &user("@crafted:x"));
        assert_eq!(cache.get(&crafted), Some(user("@crafted:x")));
        assert!(cache.get(&victim).is_none());
    }

    #[test]
    fn hash_keys_differ_between_caches() {
        let (a, b) = (TokenCache::new(1).unwrap(), TokenCache::new(1).unwrap());
        let token = [b'x'; 300];
        assert_ne!(a.place(&token).0, b.place(&token).0);
    }

    #[test]
    fn long_tokens_are_not_kept() {
        let cache = TokenCache::new(8).unwrap();
        let long = vec![b'x'; MAX_CACHED_TOKEN_LEN + 1];
        cache.insert(&long, &user("@a:x"));
        assert!(cache.get(&long).is_none());
        assert_eq!(cache.len(), 0);
    }
}
