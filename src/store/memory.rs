//! The in-memory revocation store: the default, for a homeserver running as one process.
//!
//! Memory stays bounded: an entry is kept only until every token it revokes would have expired
//! anyway (entries for tokens that never expire stay). State is lost when the process restarts;
//! use the PostgreSQL store where that matters.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, RwLock};

use crate::clock::{Clock, SystemClock};
use crate::identity::MatrixUser;
use crate::issuer::SessionId;
use crate::revocation::{Revocation, RevocationCheck, RevocationStatus};
use crate::store::{
    position, RefreshMode, SessionState, StoreFuture, TokenRef, TokenStore, Verdict,
};

/// Session ids are 128 random bits (or a SHA-256 prefix) that no client can choose, so their low
/// 64 bits are already a good hash: no need to pay for SipHash on every request.
#[derive(Default)]
struct SessionIdHasher(u64);

impl Hasher for SessionIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a u128 is hashed; fold it in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }
}

type Sessions = HashMap<SessionId, SessionState, BuildHasherDefault<SessionIdHasher>>;

#[derive(Default)]
struct State {
    sessions: Sessions,
    /// User id → tokens minted before this instant are revoked ("log out everywhere").
    users: HashMap<Box<str>, u64>,
    /// Size of `sessions` after the last sweep: the next sweep waits until it doubles.
    swept_at_len: usize,
}

/// Revocation state in this process's memory. Cloning shares the state.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<RwLock<State>>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store using the system clock to forget expired entries.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Uses `clock` to decide which entries have expired.
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many sessions the store holds state for.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// Whether the store holds no session state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated (every update is a
        // single insert or field write), so a poisoned lock is still usable.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets entries whose tokens have all expired, amortized over the writes that grow the map.
    fn sweep_if_due(&self, state: &mut State) {
        if state.sessions.len() < 1024 || state.sessions.len() < state.swept_at_len * 2 {
            return;
        }
        let now = self.clock.now_ms();
        state.sessions.retain(|_, s| s.until_ms > now);
        state.swept_at_len = state.sessions.len();
    }

    /// Forgets every expired entry now.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        let mut state = self.write();
        state.sessions.retain(|_, s| s.until_ms > now);
        state.swept_at_len = state.sessions.len();
    }

    fn status(&self, user: &MatrixUser) -> RevocationStatus {
        let (session, generation, issued_ms) = position(user);
        let verdict = {
            let state = self.read();
            if !state.users.is_empty() {
                if let Some(&before) = state.users.get(user.user_id()) {
                    if issued_ms < before {
                        return RevocationStatus::Revoked;
                    }
                }
            }
            match state.sessions.get(&session) {
                None => {
                    // No refresh or logout ever touched this session: only generation 0 exists.
                    return if generation == 0 {
                        RevocationStatus::Active
                    } else {
                        RevocationStatus::Revoked
                    };
                }
                Some(s) => s.verdict(generation),
            }
        };
        match verdict {
            Verdict::Active => RevocationStatus::Active,
            Verdict::Revoked => RevocationStatus::Revoked,
            Verdict::Promote => {
                let mut state = self.write();
                let s = state.sessions.entry(session).or_default();
                match s.verdict(generation) {
                    Verdict::Revoked => RevocationStatus::Revoked,
                    _ => {
                        s.promote(generation);
                        RevocationStatus::Active
                    }
                }
            }
        }
    }
}

impl Revocation for MemoryStore {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        RevocationCheck::ready(Ok(self.status(user)))
    }
}

impl TokenStore for MemoryStore {
    fn refresh(
        &self,
        token: &TokenRef,
        mode: RefreshMode,
        until_ms: u64,
    ) -> StoreFuture<'_, Option<u32>> {
        let mut state = self.write();
        let revoked_user = state
            .users
            .get(token.user_id.as_str())
            .is_some_and(|&before| token.issued_ms < before);
        let outcome = if revoked_user {
            None
        } else {
            state.sessions.entry(token.session).or_default().refresh(
                token.generation,
                mode,
                until_ms,
            )
        };
        self.sweep_if_due(&mut state);
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        let mut state = self.write();
        state
            .sessions
            .entry(token.session)
            .or_default()
            .revoke(until_ms);
        self.sweep_if_due(&mut state);
        Box::pin(std::future::ready(Ok(())))
    }

    fn revoke_user(&self, user_id: &str, before_ms: u64) -> StoreFuture<'_, ()> {
        let mut state = self.write();
        let entry = state.users.entry(user_id.into()).or_insert(0);
        *entry = (*entry).max(before_ms);
        Box::pin(std::future::ready(Ok(())))
    }

    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        let mut state = self.write();
        let s = state.sessions.entry(token.session).or_default();
        let first = !s.revoked;
        s.revoke(until_ms);
        self.sweep_if_due(&mut state);
        Box::pin(std::future::ready(Ok(first)))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("MemoryStore")
            .field("sessions", &state.sessions.len())
            .field("users", &state.users.len())
            .finish()
    }
}
