//! Target 2: arbitrary request parts through the layer (`oneshot` on a trivial inner service,
//! polled once: with `NeverRevoked` everything is ready at once).
//!
//! Input, as text so that a seed corpus and a dictionary can steer it: one configuration byte
//! (bit 0: query tokens ignored, 1: optional, 2: guests allowed, 3: query token not stripped,
//! bits 4-5: method), then lines. The first line is the request target (path and query), each
//! further line a header `name: value` (any bytes the `http` crate takes: repeated and odd
//! `Authorization` headers, non-UTF-8 values). `$NAME` placeholders stand for real tokens (see
//! `TOKENS`), so the fuzzer need not forge a signature to reach the accepting paths.
//!
//! Checked for every request: never a 5xx; the answer is the one the README's extraction table
//! and caveat table give (independent oracles in `tests/oracle`); a request that reaches the
//! inner service carries exactly the identity the oracle expects; the inner service never sees
//! `access_token` in the URI while stripping is on; no response repeats a token.
#![no_main]

use std::convert::Infallible;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    attenuate, GuestPolicy, KeyRing, MacaroonSecret, ManualClock, MatrixAuthLayer, MatrixUser,
    QueryToken, TokenType,
};
use tower_matrix_auth_fuzz::oracle::{extract, is_access_token_pair, Extraction, Verdict};
use tower_matrix_auth_fuzz::{expected_verdict, identity_of, keys, ready, FORGER, NOW_MS};

/// Placeholders and the tokens they stand for.
fn tokens() -> &'static [(&'static str, String)] {
    static TOKENS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let keys = keys();
        let alice = || {
            keys.mint("@alice:example.org", TokenType::Access)
                .unwrap()
                .nonce("n0nce")
                .device_id("PHONE")
        };
        let v1 = alice().to_token();
        let json = alice().serialize(tower_matrix_auth::Format::V2Json);
        let standard = {
            use base64::Engine as _;
            let binary = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&v1)
                .unwrap();
            base64::engine::general_purpose::STANDARD.encode(binary)
        };
        let forger = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(FORGER));
        let encode = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        vec![
            ("$A1", v1.clone()),
            ("$A2", alice().serialize(tower_matrix_auth::Format::V2)),
            ("$AJQ", encode(&json)),
            ("$AJ", json),
            ("$ASQ", encode(&standard)),
            ("$AS", standard),
            (
                "$G",
                keys.mint("@bob:example.org", TokenType::Access)
                    .unwrap()
                    .guest()
                    .to_token(),
            ),
            ("$E", alice().expires_at_ms(NOW_MS - 1).to_token()),
            (
                "$T",
                attenuate(&v1, &format!("time < {}", NOW_MS + 1000)).unwrap(),
            ),
            (
                "$X",
                attenuate(&v1, "user_id = @mallory:example.org").unwrap(),
            ),
            (
                "$R",
                keys.mint("@alice:example.org", TokenType::Refresh)
                    .unwrap()
                    .to_token(),
            ),
            (
                "$F",
                forger
                    .mint("@mallory:example.org", TokenType::Access)
                    .unwrap()
                    .to_token(),
            ),
            ("$L", "A".repeat(5000)),
        ]
    })
}

fn substitute(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut rest = line;
    'outer: while let Some((&first, tail)) = rest.split_first() {
        if first == b'$' {
            for (name, token) in tokens() {
                if rest.starts_with(name.as_bytes()) {
                    out.extend_from_slice(token.as_bytes());
                    rest = &rest[name.len()..];
                    continue 'outer;
                }
            }
        }
        out.push(first);
        rest = tail;
    }
    out
}

fn layers() -> &'static [MatrixAuthLayer] {
    static LAYERS: OnceLock<Vec<MatrixAuthLayer>> = OnceLock::new();
    LAYERS.get_or_init(|| {
        (0..16u8)
            .map(|config| {
                let mut layer = MatrixAuthLayer::new(keys()).clock(ManualClock::new(NOW_MS));
                if config & 1 != 0 {
                    layer = layer.query_token(QueryToken::Ignored);
                }
                if config & 2 != 0 {
                    layer = layer.optional();
                }
                if config & 4 != 0 {
                    layer = layer.guests(GuestPolicy::Allowed);
                }
                if config & 8 != 0 {
                    layer = layer.strip_query_token(false);
                }
                layer
            })
            .collect()
    })
}

