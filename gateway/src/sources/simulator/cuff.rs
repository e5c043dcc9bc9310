//! A simulated blood-pressure cuff: a Blood Pressure Service sensor (BLS 1.1) as home cuffs implement it.
//!
//! # What it exposes
//!
//! Blood Pressure Measurement 0x2A35 (indicate only: a read is refused, as on the A&D UA-651BLE),
//! Intermediate Cuff Pressure 0x2A36 (notify, when `send_intermediate`), Blood Pressure Feature 0x2A49
//! (read), the clock (Current Time 0x2A2B by default) and the Device Information strings.
//!
//! # How readings leave the cuff
//!
//! Home cuffs have no RACP. When 2A35 indications are enabled, a cuff with `dump_on_subscribe` indicates
//! every stored reading, oldest first (SBM69, Beurer BM59/BM85 resend all stored records; GATT.md "Real
//! devices"). A reading taken while connected is indicated at once, after a few 2A36 cuff-pressure
//! notifications when `send_intermediate` (BLS 1.1 §3.2). With `delete_after_transfer` a reading is
//! deleted once its indication has been taken by the transport (Omron X4 Smart), so a connection dropped
//! mid-dump keeps the rest.
//!
//! Pressures are taken in whole mmHg and sent in the configured unit: mmHg with exponent 0, or kPa with one
//! decimal (exponent −1). MAP is DBP + PP/3, rounded. Every reading carries its Time Stamp (the device
//! clock, real time + `clock_offset_s`), Pulse Rate, Measurement Status, and a User ID when users are
//! configured.
//!
//! # Behaving like a Beurer BM85
//!
//! Two settings model what derdilla/blood-pressure-monitor-fl found on Beurer cuffs, so the gateway's
//! quirk table can be tested against a device rather than a captured payload:
//! [`CuffConfig::beurer_layout`] sends 2A35 in Beurer's layout (PR #735), and
//! [`CuffConfig::ignores_cccd_within`] makes the cuff ignore a CCCD enable that comes too soon after its
//! previous exchange (PR #729). The second needs times, which the model does not read itself: transports
//! pass them with [`SimCuff::connect_at`], [`SimCuff::request_at`] and [`SimCuff::subscribe_at`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use protocol::gatt::Codec;
use protocol::gatt::bp::{
    BloodPressureFeature, BloodPressureMeasurement, IntermediateCuffPressure, MeasurementStatus,
    PressureUnit, USER_ID_UNKNOWN,
};
use protocol::gatt::time::{CurrentTime, DateTime};
use protocol::ieee11073::SFloat;
use protocol::model::MMHG_PER_KPA;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    ClockCharacteristic, ClockWrite, DeviceOutput, Effect, GattServer, Queued, RunStep, SimError,
    apportion, att_error, date_time_at, read_clock, read_dis, sfloat_at, write_clock,
};
use crate::sources::{LinkError, att, uuid};

