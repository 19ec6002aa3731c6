//! How introspection requests travel: hyper 1's client (plain HTTP), or any tower service the
//! homeserver hands in, erased behind one small trait.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tower_service::Service;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type TransportFuture =
    Pin<Box<dyn Future<Output = Result<(StatusCode, Bytes), BoxError>> + Send>>;

/// Answers longer than this are refused (an introspection answer is a few hundred bytes).
pub(crate) const MAX_ANSWER_LEN: usize = 64 * 1024;

/// Sends one introspection request and reads the whole (bounded) answer.
pub(crate) trait Transport: Send + Sync + 'static {
    fn send(&self, request: Request<Full<Bytes>>) -> TransportFuture;
}

/// A tower service as a transport: cloned for each request, driven ready, called.
pub(crate) struct ServiceTransport<S> {
    pub(crate) service: S,
}

impl<S, B> Transport for ServiceTransport<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn send(&self, request: Request<Full<Bytes>>) -> TransportFuture {
        let mut service = self.service.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let response = service.call(request).await.map_err(Into::into)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER_LEN)
                .collect()
                .await?
                .to_bytes();
            Ok((status, body))
        })
    }
}

/// hyper 1's pooled client over plain HTTP (hyper-util's legacy client), on tokio.
#[cfg(not(feature = "oauth2-rustls"))]
pub(crate) fn hyper_client() -> impl Transport {
    hyper_http()
}

/// hyper 1's pooled client over HTTPS (rustls, the system's root certificates) and plain
/// HTTP, on tokio. Without any usable root certificate, HTTPS endpoints fail (the
/// requests then get `503`), and the start says so in a warning.
#[cfg(feature = "oauth2-rustls")]
pub(crate) fn hyper_client() -> impl Transport {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    // The process-wide provider if the homeserver installed one (aws-lc-rs, with post-quantum
    // key exchange), else ring, which rustls deprecates for lacking it but still supports.
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| {
            #[allow(deprecated)]
            std::sync::Arc::new(rustls::crypto::ring::default_provider())
        });
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_provider_and_native_roots(provider.clone()) {
        Ok(builder) => builder,
        Err(error) => {
            tracing::warn!(%error, "no system root certificates: HTTPS introspection will fail");
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
        }
    };
    let connector = builder.https_or_http().enable_http1().build();
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build::<_, Full<Bytes>>(connector);
    ServiceTransport { service: client }
}

/// hyper 1's pooled client over plain HTTP (hyper-util's legacy client), on tokio.
#[cfg_attr(feature = "oauth2-rustls", allow(dead_code))]
pub(crate) fn hyper_http() -> impl Transport {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build_http::<Full<Bytes>>();
    ServiceTransport { service: client }
}
