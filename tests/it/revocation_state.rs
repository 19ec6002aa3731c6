//! Revocation and single-use state against the review's findings, on both stores: a record
//! outlives every token it speaks for, "log out everywhere" wins against a refresh in flight, and
//! no token reaches a session its minter did not name.
//!
//! Each test fails on the code before the fix (say the commit messages): records were kept only
//! for the issuer's configured lifetimes counted from the logout and without the leeway, log out
//! everywhere compared mint times, and any `nonce` caveat in the crate's shape named a session.
#![cfg(feature = "postgres")]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{keys, mint_raw};
use tower_matrix_auth::store::{
    RefreshMode, RefreshOutcome, RefreshRequest, StoreFuture, TokenRef,
};
use tower_matrix_auth::{
    hooks::{Clock, ManualClock, Revocation, RevocationCheck, RevocationStatus, SystemClock},
    lifecycle::{IssuedTokens, SessionRequest},
    macaroon::attenuate,
    store::TokenStore,
    Issuer, MatrixUser, MemoryStore, PostgresStore, Sessions, TokenType, Verifier,
};

const LEEWAY_MS: u64 = 60_000;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Postgres,
}

/// One process's engine over one backend, with a clock that starts at the real time (the
/// PostgreSQL store purges by the real time).
struct Harness {
    backend: Backend,
    clock: ManualClock,
    memory: MemoryStore,
    postgres: Option<PostgresStore>,
    store: Arc<dyn TokenStore>,
    verifier: Verifier,
}

impl Harness {
    async fn new(backend: Backend) -> Self {
        let clock = ManualClock::new(SystemClock.now_ms());
        let memory = MemoryStore::new().with_clock(clock.clone());
        let postgres = match backend {
            Backend::Memory => None,
            Backend::Postgres => Some(
                PostgresStore::connect(&crate::common::pg::database_url())
                    .await
                    .unwrap(),
            ),
        };
        let store: Arc<dyn TokenStore> = match &postgres {
            Some(pg) => Arc::new(pg.clone()),
            None => Arc::new(memory.clone()),
        };
        let verifier = Verifier::new(keys())
            .clock(clock.clone())
            .leeway(std::time::Duration::from_millis(LEEWAY_MS));
        Self {
            backend,
            clock,
            memory,
            postgres,
            store,
            verifier,
        }
    }

    /// An engine whose issuer has short lifetimes, as SECURITY.md recommends.
    fn sessions(&self, issuer: Issuer) -> Sessions {
        Sessions::with_shared_store(
            issuer.shared_clock(Arc::new(self.clock.clone())),
            self.verifier.clone(),
            self.store.clone(),
        )
    }

    fn short_lived(&self) -> Sessions {
        self.sessions(
            Issuer::new(keys())
                .access_lifetime(Some(std::time::Duration::from_millis(1_000)))
                .refreshable_access_lifetime(std::time::Duration::from_millis(1_000))
                .refresh_lifetime(Some(std::time::Duration::from_millis(2_000)))
                .login_lifetime(std::time::Duration::from_millis(1_000)),
        )
    }

    /// Forgets whatever the store considers expired, as its sweep and purge would, then answers
    /// from what is left (for PostgreSQL: a new process loading the table).
    async fn forget_expired(&mut self) {
        match self.backend {
            Backend::Memory => self.memory.sweep(),
            Backend::Postgres => {
                let pg = self.postgres.as_ref().unwrap();
                pg.purge_expired().await.unwrap();
                let fresh = PostgresStore::connect(&crate::common::pg::database_url())
                    .await
                    .unwrap();
                self.store = Arc::new(fresh.clone());
                self.postgres = Some(fresh);
            }
        }
    }

    fn user(&self, token: &str, token_type: TokenType) -> MatrixUser {
        let parts = http::Request::new(()).into_parts().0;
        self.verifier
            .verify(token.as_bytes(), token_type, &parts)
            .expect("the token verifies")
    }

    async fn status(&self, token: &str) -> RevocationStatus {
        self.store
            .check(&self.user(token, TokenType::Access))
            .await
            .unwrap()
    }
}

