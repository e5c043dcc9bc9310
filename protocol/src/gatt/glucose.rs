//! Glucose Service (GLS v1.0): Glucose Measurement (0x2A18), Glucose Measurement Context (0x2A34) and
//! Glucose Feature (0x2A51). The Record Access Control Point (0x2A52) is in [`super::racp`].
//!
//! # Tolerance (GLP.TS 1.0.7 GLP/COL/GLF/BI-01…11)
//!
//! A collector must report the defined fields of a value that carries reserved flag bits, reserved
//! Type / Sample Location nibbles, reserved status or feature bits, reserved Carbohydrate / Meal /
//! Medication IDs or octets after the defined fields. So:
//!
//! - the flags octet is kept whole (`flags`), and only the presence bits are derived from the fields on
//!   encode; reserved bits (and a units bit sent without the field it qualifies) go back out as received;
//! - every code set is an open newtype ([`SampleType`], [`Meal`], …) and every bit set a `u16` newtype
//!   ([`SensorStatus`], [`GlucoseFeature`]) that keeps the reserved bits;
//! - octets after the defined fields are kept in `trailing`.
//!
//! The one field that *is* checked is the Base Time: a month 13 or an hour 24 cannot be placed on a
//! timeline, and [`DateTime::check`] rejects it as for every Date Time (the GLS v1.0 §3.1.1.3 rule against
//! year / month / day 0 is *not* enforced, see [`DateTime::is_complete`]).
//!
//! Values stay in the units transmitted: concentration in kg/L or mol/L, carbohydrate in kg, medication in
//! kg or L (GLS.TS CN/BV exponents: −5 for kg/L, −4 for mol/L, −3 for carbohydrate, −6 / −3 for
//! medication). Conversion to mg/dL and mmol/L is the model layer's.

use core::ops::BitOr;

use super::time::DateTime;
use super::{Codec, Reader, Writer, open_enum};
use crate::Error;
use crate::ieee11073::SFloat;

/// `true` when `mask` is set in `flags`.
const fn has(flags: u8, mask: u8) -> bool {
    flags & mask != 0
}

/// `n` when `mask` is set in `flags`, else 0: the length a flag-dependent field adds.
const fn len_if(flags: u8, mask: u8, n: usize) -> usize {
    if has(flags, mask) { n } else { 0 }
}

/// `flags` with `mask` set or cleared.
const fn with(flags: u8, mask: u8, on: bool) -> u8 {
    if on { flags | mask } else { flags & !mask }
}

/// The names of the set bits of `raw`, bit *i* named `names[i]`; bits past the table are not named.
fn set_bit_names(raw: u16, names: &'static [&'static str]) -> impl Iterator<Item = &'static str> {
    names
        .iter()
        .zip(0u32..)
        .filter(move |(_, bit)| raw.checked_shr(*bit).is_some_and(|v| v & 1 != 0))
        .map(|(name, _)| *name)
}

/// Packs two 4-bit codes into one octet (`low` in bits 0–3, `high` in bits 4–7).
///
/// # Errors
/// [`Error::EncodeUnrepresentable`] when either code does not fit 4 bits: the wire field is a nibble, and
/// masking would silently send another code.
fn pack_nibbles(low: u8, high: u8) -> Result<u8, Error> {
    if low > 0x0F || high > 0x0F {
        return Err(Error::EncodeUnrepresentable);
    }
    Ok((high << 4) | low)
}

// ---------------------------------------------------------------------------------------------------------
// Code sets
// ---------------------------------------------------------------------------------------------------------

open_enum! {
    /// Glucose sample type (GLS v1.0 §3.1.1.6, low nibble of Type-Sample Location). 0 and 11–15 are
    /// reserved. Only the low 4 bits are sent; encoding a value above 15 fails.
    pub struct SampleType(u8) {
        /// Capillary whole blood.
        CAPILLARY_WHOLE_BLOOD = 1, "capillary whole blood";
        /// Capillary plasma.
        CAPILLARY_PLASMA = 2, "capillary plasma";
        /// Venous whole blood.
        VENOUS_WHOLE_BLOOD = 3, "venous whole blood";
        /// Venous plasma.
        VENOUS_PLASMA = 4, "venous plasma";
        /// Arterial whole blood.
        ARTERIAL_WHOLE_BLOOD = 5, "arterial whole blood";
        /// Arterial plasma.
        ARTERIAL_PLASMA = 6, "arterial plasma";
        /// Undetermined whole blood.
        UNDETERMINED_WHOLE_BLOOD = 7, "undetermined whole blood";
        /// Undetermined plasma.
        UNDETERMINED_PLASMA = 8, "undetermined plasma";
        /// Interstitial fluid (ISF).
        INTERSTITIAL_FLUID = 9, "interstitial fluid";
        /// Control solution: a meter check, not a patient reading (xDrip drops these).
        CONTROL_SOLUTION = 10, "control solution";
    }
}

open_enum! {
    /// Where the sample was taken (GLS v1.0 §3.1.1.6, high nibble of Type-Sample Location). 0 and 5–14
    /// are reserved. Only the low 4 bits are sent; encoding a value above 15 fails.
    pub struct SampleLocation(u8) {
        /// Finger.
        FINGER = 1, "finger";
        /// Alternate site test (AST).
        ALTERNATE_SITE_TEST = 2, "alternate site test";
        /// Earlobe.
        EARLOBE = 3, "earlobe";
        /// Control solution.
        CONTROL_SOLUTION = 4, "control solution";
        /// Sample location value not available.
        NOT_AVAILABLE = 15, "not available";
    }
}

open_enum! {
    /// Carbohydrate ID: which meal the carbohydrate amount belongs to (GLS v1.0 §3.2). 0 and 8–255 are
    /// reserved.
    pub struct CarbohydrateId(u8) {
        /// Breakfast.
        BREAKFAST = 1, "breakfast";
        /// Lunch.
        LUNCH = 2, "lunch";
        /// Dinner.
        DINNER = 3, "dinner";
        /// Snack.
        SNACK = 4, "snack";
        /// Drink.
        DRINK = 5, "drink";
        /// Supper.
        SUPPER = 6, "supper";
        /// Brunch.
        BRUNCH = 7, "brunch";
    }
}

open_enum! {
    /// Meal: the reading's relation to a meal (GLS v1.0 §3.2). 0 and 6–255 are reserved; i-SENS CareSens
    /// meters send 6 for a ketone reading (xDrip `caresens/ContextRx.java`), which stays visible here as
    /// `Meal(6)`.
    pub struct Meal(u8) {
        /// Before a meal.
        PREPRANDIAL = 1, "preprandial";
        /// After a meal.
        POSTPRANDIAL = 2, "postprandial";
        /// Fasting.
        FASTING = 3, "fasting";
        /// Casual (snacks, drinks, …).
        CASUAL = 4, "casual";
        /// Bedtime.
        BEDTIME = 5, "bedtime";
    }
}

open_enum! {
    /// Who took the sample (GLS v1.0 §3.2, low nibble of Tester-Health). 0 and 4–14 are reserved. Only the
    /// low 4 bits are sent; encoding a value above 15 fails.
    pub struct Tester(u8) {
        /// The patient.
        SELF = 1, "self";
        /// A health care professional.
        HEALTH_CARE_PROFESSIONAL = 2, "health care professional";
        /// A laboratory test.
        LAB_TEST = 3, "lab test";
        /// Tester value not available.
        NOT_AVAILABLE = 15, "not available";
    }
}

open_enum! {
    /// The patient's state of health at the time (GLS v1.0 §3.2, high nibble of Tester-Health). 0 and 6–14
    /// are reserved. Only the low 4 bits are sent; encoding a value above 15 fails.
    pub struct Health(u8) {
        /// Minor health issues.
        MINOR_HEALTH_ISSUES = 1, "minor health issues";
        /// Major health issues.
        MAJOR_HEALTH_ISSUES = 2, "major health issues";
        /// During menses.
        DURING_MENSES = 3, "during menses";
        /// Under stress.
        UNDER_STRESS = 4, "under stress";
        /// No health issues.
        NO_HEALTH_ISSUES = 5, "no health issues";
        /// Health value not available.
        NOT_AVAILABLE = 15, "not available";
    }
}

open_enum! {
    /// Medication ID (GLS v1.0 §3.2). 0 and 6–255 are reserved.
    pub struct MedicationId(u8) {
        /// Rapid acting insulin.
        RAPID_ACTING_INSULIN = 1, "rapid acting insulin";
        /// Short acting insulin.
        SHORT_ACTING_INSULIN = 2, "short acting insulin";
        /// Intermediate acting insulin.
        INTERMEDIATE_ACTING_INSULIN = 3, "intermediate acting insulin";
        /// Long acting insulin.
        LONG_ACTING_INSULIN = 4, "long acting insulin";
        /// Pre-mixed insulin.
        PRE_MIXED_INSULIN = 5, "pre-mixed insulin";
    }
}

