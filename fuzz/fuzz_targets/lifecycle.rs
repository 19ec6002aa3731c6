//! Target 5: the token lifecycle (`Sessions`), driven by a script, against a model of the
//! README's "Token lifecycle" table.
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
//! | `+<ms>` | the clock moves forward |
//! | `N<text>` | `TokenNonce::parse` |
//!
//! `$` placeholders stand for tokens this run minted (`$R0` the newest refresh token, `$R1` the
//! one before, ...; see [`Run::placeholder`]): valid, used, expired, forged, attenuated,
//! re-encoded, access and login tokens where refresh tokens belong. In bodies they are written
//! JSON-escaped.
//!
//! Checked: never a panic, never a 5xx; every answer is the model's (status, errcode, the
//! refresh answer's keys, the successor's user, device, guest flag, nonce and expiry, checked
//! with the independent verdict of `tests/oracle`); a token once refused stays refused (refresh
//! endpoints, login tokens, the layer); a login token works once; refusals repeat no token;
//! `TokenNonce::parse` agrees with the README's nonce grammar, round-trips, and reads every nonce
//! the issuer mints.
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
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::fuzzing::{parse_token, sign};
use tower_matrix_auth::{
    attenuate, Credential, ExchangeError, Format, GuestPolicy, Issuer, KeyRing, MacaroonSecret,
    ManualClock, MatrixAuthLayer, MatrixUser, MemoryStore, NonceKind, SessionRequest, Sessions,
    TokenNonce, TokenType, Verifier,
};
use tower_matrix_auth_fuzz::oracle::{Identity, Verdict};
use tower_matrix_auth_fuzz::{empty_parts, expected_verdict_at, identity_of, keys, ready};
use tower_matrix_auth_fuzz::{FORGER, NOW_MS};

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

fn shared_keys() -> &'static KeyRing {
    static KEYS: OnceLock<KeyRing> = OnceLock::new();
    KEYS.get_or_init(keys)
}

fn forger() -> &'static MacaroonSecret {
    static FORGER_SECRET: OnceLock<MacaroonSecret> = OnceLock::new();
    FORGER_SECRET.get_or_init(|| MacaroonSecret::from_passphrase(FORGER))
}

// ---- The nonce grammar, from the README ---------------------------------------------------------

/// `<session: 32 hex>.<generation>.<issued ms>.<a|r|l>`: the fields, or `None`.
fn nonce_grammar(text: &str) -> Option<(u128, u32, u64, char)> {
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
    let [session, generation, issued, kind] = fields.as_slice() else {
        return None;
    };
    if session.len() != 32 {
        return None;
    }
    let session = session
        .chars()
        .try_fold(0u128, |n, c| Some(n << 4 | u128::from(c.to_digit(16)?)))?;
    let generation = u32::try_from(decimal(generation)?).ok()?;
    let issued = decimal(issued)?;
    let kind = match *kind {
        "a" => 'a',
        "r" => 'r',
        "l" => 'l',
        _ => return None,
    };
    Some((session, generation, issued, kind))
}

fn letter(kind: NonceKind) -> char {
    match kind {
        NonceKind::Access => 'a',
        NonceKind::Refresh => 'r',
        NonceKind::Login => 'l',
    }
}

/// The nonce the issuer writes, spelled from the README.
fn canonical_nonce(session: u128, generation: u32, issued_ms: u64, kind: char) -> String {
    format!("{session:032x}.{generation}.{issued_ms}.{kind}")
}

/// `TokenNonce::parse` against the grammar, and the round trip of whatever parses.
fn check_nonce(text: &str) {
    let parsed = TokenNonce::parse(text);
    let fields = parsed.map(|n| {
        (
            n.session.as_u128(),
            n.generation,
            n.issued_ms,
            letter(n.kind),
        )
    });
    assert_eq!(fields, nonce_grammar(text), "TokenNonce::parse({text:?})");
    if let Some(nonce) = parsed {
        let written = nonce.to_string();
        let (session, generation, issued_ms, kind) = fields.unwrap();
        assert_eq!(
            written,
            canonical_nonce(session, generation, issued_ms, kind)
        );
        assert_eq!(TokenNonce::parse(&written), Some(nonce));
        if text.bytes().all(|b| !b.is_ascii_uppercase()) && written.len() == text.len() {
            // Same length, lowercase: no leading zeros either, so the very same text.
            assert_eq!(written, text);
        }
    }
}

