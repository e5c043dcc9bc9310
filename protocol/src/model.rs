//! The domain model: what a reading *means*, in the units a person reads.
//!
//! The codecs in [`crate::gatt`] keep values as transmitted (kg/L, mol/L, mmHg, kPa). Here each value keeps
//! its **device-native** unit and number unchanged (CLINICAL.md §3.4 rule 1: mg/dL for a kg/L meter,
//! mmol/L for a mol/L meter) and derives the other unit at full precision with one constant each:
//! [`MG_PER_DL_PER_MMOL_PER_L`] and [`MMHG_PER_KPA`]. Nothing is rounded here; rounding is for display.
//! Thresholds are compared in the native unit (CLINICAL.md §3.4 rule 3), so no value ever round-trips.

use crate::gatt::bp::BloodPressureMeasurement;
use crate::gatt::glucose::{ConcentrationUnit, GlucoseContext, GlucoseMeasurement, MedicationUnit};
use crate::gatt::time::DateTime;
use crate::ieee11073::{Number, SFloat};

/// mg/dL per mmol/L for glucose (molar mass 180.156 g/mol ÷ 10; CLINICAL.md §3.4). Not 18.2 (Nordic's
/// library, ~1 % off) and not 18.
pub const MG_PER_DL_PER_MMOL_PER_L: f64 = 18.016;

/// mmHg per kPa (CLINICAL.md §3.4).
pub const MMHG_PER_KPA: f64 = 7.50062;

/// The unit a glucometer shows, derived from the GLS unit flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum GlucoseUnit {
    /// mg/dL (the meter sends kg/L; 1 mg/dL = 10^-5 kg/L).
    #[cfg_attr(feature = "serde", serde(rename = "mg/dL"))]
    MgPerDl,
    /// mmol/L (the meter sends mol/L; 1 mmol/L = 10^-3 mol/L).
    #[cfg_attr(feature = "serde", serde(rename = "mmol/L"))]
    MmolPerL,
}

impl GlucoseUnit {
    /// The unit's symbol.
    pub fn symbol(&self) -> &'static str {
        match self {
            GlucoseUnit::MgPerDl => "mg/dL",
            GlucoseUnit::MmolPerL => "mmol/L",
        }
    }
}

/// The unit a cuff shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PressureUnit {
    /// mmHg.
    #[cfg_attr(feature = "serde", serde(rename = "mmHg"))]
    MmHg,
    /// kPa.
    #[cfg_attr(feature = "serde", serde(rename = "kPa"))]
    KPa,
}

impl PressureUnit {
    /// The unit's symbol.
    pub fn symbol(&self) -> &'static str {
        match self {
            PressureUnit::MmHg => "mmHg",
            PressureUnit::KPa => "kPa",
        }
    }
}

/// A glucose concentration in its device-native display unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Glucose {
    /// The SFLOAT as transmitted (its own unit is kg/L or mol/L).
    pub raw: SFloat,
    /// The unit the meter shows.
    pub unit: GlucoseUnit,
}

impl Glucose {
    /// From a GLS concentration: `mol_per_l` is the unit flag (b2).
    pub fn from_wire(raw: SFloat, mol_per_l: bool) -> Glucose {
        Glucose {
            raw,
            unit: if mol_per_l {
                GlucoseUnit::MmolPerL
            } else {
                GlucoseUnit::MgPerDl
            },
        }
    }

    /// The value in the native unit, exactly: the wire's decimal exponent is shifted (kg/L → mg/dL is
    /// +5, mol/L → mmol/L is +3) instead of multiplying by a float, so 126 × 10^-5 kg/L is exactly 126.
    /// `None` for a special value.
    pub fn native(&self) -> Option<f64> {
        let shift = match self.unit {
            GlucoseUnit::MgPerDl => 5,
            GlucoseUnit::MmolPerL => 3,
        };
        match self.raw.0 {
            Number::Finite { mantissa, exponent } => Number::Finite {
                mantissa,
                exponent: exponent.saturating_add(shift),
            }
            .value(),
            _ => None,
        }
    }

