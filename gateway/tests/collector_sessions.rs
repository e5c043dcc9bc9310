//! The GLP / BLP collectors against the simulated devices, through the real pipeline and a real journal on
//! disk (no broker: nothing is acked here, so the journal holds exactly what was accepted).
//!
//! These prove the cursor rule (DESIGN.md promise 4) end to end at the session level: a transfer that stops
//! for any reason — a dropped link, a missing RACP response, a full journal — resumes at the first record
//! not accepted, and nothing is lost or doubled.

// Test set-up unwraps: a failure there is a broken test machine, and the panic says where.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::journal::{Journal, JournalConfig};
use gateway::pipeline::handoff::Handoff;
use gateway::pipeline::{Bindings, Counters, Pipeline, writer};
use gateway::sources::GattLink;
use gateway::sources::collector::{
    CollectorConfig, Completion, DeviceRef, blood_pressure_session, glucose_session,
};
use gateway::sources::simulator::cuff::{CuffConfig, SimCuff};
use gateway::sources::simulator::glucometer::{GlucometerConfig, GlucometerFaults, SimGlucometer};
use gateway::sources::simulator::{ClockCharacteristic, SimDevice, SimLink, unix_now};
use protocol::model::RecordNumbering;
use protocol::wire::Topics;

struct Rig {
    _dir: tempfile::TempDir,
    journal: Arc<Mutex<Journal>>,
    pipeline: Pipeline,
}

fn rig(max_records: u64) -> Rig {
    rig_with_writer_heartbeat(max_records, None)
}

/// [`rig`], its journal writer checking in to `heartbeat` (as the daemon's does; needs a runtime).
fn rig_with_writer_heartbeat(
    max_records: u64,
    heartbeat: Option<gateway::liveness::Heartbeat>,
) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = JournalConfig::new(dir.path().join("journal"));
    cfg.max_records = max_records;
    let (journal, _) = Journal::open(cfg).unwrap();
    let journal = Arc::new(Mutex::new(journal));
    let (writer, _thread) =
        writer::spawn_with_heartbeat(journal.clone(), Arc::new(Handoff::default()), 64, heartbeat)
            .unwrap();
    let mut bindings = Bindings::default();
    bindings.bind("meter", None, "p-0001");
    bindings.bind("cuff", Some(1), "p-0001");
    bindings.bind("cuff", Some(2), "p-0002");
    let pipeline = Pipeline {
        gateway_id: "gw".into(),
        topics: Topics::for_gateway("gw"),
        bindings: Arc::new(bindings),
        journal: journal.clone(),
        writer,
        counters: Arc::new(Counters::default()),
        alerts: None,
    };
    Rig {
        _dir: dir,
        journal,
        pipeline,
    }
}

/// Journaled glucose sequence numbers → how many records carry each (must be 1).
fn journaled_sequences(journal: &Mutex<Journal>) -> BTreeMap<u64, usize> {
    let j = journal.lock().unwrap();
    let mut seen = BTreeMap::new();
    for r in j.pending(None, usize::MAX).unwrap() {
        if let Some(seq) = r.device_seq {
            *seen.entry(seq).or_insert(0) += 1;
        }
    }
    seen
}

fn meter(n: usize) -> SimDevice {
    let mut g = SimGlucometer::new(GlucometerConfig::new("meter"));
    g.generate(n, unix_now(), 7).unwrap();
    SimDevice::glucometer(g)
}

fn cfg() -> CollectorConfig {
    CollectorConfig {
        racp_timeout: Duration::from_millis(300),
        bp_idle: Duration::from_millis(300),
        ..CollectorConfig::default()
    }
}

async fn glucose(rig: &Rig, device: &SimDevice) -> Completion {
    glucose_numbered(rig, device, RecordNumbering::Gls).await
}

async fn glucose_numbered(rig: &Rig, device: &SimDevice, numbering: RecordNumbering) -> Completion {
    let mut link = SimLink::connect(device);
    let mut sink = rig.pipeline.session();
    let dref = DeviceRef {
        id: "meter".into(),
        model: None,
        numbering,
    };
    let report = glucose_session(&mut link, &mut sink, &dref, &cfg())
        .await
        .unwrap();
    link.disconnect().await;
    report.completion
}

