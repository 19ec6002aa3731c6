//! Target 5: the token lifecycle (`Sessions`), driven by a script, against a model of the
//! docs' lifecycle table (docs/sessions.md).
//!
//! Every input gets a fresh `Sessions` (memory store, an `Issuer` and a `Verifier` sharing one
//! `ManualClock` that starts at [`NOW_MS`] and moves only when the script says), the two refresh
//! endpoints and a layer consulting the same store. Input, as text so that seeds and a
//! dictionary can steer it: one configuration byte (bits 0-1: format V1, V2, V2JSON, V1; bit 2:
//! refresh tokens live an hour; bit 3: access tokens without a refresh token live a day; bit 6:
//! refreshable access tokens live 1 ms; bit 7: a location), then one operation per line:
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
//! The model: a token's session is named by the issuer's session nonce only when that is the
//! token's first caveat (`<session>.<generation>.<issued>.<a|r|l>.<start>.<epoch>.<expiry|->`);
//! any other token (minted elsewhere, an older 4-field nonce, a nonce appended by a holder) is a
//! session of its own, its `TokenId`, generation 0, epoch 0. "Log out everywhere" raises the
//! user's floor to max(floor + 1, now); a token is revoked while the floor exceeds its epoch (the
//! floor at its session's login; 0 without a session nonce). Only refresh tokens whose session
//! nonce is of kind `r` are exchanged; a session nonce of another kind than the token's type is
//! revoked. Login tokens are used once: by their session (kind `l`), or, minted elsewhere, by the
//! chain through their first `time <` (refused without one). Sessions belong to the user whose
//! token made their state. What the store records is kept until the session's expiry (from the
//! nonce; the token's own `time <` without one), for good without one.
//!
//! Checked: never a panic, never a 5xx; every answer is the model's (status, errcode, the
//! refresh answer's keys, the successor's user, device, guest flag, nonce and expiry, checked
//! with the independent verdict of `tests/oracle`); minted tokens are exactly the docs'
//! caveats, the session nonce first and stamped with the clock; the store holds state for the
//! sessions the model does, and the user's floor the model's; the crate's `TokenId` is the
//! documented one; a token once refused stays refused (refresh endpoints, login tokens, the layer)
//! unless a sweep forgot the state that refused it, or a refresh may still mint its generation,
//! or it has a `time >`/`time ==` caveat; no sweep forgets a state while a token it speaks for
//! still verifies; a login token works once; refusals repeat no token; `TokenNonce::parse`
//! agrees with the nonce grammar, round-trips, and reads every nonce the issuer mints.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
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
    lifecycle::{ExchangeError, NonceKind, SessionRequest, TokenNonce},
    macaroon::{attenuate, MacaroonFormat},
    store::TokenStore,
    Credential, Issuer, KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, MemoryStore,
    Sessions, TokenType, Verifier,
};
use tower_matrix_auth_fuzz::oracle::{caveat_parts, Identity, Verdict};
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
/// The verifier's leeway for `time` caveats (the default; the caveat oracle has none).
const LEEWAY_MS: u64 = 0;
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

fn shared_keys() -> &'static KeyRing {
    static KEYS: OnceLock<KeyRing> = OnceLock::new();
    KEYS.get_or_init(keys)
}

fn forger() -> &'static MacaroonSecret {
    static FORGER_SECRET: OnceLock<MacaroonSecret> = OnceLock::new();
    FORGER_SECRET.get_or_init(|| MacaroonSecret::from_passphrase(FORGER))
}

// ---- The nonce grammar ------------------------------------------------------------------------

/// The fields of a session nonce, as the grammar reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Nonce {
    session: u128,
    generation: u32,
    issued_ms: u64,
    /// `a`, `r` or `l`.
    kind: char,
    started_ms: u64,
    epoch: u64,
    /// `None` for `-`: some token of the session never expires.
    expires_ms: Option<u64>,
}

