//! The storage layer against real databases: SQLite in a temporary file, and PostgreSQL started by the
//! test itself (skipped with a message when not installed). The same scenarios run on both.
//!
//! What a user relies on: a reading stored once however often it is delivered; an alert raised once
//! even when two instances store the same stream; an outbox row delivered by one instance at a time and
//! never lost; acknowledgement; the patient queries; the scheduled window rules.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ingest::evaluate::{Evaluator, Sink};
use ingest::store::{AckResult, AnyStore, Channel, Inbound, Store, Stored};
use ingest::testing::{
    SKIP_MESSAGE, TempPostgres, alert_rules_of, bp_message, glucose_message, reading_uuid,
    symptoms_message,
};
use protocol::rules::{RuleSet, Symptom};

/// 2026-01-01 08:00:00 UTC: in the past, with room after it (ingest rejects readings from the future).
const T0: i64 = 1_767_254_400;

fn ev() -> Arc<Evaluator> {
    Arc::new(Evaluator::new(
        RuleSet::default_rules().expect("default rules"),
        vec![Sink::Mqtt, Sink::Webhook],
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

fn sqlite_url() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ingest.sqlite").display());
    (dir, url)
}

// ------------------------------------------------------------------------------------------------------
// The scenarios (each gets a URL to a fresh, empty database)
// ------------------------------------------------------------------------------------------------------

/// A redelivered reading (same id, in the same batch and in a later one) stores nothing new and raises
/// no second alert; the alert id is deterministic and the outbox has one row per sink.
async fn duplicate_reading_is_stored_once_and_alerts_once(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    // 50 mg/dL: ADA Level 2 hypoglycaemia (< 54 mg/dL), CRITICAL, no confirmation step.
    let low = glucose_message("r-1", "p-0001", 50, T0);
    let r = store
        .ingest(
            vec![reading(low.clone()), reading(low.clone())],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 1 }, Stored::Duplicate]);
    let r = store
        .ingest(vec![reading(low)], Arc::clone(&ev), "b", 2)
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::Duplicate]);
    let c = store.counts().await.unwrap();
    assert_eq!((c.readings, c.alerts, c.alert_events), (1, 1, 1), "{c:?}");
    assert_eq!(c.outbox_pending, 2, "one row per sink: {c:?}");
    let alerts = store.alerts_of("p-0001", 10).await.unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].rule_id, "GLU_HYPO_L2");
    assert_eq!(alerts[0].severity, "CRITICAL");
    assert_eq!(alerts[0].id, format!("p-0001/GLU_HYPO_L2/{T0}"));
    // 70 mg/dL is not < 70 (CLINICAL.md §3.4): no Level 1 hypoglycaemia (at most an advisory below
    // the pre-meal target).
    store
        .ingest(
            vec![reading(glucose_message("r-2", "p-0002", 70, T0))],
            Arc::clone(&ev),
            "a",
            3,
        )
        .await
        .unwrap();
    let alerts = store.alerts_of("p-0002", 10).await.unwrap();
    assert!(
        alerts.iter().all(|a| !a.rule_id.starts_with("GLU_HYPO")
            && a.severity != "CRITICAL"
            && a.severity != "URGENT"),
        "{alerts:?}"
    );
}

/// Two instances on one database store the same 120 readings (20 patients, in different orders and
/// batch sizes) at the same time: each reading is new exactly once, and every alert event exists once
/// with one outbox row per sink.
async fn two_instances_on_one_database_never_double_store_or_alert(url: &str) {
    let a = AnyStore::open(url).await.unwrap();
    let b = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let msgs: Vec<Inbound> = (0..120)
        .map(|i| {
            let patient = format!("p-{:04}", i % 20);
            // Every third reading is hypoglycaemic.
            let mg = if i % 3 == 0 { 45 } else { 110 };
            reading(glucose_message(
                &format!("r-{i}"),
                &patient,
                mg,
                T0 + i64::from(i) * 60,
            ))
        })
        .collect();
    let mut reversed = msgs.clone();
    reversed.reverse();
    let run = |s: AnyStore, msgs: Vec<Inbound>, size: usize, who: &'static str| {
        let ev = Arc::clone(&ev);
        tokio::spawn(async move {
            let mut out = Vec::new();
            for chunk in msgs.chunks(size) {
                out.extend(
                    s.ingest(chunk.to_vec(), Arc::clone(&ev), who, 1)
                        .await
                        .unwrap(),
                );
            }
            out
        })
    };
    let (ra, rb) = tokio::join!(run(a.clone(), msgs, 7, "a"), run(b, reversed, 16, "b"));
    let all: Vec<Stored> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
    let new = all
        .iter()
        .filter(|s| matches!(s, Stored::New { .. }))
        .count();
    let dup = all.iter().filter(|s| **s == Stored::Duplicate).count();
    let alert_events: usize = all
        .iter()
        .map(|s| match s {
            Stored::New { alerts } => *alerts,
            _ => 0,
        })
        .sum();
    assert_eq!((new, dup), (120, 120));
    let c = a.counts().await.unwrap();
    assert_eq!(c.readings, 120);
    assert_eq!(c.alert_events as usize, alert_events, "{c:?}");
    assert!(c.alerts >= 20, "every patient had a hypo: {c:?}");
    assert_eq!(c.outbox_pending as usize, 2 * alert_events, "{c:?}");
}

