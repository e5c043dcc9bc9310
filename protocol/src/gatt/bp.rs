//! Blood Pressure Service (BLS 1.1): Blood Pressure Measurement (0x2A35), Intermediate Cuff Pressure
//! (0x2A36) and Blood Pressure Feature (0x2A49).
//!
//! 2A35 and 2A36 share one layout (GSS "Intermediate Cuff Pressure … has the same format as the Blood
//! Pressure Measurement characteristic"), so both are read and written by one private `Layout`:
//!
//! ```text
//! Flags u8 | slot 1 SFLOAT | slot 2 SFLOAT | slot 3 SFLOAT | [Time Stamp, Date Time 7]
//!          | [Pulse Rate SFLOAT bpm] | [User ID u8] | [Measurement Status u16] | trailing…
//! Flags: b0 unit (0 mmHg, 1 kPa) · b1 Time Stamp · b2 Pulse Rate · b3 User ID · b4 Measurement Status
//!        · b5–b7 RFU (kept as received)
//! ```
//!
//! In 2A35 the slots are systolic, diastolic and mean arterial pressure; in 2A36 slot 1 is the current
//! cuff pressure and slots 2–3 are "unused" (GSS), so their four octets are kept raw and re-sent as is.
//!
//! Real devices bend the layout: Beurer's BM48/BM59/BM85/ELITE900 family sends the pulse rate and status
//! big-endian and always includes a User ID (derdilla/blood-pressure-monitor-fl PR #735). The codec takes
//! that as data ([`BpQuirks`]); which device needs it is the gateway's knowledge, not this crate's.

use super::time::DateTime;
use super::{Codec, Reader, Writer};
use crate::Error;
use crate::ieee11073::SFloat;

/// Flag bits shared by 2A35 and 2A36 (BLS 1.1 §3.1.1.1; GSS `blood_pressure_measurement.yaml`).
mod flag {
    /// b0: pressures in kPa (else mmHg).
    pub const KPA: u8 = 0x01;
    /// b1: Time Stamp present.
    pub const TIME_STAMP: u8 = 0x02;
    /// b2: Pulse Rate present.
    pub const PULSE_RATE: u8 = 0x04;
    /// b3: User ID present.
    pub const USER_ID: u8 = 0x08;
    /// b4: Measurement Status present.
    pub const MEASUREMENT_STATUS: u8 = 0x10;
    /// b0–b4: the bits this crate derives on encode.
    pub const DEFINED: u8 = KPA | TIME_STAMP | PULSE_RATE | USER_ID | MEASUREMENT_STATUS;
    /// b5–b7: reserved for future use (2B34 Enhanced BPM gives b5/b6 meanings; 2A35/2A36 do not).
    pub const RESERVED: u8 = !DEFINED;
}

/// The User ID value for "unknown user" (BLS 1.1 §3.1.1.5: 255 is reserved for an unknown user).
pub const USER_ID_UNKNOWN: u8 = 0xFF;

/// The length of the mandatory part: Flags + three SFLOAT slots.
const FIXED_LEN: usize = 1 + 3 * SFloat::LEN;

/// The unit of every pressure in one value (flag b0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PressureUnit {
    /// Millimetres of mercury (flag b0 = 0).
    #[default]
    MmHg,
    /// Kilopascal (flag b0 = 1); the SFLOAT is in Pa × 10³ (GSS: M = 1, d = 3, b = 0).
    KPa,
}

impl PressureUnit {
    /// The unit flag b0 selects.
    pub fn from_flags(flags: u8) -> PressureUnit {
        if flags & flag::KPA != 0 {
            PressureUnit::KPa
        } else {
            PressureUnit::MmHg
        }
    }

    /// The flag bit this unit sets (0x01 for kPa, 0 for mmHg).
    pub fn flag_bit(self) -> u8 {
        match self {
            PressureUnit::MmHg => 0,
            PressureUnit::KPa => flag::KPA,
        }
    }

    /// The unit's name as in the `decode` contract: `"mmHg"` or `"kPa"`.
    pub fn name(self) -> &'static str {
        match self {
            PressureUnit::MmHg => "mmHg",
            PressureUnit::KPa => "kPa",
        }
    }
}

/// The Measurement Status field's pulse-rate range (bits 3–4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PulseRateRange {
    /// 0: pulse rate within range.
    WithinRange,
    /// 1: pulse rate exceeds the upper limit.
    AboveUpperLimit,
    /// 2: pulse rate is below the lower limit.
    BelowLowerLimit,
    /// 3: reserved for future use (the raw bits stay in [`MeasurementStatus`]).
    Reserved,
}

impl PulseRateRange {
    /// The range's name: `"within"`, `"above upper limit"`, `"below lower limit"` or `"reserved"`.
    pub fn name(self) -> &'static str {
        match self {
            PulseRateRange::WithinRange => "within",
            PulseRateRange::AboveUpperLimit => "above upper limit",
            PulseRateRange::BelowLowerLimit => "below lower limit",
            PulseRateRange::Reserved => "reserved",
        }
    }

    /// The two-bit field value (0..=3).
    pub fn bits(self) -> u16 {
        match self {
            PulseRateRange::WithinRange => 0,
            PulseRateRange::AboveUpperLimit => 1,
            PulseRateRange::BelowLowerLimit => 2,
            PulseRateRange::Reserved => 3,
        }
    }
}

/// Measurement Status (BLS 1.1 §3.1.1.6), kept whole so reserved bits 6–15 round-trip.
///
/// Bit positions are the specification's (b0 body movement … b5 improper position). derdilla's decoder
/// read every bit one position too high until PR #730; the tests pin the vectors that caught it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MeasurementStatus(pub u16);

impl MeasurementStatus {
    /// b0: body movement detected during the measurement.
    pub const BODY_MOVEMENT: MeasurementStatus = MeasurementStatus(1 << 0);
    /// b1: cuff too loose.
    pub const CUFF_TOO_LOOSE: MeasurementStatus = MeasurementStatus(1 << 1);
    /// b2: irregular pulse detected.
    pub const IRREGULAR_PULSE: MeasurementStatus = MeasurementStatus(1 << 2);
    /// b3–b4: the pulse-rate range field (see [`MeasurementStatus::pulse_rate_range`]).
    pub const PULSE_RATE_RANGE_MASK: MeasurementStatus = MeasurementStatus(0b11 << 3);
    /// b5: improper measurement position.
    pub const IMPROPER_POSITION: MeasurementStatus = MeasurementStatus(1 << 5);
    /// b6–b15: reserved for future use.
    pub const RESERVED_MASK: MeasurementStatus = MeasurementStatus(0xFFC0);

