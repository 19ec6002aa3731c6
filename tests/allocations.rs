//! Heap allocations per authenticated request through the layer, counted by a global allocator.
//! A regression check on the design, not on timing: the bounds are the counts achieved, so a
//! change that allocates more on the hot path fails here. `cargo test --test allocations --
//! --nocapture` prints the counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common::*;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_matrix_auth::{hooks::ManualClock, MatrixAuthLayer, MatrixUser, Verifier};

/// Counts the allocations of the current thread while a count is open, so that the test
/// harness's other threads do not disturb it.
struct Counting;

thread_local! {
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

fn note_allocation() {
    // `try_with`: allocations during thread teardown are simply not counted.
    let _ = COUNT.try_with(|count| {
        if let Some(n) = count.get() {
            count.set(Some(n + 1));
        }
    });
}

// SAFETY: every method forwards to the system allocator unchanged; counting touches only a
// thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations(run: impl FnOnce()) -> u64 {
    COUNT.with(|count| count.set(Some(0)));
    run();
    COUNT.with(|count| count.replace(None)).expect("counting")
}

/// Polls a future that never waits.
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future)
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("waited"),
    }
}

/// An inner service that reads the identity and answers "ok" without allocating.
async fn ok(request: Request<()>) -> Result<Response<&'static str>, Infallible> {
    let user = request.extensions().get::<MatrixUser>();
    Ok(Response::new(if user.is_some() {
        "ok"
    } else {
        "anonymous"
    }))
}

/// Allocations of one request through `service` (`poll_ready`, `call`, the response future,
/// dropping the response); the request is built before counting starts.
fn per_request<S>(service: &mut S, request: Request<()>) -> u64
where
    S: Service<Request<()>, Error = Infallible>,
    S::Response: std::fmt::Debug,
{
    allocations(|| {
        now(std::future::poll_fn(|cx| service.poll_ready(cx))).unwrap();
        let response = now(service.call(request)).unwrap();
        drop(response);
    })
}

fn header_request(token: &str) -> Request<()> {
    Request::get("/_matrix/client/v3/account/whoami")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

fn query_request(token: &str) -> Request<()> {
    Request::get(format!(
        "/_matrix/client/v3/account/whoami?access_token={token}"
    ))
    .body(())
    .unwrap()
}

#[test]
fn allocations_per_authenticated_request() {
    let token = access_token(&[&format!("time < {}", NOW_MS + 3_600_000)]);
    let verifier = Verifier::new(keys()).clock(ManualClock::new(NOW_MS));
    let mut bare = tower::service_fn(ok);
    let mut uncached = MatrixAuthLayer::with_verifier(verifier.clone().token_cache(0))
        .layer(tower::service_fn(ok));
    let cached_layer = MatrixAuthLayer::with_verifier(verifier);
    // Every shard of the cache has had its slots allocated (a one-off per shard), as in a
    // server that has run for a while.
    let keys = keys();
    for i in 0..400 {
        let other = keys
            .mint(ALICE, tower_matrix_auth::TokenType::Access)
            .unwrap()
            .nonce(format!("warm-up {i}"))
            .to_token();
        let parts = http::Request::new(()).into_parts().0;
        cached_layer
            .verifier()
            .verify(
                other.as_bytes(),
                tower_matrix_auth::TokenType::Access,
                &parts,
            )
            .unwrap();
    }
    let mut cached = cached_layer.layer(tower::service_fn(ok));

    let bare_count = per_request(&mut bare, header_request(&token));
    let miss_header = per_request(&mut uncached, header_request(&token));
    let miss_query = per_request(&mut uncached, query_request(&token));
    let first = per_request(&mut cached, header_request(&token));
    let hit_header = per_request(&mut cached, header_request(&token));
    let hit_query = per_request(&mut cached, query_request(&token));
    println!("allocations per request (the inner service itself: {bare_count}):");
    println!("  header token, full verification: {miss_header}");
    println!("  header token, cache hit:         {hit_header}");
    println!("  header token, first sight (verification + cache insert): {first}");
    println!("  query token, full verification:  {miss_query}");
    println!("  query token, cache hit:          {hit_query}");

    assert_eq!(bare_count, 0);
    // The identity's one shared string, then `Extensions::insert`: its map's box, the map's
    // table and the boxed value (http's design; three for any extension).
    assert!(miss_header <= 4, "{miss_header}");
    // A hit shares the cached identity: only the extension remains.
    assert!(hit_header <= 3, "{hit_header}");
    // Plus the cache's copy of the token.
    assert!(first <= 5, "{first}");
    // Plus the URI without `access_token`, which the inner service sees.
    assert!(miss_query <= 5, "{miss_query}");
    assert!(hit_query <= 4, "{hit_query}");
}
