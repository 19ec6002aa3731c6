//! A tiny Matrix homeserver: just enough client-server API to show (and test) the layer.
//!
//! Run it with
//!
//! ```text
//! MATRIX_USERS=alice:password cargo run --release --example homeserver
//! ```
//!
//! No `--features` are needed: examples build with every feature of the crate (its
//! dev-dependency on itself enables them).
//!
//! Configuration, all from the environment (a contract that outside conformance tests drive):
//!
//! | variable                  | meaning                                                     | default          |
//! |---------------------------|-------------------------------------------------------------|------------------|
//! | `MATRIX_SERVER_NAME`      | the server name (written into minted tokens' location)      | `localhost`      |
//! | `MATRIX_MACAROON_SECRET`  | Synapse's `macaroon_secret_key`; tokens use identifier `key` | random, per run  |
//! | `MATRIX_LISTEN`           | the address to bind                                         | `127.0.0.1:8008` |
//! | `MATRIX_PRINT_TOKEN_FOR`  | a user id (or bare localpart): mint and print a token for it | unset            |
//! | `RUST_LOG`                | log filter                                                  | `info,tower_http=debug,tower_matrix_auth=debug` |
//!
//! Without `MATRIX_MACAROON_SECRET` a random secret is generated, so tokens do not survive a
//! restart. Set but empty, it stops the server at start-up with an error (an empty secret makes
//! every token forgeable); shorter than 32 bytes, it is used with a warning in the log. Any token
//! Synapse minted with the same `macaroon_secret_key` is accepted, because the layer verifies
//! Synapse's macaroons (identifier `key`, libmacaroons key derivation).
//!
//! Standard output carries only machine-readable lines: the minted token (when
//! `MATRIX_PRINT_TOKEN_FOR` is set) on a line of its own, then `listening on http://ADDR` once
//! the socket is bound. Logs go to standard error.
//!
//! Getting a token:
//!
//! ```text
//! MATRIX_PRINT_TOKEN_FOR=@alice:localhost cargo run --example homeserver
//! curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8008/_matrix/client/v3/account/whoami
//! ```
//!
//! or mint one in Rust with the same secret:
//!
//! ```
//! use tower_matrix_auth::{KeyRing, MacaroonSecret, TokenType};
//! let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase("the secret"));
//! let token = keys
//!     .mint("@alice:localhost", TokenType::Access)
//!     .unwrap()
//!     .nonce("a unique value")
//!     .device_id("PHONE") // optional
//!     .to_token();
//! ```
//!
//! or with pymacaroons, as Synapse did:
//!
//! ```text
//! m = pymacaroons.Macaroon(location="localhost", identifier="key", key=secret)
//! for c in ["gen = 1", "user_id = @alice:localhost", "type = access", "nonce = x1y2z3"]:
//!     m.add_first_party_caveat(c)
//! print(m.serialize())
//! ```
//!
//! Endpoints:
//!
//! * `GET /_matrix/client/versions`: no authentication.
//! * `GET /_matrix/client/{v3,r0}/account/whoami`: users and guests.
//! * `GET /_matrix/client/{v3,r0}/devices`: users only (guests get `403 M_GUEST_ACCESS_FORBIDDEN`).
//! * `GET /_matrix/client/{v3,r0}/login`: the login flows (`m.login.password`, `m.login.token`
//!   with `"get_login_token": true`).
//! * `POST /_matrix/client/{v3,r0}/login`: `m.login.password` (identifier `m.id.user`, localpart
//!   or full user id, against `MATRIX_USERS`) or `m.login.token`; `"refresh_token": true` adds a
//!   refresh token and makes the access token expire after `MATRIX_TOKEN_LIFETIME_MS`.
//! * `POST /_matrix/client/v3/refresh` (MSC2918) and `POST /_matrix/client/r0/tokenrefresh` (the
//!   original, single-use exchange): no access token needed.
//! * `POST /_matrix/client/{v3,r0}/logout` and `.../logout/all`: expired tokens accepted.
//! * `POST /_matrix/client/v1/login/get_token` (MSC3882): a single-use login token for
//!   `m.login.token`.
//! * `GET|PUT /_matrix/client/v1/admin/lock/{userId}` (`{"locked": bool}`) and
//!   `GET|PUT /_matrix/client/v1/admin/suspend/{userId}` (`{"suspended": bool}`): the spec's
//!   admin API (v1.18, MSC4323), for the users of `MATRIX_ADMIN_USERS`; the user id raw or
//!   percent-encoded. A change applies from the target's next request. Errors as the spec gives
//!   them, in this order: `403 M_FORBIDDEN` for anyone but an administrator (before any
//!   lookup), `400 M_INVALID_PARAM` for a user id that is not of this server,
//!   `400 M_NOT_JSON`/`M_BAD_JSON` for a `PUT` body that is not `{"locked": bool}` (or
//!   `{"suspended": bool}`), `403 M_FORBIDDEN` for a `PUT` on the administrator's own account
//!   and for any request about another administrator, `404 M_NOT_FOUND` for an unknown or
//!   deactivated user.
//! * `GET /_matrix/client/v3/capabilities`: `m.change_password` and `m.3pid_changes` off,
//!   `m.get_login_token` on, and for administrators `m.account_moderation`
//!   (`{"lock": true, "suspend": true}`).
//! * `GET /_matrix/client/{v3,r0}/sync`: `{"next_batch"}` at once (users and guests).
//! * `PUT /_matrix/client/{v3,r0}/rooms/{roomId}/send/{eventType}/{txnId}`: `{"event_id"}`,
//!   the same one again for a retried transaction id of the same device.
//! * `PUT /_matrix/client/{v3,r0}/rooms/{roomId}/state/{eventType}/{stateKey}`, and with the
//!   empty state key `…/state/{eventType}` and `…/state/{eventType}/`: `{"event_id"}`.
//! * `POST /_matrix/client/{v3,r0}/createRoom`: `{"room_id"}`, a new one.
//! * `POST /_matrix/client/{v3,r0}/rooms/{roomId}/join` and `…/join/{roomIdOrAlias}`:
//!   `{"room_id"}` (an alias stands for a room id derived from it).
//! * `POST /_matrix/client/v3/rooms/{roomId}/upgrade`: `{"replacement_room"}`, a new one.
//! * `PUT /_matrix/client/{v3,r0}/profile/{userId}/displayname`: `{}`, one's own only (another
//!   user's is `403 M_FORBIDDEN`; guests may set theirs).
//! * any other path: `404 M_UNRECOGNIZED`, token or not.
//! * a known path with another method: `405 M_UNRECOGNIZED` (authentication comes first there,
//!   so without a valid token it is the 401).
//!
//! The room and profile routes keep nothing (no rooms, no events, no profiles): they are here to
//! show the layer's account and guest rules on the shapes of real routes. Their bodies must be
//! JSON objects (`400 M_NOT_JSON` or `M_BAD_JSON` otherwise; a join's may be empty).
//!
//! Guests (tokens with `guest = true`, minted elsewhere: this server registers none) may use
//! whoami, sync and their own display name, the routes of the spec's guest access list that
//! need no room. The list's room routes (joining, sending messages and state) are for rooms
//! whose `m.room.guest_access` lets guests in, which a server MUST check before a guest joins;
//! this one keeps no room state to check it against, so guests get
//! `403 M_GUEST_ACCESS_FORBIDDEN` there and everywhere else (`/devices`, `/capabilities`,
//! `/login/get_token`, `createRoom`, the admin API).
//!
//! The state of an account (see the table below) is what the layer enforces on every route
//! above, from the next request on: a locked account gets `401 M_USER_LOCKED` with
//! `"soft_logout": true` everywhere but `POST …/logout` and `…/logout/all`; a suspended one
//! `403 M_USER_SUSPENDED` on writes (reads, logging out and the other writes the spec keeps
//! for suspended users still work); a deactivated one `401 M_UNKNOWN_TOKEN` everywhere. Logging
//! in (a password or a login token), once the credentials hold: a locked account gets
//! `401 M_USER_LOCKED` with `"soft_logout": true` (no new token until it is unlocked), a
//! deactivated one `403 M_USER_DEACTIVATED`, a suspended one logs in.
//!
//! More configuration for the token lifecycle:
//!
//! | variable                   | meaning                                                   | default    |
//! |----------------------------|-----------------------------------------------------------|------------|
//! | `MATRIX_USERS`             | `alice:password,bob:secret`: users who may log in         | none       |
//! | `MATRIX_TOKEN_LIFETIME_MS` | access token lifetime when a refresh token is requested   | `300000`   |
//! | `MATRIX_REFRESH_TOKEN_LIFETIME_MS` | refresh token lifetime                            | never expire |
//! | `MATRIX_ACCESS_TOKEN_LIFETIME_MS` | access token lifetime without a refresh token      | never expire |
//! | `MATRIX_DATABASE_URL`      | PostgreSQL for revocation state shared by processes      | in memory  |
//! | `MATRIX_DATABASE_POOL`     | the most writing connections to it (`PostgresOptions::max_connections`, at least 1) | `8` |
//! | `MATRIX_APPSERVICE_TOKEN`  | register one application service with this `as_token`     | none       |
//! | `MATRIX_APPSERVICE_SENDER` | its sender user id                                        | `@appservice:<server name>` |
//! | `MATRIX_APPSERVICE_NAMESPACE` | its (exclusive) user namespace regex                   | none       |
//! | `MATRIX_OPAQUE_TOKENS`     | `token:@user:server,...`: opaque (non-macaroon) tokens    | none       |
//! | `MATRIX_LOGIN_TOKEN_LIFETIME_MS` | lifetime of the login tokens of `/v1/login/get_token` | `120000` |
//! | `MATRIX_SESSION_LIFETIME_MS` | how long a session lives from its login, refreshes included (every token expires by then, a later refresh is `401 M_UNKNOWN_TOKEN`); bounds the revocation state even when other tokens never expire | no limit |
//! | `MATRIX_REFRESH_GRACE_MS`  | a *replay* at `/v3/refresh` (a refresh token whose session has moved past it: its successor, or a later generation, was used; a successor replaced before anyone used it shares its parent's window, and outside it is refused but no replay) within this long of that token's first refresh gets a fresh pair of the generation in use instead of `401` (a client that lost the response and retried) | `0` |
//! | `MATRIX_REFRESH_REPLAY`    | a replay outside the grace: `error` answers `401 M_UNKNOWN_TOKEN`; `revoke_session` also logs the whole session out, every generation (RFC 6819 §5.2.2.3). `/r0/tokenrefresh` stays strictly single use either way | `error` |
//! | `MATRIX_CLOCK_LEEWAY_MS`   | how long past its `time <` a token still verifies (clock skew between servers); the layer and the token lifecycle share it | `0` |
//! | `MATRIX_QUERY_TOKENS`      | `on`: `?access_token=` is read as spec v1.19 requires; `off`: a spec v1.20 server (MSC4127), where only an application service's `as_token` is still read from the query and every user must send `Authorization: Bearer` | `on` |
//! | `MATRIX_AUTH_FAILURE_LIMIT` | failed token checks (`M_UNKNOWN_TOKEN`) per minute and client address; past it, that address's requests whose token is not in the verified-token cache get `429 M_LIMIT_EXCEEDED` with `Retry-After`. Off by default: behind a reverse proxy, set `MATRIX_TRUSTED_PROXIES` first, or every client shares the proxy's budget. `0` = off | `0` |
//! | `MATRIX_METRICS`           | `1`: the layer's metrics (`matrix_auth_decisions_total`, `matrix_auth_wait_seconds`, `matrix_auth_token_cache_total`, `matrix_auth_refresh_replays_total`, …) in Prometheus text on `GET /metrics`, unauthenticated, on this listener: let only your monitoring reach it | `0` |
//! | `MATRIX_TRUSTED_PROXIES`   | comma-separated networks (`10.0.0.0/8, ::1`) of reverse proxies whose `X-Forwarded-For` is believed (`Forwarded` never is): the client is the rightmost hop that is not one of them; from any other peer the headers change nothing | none |
//! | `MATRIX_APPSERVICE_IP_RANGES` | networks the application service's `as_token` is accepted from (Synapse's `ip_range_whitelist`); elsewhere it is `401 M_UNKNOWN_TOKEN` | anywhere |
//! | `MATRIX_SWEEP_INTERVAL_MS` | how often expired revocation state is forgotten, on a timer: the memory store is swept, PostgreSQL's expired rows deleted (at least `1`) | `10000` |
//!
//! Revocation state (logouts, refreshes) is forgotten only once every token it speaks for has
//! stopped verifying: with both `MATRIX_REFRESH_TOKEN_LIFETIME_MS` and
//! `MATRIX_ACCESS_TOKEN_LIFETIME_MS` set, or `MATRIX_SESSION_LIFETIME_MS`; otherwise it is kept for
//! as long as the server runs (with a warning at start-up).
//!
//! Accounts and administrators: each variable is a comma-separated list of user ids or bare
//! localparts of this server (`bob` is `@bob:<server name>`).
//!
//! | variable                   | meaning                                                   | default    |
//! |----------------------------|-----------------------------------------------------------|------------|
//! | `MATRIX_ADMIN_USERS`       | server administrators: the admin API's lock and suspend   | none       |
//! | `MATRIX_LOCKED_USERS`      | accounts locked at start (spec v1.12)                     | none       |
//! | `MATRIX_SUSPENDED_USERS`   | accounts suspended at start (spec v1.13)                  | none       |
//! | `MATRIX_DEACTIVATED_USERS` | deactivated accounts (for good: the admin API cannot change them) | none |
//!
//! The admin API knows the users of `MATRIX_USERS`, `MATRIX_PRINT_TOKEN_FOR` and these lists;
//! any other user id is `404 M_NOT_FOUND` there (tokens of other users are still accepted
//! elsewhere). A lock and a suspension are independent: lifting one leaves the other.
//!
//! For measuring (`benches/load.sh homeserver`):
//!
//! | variable                     | meaning                                                | default    |
//! |------------------------------|--------------------------------------------------------|------------|
//! | `MATRIX_WORKER_THREADS`      | tokio worker threads                                    | one a core |
//! | `MATRIX_TOKEN_CACHE`         | verified-token cache capacity; `0` turns it off         | `4096`     |
//! | `MATRIX_INSECURE_NO_AUTH_AS` | a user id: **no authentication at all**, every request on the authenticated routes acts as that user, whose id the request span records as the layer would (the "bare" server of the load benchmark); refused unless `MATRIX_LISTEN` is a loopback address | unset |
//!
//! An application service may act as a user of its namespace with `?user_id=`, and as one of
//! that user's devices with `?device_id=` (a device is known here once it logged in).
//!
//! OAuth 2.0 delegated authentication (spec v1.15; the Matrix Authentication Service, or any
//! RFC 7662 token server), beside everything above:
//!
//! | variable                        | meaning                                                | default  |
//! |---------------------------------|--------------------------------------------------------|----------|
//! | `MATRIX_OAUTH2_INTROSPECTION_URL` | the token server's RFC 7662 introspection endpoint, `http://` or `https://` (the system's root certificates), e.g. MAS's `http://127.0.0.1:8080/oauth2/introspect`; set, it turns delegation on | unset (off) |
//! | `MATRIX_OAUTH2_SHARED_SECRET`   | MAS style: sent as `Authorization: Bearer <secret>` (MAS's `matrix.secret`) | unset |
//! | `MATRIX_OAUTH2_CLIENT_ID`       | with `MATRIX_OAUTH2_CLIENT_SECRET`: a confidential client, `client_secret_basic` (either alone is an error, and so is both styles at once) | unset |
//! | `MATRIX_OAUTH2_CLIENT_SECRET`   | the client's secret                                    | unset |
//! | `MATRIX_OAUTH2_CACHE_TTL_MS`    | how long an active answer is reused (never past the token's `exp`); `0` asks every time | `120000` |
//! | `MATRIX_OAUTH2_ISSUER`          | the token server's issuer URL (`http://` or `https://`): `GET /_matrix/client/v1/auth_metadata` then answers its metadata, read from `<issuer>/.well-known/openid-configuration` (cached 5 minutes; `503 M_UNKNOWN` while it cannot be read) | unset (`404 M_UNRECOGNIZED` there) |
//!
//! With delegation on, a token that is not a macaroon (and not in `MATRIX_OPAQUE_TOKENS`, which
//! are looked up first) is sent to the introspection endpoint; macaroons are still verified
//! here and never sent, and application services still use their `as_token`. An introspected
//! token needs the scope `urn:matrix:client:api:*` (or MSC2967's unstable spelling); its user
//! is `@<username>:<MATRIX_SERVER_NAME>`, its device the `device_id` field or the
//! `urn:matrix:client:device:<id>` scope. An inactive, expired or scope-less token gets
//! `401 M_UNKNOWN_TOKEN` without a soft logout; an endpoint that fails, times out (5 s) or
//! answers anything but an introspection answer gets `503 M_UNKNOWN` with `Retry-After`.
//! `POST …/logout` with such a token forgets its cached answer (and `…/logout/all` every
//! answer of the user), so that a token the server revoked is refused at once; revoking the
//! token is the token server's business (RFC 7009, or MAS's own logout).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::Route;
use tower::{Layer, Service};

