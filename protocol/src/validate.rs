//! Validation: CLINICAL.md §3, as a pure function of a measurement and the time it was received.
//!
//! The verdict says *why*, with a typed reason — never just "invalid" — and keeps every annotation that
//! does not change the outcome as a [`Flags`] bit. Order matters and follows CLINICAL.md §3.1: a control
//! solution result is excluded whatever its value; a device-error bit rejects before the value is looked
//! at; LO/HI makes a censored value rather than an implausible one.
//!
//! All limits are compared in the device-native unit against the number published for that unit
//! (CLINICAL.md §3.4 rule 3), so a boundary never moves by a conversion.

use core::fmt;

use crate::gatt::time::DateTime;
use crate::model::{BloodPressureRecord, GlucoseRecord, GlucoseUnit, Measurement};

/// Glucose plausibility window, mg/dL (CLINICAL.md §3.1: meters measure 10–600 … 630 mg/dL).
pub const GLUCOSE_MG_DL: (f64, f64) = (10.0, 630.0);
/// Glucose plausibility window, mmol/L (CLINICAL.md §3.1: 0.6–35.0 mmol/L, HK Consumer Council 2017).
pub const GLUCOSE_MMOL_L: (f64, f64) = (0.6, 35.0);
/// Systolic hard accept window, mmHg (CLINICAL.md §3.2).
pub const SYSTOLIC_MMHG: (f64, f64) = (50.0, 300.0);
/// Diastolic hard accept window, mmHg (CLINICAL.md §3.2).
pub const DIASTOLIC_MMHG: (f64, f64) = (20.0, 200.0);
/// Pulse physiological accept window, bpm (CLINICAL.md §3.2).
pub const PULSE_BPM: (f64, f64) = (25.0, 250.0);
/// Pulse "typical device range", bpm: outside it the reading is flagged, not rejected.
pub const PULSE_TYPICAL_BPM: (f64, f64) = (40.0, 180.0);
/// Pulse pressure below this is a measurement artefact (reject); above [`PULSE_PRESSURE_WIDE_MMHG`] flag.
pub const PULSE_PRESSURE_MIN_MMHG: f64 = 10.0;
/// Pulse pressure above this is flagged for review.
pub const PULSE_PRESSURE_WIDE_MMHG: f64 = 120.0;
/// Soft MAP consistency: |MAP − (DBP + PP/3)| above this is flagged only (oscillometric cuffs measure MAP).
pub const MAP_SOFT_MMHG: f64 = 20.0;
/// A corrected time later than receive time by more than this is "in the future" (CLINICAL.md §3.2).
pub const FUTURE_SKEW_S: i64 = 300;

/// GLS sensor-status bits that mean the device failed to measure (CLINICAL.md §3.1 "device-error bits"):
/// malfunction, sample size, strip insertion, strip type, temperature high/low, read interrupted, fault.
pub const GLUCOSE_DEVICE_ERROR_BITS: u16 =
    0x0002 | 0x0004 | 0x0008 | 0x0010 | 0x0080 | 0x0100 | 0x0200 | 0x0400;
/// GLS sensor status bit 5: result higher than the device can process (HI).
pub const GLUCOSE_HIGH_BIT: u16 = 0x0020;
/// GLS sensor status bit 6: result lower than the device can process (LO).
pub const GLUCOSE_LOW_BIT: u16 = 0x0040;
/// GLS sensor status bit 0: battery low.
pub const GLUCOSE_BATTERY_LOW_BIT: u16 = 0x0001;
/// GLS sensor status bit 11: time fault.
pub const GLUCOSE_TIME_FAULT_BIT: u16 = 0x0800;
/// GLS sample type 10: control solution.
pub const SAMPLE_TYPE_CONTROL: u8 = 10;
/// GLS sample location 4: control solution.
pub const SAMPLE_LOCATION_CONTROL: u8 = 4;
/// BLS Measurement Status bits that make a reading low quality: body movement (b0), cuff too loose (b1),
/// improper measurement position (b5) (CLINICAL.md §3.2).
pub const BP_LOW_QUALITY_BITS: u16 = 0x0001 | 0x0002 | 0x0020;

