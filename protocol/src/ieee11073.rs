//! IEEE 11073-20601 §F.8 numbers: the 16-bit SFLOAT and the 32-bit FLOAT.
//!
//! Both are `mantissa × 10^exponent` with two's-complement fields. A handful of whole-word patterns are
//! *special values* — NaN, NRes ("not at this resolution"), +INF, −INF and one reserved pattern — and they
//! stay distinct here: a glucometer that sends NaN had no result, which is not the number 2047 (a bug public
//! decoders ship, and that QardioArm users saw as "2047 mmHg").
//!
//! A number may have several encodings (`100 × 10^0` and `10 × 10^1`); compare [`SFloat::value`]s, not bits.

use crate::Error;

/// Exact powers of ten as `f64` (10^0 ..= 10^22 are exactly representable), so that `101 × 10^-1` is
/// computed as `101 / 10` and yields the `f64` nearest to 10.1, not `101 × 0.1`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `mantissa × 10^exponent` for any `i8` exponent, as exactly as `f64` allows.
fn scale(mantissa: i32, exponent: i8) -> f64 {
    let m = f64::from(mantissa);
    let mut e = i32::from(exponent);
    let mut v = m;
    // Large exponents (FLOAT allows ±128) are applied in exact chunks of 10^22.
    while e > 22 {
        v *= POW10[22];
        e -= 22;
    }
    while e < -22 {
        v /= POW10[22];
        e += 22;
    }
    let p = POW10[e.unsigned_abs() as usize];
    if e >= 0 { v * p } else { v / p }
}

/// Round half away from zero without `std` (core has no `f64::round`).
fn round_i64(v: f64) -> Option<i64> {
    if !v.is_finite() || v.abs() > 9.0e15 {
        return None;
    }
    let t = v as i64; // truncates toward zero; in range by the check above
    let frac = v - t as f64;
    Some(if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    })
}

/// A decoded IEEE 11073 number: a finite value or one of the special values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Number {
    /// `mantissa × 10^exponent`.
    Finite {
        /// Two's-complement mantissa (12 bits in SFLOAT, 24 in FLOAT).
        mantissa: i32,
        /// Two's-complement exponent (4 bits in SFLOAT, 8 in FLOAT).
        exponent: i8,
    },
    /// Not a number: the device had no value.
    NaN,
    /// Not at this resolution: the value exists but cannot be represented.
    NRes,
    /// Positive infinity.
    PositiveInfinity,
    /// Negative infinity.
    NegativeInfinity,
    /// The reserved special pattern (0x0801 / 0x00800001).
    Reserved,
}

impl Number {
    /// The value as `f64`, or `None` for every special value.
    pub fn value(&self) -> Option<f64> {
        match *self {
            Number::Finite { mantissa, exponent } => Some(scale(mantissa, exponent)),
            _ => None,
        }
    }

    /// `true` for a finite value.
    pub fn is_finite(&self) -> bool {
        matches!(self, Number::Finite { .. })
    }

    /// The special value's name as in the `decode` contract (`"NaN"`, `"NRes"`, `"+INF"`, `"-INF"`,
    /// `"reserved"`), or `None` for a finite value.
    pub fn special_name(&self) -> Option<&'static str> {
        match self {
            Number::Finite { .. } => None,
            Number::NaN => Some("NaN"),
            Number::NRes => Some("NRes"),
            Number::PositiveInfinity => Some("+INF"),
            Number::NegativeInfinity => Some("-INF"),
            Number::Reserved => Some("reserved"),
        }
    }
}

/// The 16-bit SFLOAT: 12-bit mantissa (bits 0–11), 4-bit exponent (bits 12–15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SFloat(pub Number);

impl SFloat {
    /// The encoded size.
    pub const LEN: usize = 2;
    /// SFLOAT NaN, for a value the device does not have.
    pub const NAN: SFloat = SFloat(Number::NaN);

    /// Decodes the 16-bit word (already assembled little-endian). Total: every word has a meaning.
    pub fn from_raw(raw: u16) -> SFloat {
        SFloat(match raw {
            0x07FF => Number::NaN,
            0x0800 => Number::NRes,
            0x07FE => Number::PositiveInfinity,
            0x0802 => Number::NegativeInfinity,
            0x0801 => Number::Reserved,
            _ => {
                // Sign-extend the 12-bit mantissa and the 4-bit exponent.
                let mantissa = i32::from(((raw << 4) as i16) >> 4);
                let exponent = ((raw as i16) >> 12) as i8;
                Number::Finite { mantissa, exponent }
            }
        })
    }

    /// Decodes two little-endian octets.
    pub fn from_le_bytes(b: [u8; 2]) -> SFloat {
        SFloat::from_raw(u16::from_le_bytes(b))
    }