/// Outbox leasing: two claimers get disjoint rows; a leased row is not claimable until its lease runs
/// out; only the holder can mark it delivered; a failure makes it due later with one more attempt; a
/// delivered row is never claimed again.
async fn outbox_rows_are_leased_to_one_deliverer(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let batch: Vec<Inbound> = (0..6)
        .map(|i| {
            reading(glucose_message(
                &format!("r-{i}"),
                &format!("p-{i}"),
                40,
                T0,
            ))
        })
        .collect();
    store.ingest(batch, Arc::clone(&ev), "a", 1).await.unwrap();
    let now = 10_000;
    let lease = now + 30_000;
    let (x, y) = tokio::join!(
        store.claim(Sink::Webhook, "x", now, lease, 4),
        store.claim(Sink::Webhook, "y", now, lease, 4)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.len() + y.len(), 6, "x {x:?} y {y:?}");
    assert!(
        x.iter().all(|i| y.iter().all(|j| i.seq != j.seq)),
        "disjoint"
    );
    // Nothing left to claim while the leases hold; the MQTT sink has its own rows.
    assert!(
        store
            .claim(Sink::Webhook, "z", now + 1, lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .claim(Sink::Mqtt, "z", now + 1, lease, 10)
            .await
            .unwrap()
            .len(),
        6
    );
    // Only the holder can complete.
    let first = x.first().or(y.first()).unwrap().clone();
    let holder = if x.contains(&first) { "x" } else { "y" };
    assert!(
        !store
            .delivered(first.seq, "intruder", now + 2)
            .await
            .unwrap()
    );
    assert!(store.delivered(first.seq, holder, now + 2).await.unwrap());
    // A failure: due again only at next_attempt, with one more attempt.
    let second = x
        .iter()
        .chain(&y)
        .find(|i| i.seq != first.seq)
        .unwrap()
        .clone();
    let owner2 = if x.contains(&second) { "x" } else { "y" };
    store
        .failed(second.seq, owner2, now + 5_000, "HTTP 503")
        .await
        .unwrap();
    assert!(
        store
            .claim(Sink::Webhook, "z", now + 4_999, now + 60_000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = store
        .claim(Sink::Webhook, "z", now + 5_000, now + 60_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].seq, again[0].attempts), (second.seq, 1));
    // The lease of the rest runs out (their deliverer "died"): claimable again, except the delivered one
    // and the one "z" holds now.
    let late = store
        .claim(Sink::Webhook, "w", lease + 1, lease + 30_000, 10)
        .await
        .unwrap();
    assert_eq!(late.len(), 4, "{late:?}");
    assert!(
        late.iter()
            .all(|i| i.seq != first.seq && i.seq != second.seq)
    );
    let c = store.counts().await.unwrap();
    assert_eq!(c.outbox_delivered, 1);
}

/// A payload that is not a reading is kept for inspection and reported as bad (so it is acknowledged,
/// not redelivered forever); a reading with a name-like patient id is refused the same way.
async fn bad_messages_are_kept_not_stored_as_readings(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let r = store
        .ingest(
            vec![
                reading("{not json".into()),
                reading(glucose_message("r-1", "Jane Doe", 100, T0)),
                Inbound {
                    topic: "phg/v1/gw-test/events".into(),
                    channel: Channel::Events,
                    payload: br#"{"schema":"phg.event/1","gateway":"gw-test","time":"2026-11-23T08:00:00Z","event":{"kind":"device_error"}}"#.to_vec(),
                    max_len: None,
                },
            ],
            ev(),
            "a",
            1,
        )
        .await
        .unwrap();
    assert!(matches!(r[0], Stored::Bad(_)), "{r:?}");
    assert!(
        matches!(&r[1], Stored::Bad(e) if e.contains("pseudonym")),
        "{r:?}"
    );
    assert_eq!(r[2], Stored::Event);
    let c = store.counts().await.unwrap();
    assert_eq!((c.readings, c.bad_messages), (0, 2));
}

/// The same id with other content is recorded as a conflict (in the same batch and in a later one), not
/// dropped as a duplicate; an impossible value is stored as rejected and raises nothing (issue 11).
async fn conflicts_are_recorded_and_impossible_values_rejected(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let first = glucose_message("r-1", "p-0001", 100, T0);
    let other = glucose_message("r-1", "p-0001", 180, T0);
    let moved = glucose_message("r-1", "p-0009", 100, T0);
    let r = store
        .ingest(
            vec![reading(first.clone()), reading(other), reading(first)],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    assert_eq!(r[0], Stored::New { alerts: 0 });
    assert!(
        matches!(&r[1], Stored::Bad(e) if e.contains("conflict")),
        "{r:?}"
    );
    assert_eq!(r[2], Stored::Duplicate);
    let r = store
        .ingest(vec![reading(moved)], Arc::clone(&ev), "b", 2)
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Stored::Bad(e) if e.contains("conflict")),
        "{r:?}"
    );
    // 900/10 mmHg: once a BP_CRISIS.
    let r = store
        .ingest(
            vec![reading(bp_message("r-2", "p-0002", 900, 10, 70, T0))],
            Arc::clone(&ev),
            "a",
            3,
        )
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Stored::Rejected(e) if e.contains("out_of_range: systolic")),
        "{r:?}"
    );
    let row = store.reading(&reading_uuid("r-2")).await.unwrap().unwrap();
    assert!(row.eval_error.is_some());
    let c = store.counts().await.unwrap();
    assert_eq!((c.readings, c.alerts, c.bad_messages), (2, 0, 2), "{c:?}");
}