    /// `true` when every bit of `other` is set.
    pub fn contains(self, other: MeasurementStatus) -> bool {
        self.0 & other.0 == other.0
    }

    /// b0: body movement detected.
    pub fn body_movement(self) -> bool {
        self.contains(Self::BODY_MOVEMENT)
    }

    /// b1: cuff too loose.
    pub fn cuff_too_loose(self) -> bool {
        self.contains(Self::CUFF_TOO_LOOSE)
    }

    /// b2: irregular pulse detected.
    pub fn irregular_pulse(self) -> bool {
        self.contains(Self::IRREGULAR_PULSE)
    }

    /// b5: improper measurement position.
    pub fn improper_position(self) -> bool {
        self.contains(Self::IMPROPER_POSITION)
    }

    /// b3–b4: the pulse-rate range. `(status >> 3) & 0b11`, with the shift applied before the mask (the
    /// precedence slip `status & (1 << 4) >> 3` in derdilla PR #730 masked bit 1 instead).
    pub fn pulse_rate_range(self) -> PulseRateRange {
        match (self.0 >> 3) & 0b11 {
            0 => PulseRateRange::WithinRange,
            1 => PulseRateRange::AboveUpperLimit,
            2 => PulseRateRange::BelowLowerLimit,
            _ => PulseRateRange::Reserved,
        }
    }

    /// This status with bits 3–4 replaced by `range`.
    pub fn with_pulse_rate_range(self, range: PulseRateRange) -> MeasurementStatus {
        MeasurementStatus((self.0 & !Self::PULSE_RATE_RANGE_MASK.0) | (range.bits() << 3))
    }

    /// The reserved bits 6–15 as received.
    pub fn reserved(self) -> u16 {
        self.0 & Self::RESERVED_MASK.0
    }

    /// The annunciations this status raises, in bit order: the names of the set one-bit flags, and the
    /// pulse-rate range when it is not "within range" (`"pulse rate above upper limit"`, `"pulse rate
    /// below lower limit"`, `"pulse rate range reserved"`). Reserved bits 6–15 have no name.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        const LOW: [(MeasurementStatus, &str); 3] = [
            (MeasurementStatus::BODY_MOVEMENT, "body movement"),
            (MeasurementStatus::CUFF_TOO_LOOSE, "cuff too loose"),
            (MeasurementStatus::IRREGULAR_PULSE, "irregular pulse"),
        ];
        let range = match self.pulse_rate_range() {
            PulseRateRange::WithinRange => None,
            PulseRateRange::AboveUpperLimit => Some("pulse rate above upper limit"),
            PulseRateRange::BelowLowerLimit => Some("pulse rate below lower limit"),
            PulseRateRange::Reserved => Some("pulse rate range reserved"),
        };
        LOW.into_iter()
            .filter(move |(bit, _)| self.contains(*bit))
            .map(|(_, name)| name)
            .chain(range)
            .chain(self.improper_position().then_some("improper position"))
    }
}

impl core::ops::BitOr for MeasurementStatus {
    type Output = MeasurementStatus;

    fn bitor(self, rhs: MeasurementStatus) -> MeasurementStatus {
        MeasurementStatus(self.0 | rhs.0)
    }
}

/// Deviations from the specification a collector can be told to expect, as data rather than device names
/// (the gateway maps an advertised name to a set of quirks).
///
/// The Beurer BM48 / BM59 / BM85 / ELITE900 family needs both flags: pulse rate and Measurement Status
/// arrive big-endian, and a User ID octet is present whether or not flag b3 says so (derdilla/
/// blood-pressure-monitor-fl PR #735, tested on a BM85; the model list comes from Beurer's own app; PR
/// #737 pins a BM85 status recording). The same devices send MAP 0 and set RFU flag b6; both are kept as
/// received and need no quirk to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BpQuirks {
    /// Pulse Rate (SFLOAT) and Measurement Status (u16) are sent most significant octet first.
    pub big_endian_pulse_and_status: bool,
    /// A User ID octet follows the Pulse Rate slot even when flag b3 is clear.
    pub user_id_always_present: bool,
}

impl BpQuirks {
    /// No quirks: the specification's layout.
    pub const NONE: BpQuirks = BpQuirks {
        big_endian_pulse_and_status: false,
        user_id_always_present: false,
    };
}

/// The length `flags` call for under `quirks`, before any field is read (so a truncation error names it).
fn required_len(flags: u8, quirks: BpQuirks) -> usize {
    let mut need = FIXED_LEN;
    if flags & flag::TIME_STAMP != 0 {
        need += DateTime::LEN;
    }
    if flags & flag::PULSE_RATE != 0 {
        need += SFloat::LEN;
    }
    if flags & flag::USER_ID != 0 || quirks.user_id_always_present {
        need += 1;
    }
    if flags & flag::MEASUREMENT_STATUS != 0 {
        need += 2;
    }
    need
}

/// The wire layout 2A35 and 2A36 share, with the three pressure slots as raw octets: each public type
/// gives them its own meaning.
#[derive(Debug, Clone, Copy)]
struct Layout<'a> {
    flags: u8,
    slots: [[u8; 2]; 3],
    timestamp: Option<DateTime>,
    pulse_rate: Option<SFloat>,
    user_id: Option<u8>,
    measurement_status: Option<MeasurementStatus>,
    trailing: &'a [u8],
}

impl<'a> Layout<'a> {
    fn parse(bytes: &'a [u8], quirks: BpQuirks) -> Result<Self, Error> {
        let flags = *bytes.first().ok_or(Error::DecodeEmpty)?;
        let mut r = Reader::new(bytes);
        r.require(required_len(flags, quirks))?;
        r.u8()?; // the flags, already read
        let slots = [r.array()?, r.array()?, r.array()?];
        let timestamp = if flags & flag::TIME_STAMP != 0 {
            Some(DateTime::read(&mut r)?)
        } else {
            None
        };
        let pulse_rate = if flags & flag::PULSE_RATE != 0 {
            let b = r.array()?;
            Some(if quirks.big_endian_pulse_and_status {
                SFloat::from_raw(u16::from_be_bytes(b))
            } else {
                SFloat::from_le_bytes(b)
            })
        } else {
            None
        };
        let user_id = if flags & flag::USER_ID != 0 || quirks.user_id_always_present {
            Some(r.u8()?)
        } else {
            None
        };
        let measurement_status = if flags & flag::MEASUREMENT_STATUS != 0 {
            let b = r.array()?;
            Some(MeasurementStatus(if quirks.big_endian_pulse_and_status {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }))
        } else {
            None
        };
        Ok(Layout {
            flags,
            slots,
            timestamp,
            pulse_rate,
            user_id,
            measurement_status,
            trailing: r.rest(),
        })
    }

