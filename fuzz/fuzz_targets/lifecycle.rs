//! Target 5: the token lifecycle (`Sessions`), driven by a script, against the lifecycle model
//! the property tests share (`tests/oracle/lifecycle.rs`, the docs' lifecycle table,
//! docs/sessions.md).
//!
//! Every input gets a fresh `Sessions` (memory store, an `Issuer` and a `Verifier` sharing one
//! `ManualClock` that starts at [`NOW_MS`] and moves only when the script says), the two refresh
//! endpoints and a layer consulting the same store. Input, as text so that seeds and a
//! dictionary can steer it: one configuration byte (bits 0-1: format V1, V2, V2JSON, V1; bit 2:
//! refresh tokens live an hour; bit 3: access tokens without a refresh token live a day; bit 4
//! **clear**: a 30 s grace window for replays at `/v3/refresh`; bit 5 **clear**: a replay outside
//! it revokes the session (both set in an ASCII digit, so seeds led by a digit run without the
//! policy; the few older seeds led by another byte now run with it); bit 6: refreshable access tokens live 1 ms; bit 7: a location), then
//! one operation per line:
//!
//! | line | operation |
//! |---|---|
//! | `L<f>` | `login` (`f`: bit 0 no refresh token, bit 1 guest, bit 2 no device, bit 3 Bob) |
//! | `V<m><c><s><r><body>` | `POST /v3/refresh` with `body`; `m` method, `c` content type, `s` how the body arrives (whole, in pieces, broken off), `r` rate limit (each `byte % 8`) |
//! | `T<m><c><s><r><body>` | the same to `POST /r0/tokenrefresh` |
//! | `K<f>` | `login_token` (`f` bit 0: Bob) |
//! | `g<token>` | `redeem_login_token` |
//! | `U<token>` | a request through the layer (`Authorization: Bearer`) |
//! | `O<token>` / `Z<token>` | `/logout` / `/logout/all` through the layer, then `logout` / `logout_all` |
//! | `F<k><caveat>\|<caveat>...` | a token minted elsewhere: exactly these caveats, signed with the ring's `key` (`k` bit 2: `key2`, bit 3: a forger's key), V1/V2/V2JSON (`k` bits 0-1); `$S` names it |
//! | `S` | the memory store sweeps what it keeps no longer |
//! | `+<ms>` | the clock moves forward |
//! | `N<text>` | `TokenNonce::parse` |
//!
//! `$` placeholders stand for tokens this run minted (`$R0` the newest refresh token, `$R1` the
//! one before, ...; see [`Run::placeholder`]): valid, used, expired, forged, attenuated,
//! re-encoded, grafted, access and login tokens where refresh tokens belong. In bodies they are
//! written JSON-escaped.
//!
//! This target decodes the script, drives the engine, and tells the model what it sent (what the
//! independent caveat table of `tests/oracle` says of each token, where the token sits) and what
//! the engine answered; the model's rules are in its module docs. Checked here besides: never a
//! panic, never a 5xx; the refresh endpoints' answers to methods, content types, bodies (not JSON,
//! over 64 KiB, broken off) and rate limits; the refresh answer's keys, the successor's user,
//! device and guest flag; minted tokens are exactly the docs' caveats (the session nonce first,
//! the one the model expects) and verify to the identity the caveat table reads; the store holds
//! state for the sessions the model does, and the user's floor the model's; the crate's
//! `TokenId` is the documented one; a login token works once; refusals repeat no token;
//! `TokenNonce::parse` agrees with the nonce grammar, round-trips, and reads every nonce the
//! issuer mints.
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::fuzzing::{parse_token, sign};
use tower_matrix_auth::{
    hooks::ManualClock,
    layer::GuestPolicy,
    lifecycle::{ExchangeError, SessionRequest, TokenNonce},
    macaroon::{attenuate, MacaroonFormat},
    store::{RefreshMode, RefreshPolicy, ReplayAction, TokenStore},
    Credential, Issuer, KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, MemoryStore,
    Sessions, TokenType, Verifier,
};
use tower_matrix_auth_fuzz::oracle::lifecycle::{
    canonical_nonce, check_nonce, minted_caveats, nonce_grammar, Answer, Check, Generation,
    Lifetimes, Model, Nonce, Policy, Position, Seen,
};
use tower_matrix_auth_fuzz::oracle::{Identity, Verdict};
use tower_matrix_auth_fuzz::{chain_prefix, empty_parts, expected_verdict_at, identity_of, keys};
use tower_matrix_auth_fuzz::{ready, FORGER, KEYS, NOW_MS};

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
/// The refresh endpoints read at most this much body.
const MAX_BODY: usize = 64 * 1024;
const REFRESHABLE_LIFETIME_MS: u64 = 300_000;
const SHORT_REFRESHABLE_LIFETIME_MS: u64 = 1;
const REFRESH_LIFETIME_MS: u64 = 3_600_000;
const ACCESS_LIFETIME_MS: u64 = 86_400_000;
const LOGIN_LIFETIME_MS: u64 = 120_000;
/// Operations per input: keeps an iteration in the milliseconds.
const MAX_OPS: usize = 64;
/// The furthest one `+` moves the clock.
const MAX_STEP_MS: u64 = 10_000_000_000_000;

