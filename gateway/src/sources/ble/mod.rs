//! The Bluetooth LE source: glucometers and cuffs through BlueZ (btleplug over D-Bus).
//!
//! # Layout
//!
//! - [`link`] — [`link::BleLink`], the [`super::GattLink`] over a btleplug peripheral;
//!   the collectors ([`super::collector`]) run over it exactly as over the simulator.
//! - [`store`] — the allow-list of devices paired through the gateway, their patient bindings and their
//!   last session outcome.
//! - [`bus`] — the gateway's own D-Bus connection (libdbus, as btleplug's), for what btleplug cannot do.
//! - [`pairing`] — `Device1.Pair` with an `Agent1` for the passkey (btleplug cannot pair).
//! - [`quirks`] — device quirks as data, keyed on the Device Information model.
//! - [`feeds`] — the adapter's event stream and each device's notification stream, opened once and
//!   shared, so that sessions do not open and drop btleplug streams (each drop can leak a D-Bus match).
//! - [`upstream`] — containment of a known panic inside bluez-async (counted, logged at WARN).
//! - this module — adapter selection, the scanner, the allow-list check, and the session supervisor.
//!
//! # The supervisor
//!
//! [`run`] finds the adapter (by name such as `hci0` or by address; a clear error and a retry every
//! `adapter_poll` while there is none), scans for the Glucose (0x1808) and Blood Pressure (0x1810)
//! services, and reacts to every advertisement:
//!
//! - a device **not** in the allow-list is reported once per run (log, an `unpaired_device` event,
//!   [`BleStatus::seen_unpaired`]) and never connected (DESIGN.md promise 8);
//! - an allow-listed device gets a session unless it already has one, its retry backoff has not passed,
//!   or `max_sessions` sessions are running (a semaphore; the device advertises again);
//! - a session has an overall deadline (a wedged bluetoothd must not hang the gateway, hass-omron's
//!   lesson); a failed or incomplete one is retried with exponential backoff, and its stage, cause and the
//!   device's RSSI are kept as the device's last failure (`gateway devices`, [`BleStatus::fill_status`]
//!   for the status topic) and the first failure of a streak is journaled as a `device_error` event.
//!
//! When the adapter disappears (USB dongle pulled, bluetoothd restarted) the supervisor reports it, lets
//! running sessions end at their deadline, and goes back to looking for the adapter; when it returns
//! scanning resumes. What was accepted stays accepted; the devices keep the rest (promise 4).

pub mod bus;
pub mod commands;
pub mod feeds;
pub mod link;
pub mod pairing;
pub mod quirks;
pub mod store;
pub mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use btleplug::api::{Central, CentralEvent, Manager as _, Peripheral as _, ScanFilter};
use btleplug::platform::{Adapter, Manager, Peripheral, PeripheralId};
use protocol::model::RecordNumbering;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::collector::{
    self, CollectorConfig, Completion, DeviceRef, SessionError, SessionReport, now_utc,
};
use super::{BLOOD_PRESSURE_SERVICE, GLUCOSE_SERVICE, GattLink, uuid};
use crate::pipeline::{Bindings, Pipeline};
use link::{BleLink, OpenError, short_uuid};
use store::{DeviceKind, DeviceStatus, DeviceStore, Failure, PairedDevice};

/// The BLE source's settings (`[ble]` in the configuration).
#[derive(Debug, Clone)]
pub struct BleConfig {
    /// The adapter, by name (`hci0`) or address; `None` takes the first one.
    pub adapter: Option<String>,
    /// Where the allow-list and the device status live.
    pub store_dir: PathBuf,
    /// Sessions at once.
    pub max_sessions: usize,
    /// A session's overall deadline: connect, discovery, transfer.
    pub session_deadline: Duration,
    /// One GATT operation's time-out.
    pub op_timeout: Duration,
    /// `Device1.Connect` until services are resolved.
    pub connect_timeout: Duration,
    /// First retry after a failed or incomplete session; doubles per failure up to `retry_max`.
    pub retry_base: Duration,
    /// The longest retry backoff.
    pub retry_max: Duration,
    /// After a complete session, leave the device alone this long.
    pub revisit_after: Duration,
    /// How often the adapter's presence is checked (and, while missing, looked for again).
    pub adapter_poll: Duration,
    /// Set a device's clock through Current Time (0x2A2B) after a complete download when it is off by more
    /// than this (after allowing for `device_zone_offset_min`); `None` never writes a device clock.
    pub clock_set_above: Option<Duration>,
    /// The zone the devices' clocks show, minutes east of UTC (devices keep local time): the time written
    /// is gateway UTC + this, and drift is measured against it.
    pub device_zone_offset_min: i32,
    /// Pair "just works" when a bonded device asks for authentication (a meter that lost its bond).
    pub repair_just_works: bool,
    /// The collectors' timing.
    pub collector: CollectorConfig,
    /// The watchdog's handle: the supervisor checks in from its loops (see [`crate::liveness`]).
    pub heartbeat: Option<crate::liveness::Heartbeat>,
}

impl BleConfig {
    /// Defaults for a daemon, with the store in `store_dir`.
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        BleConfig {
            adapter: None,
            store_dir: store_dir.into(),
            max_sessions: 2,
            session_deadline: Duration::from_secs(180),
            op_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(600),
            revisit_after: Duration::from_secs(300),
            adapter_poll: Duration::from_secs(5),
            repair_just_works: true,
            clock_set_above: None,
            device_zone_offset_min: 0,
            collector: CollectorConfig::default(),
            heartbeat: None,
        }
    }

    /// Checks in to the watchdog's registry, if there is one.
    fn check_in(&self) {
        if let Some(h) = &self.heartbeat {
            h.check_in();
        }
    }

    /// Ticks at the watchdog's check-in period (hourly, inert, without one).
    fn heartbeat_ticker(&self) -> tokio::time::Interval {
        let every = self
            .heartbeat
            .as_ref()
            .map_or(Duration::from_secs(3600), crate::liveness::Heartbeat::every);
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }
}

