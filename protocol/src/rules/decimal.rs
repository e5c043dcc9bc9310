//! Exact decimal numbers for thresholds (CLINICAL.md §3.4 rule 3).
//!
//! A threshold is the number a guideline *printed* ("< 3.9 mmol/L"), and a meter reading is an SFLOAT
//! `mantissa × 10^exponent` in the unit the patient saw. Both are decimals, so they are compared as
//! decimals: 3.9 mmol/L is not < 3.9, 70 mg/dL is not < 70, whatever binary floating point would make of
//! `39 / 10`. Only derived quantities (kPa → mmHg, averages shown to people) go through `f64`.

use core::cmp::Ordering;
use core::fmt;

/// `mantissa × 10^exponent`, compared exactly.
///
/// Equality and order are by value: `Dec::new(39, -1) == Dec::new(390, -2)`.
#[derive(Clone, Copy)]
pub struct Dec {
    mantissa: i64,
    exponent: i8,
}

/// Why a text or number is not a decimal threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecError {
    /// Not `[+-]digits[.digits]`.
    Syntax,
    /// More digits than an `i64` mantissa holds, or NaN / infinity.
    Range,
}

impl fmt::Display for DecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecError::Syntax => f.write_str("not a decimal number"),
            DecError::Range => f.write_str("decimal number out of range"),
        }
    }
}

/// Rounds half away from zero without `std` (core has no `f64::round`); saturates far out of range.
pub(crate) fn round_half_away(v: f64) -> i64 {
    if !v.is_finite() {
        return 0;
    }
    if v.abs() > 9.0e15 {
        return if v > 0.0 { i64::MAX } else { i64::MIN };
    }
    let t = v as i64; // truncates toward zero; in range by the check above
    let frac = v - t as f64;
    if frac >= 0.5 {
        t + 1
    } else if frac <= -0.5 {
        t - 1
    } else {
        t
    }
}

/// 10^n as i128 for n in 0..=38, `None` beyond.
fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

impl Dec {
    /// `mantissa × 10^exponent`.
    pub const fn new(mantissa: i64, exponent: i8) -> Dec {
        Dec { mantissa, exponent }
    }

    /// The mantissa as given.
    pub fn mantissa(&self) -> i64 {
        self.mantissa
    }

    /// The exponent as given.
    pub fn exponent(&self) -> i8 {
        self.exponent
    }

    /// Parses `[+-]digits[.digits]` exactly (`"3.9"` is 39 × 10^-1).
    ///
    /// # Errors
    /// [`DecError::Syntax`] for anything else; [`DecError::Range`] when the digits overflow an `i64`.
    pub fn parse(s: &str) -> Result<Dec, DecError> {
        let s = s.trim();
        let (neg, digits) = match s.as_bytes().first() {
            Some(b'-') => (true, s.get(1..).unwrap_or("")),
            Some(b'+') => (false, s.get(1..).unwrap_or("")),
            _ => (false, s),
        };
        let (int, frac) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(DecError::Syntax);
        }
        let mut m: i64 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            if !b.is_ascii_digit() {
                return Err(DecError::Syntax);
            }
            m = m
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or(DecError::Range)?;
        }
        let exponent = i8::try_from(frac.len())
            .ok()
            .and_then(|n| n.checked_neg())
            .ok_or(DecError::Range)?;
        Ok(Dec {
            mantissa: if neg { -m } else { m },
            exponent,
        })
    }

    /// The shortest decimal that reads back as `v` (what a TOML file's `3.9` was written as): `f64`'s
    /// `Display` prints the shortest round-trip digits and never an exponent.
    ///
    /// # Errors
    /// [`DecError::Range`] for NaN, infinities and values whose digits overflow an `i64`.
    pub fn from_f64(v: f64) -> Result<Dec, DecError> {
        if !v.is_finite() {
            return Err(DecError::Range);
        }
        let mut buf = Buf::default();
        fmt::write(&mut buf, format_args!("{v}")).map_err(|_| DecError::Range)?;
        Dec::parse(buf.as_str())
    }

    /// The nearest `f64` (for display and derived arithmetic only, never for threshold decisions).
    pub fn to_f64(&self) -> f64 {
        // A mantissa below 2^53 is exact, and one division by an exact power of ten rounds once.
        let m = self.mantissa as f64;
        let e = i32::from(self.exponent);
        let p = pow10(e.unsigned_abs()).map_or(f64::INFINITY, |p| p as f64);
        if e >= 0 { m * p } else { m / p }
    }

    /// The same value with at least `places` decimals (`3` → `3.0` for places = 1), for display at a
    /// unit's resolution (§3.4: mmol/L one decimal). Unchanged if rescaling would overflow.
    pub fn with_places(self, places: u8) -> Dec {
        let want = -i32::from(places);
        let shift = i32::from(self.exponent) - want;
        if shift <= 0 {
            return self;
        }
        let scaled = 10i64
            .checked_pow(shift.unsigned_abs())
            .and_then(|p| self.mantissa.checked_mul(p));
        match (scaled, i8::try_from(want)) {
            (Some(m), Ok(e)) => Dec::new(m, e),
            _ => self,
        }
    }

    /// `true` for a value below zero.
    pub fn is_negative(&self) -> bool {
        self.mantissa < 0
    }

    /// The value as an `i128` count of `10^exp` units, when that is exact (`3.9` at −3 is 3900).
    pub fn scaled_to(&self, exp: i32) -> Option<i128> {
        let shift = i32::from(self.exponent) - exp;
        if shift < 0 {
            let p = pow10(shift.unsigned_abs())?;
            let m = i128::from(self.mantissa);
            (m % p == 0).then_some(m / p)
        } else {
            i128::from(self.mantissa).checked_mul(pow10(shift.unsigned_abs())?)
        }
    }
}

