//! The gateway as a user runs it: the real `gateway` binary as a child process (`gateway run --config`,
//! `gateway demo`), a real broker (Mosquitto when installed, else the embedded rumqttd), a real journal on
//! disk, simulated devices inside the gateway process (configured with `[[simulated]]`).
//!
//! What is checked is what a user relies on (DESIGN.md promises 2–4, 6, 7): every stored reading arrives,
//! once per id, in order per device, on the right patient; a broker outage, a `kill -9` or a full journal
//! loses nothing (the device keeps what the journal could not take); a torn journal tail is recovered and
//! reported; a bad configuration is one clear `error:` line and starts nothing.
//!
//! Glucose readings are checked by their GLS sequence number: the simulated meter numbers its records
//! 0..N-1, and the reading id is device + sequence number, so "every number, first arrivals in order, a
//! repeated id is the same number" is the whole of promise 2 and 3 for a meter.

// A test binary: a failed set-up step is a failed test, also in the helpers below.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phg_tests::process::{Exit, GatewayProcess, log_field};
use phg_tests::{Received, Subscriber, TestBroker};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------------

/// A `gateway run` configuration: `[mqtt]`, `[journal]` (with `journal_extra` lines) and `body`
/// (bindings and simulated devices).
fn config(
    gateway_id: &str,
    broker: &str,
    journal: &Path,
    journal_extra: &str,
    body: &str,
) -> String {
    format!(
        "gateway_id = \"{gateway_id}\"\n\
         \n\
         [mqtt]\n\
         broker = \"{broker}\"\n\
         keep_alive_s = 5\n\
         \n\
         [journal]\n\
         dir = {journal:?}\n\
         {journal_extra}\n\
         \n\
         {body}\n",
        journal = journal.display().to_string(),
    )
}

/// The MQTT version the broker speaks: the default (5) for Mosquitto, 3.1.1 for the embedded rumqttd.
fn for_broker(broker: &TestBroker, config: String) -> String {
    let version = format!(
        "version = \"{}\"\n\n[journal]",
        broker.mqtt_version_setting()
    );
    config.replacen("[journal]", &version, 1)
}

fn glucometer(id: &str, stored: usize, extra: &str) -> String {
    format!(
        "[[simulated]]\nkind = \"glucometer\"\nid = \"{id}\"\nstored = {stored}\nconnect_every_s = 1\n{extra}\n"
    )
}

fn cuff(id: &str, users: &[u8], stored: usize, extra: &str) -> String {
    format!(
        "[[simulated]]\nkind = \"cuff\"\nid = \"{id}\"\nusers = {users:?}\nstored = {stored}\nconnect_every_s = 1\n{extra}\n"
    )
}

fn binding(device: &str, user: Option<u8>, patient: &str) -> String {
    let user = user.map(|u| format!("user_id = {u}\n")).unwrap_or_default();
    format!("[[bindings]]\ndevice = \"{device}\"\n{user}patient = \"{patient}\"\n")
}

// ------------------------------------------------------------------------------------------------------
// What arrived
// ------------------------------------------------------------------------------------------------------

/// One reading message, as the CRM sees it (`phg.reading/1`).
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    id: String,
    device: String,
    user: Option<u64>,
    patient: String,
    /// GLS sequence number (glucose).
    seq: Option<u64>,
    /// The device's own time stamp.
    device_time: Option<String>,
    /// Systolic / diastolic (blood pressure).
    bp: Option<(f64, f64)>,
}

impl Reading {
    /// The series a reading belongs to: a device, or one user of a multi-user cuff.
    fn series(&self) -> String {
        match self.user {
            Some(u) => format!("{}#user{u}", self.device),
            None => self.device.clone(),
        }
    }

    /// What makes it the same physical measurement (promise 3). A glucose record is its device and
    /// sequence number (the simulated meter regenerates its store at every start with time stamps relative
    /// to "now", so time is not part of it); a BP reading is device, user, time stamp and values.
    fn identity(&self) -> String {
        match self.seq {
            Some(seq) => format!("{}/{}/{seq}", self.device, self.patient),
            None => format!(
                "{}/{}/{:?}/{:?}/{:?}",
                self.device, self.patient, self.user, self.device_time, self.bp
            ),
        }
    }
}

fn topic(gateway_id: &str, channel: &str) -> String {
    format!("phg/v1/{gateway_id}/{channel}")
}

fn readings(received: &[Received], gateway_id: &str) -> Vec<Reading> {
    let t = topic(gateway_id, "readings");
    received
        .iter()
        .filter(|m| m.topic == t)
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
                panic!(
                    "reading payload is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&m.payload)
                )
            });
            let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
            let bp = v.pointer("/blood_pressure").map(|b| {
                (
                    b["systolic"].as_f64().unwrap_or(f64::NAN),
                    b["diastolic"].as_f64().unwrap_or(f64::NAN),
                )
            });
            Reading {
                id: s("/id").expect("a reading has an id"),
                device: s("/device/id").expect("a reading has a device id"),
                user: v.pointer("/device/user_id").and_then(Value::as_u64),
                patient: s("/patient").expect("a reading has a patient"),
                seq: v.pointer("/sequence_number").and_then(Value::as_u64),
                device_time: s("/time/device"),
                bp,
            }
        })
        .collect()
}

/// The `event` objects on `…/events`.
fn events(received: &[Received], gateway_id: &str) -> Vec<Value> {
    let t = topic(gateway_id, "events");
    received
        .iter()
        .filter(|m| m.topic == t)
        .map(|m| {
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            v["event"].clone()
        })
        .collect()
}

/// Readings by first arrival, per series, and what repeated.
#[derive(Debug, Default)]
struct Arrivals {
    /// Per series, the first copy of each reading id, in arrival order.
    first: BTreeMap<String, Vec<Reading>>,
    /// Copies of an id already seen.
    duplicates: usize,
    /// Ids whose copies are not the same measurement (must be none).
    conflicting: Vec<String>,
}

impl Arrivals {
    fn of(rs: &[Reading]) -> Self {
        let mut a = Arrivals::default();
        let mut seen: HashMap<&str, &Reading> = HashMap::new();
        for r in rs {
            match seen.get(r.id.as_str()) {
                Some(first) => {
                    a.duplicates += 1;
                    if first.identity() != r.identity() {
                        a.conflicting.push(format!("{}: {first:?} vs {r:?}", r.id));
                    }
                }
                None => {
                    seen.insert(&r.id, r);
                    a.first.entry(r.series()).or_default().push(r.clone());
                }
            }
        }
        a
    }

    /// A glucometer's sequence numbers in order of first arrival.
    fn seqs(&self, device: &str) -> Vec<u64> {
        self.first
            .get(device)
            .map(|rs| rs.iter().filter_map(|r| r.seq).collect())
            .unwrap_or_default()
    }

    fn distinct(&self) -> usize {
        self.first.values().map(Vec::len).sum()
    }
}

/// `got` is exactly `0..n` (so complete, each once by first arrival, and in order); otherwise a short
/// description of what is wrong.
fn check_sequence(device: &str, got: &[u64], n: u64) -> Result<(), String> {
    if got.iter().copied().eq(0..n) {
        return Ok(());
    }
    let set: BTreeSet<u64> = got.iter().copied().collect();
    let missing: Vec<u64> = (0..n).filter(|s| !set.contains(s)).collect();
    let out_of_order = got.windows(2).filter(|w| w[0] >= w[1]).count();
    Err(format!(
        "{device}: {} first arrivals for {n} records; missing {} (first few {:?}); {out_of_order} out of order",
        got.len(),
        missing.len(),
        &missing[..missing.len().min(10)]
    ))
}

/// Waits (up to `within`) until every one of `device`'s `stored` records and the `journal_full` event
/// have arrived at `sub`, as they must once the broker is back after the journal filled.
async fn all_records_and_the_journal_full_event(
    sub: &mut Subscriber,
    gw: &GatewayProcess,
    (gateway, device): (&str, &str),
    stored: u64,
    within: Duration,
) {
    let mut p = Progress::new(gateway);
    let done = collect_until(sub, within, |r| {
        let p = p.update(r);
        p.glucose(device) >= stored as usize && p.events.iter().any(|e| e == "journal_full")
    })
    .await;
    assert!(
        done,
        "{} of {stored} records, events {:?}; stderr:\n{}",
        p.glucose(device),
        p.events,
        gw.stderr().text()
    );
}

/// Collects until `done` holds for what has arrived, or `timeout`.
async fn collect_until(
    sub: &mut Subscriber,
    timeout: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done(sub.received()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sub.collect_for(Duration::from_millis(50)).await;
    }
}

