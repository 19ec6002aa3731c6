//! The failed-authentication limiter (feature `limiter`): per client address, a budget of token
//! checks that failed; past it, that address's requests whose token is not already known good
//! get `429 M_LIMIT_EXCEEDED` before any verification.
//! See [`FailureLimit`] for what counts and what is exempt.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The default bound on tracked addresses.
pub const DEFAULT_MAX_ADDRESSES: usize = 100_000;

/// How many failed token checks an address may make: `per_minute` at once, then one every
/// `60 s / per_minute` (a token bucket).
///
/// Every bad token costs a full verification (or a resolver or token-server call), and no
/// homeserver limits them today (Synapse, MAS and palpo limit `/login` only). What counts is a
/// token anyone could send at will that was checked and failed: forged, garbled, too long,
/// unknown to the key ring or to the resolver, or with a caveat that does not hold.
/// `M_MISSING_TOKEN` does not count: a request without a usable token costs nothing to refuse,
/// and clients send them legitimately (before login, on optional routes). Nor do expired, revoked
/// or deactivated tokens: they were minted here, clients send them in the ordinary course, and
/// counting them would limit busy addresses rather than attackers.
///
/// A token the verified-token cache holds, or an application service's `as_token`, passes even
/// from a limited address, so valid users behind the same NAT keep working once their token has
/// been seen. Not exempt: a valid macaroon the cache has not seen (a new login, a refreshed token,
/// one evicted from a full cache, any after a restart) and every opaque token (a resolver's
/// answers are not cached here); from a limited address they wait for the limit like the flood.
///
/// The buckets are `governor`'s, keyed by address; an IPv6 address by its /56, the smallest
/// block providers hand a customer (one host usually has a /64 to itself, and a /48 is 256 /56s,
/// so an attacker with one needs 256 times the budget, not 65,536 times). Memory is bounded: the
/// buckets of addresses that stopped failing are dropped as they refill, limits that ran out are
/// swept, and past `max_addresses` limited addresses one of them (effectively at random) gives
/// way to each new one.
/// Only if more than `max_addresses` addresses fail within one refill period does the limiter
/// forget every bucket (failing open for a moment rather than growing without bound).
///
/// ```
/// use tower_matrix_auth::layer::FailureLimit;
/// assert!(FailureLimit::per_minute(0).is_none(), "0 turns the limiter off");
/// let limit = FailureLimit::per_minute(30).unwrap().max_addresses(10_000);
/// # drop(limit);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
pub struct FailureLimit {
    per_minute: NonZeroU32,
    max_addresses: usize,
}

impl FailureLimit {
    /// `failures` per minute and address; `None` for 0 (no limit).
    pub fn per_minute(failures: u32) -> Option<Self> {
        Some(Self {
            per_minute: NonZeroU32::new(failures)?,
            max_addresses: DEFAULT_MAX_ADDRESSES,
        })
    }

    /// The most addresses tracked at once (default [`DEFAULT_MAX_ADDRESSES`], at least 1).
    pub fn max_addresses(mut self, max: usize) -> Self {
        self.max_addresses = max.max(1);
        self
    }
}

/// The limiter a layer holds.
pub(crate) struct FailureLimiter {
    quota: Quota,
    /// Replaced whole when a flood of addresses outgrows the bound.
    buckets: RwLock<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
    limited: Mutex<Limits>,
    /// How many addresses `limited` holds, so that the common case (none) takes no lock.
    limited_count: AtomicUsize,
    failures: AtomicUsize,
    max_addresses: usize,
}

/// Addresses over budget, and until when: only these are refused.
struct Limits {
    until: HashMap<IpAddr, Instant>,
    /// When expired limits are next swept.
    sweep_at: Instant,
}

