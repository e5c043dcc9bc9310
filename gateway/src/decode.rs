//! `gateway decode CHAR HEX`: one characteristic value to one JSON object (the contract in GATT.md).
//!
//! A user tool as much as a test hook: a person who captured a payload with nRF Connect or btmon pastes
//! it and sees what the device said. Field names are fixed by the contract and by the test vectors;
//! optional fields are omitted when absent. Beside the contract's fields the output names enum codes
//! (`type_name`, …), marks reserved codes (`type_reserved`, …) and counts trailing octets
//! (`trailing_bytes`), because those are what a person debugging a device needs to see.

use protocol::Error as CodecError;
use protocol::gatt::Codec;
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
    if digits.len() % 2 != 0 {
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
    let v = match ch {
        "sfloat" => {
            let arr: [u8; 2] = b.try_into().map_err(|_| CodecError::DecodeTruncated {
                need: 2,
                got: b.len(),
            })?;
            let s = SFloat::from_le_bytes(arr);
            number(s.0, format!("0x{:04X}", s.to_raw()))
        }
        "float" => {
            let arr: [u8; 4] = b.try_into().map_err(|_| CodecError::DecodeTruncated {
                need: 4,
                got: b.len(),
            })?;
            let f = Float::from_le_bytes(arr);
            number(f.0, format!("0x{:08X}", f.to_raw()))
        }
        "2a08" => json!({ "date_time": DateTime::parse(b)?.to_string() }),
        "2a2b" => current_time(&CurrentTime::parse(b)?),
        _ => {
            return Err(DecodeError::UnknownCharacteristic(
                characteristic.to_string(),
            ));
        }
    };
    Ok(v)
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
