//! Target 2: arbitrary request parts through the layer (`oneshot` on a trivial inner service,
//! polled once: with `NeverRevoked` everything is ready at once).
//!
//! Input, as text so that a seed corpus and a dictionary can steer it: one configuration byte
//! (bit 0: query tokens ignored, 1: optional, 2: guests allowed, 3: query token not stripped,
//! bits 4-5: method, bit 6: composed, i.e. two application services and an opaque-token
//! resolver beside the macaroons, bit 7: with the composed layer, a `devices` hook), then lines.
//! The first line is the request target (path and query), each further line a header
//! `name: value` (any bytes the `http` crate takes: repeated and odd `Authorization` headers,
//! non-UTF-8 values). `$NAME` placeholders stand for real tokens (see `TOKENS`): macaroons, so
//! the fuzzer need not forge a signature to reach the accepting paths, `as_token`s and opaque
//! tokens.
//!
//! Checked for every request: never a 5xx (but the `503 M_UNKNOWN` of a resolver that is down);
//! the answer is the one the docs' extraction table, caveat table and "who gets which
//! identity, and which error" table give (independent oracles in `tests/oracle` and below:
//! namespaces, `?user_id=` / `?device_id=`, the resolver's answers); a request that reaches the
//! inner service carries exactly the identity and credential the oracle expects, and a Matrix
//! user id; the inner service never sees `access_token` in the URI while stripping is on; no
//! response repeats a token.
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
    hooks::{
        AppService, AppServices, BackendError, ManualClock, ResolveFuture, ResolvedToken,
        StaticTokens, TokenResolver,
    },
    layer::{GuestPolicy, QueryToken},
    macaroon::attenuate,
    Credential, KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, TokenType, Verifier,
};
use tower_matrix_auth_fuzz::oracle::{
    extract, is_access_token_pair, percent_decode, user_id_ok, Extraction, Identity, Verdict,
};
use tower_matrix_auth_fuzz::{
    expected_verdict, identity_of, is_macaroon_format, keys, ready, FORGER, NOW_MS,
};

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
        let json = alice().serialize(tower_matrix_auth::macaroon::MacaroonFormat::V2Json);
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
            (
                "$A2",
                alice().serialize(tower_matrix_auth::macaroon::MacaroonFormat::V2),
            ),
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
        .into_iter()
        .chain(
            APPSERVICES
                .iter()
                .map(|a| (a.placeholder, a.as_token.to_owned())),
        )
        .chain(OPAQUE.iter().map(|o| (o.placeholder, o.token.to_owned())))
        .collect()
    })
}

// ---- The composed layer: application services and opaque tokens -------------------------------

/// A user namespace `@<prefix>.*:example.org`, as a registration writes it (the dot unescaped).
struct Namespace {
    prefix: &'static str,
    exclusive: bool,
}

impl Namespace {
    fn regex(&self) -> String {
        format!("@{}.*:example.org", self.prefix)
    }

    /// The regex, anchored at both ends, matched by hand: `.` is any character but `\n`.
    fn matches(&self, user_id: &str) -> bool {
        let chars: Vec<char> = user_id.chars().collect();
        let head: Vec<char> = format!("@{}", self.prefix).chars().collect();
        let tail: Vec<char> = ":example.org".chars().collect();
        if chars.len() < head.len() + tail.len() || chars[..head.len()] != head[..] {
            return false;
        }
        let (middle, end) = chars[head.len()..].split_at(chars.len() - head.len() - tail.len());
        !middle.contains(&'\n')
            && end
                .iter()
                .zip(&tail)
                .all(|(&c, &t)| if t == '.' { c != '\n' } else { c == t })
    }
}

struct Registration {
    id: &'static str,
    placeholder: &'static str,
    as_token: &'static str,
    sender: &'static str,
    namespaces: &'static [Namespace],
}

