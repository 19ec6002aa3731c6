//! Property tests (proptest) of the token lifecycle: random sequences of logins, uses of access
//! tokens, refreshes on both endpoints, logouts, log-outs everywhere, clock moves and sweeps, run
//! against the real `Sessions` engine behind the real layer, over `MemoryStore` and over
//! `PostgresStore`; every answer is compared with `Model`, a small model written from the docs'
//! "Token lifecycle" table and rules (not from `SessionState`). And: N concurrent single-use
//! refreshes of one refresh token have exactly one winner, on both stores (two PostgreSQL stores,
//! as two processes, for the database).
//!
//! The PostgreSQL properties need the server `scripts/postgres.sh` starts (`./scripts/test.sh`
//! does), as `tests/it/postgres.rs` does; they run fewer cases. Case counts are per property, four
//! times more in release builds; `PROPTEST_CASES` overrides them all, e.g.
//! `PROPTEST_CASES=2000 cargo test --release --test lifecycle_properties`.
#![cfg(all(feature = "postgres", feature = "axum"))]

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::{service_fn, Layer, ServiceExt};
use tower_matrix_auth::{
    hooks::{Clock, ManualClock, SystemClock},
    lifecycle::{SessionId, SessionRequest, TokenNonce},
    store::{RefreshMode, TokenStore},
    Issuer, MatrixAuthLayer, MatrixUser, MemoryStore, PostgresStore, Sessions, TokenType, Verifier,
};

use crate::common::keys;

/// Lifetime of an access token issued with a refresh token.
const ACCESS_MS: u64 = 60_000;
/// Lifetime of an access token issued without one.
const PLAIN_MS: u64 = 120_000;
/// Lifetime of a refresh token (the longest of a session: how long its state is kept).
const REFRESH_MS: u64 = 180_000;

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
const LOGOUT: &str = "/_matrix/client/v3/logout";
const LOGOUT_ALL: &str = "/_matrix/client/v3/logout/all";
const USERS: usize = 2;

/// `PROPTEST_CASES` if set, else `cases` (four times as many in release builds).
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            cases
        } else {
            cases * 4
        });
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

// ---- Operations ---------------------------------------------------------------------------------

/// A token of one login: which login (of those so far) and which of its generations.
#[derive(Debug, Clone, Copy)]
struct Pick {
    login: Index,
    generation: Generation,
}

/// The newest generations are picked more often, so that chains of refreshes get long and the
/// old token of a rotating refresh gets refreshed again.
#[derive(Debug, Clone, Copy)]
enum Generation {
    /// The newest but `n`.
    Back(usize),
    Any(Index),
}

/// One step. Debug shows indices only, never a token.
#[derive(Debug, Clone)]
enum Op {
    Login {
        user: usize,
        refresh: bool,
    },
    /// `GET whoami` with the access token.
    Use(Pick),
    /// The refresh token at `/v3/refresh` (Rotating) or `/r0/tokenrefresh` (SingleUse).
    Refresh(Pick, RefreshMode),
    /// `POST /logout` with the access token.
    Logout(Pick),
    /// `POST /logout/all` with the access token.
    LogoutAll(Pick),
    /// The refresh token presented to the layer as an access token.
    RefreshAsAccess(Pick),
    /// The access token presented to `/v3/refresh`.
    AccessAsRefresh(Pick),
    Advance(u64),
    /// `MemoryStore::sweep` / `PostgresStore::purge_expired`.
    Sweep,
}

