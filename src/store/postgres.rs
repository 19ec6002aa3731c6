//! The PostgreSQL revocation store (feature `postgres`): the source of truth for several
//! homeserver processes.
//!
//! Checking a token costs no round trip: every process keeps the whole (small) revocation state
//! in memory, loaded at start and kept current with `LISTEN`/`NOTIFY`. Writes (logout, refresh,
//! login-token use, the first use of a refreshed token) are transactions that lock the session's
//! row, apply [`SessionState`]'s rules, and notify every process in commit order.
//!
//! The view must also be proven current: a heartbeat sent through the writing connection every
//! third of the freshness deadline has to come back on the listening one (notifications arrive
//! in commit order, so its return proves that every change committed before it was sent has been
//! applied). When a connection drops, or the view goes unproven for longer than the deadline
//! (10 s by default, see [`PostgresOptions`]), as it does behind a partition that drops packets
//! without a reset, the view may miss updates, so the store fails closed: every check answers an
//! error (the layer turns it into `503 M_UNKNOWN`) until it has reconnected and reloaded the whole
//! state, which one task per store keeps trying on its own (`liveness`).

use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio_postgres::Client;

use crate::hooks::clock::{Clock, SystemClock};
use crate::hooks::revocation::{BackendError, Revocation, RevocationCheck, RevocationStatus};
use crate::identity::MatrixUser;
use crate::lifecycle::nonce::SessionId;
use crate::store::view::{Judgement, View};
use crate::store::{RefreshMode, SessionState, StoreFuture, TokenRef, TokenStore, Verdict};

const CHANNEL: &str = "matrix_auth_revocations";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS matrix_auth_sessions (
    session_id TEXT PRIMARY KEY,
    live_generation BIGINT NOT NULL,
    pending_generation BIGINT,
    next_generation BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL,
    until_ms BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS matrix_auth_sessions_until ON matrix_auth_sessions (until_ms);
ALTER TABLE matrix_auth_sessions ADD COLUMN IF NOT EXISTS user_id TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS matrix_auth_users (
    user_id TEXT PRIMARY KEY,
    -- The user's floor: sessions whose epoch is below it are revoked.
    revoked_before_ms BIGINT NOT NULL
);";

mod absent;
mod liveness;

pub use liveness::PostgresOptions;

struct Shared {
    view: RwLock<View>,
    writer: tokio::sync::Mutex<Option<Client>>,
    clock: Arc<dyn Clock>,
    /// Connections, heartbeats, health: the `liveness` module's.
    liveness: liveness::Liveness,
    /// Sessions `judge_from_database` found no row for.
    absent: absent::AbsentRows,
}

#[doc = include_str!("../../docs/postgres_store.md")]
#[derive(Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    _supervisor: Arc<liveness::Supervisor>,
}

fn db_error(e: tokio_postgres::Error) -> BackendError {
    BackendError::new(e)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    if v == i64::MAX {
        u64::MAX
    } else {
        u64::try_from(v).unwrap_or(0)
    }
}

fn session_key(session: SessionId) -> String {
    format!("{:032x}", session.as_u128())
}

fn parse_session_key(text: &str) -> Option<SessionId> {
    u128::from_str_radix(text, 16)
        .ok()
        .map(SessionId::from_u128)
}

fn state_from_row(row: &tokio_postgres::Row) -> SessionState {
    let generation = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    SessionState {
        live_generation: generation(row.get("live_generation")),
        pending_generation: row
            .get::<_, Option<i64>>("pending_generation")
            .map(generation),
        next_generation: generation(row.get("next_generation")),
        revoked: row.get("revoked"),
        until_ms: to_u64(row.get("until_ms")),
        version: to_u64(row.get("version")),
    }
}

/// The notification for a session's new state:
/// `s <id> <live> <pending|-> <next> <revoked> <until> <version> <user id>` (user ids hold no
/// space).
fn session_payload(session: SessionId, user_id: &str, s: &SessionState) -> String {
    let pending = s
        .pending_generation
        .map_or("-".to_owned(), |p| p.to_string());
    format!(
        "s {} {} {} {} {} {} {} {user_id}",
        session_key(session),
        s.live_generation,
        pending,
        s.next_generation,
        u8::from(s.revoked),
        s.until_ms,
        s.version
    )
}

