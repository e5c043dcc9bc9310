//! TLS with client certificates to a real Mosquitto (DESIGN.md promise 8: "TLS (with client certificates)
//! to the broker in production").
//!
//! The test makes a throw-away PKI with rcgen — a CA, a broker certificate for 127.0.0.1, a gateway client
//! certificate, and a CA nobody trusts — and starts Mosquitto with a second listener that requires a client
//! certificate signed by the CA. The gateway's uplink (rumqttc over rustls, as in production) publishes
//! journaled readings over it; a subscriber on the plain loopback listener sees them arrive. A gateway
//! without a client certificate, or one that does not trust the broker's CA, gets nowhere, and its
//! readings stay in the journal. Mosquitto is needed (rumqttd is not set up for TLS here): without it the
//! test prints "SKIPPED" and returns; CI installs it.

// A test binary: a failed set-up step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway::uplink::{MqttVersion, TlsFiles};
use phg_tests::readings::{
    READINGS_TOPIC, append_readings, depth, open_journal, uplink_config, wait_for_depth,
};
use phg_tests::{RunningUplink, Subscriber, TestBroker, free_loopback_port};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of the test PKI.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA that signed nothing here: trusting only it, a client cannot verify the broker.
    stranger_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn make_pki(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("phg test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let (server_cert, server_key) = leaf(
        &issuer,
        &["127.0.0.1", "localhost"],
        "broker",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    // A pseudonymous gateway id as the certificate's name, never a person's.
    let (client_cert, client_key) = leaf(
        &issuer,
        &[],
        "gw-test-0001",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (_, _, stranger_pem) = ca("a CA nobody trusts");
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        stranger_ca: write("stranger-ca.pem", &stranger_pem),
    }
}

/// Mosquitto with its usual plain loopback listener and a TLS listener that requires a client
/// certificate signed by the test CA; returns the broker and the TLS URL. `None`: Mosquitto is absent.
fn broker_with_tls(pki: &Pki) -> Option<(TestBroker, String)> {
    let tls = free_loopback_port().unwrap();
    let extra = format!(
        "listener {port} 127.0.0.1\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n",
        port = tls.port(),
        ca = pki.ca.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    );
    let broker = TestBroker::start_mosquitto_with(&extra)?.unwrap();
    Some((broker, format!("mqtts://127.0.0.1:{}", tls.port())))
}

/// A PKI in a temporary directory and a Mosquitto with its TLS listener; `None` (after saying "SKIPPED")
/// without Mosquitto.
fn tls_rig() -> Option<(tempfile::TempDir, Pki, TestBroker, String)> {
    phg_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let Some((broker, tls_url)) = broker_with_tls(&pki) else {
        eprintln!("SKIPPED tls: mosquitto not installed (CI installs it)");
        return None;
    };
    Some((dir, pki, broker, tls_url))
}

/// The gateway's TLS files: the test CA and its client certificate.
fn gateway_tls(pki: &Pki) -> TlsFiles {
    TlsFiles {
        ca: pki.ca.clone(),
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_go_over_tls_with_a_client_certificate_and_nowhere_without_one() {
    let Some((_dir, pki, broker, tls_url)) = tls_rig() else {
        return;
    };
    let mut sub = Subscriber::connect(broker.addr(), READINGS_TOPIC)
        .await
        .unwrap();

    // No client certificate: the broker refuses the handshake; the readings wait in the journal.
    let refused = |tls: TlsFiles| {
        let journal_dir = tempfile::tempdir().unwrap();
        let journal = open_journal(journal_dir.path()).unwrap();
        append_readings(&journal, &["gls-tls"], 0, 5).unwrap();
        let mut cfg = uplink_config(&tls_url, MqttVersion::V5);
        cfg.tls = Some(tls);
        (journal_dir, journal, cfg)
    };
    for (what, tls) in [
        (
            "no client certificate",
            TlsFiles {
                ca: pki.ca.clone(),
                client_cert: None,
                client_key: None,
            },
        ),
        (
            "a broker certificate it cannot verify",
            TlsFiles {
                ca: pki.stranger_ca.clone(),
                client_cert: Some(pki.client_cert.clone()),
                client_key: Some(pki.client_key.clone()),
            },
        ),
    ] {
        let (_dir, journal, cfg) = refused(tls);
        let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stats = up.stop().await.unwrap().unwrap();
        assert_eq!(stats.connections, 0, "{what}: {stats:?}");
        assert_eq!(depth(&journal).unwrap(), 5, "{what}: the readings wait");
    }
    assert!(
        sub.collect_for(Duration::from_millis(200)).await.is_empty(),
        "nothing got through without a valid certificate pair"
    );

    // The gateway's own certificate and the CA that signed the broker's: delivered, and acked.
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = open_journal(journal_dir.path()).unwrap();
    append_readings(&journal, &["gls-tls"], 0, 20).unwrap();
    let mut cfg = uplink_config(&tls_url, MqttVersion::V5);
    cfg.tls = Some(gateway_tls(&pki));
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    let got = sub.wait_for(20, Duration::from_secs(20)).await.len();
    assert_eq!(got, 20, "all 20 readings arrive through the TLS listener");
    assert!(wait_for_depth(&journal, 0, Duration::from_secs(10)).await);
    let stats = up.stop().await.unwrap().unwrap();
    assert_eq!((stats.connections, stats.delivered), (1, 20), "{stats:?}");
}

/// The CRM side over the same TLS listener: the gateway's uplink publishes real reading messages with its
/// client certificate, and ingest (`mqtts://` with its own client certificate) takes them from its shared
/// subscription and stores each once. Ingest configured with a CA that did not sign the broker's
/// certificate stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_consumes_over_tls_with_its_client_certificate() {
    use gateway::journal::NewRecord;
    use ingest::store::Store as _;
    let Some((dir, pki, _broker, tls_url)) = tls_rig() else {
        return;
    };
    let ingest_config = |name: &str, ca: &Path| {
        let text = format!(
            "instance = \"{name}\"\n\
             [mqtt]\nbroker = \"{tls_url}\"\nkeep_alive_s = 5\n\
             [mqtt.tls]\nca = \"{ca}\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\n\
             [database]\nurl = \"sqlite://{db}\"\n",
            ca = ca.display(),
            cert = pki.client_cert.display(),
            key = pki.client_key.display(),
            db = dir.path().join(format!("{name}.sqlite")).display(),
        );
        ingest::config::Config::parse(&text, Path::new("ingest-tls.toml")).unwrap()
    };

    // The wrong CA: ingest never connects, so it stores nothing.
    let doubtful = ingest::service::start(ingest_config("doubtful", &pki.stranger_ca))
        .await
        .unwrap();
    let trusting = ingest::service::start(ingest_config("trusting", &pki.ca))
        .await
        .unwrap();

    let journal_dir = tempfile::tempdir().unwrap();
    let journal = open_journal(journal_dir.path()).unwrap();
    let t0 = 1_763_900_000;
    let record = |id: String, patient: &str, n: u64| NewRecord {
        device: "gls-tls".into(),
        device_seq: Some(n),
        topic: "phg/v1/gw-test/readings".into(),
        payload: ingest::testing::glucose_message(&id, patient, 100, t0 + n as i64 * 60)
            .into_bytes(),
        reading_id: id,
    };
    let mut cfg = uplink_config(&tls_url, MqttVersion::V5);
    cfg.tls = Some(gateway_tls(&pki));
    let up = RunningUplink::spawn(cfg, Arc::clone(&journal));
    let stored = |patient: &'static str| {
        let store = trusting.store().clone();
        async move { store.readings_of(patient, 1000).await.unwrap().len() }
    };

    // A shared subscription keeps nothing published before its first subscriber: probe readings go out
    // over TLS until ingest has stored one, so the readings below cannot race its subscription.
    let mut probes = 0u64;
    while stored("p-probe-1").await == 0 {
        assert!(probes < 100, "ingest never took a probe over TLS");
        journal
            .lock()
            .unwrap()
            .append(&[record(format!("tls-probe-{probes}"), "p-probe-1", probes)])
            .unwrap();
        up.wake.wake();
        probes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let readings: Vec<NewRecord> = (0..12)
        .map(|n| record(format!("tls-reading-{n}"), "p-0001", 1000 + n))
        .collect();
    journal.lock().unwrap().append(&readings).unwrap();
    up.wake.wake();
    assert!(
        wait_for_depth(&journal, 0, Duration::from_secs(20)).await,
        "published over TLS"
    );
    let mut got = 0;
    for _ in 0..200 {
        got = stored("p-0001").await;
        if got >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got, 12, "every reading stored once, through TLS");
    assert_eq!(doubtful.store().counts().await.unwrap().readings, 0);
    up.stop().await.unwrap().unwrap();
    trusting.stop().await;
    doubtful.stop().await;
}
