//! What the layer reports through the `metrics` facade (feature `metrics`): nothing is recorded
//! unless the application installs a recorder (e.g. `metrics-exporter-prometheus`), and without
//! one each report costs a few nanoseconds. No label ever holds a token, a user id or any other
//! unbounded value.
//!
//! The metrics and their labels are listed on the `layer` module (`src/layer/mod.rs`).

use std::time::Duration;

use crate::error::Rejection;
use crate::identity::{Credential, MatrixUser};

/// One admitted request.
pub(crate) fn admitted(user: Option<&MatrixUser>) {
    let credential = match user.map(MatrixUser::credential) {
        None => "none",
        Some(Credential::Macaroon) => "macaroon",
        Some(Credential::Opaque) => "opaque",
        Some(Credential::AppService) => "appservice",
    };
    metrics::counter!("matrix_auth_decisions_total", "outcome" => "ok", "credential" => credential)
        .increment(1);
}

/// One refused request.
pub(crate) fn refused(rejection: &Rejection) {
    metrics::counter!("matrix_auth_decisions_total", "outcome" => rejection.outcome()).increment(1);
}

/// What the layer waited for, and how long.
#[derive(Clone, Copy)]
pub(crate) enum Wait {
    Revocation,
    Resolver,
}

/// Time spent waiting on a store or a resolver.
pub(crate) fn waited(on: Wait, waited: Duration) {
    let on = match on {
        Wait::Revocation => "revocation",
        Wait::Resolver => "resolver",
    };
    metrics::histogram!("matrix_auth_wait_seconds", "on" => on).record(waited.as_secs_f64());
}

/// A look-up in the verified-token cache.
pub(crate) fn token_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!("matrix_auth_token_cache_total", "result" => result).increment(1);
}