/// The unit of a glucose concentration (Glucose Measurement flag bit 2). One bit on the wire, so the set is
/// closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ConcentrationUnit {
    /// kg/L (flag bit 2 clear); 1 mg/dL = 1e-5 kg/L.
    #[default]
    KgPerL,
    /// mol/L (flag bit 2 set); 1 mmol/L = 1e-3 mol/L.
    MolPerL,
}

impl ConcentrationUnit {
    /// The unit as the `decode` contract prints it (`"kg/L"`, `"mol/L"`).
    pub fn symbol(&self) -> &'static str {
        match self {
            ConcentrationUnit::KgPerL => "kg/L",
            ConcentrationUnit::MolPerL => "mol/L",
        }
    }
}

/// The unit of a medication amount (Glucose Measurement Context flag bit 5). One bit, so the set is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum MedicationUnit {
    /// Kilograms (flag bit 5 clear); GLS.TS expects exponent −6, i.e. milligrams.
    #[default]
    Kg,
    /// Litres (flag bit 5 set); GLS.TS expects exponent −3 (mL) or −6 (µL).
    L,
}

impl MedicationUnit {
    /// The unit as the `decode` contract prints it (`"kg"`, `"L"`).
    pub fn symbol(&self) -> &'static str {
        match self {
            MedicationUnit::Kg => "kg",
            MedicationUnit::L => "L",
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Bit sets
// ---------------------------------------------------------------------------------------------------------

/// Sensor Status Annunciation (GLS v1.0 §3.1.1.7): what went wrong at the time of measurement.
///
/// Bit order is the specification's; Nordic's Android library swaps bits 5 and 6 — this type does not.
/// Bits 12–15 are reserved (a sensor shall send 0); they are kept, so GLP/COL/GLF/BI-03 (status 0xFFFF)
/// reports the twelve defined conditions and passes the rest through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SensorStatus(pub u16);

impl SensorStatus {
    /// Bit 0: device battery low at time of measurement.
    pub const DEVICE_BATTERY_LOW: SensorStatus = SensorStatus(1 << 0);
    /// Bit 1: sensor malfunction or faulting at time of measurement.
    pub const SENSOR_MALFUNCTION: SensorStatus = SensorStatus(1 << 1);
    /// Bit 2: sample size for blood or control solution insufficient.
    pub const SAMPLE_SIZE_INSUFFICIENT: SensorStatus = SensorStatus(1 << 2);
    /// Bit 3: strip insertion error.
    pub const STRIP_INSERTION_ERROR: SensorStatus = SensorStatus(1 << 3);
    /// Bit 4: strip type incorrect for device.
    pub const STRIP_TYPE_INCORRECT: SensorStatus = SensorStatus(1 << 4);
    /// Bit 5: sensor result higher than the device can process.
    pub const RESULT_TOO_HIGH: SensorStatus = SensorStatus(1 << 5);
    /// Bit 6: sensor result lower than the device can process.
    pub const RESULT_TOO_LOW: SensorStatus = SensorStatus(1 << 6);
    /// Bit 7: sensor temperature too high for a valid test / result.
    pub const TEMPERATURE_TOO_HIGH: SensorStatus = SensorStatus(1 << 7);
    /// Bit 8: sensor temperature too low for a valid test / result.
    pub const TEMPERATURE_TOO_LOW: SensorStatus = SensorStatus(1 << 8);
    /// Bit 9: sensor read interrupted because the strip was pulled too soon.
    pub const READ_INTERRUPTED: SensorStatus = SensorStatus(1 << 9);
    /// Bit 10: general device fault has occurred in the sensor.
    pub const GENERAL_DEVICE_FAULT: SensorStatus = SensorStatus(1 << 10);
    /// Bit 11: time fault has occurred in the sensor; the time may be inaccurate.
    pub const TIME_FAULT: SensorStatus = SensorStatus(1 << 11);
    /// The bits GLS v1.0 defines (0–11).
    pub const DEFINED: u16 = 0x0FFF;

    const NAMES: [&'static str; 12] = [
        "device battery low",
        "sensor malfunction",
        "sample size insufficient",
        "strip insertion error",
        "strip type incorrect",
        "result higher than device can process",
        "result lower than device can process",
        "sensor temperature too high",
        "sensor temperature too low",
        "sensor read interrupted",
        "general device fault",
        "time fault",
    ];

    /// `true` when every bit of `other` is set.
    pub fn contains(&self, other: SensorStatus) -> bool {
        self.0 & other.0 == other.0
    }

    /// `true` when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The names of the set defined bits, lowest bit first.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        set_bit_names(self.0, &Self::NAMES)
    }

    /// The set reserved bits (12–15), as received.
    pub fn reserved_bits(&self) -> u16 {
        self.0 & !Self::DEFINED
    }
}

impl BitOr for SensorStatus {
    type Output = SensorStatus;

    fn bitor(self, rhs: SensorStatus) -> SensorStatus {
        SensorStatus(self.0 | rhs.0)
    }
}

/// Glucose Feature (0x2A51, GLS v1.0 §3.3): what the sensor can detect and annunciate.
///
/// Bits 11–15 are reserved and the collector shall ignore them (GLP v1.0 §4.6); they are kept so the value
/// round-trips (GLP/COL/GLF/BI-11, feature 0xFFFF). UHN's `UHNBGMConstants.h` calls bit 11 "context
/// supported": that is not GLS v1.0, and it is not named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GlucoseFeature(pub u16);

impl GlucoseFeature {
    /// The encoded size.
    pub const LEN: usize = 2;
    /// Bit 0: low battery detection during measurement supported.
    pub const LOW_BATTERY: GlucoseFeature = GlucoseFeature(1 << 0);
    /// Bit 1: sensor malfunction detection supported.
    pub const SENSOR_MALFUNCTION: GlucoseFeature = GlucoseFeature(1 << 1);
    /// Bit 2: sensor sample size supported.
    pub const SAMPLE_SIZE: GlucoseFeature = GlucoseFeature(1 << 2);
    /// Bit 3: sensor strip insertion error detection supported.
    pub const STRIP_INSERTION_ERROR: GlucoseFeature = GlucoseFeature(1 << 3);
    /// Bit 4: sensor strip type error detection supported.
    pub const STRIP_TYPE_ERROR: GlucoseFeature = GlucoseFeature(1 << 4);
    /// Bit 5: sensor result high-low detection supported.
    pub const RESULT_HIGH_LOW: GlucoseFeature = GlucoseFeature(1 << 5);
    /// Bit 6: sensor temperature high-low detection supported.
    pub const TEMPERATURE_HIGH_LOW: GlucoseFeature = GlucoseFeature(1 << 6);
    /// Bit 7: sensor read interrupt detection supported.
    pub const READ_INTERRUPT: GlucoseFeature = GlucoseFeature(1 << 7);
    /// Bit 8: general device fault supported.
    pub const GENERAL_DEVICE_FAULT: GlucoseFeature = GlucoseFeature(1 << 8);
    /// Bit 9: time fault supported.
    pub const TIME_FAULT: GlucoseFeature = GlucoseFeature(1 << 9);
    /// Bit 10: multiple bond supported.
    pub const MULTIPLE_BOND: GlucoseFeature = GlucoseFeature(1 << 10);
    /// The bits GLS v1.0 defines (0–10).
    pub const DEFINED: u16 = 0x07FF;

    const NAMES: [&'static str; 11] = [
        "low battery",
        "sensor malfunction",
        "sample size",
        "strip insertion error",
        "strip type error",
        "result high-low",
        "temperature high-low",
        "read interrupt",
        "general device fault",
        "time fault",
        "multiple bond",
    ];

    /// `true` when every bit of `other` is set.
    pub fn contains(&self, other: GlucoseFeature) -> bool {
        self.0 & other.0 == other.0
    }

    /// The names of the set defined bits, lowest bit first.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        set_bit_names(self.0, &Self::NAMES)
    }

    /// The set reserved bits (11–15), as received.
    pub fn reserved_bits(&self) -> u16 {
        self.0 & !Self::DEFINED
    }
}

impl BitOr for GlucoseFeature {
    type Output = GlucoseFeature;

    fn bitor(self, rhs: GlucoseFeature) -> GlucoseFeature {
        GlucoseFeature(self.0 | rhs.0)
    }
}

impl<'a> Codec<'a> for GlucoseFeature {
    const UUID: u16 = 0x2A51;

    /// Octets after the two defined ones are ignored: the feature has no flags, so there is nothing they
    /// could mean, and a collector shall not reject the value.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::DecodeEmpty);
        }
        let mut r = Reader::new(bytes);
        r.require(Self::LEN)?;
        Ok(GlucoseFeature(r.u16()?))
    }

    fn buffer_len(&self) -> usize {
        Self::LEN
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, Self::LEN)?;
        w.u16(self.0)?;
        Ok(w.written())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Glucose Measurement 0x2A18
