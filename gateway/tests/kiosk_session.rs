//! The kiosk inside the real pipeline (journal, writer, edge rule engine with the built-in CLINICAL.md
//! rules): a cuff value goes in as the collector hands it over, and what comes out is checked — the
//! attribution, the hold, the patient screen with the engine's advice and question, and the symptom
//! answer that raises a CRITICAL alert at once.
#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::alerts::EdgeAlerts;
use gateway::journal::{Journal, JournalConfig};
use gateway::kiosk::card::CardKey;
use gateway::kiosk::{
    Advice, CheckInBy, Kiosk, KioskControl, KioskError, KioskSettings, PatientScreen, StaffId,
    SymptomQuestion,
};
use gateway::pipeline::handoff::Handoff;
use gateway::pipeline::{Bindings, Counters, Pipeline, writer};
use gateway::sources::collector::{DeviceRef, RecordSink, SessionInfo, now_utc};
use gateway::sources::uuid;
use protocol::gatt::Codec;
use protocol::gatt::bp::{BloodPressureMeasurement, PressureUnit};
use protocol::gatt::time::DateTime;
use protocol::ieee11073::SFloat;
use protocol::wire::Topics;

const CUFF: &str = "kiosk-cuff";
const KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

struct Rig {
    _dir: tempfile::TempDir,
    journal: Arc<Mutex<Journal>>,
    pipeline: Pipeline,
    kiosk: Arc<Kiosk>,
}

fn rig() -> Rig {
    rig_holding_at_most(1000)
}

fn rig_holding_at_most(max_held: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(JournalConfig::new(dir.path().join("journal"))).unwrap();
    let journal = Arc::new(Mutex::new(journal));
    let (writer, _thread) =
        writer::spawn(journal.clone(), Arc::new(Handoff::default()), 64).unwrap();
    let rules = protocol::rules::RuleSet::default_rules().unwrap();
    let alerts = EdgeAlerts::new(rules, Vec::new(), "gw", Topics::for_gateway("gw")).unwrap();
    let pipeline = Pipeline {
        gateway_id: "gw".into(),
        topics: Topics::for_gateway("gw"),
        bindings: Arc::new(Bindings::default()),
        journal: journal.clone(),
        writer,
        counters: Arc::new(Counters::default()),
        alerts: Some(Arc::new(alerts)),
    };
    let kiosk = Arc::new(
        Kiosk::open(KioskSettings {
            devices: vec![CUFF.into()],
            idle_timeout: Duration::from_secs(60),
            hold_file: dir.path().join("hold.json"),
            max_held,
            card_key: Some(CardKey::from_hex(KEY).unwrap()),
        })
        .unwrap(),
    );
    pipeline.bindings.set_kiosk(Some(kiosk.clone()));
    kiosk.attach(pipeline.clone());
    Rig {
        _dir: dir,
        journal,
        pipeline,
        kiosk,
    }
}

/// A cuff value measured at `t` (device clock = gateway clock) with a pulse.
fn bp(sys: i32, dia: i32, t: i64) -> Vec<u8> {
    let s = |v| SFloat::new(v, 0).unwrap();
    let mut m =
        BloodPressureMeasurement::new(PressureUnit::MmHg, s(sys), s(dia), s((sys + 2 * dia) / 3));
    m.timestamp = DateTime::from_epoch_seconds(t);
    m.pulse_rate = Some(s(72));
    m.to_vec()
}

/// One cuff session delivering `values`, the clock read at this connection (offset 0).
async fn deliver(rig: &Rig, values: &[Vec<u8>]) {
    let session = SessionInfo {
        device: DeviceRef {
            id: CUFF.into(),
            model: None,
            numbering: Default::default(),
        },
        clock_offset_s: Some(0),
    };
    let mut sink = rig.pipeline.session();
    for v in values {
        sink.value(&session, uuid::BP_MEASUREMENT, v, now_utc())
            .await
            .unwrap();
    }
    sink.end_of_transfer(&session).await.unwrap();
}