    /// `flags` with presence bits b1–b4 derived from the optional fields; unit and reserved bits as held.
    fn wire_flags(&self) -> u8 {
        let mut f = self.flags & (flag::KPA | flag::RESERVED);
        if self.timestamp.is_some() {
            f |= flag::TIME_STAMP;
        }
        if self.pulse_rate.is_some() {
            f |= flag::PULSE_RATE;
        }
        if self.user_id.is_some() {
            f |= flag::USER_ID;
        }
        if self.measurement_status.is_some() {
            f |= flag::MEASUREMENT_STATUS;
        }
        f
    }

    fn len(&self) -> usize {
        required_len(self.wire_flags(), BpQuirks::NONE).saturating_add(self.trailing.len())
    }

    /// Writes the specification's layout (little-endian, User ID only when present) whatever quirks the
    /// value was decoded with.
    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        let mut w = Writer::new(out, self.len())?;
        w.u8(self.wire_flags())?;
        for slot in &self.slots {
            w.put(slot)?;
        }
        if let Some(t) = &self.timestamp {
            t.write(&mut w)?;
        }
        if let Some(p) = self.pulse_rate {
            w.sfloat(p)?;
        }
        if let Some(u) = self.user_id {
            w.u8(u)?;
        }
        if let Some(s) = self.measurement_status {
            w.u16(s.0)?;
        }
        w.put(self.trailing)?;
        Ok(w.written())
    }
}

/// `Some(id)` unless the User ID is absent or 255 ("unknown user").
fn known(user_id: Option<u8>) -> Option<u8> {
    user_id.filter(|&id| id != USER_ID_UNKNOWN)
}

/// Blood Pressure Measurement (0x2A35, Indicate): one completed measurement.
///
/// Encoding derives flag bits b0–b4 from `unit` and the optional fields and keeps `flags`' reserved bits
/// b5–b7, so `emit(parse(x)) == x` for every `x` [`Codec::parse`] accepts. A value decoded with
/// [`BloodPressureMeasurement::parse_with_quirks`] re-encodes in the specification's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct BloodPressureMeasurement<'a> {
    /// The Flags octet as received (reserved bits b5–b7 round-trip; b0–b4 are re-derived on encode).
    pub flags: u8,
    /// The unit of systolic, diastolic and MAP (flag b0).
    pub unit: PressureUnit,
    /// Systolic pressure. NaN when the measurement failed ("Err" on the cuff: derdilla #80 saw all three
    /// pressures as 0x07FF with status 0) — not 2047.
    pub systolic: SFloat,
    /// Diastolic pressure.
    pub diastolic: SFloat,
    /// Mean arterial pressure (Beurer's family sends 0 here).
    pub mean_arterial_pressure: SFloat,
    /// Time Stamp (flag b1); the year, month or day may be 0 ("not known").
    pub timestamp: Option<DateTime>,
    /// Pulse rate in beats per minute (flag b2).
    pub pulse_rate: Option<SFloat>,
    /// User ID (flag b3); 255 is "unknown user", see [`BloodPressureMeasurement::known_user_id`].
    pub user_id: Option<u8>,
    /// Measurement Status (flag b4).
    pub measurement_status: Option<MeasurementStatus>,
    /// Octets after the defined fields, kept as GLP.TS-style robustness asks.
    pub trailing: &'a [u8],
}

impl<'a> BloodPressureMeasurement<'a> {
    /// A measurement with the three pressures and no optional field.
    pub fn new(
        unit: PressureUnit,
        systolic: SFloat,
        diastolic: SFloat,
        mean_arterial_pressure: SFloat,
    ) -> Self {
        BloodPressureMeasurement {
            flags: unit.flag_bit(),
            unit,
            systolic,
            diastolic,
            mean_arterial_pressure,
            timestamp: None,
            pulse_rate: None,
            user_id: None,
            measurement_status: None,
            trailing: &[],
        }
    }

    /// Decodes a value from a device with known deviations (see [`BpQuirks`]). With
    /// [`BpQuirks::NONE`] this is [`Codec::parse`].
    ///
    /// # Errors
    /// As [`Codec::parse`]; the required length counts the User ID octet when
    /// [`BpQuirks::user_id_always_present`] is set.
    pub fn parse_with_quirks(bytes: &'a [u8], quirks: BpQuirks) -> Result<Self, Error> {
        Layout::parse(bytes, quirks).map(Self::from_layout)
    }

    /// The Flags octet [`Codec::emit`] writes: `unit`, presence of each optional field, reserved bits of
    /// `flags`.
    pub fn wire_flags(&self) -> u8 {
        self.layout().wire_flags()
    }

    /// The reserved flag bits b5–b7 as held.
    pub fn reserved_flags(&self) -> u8 {
        self.flags & flag::RESERVED
    }

    /// The User ID unless it is absent or 255 ("unknown user").
    pub fn known_user_id(&self) -> Option<u8> {
        known(self.user_id)
    }

    fn from_layout(l: Layout<'a>) -> Self {
        let [sys, dia, map] = l.slots;
        BloodPressureMeasurement {
            flags: l.flags,
            unit: PressureUnit::from_flags(l.flags),
            systolic: SFloat::from_le_bytes(sys),
            diastolic: SFloat::from_le_bytes(dia),
            mean_arterial_pressure: SFloat::from_le_bytes(map),
            timestamp: l.timestamp,
            pulse_rate: l.pulse_rate,
            user_id: l.user_id,
            measurement_status: l.measurement_status,
            trailing: l.trailing,
        }
    }

    fn layout(&self) -> Layout<'a> {
        Layout {
            flags: (self.flags & !flag::KPA) | self.unit.flag_bit(),
            slots: [
                self.systolic.to_le_bytes(),
                self.diastolic.to_le_bytes(),
                self.mean_arterial_pressure.to_le_bytes(),
            ],
            timestamp: self.timestamp,
            pulse_rate: self.pulse_rate,
            user_id: self.user_id,
            measurement_status: self.measurement_status,
            trailing: self.trailing,
        }
    }
}

impl<'a> Codec<'a> for BloodPressureMeasurement<'a> {
    const UUID: u16 = 0x2A35;

    /// Decodes by the specification (BLS 1.1 §3.1). Empty input is [`Error::DecodeEmpty`]; a value shorter
    /// than its flags require is [`Error::DecodeTruncated`] with that length (flags 0x03 call for 14).
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        Self::parse_with_quirks(bytes, BpQuirks::NONE)
    }

    fn buffer_len(&self) -> usize {
        self.layout().len()
    }

    fn defined_len(&self) -> usize {
        self.buffer_len().saturating_sub(self.trailing.len())
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        self.layout().emit(out)
    }
}