/// Why the BLE source cannot use the radio. Each is reported and retried; none stops the gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BleError {
    /// The D-Bus system bus or bluetoothd is unreachable.
    #[error("BlueZ unreachable on the system bus: {0}")]
    Bus(String),
    /// BlueZ holds its name on the bus but gave no answer in time: bluetoothd hung, or a reply lost on
    /// the way. Looked for again, on a new bus connection the first time (see `Reconnects`).
    #[error("BlueZ did not answer within {0:?}")]
    NotAnswering(Duration),
    /// BlueZ has no adapter at all.
    #[error("no Bluetooth adapter (is the dongle plugged in and bluetoothd running?)")]
    NoAdapter,
    /// The configured adapter is not among those present.
    #[error("Bluetooth adapter {wanted:?} not found; present: {present}")]
    AdapterNotFound {
        /// The configured name or address.
        wanted: String,
        /// What is there.
        present: String,
    },
    /// Scanning could not start.
    #[error("cannot scan: {0}")]
    Scan(String),
}

/// An adapter and its identity.
#[derive(Debug, Clone)]
pub struct SelectedAdapter {
    /// The btleplug adapter.
    pub adapter: Adapter,
    /// Its BlueZ name (`hci0`).
    pub name: String,
    /// Its address, if known.
    pub address: Option<String>,
    /// Its event stream and its devices' notification streams, shared by the scanner and the sessions.
    pub feeds: Arc<feeds::Feeds>,
}

/// Finds the adapter by name or address (`None`: the first).
///
/// # Errors
/// [`BleError::Bus`], [`BleError::NoAdapter`], [`BleError::AdapterNotFound`].
pub async fn select_adapter(
    manager: &Manager,
    wanted: Option<&str>,
) -> Result<SelectedAdapter, BleError> {
    let adapters = manager
        .adapters()
        .await
        .map_err(|e| BleError::Bus(e.to_string()))?;
    if adapters.is_empty() {
        return Err(BleError::NoAdapter);
    }
    let mut present = Vec::new();
    for adapter in adapters {
        let Ok(info) = adapter.adapter_info().await else {
            continue;
        };
        // "hci0 (usb:v1D6Bp0246d0542)"
        let name = info.split_whitespace().next().unwrap_or("").to_owned();
        let address = adapter
            .adapter_address()
            .await
            .ok()
            .flatten()
            .map(|a| a.to_string().to_ascii_uppercase());
        let matches = match wanted {
            None => true,
            Some(w) => {
                w == name
                    || address
                        .as_deref()
                        .is_some_and(|a| a.eq_ignore_ascii_case(&store::normalize_address(w)))
            }
        };
        if matches {
            return Ok(SelectedAdapter {
                feeds: Arc::new(feeds::Feeds::new(adapter.clone(), name.clone())),
                adapter,
                name,
                address,
            });
        }
        present.push(match &address {
            Some(a) => format!("{name} ({a})"),
            None => name,
        });
    }
    match wanted {
        Some(w) => Err(BleError::AdapterNotFound {
            wanted: w.to_owned(),
            present: present.join(", "),
        }),
        None => Err(BleError::NoAdapter),
    }
}

/// The adapter as the status topic and `gateway devices` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AdapterState {
    /// Not looked for yet.
    #[default]
    Unknown,
    /// Present and scanning.
    Up {
        /// `hci0`.
        name: String,
    },
    /// Missing or unusable; looked for again every `adapter_poll`.
    Missing {
        /// Why.
        cause: String,
    },
}

/// A device seen advertising a health service but not paired through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeenDevice {
    /// The advertised name.
    pub name: Option<String>,
    /// RSSI when first seen.
    pub rssi: Option<i16>,
}

/// What the BLE source reports (shared with the status topic and tests).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BleStatus {
    /// The adapter.
    pub adapter: AdapterState,
    /// Times the adapter went away while in use.
    pub adapter_losses: u32,
    /// Devices seen but not allow-listed, by address (each reported once).
    pub seen_unpaired: BTreeMap<String, SeenDevice>,
    /// Each allow-listed device's session record, by address.
    pub devices: BTreeMap<String, DeviceStatus>,
    /// Sessions started.
    pub sessions_started: u64,
    /// Sessions that completed.
    pub sessions_completed: u64,
}

impl BleStatus {
    /// Fills the status topic's `adapter` and `devices` (DESIGN.md: "…/status: devices, adapter state")
    /// for the allow-listed `devices`: when each was last read and its last failure (stage, cause, RSSI).
    pub fn fill_status(
        &self,
        msg: &mut protocol::wire::StatusMessage,
        devices: &BTreeMap<String, PairedDevice>,
    ) {
        msg.adapter = Some(match &self.adapter {
            AdapterState::Unknown => "unknown".to_owned(),
            AdapterState::Up { .. } => "powered".to_owned(),
            AdapterState::Missing { .. } => "absent".to_owned(),
        });
        msg.devices = devices
            .values()
            .map(|d| {
                let st = self
                    .devices
                    .get(&d.address.to_ascii_uppercase())
                    .cloned()
                    .unwrap_or_default();
                protocol::wire::DeviceStatus {
                    id: d.address.clone(),
                    kind: match d.kind {
                        DeviceKind::Glucometer => protocol::wire::Kind::Glucose,
                        DeviceKind::Cuff => protocol::wire::Kind::BloodPressure,
                    },
                    last_seen: st.last_success.and_then(rfc3339),
                    last_failure: st.last_failure.map(|f| match f.rssi {
                        Some(r) => format!("{}: {} (RSSI {r} dBm)", f.stage, f.cause),
                        None => format!("{}: {}", f.stage, f.cause),
                    }),
                }
            })
            .collect();
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: i64) -> Option<String> {
    protocol::gatt::time::DateTime::from_epoch_seconds(secs).map(|d| format!("{d}Z"))
}

/// A handle on the BLE source's status.
#[derive(Debug, Clone, Default)]
pub struct BleStatusHandle(Arc<Mutex<BleStatus>>);

impl BleStatusHandle {
    /// A copy of the status now.
    pub fn snapshot(&self) -> BleStatus {
        self.lock().clone()
    }