#[tokio::test]
async fn first_contact_downloads_all_then_only_new_records() {
    let rig = rig(100_000);
    let device = meter(300);
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    let seen = journaled_sequences(&rig.journal);
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|&n| n == 1));
    assert_eq!(rig.journal.lock().unwrap().cursor("meter"), Some(299));

    device
        .with_glucometer(|g| g.generate(5, unix_now(), 8))
        .unwrap()
        .unwrap();
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    let seen = journaled_sequences(&rig.journal);
    assert_eq!(seen.len(), 305);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..305).collect::<Vec<_>>()
    );
    assert_eq!(
        rig.pipeline
            .counters
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        305
    );
}

/// A download's records are committed together: one fdatasync per batch of up to 64, not one for the
/// first record and another for the rest (issue 14 item 6: on an SD card each commit writes the journal's
/// tail page again, 4 KiB, for readings of ~700 bytes). A meter syncing every 10 s brings ~10 records.
#[tokio::test]
async fn a_download_is_committed_in_batches_not_record_by_record() {
    let rig = rig(100_000);
    let fsyncs = || rig.journal.lock().unwrap().fsyncs();
    let device = meter(10);
    let before = fsyncs();
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    assert_eq!(journaled_sequences(&rig.journal).len(), 10);
    assert_eq!(fsyncs() - before, 1, "ten records, one commit");

    device
        .with_glucometer(|g| g.generate(200, unix_now(), 8))
        .unwrap()
        .unwrap();
    let before = fsyncs();
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    assert_eq!(journaled_sequences(&rig.journal).len(), 210);
    let commits = fsyncs() - before;
    assert!(
        (200_u64.div_ceil(64)..=200_u64.div_ceil(64) + 1).contains(&commits),
        "200 records in {commits} commits"
    );
}

/// Hands Blood Pressure Measurement values of `device` to `sink`, then drops it without its end of
/// transfer: the session's deadline passed, or its task ended.
async fn bp_values_then_drop(
    mut sink: gateway::pipeline::SessionSink,
    device: &str,
    values: &[&[u8]],
) {
    use gateway::sources::collector::{RecordSink, SessionInfo};
    let session = SessionInfo {
        device: DeviceRef {
            id: device.into(),
            model: None,
            numbering: RecordNumbering::Gls,
        },
        clock_offset_s: Some(0),
    };
    for value in values {
        sink.value(
            &session,
            gateway::sources::uuid::BP_MEASUREMENT,
            value,
            unix_now(),
        )
        .await
        .unwrap();
    }
    drop(sink);
}

/// A session that ends without its end of transfer (its deadline passed, the task was dropped) still
/// journals what it received intact: records wait to be committed together, and the wait must not lose
/// them (no edge alerts here: nothing else would keep the session's remainder alive).
#[tokio::test]
async fn records_of_a_session_dropped_before_its_end_of_transfer_are_journaled() {
    let rig = rig(100_000);
    // Users 1 and 2 (both bound), 120/80 and 130/85 mmHg, no time stamp.
    bp_values_then_drop(
        rig.pipeline.session(),
        "cuff",
        &[
            &[0x08, 120, 0x00, 80, 0x00, 93, 0x00, 1],
            &[0x08, 130, 0x00, 85, 0x00, 100, 0x00, 2],
        ],
    )
    .await;
    let journaled = || rig.journal.lock().unwrap().depth();
    for _ in 0..200 {
        if journaled() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        journaled(),
        2,
        "both readings journaled after the session ended"
    );
}

/// The link drops at record 150: the next session resumes at the first record not accepted.
#[tokio::test]
async fn a_dropped_link_resumes_at_the_cursor_without_loss_or_doubles() {
    let rig = rig(100_000);
    let device = meter(300);
    device
        .with_glucometer(|g| {
            g.set_faults(GlucometerFaults {
                drop_link_after_records: Some(150),
                skip_response: false,
                ..Default::default()
            })
        })
        .unwrap();
    assert_eq!(glucose(&rig, &device).await, Completion::Incomplete);
    let seen = journaled_sequences(&rig.journal);
    assert_eq!(seen.len(), 150, "everything before the drop is accepted");
    device
        .with_glucometer(|g| g.set_faults(GlucometerFaults::default()))
        .unwrap();
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    let seen = journaled_sequences(&rig.journal);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..300).collect::<Vec<_>>()
    );
    assert!(seen.values().all(|&n| n == 1), "no record twice");
}