use axum::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderName, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::routing::{post, put};
use std::collections::HashSet;
use std::sync::{Mutex, RwLock};
use subtle::ConstantTimeEq;

use tower_matrix_auth::hooks::oauth2::{ClientAuth, Introspection};
use tower_matrix_auth::hooks::{ResolveFuture, TokenResolver};
use tower_matrix_auth::routes::ClientRoute;
use tower_matrix_auth::{
    hooks::{
        AccountDirectory, AccountStatus, AppService, AppServices, MemoryAccounts, ResolvedToken,
        StaticTokens,
    },
    layer::{FailureLimit, QueryToken, ResponseBody, TrustedProxies},
    lifecycle::SessionRequest,
    macaroon::{is_valid_user_id, RECOMMENDED_SECRET_LEN},
    routes::is_whoami_route,
    store::{PostgresOptions, RefreshPolicy, ReplayAction, TokenStore},
    Credential, Issuer, KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, MemoryStore,
    PostgresStore, Sessions, TokenType, Verifier,
};
use tracing_subscriber::EnvFilter;

const DEFAULT_LISTEN: &str = "127.0.0.1:8008";
const DEFAULT_LOG_FILTER: &str = "info,tower_http=debug,tower_matrix_auth=debug";
/// What `Issuer` uses unless told otherwise.
const DEFAULT_LOGIN_TOKEN_LIFETIME_MS: u64 = 120_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = env_number("MATRIX_WORKER_THREADS")? {
        runtime.worker_threads(usize::try_from(threads)?.max(1));
    }
    runtime.build()?.block_on(serve())
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    // Before anything reports: the store reports its health as it connects.
    let metrics = install_metrics()?;
    let server_name = env_or("MATRIX_SERVER_NAME", "localhost");
    let listen = env_or("MATRIX_LISTEN", DEFAULT_LISTEN);
    let keys = KeyRing::new().with_key("key", macaroon_secret()?);

    let printed_for = std::env::var("MATRIX_PRINT_TOKEN_FOR")
        .ok()
        .filter(|who| !who.is_empty())
        .map(|who| full_user_id(&who, &server_name));
    let users = parse_users(&std::env::var("MATRIX_USERS").unwrap_or_default())?;
    let accounts = Accounts::from_env(&server_name, &users, printed_for.as_deref())?;
    if let Some(user_id) = printed_for.clone() {
        if !is_valid_user_id(&user_id) {
            return Err(
                format!("MATRIX_PRINT_TOKEN_FOR: `{user_id}` is not a Matrix user id").into(),
            );
        }
        let token = keys
            .mint(&user_id, TokenType::Access)
            .expect("the ring has a key")
            .location(server_name.as_str())
            .nonce(random_string(16))
            .to_token();
        tracing::info!(%user_id, "minted an access token (printed on standard output)");
        println!("{token}");
    }

    let lifetime_ms = env_number("MATRIX_TOKEN_LIFETIME_MS")?.unwrap_or(300_000);
    // Unset: these tokens never expire (Synapse's defaults), and neither can the revocation
    // state of a session that used them.
    let refresh_lifetime_ms = env_number("MATRIX_REFRESH_TOKEN_LIFETIME_MS")?;
    let access_lifetime_ms = env_number("MATRIX_ACCESS_TOKEN_LIFETIME_MS")?;
    // Absolute, from login: bounds every token of a session, and the state kept about it.
    let session_lifetime_ms = env_number("MATRIX_SESSION_LIFETIME_MS")?;
    let login_token_lifetime_ms =
        env_number("MATRIX_LOGIN_TOKEN_LIFETIME_MS")?.unwrap_or(DEFAULT_LOGIN_TOKEN_LIFETIME_MS);
    let leeway_ms = env_number("MATRIX_CLOCK_LEEWAY_MS")?.unwrap_or(0);
    let sweep_every = match env_number("MATRIX_SWEEP_INTERVAL_MS")?.unwrap_or(10_000) {
        0 => return Err("MATRIX_SWEEP_INTERVAL_MS must be at least 1".into()),
        ms => Duration::from_millis(ms),
    };
    let store: Arc<dyn TokenStore> = match std::env::var("MATRIX_DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            tracing::info!("revocation state in PostgreSQL");
            let mut options = PostgresOptions::default();
            if let Some(pool) = env_number("MATRIX_DATABASE_POOL")? {
                options = options.max_connections(usize::try_from(pool)?);
            }
            let store = PostgresStore::connect_with(&url, options).await?;
            // The view forgets expired state by itself; deleting expired rows is up to us.
            let purger = store.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(sweep_every);
                loop {
                    every.tick().await;
                    match purger.purge_expired().await {
                        Ok(rows) => tracing::debug!(rows, "purged expired revocation state"),
                        Err(error) => tracing::debug!(%error, "purge skipped"),
                    }
                }
            });
            Arc::new(store)
        }
        _ => {
            // The memory store sweeps when a write finds it grown; a timer sweeps it too, so that
            // expired state goes even when no write comes.
            let store = MemoryStore::new();
            let swept = store.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(sweep_every);
                loop {
                    every.tick().await;
                    swept.sweep();
                    tracing::debug!(sessions = swept.len(), "swept expired revocation state");
                }
            });
            Arc::new(store)
        }
    };
    // One verifier, so one leeway, for the layer and the Sessions engine: the store keeps a
    // session's record until its tokens stop verifying, leeway included.
    let mut verifier = Verifier::new(keys.clone()).leeway(Duration::from_millis(leeway_ms));
    if let Some(capacity) = env_number("MATRIX_TOKEN_CACHE")? {
        verifier = verifier.token_cache(usize::try_from(capacity)?);
    }
    let issuer = Issuer::new(keys)
        .location(server_name.clone())
        .refreshable_access_lifetime(Duration::from_millis(lifetime_ms))
        .refresh_lifetime(refresh_lifetime_ms.map(Duration::from_millis))
        .access_lifetime(access_lifetime_ms.map(Duration::from_millis))
        .session_lifetime(session_lifetime_ms.map(Duration::from_millis))
        .login_lifetime(Duration::from_millis(login_token_lifetime_ms));
    let replay = match env_or("MATRIX_REFRESH_REPLAY", "error").as_str() {
        "error" => ReplayAction::Refuse,
        "revoke_session" => ReplayAction::RevokeSession,
        other => {
            return Err(format!(
                "MATRIX_REFRESH_REPLAY must be `error` or `revoke_session`, not `{other}`"
            )
            .into())
        }
    };
    let refresh_policy = RefreshPolicy::new()
        .grace(Duration::from_millis(
            env_number("MATRIX_REFRESH_GRACE_MS")?.unwrap_or(0),
        ))
        .on_replay(replay);
    let sessions =
        Sessions::with_shared_store(issuer, verifier, store).refresh_policy(refresh_policy);
    let state = AppState {
        sessions: sessions.clone(),
        users: Arc::new(users),
        server_name: server_name.clone(),
        devices: Arc::default(),
        accounts: accounts.clone(),
        introspection: oauth2_introspection(&server_name)?,
        auth_metadata: AuthMetadata::from_env()?,
    };

    let query_tokens = match env_or("MATRIX_QUERY_TOKENS", "on").as_str() {
        "on" => QueryToken::Allowed,
        "off" => QueryToken::AppServicesOnly,
        other => {
            return Err(format!("MATRIX_QUERY_TOKENS must be `on` or `off`, not `{other}`").into())
        }
    };
    // The layer verifies with the sessions' verifier and asks their store: one configuration.
    let auth = MatrixAuthLayer::for_sessions(&sessions)
        .query_token(query_tokens)
        // The spec: logging out must work with an expired token (exactly `POST …/logout` and
        // `…/logout/all`: a `contains("/logout")` would match any route with a client-chosen
        // segment, such as a transaction id).
        .allow_expired_on_logout()
        // Discovery happens before login: never authenticated.
        .skip_path("/_matrix/client/versions")
        // Server-server traffic is signed with `Authorization: X-Matrix`, not access tokens.
        .skip_path_prefix("/_matrix/federation/")
        .skip_path_prefix("/_matrix/key/")
        // Locked, suspended and deactivated accounts (`MATRIX_*_USERS`, the admin API): the
        // layer reads this shared map on every request, so a change applies to the next one.
        .accounts(accounts.states.clone())
        // Guests may ask who they are, sync and set their own display name: the routes of the
        // spec's guest access list that need no room. Its room routes (joining, sending
        // messages and state) are for rooms whose `m.room.guest_access` lets guests in, which
        // the server MUST check before a guest joins; this one keeps no room state to check, so
        // guests get 403 M_GUEST_ACCESS_FORBIDDEN there, and on everything else (`/devices`,
        // `/capabilities`, `createRoom`, the admin API, …).
        .allow_guests_when(is_whoami_route)
        .allow_guests_when(is_sync_route)
        .allow_guests_when(is_displayname_route);
    let auth = with_client_addr(auth)?;
    let auth = with_appservice(auth, &server_name, &state.devices)?;
    let auth = with_resolvers(auth, opaque_tokens()?, state.introspection.clone());

    let app = match std::env::var("MATRIX_INSECURE_NO_AUTH_AS")
        .ok()
        .filter(|who| !who.is_empty())
    {
        // Responses go back to axum in its own body type: otherwise axum boxes the layer's
        // `ResponseBody` once more on every request.
        None => app(
            tower::ServiceBuilder::new()
                .map_response(|response: Response<ResponseBody<Body>>| {
                    response.map(ResponseBody::into_inner_type)
                })
                .layer(auth)
                .into_inner(),
            state,
            &sessions,
        ),
        Some(user_id) => {
            let loopback = listen
                .parse::<SocketAddr>()
                .is_ok_and(|address| address.ip().is_loopback());
            if !loopback {
                return Err(
                    "MATRIX_INSECURE_NO_AUTH_AS is for benchmarks on a loopback \
                            MATRIX_LISTEN only"
                        .into(),
                );
            }
            tracing::warn!(%user_id, "MATRIX_INSECURE_NO_AUTH_AS: NO AUTHENTICATION, every request acts as this user");
            // The identity the layer would have given, verified once here instead of per
            // request: the handlers and every other layer run as usual.
            let token = sessions
                .issuer()
                .keys()
                .mint(&user_id, TokenType::Access)
                .ok_or("the ring has a key")?
                .nonce(random_string(16))
                .to_token();
            let parts = Request::new(()).into_parts().0;
            let user = sessions
                .verifier()
                .verify(token.as_bytes(), TokenType::Access, &parts)
                .map_err(|_| {
                    format!("MATRIX_INSECURE_NO_AUTH_AS: `{user_id}` is not a Matrix user id")
                })?;
            // The request span gets the user id as the layer records it, so that this server
            // logs what the layered one does: the benchmark compares authentication, not
            // authentication plus a log field.
            let as_user = tower::util::MapRequestLayer::new(move |mut request: Request<Body>| {
                user.record_in_current_span();
                request.extensions_mut().insert(user.clone());
                request
            });
            app(as_user, state, &sessions)
        }
    };

    let app = match metrics {
        Some(handle) => app.route("/metrics", get(move || std::future::ready(handle.render()))),
        None => app,
    };

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(%server_name, "listening on http://{address}");
    println!("listening on http://{address}");

    // The peer address reaches the layer as axum's `ConnectInfo` (see `with_client_addr`).
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    tracing::info!("shut down");
    Ok(())
}