    /// mg/dL (derived with [`MG_PER_DL_PER_MMOL_PER_L`] when the meter shows mmol/L).
    pub fn mg_per_dl(&self) -> Option<f64> {
        let v = self.native()?;
        Some(match self.unit {
            GlucoseUnit::MgPerDl => v,
            GlucoseUnit::MmolPerL => v * MG_PER_DL_PER_MMOL_PER_L,
        })
    }

    /// mmol/L (derived with [`MG_PER_DL_PER_MMOL_PER_L`] when the meter shows mg/dL).
    pub fn mmol_per_l(&self) -> Option<f64> {
        let v = self.native()?;
        Some(match self.unit {
            GlucoseUnit::MmolPerL => v,
            GlucoseUnit::MgPerDl => v / MG_PER_DL_PER_MMOL_PER_L,
        })
    }
}

/// A pressure in its device-native unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// The SFLOAT as transmitted.
    pub raw: SFloat,
    /// The unit the cuff sent.
    pub unit: PressureUnit,
}

impl Pressure {
    /// The value in the native unit; `None` for a special value.
    pub fn native(&self) -> Option<f64> {
        self.raw.value()
    }

    /// mmHg (derived with [`MMHG_PER_KPA`] from kPa).
    pub fn mmhg(&self) -> Option<f64> {
        let v = self.native()?;
        Some(match self.unit {
            PressureUnit::MmHg => v,
            PressureUnit::KPa => v * MMHG_PER_KPA,
        })
    }

    /// kPa (derived with [`MMHG_PER_KPA`] from mmHg).
    pub fn kpa(&self) -> Option<f64> {
        let v = self.native()?;
        Some(match self.unit {
            PressureUnit::KPa => v,
            PressureUnit::MmHg => v / MMHG_PER_KPA,
        })
    }
}

/// GLS context fields that change how a glucose value is read (meal state drives the alert rules).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GlucoseContextInfo {
    /// Meal (1 preprandial, 2 postprandial, 3 fasting, 4 casual, 5 bedtime; others reserved, kept).
    pub meal: Option<u8>,
    /// Tester (1 self, 2 health care professional, 3 lab, 15 n/a).
    pub tester: Option<u8>,
    /// Health (1 minor, 2 major, 3 menses, 4 stress, 5 none, 15 n/a).
    pub health: Option<u8>,
    /// Carbohydrate id and grams.
    pub carbohydrate: Option<(u8, Option<f64>)>,
    /// Exercise duration (s) and intensity (%).
    pub exercise: Option<(u16, u8)>,
    /// Medication id and amount (mg or mL, as the flag says: `true` = litres).
    pub medication: Option<(u8, Option<f64>, bool)>,
    /// HbA1c, %.
    pub hba1c_pct: Option<f64>,
}

/// How a meter numbers its records (GATT.md "Sequence numbers / record retrieval").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordNumbering {
    /// As GLS v1.0 §3.1.1.2 says: from 0 upwards, never reused, so a sequence number names one record of one
    /// meter for life.
    #[default]
    Gls,
    /// Sequence 0 is the newest record and every new reading renumbers the rest (TaiDoc Diamond Mini DM30b
    /// fw 1.2.4): a sequence number names a record only within one transfer. Such a record is identified
    /// by its time and value instead ([`crate::reading_id::glucose_by_time`]).
    NewestFirst,
}

