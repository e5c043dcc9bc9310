//! The whole path to the CRM: simulated devices → the real `gateway` binary → Mosquitto → **two ingest
//! instances** (in this process, each with its own MQTT session and database connections, sharing the
//! stream through a shared subscription and one database) → a webhook receiver inside the test.
//!
//! What is checked is what the CRM relies on: every reading the gateway published is stored exactly once
//! (both instances took part); every alert event reaches the webhook exactly once with a valid
//! HMAC-SHA256 signature, and the MQTT alerts topic too; while the webhook is down (HTTP 503) nothing is
//! lost — the outbox retries with backoff and everything arrives once it is up.
//!
//! Runs on SQLite, and on PostgreSQL when installed (the test starts its own server; skipped otherwise).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ingest::config::Config;
use ingest::outbox::{EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature};
use ingest::store::Store;
use ingest::testing::{SKIP_MESSAGE, TempPostgres, glucose_message, reading_uuid};
use phg_tests::process::GatewayProcess;
use phg_tests::{BrokerKind, Subscriber, TestBroker};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

const SECRET: &str = "e2e-webhook-secret-0123456789";

// ------------------------------------------------------------------------------------------------------
// The webhook receiver
// ------------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Hook {
    /// false: answer 503 (the CRM is down).
    up: AtomicBool,
    /// Requests refused while down.
    refused: AtomicUsize,
    /// Accepted deliveries: (event id header, body).
    got: Mutex<Vec<(String, Value)>>,
    /// Deliveries whose signature did not verify.
    bad_signatures: AtomicUsize,
}