    /// Records `percent` as `address`'s battery level, read at `at` (Unix seconds, UTC). The session
    /// records it as soon as it is read, so a download that fails afterwards does not lose it.
    pub fn record_battery(&self, address: &str, percent: u8, at: i64) {
        let address = address.to_ascii_uppercase();
        let battery = store::Battery { percent, at };
        let was_low = self
            .lock()
            .devices
            .entry(address.clone())
            .or_default()
            .battery
            .replace(battery)
            .is_some_and(|b| b.is_low());
        metrics::gauge!("phg_device_battery_percent", "device" => address.clone())
            .set(f64::from(percent));
        if battery.is_low() && !was_low {
            tracing::warn!(device = %address, percent, "device battery low; change or charge it");
        }
    }

    /// Starts from the device records the last run saved (`device-status.json`): the staff page and
    /// `gateway status` show each device's last battery level, success and failure from before a restart
    /// instead of nothing until its next session. A device this run has already recorded keeps its own
    /// record. The failure streak starts again at zero: the first failure after a restart is reported
    /// (one `device_error` per streak, per run) and its retry waits the base interval.
    pub fn restore(&self, saved: BTreeMap<String, DeviceStatus>) {
        let mut st = self.lock();
        for (address, status) in saved {
            st.devices
                .entry(address.to_ascii_uppercase())
                .or_insert(DeviceStatus {
                    consecutive_failures: 0,
                    ..status
                });
        }
    }

    /// Short, await-free critical sections only (std mutex).
    fn lock(&self) -> std::sync::MutexGuard<'_, BleStatus> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The bindings the allow-list holds (device → patient, cuff user → patient), for the pipeline.
pub fn bindings_of(devices: &BTreeMap<String, PairedDevice>, into: &mut Bindings) {
    for d in devices.values() {
        if let Some(p) = &d.patient {
            into.bind(&d.address, None, p);
        }
        for (u, p) in &d.users {
            into.bind(&d.address, Some(*u), p);
        }
    }
}

/// Where and why a session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFailure {
    /// The stage.
    pub stage: &'static str,
    /// The cause.
    pub cause: String,
}

impl SessionFailure {
    fn new(stage: &'static str, cause: impl ToString) -> Self {
        SessionFailure {
            stage,
            cause: cause.to_string(),
        }
    }
}

/// One session with one allow-listed device: connect, read the battery level into `status` (when the
/// device has a Battery Service), read Device Information, apply its quirks, run the GLP or BLP collector
/// into the pipeline, disconnect. A device that asks for authentication is paired "just works" once and
/// the collector run again, if `cfg.repair_just_works`; otherwise (or if that fails) the failure says it
/// needs pairing.
///
/// # Errors
/// [`SessionFailure`] with the stage it failed at. A transfer the device cut short is
/// `Ok` with [`Completion::Incomplete`]: the next session resumes at the cursor. The battery read never
/// fails a session.
pub async fn session_once(
    adapter: &SelectedAdapter,
    peripheral: Peripheral,
    device: &PairedDevice,
    pipeline: &Pipeline,
    cfg: &BleConfig,
    status: &BleStatusHandle,
) -> Result<SessionReport, SessionFailure> {
    let mut link = BleLink::open(adapter, peripheral, cfg.op_timeout, cfg.connect_timeout)
        .await
        .map_err(|e| match e {
            OpenError::Connect(c) => SessionFailure::new("connect", c),
            OpenError::Discover(c) => SessionFailure::new("discover", c),
            OpenError::Streams(c) => SessionFailure::new("connect", c),
        })?;
    // Before the download and recorded at once: the staff page should learn that a cuff's battery is low
    // even from a session whose transfer then fails (a flat battery is a common reason for that).
    if let Some(level) = read_battery(&mut link, &device.address).await {
        status.record_battery(&device.address, level.percent(), now_utc());
    }
    // The device's own binding from the allow-list, as it is now: a device paired or rebound while the
    // gateway runs lands on the right patient from its next session on — unless the CRM's configuration
    // names this device: the CRM is then the system of record, and the local binding is not used.
    let mut pipeline = pipeline.clone();
    if pipeline.bindings.from_crm() && pipeline.bindings.names_device(&device.address) {
        if device.patient.is_some() || !device.users.is_empty() {
            tracing::debug!(device = %device.address, "the CRM's binding for this device is used, not the one stored by `gateway pair`");
        }
    } else {
        let mut bindings = (*pipeline.bindings).clone();
        bindings_of(
            &BTreeMap::from([(device.address.clone(), device.clone())]),
            &mut bindings,
        );
        pipeline.bindings = Arc::new(bindings);
    }
    let result = run_collector(&mut link, adapter, device, &pipeline, cfg).await;
    if let Ok(report) = &result {
        // After the download, so every reading of this session carries the offset that was true for it.
        if report.completion == Completion::Complete {
            set_clock_if_drifted(&mut link, report.clock_offset_s, cfg, &device.address).await;
        }
    }
    link.disconnect().await;
    result
}

/// Writes the device clock when it is off by more than `cfg.clock_set_above` (DESIGN.md promise 5 keeps
/// the measured offset on every reading; this keeps the offset small): through Current Time (0x2A2B), or,
/// on a meter that keeps its clock in Date Time (0x2A08) inside the glucose service instead (Roche
/// Accu-Chek Aviva Connect, GATT.md "Time"), through that — the same characteristic the offset was read
/// from. Returns whether a write was accepted. ATT 0x80 ("data field ignored", Omron HEM-6232T-E) or a
/// refused write counts as not set: the device keeps its clock and the next session measures it again.
pub async fn set_clock_if_drifted<L: GattLink>(
    link: &mut L,
    measured_offset_s: Option<i64>,
    cfg: &BleConfig,
    device: &str,
) -> bool {
    use protocol::gatt::Codec;
    let (Some(bound), Some(offset)) = (cfg.clock_set_above, measured_offset_s) else {
        return false;
    };
    let zone = i64::from(cfg.device_zone_offset_min) * 60;
    let drift = offset - zone;
    if drift.unsigned_abs() <= bound.as_secs() {
        return false;
    }
    let target = now_utc() + zone;
    let Some(date_time) = protocol::gatt::time::DateTime::from_epoch_seconds(target) else {
        return false;
    };
    // The order `measure_clock_offset` reads them in, so the clock written is the clock measured.
    let (characteristic, value) = if link.has(uuid::CURRENT_TIME) {
        let ct = protocol::gatt::time::CurrentTime {
            date_time,
            // 1970-01-01 was a Thursday; CTS counts Monday = 1 … Sunday = 7.
            day_of_week: u8::try_from((target.div_euclid(86_400) + 3).rem_euclid(7) + 1)
                .unwrap_or(0),
            fractions256: 0,
            // Bit 1: external reference time update.
            adjust_reason: 0x02,
        };
        (uuid::CURRENT_TIME, ct.to_vec())
    } else if link.has(uuid::DATE_TIME) {
        (uuid::DATE_TIME, date_time.to_vec())
    } else {
        return false;
    };
    match link.write(characteristic, &value).await {
        Ok(()) => {
            tracing::info!(device = %device, drift_s = drift, characteristic = format_args!("{characteristic:04X}"), "device clock set");
            true
        }
        Err(e) => {
            tracing::warn!(device = %device, drift_s = drift, error = %e, "device clock could not be set; readings keep carrying the measured offset");
            false
        }
    }
}

/// Reads Battery Level (0x2A19) if the device exposes it. `None` when it does not (the Battery Service is
/// optional), when the read fails, or when the value is malformed: each is logged (the level is device
/// state, not patient data) and none is the session's concern — the download goes on. Octets after the
/// first are ignored, as [`protocol::gatt::battery::BatteryLevel`] decodes them.
pub async fn read_battery<L: GattLink>(
    link: &mut L,
    device: &str,
) -> Option<protocol::gatt::battery::BatteryLevel> {
    use protocol::gatt::Codec;
    if !link.has(uuid::BATTERY_LEVEL) {
        tracing::debug!(device = %device, "no Battery Level characteristic");
        return None;
    }
    let bytes = match link.read(uuid::BATTERY_LEVEL).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(device = %device, error = %e, "battery level not read; the session goes on");
            return None;
        }
    };
    match protocol::gatt::battery::BatteryLevel::parse(&bytes) {
        Ok(level) => {
            tracing::debug!(device = %device, percent = level.percent(), octets = bytes.len(), "battery level read");
            Some(level)
        }
        Err(e) => {
            tracing::warn!(device = %device, error = %e, octets = bytes.len(), "malformed battery level ignored");
            None
        }
    }
}

