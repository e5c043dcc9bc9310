//! The uplink against real brokers: journal → uplink → Mosquitto (or the embedded rumqttd) → subscriber.
//!
//! No mocks: a real journal in a temp directory, a real broker process on a free loopback port, a real
//! MQTT subscriber. Each test says on stderr which broker it ran against; tests that need to stop and
//! restart the broker skip (with the reason printed) when only the embedded rumqttd is available, since
//! rumqttd has no shutdown.
//!
//! Readings are `device:n` with the device and its counter in the payload (see
//! `phg_tests::readings::reading`), so the checks are: every id arrives, the first arrival of each
//! device's readings is in counter order, and any duplicate is byte-identical to its first copy.

// A test binary: a failed set-up step is a failed test, including in the shared scenario helpers below
// (clippy's allow-unwrap-in-tests covers only the #[test] functions themselves).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::pipeline::handoff::Handoff;
use gateway::uplink::{self, ConfigError, MqttVersion, UplinkError};
use phg_tests::readings::{
    self, OFFLINE, ONLINE, READINGS_TOPIC, STATUS_TOPIC, append_readings, depth, open_journal,
    uplink_config, wait_for_depth,
};
use phg_tests::{BrokerKind, Delivery, RunningUplink, Subscriber, TestBroker};
use tokio_util::sync::CancellationToken;

const DEVICES: [&str; 3] = ["gls-0a01", "bpm-0b02", "gls-0c03"];

fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// Scenario (a): 2 000 readings over 3 devices, no faults.
async fn delivers_2000_exactly_once(broker: TestBroker, version: MqttVersion) {
    let t0 = Instant::now();
    eprintln!("broker: {} ({version:?})", broker.kind());
    let mut sub = Subscriber::connect(broker.addr(), READINGS_TOPIC)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    // 667 + 667 + 666 = 2000.
    append_readings(&journal, &DEVICES, 0, 666).unwrap();
    append_readings(&journal, &DEVICES[..2], 666, 667).unwrap();
    let expected = [(DEVICES[0], 667), (DEVICES[1], 667), (DEVICES[2], 666)];
    assert_eq!(
        depth(&journal).unwrap(),
        2000,
        "nothing leaves the journal without an uplink"
    );

    let up = RunningUplink::spawn(uplink_config(&broker.url(), version), Arc::clone(&journal));
    let got = sub.wait_for(2000, Duration::from_secs(30)).await.len();
    assert_eq!(got, 2000, "subscriber got {got} of 2000");
    assert!(
        wait_for_depth(&journal, 0, Duration::from_secs(10)).await,
        "journal depth stuck at {}",
        depth(&journal).unwrap()
    );
    // Anything extra (a duplicate) would show up now.
    sub.collect_for(Duration::from_millis(200)).await;
    let stats = up.stop().await.unwrap().unwrap();

    let delivery = Delivery::of(sub.received());
    assert_eq!(delivery.check_complete_in_order(&expected), Ok(()));
    assert_eq!(delivery.duplicates, 0, "no faults: exactly once");
    assert_eq!(delivery.total, 2000);
    // Each journal ack corresponds to one PUBACK: 2000 PUBACKs, 2000 acks, one session.
    assert_eq!(
        (stats.published, stats.delivered, stats.connections),
        (2000, 2000, 1),
        "{stats:?}"
    );
    assert_eq!(stats.unacked_at_exit, 0);
    eprintln!("2000 readings delivered in {:?} ({stats:?})", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_2000_readings_exactly_once_in_order_mosquitto_mqtt5() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "delivers_2000_readings_exactly_once_in_order_mosquitto_mqtt5",
            "mosquitto not installed",
        );
    };
    delivers_2000_exactly_once(broker.unwrap(), MqttVersion::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_2000_readings_exactly_once_in_order_mosquitto_mqtt311() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "delivers_2000_readings_exactly_once_in_order_mosquitto_mqtt311",
            "mosquitto not installed",
        );
    };
    delivers_2000_exactly_once(broker.unwrap(), MqttVersion::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_2000_readings_exactly_once_in_order_embedded_rumqttd() {
    phg_tests::init_tracing();
    // rumqttd's MQTT 5 support is partial; its 3.1.1 listener is what the embedded broker offers.
    delivers_2000_exactly_once(TestBroker::start_embedded().unwrap(), MqttVersion::V311).await;
}

/// Scenario (b): the broker stops (cleanly: SIGTERM) in the middle of a stream of readings and comes back
/// on the same port a couple of seconds later.
///
/// Why a clean stop: Mosquitto writes its store (with the subscriber's queued messages) only on a clean
/// stop. After a SIGKILL, messages the broker had already PUBACKed but not yet forwarded to the
/// subscriber die with the broker — a broker property that would hide whether the *uplink* lost
/// anything. With a clean stop, a missing reading can only be the uplink's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing_and_keeps_order_per_device() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "broker_restart_mid_stream_loses_nothing_and_keeps_order_per_device",
            "needs a broker that can be stopped and restarted (mosquitto); the embedded rumqttd has no shutdown",
        );
    };
    let mut broker = broker.unwrap();
    const PER_DEVICE: u64 = 400;
    let t0 = Instant::now();
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        READINGS_TOPIC,
        &phg_tests::unique_id("sub-b"),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let up = RunningUplink::spawn(
        uplink_config(&broker.url(), MqttVersion::V5),
        Arc::clone(&journal),
    );

    // A device-paced producer: 3 readings every 5 ms for ~2 s, each group commit followed by a wake-up.
    let producer = {
        let journal = Arc::clone(&journal);
        let wake = Arc::clone(&up.wake);
        tokio::task::spawn_blocking(move || {
            for n in 0..PER_DEVICE {
                append_readings(&journal, &DEVICES, n, n + 1).unwrap();
                wake.wake();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_stop = sub.received().len();
    broker.stop().unwrap();
    eprintln!(
        "broker stopped after {before_stop} messages at {:?}",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = depth(&journal).unwrap();
    assert!(
        waiting > 0,
        "readings accepted while the broker is down wait in the journal"
    );
    broker.restart().unwrap();
    eprintln!(
        "broker restarted at {:?} with {waiting} readings waiting in the journal",
        t0.elapsed()
    );
    producer.await.unwrap();

    let total = DEVICES.len() * PER_DEVICE as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while Delivery::of(sub.received()).distinct() < total && tokio::time::Instant::now() < deadline
    {
        sub.collect_for(Duration::from_millis(100)).await;
    }
    assert!(
        wait_for_depth(&journal, 0, Duration::from_secs(10)).await,
        "journal did not drain"
    );
    sub.collect_for(Duration::from_millis(200)).await;
    let stats = up.stop().await.unwrap().unwrap();

    let delivery = Delivery::of(sub.received());
    let expected: Vec<(&str, u64)> = DEVICES.iter().map(|d| (*d, PER_DEVICE)).collect();
    assert_eq!(
        delivery.check_complete_in_order(&expected),
        Ok(()),
        "{delivery:?}"
    );
    assert_eq!(delivery.inconsistent_duplicates, 0);
    assert!(
        stats.connection_losses >= 1 && stats.connections >= 2,
        "{stats:?}"
    );
    eprintln!(
        "{total} readings, {} duplicates (same ids), {stats:?}, in {:?}",
        delivery.duplicates,
        t0.elapsed()
    );
}

/// Scenario (c): readings accepted while the broker is down stay in the journal, untouched, and go out
/// when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_accepted_while_the_broker_is_down_wait_in_the_journal() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "readings_accepted_while_the_broker_is_down_wait_in_the_journal",
            "needs a broker that can be stopped and restarted (mosquitto); the embedded rumqttd has no shutdown",
        );
    };
    let mut broker = broker.unwrap();
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        READINGS_TOPIC,
        &phg_tests::unique_id("sub-c"),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let up = RunningUplink::spawn(
        uplink_config(&broker.url(), MqttVersion::V5),
        Arc::clone(&journal),
    );

    // Warm-up: one reading per device proves the session is up.
    append_readings(&journal, &DEVICES, 0, 1).unwrap();
    up.wake.wake();
    assert_eq!(sub.wait_for(3, Duration::from_secs(10)).await.len(), 3);
    assert!(wait_for_depth(&journal, 0, Duration::from_secs(5)).await);

    broker.stop().unwrap();
    append_readings(&journal, &DEVICES, 1, 68).unwrap();
    up.wake.wake();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        depth(&journal).unwrap(),
        3 * 67,
        "nothing may leave the journal while the broker is down"
    );
    assert_eq!(sub.received().len(), 3);

    broker.restart().unwrap();
    assert!(
        wait_for_depth(&journal, 0, Duration::from_secs(10)).await,
        "journal did not drain"
    );
    sub.wait_for(3 * 68, Duration::from_secs(10)).await;
    let stats = up.stop().await.unwrap().unwrap();
    let delivery = Delivery::of(sub.received());
    let expected: Vec<(&str, u64)> = DEVICES.iter().map(|d| (*d, 68)).collect();
    assert_eq!(
        delivery.check_complete_in_order(&expected),
        Ok(()),
        "{delivery:?}"
    );
    assert_eq!(stats.connections, 2, "{stats:?}");
}