// ---------------------------------------------------------------------------------------------------------

/// The Glucose Concentration and Type-Sample Location fields (GLS v1.0 §3.1.1.5–6), present together
/// under flag bit 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Concentration {
    /// The concentration in `unit`; NaN when the sensor has no value (GLS v1.0 §3.1.1.5).
    pub value: SFloat,
    /// kg/L or mol/L, from flag bit 2.
    pub unit: ConcentrationUnit,
    /// Low nibble of Type-Sample Location.
    pub sample_type: SampleType,
    /// High nibble of Type-Sample Location.
    pub sample_location: SampleLocation,
}

/// Glucose Measurement (0x2A18, GLS v1.0 §3.1): one stored or new reading, notified.
///
/// Layout: Flags, Sequence Number (u16), Base Time (7), [Time Offset (s16, flag bit 0)], [Concentration
/// (SFLOAT) + Type-Sample Location (u8), bit 1], [Sensor Status Annunciation (u16), bit 3]; 10 to 17
/// octets, then whatever trailing octets the sensor appended.
///
/// # Flags on encode
/// Bits 0, 1, 3 and 4 are derived from `time_offset_min`, `concentration`, `sensor_status` and
/// `context_follows`; bit 2 from `concentration.unit` when a concentration is present. The other bits —
/// reserved bits 5–7, and bit 2 when no concentration is present (it then qualifies nothing) — are taken
/// from `flags`, so that `emit(parse(x)) == x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GlucoseMeasurement<'a> {
    /// The flags octet as received (see the type's doc for which bits encoding takes from here).
    pub flags: u8,
    /// Starts at 0, +1 per record, never rolls over or resets (GLS v1.0 §3.1.1.2).
    pub sequence_number: u16,
    /// The sensor's clock at the time of measurement (GLS v1.0 §3.1.1.3).
    pub base_time: DateTime,
    /// Minutes to add to `base_time` for the user-facing time (GLS v1.0 §3.1.1.4), as sent: 0x7FFF
    /// ([`Self::TIME_OFFSET_OVERRUN`]) and 0x8000 ([`Self::TIME_OFFSET_UNDERRUN`]) are not offsets.
    pub time_offset_min: Option<i16>,
    /// Concentration, unit, sample type and location (flag bit 1).
    pub concentration: Option<Concentration>,
    /// Sensor Status Annunciation (flag bit 3).
    pub sensor_status: Option<SensorStatus>,
    /// Flag bit 4: a Glucose Measurement Context with the same sequence number follows.
    pub context_follows: bool,
    /// Octets after the defined fields, kept as received (GLP/COL/GLF/BI-04).
    pub trailing: &'a [u8],
}

impl GlucoseMeasurement<'_> {
    /// Flag bit 0: Time Offset present.
    pub const FLAG_TIME_OFFSET: u8 = 0x01;
    /// Flag bit 1: Concentration and Type-Sample Location present.
    pub const FLAG_CONCENTRATION: u8 = 0x02;
    /// Flag bit 2: concentration in mol/L (clear: kg/L).
    pub const FLAG_UNITS_MOL_PER_L: u8 = 0x04;
    /// Flag bit 3: Sensor Status Annunciation present.
    pub const FLAG_SENSOR_STATUS: u8 = 0x08;
    /// Flag bit 4: Context Information Follows.
    pub const FLAG_CONTEXT_FOLLOWS: u8 = 0x10;
    /// Flag bits 5–7, reserved for future use.
    pub const FLAGS_RESERVED: u8 = 0xE0;
    /// The length with no optional field.
    pub const MIN_LEN: usize = 10;
    /// The length with every optional field and no trailing octets.
    pub const MAX_LEN: usize = 17;
    /// Time Offset "overrun" (GATT XML): the offset is too large to send.
    pub const TIME_OFFSET_OVERRUN: i16 = 0x7FFF;
    /// Time Offset "underrun" (GATT XML, raw 0x8000): the offset is too negative to send.
    pub const TIME_OFFSET_UNDERRUN: i16 = i16::MIN;

    /// A measurement with only the mandatory fields (flags 0).
    pub fn new(sequence_number: u16, base_time: DateTime) -> Self {
        GlucoseMeasurement {
            flags: 0,
            sequence_number,
            base_time,
            time_offset_min: None,
            concentration: None,
            sensor_status: None,
            context_follows: false,
            trailing: &[],
        }
    }

    /// The length of the defined fields that `flags` calls for (10..=17).
    pub const fn required_len(flags: u8) -> usize {
        Self::MIN_LEN
            + len_if(flags, Self::FLAG_TIME_OFFSET, 2)
            + len_if(flags, Self::FLAG_CONCENTRATION, SFloat::LEN + 1)
            + len_if(flags, Self::FLAG_SENSOR_STATUS, 2)
    }

    /// The flags octet [`Codec::emit`] sends: presence bits from the fields, the rest from `flags`.
    pub fn wire_flags(&self) -> u8 {
        let mut f = self.flags;
        f = with(f, Self::FLAG_TIME_OFFSET, self.time_offset_min.is_some());
        f = with(f, Self::FLAG_CONCENTRATION, self.concentration.is_some());
        if let Some(c) = &self.concentration {
            f = with(
                f,
                Self::FLAG_UNITS_MOL_PER_L,
                c.unit == ConcentrationUnit::MolPerL,
            );
        }
        f = with(f, Self::FLAG_SENSOR_STATUS, self.sensor_status.is_some());
        with(f, Self::FLAG_CONTEXT_FOLLOWS, self.context_follows)
    }

    /// The set reserved flag bits (5–7), as received.
    pub fn reserved_flags(&self) -> u8 {
        self.flags & Self::FLAGS_RESERVED
    }

    /// `true` when the Time Offset is present and is the overrun value 0x7FFF.
    pub fn is_time_offset_overrun(&self) -> bool {
        self.time_offset_min == Some(Self::TIME_OFFSET_OVERRUN)
    }

    /// `true` when the Time Offset is present and is the underrun value 0x8000.
    pub fn is_time_offset_underrun(&self) -> bool {
        self.time_offset_min == Some(Self::TIME_OFFSET_UNDERRUN)
    }

    /// The Time Offset in minutes when it is present and is an offset (not overrun / underrun).
    pub fn time_offset_usable(&self) -> Option<i16> {
        self.time_offset_min
            .filter(|&m| m != Self::TIME_OFFSET_OVERRUN && m != Self::TIME_OFFSET_UNDERRUN)
    }

    /// The user-facing time, Base Time + Time Offset (GLS v1.0 §3.1.1.4), taking a missing Time Offset
    /// as 0.
    ///
    /// `None` when the offset is overrun / underrun or the Base Time is incomplete. A sensor sends the
    /// offset only in the first record of a transfer and when it changes, so a collector that tracks the
    /// last offset seen should call [`Self::user_facing_time_or`] instead.
    pub fn user_facing_time(&self) -> Option<DateTime> {
        self.user_facing_time_or(0)
    }

    /// Like [`Self::user_facing_time`], using `carried` (the offset last received from this sensor) when
    /// this record has no Time Offset.
    pub fn user_facing_time_or(&self, carried: i16) -> Option<DateTime> {
        let offset = self.time_offset_min.unwrap_or(carried);
        if offset == Self::TIME_OFFSET_OVERRUN || offset == Self::TIME_OFFSET_UNDERRUN {
            return None;
        }
        self.base_time.add_minutes(i32::from(offset))
    }
}

