//! The BLE source through the unmodified btleplug stack (btleplug → bluez-async → libdbus) against our
//! BlueZ-compatible D-Bus service (`phg_tests::bluez`) on a private `dbus-daemon`, with the simulator's
//! device models answering GATT and the real pipeline and journal behind the collectors.
//!
//! One bus per test binary (libdbus reads `DBUS_SYSTEM_BUS_ADDRESS` once); the scenarios take turns on
//! it (`SERIAL`), each with its own `org.bluez` owner. Without `dbus-daemon` every scenario prints
//! "skipped" and returns.

// Test set-up unwraps/expects: a failure there is a broken test machine, and the panic says where.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use btleplug::api::Peripheral as _;
use btleplug::platform::Manager;
use gateway::journal::{Journal, JournalConfig};
use gateway::pipeline::{Bindings, Counters, Pipeline, writer};
use gateway::sources::ble::commands::{self, PairRequest};
use gateway::sources::ble::link::BleLink;
use gateway::sources::ble::store::{DeviceKind, DeviceStore, PairedDevice};
use gateway::sources::ble::{
    AdapterState, BleConfig, BleStatusHandle, SelectedAdapter, bindings_of, select_adapter,
    session_once,
};
use gateway::sources::collector::{CollectorConfig, Completion};
use gateway::sources::simulator::cuff::{CuffConfig, SimCuff};
use gateway::sources::simulator::glucometer::{GlucometerConfig, GlucometerFaults, SimGlucometer};
use gateway::sources::simulator::{SimDevice, unix_now};
use gateway::sources::{GattLink, LinkError, uuid};
use phg_tests::bluez::{FakeBluez, FakeDevice, system_bus};
use protocol::wire::Topics;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const METER: &str = "C0:26:DA:00:00:01";
const CUFF: &str = "C0:26:DA:00:00:02";
const STRANGER: &str = "C0:26:DA:00:00:99";

/// The bus, the fake BlueZ, a journal, a store; `None` (after printing "skipped") without dbus-daemon.
struct Rig {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    fake: FakeBluez,
    dir: tempfile::TempDir,
    journal: Arc<Mutex<Journal>>,
    store: DeviceStore,
}

async fn rig() -> Option<Rig> {
    phg_tests::init_tracing();
    let Some(address) = system_bus() else {
        println!("skipped: dbus-daemon not installed (CI installs it)");
        return None;
    };
    let serial = SERIAL.lock().await;
    let fake = FakeBluez::start(address).await.expect("fake org.bluez");
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(JournalConfig::new(dir.path().join("journal"))).unwrap();
    let store = DeviceStore::new(dir.path().join("ble"));
    Some(Rig {
        _serial: serial,
        fake,
        journal: Arc::new(Mutex::new(journal)),
        store,
        dir,
    })
}

impl Rig {
    fn cfg(&self) -> BleConfig {
        let mut c = BleConfig::new(self.dir.path().join("ble"));
        c.session_deadline = Duration::from_secs(20);
        c.op_timeout = Duration::from_secs(5);
        c.connect_timeout = Duration::from_secs(5);
        c.retry_base = Duration::from_millis(200);
        c.retry_max = Duration::from_secs(1);
        c.revisit_after = Duration::from_millis(300);
        c.adapter_poll = Duration::from_millis(200);
        c.collector = CollectorConfig {
            racp_timeout: Duration::from_secs(3),
            bp_idle: Duration::from_millis(400),
            ..CollectorConfig::default()
        };
        c
    }

    /// A pipeline bound as the allow-list says.
    fn pipeline(&self) -> Pipeline {
        let mut bindings = Bindings::default();
        bindings_of(&self.store.devices().unwrap(), &mut bindings);
        let (writer, _thread) =
            writer::spawn(self.journal.clone(), Arc::new(Notify::new()), 64).unwrap();
        Pipeline {
            gateway_id: "gw".into(),
            topics: Topics::for_gateway("gw"),
            bindings: Arc::new(bindings),
            journal: self.journal.clone(),
            writer,
            counters: Arc::new(Counters::default()),
        }
    }

