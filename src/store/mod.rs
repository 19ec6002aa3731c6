//! Revocation stores: the server-side state that lets self-contained tokens be logged out,
//! refreshed once, and used once (login tokens).
//!
//! Both backends share [`SessionState`], the rules of one session's generations, so memory and
//! PostgreSQL cannot disagree on what is valid.
//!
//! | token (session S, generation g) | valid while |
//! |---|---|
//! | g = S's live generation | S not logged out, user not logged out everywhere since it was minted |
//! | g = S's pending generation (minted by a refresh, not used yet) | same; its first use makes g live and revokes every older generation |
//! | any other g | never |

use std::future::Future;
use std::pin::Pin;

use crate::identity::MatrixUser;
use crate::issuer::{SessionId, TokenNonce};
use crate::revocation::{Revocation, RevocationError};

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub(crate) mod view;

/// A boxed future returned by store operations (off the request hot path).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RevocationError>> + Send + 'a>>;

/// How a refresh treats the refresh token it consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshMode {
    /// `POST /_matrix/client/v3/refresh` (MSC2918): the old tokens stay valid until the new
    /// access or refresh token is first used.
    Rotating,
    /// `POST /_matrix/client/r0/tokenrefresh` (the original spec): the used refresh token and the
    /// access token issued with it are invalid at once; of concurrent calls exactly one wins.
    SingleUse,
}

/// What the store needs to know about a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    /// The token's user.
    pub user_id: String,
    /// Its session: from the nonce for tokens minted here, from the token id otherwise.
    pub session: SessionId,
    /// Its generation (0 for tokens minted elsewhere).
    pub generation: u32,
    /// When it was minted (0 when unknown, so that "log out everywhere" catches it).
    pub issued_ms: u64,
}

/// A token's place in the revocation state, without copying anything: (session, generation,
/// issued_ms). Tokens minted elsewhere are a session of their own, generation 0, minted at 0.
pub(crate) fn position(user: &MatrixUser) -> (SessionId, u32, u64) {
    match TokenNonce::of(user) {
        Some(nonce) => (nonce.session, nonce.generation, nonce.issued_ms),
        None => (
            SessionId::from_u128(u128::from_le_bytes(*user.token_id().as_bytes())),
            0,
            0,
        ),
    }
}

impl TokenRef {
    /// The store's view of a verified token.
    pub fn of(user: &MatrixUser) -> Self {
        let (session, generation, issued_ms) = position(user);
        Self {
            user_id: user.user_id().to_owned(),
            session,
            generation,
            issued_ms,
        }
    }
}

/// The revocation state of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionState {
    /// The generation in use; older ones are revoked.
    pub live_generation: u32,
    /// A generation a refresh minted that has not been used yet.
    pub pending_generation: Option<u32>,
    /// The generation the next refresh mints.
    pub next_generation: u32,
    /// Logged out: every generation is revoked.
    pub revoked: bool,
    /// When every token this state speaks for has expired, so it can be forgotten (ms since the
    /// epoch; `u64::MAX` for tokens that never expire).
    pub until_ms: u64,
    /// Bumped by every change: orders updates that reach a process out of order.
    pub version: u64,
}

impl Default for SessionState {
    fn default() -> Self {
        Self {
            live_generation: 0,
            pending_generation: None,
            next_generation: 1,
            revoked: false,
            until_ms: 0,
            version: 0,
        }
    }
}

/// The verdict on one generation of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid.
    Active,
    /// Valid, and its first use: the store must make it live (revoking older generations).
    Promote,
    /// Revoked.
    Revoked,
}

impl SessionState {
    /// Judges a token of `generation`.
    pub fn verdict(&self, generation: u32) -> Verdict {
        if self.revoked {
            Verdict::Revoked
        } else if generation == self.live_generation {
            Verdict::Active
        } else if Some(generation) == self.pending_generation {
            Verdict::Promote
        } else {
            Verdict::Revoked
        }
    }

    /// Records the first use of the pending generation.
    pub fn promote(&mut self, generation: u32) {
        if Some(generation) == self.pending_generation {
            self.live_generation = generation;
            self.pending_generation = None;
            self.version += 1;
        }
    }

