//! The MQTT contract v1 in code (`protocol::wire`) against its published form (`docs/asyncapi.yaml`,
//! `docs/schemas/*.schema.json`): real payloads built by the constructors from realistic measurements must
//! validate; broken ones must not (so the schemas can fail); every field the gateway emits must be
//! documented; and the AsyncAPI document must parse, name only files and pointers that exist, and agree with
//! the topic helpers on addresses, QoS and retain.

// A test file: a failed unwrap is a failed test (helpers included, which clippy does not count as tests).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use jsonschema::Validator;
use protocol::gatt::time::DateTime;
use protocol::ieee11073::SFloat;
use protocol::model::{
    BloodPressureRecord, Glucose, GlucoseContextInfo, GlucoseRecord, Measurement, Pressure,
    PressureUnit,
};
use protocol::validate::{Flags, Reception, validate};
use protocol::wire::{
    CONTENT_TYPE, Channel, DeviceRef, DeviceStatus, EVENT_SCHEMA, Event, EventMessage, Kind,
    READING_SCHEMA, ReadingMessage, STATUS_SCHEMA, StatusMessage, Topics,
};
use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

const READING_SCHEMA_SRC: &str = include_str!("../../docs/schemas/reading.schema.json");
const EVENT_SCHEMA_SRC: &str = include_str!("../../docs/schemas/event.schema.json");
const STATUS_SCHEMA_SRC: &str = include_str!("../../docs/schemas/status.schema.json");
const ASYNCAPI_SRC: &str = include_str!("../../docs/asyncapi.yaml");

const GATEWAY: &str = "gw-0001";
const PATIENT: &str = "P-000123";
const METER: &str = "00:11:22:33:44:55";
const CUFF: &str = "A4:C1:38:0B:5E:21";

// ---------------------------------------------------------------------------------------------------------
// Schema helpers
// ---------------------------------------------------------------------------------------------------------

fn schema_value(src: &str) -> Value {
    serde_json::from_str(src).expect("schema file is JSON")
}

/// A validator for `schema` that resolves references into `reading.schema.json` (the unattributed event's
/// `reading`) to `reading`, registered under its `$id`: nothing is fetched, from files or the network.
fn validator_with(schema: &Value, reading: &Value) -> Validator {
    let id = reading["$id"]
        .as_str()
        .expect("the reading schema has an $id");
    let registry = jsonschema::Registry::new()
        .add(id, reading)
        .expect("the reading schema's $id is a URI")
        .prepare()
        .expect("the reading schema registers");
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .with_registry(&registry)
        .build(schema)
        .expect("schema compiles")
}

fn validator(schema: &Value) -> Validator {
    validator_with(schema, &schema_value(READING_SCHEMA_SRC))
}

/// The strict form ([`strict`]) of the schema `schema_src`, the reading body it refers to strict as well.
fn strict_validator(schema_src: &str) -> Validator {
    validator_with(
        &strict(&schema_value(schema_src)),
        &strict(&schema_value(READING_SCHEMA_SRC)),
    )
}

/// The schema with `additionalProperties: false` on every object schema that lists its properties: a payload
/// that passes it carries no field the schema does not document.
fn strict(schema: &Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                if map.get("type") == Some(&json!("object")) && map.contains_key("properties") {
                    map.insert("additionalProperties".into(), json!(false));
                }
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut s = schema.clone();
    walk(&mut s);
    s
}