/// A simulated cuff's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuffConfig {
    /// The device id the gateway knows it by.
    pub id: String,
    /// Model Number String (0x2A24).
    pub model: String,
    /// Serial Number String (0x2A25).
    pub serial: String,
    /// Manufacturer Name String (0x2A29).
    pub manufacturer: String,
    /// The cuff's users (BLS User ID); empty for a cuff without users, whose readings carry no User ID.
    pub users: Vec<u8>,
    /// The unit pressures are sent in.
    pub unit: PressureUnit,
    /// Device clock minus real time, seconds.
    pub clock_offset_s: i64,
    /// Indicate every stored reading when 2A35 is subscribed (default on).
    pub dump_on_subscribe: bool,
    /// Delete each reading once its indication has been taken.
    pub delete_after_transfer: bool,
    /// Has Intermediate Cuff Pressure (2A36) and notifies the cuff pressure during a measurement.
    pub send_intermediate: bool,
    /// Enabling 2A35 / 2A36 needs a bond (ATT 0x0F Insufficient Encryption otherwise: Omron, QardioArm).
    pub requires_bonding: bool,
    /// The Blood Pressure Feature value (0x2A49).
    pub feature: BloodPressureFeature,
    /// Where the clock is.
    pub clock: ClockCharacteristic,
    /// What a clock write does.
    pub clock_write: ClockWrite,
    /// Send each 2A35 indication in the layout of Beurer's BM48 / BM59 / BM85 / ELITE900 family instead of
    /// the specification's: Pulse Rate and Measurement Status big-endian, a User ID octet always present
    /// while flag b3 stays clear, MAP 0 and RFU flag b6 set (derdilla/blood-pressure-monitor-fl PR #735).
    /// A collector reads these values right only if it knows the model (the gateway's quirk table).
    pub beurer_layout: bool,
    /// A CCCD enable that arrives sooner than this after the cuff's previous exchange — the connection,
    /// or the last request it served — is answered as accepted but changes nothing, so nothing is
    /// indicated (Beurer BM85 ignores a CCCD write issued right after discovery; waiting 50–100 ms before
    /// it fixes it, derdilla PR #729). On a real link the exchange before the enable is discovery's.
    /// Through the fake BlueZ, discovery is served from BlueZ's object tree and never reaches the cuff, so
    /// the window runs from the last request the cuff does see (the collector's Device Information and
    /// clock reads): timed from the connection it would include btleplug's own discovery, whose tens of
    /// milliseconds grow with machine load. Only enforced when the transport gives the times
    /// ([`SimCuff::connect_at`], [`SimCuff::request_at`], [`SimCuff::subscribe_at`]); `None`: every enable
    /// counts.
    pub ignores_cccd_within: Option<Duration>,
}

impl CuffConfig {
    /// A one-user mmHg cuff that dumps on subscribe, with this id; the rest as [`Default`].
    pub fn new(id: impl Into<String>) -> Self {
        let id = id.into();
        CuffConfig {
            serial: format!("SN-{id}"),
            id,
            ..Self::default()
        }
    }
}

impl Default for CuffConfig {
    fn default() -> Self {
        CuffConfig {
            id: "sim-cuff".to_owned(),
            model: "SimCuff 200".to_owned(),
            serial: "SN-sim-cuff".to_owned(),
            manufacturer: "PHG Simulated Devices".to_owned(),
            users: vec![1],
            unit: PressureUnit::MmHg,
            clock_offset_s: 0,
            dump_on_subscribe: true,
            delete_after_transfer: false,
            send_intermediate: false,
            requires_bonding: false,
            // Body movement, cuff fit, irregular pulse, pulse-rate range, position (BLS bits 0–4).
            feature: BloodPressureFeature(0x001F),
            clock: ClockCharacteristic::CurrentTime,
            clock_write: ClockWrite::Accept,
            beurer_layout: false,
            ignores_cccd_within: None,
        }
    }
}

/// A reading in the cuff's memory, in wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBpReading {
    /// Identifies the reading inside the model (for delete-after-transfer); not sent.
    key: u64,
    /// The device clock at measurement.
    pub timestamp: DateTime,
    /// The BLS User ID, when the cuff has users.
    pub user_id: Option<u8>,
    /// The unit of the three pressures.
    pub unit: PressureUnit,
    /// Systolic, diastolic, mean arterial pressure and pulse rate (bpm), as their SFLOAT words: a
    /// decoded [`SFloat`] takes four times the room, and a simulated cuff holds thousands of readings
    /// in the gateway's memory (tests/benches/gateway_memory.rs).
    values: [u16; 4],
    /// Measurement Status (BLS 1.1 §3.1.1.6).
    pub status: MeasurementStatus,
}

impl StoredBpReading {
    /// Systolic.
    pub fn systolic(&self) -> SFloat {
        SFloat::from_raw(self.values[0])
    }

    /// Diastolic.
    pub fn diastolic(&self) -> SFloat {
        SFloat::from_raw(self.values[1])
    }

