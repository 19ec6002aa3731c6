//! What the layer asks the homeserver: is this token revoked, whose is this opaque token, what
//! state is this account in, which application services exist, and what time it is.
//!
//! Every hook is a trait with an implementation for closures and for `Arc<T>`, so a homeserver
//! can hand in a function, a shared store, or a type of its own.

pub(crate) mod account;
#[cfg(feature = "appservice")]
pub(crate) mod appservice;
pub(crate) mod clock;
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub mod oauth2;
pub(crate) mod resolver;
pub(crate) mod revocation;

pub use account::{AccountDirectory, AccountStatus, MemoryAccounts};
#[cfg(feature = "appservice")]
pub use appservice::{AppService, AppServices, InvalidRegistration};
pub use clock::{Clock, ManualClock, SystemClock};
#[cfg(feature = "oauth2")]
#[cfg_attr(docsrs, doc(cfg(feature = "oauth2")))]
pub use oauth2::{ClientAuth, Introspection};
pub use resolver::{ResolveFuture, ResolvedToken, StaticTokens, TokenResolver};
pub use revocation::{BackendError, NeverRevoked, Revocation, RevocationCheck, RevocationStatus};