/// Which value a reason is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Field {
    /// Glucose concentration.
    Glucose,
    /// Systolic pressure.
    Systolic,
    /// Diastolic pressure.
    Diastolic,
    /// Mean arterial pressure.
    MeanArterialPressure,
    /// Pulse rate.
    Pulse,
}

/// Why a reading was rejected. A rejected reading is kept and reported, never forwarded as a value.
///
/// Serialize-only: the reason names point at static text, and the wire carries them as strings.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "reason", rename_all = "snake_case"))]
pub enum Rejection {
    /// The record carries no concentration (GLS flag b1 clear).
    NoConcentration,
    /// A value is an IEEE 11073 special (NaN, NRes, ±INF, reserved): the device had no result.
    NoValue {
        /// Which value.
        field: Field,
        /// The special's name (`"NaN"`, …).
        special: &'static str,
    },
    /// The glucometer reported a measurement failure (sensor-status bits).
    DeviceError {
        /// The device-error bits that were set.
        bits: u16,
    },
    /// A value outside its plausibility window (native unit).
    OutOfRange {
        /// Which value.
        field: Field,
        /// The value, in the unit of the window.
        value: f64,
        /// Window low end.
        min: f64,
        /// Window high end.
        max: f64,
    },
    /// Systolic ≤ diastolic.
    SystolicNotAboveDiastolic,
    /// Pulse pressure (SBP − DBP) below [`PULSE_PRESSURE_MIN_MMHG`].
    PulsePressureTooNarrow {
        /// SBP − DBP, mmHg.
        mmhg: f64,
    },
    /// MAP outside [DBP, SBP].
    MeanArterialPressureOutsideRange,
    /// The corrected time is later than the receive time by more than [`FUTURE_SKEW_S`].
    TimeInFuture {
        /// How far ahead, seconds.
        seconds: i64,
    },
    /// The result is not a blood glucose value: its context carries the meal code i-SENS (CareSens)
    /// meters use to mark a **ketone** test ([`MEAL_KETONE_MARKER`], reserved in GLS). Taken as glucose,
    /// a ketone of 0.6 mmol/L would read as a severe hypoglycaemia.
    NotGlucose,
}

/// GLS context meal code 6 (reserved for future use): i-SENS CareSens meters send it with ketone results
/// (GATT.md "Device quirks", xDrip `caresens/ContextRx.java` keeps only meal codes 0–3). No meter is known
/// to send it for a glucose value, so every meter's reading with it is kept out of the glucose record.
pub const MEAL_KETONE_MARKER: u8 = 6;

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NoConcentration => f.write_str("record carries no concentration"),
            Rejection::NoValue { field, special } => {
                write!(f, "{field:?} is {special} (no result)")
            }
            Rejection::DeviceError { bits } => write!(
                f,
                "device reported a measurement error (status 0x{bits:04X})"
            ),
            Rejection::OutOfRange {
                field,
                value,
                min,
                max,
            } => {
                write!(f, "{field:?} {value} outside plausible range {min}..={max}")
            }
            Rejection::SystolicNotAboveDiastolic => f.write_str("systolic not above diastolic"),
            Rejection::PulsePressureTooNarrow { mmhg } => {
                write!(f, "pulse pressure {mmhg} mmHg too narrow")
            }
            Rejection::MeanArterialPressureOutsideRange => {
                f.write_str("mean arterial pressure outside diastolic..systolic")
            }
            Rejection::TimeInFuture { seconds } => {
                write!(f, "time stamp {seconds} s in the future")
            }
            Rejection::NotGlucose => f.write_str(
                "not a glucose result: the context marks a ketone test (meal code 6, i-SENS)",
            ),
        }
    }
}

/// A value the device could not measure exactly: below or above its measuring range (GLS status b6 / b5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Censor {
    /// "LO": lower than the device can measure.
    Low,
    /// "HI": higher than the device can measure.
    High,
}

