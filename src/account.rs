//! The account behind a verified token: locked, suspended or deactivated accounts are refused or
//! limited after the signature holds, from an in-process view (no database round trip per request).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use http::request::Parts;
use http::Method;

/// The state of an account, as the homeserver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AccountStatus {
    /// Usable.
    #[default]
    Active,
    /// Locked (spec v1.8): `401 M_USER_LOCKED` with `soft_logout: true` everywhere except
    /// exactly `POST …/logout` and `POST …/logout/all` ([`crate::is_logout_route`]).
    Locked,
    /// Suspended (spec v1.13, MSC3823): a largely read-only account; joining, knocking, inviting,
    /// sending messages or state, creating rooms and changing the profile get
    /// `403 M_USER_SUSPENDED`.
    Suspended,
    /// Deactivated: its tokens are unknown (`401 M_UNKNOWN_TOKEN`).
    Deactivated,
}

/// Tells the layer the state of an account. Called for every authenticated request, so answer
/// from memory (a cache the homeserver keeps current), never with a database round trip.
pub trait AccountState: Send + Sync + 'static {
    /// The state of `user_id`'s account.
    fn status(&self, user_id: &str) -> AccountStatus;
}

impl<F> AccountState for F
where
    F: Fn(&str) -> AccountStatus + Send + Sync + 'static,
{
    fn status(&self, user_id: &str) -> AccountStatus {
        self(user_id)
    }
}

impl<A: AccountState + ?Sized> AccountState for Arc<A> {
    fn status(&self, user_id: &str) -> AccountStatus {
        (**self).status(user_id)
    }
}

/// A ready in-memory [`AccountState`]: accounts not listed are active. Clones share the map.
///
/// ```
/// use tower_matrix_auth::{AccountState, AccountStates, AccountStatus};
/// let states = AccountStates::default();
/// states.set("@mallory:example.org", AccountStatus::Locked);
/// assert_eq!(states.status("@mallory:example.org"), AccountStatus::Locked);
/// assert_eq!(states.status("@alice:example.org"), AccountStatus::Active);
/// ```
#[derive(Clone, Default)]
pub struct AccountStates {
    map: Arc<RwLock<HashMap<Box<str>, AccountStatus>>>,
}

impl AccountStates {
    /// Records an account's state (`Active` forgets the entry).
    pub fn set(&self, user_id: &str, status: AccountStatus) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if status == AccountStatus::Active {
            map.remove(user_id);
        } else {
            map.insert(user_id.into(), status);
        }
    }
}

impl AccountState for AccountStates {
    fn status(&self, user_id: &str) -> AccountStatus {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return AccountStatus::Active;
        }
        map.get(user_id).copied().unwrap_or_default()
    }
}

impl fmt::Debug for AccountStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("AccountStates")
            .field("entries", &map.len())
            .finish()
    }
}

/// Whether a suspended account may make this request (MSC3823's list, by endpoint shape).
///
/// Refused: joining or knocking (`/join/…`, `/rooms/…/join`, `/knock/…`), inviting
/// (`/rooms/…/invite`), sending events or state (`PUT /rooms/…/send/…`, `PUT /rooms/…/state/…`),
/// creating rooms (`/createRoom`), changing the display name or avatar
/// (`PUT /profile/…/displayname|avatar_url`). Everything else passes, reads, `/sync`, leaving,
/// redactions, logout, keys and deactivation included; whether a redaction targets the user's own
/// event is for the homeserver to check, with [`crate::MatrixUser::is_suspended`].
pub(crate) fn suspended_may(parts: &Parts) -> bool {
    let path = parts.uri.path();
    let Some(rest) = path.strip_prefix("/_matrix/client/") else {
        return true;
    };
    // Drop the version segment (`v3`, `r0`, `unstable`, …).
    let rest = rest.split_once('/').map_or("", |(_, rest)| rest);
    let segments: Vec<&str> = rest.split('/').collect();
    let writes = parts.method != Method::GET
        && parts.method != Method::HEAD
        && parts.method != Method::OPTIONS;
    let forbidden = match segments.as_slice() {
        ["join", ..] | ["knock", ..] | ["createRoom"] => writes,
        ["rooms", _, "join" | "invite"] => writes,
        ["rooms", _, "send" | "state", ..] => parts.method == Method::PUT,
        ["profile", _, "displayname" | "avatar_url"] => parts.method == Method::PUT,
        _ => false,
    };
    !forbidden
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, path: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn suspension_rules() {
        let refused = [
            (Method::POST, "/_matrix/client/v3/join/!room:example.org"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/join"),
            (Method::POST, "/_matrix/client/v3/knock/!r:e"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/invite"),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/send/m.room.message/txn1",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/state/m.room.topic/",
            ),
            (Method::POST, "/_matrix/client/v3/createRoom"),
            (Method::PUT, "/_matrix/client/v3/profile/@a:e/displayname"),
            (Method::PUT, "/_matrix/client/r0/profile/@a:e/avatar_url"),
        ];
        for (method, path) in refused {
            assert!(
                !suspended_may(&parts(method.clone(), path)),
                "{method} {path}"
            );
        }
        let allowed = [
            (Method::GET, "/_matrix/client/v3/sync"),
            (Method::GET, "/_matrix/client/v3/rooms/!r:e/messages"),
            (
                Method::GET,
                "/_matrix/client/v3/rooms/!r:e/state/m.room.topic/",
            ),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/leave"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/redact/$e/txn"),
            (Method::POST, "/_matrix/client/v3/logout"),
            (Method::POST, "/_matrix/client/v3/keys/upload"),
            (Method::POST, "/_matrix/client/v3/account/deactivate"),
            (Method::GET, "/_matrix/client/v3/profile/@a:e/displayname"),
        ];
        for (method, path) in allowed {
            assert!(
                suspended_may(&parts(method.clone(), path)),
                "{method} {path}"
            );
        }
    }
}
