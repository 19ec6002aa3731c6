#![doc = include_str!("../../docs/store.md")]

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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

/// What a `/v3/refresh` does with a *replay*: a refresh token of a session that is still logged
/// in, whose successor (or a later generation) has been used. A successor replaced before anyone
/// used it (two tabs refreshed the same token) shares the grace window of the token whose refresh
/// minted it; outside it, it is refused but is no replay: nobody else used the session through it. See [`Sessions::refresh_policy`](crate::Sessions::refresh_policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReplayAction {
    /// Refuse it (`401 M_UNKNOWN_TOKEN`); the session goes on. The default, as MSC2918 and
    /// Synapse.
    #[default]
    Refuse,
    /// Refuse it and log the whole session out, every generation (RFC 6819 §5.2.2.3: two
    /// parties hold the session, and the server cannot tell which one is legitimate).
    RevokeSession,
}

/// How `/v3/refresh` treats replays: a grace window and what happens outside it. The default is
/// MSC2918's behaviour: no grace, a replay is refused. `/r0/tokenrefresh` ignores it (strictly
/// single use: of concurrent calls exactly one wins, the others are refused and nothing more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
pub struct RefreshPolicy {
    grace_ms: u64,
    on_replay: ReplayAction,
}

impl RefreshPolicy {
    /// MSC2918's behaviour: no grace, replays refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// A replay of a refresh token within `grace` of that token's first refresh (a client that
    /// lost the response, or two of its tabs racing) gets a fresh pair of the generation in use
    /// instead of an error, as tuwunel's `refresh_token_reuse_grace`. Only the generation most
    /// recently refreshed has a grace (shared with the successors its refreshes minted that were
    /// replaced before anyone used them): once anything is refreshed again, it has none left.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// What a replay outside the grace window does.
    pub fn on_replay(mut self, action: ReplayAction) -> Self {
        self.on_replay = action;
        self
    }

    /// The grace window, in ms.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// What a replay outside the grace window does.
    pub fn replay_action(&self) -> ReplayAction {
        self.on_replay
    }
}

/// One refresh, as the store is asked to record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefreshRequest {
    /// Which endpoint.
    pub mode: RefreshMode,
    /// When every token of the session, the successor's included, has stopped verifying.
    pub until_ms: u64,
    /// Now, on the issuer's clock (the instant the successor is minted at).
    pub now_ms: u64,
    /// The replay policy (applied in [`RefreshMode::Rotating`] only).
    pub policy: RefreshPolicy,
}

impl RefreshRequest {
    /// A refresh at `now_ms` whose session's tokens have all stopped verifying by `until_ms`,
    /// with the default policy.
    pub fn new(mode: RefreshMode, until_ms: u64, now_ms: u64) -> Self {
        Self {
            mode,
            until_ms,
            now_ms,
            policy: RefreshPolicy::default(),
        }
    }

    /// With `policy`.
    pub fn policy(mut self, policy: RefreshPolicy) -> Self {
        self.policy = policy;
        self
    }
}

/// What a store decided about one refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshOutcome {
    /// Mint this generation: the successor.
    Granted(u32),
    /// A replay within the grace window: mint this generation, the one in use, again.
    GrantedInGrace(u32),
    /// Refused: the token is revoked (its session logged out, its user logged out everywhere,
    /// or used at `/r0/tokenrefresh`).
    Refused,
    /// Refused as a replay outside the grace window; `session_revoked`: the policy logged the
    /// session out for it.
    Replayed {
        /// Whether the session was logged out.
        session_revoked: bool,
    },
}

impl RefreshOutcome {
    /// The generation to mint, if granted.
    pub fn generation(self) -> Option<u32> {
        match self {
            Self::Granted(generation) | Self::GrantedInGrace(generation) => Some(generation),
            Self::Refused | Self::Replayed { .. } => None,
        }
    }
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
    /// The refresh record: the generation last refreshed at `/v3/refresh` (`None`: none yet),
    /// when it was first refreshed (ms since the epoch), and `next_generation` right after its
    /// latest refresh. While `next_generation` still equals that, nothing was refreshed since (at
    /// either endpoint, by any process of any release): the record is current, and a replay of
    /// that generation within [`RefreshPolicy::grace`] of its first refresh gets a pair. The
    /// PostgreSQL store keeps the record in the row only (its processes' views do not follow
    /// it; a replay is always decided from the row).
    pub refreshed_generation: Option<u32>,
    /// See `refreshed_generation`.
    pub refreshed_at_ms: u64,
    /// See `refreshed_generation`.
    pub refreshed_next: u32,
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
            refreshed_generation: None,
            refreshed_at_ms: 0,
            refreshed_next: 0,
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