/// `LIFECYCLE_TRACE=1` prints each line of a script and what the model made of it.
fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("LIFECYCLE_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// The model's comparison: a mismatch is a crash.
fn check<T>(result: Check<T>) -> T {
    result.unwrap_or_else(|mismatch| panic!("{mismatch}"))
}

fn shared_keys() -> &'static KeyRing {
    static KEYS: OnceLock<KeyRing> = OnceLock::new();
    KEYS.get_or_init(keys)
}

fn forger() -> &'static MacaroonSecret {
    static FORGER_SECRET: OnceLock<MacaroonSecret> = OnceLock::new();
    FORGER_SECRET.get_or_init(|| MacaroonSecret::from_passphrase(FORGER))
}

/// A `TokenId` as the docs define it, computed here: SHA-256 of the user id and the first
/// nonce, or of the signature for a token without a nonce; its first 16 bytes, as a session id.
fn token_id(user_id: &str, nonce: Option<&str>, signature: &[u8; 32]) -> u128 {
    let digest = match nonce {
        Some(nonce) => Sha256::new()
            .chain_update(b"nonce\0")
            .chain_update(user_id.as_bytes())
            .chain_update([0])
            .chain_update(nonce.as_bytes())
            .finalize(),
        None => Sha256::new()
            .chain_update(b"signature\0")
            .chain_update(signature)
            .finalize(),
    };
    u128::from_le_bytes(digest[..16].try_into().unwrap())
}

// ---- Request bodies ---------------------------------------------------------------------------

/// A request body that arrives in pieces and may break off (a connection that was reset).
struct Pieces {
    chunks: VecDeque<Bytes>,
    breaks: bool,
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(chunk) = this.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if std::mem::take(&mut this.breaks) {
            return Poll::Ready(Some(Err(std::io::Error::other("connection reset"))));
        }
        Poll::Ready(None)
    }
}

fn pieces(body: Vec<u8>, shape: u8) -> Pieces {
    let body = Bytes::from(body);
    let mut chunks = VecDeque::new();
    let mut split = |size: usize| {
        let mut at = 0;
        while at < body.len() {
            let end = (at + size).min(body.len());
            chunks.push_back(body.slice(at..end));
            at = end;
        }
    };
    match shape {
        3 => {
            let middle = body.len() / 2;
            chunks.push_back(body.slice(..middle));
            chunks.push_back(body.slice(middle..));
        }
        // Small pieces, but never more than a few hundred of them.
        4 => split((body.len() / 256).max(7)),
        5 => split((body.len() / 512).max(1)),
        6 => {
            // Empty frames between the pieces.
            split(1024);
            let pieces: Vec<Bytes> = chunks.drain(..).collect();
            for piece in pieces {
                chunks.push_back(Bytes::new());
                chunks.push_back(piece);
            }
            chunks.push_back(Bytes::new());
        }
        _ => chunks.push_back(body.clone()),
    }
    Pieces {
        chunks,
        breaks: shape == 7,
    }
}

const CONTENT_TYPES: [Option<&[u8]>; 8] = [
    Some(b"application/json"),
    None,
    Some(b"application/json; charset=utf-8"),
    Some(b"text/plain"),
    Some(b"application/x-www-form-urlencoded"),
    Some(b"multipart/form-data; boundary=x"),
    Some(b"\xff\xfeapplication/json"),
    Some(b"application/octet-stream"),
];

/// The rate limit the script asks for (header `x-fuzz-limit`).
fn limit_of(index: u8) -> Option<Duration> {
    match index {
        4 => Some(Duration::ZERO),
        5 => Some(Duration::from_millis(999)),
        6 => Some(Duration::from_millis(1001)),
        7 => Some(Duration::MAX),
        _ => None,
    }
}

fn rate_limit(parts: &Parts) -> Option<Duration> {
    let index = parts.headers.get("x-fuzz-limit")?.as_bytes().first()?;
    limit_of(index.wrapping_sub(b'0'))
}

/// What the docs say about a refresh body: the token, or the errcode of the 400.
fn body_token(body: &[u8]) -> Result<String, &'static str> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Err("M_NOT_JSON");
    };
    let Some(object) = value.as_object() else {
        return Err("M_BAD_JSON");
    };
    match object.get("refresh_token") {
        None | Some(Value::Null) => Err("M_MISSING_PARAM"),
        Some(Value::String(token)) => Ok(token.clone()),
        Some(_) => Err("M_BAD_JSON"),
    }
}

// ---- One run ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Config {
    format: MacaroonFormat,
    lifetimes: Lifetimes,
    location: bool,
    policy: Policy,
}

