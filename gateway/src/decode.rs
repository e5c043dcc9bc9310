//! `gateway decode CHAR HEX`: one characteristic value to one JSON object (the contract in GATT.md).
//!
//! A user tool as much as a test hook: a person who captured a payload with nRF Connect or btmon pastes
//! it and sees what the device said. Field names are fixed by the contract and by the test vectors;
//! optional fields are omitted when absent. Beside the contract's fields the output names enum codes
//! (`type_name`, …), marks reserved codes (`type_reserved`, …) and reports the octets after the defined
//! fields, of every characteristic and number alike, in one place (`trailing_bytes`, `trailing_hex`:
//! tolerated, GATT.md and GLP.TS GLF/BI-04), because those are what a person debugging a device needs
//! to see.

use protocol::Error as CodecError;
use protocol::gatt::Codec;
use protocol::gatt::battery::BatteryLevel;
use protocol::gatt::bp::{
    BloodPressureFeature, BloodPressureMeasurement, IntermediateCuffPressure, MeasurementStatus,
};
use protocol::gatt::device_info::{
    FirmwareRevision, HardwareRevision, ManufacturerName, ModelNumber, SerialNumber,
    SoftwareRevision, SystemId,
};
use protocol::gatt::glucose::{GlucoseContext, GlucoseFeature, GlucoseMeasurement};
use protocol::gatt::racp::{Operand, Operator, Racp};
use protocol::gatt::time::{CurrentTime, DateTime};
use protocol::ieee11073::{Float, Number, SFloat};
use serde_json::{Map, Value, json};

/// Why a value could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// `HEX` is not hex.
    #[error("invalid hex: {0}")]
    Hex(&'static str),
    /// `CHAR` names no characteristic this tool knows.
    #[error(
        "unknown characteristic {0:?} (try 2A18, 2A34, 2A51, 2A52, 2A35, 2A36, 2A49, 2A08, 2A2B, 2A19, 2A23-2A29, sfloat, float)"
    )]
    UnknownCharacteristic(String),
    /// The codec refused the value.
    #[error("{0}")]
    Codec(#[from] CodecError),
}

/// Parses hex as transmitted; spaces, `:` and `-` separators and a `0x` prefix are tolerated because that
/// is how btmon and nRF Connect print values.
///
/// # Errors
/// [`DecodeError::Hex`] for an odd number of digits or a non-hex character.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, DecodeError> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !matches!(b, b' ' | b':' | b'-'))
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(DecodeError::Hex("odd number of hex digits"));
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16);
            let lo = (pair[1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(DecodeError::Hex("not a hex digit")),
            }
        })
        .collect()
}

