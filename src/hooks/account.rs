//! The account behind a verified token: locked, suspended or deactivated accounts are refused or
//! limited after the signature holds, from an in-process view (no database round trip per request).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use http::request::Parts;
use http::Method;

use crate::routes::{is_normal_path, ClientRoute};

/// The state of an account, as the homeserver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AccountStatus {
    /// Usable.
    #[default]
    Active,
    /// Locked (spec v1.8): `401 M_USER_LOCKED` with `soft_logout: true` everywhere except
    /// exactly `POST …/logout` and `POST …/logout/all` ([`crate::routes::is_logout_route`]).
    Locked,
    /// Suspended (spec v1.13, MSC3823): a largely read-only account. Reads pass, and so do the
    /// writes the spec wants a suspended user to keep (logging out, deleting devices,
    /// deactivating, keys and verification, key backup, leaving rooms, redacting, which the
    /// homeserver limits to the user's own events) and private settings (account data, push
    /// rules); every other write (joining, knocking, inviting, sending messages or state,
    /// creating or upgrading rooms, changing the profile, uploading media, …) gets
    /// `403 M_USER_SUSPENDED`, and so does any request on a path that is not normal
    /// ([`crate::routes::is_normal_path`]). An allow-list, so that a form of a write nobody listed is
    /// refused; [`crate::MatrixAuthLayer::allow_suspended_when`] widens it.
    Suspended,
    /// Deactivated: its tokens are unknown (`401 M_UNKNOWN_TOKEN`).
    Deactivated,
}

#[doc = include_str!("../../docs/account_state.md")]
pub trait AccountDirectory: Send + Sync + 'static {
    /// The state of `user_id`'s account.
    fn status(&self, user_id: &str) -> AccountStatus;
}

impl<F> AccountDirectory for F
where
    F: Fn(&str) -> AccountStatus + Send + Sync + 'static,
{
    fn status(&self, user_id: &str) -> AccountStatus {
        self(user_id)
    }
}

impl<A: AccountDirectory + ?Sized> AccountDirectory for Arc<A> {
    fn status(&self, user_id: &str) -> AccountStatus {
        (**self).status(user_id)
    }
}

/// A ready in-memory [`AccountDirectory`](crate::hooks::AccountDirectory): accounts not listed are active. Clones share the map.
///
/// ```
/// use tower_matrix_auth::hooks::{AccountDirectory, MemoryAccounts, AccountStatus};
/// let states = MemoryAccounts::default();
/// states.set("@mallory:example.org", AccountStatus::Locked);
/// assert_eq!(states.status("@mallory:example.org"), AccountStatus::Locked);
/// assert_eq!(states.status("@alice:example.org"), AccountStatus::Active);
/// ```
#[derive(Clone, Default)]
pub struct MemoryAccounts {
    map: Arc<RwLock<HashMap<Box<str>, AccountStatus>>>,
}

impl MemoryAccounts {
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

impl AccountDirectory for MemoryAccounts {
    fn status(&self, user_id: &str) -> AccountStatus {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return AccountStatus::Active;
        }
        map.get(user_id).copied().unwrap_or_default()
    }
}

impl fmt::Debug for MemoryAccounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("MemoryAccounts")
            .field("entries", &map.len())
            .finish()
    }
}