fn errors(v: &Validator, payload: &Value) -> Vec<String> {
    v.iter_errors(payload)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// `payload` validates against the schema and against its strict form.
fn assert_valid(schema_src: &str, payload: &Value) {
    let schema = schema_value(schema_src);
    let errs = errors(&validator(&schema), payload);
    assert!(errs.is_empty(), "payload rejected:\n{payload:#}\n{errs:#?}");
    let errs = errors(&strict_validator(schema_src), payload);
    assert!(
        errs.is_empty(),
        "payload carries fields the schema does not document:\n{payload:#}\n{errs:#?}"
    );
}

fn assert_invalid(schema_src: &str, payload: &Value, why: &str) {
    let v = validator(&schema_value(schema_src));
    assert!(
        !v.is_valid(payload),
        "{why}: the schema accepted\n{payload:#}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Realistic measurements
// ---------------------------------------------------------------------------------------------------------

/// 2024-06-15T07:45:00 on the meter, which keeps Central European Summer Time (UTC+2); the gateway reads its
/// clock at the same connection and finds it 2 h 3 min ahead of UTC (3 min fast).
fn morning() -> DateTime {
    DateTime {
        year: 2024,
        month: 6,
        day: 15,
        hours: 7,
        minutes: 45,
        seconds: 0,
    }
}

/// 2024-06-15T05:52:10Z: received some minutes after the measurement.
const RX_UTC: i64 = 1_718_430_730;
const OFFSET_S: i64 = 2 * 3600 + 180;

fn rx() -> Reception {
    Reception {
        received_utc: RX_UTC,
        clock_offset_s: Some(OFFSET_S),
    }
}

fn glucose_record(seq: u16, mantissa: i32, exponent: i8, mol_per_l: bool) -> GlucoseRecord {
    GlucoseRecord {
        sequence_number: seq,
        numbering: protocol::model::RecordNumbering::Gls,
        base_time: morning(),
        time_offset_min: Some(0),
        concentration: Some(Glucose::from_wire(
            SFloat::new(mantissa, exponent).unwrap(),
            mol_per_l,
        )),
        sample_type: Some(1),
        sample_location: Some(1),
        sensor_status: Some(0),
        context: None,
    }
}

fn bp_record(
    unit: PressureUnit,
    sys: (i32, i8),
    dia: (i32, i8),
    map: (i32, i8),
) -> BloodPressureRecord {
    let p = |(m, e)| Pressure {
        raw: SFloat::new(m, e).unwrap(),
        unit,
    };
    BloodPressureRecord {
        systolic: p(sys),
        diastolic: p(dia),
        mean_arterial_pressure: p(map),
        timestamp: Some(morning()),
        pulse_rate: Some(SFloat::new(68, 0).unwrap()),
        user_id: Some(1),
        measurement_status: Some(0),
    }
}

fn reading(device: &str, m: &Measurement, rx: &Reception) -> Value {
    let verdict = validate(m, rx);
    let msg = ReadingMessage::new(GATEWAY, PATIENT, DeviceRef::new(device), m, &verdict, rx)
        .expect("a patient reading");
    let json = serde_json::to_value(&msg).unwrap();
    // What the CRM receives reads back into the same message.
    assert_eq!(
        serde_json::from_value::<ReadingMessage>(json.clone()).unwrap(),
        msg
    );
    json
}

fn glucose_mg_dl() -> Value {
    let mut device = DeviceRef::new(METER);
    device.model = Some("Contour Next One".into());
    let m = Measurement::Glucose(glucose_record(42, 126, -5, false));
    let verdict = validate(&m, &rx());
    let msg = ReadingMessage::new(GATEWAY, PATIENT, device, &m, &verdict, &rx()).unwrap();
    serde_json::to_value(&msg).unwrap()
}

fn glucose_mmol_with_context() -> Value {
    let mut g = glucose_record(43, 78, -4, true); // 7.8 mmol/L
    g.context = Some(GlucoseContextInfo {
        meal: Some(2),
        tester: Some(1),
        health: Some(5),
        carbohydrate: Some((2, Some(60.0))),
        exercise: Some((1800, 40)),
        medication: Some((1, Some(4.0), false)),
        hba1c_pct: Some(6.9),
    });
    reading(METER, &Measurement::Glucose(g), &rx())
}

fn glucose_censored_low() -> Value {
    let mut g = glucose_record(44, 20, -5, false);
    g.concentration = Some(Glucose::from_wire(SFloat::NAN, false));
    g.sensor_status = Some(0x0040);
    reading(METER, &Measurement::Glucose(g), &rx())
}

fn glucose_censored_high_no_concentration() -> Value {
    let mut g = glucose_record(45, 0, 0, false);
    g.concentration = None;
    g.sensor_status = Some(0x0020);
    reading(METER, &Measurement::Glucose(g), &rx())
}

fn bp_kpa() -> Value {
    reading(
        CUFF,
        &Measurement::BloodPressure(bp_record(
            PressureUnit::KPa,
            (160, -1),
            (107, -1),
            (125, -1),
        )),
        &rx(),
    )
}

fn bp_low_quality() -> Value {
    let mut b = bp_record(PressureUnit::MmHg, (148, 0), (92, 0), (111, 0));
    b.measurement_status = Some(0x0001 | 0x0004); // body movement, irregular pulse
    reading(CUFF, &Measurement::BloodPressure(b), &rx())
}

fn bp_without_time_stamp() -> Value {
    let mut b = bp_record(PressureUnit::MmHg, (124, 0), (86, 0), (0, 0)); // MAP 0: Beurer
    b.timestamp = None;
    reading(CUFF, &Measurement::BloodPressure(b), &rx())
}

fn glucose_clock_not_read() -> Value {
    let unread = Reception {
        received_utc: RX_UTC,
        clock_offset_s: None,
    };
    reading(
        METER,
        &Measurement::Glucose(glucose_record(46, 98, -5, false)),
        &unread,
    )
}

fn glucose_time_fault() -> Value {
    let mut g = glucose_record(47, 98, -5, false);
    g.sensor_status = Some(0x0800 | 0x0001); // time fault, battery low
    reading(METER, &Measurement::Glucose(g), &rx())
}

fn all_readings() -> Vec<(&'static str, Value)> {
    vec![
        ("glucose mg/dL", glucose_mg_dl()),
        ("glucose mmol/L with context", glucose_mmol_with_context()),
        ("glucose LO", glucose_censored_low()),
        (
            "glucose HI without concentration",
            glucose_censored_high_no_concentration(),
        ),
        ("BP kPa", bp_kpa()),
        ("BP low quality", bp_low_quality()),
        ("BP without time stamp", bp_without_time_stamp()),
        ("glucose, clock not read", glucose_clock_not_read()),
        ("glucose, time fault", glucose_time_fault()),
    ]
}

fn event(e: Event) -> Value {
    let msg = EventMessage::new(GATEWAY, RX_UTC, e).unwrap();
    let json = serde_json::to_value(&msg).unwrap();
    assert_eq!(
        serde_json::from_value::<EventMessage>(json.clone()).unwrap(),
        msg
    );
    json
}

fn excluded(device: &str, m: &Measurement, rx: &Reception) -> Value {
    let verdict = validate(m, rx);
    event(Event::for_excluded(device, Some(PATIENT), m, &verdict).expect("an excluded reading"))
}

/// A kiosk cuff's user 2, bound to nobody: 131/84 mmHg, pulse 68.
fn kiosk_bp_user_2() -> Measurement {
    let mut b = bp_record(PressureUnit::MmHg, (131, 0), (84, 0), (99, 0));
    b.user_id = Some(2);
    Measurement::BloodPressure(b)
}

fn unattributed(device: &str, m: &Measurement) -> Value {
    let verdict = validate(m, &rx());
    event(
        Event::unattributed(DeviceRef::new(device), m, &verdict, &rx()).expect("a patient reading"),
    )
}

fn unattributed_bp() -> Value {
    unattributed(CUFF, &kiosk_bp_user_2())
}

fn unattributed_glucose() -> Value {
    unattributed(
        METER,
        &Measurement::Glucose(glucose_record(48, 112, -5, false)),
    )
}

fn all_events() -> Vec<(&'static str, Value)> {
    let mut control = glucose_record(50, 110, -5, false);
    control.sample_type = Some(10);
    let mut device_error = glucose_record(51, 110, -5, false);
    device_error.sensor_status = Some(0x0004); // sample size insufficient
    let mut all_nan = bp_record(PressureUnit::MmHg, (120, 0), (80, 0), (93, 0));
    all_nan.systolic.raw = SFloat::NAN;
    all_nan.diastolic.raw = SFloat::NAN;
    let future = Reception {
        received_utc: RX_UTC - 3600,
        clock_offset_s: Some(OFFSET_S),
    };
    let kiosk_bp =
        Measurement::BloodPressure(bp_record(PressureUnit::MmHg, (131, 0), (84, 0), (99, 0)));
    vec![
        (
            "rejected: glucose out of range",
            excluded(
                METER,
                &Measurement::Glucose(glucose_record(52, 700, -5, false)),
                &rx(),
            ),
        ),
        (
            "rejected: mmol out of range",
            excluded(
                METER,
                &Measurement::Glucose(glucose_record(53, 400, -4, true)),
                &rx(),
            ),
        ),
        (
            "rejected: device error",
            excluded(METER, &Measurement::Glucose(device_error), &rx()),
        ),
        (
            "rejected: BP NaN",
            excluded(CUFF, &Measurement::BloodPressure(all_nan), &rx()),
        ),
        (
            "rejected: pulse pressure",
            excluded(
                CUFF,
                &Measurement::BloodPressure(bp_record(
                    PressureUnit::MmHg,
                    (89, 0),
                    (80, 0),
                    (83, 0),
                )),
                &rx(),
            ),
        ),
        (
            "rejected: time in future",
            excluded(CUFF, &kiosk_bp, &future),
        ),
        (
            "control solution",
            excluded(METER, &Measurement::Glucose(control), &rx()),
        ),
        ("unattributed", unattributed_bp()),
        ("unattributed glucose", unattributed_glucose()),
        (
            "journal full",
            event(Event::JournalFull {
                depth: 50_000,
                max: 50_000,
                device: Some(METER.into()),
            }),
        ),
        (
            "journal full, no device",
            event(Event::JournalFull {
                depth: 50_000,
                max: 50_000,
                device: None,
            }),
        ),
        (
            "unpaired device",
            event(Event::UnpairedDevice {
                device: "C0:26:DA:00:00:99".into(),
                services: vec!["glucose".into()],
                rssi: Some(-61),
            }),
        ),
        (
            "device error",
            event(Event::DeviceError {
                device: CUFF.into(),
                stage: "download".into(),
                cause: "RACP: procedure not completed".into(),
            }),
        ),
        (
            "config rejected",
            event(Event::ConfigRejected {
                version: Some(17),
                reason: "threshold out of guard-rail".into(),
            }),
        ),
        (
            "config unreadable",
            event(Event::ConfigRejected {
                version: None,
                reason: "not JSON".into(),
            }),
        ),
        (
            "decode failed",
            event(Event::decode_failed(
                METER,
                0x2A18,
                &[0x1B, 0x2A, 0x00],
                &"too short (3 bytes, need 10)",
            )),
        ),
        (
            "kiosk reading assigned",
            event(Event::ReadingAssigned {
                reading_id: "94271e75-c46f-5b34-8576-702696c5b216".into(),
                device: CUFF.into(),
                kind: Kind::BloodPressure,
                from: "unattributed".into(),
                held_reason: "no_session".into(),
                patient: "p-kiosk-0042".into(),
                staff: "desk-1".into(),
            }),
        ),
        (
            "kiosk reading discarded",
            event(Event::ReadingDiscarded {
                reading_id: "94271e75-c46f-5b34-8576-702696c5b216".into(),
                device: CUFF.into(),
                kind: Kind::BloodPressure,
                held_reason: "outside_session".into(),
                reason: "cuff demonstration".into(),
                staff: "desk-1".into(),
            }),
        ),
    ]
}

fn status_online() -> Value {
    let mut s = StatusMessage::online(GATEWAY, Some(env!("CARGO_PKG_VERSION")));
    s.journal_depth = Some(3);
    s.adapter = Some("powered".into());
    s.devices = vec![
        DeviceStatus {
            id: METER.into(),
            kind: Kind::Glucose,
            last_seen: protocol::wire::rfc3339_utc(RX_UTC),
            last_failure: None,
        },
        DeviceStatus {
            id: CUFF.into(),
            kind: Kind::BloodPressure,
            last_seen: None,
            last_failure: Some("connect: timeout".into()),
        },
    ];
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(
        serde_json::from_value::<StatusMessage>(json.clone()).unwrap(),
        s
    );
    json
}

fn status_offline() -> Value {
    serde_json::to_value(StatusMessage::offline(GATEWAY)).unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// Payloads against the schemas
// ---------------------------------------------------------------------------------------------------------

#[test]
fn schemas_are_valid_draft_2020_12() {
    for src in [READING_SCHEMA_SRC, EVENT_SCHEMA_SRC, STATUS_SCHEMA_SRC] {
        let s = schema_value(src);
        assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
        jsonschema::draft202012::meta::validate(&s).expect("valid against the 2020-12 meta-schema");
        assert_eq!(
            s["additionalProperties"], true,
            "top level stays open for minor revisions"
        );
    }
    assert_eq!(
        schema_value(READING_SCHEMA_SRC)["properties"]["schema"]["const"],
        READING_SCHEMA
    );
    assert_eq!(
        schema_value(EVENT_SCHEMA_SRC)["properties"]["schema"]["const"],
        EVENT_SCHEMA
    );
    assert_eq!(
        schema_value(STATUS_SCHEMA_SRC)["properties"]["schema"]["const"],
        STATUS_SCHEMA
    );
}

#[test]
fn real_readings_validate() {
    for (name, payload) in all_readings() {
        eprintln!("{name}");
        assert_valid(READING_SCHEMA_SRC, &payload);
    }
}

/// A reading from a meter that numbers its records newest-first (TaiDoc): no sequence number on the wire,
/// an id over device time and value — the same for the same measurement whatever number it had in a
/// transfer, and valid against the schema, held or published.
#[test]
fn newest_first_readings_have_no_sequence_number_and_a_time_based_id() {
    let newest_first = |seq| {
        let mut g = glucose_record(seq, 112, -5, false);
        g.numbering = protocol::model::RecordNumbering::NewestFirst;
        Measurement::Glucose(g)
    };
    let message = |m: &Measurement| {
        let verdict = validate(m, &rx());
        let msg = ReadingMessage::new(GATEWAY, PATIENT, DeviceRef::new(METER), m, &verdict, &rx())
            .unwrap();
        serde_json::to_value(&msg).unwrap()
    };
    let (as_0, as_5) = (message(&newest_first(0)), message(&newest_first(5)));
    assert_valid(READING_SCHEMA_SRC, &as_0);
    assert!(as_0.get("sequence_number").is_none());
    assert_eq!(as_0["id"], as_5["id"], "renumbered, same reading");
    assert_ne!(
        as_0["id"],
        message(&Measurement::Glucose(glucose_record(0, 112, -5, false)))["id"],
        "not the sequence-number id"
    );
    assert_valid(EVENT_SCHEMA_SRC, &unattributed(METER, &newest_first(3)));
}

#[test]
fn readings_carry_what_the_contract_promises() {
    let g = glucose_mg_dl();
    assert_eq!(
        g["id"],
        protocol::reading_id::glucose(METER, 42).to_string()
    );
    assert_eq!(g["glucose"]["unit"], "mg/dL");
    assert_eq!(g["time"]["device"], "2024-06-15T07:45:00");
    assert_eq!(g["time"]["received"], "2024-06-15T05:52:10Z");
    assert_eq!(g["time"]["corrected"], "2024-06-15T05:42:00Z"); // 07:45 − 2 h 3 min
    assert_eq!(g["time"]["trusted"], true);
    let low = glucose_censored_low();
    assert_eq!(
        (&low["quality"], &low["glucose"]["censored"]),
        (&json!("censored"), &json!("low"))
    );
    assert_eq!(bp_kpa()["blood_pressure"]["unit"], "kPa");
    assert_eq!(bp_low_quality()["quality"], "low_quality");
    let untimed = bp_without_time_stamp();
    assert_eq!(untimed["time"]["doubt"], "no_device_time");
    assert!(
        untimed["blood_pressure"]
            .get("mean_arterial_pressure")
            .is_none()
    );
    assert_eq!(
        glucose_time_fault()["status"]["flags"],
        json!(["battery_low", "time_untrusted"])
    );
}

/// Every validation flag name the code can emit is one the schema documents.
#[test]
fn every_flag_name_is_in_the_schema() {
    let mut payload = bp_low_quality();
    let names: Vec<&str> = Flags(u32::MAX).names().collect();
    assert!(names.len() >= 11);
    payload["status"]["flags"] = json!(names);
    assert_valid(READING_SCHEMA_SRC, &payload);
}

#[test]
fn real_events_validate() {
    for (name, payload) in all_events() {
        eprintln!("{name}");
        assert_valid(EVENT_SCHEMA_SRC, &payload);
    }
}

#[test]
fn events_carry_what_the_contract_promises() {
    let events = all_events();
    let by_name = |n: &str| {
        events
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let oor = by_name("rejected: glucose out of range");
    assert_eq!(oor["event"]["type"], "reading_rejected");
    assert_eq!(oor["event"]["reason_code"], "out_of_range");
    assert_eq!(
        oor["event"]["reading_id"],
        protocol::reading_id::glucose(METER, 52).to_string()
    );
    assert_eq!(
        oor["event"]["detail"],
        json!({"field": "glucose", "value": 700.0, "min": 10.0, "max": 630.0, "unit": "mg/dL"})
    );
    assert_eq!(
        by_name("rejected: BP NaN")["event"]["detail"],
        json!({"field": "systolic", "special": "NaN"})
    );
    assert_eq!(
        by_name("control solution")["event"]["type"],
        "control_solution"
    );
    assert_eq!(by_name("unattributed")["event"]["user_id"], 2);
    assert_eq!(by_name("decode failed")["event"]["hex"], "1b2a00");
    assert_eq!(by_name("decode failed")["event"]["characteristic"], "2A18");
}

/// An unattributed reading is held whole (DESIGN.md promise 6): the event carries the values, times, status
/// and verdict under the id the reading will be published with, and envelope + held reading is a valid
/// reading message once a patient is assigned.
#[test]
fn unattributed_events_hold_the_whole_reading() {
    for (device, m, payload) in [
        (CUFF, kiosk_bp_user_2(), unattributed_bp()),
        (
            METER,
            Measurement::Glucose(glucose_record(48, 112, -5, false)),
            unattributed_glucose(),
        ),
    ] {
        let ev = &payload["event"];
        assert_eq!(ev["type"], "unattributed");
        // What the same measurement would have been, had its device been bound to a patient.
        let as_reading = reading(device, &m, &rx());
        assert_eq!(
            ev["reading_id"], as_reading["id"],
            "the same id as the reading"
        );
        assert_eq!(ev["device"], device);
        assert_eq!(ev["kind"], as_reading["kind"]);
        let mut body = as_reading.as_object().unwrap().clone();
        for envelope in ["schema", "id", "gateway", "patient"] {
            body.remove(envelope);
        }
        assert_eq!(
            ev["reading"],
            Value::Object(body),
            "the whole reading, held"
        );
        // Assigned later: envelope + held reading is the reading message, and it validates.
        let mut assigned = ev["reading"].clone();
        assigned["schema"] = json!(READING_SCHEMA);
        assigned["id"] = ev["reading_id"].clone();
        assigned["gateway"] = payload["gateway"].clone();
        assigned["patient"] = json!(PATIENT);
        assert_eq!(assigned, as_reading);
        assert_valid(READING_SCHEMA_SRC, &assigned);
    }
    let bp = unattributed_bp();
    let held = &bp["event"]["reading"];
    assert_eq!(bp["event"]["user_id"], 2);
    assert_eq!(held["device"]["user_id"], 2);
    assert_eq!(
        bp["event"]["reading_id"],
        protocol::wire::reading_id_of(CUFF, &kiosk_bp_user_2()).to_string()
    );
    assert_eq!(held["blood_pressure"]["systolic"], 131.0);
    assert_eq!(held["blood_pressure"]["diastolic"], 84.0);
    assert_eq!(held["blood_pressure"]["pulse_bpm"], 68.0);
    assert_eq!(held["time"]["device"], "2024-06-15T07:45:00");
    assert_eq!(held["time"]["corrected"], "2024-06-15T05:42:00Z");
    assert_eq!(held["status"]["measurement_status"], 0);
    assert_eq!(held["quality"], "valid");
    let g = unattributed_glucose();
    assert_eq!(g["event"]["reading"]["glucose"]["mg_per_dl"], 112.0);
    assert_eq!(g["event"]["reading"]["sequence_number"], 48);
    assert!(g["event"].get("user_id").is_none());
}

/// The reading message's schema is the envelope plus `$defs/reading_body` (which the unattributed event
/// refers to): the two property lists, required lists and rules cannot drift apart.
#[test]
fn reading_schema_is_envelope_plus_body() {
    let s = schema_value(READING_SCHEMA_SRC);
    let body = &s["$defs"]["reading_body"];
    let envelope = ["schema", "id", "gateway", "patient"];
    let props = s["properties"].as_object().unwrap();
    let body_props = body["properties"].as_object().unwrap();
    let mut expected: Vec<&str> = envelope.to_vec();
    expected.extend(body_props.keys().map(String::as_str));
    let mut names: Vec<&str> = props.keys().map(String::as_str).collect();
    names.sort_unstable();
    expected.sort_unstable();
    assert_eq!(names, expected, "top-level properties = envelope + body");
    for (name, def) in body_props {
        assert_eq!(&props[name], def, "{name}: same definition");
    }
    let mut required: Vec<&Value> = s["required"].as_array().unwrap().iter().collect();
    let mut expected: Vec<&Value> = body["required"].as_array().unwrap().iter().collect();
    let envelope_json: Vec<Value> = envelope.iter().map(|e| json!(e)).collect();
    expected.extend(envelope_json.iter());
    required.sort_by_key(|v| v.to_string());
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(required, expected, "required = envelope + body's required");
    assert_eq!(s["allOf"], body["allOf"], "the same rules");
    assert_eq!(
        schema_value(EVENT_SCHEMA_SRC)["$defs"]["unattributed"]["properties"]["reading"]["$ref"],
        "reading.schema.json#/$defs/reading_body"
    );
}

#[test]
fn status_validates_online_and_as_last_will() {
    assert_valid(STATUS_SCHEMA_SRC, &status_online());
    let offline = status_offline();
    assert_valid(STATUS_SCHEMA_SRC, &offline);
    assert_eq!(
        offline,
        json!({"schema": "phg.status/1", "gateway": GATEWAY, "state": "offline"})
    );
}

// ---------------------------------------------------------------------------------------------------------
// The schemas can fail
// ---------------------------------------------------------------------------------------------------------

fn without(mut v: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap()
        .remove(key)
        .expect("field present");
    v
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap()
        .insert(key.into(), value);
    v
}

#[test]
fn broken_readings_are_rejected() {
    let g = glucose_mg_dl();
    let bp = bp_kpa();
    let id = g["id"].as_str().unwrap().to_owned();
    let cases = [
        (without(g.clone(), "/id"), "missing id"),
        (without(g.clone(), "/patient"), "missing patient"),
        (without(g.clone(), "/time/received"), "missing receive time"),
        (
            without(g.clone(), "/glucose"),
            "glucose reading without glucose",
        ),
        (
            without(g.clone(), "/glucose/mmol_per_l"),
            "value without the derived unit",
        ),
        (
            with(g.clone(), "/id", json!("not-a-uuid")),
            "id is not a UUID",
        ),
        (
            with(g.clone(), "/id", json!(id.to_uppercase())),
            "upper-case UUID",
        ),
        (
            with(
                g.clone(),
                "/id",
                json!("9f1c2a6e-8d4b-4c3a-9e2f-1a2b3c4d5e6f"),
            ),
            "a v4 UUID is not a reading id",
        ),
        (
            with(g.clone(), "/glucose/unit", json!("mg/dl")),
            "wrong unit spelling",
        ),
        (
            with(g.clone(), "/glucose/unit", json!("mmHg")),
            "pressure unit on glucose",
        ),
        (
            with(bp.clone(), "/blood_pressure/unit", json!("mmol/L")),
            "glucose unit on pressure",
        ),
        (with(g.clone(), "/kind", json!("ketone")), "unknown kind"),
        (
            with(g.clone(), "/quality", json!("rejected")),
            "rejected readings are events",
        ),
        (
            with(g.clone(), "/schema", json!("phg.reading/2")),
            "another major version",
        ),
        (
            with(g.clone(), "/patient", json!("Jane Doe")),
            "a name as patient",
        ),
        (
            with(g.clone(), "/gateway", json!("gw/1")),
            "gateway id with a topic separator",
        ),
        (
            with(
                g.clone(),
                "/time/received",
                json!("2024-06-15T05:52:10+02:00"),
            ),
            "receive time not UTC",
        ),
        (
            with(g.clone(), "/time/received", json!("2024-06-15 05:52:10Z")),
            "receive time not RFC 3339",
        ),
        (
            with(g.clone(), "/time/corrected", json!("2024-13-15T05:52:10Z")),
            "month 13",
        ),
        (
            with(g.clone(), "/time/doubt", json!("clock_not_read")),
            "trusted time with a doubt",
        ),
        (
            without(glucose_clock_not_read(), "/time/doubt"),
            "untrusted time without a doubt",
        ),
        (
            with(g.clone(), "/time/trusted", json!("yes")),
            "trusted not a boolean",
        ),
        (
            with(
                g.clone(),
                "/status/flags",
                json!(["battery_low", "battery_low"]),
            ),
            "duplicate flag",
        ),
        (
            with(g.clone(), "/status/flags", json!(["BatteryLow"])),
            "unknown flag spelling",
        ),
        (
            with(g.clone(), "/sequence_number", json!(65536)),
            "sequence number beyond u16",
        ),
        (
            with(g.clone(), "/glucose/value", json!(null)),
            "null instead of absent",
        ),
        (
            with(g.clone(), "/blood_pressure", bp["blood_pressure"].clone()),
            "glucose reading with pressures",
        ),
        (
            with(g.clone(), "/quality", json!("censored")),
            "censored without glucose.censored",
        ),
        (
            with(glucose_mmol_with_context(), "/context/meal", json!("lunch")),
            "unknown meal name",
        ),
        (
            with(
                glucose_mmol_with_context(),
                "/context/meal",
                json!("reserved:x"),
            ),
            "bad reserved code",
        ),
        (
            without(bp.clone(), "/blood_pressure/systolic_mmhg"),
            "pressure without mmHg",
        ),
        (
            with(bp.clone(), "/device/user_id", json!(256)),
            "user id beyond u8",
        ),
    ];
    for (payload, why) in &cases {
        assert_invalid(READING_SCHEMA_SRC, payload, why);
    }
}

#[test]
fn broken_events_are_rejected() {
    let events = all_events();
    let rejected = events[0].1.clone();
    let decode = events
        .iter()
        .find(|(n, _)| *n == "decode failed")
        .map(|(_, v)| v.clone())
        .unwrap();
    let journal_full = events
        .iter()
        .find(|(n, _)| *n == "journal full")
        .map(|(_, v)| v.clone())
        .unwrap();
    let cases = [
        (
            without(rejected.clone(), "/event/reading_id"),
            "rejection without reading id",
        ),
        (
            without(rejected.clone(), "/event/detail"),
            "rejection without detail",
        ),
        (
            without(rejected.clone(), "/event/detail/max"),
            "out of range without its window",
        ),
        (
            with(rejected.clone(), "/event/reading_id", json!("42")),
            "bad reading id",
        ),
        (
            with(rejected.clone(), "/event/reason_code", json!("too_high")),
            "unknown reason code",
        ),
        (
            with(rejected.clone(), "/event/type", json!("reading_lost")),
            "unknown event type",
        ),
        (
            with(rejected.clone(), "/event/detail/unit", json!("mg/dl")),
            "wrong unit spelling",
        ),
        (without(rejected.clone(), "/time"), "missing time"),
        (
            with(rejected.clone(), "/time", json!("yesterday")),
            "time not RFC 3339",
        ),
        (with(decode.clone(), "/event/hex", json!("1b2")), "odd hex"),
        (
            with(decode.clone(), "/event/hex", json!("1B2A")),
            "upper-case hex",
        ),
        (
            with(decode.clone(), "/event/characteristic", json!("0x2A18")),
            "characteristic not 4 hex digits",
        ),
        (
            with(journal_full, "/event/depth", json!(-1)),
            "negative journal depth",
        ),
        (
            without(unattributed_bp(), "/event/reading"),
            "unattributed without the reading it holds",
        ),
        (
            with(unattributed_bp(), "/event/reading", json!({})),
            "unattributed with an empty reading",
        ),
        (
            without(unattributed_bp(), "/event/reading/blood_pressure"),
            "held BP reading without its pressures",
        ),
        (
            without(unattributed_bp(), "/event/reading/time"),
            "held reading without its time",
        ),
        (
            without(unattributed_bp(), "/event/reading/quality"),
            "held reading without its verdict",
        ),
        (
            with(
                unattributed_bp(),
                "/event/reading/quality",
                json!("rejected"),
            ),
            "held reading with a rejected verdict",
        ),
        (
            with(unattributed_bp(), "/event/reading/kind", json!("glucose")),
            "held reading's kind disagrees with its values",
        ),
        (
            with(unattributed_bp(), "/event/kind", json!("glucose")),
            "event's kind disagrees with the held reading's",
        ),
        (
            with(
                unattributed_bp(),
                "/event/reading/blood_pressure/unit",
                json!("mmol/L"),
            ),
            "held reading with a glucose unit on pressure",
        ),
    ];
    for (payload, why) in &cases {
        assert_invalid(EVENT_SCHEMA_SRC, payload, why);
    }
}

#[test]
fn broken_status_is_rejected() {
    let online = status_online();
    let cases = [
        (without(online.clone(), "/state"), "missing state"),
        (with(online.clone(), "/state", json!("up")), "unknown state"),
        (
            with(online.clone(), "/journal_depth", json!(-3)),
            "negative journal depth",
        ),
        (
            with(
                online.clone(),
                "/devices",
                json!([{"id": METER, "kind": "thermometer"}]),
            ),
            "unknown device kind",
        ),
        (
            with(online.clone(), "/devices", json!([{"kind": "glucose"}])),
            "device without id",
        ),
        (
            with(
                online.clone(),
                "/devices",
                json!([{"id": METER, "kind": "glucose", "last_seen": "today"}]),
            ),
            "bad last_seen",
        ),
        (
            with(online, "/schema", json!("phg.reading/1")),
            "another payload's schema",
        ),
    ];
    for (payload, why) in &cases {
        assert_invalid(STATUS_SCHEMA_SRC, payload, why);
    }
}

/// The "every emitted field is documented" check can fail: an undocumented field, top level or nested,
/// fails the strict form (while the open schema accepts it).
#[test]
fn undocumented_fields_fail_the_strict_check() {
    let strict_reading = strict_validator(READING_SCHEMA_SRC);
    for (pointer, field) in ["", "/glucose", "/time", "/status", "/device"]
        .iter()
        .zip(["a", "b", "c", "d", "e"])
    {
        let payload = with(
            glucose_mg_dl(),
            &format!("{pointer}/undocumented_{field}"),
            json!(1),
        );
        assert!(
            !strict_reading.is_valid(&payload),
            "{pointer}: undocumented field passed the strict check"
        );
    }
    let strict_event = strict_validator(EVENT_SCHEMA_SRC);
    let payload = with(
        all_events()[0].1.clone(),
        "/event/detail/undocumented",
        json!(1),
    );
    assert!(!strict_event.is_valid(&payload));
    // The reading an unattributed event holds is checked as strictly as a reading message.
    for pointer in [
        "/event/undocumented",
        "/event/reading/undocumented",
        "/event/reading/blood_pressure/undocumented",
        "/event/reading/time/undocumented",
    ] {
        let payload = with(unattributed_bp(), pointer, json!(1));
        assert!(
            validator(&schema_value(EVENT_SCHEMA_SRC)).is_valid(&payload),
            "{pointer}: the open schema accepts added fields"
        );
        assert!(
            !strict_event.is_valid(&payload),
            "{pointer}: undocumented field passed the strict check"
        );
    }
}

/// A newer minor revision adds fields: the schema (like the Rust types) accepts them.
#[test]
fn added_fields_stay_valid() {
    let g = with(glucose_mg_dl(), "/firmware_hint", json!({"x": 1}));
    let g = with(g, "/time/ntp_synchronised", json!(true));
    assert!(validator(&schema_value(READING_SCHEMA_SRC)).is_valid(&g));
    assert!(serde_json::from_value::<ReadingMessage>(g).is_ok());
}

// ---------------------------------------------------------------------------------------------------------
// The AsyncAPI document
// ---------------------------------------------------------------------------------------------------------

fn asyncapi() -> Yaml {
    let mut docs = YamlLoader::load_from_str(ASYNCAPI_SRC).expect("docs/asyncapi.yaml is YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => json!(s.parse::<f64>().expect("a YAML real")),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => json!(s),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().expect("string keys").to_owned(), to_json(v)))
                .collect(),
        ),
        Yaml::Null => Value::Null,
        other => panic!("unexpected YAML node {other:?}"),
    }
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                out.push(r.clone());
            }
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn asyncapi_parses_and_every_ref_exists() {
    let doc = to_json(&asyncapi());
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["version"], "1.0.0");
    assert_eq!(doc["defaultContentType"], CONTENT_TYPE);
    let docs_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(
        all.len() > 20,
        "the document is wired together with $refs ({})",
        all.len()
    );
    for r in &all {
        let (file, pointer) = r.split_once('#').unwrap_or((r.as_str(), ""));
        let target = if file.is_empty() {
            doc.clone()
        } else {
            let path = docs_dir.join(file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("$ref {r}: {}: {e}", path.display()));
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("$ref {r}: not JSON: {e}"))
        };
        // JSON pointer escapes: ~1 is '/', ~0 is '~'.
        assert!(
            target.pointer(pointer).is_some(),
            "$ref {r} points at nothing"
        );
    }
    // The three schema files are each referenced.
    for f in [
        "./schemas/reading.schema.json",
        "./schemas/event.schema.json",
        "./schemas/status.schema.json",
    ] {
        assert!(all.iter().any(|r| r == f), "{f} not referenced");
    }
}

#[test]
fn asyncapi_agrees_with_the_topic_helpers() {
    let doc = to_json(&asyncapi());
    let topics = Topics::for_gateway("{gateway_id}");
    for channel in Channel::ALL {
        let c = &doc["channels"][channel.suffix()];
        assert_eq!(c["address"], topics.topic(channel), "{channel:?} address");
        assert!(
            c["parameters"]["gateway_id"].is_object(),
            "{channel:?} names its gateway_id parameter"
        );
        let ops: Vec<&Value> = doc["operations"]
            .as_object()
            .unwrap()
            .values()
            .filter(|op| op["channel"]["$ref"] == format!("#/channels/{}", channel.suffix()))
            .collect();
        assert_eq!(ops.len(), 1, "one operation on {channel:?}");
        let op = ops[0];
        assert_eq!(
            op["action"],
            if channel.gateway_publishes() {
                "send"
            } else {
                "receive"
            },
            "{channel:?}"
        );
        assert_eq!(
            op["bindings"]["mqtt"]["qos"],
            channel.qos(),
            "{channel:?} QoS"
        );
        assert_eq!(
            op["bindings"]["mqtt"]["retain"],
            channel.retained(),
            "{channel:?} retain"
        );
    }
    let will = &doc["servers"]["broker"]["bindings"]["mqtt"]["lastWill"];
    assert_eq!(will["topic"], topics.status());
    assert_eq!(will["retain"], true);
    let will_payload: Value = serde_json::from_str(will["message"].as_str().unwrap()).unwrap();
    assert_eq!(
        will_payload,
        json!({"schema": STATUS_SCHEMA, "gateway": "{gateway_id}", "state": "offline"})
    );
}

/// The examples in the document are payloads the schemas accept.
#[test]
fn asyncapi_examples_validate() {
    let doc = to_json(&asyncapi());
    let mut checked = 0;
    for (msg, schema) in [
        ("reading", READING_SCHEMA_SRC),
        ("event", EVENT_SCHEMA_SRC),
        ("status", STATUS_SCHEMA_SRC),
    ] {
        let examples = doc["components"]["messages"][msg]["examples"]
            .as_array()
            .expect("examples");
        for ex in examples {
            eprintln!("{msg}: {}", ex["name"]);
            assert_valid(schema, &ex["payload"]);
            checked += 1;
        }
    }
    assert!(checked >= 6);
    // The unattributed example is exactly what the gateway sends for a kiosk cuff's unbound user 2.
    let example = doc["components"]["messages"]["event"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ex| ex["name"] == "unattributed")
        .expect("an unattributed example");
    assert_eq!(example["payload"], unattributed_bp());
}

// ---------------------------------------------------------------------------------------------------------
// Symptom reports (`phg.symptoms/1`, issue 12 item 5)
// ---------------------------------------------------------------------------------------------------------

const SYMPTOMS_SCHEMA_SRC: &str = include_str!("../../docs/schemas/symptoms.schema.json");

/// The reading the asyncapi examples answer about (the `unattributed` example's, once assigned).
const ANSWERED_READING: &str = "94271e75-c46f-5b34-8576-702696c5b216";

fn symptom_report(symptoms: &[protocol::rules::Symptom]) -> Value {
    let m = protocol::wire::SymptomsMessage::new(
        GATEWAY,
        PATIENT,
        ANSWERED_READING,
        protocol::rules::Symptoms::of(symptoms),
        rx().received_utc + 50,
    )
    .unwrap();
    serde_json::to_value(m).unwrap()
}

#[test]
fn real_symptom_reports_validate() {
    use protocol::rules::Symptom;
    let s = schema_value(SYMPTOMS_SCHEMA_SRC);
    jsonschema::draft202012::meta::validate(&s).expect("valid against the 2020-12 meta-schema");
    assert_eq!(s["additionalProperties"], true);
    assert_eq!(
        s["properties"]["schema"]["const"],
        protocol::wire::SYMPTOMS_SCHEMA
    );
    // Every name the engine knows is in the schema's list, and nothing else.
    let names: Vec<&str> = s["properties"]["symptoms"]["items"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        Symptom::ALL.iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    for set in [
        &[][..],
        &[Symptom::CrisisSymptoms],
        &[Symptom::SevereHypoglycaemia],
        &[Symptom::DizzinessOrSyncope],
        &Symptom::ALL,
    ] {
        assert_valid(SYMPTOMS_SCHEMA_SRC, &symptom_report(set));
    }
}

#[test]
fn broken_symptom_reports_are_rejected() {
    use protocol::rules::Symptom;
    let good = symptom_report(&[Symptom::CrisisSymptoms]);
    for field in [
        "/schema",
        "/id",
        "/gateway",
        "/patient",
        "/reading_id",
        "/symptoms",
        "/answered",
    ] {
        assert_invalid(
            SYMPTOMS_SCHEMA_SRC,
            &without(good.clone(), field),
            &format!("without {field}"),
        );
    }
    for (pointer, value, why) in [
        ("/schema", json!("phg.symptoms/2"), "another major version"),
        (
            "/symptoms",
            json!(["crisis_symptoms", "palpitations"]),
            "an unknown symptom",
        ),
        (
            "/symptoms",
            json!(["crisis_symptoms", "crisis_symptoms"]),
            "a symptom twice",
        ),
        (
            "/reading_id",
            json!("r-1"),
            "a reading id that is not a UUID",
        ),
        (
            "/id",
            json!("0f8fad5b-d9cb-469f-a165-70867728950e"),
            "a version 4 id",
        ),
        ("/patient", json!("Jane Doe"), "a name"),
        ("/answered", json!("2024-06-15T07:53:00+02:00"), "not UTC"),
    ] {
        assert_invalid(
            SYMPTOMS_SCHEMA_SRC,
            &with(good.clone(), pointer, value),
            why,
        );
    }
}

/// The document's symptom examples validate and are exactly what the gateway sends (their ids are the
/// deterministic ones).
#[test]
fn asyncapi_symptom_examples_are_real() {
    use protocol::rules::Symptom;
    let doc = to_json(&asyncapi());
    let examples = doc["components"]["messages"]["symptoms"]["examples"]
        .as_array()
        .expect("examples");
    assert_eq!(examples.len(), 2);
    for (ex, set) in examples
        .iter()
        .zip([&[Symptom::CrisisSymptoms][..], &[][..]])
    {
        eprintln!("symptoms: {}", ex["name"]);
        assert_valid(SYMPTOMS_SCHEMA_SRC, &ex["payload"]);
        let answered = utc_seconds(&ex["payload"]["answered"]);
        let m = protocol::wire::SymptomsMessage::new(
            GATEWAY,
            PATIENT,
            ANSWERED_READING,
            protocol::rules::Symptoms::of(set),
            answered,
        )
        .unwrap();
        assert_eq!(ex["payload"], serde_json::to_value(m).unwrap());
    }
    assert!(
        doc["channels"]["symptoms"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("GLU_HYPO_L3") && d.contains("CRITICAL")),
        "the channel maps the answers to CLINICAL.md's rules"
    );
}

/// Seconds since the epoch of the examples' whole-second UTC time.
fn utc_seconds(v: &Value) -> i64 {
    let s = v.as_str().unwrap();
    let t = protocol::gatt::time::DateTime {
        year: s[0..4].parse().unwrap(),
        month: s[5..7].parse().unwrap(),
        day: s[8..10].parse().unwrap(),
        hours: s[11..13].parse().unwrap(),
        minutes: s[14..16].parse().unwrap(),
        seconds: s[17..19].parse().unwrap(),
    };
    t.to_epoch_seconds().unwrap()
}
