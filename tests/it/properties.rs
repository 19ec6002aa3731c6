//! Property tests (proptest): the round trip mint → serialize → verify, monotone attenuation,
//! single-bit changes, and token extraction against an oracle written from the docs' table
//! (`tests/oracle/mod.rs`, shared with the fuzz targets).
//!
//! Case counts are fixed per property (see `config`); `PROPTEST_CASES` overrides them all for a
//! longer run, e.g. `PROPTEST_CASES=20000 cargo test --test properties --release`.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::test_runner::Config;
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    hooks::ManualClock,
    layer::{GuestPolicy, QueryToken},
    macaroon::{attenuate, MacaroonFormat},
    KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, Rejection, TokenType, Verifier,
};

use crate::oracle::{Extraction, Missing};

const SECRET: &str = "property test macaroon secret";
const NOW_MS: u64 = 1_700_000_000_000;

fn keys() -> KeyRing {
    KeyRing::new()
        .with_key("key", MacaroonSecret::from_passphrase(SECRET))
        .with_key("old", MacaroonSecret::from_passphrase("an older secret"))
}

fn verifier() -> Verifier {
    Verifier::new(keys())
        .clock(ManualClock::new(NOW_MS))
        // A custom caveat, so that attenuation can append one that holds.
        .caveat("method", |caveat, parts| {
            caveat.op() == "=" && caveat.value() == parts.method.as_str()
        })
}

fn get_parts() -> http::request::Parts {
    Request::get("/_matrix/client/v3/account/whoami")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// `PROPTEST_CASES` if set, else `cases`.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Everything on the layer's path is ready at once (the default `NeverRevoked`).
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("not ready at once"),
    }
}

// ---- Strategies -------------------------------------------------------------------------------

/// A Matrix user id in the grammar the docs give: any printable localpart without `:`, a DNS
/// name, IPv4 or IPv6 literal, an optional port.
fn user_id() -> impl Strategy<Value = String> {
    let localpart = "[!-9;-~]{1,20}";
    let host = prop_oneof![
        "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        "\\[[0-9a-fA-F:.]{2,39}\\]",
    ];
    let port = proptest::option::of(1u32..=65535);
    (localpart, host, port)
        .prop_map(|(local, host, port)| match port {
            Some(port) => format!("@{local}:{host}:{port}"),
            None => format!("@{local}:{host}"),
        })
        .prop_filter("a valid user id", |u| crate::oracle::user_id_ok(u))
}

/// Device ids and nonces are opaque: printable, not starting with a space.
fn opaque() -> impl Strategy<Value = String> {
    "[!-~][ -~]{0,24}"
}

fn token_type() -> impl Strategy<Value = TokenType> {
    prop_oneof![
        Just(TokenType::Access),
        Just(TokenType::Refresh),
        Just(TokenType::Login)
    ]
}

fn format() -> impl Strategy<Value = MacaroonFormat> {
    prop_oneof![
        Just(MacaroonFormat::V1),
        Just(MacaroonFormat::V2),
        Just(MacaroonFormat::V2Json)
    ]
}

#[derive(Debug, Clone)]
struct Claims {
    user_id: String,
    token_type: TokenType,
    nonce: Option<String>,
    device_id: Option<String>,
    guest: bool,
    /// Lifetime from `NOW_MS`: `time < NOW_MS + lifetime`; zero or less is expired.
    lifetime_ms: Option<i64>,
}

fn claims() -> impl Strategy<Value = Claims> {
    (
        user_id(),
        token_type(),
        proptest::option::of(opaque()),
        proptest::option::of(opaque()),
        any::<bool>(),
        proptest::option::of(prop_oneof![
            -1_000_000_000_000i64..=1_000_000_000_000,
            Just(0i64),
            Just(1i64),
            Just(-1i64),
        ]),
    )
        .prop_map(
            |(user_id, token_type, nonce, device_id, guest, lifetime_ms)| Claims {
                user_id,
                token_type,
                nonce,
                device_id,
                guest,
                lifetime_ms,
            },
        )
}

impl Claims {
    fn expires_at_ms(&self) -> Option<u64> {
        self.lifetime_ms
            .map(|l| NOW_MS.checked_add_signed(l).expect("in range"))
    }

    fn expired(&self) -> bool {
        self.lifetime_ms.is_some_and(|l| l <= 0)
    }