/// The writes a suspended account may still make: an allow-list, not a list of what is refused.
///
/// Spec v1.13 ("Account suspension", MSC3823) leaves the list to the server, says which actions
/// it SHOULD permit and recommends refusing joining, knocking, invites, sending messages,
/// changing the profile and redacting others' events. A deny-list of those has to name every
/// form of each action a router may serve (`PUT …/send/{type}/{txnId}` and the legacy
/// `POST …/send/{type}`, `state` by any method, a trailing slash, Synapse's `PUT …/{txnId}`
/// variants of join, invite and createRoom, `rooms/{roomId}/upgrade`, which creates a room,
/// unstable endpoints such as delayed events) and misses whatever it did not think of. So the
/// rule is inverted: reads (`GET`, `HEAD`, `OPTIONS`) pass, and so do the writes below, matched
/// as exact routes ([`ClientRoute::matches`]); every other write is refused, on any path (a
/// media upload under `/_matrix/media/` too). Refusing too much
/// costs a suspended user a visible `403 M_USER_SUSPENDED`; letting too much through is a
/// silent bypass of the suspension. A homeserver widens the list with
/// [`crate::MatrixAuthLayer::allow_suspended_when`] (the spec recommends letting the user write
/// to a room kept for talking with the server's administrators).
///
/// What is here: the spec's SHOULD-permit list (sessions: log in, log out, delete devices,
/// deactivate; device verification, cross-signing and key backup; leaving rooms, which also
/// rejects invites; redacting, which the homeserver restricts to the user's own events with
/// [`crate::MatrixUser::is_suspended`]), the POSTs that only read (filters for `/sync`, searches,
/// simplified sliding sync), read receipts and markers, and the user's private settings that no
/// other user sees (account data, tags, push rules, pushers). Not here: adding admin contacts,
/// which the spec permits only where the server keeps a changelog of them (a homeserver that
/// does adds them with `allow_suspended_when`), presence and typing (seen by others), and
/// anything else.
const SUSPENDED_WRITES: &[(Method, &str)] = &[
    // Sessions.
    (Method::POST, "login"),
    (Method::POST, "login/get_token"),
    (Method::POST, "refresh"),
    (Method::POST, "logout"),
    (Method::POST, "logout/all"),
    (Method::DELETE, "devices/{deviceId}"),
    (Method::POST, "delete_devices"),
    (Method::POST, "account/deactivate"),
    // Reading.
    (Method::POST, "user/{userId}/filter"),
    (Method::POST, "search"),
    (Method::POST, "publicRooms"),
    (Method::POST, "user_directory/search"),
    (Method::POST, "org.matrix.simplified_msc3575/sync"),
    (
        Method::POST,
        "rooms/{roomId}/receipt/{receiptType}/{eventId}",
    ),
    (Method::POST, "rooms/{roomId}/read_markers"),
    // Keys, cross-signing, device verification (to-device messages), key backup.
    (Method::POST, "keys/upload"),
    (Method::POST, "keys/query"),
    (Method::POST, "keys/claim"),
    (Method::POST, "keys/device_signing/upload"),
    (Method::POST, "keys/signatures/upload"),
    (Method::PUT, "sendToDevice/{eventType}/{txnId}"),
    (Method::POST, "room_keys/version"),
    (Method::PUT, "room_keys/version/{version}"),
    (Method::DELETE, "room_keys/version/{version}"),
    (Method::PUT, "room_keys/keys"),
    (Method::DELETE, "room_keys/keys"),
    (Method::PUT, "room_keys/keys/{roomId}"),
    (Method::DELETE, "room_keys/keys/{roomId}"),
    (Method::PUT, "room_keys/keys/{roomId}/{sessionId}"),
    (Method::DELETE, "room_keys/keys/{roomId}/{sessionId}"),
    // Private settings.
    (Method::PUT, "user/{userId}/account_data/{type}"),
    (
        Method::PUT,
        "user/{userId}/rooms/{roomId}/account_data/{type}",
    ),
    (Method::PUT, "user/{userId}/rooms/{roomId}/tags/{tag}"),
    (Method::DELETE, "user/{userId}/rooms/{roomId}/tags/{tag}"),
    (Method::PUT, "pushrules/{scope}/{kind}/{ruleId}"),
    (Method::DELETE, "pushrules/{scope}/{kind}/{ruleId}"),
    (Method::PUT, "pushrules/{scope}/{kind}/{ruleId}/enabled"),
    (Method::PUT, "pushrules/{scope}/{kind}/{ruleId}/actions"),
    (Method::POST, "pushers/set"),
    // Rooms: leaving (and rejecting invites), forgetting, redacting.
    (Method::POST, "rooms/{roomId}/leave"),
    (Method::POST, "rooms/{roomId}/forget"),
    (Method::PUT, "rooms/{roomId}/redact/{eventId}/{txnId}"),
];

