//! Minting the tokens of a session: access, refresh, guest and login tokens, each with a nonce
//! that names its session, its generation and what a store needs to judge it.
//!
//! The nonce each token carries, and what it records, is [`TokenNonce`]'s (`nonce.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::hooks::clock::{millis, Clock, SystemClock};
use crate::identity::{MatrixUser, TokenType};
use crate::lifecycle::nonce::{NonceKind, SessionId, TokenNonce};
use crate::macaroon::keys::KeyRing;
use crate::macaroon::wire::MacaroonFormat;

/// Default lifetime of a login token: two minutes, as Synapse.
pub const DEFAULT_LOGIN_TOKEN_LIFETIME: Duration = Duration::from_secs(120);
/// Default lifetime of an access token that comes with a refresh token: five minutes, as
/// Synapse's `refreshable_access_token_lifetime`.
pub const DEFAULT_REFRESHABLE_ACCESS_LIFETIME: Duration = Duration::from_secs(300);

/// The tokens of one login or one refresh.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IssuedTokens {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when one was asked for.
    pub refresh_token: Option<String>,
    /// How long the access token lives, when it expires.
    pub expires_in_ms: Option<u64>,
    /// The access token's expiry, ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// The refresh token's expiry, ms since the epoch.
    pub refresh_expires_at_ms: Option<u64>,
    /// The session both tokens belong to.
    pub session: SessionId,
    /// Their generation.
    pub generation: u32,
    /// The latest expiry of any token of the session so far, these included (`None`: one
    /// never expires).
    pub session_expires_ms: Option<u64>,
}

impl fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_in_ms", &self.expires_in_ms)
            .field("session", &self.session)
            .field("generation", &self.generation)
            .finish()
    }
}

/// What a new session is for: `SessionRequest::new().device_id("PHONE").refresh(true)`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SessionRequest {
    /// The device the tokens are issued to.
    pub device_id: Option<String>,
    /// Whether to issue a refresh token (and so an expiring access token).
    pub refresh: bool,
    /// Whether the user is a guest.
    pub guest: bool,
}

impl SessionRequest {
    /// A session without a device, a refresh token or guest access.
    pub fn new() -> Self {
        Self::default()
    }

    /// Issues the tokens to `device_id`.
    pub fn device_id(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    /// Whether to issue a refresh token (and so an expiring access token).
    pub fn refresh(mut self, refresh: bool) -> Self {
        self.refresh = refresh;
        self
    }

    /// Whether the user is a guest.
    pub fn guest(mut self, guest: bool) -> Self {
        self.guest = guest;
        self
    }
}

/// Mints tokens with a key ring's minting key.
///
/// Access tokens carry `gen = 1`, `user_id`, `type = access`, `nonce`, then `guest = true`,
/// `device_id` and `time <` when they apply. Without a device those are all caveats Synapse
/// understood, so pymacaroons with Synapse's rules accepts them; a `device_id` caveat is this
/// crate's, and Synapse 1.33's `validate_macaroon` refuses it. See [`crate::Sessions`] for the
/// session nonce and the lifetimes.
#[must_use = "a configuration unused configures nothing: builder methods return the configured value"]
#[derive(Clone)]
pub struct Issuer {
    keys: KeyRing,
    clock: Arc<dyn Clock>,
    location: Option<String>,
    access_lifetime_ms: Option<u64>,
    refreshable_access_lifetime_ms: u64,
    refresh_lifetime_ms: Option<u64>,
    login_lifetime_ms: u64,
    session_lifetime_ms: Option<u64>,
    format: MacaroonFormat,
}

impl Issuer {
    /// An issuer with the system clock: access tokens without refresh never expire (as
    /// Synapse's default), refreshable ones live five minutes, refresh tokens do not expire, login
    /// tokens live two minutes; V1 base64url without padding.
    pub fn new(keys: KeyRing) -> Self {
        assert!(
            !keys.is_empty(),
            "an Issuer needs a key ring with a minting key"
        );
        Self {
            keys,
            clock: Arc::new(SystemClock),
            location: None,
            access_lifetime_ms: None,
            refreshable_access_lifetime_ms: millis(DEFAULT_REFRESHABLE_ACCESS_LIFETIME),
            refresh_lifetime_ms: None,
            login_lifetime_ms: millis(DEFAULT_LOGIN_TOKEN_LIFETIME),
            session_lifetime_ms: None,
            format: MacaroonFormat::V1,
        }
    }