impl Config {
    fn of(byte: u8) -> Self {
        Self {
            format: [
                MacaroonFormat::V1,
                MacaroonFormat::V2,
                MacaroonFormat::V2Json,
                MacaroonFormat::V1,
            ][usize::from(byte & 3)],
            lifetimes: Lifetimes {
                refreshable_access_ms: if byte & 64 != 0 {
                    SHORT_REFRESHABLE_LIFETIME_MS
                } else {
                    REFRESHABLE_LIFETIME_MS
                },
                access_ms: (byte & 8 != 0).then_some(ACCESS_LIFETIME_MS),
                refresh_ms: (byte & 4 != 0).then_some(REFRESH_LIFETIME_MS),
                login_ms: LOGIN_LIFETIME_MS,
            },
            location: byte & 128 != 0,
            policy: Policy {
                grace_ms: if byte & 16 == 0 { 30_000 } else { 0 },
                revoke: byte & 32 == 0,
            },
        }
    }
}

type Whoami = BoxCloneService<Request<()>, Response<Bytes>, Infallible>;

/// Tokens this run minted or signed, oldest first.
#[derive(Default)]
struct Pool {
    access: Vec<String>,
    refresh: Vec<String>,
    login: Vec<String>,
    nonces: Vec<String>,
    /// Signed by an `F` line: tokens minted elsewhere (or forged).
    foreign: Vec<String>,
}

struct Run {
    config: Config,
    clock: ManualClock,
    sessions: Sessions,
    /// The store `sessions` and the layer share (clones share the state).
    store: MemoryStore,
    layer: Whoami,
    model: Model,
    pool: Pool,
}

/// The inner service of the layer: 200, with the identity in the response's extensions.
async fn inner(request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = request.extensions().get::<MatrixUser>().cloned();
    let mut response = Response::new(Full::new(Bytes::new()));
    response
        .headers_mut()
        .insert("x-inner", HeaderValue::from_static("1"));
    response.extensions_mut().insert(user);
    Ok(response)
}

fn pick(list: &[String], digit: Option<u8>) -> Option<&String> {
    let back = usize::from(digit.unwrap_or(0));
    list.len()
        .checked_sub(1 + back % list.len().max(1))
        .map(|i| &list[i])
}

/// A binary token in another base64 alphabet (standard, padded): the same macaroon.
fn reencoded(token: &str) -> Option<String> {
    let binary = URL_SAFE_NO_PAD.decode(token).ok()?;
    Some(STANDARD.encode(binary))
}

/// The token with one bit of its signature flipped, in its own format.
fn flipped(token: &str) -> Option<String> {
    if token.starts_with('{') {
        let mut json: Value = serde_json::from_str(token).ok()?;
        let s64 = json.get_mut("s64")?;
        let mut signature = URL_SAFE_NO_PAD.decode(s64.as_str()?).ok()?;
        *signature.last_mut()? ^= 1;
        *s64 = Value::String(URL_SAFE_NO_PAD.encode(signature));
        return Some(json.to_string());
    }
    let mut binary = URL_SAFE_NO_PAD.decode(token).ok()?;
    *binary.last_mut()? ^= 1;
    Some(URL_SAFE_NO_PAD.encode(binary))
}

/// The same caveats signed with a key the server does not hold.
fn forged(token: &str) -> Option<String> {
    let view = parse_token(token.as_bytes())?;
    let caveats: Vec<&[u8]> = view.caveats.iter().map(|(id, _)| id.as_slice()).collect();
    Some(sign(
        forger(),
        &view.identifier,
        &caveats,
        MacaroonFormat::V1,
    ))
}

/// Whether a token has a `time >` or `time ==` caveat: refused now, it may hold later.
fn has_time_window(token: &[u8]) -> bool {
    parse_token(token).is_some_and(|view| {
        view.caveats
            .iter()
            .any(|(id, _)| id.starts_with(b"time >") || id.starts_with(b"time ="))
    })
}

/// A token minted without a nonce (the crate's public `KeyRing::mint`), with a nonce of this run
/// appended: not a session nonce, whatever it says.
fn grafted(token_type: TokenType, nonce: &str) -> String {
    shared_keys()
        .mint(ALICE, token_type)
        .unwrap()
        .device_id("PHONE")
        .nonce(nonce)
        .to_token()
}