/// One glucose record from a meter, with its context when the meter sent one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlucoseRecord {
    /// GLS sequence number (names the record for life on this meter, unless `numbering` says otherwise).
    pub sequence_number: u16,
    /// How the meter numbers its records.
    pub numbering: RecordNumbering,
    /// Base Time as the meter keeps it.
    pub base_time: DateTime,
    /// Time Offset in minutes (0x7FFF overrun / 0x8000 underrun kept raw).
    pub time_offset_min: Option<i16>,
    /// The concentration, if the record carries one.
    pub concentration: Option<Glucose>,
    /// Sample type nibble (10 = control solution).
    pub sample_type: Option<u8>,
    /// Sample location nibble (4 = control solution).
    pub sample_location: Option<u8>,
    /// Sensor Status Annunciation, if present.
    pub sensor_status: Option<u16>,
    /// The context joined by sequence number.
    pub context: Option<GlucoseContextInfo>,
}

impl GlucoseRecord {
    /// The user-facing time: Base Time + Time Offset (GLS v1.0 §3.1.1.3), or the base time when there is no
    /// usable offset. `None` when the date is incomplete.
    pub fn device_time(&self) -> Option<DateTime> {
        match self.time_offset_min {
            Some(o) if o != i16::MAX && o != i16::MIN => self.base_time.add_minutes(i32::from(o)),
            _ => self.base_time.is_complete().then_some(self.base_time),
        }
    }
}

/// One blood-pressure reading from a cuff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BloodPressureRecord {
    /// Systolic.
    pub systolic: Pressure,
    /// Diastolic.
    pub diastolic: Pressure,
    /// Mean arterial pressure (Beurer cuffs send 0: treated as absent by validation).
    pub mean_arterial_pressure: Pressure,
    /// The cuff's time stamp, if sent.
    pub timestamp: Option<DateTime>,
    /// Pulse rate, bpm.
    pub pulse_rate: Option<SFloat>,
    /// BLS user id (255 = unknown user).
    pub user_id: Option<u8>,
    /// Measurement Status, if present.
    pub measurement_status: Option<u16>,
}

/// A measurement as a device reported it, before validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measurement {
    /// A glucometer record.
    Glucose(GlucoseRecord),
    /// A cuff reading.
    BloodPressure(BloodPressureRecord),
}

/// `raw × 10^shift`, computed on the exponent so that decimal values stay exact (kg → g is +3).
fn shifted(raw: SFloat, shift: i8) -> Option<f64> {
    match raw.0 {
        Number::Finite { mantissa, exponent } => Number::Finite {
            mantissa,
            exponent: exponent.saturating_add(shift),
        }
        .value(),
        _ => None,
    }
}

impl GlucoseContextInfo {
    /// The context fields of a Glucose Measurement Context value (GLS v1.0 §3.2), amounts converted to the
    /// units people use: carbohydrate in grams, medication in mg (kg on the wire) or mL (L on the wire).
    pub fn from_gatt(c: &GlucoseContext<'_>) -> GlucoseContextInfo {
        GlucoseContextInfo {
            meal: c.meal.map(|m| m.0),
            tester: c.tester_health.map(|t| t.tester.0),
            health: c.tester_health.map(|t| t.health.0),
            carbohydrate: c.carbohydrate.map(|k| (k.id.0, shifted(k.value, 3))),
            exercise: c.exercise.map(|e| (e.duration_s, e.intensity_pct)),
            medication: c.medication.map(|m| {
                let litres = m.unit == MedicationUnit::L;
                (m.id.0, shifted(m.value, if litres { 3 } else { 6 }), litres)
            }),
            hba1c_pct: c.hba1c.and_then(|h| h.value()),
        }
    }
}

impl GlucoseRecord {
    /// The record a Glucose Measurement value describes, without context (join it with [`ContextJoiner`]).
    pub fn from_gatt(g: &GlucoseMeasurement<'_>) -> GlucoseRecord {
        GlucoseRecord {
            sequence_number: g.sequence_number,
            numbering: RecordNumbering::Gls,
            base_time: g.base_time,
            time_offset_min: g.time_offset_min,
            concentration: g
                .concentration
                .map(|c| Glucose::from_wire(c.value, c.unit == ConcentrationUnit::MolPerL)),
            sample_type: g.concentration.map(|c| c.sample_type.0),
            sample_location: g.concentration.map(|c| c.sample_location.0),
            sensor_status: g.sensor_status.map(|s| s.0),
            context: None,
        }
    }
}