    /// Journaled records: (cursor key, device_seq, payload JSON), in journal order.
    fn journaled(&self) -> Vec<(String, Option<u64>, serde_json::Value)> {
        let j = self.journal.lock().unwrap();
        j.pending(None, usize::MAX)
            .into_iter()
            .map(|r| {
                (
                    r.device.clone(),
                    r.device_seq,
                    serde_json::from_slice(&r.payload).unwrap(),
                )
            })
            .collect()
    }

    fn allow(&self, address: &str, kind: DeviceKind, patient: Option<&str>, users: &[(u8, &str)]) {
        self.store
            .put(PairedDevice {
                address: address.into(),
                kind,
                name: None,
                model: None,
                manufacturer: None,
                serial: None,
                patient: patient.map(str::to_owned),
                users: users.iter().map(|(u, p)| (*u, (*p).to_owned())).collect(),
                paired_at: 0,
            })
            .unwrap();
    }
}

async fn adapter() -> SelectedAdapter {
    let manager = Manager::new().await.expect("btleplug manager on the private bus");
    select_adapter(&manager, Some("hci0"))
        .await
        .expect("the fake adapter")
}

async fn peripheral(a: &SelectedAdapter, address: &str) -> btleplug::platform::Peripheral {
    use btleplug::api::Central as _;
    for p in a.adapter.peripherals().await.unwrap() {
        if p.address().to_string().eq_ignore_ascii_case(address) {
            return p;
        }
    }
    panic!("{address} not known to the adapter");
}

fn meter(n: usize, bonding: bool) -> SimDevice {
    let mut cfg = GlucometerConfig::new("meter");
    cfg.requires_bonding = bonding;
    let mut g = SimGlucometer::new(cfg);
    g.generate(n, unix_now(), 7).unwrap();
    SimDevice::glucometer(g)
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Glucose sequence numbers journaled, in journal order.
fn sequences(records: &[(String, Option<u64>, serde_json::Value)]) -> Vec<u64> {
    records.iter().filter_map(|(_, s, _)| *s).collect()
}

fn racp_writes(fake: &FakeBluez, address: &str) -> Vec<String> {
    fake.calls_to(address)
        .into_iter()
        .filter(|c| c.starts_with("WriteValue 2A52"))
        .collect()
}

/// Pair a meter with a passkey through `gateway pair`'s code path (scan → `Device1.Pair` with our
/// `Agent1` → trusted → Device Information → allow-list), then let the running source download 300
/// stored records with contexts: each accepted once, in order, each with its context, on its patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_with_passkey_then_download_300_records_with_contexts() {
    let Some(rig) = rig().await else { return };
    let device = meter(300, true);
    rig.fake
        .add_device(FakeDevice::new(METER, "Meter 1", device.clone()).with_passkey(492_731))
        .await
        .unwrap();
    let cfg = rig.cfg();
    let a = adapter().await;

    let found = commands::scan_candidates(&a, &rig.store, Duration::from_millis(300))
        .await
        .unwrap();
    let c = found.iter().find(|c| c.address == METER).expect("meter listed");
    assert_eq!(c.kind, DeviceKind::Glucometer);
    assert_eq!(c.name.as_deref(), Some("Meter 1"));
    assert!(c.rssi.is_some());

    // A wrong passkey: refused, nothing stored.
    let req = PairRequest {
        address: METER.to_lowercase(),
        patient: Some("p-0001".into()),
        users: BTreeMap::new(),
    };
    let wrong = commands::pair_and_store(&cfg, &a, &rig.store, &req, Some(Arc::new(|_: &str| Some(111_111))))
        .await;
    assert!(wrong.is_err(), "a wrong passkey must not pair");
    assert!(rig.store.devices().unwrap().is_empty());
    assert!(!rig.fake.is_paired(METER));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let paired = commands::pair_and_store(
        &cfg,
        &a,
        &rig.store,
        &req,
        Some(Arc::new(move |dev: &str| {
            seen2.lock().unwrap().push(dev.to_owned());
            Some(492_731)
        })),
    )
    .await
    .expect("pairing with the right passkey");
    assert_eq!(paired.address, METER);
    assert_eq!(paired.model.as_deref(), Some("SimGluco 100"));
    assert_eq!(paired.serial.as_deref(), Some("SN-meter"));
    assert_eq!(seen.lock().unwrap().len(), 1, "the agent was asked once");
    assert!(rig.fake.is_paired(METER));
    assert!(rig.fake.calls_to(METER).contains(&"Trusted=true".to_owned()));

    let stop = CancellationToken::new();
    let status = BleStatusHandle::default();
    let source = tokio::spawn(gateway::sources::ble::run(
        cfg,
        rig.pipeline(),
        status.clone(),
        stop.clone(),
    ));
    let started = std::time::Instant::now();
    wait_until("300 records", Duration::from_secs(30), || {
        rig.journaled().len() >= 300 && status.snapshot().sessions_completed >= 1
    })
    .await;
    let took = started.elapsed();
    stop.cancel();
    source.await.unwrap();
    println!("300 records with contexts over btleplug/D-Bus in {took:?}");

    let records = rig.journaled();
    assert_eq!(sequences(&records), (0..300).collect::<Vec<_>>(), "all once, in order");
    for (_, seq, body) in &records {
        assert_eq!(body["patient"], "p-0001", "record {seq:?}");
        assert_eq!(body["sequence_number"].as_u64(), *seq);
        assert!(body["context"]["meal"].is_string() || body["context"]["meal"].is_object() || body["context"]["meal"].is_number(),
            "record {seq:?} carries its context: {}", body["context"]);
    }
    assert_eq!(racp_writes(&rig.fake, METER).first().map(String::as_str), Some("WriteValue 2A52 0101 -> ok"));
}

