//! The example homeserver (`examples/homeserver.rs`) as a process, over real HTTP: the layer's
//! account and guest rules on every route a client uses (locked, suspended, deactivated, guest
//! and active users), the spec's admin lock/suspend API (v1.18, MSC4323), `/capabilities` and
//! the login flows, and the start-up variables (clock leeway, sweep interval, login token
//! lifetime, the macaroon secret).
//!
//! The binary is built once per run with `cargo build --example homeserver` (a no-op when it is
//! current), or taken from `$HOMESERVER_BIN` as `tests/client/nio_e2e.py` does. Each test starts
//! one server on a free loopback port and stops it when it ends.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower_matrix_auth::{
    Issuer, KeyRing, MacaroonSecret, MemoryStore, Sessions, TokenType, Verifier,
};

pub(crate) const SECRET: &str = "homeserver policy test: a macaroon secret of more than 32 bytes";
pub(crate) const SERVER: &str = "localhost";
const ROOM: &str = "!room:localhost";

/// The example binary, built once for the whole test binary.
pub(crate) fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(binary) = std::env::var_os("HOMESERVER_BIN") {
                return binary.into();
            }
            // This test binary is target/<profile dir>/deps/homeserver_policy-…: the example
            // goes to target/<profile dir>/examples/homeserver, built with the same profile.
            let exe = std::env::current_exe().expect("the test binary's path");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile>/deps");
            let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
                Some("debug") | None => "dev",
                Some(other) => other,
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut build = Command::new(cargo);
            // Without what `cargo test` sets for this package: build scripts that rerun when
            // such a variable changes (ring's, on CARGO_MANIFEST_DIR) would rebuild half the
            // dependency tree here, and again in the next plain cargo command.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if name.starts_with("CARGO_PKG_")
                    || name.starts_with("CARGO_MANIFEST_")
                    || name.starts_with("CARGO_BIN_")
                    || matches!(
                        &*name,
                        "CARGO_CRATE_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "OUT_DIR"
                    )
                {
                    build.env_remove(&*name);
                }
            }
            let status = build
                .args(["build", "--quiet", "--example", "homeserver", "--profile"])
                .arg(profile)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build --example homeserver failed");
            profile_dir
                .join("examples")
                .join(format!("homeserver{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// A running example homeserver, killed when dropped.
pub(crate) struct Homeserver {
    child: Child,
    pub(crate) base: String,
    pub(crate) stderr: Arc<Mutex<String>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example's process with exactly `env` for its `MATRIX_*` variables (none inherited).
fn command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MATRIX_") {
            command.env_remove(name);
        }
    }
    command
        .env("MATRIX_LISTEN", "127.0.0.1:0")
        .env("MATRIX_SERVER_NAME", SERVER)
        .env("MATRIX_MACAROON_SECRET", SECRET)
        .env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

impl Homeserver {
    /// Starts the example and waits until it listens.
    pub(crate) fn start(env: &[(&str, &str)]) -> Self {
        let mut child = command(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example homeserver starts");
        // Standard error is read all along (a full pipe would stall the server) and kept.
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        let log = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while pipe.read_line(&mut line).is_ok_and(|n| n > 0) {
                log.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (sender, addresses) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = sender.send(address.to_owned());
                }
            }
        });
        let base = match addresses.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the homeserver did not listen; its log:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Self {
            child,
            base,
            stderr,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `method path` with an optional bearer token and JSON body: the status and the JSON
    /// answer (`null` when there is none).
    async fn call(
        &self,
        method: &Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `GET /metrics` (`MATRIX_METRICS=1`): the Prometheus text, after checking it is `200`.
    async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.base).parse().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// `POST /_matrix/client/v3/login` with `m.login.password`.
    async fn login(&self, user: &str, password: &str) -> (StatusCode, Value) {
        let body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": password,
        });
        self.call(
            &Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(&body.to_string()),
        )
        .await
    }

    /// An access token of a password login that must succeed.
    async fn access_token(&self, user: &str, password: &str) -> String {
        let (status, answer) = self.login(user, password).await;
        assert_eq!(status, StatusCode::OK, "login {user}: {answer}");
        answer["access_token"].as_str().unwrap().to_owned()
    }

    /// `POST /_matrix/client/v3/login` with `m.login.token`.
    async fn login_with_token(&self, login_token: &str) -> (StatusCode, Value) {
        let body = json!({ "type": "m.login.token", "token": login_token });
        self.call(
            &Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(&body.to_string()),
        )
        .await
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

fn keys() -> KeyRing {
    KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET))
}

/// An access token minted with the server's secret, as Synapse (or any process sharing the
/// secret) mints them: the way to hold a token of an account that may not log in here.
pub(crate) fn minted(user_id: &str) -> String {
    keys()
        .mint(user_id, TokenType::Access)
        .unwrap()
        .location(SERVER)
        .nonce(format!("{:x}", rand::random::<u64>()))
        .to_token()
}

fn now_ms() -> u64 {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(elapsed.as_millis()).unwrap()
}

/// One request a client makes, and what the layer's rules make of it.
struct Route {
    method: Method,
    path: String,
    body: Option<String>,
    /// A write the spec has suspended accounts refused.
    denied_when_suspended: bool,
    /// On the spec's guest access list (and one this server lets guests use).
    guests: bool,
    /// What a 200 answer must hold.
    answer: fn(&Value) -> bool,
}

fn event_id(answer: &Value) -> bool {
    answer["event_id"]
        .as_str()
        .is_some_and(|id| id.starts_with('$') && id.len() > 1)
}

fn room_id(answer: &Value) -> bool {
    answer["room_id"]
        .as_str()
        .is_some_and(|id| id.starts_with('!') && id.ends_with(":localhost"))
}

fn the_room(answer: &Value) -> bool {
    answer["room_id"] == ROOM
}

