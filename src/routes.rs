//! Matrix client-server routes, recognised by their path segments.
//!
//! Every exception the layer makes because of a request's path (skipping it, expired tokens on
//! logout, guests on whoami, what a locked or suspended account may still do) names exact routes.
//! A substring or a suffix is not enough: the client chooses many segments (transaction ids,
//! state keys, event and account data types), so
//! `PUT /_matrix/client/v3/rooms/{roomId}/send/m.room.message/logout` ends with `/logout` and
//! `PUT /_matrix/client/v3/rooms/{roomId}/state/account/whoami` ends with `/account/whoami`.
//!
//! [`ClientRoute::parse`] reads `/_matrix/client/{version}/{segments…}`:
//!
//! - the version is `r0`, `v` and digits (`v1`, `v3`, …) or `unstable`. An unstable endpoint's
//!   namespace (`/_matrix/client/unstable/org.matrix.msc2965/…`) stays the first segment: a
//!   namespace is a reversed domain name, and no endpoint name holds a dot, so
//!   `unstable/logout` is the logout route and `unstable/org.example.msc1/logout` is not. Other
//!   prefixes (`api/v1`, from before r0) are no route: they get no exception.
//! - each segment is percent-decoded after the path is split at `/`: RFC 3986 makes `logou%74`
//!   the same segment as `logout`, and routers that capture segments as parameters decode them
//!   too. `%2F` stays inside its segment (event ids of room version 3 hold `/`). A segment that
//!   does not decode to UTF-8 makes the path no route.
//! - a trailing slash is an empty last segment, so `createRoom/` is not `createRoom`. Rules
//!   match exact routes only, and every rule here *allows* something the default refuses, so a
//!   path that differs from an allowed route in any way, a trailing slash included, is refused.
//!
//! A path that is not normal ([`is_normal_path`]: a `.` or `..` segment, raw or
//! percent-encoded, or an empty segment before the last) is no route at all, and the layer
//! grants no path-dependent exception on it, whatever the predicate: routers and proxies
//! disagree on such paths (some resolve `..`, some collapse `//`, some decode `%2e` first), so
//! `/_matrix/federation/../client/v3/account/whoami` could be federation to one and a client
//! request to another. Such a request is still authenticated like any other; it just never
//! benefits from a rule.

use std::borrow::Cow;

use http::request::Parts;
use http::Method;

use percent_encoding::percent_decode;

/// Whether `path` is in normal form: it starts with `/`, no segment is `.` or `..` (raw or
/// percent-encoded: `%2e`, `.%2E`, …), and no segment but the last is empty (a trailing slash
/// is allowed, `//` is not).
///
/// The layer grants no path-dependent exception (skip rules, optional routes, expired tokens,
/// guests, a locked or suspended account's allowed requests) on a path that is not normal.
///
/// ```
/// use tower_matrix_auth::routes::is_normal_path;
/// assert!(is_normal_path("/_matrix/federation/v1/version"));
/// assert!(is_normal_path("/_matrix/client/v3/rooms/!r:example.org/state/m.room.topic/"));
/// assert!(!is_normal_path("/_matrix/federation/../client/v3/account/whoami"));
/// assert!(!is_normal_path("/_matrix/federation/%2e%2E/client/v3/account/whoami"));
/// assert!(!is_normal_path("/_matrix/client/v3//logout"));
/// ```
pub fn is_normal_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || is_dot_segment(segment) {
            return false;
        }
    }
    true
}

/// `.` or `..`, each dot raw or percent-encoded. No allocation: this runs for every skipped
/// request.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] | [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return false,
        };
        dots += 1;
    }
    matches!(dots, 1 | 2)
}

/// A request path read as a Matrix client-server route: `/_matrix/client/{version}/…`, split
/// into percent-decoded segments (see the [module docs](self) for the rules).
///
/// ```
/// use tower_matrix_auth::routes::ClientRoute;
/// let route = ClientRoute::parse("/_matrix/client/v3/rooms/!r%3Aexample.org/send/m.room.message/t1")
///     .unwrap();
/// assert_eq!(route.version(), "v3");
/// assert!(route.matches("rooms/{roomId}/send/{eventType}/{txnId}"));
/// assert_eq!(route.segments().nth(1), Some("!r:example.org"));
/// assert!(!route.matches("rooms/{roomId}/send/{eventType}"));
///
/// assert!(ClientRoute::parse("/_matrix/client/v3/rooms/x/../../logout").is_none());
/// assert!(ClientRoute::parse("/_matrix/federation/v1/version").is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRoute<'a> {
    version: Cow<'a, str>,
    segments: Vec<Cow<'a, str>>,
}