/// What has arrived so far, parsed incrementally (a wait loop looks every 50 ms; re-parsing thousands of
/// messages each time would be the test's own bottleneck).
#[derive(Debug, Default)]
struct Progress {
    gateway_id: String,
    parsed: usize,
    /// Distinct GLS sequence numbers per device.
    seqs: HashMap<String, BTreeSet<u64>>,
    /// Event types seen.
    events: Vec<String>,
}

impl Progress {
    fn new(gateway_id: &str) -> Self {
        Progress {
            gateway_id: gateway_id.to_owned(),
            ..Progress::default()
        }
    }

    fn update(&mut self, received: &[Received]) -> &Self {
        let new = received.get(self.parsed..).unwrap_or_default();
        for r in readings(new, &self.gateway_id) {
            if let Some(seq) = r.seq {
                self.seqs.entry(r.device).or_default().insert(seq);
            }
        }
        self.events.extend(
            events(new, &self.gateway_id)
                .iter()
                .filter_map(|e| e["type"].as_str().map(str::to_owned)),
        );
        self.parsed = received.len();
        self
    }

    /// Distinct glucose records of `device` so far.
    fn glucose(&self, device: &str) -> usize {
        self.seqs.get(device).map_or(0, BTreeSet::len)
    }
}

/// The `stopped accepted=… delivered=… pending=…` line of a gracefully stopped gateway, as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stopped {
    accepted: u64,
    /// Edge alert decisions journaled (they are delivered too, on `…/alerts`).
    alerts: u64,
    delivered: u64,
    pending: u64,
}