fn pick() -> impl Strategy<Value = Pick> {
    let generation = prop_oneof![
        2 => Just(Generation::Back(0)),
        1 => Just(Generation::Back(1)),
        2 => any::<Index>().prop_map(Generation::Any),
    ];
    (any::<Index>(), generation).prop_map(|(login, generation)| Pick { login, generation })
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![Just(RefreshMode::Rotating), Just(RefreshMode::SingleUse)];
    let advance = prop_oneof![
        2 => Just(0u64),
        2 => 1u64..=2,
        4 => 1u64..=70_000,
        1 => 100_000u64..=250_000,
    ];
    prop_oneof![
        3 => (0..USERS, any::<bool>()).prop_map(|(user, refresh)| Op::Login { user, refresh }),
        8 => pick().prop_map(Op::Use),
        8 => (pick(), mode).prop_map(|(p, m)| Op::Refresh(p, m)),
        1 => pick().prop_map(Op::Logout),
        1 => pick().prop_map(Op::LogoutAll),
        1 => pick().prop_map(Op::RefreshAsAccess),
        1 => pick().prop_map(Op::AccessAsRefresh),
        3 => advance.prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..48)
}

// ---- The model: the docs' rules, nothing from src/store ------------------------------------

/// What the docs say about one login.
#[derive(Debug, Clone)]
struct ModelLogin {
    user: usize,
    refreshable: bool,
    /// Generations whose tokens are valid (expiry aside): after a `/v3/refresh` the old one and
    /// its successor, otherwise one.
    valid: BTreeSet<u32>,
    /// The successor of a `/v3/refresh` not used yet: its first use revokes every other.
    pending: Option<u32>,
    /// The generation the next refresh mints.
    next: u32,
    logged_out: bool,
    /// Expiry of the longest-lived token minted for this login so far.
    last_expiry_ms: u64,
    /// A sweep ran after every token of this login had expired: the store may have forgotten
    /// it, which the docs allow ("only until every token it speaks for would have expired").
    forgettable: bool,
}

/// When a token was minted: the instant in its nonce (for expiry), and the step of the sequence
/// (for `/logout/all`, which revokes what was minted before the request, however close).
#[derive(Debug, Clone, Copy)]
struct Stamp {
    issued_ms: u64,
    step: u64,
}

#[derive(Debug)]
struct Model {
    now_ms: u64,
    /// The step being run (from 1).
    step: u64,
    /// Per user: tokens minted before this step are revoked (`/logout/all`).
    revoked_before_step: [u64; USERS],
    /// Per user: how many times they logged out everywhere.
    logouts_all: [u64; USERS],
    logins: Vec<ModelLogin>,
}

/// The answer the layer gives to an access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// 401 M_UNKNOWN_TOKEN, no soft logout.
    Unknown,
    /// 401 M_UNKNOWN_TOKEN with `soft_logout: true`.
    SoftLogout,
    /// Either of the two 401s: a forgettable login whose tokens have all expired.
    Any401,
}

impl Model {
    fn new(now_ms: u64) -> Self {
        Self {
            now_ms,
            step: 0,
            revoked_before_step: [0; USERS],
            logouts_all: [0; USERS],
            logins: Vec::new(),
        }
    }

    fn login(&mut self, user: usize, refreshable: bool) {
        self.logins.push(ModelLogin {
            user,
            refreshable,
            valid: BTreeSet::from([0]),
            pending: None,
            next: 1,
            logged_out: false,
            last_expiry_ms: 0,
            forgettable: false,
        });
    }

    /// Tokens of `login` were minted at `issued_ms`.
    fn minted(&mut self, login: usize, issued_ms: u64) {
        let l = &mut self.logins[login];
        let lifetime = if l.refreshable { REFRESH_MS } else { PLAIN_MS };
        l.last_expiry_ms = l.last_expiry_ms.max(issued_ms + lifetime);
    }

    fn revoked(&self, login: usize, generation: u32, stamp: Stamp) -> bool {
        let l = &self.logins[login];
        l.logged_out
            || !l.valid.contains(&generation)
            || stamp.step < self.revoked_before_step[l.user]
    }

    fn access_expired(&self, login: usize, issued_ms: u64) -> bool {
        let lifetime = if self.logins[login].refreshable {
            ACCESS_MS
        } else {
            PLAIN_MS
        };
        self.now_ms >= issued_ms + lifetime
    }