/// The journal's pending records: (record id, topic, payload).
fn journaled(rig: &Rig) -> Vec<(String, String, serde_json::Value)> {
    let j = rig.journal.lock().unwrap();
    j.pending(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.reading_id.clone(),
                r.topic.clone(),
                serde_json::from_slice(&r.payload).unwrap(),
            )
        })
        .collect()
}

fn readings(rig: &Rig) -> Vec<serde_json::Value> {
    journaled(rig)
        .into_iter()
        .filter(|(_, t, _)| t.ends_with("/readings"))
        .map(|(_, _, p)| p)
        .collect()
}

#[tokio::test]
async fn with_nobody_checked_in_a_reading_is_held_and_its_event_journaled_under_its_own_id() {
    let rig = rig();
    let t = now_utc() - 5;
    deliver(&rig, &[bp(128, 82, t)]).await;
    let held = rig.kiosk.staff_view().held;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].reason, "no_session");
    assert_eq!(
        (held[0].value.as_str(), held[0].unit.as_str()),
        ("128/82", "mmHg")
    );
    assert!(readings(&rig).is_empty());
    let events: Vec<_> = journaled(&rig)
        .into_iter()
        .filter(|(_, t, _)| t.ends_with("/events"))
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, format!("unattributed:{}", held[0].reading_id));
    assert_eq!(
        events[0].2["event"]["reading_id"],
        held[0].reading_id.as_str()
    );
    // The same reading delivered again (a crash before the cursor moved) is held once.
    deliver(&rig, &[bp(128, 82, t)]).await;
    assert_eq!(rig.kiosk.staff_view().held.len(), 1);
}

#[tokio::test]
async fn a_crisis_reading_asks_about_symptoms_and_yes_means_see_a_nurse_with_a_critical_alert() {
    let rig = rig();
    let mut screen = rig.kiosk.screen();
    let staff = StaffId("desk-1".into());
    let session = rig.kiosk.check_in("p-kiosk-0042", &staff).await.unwrap();
    assert_eq!(session.by, CheckInBy::Staff);
    assert_eq!(
        *screen.borrow_and_update(),
        PatientScreen::CheckedIn {
            session: session.session,
            patient_hint: "0042".into()
        }
    );
    deliver(&rig, &[bp(186, 112, now_utc())]).await;
    let PatientScreen::Result {
        session: s,
        patient_hint,
        result,
    } = screen.borrow_and_update().clone()
    else {
        panic!("no result on the screen")
    };
    assert_eq!((s, patient_hint.as_str()), (session.session, "0042"));
    assert_eq!(
        (result.value.as_str(), result.unit.as_str()),
        ("186/112", "mmHg")
    );
    assert_eq!(result.pulse_bpm, Some(72));
    // BP_CRISIS waits for a repeat (confirm = true): measure again, and the question is asked.
    assert_eq!(result.advice, Advice::MeasureAgain);
    assert_eq!(result.question, Some(SymptomQuestion::CrisisSymptoms));
    let reading = &readings(&rig)[0];
    assert_eq!(reading["patient"], "p-kiosk-0042");
    assert_eq!(reading["id"], result.reading_id.as_str());

    // A stale page cannot answer for another session.
    assert_eq!(
        rig.kiosk
            .answer_symptoms(session.session + 1, &result.reading_id, true)
            .await,
        Err(KioskError::StaleSession)
    );
    let alerts_before = journaled(&rig)
        .iter()
        .filter(|(_, t, _)| t.ends_with("/alerts"))
        .count();
    rig.kiosk
        .answer_symptoms(session.session, &result.reading_id, true)
        .await
        .unwrap();
    let PatientScreen::Result { result: after, .. } = screen.borrow_and_update().clone() else {
        panic!("the result left the screen")
    };
    assert_eq!(after.advice, Advice::SeeNurse);
    assert_eq!(after.question, None);
    let alerts: Vec<_> = journaled(&rig)
        .into_iter()
        .filter(|(_, t, _)| t.ends_with("/alerts"))
        .collect();
    assert!(alerts.len() > alerts_before, "the answer raised nothing");
    assert!(
        alerts
            .iter()
            .any(|(_, _, a)| a.to_string().contains("CRITICAL")),
        "no CRITICAL alert: {alerts:?}"
    );
    // Answered: the question is gone.
    assert_eq!(
        rig.kiosk
            .answer_symptoms(session.session, &result.reading_id, true)
            .await,
        Err(KioskError::NoSuchReading)
    );
}