    /// A finite SFLOAT, if the mantissa (−2048..=2047) and exponent (−8..=7) fit and the pair does not
    /// collide with a special pattern (exponent 0 with mantissa 2046, 2047, −2048, −2047, −2046).
    ///
    /// # Errors
    /// [`Error::EncodeUnrepresentable`] when it does not fit.
    pub fn new(mantissa: i32, exponent: i8) -> Result<SFloat, Error> {
        if !(-2048..=2047).contains(&mantissa) || !(-8..=7).contains(&exponent) {
            return Err(Error::EncodeUnrepresentable);
        }
        let s = SFloat(Number::Finite { mantissa, exponent });
        // A pair whose bits spell a special value is not a finite encoding.
        if SFloat::from_raw(s.to_raw()) != s {
            return Err(Error::EncodeUnrepresentable);
        }
        Ok(s)
    }

    /// The finite SFLOAT nearest to `value` at the given exponent (the resolution a profile prescribes,
    /// e.g. −5 for glucose in kg/L per GLS.TS CN/BV).
    ///
    /// # Errors
    /// [`Error::EncodeUnrepresentable`] when the rounded mantissa does not fit.
    pub fn from_f64(value: f64, exponent: i8) -> Result<SFloat, Error> {
        let m = round_i64(scale_inverse(value, exponent)).ok_or(Error::EncodeUnrepresentable)?;
        let m = i32::try_from(m).map_err(|_| Error::EncodeUnrepresentable)?;
        SFloat::new(m, exponent)
    }

    /// The 16-bit word this number is sent as.
    pub fn to_raw(&self) -> u16 {
        match self.0 {
            Number::NaN => 0x07FF,
            Number::NRes => 0x0800,
            Number::PositiveInfinity => 0x07FE,
            Number::NegativeInfinity => 0x0802,
            Number::Reserved => 0x0801,
            // Only `new` / `from_raw` build finite values, so both fields are in range; masking keeps
            // an out-of-range value from spilling into the other field all the same.
            Number::Finite { mantissa, exponent } => {
                ((exponent as u16 & 0x000F) << 12) | (mantissa as u16 & 0x0FFF)
            }
        }
    }

    /// The two octets as transmitted.
    pub fn to_le_bytes(&self) -> [u8; 2] {
        self.to_raw().to_le_bytes()
    }

    /// The value as `f64`, or `None` for a special value.
    pub fn value(&self) -> Option<f64> {
        self.0.value()
    }
}

/// `value / 10^exponent`, exactly as [`scale`] multiplies.
fn scale_inverse(value: f64, exponent: i8) -> f64 {
    let e = i32::from(exponent);
    if e.unsigned_abs() as usize >= POW10.len() {
        return f64::NAN;
    }
    let p = POW10[e.unsigned_abs() as usize];
    if e >= 0 { value / p } else { value * p }
}

/// The 32-bit FLOAT: 24-bit mantissa (octets 0–2), signed 8-bit exponent (octet 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Float(pub Number);

impl Float {
    /// The encoded size.
    pub const LEN: usize = 4;

    /// Decodes the 32-bit word (already assembled little-endian). Total.
    pub fn from_raw(raw: u32) -> Float {
        Float(match raw {
            0x007F_FFFF => Number::NaN,
            0x0080_0000 => Number::NRes,
            0x007F_FFFE => Number::PositiveInfinity,
            0x0080_0002 => Number::NegativeInfinity,
            0x0080_0001 => Number::Reserved,
            _ => {
                let mantissa = ((raw << 8) as i32) >> 8;
                let exponent = (raw >> 24) as u8 as i8;
                Number::Finite { mantissa, exponent }
            }
        })
    }

    /// Decodes four little-endian octets.
    pub fn from_le_bytes(b: [u8; 4]) -> Float {
        Float::from_raw(u32::from_le_bytes(b))
    }

    /// A finite FLOAT, if the mantissa fits 24 bits and the pair is not a special pattern.
    ///
    /// # Errors
    /// [`Error::EncodeUnrepresentable`] when it does not fit.
    pub fn new(mantissa: i32, exponent: i8) -> Result<Float, Error> {
        if !(-0x80_0000..=0x7F_FFFF).contains(&mantissa) {
            return Err(Error::EncodeUnrepresentable);
        }
        let f = Float(Number::Finite { mantissa, exponent });
        if Float::from_raw(f.to_raw()) != f {
            return Err(Error::EncodeUnrepresentable);
        }
        Ok(f)
    }

    /// The 32-bit word this number is sent as.
    pub fn to_raw(&self) -> u32 {
        match self.0 {
            Number::NaN => 0x007F_FFFF,
            Number::NRes => 0x0080_0000,
            Number::PositiveInfinity => 0x007F_FFFE,
            Number::NegativeInfinity => 0x0080_0002,
            Number::Reserved => 0x0080_0001,
            Number::Finite { mantissa, exponent } => {
                (u32::from(exponent as u8) << 24) | (mantissa as u32 & 0x00FF_FFFF)
            }
        }
    }