/// A small stack buffer for [`Dec::from_f64`] (no allocation, works without `std`).
struct Buf {
    bytes: [u8; 400],
    len: usize,
}

impl Default for Buf {
    fn default() -> Self {
        Buf {
            bytes: [0; 400],
            len: 0,
        }
    }
}

impl Buf {
    fn as_str(&self) -> &str {
        self.bytes
            .get(..self.len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

impl fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl Ord for Dec {
    fn cmp(&self, other: &Self) -> Ordering {
        // Bring both to the smaller exponent. If the scale overflows i128 (|shift| ≥ 38 with a non-zero
        // mantissa), the scaled side is larger in magnitude than any i64, so its sign decides.
        let (a, b) = (self, other);
        let shift = i32::from(a.exponent) - i32::from(b.exponent);
        let scale = |m: i64, s: u32| pow10(s).and_then(|p| i128::from(m).checked_mul(p));
        if shift >= 0 {
            match scale(a.mantissa, shift.unsigned_abs()) {
                Some(x) => x.cmp(&i128::from(b.mantissa)),
                None => a.mantissa.signum().cmp(&0),
            }
        } else {
            match scale(b.mantissa, shift.unsigned_abs()) {
                Some(y) => i128::from(a.mantissa).cmp(&y),
                None => 0.cmp(&b.mantissa.signum()),
            }
        }
    }
}

impl PartialOrd for Dec {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Dec {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Dec {}

impl fmt::Debug for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dec({self})")
    }
}

impl fmt::Display for Dec {
    /// Exact: `39e-1` prints `3.9`, `70e0` prints `70`, `18e1` prints `180`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mantissa < 0 {
            f.write_str("-")?;
        }
        let m = self.mantissa.unsigned_abs();
        if self.exponent >= 0 {
            write!(f, "{m}")?;
            for _ in 0..self.exponent {
                f.write_str("0")?;
            }
            return Ok(());
        }
        let places = u32::from(self.exponent.unsigned_abs());
        match 10u64.checked_pow(places) {
            Some(p) => write!(f, "{}.{:0width$}", m / p, m % p, width = places as usize),
            // More places than u64 digits: the integer part is 0.
            None => write!(f, "0.{:0width$}", m, width = places as usize),
        }
    }
}

#[cfg(feature = "serde")]
mod serde_impl {
    use super::Dec;
    use core::fmt;
    use serde::de::{self, Visitor};

    impl serde::Serialize for Dec {
        /// An integer when the value is one, else the nearest `f64` (whose shortest digits are this
        /// decimal's, so it reads back exactly).
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self.scaled_to(0).and_then(|v| i64::try_from(v).ok()) {
                Some(i) => s.serialize_i64(i),
                None => s.serialize_f64(self.to_f64()),
            }
        }
    }

    struct DecVisitor;

