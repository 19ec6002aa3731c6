//! OAuth 2.0 delegation against a real authorization server: panva's `oidc-provider` (npm, a
//! certified OpenID Provider) as `tests/oidc/server.js` starts it, with RFC 7662 introspection,
//! RFC 7009 revocation, a confidential client `homeserver` (`client_secret_basic`) and a public
//! client `matrix-client` the tokens are issued to. The example homeserver
//! (`examples/homeserver.rs`, as a process, see `homeserver_policy.rs`) is pointed at it with
//! `MATRIX_OAUTH2_*` and driven over HTTP with the server's own tokens.
//!
//! Tokens are real `AccessToken` models of the provider, minted through the test helper
//! endpoint `POST /test/mint` of `server.js` (the provider saves them through its adapter, so its
//! introspection and revocation endpoints find them like any other); `username` comes from the
//! provider's `extraTokenClaims` hook. `GET /test/introspections` counts the introspection
//! requests the provider received.
//!
//! Needs Node.js and `npm ci` in `tests/oidc`: without them a plain `cargo test` skips (saying
//! so); `./scripts/test.sh` installs them and sets `MATRIX_REQUIRE_OIDC=1`, under which a
//! missing server fails the tests instead.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::homeserver_policy::{minted, Homeserver};

/// The confidential client the homeserver introspects as (`server.js` reads it from the
/// environment).
const CLIENT_ID: &str = "homeserver";
const CLIENT_SECRET: &str = "the homeserver's client secret, for these tests only";
const API: &str = "urn:matrix:client:api:*";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

fn node() -> String {
    std::env::var("NODE").unwrap_or_else(|_| "node".to_owned())
}

/// Whether these tests must skip for want of Node.js or of `npm ci` in `tests/oidc`; under
/// `MATRIX_REQUIRE_OIDC` (set by `./scripts/test.sh`) that fails them instead.
fn skip() -> bool {
    let installed = oidc_dir()
        .join("node_modules/oidc-provider/package.json")
        .is_file();
    let node_runs = Command::new(node())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let reason = match (node_runs, installed) {
        (true, true) => return false,
        (false, _) => "Node.js (`node`, or $NODE) does not run",
        (true, false) => "tests/oidc/node_modules is missing (`cd tests/oidc && npm ci`)",
    };
    assert!(
        std::env::var_os("MATRIX_REQUIRE_OIDC").is_none(),
        "MATRIX_REQUIRE_OIDC is set but {reason}"
    );
    eprintln!("skipped: needs the real OAuth 2.0 server of tests/oidc: {reason} (./scripts/test.sh installs it)");
    true
}

/// A free loopback port (bound and released: the token server must come back on the same one).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tests/oidc/server.js` as a process, killed when dropped (or by [`TokenServer::stop`]).
struct TokenServer {
    child: Option<Child>,
    port: u16,
    state: PathBuf,
    log: Arc<Mutex<String>>,
}

impl TokenServer {
    /// Starts a token server on a free port, its models kept in a fresh state file.
    fn start(name: &str) -> Self {
        let state = std::env::temp_dir().join(format!(
            "tower-matrix-auth-oidc-{name}-{}-{:x}.json",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut server = Self {
            child: None,
            port: free_port(),
            state,
            log: Arc::default(),
        };
        server.restart();
        server
    }

    /// (Re)starts the process on this server's port with its state file; waits until it listens.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "the token server is running");
        let mut child = Command::new(node())
            .arg("server.js")
            .current_dir(oidc_dir())
            .env("PORT", self.port.to_string())
            .env("STATE", &self.state)
            .env("CLIENT_SECRET", CLIENT_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node starts");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (sender, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("listening on ") {
                    let _ = sender.send(());
                }
            }
        });
        if listening.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the token server did not listen; its log:\n{}",
                self.log.lock().unwrap()
            );
        }
        self.child = Some(child);
    }

    /// Kills the process (the port then refuses connections).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The homeserver's `MATRIX_OAUTH2_*` for this server, with this cache TTL.
    fn env(&self, cache_ttl_ms: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "MATRIX_OAUTH2_INTROSPECTION_URL",
                format!("{}/token/introspection", self.issuer()),
            ),
            ("MATRIX_OAUTH2_CLIENT_ID", CLIENT_ID.to_owned()),
            ("MATRIX_OAUTH2_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
            ("MATRIX_OAUTH2_CACHE_TTL_MS", cache_ttl_ms.to_owned()),
            ("MATRIX_OAUTH2_ISSUER", self.issuer()),
        ]
    }

    /// A new access token of the provider for `account` (the Matrix localpart), with `scope`.
    async fn mint(&self, account: &str, scope: &str, expires_in_s: u64) -> String {
        let body = json!({"account": account, "scope": scope, "expires_in": expires_in_s});
        let (status, _, answer) = send(
            Method::POST,
            &format!("{}/test/mint", self.issuer()),
            &[(CONTENT_TYPE.as_str(), "application/json")],
            body.to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "mint: {answer}");
        answer["access_token"].as_str().unwrap().to_owned()
    }

    /// RFC 7009 revocation, by the client the token was issued to (a public client).
    async fn revoke(&self, token: &str) {
        let (status, _, answer) = send(
            Method::POST,
            &format!("{}/token/revocation", self.issuer()),
            &[(CONTENT_TYPE.as_str(), "application/x-www-form-urlencoded")],
            format!("token={token}&token_type_hint=access_token&client_id=matrix-client"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "revocation: {answer}");
    }

    /// Introspection requests this process received.
    async fn introspections(&self) -> u64 {
        let (status, _, answer) = send(
            Method::GET,
            &format!("{}/test/introspections", self.issuer()),
            &[],
            String::new(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        answer["count"].as_u64().unwrap()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.state);
    }
}

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: std::sync::OnceLock<Client<HttpConnector, Full<Bytes>>> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http())
}