/// The routes and the layers around them, with `auth` on the authenticated routes: the
/// `MatrixAuthLayer`, or, for `MATRIX_INSECURE_NO_AUTH_AS`, a fixed identity.
fn app<L>(auth: L, state: AppState, sessions: &Sessions) -> Router
where
    L: Layer<Route> + Clone + Send + Sync + 'static,
    L::Service: Service<Request<Body>> + Clone + Send + Sync + 'static,
    <L::Service as Service<Request<Body>>>::Response: IntoResponse + 'static,
    <L::Service as Service<Request<Body>>>::Error: Into<Infallible> + 'static,
    <L::Service as Service<Request<Body>>>::Future: Send + 'static,
{
    // What a client does in rooms and with its profile, in both versions a client may use:
    // answered from memory, there to show the layer's rules for each account state on the
    // routes' real shapes.
    let mut rooms: Router<AppState> = Router::new();
    for version in ["v3", "r0"] {
        let path = |rest: &str| format!("/_matrix/client/{version}/{rest}");
        rooms = rooms
            .route(
                &path("rooms/{room_id}/send/{event_type}/{txn_id}"),
                put(send_event),
            )
            // The empty state key, with or without the trailing slash.
            .route(
                &path("rooms/{room_id}/state/{event_type}"),
                put(put_state_empty_key),
            )
            .route(
                &path("rooms/{room_id}/state/{event_type}/"),
                put(put_state_empty_key),
            )
            .route(
                &path("rooms/{room_id}/state/{event_type}/{state_key}"),
                put(put_state),
            )
            .route(&path("createRoom"), post(create_room))
            .route(&path("rooms/{room_id}/join"), post(join_room))
            .route(&path("join/{room_id_or_alias}"), post(join_by_id_or_alias))
            .route(&path("profile/{user_id}/displayname"), put(set_displayname))
            .route(&path("sync"), get(sync));
    }
    rooms
        .route(
            "/_matrix/client/v3/rooms/{room_id}/upgrade",
            post(upgrade_room),
        )
        .route("/_matrix/client/v3/capabilities", get(capabilities))
        .route("/_matrix/client/versions", get(versions))
        .route("/_matrix/client/v3/account/whoami", get(whoami))
        .route("/_matrix/client/r0/account/whoami", get(whoami))
        .route("/_matrix/client/v3/devices", get(devices))
        .route("/_matrix/client/r0/devices", get(devices))
        .route("/_matrix/client/v3/logout", post(logout))
        .route("/_matrix/client/r0/logout", post(logout))
        .route("/_matrix/client/v3/logout/all", post(logout_all))
        .route("/_matrix/client/r0/logout/all", post(logout_all))
        .route("/_matrix/client/v1/login/get_token", post(get_login_token))
        .route(
            "/_matrix/client/v1/admin/lock/{user_id}",
            get(admin_lock_get).put(admin_lock_put),
        )
        .route(
            "/_matrix/client/v1/admin/suspend/{user_id}",
            get(admin_suspend_get).put(admin_suspend_put),
        )
        .method_not_allowed_fallback(method_not_allowed)
        // Authentication covers the routes above only (`/versions` is skipped by the layer
        // itself): an unknown endpoint answers 404 M_UNRECOGNIZED whether or not the request
        // carries a token, as the spec asks, instead of a 401 for a route that does not exist.
        // (`route_layer` also wraps these routes' 405 fallback, so a wrong method gets the 401
        // first when it comes without a valid token.)
        .route_layer(auth)
        // Discovery of the OAuth 2.0 server (spec v1.15): before any token, so unauthenticated.
        .route("/_matrix/client/v1/auth_metadata", get(auth_metadata))
        // Login and the refresh exchanges authenticate with what their body carries.
        .route("/_matrix/client/v3/login", get(login_flows).post(login))
        .route("/_matrix/client/r0/login", get(login_flows).post(login))
        .route_service("/_matrix/client/v3/refresh", sessions.refresh_endpoint())
        .route_service(
            "/_matrix/client/r0/tokenrefresh",
            sessions.token_refresh_endpoint(),
        )
        .with_state(state)
        .fallback(unrecognized)
        // Each `.layer` wraps everything above it, so the last one is the outermost:
        //
        // * Tracing outside the auth layer, so that rejected requests are logged too. The auth
        //   layer removes `access_token` from the URI only for the services inside it, so the
        //   default span (which records the full URI) would log the token from
        //   `?access_token=`: this span records the path alone, never the query. Its empty
        //   `user_id` field is filled in by the auth layer once the token is verified.
        // * CORS outermost, so that a preflight (`OPTIONS` with `Origin`, which never carries a
        //   token) is answered by `CorsLayer` before authentication could refuse it with a 401,
        //   and so that every response, errors included, carries the CORS headers browser
        //   clients need to read it.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = request.uri().path(),
                    user_id = tracing::field::Empty,
                )
            }),
        )
        .layer(cors())
}

