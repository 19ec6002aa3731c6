//! The integration tests, in one binary (one link instead of twenty). Three stay binaries of
//! their own: `tests/allocations.rs` installs a counting global allocator,
//! `tests/postgres_outage.rs` stops and restarts the PostgreSQL server the others share, and
//! `tests/logging.rs` captures logs with a thread's own subscriber, which tracing's process-wide
//! callsite cache makes unreliable beside other tests logging on other threads.

#[path = "../common/mod.rs"]
mod common;
#[path = "../oracle/mod.rs"]
mod oracle;

mod axum_extractors;
mod cache;
mod client_addr;
mod compose;
mod fuzz_regressions;
mod homeserver_policy;
mod http_server;
mod layer;
mod lifecycle;
mod lifecycle_properties;
mod logout_all_hammer;
mod metrics;
mod oauth2;
mod oidc_provider;
mod postgres;
mod postgres_liveness;
mod properties;
mod refresh_policy;
mod revocation_state;
mod routes;
mod ruma_errors;
mod spec_versions;
mod timing;
mod vectors;
