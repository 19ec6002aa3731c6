//! The PostgreSQL revocation store (feature `postgres`): the source of truth for several
//! homeserver processes.
//!
//! Checking a token costs no round trip: every process keeps the whole (small) revocation state
//! in memory, loaded at start and kept current with `LISTEN`/`NOTIFY`. Writes (logout, refresh,
//! login-token use, the first use of a refreshed token) are single statements on a pool of
//! connections: a compare-and-set of the session's row on its version that applies
//! [`SessionState`]'s rules and notifies every process, in commit order, in the same statement.
//!
//! The view must also be proven current: a heartbeat sent through the listening connection every
//! third of the freshness deadline has to come back there (notifications arrive in commit order,
//! so its return proves that every change committed before it was sent has been applied). When
//! the listening connection drops, or the view goes unproven for longer than the deadline (10 s by
//! default, see [`PostgresOptions`]), as it does behind a partition that drops packets without a
//! reset, the view may miss updates, so the store fails closed: every check answers an error (the
//! layer turns it into `503 M_UNKNOWN`) until it has reconnected and reloaded the whole state,
//! which one task per store keeps trying on its own (`liveness`). The schema is versioned and
//! migrated on every connection (`schema`).

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::Poll;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, NoTls};

use crate::hooks::clock::{Clock, SystemClock};
use crate::hooks::revocation::{BackendError, Revocation, RevocationCheck, RevocationStatus};
use crate::identity::MatrixUser;
use crate::lifecycle::nonce::SessionId;
use crate::store::view::{Judgement, View};
use crate::store::{
    RefreshOutcome, RefreshRequest, SessionState, StoreFuture, TokenRef, TokenStore, Verdict,
};

const CHANNEL: &str = "matrix_auth_revocations";

mod absent;
mod liveness;
mod schema;

pub use liveness::PostgresOptions;

