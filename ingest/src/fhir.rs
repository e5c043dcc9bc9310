//! FHIR R4 rendering of a stored reading, per the HL7 Personal Health Device IG 2.0.0 (FIELD.md §3):
//! `GET /readings/{id}/fhir`.
//!
//! - Blood pressure: a `PhdCompoundNumericObservation`, code MDC 150020 + LOINC 85354-9, categories `phd`
//!   and `vital-signs`, components systolic (150021 / 8480-6), diastolic (150022 / 8462-4), mean
//!   (150023, when sent) and — a simplification: the IG makes it an Observation of its own — pulse rate
//!   (149546 / 8867-4), in the unit the cuff sent (UCUM `mm[Hg]` or `kPa`).
//! - Glucose: a `PhdNumericObservation`, code by GLS sample type (capillary whole blood 160184, capillary
//!   plasma 160188, venous 160192/160196, arterial 160200/160204, otherwise undetermined plasma 160368),
//!   the value in the meter's unit with its precision; LO/HI as a `<`/`>` comparator on the meter's limit;
//!   no value → `dataAbsentReason`; the meal context as a component (MDC_CTXT_GLU_MEAL 8417864, text).
//! - Every Observation: `identifier` = the reading id, `subject` = the pseudonymous patient (a logical
//!   reference: no Patient resource is made), `device` = the PhdDevice by identifier, the
//!   `gatewayDevice` extension = the PhgDevice by identifier, `effectiveDateTime` = the corrected time
//!   when trusted (else the receive time), and — when the gateway measured the device's clock — a
//!   contained `PhdCoincidentTimeStampObservation` (code 68225: PHG time and the device's time at the
//!   same moment) referenced by the `coincidentTimeStampReference` extension. A low-quality reading gets
//!   `interpretation` "questionable".

use serde_json::{Value, json};

const MDC: &str = "urn:iso:std:iso:11073:10101";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";
const PHD_SD: &str = "http://hl7.org/fhir/uv/phd/StructureDefinition";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn quantity(value: f64, unit: &str) -> Value {
    let code = match unit {
        "mmHg" => "mm[Hg]",
        "bpm" => "/min",
        other => other,
    };
    json!({ "value": value, "unit": unit, "system": UCUM, "code": code })
}

fn component(mdc: (&str, &str), loinc: Option<(&str, &str)>, value: Value) -> Value {
    let mut codings = vec![coding(MDC, mdc.0, mdc.1)];
    if let Some((c, d)) = loinc {
        codings.push(coding(LOINC, c, d));
    }
    json!({ "code": { "coding": codings }, "valueQuantity": value })
}

fn glucose_code(sample_type: Option<u64>) -> (&'static str, &'static str) {
    match sample_type {
        Some(1) => ("160184", "MDC_CONC_GLU_CAPILLARY_WHOLEBLOOD"),
        Some(2) => ("160188", "MDC_CONC_GLU_CAPILLARY_PLASMA"),
        Some(3) => ("160192", "MDC_CONC_GLU_VENOUS_WHOLEBLOOD"),
        Some(4) => ("160196", "MDC_CONC_GLU_VENOUS_PLASMA"),
        Some(5) => ("160200", "MDC_CONC_GLU_ARTERIAL_WHOLEBLOOD"),
        Some(6) => ("160204", "MDC_CONC_GLU_ARTERIAL_PLASMA"),
        _ => ("160368", "MDC_CONC_GLU_UNDETERMINED_PLASMA"),
    }
}

/// [`observation`] of a stored reading that ingest may have rejected (`rejected`: the reason). A rejected
/// reading (an impossible value or time) is no result: its Observation has `status`
/// `entered-in-error` (FHIR R4 Observation.status: "the observation … should not have existed") and the
/// reason as a `note`, never `final`.
pub fn observation_of(r: &Value, rejected: Option<&str>) -> Option<Value> {
    let mut obs = observation(r)?;
    if let Some(reason) = rejected {
        obs["status"] = json!("entered-in-error");
        obs["note"] = json!([{ "text": format!("rejected by ingest: {reason}") }]);
    }
    Some(obs)
}