/// GLP.TS GLP/COL/SPE/BI-04: no response code → the RACP timer fires, the set is incomplete, and the
/// next session completes it.
#[tokio::test]
async fn a_missing_response_code_times_out_and_the_next_session_completes() {
    let rig = rig(100_000);
    let device = meter(20);
    device
        .with_glucometer(|g| {
            g.set_faults(GlucometerFaults {
                drop_link_after_records: None,
                skip_response: true,
                ..Default::default()
            })
        })
        .unwrap();
    assert_eq!(glucose(&rig, &device).await, Completion::Incomplete);
    assert_eq!(journaled_sequences(&rig.journal).len(), 20);
    device
        .with_glucometer(|g| g.set_faults(GlucometerFaults::default()))
        .unwrap();
    device
        .with_glucometer(|g| g.generate(2, unix_now(), 9))
        .unwrap()
        .unwrap();
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    assert_eq!(journaled_sequences(&rig.journal).len(), 22);
}

/// A full journal: the collector aborts, the meter keeps its records, and after the broker drains the
/// journal (acks) the next sessions fetch the rest — nothing lost, nothing doubled.
#[tokio::test]
async fn a_full_journal_stops_the_download_and_the_meter_keeps_the_rest() {
    let rig = rig(40);
    let device = meter(100);
    assert_eq!(glucose(&rig, &device).await, Completion::JournalFull);
    let first = journaled_sequences(&rig.journal);
    assert_eq!(first.len(), 40);
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>(),
        "a prefix, no gap"
    );
    let mut delivered = BTreeMap::new();
    for _ in 0..5 {
        // What the uplink does after PUBACKs.
        let seqs: Vec<(u64, u64)> = {
            let j = rig.journal.lock().unwrap();
            j.pending(None, usize::MAX)
                .unwrap()
                .iter()
                .map(|r| (r.seq, r.device_seq.unwrap_or(u64::MAX)))
                .collect()
        };
        for (_, d) in &seqs {
            *delivered.entry(*d).or_insert(0) += 1;
        }
        rig.journal
            .lock()
            .unwrap()
            .ack(&seqs.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .unwrap();
        if glucose(&rig, &device).await == Completion::Complete {
            break;
        }
    }
    let rest = journaled_sequences(&rig.journal);
    for d in rest.keys() {
        *delivered.entry(*d).or_insert(0) += 1;
    }
    assert_eq!(
        delivered.keys().copied().collect::<Vec<_>>(),
        (0..100).collect::<Vec<_>>()
    );
    assert!(delivered.values().all(|&n| n == 1));
}

/// The `journal_full` events in the journal, as (seq, device), in journal order.
fn journal_full_events(journal: &Mutex<Journal>) -> Vec<(u64, String)> {
    let j = journal.lock().unwrap();
    j.pending(None, usize::MAX)
        .unwrap()
        .iter()
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
            (v["event"]["type"] == "journal_full")
                .then(|| (r.seq, v["event"]["device"].as_str().unwrap().to_owned()))
        })
        .collect()
}

/// Polls `f` (the writer commits on its own thread) for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 10 s: {what}");
}

/// Fills `rig`'s full journal's notice reserve with `journal_full` events (the meter's first, each one
/// waited for: a commit each), then hands over one more, "late", and checks that it found no room.
async fn fill_the_notice_reserve_then_one_more(rig: &Rig) {
    use gateway::journal::NOTICE_RESERVE_RECORDS;
    let t = unix_now();
    for i in 0..NOTICE_RESERVE_RECORDS {
        let device = if i == 0 {
            "meter".to_owned()
        } else {
            format!("meter-{i}")
        };
        rig.pipeline.journal_full_notice(&device, t).await;
        eventually("the journal_full event is journaled", || {
            journal_full_events(&rig.journal)
                .iter()
                .any(|(_, d)| *d == device)
        })
        .await;
    }
    rig.pipeline.journal_full_notice("late", t).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !journal_full_events(&rig.journal)
            .iter()
            .any(|(_, d)| d == "late"),
        "the reserve was full, yet the notice was journaled"
    );
}

/// A full journal still takes the `journal_full` event (into its notice reserve), so the CRM learns why
/// downloading stopped. A notice that finds no room even in the reserve is not dropped: the writer keeps
/// it and journals it at its next commit once the uplink has made room, ahead of that commit's readings.
#[tokio::test]
async fn journal_full_events_get_into_a_full_journal_or_wait_for_room() {
    let rig = rig(40);
    let device = meter(70);
    assert_eq!(glucose(&rig, &device).await, Completion::JournalFull);
    fill_the_notice_reserve_then_one_more(&rig).await;

    // The uplink delivers everything; the meter's next session brings the rest of its records, and the
    // waiting notice goes in first.
    ack_all(&rig.journal);
    assert_eq!(glucose(&rig, &device).await, Completion::Complete);
    let after = journal_full_events(&rig.journal);
    let late = after.iter().find(|(_, d)| d == "late").map(|(seq, _)| *seq);
    let first_reading = rig
        .journal
        .lock()
        .unwrap()
        .pending(None, usize::MAX)
        .unwrap()
        .iter()
        .find(|r| r.device_seq.is_some())
        .map(|r| r.seq);
    assert!(
        late.is_some(),
        "the waiting notice was journaled once there was room"
    );
    assert!(
        late < first_reading,
        "ahead of the readings that came after the stop"
    );
    assert_eq!(
        journaled_sequences(&rig.journal).len(),
        30,
        "the meter's other 30 records"
    );
}