const APPSERVICES: [Registration; 2] = [
    Registration {
        id: "irc",
        placeholder: "$IRC",
        as_token: "irc_as_token_7f3a9c41",
        sender: "@irc_bot:example.org",
        namespaces: &[
            Namespace {
                prefix: "irc_",
                exclusive: true,
            },
            Namespace {
                prefix: "bridged_",
                exclusive: false,
            },
        ],
    },
    Registration {
        id: "slack",
        placeholder: "$SLK",
        as_token: "slack_as_token_0b1d2e5f",
        sender: "@slack_bot:example.org",
        namespaces: &[
            Namespace {
                prefix: "slack_",
                exclusive: true,
            },
            // Shadowed by the irc registration's exclusive claim.
            Namespace {
                prefix: "irc_",
                exclusive: false,
            },
            Namespace {
                prefix: "bridged_",
                exclusive: false,
            },
        ],
    },
];

/// The `devices` hook (bit 7): which devices a user has.
fn device_known(user_id: &str, device_id: &str) -> bool {
    device_id == "ASDEV" || (user_id == "@irc_alice:example.org" && device_id == "PHONE")
}

/// An opaque token and the resolver's answer: `None` for a miss, `Some(Err(()))` for a
/// resolver that is down.
struct Opaque {
    placeholder: &'static str,
    token: &'static str,
    answer: Option<Result<ResolvedToken, ()>>,
}

fn resolved(
    user_id: &str,
    device_id: Option<&str>,
    guest: bool,
    expires: Option<u64>,
) -> ResolvedToken {
    let mut resolved = ResolvedToken::user(user_id).guest(guest);
    if let Some(device_id) = device_id {
        resolved = resolved.device_id(device_id);
    }
    if let Some(at) = expires {
        resolved = resolved.expires_at_ms(at);
    }
    resolved
}

static OPAQUE: std::sync::LazyLock<Vec<Opaque>> = std::sync::LazyLock::new(|| {
    let opaque = |placeholder, token, answer| Opaque {
        placeholder,
        token,
        answer,
    };
    vec![
        opaque(
            "$OA",
            "syt_YWxpY2U_opaque_alice_0001",
            Some(Ok(resolved(
                "@alice:example.org",
                Some("OPAQUE"),
                false,
                None,
            ))),
        ),
        opaque(
            "$OG",
            "syt_Z3Vlc3Q_opaque_guest_0002",
            Some(Ok(resolved("@guest:example.org", None, true, None))),
        ),
        opaque(
            "$OE",
            "syt_ZXhwaXJlZA_opaque_expired_0003",
            Some(Ok(resolved(
                "@alice:example.org",
                None,
                false,
                Some(NOW_MS - 1),
            ))),
        ),
        opaque(
            "$OL",
            "syt_bGF0ZXI_opaque_expiring_0004",
            Some(Ok(resolved(
                "@alice:example.org",
                None,
                false,
                Some(NOW_MS + 1),
            ))),
        ),
        opaque(
            "$OX",
            "syt_bm90IGEgdXNlcg_opaque_bad_user_0005",
            Some(Ok(resolved("alice", None, false, None))),
        ),
        opaque("$OD", "syt_ZG93bg_resolver_down_0006", Some(Err(()))),
        opaque("$OU", "syt_dW5rbm93bg_unknown_0007", None),
    ]
});

/// `StaticTokens` with every token that has an answer; the down one errs.
struct Resolver(StaticTokens);

impl TokenResolver for Resolver {
    fn resolve(&self, token: &str) -> ResolveFuture {
        let down = OPAQUE
            .iter()
            .any(|o| o.token == token && matches!(o.answer, Some(Err(()))));
        if down {
            return Box::pin(std::future::ready(Err(BackendError::new("database down"))));
        }
        self.0.resolve(token)
    }
}