pub(crate) async fn read_string<L: GattLink>(link: &mut L, u: u16) -> Option<String> {
    if !link.has(u) {
        return None;
    }
    let bytes = link.read(u).await.ok()?;
    let s = String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .trim()
        .to_owned();
    (!s.is_empty()).then_some(s)
}

async fn run_collector(
    link: &mut BleLink,
    adapter: &SelectedAdapter,
    device: &PairedDevice,
    pipeline: &Pipeline,
    cfg: &BleConfig,
) -> Result<SessionReport, SessionFailure> {
    let model = match &device.model {
        Some(m) => Some(m.clone()),
        None => read_string(link, uuid::MODEL_NUMBER).await,
    };
    let quirks = quirks::lookup(
        model
            .as_deref()
            .or(device.name.as_deref())
            .unwrap_or_default(),
    );
    link.set_quirks(quirks);
    let mut ccfg = cfg.collector;
    ccfg.cccd_delay = ccfg.cccd_delay.max(quirks.cccd_delay());
    let dref = DeviceRef {
        id: device.address.clone(),
        model,
        // Sequence 0 is the newest record on these meters (GATT.md, TaiDoc DM30b): the collector asks for
        // every record and hands over those numbered below the last accepted one (found by its time);
        // their reading ids are built on time and value, not on the sequence number.
        numbering: if quirks.reversed_sequence_numbers {
            RecordNumbering::NewestFirst
        } else {
            RecordNumbering::Gls
        },
    };
    let mut repaired = false;
    loop {
        let mut sink = pipeline.session();
        let r = match device.kind {
            DeviceKind::Glucometer => {
                collector::glucose_session(link, &mut sink, &dref, &ccfg).await
            }
            DeviceKind::Cuff => {
                collector::blood_pressure_session(link, &mut sink, &dref, &ccfg).await
            }
        };
        match r {
            Ok(report) => return Ok(report),
            Err(SessionError::NeedsPairing(code)) if !repaired && cfg.repair_just_works => {
                // A device we paired has lost its bond (reset, battery change): ask BlueZ to pair again.
                tracing::warn!(device = %device.address, code, "device asks for authentication; pairing again");
                repaired = true;
                let pairing = pairing::Pairing::connect()
                    .await
                    .map_err(|e| SessionFailure::new("pairing", e))?;
                if let Err(e) = pairing
                    .pair(&adapter.name, &device.address, None, cfg.op_timeout)
                    .await
                {
                    return Err(SessionFailure::new(
                        "pairing",
                        format!(
                            "device requires pairing (ATT 0x{code:02X}) and refused to pair without a \
                             passkey ({e}); pair it again with `gateway pair`"
                        ),
                    ));
                }
            }
            Err(SessionError::NeedsPairing(code)) => {
                return Err(SessionFailure::new(
                    "pairing",
                    format!(
                        "device requires pairing (ATT 0x{code:02X}); pair it again with `gateway pair`"
                    ),
                ));
            }
            Err(SessionError::Link { stage, source }) => {
                return Err(SessionFailure::new(stage, source));
            }
            Err(e @ SessionError::Racp(_)) => return Err(SessionFailure::new("racp", e)),
            Err(e @ SessionError::Sink(_)) => return Err(SessionFailure::new("pipeline", e)),
        }
    }
}

