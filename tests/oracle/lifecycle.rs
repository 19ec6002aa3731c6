//! The token lifecycle as the docs give it (`docs/sessions.md`: "Which token is valid when", "The
//! session nonce", "What the store keeps"; the `store` module's docs), written from the tables and
//! not from `src/store`. One model for both drivers of the real engine (`Sessions`, its refresh
//! endpoints, the layer consulting its store): the `lifecycle` fuzz target
//! (`fuzz/fuzz_targets/lifecycle.rs`, through `tower_matrix_auth_fuzz::oracle`) and the lifecycle
//! property tests (`tests/it/lifecycle_properties.rs`, memory store and PostgreSQL).
//!
//! A driver tells the model what it sent and what the engine answered; the model says whether
//! that is the docs' answer (`Err` with the reason when not: the fuzz target panics with it, the
//! property tests fail the case and shrink it) and moves on. The driver does what needs more than
//! `std` and the crate's public types: it parses tokens, asks the caveat table (`super`) or knows
//! what it minted, and computes `TokenId`s and HMAC chains.
//!
//! The rules:
//! - A token's session is named by the issuer's session nonce only when that is the token's first
//!   caveat (`<session>.<generation>.<issued>.<a|r|l>.<start>.<epoch>.<expiry|->`, [`Nonce`]);
//!   any other token (minted elsewhere, an older 4-field nonce, a nonce appended by a holder) is a
//!   session of its own, its `TokenId`, generation 0, epoch 0 ([`Position`]).
//! - A session's state: its live generation, a pending one (minted by `/v3/refresh`, not used
//!   yet: its first use revokes every other generation), the next one a refresh mints, whether it
//!   was logged out ([`State`]). No state is generation 0 live. Refreshing the old token again
//!   while the successor is pending replaces the successor; `/r0/tokenrefresh` makes the
//!   successor live at once.
//! - "Log out everywhere" raises the user's floor to max(floor + 1, now); a token is revoked while
//!   the floor exceeds its epoch (the floor at its session's login; 0 without a session nonce),
//!   and a session's refresh is then refused. Revoked beats expired: no `soft_logout` for a
//!   revoked token (it would invite a refresh that cannot work).
//! - Only refresh tokens whose session nonce is of kind `r` are exchanged; a session nonce of
//!   another kind than the token's type is revoked. Login tokens are used once: by their session
//!   (kind `l`), or, minted elsewhere, by the chain through their first `time <` (refused without
//!   one). Sessions belong to the user whose token made their state: another user's token never
//!   reads or changes it.
//! - What the store records is kept until the session's expiry (from the nonce; for a token
//!   without a session nonce its own `time <`, or the earliest before its first nonce), plus the
//!   leeway; for good without one. A sweep forgets what is kept until now or earlier, never
//!   earlier: while a token a forgotten state speaks for still verifies, that is a bug.
//! - What is minted: generation 0 at login (the session starts now, in the user's current epoch),
//!   one more per refresh (inheriting the session's start and epoch), every nonce stamped with the
//!   clock, the session's expiry the latest `time <` of its tokens so far; the docs' caveats.
//! - The refresh policy (`docs/sessions.md`, "The refresh policy"): a *replay* is a refresh token
//!   at `/v3/refresh` of a session still logged in whose standing is revoked, and which was used
//!   (not a successor replaced before its first use). Within the grace window of the generation
//!   most recently refreshed there (from its first refresh), its token and the successors its
//!   refreshes minted that were replaced mint the live generation again and change nothing else;
//!   outside, a replay is refused and, with "revoke", logs the session out, a replaced successor
//!   only refused. `/r0/tokenrefresh` refuses replays only, and forgets the
//!   session's last `/v3/refresh` (no window left).
//! - A token once refused stays refused (refresh endpoints, login tokens, the layer) unless a
//!   sweep forgot the state that refused it, or a refresh may still mint its generation, or it
//!   has a `time >`/`time ==` caveat; a login token works once.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};

use tower_matrix_auth::lifecycle::{NonceKind, TokenNonce};
use tower_matrix_auth::store::RefreshMode;
use tower_matrix_auth::TokenType;

use super::{caveat_parts, Identity};

/// The verifier's clock leeway for `time` caveats: the default, which the caveat table assumes.
pub const LEEWAY_MS: u64 = 0;