/// The new routes, in both versions (upgrade and capabilities in v3 only), for `user_id`, plus
/// whoami and get_token.
fn routes(user_id: &str) -> Vec<Route> {
    let route = |method: Method,
                 path: String,
                 body: Option<&str>,
                 denied_when_suspended: bool,
                 guests: bool,
                 answer: fn(&Value) -> bool| Route {
        method,
        path,
        body: body.map(str::to_owned),
        denied_when_suspended,
        guests,
        answer,
    };
    let message = Some(r#"{"msgtype": "m.text", "body": "hello"}"#);
    let topic = Some(r#"{"topic": "a topic"}"#);
    let mut routes = Vec::new();
    for version in ["v3", "r0"] {
        let path = |rest: &str| format!("/_matrix/client/{version}/{rest}");
        routes.extend([
            route(
                Method::PUT,
                path(&format!("rooms/{ROOM}/send/m.room.message/txn1")),
                message,
                true,
                false,
                event_id,
            ),
            route(
                Method::PUT,
                path(&format!("rooms/{ROOM}/state/m.room.topic/a_key")),
                topic,
                true,
                false,
                event_id,
            ),
            route(
                Method::PUT,
                path(&format!("rooms/{ROOM}/state/m.room.topic")),
                topic,
                true,
                false,
                event_id,
            ),
            route(
                Method::PUT,
                path(&format!("rooms/{ROOM}/state/m.room.topic/")),
                topic,
                true,
                false,
                event_id,
            ),
            route(
                Method::POST,
                path("createRoom"),
                Some("{}"),
                true,
                false,
                room_id,
            ),
            route(
                Method::POST,
                path(&format!("rooms/{ROOM}/join")),
                Some("{}"),
                true,
                false,
                the_room,
            ),
            route(
                Method::POST,
                path(&format!("join/{ROOM}")),
                Some("{}"),
                true,
                false,
                the_room,
            ),
            route(
                Method::POST,
                path("join/%23lobby:localhost"),
                Some("{}"),
                true,
                false,
                room_id,
            ),
            route(
                Method::PUT,
                path(&format!("profile/{user_id}/displayname")),
                Some(r#"{"displayname": "Someone"}"#),
                true,
                true,
                |answer| answer == &json!({}),
            ),
            route(Method::GET, path("sync"), None, false, true, |answer| {
                answer["next_batch"].is_string()
            }),
            route(
                Method::GET,
                path("account/whoami"),
                None,
                false,
                true,
                |answer| answer["user_id"].is_string(),
            ),
        ]);
    }
    routes.extend([
        route(
            Method::POST,
            format!("/_matrix/client/v3/rooms/{ROOM}/upgrade"),
            Some(r#"{"new_version": "11"}"#),
            true,
            false,
            |answer| {
                answer["replacement_room"]
                    .as_str()
                    .is_some_and(|id| id.starts_with('!'))
            },
        ),
        route(
            Method::GET,
            "/_matrix/client/v3/capabilities".to_owned(),
            None,
            false,
            false,
            |answer| answer["capabilities"]["m.get_login_token"]["enabled"] == true,
        ),
        route(
            Method::POST,
            "/_matrix/client/v1/login/get_token".to_owned(),
            Some("{}"),
            false,
            false,
            |answer| answer["login_token"].is_string(),
        ),
    ]);
    routes
}

#[derive(Clone, Copy, Debug)]
enum State {
    Active,
    Suspended,
    Locked,
    Deactivated,
    Guest,
}

/// Every route of [`routes`] with `token`, against what `state` must get.
async fn check_routes(server: &Homeserver, state: State, user_id: &str, token: &str) {
    for route in routes(user_id) {
        let (status, answer) = server
            .call(
                &route.method,
                &route.path,
                Some(token),
                route.body.as_deref(),
            )
            .await;
        let what = format!(
            "{state:?} {user_id}: {} {} -> {status} {answer}",
            route.method, route.path
        );
        let refused = |expected: StatusCode, errcode: &str| {
            assert_eq!(status, expected, "{what}");
            assert_eq!(answer["errcode"], errcode, "{what}");
        };
        let allowed = match state {
            State::Active => true,
            State::Suspended => !route.denied_when_suspended,
            State::Guest => route.guests,
            State::Locked => {
                refused(StatusCode::UNAUTHORIZED, "M_USER_LOCKED");
                assert_eq!(answer["soft_logout"], true, "{what}");
                continue;
            }
            State::Deactivated => {
                refused(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
                assert_ne!(answer["soft_logout"], true, "{what}");
                continue;
            }
        };
        if allowed {
            assert_eq!(status, StatusCode::OK, "{what}");
            assert!((route.answer)(&answer), "{what}");
        } else if matches!(state, State::Guest) {
            refused(StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN");
        } else {
            refused(StatusCode::FORBIDDEN, "M_USER_SUSPENDED");
        }
    }
}

async fn logout(server: &Homeserver, path: &str, token: &str) -> (StatusCode, Value) {
    server
        .call(&Method::POST, path, Some(token), Some("{}"))
        .await
}

async fn whoami(server: &Homeserver, token: &str) -> (StatusCode, Value) {
    server
        .call(
            &Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(token),
            None,
        )
        .await
}

/// The account states of `MATRIX_*_USERS` and guests on every new route, the logout routes,
/// login, `/capabilities` and the login flows.
#[tokio::test]
async fn account_states_on_every_route() {
    let server = Homeserver::start(&[
        (
            "MATRIX_USERS",
            "alice:alice pw,sue:sue pw,carol:carol pw,dave:dave pw",
        ),
        // A full user id, a bare localpart, and spaces around entries.
        ("MATRIX_SUSPENDED_USERS", "@sue:localhost"),
        ("MATRIX_LOCKED_USERS", " carol "),
        ("MATRIX_DEACTIVATED_USERS", "dave"),
    ]);

    // Active.
    let alice = server.access_token("alice", "alice pw").await;
    check_routes(&server, State::Active, "@alice:localhost", &alice).await;

    // Suspended: logs in, reads, syncs, logs out; every other write is refused.
    let sue = server.access_token("sue", "sue pw").await;
    check_routes(&server, State::Suspended, "@sue:localhost", &sue).await;
    for path in ["/_matrix/client/v3/logout", "/_matrix/client/r0/logout/all"] {
        let sue = server.access_token("@sue:localhost", "sue pw").await;
        let (status, answer) = logout(&server, path, &sue).await;
        assert_eq!(status, StatusCode::OK, "suspended {path}: {answer}");
        let (status, answer) = whoami(&server, &sue).await;
        assert_eq!(
            answer["errcode"], "M_UNKNOWN_TOKEN",
            "after {path}: {status}"
        );
    }

    // Locked: no login; a token it already held is refused everywhere but the logout routes.
    let (status, answer) = server.login("carol", "carol pw").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "locked login: {answer}");
    assert_eq!(answer["errcode"], "M_USER_LOCKED");
    assert_eq!(answer["soft_logout"], true);
    let (status, answer) = server.login("carol", "wrong").await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")),
        "a wrong password tells nothing of the account's state"
    );
    let carol = minted("@carol:localhost");
    check_routes(&server, State::Locked, "@carol:localhost", &carol).await;
    for path in ["/_matrix/client/v3/logout", "/_matrix/client/r0/logout/all"] {
        let carol = minted("@carol:localhost");
        let (status, answer) = logout(&server, path, &carol).await;
        assert_eq!(status, StatusCode::OK, "locked {path}: {answer}");
        let (_, answer) = whoami(&server, &carol).await;
        assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "logged out by {path}");
    }

    // Deactivated: unknown everywhere, logout and get_token included; no login, by password or
    // by a login token minted before the deactivation (as get_token mints it: `Sessions`
    // with the server's secret, e.g. in another process of the deployment that still saw the
    // account active).
    let (status, answer) = server.login("dave", "dave pw").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "deactivated login: {answer}");
    assert_eq!(answer["errcode"], "M_USER_DEACTIVATED");
    let dave = minted("@dave:localhost");
    check_routes(&server, State::Deactivated, "@dave:localhost", &dave).await;
    for path in ["/_matrix/client/v3/logout", "/_matrix/client/v3/logout/all"] {
        let (status, answer) = logout(&server, path, &dave).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "deactivated {path}");
        assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "deactivated {path}");
    }
    let elsewhere = Sessions::new(
        Issuer::new(keys()).location(SERVER),
        Verifier::new(keys()),
        MemoryStore::new(),
    );
    let (login_token, _) = elsewhere.login_token("@dave:localhost");
    let (status, answer) = server.login_with_token(&login_token).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "deactivated m.login.token: {answer}"
    );
    assert_eq!(answer["errcode"], "M_USER_DEACTIVATED");
    // The same kind of token for an active user does log in: the refusal is the account's.
    let (login_token, _) = elsewhere.login_token("@alice:localhost");
    let (status, answer) = server.login_with_token(&login_token).await;
    assert_eq!(status, StatusCode::OK, "active m.login.token: {answer}");

    // Guests: whoami, sync and their own display name; everything else, /devices included,
    // is 403 M_GUEST_ACCESS_FORBIDDEN.
    let guest = keys()
        .mint("@guest1:localhost", TokenType::Access)
        .unwrap()
        .nonce("guest nonce")
        .guest()
        .to_token();
    check_routes(&server, State::Guest, "@guest1:localhost", &guest).await;
    let (status, answer) = server
        .call(
            &Method::GET,
            "/_matrix/client/v3/devices",
            Some(&guest),
            None,
        )
        .await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_GUEST_ACCESS_FORBIDDEN"))
    );
    let (status, answer) = server
        .call(
            &Method::PUT,
            "/_matrix/client/v3/profile/@alice:localhost/displayname",
            Some(&guest),
            Some(r#"{"displayname": "not mine"}"#),
        )
        .await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")),
        "a guest sets its own display name only"
    );

    // The handlers' own answers, for an active user.
    let send = "/_matrix/client/v3/rooms/!room:localhost/send/m.room.message";
    let (_, first) = server
        .call(
            &Method::PUT,
            &format!("{send}/t1"),
            Some(&alice),
            Some("{}"),
        )
        .await;
    let (_, again) = server
        .call(
            &Method::PUT,
            &format!("{send}/t1"),
            Some(&alice),
            Some("{}"),
        )
        .await;
    let (_, other) = server
        .call(
            &Method::PUT,
            &format!("{send}/t2"),
            Some(&alice),
            Some("{}"),
        )
        .await;
    assert_eq!(
        first["event_id"], again["event_id"],
        "a retried transaction"
    );
    assert_ne!(first["event_id"], other["event_id"]);
    for (method, path, body, status, errcode) in [
        (
            Method::PUT,
            format!("{send}/t3"),
            "not json",
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
        ),
        (
            Method::POST,
            "/_matrix/client/v3/createRoom".to_owned(),
            "[]",
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
        ),
        (
            Method::POST,
            format!("/_matrix/client/v3/rooms/{ROOM}/upgrade"),
            "{}",
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
        ),
        (
            Method::POST,
            "/_matrix/client/v3/join/room".to_owned(),
            "{}",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "/_matrix/client/v3/profile/@sue:localhost/displayname".to_owned(),
            r#"{"displayname": "Sue?"}"#,
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
    ] {
        let (got, answer) = server.call(&method, &path, Some(&alice), Some(body)).await;
        assert_eq!(
            (got, answer["errcode"].as_str()),
            (status, Some(errcode)),
            "{method} {path}"
        );
    }
    // A join needs no body.
    let (status, answer) = server
        .call(
            &Method::POST,
            &format!("/_matrix/client/r0/rooms/{ROOM}/join"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!((status, &answer["room_id"]), (StatusCode::OK, &json!(ROOM)));

    // `/capabilities` for a user who is no administrator, and the login flows.
    let (_, answer) = server
        .call(
            &Method::GET,
            "/_matrix/client/v3/capabilities",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(
        answer,
        json!({ "capabilities": {
            "m.change_password": { "enabled": false },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": true },
        }})
    );
    for version in ["v3", "r0"] {
        let (status, answer) = server
            .call(
                &Method::GET,
                &format!("/_matrix/client/{version}/login"),
                None,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            answer,
            json!({ "flows": [
                { "type": "m.login.password" },
                { "type": "m.login.token", "get_login_token": true },
            ]}),
            "{version}"
        );
    }

    // Active users log out last (the token dies with it).
    let (status, _) = logout(&server, "/_matrix/client/v3/logout", &alice).await;
    assert_eq!(status, StatusCode::OK);
}

/// `PUT /admin/lock|suspend/{userId}`: applies from the target's next request, and the spec's
/// errors in its order.
#[tokio::test]
async fn admin_api_locks_and_suspends_at_run_time() {
    let server = Homeserver::start(&[
        (
            "MATRIX_USERS",
            "admin:admin pw,root:root pw,bob:bob pw,eve:eve pw",
        ),
        ("MATRIX_ADMIN_USERS", "admin,@root:localhost"),
        ("MATRIX_DEACTIVATED_USERS", "zoe"),
    ]);
    let admin = server.access_token("admin", "admin pw").await;
    let bob = server.access_token("bob", "bob pw").await;
    let eve = server.access_token("eve", "eve pw").await;
    let lock = |user: &str| format!("/_matrix/client/v1/admin/lock/{user}");
    let suspend = |user: &str| format!("/_matrix/client/v1/admin/suspend/{user}");
    let put = |path: String, token: String, body: &'static str| {
        let server = &server;
        async move {
            server
                .call(&Method::PUT, &path, Some(&token), Some(body))
                .await
        }
    };
    let get = |path: String, token: String| {
        let server = &server;
        async move { server.call(&Method::GET, &path, Some(&token), None).await }
    };
    let send = format!("/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t");
    let bob_sends = || {
        let (server, bob, send) = (&server, bob.clone(), send.clone());
        async move {
            server
                .call(&Method::PUT, &send, Some(&bob), Some("{}"))
                .await
        }
    };

    // Administrators see the capability; others do not.
    let capabilities = "/_matrix/client/v3/capabilities".to_owned();
    let (_, answer) = get(capabilities.clone(), admin.clone()).await;
    assert_eq!(
        answer["capabilities"]["m.account_moderation"],
        json!({ "lock": true, "suspend": true })
    );
    let (_, answer) = get(capabilities, bob.clone()).await;
    assert!(answer["capabilities"].get("m.account_moderation").is_none());

    assert_eq!(
        get(lock("@bob:localhost"), admin.clone()).await,
        (StatusCode::OK, json!({ "locked": false }))
    );
    assert_eq!(
        get(suspend("%40bob%3Alocalhost"), admin.clone()).await,
        (StatusCode::OK, json!({ "suspended": false }))
    );

    // A login token bob gets now, to redeem while he is locked.
    let (status, issued) = server
        .call(
            &Method::POST,
            "/_matrix/client/v1/login/get_token",
            Some(&bob),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{issued}");

    // Lock, percent-encoded: bob's next request is refused, login too.
    assert_eq!(
        put(
            lock("%40bob%3Alocalhost"),
            admin.clone(),
            r#"{"locked": true}"#
        )
        .await,
        (StatusCode::OK, json!({ "locked": true }))
    );
    let (status, answer) = whoami(&server, &bob).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["errcode"], "M_USER_LOCKED");
    assert_eq!(answer["soft_logout"], true);
    let (status, answer) = server.login("bob", "bob pw").await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_USER_LOCKED"))
    );
    let (status, answer) = server
        .login_with_token(issued["login_token"].as_str().unwrap())
        .await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_USER_LOCKED")),
        "a login token from get_token, redeemed while locked"
    );
    assert_eq!(
        get(lock("@bob:localhost"), admin.clone()).await,
        (StatusCode::OK, json!({ "locked": true }))
    );

    // Unlock, raw: bob is back on his next request.
    assert_eq!(
        put(
            lock("@bob:localhost"),
            admin.clone(),
            r#"{"locked": false}"#
        )
        .await,
        (StatusCode::OK, json!({ "locked": false }))
    );
    let (status, answer) = whoami(&server, &bob).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Suspend: writes refused, reads not; a lock on top, then lifted, leaves the suspension.
    assert_eq!(
        put(
            suspend("@bob:localhost"),
            admin.clone(),
            r#"{"suspended": true}"#
        )
        .await,
        (StatusCode::OK, json!({ "suspended": true }))
    );
    let (status, answer) = bob_sends().await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_USER_SUSPENDED"))
    );
    let (status, _) = server
        .call(&Method::GET, "/_matrix/client/v3/sync", Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    put(lock("@bob:localhost"), admin.clone(), r#"{"locked": true}"#).await;
    let (_, answer) = bob_sends().await;
    assert_eq!(answer["errcode"], "M_USER_LOCKED");
    put(
        lock("@bob:localhost"),
        admin.clone(),
        r#"{"locked": false}"#,
    )
    .await;
    let (_, answer) = bob_sends().await;
    assert_eq!(answer["errcode"], "M_USER_SUSPENDED", "still suspended");
    put(
        suspend("@bob:localhost"),
        admin.clone(),
        r#"{"suspended": false}"#,
    )
    .await;
    let (status, answer) = bob_sends().await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Who may, and the spec's errors in its order.
    let forbidden = (StatusCode::FORBIDDEN, Some("M_FORBIDDEN"));
    let errcode = |(status, answer): (StatusCode, Value)| {
        (status, answer["errcode"].as_str().map(str::to_owned))
    };
    let expect =
        |(status, errcode): (StatusCode, Option<&str>)| (status, errcode.map(str::to_owned));
    // Not an administrator: 403 before any lookup, for known and unknown users alike.
    for (path, body) in [
        (lock("@bob:localhost"), Some(r#"{"locked": true}"#)),
        (suspend("@bob:localhost"), None),
        (lock("@nobody:localhost"), None),
        (lock("@bob:elsewhere.example"), Some("not json")),
    ] {
        let answer = match body {
            Some(body) => put(path.clone(), eve.clone(), body).await,
            None => get(path.clone(), eve.clone()).await,
        };
        assert_eq!(errcode(answer), expect(forbidden), "eve: {path}");
    }
    for (path, body, expected) in [
        (
            lock("@bob:elsewhere.example"),
            Some(r#"{"locked": true}"#),
            (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")),
        ),
        (
            lock("bob"),
            None,
            (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")),
        ),
        (
            lock("@bob:localhost"),
            Some("not json"),
            (StatusCode::BAD_REQUEST, Some("M_NOT_JSON")),
        ),
        (
            lock("@bob:localhost"),
            Some(r#"{"locked": "yes"}"#),
            (StatusCode::BAD_REQUEST, Some("M_BAD_JSON")),
        ),
        (
            suspend("@bob:localhost"),
            Some(r#"{"locked": true}"#),
            (StatusCode::BAD_REQUEST, Some("M_BAD_JSON")),
        ),
        (
            lock("@admin:localhost"),
            Some(r#"{"locked": true}"#),
            forbidden,
        ),
        (
            suspend("@root:localhost"),
            Some(r#"{"suspended": true}"#),
            forbidden,
        ),
        (lock("@root:localhost"), None, forbidden),
        (
            lock("@nobody:localhost"),
            Some(r#"{"locked": true}"#),
            (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")),
        ),
        (
            suspend("@zoe:localhost"),
            None,
            (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")),
        ),
    ] {
        let answer = match body {
            Some(body) => put(path.clone(), admin.clone(), body).await,
            None => get(path.clone(), admin.clone()).await,
        };
        assert_eq!(errcode(answer), expect(expected), "admin: {path} {body:?}");
    }
    // An administrator may read its own state.
    assert_eq!(
        get(lock("@admin:localhost"), admin.clone()).await,
        (StatusCode::OK, json!({ "locked": false }))
    );
    // And the admin API is behind the layer.
    let (status, answer) = server
        .call(&Method::GET, &lock("@bob:localhost"), None, None)
        .await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN"))
    );
}

/// `MATRIX_CLOCK_LEEWAY_MS`, `MATRIX_SWEEP_INTERVAL_MS`, `MATRIX_LOGIN_TOKEN_LIFETIME_MS` and a
/// short `MATRIX_MACAROON_SECRET`.
#[tokio::test]
async fn leeway_sweep_and_login_token_lifetime() {
    const SHORT: &str = "a short secret";
    let server = Homeserver::start(&[
        ("MATRIX_MACAROON_SECRET", SHORT),
        ("MATRIX_USERS", "alice:alice pw"),
        ("MATRIX_CLOCK_LEEWAY_MS", "60000"),
        ("MATRIX_SWEEP_INTERVAL_MS", "50"),
        ("MATRIX_LOGIN_TOKEN_LIFETIME_MS", "5000"),
        ("RUST_LOG", "warn,homeserver=debug"),
    ]);
    let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SHORT));
    let expired_ago = |ms: u64, nonce: &str| {
        keys.mint("@alice:localhost", TokenType::Access)
            .unwrap()
            .nonce(nonce)
            .expires_at_ms(now_ms() - ms)
            .to_token()
    };

    // Within the leeway a token still verifies; past it, it is expired (a soft logout).
    let recent = expired_ago(1_000, "recent");
    assert_eq!(whoami(&server, &recent).await.0, StatusCode::OK);
    let (status, answer) = whoami(&server, &expired_ago(120_000, "old")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN");
    assert_eq!(answer["soft_logout"], true);

    // Logged out, the token stays dead while the sweep runs every 50 ms: the store keeps the
    // record until the token's `time <` plus the same leeway the layer grants. (With a
    // Sessions engine on another leeway than the layer's, the sweep would forget the record
    // while the layer still accepts the token.)
    let (status, _) = logout(&server, "/_matrix/client/v3/logout", &recent).await;
    assert_eq!(status, StatusCode::OK);
    let swept = |log: &str| log.matches("swept expired revocation state").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = swept(&server.log());
    while swept(&server.log()) < before + 3 {
        assert!(
            Instant::now() < deadline,
            "no sweep on the timer:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer) = whoami(&server, &recent).await;
    assert_eq!(
        (status, answer["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN")),
        "logged out, swept, and still dead"
    );

    // Login tokens live MATRIX_LOGIN_TOKEN_LIFETIME_MS.
    let alice = server.access_token("alice", "alice pw").await;
    let (status, answer) = server
        .call(
            &Method::POST,
            "/_matrix/client/v1/login/get_token",
            Some(&alice),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["expires_in_ms"], 5000);

    // The short secret was warned about.
    assert!(
        server
            .log()
            .contains("MATRIX_MACAROON_SECRET is shorter than 32 bytes"),
        "{}",
        server.log()
    );
}

/// Configurations the server refuses to start with: an empty secret, a zero sweep interval, a
/// malformed account list, a pool size that is not a number (before connecting).
#[test]
fn refused_at_start() {
    for (env, message) in [
        (
            &[("MATRIX_MACAROON_SECRET", "")][..],
            "MATRIX_MACAROON_SECRET is set but empty",
        ),
        (
            &[("MATRIX_SWEEP_INTERVAL_MS", "0")],
            "MATRIX_SWEEP_INTERVAL_MS must be at least 1",
        ),
        (
            &[("MATRIX_LOCKED_USERS", "bob,@not a user id")],
            "MATRIX_LOCKED_USERS: `@not a user id` is not a Matrix user id",
        ),
        (
            &[("MATRIX_REFRESH_REPLAY", "revoke")],
            "MATRIX_REFRESH_REPLAY must be `error` or `revoke_session`, not `revoke`",
        ),
        (
            &[("MATRIX_REFRESH_GRACE_MS", "15s")],
            "MATRIX_REFRESH_GRACE_MS must be a whole number, not `15s`",
        ),
        (
            &[
                (
                    "MATRIX_DATABASE_URL",
                    "postgresql://postgres@127.0.0.1:1/none",
                ),
                ("MATRIX_DATABASE_POOL", "eight"),
            ],
            "MATRIX_DATABASE_POOL must be a whole number, not `eight`",
        ),
    ] {
        let mut child = command(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example homeserver starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{env:?}: the server did not stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "{env:?}");
        assert!(stderr.contains(message), "{env:?}: {stderr}");
        assert!(!stdout.contains("listening"), "{env:?}: {stdout}");
    }
}

/// `MATRIX_QUERY_TOKENS`: `on` (the default) reads a user's `?access_token=`; `off`, a spec v1.20
/// server, reads only an application service's; anything else is refused at start.
#[tokio::test]
async fn query_tokens_on_and_off() {
    const AS_TOKEN: &str = "as_token_for_the_query_test";
    let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET));
    let token = keys
        .mint("@alice:localhost", TokenType::Access)
        .unwrap()
        .nonce("query")
        .to_token();
    for (setting, user_ok) in [(None, true), (Some("on"), true), (Some("off"), false)] {
        let mut env = vec![("MATRIX_APPSERVICE_TOKEN", AS_TOKEN)];
        if let Some(setting) = setting {
            env.push(("MATRIX_QUERY_TOKENS", setting));
        }
        let server = Homeserver::start(&env);
        let (status, answer) = server
            .call(
                &Method::GET,
                &format!("/_matrix/client/v3/account/whoami?access_token={token}"),
                None,
                None,
            )
            .await;
        if user_ok {
            assert_eq!(status, StatusCode::OK, "{setting:?}: {answer}");
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{setting:?}: {answer}");
            assert_eq!(answer["errcode"], "M_MISSING_TOKEN");
        }
        let (status, answer) = server
            .call(
                &Method::GET,
                &format!("/_matrix/client/v3/account/whoami?access_token={AS_TOKEN}"),
                None,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{setting:?}: {answer}");
    }
    let refused = command(&[("MATRIX_QUERY_TOKENS", "maybe")])
        .output()
        .expect("the example runs");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("MATRIX_QUERY_TOKENS"));
}

/// `MATRIX_AUTH_FAILURE_LIMIT`: past the budget of failed token checks, 429 with `Retry-After`
/// for that address, while a token the server already verified still works.
#[tokio::test]
async fn the_failure_limit_of_the_example() {
    let server = Homeserver::start(&[
        ("MATRIX_USERS", "alice:alice pw"),
        ("MATRIX_AUTH_FAILURE_LIMIT", "2"),
    ]);
    let (status, login) = server.login("alice", "alice pw").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let good = login["access_token"].as_str().unwrap().to_owned();
    assert_eq!(whoami(&server, &good).await.0, StatusCode::OK);
    let forged = KeyRing::new()
        .with_key("key", MacaroonSecret::from_passphrase("not the server's"))
        .mint("@alice:localhost", TokenType::Access)
        .unwrap()
        .to_token();
    for _ in 0..3 {
        assert_eq!(whoami(&server, &forged).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, answer) = whoami(&server, &forged).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert_eq!(answer["errcode"], "M_LIMIT_EXCEEDED");
    assert!(answer["retry_after_ms"].as_u64().is_some());
    assert_eq!(whoami(&server, &good).await.0, StatusCode::OK);
}

/// `MATRIX_METRICS=1`: `GET /metrics` (unauthenticated) counts what was sent, by outcome and
/// credential, and the cache's hits and misses; no token or user id appears in it.
#[tokio::test]
async fn metrics_count_what_was_sent() {
    let server = Homeserver::start(&[("MATRIX_USERS", "alice:alice pw"), ("MATRIX_METRICS", "1")]);
    let (_, login) = server.login("alice", "alice pw").await;
    let good = login["access_token"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(whoami(&server, &good).await.0, StatusCode::OK);
    }
    let forged = KeyRing::new()
        .with_key("key", MacaroonSecret::from_passphrase("not the server's"))
        .mint("@alice:localhost", TokenType::Access)
        .unwrap()
        .to_token();
    for _ in 0..2 {
        assert_eq!(whoami(&server, &forged).await.0, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = server
        .call(
            &Method::GET,
            "/_matrix/client/v3/account/whoami",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let text = server.metrics().await;
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    };
    assert_eq!(
        value(r#"matrix_auth_decisions_total{outcome="ok",credential="macaroon"}"#),
        3.0
    );
    assert_eq!(
        value(r#"matrix_auth_decisions_total{outcome="unknown_token"}"#),
        2.0
    );
    assert_eq!(
        value(r#"matrix_auth_decisions_total{outcome="missing_token"}"#),
        1.0
    );
    assert_eq!(value(r#"matrix_auth_token_cache_total{result="hit"}"#), 2.0);
    assert_eq!(
        value(r#"matrix_auth_token_cache_total{result="miss"}"#),
        3.0
    );
    assert!(!text.contains(&good) && !text.contains("alice"), "{text}");
}

/// OAuth 2.0 delegation (`MATRIX_OAUTH2_*`): the example authenticates a token server's tokens
/// (asking a scripted introspection endpoint with MAS's shared secret), its own macaroons and an
/// application service side by side, answers `/auth_metadata` from the issuer, and refuses
/// contradictory client credentials at start.
#[tokio::test]
async fn oauth2_delegation_beside_macaroons_and_appservices() {
    use crate::common::introspection::{mas_active, IntrospectionServer, Mode};
    let endpoint = IntrospectionServer::start().await;
    let now_s = now_ms() / 1000;
    endpoint.answer_for(
        "mat_alice",
        mas_active("alice", Some("PHONE"), now_s + 600, now_s),
    );
    let url = endpoint.url();
    let issuer = format!("http://{}/", endpoint.addr);
    let server = Homeserver::start(&[
        ("MATRIX_OAUTH2_INTROSPECTION_URL", &url),
        ("MATRIX_OAUTH2_SHARED_SECRET", "mas-secret"),
        ("MATRIX_OAUTH2_ISSUER", &issuer),
        ("MATRIX_APPSERVICE_TOKEN", "as_token_for_tests"),
        ("MATRIX_APPSERVICE_NAMESPACE", "@bridge_.*:localhost"),
    ]);
    let whoami = "/_matrix/client/v3/account/whoami";
    let (status, me) = server
        .call(&Method::GET, whoami, Some("mat_alice"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user_id"], "@alice:localhost");
    assert_eq!(me["device_id"], "PHONE");
    let seen = endpoint.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer mas-secret"));
    assert_eq!(seen[0].device_id_header.as_deref(), Some("1"));
    // Cached (default TTL): no second introspection.
    server
        .call(&Method::GET, whoami, Some("mat_alice"), None)
        .await;
    assert_eq!(endpoint.count(), 1);
    // Unknown to the token server: 401 without a soft logout.
    let (status, error) = server
        .call(&Method::GET, whoami, Some("mat_nobody"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["errcode"], "M_UNKNOWN_TOKEN");
    assert_ne!(error.get("soft_logout"), Some(&json!(true)));
    // The example's own macaroons and the application service: never sent to the endpoint.
    let (status, me) = server
        .call(
            &Method::GET,
            whoami,
            Some(&minted("@carol:localhost")),
            None,
        )
        .await;
    assert_eq!(
        (status, me["user_id"].as_str()),
        (StatusCode::OK, Some("@carol:localhost"))
    );
    let (status, me) = server
        .call(&Method::GET, whoami, Some("as_token_for_tests"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(endpoint.count(), 2);
    // The token server down: 503, then back.
    endpoint.set_mode(Mode::Status500);
    let (status, error) = server
        .call(&Method::GET, whoami, Some("mat_new"), None)
        .await;
    assert_eq!(
        (status, error["errcode"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("M_UNKNOWN"))
    );
    endpoint.set_mode(Mode::Normal);
    endpoint.answer_for("mat_new", mas_active("dave", None, now_s + 600, now_s));
    let (status, me) = server
        .call(&Method::GET, whoami, Some("mat_new"), None)
        .await;
    assert_eq!(
        (status, me["user_id"].as_str()),
        (StatusCode::OK, Some("@dave:localhost"))
    );
    // A logout the token server has not seen ends nothing: the example says so (403) instead of
    // answering 200 for a token that keeps working.
    let (status, refusal) = server
        .call(
            &Method::POST,
            "/_matrix/client/v3/logout",
            Some("mat_new"),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refusal}");
    assert_eq!(refusal["errcode"], "M_FORBIDDEN");
    let (status, _) = server
        .call(
            &Method::POST,
            "/_matrix/client/v3/logout/all",
            Some("mat_new"),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        server
            .call(&Method::GET, whoami, Some("mat_new"), None)
            .await
            .0,
        StatusCode::OK,
        "still valid at the token server"
    );
    // Logout forgets the cached answer: the token revoked at the server is refused at once.
    endpoint.answer_for("mat_alice", json!({"active": false}));
    let (status, _) = server
        .call(
            &Method::POST,
            "/_matrix/client/v3/logout",
            Some("mat_alice"),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .call(&Method::GET, whoami, Some("mat_alice"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Discovery, unauthenticated.
    let (status, metadata) = server
        .call(&Method::GET, "/_matrix/client/v1/auth_metadata", None, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{metadata}");
    assert_eq!(metadata["issuer"], issuer);
    assert!(metadata["authorization_endpoint"].is_string());
    assert!(!server.log().contains("mat_alice"), "{}", server.log());

    // client_secret_basic, a TTL of 0 (every request asks), and no issuer: 404 there.
    let basic = Homeserver::start(&[
        ("MATRIX_OAUTH2_INTROSPECTION_URL", &url),
        ("MATRIX_OAUTH2_CLIENT_ID", "homeserver"),
        ("MATRIX_OAUTH2_CLIENT_SECRET", "client-secret"),
        ("MATRIX_OAUTH2_CACHE_TTL_MS", "0"),
    ]);
    let before = endpoint.count();
    for _ in 0..2 {
        let (status, _) = basic
            .call(&Method::GET, whoami, Some("mat_new"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(endpoint.count(), before + 2);
    let last = endpoint.seen().pop().unwrap();
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode("homeserver:client-secret");
    assert_eq!(last.authorization, Some(format!("Basic {expected}")));
    let (status, error) = basic
        .call(&Method::GET, "/_matrix/client/v1/auth_metadata", None, None)
        .await;
    assert_eq!(
        (status, error["errcode"].as_str()),
        (StatusCode::NOT_FOUND, Some("M_UNRECOGNIZED"))
    );
}

/// Contradictory or incomplete `MATRIX_OAUTH2_*` settings stop the server at start.
#[test]
fn oauth2_settings_refused_at_start() {
    let url = (
        "MATRIX_OAUTH2_INTROSPECTION_URL",
        "http://127.0.0.1:9/oauth2/introspect",
    );
    for (env, message) in [
        (
            vec![
                url,
                ("MATRIX_OAUTH2_SHARED_SECRET", "s"),
                ("MATRIX_OAUTH2_CLIENT_ID", "c"),
            ],
            "not both",
        ),
        (vec![url, ("MATRIX_OAUTH2_CLIENT_ID", "c")], "go together"),
        (
            vec![(
                "MATRIX_OAUTH2_INTROSPECTION_URL",
                "ftp://mas.example.org/oauth2/introspect",
            )],
            "not an http:// or https:// URL",
        ),
        (
            vec![url, ("MATRIX_OAUTH2_CACHE_TTL_MS", "soon")],
            "MATRIX_OAUTH2_CACHE_TTL_MS",
        ),
    ] {
        // A server that starts after all is killed at the deadline, never waited on for good.
        let mut child = command(&env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example homeserver runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{env:?}: the server started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!status.success(), "{env:?}");
        assert!(stderr.contains(message), "{env:?}: {stderr}");
    }
}

/// `MATRIX_METRICS=1` on PostgreSQL: the store's health gauge, reported as it connected (so the
/// recorder must be in place before), is 1 while it answers.
#[tokio::test]
async fn metrics_on_postgresql() {
    if crate::common::pg::skip() {
        return;
    }
    let url = crate::common::pg::fresh_database_url("metrics").await;
    let server = Homeserver::start(&[
        ("MATRIX_USERS", "alice:alice pw"),
        ("MATRIX_METRICS", "1"),
        ("MATRIX_DATABASE_URL", &url),
    ]);
    let (status, login) = server.login("alice", "alice pw").await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let good = login["access_token"].as_str().unwrap().to_owned();
    assert_eq!(whoami(&server, &good).await.0, StatusCode::OK);
    let text = server.metrics().await;
    assert!(
        text.lines()
            .any(|line| line == "matrix_auth_store_healthy 1"),
        "{text}"
    );
    assert!(
        text.contains("matrix_auth_decisions_total{outcome=\"ok\",credential=\"macaroon\"} 1"),
        "{text}"
    );
}

/// `POST /v3/refresh`: the status and the answer.
async fn refresh(server: &Homeserver, refresh_token: &str) -> (StatusCode, Value) {
    let body = json!({ "refresh_token": refresh_token }).to_string();
    server
        .call(
            &Method::POST,
            "/_matrix/client/v3/refresh",
            None,
            Some(&body),
        )
        .await
}

/// A refreshable login of alice: its access and refresh tokens.
async fn refreshable_login(server: &Homeserver) -> (String, String) {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "alice" },
        "password": "alice pw",
        "refresh_token": true,
    });
    let (status, answer) = server
        .call(
            &Method::POST,
            "/_matrix/client/v3/login",
            None,
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let token = |name: &str| answer[name].as_str().unwrap().to_owned();
    (token("access_token"), token("refresh_token"))
}

fn assert_unknown_token(status: StatusCode, answer: &Value, what: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
    assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "{what}");
    assert_ne!(
        answer["soft_logout"], true,
        "{what}: the client must log in again"
    );
}

/// Refreshes `r0` on `first` and uses the successor there; then replays `r0` on `second`.
async fn replay(first: &Homeserver, second: &Homeserver) -> (String, (StatusCode, Value)) {
    let (_, r0) = refreshable_login(first).await;
    let (status, answer) = refresh(first, &r0).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let a1 = answer["access_token"].as_str().unwrap().to_owned();
    assert_eq!(whoami(first, &a1).await.0, StatusCode::OK);
    (a1, refresh(second, &r0).await)
}

/// `MATRIX_REFRESH_GRACE_MS`, `MATRIX_REFRESH_REPLAY` and `MATRIX_SESSION_LIFETIME_MS` over real
/// HTTP, in memory and (when configured) on PostgreSQL with the replay sent to a second process.
#[tokio::test]
async fn the_refresh_policy_of_the_example() {
    let mut databases = vec![None];
    if !crate::common::pg::skip() {
        databases.push(Some(
            crate::common::pg::fresh_database_url("refresh_policy").await,
        ));
    }
    for database in databases {
        let env = |extra: &[(&'static str, &'static str)]| {
            let mut env: Vec<(&str, String)> = vec![("MATRIX_USERS", "alice:alice pw".into())];
            if let Some(url) = &database {
                env.push(("MATRIX_DATABASE_URL", url.clone()));
            }
            env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
            env
        };
        let start = |extra: &[(&'static str, &'static str)]| {
            let env = env(extra);
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Homeserver::start(&env)
        };
        let store = if database.is_some() {
            "postgres"
        } else {
            "memory"
        };
        // Two processes on PostgreSQL (one server twice in memory, which shares nothing).
        let pair = |extra: &[(&'static str, &'static str)]| {
            let first = start(extra);
            let second = database.is_some().then(|| start(extra));
            (first, second)
        };

        // A grace window: the replay gets a pair that works, on both processes.
        let (first, second) = pair(&[("MATRIX_REFRESH_GRACE_MS", "60000")]);
        let second = second.as_ref().unwrap_or(&first);
        let (a1, (status, answer)) = replay(&first, second).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{store}: a replay in grace: {answer}"
        );
        let again = answer["access_token"].as_str().unwrap();
        for server in [&first, second] {
            assert_eq!(whoami(server, again).await.0, StatusCode::OK, "{store}");
            assert_eq!(whoami(server, &a1).await.0, StatusCode::OK, "{store}");
        }

        // The default: refused, the session goes on.
        let (first, second) = pair(&[]);
        let second = second.as_ref().unwrap_or(&first);
        let (a1, (status, answer)) = replay(&first, second).await;
        assert_unknown_token(status, &answer, store);
        assert_eq!(whoami(&first, &a1).await.0, StatusCode::OK, "{store}");

        // revoke_session: refused, and the whole session logged out, on both processes.
        let (first, second) = pair(&[
            ("MATRIX_REFRESH_REPLAY", "revoke_session"),
            ("MATRIX_METRICS", "1"),
        ]);
        let second = second.as_ref().unwrap_or(&first);
        let (a1, (status, answer)) = replay(&first, second).await;
        assert_unknown_token(status, &answer, store);
        assert_eq!(
            whoami(second, &a1).await.0,
            StatusCode::UNAUTHORIZED,
            "{store}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while whoami(&first, &a1).await.0 != StatusCode::UNAUTHORIZED {
            assert!(
                Instant::now() < deadline,
                "{store}: the first process still accepts it"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let counted = "matrix_auth_refresh_replays_total{action=\"session_revoked\"} 1";
        let text = second.metrics().await;
        assert!(text.lines().any(|line| line == counted), "{store}: {text}");

        // The session ceiling: past it, a refresh is refused for good, not a soft logout. With
        // a clock leeway the refresh token itself still verifies then: the ceiling refuses.
        let server = start(&[
            ("MATRIX_SESSION_LIFETIME_MS", "1500"),
            ("MATRIX_CLOCK_LEEWAY_MS", "5000"),
        ]);
        let (_, r0) = refreshable_login(&server).await;
        let (status, answer) = refresh(&server, &r0).await;
        assert_eq!(status, StatusCode::OK, "{store}: {answer}");
        let r1 = answer["refresh_token"].as_str().unwrap().to_owned();
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let (status, answer) = refresh(&server, &r1).await;
        assert_unknown_token(status, &answer, store);
    }
}