/// `<session: 32 hex>.<generation>.<issued ms>.<kind: a|r|l>.<session start ms>.<epoch>.<session
/// expiry ms or ->`: the fields, or `None`. Decimals are ASCII digits only (leading zeros
/// allowed) that fit their type (`u32` for the generation, `u64` for the rest).
fn nonce_grammar(text: &str) -> Option<Nonce> {
    fn decimal(text: &str) -> Option<u64> {
        if text.is_empty() {
            return None;
        }
        text.bytes().try_fold(0u64, |n, b| {
            let digit = char::from(b).to_digit(10)?;
            n.checked_mul(10)?.checked_add(u64::from(digit))
        })
    }
    let fields: Vec<&str> = text.split('.').collect();
    let [session, generation, issued, kind, started, epoch, expires] = fields.as_slice() else {
        return None;
    };
    if session.len() != 32 {
        return None;
    }
    let session = session
        .chars()
        .try_fold(0u128, |n, c| Some(n << 4 | u128::from(c.to_digit(16)?)))?;
    let kind = match *kind {
        "a" => 'a',
        "r" => 'r',
        "l" => 'l',
        _ => return None,
    };
    Some(Nonce {
        session,
        generation: u32::try_from(decimal(generation)?).ok()?,
        issued_ms: decimal(issued)?,
        kind,
        started_ms: decimal(started)?,
        epoch: decimal(epoch)?,
        expires_ms: match *expires {
            "-" => None,
            text => Some(decimal(text)?),
        },
    })
}

fn letter(kind: NonceKind) -> char {
    match kind {
        NonceKind::Access => 'a',
        NonceKind::Refresh => 'r',
        NonceKind::Login => 'l',
    }
}

/// The nonce kind a token of this type carries.
fn kind_of(token_type: TokenType) -> char {
    match token_type.as_str() {
        "access" => 'a',
        "refresh" => 'r',
        "login" => 'l',
        other => panic!("a token type the nonce grammar has no kind for: {other}"),
    }
}

/// The nonce the issuer writes, spelled from the grammar: lowercase hex, no leading zeros.
fn canonical_nonce(n: &Nonce) -> String {
    let expires = n.expires_ms.map_or("-".to_owned(), |at| at.to_string());
    format!(
        "{:032x}.{}.{}.{}.{}.{}.{expires}",
        n.session, n.generation, n.issued_ms, n.kind, n.started_ms, n.epoch
    )
}

/// `TokenNonce::parse` against the grammar, and the round trip of whatever parses.
fn check_nonce(text: &str) {
    let parsed = TokenNonce::parse(text);
    let fields = parsed.map(|n| Nonce {
        session: n.session.as_u128(),
        generation: n.generation,
        issued_ms: n.issued_ms,
        kind: letter(n.kind),
        started_ms: n.started_ms,
        epoch: n.epoch,
        expires_ms: n.session_expires_ms,
    });
    assert_eq!(fields, nonce_grammar(text), "TokenNonce::parse({text:?})");
    if let (Some(nonce), Some(fields)) = (parsed, fields) {
        let written = nonce.to_string();
        assert_eq!(written, canonical_nonce(&fields));
        assert_eq!(TokenNonce::parse(&written), Some(nonce));
        if text.bytes().all(|b| !b.is_ascii_uppercase()) && written.len() == text.len() {
            // Same length, lowercase: no leading zeros either, so the very same text.
            assert_eq!(written, text);
        }
    }
}

/// The later of two expiries, `None` being "never".
fn latest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(a?.max(b?))
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

// ---- The model: the lifecycle table -----------------------------------------------------------

/// What the store knows of one session.
#[derive(Debug, Clone)]
struct State {
    /// The user whose token created the state: no other user's token reads or changes it.
    owner: String,
    live: u32,
    /// Minted by a rotating refresh, not used yet.
    pending: Option<u32>,
    next: u32,
    logged_out: bool,
    /// Until when the store keeps it: a sweep at `now >= until` forgets it.
    until: u64,
}

impl State {
    fn new(owner: &str) -> Self {
        Self {
            owner: owner.to_owned(),
            live: 0,
            pending: None,
            next: 1,
            logged_out: false,
            until: 0,
        }
    }

    /// Whether it says more than no state at all (which is generation 0 live, nothing else).
    fn informative(&self) -> bool {
        self.logged_out || self.live != 0 || self.pending.is_some() || self.next != 1
    }

    fn standing(&self, generation: u32) -> Standing {
        if self.logged_out {
            Standing::Revoked
        } else if generation == self.live {
            Standing::Valid
        } else if Some(generation) == self.pending {
            Standing::FirstUse
        } else {
            Standing::Revoked
        }
    }

    /// A revoked generation that no later refresh can bring back: every one but those a refresh
    /// has yet to mint.
    fn for_good(&self, generation: u32) -> bool {
        self.logged_out || generation < self.next
    }

    fn first_use(&mut self, generation: u32) {
        self.live = generation;
        self.pending = None;
    }