fn stopped(exit: &Exit) -> Stopped {
    let line = exit
        .stderr
        .iter()
        .find(|l| l.contains(" stopped ") && l.contains("accepted="))
        .unwrap_or_else(|| panic!("no `stopped` line in:\n{}", exit.stderr.join("\n")));
    let n = |k| {
        log_field(line, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {line}"))
    };
    Stopped {
        accepted: n("accepted"),
        alerts: n("alerts"),
        delivered: n("delivered"),
        pending: n("pending"),
    }
}

fn assert_clean_exit(exit: &Exit) {
    assert!(
        exit.status.success(),
        "gateway exited with {}; stderr:\n{}",
        exit.status,
        exit.stderr.join("\n")
    );
}

fn skip(test: &str, why: &str) {
    println!("SKIPPED {test}: {why}");
}

/// A loopback port nobody listens on (bound, then released).
fn closed_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

// ------------------------------------------------------------------------------------------------------
// 1. The normal case
// ------------------------------------------------------------------------------------------------------

/// A meter with 300 stored records and a two-user cuff, both bound: every glucose record arrives exactly
/// once, in sequence order; every cuff reading once, on its user's patient — although both devices are
/// reconnected every second (the cuff re-sends its whole memory each time); SIGTERM stops it with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_arrive_once_per_id_in_order_per_device() {
    phg_tests::init_tracing();
    let t0 = Instant::now();
    const GW: &str = "gw-e2e-once";
    const STORED: u64 = 300;
    const CUFF_STORED: usize = 6;
    let broker = TestBroker::start().unwrap();
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = [
        glucometer("meter-1", STORED as usize, ""),
        cuff("cuff-1", &[1, 2], CUFF_STORED, ""),
        binding("meter-1", None, "p-glu-0001"),
        binding("cuff-1", Some(1), "p-bp-0001"),
        binding("cuff-1", Some(2), "p-bp-0002"),
    ]
    .concat();
    let cfg = for_broker(
        &broker,
        config(GW, &broker.url(), &dir.path().join("journal"), "", &body),
    );
    let gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();

    let all = STORED as usize + CUFF_STORED;
    let arrived = collect_until(&mut sub, Duration::from_secs(20), |r| {
        readings(r, GW).len() >= all
    })
    .await;
    assert!(
        arrived,
        "{} of {all} readings arrived; gateway stderr:\n{}",
        readings(sub.received(), GW).len(),
        gw.stderr().text()
    );
    let first_done = t0.elapsed();
    // Several more sessions of both devices (the cuff's idle timer is 2 s): nothing may arrive twice.
    sub.collect_for(Duration::from_secs(4)).await;
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    sub.collect_for(Duration::from_millis(300)).await;
    assert_clean_exit(&exit);

    let rs = readings(sub.received(), GW);
    let a = Arrivals::of(&rs);
    assert_eq!(
        check_sequence("meter-1", &a.seqs("meter-1"), STORED),
        Ok(())
    );
    assert_eq!(a.duplicates, 0, "no faults: each reading exactly once");
    assert!(a.conflicting.is_empty(), "{:?}", a.conflicting);
    let bp: Vec<&Reading> = a
        .first
        .iter()
        .filter(|(k, _)| k.starts_with("cuff-1"))
        .flat_map(|(_, v)| v)
        .collect();
    assert_eq!(bp.len(), CUFF_STORED, "cuff readings: {bp:#?}");
    for r in &bp {
        let want = match r.user {
            Some(1) => "p-bp-0001",
            Some(2) => "p-bp-0002",
            other => panic!("cuff reading without a bound user ({other:?}): {r:?}"),
        };
        assert_eq!(
            r.patient, want,
            "promise 6: each cuff user's reading lands on that user's patient"
        );
    }
    assert_eq!(
        a.first.len(),
        3,
        "meter-1, cuff-1#user1, cuff-1#user2: {:?}",
        a.first.keys()
    );
    for (series, rs) in &a.first {
        // Per series, first arrivals in the device's order (time stamps; sequence numbers checked above).
        let times: Vec<&str> = rs.iter().filter_map(|r| r.device_time.as_deref()).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "{series}: out of order {times:?}"
        );
    }
    assert!(
        rs.iter()
            .all(|r| r.patient == "p-glu-0001" || r.device != "meter-1")
    );
    let ev = events(sub.received(), GW);
    assert!(
        ev.is_empty(),
        "no events expected (everything bound and valid): {ev:?}"
    );
    let s = stopped(&exit);
    assert_eq!(s.accepted, all as u64, "{s:?}");
    assert_eq!(s.pending, 0, "everything delivered before exit: {s:?}");
    // Every reading, and every edge alert the simulated values raised (on `…/alerts`), exactly once.
    let alert_messages = sub
        .received()
        .iter()
        .filter(|r| r.topic == topic(GW, "alerts"))
        .count() as u64;
    assert_eq!(s.alerts, alert_messages, "{s:?}");
    assert_eq!(s.delivered, all as u64 + s.alerts, "{s:?}");
    println!(
        "readings_arrive_once: {} readings ({STORED} glucose + {CUFF_STORED} BP) delivered once each in {first_done:?}; \
         broker {}; total {:?}",
        rs.len(),
        broker.kind(),
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 2. Broker outage
// ------------------------------------------------------------------------------------------------------

/// Two meters (4 000 and 2 500 stored records, plus a new measurement every second) and a cuff measuring
/// every second. While readings flow, the broker stops (cleanly) for 3 s and comes back on the same port:
/// every glucose record 0..max arrives, first arrivals in order per device, a repeated id is the same
/// reading, and nothing accepted is missing (received + still pending ≥ accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_mid_stream_loses_nothing() {
    phg_tests::init_tracing();
    const TEST: &str = "broker_outage_mid_stream_loses_nothing";
    let t0 = Instant::now();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            TEST,
            "needs a broker that can be stopped and restarted (mosquitto); rumqttd cannot",
        );
    };
    let mut broker = broker.unwrap();
    const GW: &str = "gw-e2e-outage";
    let (a_stored, b_stored) = (4000u64, 2500u64);
    // Persistent: what the broker took before its stop reaches us after its restart.
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        &format!("phg/v1/{GW}/#"),
        &phg_tests::unique_id("sub-outage"),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = [
        glucometer("meter-a", a_stored as usize, "measure_every_s = 1"),
        glucometer("meter-b", b_stored as usize, "measure_every_s = 1"),
        cuff("cuff-o", &[1], 4, "measure_every_s = 1"),
        binding("meter-a", None, "p-out-000a"),
        binding("meter-b", None, "p-out-000b"),
        binding("cuff-o", None, "p-out-000c"),
    ]
    .concat();
    let cfg = config(GW, &broker.url(), &dir.path().join("journal"), "", &body);
    let gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();

    assert!(
        collect_until(&mut sub, Duration::from_secs(20), |r| readings(r, GW).len()
            >= 300)
        .await,
        "no flow before the outage; stderr:\n{}",
        gw.stderr().text()
    );
    let before = readings(sub.received(), GW).len();
    broker.stop().unwrap();
    let stopped_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart().unwrap();
    let before_restart = readings(sub.received(), GW).len();
    println!(
        "{TEST}: broker stopped at {stopped_at:?} after {before} readings had arrived ({before_restart} once the stop \
         was complete); restarted 3 s later"
    );

    let mut p = Progress::new(GW);
    let done = collect_until(&mut sub, Duration::from_secs(30), |r| {
        let p = p.update(r);
        p.glucose("meter-a") >= a_stored as usize && p.glucose("meter-b") >= b_stored as usize
    })
    .await;
    assert!(
        done,
        "after the outage: meter-a {} of {a_stored}, meter-b {} of {b_stored}; gateway stderr:\n{}",
        p.glucose("meter-a"),
        p.glucose("meter-b"),
        gw.stderr().text()
    );
    // Live readings keep flowing after the backlog.
    sub.collect_for(Duration::from_secs(2)).await;
    let reconnects = gw
        .stderr()
        .all()
        .iter()
        .filter(|l| l.contains("cannot connect") || l.contains("connection lost"))
        .count();
    let exit = gw.terminate(Duration::from_secs(20)).await.unwrap();
    sub.collect_for(Duration::from_millis(500)).await;
    assert_clean_exit(&exit);

    let rs = readings(sub.received(), GW);
    let a = Arrivals::of(&rs);
    assert!(
        a.conflicting.is_empty(),
        "same id, different reading: {:?}",
        a.conflicting
    );
    for (device, stored) in [("meter-a", a_stored), ("meter-b", b_stored)] {
        let seqs = a.seqs(device);
        let max = seqs.iter().copied().max().unwrap_or(0);
        assert!(max + 1 >= stored, "{device}: only up to {max}");
        // Complete up to the newest record seen, and in order: a gap would be a lost reading.
        assert_eq!(check_sequence(device, &seqs, max + 1), Ok(()));
    }
    let cuff: Vec<&Reading> = a
        .first
        .get("cuff-o#user1")
        .or_else(|| a.first.get("cuff-o"))
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    assert!(cuff.len() >= 4, "cuff readings: {}", cuff.len());
    let times: Vec<&str> = cuff
        .iter()
        .filter_map(|r| r.device_time.as_deref())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "cuff first arrivals out of order or repeated: {times:?}"
    );
    let s = stopped(&exit);
    assert!(
        a.distinct() as u64 + s.pending >= s.accepted,
        "accepted readings missing: {} distinct received + {} pending < {} accepted",
        a.distinct(),
        s.pending,
        s.accepted
    );
    assert!(
        a.distinct() as u64 <= s.accepted,
        "more distinct readings than accepted: {} > {s:?}",
        a.distinct()
    );
    println!(
        "{TEST}: {} accepted, {} distinct received ({} messages, {} duplicates), {} pending at exit; \
         {reconnects} uplink reconnect warnings; total {:?}",
        s.accepted,
        a.distinct(),
        rs.len(),
        a.duplicates,
        s.pending,
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 3. kill -9
// ------------------------------------------------------------------------------------------------------

/// A tiny xorshift generator: the kill moments, reproducible with `PHG_E2E_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> (Self, u64) {
        let seed = std::env::var("PHG_E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        (Rng(seed), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Two meters with 30 000 stored records each; the gateway is killed with SIGKILL 50 times
/// (`PHG_E2E_KILLS`), each time 0–300 ms after the run's first record arrived, and restarted on the same
/// journal; every tenth kill the broker is restarted too (Mosquitto; an independent persistent subscriber
/// counts across its restarts). At the end every record 0..29 999 of each meter arrived, the first
/// arrivals are in order, a repeated reading id is the same record (and a record has one id), and each
/// restart's journal recovery was reported (and found no corruption).
///
/// Why wait for a first record: a debug build on a busy CI machine takes seconds to start (the simulated
/// stores are generated at start), so fixed delays killed idle gateways; waiting for a delivery puts each
/// kill into a burst — records being downloaded, journaled and awaiting PUBACK, the case promise 2 is
/// about. Why 2 × 30 000: how many records a run delivers before its kill depends on the machine's load
/// (measured here: ~1 700 on a quiet machine, ~400 with five other builds running); 60 000 keep most of
/// the kills in bursts on a quiet CI machine without making a loaded one crawl for minutes. The simulated meter lives in the gateway process and regenerates
/// the same store at each start; the cursor in the journal says where the next session resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_loses_no_accepted_reading() {
    phg_tests::init_tracing();
    const TEST: &str = "sigkill_during_a_burst_loses_no_accepted_reading";
    const GW: &str = "gw-e2e-kill";
    const STORED: u64 = 30_000;
    // Two meters. Each kill waits for the run's first delivered record and then falls 0–300 ms later, so
    // it lands in a burst (records being downloaded, journaled and awaiting PUBACK) however slow the
    // start is on a busy machine.
    const METERS: [&str; 2] = ["meter-k", "meter-k2"];
    // Issue 11: at least 50 kills in CI (about a minute here); more with PHG_E2E_KILLS.
    let kills: usize = std::env::var("PHG_E2E_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    const BROKER_RESTART_EVERY: usize = 10;
    let t0 = Instant::now();
    let mut broker = TestBroker::start().unwrap();
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        &format!("phg/v1/{GW}/#"),
        &phg_tests::unique_id("sub-kill"),
    )
    .await
    .unwrap();
    let mut broker_restarts = 0usize;
    let dir = tempfile::tempdir().unwrap();
    let body: String = METERS
        .iter()
        .enumerate()
        .map(|(i, m)| {
            glucometer(m, STORED as usize, "") + &binding(m, None, &format!("p-kill-000{}", i + 1))
        })
        .collect();
    // This test is about the journal and the uplink: edge alerts are off, so that what the subscriber
    // counts is readings (their replay after a kill is gateway/src/alerts.rs's own tests).
    let body = format!("{body}[alerts]\nenabled = false\n");
    let total = |p: &Progress| METERS.iter().map(|m| p.glucose(m)).sum::<usize>();
    let all = STORED as usize * METERS.len();
    let cfg = for_broker(
        &broker,
        config(GW, &broker.url(), &dir.path().join("journal"), "", &body),
    );
    let cfg_path = dir.path().join("gateway.toml");
    let (mut rng, seed) = Rng::new();
    let mut p = Progress::new(GW);

    let mut torn_total = 0u64;
    let mut mid_download = 0usize;
    let mut previous_stderr: Option<Vec<String>> = None;
    for kill in 0..=kills {
        let gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
        let opened = gw
            .stderr()
            .wait_for("journal: opened", 0, Duration::from_secs(10))
            .await;
        let opened = opened.unwrap_or_else(|| {
            panic!(
                "start {kill}: no journal line; stderr:\n{}",
                gw.stderr().text()
            )
        });
        if kill > 0 {
            // After a kill the journal replays what the killed process wrote and says what it found.
            let segments: u64 = log_field(&opened, "segments")
                .and_then(|v| v.parse().ok())
                .unwrap();
            let pending: u64 = log_field(&opened, "pending")
                .and_then(|v| v.parse().ok())
                .unwrap();
            let torn: u64 = log_field(&opened, "torn_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap();
            assert!(
                segments >= 1,
                "restart {kill}: no segment replayed: {opened}"
            );
            assert!(
                !opened.contains("corruption"),
                "restart {kill}: a kill -9 is not corruption: {opened}"
            );
            if let Some(damage) = gw.stderr().find("journal recovered from damage", 0) {
                assert_eq!(log_field(&damage, "corrupt_frames"), Some("0"), "{damage}");
                assert_eq!(log_field(&damage, "missing_records"), Some("0"), "{damage}");
                assert!(torn > 0, "damage reported without torn bytes: {damage}");
            }
            torn_total += torn;
            println!(
                "{TEST}: restart {kill}: journal replayed {segments} segment(s), {pending} pending, {torn} torn bytes"
            );
        }
        if kill == kills {
            // The last run is left alone: everything must arrive.
            let done = collect_until(&mut sub, Duration::from_secs(90), |r| {
                total(p.update(r)) >= all
            })
            .await;
            assert!(
                done,
                "{} of {all} records after {kills} kills; last stderr:\n{}\nprevious:\n{}",
                total(&p),
                gw.stderr().text(),
                previous_stderr.unwrap_or_default().join("\n")
            );
            let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
            assert_clean_exit(&exit);
            assert_eq!(stopped(&exit).pending, 0, "everything delivered");
            break;
        }
        let before = total(p.update(sub.received()));
        if before < all {
            collect_until(&mut sub, Duration::from_secs(10), |r| {
                total(p.update(r)) > before
            })
            .await;
        }
        let delay = gw.uptime() + Duration::from_millis(rng.below(301));
        tokio::time::sleep(delay.saturating_sub(gw.uptime())).await;
        let seen = total(p.update(sub.received()));
        let exit = gw.kill9().unwrap();
        assert!(!exit.status.success(), "SIGKILL is not a clean exit");
        if seen < all {
            mid_download += 1;
        }
        println!(
            "{TEST}: kill {} at {delay:?} after start: {seen} of {all} records had arrived",
            kill + 1
        );
        previous_stderr = Some(exit.stderr);
        if (kill + 1) % BROKER_RESTART_EVERY == 0 && broker.can_restart() {
            broker.restart().unwrap();
            broker_restarts += 1;
        }
    }
    sub.collect_for(Duration::from_millis(300)).await;

    let rs = readings(sub.received(), GW);
    let a = Arrivals::of(&rs);
    assert!(
        a.conflicting.is_empty(),
        "same id, different record: {:?}",
        a.conflicting
    );
    for m in METERS {
        assert_eq!(check_sequence(m, &a.seqs(m), STORED), Ok(()));
    }
    // Same id ⇔ same sequence number (per meter), both ways.
    let mut ids_per_seq: BTreeMap<(&str, u64), BTreeSet<&str>> = BTreeMap::new();
    for r in &rs {
        ids_per_seq
            .entry((&r.device, r.seq.unwrap()))
            .or_default()
            .insert(&r.id);
    }
    assert!(
        ids_per_seq.values().all(|ids| ids.len() == 1),
        "a record under two ids"
    );
    println!(
        "{TEST}: seed {seed}: {kills} kills ({mid_download} before all {all} records had arrived), \
         {broker_restarts} broker restarts, {} messages for {all} records = {} duplicates, \
         {torn_total} torn bytes in total; broker {}; {:?}",
        rs.len(),
        a.duplicates,
        broker.kind(),
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 4. Journal full
// ------------------------------------------------------------------------------------------------------

/// The broker is down and the journal holds at most 50 records; a meter has 200. The journal fills, the
/// download stops, a `journal_full` event is journaled, the gateway keeps running. When the broker comes
/// back every record 0..199 arrives (the meter kept what the journal could not take; later sessions
/// resume at the cursor), and so does the `journal_full` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_full_stops_downloading_and_nothing_is_lost() {
    phg_tests::init_tracing();
    const TEST: &str = "journal_full_stops_downloading_and_nothing_is_lost";
    const GW: &str = "gw-e2e-full";
    const STORED: u64 = 200;
    const MAX_RECORDS: u64 = 50;
    let t0 = Instant::now();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            TEST,
            "needs a broker that can be down at first and started later (mosquitto)",
        );
    };
    let mut broker = broker.unwrap();
    // Subscribed before the broker goes down: its session (and the queue) survives the stop.
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        &format!("phg/v1/{GW}/#"),
        &phg_tests::unique_id("sub-full"),
    )
    .await
    .unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = [
        glucometer("meter-f", STORED as usize, ""),
        binding("meter-f", None, "p-full-0001"),
    ]
    .concat();
    // max_bytes at the configuration's minimum is still far above 50 readings: the record bound binds.
    let bounds = format!("max_records = {MAX_RECORDS}\nmax_bytes = 1048576");
    let cfg = config(
        GW,
        &broker.url(),
        &dir.path().join("journal"),
        &bounds,
        &body,
    );
    let mut gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();

    let full = gw
        .stderr()
        .wait_for("journal full", 0, Duration::from_secs(15))
        .await;
    assert!(
        full.is_some(),
        "the journal never filled; stderr:\n{}",
        gw.stderr().text()
    );
    // Later sessions hit the full journal again; the gateway keeps running all along.
    let from = gw.stderr().len();
    let again = gw
        .stderr()
        .wait_for("journal full", from, Duration::from_secs(5))
        .await;
    assert!(
        again.is_some(),
        "no later session met the full journal; stderr:\n{}",
        gw.stderr().text()
    );
    assert!(
        gw.is_running().unwrap(),
        "a full journal must not stop the gateway"
    );
    let full_at = t0.elapsed();

    broker.restart().unwrap();
    all_records_and_the_journal_full_event(
        &mut sub,
        &gw,
        (GW, "meter-f"),
        STORED,
        Duration::from_secs(40),
    )
    .await;
    let fulls = gw
        .stderr()
        .all()
        .iter()
        .filter(|l| l.contains("journal full"))
        .count();
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    sub.collect_for(Duration::from_millis(300)).await;
    assert_clean_exit(&exit);

    let rs = readings(sub.received(), GW);
    let a = Arrivals::of(&rs);
    assert!(a.conflicting.is_empty(), "{:?}", a.conflicting);
    assert_eq!(
        check_sequence("meter-f", &a.seqs("meter-f"), STORED),
        Ok(())
    );
    let ev = events(sub.received(), GW);
    let jf: Vec<&Value> = ev.iter().filter(|e| e["type"] == "journal_full").collect();
    let first = jf[0];
    assert_eq!(first["device"], "meter-f", "{first}");
    assert_eq!(first["max"], MAX_RECORDS, "{first}");
    assert_eq!(
        first["depth"], MAX_RECORDS,
        "the journal was at its bound: {first}"
    );
    assert!(
        ev.iter().all(|e| e["type"] == "journal_full"),
        "only journal_full events expected: {ev:?}"
    );
    let s = stopped(&exit);
    assert_eq!(s.pending, 0, "{s:?}");
    println!(
        "{TEST}: journal full at {full_at:?} ({fulls} `journal full` log lines); all {STORED} records and {} \
         journal_full event(s) arrived; {} duplicates; total {:?}",
        jf.len(),
        a.duplicates,
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 5. Torn final record
// ------------------------------------------------------------------------------------------------------

/// Frames of a segment file: `(offset, total length)` of each, up to the data end (a zero header or the
/// end of the file; segments are preallocated, so the file is longer than its data).
fn frames(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if len == 0 || off + 8 + len > bytes.len() {
            break;
        }
        out.push((off, 8 + len));
        off += 8 + len;
    }
    out
}

fn last_segment(journal: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment file")
}

/// 20 readings wait in the journal (broker unreachable); the gateway stops; then the last record's frame
/// is torn as a power cut mid-write would leave it (its second half never reached the disk). On restart
/// the journal cuts the torn frame off and says so ("journal recovered from damage", torn_bytes > 0), every
/// complete record is delivered — and the torn one too, downloaded again from the meter, because the
/// cursor only covers what the journal really holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_final_record_is_recovered_and_reported() {
    phg_tests::init_tracing();
    const TEST: &str = "torn_final_record_is_recovered_and_reported";
    const GW: &str = "gw-e2e-torn";
    const STORED: u64 = 20;
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let cfg_path = dir.path().join("gateway.toml");
    // Edge alerts off: the last frame in the journal must be a reading's.
    let body = [
        "[alerts]\nenabled = false\n".to_owned(),
        glucometer("meter-t", STORED as usize, ""),
        binding("meter-t", None, "p-torn-0001"),
    ]
    .concat();

    // Phase 1: nobody listens; everything stays in the journal.
    let nowhere = format!("mqtt://{}", closed_port());
    let gw = GatewayProcess::run(&cfg_path, &config(GW, &nowhere, &journal, "", &body)).unwrap();
    let _ = gw
        .stderr()
        .wait_for("cannot connect", 0, Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert_clean_exit(&exit);
    let s = stopped(&exit);
    assert_eq!(
        (s.accepted, s.pending),
        (STORED, STORED),
        "all in the journal, none delivered: {s:?}"
    );

    // Tear the last frame: zero its second half (the file is preallocated, so zeros follow anyway).
    let seg = last_segment(&journal);
    let mut bytes = std::fs::read(&seg).unwrap();
    let fr = frames(&bytes);
    let &(off, len) = fr.last().unwrap();
    assert_eq!(bytes[off + 8], 1, "the last frame is an Append");
    // Append body: seq u64, device_seq tag u8 + u64.
    assert_eq!(bytes[off + 9 + 8], 1, "with a device sequence number");
    let device_seq = u64::from_le_bytes(bytes[off + 18..off + 26].try_into().unwrap());
    assert_eq!(
        device_seq,
        STORED - 1,
        "the last frame holds the last record"
    );
    let cut_from = off + len / 2;
    bytes[cut_from..off + len].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    println!(
        "{TEST}: {} frames in {}; zeroed bytes {cut_from}..{} of the last ({len} bytes, record {device_seq})",
        fr.len(),
        seg.file_name().unwrap().to_string_lossy(),
        off + len
    );

    // Phase 2: a broker; the same journal.
    let broker = TestBroker::start().unwrap();
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .unwrap();
    let cfg = for_broker(&broker, config(GW, &broker.url(), &journal, "", &body));
    let gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
    let warn = gw
        .stderr()
        .wait_for("journal recovered from damage", 0, Duration::from_secs(10))
        .await;
    let warn =
        warn.unwrap_or_else(|| panic!("no recovery warning; stderr:\n{}", gw.stderr().text()));
    assert!(warn.contains("WARN"), "{warn}");
    let torn: u64 = log_field(&warn, "torn_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(torn > 0, "{warn}");
    assert_eq!(
        log_field(&warn, "corrupt_frames"),
        Some("0"),
        "a torn tail is not corruption: {warn}"
    );
    assert_eq!(log_field(&warn, "missing_records"), Some("0"), "{warn}");
    assert_eq!(
        log_field(&warn, "pending"),
        Some(&*(STORED - 1).to_string()),
        "every complete record kept: {warn}"
    );

    let mut p = Progress::new(GW);
    let done = collect_until(&mut sub, Duration::from_secs(20), |r| {
        p.update(r).glucose("meter-t") >= STORED as usize
    })
    .await;
    assert!(
        done,
        "{} of {STORED}; stderr:\n{}",
        p.glucose("meter-t"),
        gw.stderr().text()
    );
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    sub.collect_for(Duration::from_millis(300)).await;
    assert_clean_exit(&exit);
    let a = Arrivals::of(&readings(sub.received(), GW));
    assert_eq!(
        check_sequence("meter-t", &a.seqs("meter-t"), STORED),
        Ok(())
    );
    assert!(a.conflicting.is_empty(), "{:?}", a.conflicting);
    let s = stopped(&exit);
    assert_eq!(
        s.accepted, 1,
        "only the torn record was downloaded again: {s:?}"
    );
    println!(
        "{TEST}: recovery reported torn_bytes={torn}; all {STORED} records delivered; {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 6. Bad configuration
// ------------------------------------------------------------------------------------------------------

/// A non-loopback address of this machine, if it has one (so that "plaintext to a non-loopback host" can
/// be checked against a listener we own); the route lookup sends nothing.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Bad configurations: the exit code is non-zero, stderr is one `error:` line naming the key or the
/// problem, the journal directory is not created and the broker sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_a_clear_error_and_starts_nothing() {
    phg_tests::init_tracing();
    const TEST: &str = "bad_config_is_a_clear_error_and_starts_nothing";
    let t0 = Instant::now();
    // A "broker" we own, on every interface: any connection attempt shows up in accept().
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let good_broker = format!("mqtt://127.0.0.1:{port}");
    let remote = non_loopback_ip();
    let remote_broker = match remote {
        Some(ip) => format!("mqtt://{ip}:{port}"),
        None => format!("mqtt://192.0.2.1:{port}"),
    };
    let body = [
        glucometer("meter-x", 5, ""),
        binding("meter-x", None, "p-x-0001"),
    ]
    .concat();

    // (name, the file for a journal directory — None: no file at all —, what the error must name)
    type MakeConfig<'a> = Box<dyn Fn(&Path) -> String + 'a>;
    let cases: Vec<(&str, Option<MakeConfig>, &str)> = vec![
        (
            "unknown key",
            Some(Box::new(|j: &Path| {
                config("gw-x", &good_broker, j, "max_bites = 5", &body)
            })),
            "max_bites",
        ),
        (
            "bad broker URL",
            Some(Box::new(|j: &Path| {
                config("gw-x", "http://127.0.0.1:1883", j, "", &body)
            })),
            "mqtt.broker",
        ),
        (
            "broker port out of range",
            Some(Box::new(|j: &Path| {
                config("gw-x", "mqtt://127.0.0.1:99999", j, "", &body)
            })),
            "mqtt.broker",
        ),
        (
            "a name as patient id",
            Some(Box::new(|j: &Path| {
                config(
                    "gw-x",
                    &good_broker,
                    j,
                    "",
                    &body.replace("p-x-0001", "Jane Doe"),
                )
            })),
            "bindings[0].patient",
        ),
        (
            "journal bound below the minimum",
            Some(Box::new(|j: &Path| {
                config("gw-x", &good_broker, j, "max_bytes = 1000", &body)
            })),
            "journal.max_bytes",
        ),
        ("missing file", None, "cannot read"),
        // Issue 11 defect 9: a name or a national id that fits the character set.
        (
            "a US SSN as patient id",
            Some(Box::new(|j: &Path| {
                config(
                    "gw-x",
                    &good_broker,
                    j,
                    "",
                    &body.replace("p-x-0001", "123-45-6789"),
                )
            })),
            "bindings[0].patient",
        ),
        (
            "a bare name as patient id",
            Some(Box::new(|j: &Path| {
                config(
                    "gw-x",
                    &good_broker,
                    j,
                    "",
                    &body.replace("p-x-0001", "JohnSmith"),
                )
            })),
            "bindings[0].patient",
        ),
        // Issue 11 defect 10.
        (
            "two bindings for one device",
            Some(Box::new(|j: &Path| {
                let twice = format!("{body}{}", binding("meter-x", None, "p-x-0002"));
                config("gw-x", &good_broker, j, "", &twice)
            })),
            "bindings[0]",
        ),
        (
            "a simulated store too large",
            Some(Box::new(|j: &Path| {
                config(
                    "gw-x",
                    &good_broker,
                    j,
                    "",
                    &body.replace("stored = 5", "stored = 100000000"),
                )
            })),
            "simulated[0].stored",
        ),
        (
            "plaintext to a non-loopback host",
            Some(Box::new(|j: &Path| {
                config("gw-x", &remote_broker, j, "", &body)
            })),
            "mqtt.allow_plaintext",
        ),
    ];
    // `check` refuses the same configurations with the same line, and `-c` is `--config` (the habits
    // `ingest` has); `run` refuses them before anything starts. Exit status 2: a configuration error.
    let runs = cases
        .iter()
        .flat_map(|c| [(c, "run", "--config"), (c, "check", "-c")]);
    for ((name, text, names), verb, flag) in runs {
        let name = format!("{name} ({verb})");
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let cfg_path = dir.path().join("gateway.toml");
        if let Some(make) = text {
            std::fs::write(&cfg_path, make(&journal)).unwrap();
        }
        let gw =
            GatewayProcess::spawn(&[verb.as_ref(), flag.as_ref(), cfg_path.as_os_str()]).unwrap();
        let exit = gw.wait(Duration::from_secs(10)).await.unwrap();
        assert!(!exit.status.success(), "{name}: exit {}", exit.status);
        assert_eq!(exit.status.code(), Some(2), "{name}");
        let lines: Vec<&String> = exit
            .stderr
            .iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{name}: one line on stderr, got:\n{}",
            exit.stderr.join("\n")
        );
        let line = lines[0];
        assert!(line.starts_with("error: "), "{name}: {line}");
        assert!(
            line.contains(names),
            "{name}: the error names `{names}`: {line}"
        );
        for value in ["123-45-6789", "JohnSmith", "Jane Doe"] {
            assert!(
                !line.contains(value),
                "{name}: the value is not quoted: {line}"
            );
        }
        assert!(
            line.contains(&*cfg_path.display().to_string()),
            "{name}: the error names the file: {line}"
        );
        assert!(exit.stdout.is_empty(), "{name}: stdout {:?}", exit.stdout);
        assert!(
            !journal.exists(),
            "{name}: the journal directory was created"
        );
        println!("{TEST}: {name}: {line}");
    }
    // Issue 11 defect 10: a journal directory that cannot be made is named by key and path.
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    let gw = GatewayProcess::run(
        &cfg_path,
        &config("gw-x", &good_broker, &blocker.join("journal"), "", &body),
    )
    .unwrap();
    let exit = gw.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr.join("\n"));
    let line = exit.stderr.join("\n");
    for needle in [
        "journal.dir",
        &*cfg_path.display().to_string(),
        &*blocker.display().to_string(),
    ] {
        assert!(line.contains(needle), "names {needle}: {line}");
    }
    println!("{TEST}: unusable journal directory: {line}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("a refused configuration connected to the broker (from {peer})"),
        Err(e) => panic!("{e}"),
    }
    if remote.is_none() {
        println!(
            "{TEST}: no non-loopback address here; the plaintext case used 192.0.2.1 (not observable)"
        );
    }
    println!(
        "{TEST}: {} bad configurations refused in {:?}",
        cases.len(),
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------------
// 7. The demo
// ------------------------------------------------------------------------------------------------------

/// `gateway demo --for 6 --quiet` runs everything on its own for 6 s and exits 0 with a summary that
/// shows readings accepted and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_for_a_few_seconds_and_summarises() {
    let t0 = Instant::now();
    let demo = GatewayProcess::spawn(&["demo", "--for", "6", "--quiet"]).unwrap();
    let exit = demo.wait(Duration::from_secs(30)).await.unwrap();
    assert_clean_exit(&exit);
    let summary = exit
        .stdout
        .iter()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary line; stdout:\n{}", exit.stdout.join("\n")));
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = summary.split_whitespace().collect();
        let i = words
            .iter()
            .position(|w| *w == word)
            .unwrap_or_else(|| panic!("no `{word}` in {summary}"));
        words[i + 1]
            .trim_end_matches(',')
            .parse()
            .unwrap_or_else(|_| panic!("no number after `{word}` in {summary}"))
    };
    let accepted = number_before("accepted");
    let delivered = number_before("delivered");
    assert!(accepted > 0 && delivered > 0, "{summary}");
    assert!(
        t0.elapsed() >= Duration::from_secs(6),
        "the demo ran its 6 s"
    );
    println!("demo: {summary} ({:?})", t0.elapsed());
}

/// Publishes `payload` retained at QoS 1 on `topic` (the CRM's side of `…/config`), waiting for the PUBACK.
async fn publish_retained(broker: SocketAddr, topic: &str, payload: &str) {
    let mut o = rumqttc::MqttOptions::new(
        phg_tests::unique_id("crm"),
        broker.ip().to_string(),
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(5))
        // rumqttc's default outgoing limit is 10 KiB; the oversized-configuration test sends more.
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    client
        .publish(
            topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            payload.as_bytes().to_vec(),
        )
        .await
        .expect("queue the config publish");
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break true,
                Ok(_) => {}
                Err(e) => panic!("publishing the config: {e}"),
            }
        }
    })
    .await;
    assert_eq!(acked, Ok(true), "config PUBACKed");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