    /// Mean arterial pressure.
    pub fn mean_arterial_pressure(&self) -> SFloat {
        SFloat::from_raw(self.values[2])
    }

    /// Pulse rate, bpm.
    pub fn pulse_rate(&self) -> SFloat {
        SFloat::from_raw(self.values[3])
    }

    /// The 2A35 value.
    pub fn measurement(&self) -> BloodPressureMeasurement<'static> {
        BloodPressureMeasurement {
            timestamp: Some(self.timestamp),
            pulse_rate: Some(self.pulse_rate()),
            user_id: self.user_id,
            measurement_status: Some(self.status),
            ..BloodPressureMeasurement::new(
                self.unit,
                self.systolic(),
                self.diastolic(),
                self.mean_arterial_pressure(),
            )
        }
    }

    /// The 2A35 value as a Beurer BM48 / BM59 / BM85 / ELITE900 sends it. Written from the layout
    /// derdilla/blood-pressure-monitor-fl PR #735 describes, not with the protocol crate's encoder: that
    /// one writes only the specification's layout (the gateway never has to send Beurer's), and a
    /// simulator built on the decoder's own idea of the quirk could not catch a mistake in it.
    ///
    /// ```text
    /// Flags: unit b0 | Time Stamp b1 | Pulse Rate b2 | Measurement Status b4 | RFU b6 — b3 (User ID) clear
    /// SYS SFLOAT LE | DIA SFLOAT LE | MAP 0 | Time Stamp | Pulse Rate SFLOAT BE | User ID | Status u16 BE
    /// ```
    ///
    /// The User ID octet is sent even by a cuff without users, as 255 "unknown user".
    pub fn beurer_value(&self) -> Vec<u8> {
        const TIME_STAMP: u8 = 0x02;
        const PULSE_RATE: u8 = 0x04;
        const MEASUREMENT_STATUS: u8 = 0x10;
        const RFU_B6: u8 = 0x40;
        let mut v = Vec::with_capacity(1 + 3 * SFloat::LEN + DateTime::LEN + SFloat::LEN + 1 + 2);
        v.push(self.unit.flag_bit() | TIME_STAMP | PULSE_RATE | MEASUREMENT_STATUS | RFU_B6);
        v.extend(self.systolic().to_le_bytes());
        v.extend(self.diastolic().to_le_bytes());
        // Beurer cuffs send no mean arterial pressure: MAP 0.
        v.extend([0, 0]);
        v.extend(self.timestamp.to_vec());
        v.extend(self.pulse_rate().to_raw().to_be_bytes());
        v.push(self.user_id.unwrap_or(USER_ID_UNKNOWN));
        v.extend(self.status.0.to_be_bytes());
        v
    }
}

/// The mix of readings [`SimCuff::generate_with`] produces: fractions (0.0–1.0) of the readings that get
/// each status, rounded to whole counts. The default is all clean.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BpMix {
    /// Body movement (status b0): a low-quality reading.
    pub body_movement: f64,
    /// Irregular pulse (status b2): flagged, not low quality.
    pub irregular_pulse: f64,
    /// Cuff too loose (status b1): a low-quality reading.
    pub cuff_too_loose: f64,
}

/// The measuring times of a day, seconds after midnight (morning, evening).
const SLOTS: [i64; 2] = [7 * 3600 + 1800, 21 * 3600];

/// A simulated cuff (see the module doc).
#[derive(Debug)]
pub struct SimCuff {
    config: CuffConfig,
    /// Oldest first.
    readings: Vec<StoredBpReading>,
    next_key: u64,
    clock_offset_s: i64,
    adjust_reason: u8,
    server: GattServer,
    /// The cuff's last exchange on the current connection — the connection itself or the last request —
    /// if the transport gave its time ([`SimCuff::connect_at`], [`SimCuff::request_at`]).
    last_exchange: Option<Instant>,
    /// CCCD enables ignored for coming too soon ([`CuffConfig::ignores_cccd_within`]), over all connections.
    ignored_cccd_enables: usize,
    /// The dumps of stored readings being sent, oldest first; each has its place in the outbox as an
    /// [`Entry::Run`](super::Entry::Run).
    dumps: VecDeque<Dump>,
}

