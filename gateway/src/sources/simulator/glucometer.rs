//! A simulated glucometer: the sensor role of the Glucose Profile (GLS v1.0, GLP v1.0), byte-exact.
//!
//! # What it exposes
//!
//! Glucose Measurement 0x2A18 (notify), Glucose Measurement Context 0x2A34 (notify, when configured
//! `with_context`), Glucose Feature 0x2A51 (read), Record Access Control Point 0x2A52 (write + indicate),
//! the clock (Current Time 0x2A2B by default, see [`ClockCharacteristic`]) and the Device Information
//! strings 0x2A24 / 0x2A25 / 0x2A29.
//!
//! # The RACP, as GLS and GLS.TS require of a sensor
//!
//! A write to the RACP is checked in this order:
//!
//! 1. bonding — `requires_bonding` and not bonded: ATT 0x05 (GLS "writeable with authentication", GLP v1.0
//!    §6; GLS.TS GLS/SEN/SPE/BI-09);
//! 2. CCCDs — 2A18 notifications, 2A52 indications and, with contexts, 2A34 notifications must be
//!    enabled, else ATT 0x81 (GLS.TS SPE/BI-08);
//! 3. length — fewer than two octets (op code + operator): ATT 0x0D;
//! 4. one procedure at a time — any op code but Abort while a procedure is in progress: ATT 0x80
//!    (GLS.TS SPE/BI-07). A procedure is in progress from the write until its Response Code (or Number of
//!    Stored Records) indication has been taken by the transport;
//! 5. the request itself — [`Racp::check_request`] names the response code for a malformed request
//!    (SPE/BI-01…06: op code not supported, invalid operator, operator not supported, invalid operand,
//!    operand not supported), answered as `06 00 <op> <code>`. This sensor further refuses the Combined
//!    Report op code (not GLS v1.0) and, when `time_filter` is off, the user-facing-time filter.
//!
//! Then: *report* notifies each selected record's 2A18 (flag b4 set when a context follows) and its 2A34,
//! oldest first, then indicates `06 00 01 01`, or `06 00 01 06` when nothing matches. *Delete* removes
//! the selection and answers success (or "no records found"). *Report number* answers `05 00 <u16>`, a
//! count of 0 when nothing matches (GLS.TS SPN/BV-03), never "no records found". *Abort* drops whatever of
//! the running procedure has not been sent and answers `06 00 03 01`.
//!
//! A transfer is a copy taken at the write (GLS: records created during a transfer may or may not be
//! included; here they are not). Sequence numbers start at 0 and grow by one per record; deleting never
//! resets them (GLS v1.0 §3.1.1.2). Every record carries its Time Offset: GLS requires it in the first
//! record of a transfer and whenever it changes, and "always" satisfies both without tracking transfers.
//!
//! # Time
//!
//! `clock_offset_s` is the device's base clock minus real time. A record's Base Time is the base clock at
//! measurement, its Time Offset the `time_offset_min` in force then (GLS v1.0 §3.1.1.3–4). The clock
//! characteristic reads the *user-facing* clock, base clock + Time Offset: what the meter displays, and
//! the time base of the RACP user-facing-time filter. So a collector's coincident-timestamp offset (clock
//! read − gateway time) corrects a record's user-facing time (Base Time + Time Offset) to real time
//! exactly, as `protocol::validate` computes it. With the default Time Offset of 0 the two clocks agree.

use protocol::gatt::Codec;
use protocol::gatt::glucose::{
    Carbohydrate, CarbohydrateId, Concentration, ConcentrationUnit, Exercise, GlucoseContext,
    GlucoseFeature, GlucoseMeasurement, Health, Meal, Medication, SampleLocation, SampleType,
    SensorStatus, Tester, TesterHealth,
};
use protocol::gatt::racp::{FilterType, OpCode, Operand, Operator, Racp, ResponseCode};
use protocol::gatt::time::{CurrentTime, DateTime};
use protocol::ieee11073::SFloat;
use protocol::model::{GlucoseUnit, MG_PER_DL_PER_MMOL_PER_L};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    ClockCharacteristic, ClockWrite, DeviceOutput, Effect, GattServer, Queued, RunStep, SimError,
    apportion, att_error, date_time_at, read_clock, read_dis, sfloat_at, write_clock,
};
use crate::sources::{LinkError, att, uuid};

/// Faults a glucometer can inject into its record transfers, for collector tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GlucometerFaults {
    /// Drop the connection after this many records of a report transfer have been sent (each record being
    /// its 2A18 and, if any, its 2A34). A transfer of fewer records completes normally; one of exactly this
    /// many drops before its Response Code. Applies to every transfer while set.
    pub drop_link_after_records: Option<usize>,
    /// Never indicate the Response Code that ends a report: the procedure stays in progress until the
    /// connection ends and the collector's 30 s RACP timer must fire (GLP.TS GLP/COL/SPE/BI-04).
    pub skip_response: bool,
    /// Answer every Report Stored Records request with this response code instead of records (GLP.TS
    /// SPE/BI-01..03 from the collector's side: op code, operator or operand not supported).
    pub refuse_reports: Option<ResponseCode>,
}

