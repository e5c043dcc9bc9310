//! What reaches the care team, and when (issue 11 items 13 and 14), against real databases: SQLite in a
//! temporary file, and PostgreSQL started by the test (skipped with a message when not installed).
//!
//! - INFO changes are stored but not pushed one by one (CLINICAL.md §4.1: INFO is "none or weekly
//!   summary"; §4.4: no per-reading notifications for mild excursions); ADVISORY and above are pushed,
//!   and so is the downgrade of an alert that was pushed when it opened.
//! - The digest summarises a period's alerts below the push threshold per patient, once.
//! - Deadlines are stored with the patient's state: the earliest is readable by any instance and runs
//!   at its second, not at the window pass.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{DIGEST_NOTICE_SCHEMA, Evaluator, Sink};
use ingest::store::{AnyStore, Channel, Inbound, Store};
use ingest::testing::{SKIP_MESSAGE, TempPostgres, bp_message, glucose_message};
use protocol::rules::{RuleSet, Severity};

/// 2026-11-23 08:00:00 UTC.
const T0: i64 = 1_795_420_800;
const SINKS: [Sink; 2] = [Sink::Mqtt, Sink::Webhook];

fn ev() -> Arc<Evaluator> {
    Arc::new(Evaluator::new(
        RuleSet::default_rules().expect("default rules"),
        SINKS.to_vec(),
    ))
}

fn reading(payload: String) -> Inbound {
    Inbound {
        topic: "phg/v1/gw-test/readings".into(),
        channel: Channel::Readings,
        payload: payload.into_bytes(),
        max_len: None,
    }
}

fn id(n: u16) -> String {
    protocol::reading_id::glucose("dev-delivery", n).to_string()
}

/// A single grade-2 BP (INFO) is stored with its event but queued for no sink; a hypoglycaemia
/// (CRITICAL) is queued for both; a pending crisis (URGENT) and its downgrade by an in-range repeat are
/// both pushed (the CRM saw it open). The digest of the period then carries the INFO alerts, once.
async fn info_is_stored_and_digested_not_pushed(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    store
        .ingest(
            vec![reading(bp_message(&id(1), "p-info-1", 165, 95, 70, T0))],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    let alerts = store.alerts_of("p-info-1", 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (alerts[0].rule_id.as_str(), alerts[0].severity.as_str()),
        ("BP_GRADE2", "INFO")
    );
    let c = store.counts().await.unwrap();
    assert_eq!(c.alert_events, 1, "stored: {c:?}");
    assert_eq!(c.outbox_pending, 0, "not pushed: {c:?}");

    store
        .ingest(
            vec![reading(glucose_message(&id(2), "p-hypo-1", 45, T0))],
            Arc::clone(&ev),
            "a",
            2,
        )
        .await
        .unwrap();
    let c = store.counts().await.unwrap();
    assert_eq!(c.outbox_pending, 2, "CRITICAL: one row per sink: {c:?}");

    // A crisis waits for its repeat (pushed: the patient is prompted), the repeat is in range.
    let batch = vec![
        reading(bp_message(&id(3), "p-crisis-1", 185, 125, 70, T0)),
        reading(bp_message(&id(4), "p-crisis-1", 120, 80, 70, T0 + 120)),
    ];
    store.ingest(batch, Arc::clone(&ev), "a", 3).await.unwrap();
    let c = store.counts().await.unwrap();
    assert_eq!(
        c.notified_events, 3,
        "hypo, crisis open, its downgrade: {c:?}"
    );

    // The digest of the day: the patients whose alerts stayed below ADVISORY, per rule.
    let (from, to) = (T0 - 3600, T0 + 86_400);
    let n = store
        .digest(from, to, Severity::Advisory, SINKS.to_vec(), 10)
        .await
        .unwrap();
    // p-info (BP_GRADE2 INFO) and p-crisis (the downgraded crisis is INFO now).
    assert_eq!(n, 2);
    let c = store.counts().await.unwrap();
    assert_eq!(c.notified_events, 5, "{c:?}");
    let item = store
        .claim(Sink::Webhook, "t", 20, 30_000, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|i| serde_json::from_str::<serde_json::Value>(&i.payload).unwrap())
        .find(|v| v["schema"] == DIGEST_NOTICE_SCHEMA && v["patient"] == "p-info-1")
        .expect("p-info's digest queued for the webhook");
    assert_eq!(item["items"][0]["rule_id"], "BP_GRADE2");
    assert_eq!(item["items"][0]["alerts"], 1);
    assert_eq!(
        (item["from_utc"].as_i64(), item["to_utc"].as_i64()),
        (Some(from), Some(to))
    );
    // Once per patient and period, however often it is attempted.
    let again = store
        .digest(from, to, Severity::Advisory, SINKS.to_vec(), 11)
        .await
        .unwrap();
    assert_eq!(again, 0);
}

/// A pending crisis's deadline is stored: `next_deadline` names it, `deadlines` before it does nothing,
/// at it raises the alert anyway, and the next deadline becomes its acknowledgement (URGENT: 4 h).
async fn deadlines_are_stored_and_run_at_their_second(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    assert_eq!(store.next_deadline().await.unwrap(), None);
    store
        .ingest(
            vec![reading(bp_message(&id(1), "p-late-1", 185, 125, 70, T0))],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    assert_eq!(store.next_deadline().await.unwrap(), Some(T0 + 901));
    assert_eq!(store.deadlines(Arc::clone(&ev), T0 + 900).await.unwrap(), 0);
    assert_eq!(
        store.alerts_of("p-late-1", 1).await.unwrap()[0].status,
        "pending"
    );
    assert_eq!(store.deadlines(Arc::clone(&ev), T0 + 901).await.unwrap(), 1);
    let a = &store.alerts_of("p-late-1", 1).await.unwrap()[0];
    assert_eq!(
        (a.status.as_str(), a.severity.as_str()),
        ("active", "URGENT")
    );
    assert_eq!(
        store.next_deadline().await.unwrap(),
        Some(T0 + 900 + 14_400)
    );
    // Idempotent: a second instance running the same deadline writes nothing.
    assert_eq!(store.deadlines(Arc::clone(&ev), T0 + 901).await.unwrap(), 0);
}

macro_rules! sqlite_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("ingest.sqlite").display());
                    super::$name(&url).await;
                }
            )*
        }
    };
}

sqlite_tests!(
    info_is_stored_and_digested_not_pushed,
    deadlines_are_stored_and_run_at_their_second,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alert_delivery() {
    let Some(pg) = TempPostgres::start(false).expect("PostgreSQL is installed but did not start")
    else {
        println!("postgres_alert_delivery: {SKIP_MESSAGE}");
        return;
    };
    info_is_stored_and_digested_not_pushed(&pg.create_database("d1").await.unwrap()).await;
    deadlines_are_stored_and_run_at_their_second(&pg.create_database("d2").await.unwrap()).await;
}
