//! Ingest under outside attack (issue 11; DESIGN.md promise 9), against real Mosquitto and a real ingest:
//!
//! - a hostile publisher: impossible values and times, unknown schema versions, ids that are not
//!   version 5 UUIDs, a gateway that is not the topic's, one id with two contents, truncated and
//!   non-JSON payloads, and sizes from 10 KiB to beyond the broker's limit, on `…/readings` and
//!   `…/events`. Each message must end as a stored reading, a stored-and-rejected reading or a
//!   recorded bad message, nothing may be alerted on, and a good reading published after the batch
//!   must be stored (no single message stops ingestion);
//! - the `ingest` binary with the **default** instance, killed with SIGKILL, readings published while
//!   it is down, restarted: every one stored;
//! - a SIGKILL loop during batches: no reading lost, no alert raised twice, no webhook event but
//!   redeliveries of the same event id;
//! - its SQLite database on a full filesystem (a tmpfs the test mounts, as root): nothing acknowledged
//!   that is not stored, and everything stored once space returns.
//!
//! Each needs Mosquitto (shared subscriptions, persistent sessions, a message size limit) and says
//! "skipped" without it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ingest::config::Config;
use ingest::outbox::EVENT_ID_HEADER;
use ingest::store::{AnyStore, Store};
use ingest::testing::{bp_message, glucose_message, reading_uuid};
use phg_tests::process::{GatewayProcess, ingest_bin};
use phg_tests::{Publisher, TestBroker, until};
use serde_json::{Value, json};

/// The topics of the test gateway (`ingest::testing::TEST_GATEWAY`).
const READINGS: &str = "phg/v1/gw-test/readings";
const EVENTS: &str = "phg/v1/gw-test/events";
/// What the test broker accepts at most (Mosquitto `message_size_limit`), above ingest's default
/// `mqtt.max_message_size` (256 KiB) so that messages between the two reach ingest.
const BROKER_LIMIT: usize = 1 << 20;
const ACK: Duration = Duration::from_secs(10);

fn now_s() -> i64 {
    ingest::now_ms() / 1000
}

fn mosquitto(extra: &str, label: &str) -> Option<TestBroker> {
    match TestBroker::start_mosquitto_with(extra) {
        Some(b) => Some(b.unwrap()),
        None => {
            println!("{label}: skipped: needs Mosquitto");
            None
        }
    }
}

/// A JSON message changed by `f`.
fn edit(message: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(message).unwrap();
    f(&mut v);
    v.to_string()
}

/// Publishes a good reading until ingest has stored it: then its subscription exists (a shared
/// subscription keeps nothing for a group before its first member subscribes).
async fn wait_until_subscribed(publisher: &mut Publisher, store: &AnyStore, name: &str) {
    let id = reading_uuid(name);
    let message = glucose_message(name, "p-probe-1", 100, now_s() - 60);
    let stored = until(Duration::from_secs(30), async || {
        publisher
            .publish(READINGS, message.clone(), ACK)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.reading(&id).await.unwrap().is_some()
    })
    .await;
    assert!(stored, "ingest never stored the probe reading");
}

// ------------------------------------------------------------------------------------------------------
// The hostile publisher
// ------------------------------------------------------------------------------------------------------

