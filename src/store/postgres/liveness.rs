//! The connection half of [`PostgresStore`](super::PostgresStore): connecting, watching, and
//! reconnecting, with one task that owns every generation of the listening connection.
//!
//! A *link* is one generation of the listening connection (its driver task applies notifications
//! to the view; its client also serves `judge_from_database`'s reads and sends the heartbeats) and
//! the heartbeat task. A single supervisor task per store watches the current link and, when it
//! ends, tears it down, wakes the writes under way (they give up, see `PostgresStore::bounded`),
//! empties the pool of its idle writing connections, and builds the next link, retrying with
//! growing pauses. Nothing else reconnects: a link that fails half-way through its setup is
//! dropped, which aborts whatever tasks it had started, and the supervisor tries again. So there
//! is one reconnect loop per store, one listening connection, and at most `max_connections`
//! writing ones (the pool's, opened as writes need them), whatever the database does.
//!
//! The link ends when the listening connection's driver ends (an error or an orderly close), when
//! a heartbeat cannot be sent, or when the view has not been proven current for longer than the
//! freshness deadline (see [`PostgresOptions::freshness_deadline`](crate::store::PostgresOptions::freshness_deadline)).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinHandle};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::{apply_notification, listen_and_load, Shared, CHANNEL};
use crate::hooks::revocation::BackendError;
use crate::lifecycle::nonce::SessionId;

/// Reconnection back-off bounds.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The `application_name` the store's connections carry unless the URL names one.
const APPLICATION_NAME: &str = "tower-matrix-auth";

/// How [`PostgresStore`](super::PostgresStore) keeps its view current and its connections alive;
/// for [`PostgresStore::connect_with`](super::PostgresStore::connect_with).
/// [`PostgresStore::connect`](super::PostgresStore::connect) uses the defaults.
///
/// ```
/// use std::time::Duration;
/// use tower_matrix_auth::store::PostgresOptions;
/// let options = PostgresOptions::default()
///     .freshness_deadline(Duration::from_secs(5))
///     .setup_timeout(Duration::from_secs(60));
/// assert_eq!(options.get_freshness_deadline(), Duration::from_secs(5));
/// ```
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    freshness_deadline: Duration,
    setup_timeout: Duration,
    max_connections: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            freshness_deadline: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(30),
            max_connections: 8,
        }
    }
}

impl PostgresOptions {
    /// The longest the store answers checks from a view it has not proven current (default 10 s;
    /// values under 1 s are raised to 1 s). Past it, every check fails closed (the layer answers
    /// `503 M_UNKNOWN` with `Retry-After`) and the store drops both connections and reconnects,
    /// reloading the whole state.
    ///
    /// The proof is a heartbeat: every third of the deadline the store sends
    /// `NOTIFY` through its listening connection and waits for it to come back there.
    /// PostgreSQL delivers notifications in commit order, so receiving a heartbeat sent at `T`
    /// proves that every change committed before `T`, on any process, has been applied to the
    /// view. The store is healthy while its last proof is younger than the deadline: a logout
    /// committed anywhere is enforced by this process at most `deadline` later, or this process
    /// refuses every token. (Within that bound a change committed after the last proof may not be
    /// seen yet; normally notifications take milliseconds.)
    ///
    /// The deadline also sets the connections' limits, so that a dead link is noticed by the
    /// kernel and the server as well:
    /// - every connection: TCP keepalives after a third of the deadline idle, probing every sixth
    ///   three times (at least 1 s each), `tcp_user_timeout` of the deadline, and a
    ///   `connect_timeout` of the deadline;
    /// - the writing connections: `statement_timeout` of a third of the deadline (so a write
    ///   waiting on a row lock gives up and its connection back; this includes each of
    ///   `purge_expired`'s batches) and `idle_in_transaction_session_timeout` of the deadline
    ///   (writes are single statements, so this only bounds a transaction a partition interrupted).
    ///
    /// These override the same settings given in the URL.
    pub fn freshness_deadline(mut self, deadline: Duration) -> Self {
        self.freshness_deadline = deadline.max(Duration::from_secs(1));
        self
    }