impl Run {
    fn new(config: Config) -> Self {
        let clock = ManualClock::new(NOW_MS);
        let keys = shared_keys().clone();
        let verifier = Verifier::new(keys.clone()).clock(clock.clone());
        let lifetimes = config.lifetimes;
        let mut issuer = Issuer::new(keys)
            .clock(clock.clone())
            .format(config.format)
            .refresh_lifetime(lifetimes.refresh_ms.map(Duration::from_millis))
            .access_lifetime(lifetimes.access_ms.map(Duration::from_millis))
            .refreshable_access_lifetime(Duration::from_millis(lifetimes.refreshable_access_ms));
        if config.location {
            issuer = issuer.location("example.org");
        }
        let store = MemoryStore::new().with_clock(clock.clone());
        let action = if config.policy.revoke {
            ReplayAction::RevokeSession
        } else {
            ReplayAction::Refuse
        };
        let policy = RefreshPolicy::new()
            .grace(Duration::from_millis(config.policy.grace_ms))
            .on_replay(action);
        let sessions = Sessions::new(issuer, verifier.clone(), store.clone())
            .rate_limit(rate_limit)
            .refresh_policy(policy);
        let layer = MatrixAuthLayer::with_verifier(verifier)
            .revocation(sessions.store())
            .guests(GuestPolicy::Allowed)
            .allow_expired_when(|parts| parts.uri.path().contains("/logout"))
            .layer(service_fn(inner))
            .map_response(|response| {
                response.map(|body| ready(body.collect()).unwrap().to_bytes())
            });
        Self {
            config,
            clock,
            sessions,
            store,
            layer: BoxCloneService::new(layer),
            model: Model::with_policy(lifetimes, config.policy),
            pool: Pool::default(),
        }
    }

    fn now(&self) -> u64 {
        use tower_matrix_auth::hooks::Clock as _;
        self.clock.now_ms()
    }

    /// `$<letter><digit>`: a token of this run, `None` when the pool has none.
    ///
    /// `R`/`A`/`G`: a refresh, access, login token as minted; refresh tokens changed: `T`
    /// attenuated with a later `time <`, `E` attenuated to have expired, `W` in standard base64,
    /// `F` a flipped signature bit, `K` signed with a forger's key, `X` attenuated with
    /// `type = access`, `Y` with a second nonce in the session grammar (the first one counts);
    /// `M` an access token attenuated with another `user_id`; `n` a minted nonce; `J`/`I` a
    /// refresh/access token of Alice minted without a nonce, with the minted nonce `$n<digit>`
    /// appended (a graft: no session nonce); `S` a token of an `F` line; `c` the clock plus the
    /// digit in ms (a number); `H` 32 KiB of spaces; `Q` a token over the length limit.
    fn placeholder(&self, letter: u8, digit: Option<u8>) -> Option<String> {
        let refresh = || pick(&self.pool.refresh, digit);
        let now = self.now();
        match letter {
            b'R' => refresh().cloned(),
            b'A' => pick(&self.pool.access, digit).cloned(),
            b'G' => pick(&self.pool.login, digit).cloned(),
            b'n' => pick(&self.pool.nonces, digit).cloned(),
            b'S' => pick(&self.pool.foreign, digit).cloned(),
            b'T' => attenuate(refresh()?, &format!("time < {}", now + 600_000)),
            b'E' => attenuate(refresh()?, &format!("time < {now}")),
            b'W' => reencoded(refresh()?),
            b'F' => flipped(refresh()?),
            b'K' => forged(refresh()?),
            b'X' => attenuate(refresh()?, "type = access"),
            b'Y' => {
                let nonce = Nonce {
                    session: 0x5eed,
                    generation: 0,
                    issued_ms: now,
                    kind: 'r',
                    started_ms: now,
                    epoch: 0,
                    expires_ms: None,
                };
                attenuate(refresh()?, &format!("nonce = {}", canonical_nonce(&nonce)))
            }
            b'M' => attenuate(
                pick(&self.pool.access, digit)?,
                "user_id = @mallory:example.org",
            ),
            b'J' => Some(grafted(TokenType::Refresh, pick(&self.pool.nonces, digit)?)),
            b'I' => Some(grafted(TokenType::Access, pick(&self.pool.nonces, digit)?)),
            b'c' => Some((now + u64::from(digit.unwrap_or(0))).to_string()),
            b'H' => Some(" ".repeat(32 * 1024)),
            b'Q' => Some("A".repeat(4097)),
            _ => None,
        }
    }

    fn substitute(&self, text: &[u8], json: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = text;
        while let Some((&first, tail)) = rest.split_first() {
            if first == b'$' {
                if let Some((&letter, after)) = tail.split_first() {
                    let digit = after.first().copied().filter(u8::is_ascii_digit);
                    if let Some(token) = self.placeholder(letter, digit.map(|d| d - b'0')) {
                        // Only tokens need escaping (V2JSON ones); `$H` and `$Q` are plain.
                        if json && !matches!(letter, b'H' | b'Q') {
                            let quoted = serde_json::to_string(&token).unwrap();
                            out.extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
                        } else {
                            out.extend_from_slice(token.as_bytes());
                        }
                        rest = &after[usize::from(digit.is_some())..];
                        continue;
                    }
                }
            }
            out.push(first);
            rest = tail;
        }
        out
    }

