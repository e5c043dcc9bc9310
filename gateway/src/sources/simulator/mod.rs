//! Simulated Bluetooth LE health devices: byte-exact GATT servers without a radio.
//!
//! # Layout
//!
//! - [`glucometer`] — [`SimGlucometer`], the sensor role of the Glucose Profile (GLS v1.0): stored records,
//!   the Record Access Control Point with every GLS.TS sensor rule, Current Time, Device Information.
//! - [`cuff`] — [`SimCuff`], a Blood Pressure Service sensor (BLS 1.1) without RACP: it indicates its stored
//!   readings when 2A35 is subscribed and each new reading as it is taken (GATT.md "Real devices").
//! - this module — what both share: [`DeviceOutput`], [`SimError`], the clock characteristic options,
//!   [`SimDevice`] (a shared handle on one model) and [`SimLink`], the [`GattLink`] a collector runs over.
//!
//! # Models and transports
//!
//! The models are pure state machines (STYLE.md practice 7): no IO and no clock. Every input that needs the
//! time takes `now` (Unix seconds, UTC). Inputs are the GATT server's events — `connect`, `disconnect`,
//! `read`, `write`, `subscribe`, `bond` — and the user's (`add_record`, `measure`, `generate`).
//!
//! Outputs are *pulled*: a model queues what it will send, and the transport takes one
//! [`DeviceOutput`] at a time with `poll_output`. A notification counts as delivered when it is taken.
//! GLS needs that split because a RACP procedure stays "in progress" until its Response Code indication
//! has gone out (GLS v1.0 §3.4; GLS.TS GLS/SEN/SPE/BI-07, ATT 0x80). A model that handed back a whole
//! transfer at once could not answer "in progress?" or drop the unsent rest when an Abort arrives. A fault
//! injected into the link ("drop the connection after N records") is an output too, so it lands exactly
//! between two notifications.
//!
//! A transport only moves bytes. [`SimLink`] does it in-process for the collector and the demo; the fake
//! BlueZ D-Bus service (BLUEZ.md) will do the same with `PropertiesChanged` signals. Neither re-implements
//! any profile rule.

pub mod cuff;
pub mod glucometer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::gatt::Codec;
use protocol::gatt::device_info::{ManufacturerName, ModelNumber, SerialNumber};
use protocol::gatt::time::{CurrentTime, DateTime};
use protocol::ieee11073::SFloat;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use tokio::sync::Notify;

pub use cuff::{BpMix, CuffConfig, SimCuff, StoredBpReading};
pub use glucometer::{
    GlucometerConfig, GlucometerFaults, GlucoseMix, GlucoseSample, RecordContext, SimGlucometer,
    StoredGlucoseRecord,
};

use super::{GattLink, LinkError, Notification, uuid};

/// ATT error codes the simulated servers answer with, beyond the ones collectors must tell apart
/// ([`super::att`]). Core Spec Vol 3 Part F §3.4.1.1.
pub mod att_error {
    /// Read Not Permitted: the characteristic has no Read property (2A18, 2A52, 2A35 …).
    pub const READ_NOT_PERMITTED: u8 = 0x02;
    /// Write Not Permitted: the characteristic has no Write property.
    pub const WRITE_NOT_PERMITTED: u8 = 0x03;
    /// Request Not Supported: e.g. enabling notifications on a characteristic that has no CCCD.
    pub const REQUEST_NOT_SUPPORTED: u8 = 0x06;
    /// Invalid Attribute Value Length: a RACP write shorter than op code + operator.
    pub const INVALID_ATTRIBUTE_VALUE_LENGTH: u8 = 0x0D;
    /// "Data field ignored" (0x80 on the Current Time characteristic, CTS): what some Omron cuffs answer to
    /// a time write (hass-omron #11).
    pub const DATA_FIELD_IGNORED: u8 = 0x80;
}

/// What a simulated device sends next; pulled by the transport one at a time (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOutput {
    /// A notification or an indication.
    Notify(Notification),
    /// The device drops the connection (fault injection). The model has already reset its connection
    /// state when it hands this out.
    Disconnect,
}