    /// A token of `generation` was presented and is valid: if it is the pending successor, this
    /// is its first use and every other generation dies.
    fn used(&mut self, login: usize, generation: u32) {
        let l = &mut self.logins[login];
        if l.pending == Some(generation) {
            l.valid = BTreeSet::from([generation]);
            l.pending = None;
        }
    }

    /// An access token at an authenticated endpoint (`allow_expired`: a logout route).
    fn present_access(
        &mut self,
        login: usize,
        generation: u32,
        stamp: Stamp,
        allow_expired: bool,
    ) -> Answer {
        let expired = self.access_expired(login, stamp.issued_ms);
        if expired && self.logins[login].forgettable {
            return Answer::Any401;
        }
        if self.revoked(login, generation, stamp) {
            // Revoked beats expired: a soft logout would invite a refresh that cannot work.
            return Answer::Unknown;
        }
        self.used(login, generation);
        if expired && !allow_expired {
            Answer::SoftLogout
        } else {
            Answer::Ok
        }
    }

    /// A refresh token at a refresh endpoint: the generation minted, or `None` (refused).
    fn refresh(
        &mut self,
        login: usize,
        generation: u32,
        stamp: Stamp,
        mode: RefreshMode,
    ) -> Option<u32> {
        if self.now_ms >= stamp.issued_ms + REFRESH_MS || self.revoked(login, generation, stamp) {
            return None;
        }
        self.used(login, generation);
        let l = &mut self.logins[login];
        let successor = l.next;
        l.next += 1;
        match mode {
            // The old pair stays valid until the successor is first used; refreshing the old
            // token again replaces an unused successor.
            RefreshMode::Rotating => {
                l.valid = BTreeSet::from([generation, successor]);
                l.pending = Some(successor);
            }
            // Strictly single use: the old pair dies at once.
            RefreshMode::SingleUse => {
                l.valid = BTreeSet::from([successor]);
                l.pending = None;
            }
        }
        Some(successor)
    }

    /// `/logout` with a token the layer let through: the whole login.
    fn logout(&mut self, login: usize) {
        self.logins[login].logged_out = true;
    }

    /// `/logout/all` with a token the layer let through: every token of the user minted before
    /// the request (the spec: "Invalidates all access tokens for a user [...] This includes the
    /// access token that made this request"; the docs' table: a0, r0 and other logins
    /// revoked), however close in time; tokens minted after it are valid.
    fn logout_all(&mut self, login: usize) {
        let user = self.logins[login].user;
        self.revoked_before_step[user] = self.step;
        self.logouts_all[user] += 1;
        self.logins[login].logged_out = true;
    }

    fn sweep(&mut self) {
        let now = self.now_ms;
        for l in &mut self.logins {
            if now >= l.last_expiry_ms {
                l.forgettable = true;
            }
        }
    }
}

// ---- The system under test ----------------------------------------------------------------------

/// The tokens of one generation, as the engine minted them.
struct Minted {
    generation: u32,
    stamp: Stamp,
    access: String,
    refresh: Option<String>,
}

struct Login {
    user_id: String,
    device_id: String,
    generations: Vec<Minted>,
}

/// One engine over one store, with the layer in front of whoami, logout and logout/all.
struct System {
    sessions: Sessions,
    clock: ManualClock,
    layer: MatrixAuthLayer,
    store: Store,
    user_ids: [String; USERS],
}

#[derive(Clone)]
enum Store {
    Memory(MemoryStore),
    Postgres(PostgresStore),
}