    /// Consumes a refresh token of `generation`: the generation to mint, or why not. A later
    /// refresh of the same token replaces an unused successor (MSC2918); a replay (see
    /// [`ReplayAction`]) of a [`RefreshMode::Rotating`] refresh follows `request.policy`.
    pub fn refresh(&mut self, generation: u32, request: &RefreshRequest) -> RefreshOutcome {
        match self.verdict(generation) {
            Verdict::Revoked if self.revoked => return RefreshOutcome::Refused,
            Verdict::Revoked => return self.replay(generation, request),
            Verdict::Promote => self.promote(generation),
            Verdict::Active => {}
        }
        let successor = self.next_generation;
        let Some(next) = successor.checked_add(1) else {
            return RefreshOutcome::Refused;
        };
        self.next_generation = next;
        match request.mode {
            RefreshMode::Rotating => {
                self.pending_generation = Some(successor);
                // The grace window runs from a token's first refresh, not from a retry's.
                if self.refreshed_generation != Some(generation) {
                    self.refreshed_generation = Some(generation);
                    self.refreshed_at_ms = request.now_ms;
                }
                self.refreshed_next = next;
            }
            // Used up at once, for good. Leaving the record as it is makes it stale (`next`
            // moved on): no window for this token, nor for an older one.
            RefreshMode::SingleUse => {
                self.live_generation = successor;
                self.pending_generation = None;
            }
        }
        self.until_ms = self.until_ms.max(request.until_ms);
        self.version += 1;
        RefreshOutcome::Granted(successor)
    }

    /// A refresh token of a session still logged in, which the session has moved past.
    fn replay(&mut self, generation: u32, request: &RefreshRequest) -> RefreshOutcome {
        if request.mode == RefreshMode::SingleUse {
            return RefreshOutcome::Refused;
        }
        // The generation last refreshed, if nothing was refreshed since.
        let last = self
            .refreshed_generation
            .filter(|_| self.refreshed_next == self.next_generation);
        // Minted by the last generation's refreshes and not in use: replaced before anyone used
        // it (only one of them can have been used: the one in use).
        let minted_by_last = last.is_some_and(|last| generation > last);
        let policy = request.policy;
        let in_window = request.now_ms < self.refreshed_at_ms.saturating_add(policy.grace_ms);
        if in_window && (last == Some(generation) || minted_by_last) {
            // The pair minted is of the generation in use: valid at once, and as strong as what
            // the client that moved the session on holds, no more.
            if request.until_ms > self.until_ms {
                self.until_ms = request.until_ms;
                self.version += 1;
            }
            return RefreshOutcome::GrantedInGrace(self.live_generation);
        }
        // Never used (above the generation in use, which only grows, or replaced before use):
        // refused, and no replay.
        if generation > self.live_generation || minted_by_last {
            return RefreshOutcome::Refused;
        }
        let session_revoked = policy.on_replay == ReplayAction::RevokeSession;
        if session_revoked {
            self.revoke(request.until_ms);
        }
        RefreshOutcome::Replayed { session_revoked }
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
    /// Atomically consumes a refresh token, by [`SessionState::refresh`]'s rules; refused if its
    /// user logged out everywhere since its session began.
    fn refresh(
        &self,
        token: &TokenRef,
        request: &RefreshRequest,
    ) -> StoreFuture<'_, RefreshOutcome>;

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
        request: &RefreshRequest,
    ) -> StoreFuture<'_, RefreshOutcome> {
        (**self).refresh(token, request)
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

    fn rotating(until_ms: u64) -> RefreshRequest {
        RefreshRequest::new(RefreshMode::Rotating, until_ms, 1_000)
    }

    fn single_use(until_ms: u64) -> RefreshRequest {
        RefreshRequest::new(RefreshMode::SingleUse, until_ms, 1_000)
    }

    fn granted(outcome: RefreshOutcome) -> Option<u32> {
        match outcome {
            RefreshOutcome::Granted(generation) => Some(generation),
            _ => None,
        }
    }