/// Why a model refused a user-side input (`add_record`, `measure`, `generate`). The model is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// A value does not fit an SFLOAT at the resolution the profile prescribes (GLS.TS CN/BV: glucose
    /// exponent −5 for kg/L, −4 for mol/L), or is not a finite number.
    #[error("value not representable as an SFLOAT at the profile's resolution")]
    Unrepresentable,
    /// The device clock would fall outside the years 1582..=9999 that a Date Time can carry.
    #[error("device clock outside the years 1582..=9999")]
    ClockOutOfRange,
    /// All 65 536 sequence numbers are used: GLS v1.0 §3.1.1.2 says they never roll over.
    #[error("sequence numbers exhausted (they never roll over)")]
    SequenceExhausted,
    /// The cuff has users configured and this is not one of them (nor 255, "unknown user").
    #[error("user {0} is not configured on this cuff")]
    UnknownUser(u8),
}

/// Which characteristic holds the device's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockCharacteristic {
    /// Current Time 0x2A2B (CTS), the usual one.
    #[default]
    CurrentTime,
    /// Date Time 0x2A08 inside the device's service (Roche Accu-Chek Aviva Connect, GATT.md "Time").
    DateTime,
    /// No readable clock (TaiDoc DM30b, GATT.md): the collector cannot measure the clock offset.
    None,
}

impl ClockCharacteristic {
    /// The characteristic's UUID, if there is one.
    pub fn uuid(self) -> Option<u16> {
        match self {
            ClockCharacteristic::CurrentTime => Some(uuid::CURRENT_TIME),
            ClockCharacteristic::DateTime => Some(uuid::DATE_TIME),
            ClockCharacteristic::None => None,
        }
    }
}

/// What the device does with a write to its clock characteristic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockWrite {
    /// Sets the clock (GLS.TS GLS/SEN/SPT/BV-01, time update).
    #[default]
    Accept,
    /// ATT 0x03 Write Not Permitted: a read-only clock.
    NotPermitted,
    /// ATT 0x80 and the clock stays as it was (Omron HEM-6232T-E, hass-omron #11; Spezi treats it as
    /// success).
    DataFieldIgnored,
}

/// The device's Date Time at `device_secs` (its own clock, seconds since the epoch read as UTC).
fn date_time_at(device_secs: i64) -> Result<DateTime, SimError> {
    DateTime::from_epoch_seconds(device_secs).ok_or(SimError::ClockOutOfRange)
}

/// The Current Time value at `device_secs`. A clock outside what a Date Time can carry reads as "unknown"
/// (all zeros, day of week 0) rather than failing the read.
fn current_time_at(device_secs: i64, adjust_reason: u8) -> CurrentTime {
    match DateTime::from_epoch_seconds(device_secs) {
        Some(date_time) => CurrentTime {
            date_time,
            // 1970-01-01 was a Thursday; CTS counts Monday = 1 … Sunday = 7.
            day_of_week: (device_secs.div_euclid(86_400) + 3).rem_euclid(7) as u8 + 1,
            fractions256: 0,
            adjust_reason,
        },
        None => CurrentTime::default(),
    }
}

/// Reads the clock characteristic `clock` with the device clock at `device_secs`.
fn read_clock(clock: ClockCharacteristic, device_secs: i64, adjust_reason: u8) -> Option<Vec<u8>> {
    let ct = current_time_at(device_secs, adjust_reason);
    match clock {
        ClockCharacteristic::CurrentTime => Some(ct.to_vec()),
        ClockCharacteristic::DateTime => Some(ct.date_time.to_vec()),
        ClockCharacteristic::None => None,
    }
}

/// A write to the clock characteristic: the instant written (seconds since the epoch read as UTC), or the
/// ATT error to answer. `Ok(None)` when the device accepts the write but ignores it.
fn write_clock(
    clock: ClockCharacteristic,
    policy: ClockWrite,
    value: &[u8],
) -> Result<Option<i64>, LinkError> {
    match policy {
        ClockWrite::NotPermitted => return Err(LinkError::Att(att_error::WRITE_NOT_PERMITTED)),
        ClockWrite::DataFieldIgnored => return Err(LinkError::Att(att_error::DATA_FIELD_IGNORED)),
        ClockWrite::Accept => {}
    }
    let written = match clock {
        ClockCharacteristic::CurrentTime => CurrentTime::parse(value).map(|c| c.date_time),
        ClockCharacteristic::DateTime => DateTime::parse(value),
        ClockCharacteristic::None => return Ok(None),
    };
    match written.ok().and_then(|t| t.to_epoch_seconds()) {
        Some(secs) => Ok(Some(secs)),
        // An unparseable or incomplete date is not a time the device can set.
        None => Err(LinkError::Att(att_error::INVALID_ATTRIBUTE_VALUE_LENGTH)),
    }
}