    /// The deadline in force (after the 1 s floor).
    pub fn get_freshness_deadline(&self) -> Duration {
        self.freshness_deadline
    }

    /// The longest one connection attempt may take, from opening both connections to having
    /// loaded the whole state (default 30 s); an attempt that takes longer is abandoned and
    /// retried. Raise it if loading your state takes longer.
    pub fn setup_timeout(mut self, timeout: Duration) -> Self {
        self.setup_timeout = timeout;
        self
    }

    /// The most writing connections the store opens (default 8; at least 1), besides its one
    /// listening connection. Writes are single statements that run in parallel on these, one
    /// per connection; a write waits for a free connection for at most a third of the freshness
    /// deadline, then fails (the layer answers `503`). Connections are opened as writes need
    /// them and kept.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// The writing connections' limit in force.
    pub fn get_max_connections(&self) -> usize {
        self.max_connections
    }

    fn heartbeat_interval(&self) -> Duration {
        self.freshness_deadline / 3
    }

    /// The listening connection's configuration, and the writing connection's.
    fn configs(&self, url: &str) -> Result<(Config, Config), BackendError> {
        let mut listener: Config = url.parse().map_err(BackendError::new)?;
        let deadline = self.freshness_deadline;
        let at_least_a_second = |d: Duration| d.max(Duration::from_secs(1));
        if listener.get_application_name().is_none() {
            listener.application_name(APPLICATION_NAME);
        }
        listener
            .connect_timeout(deadline)
            .tcp_user_timeout(deadline)
            .keepalives(true)
            .keepalives_idle(at_least_a_second(deadline / 3))
            .keepalives_interval(at_least_a_second(deadline / 6))
            .keepalives_retries(3);
        let mut writer = listener.clone();
        let limits = format!(
            "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            self.heartbeat_interval().as_millis(),
            deadline.as_millis()
        );
        writer.options(match listener.get_options() {
            Some(options) if !options.trim().is_empty() => format!("{options} {limits}"),
            _ => limits,
        });
        Ok((listener, writer))
    }
}

/// The store's connection state, shared with its tasks.
pub(super) struct Liveness {
    options: PostgresOptions,
    listener_config: Config,
    writer_config: Config,
    /// Tells this store's heartbeats from other processes' on the shared channel.
    nonce: u64,
    /// The origin of the instants below, which are microseconds after it.
    epoch: Instant,
    /// A link is up: its setup finished and nothing has ended it yet.
    connected: AtomicBool,
    /// The view holds every change committed before this instant (µs after `epoch`).
    proven_us: AtomicU64,
    /// Woken whenever one of this store's heartbeats comes back.
    echoed: tokio::sync::Notify,
    /// The current link's listening client, for reads that must not wait for writes.
    reader: Mutex<Option<Arc<Client>>>,
    /// Woken when a link ends: writes under way give up (see `PostgresStore::bounded`).
    pub(super) lost: tokio::sync::Notify,
}