/// Acknowledging: once, then "already"; an unknown id is "not found". The patient queries return the
/// patient's own rows, newest first, limited.
async fn acknowledge_and_patient_queries(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let batch = vec![
        reading(glucose_message("r-1", "p-0001", 100, T0)),
        reading(glucose_message("r-2", "p-0001", 45, T0 + 600)),
        reading(glucose_message("r-3", "p-0001", 120, T0 + 1200)),
        reading(glucose_message("r-4", "p-0002", 120, T0)),
    ];
    store.ingest(batch, Arc::clone(&ev), "a", 1).await.unwrap();
    let rs = store.readings_of("p-0001", 2).await.unwrap();
    assert_eq!(
        rs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [reading_uuid("r-3"), reading_uuid("r-2")]
    );
    assert_eq!(rs[0].reading["glucose"]["value"], 120);
    assert_eq!(store.readings_of("p-0001", 10).await.unwrap().len(), 3);
    assert!(store.reading(&reading_uuid("r-4")).await.unwrap().is_some());
    let alerts = store.alerts_of("p-0001", 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let id = alerts[0].id.clone();
    assert_eq!(
        store
            .acknowledge(&id, "nurse-7", Arc::clone(&ev), 5)
            .await
            .unwrap(),
        AckResult::Acknowledged
    );
    assert_eq!(
        store
            .acknowledge(&id, "nurse-8", Arc::clone(&ev), 6)
            .await
            .unwrap(),
        AckResult::Already
    );
    assert_eq!(
        store
            .acknowledge("nope", "nurse-7", Arc::clone(&ev), 7)
            .await
            .unwrap(),
        AckResult::NotFound
    );
    let a = &store.alerts_of("p-0001", 10).await.unwrap()[0];
    assert_eq!(a.acknowledged_by.as_deref(), Some("nurse-7"));
}

/// The scheduled window rules: two weeks of home BP at 150/95 morning and evening give a 7-day average
/// above 135/85 (CLINICAL.md §2.1, ESH/China) — raised by `tick`, not by any single reading — and a
/// second tick at the same time raises nothing more.
async fn window_rules_run_on_tick(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let mut batch = Vec::new();
    for day in 0..14 {
        for (slot, s) in [(7 * 3600, "m"), (21 * 3600, "e")] {
            let t = T0 - 8 * 3600 + day * 86_400 + slot;
            batch.push(reading(bp_message(
                &format!("bp-{day}-{s}"),
                "p-bp-1",
                150,
                95,
                70,
                t,
            )));
        }
    }
    store.ingest(batch, Arc::clone(&ev), "a", 1).await.unwrap();
    let before = alert_rules_of(&store, "p-bp-1").await.unwrap();
    assert!(
        !before.contains(&"BP_AVG_UNCONTROLLED".to_owned()),
        "{before:?}"
    );
    let now = T0 + 14 * 86_400;
    // Ticked by an instance that never saw those readings (another instance, or this one restarted):
    // the 7-day average comes from the history the database keeps.
    let ev = self::ev();
    let n = store.tick(Arc::clone(&ev), now).await.unwrap();
    assert!(n >= 1, "tick raised nothing");
    let after = alert_rules_of(&store, "p-bp-1").await.unwrap();
    assert!(
        after.contains(&"BP_AVG_UNCONTROLLED".to_owned()),
        "{after:?}"
    );
    assert_eq!(
        store.tick(Arc::clone(&ev), now).await.unwrap(),
        0,
        "idempotent"
    );
}

/// Two instances take turns with one patient's BP readings: each one's cached engine must give way to
/// what the other stored. Instance B stores readings older than A's latest, all below the single-reading
/// thresholds, so the state row's text is as A left it and only the history changed: A must still see
/// B's readings (the history revision, not the text, tells it). 14 readings over 7 days at 138/88 raise
/// the 7-day average; either instance's 7 alone do not (fewer than 12).
async fn an_instance_sees_the_history_another_instance_stored(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let (ev_a, ev_b) = (ev(), ev());
    let day = |d: i64, hour: i64| T0 - 8 * 3600 + d * 86_400 + hour * 3600;
    let readings = |who: &str, hour: i64| -> Vec<Inbound> {
        (7..14)
            .map(|d| {
                reading(bp_message(
                    &format!("{who}-{d}"),
                    "p-0701",
                    138,
                    88,
                    70,
                    day(d, hour),
                ))
            })
            .collect()
    };
    store
        .ingest(readings("a", 20), Arc::clone(&ev_a), "a", 1)
        .await
        .unwrap();
    store
        .ingest(readings("b", 8), Arc::clone(&ev_b), "b", 2)
        .await
        .unwrap();
    store.tick(Arc::clone(&ev_a), day(14, 9)).await.unwrap();
    let rules = alert_rules_of(&store, "p-0701").await.unwrap();
    assert!(
        rules.contains(&"BP_AVG_UNCONTROLLED".to_owned()),
        "A's tick saw only its own readings: {rules:?}"
    );
}

/// Runs `sql` on the database behind `url` (to damage rows as a bug, a bad restore or a hand edit
/// would).
async fn exec_sql(url: &str, sql: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    } else {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = task.await;
    }
}