impl<'a> ClientRoute<'a> {
    /// Reads `path`; `None` when it is not a client-server route of a known version, is not
    /// normal ([`is_normal_path`]) or has a segment that does not decode to UTF-8.
    pub fn parse(path: &'a str) -> Option<Self> {
        if !is_normal_path(path) {
            return None;
        }
        // Normal, so it starts with `/`.
        let mut raw = path[1..].split('/');
        if decode(raw.next()?)? != "_matrix" || decode(raw.next()?)? != "client" {
            return None;
        }
        let version = decode(raw.next()?)?;
        if !is_version(&version) {
            return None;
        }
        let segments = raw.map(decode).collect::<Option<Vec<_>>>()?;
        Some(Self { version, segments })
    }

    /// The version segment: `r0`, `v1`, `v3`, …, or `unstable`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The decoded segments after the version (an unstable namespace first, if any; an empty
    /// last one for a trailing slash).
    pub fn segments(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.segments.iter().map(|segment| &**segment)
    }

    /// Whether the segments after the version are exactly `template`, written as in the spec
    /// without the prefix: `account/whoami`, `rooms/{roomId}/leave`. A `{…}` segment matches
    /// any non-empty segment, anything else only itself; a trailing slash or an extra segment
    /// does not match.
    pub fn matches(&self, template: &str) -> bool {
        let mut segments = self.segments.iter();
        for part in template.split('/') {
            let Some(segment) = segments.next() else {
                return false;
            };
            let placeholder = part.len() >= 2 && part.starts_with('{') && part.ends_with('}');
            let fits = if placeholder {
                !segment.is_empty()
            } else {
                segment == part
            };
            if !fits {
                return false;
            }
        }
        segments.next().is_none()
    }
}

fn decode(raw: &str) -> Option<Cow<'_, str>> {
    match Cow::from(percent_decode(raw.as_bytes())) {
        Cow::Borrowed(_) => Some(Cow::Borrowed(raw)),
        Cow::Owned(bytes) => String::from_utf8(bytes).ok().map(Cow::Owned),
    }
}

fn is_version(segment: &str) -> bool {
    match segment.strip_prefix('v') {
        Some(digits) => !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        None => segment == "r0" || segment == "unstable",
    }
}

/// `POST /_matrix/client/{version}/logout` or `…/logout/all`, exactly: where a locked account
/// may still go, and where [`crate::MatrixAuthLayer::allow_expired_on_logout`] accepts expired
/// tokens.
///
/// POST only: the spec defines no other method there, and an exception should be no wider than
/// the route it is for (a router dispatching on the path alone would otherwise hand the
/// exception to whatever it serves there for `GET`).
///
/// ```
/// use http::{Method, Request};
/// use tower_matrix_auth::routes::is_logout_route;
/// let parts = |method: Method, path: &str| {
///     Request::builder().method(method).uri(path).body(()).unwrap().into_parts().0
/// };
/// assert!(is_logout_route(&parts(Method::POST, "/_matrix/client/v3/logout")));
/// assert!(is_logout_route(&parts(Method::POST, "/_matrix/client/r0/logout/all")));
/// assert!(!is_logout_route(&parts(
///     Method::PUT,
///     "/_matrix/client/v3/rooms/!r:example.org/send/m.room.message/logout",
/// )));
/// assert!(!is_logout_route(&parts(Method::GET, "/_matrix/client/v3/logout")));
/// ```
pub fn is_logout_route(parts: &Parts) -> bool {
    parts.method == Method::POST
        && ClientRoute::parse(parts.uri.path())
            .is_some_and(|route| route.matches("logout") || route.matches("logout/all"))
}

