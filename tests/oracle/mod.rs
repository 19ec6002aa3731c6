//! Independent oracles for the docs' rules tables, written from the tables and not from the
//! code: token extraction, the caveat grammar, Matrix user ids, and the caveat table; and, in
//! [`lifecycle`], the model of the token lifecycle table.
//!
//! Shared by `tests/it/properties.rs` and `tests/it/lifecycle_properties.rs` (proptest) and the
//! fuzz targets in `fuzz/` (through `#[path]`), so it depends on nothing but `std` (and
//! [`lifecycle`] on the crate's public types, which both sides have).
#![allow(dead_code)]

pub mod lifecycle;

/// Why a request has no usable token: every one is `401 M_MISSING_TOKEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No header, no parameter, or only empty ones.
    NoToken,
    /// A header token and a non-empty parameter.
    Mixed,
    /// Two `Authorization` headers.
    TooManyHeaders,
    /// Two `access_token` parameters, empty or not.
    TooManyQueryTokens,
    /// `Authorization` that is not `Bearer <visible ASCII>`.
    NotBearer,
}

impl Missing {
    /// The `error` text the docs promise (the table gives most; the rest is the crate's).
    pub fn message_prefix(self) -> &'static str {
        match self {
            Missing::NoToken => "Missing access token.",
            Missing::Mixed => "Mixing Authorization headers and access_token query parameters.",
            Missing::TooManyHeaders => "Too many Authorization headers.",
            Missing::TooManyQueryTokens => "Too many access_token",
            Missing::NotBearer => "Invalid Authorization header",
        }
    }
}

/// What the extraction table says about a request: the token, or every rule that refuses it
/// (the table does not rank two rules that both apply; each gives `M_MISSING_TOKEN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extraction {
    /// A token to verify.
    Token(Vec<u8>),
    /// No token at all (passes on optional routes).
    Nothing,
    /// Refused before verification, for these reasons (never empty).
    Refused(Vec<Missing>),
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding as the table says: `%XX` is a byte, anything else (a lone `%`, `+`) stays.
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'%' && tail.len() >= 2 {
            if let (Some(hi), Some(lo)) = (hex(tail[0]), hex(tail[1])) {
                out.push(hi * 16 + lo);
                rest = &tail[2..];
                continue;
            }
        }
        out.push(first);
        rest = tail;
    }
    out
}

/// Whether a query pair (`key=value` or a bare `key`) is an `access_token` parameter.
pub fn is_access_token_pair(pair: &str) -> bool {
    let key = match pair.find('=') {
        Some(at) => &pair[..at],
        None => pair,
    };
    percent_decode(key.as_bytes()) == b"access_token"
}

/// The header row of the table: `Ok(None)` for an empty token.
fn bearer(value: &[u8]) -> Result<Option<Vec<u8>>, Missing> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Err(Missing::NotBearer);
    }
    let after = &value[SCHEME.len()..];
    let token = match after.split_first() {
        None => return Ok(None),
        Some((b' ', token)) => token,
        Some(_) => return Err(Missing::NotBearer),
    };
    if token.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
        return Err(Missing::NotBearer);
    }
    Ok((!token.is_empty()).then(|| token.to_vec()))
}

/// The extraction table: `authorization` holds every `Authorization` header value, `query` the
/// raw query string, `query_allowed` whether `access_token` is read at all.
pub fn extract(authorization: &[&[u8]], query: Option<&str>, query_allowed: bool) -> Extraction {
    let mut refused = Vec::new();
    let header = match authorization {
        [] => None,
        [value] => match bearer(value) {
            Ok(token) => token,
            Err(why) => {
                refused.push(why);
                None
            }
        },
        _ => {
            refused.push(Missing::TooManyHeaders);
            None
        }
    };
    let mut parameter = None;
    if let (true, Some(query)) = (query_allowed, query) {
        let pairs: Vec<&str> = query
            .split('&')
            .filter(|p| is_access_token_pair(p))
            .collect();
        match pairs.as_slice() {
            [] => {}
            [pair] => {
                let value = pair.split_once('=').map_or("", |(_, v)| v);
                if !value.is_empty() {
                    parameter = Some(percent_decode(value.as_bytes()));
                }
            }
            _ => refused.push(Missing::TooManyQueryTokens),
        }
    }
    if header.is_some() && parameter.is_some() {
        refused.push(Missing::Mixed);
    }
    if !refused.is_empty() {
        return Extraction::Refused(refused);
    }
    match header.or(parameter) {
        Some(token) => Extraction::Token(token),
        None => Extraction::Nothing,
    }
}

// ---- Caveats ----------------------------------------------------------------------------------

/// The caveat grammar: `key op value`, single spaces; `key` from `[A-Za-z0-9_]`, `op` without
/// whitespace, `value` non-empty and not starting with whitespace. `None` if not UTF-8 or not
/// in that shape.
pub fn caveat_parts(bytes: &[u8]) -> Option<(&str, &str, &str)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut fields = text.splitn(3, ' ');
    let key = fields.next()?;
    let op = fields.next()?;
    let value = fields.next()?;
    let key_ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let op_ok = !op.is_empty() && op.chars().all(|c| !c.is_whitespace());
    let value_ok = value.chars().next().is_some_and(|c| !c.is_whitespace());
    (key_ok && op_ok && value_ok).then_some((key, op, value))
}