/// Whether a suspended account may make this request: a read on a normal path, or a write in
/// [`SUSPENDED_WRITES`]. A path that is not normal ([`is_normal_path`](crate::routes::is_normal_path)) is refused whatever the
/// method: a router that resolves its dot segments could serve it as any route.
pub(crate) fn suspended_may(parts: &Parts) -> bool {
    let path = parts.uri.path();
    if !is_normal_path(path) {
        return false;
    }
    if parts.method == Method::GET
        || parts.method == Method::HEAD
        || parts.method == Method::OPTIONS
    {
        return true;
    }
    ClientRoute::parse(path).is_some_and(|route| {
        SUSPENDED_WRITES
            .iter()
            .any(|(method, template)| parts.method == method && route.matches(template))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::tests::parts;

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
            // Forms the old deny-list missed (the review's finding 3).
            (Method::POST, "/_matrix/client/v3/createRoom/"),
            (Method::POST, "/_matrix/client/v3/join/!r:e/"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/join/"),
            (
                Method::POST,
                "/_matrix/client/r0/rooms/!r:e/send/m.room.message",
            ),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:e/state/m.room.topic/",
            ),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/upgrade"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/upgrade"),
            (Method::PUT, "/_matrix/client/v3/createRoom/txn"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/invite/txn"),
            (Method::PUT, "/_matrix/client/v3/join/!r:e/txn"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/invit%65"),
            (Method::POST, "/_matrix/client/v3/%63reateRoom"),
            (Method::PUT, "/_matrix/client/v3/profile/@a:e/m.status"),
            (
                Method::DELETE,
                "/_matrix/client/v3/profile/@a:e/displayname",
            ),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/kick"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/ban"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/typing/@a:e"),
            (Method::PUT, "/_matrix/client/v3/presence/@a:e/status"),
            (
                Method::PUT,
                "/_matrix/client/unstable/org.matrix.msc4140/rooms/!r:e/send/m.room.message/t",
            ),
            (
                Method::POST,
                "/_matrix/client/api/v1/rooms/!r:e/send/m.room.message",
            ),
            (Method::POST, "/_matrix/media/v3/upload"),
            // Allowed routes in another shape: only the exact route is allowed.
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/leave/"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/leave/txn"),
            (Method::PUT, "/_matrix/client/v3/logout"),
            // Dot and empty segments: refused whatever the method.
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:e/leave/../../../createRoom",
            ),
            (
                Method::POST,
                "/_matrix/client/v3/keys/upload/%2e%2e/%2e%2e/createRoom",
            ),
            (Method::GET, "/_matrix/client/v3/rooms/!r:e/../../sync"),
            (Method::POST, "/_matrix/client/v3//createRoom"),
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
            (Method::HEAD, "/_matrix/client/v3/account/whoami"),
            (Method::OPTIONS, "/_matrix/client/v3/createRoom"),
            (Method::GET, "/_matrix/media/v3/download/e/abc"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/leave"),
            (Method::POST, "/_matrix/client/v3/rooms/!r%3Ae/leave"),
            (Method::POST, "/_matrix/client/v3/rooms/!r:e/forget"),
            (Method::PUT, "/_matrix/client/v3/rooms/!r:e/redact/$e/txn"),
            (Method::POST, "/_matrix/client/v3/logout"),
            (Method::POST, "/_matrix/client/r0/logout/all"),
            (Method::DELETE, "/_matrix/client/v3/devices/PHONE"),
            (Method::POST, "/_matrix/client/v3/delete_devices"),
            (Method::POST, "/_matrix/client/v3/keys/upload"),
            (Method::POST, "/_matrix/client/v3/keys/query"),
            (
                Method::POST,
                "/_matrix/client/v3/keys/device_signing/upload",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/sendToDevice/m.key.verification.start/t",
            ),
            (Method::PUT, "/_matrix/client/v3/room_keys/keys?version=1"),
            (Method::POST, "/_matrix/client/v3/account/deactivate"),
            (Method::POST, "/_matrix/client/v3/user/@a:e/filter"),
            (Method::POST, "/_matrix/client/v3/search"),
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:e/receipt/m.read/$e",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/user/@a:e/account_data/m.direct",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/pushrules/global/override/r/enabled",
            ),
            (
                Method::POST,
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            ),
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
