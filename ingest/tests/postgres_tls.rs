//! Ingest to PostgreSQL over TLS (DESIGN.md promise 8: patient data is encrypted on every network hop).
//!
//! A throw-away PKI (rcgen), a PostgreSQL server the test starts itself with `ssl = on` and a certificate
//! for 127.0.0.1 signed by the test CA. Ingest's store, given that CA, connects over TLS — the server's
//! own `pg_stat_ssl` says so — and stores readings; given a CA that did not sign the server's
//! certificate, it refuses to connect. Skipped with a message when PostgreSQL is not installed.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store, postgres_tls};
use ingest::testing::{SKIP_MESSAGE, TempPostgres, glucose_message};
use protocol::rules::RuleSet;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stores_over_tls_and_refuses_a_server_it_cannot_verify() {
    let (issuer, ca_pem) = ca("phg test CA");
    let (_, stranger_pem) = ca("a CA nobody trusts");
    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "db");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();
    let Some(pg) =
        TempPostgres::start_with_tls(false, &server_cert.pem(), &server_key.serialize_pem())
            .unwrap()
    else {
        println!("{SKIP_MESSAGE}");
        return;
    };
    pg.create_database("tls").await.unwrap();
    let url = pg.url("tls");

    // The store over TLS: it works, and the server says the session is encrypted.
    let store = AnyStore::open_with(&url, Some(ca_pem.as_bytes()))
        .await
        .unwrap();
    let ev = Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt],
    ));
    let msgs: Vec<Inbound> = (0..5)
        .map(|i| Inbound {
            channel: Channel::Readings,
            topic: "phg/v1/gw-test/readings".into(),
            payload: glucose_message(
                &format!("tls-{i}"),
                "p-0001",
                100 + i,
                1_763_900_000 + i64::from(i) * 60,
            )
            .into_bytes(),
            max_len: None,
        })
        .collect();
    store.ingest(msgs, Arc::clone(&ev), "tls", 1).await.unwrap();
    assert_eq!(store.counts().await.unwrap().readings, 5);
    let tls = postgres_tls(ca_pem.as_bytes()).unwrap();
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = config.connect(tls).await.unwrap();
    tokio::spawn(conn);
    // Every session on the database — the store's writer and reader, and this one — is encrypted.
    let row = client
        .query_one(
            "SELECT count(*), bool_and(s.ssl), max(s.version)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'tls'",
            &[],
        )
        .await
        .unwrap();
    let (sessions, all_ssl, version): (i64, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert!(
        sessions >= 3,
        "the store's two connections and this one: {sessions}"
    );
    assert!(all_ssl, "every session is encrypted");
    println!("postgres over TLS: {sessions} sessions, {version:?}");
    drop(store);

    // A CA that did not sign the server's certificate: no connection, so nothing stored anywhere else.
    let refused = AnyStore::open_with(&url, Some(stranger_pem.as_bytes())).await;
    assert!(refused.is_err(), "a server it cannot verify is refused");
    // A CA file with no certificate in it is a clear error, not a silent plaintext connection.
    assert!(
        AnyStore::open_with(&url, Some(b"not a certificate"))
            .await
            .is_err()
    );
}
