//! The layer in front of a plain hyper 1 server: no axum, no router.
//!
//! ```text
//! MATRIX_MACAROON_SECRET='the secret' cargo run --example hyper_server
//! curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8009/_matrix/client/v3/account/whoami
//! ```
//!
//! Environment: `MATRIX_MACAROON_SECRET` (Synapse's `macaroon_secret_key`, identifier `key`;
//! random when unset, so no token will verify until you set it), `MATRIX_LISTEN` (default
//! `127.0.0.1:8009`), `RUST_LOG`. See the `homeserver` example for ways to mint a token.
//!
//! The handler reads the verified user with `request.extensions().get::<MatrixUser>()`: the
//! layer put it there, and a request without a valid token never reaches the handler.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::json;
use tower::ServiceBuilder;
use tower_matrix_auth::{KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_matrix_auth=debug")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let secret = match std::env::var("MATRIX_MACAROON_SECRET") {
        Ok(secret) if !secret.is_empty() => secret,
        _ => {
            tracing::warn!("MATRIX_MACAROON_SECRET is not set: using a random secret");
            rand::thread_rng()
                .sample_iter(&Alphanumeric)
                .take(32)
                .map(char::from)
                .collect()
        }
    };
    let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(secret));

    // A tower service: the layer around a `service_fn`. Cloning it is cheap.
    let service = ServiceBuilder::new()
        .layer(
            MatrixAuthLayer::new(keys)
                .allow_guests_when(tower_matrix_auth::routes::is_whoami_route),
        )
        .service(tower::service_fn(handle));

    let listen = std::env::var("MATRIX_LISTEN").unwrap_or_else(|_| "127.0.0.1:8009".to_owned());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let address = listener.local_addr()?;
    tracing::info!("listening on http://{address}");
    println!("listening on http://{address}");

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
        };
        // hyper wants its own `Service` trait: `TowerToHyperService` adapts the tower one.
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "connection error");
            }
        });
    }
    tracing::info!("shutting down");
    Ok(())
}

/// The only endpoint: whoami. The layer already refused every request without a valid token.
async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    if path != "/_matrix/client/v3/account/whoami" && path != "/_matrix/client/r0/account/whoami" {
        let body = json!({ "errcode": "M_UNRECOGNIZED", "error": "Unrecognized request" });
        return Ok(json_response(StatusCode::NOT_FOUND, &body));
    }
    let Some(user) = request.extensions().get::<MatrixUser>() else {
        // Only possible if the layer were configured to skip this path.
        let body = json!({ "errcode": "M_UNKNOWN", "error": "No authenticated user." });
        return Ok(json_response(StatusCode::INTERNAL_SERVER_ERROR, &body));
    };
    let mut body = json!({ "user_id": user.user_id(), "is_guest": user.is_guest() });
    if let Some(device_id) = user.device_id() {
        body["device_id"] = device_id.into();
    }
    Ok(json_response(StatusCode::OK, &body))
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