/// A `phg.config/1` message binding `cuff` to `patient`, with `patient_settings` (JSON objects).
fn crm_config(version: u64, cuff: &str, patient: &str, patient_settings: &str) -> String {
    format!(
        r#"{{"schema":"phg.config/1","version":{version},
            "bindings":[{{"device":"{cuff}","patient":"{patient}"}}],
            "patients":[{patient_settings}]}}"#
    )
}

/// The edge alert engine and the CRM's configuration, end to end: a retained configuration binds a cuff
/// and tightens a patient's threshold, so every reading raises an alert on `…/alerts`; an invalid
/// configuration (a critical floor relaxed without a waiver) is rejected with an event and the one in
/// force stays; a newer valid one rebinds the cuff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_alerts_follow_the_crm_configuration_and_a_bad_one_changes_nothing() {
    phg_tests::init_tracing();
    const GW: &str = "gw-e2e-alerts";
    let broker = TestBroker::start().unwrap();
    let config_topic = topic(GW, "config");
    // Grade-2 threshold tightened to SBP >= 60 for this patient (tightening needs no waiver): every
    // reading of the simulated cuff crosses it (the default, 160, is far above the simulator's values).
    let tightened = r#"{"patient":"p-bp-a1","overrides":[{"rule_id":"BP_GRADE2","param":"sbp","mmhg":"60","set_by":"dr-test","reason":"end-to-end test"}]}"#;
    publish_retained(
        broker.addr(),
        &config_topic,
        &crm_config(1, "cuff-a", "p-bp-a1", tightened),
    )
    .await;

    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let body = cuff("cuff-a", &[1], 0, "measure_every_s = 1");
    let cfg = for_broker(
        &broker,
        config(GW, &broker.url(), &dir.path().join("journal"), "", &body),
    );
    let gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();
    let applied = gw
        .stderr()
        .wait_for(
            "configuration from the CRM applied",
            0,
            Duration::from_secs(15),
        )
        .await;
    assert!(
        applied.is_some(),
        "config v1 applied; stderr:\n{}",
        gw.stderr().text()
    );

    let alerts_of = |received: &[Received]| -> Vec<Value> {
        received
            .iter()
            .filter(|r| r.topic == topic(GW, "alerts"))
            .filter_map(|r| serde_json::from_slice(&r.payload).ok())
            .collect()
    };
    // One episode: later readings over the threshold merge into it (CLINICAL.md §4.3), not new alerts.
    let got = collect_until(&mut sub, Duration::from_secs(20), |r| {
        !alerts_of(r).is_empty()
    })
    .await;
    assert!(got, "alerts arrived; stderr:\n{}", gw.stderr().text());
    let reading_ids: Vec<String> = readings(sub.received(), GW)
        .iter()
        .map(|r| r.id.clone())
        .collect();
    for a in alerts_of(sub.received()) {
        assert_eq!(a["schema"], "phg.alert/1");
        assert_eq!(a["update"]["patient"], "p-bp-a1");
        assert_eq!(a["update"]["rule_id"], "BP_GRADE2");
        assert_eq!(a["update"]["threshold"]["overridden"], true, "{a}");
        let rid = a["update"]["reading_ids"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            reading_ids.contains(&rid),
            "the alert is about a published reading: {a}"
        );
    }

    // Version 2 relaxes a critical floor without a waiver: rejected, with an event naming the version.
    let relaxed = r#"{"patient":"p-bp-a1","overrides":[{"rule_id":"GLU_HYPO_L2","param":"value","mg_dl":"45","set_by":"dr-test","reason":"no waiver"}]}"#;
    publish_retained(
        broker.addr(),
        &config_topic,
        &crm_config(2, "cuff-a", "p-bp-o3", relaxed),
    )
    .await;
    let rejected = collect_until(&mut sub, Duration::from_secs(15), |r| {
        events(r, GW).iter().any(|e| e["type"] == "config_rejected")
    })
    .await;
    assert!(
        rejected,
        "config_rejected event; stderr:\n{}",
        gw.stderr().text()
    );
    let ev = events(sub.received(), GW)
        .into_iter()
        .find(|e| e["type"] == "config_rejected")
        .unwrap();
    assert_eq!(ev["version"], 2);
    assert!(
        ev["reason"].as_str().unwrap_or_default().contains("waiver"),
        "{ev}"
    );
    // The binding of version 1 stays: new readings still go to p-bp-a1, none to p-bp-other.
    let before = readings(sub.received(), GW).len();
    let more = collect_until(&mut sub, Duration::from_secs(15), |r| {
        readings(r, GW).len() >= before + 2
    })
    .await;
    assert!(more, "readings go on");
    assert!(
        readings(sub.received(), GW)
            .iter()
            .all(|r| r.patient == "p-bp-a1")
    );

    // Version 3, valid: the cuff is rebound.
    publish_retained(
        broker.addr(),
        &config_topic,
        &crm_config(3, "cuff-a", "p-bp-a2", r#"{"patient":"p-bp-a2"}"#),
    )
    .await;
    let rebound = collect_until(&mut sub, Duration::from_secs(15), |r| {
        readings(r, GW).iter().any(|x| x.patient == "p-bp-a2")
    })
    .await;
    assert!(
        rebound,
        "readings follow the new binding; stderr:\n{}",
        gw.stderr().text()
    );

    // The retained status is rendered afresh: online, with the gateway's version and journal depth.
    let status: Value = sub
        .received()
        .iter()
        .filter(|r| r.topic == topic(GW, "status"))
        .find_map(|r| serde_json::from_slice(&r.payload).ok())
        .expect("a status message");
    assert_eq!(status["state"], "online", "{status}");
    assert!(status["journal_depth"].is_u64(), "{status}");
    assert!(status["version"].is_string(), "{status}");

    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert_clean_exit(&exit);
}