/// The reading (its stored `phg.reading/1` JSON) as a FHIR Observation; `None` when it lacks what
/// every Observation needs (id, patient, kind, receive time) or its value block.
pub fn observation(r: &Value) -> Option<Value> {
    let id = r["id"].as_str()?;
    let patient = r["patient"].as_str()?;
    let gateway = r["gateway"].as_str().unwrap_or_default();
    let device = r["device"]["id"].as_str().unwrap_or_default();
    let time = &r["time"];
    let received = time["received"].as_str()?;
    let trusted = time["trusted"].as_bool().unwrap_or(false);
    let effective = match time["corrected"].as_str() {
        Some(c) if trusted => c,
        _ => received,
    };
    let phd_category = json!({ "coding": [{
        "system": "http://hl7.org/fhir/uv/phd/CodeSystem/PhdObservationCategories", "code": "phd" }] });
    let mut obs = json!({
        "resourceType": "Observation",
        "id": id,
        "identifier": [{ "system": "urn:ietf:rfc:3986", "value": format!("urn:uuid:{id}") }],
        "status": "final",
        "subject": { "identifier": { "system": "urn:phg:patient", "value": patient } },
        "effectiveDateTime": effective,
        "device": { "identifier": { "system": "urn:phg:device", "value": device } },
        "extension": [{
            "url": format!("{PHD_SD}/Extension-gatewayDevice"),
            "valueReference": { "identifier": { "system": "urn:phg:gateway", "value": gateway } }
        }],
    });
    match r["kind"].as_str()? {
        "blood_pressure" => {
            let bp = &r["blood_pressure"];
            let unit = bp["unit"].as_str().unwrap_or("mmHg");
            let mut components = vec![
                component(
                    ("150021", "MDC_PRESS_BLD_NONINV_SYS"),
                    Some(("8480-6", "Systolic blood pressure")),
                    quantity(bp["systolic"].as_f64()?, unit),
                ),
                component(
                    ("150022", "MDC_PRESS_BLD_NONINV_DIA"),
                    Some(("8462-4", "Diastolic blood pressure")),
                    quantity(bp["diastolic"].as_f64()?, unit),
                ),
            ];
            if let Some(m) = bp["mean_arterial_pressure"].as_f64() {
                components.push(component(
                    ("150023", "MDC_PRESS_BLD_NONINV_MEAN"),
                    None,
                    quantity(m, unit),
                ));
            }
            if let Some(p) = bp["pulse_bpm"].as_f64() {
                components.push(component(
                    ("149546", "MDC_PULS_RATE_NON_INV"),
                    Some(("8867-4", "Heart rate")),
                    quantity(p, "bpm"),
                ));
            }
            obs["meta"] = json!({ "profile": [format!("{PHD_SD}/PhdCompoundNumericObservation")] });
            obs["category"] = json!([phd_category, { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs" }] }]);
            obs["code"] = json!({ "coding": [
                coding(MDC, "150020", "MDC_PRESS_BLD_NONINV"),
                coding(LOINC, "85354-9", "Blood pressure panel with all children optional"),
            ] });
            obs["component"] = Value::Array(components);
        }
        "glucose" => {
            let g = &r["glucose"];
            let (code, display) = glucose_code(g["sample_type"].as_u64());
            obs["meta"] = json!({ "profile": [format!("{PHD_SD}/PhdNumericObservation")] });
            obs["category"] = json!([phd_category]);
            obs["code"] = json!({ "coding": [coding(MDC, code, display)] });
            let unit = g["unit"].as_str().unwrap_or("mg/dL");
            match (g["value"].as_f64(), g["censored"].as_str()) {
                (Some(v), censored) => {
                    let mut q = quantity(v, unit);
                    match censored {
                        Some("low") => q["comparator"] = json!("<"),
                        Some("high") => q["comparator"] = json!(">"),
                        _ => {}
                    }
                    obs["valueQuantity"] = q;
                }
                (None, _) => {
                    obs["dataAbsentReason"] = json!({ "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                        "code": "error" }] });
                }
            }
            if let Some(meal) = r["context"]["meal"].as_str() {
                obs["component"] = json!([{
                    "code": { "coding": [coding(MDC, "8417864", "MDC_CTXT_GLU_MEAL")] },
                    "valueCodeableConcept": { "text": meal }
                }]);
            }
        }
        _ => return None,
    }
    if r["quality"] == "low_quality" {
        obs["interpretation"] = json!([{ "coding": [{
            "system": "http://hl7.org/fhir/uv/phd/CodeSystem/MeasurementStatus",
            "code": "questionable" }] }]);
    }
    if let Some(offset) = time["clock_offset_s"].as_i64() {
        let rx = crate::convert::parse_rfc3339_utc(received)?;
        let device_now = protocol::wire::rfc3339_utc(rx.checked_add(offset)?)?;
        obs["contained"] = json!([{
            "resourceType": "Observation",
            "id": "cts",
            "meta": { "profile": [format!("{PHD_SD}/PhdCoincidentTimeStampObservation")] },
            "status": "final",
            "code": { "coding": [coding(MDC, "68225", "wall clock with time-zone offset")] },
            "subject": { "identifier": { "system": "urn:phg:device", "value": device } },
            "effectiveDateTime": received,
            "valueDateTime": device_now,
            "device": { "identifier": { "system": "urn:phg:gateway", "value": gateway } }
        }]);
        if let Some(ext) = obs["extension"].as_array_mut() {
            ext.push(json!({
                "url": format!("{PHD_SD}/Extension-coincidentTimeStampReference"),
                "valueReference": { "reference": "#cts" }
            }));
        }
    }
    Some(obs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blood_pressure_is_a_compound_vital_sign_with_loinc_codes() {
        let r: Value = serde_json::from_str(&crate::testing::bp_message(
            "b1",
            "p-1",
            138,
            88,
            60,
            1_795_420_800,
        ))
        .expect("json");
        let o = observation(&r).expect("renders");
        assert_eq!(o["resourceType"], "Observation");
        assert_eq!(o["code"]["coding"][0]["code"], "150020");
        assert_eq!(o["code"]["coding"][1]["code"], "85354-9");
        assert_eq!(o["component"][0]["code"]["coding"][1]["code"], "8480-6");
        assert_eq!(o["component"][0]["valueQuantity"]["value"], 138.0);
        assert_eq!(o["component"][0]["valueQuantity"]["code"], "mm[Hg]");
        assert_eq!(o["component"][1]["code"]["coding"][0]["code"], "150022");
        assert_eq!(o["component"][2]["code"]["coding"][0]["code"], "149546");
        assert_eq!(o["category"][1]["coding"][0]["code"], "vital-signs");
        assert_eq!(o["subject"]["identifier"]["value"], "p-1");
        assert_eq!(o["effectiveDateTime"], "2026-11-23T08:00:00Z");
        // Clock offset 0 was measured: a contained coincident time stamp, referenced.
        assert_eq!(o["contained"][0]["code"]["coding"][0]["code"], "68225");
        assert_eq!(o["contained"][0]["valueDateTime"], "2026-11-23T08:00:00Z");
        assert_eq!(o["extension"][1]["valueReference"]["reference"], "#cts");
    }

    #[test]
    fn glucose_keeps_its_unit_and_censored_values_get_a_comparator() {
        let mut r: Value = serde_json::from_str(&crate::testing::glucose_message(
            "g1",
            "p-1",
            126,
            1_795_420_800,
        ))
        .expect("json");
        let o = observation(&r).expect("renders");
        assert_eq!(o["code"]["coding"][0]["code"], "160368");
        assert_eq!(o["valueQuantity"]["value"], 126.0);
        assert_eq!(o["valueQuantity"]["code"], "mg/dL");
        assert_eq!(
            o["component"][0]["valueCodeableConcept"]["text"],
            "preprandial"
        );
        r["glucose"]["censored"] = json!("low");
        r["glucose"]["sample_type"] = json!(1);
        let o = observation(&r).expect("renders");
        assert_eq!(o["valueQuantity"]["comparator"], "<");
        assert_eq!(o["code"]["coding"][0]["code"], "160184");
        r["glucose"]["value"] = Value::Null;
        let o = observation(&r).expect("renders");
        assert!(o.get("valueQuantity").is_none());
        assert_eq!(o["dataAbsentReason"]["coding"][0]["code"], "error");
        assert!(observation(&json!({ "id": "x" })).is_none());
    }
}
