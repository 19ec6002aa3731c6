//! Application services: callers that authenticate with their `as_token` and may act as any
//! user in their namespaces (`?user_id=`) and, since spec v1.17, as one of that user's devices
//! (`?device_id=`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use percent_encoding::percent_decode;
use regex::Regex;

use crate::layer::IpRanges;
use crate::macaroon::caveat::is_valid_user_id;

/// A user namespace of an application service registration.
#[derive(Clone)]
struct Namespace {
    regex: Regex,
    exclusive: bool,
}

/// One application service registration.
///
/// ```
/// use tower_matrix_auth::hooks::AppService;
/// let bridge = AppService::new("irc", "as_token_from_the_registration", "@irc_bot:example.org")
///     .unwrap()
///     .user_namespace(r"@irc_.*:example\.org", true)
///     .unwrap();
/// assert!(format!("{bridge:?}").contains("irc") && !format!("{bridge:?}").contains("as_token_from"));
/// ```
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct AppService {
    id: Arc<str>,
    as_token: Box<[u8]>,
    sender: String,
    users: Vec<Namespace>,
    ip_ranges: Option<IpRanges>,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRegistration(String);

impl fmt::Display for InvalidRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidRegistration {}

impl AppService {
    /// A registration: its `id`, its `as_token`, and its sender (the user it acts as by default:
    /// `@<sender_localpart>:<server name>`).
    pub fn new(
        id: impl Into<String>,
        as_token: impl AsRef<[u8]>,
        sender: impl Into<String>,
    ) -> Result<Self, InvalidRegistration> {
        let sender = sender.into();
        if !is_valid_user_id(&sender) {
            return Err(InvalidRegistration(format!(
                "sender `{sender}` is not a Matrix user id"
            )));
        }
        if as_token.as_ref().is_empty() {
            return Err(InvalidRegistration("as_token is empty".into()));
        }
        Ok(Self {
            id: Arc::from(id.into()),
            as_token: as_token.as_ref().into(),
            sender,
            users: Vec::new(),
            ip_ranges: None,
        })
    }

    /// Adds a user namespace. The regex must match the whole user id (it is anchored at both
    /// ends, stricter than Synapse's start-anchored `re.match`).
    pub fn user_namespace(
        mut self,
        regex: &str,
        exclusive: bool,
    ) -> Result<Self, InvalidRegistration> {
        let regex = Regex::new(&format!("^(?:{regex})$"))
            .map_err(|e| InvalidRegistration(format!("namespace regex: {e}")))?;
        self.users.push(Namespace { regex, exclusive });
        Ok(self)
    }

    /// Accepts its `as_token` only from these networks (`"10.0.0.0/8, 2001:db8::/32"`), as
    /// Synapse's `ip_range_whitelist`: from anywhere else, or when the client's address is
    /// unknown, the token is `401 M_UNKNOWN_TOKEN`. The address is the layer's
    /// ([`crate::layer::ClientAddr`]): configure its peer address and trusted proxies
    /// ([`crate::MatrixAuthLayer::peer_addr`], [`crate::MatrixAuthLayer::trusted_proxies`]).
    pub fn ip_ranges(mut self, ranges: &str) -> Result<Self, InvalidRegistration> {
        let ranges: IpRanges = ranges
            .parse()
            .map_err(|e| InvalidRegistration(format!("ip_ranges: {e}")))?;
        if ranges.is_empty() {
            // Synapse reads an empty list as no restriction, the opposite of what an empty
            // allow-list says: refuse it rather than guess.
            return Err(InvalidRegistration(
                "ip_ranges: empty (leave it out for no restriction)".into(),
            ));
        }
        self.ip_ranges = Some(ranges);
        Ok(self)
    }

    /// Whether its `as_token` may be used from `client` (always, without IP ranges).
    pub(crate) fn allows(&self, client: Option<std::net::IpAddr>) -> bool {
        match &self.ip_ranges {
            None => true,
            Some(ranges) => client.is_some_and(|addr| ranges.contains(addr)),
        }
    }

    /// Whether it has an IP allow-list.
    pub(crate) fn has_ip_ranges(&self) -> bool {
        self.ip_ranges.is_some()
    }

    /// The registration id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sender user id.
    pub fn sender(&self) -> &str {
        &self.sender
    }

    fn covers(&self, user_id: &str) -> bool {
        self.users.iter().any(|n| n.regex.is_match(user_id))
    }

    fn claims_exclusively(&self, user_id: &str) -> bool {
        self.users
            .iter()
            .any(|n| n.exclusive && n.regex.is_match(user_id))
    }
}

impl fmt::Debug for AppService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppService")
            .field("id", &self.id)
            .field("sender", &self.sender)
            .field(
                "user_namespaces",
                &self
                    .users
                    .iter()
                    .map(|n| n.regex.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Answers whether a user has a device, for `?device_id=`.
pub(crate) type DeviceCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

#[doc = include_str!("../../docs/appservice.md")]
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone, Default)]
pub struct AppServices {
    list: Arc<Vec<AppService>>,
    devices: Option<DeviceCheck>,
}

/// How an application service request was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Masquerade {
    /// Acting as this user (and device).
    As {
        appservice: Arc<str>,
        user_id: String,
        device_id: Option<String>,
    },
    /// `?user_id=` outside the caller's namespaces, or not a Matrix user id: 403 `M_FORBIDDEN`.
    Forbidden,
    /// `?device_id=` the homeserver does not know: 400 `M_UNKNOWN_DEVICE`.
    UnknownDevice,
}