/// One `journal_full` event per device and minute, also once the uplink delivers them: a full journal
/// that the uplink drains fills again at the device's next session, seconds later, and the CRM must not
/// get an event for every one of those sessions.
#[tokio::test]
async fn a_journal_full_event_is_journaled_once_per_device_and_minute_though_delivered() {
    let rig = rig(10);
    let device = meter(30);
    assert_eq!(glucose(&rig, &device).await, Completion::JournalFull);
    // Early in a minute, so that both notices fall within it.
    let t = unix_now().div_euclid(60) * 60 + 1;
    rig.pipeline.journal_full_notice("meter", t).await;
    eventually("the journal_full event is journaled", || {
        journal_full_events(&rig.journal).len() == 1
    })
    .await;
    ack_all(&rig.journal);
    assert_eq!(glucose(&rig, &device).await, Completion::JournalFull);
    rig.pipeline.journal_full_notice("meter", t + 30).await;
    // The next minute's is journaled (and shows that the writer has handled the one before).
    rig.pipeline.journal_full_notice("meter", t + 60).await;
    eventually("the next minute's event is journaled", || {
        !journal_full_events(&rig.journal).is_empty()
    })
    .await;
    assert_eq!(
        journal_full_events(&rig.journal).len(),
        1,
        "only the next minute's: the same minute's second event was dropped"
    );
}

/// A rig whose writer checks in every 200 ms (and retries waiting notices then, while idle), its journal
/// full and its notice reserve too, with the notice "late" waiting ([`fill_the_notice_reserve_then_one_more`]).
/// The [`Liveness`](gateway::liveness::Liveness) is the writer's watchdog: keep it.
async fn full_reserve_and_an_idle_writer() -> (Rig, gateway::liveness::Liveness) {
    let liveness = gateway::liveness::Liveness::new(Some(Duration::from_millis(200)));
    let rig = rig_with_writer_heartbeat(10, Some(liveness.register("journal writer")));
    assert_eq!(glucose(&rig, &meter(20)).await, Completion::JournalFull);
    fill_the_notice_reserve_then_one_more(&rig).await;
    (rig, liveness)
}

/// A waiting `journal_full` event does not wait for a device: while the writer is idle it is tried again
/// at every watchdog check-in, so once the uplink has made room it is journaled with nothing else
/// handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_journal_full_event_goes_in_while_the_writer_is_idle() {
    let (rig, _liveness) = full_reserve_and_an_idle_writer().await;
    ack_all(&rig.journal);
    eventually("the waiting notice is journaled", || {
        journal_full_events(&rig.journal)
            .iter()
            .any(|(_, d)| d == "late")
    })
    .await;
}

/// Two `journal_full` events waiting while the notice reserve has room for one only: that one goes in at
/// the writer's next try, and the other waits for the next room, not for room for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_journal_full_events_go_in_as_room_for_each_frees() {
    let (rig, _liveness) = full_reserve_and_an_idle_writer().await;
    rig.pipeline.journal_full_notice("later", unix_now()).await;
    let ack_one_notice = || {
        let seq = journal_full_events(&rig.journal)[0].0;
        rig.journal.lock().unwrap().ack(&[seq]).unwrap();
    };
    let journaled = |device: &str| {
        journal_full_events(&rig.journal)
            .iter()
            .any(|(_, d)| d == device)
    };

    ack_one_notice();
    eventually("one of the two waiting events is journaled", || {
        journaled("late") || journaled("later")
    })
    .await;
    // Several of the idle writer's check-ins (200 ms apart): the other still finds no room.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !(journaled("late") && journaled("later")),
        "the reserve had room for one only, yet both were journaled"
    );

    ack_one_notice();
    eventually("the other is journaled at the next room", || {
        journaled("late") && journaled("later")
    })
    .await;
}