impl System {
    /// A fresh engine at `start_ms`: a new memory store on the same clock, or `postgres`.
    fn new(postgres: Option<&PostgresStore>, start_ms: u64, user_ids: [String; USERS]) -> Self {
        let clock = ManualClock::new(start_ms);
        let store = match postgres {
            Some(p) => Store::Postgres(p.clone()),
            None => Store::Memory(MemoryStore::new().with_clock(clock.clone())),
        };
        let shared: Arc<dyn TokenStore> = match &store {
            Store::Memory(m) => Arc::new(m.clone()),
            Store::Postgres(p) => Arc::new(p.clone()),
        };
        let verifier = Verifier::new(keys()).clock(clock.clone());
        let issuer = Issuer::new(keys())
            .clock(clock.clone())
            .refreshable_access_lifetime(std::time::Duration::from_millis(ACCESS_MS))
            .access_lifetime(Some(std::time::Duration::from_millis(PLAIN_MS)))
            .refresh_lifetime(Some(std::time::Duration::from_millis(REFRESH_MS)));
        let sessions = Sessions::with_shared_store(issuer, verifier.clone(), shared);
        let layer = MatrixAuthLayer::with_verifier(verifier)
            .revocation(sessions.store())
            .allow_expired_when(|parts| parts.uri.path().starts_with(LOGOUT));
        Self {
            sessions,
            clock,
            layer,
            store,
            user_ids,
        }
    }

    /// An authenticated request with an access token: status, errcode, soft_logout, body.
    async fn authenticated(&self, path: &str, token: &str) -> (StatusCode, serde_json::Value) {
        let sessions = self.sessions.clone();
        let inner = service_fn(move |request: Request<Full<Bytes>>| {
            let sessions = sessions.clone();
            async move {
                let user = request
                    .extensions()
                    .get::<MatrixUser>()
                    .cloned()
                    .expect("the layer ran");
                let done = match request.uri().path() {
                    LOGOUT => sessions.logout(&user).await,
                    LOGOUT_ALL => sessions.logout_all(&user).await,
                    _ => Ok(()),
                };
                let status = match done {
                    Ok(()) => StatusCode::OK,
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                let body = serde_json::json!({
                    "user_id": user.user_id(),
                    "device_id": user.device_id(),
                });
                let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        });
        let method = if path == WHOAMI { "GET" } else { "POST" };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = self.layer.layer(inner).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    /// A refresh endpoint: the new tokens, or the refusal's status and errcode.
    async fn refresh(
        &self,
        token: &str,
        mode: RefreshMode,
    ) -> Result<(String, String), (StatusCode, String)> {
        let (endpoint, path) = match mode {
            RefreshMode::Rotating => (
                self.sessions.refresh_endpoint(),
                "/_matrix/client/v3/refresh",
            ),
            RefreshMode::SingleUse => (
                self.sessions.token_refresh_endpoint(),
                "/_matrix/client/r0/tokenrefresh",
            ),
        };
        let body = serde_json::json!({ "refresh_token": token }).to_string();
        let request = Request::post(path)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = endpoint.oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match (
            status,
            json["access_token"].as_str(),
            json["refresh_token"].as_str(),
        ) {
            (StatusCode::OK, Some(access), Some(refresh)) => Ok((access.into(), refresh.into())),
            _ => Err((status, json["errcode"].as_str().unwrap_or("").to_owned())),
        }
    }

    /// A token's nonce.
    fn nonce_of(&self, token: &str, token_type: TokenType) -> TokenNonce {
        let parts = Request::new(()).into_parts().0;
        let user = self
            .sessions
            .verifier()
            .verify(token.as_bytes(), token_type, &parts)
            .expect("a token just minted verifies");
        TokenNonce::of(&user).expect("minted here, so it has our nonce")
    }

    async fn sweep(&self) {
        match &self.store {
            Store::Memory(m) => m.sweep(),
            Store::Postgres(p) => {
                p.purge_expired().await.expect("the database is up");
            }
        }
    }
}

/// The refusal a refresh endpoint must give.
fn refusal(mode: RefreshMode) -> (StatusCode, String) {
    match mode {
        RefreshMode::Rotating => (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".into()),
        RefreshMode::SingleUse => (StatusCode::FORBIDDEN, "M_FORBIDDEN".into()),
    }
}

fn classify(status: StatusCode, json: &serde_json::Value) -> Option<Answer> {
    match (status, json["errcode"].as_str(), json.get("soft_logout")) {
        (StatusCode::OK, None, _) => Some(Answer::Ok),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"), None) => Some(Answer::Unknown),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN"), Some(v)) if v == true => {
            Some(Answer::SoftLogout)
        }
        _ => None,
    }
}

fn matches(expected: Answer, got: Option<Answer>) -> bool {
    match expected {
        Answer::Any401 => matches!(got, Some(Answer::Unknown | Answer::SoftLogout)),
        _ => got == Some(expected),
    }
}

/// What one case has minted so far, beside the model.
struct Case<'a> {
    system: &'a System,
    model: Model,
    logins: Vec<Login>,
}

impl Case<'_> {
    /// (login, generation index) for a pick, if anything was minted yet.
    fn resolve(&self, p: &Pick) -> Option<(usize, usize)> {
        if self.logins.is_empty() {
            return None;
        }
        let login = p.login.index(self.logins.len());
        let count = self.logins[login].generations.len();
        let generation = match p.generation {
            Generation::Back(n) => count.saturating_sub(n + 1),
            Generation::Any(g) => g.index(count),
        };
        Some((login, generation))
    }