/// Scenario (d): unencrypted MQTT to a host that is not loopback is refused before anything connects,
/// with an error that names the setting; `allow_plaintext` lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_a_non_loopback_host_is_refused() {
    phg_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let cfg = uplink_config("mqtt://broker.example.com:1883", MqttVersion::V5);
    let err = uplink::run(
        cfg.clone(),
        Arc::clone(&journal),
        Arc::new(Handoff::default()),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            UplinkError::Config(ConfigError::PlaintextRefused { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("allow_plaintext") && msg.contains("broker.example.com"),
        "{msg}"
    );
    eprintln!("refused as expected: {msg}");

    // Explicitly allowed: it runs (and keeps trying a TEST-NET-1 address that never answers).
    let mut allowed = uplink_config("mqtt://192.0.2.1:1883", MqttVersion::V5);
    allowed.allow_plaintext = true;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(uplink::run(
        allowed,
        journal,
        Arc::new(Handoff::default()),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(stats.connections, 0);
}

/// Waits for the uplink's session to be up: one reading delivered (it goes out after the online status).
async fn prove_session(journal: &std::sync::Mutex<gateway::journal::Journal>, up: &RunningUplink) {
    append_readings(journal, &DEVICES[..1], 0, 1).unwrap();
    up.wake.wake();
    assert!(
        wait_for_depth(journal, 0, Duration::from_secs(10)).await,
        "uplink never delivered"
    );
}

/// Scenario (e): the status is retained "online" for late subscribers, and when the uplink's connection
/// dies without a DISCONNECT, the broker publishes the last will: retained "offline".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_online_and_the_will_says_offline_when_the_uplink_dies() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let cfg = uplink_config(&broker.url(), broker.mqtt_version());
    let client_id = cfg.client_id.clone();
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    prove_session(&journal, &up).await;

    let mut late = Subscriber::connect(broker.addr(), STATUS_TOPIC)
        .await
        .unwrap();
    let got = late.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "a late subscriber gets the retained status");
    assert_eq!((got[0].payload.as_slice(), got[0].retain), (ONLINE, true));

    // Kill the uplink task: the event loop and its socket are dropped, no DISCONNECT is sent.
    up.task.abort();
    assert!(up.task.await.unwrap_err().is_cancelled());
    let got = late.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "the will was not delivered");
    assert_eq!(got[1].payload, OFFLINE);

    let mut later = Subscriber::connect(broker.addr(), STATUS_TOPIC)
        .await
        .unwrap();
    let got = later.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(
        (got[0].payload.as_slice(), got[0].retain),
        (OFFLINE, true),
        "the will is retained"
    );
    if broker.kind() == BrokerKind::Mosquitto {
        let log = broker.log();
        assert!(
            log.contains(&format!("Client {client_id} closed its connection.")),
            "{log}"
        );
    }
}

/// A clean shutdown says "offline" itself (the broker sends no will after a DISCONNECT), after the
/// outstanding PUBACKs came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_publishes_retained_offline() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let cfg = uplink_config(&broker.url(), broker.mqtt_version());
    let client_id = cfg.client_id.clone();
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    prove_session(&journal, &up).await;
    let stats = up.stop().await.unwrap().unwrap();
    assert_eq!(
        (stats.delivered, stats.unacked_at_exit),
        (1, 0),
        "{stats:?}"
    );

    let mut late = Subscriber::connect(broker.addr(), STATUS_TOPIC)
        .await
        .unwrap();
    let got = late.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!((got[0].payload.as_slice(), got[0].retain), (OFFLINE, true));
    if broker.kind() == BrokerKind::Mosquitto {
        // The will and the explicit message carry the same payload; Mosquitto's log tells a DISCONNECT
        // ("disconnected") from a dropped socket ("closed its connection").
        let log = broker.log();
        assert!(
            log.contains(&format!("Client {client_id} disconnected.")),
            "no clean DISCONNECT:\n{log}"
        );
    }
}

