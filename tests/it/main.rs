//! The integration tests, in one binary (one link instead of twenty). Two stay binaries of
//! their own: `tests/allocations.rs` installs a counting global allocator, and
//! `tests/postgres_outage.rs` stops and restarts the PostgreSQL server the others share.

#[path = "../common/mod.rs"]
mod common;
#[path = "../oracle/mod.rs"]
mod oracle;

mod axum_extractors;
mod cache;
mod compose;
mod fuzz_regressions;
mod homeserver_policy;
mod http_server;
mod layer;
mod lifecycle;
mod lifecycle_properties;
mod logging;
mod logout_all_hammer;
mod postgres;
mod postgres_liveness;
mod properties;
mod revocation_state;
mod routes;
mod ruma_errors;
mod timing;
mod vectors;
