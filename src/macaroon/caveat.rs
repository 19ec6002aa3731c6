//! The caveat rules: the grammar every caveat must follow and what each caveat key means.
//!
//! This file is the whole policy. A token is accepted only if every one of its caveats is
//! understood and holds; anything unknown fails closed, as the Matrix macaroon caveat draft
//! requires ("Servers are required to reject any macaroon with a caveat that they do not
//! understand").
//!
//! The caveat table this file implements is written once, in `docs/verifier.md`, and rendered
//! on [`crate::Verifier`].

use std::fmt;
use std::sync::Arc;

use http::request::Parts;

use crate::identity::TokenType;
use crate::macaroon::wire::RawCaveat;

/// A first-party caveat in the `key op value` form, as a custom caveat checker sees it.
///
/// What each caveat means, and which ones a token must have, is the caveat table on
/// [`Verifier`](crate::Verifier#caveats); [`Verifier::caveat`](crate::Verifier::caveat) registers
/// checkers for other keys.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Caveat<'a> {
    key: &'a str,
    op: &'a str,
    value: &'a str,
}

impl<'a> Caveat<'a> {
    /// Parses the grammar of the caveat draft: `key`, `op` and `value` joined by single spaces;
    /// `key` non-empty from `[A-Za-z0-9_]`, `op` non-empty without whitespace, `value` non-empty.
    /// A value may contain spaces, but not start with one (that would be a double space).
    ///
    /// ```
    /// use tower_matrix_auth::macaroon::Caveat;
    /// let caveat = Caveat::parse(b"time < 1700000000000").unwrap();
    /// assert_eq!((caveat.key(), caveat.op(), caveat.value()), ("time", "<", "1700000000000"));
    /// assert!(Caveat::parse(b"user_id  = @a:b").is_none());
    /// assert!(Caveat::parse(b"user-id = @a:b").is_none());
    /// ```
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        Self::parse_text(std::str::from_utf8(bytes).ok()?)
    }

    /// [`Caveat::parse`](crate::macaroon::Caveat::parse) of text already known to be UTF-8.
    fn parse_text(text: &'a str) -> Option<Self> {
        // One pass over the key: the first byte outside `[A-Za-z0-9_]` must be its space.
        let key_len = text
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))?;
        let op_len = text[key_len..].bytes().skip(1).position(|b| b == b' ')?;
        if key_len == 0 || text.as_bytes()[key_len] != b' ' {
            return None;
        }
        // Both splits fall next to an ASCII space, so on character boundaries.
        let (key, rest) = text.split_at(key_len);
        let (op, value) = rest[1..].split_at(op_len);
        let value = &value[1..];
        // Operators are short printable ASCII in practice; anything else takes the Unicode rule.
        let op_ok = !op.is_empty()
            && (op.bytes().all(|b| b.is_ascii_graphic()) || !op.chars().any(char::is_whitespace));
        let value_ok = !value.is_empty() && !value.starts_with(char::is_whitespace);
        (op_ok && value_ok).then_some(Self { key, op, value })
    }

    /// The key, e.g. `user_id`.
    pub fn key(&self) -> &'a str {
        self.key
    }

    /// The operator, e.g. `=` or `<`.
    pub fn op(&self) -> &'a str {
        self.op
    }

    /// The value, e.g. `@alice:example.org`.
    pub fn value(&self) -> &'a str {
        self.value
    }
}

impl fmt::Debug for Caveat<'_> {
    // Only the key: values of some caveats (nonces) are token material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caveat")
            .field("key", &self.key)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

/// A homeserver's rule for a caveat key the standard does not define.
pub(crate) type CaveatCheck = Arc<dyn Fn(&Caveat<'_>, &Parts) -> bool + Send + Sync>;

/// Keys whose meaning this file defines; a custom checker cannot redefine them.
pub(crate) const STANDARD_KEYS: [&str; 7] = [
    "gen",
    "user_id",
    "type",
    "time",
    "nonce",
    "guest",
    "device_id",
];

/// Why a token's caveats were refused. Logged at debug level; never shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaveatFailure {
    Malformed,
    ThirdParty,
    Unknown,
    Gen,
    UserId,
    ConflictingUserId,
    MissingUserId,
    Type,
    ConflictingType,
    MissingType,
    WrongType,
    Time,
    NotYetValid,
    TimeMismatch,
    Nonce,
    Guest,
    ConflictingDeviceId,
    Custom,
}

impl CaveatFailure {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            CaveatFailure::Malformed => "a caveat is not `key op value`",
            CaveatFailure::ThirdParty => "third-party caveats are not supported",
            CaveatFailure::Unknown => "a caveat key is not understood",
            CaveatFailure::Gen => "the gen caveat is not `gen = 1`",
            CaveatFailure::UserId => "the user_id caveat is not `user_id = <a Matrix user id>`",
            CaveatFailure::ConflictingUserId => "user_id caveats name different users",
            CaveatFailure::MissingUserId => "no user_id caveat",
            CaveatFailure::Type => "the type caveat is not access, refresh or login",
            CaveatFailure::ConflictingType => "type caveats name different types",
            CaveatFailure::MissingType => "no type caveat",
            CaveatFailure::WrongType => "the token type is not the one this endpoint takes",
            CaveatFailure::Time => "a time caveat is not `time <|>|== <integer ms>`",
            CaveatFailure::NotYetValid => "a `time >` caveat does not hold yet",
            CaveatFailure::TimeMismatch => "a `time ==` caveat does not hold",
            CaveatFailure::Nonce => "the nonce caveat is not `nonce = <value>`",
            CaveatFailure::Guest => "the guest caveat is not `guest = true`",
            CaveatFailure::ConflictingDeviceId => "device_id caveats name different devices",
            CaveatFailure::Custom => "a custom caveat does not hold",
        }
    }
}

