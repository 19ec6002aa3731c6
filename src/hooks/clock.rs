//! Where the layer gets the time for `time` caveats, so tests can set it instead of sleeping.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time, in milliseconds since the Unix epoch (UTC).
pub trait Clock: Send + Sync + 'static {
    /// The current time in ms since the epoch.
    fn now_ms(&self) -> u64;
}

/// A closure is a clock:
///
/// ```
/// use tower_matrix_auth::{Verifier, hooks::Clock};
/// # let keys = tower_matrix_auth::KeyRing::new();
/// let verifier = Verifier::new(keys).clock(|| 1_700_000_000_000);
/// assert_eq!(verifier.now_ms(), 1_700_000_000_000);
/// ```
impl<F> Clock for F
where
    F: Fn() -> u64 + Send + Sync + 'static,
{
    fn now_ms(&self) -> u64 {
        self()
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is a broken machine; treating it as the epoch fails closed for
        // `time >` caveats and keeps `time <` tokens valid no longer than they would be anyway.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
    }
}

/// A clock that stands still until told to move: for tests. Clones share the same time.
///
/// ```
/// use tower_matrix_auth::hooks::{Clock, ManualClock};
/// let clock = ManualClock::new(1_700_000_000_000);
/// let same = clock.clone();
/// clock.advance_ms(60_000);
/// assert_eq!(same.now_ms(), 1_700_000_060_000);
/// ```
#[derive(Clone, Default)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            now_ms: Arc::new(AtomicU64::new(now_ms)),
        }
    }

    /// Sets the time.
    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward.
    pub fn advance_ms(&self, by_ms: u64) {
        self.now_ms.fetch_add(by_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock").field(&self.now_ms()).finish()
    }
}
/// A duration in whole milliseconds, the unit of `time` caveats (saturating: a lifetime of
/// `Duration::MAX` is as good as none, but stays a lifetime).
pub(crate) fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
