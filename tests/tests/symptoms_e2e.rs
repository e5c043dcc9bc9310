//! Symptoms on the real path to the CRM (issue 12 item 5): Mosquitto → the real `ingest` binary (SQLite)
//! → its webhook and its MQTT alerts topic, both received by this test.
//!
//! A crisis-range blood pressure is alerted `pending` (URGENT until a repeat confirms it, CLINICAL.md
//! §4.2). The patient's "yes" to the kiosk's question, a `phg.symptoms/1` report built by the same
//! `protocol::wire` code the gateway uses, must make it CRITICAL at once — not 15 minutes later at the
//! confirmation timeout — and be pushed to the webhook and the alerts topic once, however often the
//! report is redelivered. A report of another major version, or naming a symptom this version does not
//! know, is recorded in `bad_messages` with its reason and raises nothing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ingest::outbox::EVENT_ID_HEADER;
use ingest::store::{AnyStore, Store};
use ingest::testing::{bp_message, glucose_message, reading_uuid, symptoms_message};
use phg_tests::process::{GatewayProcess, ingest_bin};
use phg_tests::{Publisher, Subscriber, TestBroker, until};
use protocol::rules::Symptom;
use serde_json::Value;

const READINGS: &str = "phg/v1/gw-test/readings";
const SYMPTOMS: &str = "phg/v1/gw-test/symptoms";
const ALERTS: &str = "crm/symptoms-e2e/alerts";
const ACK: Duration = Duration::from_secs(10);

fn now_s() -> i64 {
    ingest::now_ms() / 1000
}

/// The webhook receiver: every delivery's event id and body.
#[derive(Debug, Default)]
struct Deliveries(Mutex<Vec<(String, Value)>>);

async fn receive(State(d): State<Arc<Deliveries>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    d.0.lock().unwrap().push((id, v));
    StatusCode::NO_CONTENT
}

async fn webhook() -> (Arc<Deliveries>, String) {
    let d = Arc::new(Deliveries::default());
    let app = axum::Router::new()
        .route("/alerts", axum::routing::post(receive))
        .with_state(Arc::clone(&d));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (d, url)
}

fn config(broker: &TestBroker, data_dir: &Path, webhook: &str) -> String {
    format!(
        "data_dir = {:?}\ninstance = \"symptoms-e2e\"\n\
         [mqtt]\nbroker = \"{}\"\nkeep_alive_s = 5\nalerts_topic = \"{ALERTS}\"\n\
         [webhook]\nurl = \"{webhook}\"\nsecret = \"symptoms-webhook-secret-0123\"\ntimeout_s = 2\n\
         initial_backoff_ms = 100\nmax_backoff_s = 1\n[outbox]\nlease_s = 3\npoll_ms = 50\n",
        data_dir.display().to_string(),
        broker.url()
    )
}

/// The `(action, rule_id, severity, status)` of a notice, and its `detail`.
fn decision(notice: &Value) -> ((String, String, String, String), Value) {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let a = &notice["alert"];
    (
        (
            s(&notice["action"]),
            s(&a["rule_id"]),
            s(&a["severity"]),
            s(&a["status"]),
        ),
        notice["detail"].clone(),
    )
}