    /// What the caveat table says of a token expected as `token_type`, now, and where the token
    /// sits when its signature and caveats hold (with the identity the table read).
    fn seen(&self, token: &[u8], token_type: TokenType) -> (Seen, Option<Identity>) {
        match expected_verdict_at(token, token_type, self.now()) {
            Verdict::Accept(identity) => {
                let at = self.position(token, &identity, token_type);
                (Seen::Current(at), Some(identity))
            }
            Verdict::Expired(identity) => {
                let at = self.position(token, &identity, token_type);
                (Seen::Expired(at), Some(identity))
            }
            Verdict::Reject(_) => {
                let may_hold_later = has_time_window(token);
                (Seen::Refused { may_hold_later }, None)
            }
        }
    }

    /// Where a token the caveat table accepted (expired or not) sits: the model reads its
    /// caveats; its `TokenId` is computed here.
    fn position(&self, token: &[u8], identity: &Identity, token_type: TokenType) -> Position {
        let view = parse_token(token).expect("the oracle read it");
        let id = token_id(
            &identity.user_id,
            identity.nonce.as_deref(),
            &view.signature,
        );
        check(Position::of_token(&view.caveats, identity, token_type, id))
    }

    /// A single-use token minted elsewhere is known by the chain through its first `time <`
    /// (`None` without one), hashed as a `TokenId` of a signature is; and that `time <`.
    fn chain_session(token: &[u8]) -> Option<(u128, u64)> {
        let view = parse_token(token).expect("the oracle read it");
        let end = view
            .caveats
            .iter()
            .position(|(id, _)| id.starts_with(b"time < "))?;
        let at: u64 = std::str::from_utf8(&view.caveats[end].0[b"time < ".len()..])
            .expect("the oracle accepted it")
            .parse()
            .expect("the oracle accepted it");
        let chain = chain_prefix(&view, end + 1).expect("a key of the ring");
        Some((token_id("", None, &chain), at))
    }

    /// The session nonce of a token this run's issuer minted: its first caveat.
    fn session_nonce(token: &str) -> String {
        let view = parse_token(token.as_bytes()).expect("a minted token parses");
        let (id, _) = view.caveats.first().expect("a minted token has caveats");
        let nonce = id
            .strip_prefix(b"nonce = ")
            .expect("the session nonce is the first caveat");
        String::from_utf8(nonce.to_vec()).expect("a minted nonce is text")
    }

    /// A freshly minted token must be exactly what the docs say: the session nonce the model
    /// expects first, then Synapse's caveats (`gen`, `user_id`, `type`, `guest`), `device_id`,
    /// `time <`; the identity the caveat oracle reads; the nonce `TokenNonce` reads.
    fn minted(
        &mut self,
        token: &str,
        token_type: TokenType,
        user: &(String, Option<String>, bool),
        generation: &Generation,
    ) {
        let nonce = generation.nonce(token_type);
        let expires_at_ms = generation.expires_ms(token_type);
        let text = Self::session_nonce(token);
        check(self.model.minted(&text, &nonce));
        let view = parse_token(token.as_bytes()).expect("a minted token parses");
        let caveats = minted_caveats(
            &nonce,
            token_type,
            &user.0,
            user.1.as_deref(),
            user.2,
            expires_at_ms,
        );
        let got: Vec<String> = view
            .caveats
            .iter()
            .map(|(id, third_party)| {
                assert!(!third_party);
                String::from_utf8(id.clone()).unwrap()
            })
            .collect();
        assert_eq!(got, caveats, "the caveats of a minted {token_type:?} token");
        assert_eq!(view.identifier, b"key", "the ring's first key mints");
        let location = self.config.location.then(|| b"example.org".to_vec());
        assert_eq!(view.location, location);
        let expected = Identity {
            user_id: user.0.clone(),
            device_id: user.1.clone(),
            nonce: Some(text.clone()),
            is_guest: user.2,
            token_type: token_type.as_str().to_owned(),
            expires_at_ms,
        };
        assert_eq!(
            expected_verdict_at(token.as_bytes(), token_type, self.now()),
            Verdict::Accept(expected),
            "a minted {token_type:?} token"
        );
        // What the issuer mints always parses, to what it minted, as the session nonce.
        let verified = self
            .sessions
            .verifier()
            .verify(token.as_bytes(), token_type, empty_parts())
            .expect("a minted token verifies");
        let parsed = TokenNonce::of(&verified).expect("a minted nonce is the session's");
        assert_eq!(parsed.to_string(), text);
        self.pool.nonces.push(text);
    }

    fn remember(&mut self, access: &str, refresh: Option<&str>) {
        self.pool.access.push(access.to_owned());
        if let Some(refresh) = refresh {
            self.pool.refresh.push(refresh.to_owned());
        }
    }