    impl Visitor<'_> for DecVisitor {
        type Value = Dec;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal number (70, 3.9 or \"3.9\")")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dec, E> {
            Ok(Dec::new(v, 0))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dec, E> {
            i64::try_from(v)
                .map(|v| Dec::new(v, 0))
                .map_err(|_| E::custom("decimal number out of range"))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dec, E> {
            Dec::from_f64(v).map_err(E::custom)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Dec, E> {
            Dec::parse(v).map_err(E::custom)
        }
    }

    impl<'de> serde::Deserialize<'de> for Dec {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dec, D::Error> {
            d.deserialize_any(DecVisitor)
        }
    }
}

/// A comparison as a guideline prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Op {
    /// `<` — e.g. ADA Level 1 hypoglycaemia "< 70 mg/dL".
    #[cfg_attr(feature = "serde", serde(rename = "<"))]
    Lt,
    /// `<=` — e.g. the Chinese public-health spec "≤ 3.9 mmol/L".
    #[cfg_attr(feature = "serde", serde(rename = "<="))]
    Le,
    /// `>` — e.g. CGM TAR level 2 "> 250 mg/dL".
    #[cfg_attr(feature = "serde", serde(rename = ">"))]
    Gt,
    /// `>=` — e.g. ESH grade 3 "≥ 180 mmHg".
    #[cfg_attr(feature = "serde", serde(rename = ">="))]
    Ge,
}

impl Op {
    /// Whether `observed op threshold` holds, given `observed.cmp(threshold)`.
    pub fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }

    /// Whether moving the threshold from `from` to `to` makes the rule fire for fewer values (a
    /// "relaxation" in CLINICAL.md §4.6's sense): lower for `<`/`<=`, higher for `>`/`>=`.
    pub fn relaxes(self, from: Dec, to: Dec) -> bool {
        match self {
            Op::Lt | Op::Le => to < from,
            Op::Gt | Op::Ge => to > from,
        }
    }

    /// The symbol (`"<"`, `"<="`, `">"`, `">="`).
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn parses_and_compares_exactly() {
        let t = Dec::parse("3.9").unwrap();
        assert_eq!(t, Dec::new(39, -1));
        assert_eq!(t, Dec::new(3900, -3));
        assert!(Dec::new(38, -1) < t);
        assert!(Dec::new(391, -2) > t);
        assert_eq!(Dec::parse("-0.5").unwrap(), Dec::new(-5, -1));
        assert_eq!(Dec::parse("70").unwrap(), Dec::new(7, 1));
        assert!(Dec::parse("7e1").is_err());
        assert!(Dec::parse("").is_err());
        assert!(Dec::parse(".").is_err());
        assert!(Dec::parse("99999999999999999999").is_err());
    }

    /// TOML floats arrive as f64; the shortest digits give back what was written.
    #[test]
    fn from_f64_recovers_the_written_decimal() {
        for (f, d) in [
            (3.9, Dec::new(39, -1)),
            (13.9, Dec::new(139, -1)),
            (16.7, Dec::new(167, -1)),
            (33.3, Dec::new(333, -1)),
            (0.1, Dec::new(1, -1)),
            (70.0, Dec::new(70, 0)),
        ] {
            assert_eq!(Dec::from_f64(f).unwrap(), d);
            assert_eq!(Dec::from_f64(f).unwrap().to_f64(), f);
        }
        assert!(Dec::from_f64(f64::NAN).is_err());
        assert!(Dec::from_f64(1e300).is_err());
    }

    #[test]
    fn order_survives_extreme_exponents() {
        assert!(Dec::new(1, 100) > Dec::new(i64::MAX, 0));
        assert!(Dec::new(-1, 100) < Dec::new(i64::MIN, 0));
        assert!(Dec::new(i64::MAX, -100) < Dec::new(1, 0));
        assert_eq!(Dec::new(0, 100), Dec::new(0, -100));
    }

    #[test]
    fn displays_exactly() {
        assert_eq!(Dec::new(3, 0).with_places(1).to_string(), "3.0");
        assert_eq!(Dec::new(3, 0).with_places(1), Dec::new(3, 0));
        assert_eq!(Dec::new(39, -1).with_places(1).to_string(), "3.9");
        assert_eq!(Dec::new(5, -2).with_places(1).to_string(), "0.05");
        assert_eq!(Dec::new(39, -1).to_string(), "3.9");
        assert_eq!(Dec::new(-5, -2).to_string(), "-0.05");
        assert_eq!(Dec::new(18, 1).to_string(), "180");
        assert_eq!(Dec::new(600, 0).to_string(), "600");
    }

    #[test]
    fn op_semantics() {
        use Ordering::*;
        assert!(!Op::Lt.holds(Equal) && Op::Le.holds(Equal));
        assert!(!Op::Gt.holds(Equal) && Op::Ge.holds(Equal));
        assert!(Op::Lt.relaxes(Dec::new(54, 0), Dec::new(45, 0)));
        assert!(!Op::Lt.relaxes(Dec::new(54, 0), Dec::new(60, 0)));
        assert!(Op::Ge.relaxes(Dec::new(180, 0), Dec::new(190, 0)));
    }
}