// ------------------------------------------------------------------------------------------------------
// 9. The CRM's configuration is kept; oversized ones are refused visibly (issue 11, defects 4 and 5)
// ------------------------------------------------------------------------------------------------------

/// `config` with extra `[mqtt]` lines.
fn with_mqtt(config: String, mqtt_extra: &str) -> String {
    config.replacen("[journal]", &format!("{mqtt_extra}\n\n[journal]"), 1)
}

/// The patients the readings of `gateway_id` went to.
fn patients(received: &[Received], gateway_id: &str) -> BTreeSet<String> {
    readings(received, gateway_id)
        .into_iter()
        .map(|r| r.patient)
        .collect()
}

/// The CRM rebinds a meter (its configuration file binds it to `p-local-0001`); the gateway is stopped.
/// Then, with the broker no longer holding any configuration, a restarted gateway attributes the meter's
/// readings to the CRM's patient — the CRM's configuration was kept on disk and is in force before the
/// broker says anything. Then a newer, invalid configuration (a name as patient id) is retained: it is
/// rejected with an event that names the key and not the value, and the kept one stays in force.
/// Without the kept configuration both restarts attribute the readings to `p-local-0001` (issue 11,
/// defect 4: the wrong patient).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_configuration_is_kept_across_restarts_and_an_invalid_newer_one_changes_nothing() {
    phg_tests::init_tracing();
    const TEST: &str =
        "crm_configuration_is_kept_across_restarts_and_an_invalid_newer_one_changes_nothing";
    const GW: &str = "gw-e2e-kept";
    let t0 = Instant::now();
    let broker = TestBroker::start().unwrap();
    let config_topic = topic(GW, "config");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    let gateway = |journal: &str, stored: usize| {
        let body = [
            glucometer("meter-c", stored, ""),
            binding("meter-c", None, "p-local-0001"),
        ]
        .concat();
        // A fresh journal each time: the meter's records are downloaded again. The kept configuration
        // lives beside the journal directories (in `dir`), shared by all three.
        let cfg = for_broker(
            &broker,
            config(GW, &broker.url(), &dir.path().join(journal), "", &body),
        );
        GatewayProcess::run(&cfg_path, &cfg).unwrap()
    };

    // 1. The CRM binds the meter to its patient; the gateway applies it (no readings yet).
    publish_retained(
        broker.addr(),
        &config_topic,
        &crm_config(1, "meter-c", "p-crm-0001", ""),
    )
    .await;
    let gw = gateway("journal-1", 0);
    let applied = gw
        .stderr()
        .wait_for(
            "configuration from the CRM applied",
            0,
            Duration::from_secs(15),
        )
        .await;
    assert!(applied.is_some(), "not applied:\n{}", gw.stderr().text());
    assert_clean_exit(&gw.terminate(Duration::from_secs(15)).await.unwrap());
    let kept = dir.path().join("crm-config.json");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the kept configuration is the service user's alone"
        );
    }

    // 2. The broker no longer holds it (cleared; as a broker that is unreachable or lost its store).
    publish_retained(broker.addr(), &config_topic, "").await;
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .unwrap();
    let gw = gateway("journal-2", 5);
    let all = collect_until(&mut sub, Duration::from_secs(20), |r| {
        readings(r, GW).len() >= 5
    })
    .await;
    assert!(all, "readings missing:\n{}", gw.stderr().text());
    assert_clean_exit(&gw.terminate(Duration::from_secs(15)).await.unwrap());
    let restart = patients(sub.received(), GW);
    assert_eq!(
        restart,
        BTreeSet::from(["p-crm-0001".to_owned()]),
        "after a restart the CRM's binding is in force before the broker says anything"
    );
    drop(sub);

    // 3. A newer configuration with a name as patient id is retained: rejected, the kept one stays.
    publish_retained(
        broker.addr(),
        &config_topic,
        &crm_config(2, "meter-c", "JohnSmith", ""),
    )
    .await;
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{GW}/#"))
        .await
        .unwrap();
    let gw = gateway("journal-3", 5);
    let done = collect_until(&mut sub, Duration::from_secs(20), |r| {
        readings(r, GW).len() >= 5 && events(r, GW).iter().any(|e| e["type"] == "config_rejected")
    })
    .await;
    assert!(
        done,
        "readings or rejection missing:\n{}",
        gw.stderr().text()
    );
    assert_clean_exit(&gw.terminate(Duration::from_secs(15)).await.unwrap());
    let after_bad = patients(sub.received(), GW);
    assert_eq!(
        after_bad,
        BTreeSet::from(["p-crm-0001".to_owned()]),
        "an invalid newer configuration leaves the last good one in force"
    );
    let ev = events(sub.received(), GW);
    let rejected = ev.iter().find(|e| e["type"] == "config_rejected").unwrap();
    assert_eq!(rejected["version"], 2, "{rejected}");
    let reason = rejected["reason"].as_str().unwrap();
    assert!(reason.contains("bindings[0].patient"), "{reason}");
    assert!(
        !reason.contains("JohnSmith"),
        "the value is not quoted: {reason}"
    );
    println!(
        "{TEST}: restart: readings on {restart:?}; after an invalid v2: {after_bad:?}, rejected with \
         {reason:?}; broker {}; {:?}",
        broker.kind(),
        t0.elapsed()
    );
}