// ---- The model: the README's lifecycle table --------------------------------------------------

/// What the store knows of one session.
#[derive(Debug, Clone, Copy)]
struct State {
    live: u32,
    /// Minted by a rotating refresh, not used yet.
    pending: Option<u32>,
    next: u32,
    logged_out: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            live: 0,
            pending: None,
            next: 1,
            logged_out: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Valid,
    /// Valid, and its first use revokes the generations before it.
    FirstUse,
    Revoked,
}

impl State {
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

    fn first_use(&mut self, generation: u32) {
        self.live = generation;
        self.pending = None;
    }
}

/// A token's place: its session, generation and minting time, as its nonce says, and the
/// operation of the script that minted it (tokens of this run).
#[derive(Debug, Clone, Copy)]
struct Position {
    session: u128,
    generation: u32,
    issued_ms: u64,
    minted_at: Option<usize>,
}

/// The last "log out everywhere" of a user.
#[derive(Debug, Clone, Copy)]
struct Everywhere {
    /// The operation that asked.
    op: usize,
    /// The clock then.
    clock_ms: u64,
    /// How many there were in all: how far the issuer may stamp tokens ahead of the clock.
    count: u64,
}

#[derive(Default)]
struct Model {
    sessions: HashMap<u128, State>,
    /// Which operation minted each (session, generation) of this run.
    minted_at: HashMap<(u128, u32), usize>,
    everywhere: HashMap<String, Everywhere>,
}

impl Model {
    /// Whether "log out everywhere" revoked the token: everything of the user minted by an
    /// earlier operation, even within the same millisecond, and nothing minted after it. Tokens
    /// minted elsewhere were minted at the time their nonce says (0 without one of ours), which
    /// for the seeds' is before the run.
    fn logged_out_everywhere(&self, user_id: &str, at: Position) -> bool {
        self.everywhere
            .get(user_id)
            .is_some_and(|e| match at.minted_at {
                Some(op) => op < e.op,
                None => at.issued_ms < e.clock_ms,
            })
    }

    /// The store's verdict on a verified token, recording a first use.
    fn judge(&mut self, user_id: &str, at: Position) -> bool {
        if self.logged_out_everywhere(user_id, at) {
            return false;
        }
        let state = self.sessions.entry(at.session).or_default();
        match state.standing(at.generation) {
            Standing::Revoked => false,
            Standing::FirstUse => {
                state.first_use(at.generation);
                true
            }
            Standing::Valid => true,
        }
    }