fn critical_by_symptoms(notice: &Value, rule: &str) -> bool {
    let ((_, rule_id, severity, status), _) = decision(notice);
    (rule_id.as_str(), severity.as_str(), status.as_str()) == (rule, "CRITICAL", "active")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yes_to_the_crisis_question_is_critical_at_once_and_pushed_once() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto_with("") else {
        println!("symptoms e2e: skipped: needs Mosquitto");
        return;
    };
    let broker = broker.unwrap();
    let (hook, hook_url) = webhook().await;
    let mut pushed = Subscriber::connect(broker.addr(), ALERTS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config_path = dir.path().join("ingest.toml");
    std::fs::write(&config_path, config(&broker, &data, &hook_url)).unwrap();
    let ingest = GatewayProcess::spawn_exe(
        &ingest_bin(),
        &["run".as_ref(), "--config".as_ref(), config_path.as_os_str()],
    )
    .unwrap();
    let url = format!("sqlite://{}", data.join("ingest.sqlite").display());
    assert!(
        until(Duration::from_secs(10), async || AnyStore::open(&url)
            .await
            .is_ok())
        .await,
        "no database at {url}"
    );
    let store = AnyStore::open(&url).await.unwrap();

    // A shared subscription keeps nothing for its group before it subscribes: a probe until stored.
    let mut publisher = Publisher::connect(broker.addr());
    let probe = glucose_message("probe", "p-probe-1", 100, now_s() - 60);
    let subscribed = until(Duration::from_secs(30), async || {
        publisher
            .publish(READINGS, probe.clone(), ACK)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .reading(&reading_uuid("probe"))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    assert!(
        subscribed,
        "ingest never stored the probe reading; ingest log:\n{}",
        ingest.stderr().text()
    );

    // The kiosk's crisis reading: alerted pending, its confirmation window 15 minutes.
    let measured = now_s() - 20;
    publisher
        .publish(
            READINGS,
            bp_message("kiosk-bp-1", "p-kiosk-1", 186, 124, 88, measured),
            ACK,
        )
        .await
        .unwrap();
    let pending = until(Duration::from_secs(15), async || {
        hook.0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, n)| n["alert"]["status"] == "pending")
    })
    .await;
    assert!(pending, "the crisis reading was not alerted pending");
    let opened = hook.0.lock().unwrap().clone();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(
        decision(&opened[0].1).0,
        (
            "open".into(),
            "BP_CRISIS".into(),
            "URGENT".into(),
            "pending".into()
        )
    );

    // "Yes": CRITICAL at once, confirmed by the symptoms.
    let yes = symptoms_message(
        "kiosk-bp-1",
        "p-kiosk-1",
        &[Symptom::CrisisSymptoms],
        now_s(),
    );
    let t = Instant::now();
    publisher.publish(SYMPTOMS, yes.clone(), ACK).await.unwrap();
    let critical = until(Duration::from_secs(15), async || {
        hook.0
            .lock()
            .unwrap()
            .iter()
            .any(|(_, n)| critical_by_symptoms(n, "BP_CRISIS"))
    })
    .await;
    let latency = t.elapsed();
    assert!(
        critical,
        "no CRITICAL alert 15 s after the report; ingest log:\n{}",
        ingest.stderr().text()
    );
    println!("symptoms e2e: report published → CRITICAL alert at the webhook in {latency:?}");
    // At once: seconds, not the 15 minutes of the confirmation window.
    assert!(latency < Duration::from_secs(10), "{latency:?}");

    // Redelivered twice more (a gateway's journal replayed after a lost PUBACK): nothing new.
    publisher.publish(SYMPTOMS, yes.clone(), ACK).await.unwrap();
    publisher.publish(SYMPTOMS, yes, ACK).await.unwrap();
    // A report ingest must not read: another major version, and a symptom it does not know.
    let mut v2: Value = serde_json::from_str(&symptoms_message(
        "kiosk-bp-1",
        "p-kiosk-1",
        &[Symptom::CrisisSymptoms],
        now_s(),
    ))
    .unwrap();
    v2["schema"] = "phg.symptoms/2".into();
    publisher
        .publish(SYMPTOMS, v2.to_string(), ACK)
        .await
        .unwrap();
    let mut unknown: Value = serde_json::from_str(&symptoms_message(
        "kiosk-glu-1",
        "p-kiosk-2",
        &[Symptom::SevereHypoglycaemia],
        now_s(),
    ))
    .unwrap();
    unknown["symptoms"] = serde_json::json!(["severe_hypoglycaemia", "palpitations"]);
    publisher
        .publish(SYMPTOMS, unknown.to_string(), ACK)
        .await
        .unwrap();
    let recorded = until(Duration::from_secs(15), async || {
        store.bad_messages(10).await.unwrap().len() >= 2
    })
    .await;
    assert!(recorded, "the bad reports were not recorded");
    // Time for a second alert, if one were (wrongly) coming.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let bad = store.bad_messages(10).await.unwrap();
    let reasons: Vec<&str> = bad.iter().map(|b| b.error.as_str()).collect();
    assert_eq!(bad.len(), 2, "{reasons:?}");
    assert!(bad.iter().all(|b| b.topic == SYMPTOMS));
    assert!(
        reasons.contains(&"unknown schema: ingest reads phg.symptoms/1"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("unknown symptom in `symptoms`")),
        "{reasons:?}"
    );
    let c = store.counts().await.unwrap();
    assert_eq!(c.symptom_reports, 1, "stored once: {c:?}");

    let got = hook.0.lock().unwrap().clone();
    let decisions: Vec<_> = got.iter().map(|(_, n)| decision(n).0).collect();
    assert_eq!(
        decisions,
        [
            (
                "open".into(),
                "BP_CRISIS".into(),
                "URGENT".into(),
                "pending".into()
            ),
            (
                "confirm".into(),
                "BP_CRISIS".into(),
                "CRITICAL".into(),
                "active".into()
            ),
        ],
        "one open, one confirmation, nothing for the redeliveries or the bad reports"
    );
    assert_eq!(decision(&got[1].1).1["by"], "symptoms");
    let mut ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    // The MQTT alerts topic carries the same two events, once each.
    let mut on_mqtt: Vec<String> = pushed
        .collect_for(Duration::from_secs(1))
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter_map(|v| v["event_id"].as_str().map(str::to_owned))
        .collect();
    on_mqtt.sort_unstable();
    assert_eq!(on_mqtt, ids, "the alerts topic: the same events, once each");
    let alerts = store.alerts_of("p-kiosk-1", 10).await.unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        (alerts[0].severity.as_str(), alerts[0].status.as_str()),
        ("CRITICAL", "active")
    );
    drop(ingest);
}