/// What happens to a reading.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "outcome", rename_all = "snake_case"))]
pub enum Outcome {
    /// A good reading.
    Valid,
    /// A usable reading the device itself doubts (BP body movement, loose cuff, position): kept, excluded
    /// from averages, a re-measurement prompted, never a crisis alert without a clean repeat.
    LowQuality,
    /// A censored glucose value (LO / HI): kept and alerted on as such.
    Censored {
        /// Which side.
        censor: Censor,
    },
    /// A control-solution test: excluded from the patient record entirely (CLINICAL.md §3.1).
    ControlSolution,
    /// Not a reading of the patient (see the reason); kept for device QA and reported.
    Rejected {
        /// Why.
        #[cfg_attr(feature = "serde", serde(flatten))]
        rejection: Rejection,
    },
}

impl Outcome {
    /// `true` for a reading that belongs in the patient's record (valid, low quality or censored).
    pub fn is_patient_reading(&self) -> bool {
        matches!(
            self,
            Outcome::Valid | Outcome::LowQuality | Outcome::Censored { .. }
        )
    }
}

/// Annotations that do not change the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Flags(pub u32);

impl Flags {
    /// GLS battery low: a device-maintenance task.
    pub const BATTERY_LOW: Flags = Flags(1 << 0);
    /// The device's time cannot be trusted (see [`TimeVerdict`]).
    pub const TIME_UNTRUSTED: Flags = Flags(1 << 1);
    /// BLS irregular pulse.
    pub const IRREGULAR_PULSE: Flags = Flags(1 << 2);
    /// BLS pulse rate outside the cuff's range (status b3–4).
    pub const PULSE_RATE_RANGE: Flags = Flags(1 << 3);
    /// Pulse outside 40–180 bpm.
    pub const PULSE_ATYPICAL: Flags = Flags(1 << 4);
    /// Pulse pressure above 120 mmHg.
    pub const WIDE_PULSE_PRESSURE: Flags = Flags(1 << 5);
    /// MAP far from DBP + PP/3.
    pub const MAP_INCONSISTENT: Flags = Flags(1 << 6);
    /// BLS body movement.
    pub const BODY_MOVEMENT: Flags = Flags(1 << 7);
    /// BLS cuff too loose.
    pub const CUFF_LOOSE: Flags = Flags(1 << 8);
    /// BLS improper measurement position.
    pub const IMPROPER_POSITION: Flags = Flags(1 << 9);
    /// Reserved GLS/BLS status bits were set.
    pub const RESERVED_STATUS_BITS: Flags = Flags(1 << 10);

    const NAMES: [&'static str; 11] = [
        "battery_low",
        "time_untrusted",
        "irregular_pulse",
        "pulse_rate_range",
        "pulse_atypical",
        "wide_pulse_pressure",
        "map_inconsistent",
        "body_movement",
        "cuff_loose",
        "improper_position",
        "reserved_status_bits",
    ];

    /// `true` when every bit of `other` is set.
    pub fn contains(&self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    fn insert(&mut self, other: Flags) {
        self.0 |= other.0;
    }

    /// The names of the set flags.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        Self::NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
    }
}

/// Why a reading's device time cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum TimeDoubt {
    /// The device sent no time, or an incomplete date (year/month/day 0).
    NoDeviceTime,
    /// The device's clock was not read at this connection, so its offset is unknown.
    ClockNotRead,
    /// The glucometer set its time-fault bit (GLS status b11).
    DeviceTimeFault,
}

/// The time a reading carries (DESIGN.md promise 5): device time kept, corrected time derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeVerdict {
    /// The device's own time (GLS user-facing time, BLS time stamp), as the device keeps it.
    pub device_time: Option<DateTime>,
    /// Corrected time, seconds since the Unix epoch, UTC: device time − measured clock offset.
    pub corrected_utc: Option<i64>,
    /// Why the time cannot be trusted, if it cannot.
    pub doubt: Option<TimeDoubt>,
}

/// When and how a reading was received: the gateway's clock and the device clock offset measured at this
/// connection (the PHD IG's coincident time stamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reception {
    /// Receive time, seconds since the Unix epoch, UTC.
    pub received_utc: i64,
    /// Device clock minus gateway clock, seconds, with the device's clock read as if UTC (so a device
    /// kept in local time has its zone in the offset, and corrected time comes out in UTC).
    pub clock_offset_s: Option<i64>,
}

/// The verdict on one measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// What happens to the reading.
    pub outcome: Outcome,
    /// Annotations.
    pub flags: Flags,
    /// Its time.
    pub time: TimeVerdict,
}