/// Journals an `unpaired_device` event: a health device advertising near the gateway that was not paired
/// through it (and so is never connected). Called once per device and gateway run.
pub async fn report_unpaired_device(
    pipeline: &Pipeline,
    device: &str,
    services: Vec<String>,
    rssi: Option<i16>,
) {
    let now = now_utc();
    let event = protocol::wire::Event::UnpairedDevice {
        device: device.to_owned(),
        services,
        rssi,
    };
    let id = format!("unpaired:{device}:{}", now.div_euclid(60));
    super::notice::journal_notice(pipeline, device, event, id, now).await;
}

/// Per-device scheduling: who has a session, and when each may be tried again.
#[derive(Debug, Default)]
struct Schedule {
    busy: HashSet<String>,
    not_before: HashMap<String, Instant>,
}

/// Everything a spawned session needs.
#[derive(Clone)]
struct Shared {
    cfg: BleConfig,
    pipeline: Pipeline,
    status: BleStatusHandle,
    store: DeviceStore,
    /// Short, await-free critical sections only (std mutex).
    schedule: Arc<Mutex<Schedule>>,
    sessions: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl Shared {
    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs the BLE source until `shutdown`: see the module doc. Sessions running at shutdown end at their
/// own pace (bounded by their deadline), so every value handed to the pipeline is accepted or refused.
pub async fn run(
    cfg: BleConfig,
    pipeline: Pipeline,
    status: BleStatusHandle,
    shutdown: CancellationToken,
) {
    upstream::contain();
    let shared = Shared {
        sessions: Arc::new(Semaphore::new(cfg.max_sessions.max(1))),
        store: DeviceStore::new(cfg.store_dir.clone()),
        cfg,
        pipeline,
        status,
        schedule: Arc::default(),
        tracker: TaskTracker::new(),
    };
    match shared.store.statuses() {
        Ok(saved) => shared.status.restore(saved),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the saved device records; batteries and last failures start unknown");
        }
    }
    let mut manager: Option<Manager> = None;
    // The feeds of every adapter selected on this bus connection, kept across its losses: dropping an
    // adapter's streams can leave their D-Bus match rules registered for good (`feeds`, `upstream`), so an
    // adapter that comes back (a dongle re-plugged, bluetoothd restarted: the same `hciN` path) gets the
    // streams it had, and the rules stay bounded by the adapters and devices ever seen, not by the
    // number of losses. A new connection (`manager` replaced) starts afresh.
    let mut kept: HashMap<String, Arc<feeds::Feeds>> = HashMap::new();
    let mut reported: Option<String> = None;
    let mut reconnects = Reconnects::default();
    while !shutdown.is_cancelled() {
        // bluez-async waits 30 s for a reply; the watchdog counts this loop stale after `WatchdogSec`
        // (30 s as packaged) without a check-in, so a hung bluetoothd would get the gateway restarted
        // over and over. One GATT operation's time-out bounds the whole lookup instead (bleak's users
        // met the same: Bluetooth-Devices/bleak-retry-connector#78 bounds its BlueZ set-up at 8.5 s).
        let lookup = async {
            if manager.is_none() {
                manager = Some(
                    Manager::new()
                        .await
                        .map_err(|e| BleError::Bus(e.to_string()))?,
                );
            }
            let Some(m) = manager.as_ref() else {
                return Err(BleError::NoAdapter);
            };
            select_adapter(m, shared.cfg.adapter.as_deref()).await
        };
        let outcome = tokio::time::timeout(shared.cfg.op_timeout, lookup)
            .await
            .unwrap_or(Err(BleError::NotAnswering(shared.cfg.op_timeout)));
        let adapter = match outcome {
            Ok(a) => a,
            Err(e) => {
                let cause = e.to_string();
                let first = reported.as_deref() != Some(cause.as_str());
                if first {
                    tracing::error!(error = %cause, "Bluetooth unavailable; looking again every {:?}", shared.cfg.adapter_poll);
                }
                let replace = match e {
                    BleError::Bus(_) | BleError::NotAnswering(_) => reconnects.due(Instant::now()),
                    _ => false,
                };
                if replace {
                    manager = None;
                    kept.clear();
                }
                let first = reported.as_deref() != Some(cause.as_str());
                if first {
                    let name = shared.cfg.adapter.as_deref().unwrap_or("adapter");
                    super::notice::report_device_error(&shared.pipeline, name, "adapter", &cause)
                        .await;
                }
                shared.status.lock().adapter = AdapterState::Missing {
                    cause: cause.clone(),
                };
                reported = Some(cause);
                shared.cfg.check_in();
                let poll = tokio::time::sleep(shared.cfg.adapter_poll);
                tokio::pin!(poll);
                let mut alive = shared.cfg.heartbeat_ticker();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = &mut poll => break,
                        _ = alive.tick() => shared.cfg.check_in(),
                    }
                }
                continue;
            }
        };
        reconnects = Reconnects::default();
        let adapter = match kept.get(&adapter.name) {
            Some(feeds) => SelectedAdapter {
                feeds: Arc::clone(feeds),
                ..adapter
            },
            None => {
                kept.insert(adapter.name.clone(), Arc::clone(&adapter.feeds));
                adapter
            }
        };
        if reported.take().is_some() {
            tracing::info!(adapter = %adapter.name, "Bluetooth adapter available again");
        } else {
            tracing::info!(adapter = %adapter.name, "Bluetooth adapter selected");
        }
        shared.status.lock().adapter = AdapterState::Up {
            name: adapter.name.clone(),
        };
        match scan(&shared, &adapter, &shutdown).await {
            Ok(()) => {}
            Err(e) => {
                let cause = e.to_string();
                tracing::error!(adapter = %adapter.name, error = %cause, "Bluetooth adapter lost; sessions end at their deadline, looking for it again");
                super::notice::report_device_error(
                    &shared.pipeline,
                    &adapter.name,
                    "adapter",
                    &cause,
                )
                .await;
                let mut st = shared.status.lock();
                st.adapter = AdapterState::Missing {
                    cause: cause.clone(),
                };
                st.adapter_losses += 1;
                reported = Some(cause);
            }
        }
    }
    shared.tracker.close();
    shared.tracker.wait().await;
}