/// A user id unique to this run: the database outlives test runs on a developer's machine.
fn uid(name: &str) -> String {
    format!(
        "@{name}-{:x}:example.org",
        tower_matrix_auth::lifecycle::SessionId::random().as_u128() as u32
    )
}

fn with_refresh() -> SessionRequest {
    SessionRequest::new().device_id("D").refresh(true)
}

async fn each_backend<F, Fut>(test: F)
where
    F: Fn(Harness) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in [Backend::Memory, Backend::Postgres] {
        if let Backend::Postgres = backend {
            if crate::common::pg::skip() {
                continue;
            }
        }
        eprintln!("backend: {backend:?}");
        test(Harness::new(backend).await).await;
    }
}

/// Finding 1: a Synapse-era token (a 16-character nonce, no `time <`) stays logged out after the
/// sweep, although the issuer's lifetimes are short: nothing bounds the token itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_out_token_without_expiry_stays_logged_out_after_the_sweep() {
    each_backend(|mut h| async move {
        let user = uid("synapse-era");
        let token = mint_raw(&[
            "gen = 1",
            &format!("user_id = {user}"),
            "type = access",
            "nonce = kZ3pQx9LwT2mVbRc",
        ]);
        let sessions = h.short_lived();
        sessions
            .logout(&h.user(&token, TokenType::Access))
            .await
            .unwrap();
        assert_eq!(h.status(&token).await, RevocationStatus::Revoked);
        // Well past every lifetime the issuer is configured with, and a day more.
        h.clock.advance_ms(86_400_000);
        tokio::time::sleep(Duration::from_millis(5)).await;
        h.forget_expired().await;
        assert_eq!(h.status(&token).await, RevocationStatus::Revoked);
    })
    .await;
}

/// Finding 1: a token minted under an older, longer lifetime outlives the new configuration;
/// its logout must too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_under_a_longer_lifetime_stays_logged_out() {
    each_backend(|mut h| async move {
        let user = uid("long-lived");
        let before = h.sessions(
            Issuer::new(keys())
                .access_lifetime(Some(std::time::Duration::from_millis(30 * 86_400_000))),
        );
        let long = before.login(&user, &SessionRequest::default());
        // The homeserver restarts with one-second tokens and logs the old one out.
        let after = h.short_lived();
        after
            .logout(&h.user(&long.access_token, TokenType::Access))
            .await
            .unwrap();
        h.clock.advance_ms(86_400_000);
        h.forget_expired().await;
        assert_eq!(
            h.status(&long.access_token).await,
            RevocationStatus::Revoked
        );
    })
    .await;
}

/// Finding 1, with a clock leeway: a login token verifies until its `time <` plus the leeway, so
/// its use must be remembered that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_token_cannot_be_redeemed_twice_within_the_leeway() {
    each_backend(|mut h| async move {
        let sessions = h.short_lived();
        let user = uid("login-leeway");
        let parts = http::Request::new(()).into_parts().0;
        // One minted here and one minted elsewhere (Synapse's shape: no nonce, a `time <`).
        let (ours, lifetime) = sessions.login_token(&user);
        let expiry = h.clock.now_ms() + lifetime;
        let theirs = mint_raw(&[
            "gen = 1",
            &format!("user_id = {user}"),
            "type = login",
            &format!("time < {expiry}"),
        ]);
        for token in [&ours, &theirs] {
            assert!(sessions
                .redeem_login_token(token.as_bytes(), &parts)
                .await
                .is_ok());
        }
        // Past the `time <` by less than the leeway, and past it in real time too, so that
        // a purge by the real clock would drop a record kept only until the `time <`.
        h.clock.set_ms(expiry + LEEWAY_MS / 2);
        tokio::time::sleep(Duration::from_millis(lifetime + 200)).await;
        h.forget_expired().await;
        let sessions = h.short_lived();
        for token in [&ours, &theirs] {
            assert!(sessions
                .redeem_login_token(token.as_bytes(), &parts)
                .await
                .is_err());
        }
    })
    .await;
}