    #[test]
    fn rotating_refresh_keeps_the_old_generation_until_the_new_one_is_used() {
        let mut s = SessionState::default();
        assert_eq!(granted(s.refresh(0, &rotating(10))), Some(1));
        assert_eq!(
            (s.verdict(0), s.verdict(1)),
            (Verdict::Active, Verdict::Promote)
        );
        // Refreshing the old token again replaces the unused successor.
        assert_eq!(granted(s.refresh(0, &rotating(10))), Some(2));
        assert_eq!(
            (s.verdict(1), s.verdict(2)),
            (Verdict::Revoked, Verdict::Promote)
        );
        s.promote(2);
        assert_eq!(
            (s.verdict(0), s.verdict(2)),
            (Verdict::Revoked, Verdict::Active)
        );
        assert_eq!(
            s.refresh(0, &rotating(10)),
            RefreshOutcome::Replayed {
                session_revoked: false
            }
        );
        assert_eq!(
            s.verdict(2),
            Verdict::Active,
            "a refused replay changes nothing"
        );
    }

    #[test]
    fn single_use_refresh_revokes_at_once() {
        let mut s = SessionState::default();
        assert_eq!(granted(s.refresh(0, &single_use(10))), Some(1));
        assert_eq!(
            (s.verdict(0), s.verdict(1)),
            (Verdict::Revoked, Verdict::Active)
        );
        assert_eq!(s.refresh(0, &single_use(10)), RefreshOutcome::Refused);
        // Using the pending successor of a rotating refresh also counts as its first use.
        let mut s = SessionState::default();
        s.refresh(0, &rotating(10));
        assert_eq!(granted(s.refresh(1, &single_use(10))), Some(2));
        assert_eq!(
            (s.verdict(0), s.verdict(1), s.verdict(2)),
            (Verdict::Revoked, Verdict::Revoked, Verdict::Active)
        );
    }

    #[test]
    fn logout_revokes_every_generation() {
        let mut s = SessionState::default();
        s.refresh(0, &rotating(10));
        s.revoke(20);
        assert_eq!(
            (s.verdict(0), s.verdict(1), s.until_ms),
            (Verdict::Revoked, Verdict::Revoked, 20)
        );
        assert_eq!(s.refresh(1, &rotating(30)), RefreshOutcome::Refused);
    }

    /// A session refreshed at t = 1,000 (generation 0 → 1) and moved on (1 used).
    fn moved_on() -> SessionState {
        let mut s = SessionState::default();
        s.refresh(0, &rotating(10));
        s.promote(1);
        s
    }

    #[test]
    fn a_replay_within_the_grace_window_gets_the_generation_in_use() {
        let policy = RefreshPolicy::new().grace(Duration::from_millis(500));
        let mut s = moved_on();
        let at = |now_ms| RefreshRequest::new(RefreshMode::Rotating, 40, now_ms).policy(policy);
        assert_eq!(s.refresh(0, &at(1_499)), RefreshOutcome::GrantedInGrace(1));
        assert_eq!((s.live_generation, s.pending_generation), (1, None));
        assert_eq!(
            s.until_ms, 40,
            "the pair minted again is kept as long as it verifies"
        );
        // Counted from the first refresh of generation 0: the window has closed.
        assert_eq!(
            s.refresh(0, &at(1_500)),
            RefreshOutcome::Replayed {
                session_revoked: false
            }
        );
    }

    #[test]
    fn the_window_runs_from_the_first_refresh_not_from_a_retry() {
        let policy = RefreshPolicy::new().grace(Duration::from_millis(500));
        let at = |now_ms| RefreshRequest::new(RefreshMode::Rotating, 40, now_ms).policy(policy);
        let mut s = SessionState::default();
        assert_eq!(s.refresh(0, &at(1_000)), RefreshOutcome::Granted(1));
        // The response was lost; the retry replaces the unused successor.
        assert_eq!(s.refresh(0, &at(1_400)), RefreshOutcome::Granted(2));
        s.promote(2);
        assert_eq!(s.refreshed_at_ms, 1_000);
        assert!(matches!(
            s.refresh(0, &at(1_600)),
            RefreshOutcome::Replayed { .. }
        ));
    }

