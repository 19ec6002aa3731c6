//! The introspection cache: active answers, keyed by the SHA-256 of the token, for
//! min(TTL, the token's `exp`); in-flight look-ups merged (single-flight).
//!
//! - **Never the token.** Keys are SHA-256 digests; the token itself lives only in the future
//!   of the one look-up that sends it.
//! - **Only active answers.** An inactive one is asked again next time: a token server that
//!   answers "no" must stay free to answer "yes" later (a token used just after it was issued).
//! - **Bounded.** At most `capacity` entries: a full cache first forgets expired entries, then
//!   an arbitrary one (a holder of many valid tokens can only cost the others a look-up).
//! - **Invalidation beats a racing look-up.** Each invalidation bumps a generation; a look-up
//!   that started before it stores nothing, so a logout cannot be undone by an answer that was
//!   already on its way (palpo's native token cache does the same).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::hooks::resolver::ResolvedToken;

/// SHA-256 of a token.
pub(crate) type Key = [u8; 32];

pub(crate) fn key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

/// The shared outcome of one look-up: the resolved token (`None`: refused), or why it failed.
pub(crate) type Outcome = Result<Option<ResolvedToken>, Arc<str>>;

/// One look-up in flight, that concurrent requests for the same token wait on.
pub(crate) type Flight = Arc<OnceCell<Outcome>>;

/// Hashes a key (a SHA-256 digest, already uniform) with one multiplication instead of a
/// SipHash: its first 8 bytes, xored with a random seed, times a random odd multiplier, the
/// product's middle bits where the table looks. Nobody can aim tokens at a bucket: the digest
/// is not theirs to choose, and bits that decide a bucket depend on 40-odd digest bits under
/// seeds they never see.
#[derive(Clone, Copy)]
struct DigestHashing {
    seed: u64,
    multiplier: u64,
}

impl Default for DigestHashing {
    fn default() -> Self {
        let random = RandomState::new();
        Self {
            seed: random.hash_one(0u8),
            multiplier: random.hash_one(1u8) | 1,
        }
    }
}

impl BuildHasher for DigestHashing {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher {
            hashing: *self,
            hash: 0,
        }
    }
}

struct DigestHasher {
    hashing: DigestHashing,
    hash: u64,
}

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // The digest's bytes (a length prefix, if any, comes through `write_usize`).
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        let x = u64::from_le_bytes(first) ^ self.hashing.seed;
        self.hash = x.wrapping_mul(self.hashing.multiplier).rotate_left(32);
    }

    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.hash
    }
}

type KeyMap<V> = HashMap<Key, V, DigestHashing>;

struct Entry {
    resolved: Arc<ResolvedToken>,
    /// Used until this time (ms since the epoch), then forgotten.
    until_ms: u64,
}

#[derive(Default)]
struct Entries {
    map: KeyMap<Entry>,
    generation: u64,
    /// When a full map may next be swept of expired entries (ms): at most once a second, so a
    /// stream of misses on a full cache costs O(1) each, not a walk of every entry under the
    /// lock every hit takes.
    next_sweep_ms: u64,
}