/// `GET /_matrix/client/{version}/account/whoami` exactly (or `HEAD`, which is `GET` without
/// the body): e.g. the one route guests may use,
/// `.allow_guests_when(tower_matrix_auth::routes::is_whoami_route)`.
///
/// ```
/// use http::{Method, Request};
/// use tower_matrix_auth::routes::is_whoami_route;
/// let parts = |method: Method, path: &str| {
///     Request::builder().method(method).uri(path).body(()).unwrap().into_parts().0
/// };
/// assert!(is_whoami_route(&parts(Method::GET, "/_matrix/client/v3/account/whoami")));
/// assert!(!is_whoami_route(&parts(
///     Method::PUT,
///     "/_matrix/client/v3/rooms/!r:example.org/state/account/whoami",
/// )));
/// ```
pub fn is_whoami_route(parts: &Parts) -> bool {
    (parts.method == Method::GET || parts.method == Method::HEAD)
        && ClientRoute::parse(parts.uri.path()).is_some_and(|route| route.matches("account/whoami"))
}

/// Whether this is the federation API's `GET /_matrix/federation/v1/openid/userinfo`, whose
/// `?access_token=` is an OpenID token another server hands in, not a client's access token.
/// The layer never claims it: such a request passes untouched (its query included) whatever the
/// layer's rules, as long as its path is normal ([`is_normal_path`]).
pub fn is_openid_userinfo_route(parts: &Parts) -> bool {
    parts.method == Method::GET && parts.uri.path() == "/_matrix/federation/v1/openid/userinfo"
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request head, for the route rules' unit tests here and in `account`.
    pub(crate) fn parts(method: Method, path: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn normal_paths() {
        for path in [
            "/",
            "/_matrix/client/v3/logout",
            "/_matrix/client/v3/createRoom/",
            "/_matrix/client/v3/rooms/!r:e/state/m.room.topic/",
            "/_matrix/client/v3/rooms/!r:e/send/m.room.message/...",
            "/_matrix/client/v3/rooms/!r:e/send/m.room.message/.x",
            "/_matrix/client/v3/rooms/!r:e/send/m.room.message/%2e%2e%2e",
            "/_matrix/client/v3/rooms/!r:e/redact/$a%2Fb/t",
            "/_matrix/client/v3/rooms/!r:e/send/m.room.message/%252e%252e",
        ] {
            assert!(is_normal_path(path), "{path}");
        }
        for path in [
            "",
            "*",
            "_matrix/client/v3/logout",
            "//_matrix/client/v3/logout",
            "/_matrix/federation/../client/v3/account/whoami",
            "/_matrix/federation/./v1/version",
            "/_matrix/federation/%2e%2e/client/v3/account/whoami",
            "/_matrix/federation/%2E%2E/client/v3/account/whoami",
            "/_matrix/federation/.%2e/client/v3/account/whoami",
            "/_matrix/federation/%2e./client/v3/account/whoami",
            "/_matrix/federation/%2e/v1/version",
            "/_matrix/client/v3/rooms/!r:e/send/m.room.message/x/../../../../logout",
            "/_matrix/client/v3//logout",
            "/_matrix/client/v3/logout/..",
            "/_matrix/client/v3/logout/.",
        ] {
            assert!(!is_normal_path(path), "{path}");
        }
    }

    #[test]
    fn parsing() {
        let route = ClientRoute::parse("/_matrix/client/r0/rooms/%21r%3Ae/join").unwrap();
        assert_eq!(route.version(), "r0");
        assert_eq!(
            route.segments().collect::<Vec<_>>(),
            ["rooms", "!r:e", "join"]
        );
        let route = ClientRoute::parse("/_matrix/client/v3/createRoom/").unwrap();
        assert_eq!(route.segments().collect::<Vec<_>>(), ["createRoom", ""]);
        assert!(!route.matches("createRoom"));
        let route = ClientRoute::parse("/_matrix/client/v3/rooms/!r:e/redact/$a%2Fb/t").unwrap();
        assert!(route.matches("rooms/{roomId}/redact/{eventId}/{txnId}"));
        let route = ClientRoute::parse("/_matrix/client/unstable/org.matrix.msc2965/auth").unwrap();
        assert_eq!(route.version(), "unstable");
        assert!(route.matches("org.matrix.msc2965/auth"));
        for version in ["v1", "v3", "v12", "r0", "unstable", "%76%33"] {
            let path = format!("/_matrix/client/{version}/logout");
            assert!(ClientRoute::parse(&path).is_some(), "{path}");
        }
        for path in [
            "/_matrix/client/versions",
            "/_matrix/client/api/v1/logout",
            "/_matrix/client/r1/logout",
            "/_matrix/client/v/logout",
            "/_matrix/client/v3x/logout",
            "/_matrix/client/",
            "/_matrix/federation/v1/version",
            "/_matrix/clients/v3/logout",
            "/logout",
            "/_matrix/client/v3/rooms/%FF/leave",
        ] {
            assert!(ClientRoute::parse(path).is_none(), "{path}");
        }
        // An empty placeholder never matches: `rooms//leave` is not normal, a trailing one is.
        let route = ClientRoute::parse("/_matrix/client/v3/rooms/x/state/m.room.topic/").unwrap();
        assert!(!route.matches("rooms/{roomId}/state/{eventType}/{stateKey}"));
        assert!(route.matches("rooms/{roomId}/state/{eventType}/"));
    }

    /// The review's finding 3: every shape that ended with `/logout` (a transaction id, a state
    /// key, an account data type the client chooses) but is no logout. Each passed the old
    /// `ends_with("/logout")` check.
    #[test]
    fn logout_is_the_exact_route() {
        let not_logout = [
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/send/m.room.message/logout",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/state/m.room.topic/logout",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/user/@a:e/account_data/logout",
            ),
            (Method::PUT, "/_matrix/client/v3/sendToDevice/m.x/logout"),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/redact/$e/logout",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/send/m.room.message/logout/all",
            ),
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/state/logout/all",
            ),
            // Percent-encoded: decoded, these are still not logout.
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/send/m.room.message/logou%74",
            ),
            (Method::POST, "/_matrix/client/v3/logout%2Fall"),
            // Dot segments a normalising router would resolve to /logout.
            (
                Method::POST,
                "/_matrix/client/v3/rooms/!r:e/send/m.room.message/x/../../../../logout",
            ),
            (Method::POST, "/_matrix/client/v3/rooms/%2e%2e/logout"),
            (Method::POST, "/_matrix/federation/../client/v3/logout"),
            (Method::POST, "/_matrix/client/v3//logout"),
            // Close, but another route.
            (Method::POST, "/_matrix/client/v3/logout/"),
            (Method::POST, "/_matrix/client/v3/logoutx"),
            (Method::POST, "/_matrix/client/v3/logout/all/x"),
            (
                Method::POST,
                "/_matrix/client/unstable/org.example.msc1/logout",
            ),
            (Method::POST, "/_matrix/client/api/v1/logout"),
            (Method::POST, "/logout"),
            (Method::GET, "/_matrix/client/v3/logout"),
            (Method::PUT, "/_matrix/client/v3/logout/all"),
        ];
        for (method, path) in not_logout {
            assert!(
                !is_logout_route(&parts(method.clone(), path)),
                "{method} {path}"
            );
        }
        for path in [
            "/_matrix/client/v3/logout",
            "/_matrix/client/v3/logout/all",
            "/_matrix/client/r0/logout",
            "/_matrix/client/r0/logout/all",
            "/_matrix/client/unstable/logout",
            "/_matrix/client/v3/logou%74",
        ] {
            assert!(is_logout_route(&parts(Method::POST, path)), "{path}");
        }
    }

    #[test]
    fn whoami_is_the_exact_route() {
        for (method, path) in [
            (
                Method::PUT,
                "/_matrix/client/v3/rooms/!r:e/state/account/whoami",
            ),
            (
                Method::GET,
                "/_matrix/client/v3/rooms/!r:e/state/account/whoami",
            ),
            (Method::PUT, "/_matrix/client/v3/user/@a:e/account/whoami"),
            (
                Method::GET,
                "/_matrix/client/v3/rooms/!r:e/state/account%2Fwhoami",
            ),
            (Method::GET, "/_matrix/client/v3/devices/../account/whoami"),
            (Method::GET, "/_matrix/client/v3/account/whoami/"),
            (Method::POST, "/_matrix/client/v3/account/whoami"),
            (Method::GET, "/whoami"),
        ] {
            assert!(
                !is_whoami_route(&parts(method.clone(), path)),
                "{method} {path}"
            );
        }
        for path in [
            "/_matrix/client/v3/account/whoami",
            "/_matrix/client/r0/account/whoami",
            "/_matrix/client/v3/account/whoam%69",
        ] {
            assert!(is_whoami_route(&parts(Method::GET, path)), "{path}");
        }
        assert!(is_whoami_route(&parts(
            Method::HEAD,
            "/_matrix/client/v3/account/whoami"
        )));
    }
}