/// The Device Information strings (DIS 1.1), or `None` for another UUID.
fn read_dis(uuid: u16, model: &str, serial: &str, manufacturer: &str) -> Option<Vec<u8>> {
    match uuid {
        uuid::MODEL_NUMBER => Some(ModelNumber::new(model).to_vec()),
        uuid::SERIAL_NUMBER => Some(SerialNumber::new(serial).to_vec()),
        uuid::MANUFACTURER_NAME => Some(ManufacturerName::new(manufacturer).to_vec()),
        _ => None,
    }
}

/// `value × scale` rounded to a mantissa, sent with `exponent`: a fixed resolution as the profiles
/// prescribe, never a "best fit" exponent.
fn sfloat_at(value: f64, scale: f64, exponent: i8) -> Result<SFloat, SimError> {
    let m = (value * scale).round();
    if !m.is_finite() || !(-2048.0..=2047.0).contains(&m) {
        return Err(SimError::Unrepresentable);
    }
    SFloat::new(m as i32, exponent).map_err(|_| SimError::Unrepresentable)
}

/// `n` values: `round(fraction × n)` of each listed value at random positions, the rest `default`. Exact
/// counts rather than per-item coin flips, so a small generated batch still exercises every kind asked
/// for. Later kinds get fewer if the fractions add up to more than 1.
fn apportion<K: Copy>(n: usize, parts: &[(K, f64)], default: K, rng: &mut StdRng) -> Vec<K> {
    let mut kinds = vec![default; n];
    let mut positions: Vec<usize> = (0..n).collect();
    positions.shuffle(rng);
    let mut free = positions.into_iter();
    for &(kind, fraction) in parts {
        let count = (fraction.clamp(0.0, 1.0) * n as f64).round() as usize;
        for i in free.by_ref().take(count) {
            if let Some(k) = kinds.get_mut(i) {
                *k = kind;
            }
        }
    }
    kinds
}

/// What happens when a queued output is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Nothing.
    None,
    /// The RACP procedure ends: this was its Response Code (or Number of Records) indication.
    EndProcedure,
    /// The cuff's reading with this key was delivered (deleted if the cuff deletes after transfer).
    Delivered(u64),
}

/// One queued output and what taking it does.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Queued {
    output: DeviceOutput,
    effect: Effect,
}

impl Queued {
    fn notify(uuid: u16, value: Vec<u8>, effect: Effect) -> Queued {
        Queued {
            output: DeviceOutput::Notify(Notification { uuid, value }),
            effect,
        }
    }
}

/// A place in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// An output, encoded.
    Ready(Queued),
    /// A run of stored records the model has not encoded yet — a RACP transfer, a cuff's dump. The model
    /// keeps the run's cursor and turns it into outputs one record at a time as the transport takes them
    /// ([`GattServer::pop`]): a real device paces a transfer over the air, and a gateway process that runs
    /// simulated devices must not hold every device's whole memory twice, encoded, at once.
    Run,
}

/// What a model's run gives when the outbox reaches it: the outputs of its next record (and, after the
/// last, whatever ends it), and whether the run goes on.
#[derive(Debug, Default)]
struct RunStep {
    outputs: Vec<Queued>,
    more: bool,
}

/// The connection-scoped part of a GATT server, the same for every model: which connection is current,
/// the bond, the CCCDs and the outbox.
#[derive(Debug, Default)]
struct GattServer {
    /// The current connection's id; `None` when disconnected.
    connection: Option<u64>,
    /// Connections made so far (ids are 1, 2, …).
    connections: u64,
    /// Bonded (paired): the link is encrypted and authenticated on every connection.
    bonded: bool,
    /// Characteristics whose notifications / indications are enabled.
    cccds: BTreeSet<u16>,
    /// Outputs not yet taken by the transport, and the runs of records not yet encoded.
    outbox: VecDeque<Entry>,
}

impl GattServer {
    /// A new connection; a current one is dropped first (a device serves one central at a time).
    fn connect(&mut self) -> u64 {
        self.disconnect();
        self.connections = self.connections.wrapping_add(1);
        self.connection = Some(self.connections);
        self.connections
    }

