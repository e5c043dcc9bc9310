//! Upgrades keep data (issue 14 item 8): a database made by the previous ingest — its schema as it
//! created it (`CREATE TABLE IF NOT EXISTS`, no migration history), copied here as the "v1" fixture — is
//! adopted by the versioned migrations with its rows intact and goes on storing; a database migrated by
//! a newer ingest (a version this one does not know) is refused with a message that says so. SQLite in a
//! temporary file; PostgreSQL started by the test (skipped with a message when not installed).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store, Stored};
use ingest::testing::{SKIP_MESSAGE, TempPostgres, glucose_message};
use protocol::rules::RuleSet;

/// 2026-01-01 08:00:00 UTC.
const T0: i64 = 1_767_254_400;

/// The schema ingest 0.1 created before versioned migrations (`store::schema`, verbatim), with the
/// outbox sequence column of each dialect in place of `{seq_type}`.
const V1_FIXTURE: &str = "CREATE TABLE IF NOT EXISTS readings (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    gateway TEXT NOT NULL,
    kind TEXT NOT NULL,
    time_utc BIGINT NOT NULL,
    received_utc BIGINT NOT NULL,
    stored_ms BIGINT NOT NULL,
    instance TEXT NOT NULL,
    payload TEXT NOT NULL,
    eval_error TEXT
);
CREATE INDEX IF NOT EXISTS readings_by_patient ON readings (patient, time_utc);
CREATE TABLE IF NOT EXISTS patient_state (
    patient TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    next_deadline_utc BIGINT
);
CREATE TABLE IF NOT EXISTS patient_settings (
    patient TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    status TEXT NOT NULL,
    opened_utc BIGINT NOT NULL,
    updated_utc BIGINT NOT NULL,
    acknowledged_by TEXT,
    acknowledged_ms BIGINT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_by_patient ON alerts (patient, opened_utc);
CREATE TABLE IF NOT EXISTS alert_events (
    id TEXT PRIMARY KEY,
    alert_id TEXT NOT NULL,
    action TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    notice TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq {seq_type},
    event_id TEXT NOT NULL,
    sink TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    delivered_ms BIGINT,
    last_error TEXT,
    UNIQUE (event_id, sink)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sink, next_attempt_ms) WHERE delivered_ms IS NULL;
CREATE TABLE IF NOT EXISTS gateway_events (
    id TEXT PRIMARY KEY,
    gateway TEXT NOT NULL,
    kind TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS bad_messages (
    id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    error TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS patient_state_deadline ON patient_state (next_deadline_utc);";

fn v1(seq_type: &str) -> String {
    V1_FIXTURE.replace("{seq_type}", seq_type)
}

/// One reading and one alert as the previous version stored them.
const V1_ROWS: &str = "
INSERT INTO readings (id, patient, gateway, kind, time_utc, received_utc, stored_ms, instance, payload)
    VALUES ('r-old', 'p-0001', 'gw-1', 'glucose', 1767254400, 1767254400, 1767254400000, 'a', '{}');
INSERT INTO alerts (id, patient, rule_id, severity, status, opened_utc, updated_utc, body)
    VALUES ('p-0001/GLU_HYPO_L2/1767254400', 'p-0001', 'GLU_HYPO_L2', 'CRITICAL', 'active', 1767254400,
            1767254400, '{}');";

fn reading(payload: String) -> Inbound {
    Inbound {
        topic: "phg/v1/gw-test/readings".into(),
        channel: Channel::Readings,
        payload: payload.into_bytes(),
        max_len: None,
    }
}

/// The previous version's rows are there after the upgrade, and the store takes new readings.
async fn upgraded_store_keeps_rows_and_stores(url: &str) {
    let store = AnyStore::open(url)
        .await
        .expect("the v1 database is adopted");
    let c = store.counts().await.unwrap();
    assert_eq!(
        (c.readings, c.alerts),
        (1, 1),
        "the v1 rows are kept: {c:?}"
    );
    let ev = Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt],
    ));
    let r = store
        .ingest(
            vec![reading(glucose_message("r-new", "p-0002", 120, T0))],
            ev,
            "a",
            1,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 0 }]);
    assert_eq!(store.counts().await.unwrap().readings, 2);
    drop(store);
    // Opening again (the next restart) applies nothing and changes nothing.
    let again = AnyStore::open(url).await.expect("reopened");
    assert_eq!(again.counts().await.unwrap().readings, 2);
}

fn refused_message(e: impl std::fmt::Display) -> String {
    let msg = e.to_string();
    assert!(msg.contains("schema migration"), "{msg}");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_database_of_the_previous_version_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&v1("INTEGER PRIMARY KEY AUTOINCREMENT"))
            .unwrap();
        c.execute_batch(V1_ROWS).unwrap();
    }
    let url = format!("sqlite://{}", path.display());
    upgraded_store_keeps_rows_and_stores(&url).await;
    let c = rusqlite::Connection::open(&path).unwrap();
    let versions: i64 = c
        .query_row(
            "SELECT max(version) FROM refinery_schema_history",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(versions >= 1);

    // A newer ingest migrated it further: this one refuses it rather than misread it.
    c.execute(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
         VALUES (9999, 'from_a_newer_ingest', '2027-01-01T00:00:00Z', '0')",
        [],
    )
    .unwrap();
    drop(c);
    let Err(e) = AnyStore::open(&url).await else {
        panic!("a database from a newer ingest is refused")
    };
    let msg = refused_message(e);
    assert!(msg.contains("9999") || msg.contains("missing"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_database_of_the_previous_version_is_upgraded() {
    let Some(pg) = TempPostgres::start(false).expect("PostgreSQL is installed but did not start")
    else {
        println!("postgres_database_of_the_previous_version_is_upgraded: {SKIP_MESSAGE}");
        return;
    };
    let url = pg.create_database("upgrade").await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&v1("BIGSERIAL PRIMARY KEY"))
        .await
        .unwrap();
    client.batch_execute(V1_ROWS).await.unwrap();
    upgraded_store_keeps_rows_and_stores(&url).await;
    let versions: i32 = client
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(versions >= 1);

    client
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (9999, 'from_a_newer_ingest', '2027-01-01T00:00:00Z', '0')",
            &[],
        )
        .await
        .unwrap();
    let Err(e) = AnyStore::open(&url).await else {
        panic!("a database from a newer ingest is refused")
    };
    let msg = refused_message(e);
    assert!(msg.contains("9999") || msg.contains("missing"), "{msg}");
}