    /// Consumes a refresh token of `generation`; returns the generation to mint, or `None` if the
    /// token is revoked. A later refresh of the same token replaces an unused successor.
    pub fn refresh(&mut self, generation: u32, mode: RefreshMode, until_ms: u64) -> Option<u32> {
        match self.verdict(generation) {
            Verdict::Revoked => return None,
            Verdict::Promote => self.promote(generation),
            Verdict::Active => {}
        }
        let successor = self.next_generation;
        self.next_generation = self.next_generation.checked_add(1)?;
        match mode {
            RefreshMode::Rotating => self.pending_generation = Some(successor),
            RefreshMode::SingleUse => {
                self.live_generation = successor;
                self.pending_generation = None;
            }
        }
        self.until_ms = self.until_ms.max(until_ms);
        self.version += 1;
        Some(successor)
    }

    /// Logs the session out.
    pub fn revoke(&mut self, until_ms: u64) {
        self.revoked = true;
        self.until_ms = self.until_ms.max(until_ms);
        self.version += 1;
    }
}

/// A revocation store: answers the layer's check and records logouts, refreshes and used login
/// tokens. [`memory::MemoryStore`] is the default; `postgres::PostgresStore` (feature `postgres`)
/// shares the state between processes.
pub trait TokenStore: Revocation {
    /// Atomically consumes a refresh token; `Ok(None)` if it is revoked (or already used, in
    /// [`RefreshMode::SingleUse`]). `until_ms` is when the successor's tokens expire.
    fn refresh(
        &self,
        token: &TokenRef,
        mode: RefreshMode,
        until_ms: u64,
    ) -> StoreFuture<'_, Option<u32>>;

    /// Logs out the token's session (every generation of it).
    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()>;

    /// Logs the user out everywhere: every token minted before `before_ms` is revoked.
    fn revoke_user(&self, user_id: &str, before_ms: u64) -> StoreFuture<'_, ()>;

    /// Marks a single-use token (a login token) used; `Ok(false)` if it already was.
    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotating_refresh_keeps_the_old_generation_until_the_new_one_is_used() {
        let mut s = SessionState::default();
        assert_eq!(s.refresh(0, RefreshMode::Rotating, 10), Some(1));
        assert_eq!(
            (s.verdict(0), s.verdict(1)),
            (Verdict::Active, Verdict::Promote)
        );
        // Refreshing the old token again replaces the unused successor.
        assert_eq!(s.refresh(0, RefreshMode::Rotating, 10), Some(2));
        assert_eq!(
            (s.verdict(1), s.verdict(2)),
            (Verdict::Revoked, Verdict::Promote)
        );
        s.promote(2);
        assert_eq!(
            (s.verdict(0), s.verdict(2)),
            (Verdict::Revoked, Verdict::Active)
        );
        assert_eq!(s.refresh(0, RefreshMode::Rotating, 10), None);
    }

    #[test]
    fn single_use_refresh_revokes_at_once() {
        let mut s = SessionState::default();
        assert_eq!(s.refresh(0, RefreshMode::SingleUse, 10), Some(1));
        assert_eq!(
            (s.verdict(0), s.verdict(1)),
            (Verdict::Revoked, Verdict::Active)
        );
        assert_eq!(s.refresh(0, RefreshMode::SingleUse, 10), None);
        // Using the pending successor of a rotating refresh also counts as its first use.
        let mut s = SessionState::default();
        s.refresh(0, RefreshMode::Rotating, 10);
        assert_eq!(s.refresh(1, RefreshMode::SingleUse, 10), Some(2));
        assert_eq!(
            (s.verdict(0), s.verdict(1), s.verdict(2)),
            (Verdict::Revoked, Verdict::Revoked, Verdict::Active)
        );
    }

    #[test]
    fn logout_revokes_every_generation() {
        let mut s = SessionState::default();
        s.refresh(0, RefreshMode::Rotating, 10);
        s.revoke(20);
        assert_eq!(
            (s.verdict(0), s.verdict(1), s.until_ms),
            (Verdict::Revoked, Verdict::Revoked, 20)
        );
        assert_eq!(s.refresh(1, RefreshMode::Rotating, 30), None);
    }
}