#[derive(Clone)]
struct AppState {
    /// `MATRIX_OAUTH2_INTROSPECTION_URL`: OAuth 2.0 delegation, if on.
    introspection: Option<Introspection>,
    /// `MATRIX_OAUTH2_ISSUER`: the token server's metadata for `/auth_metadata`.
    auth_metadata: Option<AuthMetadata>,
    sessions: Sessions,
    /// Localpart → password.
    users: Arc<HashMap<String, String>>,
    server_name: String,
    /// (user id, device id) of every login: the devices an application service may name.
    devices: Arc<RwLock<HashSet<(String, String)>>>,
    accounts: Accounts,
}

/// The accounts this server knows and their state: `MATRIX_USERS`, `MATRIX_PRINT_TOKEN_FOR` and
/// the users of `MATRIX_ADMIN_USERS`, `MATRIX_LOCKED_USERS`, `MATRIX_SUSPENDED_USERS` and
/// `MATRIX_DEACTIVATED_USERS`. Clones share everything.
#[derive(Clone)]
struct Accounts {
    /// What the layer reads on every request: derived from `flags` on every change.
    states: MemoryAccounts,
    /// Known user id → its flags (a lock and a suspension are independent: lifting one leaves
    /// the other in place).
    flags: Arc<Mutex<HashMap<String, Flags>>>,
    admins: Arc<HashSet<String>>,
}

#[derive(Clone, Copy, Default)]
struct Flags {
    locked: bool,
    suspended: bool,
    deactivated: bool,
}