/// A cuff with two users that dumps its memory on every subscribe: each reading lands on its user's
/// patient once, across sessions.
#[tokio::test]
async fn a_cuff_that_dumps_its_memory_produces_no_duplicates_across_sessions() {
    let rig = rig(100_000);
    let mut c = CuffConfig::new("cuff");
    c.users = vec![1, 2];
    let mut cuff = SimCuff::new(c);
    cuff.generate(10, unix_now(), 3).unwrap();
    let stored = cuff.readings().len();
    let device = SimDevice::cuff(cuff);
    let dref = DeviceRef {
        id: "cuff".into(),
        model: None,
        numbering: Default::default(),
    };
    for _ in 0..3 {
        let mut link = SimLink::connect(&device);
        let mut sink = rig.pipeline.session();
        let report = blood_pressure_session(&mut link, &mut sink, &dref, &cfg())
            .await
            .unwrap();
        assert_eq!(report.completion, Completion::Complete);
        link.disconnect().await;
    }
    let j = rig.journal.lock().unwrap();
    let pending = j.pending(None, usize::MAX).unwrap();
    assert_eq!(pending.len(), stored, "each stored reading once");
    for r in &pending {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let user = v["device"]["user_id"].as_u64().unwrap();
        let want = if user == 1 { "p-0001" } else { "p-0002" };
        assert_eq!(v["patient"], want, "reading of user {user}");
    }
}

/// A glucose reading as delivered: (id, device time, mg/dL, sequence number sent).
type Delivered = (String, String, f64, Option<serde_json::Value>);

/// What the uplink would publish now: the journaled readings in journal order, then acked (as after
/// their PUBACKs), so the journal's own de-duplication of pending ids cannot hide a re-sent reading.
/// Everything pending, acked as the uplink does after the PUBACKs.
fn ack_all(journal: &Mutex<Journal>) -> Vec<gateway::journal::Record> {
    let mut j = journal.lock().unwrap();
    let pending = j.pending(None, usize::MAX).unwrap();
    j.ack(&pending.iter().map(|r| r.seq).collect::<Vec<_>>())
        .unwrap();
    pending
}

fn deliver(journal: &Mutex<Journal>) -> Vec<Delivered> {
    ack_all(journal)
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["time"]["device"].as_str().unwrap().to_owned(),
                v["glucose"]["mg_per_dl"].as_f64().unwrap(),
                v.get("sequence_number").cloned(),
            )
        })
        .collect()
}

fn values(d: &[Delivered]) -> Vec<f64> {
    d.iter().map(|r| r.2).collect()
}

/// Stores readings `ks` on `g`: reading k is 90 + k mg/dL, taken at `t0` + k × 10 min.
fn take_readings(g: &mut SimGlucometer, t0: i64, ks: std::ops::Range<i64>) {
    for k in ks {
        g.add_record(t0 + k * 600, 90.0 + k as f64, None).unwrap();
    }
}

/// One complete session with a newest-first meter, then what it delivered ([`deliver`]).
async fn complete_session_delivers(rig: &Rig, device: &SimDevice) -> Vec<Delivered> {
    let completion = glucose_numbered(rig, device, RecordNumbering::NewestFirst).await;
    assert_eq!(completion, Completion::Complete);
    deliver(&rig.journal)
}

/// A meter numbering its records newest-first, like TaiDoc's DM30b (no context, no clock), holding
/// readings 0..20 ([`take_readings`]).
fn newest_first_meter(t0: i64) -> SimDevice {
    let mut c = GlucometerConfig::new("meter");
    c.newest_first = true;
    c.with_context = false;
    c.clock = ClockCharacteristic::None;
    let mut g = SimGlucometer::new(c);
    take_readings(&mut g, t0, 0..20);
    SimDevice::glucometer(g)
}

