//! Finding the access token in a request: the `Authorization: Bearer` header and the
//! `access_token` query parameter, with the Matrix rules for conflicts.
//!
//! The extraction table this file implements is written once, in `docs/layer.md`, and rendered on
//! [`crate::MatrixAuthLayer`]. An empty token (`Bearer` with nothing after it, `?access_token=`)
//! counts as no token.

use std::borrow::Cow;

use http::header::AUTHORIZATION;
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use percent_encoding::percent_decode;

use crate::error::Missing;

/// The query parameter the Matrix spec names.
const PARAM: &[u8] = b"access_token";

/// Which `?access_token=` values are read.
#[derive(Clone, Copy)]
pub(crate) enum QueryTokens<'f> {
    /// Every one.
    All,
    /// Those the predicate accepts (`as_token`s); any other is ignored as if it were absent.
    Only(&'f dyn Fn(&[u8]) -> bool),
    /// None: the parameter is not even parsed.
    None,
}

/// The token a request carries, if any, every rule of the extraction table applied.
pub(crate) fn find_token<'a>(
    parts: &'a Parts,
    query_tokens: QueryTokens<'_>,
) -> Result<Option<Cow<'a, [u8]>>, Missing> {
    let header = header_token(parts)?;
    let query = match query_tokens {
        QueryTokens::None => None,
        QueryTokens::All => query_token(parts.uri.query())?,
        QueryTokens::Only(accept) => query_token(parts.uri.query())?.filter(|token| accept(token)),
    };
    match (header, query) {
        // A malformed header is reported as such, before the mixing.
        (Some(token), Some(_)) if !visible_ascii(token) => Err(Missing::NotBearer),
        (Some(_), Some(_)) => Err(Missing::Mixed),
        (Some(token), None) if !visible_ascii(token) => Err(Missing::NotBearer),
        (Some(token), None) => Ok(Some(Cow::Borrowed(token))),
        (None, query) => Ok(query),
    }
}

/// `Authorization: Bearer <token>`, or `None` if there is no header or an empty token. Whether
/// the token is visible ASCII is checked by [`find_token`], after the mixing rule's check.
fn header_token(parts: &Parts) -> Result<Option<&[u8]>, Missing> {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Missing::TooManyHeaders);
    }
    let value = value.as_bytes();
    let (scheme, token) = match value.iter().position(|&b| b == b' ') {
        Some(space) => (&value[..space], &value[space + 1..]),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Missing::NotBearer);
    }
    Ok((!token.is_empty()).then_some(token))
}

/// Whether every byte is visible ASCII (0x21..=0x7e): shifted down by 0x21, every byte must be
/// at most 0x5d, so the largest one decides. A maximum without an early exit vectorizes to one
/// subtraction and one `max` per 16 bytes.
fn visible_ascii(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(0, |largest: u8, &b| largest.max(b.wrapping_sub(0x21)))
        <= 0x7e - 0x21
}

/// The `access_token` parameter: `None` if absent or empty, an error if given twice.
fn query_token(query: Option<&str>) -> Result<Option<Cow<'_, [u8]>>, Missing> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found: Option<Cow<'_, [u8]>> = None;
    let mut seen = false;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !is_token_param(key) {
            continue;
        }
        if seen {
            return Err(Missing::TooManyQueryTokens);
        }
        seen = true;
        if !value.is_empty() {
            found = Some(decode(value.as_bytes()));
        }
    }
    Ok(found)
}

/// Percent-decoding by the `percent-encoding` crate, which leaves malformed escapes as they are
/// and does not read `+` as a space (standard base64 holds `+`). A value without `%` is returned
/// as it is after one `memchr` scan: the crate's own check walks the bytes one at a time, which
/// cost a 300-byte query token 340 ns (`benches/ratios.rs`, `ours_query`).
fn decode(bytes: &[u8]) -> Cow<'_, [u8]> {
    if bytes.contains(&b'%') {
        percent_decode(bytes).into()
    } else {
        Cow::Borrowed(bytes)
    }
}

/// Whether a query key is `access_token`, percent-encoded or not.
fn is_token_param(key: &str) -> bool {
    key.len() >= PARAM.len() && decode(key.as_bytes()) == PARAM
}