impl Flags {
    /// The state the layer enforces: the strictest that applies.
    fn status(self) -> AccountStatus {
        if self.deactivated {
            AccountStatus::Deactivated
        } else if self.locked {
            AccountStatus::Locked
        } else if self.suspended {
            AccountStatus::Suspended
        } else {
            AccountStatus::Active
        }
    }
}

/// What an admin endpoint (MSC4323, spec v1.18) reads or writes.
#[derive(Clone, Copy)]
enum Moderation {
    Lock,
    Suspend,
}

impl Moderation {
    /// The JSON key of the request and the answer.
    fn key(self) -> &'static str {
        match self {
            Moderation::Lock => "locked",
            Moderation::Suspend => "suspended",
        }
    }

    fn flag(self, flags: &mut Flags) -> &mut bool {
        match self {
            Moderation::Lock => &mut flags.locked,
            Moderation::Suspend => &mut flags.suspended,
        }
    }
}

impl Accounts {
    fn from_env(
        server_name: &str,
        users: &HashMap<String, String>,
        printed_for: Option<&str>,
    ) -> Result<Self, String> {
        let mut flags: HashMap<String, Flags> = users
            .keys()
            .map(|localpart| (format!("@{localpart}:{server_name}"), Flags::default()))
            .chain(printed_for.map(|user_id| (user_id.to_owned(), Flags::default())))
            .collect();
        let admins: HashSet<String> = user_list("MATRIX_ADMIN_USERS", server_name)?
            .into_iter()
            .collect();
        for admin in &admins {
            flags.entry(admin.clone()).or_default();
        }
        for (name, set) in [
            (
                "MATRIX_LOCKED_USERS",
                (|f: &mut Flags| f.locked = true) as fn(&mut Flags),
            ),
            ("MATRIX_SUSPENDED_USERS", |f| f.suspended = true),
            ("MATRIX_DEACTIVATED_USERS", |f| f.deactivated = true),
        ] {
            for user_id in user_list(name, server_name)? {
                set(flags.entry(user_id).or_default());
            }
        }
        let states = MemoryAccounts::default();
        for (user_id, flags) in &flags {
            states.set(user_id, flags.status());
        }
        Ok(Self {
            states,
            flags: Arc::new(Mutex::new(flags)),
            admins: Arc::new(admins),
        })
    }

    fn status(&self, user_id: &str) -> AccountStatus {
        self.states.status(user_id)
    }

    fn is_admin(&self, user_id: &str) -> bool {
        self.admins.contains(user_id)
    }

    /// Reads, and with `Some(on)` first sets, one flag of a known account that is not
    /// deactivated; `None` for any other user id.
    fn moderate(&self, user_id: &str, what: Moderation, set: Option<bool>) -> Option<bool> {
        let mut map = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        let flags = map.get_mut(user_id).filter(|flags| !flags.deactivated)?;
        if let Some(on) = set {
            *what.flag(flags) = on;
            // Under the lock, so that two admins' changes reach the layer in the order they
            // were made.
            self.states.set(user_id, flags.status());
        }
        Some(*what.flag(flags))
    }
}

/// `GET /_matrix/client/{version}/sync` exactly (or `HEAD`).
fn is_sync_route(parts: &Parts) -> bool {
    (parts.method == Method::GET || parts.method == Method::HEAD)
        && ClientRoute::parse(parts.uri.path()).is_some_and(|route| route.matches("sync"))
}

/// `PUT /_matrix/client/{version}/profile/{userId}/displayname` exactly (the handler lets users
/// set their own display name only).
fn is_displayname_route(parts: &Parts) -> bool {
    parts.method == Method::PUT
        && ClientRoute::parse(parts.uri.path())
            .is_some_and(|route| route.matches("profile/{userId}/displayname"))
}

/// `MATRIX_APPSERVICE_TOKEN` (+ `_SENDER`, `_NAMESPACE`): one application service.
fn with_appservice(
    auth: MatrixAuthLayer,
    server_name: &str,
    devices: &Arc<RwLock<HashSet<(String, String)>>>,
) -> Result<MatrixAuthLayer, Box<dyn std::error::Error>> {
    let Some(token) = std::env::var("MATRIX_APPSERVICE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    else {
        return Ok(auth);
    };
    let sender = env_or(
        "MATRIX_APPSERVICE_SENDER",
        &format!("@appservice:{server_name}"),
    );
    let mut registration = AppService::new("example", token, sender)?;
    if let Some(namespace) = std::env::var("MATRIX_APPSERVICE_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
    {
        registration = registration.user_namespace(&namespace, true)?;
    }
    if let Some(ranges) = std::env::var("MATRIX_APPSERVICE_IP_RANGES")
        .ok()
        .filter(|r| !r.is_empty())
    {
        registration = registration.ip_ranges(&ranges)?;
    }
    tracing::info!(
        sender = registration.sender(),
        "application service registered"
    );
    let devices = devices.clone();
    Ok(
        auth.appservices(AppServices::new().with(registration)?.devices(
            move |user_id: &str, device_id: &str| {
                let devices = devices.read().unwrap_or_else(|e| e.into_inner());
                devices.contains(&(user_id.to_owned(), device_id.to_owned()))
            },
        )),
    )
}

/// `MATRIX_METRICS=1`: the layer's metrics (and any other `metrics` user's) in Prometheus text on
/// `GET /metrics`, on this listener and without authentication, so expose it to your monitoring
/// only (a reverse proxy that does not forward `/metrics`, or a private listener).
fn install_metrics(
) -> Result<Option<metrics_exporter_prometheus::PrometheusHandle>, Box<dyn std::error::Error>> {
    match env_or("MATRIX_METRICS", "0").as_str() {
        "0" => Ok(None),
        "1" => Ok(Some(
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| format!("MATRIX_METRICS: {e}"))?,
        )),
        other => Err(format!("MATRIX_METRICS must be `0` or `1`, not `{other}`").into()),
    }
}

/// The client's address, when something needs it (`MATRIX_TRUSTED_PROXIES`,
/// `MATRIX_APPSERVICE_IP_RANGES`, `MATRIX_AUTH_FAILURE_LIMIT`): the connection's peer, from
/// axum's `ConnectInfo`, or what the trusted proxies say. Without any of them, no address is read
/// (it costs a little on every request).
fn with_client_addr(auth: MatrixAuthLayer) -> Result<MatrixAuthLayer, Box<dyn std::error::Error>> {
    let proxies = env_or("MATRIX_TRUSTED_PROXIES", "");
    let ranges = env_or("MATRIX_APPSERVICE_IP_RANGES", "");
    let failures = env_number("MATRIX_AUTH_FAILURE_LIMIT")?.unwrap_or(0);
    let auth = match FailureLimit::per_minute(u32::try_from(failures)?) {
        Some(limit) => auth.failure_limit(limit),
        None if proxies.is_empty() && ranges.is_empty() => return Ok(auth),
        None => auth,
    };
    let proxies: TrustedProxies = proxies
        .parse()
        .map_err(|e| format!("MATRIX_TRUSTED_PROXIES: {e}"))?;
    Ok(auth.trusted_proxies(proxies).peer_addr(|parts| {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())
    }))
}

/// `MATRIX_OPAQUE_TOKENS=token:@user:server,...`: tokens that are not macaroons, as a homeserver
/// migrating from database tokens would have.
/// `MATRIX_OPAQUE_TOKENS`: fixed opaque tokens, if any.
fn opaque_tokens() -> Result<Option<StaticTokens>, Box<dyn std::error::Error>> {
    let spec = std::env::var("MATRIX_OPAQUE_TOKENS").unwrap_or_default();
    let mut tokens = StaticTokens::default();
    let mut count = 0;
    for entry in spec.split(',').filter(|e| !e.trim().is_empty()) {
        let (token, user_id) = entry.trim().split_once(':').ok_or_else(|| {
            format!("MATRIX_OPAQUE_TOKENS: `{entry}` is not `token:@user:server`")
        })?;
        if token.is_empty() || !is_valid_user_id(user_id) {
            return Err(
                format!("MATRIX_OPAQUE_TOKENS: `{entry}` is not `token:@user:server`").into(),
            );
        }
        tokens = tokens.with(token, ResolvedToken::user(user_id));
        count += 1;
    }
    if count == 0 {
        return Ok(None);
    }
    tracing::info!(count, "opaque tokens registered");
    Ok(Some(tokens))
}