fn apply_notification(view: &mut View, payload: &str) {
    let mut fields = payload.splitn(3, ' ');
    match (fields.next(), fields.next(), fields.next()) {
        (Some("s"), Some(id), Some(rest)) => {
            let parts: Vec<&str> = rest.split(' ').collect();
            let parsed = (|| {
                let [live, pending, next, revoked, until, version, user_id] = parts.as_slice()
                else {
                    return None;
                };
                let state = SessionState {
                    live_generation: live.parse().ok()?,
                    pending_generation: match *pending {
                        "-" => None,
                        p => Some(p.parse().ok()?),
                    },
                    next_generation: next.parse().ok()?,
                    revoked: *revoked == "1",
                    until_ms: until.parse().ok()?,
                    version: version.parse().ok()?,
                };
                Some((state, *user_id))
            })();
            if let (Some(session), Some((state, user_id))) = (parse_session_key(id), parsed) {
                view.merge(session, user_id, state);
            }
        }
        (Some("u"), Some(before), Some(user_id)) => {
            if let Ok(before) = before.parse() {
                view.merge_user(user_id, before);
            }
        }
        _ => tracing::warn!("ignoring a malformed revocation notification"),
    }
}

/// The data half of every (re)connection, on the listening connection: creates the tables if
/// needed, listens, and loads the whole state into the view (the `liveness` module does the rest).
async fn listen_and_load(shared: &Shared, listener: &Client) -> Result<(), tokio_postgres::Error> {
    listener
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7318720451); {SCHEMA} COMMIT; LISTEN {CHANNEL};"
        ))
        .await?;
    // LISTEN is active before the load, so nothing committed after the load is missed.
    let now = to_i64(shared.clock.now_ms());
    let sessions = listener
        .query(
            "SELECT * FROM matrix_auth_sessions WHERE until_ms > $1",
            &[&now],
        )
        .await?;
    let users = listener
        .query(
            "SELECT user_id, revoked_before_ms FROM matrix_auth_users",
            &[],
        )
        .await?;
    let mut view = shared.view.write().unwrap_or_else(|e| e.into_inner());
    for row in &sessions {
        if let Some(session) = parse_session_key(row.get("session_id")) {
            view.merge(session, row.get("user_id"), state_from_row(row));
        }
    }
    for row in &users {
        view.merge_user(row.get(0), to_u64(row.get(1)));
    }
    Ok(())
}