impl Liveness {
    pub(super) fn new(url: &str, options: PostgresOptions) -> Result<Self, BackendError> {
        let (listener_config, writer_config) = options.configs(url)?;
        Ok(Self {
            options,
            listener_config,
            writer_config,
            nonce: SessionId::random().as_u128() as u64,
            epoch: Instant::now(),
            connected: AtomicBool::new(false),
            proven_us: AtomicU64::new(0),
            echoed: tokio::sync::Notify::new(),
            reader: Mutex::new(None),
            lost: tokio::sync::Notify::new(),
        })
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn deadline_us(&self) -> u64 {
        u64::try_from(self.options.freshness_deadline.as_micros()).unwrap_or(u64::MAX)
    }

    /// Connected, and the view proven current within the freshness deadline.
    pub(super) fn is_healthy(&self) -> bool {
        let proven = self.proven_us.load(Ordering::SeqCst);
        self.connected.load(Ordering::SeqCst)
            && self.now_us().saturating_sub(proven) <= self.deadline_us()
    }

    /// The freshness deadline in force.
    pub(super) fn deadline(&self) -> Duration {
        self.options.freshness_deadline
    }

    /// When the last proof stops being enough.
    fn expiry(&self) -> Instant {
        self.epoch
            + Duration::from_micros(self.proven_us.load(Ordering::SeqCst))
            + self.options.freshness_deadline
    }

    /// The listening client, for reads that must not wait for writes and for heartbeats (`None`
    /// while disconnected).
    pub(super) fn reader(&self) -> Option<Arc<Client>> {
        self.lock_reader().clone()
    }

    /// The configuration of the writing connections (the pool's).
    pub(super) fn writer_config(&self) -> &Config {
        &self.writer_config
    }

    fn lock_reader(&self) -> MutexGuard<'_, Option<Arc<Client>>> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a heartbeat through `client` and returns its send time: once it comes back, the view
    /// holds every change committed before that instant. Any connection to the database would
    /// do (notifications reach the listener in commit order, whoever sent them, and the
    /// heartbeat commits after it is sent); the store sends them through its listening
    /// connection, which no write ever waits for. The payload is `h <store nonce> <send time>`:
    /// hex and digits, nothing to quote.
    async fn send_heartbeat(&self, client: &Client) -> Result<u64, tokio_postgres::Error> {
        let sent_us = self.now_us();
        client
            .batch_execute(&format!(
                "NOTIFY {CHANNEL}, 'h {:016x} {sent_us}'",
                self.nonce
            ))
            .await?;
        Ok(sent_us)
    }

    /// Waits until a heartbeat sent at `sent_us` (or a later one) has come back.
    async fn echo_of(&self, sent_us: u64) {
        loop {
            // Registered before the check, so an echo in between is not missed.
            let echoed = self.echoed.notified();
            if self.proven_us.load(Ordering::SeqCst) >= sent_us {
                return;
            }
            echoed.await;
        }
    }

    /// `None` if `payload` is not a heartbeat, `Some(None)` if it is another store's, and
    /// `Some(Some(sent))` for this store's heartbeat sent at `sent` (µs after `epoch`).
    fn heartbeat_echo(&self, payload: &str) -> Option<Option<u64>> {
        let rest = payload.strip_prefix("h ")?;
        let mine = rest
            .split_once(' ')
            .filter(|(nonce, _)| u64::from_str_radix(nonce, 16).ok() == Some(self.nonce))
            .and_then(|(_, sent)| sent.parse().ok());
        Some(mine)
    }
}

/// Aborts the supervisor when the last handle on the store goes; the supervisor's link then
/// aborts its own tasks, closing both connections.
pub(super) struct Supervisor(JoinHandle<()>);

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects the first link (its error is the caller's), then supervises from a task of its own.
pub(super) async fn start(shared: &Arc<Shared>) -> Result<Supervisor, BackendError> {
    let link = Link::connect(shared).await?;
    Ok(Supervisor(tokio::spawn(supervise(shared.clone(), link))))
}

/// The store's only reconnect loop.
async fn supervise(shared: Arc<Shared>, mut link: Link) {
    let live = &shared.liveness;
    loop {
        let ended = link.ended(live).await;
        live.connected.store(false, Ordering::SeqCst);
        #[cfg(feature = "metrics")]
        crate::layer::metrics::store_healthy(false);
        live.lost.notify_waiters();
        ended.log(live.options.freshness_deadline);
        // Aborting the driver drops the listening connection: reads pending on it fail at once.
        drop(link);
        *live.lock_reader() = None;
        shared.absent.clear();
        // The writing connections idle in the pool may be as dead as the listener: drop them, so
        // that writes after the reconnection open fresh ones. (Writes under way end with their
        // statement, or with the connection's TCP limits.)
        shared.pool.retain(|_, _| false);
        link = reconnect(&shared).await;
        tracing::info!("revocation database connection restored");
    }
}

/// Retries with growing pauses until a link is up.
async fn reconnect(shared: &Arc<Shared>) -> Link {
    let mut pause = RETRY_MIN;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
        match Link::connect(shared).await {
            Ok(link) => return link,
            Err(error) => tracing::debug!(%error, "reconnecting to the revocation database"),
        }
    }
}

type Driver = JoinHandle<Result<(), tokio_postgres::Error>>;

/// One generation of connections and the tasks that serve them; dropping it aborts them.
#[derive(Default)]
struct Link {
    listener: Option<Driver>,
    heartbeat: Option<Driver>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in [&self.listener, &self.heartbeat].into_iter().flatten() {
            task.abort();
        }
    }
}