/// `MATRIX_OAUTH2_*`: the introspection resolver, if delegation is on.
fn oauth2_introspection(
    server_name: &str,
) -> Result<Option<Introspection>, Box<dyn std::error::Error>> {
    let Some(url) = std::env::var("MATRIX_OAUTH2_INTROSPECTION_URL")
        .ok()
        .filter(|url| !url.is_empty())
    else {
        return Ok(None);
    };
    let endpoint: axum::http::Uri = url
        .parse()
        .map_err(|_| format!("MATRIX_OAUTH2_INTROSPECTION_URL: `{url}` is not a URL"))?;
    if !matches!(endpoint.scheme_str(), Some("http" | "https")) || endpoint.host().is_none() {
        return Err(format!(
            "MATRIX_OAUTH2_INTROSPECTION_URL: `{url}` is not an http:// or https:// URL"
        )
        .into());
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let secret = var("MATRIX_OAUTH2_SHARED_SECRET");
    let client = (
        var("MATRIX_OAUTH2_CLIENT_ID"),
        var("MATRIX_OAUTH2_CLIENT_SECRET"),
    );
    let auth = match (secret, client) {
        (Some(_), (Some(_), _) | (_, Some(_))) => {
            return Err(
                "set MATRIX_OAUTH2_SHARED_SECRET or MATRIX_OAUTH2_CLIENT_ID and \
                        MATRIX_OAUTH2_CLIENT_SECRET, not both"
                    .into(),
            )
        }
        (Some(secret), _) => {
            if secret.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
                return Err("MATRIX_OAUTH2_SHARED_SECRET must be visible ASCII".into());
            }
            ClientAuth::shared_secret(secret)
        }
        (None, (Some(id), Some(secret))) => ClientAuth::client_secret_basic(id, secret),
        (None, (Some(_), None) | (None, Some(_))) => {
            return Err(
                "MATRIX_OAUTH2_CLIENT_ID and MATRIX_OAUTH2_CLIENT_SECRET go together".into(),
            )
        }
        (None, (None, None)) => {
            tracing::warn!("OAuth 2.0 delegation without client authentication");
            ClientAuth::none()
        }
    };
    let ttl_ms = env_number("MATRIX_OAUTH2_CACHE_TTL_MS")?.unwrap_or(120_000);
    let introspection = Introspection::new(endpoint, server_name)
        .client_auth(auth)
        .cache_ttl(Duration::from_millis(ttl_ms));
    tracing::info!(?introspection, "OAuth 2.0 delegation on");
    Ok(Some(introspection))
}

/// The layer's resolver: the fixed opaque tokens first, then the token server.
fn with_resolvers(
    auth: MatrixAuthLayer,
    opaque: Option<StaticTokens>,
    oauth2: Option<Introspection>,
) -> MatrixAuthLayer {
    match (opaque, oauth2) {
        (None, None) => auth,
        (Some(opaque), None) => auth.resolver(opaque),
        (None, Some(oauth2)) => auth.resolver(oauth2),
        (Some(opaque), Some(oauth2)) => auth.resolver(OpaqueThenOAuth2 { opaque, oauth2 }),
    }
}

/// `MATRIX_OPAQUE_TOKENS`, then introspection for the tokens they do not hold.
struct OpaqueThenOAuth2 {
    opaque: StaticTokens,
    oauth2: Introspection,
}

impl TokenResolver for OpaqueThenOAuth2 {
    fn resolve(&self, token: &str) -> ResolveFuture {
        let opaque = self.opaque.resolve(token);
        let oauth2 = self.oauth2.clone();
        let token = token.to_owned();
        Box::pin(async move {
            match opaque.await? {
                Some(resolved) => Ok(Some(resolved)),
                None => oauth2.resolve(&token).await,
            }
        })
    }

    /// The introspection cache's hit, so that cached OAuth 2.0 tokens are decided at once (and
    /// count as known good for the failed-authentication limiter).
    fn resolve_now(&self, token: &str) -> Option<std::sync::Arc<ResolvedToken>> {
        self.oauth2.resolve_now(token)
    }
}

/// `GET /_matrix/client/v1/auth_metadata`'s source: the issuer's OpenID Provider metadata.
#[derive(Clone)]
struct AuthMetadata {
    url: String,
    cached: Arc<Mutex<Option<(std::time::Instant, Value)>>>,
}

impl AuthMetadata {
    const FRESH: Duration = Duration::from_secs(300);

    fn from_env() -> Result<Option<Self>, Box<dyn std::error::Error>> {
        let Some(issuer) = std::env::var("MATRIX_OAUTH2_ISSUER")
            .ok()
            .filter(|i| !i.is_empty())
        else {
            return Ok(None);
        };
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        match url.parse::<axum::http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => {
                return Err(format!(
                    "MATRIX_OAUTH2_ISSUER: `{issuer}` is not an http:// or https:// URL"
                )
                .into())
            }
        }
        Ok(Some(Self {
            url,
            cached: Arc::default(),
        }))
    }

    async fn get(&self) -> Result<Value, String> {
        if let Some((at, metadata)) = &*self.cached.lock().unwrap() {
            if at.elapsed() < Self::FRESH {
                return Ok(metadata.clone());
            }
        }
        use http_body_util::BodyExt;
        // HTTP or HTTPS (rustls, the system's roots), as the introspection client.
        // Without system roots, plain HTTP still works (and HTTPS fails, closed).
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls_provider())
            .unwrap_or_else(|_| {
                let tls = rustls::ClientConfig::builder_with_provider(rustls_provider())
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls)
            })
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, http_body_util::Full<Bytes>>(connector);
        let request = Request::get(&self.url)
            .header(ACCEPT, "application/json")
            .body(http_body_util::Full::default())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("the issuer answered {}", response.status()));
            }
            let body = http_body_util::Limited::new(response.into_body(), 256 * 1024)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            match serde_json::from_slice::<Value>(&body) {
                Ok(metadata @ Value::Object(_)) => Ok(metadata),
                _ => Err("the issuer's metadata is not a JSON object".to_owned()),
            }
        };
        let metadata = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| "the issuer did not answer in time".to_owned())??;
        *self.cached.lock().unwrap() = Some((std::time::Instant::now(), metadata.clone()));
        Ok(metadata)
    }
}

/// ring, as the crate's `oauth2-rustls` client uses it.
fn rustls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)] // no post-quantum key exchange; fine for an example
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `GET /_matrix/client/v1/auth_metadata` (spec v1.15): the OAuth 2.0 server's metadata, with
/// `MATRIX_OAUTH2_ISSUER`; otherwise `404 M_UNRECOGNIZED`, as for a server without the OAuth
/// 2.0 API.
async fn auth_metadata(State(state): State<AppState>) -> Response {
    let Some(metadata) = &state.auth_metadata else {
        return unrecognized().await;
    };
    match metadata.get().await {
        Ok(metadata) => Json(metadata).into_response(),
        Err(error) => {
            tracing::warn!(%error, "the issuer's metadata cannot be read");
            matrix_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "The authorization server's metadata cannot be read; try again later.",
            )
        }
    }
}

/// `MATRIX_MACAROON_SECRET`: unset, a random secret for this run; set but empty, an error (every
/// token would be forgeable); shorter than [`RECOMMENDED_SECRET_LEN`] bytes, a warning.
fn macaroon_secret() -> Result<MacaroonSecret, String> {
    let secret = match std::env::var("MATRIX_MACAROON_SECRET") {
        Err(std::env::VarError::NotPresent) => {
            tracing::warn!(
                "MATRIX_MACAROON_SECRET is not set: using a random secret, so access tokens will \
                 not survive a restart"
            );
            random_string(32)
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("MATRIX_MACAROON_SECRET is not valid UTF-8".to_owned())
        }
        Ok(secret) => {
            if secret.is_empty() {
                return Err(
                    "MATRIX_MACAROON_SECRET is set but empty: anyone could forge tokens \
                            signed with an empty secret. Set it to a long random value (Synapse's \
                            macaroon_secret_key), or unset it for a random secret per run"
                        .to_owned(),
                );
            }
            if secret.len() < RECOMMENDED_SECRET_LEN {
                tracing::warn!(
                    len = secret.len(),
                    "MATRIX_MACAROON_SECRET is shorter than {RECOMMENDED_SECRET_LEN} bytes: tokens \
                     are only as hard to forge as it is to guess"
                );
            }
            secret
        }
    };
    MacaroonSecret::try_from_passphrase(secret)
        .map_err(|error| format!("MATRIX_MACAROON_SECRET: {error}"))
}

/// A user id, or a bare localpart of this server.
fn full_user_id(who: &str, server_name: &str) -> String {
    if who.starts_with('@') {
        who.to_owned()
    } else {
        format!("@{who}:{server_name}")
    }
}

/// `NAME=@alice:server,bob,...`: user ids (or bare localparts of this server).
fn user_list(name: &str, server_name: &str) -> Result<Vec<String>, String> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|who| !who.is_empty())
        .map(|who| {
            let user_id = full_user_id(who, server_name);
            if is_valid_user_id(&user_id) {
                Ok(user_id)
            } else {
                Err(format!("{name}: `{who}` is not a Matrix user id"))
            }
        })
        .collect()
}