    fn login(&mut self, flags: u8) {
        let mut request = SessionRequest::new()
            .refresh(flags & 1 == 0)
            .guest(flags & 2 != 0);
        if flags & 4 == 0 {
            request = request.device_id("PHONE");
        }
        let user_id = if flags & 8 != 0 { BOB } else { ALICE };
        let tokens = self.sessions.login(user_id, &request);
        let now = self.now();
        // A new session: it starts now, in the user's current epoch (their floor).
        let expected = self
            .model
            .login(tokens.session.as_u128(), user_id, request.refresh, now);
        assert_eq!(tokens.generation, 0);
        assert_eq!(tokens.expires_in_ms, expected.access_lifetime_ms);
        assert_eq!(tokens.expires_at_ms, expected.access_expires_ms);
        assert_eq!(tokens.session_expires_ms, expected.nonce.expires_ms);
        assert_eq!(tokens.refresh_token.is_some(), request.refresh);
        let who = (user_id.to_owned(), request.device_id.clone(), request.guest);
        self.minted(&tokens.access_token, TokenType::Access, &who, &expected);
        if let Some(refresh) = &tokens.refresh_token {
            self.minted(refresh, TokenType::Refresh, &who, &expected);
        }
        self.remember(&tokens.access_token, tokens.refresh_token.as_deref());
    }