    fn mint(&self, keys: &KeyRing, format: MacaroonFormat, location: bool) -> String {
        let mut builder = keys.mint(&self.user_id, self.token_type).unwrap();
        if let Some(nonce) = &self.nonce {
            builder = builder.nonce(nonce);
        }
        if let Some(device_id) = &self.device_id {
            builder = builder.device_id(device_id);
        }
        if self.guest {
            builder = builder.guest();
        }
        if let Some(at) = self.expires_at_ms() {
            builder = builder.expires_at_ms(at);
        }
        if location {
            builder = builder.location("example.org");
        }
        builder.serialize(format)
    }
}

/// The four base64 flavours a binary token may arrive in.
fn reencode(token: &str, flavour: usize) -> String {
    let binary = URL_SAFE_NO_PAD
        .decode(token)
        .expect("binary tokens are base64url");
    [URL_SAFE_NO_PAD, URL_SAFE, STANDARD_NO_PAD, STANDARD][flavour].encode(binary)
}

// ---- 1. mint → serialize → verify ---------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn minted_tokens_verify_with_their_claims(
        claims in claims(),
        format in format(),
        flavour in 0usize..4,
        location in any::<bool>(),
    ) {
        let verifier = verifier();
        let parts = get_parts();
        let mut token = claims.mint(verifier.keys(), format, location);
        if format != MacaroonFormat::V2Json {
            token = reencode(&token, flavour);
        }
        for expected in [TokenType::Access, TokenType::Refresh, TokenType::Login] {
            let result = verifier.verify(token.as_bytes(), expected, &parts);
            if expected != claims.token_type {
                let rejection = result.expect_err("a token of another type");
                prop_assert!(rejection.is_unknown_token() && !rejection.soft_logout());
                continue;
            }
            if claims.expired() {
                let rejection = result.expect_err("an expired token");
                prop_assert!(rejection.is_expired() && rejection.soft_logout(), "{rejection:?}");
                continue;
            }
            let user = result.map_err(|e| TestCaseError::fail(format!("{e:?} for {token}")))?;
            prop_assert_eq!(user.user_id(), claims.user_id.as_str());
            prop_assert_eq!(user.device_id(), claims.device_id.as_deref());
            prop_assert_eq!(user.nonce(), claims.nonce.as_deref());
            prop_assert_eq!(user.is_guest(), claims.guest);
            prop_assert_eq!(user.token_type(), claims.token_type);
            prop_assert_eq!(user.expires_at_ms(), claims.expires_at_ms());
            // With a nonce, the token id does not depend on the format.
            if claims.nonce.is_some() {
                let other = claims.mint(verifier.keys(), MacaroonFormat::V2Json, false);
                let again = verifier.verify(other.as_bytes(), expected, &parts).unwrap();
                prop_assert_eq!(again.token_id(), user.token_id());
            }
        }
    }
}

// ---- 2. Attenuation is monotone -------------------------------------------------------------------

/// First-party caveats a holder might append: the standard ones with values that hold and that
/// do not, a custom one, and arbitrary text.
fn appended_caveat() -> impl Strategy<Value = String> {
    let at = prop_oneof![Just(NOW_MS), (NOW_MS - 10..NOW_MS + 10), 0u64..u64::MAX];
    prop_oneof![
        (
            prop_oneof![Just("<"), Just(">"), Just("=="), Just("<="), Just("=")],
            at
        )
            .prop_map(|(op, at)| format!("time {op} {at}")),
        user_id().prop_map(|u| format!("user_id = {u}")),
        Just("user_id = @alice:example.org".to_owned()),
        opaque().prop_map(|d| format!("device_id = {d}")),
        Just("device_id = PHONE".to_owned()),
        opaque().prop_map(|n| format!("nonce = {n}")),
        prop_oneof![
            Just("access"),
            Just("refresh"),
            Just("login"),
            Just("other")
        ]
        .prop_map(|t| format!("type = {t}")),
        prop_oneof![
            Just("guest = true"),
            Just("guest = false"),
            Just("gen = 1"),
            Just("gen = 2")
        ]
        .prop_map(str::to_owned),
        prop_oneof![
            Just("method = GET"),
            Just("method = POST"),
            Just("method == GET")
        ]
        .prop_map(str::to_owned),
        "[a-z_]{1,10} [=<>!~]{1,2} [ -~]{1,20}",
        "\\PC{0,40}",
    ]
}