    /// Ends the connection: undelivered outputs are lost. CCCDs survive only for a bonded peer (Core Spec
    /// Vol 3 Part G §3.3.3.3: the configuration persists across connections for bonded devices).
    fn disconnect(&mut self) {
        self.connection = None;
        self.outbox.clear();
        if !self.bonded {
            self.cccds.clear();
        }
    }

    fn require_connected(&self) -> Result<(), LinkError> {
        if self.connection.is_some() {
            Ok(())
        } else {
            Err(LinkError::Disconnected)
        }
    }

    fn enabled(&self, uuid: u16) -> bool {
        self.cccds.contains(&uuid)
    }

    fn push(&mut self, q: Queued) {
        self.outbox.push_back(Entry::Ready(q));
    }

    /// Queues a run of records behind what is queued; the model keeps its cursor (see [`Entry::Run`]).
    fn push_run(&mut self) {
        self.outbox.push_back(Entry::Run);
    }

    /// Whether an output is waiting. A run in the outbox always has a record left: a model's
    /// `next_of_run` says `more: false` with the last one.
    fn has_output(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The next output for the transport. A run at the front is expanded first, one record at a time,
    /// by `next_of_run` (the model's cursor of its oldest run), so the queue holds a few outputs at most:
    /// a record's, a measurement's pressures.
    fn pop(&mut self, mut next_of_run: impl FnMut() -> RunStep) -> Option<Queued> {
        loop {
            match self.outbox.pop_front()? {
                Entry::Ready(q) => return Some(q),
                Entry::Run => {
                    let step = next_of_run();
                    if step.more {
                        self.outbox.push_front(Entry::Run);
                    }
                    for q in step.outputs.into_iter().rev() {
                        self.outbox.push_front(Entry::Ready(q));
                    }
                }
            }
        }
    }

    fn notify(&mut self, uuid: u16, value: Vec<u8>, effect: Effect) {
        self.push(Queued::notify(uuid, value, effect));
    }

    /// Queues a notification ahead of everything else.
    fn notify_first(&mut self, uuid: u16, value: Vec<u8>, effect: Effect) {
        self.outbox
            .push_front(Entry::Ready(Queued::notify(uuid, value, effect)));
    }
}

// ---------------------------------------------------------------------------------------------------------
// One model, either kind
// ---------------------------------------------------------------------------------------------------------

/// A simulated device of either kind.
#[derive(Debug)]
pub enum SimModel {
    /// A glucometer.
    Glucometer(SimGlucometer),
    /// A blood-pressure cuff.
    Cuff(SimCuff),
}

impl From<SimGlucometer> for SimModel {
    fn from(g: SimGlucometer) -> Self {
        SimModel::Glucometer(g)
    }
}

impl From<SimCuff> for SimModel {
    fn from(c: SimCuff) -> Self {
        SimModel::Cuff(c)
    }
}

impl SimModel {
    /// The configured device id.
    pub fn id(&self) -> &str {
        match self {
            SimModel::Glucometer(g) => &g.config().id,
            SimModel::Cuff(c) => &c.config().id,
        }
    }

    /// The primary service (0x1808 Glucose, 0x1810 Blood Pressure).
    pub fn service(&self) -> u16 {
        match self {
            SimModel::Glucometer(_) => super::GLUCOSE_SERVICE,
            SimModel::Cuff(_) => super::BLOOD_PRESSURE_SERVICE,
        }
    }

    /// Whether the device exposes this characteristic.
    pub fn has(&self, uuid: u16) -> bool {
        match self {
            SimModel::Glucometer(g) => g.has(uuid),
            SimModel::Cuff(c) => c.has(uuid),
        }
    }

    /// The characteristics the device exposes (its service discovery result).
    pub fn characteristics(&self) -> Vec<u16> {
        match self {
            SimModel::Glucometer(g) => g.characteristics(),
            SimModel::Cuff(c) => c.characteristics(),
        }
    }

    /// A central connects; returns the connection id.
    pub fn connect(&mut self) -> u64 {
        match self {
            SimModel::Glucometer(g) => g.connect(),
            SimModel::Cuff(c) => c.connect(),
        }
    }

    /// A central connects at `at` (a transport's clock), so timing rules can apply to what follows
    /// ([`CuffConfig::ignores_cccd_within`]); the glucometer has none and ignores the time.
    pub fn connect_at(&mut self, at: Instant) -> u64 {
        match self {
            SimModel::Glucometer(g) => g.connect(),
            SimModel::Cuff(c) => c.connect_at(at),
        }
    }