/// A dump of the stored readings under way: those with keys in `next_key..end_key` (the memory at the
/// subscribe; keys rise with the memory's order) are still to be indicated.
#[derive(Debug, Clone, Copy)]
struct Dump {
    next_key: u64,
    end_key: u64,
}

impl SimCuff {
    /// A cuff with an empty memory.
    pub fn new(config: CuffConfig) -> Self {
        SimCuff {
            clock_offset_s: config.clock_offset_s,
            config,
            readings: Vec::new(),
            next_key: 0,
            adjust_reason: 0,
            server: GattServer::default(),
            last_exchange: None,
            ignored_cccd_enables: 0,
            dumps: VecDeque::new(),
        }
    }

    /// The configuration it was built with (the clock may have been set since; see
    /// [`Self::clock_offset_s`]).
    pub fn config(&self) -> &CuffConfig {
        &self.config
    }

    /// The stored readings, oldest first.
    pub fn readings(&self) -> &[StoredBpReading] {
        &self.readings
    }

    /// Device clock minus real time, seconds.
    pub fn clock_offset_s(&self) -> i64 {
        self.clock_offset_s
    }

    /// The Current Time value at real time `now`.
    pub fn current_time(&self, now: i64) -> CurrentTime {
        super::current_time_at(now.saturating_add(self.clock_offset_s), self.adjust_reason)
    }

    // ----- readings -----------------------------------------------------------------------------------

    /// Takes a reading for `user` at real time `now` (pressures in mmHg, pulse in bpm). If connected, the
    /// reading goes out at once: 2A36 cuff pressures first (when `send_intermediate` and 2A36 is
    /// subscribed), then its 2A35 indication (when 2A35 is subscribed). Returns how many notifications
    /// were queued for the transport.
    ///
    /// # Errors
    /// [`SimError::UnknownUser`], [`SimError::ClockOutOfRange`], [`SimError::Unrepresentable`]; the cuff is
    /// unchanged.
    pub fn measure(
        &mut self,
        user: u8,
        systolic: u16,
        diastolic: u16,
        pulse: u16,
        status: MeasurementStatus,
        now: i64,
    ) -> Result<usize, SimError> {
        let reading = self.reading(now, user, systolic, diastolic, pulse, status)?;
        // Inflate past systolic, then deflate through the oscillometric window.
        let peak = systolic.saturating_add(30);
        let ramp = [
            peak / 3,
            peak / 3 * 2,
            peak,
            systolic.saturating_add(10),
            systolic / 2 + diastolic / 2,
            diastolic.saturating_sub(5),
        ]
        .map(|mmhg| self.pressure(f64::from(mmhg)));
        self.readings.push(reading);
        if self.server.connection.is_none() {
            return Ok(0);
        }
        let mut queued = 0;
        if self.config.send_intermediate && self.server.enabled(uuid::INTERMEDIATE_CUFF_PRESSURE) {
            // Below systolic + 30 mmHg, so every step fits an SFLOAT whenever systolic did.
            for cuff_pressure in ramp.into_iter().flatten() {
                let icp = IntermediateCuffPressure {
                    user_id: reading.user_id,
                    ..IntermediateCuffPressure::new(self.config.unit, cuff_pressure)
                };
                self.server
                    .notify(uuid::INTERMEDIATE_CUFF_PRESSURE, icp.to_vec(), Effect::None);
                queued += 1;
            }
        }
        if self.server.enabled(uuid::BP_MEASUREMENT) {
            self.indicate(reading);
            queued += 1;
        }
        Ok(queued)
    }