/// A `phg.config/1` message of at least `bytes` bytes: bindings for many devices.
fn padded_config(version: u64, bytes: usize) -> String {
    let mut bindings = Vec::new();
    let mut len = 0;
    let mut i = 0;
    while len < bytes {
        let b = format!(r#"{{"device":"pad-device-{i:06}","patient":"p-pad-{i:06}"}}"#);
        len += b.len() + 1;
        bindings.push(b);
        i += 1;
    }
    format!(
        r#"{{"schema":"phg.config/1","version":{version},"bindings":[{}],"patients":[]}}"#,
        bindings.join(",")
    )
}

/// One protocol version of [`oversized_crm_configuration_is_refused_visibly_and_never_wedges_the_uplink`].
async fn oversized_config_case(broker: &TestBroker, version: &str) -> String {
    let gw_id = format!("gw-e2e-big-{}", version.replace('.', ""));
    let gw_id = gw_id.as_str();
    let config_topic = topic(gw_id, "config");
    let dir = tempfile::tempdir().unwrap();
    let mut sub = Subscriber::connect(broker.addr(), &format!("phg/v1/{gw_id}/#"))
        .await
        .unwrap();
    // Deliverable (under max_packet_bytes) but over the gateway's own limit on a configuration.
    publish_retained(broker.addr(), &config_topic, &padded_config(1, 24 * 1024)).await;
    let body = [
        glucometer("meter-b", 3, "measure_every_s = 1"),
        binding("meter-b", None, "p-big-0001"),
    ]
    .concat();
    let cfg = with_mqtt(
        config(gw_id, &broker.url(), &dir.path().join("journal"), "", &body),
        &format!("version = \"{version}\"\nmax_config_bytes = 16384\nmax_packet_bytes = 32768"),
    );
    let gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();
    let rejected = |r: &[Received], what: &str| {
        events(r, gw_id)
            .iter()
            .filter(|e| e["type"] == "config_rejected")
            .any(|e| e["reason"].as_str().is_some_and(|s| s.contains(what)))
    };
    let first = collect_until(&mut sub, Duration::from_secs(20), |r| {
        readings(r, gw_id).len() >= 3 && rejected(r, "mqtt.max_config_bytes")
    })
    .await;
    assert!(
        first,
        "MQTT {version}: a configuration over max_config_bytes must be rejected with an event; stderr:\n{}",
        gw.stderr().text()
    );

    // Over max_packet_bytes: MQTT 5's broker drops it for this client (the announced Maximum Packet
    // Size); MQTT 3.1.1 breaks one connection at its header, and the gateway carries on without the
    // configuration subscription and says so. Either way readings keep flowing without a reconnect loop.
    let before = readings(sub.received(), gw_id).len();
    publish_retained(broker.addr(), &config_topic, &padded_config(2, 100 * 1024)).await;
    let flowing = collect_until(&mut sub, Duration::from_secs(20), |r| {
        readings(r, gw_id).len() >= before + 4
            && (version == "5" || rejected(r, "mqtt.max_packet_bytes"))
    })
    .await;
    let connections = gw
        .stderr()
        .all()
        .iter()
        .filter(|l| l.contains("uplink connected"))
        .count();
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(
        flowing,
        "MQTT {version}: readings stopped or no rejection after an oversized configuration; stderr:\n{}",
        exit.stderr.join("\n")
    );
    assert_clean_exit(&exit);
    let bound = if version == "5" { 1 } else { 2 };
    assert!(
        connections <= bound,
        "MQTT {version}: {connections} connections: the uplink reconnected in a loop; stderr:\n{}",
        exit.stderr.join("\n")
    );
    let n = readings(sub.received(), gw_id).len();
    format!("MQTT {version}: {n} readings, {connections} connection(s)")
}

/// A configuration over the gateway's `max_config_bytes` but deliverable is rejected with a
/// `config_rejected` event naming the setting; one over `max_packet_bytes` never wedges the uplink —
/// with MQTT 5 the broker honours the announced Maximum Packet Size, with MQTT 3.1.1 one connection breaks
/// and the gateway reports it and stops subscribing for a while. Both protocol versions the gateway
/// speaks. Without the fix the first configuration is applied (no size limit) and, with 3.1.1, the
/// second makes the uplink reconnect again and again (issue 11, defect 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_crm_configuration_is_refused_visibly_and_never_wedges_the_uplink() {
    phg_tests::init_tracing();
    const TEST: &str = "oversized_crm_configuration_is_refused_visibly_and_never_wedges_the_uplink";
    let t0 = Instant::now();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(TEST, "needs Mosquitto (MQTT 5 and 3.1.1 on one broker)");
    };
    let broker = broker.unwrap();
    let mut figures = Vec::new();
    for version in ["5", "3.1.1"] {
        figures.push(oversized_config_case(&broker, version).await);
    }
    println!("{TEST}: {}; {:?}", figures.join("; "), t0.elapsed());
}