/// `MATRIX_USERS=alice:password,bob:secret`.
fn parse_users(spec: &str) -> Result<HashMap<String, String>, String> {
    spec.split(',')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            let (user, password) = entry
                .split_once(':')
                .ok_or_else(|| format!("MATRIX_USERS: `{entry}` is not `user:password`"))?;
            Ok((user.trim().to_owned(), password.to_owned()))
        })
        .collect()
}

/// `GET /_matrix/client/v3/login`. `get_login_token` (spec v1.7) tells clients that
/// `POST /_matrix/client/v1/login/get_token` is there.
async fn login_flows() -> Json<Value> {
    Json(json!({ "flows": [
        { "type": "m.login.password" },
        { "type": "m.login.token", "get_login_token": true },
    ]}))
}

/// `POST /_matrix/client/v3/login`: password or login token; `403 M_FORBIDDEN` otherwise.
async fn login(State(state): State<AppState>, request: Request<axum::body::Body>) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 * 1024).await else {
        return matrix_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            "Body too large",
        );
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return matrix_error(StatusCode::BAD_REQUEST, "M_NOT_JSON", "Content not JSON.");
    };
    let forbidden = || matrix_error(StatusCode::FORBIDDEN, "M_FORBIDDEN", "Invalid login");
    let user_id = match body["type"].as_str() {
        Some("m.login.password") => {
            // `identifier.user` (today's spec) or the older top-level `user`.
            let Some(user) = body["identifier"]["user"]
                .as_str()
                .or_else(|| body["user"].as_str())
            else {
                return matrix_error(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "No user given");
            };
            let localpart = match user.strip_prefix('@') {
                Some(full) => match full.split_once(':') {
                    Some((local, server)) if server == state.server_name => local,
                    _ => return forbidden(),
                },
                None => user,
            };
            let password = body["password"].as_str().unwrap_or_default();
            let known = state.users.get(localpart);
            let expected = known.map_or(&b""[..], |p| p.as_bytes());
            let matches: bool = expected.ct_eq(password.as_bytes()).into();
            if known.is_none() || !matches {
                return forbidden();
            }
            format!("@{localpart}:{}", state.server_name)
        }
        Some("m.login.token") => {
            let token = body["token"].as_str().unwrap_or_default();
            match state
                .sessions
                .redeem_login_token(token.as_bytes(), &parts)
                .await
            {
                Ok(user) => user.user_id().to_owned(),
                Err(_) => return forbidden(),
            }
        }
        _ => return matrix_error(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Unknown login type"),
    };
    // Only once the credentials hold, so that the answer tells nothing to whoever lacks them.
    // A suspended account may log in (spec v1.13); a locked one gets no new token until it is
    // unlocked (spec v1.12), a deactivated one never again.
    match state.accounts.status(&user_id) {
        AccountStatus::Deactivated => {
            return matrix_error(
                StatusCode::FORBIDDEN,
                "M_USER_DEACTIVATED",
                "This account has been deactivated.",
            )
        }
        AccountStatus::Locked => return user_locked(),
        _ => {}
    }
    let device_id = body["device_id"]
        .as_str()
        .filter(|d| !d.is_empty())
        .map_or_else(|| random_string(10).to_uppercase(), str::to_owned);
    let tokens = state.sessions.login(
        &user_id,
        &SessionRequest::new()
            .device_id(device_id.clone())
            .refresh(body["refresh_token"].as_bool() == Some(true)),
    );
    tracing::info!(%user_id, %device_id, "logged in");
    state
        .devices
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert((user_id.clone(), device_id.clone()));
    let mut answer = json!({
        "user_id": user_id,
        "access_token": tokens.access_token,
        "device_id": device_id,
        "home_server": state.server_name,
    });
    if let Some(refresh_token) = tokens.refresh_token {
        answer["refresh_token"] = refresh_token.into();
    }
    if let Some(ms) = tokens.expires_in_ms {
        answer["expires_in_ms"] = ms.into();
    }
    Json(answer).into_response()
}

/// `POST /_matrix/client/v3/logout`: this token's login, refresh token included.
async fn logout(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    user: MatrixUser,
) -> Response {
    if user.credential() == Credential::OAuth2 {
        return oauth2_logout(&state, &headers, &user).await;
    }
    match state.sessions.logout(&user).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(error) => store_unavailable(&error),
    }
}

/// `/logout` with an OAuth 2.0 token. Revoking it is the token server's business (this server
/// keeps no state about it; with MAS, `/logout` is routed to MAS itself): the cached answer is
/// dropped, then the token server is asked again. Inactive there (the client revoked it, RFC
/// 7009): `200`. Still active: `403 M_FORBIDDEN`, since answering `200` would claim a logout that
/// did not happen.
async fn oauth2_logout(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    user: &MatrixUser,
) -> Response {
    let Some(introspection) = &state.introspection else {
        return Json(json!({})).into_response();
    };
    introspection.invalidate(user);
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .map(|(_, token)| token.to_owned());
    let still_active = match &token {
        Some(token) => match introspection.resolve(token).await {
            Ok(answer) => answer.is_some(),
            Err(error) => return store_unavailable(&error),
        },
        // Sent in the query (stripped before handlers): it cannot be asked about again.
        None => true,
    };
    if still_active {
        matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "This token belongs to the OAuth 2.0 server: revoke it there (RFC 7009).",
        )
    } else {
        Json(json!({})).into_response()
    }
}

/// `POST /_matrix/client/v3/logout/all`: every token of the user minted before now.
async fn logout_all(State(state): State<AppState>, user: MatrixUser) -> Response {
    if let Some(introspection) = &state.introspection {
        introspection.invalidate_user(user.user_id());
    }
    if user.credential() == Credential::OAuth2 {
        // The token server holds these sessions: only it can end them all.
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "These sessions belong to the OAuth 2.0 server: log out everywhere there.",
        );
    }
    match state.sessions.logout_all(&user).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(error) => store_unavailable(&error),
    }
}

/// `POST /_matrix/client/v1/login/get_token` (MSC3882): a login token for another device.
async fn get_login_token(State(state): State<AppState>, user: MatrixUser) -> Json<Value> {
    let (login_token, expires_in_ms) = state.sessions.login_token(user.user_id());
    Json(json!({ "login_token": login_token, "expires_in_ms": expires_in_ms }))
}

/// `GET /_matrix/client/v3/capabilities`: what this user may do here. `m.account_moderation`
/// (MSC4323) only for administrators: the proposal leaves it out when both would be `false`.
async fn capabilities(State(state): State<AppState>, user: MatrixUser) -> Json<Value> {
    let mut capabilities = json!({
        "m.change_password": { "enabled": false },
        "m.3pid_changes": { "enabled": false },
        "m.get_login_token": { "enabled": true },
    });
    if state.accounts.is_admin(user.user_id()) {
        capabilities["m.account_moderation"] = json!({ "lock": true, "suspend": true });
    }
    Json(json!({ "capabilities": capabilities }))
}

/// `GET /_matrix/client/v3/sync`: no rooms here, so always the empty answer at once.
async fn sync(_user: MatrixUser) -> Json<Value> {
    Json(json!({ "next_batch": format!("s{}", unix_ms()) }))
}