impl<'a> Codec<'a> for GlucoseMeasurement<'a> {
    const UUID: u16 = 0x2A18;

    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let flags = *bytes.first().ok_or(Error::DecodeEmpty)?;
        let mut r = Reader::new(bytes);
        // Check the whole length the flags call for first, so the error names it (not the first short
        // field).
        r.require(Self::required_len(flags))?;
        r.u8()?;
        let sequence_number = r.u16()?;
        let base_time = DateTime::read(&mut r)?;
        let time_offset_min = if has(flags, Self::FLAG_TIME_OFFSET) {
            Some(r.i16()?)
        } else {
            None
        };
        let concentration = if has(flags, Self::FLAG_CONCENTRATION) {
            let value = r.sfloat()?;
            let type_location = r.u8()?;
            Some(Concentration {
                value,
                // The units bit qualifies the concentration only (GLS v1.0 §3.1.1.1).
                unit: if has(flags, Self::FLAG_UNITS_MOL_PER_L) {
                    ConcentrationUnit::MolPerL
                } else {
                    ConcentrationUnit::KgPerL
                },
                sample_type: SampleType(type_location & 0x0F),
                sample_location: SampleLocation(type_location >> 4),
            })
        } else {
            None
        };
        let sensor_status = if has(flags, Self::FLAG_SENSOR_STATUS) {
            Some(SensorStatus(r.u16()?))
        } else {
            None
        };
        Ok(GlucoseMeasurement {
            flags,
            sequence_number,
            base_time,
            time_offset_min,
            concentration,
            sensor_status,
            context_follows: has(flags, Self::FLAG_CONTEXT_FOLLOWS),
            trailing: r.rest(),
        })
    }

    fn buffer_len(&self) -> usize {
        Self::required_len(self.wire_flags()).saturating_add(self.trailing.len())
    }

    fn defined_len(&self) -> usize {
        Self::required_len(self.wire_flags())
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, self.buffer_len())?;
        w.u8(self.wire_flags())?;
        w.u16(self.sequence_number)?;
        self.base_time.write(&mut w)?;
        if let Some(offset) = self.time_offset_min {
            w.i16(offset)?;
        }
        if let Some(c) = &self.concentration {
            w.sfloat(c.value)?;
            w.u8(pack_nibbles(c.sample_type.0, c.sample_location.0)?)?;
        }
        if let Some(status) = self.sensor_status {
            w.u16(status.0)?;
        }
        w.put(self.trailing)?;
        Ok(w.written())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Glucose Measurement Context 0x2A34
// ---------------------------------------------------------------------------------------------------------

/// Carbohydrate ID and amount (context flag bit 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Carbohydrate {
    /// Which meal.
    pub id: CarbohydrateId,
    /// The amount in kg (GLS.TS expects exponent −3, i.e. grams).
    pub value: SFloat,
}

/// Tester and Health, one octet on the wire (context flag bit 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TesterHealth {
    /// Low nibble.
    pub tester: Tester,
    /// High nibble.
    pub health: Health,
}

/// Exercise Duration and Intensity (context flag bit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Exercise {
    /// Seconds; 0xFFFF ([`Exercise::DURATION_OVERRUN`]) means "longer than can be sent".
    pub duration_s: u16,
    /// Percent, as sent (not range-checked: GLP/COL/GLF/BI asks to pass values through).
    pub intensity_pct: u8,
}

impl Exercise {
    /// Exercise Duration "overrun" (GATT XML).
    pub const DURATION_OVERRUN: u16 = 0xFFFF;

    /// `true` when the duration is the overrun value.
    pub fn is_duration_overrun(&self) -> bool {
        self.duration_s == Self::DURATION_OVERRUN
    }
}

/// Medication ID and amount (context flag bit 4, unit from bit 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Medication {
    /// Which medication.
    pub id: MedicationId,
    /// The amount in `unit`.
    pub value: SFloat,
    /// kg or L, from flag bit 5.
    pub unit: MedicationUnit,
}

/// Glucose Measurement Context (0x2A34, GLS v1.0 §3.2): extra information about the measurement with the
/// same sequence number, notified after it when that measurement's flag bit 4 is set.
///
/// Layout: Flags, Sequence Number (u16), [Extended Flags (u8), bit 7], [Carbohydrate ID (u8) + Carbohydrate
/// (SFLOAT kg), bit 0], [Meal (u8), bit 1], [Tester-Health (u8), bit 2], [Exercise Duration (u16 s) +
/// Intensity (u8 %), bit 3], [Medication ID (u8) + Medication (SFLOAT kg or L), bit 4], [HbA1c (SFLOAT %),
/// bit 6]; 3 to 17 octets, then any trailing octets. Note that the Extended Flags come first on the wire
/// although their flag is bit 7.
///
/// # Flags on encode
/// Bits 0–4, 6 and 7 are derived from the fields, bit 5 from `medication.unit` when a medication is present;
/// bit 5 without a medication is taken from `flags`, so that `emit(parse(x)) == x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GlucoseContext<'a> {
    /// The flags octet as received.
    pub flags: u8,
    /// Equals the sequence number of the measurement this context belongs to.
    pub sequence_number: u16,
    /// Extended Flags (bit 7); every bit is reserved in GLS v1.0, kept as received (GLP/COL/GLF/BI-06).
    pub extended_flags: Option<u8>,
    /// Carbohydrate ID and amount (bit 0).
    pub carbohydrate: Option<Carbohydrate>,
    /// Meal (bit 1).
    pub meal: Option<Meal>,
    /// Tester and Health (bit 2).
    pub tester_health: Option<TesterHealth>,
    /// Exercise duration and intensity (bit 3).
    pub exercise: Option<Exercise>,
    /// Medication ID, amount and unit (bits 4 and 5).
    pub medication: Option<Medication>,
    /// HbA1c in percent (bit 6).
    pub hba1c: Option<SFloat>,
    /// Octets after the defined fields, kept as received (GLP/COL/GLF/BI-10).
    pub trailing: &'a [u8],
}

impl GlucoseContext<'_> {
    /// Flag bit 0: Carbohydrate ID and Carbohydrate present.
    pub const FLAG_CARBOHYDRATE: u8 = 0x01;
    /// Flag bit 1: Meal present.
    pub const FLAG_MEAL: u8 = 0x02;
    /// Flag bit 2: Tester-Health present.
    pub const FLAG_TESTER_HEALTH: u8 = 0x04;
    /// Flag bit 3: Exercise Duration and Intensity present.
    pub const FLAG_EXERCISE: u8 = 0x08;
    /// Flag bit 4: Medication ID and Medication present.
    pub const FLAG_MEDICATION: u8 = 0x10;
    /// Flag bit 5: medication in litres (clear: kilograms).
    pub const FLAG_MEDICATION_LITERS: u8 = 0x20;
    /// Flag bit 6: HbA1c present.
    pub const FLAG_HBA1C: u8 = 0x40;
    /// Flag bit 7: Extended Flags present.
    pub const FLAG_EXTENDED_FLAGS: u8 = 0x80;
    /// The length with no optional field.
    pub const MIN_LEN: usize = 3;
    /// The length with every optional field and no trailing octets.
    pub const MAX_LEN: usize = 17;

    /// A context with only the sequence number (flags 0).
    pub fn new(sequence_number: u16) -> Self {
        GlucoseContext {
            flags: 0,
            sequence_number,
            extended_flags: None,
            carbohydrate: None,
            meal: None,
            tester_health: None,
            exercise: None,
            medication: None,
            hba1c: None,
            trailing: &[],
        }
    }

    /// The length of the defined fields that `flags` calls for (3..=17).
    pub const fn required_len(flags: u8) -> usize {
        Self::MIN_LEN
            + len_if(flags, Self::FLAG_EXTENDED_FLAGS, 1)
            + len_if(flags, Self::FLAG_CARBOHYDRATE, 1 + SFloat::LEN)
            + len_if(flags, Self::FLAG_MEAL, 1)
            + len_if(flags, Self::FLAG_TESTER_HEALTH, 1)
            + len_if(flags, Self::FLAG_EXERCISE, 3)
            + len_if(flags, Self::FLAG_MEDICATION, 1 + SFloat::LEN)
            + len_if(flags, Self::FLAG_HBA1C, SFloat::LEN)
    }

    /// The flags octet [`Codec::emit`] sends: presence bits from the fields, the rest from `flags`.
    pub fn wire_flags(&self) -> u8 {
        let mut f = self.flags;
        f = with(f, Self::FLAG_CARBOHYDRATE, self.carbohydrate.is_some());
        f = with(f, Self::FLAG_MEAL, self.meal.is_some());
        f = with(f, Self::FLAG_TESTER_HEALTH, self.tester_health.is_some());
        f = with(f, Self::FLAG_EXERCISE, self.exercise.is_some());
        f = with(f, Self::FLAG_MEDICATION, self.medication.is_some());
        if let Some(m) = &self.medication {
            f = with(f, Self::FLAG_MEDICATION_LITERS, m.unit == MedicationUnit::L);
        }
        f = with(f, Self::FLAG_HBA1C, self.hba1c.is_some());
        with(f, Self::FLAG_EXTENDED_FLAGS, self.extended_flags.is_some())
    }
}