/// A TaiDoc-like meter (GATT.md: sequence 0 is the newest, no Current Time, no context): every session
/// asks for all records and hands over only those newer than the last accepted one, oldest first; the
/// reading ids rest on time and value, so a renumbered record keeps its id. A transfer cut short hands
/// over nothing (its newest records came first), and a meter clock set back loses nothing.
#[tokio::test]
async fn a_newest_first_meter_is_read_by_time_without_loss_or_doubles() {
    let rig = rig(100_000);
    let t0 = unix_now() - 86_400;
    let device = newest_first_meter(t0);
    let nf = RecordNumbering::NewestFirst;
    let mg = |r: std::ops::Range<i64>| r.map(|k| 90.0 + k as f64).collect::<Vec<_>>();

    let mut all = complete_session_delivers(&rig, &device).await;
    assert_eq!(values(&all), mg(0..20), "all, oldest first");
    assert!(
        all.windows(2).all(|w| w[0].1 < w[1].1),
        "in device-time order"
    );
    assert!(
        all.iter().all(|r| r.3.is_none()),
        "no sequence number on the wire"
    );

    // Nothing new: nothing handed over, although the meter sent all 20 again.
    assert!(complete_session_delivers(&rig, &device).await.is_empty());

    // Three new readings renumber the old ones: only the three are new.
    device
        .with_glucometer(|g| {
            take_readings(g, t0, 20..23);
        })
        .unwrap();
    let new = complete_session_delivers(&rig, &device).await;
    assert_eq!(values(&new), mg(20..23));
    all.extend(new);

    // A link that drops mid-transfer: the records that came were the newest; none is taken, so the
    // cursor cannot jump over the ones that did not come. The next session takes both new ones.
    device
        .with_glucometer(|g| {
            take_readings(g, t0, 23..25);
            g.set_faults(GlucometerFaults {
                drop_link_after_records: Some(1),
                skip_response: false,
                ..Default::default()
            });
        })
        .unwrap();
    assert_eq!(
        glucose_numbered(&rig, &device, nf).await,
        Completion::Incomplete
    );
    assert!(deliver(&rig.journal).is_empty());
    device
        .with_glucometer(|g| g.set_faults(GlucometerFaults::default()))
        .unwrap();
    let new = complete_session_delivers(&rig, &device).await;
    assert_eq!(values(&new), mg(23..25));
    all.extend(new);

    // The meter's clock is set back ten hours: the new reading's time is before every accepted one. It is
    // still new (it is numbered below the last accepted record), so it is taken, once.
    device
        .with_glucometer(|g| {
            g.set_time_offset(-600);
            g.add_record(t0 + 25 * 600, 150.0, None).unwrap();
        })
        .unwrap();
    assert_eq!(
        glucose_numbered(&rig, &device, nf).await,
        Completion::Complete
    );
    let new = complete_session_delivers(&rig, &device).await;
    assert_eq!(values(&new), [150.0]);
    assert!(
        new[0].1 < all[0].1,
        "its device time is the earliest of all"
    );
    all.extend(new);
    let ids: std::collections::BTreeSet<_> = all.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ids.len(), 26, "every reading once, each with its own id");
}

/// A newest-first meter and a full journal: the oldest records are taken first, so the accepted ones are
/// the oldest prefix and the next sessions (after the uplink drains the journal) take the rest.
#[tokio::test]
async fn a_newest_first_meter_and_a_full_journal_lose_nothing() {
    let rig = rig(8);
    let t0 = unix_now() - 86_400;
    let device = newest_first_meter(t0);
    let mut delivered = Vec::new();
    for _ in 0..6 {
        let completion = glucose_numbered(&rig, &device, RecordNumbering::NewestFirst).await;
        delivered.extend(deliver(&rig.journal));
        if completion == Completion::Complete {
            break;
        }
    }
    assert_eq!(
        values(&delivered),
        (0..20).map(|k| 90.0 + k as f64).collect::<Vec<_>>()
    );
}