/// A damaged engine state or history row must not stop ingest: left unacknowledged, the batch — every
/// other patient's readings in it too — would be redelivered for ever. The patient's evaluation goes on
/// without what cannot be read (a crisis value still alerts), and the rows are kept in `bad_messages`.
async fn an_unreadable_state_is_set_aside_and_the_batch_goes_on(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let batch: Vec<Inbound> = (0..3)
        .map(|i| {
            reading(bp_message(
                &format!("bp-{i}"),
                "p-0601",
                130,
                85,
                70,
                T0 + i * 600,
            ))
        })
        .collect();
    store.ingest(batch, ev(), "a", 1).await.unwrap();
    exec_sql(
        url,
        "UPDATE patient_state SET state = '{\"episodes\": 7' WHERE patient = 'p-0601';
         UPDATE bp_history SET entry = 'not json'
           WHERE reading_id = (SELECT min(reading_id) FROM bp_history WHERE patient = 'p-0601');",
    )
    .await;
    // Another instance (or this one restarted) meets the damaged rows.
    let batch = vec![
        reading(glucose_message("g-dmg", "p-0601", 45, T0 + 3_600)),
        reading(glucose_message("g-ok", "p-0602", 110, T0 + 3_600)),
    ];
    let r = store.ingest(batch, ev(), "b", 2).await.unwrap();
    assert!(
        matches!(
            r.as_slice(),
            [Stored::New { alerts: 1.. }, Stored::New { .. }]
        ),
        "both stored, the hypoglycaemia raised: {r:?}"
    );
    let bad = store.bad_messages(10).await.unwrap();
    let mut topics: Vec<&str> = bad.iter().map(|b| b.topic.as_str()).collect();
    topics.sort_unstable();
    assert_eq!(topics, ["bp_history", "patient_state"], "{bad:?}");
    assert!(
        bad.iter().all(|b| !b.error.contains("not json")),
        "the error names what is wrong, not the content: {bad:?}"
    );
    // The next write replaced the state and deleted the damaged row: nothing more is set aside.
    let r = store
        .ingest(
            vec![reading(glucose_message(
                "g-dmg-2",
                "p-0601",
                120,
                T0 + 7_200,
            ))],
            ev(),
            "c",
            3,
        )
        .await
        .unwrap();
    assert!(matches!(r.as_slice(), [Stored::New { .. }]), "{r:?}");
    assert_eq!(store.bad_messages(10).await.unwrap().len(), 2);
}