    fn revoke(&mut self, until: u64) {
        self.logged_out = true;
        self.until = self.until.max(until);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Valid,
    /// Valid, and its first use revokes the generations before it.
    FirstUse,
    Revoked,
}

/// The store's answer on a token: valid, or revoked (`for_good`: whatever comes later in the
/// script but a sweep; a generation that no refresh minted yet may still come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    Valid,
    Revoked { for_good: bool },
}

/// A verified token as the store sees it.
#[derive(Debug, Clone)]
struct Position {
    user_id: String,
    /// From the issuer's session nonce (the token's first caveat, in the grammar); otherwise the
    /// token's own `TokenId`.
    session: u128,
    /// 0 without a session nonce.
    generation: u32,
    /// The user's floor when the session began: 0 without a session nonce, so that every "log out
    /// everywhere" of the user, before or after it was minted, revokes it.
    epoch: u64,
    /// The issuer's session nonce.
    nonce: Option<Nonce>,
    /// The session nonce names another kind of token than the token's type.
    contradicts: bool,
    /// Until when a record about it is kept: the session's expiry from the nonce, otherwise the
    /// token's own `time <` (the earliest); plus the leeway (0); never forgotten without one.
    keep_until: u64,
}

#[derive(Default)]
struct Model {
    sessions: HashMap<u128, State>,
    /// User → floor: raised by each "log out everywhere" to max(floor + 1, now).
    floors: HashMap<String, u64>,
    /// Sessions whose state (more than "generation 0 live") a sweep forgot.
    forgotten: HashSet<u128>,
}

impl Model {
    fn floor(&self, user_id: &str) -> u64 {
        self.floors.get(user_id).copied().unwrap_or(0)
    }

    /// "Log out everywhere" raises the floor above every epoch handed out so far.
    fn raise_floor(&mut self, user_id: &str, now: u64) {
        let floor = self.floor(user_id).saturating_add(1).max(now);
        self.floors.insert(user_id.to_owned(), floor);
    }

    /// The state of a session to change, created for `user_id` if new; `None` (fail closed) if
    /// it belongs to another user.
    fn state_mut(&mut self, session: u128, user_id: &str) -> Option<&mut State> {
        let state = self
            .sessions
            .entry(session)
            .or_insert_with(|| State::new(user_id));
        (state.owner == user_id).then_some(state)
    }

    /// The store's verdict on a verified token (what the layer's check says), recording a first
    /// use.
    fn judge(&mut self, at: &Position) -> Judged {
        if at.contradicts || self.floor(&at.user_id) > at.epoch {
            return Judged::Revoked { for_good: true };
        }
        let Some(state) = self.sessions.get_mut(&at.session) else {
            // No refresh or logout touched the session: generation 0 only.
            return match at.generation {
                0 => Judged::Valid,
                _ => Judged::Revoked { for_good: false },
            };
        };
        if state.owner != at.user_id {
            return Judged::Revoked { for_good: true };
        }
        match state.standing(at.generation) {
            Standing::Valid => Judged::Valid,
            Standing::FirstUse => {
                state.first_use(at.generation);
                Judged::Valid
            }
            Standing::Revoked => Judged::Revoked {
                for_good: state.for_good(at.generation),
            },
        }
    }

    /// A refresh with a verified refresh token carrying a session nonce of kind `r`: the
    /// generation it mints, or why not. The store makes the session's state first (for this
    /// user, if new), then refuses if the user logged out everywhere since the session began.
    fn refresh(&mut self, at: &Position, rotating: bool, until: u64) -> Result<u32, Judged> {
        let user_revoked = self.floor(&at.user_id) > at.epoch;
        let refused = Judged::Revoked { for_good: true };
        let state = self.state_mut(at.session, &at.user_id).ok_or(refused)?;
        if user_revoked {
            return Err(refused);
        }
        match state.standing(at.generation) {
            Standing::Revoked => {
                return Err(Judged::Revoked {
                    for_good: state.for_good(at.generation),
                })
            }
            Standing::FirstUse => state.first_use(at.generation),
            Standing::Valid => {}
        }
        let successor = state.next;
        state.next = state.next.checked_add(1).ok_or(refused)?;
        if rotating {
            state.pending = Some(successor);
        } else {
            state.live = successor;
            state.pending = None;
        }
        state.until = state.until.max(until);
        Ok(successor)
    }