/// Intermediate Cuff Pressure (0x2A36, Notify): the cuff pressure while a measurement runs.
///
/// Same layout as 2A35: slot 1 is the current cuff pressure; slots 2–3 (diastolic, MAP) are "unused"
/// (GSS). Their four octets are kept in `unused` so that `emit(parse(x)) == x`; Nordic's test fills them
/// with 0x0000, other sensors may send anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct IntermediateCuffPressure<'a> {
    /// The Flags octet as received (reserved bits b5–b7 round-trip; b0–b4 are re-derived on encode).
    pub flags: u8,
    /// The unit of the cuff pressure (flag b0).
    pub unit: PressureUnit,
    /// Current cuff pressure (the systolic slot).
    pub cuff_pressure: SFloat,
    /// The unused diastolic and MAP slots, raw.
    pub unused: [u8; 4],
    /// Time Stamp (flag b1).
    pub timestamp: Option<DateTime>,
    /// Pulse rate in beats per minute (flag b2).
    pub pulse_rate: Option<SFloat>,
    /// User ID (flag b3); 255 is "unknown user".
    pub user_id: Option<u8>,
    /// Measurement Status (flag b4).
    pub measurement_status: Option<MeasurementStatus>,
    /// Octets after the defined fields.
    pub trailing: &'a [u8],
}

impl<'a> IntermediateCuffPressure<'a> {
    /// The unused slots [`IntermediateCuffPressure::new`] sends: SFLOAT NaN twice, so that a collector that
    /// wrongly reads them as pressures gets "no value" rather than 0.
    pub const UNUSED_NAN: [u8; 4] = [0xFF, 0x07, 0xFF, 0x07];

    /// A cuff-pressure notification with no optional field.
    pub fn new(unit: PressureUnit, cuff_pressure: SFloat) -> Self {
        IntermediateCuffPressure {
            flags: unit.flag_bit(),
            unit,
            cuff_pressure,
            unused: Self::UNUSED_NAN,
            timestamp: None,
            pulse_rate: None,
            user_id: None,
            measurement_status: None,
            trailing: &[],
        }
    }

    /// The Flags octet [`Codec::emit`] writes.
    pub fn wire_flags(&self) -> u8 {
        self.layout().wire_flags()
    }

    /// The reserved flag bits b5–b7 as held.
    pub fn reserved_flags(&self) -> u8 {
        self.flags & flag::RESERVED
    }

    /// The User ID unless it is absent or 255 ("unknown user").
    pub fn known_user_id(&self) -> Option<u8> {
        known(self.user_id)
    }

    fn layout(&self) -> Layout<'a> {
        let [a, b, c, d] = self.unused;
        Layout {
            flags: (self.flags & !flag::KPA) | self.unit.flag_bit(),
            slots: [self.cuff_pressure.to_le_bytes(), [a, b], [c, d]],
            timestamp: self.timestamp,
            pulse_rate: self.pulse_rate,
            user_id: self.user_id,
            measurement_status: self.measurement_status,
            trailing: self.trailing,
        }
    }
}

impl<'a> Codec<'a> for IntermediateCuffPressure<'a> {
    const UUID: u16 = 0x2A36;

    /// Decodes by the specification; errors as [`BloodPressureMeasurement`]'s.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        let l = Layout::parse(bytes, BpQuirks::NONE)?;
        let [cuff, [a, b], [c, d]] = l.slots;
        Ok(IntermediateCuffPressure {
            flags: l.flags,
            unit: PressureUnit::from_flags(l.flags),
            cuff_pressure: SFloat::from_le_bytes(cuff),
            unused: [a, b, c, d],
            timestamp: l.timestamp,
            pulse_rate: l.pulse_rate,
            user_id: l.user_id,
            measurement_status: l.measurement_status,
            trailing: l.trailing,
        })
    }

    fn buffer_len(&self) -> usize {
        self.layout().len()
    }

    fn defined_len(&self) -> usize {
        self.buffer_len().saturating_sub(self.trailing.len())
    }

    fn emit(&self, out: &mut [u8]) -> Result<usize, Error> {
        self.layout().emit(out)
    }
}

/// Blood Pressure Feature (0x2A49, Read): what the sensor can detect. Reserved bits 9–15 are kept.
///
/// BLS 1.0 defines bits 0–5; BLS 1.1 adds 6 E2E-CRC, 7 User Data Service, 8 user-facing time (Spezi
/// `BloodPressureFeature.swift`, im97mori `u2a49`). Octets after the two defined ones are tolerated and
/// ignored (the characteristic has no flags that could give them a meaning), so `emit(parse(x))` is `x`'s
/// first two octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BloodPressureFeature(pub u16);

impl BloodPressureFeature {
    /// The encoded size.
    pub const LEN: usize = 2;
    /// b0: body movement detection supported.
    pub const BODY_MOVEMENT_DETECTION: BloodPressureFeature = BloodPressureFeature(1 << 0);
    /// b1: cuff fit detection supported.
    pub const CUFF_FIT_DETECTION: BloodPressureFeature = BloodPressureFeature(1 << 1);
    /// b2: irregular pulse detection supported.
    pub const IRREGULAR_PULSE_DETECTION: BloodPressureFeature = BloodPressureFeature(1 << 2);
    /// b3: pulse rate range detection supported.
    pub const PULSE_RATE_RANGE_DETECTION: BloodPressureFeature = BloodPressureFeature(1 << 3);
    /// b4: measurement position detection supported.
    pub const MEASUREMENT_POSITION_DETECTION: BloodPressureFeature = BloodPressureFeature(1 << 4);
    /// b5: multiple bonds supported.
    pub const MULTIPLE_BONDS: BloodPressureFeature = BloodPressureFeature(1 << 5);
    /// b6: E2E-CRC supported (BLS 1.1).
    pub const E2E_CRC: BloodPressureFeature = BloodPressureFeature(1 << 6);
    /// b7: User Data Service supported (BLS 1.1).
    pub const USER_DATA_SERVICE: BloodPressureFeature = BloodPressureFeature(1 << 7);
    /// b8: user-facing time supported (BLS 1.1).
    pub const USER_FACING_TIME: BloodPressureFeature = BloodPressureFeature(1 << 8);
    /// b9–b15: reserved for future use.
    pub const RESERVED_MASK: BloodPressureFeature = BloodPressureFeature(0xFE00);

    /// The defined bits' names, indexed by bit number.
    const NAMES: [&'static str; 9] = [
        "body movement",
        "cuff fit",
        "irregular pulse",
        "pulse rate range",
        "measurement position",
        "multiple bonds",
        "E2E-CRC",
        "User Data Service",
        "user facing time",
    ];