impl BloodPressureRecord {
    /// The reading a Blood Pressure Measurement value describes.
    pub fn from_gatt(b: &BloodPressureMeasurement<'_>) -> BloodPressureRecord {
        let unit = match b.unit {
            crate::gatt::bp::PressureUnit::MmHg => PressureUnit::MmHg,
            crate::gatt::bp::PressureUnit::KPa => PressureUnit::KPa,
        };
        let p = |raw| Pressure { raw, unit };
        BloodPressureRecord {
            systolic: p(b.systolic),
            diastolic: p(b.diastolic),
            mean_arterial_pressure: p(b.mean_arterial_pressure),
            timestamp: b.timestamp,
            pulse_rate: b.pulse_rate,
            user_id: b.user_id,
            measurement_status: b.measurement_status.map(|s| s.0),
        }
    }

    /// The values that identify this reading for [`crate::reading_id::blood_pressure`].
    pub fn identity(&self) -> crate::reading_id::BpIdentity {
        crate::reading_id::BpIdentity {
            timestamp: self.timestamp,
            user_id: self.user_id,
            kpa: self.systolic.unit == PressureUnit::KPa,
            systolic: self.systolic.raw,
            diastolic: self.diastolic.raw,
            mean_arterial_pressure: self.mean_arterial_pressure.raw,
            pulse_rate: self.pulse_rate,
        }
    }
}

/// What went wrong joining a context to its measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// A context arrived whose sequence number matches no held measurement (GLP: "out of sequence
    /// context"; xDrip logs and drops it — we report it).
    OrphanContext {
        /// The context's sequence number.
        sequence_number: u16,
    },
}

/// Joins Glucose Measurement Context values to their measurements by sequence number (GLS v1.0 §3.2: the
/// context follows its measurement, which sets flag b4 "context follows").
///
/// A pure state machine holding at most one measurement: GLS sends a record's context right after it.
/// Feed every 2A18 and 2A34 value in arrival order; each call returns the records that are complete.
#[derive(Debug, Default)]
pub struct ContextJoiner {
    held: Option<GlucoseRecord>,
}

impl ContextJoiner {
    /// A new joiner holding nothing.
    pub fn new() -> Self {
        ContextJoiner { held: None }
    }

    /// A measurement arrived. Returns the previously held one (its context never came) and, if this one
    /// does not wait for a context, this one.
    pub fn measurement(
        &mut self,
        record: GlucoseRecord,
        context_follows: bool,
    ) -> (Option<GlucoseRecord>, Option<GlucoseRecord>) {
        let previous = self.held.take();
        if context_follows {
            self.held = Some(record);
            (previous, None)
        } else {
            (previous, Some(record))
        }
    }

    /// A context arrived: returns the joined record.
    ///
    /// # Errors
    /// [`JoinError::OrphanContext`] when no held measurement has its sequence number; a held measurement
    /// with another number stays held.
    pub fn context(
        &mut self,
        sequence_number: u16,
        context: GlucoseContextInfo,
    ) -> Result<GlucoseRecord, JoinError> {
        match self.held {
            Some(mut r) if r.sequence_number == sequence_number => {
                self.held = None;
                r.context = Some(context);
                Ok(r)
            }
            _ => Err(JoinError::OrphanContext { sequence_number }),
        }
    }

