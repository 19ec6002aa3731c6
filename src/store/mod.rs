#![doc = include_str!("../../docs/store.md")]

use std::future::Future;
use std::pin::Pin;

use crate::hooks::revocation::{BackendError, Revocation};
use crate::identity::MatrixUser;
use crate::lifecycle::nonce::{SessionId, TokenNonce};

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
pub(crate) mod view;

/// A boxed future returned by store operations (off the request hot path).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

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
#[non_exhaustive]
pub struct TokenRef {
    /// The token's user: a session's state belongs to one user, and no other user's token can
    /// read or change it.
    pub user_id: String,
    /// Its session: from the issuer's session nonce for tokens minted here, from the token id
    /// otherwise.
    pub session: SessionId,
    /// Its generation (0 for tokens minted elsewhere).
    pub generation: u32,
    /// The user's "log out everywhere" floor when its session began (0 for tokens minted
    /// elsewhere, so that any log-out-everywhere catches them).
    pub epoch: u64,
}

/// A token's place in the revocation state, without copying anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) session: SessionId,
    pub(crate) generation: u32,
    pub(crate) epoch: u64,
    /// The issuer's session nonce names another kind of token than the token's `type`: refused.
    pub(crate) contradicts_type: bool,
}

/// The session of a token that is a session of its own: its id, as a session id.
fn session_of(id: crate::identity::TokenId) -> SessionId {
    SessionId::from_u128(u128::from_le_bytes(*id.as_bytes()))
}

/// Where a verified token sits. Tokens without the issuer's session nonce (minted elsewhere, or
/// with a nonce a holder appended) are a session of their own, generation 0, epoch 0.
pub(crate) fn position(user: &MatrixUser) -> Position {
    match TokenNonce::of(user) {
        Some(nonce) => Position {
            session: nonce.session,
            generation: nonce.generation,
            epoch: nonce.epoch,
            contradicts_type: !nonce.matches(user.token_type()),
        },
        None => Position {
            session: session_of(user.token_id()),
            generation: 0,
            epoch: 0,
            contradicts_type: false,
        },
    }
}

impl TokenRef {
    /// The store's view of a verified token.
    pub fn of(user: &MatrixUser) -> Self {
        let position = position(user);
        Self {
            user_id: user.user_id().to_owned(),
            session: position.session,
            generation: position.generation,
            epoch: position.epoch,
        }
    }
}

impl TokenRef {
    /// A single-use token minted elsewhere, known by the HMAC chain value through its first
    /// `time <` caveat (what its minter wrote; a holder can only append after it).
    pub(crate) fn single_use(user: &MatrixUser, chain: &[u8; 32]) -> Self {
        Self {
            user_id: user.user_id().to_owned(),
            session: session_of(crate::identity::TokenId::from_signature(chain)),
            generation: 0,
            epoch: 0,
        }
    }
}

/// Until when a store must keep what it records about `user`'s token (its logout, its use) so
/// that the record outlives every token it speaks for, plus the clock leeway; `u64::MAX` when one
/// of them may have no `time <`, since such a token verifies for as long as its key is in the
/// ring. The record speaks for:
/// * with the issuer's session nonce: every token of the session, whose latest `time <` the
///   nonce carries;
/// * with another nonce: every token whose first nonce it is, the minter's and its attenuations
///   alike, which all expire by the earliest `time <` written before that nonce (a `time <` after
///   it may be a holder's);
/// * without a nonce: this very token (its id is its signature).
pub(crate) fn keep_until_ms(user: &MatrixUser, leeway_ms: u64) -> u64 {
    let expires = match TokenNonce::of(user) {
        Some(nonce) => nonce.session_expires_ms,
        None if user.nonce().is_some() => user.nonce_expiry_ms(),
        None => user.expires_at_ms(),
    };
    expires.map_or(u64::MAX, |at| at.saturating_add(leeway_ms))
}

/// A user id's key in a view: a keyed hash (the key random per process), compared on every
/// read and write of a session's state so that no user's token reaches another user's session.
pub(crate) fn user_key(user_id: &str) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(Default::default).hash_one(user_id)
}

/// The revocation state of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionState {
    /// The generation in use; older ones are revoked.
    pub live_generation: u32,
    /// A generation a refresh minted that has not been used yet.
    pub pending_generation: Option<u32>,
    /// The generation the next refresh mints.
    pub next_generation: u32,
    /// Logged out: every generation is revoked.
    pub revoked: bool,
    /// When every token this state speaks for has stopped verifying (its `time <` plus the
    /// leeway), so it can be forgotten: ms since the epoch, `u64::MAX` for tokens that never
    /// expire.
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
    /// [`RefreshMode::SingleUse`]), or its user logged out everywhere since its session began.
    /// `until_ms` is when every token of the session, the successor's included, has stopped
    /// verifying.
    fn refresh(
        &self,
        token: &TokenRef,
        mode: RefreshMode,
        until_ms: u64,
    ) -> StoreFuture<'_, Option<u32>>;

    /// Logs out the token's session (every generation of it), keeping that until `until_ms`.
    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()>;

    /// Logs the user out everywhere: raises their floor above every epoch handed out so far
    /// (and to at least `at_least`), which revokes every session that began before, whatever
    /// generation it has reached. Returns the new floor.
    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64>;

    /// The user's floor as this process knows it now: the epoch of a session that begins now.
    /// From memory, never a round trip.
    fn user_floor(&self, user_id: &str) -> u64;

    /// Marks a single-use token (a login token) used, keeping that until `until_ms`; `Ok(false)`
    /// if it already was.
    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool>;
}

impl<T: TokenStore + ?Sized> TokenStore for std::sync::Arc<T> {
    fn refresh(
        &self,
        token: &TokenRef,
        mode: RefreshMode,
        until_ms: u64,
    ) -> StoreFuture<'_, Option<u32>> {
        (**self).refresh(token, mode, until_ms)
    }
    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        (**self).revoke_session(token, until_ms)
    }
    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64> {
        (**self).revoke_user(user_id, at_least)
    }
    fn user_floor(&self, user_id: &str) -> u64 {
        (**self).user_floor(user_id)
    }
    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        (**self).consume_once(token, until_ms)
    }
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