#[tokio::test]
async fn a_normal_reading_is_normal_and_replayed_memory_is_not_the_patients() {
    let rig = rig();
    let staff = StaffId("desk-1".into());
    let session = rig.kiosk.check_in("p-kiosk-0007", &staff).await.unwrap();
    // The cuff replays this morning's reading together with the one just taken.
    deliver(
        &rig,
        &[bp(131, 84, now_utc() - 4 * 3600), bp(118, 76, now_utc())],
    )
    .await;
    let r = readings(&rig);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["blood_pressure"]["systolic"], 118.0);
    let held = rig.kiosk.staff_view().held;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].reason, "outside_session");
    assert_eq!(held[0].value, "131/84");
    let PatientScreen::Result { result, .. } = rig.kiosk.screen().borrow().clone() else {
        panic!("no result")
    };
    assert_eq!((result.advice, result.question), (Advice::Normal, None));
    assert_eq!(
        rig.kiosk.staff_view().session.unwrap().session,
        session.session
    );

    // After check-out the screen is idle and a new reading is nobody's.
    rig.kiosk.check_out(None).await.unwrap();
    assert_eq!(*rig.kiosk.screen().borrow(), PatientScreen::Idle);
    assert!(rig.kiosk.staff_view().session.is_none());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    deliver(&rig, &[bp(121, 79, now_utc())]).await;
    assert_eq!(readings(&rig).len(), 1);
    assert_eq!(rig.kiosk.staff_view().held.len(), 2);
}

#[tokio::test]
async fn cards_check_in_by_their_hash_and_an_unknown_card_says_so() {
    let rig = rig();
    let card = [0x04, 0x11, 0x22, 0x33];
    rig.kiosk.card_presented(&card, now_utc());
    assert_eq!(rig.kiosk.screen_now(), PatientScreen::CardUnknown);
    assert!(rig.kiosk.staff_view().session.is_none());
    let hash = CardKey::from_hex(KEY).unwrap().hash(&card);
    rig.kiosk
        .set_cards([(hash, "p-kiosk-0099".to_owned())].into_iter().collect());
    rig.kiosk.card_presented(&card, now_utc());
    let s = rig.kiosk.staff_view().session.unwrap();
    assert_eq!(
        (s.patient.as_str(), s.by),
        ("p-kiosk-0099", CheckInBy::Card)
    );
    // The next check-in ends the session: one at a time.
    let next = rig
        .kiosk
        .check_in("p-kiosk-0100", &StaffId("desk-1".into()))
        .await
        .unwrap();
    assert_ne!(next.session, s.session);
    assert_eq!(
        rig.kiosk.staff_view().session.unwrap().patient,
        "p-kiosk-0100"
    );
}

#[tokio::test]
async fn the_cuff_pressure_shows_while_measuring_but_only_for_a_checked_in_patient() {
    use protocol::gatt::bp::IntermediateCuffPressure;
    let rig = rig();
    let session = SessionInfo {
        device: DeviceRef {
            id: CUFF.into(),
            model: None,
            numbering: Default::default(),
        },
        clock_offset_s: Some(0),
    };
    let pressure =
        IntermediateCuffPressure::new(PressureUnit::MmHg, SFloat::new(152, 0).unwrap()).to_vec();
    let mut sink = rig.pipeline.session();
    sink.live(&session, uuid::INTERMEDIATE_CUFF_PRESSURE, &pressure);
    assert_eq!(
        rig.kiosk.screen_now(),
        PatientScreen::Idle,
        "nobody checked in"
    );
    let s = rig
        .kiosk
        .check_in("p-kiosk-0042", &StaffId("desk-1".into()))
        .await
        .unwrap();
    sink.live(&session, uuid::INTERMEDIATE_CUFF_PRESSURE, &pressure);
    assert_eq!(
        rig.kiosk.screen_now(),
        PatientScreen::Measuring {
            session: s.session,
            patient_hint: "0042".into(),
            kind: gateway::kiosk::MeasurementKind::BloodPressure,
            cuff_pressure_mmhg: Some(152.0),
        }
    );
}