/// Finding 1, with a clock leeway: a `/r0/tokenrefresh` refresh token is single use until its
/// `time <` plus the leeway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_refresh_token_cannot_be_used_twice_within_the_leeway() {
    each_backend(|mut h| async move {
        let sessions = h.short_lived();
        let user = uid("refresh-leeway");
        let parts = http::Request::new(()).into_parts().0;
        let login = sessions.login(&user, &with_refresh());
        let refresh = login.refresh_token.unwrap();
        let expiry = login.refresh_expires_at_ms.unwrap();
        sessions
            .refresh(refresh.as_bytes(), RefreshMode::SingleUse, &parts)
            .await
            .expect("first use");
        h.clock.set_ms(expiry + LEEWAY_MS / 2);
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        h.forget_expired().await;
        let sessions = h.short_lived();
        assert!(sessions
            .refresh(refresh.as_bytes(), RefreshMode::SingleUse, &parts)
            .await
            .is_err());
    })
    .await;
}

/// A store that stops between deciding a refresh and returning it, so that the engine mints the
/// successor only after the test let something else happen.
struct PausingStore {
    inner: Arc<dyn TokenStore>,
    decided: tokio::sync::Notify,
    resume: tokio::sync::Notify,
}

impl Revocation for PausingStore {
    fn check(&self, user: &MatrixUser) -> RevocationCheck {
        self.inner.check(user)
    }
}

impl TokenStore for PausingStore {
    fn refresh(
        &self,
        token: &TokenRef,
        request: &RefreshRequest,
    ) -> StoreFuture<'_, RefreshOutcome> {
        let (token, request) = (token.clone(), *request);
        Box::pin(async move {
            let decided = self.inner.refresh(&token, &request).await;
            self.decided.notify_one();
            self.resume.notified().await;
            decided
        })
    }
    fn revoke_session(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, ()> {
        self.inner.revoke_session(token, until_ms)
    }
    fn revoke_user(&self, user_id: &str, at_least: u64) -> StoreFuture<'_, u64> {
        self.inner.revoke_user(user_id, at_least)
    }
    fn user_floor(&self, user_id: &str) -> u64 {
        self.inner.user_floor(user_id)
    }
    fn consume_once(&self, token: &TokenRef, until_ms: u64) -> StoreFuture<'_, bool> {
        self.inner.consume_once(token, until_ms)
    }
}

/// Finding 4: a refresh the store decided just before `/logout/all` mints its successor after
/// it. Neither the successor nor anything it refreshes into may verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_wins_against_a_refresh_in_flight() {
    each_backend(|h| async move {
        let pausing = Arc::new(PausingStore {
            inner: h.store.clone(),
            decided: tokio::sync::Notify::new(),
            resume: tokio::sync::Notify::new(),
        });
        let sessions = Sessions::with_shared_store(
            Issuer::new(keys()).shared_clock(Arc::new(h.clock.clone())),
            h.verifier.clone(),
            pausing.clone(),
        );
        let user = uid("race");
        for mode in [RefreshMode::Rotating, RefreshMode::SingleUse] {
            let login = sessions.login(&user, &with_refresh());
            let refresh_token = login.refresh_token.clone().unwrap();
            let in_flight = {
                let sessions = sessions.clone();
                let token = refresh_token.clone();
                tokio::spawn(async move {
                    let parts = http::Request::new(()).into_parts().0;
                    sessions.refresh(token.as_bytes(), mode, &parts).await
                })
            };
            pausing.decided.notified().await;
            // Log out everywhere (with another session's token) while the successor is unminted,
            // a millisecond later than the decision, as a real clock would have it.
            h.clock.advance_ms(1);
            let other = sessions.login(&user, &SessionRequest::default());
            sessions
                .logout_all(&h.user(&other.access_token, TokenType::Access))
                .await
                .unwrap();
            h.clock.advance_ms(1);
            pausing.resume.notify_one();
            // The store decided before the logout: the successor is minted, and must not verify.
            let IssuedTokens { access_token, .. } = in_flight.await.unwrap().expect("decided");
            assert_eq!(
                h.status(&access_token).await,
                RevocationStatus::Revoked,
                "{mode:?}"
            );
            assert_eq!(
                h.status(&login.access_token).await,
                RevocationStatus::Revoked
            );
        }
        // And a login after the logout works.
        let after = sessions.login(&user, &SessionRequest::default());
        assert_eq!(
            h.status(&after.access_token).await,
            RevocationStatus::Active
        );
    })
    .await;
}