/// A simulated glucometer's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlucometerConfig {
    /// The device id the gateway knows it by.
    pub id: String,
    /// Model Number String (0x2A24).
    pub model: String,
    /// Serial Number String (0x2A25).
    pub serial: String,
    /// Manufacturer Name String (0x2A29).
    pub manufacturer: String,
    /// The unit the meter shows: mg/dL (sent as kg/L, exponent −5) or mmol/L (sent as mol/L, exponent −4,
    /// i.e. 0.1 mmol/L; GLS.TS CN/BV).
    pub unit: GlucoseUnit,
    /// Device base clock minus real time, seconds (+420: the meter runs 7 minutes fast).
    pub clock_offset_s: i64,
    /// The GLS Time Offset, minutes, put into each new record (GLS v1.0 §3.1.1.4).
    pub time_offset_min: i16,
    /// RACP writes need a bond (GLP v1.0 §6; GLS.TS SPE/BI-09).
    pub requires_bonding: bool,
    /// The meter has the Glucose Measurement Context characteristic and sends contexts.
    pub with_context: bool,
    /// The RACP accepts the user-facing-time filter (filter type 2); otherwise "operand not supported".
    pub time_filter: bool,
    /// The RACP accepts the sequence-number filter (filter type 1); otherwise "operand not supported"
    /// (GLS.TS SPE/BI-06; a meter that can only report all, first or last records).
    pub sequence_filter: bool,
    /// The Glucose Feature value (0x2A51).
    pub feature: GlucoseFeature,
    /// Where the clock is.
    pub clock: ClockCharacteristic,
    /// What a clock write does.
    pub clock_write: ClockWrite,
    /// Number records newest-first, as TaiDoc's DM30b fw 1.2.4 does (GATT.md): on the wire the newest record
    /// is sequence 0 and each new reading renumbers the rest; reports send them in that order.
    pub newest_first: bool,
    /// Fault injection.
    pub faults: GlucometerFaults,
}

impl GlucometerConfig {
    /// A mg/dL meter with contexts, no bond required, an exact clock and this id; the rest as
    /// [`Default`].
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        GlucometerConfig {
            serial: format!("SN-{id}"),
            id,
            ..Self::default()
        }
    }
}

impl Default for GlucometerConfig {
    fn default() -> Self {
        GlucometerConfig {
            id: "sim-glucometer".to_owned(),
            model: "SimGluco 100".to_owned(),
            serial: "SN-sim-glucometer".to_owned(),
            manufacturer: "PHG Simulated Devices".to_owned(),
            unit: GlucoseUnit::MgPerDl,
            clock_offset_s: 0,
            time_offset_min: 0,
            requires_bonding: false,
            with_context: true,
            time_filter: true,
            sequence_filter: true,
            // Everything the generator can annunciate (bits 0–9); not multiple bond.
            feature: GlucoseFeature(0x03FF),
            clock: ClockCharacteristic::CurrentTime,
            clock_write: ClockWrite::Accept,
            newest_first: false,
            faults: GlucometerFaults::default(),
        }
    }
}

/// The Glucose Measurement Context fields of a record (GLS v1.0 §3.2), in the protocol's types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordContext {
    /// Carbohydrate ID and amount (kg; GLS.TS expects exponent −3, i.e. grams).
    pub carbohydrate: Option<Carbohydrate>,
    /// Meal.
    pub meal: Option<Meal>,
    /// Tester and health.
    pub tester_health: Option<TesterHealth>,
    /// Exercise duration and intensity.
    pub exercise: Option<Exercise>,
    /// Medication.
    pub medication: Option<Medication>,
    /// HbA1c, %.
    pub hba1c: Option<SFloat>,
}

impl RecordContext {
    /// A context with only a meal.
    pub fn meal(meal: Meal) -> Self {
        RecordContext {
            meal: Some(meal),
            ..Self::default()
        }
    }

    /// The 2A34 value for the record with `sequence_number`.
    pub fn to_gatt(&self, sequence_number: u16) -> GlucoseContext<'static> {
        GlucoseContext {
            carbohydrate: self.carbohydrate,
            meal: self.meal,
            tester_health: self.tester_health,
            exercise: self.exercise,
            medication: self.medication,
            hba1c: self.hba1c,
            ..GlucoseContext::new(sequence_number)
        }
    }
}

/// One measurement as the meter takes it, before it becomes a stored record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlucoseSample {
    /// In the meter's display unit (mg/dL or mmol/L); `None` sends SFLOAT NaN (no result).
    pub value: Option<f64>,
    /// Sample type (10 = control solution).
    pub sample_type: SampleType,
    /// Sample location (4 = control solution).
    pub sample_location: SampleLocation,
    /// Sensor Status Annunciation; sent only when not empty.
    pub sensor_status: SensorStatus,
    /// The context; sent only by a meter configured `with_context`.
    pub context: Option<RecordContext>,
}

impl GlucoseSample {
    /// A capillary plasma reading from a finger, no status, no context.
    pub fn new(value: f64) -> Self {
        GlucoseSample {
            value: Some(value),
            sample_type: SampleType::CAPILLARY_PLASMA,
            sample_location: SampleLocation::FINGER,
            sensor_status: SensorStatus::default(),
            context: None,
        }
    }
}

/// A record in the meter's memory, kept in wire form so every transfer sends the same octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredGlucoseRecord {
    /// GLS v1.0 §3.1.1.2.
    pub sequence_number: u16,
    /// The base clock at measurement (GLS v1.0 §3.1.1.3).
    pub base_time: DateTime,
    /// The Time Offset in force at measurement (GLS v1.0 §3.1.1.4).
    pub time_offset_min: i16,
    /// The concentration in the wire unit, as its SFLOAT word (see [`PackedContext`] for why).
    concentration: u16,
    /// kg/L or mol/L.
    pub unit: ConcentrationUnit,
    /// Sample type.
    pub sample_type: SampleType,
    /// Sample location.
    pub sample_location: SampleLocation,
    /// Sensor status (sent when not empty).
    pub sensor_status: SensorStatus,
    /// The context, if the record has one.
    context: PackedContext,
}

