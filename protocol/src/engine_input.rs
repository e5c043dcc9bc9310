//! From the wire back to the engine's input: a [`ReadingMessage`] (JSON, `f64` values, code names) into
//! the [`Measurement`] and [`Verdict`] that [`crate::rules::Engine::on_reading`] takes.
//!
//! The engine compares exactly in the unit the patient saw (CLINICAL.md §3.4 rule 3). A wire value is the
//! shortest decimal of the device's SFLOAT (`5.6`, `126`), so it is read back as that decimal
//! ([`Dec::from_f64`]) and rebuilt as a finite IEEE 11073 number in the device's own unit: 126 mg/dL is
//! 126 × 10⁻⁵ kg/L again, 3.9 mmol/L is 39 × 10⁻⁴ mol/L. No float arithmetic touches a threshold decision.

//!
//! Ingest evaluates every reading message this way; the gateway does too when it replays the readings
//! its journal accepted after the edge-alert snapshot (a restart after a power cut).

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::String;

use crate::gatt::time::DateTime;
use crate::ieee11073::{Number, SFloat};
use crate::model::{
    BloodPressureRecord, Glucose, GlucoseContextInfo, GlucoseRecord, GlucoseUnit, Measurement,
    Pressure,
};
use crate::rules::Dec;
use crate::validate::{
    FUTURE_SKEW_S, Field, Flags, Outcome, Reception, Rejection, TimeVerdict, Verdict, validate,
};
use crate::wire::{Kind, Quality, ReadingMessage};

/// Why a reading message is rejected: stored with this reason, never evaluated (DESIGN.md promise 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvertError {
    /// The kind's value block is missing (`glucose` for a glucose reading, `blood_pressure` for BP).
    Missing(&'static str),
    /// A value is not a finite decimal that fits an IEEE 11073 number.
    BadNumber(&'static str),
    /// A time is not RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    BadTime(&'static str),
    /// protocol's validation (CLINICAL.md §3) rejects the values: the code of its [`Rejection`] and the
    /// field it is about (`out_of_range: glucose`), never the value.
    Rejected(String),
    /// A time later than the reference by more than [`FUTURE_SKEW_S`] (CLINICAL.md §3.2): `time.received`
    /// against ingest's clock, `time.corrected` against `time.received`.
    TimeInFuture(&'static str),
}

impl core::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConvertError::Missing(what) => write!(f, "missing `{what}`"),
            ConvertError::BadNumber(what) => write!(f, "`{what}` is not a representable number"),
            ConvertError::BadTime(what) => write!(f, "`{what}` is not an RFC 3339 UTC time"),
            ConvertError::Rejected(why) => write!(f, "rejected: {why}"),
            ConvertError::TimeInFuture(what) => write!(f, "rejected: time_in_future: {what}"),
        }
    }
}

impl core::error::Error for ConvertError {}

/// The typed reason for `r`: protocol's code and, where it has one, the field (no value).
fn rejection_reason(r: &Rejection) -> String {
    let field = match r {
        Rejection::NoValue { field, .. } | Rejection::OutOfRange { field, .. } => {
            Some(match field {
                Field::Glucose => "glucose",
                Field::Systolic => "systolic",
                Field::Diastolic => "diastolic",
                Field::MeanArterialPressure => "mean_arterial_pressure",
                Field::Pulse => "pulse",
            })
        }
        _ => None,
    };
    let code = crate::wire::rejection_code(r);
    match field {
        Some(f) => format!("{code}: {f}"),
        None => code.to_owned(),
    }
}

/// The engine's view of one reading message.
#[derive(Debug, Clone, Copy)]
pub struct EngineReading {
    /// The measurement, rebuilt.
    pub measurement: Measurement,
    /// The verdict the gateway gave it.
    pub verdict: Verdict,
    /// When it was measured (corrected device time when trusted, else the receive time), Unix seconds.
    pub time_utc: i64,
}

/// The validation flags by their wire names (`crate::validate::Flags::names`).
const FLAG_NAMES: [(&str, Flags); 11] = [
    ("battery_low", Flags::BATTERY_LOW),
    ("time_untrusted", Flags::TIME_UNTRUSTED),
    ("irregular_pulse", Flags::IRREGULAR_PULSE),
    ("pulse_rate_range", Flags::PULSE_RATE_RANGE),
    ("pulse_atypical", Flags::PULSE_ATYPICAL),
    ("wide_pulse_pressure", Flags::WIDE_PULSE_PRESSURE),
    ("map_inconsistent", Flags::MAP_INCONSISTENT),
    ("body_movement", Flags::BODY_MOVEMENT),
    ("cuff_loose", Flags::CUFF_LOOSE),
    ("improper_position", Flags::IMPROPER_POSITION),
    ("reserved_status_bits", Flags::RESERVED_STATUS_BITS),
];