    /// `true` when every bit of `other` is set.
    pub fn contains(self, other: BloodPressureFeature) -> bool {
        self.0 & other.0 == other.0
    }

    /// The reserved bits 9–15 as received.
    pub fn reserved(self) -> u16 {
        self.0 & Self::RESERVED_MASK.0
    }

    /// `(bit number, name)` of each set defined bit, in bit order.
    pub fn iter_named(self) -> impl Iterator<Item = (u8, &'static str)> {
        (0u8..)
            .zip(Self::NAMES)
            .filter(move |(bit, _)| self.0 & (1 << bit) != 0)
    }

    /// The names of the set defined bits, in bit order; reserved bits have none.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        self.iter_named().map(|(_, name)| name)
    }
}

impl core::ops::BitOr for BloodPressureFeature {
    type Output = BloodPressureFeature;

    fn bitor(self, rhs: BloodPressureFeature) -> BloodPressureFeature {
        BloodPressureFeature(self.0 | rhs.0)
    }
}

impl<'a> Codec<'a> for BloodPressureFeature {
    const UUID: u16 = 0x2A49;

    /// Empty input is [`Error::DecodeEmpty`]; one octet is `DecodeTruncated { need: 2, got: 1 }`.
    fn parse(bytes: &'a [u8]) -> Result<Self, Error> {
        if bytes.is_empty() {
            return Err(Error::DecodeEmpty);
        }
        let mut r = Reader::new(bytes);
        r.require(Self::LEN)?;
        Ok(BloodPressureFeature(r.u16()?))
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

    fn sf(mantissa: i32, exponent: i8) -> SFloat {
        SFloat::new(mantissa, exponent).unwrap()
    }

    /// Asserts the exact re-encoding: `to_vec(parse(x)) == x`, and `emit` into a buffer pre-filled with
    /// 0xA5 writes exactly `buffer_len` octets (smoltcp's construct test).
    fn assert_reencodes<'a, T: Codec<'a>>(value: &T, bytes: &[u8]) {
        assert_eq!(value.to_vec(), bytes);
        let mut buf = [0xA5u8; 32];
        let n = value.emit(&mut buf).unwrap();
        assert_eq!(n, value.buffer_len());
        assert_eq!(&buf[..n], bytes);
        assert!(buf[n..].iter().all(|&b| b == 0xA5));
    }

    /// gatt.json 2A35, Nordic Android-BLE-Common-Library `onBloodPressureMeasurementReceived_full`: every
    /// optional field, Time Stamp year 0 (unknown), status 0x0027.
    #[test]
    fn bpm_nordic_full_year_zero() {
        let bytes = hex("1E8A00580078000000041114293B3C00012700");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.flags, 0x1E);
        assert_eq!(m.unit, PressureUnit::MmHg);
        assert_eq!(m.systolic.value(), Some(138.0));
        assert_eq!(m.diastolic.value(), Some(88.0));
        assert_eq!(m.mean_arterial_pressure.value(), Some(120.0));
        let ts = m.timestamp.unwrap();
        assert_eq!(ts.year, 0);
        assert_eq!(ts.to_string(), "0000-04-17T20:41:59");
        assert_eq!(m.pulse_rate.unwrap().value(), Some(60.0));
        assert_eq!(m.user_id, Some(1));
        assert_eq!(m.known_user_id(), Some(1));
        assert_eq!(m.measurement_status, Some(MeasurementStatus(39)));
        assert!(m.trailing.is_empty());
        assert_reencodes(&m, &bytes);
    }

