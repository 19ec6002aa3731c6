//! The connection half of [`PostgresStore`](super::PostgresStore): connecting, watching, and
//! reconnecting, with one task that owns every generation of connections.
//!
//! A *link* is one generation: the listening connection (its driver task applies notifications
//! to the view) and the writing connection. A single supervisor task per store watches the
//! current link and, when it ends, tears it down and builds the next one, retrying with growing
//! pauses. Nothing else reconnects: a link that fails half-way through its setup is dropped, which
//! aborts whatever tasks it had started, and the supervisor tries again. So there is one reconnect
//! loop per store and at most two connections, whatever the database does.
//!
//! The link ends when either connection's driver ends (an error or an orderly close).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::task::{JoinError, JoinHandle};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::{apply_notification, listen_and_load, Shared, CHANNEL};
use crate::revocation::RevocationError;

/// Reconnection back-off bounds.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The store's connection state, shared with its tasks.
pub(super) struct Liveness {
    config: Config,
    /// A link is up: its setup finished and nothing has ended it yet.
    connected: AtomicBool,
}

impl Liveness {
    pub(super) fn new(url: &str) -> Result<Self, RevocationError> {
        Ok(Self {
            config: url.parse().map_err(RevocationError::new)?,
            connected: AtomicBool::new(false),
        })
    }

    /// Connected: the view is complete and being kept current.
    pub(super) fn is_healthy(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
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
pub(super) async fn start(shared: &Arc<Shared>) -> Result<Supervisor, RevocationError> {
    let link = Link::connect(shared).await?;
    Ok(Supervisor(tokio::spawn(supervise(shared.clone(), link))))
}

/// The store's only reconnect loop.
async fn supervise(shared: Arc<Shared>, mut link: Link) {
    let live = &shared.liveness;
    loop {
        let ended = link.ended().await;
        live.connected.store(false, Ordering::SeqCst);
        ended.log();
        // Aborting the drivers drops both connections: queries pending on them fail at once,
        // so a write stuck on a dead link gives the writer mutex back.
        drop(link);
        *shared.writer.lock().await = None;
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
    writer: Option<Driver>,
    /// The listening connection's client: it owns the LISTEN.
    client: Option<Client>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in [&self.listener, &self.writer].into_iter().flatten() {
            task.abort();
        }
    }
}

/// Why a link ended.
enum Ended {
    Listener(Result<Result<(), tokio_postgres::Error>, JoinError>),
    Writer(Result<Result<(), tokio_postgres::Error>, JoinError>),
}

impl Ended {
    fn log(&self) {
        let (connection, outcome) = match self {
            Ended::Listener(outcome) => ("listening", outcome),
            Ended::Writer(outcome) => ("writing", outcome),
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
    /// Opens both connections and loads the whole state. On any failure the partial link is
    /// dropped, aborting what it started.
    async fn connect(shared: &Arc<Shared>) -> Result<Link, RevocationError> {
        let live = &shared.liveness;
        let mut link = Link::default();
        let (listener, connection) = live
            .config
            .connect(NoTls)
            .await
            .map_err(RevocationError::new)?;
        link.listener = Some(tokio::spawn(drive_listener(shared.clone(), connection)));
        let (writer, connection) = live
            .config
            .connect(NoTls)
            .await
            .map_err(RevocationError::new)?;
        link.writer = Some(tokio::spawn(connection));
        listen_and_load(shared, &listener)
            .await
            .map_err(RevocationError::new)?;
        *shared.writer.lock().await = Some(writer);
        link.client = Some(listener);
        live.connected.store(true, Ordering::SeqCst);
        Ok(link)
    }

    /// Waits until a task of the link ends.
    async fn ended(&mut self) -> Ended {
        poll_fn(|cx| {
            let tasks = [
                (&mut self.listener, Ended::Listener as fn(_) -> Ended),
                (&mut self.writer, Ended::Writer),
            ];
            for (task, why) in tasks {
                if let Some(handle) = task {
                    if let Poll::Ready(outcome) = Pin::new(handle).poll(cx) {
                        *task = None;
                        return Poll::Ready(why(outcome));
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Drives the listening connection: applies notifications to the view. Ends with the
/// connection; reconnecting is the supervisor's job.
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
                if n.channel() == CHANNEL {
                    let mut view = shared.view.write().unwrap_or_else(|e| e.into_inner());
                    apply_notification(&mut view, n.payload());
                    // Every write anywhere lands here: forget expired state as the memory store
                    // does, or the view grows with every logout ever.
                    view.sweep_if_due(shared.clock.now_ms());
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