/// Validates one measurement received at `rx`.
pub fn validate(m: &Measurement, rx: &Reception) -> Verdict {
    let mut flags = Flags::default();
    let (device_time, time_fault) = match m {
        Measurement::Glucose(g) => (
            g.device_time(),
            g.sensor_status
                .is_some_and(|s| s & GLUCOSE_TIME_FAULT_BIT != 0),
        ),
        Measurement::BloodPressure(b) => (b.timestamp.filter(DateTime::is_complete), false),
    };
    let time = time_verdict(device_time, time_fault, rx);
    if time.doubt.is_some() {
        flags.insert(Flags::TIME_UNTRUSTED);
    }
    let mut outcome = match m {
        Measurement::Glucose(g) => glucose(g, &mut flags),
        Measurement::BloodPressure(b) => blood_pressure(b, &mut flags),
    };
    if let (Some(t), true) = (time.corrected_utc, outcome.is_patient_reading()) {
        let ahead = t - rx.received_utc;
        if ahead > FUTURE_SKEW_S {
            outcome = Outcome::Rejected {
                rejection: Rejection::TimeInFuture { seconds: ahead },
            };
        }
    }
    Verdict {
        outcome,
        flags,
        time,
    }
}

fn time_verdict(device_time: Option<DateTime>, time_fault: bool, rx: &Reception) -> TimeVerdict {
    let epoch = device_time.and_then(|t| t.to_epoch_seconds());
    let corrected_utc = match (epoch, rx.clock_offset_s) {
        (Some(t), Some(off)) => Some(t - off),
        _ => None,
    };
    let doubt = if epoch.is_none() {
        Some(TimeDoubt::NoDeviceTime)
    } else if time_fault {
        Some(TimeDoubt::DeviceTimeFault)
    } else if rx.clock_offset_s.is_none() {
        Some(TimeDoubt::ClockNotRead)
    } else {
        None
    };
    TimeVerdict {
        device_time,
        corrected_utc,
        doubt,
    }
}

fn reject(rejection: Rejection) -> Outcome {
    Outcome::Rejected { rejection }
}

fn glucose(g: &GlucoseRecord, flags: &mut Flags) -> Outcome {
    let status = g.sensor_status.unwrap_or(0);
    if status & GLUCOSE_BATTERY_LOW_BIT != 0 {
        flags.insert(Flags::BATTERY_LOW);
    }
    if status & 0xF000 != 0 {
        flags.insert(Flags::RESERVED_STATUS_BITS);
    }
    if g.sample_type == Some(SAMPLE_TYPE_CONTROL)
        || g.sample_location == Some(SAMPLE_LOCATION_CONTROL)
    {
        return Outcome::ControlSolution;
    }
    if g.context.as_ref().and_then(|c| c.meal) == Some(MEAL_KETONE_MARKER) {
        return reject(Rejection::NotGlucose);
    }
    let errors = status & GLUCOSE_DEVICE_ERROR_BITS;
    if errors != 0 {
        return reject(Rejection::DeviceError { bits: errors });
    }
    // LO / HI first: a meter may send NaN or its range limit with them, and the patient saw "LO" / "HI".
    if status & GLUCOSE_LOW_BIT != 0 {
        return Outcome::Censored {
            censor: Censor::Low,
        };
    }
    if status & GLUCOSE_HIGH_BIT != 0 {
        return Outcome::Censored {
            censor: Censor::High,
        };
    }
    let Some(c) = g.concentration else {
        return reject(Rejection::NoConcentration);
    };
    let Some(v) = c.native() else {
        return reject(Rejection::NoValue {
            field: Field::Glucose,
            special: c.raw.0.special_name().unwrap_or("?"),
        });
    };
    let (min, max) = match c.unit {
        GlucoseUnit::MgPerDl => GLUCOSE_MG_DL,
        GlucoseUnit::MmolPerL => GLUCOSE_MMOL_L,
    };
    if !(min..=max).contains(&v) {
        return reject(Rejection::OutOfRange {
            field: Field::Glucose,
            value: v,
            min,
            max,
        });
    }
    Outcome::Valid
}