async fn hook(State(h): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if !h.up.load(Ordering::SeqCst) {
        h.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let sig = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !verify_signature(SECRET.as_bytes(), &body, sig) {
        h.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    let id = headers
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    h.got.lock().unwrap().push((id, v));
    StatusCode::NO_CONTENT
}

async fn start_hook() -> (Arc<Hook>, String) {
    let h = Arc::new(Hook::default());
    let app = axum::Router::new()
        .route("/alerts", axum::routing::post(hook))
        .with_state(Arc::clone(&h));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (h, url)
}

// ------------------------------------------------------------------------------------------------------
// Configurations
// ------------------------------------------------------------------------------------------------------

fn ingest_config(instance: &str, broker: &TestBroker, db: &str, hook: &str, group: &str) -> Config {
    let text = format!(
        "instance = \"{instance}\"\n\
         [mqtt]\nbroker = \"{}\"\ngroup = \"{group}\"\nalerts_topic = \"crm/{group}/alerts\"\nkeep_alive_s = 5\nmax_batch = 64\n\
         [database]\nurl = \"{db}\"\n\
         [rules]\nwindow_interval_s = 3600\n\
         [webhook]\nurl = \"{hook}\"\nsecret = \"{SECRET}\"\ntimeout_s = 2\ninitial_backoff_ms = 200\nmax_backoff_s = 1\n\
         [outbox]\nlease_s = 10\npoll_ms = 100\n\
         [api]\nlisten = \"127.0.0.1:0\"\ntoken = \"e2e-api-token-0123456789\"\n",
        broker.url()
    );
    Config::parse(&text, Path::new("ingest-e2e.toml")).unwrap()
}

fn gateway_config(gw: &str, broker: &TestBroker, journal: &Path, stored: usize) -> String {
    format!(
        "gateway_id = \"{gw}\"\n\n[mqtt]\nbroker = \"{}\"\nkeep_alive_s = 5\n\n[journal]\ndir = {:?}\n\n\
         [[simulated]]\nkind = \"glucometer\"\nid = \"meter-1\"\nstored = {stored}\nconnect_every_s = 1\n\n\
         [[simulated]]\nkind = \"cuff\"\nid = \"cuff-1\"\nusers = [1, 2]\nstored = 6\nconnect_every_s = 1\n\n\
         [[bindings]]\ndevice = \"meter-1\"\npatient = \"p-glu-0001\"\n\n\
         [[bindings]]\ndevice = \"cuff-1\"\nuser_id = 1\npatient = \"p-bp-0001\"\n\n\
         [[bindings]]\ndevice = \"cuff-1\"\nuser_id = 2\npatient = \"p-bp-0002\"\n",
        broker.url(),
        journal.display().to_string()
    )
}

fn now_s() -> i64 {
    ingest::now_ms() / 1000
}

use phg_tests::until;

// ------------------------------------------------------------------------------------------------------
// The scenario
// ------------------------------------------------------------------------------------------------------

async fn devices_to_webhook_once_each(db_url: &str, label: &str) {
    phg_tests::init_tracing();
    let t0 = Instant::now();
    let broker = TestBroker::start().unwrap();
    if broker.kind() != BrokerKind::Mosquitto {
        println!("{label}: skipped: needs Mosquitto (shared subscriptions with manual acks)");
        return;
    }
    let group = phg_tests::unique_id("grp").replace('-', "_");
    let gw = "gw-ingest-e2e";
    let (hook, hook_url) = start_hook().await;
    // Everything the gateway publishes, seen by a plain (non-shared) subscriber: the expected set.
    let mut published = Subscriber::connect(broker.addr(), &format!("phg/v1/{gw}/readings"))
        .await
        .unwrap();
    let mut mqtt_alerts = Subscriber::connect(broker.addr(), &format!("crm/{group}/alerts"))
        .await
        .unwrap();

    let a = ingest::service::start(ingest_config(
        "ingest-a", &broker, db_url, &hook_url, &group,
    ))
    .await
    .unwrap();
    let b = ingest::service::start(ingest_config(
        "ingest-b", &broker, db_url, &hook_url, &group,
    ))
    .await
    .unwrap();
    // Both subscribed before anything is published (a shared subscription has no backlog before it).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The webhook is down from the start.
    let dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::run(
        &dir.path().join("gateway.toml"),
        &gateway_config(gw, &broker, &dir.path().join("journal"), 120),
    )
    .unwrap();
    // Plus a second "gateway" sending hypoglycaemic readings, each published twice (a redelivery): five
    // CRITICAL alerts for certain, whatever the simulator's values.
    let mut opts = MqttOptions::new(
        phg_tests::unique_id("crafted"),
        "127.0.0.1",
        broker.addr().port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let t = now_s() - 3600;
    let mut crafted = BTreeSet::new();
    for i in 0..5 {
        let id = reading_uuid(&format!("crafted-hypo-{i}"));
        let payload = glucose_message(&id, &format!("p-hypo-{i:03}"), 45, t + i64::from(i));
        crafted.insert(id);
        for _ in 0..2 {
            client
                .publish(
                    "phg/v1/gw-test/readings",
                    QoS::AtLeastOnce,
                    false,
                    payload.clone(),
                )
                .await
                .unwrap();
        }
    }

    // Every reading the gateway publishes, stored once.
    let store = a.store().clone();
    let stored_all = until(Duration::from_secs(40), async || {
        let ids: BTreeSet<String> = published
            .received()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        let c = store.counts().await.unwrap();
        ids.len() >= 126 && c.readings as usize == ids.len() + crafted.len()
    })
    .await;
    println!("{label}: stored after {:?}", t0.elapsed());
    let exit = gateway.terminate(Duration::from_secs(15)).await.unwrap();
    println!("{label}: gateway stopped after {:?}", t0.elapsed());
    let published_ids: BTreeSet<String> = published
        .received()
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    let c = store.counts().await.unwrap();
    assert!(
        stored_all,
        "{label}: stored {} readings, gateway published {} distinct (+{} crafted); {exit:?}",
        c.readings,
        published_ids.len(),
        crafted.len()
    );
    // Stored exactly once each, and exactly these.
    let mut by_instance: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored_ids = BTreeSet::new();
    for p in ["p-glu-0001", "p-bp-0001", "p-bp-0002"]
        .into_iter()
        .map(str::to_owned)
        .chain((0..5).map(|i| format!("p-hypo-{i:03}")))
    {
        for r in store.readings_of(&p, 1000).await.unwrap() {
            *by_instance.entry(r.instance.clone()).or_default() += 1;
            assert!(
                stored_ids.insert(r.id.clone()),
                "{label}: {} stored twice",
                r.id
            );
        }
    }
    let expected: BTreeSet<String> = published_ids.union(&crafted).cloned().collect();
    assert_eq!(stored_ids, expected, "{label}: stored = published");
    assert_eq!(
        by_instance.len(),
        2,
        "{label}: both instances took part (shared subscription): {by_instance:?}"
    );

    // Alerts: at least the five hypos; nothing delivered while the webhook is down.
    let c = store.counts().await.unwrap();
    assert!(c.alert_events >= 5, "{label}: {c:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(hook.got.lock().unwrap().is_empty());
    let refused = hook.refused.load(Ordering::SeqCst);
    assert!(refused > 0, "{label}: deliveries were attempted while down");
    // Up again: everything arrives, once.
    hook.up.store(true, Ordering::SeqCst);
    let delivered = until(Duration::from_secs(20), async || {
        let c = store.counts().await.unwrap();
        c.outbox_pending == 0 && hook.got.lock().unwrap().len() as i64 >= c.notified_events
    })
    .await;
    let c = store.counts().await.unwrap();
    let got = hook.got.lock().unwrap().clone();
    assert!(delivered, "{label}: {c:?}, webhook got {}", got.len());
    println!("{label}: delivered after {:?}", t0.elapsed());
    // A moment more: nothing arrives twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = hook.got.lock().unwrap().clone();
    let ids: BTreeSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len(),
        got.len(),
        "{label}: an alert event reached the webhook twice"
    );
    // Every event at or above the push threshold (INFO changes are stored, not pushed: CLINICAL.md
    // §4.1).
    assert_eq!(
        got.len() as i64,
        c.notified_events,
        "{label}: every notified alert event delivered"
    );
    assert_eq!(hook.bad_signatures.load(Ordering::SeqCst), 0);
    for (id, body) in &got {
        assert_eq!(body["event_id"].as_str(), Some(id.as_str()));
        assert_eq!(body["schema"], "phg.ingest.alert/1");
    }
    let hypo_alerts = got
        .iter()
        .filter(|(_, b)| b["alert"]["rule_id"] == "GLU_HYPO_L2" && b["action"] == "open")
        .count();
    assert_eq!(
        hypo_alerts, 5,
        "{label}: one open per crafted hypo, the duplicates raised none"
    );
    // The MQTT alerts topic: the same events.
    let mqtt: BTreeSet<String> = mqtt_alerts
        .wait_for(got.len(), Duration::from_secs(10))
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter_map(|v| v["event_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(mqtt, ids.iter().map(|s| (*s).to_owned()).collect());

    poller.abort();
    a.stop().await;
    b.stop().await;
    println!(
        "{label}: {} readings stored once ({by_instance:?}), {} alert events delivered once to the webhook \
         after {refused} refused attempts, and on MQTT; {:?}",
        stored_ids.len(),
        got.len(),
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_instances_store_once_and_deliver_alerts_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ingest.sqlite").display());
    devices_to_webhook_once_each(&url, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_instances_store_once_and_deliver_alerts_once() {
    let Some(pg) = TempPostgres::start(false).expect("PostgreSQL is installed but did not start")
    else {
        println!("postgres_two_instances_store_once_and_deliver_alerts_once: {SKIP_MESSAGE}");
        return;
    };
    let url = pg.create_database("e2e").await.unwrap();
    devices_to_webhook_once_each(&url, "postgres").await;
}

/// A restart loses nothing: with the webhook down, an instance stores readings and queues their alerts,
/// then stops; readings published while it is away wait in its broker session; restarted (same
/// instance id, same database) with the webhook up, it stores those too and delivers every alert event
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_webhook_down_loses_nothing() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    if broker.kind() != BrokerKind::Mosquitto {
        println!("restart_with_webhook_down_loses_nothing: skipped: needs Mosquitto");
        return;
    }
    let group = phg_tests::unique_id("grp").replace('-', "_");
    let (hook, hook_url) = start_hook().await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ingest.sqlite").display());
    let cfg = || ingest_config("ingest-r", &broker, &db, &hook_url, &group);
    let first = ingest::service::start(cfg()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut opts = MqttOptions::new(
        phg_tests::unique_id("pub"),
        "127.0.0.1",
        broker.addr().port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let t = now_s() - 3600;
    let publish = async |from: i64, to: i64| {
        for i in from..to {
            let payload = glucose_message(&format!("r-{i}"), &format!("p-r-{i:03}"), 45, t + i);
            client
                .publish("phg/v1/gw-test/readings", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    };
    publish(0, 5).await;
    let store = first.store().clone();
    assert!(
        until(Duration::from_secs(10), async || {
            store.counts().await.unwrap().readings == 5 && hook.refused.load(Ordering::SeqCst) > 0
        })
        .await,
        "{:?}",
        store.counts().await.unwrap()
    );
    first.stop().await;
    // Published while no instance runs: kept in the instance's persistent session.
    publish(5, 8).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.counts().await.unwrap().readings, 5);

    hook.up.store(true, Ordering::SeqCst);
    let second = ingest::service::start(cfg()).await.unwrap();
    let store = second.store().clone();
    let done = until(Duration::from_secs(20), async || {
        let c = store.counts().await.unwrap();
        c.readings == 8 && c.outbox_pending == 0 && hook.got.lock().unwrap().len() >= 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = store.counts().await.unwrap();
    let got = hook.got.lock().unwrap().clone();
    assert!(done, "{c:?}, webhook got {}", got.len());
    let ids: BTreeSet<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "delivered twice");
    assert_eq!(
        got.len() as i64,
        c.notified_events,
        "every notified alert event delivered: {c:?}"
    );
    let opened = got.iter().filter(|(_, b)| b["action"] == "open").count();
    assert_eq!(opened, 8, "one alert per hypo");
    // The restart's first tick escalated the five unacknowledged CRITICAL alerts of an hour ago to the
    // next tier (CLINICAL.md §4.3: 30 min): delivered too, once.
    let escalated = got
        .iter()
        .filter(|(_, b)| b["action"] == "escalate")
        .count();
    assert_eq!(got.len(), opened + escalated, "{got:?}");
    poller.abort();
    second.stop().await;
}