/// MQTT 5 lets a broker refuse a publish in its PUBACK (here: an ACL denies the readings topic). A
/// refused reading is not delivered, so it must stay in the journal. (MQTT 3.1.1 cannot say "no":
/// Mosquitto PUBACKs a denied 3.1.1 publish like any other — one reason MQTT 5 is the default.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_refused_publishes_stay_in_the_journal() {
    phg_tests::init_tracing();
    let acl_dir = tempfile::tempdir().unwrap();
    let acl = acl_dir.path().join("acl");
    // Anonymous clients: status may be written; readings only read.
    std::fs::write(
        &acl,
        "topic readwrite phg/v1/+/status\ntopic read phg/v1/+/readings\n",
    )
    .unwrap();
    let Some(broker) = TestBroker::start_mosquitto_with(&format!("acl_file {}", acl.display()))
    else {
        return skip(
            "mqtt5_refused_publishes_stay_in_the_journal",
            "needs mosquitto (ACLs)",
        );
    };
    let broker = broker.unwrap();
    let mut sub = Subscriber::connect(broker.addr(), READINGS_TOPIC)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    append_readings(&journal, &DEVICES, 0, 5).unwrap();
    let mut cfg = uplink_config(&broker.url(), MqttVersion::V5);
    // One record at a time: Mosquitto 2.0 closes the connection right after a refusing PUBACK, and a
    // second publish written into the closing socket would fail before the PUBACK is read.
    cfg.inflight = 1;
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        depth(&journal).unwrap(),
        15,
        "refused readings must stay in the journal"
    );
    assert_eq!(sub.collect_for(Duration::from_millis(100)).await.len(), 0);
    let stats = up.stop().await.unwrap().unwrap();
    assert!(
        stats.refused >= 1 && stats.delivered == 0,
        "{stats:?}\n{}",
        broker.log()
    );
    eprintln!("{stats:?}");
}

/// MQTT 5 publishes carry `content-type: application/json` (DESIGN, the MQTT contract), the status
/// included; seen by an MQTT 5 subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_publishes_carry_the_json_content_type() {
    phg_tests::init_tracing();
    use rumqttc::v5::mqttbytes::{QoS, v5::Packet};
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "mqtt5_publishes_carry_the_json_content_type",
            "needs an MQTT 5 broker (mosquitto)",
        );
    };
    let broker = broker.unwrap();
    let addr = broker.addr();
    let mut opts = rumqttc::v5::MqttOptions::new(
        phg_tests::unique_id("sub5"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 16);
    client
        .subscribe("phg/v1/gw-test/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let poller = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(event) = eventloop.poll().await {
            match event {
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send((p.topic.to_vec(), p.properties.and_then(|p| p.content_type)));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), subscribed_rx)
        .await
        .unwrap()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    append_readings(&journal, &DEVICES, 0, 2).unwrap();
    let up = RunningUplink::spawn(
        uplink_config(&broker.url(), MqttVersion::V5),
        Arc::clone(&journal),
    );
    let mut got = Vec::new();
    while got.len() < 7 {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            _ => break,
        }
    }
    up.stop().await.unwrap().unwrap();
    poller.abort();
    assert_eq!(got.len(), 7, "status + 6 readings: {got:?}");
    for (topic, content_type) in &got {
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{}",
            String::from_utf8_lossy(topic)
        );
    }
    assert_eq!(
        got[0].0,
        STATUS_TOPIC.as_bytes(),
        "the online status goes out before the backlog"
    );
}

/// A record that can never be published (its topic has a wildcard) is reported, stays in the journal,
/// and does not hold up the others (DESIGN promise 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_an_invalid_topic_stays_in_the_journal_and_blocks_nothing() {
    phg_tests::init_tracing();
    let broker = TestBroker::start().unwrap();
    let mut sub = Subscriber::connect(broker.addr(), READINGS_TOPIC)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let mut bad = readings::reading("gls-bad", 0);
    bad.topic = "phg/v1/gw-test/+".to_owned();
    journal.lock().unwrap().append(&[bad]).unwrap();
    append_readings(&journal, &DEVICES, 0, 3).unwrap();
    let up = RunningUplink::spawn(
        uplink_config(&broker.url(), broker.mqtt_version()),
        Arc::clone(&journal),
    );
    assert_eq!(sub.wait_for(9, Duration::from_secs(10)).await.len(), 9);
    assert!(
        wait_for_depth(&journal, 1, Duration::from_secs(5)).await,
        "only the bad record stays"
    );
    let stats = up.stop().await.unwrap().unwrap();
    assert_eq!(stats.delivered, 9, "{stats:?}");
    let expected: Vec<(&str, u64)> = DEVICES.iter().map(|d| (*d, 3)).collect();
    assert_eq!(
        Delivery::of(sub.received()).check_complete_in_order(&expected),
        Ok(())
    );
}