/// The link drops after record 150: the next session asks for records ≥ 150 (the first not accepted) and
/// the journal ends with every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_drop_at_record_150_resumes_at_first_record_not_accepted() {
    let Some(rig) = rig().await else { return };
    let device = meter(300, false);
    device
        .with_glucometer(|g| {
            g.set_faults(GlucometerFaults {
                drop_link_after_records: Some(150),
                ..Default::default()
            })
        })
        .unwrap();
    rig.fake
        .add_device(FakeDevice::new(METER, "Meter 1", device.clone()))
        .await
        .unwrap();
    rig.allow(METER, DeviceKind::Glucometer, Some("p-0001"), &[]);
    let cfg = rig.cfg();
    let a = adapter().await;
    let paired = rig.store.device(METER).unwrap().unwrap();
    let pipeline = rig.pipeline();

    let first = session_once(&a, peripheral(&a, METER).await, &paired, &pipeline, &cfg)
        .await
        .expect("first session");
    assert_eq!(first.completion, Completion::Incomplete);
    assert_eq!(sequences(&rig.journaled()), (0..150).collect::<Vec<_>>());

    device
        .with_glucometer(|g| g.set_faults(GlucometerFaults::default()))
        .unwrap();
    let second = session_once(&a, peripheral(&a, METER).await, &paired, &pipeline, &cfg)
        .await
        .expect("second session");
    assert_eq!(second.completion, Completion::Complete);
    assert_eq!(
        racp_writes(&rig.fake, METER),
        vec![
            "WriteValue 2A52 0101 -> ok".to_owned(),
            // ≥ 150 (0x0096): the first record not accepted.
            "WriteValue 2A52 0103019600 -> ok".to_owned()
        ]
    );
    assert_eq!(sequences(&rig.journaled()), (0..300).collect::<Vec<_>>(), "nothing lost or doubled");
}