    /// gatt.json 2A35, Nordic `onBloodPressureMeasurementReceived_some`: kPa, exponent −1 SFLOATs,
    /// status 0x0012 (cuff too loose, pulse rate below lower limit).
    #[test]
    fn bpm_nordic_kpa() {
        let bytes = hex("15BDF00B009FF03C001200");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.unit, PressureUnit::KPa);
        assert_eq!(m.unit.name(), "kPa");
        assert_eq!(
            m.systolic.0,
            Number::Finite {
                mantissa: 189,
                exponent: -1
            }
        );
        assert_eq!(m.systolic.value(), Some(18.9));
        assert_eq!(m.diastolic.value(), Some(11.0));
        assert_eq!(m.mean_arterial_pressure.value(), Some(15.9));
        assert_eq!(m.timestamp, None);
        assert_eq!(m.pulse_rate.unwrap().value(), Some(60.0));
        assert_eq!(m.user_id, None);
        let status = m.measurement_status.unwrap();
        assert_eq!(status.0, 18);
        assert!(status.cuff_too_loose());
        assert_eq!(status.pulse_rate_range(), PulseRateRange::BelowLowerLimit);
        assert_eq!(
            status.names().collect::<Vec<_>>(),
            ["cuff too loose", "pulse rate below lower limit"]
        );
        assert_reencodes(&m, &bytes);
    }

    /// gatt.json 2A35, Nordic `onBloodPressureMeasurementReceived_minimal`: the 7-octet minimum.
    #[test]
    fn bpm_nordic_minimal() {
        let bytes = hex("00BDF00B009FF0");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.unit, PressureUnit::MmHg);
        assert_eq!(m.systolic.value(), Some(18.9));
        assert_eq!(m.diastolic.value(), Some(11.0));
        assert_eq!(m.mean_arterial_pressure.value(), Some(15.9));
        assert_eq!(
            (m.timestamp, m.pulse_rate, m.user_id, m.measurement_status),
            (None, None, None, None)
        );
        assert_reencodes(&m, &bytes);
    }

    /// gatt.json 2A35 invalid, Nordic `onInvalidDataReceived_noTimestamp`: flags 0x03 (kPa + Time Stamp)
    /// call for 14 octets; the error names 14 and 7, computed from the flags before any field is read.
    #[test]
    fn bpm_truncated_names_flag_length() {
        let bytes = hex("03020304050607");
        assert_eq!(
            BloodPressureMeasurement::parse(&bytes),
            Err(Error::DecodeTruncated { need: 14, got: 7 })
        );
        assert_eq!(
            BloodPressureMeasurement::parse(&[]),
            Err(Error::DecodeEmpty)
        );
        assert_eq!(
            BloodPressureMeasurement::parse(&[0x00]),
            Err(Error::DecodeTruncated { need: 7, got: 1 })
        );
        // Every optional field: 1 + 6 + 7 + 2 + 1 + 2 = 19.
        assert_eq!(
            BloodPressureMeasurement::parse(&[0x1E; 18]),
            Err(Error::DecodeTruncated { need: 19, got: 18 })
        );
    }

    /// gatt.json 2A35, derdilla `ble_measurement_data_test.dart` 'decodes sample data': flags 0x16.
    #[test]
    fn bpm_derdilla_sample() {
        let bytes = hex("167C0056006100E807060F11111B33000000");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.systolic.value(), Some(124.0));
        assert_eq!(m.diastolic.value(), Some(86.0));
        assert_eq!(m.mean_arterial_pressure.value(), Some(97.0));
        assert_eq!(m.timestamp.unwrap().to_string(), "2024-06-15T17:17:27");
        assert_eq!(m.pulse_rate.unwrap().value(), Some(51.0));
        assert_eq!(m.user_id, None);
        assert_eq!(m.measurement_status, Some(MeasurementStatus(0)));
        assert_eq!(m.measurement_status.unwrap().names().count(), 0);
        assert_reencodes(&m, &bytes);
    }

    /// gatt.json 2A35, derdilla 'decodes the measurement status flags': status 0x0027 is b0, b1, b2, b5 —
    /// at the specification's positions (derdilla read them one bit high until PR #730).
    #[test]
    fn bpm_status_0x0027_bits_at_spec_positions() {
        let bytes = hex("167C0056006100E807060F11111B33002700");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        let s = m.measurement_status.unwrap();
        assert_eq!(s.0, 0x0027);
        assert!(s.body_movement());
        assert!(s.cuff_too_loose());
        assert!(s.irregular_pulse());
        assert!(s.improper_position());
        assert_eq!(s.pulse_rate_range(), PulseRateRange::WithinRange);
        assert_eq!(s.pulse_rate_range().name(), "within");
        assert_eq!(s.reserved(), 0);
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            [
                "body movement",
                "cuff too loose",
                "irregular pulse",
                "improper position"
            ]
        );
        assert_reencodes(&m, &bytes);
    }

    /// gatt.json 2A35, derdilla 'pulse rate range' below: status 0x0010 is range 2 (below lower limit),
    /// and no one-bit flag.
    #[test]
    fn bpm_status_0x0010_pulse_rate_below() {
        let bytes = hex("167C0056006100E807060F11111B33001000");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        let s = m.measurement_status.unwrap();
        assert_eq!(s.0, 16);
        assert_eq!(s.pulse_rate_range(), PulseRateRange::BelowLowerLimit);
        assert_eq!(s.pulse_rate_range().name(), "below lower limit");
        assert!(
            !s.body_movement()
                && !s.cuff_too_loose()
                && !s.irregular_pulse()
                && !s.improper_position()
        );
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            ["pulse rate below lower limit"]
        );
        assert_reencodes(&m, &bytes);
    }

    /// BLS 1.1 §3.1.1.6: range values 1 and 3, reserved bits kept, `with_pulse_rate_range` replaces only
    /// bits 3–4.
    #[test]
    fn status_range_values_and_reserved_bits() {
        assert_eq!(
            MeasurementStatus(0x0008).pulse_rate_range(),
            PulseRateRange::AboveUpperLimit
        );
        assert_eq!(
            MeasurementStatus(0x0018).pulse_rate_range(),
            PulseRateRange::Reserved
        );
        let s = MeasurementStatus(0xFFC1).with_pulse_rate_range(PulseRateRange::AboveUpperLimit);
        assert_eq!(s.0, 0xFFC9);
        assert_eq!(s.reserved(), 0xFFC0);
        assert_eq!(
            s.names().collect::<Vec<_>>(),
            ["body movement", "pulse rate above upper limit"]
        );
        let built = MeasurementStatus::BODY_MOVEMENT | MeasurementStatus::IMPROPER_POSITION;
        assert_eq!(built.0, 0x0021);
    }

    /// derdilla #80: a failed measurement ("Err", "Err CUF") arrives as three SFLOAT NaN (0x07FF) with
    /// status 0. NaN has no value — it is not 2047 mmHg (QardioArm users saw 2047, ptylr/LibreArm #6).
    #[test]
    fn bpm_failed_measurement_is_nan_not_2047() {
        let bytes = hex("10FF07FF07FF070000");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        for p in [m.systolic, m.diastolic, m.mean_arterial_pressure] {
            assert_eq!(p, SFloat::NAN);
            assert_eq!(p.value(), None);
        }
        assert_eq!(m.measurement_status, Some(MeasurementStatus(0)));
        assert_reencodes(&m, &bytes);
    }

    /// GLP.TS GLF/BI-01/BI-04 robustness applied to BLS: reserved flag bits and trailing octets are kept
    /// and re-sent; User ID 255 is "unknown user".
    #[test]
    fn bpm_reserved_flags_trailing_and_unknown_user() {
        let bytes = hex("E8780050005D00FFAABB");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(m.reserved_flags(), 0xE0);
        assert_eq!(m.user_id, Some(USER_ID_UNKNOWN));
        assert_eq!(m.known_user_id(), None);
        assert_eq!(m.trailing, [0xAA, 0xBB]);
        assert_reencodes(&m, &bytes);
    }

    /// Encoding derives presence bits from the fields and keeps reserved bits, whatever `flags` says.
    #[test]
    fn bpm_encode_derives_presence_bits() {
        let mut m =
            BloodPressureMeasurement::new(PressureUnit::KPa, sf(189, -1), sf(110, -1), sf(159, -1));
        m.flags = 0x40 | flag::USER_ID; // stale User ID bit, reserved b6
        m.pulse_rate = Some(sf(60, 0));
        assert_eq!(m.wire_flags(), 0x45);
        let bytes = m.to_vec();
        assert_eq!(bytes, hex("45BDF06EF09FF03C00"));
        let back = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(back.unit, PressureUnit::KPa);
        assert_eq!(back.pulse_rate, m.pulse_rate);
        assert_eq!(back.user_id, None);
    }

    /// A too-small output buffer fails without writing (Writer's all-or-nothing contract).
    #[test]
    fn bpm_emit_buffer_full() {
        let bytes = hex("00BDF00B009FF0");
        let m = BloodPressureMeasurement::parse(&bytes).unwrap();
        let mut buf = [0xA5u8; 6];
        assert_eq!(m.emit(&mut buf), Err(Error::EncodeBufferFull { need: 7 }));
        assert_eq!(buf, [0xA5; 6]);
    }

    /// A Beurer-style value built from derdilla PR #735's description (pulse and status big-endian, User
    /// ID present without flag b3, MAP 0, RFU flag b6 set): flags 0x56, 124/86/0 mmHg, 2024-06-15
    /// 17:17:27, pulse 72 sent `00 48`, user 1, status irregular pulse sent `00 04` (PR #737: "the flags of
    /// these devices sit in the second status byte").
    #[test]
    fn bpm_beurer_quirks() {
        let bytes = hex("567C0056000000E807060F11111B0048010004");
        let quirks = BpQuirks {
            big_endian_pulse_and_status: true,
            user_id_always_present: true,
        };
        let m = BloodPressureMeasurement::parse_with_quirks(&bytes, quirks).unwrap();
        assert_eq!(m.flags, 0x56);
        assert_eq!(m.reserved_flags(), 0x40);
        assert_eq!(m.systolic.value(), Some(124.0));
        assert_eq!(m.diastolic.value(), Some(86.0));
        assert_eq!(m.mean_arterial_pressure.value(), Some(0.0));
        assert_eq!(m.timestamp.unwrap().to_string(), "2024-06-15T17:17:27");
        assert_eq!(m.pulse_rate.unwrap().value(), Some(72.0));
        assert_eq!(m.user_id, Some(1));
        let s = m.measurement_status.unwrap();
        assert_eq!(s, MeasurementStatus::IRREGULAR_PULSE);
        assert!(m.trailing.is_empty());

        // Read by the specification the same octets decode to nonsense: pulse 0x4800 is -2048 x 10^4, the
        // User ID octet becomes the status' low byte and the real status byte is left over.
        let spec = BloodPressureMeasurement::parse(&bytes).unwrap();
        assert_eq!(
            spec.pulse_rate.unwrap().0,
            Number::Finite {
                mantissa: -2048,
                exponent: 4
            }
        );
        assert_eq!(spec.user_id, None);
        assert_eq!(spec.measurement_status, Some(MeasurementStatus(0x0001)));
        assert_eq!(spec.trailing, [0x04]);

        // Re-encoding writes the specification's layout (flag b3 set, little-endian), which a plain parse
        // reads back to the same measurement.
        let spec_bytes = m.to_vec();
        assert_eq!(spec_bytes, hex("5E7C0056000000E807060F11111B4800010400"));
        let again = BloodPressureMeasurement::parse(&spec_bytes).unwrap();
        assert_eq!(
            BloodPressureMeasurement {
                flags: m.wire_flags(),
                ..m
            },
            again
        );

        // The always-present User ID counts towards the required length.
        assert_eq!(
            BloodPressureMeasurement::parse_with_quirks(&bytes[..18], quirks),
            Err(Error::DecodeTruncated { need: 19, got: 18 })
        );
    }

    /// Each quirk on its own: only the User ID, or only the byte order.
    #[test]
    fn bpm_single_quirks() {
        let only_uid = BpQuirks {
            user_id_always_present: true,
            ..BpQuirks::NONE
        };
        let bytes = hex("00780050005D0002");
        let m = BloodPressureMeasurement::parse_with_quirks(&bytes, only_uid).unwrap();
        assert_eq!(m.user_id, Some(2));
        assert_eq!(
            BloodPressureMeasurement::parse_with_quirks(&hex("00780050005D00"), only_uid),
            Err(Error::DecodeTruncated { need: 8, got: 7 })
        );
        let only_be = BpQuirks {
            big_endian_pulse_and_status: true,
            ..BpQuirks::NONE
        };
        let bytes = hex("14780050005D0000480020");
        let m = BloodPressureMeasurement::parse_with_quirks(&bytes, only_be).unwrap();
        assert_eq!(m.pulse_rate.unwrap().value(), Some(72.0));
        assert_eq!(m.user_id, None);
        assert_eq!(
            m.measurement_status,
            Some(MeasurementStatus::IMPROPER_POSITION)
        );
    }

    /// gatt.json 2A36, Nordic `IntermediateCuffPressureDataCallbackTest` full: year-0 Time Stamp, unused
    /// slots 0x0000.
    #[test]
    fn icp_nordic_full() {
        let bytes = hex("1E0400000000000000041114293B3C00012700");
        let c = IntermediateCuffPressure::parse(&bytes).unwrap();
        assert_eq!(c.unit, PressureUnit::MmHg);
        assert_eq!(c.cuff_pressure.value(), Some(4.0));
        assert_eq!(c.unused, [0, 0, 0, 0]);
        assert_eq!(c.timestamp.unwrap().to_string(), "0000-04-17T20:41:59");
        assert_eq!(c.pulse_rate.unwrap().value(), Some(60.0));
        assert_eq!(c.user_id, Some(1));
        assert_eq!(c.measurement_status, Some(MeasurementStatus(39)));
        assert_reencodes(&c, &bytes);
    }

    /// gatt.json 2A36, Nordic `onIntermediateCuffPressureReceived_some`: kPa.
    #[test]
    fn icp_nordic_kpa() {
        let bytes = hex("156FF0000000003C001200");
        let c = IntermediateCuffPressure::parse(&bytes).unwrap();
        assert_eq!(c.unit, PressureUnit::KPa);
        assert_eq!(c.cuff_pressure.value(), Some(11.1));
        assert_eq!(c.pulse_rate.unwrap().value(), Some(60.0));
        assert_eq!(c.user_id, None);
        assert_eq!(c.measurement_status, Some(MeasurementStatus(18)));
        assert_reencodes(&c, &bytes);
    }

    /// gatt.json 2A36, Nordic `onIntermediateCuffPressureReceived_minimal`.
    #[test]
    fn icp_nordic_minimal() {
        let bytes = hex("00D7F000000000");
        let c = IntermediateCuffPressure::parse(&bytes).unwrap();
        assert_eq!(c.cuff_pressure.value(), Some(21.5));
        assert_reencodes(&c, &bytes);
    }

    /// gatt.json 2A36 invalid, Nordic `onInvalidDataReceived_noTimestamp`.
    #[test]
    fn icp_truncated_names_flag_length() {
        assert_eq!(
            IntermediateCuffPressure::parse(&hex("03020304050607")),
            Err(Error::DecodeTruncated { need: 14, got: 7 })
        );
        assert_eq!(
            IntermediateCuffPressure::parse(&[]),
            Err(Error::DecodeEmpty)
        );
    }

    /// GSS: the diastolic and MAP slots of 2A36 are "unused"; whatever a sensor puts there is skipped for
    /// meaning and re-sent exactly.
    #[test]
    fn icp_unused_slots_round_trip_raw() {
        let bytes = hex("007800DEADBEEF");
        let c = IntermediateCuffPressure::parse(&bytes).unwrap();
        assert_eq!(c.cuff_pressure.value(), Some(120.0));
        assert_eq!(c.unused, [0xDE, 0xAD, 0xBE, 0xEF]);
        assert_reencodes(&c, &bytes);
        let fresh = IntermediateCuffPressure::new(PressureUnit::MmHg, sf(120, 0));
        assert_eq!(fresh.to_vec(), hex("007800FF07FF07"));
    }

    /// gatt.json 2A49, Spezi `testBloodPressureFeatureStrings` (0x01FF): every BLS 1.1 bit.
    #[test]
    fn feature_spezi_all_bls11_bits() {
        let bytes = hex("FF01");
        let f = BloodPressureFeature::parse(&bytes).unwrap();
        assert_eq!(f.0, 511);
        assert_eq!(
            f.names().collect::<Vec<_>>(),
            [
                "body movement",
                "cuff fit",
                "irregular pulse",
                "pulse rate range",
                "measurement position",
                "multiple bonds",
                "E2E-CRC",
                "User Data Service",
                "user facing time",
            ]
        );
        assert!(f.contains(BloodPressureFeature::USER_FACING_TIME | BloodPressureFeature::E2E_CRC));
        assert_eq!(f.reserved(), 0);
        assert_reencodes(&f, &bytes);
    }

    /// gatt.json 2A49, im97mori `u2a49` bit masks: 0x001F, no multiple bonds.
    #[test]
    fn feature_im97mori_0x001f() {
        let bytes = hex("1F00");
        let f = BloodPressureFeature::parse(&bytes).unwrap();
        assert_eq!(f.0, 31);
        assert_eq!(
            f.names().collect::<Vec<_>>(),
            [
                "body movement",
                "cuff fit",
                "irregular pulse",
                "pulse rate range",
                "measurement position"
            ]
        );
        assert!(!f.contains(BloodPressureFeature::MULTIPLE_BONDS));
        assert_eq!(f.iter_named().last(), Some((4, "measurement position")));
        assert_reencodes(&f, &bytes);
    }

    /// Reserved bits are kept (GLP.TS GLF/BI-11 asks the same of 2A51), short values are errors, extra
    /// octets are ignored.
    #[test]
    fn feature_reserved_short_and_trailing() {
        let f = BloodPressureFeature::parse(&hex("FFFF")).unwrap();
        assert_eq!(f.reserved(), 0xFE00);
        assert_eq!(f.names().count(), 9);
        assert_eq!(f.to_vec(), hex("FFFF"));
        assert_eq!(BloodPressureFeature::parse(&[]), Err(Error::DecodeEmpty));
        assert_eq!(
            BloodPressureFeature::parse(&[0x01]),
            Err(Error::DecodeTruncated { need: 2, got: 1 })
        );
        assert_eq!(
            BloodPressureFeature::parse(&hex("010099")),
            Ok(BloodPressureFeature::BODY_MOVEMENT_DETECTION)
        );
    }

    fn arb_sfloat() -> impl Strategy<Value = SFloat> {
        any::<u16>().prop_map(SFloat::from_raw)
    }

    fn arb_date_time() -> impl Strategy<Value = DateTime> {
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

    /// The parts of a 2A35/2A36 value that do not borrow.
    type Parts = (
        u8,
        bool,
        [SFloat; 3],
        Option<DateTime>,
        Option<SFloat>,
        Option<u8>,
        Option<u16>,
        Vec<u8>,
    );

    fn arb_parts() -> impl Strategy<Value = Parts> {
        (
            any::<u8>(),
            any::<bool>(),
            proptest::array::uniform3(arb_sfloat()),
            proptest::option::of(arb_date_time()),
            proptest::option::of(arb_sfloat()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u16>()),
            proptest::collection::vec(any::<u8>(), 0..6),
        )
    }

    fn unit(kpa: bool) -> PressureUnit {
        if kpa {
            PressureUnit::KPa
        } else {
            PressureUnit::MmHg
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Total decoding: no input panics, and every accepted input re-encodes to itself.
        #[test]
        fn bpm_parse_total_and_exact(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(m) = BloodPressureMeasurement::parse(&bytes) {
                prop_assert_eq!(m.to_vec(), bytes);
            }
        }

        /// Quirk decoding is total too, and its output always re-encodes to something a plain parse reads
        /// back to the same measurement.
        #[test]
        fn bpm_parse_with_quirks_total(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            be in any::<bool>(),
            uid in any::<bool>(),
        ) {
            let q = BpQuirks { big_endian_pulse_and_status: be, user_id_always_present: uid };
            if let Ok(m) = BloodPressureMeasurement::parse_with_quirks(&bytes, q) {
                let v = m.to_vec();
                let back = BloodPressureMeasurement::parse(&v).unwrap();
                prop_assert_eq!(back, BloodPressureMeasurement { flags: m.wire_flags(), ..m });
            }
        }

        #[test]
        fn icp_parse_total_and_exact(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(c) = IntermediateCuffPressure::parse(&bytes) {
                prop_assert_eq!(c.to_vec(), bytes);
            }
        }

        #[test]
        fn feature_parse_total(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(f) = BloodPressureFeature::parse(&bytes) {
                prop_assert_eq!(&f.to_vec()[..], &bytes[..2]);
            }
        }

        /// Generated 2A35 values survive encode → decode unchanged.
        #[test]
        fn bpm_round_trip(parts in arb_parts()) {
            let (flags, kpa, [sys, dia, map], timestamp, pulse_rate, user_id, status, trailing) = parts;
            let mut m = BloodPressureMeasurement {
                flags,
                unit: unit(kpa),
                systolic: sys,
                diastolic: dia,
                mean_arterial_pressure: map,
                timestamp,
                pulse_rate,
                user_id,
                measurement_status: status.map(MeasurementStatus),
                trailing: &trailing,
            };
            m.flags = m.wire_flags();
            let bytes = m.to_vec();
            prop_assert_eq!(bytes.len(), m.buffer_len());
            prop_assert_eq!(BloodPressureMeasurement::parse(&bytes), Ok(m));
        }

        /// Generated 2A36 values survive encode → decode unchanged.
        #[test]
        fn icp_round_trip(parts in arb_parts(), unused in any::<[u8; 4]>()) {
            let (flags, kpa, [cuff, _, _], timestamp, pulse_rate, user_id, status, trailing) = parts;
            let mut c = IntermediateCuffPressure {
                flags,
                unit: unit(kpa),
                cuff_pressure: cuff,
                unused,
                timestamp,
                pulse_rate,
                user_id,
                measurement_status: status.map(MeasurementStatus),
                trailing: &trailing,
            };
            c.flags = c.wire_flags();
            let bytes = c.to_vec();
            prop_assert_eq!(IntermediateCuffPressure::parse(&bytes), Ok(c));
        }

        #[test]
        fn feature_round_trip(raw in any::<u16>()) {
            let f = BloodPressureFeature(raw);
            prop_assert_eq!(BloodPressureFeature::parse(&f.to_vec()), Ok(f));
        }
    }
}