/// When a failed adapter lookup gets a new bus connection. A new connection cures two failures: a bus
/// connection that died (dbus-daemon restarted), and one that left a reply unread — this stack
/// (bluez-async → dbus-tokio) has been seen to do so for tens of seconds, in about one BLE test run in
/// fifteen under load, while a new connection is answered at once. But bluez-async's I/O task keeps every
/// dropped connection for good, and most failures are not the connection's: bluetoothd not running (the
/// name has no owner) or hung. Replacing at every poll piled up a connection and a file descriptor every
/// 5 s while bluetoothd was down — the process's descriptors, and the bus's connections per user, would
/// run out within hours. So: at the first failure, then after 1, 2, 4 … minutes, at most hourly, until a
/// lookup succeeds.
#[derive(Debug, Default)]
struct Reconnects {
    /// When the next replacement is allowed, and the wait after it; `None` before the first.
    next: Option<(Instant, Duration)>,
}

impl Reconnects {
    const FIRST_WAIT: Duration = Duration::from_secs(60);
    const LONGEST_WAIT: Duration = Duration::from_secs(3600);

    /// Another lookup failed at `now`: whether to replace the connection.
    fn due(&mut self, now: Instant) -> bool {
        let wait = match self.next {
            None => Self::FIRST_WAIT,
            Some((at, _)) if now < at => return false,
            Some((_, wait)) => (wait * 2).min(Self::LONGEST_WAIT),
        };
        self.next = Some((now + wait, wait));
        true
    }
}

/// Scans on `adapter` and starts sessions until shutdown (`Ok`) or until the adapter is gone (`Err`).
async fn scan(
    shared: &Shared,
    adapter: &SelectedAdapter,
    shutdown: &CancellationToken,
) -> Result<(), BleError> {
    let a = &adapter.adapter;
    let bound = shared.cfg.op_timeout;
    let not_answering = || BleError::Scan("adapter not answering".into());
    let mut events = tokio::time::timeout(bound, adapter.feeds.events())
        .await
        .map_err(|_| not_answering())?
        .map_err(BleError::Scan)?;
    let filter = ScanFilter {
        services: vec![
            btleplug::api::bleuuid::uuid_from_u16(GLUCOSE_SERVICE),
            btleplug::api::bleuuid::uuid_from_u16(BLOOD_PRESSURE_SERVICE),
        ],
    };
    tokio::time::timeout(bound, a.start_scan(filter))
        .await
        .map_err(|_| not_answering())?
        .map_err(|e| BleError::Scan(e.to_string()))?;
    let mut allow = shared.store.devices().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the paired-device store; no device will be connected");
        BTreeMap::new()
    });
    let mut check = tokio::time::interval(shared.cfg.adapter_poll);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alive = shared.cfg.heartbeat_ticker();
    loop {
        tokio::select! {
            _ = alive.tick() => shared.cfg.check_in(),
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(shared.cfg.op_timeout, a.stop_scan()).await;
                return Ok(());
            }
            _ = check.tick() => {
                // Still there? (bluetoothd removes the adapter object when the dongle goes.)
                match tokio::time::timeout(bound, a.adapter_info()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(BleError::Scan(format!("adapter gone: {e}"))),
                    Err(_) => return Err(not_answering()),
                }
                // `gateway pair` / `devices unpair` change the allow-list while the daemon runs.
                match shared.store.devices() {
                    Ok(d) => allow = d,
                    Err(e) => tracing::error!(error = %e, "cannot read the paired-device store; keeping the previous allow-list"),
                }
            }
            ev = events.recv() => match ev {
                Err(RecvError::Closed) => return Err(BleError::Scan("event stream ended".into())),
                Err(RecvError::Lagged(skipped)) => {
                    // Advertisements repeat: a device skipped now is considered at its next one.
                    tracing::debug!(skipped, "the scanner fell behind the adapter's events");
                }
                Ok(
                    CentralEvent::DeviceDiscovered(id)
                    | CentralEvent::DeviceUpdated(id)
                    | CentralEvent::RssiUpdate { id, .. }
                    | CentralEvent::ServicesAdvertisement { id, .. },
                ) => consider(shared, adapter, &allow, id).await,
                Ok(_) => {}
            },
        }
    }
}

