//! The PostgreSQL store's connections going bad: a database that accepts connections but fails
//! every setup, and a writer connection that dies alone. The store must fail closed, recover by
//! itself, and never multiply its connections.
#![cfg(feature = "postgres")]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::pg::{database_url, poll_once, wait_until};
use common::{keys, NOW_MS};
use tower_matrix_auth::{
    Issuer, ManualClock, MatrixUser, PostgresStore, Revocation, RevocationStatus, SessionId,
    SessionRequest, Sessions, TokenType, Verifier,
};

/// Unique to this run: the database outlives test runs on a developer's machine.
fn unique(name: &str) -> String {
    format!("{name}_{:x}", SessionId::random().as_u128() as u32)
}

fn uid(name: &str) -> String {
    format!("{}:example.org", unique(name))
}

/// A libpq key-value connection string to the test server's `dbname` through `addr`.
fn conninfo(addr: SocketAddr, dbname: &str, application_name: &str) -> String {
    let config: tokio_postgres::Config = database_url().parse().unwrap();
    let mut info = format!(
        "host={} port={} dbname={dbname} application_name={application_name}",
        addr.ip(),
        addr.port()
    );
    if let Some(user) = config.get_user() {
        info += &format!(" user={user}");
    }
    if let Some(password) = config.get_password() {
        let password = String::from_utf8_lossy(password).replace('\\', "\\\\");
        info += &format!(" password='{}'", password.replace('\'', "\\'"));
    }
    info
}

/// The test server's address and database.
fn database() -> (SocketAddr, String) {
    let config: tokio_postgres::Config = database_url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("the tests need a TCP database URL, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("the database host resolves")
        .next()
        .expect("the database host has an address");
    (addr, config.get_dbname().unwrap_or("postgres").to_owned())
}

/// A plain connection for the test's own statements.
async fn admin(dbname: &str) -> tokio_postgres::Client {
    let (addr, _) = database();
    let (client, connection) = tokio_postgres::connect(
        &conninfo(addr, dbname, "liveness-test"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    client
}

async fn connections(admin: &tokio_postgres::Client, application_name: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 ORDER BY backend_start",
            &[&application_name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn engine(store: &PostgresStore) -> Sessions {
    let clock = ManualClock::new(NOW_MS);
    Sessions::new(
        Issuer::new(keys()).clock(clock.clone()),
        Verifier::new(keys()).clock(clock),
        store.clone(),
    )
}

fn verify(token: &str) -> MatrixUser {
    let parts = http::Request::new(()).into_parts().0;
    Verifier::new(keys())
        .clock(ManualClock::new(NOW_MS))
        .verify(token.as_bytes(), TokenType::Access, &parts)
        .expect("a valid token")
}

fn login(sessions: &Sessions, name: &str) -> MatrixUser {
    verify(
        &sessions
            .login(&uid(name), &SessionRequest::default())
            .access_token,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setups_that_keep_failing_never_multiply_connections() {
    let (addr, _) = database();
    let admin = admin("postgres").await;
    // Left behind by an earlier run that failed half-way.
    for row in admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'matrix\\_auth\\_setup\\_%'",
            &[],
        )
        .await
        .unwrap()
    {
        let leftover: String = row.get(0);
        admin
            .batch_execute(&format!("DROP DATABASE {leftover} WITH (FORCE)"))
            .await
            .unwrap();
    }
    let dbname = unique("matrix_auth_setup");
    admin
        .batch_execute(&format!("CREATE DATABASE {dbname}"))
        .await
        .unwrap();
    let application_name = unique("setup_fails");
    let store = PostgresStore::connect(&conninfo(addr, &dbname, &application_name))
        .await
        .unwrap();
    // Every new session on that database now fails the store's setup (it creates its tables if
    // needed) after both connections are open; then the store's connections are cut.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(5), || !store.is_healthy()).await;

    let start = Instant::now();
    let (mut most, mut seen) = (0, HashSet::new());
    while start.elapsed() < Duration::from_secs(6) {
        let pids = connections(&admin, &application_name).await;
        most = most.max(pids.len());
        seen.extend(pids);
        assert!(!store.is_healthy());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "failing setups over 6 s: at most {most} connections at once, {} seen",
        seen.len()
    );
    assert!(most <= 2, "{most} connections at once");

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), || store.is_healthy()).await;
    assert!(connections(&admin, &application_name).await.len() <= 2);
    drop(store);
    admin
        .batch_execute(&format!("DROP DATABASE {dbname} WITH (FORCE)"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writer_is_noticed_and_replaced() {
    let (addr, dbname) = database();
    let admin = admin(&dbname).await;
    let application_name = unique("writer_dies");
    let a = PostgresStore::connect(&conninfo(addr, &dbname, &application_name))
        .await
        .unwrap();
    let b = PostgresStore::connect(&database_url()).await.unwrap();
    let user = login(&engine(&b), "@writer-dies");
    // The writer connects after the listener.
    let pids = connections(&admin, &application_name).await;
    assert_eq!(pids.len(), 2);
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pids[1]])
        .await
        .unwrap();
    let start = Instant::now();
    let on_a = engine(&a);
    loop {
        if on_a.logout(&user).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "writes on A still fail {:?} after its writer died",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "writer replaced: a write succeeded {:?} after it died",
        start.elapsed()
    );
    wait_until(Duration::from_secs(5), || {
        matches!(
            poll_once(b.check(&user)),
            Some(Ok(RevocationStatus::Revoked))
        )
    })
    .await;
    assert!(connections(&admin, &application_name).await.len() <= 2);
}