fn composed(layer: MatrixAuthLayer, devices: bool) -> MatrixAuthLayer {
    let mut appservices = AppServices::new();
    for registration in &APPSERVICES {
        let mut appservice =
            AppService::new(registration.id, registration.as_token, registration.sender).unwrap();
        for namespace in registration.namespaces {
            appservice = appservice
                .user_namespace(&namespace.regex(), namespace.exclusive)
                .unwrap();
        }
        appservices = appservices.with(appservice).unwrap();
    }
    if devices {
        appservices = appservices.devices(device_known);
    }
    let tokens = OPAQUE
        .iter()
        .fold(StaticTokens::default(), |tokens, o| match &o.answer {
            Some(Ok(answer)) => tokens.with(o.token, answer.clone()),
            _ => tokens,
        });
    layer.appservices(appservices).resolver(Resolver(tokens))
}

/// What the docs' application-service row says: who the request acts as, or the error.
#[derive(Debug, PartialEq, Eq)]
enum AsAnswer {
    Acts(String, Option<String>),
    Forbidden,
    UnknownDevice,
}

fn appservice_answer(registration: &Registration, query: Option<&str>, devices: bool) -> AsAnswer {
    let (mut users, mut device_ids) = (Vec::new(), Vec::new());
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = String::from_utf8_lossy(&percent_decode(value.as_bytes())).into_owned();
        match percent_decode(key.as_bytes()).as_slice() {
            b"user_id" => users.push(value),
            b"device_id" => device_ids.push(value),
            _ => {}
        }
    }
    // Repeated: a proxy and the layer could read it differently.
    if users.len() > 1 || device_ids.len() > 1 {
        return AsAnswer::Forbidden;
    }
    let user_id = match users.pop().filter(|u| !u.is_empty()) {
        None => registration.sender.to_owned(),
        // Only a Matrix user id, even where a namespace matches more.
        Some(user_id) if !user_id_ok(&user_id) => return AsAnswer::Forbidden,
        Some(user_id) => {
            let own = registration.namespaces.iter().any(|n| n.matches(&user_id));
            // Another registration's sender counts as exclusively its own.
            let claimed_by_another = APPSERVICES.iter().any(|other| {
                other.id != registration.id
                    && (other.sender == user_id
                        || other
                            .namespaces
                            .iter()
                            .any(|n| n.exclusive && n.matches(&user_id)))
            });
            let allowed = user_id == registration.sender || (own && !claimed_by_another);
            if !allowed {
                return AsAnswer::Forbidden;
            }
            user_id
        }
    };
    let device_id = device_ids.pop().filter(|d| !d.is_empty());
    if let Some(device_id) = &device_id {
        if !(devices && device_known(&user_id, device_id)) {
            return AsAnswer::UnknownDevice;
        }
    }
    AsAnswer::Acts(user_id, device_id)
}