fn report(payload: String) -> Inbound {
    Inbound {
        topic: "phg/v1/gw-test/symptoms".into(),
        channel: Channel::Symptoms,
        payload: payload.into_bytes(),
        max_len: None,
    }
}

/// `(rule_id, severity, status)` of a patient's alerts.
async fn alert_states(store: &AnyStore, patient: &str) -> Vec<(String, String, String)> {
    store
        .alerts_of(patient, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.rule_id, a.severity, a.status))
        .collect()
}

fn state(rule: &str, severity: &str, status: &str) -> (String, String, String) {
    (rule.into(), severity.into(), status.into())
}

/// Issue 12 item 5: "yes" to the crisis question makes the pending crisis CRITICAL at once, whichever
/// of the reading and the report is stored first (or both in one batch); a redelivered report changes
/// nothing; "yes" to the low-glucose question is GLU_HYPO_L3.
async fn symptom_reports_raise_critical_once_in_either_order(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let crisis = Symptom::CrisisSymptoms;
    // The reading first: pending (URGENT until confirmed), then confirmed by the report.
    let r = store
        .ingest(
            vec![reading(bp_message("bp-1", "p-sym-1", 185, 125, 70, T0))],
            Arc::clone(&ev),
            "a",
            1,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 1 }]);
    assert_eq!(
        alert_states(&store, "p-sym-1").await,
        [state("BP_CRISIS", "URGENT", "pending")]
    );
    let yes = symptoms_message("bp-1", "p-sym-1", &[crisis], T0 + 60);
    let r = store
        .ingest(vec![report(yes.clone())], Arc::clone(&ev), "a", 2)
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 1 }]);
    assert_eq!(
        alert_states(&store, "p-sym-1").await,
        [state("BP_CRISIS", "CRITICAL", "active")]
    );
    let before = store.counts().await.unwrap();
    // Redelivered, alone and twice in one batch (another instance): nothing new.
    let r = store
        .ingest(
            vec![report(yes.clone()), report(yes)],
            Arc::clone(&ev),
            "b",
            3,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::Duplicate, Stored::Duplicate]);
    let after = store.counts().await.unwrap();
    assert_eq!(after, before, "a redelivered report changes nothing");
    assert_eq!(after.symptom_reports, 1);

    // The report first (the reading went to another instance, or the other topic was slower): stored
    // and evaluated (nothing to confirm yet); the reading then comes with its symptoms: CRITICAL.
    let r = store
        .ingest(
            vec![report(symptoms_message(
                "bp-2",
                "p-sym-2",
                &[crisis],
                T0 + 60,
            ))],
            Arc::clone(&ev),
            "a",
            4,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 0 }]);
    let r = store
        .ingest(
            vec![reading(bp_message("bp-2", "p-sym-2", 185, 125, 70, T0))],
            Arc::clone(&ev),
            "a",
            5,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 1 }]);
    assert_eq!(
        alert_states(&store, "p-sym-2").await,
        [state("BP_CRISIS", "CRITICAL", "active")]
    );

    // Both in one batch, in either order: one CRITICAL alert.
    for (n, report_first) in [(3, false), (4, true)] {
        let patient = format!("p-sym-{n}");
        let id = format!("bp-{n}");
        let mut batch = vec![
            reading(bp_message(&id, &patient, 185, 125, 70, T0)),
            report(symptoms_message(&id, &patient, &[crisis], T0 + 60)),
        ];
        if report_first {
            batch.reverse();
        }
        store.ingest(batch, Arc::clone(&ev), "a", 6).await.unwrap();
        assert_eq!(
            alert_states(&store, &patient).await,
            [state("BP_CRISIS", "CRITICAL", "active")],
            "report first: {report_first}"
        );
    }

    // "No" is stored and raises nothing: the crisis stays pending.
    store
        .ingest(
            vec![
                reading(bp_message("bp-5", "p-sym-5", 185, 125, 70, T0)),
                report(symptoms_message("bp-5", "p-sym-5", &[], T0 + 60)),
            ],
            Arc::clone(&ev),
            "a",
            7,
        )
        .await
        .unwrap();
    assert_eq!(
        alert_states(&store, "p-sym-5").await,
        [state("BP_CRISIS", "URGENT", "pending")]
    );

    // A low glucose, then "yes" to the question about severe hypoglycaemia: GLU_HYPO_L3, CRITICAL.
    store
        .ingest(
            vec![reading(glucose_message("glu-6", "p-sym-6", 60, T0))],
            Arc::clone(&ev),
            "a",
            8,
        )
        .await
        .unwrap();
    let r = store
        .ingest(
            vec![report(symptoms_message(
                "glu-6",
                "p-sym-6",
                &[Symptom::SevereHypoglycaemia],
                T0 + 120,
            ))],
            Arc::clone(&ev),
            "a",
            9,
        )
        .await
        .unwrap();
    assert_eq!(r, vec![Stored::New { alerts: 1 }]);
    let alerts = alert_states(&store, "p-sym-6").await;
    assert!(
        alerts.contains(&state("GLU_HYPO_L3", "CRITICAL", "active")),
        "{alerts:?}"
    );
}