/// Why a link ended.
enum Ended {
    Listener(Result<Result<(), tokio_postgres::Error>, JoinError>),
    Heartbeat(Result<Result<(), tokio_postgres::Error>, JoinError>),
    Stale,
}

impl Ended {
    fn log(&self, deadline: Duration) {
        let (connection, outcome) = match self {
            Ended::Stale => {
                tracing::warn!(
                    ?deadline,
                    "revocation view not proven current within its deadline (no heartbeat came back); refusing tokens and reconnecting"
                );
                return;
            }
            Ended::Listener(outcome) => ("listening", outcome),
            Ended::Heartbeat(outcome) => ("heartbeat", outcome),
        };
        match outcome {
            Ok(Ok(())) => tracing::warn!(
                connection,
                "revocation database connection closed; refusing tokens until it is back"
            ),
            Ok(Err(error)) => tracing::warn!(
                connection,
                %error,
                "revocation database connection lost; refusing tokens until it is back"
            ),
            Err(error) => tracing::warn!(
                connection,
                %error,
                "revocation database task failed; refusing tokens until it is back"
            ),
        }
    }
}

impl Link {
    /// Opens the listening connection, loads the whole state, and starts the heartbeat; within
    /// the setup timeout (the writing connections are the pool's, opened as writes need them).
    /// On any failure the partial link is dropped, aborting what it started.
    async fn connect(shared: &Arc<Shared>) -> Result<Link, BackendError> {
        let live = &shared.liveness;
        let setup = async {
            let mut link = Link::default();
            let (listener, connection) = live
                .listener_config
                .connect(NoTls)
                .await
                .map_err(BackendError::new)?;
            link.listener = Some(tokio::spawn(drive_listener(shared.clone(), connection)));
            listen_and_load(shared, &listener)
                .await
                .map_err(BackendError::new)?;
            // The load may have taken a while: prove the view current now, which also shows
            // that heartbeats get through before the link is called healthy.
            let sent = live
                .send_heartbeat(&listener)
                .await
                .map_err(BackendError::new)?;
            live.echo_of(sent).await;
            shared.absent.clear();
            *live.lock_reader() = Some(Arc::new(listener));
            live.connected.store(true, Ordering::SeqCst);
            #[cfg(feature = "metrics")]
            crate::layer::metrics::store_healthy(true);
            link.heartbeat = Some(tokio::spawn(heartbeat(shared.clone())));
            Ok(link)
        };
        match tokio::time::timeout(live.options.setup_timeout, setup).await {
            Ok(outcome) => outcome,
            Err(_) => Err(BackendError::new(format!(
                "connecting to the revocation database took longer than {:?}",
                live.options.setup_timeout
            ))),
        }
    }

    /// Waits until a task of the link ends or the view's last proof expires.
    async fn ended(&mut self, live: &Liveness) -> Ended {
        loop {
            let mut expired = pin!(tokio::time::sleep_until(live.expiry().into()));
            let ended = poll_fn(|cx| {
                let tasks = [
                    (&mut self.listener, Ended::Listener as fn(_) -> Ended),
                    (&mut self.heartbeat, Ended::Heartbeat),
                ];
                for (task, why) in tasks {
                    if let Some(handle) = task {
                        if let Poll::Ready(outcome) = Pin::new(handle).poll(cx) {
                            *task = None;
                            return Poll::Ready(Some(why(outcome)));
                        }
                    }
                }
                expired.as_mut().poll(cx).map(|()| None)
            })
            .await;
            match ended {
                Some(why) => return why,
                // A heartbeat may have come back since the timer was set.
                None if !live.is_healthy() => return Ended::Stale,
                None => {}
            }
        }
    }
}