    /// The stamp of an access token of `user` minted in this step: its nonce must say "now", or
    /// up to a millisecond later per `/logout/all` of theirs (the issuer stamps a token minted
    /// right after one clear of it).
    fn stamp(&self, user: usize, access: &str, at: &str) -> Result<Stamp, TestCaseError> {
        let issued_ms = self.system.nonce_of(access, TokenType::Access).issued_ms;
        let now = self.model.now_ms;
        let latest = now + self.model.logouts_all[user];
        prop_assert!(
            (now..=latest).contains(&issued_ms),
            "{}: minted at {} ms, now is {}",
            at,
            issued_ms,
            now
        );
        Ok(Stamp {
            issued_ms,
            step: self.model.step,
        })
    }

    fn login(&mut self, user: usize, refresh: bool, at: &str) -> Result<(), TestCaseError> {
        let device_id = format!("D{}", self.logins.len());
        let user_id = self.system.user_ids[user].clone();
        let tokens = self.system.sessions.login(
            &user_id,
            &SessionRequest::new()
                .device_id(device_id.clone())
                .refresh(refresh),
        );
        prop_assert_eq!(tokens.generation, 0, "{}", at);
        prop_assert_eq!(tokens.refresh_token.is_some(), refresh, "{}", at);
        let lifetime = if refresh { ACCESS_MS } else { PLAIN_MS };
        prop_assert_eq!(tokens.expires_in_ms, Some(lifetime), "{}", at);
        let stamp = self.stamp(user, &tokens.access_token, at)?;
        self.model.login(user, refresh);
        let li = self.model.logins.len() - 1;
        self.model.minted(li, stamp.issued_ms);
        self.logins.push(Login {
            user_id,
            device_id,
            generations: vec![Minted {
                generation: 0,
                stamp,
                access: tokens.access_token,
                refresh: tokens.refresh_token,
            }],
        });
        Ok(())
    }