/// One request: the status, the headers and the JSON answer (`null` when there is none).
async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::builder().method(&method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client()
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap_or_else(|error| panic!("{method} {url}: {error}"));
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The example homeserver with the token server's `MATRIX_OAUTH2_*` and `extra` variables.
fn homeserver(
    token_server: &TokenServer,
    cache_ttl_ms: &str,
    extra: &[(&str, &str)],
) -> Homeserver {
    let env = token_server.env(cache_ttl_ms);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    Homeserver::start(&all)
}

/// `GET /whoami` with `token`.
async fn whoami(server: &Homeserver, token: &str) -> (StatusCode, HeaderMap, Value) {
    let bearer = format!("Bearer {token}");
    send(
        Method::GET,
        &format!("{}{WHOAMI}", server.base),
        &[(AUTHORIZATION.as_str(), &bearer)],
        String::new(),
    )
    .await
}

/// A `401 M_UNKNOWN_TOKEN` that does not invite a soft logout.
fn assert_unknown_token(case: &str, (status, _, answer): &(StatusCode, HeaderMap, Value)) {
    assert_eq!(*status, StatusCode::UNAUTHORIZED, "{case}: {answer}");
    assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "{case}: {answer}");
    assert_ne!(answer["soft_logout"], json!(true), "{case}: {answer}");
}