const MEALS: [(&str, u8); 5] = [
    ("preprandial", 1),
    ("postprandial", 2),
    ("fasting", 3),
    ("casual", 4),
    ("bedtime", 5),
];
const HEALTH: [(&str, u8); 6] = [
    ("minor_health_issues", 1),
    ("major_health_issues", 2),
    ("during_menses", 3),
    ("under_stress", 4),
    ("no_health_issues", 5),
    ("not_available", 15),
];
const MEDICATIONS: [(&str, u8); 5] = [
    ("rapid_acting_insulin", 1),
    ("short_acting_insulin", 2),
    ("intermediate_acting_insulin", 3),
    ("long_acting_insulin", 4),
    ("pre_mixed_insulin", 5),
];

/// A GLS code from its wire name (`reserved:N` gives N back); `None` for an unknown name.
fn code(names: &[(&str, u8)], name: &str) -> Option<u8> {
    if let Some(n) = name.strip_prefix("reserved:") {
        return n.parse().ok();
    }
    names.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// `value` in its own unit as an IEEE 11073 number scaled by `10^-shift` (kg/L from mg/dL is shift 5).
fn number(value: f64, shift: i8, what: &'static str) -> Result<SFloat, ConvertError> {
    let d = Dec::from_f64(value).map_err(|_| ConvertError::BadNumber(what))?;
    let mantissa = i32::try_from(d.mantissa()).map_err(|_| ConvertError::BadNumber(what))?;
    let exponent = d
        .exponent()
        .checked_sub(shift)
        .ok_or(ConvertError::BadNumber(what))?;
    Ok(SFloat(Number::Finite { mantissa, exponent }))
}

pub use crate::wire::parse_rfc3339_utc;

/// The engine's input for `msg`, received by ingest at `now_utc` (Unix s), after the same plausibility
/// and time checks the gateway applies: an impossible value or time is never evaluated.
///
/// The values go through [`crate::validate::validate`] — the one place the plausibility windows live
/// (CLINICAL.md §3) — rebuilt in the device's unit as the gateway saw them. The times are checked against
/// the same [`FUTURE_SKEW_S`]: a received time ahead of ingest's clock, or a corrected time ahead of the
/// received time, is rejected (a far-future time would otherwise confirm or close open alerts).
///
/// # Errors
/// [`ConvertError`] when the message lacks its value block, carries a value that is not a number, a time
/// that is not RFC 3339 UTC, a value protocol's validation rejects, or a time in the future.
pub fn engine_reading(msg: &ReadingMessage, now_utc: i64) -> Result<EngineReading, ConvertError> {
    let b = &msg.body;
    let mut flags = Flags::default();
    for name in &b.status.flags {
        if let Some((_, f)) = FLAG_NAMES.iter().find(|(n, _)| n == name) {
            flags.0 |= f.0;
        }
    }
    let received =
        parse_rfc3339_utc(&b.time.received).ok_or(ConvertError::BadTime("time.received"))?;
    let corrected = match &b.time.corrected {
        Some(c) => Some(parse_rfc3339_utc(c).ok_or(ConvertError::BadTime("time.corrected"))?),
        None => None,
    };
    if received.saturating_sub(now_utc) > FUTURE_SKEW_S {
        return Err(ConvertError::TimeInFuture("time.received"));
    }
    if corrected.is_some_and(|c| c.saturating_sub(received) > FUTURE_SKEW_S) {
        return Err(ConvertError::TimeInFuture("time.corrected"));
    }
    let time_utc = match corrected {
        Some(c) if b.time.trusted => c,
        _ => received,
    };
    let mut outcome = match b.quality {
        Quality::Valid => Outcome::Valid,
        Quality::LowQuality => Outcome::LowQuality,
        // Refined below from `glucose.censored`.
        Quality::Censored => Outcome::Valid,
    };
    let measurement = match b.kind {
        Kind::Glucose => {
            let g = b.glucose.as_ref().ok_or(ConvertError::Missing("glucose"))?;
            if let Some(c) = g.censored {
                outcome = Outcome::Censored { censor: c };
            } else if b.quality == Quality::Censored {
                // Censored without a side: stored, kept out of threshold decisions rather than guessed.
                return Err(ConvertError::Missing("glucose.censored"));
            }
            let unit = g.unit.unwrap_or(GlucoseUnit::MgPerDl);
            let concentration = match g.value {
                Some(v) => {
                    let shift = match unit {
                        GlucoseUnit::MgPerDl => 5,
                        GlucoseUnit::MmolPerL => 3,
                    };
                    Some(Glucose {
                        raw: number(v, shift, "glucose.value")?,
                        unit,
                    })
                }
                None => None,
            };
            let context = b.context.as_ref().map(|c| GlucoseContextInfo {
                meal: c.meal.as_deref().and_then(|m| code(&MEALS, m)),
                health: c.health.as_deref().and_then(|h| code(&HEALTH, h)),
                medication: c.medication.as_ref().and_then(|m| {
                    code(&MEDICATIONS, &m.kind)
                        .map(|id| (id, m.amount, m.unit == crate::wire::MedicationUnit::Ml))
                }),
                hba1c_pct: c.hba1c_pct,
                ..GlucoseContextInfo::default()
            });
            Measurement::Glucose(GlucoseRecord {
                sequence_number: b.sequence_number.unwrap_or(0),
                numbering: crate::model::RecordNumbering::Gls,
                base_time: DateTime::default(),
                time_offset_min: None,
                concentration,
                sample_type: g.sample_type,
                sample_location: g.sample_location,
                sensor_status: b.status.sensor_status,
                context,
            })
        }
        Kind::BloodPressure => {
            let p = b
                .blood_pressure
                .as_ref()
                .ok_or(ConvertError::Missing("blood_pressure"))?;
            let pressure = |v: f64, what| -> Result<Pressure, ConvertError> {
                Ok(Pressure {
                    raw: number(v, 0, what)?,
                    unit: p.unit,
                })
            };
            Measurement::BloodPressure(BloodPressureRecord {
                systolic: pressure(p.systolic, "blood_pressure.systolic")?,
                diastolic: pressure(p.diastolic, "blood_pressure.diastolic")?,
                mean_arterial_pressure: match p.mean_arterial_pressure {
                    Some(m) => pressure(m, "blood_pressure.mean_arterial_pressure")?,
                    None => Pressure {
                        raw: SFloat::NAN,
                        unit: p.unit,
                    },
                },
                timestamp: None,
                pulse_rate: match p.pulse_bpm {
                    Some(v) => Some(number(v, 0, "blood_pressure.pulse_bpm")?),
                    None => None,
                },
                user_id: b.device.user_id,
                measurement_status: b.status.measurement_status,
            })
        }
    };
    // A censored reading's value is the meter's range limit or absent; the engine decides on its side
    // (LO/HI), not on the value, so only uncensored values are held to the plausibility windows. The device
    // time is not in `measurement` (the times were checked above), so `validate` judges the values only.
    if !matches!(outcome, Outcome::Censored { .. }) {
        let rx = Reception {
            received_utc: received,
            clock_offset_s: None,
        };
        match validate(&measurement, &rx).outcome {
            Outcome::Valid | Outcome::LowQuality => {}
            Outcome::Rejected { rejection } => {
                return Err(ConvertError::Rejected(rejection_reason(&rejection)));
            }
            Outcome::ControlSolution => {
                return Err(ConvertError::Rejected("control_solution".into()));
            }
            // LO/HI status bits with a value the message calls uncensored: not a value to alert on.
            Outcome::Censored { .. } => {
                return Err(ConvertError::Rejected("censored_status_bits".into()));
            }
        }
    }
    Ok(EngineReading {
        measurement,
        verdict: Verdict {
            outcome,
            flags,
            time: TimeVerdict {
                device_time: None,
                corrected_utc: corrected,
                doubt: b.time.doubt,
            },
        },
        time_utc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_answers() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc("2026-11-23T12:50:01Z"),
            Some(1_795_438_201)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-02-29T23:59:59.5Z"),
            Some(951_868_799)
        );
        assert_eq!(parse_rfc3339_utc("2026-11-23T12:50:01+08:00"), None);
        assert_eq!(parse_rfc3339_utc("2026-13-23T12:50:01Z"), None);
        assert_eq!(parse_rfc3339_utc("garbage"), None);
    }

    #[test]
    fn glucose_values_come_back_exact_in_the_device_unit() {
        // 3.9 mmol/L must stay 39 × 10^-4 mol/L so that "< 3.9" is decided exactly (CLINICAL.md §3.4).
        let n = number(3.9, 3, "v").expect("3.9 fits");
        assert_eq!(
            n.0,
            Number::Finite {
                mantissa: 39,
                exponent: -4
            }
        );
        let n = number(126.0, 5, "v").expect("126 fits");
        assert_eq!(
            n.0,
            Number::Finite {
                mantissa: 126,
                exponent: -5
            }
        );
        assert!(number(f64::NAN, 0, "v").is_err());
    }
}