/// Why the engine's answer is not the model's.
pub type Mismatch = String;
/// A comparison of the engine with the model.
pub type Check<T = ()> = Result<T, Mismatch>;

macro_rules! ensure {
    ($holds:expr, $($why:tt)+) => {
        if !$holds {
            return Err(format!($($why)+));
        }
    };
}

macro_rules! ensure_eq {
    ($got:expr, $expected:expr, $($what:tt)+) => {
        match (&$got, &$expected) {
            (got, expected) => {
                if got != expected {
                    return Err(format!(
                        "{}: got {:?}, the model says {:?}",
                        format!($($what)+),
                        got,
                        expected
                    ));
                }
            }
        }
    };
}

// ---- The nonce grammar ------------------------------------------------------------------------

/// The fields of a session nonce, as the grammar reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nonce {
    pub session: u128,
    pub generation: u32,
    pub issued_ms: u64,
    /// `a`, `r` or `l`.
    pub kind: char,
    pub started_ms: u64,
    pub epoch: u64,
    /// `None` for `-`: some token of the session never expires.
    pub expires_ms: Option<u64>,
}

/// `<session: 32 hex>.<generation>.<issued ms>.<kind: a|r|l>.<session start ms>.<epoch>.<session
/// expiry ms or ->`: the fields, or `None`. Decimals are ASCII digits only (leading zeros
/// allowed) that fit their type (`u32` for the generation, `u64` for the rest).
pub fn nonce_grammar(text: &str) -> Option<Nonce> {
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
pub fn kind_of(token_type: TokenType) -> char {
    match token_type.as_str() {
        "access" => 'a',
        "refresh" => 'r',
        "login" => 'l',
        other => panic!("a token type the nonce grammar has no kind for: {other}"),
    }
}

/// The nonce the issuer writes, spelled from the grammar: lowercase hex, no leading zeros.
pub fn canonical_nonce(n: &Nonce) -> String {
    let expires = n.expires_ms.map_or("-".to_owned(), |at| at.to_string());
    format!(
        "{:032x}.{}.{}.{}.{}.{}.{expires}",
        n.session, n.generation, n.issued_ms, n.kind, n.started_ms, n.epoch
    )
}

/// `TokenNonce::parse` against the grammar, and the round trip of whatever parses.
pub fn check_nonce(text: &str) -> Check {
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
    ensure_eq!(fields, nonce_grammar(text), "TokenNonce::parse({text:?})");
    if let (Some(nonce), Some(fields)) = (parsed, fields) {
        let written = nonce.to_string();
        ensure_eq!(
            written,
            canonical_nonce(&fields),
            "TokenNonce of {text:?} written"
        );
        ensure_eq!(
            TokenNonce::parse(&written),
            Some(nonce),
            "TokenNonce of {text:?} read back"
        );
        if text.bytes().all(|b| !b.is_ascii_uppercase()) && written.len() == text.len() {
            // Same length, lowercase: no leading zeros either, so the very same text.
            ensure_eq!(written, text, "TokenNonce of {text:?} written");
        }
    }
    Ok(())
}

/// The later of two expiries, `None` being "never".
pub fn latest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(a?.max(b?))
}

/// Until when a record about tokens that expire at `expires` is kept: plus the leeway; for good
/// when one never expires.
fn keep(expires: Option<u64>) -> u64 {
    expires.map_or(u64::MAX, |at| at.saturating_add(LEEWAY_MS))
}

// ---- What is minted ---------------------------------------------------------------------------

/// The issuer's lifetimes (`None`: never expires).
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// An access token issued with a refresh token.
    pub refreshable_access_ms: u64,
    /// An access token issued without one.
    pub access_ms: Option<u64>,
    pub refresh_ms: Option<u64>,
    pub login_ms: u64,
}

impl Lifetimes {
    /// The lifetime of an access token issued with a refresh token or without.
    pub fn access(&self, refresh: bool) -> Option<u64> {
        if refresh {
            Some(self.refreshable_access_ms)
        } else {
            self.access_ms
        }
    }

    /// The session expiry the issuer writes for a generation minted at `now` (`None`: never),
    /// given the session's so far: the latest `time <` of its tokens, these included.
    pub fn session_expiry(&self, refresh: bool, so_far: Option<u64>, now: u64) -> Option<u64> {
        let mut expires = latest(so_far, self.access(refresh).map(|l| now + l));
        if refresh {
            expires = latest(expires, self.refresh_ms.map(|l| now + l));
        }
        expires
    }
}