/// The uplink's metrics reach a Prometheus exporter: deliveries, publish→PUBACK latency, the in-flight
/// gauge and, after a broker restart, a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_metrics_are_exported() {
    phg_tests::init_tracing();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            "uplink_metrics_are_exported",
            "needs a restartable broker (mosquitto) for the reconnect",
        );
    };
    let mut broker = broker.unwrap();
    // One global recorder for this test binary; other tests running meanwhile only add to the counts.
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    let handle = HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    });

    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let up = RunningUplink::spawn(
        uplink_config(&broker.url(), MqttVersion::V5),
        Arc::clone(&journal),
    );
    append_readings(&journal, &DEVICES, 0, 5).unwrap();
    up.wake.wake();
    assert!(wait_for_depth(&journal, 0, Duration::from_secs(10)).await);
    broker.restart().unwrap();
    append_readings(&journal, &DEVICES, 5, 10).unwrap();
    up.wake.wake();
    assert!(wait_for_depth(&journal, 0, Duration::from_secs(10)).await);
    let stats = up.stop().await.unwrap().unwrap();
    assert!(stats.connections >= 2, "{stats:?}");

    let text = handle.render();
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    };
    assert!(value("phg_readings_delivered_total") >= 30.0);
    assert!(value("phg_mqtt_reconnects_total") >= 1.0);
    assert!(value("phg_publish_latency_seconds_count") >= 30.0);
    assert!(value("phg_inflight") >= 0.0);
}

/// The embedded rumqttd gets MQTT 3.1.1; Mosquitto the default (MQTT 5).
#[test]
fn test_readings_are_self_describing() {
    let r = readings::reading("gls-0a01", 7);
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["n"].as_u64()),
        (Some("gls-0a01:7"), Some(7))
    );
    assert_eq!(r.reading_id, "gls-0a01:7");
}

/// A delivered reading's journal ack is written without an `fdatasync` of its own (the next append's
/// carries it). When no append comes — one reading, then silence — the uplink syncs it by itself after
/// `ack_sync_after` (25 s by default; 3 s here, so CI does not sit through the default), so a power cut
/// makes the gateway resend at most that much (same reading ids; ingest drops them). The embedded broker
/// serves: the promise is the uplink's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_ack_is_synced_after_ack_sync_after_without_another_append() {
    const SYNC_AFTER: Duration = Duration::from_secs(3);
    phg_tests::init_tracing();
    assert_eq!(
        uplink_config("mqtt://127.0.0.1:1", MqttVersion::V311).ack_sync_after,
        Duration::from_secs(25),
        "the default the docs promise"
    );
    let broker = TestBroker::start_embedded().unwrap();
    let mut sub = Subscriber::connect(broker.addr(), READINGS_TOPIC)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).unwrap();
    let mut cfg = uplink_config(&broker.url(), MqttVersion::V311);
    cfg.ack_sync_after = SYNC_AFTER;
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    append_readings(&journal, &DEVICES[..1], 0, 1).unwrap();
    up.wake.wake();
    assert_eq!(sub.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    assert!(wait_for_depth(&journal, 0, Duration::from_secs(5)).await);
    let acked = Instant::now();
    let unsynced = || journal.lock().unwrap().has_unsynced_acks();
    assert!(unsynced(), "the ack waits for the next append's fdatasync");
    let fsyncs = journal.lock().unwrap().fsyncs();
    while unsynced() && acked.elapsed() < SYNC_AFTER * 4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = acked.elapsed();
    assert!(
        !unsynced(),
        "the ack was still unsynced {waited:?} after it was written"
    );
    assert!(
        waited <= SYNC_AFTER + Duration::from_secs(1),
        "synced only after {waited:?}"
    );
    assert_eq!(
        journal.lock().unwrap().fsyncs(),
        fsyncs + 1,
        "one fdatasync"
    );
    eprintln!("the lone ack was synced {waited:?} after it was written");
    up.stop().await.unwrap().unwrap();
}