impl PostgresStore {
    /// Connects, creates the tables if needed, loads the state and starts following changes,
    /// with the default [`PostgresOptions`] (a 10 s freshness deadline). Must be called inside a
    /// tokio runtime; fails if the database is unreachable now (later outages are survived).
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// [`connect`](Self::connect) with other options. The store's connections carry the URL's
    /// `application_name`, or `tower-matrix-auth`.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, BackendError> {
        let shared = Arc::new(Shared {
            view: RwLock::new(View::default()),
            writer: tokio::sync::Mutex::new(None),
            clock: Arc::new(SystemClock),
            liveness: liveness::Liveness::new(url, options)?,
            absent: absent::AbsentRows::default(),
        });
        let supervisor = liveness::start(&shared).await?;
        Ok(Self {
            shared,
            _supervisor: Arc::new(supervisor),
        })
    }

    /// Whether the view is complete and proven current within the freshness deadline (checks
    /// fail closed while it is not).
    pub fn is_healthy(&self) -> bool {
        self.shared.liveness.is_healthy()
    }

    fn read(&self) -> RwLockReadGuard<'_, View> {
        self.shared.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_view(&self) -> RwLockWriteGuard<'_, View> {
        self.shared.view.write().unwrap_or_else(|e| e.into_inner())
    }

    fn unavailable() -> BackendError {
        BackendError::new("the revocation database is unreachable")
    }

    /// Locks a session's row, applies `change`, writes it back and notifies, in one transaction.
    /// `change` also learns whether `user_id` logged out everywhere after `epoch` (when given).
    /// `Ok(None)` if the session belongs to another user: nothing is changed.
    async fn update_session<T: Send>(
        &self,
        session: SessionId,
        user_id: &str,
        epoch: Option<u64>,
        change: impl FnOnce(&mut SessionState, bool) -> T + Send,
    ) -> Result<Option<T>, BackendError> {
        let mut writer = self.shared.writer.lock().await;
        let client = writer.as_mut().ok_or_else(Self::unavailable)?;
        let key = session_key(session);
        let tx = client.transaction().await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO matrix_auth_sessions (session_id, live_generation, pending_generation, next_generation, revoked, until_ms, version, user_id) VALUES ($1, 0, NULL, 1, FALSE, 0, 0, $2) ON CONFLICT DO NOTHING",
            &[&key, &user_id],
        )
        .await
        .map_err(db_error)?;
        let row = tx
            .query_one(
                "SELECT * FROM matrix_auth_sessions WHERE session_id = $1 FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(db_error)?;
        if row.get::<_, &str>("user_id") != user_id {
            return Ok(None);
        }
        // Read in the same transaction as the session's row lock: a "log out everywhere"
        // committed before it is seen, and one committed after revokes the successor anyway
        // (it carries the session's epoch).
        let user_revoked = match epoch {
            Some(epoch) => tx
                .query_opt(
                    "SELECT revoked_before_ms FROM matrix_auth_users WHERE user_id = $1",
                    &[&user_id],
                )
                .await
                .map_err(db_error)?
                .is_some_and(|row| to_u64(row.get(0)) > epoch),
            None => false,
        };
        let mut state = state_from_row(&row);
        let before = state;
        let outcome = change(&mut state, user_revoked);
        if state != before {
            tx.execute(
                "UPDATE matrix_auth_sessions SET live_generation = $2, pending_generation = $3, next_generation = $4, revoked = $5, until_ms = $6, version = $7 WHERE session_id = $1",
                &[
                    &key,
                    &i64::from(state.live_generation),
                    &state.pending_generation.map(i64::from),
                    &i64::from(state.next_generation),
                    &state.revoked,
                    &to_i64(state.until_ms),
                    &to_i64(state.version),
                ],
            )
            .await
            .map_err(db_error)?;
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &session_payload(session, user_id, &state)],
            )
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        drop(writer);
        // Our own notification will say the same; merging now makes our writes visible at once.
        self.write_view().merge(session, user_id, state);
        Ok(Some(outcome))
    }

    /// Judges a token of a generation the view has not heard of yet (a refresh on another
    /// process whose notification is still on its way): from the database row itself, read on
    /// the listening connection, so that it neither waits for nor holds up writes. An absent row
    /// is remembered (see `absent`): [`check`](crate::hooks::Revocation::check) refuses the same token again
    /// without asking.
    async fn judge_from_database(
        self,
        session: SessionId,
        user_id: String,
        epoch: u64,
        generation: u32,
    ) -> Result<RevocationStatus, BackendError> {
        let client = self
            .shared
            .liveness
            .reader()
            .ok_or_else(Self::unavailable)?;
        let row = client
            .query_opt(
                "SELECT * FROM matrix_auth_sessions WHERE session_id = $1",
                &[&session_key(session)],
            )
            .await
            .map_err(db_error)?;
        let Some(row) = row else {
            self.shared.absent.insert(session, generation);
            return Ok(RevocationStatus::Revoked);
        };
        let owner: &str = row.get("user_id");
        if owner != user_id {
            return Ok(RevocationStatus::Revoked);
        }
        let state = state_from_row(&row);
        let user_revoked = {
            let mut view = self.write_view();
            view.merge(session, owner, state);
            // A "log out everywhere" the view heard of meanwhile still counts.
            view.user_revoked(&user_id, epoch)
        };
        match state.verdict(generation) {
            _ if user_revoked => Ok(RevocationStatus::Revoked),
            Verdict::Active => Ok(RevocationStatus::Active),
            Verdict::Revoked => Ok(RevocationStatus::Revoked),
            Verdict::Promote => self.promote(session, user_id, epoch, generation).await,
        }
    }

    /// Records the first use of a refresh's successor, unless the session was logged out, or
    /// its user logged out everywhere, meanwhile (both read under the row's lock).
    async fn promote(
        self,
        session: SessionId,
        user_id: String,
        epoch: u64,
        generation: u32,
    ) -> Result<RevocationStatus, BackendError> {
        let outcome = self
            .update_session(
                session,
                &user_id,
                Some(epoch),
                |state, user_revoked| match state.verdict(generation) {
                    _ if user_revoked => RevocationStatus::Revoked,
                    Verdict::Revoked => RevocationStatus::Revoked,
                    _ => {
                        state.promote(generation);
                        RevocationStatus::Active
                    }
                },
            )
            .await?;
        Ok(outcome.unwrap_or(RevocationStatus::Revoked))
    }

    /// Deletes rows whose tokens have all stopped verifying, and forgets them in this process's
    /// view (which otherwise sweeps as it grows); call it on a timer. Returns the rows deleted.
    pub async fn purge_expired(&self) -> Result<u64, BackendError> {
        let now = self.shared.clock.now_ms();
        let deleted = {
            let writer = self.shared.writer.lock().await;
            let client = writer.as_ref().ok_or_else(Self::unavailable)?;
            client
                .execute(
                    "DELETE FROM matrix_auth_sessions WHERE until_ms <= $1",
                    &[&to_i64(now)],
                )
                .await
                .map_err(db_error)?
        };
        self.write_view().sweep(now);
        Ok(deleted)
    }
}

