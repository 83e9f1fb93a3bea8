//! TLS to PostgreSQL, from the connection string's `sslmode` (and `sslrootcert`): with
//! `require` the connection is encrypted and the server's certificate verified against
//! the given CA; a certificate that does not verify is refused; `disable` stays plain; an
//! unknown mode is a configuration error. Against a real PostgreSQL with TLS turned on.

use std::time::Duration;

mod common;
use common::pg::{self, PgServer};

use botvisor::db::postgres::Rows;

/// How many of botvisor's connections (application_name `botvisor`) use TLS, and how
/// many do not.
fn tls_connections(pg: &PgServer) -> (usize, usize) {
    let rows = pg
        .rows(
            &pg.url("postgres"),
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'botvisor'",
        )
        .unwrap();
    let on = rows.iter().filter(|r| r[0].as_deref() == Some("t")).count();
    (on, rows.len() - on)
}

#[test]
fn sslmode_require_encrypts_and_verifies_the_server_against_sslrootcert() {
    let test = "sslmode_require_encrypts_and_verifies_the_server_against_sslrootcert";
    let pg = match PgServer::start() {
        Ok(pg) => pg,
        Err(reason) => return pg::skip(test, &reason),
    };
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, leaf, key)) = common::test_pki(dir.path()) else {
        common::skip_unless_required(
            test,
            "the openssl command is not installed; to run it: apt-get install openssl",
        );
        return;
    };
    pg.enable_tls(&leaf, &key).unwrap();
    let base = pg.fresh_database_url("tls").unwrap();

    // Verified against the test CA: encrypted.
    let url = format!("{base}?sslmode=require&sslrootcert={}", ca.display());
    let rows = Rows::open(&url, Default::default()).unwrap();
    let mut engine = rows.engine();
    use botvisor::db::Engine;
    engine.set_setting("over", "tls").unwrap();
    assert_eq!(engine.setting("over").unwrap().as_deref(), Some("tls"));
    let (on, off) = tls_connections(&pg);
    assert!(on >= 1 && off == 0, "TLS connections {on}, plain {off}");
    drop(engine);
    drop(rows);
    std::thread::sleep(Duration::from_millis(300));

    // The same server without its CA: the certificate does not verify, nothing connects.
    let err = Rows::open(&format!("{base}?sslmode=require"), Default::default())
        .err()
        .expect("an unverified certificate is refused")
        .to_string();
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // disable: plain.
    let rows = Rows::open(&format!("{base}?sslmode=disable"), Default::default()).unwrap();
    let (on, off) = tls_connections(&pg);
    assert!(on == 0 && off >= 1, "TLS connections {on}, plain {off}");
    drop(rows);

    // A mode that does not exist, or a CA file that is not one: configuration errors.
    let err = Rows::open(&format!("{base}?sslmode=sometimes"), Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sslmode=sometimes"), "{err}");
    let err = Rows::open(
        &format!(
            "{base}?sslmode=require&sslrootcert={}",
            dir.path().join("none.pem").display()
        ),
        Default::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("sslrootcert"), "{err}");
}