/// Decodes `hex` as the characteristic `characteristic` names.
///
/// # Errors
/// Bad hex, an unknown characteristic, or a value the codec refuses (its message says why).
pub fn decode(characteristic: &str, hex: &str) -> Result<Value, DecodeError> {
    let bytes = parse_hex(hex)?;
    let ch = characteristic.trim().to_ascii_lowercase();
    let ch = ch.strip_prefix("0x").unwrap_or(&ch);
    let b = bytes.as_slice();
    // Each arm decodes the defined fields and gives back the octets after them; they are reported below,
    // the same way for every characteristic (GATT.md: tolerated, as GLP.TS GLF/BI-04 requires).
    let (v, rest) = match ch {
        "sfloat" => {
            let (arr, rest) = leading::<2>(b)?;
            let s = SFloat::from_le_bytes(arr);
            (number(s.0, format!("0x{:04X}", s.to_raw())), rest)
        }
        "float" => {
            let (arr, rest) = leading::<4>(b)?;
            let f = Float::from_le_bytes(arr);
            (number(f.0, format!("0x{:08X}", f.to_raw())), rest)
        }
        "2a08" => with(
            parsed::<DateTime>(b)?,
            |t| json!({ "date_time": t.to_string() }),
        ),
        "2a2b" => with(parsed::<CurrentTime>(b)?, current_time),
        "2a18" => with(parsed::<GlucoseMeasurement>(b)?, glucose_measurement),
        "2a34" => with(parsed::<GlucoseContext>(b)?, glucose_context),
        "2a51" => with(parsed::<GlucoseFeature>(b)?, |f| {
            let mut m = feature(f.0, f.names(), f.reserved_bits());
            m.insert(
                "multiple_bond".into(),
                json!(f.contains(GlucoseFeature::MULTIPLE_BOND)),
            );
            Value::Object(m)
        }),
        "2a52" => with(parsed::<Racp>(b)?, racp),
        "2a35" => with(parsed::<BloodPressureMeasurement>(b)?, blood_pressure),
        "2a36" => with(parsed::<IntermediateCuffPressure>(b)?, cuff_pressure),
        "2a49" => with(parsed::<BloodPressureFeature>(b)?, |f| {
            let mut m = feature(f.0, f.names(), f.reserved());
            m.insert(
                "multiple_bonds".into(),
                json!(f.contains(BloodPressureFeature::MULTIPLE_BONDS)),
            );
            Value::Object(m)
        }),
        "2a19" => with(
            parsed::<BatteryLevel>(b)?,
            |l| json!({ "battery_level": l.percent() }),
        ),
        "2a23" => with(
            parsed::<SystemId>(b)?,
            |id| json!({ "manufacturer_id": format!("0x{:010X}", id.manufacturer_id), "oui": format!("0x{:06X}", id.oui) }),
        ),
        "2a24" => with(parsed::<ModelNumber>(b)?, |t| {
            text(t.as_str(), "model_number")
        }),
        "2a25" => with(parsed::<SerialNumber>(b)?, |t| {
            text(t.as_str(), "serial_number")
        }),
        "2a26" => with(parsed::<FirmwareRevision>(b)?, |t| {
            text(t.as_str(), "firmware_revision")
        }),
        "2a27" => with(parsed::<HardwareRevision>(b)?, |t| {
            text(t.as_str(), "hardware_revision")
        }),
        "2a28" => with(parsed::<SoftwareRevision>(b)?, |t| {
            text(t.as_str(), "software_revision")
        }),
        "2a29" => with(parsed::<ManufacturerName>(b)?, |t| {
            text(t.as_str(), "manufacturer_name")
        }),
        _ => {
            return Err(DecodeError::UnknownCharacteristic(
                characteristic.to_string(),
            ));
        }
    };
    Ok(with_trailing(v, rest))
}

/// `T` parsed from `b`, and the octets after its defined fields ([`Codec::defined_len`]).
fn parsed<'a, T: Codec<'a>>(b: &'a [u8]) -> Result<(T, &'a [u8]), CodecError> {
    let v = T::parse(b)?;
    let rest = b.get(v.defined_len()..).unwrap_or_default();
    Ok((v, rest))
}

/// The value of a parsed characteristic, shown by `show`, with its trailing octets.
fn with<T>(parsed: (T, &[u8]), show: impl FnOnce(&T) -> Value) -> (Value, &[u8]) {
    (show(&parsed.0), parsed.1)
}

/// The first `N` octets of `b` (an IEEE 11073 number), and the octets after them.
fn leading<const N: usize>(b: &[u8]) -> Result<([u8; N], &[u8]), CodecError> {
    match b.split_first_chunk::<N>() {
        Some((arr, rest)) => Ok((*arr, rest)),
        None => Err(CodecError::DecodeTruncated {
            need: N,
            got: b.len(),
        }),
    }
}

/// Reports the octets after the defined fields: how many (`trailing_bytes`) and which (`trailing_hex`).
fn with_trailing(mut v: Value, rest: &[u8]) -> Value {
    if let (Value::Object(m), false) = (&mut v, rest.is_empty()) {
        m.insert("trailing_bytes".into(), json!(rest.len()));
        m.insert("trailing_hex".into(), json!(hex_string(rest)));
    }
    v
}