/// Drives the listening connection: applies notifications to the view and takes this store's
/// heartbeats as proofs. Ends with the connection; reconnecting is the supervisor's job.
async fn drive_listener(
    shared: Arc<Shared>,
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
) -> Result<(), tokio_postgres::Error> {
    poll_fn(|cx| loop {
        match connection.poll_message(cx) {
            Poll::Ready(Some(Ok(AsyncMessage::Notification(n)))) => {
                if n.channel() != CHANNEL {
                    continue;
                }
                match shared.liveness.heartbeat_echo(n.payload()) {
                    // Every notification committed before it has been applied: they came first.
                    Some(Some(sent)) => {
                        shared.liveness.proven_us.fetch_max(sent, Ordering::SeqCst);
                        shared.liveness.echoed.notify_waiters();
                    }
                    // Another process's heartbeat.
                    Some(None) => {}
                    None => {
                        let mut view = shared.write_view();
                        apply_notification(&mut view, n.payload());
                        // Every write anywhere lands here: forget expired state as the memory
                        // store does, or the view grows with every logout ever.
                        view.sweep_if_due(shared.clock.now_ms());
                    }
                }
            }
            Poll::Ready(Some(Ok(_))) => {}
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Sends a heartbeat through the listening connection every third of the deadline; ends at the
/// first failure.
async fn heartbeat(shared: Arc<Shared>) -> Result<(), tokio_postgres::Error> {
    let live = &shared.liveness;
    loop {
        tokio::time::sleep(live.options.heartbeat_interval()).await;
        let Some(client) = live.reader() else {
            return Ok(());
        };
        live.send_heartbeat(&client).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_sets_both_connections_limits() {
        let options = PostgresOptions::default().freshness_deadline(Duration::from_millis(4500));
        let (listener, writer) = options
            .configs("postgresql://u@db.example/x?options=-c%20search_path%3Dauth")
            .unwrap();
        for config in [&listener, &writer] {
            assert_eq!(config.get_application_name(), Some(APPLICATION_NAME));
            assert_eq!(
                config.get_connect_timeout(),
                Some(&Duration::from_millis(4500))
            );
            assert_eq!(
                config.get_tcp_user_timeout(),
                Some(&Duration::from_millis(4500))
            );
            assert!(config.get_keepalives());
            assert_eq!(config.get_keepalives_idle(), Duration::from_millis(1500));
            assert_eq!(
                config.get_keepalives_interval(),
                Some(Duration::from_secs(1))
            );
            assert_eq!(config.get_keepalives_retries(), Some(3));
        }
        assert_eq!(listener.get_options(), Some("-c search_path=auth"));
        assert_eq!(
            writer.get_options(),
            Some("-c search_path=auth -c statement_timeout=1500 -c idle_in_transaction_session_timeout=4500")
        );

        // The URL's own name stays; deadlines under a second are raised to one.
        let options = PostgresOptions::default().freshness_deadline(Duration::from_millis(10));
        assert_eq!(options.get_freshness_deadline(), Duration::from_secs(1));
        let (listener, writer) = options
            .configs("postgresql://u@db.example/x?application_name=mine")
            .unwrap();
        assert_eq!(listener.get_application_name(), Some("mine"));
        assert_eq!(
            writer.get_options(),
            Some("-c statement_timeout=333 -c idle_in_transaction_session_timeout=1000")
        );
        assert!(PostgresOptions::default().configs("not a url").is_err());
    }

    #[test]
    fn only_this_stores_heartbeats_prove_anything() {
        let live = Liveness::new("postgresql://db.example/x", PostgresOptions::default()).unwrap();
        let other = Liveness::new("postgresql://db.example/x", PostgresOptions::default()).unwrap();
        let mine = format!("h {:016x} 1234", live.nonce);
        assert_eq!(live.heartbeat_echo(&mine), Some(Some(1234)));
        assert_eq!(other.heartbeat_echo(&mine), Some(None));
        assert_eq!(live.heartbeat_echo("h garbage"), Some(None));
        assert_eq!(live.heartbeat_echo("s 00 1 - 2 0 0 1"), None);
        assert_eq!(live.heartbeat_echo("u 5 @h :example.org"), None);
    }
}