/// The inner service: 200, with the identity in the response's extensions and the URI it saw
/// in the body.
async fn inner(request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = request.extensions().get::<MatrixUser>().cloned();
    let mut response = Response::new(Full::new(Bytes::from(request.uri().to_string())));
    response
        .headers_mut()
        .insert("x-inner", HeaderValue::from_static("1"));
    response.extensions_mut().insert(user);
    Ok(response)
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let target = substitute(lines.next().unwrap_or_default());
    let Ok(uri) = Uri::from_maybe_shared(Bytes::from(target)) else {
        return; // hyper would not deliver it either
    };
    let method = [Method::GET, Method::POST, Method::PUT, Method::OPTIONS]
        [usize::from(config >> 4 & 3)]
    .clone();
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri.clone();
    for line in lines {
        let line = substitute(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let Ok(name) = HeaderName::from_bytes(&line[..colon]) else {
            continue;
        };
        // What an HTTP/1 parser leaves of the value: no whitespace at either end.
        let value = line[colon + 1..].trim_ascii();
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        request.headers_mut().append(name, value);
    }

    let (query_ignored, optional, guests_allowed, keep_query) = (
        config & 1 != 0,
        config & 2 != 0,
        config & 4 != 0,
        config & 8 != 0,
    );
    let authorization: Vec<Vec<u8>> = request
        .headers()
        .get_all(AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    let authorization: Vec<&[u8]> = authorization.iter().map(Vec::as_slice).collect();
    let extraction = extract(&authorization, uri.query(), !query_ignored);

    let service = layers()[usize::from(config & 15)].layer(service_fn(inner));
    let response = ready(service.oneshot(request)).unwrap();
    let status = response.status();
    let reached_inner = response.headers().contains_key("x-inner");
    let user = response
        .extensions()
        .get::<Option<MatrixUser>>()
        .cloned()
        .flatten();
    let body = ready(response.into_body().collect()).unwrap().to_bytes();

    assert!(!status.is_server_error(), "{status} for {extraction:?}");
    if !reached_inner {
        for (_, token) in tokens() {
            assert!(
                !body.windows(token.len()).any(|w| w == token.as_bytes()),
                "a rejection repeats a token"
            );
        }
    }
    let json: serde_json::Value = if reached_inner {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).expect("rejections are JSON")
    };
    let errcode = json["errcode"].as_str().unwrap_or_default();
    let message = json["error"].as_str().unwrap_or_default();
    let soft_logout = json.get("soft_logout").is_some();

    if reached_inner {
        let seen = String::from_utf8(body.to_vec()).unwrap();
        if !keep_query {
            let query = seen.split_once('?').map_or("", |(_, q)| q);
            assert!(
                !query.split('&').any(is_access_token_pair),
                "inner saw {seen}"
            );
        }
    }

    match extraction {
        Extraction::Refused(reasons) => {
            assert_eq!(
                (status, errcode),
                (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN")
            );
            assert!(
                reasons
                    .iter()
                    .any(|r| message.starts_with(r.message_prefix())),
                "{reasons:?}: {message}"
            );
        }
        Extraction::Nothing if optional => {
            assert!(reached_inner && user.is_none(), "{status} {json}");
        }
        Extraction::Nothing => {
            assert_eq!(
                (status, errcode, message),
                (
                    StatusCode::UNAUTHORIZED,
                    "M_MISSING_TOKEN",
                    "Missing access token."
                )
            );
        }
        Extraction::Token(token) => match expected_verdict(&token, TokenType::Access) {
            Verdict::Reject(why) => {
                assert_eq!(
                    (status, errcode, soft_logout),
                    (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", false),
                    "{why}"
                );
            }
            Verdict::Expired(_) => {
                assert_eq!(
                    (status, errcode, soft_logout),
                    (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", true)
                );
            }
            Verdict::Accept(identity) if identity.is_guest && !guests_allowed => {
                assert_eq!(
                    (status, errcode),
                    (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN")
                );
            }
            Verdict::Accept(identity) => {
                assert!(reached_inner, "{status} {json}");
                let user = user.expect("an identity");
                assert_eq!(identity, identity_of(&user));
                assert_ne!(user.user_id(), "@mallory:example.org");
            }
        },
    }
});