/// What the caveats of a token say, once every one of them was understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claims<'a> {
    pub(crate) user_id: &'a str,
    pub(crate) device_id: Option<&'a str>,
    pub(crate) nonce: Option<&'a str>,
    /// The nonce is the token's very first caveat: only a holder of the key can put a caveat
    /// there (a holder of the token can only append), so the minter wrote it.
    pub(crate) nonce_first: bool,
    /// The earliest `time <` written before the first nonce: every token with that nonce (the
    /// minter's token and what its holders appended to it) expires by then.
    pub(crate) expires_before_nonce_ms: Option<u64>,
    pub(crate) is_guest: bool,
    pub(crate) token_type: TokenType,
    pub(crate) expires_at_ms: Option<u64>,
    /// A `time <` caveat no longer holds: the token is valid in every other respect.
    pub(crate) expired: bool,
}

/// The caveat policy of one verifier: leeway for time caveats and the custom checkers.
#[derive(Clone, Default)]
pub(crate) struct CaveatRules {
    pub(crate) leeway_ms: u64,
    pub(crate) custom: Vec<(Box<str>, CaveatCheck)>,
}

impl fmt::Debug for CaveatRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaveatRules")
            .field("leeway_ms", &self.leeway_ms)
            .field(
                "custom",
                &self.custom.iter().map(|(k, _)| &**k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Sets `slot` to `value`, or checks that it already holds the same value.
fn same_every_time<'a>(slot: &mut Option<&'a str>, value: &'a str) -> bool {
    match slot {
        Some(existing) => *existing == value,
        None => {
            *slot = Some(value);
            true
        }
    }
}

/// A timestamp: decimal digits only, no sign, fits in u64.
fn parse_ms(value: &str) -> Option<u64> {
    if value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse().ok()
    } else {
        None
    }
}

impl CaveatRules {
    /// Checks every caveat of a token whose signature already verified. `section` is the
    /// token's caveat section when it is UTF-8 as a whole (first-party caveats are text), so
    /// that the caveats' text needs no check of its own.
    pub(crate) fn evaluate<'a>(
        &self,
        caveats: impl Iterator<Item = RawCaveat<'a>>,
        section: Option<&'a str>,
        expected: TokenType,
        now_ms: u64,
        parts: &Parts,
    ) -> Result<Claims<'a>, CaveatFailure> {
        let mut user_id = None;
        let mut device_id = None;
        let mut nonce = None;
        let mut nonce_first = false;
        let mut expires_before_nonce_ms = None;
        let mut first = true;
        let mut token_type = None;
        let mut is_guest = false;
        let mut expires_at_ms: Option<u64> = None;
        let mut expired = false;

        for raw in caveats {
            let is_first = std::mem::replace(&mut first, false);
            if raw.third_party {
                return Err(CaveatFailure::ThirdParty);
            }
            let caveat = match section.and_then(|section| text_within(section, raw.id)) {
                Some(text) => Caveat::parse_text(text),
                None => Caveat::parse(raw.id),
            }
            .ok_or(CaveatFailure::Malformed)?;
            let (op, value) = (caveat.op, caveat.value);
            match caveat.key {
                "gen" => {
                    if (op, value) != ("=", "1") {
                        return Err(CaveatFailure::Gen);
                    }
                }
                "user_id" => {
                    if op != "=" || !is_valid_user_id(value) {
                        return Err(CaveatFailure::UserId);
                    }
                    if !same_every_time(&mut user_id, value) {
                        return Err(CaveatFailure::ConflictingUserId);
                    }
                }
                "type" => {
                    let parsed = TokenType::from_caveat_value(value)
                        .filter(|_| op == "=")
                        .ok_or(CaveatFailure::Type)?;
                    if *token_type.get_or_insert(parsed) != parsed {
                        return Err(CaveatFailure::ConflictingType);
                    }
                }
                "time" => {
                    let at = parse_ms(value).ok_or(CaveatFailure::Time)?;
                    let leeway = self.leeway_ms;
                    match op {
                        "<" => {
                            expires_at_ms = Some(expires_at_ms.map_or(at, |e| e.min(at)));
                            expired |= now_ms >= at.saturating_add(leeway);
                        }
                        ">" if now_ms.saturating_add(leeway) > at => {}
                        ">" => return Err(CaveatFailure::NotYetValid),
                        "==" if now_ms.abs_diff(at) <= leeway => {}
                        "==" => return Err(CaveatFailure::TimeMismatch),
                        _ => return Err(CaveatFailure::Time),
                    }
                }
                "nonce" => {
                    if op != "=" {
                        return Err(CaveatFailure::Nonce);
                    }
                    // The first nonce is the minter's if the token had one; a holder can only
                    // append later ones.
                    if nonce.is_none() {
                        nonce = Some(value);
                        nonce_first = is_first;
                        expires_before_nonce_ms = expires_at_ms;
                    }
                }
                "guest" => {
                    if (op, value) != ("=", "true") {
                        return Err(CaveatFailure::Guest);
                    }
                    is_guest = true;
                }
                "device_id" => {
                    if op != "=" || !same_every_time(&mut device_id, value) {
                        return Err(CaveatFailure::ConflictingDeviceId);
                    }
                }
                key => {
                    let check = self
                        .custom
                        .iter()
                        .find(|(k, _)| &**k == key)
                        .ok_or(CaveatFailure::Unknown)?;
                    if !(check.1)(&caveat, parts) {
                        return Err(CaveatFailure::Custom);
                    }
                }
            }
        }

        let user_id = user_id.ok_or(CaveatFailure::MissingUserId)?;
        let token_type = token_type.ok_or(CaveatFailure::MissingType)?;
        if token_type != expected {
            return Err(CaveatFailure::WrongType);
        }
        Ok(Claims {
            user_id,
            device_id,
            nonce,
            nonce_first,
            expires_before_nonce_ms,
            is_guest,
            token_type,
            expires_at_ms,
            expired,
        })
    }
}