/// An IEEE 11073 number: `value` (a number, or the special's name), `mantissa` and `exponent` when finite.
fn number(n: Number, raw: String) -> Value {
    let mut m = Map::new();
    match (n, n.value()) {
        (Number::Finite { mantissa, exponent }, Some(v)) => {
            m.insert("value".into(), json!(v));
            m.insert("mantissa".into(), json!(mantissa));
            m.insert("exponent".into(), json!(exponent));
        }
        _ => {
            m.insert(
                "value".into(),
                json!(n.special_name().unwrap_or("reserved")),
            );
        }
    }
    m.insert("raw".into(), json!(raw));
    Value::Object(m)
}

/// A value with its unit, as the contract nests concentrations and amounts: `{value, unit}`; a special value
/// prints as its name, never as a number.
fn quantity(s: SFloat, unit: &str) -> Value {
    match (s.0, s.value()) {
        (Number::Finite { mantissa, exponent }, Some(v)) => {
            json!({ "value": v, "unit": unit, "mantissa": mantissa, "exponent": exponent })
        }
        _ => json!({ "value": s.0.special_name().unwrap_or("reserved"), "unit": unit }),
    }
}

/// A bare SFLOAT field (pressures, pulse): a number, or the special's name.
fn sfloat(s: SFloat) -> Value {
    match s.value() {
        Some(v) => json!(v),
        None => json!(s.0.special_name().unwrap_or("reserved")),
    }
}

fn text(value: &str, key: &str) -> Value {
    json!({ key: value })
}

/// Inserts `key` (the code), `key_name` (its specification name) or `key_reserved: true`.
fn code(m: &mut Map<String, Value>, key: &str, value: u8, name: Option<&str>) {
    m.insert(key.into(), json!(value));
    match name {
        Some(n) => m.insert(format!("{key}_name"), json!(n)),
        None => m.insert(format!("{key}_reserved"), json!(true)),
    };
}

fn feature<'a>(
    raw: u16,
    names: impl Iterator<Item = &'a str>,
    reserved: u16,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("raw".into(), json!(raw));
    m.insert("bits".into(), json!(names.collect::<Vec<_>>()));
    if reserved != 0 {
        m.insert("reserved_bits".into(), json!(format!("0x{reserved:04X}")));
    }
    m
}

fn glucose_measurement(g: &GlucoseMeasurement<'_>) -> Value {
    let mut m = Map::new();
    m.insert("sequence_number".into(), json!(g.sequence_number));
    m.insert("base_time".into(), json!(g.base_time.to_string()));
    if let Some(o) = g.time_offset_min {
        m.insert("time_offset_min".into(), json!(o));
        if let Some(t) = g.user_facing_time() {
            m.insert("user_facing_time".into(), json!(t.to_string()));
        }
    }
    if let Some(c) = &g.concentration {
        m.insert("concentration".into(), quantity(c.value, c.unit.symbol()));
        code(&mut m, "type", c.sample_type.0, c.sample_type.name());
        code(
            &mut m,
            "sample_location",
            c.sample_location.0,
            c.sample_location.name(),
        );
    }
    if let Some(st) = g.sensor_status {
        m.insert("sensor_status".into(), json!(st.0));
        m.insert(
            "sensor_status_bits".into(),
            json!(st.names().collect::<Vec<_>>()),
        );
        if st.reserved_bits() != 0 {
            m.insert(
                "sensor_status_reserved_bits".into(),
                json!(format!("0x{:04X}", st.reserved_bits())),
            );
        }
    }
    m.insert("context_follows".into(), json!(g.context_follows));
    if g.reserved_flags() != 0 {
        m.insert(
            "reserved_flags".into(),
            json!(format!("0x{:02X}", g.reserved_flags())),
        );
    }
    Value::Object(m)
}