/// A record's context as its 2A34 value (sequence number 0; the transfer numbers it), or none. A
/// [`RecordContext`] in the protocol's decoded types takes more than twice the room, and a simulated
/// meter holds thousands of records in the gateway's memory (tests/benches/gateway_memory.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedContext {
    /// 0: no context.
    len: u8,
    value: [u8; GlucoseContext::MAX_LEN],
}

impl PackedContext {
    const NONE: PackedContext = PackedContext {
        len: 0,
        value: [0; GlucoseContext::MAX_LEN],
    };

    /// `None` for a context the 2A34 encoder refuses.
    fn pack(context: Option<&RecordContext>) -> Option<PackedContext> {
        let Some(c) = context else {
            return Some(Self::NONE);
        };
        let mut value = [0; GlucoseContext::MAX_LEN];
        let len = c.to_gatt(0).emit(&mut value).ok()?;
        Some(PackedContext {
            len: u8::try_from(len).ok()?,
            value,
        })
    }

    /// The stored octets; `None` without a context.
    fn octets(&self) -> Option<&[u8]> {
        self.value
            .get(..usize::from(self.len))
            .filter(|v| !v.is_empty())
    }

    /// The 2A34 value numbered `sequence_number` (GLS v1.0 §3.2: the Flags octet, then the Sequence
    /// Number, little-endian), from the stored octets as they are: what the 2A18 announced is what goes.
    fn value(&self, sequence_number: u16) -> Option<Vec<u8>> {
        let mut v = self.octets()?.to_vec();
        v.get_mut(1..3)?
            .copy_from_slice(&sequence_number.to_le_bytes());
        Some(v)
    }

    /// The context in the protocol's types ([`StoredGlucoseRecord::context`]).
    fn unpack(&self) -> Option<RecordContext> {
        let c = GlucoseContext::parse(self.octets()?).ok()?;
        Some(RecordContext {
            carbohydrate: c.carbohydrate,
            meal: c.meal,
            tester_health: c.tester_health,
            exercise: c.exercise,
            medication: c.medication,
            hba1c: c.hba1c,
        })
    }
}

impl StoredGlucoseRecord {
    /// The concentration in the wire unit.
    pub fn concentration(&self) -> SFloat {
        SFloat::from_raw(self.concentration)
    }

    /// The context, if the record has one.
    pub fn context(&self) -> Option<RecordContext> {
        self.context.unpack()
    }

    /// The 2A18 value (flag b4 set when a context follows).
    pub fn measurement(&self) -> GlucoseMeasurement<'static> {
        GlucoseMeasurement {
            time_offset_min: Some(self.time_offset_min),
            concentration: Some(Concentration {
                value: self.concentration(),
                unit: self.unit,
                sample_type: self.sample_type,
                sample_location: self.sample_location,
            }),
            sensor_status: (!self.sensor_status.is_empty()).then_some(self.sensor_status),
            context_follows: self.context.octets().is_some(),
            ..GlucoseMeasurement::new(self.sequence_number, self.base_time)
        }
    }

    /// The user-facing time, Base Time + Time Offset (GLS v1.0 §3.1.1.4).
    pub fn user_facing_time(&self) -> Option<DateTime> {
        self.base_time.add_minutes(i32::from(self.time_offset_min))
    }
}

/// The mix of readings [`SimGlucometer::generate_with`] produces. Each field is the fraction of the records
/// of that kind (0.0–1.0), rounded to a whole count so a small batch still gets them; the rest are normal
/// readings. The default is all normal.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GlucoseMix {
    /// "LO": status b6 (result lower than the device can process) with the meter's lower limit, 20 mg/dL.
    pub lo: f64,
    /// "HI": status b5 (result higher than the device can process) with the upper limit, 600 mg/dL.
    pub hi: f64,
    /// A value outside any meter's range (5 or 700 mg/dL) without LO/HI: implausible, to be rejected.
    pub out_of_range: f64,
    /// A control-solution test (type 10, location 4): a meter check, not a patient reading.
    pub control_solution: f64,
    /// A failed test: no value (NaN) with a device-error status bit (strip insertion / sample size).
    pub device_error: f64,
}

/// What kind of reading a generated record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Lo,
    Hi,
    OutOfRange,
    Control,
    DeviceError,
}

/// The testing times of a day, seconds after midnight, with the meal context each implies.
const SLOTS: [(i64, Meal); 4] = [
    (7 * 3600, Meal::FASTING),
    (12 * 3600, Meal::PREPRANDIAL),
    (14 * 3600, Meal::POSTPRANDIAL),
    (22 * 3600, Meal::BEDTIME),
];

/// A simulated glucometer (see the module doc).
#[derive(Debug)]
pub struct SimGlucometer {
    config: GlucometerConfig,
    /// Ascending by sequence number.
    records: Vec<StoredGlucoseRecord>,
    /// The next sequence number; u32 so that "all 65 536 used" is representable.
    next_sequence: u32,
    /// The base clock's offset from real time now (starts as configured; clock writes change it).
    clock_offset_s: i64,
    /// The Time Offset now (starts as configured).
    time_offset_min: i16,
    /// Adjust Reason reported with Current Time after the clock was set.
    adjust_reason: u8,
    server: GattServer,
    /// The RACP procedure in progress (GLS: at most one).
    procedure: Option<OpCode>,
    /// The Report Stored Records transfer being sent, if any (its place in the outbox is an
    /// [`Entry::Run`](super::Entry::Run)).
    transfer: Option<Transfer>,
}

/// A Report Stored Records transfer under way, encoded a record at a time as the transport takes it.
#[derive(Debug)]
struct Transfer {
    /// Memory indices of the selected records, in the order they go out.
    order: Vec<usize>,
    /// How many of them are sent.
    sent: usize,
    /// The memory's size at the request: a newest-first meter numbers the transfer as its memory was then
    /// (GLS: a transfer is a copy taken at the write, whatever is measured meanwhile).
    memory_len: usize,
}