/// An advertisement from `id`: start a session if it is allow-listed and due; report it once if not.
async fn consider(
    shared: &Shared,
    adapter: &SelectedAdapter,
    allow: &BTreeMap<String, PairedDevice>,
    id: PeripheralId,
) {
    // Awaited on the scanner's loop: bounded like every BlueZ call there (see `run`). A device skipped
    // for want of an answer is considered again at its next advertisement.
    let bound = shared.cfg.op_timeout;
    let Ok(Ok(peripheral)) = tokio::time::timeout(bound, adapter.adapter.peripheral(&id)).await
    else {
        return;
    };
    let Ok(Ok(Some(props))) = tokio::time::timeout(bound, peripheral.properties()).await else {
        return;
    };
    let address = props.address.to_string().to_ascii_uppercase();
    let services: Vec<String> = props
        .services
        .iter()
        .filter_map(short_uuid)
        .filter_map(|s| match s {
            GLUCOSE_SERVICE => Some("glucose".to_owned()),
            BLOOD_PRESSURE_SERVICE => Some("blood_pressure".to_owned()),
            _ => None,
        })
        .collect();
    let Some(device) = allow.get(&address).cloned() else {
        if !services.is_empty() {
            let first_sighting = {
                let mut st = shared.status.lock();
                match st.seen_unpaired.entry(address.clone()) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(SeenDevice {
                            name: props.local_name.clone(),
                            rssi: props.rssi,
                        });
                        true
                    }
                    std::collections::btree_map::Entry::Occupied(_) => false,
                }
            };
            if first_sighting {
                // No payload values here, and a device address is not patient data.
                tracing::info!(device = %address, name = ?props.local_name, rssi = ?props.rssi,
                    "health device seen, not paired through the gateway: left alone (pair it with `gateway pair`)");
                let pipeline = shared.pipeline.clone();
                let rssi = props.rssi;
                // Off the scanner's path: the journal write must not hold up the advertisements behind it.
                shared.tracker.spawn(async move {
                    report_unpaired_device(&pipeline, &address, services, rssi).await;
                });
            }
        }
        return;
    };
    {
        let mut s = shared.schedule();
        if s.busy.contains(&address)
            || s.not_before
                .get(&address)
                .is_some_and(|t| *t > Instant::now())
        {
            return;
        }
        let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
            return; // at the bound: the device will advertise again
        };
        s.busy.insert(address.clone());
        let shared2 = shared.clone();
        let adapter = adapter.clone();
        let rssi = props.rssi;
        shared.status.lock().sessions_started += 1;
        shared.tracker.spawn(async move {
            let _permit = permit;
            supervised_session(&shared2, &adapter, peripheral, &device, rssi).await;
            shared2
                .schedule()
                .busy
                .remove(&device.address.to_ascii_uppercase());
        });
    }
}