/// `PUT …/rooms/{roomId}/send/{eventType}/{txnId}`: `{"event_id"}`, derived from the sender,
/// its device, the room, the type and the transaction id, so that a retried transaction gets
/// the same event id (the spec's idempotency) with nothing stored.
async fn send_event(
    user: MatrixUser,
    Path((room_id, event_type, txn_id)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    if let Err(response) = json_object(&body) {
        return response;
    }
    let device_id = user.device_id().unwrap_or_default();
    let id = derived_id(&[user.user_id(), device_id, &room_id, &event_type, &txn_id]);
    Json(json!({ "event_id": format!("${id}") })).into_response()
}

/// `PUT …/rooms/{roomId}/state/{eventType}/{stateKey}`: `{"event_id"}`.
async fn put_state(
    _user: MatrixUser,
    Path((_room_id, _event_type, _state_key)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    state_event(&body)
}

/// `PUT …/rooms/{roomId}/state/{eventType}` and `…/state/{eventType}/`: the empty state key.
async fn put_state_empty_key(
    _user: MatrixUser,
    Path((_room_id, _event_type)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    state_event(&body)
}

fn state_event(body: &[u8]) -> Response {
    match json_object(body) {
        Err(response) => response,
        Ok(_) => Json(json!({ "event_id": format!("${}", random_string(43)) })).into_response(),
    }
}

/// `POST …/createRoom`: `{"room_id"}`, a new id.
async fn create_room(State(state): State<AppState>, _user: MatrixUser, body: Bytes) -> Response {
    match json_object(&body) {
        Err(response) => response,
        Ok(_) => Json(json!({ "room_id": new_room_id(&state.server_name) })).into_response(),
    }
}

/// `POST …/rooms/{roomId}/join`: `{"room_id"}`. The body (a `reason`, a third-party signature)
/// is optional.
async fn join_room(_user: MatrixUser, Path(room_id): Path<String>, body: Bytes) -> Response {
    if !body.is_empty() {
        if let Err(response) = json_object(&body) {
            return response;
        }
    }
    Json(json!({ "room_id": room_id })).into_response()
}

/// `POST …/join/{roomIdOrAlias}`: `{"room_id"}`; an alias stands for a room id derived from it.
async fn join_by_id_or_alias(
    State(state): State<AppState>,
    _user: MatrixUser,
    Path(room): Path<String>,
    body: Bytes,
) -> Response {
    if !body.is_empty() {
        if let Err(response) = json_object(&body) {
            return response;
        }
    }
    let room_id = if room.starts_with('!') {
        room
    } else if room.starts_with('#') {
        format!("!{}:{}", &derived_id(&[&room])[..18], state.server_name)
    } else {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "Not a room id or a room alias.",
        );
    };
    Json(json!({ "room_id": room_id })).into_response()
}

/// `POST /_matrix/client/v3/rooms/{roomId}/upgrade`: `{"replacement_room"}`, a new id.
async fn upgrade_room(
    State(state): State<AppState>,
    _user: MatrixUser,
    Path(_room_id): Path<String>,
    body: Bytes,
) -> Response {
    let object = match json_object(&body) {
        Err(response) => return response,
        Ok(object) => object,
    };
    match object.get("new_version") {
        Some(Value::String(_)) => {
            Json(json!({ "replacement_room": new_room_id(&state.server_name) })).into_response()
        }
        None => matrix_error(
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
            "Missing new_version.",
        ),
        Some(_) => matrix_error(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "new_version must be a string.",
        ),
    }
}

/// `PUT …/profile/{userId}/displayname`: `{}`, for one's own profile only.
async fn set_displayname(user: MatrixUser, Path(user_id): Path<String>, body: Bytes) -> Response {
    if user_id != user.user_id() {
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "You cannot set another user's display name.",
        );
    }
    match json_object(&body) {
        Err(response) => response,
        Ok(object) => match object.get("displayname") {
            None | Some(Value::String(_) | Value::Null) => Json(json!({})).into_response(),
            Some(_) => matrix_error(
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
                "displayname must be a string.",
            ),
        },
    }
}

fn new_room_id(server_name: &str) -> String {
    format!("!{}:{server_name}", random_string(18))
}

/// 43 characters of unpadded base64url over SHA-256 of `parts` (each length-prefixed, so that
/// no two lists of parts run together alike).
fn derived_id(parts: &[&str]) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash.finalize())
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis())
}

/// `GET /_matrix/client/v1/admin/lock/{userId}` (MSC4323): `{"locked": bool}`.
async fn admin_lock_get(
    State(state): State<AppState>,
    user: MatrixUser,
    Path(target): Path<String>,
) -> Response {
    moderation(&state, &user, &target, Moderation::Lock, None)
}

/// `PUT /_matrix/client/v1/admin/lock/{userId}` (MSC4323): body and answer `{"locked": bool}`.
async fn admin_lock_put(
    State(state): State<AppState>,
    user: MatrixUser,
    Path(target): Path<String>,
    body: Bytes,
) -> Response {
    moderation(&state, &user, &target, Moderation::Lock, Some(&body))
}

/// `GET /_matrix/client/v1/admin/suspend/{userId}` (MSC4323): `{"suspended": bool}`.
async fn admin_suspend_get(
    State(state): State<AppState>,
    user: MatrixUser,
    Path(target): Path<String>,
) -> Response {
    moderation(&state, &user, &target, Moderation::Suspend, None)
}

/// `PUT /_matrix/client/v1/admin/suspend/{userId}` (MSC4323): body and answer
/// `{"suspended": bool}`.
async fn admin_suspend_put(
    State(state): State<AppState>,
    user: MatrixUser,
    Path(target): Path<String>,
    body: Bytes,
) -> Response {
    moderation(&state, &user, &target, Moderation::Suspend, Some(&body))
}

/// The admin endpoints, in the spec's order: the requester must be an administrator (checked
/// before anything is looked up, so that nobody else learns which accounts exist), the target a
/// user id of this server (`400 M_INVALID_PARAM`), not the requester's own account nor another
/// administrator's (`403 M_FORBIDDEN`), and known and not deactivated (`404 M_NOT_FOUND`).
/// `target` comes percent-decoded from the path, so `%40bob%3Alocalhost` is `@bob:localhost`.
fn moderation(
    state: &AppState,
    user: &MatrixUser,
    target: &str,
    what: Moderation,
    body: Option<&[u8]>,
) -> Response {
    if !state.accounts.is_admin(user.user_id()) {
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Requesting user is not a server administrator.",
        );
    }
    let local = is_valid_user_id(target)
        && target
            .split_once(':')
            .is_some_and(|(_, server)| server == state.server_name);
    if !local {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "User does not belong to the local server.",
        );
    }
    let set = match body {
        None => None,
        Some(body) => match json_object(body) {
            Err(response) => return response,
            Ok(object) => match object.get(what.key()) {
                Some(Value::Bool(on)) => Some(*on),
                _ => {
                    return matrix_error(
                        StatusCode::BAD_REQUEST,
                        "M_BAD_JSON",
                        &format!("`{}` must be a boolean.", what.key()),
                    )
                }
            },
        },
    };
    if set.is_some() && target == user.user_id() {
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "Administrators cannot change their own account's state.",
        );
    }
    if target != user.user_id() && state.accounts.is_admin(target) {
        return matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "The target user is another administrator.",
        );
    }
    match state.accounts.moderate(target, what, set) {
        None => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "User not found."),
        Some(on) => {
            if let Some(on) = set {
                tracing::info!(admin = user.user_id(), %target, "{} = {on}", what.key());
            }
            Json(json!({ what.key(): on })).into_response()
        }
    }
}

/// A request body that must be a JSON object: `400 M_NOT_JSON` when it is no JSON,
/// `400 M_BAD_JSON` when it is JSON but no object.
// The error is the response to send, as axum handlers return it; boxing it would only move it.
#[allow(clippy::result_large_err)]
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Err(_) => Err(matrix_error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "Content not JSON.",
        )),
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(matrix_error(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "The body must be a JSON object.",
        )),
    }
}

/// `401 M_USER_LOCKED` with `soft_logout`, as the layer answers a locked account.
fn user_locked() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({
            "errcode": "M_USER_LOCKED",
            "error": "This account has been locked.",
            "soft_logout": true,
        })),
    )
        .into_response()
}

fn store_unavailable(error: &dyn std::fmt::Display) -> Response {
    tracing::warn!(%error, "token store unavailable");
    matrix_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "M_UNKNOWN",
        "Token state unavailable; try again later.",
    )
}

/// `GET /_matrix/client/versions`.
async fn versions() -> Json<Value> {
    let mut versions = vec!["r0.6.1".to_owned()];
    versions.extend((1..=19).map(|minor| format!("v1.{minor}")));
    Json(json!({ "versions": versions, "unstable_features": {} }))
}

/// `GET /_matrix/client/v3/account/whoami`: the layer verified the token, the extractor hands
/// over who it belongs to.
async fn whoami(user: MatrixUser) -> Json<Value> {
    let mut body = json!({
        "user_id": user.user_id(),
        "is_guest": user.is_guest(),
    });
    if let Some(device_id) = user.device_id() {
        body["device_id"] = device_id.into();
    }
    Json(body)
}

/// `GET /_matrix/client/v3/devices`: this server keeps no device list, so it reports the device
/// the token was issued to, if any. Guests never get here: the layer answers them with 403.
async fn devices(user: MatrixUser) -> Json<Value> {
    let devices: Vec<Value> = user
        .device_id()
        .map(|device_id| json!({ "device_id": device_id }))
        .into_iter()
        .collect();
    Json(json!({ "devices": devices }))
}

/// Any endpoint this server does not know.
async fn unrecognized() -> Response {
    matrix_error(
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
        "Unrecognized request",
    )
}

/// A known endpoint with a method it does not support.
async fn method_not_allowed() -> Response {
    matrix_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "M_UNRECOGNIZED",
        "Unrecognized request",
    )
}

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (status, Json(json!({ "errcode": errcode, "error": error }))).into_response()
}

/// Matrix clients run in browsers on any origin; the spec asks servers to allow them all.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            AUTHORIZATION,
            CONTENT_TYPE,
            ACCEPT,
            HeaderName::from_static("x-requested-with"),
        ])
}

/// A whole number from the environment, if the variable is set.
fn env_number(name: &str) -> Result<Option<u64>, String> {
    match std::env::var(name).ok().filter(|value| !value.is_empty()) {
        None => Ok(None),
        Some(value) => value
            .parse()
            .map(Some)
            .map_err(|_| format!("{name} must be a whole number, not `{value}`")),
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