/// The tokens of one generation as the issuer must mint them (a login token: one token, kind
/// `l`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    /// The access (or login) token's nonce; the refresh token's differs only in its kind.
    pub nonce: Nonce,
    pub access_lifetime_ms: Option<u64>,
    pub access_expires_ms: Option<u64>,
    /// `None` also when no refresh token is minted.
    pub refresh_expires_ms: Option<u64>,
}

impl Generation {
    /// The session nonce of the token of this type.
    pub fn nonce(&self, token_type: TokenType) -> Nonce {
        Nonce {
            kind: kind_of(token_type),
            ..self.nonce
        }
    }

    /// The `time <` of the token of this type.
    pub fn expires_ms(&self, token_type: TokenType) -> Option<u64> {
        match token_type {
            TokenType::Refresh => self.refresh_expires_ms,
            _ => self.access_expires_ms,
        }
    }
}

/// Exactly the caveats of a minted token: the session nonce first, then Synapse's (`gen`,
/// `user_id`, `type`, `guest`), `device_id`, `time <`.
pub fn minted_caveats(
    nonce: &Nonce,
    token_type: TokenType,
    user_id: &str,
    device_id: Option<&str>,
    guest: bool,
    expires_at_ms: Option<u64>,
) -> Vec<String> {
    let mut caveats = vec![
        format!("nonce = {}", canonical_nonce(nonce)),
        "gen = 1".to_owned(),
        format!("user_id = {user_id}"),
        format!("type = {}", token_type.as_str()),
    ];
    if guest {
        caveats.push("guest = true".to_owned());
    }
    caveats.extend(device_id.map(|d| format!("device_id = {d}")));
    caveats.extend(expires_at_ms.map(|at| format!("time < {at}")));
    caveats
}

// ---- The store's state ------------------------------------------------------------------------

/// What the store knows of one session.
#[derive(Debug, Clone)]
pub struct State {
    /// The user whose token created the state: no other user's token reads or changes it.
    owner: String,
    live: u32,
    /// Minted by a rotating refresh, not used yet.
    pending: Option<u32>,
    next: u32,
    logged_out: bool,
    /// Until when the store keeps it: a sweep at `now >= until` forgets it.
    until: u64,
    /// The generation last refreshed at `/v3/refresh` and when first, unless `/r0/tokenrefresh`
    /// refreshed since.
    last_rotated: Option<(u32, u64)>,
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
            last_rotated: None,
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

/// The store's answer on a token: valid, or revoked (`for_good`: whatever comes later but a
/// sweep; a generation that no refresh minted yet may still come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    Valid,
    Revoked { for_good: bool },
}

/// A token whose signature and caveats hold, as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub user_id: String,
    /// From the issuer's session nonce (the token's first caveat, in the grammar); otherwise the
    /// token's own `TokenId`.
    pub session: u128,
    /// 0 without a session nonce.
    pub generation: u32,
    /// The user's floor when the session began: 0 without a session nonce, so that every "log
    /// out everywhere" of the user, before or after it was minted, revokes it.
    pub epoch: u64,
    /// The issuer's session nonce.
    pub nonce: Option<Nonce>,
    /// The session nonce names another kind of token than the token's type.
    pub contradicts: bool,
    /// Until when a record about it is kept: the session's expiry from the nonce, otherwise the
    /// token's own `time <` (the earliest); plus the leeway; never forgotten without one.
    pub keep_until: u64,
}

impl Position {
    /// A token of `token_type` whose first caveat is the session nonce `nonce`.
    pub fn of_session(user_id: &str, nonce: Nonce, token_type: TokenType) -> Self {
        Self {
            user_id: user_id.to_owned(),
            session: nonce.session,
            generation: nonce.generation,
            epoch: nonce.epoch,
            nonce: Some(nonce),
            contradicts: nonce.kind != kind_of(token_type),
            keep_until: keep(nonce.expires_ms),
        }
    }

    /// A token without a session nonce: a session of its own, named by its `TokenId`
    /// (`token_id`), generation 0, epoch 0, kept until `expires` (plus the leeway).
    pub fn of_own(user_id: &str, token_id: u128, expires: Option<u64>) -> Self {
        Self {
            user_id: user_id.to_owned(),
            session: token_id,
            generation: 0,
            epoch: 0,
            nonce: None,
            contradicts: false,
            keep_until: keep(expires),
        }
    }