    /// An access token at `path` (whoami, logout or logout/all).
    async fn present(
        &mut self,
        li: usize,
        gi: usize,
        path: &str,
        at: &str,
    ) -> Result<(), TestCaseError> {
        let minted = &self.logins[li].generations[gi];
        let (generation, stamp) = (minted.generation, minted.stamp);
        // Logging out with an expired token of a login the store may have forgotten: the
        // the docs do not say what happens (every token of that login has expired); not asked.
        if path != WHOAMI
            && self.model.logins[li].forgettable
            && self.model.access_expired(li, stamp.issued_ms)
        {
            return Ok(());
        }
        let expected = self
            .model
            .present_access(li, generation, stamp, path != WHOAMI);
        let (status, json) = self.system.authenticated(path, &minted.access).await;
        let got = classify(status, &json);
        prop_assert!(
            matches(expected, got),
            "{}: login {} generation {}: expected {:?}, got {} {}",
            at,
            li,
            generation,
            expected,
            status,
            json
        );
        if got == Some(Answer::Ok) {
            let login = &self.logins[li];
            prop_assert_eq!(&json["user_id"], login.user_id.as_str(), "{}", at);
            prop_assert_eq!(&json["device_id"], login.device_id.as_str(), "{}", at);
            match path {
                LOGOUT => self.model.logout(li),
                LOGOUT_ALL => self.model.logout_all(li),
                _ => {}
            }
        }
        Ok(())
    }

    async fn refresh(
        &mut self,
        li: usize,
        gi: usize,
        mode: RefreshMode,
        at: &str,
    ) -> Result<(), TestCaseError> {
        let minted = &self.logins[li].generations[gi];
        let Some(refresh_token) = minted.refresh.clone() else {
            return Ok(());
        };
        let (generation, stamp) = (minted.generation, minted.stamp);
        let expected = self.model.refresh(li, generation, stamp, mode);
        let got = self.system.refresh(&refresh_token, mode).await;
        match (expected, got) {
            (Some(successor), Ok((access, refresh))) => {
                let access_nonce = self.system.nonce_of(&access, TokenType::Access);
                let refresh_nonce = self.system.nonce_of(&refresh, TokenType::Refresh);
                prop_assert_eq!(access_nonce.generation, successor, "{}", at);
                prop_assert_eq!(refresh_nonce.generation, successor, "{}", at);
                prop_assert_eq!(access_nonce.issued_ms, refresh_nonce.issued_ms, "{}", at);
                let stamp = self.stamp(self.model.logins[li].user, &access, at)?;
                self.model.minted(li, stamp.issued_ms);
                self.logins[li].generations.push(Minted {
                    generation: successor,
                    stamp,
                    access,
                    refresh: Some(refresh),
                });
                Ok(())
            }
            (None, Err(refused)) => {
                prop_assert_eq!(refused, refusal(mode), "{}", at);
                Ok(())
            }
            (expected, got) => Err(TestCaseError::fail(format!(
                "{at}: login {li} generation {generation}: expected {}, got {}",
                match expected {
                    Some(g) => format!("a refresh to generation {g}"),
                    None => "a refusal".into(),
                },
                match got {
                    Ok(_) => "new tokens".into(),
                    Err((status, errcode)) => format!("{status} {errcode}"),
                }
            ))),
        }
    }

    async fn apply(&mut self, op: &Op, at: &str) -> Result<(), TestCaseError> {
        match *op {
            Op::Login { user, refresh } => self.login(user, refresh, at)?,
            Op::Use(p) | Op::Logout(p) | Op::LogoutAll(p) => {
                if let Some((li, gi)) = self.resolve(&p) {
                    let path = match op {
                        Op::Use(_) => WHOAMI,
                        Op::Logout(_) => LOGOUT,
                        _ => LOGOUT_ALL,
                    };
                    self.present(li, gi, path, at).await?;
                }
            }
            Op::Refresh(p, mode) => {
                if let Some((li, gi)) = self.resolve(&p) {
                    self.refresh(li, gi, mode, at).await?;
                }
            }
            Op::RefreshAsAccess(p) => {
                let token = self
                    .resolve(&p)
                    .and_then(|(li, gi)| self.logins[li].generations[gi].refresh.clone());
                if let Some(token) = token {
                    // Never accepted, and not a use of the token: the model does not move.
                    let (status, json) = self.system.authenticated(WHOAMI, &token).await;
                    let got = classify(status, &json);
                    prop_assert_eq!(got, Some(Answer::Unknown), "{}: {} {}", at, status, json);
                }
            }
            Op::AccessAsRefresh(p) => {
                if let Some((li, gi)) = self.resolve(&p) {
                    let token = self.logins[li].generations[gi].access.clone();
                    let got = self.system.refresh(&token, RefreshMode::Rotating).await;
                    prop_assert_eq!(got.err(), Some(refusal(RefreshMode::Rotating)), "{}", at);
                }
            }
            Op::Advance(ms) => {
                self.system.clock.advance_ms(ms);
                self.model.now_ms += ms;
            }
            Op::Sweep => {
                self.system.sweep().await;
                self.model.sweep();
            }
        }
        Ok(())
    }
}