    #[test]
    fn only_the_generation_most_recently_refreshed_has_a_grace() {
        let policy = RefreshPolicy::new().grace(Duration::from_secs(60));
        let at = |now_ms| RefreshRequest::new(RefreshMode::Rotating, 40, now_ms).policy(policy);
        let mut s = moved_on();
        assert_eq!(s.refresh(1, &at(1_100)), RefreshOutcome::Granted(2));
        s.promote(2);
        assert!(matches!(
            s.refresh(0, &at(1_200)),
            RefreshOutcome::Replayed { .. }
        ));
        assert_eq!(s.refresh(1, &at(1_200)), RefreshOutcome::GrantedInGrace(2));
    }

    /// Two tabs refreshed the same token before either used its successor: the one replaced
    /// was never used, so presenting it is no replay, and "revoke" leaves the session alone;
    /// within the window it gets a pair, as the token both tabs refreshed does.
    #[test]
    fn a_successor_replaced_before_its_first_use_is_refused_but_no_replay() {
        let policy = RefreshPolicy::new()
            .grace(Duration::from_secs(60))
            .on_replay(ReplayAction::RevokeSession);
        let at = |now_ms| RefreshRequest::new(RefreshMode::Rotating, 40, now_ms).policy(policy);
        let mut s = SessionState::default();
        assert_eq!(s.refresh(0, &at(1_000)), RefreshOutcome::Granted(1));
        assert_eq!(s.refresh(0, &at(1_001)), RefreshOutcome::Granted(2));
        // Above the generation in use, within the window: the pair in use.
        assert_eq!(s.refresh(1, &at(1_002)), RefreshOutcome::GrantedInGrace(0));
        s.promote(2);
        // Below it now, but minted by the recorded generation's refreshes.
        assert_eq!(s.refresh(1, &at(1_003)), RefreshOutcome::GrantedInGrace(2));
        assert_eq!(s.refresh(0, &at(1_004)), RefreshOutcome::GrantedInGrace(2));
        // Outside the window: refused, and still no replay for the one never used.
        assert_eq!(s.refresh(1, &at(61_000)), RefreshOutcome::Refused);
        assert_eq!((s.revoked, s.verdict(2)), (false, Verdict::Active));
        assert_eq!(
            s.refresh(0, &at(61_000)),
            RefreshOutcome::Replayed {
                session_revoked: true
            }
        );
    }

    #[test]
    fn a_replay_outside_the_grace_window_can_revoke_the_whole_session() {
        let policy = RefreshPolicy::new()
            .grace(Duration::from_millis(500))
            .on_replay(ReplayAction::RevokeSession);
        let at = |now_ms| RefreshRequest::new(RefreshMode::Rotating, 70, now_ms).policy(policy);
        let mut s = moved_on();
        assert_eq!(s.refresh(0, &at(1_200)), RefreshOutcome::GrantedInGrace(1));
        assert!(!s.revoked);
        assert_eq!(
            s.refresh(0, &at(2_000)),
            RefreshOutcome::Replayed {
                session_revoked: true
            }
        );
        assert_eq!(
            (s.verdict(0), s.verdict(1), s.until_ms),
            (Verdict::Revoked, Verdict::Revoked, 70)
        );
        assert_eq!(s.refresh(1, &at(2_001)), RefreshOutcome::Refused);
    }

    #[test]
    fn the_single_use_endpoint_ignores_the_policy() {
        let policy = RefreshPolicy::new()
            .grace(Duration::from_secs(60))
            .on_replay(ReplayAction::RevokeSession);
        let mut s = SessionState::default();
        let request = single_use(10).policy(policy);
        assert_eq!(s.refresh(0, &request), RefreshOutcome::Granted(1));
        // Within the grace window and with "revoke": the loser of a race is only refused.
        assert_eq!(s.refresh(0, &request), RefreshOutcome::Refused);
        assert_eq!((s.revoked, s.verdict(1)), (false, Verdict::Active));
        // Nor does a token used up there get a grace at /v3/refresh: its record is stale.
        let rotating = RefreshRequest::new(RefreshMode::Rotating, 10, 1_000).policy(policy);
        assert_eq!(
            s.refresh(0, &rotating),
            RefreshOutcome::Replayed {
                session_revoked: true
            }
        );
        // And a rotating refresh in grace loses it to a single-use one of the next generation.
        let mut s = SessionState::default();
        s.refresh(0, &rotating);
        assert_eq!(s.refresh(1, &request), RefreshOutcome::Granted(2));
        assert!(matches!(
            s.refresh(0, &rotating),
            RefreshOutcome::Replayed { .. }
        ));
    }
}