/// One session under the deadline, then its bookkeeping: status, backoff, the status file.
async fn supervised_session(
    shared: &Shared,
    adapter: &SelectedAdapter,
    peripheral: Peripheral,
    device: &PairedDevice,
    rssi: Option<i16>,
) {
    let cfg = &shared.cfg;
    let address = device.address.to_ascii_uppercase();
    // The entry as stored now (a rebind since the allow-list was last read counts).
    let device = &shared
        .store
        .device(&address)
        .ok()
        .flatten()
        .unwrap_or_else(|| device.clone());
    tracing::info!(device = %address, "session starts");
    let outcome = tokio::time::timeout(
        cfg.session_deadline,
        session_once(
            adapter,
            peripheral.clone(),
            device,
            &shared.pipeline,
            cfg,
            &shared.status,
        ),
    )
    .await;
    let journal_full = matches!(&outcome, Ok(Ok(r)) if r.completion == Completion::JournalFull);
    let failure = match outcome {
        Err(_) => {
            // The deadline cut the session: make sure the link is released.
            let _ = tokio::time::timeout(cfg.op_timeout, peripheral.disconnect()).await;
            Some(SessionFailure::new(
                "deadline",
                format!("session exceeded {:?}", cfg.session_deadline),
            ))
        }
        Ok(Err(f)) => Some(f),
        Ok(Ok(report)) => match report.completion {
            Completion::Complete => None,
            Completion::Incomplete => Some(SessionFailure::new(
                "transfer",
                "incomplete: link dropped or RACP timer expired; resuming at the first record not accepted",
            )),
            Completion::JournalFull => Some(SessionFailure::new(
                "pipeline",
                "journal full: download stopped, the device keeps its records",
            )),
        },
    };
    let now = now_utc();
    let (status, previous_stage) = {
        let mut st = shared.status.lock();
        let entry = st.devices.entry(address.clone()).or_default();
        let previous_stage = entry.last_failure.as_ref().map(|f| f.stage.clone());
        match &failure {
            None => {
                entry.last_failure = None;
                entry.last_success = Some(now);
                entry.consecutive_failures = 0;
            }
            Some(f) => {
                entry.last_failure = Some(Failure {
                    stage: f.stage.to_owned(),
                    cause: f.cause.clone(),
                    rssi,
                    at: now,
                });
                entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
            }
        }
        let entry = entry.clone();
        if failure.is_none() {
            st.sessions_completed += 1;
        }
        (entry, previous_stage)
    };
    if journal_full {
        // Not a `device_error`: that would be a reading-sized record the full journal refuses. The
        // `journal_full` event goes into the journal's notice reserve, so the CRM learns of the stop.
        shared.pipeline.journal_full_notice(&address, now).await;
    } else if let Some(f) = &failure {
        let new_stage = previous_stage.as_deref() != Some(f.stage);
        if status.consecutive_failures == 1 || new_stage {
            super::notice::report_device_error(&shared.pipeline, &address, f.stage, &f.cause).await;
        }
    }
    let wait = match &failure {
        None => {
            tracing::info!(device = %address, "session complete");
            cfg.revisit_after
        }
        Some(f) => {
            tracing::warn!(device = %address, stage = f.stage, cause = %f.cause, rssi = ?rssi, "session failed; the device keeps its records");
            let exp = status.consecutive_failures.saturating_sub(1).min(16);
            cfg.retry_base
                .saturating_mul(1u32 << exp)
                .min(cfg.retry_max)
        }
    };
    shared
        .schedule()
        .not_before
        .insert(address.clone(), Instant::now() + wait);
    if let Err(e) = shared.store.put_status(&address, &status) {
        tracing::error!(error = %e, "cannot record the device status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{LinkError, Notification};

    #[test]
    fn a_failing_lookup_gets_a_new_connection_at_once_then_after_growing_waits() {
        let t0 = Instant::now();
        let mut r = Reconnects::default();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        // A lookup failing every 5 s (the default adapter poll) for over an hour.
        let replaced: Vec<u64> = (0..=4000)
            .step_by(5)
            .filter(|&secs| r.due(at(secs)))
            .collect();
        // 0, then waits of 60, 120, 240, 480, 960, 1920 s, then hourly.
        assert_eq!(replaced, [0, 60, 180, 420, 900, 1860, 3780]);
        // A lookup that succeeds ends the spell (`run` starts afresh): the next failure replaces at once.
        let mut r = Reconnects::default();
        assert!(r.due(at(0)));
        assert!(!r.due(at(5)));
        r = Reconnects::default();
        assert!(r.due(at(10)));
    }

    /// A link whose only characteristic worth reading is Battery Level: `None` — the device has none.
    struct BatteryLink(Option<Result<Vec<u8>, LinkError>>);

    impl GattLink for BatteryLink {
        fn has(&self, u: u16) -> bool {
            u == uuid::BATTERY_LEVEL && self.0.is_some()
        }
        async fn read(&mut self, u: u16) -> Result<Vec<u8>, LinkError> {
            match (&self.0, u) {
                (Some(r), uuid::BATTERY_LEVEL) => r.clone(),
                _ => Err(LinkError::Missing(u)),
            }
        }
        async fn write(&mut self, u: u16, _: &[u8]) -> Result<(), LinkError> {
            Err(LinkError::Missing(u))
        }
        async fn subscribe(&mut self, u: u16) -> Result<(), LinkError> {
            Err(LinkError::Missing(u))
        }
        async fn next_notification(&mut self) -> Option<Notification> {
            None
        }
        async fn disconnect(&mut self) {}
    }

    async fn battery(value: Option<Result<Vec<u8>, LinkError>>) -> Option<u8> {
        read_battery(&mut BatteryLink(value), "AA:00:00:00:00:01")
            .await
            .map(protocol::gatt::battery::BatteryLevel::percent)
    }

    /// Battery Level is read when present; absent, unreadable or out of range gives no level (and no
    /// error for the session); octets after the first are ignored as the decoder does.
    #[tokio::test]
    async fn battery_level_is_read_when_there_and_otherwise_left_alone() {
        assert_eq!(battery(Some(Ok(vec![87]))).await, Some(87));
        assert_eq!(battery(Some(Ok(vec![0]))).await, Some(0));
        assert_eq!(battery(Some(Ok(vec![100]))).await, Some(100));
        assert_eq!(battery(Some(Ok(vec![42, 0xFF, 0x01]))).await, Some(42));
        assert_eq!(battery(None).await, None, "no Battery Service");
        assert_eq!(battery(Some(Ok(vec![]))).await, None, "empty value");
        assert_eq!(battery(Some(Ok(vec![101]))).await, None, "reserved value");
        assert_eq!(battery(Some(Err(LinkError::Att(0x05)))).await, None);
        assert_eq!(battery(Some(Err(LinkError::Timeout))).await, None);
    }

    /// The level lands on the device's entry (by its upper-case address, as the sessions key it) with
    /// the time read, beside what the session outcome keeps there.
    #[test]
    fn recorded_battery_lives_beside_the_session_record() {
        let status = BleStatusHandle::default();
        status.record_battery("c0:26:da:00:00:02", 64, 1_700_000_000);
        let snap = status.snapshot();
        let entry = snap.devices.get("C0:26:DA:00:00:02").expect("an entry");
        assert_eq!(
            entry.battery,
            Some(store::Battery {
                percent: 64,
                at: 1_700_000_000
            })
        );
        assert_eq!(entry.last_failure, None);
        // The status file keeps it; a file from before batteries were read still loads.
        let json = serde_json::to_string(entry).unwrap();
        assert!(
            json.contains(r#""battery":{"percent":64,"at":1700000000}"#),
            "{json}"
        );
        let old: DeviceStatus = serde_json::from_str(
            r#"{"last_failure":null,"last_success":1700000000,"consecutive_failures":0}"#,
        )
        .unwrap();
        assert_eq!(old.battery, None);
    }

    /// The status topic shows the adapter and, per paired device, when it was last read and its last
    /// failure with stage, cause and RSSI.
    #[test]
    fn status_topic_shows_adapter_and_last_failure() {
        let mut status = BleStatus {
            adapter: AdapterState::Missing {
                cause: "no adapter".into(),
            },
            ..BleStatus::default()
        };
        status.devices.insert(
            "AA:00:00:00:00:01".into(),
            DeviceStatus {
                last_failure: Some(Failure {
                    stage: "connect".into(),
                    cause: "timed out".into(),
                    rssi: Some(-91),
                    at: 0,
                }),
                last_success: Some(1_700_000_000),
                consecutive_failures: 1,
                battery: None,
            },
        );
        let devices = BTreeMap::from([(
            "AA:00:00:00:00:01".to_owned(),
            PairedDevice {
                address: "AA:00:00:00:00:01".into(),
                kind: DeviceKind::Cuff,
                name: None,
                model: None,
                manufacturer: None,
                serial: None,
                patient: Some("p-1".into()),
                users: BTreeMap::new(),
                paired_at: 0,
            },
        )]);
        let mut msg = protocol::wire::StatusMessage::online("gw", None);
        status.fill_status(&mut msg, &devices);
        assert_eq!(msg.adapter.as_deref(), Some("absent"));
        assert_eq!(msg.devices.len(), 1);
        let d = &msg.devices[0];
        assert_eq!(d.kind, protocol::wire::Kind::BloodPressure);
        assert_eq!(d.last_seen.as_deref(), Some("2023-11-14T22:13:20Z"));
        assert_eq!(
            d.last_failure.as_deref(),
            Some("connect: timed out (RSSI -91 dBm)")
        );
    }
}
