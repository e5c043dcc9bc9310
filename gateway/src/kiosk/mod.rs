//! The clinic kiosk: one shared cuff and meter, many patients a day (DESIGN.md "community clinic",
//! promise 6).
//!
//! ```text
//! card reader / staff page ──check-in──▶ session ──▶ attribution of each kiosk reading ──▶ pipeline
//!                                                 └─▶ unattributed hold (journal-backed) ──assign/discard──▶ journal
//! kiosk state ──watch──▶ web (patient page, staff page, live updates)
//! ```
//!
//! [`KioskControl`] is the one contract between the kiosk's state (sessions, the hold) and its web server
//! (`kiosk::web`): the pages only ever see what these types carry — never a name, never a card UID, and on the
//! patient page at most the last characters of the pseudonymous id.

use std::future::Future;

pub mod attribution;
pub mod card;
pub mod hold;
pub mod state;
pub mod web;

pub use state::{Kiosk, KioskSettings};

use serde::Serialize;

/// What the patient screen shows now. Sent to the page on every change (live updates).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PatientScreen {
    /// Nobody is checked in: "tap your card".
    Idle,
    /// A card was presented that the CRM's configuration does not map to a patient.
    CardUnknown,
    /// A patient is checked in and nothing is being measured yet.
    CheckedIn {
        /// This session (changes at every check-in, so a page never mixes two sessions).
        session: u64,
        /// At most the last 4 characters of the pseudonymous patient id.
        patient_hint: String,
    },
    /// A kiosk device is measuring for the checked-in patient.
    Measuring {
        /// This session.
        session: u64,
        /// At most the last 4 characters of the pseudonymous patient id.
        patient_hint: String,
        /// Which device.
        kind: MeasurementKind,
        /// The cuff pressure now (Intermediate Cuff Pressure), when the cuff sends it.
        #[serde(skip_serializing_if = "Option::is_none")]
        cuff_pressure_mmhg: Option<f32>,
    },
    /// A reading of the checked-in patient and what it means.
    Result {
        /// This session.
        session: u64,
        /// At most the last 4 characters of the pseudonymous patient id.
        patient_hint: String,
        /// The result.
        result: ResultView,
    },
}

/// Glucose or blood pressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasurementKind {
    /// A glucometer reading.
    Glucose,
    /// A cuff reading.
    BloodPressure,
}

/// A result as the patient page shows and speaks it. Numbers are already formatted in the unit the
/// device displayed (CLINICAL.md §3.4: mmol/L with one decimal); the words come from the page's
/// translation files, keyed by [`Advice`] and [`SymptomQuestion`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultView {
    /// The reading's deterministic id (what a symptom answer refers to).
    pub reading_id: String,
    /// Glucose or blood pressure.
    pub kind: MeasurementKind,
    /// The value as displayed: `"7.7"`, `"138/88"`.
    pub value: String,
    /// Its unit: `"mmol/L"`, `"mg/dL"`, `"mmHg"`, `"kPa"`.
    pub unit: String,
    /// Pulse, when the cuff measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulse_bpm: Option<u16>,
    /// The edge rule engine's decision in plain words.
    pub advice: Advice,
    /// A question the rule engine asks before it decides (CLINICAL.md: symptoms of a crisis or a low).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<SymptomQuestion>,
}

/// The edge rule engine's decision for the patient, in the page's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    /// In range.
    Normal,
    /// Below range, not critical.
    Low,
    /// Above range, not critical.
    High,
    /// The engine waits for a repeat (pending confirmation): measure again in a few minutes.
    MeasureAgain,
    /// Critical or urgent: see a nurse now.
    SeeNurse,
}

/// A yes/no question the page asks (large buttons, spoken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SymptomQuestion {
    /// Crisis-range blood pressure: chest pain, shortness of breath, severe headache, confusion or weakness?
    CrisisSymptoms,
    /// Low glucose: shaking, sweating, confusion, …?
    LowGlucoseSymptoms,
}

/// How a session began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckInBy {
    /// A card on the reader.
    Card,
    /// Staff entry on the staff page.
    Staff,
}

/// The current session, for the staff page (staff may see the pseudonymous id).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionView {
    /// This session.
    pub session: u64,
    /// The pseudonymous patient id.
    pub patient: String,
    /// How it began.
    pub by: CheckInBy,
    /// When it began (RFC 3339, UTC).
    pub started_utc: String,
    /// When it ends unless something happens (idle timeout; RFC 3339, UTC).
    pub expires_utc: String,
}

/// A kiosk reading no patient could be given, held for staff.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldReading {
    /// Its deterministic reading id (kept when it is assigned).
    pub reading_id: String,
    /// The device id.
    pub device: String,
    /// Glucose or blood pressure.
    pub kind: MeasurementKind,
    /// The value as displayed and its unit.
    pub value: String,
    /// Its unit.
    pub unit: String,
    /// When it was measured (the time attribution used; RFC 3339, UTC), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_utc: Option<String>,
    /// When the gateway received it (RFC 3339, UTC).
    pub received_utc: String,
    /// Why it is held: `no_session`, `outside_session`, `replayed_memory`, `untrusted_time`, …
    pub reason: String,
}

