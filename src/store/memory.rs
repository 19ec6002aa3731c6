//! The in-memory revocation store: the default, for a homeserver running as one process.
//!
//! Memory stays bounded: an entry is kept only until every token it revokes would have expired
//! anyway (entries for tokens that never expire stay). State is lost when the process restarts;
//! use the PostgreSQL store where that matters.

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::clock::{Clock, SystemClock};
use crate::identity::MatrixUser;
use crate::revocation::{Revocation, RevocationCheck, RevocationStatus};
use crate::store::view::{Judgement, View};
use crate::store::{RefreshMode, StoreFuture, TokenRef, TokenStore};

/// Revocation state in this process's memory. Cloning shares the state.
#[derive(Clone)]
pub struct MemoryStore {
    view: Arc<RwLock<View>>,
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
            view: Arc::default(),
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

    /// Forgets every entry whose tokens have all expired, now.
    pub fn sweep(&self) {
        let now = self.clock.now_ms();
        self.write().sweep(now);
    }

    fn read(&self) -> RwLockReadGuard<'_, View> {
        // Every update is a single insert or field write, so a lock poisoned by a panic elsewhere
        // still guards consistent maps.
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self, user: &MatrixUser) -> RevocationStatus {
        let judgement = self.read().judge(user);
        match judgement {
            Judgement::Active => RevocationStatus::Active,
            Judgement::Revoked => RevocationStatus::Revoked,
            Judgement::Promote(session, generation) => {
                let mut view = self.write();
                let state = view.sessions.entry(session).or_default();
                if state.verdict(generation) == crate::store::Verdict::Revoked {
                    RevocationStatus::Revoked
                } else {
                    state.promote(generation);
                    RevocationStatus::Active
                }
            }
        }
    }

    /// Applies `change` to a session's state, then sweeps if due.
    fn with_session<T>(
        &self,
        token: &TokenRef,
        change: impl FnOnce(&mut crate::store::SessionState) -> T,
    ) -> T {
        let now = self.clock.now_ms();
        let mut view = self.write();
        let outcome = change(view.sessions.entry(token.session).or_default());
        view.sweep_if_due(now);
        outcome
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
        let outcome = if self.read().user_revoked(&token.user_id, token.issued_ms) {
            None
        } else {
            self.with_session(token, |s| s.refresh(token.generation, mode, until_ms))
        };
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        self.with_session(token, |s| s.revoke(until_ms));
        Box::pin(std::future::ready(Ok(())))
    }

    fn revoke_user(&self, user_id: &str, before_ms: u64) -> StoreFuture<'_, ()> {
        self.write().merge_user(user_id, before_ms);
        Box::pin(std::future::ready(Ok(())))
    }

    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        let first = self.with_session(token, |s| {
            let first = !s.revoked;
            s.revoke(until_ms);
            first
        });
        Box::pin(std::future::ready(Ok(first)))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.read();
        f.debug_struct("MemoryStore")
            .field("sessions", &view.sessions.len())
            .field("users", &view.users.len())
            .finish()
    }
}
