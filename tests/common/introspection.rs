//! A scripted RFC 7662 introspection endpoint on loopback (hyper 1): answers per token, counts
//! and records requests, and can stall, close connections, answer 500 or non-JSON.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the endpoint does with every request, whatever the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers from the script (`{"active": false}` for a token it does not know).
    Normal,
    /// Never answers.
    Stall,
    /// Closes each connection without a word.
    Close,
    /// `500` with a JSON error.
    Status500,
    /// `200` with an HTML body.
    NotJson,
    /// `200` with `{}`: JSON without `active`.
    NoActive,
}

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub authorization: Option<String>,
    pub device_id_header: Option<String>,
    pub content_type: Option<String>,
    pub method: String,
    pub path: String,
    /// The form fields, decoded.
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct Script {
    answers: HashMap<String, serde_json::Value>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct IntrospectionServer {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    mode: Arc<Mutex<Mode>>,
    delay: Arc<Mutex<Duration>>,
    count: Arc<AtomicUsize>,
}

fn decode_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let v = v.replace('+', " ");
            let v = percent_encoding::percent_decode_str(&v)
                .decode_utf8_lossy()
                .into_owned();
            (k.to_owned(), v)
        })
        .collect()
}

impl IntrospectionServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            script: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Normal)),
            delay: Arc::default(),
            count: Arc::default(),
        };
        let this = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if this.mode() == Mode::Close {
                    this.count.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                    continue;
                }
                let handler = this.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}/oauth2/introspect", self.addr)
    }

    pub fn uri(&self) -> http::Uri {
        self.url().parse().unwrap()
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    /// Scripts the answer for `token`.
    pub fn answer_for(&self, token: &str, answer: serde_json::Value) {
        self.script
            .lock()
            .unwrap()
            .answers
            .insert(token.to_owned(), answer);
    }

    /// Requests received (connections, in `Mode::Close`).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        // Discovery (`MATRIX_OAUTH2_ISSUER`): not an introspection, not counted.
        if request.method() == http::Method::GET
            && request.uri().path() == "/.well-known/openid-configuration"
        {
            let issuer = format!("http://{}/", self.addr);
            let metadata = serde_json::json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}authorize"),
                "token_endpoint": format!("{issuer}oauth2/token"),
                "revocation_endpoint": format!("{issuer}oauth2/revoke"),
                "introspection_endpoint": format!("{issuer}oauth2/introspect"),
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
            });
            return Response::new(Full::new(Bytes::from(metadata.to_string())));
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("<not text>").to_owned())
        };
        let mut seen = Seen {
            authorization: header("authorization"),
            device_id_header: header("x-mas-supports-device-id"),
            content_type: header("content-type"),
            method: request.method().to_string(),
            path: request.uri().path().to_owned(),
            form: HashMap::new(),
        };
        let body = request.into_body().collect().await.unwrap().to_bytes();
        seen.form = decode_form(&body);
        let token = seen.form.get("token").cloned().unwrap_or_default();
        let answer = {
            let mut script = self.script.lock().unwrap();
            script.seen.push(seen);
            script.answers.get(&token).cloned()
        };
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (status, body) = match self.mode() {
            Mode::Stall => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Mode::Status500 => (
                StatusCode::INTERNAL_SERVER_ERROR,
                r#"{"error":"server_error"}"#.to_owned(),
            ),
            Mode::NotJson => (StatusCode::OK, "<html>maintenance</html>".to_owned()),
            Mode::NoActive => (StatusCode::OK, "{}".to_owned()),
            Mode::Normal | Mode::Close => (
                StatusCode::OK,
                answer
                    .unwrap_or_else(|| serde_json::json!({"active": false}))
                    .to_string(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        response
    }
}

/// An active answer shaped as MAS gives it for an OAuth 2.0 access token: both scope
/// spellings, `username`, `sub`, seconds for `exp`/`expires_in`/`iat`/`nbf`, `jti`.
pub fn mas_active(
    username: &str,
    device: Option<&str>,
    exp_s: u64,
    now_s: u64,
) -> serde_json::Value {
    let mut scope =
        String::from("urn:matrix:client:api:* urn:matrix:org.matrix.msc2967.client:api:*");
    if let Some(device) = device {
        scope.push_str(&format!(
            " urn:matrix:client:device:{device} urn:matrix:org.matrix.msc2967.client:device:{device}"
        ));
    }
    serde_json::json!({
        "active": true,
        "scope": scope,
        "client_id": "01J4B7YH3Z9C8G7T0Q1V2W3X4Y",
        "username": username,
        "token_type": "access_token",
        "exp": exp_s,
        "expires_in": exp_s.saturating_sub(now_s),
        "iat": now_s,
        "nbf": now_s,
        "sub": format!("01SUB{username}"),
        "jti": "01J4B7YH3Z9C8G7T0Q1V2W3X50",
    })
}