/// An address as the limiter keys it: an IPv6 address by its /56.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 72) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl FailureLimiter {
    pub(crate) fn new(limit: FailureLimit) -> Self {
        let quota = Quota::per_minute(limit.per_minute);
        Self {
            quota,
            buckets: RwLock::new(RateLimiter::keyed(quota)),
            clock: DefaultClock::default(),
            limited: Mutex::new(Limits {
                until: HashMap::new(),
                sweep_at: Instant::now(),
            }),
            limited_count: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
            max_addresses: limit.max_addresses,
        }
    }

    fn limited(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limited.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any address is limited now: one atomic load, the whole cost on most requests.
    pub(crate) fn any_limited(&self) -> bool {
        self.limited_count.load(Ordering::Relaxed) > 0
    }

    /// How long `addr` is still limited, if it is. Limits that ran out are swept here, at most
    /// once a second, so that once an attack is over the fast path ([`Self::any_limited`])
    /// comes back.
    pub(crate) fn limited_for(&self, addr: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut limited = self.limited();
        if now >= limited.sweep_at {
            limited.until.retain(|_, until| *until > now);
            limited.sweep_at = now + Duration::from_secs(1);
            self.limited_count
                .store(limited.until.len(), Ordering::Relaxed);
        }
        let until = *limited.until.get(&key(addr))?;
        if until > now {
            return Some(until - now);
        }
        limited.until.remove(&key(addr));
        self.limited_count
            .store(limited.until.len(), Ordering::Relaxed);
        None
    }

    /// Counts a failed token check from `addr`; past the budget the address is limited until
    /// its bucket has a cell again.
    pub(crate) fn note_failure(&self, addr: IpAddr) {
        let addr = key(addr);
        let checked = self.buckets().check_key(&addr);
        if let Err(not_until) = checked {
            let wait = not_until.wait_time_from(self.clock.now());
            let limited = &mut self.limited().until;
            if limited.len() >= self.max_addresses && !limited.contains_key(&addr) {
                let now = Instant::now();
                limited.retain(|_, until| *until > now);
                if limited.len() >= self.max_addresses {
                    // Full of live limits: one gives way (the map's first, effectively random),
                    // rather than every limited address going free at once.
                    if let Some(evicted) = limited.keys().next().copied() {
                        limited.remove(&evicted);
                    }
                }
            }
            limited.insert(addr, Instant::now() + wait);
            self.limited_count.store(limited.len(), Ordering::Relaxed);
        }
        // Buckets of addresses that stopped failing are dropped once they are full again.
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures % 1024 == 0 || self.buckets().len() > self.max_addresses {
            let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
            buckets.retain_recent();
            if buckets.len() > self.max_addresses {
                // Still over: a flood from more addresses than the bound. Forget them all
                // rather than grow; they start from a full budget again.
                *buckets = RateLimiter::keyed(self.quota);
            }
            buckets.shrink_to_fit();
        }
    }

    fn buckets(&self) -> std::sync::RwLockReadGuard<'_, DefaultKeyedRateLimiter<IpAddr>> {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How many addresses have a bucket, and how many are limited (tests, the soak).
    pub(crate) fn tracked(&self) -> (usize, usize) {
        (self.buckets().len(), self.limited().until.len())
    }
}

impl fmt::Debug for FailureLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (tracked, limited) = self.tracked();
        f.debug_struct("FailureLimiter")
            .field("tracked", &tracked)
            .field("limited", &limited)
            .field("max_addresses", &self.max_addresses)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_minute: u32, max: usize) -> FailureLimiter {
        FailureLimiter::new(
            FailureLimit::per_minute(per_minute)
                .unwrap()
                .max_addresses(max),
        )
    }

    #[test]
    fn the_budget_then_a_limit() {
        let limiter = limiter(3, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            limiter.note_failure(a);
            assert!(limiter.limited_for(a).is_none());
        }
        assert!(!limiter.any_limited());
        limiter.note_failure(a);
        assert!(limiter.any_limited());
        let wait = limiter.limited_for(a).expect("over budget");
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(limiter.limited_for(b).is_none(), "another address is not");
    }

    #[test]
    fn ipv6_counts_by_its_56() {
        let limiter = limiter(1, 100);
        limiter.note_failure("2001:db8::1".parse().unwrap());
        limiter.note_failure("2001:db8:0:ff::2".parse().unwrap());
        assert!(limiter
            .limited_for("2001:db8::ffff".parse().unwrap())
            .is_some());
        assert!(limiter
            .limited_for("2001:db8:0:100::1".parse().unwrap())
            .is_none());
    }

    #[test]
    fn expired_limits_are_swept_and_the_fast_path_returns() {
        let limiter = limiter(60, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..61 {
            limiter.note_failure(a);
        }
        assert!(limiter.any_limited());
        // A limit of about a second, then more than a second for the sweep to be due.
        std::thread::sleep(Duration::from_millis(2_100));
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limiter.limited_for(b).is_none());
        assert!(!limiter.any_limited(), "{:?}", limiter.tracked());
    }

    #[test]
    fn a_full_map_of_limits_lets_one_go_not_all() {
        let limiter = limiter(1, 10);
        let addrs: Vec<IpAddr> = (0..11u32)
            .map(|i| IpAddr::from((0xc000_0200 + i).to_be_bytes()))
            .collect();
        // Three failures each: the eleventh address's bucket outgrows the bound of buckets, which
        // are all forgotten, so it needs one more failure than the others to be limited.
        for addr in &addrs {
            for _ in 0..3 {
                limiter.note_failure(*addr);
            }
        }
        let still = addrs
            .iter()
            .filter(|a| limiter.limited_for(**a).is_some())
            .count();
        assert_eq!(still, 10, "one gave way to the eleventh");
        assert!(
            limiter.limited_for(addrs[10]).is_some(),
            "the newest is limited"
        );
    }

    #[test]
    fn memory_stays_bounded_under_many_addresses() {
        let limiter = limiter(1, 1_000);
        for i in 0..50_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            limiter.note_failure(addr);
            limiter.note_failure(addr);
        }
        let (tracked, limited) = limiter.tracked();
        assert!(tracked <= 1_000, "{tracked} buckets");
        assert!(limited <= 1_000, "{limited} limited");
    }
}