impl<'a> Codec<'a> for GlucoseContext<'a> {
    const UUID: u16 = 0x2A34;

    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let flags = *bytes.first().ok_or(Error::DecodeEmpty)?;
        let mut r = Reader::new(bytes);
        r.require(Self::required_len(flags))?;
        r.u8()?;
        let sequence_number = r.u16()?;
        let extended_flags = if has(flags, Self::FLAG_EXTENDED_FLAGS) {
            Some(r.u8()?)
        } else {
            None
        };
        let carbohydrate = if has(flags, Self::FLAG_CARBOHYDRATE) {
            Some(Carbohydrate {
                id: CarbohydrateId(r.u8()?),
                value: r.sfloat()?,
            })
        } else {
            None
        };
        let meal = if has(flags, Self::FLAG_MEAL) {
            Some(Meal(r.u8()?))
        } else {
            None
        };
        let tester_health = if has(flags, Self::FLAG_TESTER_HEALTH) {
            let b = r.u8()?;
            Some(TesterHealth {
                tester: Tester(b & 0x0F),
                health: Health(b >> 4),
            })
        } else {
            None
        };
        let exercise = if has(flags, Self::FLAG_EXERCISE) {
            Some(Exercise {
                duration_s: r.u16()?,
                intensity_pct: r.u8()?,
            })
        } else {
            None
        };
        let medication = if has(flags, Self::FLAG_MEDICATION) {
            Some(Medication {
                id: MedicationId(r.u8()?),
                value: r.sfloat()?,
                unit: if has(flags, Self::FLAG_MEDICATION_LITERS) {
                    MedicationUnit::L
                } else {
                    MedicationUnit::Kg
                },
            })
        } else {
            None
        };
        let hba1c = if has(flags, Self::FLAG_HBA1C) {
            Some(r.sfloat()?)
        } else {
            None
        };
        Ok(GlucoseContext {
            flags,
            sequence_number,
            extended_flags,
            carbohydrate,
            meal,
            tester_health,
            exercise,
            medication,
            hba1c,
            trailing: r.rest(),
        })
    }

    fn buffer_len(&self) -> usize {
        Self::required_len(self.wire_flags()).saturating_add(self.trailing.len())
    }

    fn defined_len(&self) -> usize {
        Self::required_len(self.wire_flags())
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, self.buffer_len())?;
        w.u8(self.wire_flags())?;
        w.u16(self.sequence_number)?;
        if let Some(x) = self.extended_flags {
            w.u8(x)?;
        }
        if let Some(c) = &self.carbohydrate {
            w.u8(c.id.0)?;
            w.sfloat(c.value)?;
        }
        if let Some(m) = self.meal {
            w.u8(m.0)?;
        }
        if let Some(th) = &self.tester_health {
            w.u8(pack_nibbles(th.tester.0, th.health.0)?)?;
        }
        if let Some(e) = &self.exercise {
            w.u16(e.duration_s)?;
            w.u8(e.intensity_pct)?;
        }
        if let Some(m) = &self.medication {
            w.u8(m.id.0)?;
            w.sfloat(m.value)?;
        }
        if let Some(h) = self.hba1c {
            w.sfloat(h)?;
        }
        w.put(self.trailing)?;
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ieee11073::Number;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn dt(year: u16, month: u8, day: u8, hours: u8, minutes: u8, seconds: u8) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hours,
            minutes,
            seconds,
        }
    }

    fn finite(s: SFloat) -> (i32, i8) {
        match s.0 {
            Number::Finite { mantissa, exponent } => (mantissa, exponent),
            other => panic!("not finite: {other:?}"),
        }
    }

    /// smoltcp-style construct: emit into a buffer pre-filled with 0xA5 and check every octet is written.
    fn emit_exact<'a, T: Codec<'a>>(v: &T, expected: &[u8]) {
        let mut buf = vec![0xA5; expected.len() + 4];
        let n = v.emit(&mut buf).unwrap();
        assert_eq!(n, expected.len());
        assert_eq!(v.buffer_len(), expected.len());
        assert_eq!(&buf[..n], expected);
        assert!(buf[n..].iter().all(|&b| b == 0xA5));
    }

    // ----- Glucose Measurement 0x2A18 -----------------------------------------------------------------

    /// GLS v1.0 §3.1, every optional field (Nordic GlucoseMeasurementDataCallbackTest, flags 0x1B):
    /// offset −5 min, 30 kg/L, capillary plasma from a finger, status bits 0, 2, 8, context follows.
    #[test]
    fn measurement_full_nordic() {
        let bytes = hex("1B0100E307021B0B0A1EFBFF1E00120501");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.flags, 0x1B);
        assert_eq!(m.sequence_number, 1);
        assert_eq!(m.base_time.to_string(), "2019-02-27T11:10:30");
        assert_eq!(m.time_offset_min, Some(-5));
        assert_eq!(
            m.user_facing_time().unwrap().to_string(),
            "2019-02-27T11:05:30"
        );
        let c = m.concentration.unwrap();
        assert_eq!(finite(c.value), (30, 0));
        assert_eq!(c.unit, ConcentrationUnit::KgPerL);
        assert_eq!(c.unit.symbol(), "kg/L");
        assert_eq!(c.sample_type, SampleType::CAPILLARY_PLASMA);
        assert_eq!(c.sample_type.name(), Some("capillary plasma"));
        assert_eq!(c.sample_location, SampleLocation::FINGER);
        let s = m.sensor_status.unwrap();
        assert_eq!(s.0, 261);
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            [
                "device battery low",
                "sample size insufficient",
                "sensor temperature too low"
            ]
        );
        assert!(!s.contains(SensorStatus::GENERAL_DEVICE_FAULT));
        assert!(m.context_follows);
        assert!(m.trailing.is_empty());
        assert_eq!(m.to_vec(), bytes);
    }

    /// Construct the same record from fields: flags come from the fields.
    #[test]
    fn measurement_full_construct() {
        let m = GlucoseMeasurement {
            time_offset_min: Some(-5),
            concentration: Some(Concentration {
                value: SFloat::new(30, 0).unwrap(),
                unit: ConcentrationUnit::KgPerL,
                sample_type: SampleType::CAPILLARY_PLASMA,
                sample_location: SampleLocation::FINGER,
            }),
            sensor_status: Some(
                SensorStatus::DEVICE_BATTERY_LOW
                    | SensorStatus::SAMPLE_SIZE_INSUFFICIENT
                    | SensorStatus::TEMPERATURE_TOO_LOW,
            ),
            context_follows: true,
            ..GlucoseMeasurement::new(1, dt(2019, 2, 27, 11, 10, 30))
        };
        assert_eq!(m.wire_flags(), 0x1B);
        emit_exact(&m, &hex("1B0100E307021B0B0A1EFBFF1E00120501"));
    }

    /// Nordic onInvalidDataReceived: flags 0x1B need 17 octets; the error names the flags' length.
    #[test]
    fn measurement_truncated_for_flags() {
        let e = GlucoseMeasurement::parse(&hex("1B0000E207041A0B091E1E00120501")).unwrap_err();
        assert_eq!(e, Error::DecodeTruncated { need: 17, got: 15 });
        let e = GlucoseMeasurement::parse(&hex("0001")).unwrap_err();
        assert_eq!(e, Error::DecodeTruncated { need: 10, got: 2 });
        assert_eq!(
            GlucoseMeasurement::parse(&[]).unwrap_err(),
            Error::DecodeEmpty
        );
    }

    /// CCGlucose testGlucoseMeasurementWithoutAnnunciation: 90 mg/dL as 90e-5 kg/L.
    #[test]
    fn measurement_ccglucose_90_mg_dl() {
        let bytes = hex("030100E007091507000000005AB011");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 1);
        assert_eq!(m.base_time.to_string(), "2016-09-21T07:00:00");
        assert_eq!(m.time_offset_min, Some(0));
        let c = m.concentration.unwrap();
        assert_eq!(finite(c.value), (90, -5));
        assert_eq!(c.sample_type, SampleType::CAPILLARY_WHOLE_BLOOD);
        assert_eq!(c.sample_location, SampleLocation::FINGER);
        assert_eq!(m.sensor_status, None);
        assert!(!m.context_follows);
        assert_eq!(m.to_vec(), bytes);
    }

    /// Contour Next One (healthcare-codex testRawInput[0]): Base Time UTC, offset −420 min, control
    /// solution, location not available.
    #[test]
    fn measurement_contour_control_solution() {
        let bytes = hex("133100E2070A060F2F325CFE7EB0FA");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 49);
        assert_eq!(m.base_time.to_string(), "2018-10-06T15:47:50");
        assert_eq!(m.time_offset_min, Some(-420));
        assert_eq!(
            m.user_facing_time().unwrap().to_string(),
            "2018-10-06T08:47:50"
        );
        let c = m.concentration.unwrap();
        assert_eq!(finite(c.value), (126, -5));
        assert_eq!(c.sample_type, SampleType::CONTROL_SOLUTION);
        assert_eq!(c.sample_location, SampleLocation::NOT_AVAILABLE);
        assert!(m.context_follows);
        assert_eq!(m.to_vec(), bytes);
    }

    /// healthcare-codex testRawInput[4]: Time Offset present but 0.
    #[test]
    fn measurement_zero_offset() {
        let bytes = hex("133500E2070A0A11000000007CB0F1");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 53);
        assert_eq!(m.base_time.to_string(), "2018-10-10T17:00:00");
        assert_eq!(m.time_offset_min, Some(0));
        assert_eq!(m.user_facing_time(), Some(m.base_time));
        let c = m.concentration.unwrap();
        assert_eq!(finite(c.value), (124, -5));
        assert_eq!(
            (c.sample_type, c.sample_location),
            (SampleType(1), SampleLocation(15))
        );
        assert_eq!(m.to_vec(), bytes);
    }

    /// healthcare-codex testGloucoseData: +8 min clock correction.
    #[test]
    fn measurement_positive_offset() {
        let bytes = hex("03B600E5070C010A360E080070B0F1");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 182);
        assert_eq!(m.time_offset_min, Some(8));
        assert_eq!(
            m.user_facing_time().unwrap().to_string(),
            "2021-12-01T11:02:14"
        );
        assert_eq!(finite(m.concentration.unwrap().value), (112, -5));
        assert!(!m.context_follows);
        assert_eq!(m.to_vec(), bytes);
    }

    /// bluetooth-sig-python valid_test_data[0]: the minimum 10-octet record.
    #[test]
    fn measurement_minimum() {
        let bytes = hex("002A00E807030F0E1E2D");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m, GlucoseMeasurement::new(42, dt(2024, 3, 15, 14, 30, 45)));
        emit_exact(
            &GlucoseMeasurement::new(42, dt(2024, 3, 15, 14, 30, 45)),
            &bytes,
        );
        // No offset field: the Base Time is the user-facing time unless the caller carries one.
        assert_eq!(m.user_facing_time(), Some(m.base_time));
        assert_eq!(
            m.user_facing_time_or(60).unwrap().to_string(),
            "2024-03-15T15:30:45"
        );
    }

    /// bluetooth-sig-python: status annunciation without a concentration (flags 0x08) is legal.
    #[test]
    fn measurement_status_without_concentration() {
        let bytes = hex("080100E807010F0A1E000100");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 1);
        assert_eq!(m.concentration, None);
        assert_eq!(m.sensor_status, Some(SensorStatus::DEVICE_BATTERY_LOW));
        assert_eq!(
            m.sensor_status.unwrap().names().collect::<Vec<_>>(),
            ["device battery low"]
        );
        assert_eq!(m.to_vec(), bytes);
    }

    /// GLS v1.0 §3.1.1.5: NaN when the value is unavailable — not 2047.
    #[test]
    fn measurement_nan_concentration() {
        let bytes = hex("020900E0070915070000FF0711");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        let c = m.concentration.unwrap();
        assert_eq!(c.value, SFloat::NAN);
        assert_eq!(c.value.value(), None);
        assert_eq!(m.to_vec(), bytes);
    }

    /// mol/L (flag bit 2): GLS.TS CN/BV 0.1 mmol/L resolution, 5.5 mmol/L = 55e-4 mol/L.
    #[test]
    fn measurement_mol_per_l() {
        let m = GlucoseMeasurement {
            concentration: Some(Concentration {
                value: SFloat::new(55, -4).unwrap(),
                unit: ConcentrationUnit::MolPerL,
                sample_type: SampleType::CAPILLARY_PLASMA,
                sample_location: SampleLocation::ALTERNATE_SITE_TEST,
            }),
            ..GlucoseMeasurement::new(3, dt(2025, 1, 2, 3, 4, 5))
        };
        let bytes = m.to_vec();
        assert_eq!(bytes, hex("060300E907010203040537C022"));
        let back = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(back.concentration.unwrap().unit, ConcentrationUnit::MolPerL);
        assert_eq!(back, GlucoseMeasurement { flags: 0x06, ..m });
    }

    /// The units bit without a concentration qualifies nothing, but is sent back as received.
    #[test]
    fn measurement_units_bit_without_concentration_round_trips() {
        let bytes = hex("042A00E807030F0E1E2D");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.concentration, None);
        assert_eq!(m.to_vec(), bytes);
    }

    #[test]
    fn time_offset_overrun_and_underrun_are_not_offsets() {
        let mut m = GlucoseMeasurement::new(0, dt(2024, 1, 1, 0, 0, 0));
        m.time_offset_min = Some(0x7FFF);
        assert!(m.is_time_offset_overrun());
        assert_eq!(m.time_offset_usable(), None);
        assert_eq!(m.user_facing_time(), None);
        m.time_offset_min = Some(i16::MIN);
        assert!(m.is_time_offset_underrun());
        assert_eq!(m.time_offset_usable(), None);
        assert_eq!(m.user_facing_time(), None);
        m.time_offset_min = Some(-60);
        assert_eq!(m.time_offset_usable(), Some(-60));
        assert_eq!(
            m.user_facing_time().unwrap().to_string(),
            "2023-12-31T23:00:00"
        );
        // Wire form of the overrun: FF 7F.
        let bytes = hex("012A00E807030F0E1E2DFF7F");
        assert!(
            GlucoseMeasurement::parse(&bytes)
                .unwrap()
                .is_time_offset_overrun()
        );
    }

    #[test]
    fn measurement_out_of_range_base_time_is_rejected() {
        let e = GlucoseMeasurement::parse(&hex("002A00E8070D0F0E1E2D")).unwrap_err();
        assert_eq!(
            e,
            Error::DecodeOutOfRange {
                field: "month",
                value: 13
            }
        );
    }

    #[test]
    fn nibble_above_15_is_unrepresentable() {
        let m = GlucoseMeasurement {
            concentration: Some(Concentration {
                value: SFloat::NAN,
                unit: ConcentrationUnit::KgPerL,
                sample_type: SampleType(16),
                sample_location: SampleLocation::FINGER,
            }),
            ..GlucoseMeasurement::new(0, dt(2024, 1, 1, 0, 0, 0))
        };
        let mut buf = [0u8; 32];
        assert_eq!(m.emit(&mut buf), Err(Error::EncodeUnrepresentable));
    }

    #[test]
    fn emit_into_short_buffer_fails() {
        let m = GlucoseMeasurement::new(42, dt(2024, 3, 15, 14, 30, 45));
        let mut buf = [0u8; 9];
        assert_eq!(m.emit(&mut buf), Err(Error::EncodeBufferFull { need: 10 }));
    }

    /// GLP.TS 1.0.7 GLP/COL/GLF/BI-01-I: flags 0xEB (reserved bits 5–7 set) — the defined fields are
    /// reported and the reserved bits kept.
    #[test]
    fn glf_bi_01_reserved_flag_bits() {
        let bytes = hex("EB0A00E00709150700000500" /* offset +5 */);
        let bytes = [bytes, hex("5AB0110000")].concat();
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.reserved_flags(), 0xE0);
        assert_eq!(m.sequence_number, 10);
        assert_eq!(m.time_offset_min, Some(5));
        assert_eq!(finite(m.concentration.unwrap().value), (90, -5));
        assert_eq!(m.sensor_status, Some(SensorStatus(0)));
        assert!(!m.context_follows);
        assert_eq!(m.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-02-I: reserved Type (13) and Sample Location (11) nibbles, flags 0x0A.
    #[test]
    fn glf_bi_02_reserved_type_location() {
        let bytes = hex("0A0800E00709150700005AB0BDFFFF");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 8);
        let c = m.concentration.unwrap();
        assert_eq!(finite(c.value), (90, -5));
        assert_eq!(c.sample_type, SampleType(13));
        assert!(c.sample_type.is_reserved());
        assert_eq!(c.sample_location, SampleLocation(11));
        assert!(c.sample_location.is_reserved());
        assert_eq!(m.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-03-I: Sensor Status 0xFFFF — all twelve defined conditions, reserved 0xF000 kept.
    #[test]
    fn glf_bi_03_status_all_ones() {
        let bytes = hex("0A0800E00709150700005AB0BDFFFF");
        let s = GlucoseMeasurement::parse(&bytes)
            .unwrap()
            .sensor_status
            .unwrap();
        assert_eq!(s.0, 0xFFFF);
        assert_eq!(s.names().count(), 12);
        assert_eq!(
            s.names().nth(5),
            Some("result higher than device can process")
        );
        assert_eq!(
            s.names().nth(6),
            Some("result lower than device can process")
        );
        assert_eq!(s.reserved_bits(), 0xF000);
        assert!(s.contains(SensorStatus::RESULT_TOO_HIGH | SensorStatus::TIME_FAULT));
    }

    /// GLP/COL/GLF/BI-04-I: two octets after the defined fields are kept, not rejected.
    #[test]
    fn glf_bi_04_trailing_octets() {
        let bytes = hex("020700E00709150700005AB011AABB");
        let m = GlucoseMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.sequence_number, 7);
        assert_eq!(finite(m.concentration.unwrap().value), (90, -5));
        assert_eq!(m.trailing, [0xAA, 0xBB]);
        assert_eq!(m.to_vec(), bytes);
    }

    // ----- Glucose Measurement Context 0x2A34 ---------------------------------------------------------

    /// GLS v1.0 §3.2, every field (Nordic onGlucoseMeasurementContextReceived_full, flags 0xFF).
    #[test]
    fn context_full_nordic() {
        let bytes = hex("FF0000B303640004123C003204D3F459F1");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 0);
        assert_eq!(c.extended_flags, Some(0xB3));
        let carb = c.carbohydrate.unwrap();
        assert_eq!(carb.id, CarbohydrateId::DINNER);
        assert_eq!(carb.value.value(), Some(100.0));
        assert_eq!(c.meal, Some(Meal::CASUAL));
        let th = c.tester_health.unwrap();
        assert_eq!(th.tester, Tester::HEALTH_CARE_PROFESSIONAL);
        assert_eq!(th.health, Health::MINOR_HEALTH_ISSUES);
        assert_eq!(
            c.exercise,
            Some(Exercise {
                duration_s: 60,
                intensity_pct: 50
            })
        );
        let med = c.medication.unwrap();
        assert_eq!(med.id, MedicationId::LONG_ACTING_INSULIN);
        assert_eq!(med.id.name(), Some("long acting insulin"));
        assert_eq!(med.value.value(), Some(123.5));
        assert_eq!(med.unit, MedicationUnit::L);
        assert_eq!(c.hba1c.unwrap().value(), Some(34.5));
        assert_eq!(c.to_vec(), bytes);
    }

    /// Construct the full context from fields.
    #[test]
    fn context_full_construct() {
        let c = GlucoseContext {
            extended_flags: Some(0xB3),
            carbohydrate: Some(Carbohydrate {
                id: CarbohydrateId::DINNER,
                value: SFloat::new(100, 0).unwrap(),
            }),
            meal: Some(Meal::CASUAL),
            tester_health: Some(TesterHealth {
                tester: Tester::HEALTH_CARE_PROFESSIONAL,
                health: Health::MINOR_HEALTH_ISSUES,
            }),
            exercise: Some(Exercise {
                duration_s: 60,
                intensity_pct: 50,
            }),
            medication: Some(Medication {
                id: MedicationId::LONG_ACTING_INSULIN,
                value: SFloat::new(1235, -1).unwrap(),
                unit: MedicationUnit::L,
            }),
            hba1c: Some(SFloat::new(345, -1).unwrap()),
            ..GlucoseContext::new(0)
        };
        assert_eq!(c.wire_flags(), 0xFF);
        emit_exact(&c, &hex("FF0000B303640004123C003204D3F459F1"));
    }

    /// Nordic onGlucoseMeasurementContextReceived_empty: flags 0 and 14 trailing zero octets.
    #[test]
    fn context_empty_with_trailing() {
        let bytes = hex("0001000000000000000000000000000000");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 1);
        assert_eq!(c.trailing.len(), 14);
        assert_eq!(
            GlucoseContext { trailing: &[], ..c },
            GlucoseContext::new(1)
        );
        assert_eq!(c.to_vec(), bytes);
    }

    /// Nordic onInvalidDataReceived: flags 0xFF need 17 octets, 5 present.
    #[test]
    fn context_truncated_for_flags() {
        let e = GlucoseContext::parse(&hex("FF0000B303")).unwrap_err();
        assert_eq!(e, Error::DecodeTruncated { need: 17, got: 5 });
        assert_eq!(GlucoseContext::parse(&[]).unwrap_err(), Error::DecodeEmpty);
        assert_eq!(
            GlucoseContext::parse(&[0, 1]).unwrap_err(),
            Error::DecodeTruncated { need: 3, got: 2 }
        );
    }

    /// UHNBGMController BGMParserTests "more information": tester low nibble, health high nibble (0x42).
    #[test]
    fn context_uhn_more_information() {
        let bytes = hex("0F0E00015A00024208074B");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 14);
        let carb = c.carbohydrate.unwrap();
        assert_eq!(carb.id, CarbohydrateId::BREAKFAST);
        assert_eq!(carb.value.value(), Some(90.0));
        assert_eq!(c.meal, Some(Meal::POSTPRANDIAL));
        assert_eq!(
            c.tester_health,
            Some(TesterHealth {
                tester: Tester::HEALTH_CARE_PROFESSIONAL,
                health: Health::UNDER_STRESS
            })
        );
        assert_eq!(
            c.exercise,
            Some(Exercise {
                duration_s: 1800,
                intensity_pct: 75
            })
        );
        assert_eq!(
            (c.medication, c.hba1c, c.extended_flags),
            (None, None, None)
        );
        assert_eq!(c.to_vec(), bytes);
    }

    /// UHNBGMController "lots of information": flags 0x5F, medication in kg, HbA1c.
    #[test]
    fn context_uhn_lots_of_information() {
        let bytes = hex("5F0F00015A00024208074B020F000600");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 15);
        let med = c.medication.unwrap();
        assert_eq!(med.id, MedicationId::SHORT_ACTING_INSULIN);
        assert_eq!(med.value.value(), Some(15.0));
        assert_eq!(med.unit, MedicationUnit::Kg);
        assert_eq!(med.unit.symbol(), "kg");
        assert_eq!(c.hba1c.unwrap().value(), Some(6.0));
        assert_eq!(c.to_vec(), bytes);
    }

    /// bluetooth-sig-python: the minimum 3-octet context, and exercise only.
    #[test]
    fn context_minimum_and_exercise_only() {
        let bytes = hex("002A00");
        assert_eq!(
            GlucoseContext::parse(&bytes).unwrap(),
            GlucoseContext::new(42)
        );
        emit_exact(&GlucoseContext::new(42), &bytes);
        let bytes = hex("086400840350");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 100);
        assert_eq!(
            c.exercise,
            Some(Exercise {
                duration_s: 900,
                intensity_pct: 80
            })
        );
        assert!(!c.exercise.unwrap().is_duration_overrun());
        assert_eq!(c.to_vec(), bytes);
    }

    /// The medication-unit bit without a medication is sent back as received.
    #[test]
    fn context_unit_bit_without_medication_round_trips() {
        let bytes = hex("202A00");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.medication, None);
        assert_eq!(c.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-06-I: flags 0xFF with reserved Extended Flags — kept, the rest decoded.
    #[test]
    fn glf_bi_06_context_reserved_flags_and_extended() {
        let bytes = hex("FF0500FF01320000F13C0032013200FE00");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.flags, 0xFF);
        assert_eq!(c.extended_flags, Some(0xFF));
        assert_eq!(c.sequence_number, 5);
        assert_eq!(c.carbohydrate.unwrap().id, CarbohydrateId::BREAKFAST);
        assert_eq!(c.carbohydrate.unwrap().value.value(), Some(50.0));
        assert_eq!(c.meal, Some(Meal(0)));
        assert_eq!(
            c.tester_health,
            Some(TesterHealth {
                tester: Tester::SELF,
                health: Health::NOT_AVAILABLE
            })
        );
        assert_eq!(c.medication.unwrap().unit, MedicationUnit::L);
        assert_eq!(c.hba1c.unwrap().value(), Some(254.0));
        assert_eq!(c.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-07-I: reserved Carbohydrate ID (0x08), flags 0x7F.
    #[test]
    fn glf_bi_07_reserved_carb_id() {
        let bytes = hex("7F0600083200011F3C0032010FD03C00");
        let c = GlucoseContext::parse(&bytes).unwrap();
        let carb = c.carbohydrate.unwrap();
        assert_eq!(carb.id, CarbohydrateId(8));
        assert!(carb.id.is_reserved());
        assert_eq!(carb.value.value(), Some(50.0));
        assert_eq!(c.meal, Some(Meal::PREPRANDIAL));
        assert_eq!(c.medication.unwrap().id, MedicationId::RAPID_ACTING_INSULIN);
        assert_eq!(c.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-08-I: reserved Meal values (6, the i-SENS ketone marker, and 0xFF).
    #[test]
    fn glf_bi_08_reserved_meal() {
        let bytes = hex("02310006");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.sequence_number, 49);
        assert_eq!(c.meal, Some(Meal(6)));
        assert!(c.meal.unwrap().is_reserved());
        assert_eq!(c.to_vec(), bytes);
        let bytes = hex("7F0600013200FF1F3C0032010FD03C00");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.meal, Some(Meal(0xFF)));
        assert_eq!(c.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-09-I: reserved Medication ID (0xFF), flags 0x7F.
    #[test]
    fn glf_bi_09_reserved_medication_id() {
        let bytes = hex("7F0600013200011F3C0032FF0FD03C00");
        let c = GlucoseContext::parse(&bytes).unwrap();
        let med = c.medication.unwrap();
        assert_eq!(med.id, MedicationId(0xFF));
        assert!(med.id.is_reserved());
        assert_eq!(med.unit, MedicationUnit::L);
        assert_eq!(finite(med.value), (15, -3));
        assert_eq!(c.hba1c.unwrap().value(), Some(60.0));
        assert_eq!(c.to_vec(), bytes);
    }

    /// GLP/COL/GLF/BI-10-I: a context with octets after the defined fields.
    #[test]
    fn glf_bi_10_context_trailing_octets() {
        let bytes = hex("023100030102");
        let c = GlucoseContext::parse(&bytes).unwrap();
        assert_eq!(c.meal, Some(Meal::FASTING));
        assert_eq!(c.trailing, [0x01, 0x02]);
        assert_eq!(c.to_vec(), bytes);
    }

    // ----- Glucose Feature 0x2A51 ---------------------------------------------------------------------

    /// Nordic GlucoseFeatureDataCallbackTest: 0x03F0, bits 4–9.
    #[test]
    fn feature_nordic() {
        let f = GlucoseFeature::parse(&hex("F003")).unwrap();
        assert_eq!(f.0, 1008);
        assert_eq!(
            f.names().collect::<Vec<_>>(),
            [
                "strip type error",
                "result high-low",
                "temperature high-low",
                "read interrupt",
                "general device fault",
                "time fault"
            ]
        );
        assert!(!f.contains(GlucoseFeature::MULTIPLE_BOND));
        emit_exact(&f, &hex("F003"));
    }

    /// bluetooth-sig-python: 0x0403, bits 0, 1 and 10.
    #[test]
    fn feature_multiple_bond() {
        let f = GlucoseFeature::parse(&hex("0304")).unwrap();
        assert_eq!(f.0, 1027);
        assert_eq!(
            f.names().collect::<Vec<_>>(),
            ["low battery", "sensor malfunction", "multiple bond"]
        );
        let built = GlucoseFeature::LOW_BATTERY
            | GlucoseFeature::SENSOR_MALFUNCTION
            | GlucoseFeature::MULTIPLE_BOND;
        emit_exact(&built, &hex("0304"));
    }

    #[test]
    fn feature_errors() {
        assert_eq!(GlucoseFeature::parse(&[]), Err(Error::DecodeEmpty));
        assert_eq!(
            GlucoseFeature::parse(&[0]),
            Err(Error::DecodeTruncated { need: 2, got: 1 })
        );
        // Octets after the two defined ones are ignored.
        assert_eq!(
            GlucoseFeature::parse(&[1, 0, 9]),
            Ok(GlucoseFeature::LOW_BATTERY)
        );
    }

    /// GLP/COL/GLF/BI-11-I (GLP v1.0 §4.6): feature 0xFFFF — the eleven defined bits, reserved 0xF800 kept.
    #[test]
    fn glf_bi_11_feature_all_ones() {
        let f = GlucoseFeature::parse(&hex("FFFF")).unwrap();
        assert_eq!(f.names().count(), 11);
        assert_eq!(f.reserved_bits(), 0xF800);
        assert_eq!(f.to_vec(), [0xFF, 0xFF]);
    }

    // ----- Properties ---------------------------------------------------------------------------------

    fn arb_datetime() -> impl Strategy<Value = DateTime> {
        (
            prop_oneof![Just(0u16), 1582u16..=9999],
            0u8..=12,
            0u8..=31,
            0u8..=23,
            0u8..=59,
            0u8..=59,
        )
            .prop_map(|(year, month, day, hours, minutes, seconds)| DateTime {
                year,
                month,
                day,
                hours,
                minutes,
                seconds,
            })
    }

    fn arb_sfloat() -> impl Strategy<Value = SFloat> {
        any::<u16>().prop_map(SFloat::from_raw)
    }

    fn arb_concentration() -> impl Strategy<Value = Concentration> {
        (arb_sfloat(), any::<bool>(), 0u8..16, 0u8..16).prop_map(|(value, mol, t, l)| {
            Concentration {
                value,
                unit: if mol {
                    ConcentrationUnit::MolPerL
                } else {
                    ConcentrationUnit::KgPerL
                },
                sample_type: SampleType(t),
                sample_location: SampleLocation(l),
            }
        })
    }

    fn arb_measurement() -> impl Strategy<Value = GlucoseMeasurement<'static>> {
        (
            any::<u8>(),
            any::<u16>(),
            arb_datetime(),
            proptest::option::of(any::<i16>()),
            proptest::option::of(arb_concentration()),
            proptest::option::of(any::<u16>().prop_map(SensorStatus)),
            any::<bool>(),
        )
            .prop_map(
                |(flags, seq, base_time, offset, concentration, status, ctx)| {
                    let mut m = GlucoseMeasurement {
                        flags,
                        time_offset_min: offset,
                        concentration,
                        sensor_status: status,
                        context_follows: ctx,
                        ..GlucoseMeasurement::new(seq, base_time)
                    };
                    // A decoded value's flags are what was sent; make the generated one's agree.
                    m.flags = m.wire_flags();
                    m
                },
            )
    }

    fn arb_context() -> impl Strategy<Value = GlucoseContext<'static>> {
        (
            (any::<u8>(), any::<u16>(), proptest::option::of(any::<u8>())),
            proptest::option::of((any::<u8>(), arb_sfloat())),
            proptest::option::of(any::<u8>()),
            proptest::option::of((0u8..16, 0u8..16)),
            proptest::option::of((any::<u16>(), any::<u8>())),
            proptest::option::of((any::<u8>(), arb_sfloat(), any::<bool>())),
            proptest::option::of(arb_sfloat()),
        )
            .prop_map(|((flags, seq, ext), carb, meal, th, ex, med, hba1c)| {
                let mut c = GlucoseContext {
                    flags,
                    extended_flags: ext,
                    carbohydrate: carb.map(|(id, value)| Carbohydrate {
                        id: CarbohydrateId(id),
                        value,
                    }),
                    meal: meal.map(Meal),
                    tester_health: th.map(|(t, h)| TesterHealth {
                        tester: Tester(t),
                        health: Health(h),
                    }),
                    exercise: ex.map(|(duration_s, intensity_pct)| Exercise {
                        duration_s,
                        intensity_pct,
                    }),
                    medication: med.map(|(id, value, l)| Medication {
                        id: MedicationId(id),
                        value,
                        unit: if l {
                            MedicationUnit::L
                        } else {
                            MedicationUnit::Kg
                        },
                    }),
                    hba1c,
                    ..GlucoseContext::new(seq)
                };
                c.flags = c.wire_flags();
                c
            })
    }

    /// Flags, sequence number and a valid Base Time, then arbitrary octets: reaches the optional fields.
    fn measurement_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<u8>(),
            any::<u16>(),
            arb_datetime(),
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(flags, seq, base, tail)| {
                let mut v = vec![flags];
                v.extend_from_slice(&seq.to_le_bytes());
                v.extend_from_slice(&base.to_vec());
                v.extend_from_slice(&tail);
                v
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn measurement_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = GlucoseMeasurement::parse(&bytes);
        }

        #[test]
        fn context_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = GlucoseContext::parse(&bytes);
        }

        #[test]
        fn feature_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = GlucoseFeature::parse(&bytes);
        }

        #[test]
        fn measurement_value_round_trip(m in arb_measurement()) {
            let bytes = m.to_vec();
            prop_assert_eq!(bytes.len(), m.buffer_len());
            prop_assert_eq!(GlucoseMeasurement::parse(&bytes), Ok(m));
        }

        #[test]
        fn context_value_round_trip(c in arb_context()) {
            let bytes = c.to_vec();
            prop_assert_eq!(bytes.len(), c.buffer_len());
            prop_assert_eq!(GlucoseContext::parse(&bytes), Ok(c));
        }

        #[test]
        fn feature_value_round_trip(raw in any::<u16>()) {
            let f = GlucoseFeature(raw);
            prop_assert_eq!(GlucoseFeature::parse(&f.to_vec()), Ok(f));
        }

        /// emit(parse(x)) == x, and parse fails only for want of the octets the flags call for.
        #[test]
        fn measurement_bytes_round_trip(bytes in measurement_like_bytes()) {
            let need = GlucoseMeasurement::required_len(bytes[0]);
            match GlucoseMeasurement::parse(&bytes) {
                Ok(m) => prop_assert_eq!(m.to_vec(), bytes),
                Err(e) => prop_assert_eq!(e, Error::DecodeTruncated { need, got: bytes.len() }),
            }
        }

        #[test]
        fn context_bytes_round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..24)) {
            let need = GlucoseContext::required_len(bytes[0]);
            match GlucoseContext::parse(&bytes) {
                Ok(c) => prop_assert_eq!(c.to_vec(), bytes),
                Err(e) => prop_assert_eq!(e, Error::DecodeTruncated { need, got: bytes.len() }),
            }
        }
    }
}