impl SimGlucometer {
    /// A meter with an empty memory.
    pub fn new(config: GlucometerConfig) -> Self {
        SimGlucometer {
            clock_offset_s: config.clock_offset_s,
            time_offset_min: config.time_offset_min,
            config,
            records: Vec::new(),
            next_sequence: 0,
            adjust_reason: 0,
            server: GattServer::default(),
            procedure: None,
            transfer: None,
        }
    }

    /// The configuration it was built with (the clock and Time Offset may have moved since; see
    /// [`Self::clock_offset_s`], [`Self::time_offset_min`]).
    pub fn config(&self) -> &GlucometerConfig {
        &self.config
    }

    /// Replaces the fault injection.
    pub fn set_faults(&mut self, faults: GlucometerFaults) {
        self.config.faults = faults;
    }

    /// The stored records, ascending by sequence number.
    pub fn records(&self) -> &[StoredGlucoseRecord] {
        &self.records
    }

    /// The sequence number the next record gets, or `None` when they are exhausted.
    pub fn next_sequence_number(&self) -> Option<u16> {
        u16::try_from(self.next_sequence).ok()
    }

    /// The base clock's offset from real time, seconds.
    pub fn clock_offset_s(&self) -> i64 {
        self.clock_offset_s
    }

    /// The Time Offset new records get, minutes.
    pub fn time_offset_min(&self) -> i16 {
        self.time_offset_min
    }

    /// Changes the Time Offset for records taken from now on (a user setting the meter's displayed time or
    /// a time-zone change, GLS v1.0 §3.1.1.4).
    pub fn set_time_offset(&mut self, minutes: i16) {
        self.time_offset_min = minutes;
    }

    /// The user-facing clock at real time `now`: what the meter shows and what its clock reads.
    pub fn user_facing_clock(&self, now: i64) -> i64 {
        now.saturating_add(self.clock_offset_s)
            .saturating_add(i64::from(self.time_offset_min) * 60)
    }

    /// The Current Time value at real time `now`.
    pub fn current_time(&self, now: i64) -> CurrentTime {
        super::current_time_at(self.user_facing_clock(now), self.adjust_reason)
    }

    // ----- records ------------------------------------------------------------------------------------

    /// Takes a reading of `value` (in the display unit) at real time `now`, with a meal context if `meal`
    /// is given and the meter sends contexts. Returns its sequence number.
    ///
    /// # Errors
    /// As [`Self::add_sample`].
    pub fn add_record(&mut self, now: i64, value: f64, meal: Option<u8>) -> Result<u16, SimError> {
        let sample = GlucoseSample {
            context: meal.map(|m| RecordContext::meal(Meal(m))),
            ..GlucoseSample::new(value)
        };
        self.add_sample(now, sample)
    }

    /// Takes a reading at real time `now`. Returns its sequence number.
    ///
    /// A record is stored, not sent: GLS sends records only through the RACP.
    ///
    /// # Errors
    /// [`SimError::Unrepresentable`] for a value that does not fit the unit's resolution,
    /// [`SimError::ClockOutOfRange`], [`SimError::SequenceExhausted`]. The meter is unchanged.
    pub fn add_sample(&mut self, now: i64, sample: GlucoseSample) -> Result<u16, SimError> {
        let sequence_number =
            u16::try_from(self.next_sequence).map_err(|_| SimError::SequenceExhausted)?;
        let base_time = date_time_at(now.saturating_add(self.clock_offset_s))?;
        let (unit, concentration) = match (self.config.unit, sample.value) {
            (GlucoseUnit::MgPerDl, Some(v)) => (ConcentrationUnit::KgPerL, sfloat_at(v, 1.0, -5)?),
            (GlucoseUnit::MmolPerL, Some(v)) => {
                (ConcentrationUnit::MolPerL, sfloat_at(v, 10.0, -4)?)
            }
            (GlucoseUnit::MgPerDl, None) => (ConcentrationUnit::KgPerL, SFloat::NAN),
            (GlucoseUnit::MmolPerL, None) => (ConcentrationUnit::MolPerL, SFloat::NAN),
        };
        let context = sample.context.filter(|_| self.config.with_context);
        let record = StoredGlucoseRecord {
            sequence_number,
            base_time,
            time_offset_min: self.time_offset_min,
            concentration: concentration.to_raw(),
            unit,
            sample_type: sample.sample_type,
            sample_location: sample.sample_location,
            sensor_status: sample.sensor_status,
            // Encoding fails only for a value out of its field's range; refuse it here rather than at
            // transfer time.
            context: PackedContext::pack(context.as_ref()).ok_or(SimError::Unrepresentable)?,
        };
        // As above: a type/location above 15.
        record
            .measurement()
            .emit(&mut [0u8; GlucoseMeasurement::MAX_LEN])
            .map_err(|_| SimError::Unrepresentable)?;
        self.records.push(record);
        self.next_sequence += 1;
        Ok(sequence_number)
    }

    /// Fills the memory with `n` normal readings taken before `now` (see [`Self::generate_with`]).
    ///
    /// # Errors
    /// As [`Self::generate_with`].
    pub fn generate(&mut self, n: usize, now: i64, seed: u64) -> Result<(), SimError> {
        self.generate_with(n, now, seed, &GlucoseMix::default())
    }