fn glucose_context(c: &GlucoseContext<'_>) -> Value {
    let mut m = Map::new();
    m.insert("sequence_number".into(), json!(c.sequence_number));
    if let Some(x) = c.extended_flags {
        m.insert("extended_flags".into(), json!(x));
    }
    if let Some(carb) = &c.carbohydrate {
        code(&mut m, "carbohydrate_id", carb.id.0, carb.id.name());
        m.insert("carbohydrate".into(), quantity(carb.value, "kg"));
    }
    if let Some(meal) = c.meal {
        code(&mut m, "meal", meal.0, meal.name());
    }
    if let Some(th) = &c.tester_health {
        code(&mut m, "tester", th.tester.0, th.tester.name());
        code(&mut m, "health", th.health.0, th.health.name());
    }
    if let Some(e) = &c.exercise {
        m.insert("exercise_duration_s".into(), json!(e.duration_s));
        m.insert("exercise_intensity_pct".into(), json!(e.intensity_pct));
    }
    if let Some(med) = &c.medication {
        code(&mut m, "medication_id", med.id.0, med.id.name());
        m.insert("medication".into(), quantity(med.value, med.unit.symbol()));
    }
    if let Some(h) = c.hba1c {
        m.insert("hba1c_pct".into(), sfloat(h));
    }
    Value::Object(m)
}