    /// Replaces the clock.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Shares a clock with a verifier or layer.
    pub fn shared_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The location written into tokens (Synapse wrote the server name; it is not signed).
    pub fn location(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }

    /// Lifetime of access tokens issued without a refresh token (default: none).
    pub fn access_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.access_lifetime_ms = lifetime.map(millis);
        self
    }

    /// Lifetime of access tokens issued with a refresh token (default: five minutes).
    pub fn refreshable_access_lifetime(mut self, lifetime: Duration) -> Self {
        self.refreshable_access_lifetime_ms = millis(lifetime);
        self
    }

    /// Lifetime of refresh tokens (default: none).
    pub fn refresh_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.refresh_lifetime_ms = lifetime.map(millis);
        self
    }

    /// How long a session lives from its login, whatever its refreshes (default: no limit; as
    /// Synapse's `session_lifetime`): every token of the session expires by then, and a refresh
    /// after it fails, so the client logs in again. It also bounds what a store keeps about the
    /// session, whatever the other lifetimes.
    pub fn session_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.session_lifetime_ms = lifetime.map(millis);
        self
    }

    /// Lifetime of login tokens (default: two minutes).
    pub fn login_lifetime(mut self, lifetime: Duration) -> Self {
        self.login_lifetime_ms = millis(lifetime);
        self
    }

    /// The serialization of minted tokens (default V1, as Synapse).
    pub fn format(mut self, format: MacaroonFormat) -> Self {
        self.format = format;
        self
    }

    /// The key ring.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// The current time as the issuer sees it.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The longest any token minted here can live, `None` if some never expire.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime_ms().map(Duration::from_millis)
    }

    pub(crate) fn max_lifetime_ms(&self) -> Option<u64> {
        Some(self.longest_session_token_ms()?.max(self.login_lifetime_ms))
    }

    /// The longest an access or refresh token (the tokens of a session) can live, `None` if some
    /// never expire: then what a store records about sessions is kept for good.
    pub(crate) fn longest_session_token_ms(&self) -> Option<u64> {
        let tokens = (|| {
            let refresh = self.refresh_lifetime_ms?;
            let access = self.access_lifetime_ms?;
            Some(refresh.max(access).max(self.refreshable_access_lifetime_ms))
        })();
        match (tokens, self.session_lifetime_ms) {
            (Some(tokens), Some(session)) => Some(tokens.min(session)),
            (tokens, session) => tokens.or(session),
        }
    }

    /// When a session that began at `started_ms` ends, if it has a lifetime.
    pub(crate) fn session_end_ms(&self, started_ms: u64) -> Option<u64> {
        self.session_lifetime_ms
            .map(|l| started_ms.saturating_add(l))
    }

    fn mint(
        &self,
        user_id: &str,
        token_type: TokenType,
        nonce: TokenNonce,
        guest: bool,
        device_id: Option<&str>,
        expires_at_ms: Option<u64>,
    ) -> String {
        let mut builder = self
            .keys
            .mint(user_id, token_type)
            .expect("checked in Issuer::new")
            .session_nonce(nonce.to_string());
        if let Some(location) = &self.location {
            builder = builder.location(location.clone());
        }
        if guest {
            builder = builder.guest();
        }
        if let Some(device_id) = device_id {
            builder = builder.device_id(device_id);
        }
        if let Some(at) = expires_at_ms {
            builder = builder.expires_at_ms(at);
        }
        builder.serialize(self.format)
    }

    /// Mints the tokens of one generation of a session. `session` carries what every generation
    /// inherits: the session id, its start, its epoch, and the latest expiry of its tokens so
    /// far (`None` when one never expires).
    fn generation(
        &self,
        user_id: &str,
        session: SessionStart,
        generation: u32,
        request: &SessionRequest,
        now: u64,
    ) -> IssuedTokens {
        let started_ms = session.started_ms.unwrap_or(now);
        let expiries = self.expiries(request.refresh, now, started_ms, session.expires_ms);
        let device_id = request.device_id.as_deref();
        let nonce = |kind| TokenNonce {
            session: session.id,
            generation,
            issued_ms: now,
            kind,
            started_ms,
            epoch: session.epoch,
            session_expires_ms: expiries.session_ms,
        };
        let access_token = self.mint(
            user_id,
            TokenType::Access,
            nonce(NonceKind::Access),
            request.guest,
            device_id,
            expiries.access_ms,
        );
        let refresh_token = request.refresh.then(|| {
            self.mint(
                user_id,
                TokenType::Refresh,
                nonce(NonceKind::Refresh),
                request.guest,
                device_id,
                expiries.refresh_ms,
            )
        });
        IssuedTokens {
            access_token,
            refresh_token,
            expires_in_ms: expiries.access_lifetime_ms,
            expires_at_ms: expiries.access_ms,
            refresh_expires_at_ms: expiries.refresh_ms.filter(|_| request.refresh),
            session: session.id,
            generation,
            session_expires_ms: expiries.session_ms,
        }
    }

    /// The expiries of a generation minted at `now`: the access token's lifetime and expiry, the
    /// refresh token's expiry, and the session's latest expiry once they are minted (`None`:
    /// never). One function, so that what a store is told and what is minted agree.
    fn expiries(
        &self,
        refresh: bool,
        now: u64,
        started_ms: u64,
        session_so_far: Option<u64>,
    ) -> Expiries {
        let access_lifetime = if refresh {
            Some(self.refreshable_access_lifetime_ms)
        } else {
            self.access_lifetime_ms
        };
        // Nothing outlives the session's end, when it has one.
        let end = self.session_end_ms(started_ms);
        let capped = |at: Option<u64>| match (at, end) {
            (Some(at), Some(end)) => Some(at.min(end)),
            (at, end) => at.or(end),
        };
        let access_ms = capped(access_lifetime.map(|l| now.saturating_add(l)));
        let refresh_ms = capped(self.refresh_lifetime_ms.map(|l| now.saturating_add(l)));
        // The latest expiry of the session's tokens, these included: a store keeps the session's
        // state that long, so no token of it can outlive its logout.
        let mut session_ms = latest(session_so_far, access_ms);
        if refresh {
            session_ms = latest(session_ms, refresh_ms);
        }
        Expiries {
            access_lifetime_ms: access_ms.map(|at| at.saturating_sub(now)),
            access_ms,
            refresh_ms,
            session_ms,
        }
    }

    /// The session's latest expiry once a refresh at `now` has minted the next generation.
    pub(crate) fn successor_session_expires_ms(&self, nonce: &TokenNonce, now: u64) -> Option<u64> {
        self.expiries(true, now, nonce.started_ms, nonce.session_expires_ms)
            .session_ms
    }

    /// Mints the first tokens of a new session (a login or a registration). `epoch` is the
    /// user's "log out everywhere" floor as the store knows it now
    /// ([`crate::store::TokenStore::user_floor`]): a later log-out-everywhere, which raises the
    /// floor, revokes the session.
    pub(crate) fn new_session(
        &self,
        user_id: &str,
        request: &SessionRequest,
        epoch: u64,
    ) -> IssuedTokens {
        let start = SessionStart {
            id: SessionId::random(),
            started_ms: None,
            epoch,
            expires_ms: Some(0),
        };
        self.generation(user_id, start, 0, request, self.clock.now_ms())
    }

    /// Mints the next generation, stamped `now`, for the session of a verified refresh token.
    pub(crate) fn successor(
        &self,
        refresh: &MatrixUser,
        nonce: &TokenNonce,
        generation: u32,
        now: u64,
    ) -> IssuedTokens {
        let request = SessionRequest {
            device_id: refresh.device_id().map(str::to_owned),
            refresh: true,
            guest: refresh.is_guest(),
        };
        let start = SessionStart {
            id: nonce.session,
            started_ms: Some(nonce.started_ms),
            epoch: nonce.epoch,
            expires_ms: nonce.session_expires_ms,
        };
        self.generation(refresh.user_id(), start, generation, &request, now)
    }

    /// Mints a single-use login token (`m.login.token`) for `user_id`, whose floor is `epoch`
    /// (see [`Issuer::new_session`]).
    pub(crate) fn login_token(&self, user_id: &str, epoch: u64) -> (String, u64) {
        let now = self.clock.now_ms();
        let expires_at = now.saturating_add(self.login_lifetime_ms);
        let nonce = TokenNonce {
            session: SessionId::random(),
            generation: 0,
            issued_ms: now,
            kind: NonceKind::Login,
            started_ms: now,
            epoch,
            session_expires_ms: Some(expires_at),
        };
        let token = self.mint(
            user_id,
            TokenType::Login,
            nonce,
            false,
            None,
            Some(expires_at),
        );
        (token, self.login_lifetime_ms)
    }
}