/// Finding 6: a holder of a token minted without a session nonce grafts another session's nonce
/// onto it: logging out with it must not log that session out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grafted_session_nonce_reaches_no_session() {
    each_backend(|h| async move {
        let sessions = h.short_lived();
        let victim = uid("victim");
        let victim_login = sessions.login(&victim, &with_refresh());
        let victim_nonce = h
            .user(&victim_login.access_token, TokenType::Access)
            .nonce()
            .unwrap()
            .to_owned();
        // The attacker's own token (another user), and one of the victim's user minted without
        // a nonce (a Synapse-era token a thief holds).
        for holder in [uid("attacker"), victim.clone()] {
            let bare = keys().mint(&holder, TokenType::Access).unwrap().to_token();
            let grafted = attenuate(&bare, &format!("nonce = {victim_nonce}")).unwrap();
            sessions
                .logout(&h.user(&grafted, TokenType::Access))
                .await
                .unwrap();
            assert_eq!(
                h.status(&victim_login.access_token).await,
                RevocationStatus::Active,
                "{holder}"
            );
        }
        // Nor displace the victim's pending refresh: a grafted refresh nonce is no refresh token.
        let parts = http::Request::new(()).into_parts().0;
        let refresh_nonce = victim_nonce.replacen(".a.", ".r.", 1);
        let bare = keys().mint(&victim, TokenType::Refresh).unwrap().to_token();
        let grafted = attenuate(&bare, &format!("nonce = {refresh_nonce}")).unwrap();
        assert!(sessions
            .refresh(grafted.as_bytes(), RefreshMode::Rotating, &parts)
            .await
            .is_err());
    })
    .await;
}

/// Finding 6: a refresh token minted without a session nonce is not exchanged, however many
/// fresh nonces its holder appends (each used to make a new single-use session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_without_the_issuers_nonce_is_never_exchanged() {
    each_backend(|h| async move {
        let sessions = h.short_lived();
        let user = uid("bare-refresh");
        let parts = http::Request::new(()).into_parts().0;
        let bare = keys().mint(&user, TokenType::Refresh).unwrap().to_token();
        for i in 0..3u128 {
            let fresh = format!("{:032x}.0.0.r.0.0.-", 0xfeed + i);
            let attenuated = attenuate(&bare, &format!("nonce = {fresh}")).unwrap();
            for mode in [RefreshMode::SingleUse, RefreshMode::Rotating] {
                assert!(sessions
                    .refresh(attenuated.as_bytes(), mode, &parts)
                    .await
                    .is_err());
            }
        }
        assert!(sessions
            .refresh(bare.as_bytes(), RefreshMode::SingleUse, &parts)
            .await
            .is_err());
    })
    .await;
}

/// Finding 6: a login token stays single use whatever its holder appends, a nonce included;
/// login tokens minted elsewhere with a nonce each work once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_tokens_stay_single_use_whatever_is_appended() {
    each_backend(|h| async move {
        let sessions = h.short_lived();
        let user = uid("login-append");
        let parts = http::Request::new(()).into_parts().0;
        let expiry = h.clock.now_ms() + 60_000;
        let (ours, _) = sessions.login_token(&user);
        let synapse = mint_raw(&[
            "gen = 1",
            &format!("user_id = {user}"),
            "type = login",
            &format!("time < {expiry}"),
        ]);
        let with_nonce = |nonce: &str| {
            mint_raw(&[
                "gen = 1",
                &format!("user_id = {user}"),
                "type = login",
                &format!("nonce = {nonce}"),
                &format!("time < {expiry}"),
            ])
        };
        let pymacaroons_a = with_nonce("aaaaaaaaaaaaaaaa");
        let pymacaroons_b = with_nonce("bbbbbbbbbbbbbbbb");
        for token in [&ours, &synapse, &pymacaroons_a, &pymacaroons_b] {
            assert!(
                sessions
                    .redeem_login_token(token.as_bytes(), &parts)
                    .await
                    .is_ok(),
                "first use"
            );
            for (i, extra) in ["nonce = again", "time < 99999999999999", "nonce = x.0.0.l"]
                .iter()
                .enumerate()
            {
                let appended = attenuate(token, extra).unwrap();
                assert!(
                    sessions
                        .redeem_login_token(appended.as_bytes(), &parts)
                        .await
                        .is_err(),
                    "appended #{i}"
                );
            }
        }
        // A login token minted elsewhere without `time <` cannot be told from its attenuations.
        let forever = mint_raw(&[
            "gen = 1",
            &format!("user_id = {user}"),
            "type = login",
            "nonce = cccccccccccccccc",
        ]);
        assert!(sessions
            .redeem_login_token(forever.as_bytes(), &parts)
            .await
            .is_err());
    })
    .await;
}

