//! The server `benches/load.sh` puts under load: hyper 1 on one tokio thread (`current_thread`),
//! answering `200 ok`, either bare or behind `MatrixAuthLayer`, on a loopback port.
//!
//! `benches/instructions.sh hyper` counts its instructions. Both build it in release:
//!
//! ```text
//! cargo build --release -p tower-matrix-auth-tools --bin load_server
//! load_server --mode bare|layered|cached [--addr 127.0.0.1:0] [--max-seconds 120]
//! ```
//!
//! Prints `token <T>` (a Synapse-style access token the layered modes accept) and then
//! `listening on http://ADDR` on standard output. It stops on SIGTERM, Ctrl-C or after
//! `--max-seconds`, whichever comes first, so a forgotten server never outlives the run. It binds
//! loopback addresses only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::Layer;
use tower_matrix_auth::{
    KeyRing, MacaroonSecret, MatrixAuthLayer, MatrixUser, TokenType, Verifier,
};

const SECRET: &str = "load test macaroon secret";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bare,
    Layered,
    Cached,
}

/// The bare handler: what a trivial endpoint costs.
async fn ok(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// The same behind the layer; answers 500 if the layer let a request through without a user,
/// which `wrk` would count as an error.
async fn ok_if_authenticated(
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.extensions().get::<MatrixUser>().is_some() {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok"))));
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"no user")));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    Ok(response)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut mode = None;
    let mut addr: SocketAddr = "127.0.0.1:0".parse()?;
    let mut max_seconds = 120;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mode" => {
                mode = match args.next().as_deref() {
                    Some("bare") => Some(Mode::Bare),
                    Some("layered") => Some(Mode::Layered),
                    Some("cached") => Some(Mode::Cached),
                    other => return Err(format!("unknown mode {other:?}").into()),
                }
            }
            "--addr" => addr = args.next().ok_or("--addr needs a value")?.parse()?,
            "--max-seconds" => {
                max_seconds = args.next().ok_or("--max-seconds needs a value")?.parse()?
            }
            other => return Err(format!("unexpected argument {other}").into()),
        }
    }
    let Some(mode) = mode else {
        return Err("no --mode given (bare, layered or cached); benches/load.sh runs each".into());
    };
    if !addr.ip().is_loopback() {
        return Err(
            format!("{addr} is not a loopback address; this server binds loopback only").into(),
        );
    }

    let keys = KeyRing::new().with_key("key", MacaroonSecret::from_passphrase(SECRET));
    let token = keys
        .mint("@alice:example.org", TokenType::Access)
        .expect("the ring has a key")
        .location("example.org")
        .nonce("abcdefgh12345678")
        .expires_at_ms(4_102_444_800_000)
        .to_token();
    println!("token {token}");

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            println!("listening on http://{}", listener.local_addr()?);
            let layer = match mode {
                Mode::Bare => None,
                Mode::Layered => Some(MatrixAuthLayer::with_verifier(
                    Verifier::new(keys).token_cache(0),
                )),
                Mode::Cached => Some(MatrixAuthLayer::new(keys)),
            };
            let stop = async {
                let term = async {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(mut term) => {
                            term.recv().await;
                        }
                        Err(_) => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term => {}
                    _ = tokio::time::sleep(Duration::from_secs(max_seconds)) => {}
                }
            };
            tokio::pin!(stop);
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => accepted?.0,
                    _ = &mut stop => break,
                };
                let _ = stream.set_nodelay(true);
                let io = TokioIo::new(stream);
                match &layer {
                    None => {
                        let service = TowerToHyperService::new(tower::service_fn(ok));
                        tokio::spawn(http1::Builder::new().serve_connection(io, service));
                    }
                    Some(layer) => {
                        let service = TowerToHyperService::new(
                            layer.layer(tower::service_fn(ok_if_authenticated)),
                        );
                        tokio::spawn(http1::Builder::new().serve_connection(io, service));
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })
}
