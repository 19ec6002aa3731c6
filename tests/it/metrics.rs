//! The layer's metrics, recorded by a recorder local to this thread (the process-wide one would
//! see every other test): decisions by outcome and credential, the cache, and time spent
//! waiting on a store that answers later. `/metrics` over HTTP is tested on the example
//! homeserver (`homeserver_policy::metrics_count_what_was_sent`).

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower_matrix_auth::hooks::{ManualClock, RevocationCheck, RevocationStatus};
use tower_matrix_auth::{MatrixAuthLayer, MatrixUser, Verifier};

use crate::common::*;

/// Every metric the recorder saw: `name{label=value,…}` and its value.
fn snapshot(recorder: &DebuggingRecorder) -> Vec<(String, DebugValue)> {
    let mut seen: Vec<_> = recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key().clone();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    seen
}

fn counter(seen: &[(String, DebugValue)], series: &str) -> u64 {
    seen.iter()
        .find_map(|(name, value)| match value {
            DebugValue::Counter(n) if name == series => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

#[test]
fn decisions_cache_and_waits_are_counted() {
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A store that answers after 30 ms, as a database would.
            let slow = |_: &MatrixUser| {
                RevocationCheck::pending(async {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    Ok(RevocationStatus::Active)
                })
            };
            let layer = MatrixAuthLayer::with_verifier(
                Verifier::new(keys()).clock(ManualClock::new(NOW_MS)),
            )
            .revocation(slow);
            let token = access_token(&[]);
            for _ in 0..2 {
                assert_eq!(
                    call(&layer, bearer("/x", &token)).await.user_id(),
                    Some(ALICE)
                );
            }
            let expired = access_token(&[&format!("time < {}", NOW_MS - 1)]);
            assert_eq!(
                call(&layer, bearer("/x", &expired)).await.json["soft_logout"],
                true
            );
            assert_eq!(call(&layer, plain("/x")).await.errcode(), "M_MISSING_TOKEN");
            let skipping = layer.clone().skip_path("/versions");
            call(&skipping, plain("/versions")).await;
        });
    });
    let seen = snapshot(&recorder);
    let names = || seen.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>();
    assert_eq!(
        counter(
            &seen,
            "matrix_auth_decisions_total{outcome=ok,credential=macaroon}"
        ),
        2,
        "{:?}",
        names()
    );
    assert_eq!(
        counter(&seen, "matrix_auth_decisions_total{outcome=expired}"),
        1
    );
    assert_eq!(
        counter(&seen, "matrix_auth_decisions_total{outcome=missing_token}"),
        1
    );
    assert_eq!(
        counter(&seen, "matrix_auth_token_cache_total{result=hit}"),
        1
    );
    assert_eq!(
        counter(&seen, "matrix_auth_token_cache_total{result=miss}"),
        2
    );
    // The skipped request is no decision: nothing else was counted.
    let decisions: u64 = seen
        .iter()
        .filter(|(n, _)| n.starts_with("matrix_auth_decisions_total"))
        .map(|(n, _)| counter(&seen, n))
        .sum();
    assert_eq!(decisions, 4);
    // Both valid requests and the expired one waited on the store (an expired token is still
    // checked for revocation: a revoked one gets no soft logout).
    let waits = seen
        .iter()
        .find_map(|(name, value)| match value {
            DebugValue::Histogram(values) if name == "matrix_auth_wait_seconds{on=revocation}" => {
                Some(values.iter().map(|v| v.into_inner()).collect::<Vec<f64>>())
            }
            _ => None,
        })
        .expect("the wait histogram");
    assert_eq!(waits.len(), 3, "{waits:?}");
    assert!(waits.iter().all(|&w| w >= 0.025), "{waits:?}");
    // No label holds a token or a user id.
    for (name, _) in &seen {
        assert!(
            !name.contains('@') && !name.contains(&token_prefix()),
            "{name}"
        );
    }
}

fn token_prefix() -> String {
    access_token(&[])[..20].to_owned()
}

/// A resolver with its answer at hand (as the introspection cache) is a hit; one that must be
/// waited for is a miss, and its wait is in the histogram.
#[test]
fn resolver_hits_and_misses_are_counted() {
    use std::sync::Arc;
    use tower_matrix_auth::hooks::{ResolveFuture, ResolvedToken, TokenResolver};

    struct Cached;
    impl TokenResolver for Cached {
        fn resolve(&self, _: &str) -> ResolveFuture {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Some(ResolvedToken::user("@bob:example.org")))
            })
        }
        fn resolve_now(&self, token: &str) -> Option<Arc<ResolvedToken>> {
            (token == "opaque_cached").then(|| Arc::new(ResolvedToken::user("@bob:example.org")))
        }
    }
    let recorder = DebuggingRecorder::new();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = MatrixAuthLayer::with_verifier(
                Verifier::new(keys()).clock(ManualClock::new(NOW_MS)),
            )
            .resolver(Cached);
            for token in ["opaque_cached", "opaque_cached", "opaque_new"] {
                let outcome = call(&layer, bearer("/x", token)).await;
                assert_eq!(outcome.user_id(), Some("@bob:example.org"));
            }
        });
    });
    let seen = snapshot(&recorder);
    assert_eq!(
        counter(&seen, "matrix_auth_resolver_cache_total{result=hit}"),
        2
    );
    assert_eq!(
        counter(&seen, "matrix_auth_resolver_cache_total{result=miss}"),
        1
    );
    assert_eq!(
        counter(
            &seen,
            "matrix_auth_decisions_total{outcome=ok,credential=opaque}"
        ),
        3
    );
    assert!(seen
        .iter()
        .any(|(name, _)| name == "matrix_auth_wait_seconds{on=resolver}"));
}