    /// Where a token the caveat table accepted (expired or not) sits, from its caveats (as
    /// `(identifier, third_party)`) and the identity the table read: the issuer's session nonce
    /// when the token's first caveat is one (a nonce in the grammar), otherwise (minted
    /// elsewhere, or a nonce a holder appended) a session of its own named by its `TokenId`,
    /// which the caller computes.
    pub fn of_token(
        caveats: &[(Vec<u8>, bool)],
        identity: &Identity,
        token_type: TokenType,
        token_id: u128,
    ) -> Check<Self> {
        let first = caveats.first().and_then(|(id, _)| caveat_parts(id));
        let session_nonce = match first {
            Some(("nonce", "=", value)) => {
                ensure_eq!(identity.nonce.as_deref(), Some(value), "the first nonce");
                nonce_grammar(value)
            }
            _ => None,
        };
        Ok(match session_nonce {
            Some(nonce) => Self::of_session(&identity.user_id, nonce, token_type),
            // A record speaks for every token with this first nonce (the minter's and its
            // attenuations): they all expire by the earliest `time <` written before that nonce,
            // and may never expire without one. Without a nonce, for this very token.
            None => Self::of_own(
                &identity.user_id,
                token_id,
                match identity.nonce {
                    Some(_) => expiry_before_first_nonce(caveats),
                    None => identity.expires_at_ms,
                },
            ),
        })
    }
}

/// The earliest `time <` among the caveats before the first `nonce`.
fn expiry_before_first_nonce(caveats: &[(Vec<u8>, bool)]) -> Option<u64> {
    let mut earliest: Option<u64> = None;
    for (id, _) in caveats {
        match caveat_parts(id) {
            Some(("nonce", _, _)) => break,
            Some(("time", "<", value)) => {
                let at: u64 = value.parse().expect("the caveat table accepted it");
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
            }
            _ => {}
        }
    }
    earliest
}

/// A token as the verifier sees it (the caveat table says, or the driver knows what it minted)
/// and, when its signature and caveats hold, where it sits.
#[derive(Debug, Clone)]
pub enum Seen {
    /// Verifies now.
    Current(Position),
    /// Valid in every respect but its `time <`.
    Expired(Position),
    /// Refused by the verifier; `may_hold_later`: it has a `time >` or `time ==` caveat.
    Refused { may_hold_later: bool },
}

impl Seen {
    /// A token of this run's issuer (its signature and caveats hold), expiring at `expires`.
    pub fn minted(at: Position, expires: Option<u64>, now: u64) -> Self {
        match expires {
            Some(at_ms) if now >= at_ms => Seen::Expired(at),
            _ => Seen::Current(at),
        }
    }
}

/// The layer's answer on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The request reached the inner service.
    Ok,
    /// 401 `M_UNKNOWN_TOKEN`, no soft logout.
    Unknown,
    /// 401 `M_UNKNOWN_TOKEN` with `soft_logout: true`.
    SoftLogout,
}

/// How a refresh endpoint refuses a token: `/v3/refresh` 401 `M_UNKNOWN_TOKEN`,
/// `/r0/tokenrefresh` 403 `M_FORBIDDEN`.
pub fn refusal(mode: RefreshMode) -> (u16, &'static str) {
    match mode {
        RefreshMode::Rotating => (401, "M_UNKNOWN_TOKEN"),
        RefreshMode::SingleUse => (403, "M_FORBIDDEN"),
    }
}

/// Tokens once refused, with the sessions whose state refused them: a sweep that forgets one of
/// those sessions lets the token be judged afresh.
type Refused = HashMap<Vec<u8>, Vec<u128>>;

// ---- The model --------------------------------------------------------------------------------

/// The refresh policy the engine runs with (`Sessions::refresh_policy`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    pub grace_ms: u64,
    /// A replay outside the window logs the session out.
    pub revoke: bool,
}