/// When the tokens of one generation expire (ms since the epoch; `None`: never).
struct Expiries {
    /// How long the access token lives from its minting.
    access_lifetime_ms: Option<u64>,
    access_ms: Option<u64>,
    refresh_ms: Option<u64>,
    /// The latest expiry of any token of the session, these included.
    session_ms: Option<u64>,
}

/// What a generation inherits from its session.
#[derive(Clone, Copy)]
struct SessionStart {
    id: SessionId,
    /// `None` for a new session: it starts now.
    started_ms: Option<u64>,
    epoch: u64,
    /// The latest expiry so far: `None` when a token never expires.
    expires_ms: Option<u64>,
}

/// The later of two expiries, where `None` is "never".
fn latest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(a?.max(b?))
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("keys", &self.keys)
            .field("access_lifetime_ms", &self.access_lifetime_ms)
            .field(
                "refreshable_access_lifetime_ms",
                &self.refreshable_access_lifetime_ms,
            )
            .field("refresh_lifetime_ms", &self.refresh_lifetime_ms)
            .field("login_lifetime_ms", &self.login_lifetime_ms)
            .field("session_lifetime_ms", &self.session_lifetime_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_nonce_is_the_first_caveat_and_names_the_whole_session() {
        use crate::{
            hooks::{Clock, ManualClock},
            MacaroonSecret, Verifier,
        };
        let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s"));
        let clock = ManualClock::new(1_000);
        let issuer = Issuer::new(keys.clone())
            .clock(clock.clone())
            .access_lifetime(Some(std::time::Duration::from_millis(50)))
            .refreshable_access_lifetime(std::time::Duration::from_millis(100))
            .refresh_lifetime(Some(std::time::Duration::from_millis(1_000)));
        let verifier = Verifier::new(keys).clock(clock.clone());
        let parts = http::Request::new(()).into_parts().0;
        let request = SessionRequest::new().refresh(true);
        let first = issuer.new_session("@a:b", &request, 7);
        let access = verifier
            .verify(first.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        let nonce = TokenNonce::of(&access).expect("the issuer's nonce is first");
        assert_eq!(
            (nonce.started_ms, nonce.epoch, nonce.session_expires_ms),
            (1_000, 7, Some(2_000))
        );
        assert!(nonce.matches(TokenType::Access) && !nonce.matches(TokenType::Refresh));
        // A refresh three ticks later inherits the start and the epoch, and pushes the expiry.
        clock.set_ms(1_003);
        let refresh = verifier
            .verify(
                first.refresh_token.as_ref().unwrap().as_bytes(),
                TokenType::Refresh,
                &parts,
            )
            .unwrap();
        let refresh_nonce = TokenNonce::of(&refresh).unwrap();
        let next = issuer.successor(&refresh, &refresh_nonce, 1, clock.now_ms());
        let next_access = verifier
            .verify(next.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        let next_nonce = TokenNonce::of(&next_access).unwrap();
        assert_eq!(
            (
                next_nonce.session,
                next_nonce.started_ms,
                next_nonce.epoch,
                next_nonce.session_expires_ms
            ),
            (nonce.session, 1_000, 7, Some(2_003))
        );
        // Refresh tokens that never expire make the session's expiry "never".
        let forever = Issuer::new(issuer.keys().clone()).clock(clock);
        let tokens = forever.new_session("@a:b", &request, 0);
        assert_eq!(tokens.session_expires_ms, None);
    }

    #[test]
    fn a_session_nonce_appended_by_a_holder_names_no_session() {
        use crate::{macaroon::attenuate, MacaroonSecret, Verifier};
        let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("s"));
        let verifier = Verifier::new(keys.clone());
        let parts = http::Request::new(()).into_parts().0;
        let issued = Issuer::new(keys.clone()).new_session("@a:b", &SessionRequest::default(), 0);
        let genuine = verifier
            .verify(issued.access_token.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        let session_nonce = genuine.nonce().unwrap().to_owned();
        // A token minted without a nonce, with the genuine session's nonce appended.
        let bare = keys.mint("@a:b", TokenType::Access).unwrap().to_token();
        let grafted = attenuate(&bare, &format!("nonce = {session_nonce}")).unwrap();
        let user = verifier
            .verify(grafted.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        assert_eq!(user.nonce(), Some(session_nonce.as_str()));
        assert_eq!(TokenNonce::of(&user), None);
        // Appending to the genuine token changes nothing either: the first nonce stays.
        let longer = attenuate(&issued.access_token, "nonce = other").unwrap();
        let user = verifier
            .verify(longer.as_bytes(), TokenType::Access, &parts)
            .unwrap();
        assert_eq!(TokenNonce::of(&user), TokenNonce::of(&genuine));
    }
}