    /// Logs out a session (nothing if it belongs to another user).
    fn logout(&mut self, session: u128, user_id: &str, until: u64) {
        if let Some(state) = self.state_mut(session, user_id) {
            state.revoke(until);
        }
    }

    /// Marks a single-use token used: whether it was the first use.
    fn consume(&mut self, session: u128, user_id: &str, until: u64) -> bool {
        match self.state_mut(session, user_id) {
            Some(state) => {
                let first = !state.logged_out;
                state.revoke(until);
                first
            }
            None => false,
        }
    }

    /// Forgets what is kept until `now` or earlier; returns the sessions forgotten.
    fn sweep(&mut self, now: u64) -> HashSet<u128> {
        let gone: HashSet<u128> = self
            .sessions
            .iter()
            .filter(|(_, state)| state.until <= now)
            .map(|(session, _)| *session)
            .collect();
        for session in &gone {
            let state = self.sessions.remove(session).unwrap();
            if state.informative() {
                self.forgotten.insert(*session);
            }
        }
        gone
    }
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
    refresh_lifetime_ms: Option<u64>,
    access_lifetime_ms: Option<u64>,
    refreshable_lifetime_ms: u64,
    location: bool,
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
            refresh_lifetime_ms: (byte & 4 != 0).then_some(REFRESH_LIFETIME_MS),
            access_lifetime_ms: (byte & 8 != 0).then_some(ACCESS_LIFETIME_MS),
            refreshable_lifetime_ms: if byte & 64 != 0 {
                SHORT_REFRESHABLE_LIFETIME_MS
            } else {
                REFRESHABLE_LIFETIME_MS
            },
            location: byte & 128 != 0,
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

/// Tokens once refused, with the sessions whose state refused them: a sweep that forgets one of
/// those sessions lets the token be judged afresh.
type Refused<T> = HashMap<T, Vec<u128>>;

struct Run {
    config: Config,
    clock: ManualClock,
    sessions: Sessions,
    /// The store `sessions` and the layer share (clones share the state).
    store: MemoryStore,
    layer: Whoami,
    model: Model,
    pool: Pool,
    /// Every nonce this run's issuer wrote.
    minted_nonces: HashSet<String>,
    /// Refresh tokens a refresh endpoint refused (not for the body or the rate limit) for good.
    refused_refresh: Refused<String>,
    /// Login tokens `redeem_login_token` refused or used, for good.
    refused_login: Refused<Vec<u8>>,
    /// Tokens the layer refused as unknown or revoked (anywhere) for good, or as expired (off
    /// `/logout`).
    refused_unknown: Refused<Vec<u8>>,
    refused_expired: HashSet<Vec<u8>>,
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
        let mut issuer = Issuer::new(keys)
            .clock(clock.clone())
            .format(config.format)
            .refresh_lifetime(std::time::Duration::from_millis(config.refresh_lifetime_ms))
            .access_lifetime(std::time::Duration::from_millis(config.access_lifetime_ms))
            .refreshable_access_lifetime(std::time::Duration::from_millis(
                config.refreshable_lifetime_ms,
            ));
        if config.location {
            issuer = issuer.location("example.org");
        }
        let store = MemoryStore::new().with_clock(clock.clone());
        let sessions =
            Sessions::new(issuer, verifier.clone(), store.clone()).rate_limit(rate_limit);
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
            model: Model::default(),
            pool: Pool::default(),
            minted_nonces: HashSet::new(),
            refused_refresh: HashMap::new(),
            refused_login: HashMap::new(),
            refused_unknown: HashMap::new(),
            refused_expired: HashSet::new(),
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

    /// Where a token the caveat oracle accepted sits (expired or not): from the issuer's session
    /// nonce when the token's first caveat is one (a nonce in the grammar), otherwise (minted
    /// elsewhere, or a nonce a holder appended) a session of its own named by its `TokenId`,
    /// generation 0, epoch 0.
    fn position(&self, token: &[u8], identity: &Identity, token_type: TokenType) -> Position {
        let view = parse_token(token).expect("the oracle read it");
        let first = view.caveats.first().and_then(|(id, _)| caveat_parts(id));
        let session_nonce = match first {
            Some(("nonce", "=", value)) => {
                assert_eq!(identity.nonce.as_deref(), Some(value), "the first nonce");
                nonce_grammar(value)
            }
            _ => None,
        };
        let user_id = identity.user_id.clone();
        let keep =
            |expires: Option<u64>| expires.map_or(u64::MAX, |at| at.saturating_add(LEEWAY_MS));
        match session_nonce {
            Some(nonce) => Position {
                user_id,
                session: nonce.session,
                generation: nonce.generation,
                epoch: nonce.epoch,
                nonce: Some(nonce),
                contradicts: nonce.kind != kind_of(token_type),
                keep_until: keep(nonce.expires_ms),
            },
            // A record speaks for every token with this first nonce (the minter's and its
            // attenuations): they all expire by the earliest `time <` written before that nonce,
            // and may never expire without one. Without a nonce, for this very token.
            None => Position {
                session: token_id(&user_id, identity.nonce.as_deref(), &view.signature),
                keep_until: keep(match identity.nonce {
                    Some(_) => Self::expiry_before_first_nonce(&view.caveats),
                    None => identity.expires_at_ms,
                }),
                user_id,
                generation: 0,
                epoch: 0,
                nonce: None,
                contradicts: false,
            },
        }
    }