/// `@localpart:server_name`, at most 255 bytes; localpart printable ASCII without `:`; server
/// name a DNS name / IPv4 (letters, digits, `-`, `.`) or `[IPv6]` (hex, `:`, `.`, at most 45),
/// then an optional `:port` of 1 to 5 digits.
pub fn user_id_ok(user_id: &str) -> bool {
    let b = user_id.as_bytes();
    if b.len() > 255 || b.first() != Some(&b'@') {
        return false;
    }
    let Some(colon) = b.iter().position(|&c| c == b':') else {
        return false;
    };
    let localpart = &b[1..colon];
    if localpart.is_empty() || localpart.iter().any(|&c| !(0x21..=0x7e).contains(&c)) {
        return false;
    }
    let server = &b[colon + 1..];
    let rest = if server.first() == Some(&b'[') {
        let Some(close) = server.iter().position(|&c| c == b']') else {
            return false;
        };
        let address = &server[1..close];
        if address.is_empty()
            || address.len() > 45
            || address
                .iter()
                .any(|&c| !(c.is_ascii_hexdigit() || c == b':' || c == b'.'))
        {
            return false;
        }
        &server[close + 1..]
    } else {
        let end = server
            .iter()
            .position(|&c| c == b':')
            .unwrap_or(server.len());
        let host = &server[..end];
        if host.is_empty()
            || host.len() > 255
            || host
                .iter()
                .any(|&c| !(c.is_ascii_alphanumeric() || c == b'-' || c == b'.'))
        {
            return false;
        }
        &server[end..]
    };
    match rest.split_first() {
        None => true,
        Some((b':', port)) => {
            (1..=5).contains(&port.len()) && port.iter().all(|c| c.is_ascii_digit())
        }
        Some(_) => false,
    }
}

/// Who a token names, once the caveat table accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub device_id: Option<String>,
    pub nonce: Option<String>,
    pub is_guest: bool,
    pub token_type: String,
    pub expires_at_ms: Option<u64>,
}

/// The caveat table's verdict on a genuine token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept(Identity),
    /// Valid in every respect but a `time <` caveat: `soft_logout`.
    Expired(Identity),
    Reject(&'static str),
}

/// The docs' caveat table for a token whose signature holds, on an endpoint that takes
/// `expected` (`access`, `refresh` or `login`), at `now_ms`, no leeway, no custom caveats.
/// `caveats` are `(identifier, third_party)`.
pub fn caveat_table(caveats: &[(&[u8], bool)], expected: &str, now_ms: u64) -> Verdict {
    fn same<'a>(slot: &mut Option<&'a str>, value: &'a str) -> bool {
        *slot.get_or_insert(value) == value
    }
    let mut user_id: Option<&str> = None;
    let mut device_id: Option<&str> = None;
    let mut nonce: Option<&str> = None;
    let mut token_type: Option<&str> = None;
    let mut is_guest = false;
    let mut expires_at_ms: Option<u64> = None;
    for &(bytes, third_party) in caveats {
        if third_party {
            return Verdict::Reject("third-party caveat");
        }
        let Some((key, op, value)) = caveat_parts(bytes) else {
            return Verdict::Reject("not `key op value`");
        };
        let ok = match (key, op) {
            ("gen", "=") => value == "1",
            ("user_id", "=") => user_id_ok(value) && same(&mut user_id, value),
            ("type", "=") => {
                ["access", "refresh", "login"].contains(&value) && same(&mut token_type, value)
            }
            ("time", "<" | ">" | "==") => {
                let at = match value.bytes().all(|b| b.is_ascii_digit()) {
                    true => value.parse::<u64>().ok(),
                    false => None,
                };
                match (op, at) {
                    ("<", Some(at)) => {
                        expires_at_ms = Some(expires_at_ms.map_or(at, |e| e.min(at)));
                        true
                    }
                    (">", Some(at)) => now_ms > at,
                    ("==", Some(at)) => now_ms == at,
                    _ => false,
                }
            }
            ("nonce", "=") => {
                nonce.get_or_insert(value);
                true
            }
            ("guest", "=") => {
                is_guest = true;
                value == "true"
            }
            ("device_id", "=") => same(&mut device_id, value),
            _ => false,
        };
        if !ok {
            return Verdict::Reject("a caveat does not hold or is not understood");
        }
    }
    let (Some(user_id), Some(token_type)) = (user_id, token_type) else {
        return Verdict::Reject("user_id or type missing");
    };
    if token_type != expected {
        return Verdict::Reject("wrong token type");
    }
    let identity = Identity {
        user_id: user_id.to_owned(),
        device_id: device_id.map(str::to_owned),
        nonce: nonce.map(str::to_owned),
        is_guest,
        token_type: token_type.to_owned(),
        expires_at_ms,
    };
    match expires_at_ms {
        Some(at) if now_ms >= at => Verdict::Expired(identity),
        _ => Verdict::Accept(identity),
    }
}