    /// A refresh with a verified refresh token: the generation it mints, if any.
    fn refresh(&mut self, user_id: &str, at: Position, rotating: bool) -> Option<u32> {
        if !self.judge(user_id, at) {
            return None;
        }
        let state = self.sessions.entry(at.session).or_default();
        let successor = state.next;
        state.next = state.next.checked_add(1)?;
        if rotating {
            state.pending = Some(successor);
        } else {
            state.live = successor;
            state.pending = None;
        }
        Some(successor)
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

/// What the README says about a refresh body: the token, or the errcode of the 400.
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
    format: Format,
    refresh_lifetime_ms: Option<u64>,
    access_lifetime_ms: Option<u64>,
    refreshable_lifetime_ms: u64,
    location: bool,
}

impl Config {
    fn of(byte: u8) -> Self {
        Self {
            format: [Format::V1, Format::V2, Format::V2Json, Format::V1][usize::from(byte & 3)],
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

/// Tokens this run minted, oldest first.
#[derive(Default)]
struct Pool {
    access: Vec<String>,
    refresh: Vec<String>,
    login: Vec<String>,
    nonces: Vec<String>,
}

struct Run {
    config: Config,
    /// The operation of the script being run.
    op: usize,
    clock: ManualClock,
    sessions: Sessions,
    layer: Whoami,
    model: Model,
    pool: Pool,
    /// Refresh tokens a refresh endpoint refused (not for the body or the rate limit).
    refused_refresh: HashSet<String>,
    /// Login tokens `redeem_login_token` refused.
    refused_login: HashSet<Vec<u8>>,
    /// Tokens the layer refused as unknown or revoked (anywhere) or as expired (off `/logout`).
    refused_unknown: HashSet<Vec<u8>>,
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
    Some(sign(forger(), &view.identifier, &caveats, Format::V1))
}

impl Run {
    fn new(config: Config) -> Self {
        let clock = ManualClock::new(NOW_MS);
        let keys = shared_keys().clone();
        let verifier = Verifier::new(keys.clone()).clock(clock.clone());
        let mut issuer = Issuer::new(keys)
            .clock(clock.clone())
            .format(config.format)
            .refresh_lifetime_ms(config.refresh_lifetime_ms)
            .access_lifetime_ms(config.access_lifetime_ms)
            .refreshable_access_lifetime_ms(config.refreshable_lifetime_ms);
        if config.location {
            issuer = issuer.location("example.org");
        }
        let store = MemoryStore::new().with_clock(clock.clone());
        let sessions = Sessions::new(issuer, verifier.clone(), store).rate_limit(rate_limit);
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
            op: 0,
            clock,
            sessions,
            layer: BoxCloneService::new(layer),
            model: Model::default(),
            pool: Pool::default(),
            refused_refresh: HashSet::new(),
            refused_login: HashSet::new(),
            refused_unknown: HashSet::new(),
            refused_expired: HashSet::new(),
        }
    }

    fn now(&self) -> u64 {
        use tower_matrix_auth::Clock as _;
        self.clock.now_ms()
    }

    /// `$<letter><digit>`: a token of this run, `None` when the pool has none.
    ///
    /// `R`/`A`/`G`: a refresh, access, login token as minted; refresh tokens changed: `T`
    /// attenuated with a later `time <`, `E` attenuated to have expired, `W` in standard base64,
    /// `F` a flipped signature bit, `K` signed with a forger's key, `X` attenuated with
    /// `type = access`, `Y` with a second `nonce` (the first one counts); `M` an access token
    /// attenuated with another `user_id`; `n` a minted nonce; `H` 32 KiB of spaces; `Q` a token
    /// over the length limit.
    fn placeholder(&self, letter: u8, digit: Option<u8>) -> Option<String> {
        let refresh = || pick(&self.pool.refresh, digit);
        let now = self.now();
        match letter {
            b'R' => refresh().cloned(),
            b'A' => pick(&self.pool.access, digit).cloned(),
            b'G' => pick(&self.pool.login, digit).cloned(),
            b'n' => pick(&self.pool.nonces, digit).cloned(),
            b'T' => attenuate(refresh()?, &format!("time < {}", now + 600_000)),
            b'E' => attenuate(refresh()?, &format!("time < {now}")),
            b'W' => reencoded(refresh()?),
            b'F' => flipped(refresh()?),
            b'K' => forged(refresh()?),
            b'X' => attenuate(refresh()?, "type = access"),
            b'Y' => attenuate(
                refresh()?,
                &format!("nonce = {}", canonical_nonce(0x5eed, 0, now, 'r')),
            ),
            b'M' => attenuate(
                pick(&self.pool.access, digit)?,
                "user_id = @mallory:example.org",
            ),
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

    /// Where a verified token sits: from its nonce when it has one of ours, otherwise (tokens
    /// minted elsewhere) a session of its own named by its token id, generation 0, minted at 0.
    fn position(&self, token: &[u8], identity: &Identity, token_type: TokenType) -> Position {
        if let Some((session, generation, issued_ms, _)) =
            identity.nonce.as_deref().and_then(nonce_grammar)
        {
            return Position {
                session,
                generation,
                issued_ms,
                minted_at: self.model.minted_at.get(&(session, generation)).copied(),
            };
        }
        // Its id does not depend on the time: verify with a leeway that makes every time hold.
        let user = Verifier::new(shared_keys().clone())
            .clock(self.clock.clone())
            .leeway_ms(u64::MAX)
            .verify(token, token_type, empty_parts())
            .expect("the oracle accepted it");
        Position {
            session: u128::from_le_bytes(*user.token_id().as_bytes()),
            generation: 0,
            issued_ms: 0,
            minted_at: None,
        }
    }

    /// The minting time a fresh token of `user_id` says (its first nonce, read here): the clock,
    /// or up to a millisecond later for each "log out everywhere" of theirs, so that a login
    /// right after one is not caught by it.
    fn stamp(&self, token: &str, user_id: &str) -> u64 {
        let view = parse_token(token.as_bytes()).expect("a minted token parses");
        let nonce = view
            .caveats
            .iter()
            .find_map(|(id, _)| id.strip_prefix(b"nonce = "))
            .expect("a minted token has a nonce");
        let (_, _, issued_ms, _) = nonce_grammar(std::str::from_utf8(nonce).unwrap())
            .expect("a minted nonce follows the grammar");
        let now = self.now();
        let ahead = self.model.everywhere.get(user_id).map_or(0, |e| e.count);
        assert!(
            (now..=now + ahead).contains(&issued_ms),
            "minted at {issued_ms}, the clock says {now}"
        );
        issued_ms
    }

    /// The identity a freshly minted token must have.
    fn minted(
        &self,
        token: &str,
        token_type: TokenType,
        user: &(String, Option<String>, bool),
        nonce: String,
        expires_at_ms: Option<u64>,
    ) {
        let expected = Identity {
            user_id: user.0.clone(),
            device_id: user.1.clone(),
            nonce: Some(nonce.clone()),
            is_guest: user.2,
            token_type: token_type.as_str().to_owned(),
            expires_at_ms,
        };
        assert_eq!(
            expected_verdict_at(token.as_bytes(), token_type, self.now()),
            Verdict::Accept(expected),
            "a minted {token_type:?} token"
        );
        // What the issuer mints always parses, to what it minted.
        let verified = self
            .sessions
            .verifier()
            .verify(token.as_bytes(), token_type, empty_parts())
            .expect("a minted token verifies");
        let parsed = TokenNonce::of(&verified).expect("a minted nonce parses");
        assert_eq!(parsed.to_string(), nonce);
        check_nonce(&nonce);
    }

    fn remember(&mut self, access: &str, refresh: Option<&str>, nonces: [String; 2]) {
        self.pool.access.push(access.to_owned());
        if let Some(refresh) = refresh {
            self.pool.refresh.push(refresh.to_owned());
        }
        self.pool.nonces.extend(nonces);
    }

    fn login(&mut self, flags: u8) {
        let request = SessionRequest {
            device_id: (flags & 4 == 0).then(|| "PHONE".to_owned()),
            refresh: flags & 1 == 0,
            guest: flags & 2 != 0,
        };
        let user_id = if flags & 8 != 0 { BOB } else { ALICE };
        let tokens = self.sessions.login(user_id, &request);
        let now = self.stamp(&tokens.access_token, user_id);
        let access_lifetime = if request.refresh {
            Some(self.config.refreshable_lifetime_ms)
        } else {
            self.config.access_lifetime_ms
        };
        assert_eq!(tokens.generation, 0);
        assert_eq!(tokens.expires_in_ms, access_lifetime);
        assert_eq!(tokens.refresh_token.is_some(), request.refresh);
        let session = tokens.session.as_u128();
        let who = (user_id.to_owned(), request.device_id.clone(), request.guest);
        let nonce_a = canonical_nonce(session, 0, now, 'a');
        let nonce_r = canonical_nonce(session, 0, now, 'r');
        self.minted(
            &tokens.access_token,
            TokenType::Access,
            &who,
            nonce_a.clone(),
            access_lifetime.map(|l| now + l),
        );
        if let Some(refresh) = &tokens.refresh_token {
            self.minted(
                refresh,
                TokenType::Refresh,
                &who,
                nonce_r.clone(),
                self.config.refresh_lifetime_ms.map(|l| now + l),
            );
        }
        self.model.minted_at.insert((session, 0), self.op);
        self.remember(
            &tokens.access_token,
            tokens.refresh_token.as_deref(),
            [nonce_a, nonce_r],
        );
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

        let now = self.now();
        let expected = match expected_verdict_at(token.as_bytes(), TokenType::Refresh, now) {
            Verdict::Accept(identity) => {
                let at = self.position(token.as_bytes(), &identity, TokenType::Refresh);
                self.model
                    .refresh(&identity.user_id, at, rotating)
                    .map(|generation| (identity, at, generation))
            }
            Verdict::Expired(_) | Verdict::Reject(_) => None,
        };
        let Some((identity, at, generation)) = expected else {
            let refused = if rotating {
                (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN")
            } else {
                (StatusCode::FORBIDDEN, "M_FORBIDDEN")
            };
            assert_eq!(error, refused, "{json}");
            self.refused_refresh.insert(token);
            return;
        };
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(
            !self.refused_refresh.contains(&token),
            "a refused refresh token was accepted"
        );

        // The answer: exactly these keys, and tokens of the next generation of the session.
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
        let stamp = self.stamp(access, &identity.user_id);
        let who = (identity.user_id, identity.device_id, identity.is_guest);
        let nonce_a = canonical_nonce(at.session, generation, stamp, 'a');
        let nonce_r = canonical_nonce(at.session, generation, stamp, 'r');
        self.minted(
            access,
            TokenType::Access,
            &who,
            nonce_a.clone(),
            Some(stamp + lifetime),
        );
        self.minted(
            refresh,
            TokenType::Refresh,
            &who,
            nonce_r.clone(),
            self.config.refresh_lifetime_ms.map(|l| stamp + l),
        );
        self.model
            .minted_at
            .insert((at.session, generation), self.op);
        let (access, refresh) = (access.to_owned(), refresh.to_owned());
        self.remember(&access, Some(&refresh), [nonce_a, nonce_r]);
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
        for token in pool.access.iter().chain(&pool.refresh).chain(&pool.login) {
            assert!(!contains(token.as_bytes()), "a refusal repeats a token");
        }
    }

    fn login_token(&mut self, flags: u8) {
        let user_id = if flags & 1 != 0 { BOB } else { ALICE };
        let (token, lifetime) = self.sessions.login_token(user_id);
        assert_eq!(lifetime, LOGIN_LIFETIME_MS);
        let now = self.stamp(&token, user_id);
        let verified = self
            .sessions
            .verifier()
            .verify(token.as_bytes(), TokenType::Login, empty_parts())
            .expect("a minted login token verifies");
        let nonce = TokenNonce::of(&verified).expect("a minted nonce parses");
        assert_eq!((nonce.generation, nonce.issued_ms), (0, now));
        assert_eq!(nonce.kind, NonceKind::Login);
        let session = nonce.session.as_u128();
        self.model.minted_at.insert((session, 0), self.op);
        let nonce = canonical_nonce(session, 0, now, 'l');
        self.minted(
            &token,
            TokenType::Login,
            &(user_id.to_owned(), None, false),
            nonce.clone(),
            Some(now + LOGIN_LIFETIME_MS),
        );
        self.pool.login.push(token);
        self.pool.nonces.push(nonce);
    }

    fn redeem(&mut self, raw: &[u8]) {
        let token = self.substitute(raw, false);
        let got = ready(self.sessions.redeem_login_token(&token, empty_parts()));
        let now = self.now();
        let expected = match expected_verdict_at(&token, TokenType::Login, now) {
            Verdict::Accept(identity) => {
                let at = self.position(&token, &identity, TokenType::Login);
                let valid = self.model.judge(&identity.user_id, at);
                let state = self.model.sessions.entry(at.session).or_default();
                let first = valid && !state.logged_out;
                state.logged_out = true;
                first.then_some(identity)
            }
            Verdict::Expired(_) | Verdict::Reject(_) => None,
        };
        match (got, expected) {
            (Ok(user), Some(identity)) => {
                assert_eq!(identity_of(&user), identity);
                assert!(
                    !self.refused_login.contains(&token),
                    "a refused login token was accepted"
                );
                // Single use.
                let again = ready(self.sessions.redeem_login_token(&token, empty_parts()));
                assert!(matches!(again, Err(ExchangeError::Invalid)), "{again:?}");
                self.refused_login.insert(token);
            }
            (Err(ExchangeError::Invalid), None) => {
                self.refused_login.insert(token);
            }
            (got, expected) => panic!("redeem_login_token: {got:?}, the model says {expected:?}"),
        }
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

        let now = self.now();
        let verdict = expected_verdict_at(&token, TokenType::Access, now);
        let rejected = matches!(verdict, Verdict::Reject(_));
        let (identity, expired) = match verdict {
            Verdict::Accept(identity) => (identity, false),
            Verdict::Expired(identity) => (identity, true),
            Verdict::Reject(_) => (
                Identity {
                    user_id: String::new(),
                    device_id: None,
                    nonce: None,
                    is_guest: false,
                    token_type: String::new(),
                    expires_at_ms: None,
                },
                true,
            ),
        };
        let valid = !rejected && {
            let at = self.position(&token, &identity, TokenType::Access);
            self.model.judge(&identity.user_id, at)
        };
        if !reached {
            let json: Value = serde_json::from_slice(&answer).expect("rejections are JSON");
            let soft_logout = json.get("soft_logout").is_some();
            assert_eq!(
                (status, json["errcode"].as_str()),
                (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"))
            );
            self.repeats_no_token(&answer, std::str::from_utf8(&token).ok());
            if !valid {
                assert!(!soft_logout, "a revoked or invalid token: no soft logout");
                self.refused_unknown.insert(token);
            } else {
                assert!(expired && !on_logout && soft_logout, "{json}");
                self.refused_expired.insert(token);
            }
            return;
        }
        assert!(
            valid && (!expired || on_logout),
            "{status}: the model refuses"
        );
        assert!(
            !self.refused_unknown.contains(&token),
            "a refused token passed"
        );
        assert!(
            on_logout || !self.refused_expired.contains(&token),
            "an expired token passed"
        );
        let user = user.expect("an identity");
        assert_eq!(identity_of(&user), identity);
        assert_eq!(user.credential(), Credential::Macaroon);
        if op != b'O' && op != b'Z' {
            return;
        }
        // Both log out the session of the token that asked (for `/logout/all`, the spec:
        // "including the access token that made this request").
        match op {
            b'O' => ready(self.sessions.logout(&user)).unwrap(),
            _ => ready(self.sessions.logout_all(&user)).unwrap(),
        }
        let at = self.position(&token, &identity, TokenType::Access);
        self.model
            .sessions
            .entry(at.session)
            .or_default()
            .logged_out = true;
        if op == b'Z' {
            // And every token of the user minted by an earlier operation (even this very
            // millisecond), none minted by a later one.
            let count = self
                .model
                .everywhere
                .get(&identity.user_id)
                .map_or(1, |e| e.count + 1);
            let everywhere = Everywhere {
                op: self.op,
                clock_ms: now,
                count,
            };
            self.model.everywhere.insert(identity.user_id, everywhere);
        }
    }

    fn step(&mut self, line: &[u8]) {
        let Some((&op, rest)) = line.split_first() else {
            return;
        };
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
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, script)) = data.split_first() else {
        return;
    };
    let mut run = Run::new(Config::of(config));
    for (op, line) in script.split(|&b| b == b'\n').take(MAX_OPS).enumerate() {
        run.op = op;
        run.step(line);
    }
});