    /// The earliest `time <` among the caveats before the first `nonce`.
    fn expiry_before_first_nonce(caveats: &[(Vec<u8>, bool)]) -> Option<u64> {
        let mut earliest: Option<u64> = None;
        for (id, _) in caveats {
            match caveat_parts(id) {
                Some(("nonce", _, _)) => break,
                Some(("time", "<", value)) => {
                    let at: u64 = value.parse().expect("the oracle accepted it");
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                }
                _ => {}
            }
        }
        earliest
    }

    /// A single-use token minted elsewhere is known by the chain through its first `time <`
    /// (`None` without one), hashed as a `TokenId` of a signature is; its use is kept until that
    /// first `time <` (every token with that chain expires by then).
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
        Some((token_id("", None, &chain), at.saturating_add(LEEWAY_MS)))
    }

    /// The docs' promise about what a store records: kept until every token it speaks for
    /// has stopped verifying. A token that verifies now (not expired) and belongs to a session
    /// whose state a sweep forgot shows the state was forgotten too early: for a token minted
    /// elsewhere (whose session is its `TokenId`, shared by every attenuation of it, or the chain
    /// through its first `time <`), always; for a session nonce, when this run's issuer wrote it
    /// and it says the session still has a token that has not expired (a nonce minted elsewhere
    /// is trusted as written).
    ///
    /// The seeds `regression-sweep-attenuated-*` replay the bug this found: records of tokens
    /// without a session nonce were kept until the `time <` of the token that made them, a
    /// holder's appended one included.
    fn not_forgotten(&self, session: u128, at: &Position, what: &str) {
        if !self.model.forgotten.contains(&session) {
            return;
        }
        let speaks_for = match &at.nonce {
            None => true,
            Some(nonce) => {
                self.minted_nonces.contains(&canonical_nonce(nonce))
                    && nonce
                        .expires_ms
                        .is_none_or(|at| self.now() < at.saturating_add(LEEWAY_MS))
            }
        };
        assert!(
            !speaks_for,
            "{what}: the store forgot the state of session {session:032x} while a token of it \
             still verifies ({at:?}, now {})",
            self.now()
        );
    }

    /// The first caveat of a token this run's issuer minted: its session nonce, stamped now.
    fn stamp(&self, token: &str) -> Nonce {
        let view = parse_token(token.as_bytes()).expect("a minted token parses");
        let (id, _) = view.caveats.first().expect("a minted token has caveats");
        let nonce = id
            .strip_prefix(b"nonce = ")
            .expect("the session nonce is the first caveat");
        let nonce = nonce_grammar(std::str::from_utf8(nonce).unwrap())
            .expect("a minted nonce follows the grammar");
        assert_eq!(
            nonce.issued_ms,
            self.now(),
            "tokens are stamped with the clock, never ahead of it"
        );
        nonce
    }

    /// The session expiry the issuer writes for a generation minted now (`None`: never), given
    /// the session's so far.
    fn session_expiry(&self, refresh: bool, so_far: Option<u64>) -> Option<u64> {
        let now = self.now();
        let access = if refresh {
            Some(self.config.refreshable_lifetime_ms)
        } else {
            self.config.access_lifetime_ms
        };
        let mut expires = latest(so_far, access.map(|l| now + l));
        if refresh {
            expires = latest(expires, self.config.refresh_lifetime_ms.map(|l| now + l));
        }
        expires
    }