    /// The transfer ended (RACP response code, or the session closed): release a held measurement whose
    /// context never came. It is still a valid record.
    pub fn finish(&mut self) -> Option<GlucoseRecord> {
        self.held.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glucose_kg_per_l_is_exact_mg_per_dl() {
        let g = Glucose::from_wire(SFloat::new(126, -5).unwrap(), false);
        assert_eq!(g.native(), Some(126.0));
        assert_eq!(g.mg_per_dl(), Some(126.0));
        assert!((g.mmol_per_l().unwrap() - 126.0 / 18.016).abs() < 1e-12);
    }

    /// CLINICAL.md §3.4 reference table (factor 18.016): 3.9 mmol/L → 70.26 mg/dL, 70 mg/dL → 3.885 mmol/L.
    #[test]
    fn conversion_uses_one_constant() {
        let mmol = Glucose::from_wire(SFloat::new(39, -4).unwrap(), true);
        assert!((mmol.native().unwrap() - 3.9).abs() < 1e-12);
        assert!((mmol.mg_per_dl().unwrap() - 70.2624).abs() < 1e-9);
        let mg = Glucose::from_wire(SFloat::new(70, -5).unwrap(), false);
        assert!((mg.mmol_per_l().unwrap() - 3.8854).abs() < 1e-4);
    }

    /// GLS.TS CN/BV resolutions: carbohydrate at exponent −3 (grams), medication in kg at −6 (mg).
    #[test]
    fn context_amounts_in_people_units() {
        use crate::gatt::Codec;
        let bytes = [0x13, 0x05, 0x00, 0x01, 0x5A, 0xD0, 0x02, 0x01, 0x0F, 0xA0];
        let c = GlucoseContext::parse(&bytes).unwrap();
        let info = GlucoseContextInfo::from_gatt(&c);
        assert_eq!(info.carbohydrate, Some((1, Some(90.0)))); // 90 × 10^-3 kg = 90 g
        assert_eq!(info.meal, Some(2));
        assert_eq!(info.medication, Some((1, Some(15.0), false))); // 15 × 10^-6 kg = 15 mg
    }

    #[test]
    fn kpa_to_mmhg() {
        let p = Pressure {
            raw: SFloat::new(189, -1).unwrap(),
            unit: PressureUnit::KPa,
        };
        assert!((p.mmhg().unwrap() - 18.9 * 7.50062).abs() < 1e-9);
        let nan = Pressure {
            raw: SFloat::NAN,
            unit: PressureUnit::MmHg,
        };
        assert_eq!(nan.mmhg(), None);
    }

    fn rec(seq: u16) -> GlucoseRecord {
        GlucoseRecord {
            sequence_number: seq,
            numbering: crate::model::RecordNumbering::Gls,
            base_time: DateTime {
                year: 2024,
                month: 1,
                day: 1,
                hours: 8,
                minutes: 0,
                seconds: 0,
            },
            time_offset_min: Some(-5),
            concentration: None,
            sample_type: None,
            sample_location: None,
            sensor_status: None,
            context: None,
        }
    }

    #[test]
    fn device_time_applies_offset_but_not_overrun() {
        assert_eq!(
            rec(1).device_time().unwrap().to_string(),
            "2024-01-01T07:55:00"
        );
        let mut r = rec(1);
        r.time_offset_min = Some(i16::MAX);
        assert_eq!(r.device_time().unwrap().to_string(), "2024-01-01T08:00:00");
    }

    #[test]
    fn joiner_joins_by_sequence_and_reports_orphans() {
        let mut j = ContextJoiner::new();
        assert_eq!(j.measurement(rec(1), true), (None, None));
        let ctx = GlucoseContextInfo {
            meal: Some(3),
            ..Default::default()
        };
        assert_eq!(
            j.context(2, ctx),
            Err(JoinError::OrphanContext { sequence_number: 2 })
        );
        let joined = j.context(1, ctx).unwrap();
        assert_eq!(joined.context.unwrap().meal, Some(3));
        // A measurement whose context never comes is released by the next one, without a context.
        assert_eq!(j.measurement(rec(2), true), (None, None));
        let (prev, now) = j.measurement(rec(3), false);
        assert_eq!(prev.unwrap().sequence_number, 2);
        assert_eq!(now.unwrap().sequence_number, 3);
        assert_eq!(j.finish(), None);
    }
}