    /// A read or write arrives at `at`; a transport calls this before applying it (see
    /// [`SimCuff::request_at`]). The glucometer has no timing rules.
    pub fn request_at(&mut self, at: Instant) {
        match self {
            SimModel::Glucometer(_) => {}
            SimModel::Cuff(c) => c.request_at(at),
        }
    }

    /// The connection ends.
    pub fn disconnect(&mut self) {
        match self {
            SimModel::Glucometer(g) => g.disconnect(),
            SimModel::Cuff(c) => c.disconnect(),
        }
    }

    /// The current connection's id.
    pub fn connection(&self) -> Option<u64> {
        match self {
            SimModel::Glucometer(g) => g.connection(),
            SimModel::Cuff(c) => c.connection(),
        }
    }

    /// Pairs and bonds with the central.
    pub fn bond(&mut self) {
        match self {
            SimModel::Glucometer(g) => g.bond(),
            SimModel::Cuff(c) => c.bond(),
        }
    }

    /// Reads a characteristic with the real time `now`.
    ///
    /// # Errors
    /// As the model's `read`.
    pub fn read(&mut self, uuid: u16, now: i64) -> Result<Vec<u8>, LinkError> {
        match self {
            SimModel::Glucometer(g) => g.read(uuid, now),
            SimModel::Cuff(c) => c.read(uuid, now),
        }
    }

    /// Writes a characteristic with the real time `now`.
    ///
    /// # Errors
    /// As the model's `write`.
    pub fn write(&mut self, uuid: u16, value: &[u8], now: i64) -> Result<(), LinkError> {
        match self {
            SimModel::Glucometer(g) => g.write(uuid, value, now),
            SimModel::Cuff(c) => c.write(uuid, value, now),
        }
    }

    /// Enables notifications or indications.
    ///
    /// # Errors
    /// As the model's `subscribe`.
    pub fn subscribe(&mut self, uuid: u16) -> Result<(), LinkError> {
        match self {
            SimModel::Glucometer(g) => g.subscribe(uuid),
            SimModel::Cuff(c) => c.subscribe(uuid),
        }
    }

    /// Enables notifications or indications with the enable arriving at `at` (see [`Self::connect_at`]).
    ///
    /// # Errors
    /// As the model's `subscribe`.
    pub fn subscribe_at(&mut self, uuid: u16, at: Instant) -> Result<(), LinkError> {
        match self {
            SimModel::Glucometer(g) => g.subscribe(uuid),
            SimModel::Cuff(c) => c.subscribe_at(uuid, at),
        }
    }

    /// Takes the next output.
    pub fn poll_output(&mut self) -> Option<DeviceOutput> {
        match self {
            SimModel::Glucometer(g) => g.poll_output(),
            SimModel::Cuff(c) => c.poll_output(),
        }
    }