    /// A freshly minted token must be exactly what the docs say: the session nonce first,
    /// then Synapse's caveats (`gen`, `user_id`, `type`, `guest`), `device_id`, `time <`; the
    /// identity the caveat oracle reads; the nonce `TokenNonce` reads.
    fn minted(
        &mut self,
        token: &str,
        token_type: TokenType,
        user: &(String, Option<String>, bool),
        nonce: &Nonce,
        expires_at_ms: Option<u64>,
    ) {
        let text = canonical_nonce(nonce);
        let view = parse_token(token.as_bytes()).expect("a minted token parses");
        let mut caveats = vec![
            format!("nonce = {text}"),
            "gen = 1".to_owned(),
            format!("user_id = {}", user.0),
            format!("type = {}", token_type.as_str()),
        ];
        if user.2 {
            caveats.push("guest = true".to_owned());
        }
        caveats.extend(user.1.as_ref().map(|d| format!("device_id = {d}")));
        caveats.extend(expires_at_ms.map(|at| format!("time < {at}")));
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
        check_nonce(&text);
        self.minted_nonces.insert(text.clone());
        self.pool.nonces.push(text);
    }

    fn remember(&mut self, access: &str, refresh: Option<&str>) {
        self.pool.access.push(access.to_owned());
        if let Some(refresh) = refresh {
            self.pool.refresh.push(refresh.to_owned());
        }
    }