    /// Fills the memory with `n` clean readings taken before `now` (see [`Self::generate_with`]).
    ///
    /// # Errors
    /// As [`Self::generate_with`].
    pub fn generate(&mut self, n: usize, now: i64, seed: u64) -> Result<(), SimError> {
        self.generate_with(n, now, seed, &BpMix::default())
    }

    /// Fills the memory with `n` readings taken before `now`, deterministic for a `seed`; nothing is sent.
    ///
    /// Each user measures in the morning (07:30) and on about half the evenings (21:00), ±30 min, a few
    /// minutes after the previous user, going back as many days as `n` needs. Each user has a baseline;
    /// readings vary around it within 105–150 / 65–95 mmHg, pulse 55–90 bpm, pulse pressure at least 25.
    /// `mix` gives some readings a body-movement, irregular-pulse or loose-cuff status.
    ///
    /// # Errors
    /// [`SimError::ClockOutOfRange`] or [`SimError::Unrepresentable`]; readings generated before the failure
    /// stay.
    pub fn generate_with(
        &mut self,
        n: usize,
        now: i64,
        seed: u64,
        mix: &BpMix,
    ) -> Result<(), SimError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let users: Vec<u8> = if self.config.users.is_empty() {
            vec![USER_ID_UNKNOWN]
        } else {
            self.config.users.clone()
        };
        let statuses = apportion(
            n,
            &[
                (MeasurementStatus::BODY_MOVEMENT, mix.body_movement),
                (MeasurementStatus::IRREGULAR_PULSE, mix.irregular_pulse),
                (MeasurementStatus::CUFF_TOO_LOOSE, mix.cuff_too_loose),
            ],
            MeasurementStatus::default(),
            &mut rng,
        );
        let today = now.div_euclid(86_400) * 86_400;
        let mut times: Vec<(i64, usize)> = Vec::with_capacity(n);
        let mut day = 0i64;
        // The morning slot is taken every day, so this ends within n + 1 days.
        'days: while times.len() < n {
            for (s, &slot) in SLOTS.iter().enumerate().rev() {
                let jitter = rng.random_range(-1800..=1800);
                let evening = s > 0;
                if evening && !rng.random_bool(0.5) {
                    continue;
                }
                for (u, _) in users.iter().enumerate() {
                    if times.len() == n {
                        break 'days;
                    }
                    let t = today - day * 86_400 + slot + jitter + 240 * u as i64;
                    if t < now {
                        times.push((t, u));
                    }
                }
            }
            day += 1;
        }
        times.sort_unstable();
        for ((t, u), status) in times.into_iter().zip(statuses) {
            let user = users.get(u).copied().unwrap_or(USER_ID_UNKNOWN);
            let (sys, dia, pulse) = typical_values(user, &mut rng);
            let reading = self.reading(t, user, sys, dia, pulse, status)?;
            self.readings.push(reading);
        }
        Ok(())
    }

    /// Takes one realistic reading at `now` for a user picked at random, deterministic for a `seed`, and
    /// sends it if connected, as [`Self::measure`] does (a "live" reading for the demo). The values follow
    /// the same per-user baseline as [`Self::generate_with`]; each `mix` fraction is the probability of
    /// that status. Returns how many notifications were queued.
    ///
    /// # Errors
    /// As [`Self::measure`].
    pub fn measure_random(&mut self, now: i64, seed: u64, mix: &BpMix) -> Result<usize, SimError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let user = if self.config.users.is_empty() {
            USER_ID_UNKNOWN
        } else {
            let i = rng.random_range(0..self.config.users.len());
            self.config.users.get(i).copied().unwrap_or(USER_ID_UNKNOWN)
        };
        let (sys, dia, pulse) = typical_values(user, &mut rng);
        let mut status = MeasurementStatus::default();
        for (bit, p) in [
            (MeasurementStatus::BODY_MOVEMENT, mix.body_movement),
            (MeasurementStatus::IRREGULAR_PULSE, mix.irregular_pulse),
            (MeasurementStatus::CUFF_TOO_LOOSE, mix.cuff_too_loose),
        ] {
            if rng.random_bool(p.clamp(0.0, 1.0)) {
                status = MeasurementStatus(status.0 | bit.0);
            }
        }
        self.measure(user, sys, dia, pulse, status, now)
    }

    /// A reading in wire form, validated; not stored.
    fn reading(
        &mut self,
        now: i64,
        user: u8,
        systolic: u16,
        diastolic: u16,
        pulse: u16,
        status: MeasurementStatus,
    ) -> Result<StoredBpReading, SimError> {
        let user_id = if self.config.users.is_empty() {
            None
        } else if user == USER_ID_UNKNOWN || self.config.users.contains(&user) {
            Some(user)
        } else {
            return Err(SimError::UnknownUser(user));
        };
        let timestamp = date_time_at(now.saturating_add(self.clock_offset_s))?;
        let (sys, dia) = (f64::from(systolic), f64::from(diastolic));
        let map = (dia + (sys - dia) / 3.0).round();
        let reading = StoredBpReading {
            key: self.next_key,
            timestamp,
            user_id,
            unit: self.config.unit,
            values: [
                self.pressure(sys)?.to_raw(),
                self.pressure(dia)?.to_raw(),
                self.pressure(map)?.to_raw(),
                sfloat_at(f64::from(pulse), 1.0, 0)?.to_raw(),
            ],
            status,
        };
        self.next_key += 1;
        Ok(reading)
    }

    /// A pressure given in mmHg, in the configured unit: whole mmHg, or kPa to 0.1.
    fn pressure(&self, mmhg: f64) -> Result<SFloat, SimError> {
        match self.config.unit {
            PressureUnit::MmHg => sfloat_at(mmhg, 1.0, 0),
            PressureUnit::KPa => sfloat_at(mmhg / MMHG_PER_KPA, 10.0, -1),
        }
    }

    fn indicate(&mut self, reading: StoredBpReading) {
        self.server.push(indication(&self.config, reading));
    }

    // ----- GATT server --------------------------------------------------------------------------------

    /// The characteristics the cuff exposes.
    pub fn characteristics(&self) -> Vec<u16> {
        let mut c = vec![uuid::BP_MEASUREMENT];
        if self.config.send_intermediate {
            c.push(uuid::INTERMEDIATE_CUFF_PRESSURE);
        }
        c.push(uuid::BP_FEATURE);
        c.extend(self.config.clock.uuid());
        c.extend([
            uuid::MODEL_NUMBER,
            uuid::SERIAL_NUMBER,
            uuid::MANUFACTURER_NAME,
        ]);
        c
    }

    /// Whether the cuff exposes `uuid`.
    pub fn has(&self, uuid: u16) -> bool {
        self.characteristics().contains(&uuid)
    }

    /// A central connects; returns the connection id. The time is not known, so
    /// [`CuffConfig::ignores_cccd_within`] applies only once a request has given one.
    pub fn connect(&mut self) -> u64 {
        self.last_exchange = None;
        self.dumps.clear();
        self.server.connect()
    }

    /// A central connects at `at`; returns the connection id. A CCCD enable given to
    /// [`SimCuff::subscribe_at`] is measured from here, or from a later request.
    pub fn connect_at(&mut self, at: Instant) -> u64 {
        self.dumps.clear();
        let connection = self.server.connect();
        self.last_exchange = Some(at);
        connection
    }

    /// A read or write from the central arrives at `at`: a transport calls this before applying it, so
    /// that [`CuffConfig::ignores_cccd_within`] measures from it. (A CCCD enable carries its own time,
    /// [`SimCuff::subscribe_at`].) Nothing else changes; without a connection it is not an exchange.
    pub fn request_at(&mut self, at: Instant) {
        if self.server.connection.is_some() {
            self.last_exchange = Some(at);
        }
    }

    /// The connection ends; readings not yet indicated stay stored.
    pub fn disconnect(&mut self) {
        self.last_exchange = None;
        self.dumps.clear();
        self.server.disconnect();
    }

    /// How many CCCD enables were ignored for coming too soon ([`CuffConfig::ignores_cccd_within`]), over
    /// all connections.
    pub fn ignored_cccd_enables(&self) -> usize {
        self.ignored_cccd_enables
    }

    /// The current connection's id.
    pub fn connection(&self) -> Option<u64> {
        self.server.connection
    }

    /// Pairs and bonds; the bond outlives connections.
    pub fn bond(&mut self) {
        self.server.bonded = true;
    }

    /// Whether the cuff is bonded.
    pub fn is_bonded(&self) -> bool {
        self.server.bonded
    }

    /// Reads a characteristic at real time `now`.
    ///
    /// # Errors
    /// [`LinkError::Disconnected`], [`LinkError::Missing`], ATT 0x02 for 2A35 / 2A36 (indicate / notify
    /// only).
    pub fn read(&mut self, uuid: u16, now: i64) -> Result<Vec<u8>, LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        if uuid == uuid::BP_FEATURE {
            return Ok(self.config.feature.to_vec());
        }
        if Some(uuid) == self.config.clock.uuid() {
            let clock = now.saturating_add(self.clock_offset_s);
            return read_clock(self.config.clock, clock, self.adjust_reason)
                .ok_or(LinkError::Missing(uuid));
        }
        let c = &self.config;
        read_dis(uuid, &c.model, &c.serial, &c.manufacturer)
            .ok_or(LinkError::Att(att_error::READ_NOT_PERMITTED))
    }

    /// Writes a characteristic (only the clock is writable).
    ///
    /// # Errors
    /// [`LinkError::Disconnected`], [`LinkError::Missing`], ATT 0x03, the clock's ATT errors.
    pub fn write(&mut self, uuid: u16, value: &[u8], now: i64) -> Result<(), LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        if Some(uuid) == self.config.clock.uuid() {
            if let Some(written) = write_clock(self.config.clock, self.config.clock_write, value)? {
                self.clock_offset_s = written.saturating_sub(now);
                self.adjust_reason = CurrentTime::ADJUST_EXTERNAL_REFERENCE;
            }
            return Ok(());
        }
        Err(LinkError::Att(att_error::WRITE_NOT_PERMITTED))
    }

    /// Enables indications (2A35) or notifications (2A36, 2A2B). Enabling 2A35 on a cuff that dumps on
    /// subscribe queues every stored reading's indication, oldest first. The time is not known, so the
    /// enable is never ignored for coming too soon (see [`SimCuff::subscribe_at`]).
    ///
    /// # Errors
    /// [`LinkError::Disconnected`], [`LinkError::Missing`], ATT 0x06 for a characteristic without a CCCD,
    /// ATT 0x0F for 2A35 / 2A36 on a cuff that requires a bond and has none.
    pub fn subscribe(&mut self, uuid: u16) -> Result<(), LinkError> {
        self.enable(uuid, None)
    }

    /// [`SimCuff::subscribe`] with the enable arriving at `at`. On a cuff with
    /// [`CuffConfig::ignores_cccd_within`], an enable sooner than that after the previous exchange
    /// ([`SimCuff::connect_at`], [`SimCuff::request_at`], an earlier enable) is answered `Ok` — the ATT
    /// write succeeds, as on the BM85 — but enables nothing and dumps nothing.
    ///
    /// # Errors
    /// As [`SimCuff::subscribe`]; they are checked before the timing, as the device's ATT layer would.
    pub fn subscribe_at(&mut self, uuid: u16, at: Instant) -> Result<(), LinkError> {
        let previous = self.last_exchange;
        let r = self.enable(uuid, previous.zip(Some(at)));
        self.request_at(at);
        r
    }

    /// `times`: the previous exchange and this enable, when the transport gave them.
    fn enable(&mut self, uuid: u16, times: Option<(Instant, Instant)>) -> Result<(), LinkError> {
        self.server.require_connected()?;
        if !self.has(uuid) {
            return Err(LinkError::Missing(uuid));
        }
        let measurement = matches!(
            uuid,
            uuid::BP_MEASUREMENT | uuid::INTERMEDIATE_CUFF_PRESSURE
        );
        if !measurement && uuid != uuid::CURRENT_TIME {
            return Err(LinkError::Att(att_error::REQUEST_NOT_SUPPORTED));
        }
        if measurement && self.config.requires_bonding && !self.server.bonded {
            return Err(LinkError::Att(att::INSUFFICIENT_ENCRYPTION));
        }
        let too_soon = match (self.config.ignores_cccd_within, times) {
            (Some(window), Some((previous, at))) => at.saturating_duration_since(previous) < window,
            _ => false,
        };
        if too_soon {
            self.ignored_cccd_enables += 1;
            return Ok(());
        }
        self.server.cccds.insert(uuid);
        if uuid == uuid::BP_MEASUREMENT
            && self.config.dump_on_subscribe
            && !self.readings.is_empty()
        {
            self.dumps.push_back(Dump {
                next_key: 0,
                end_key: self.next_key,
            });
            self.server.push_run();
        }
        Ok(())
    }

    /// Takes the next output.
    pub fn poll_output(&mut self) -> Option<DeviceOutput> {
        let (readings, config, dumps) = (&self.readings, &self.config, &mut self.dumps);
        let q = self.server.pop(|| next_of_dump(readings, config, dumps))?;
        if let Effect::Delivered(key) = q.effect
            && self.config.delete_after_transfer
        {
            self.readings.retain(|r| r.key != key);
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
}

/// A stored reading's 2A35 indication, in the cuff's layout; taking it delivers the reading.
fn indication(config: &CuffConfig, reading: StoredBpReading) -> Queued {
    let value = if config.beurer_layout {
        reading.beurer_value()
    } else {
        reading.measurement().to_vec()
    };
    Queued::notify(uuid::BP_MEASUREMENT, value, Effect::Delivered(reading.key))
}

/// The next reading of the oldest dump under way, as its indication.
fn next_of_dump(
    readings: &[StoredBpReading],
    config: &CuffConfig,
    dumps: &mut VecDeque<Dump>,
) -> RunStep {
    let Some(dump) = dumps.front_mut() else {
        return RunStep::default();
    };
    // Oldest first, so the keys rise along the memory.
    let at = readings.partition_point(|r| r.key < dump.next_key);
    let in_dump = |i: usize| readings.get(i).filter(|r| r.key < dump.end_key).copied();
    let Some(reading) = in_dump(at) else {
        dumps.pop_front();
        return RunStep::default();
    };
    let more = in_dump(at + 1).is_some();
    dump.next_key = reading.key + 1;
    if !more {
        dumps.pop_front();
    }
    RunStep {
        outputs: vec![indication(config, reading)],
        more,
    }
}

/// Systolic, diastolic (mmHg) and pulse (bpm) for one reading of `user`: around the user's own baseline
/// (derived from the user id, so it is the same in every batch), within 105–150 / 65–95 mmHg, pulse
/// pressure at least 25, pulse 55–90.
fn typical_values(user: u8, rng: &mut StdRng) -> (u16, u16, u16) {
    let mut own = StdRng::seed_from_u64(u64::from(user));
    let (sys_base, dia_base, pulse_base): (u16, u16, u16) = (
        own.random_range(112..=138),
        own.random_range(70..=85),
        own.random_range(60..=80),
    );
    let dia = (dia_base + rng.random_range(0..=14))
        .saturating_sub(7)
        .clamp(65, 95);
    let sys = (sys_base + rng.random_range(0..=20))
        .saturating_sub(10)
        .clamp(105, 150)
        .max(dia + 25);
    let pulse = (pulse_base + rng.random_range(0..=16))
        .saturating_sub(8)
        .clamp(55, 90);
    (sys, dia, pulse)
}