/// A report ingest cannot read is recorded with its reason, never misread: another major version, a
/// symptom this version does not know, an id that is not its content's, a gateway or patient that does
/// not fit; an answer from the future is stored and not evaluated; the same report under another
/// patient is a conflict.
async fn bad_symptom_reports_are_recorded_not_misread(url: &str) {
    let store = AnyStore::open(url).await.unwrap();
    let ev = ev();
    let good = symptoms_message("bp-9", "p-bad-9", &[Symptom::CrisisSymptoms], T0 + 60);
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        f(&mut v);
        report(v.to_string())
    };
    let cases: Vec<(Inbound, &str)> = vec![
        (
            edit(&|v| v["schema"] = "phg.symptoms/2".into()),
            "unknown schema: ingest reads phg.symptoms/1",
        ),
        (
            edit(&|v| v["symptoms"] = serde_json::json!(["crisis_symptoms", "palpitations"])),
            "unknown symptom in `symptoms`",
        ),
        (
            edit(&|v| v["symptoms"] = serde_json::json!([])),
            "id is not the report id of its reading_id and symptoms",
        ),
        (
            edit(&|v| v["reading_id"] = "r-1".into()),
            "reading_id is not a version 5 UUID",
        ),
        (
            edit(&|v| v["gateway"] = "gw-other".into()),
            "gateway differs from the topic's gateway",
        ),
        (
            edit(&|v| v["patient"] = "Jane Doe".into()),
            "patient is not a pseudonymous id",
        ),
        (
            edit(&|v| v["answered"] = "yesterday".into()),
            "answered is not RFC 3339 UTC",
        ),
        (
            edit(&|v| {
                v.as_object_mut().unwrap().remove("symptoms");
            }),
            "not a phg.symptoms/1 message",
        ),
        (report("{not json".into()), "not a phg.symptoms/1 message"),
    ];
    let n = cases.len();
    let (batch, reasons): (Vec<Inbound>, Vec<&str>) = cases.into_iter().unzip();
    let r = store.ingest(batch, Arc::clone(&ev), "a", 1).await.unwrap();
    for (got, want) in r.iter().zip(&reasons) {
        assert!(
            matches!(got, Stored::Bad(e) if e.contains(want)),
            "want {want:?}, got {got:?}"
        );
    }
    let c = store.counts().await.unwrap();
    assert_eq!((c.bad_messages, c.symptom_reports), (n as i64, 0), "{c:?}");
    let bad = store.bad_messages(100).await.unwrap();
    assert!(bad.iter().all(|b| b.topic == "phg/v1/gw-test/symptoms"));

    // From the future (past the skew ingest allows readings): stored, not evaluated.
    let now = ingest::now_ms() / 1000;
    let future = symptoms_message("bp-9", "p-bad-9", &[Symptom::CrisisSymptoms], now + 3600);
    let r = store
        .ingest(
            vec![
                reading(bp_message("bp-9", "p-bad-9", 185, 125, 70, T0)),
                report(future),
            ],
            Arc::clone(&ev),
            "a",
            2,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        vec![
            Stored::New { alerts: 1 },
            Stored::Rejected("rejected: time_in_future: answered".into())
        ]
    );
    assert_eq!(
        alert_states(&store, "p-bad-9").await,
        [state("BP_CRISIS", "URGENT", "pending")],
        "a report from the future raises nothing"
    );
    // The same report (same id) under another patient: a conflict, kept for inspection.
    let other = edit(&|v| v["patient"] = "p-bad-10".into());
    store
        .ingest(vec![report(good.clone())], Arc::clone(&ev), "a", 3)
        .await
        .unwrap();
    let r = store
        .ingest(vec![other], Arc::clone(&ev), "a", 4)
        .await
        .unwrap();
    assert!(
        matches!(&r[0], Stored::Bad(e) if e.starts_with("conflict")),
        "{r:?}"
    );
}