    fn refresh(&mut self, rotating: bool, meta: [u8; 4], raw: &[u8]) {
        let [method, content_type, shape, limit] = meta.map(|b| b % 8);
        let body = self.substitute(raw, true);
        let method = match method {
            5 => Method::GET,
            6 => Method::PUT,
            7 => Method::DELETE,
            _ => Method::POST,
        };
        let path = if rotating {
            "/_matrix/client/v3/refresh"
        } else {
            "/_matrix/client/r0/tokenrefresh"
        };
        let mut request = Request::builder().method(method.clone()).uri(path);
        if let Some(content_type) = CONTENT_TYPES[usize::from(content_type)] {
            request = request.header(CONTENT_TYPE, HeaderValue::from_bytes(content_type).unwrap());
        }
        if limit_of(limit).is_some() {
            request = request.header("x-fuzz-limit", HeaderValue::from(u16::from(limit)));
        }
        let request = request.body(pieces(body.clone(), shape)).unwrap();
        let endpoint = if rotating {
            self.sessions.refresh_endpoint()
        } else {
            self.sessions.token_refresh_endpoint()
        };
        let response = ready(endpoint.oneshot(request)).unwrap();
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        assert_eq!(
            response
                .headers()
                .get(CONTENT_TYPE)
                .map(HeaderValue::as_bytes),
            Some(&b"application/json"[..])
        );
        let answer = ready(response.into_body().collect()).unwrap().to_bytes();
        assert!(!status.is_server_error(), "{status}");
        let json: Value = serde_json::from_slice(&answer).expect("answers are JSON");
        let errcode = json["errcode"].as_str().unwrap_or_default().to_owned();
        let error = (status, errcode.as_str());
        trace!("  refresh: {error:?}");
        // Parsed once (bodies run to 64 KiB); a larger one is never read.
        let sent = if body.len() <= MAX_BODY {
            body_token(&body)
        } else {
            Err("M_TOO_LARGE")
        };
        if status != StatusCode::OK {
            assert!(json["error"].is_string(), "{json}");
            self.repeats_no_token(&answer, sent.as_deref().ok());
        }

        if method != Method::POST {
            assert_eq!(error, (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"));
            return;
        }
        if let Some(wait) = limit_of(limit) {
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            assert_eq!(error, (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"));
            assert_eq!(json["retry_after_ms"].as_u64(), Some(ms));
            let seconds = ms / 1000 + u64::from(ms % 1000 != 0);
            assert_eq!(
                retry_after.as_ref().map(HeaderValue::as_bytes),
                Some(seconds.max(1).to_string().as_bytes())
            );
            return;
        }
        if body.len() > MAX_BODY {
            assert_eq!(error, (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"));
            return;
        }
        if shape == 7 {
            // A body that broke off is no JSON document: refused before any token is looked at.
            assert_eq!(error, (StatusCode::BAD_REQUEST, "M_NOT_JSON"));
            return;
        }
        let token = match sent {
            Ok(token) => token,
            Err(expected) => {
                assert_eq!(error, (StatusCode::BAD_REQUEST, expected));
                return;
            }
        };

        // The model: a refresh token that verifies now, whose first caveat is the issuer's
        // session nonce of kind `r`, that the store does not refuse.
        let now = self.now();
        let mode = if rotating {
            RefreshMode::Rotating
        } else {
            RefreshMode::SingleUse
        };
        let (seen, identity) = self.seen(token.as_bytes(), TokenType::Refresh);
        let got = match status {
            StatusCode::OK => Ok(()),
            _ => Err((status.as_u16(), errcode.as_str())),
        };
        let successor = check(self.model.refresh(token.as_bytes(), &seen, mode, now, got));
        trace!("  the model: {:?}", successor.map(|s| s.nonce.generation));
        let Some(successor) = successor else {
            return;
        };

        // The answer: exactly these keys, and tokens of the next generation of the session,
        // minted at the very `now` the store was told about.
        let object = json.as_object().expect("an object");
        let access = object["access_token"].as_str().expect("access_token");
        let refresh = object["refresh_token"].as_str().expect("refresh_token");
        if rotating {
            assert_eq!(object.len(), 3, "{:?}", object.keys());
            assert_eq!(
                object["expires_in_ms"].as_u64(),
                successor.access_lifetime_ms
            );
        } else {
            assert_eq!(object.len(), 2, "{:?}", object.keys());
        }
        // The successor carries the refresh token's user, device and guest flag.
        let identity = identity.expect("only a verified token is exchanged");
        let who = (identity.user_id, identity.device_id, identity.is_guest);
        self.minted(access, TokenType::Access, &who, &successor);
        self.minted(refresh, TokenType::Refresh, &who, &successor);
        let (access, refresh) = (access.to_owned(), refresh.to_owned());
        self.remember(&access, Some(&refresh));
    }

    /// A refusal names no token: not the one sent (if it is a macaroon at all: any text could be
    /// part of the error message), not one of this run's.
    fn repeats_no_token(&self, answer: &[u8], sent: Option<&str>) {
        let contains =
            |needle: &[u8]| needle.len() >= 16 && answer.windows(needle.len()).any(|w| w == needle);
        if let Some(token) = sent.filter(|t| parse_token(t.as_bytes()).is_some()) {
            assert!(!contains(token.as_bytes()), "a refusal repeats the token");
        }
        let pool = &self.pool;
        for token in pool
            .access
            .iter()
            .chain(&pool.refresh)
            .chain(&pool.login)
            .chain(&pool.foreign)
        {
            assert!(!contains(token.as_bytes()), "a refusal repeats a token");
        }
    }

    fn login_token(&mut self, flags: u8) {
        let user_id = if flags & 1 != 0 { BOB } else { ALICE };
        let (token, lifetime) = self.sessions.login_token(user_id);
        assert_eq!(lifetime, LOGIN_LIFETIME_MS);
        // The session is random: read it from the token (`minted` checks the rest).
        let session = nonce_grammar(&Self::session_nonce(&token)).map_or(0, |n| n.session);
        let expected = self.model.login_token(session, user_id, self.now());
        let who = (user_id.to_owned(), None, false);
        self.minted(&token, TokenType::Login, &who, &expected);
        self.pool.login.push(token);
    }

    fn redeem(&mut self, raw: &[u8]) {
        let token = self.substitute(raw, false);
        let got = ready(self.sessions.redeem_login_token(&token, empty_parts()));
        trace!("  redeem: {}", if got.is_ok() { "used" } else { "refused" });
        let now = self.now();
        let (seen, identity) = self.seen(&token, TokenType::Login);
        let chain = match seen {
            Seen::Current(Position { nonce: None, .. }) => Self::chain_session(&token),
            _ => None,
        };
        let redeemed = match &got {
            Ok(_) => true,
            Err(ExchangeError::Invalid) => false,
            Err(error) => panic!("redeem_login_token: {error:?}"),
        };
        if !check(self.model.redeem(&token, &seen, chain, now, redeemed)) {
            return;
        }
        let (user, identity) = (got.unwrap(), identity.expect("a verified token"));
        assert_eq!(identity_of(&user), identity);
        self.same_token_id(&user, &token, &identity);
        // Single use.
        let again = ready(self.sessions.redeem_login_token(&token, empty_parts()));
        assert!(matches!(again, Err(ExchangeError::Invalid)), "{again:?}");
    }

    /// The crate's `TokenId` is the docs', computed here.
    fn same_token_id(&self, user: &MatrixUser, token: &[u8], identity: &Identity) {
        let view = parse_token(token).expect("a verified token parses");
        let id = token_id(
            &identity.user_id,
            identity.nonce.as_deref(),
            &view.signature,
        );
        assert_eq!(u128::from_le_bytes(*user.token_id().as_bytes()), id);
    }

    /// A request through the layer; on `/logout` and `/logout/all` the handler then logs out.
    fn request(&mut self, op: u8, raw: &[u8]) {
        let token = self.substitute(raw, false);
        if token.is_empty() || token.iter().any(|b| !(b'!'..=b'~').contains(b)) {
            return; // not a Bearer token: the layer target covers extraction
        }
        let path = match op {
            b'O' => "/_matrix/client/v3/logout",
            b'Z' => "/_matrix/client/v3/logout/all",
            _ => "/_matrix/client/v3/account/whoami",
        };
        let on_logout = op != b'U';
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(&token);
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(AUTHORIZATION, HeaderValue::from_bytes(&value).unwrap())
            .body(())
            .unwrap();
        let response = ready(self.layer.clone().oneshot(request)).unwrap();
        let status = response.status();
        let reached = response.headers().contains_key("x-inner");
        let user = response
            .extensions()
            .get::<Option<MatrixUser>>()
            .cloned()
            .flatten();
        let answer = response.into_body();
        assert!(!status.is_server_error(), "{status}");
        trace!("  {path}: {status}, reached {reached}");
        let got = if reached {
            Some(Answer::Ok)
        } else {
            let json: Value = serde_json::from_slice(&answer).expect("rejections are JSON");
            assert_eq!(
                (status, json["errcode"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
            );
            self.repeats_no_token(&answer, std::str::from_utf8(&token).ok());
            match json.get("soft_logout") {
                None => Some(Answer::Unknown),
                Some(Value::Bool(true)) => Some(Answer::SoftLogout),
                Some(_) => None,
            }
        };

        // The store is asked about every token whose signature and caveats hold, expired or not.
        let now = self.now();
        let (seen, identity) = self.seen(&token, TokenType::Access);
        let passed = check(self.model.layer(&token, &seen, on_logout, now, got));
        trace!("  the model: {seen:?}");
        let Some(at) = passed else {
            return;
        };
        let identity = identity.expect("only a verified token passes");
        let user = user.expect("an identity");
        assert_eq!(identity_of(&user), identity);
        assert_eq!(user.credential(), Credential::Macaroon);
        self.same_token_id(&user, &token, &identity);
        // Both log out the session of the token that asked; `/logout/all` first raises the
        // user's floor.
        match op {
            b'O' => {
                ready(self.sessions.logout(&user)).unwrap();
                self.model.logout(&at);
            }
            b'Z' => {
                ready(self.sessions.logout_all(&user)).unwrap();
                self.model.logout_all(&at, now);
                assert_eq!(
                    self.store.user_floor(&at.user_id),
                    self.model.floor(&at.user_id)
                );
            }
            _ => {}
        }
    }

    /// `F<k><caveat>|<caveat>|...`: a token minted elsewhere with exactly these caveats (after
    /// the placeholders), signed with the ring's `key` (`k` bit 2: `key2`; bit 3: a forger's key)
    /// in V1, V2, V2JSON (`k` bits 0-1).
    fn foreign(&mut self, rest: &[u8]) {
        let Some((&k, caveats)) = rest.split_first() else {
            return;
        };
        let text = self.substitute(caveats, false);
        if text.len() > 8192 {
            return; // far over the token length limit; V1 packets hold no more than 64 KiB
        }
        let caveats: Vec<&[u8]> = text.split(|&b| b == b'|').collect();
        let (identifier, secret) = match (k & 4 != 0, k & 8 != 0) {
            (_, true) => ("key", forger().clone()),
            (true, false) => (KEYS[1].0, MacaroonSecret::from_passphrase(KEYS[1].1)),
            (false, false) => (KEYS[0].0, MacaroonSecret::from_passphrase(KEYS[0].1)),
        };
        let format = [
            MacaroonFormat::V1,
            MacaroonFormat::V2,
            MacaroonFormat::V2Json,
            MacaroonFormat::V1,
        ][usize::from(k & 3)];
        let token = sign(&secret, identifier.as_bytes(), &caveats, format);
        self.pool.foreign.push(token);
    }

    /// The memory store forgets what it keeps until now or earlier; so does the model.
    fn sweep(&mut self) {
        self.store.sweep();
        let gone = self.model.sweep(self.now());
        trace!("  sweep: {gone} forgotten, {} kept", self.model.stored());
    }

    fn step(&mut self, line: &[u8]) {
        let Some((&op, rest)) = line.split_first() else {
            return;
        };
        trace!("> {:.100}", String::from_utf8_lossy(line));
        let arg = rest.first().copied().unwrap_or(b'0');
        match op {
            b'L' => self.login(arg),
            b'K' => self.login_token(arg),
            b'V' | b'T' => {
                let mut meta = [b'0'; 4];
                let n = rest.len().min(4);
                meta[..n].copy_from_slice(&rest[..n]);
                self.refresh(op == b'V', meta, &rest[n..]);
            }
            b'g' => self.redeem(rest),
            b'U' | b'O' | b'Z' => self.request(op, rest),
            b'F' => self.foreign(rest),
            b'S' => self.sweep(),
            b'+' => {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit());
                let ms = digits.fold(0u64, |n, &b| {
                    n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
                });
                self.clock.advance_ms(ms.min(MAX_STEP_MS));
            }
            b'N' => {
                let text = self.substitute(rest, false);
                check(check_nonce(&String::from_utf8_lossy(&text)));
            }
            _ => {}
        }
        // The store holds state for exactly the sessions the model does.
        assert_eq!(self.store.len(), self.model.stored(), "sessions stored");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, script)) = data.split_first() else {
        return;
    };
    let mut run = Run::new(Config::of(config));
    for line in script.split(|&b| b == b'\n').take(MAX_OPS) {
        run.step(line);
    }
});