impl Revocation for PostgresStore {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        if !self.is_healthy() {
            return RevocationCheck::ready(Err(Self::unavailable()));
        }
        let judgement = self.read().judge(user);
        match judgement {
            Judgement::Active => RevocationCheck::ready(Ok(RevocationStatus::Active)),
            Judgement::Revoked => RevocationCheck::ready(Ok(RevocationStatus::Revoked)),
            // A generation minted by another process whose notification has not arrived yet:
            // ask the database rather than refuse a token that was just refreshed (once: an
            // absent row is remembered).
            Judgement::Unheard(at) => {
                if self.shared.absent.contains(at.session, at.generation) {
                    RevocationCheck::ready(Ok(RevocationStatus::Revoked))
                } else {
                    RevocationCheck::pending(self.clone().judge_from_database(
                        at.session,
                        user.user_id().to_owned(),
                        at.epoch,
                        at.generation,
                    ))
                }
            }
            // The first use of a refreshed token is a write, once per session generation.
            Judgement::Promote(at) => RevocationCheck::pending(self.clone().promote(
                at.session,
                user.user_id().to_owned(),
                at.epoch,
                at.generation,
            )),
        }
    }
}

impl TokenStore for PostgresStore {
    fn refresh(
        &self,
        token: &TokenRef,
        mode: RefreshMode,
        until_ms: u64,
    ) -> StoreFuture<'_, Option<u32>> {
        let token = token.clone();
        Box::pin(async move {
            let generation = token.generation;
            let outcome = self
                .update_session(
                    token.session,
                    &token.user_id,
                    Some(token.epoch),
                    |state, user_revoked| {
                        if user_revoked {
                            None
                        } else {
                            state.refresh(generation, mode, until_ms)
                        }
                    },
                )
                .await?;
            Ok(outcome.flatten())
        })
    }

    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        let token = token.clone();
        Box::pin(async move {
            // Another user's session (which no token of this user can name): nothing to log out.
            self.update_session(token.session, &token.user_id, None, |state, _| {
                state.revoke(until_ms)
            })
            .await
            .map(drop)
        })
    }

    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64> {
        let user_id = user_id.to_owned();
        Box::pin(async move {
            let mut writer = self.shared.writer.lock().await;
            let client = writer.as_mut().ok_or_else(Self::unavailable)?;
            let tx = client.transaction().await.map_err(db_error)?;
            // Above every epoch handed out so far, by any process: they all read this floor.
            let floor = tx
                .query_one(
                    "INSERT INTO matrix_auth_users VALUES ($1, $2) ON CONFLICT (user_id) DO UPDATE SET revoked_before_ms = GREATEST(matrix_auth_users.revoked_before_ms + 1, EXCLUDED.revoked_before_ms) RETURNING revoked_before_ms",
                    &[&user_id, &to_i64(at_least)],
                )
                .await
                .map_err(db_error)?;
            let floor = to_u64(floor.get(0));
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &[&CHANNEL, &format!("u {floor} {user_id}")],
            )
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            drop(writer);
            self.write_view().merge_user(&user_id, floor);
            Ok(floor)
        })
    }

    fn user_floor(&self, user_id: &str) -> u64 {
        self.read().floor(user_id)
    }

    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        let token = token.clone();
        Box::pin(async move {
            let first = self
                .update_session(token.session, &token.user_id, None, |state, _| {
                    let first = !state.revoked;
                    state.revoke(until_ms);
                    first
                })
                .await?;
            Ok(first.unwrap_or(false))
        })
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: never print it.
        let view = self.read();
        f.debug_struct("PostgresStore")
            .field("healthy", &self.is_healthy())
            .field("sessions", &view.sessions.len())
            .field("users", &view.users.len())
            .finish_non_exhaustive()
    }
}
