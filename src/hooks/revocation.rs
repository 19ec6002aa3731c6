//! The revocation hook: consulted after a token's signature and caveats hold, so logout can work
//! with self-contained tokens.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::identity::MatrixUser;

/// Whether a verified token is still in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationStatus {
    /// Not revoked.
    Active,
    /// Revoked (logged out): the request gets `M_UNKNOWN_TOKEN`.
    Revoked,
}

/// A revocation store could not answer. The layer then refuses the request (fail closed) with
/// `503 M_UNKNOWN`.
pub struct BackendError {
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// Wraps the store's own error.
    pub fn new(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BackendError").field(&self.source).finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revocation check failed: {}", self.source)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

type Outcome = Result<RevocationStatus, BackendError>;

/// The answer of a [`Revocation`](crate::hooks::Revocation) check: ready at once (an in-process store: no allocation) or
/// a future (a store that has to ask elsewhere).
pub struct RevocationCheck {
    state: CheckState,
}

enum CheckState {
    Ready(Option<Outcome>),
    Pending(Pin<Box<dyn Future<Output = Outcome> + Send>>),
}

impl RevocationCheck {
    /// An answer known now.
    pub fn ready(outcome: Result<RevocationStatus, BackendError>) -> Self {
        Self {
            state: CheckState::Ready(Some(outcome)),
        }
    }

    /// An answer still to come.
    pub fn pending(
        future: impl Future<Output = Result<RevocationStatus, BackendError>> + Send + 'static,
    ) -> Self {
        Self {
            state: CheckState::Pending(Box::pin(future)),
        }
    }

    /// The answer if it is already known, so the layer can skip its waiting state.
    pub(crate) fn now_or_later(self) -> Result<Outcome, Self> {
        match self.state {
            CheckState::Ready(Some(outcome)) => Ok(outcome),
            state => Err(Self { state }),
        }
    }
}

impl Future for RevocationCheck {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match &mut self.state {
            CheckState::Ready(outcome) => Poll::Ready(
                outcome
                    .take()
                    .expect("RevocationCheck polled after completion"),
            ),
            CheckState::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for RevocationCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            CheckState::Ready(_) => "ready",
            CheckState::Pending(_) => "pending",
        };
        f.debug_tuple("RevocationCheck").field(&state).finish()
    }
}

/// Decides whether a verified token was revoked. Called only for tokens whose signature and
/// caveats hold (expired ones included, so a revoked token never asks for a soft logout).
///
/// ```
/// use std::collections::HashSet;
/// use std::sync::Mutex;
/// use tower_matrix_auth::{MatrixUser, TokenId, hooks::{Revocation, RevocationCheck, RevocationStatus}};
///
/// #[derive(Default)]
/// struct Denylist(Mutex<HashSet<TokenId>>);
///
/// impl Revocation for Denylist {
///     fn check(&self, user: &MatrixUser) -> RevocationCheck {
///         let revoked = self.0.lock().unwrap().contains(&user.token_id());
///         RevocationCheck::ready(Ok(if revoked { RevocationStatus::Revoked } else { RevocationStatus::Active }))
///     }
/// }
/// ```
pub trait Revocation: Send + Sync + 'static {
    /// Checks one verified token.
    fn check(&self, user: &MatrixUser) -> RevocationCheck;
}

/// A closure is a revocation check:
///
/// ```
/// use tower_matrix_auth::{MatrixUser, hooks::{RevocationCheck, RevocationStatus}};
/// # let keys = tower_matrix_auth::KeyRing::new().with_key("k", tower_matrix_auth::MacaroonSecret::from_passphrase("s"));
/// let layer = tower_matrix_auth::MatrixAuthLayer::new(keys).revocation(|user: &MatrixUser| {
///     let revoked = user.user_id() == "@mallory:example.org";
///     RevocationCheck::ready(Ok(if revoked { RevocationStatus::Revoked } else { RevocationStatus::Active }))
/// });
/// # drop(layer);
/// ```
impl<F> Revocation for F
where
    F: Fn(&MatrixUser) -> RevocationCheck + Send + Sync + 'static,
{
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        self(user)
    }
}

/// The default: nothing is ever revoked.
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverRevoked;

impl Revocation for NeverRevoked {
    fn check(&self, _: &MatrixUser) -> RevocationCheck {
        RevocationCheck::ready(Ok(RevocationStatus::Active))
    }
}

impl<R: Revocation + ?Sized> Revocation for std::sync::Arc<R> {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        (**self).check(user)
    }
}