    /// Fills the memory with `n` readings taken before `now`, deterministic for a `seed`.
    ///
    /// Readings fall on a home-monitoring day — fasting at 07:00, before lunch at 12:00, after lunch at
    /// 14:00, bedtime at 22:00, each ±30 min, the fasting one every day and the others on most — going back
    /// as many days as `n` needs, oldest first. Normal values are mostly 70–180 mg/dL and depend on the
    /// meal; with contexts each carries its meal (and the lunch carbohydrates after lunch). `mix` turns
    /// some into LO, HI, out-of-range, control-solution or failed tests so that every rejection path of
    /// the pipeline gets exercised.
    ///
    /// # Errors
    /// [`SimError::SequenceExhausted`] or [`SimError::ClockOutOfRange`]; the records generated before the
    /// failure stay.
    pub fn generate_with(
        &mut self,
        n: usize,
        now: i64,
        seed: u64,
        mix: &GlucoseMix,
    ) -> Result<(), SimError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let kinds = apportion(
            n,
            &[
                (Kind::Lo, mix.lo),
                (Kind::Hi, mix.hi),
                (Kind::OutOfRange, mix.out_of_range),
                (Kind::Control, mix.control_solution),
                (Kind::DeviceError, mix.device_error),
            ],
            Kind::Normal,
            &mut rng,
        );
        let times = testing_times(n, now, &mut rng);
        for ((t, meal), kind) in times.into_iter().zip(kinds) {
            let sample = self.generated_sample(kind, meal, &mut rng);
            self.add_sample(t, sample)?;
        }
        Ok(())
    }

    /// Takes one realistic reading at `now`, deterministic for a `seed` (a "live" reading for the demo): the
    /// meal context follows the time of day of the device clock, and each `mix` fraction is the probability
    /// of that kind. Stored, not sent (GLS sends records only through the RACP). Returns its sequence
    /// number.
    ///
    /// # Errors
    /// As [`Self::add_sample`].
    pub fn measure_random(
        &mut self,
        now: i64,
        seed: u64,
        mix: &GlucoseMix,
    ) -> Result<u16, SimError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let draw: f64 = rng.random_range(0.0..1.0);
        let mut acc = 0.0;
        let mut kind = Kind::Normal;
        for (k, p) in [
            (Kind::Lo, mix.lo),
            (Kind::Hi, mix.hi),
            (Kind::OutOfRange, mix.out_of_range),
            (Kind::Control, mix.control_solution),
            (Kind::DeviceError, mix.device_error),
        ] {
            acc += p.clamp(0.0, 1.0);
            if draw < acc {
                kind = k;
                break;
            }
        }
        let hour = self.user_facing_clock(now).rem_euclid(86_400) / 3600;
        let meal = match hour {
            4..=10 => Meal::FASTING,
            11..=12 => Meal::PREPRANDIAL,
            13..=18 => Meal::POSTPRANDIAL,
            _ => Meal::BEDTIME,
        };
        let sample = self.generated_sample(kind, meal, &mut rng);
        self.add_sample(now, sample)
    }

    fn generated_sample(&self, kind: Kind, meal: Meal, rng: &mut StdRng) -> GlucoseSample {
        let mut context = RecordContext {
            meal: Some(meal),
            tester_health: Some(TesterHealth {
                tester: Tester::SELF,
                health: Health::NO_HEALTH_ISSUES,
            }),
            ..RecordContext::default()
        };
        if meal == Meal::POSTPRANDIAL {
            // Grams of carbohydrate, sent in kg with exponent −3 (GLS.TS CN/BV).
            let grams = rng.random_range(30..=90);
            context.carbohydrate = SFloat::new(grams, -3).ok().map(|value| Carbohydrate {
                id: CarbohydrateId::LUNCH,
                value,
            });
        }
        let mg_dl = match kind {
            Kind::Normal => {
                let (lo, hi) = match meal {
                    Meal::FASTING => (75.0, 130.0),
                    Meal::PREPRANDIAL => (80.0, 150.0),
                    Meal::POSTPRANDIAL => (110.0, 190.0),
                    _ => (95.0, 165.0),
                };
                // The mean of two uniforms: values bunch in the middle of the range, as real ones do.
                Some((rng.random_range(lo..=hi) + rng.random_range(lo..=hi)) / 2.0)
            }
            Kind::Lo => Some(20.0),
            Kind::Hi => Some(600.0),
            Kind::OutOfRange => Some(if rng.random_bool(0.5) { 5.0 } else { 700.0 }),
            Kind::Control => Some(rng.random_range(100.0..=130.0)),
            Kind::DeviceError => None,
        };
        let value = mg_dl.map(|v: f64| match self.config.unit {
            GlucoseUnit::MgPerDl => v.round(),
            GlucoseUnit::MmolPerL => (v / MG_PER_DL_PER_MMOL_PER_L * 10.0).round() / 10.0,
        });
        let (sample_type, sample_location, sensor_status, context) = match kind {
            Kind::Control => (
                SampleType::CONTROL_SOLUTION,
                SampleLocation::CONTROL_SOLUTION,
                SensorStatus::default(),
                // A meter check has no meal.
                None,
            ),
            Kind::Lo => (
                SampleType::CAPILLARY_PLASMA,
                SampleLocation::FINGER,
                SensorStatus::RESULT_TOO_LOW,
                Some(context),
            ),
            Kind::Hi => (
                SampleType::CAPILLARY_PLASMA,
                SampleLocation::FINGER,
                SensorStatus::RESULT_TOO_HIGH,
                Some(context),
            ),
            Kind::DeviceError => (
                SampleType::CAPILLARY_PLASMA,
                SampleLocation::FINGER,
                if rng.random_bool(0.5) {
                    SensorStatus::STRIP_INSERTION_ERROR
                } else {
                    SensorStatus::SAMPLE_SIZE_INSUFFICIENT
                },
                None,
            ),
            Kind::Normal | Kind::OutOfRange => (
                SampleType::CAPILLARY_PLASMA,
                SampleLocation::FINGER,
                SensorStatus::default(),
                Some(context),
            ),
        };
        GlucoseSample {
            value,
            sample_type,
            sample_location,
            sensor_status,
            context,
        }
    }

    // ----- GATT server --------------------------------------------------------------------------------

    /// The characteristics the meter exposes.
    pub fn characteristics(&self) -> Vec<u16> {
        let mut c = vec![uuid::GLUCOSE_MEASUREMENT];
        if self.config.with_context {
            c.push(uuid::GLUCOSE_CONTEXT);
        }
        c.extend([uuid::GLUCOSE_FEATURE, uuid::RACP]);
        c.extend(self.config.clock.uuid());
        c.extend([
            uuid::MODEL_NUMBER,
            uuid::SERIAL_NUMBER,
            uuid::MANUFACTURER_NAME,
        ]);
        c
    }

    /// Whether the meter exposes `uuid`.
    pub fn has(&self, uuid: u16) -> bool {
        self.characteristics().contains(&uuid)
    }

    /// A central connects; returns the connection id. A procedure of an earlier connection is gone.
    pub fn connect(&mut self) -> u64 {
        self.procedure = None;
        self.transfer = None;
        self.server.connect()
    }

    /// The connection ends: the procedure in progress and unsent notifications are dropped (the records
    /// stay; a transfer is a copy).
    pub fn disconnect(&mut self) {
        self.procedure = None;
        self.transfer = None;
        self.server.disconnect();
    }

    /// The current connection's id.
    pub fn connection(&self) -> Option<u64> {
        self.server.connection
    }

    /// Pairs and bonds; the bond outlives connections.
    pub fn bond(&mut self) {
        self.server.bonded = true;
    }

    /// Whether the meter is bonded.
    pub fn is_bonded(&self) -> bool {
        self.server.bonded
    }

    /// Whether a RACP procedure is in progress (GLS: until its response indication is taken).
    pub fn procedure_in_progress(&self) -> bool {
        self.procedure.is_some()
    }

    /// Reads a characteristic at real time `now`.
    ///
    /// # Errors
    /// [`LinkError::Disconnected`] when not connected, [`LinkError::Missing`] for a characteristic the meter
    /// does not have, ATT 0x02 for one that cannot be read (2A18, 2A34, 2A52).
    pub fn read(&mut self, uuid: u16, now: i64) -> Result<Vec<u8>, LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        if uuid == uuid::GLUCOSE_FEATURE {
            return Ok(self.config.feature.to_vec());
        }
        if Some(uuid) == self.config.clock.uuid() {
            let clock = self.user_facing_clock(now);
            return read_clock(self.config.clock, clock, self.adjust_reason)
                .ok_or(LinkError::Missing(uuid));
        }
        let c = &self.config;
        read_dis(uuid, &c.model, &c.serial, &c.manufacturer)
            .ok_or(LinkError::Att(att_error::READ_NOT_PERMITTED))
    }

    /// Writes a characteristic at real time `now`: the RACP ([`Self::write_racp`]) or the clock.
    ///
    /// # Errors
    /// [`LinkError::Disconnected`], [`LinkError::Missing`], ATT 0x03 for a characteristic that cannot be
    /// written, the RACP's and the clock's ATT errors.
    pub fn write(&mut self, uuid: u16, value: &[u8], now: i64) -> Result<(), LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        if uuid == uuid::RACP {
            return self.write_racp(value);
        }
        if Some(uuid) == self.config.clock.uuid() {
            if let Some(written) = write_clock(self.config.clock, self.config.clock_write, value)? {
                // The written time is the user-facing clock; the base clock absorbs the change.
                self.clock_offset_s = written
                    .saturating_sub(now)
                    .saturating_sub(i64::from(self.time_offset_min) * 60);
                self.adjust_reason = CurrentTime::ADJUST_EXTERNAL_REFERENCE;
            }
            return Ok(());
        }
        Err(LinkError::Att(att_error::WRITE_NOT_PERMITTED))
    }

    /// Enables notifications (2A18, 2A34, 2A2B) or indications (2A52).
    ///
    /// # Errors
    /// [`LinkError::Disconnected`], [`LinkError::Missing`], ATT 0x06 for a characteristic without a CCCD.
    pub fn subscribe(&mut self, uuid: u16) -> Result<(), LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        let notifiable = matches!(
            uuid,
            uuid::GLUCOSE_MEASUREMENT | uuid::GLUCOSE_CONTEXT | uuid::RACP | uuid::CURRENT_TIME
        );
        if !notifiable {
            return Err(LinkError::Att(att_error::REQUEST_NOT_SUPPORTED));
        }
        self.server.cccds.insert(uuid);
        Ok(())
    }

    /// Takes the next output (a notification, an indication or an injected disconnect).
    pub fn poll_output(&mut self) -> Option<DeviceOutput> {
        let (records, config, transfer) = (&self.records, &self.config, &mut self.transfer);
        let q = self
            .server
            .pop(|| next_of_transfer(records, config, transfer))?;
        if q.effect == Effect::EndProcedure {
            self.procedure = None;
        }
        if q.output == DeviceOutput::Disconnect {
            self.disconnect();
        }
        Some(q.output)
    }

    /// Whether an output is waiting.
    pub fn has_output(&self) -> bool {
        self.server.has_output()
    }

    /// Entries in the outbox (outputs, and a run not yet encoded counts one).
    #[cfg(test)]
    pub(super) fn queued_outputs(&self) -> usize {
        self.server.outbox.len()
    }

    // ----- RACP ---------------------------------------------------------------------------------------

    /// A write to the Record Access Control Point (see the module doc for the order of the checks).
    /// The answer — records and the response indication — is queued for [`Self::poll_output`].
    ///
    /// # Errors
    /// [`LinkError::Disconnected`]; ATT 0x05 (not bonded), 0x81 (CCCDs), 0x0D (shorter than two octets),
    /// 0x80 (a procedure is in progress). A malformed request is not an ATT error: it is answered with a
    /// response code.
    pub fn write_racp(&mut self, value: &[u8]) -> Result<(), LinkError> {
        self.server.require_connected()?;
        if self.config.requires_bonding && !self.server.bonded {
            return Err(LinkError::Att(att::INSUFFICIENT_AUTHENTICATION));
        }
        let cccds_ok = self.server.enabled(uuid::GLUCOSE_MEASUREMENT)
            && self.server.enabled(uuid::RACP)
            && (!self.config.with_context || self.server.enabled(uuid::GLUCOSE_CONTEXT));
        if !cccds_ok {
            return Err(LinkError::Att(att::CCCD_IMPROPERLY_CONFIGURED));
        }
        let &[op, _, ..] = value else {
            return Err(LinkError::Att(att_error::INVALID_ATTRIBUTE_VALUE_LENGTH));
        };
        let op_code = OpCode(op);
        let busy = self.procedure.is_some();
        if busy && op_code != OpCode::ABORT_OPERATION {
            return Err(LinkError::Att(att::PROCEDURE_ALREADY_IN_PROGRESS));
        }
        // A response op code with a non-null operator does not even parse; it is still not a request.
        let verdict = Racp::parse(value)
            .map_err(|_| ResponseCode::OP_CODE_NOT_SUPPORTED)
            .and_then(|r| self.check(&r).map(|()| r));
        let request = match verdict {
            Ok(r) => r,
            Err(code) if busy => {
                // A malformed Abort while a transfer runs: answer it first and let the transfer go on.
                self.server.notify_first(
                    uuid::RACP,
                    Racp::response(op_code, code).to_vec(),
                    Effect::None,
                );
                return Ok(());
            }
            Err(code) => {
                self.start(op_code);
                self.respond(Racp::response(op_code, code));
                return Ok(());
            }
        };
        let Racp::Request {
            operator, operand, ..
        } = request
        else {
            return Ok(());
        };
        match op_code {
            OpCode::ABORT_OPERATION => {
                // GLS: stop the running procedure, send nothing more of it, then answer success.
                self.server.outbox.clear();
                self.transfer = None;
                self.start(op_code);
                self.respond(Racp::success(op_code));
            }
            OpCode::REPORT_STORED_RECORDS => self.report(operator, &operand),
            OpCode::DELETE_STORED_RECORDS => {
                self.start(op_code);
                let selected = self.select(operator, &operand);
                let code = if selected.is_empty() {
                    ResponseCode::NO_RECORDS_FOUND
                } else {
                    ResponseCode::SUCCESS
                };
                // `selected` is ascending, so membership is a binary search.
                let mut i = 0usize;
                self.records.retain(|_| {
                    let keep = selected.binary_search(&i).is_err();
                    i += 1;
                    keep
                });
                self.respond(Racp::response(op_code, code));
            }
            OpCode::REPORT_NUMBER_OF_STORED_RECORDS => {
                self.start(op_code);
                let n = self.select(operator, &operand).len();
                // GLS counts in a UINT16; a full memory of 65 536 records saturates.
                self.respond(Racp::number_of_records(
                    u16::try_from(n).unwrap_or(u16::MAX),
                ));
            }
            // `check` lets only the four op codes above through.
            _ => {
                self.start(op_code);
                self.respond(Racp::response(op_code, ResponseCode::OP_CODE_NOT_SUPPORTED));
            }
        }
        Ok(())
    }

    /// The response code for a request this sensor will not execute: [`Racp::check_request`]'s syntactic
    /// verdict, refined by what this sensor supports.
    fn check(&self, r: &Racp<'_>) -> Result<(), ResponseCode> {
        r.check_request()?;
        let Racp::Request {
            op_code, operand, ..
        } = r
        else {
            return Err(ResponseCode::OP_CODE_NOT_SUPPORTED);
        };
        if *op_code == OpCode::COMBINED_REPORT {
            // Newer GSS only; GLS v1.0 has op codes 1–6.
            return Err(ResponseCode::OP_CODE_NOT_SUPPORTED);
        }
        if operand.filter_type() == Some(FilterType::USER_FACING_TIME) && !self.config.time_filter {
            return Err(ResponseCode::OPERAND_NOT_SUPPORTED);
        }
        if operand.filter_type() == Some(FilterType::SEQUENCE_NUMBER)
            && !self.config.sequence_filter
        {
            return Err(ResponseCode::OPERAND_NOT_SUPPORTED);
        }
        Ok(())
    }

    fn start(&mut self, op_code: OpCode) {
        self.procedure = Some(op_code);
    }

    /// Queues the indication that ends the procedure.
    fn respond(&mut self, response: Racp<'_>) {
        self.server
            .notify(uuid::RACP, response.to_vec(), Effect::EndProcedure);
    }

    /// Report Stored Records: each record (2A18, then its 2A34), then the response code — or the injected
    /// faults instead.
    fn report(&mut self, operator: Operator, operand: &Operand<'_>) {
        let op_code = OpCode::REPORT_STORED_RECORDS;
        self.start(op_code);
        if let Some(code) = self.config.faults.refuse_reports {
            self.respond(Racp::response(op_code, code));
            return;
        }
        let mut selected = self.select(operator, operand);
        if selected.is_empty() {
            self.respond(Racp::response(op_code, ResponseCode::NO_RECORDS_FOUND));
            return;
        }
        if self.config.newest_first {
            // In sequence order, which on this meter is newest first.
            selected.reverse();
        }
        self.transfer = Some(Transfer {
            order: selected,
            sent: 0,
            memory_len: self.records.len(),
        });
        self.server.push_run();
    }

    /// The record at memory index `i` as it goes on the wire (see [`wire_record`]).
    fn wire_record(&self, i: usize) -> Option<StoredGlucoseRecord> {
        wire_record(
            &self.records,
            self.config.newest_first,
            self.records.len(),
            i,
        )
    }

    /// Indices of the records an operator and operand select, ascending (GLS v1.0 §3.4.2: both bounds
    /// inclusive; "first" is the oldest, "last" the newest). Sequence filters apply to the numbers on the
    /// wire.
    fn select(&self, operator: Operator, operand: &Operand<'_>) -> Vec<usize> {
        let seq = |lo: u16, hi: u16| {
            move |r: &StoredGlucoseRecord| (lo..=hi).contains(&r.sequence_number)
        };
        let time = |lo: Option<DateTime>, hi: Option<DateTime>| {
            move |r: &StoredGlucoseRecord| {
                // A record whose user-facing time cannot be computed matches no time filter.
                r.user_facing_time()
                    .is_some_and(|t| lo.is_none_or(|lo| t >= lo) && hi.is_none_or(|hi| t <= hi))
            }
        };
        let pick = |f: &dyn Fn(&StoredGlucoseRecord) -> bool| -> Vec<usize> {
            (0..self.records.len())
                .filter(|&i| self.wire_record(i).is_some_and(|r| f(&r)))
                .collect()
        };
        let last = self.records.len().checked_sub(1);
        match (operator, *operand) {
            (Operator::ALL_RECORDS, _) => (0..self.records.len()).collect(),
            (Operator::FIRST_RECORD, _) => last.map(|_| 0).into_iter().collect(),
            (Operator::LAST_RECORD, _) => last.into_iter().collect(),
            (Operator::LESS_THAN_OR_EQUAL, Operand::Sequence(v)) => pick(&seq(0, v)),
            (Operator::GREATER_THAN_OR_EQUAL, Operand::Sequence(v)) => pick(&seq(v, u16::MAX)),
            (Operator::WITHIN_RANGE, Operand::SequenceRange { min, max }) => pick(&seq(min, max)),
            (Operator::LESS_THAN_OR_EQUAL, Operand::Time(t)) => pick(&time(None, Some(t))),
            (Operator::GREATER_THAN_OR_EQUAL, Operand::Time(t)) => pick(&time(Some(t), None)),
            (Operator::WITHIN_RANGE, Operand::TimeRange { min, max }) => {
                pick(&time(Some(min), Some(max)))
            }
            // `check_request` has refused every other combination.
            _ => Vec::new(),
        }
    }
}