fn base_claims() -> impl Strategy<Value = Claims> {
    // Mostly accepted tokens (Alice, access, maybe a device, maybe a guest, maybe expiring),
    // some rejected ones (expired, another type), so that both directions are exercised.
    (
        prop_oneof![3 => Just(TokenType::Access), 1 => token_type()],
        proptest::option::of(Just("n0nce".to_owned())),
        proptest::option::of(Just("PHONE".to_owned())),
        prop::bool::weighted(0.2),
        proptest::option::of(prop_oneof![
            3 => 1i64..1_000_000,
            1 => -1_000_000i64..=0,
        ]),
    )
        .prop_map(
            |(token_type, nonce, device_id, guest, lifetime_ms)| Claims {
                user_id: "@alice:example.org".to_owned(),
                token_type,
                nonce,
                device_id,
                guest,
                lifetime_ms,
            },
        )
}

fn check_attenuation(
    before: &Result<MatrixUser, Rejection>,
    after: &Result<MatrixUser, Rejection>,
    with_nonce: bool,
) -> Result<(), TestCaseError> {
    let Ok(narrow) = after else {
        return Ok(());
    };
    let wide = before
        .as_ref()
        .map_err(|e| TestCaseError::fail(format!("attenuation widened a rejected token: {e:?}")))?;
    prop_assert_eq!(narrow.user_id(), wide.user_id());
    prop_assert_eq!(narrow.token_type(), wide.token_type());
    if with_nonce {
        prop_assert_eq!(narrow.token_id(), wide.token_id());
        prop_assert_eq!(narrow.nonce(), wide.nonce());
    }
    if let Some(device) = wide.device_id() {
        prop_assert_eq!(narrow.device_id(), Some(device));
    }
    prop_assert!(
        narrow.is_guest() || !wide.is_guest(),
        "a guest stopped being one"
    );
    if let Some(wide_expiry) = wide.expires_at_ms() {
        prop_assert!(narrow.expires_at_ms().is_some_and(|e| e <= wide_expiry));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn attenuation_never_widens_and_never_changes_who(
        claims in base_claims(),
        format in format(),
        appended in prop::collection::vec(appended_caveat(), 1..5),
    ) {
        let verifier = verifier();
        let parts = get_parts();
        let mut token = claims.mint(verifier.keys(), format, false);
        let mut before = verifier.verify(token.as_bytes(), TokenType::Access, &parts);
        for caveat in &appended {
            token = attenuate(&token, caveat).expect("a valid token can be attenuated");
            let after = verifier.verify(token.as_bytes(), TokenType::Access, &parts);
            check_attenuation(&before, &after, claims.nonce.is_some())?;
            before = after;
        }
    }
}

// ---- 3. Single-bit changes ------------------------------------------------------------------------

/// Whether flipping `bit` of a V1 token's binary only changes the case of a hex letter in a
/// packet's length prefix (`001a` → `001A`): the same length, so the same macaroon. V1 lengths are
/// read as hex in either case, as libmacaroons and pymacaroons read them.
fn v1_length_case_change(binary: &[u8], bit: usize) -> bool {
    let (at, mask) = (bit / 8, 1u8 << (bit % 8));
    if mask != 0x20 || !binary[at].is_ascii_hexdigit() || binary[at].is_ascii_digit() {
        return false;
    }
    // Walk the packets: is `at` inside one of the 4-byte length prefixes?
    let mut start = 0;
    while start + 4 <= binary.len() {
        if (start..start + 4).contains(&at) {
            return true;
        }
        let size = std::str::from_utf8(&binary[start..start + 4])
            .ok()
            .and_then(|hex| usize::from_str_radix(hex, 16).ok())
            .unwrap_or(usize::MAX);
        start = start.saturating_add(size);
    }
    false
}

/// Whether `bit` lies in the name of V2JSON's `"v"` key: renamed, the key is unknown and
/// ignored, and a missing `"v"` is how pymacaroons writes V2JSON, so the macaroon is the same.
fn json_version_key(json: &[u8], bit: usize) -> bool {
    let at = bit / 8;
    json.windows(4)
        .position(|w| w == b"\"v\":")
        .is_some_and(|start| at == start + 1)
}

proptest! {
    // Every bit of each token is tried, so few tokens are enough.
    #![proptest_config(config(24))]

    #[test]
    fn every_single_bit_change_is_rejected(claims in claims(), format in format()) {
        // No location: it is not signed, so changing it rightly changes nothing.
        let claims = Claims { token_type: TokenType::Access, lifetime_ms: Some(60_000), ..claims };
        let verifier = verifier();
        let parts = get_parts();
        let token = claims.mint(verifier.keys(), format, false);
        prop_assert!(verifier.verify(token.as_bytes(), TokenType::Access, &parts).is_ok());
        let bytes = match format {
            MacaroonFormat::V2Json => token.clone().into_bytes(),
            _ => URL_SAFE_NO_PAD.decode(&token).unwrap(),
        };
        let mut same_macaroon = 0;
        for bit in 0..bytes.len() * 8 {
            let mut changed = bytes.clone();
            changed[bit / 8] ^= 1 << (bit % 8);
            let changed = match format {
                MacaroonFormat::V2Json => changed,
                _ => URL_SAFE_NO_PAD.encode(&changed).into_bytes(),
            };
            match verifier.verify(&changed, TokenType::Access, &parts) {
                Err(rejection) => prop_assert!(rejection.is_unknown_token()),
                Ok(_) if format == MacaroonFormat::V1 && v1_length_case_change(&bytes, bit) => {
                    same_macaroon += 1;
                }
                Ok(_) if format == MacaroonFormat::V2Json && json_version_key(&bytes, bit) => {
                    same_macaroon += 1;
                }
                Ok(user) => prop_assert!(
                    false,
                    "{format:?}: flipping bit {bit} of {token} was accepted as {user:?}"
                ),
            }
        }
        // V2 binary has no redundancy at all.
        prop_assert!(format != MacaroonFormat::V2 || same_macaroon == 0);
    }
}

// ---- 4. Extraction matches the docs' table --------------------------------------------------------

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

/// The tokens a request may carry, with what verifying them must give.
struct Tokens {
    /// Alice's access token (base64url) and the same bytes in standard base64 (`+`, `/`, `=`).
    valid: String,
    valid_standard: String,
    expired: String,
    forged: String,
}

fn tokens() -> Tokens {
    let keys = keys();
    let alice = || {
        keys.mint("@alice:example.org", TokenType::Access)
            .unwrap()
            .nonce("n0nce")
    };
    let valid = alice().to_token();
    let forger = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("not the secret"));
    Tokens {
        valid_standard: reencode(&valid, 3),
        valid,
        expired: alice().expires_at_ms(NOW_MS - 1).to_token(),
        forged: forger
            .mint("@mallory:example.org", TokenType::Access)
            .unwrap()
            .to_token(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Tok {
    Valid,
    ValidStandard,
    Expired,
    Forged,
    Junk,
    Empty,
}

impl Tok {
    fn text(self, tokens: &Tokens) -> String {
        match self {
            Tok::Valid => tokens.valid.clone(),
            Tok::ValidStandard => tokens.valid_standard.clone(),
            Tok::Expired => tokens.expired.clone(),
            Tok::Forged => tokens.forged.clone(),
            Tok::Junk => "not-a-macaroon".into(),
            Tok::Empty => String::new(),
        }
    }
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        3 => Just(Tok::Valid),
        1 => Just(Tok::ValidStandard),
        1 => Just(Tok::Expired),
        1 => Just(Tok::Forged),
        1 => Just(Tok::Junk),
        1 => Just(Tok::Empty),
    ]
}

/// An `Authorization` header value, as bytes (some not UTF-8, some not ASCII).
fn header() -> impl Strategy<Value = (String, Tok, Vec<u8>)> {
    let scheme = prop_oneof![
        4 => Just("Bearer "),
        1 => Just("bearer "),
        1 => Just("BEARER "),
        1 => Just("Bearer  "),
        1 => Just("Bearer"),
        1 => Just("Basic "),
        1 => Just("X-Matrix "),
    ];
    let suffix = prop_oneof![
        6 => Just(Vec::new()),
        1 => Just(b" extra".to_vec()),
        1 => Just(b"\xc3\xa9".to_vec()),
        1 => Just(b"\xff".to_vec()),
        1 => prop::collection::vec(prop_oneof![0x21u8..0x7f, 0x80u8..=0xff, Just(b' ')], 0..6),
    ];
    (scheme.prop_map(str::to_owned), tok(), suffix)
}

/// One query pair: key spelling, whether it has `=`, the value, and whether it is
/// percent-encoded.
fn pair() -> impl Strategy<Value = (&'static str, bool, Tok, bool)> {
    let key = prop_oneof![
        6 => Just("access_token"),
        1 => Just("access%5Ftoken"),
        1 => Just("access%5ftoken"),
        1 => Just("%61ccess_token"),
        1 => Just("access_toke"),
        1 => Just("access_token_"),
        1 => Just("x"),
    ];
    (key, prop::bool::weighted(0.9), tok(), any::<bool>())
}

fn percent_encode(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// An inner service that answers 200 with the URI it saw and the identity in its extensions.
async fn inner(request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = request.extensions().get::<MatrixUser>().cloned();
    let mut response = Response::new(Full::new(Bytes::from(request.uri().to_string())));
    response.extensions_mut().insert(user);
    Ok(response)
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn extraction_follows_the_readme_table(
        headers in prop::collection::vec(header(), 0..3),
        pairs in prop::collection::vec(pair(), 0..4),
        noise in prop::collection::vec("[a-z]{1,3}=[a-z0-9]{0,3}", 0..2),
        query_allowed in prop::bool::weighted(0.8),
        optional in prop::bool::weighted(0.2),
    ) {
        let tokens = tokens();
        let mut query: Vec<String> = pairs
            .iter()
            .map(|(key, eq, tok, encode)| {
                let value = tok.text(&tokens);
                let value = if *encode { percent_encode(&value) } else { value };
                if *eq { format!("{key}={value}") } else { (*key).to_owned() }
            })
            .collect();
        query.extend(noise);
        let uri = if query.is_empty() {
            WHOAMI.to_owned()
        } else {
            format!("{WHOAMI}?{}", query.join("&"))
        };
        let mut request = Request::get(&uri).body(()).unwrap();
        let mut values = Vec::new();
        for (scheme, tok, suffix) in &headers {
            let mut value = scheme.clone().into_bytes();
            value.extend_from_slice(tok.text(&tokens).as_bytes());
            value.extend_from_slice(suffix);
            let value = HeaderValue::from_bytes(value.trim_ascii()).unwrap();
            values.push(value.as_bytes().to_vec());
            request.headers_mut().append(http::header::AUTHORIZATION, value);
        }

        let mut layer = MatrixAuthLayer::with_verifier(Verifier::new(keys()).clock(ManualClock::new(NOW_MS)));
        if !query_allowed {
            layer = layer.query_token(QueryToken::Ignored);
        }
        if optional {
            layer = layer.optional();
        }
        let layer = layer.guests(GuestPolicy::Allowed);
        let response = ready(layer.layer(service_fn(inner)).oneshot(request)).unwrap();
        let status = response.status();
        let user = response.extensions().get::<Option<MatrixUser>>().cloned().flatten();
        let body = ready(response.into_body().collect()).unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let (errcode, message) = (
            json["errcode"].as_str().unwrap_or_default(),
            json["error"].as_str().unwrap_or_default(),
        );

        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let uri: http::Uri = uri.parse().unwrap();
        let expected = crate::oracle::extract(&values, uri.query(), query_allowed);
        match &expected {
            Extraction::Refused(reasons) => {
                prop_assert_eq!((status, errcode), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
                prop_assert!(
                    reasons.iter().any(|r| message.starts_with(r.message_prefix())),
                    "{:?}: {}", reasons, message
                );
            }
            Extraction::Nothing if optional => {
                prop_assert_eq!(status, StatusCode::OK);
                prop_assert!(user.is_none());
            }
            Extraction::Nothing => {
                prop_assert_eq!((status, errcode), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
                prop_assert_eq!(message, Missing::NoToken.message_prefix());
            }
            Extraction::Token(token) => {
                let valid = [&tokens.valid, &tokens.valid_standard]
                    .iter()
                    .any(|t| t.as_bytes() == token.as_slice());
                if valid {
                    prop_assert_eq!(status, StatusCode::OK, "{}", body);
                    prop_assert_eq!(user.as_ref().map(|u| u.user_id()), Some("@alice:example.org"));
                    // The inner service never sees the token in the URI.
                    let seen = body.split_once('?').map_or("", |(_, q)| q);
                    prop_assert!(!seen.split('&').any(crate::oracle::is_access_token_pair), "{}", body);
                } else {
                    let expired = token.as_slice() == tokens.expired.as_bytes();
                    prop_assert_eq!((status, errcode), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"));
                    prop_assert_eq!(json.get("soft_logout").is_some(), expired);
                }
            }
        }
    }
}