    fn login(&mut self, flags: u8) {
        let request = SessionRequest {
            device_id: (flags & 4 == 0).then(|| "PHONE".to_owned()),
            refresh: flags & 1 == 0,
            guest: flags & 2 != 0,
        };
        let user_id = if flags & 8 != 0 { BOB } else { ALICE };
        let tokens = self.sessions.login(user_id, &request);
        let now = self.now();
        let stamp = self.stamp(&tokens.access_token);
        let access_lifetime = if request.refresh {
            Some(self.config.refreshable_lifetime_ms)
        } else {
            self.config.access_lifetime_ms
        };
        let session_expires = self.session_expiry(request.refresh, Some(0));
        assert_eq!(tokens.generation, 0);
        assert_eq!(tokens.session.as_u128(), stamp.session);
        assert_eq!(tokens.expires_in_ms, access_lifetime);
        assert_eq!(tokens.expires_at_ms, access_lifetime.map(|l| now + l));
        assert_eq!(tokens.session_expires_ms, session_expires);
        assert_eq!(tokens.refresh_token.is_some(), request.refresh);
        // A new session: it starts now, in the user's current epoch (their floor).
        let nonce = |kind| Nonce {
            session: stamp.session,
            generation: 0,
            issued_ms: now,
            kind,
            started_ms: now,
            epoch: self.model.floor(user_id),
            expires_ms: session_expires,
        };
        let (nonce_a, nonce_r) = (nonce('a'), nonce('r'));
        let who = (user_id.to_owned(), request.device_id.clone(), request.guest);
        self.minted(
            &tokens.access_token,
            TokenType::Access,
            &who,
            &nonce_a,
            access_lifetime.map(|l| now + l),
        );
        if let Some(refresh) = &tokens.refresh_token {
            self.minted(
                refresh,
                TokenType::Refresh,
                &who,
                &nonce_r,
                self.config.refresh_lifetime_ms.map(|l| now + l),
            );
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
        // session nonce of kind `r` (nothing else is exchanged, whatever nonce it carries
        // further on), that the store does not refuse.
        let now = self.now();
        let verdict = expected_verdict_at(token.as_bytes(), TokenType::Refresh, now);
        let (outcome, sessions) = match verdict {
            Verdict::Accept(identity) => {
                let at = self.position(token.as_bytes(), &identity, TokenType::Refresh);
                match at.nonce.filter(|nonce| nonce.kind == 'r') {
                    Some(nonce) => {
                        // The store keeps the session's state until its successor's tokens
                        // have expired too.
                        let expires = self.session_expiry(true, nonce.expires_ms);
                        let until = expires.map_or(u64::MAX, |at| at.saturating_add(LEEWAY_MS));
                        self.not_forgotten(at.session, &at, "refresh");
                        let outcome = self
                            .model
                            .refresh(&at, rotating, until)
                            .map(|generation| (identity, nonce, generation, expires));
                        (outcome, vec![at.session])
                    }
                    None => (Err(Judged::Revoked { for_good: true }), vec![]),
                }
            }
            Verdict::Expired(_) => (Err(Judged::Revoked { for_good: true }), vec![]),
            Verdict::Reject(_) => {
                let for_good = !has_time_window(token.as_bytes());
                (Err(Judged::Revoked { for_good }), vec![])
            }
        };
        trace!("  the model: {:?}", outcome.as_ref().map(|o| o.2));
        let (identity, nonce, generation, session_expires) = match outcome {
            Ok(expected) => expected,
            Err(judged) => {
                let refused = if rotating {
                    (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
                } else {
                    (StatusCode::FORBIDDEN, "M_FORBIDDEN")
                };
                assert_eq!(error, refused, "{json}");
                if judged == (Judged::Revoked { for_good: true }) {
                    self.refused_refresh.insert(token, sessions);
                }
                return;
            }
        };
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(
            !self.refused_refresh.contains_key(&token),
            "a refused refresh token was accepted"
        );

        // The answer: exactly these keys, and tokens of the next generation of the session,
        // minted at the very `now` the store was told about.
        let object = json.as_object().expect("an object");
        let access = object["access_token"].as_str().expect("access_token");
        let refresh = object["refresh_token"].as_str().expect("refresh_token");
        let lifetime = self.config.refreshable_lifetime_ms;
        if rotating {
            assert_eq!(object.len(), 3, "{:?}", object.keys());
            assert_eq!(object["expires_in_ms"].as_u64(), Some(lifetime));
        } else {
            assert_eq!(object.len(), 2, "{:?}", object.keys());
        }
        let stamp = self.stamp(access);
        assert_eq!(stamp.session, nonce.session);
        // The successor inherits the session, its start and its epoch; its expiry covers the
        // session's tokens so far and the new ones.
        let successor = |kind| Nonce {
            session: nonce.session,
            generation,
            issued_ms: now,
            kind,
            started_ms: nonce.started_ms,
            epoch: nonce.epoch,
            expires_ms: session_expires,
        };
        let who = (identity.user_id, identity.device_id, identity.is_guest);
        self.minted(
            access,
            TokenType::Access,
            &who,
            &successor('a'),
            Some(now + lifetime),
        );
        self.minted(
            refresh,
            TokenType::Refresh,
            &who,
            &successor('r'),
            self.config.refresh_lifetime_ms.map(|l| now + l),
        );
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
        let now = self.now();
        let stamp = self.stamp(&token);
        let nonce = Nonce {
            session: stamp.session,
            generation: 0,
            issued_ms: now,
            kind: 'l',
            started_ms: now,
            epoch: self.model.floor(user_id),
            expires_ms: Some(now + LOGIN_LIFETIME_MS),
        };
        self.minted(
            &token,
            TokenType::Login,
            &(user_id.to_owned(), None, false),
            &nonce,
            Some(now + LOGIN_LIFETIME_MS),
        );
        self.pool.login.push(token);
    }

    fn redeem(&mut self, raw: &[u8]) {
        let token = self.substitute(raw, false);
        let got = ready(self.sessions.redeem_login_token(&token, empty_parts()));
        trace!("  redeem: {}", if got.is_ok() { "used" } else { "refused" });
        let now = self.now();
        // The model: a login token that verifies now; known by its session nonce (kind `l`; one
        // of another kind is refused) or, minted elsewhere, by its chain through its first
        // `time <` (refused without one); the store's check passes; its first use.
        let (expected, sessions) = match expected_verdict_at(&token, TokenType::Login, now) {
            Verdict::Accept(identity) => {
                let at = self.position(&token, &identity, TokenType::Login);
                let once = match at.nonce {
                    Some(nonce) if nonce.kind == 'l' => Some((at.session, at.keep_until)),
                    Some(_) => None,
                    None => Self::chain_session(&token),
                };
                match once {
                    None => (Err(true), vec![]),
                    Some((once, keep_until)) => {
                        self.not_forgotten(at.session, &at, "redeem_login_token (check)");
                        self.not_forgotten(once, &at, "redeem_login_token (use)");
                        let sessions = vec![at.session, once];
                        match self.model.judge(&at) {
                            Judged::Revoked { for_good } => (Err(for_good), sessions),
                            Judged::Valid => {
                                match self.model.consume(once, &at.user_id, keep_until) {
                                    true => (Ok(identity), sessions),
                                    false => (Err(true), sessions),
                                }
                            }
                        }
                    }
                }
            }
            Verdict::Expired(_) => (Err(true), vec![]),
            Verdict::Reject(_) => (Err(!has_time_window(&token)), vec![]),
        };
        trace!("  the model: {:?}", expected.as_ref().map(|_| ()));
        match (got, expected) {
            (Ok(user), Ok(identity)) => {
                assert_eq!(identity_of(&user), identity);
                self.same_token_id(&user, &token, &identity);
                assert!(
                    !self.refused_login.contains_key(&token),
                    "a refused login token was accepted"
                );
                // Single use.
                let again = ready(self.sessions.redeem_login_token(&token, empty_parts()));
                assert!(matches!(again, Err(ExchangeError::Invalid)), "{again:?}");
                self.refused_login.insert(token, sessions);
            }
            (Err(ExchangeError::Invalid), Err(for_good)) => {
                if for_good {
                    self.refused_login.insert(token, sessions);
                }
            }
            (got, expected) => panic!("redeem_login_token: {got:?}, the model says {expected:?}"),
        }
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

        let now = self.now();
        let verdict = expected_verdict_at(&token, TokenType::Access, now);
        // The store is asked about every token whose signature and caveats hold, expired or not.
        let expired = !matches!(verdict, Verdict::Accept(_));
        let (identity, at, judged) = match verdict {
            Verdict::Accept(identity) | Verdict::Expired(identity) => {
                let at = self.position(&token, &identity, TokenType::Access);
                if !expired {
                    self.not_forgotten(at.session, &at, "the layer");
                }
                let judged = self.model.judge(&at);
                (Some(identity), Some(at), judged)
            }
            Verdict::Reject(_) => {
                let for_good = !has_time_window(&token);
                (None, None, Judged::Revoked { for_good })
            }
        };
        let sessions: Vec<u128> = at.iter().map(|at| at.session).collect();
        trace!("  the model: {judged:?}, expired {expired}");
        if !reached {
            let json: Value = serde_json::from_slice(&answer).expect("rejections are JSON");
            let soft_logout = json.get("soft_logout").is_some();
            assert_eq!(
                (status, json["errcode"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
            );
            self.repeats_no_token(&answer, std::str::from_utf8(&token).ok());
            match judged {
                Judged::Revoked { for_good } => {
                    assert!(!soft_logout, "a revoked or invalid token: no soft logout");
                    if for_good {
                        self.refused_unknown.insert(token, sessions);
                    }
                }
                Judged::Valid => {
                    assert!(expired && !on_logout && soft_logout, "{json}");
                    self.refused_expired.insert(token);
                }
            }
            return;
        }
        let (Some(identity), Some(at), Judged::Valid) = (identity, at, judged) else {
            panic!("{status}: the model refuses");
        };
        assert!(!expired || on_logout, "{status}: expired");
        assert!(
            !self.refused_unknown.contains_key(&token),
            "a refused token passed"
        );
        assert!(
            on_logout || !self.refused_expired.contains(&token),
            "an expired token passed"
        );
        let user = user.expect("an identity");
        assert_eq!(identity_of(&user), identity);
        assert_eq!(user.credential(), Credential::Macaroon);
        self.same_token_id(&user, &token, &identity);
        if op != b'O' && op != b'Z' {
            return;
        }
        // Both log out the session of the token that asked (for `/logout/all`, the spec:
        // "including the access token that made this request"); `/logout/all` first raises the
        // user's floor above every session's epoch handed out so far (the epoch of a session
        // that begins later is the new floor: it is spared).
        match op {
            b'O' => ready(self.sessions.logout(&user)).unwrap(),
            _ => {
                ready(self.sessions.logout_all(&user)).unwrap();
                self.model.raise_floor(&at.user_id, now);
                assert_eq!(
                    self.store.user_floor(&at.user_id),
                    self.model.floor(&at.user_id)
                );
            }
        }
        self.model.logout(at.session, &at.user_id, at.keep_until);
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
        trace!(
            "  sweep: {} forgotten, {} kept",
            gone.len(),
            self.model.sessions.len()
        );
        if gone.is_empty() {
            return;
        }
        // A token refused by a state now forgotten is judged afresh.
        let judged_again = |sessions: &mut Vec<u128>| !sessions.iter().any(|s| gone.contains(s));
        self.refused_refresh.retain(|_, s| judged_again(s));
        self.refused_login.retain(|_, s| judged_again(s));
        self.refused_unknown.retain(|_, s| judged_again(s));
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
                check_nonce(&String::from_utf8_lossy(&text));
            }
            _ => {}
        }
        // The store holds state for exactly the sessions the model does.
        assert_eq!(
            self.store.len(),
            self.model.sessions.len(),
            "sessions stored"
        );
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