// ------------------------------------------------------------------------------------------------------
// SQLite: one test per scenario
// ------------------------------------------------------------------------------------------------------

macro_rules! sqlite_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (_dir, url) = super::sqlite_url();
                    super::$name(&url).await;
                }
            )*
        }
    };
}

sqlite_tests!(
    duplicate_reading_is_stored_once_and_alerts_once,
    two_instances_on_one_database_never_double_store_or_alert,
    outbox_rows_are_leased_to_one_deliverer,
    bad_messages_are_kept_not_stored_as_readings,
    conflicts_are_recorded_and_impossible_values_rejected,
    acknowledge_and_patient_queries,
    window_rules_run_on_tick,
    symptom_reports_raise_critical_once_in_either_order,
    bad_symptom_reports_are_recorded_not_misread,
    an_unreadable_state_is_set_aside_and_the_batch_goes_on,
    an_instance_sees_the_history_another_instance_stored,
);

// ------------------------------------------------------------------------------------------------------
// PostgreSQL: one server, a database per scenario
// ------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runs_the_same_storage_scenarios() {
    let Some(pg) = TempPostgres::start(false).expect("PostgreSQL is installed but did not start")
    else {
        println!("postgres_runs_the_same_storage_scenarios: {SKIP_MESSAGE}");
        return;
    };
    let t = std::time::Instant::now();
    let mut n = 0;
    let mut db = || {
        n += 1;
        format!("t{n}")
    };
    duplicate_reading_is_stored_once_and_alerts_once(&pg.create_database(&db()).await.unwrap())
        .await;
    two_instances_on_one_database_never_double_store_or_alert(
        &pg.create_database(&db()).await.unwrap(),
    )
    .await;
    outbox_rows_are_leased_to_one_deliverer(&pg.create_database(&db()).await.unwrap()).await;
    bad_messages_are_kept_not_stored_as_readings(&pg.create_database(&db()).await.unwrap()).await;
    conflicts_are_recorded_and_impossible_values_rejected(
        &pg.create_database(&db()).await.unwrap(),
    )
    .await;
    acknowledge_and_patient_queries(&pg.create_database(&db()).await.unwrap()).await;
    window_rules_run_on_tick(&pg.create_database(&db()).await.unwrap()).await;
    symptom_reports_raise_critical_once_in_either_order(&pg.create_database(&db()).await.unwrap())
        .await;
    bad_symptom_reports_are_recorded_not_misread(&pg.create_database(&db()).await.unwrap()).await;
    an_unreadable_state_is_set_aside_and_the_batch_goes_on(
        &pg.create_database(&db()).await.unwrap(),
    )
    .await;
    an_instance_sees_the_history_another_instance_stored(&pg.create_database(&db()).await.unwrap())
        .await;
    println!("postgres: 11 storage scenarios passed in {:?}", t.elapsed());
}