fn racp(r: &Racp<'_>) -> Value {
    let mut m = Map::new();
    let op = r.op_code();
    m.insert("op_code".into(), json!(op.0));
    if let Some(n) = op.name() {
        m.insert("op_code_name".into(), json!(n));
    }
    let operator = r.operator();
    m.insert("operator".into(), json!(operator.0));
    if let Some(n) = operator.name() {
        m.insert("operator_name".into(), json!(n));
    }
    match r {
        Racp::Request { operand, .. } => {
            if let Some(ft) = operand.filter_type() {
                m.insert("filter_type".into(), json!(ft.0));
                if let Some(n) = ft.name() {
                    m.insert("filter_type_name".into(), json!(n));
                }
            }
            // A single bound is the minimum for ">=" and the maximum for "<=" (GLS v1.0 §3.4.3.1).
            let single = if operator == Operator::LESS_THAN_OR_EQUAL {
                "max"
            } else {
                "min"
            };
            match operand {
                Operand::None => {}
                Operand::Sequence(v) => {
                    m.insert(single.into(), json!(v));
                }
                Operand::SequenceRange { min, max } => {
                    m.insert("min".into(), json!(min));
                    m.insert("max".into(), json!(max));
                }
                Operand::Time(t) => {
                    m.insert(single.into(), json!(t.to_string()));
                }
                Operand::TimeRange { min, max } => {
                    m.insert("min".into(), json!(min.to_string()));
                    m.insert("max".into(), json!(max.to_string()));
                }
                Operand::Raw(raw) => {
                    // An operand that does not fit its filter type: shown, so the user sees what was sent.
                    m.insert("operand_raw".into(), json!(hex_string(raw)));
                }
            }
            if let Err(code) = r.check_request() {
                m.insert(
                    "sensor_would_answer".into(),
                    json!(code.name().unwrap_or("reserved")),
                );
            }
        }
        Racp::NumberOfRecords { count, size } => {
            m.insert("number_of_records".into(), json!(count));
            m.insert("operand_size".into(), json!(size));
        }
        Racp::ResponseCode {
            request_op_code,
            response,
        } => {
            m.insert("request_op_code".into(), json!(request_op_code.0));
            m.insert("response_code".into(), json!(response.0));
            if let Some(n) = response.name() {
                m.insert("response_code_name".into(), json!(n));
            }
        }
    }
    Value::Object(m)
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// The fields 2A35 and 2A36 share after their pressures.
fn bp_common(
    m: &mut Map<String, Value>,
    timestamp: Option<DateTime>,
    pulse: Option<SFloat>,
    user_id: Option<u8>,
    status: Option<MeasurementStatus>,
) {
    if let Some(t) = timestamp {
        m.insert("timestamp".into(), json!(t.to_string()));
    }
    if let Some(p) = pulse {
        m.insert("pulse_rate_bpm".into(), sfloat(p));
    }
    if let Some(u) = user_id {
        m.insert("user_id".into(), json!(u));
        if u == protocol::gatt::bp::USER_ID_UNKNOWN {
            m.insert("user_id_name".into(), json!("unknown user"));
        }
    }
    if let Some(st) = status {
        m.insert("measurement_status".into(), json!(st.0));
        m.insert("status_bits".into(), json!(st.names().collect::<Vec<_>>()));
        m.insert(
            "pulse_rate_range".into(),
            json!(st.pulse_rate_range().name()),
        );
        if st.reserved() != 0 {
            m.insert(
                "measurement_status_reserved_bits".into(),
                json!(format!("0x{:04X}", st.reserved())),
            );
        }
    }
}

fn blood_pressure(b: &BloodPressureMeasurement<'_>) -> Value {
    let mut m = Map::new();
    m.insert("unit".into(), json!(b.unit.name()));
    m.insert("systolic".into(), sfloat(b.systolic));
    m.insert("diastolic".into(), sfloat(b.diastolic));
    m.insert(
        "mean_arterial_pressure".into(),
        sfloat(b.mean_arterial_pressure),
    );
    bp_common(
        &mut m,
        b.timestamp,
        b.pulse_rate,
        b.user_id,
        b.measurement_status,
    );
    if b.reserved_flags() != 0 {
        m.insert(
            "reserved_flags".into(),
            json!(format!("0x{:02X}", b.reserved_flags())),
        );
    }
    Value::Object(m)
}

fn cuff_pressure(c: &IntermediateCuffPressure<'_>) -> Value {
    let mut m = Map::new();
    m.insert("unit".into(), json!(c.unit.name()));
    m.insert("cuff_pressure".into(), sfloat(c.cuff_pressure));
    bp_common(
        &mut m,
        c.timestamp,
        c.pulse_rate,
        c.user_id,
        c.measurement_status,
    );
    Value::Object(m)
}

const DAY_NAMES: [&str; 8] = [
    "unknown",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn current_time(ct: &CurrentTime) -> Value {
    let mut m = Map::new();
    m.insert("date_time".into(), json!(ct.date_time.to_string()));
    m.insert("day_of_week".into(), json!(ct.day_of_week));
    if let Some(name) = DAY_NAMES.get(usize::from(ct.day_of_week)) {
        m.insert("day_of_week_name".into(), json!(name));
    }
    m.insert("fractions256".into(), json!(ct.fractions256));
    m.insert("adjust_reason".into(), json!(ct.adjust_reason));
    m.insert(
        "adjust_reason_bits".into(),
        json!(ct.adjust_reason_names().collect::<Vec<_>>()),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_tolerates_capture_tool_separators() {
        assert_eq!(
            parse_hex("0x1E-8A 00:58").unwrap(),
            [0x1E, 0x8A, 0x00, 0x58]
        );
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert!(parse_hex("1E8").is_err());
        assert!(parse_hex("zz").is_err());
    }

    #[test]
    fn specials_print_their_name_not_a_number() {
        assert_eq!(decode("sfloat", "FF07").unwrap()["value"], "NaN");
        assert_eq!(decode("float", "02008000").unwrap()["value"], "-INF");
        let v = decode("sfloat", "65F0").unwrap();
        assert_eq!(
            (
                v["value"].as_f64(),
                v["mantissa"].as_i64(),
                v["exponent"].as_i64()
            ),
            (Some(10.1), Some(101), Some(-1))
        );
    }
}