/// The next record of a Report Stored Records transfer — its 2A18 and, if any, its 2A34 — and after the
/// last one the response code; or the injected fault instead.
fn next_of_transfer(
    records: &[StoredGlucoseRecord],
    config: &GlucometerConfig,
    transfer: &mut Option<Transfer>,
) -> RunStep {
    let Some(t) = transfer else {
        return RunStep::default();
    };
    let faults = config.faults;
    let mut outputs = Vec::with_capacity(2);
    while t.sent < t.order.len() && outputs.is_empty() {
        if faults.drop_link_after_records == Some(t.sent) {
            break;
        }
        let record = t
            .order
            .get(t.sent)
            .and_then(|&i| wire_record(records, config.newest_first, t.memory_len, i));
        t.sent += 1;
        let Some(r) = record else {
            continue;
        };
        outputs.push(Queued::notify(
            uuid::GLUCOSE_MEASUREMENT,
            r.measurement().to_vec(),
            Effect::None,
        ));
        if let Some(value) = r.context.value(r.sequence_number) {
            outputs.push(Queued::notify(uuid::GLUCOSE_CONTEXT, value, Effect::None));
        }
    }
    let dropped = faults.drop_link_after_records == Some(t.sent);
    let more = t.sent < t.order.len() && !dropped;
    if !more {
        *transfer = None;
        if dropped {
            outputs.push(Queued {
                output: DeviceOutput::Disconnect,
                effect: Effect::None,
            });
        } else if !faults.skip_response {
            outputs.push(Queued::notify(
                uuid::RACP,
                Racp::success(OpCode::REPORT_STORED_RECORDS).to_vec(),
                Effect::EndProcedure,
            ));
        }
    }
    RunStep { outputs, more }
}