/// Finding 6: a session nonce whose kind is not the token's type is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_nonce_of_another_kind_is_refused() {
    each_backend(|h| async move {
        let user = uid("kind");
        let now = h.clock.now_ms();
        let access_with_refresh_nonce = mint_raw(&[
            &format!("nonce = {:032x}.0.{now}.r.{now}.0.-", 0xabcdu128),
            "gen = 1",
            &format!("user_id = {user}"),
            "type = access",
        ]);
        assert_eq!(
            h.status(&access_with_refresh_nonce).await,
            RevocationStatus::Revoked
        );
        let same_with_access_nonce = mint_raw(&[
            &format!("nonce = {:032x}.0.{now}.a.{now}.0.-", 0xabcdu128),
            "gen = 1",
            &format!("user_id = {user}"),
            "type = access",
        ]);
        assert_eq!(
            h.status(&same_with_access_nonce).await,
            RevocationStatus::Active
        );
    })
    .await;
}

/// Finding 2's bound: a session lifetime alone (no other lifetime set) gives every token of the
/// session a `time <`, so what the store keeps about it is forgotten once it ends; a refresh after
/// the end fails, also for a session that began before the lifetime was configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lifetime_bounds_the_session_and_its_state() {
    each_backend(|mut h| async move {
        let user = uid("ceiling");
        let parts = http::Request::new(()).into_parts().0;
        let start = h.clock.now_ms();
        let bounded = h.sessions(
            Issuer::new(keys()).session_lifetime(Some(std::time::Duration::from_millis(10_000))),
        );
        let login = bounded.login(&user, &with_refresh());
        assert_eq!(login.session_expires_ms, Some(start + 10_000));
        assert_eq!(login.refresh_expires_at_ms, Some(start + 10_000));
        // A session from before the lifetime was configured: its tokens never expire.
        let unbounded = h.sessions(Issuer::new(keys()));
        let old = unbounded.login(&user, &with_refresh());
        h.clock.advance_ms(3_000);
        let next = bounded
            .refresh(
                login.refresh_token.as_ref().unwrap().as_bytes(),
                RefreshMode::Rotating,
                &parts,
            )
            .await
            .expect("within the session's lifetime");
        // Capped at the session's end (the default refreshable lifetime is five minutes).
        assert_eq!(
            (next.expires_at_ms, next.expires_in_ms),
            (Some(start + 10_000), Some(7_000))
        );
        assert_eq!(next.refresh_expires_at_ms, Some(start + 10_000));
        bounded
            .logout(&h.user(&next.access_token, TokenType::Access))
            .await
            .unwrap();
        h.clock.set_ms(start + 10_000);
        assert!(bounded
            .refresh(
                old.refresh_token.as_ref().unwrap().as_bytes(),
                RefreshMode::Rotating,
                &parts
            )
            .await
            .is_err());
        h.clock.set_ms(start + 10_000 + LEEWAY_MS);
        if let Backend::Memory = h.backend {
            assert!(!h.memory.is_empty());
            h.forget_expired().await;
            assert_eq!(
                h.memory.len(),
                0,
                "the session's record outlived its tokens"
            );
        }
    })
    .await;
}