/// `part` as text, when it lies within `text` on character boundaries (a caveat's bytes inside
/// the caveat section they were parsed from always do).
fn text_within<'a>(text: &'a str, part: &[u8]) -> Option<&'a str> {
    let start = (part.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    text.get(start..start.checked_add(part.len())?)
}

/// A Matrix user id: `@localpart:server_name`, at most 255 bytes.
///
/// The localpart is checked against the historical grammar every server must still accept
/// (printable ASCII except `:`); the server name is a host (DNS name, IPv4, or `[IPv6]`) with
/// an optional port.
pub fn is_valid_user_id(user_id: &str) -> bool {
    let Some(rest) = user_id.strip_prefix('@') else {
        return false;
    };
    let Some((localpart, server_name)) = rest.split_once(':') else {
        return false;
    };
    user_id.len() <= 255
        && !localpart.is_empty()
        && localpart.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && is_valid_server_name(server_name)
}

/// `host [":" port]` from the Matrix appendix on server names.
fn is_valid_server_name(name: &str) -> bool {
    let port = if let Some(v6) = name.strip_prefix('[') {
        let Some((address, after)) = v6.split_once(']') else {
            return false;
        };
        if address.is_empty()
            || address.len() > 45
            || !address
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        }
    } else {
        let (host, port) = match name.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        };
        let host_ok = !host.is_empty()
            && host.len() <= 255
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !host_ok {
            return false;
        }
        port
    };
    port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_within_finds_a_part_by_its_place_and_nothing_else() {
        let section = "0021cid user_id = @é:example.org\n";
        let bytes = section.as_bytes();
        let value = &bytes[8..bytes.len() - 1];
        assert_eq!(
            text_within(section, value),
            Some("user_id = @é:example.org")
        );
        // Equal bytes elsewhere are not within the section.
        let copy = value.to_vec();
        assert_eq!(text_within(section, &copy), None);
        // Half of `é` is not text.
        let at = section.find('é').unwrap();
        assert_eq!(text_within(section, &bytes[at + 1..]), None);
        // Running past the end.
        assert_eq!(text_within(&section[..10], value), None);
    }

    #[test]
    fn grammar() {
        for ok in [
            "gen = 1",
            "a_B9 op value with spaces",
            "time == 5",
            "k ~= v",
        ] {
            assert!(Caveat::parse(ok.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "",
            "gen",
            "gen =",
            "gen = ",
            " gen = 1",
            "gen  = 1",
            "gen =  1",
            "ge-n = 1",
            "gen\t= 1",
            "gen =\t1",
            "gen = \t1",
        ] {
            assert!(Caveat::parse(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(Caveat::parse(b"gen = \xff").is_none());
    }

    #[test]
    fn user_ids() {
        for ok in [
            "@alice:example.org",
            "@a:b",
            "@alice:example.org:8448",
            "@alice:[::1]",
            "@alice:[::1]:8448",
            "@alice:1.2.3.4",
            "@Historical!User:example.org",
        ] {
            assert!(is_valid_user_id(ok), "{ok}");
        }
        let long = format!("@{}:example.org", "a".repeat(250));
        for bad in [
            "alice:example.org",
            "@alice",
            "@:example.org",
            "@alice:",
            "@al ice:example.org",
            "@alice:exa_mple.org",
            "@alice:example.org:",
            "@alice:example.org:123456",
            "@alice:example.org:80a",
            "@alice:[]",
            "@alice:[::1",
            "@alice:[::1]x",
            "@alïce:example.org",
            long.as_str(),
        ] {
            assert!(!is_valid_user_id(bad), "{bad}");
        }
    }
}