impl AppServices {
    /// No application services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers one more. Refused if its id or its `as_token` is already registered: a token
    /// must name one registration, and an id one set of namespaces.
    pub fn with(self, appservice: AppService) -> Result<Self, InvalidRegistration> {
        for other in self.list.iter() {
            if other.id == appservice.id {
                return Err(InvalidRegistration(format!(
                    "application service id `{}` is registered twice",
                    appservice.id
                )));
            }
            if crate::macaroon::ct::bytes_equal(&other.as_token, &appservice.as_token) {
                return Err(InvalidRegistration(format!(
                    "application services `{}` and `{}` have the same as_token",
                    other.id, appservice.id
                )));
            }
        }
        let mut list = (*self.list).clone();
        list.push(appservice);
        Ok(Self {
            list: Arc::new(list),
            devices: self.devices,
        })
    }

    /// How `?device_id=` is checked: `known(user_id, device_id)`. Without it every `device_id`
    /// is refused as unknown.
    pub fn devices(mut self, known: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        self.devices = Some(Arc::new(known));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The registration whose `as_token` this is. Every registration is compared, in constant
    /// time, so timing tells nothing about which one (or how much of one) matched.
    pub(crate) fn find(&self, token: &[u8]) -> Option<&AppService> {
        let mut found = None;
        for appservice in self.list.iter() {
            if crate::macaroon::ct::bytes_equal(appservice.as_token.as_ref(), token) {
                found = Some(appservice);
            }
        }
        found
    }

    /// Who the application service acts as for this request.
    pub(crate) fn masquerade(&self, appservice: &AppService, parts: &Parts) -> Masquerade {
        // A repeated parameter could be read differently by a proxy and by us: refuse it.
        let (Ok(user_id), Ok(device_id)) = (
            query_param(parts, "user_id"),
            query_param(parts, "device_id"),
        ) else {
            return Masquerade::Forbidden;
        };
        let user_id = match user_id {
            None => appservice.sender.clone(),
            Some(user_id) => {
                // A namespace regex (`@irc_.*:example.org`) also matches what is no user id
                // (`@irc_a:example.ouser_id==@irc_b:example.org`, control characters, U+FFFD
                // for bytes that were not UTF-8); handlers key on the id: fail closed.
                // Another service's sender is that service's own, as if exclusively claimed.
                let allowed = is_valid_user_id(&user_id)
                    && (user_id == appservice.sender
                        || (appservice.covers(&user_id)
                            && !self.list.iter().any(|other| {
                                other.id != appservice.id
                                    && (other.claims_exclusively(&user_id)
                                        || other.sender == user_id)
                            })));
                if !allowed {
                    return Masquerade::Forbidden;
                }
                user_id
            }
        };
        if let Some(device_id) = &device_id {
            let known = self
                .devices
                .as_ref()
                .is_some_and(|known| known(&user_id, device_id));
            if !known {
                return Masquerade::UnknownDevice;
            }
        }
        Masquerade::As {
            appservice: appservice.id.clone(),
            user_id,
            device_id,
        }
    }
}

impl fmt::Debug for AppServices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppServices")
            .field("registrations", &self.list)
            .field("device_check", &self.devices.is_some())
            .finish()
    }
}

/// A query parameter, percent-decoded (`+` stays `+`); `Err` if it is given twice.
fn query_param(parts: &Parts, name: &str) -> Result<Option<String>, ()> {
    let Some(query) = parts.uri.query() else {
        return Ok(None);
    };
    let mut value = None;
    for pair in query.split('&') {
        let (key, v) = pair.split_once('=').unwrap_or((pair, ""));
        if Cow::from(percent_decode(key.as_bytes())) == name.as_bytes() {
            if value.is_some() {
                return Err(());
            }
            value = Some(
                percent_decode(v.as_bytes())
                    .decode_utf8_lossy()
                    .into_owned(),
            );
        }
    }
    Ok(value.filter(|v| !v.is_empty()))
}