/// A session that ends without its end of transfer (deadline, failure) after a reading was handed over:
/// the reading is accepted by the journal writer all the same, and its edge alert is journaled too — it
/// is not lost with the session.
#[tokio::test]
async fn an_edge_alert_survives_a_session_that_ends_without_its_end_of_transfer() {
    let rig = rig(100_000);
    let mut pipeline = rig.pipeline.clone();
    let rules = protocol::rules::RuleSet::default_rules().unwrap();
    pipeline.alerts = Some(Arc::new(
        gateway::alerts::EdgeAlerts::new(rules, Vec::new(), "gw", Topics::for_gateway("gw"))
            .unwrap(),
    ));
    // "meter" is bound to p-0001 for every user. 185/125 mmHg, no time stamp: a hypertensive crisis
    // (CLINICAL.md BP_CRISIS).
    bp_values_then_drop(
        pipeline.session(),
        "meter",
        &[&[0x00, 185, 0x00, 125, 0x00, 145, 0x00]],
    )
    .await;
    let topics = || -> Vec<String> {
        let j = rig.journal.lock().unwrap();
        j.pending(None, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.topic.clone())
            .collect()
    };
    for _ in 0..200 {
        if topics().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(topics(), ["phg/v1/gw/readings", "phg/v1/gw/alerts"]);
}

/// Cuff readings as delivered (acked after reading, like the uplink): (user, systolic, device time).
fn deliver_bp(journal: &Mutex<Journal>) -> Vec<(u64, f64, String)> {
    ack_all(journal)
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["device"]["user_id"].as_u64().unwrap(),
                v["blood_pressure"]["systolic"].as_f64().unwrap(),
                v["time"]["device"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A two-user cuff that resends its whole memory on every subscribe (SBM69, Beurer): across sessions each
/// reading is delivered once — checked after delivery, so the journal's pending-id de-duplication cannot
/// hide a re-sent one — and when the cuff's clock goes back an hour (DST ends), the reading taken after
/// that, whose time stamp is earlier than every reading before it, is still delivered, once.
#[tokio::test]
async fn a_dumping_cuff_doubles_nothing_and_a_clock_set_back_loses_nothing() {
    use protocol::gatt::bp::MeasurementStatus;
    let rig = rig(100_000);
    let mut c = CuffConfig::new("cuff");
    c.users = vec![1, 2];
    let mut cuff = SimCuff::new(c);
    let t0 = unix_now() - 86_400;
    let ok = MeasurementStatus::default();
    cuff.measure(1, 121, 81, 70, ok, t0).unwrap();
    cuff.measure(2, 131, 85, 72, ok, t0 + 300).unwrap();
    cuff.measure(1, 122, 82, 70, ok, t0 + 600).unwrap();
    let device = SimDevice::cuff(cuff);
    let dref = DeviceRef {
        id: "cuff".into(),
        model: None,
        numbering: RecordNumbering::Gls,
    };
    let session = || async {
        let mut link = SimLink::connect(&device);
        let mut sink = rig.pipeline.session();
        let report = blood_pressure_session(&mut link, &mut sink, &dref, &cfg())
            .await
            .unwrap();
        link.disconnect().await;
        assert_eq!(report.completion, Completion::Complete);
        deliver_bp(&rig.journal)
    };
    let systolics = |d: &[(u64, f64, String)]| d.iter().map(|r| r.1).collect::<Vec<_>>();

    let first = session().await;
    assert_eq!(systolics(&first), [121.0, 131.0, 122.0]);
    assert!(session().await.is_empty(), "the re-dump doubles nothing");

    device
        .with_cuff(|c| c.measure(1, 123, 83, 70, ok, t0 + 1200))
        .unwrap()
        .unwrap();
    assert_eq!(systolics(&session().await), [123.0]);

    // DST ends: the cuff's clock goes back an hour, so this reading's time stamp is before all the others.
    device
        .with_cuff(|c| c.measure(1, 144, 90, 70, ok, t0 + 1200 - 3600 + 60))
        .unwrap()
        .unwrap();
    let after_dst = session().await;
    assert_eq!(
        systolics(&after_dst),
        [144.0],
        "taken after the clock change"
    );
    assert!(
        after_dst[0].2 < first[0].2,
        "its time stamp is the earliest"
    );
    assert!(session().await.is_empty());
    // The other user's series was not disturbed.
    device
        .with_cuff(|c| c.measure(2, 132, 86, 72, ok, t0 + 1300))
        .unwrap()
        .unwrap();
    assert_eq!(session().await, [(2, 132.0, session_time(t0 + 1300))]);
}

fn session_time(t: i64) -> String {
    protocol::gatt::time::DateTime::from_epoch_seconds(t)
        .unwrap()
        .to_string()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The events journaled, as (type, reason_code) — and nothing on the readings topic.
fn journaled_events(journal: &Mutex<Journal>) -> Vec<(String, Option<String>)> {
    let j = journal.lock().unwrap();
    j.pending(None, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.topic, "phg/v1/gw/events", "not a patient reading");
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            (
                v["event"]["type"].as_str().unwrap().to_owned(),
                v["event"]["reason_code"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// Captured and vendor payloads (vectors/gatt.json) through the real pipeline: the Contour record whose
/// type nibble is 0xA is a control-solution test (yarko49/healthcare-codex), and an i-SENS CareSens
/// context with meal 6 marks a ketone result (xDrip `caresens/ContextRx.java`). Neither reaches the
/// patient's readings; each is an event saying why.
#[tokio::test]
async fn control_solution_and_ketone_payloads_never_become_patient_readings() {
    use gateway::sources::collector::{RecordSink, SessionInfo};
    use gateway::sources::uuid;
    let session = SessionInfo {
        device: DeviceRef {
            id: "meter".into(),
            model: None,
            numbering: RecordNumbering::Gls,
        },
        clock_offset_s: Some(-420 * 60),
    };
    let now = unix_now();

    let rig1 = rig(100);
    let mut sink = rig1.pipeline.session();
    let contour_control = hex("133100E2070A060F2F325CFE7EB0FA");
    sink.value(&session, uuid::GLUCOSE_MEASUREMENT, &contour_control, now)
        .await
        .unwrap();
    sink.end_of_transfer(&session).await.unwrap();
    assert_eq!(
        journaled_events(&rig1.journal),
        [("control_solution".to_owned(), None)]
    );

    // The same record as capillary whole blood (type 1), followed by the i-SENS ketone context.
    let rig2 = rig(100);
    let mut sink = rig2.pipeline.session();
    let capillary = hex("133100E2070A060F2F325CFE7EB011");
    sink.value(&session, uuid::GLUCOSE_MEASUREMENT, &capillary, now)
        .await
        .unwrap();
    sink.value(&session, uuid::GLUCOSE_CONTEXT, &hex("02310006"), now)
        .await
        .unwrap();
    sink.end_of_transfer(&session).await.unwrap();
    assert_eq!(
        journaled_events(&rig2.journal),
        [(
            "reading_rejected".to_owned(),
            Some("not_glucose".to_owned())
        )]
    );
}

/// What a cuff session hands over: (systolic, through `live_value`).
#[derive(Default)]
struct LiveRecorder {
    got: Vec<(u16, bool)>,
}

impl LiveRecorder {
    fn record(&mut self, bytes: &[u8], live: bool) {
        use protocol::gatt::Codec as _;
        let m = protocol::gatt::bp::BloodPressureMeasurement::parse(bytes).unwrap();
        self.got.push((m.systolic.value().unwrap() as u16, live));
    }
}

impl gateway::sources::collector::RecordSink for LiveRecorder {
    fn cursor(&self, _key: &str) -> Option<u64> {
        None
    }

    async fn value(
        &mut self,
        _session: &gateway::sources::collector::SessionInfo,
        _uuid: u16,
        bytes: &[u8],
        _received_utc: i64,
    ) -> Result<(), gateway::sources::collector::SinkError> {
        self.record(bytes, false);
        Ok(())
    }

    async fn live_value(
        &mut self,
        _session: &gateway::sources::collector::SessionInfo,
        _uuid: u16,
        bytes: &[u8],
        _received_utc: i64,
    ) -> Result<(), gateway::sources::collector::SinkError> {
        self.record(bytes, true);
        Ok(())
    }

    async fn end_of_transfer(
        &mut self,
        _session: &gateway::sources::collector::SessionInfo,
    ) -> Result<(), gateway::sources::collector::SinkError> {
        Ok(())
    }
}

/// One cuff session: the memory it dumps on subscribe, then a reading measured while connected.
async fn cuff_session_with_a_measurement(send_intermediate: bool) -> Vec<(u16, bool)> {
    let mut c = CuffConfig::new("cuff");
    c.send_intermediate = send_intermediate;
    let mut cuff = SimCuff::new(c);
    cuff.generate(2, unix_now() - 3600, 3).unwrap();
    let device = SimDevice::cuff(cuff);
    let dref = DeviceRef {
        id: "cuff".into(),
        model: None,
        numbering: Default::default(),
    };
    let mut link = SimLink::connect(&device);
    let mut sink = LiveRecorder::default();
    let measure = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        device
            .with_cuff(|c| c.measure(1, 151, 92, 70, Default::default(), unix_now()))
            .unwrap()
            .unwrap();
    };
    let cfg = cfg();
    let (report, ()) = tokio::join!(
        blood_pressure_session(&mut link, &mut sink, &dref, &cfg),
        measure
    );
    assert_eq!(report.unwrap().completion, Completion::Complete);
    sink.got
}

/// The kiosk's receive-time rule needs to know which reading was measured now: only the cuff's first
/// measurement after its Intermediate Cuff Pressure in the connection is handed over as live
/// (`RecordSink::live_value`); the memory it dumped before is not, and a cuff that sends no intermediate
/// pressure never has a live reading.
#[tokio::test]
async fn only_the_measurement_after_the_cuff_pressure_stream_is_live() {
    let got = cuff_session_with_a_measurement(true).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got[..2].iter().all(|(_, live)| !live),
        "the dumped memory is not live: {got:?}"
    );
    assert_eq!(got[2], (151, true), "the measurement after the pressures");

    let got = cuff_session_with_a_measurement(false).await;
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got.iter().all(|(_, live)| !live),
        "without intermediate pressures nothing is live: {got:?}"
    );
}