/// Active, expired, scope-less and two-device tokens of the real server; the issuer's metadata;
/// macaroons and an application service beside them, never sent to the token server.
#[tokio::test]
async fn real_server_tokens_macaroons_and_appservice() {
    if skip() {
        return;
    }
    let token_server = TokenServer::start("tokens");
    let server = homeserver(
        &token_server,
        "120000",
        &[("MATRIX_APPSERVICE_TOKEN", "the_as_token_beside_oauth2")],
    );

    // Active, with a device scope: the user from `username`, the device from the scope.
    let active = token_server
        .mint(
            "alice",
            &format!("{API} urn:matrix:client:device:PHONE"),
            300,
        )
        .await;
    let (status, _, answer) = whoami(&server, &active).await;
    assert_eq!(status, StatusCode::OK, "active: {answer}");
    assert_eq!(answer["user_id"], "@alice:localhost");
    assert_eq!(answer["device_id"], "PHONE");

    // No device scope: an identity without a device (as Synapse allows).
    let deviceless = token_server.mint("bob", API, 300).await;
    let (status, _, answer) = whoami(&server, &deviceless).await;
    assert_eq!(status, StatusCode::OK, "no device: {answer}");
    assert_eq!(answer["user_id"], "@bob:localhost");
    assert!(
        answer.get("device_id").is_none_or(Value::is_null),
        "{answer}"
    );

    // The same device in the stable and MSC2967's spellings, with the unstable API scope.
    let both_spellings = token_server
        .mint(
            "carol",
            "urn:matrix:org.matrix.msc2967.client:api:* urn:matrix:client:device:TABLET \
             urn:matrix:org.matrix.msc2967.client:device:TABLET",
            300,
        )
        .await;
    let (status, _, answer) = whoami(&server, &both_spellings).await;
    assert_eq!(status, StatusCode::OK, "both spellings: {answer}");
    assert_eq!(answer["user_id"], "@carol:localhost");
    assert_eq!(answer["device_id"], "TABLET");

    // Refused by the homeserver although the token server says active.
    let no_api_scope = token_server
        .mint("alice", "openid urn:matrix:client:device:PHONE", 300)
        .await;
    assert_unknown_token("no API scope", &whoami(&server, &no_api_scope).await);
    let two_devices = token_server
        .mint(
            "alice",
            &format!("{API} urn:matrix:client:device:PHONE urn:matrix:client:device:LAPTOP"),
            300,
        )
        .await;
    assert_unknown_token("two devices", &whoami(&server, &two_devices).await);

    // Unknown to the token server.
    assert_unknown_token(
        "unknown",
        &whoami(&server, "not-a-token-of-the-server").await,
    );

    // Expired: once used while active (its answer cached, bounded by `exp`), once never used.
    let minted_at = Instant::now();
    let expiring = token_server
        .mint("alice", &format!("{API} urn:matrix:client:device:PHONE"), 2)
        .await;
    let expired_unused = token_server.mint("alice", API, 1).await;
    let (status, _, answer) = whoami(&server, &expiring).await;
    assert_eq!(status, StatusCode::OK, "before its exp: {answer}");
    // `exp` is whole seconds after `iat`, itself rounded down: past 3.2 s both are expired.
    tokio::time::sleep(Duration::from_millis(3200).saturating_sub(minted_at.elapsed())).await;
    assert_unknown_token("expired, cached", &whoami(&server, &expiring).await);
    assert_unknown_token(
        "expired, never used",
        &whoami(&server, &expired_unused).await,
    );

    // The issuer's metadata, as the provider publishes it.
    let (status, _, metadata) = send(
        Method::GET,
        &format!("{}/_matrix/client/v1/auth_metadata", server.base),
        &[],
        String::new(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "auth_metadata: {metadata}");
    assert_eq!(metadata["issuer"], token_server.issuer());
    for field in [
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
    ] {
        assert!(metadata[field].is_string(), "{field}: {metadata}");
    }

    // Macaroons and the application service: decided here, never sent to the token server.
    let before = token_server.introspections().await;
    let macaroon = minted("@dave:localhost");
    let (status, _, answer) = whoami(&server, &macaroon).await;
    assert_eq!(status, StatusCode::OK, "macaroon: {answer}");
    assert_eq!(answer["user_id"], "@dave:localhost");
    let forged = {
        let keys = tower_matrix_auth::KeyRing::new().with_key(
            "key",
            tower_matrix_auth::MacaroonSecret::from_passphrase("not the server's secret"),
        );
        keys.mint("@dave:localhost", tower_matrix_auth::TokenType::Access)
            .unwrap()
            .nonce("forged")
            .to_token()
    };
    assert_unknown_token("forged macaroon", &whoami(&server, &forged).await);
    let (status, _, answer) = whoami(&server, "the_as_token_beside_oauth2").await;
    assert_eq!(status, StatusCode::OK, "as_token: {answer}");
    assert_eq!(answer["user_id"], "@appservice:localhost");
    assert_eq!(
        token_server.introspections().await,
        before,
        "a macaroon or an as_token reached the token server"
    );
    drop(server);
}

/// Revoked at the token server (RFC 7009): still admitted from the cache within its TTL,
/// refused after it.
#[tokio::test]
async fn real_server_revocation_after_the_cache_ttl() {
    if skip() {
        return;
    }
    const TTL: Duration = Duration::from_millis(2000);
    let token_server = TokenServer::start("revocation");
    let server = homeserver(&token_server, &TTL.as_millis().to_string(), &[]);
    let token = token_server
        .mint(
            "alice",
            &format!("{API} urn:matrix:client:device:PHONE"),
            300,
        )
        .await;

    // The answer is cached from some instant between these two.
    let sent = Instant::now();
    let (status, _, answer) = whoami(&server, &token).await;
    let answered = Instant::now();
    assert_eq!(status, StatusCode::OK, "before revocation: {answer}");

    token_server.revoke(&token).await;
    let asked = Instant::now();
    let (status, _, answer) = whoami(&server, &token).await;
    assert!(
        asked < sent + TTL,
        "revoking took longer than the cache TTL ({:?}): the machine is too slow for this test",
        asked - sent
    );
    assert_eq!(status, StatusCode::OK, "revoked, within the TTL: {answer}");
    assert_eq!(answer["device_id"], "PHONE");

    tokio::time::sleep((answered + TTL + Duration::from_millis(100)) - Instant::now()).await;
    assert_unknown_token("revoked, after the TTL", &whoami(&server, &token).await);

    // Revoked, then logged out at the homeserver: its answer is forgotten at once.
    let token = token_server.mint("bob", API, 300).await;
    let sent = Instant::now();
    assert_eq!(whoami(&server, &token).await.0, StatusCode::OK);
    token_server.revoke(&token).await;
    let bearer = format!("Bearer {token}");
    let (status, _, answer) = send(
        Method::POST,
        &format!("{}/_matrix/client/v3/logout", server.base),
        &[
            (AUTHORIZATION.as_str(), &bearer),
            (CONTENT_TYPE.as_str(), "application/json"),
        ],
        "{}".to_owned(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "logout: {answer}");
    let refused = whoami(&server, &token).await;
    assert!(
        sent.elapsed() < TTL,
        "the logout took longer than the cache TTL: the machine is too slow for this test"
    );
    assert_unknown_token("revoked and logged out, within the TTL", &refused);
}

/// The homeserver authenticates itself to the introspection endpoint: with a wrong client
/// secret the token server refuses it (`401 invalid_client`), and requests fail closed
/// (`503`), nobody logged out.
#[tokio::test]
async fn real_server_refuses_a_wrong_client_secret() {
    if skip() {
        return;
    }
    let token_server = TokenServer::start("client-secret");
    let mut env = token_server.env("120000");
    for (name, value) in &mut env {
        if *name == "MATRIX_OAUTH2_CLIENT_SECRET" {
            *value = "not the client's secret".to_owned();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Homeserver::start(&env);
    let token = token_server.mint("alice", API, 300).await;
    let (status, headers, answer) = whoami(&server, &token).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["errcode"], "M_UNKNOWN", "{answer}");
    assert!(headers.contains_key(RETRY_AFTER), "{headers:?}");
    assert_eq!(token_server.introspections().await, 1);
}

/// The token server stopped: `503 M_UNKNOWN` with `Retry-After` (nobody logged out); started
/// again on the same port, the same tokens are admitted again.
#[tokio::test]
async fn real_server_outage_then_recovery() {
    if skip() {
        return;
    }
    let mut token_server = TokenServer::start("outage");
    let server = homeserver(&token_server, "1000", &[]);
    let used = token_server
        .mint(
            "alice",
            &format!("{API} urn:matrix:client:device:PHONE"),
            300,
        )
        .await;
    let unused = token_server.mint("bob", API, 300).await;
    let (status, _, answer) = whoami(&server, &used).await;
    assert_eq!(status, StatusCode::OK, "before the outage: {answer}");

    token_server.stop();
    // The unused token is not in the cache; the used one leaves it after the TTL.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for (case, token) in [("never used", &unused), ("used, past the TTL", &used)] {
        let (status, headers, answer) = whoami(&server, token).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{case}, during the outage: {answer}"
        );
        assert_eq!(answer["errcode"], "M_UNKNOWN", "{case}: {answer}");
        assert!(headers.contains_key(RETRY_AFTER), "{case}: {headers:?}");
    }

    token_server.restart();
    for (case, token, user) in [
        ("never used", &unused, "@bob:localhost"),
        ("used", &used, "@alice:localhost"),
    ] {
        let (status, _, answer) = whoami(&server, token).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{case}, after the restart: {answer}"
        );
        assert_eq!(answer["user_id"], user);
    }
}

/// 100 concurrent first requests with one new token: one introspection request reaches the
/// token server (the cache's single flight), and every request is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_single_flight() {
    if skip() {
        return;
    }
    let token_server = TokenServer::start("single-flight");
    let server = Arc::new(homeserver(&token_server, "120000", &[]));
    // A first token warms up both sides (connections, the provider's code paths).
    let warm_up = token_server.mint("bob", API, 300).await;
    assert_eq!(whoami(&server, &warm_up).await.0, StatusCode::OK);

    let token = token_server
        .mint(
            "alice",
            &format!("{API} urn:matrix:client:device:PHONE"),
            300,
        )
        .await;
    let before = token_server.introspections().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let (server, token, barrier) = (server.clone(), token.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                whoami(&server, &token).await
            })
        })
        .collect();
    for request in requests {
        let (status, _, answer) = request.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["user_id"], "@alice:localhost");
        assert_eq!(answer["device_id"], "PHONE");
    }
    assert_eq!(
        token_server.introspections().await - before,
        1,
        "100 concurrent first requests with one token"
    );
}