fn vouched(
    user_id: &str,
    device_id: Option<&str>,
    is_guest: bool,
    expires: Option<u64>,
) -> Identity {
    Identity {
        user_id: user_id.to_owned(),
        device_id: device_id.map(str::to_owned),
        nonce: None,
        is_guest,
        token_type: "access".to_owned(),
        expires_at_ms: expires,
    }
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
        (0..64u8)
            .map(|config| {
                let mut layer = MatrixAuthLayer::with_verifier(
                    Verifier::new(keys()).clock(ManualClock::new(NOW_MS)),
                );
                if config & 16 != 0 {
                    layer = composed(layer, config & 32 != 0);
                }
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

/// Where the layer sends a token.
enum Route {
    AppService(&'static Registration),
    /// Not a macaroon, with a resolver: its entry, if it has one.
    Resolver(Option<&'static Result<ResolvedToken, ()>>),
    Macaroon,
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
    let (composed, devices) = (config & 64 != 0, config & 128 != 0);
    let authorization: Vec<Vec<u8>> = request
        .headers()
        .get_all(AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    let authorization: Vec<&[u8]> = authorization.iter().map(Vec::as_slice).collect();
    let extraction = extract(&authorization, uri.query(), !query_ignored);

    let service = layers()[usize::from(config & 15 | config >> 2 & 48)].layer(service_fn(inner));
    let response = ready(service.oneshot(request)).unwrap();
    let status = response.status();
    let reached_inner = response.headers().contains_key("x-inner");
    let user = response
        .extensions()
        .get::<Option<MatrixUser>>()
        .cloned()
        .flatten();
    let body = ready(response.into_body().collect()).unwrap().to_bytes();

    // What the composed layer does with the token, before the macaroon rules.
    let route = match &extraction {
        Extraction::Token(token) if composed => {
            if let Some(registration) = APPSERVICES.iter().find(|a| a.as_token.as_bytes() == token)
            {
                Route::AppService(registration)
            } else if !is_macaroon_format(token) {
                let opaque = std::str::from_utf8(token)
                    .ok()
                    .and_then(|text| OPAQUE.iter().find(|o| o.token == text));
                Route::Resolver(opaque.and_then(|o| o.answer.as_ref()))
            } else {
                Route::Macaroon
            }
        }
        _ => Route::Macaroon,
    };
    let resolver_down = matches!(route, Route::Resolver(Some(Err(()))));
    assert!(
        !status.is_server_error() || resolver_down,
        "{status} for {extraction:?}"
    );
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
    if let Some(user) = &user {
        assert!(
            user_id_ok(user.user_id()),
            "an identity that is not a Matrix user id"
        );
    }

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
        Extraction::Token(_) if resolver_down => {
            assert_eq!(
                (status, errcode),
                (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN")
            );
            assert!(!reached_inner);
        }
        Extraction::Token(_) if matches!(route, Route::AppService(_)) => {
            let Route::AppService(registration) = route else {
                unreachable!()
            };
            match appservice_answer(registration, uri.query(), devices) {
                AsAnswer::Forbidden => {
                    assert_eq!((status, errcode), (StatusCode::FORBIDDEN, "M_FORBIDDEN"))
                }
                AsAnswer::UnknownDevice => assert_eq!(
                    (status, errcode),
                    (StatusCode::BAD_REQUEST, "M_UNKNOWN_DEVICE")
                ),
                AsAnswer::Acts(user_id, device_id) => {
                    assert!(reached_inner, "{status} {json}");
                    let user = user.expect("an identity");
                    assert_eq!(
                        identity_of(&user),
                        vouched(&user_id, device_id.as_deref(), false, None)
                    );
                    assert_eq!(user.credential(), Credential::AppService);
                    assert_eq!(user.appservice(), Some(registration.id));
                }
            }
        }
        Extraction::Token(_) if matches!(route, Route::Resolver(_)) => {
            let Route::Resolver(answer) = route else {
                unreachable!()
            };
            let resolved = match answer {
                Some(Ok(resolved)) if user_id_ok(&resolved.user_id) => resolved,
                // A miss, a token that is not UTF-8, an answer that is not a Matrix user id.
                _ => {
                    assert_eq!(
                        (status, errcode, soft_logout),
                        (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", false)
                    );
                    return;
                }
            };
            if resolved.expires_at_ms.is_some_and(|at| NOW_MS >= at) {
                assert_eq!(
                    (status, errcode, soft_logout),
                    (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", true)
                );
            } else if resolved.is_guest && !guests_allowed {
                assert_eq!(
                    (status, errcode),
                    (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN")
                );
            } else {
                assert!(reached_inner, "{status} {json}");
                let user = user.expect("an identity");
                assert_eq!(
                    identity_of(&user),
                    vouched(
                        &resolved.user_id,
                        resolved.device_id.as_deref(),
                        resolved.is_guest,
                        resolved.expires_at_ms
                    )
                );
                assert_eq!(
                    (user.credential(), user.appservice()),
                    (Credential::Opaque, None)
                );
            }
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
                assert_eq!(
                    (user.credential(), user.appservice()),
                    (Credential::Macaroon, None)
                );
            }
        },
    }
});