pub(crate) struct Cache {
    entries: Mutex<Entries>,
    flights: Mutex<KeyMap<Flight>>,
    capacity: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent maps behind: carry on.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::default(),
            flights: Mutex::default(),
            capacity,
        }
    }

    /// The cached answer for `key`, if one is still fresh at `now_ms`.
    pub(crate) fn get(&self, key: &Key, now_ms: u64) -> Option<ResolvedToken> {
        self.get_shared(key, now_ms).map(|shared| (*shared).clone())
    }

    /// [`Self::get`], the entry itself: one reference count, no copy.
    pub(crate) fn get_shared(&self, key: &Key, now_ms: u64) -> Option<Arc<ResolvedToken>> {
        if self.capacity == 0 {
            return None;
        }
        let mut entries = lock(&self.entries);
        match entries.map.get(key) {
            Some(entry) if now_ms < entry.until_ms => Some(Arc::clone(&entry.resolved)),
            Some(_) => {
                entries.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// The generation now: pass it to [`Self::insert`] after the look-up.
    pub(crate) fn generation(&self) -> u64 {
        lock(&self.entries).generation
    }

    /// Stores an active answer until `until_ms`, unless an invalidation came since `generation`.
    pub(crate) fn insert(
        &self,
        key: Key,
        resolved: ResolvedToken,
        until_ms: u64,
        now_ms: u64,
        generation: u64,
    ) {
        if self.capacity == 0 || until_ms <= now_ms {
            return;
        }
        let mut entries = lock(&self.entries);
        if entries.generation != generation {
            return;
        }
        if entries.map.len() >= self.capacity && !entries.map.contains_key(&key) {
            if now_ms >= entries.next_sweep_ms {
                entries.map.retain(|_, entry| now_ms < entry.until_ms);
                entries.next_sweep_ms = now_ms.saturating_add(1_000);
            }
            if entries.map.len() >= self.capacity {
                // The map's random hashing makes the first key an arbitrary one.
                if let Some(victim) = entries.map.keys().next().copied() {
                    entries.map.remove(&victim);
                }
            }
        }
        entries.map.insert(
            key,
            Entry {
                resolved: Arc::new(resolved),
                until_ms,
            },
        );
    }

    /// Forgets entries `drop` picks (and bumps the generation, even if none was cached:
    /// a look-up in flight must not store what a logout just ended). Returns how many.
    pub(crate) fn invalidate(&self, mut drop: impl FnMut(&Key, &ResolvedToken) -> bool) -> usize {
        let mut entries = lock(&self.entries);
        entries.generation = entries.generation.wrapping_add(1);
        // Requests that arrive from now on start a flight of their own: one already in the air
        // may carry the answer from before the logout. (Its waiters keep their share of it; its
        // guard removes only its own flight.)
        lock(&self.flights).clear();
        let before = entries.map.len();
        entries.map.retain(|key, entry| !drop(key, &entry.resolved));
        before - entries.map.len()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).map.len()
    }

    /// The flight for `key`: the one in progress, or a new one. Hold the guard while waiting.
    pub(crate) fn join(&self, key: Key) -> FlightGuard<'_> {
        let flight = lock(&self.flights).entry(key).or_default().clone();
        FlightGuard {
            flights: &self.flights,
            key,
            flight,
        }
    }

    #[cfg(test)]
    pub(crate) fn flights_len(&self) -> usize {
        lock(&self.flights).len()
    }
}

/// A request's share of a flight. Dropping it (done, or cancelled) takes the flight out of the
/// map once it has an outcome or nobody else waits on it, so that the map never keeps flights
/// nobody will finish.
pub(crate) struct FlightGuard<'a> {
    flights: &'a Mutex<KeyMap<Flight>>,
    key: Key,
    pub(crate) flight: Flight,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut flights = lock(self.flights);
        let ours = flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // Two references: the map's and ours (joining takes the same lock).
        if ours && (self.flight.initialized() || Arc::strong_count(&self.flight) == 2) {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice(device: &str) -> ResolvedToken {
        ResolvedToken::user("@alice:example.org").device_id(device)
    }

    #[test]
    fn ttl_capacity_invalidation() {
        let cache = Cache::new(2);
        let (a, b, c) = (key("a"), key("b"), key("c"));
        let g = cache.generation();
        cache.insert(a, alice("A"), 1_000, 0, g);
        assert_eq!(cache.get(&a, 999).unwrap().device_id.as_deref(), Some("A"));
        assert!(cache.get(&a, 1_000).is_none(), "expired entries are gone");
        assert_eq!(cache.len(), 0);
        // Already expired: not stored.
        cache.insert(a, alice("A"), 5, 5, g);
        assert_eq!(cache.len(), 0);
        // Bounded: the third entry evicts an expired one first, otherwise any one.
        cache.insert(a, alice("A"), 10, 0, g);
        cache.insert(b, alice("B"), 1_000, 0, g);
        cache.insert(c, alice("C"), 1_000, 20, g);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&b, 21).is_some() && cache.get(&c, 21).is_some());
        cache.insert(a, alice("A"), 1_000, 21, g);
        assert_eq!(cache.len(), 2);
        // Invalidation by device, and a look-up from before it stores nothing.
        let before = cache.generation();
        let dropped = cache.invalidate(|_, r| r.device_id.as_deref() == Some("A"));
        assert!(dropped <= 1);
        cache.insert(a, alice("A"), 1_000, 21, before);
        assert!(cache.get(&a, 22).is_none());
        // A zero-capacity cache keeps nothing.
        let off = Cache::new(0);
        off.insert(a, alice("A"), 1_000, 0, off.generation());
        assert!(off.get(&a, 1).is_none());
    }

    #[test]
    fn flights_are_shared_and_cleaned_up() {
        let cache = Cache::new(1);
        let one = cache.join(key("t"));
        let two = cache.join(key("t"));
        assert!(Arc::ptr_eq(&one.flight, &two.flight));
        assert_eq!(cache.flights_len(), 1);
        drop(one);
        assert_eq!(cache.flights_len(), 1, "someone still waits");
        drop(two);
        assert_eq!(
            cache.flights_len(),
            0,
            "a cancelled flight nobody waits on goes"
        );
    }
}