/// The URI without any `access_token` parameter, or `None` if it has none, so that nothing
/// after the layer (a `TraceLayer`, an access log) can record the token. One allocation: the
/// new path and query, sized exactly (so `Bytes` takes it over as it is).
pub(crate) fn strip_query_token(uri: &Uri) -> Result<Option<Uri>, Missing> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    let is_token = |pair: &&str| is_token_param(pair.split('=').next().unwrap_or(pair));
    if !query.split('&').any(|pair| is_token(&pair)) {
        return Ok(None);
    }
    let kept = || query.split('&').filter(|pair| !is_token(pair));
    let kept_len: usize = kept().map(|pair| pair.len() + 1).sum();
    let mut path_and_query = String::with_capacity(uri.path().len() + kept_len);
    path_and_query.push_str(uri.path());
    for (i, pair) in kept().enumerate() {
        path_and_query.push(if i == 0 { '?' } else { '&' });
        path_and_query.push_str(pair);
    }
    // Scheme and authority (absolute-form requests) are shared, not copied.
    let mut parts = http::uri::Parts::default();
    parts.scheme = uri.scheme().cloned();
    parts.authority = uri.authority().cloned();
    // Removing whole pairs from a valid query leaves a valid one. Should that ever not hold, the
    // request is refused: passing it on with the token, or to another path, is worse.
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| Missing::Unstrippable)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| Missing::Unstrippable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, headers: &[&[u8]]) -> Parts {
        let mut builder = Request::get(uri);
        for h in headers {
            builder = builder.header(AUTHORIZATION, http::HeaderValue::from_bytes(h).unwrap());
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn found(uri: &str, headers: &[&[u8]]) -> Result<Option<Vec<u8>>, Missing> {
        match find_token(&parts(uri, headers), QueryTokens::All)? {
            Some(token) => Ok(Some(token.into_owned())),
            None => Ok(None),
        }
    }

    #[test]
    fn rules_table() {
        let some = |t: &str| Ok(Some(t.as_bytes().to_vec()));
        assert_eq!(found("/x", &[]), Ok(None));
        assert_eq!(found("/x", &[b"Bearer abc"]), some("abc"));
        assert_eq!(found("/x", &[b"bEaReR abc"]), some("abc"));
        assert_eq!(found("/x?access_token=abc", &[]), some("abc"));
        assert_eq!(found("/x?a=1&access_token=a%2Bb%3D&b=2", &[]), some("a+b="));
        assert_eq!(found("/x?access_token=a+b", &[]), some("a+b"));
        assert_eq!(found("/x?access%5Ftoken=abc", &[]), some("abc"));
        assert_eq!(found("/x?access_token=", &[]), Ok(None));
        assert_eq!(found("/x?access_token", &[]), Ok(None));
        assert_eq!(found("/x", &[b"Bearer"]), Ok(None));
        assert_eq!(found("/x?access_token=", &[b"Bearer abc"]), some("abc"));
        assert_eq!(found("/x?access_token=q", &[b"Bearer"]), some("q"));
        assert_eq!(
            found("/x?access_token=q", &[b"Bearer abc"]),
            Err(Missing::Mixed)
        );
        assert_eq!(
            found("/x", &[b"Bearer a", b"Bearer b"]),
            Err(Missing::TooManyHeaders)
        );
        assert_eq!(
            found("/x?access_token=a&access_token=b", &[]),
            Err(Missing::TooManyQueryTokens)
        );
        assert_eq!(
            found("/x?access_token=&access_token=b", &[]),
            Err(Missing::TooManyQueryTokens)
        );
        for bad in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer  abc",
            b"Bearer a b",
            b"Bearerabc",
            b"X-Matrix origin=a,key=b,sig=c",
            b"Bearer abc\xff",
            b"Bearer \xc3\xa9t\xc3\xa9",
        ] {
            assert_eq!(found("/x", &[bad]), Err(Missing::NotBearer), "{bad:?}");
            // A malformed header comes first, even beside a query token.
            assert_eq!(
                found("/x?access_token=q", &[bad]),
                Err(Missing::NotBearer),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn visible_ascii_is_0x21_to_0x7e() {
        for b in 0..=255u8 {
            assert_eq!(visible_ascii(&[b]), (0x21..=0x7e).contains(&b), "{b:#x}");
            assert_eq!(visible_ascii(&[b'a', b, b'z']), (0x21..=0x7e).contains(&b));
        }
        assert!(visible_ascii(b""));
    }

    #[test]
    fn query_tokens_can_be_switched_off() {
        let p = parts("/x?access_token=abc&access_token=d", &[b"Bearer h"]);
        let found = find_token(&p, QueryTokens::None).unwrap().unwrap();
        assert_eq!(found.as_ref(), b"h");
        let p = parts("/x?access_token=abc", &[]);
        assert!(find_token(&p, QueryTokens::None).unwrap().is_none());
    }

    #[test]
    fn stripping() {
        let strip = |u: &str| {
            strip_query_token(&u.parse().unwrap())
                .unwrap()
                .map(|u| u.to_string())
        };
        assert_eq!(strip("/x?access_token=abc"), Some("/x".into()));
        assert_eq!(
            strip("/x?a=1&access_token=abc&b=2"),
            Some("/x?a=1&b=2".into())
        );
        assert_eq!(strip("/x?access%5ftoken=abc&b=2"), Some("/x?b=2".into()));
        assert_eq!(
            strip("http://h/x?access_token=abc"),
            Some("http://h/x".into())
        );
        assert_eq!(strip("/x?a=1"), None);
        assert_eq!(strip("/x"), None);
        assert_eq!(strip("/x?access_token"), Some("/x".into()));
        assert_eq!(strip("/x?&access_token=a&"), Some("/x?&".into()));
        assert_eq!(
            strip("https://h:8448/x?b&access_token=a&c=&access_token=d"),
            Some("https://h:8448/x?b&c=".into())
        );
        assert_eq!(strip("*"), None);
    }
}