    /// The four octets as transmitted.
    pub fn to_le_bytes(&self) -> [u8; 4] {
        self.to_raw().to_le_bytes()
    }

    /// The value as `f64`, or `None` for a special value.
    pub fn value(&self) -> Option<f64> {
        self.0.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IEEE 11073-20601 §F.8: 0xF065 is 101 × 10^-1 (Nordic DataTest setValue_SFLOAT_hex).
    #[test]
    fn sfloat_negative_exponent() {
        let s = SFloat::from_le_bytes([0x65, 0xF0]);
        assert_eq!(
            s.0,
            Number::Finite {
                mantissa: 101,
                exponent: -1
            }
        );
        assert_eq!(s.value(), Some(10.1));
        assert_eq!(s.to_le_bytes(), [0x65, 0xF0]);
    }

    #[test]
    fn sfloat_negative_mantissa() {
        // 0x0FFF: exponent 0, mantissa -1.
        assert_eq!(SFloat::from_raw(0x0FFF).value(), Some(-1.0));
        assert_eq!(SFloat::new(-1, 0).unwrap().to_raw(), 0x0FFF);
    }

    #[test]
    fn sfloat_specials_are_distinct_and_round_trip() {
        let specials = [0x07FF, 0x0800, 0x07FE, 0x0802, 0x0801];
        let decoded: Vec<_> = specials.iter().map(|&r| SFloat::from_raw(r).0).collect();
        for (i, a) in decoded.iter().enumerate() {
            assert!(!a.is_finite());
            for b in &decoded[i + 1..] {
                assert_ne!(a, b);
            }
        }
        for r in specials {
            assert_eq!(SFloat::from_raw(r).to_raw(), r);
        }
    }

    #[test]
    fn sfloat_new_refuses_special_collisions_and_overflow() {
        assert_eq!(SFloat::new(2047, 0), Err(Error::EncodeUnrepresentable));
        assert_eq!(SFloat::new(-2048, 0), Err(Error::EncodeUnrepresentable));
        assert_eq!(SFloat::new(2048, 1), Err(Error::EncodeUnrepresentable));
        assert_eq!(SFloat::new(1, 8), Err(Error::EncodeUnrepresentable));
        assert!(SFloat::new(2047, 1).is_ok());
    }

    /// GLS.TS CN/BV: glucose in kg/L at exponent -5 (1 mg/dL = 1e-5 kg/L).
    #[test]
    fn sfloat_from_f64_at_profile_resolution() {
        let s = SFloat::from_f64(0.00126, -5).unwrap();
        assert_eq!(
            s.0,
            Number::Finite {
                mantissa: 126,
                exponent: -5
            }
        );
        assert_eq!(s.to_le_bytes(), [0x7E, 0xB0]);
    }

    #[test]
    fn float_sign_extension() {
        let f = Float::from_le_bytes([0xFF, 0x02, 0xFD, 0x04]);
        assert_eq!(
            f.0,
            Number::Finite {
                mantissa: -195_841,
                exponent: 4
            }
        );
        assert_eq!(f.to_le_bytes(), [0xFF, 0x02, 0xFD, 0x04]);
    }

    #[test]
    fn float_large_exponent_is_finite() {
        let f = Float::new(1, 127).unwrap();
        let v = f.value().unwrap();
        assert!((v / 1e127 - 1.0).abs() < 1e-12, "{v}");
        let f = Float::new(1, -128).unwrap();
        assert!(f.value().unwrap() > 0.0);
    }

    /// Every one of the 65 536 SFLOAT words decodes and re-encodes to itself (exhaustive, not sampled).
    #[test]
    fn every_sfloat_word_round_trips() {
        for raw in 0..=u16::MAX {
            let s = SFloat::from_raw(raw);
            assert_eq!(s.to_raw(), raw, "0x{raw:04X}");
            assert_eq!(s.value().is_some(), s.0.is_finite());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any FLOAT word decodes and re-encodes to itself.
        #[test]
        fn float_words_round_trip(raw in proptest::prelude::any::<u32>()) {
            proptest::prop_assert_eq!(Float::from_raw(raw).to_raw(), raw);
        }

        /// A finite SFLOAT built from fields decodes to the same fields.
        #[test]
        fn sfloat_fields_round_trip(m in -2048i32..=2047, e in -8i8..=7) {
            if let Ok(s) = SFloat::new(m, e) {
                proptest::prop_assert_eq!(SFloat::from_raw(s.to_raw()).0, Number::Finite { mantissa: m, exponent: e });
            }
        }
    }
}