/// Runs `ops` on `system` and on the model side by side, comparing every answer, then presents
/// every access token ever minted once more (an audit of the final state).
async fn run(system: &System, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut case = Case {
        system,
        model: Model::new(system.clock.now_ms()),
        logins: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        case.model.step = step as u64 + 1;
        case.apply(op, &format!("step {step} {op:?}")).await?;
    }
    for li in 0..case.logins.len() {
        for gi in 0..case.logins[li].generations.len() {
            case.present(li, gi, WHOAMI, &format!("final audit, login {li} #{gi}"))
                .await?;
        }
    }
    Ok(())
}

fn user_ids(unique: bool) -> [String; USERS] {
    let suffix = if unique {
        format!("-{:08x}", SessionId::random().as_u128() as u32)
    } else {
        String::new()
    };
    ["alice", "bob"].map(|name| format!("@{name}{suffix}:example.org"))
}

/// Random sequences against the memory store (`postgres: None`) or the database.
fn check_sequences(rt: &tokio::runtime::Runtime, postgres: Option<&PostgresStore>, cases: u32) {
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&ops(), |ops| {
        let system = match postgres {
            // The database outlives test runs and the store keeps its own (system) clock for
            // loading and purging: unique users, and a test clock that starts now.
            Some(_) => System::new(postgres, SystemClock.now_ms(), user_ids(true)),
            None => System::new(None, crate::common::NOW_MS, user_ids(false)),
        };
        rt.block_on(run(&system, &ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memory_store_follows_the_readme_rules() {
    check_sequences(&runtime(), None, 256);
}

#[test]
fn postgres_store_follows_the_readme_rules() {
    if crate::common::pg::skip() {
        return;
    }
    let rt = runtime();
    let store = rt
        .block_on(PostgresStore::connect(&crate::common::pg::database_url()))
        .expect("the test database answers");
    check_sequences(&rt, Some(&store), 64);
}

// ---- Concurrent single-use refreshes ------------------------------------------------------------

/// Which refresh token the concurrent `/r0/tokenrefresh` calls share.
#[derive(Debug, Clone, Copy)]
enum Race {
    /// r0 of a fresh login.
    Fresh,
    /// r1, the unused successor of a `/v3/refresh` of r0.
    Successor,
    /// r0 again, while the successor of its `/v3/refresh` is unused.
    OldWhilePending,
    /// r1, minted by a `/r0/tokenrefresh` of r0.
    AfterSingleUse,
}

fn race() -> impl Strategy<Value = Race> {
    prop_oneof![
        Just(Race::Fresh),
        Just(Race::Successor),
        Just(Race::OldWhilePending),
        Just(Race::AfterSingleUse),
    ]
}

/// `calls` single-use refreshes of one token at once, spread over `systems` (processes sharing a
/// database, or one memory store): exactly one wins; the others are refused; the winner's tokens
/// work and every older generation is dead.
async fn concurrent_refreshes(
    systems: &[System],
    race: Race,
    calls: usize,
) -> Result<(), TestCaseError> {
    let first = &systems[0];
    let login = first.sessions.login(
        &first.user_ids[0],
        &SessionRequest::new().device_id("RACE").refresh(true),
    );
    let r0 = login.refresh_token.clone().expect("asked for");
    let mut dead = vec![login.access_token.clone()];
    let (raced, winner_generation) = match race {
        Race::Fresh => (r0, 1),
        Race::Successor | Race::OldWhilePending | Race::AfterSingleUse => {
            let mode = match race {
                Race::AfterSingleUse => RefreshMode::SingleUse,
                _ => RefreshMode::Rotating,
            };
            let (a1, r1) = first
                .refresh(&r0, mode)
                .await
                .map_err(|e| TestCaseError::fail(format!("setup refresh refused: {e:?}")))?;
            dead.push(a1);
            match race {
                Race::OldWhilePending => (r0, 2),
                _ => (r1, 2),
            }
        }
    };

    let barrier = Arc::new(tokio::sync::Barrier::new(calls));
    let mut tasks = Vec::new();
    for i in 0..calls {
        let sessions = systems[i % systems.len()].sessions.clone();
        let (barrier, token) = (barrier.clone(), raced.clone());
        tasks.push(tokio::spawn(async move {
            let parts = Request::new(()).into_parts().0;
            barrier.wait().await;
            sessions
                .refresh(token.as_bytes(), RefreshMode::SingleUse, &parts)
                .await
        }));
    }
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.expect("no panic") {
            Ok(tokens) => winners.push((i, tokens)),
            Err(tower_matrix_auth::lifecycle::ExchangeError::Invalid) => {}
            Err(e) => return Err(TestCaseError::fail(format!("call {i}: {e}"))),
        }
    }
    prop_assert_eq!(winners.len(), 1, "{:?} x{}: winners", race, calls);
    let (i, tokens) = winners.pop().expect("one");
    let system = &systems[i % systems.len()];
    prop_assert_eq!(tokens.generation, winner_generation);
    let (status, json) = system.authenticated(WHOAMI, &tokens.access_token).await;
    prop_assert_eq!(classify(status, &json), Some(Answer::Ok), "{}", json);
    prop_assert_eq!(&json["device_id"], "RACE");
    for (g, token) in dead.iter().enumerate() {
        let (status, json) = system.authenticated(WHOAMI, token).await;
        let got = classify(status, &json);
        prop_assert_eq!(
            got,
            Some(Answer::Unknown),
            "generation {} after the race",
            g
        );
    }
    // Used up everywhere.
    for other in systems {
        let again = other.refresh(&raced, RefreshMode::SingleUse).await;
        prop_assert_eq!(again.err(), Some(refusal(RefreshMode::SingleUse)));
    }
    let next = system
        .refresh(
            tokens.refresh_token.as_deref().expect("minted"),
            RefreshMode::SingleUse,
        )
        .await;
    prop_assert!(next.is_ok(), "the winner's refresh token refreshes");
    Ok(())
}

fn check_races(rt: &tokio::runtime::Runtime, postgres: &[PostgresStore], cases: u32) {
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&(race(), 2usize..=16), |(race, calls)| {
        let systems: Vec<System> = if postgres.is_empty() {
            vec![System::new(None, crate::common::NOW_MS, user_ids(false))]
        } else {
            let (now, users) = (SystemClock.now_ms(), user_ids(true));
            postgres
                .iter()
                .map(|p| System::new(Some(p), now, users.clone()))
                .collect()
        };
        rt.block_on(concurrent_refreshes(&systems, race, calls))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn concurrent_single_use_refreshes_have_one_winner_in_memory() {
    check_races(&runtime(), &[], 64);
}

#[test]
fn concurrent_single_use_refreshes_have_one_winner_across_two_postgres_stores() {
    if crate::common::pg::skip() {
        return;
    }
    let rt = runtime();
    let url = crate::common::pg::database_url();
    let stores = rt.block_on(async {
        [
            PostgresStore::connect(&url)
                .await
                .expect("the test database answers"),
            PostgresStore::connect(&url)
                .await
                .expect("the test database answers"),
        ]
    });
    check_races(&rt, &stores, 16);
}