/// How one hostile message must end.
#[derive(Debug)]
enum Outcome {
    /// Stored under this id; rejected with a reason containing the text, or accepted (`None`).
    Reading(String, Option<&'static str>),
    /// Recorded in `bad_messages` with an error containing the text.
    Bad(&'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_end_stored_or_recorded_and_ingestion_goes_on() {
    phg_tests::init_tracing();
    let label = "hostile";
    let Some(broker) = mosquitto(&format!("message_size_limit {BROKER_LIMIT}"), label) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(
        &format!(
            "data_dir = {:?}\n[mqtt]\nbroker = \"{}\"\nkeep_alive_s = 5\n",
            dir.path().display().to_string(),
            broker.url()
        ),
        Path::new("hostile.toml"),
    )
    .unwrap();
    let running = ingest::service::start(cfg).await.unwrap();
    let store = running.store().clone();
    let mut publisher = Publisher::connect(broker.addr());
    wait_until_subscribed(&mut publisher, &store, "probe").await;

    let t = now_s() - 3600;
    let good = |name: &str, patient: &str| glucose_message(name, patient, 100, t);
    let pad = |name: &str, bytes: usize| {
        edit(&good(name, "p-pad-1"), |v| {
            v["pad"] = json!("x".repeat(bytes))
        })
    };
    let glucose = |name: &str, value: Value| {
        edit(&good(name, "p-hostile-1"), |v| {
            v["glucose"]["value"] = value
        })
    };
    let bp = |name: &str, sys: Value, dia: Value| {
        edit(&bp_message(name, "p-hostile-1", 120, 80, 70, t), |v| {
            v["blood_pressure"]["systolic"] = sys;
            v["blood_pressure"]["diastolic"] = dia;
        })
    };
    let reading = |name: &str, why: Option<&'static str>| Outcome::Reading(reading_uuid(name), why);
    let far_future = "9999-12-31T00:00:00Z";
    let event = json!({"schema": "phg.event/1", "gateway": "gw-test", "time": "2026-11-23T08:00:00Z",
        "event": {"kind": "device_error"}});

    let mut batch: Vec<(&str, Vec<u8>, Outcome)> = vec![
        // Impossible values: stored as rejected, never evaluated (glucose −5 opened a CRITICAL alert).
        (
            READINGS,
            glucose("neg", json!(-5)).into(),
            reading("neg", Some("out_of_range: glucose")),
        ),
        (
            READINGS,
            glucose("zero", json!(0)).into(),
            reading("zero", Some("out_of_range: glucose")),
        ),
        (
            READINGS,
            glucose("huge", json!(1e308)).into(),
            reading("huge", Some("glucose.value")),
        ),
        (
            READINGS,
            bp("bp900", json!(900), json!(10)).into(),
            reading("bp900", Some("out_of_range: systolic")),
        ),
        (
            READINGS,
            bp("bpneg", json!(-120), json!(-80)).into(),
            reading("bpneg", Some("out_of_range: systolic")),
        ),
        (
            READINGS,
            bp("bp0", json!(0), json!(0)).into(),
            reading("bp0", Some("out_of_range: systolic")),
        ),
        // Impossible times: a far-future received time confirmed open alerts.
        (
            READINGS,
            edit(&good("future", "p-hostile-1"), |v| {
                v["time"]["received"] = json!(far_future);
                v["time"]["corrected"] = json!(far_future);
            })
            .into(),
            reading("future", Some("time_in_future: time.received")),
        ),
        (
            READINGS,
            edit(&good("ahead", "p-hostile-1"), |v| {
                v["time"]["corrected"] = json!(far_future)
            })
            .into(),
            reading("ahead", Some("time_in_future: time.corrected")),
        ),
        (
            READINGS,
            edit(&good("badtime", "p-hostile-1"), |v| {
                v["time"]["received"] = json!("yesterday")
            })
            .into(),
            Outcome::Bad("time.received"),
        ),
        // Not the contract.
        (
            READINGS,
            edit(&good("v2", "p-hostile-1"), |v| {
                v["schema"] = json!("phg.reading/2")
            })
            .into(),
            Outcome::Bad("unknown schema"),
        ),
        (
            READINGS,
            edit(&good("x", "p-hostile-1"), |v| v["id"] = json!("not-a-uuid")).into(),
            Outcome::Bad("version 5 UUID"),
        ),
        (
            READINGS,
            edit(&good("x", "p-hostile-1"), |v| {
                v["id"] = json!("0b8e7a3c-1f2d-4c5b-8a9e-0123456789ab") // version 4
            })
            .into(),
            Outcome::Bad("version 5 UUID"),
        ),
        (
            READINGS,
            edit(&good("othergw", "p-hostile-1"), |v| {
                v["gateway"] = json!("gw-other")
            })
            .into(),
            Outcome::Bad("topic's gateway"),
        ),
        (
            READINGS,
            good("name", "Jane Doe").into(),
            Outcome::Bad("pseudonymous"),
        ),
        // One id, two contents: the first stored, the second recorded as a conflict.
        (
            READINGS,
            good("twice", "p-twice-1").into(),
            reading("twice", None),
        ),
        (
            READINGS,
            good("twice", "p-twice-1").into(),
            reading("twice", None),
        ),
        (
            READINGS,
            edit(&good("twice", "p-twice-1"), |v| {
                v["glucose"]["value"] = json!(180)
            })
            .into(),
            Outcome::Bad("conflict"),
        ),
        // Broken payloads.
        (
            READINGS,
            good("cut", "p-hostile-1")[..40].into(),
            Outcome::Bad("truncated"),
        ),
        (
            READINGS,
            b"\xff\xfe\x00binary".to_vec(),
            Outcome::Bad("UTF-8"),
        ),
        (READINGS, Vec::new(), Outcome::Bad("truncated")),
        (
            READINGS,
            b"[1, 2, 3]".to_vec(),
            Outcome::Bad("phg.reading/1"),
        ),
        (EVENTS, b"{\"event\": ".to_vec(), Outcome::Bad("truncated")),
        (
            EVENTS,
            b"\"a string\"".to_vec(),
            Outcome::Bad("JSON object"),
        ),
        (
            EVENTS,
            edit(&event.to_string(), |v| v["gateway"] = json!("gw-other")).into(),
            Outcome::Bad("topic's gateway"),
        ),
        (
            EVENTS,
            edit(&event.to_string(), |v| v["schema"] = json!("phg.event/7")).into(),
            Outcome::Bad("unknown schema"),
        ),
        // Sizes: rumqttc's default limit was 10 KiB, and one larger message wedged ingest for good.
        (
            READINGS,
            pad("pad10k", 10 << 10).into(),
            reading("pad10k", None),
        ),
        (
            READINGS,
            pad("pad64k", 64 << 10).into(),
            reading("pad64k", None),
        ),
        (
            READINGS,
            pad("pad200k", 200 << 10).into(),
            reading("pad200k", None),
        ),
        (
            READINGS,
            pad("pad512k", 512 << 10).into(),
            Outcome::Bad("too large"),
        ),
        (
            EVENTS,
            edit(&event.to_string(), |v| {
                v["pad"] = json!("x".repeat(BROKER_LIMIT - 1024))
            })
            .into(),
            Outcome::Bad("too large"),
        ),
    ];
    let t0 = Instant::now();
    for (topic, payload, _) in &batch {
        publisher
            .publish(topic, payload.clone(), ACK)
            .await
            .unwrap();
    }
    // Beyond the broker's limit: the broker refuses it (it never reaches ingest); from a client of its
    // own, since Mosquitto may drop the connection of a client that sends one.
    let mut refused = Publisher::connect(broker.addr());
    let over = pad("over", 2 * BROKER_LIMIT);
    let _ = refused
        .publish(READINGS, over, Duration::from_secs(2))
        .await;
    // After all of it, a good reading.
    let last = glucose_message("after", "p-after-1", 100, t + 60);
    publisher.publish(READINGS, last, ACK).await.unwrap();
    batch.push((READINGS, Vec::new(), reading("after", None)));

    let after = reading_uuid("after");
    let stored = until(Duration::from_secs(60), async || {
        store.reading(&after).await.unwrap().is_some()
    })
    .await;
    let c = store.counts().await.unwrap();
    assert!(
        stored,
        "the good reading after the batch was not stored: {c:?}; broker log:\n{}",
        broker.log()
    );
    println!(
        "{label}: {} messages handled in {:?}: {c:?}",
        batch.len() + 1,
        t0.elapsed()
    );

    // Every message ended as it must.
    let bad = store.bad_messages(1000).await.unwrap();
    let mut unmatched: Vec<String> = bad.iter().map(|b| b.error.clone()).collect();
    for (topic, _, outcome) in &batch {
        match outcome {
            Outcome::Reading(id, why) => {
                let row = store.reading(id).await.unwrap();
                let row = row.unwrap_or_else(|| panic!("{id} ({why:?}) not stored"));
                match why {
                    None => assert!(row.eval_error.is_none(), "{id}: {:?}", row.eval_error),
                    Some(w) => {
                        let e = row.eval_error.clone().unwrap_or_default();
                        assert!(e.contains(w), "{id}: rejected for {e:?}, expected {w:?}");
                    }
                }
            }
            Outcome::Bad(why) => {
                let at = unmatched.iter().position(|e| e.contains(why));
                assert!(
                    at.is_some(),
                    "{topic}: no bad message for {why:?} in {bad:#?}"
                );
                if let Some(i) = at {
                    unmatched.remove(i);
                }
            }
        }
    }
    assert!(
        unmatched.is_empty(),
        "unexpected bad messages: {unmatched:?}"
    );
    // Never alerted on: every value above is either impossible or normal.
    assert_eq!(c.alerts, 0, "an alert from a hostile message: {c:?}");
    // No payload of an oversized message kept.
    assert!(bad.iter().filter(|b| b.error.contains("too large")).count() == 2);
    running.stop().await;
}

// ------------------------------------------------------------------------------------------------------
// The binary: the default instance across SIGKILL, a SIGKILL loop, a full disk
// ------------------------------------------------------------------------------------------------------

/// An `ingest run` configuration with the defaults but the broker, the data directory and (optionally)
/// a webhook: no `instance`.
fn default_config(broker: &TestBroker, data_dir: &Path, webhook: Option<&str>) -> String {
    let mut text = format!(
        "data_dir = {:?}\n[mqtt]\nbroker = \"{}\"\nkeep_alive_s = 5\n",
        data_dir.display().to_string(),
        broker.url()
    );
    if let Some(url) = webhook {
        text.push_str(&format!(
            "[webhook]\nurl = \"{url}\"\nsecret = \"hostile-webhook-secret-0123\"\ntimeout_s = 2\n\
             initial_backoff_ms = 100\nmax_backoff_s = 1\n[outbox]\nlease_s = 3\npoll_ms = 50\n"
        ));
    }
    text
}

fn start_ingest(config: &Path) -> GatewayProcess {
    GatewayProcess::spawn_exe(
        &ingest_bin(),
        &["run".as_ref(), "--config".as_ref(), config.as_os_str()],
    )
    .unwrap()
}

/// The `ingest` binary on the configuration `text` (written to `config`), its store in `data_dir`, and a
/// publisher, once it has stored the probe reading `probe` (so it is subscribed).
async fn start_subscribed(
    broker: &TestBroker,
    config: &Path,
    text: &str,
    data_dir: &Path,
    probe: &str,
) -> (GatewayProcess, AnyStore, Publisher) {
    std::fs::write(config, text).unwrap();
    let ingest = start_ingest(config);
    let store = open_store(data_dir).await;
    let mut publisher = Publisher::connect(broker.addr());
    wait_until_subscribed(&mut publisher, &store, probe).await;
    (ingest, store, publisher)
}

async fn open_store(data_dir: &Path) -> AnyStore {
    let url = format!("sqlite://{}", data_dir.join("ingest.sqlite").display());
    let store = until(Duration::from_secs(10), async || {
        AnyStore::open(&url).await.is_ok()
    })
    .await;
    assert!(store, "no database at {url}");
    AnyStore::open(&url).await.unwrap()
}

/// Ingest with the default configuration on a Mosquitto started with `extra`, subscribed (a probe stored),
/// then killed with SIGKILL: what is published now waits in the broker for its persistent session. `None`
/// (skipped) without Mosquitto.
struct KilledIngest {
    broker: TestBroker,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    store: AnyStore,
    publisher: Publisher,
}

async fn killed_ingest(
    broker_extra: &str,
    mqtt_extra: &str,
    label: &str,
    probe: &str,
) -> Option<KilledIngest> {
    let broker = mosquitto(broker_extra, label)?;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("ingest.toml");
    // default_config ends in its [mqtt] table: mqtt_extra adds keys to it.
    let text = default_config(&broker, &data, None) + mqtt_extra;
    let (first, store, publisher) = start_subscribed(&broker, &config, &text, &data, probe).await;
    first.kill9().unwrap();
    Some(KilledIngest {
        broker,
        _dir: dir,
        config,
        store,
        publisher,
    })
}

/// Issue 11 defect 2: with the default `instance` (`ingest-{pid}`), the client id changed at each
/// start and what the broker queued for the old session was never stored (0 of 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_instance_keeps_what_was_published_while_ingest_was_killed() {
    let label = "default instance";
    let Some(KilledIngest {
        broker: _broker,
        _dir,
        config,
        store,
        mut publisher,
    }) = killed_ingest("", "", label, "probe").await
    else {
        return;
    };

    let t = now_s() - 600;
    for i in 0..3 {
        let m = glucose_message(&format!("down-{i}"), "p-down-1", 100, t + i);
        publisher.publish(READINGS, m, ACK).await.unwrap();
    }
    let second = start_ingest(&config);
    let all = until(Duration::from_secs(30), async || {
        store.readings_of("p-down-1", 10).await.unwrap().len() == 3
    })
    .await;
    let n = store.readings_of("p-down-1", 10).await.unwrap().len();
    println!("{label}: {n} of 3 readings published while ingest was down were stored");
    assert!(
        all,
        "{n} of 3 stored; ingest log:\n{}",
        second.stderr().text()
    );
    drop(second);
}

/// The webhook receiver: every delivery's event id.
#[derive(Debug, Default)]
struct Deliveries(Mutex<Vec<String>>);

async fn receive(State(d): State<Arc<Deliveries>>, headers: HeaderMap, _body: Bytes) -> StatusCode {
    let id = headers
        .get(EVENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    d.0.lock().unwrap().push(id);
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

/// SIGKILL during batches, `PHG_INGEST_KILLS` times (default 10): every reading stored once, one alert
/// per hypoglycaemia, and the webhook gets each alert event (again only under the same event id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_during_batches_loses_nothing_and_alerts_once() {
    let label = "sigkill loop";
    let Some(broker) = mosquitto("", label) else {
        return;
    };
    let kills: usize = std::env::var("PHG_INGEST_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (hook, hook_url) = webhook().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("ingest.toml");
    let text = default_config(&broker, &data, Some(&hook_url));
    let (mut ingest, store, mut publisher) =
        start_subscribed(&broker, &config, &text, &data, "probe").await;

    let t0 = Instant::now();
    let t = now_s() - 3000;
    let mut published = BTreeSet::new();
    let per_round = 20;
    for round in 0..kills {
        // A batch in flight: half of it before the kill lands somewhere in the storing.
        for i in 0..per_round {
            let n = round * per_round + i;
            // One hypo per patient (an alert each); the other readings normal.
            let mg = if i % 5 == 0 { 45 } else { 110 };
            let name = format!("k-{n}");
            let m = glucose_message(&name, &format!("p-k-{:03}", n / 5), mg, t + n as i64);
            publisher.publish(READINGS, m, ACK).await.unwrap();
            published.insert(reading_uuid(&name));
        }
        tokio::time::sleep(Duration::from_millis(50 + (round as u64 * 37) % 200)).await;
        ingest.kill9().unwrap();
        ingest = start_ingest(&config);
    }
    let patients = published.len() / 5;
    let done = until(Duration::from_secs(60), async || {
        let c = store.counts().await.unwrap();
        c.readings as usize == published.len() + 1 && c.outbox_pending == 0
    })
    .await;
    let c = store.counts().await.unwrap();
    println!("{label}: {kills} kills in {:?}; {c:?}", t0.elapsed());
    assert!(
        done,
        "not all stored and delivered: {c:?}\n{}",
        ingest.stderr().text()
    );
    // Each reading once.
    let mut stored = BTreeSet::new();
    for p in 0..patients {
        for r in store
            .readings_of(&format!("p-k-{p:03}"), 100)
            .await
            .unwrap()
        {
            assert!(stored.insert(r.id.clone()), "stored twice: {}", r.id);
        }
    }
    assert_eq!(stored, published, "lost readings");
    // One alert per hypo, no event twice.
    let mut opened = 0;
    for p in 0..patients {
        let alerts = store.alerts_of(&format!("p-k-{p:03}"), 10).await.unwrap();
        assert_eq!(alerts.len(), 1, "p-k-{p:03}: {alerts:?}");
        opened += alerts.len();
    }
    assert_eq!(opened, patients);
    let got = hook.0.lock().unwrap().clone();
    let mut per_event: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &got {
        *per_event.entry(id.as_str()).or_default() += 1;
    }
    println!(
        "{label}: {} readings, {} alerts, {} alert events, {} webhook deliveries ({} redelivered)",
        stored.len(),
        opened,
        c.alert_events,
        got.len(),
        got.len() - per_event.len()
    );
    assert_eq!(
        per_event.len() as i64,
        c.alert_events,
        "every event delivered"
    );
    drop(ingest);
}

/// SIGKILL while batches of blood-pressure readings are stored: the history each patient's engine keeps
/// (a row per reading, written in the same transaction as the reading) holds every reading exactly once,
/// so the 7-day average still sees all of them. Each patient measures 138/88 twice a day for 7 days: 14
/// readings, 12 once the first day of the block is left out — exactly the rule's minimum, so one history
/// row lost to a kill would leave the average unraised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_bp_batches_keeps_every_reading_in_the_history() {
    let label = "sigkill, BP history";
    let Some(broker) = mosquitto("", label) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("ingest.toml");
    let text = default_config(&broker, &data, None);
    let (mut ingest, store, mut publisher) =
        start_subscribed(&broker, &config, &text, &data, "probe").await;

    // Seven whole days ending yesterday (UTC), at 08:00 and 20:00.
    const DAY: i64 = 86_400;
    let first_day = (now_s() / DAY - 7) * DAY;
    let patients: Vec<String> = (0..4).map(|p| format!("p-h-{p:03}")).collect();
    let mut published = 0;
    for day in 0..7 {
        for (slot, hour) in [(0, 8), (1, 20)] {
            for p in &patients {
                let name = format!("{p}-{day}-{slot}");
                let t = first_day + day * DAY + hour * 3600;
                let m = bp_message(&name, p, 138, 88, 70, t);
                publisher.publish(READINGS, m, ACK).await.unwrap();
                published += 1;
            }
        }
        // A kill every day's worth of readings, somewhere in their storing.
        tokio::time::sleep(Duration::from_millis(30 + (day as u64 * 41) % 150)).await;
        ingest.kill9().unwrap();
        ingest = start_ingest(&config);
    }
    let done = until(Duration::from_secs(60), async || {
        store.counts().await.unwrap().readings as usize == published + 1
    })
    .await;
    assert!(done, "not all stored: {:?}", store.counts().await.unwrap());
    // The average as of yesterday evening, by an evaluator that never saw the readings: it reads the
    // history rows.
    let ev = Arc::new(ingest::evaluate::Evaluator::new(
        protocol::rules::RuleSet::default_rules().unwrap(),
        vec![ingest::evaluate::Sink::Mqtt],
    ));
    store
        .tick(ev, first_day + 6 * DAY + 21 * 3600)
        .await
        .unwrap();
    for p in &patients {
        let rules = ingest::testing::alert_rules_of(&store, p).await.unwrap();
        let averages = rules.iter().filter(|r| *r == "BP_AVG_UNCONTROLLED").count();
        assert_eq!(averages, 1, "{p}: {rules:?}");
    }
    println!("{label}: {published} readings through 7 kills, the average raised once per patient");
    drop(ingest);
}

/// Its database on a full filesystem: ingest stores nothing it cannot, acknowledges nothing it has not
/// stored (the broker keeps the messages), and stores everything once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledging_and_recovers() {
    let label = "full disk";
    if !rustix::process::geteuid().is_root() {
        println!("{label}: skipped: needs root to mount tmpfs");
        return;
    }
    let Some(broker) = mosquitto("", label) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("tmpfs");
    std::fs::create_dir(&mount).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "phg-ingest-test"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        println!("{label}: skipped: could not mount a tmpfs");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let data = mount.join("data");
    let config = dir.path().join("ingest.toml");
    let text = default_config(&broker, &data, None);
    let (mut ingest, store, mut publisher) =
        start_subscribed(&broker, &config, &text, &data, "probe").await;

    // Fill the filesystem.
    let filler = mount.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let before = store.counts().await.unwrap().readings;
    let t = now_s() - 600;
    let n = 300;
    for i in 0..n {
        let m = edit(
            &glucose_message(&format!("full-{i}"), "p-full-1", 100, t + i),
            |v| v["pad"] = json!("x".repeat(2048)),
        );
        publisher.publish(READINGS, m, ACK).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = store.counts().await.unwrap().readings - before;
    let errors = ingest.stderr().find("storing failed", 0);
    println!("{label}: {during} of {n} stored while the disk was full");
    assert!(
        ingest.is_running().unwrap(),
        "ingest died: {}",
        ingest.stderr().text()
    );
    assert!(
        during < n && errors.is_some(),
        "the disk never filled up ({during} stored)"
    );

    std::fs::remove_file(&filler).unwrap();
    let all = until(Duration::from_secs(60), async || {
        store.readings_of("p-full-1", 1000).await.unwrap().len() == n as usize
    })
    .await;
    let got = store.readings_of("p-full-1", 1000).await.unwrap().len();
    println!("{label}: {got} of {n} stored after space returned");
    assert!(all, "{got} of {n}: {}", ingest.stderr().text());
    drop(ingest);
}

/// The thousand-gateway load bench (`tests/benches/load.rs`) found ingest wedged after a burst: its
/// consumer waited for room in the storer's channel while the storer waited for room in rumqttc's request
/// queue to acknowledge, a queue only the consumer's `poll` drains; the broker then dropped ingest for a
/// missed keep-alive and nothing more was stored. Here the burst is a backlog the broker queued while ingest
/// was down, released at once (no in-flight window on the broker): every reading must be stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_released_at_once_after_a_restart_is_stored_whole() {
    // Small batches and a small in-flight window (request queue 64, storer channel 32) make the wedge
    // reachable with a backlog of hundreds rather than the thousands the defaults (256) need; the
    // mechanism is the same. Against the consumer before the fix (15068951^) this stored 80 of 600 in 60 s,
    // then nothing more; with it, 600 of 600 in 0.3 s.
    const N: usize = 600;
    let label = "backlog flood";
    // Unlimited in flight and queued on the broker: the whole backlog arrives as fast as the socket takes it.
    let Some(KilledIngest {
        broker: _broker,
        _dir,
        config,
        store,
        mut publisher,
    }) = killed_ingest(
        "max_inflight_messages 0\nmax_queued_messages 0\n",
        "max_batch = 16\ninflight = 16\n",
        label,
        "probe-flood",
    )
    .await
    else {
        return;
    };

    let started = std::time::Instant::now();
    let t = now_s() - 2 * N as i64;
    let backlog = (0..N).map(|i| {
        let patient = format!("p-flood-{}", i % 50 + 1);
        glucose_message(&format!("flood-{i}"), &patient, 100, t + i as i64)
    });
    publisher.publish_all(READINGS, backlog, ACK).await.unwrap();
    println!(
        "{label}: {N} published while ingest was down in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    let second = start_ingest(&config);
    let count = async || {
        let mut n = 0;
        for p in 1..=50 {
            n += store
                .readings_of(&format!("p-flood-{p}"), N as i64)
                .await
                .unwrap()
                .len();
        }
        n
    };
    let all = until(Duration::from_secs(30), async || count().await == N).await;
    let n = count().await;
    println!(
        "{label}: {n} of {N} readings of a backlog released at once were stored in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        all,
        "{n} of {N} stored (ingest wedged?); ingest log:\n{}",
        second.stderr().text()
    );
    drop(second);
}

/// Its PostgreSQL server crashing in the middle of a stream (`pg_ctl stop -m immediate`, down for 3 s,
/// then recovering from its WAL): ingest acknowledges nothing it has not stored, so what the broker
/// delivered meanwhile comes again; it reconnects, and every reading ends stored (once: the id is the
/// key), the alert of one published while the server was down raised once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_mid_stream_loses_nothing_and_raises_once() {
    let label = "database crash";
    let Some(pg) = ingest::testing::TempPostgres::start(true)
        .expect("PostgreSQL is installed but did not start")
    else {
        println!("{label}: {}", ingest::testing::SKIP_MESSAGE);
        return;
    };
    let Some(broker) = mosquitto("", label) else {
        return;
    };
    let url = pg.create_database("crash").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingest.toml");
    let text = format!(
        "data_dir = {:?}\n[mqtt]\nbroker = \"{}\"\nkeep_alive_s = 5\n[database]\nurl = \"{url}\"\n",
        dir.path().join("data").display().to_string(),
        broker.url()
    );
    std::fs::write(&config, text).unwrap();
    let mut ingest = start_ingest(&config);
    let store = AnyStore::open(&url).await.unwrap();
    let mut publisher = Publisher::connect(broker.addr());
    wait_until_subscribed(&mut publisher, &store, "probe-crash").await;

    let patient = "p-crash-1";
    let n = 300;
    let t = now_s() - 3600;
    // 40 mg/dL (a hypoglycaemia alert) for the one published while the server is down.
    let message = |i: u32| {
        let mg = if i == 150 { 40 } else { 100 };
        glucose_message(&format!("crash-{i}"), patient, mg, t + i64::from(i) * 10)
    };
    publisher
        .publish_all(READINGS, (0..100).map(message), ACK)
        .await
        .unwrap();
    pg.crash().unwrap();
    publisher
        .publish_all(READINGS, (100..200).map(message), ACK)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again().unwrap();
    publisher
        .publish_all(READINGS, (200..n).map(message), ACK)
        .await
        .unwrap();
    let stored = async || {
        store
            .readings_of(patient, 1000)
            .await
            .map_or(0, |r| r.len())
    };
    let all = until(Duration::from_secs(60), async || {
        stored().await == n as usize
    })
    .await;
    let got = stored().await;
    println!("{label}: {got} of {n} readings stored across the crash");
    assert!(all, "{got} of {n}; ingest log:\n{}", ingest.stderr().text());
    let alerts = until(Duration::from_secs(10), async || {
        ingest::testing::alert_rules_of(&store, patient)
            .await
            .is_ok_and(|a| !a.is_empty())
    })
    .await;
    let rules = ingest::testing::alert_rules_of(&store, patient)
        .await
        .unwrap();
    println!("{label}: alerts {rules:?}");
    assert!(alerts && rules.len() == 1, "one alert, got {rules:?}");
    assert!(
        ingest.is_running().unwrap(),
        "ingest died: {}",
        ingest.stderr().text()
    );
    drop(ingest);
}
