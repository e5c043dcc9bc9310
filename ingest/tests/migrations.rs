//! Upgrades keep data (issue 14 item 8): a database made by the previous ingest — its schema as it
//! created it (`CREATE TABLE IF NOT EXISTS`, no migration history), copied here as the "v1" fixture — is
//! adopted by the versioned migrations with its rows intact and goes on storing; a database migrated by
//! a newer ingest (a version this one does not know) is refused with a message that says so. SQLite in a
//! temporary file; PostgreSQL started by the test (skipped with a message when not installed).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store, Stored};
use ingest::testing::{SKIP_MESSAGE, TempPostgres, alert_rules_of, bp_message, glucose_message};
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

/// Schema V3 moved the BP readings each patient's engine keeps out of the state row into `bp_history`. A
/// state the previous version wrote still holds them inside: after the upgrade, an instance that never
/// saw the patient reads them from there — the 7-day average is raised from readings stored before the
/// upgrade — and its write moves them to rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_with_its_bp_history_inside_keeps_raising_window_alerts_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    // A state with 28 uncontrolled home readings over two weeks, as this version stores it …
    let made = dir.path().join("made.sqlite");
    let store = AnyStore::open(&format!("sqlite://{}", made.display()))
        .await
        .unwrap();
    let batch: Vec<Inbound> = (0..28)
        .map(|i| {
            let t = T0 + (i / 2) * 86_400 + (i % 2) * 12 * 3600;
            reading(bp_message(&format!("bp-{i}"), "p-bp-1", 150, 95, 70, t))
        })
        .collect();
    store.ingest(batch, ev(), "a", 1).await.unwrap();
    drop(store);
    let c = rusqlite::Connection::open(&made).unwrap();
    let json: String = c
        .query_row(
            "SELECT state FROM patient_state WHERE patient = 'p-bp-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let entries: Vec<serde_json::Value> = c
        .prepare("SELECT entry FROM bp_history WHERE patient = 'p-bp-1' ORDER BY time_utc, seq")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|e| serde_json::from_str(&e.unwrap()).unwrap())
        .collect();
    assert_eq!(entries.len(), 28);
    // … written the way the previous version did: the history inside the state, in a v1 database.
    let mut legacy: serde_json::Value = serde_json::from_str(&json).unwrap();
    legacy["bp"] = serde_json::Value::Array(entries);
    let path = dir.path().join("v1.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&v1("INTEGER PRIMARY KEY AUTOINCREMENT"))
            .unwrap();
        c.execute(
            "INSERT INTO patient_state (patient, state, updated_ms) VALUES ('p-bp-1', ?1, 1)",
            [legacy.to_string()],
        )
        .unwrap();
    }
    let store = AnyStore::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let now = T0 + 14 * 86_400;
    assert!(
        store.tick(ev(), now).await.unwrap() >= 1,
        "tick raised nothing"
    );
    let rules = alert_rules_of(&store, "p-bp-1").await.unwrap();
    assert!(
        rules.contains(&"BP_AVG_UNCONTROLLED".to_owned()),
        "{rules:?}"
    );
    drop(store);
    let c = rusqlite::Connection::open(&path).unwrap();
    let (rows, rev): (i64, Option<i64>) = c
        .query_row(
            "SELECT (SELECT count(*) FROM bp_history WHERE patient = 'p-bp-1'),
                    (SELECT history_rev FROM patient_state WHERE patient = 'p-bp-1')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows, 28, "the history moved to rows");
    assert!(rev.is_some());
}

fn ev() -> Arc<Evaluator> {
    Arc::new(Evaluator::new(
        RuleSet::default_rules().unwrap(),
        vec![Sink::Mqtt],
    ))
}