/// `[kiosk] max_held`: a full hold does not take another unattributed reading from the device (the device
/// keeps it, as with a full journal) and drops nothing to make room; once staff discard one, the same
/// reading is taken on the next delivery.
#[tokio::test]
async fn a_full_hold_leaves_the_next_reading_on_the_device_until_staff_make_room() {
    let rig = rig_holding_at_most(2);
    let t = now_utc() - 30;
    deliver(&rig, &[bp(128, 82, t)]).await;
    deliver(&rig, &[bp(129, 83, t + 1)]).await;
    assert_eq!(rig.kiosk.staff_view().held.len(), 2);

    let third = bp(130, 84, t + 2);
    let session = SessionInfo {
        device: DeviceRef {
            id: CUFF.into(),
            model: None,
            numbering: Default::default(),
        },
        clock_offset_s: Some(0),
    };
    let mut sink = rig.pipeline.session();
    let refused = sink
        .value(&session, uuid::BP_MEASUREMENT, &third, now_utc())
        .await;
    assert!(refused.is_err(), "a full hold must not accept: {refused:?}");
    drop(sink);
    let held = rig.kiosk.staff_view().held;
    assert_eq!(held.len(), 2, "nothing dropped to make room");
    assert!(held.iter().all(|h| h.value != "130/84"));
    let events = journaled(&rig)
        .into_iter()
        .filter(|(id, _, _)| id.starts_with("unattributed:"))
        .count();
    assert_eq!(events, 2, "no event for a reading that was not taken");

    rig.kiosk
        .discard(
            &held[0].reading_id,
            "a demonstration",
            &StaffId("nurse-desk".into()),
        )
        .await
        .unwrap();
    deliver(&rig, &[third]).await;
    let held = rig.kiosk.staff_view().held;
    assert_eq!(held.len(), 2);
    assert!(held.iter().any(|h| h.value == "130/84"), "{held:?}");
}

/// A cuff whose clock was never set (no time stamp): its memory cannot say when it was measured and is
/// held (`replayed_memory`), but the measurement it indicates live, right after its cuff pressures
/// (`RecordSink::live_value`), was measured now — the receive time decides, and it goes to the patient
/// checked in.
#[tokio::test]
async fn a_clockless_cuffs_live_measurement_is_the_patients_and_its_memory_is_held() {
    let rig = rig();
    let staff = StaffId("desk-1".into());
    rig.kiosk.check_in("p-kiosk-0011", &staff).await.unwrap();
    let clockless = |sys: i32, dia: i32| {
        let s = |v| SFloat::new(v, 0).unwrap();
        BloodPressureMeasurement::new(PressureUnit::MmHg, s(sys), s(dia), s((sys + 2 * dia) / 3))
            .to_vec()
    };
    let session = SessionInfo {
        device: DeviceRef {
            id: CUFF.into(),
            model: None,
            numbering: Default::default(),
        },
        clock_offset_s: None,
    };
    let mut sink = rig.pipeline.session();
    sink.value(
        &session,
        uuid::BP_MEASUREMENT,
        &clockless(133, 85),
        now_utc(),
    )
    .await
    .unwrap();
    sink.live_value(
        &session,
        uuid::BP_MEASUREMENT,
        &clockless(124, 79),
        now_utc(),
    )
    .await
    .unwrap();
    sink.end_of_transfer(&session).await.unwrap();

    let r = readings(&rig);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["patient"], "p-kiosk-0011");
    assert_eq!(r[0]["blood_pressure"]["systolic"], 124.0);
    let held = rig.kiosk.staff_view().held;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (held[0].value.as_str(), held[0].reason.as_str()),
        ("133/85", "replayed_memory")
    );
}
