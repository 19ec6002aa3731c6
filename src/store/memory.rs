//! The in-memory revocation store: the default, for a homeserver running as one process.
//!
//! An entry is kept until every token it speaks for has stopped verifying: the latest `time <`
//! of its session plus the clock leeway. Entries for sessions with a token that never expires
//! (the default [`crate::Issuer`]: access tokens without refresh, and refresh tokens, have no
//! lifetime) are kept for as long as the process runs: give every token a lifetime to bound the
//! store (see `examples/revocation_memory.rs` for the figures). State is lost when the process
//! restarts; use the PostgreSQL store where that matters.

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::hooks::clock::{Clock, SystemClock};
use crate::hooks::revocation::{Revocation, RevocationCheck, RevocationStatus};
use crate::identity::MatrixUser;
use crate::store::view::{Judgement, View};
use crate::store::{
    RefreshOutcome, RefreshRequest, SessionState, StoreFuture, TokenRef, TokenStore, Verdict,
};

/// Revocation state in this process's memory. Cloning shares the state.
///
/// What it keeps, for how long, and what that costs: the [`store`](crate::store) module.
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
            // This store hears of every refresh: a generation it has not heard of was never minted.
            Judgement::Revoked | Judgement::Unheard(..) => RevocationStatus::Revoked,
            Judgement::Promote(at) => {
                let mut view = self.write();
                match view.state_mut(at.session, user.user_id()) {
                    Some(state) if state.verdict(at.generation) != Verdict::Revoked => {
                        state.promote(at.generation);
                        RevocationStatus::Active
                    }
                    _ => RevocationStatus::Revoked,
                }
            }
        }
    }

    /// Applies `change` to a session's state under one write lock (so a decision and its
    /// record cannot be split by another write), then sweeps if due. `None` if the session
    /// belongs to another user.
    fn with_session<T>(
        &self,
        token: &TokenRef,
        change: impl FnOnce(&mut SessionState, bool) -> T,
    ) -> Option<T> {
        let now = self.clock.now_ms();
        let mut view = self.write();
        let user_revoked = view.user_revoked(&token.user_id, token.epoch);
        let outcome = change(view.state_mut(token.session, &token.user_id)?, user_revoked);
        view.sweep_if_due(now);
        Some(outcome)
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
        request: &RefreshRequest,
    ) -> StoreFuture<'_, RefreshOutcome> {
        let outcome = self
            .with_session(token, |s, user_revoked| {
                if user_revoked {
                    RefreshOutcome::Refused
                } else {
                    s.refresh(token.generation, request)
                }
            })
            .unwrap_or(RefreshOutcome::Refused);
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        // Another user's session (which no token of this user can name): nothing to log out.
        self.with_session(token, |s, _| s.revoke(until_ms));
        Box::pin(std::future::ready(Ok(())))
    }

    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64> {
        let mut view = self.write();
        let floor = view.floor(user_id).saturating_add(1).max(at_least);
        view.merge_user(user_id, floor);
        Box::pin(std::future::ready(Ok(floor)))
    }

    fn user_floor(&self, user_id: &str) -> u64 {
        self.read().floor(user_id)
    }

    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        let first = self
            .with_session(token, |s, _| {
                let first = !s.revoked;
                s.revoke(until_ms);
                first
            })
            .unwrap_or(false);
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
