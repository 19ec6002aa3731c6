//! Helpers shared by the integration tests: keys, minting arbitrary caveats with the `macaroon`
//! crate (an independent implementation), and a layered echo service.
#![allow(dead_code)]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser};

#[cfg(feature = "oauth2")]
pub mod introspection;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "axum")]
pub mod server;

pub const SECRET: &str = "integration test macaroon secret";
pub const NOW_MS: u64 = 1_700_000_000_000;
pub const ALICE: &str = "@alice:example.org";

pub fn keys() -> KeyRing {
    KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET))
}

/// Mints a V1 token with exactly these caveats, using the `macaroon` crate.
pub fn mint_raw(caveats: &[&str]) -> String {
    mint_with(SECRET, "key", caveats, macaroon::Format::V1)
}

pub fn mint_with(
    secret: &str,
    identifier: &str,
    caveats: &[&str],
    format: macaroon::Format,
) -> String {
    let key = macaroon::MacaroonKey::generate(secret.as_bytes());
    let mut m = macaroon::Macaroon::create(Some("example.org".into()), &key, identifier.into())
        .expect("non-empty identifier");
    for caveat in caveats {
        m.add_first_party_caveat((*caveat).into());
    }
    m.serialize(format).expect("serializable")
}

/// The Synapse shape: gen, user_id, type = access, nonce, plus `extra`.
pub fn access_token(extra: &[&str]) -> String {
    let mut caveats = vec![
        "gen = 1",
        "user_id = @alice:example.org",
        "type = access",
        "nonce = abcdefgh12345678",
    ];
    caveats.extend_from_slice(extra);
    mint_raw(&caveats)
}

/// What the inner service saw.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub json: serde_json::Value,
    pub headers: http::HeaderMap,
}

impl Outcome {
    pub fn errcode(&self) -> &str {
        self.json["errcode"].as_str().unwrap_or("")
    }
    pub fn user_id(&self) -> Option<&str> {
        self.json["user_id"].as_str()
    }
}

/// An inner service that answers 200 with what it received: the identity and the URI.
pub async fn echo(request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let user = request.extensions().get::<MatrixUser>();
    let body = serde_json::json!({
        "inner": true,
        "uri": request.uri().to_string(),
        "user_id": user.map(|u| u.user_id()),
        "device_id": user.and_then(|u| u.device_id()),
        "is_guest": user.map(|u| u.is_guest()),
        "expires_at_ms": user.and_then(|u| u.expires_at_ms()),
        "token_id": user.map(|u| u.token_id().to_string()),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

pub async fn call(layer: &MatrixAuthLayer, request: Request<Full<Bytes>>) -> Outcome {
    let mut service = layer.layer(service_fn(echo));
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Outcome {
        status,
        json,
        headers,
    }
}

pub fn bearer(uri: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap()
}

pub fn plain(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}