// ------------------------------------------------------------------------------------------------------
// 10. Idle is free; restarts with the default configuration; a full disk (issue 11)
// ------------------------------------------------------------------------------------------------------

/// The share of one core the gateway uses over `over`, from its `/proc` CPU times.
async fn cpu_share(gw: &GatewayProcess, over: Duration) -> f64 {
    let before = gw.cpu_time().unwrap();
    tokio::time::sleep(over).await;
    let after = gw.cpu_time().unwrap();
    (after - before).as_secs_f64() / over.as_secs_f64()
}

/// A gateway with nothing to do — connected, no device, a journal that never held a record — sleeps:
/// under 10 % of a core over 10 s (a generous bound for a shared CI machine; the bench prints the real
/// figure, which DESIGN.md promise 10 puts under 1 %). Before the fix it took 0.92 s of CPU per second
/// (issue 11, defect 6: the uplink re-read the empty journal in a loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_sleeps() {
    phg_tests::init_tracing();
    const TEST: &str = "an_idle_gateway_sleeps";
    const GW: &str = "gw-e2e-idle";
    let broker = TestBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = for_broker(
        &broker,
        config(GW, &broker.url(), &dir.path().join("journal"), "", ""),
    );
    let gw = GatewayProcess::run(&dir.path().join("gateway.toml"), &cfg).unwrap();
    let connected = gw
        .stderr()
        .wait_for("uplink connected", 0, Duration::from_secs(15))
        .await;
    assert!(connected.is_some(), "{}", gw.stderr().text());
    let share = cpu_share(&gw, Duration::from_secs(10)).await;
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert_clean_exit(&exit);
    println!(
        "{TEST}: idle gateway used {:.2} % of a core over 10 s",
        share * 100.0
    );
    assert!(
        share < 0.10,
        "an idle gateway used {:.1} % of a core",
        share * 100.0
    );
}