/// The engine as the docs describe it: the store's sessions and floors, what the issuer minted,
/// and what was refused for good.
pub struct Model {
    lifetimes: Lifetimes,
    policy: Policy,
    sessions: HashMap<u128, State>,
    /// User → floor: raised by each "log out everywhere" to max(floor + 1, now).
    floors: HashMap<String, u64>,
    /// Sessions whose state (more than "generation 0 live") a sweep forgot.
    forgotten: HashSet<u128>,
    /// Every nonce this run's issuer wrote.
    minted_nonces: HashSet<String>,
    /// Refresh tokens a refresh endpoint refused for good.
    refused_refresh: Refused,
    /// Login tokens `redeem_login_token` refused or used, for good.
    refused_login: Refused,
    /// Tokens the layer refused as unknown or revoked (anywhere) for good.
    refused_unknown: Refused,
    /// Tokens the layer refused as expired (off the logout routes).
    refused_expired: HashSet<Vec<u8>>,
}

impl Model {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Self::with_policy(lifetimes, Policy::default())
    }

    pub fn with_policy(lifetimes: Lifetimes, policy: Policy) -> Self {
        Self {
            lifetimes,
            policy,
            sessions: HashMap::new(),
            floors: HashMap::new(),
            forgotten: HashSet::new(),
            minted_nonces: HashSet::new(),
            refused_refresh: HashMap::new(),
            refused_login: HashMap::new(),
            refused_unknown: HashMap::new(),
            refused_expired: HashSet::new(),
        }
    }

    /// The user's "log out everywhere" floor (the store's `user_floor`).
    pub fn floor(&self, user_id: &str) -> u64 {
        self.floors.get(user_id).copied().unwrap_or(0)
    }

    /// How many sessions the store holds state for (`MemoryStore::len`).
    pub fn stored(&self) -> usize {
        self.sessions.len()
    }

    /// The earliest instant until which the store keeps a state that says more than no state
    /// at all, if it keeps any: a store forgetting such a state before the model does would be
    /// seen; another state (its generation 0 live, nothing else) is as good as none.
    pub fn earliest_until(&self) -> Option<u64> {
        let informative = self.sessions.values().filter(|state| state.informative());
        informative.map(|state| state.until).min()
    }

    // ---- Minting ----

    /// What a login of `user_id` at `now` mints: generation 0 of `session` (random: the caller
    /// reads it from the answer), which starts now, in the user's current epoch (their floor).
    /// Nothing is stored.
    pub fn login(&self, session: u128, user_id: &str, refresh: bool, now: u64) -> Generation {
        let lifetimes = &self.lifetimes;
        let access_lifetime_ms = lifetimes.access(refresh);
        Generation {
            nonce: Nonce {
                session,
                generation: 0,
                issued_ms: now,
                kind: 'a',
                started_ms: now,
                epoch: self.floor(user_id),
                expires_ms: lifetimes.session_expiry(refresh, Some(0), now),
            },
            access_lifetime_ms,
            access_expires_ms: access_lifetime_ms.map(|l| now + l),
            refresh_expires_ms: lifetimes.refresh_ms.filter(|_| refresh).map(|l| now + l),
        }
    }

    /// What `login_token(user_id)` at `now` mints: a session of its own, kind `l`, in the
    /// user's current epoch, for the login lifetime.
    pub fn login_token(&self, session: u128, user_id: &str, now: u64) -> Generation {
        let expires = now + self.lifetimes.login_ms;
        Generation {
            nonce: Nonce {
                session,
                generation: 0,
                issued_ms: now,
                kind: 'l',
                started_ms: now,
                epoch: self.floor(user_id),
                expires_ms: Some(expires),
            },
            access_lifetime_ms: Some(self.lifetimes.login_ms),
            access_expires_ms: Some(expires),
            refresh_expires_ms: None,
        }
    }

    /// The successor a refresh at `now` mints from a refresh token with session nonce `of`: the
    /// session, its start and its epoch inherited, its expiry covering the session's tokens so
    /// far and the new ones.
    fn successor(&self, of: &Nonce, generation: u32, now: u64) -> Generation {
        let lifetimes = &self.lifetimes;
        let access_lifetime_ms = Some(lifetimes.refreshable_access_ms);
        Generation {
            nonce: Nonce {
                session: of.session,
                generation,
                issued_ms: now,
                kind: 'a',
                started_ms: of.started_ms,
                epoch: of.epoch,
                expires_ms: lifetimes.session_expiry(true, of.expires_ms, now),
            },
            access_lifetime_ms,
            access_expires_ms: access_lifetime_ms.map(|l| now + l),
            refresh_expires_ms: lifetimes.refresh_ms.map(|l| now + l),
        }
    }

    /// A token the issuer just minted carries the session nonce `text`: the one expected (so
    /// stamped with the clock, never ahead of it), in the grammar, read alike by
    /// `TokenNonce::parse`. Remembered as one this run's issuer wrote.
    pub fn minted(&mut self, text: &str, expected: &Nonce) -> Check {
        ensure_eq!(
            nonce_grammar(text),
            Some(*expected),
            "the session nonce {text:?} of a minted token"
        );
        ensure_eq!(
            text,
            canonical_nonce(expected),
            "the spelling of a minted session nonce"
        );
        check_nonce(text)?;
        self.minted_nonces.insert(text.to_owned());
        Ok(())
    }

    // ---- The store ----

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

    /// The store's verdict on a token whose signature and caveats hold (what the layer's check
    /// says), recording a first use.
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
    fn refresh_state(
        &mut self,
        at: &Position,
        mode: RefreshMode,
        until: u64,
        now: u64,
    ) -> Result<u32, Judged> {
        let user_revoked = self.floor(&at.user_id) > at.epoch;
        let policy = self.policy;
        let refused = Judged::Revoked { for_good: true };
        let state = self.state_mut(at.session, &at.user_id).ok_or(refused)?;
        if user_revoked {
            return Err(refused);
        }
        // Within the window of the generation last rotated: that generation's token, or one its
        // rotations minted (a successor replaced before anyone used it).
        let in_window = |state: &State| {
            state.last_rotated.is_some_and(|(last, first)| {
                at.generation >= last && now < first.saturating_add(policy.grace_ms)
            })
        };
        match state.standing(at.generation) {
            Standing::Revoked if state.logged_out => return Err(refused),
            Standing::Revoked => {
                if mode == RefreshMode::Rotating && in_window(state) {
                    state.until = state.until.max(until);
                    return Ok(state.live);
                }
                // A successor replaced before anyone used it: refused, no replay. Generations
                // are used in order, so one above the live one was never used; nor was one that
                // the last rotated generation's refreshes minted and that is not live.
                let never_used = at.generation > state.live
                    || state
                        .last_rotated
                        .is_some_and(|(last, _)| at.generation > last);
                // A replay.
                if mode == RefreshMode::Rotating && !never_used && policy.revoke {
                    state.revoke(until);
                }
                // A single-use refusal inside a window may still be granted at /v3/refresh.
                let for_good = state.for_good(at.generation) && !in_window(state);
                return Err(Judged::Revoked { for_good });
            }
            Standing::FirstUse => state.first_use(at.generation),
            Standing::Valid => {}
        }
        let successor = state.next;
        state.next = state.next.checked_add(1).ok_or(refused)?;
        match mode {
            // The old pair stays valid until the successor is first used; refreshing the old
            // token again replaces an unused successor.
            RefreshMode::Rotating => {
                state.pending = Some(successor);
                if state.last_rotated.map(|(generation, _)| generation) != Some(at.generation) {
                    state.last_rotated = Some((at.generation, now));
                }
            }
            // Strictly single use: the old pair dies at once.
            RefreshMode::SingleUse => {
                state.live = successor;
                state.pending = None;
                state.last_rotated = None;
            }
        }
        state.until = state.until.max(until);
        Ok(successor)
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

    /// The docs' promise about what a store records: kept until every token it speaks for has
    /// stopped verifying. A token that verifies now (not expired) and belongs to a session whose
    /// state a sweep forgot shows the state was forgotten too early: for a token minted elsewhere
    /// (whose session is its `TokenId`, shared by every attenuation of it, or the chain through
    /// its first `time <`), always; for a session nonce, when this run's issuer wrote it and it
    /// says the session still has a token that has not expired (a nonce minted elsewhere is
    /// trusted as written).
    ///
    /// The fuzz seeds `regression-sweep-attenuated-*` replay the bug this found: records of
    /// tokens without a session nonce were kept until the `time <` of the token that made them,
    /// a holder's appended one included.
    fn not_forgotten(&self, session: u128, at: &Position, what: &str, now: u64) -> Check {
        if !self.forgotten.contains(&session) {
            return Ok(());
        }
        let speaks_for = match &at.nonce {
            None => true,
            Some(nonce) => {
                self.minted_nonces.contains(&canonical_nonce(nonce))
                    && nonce
                        .expires_ms
                        .is_none_or(|at| now < at.saturating_add(LEEWAY_MS))
            }
        };
        ensure!(
            !speaks_for,
            "{what}: the store forgot the state of session {session:032x} while a token of it \
             still verifies ({at:?}, now {now})"
        );
        Ok(())
    }

    // ---- The operations ----

    /// A request with `token` through the layer (`allow_expired`: a logout route, where expired
    /// tokens are let through), which the engine answered `got` (`None`: anything else than the
    /// three answers). The store is asked about every token whose signature and caveats hold,
    /// expired or not, and records the first use of a pending generation. Returns where the token
    /// sits when it passed: the session a `/logout` or `/logout/all` behind the layer logs out.
    pub fn layer(
        &mut self,
        token: &[u8],
        seen: &Seen,
        allow_expired: bool,
        now: u64,
        got: Option<Answer>,
    ) -> Check<Option<Position>> {
        let (at, judged, expired) = match seen {
            Seen::Current(at) => {
                self.not_forgotten(at.session, at, "the layer", now)?;
                (Some(at), self.judge(at), false)
            }
            Seen::Expired(at) => (Some(at), self.judge(at), true),
            Seen::Refused { may_hold_later } => (
                None,
                Judged::Revoked {
                    for_good: !may_hold_later,
                },
                false,
            ),
        };
        let expected = match judged {
            // Revoked beats expired.
            Judged::Revoked { .. } => Answer::Unknown,
            Judged::Valid if expired && !allow_expired => Answer::SoftLogout,
            Judged::Valid => Answer::Ok,
        };
        ensure!(
            got == Some(expected),
            "the layer: got {got:?}, the model says {expected:?} (the store: {judged:?}; \
             expired: {expired}; logout route: {allow_expired}; {at:?})"
        );
        match judged {
            Judged::Revoked { for_good: true } => {
                let sessions = at.iter().map(|at| at.session).collect();
                self.refused_unknown.insert(token.to_vec(), sessions);
            }
            Judged::Revoked { for_good: false } => {}
            Judged::Valid if expected == Answer::SoftLogout => {
                self.refused_expired.insert(token.to_vec());
            }
            Judged::Valid => {
                ensure!(
                    !self.refused_unknown.contains_key(token),
                    "a token the layer refused passed"
                );
                ensure!(
                    allow_expired || !self.refused_expired.contains(token),
                    "an expired token passed"
                );
            }
        }
        Ok(at.filter(|_| expected == Answer::Ok).cloned())
    }

    /// `/logout` behind the layer with a token that passed: its whole session.
    pub fn logout(&mut self, at: &Position) {
        // Nothing if the session belongs to another user.
        if let Some(state) = self.state_mut(at.session, &at.user_id) {
            state.revoke(at.keep_until);
        }
    }

    /// `/logout/all` behind the layer with a token that passed, at `now`: the user's floor rises
    /// above every epoch handed out so far (a session that begins later is spared), and the
    /// session of the token that asked is logged out (the spec: "This includes the access token
    /// that made this request").
    pub fn logout_all(&mut self, at: &Position, now: u64) {
        self.raise_floor(&at.user_id, now);
        self.logout(at);
    }

    /// A refresh endpoint (`mode`) given `token` at `now` in a well-formed request, which the
    /// engine answered with new tokens (`Ok`) or a refusal (status, errcode). Only a refresh
    /// token that verifies now, whose first caveat is the issuer's session nonce of kind `r`
    /// (whatever nonce it carries further on), is exchanged, unless the store refuses it.
    /// Returns what the successor must be.
    pub fn refresh(
        &mut self,
        token: &[u8],
        seen: &Seen,
        mode: RefreshMode,
        now: u64,
        got: Result<(), (u16, &str)>,
    ) -> Check<Option<Generation>> {
        let for_good = Judged::Revoked { for_good: true };
        let (outcome, sessions) = match seen {
            Seen::Current(at) => match at.nonce.filter(|nonce| nonce.kind == 'r') {
                Some(nonce) => {
                    self.not_forgotten(at.session, at, "refresh", now)?;
                    // The store keeps the session's state until its successor's tokens have
                    // expired too.
                    let expires = self.lifetimes.session_expiry(true, nonce.expires_ms, now);
                    let outcome = self
                        .refresh_state(at, mode, keep(expires), now)
                        .map(|generation| self.successor(&nonce, generation, now));
                    (outcome, vec![at.session])
                }
                None => (Err(for_good), vec![]),
            },
            Seen::Expired(_) => (Err(for_good), vec![]),
            Seen::Refused { may_hold_later } => (
                Err(Judged::Revoked {
                    for_good: !may_hold_later,
                }),
                vec![],
            ),
        };
        match (outcome, got) {
            (Ok(successor), Ok(())) => {
                ensure!(
                    !self.refused_refresh.contains_key(token),
                    "a refused refresh token was accepted"
                );
                Ok(Some(successor))
            }
            (Err(judged), Err(answer)) => {
                ensure_eq!(answer, refusal(mode), "a refused {mode:?} refresh");
                if judged == for_good {
                    self.refused_refresh.insert(token.to_vec(), sessions);
                }
                Ok(None)
            }
            (Ok(successor), Err(answer)) => Err(format!(
                "a {mode:?} refresh: got {answer:?}, the model mints generation {}",
                successor.nonce.generation
            )),
            (Err(judged), Ok(())) => Err(format!(
                "a {mode:?} refresh: got new tokens, the model refuses ({judged:?})"
            )),
        }
    }

    /// `redeem_login_token(token)` at `now`, which the engine answered `redeemed` (used up, or
    /// refused). A login token that verifies now is known by its session nonce (kind `l`; one of
    /// another kind is refused) or, minted elsewhere, by `chain`: the HMAC chain through its
    /// first `time <` as a `TokenId` of a signature is hashed, and that `time <` (refused
    /// without one); the store's check passes; its first use. Returns whether it was used up.
    pub fn redeem(
        &mut self,
        token: &[u8],
        seen: &Seen,
        chain: Option<(u128, u64)>,
        now: u64,
        redeemed: bool,
    ) -> Check<bool> {
        let (expected, sessions) = match seen {
            Seen::Current(at) => {
                let once = match at.nonce {
                    Some(nonce) if nonce.kind == 'l' => Some((at.session, at.keep_until)),
                    Some(_) => None,
                    // Every token with that chain expires by its first `time <`.
                    None => chain.map(|(once, expires)| (once, keep(Some(expires)))),
                };
                match once {
                    None => (Err(true), vec![]),
                    Some((once, keep_until)) => {
                        self.not_forgotten(at.session, at, "redeem_login_token (check)", now)?;
                        self.not_forgotten(once, at, "redeem_login_token (use)", now)?;
                        let sessions = vec![at.session, once];
                        match self.judge(at) {
                            Judged::Revoked { for_good } => (Err(for_good), sessions),
                            Judged::Valid => match self.consume(once, &at.user_id, keep_until) {
                                true => (Ok(()), sessions),
                                false => (Err(true), sessions),
                            },
                        }
                    }
                }
            }
            Seen::Expired(_) => (Err(true), vec![]),
            Seen::Refused { may_hold_later } => (Err(!may_hold_later), vec![]),
        };
        match (redeemed, expected) {
            (true, Ok(())) => {
                ensure!(
                    !self.refused_login.contains_key(token),
                    "a refused login token was accepted"
                );
                // Single use.
                self.refused_login.insert(token.to_vec(), sessions);
                Ok(true)
            }
            (false, Err(for_good)) => {
                if for_good {
                    self.refused_login.insert(token.to_vec(), sessions);
                }
                Ok(false)
            }
            (redeemed, expected) => Err(format!(
                "redeem_login_token: used up {redeemed}, the model says {expected:?} \
                 (`Err(for good)`)"
            )),
        }
    }

    /// The store forgets what it keeps until `now` or earlier (`MemoryStore::sweep`, or
    /// `PostgresStore::purge_expired` at its clock's `now`); returns how many sessions it
    /// forgot. A token refused by a state now forgotten is judged afresh.
    pub fn sweep(&mut self, now: u64) -> usize {
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
        if !gone.is_empty() {
            let judged_again =
                |sessions: &mut Vec<u128>| !sessions.iter().any(|s| gone.contains(s));
            self.refused_refresh.retain(|_, s| judged_again(s));
            self.refused_login.retain(|_, s| judged_again(s));
            self.refused_unknown.retain(|_, s| judged_again(s));
        }
        gone.len()
    }
}
