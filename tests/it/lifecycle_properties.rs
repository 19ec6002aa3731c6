//! Property tests (proptest) of the token lifecycle: random sequences of logins, uses of access
//! tokens, refreshes on both endpoints, logouts, log-outs everywhere, clock moves and sweeps, run
//! against the real `Sessions` engine behind the real layer, over `MemoryStore` and over
//! `PostgresStore`; every answer, and every token minted, is compared with the lifecycle model
//! the `lifecycle` fuzz target drives too (`tests/oracle/lifecycle.rs`, written from the docs'
//! "Token lifecycle" table and rules, not from `SessionState`). And: N concurrent single-use
//! refreshes of one refresh token have exactly one winner, on both stores (two PostgreSQL stores,
//! as two processes, for the database).
//!
//! The PostgreSQL properties need the server `scripts/postgres.sh` starts (`./scripts/test.sh`
//! does), as `tests/it/postgres.rs` does; they run fewer cases. Case counts are per property, four
//! times more in release builds; `PROPTEST_CASES` overrides them all, e.g.
//! `PROPTEST_CASES=2000 cargo test --release --test it lifecycle_properties::`.
#![cfg(all(feature = "postgres", feature = "axum"))]

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
    store::{RefreshMode, RefreshPolicy, ReplayAction, TokenStore},
    Issuer, MatrixAuthLayer, MatrixUser, MemoryStore, PostgresStore, Sessions, TokenType, Verifier,
};

use crate::common::keys;
// The model's `Generation`: the tokens of one generation as the issuer must mint them.
use crate::oracle::lifecycle::Generation as Expected;
use crate::oracle::lifecycle::{
    nonce_grammar, Answer, Lifetimes, Mismatch, Model, Policy, Position, Seen,
};

/// Lifetime of an access token issued with a refresh token.
const ACCESS_MS: u64 = 60_000;
/// Lifetime of an access token issued without one.
const PLAIN_MS: u64 = 120_000;
/// Lifetime of a refresh token (the longest of a session: how long its state is kept).
const REFRESH_MS: u64 = 180_000;
/// The issuer's, as the model knows them (login tokens: the default two minutes, not minted here).
const LIFETIMES: Lifetimes = Lifetimes {
    refreshable_access_ms: ACCESS_MS,
    access_ms: Some(PLAIN_MS),
    refresh_ms: Some(REFRESH_MS),
    login_ms: 120_000,
};

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
        // The token before the newest at /v3/refresh: once the newest is used, a replay (the
        // refresh policy's case).
        3 => any::<Index>().prop_map(|login| Op::Refresh(
            Pick {
                login,
                generation: Generation::Back(1),
            },
            RefreshMode::Rotating
        )),
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

// ---- The system under test ----------------------------------------------------------------------

/// A token as minted, where the model places it, and its `time <`.
#[derive(Clone)]
struct Token {
    text: String,
    at: Position,
    expires_ms: Option<u64>,
}

/// The tokens of one generation, as the engine minted them.
struct Minted {
    access: Token,
    refresh: Option<Token>,
}

struct Login {
    user_id: String,
    device_id: String,
    generations: Vec<Minted>,
}

/// One engine over one store, with the layer in front of whoami, logout and logout/all.
struct System {
    sessions: Sessions,
    policy: Policy,
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
        Self::with_policy(postgres, start_ms, user_ids, Policy::default())
    }

    /// [`System::new`] whose `/v3/refresh` follows `policy`.
    fn with_policy(
        postgres: Option<&PostgresStore>,
        start_ms: u64,
        user_ids: [String; USERS],
        policy: Policy,
    ) -> Self {
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
        let action = if policy.revoke {
            ReplayAction::RevokeSession
        } else {
            ReplayAction::Refuse
        };
        let sessions = Sessions::with_shared_store(issuer, verifier.clone(), shared)
            .refresh_policy(
                RefreshPolicy::new()
                    .grace(std::time::Duration::from_millis(policy.grace_ms))
                    .on_replay(action),
            );
        let layer = MatrixAuthLayer::with_verifier(verifier)
            .revocation(sessions.store())
            .allow_expired_when(|parts| parts.uri.path().starts_with(LOGOUT));
        Self {
            sessions,
            policy,
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

    /// A token just minted, verified: the identity the engine reads from it.
    fn verified(&self, token: &str, token_type: TokenType) -> MatrixUser {
        let parts = Request::new(()).into_parts().0;
        self.sessions
            .verifier()
            .verify(token.as_bytes(), token_type, &parts)
            .expect("a token just minted verifies")
    }

    /// The user's "log out everywhere" floor, as the store knows it.
    fn floor(&self, user_id: &str) -> u64 {
        self.sessions.store().user_floor(user_id)
    }

    /// `MemoryStore::sweep` / `PostgresStore::purge_expired`, and the model's sweep at the
    /// store's clock: the test clock for the memory store; for the database the system clock,
    /// which lags the test clock (that starts at the system's now and only moves forward), so
    /// that a purge forgets only states as good as none (`Case::apply` checks that the lag
    /// holds).
    async fn sweep(&self, model: &mut Model) {
        match &self.store {
            Store::Memory(m) => {
                m.sweep();
                model.sweep(self.clock.now_ms());
            }
            Store::Postgres(p) => {
                let now = SystemClock.now_ms();
                p.purge_expired().await.expect("the database is up");
                model.sweep(now);
            }
        }
    }
}

/// The refusal a refresh endpoint must give.
fn refusal(mode: RefreshMode) -> (StatusCode, String) {
    let (status, errcode) = crate::oracle::lifecycle::refusal(mode);
    (StatusCode::from_u16(status).unwrap(), errcode.to_owned())
}

/// The layer's answer: `None` for anything but 200 and the two 401 `M_UNKNOWN_TOKEN`s.
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

/// A mismatch the model found, at a step.
fn mismatch(at: &str, why: Mismatch) -> TestCaseError {
    TestCaseError::fail(format!("{at}: {why}"))
}

/// What one case has minted so far, beside the model.
struct Case<'a> {
    system: &'a System,
    model: Model,
    logins: Vec<Login>,
}