/// The default configuration (only the keys that have no default, a meter and its binding), the broker
/// down: the meter's records are journaled, the gateway is killed with SIGKILL, the broker comes back,
/// the gateway is started again: every record arrives, in order, once per id (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_configuration_kill9_with_queued_readings_then_restart_delivers_all() {
    phg_tests::init_tracing();
    const TEST: &str = "default_configuration_kill9_with_queued_readings_then_restart_delivers_all";
    const GW: &str = "gw-e2e-default";
    const STORED: u64 = 300;
    let t0 = Instant::now();
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            TEST,
            "needs a broker that can be stopped and started (mosquitto)",
        );
    };
    let mut broker = broker.unwrap();
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        &format!("phg/v1/{GW}/#"),
        &phg_tests::unique_id("sub-default"),
    )
    .await
    .unwrap();
    broker.stop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "gateway_id = \"{GW}\"\n[mqtt]\nbroker = \"{}\"\n[journal]\ndir = {:?}\n{}{}",
        broker.url(),
        dir.path().join("journal").display().to_string(),
        glucometer("meter-d", STORED as usize, ""),
        binding("meter-d", None, "p-default-0001"),
    );
    let cfg_path = dir.path().join("gateway.toml");
    let gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
    // Readings are queued once the uplink has failed to connect at least once (the download of 300
    // records takes far less than that); whatever is not journaled yet stays in the meter.
    let down = gw
        .stderr()
        .wait_for("cannot connect to the broker", 0, Duration::from_secs(15))
        .await;
    assert!(down.is_some(), "{}", gw.stderr().text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    gw.kill9().unwrap();
    broker.restart().unwrap();
    let gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
    let mut p = Progress::new(GW);
    let done = collect_until(&mut sub, Duration::from_secs(30), |r| {
        p.update(r).glucose("meter-d") >= STORED as usize
    })
    .await;
    assert!(
        done,
        "{} of {STORED}:\n{}",
        p.glucose("meter-d"),
        gw.stderr().text()
    );
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert_clean_exit(&exit);
    sub.collect_for(Duration::from_millis(300)).await;
    let a = Arrivals::of(&readings(sub.received(), GW));
    assert!(a.conflicting.is_empty(), "{:?}", a.conflicting);
    assert_eq!(
        check_sequence("meter-d", &a.seqs("meter-d"), STORED),
        Ok(())
    );
    println!(
        "{TEST}: all {STORED} records after kill -9 with the broker down, {} duplicates; {:?}",
        a.duplicates,
        t0.elapsed()
    );
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "10m") on `at`; `None` when not root or mount refused.
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The journal on a 10 MiB tmpfs, the broker down, a meter with 20 000 records: the file system fills,
/// the download stops with a `journal_full` notice, the gateway keeps running; when the broker returns,
/// delivered records free their segments and the download resumes — every record arrives, in order,
/// and a restart finds the journal undamaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_stops_downloading_and_recovers_when_space_returns() {
    phg_tests::init_tracing();
    const TEST: &str = "disk_full_stops_downloading_and_recovers_when_space_returns";
    const GW: &str = "gw-e2e-disk";
    const STORED: u64 = 20_000;
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(&dir.path().join("fs"), "10m") else {
        return skip(TEST, "skipped: needs root to mount tmpfs");
    };
    let Some(broker) = TestBroker::start_mosquitto() else {
        return skip(
            TEST,
            "needs a broker that can be stopped and started (mosquitto)",
        );
    };
    let mut broker = broker.unwrap();
    let mut sub = Subscriber::connect_persistent(
        broker.addr(),
        &format!("phg/v1/{GW}/#"),
        &phg_tests::unique_id("sub-disk"),
    )
    .await
    .unwrap();
    broker.stop().unwrap();
    let body = [
        glucometer("meter-s", STORED as usize, ""),
        binding("meter-s", None, "p-disk-0001"),
    ]
    .concat();
    let cfg = config(GW, &broker.url(), &dir.path().join("fs/journal"), "", &body);
    let cfg_path = dir.path().join("gateway.toml");
    let mut gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
    let full = gw
        .stderr()
        .wait_for("journal full", 0, Duration::from_secs(30))
        .await;
    assert!(
        full.is_some(),
        "the disk never filled:\n{}",
        gw.stderr().text()
    );
    assert!(
        gw.is_running().unwrap(),
        "a full disk must not stop the gateway"
    );
    let full_at = t0.elapsed();

    broker.restart().unwrap();
    all_records_and_the_journal_full_event(
        &mut sub,
        &gw,
        (GW, "meter-s"),
        STORED,
        Duration::from_secs(90),
    )
    .await;
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert_clean_exit(&exit);
    sub.collect_for(Duration::from_millis(300)).await;
    let a = Arrivals::of(&readings(sub.received(), GW));
    assert!(a.conflicting.is_empty(), "{:?}", a.conflicting);
    assert_eq!(
        check_sequence("meter-s", &a.seqs("meter-s"), STORED),
        Ok(())
    );

    // Nothing corrupt: the journal opens clean.
    let gw = GatewayProcess::run(&cfg_path, &cfg).unwrap();
    let opened = gw
        .stderr()
        .wait_for("journal opened", 0, Duration::from_secs(15))
        .await;
    let exit = gw.terminate(Duration::from_secs(15)).await.unwrap();
    assert!(opened.is_some(), "{}", exit.stderr.join("\n"));
    assert!(
        !exit
            .stderr
            .iter()
            .any(|l| l.contains("recovered from damage")),
        "{}",
        exit.stderr.join("\n")
    );
    println!(
        "{TEST}: disk full at {full_at:?}; all {STORED} records and the journal_full event arrived, {} \
         duplicates; journal clean on restart; {:?}",
        a.duplicates,
        t0.elapsed()
    );
}
