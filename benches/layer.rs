//! The layer around an "ok" service, request by request (`poll_ready`, `call`, the response
//! future, dropping the response), against the bare service; and the revocation hook's cost.
//!
//! `cargo bench --bench layer`. The request is built inside each iteration, for the bare
//! service too, so the differences are the layer's.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tower_matrix_auth::{MatrixAuthLayer, MemoryStore, Verifier};

fn now<F: Future>(future: F) -> F::Output {
    match pin!(future)
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the benchmarked service waited"),
    }
}

async fn ok(_: Request<()>) -> Result<Response<&'static str>, Infallible> {
    Ok(Response::new("ok"))
}

fn one_request<S>(service: &mut S, bearer: &HeaderValue)
where
    S: Service<Request<()>, Error = Infallible>,
{
    let mut request = Request::new(());
    *request.uri_mut() = http::Uri::from_static("/_matrix/client/v3/account/whoami");
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer.clone());
    now(std::future::poll_fn(|cx| service.poll_ready(cx))).unwrap();
    black_box(now(service.call(request)).unwrap());
}

fn layer(c: &mut Criterion) {
    let keys = keys();
    let token = synapse_token(&keys);
    let bearer = HeaderValue::try_from(format!("Bearer {token}")).unwrap();
    let mut group = c.benchmark_group("layer");
    let mut bare = tower::service_fn(ok);
    group.bench_function("bare_service", |b| {
        b.iter(|| one_request(&mut bare, &bearer))
    });
    let mut layered = MatrixAuthLayer::with_verifier(Verifier::new(keys.clone()).token_cache(0))
        .layer(tower::service_fn(ok));
    group.bench_function("layered_full_verification", |b| {
        b.iter(|| one_request(&mut layered, &bearer))
    });
    let mut cached = MatrixAuthLayer::new(keys.clone()).layer(tower::service_fn(ok));
    group.bench_function("layered_cache_hit", |b| {
        b.iter(|| one_request(&mut cached, &bearer))
    });
    group.finish();

    // The revocation hook, on cache hits so that the store's share stands out. Where the real
    // in-memory store (`MemoryStore`) is measured next to the toy `HashSetStore`.
    let header = header_request(&token);
    let mut group = c.benchmark_group("revocation");
    let stores = [
        ("never_revoked", MatrixAuthLayer::new(keys.clone())),
        (
            "hash_set_1000_revoked",
            MatrixAuthLayer::new(keys.clone()).revocation(HashSetStore::with_revoked(1000)),
        ),
        (
            "memory_store",
            MatrixAuthLayer::new(keys.clone()).revocation(MemoryStore::new()),
        ),
    ];
    for (name, layer) in &stores {
        assert!(layer.__authenticate(&header).unwrap().unwrap().is_some());
        group.bench_function(*name, |b| {
            b.iter(|| layer.__authenticate(black_box(&header)))
        });
    }
    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