    /// Whether an output is waiting.
    pub fn has_output(&self) -> bool {
        match self {
            SimModel::Glucometer(g) => g.has_output(),
            SimModel::Cuff(c) => c.has_output(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The shared handle
// ---------------------------------------------------------------------------------------------------------

/// What a [`SimDevice`] handle shares.
#[derive(Debug)]
struct Shared {
    /// The model. A `std` mutex, not tokio's: every critical section is a few field updates and an
    /// encode, never held across an `.await` (mini-redis `db.rs` reasoning), so it cannot stall the runtime
    /// and the guard never has to be `Send`.
    model: Mutex<SimModel>,
    /// Woken whenever the model may have new output or a changed connection, so a [`SimLink`] waiting in
    /// `next_notification` looks again.
    wake: Notify,
}

/// A shared handle on one simulated device: the links that connect to it, the test or demo that adds
/// readings to it, and (later) the fake BlueZ service all hold clones.
#[derive(Debug, Clone)]
pub struct SimDevice {
    shared: Arc<Shared>,
}

impl SimDevice {
    /// A handle on `model`.
    pub fn new(model: impl Into<SimModel>) -> Self {
        SimDevice {
            shared: Arc::new(Shared {
                model: Mutex::new(model.into()),
                wake: Notify::new(),
            }),
        }
    }

    /// A handle on a glucometer.
    pub fn glucometer(g: SimGlucometer) -> Self {
        Self::new(g)
    }

    /// A handle on a cuff.
    pub fn cuff(c: SimCuff) -> Self {
        Self::new(c)
    }

    /// Locks the model. A panic in another holder cannot leave it half-updated in a way that matters to a
    /// simulator, so a poisoned lock is taken over rather than propagated.
    fn lock(&self) -> MutexGuard<'_, SimModel> {
        self.shared
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the model, then wakes any link waiting for output (`f` may have queued some).
    pub fn with<R>(&self, f: impl FnOnce(&mut SimModel) -> R) -> R {
        let r = f(&mut self.lock());
        self.shared.wake.notify_waiters();
        r
    }

    /// Runs `f` on the glucometer; `None` if this device is a cuff.
    pub fn with_glucometer<R>(&self, f: impl FnOnce(&mut SimGlucometer) -> R) -> Option<R> {
        self.with(|m| match m {
            SimModel::Glucometer(g) => Some(f(g)),
            SimModel::Cuff(_) => None,
        })
    }

    /// Runs `f` on the cuff; `None` if this device is a glucometer.
    pub fn with_cuff<R>(&self, f: impl FnOnce(&mut SimCuff) -> R) -> Option<R> {
        self.with(|m| match m {
            SimModel::Cuff(c) => Some(f(c)),
            SimModel::Glucometer(_) => None,
        })
    }

    /// The configured device id.
    pub fn id(&self) -> String {
        self.lock().id().to_owned()
    }

    /// The device drops the connection (out of range, switched off): the current link sees `None` from
    /// `next_notification` and [`LinkError::Disconnected`] from every operation.
    pub fn drop_connection(&self) {
        self.with(SimModel::disconnect);
    }

    /// Waits for the model's next output on `connection` and takes it; `None` once `connection` is no
    /// longer the device's connection. The hook for transports other than [`SimLink`] — the tests' fake
    /// BlueZ service turns each output into a D-Bus `PropertiesChanged` signal. Cancel-safe: an output is
    /// taken only in the same step that returns it.
    pub async fn next_output(&self, connection: u64) -> Option<DeviceOutput> {
        loop {
            let mut notified = pin!(self.shared.wake.notified());
            notified.as_mut().enable();
            {
                let mut m = self.lock();
                if m.connection() != Some(connection) {
                    return None;
                }
                if let Some(output) = m.poll_output() {
                    return Some(output);
                }
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The link
// ---------------------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch from the system clock: the link is the IO edge, so it is the one place
/// that reads the clock.
pub fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The instant a [`SimLink`] gives the model for timing rules (a CCCD enable too soon after the previous
/// exchange). Tokio's clock rather than `Instant::now()`, so that in a test with paused time a
/// collector's `tokio::time::sleep` before the enable counts as time passed; outside a runtime, or with
/// time running, it is the system's monotonic clock.
fn link_instant() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Where a [`SimLink`] gets `now`.
type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// An in-process [`GattLink`] to a [`SimDevice`]: the simulator's transport.
///
/// Each operation locks the model, applies one input with `now` from the link's clock, and unlocks.
/// `next_notification` takes the model's outputs one at a time, optionally paced by a delay so that demo
/// traffic looks like a radio. Once the link is disconnected — by [`GattLink::disconnect`], by dropping the
/// link, by a fault the device injects, by [`SimDevice::drop_connection`] or by another link connecting —
/// `next_notification` returns `None` and every operation [`LinkError::Disconnected`].
pub struct SimLink {
    device: SimDevice,
    /// The model's connection id for this link; any other id (or none) means this link is gone.
    connection: u64,
    /// Set once this link has seen its connection end.
    closed: bool,
    /// Wait before handing out each notification (zero in tests).
    delay: Duration,
    clock: Clock,
}

impl fmt::Debug for SimLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimLink")
            .field("device", &self.device)
            .field("connection", &self.connection)
            .field("closed", &self.closed)
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

/// What `next_notification` found on one look at the model.
enum Look {
    /// This link's connection is over.
    Gone,
    /// Nothing queued yet.
    Empty,
    /// Something is queued.
    Ready,
}

impl SimLink {
    /// Connects to `device` (a device serves one central: a link connected earlier is dropped).
    pub fn connect(device: &SimDevice) -> SimLink {
        let connection = device.with(|m| m.connect_at(link_instant()));
        SimLink {
            device: device.clone(),
            connection,
            closed: false,
            delay: Duration::ZERO,
            clock: Arc::new(unix_now),
        }
    }

    /// Waits `delay` before handing out each notification ("live" demo traffic); zero by default.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> SimLink {
        self.delay = delay;
        self
    }

    /// Takes `now` from `clock` instead of the system clock (deterministic tests).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> SimLink {
        self.clock = Arc::new(clock);
        self
    }

    /// The device this link is connected to.
    pub fn device(&self) -> &SimDevice {
        &self.device
    }

    /// Whether this link is still connected.
    pub fn is_connected(&self) -> bool {
        !self.closed && self.device.lock().connection() == Some(self.connection)
    }

    /// Pairs and bonds (what BlueZ's `Device1.Pair` does before a GLS collector may write the RACP).
    ///
    /// # Errors
    /// [`LinkError::Disconnected`] when the link is gone.
    pub fn bond(&mut self) -> Result<(), LinkError> {
        self.apply(|m, _| {
            m.bond();
            Ok(())
        })
    }

    /// Applies one input to the model if this link is still its connection.
    fn apply<R>(
        &mut self,
        f: impl FnOnce(&mut SimModel, i64) -> Result<R, LinkError>,
    ) -> Result<R, LinkError> {
        if self.closed {
            return Err(LinkError::Disconnected);
        }
        let now = (self.clock)();
        let r = self.device.with(|m| {
            if m.connection() == Some(self.connection) {
                Some(f(m, now))
            } else {
                None
            }
        });
        r.unwrap_or_else(|| {
            self.closed = true;
            Err(LinkError::Disconnected)
        })
    }

    fn look(&self) -> Look {
        let m = self.device.lock();
        if m.connection() != Some(self.connection) {
            Look::Gone
        } else if m.has_output() {
            Look::Ready
        } else {
            Look::Empty
        }
    }

    /// Takes one output if this link is still the connection; `Err(())` when it is not.
    fn take(&self) -> Result<Option<DeviceOutput>, ()> {
        let mut m = self.device.lock();
        if m.connection() != Some(self.connection) {
            return Err(());
        }
        Ok(m.poll_output())
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let connection = self.connection;
        self.device.with(|m| {
            if m.connection() == Some(connection) {
                m.disconnect();
            }
        });
    }
}

impl GattLink for SimLink {
    fn has(&self, uuid: u16) -> bool {
        self.device.lock().has(uuid)
    }

    async fn read(&mut self, uuid: u16) -> Result<Vec<u8>, LinkError> {
        let at = link_instant();
        self.apply(|m, now| {
            m.request_at(at);
            m.read(uuid, now)
        })
    }

    async fn write(&mut self, uuid: u16, value: &[u8]) -> Result<(), LinkError> {
        let at = link_instant();
        self.apply(|m, now| {
            m.request_at(at);
            m.write(uuid, value, now)
        })
    }

    async fn subscribe(&mut self, uuid: u16) -> Result<(), LinkError> {
        let at = link_instant();
        self.apply(|m, _| m.subscribe_at(uuid, at))
    }

    /// Cancel-safe: an output is taken from the model only after the pacing delay, with no `.await`
    /// between taking it and returning it, so a collector's `select!` timeout never loses a notification.
    async fn next_notification(&mut self) -> Option<Notification> {
        let shared = Arc::clone(&self.device.shared);
        loop {
            if self.closed {
                return None;
            }
            // Register for a wake-up *before* looking, so output queued between the look and the wait is
            // not missed (tokio `Notified::enable`).
            let mut notified = pin!(shared.wake.notified());
            notified.as_mut().enable();
            match self.look() {
                Look::Gone => {
                    self.closed = true;
                    return None;
                }
                Look::Empty => notified.await,
                Look::Ready => {
                    if !self.delay.is_zero() {
                        tokio::time::sleep(self.delay).await;
                    }
                    match self.take() {
                        Ok(Some(DeviceOutput::Notify(n))) => return Some(n),
                        // The model has already reset its connection state for the fault.
                        Ok(Some(DeviceOutput::Disconnect)) | Err(()) => {
                            self.closed = true;
                            return None;
                        }
                        // Taken by an abort or another party meanwhile: look again.
                        Ok(None) => {}
                    }
                }
            }
        }
    }

    async fn disconnect(&mut self) {
        self.close();
    }
}

impl Drop for SimLink {
    /// A dropped link is a closed connection, as when a collector task ends.
    fn drop(&mut self) {
        self.close();
    }
}