/// A kiosk device's state, for the staff page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    /// The device id.
    pub device: String,
    /// Glucose or blood pressure, once the device has sent a value (until then the kiosk cannot tell:
    /// the configuration lists device ids only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<MeasurementKind>,
    /// Connected now.
    pub connected: bool,
    /// Battery level, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery_percent: Option<u8>,
    /// The battery is low (`sources::ble::store::LOW_BATTERY_PERCENT`): staff should change it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub battery_low: bool,
    /// The last failure, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<DeviceFailure>,
}

/// Where a device's last session failed, and why. The page names the stage in its own language
/// (`staff_stage_<stage>`); the cause is the technical detail (BlueZ's or the meter's words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceFailure {
    /// The session stage (`connect`, `racp`, …: the BLE source's session stages).
    pub stage: String,
    /// What went wrong, as reported.
    pub cause: String,
}

/// The card reader board's state, for the staff page: a kiosk whose reader is unplugged or broken can
/// only check patients in by staff entry, and the desk must see that before the queue does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardReaderView {
    /// The board answers on its serial port.
    pub connected: bool,
    /// The board's card reader works (`None` before the board first said hello).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reader_ok: Option<bool>,
    /// What is wrong or went wrong last (the page says it in its language: `staff_failure_<code>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<CardReaderFailure>,
}

/// What is wrong with the card reader board, as a stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CardReaderFailure {
    /// The board is unplugged, or its serial port cannot be opened.
    BoardUnplugged,
    /// The port is open but the board has not been heard within its ping intervals.
    BoardSilent,
    /// The board's MFRC522 does not answer.
    ReaderNotResponding,
    /// The board's bus to the MFRC522 failed.
    ReaderBus,
    /// The MFRC522 did not start.
    ReaderInit,
}

/// What the staff page shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StaffView {
    /// The current session, if any.
    pub session: Option<SessionView>,
    /// Unattributed kiosk readings, oldest first.
    pub held: Vec<HeldReading>,
    /// The kiosk's measuring devices.
    pub devices: Vec<DeviceView>,
    /// The card reader board, when the kiosk has one (`[kiosk] reader`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub card_reader: Option<CardReaderView>,
    /// Records waiting in the journal.
    pub journal_depth: u64,
    /// The broker connection is up.
    pub broker_connected: bool,
}

/// Who did something on the staff page: the id of the staff token used (configured beside the token;
/// never a person's name). Goes into the audit events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaffId(pub String);

/// A staff token and the id it is known by in audit events (configured in `[kiosk]`). The token is a
/// secret: its `Debug` shows only the id.
#[derive(Clone, PartialEq, Eq)]
pub struct StaffToken {
    /// Who used it (goes into audit events).
    pub id: StaffId,
    /// The bearer token the staff page sends in a header (compared in constant time).
    pub token: String,
}

impl std::fmt::Debug for StaffToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaffToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a kiosk action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KioskError {
    /// Not a pseudonymous patient id (the reason names the rule, not the value).
    #[error("not a pseudonymous patient id: {0}")]
    InvalidPatient(String),
    /// No held reading has that id.
    #[error("no unattributed reading with that id")]
    NoSuchReading,
    /// The reading or session the request refers to is no longer current.
    #[error("that session is over")]
    StaleSession,
    /// A reason is required (discard) or too long.
    #[error("reason: {0}")]
    InvalidReason(String),
    /// The journal could not take the record (full, or a disk error): nothing changed.
    #[error("not stored: {0}")]
    Storage(String),
}

/// The kiosk as its web server drives it. Implemented by the kiosk's state; the web server is generic
/// over it, so its tests can drive pages without the rest of the gateway.
pub trait KioskControl: Send + Sync + 'static {
    /// The patient screen, updated on every change.
    fn screen(&self) -> tokio::sync::watch::Receiver<PatientScreen>;

    /// A snapshot for the staff page.
    fn staff_view(&self) -> StaffView;

    /// Staff checks a patient in (ends any current session first).
    fn check_in(
        &self,
        patient: &str,
        by: &StaffId,
    ) -> impl Future<Output = Result<SessionView, KioskError>> + Send;

    /// Ends the current session (from the patient page's "done" button, `by` is `None`).
    fn check_out(
        &self,
        by: Option<&StaffId>,
    ) -> impl Future<Output = Result<(), KioskError>> + Send;

    /// Assigns a held reading to a patient: the reading is journaled under its original id, with an audit
    /// event (staff id, time, reading, from unattributed to the patient).
    fn assign(
        &self,
        reading_id: &str,
        patient: &str,
        by: &StaffId,
    ) -> impl Future<Output = Result<(), KioskError>> + Send;

    /// Discards a held reading (a test, a demonstration) with a reason: an event says so.
    fn discard(
        &self,
        reading_id: &str,
        reason: &str,
        by: &StaffId,
    ) -> impl Future<Output = Result<(), KioskError>> + Send;

    /// The patient's answer to the result's question: `yes` means symptoms, which the edge engine takes
    /// at once (and which travel to ingest with the reading's id).
    fn answer_symptoms(
        &self,
        session: u64,
        reading_id: &str,
        yes: bool,
    ) -> impl Future<Output = Result<(), KioskError>> + Send;
}