impl Case<'_> {
    fn now(&self) -> u64 {
        self.system.clock.now_ms()
    }

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

    /// A token of `expected` just minted for `user_id` on `device_id`: it verifies to them, with
    /// the expiry the model expects and the session nonce the model expects (so stamped with the
    /// clock), which `TokenNonce` reads too.
    fn minted(
        &mut self,
        token: &str,
        token_type: TokenType,
        expected: &Expected,
        (user_id, device_id): (&str, &str),
        at: &str,
    ) -> Result<Token, TestCaseError> {
        let user = self.system.verified(token, token_type);
        let expires_ms = expected.expires_ms(token_type);
        prop_assert_eq!(user.user_id(), user_id, "{}", at);
        prop_assert_eq!(user.device_id(), Some(device_id), "{}", at);
        prop_assert_eq!(user.expires_at_ms(), expires_ms, "{}", at);
        let text = user.nonce().expect("minted here, so it has our nonce");
        self.model
            .minted(text, &expected.nonce(token_type))
            .map_err(|why| mismatch(at, why))?;
        let parsed = TokenNonce::of(&user).expect("minted here, so it has our nonce");
        prop_assert_eq!(parsed.to_string(), text, "{}", at);
        let nonce = nonce_grammar(text).expect("the model checked it");
        Ok(Token {
            text: token.to_owned(),
            at: Position::of_session(user_id, nonce, token_type),
            expires_ms,
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
        let expected = self
            .model
            .login(tokens.session.as_u128(), &user_id, refresh, self.now());
        prop_assert_eq!(tokens.generation, 0, "{}", at);
        prop_assert_eq!(tokens.refresh_token.is_some(), refresh, "{}", at);
        let lifetime = if refresh { ACCESS_MS } else { PLAIN_MS };
        prop_assert_eq!(tokens.expires_in_ms, Some(lifetime), "{}", at);
        prop_assert_eq!(tokens.expires_in_ms, expected.access_lifetime_ms, "{}", at);
        prop_assert_eq!(
            tokens.session_expires_ms,
            expected.nonce.expires_ms,
            "{}",
            at
        );
        let who = (user_id.as_str(), device_id.as_str());
        let access = self.minted(&tokens.access_token, TokenType::Access, &expected, who, at)?;
        let refresh = match &tokens.refresh_token {
            Some(token) => Some(self.minted(token, TokenType::Refresh, &expected, who, at)?),
            None => None,
        };
        self.logins.push(Login {
            user_id,
            device_id,
            generations: vec![Minted { access, refresh }],
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
        let token = self.logins[li].generations[gi].access.clone();
        let now = self.now();
        let seen = Seen::minted(token.at.clone(), token.expires_ms, now);
        let (status, json) = self.system.authenticated(path, &token.text).await;
        let got = classify(status, &json);
        let passed = self
            .model
            .layer(token.text.as_bytes(), &seen, path != WHOAMI, now, got)
            .map_err(|why| {
                mismatch(
                    at,
                    format!("login {li} generation {gi}: {why} ({status} {json})"),
                )
            })?;
        let Some(position) = passed else {
            return Ok(());
        };
        let login = &self.logins[li];
        prop_assert_eq!(&json["user_id"], login.user_id.as_str(), "{}", at);
        prop_assert_eq!(&json["device_id"], login.device_id.as_str(), "{}", at);
        match path {
            LOGOUT => self.model.logout(&position),
            LOGOUT_ALL => {
                self.model.logout_all(&position, now);
                let user_id = &position.user_id;
                prop_assert_eq!(
                    self.system.floor(user_id),
                    self.model.floor(user_id),
                    "{}: the floor",
                    at
                );
            }
            _ => {}
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
        let Some(token) = self.logins[li].generations[gi].refresh.clone() else {
            return Ok(());
        };
        let now = self.now();
        let seen = Seen::minted(token.at.clone(), token.expires_ms, now);
        let got = self.system.refresh(&token.text, mode).await;
        let answer = match &got {
            Ok(_) => Ok(()),
            Err((status, errcode)) => Err((status.as_u16(), errcode.as_str())),
        };
        let successor = self
            .model
            .refresh(token.text.as_bytes(), &seen, mode, now, answer)
            .map_err(|why| mismatch(at, format!("login {li} generation {gi}: {why}")))?;
        let (Some(successor), Ok((access, refresh))) = (successor, got) else {
            return Ok(());
        };
        let login = &self.logins[li];
        let (user_id, device_id) = (login.user_id.clone(), login.device_id.clone());
        let who = (user_id.as_str(), device_id.as_str());
        let access = self.minted(&access, TokenType::Access, &successor, who, at)?;
        let refresh = self.minted(&refresh, TokenType::Refresh, &successor, who, at)?;
        self.logins[li].generations.push(Minted {
            access,
            refresh: Some(refresh),
        });
        Ok(())
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
                    // The caveat table refuses a refresh token where an access token belongs:
                    // never accepted, and not a use of the token (the model does not move).
                    let seen = Seen::Refused {
                        may_hold_later: false,
                    };
                    let (status, json) = self.system.authenticated(WHOAMI, &token.text).await;
                    let got = classify(status, &json);
                    self.model
                        .layer(token.text.as_bytes(), &seen, false, self.now(), got)
                        .map_err(|why| mismatch(at, format!("{why} ({status} {json})")))?;
                }
            }
            Op::AccessAsRefresh(p) => {
                if let Some((li, gi)) = self.resolve(&p) {
                    // Nor an access token where a refresh token belongs.
                    let token = self.logins[li].generations[gi].access.text.clone();
                    let seen = Seen::Refused {
                        may_hold_later: false,
                    };
                    let mode = RefreshMode::Rotating;
                    let got = self.system.refresh(&token, mode).await;
                    let answer = match &got {
                        Ok(_) => Ok(()),
                        Err((status, errcode)) => Err((status.as_u16(), errcode.as_str())),
                    };
                    self.model
                        .refresh(token.as_bytes(), &seen, mode, self.now(), answer)
                        .map_err(|why| mismatch(at, why))?;
                }
            }
            Op::Advance(ms) => self.system.clock.advance_ms(ms),
            Op::Sweep => self.system.sweep(&mut self.model).await,
        }
        match &self.system.store {
            // The store holds state for exactly the sessions the model does.
            Store::Memory(m) => prop_assert_eq!(m.len(), self.model.stored(), "{}", at),
            // The database's clock (the system's) lags every state the model keeps (but those
            // as good as none), so that neither a purge nor a process's view, which sweeps as it
            // grows, forgets one early.
            Store::Postgres(_) => {
                let now = SystemClock.now_ms();
                prop_assert!(
                    self.model.earliest_until().is_none_or(|until| until > now),
                    "{}: the system clock caught up with the test clock ({} ms): the case ran \
                     too long for the model to know what the database forgets",
                    at,
                    now
                );
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
        model: Model::with_policy(LIFETIMES, system.policy),
        logins: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
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
fn check_sequences(
    rt: &tokio::runtime::Runtime,
    postgres: Option<&PostgresStore>,
    cases: u32,
    policy: Policy,
) {
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&ops(), |ops| {
        let system = match postgres {
            // The database outlives test runs and the store keeps its own (system) clock for
            // loading and purging: unique users, and a test clock that starts now.
            Some(_) => System::with_policy(postgres, SystemClock.now_ms(), user_ids(true), policy),
            None => System::with_policy(None, crate::common::NOW_MS, user_ids(false), policy),
        };
        rt.block_on(run(&system, &ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn memory_store_follows_the_readme_rules() {
    check_sequences(&runtime(), None, 256, Policy::default());
}

/// [`check_sequences`] on the test database, when there is one.
fn check_sequences_on_postgres(cases: u32, policy: Policy) {
    if crate::common::pg::skip() {
        return;
    }
    let rt = runtime();
    let store = rt
        .block_on(PostgresStore::connect(&crate::common::pg::database_url()))
        .expect("the test database answers");
    check_sequences(&rt, Some(&store), cases, policy);
}

#[test]
fn postgres_store_follows_the_readme_rules() {
    check_sequences_on_postgres(64, Policy::default());
}

/// A grace window about as long as the access tokens' lifetime (the clock moves by up to 70 s a
/// step, sometimes by much more), replays outside it revoking the session.
const POLICY: Policy = Policy {
    grace_ms: 30_000,
    revoke: true,
};

#[test]
fn memory_store_follows_the_refresh_policy() {
    check_sequences(&runtime(), None, 256, POLICY);
    check_sequences(
        &runtime(),
        None,
        64,
        Policy {
            revoke: false,
            ..POLICY
        },
    );
}

#[test]
fn postgres_store_follows_the_refresh_policy() {
    check_sequences_on_postgres(64, POLICY);
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