/// The record at memory index `i` of a memory of `memory_len` records as it goes on the wire: renumbered
/// newest-first on such a meter.
fn wire_record(
    records: &[StoredGlucoseRecord],
    newest_first: bool,
    memory_len: usize,
    i: usize,
) -> Option<StoredGlucoseRecord> {
    let mut r = records.get(i).copied()?;
    if newest_first {
        r.sequence_number = u16::try_from(memory_len.checked_sub(1 + i)?).unwrap_or(u16::MAX);
    }
    Some(r)
}

/// `n` testing times before `now` (real time, oldest first) with the meal each slot implies.
fn testing_times(n: usize, now: i64, rng: &mut StdRng) -> Vec<(i64, Meal)> {
    let today = now.div_euclid(86_400) * 86_400;
    let mut times = Vec::with_capacity(n);
    let mut day = 0i64;
    // The fasting slot is taken every day, so this ends within n + 1 days.
    while times.len() < n {
        for &(slot, meal) in SLOTS.iter().rev() {
            if times.len() == n {
                break;
            }
            let t = today - day * 86_400 + slot + rng.random_range(-1800..=1800);
            if t < now && (meal == Meal::FASTING || rng.random_bool(0.7)) {
                times.push((t, meal));
            }
        }
        day += 1;
    }
    times.reverse();
    times
}