struct Shared {
    view: RwLock<View>,
    /// The writing connections: every write is one autocommit statement on any of them.
    pool: Pool,
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

fn pool_error(e: deadpool_postgres::PoolError) -> BackendError {
    BackendError::new(e)
}

/// How often one write may lose the race for its row (another process or task committed a
/// change in between) before it gives up; each loss means someone else's write went through.
const MAX_ATTEMPTS: usize = 64;

/// Rows `purge_expired` deletes per statement, so that no statement holds many row locks or
/// runs for long.
const PURGE_BATCH: i64 = 5000;

/// A session's row (if any) and its user's floor, in one round trip: the one read a write makes
/// when this process's view could not tell it the current state.
const READ_SESSION: &str = "SELECT s.user_id, s.live_generation, s.pending_generation, \
    s.next_generation, s.revoked, s.until_ms, s.version, s.refreshed_generation, \
    s.refreshed_at_ms, s.refreshed_next, u.revoked_before_ms \
    FROM (SELECT $1::TEXT AS id, $2::TEXT AS uid) k \
    LEFT JOIN matrix_auth_sessions s ON s.session_id = k.id \
    LEFT JOIN matrix_auth_users u ON u.user_id = k.uid";

/// Writes a session's new state if its row is still at the version the change was computed
/// from, belongs to the user, and the user's floor has not passed the session's epoch; notifies
/// in the same statement (so in the same transaction). One row back if and only if it wrote.
/// $1 session, $2 user, $3–$8 the new state, $9 the version it replaces, $10 the epoch (or
/// `i64::MAX`: no floor check), $11 the notification, $12 the generation this write refreshes
/// at `/v3/refresh` (NULL: the write leaves the refresh record alone) and $13 now. The refresh
/// record ([`SessionState::refreshed_generation`]) is kept from the row, not computed from the
/// view's guess, which does not follow it: a generation's first refresh sets it, a retry of that
/// refresh keeps the first instant, and each records the new `next_generation`.
const UPDATE_SESSION: &str = "WITH w AS (UPDATE matrix_auth_sessions SET \
    live_generation = $3::BIGINT, pending_generation = $4::BIGINT, next_generation = $5::BIGINT, \
    revoked = $6::BOOLEAN, until_ms = $7::BIGINT, version = $8::BIGINT, \
    refreshed_at_ms = CASE WHEN $12::BIGINT IS NULL \
        OR refreshed_generation IS NOT DISTINCT FROM $12::BIGINT \
        THEN refreshed_at_ms ELSE $13::BIGINT END, \
    refreshed_generation = COALESCE($12::BIGINT, refreshed_generation), \
    refreshed_next = CASE WHEN $12::BIGINT IS NULL THEN refreshed_next ELSE $5::BIGINT END \
    WHERE session_id = $1::TEXT AND user_id = $2::TEXT AND version = $9::BIGINT \
    AND NOT EXISTS (SELECT 1 FROM matrix_auth_users \
        WHERE user_id = $2::TEXT AND revoked_before_ms > $10::BIGINT) \
    RETURNING 1) \
    SELECT pg_notify('matrix_auth_revocations', $11::TEXT) FROM w";

/// The same for a session that has no row yet: writes it unless one appeared meanwhile.
/// $1–$8 as above, $9 the epoch, $10 the notification, $11–$13 the refresh record.
const INSERT_SESSION: &str = "WITH w AS (INSERT INTO matrix_auth_sessions \
    (session_id, user_id, live_generation, pending_generation, next_generation, revoked, until_ms, \
     version, refreshed_generation, refreshed_at_ms, refreshed_next) \
    SELECT $1::TEXT, $2::TEXT, $3::BIGINT, $4::BIGINT, $5::BIGINT, $6::BOOLEAN, $7::BIGINT, \
        $8::BIGINT, $11::BIGINT, $12::BIGINT, $13::BIGINT \
    WHERE NOT EXISTS (SELECT 1 FROM matrix_auth_users \
        WHERE user_id = $2::TEXT AND revoked_before_ms > $9::BIGINT) \
    ON CONFLICT (session_id) DO NOTHING RETURNING 1) \
    SELECT pg_notify('matrix_auth_revocations', $10::TEXT) FROM w";

/// Raises a user's floor above every epoch handed out so far and notifies, in one statement.
const REVOKE_USER: &str = "WITH f AS (INSERT INTO matrix_auth_users VALUES ($1::TEXT, $2::BIGINT) \
    ON CONFLICT (user_id) DO UPDATE SET revoked_before_ms = \
        GREATEST(matrix_auth_users.revoked_before_ms + 1, EXCLUDED.revoked_before_ms) \
    RETURNING revoked_before_ms) \
    SELECT revoked_before_ms, \
        pg_notify('matrix_auth_revocations', 'u ' || revoked_before_ms || ' ' || $1::TEXT) FROM f";

/// One batch of `purge_expired`: the `$2` expired rows (`until_ms <= $1`) with the earliest
/// `until_ms` from `$3` on, found through the `until_ms` index in its order and deleted by their
/// row ids; rows a writer holds are skipped (the next run gets them). Returns how many and the
/// latest `until_ms` deleted, where the next batch starts: so that no batch walks again past the
/// index entries of the rows the batches before it deleted, nor scans the table.
const PURGE: &str = "WITH gone AS (DELETE FROM matrix_auth_sessions WHERE ctid = ANY(ARRAY( \
        SELECT ctid FROM matrix_auth_sessions \
        WHERE until_ms <= $1::BIGINT AND until_ms >= $3::BIGINT \
        ORDER BY until_ms LIMIT $2::BIGINT FOR UPDATE SKIP LOCKED)) \
    RETURNING until_ms) \
    SELECT count(*), max(until_ms) FROM gone";

/// A write given up (see `PostgresStore::bounded`): its connection may be dead, so it does not
/// go back to the pool.
struct Aborted(&'static str);

/// The outcome of a write on `client`. A connection whose write failed or was given up is
/// dropped, not returned to the pool: it may be dead (a terminated backend is not always seen as
/// closed by the time the next write asks the pool), or its statement may still be on its way
/// (the server ends it). Failures are rare; a fresh connection is cheap beside a second failure.
fn settle<T>(
    client: deadpool_postgres::Client,
    outcome: Result<Result<T, BackendError>, Aborted>,
) -> Result<T, BackendError> {
    let failure = match outcome {
        Ok(Ok(done)) => return Ok(done),
        Ok(Err(error)) => error,
        Err(Aborted(why)) => BackendError::new(why),
    };
    drop(deadpool_postgres::Object::take(client));
    Err(failure)
}

/// What a write starts from: a session's state (`None`: no row) and whether its user logged
/// out everywhere after the session's epoch.
struct Basis {
    state: Option<SessionState>,
    user_revoked: bool,
    /// Read from the database just now, not guessed from the view.
    confirmed: bool,
}

/// The view's copy of a session as the basis of a write: its refresh record marked unknown (the
/// views do not follow it), so that whatever a change does to the record differs from it and
/// reaches the statement, which applies it to the row's.
fn guessed(state: &SessionState) -> SessionState {
    SessionState {
        refreshed_generation: None,
        refreshed_at_ms: u64::MAX,
        refreshed_next: u32::MAX,
        ..*state
    }
}

/// What a change is told besides the state it changes.
#[derive(Clone, Copy)]
struct Known {
    /// The user logged out everywhere after the session's epoch.
    user_revoked: bool,
    /// The state is the row as read just now, not the view's guess.
    from_row: bool,
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
        refreshed_generation: row
            .get::<_, Option<i64>>("refreshed_generation")
            .map(generation),
        refreshed_at_ms: to_u64(row.get("refreshed_at_ms")),
        refreshed_next: generation(row.get("refreshed_next")),
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
                    // Not carried (older releases parse exactly the fields above): views do not
                    // follow the refresh record, the row does.
                    refreshed_generation: None,
                    refreshed_at_ms: 0,
                    refreshed_next: 0,
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

/// Rows the load fetches at a time: all the load holds beside the view is one batch of rows.
const LOAD_BATCH: usize = 10_000;

/// The data half of every (re)connection, on the listening connection: migrates the schema if
/// needed (see `schema`), listens, and loads the whole state into the view (the `liveness` module
/// does the rest: the store refuses every check until this has returned `Ok` and a heartbeat has
/// come back).
///
/// The state is read through cursors, [`LOAD_BATCH`] rows at a time, in one read-only repeatable
/// read transaction (one snapshot for the count, the sessions and the users), and merged into the
/// view batch by batch: the load's peak memory is the view plus one batch, not the view plus
/// every row at once. A load that fails midway leaves merged rows in the view (each the committed
/// state, merged by version like any other) and the store failing closed; the caller drops the
/// connection, which ends the transaction, and retries the whole load.
async fn listen_and_load(shared: &Shared, listener: &Client) -> Result<(), tokio_postgres::Error> {
    schema::migrate(listener).await?;
    listener
        .batch_execute(&format!("LISTEN {CHANNEL};"))
        .await?;
    // LISTEN is active before the load's snapshot is taken (by its first query, below), so
    // everything committed after the snapshot is notified (after the transaction ends: a
    // connection in a transaction receives no notifications) and nothing is missed.
    let now = to_i64(shared.clock.now_ms());
    // cursor_tuple_fraction: every row will be fetched, so plan for all of them (a sequential
    // scan), not for the first tenth.
    listener
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET LOCAL cursor_tuple_fraction = 1",
        )
        .await?;
    let live = "FROM matrix_auth_sessions WHERE until_ms > $1::BIGINT";
    let rows: i64 = listener
        .query_one(&format!("SELECT count(*) {live}"), &[&now])
        .await?
        .get(0);
    // The map at its final size at once: no doubling and rehashing while it fills, and no old
    // table beside the new one at each doubling.
    shared
        .write_view()
        .reserve_sessions(usize::try_from(rows).unwrap_or(0));
    load_in_batches(
        listener,
        &format!("SELECT * {live}"),
        &[&now],
        |view, row| {
            if let Some(session) = parse_session_key(row.get("session_id")) {
                view.merge(session, row.get("user_id"), state_from_row(row));
            }
        },
        shared,
    )
    .await?;
    load_in_batches(
        listener,
        "SELECT user_id, revoked_before_ms FROM matrix_auth_users",
        &[],
        |view, row| view.merge_user(row.get(0), to_u64(row.get(1))),
        shared,
    )
    .await?;
    shared.write_view().loaded();
    listener.batch_execute("COMMIT").await
}

impl Shared {
    /// The view, to change (a lock poisoned by a panic elsewhere still guards consistent maps,
    /// as in the memory store: every update is a single insert or field write).
    fn write_view(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `query` through a cursor (in the caller's transaction) and applies each row to the view,
/// [`LOAD_BATCH`] rows at a time (the view's lock is taken once a batch).
async fn load_in_batches(
    listener: &Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    mut apply: impl FnMut(&mut View, &tokio_postgres::Row),
    shared: &Shared,
) -> Result<(), tokio_postgres::Error> {
    listener
        .execute(
            &format!("DECLARE matrix_auth_load NO SCROLL CURSOR FOR {query}"),
            params,
        )
        .await?;
    let fetch = listener
        .prepare(&format!("FETCH {LOAD_BATCH} FROM matrix_auth_load"))
        .await?;
    let mut batch = listener.query(&fetch, &[]).await?;
    loop {
        let last = batch.len() < LOAD_BATCH;
        // The next batch is asked for (the first poll sends the FETCH) before this one is merged,
        // so that the server reads and sends it meanwhile.
        let mut next = pin!(async {
            if last {
                Ok(Vec::new())
            } else {
                listener.query(&fetch, &[]).await
            }
        });
        let mut early = None;
        poll_fn(|cx| {
            if let Poll::Ready(rows) = next.as_mut().poll(cx) {
                early = Some(rows);
            }
            Poll::Ready(())
        })
        .await;
        {
            let mut view = shared.write_view();
            for row in &batch {
                apply(&mut view, row);
            }
        }
        if last {
            break;
        }
        batch = match early {
            Some(rows) => rows?,
            None => next.await?,
        };
    }
    listener.batch_execute("CLOSE matrix_auth_load").await
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
        let liveness = liveness::Liveness::new(url, options.clone())?;
        let manager = Manager::from_config(
            liveness.writer_config().clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.get_max_connections())
            .runtime(Runtime::Tokio1)
            // A write waits for a free connection no longer than a write may run.
            .wait_timeout(Some(options.get_freshness_deadline() / 3))
            .create_timeout(Some(options.get_freshness_deadline()))
            .build()
            .map_err(BackendError::new)?;
        let shared = Arc::new(Shared {
            view: RwLock::new(View::default()),
            pool,
            clock: Arc::new(SystemClock),
            liveness,
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
        self.shared.write_view()
    }

    fn unavailable() -> BackendError {
        BackendError::new("the revocation database is unreachable")
    }

    /// A writing connection from the pool, waiting for a free one no longer than a third of the
    /// freshness deadline (see [`PostgresOptions::max_connections`]).
    async fn connection(&self) -> Result<deadpool_postgres::Client, BackendError> {
        match self.bounded(self.shared.pool.get()).await {
            Ok(client) => client.map_err(pool_error),
            Err(Aborted(why)) => Err(BackendError::new(why)),
        }
    }

    /// Runs `work` (a write) unless the store loses its link to the database or the freshness
    /// deadline passes first: a write sent into a partition fails when the store notices the
    /// partition, as checks do, rather than when TCP gives up.
    async fn bounded<T>(&self, work: impl Future<Output = T>) -> Result<T, Aborted> {
        let live = &self.shared.liveness;
        let mut lost = pin!(live.lost.notified());
        lost.as_mut().enable();
        let mut expired = pin!(tokio::time::sleep(live.deadline()));
        let mut work = pin!(work);
        poll_fn(|cx| {
            if let Poll::Ready(done) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(done));
            }
            if lost.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Aborted(
                    "the revocation database link was lost during a write",
                )));
            }
            if expired.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Aborted(
                    "a write to the revocation database took longer than the freshness deadline",
                )));
            }
            Poll::Pending
        })
        .await
    }

    /// Applies `change` to a session's state and writes the result, with the notification, in
    /// one statement that succeeds only if the row is still at the version the change was
    /// computed from (compare-and-set): of concurrent writes to one session the row lock orders
    /// them and each loser reads the row again and recomputes, so every change applies to the
    /// state its predecessor committed, and one refresh token has one winner. Writes to different
    /// sessions run in parallel on the pool's connections.
    ///
    /// The first attempt starts from this process's view (no round trip: usually the whole write
    /// is one statement); a change that would write nothing is never decided from the view but
    /// confirmed from the database (the view may not have heard of a refresh on another process
    /// yet). `change` also learns whether `user_id` logged out everywhere after `epoch` (when
    /// given); the statement checks the floor again, so a "log out everywhere" committed before
    /// it wins, and one committed after revokes the successor anyway (it carries the session's
    /// epoch). `change` may also answer `None`: it cannot decide from the view (which does not
    /// follow [`SessionState::refreshed_generation`]), read the row. `Ok(None)` if the session
    /// belongs to another user: nothing is changed.
    async fn update_session<T: Send>(
        &self,
        session: SessionId,
        user_id: &str,
        epoch: Option<u64>,
        change: impl Fn(&mut SessionState, Known) -> Option<T> + Send,
    ) -> Result<Option<T>, BackendError> {
        let client = self.connection().await?;
        let outcome = self
            .bounded(self.update_on(&client, session, user_id, epoch, change))
            .await;
        settle(client, outcome)
    }

    /// [`update_session`](Self::update_session) on one connection.
    async fn update_on<T: Send>(
        &self,
        client: &deadpool_postgres::Client,
        session: SessionId,
        user_id: &str,
        epoch: Option<u64>,
        change: impl Fn(&mut SessionState, Known) -> Option<T> + Send,
    ) -> Result<Option<T>, BackendError> {
        let key = session_key(session);
        let floor_check = epoch.map_or(i64::MAX, to_i64);
        let mut basis = {
            let view = self.read();
            match view.state(session, user_id) {
                Ok(state) => Some(Basis {
                    state: state.map(guessed),
                    user_revoked: epoch.is_some_and(|e| view.user_revoked(user_id, e)),
                    confirmed: false,
                }),
                // Another user's, as far as the view knows: ask the database.
                Err(()) => None,
            }
        };
        for _ in 0..MAX_ATTEMPTS {
            let Basis {
                state: current,
                user_revoked,
                confirmed,
            } = match basis.take() {
                Some(guess) => guess,
                None => {
                    let read = client
                        .prepare_cached(READ_SESSION)
                        .await
                        .map_err(db_error)?;
                    let row = client
                        .query_one(&read, &[&key, &user_id])
                        .await
                        .map_err(db_error)?;
                    let state = match row.get::<_, Option<&str>>("user_id") {
                        Some(owner) if owner != user_id => return Ok(None),
                        Some(_) => Some(state_from_row(&row)),
                        None => None,
                    };
                    let floor = row.get::<_, Option<i64>>("revoked_before_ms").map(to_u64);
                    Basis {
                        state,
                        user_revoked: epoch.is_some_and(|e| floor.is_some_and(|f| f > e)),
                        confirmed: true,
                    }
                }
            };
            let before = current.unwrap_or_default();
            let mut state = before;
            let known = Known {
                user_revoked,
                from_row: confirmed,
            };
            let Some(outcome) = change(&mut state, known) else {
                if confirmed {
                    return Err(BackendError::new("a change undecided on its row"));
                }
                // Read the row, then decide again.
                continue;
            };
            if state == before {
                if confirmed {
                    return Ok(Some(outcome));
                }
                continue;
            }
            let payload = session_payload(session, user_id, &state);
            // What this write does to the refresh record, which the statement applies to the row's
            // (see UPDATE_SESSION): the basis may be a guess that does not know it.
            let record =
                |s: &SessionState| (s.refreshed_generation, s.refreshed_at_ms, s.refreshed_next);
            let refreshed = (record(&state) != record(&before))
                .then(|| state.refreshed_generation.map(i64::from))
                .flatten();
            let refreshed_at = to_i64(state.refreshed_at_ms);
            let (live, pending, next, until, version) = (
                i64::from(state.live_generation),
                state.pending_generation.map(i64::from),
                i64::from(state.next_generation),
                to_i64(state.until_ms),
                to_i64(state.version),
            );
            let written = match current {
                Some(before) => {
                    let update = client
                        .prepare_cached(UPDATE_SESSION)
                        .await
                        .map_err(db_error)?;
                    client
                        .query_opt(
                            &update,
                            &[
                                &key,
                                &user_id,
                                &live,
                                &pending,
                                &next,
                                &state.revoked,
                                &until,
                                &version,
                                &to_i64(before.version),
                                &floor_check,
                                &payload,
                                &refreshed,
                                &refreshed_at,
                            ],
                        )
                        .await
                }
                None => {
                    let insert = client
                        .prepare_cached(INSERT_SESSION)
                        .await
                        .map_err(db_error)?;
                    client
                        .query_opt(
                            &insert,
                            &[
                                &key,
                                &user_id,
                                &live,
                                &pending,
                                &next,
                                &state.revoked,
                                &until,
                                &version,
                                &floor_check,
                                &payload,
                                &state.refreshed_generation.map(i64::from),
                                &refreshed_at,
                                &i64::from(state.refreshed_next),
                            ],
                        )
                        .await
                }
            }
            .map_err(db_error)?
            .is_some();
            if written {
                // Our own notification will say the same; merging now makes our writes visible
                // at once.
                self.write_view().merge(session, user_id, state);
                return Ok(Some(outcome));
            }
            // Lost the race for the row (or the floor rose): read it and try again.
        }
        Err(BackendError::new(
            "a session's row kept changing under this write; giving up",
        ))
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
            .update_session(session, &user_id, Some(epoch), |state, known| {
                Some(match state.verdict(generation) {
                    _ if known.user_revoked => RevocationStatus::Revoked,
                    Verdict::Revoked => RevocationStatus::Revoked,
                    _ => {
                        state.promote(generation);
                        RevocationStatus::Active
                    }
                })
            })
            .await?;
        Ok(outcome.unwrap_or(RevocationStatus::Revoked))
    }

    /// Deletes rows whose tokens have all stopped verifying, and forgets them in this process's
    /// view (which otherwise sweeps as it grows); call it on a timer. Returns the rows deleted.
    ///
    /// Deletes in batches of a few thousand rows, each its own short statement (rows a write
    /// holds at that moment are skipped and left for the next run), so that it never holds many
    /// locks or runs long on a large table.
    pub async fn purge_expired(&self) -> Result<u64, BackendError> {
        let now = self.shared.clock.now_ms();
        let (mut deleted, mut from) = (0, i64::MIN);
        loop {
            let client = self.connection().await?;
            let outcome = self
                .bounded(async {
                    let purge = client.prepare_cached(PURGE).await.map_err(db_error)?;
                    client
                        .query_one(&purge, &[&to_i64(now), &PURGE_BATCH, &from])
                        .await
                        .map_err(db_error)
                })
                .await;
            let row = settle(client, outcome)?;
            let batch: i64 = row.get(0);
            deleted += u64::try_from(batch).unwrap_or(0);
            match row.get::<_, Option<i64>>(1) {
                Some(latest) if batch >= PURGE_BATCH => from = latest,
                _ => break,
            }
        }
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
        request: &RefreshRequest,
    ) -> StoreFuture<'_, RefreshOutcome> {
        let (token, request) = (token.clone(), *request);
        Box::pin(async move {
            let generation = token.generation;
            let outcome = self
                .update_session(
                    token.session,
                    &token.user_id,
                    Some(token.epoch),
                    |state, known| {
                        if known.user_revoked {
                            return Some(RefreshOutcome::Refused);
                        }
                        // A replay is judged on the row's refresh record, which the view does
                        // not follow.
                        let replay =
                            !state.revoked && state.verdict(generation) == Verdict::Revoked;
                        if replay && !known.from_row {
                            return None;
                        }
                        Some(state.refresh(generation, &request))
                    },
                )
                .await?;
            Ok(outcome.unwrap_or(RefreshOutcome::Refused))
        })
    }

    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        let token = token.clone();
        Box::pin(async move {
            // Another user's session (which no token of this user can name): nothing to log out.
            self.update_session(token.session, &token.user_id, None, |state, _| {
                state.revoke(until_ms);
                Some(())
            })
            .await
            .map(drop)
        })
    }

    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64> {
        let user_id = user_id.to_owned();
        Box::pin(async move {
            let client = self.connection().await?;
            let outcome = self
                .bounded(async {
                    let revoke = client.prepare_cached(REVOKE_USER).await.map_err(db_error)?;
                    // Above every epoch handed out so far, by any process: they all read this
                    // floor.
                    client
                        .query_one(&revoke, &[&user_id, &to_i64(at_least)])
                        .await
                        .map_err(db_error)
                })
                .await;
            let floor = to_u64(settle(client, outcome)?.get(0));
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
                    Some(first)
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