fn blood_pressure(b: &BloodPressureRecord, flags: &mut Flags) -> Outcome {
    let status = b.measurement_status.unwrap_or(0);
    for (bit, flag) in [
        (0x0001, Flags::BODY_MOVEMENT),
        (0x0002, Flags::CUFF_LOOSE),
        (0x0004, Flags::IRREGULAR_PULSE),
        (0x0020, Flags::IMPROPER_POSITION),
    ] {
        if status & bit != 0 {
            flags.insert(flag);
        }
    }
    if (status >> 3) & 0b11 != 0 {
        flags.insert(Flags::PULSE_RATE_RANGE);
    }
    if status & 0xFFC0 != 0 {
        flags.insert(Flags::RESERVED_STATUS_BITS);
    }
    let (Some(sys), Some(dia)) = (b.systolic.mmhg(), b.diastolic.mmhg()) else {
        let (field, n) = if !b.systolic.raw.0.is_finite() {
            (Field::Systolic, b.systolic.raw.0)
        } else {
            (Field::Diastolic, b.diastolic.raw.0)
        };
        return reject(Rejection::NoValue {
            field,
            special: n.special_name().unwrap_or("?"),
        });
    };
    for (field, v, (min, max)) in [
        (Field::Systolic, sys, SYSTOLIC_MMHG),
        (Field::Diastolic, dia, DIASTOLIC_MMHG),
    ] {
        if !(min..=max).contains(&v) {
            return reject(Rejection::OutOfRange {
                field,
                value: v,
                min,
                max,
            });
        }
    }
    if sys <= dia {
        return reject(Rejection::SystolicNotAboveDiastolic);
    }
    let pp = sys - dia;
    if pp < PULSE_PRESSURE_MIN_MMHG {
        return reject(Rejection::PulsePressureTooNarrow { mmhg: pp });
    }
    if pp > PULSE_PRESSURE_WIDE_MMHG {
        flags.insert(Flags::WIDE_PULSE_PRESSURE);
    }
    // MAP: a special value, or 0 (Beurer cuffs send MAP 0, derdilla PR #735), means "not provided".
    if let Some(map) = b.mean_arterial_pressure.mmhg().filter(|m| *m != 0.0) {
        if !(dia..=sys).contains(&map) {
            return reject(Rejection::MeanArterialPressureOutsideRange);
        }
        if (map - (dia + pp / 3.0)).abs() > MAP_SOFT_MMHG {
            flags.insert(Flags::MAP_INCONSISTENT);
        }
    }
    if let Some(p) = b.pulse_rate {
        match p.value() {
            None => {} // a cuff without a pulse result still measured pressure
            Some(bpm) if !(PULSE_BPM.0..=PULSE_BPM.1).contains(&bpm) => {
                return reject(Rejection::OutOfRange {
                    field: Field::Pulse,
                    value: bpm,
                    min: PULSE_BPM.0,
                    max: PULSE_BPM.1,
                });
            }
            Some(bpm) if !(PULSE_TYPICAL_BPM.0..=PULSE_TYPICAL_BPM.1).contains(&bpm) => {
                flags.insert(Flags::PULSE_ATYPICAL);
            }
            Some(_) => {}
        }
    }
    if status & BP_LOW_QUALITY_BITS != 0 {
        Outcome::LowQuality
    } else {
        Outcome::Valid
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ieee11073::SFloat;
    use crate::model::{Glucose, GlucoseContextInfo, Pressure, PressureUnit};

    const RX: Reception = Reception {
        received_utc: 1_718_471_847 + 600,
        clock_offset_s: Some(0),
    };

    fn time() -> DateTime {
        // 2024-06-15T17:17:27, ten minutes before RX.
        DateTime {
            year: 2024,
            month: 6,
            day: 15,
            hours: 17,
            minutes: 17,
            seconds: 27,
        }
    }

    fn glu(m: i32, e: i8, mol: bool, status: Option<u16>) -> Measurement {
        Measurement::Glucose(GlucoseRecord {
            sequence_number: 1,
            numbering: crate::model::RecordNumbering::Gls,
            base_time: time(),
            time_offset_min: None,
            concentration: Some(Glucose::from_wire(SFloat::new(m, e).unwrap(), mol)),
            sample_type: Some(1),
            sample_location: Some(1),
            sensor_status: status,
            context: None,
        })
    }

    fn bp(sys: i32, dia: i32, map: i32, pulse: Option<i32>, status: Option<u16>) -> Measurement {
        let p = |v| Pressure {
            raw: SFloat::new(v, 0).unwrap(),
            unit: PressureUnit::MmHg,
        };
        Measurement::BloodPressure(BloodPressureRecord {
            systolic: p(sys),
            diastolic: p(dia),
            mean_arterial_pressure: p(map),
            timestamp: Some(time()),
            pulse_rate: pulse.map(|v| SFloat::new(v, 0).unwrap()),
            user_id: Some(1),
            measurement_status: status,
        })
    }

    fn outcome(m: &Measurement) -> Outcome {
        validate(m, &RX).outcome
    }

    /// CLINICAL.md §3.1: accept 10–630 mg/dL and 0.6–35.0 mmol/L, in the native unit, boundaries included.
    #[test]
    fn glucose_plausibility_boundaries_in_both_units() {
        let cases = [
            // (mantissa, exponent, mol/L?, accepted)
            (10, -5, false, true),
            (9, -5, false, false),
            (630, -5, false, true),
            (631, -5, false, false),
            (6, -4, true, true), // 0.6 mmol/L = 6e-4 mol/L
            (5, -4, true, false),
            (350, -4, true, true),
            (351, -4, true, false),
        ];
        for (m, e, mol, ok) in cases {
            let o = outcome(&glu(m, e, mol, None));
            assert_eq!(o == Outcome::Valid, ok, "{m}e{e} mol={mol}: {o:?}");
            if !ok {
                assert!(matches!(
                    o,
                    Outcome::Rejected {
                        rejection: Rejection::OutOfRange {
                            field: Field::Glucose,
                            ..
                        }
                    }
                ));
            }
        }
    }

    /// CLINICAL.md §3.1: control solution (type 10 or location 4) is excluded whatever its value.
    #[test]
    fn control_solution_is_excluded() {
        let Measurement::Glucose(mut g) = glu(126, -5, false, None) else {
            unreachable!()
        };
        g.sample_type = Some(SAMPLE_TYPE_CONTROL);
        assert_eq!(outcome(&Measurement::Glucose(g)), Outcome::ControlSolution);
        g.sample_type = Some(1);
        g.sample_location = Some(SAMPLE_LOCATION_CONTROL);
        assert_eq!(outcome(&Measurement::Glucose(g)), Outcome::ControlSolution);
    }

    /// GATT.md: i-SENS marks a ketone result with context meal 6; it is not a glucose value (a ketone of
    /// 0.6 mmol/L must not read as glucose 0.6 mmol/L).
    #[test]
    fn ketone_marker_is_not_glucose() {
        let Measurement::Glucose(mut g) = glu(6, -4, true, None) else {
            unreachable!()
        };
        g.context = Some(GlucoseContextInfo {
            meal: Some(MEAL_KETONE_MARKER),
            ..Default::default()
        });
        assert_eq!(
            outcome(&Measurement::Glucose(g)),
            Outcome::Rejected {
                rejection: Rejection::NotGlucose
            }
        );
        // A known meal code keeps it a glucose reading.
        g.context = Some(GlucoseContextInfo {
            meal: Some(1),
            ..Default::default()
        });
        assert_ne!(
            outcome(&Measurement::Glucose(g)),
            Outcome::Rejected {
                rejection: Rejection::NotGlucose
            }
        );
    }

    /// LO is bit 6 and HI bit 5 (Wireshark packet-btatt.c; Nordic's library swaps them).
    #[test]
    fn lo_hi_are_censored_not_swapped() {
        assert_eq!(
            outcome(&glu(20, -5, false, Some(0x0040))),
            Outcome::Censored {
                censor: Censor::Low
            }
        );
        assert_eq!(
            outcome(&glu(600, -5, false, Some(0x0020))),
            Outcome::Censored {
                censor: Censor::High
            }
        );
    }

    #[test]
    fn each_device_error_bit_rejects() {
        for bit in 0..16 {
            let b = 1u16 << bit;
            if b & GLUCOSE_DEVICE_ERROR_BITS == 0 {
                continue;
            }
            assert_eq!(
                outcome(&glu(100, -5, false, Some(b))),
                Outcome::Rejected {
                    rejection: Rejection::DeviceError { bits: b }
                },
                "bit {bit}"
            );
        }
    }

    #[test]
    fn battery_low_accepts_with_flag_and_time_fault_distrusts_time() {
        let v = validate(&glu(100, -5, false, Some(0x0001)), &RX);
        assert_eq!(v.outcome, Outcome::Valid);
        assert!(v.flags.contains(Flags::BATTERY_LOW));
        let v = validate(&glu(100, -5, false, Some(GLUCOSE_TIME_FAULT_BIT)), &RX);
        assert_eq!(v.outcome, Outcome::Valid);
        assert_eq!(v.time.doubt, Some(TimeDoubt::DeviceTimeFault));
        assert!(v.flags.contains(Flags::TIME_UNTRUSTED));
    }

    #[test]
    fn special_values_reject_with_their_name() {
        let Measurement::Glucose(mut g) = glu(100, -5, false, None) else {
            unreachable!()
        };
        for (raw, name) in [
            (0x07FF, "NaN"),
            (0x0800, "NRes"),
            (0x07FE, "+INF"),
            (0x0802, "-INF"),
            (0x0801, "reserved"),
        ] {
            g.concentration = Some(Glucose::from_wire(SFloat::from_raw(raw), false));
            assert_eq!(
                outcome(&Measurement::Glucose(g)),
                Outcome::Rejected {
                    rejection: Rejection::NoValue {
                        field: Field::Glucose,
                        special: name
                    }
                }
            );
        }
        g.concentration = None;
        assert_eq!(
            outcome(&Measurement::Glucose(g)),
            Outcome::Rejected {
                rejection: Rejection::NoConcentration
            }
        );
    }

    /// CLINICAL.md §3.2 hard windows: SBP 50–300, DBP 20–200, pulse 25–250; SBP > DBP; PP ≥ 10; DBP ≤ MAP ≤ SBP.
    #[test]
    fn bp_plausibility_table() {
        use Rejection::*;
        // (systolic, diastolic, MAP, pulse, expected rejection)
        type Case = (i32, i32, i32, Option<i32>, Option<Rejection>);
        let cases: [Case; 14] = [
            (120, 80, 93, Some(70), None),
            (50, 20, 30, Some(70), None),
            (
                49,
                20,
                30,
                Some(70),
                Some(OutOfRange {
                    field: Field::Systolic,
                    value: 49.0,
                    min: 50.0,
                    max: 300.0,
                }),
            ),
            (300, 200, 233, Some(70), None),
            (
                301,
                80,
                100,
                Some(70),
                Some(OutOfRange {
                    field: Field::Systolic,
                    value: 301.0,
                    min: 50.0,
                    max: 300.0,
                }),
            ),
            (
                120,
                19,
                50,
                Some(70),
                Some(OutOfRange {
                    field: Field::Diastolic,
                    value: 19.0,
                    min: 20.0,
                    max: 200.0,
                }),
            ),
            (
                210,
                201,
                205,
                Some(70),
                Some(OutOfRange {
                    field: Field::Diastolic,
                    value: 201.0,
                    min: 20.0,
                    max: 200.0,
                }),
            ),
            (80, 80, 80, Some(70), Some(SystolicNotAboveDiastolic)),
            (80, 90, 85, Some(70), Some(SystolicNotAboveDiastolic)),
            (
                89,
                80,
                83,
                Some(70),
                Some(PulsePressureTooNarrow { mmhg: 9.0 }),
            ),
            (90, 80, 83, Some(70), None),
            (
                120,
                80,
                121,
                Some(70),
                Some(MeanArterialPressureOutsideRange),
            ),
            (
                120,
                80,
                93,
                Some(24),
                Some(OutOfRange {
                    field: Field::Pulse,
                    value: 24.0,
                    min: 25.0,
                    max: 250.0,
                }),
            ),
            (
                120,
                80,
                93,
                Some(251),
                Some(OutOfRange {
                    field: Field::Pulse,
                    value: 251.0,
                    min: 25.0,
                    max: 250.0,
                }),
            ),
        ];
        for (s, d, m, p, want) in cases {
            let got = outcome(&bp(s, d, m, p, None));
            match want {
                None => assert_eq!(got, Outcome::Valid, "{s}/{d} map {m} pulse {p:?}"),
                Some(r) => assert_eq!(
                    got,
                    Outcome::Rejected { rejection: r },
                    "{s}/{d} map {m} pulse {p:?}"
                ),
            }
        }
    }

    #[test]
    fn bp_soft_checks_only_flag() {
        let v = validate(&bp(250, 100, 120, Some(35), Some(0x0004)), &RX);
        assert_eq!(v.outcome, Outcome::Valid);
        for f in [
            Flags::WIDE_PULSE_PRESSURE,
            Flags::MAP_INCONSISTENT,
            Flags::PULSE_ATYPICAL,
            Flags::IRREGULAR_PULSE,
        ] {
            assert!(
                v.flags.contains(f),
                "{:?}",
                v.flags.names().collect::<Vec<_>>()
            );
        }
    }

    /// Beurer cuffs send MAP 0 (derdilla PR #735): treated as absent, not as outside DBP..SBP.
    #[test]
    fn map_zero_is_absent() {
        assert_eq!(outcome(&bp(120, 80, 0, Some(70), None)), Outcome::Valid);
    }

    /// CLINICAL.md §3.2: body movement, cuff too loose, improper position → low quality, kept.
    #[test]
    fn bp_status_bits_make_low_quality() {
        for bit in [0x0001, 0x0002, 0x0020] {
            assert_eq!(
                outcome(&bp(120, 80, 93, Some(70), Some(bit))),
                Outcome::LowQuality
            );
        }
        assert_eq!(
            outcome(&bp(120, 80, 93, Some(70), Some(0x0004))),
            Outcome::Valid
        );
    }

    /// derdilla #80: a failed measurement ("Err") arrives as all-NaN with status 0.
    #[test]
    fn all_nan_bp_is_rejected_as_no_value() {
        let Measurement::BloodPressure(mut b) = bp(120, 80, 93, None, None) else {
            unreachable!()
        };
        b.systolic.raw = SFloat::NAN;
        b.diastolic.raw = SFloat::NAN;
        assert_eq!(
            outcome(&Measurement::BloodPressure(b)),
            Outcome::Rejected {
                rejection: Rejection::NoValue {
                    field: Field::Systolic,
                    special: "NaN"
                }
            }
        );
    }

    /// Promise 5: corrected = device time − measured offset; a meter 7 minutes fast is corrected.
    #[test]
    fn corrected_time_uses_the_measured_offset() {
        let rx = Reception {
            received_utc: RX.received_utc,
            clock_offset_s: Some(420),
        };
        let v = validate(&bp(120, 80, 93, Some(70), None), &rx);
        assert_eq!(
            v.time.corrected_utc,
            Some(time().to_epoch_seconds().unwrap() - 420)
        );
        assert_eq!(v.time.doubt, None);
        let unread = Reception {
            received_utc: RX.received_utc,
            clock_offset_s: None,
        };
        let v = validate(&bp(120, 80, 93, Some(70), None), &unread);
        assert_eq!(
            (v.time.corrected_utc, v.time.doubt),
            (None, Some(TimeDoubt::ClockNotRead))
        );
    }

    #[test]
    fn future_time_is_rejected_beyond_skew() {
        let t = time().to_epoch_seconds().unwrap();
        let ok = Reception {
            received_utc: t - FUTURE_SKEW_S,
            clock_offset_s: Some(0),
        };
        assert_eq!(outcome_at(&ok), Outcome::Valid);
        let bad = Reception {
            received_utc: t - FUTURE_SKEW_S - 1,
            clock_offset_s: Some(0),
        };
        assert_eq!(
            outcome_at(&bad),
            Outcome::Rejected {
                rejection: Rejection::TimeInFuture {
                    seconds: FUTURE_SKEW_S + 1
                }
            }
        );
    }

    fn outcome_at(rx: &Reception) -> Outcome {
        validate(&bp(120, 80, 93, Some(70), None), rx).outcome
    }
}
