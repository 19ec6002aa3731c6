//! What the layer reports through the `metrics` facade (feature `metrics`): nothing is recorded
//! unless the application installs a recorder (e.g. `metrics-exporter-prometheus`), and without
//! one each report costs a few nanoseconds. No label ever holds a token, a user id or any other
//! unbounded value.
//!
//! The metrics and their labels are listed on the `layer` module (`src/layer/mod.rs`).

use std::time::Duration;

use crate::error::Rejection;
use crate::identity::{Credential, MatrixUser};

// Every label is written out as a literal: the `metrics` macros then build a static key, where a
// label value computed at run time would cost an allocation on every request.

/// One admitted request.
pub(crate) fn admitted(user: Option<&MatrixUser>) {
    macro_rules! ok {
        ($credential:literal) => {
            metrics::counter!(
                "matrix_auth_decisions_total",
                "outcome" => "ok",
                "credential" => $credential
            )
            .increment(1)
        };
    }
    match user.map(MatrixUser::credential) {
        None => ok!("none"),
        Some(Credential::Macaroon) => ok!("macaroon"),
        Some(Credential::Opaque) => ok!("opaque"),
        Some(Credential::AppService) => ok!("appservice"),
        Some(Credential::OAuth2) => ok!("oauth2"),
    }
}

/// One refused request.
pub(crate) fn refused(rejection: &Rejection) {
    macro_rules! refused {
        ($($outcome:literal),*) => {
            match rejection.outcome() {
                $($outcome => metrics::counter!(
                    "matrix_auth_decisions_total",
                    "outcome" => $outcome
                )
                .increment(1),)*
                other => debug_assert!(false, "outcome `{other}` has no counter"),
            }
        };
    }
    refused!(
        "missing_token",
        "unknown_token",
        "expired",
        "locked",
        "suspended",
        "deactivated",
        "guest_forbidden",
        "appservice_forbidden",
        "unavailable",
        "rate_limited",
        "insufficient_scope"
    );
}

/// What the layer waited for, and how long.
#[derive(Clone, Copy)]
pub(crate) enum Wait {
    Revocation,
    Resolver,
}

/// Time spent waiting on a store or a resolver.
pub(crate) fn waited(on: Wait, waited: Duration) {
    let seconds = waited.as_secs_f64();
    match on {
        Wait::Revocation => {
            metrics::histogram!("matrix_auth_wait_seconds", "on" => "revocation").record(seconds)
        }
        Wait::Resolver => {
            metrics::histogram!("matrix_auth_wait_seconds", "on" => "resolver").record(seconds)
        }
    }
}

/// A resolver's answer at hand (an introspection cache hit) or to wait for.
pub(crate) fn resolver_cache(hit: bool) {
    if hit {
        metrics::counter!("matrix_auth_resolver_cache_total", "result" => "hit").increment(1);
    } else {
        metrics::counter!("matrix_auth_resolver_cache_total", "result" => "miss").increment(1);
    }
}

/// Whether a revocation store can answer (PostgreSQL: connected, view proven current).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn store_healthy(healthy: bool) {
    metrics::gauge!("matrix_auth_store_healthy").set(if healthy { 1.0 } else { 0.0 });
}

/// A look-up in the verified-token cache.
pub(crate) fn token_cache(hit: bool) {
    if hit {
        metrics::counter!("matrix_auth_token_cache_total", "result" => "hit").increment(1);
    } else {
        metrics::counter!("matrix_auth_token_cache_total", "result" => "miss").increment(1);
    }
}
